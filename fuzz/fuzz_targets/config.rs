//! Any bytes as a configuration: refused with a field path, or loaded.
//! Never a panic, and a refusal never repeats a quoted value.
#![no_main]

use keyswap_policy::Policy;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let env = |name: &str| (name.len() % 3 != 0).then(|| format!("secret-{name}"));
    match Policy::from_json(data, &env) {
        Ok(policy) => {
            let _ = policy.summary();
        }
        Err(err) => {
            assert!(!err.path.is_empty(), "an error names its field");
            let text = err.to_string();
            // Unless the input itself holds the marker (it may quote its
            // own field names), an environment value never shows.
            let in_input = data.windows(b"secret-".len()).any(|w| w == b"secret-");
            assert!(in_input || !text.contains("secret-"), "a refusal repeats an environment value");
        }
    }
});
