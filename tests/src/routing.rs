//! Routing agreement through the real Envoy: what reached which upstream.
//!
//! ```text
//!  test ─h1 (raw, trailers) / h2 (curl)─▶ Envoy: listener ─ keyswap ─ router ─▶ cluster ─ keyswap ─▶ Recorder (one a cluster)
//!                                                                       └─ h2 ─▶ relay Envoy ─ h1 + trailers ─▶ Recorder
//! ```
//!
//! - [`Recorder`]: an HTTP/1.1 upstream that keeps every request it
//!   received (headers, target, body and trailers) under its cluster's
//!   name, reflects every request header back as `x-r-<name>` (the
//!   target as `x-r-target`, a Basic `authorization` decoded as
//!   `x-r-basic-decoded` if asked), as a careless upstream would, and answers a
//!   redirect, trailers or a `TRACE` echo when a request asks for them
//!   ([`REDIRECT_HEADER`], [`TRAILERS_HEADER`]).
//! - [`bootstrap`]: a gateway of several virtual hosts, its listeners
//!   (`codec_type: AUTO`, path normalisation, underscore handling and
//!   HTTP/1.1 trailers each optional) and one cluster a [`Recorder`], with
//!   keyswap placed as [`Placement`] says.
//! - [`relay`]: an Envoy without keyswap that accepts HTTP/2 and forwards
//!   to a recorder over HTTP/1.1 with trailers, so a gateway cluster can
//!   speak HTTP/2 to its upstream.
//! - [`send_h1`] (raw bytes, response trailers kept) and [`send_h2`]
//!   (curl's HTTP/2 with prior knowledge, many requests a process).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::json;

use crate::envoy::{keyswap_filter, Listener};

/// A request asking its upstream for a `301` whose `location` and
/// `content-location` repeat the query it received: `location` is
/// `/x?<query>`, or `<value>?<query>` for a value starting with `http`.
pub const REDIRECT_HEADER: &str = "x-respond-redirect";

/// A request asking its upstream for a chunked answer with trailers
/// ([`RESPONSE_TRAILERS`], and the `authorization` it received as
/// `x-r-authorization`).
pub const TRAILERS_HEADER: &str = "x-respond-trailers";

/// A request asking its upstream to repeat a Basic `authorization` it
/// received decoded (`x-r-basic-decoded: user:password`).
pub const BASIC_DECODED_HEADER: &str = "x-respond-basic-decoded";

/// A request asking its upstream for an informational answer before its
/// answer (`100`: `100 Continue`, else `103 Early Hints`), with the same
/// reflected headers.
pub const EARLY_HINTS_HEADER: &str = "x-respond-early-hints";

/// The trailers a [`Recorder`] sends when asked: two a gateway may be
/// configured to strip, one it must leave (proof trailers get through).
pub const RESPONSE_TRAILERS: [(&str, &str); 3] =
    [("x-upstream-secret", "upstream-trailer-secret"), ("set-cookie", "trailer=1"), ("x-benign-trailer", "ok")];

/// Request headers a [`Recorder`] does not reflect (framing, and the
/// reflection would repeat them).
const NOT_REFLECTED: [&str; 6] = ["host", "content-length", "transfer-encoding", "connection", "te", "keep-alive"];

