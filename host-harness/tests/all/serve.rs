//! `keyswap serve` end to end, over loopback only: real HTTP/1.1 requests
//! through the gateway component to an echo upstream started here, for the
//! conformance suite (runner `serve`), and a 100 MiB body streamed each way
//! through the `keyswap serve` process with its peak memory measured.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use keyswap_conformance::{default_dir, Observed, Runner, Suite, SuiteCase, SuiteReport};
use keyswap_harness::component::compile;
use keyswap_harness::serve::{Gateway, RunningGateway, ServeError};
use keyswap_harness::Artifact;
use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::Engine;

/// The longest any socket here waits; every server stops when dropped.
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

// ---------------------------------------------------------------- echo --

/// An HTTP/1.1 upstream on loopback that answers every request with JSON
/// describing what it received (the body only counted and hashed, never
/// kept), plus the response headers set in `respond_with`; or, when asked
/// with `x-echo-response-bytes: N`, a generated body of N bytes.
struct Echo {
    addr: SocketAddr,
    respond_with: Arc<Mutex<Vec<(String, String)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Echo {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let respond_with = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (headers, stopped) = (respond_with.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stopped.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let headers = headers.lock().unwrap().clone();
                std::thread::spawn(move || {
                    let _ = answer(stream, &headers);
                });
            }
        });
        Self { addr, respond_with, stop, thread: Some(thread) }
    }

    fn respond_with(&self, headers: &[(String, String)]) {
        *self.respond_with.lock().unwrap() = headers.to_vec();
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn read_head(reader: &mut impl BufRead) -> std::io::Result<(String, Vec<(String, Vec<u8>)>)> {
    let mut first = String::new();
    reader.read_line(&mut first)?;
    let mut headers = Vec::new();
    loop {
        let mut line = Vec::new();
        reader.read_until(b'\n', &mut line)?;
        while line.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            line.pop();
        }
        if line.is_empty() {
            break;
        }
        let colon = line.iter().position(|b| *b == b':').unwrap_or(line.len());
        let name = String::from_utf8_lossy(&line[..colon]).trim().to_ascii_lowercase();
        let value = line.get(colon + 1..).unwrap_or_default().trim_ascii().to_vec();
        headers.push((name, value));
    }
    Ok((first.trim_end().to_string(), headers))
}

fn header<'h>(headers: &'h [(String, Vec<u8>)], name: &str) -> Option<&'h [u8]> {
    headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_slice())
}

/// Reads a body (Content-Length or chunked) into `sink` a chunk at a time.
fn read_body(
    reader: &mut impl BufRead,
    headers: &[(String, Vec<u8>)],
    mut sink: impl FnMut(&[u8]),
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut copy = |reader: &mut dyn BufRead, mut left: u64| -> std::io::Result<()> {
        while left > 0 {
            let want = usize::try_from(left.min(buf.len() as u64)).unwrap();
            let n = reader.read(&mut buf[..want])?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            sink(&buf[..n]);
            left -= n as u64;
        }
        Ok(())
    };
    if header(headers, "transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case(b"chunked")) {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size)?;
            let size = u64::from_str_radix(size.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidData))?;
            if size == 0 {
                // Trailers, then the empty line.
                while reader.read_line(&mut String::new())? > 2 {}
                return Ok(());
            }
            copy(reader, size)?;
            reader.read_line(&mut String::new())?;
        }
    }
    let length = header(headers, "content-length").map_or(0, |v| String::from_utf8_lossy(v).parse().unwrap_or(0));
    copy(reader, length)
}

