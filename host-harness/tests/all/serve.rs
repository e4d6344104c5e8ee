//! `keyswap serve` end to end, over loopback only: real HTTP/1.1 requests
//! (hyper's client) through the gateway component to an echo upstream
//! started here (hyper's server), for the
//! conformance suite (runner `serve`), and a 100 MiB body streamed each way
//! through the `keyswap serve` process with its peak memory measured.

use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt as _;
use hyper::body::{Body, Frame, Incoming};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use keyswap_conformance::{default_dir, Observed, Runner, Suite, SuiteCase, SuiteReport};
use keyswap_harness::component::compile;
use keyswap_harness::serve::{Gateway, RunningGateway, ServeError};
use keyswap_harness::Artifact;
use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::Engine;

/// The longest any request here takes; every server stops when dropped.
const TIMEOUT: Duration = Duration::from_secs(60);

/// The echo upstream's marker header on its own answers.
const ECHO_MARK: &str = "x-echo-upstream";

/// Asks the echo upstream for a generated body of this many bytes.
const ECHO_RESPONSE_BYTES: &str = "x-echo-response-bytes";

/// The compiled gateway component, once for this test binary.
fn compiled() -> &'static (Engine, Component) {
    static COMPILED: OnceLock<(Engine, Component)> = OnceLock::new();
    COMPILED.get_or_init(|| {
        let engine = Engine::default();
        let component = compile(&engine, &Artifact::Component.default_path()).unwrap_or_else(|e| panic!("{e}"));
        (engine, component)
    })
}

/// The runtime of this file's echo upstream and client.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("a tokio runtime")
    })
}

/// `n` bytes of a repeating pattern, streamed 64 KiB a frame, hashed as
/// they go (a body of any size in bounded memory, each way).
struct Pattern {
    left: u64,
    hash: Arc<Mutex<Sha256>>,
}

impl Pattern {
    fn new(n: u64) -> Self {
        Self { left: n, hash: Arc::new(Mutex::new(Sha256::new())) }
    }

    /// The SHA-256 of every byte of `n` (without sending them).
    fn sha256(n: u64) -> String {
        let mut pattern = Self::new(n);
        while pattern.next_chunk().is_some() {}
        let hash = pattern.hash.lock().unwrap().clone();
        format!("{:x}", hash.finalize())
    }

    fn next_chunk(&mut self) -> Option<Bytes> {
        static CHUNK: OnceLock<Bytes> = OnceLock::new();
        let chunk = CHUNK.get_or_init(|| (0..64 * 1024).map(|i| (i % 251) as u8).collect::<Vec<u8>>().into());
        if self.left == 0 {
            return None;
        }
        let len = usize::try_from(self.left.min(chunk.len() as u64)).unwrap();
        self.left -= len as u64;
        let bytes = chunk.slice(..len);
        self.hash.lock().unwrap().update(&bytes);
        Some(bytes)
    }
}

impl Body for Pattern {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.next_chunk().map(|b| Ok(Frame::data(b))))
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.left)
    }
}

/// Reads a body a frame at a time: its length, its SHA-256, and the bytes
/// when they are at most 1 MiB.
async fn drain(mut body: Incoming) -> Result<(u64, String, Vec<u8>), hyper::Error> {
    let (mut length, mut hash, mut kept) = (0u64, Sha256::new(), Vec::new());
    while let Some(frame) = body.frame().await {
        if let Ok(chunk) = frame?.into_data() {
            length += chunk.len() as u64;
            hash.update(&chunk);
            if kept.len() + chunk.len() <= 1 << 20 {
                kept.extend_from_slice(&chunk);
            }
        }
    }
    Ok((length, format!("{:x}", hash.finalize()), kept))
}

// ---------------------------------------------------------------- echo --

