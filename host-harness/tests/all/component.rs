//! Runner `component`: the conformance suite through the keyswap component (world
//! `filter`), its exports against `wit/`, and agreement with the proxy-wasm
//! module case by case.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::OnceLock;

use keyswap_conformance::{default_dir, Observed, Runner, Suite, SuiteReport};
use keyswap_harness::component::{self, interfaces, InterfaceItems, PolicyComponent};
use keyswap_harness::runner;
use keyswap_harness::Artifact;

/// The built component, compiled once for this test binary.
pub fn policy_component() -> &'static PolicyComponent {
    static COMPONENT: OnceLock<PolicyComponent> = OnceLock::new();
    COMPONENT
        .get_or_init(|| PolicyComponent::load(&Artifact::Component.default_path()).unwrap_or_else(|e| panic!("{e}")))
}

#[test]
fn conformance_suite_passes_through_the_component() {
    let suite = Suite::load(&default_dir()).unwrap_or_else(|e| panic!("the suite does not load: {e}"));
    let component = policy_component();
    let report = SuiteReport::run(&suite.plan(Runner::Component), |case| component::observe(component, case));
    println!("{}", report.render());
    assert!(report.failed.is_empty(), "{}", report.render());
    assert!(report.passed >= 1, "no case ran");
}

/// World `world`'s exports (or imports) in `wit/`, with their functions.
fn wit_world(world: &str, imports: bool) -> Vec<InterfaceItems> {
    let mut resolve = wit_parser::Resolve::default();
    let (package, _) = resolve.push_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("../wit")).unwrap();
    let world = resolve.select_world(&[package], Some(world)).unwrap();
    let items = if imports { &resolve.worlds[world].imports } else { &resolve.worlds[world].exports };
    let mut out: Vec<InterfaceItems> = items
        .iter()
        .filter_map(|(key, item)| match item {
            wit_parser::WorldItem::Interface { id, .. } => {
                let mut functions: Vec<String> = resolve.interfaces[*id].functions.keys().cloned().collect();
                functions.sort();
                Some(InterfaceItems { name: resolve.name_world_key(key), functions })
            }
            _ => None,
        })
        .collect();
    out.sort();
    out
}

#[test]
fn the_built_component_exports_exactly_world_gateway() {
    let component = policy_component();
    let exports = interfaces(component.engine(), component.component(), false);
    assert_eq!(exports, wit_world("gateway", false), "the component's exports differ from wit/ world `gateway`");
    // World `filter` is part of it, and linking through the bindings
    // generated from `wit/` (PolicyComponent::load) type-checked every
    // function of it.
    for export in wit_world("filter", false) {
        assert!(exports.contains(&export), "{} is missing", export.name);
    }
    let names: Vec<&str> = exports.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(
        names,
        ["keyswap:gateway/gateway-config@0.1.0", "keyswap:gateway/policy@0.1.0", "wasi:http/incoming-handler@0.2.12"]
    );
}

#[test]
fn the_component_imports_only_wasi() {
    let component = policy_component();
    let declared: BTreeSet<String> = wit_world("gateway", true).into_iter().map(|i| i.name).collect();
    let imports = interfaces(component.engine(), component.component(), true);
    for import in &imports {
        // The gateway's own imports come from `wit/`; Rust's standard
        // library adds WASI 0.2 interfaces of its own (at its own patch
        // version), which every WASI host provides.
        let std_import = import.name.starts_with("wasi:") && !import.name.starts_with("wasi:http/");
        assert!(declared.contains(&import.name) || std_import, "unexpected import {}", import.name);
    }
    for name in ["wasi:http/outgoing-handler@0.2.12", "wasi:cli/environment@0.2.12"] {
        assert!(imports.iter().any(|i| i.name == name), "{name} is not imported: {imports:?}");
    }
}

#[test]
fn before_configure_every_request_is_refused() {
    let mut instance = policy_component().instance().unwrap();
    let request = component::RequestView {
        route_name: None,
        cluster: None,
        method: "GET".into(),
        path: "/".into(),
        authority: "gateway.local".into(),
        headers: vec![("authorization".into(), b"Bearer dev-key-123".to_vec())],
    };
    match instance.decide(&request).unwrap() {
        component::Decision::Deny(denial) => {
            assert_eq!((denial.status, denial.code.as_str()), (500, "not_configured"));
        }
        other => panic!("{other:?}"),
    }
    assert!(instance.strip_response(&[("set-cookie".into(), b"a".to_vec())]).unwrap().is_empty());
}

