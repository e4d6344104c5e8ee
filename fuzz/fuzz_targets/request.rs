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
//! credential is present exactly once.
#![no_main]

use keyswap_policy::credential::NoRecords;
use keyswap_policy::query::{params, split_path};
use keyswap_policy::{Decision, Policy, RequestView};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

const CONFIG: &str = include_str!("../../tests/conformance/configs/gateway.json");
const KEY_HEADERS: [&str; 2] = ["authorization", "x-api-key"];

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