/// An HTTP/1.1 upstream on loopback (hyper) that answers every request with
/// JSON describing what it received (the body only counted and hashed,
/// never kept), plus the response headers set in `respond_with`; or, when
/// asked with `x-echo-response-bytes: N`, a generated body of N bytes.
struct Echo {
    addr: SocketAddr,
    respond_with: Arc<Mutex<Vec<(String, String)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Echo {
    fn start() -> Self {
        let listener = {
            let _entered = runtime().enter();
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            listener.set_nonblocking(true).unwrap();
            tokio::net::TcpListener::from_std(listener).unwrap()
        };
        let addr = listener.local_addr().unwrap();
        let respond_with = Arc::new(Mutex::new(Vec::new()));
        let headers = respond_with.clone();
        let task = runtime().spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let headers = headers.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let extra = headers.lock().unwrap().clone();
                        async move { answer(request, &extra).await }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { addr, respond_with, task }
    }

    fn respond_with(&self, headers: &[(String, String)]) {
        *self.respond_with.lock().unwrap() = headers.to_vec();
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type EchoBody = http_body_util::Either<http_body_util::Full<Bytes>, Pattern>;

async fn answer(
    request: hyper::Request<Incoming>,
    respond_with: &[(String, String)],
) -> Result<hyper::Response<EchoBody>, hyper::Error> {
    let (parts, body) = request.into_parts();
    let (length, sha256, _) = drain(body).await?;
    let mut response = hyper::Response::builder().header(ECHO_MARK, "1");
    if let Some(n) = parts.headers.get(ECHO_RESPONSE_BYTES) {
        let n: u64 = n.to_str().ok().and_then(|n| n.parse().ok()).unwrap_or(0);
        for (name, value) in respond_with {
            response = response.header(name, value);
        }
        return Ok(response.body(EchoBody::Right(Pattern::new(n))).unwrap());
    }
    let received: Vec<(String, String)> = parts
        .headers
        .iter()
        .map(|(n, v)| (n.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect();
    let body = serde_json::json!({
        "method": parts.method.as_str(), "path": parts.uri.to_string(), "headers": received,
        "body_bytes": length, "body_sha256": sha256,
    })
    .to_string();
    response = response.header("content-type", "application/json");
    for (name, value) in respond_with {
        response = response.header(name, value);
    }
    Ok(response.body(EchoBody::Left(http_body_util::Full::new(Bytes::from(body)))).unwrap())
}

// -------------------------------------------------------------- client --

struct Reply {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    /// The body when it is at most 1 MiB; its length and hash always.
    body: Vec<u8>,
    length: u64,
    sha256: String,
}

fn header<'h>(headers: &'h [(String, Vec<u8>)], name: &str) -> Option<&'h [u8]> {
    headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_slice())
}

/// One request on a fresh connection (hyper's client); `body_bytes` of
/// the pattern are streamed with a Content-Length. Returns the reply and
/// the SHA-256 of what was sent.
fn send(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(String, String)],
    body_bytes: u64,
) -> (Reply, String) {
    let client: Client<_, Pattern> =
        Client::builder(TokioExecutor::new()).pool_max_idle_per_host(0).set_host(false).build_http();
    let mut request = hyper::Request::builder().method(method).uri(format!("http://{addr}{target}"));
    for (name, value) in headers {
        request = request.header(name, value);
    }
    let body = Pattern::new(body_bytes);
    let sent = Arc::clone(&body.hash);
    let request = request.body(body).unwrap();
    let exchange = async move {
        let response = client.request(request).await.unwrap_or_else(|e| panic!("{method} {target}: {e:?}"));
        let (parts, body) = response.into_parts();
        let (length, sha256, body) = drain(body).await.unwrap();
        let headers = parts.headers.iter().map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec())).collect();
        Reply { status: parts.status.as_u16(), headers, body, length, sha256 }
    };
    let reply = runtime()
        .block_on(async { tokio::time::timeout(TIMEOUT, exchange).await })
        .unwrap_or_else(|_| panic!("{method} {target}: no answer within {TIMEOUT:?}"));
    let sent = sent.lock().unwrap().clone();
    (reply, format!("{:x}", sent.finalize()))
}

// --------------------------------------------------------- conformance --

