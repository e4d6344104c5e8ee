//! Raw HTTP/1.1 over plain sockets, for what no HTTP library will send or
//! receive: this is the one place the tests hold a `TcpStream`. Every
//! ordinary request goes through [`crate::http`] (hyper) and every ordinary
//! upstream is a [`crate::server::Server`] (hyper); what is here exists
//! because a library would normalise or refuse the very bytes a test is
//! about:
//!
//! - [`Request`]: exact header names (case kept), values (any bytes) and
//!   order, interleaved repeats, any request line (origin-form,
//!   absolute-form, `CONNECT host:port`, or something malformed), bodies
//!   framed by hand (chunked, conflicting lengths): the hostile matrix of
//!   `gateway.rs`, `leaks.rs` and the conformance suite's exact headers.
//! - [`KeepAlive`]: ONE connection held across requests that never
//!   reconnects, so a test (and [`crate::load`]) sees exactly when Envoy
//!   closes it and times each request; a pooled client hides both.
//! - [`upstream`]: the routing tests' recording upstream and its client,
//!   which see and send the exact request target, `103 Early Hints` with
//!   headers, and trailers byte for byte (routing's attack matrix).
//!
//! Nothing is added to what the test writes: no `host`, no
//! `content-length` unless [`Request::body`] is used.

pub mod upstream;

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

pub use crate::http::Response;

/// How long one request may wait on the peer.
pub const TIMEOUT: Duration = Duration::from_secs(15);

/// A request, sent exactly as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The request line without its CRLF: `GET /v1/models HTTP/1.1`.
    pub line: Vec<u8>,
    /// Header names and values, in order, as bytes.
    pub headers: Vec<(Vec<u8>, Vec<u8>)>,
    pub body: Vec<u8>,
}

impl Request {
    /// `METHOD TARGET HTTP/1.1`, with no headers.
    pub fn new(method: &str, target: &str) -> Self {
        Self::raw(format!("{method} {target} HTTP/1.1"))
    }

    /// `GET TARGET HTTP/1.1`, with no headers.
    pub fn get(target: &str) -> Self {
        Self::new("GET", target)
    }

    /// Any request line, sent as is.
    pub fn raw(line: impl Into<Vec<u8>>) -> Self {
        Self { line: line.into(), headers: Vec::new(), body: Vec::new() }
    }

    /// Appends a header (repeat the call for a repeated header).
    #[must_use]
    pub fn header(mut self, name: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Self {
        self.headers.push((name.as_ref().to_vec(), value.as_ref().to_vec()));
        self
    }

    /// Sets the body and appends its `content-length`.
    #[must_use]
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        let length = self.body.len().to_string();
        self.header("content-length", length)
    }

    /// Sets the body as is, adding no header (for chunked bodies).
    #[must_use]
    pub fn body_raw(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    /// The bytes on the wire.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256 + self.body.len());
        out.extend_from_slice(&self.line);
        out.extend_from_slice(b"\r\n");
        for (name, value) in &self.headers {
            out.extend_from_slice(name);
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&self.body);
        out
    }

    /// Sends the request on a new connection and reads one response.
    ///
    /// # Errors
    /// Connecting, writing, or reading a well-formed response failed.
    pub fn send(&self, addr: SocketAddr) -> io::Result<Response> {
        let head = self.line.split(|b| *b == b' ').next().unwrap_or_default();
        send_bytes(addr, &self.to_bytes(), head.eq_ignore_ascii_case(b"HEAD"))
    }
}

impl From<&crate::http::Request> for Request {
    /// The same request as raw bytes: `METHOD TARGET HTTP/1.1`, its
    /// headers as given, and its body with a `content-length`.
    fn from(r: &crate::http::Request) -> Self {
        let raw = Self { headers: r.headers.clone(), ..Self::new(&r.method, &r.target) };
        if r.body.is_empty() {
            raw
        } else {
            raw.body(r.body.clone())
        }
    }
}

/// Writes `bytes` to a new connection and reads one response (`head`: the
/// request was a HEAD, so the response has no body).
///
/// # Errors
/// Connecting, writing, or reading a well-formed response failed.
pub fn send_bytes(addr: SocketAddr, bytes: &[u8], head: bool) -> io::Result<Response> {
    send_bytes_within(addr, bytes, head, TIMEOUT)
}

/// [`send_bytes`], waiting at most `timeout` for each step.
///
/// # Errors
/// Connecting, writing, or reading a well-formed response failed or timed out.
pub fn send_bytes_within(addr: SocketAddr, bytes: &[u8], head: bool, timeout: Duration) -> io::Result<Response> {
    let stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    (&stream).write_all(bytes)?;
    (&stream).flush()?;
    read_response(&mut BufReader::new(stream), head)
}