/// One request as an upstream received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// The recorder's (the cluster's) name.
    pub cluster: String,
    pub method: String,
    pub target: String,
    /// Names lower-cased, order and repeats kept.
    pub headers: Vec<(String, String)>,
    pub trailers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Received {
    /// The first value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// A recording upstream; stops accepting on drop.
pub struct Recorder {
    name: String,
    addr: SocketAddr,
    log: Arc<Mutex<Vec<Received>>>,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl Recorder {
    /// Listens on a free loopback port as the upstream of cluster `name`.
    ///
    /// # Errors
    /// No port could be bound.
    pub fn start(name: &str) -> io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (l, s, n) = (Arc::clone(&log), Arc::clone(&stop), name.to_string());
        let acceptor = std::thread::Builder::new().name(format!("recorder-{name}")).spawn(move || {
            for stream in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                let (l, n) = (Arc::clone(&l), n.clone());
                let _ = std::thread::Builder::new().name("recorder-conn".into()).spawn(move || {
                    let _ = serve(stream, &n, &l);
                });
            }
        })?;
        Ok(Self { name: name.to_string(), addr, log, stop, acceptor: Some(acceptor) })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Everything received so far.
    pub fn received(&self) -> Vec<Received> {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

fn invalid(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.to_string())
}

fn read_line(reader: &mut impl BufRead) -> io::Result<Option<String>> {
    let mut line = Vec::new();
    if reader.by_ref().take(256 * 1024).read_until(b'\n', &mut line)? == 0 {
        return Ok(None);
    }
    while line.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        line.pop();
    }
    Ok(Some(String::from_utf8_lossy(&line).into_owned()))
}

/// Header lines up to the empty line, names lower-cased.
fn read_fields(reader: &mut impl BufRead) -> io::Result<Vec<(String, String)>> {
    let mut fields = Vec::new();
    for _ in 0..10_000 {
        let line = read_line(reader)?.ok_or_else(|| invalid("closed in the headers"))?;
        if line.is_empty() {
            return Ok(fields);
        }
        let (name, value) = line.split_once(':').ok_or_else(|| invalid("a header line without `:`"))?;
        fields.push((name.to_ascii_lowercase(), value.trim_matches([' ', '\t']).to_string()));
    }
    Err(invalid("too many header lines"))
}

fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

/// Header or trailer fields: names lower-cased, in order.
type Fields = Vec<(String, String)>;

/// A body framed by `fields`, and the trailers of a chunked one.
fn read_message_body(
    reader: &mut impl BufRead,
    fields: &[(String, String)],
    to_eof: bool,
) -> io::Result<(Vec<u8>, Fields)> {
    let mut body = Vec::new();
    if field(fields, "transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
        for _ in 0..100_000 {
            let line = read_line(reader)?.ok_or_else(|| invalid("closed in a chunk size"))?;
            let size = line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size, 16).map_err(|_| invalid("bad chunk size"))?;
            if size == 0 {
                return Ok((body, read_fields(reader)?));
            }
            let start = body.len();
            body.resize(start + size, 0);
            reader.read_exact(&mut body[start..])?;
            read_line(reader)?;
        }
        return Err(invalid("too many chunks"));
    }
    if let Some(length) = field(fields, "content-length") {
        let length: usize = length.trim().parse().map_err(|_| invalid("bad content-length"))?;
        body.resize(length, 0);
        reader.read_exact(&mut body)?;
    } else if to_eof {
        reader.read_to_end(&mut body)?;
    }
    Ok((body, Vec::new()))
}

fn serve(stream: TcpStream, cluster: &str, log: &Mutex<Vec<Received>>) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    stream.set_write_timeout(Some(Duration::from_secs(15)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let line = loop {
            match read_line(&mut reader)? {
                None => return Ok(()),
                Some(l) if l.is_empty() => {}
                Some(l) => break l,
            }
        };
        let mut parts = line.splitn(3, ' ');
        let (method, target) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
        let headers = read_fields(&mut reader)?;
        let (body, trailers) = read_message_body(&mut reader, &headers, false)?;
        let received = Received {
            cluster: cluster.to_string(),
            method: method.to_string(),
            target: target.to_string(),
            headers,
            trailers,
            body,
        };
        let bytes = answer(&received, &line);
        // Kept before answering: a client that has its answer can look.
        if let Ok(mut log) = log.lock() {
            log.push(received);
        }
        writer.write_all(&bytes)?;
        writer.flush()?;
    }
}

