//! One request through the policy. The input is a request head as text:
//!
//! ```text
//! ROUTE_NAME[@CLUSTER] METHOD TARGET AUTHORITY
//! name: value
//! ...
//! ```
//!
//! The cluster is the route name's unless given (Envoy's route N sends to
//! cluster N in the tests' bootstrap). Checked for every input: no panic; a
//! forwarded request carries no key source (header or query parameter), no
//! client-sent client id and no `_` look-alike of either; every injected
//! credential is present exactly once. The same request also goes through
//! the two stages of a configuration with rate limits and quotas
//! (`limits.json`, with `client_id_on_listener`): the first stage leaves at
//! most one client id, a configured client's and never a client-sent
//! value of another; a refusal by a limit carries `retry-after` of at
//! least 1 and the `RateLimit` fields.
#![no_main]

use keyswap_policy::credential::NoRecords;
use keyswap_policy::limit::MemoryCounters;
use keyswap_policy::query::{params, split_path};
use keyswap_policy::{Decision, DenialReason, Policy, RequestView};
use libfuzzer_sys::fuzz_target;
use std::cell::RefCell;
use std::sync::OnceLock;

const CONFIG: &str = include_str!("../../tests/conformance/configs/gateway.json");
const KEY_HEADERS: [&str; 2] = ["authorization", "x-api-key"];
const LIMITS: &str = include_str!("../../tests/conformance/configs/limits.json");

fn policy() -> &'static Policy {
    static POLICY: OnceLock<Policy> = OnceLock::new();
    POLICY.get_or_init(|| {
        let env = |name: &str| Some(format!("upstream-{}", name.to_ascii_lowercase()));
        match Policy::from_json(CONFIG.as_bytes(), &env) {
            Ok(policy) => policy,
            Err(err) => panic!("the fuzz configuration must load: {err}"),
        }
    })
}

/// `limits.json` with `client_id_on_listener`.
fn limited() -> &'static Policy {
    static POLICY: OnceLock<Policy> = OnceLock::new();
    POLICY.get_or_init(|| {
        let mut json: serde_json::Value = match serde_json::from_str(LIMITS) {
            Ok(json) => json,
            Err(err) => panic!("limits.json is JSON: {err}"),
        };
        json["client_id_on_listener"] = serde_json::Value::Bool(true);
        match Policy::from_json(json.to_string().as_bytes(), &|_: &str| None) {
            Ok(policy) => policy,
            Err(err) => panic!("the limits configuration must load: {err}"),
        }
    })
}

thread_local! {
    /// The buckets, kept across inputs (so limits are reached and refuse).
    static COUNTERS: RefCell<MemoryCounters> = RefCell::new(MemoryCounters::default());
}

/// The request through `limited()`'s two stages, as in Envoy.
fn through_limits(route: Option<&str>, cluster: Option<&str>, headers: &[(String, Vec<u8>)]) {
    let policy = limited();
    let ids = ["team-a", "team-b", "quota-bot", "free"];
    let mut headers = headers.to_vec();
    let now = || 1_800_000_000_000;
    let key = policy.key_check(&RequestView::from_headers(None, &headers));
    policy.admit_with_id(&RequestView::from_headers(None, &headers), &key, &now).apply(&mut headers);
    let set: Vec<&[u8]> = headers
        .iter()
        .filter(|(n, _)| n.replace('_', "-").eq_ignore_ascii_case("x-keyswap-client"))
        .map(|(_, v)| v.as_slice())
        .collect();
    assert!(set.len() <= 1, "the first stage left {} client ids", set.len());
    if let Some(id) = set.first() {
        assert!(ids.iter().any(|c| c.as_bytes() == *id), "the first stage set a client id no client has");
    }
    let mut view = RequestView::from_headers(route, &headers);
    view.cluster = cluster;
    view.key = Some(&key);
    let decision = COUNTERS.with(|c| match policy.decide_limited(&view, &now, &NoRecords, &mut *c.borrow_mut()) {
        Decision::Deny(denial) if matches!(denial.reason, DenialReason::RateLimited | DenialReason::QuotaExceeded) => {
            Some(denial.headers())
        }
        _ => None,
    });
    if let Some(fields) = decision {
        let get = |name: &str| fields.iter().find(|(n, _)| *n == name).map(|(_, v)| v.to_string());
        let retry = get("retry-after").and_then(|v| v.parse::<u64>().ok());
        assert!(retry.is_some_and(|s| s >= 1), "retry-after {retry:?}");
        assert!(get("ratelimit-policy").is_some() && get("ratelimit").is_some(), "the RateLimit fields");
    }
}

fuzz_target!(|data: &[u8]| {
    let mut lines = data.split(|&b| b == b'\n');
    let first = lines.next().unwrap_or_default();
    let mut parts = first.splitn(4, |&b| b == b' ');
    let route = parts.next().map(|r| String::from_utf8_lossy(r).into_owned());
    let method = parts.next().unwrap_or_default().to_vec();
    let target = parts.next().unwrap_or_default().to_vec();
    let authority = parts.next().unwrap_or_default().to_vec();
    let mut headers =
        vec![(":method".to_string(), method), (":path".to_string(), target), (":authority".to_string(), authority)];
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else { continue };
        let name = String::from_utf8_lossy(&line[..colon]).to_ascii_lowercase();
        if name.is_empty() || name.starts_with(':') {
            continue;
        }
        headers.push((name, line[colon + 1..].to_vec()));
    }
    let (route, cluster) = match route.as_deref().and_then(|r| r.split_once('@')) {
        Some((route, cluster)) => (Some(route.to_string()), Some(cluster.to_string())),
        None => (route.clone(), route),
    };
    let route = route.filter(|r| !r.is_empty() && r != "-");
    let cluster = cluster.filter(|c| !c.is_empty() && c != "-");
    through_limits(route.as_deref(), cluster.as_deref(), &headers);
    let mut view = RequestView::from_headers(route.as_deref(), &headers);
    view.cluster = cluster.as_deref();
    let decision = policy().decide(&view, &|| 1_800_000_000_000, &NoRecords);
    let Decision::Forward(forward) = decision else { return };
    let client = forward.client.map(str::to_string);
    let injected: Vec<(String, String)> =
        forward.add_headers.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect();
    forward.apply(&mut headers);

    for (name, value) in &headers {
        let normal = name.replace('_', "-");
        let protected = |n: &str| KEY_HEADERS.contains(&n) || n == "x-keyswap-client" || n == "cookie";
        assert!(!name.contains('_') || !protected(&normal), "the look-alike `{name}` survived");
        if protected(name) {
            let ours = injected.iter().any(|(n, v)| n == name && v.as_bytes() == value.as_slice());
            assert!(ours, "client-sent `{name}` survived");
        }
    }
    for (name, _) in &injected {
        assert_eq!(headers.iter().filter(|(n, _)| n == name).count(), 1, "`{name}` set once");
    }
    if let Some(client) = client {
        let sent = headers.iter().find(|(n, _)| n == "x-keyswap-client").map(|(_, v)| v.as_slice());
        assert_eq!(sent, Some(client.as_bytes()));
    }
    let path = headers.iter().find(|(n, _)| n == ":path").map(|(_, v)| v.clone()).unwrap_or_default();
    if let (_, Some(query), _) = split_path(&path) {
        for param in params(query) {
            assert_ne!(&*param.name(), b"api_key", "a key parameter survived");
        }
    }
});