fn invalid(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

/// Reads a CRLF- (or LF-) terminated line without its terminator.
fn read_line(reader: &mut impl BufRead, limit: usize) -> io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    let n = reader.by_ref().take(limit as u64 + 2).read_until(b'\n', &mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() != Some(&b'\n') {
        return Err(invalid("line too long or connection closed mid-line"));
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(Some(line))
}

/// Reads header lines up to the empty line.
fn read_headers(reader: &mut impl BufRead) -> io::Result<Vec<(String, String)>> {
    let mut headers = Vec::new();
    loop {
        let line = read_line(reader, 256 * 1024)?.ok_or_else(|| invalid("connection closed in the headers"))?;
        if line.is_empty() {
            return Ok(headers);
        }
        if headers.len() > 10_000 {
            return Err(invalid("too many headers"));
        }
        let colon = line.iter().position(|b| *b == b':').ok_or_else(|| invalid("header line without `:`"))?;
        let name = String::from_utf8_lossy(&line[..colon]).into_owned();
        let value = String::from_utf8_lossy(&line[colon + 1..]).trim_matches([' ', '\t']).to_string();
        headers.push((name, value));
    }
}

/// Reads a body framed by `headers`: chunked, `content-length`, or (when
/// `to_eof`) everything up to the end of the connection.
fn read_body(reader: &mut impl BufRead, headers: &[(String, String)], to_eof: bool) -> io::Result<Vec<u8>> {
    let get = |name: &str| headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str());
    let mut body = Vec::new();
    if get("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
        loop {
            let line = read_line(reader, 1024)?.ok_or_else(|| invalid("connection closed in a chunk size"))?;
            let size = String::from_utf8_lossy(&line);
            let size = size.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size, 16).map_err(|_| invalid("bad chunk size"))?;
            if size == 0 {
                // Trailers, up to the empty line.
                read_headers(reader)?;
                return Ok(body);
            }
            let start = body.len();
            body.resize(start + size, 0);
            reader.read_exact(&mut body[start..])?;
            read_line(reader, 2)?;
        }
    }
    if let Some(length) = get("content-length") {
        let length: usize = length.trim().parse().map_err(|_| invalid("bad content-length"))?;
        body.resize(length, 0);
        reader.read_exact(&mut body)?;
        return Ok(body);
    }
    if to_eof {
        reader.read_to_end(&mut body)?;
    }
    Ok(body)
}

/// One connection that stays open across requests and never reconnects.
pub struct KeepAlive {
    reader: BufReader<TcpStream>,
}

impl KeepAlive {
    /// Connects to `addr`.
    ///
    /// # Errors
    /// Connecting failed.
    pub fn connect(addr: SocketAddr) -> io::Result<Self> {
        let stream = TcpStream::connect_timeout(&addr, TIMEOUT)?;
        stream.set_read_timeout(Some(TIMEOUT))?;
        stream.set_write_timeout(Some(TIMEOUT))?;
        stream.set_nodelay(true)?;
        Ok(Self { reader: BufReader::new(stream) })
    }

    /// Sends `request` on this connection and reads its response.
    ///
    /// # Errors
    /// Writing or reading failed (the peer closed the connection, say).
    pub fn send(&mut self, request: &Request) -> io::Result<Response> {
        let stream = self.reader.get_mut();
        stream.write_all(&request.to_bytes())?;
        stream.flush()?;
        read_response(&mut self.reader, false)
    }
}

fn read_response(reader: &mut impl BufRead, head: bool) -> io::Result<Response> {
    loop {
        let line = read_line(reader, 8192)?.ok_or_else(|| invalid("connection closed before a response"))?;
        let text = String::from_utf8_lossy(&line);
        let mut parts = text.splitn(3, ' ');
        let (version, status) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
        if !version.starts_with("HTTP/1.") {
            return Err(invalid(format!("not an HTTP/1 status line: {text:?}")));
        }
        let status: u16 = status.parse().map_err(|_| invalid(format!("bad status line: {text:?}")))?;
        let headers = read_headers(reader)?;
        if (100..200).contains(&status) && status != 101 {
            continue;
        }
        let bodiless = head || status == 204 || status == 304 || (100..200).contains(&status);
        let body = if bodiless { Vec::new() } else { read_body(reader, &headers, true)? };
        return Ok(Response { status, headers, body });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_exactly_what_it_is_given() {
        let request = Request::get("/a?b=c").header("Host", "x").header("a", b"\xff").header("a", "2");
        assert_eq!(request.to_bytes(), b"GET /a?b=c HTTP/1.1\r\nHost: x\r\na: \xff\r\na: 2\r\n\r\n".to_vec());
    }

    #[test]
    fn reads_chunked_and_sized_bodies() {
        let wire = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nx: 1\r\n\r\n3\r\nabc\r\n2;e=1\r\nde\r\n0\r\n\r\n";
        let response = read_response(&mut &wire[..], false).unwrap();
        assert_eq!(response.status, 200);
        assert_eq!(response.body, b"abcde");
        assert_eq!(response.header("X"), Some("1"));
        let wire = b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 2\r\n\r\n{}";
        let response = read_response(&mut &wire[..], false).unwrap();
        assert_eq!((response.status, response.text().as_str()), (401, "{}"));
    }
}
