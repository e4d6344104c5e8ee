//! The routing tests' recording upstream and its raw client (see
//! [`crate::routing`] for how they are used). Raw, because they are the
//! oracle of routing's attack matrix: the [`Recorder`] keeps the request
//! target exactly as sent (absolute-form, odd bytes), answers informational
//! `103 Early Hints` with headers (hyper's server sends only `100
//! Continue`) and writes trailers byte for byte; [`send_h1`] sends hostile
//! request bytes and keeps everything it read, to search it for what must
//! not be there.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::json;

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