/// The answer to one request: reflects it (see the module doc).
fn answer(r: &Received, request_line: &str) -> Vec<u8> {
    let mut head: Vec<(String, String)> = Vec::new();
    for (name, value) in &r.headers {
        if !NOT_REFLECTED.contains(&name.as_str()) && !name.starts_with("x-respond") {
            head.push((format!("x-r-{name}"), value.clone()));
        }
    }
    head.push(("x-r-target".into(), r.target.clone()));
    // And, if asked, what a Basic `authorization` says, decoded.
    let basic = r.header("authorization").and_then(|v| v.strip_prefix("Basic "));
    if let (Some(basic), Some(_)) = (basic, r.header(BASIC_DECODED_HEADER)) {
        head.push(("x-r-basic-decoded".into(), String::from_utf8_lossy(&base64_decode(basic)).into_owned()));
    }
    let mut status = "200 OK";
    if let Some(to) = r.header(REDIRECT_HEADER) {
        status = "301 Moved Permanently";
        let query = r.target.split_once('?').map_or("", |(_, q)| q);
        let host = r.header("host").unwrap_or("upstream.test");
        let location = if to.starts_with("http") { format!("{to}?{query}") } else { format!("/x?{query}") };
        head.push(("location".into(), location));
        head.push(("content-location".into(), format!("http://{host}/x?{query}")));
    }
    // A TRACE answer is the request itself (RFC 9110, 9.3.8).
    let body = if r.method.eq_ignore_ascii_case("TRACE") {
        head.push(("content-type".into(), "message/http".into()));
        let mut text = format!("{request_line}\r\n");
        for (n, v) in &r.headers {
            text.push_str(&format!("{n}: {v}\r\n"));
        }
        text.into_bytes()
    } else {
        json!({"cluster": r.cluster}).to_string().into_bytes()
    };
    let mut out = String::new();
    if let Some(code) = r.header(EARLY_HINTS_HEADER) {
        // An informational answer first, repeating the request too.
        let code = if code == "100" { "100 Continue" } else { "103 Early Hints" };
        out.push_str(&format!("HTTP/1.1 {code}\r\n"));
        for (n, v) in head.iter().filter(|(n, _)| n.starts_with("x-r-")) {
            out.push_str(&format!("{n}: {v}\r\n"));
        }
        out.push_str("\r\n");
    }
    out.push_str(&format!("HTTP/1.1 {status}\r\n"));
    for (n, v) in &head {
        out.push_str(&format!("{n}: {v}\r\n"));
    }
    let mut out = out.into_bytes();
    if r.header(TRAILERS_HEADER).is_some() {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n\r\n");
        out.extend_from_slice(format!("{:x}\r\n", body.len()).as_bytes());
        out.extend_from_slice(&body);
        out.extend_from_slice(b"\r\n0\r\n");
        for (n, v) in RESPONSE_TRAILERS {
            out.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
        }
        // A careless upstream repeats a request header in a trailer too.
        if let Some(v) = r.header("authorization") {
            out.extend_from_slice(format!("x-r-authorization: {v}\r\n").as_bytes());
        }
        out.extend_from_slice(b"\r\n");
    } else {
        out.extend_from_slice(format!("content-length: {}\r\n\r\n", body.len()).as_bytes());
        out.extend_from_slice(&body);
    }
    out
}

/// Standard base64, padding optional; anything else is skipped.
fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let (mut out, mut acc, mut bits) = (Vec::new(), 0u32, 0);
    for v in text.bytes().filter_map(value) {
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(u8::try_from((acc >> bits) & 0xff).unwrap_or(0));
        }
    }
    out
}

// ---- clients --------------------------------------------------------------

/// A client's view of one answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub trailers: Vec<(String, String)>,
    /// Everything read, as received (to search for what must not be there).
    pub raw: Vec<u8>,
}

impl Reply {
    /// The first value of header `name`, any case.
    pub fn header(&self, name: &str) -> Option<&str> {
        field(&self.headers, name)
    }
}

/// Records what a reader reads.
struct Tee<R> {
    inner: R,
    seen: Vec<u8>,
}

impl<R: Read> Read for Tee<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.seen.extend_from_slice(&buf[..n]);
        Ok(n)
    }
}

/// Sends `bytes` (one HTTP/1.1 request) on a new connection and reads one
/// answer, trailers included (`head`: a HEAD, so no body).
///
/// # Errors
/// Connecting, writing or reading a well-formed answer failed in `timeout`.
pub fn send_h1(addr: SocketAddr, bytes: &[u8], head: bool, timeout: Duration) -> io::Result<Reply> {
    let stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    (&stream).write_all(bytes)?;
    let mut reader = BufReader::new(Tee { inner: stream, seen: Vec::new() });
    loop {
        let line = read_line(&mut reader)?.ok_or_else(|| invalid("closed before an answer"))?;
        let status: u16 = line.split(' ').nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| invalid("status line"))?;
        let headers = read_fields(&mut reader)?;
        if (100..200).contains(&status) {
            continue;
        }
        let bodiless = head || status == 204 || status == 304;
        let (body, trailers) =
            if bodiless { (Vec::new(), Vec::new()) } else { read_message_body(&mut reader, &headers, true)? };
        let raw = std::mem::take(&mut reader.get_mut().seen);
        return Ok(Reply { status, headers, body, trailers, raw });
    }
}

/// One HTTP/2 request for [`send_h2`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct H2Request {
    pub method: String,
    /// `:path`, sent as is.
    pub path: String,
    /// `:authority` (curl sends a `host` header given to it as that).
    pub authority: String,
    pub headers: Vec<(String, String)>,
}