/// Headers the hosts themselves put on the upstream request (the
/// upstream's authority, the framing, the connection).
const HOST_ADDED: [&str; 4] = ["host", "content-length", "transfer-encoding", "connection"];

/// The refusal line as the policy words it: the gateway nests the policy
/// configuration under `keyswap`.
fn policy_line(line: &str) -> String {
    match line.strip_prefix("keyswap") {
        Some(rest) if rest.starts_with(": ") => format!("${rest}"),
        Some(rest) if rest.starts_with('.') => rest[1..].to_string(),
        Some(rest) if rest.starts_with('[') => rest.to_string(),
        _ => line.to_string(),
    }
}

fn observe(echo: &Echo, case: &SuiteCase) -> Result<Observed, String> {
    let (engine, component) = compiled();
    let config = format!(r#"{{"keyswap": {}, "upstreams": {{"*": "http://{}"}}}}"#, case.config, echo.addr);
    let env: Vec<(String, String)> = case.env.iter().map(|(n, v)| (n.clone(), v.clone())).collect();
    let gateway = Gateway::new(engine, component, &config, &env).map_err(|e| e.to_string())?;
    let running = match RunningGateway::start(gateway, "127.0.0.1:0".parse().unwrap()) {
        Ok(running) => running,
        Err(ServeError::Refused(line)) => return Ok(Observed::ConfigRefused { log: policy_line(&line) }),
        Err(e) => return Err(e.to_string()),
    };
    let response_headers = case.response.as_ref().map(|r| r.headers.clone()).unwrap_or_default();
    echo.respond_with(&response_headers);
    let mut headers = vec![("host".to_string(), case.request.authority.clone())];
    headers.extend(case.request.headers.iter().cloned());
    let (reply, _) = send(running.addr, &case.request.method, &case.request.path, &headers, 0);
    let text = |v: &[u8]| String::from_utf8_lossy(v).into_owned();
    let pairs = |list: &[(String, Vec<u8>)]| list.iter().map(|(n, v)| (n.clone(), text(v))).collect();
    if header(&reply.headers, ECHO_MARK).is_none() {
        return Ok(Observed::Denied { status: reply.status, headers: pairs(&reply.headers), body: reply.body });
    }
    let seen: serde_json::Value = serde_json::from_slice(&reply.body).map_err(|e| e.to_string())?;
    let upstream: Vec<(String, String)> = serde_json::from_value(seen["headers"].clone()).map_err(|e| e.to_string())?;
    Ok(Observed::Forwarded {
        path: seen["path"].as_str().unwrap_or_default().to_string(),
        headers: upstream.into_iter().filter(|(n, _)| !HOST_ADDED.contains(&n.as_str())).collect(),
        client_response: case.response.as_ref().map(|_| pairs(&reply.headers)),
    })
}

#[test]
fn conformance_suite_passes_through_keyswap_serve() {
    let suite = Suite::load(&default_dir()).unwrap_or_else(|e| panic!("the suite does not load: {e}"));
    let echo = Echo::start();
    let report = SuiteReport::run(&suite.plan(Runner::Serve), |case| observe(&echo, case));
    println!("{}", report.render());
    assert!(report.failed.is_empty(), "{}", report.render());
    assert!(report.passed >= 1, "no case ran");
}

#[test]
fn a_broken_gateway_configuration_is_refused_with_its_path() {
    let (engine, component) = compiled();
    let table = [
        (r#"{"keyswap": {}, "upstreams": {"nope": "http://127.0.0.1:1"}}"#, "upstreams.nope: names no route"),
        (r#"{"keyswap": {"clientz": []}}"#, "keyswap.clientz: unknown field `clientz`"),
        (
            r#"{"keyswap": {"routes": [{"name": "r", "match": {}, "inject": [{"header": "x", "value": {"env": "UNSET_VAR"}}]}]}, "upstreams": {"*": "http://127.0.0.1:1"}}"#,
            "keyswap.routes[0].inject[0].value.env: UNSET_VAR is not set",
        ),
    ];
    for (config, want) in table {
        let gateway = Gateway::new(engine, component, config, &[]).unwrap();
        match RunningGateway::start(gateway, "127.0.0.1:0".parse().unwrap()) {
            Err(ServeError::Refused(line)) => assert!(line.starts_with(want), "{config}: {line}"),
            Err(e) => panic!("{config}: {e}"),
            Ok(_) => panic!("{config}: accepted"),
        }
    }
}

#[test]
fn an_unreachable_upstream_is_a_502() {
    let (engine, component) = compiled();
    // A port that was free a moment ago: nothing listens there.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let config = format!(
        r#"{{"keyswap": {{"clients": [{{"id": "c", "key": "k", "routes": ["*"]}}],
            "routes": [{{"name": "r", "match": {{"path_prefix": "/"}}, "inject": [{{"header": "x-up", "value": {{"inline": "up"}}}}]}}]}},
            "upstreams": {{"r": "http://{closed}"}}}}"#
    );
    let running =
        RunningGateway::start(Gateway::new(engine, component, &config, &[]).unwrap(), "127.0.0.1:0".parse().unwrap())
            .unwrap();
    let headers = [("host".to_string(), "gw".to_string()), ("authorization".to_string(), "Bearer k".to_string())];
    let (reply, _) = send(running.addr, "GET", "/", &headers, 0);
    assert_eq!(reply.status, 502);
    let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(body["error"], "bad_gateway");
}