fn answer(stream: TcpStream, respond_with: &[(String, String)]) -> std::io::Result<()> {
    stream.set_read_timeout(Some(TIMEOUT))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    let (line, headers) = read_head(&mut reader)?;
    let mut parts = line.split(' ');
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (mut length, mut hash) = (0u64, Sha256::new());
    read_body(&mut reader, &headers, |chunk| {
        length += chunk.len() as u64;
        hash.update(chunk);
    })?;
    let extra: String = respond_with.iter().map(|(n, v)| format!("{n}: {v}\r\n")).collect();
    if let Some(n) = header(&headers, ECHO_RESPONSE_BYTES) {
        let n: u64 = String::from_utf8_lossy(n).parse().unwrap_or(0);
        write!(out, "HTTP/1.1 200 OK\r\n{ECHO_MARK}: 1\r\n{extra}content-length: {n}\r\nconnection: close\r\n\r\n")?;
        return write_pattern(&mut out, n, &mut Sha256::new());
    }
    let text = |v: &[u8]| String::from_utf8_lossy(v).into_owned();
    let received: Vec<(String, String)> = headers.iter().map(|(n, v)| (n.clone(), text(v))).collect();
    let body = serde_json::json!({
        "method": method, "path": path, "headers": received,
        "body_bytes": length, "body_sha256": format!("{:x}", hash.finalize()),
    })
    .to_string();
    write!(
        out,
        "HTTP/1.1 200 OK\r\n{ECHO_MARK}: 1\r\ncontent-type: application/json\r\n{extra}content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Writes `n` bytes of a repeating pattern, hashing them.
fn write_pattern(out: &mut impl Write, n: u64, hash: &mut Sha256) -> std::io::Result<()> {
    let chunk: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
    let mut left = n;
    while left > 0 {
        let len = usize::try_from(left.min(chunk.len() as u64)).unwrap();
        out.write_all(&chunk[..len])?;
        hash.update(&chunk[..len]);
        left -= len as u64;
    }
    out.flush()
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

/// One request on a fresh connection; `body_bytes` of the pattern are sent
/// with a Content-Length.
fn send(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(String, String)],
    body_bytes: u64,
) -> (Reply, String) {
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(TIMEOUT)).unwrap();
    let mut out = std::io::BufWriter::new(stream.try_clone().unwrap());
    write!(out, "{method} {target} HTTP/1.1\r\n").unwrap();
    for (name, value) in headers {
        out.write_all(name.as_bytes()).unwrap();
        out.write_all(b": ").unwrap();
        out.write_all(value.as_bytes()).unwrap();
        out.write_all(b"\r\n").unwrap();
    }
    if body_bytes > 0 {
        write!(out, "content-length: {body_bytes}\r\n").unwrap();
    }
    out.write_all(b"connection: close\r\n\r\n").unwrap();
    let mut sent = Sha256::new();
    write_pattern(&mut out, body_bytes, &mut sent).unwrap();
    drop(out);
    let mut reader = BufReader::new(stream);
    let (line, headers) = read_head(&mut reader).unwrap();
    let status = line.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("status line {line:?}"));
    let (mut body, mut length, mut hash) = (Vec::new(), 0u64, Sha256::new());
    read_body(&mut reader, &headers, |chunk| {
        length += chunk.len() as u64;
        hash.update(chunk);
        if body.len() + chunk.len() <= 1 << 20 {
            body.extend_from_slice(chunk);
        }
    })
    .unwrap();
    let reply = Reply { status, headers, body, length, sha256: format!("{:x}", hash.finalize()) };
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
    let mut expected = Sha256::new();
    write_pattern(&mut std::io::sink(), BODY, &mut expected).unwrap();
    assert_eq!(reply.sha256, format!("{:x}", expected.finalize()));
    let down_peak = server.status_kib("VmHWM:");

    println!("keyswap serve RSS: base {base} KiB, peak after upload {up_peak} KiB, after download {down_peak} KiB");
    assert!(up_peak.saturating_sub(base) < LIMIT_KIB, "upload grew RSS by {} KiB", up_peak - base);
    assert!(down_peak.saturating_sub(base) < LIMIT_KIB, "download grew RSS by {} KiB", down_peak - base);
    let _ = std::fs::remove_dir_all(&dir);
}