/// Sends `requests` over HTTP/2 with prior knowledge to `addr` with curl,
/// one process for all of them (each a connection of its own), and
/// returns an answer for each: status 0 when curl got none.
///
/// # Errors
/// curl cannot be run.
pub fn send_h2(addr: SocketAddr, requests: &[H2Request]) -> Result<Vec<Reply>, String> {
    let mut args: Vec<String> = Vec::new();
    for (i, r) in requests.iter().enumerate() {
        if i > 0 {
            args.push("--next".into());
        }
        // A name of its own for each request, so curl opens a connection
        // each (curl 7.88 fails a second request on a reused prior-knowledge
        // HTTP/2 connection).
        let name = format!("r{i}.keyswap.invalid");
        let url = format!("http://{name}:{}/", addr.port());
        args.extend(["--resolve".into(), format!("{name}:{}:{}", addr.port(), addr.ip())]);
        args.extend(["--http2-prior-knowledge", "-s", "--path-as-is", "--max-time", "15", "-D", "-"].map(String::from));
        args.extend(["-X".into(), r.method.clone(), "--request-target".into(), r.path.clone()]);
        args.extend(["-H".into(), format!("host: {}", r.authority)]);
        for (n, v) in &r.headers {
            args.extend(["-H".into(), format!("{n}: {v}")]);
        }
        args.extend(["-w".into(), format!("\n{}\n", end_marker(i)), url]);
    }
    let output = Command::new("curl").args(&args).output().map_err(|e| format!("curl: {e}"))?;
    let mut out = output.stdout.as_slice();
    let mut replies = Vec::with_capacity(requests.len());
    for i in 0..requests.len() {
        let marker = format!("\n{}\n", end_marker(i));
        let Some(at) = find(out, marker.as_bytes()) else {
            replies.push(Reply::default());
            continue;
        };
        replies.push(parse_curl(&out[..at]));
        out = &out[at + marker.len()..];
    }
    Ok(replies)
}

fn end_marker(i: usize) -> String {
    format!("@@keyswap-routing-end-{i}@@")
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// curl's `-D -` output and body; informational (1xx) blocks are skipped
/// but kept in `raw`.
fn parse_curl(raw: &[u8]) -> Reply {
    let mut rest = raw;
    for _ in 0..10 {
        let Some(split) = find(rest, b"\r\n\r\n") else {
            break;
        };
        let text = String::from_utf8_lossy(&rest[..split]);
        let mut lines = text.lines();
        let status: u16 = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|s| s.parse().ok()).unwrap_or(0);
        if (100..200).contains(&status) {
            rest = &rest[split + 4..];
            continue;
        }
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        return Reply { status, headers, body: rest[split + 4..].to_vec(), trailers: Vec::new(), raw: raw.to_vec() };
    }
    Reply { raw: raw.to_vec(), ..Reply::default() }
}

/// True when curl can speak HTTP/2 here.
pub fn curl_has_http2() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        Command::new("curl").arg("--version").output().is_ok_and(|o| {
            String::from_utf8_lossy(&o.stdout).lines().any(|l| l.starts_with("Features:") && l.contains("HTTP2"))
        })
    })
}

// ---- bootstraps -----------------------------------------------------------

/// How a cluster speaks to its upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    /// HTTP/1.1 with `enable_trailers`.
    Http1Trailers,
    Http2,
}

/// A cluster of the gateway and its one upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSpec {
    pub name: String,
    pub upstream: SocketAddr,
    pub protocol: Protocol,
    /// Without keyswap's upstream filter even in [`Placement::TwoStages`]
    /// (a cluster deployed against the documentation).
    pub bare: bool,
}

/// A listener of the gateway: all serve the same virtual hosts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListenerSpec {
    pub name: String,
    /// `normalize_path` and `merge_slashes`.
    pub normalize: bool,
    /// `headers_with_underscores_action: REJECT_REQUEST` (else Envoy's
    /// default, `ALLOW`).
    pub reject_underscores: bool,
    /// `http_protocol_options.enable_trailers` (HTTP/1.1 downstream).
    pub trailers: bool,
}

/// Where keyswap runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// The listener's HTTP filter and every cluster's upstream filter.
    TwoStages,
    /// The listener's HTTP filter only: how keyswap was deployed before
    /// issue 13.
    ListenerOnly,
}

