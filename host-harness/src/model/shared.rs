//! Envoy's shared data with compare-and-swap, as a pure model: every write
//! gives the entry a new, never-zero `cas`; a write with `cas` 0 always
//! succeeds, with another `cas` only when the entry is missing or holds
//! it; a read of a missing key finds nothing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::status::Status;

/// Shared data: one per Envoy VM id, shared by its workers. Clones share.
#[derive(Debug, Clone, Default)]
pub struct SharedData(Arc<Mutex<SharedInner>>);

#[derive(Debug, Default)]
struct SharedInner {
    entries: HashMap<String, (Vec<u8>, u32)>,
    last_cas: u32,
}

impl SharedData {
    /// The value and `cas` under `key`.
    pub fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.0.lock().ok()?.entries.get(key).cloned()
    }

    /// Every key held, sorted.
    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.0.lock().map(|s| s.entries.keys().cloned().collect()).unwrap_or_default();
        keys.sort();
        keys
    }

    /// Envoy's `SharedData::set`.
    ///
    /// # Errors
    /// [`Status::CasMismatch`] when `cas` is not 0 and the entry holds
    /// another.
    pub fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), Status> {
        let mut inner = self.0.lock().map_err(|_| Status::InternalFailure)?;
        if let Some((_, held)) = inner.entries.get(key) {
            if cas != 0 && cas != *held {
                return Err(Status::CasMismatch);
            }
        }
        inner.last_cas = inner.last_cas.wrapping_add(1).max(1);
        let next = inner.last_cas;
        inner.entries.insert(key.to_string(), (value.to_vec(), next));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_data_follows_envoys_compare_and_swap() {
        let shared = SharedData::default();
        assert_eq!(shared.get("k"), None);
        shared.set("k", b"a", 77).unwrap();
        let (_, first) = shared.get("k").unwrap();
        assert_ne!(first, 0);
        assert_eq!(shared.set("k", b"b", first.wrapping_add(1)), Err(Status::CasMismatch));
        shared.set("k", b"b", first).unwrap();
        let (value, second) = shared.get("k").unwrap();
        assert_eq!((value.as_slice(), second != first), (&b"b"[..], true));
        assert_eq!(shared.set("k", b"c", first), Err(Status::CasMismatch));
        shared.set("k", b"c", 0).unwrap();
        assert_eq!(shared.get("k").unwrap().0, b"c");
        let other = shared.clone();
        other.set("j", b"x", 0).unwrap();
        assert_eq!(shared.keys(), ["j", "k"]);
    }
}