#[test]
fn a_refused_configuration_keeps_the_previous_one() {
    let mut instance = policy_component().instance().unwrap();
    let good = r#"{"clients": [{"id": "c", "key": "k", "routes": ["*"]}], "routes": [{"name": "r",
        "match": {"path_prefix": "/"}, "inject": [{"header": "x-up", "value": {"inline": "up"}}]}]}"#;
    let summary = instance.configure(good, &[]).unwrap().unwrap();
    assert_eq!((summary.clients, summary.routes), (1, 1));
    let refused = instance.configure("{", &[]).unwrap().unwrap_err();
    assert_eq!(refused.path, "$");
    let request = component::RequestView {
        route_name: None,
        cluster: None,
        method: "GET".into(),
        path: "/a".into(),
        authority: "h".into(),
        headers: vec![("authorization".into(), b"Bearer k".to_vec())],
    };
    assert!(matches!(instance.decide(&request).unwrap(), component::Decision::Forward(_)));
}

/// Two hosts agree on a case when they observed the same thing; a refused
/// configuration agrees when the proxy-wasm host's log holds the
/// component's `path: message` line.
fn agree(component: &Observed, module: &Observed) -> bool {
    let sorted = |headers: &[(String, String)]| {
        let mut h: Vec<(String, String)> = headers.iter().map(|(n, v)| (n.to_ascii_lowercase(), v.clone())).collect();
        h.sort();
        h
    };
    match (component, module) {
        (Observed::ConfigRefused { log: line }, Observed::ConfigRefused { log }) => log.contains(line.as_str()),
        (
            Observed::Denied { status: s1, headers: h1, body: b1 },
            Observed::Denied { status: s2, headers: h2, body: b2 },
        ) => s1 == s2 && b1 == b2 && sorted(h1) == sorted(h2),
        (
            Observed::Forwarded { path: p1, headers: h1, client_response: r1 },
            Observed::Forwarded { path: p2, headers: h2, client_response: r2 },
        ) => p1 == p2 && sorted(h1) == sorted(h2) && r1.as_deref().map(sorted) == r2.as_deref().map(sorted),
        _ => false,
    }
}

#[test]
fn the_component_and_the_proxy_wasm_module_agree_on_every_case() {
    let suite = Suite::load(&default_dir()).unwrap_or_else(|e| panic!("the suite does not load: {e}"));
    let module = crate::filter();
    let component = policy_component();
    let mut compared = 0;
    let mut disagreements = Vec::new();
    // Only cases both runners run: a case one of them skips is one where
    // the hosts differ on purpose, for a capability one of them lacks
    // (keyswap's own routing by `host` and `path_prefix`, which the
    // component has and Envoy's filter refuses; dynamic credentials, which
    // the component refuses) or a reason in skip.json.
    let skipped = |runner: Runner| -> BTreeSet<String> {
        suite.plan(runner).skipped.iter().map(|(case, _)| case.name.clone()).collect()
    };
    let (component_skips, module_skips) = (skipped(Runner::Component), skipped(Runner::Harness));
    let both = |name: &str| !component_skips.contains(name) && !module_skips.contains(name);
    for case in suite.cases.iter().filter(|c| c.steps.is_empty() && both(&c.name)) {
        let by_component = component::observe(component, case);
        let by_module = runner::run_case(module, case).observed;
        match (&by_component, &by_module) {
            (Ok(c), Ok(m)) if agree(c, m) => compared += 1,
            _ => {
                disagreements.push(format!("{}:\n  component: {by_component:?}\n  module:    {by_module:?}", case.name))
            }
        }
    }
    assert!(disagreements.is_empty(), "{} disagreements:\n{}", disagreements.len(), disagreements.join("\n"));
    println!("component and module agree on {compared} cases");
    assert!(compared >= 1);
}

#[test]
fn a_disagreement_is_caught() {
    let denied = |status| Observed::Denied { status, headers: vec![], body: b"{}".to_vec() };
    assert!(agree(&denied(401), &denied(401)));
    assert!(!agree(&denied(401), &denied(403)));
    let forwarded = |path: &str| Observed::Forwarded { path: path.into(), headers: vec![], client_response: None };
    assert!(!agree(&forwarded("/a"), &forwarded("/a?key=x")));
    assert!(!agree(&forwarded("/a"), &denied(401)));
    let refused = |log: &str| Observed::ConfigRefused { log: log.into() };
    assert!(agree(&refused("routes: bad"), &refused("keyswap: configuration refused: routes: bad")));
    assert!(!agree(&refused("routes: bad"), &refused("clients: bad")));
}
