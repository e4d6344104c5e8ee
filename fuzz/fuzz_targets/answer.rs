//! Any bytes as a token endpoint's or credential service's answer
//! (`Provider::parse`) to each kind of provider (`oauth2`,
//! `token_exchange`, `fetch` with one and with two JSON pointers), and as a
//! shared-data record (`Record::decode`, what another worker or a stale
//! VM left). Never a panic; an accepted answer holds exactly the values
//! asked for, each fit for a header, with times that move forward; a
//! refusal is one of the known messages, with only configured field names
//! and numbers filled in (so it can never carry a value from the answer);
//! a record's round trip through its encoding is stable.
#![no_main]

use std::sync::OnceLock;

use keyswap_policy::credential::{Provider, Record, MAX_VALUE_BYTES};
use keyswap_policy::Policy;
use libfuzzer_sys::fuzz_target;

/// The conformance suite's configurations with dynamic credentials.
const CONFIGS: [&str; 3] = [
    include_str!("../../tests/conformance/configs/credentials-oauth2.json"),
    include_str!("../../tests/conformance/configs/credentials-exchange.json"),
    include_str!("../../tests/conformance/configs/credentials-fetch.json"),
];

/// When every answer is received (Unix milliseconds).
const NOW: i64 = 1_800_000_000_000;

fn providers() -> &'static [Provider] {
    static ALL: OnceLock<Vec<Provider>> = OnceLock::new();
    ALL.get_or_init(|| {
        let env = |name: &str| Some(format!("fuzz-env-{name}"));
        let policies = CONFIGS.iter().map(|c| Policy::from_json(c.as_bytes(), &env).expect("a shipped configuration"));
        let all: Vec<Provider> = policies.flat_map(|p| p.credential_providers().to_vec()).collect();
        assert!(all.len() >= 4, "the configurations hold every kind of provider");
        all
    })
}

/// Every refusal `Provider::parse` may give, with a configured field name
/// as `F` and a number as `N`. A refusal outside this list fails the run:
/// a new message is added here only once it is known to carry nothing
/// from the answer but a field name the configuration holds.
const REFUSALS: [&str; 12] = [
    "the token endpoint answered status N",
    "the credential service answered status N",
    "the token endpoint answered a body that is not JSON",
    "the credential service answered a body that is not JSON",
    "the answer has no `F`",
    "`F` in the answer is not a string",
    "`F` in the answer is not a number",
    "`F` in the answer is not a positive number",
    "`F` in the answer is under a second",
    "`F` in the answer is empty",
    "`F` in the answer is longer than N bytes",
    "`F` in the answer holds a character not allowed in a credential",
];

/// `text` with each backticked field name the provider knows as `F` and
/// each run of digits as `N`; `None` when a backticked part is not one.
fn shape(text: &str, provider: &Provider) -> Option<String> {
    let known =
        |name: &str| matches!(name, "access_token" | "expires_in") || provider.pointers.iter().any(|p| p == name);
    let mut out = String::with_capacity(text.len());
    let mut parts = text.split('`');
    out.push_str(parts.next().unwrap_or_default());
    while let Some(name) = parts.next() {
        if !known(name) {
            return None;
        }
        out.push_str("`F`");
        out.push_str(parts.next()?);
    }
    let mut shaped = String::with_capacity(out.len());
    for c in out.chars() {
        if c.is_ascii_digit() {
            if !shaped.ends_with('N') {
                shaped.push('N');
            }
        } else {
            shaped.push(c);
        }
    }
    Some(shaped)
}

fuzz_target!(|data: &[u8]| {
    let Some((&[which, hi, lo], body)) = data.split_first_chunk::<3>().map(|(h, b)| (h, b)) else {
        return;
    };
    let providers = providers();
    let provider = &providers[usize::from(which) % providers.len()];
    // Mostly 200, sometimes any status.
    let status = if hi & 0x80 == 0 { 200 } else { u16::from_be_bytes([hi & 0x7f, lo]) % 600 };

    match provider.parse(status, body, NOW) {
        Ok(answer) => {
            assert!((200..300).contains(&status), "accepted with status {status}");
            assert!(!answer.values.is_empty(), "an answer with no value");
            for value in &answer.values {
                assert!(!value.is_empty() && value.len() <= MAX_VALUE_BYTES, "a value of {} bytes", value.len());
                assert!(value.bytes().all(|b| (0x21..0x7f).contains(&b)), "a value unfit for a header");
            }
            assert!(answer.refresh_at > NOW, "a refresh not in the future");
            if let Some(expires_at) = answer.expires_at {
                assert!(expires_at > NOW && answer.refresh_at <= expires_at, "refreshed after it expires");
            }
            // The record it becomes survives the shared-data encoding.
            let (record, _) = Record::default().succeeded(answer);
            assert_eq!(Record::decode(&record.encode()).encode(), record.encode(), "a record's round trip");
        }
        Err(refused) => {
            let text = refused.to_string();
            let shaped = shape(&text, provider);
            assert!(shaped.as_deref().is_some_and(|s| REFUSALS.contains(&s)), "a refusal of unknown shape: {text}");
        }
    }

    // The same bytes as a stored record: read as something, never a panic,
    // and stable from its first re-encoding on.
    let record = Record::decode(body);
    let once = record.encode();
    assert_eq!(Record::decode(&once).encode(), once, "a decoded record's round trip");
});
