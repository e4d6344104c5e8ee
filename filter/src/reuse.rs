//! One compile per configuration per VM. Envoy configures a plugin once
//! per ECDS subscription, and keyswap's two stages (the listener's filter
//! and the cluster's upstream filter) are two subscriptions of the same
//! resource: every push reaches every VM twice, with the same bytes. The
//! second root context takes the policy the first compiled instead of
//! compiling 100,000 clients again (docs/performance.md, "Revocation").
//!
//! "The same bytes" is a 128-bit XXH3 fingerprint and the length: two
//! different configurations meet only by a collision, which nobody but
//! the operator (who writes both, and could push either directly) could
//! even try to build.

use std::rc::Rc;

/// The last configuration a VM compiled, and what it compiled to.
pub(crate) struct LastCompiled<T> {
    last: Option<((u128, usize), Rc<T>)>,
}

impl<T> LastCompiled<T> {
    pub(crate) const fn new() -> Self {
        Self { last: None }
    }

    /// What `config` compiles to: the last result when `config` is the
    /// configuration compiled last, else `compile`'s (kept for next time
    /// when it succeeds; a refusal leaves the last one kept).
    ///
    /// # Errors
    /// `compile`'s.
    pub(crate) fn get_or_compile<E>(
        &mut self,
        config: &[u8],
        compile: impl FnOnce() -> Result<T, E>,
    ) -> Result<Rc<T>, E> {
        let key = (keyswap_policy::fingerprint(config), config.len());
        if let Some((_, compiled)) = self.last.as_ref().filter(|(k, _)| *k == key) {
            return Ok(compiled.clone());
        }
        let compiled = Rc::new(compile()?);
        self.last = Some((key, compiled.clone()));
        Ok(compiled)
    }
}

#[cfg(test)]
mod tests {
    use super::LastCompiled;
    use std::cell::Cell;

    #[test]
    fn the_same_configuration_compiles_once_and_any_other_again() {
        let calls = Cell::new(0);
        let compile = |text: &str| {
            calls.set(calls.get() + 1);
            if text.contains("bad") {
                Err("refused")
            } else {
                Ok(text.to_string())
            }
        };
        let mut last = LastCompiled::new();
        let mut load = |text: &str| last.get_or_compile(text.as_bytes(), || compile(text)).map(|p| (*p).clone());
        assert_eq!(load("{\"a\":1}"), Ok("{\"a\":1}".to_string()));
        assert_eq!(load("{\"a\":1}"), Ok("{\"a\":1}".to_string()), "the second stage's configure");
        assert_eq!(calls.get(), 1);
        // One byte different (a revocation) compiles.
        assert_eq!(load("{\"a\":2}"), Ok("{\"a\":2}".to_string()));
        assert_eq!(calls.get(), 2);
        // A refusal is compiled (and refused) every time, and keeps the last.
        assert_eq!(load("bad"), Err("refused"));
        assert_eq!(load("bad"), Err("refused"));
        assert_eq!(calls.get(), 4);
        assert_eq!(load("{\"a\":2}"), Ok("{\"a\":2}".to_string()));
        assert_eq!(calls.get(), 4);
        // Going back to an earlier one compiles it again.
        assert_eq!(load("{\"a\":1}"), Ok("{\"a\":1}".to_string()));
        assert_eq!(calls.get(), 5);
    }
}
