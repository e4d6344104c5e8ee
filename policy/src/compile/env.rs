//! What every compile step shares: the error it returns, and the
//! environment `env` secrets are read from (once, at configuration).

use crate::raw::RawSecret;

/// A configuration the filter refuses, with the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ConfigError {
    /// The field path, for example `routes[2].inject[0].value.env`
    /// (`$` for the document itself).
    pub path: String,
    /// What is wrong, as a sentence fragment; never contains a value.
    pub message: String,
}

/// A document refused for its shape, at the reader's path (`$` for the
/// document itself).
impl From<crate::json::Error> for ConfigError {
    fn from(e: crate::json::Error) -> Self {
        let path = if e.path.is_empty() { "$".to_string() } else { e.path };
        Self { path, message: e.message }
    }
}

impl ConfigError {
    pub(crate) fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self { path: path.into(), message: message.into() }
    }
}

/// Looks up a variable in the VM's environment.
pub trait Environment {
    /// The variable's value, if it is set.
    fn var(&self, name: &str) -> Option<String>;
}

impl<F: Fn(&str) -> Option<String>> Environment for F {
    fn var(&self, name: &str) -> Option<String> {
        self(name)
    }
}

/// Resolves a secret value. `env` is read here, once, never per request.
pub(crate) fn secret(value: &RawSecret, path: &str, env: &dyn Environment) -> Result<String, ConfigError> {
    match value {
        RawSecret::Inline(v) if v.is_empty() => Err(ConfigError::new(format!("{path}.inline"), "must not be empty")),
        RawSecret::Inline(v) => Ok(v.clone()),
        RawSecret::Env(name) => {
            let path = format!("{path}.env");
            if name.is_empty() {
                return Err(ConfigError::new(path, "must name an environment variable"));
            }
            // `{"env": "sk-…"}` (the credential where its variable's name
            // belongs) is an easy slip; such a name is refused unquoted.
            if !is_env_name(name) {
                return Err(ConfigError::new(
                    path,
                    "must be an environment variable's name (letters, digits and `_`), not a value",
                ));
            }
            // Only a conventional upper-case name is quoted back; any other
            // (`sk_live_…` is a valid name) might still be a credential.
            let shown = if is_conventional_env_name(name) { name.as_str() } else { "the variable" };
            match env.var(name) {
                Some(v) if !v.is_empty() => Ok(v),
                Some(_) => Err(ConfigError::new(path, format!("{shown} is empty"))),
                None => Err(ConfigError::new(path, format!("{shown} is not set"))),
            }
        }
    }
}

fn is_env_name(name: &str) -> bool {
    (1..=256).contains(&name.len())
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn is_conventional_env_name(name: &str) -> bool {
    is_env_name(name) && name.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_errors_quote_only_conventional_names() {
        let env = |_: &str| None;
        let value = |name: &str| RawSecret::Env(name.to_string());
        let message = |name: &str| secret(&value(name), "v", &env).unwrap_err().to_string();
        assert_eq!(message("OPENAI_API_KEY"), "v.env: OPENAI_API_KEY is not set");
        assert_eq!(message("sk_live_4eC39HqLyjWDarjtT1zdp7dc"), "v.env: the variable is not set");
        assert!(!message("sk-proj-abc123").contains("sk-proj"));
        assert!(message("9LIVES").contains("not a value"));
    }
}
