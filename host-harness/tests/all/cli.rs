//! The `keyswap` binary, run as a user would.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use keyswap_conformance::default_dir;
use keyswap_harness::Artifact;

fn keyswap(args: &[&str], stdin: Option<&[u8]>) -> Output {
    keyswap_with(args, stdin, &[])
}

/// `keyswap` with `vars` added to its process environment.
fn keyswap_with(args: &[&str], stdin: Option<&[u8]>, vars: &[(&str, &str)]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_keyswap"))
        .args(args)
        .env("KEYSWAP_FILTER", Artifact::Filter.default_path())
        .env_remove_all(VARS)
        .envs(vars.iter().copied())
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

/// The variables these tests' configurations read: never taken from the
/// environment the tests run in.
const VARS: &[&str] = &[
    "OPENAI_API_KEY",
    "ANTHROPIC_API_KEY",
    "REGISTRY_PASSWORD",
    "GEMINI_API_KEY",
    "KEYSWAP_DEMO_CREDENTIAL",
    "UP_TOKEN",
];

/// `Command::env_remove` for several names.
trait EnvRemoveAll {
    fn env_remove_all(&mut self, names: &[&str]) -> &mut Self;
}

impl EnvRemoveAll for Command {
    fn env_remove_all(&mut self, names: &[&str]) -> &mut Self {
        names.iter().fold(self, |command, name| command.env_remove(name))
    }
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

    // Only --env reaches the VM, whatever this process's environment holds;
    // the refusal says how to pass it, and that this shell has it.
    let refused = keyswap_with(&["check", config.as_str()], None, &[("OPENAI_API_KEY", "from-the-process")]);
    assert_eq!(refused.status.code(), Some(1));
    let out = text(&refused.stdout);
    assert_eq!(
        out,
        "error: configuration refused: routes[0].inject[0].value.env: OPENAI_API_KEY is not set\n\
         hint: the filter sees only the variables --env gives: --env OPENAI_API_KEY passes this shell's value \
         (set in this shell), --env OPENAI_API_KEY=VALUE sets one\n"
    );
    assert!(!out.contains("from-the-process"));
}

/// `--env` means one thing for every subcommand that takes it: NAME=VALUE,
/// or a bare NAME passed on from the process; nothing else passes, and an
/// unset variable is refused with one line saying how to give it.
#[test]
fn env_means_the_same_for_check_run_and_serve() {
    let gateway = gateway();
    let serve_config = serve_config("env").display().to_string();
    let component = keyswap_harness::Artifact::Component.default_path().display().to_string();
    let request = r#"{"route_name": "openai", "headers": [["authorization", "Bearer dev-key-123"]]}"#;
    let vars = [("OPENAI_API_KEY", "sk-from-the-shell"), ("REGISTRY_PASSWORD", "pw-from-the-shell")];
    let bare = ["--env", "OPENAI_API_KEY", "--env", "REGISTRY_PASSWORD", "--env", "GEMINI_API_KEY=gemini-given"];

    // A bare NAME takes the process's value.
    let ok = keyswap_with(&[&["check", gateway.as_str()][..], &bare].concat(), None, &vars);
    assert!(ok.status.success(), "{}{}", text(&ok.stdout), text(&ok.stderr));
    let ran = keyswap_with(&[&["run", gateway.as_str(), request][..], &bare].concat(), None, &vars);
    assert!(ran.status.success(), "{}", text(&ran.stderr));
    assert!(text(&ran.stdout).contains("authorization: Bearer <env OPENAI_API_KEY>"), "{}", text(&ran.stdout));
    let serve = ["serve", "--config", &serve_config, "--component", &component, "--listen", "127.0.0.1:0"];
    let line = serve_first_line(&["--env", "UP_TOKEN"], &[("UP_TOKEN", "up-from-the-shell")]);
    assert!(line.starts_with("keyswap serve: listening on http://127.0.0.1:") && line.ends_with('\n'), "{line:?}");

    // A bare NAME the process lacks: the same refusal from each, no value shown.
    let unset = "error: --env OPENAI_API_KEY: OPENAI_API_KEY is not set in this shell; give its value with --env \
                 OPENAI_API_KEY=VALUE\n";
    for args in [
        vec!["check", gateway.as_str(), "--env", "OPENAI_API_KEY"],
        vec!["run", gateway.as_str(), request, "--env", "OPENAI_API_KEY"],
        [&serve[..], &["--env", "OPENAI_API_KEY"]].concat(),
    ] {
        let out = keyswap(&args, None);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert_eq!(text(&out.stderr), unset, "{args:?}");
    }

    // Not given at all: refused by the filter (or component), with the hint.
    let run = keyswap_with(&["run", gateway.as_str(), request], None, &vars);
    assert_eq!(run.status.code(), Some(1));
    assert!(text(&run.stdout).ends_with("--env OPENAI_API_KEY=VALUE sets one\n"), "{}", text(&run.stdout));
    let served = keyswap(&serve, None);
    assert_eq!(served.status.code(), Some(1));
    assert_eq!(
        text(&served.stderr),
        "error: the configuration was refused: keyswap.routes[0].inject[0].value.env: UP_TOKEN is not set\n\
         hint: the component sees only the variables --env gives: --env UP_TOKEN passes this shell's value \
         (not set in this shell), --env UP_TOKEN=VALUE sets one\n"
    );

    // Neither form: refused without quoting what might be a value.
    for arg in ["=sk-live-typed-without-a-name", "sk-live-typed-without-a-name"] {
        for args in [vec!["check", gateway.as_str()], [&serve[..], &[]].concat()] {
            let out = keyswap(&[&args[..], &["--env", arg]].concat(), None);
            assert_eq!(out.status.code(), Some(1), "{arg}");
            let all = text(&out.stdout) + &text(&out.stderr);
            assert!(all.starts_with("error: an --env argument "), "{all}");
            assert!(!all.contains("sk-live"), "{all}");
        }
    }

    // A variable the policy will not quote (it might be a value) is not
    // named by the hint either.
    let odd = temp_file(
        "env",
        "odd.json",
        &std::fs::read_to_string(&gateway).unwrap().replace("OPENAI_API_KEY", "sk_live_x"),
    );
    let out = keyswap(&["check", odd.to_str().unwrap()], None);
    assert_eq!(
        text(&out.stdout),
        "error: configuration refused: routes[0].inject[0].value.env: the variable is not set\n\
         hint: the filter sees only the variables --env gives: --env NAME passes this shell's value of NAME, \
         --env NAME=VALUE sets one\n"
    );
}

#[test]
fn usage_errors_exit_1_and_help_exits_0() {
    let cases: &[(&str, &[&str], i32, &str)] = &[
        ("no command", &[], 1, "Usage"),
        ("unknown command", &["frobnicate"], 1, "unrecognized subcommand"),
        ("--env NAME not set", &["check", "x.json", "--env", "NOT_SET_ANYWHERE"], 1, "NOT_SET_ANYWHERE is not set"),
        ("missing config file", &["check", "/nonexistent.json"], 1, "cannot read /nonexistent.json"),
        ("top-level help", &["--help"], 0, "hash-key"),
        ("check help", &["check", "--help"], 0, "a bare `NAME` to pass this shell's value on. Nothing else passes"),
        ("serve help", &["serve", "--help"], 0, "a bare `NAME` to pass this shell's value on. Nothing else"),
        ("run help", &["run", "--help"], 0, "`-` for stdin, or the JSON itself when it starts with `{`"),
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
    assert!(err.contains("scripts/build-filter"), "{err}");
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
                "  authorization: Bearer <env OPENAI_API_KEY>",
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
        assert!(!stdout.contains("sk-upstream-openai"), "{name}: the credential is shown by its source");
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

/// `keyswap check` validates clients' own credentials (`clients[].inject`):
/// a route with no `inject` of its own loads when every client allowed on
/// it brings one, and is refused at the client that does not.
#[test]
fn check_validates_per_client_credentials() {
    let config = r#"{"clients": [
        {"id": "team-a", "key": "team-a-cli-key", "routes": ["r"],
         "inject": {"r": [{"header": "authorization", "prefix": "Bearer ", "value": {"env": "UP_TOKEN"}}]}},
        {"id": "team-b", "key": "team-b-cli-key", "routes": ["r"]}],
      "routes": [{"name": "r", "match": {"route_name": "r", "clusters": ["r"]}}]}"#;
    let refused = temp_file("per-client", "refused.json", config);
    let out = keyswap(&["check", refused.to_str().unwrap(), "--env", "UP_TOKEN=team-a-upstream"], None);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "error: configuration refused: clients[1].inject.r: is required: this client may use route `r` (routes[0]), \
         which has no `inject` of its own\n"
    );
    let own = r#""routes": ["r"],
         "inject": {"r": [{"query": "key", "value": {"inline": "team-b-upstream"}}]}}"#;
    let loaded = temp_file("per-client", "loaded.json", &config.replacen(r#""routes": ["r"]}"#, own, 1));
    let out = keyswap(&["check", loaded.to_str().unwrap(), "--env", "UP_TOKEN=team-a-upstream"], None);
    assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
    assert!(text(&out.stdout).starts_with("ok: configuration loaded: 2 clients, 1 routes"), "{}", text(&out.stdout));
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

/// A `.pb` ECDS path gets binary protobuf (what Envoy parses by that
/// name), a `.json` one JSON; a `.pb` file holding JSON (written by hand)
/// is rewritten as binary keeping its vm_config, said so; `.pb_text` is
/// refused with nothing written.
#[test]
fn push_writes_the_format_envoy_reads_by_the_files_name() {
    use keyswap_harness::ecds;
    let config = r#"{"clients": [{"id": "c", "key": "push-pb-secret-key", "routes": ["*"]}],
 "routes": [{"name": "r", "match": {"route_name": "r", "clusters": ["r"]}, "inject": [{"header": "x-api-key", "value": {"inline": "v"}}]}]}"#;
    let path = temp_file("push-pb", "config.json", config);
    let version = keyswap_policy::content_version(config.as_bytes());
    let pb = path.with_file_name("keyswap.pb");
    let out = keyswap(&["push", &path.display().to_string(), "--ecds", &pb.display().to_string()], None);
    assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
    let written = std::fs::read(&pb).unwrap();
    assert!(serde_json::from_slice::<serde_json::Value>(&written).is_err(), "not JSON");
    let held = ecds::read_resource(&written).expect("a binary keyswap resource");
    assert_eq!(held.format, ecds::Format::Binary);
    assert_eq!(held.version.as_deref(), Some(version.as_str()));
    assert_eq!(held.configuration.as_deref(), Some(config), "byte for byte");
    assert_eq!(held.vm_config.unwrap().to_json().unwrap(), ecds::default_vm_config());

    // A hand-written JSON resource at a .pb path (Envoy cannot read it):
    // rewritten as binary, its vm_config kept.
    let vm = serde_json::json!({"runtime": "envoy.wasm.runtime.v8", "vm_id": "mine",
        "code": {"local": {"filename": "/opt/keyswap.wasm"}}});
    ecds::write_atomically(&pb, &ecds::resource_bytes("{}", &vm)).unwrap();
    let out = keyswap(&["push", &path.display().to_string(), "--ecds", &pb.display().to_string()], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("holds JSON but Envoy reads a file of that name as binary protobuf"));
    let held = ecds::read_resource(&std::fs::read(&pb).unwrap()).unwrap();
    assert_eq!((held.format, held.vm_config.unwrap().to_json().unwrap()), (ecds::Format::Binary, vm));

    // A vm_config the binary file cannot carry: nothing written, the field named.
    let remote = serde_json::json!({"runtime": "envoy.wasm.runtime.v8", "code": {"remote": {"sha256": "0"}}});
    let other = path.with_file_name("other.pb");
    ecds::write_atomically(&other, &ecds::resource_bytes("{}", &remote)).unwrap();
    let before = std::fs::read(&other).unwrap();
    let out = keyswap(&["push", &path.display().to_string(), "--ecds", &other.display().to_string()], None);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("vm_config.code.remote") && err.contains("nothing written"), "{err}");
    assert_eq!(std::fs::read(&other).unwrap(), before);

    let pb_text = path.with_file_name("keyswap.pb_text");
    let out = keyswap(&["push", &path.display().to_string(), "--ecds", &pb_text.display().to_string()], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("text protobuf"), "{}", text(&out.stderr));
    assert!(!pb_text.exists());
    for out in [text(&out.stdout), text(&out.stderr)] {
        assert!(!out.contains("push-pb-secret-key"));
    }
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
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

/// `check` prints the configuration's size and warns when it would not fit
/// client-side `kubectl apply`, Kubernetes at all, or a ConfigMap.
#[test]
fn check_warns_when_a_manifest_would_be_too_large() {
    let client = |i: usize| {
        format!(r#"{{"id": "client-{i:05}", "key_sha256": "{}", "routes": ["a"]}}"#, sha256_hex(&format!("key-{i}")))
    };
    let clients: Vec<String> = (0..3000).map(client).collect();
    let config = format!(
        r#"{{"clients": [{}], "routes": [{{"name": "a", "match": {{"clusters": ["a"]}}, "inject": [{{"header": "x-k", "value": {{"inline": "v"}}}}]}}]}}"#,
        clients.join(",")
    );
    let big = temp_file("check-size", "big.json", &config);
    let out = keyswap(&["check", big.to_str().unwrap()], None);
    assert!(out.status.success(), "{}", text(&out.stdout));
    assert!(text(&out.stdout).contains("warning: WasmPlugin is"), "{}", text(&out.stdout));
    assert!(text(&out.stdout).contains("--server-side"), "{}", text(&out.stdout));
    assert!(text(&out.stdout).contains(&format!("size: {} bytes (", config.len())), "{}", text(&out.stdout));
    assert!(!text(&out.stdout).contains("ConfigMap"), "{}", text(&out.stdout));
    // Over 1 MiB: a ConfigMap cannot hold it, nor Kubernetes the manifests.
    let more: Vec<String> = (3000..13_000).map(client).collect();
    let huge = temp_file("check-size", "huge.json", &config.replacen("[{", &format!("[{},{{", more.join(",")), 1));
    let out = keyswap(&["check", huge.to_str().unwrap()], None);
    assert!(out.status.success(), "{}", text(&out.stdout));
    let said = text(&out.stdout);
    assert!(said.contains("ok: configuration loaded: 13000 clients"), "{said}");
    assert!(said.contains("MiB); as an ECDS file: ") && said.contains("as binary protobuf (.pb)"), "{said}");
    assert!(said.contains("warning: the configuration is 1.") && said.contains("more than a ConfigMap"), "{said}");
    assert!(said.contains("more than Kubernetes stores in one object"), "{said}");
    let small = temp_file("check-size", "small.json", &config.replace(&clients[1..].join(","), "").replace(",]", "]"));
    let out = keyswap(&["check", small.to_str().unwrap()], None);
    assert!(out.status.success(), "{}", text(&out.stdout));
    assert!(!text(&out.stdout).contains("warning"), "{}", text(&out.stdout));
}

fn sha256_hex(text: &str) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(text.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// Output a terminal shows as whole lines: UTF-8, each line ended by a
/// newline, no other control character (a stray `\r` or a raw byte).
fn assert_whole_lines(what: &str, bytes: &[u8]) {
    let text = std::str::from_utf8(bytes).unwrap_or_else(|_| panic!("{what}: not UTF-8: {bytes:?}"));
    assert!(text.is_empty() || text.ends_with('\n'), "{what}: the last line has no newline: {text:?}");
    let odd = text.chars().find(|c| c.is_control() && *c != '\n');
    assert!(odd.is_none(), "{what}: control character {odd:?} in {text:?}");
}

/// Each subcommand, succeeding and failing: stdout and stderr are whole
/// lines, and neither holds a key or a credential it was given (but the
/// key `new-key` makes, which it shows once).
#[test]
fn every_subcommand_prints_whole_lines_and_no_secret() {
    let config = gateway();
    let request =
        temp_file("lines", "request.json", r#"{"route_name": "registry", "headers": [["x-api-key", "dev-key-123"]]}"#);
    let request = request.display().to_string();
    let query = r#"{"route_name": "gemini", "path": "/v1/models?alt=json", "headers": [["authorization", "Bearer dev-key-123"]]}"#;
    // A key whose SHA-256 holds bytes a terminal reads as control
    // characters (0x1c, 0x0f, 0x1d, 0x1a, 0x15).
    let demo_key =
        r#"{"route_name": "demo", "cluster": "demo_echo", "headers": [["authorization", "Bearer keyswap-demo-key"]]}"#;
    let demo = repo_root().join("docs/examples/demo.json").display().to_string();
    let push_config = temp_file("lines", "push.json", &std::fs::read_to_string(&demo).unwrap());
    let push_config = push_config.display().to_string();
    let ecds = temp_file("lines", "keyswap.json", "").display().to_string();
    let istio = repo_root().join("deploy/istio/keyswap.json").display().to_string();
    let eg = repo_root().join("deploy/envoy-gateway/keyswap.json").display().to_string();
    let suite = default_dir().display().to_string();
    let env = ENV.to_vec();
    let demo_env = ["--env", "KEYSWAP_DEMO_CREDENTIAL=demo-credential-value"];
    let cases: Vec<(&str, Vec<&str>, Option<&[u8]>)> = vec![
        ("help", vec!["--help"], None),
        ("run help", vec!["run", "--help"], None),
        ("version", vec!["--version"], None),
        ("usage error", vec!["frobnicate"], None),
        ("check", [&["check", config.as_str()][..], &env].concat(), None),
        ("check refused (no env)", vec!["check", config.as_str()], None),
        ("check refused (--env unset)", vec!["check", config.as_str(), "--env", "NOT_SET_ANYWHERE"], None),
        ("hash-key", vec!["hash-key"], Some(b"dev-key-123\n")),
        ("new-key", vec!["new-key", "--id", "lines"], None),
        ("run forward, basic", [&["run", config.as_str(), request.as_str()][..], &env].concat(), None),
        ("run forward, query", [&["run", config.as_str(), query][..], &env].concat(), None),
        ("run forward, demo key", [&["run", demo.as_str(), demo_key][..], &demo_env].concat(), None),
        ("run deny", [&["run", config.as_str(), r#"{"route_name": "openai"}"#][..], &env].concat(), None),
        ("run stdin", [&["run", config.as_str(), "-"][..], &env].concat(), Some(query.as_bytes())),
        ("run bad request", [&["run", config.as_str(), "{"][..], &env].concat(), None),
        ("conformance", vec!["conformance", suite.as_str()], None),
        ("push", vec!["push", push_config.as_str(), "--ecds", ecds.as_str()], None),
        ("push unchanged", vec!["push", push_config.as_str(), "--ecds", ecds.as_str()], None),
        ("bench", vec!["bench", "--sizes", "10", "--iterations", "50"], None),
        (
            "manifest istio",
            vec!["manifest", "istio", &istio, "--istio-version", "1.29", "--image", "oci://r/k:1"],
            None,
        ),
        ("manifest envoy-gateway", vec!["manifest", "envoy-gateway", &eg, "--route", "r", "--image", "r/k:1"], None),
        ("serve refused", vec!["serve", "--config", config.as_str(), "--listen", "127.0.0.1:0"], None),
    ];
    let b64 = |s: &str| base64::Engine::encode(&base64::engine::general_purpose::STANDARD, s);
    let secrets = [
        "sk-upstream-openai".to_string(),
        "registry-pw".to_string(),
        b64("ci:registry-pw"),
        "gemini-upstream".to_string(),
        "demo-credential-value".to_string(),
        "dev-key-123".to_string(),
        "keyswap-demo-key".to_string(),
        "plaintext-key-for-local-use".to_string(),
    ];
    for (name, args, stdin) in &cases {
        let out = keyswap(args, *stdin);
        assert_whole_lines(&format!("{name}: stdout"), &out.stdout);
        assert_whole_lines(&format!("{name}: stderr"), &out.stderr);
        let all = text(&out.stdout) + &text(&out.stderr);
        for secret in &secrets {
            // The help's examples use the demo's key, which guards nothing.
            if name.contains("help") && secret == "keyswap-demo-key" {
                continue;
            }
            assert!(!all.contains(secret.as_str()), "{name}: {secret:?} printed:\n{all}");
        }
    }
    let served = serve_first_line(&["--env", "UP_TOKEN=serve-credential-value"], &[]);
    assert_whole_lines("serve", served.as_bytes());
    assert!(!served.contains("serve-credential-value"), "{served}");
}

/// A `keyswap serve` configuration whose credential is `{"env": "UP_TOKEN"}`.
fn serve_config(test: &str) -> PathBuf {
    temp_file(
        test,
        "serve.json",
        r#"{"keyswap": {"clients": [{"id": "c", "key": "serve-line-key", "routes": ["*"]}],
            "routes": [{"name": "up", "match": {"path_prefix": "/"},
                        "inject": [{"header": "authorization", "value": {"env": "UP_TOKEN"}}]}]},
           "upstreams": {"up": "http://127.0.0.1:1"}}"#,
    )
}

/// `keyswap serve`'s first line, given `args` and the process variables
/// `vars` (it then serves until stopped; stopped here).
fn serve_first_line(args: &[&str], vars: &[(&str, &str)]) -> String {
    let config = serve_config("serve-line");
    let component = keyswap_harness::Artifact::Component.default_path();
    let mut server = Command::new(env!("CARGO_BIN_EXE_keyswap"))
        .env_remove_all(VARS)
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .arg("--component")
        .arg(&component)
        .args(args)
        .envs(vars.iter().copied())
        .stdout(Stdio::piped())
        .spawn()
        .expect("keyswap serve starts");
    let mut line = String::new();
    let read = std::io::BufRead::read_line(&mut std::io::BufReader::new(server.stdout.take().unwrap()), &mut line);
    let _ = server.kill();
    let _ = server.wait();
    read.expect("keyswap serve prints a line");
    line
}

/// Runs `script` in bash in `dir`, with `keyswap` the binary under test
/// (stderr into stdout, as a terminal shows them).
fn bash(script: &str, dir: &std::path::Path, vars: &[(&str, &str)]) -> String {
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!("exec 2>&1\nkeyswap() {{ \"$KEYSWAP_BIN\" \"$@\"; }}\n{script}"))
        .current_dir(dir)
        .env("KEYSWAP_BIN", env!("CARGO_BIN_EXE_keyswap"))
        .env("KEYSWAP_FILTER", Artifact::Filter.default_path())
        .env_remove_all(VARS)
        .envs(vars.iter().copied())
        .output()
        .expect("bash runs");
    text(&out.stdout)
}

/// A scratch copy of what the examples read: docs/ and deploy/ (linked),
/// and `.run/ecds/keyswap.pb` holding the demo configuration, as
/// `scripts/demo` leaves it.
fn scratch_checkout(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("keyswap-cli-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join(".run/ecds")).unwrap();
    for linked in ["docs", "deploy"] {
        std::os::unix::fs::symlink(repo_root().join(linked), dir.join(linked)).unwrap();
    }
    let demo = repo_root().join("docs/examples/demo.json").display().to_string();
    let out = keyswap(&["push", &demo, "--ecds", &dir.join(".run/ecds/keyswap.pb").display().to_string()], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    dir
}

/// What varies from one run to the next, made alike: a `new-key` key, a
/// SHA-256, a configuration version, a delay.
fn normalized(text: &str) -> String {
    let mut out = String::new();
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        let hex = |w: &str| w.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        let replaced = if word.starts_with("ks_") && word.len() == 46 {
            Some("ks_<key>")
        } else if word.len() == 64 && hex(word) {
            Some("<sha256>")
        } else if word.len() == 12 && hex(word) && out.ends_with("version ") {
            Some("<version>")
        } else if !word.is_empty() && word.bytes().all(|b| b.is_ascii_digit()) && out.ends_with('(') {
            Some("<n>")
        } else {
            None
        };
        out.push_str(replaced.unwrap_or(word));
        word.clear();
    };
    for c in text.chars() {
        if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            out.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
}

/// The README's "Try a configuration" walkthrough, replayed: its `sh`
/// blocks run in bash as typed, from a checkout as `scripts/demo` leaves
/// it, and each prints what the `text` block after it shows (keys,
/// digests and versions aside). Envoy's part is not run here: the push
/// goes to the ECDS file without `--envoy-admin`/`--envoy-log` (which the
/// test checks name envoy.yaml's admin and scripts/demo's log), and the
/// curl is left out (tests/ pushes to the real Envoy).
#[test]
fn readme_walkthrough_replays_as_shown() {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let start = readme.find("\n## Try a configuration\n").expect("the README has the section");
    let section = &readme[start + 1..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 4)];
    let mut blocks: Vec<(String, Option<String>)> = Vec::new();
    let mut rest = section;
    while let Some(open) = rest.find("```") {
        let after = &rest[open + 3..];
        let (lang, body) = after.split_once('\n').unwrap();
        let end = body.find("```").expect("a closed block");
        match lang {
            "sh" => blocks.push((body[..end].to_string(), None)),
            "text" => blocks.last_mut().expect("output after a command").1 = Some(body[..end].to_string()),
            other => panic!("a ```{other} block in the walkthrough"),
        }
        rest = &body[end + 3..];
    }
    assert!(blocks.len() >= 4, "{blocks:?}");

    // What is replayed differently from how it is typed, each exactly once.
    let envoy_yaml = std::fs::read_to_string(repo_root().join("envoy.yaml")).unwrap();
    let demo_script = std::fs::read_to_string(repo_root().join("scripts/demo")).unwrap();
    assert!(envoy_yaml.contains("port_value: 9901") && envoy_yaml.contains("port_value: 10000"));
    assert!(envoy_yaml.contains(".run/ecds/keyswap.pb") && demo_script.contains(r#"logs="$root/.run/demo""#));
    let edits: [(&str, &str); 3] = [
        ("keyswap() { cargo run -q -p keyswap-harness -- \"$@\"; }\n", ""),
        (" --envoy-admin http://127.0.0.1:9901 --envoy-log .run/demo/envoy.log", ""),
        ("curl -s http://127.0.0.1:10000/demo/hello -H \"Authorization: Bearer $key\"; echo\n", ""),
    ];
    let mut script = String::new();
    for (i, (commands, _)) in blocks.iter().enumerate() {
        script.push_str(&format!("echo '@@ block {i}'\n{commands}"));
    }
    for (typed, replayed) in edits {
        assert_eq!(script.matches(typed).count(), 1, "the walkthrough types {typed:?} once");
        script = script.replace(typed, replayed);
    }

    let dir = scratch_checkout("readme");
    // A second terminal: this process's variables, none of the demo's.
    let output = bash(&script, &dir, &[]);
    let mut replayed: Vec<&str> = output.split("@@ block ").skip(1).collect();
    assert_eq!(replayed.len(), blocks.len(), "{output}");
    for (i, ((commands, shown), got)) in blocks.iter().zip(replayed.iter_mut()).enumerate() {
        let got = normalized(got.split_once('\n').map_or("", |(_, rest)| rest));
        let Some(shown) = shown else {
            assert_eq!(got, "", "block {i} prints nothing:\n{commands}");
            continue;
        };
        let shown = normalized(shown);
        if commands.contains("keyswap push") {
            // Envoy's answer and the curl's are not replayed.
            assert!(
                shown.starts_with(&got) && got.starts_with("wrote "),
                "block {i}: got\n{got}\nREADME shows\n{shown}"
            );
        } else {
            assert_eq!(got, shown, "block {i}: what it prints is not what the README shows:\n{commands}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The examples `keyswap --help` and `keyswap run --help` end with, run
/// as typed from a checkout (the push without Envoy's admin: tests/ push
/// to the real Envoy).
#[test]
fn help_examples_run() {
    let mut examples = Vec::new();
    for args in [&["--help"][..], &["run", "--help"]] {
        let help = text(&keyswap(args, None).stdout);
        let (_, tail) = help.split_once("Example").expect("the help ends with examples");
        examples.extend(tail.lines().filter_map(|l| l.strip_prefix("  ")).map(str::to_string));
    }
    assert!(examples.len() >= 6, "{examples:?}");
    let dir = scratch_checkout("help");
    for subcommand in ["new-key", "check", "run", "push", "manifest"] {
        assert!(examples.iter().any(|e| e.contains(&format!("keyswap {subcommand} "))), "{subcommand}: {examples:?}");
    }
    for example in &examples {
        let replayed = example.replace(" --envoy-admin http://127.0.0.1:9901", "");
        let output = bash(&format!("{replayed}\necho \"exit $?\""), &dir, &[]);
        assert!(output.ends_with("exit 0\n"), "{example}:\n{output}");
        if example.contains("keyswap run ") {
            assert!(output.contains("decision: forward"), "{example}:\n{output}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
