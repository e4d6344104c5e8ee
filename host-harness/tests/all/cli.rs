//! The `keyswap` binary, run as a user would.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use keyswap_conformance::default_dir;
use keyswap_harness::default_filter_path;

fn keyswap(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_keyswap"))
        .args(args)
        .env("KEYSWAP_FILTER", default_filter_path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("keyswap starts");
    let mut input = child.stdin.take().expect("stdin is piped");
    input.write_all(stdin.unwrap_or_default()).expect("stdin is written");
    drop(input);
    child.wait_with_output().expect("keyswap ends")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn gateway() -> String {
    default_dir().join("configs/gateway.json").display().to_string()
}

/// A file in a fresh temporary directory, for this test only.
fn temp_file(test: &str, name: &str, contents: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("keyswap-cli-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(name);
    std::fs::write(&path, contents).expect("temp file");
    path
}

const ENV: [&str; 6] = [
    "--env",
    "OPENAI_API_KEY=sk-upstream-openai",
    "--env",
    "REGISTRY_PASSWORD=registry-pw",
    "--env",
    "GEMINI_API_KEY=gemini-upstream",
];

#[test]
fn check_prints_the_summary_or_the_field_path() {
    let config = gateway();
    let ok = keyswap(&[&["check", config.as_str()][..], &ENV].concat(), None);
    assert!(ok.status.success(), "{}", text(&ok.stderr));
    let out = text(&ok.stdout);
    assert!(out.starts_with("ok: configuration loaded: ") && out.contains("routes, version "), "{out}");

    // Only --env reaches the VM, whatever this process's environment holds.
    let refused = Command::new(env!("CARGO_BIN_EXE_keyswap"))
        .args(["check", config.as_str()])
        .env("KEYSWAP_FILTER", default_filter_path())
        .env("OPENAI_API_KEY", "from-the-process")
        .output()
        .expect("keyswap runs");
    assert_eq!(refused.status.code(), Some(1));
    let out = text(&refused.stdout);
    assert!(
        out.contains("error: configuration refused: routes[0].inject[0].value.env: OPENAI_API_KEY is not set"),
        "{out}"
    );
}

#[test]
fn usage_errors_exit_1_and_help_exits_0() {
    let cases: &[(&str, &[&str], i32, &str)] = &[
        ("no command", &[], 1, "Usage"),
        ("unknown command", &["frobnicate"], 1, "unrecognized subcommand"),
        ("bad --env", &["check", "x.json", "--env", "NOEQUALS"], 1, "is not NAME=VALUE"),
        ("missing config file", &["check", "/nonexistent.json"], 1, "cannot read /nonexistent.json"),
        ("top-level help", &["--help"], 0, "hash-key"),
        ("check help", &["check", "--help"], 0, "vm_config.environment_variables"),
        ("run help", &["run", "--help"], 0, "REQUEST"),
        ("new-key needs --id", &["new-key"], 1, "--id"),
    ];
    for (name, args, code, want) in cases {
        let out = keyswap(args, None);
        assert_eq!(out.status.code(), Some(*code), "{name}");
        let all = text(&out.stdout) + &text(&out.stderr);
        assert!(all.contains(want), "{name}: {all}");
    }
}

#[test]
fn a_missing_filter_says_how_to_build_it() {
    let out = keyswap(&["check", &gateway(), "--filter", "/nonexistent/keyswap_filter.wasm"], None);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("cargo build --release --target wasm32-wasip1 -p keyswap-filter"), "{err}");
}

#[test]
fn hash_key_reads_stdin_and_trims_one_newline() {
    // printf %s abc | sha256sum
    let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
    let cases: &[(&str, &[u8], bool)] = &[
        ("bare key", b"abc", true),
        ("trailing newline", b"abc\n", true),
        ("trailing CRLF", b"abc\r\n", true),
        ("only one newline is trimmed", b"abc\n\n", false),
        ("spaces are part of the key", b" abc", false),
    ];
    for (name, input, same) in cases {
        let out = keyswap(&["hash-key"], Some(input));
        assert!(out.status.success(), "{name}");
        let digest = text(&out.stdout).trim().to_string();
        assert!(digest.len() == 64 && digest.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')), "{name}");
        assert_eq!(digest == abc, *same, "{name}");
    }
    let empty = keyswap(&["hash-key"], Some(b"\n"));
    assert_eq!(empty.status.code(), Some(1));
    assert!(text(&empty.stderr).contains("no key on stdin"));
}

#[test]
fn new_key_prints_a_key_and_its_client_entry() {
    let out = keyswap(&["new-key", "--id", "ci-bot", "--routes", "openai,registry"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    let key = lines.iter().find(|l| l.starts_with("ks_")).expect("a key line");
    assert_eq!(key.len(), 3 + 43, "32 bytes, base64url without padding");
    let entry: serde_json::Value =
        serde_json::from_str(lines.iter().find(|l| l.starts_with('{')).expect("an entry line")).unwrap();
    assert_eq!(entry["id"], "ci-bot");
    assert_eq!(entry["routes"], serde_json::json!(["openai", "registry"]));
    assert!(entry.get("key").is_none(), "the entry holds only the digest");
    let hashed = keyswap(&["hash-key"], Some(key.as_bytes()));
    assert_eq!(entry["key_sha256"], text(&hashed.stdout).trim());

    let again = keyswap(&["new-key", "--id", "ci-bot"], None);
    assert!(!text(&again.stdout).contains(key), "every key is fresh");
    assert!(text(&again.stdout).contains(r#""routes":["*"]"#), "{}", text(&again.stdout));
}

#[test]
fn new_key_works_with_the_filter() {
    let out = keyswap(&["new-key", "--id", "fresh", "--routes", "openai"], None);
    let stdout = text(&out.stdout);
    let key = stdout.lines().find(|l| l.starts_with("ks_")).expect("a key").to_string();
    let entry = stdout.lines().find(|l| l.starts_with('{')).expect("an entry").to_string();
    let config = format!(
        r#"{{"clients": [{entry}], "routes": [{{"name": "openai", "match": {{"route_name": "openai", "clusters": ["openai"]}},
            "inject": [{{"header": "authorization", "prefix": "Bearer ", "value": {{"inline": "sk-up"}}}}]}}]}}"#
    );
    let config = temp_file("new-key", "config.json", &config);
    let request = format!(r#"{{"route_name": "openai", "headers": [["authorization", "Bearer {key}"]]}}"#);
    let request = temp_file("new-key", "request.json", &request);
    let out = keyswap(&["run", &config.display().to_string(), &request.display().to_string()], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("decision: forward"), "{}", text(&out.stdout));
}

#[test]
fn run_prints_the_upstream_request_or_the_local_response() {
    let config = gateway();
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "forward",
            r#"{"route_name": "openai", "path": "/v1/models", "headers": [["authorization", "Bearer dev-key-123"]]}"#,
            &[
                "decision: forward",
                "  GET /v1/models",
                "  authorization: Bearer sk-upstream-openai",
                "  x-keyswap-client: local-dev",
                "access log: %FILTER_STATE(wasm.keyswap:PLAIN)% = outcome=allowed reason=- route=openai client=local-dev",
                "metrics:\n  keyswap_requests_total;route=openai;outcome=allowed;reason= +1 (counter, now 1)\n",
            ],
        ),
        (
            "deny",
            r#"{"route_name": "openai", "path": "/v1/models"}"#,
            &[
                "decision: deny 401",
                "  status: 401",
                r#""error":"missing_key""#,
                "access log: %FILTER_STATE(wasm.keyswap:PLAIN)% = outcome=denied reason=missing_key route=openai client=-",
                "metrics:\n  keyswap_requests_total;route=openai;outcome=denied;reason=missing_key +1 (counter, now 1)\n",
            ],
        ),
    ];
    for (name, request, want) in cases {
        let request = temp_file("run", &format!("{name}.json"), request);
        let out = keyswap(&[&["run", config.as_str(), &request.display().to_string()][..], &ENV].concat(), None);
        assert!(out.status.success(), "{name}: {}", text(&out.stderr));
        let stdout = text(&out.stdout);
        for line in *want {
            assert!(stdout.contains(line), "{name}: want {line:?} in\n{stdout}");
        }
        assert!(!stdout.contains("dev-key-123"), "{name}: the client's key never reaches the upstream");
    }
    let bad = temp_file("run", "bad.json", r#"{"pth": "/"}"#);
    let out = keyswap(&[&["run", config.as_str(), &bad.display().to_string()][..], &ENV].concat(), None);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("not a request object"), "{}", text(&out.stderr));
}

#[test]
fn conformance_runs_the_suite() {
    let dir = default_dir().display().to_string();
    let out = keyswap(&["conformance", &dir], None);
    let stdout = text(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    assert!(last.contains(" passed, 0 failed"), "{stdout}");
    assert!(out.status.success(), "{stdout}");

    let empty = std::env::temp_dir().join(format!("keyswap-cli-{}-no-suite", std::process::id()));
    let out = keyswap(&["conformance", &empty.display().to_string()], None);
    assert_eq!(out.status.code(), Some(1));
}

/// Every example configuration in `docs/` passes `keyswap check`, given a
/// value for each environment variable it names.
#[test]
fn check_accepts_every_example_in_docs() {
    let examples = default_dir().join("../../docs/examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(&examples).expect("docs/examples exists") {
        let path = entry.expect("readable entry").path();
        if path.extension().is_none_or(|x| x != "json") {
            continue;
        }
        let json = std::fs::read_to_string(&path).expect("readable example");
        let mut args = vec!["check".to_string(), path.display().to_string()];
        for name in env_names(&json) {
            args.extend(["--env".to_string(), format!("{name}=example-value")]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = keyswap(&args, None);
        assert!(out.status.success(), "{}: {}{}", path.display(), text(&out.stdout), text(&out.stderr));
        assert!(text(&out.stdout).starts_with("ok: configuration loaded: "), "{}", text(&out.stdout));
        checked += 1;
    }
    assert!(checked > 0, "no example configuration in {}", examples.display());
}

/// Every configuration the suite expects refused makes `keyswap check` exit 1
/// with the same `field.path: message` line (but those the filter module's
/// runner skips: `keyswap check` runs that module).
#[test]
fn check_refuses_every_broken_config_in_the_suite_with_its_path() {
    let suite = keyswap_conformance::Suite::load(&default_dir()).unwrap_or_else(|e| panic!("{e}"));
    let plan = suite.plan(keyswap_conformance::Runner::Harness);
    let broken: Vec<_> = plan
        .run
        .iter()
        .filter_map(|case| match &case.expect {
            keyswap_conformance::Expect::ConfigError(want) => Some((case, want)),
            _ => None,
        })
        .collect();
    assert!(broken.len() >= 60, "only {} broken configurations in the suite", broken.len());
    // Each run compiles the module afresh: spread them over a few threads.
    let failures: Vec<String> = std::thread::scope(|scope| {
        let workers: Vec<_> = broken
            .chunks(broken.len().div_ceil(4))
            .map(|chunk| {
                scope.spawn(move || {
                    let mut failures = Vec::new();
                    for (case, want) in chunk {
                        let config = temp_file("broken", &format!("{}.json", case.name), &case.config);
                        let mut args = vec!["check".to_string(), config.display().to_string()];
                        for (name, value) in &case.env {
                            args.extend(["--env".to_string(), format!("{name}={value}")]);
                        }
                        let args: Vec<&str> = args.iter().map(String::as_str).collect();
                        let out = keyswap(&args, None);
                        let stdout = text(&out.stdout);
                        if out.status.code() != Some(1)
                            || !stdout.contains(&format!("error: configuration refused: {want}"))
                        {
                            failures.push(format!(
                                "{}: exit {:?}, want {want:?}, got {stdout}",
                                case.name,
                                out.status.code()
                            ));
                        }
                    }
                    failures
                })
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().expect("worker ends")).collect()
    });
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The names of the environment variables a configuration reads (`"env": "NAME"`).
fn env_names(json: &str) -> std::collections::BTreeSet<String> {
    fn walk(value: &serde_json::Value, out: &mut std::collections::BTreeSet<String>) {
        match value {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    match v {
                        serde_json::Value::String(name) if k == "env" => {
                            out.insert(name.clone());
                        }
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = std::collections::BTreeSet::new();
    walk(&serde_json::from_str(json).expect("example is JSON"), &mut out);
    out
}

#[test]
fn push_writes_a_checked_versioned_resource_once_and_never_a_refused_one() {
    let config = r#"{"clients": [{"id": "c", "key": "push-cli-secret-key", "routes": ["*"]}],
 "routes": [{"name": "r", "match": {"route_name": "r", "clusters": ["r"]}, "inject": [{"header": "x-api-key", "value": {"env": "SOME_CREDENTIAL"}}]}]}"#;
    let path = temp_file("push", "config.json", config);
    let ecds = path.with_file_name("keyswap.json");
    let (config_arg, ecds_arg) = (path.display().to_string(), ecds.display().to_string());
    let version = keyswap_policy::content_version(config.as_bytes());

    // Without Envoy: checked (the variable gets a placeholder), written, versioned by content.
    let out = keyswap(&["push", &config_arg, "--ecds", &ecds_arg], None);
    assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
    assert_eq!(text(&out.stdout), format!("wrote {ecds_arg}: version {version} (1 clients, 1 routes)\n"));
    let original = std::fs::read(&ecds).unwrap();
    let written: serde_json::Value = serde_json::from_slice(&original).unwrap();
    assert_eq!(written["version_info"], version.as_str());
    let resource = &written["resources"][0];
    assert_eq!(resource["name"], "keyswap");
    assert_eq!(resource["typed_config"]["config"]["configuration"]["value"], config, "byte for byte");
    assert_eq!(resource["typed_config"]["config"]["vm_config"], keyswap_harness::ecds::default_vm_config());
    let mut entries: Vec<String> = std::fs::read_dir(ecds.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    entries.sort();
    assert_eq!(entries, [".keyswap.json.lock", "config.json", "keyswap.json"], "no temporary file left");
    let mode = |p: &std::path::Path| {
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(p).unwrap().permissions()) & 0o777
    };
    assert_eq!(mode(&ecds), 0o600, "a new ECDS file is its owner's only");
    assert_eq!(mode(&ecds.with_file_name(".keyswap.json.lock")), 0o600, "and so is its lock");

    // The same content again: a no-op, said so.
    let before = std::fs::metadata(&ecds).and_then(|m| m.modified()).unwrap();
    let again = keyswap(&["push", &config_arg, "--ecds", &ecds_arg], None);
    assert!(again.status.success());
    assert_eq!(
        text(&again.stdout),
        format!("unchanged: {ecds_arg} already holds version {version}; nothing written\n")
    );
    assert_eq!(std::fs::metadata(&ecds).and_then(|m| m.modified()).unwrap(), before);

    // Refused by the filter: nothing written, the field named, no secret printed.
    let bad = temp_file("push", "bad.json", &config.replace(r#"["*"]"#, r#"["nowhere"]"#));
    let refused = keyswap(&["push", &bad.display().to_string(), "--ecds", &ecds_arg], None);
    assert_eq!(refused.status.code(), Some(1));
    let err = text(&refused.stderr);
    assert!(
        err.contains("error: configuration refused: clients[0].routes[0]: names no route")
            && err.contains("nothing written"),
        "{err}"
    );
    assert!(!err.contains("push-cli-secret-key") && !text(&refused.stdout).contains("push-cli-secret-key"));
    assert_eq!(std::fs::read(&ecds).unwrap(), original, "nothing written");

    // The same bytes with --force: written again (a rename Envoy would see).
    let forced = keyswap(&["push", &config_arg, "--ecds", &ecds_arg, "--force"], None);
    assert!(forced.status.success(), "{}", text(&forced.stderr));
    assert!(text(&forced.stdout).contains("(--force: the same bytes again"), "{}", text(&forced.stdout));
    assert_eq!(std::fs::read(&ecds).unwrap(), original);

    // An admin that is not there (an Envoy restarting, say): the file is
    // written, Envoy reads it when it starts; push waits --timeout, then says so.
    let other = temp_file("push", "other.json", &config.replace("\"c\"", "\"d\""));
    let args = ["push", &other.display().to_string(), "--ecds", &ecds_arg, "--envoy-admin", "http://127.0.0.1:1"];
    let unreachable = keyswap(&[&args[..], &["--timeout", "0.3"]].concat(), None);
    assert_eq!(unreachable.status.code(), Some(1));
    let err = text(&unreachable.stderr);
    assert!(err.contains("Envoy's admin did not answer within 300ms (Envoy's admin at http://127.0.0.1:1"), "{err}");
    let other_version = keyswap_policy::content_version(config.replace("\"c\"", "\"d\"").as_bytes());
    assert!(err.contains(&format!("holds version {other_version}, which Envoy reads when it starts")), "{err}");

    // A symbolic link at --ecds: refused, nothing written through it.
    let link = ecds.with_file_name("link.json");
    std::os::unix::fs::symlink(&ecds, &link).unwrap();
    let linked = keyswap(&["push", &config_arg, "--ecds", &link.display().to_string()], None);
    assert_eq!(linked.status.code(), Some(1));
    assert!(text(&linked.stderr).contains("is a symbolic link"), "{}", text(&linked.stderr));
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
    let _ = std::fs::remove_dir_all(ecds.parent().unwrap());
}

/// The deploy/ manifests `keyswap manifest` makes, each with the command
/// that makes it (run from the repository root).
const DEPLOYED: &[(&str, &[&str])] = &[
    (
        "deploy/istio/keyswap.yaml",
        &[
            "manifest",
            "istio",
            "deploy/istio/keyswap.json",
            "--istio-version",
            "1.29",
            "--image",
            "oci://registry.example.com/keyswap/filter:0.1.0",
        ],
    ),
    (
        "deploy/envoy-gateway/keyswap.yaml",
        &[
            "manifest",
            "envoy-gateway",
            "deploy/envoy-gateway/keyswap.json",
            "--route",
            "api-openai",
            "--route",
            "api-anthropic",
            "--route",
            "api-github",
            "--image",
            "registry.example.com/keyswap/filter:0.1.0",
        ],
    ),
];

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The manifests in deploy/ are exactly what the documented command
/// prints, so they cannot drift from the configuration they carry or from
/// each other. `KEYSWAP_UPDATE_MANIFESTS=1` rewrites them.
#[test]
fn deploy_manifests_are_what_keyswap_manifest_makes() {
    for (file, args) in DEPLOYED {
        let out =
            Command::new(env!("CARGO_BIN_EXE_keyswap")).args(*args).current_dir(repo_root()).output().expect("runs");
        assert!(out.status.success(), "keyswap {}: {}", args.join(" "), text(&out.stderr));
        let path = repo_root().join(file);
        if std::env::var_os("KEYSWAP_UPDATE_MANIFESTS").is_some() {
            std::fs::write(&path, &out.stdout).expect("write");
        }
        let committed = std::fs::read(&path).unwrap_or_default();
        assert!(
            committed == out.stdout,
            "{file} is not what `keyswap {}` prints: run KEYSWAP_UPDATE_MANIFESTS=1 cargo test -p keyswap-harness --test all deploy_manifests",
            args.join(" ")
        );
    }
}

#[test]
fn manifest_refuses_what_the_filter_refuses_and_unknown_releases() {
    let refused = temp_file("manifest", "refused.json", r#"{"clients": [{"id": "a"}], "routes": []}"#);
    let out =
        keyswap(&["manifest", "istio", refused.to_str().unwrap(), "--istio-version", "1.29", "--image", "x"], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("clients[0]"), "{}", text(&out.stderr));
    assert!(out.stdout.is_empty());
    let config = repo_root().join("deploy/istio/keyswap.json");
    for release in ["1.18", "1.32", "2.0"] {
        let out =
            keyswap(&["manifest", "istio", config.to_str().unwrap(), "--istio-version", release, "--image", "x"], None);
        assert_eq!(out.status.code(), Some(1), "{release}");
        assert!(out.stdout.is_empty(), "{release}");
    }
}

/// `check` warns when a configuration's manifest would not fit
/// client-side `kubectl apply` (or Kubernetes at all).
#[test]
fn check_warns_when_a_manifest_would_be_too_large() {
    let clients: Vec<String> = (0..3000)
        .map(|i| {
            format!(
                r#"{{"id": "client-{i:05}", "key_sha256": "{}", "routes": ["a"]}}"#,
                sha256_hex(&format!("key-{i}"))
            )
        })
        .collect();
    let config = format!(
        r#"{{"clients": [{}], "routes": [{{"name": "a", "match": {{"clusters": ["a"]}}, "inject": [{{"header": "x-k", "value": {{"inline": "v"}}}}]}}]}}"#,
        clients.join(",")
    );
    let big = temp_file("check-size", "big.json", &config);
    let out = keyswap(&["check", big.to_str().unwrap()], None);
    assert!(out.status.success(), "{}", text(&out.stdout));
    assert!(text(&out.stdout).contains("warning: WasmPlugin is"), "{}", text(&out.stdout));
    assert!(text(&out.stdout).contains("--server-side"), "{}", text(&out.stdout));
    let small = temp_file("check-size", "small.json", &config.replace(&clients[1..].join(","), "").replace(",]", "]"));
    let out = keyswap(&["check", small.to_str().unwrap()], None);
    assert!(out.status.success(), "{}", text(&out.stdout));
    assert!(!text(&out.stdout).contains("warning"), "{}", text(&out.stdout));
}

fn sha256_hex(text: &str) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(text.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}