/// The gateway is the router, so it knows the route a response answers:
/// a `location` that kept the route's query credential loses it, and any
/// other header echoing the credential is dropped, before the client sees
/// them.
#[test]
fn a_response_never_hands_the_route_credential_back() {
    let (engine, component) = compiled();
    let echo = Echo::start();
    let config = format!(
        r#"{{"keyswap": {{"clients": [{{"id": "c", "key": "gw-key", "routes": ["*"]}}],
            "routes": [{{"name": "maps", "match": {{"path_prefix": "/"}},
                         "inject": [{{"query": "key", "value": {{"inline": "q-secret-value"}}}}]}}]}},
            "upstreams": {{"maps": "http://{}"}}}}"#,
        echo.addr
    );
    let running =
        RunningGateway::start(Gateway::new(engine, component, &config, &[]).unwrap(), "127.0.0.1:0".parse().unwrap())
            .unwrap();
    let pairs = |list: &[(&str, &str)]| list.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect::<Vec<_>>();
    echo.respond_with(&pairs(&[
        ("location", "http://up.example/maps?alt=json&key=q-secret-value"),
        ("x-echo", "received q-secret-value"),
        ("x-kept", "yes"),
    ]));
    let headers = pairs(&[("host", "gw"), ("authorization", "Bearer gw-key")]);
    let (reply, _) = send(running.addr, "GET", "/maps", &headers, 0);
    assert_eq!(reply.status, 200, "{}", String::from_utf8_lossy(&reply.body));
    let seen: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(seen["path"], "/maps?key=q-secret-value", "the upstream got the credential");
    let get = |name: &str| header(&reply.headers, name).map(|v| String::from_utf8_lossy(v).into_owned());
    assert_eq!(get("location").as_deref(), Some("http://up.example/maps?alt=json"));
    assert_eq!(get("x-echo"), None);
    assert_eq!(get("x-kept").as_deref(), Some("yes"));
}

// ----------------------------------------------------------- streaming --

/// `keyswap serve` as a child process under coreutils' `timeout`, so it
/// stops by itself even if this test process dies; stopped when dropped.
struct Child {
    timeout: std::process::Child,
    /// The `keyswap serve` process itself.
    pid: u32,
    addr: SocketAddr,
}

