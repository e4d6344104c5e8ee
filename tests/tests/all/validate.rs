//! `envoy --mode validate` on every shipped Envoy configuration: each
//! tracked YAML file with a top-level `static_resources:` section, run from
//! the repository root (where its relative paths, the filter's wasm and
//! the ECDS file `scripts/setup` creates, resolve). Envoy must accept it
//! and keyswap must log loading each keyswap configuration the file
//! carries (`keyswap_policy::Summary::from_log_line`, by content version,
//! so one filter loading does not vouch for another): `envoy.yaml`'s keyswap
//! configuration is its ECDS `default_config`, which validate loads like an
//! inline one. `scripts/test` runs this first.

use std::collections::BTreeSet;

use keyswap_envoy_config::ecds::env_names;
use keyswap_policy::{content_version, Summary};
use keyswap_tests::envoy::{filter_wasm, repo_root, tail, validate};
use serde_json::Value;

/// Tracked `*.yaml` / `*.yml` files with a `static_resources:` line.
fn shipped_envoy_configs() -> Vec<String> {
    let root = repo_root();
    let listed = std::process::Command::new("git")
        .args(["ls-files", "*.yaml", "*.yml"])
        .current_dir(&root)
        .output()
        .expect("git ls-files");
    assert!(listed.status.success(), "git ls-files: {}", String::from_utf8_lossy(&listed.stderr));
    String::from_utf8_lossy(&listed.stdout)
        .lines()
        .filter(|path| {
            let text = std::fs::read_to_string(root.join(path)).unwrap_or_default();
            text.lines().any(|l| l.starts_with("static_resources:"))
        })
        .map(str::to_string)
        .collect()
}

/// The keyswap configurations a file carries: every wasm filter's
/// `configuration` string (`google.protobuf.StringValue`) that is a JSON
/// object, inline or as an ECDS `default_config` (YAML aliases expanded).
fn keyswap_configs(yaml: &str) -> Vec<String> {
    fn walk(value: &Value, out: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                let inner = map.get("configuration").and_then(|c| c.get("value")).and_then(Value::as_str);
                if let Some(config) = inner.filter(|c| serde_json::from_str::<Value>(c).is_ok_and(|v| v.is_object())) {
                    out.push(config.to_string());
                }
                map.values().for_each(|v| walk(v, out));
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let doc: Value = serde_yaml::from_str(yaml).expect("the file is YAML");
    let mut out = Vec::new();
    walk(&doc, &mut out);
    out.sort();
    out.dedup();
    out
}

#[test]
fn every_shipped_envoy_config_validates_and_loads_keyswap() {
    filter_wasm().unwrap_or_else(|e| panic!("{e}"));
    let root = repo_root();
    let configs = shipped_envoy_configs();
    assert!(!configs.is_empty(), "no tracked Envoy configuration found");
    for config in configs {
        let text = std::fs::read_to_string(root.join(&config)).expect("read");
        let keyswap = keyswap_configs(&text);
        assert!(!keyswap.is_empty(), "{config}: no keyswap configuration found in it");
        // keyswap refuses a configuration whose env credentials are unset:
        // every variable the file's configurations read gets a placeholder.
        let mut names: Vec<String> =
            keyswap.iter().flat_map(|c| env_names(&serde_json::from_str(c).expect("JSON"))).collect();
        names.sort();
        names.dedup();
        let env: Vec<(String, String)> = names.into_iter().map(|n| (n, "validate-placeholder".to_string())).collect();
        let out = validate(&root.join(&config), &env, &root).unwrap_or_else(|e| panic!("{config}: {e}"));
        // Each of them loaded, not merely one.
        let loaded: BTreeSet<String> = out.lines().filter_map(Summary::from_log_line).map(|s| s.version).collect();
        for c in &keyswap {
            let version = content_version(c.as_bytes());
            assert!(
                loaded.contains(&version),
                "{config} validated without loading its keyswap configuration version {version}:\n{}",
                tail(&out, 30)
            );
        }
        println!("{config}: OK ({} keyswap configurations loaded: {loaded:?})", keyswap.len());
    }
}

#[test]
fn keyswap_configurations_are_read_from_the_yaml() {
    let yaml = r#"
filters:
  - &k
    configuration: {"@type": type.googleapis.com/google.protobuf.StringValue, value: '{"routes": []}'}
  - *k
  - configuration: {value: "not json"}
  - default_config: {config: {configuration: {value: '{"clients": []}'}}}
"#;
    assert_eq!(keyswap_configs(yaml), [r#"{"clients": []}"#, r#"{"routes": []}"#]);
}
