//! `envoy --mode validate` on every shipped Envoy configuration: each
//! tracked YAML file with a top-level `static_resources:` section, run from
//! the repository root (where its relative paths, the filter's wasm and
//! the ECDS file `scripts/setup` creates, resolve). Envoy must accept it
//! and keyswap must log loading a configuration
//! (`keyswap_policy::Summary::from_log_line`): `envoy.yaml`'s keyswap
//! configuration is its ECDS `default_config`, which validate loads like an
//! inline one. `scripts/test` runs this first.

use keyswap_policy::Summary;
use keyswap_tests::envoy::{filter_wasm, repo_root, tail, validate};

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

/// Every variable a file's keyswap configurations read (`"env": "NAME"`).
fn env_names(text: &str) -> Vec<String> {
    let mut names: Vec<String> = text
        .split("\"env\":")
        .skip(1)
        .filter_map(|rest| {
            let rest = rest.trim_start().strip_prefix('"')?;
            let name = &rest[..rest.find('"')?];
            let ok = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            ok.then(|| name.to_string())
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

#[test]
fn every_shipped_envoy_config_validates_and_loads_keyswap() {
    filter_wasm().unwrap_or_else(|e| panic!("{e}"));
    let root = repo_root();
    let configs = shipped_envoy_configs();
    assert!(!configs.is_empty(), "no tracked Envoy configuration found");
    for config in configs {
        let text = std::fs::read_to_string(root.join(&config)).expect("read");
        // keyswap refuses a configuration whose env credentials are unset:
        // every variable the file names gets a placeholder value.
        let env: Vec<(String, String)> =
            env_names(&text).into_iter().map(|n| (n, "validate-placeholder".to_string())).collect();
        let out = validate(&root.join(&config), &env, &root).unwrap_or_else(|e| panic!("{config}: {e}"));
        let loaded = out.lines().find_map(Summary::from_log_line);
        let Some(loaded) = loaded else {
            panic!("{config} validated without loading keyswap:\n{}", tail(&out, 30));
        };
        println!("{config}: OK ({})", loaded.log_line());
    }
}

#[test]
fn env_names_are_read_from_the_yaml() {
    assert_eq!(env_names(r#"value: {"env": "B"}, {"env":"A"}, {"env": "B"}, {"env": "not-a-name"}"#), ["A", "B"]);
}