impl Placement {
    /// `ListenerOnly` when `KEYSWAP_PLACEMENT=listener-only`: to run the
    /// same tests against a filter built before the two stages.
    pub fn from_env() -> Self {
        match std::env::var("KEYSWAP_PLACEMENT").as_deref() {
            Ok("listener-only") => Self::ListenerOnly,
            _ => Self::TwoStages,
        }
    }
}

fn loopback(port: u16) -> serde_json::Value {
    json!({"socket_address": {"address": "127.0.0.1", "port_value": port}})
}

fn router() -> serde_json::Value {
    json!({
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
    })
}

fn cluster_json(c: &ClusterSpec, filter: Option<&serde_json::Value>) -> serde_json::Value {
    let protocol = match c.protocol {
        Protocol::Http1 => json!({"http_protocol_options": {}}),
        Protocol::Http1Trailers => json!({"http_protocol_options": {"enable_trailers": true}}),
        Protocol::Http2 => json!({"http2_protocol_options": {}}),
    };
    let mut options = json!({
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": protocol,
    });
    if let Some(filter) = filter {
        options["http_filters"] = json!([filter, {
            "name": "envoy.filters.http.upstream_codec",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec"},
        }]);
    }
    json!({
        "name": c.name,
        "type": "STATIC",
        "connect_timeout": "2s",
        "load_assignment": {"cluster_name": c.name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
            "socket_address": {"address": c.upstream.ip().to_string(), "port_value": c.upstream.port()},
        }}}]}]},
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": options},
    })
}

fn hcm(l: &ListenerSpec, virtual_hosts: &serde_json::Value, filters: Vec<serde_json::Value>) -> serde_json::Value {
    let mut hcm = json!({
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": l.name,
        "codec_type": "AUTO",
        "route_config": {"name": l.name, "virtual_hosts": virtual_hosts},
        "http_filters": filters,
    });
    if l.normalize {
        hcm["normalize_path"] = json!(true);
        hcm["merge_slashes"] = json!(true);
    }
    if l.reject_underscores {
        hcm["common_http_protocol_options"] = json!({"headers_with_underscores_action": "REJECT_REQUEST"});
    }
    if l.trailers {
        hcm["http_protocol_options"] = json!({"enable_trailers": true});
    }
    json!({
        "name": l.name,
        "address": loopback(0),
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}],
    })
}

/// A gateway: `listeners` all serving `virtual_hosts` (Envoy's
/// `route_config.virtual_hosts`), `clusters`, keyswap with `config` loaded
/// from `wasm` and placed as `placement` says.
pub fn bootstrap(
    listeners: &[ListenerSpec],
    virtual_hosts: &serde_json::Value,
    clusters: &[ClusterSpec],
    config: &str,
    wasm: &Path,
    placement: Placement,
) -> serde_json::Value {
    let filter =
        keyswap_filter(&Listener { name: "gateway".into(), config: config.into(), ..Listener::default() }, wasm);
    let upstream_filter = (placement == Placement::TwoStages).then_some(&filter);
    let listeners: Vec<_> = listeners.iter().map(|l| hcm(l, virtual_hosts, vec![filter.clone(), router()])).collect();
    let clusters: Vec<_> =
        clusters.iter().map(|c| cluster_json(c, if c.bare { None } else { upstream_filter })).collect();
    json!({
        "node": {"id": "keyswap-routing", "cluster": "keyswap-routing"},
        "admin": {"address": loopback(0)},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    })
}

/// An Envoy without keyswap: for each `(name, upstream)` a listener `name`
/// that takes HTTP/2 (or HTTP/1.1) and forwards everything to `upstream`
/// over HTTP/1.1 with trailers.
pub fn relay(targets: &[(String, SocketAddr)]) -> serde_json::Value {
    let mut listeners = Vec::new();
    let mut clusters = Vec::new();
    for (name, upstream) in targets {
        let spec = ListenerSpec { name: name.clone(), trailers: true, ..ListenerSpec::default() };
        let hosts = json!([{"name": "all", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "route": {"cluster": name}}]}]);
        listeners.push(hcm(&spec, &hosts, vec![router()]));
        let c = ClusterSpec { name: name.clone(), upstream: *upstream, protocol: Protocol::Http1Trailers, bare: true };
        clusters.push(cluster_json(&c, None));
    }
    json!({
        "node": {"id": "keyswap-relay", "cluster": "keyswap-relay"},
        "admin": {"address": loopback(0)},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    })
}