impl Child {
    fn start(config: &std::path::Path, env: &[&str]) -> Self {
        let mut command = std::process::Command::new("timeout");
        command.args(["300", env!("CARGO_BIN_EXE_keyswap"), "serve", "--listen", "127.0.0.1:0", "--config"]);
        command.arg(config).arg("--component").arg(Artifact::Component.default_path());
        for var in env {
            command.args(["--env", var]);
        }
        let mut timeout = command.stdout(std::process::Stdio::piped()).spawn().unwrap();
        let mut line = String::new();
        BufReader::new(timeout.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let addr = line
            .split("http://")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("keyswap serve printed {line:?}"));
        let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", timeout.id())).unwrap();
        let pid = children.split_whitespace().next().and_then(|p| p.parse().ok()).expect("timeout runs keyswap");
        Self { timeout, pid, addr }
    }

    /// A line of the process's `/proc/PID/status`, in KiB.
    fn status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap();
        let line = status.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("no {field}"));
        line.split_whitespace().nth(1).and_then(|n| n.parse().ok()).unwrap()
    }

    /// Resets the process's peak RSS (VmHWM) to its current RSS.
    fn reset_peak(&self) {
        std::fs::write(format!("/proc/{}/clear_refs", self.pid), "5").unwrap();
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        // `timeout` passes SIGTERM on to keyswap, then exits.
        let _ = std::process::Command::new("kill").arg(self.timeout.id().to_string()).status();
        let _ = self.timeout.wait();
    }
}

#[test]
fn a_100_mib_body_streams_through_each_way_in_bounded_memory() {
    const BODY: u64 = 100 << 20;
    const LIMIT_KIB: u64 = 32 << 10;
    let echo = Echo::start();
    let dir = std::env::temp_dir().join(format!("keyswap-serve-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("gateway.json");
    std::fs::write(
        &config,
        format!(
            r#"{{"keyswap": {{"clients": [{{"id": "team", "key": "gw-key", "routes": ["*"]}}],
                "routes": [{{"name": "up", "match": {{"path_prefix": "/"}},
                             "inject": [{{"header": "authorization", "prefix": "Bearer ", "value": {{"env": "UP_TOKEN"}}}}]}}],
                "client_id_header": "x-keyswap-client"}},
              "upstreams": {{"up": "http://{}"}}}}"#,
            echo.addr
        ),
    )
    .unwrap();
    let server = Child::start(&config, &["UP_TOKEN=sk-upstream"]);
    let headers =
        [("host".to_string(), "gateway.local".to_string()), ("authorization".to_string(), "Bearer gw-key".to_string())];

    // Warm up (the first request's instance, the connection pool), then
    // measure from a reset peak.
    let (reply, _) = send(server.addr, "POST", "/warm", &headers, 1 << 20);
    assert_eq!(reply.status, 200);
    server.reset_peak();
    let base = server.status_kib("VmRSS:");

    let (reply, sent) = send(server.addr, "POST", "/upload", &headers, BODY);
    assert_eq!(reply.status, 200, "{}", String::from_utf8_lossy(&reply.body));
    let seen: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(seen["body_bytes"], BODY);
    assert_eq!(seen["body_sha256"], sent.as_str());
    let upstream: Vec<(String, String)> = serde_json::from_value(seen["headers"].clone()).unwrap();
    assert!(upstream.contains(&("authorization".into(), "Bearer sk-upstream".into())), "{upstream:?}");
    let up_peak = server.status_kib("VmHWM:");

    let mut download = headers.to_vec();
    download.push((ECHO_RESPONSE_BYTES.to_string(), BODY.to_string()));
    let (reply, _) = send(server.addr, "GET", "/download", &download, 0);
    assert_eq!((reply.status, reply.length), (200, BODY));
    assert_eq!(reply.sha256, Pattern::sha256(BODY));
    let down_peak = server.status_kib("VmHWM:");

    println!("keyswap serve RSS: base {base} KiB, peak after upload {up_peak} KiB, after download {down_peak} KiB");
    assert!(up_peak.saturating_sub(base) < LIMIT_KIB, "upload grew RSS by {} KiB", up_peak - base);
    assert!(down_peak.saturating_sub(base) < LIMIT_KIB, "download grew RSS by {} KiB", down_peak - base);
    let _ = std::fs::remove_dir_all(&dir);
}
