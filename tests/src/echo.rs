//! An echo upstream: answers every request with JSON of exactly what it
//! received, so a test sees the request as the upstream saw it after the
//! gateway.
//!
//! ```json
//! {"method": "GET", "path": "/v1/models?x=1",
//!  "headers": [["host", "gateway.local"], ["authorization", "Bearer sk-…"]]}
//! ```
//!
//! Header names are lower-cased, values kept (lossy UTF-8), order and
//! repeats kept. A request may ask for response headers with
//! [`RESPOND_HEADER`]: a JSON list of `[name, value]` pairs that the echo
//! adds to its response, in order (to test what the gateway does to
//! responses). That header is test-only; leave it out of comparisons.
//!
//! Plain `std::net`, a thread a connection, HTTP/1.1 with keep-alive.

use std::io::{self, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::http::{read_request, ServerRequest};

/// The request header that carries the response headers a test wants:
/// `x-echo-respond: [["set-cookie", "a=1"], ["x-upstream", "ok"]]`.
pub const RESPOND_HEADER: &str = "x-echo-respond";

/// What the echo received, parsed back from its response body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Echoed {
    pub method: String,
    /// The request target exactly as received.
    pub path: String,
    /// Names lower-cased, in order, repeats kept.
    pub headers: Vec<(String, String)>,
}

impl Echoed {
    /// Parses an echo body; `None` when `body` is not one (a gateway's
    /// own answer, say).
    pub fn parse(body: &[u8]) -> Option<Self> {
        let json: serde_json::Value = serde_json::from_slice(body).ok()?;
        let headers = json.get("headers")?.as_array()?;
        let headers = headers
            .iter()
            .map(|pair| Some((pair.get(0)?.as_str()?.to_string(), pair.get(1)?.as_str()?.to_string())))
            .collect::<Option<Vec<_>>>()?;
        Some(Self {
            method: json.get("method")?.as_str()?.to_string(),
            path: json.get("path")?.as_str()?.to_string(),
            headers,
        })
    }

    /// The first value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// Every value of header `name` (lower case), in order.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers.iter().filter(|(n, _)| n == name).map(|(_, v)| v.as_str()).collect()
    }
}

/// A running echo upstream; stops accepting on drop (open keep-alive
/// connections end when their peer closes them or after an idle minute).
pub struct Echo {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl Echo {
    /// Listens on `addr` (`127.0.0.1:0` for any free port) and serves in
    /// the background.
    ///
    /// # Errors
    /// The address cannot be bound.
    pub fn start(addr: &str) -> io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let acceptor =
            std::thread::Builder::new().name(format!("echo-{}", addr.port())).spawn(move || serve(&listener, &flag))?;
        Ok(Self { addr, stop, acceptor: Some(acceptor) })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the acceptor so it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

/// Accepts connections until `stop` is set, a thread each.
pub fn serve(listener: &TcpListener, stop: &AtomicBool) {
    for stream in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = stream else { continue };
        let _ = std::thread::Builder::new().name("echo-conn".into()).spawn(move || {
            let _ = connection(stream);
        });
    }
}

fn connection(stream: TcpStream) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    stream.set_write_timeout(Some(Duration::from_secs(15)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let Some(ServerRequest { method, path, version, headers, .. }) = read_request(&mut reader)? else {
            return Ok(());
        };
        let close =
            version != "HTTP/1.1" || headers.iter().any(|(n, v)| n == "connection" && v.eq_ignore_ascii_case("close"));
        writer.write_all(&answer(&method, &path, &headers, close))?;
        writer.flush()?;
        if close {
            return Ok(());
        }
    }
}

/// The response to one request: 200 with the echo JSON, plus the headers
/// asked for (which replace the echo's `content-type`; never ask for
/// `content-length`); 400 when [`RESPOND_HEADER`] is not a list of pairs.
fn answer(method: &str, path: &str, headers: &[(String, String)], close: bool) -> Vec<u8> {
    let body = serde_json::json!({"method": method, "path": path, "headers": headers}).to_string();
    let extra: Result<Vec<(String, String)>, String> = match headers.iter().find(|(n, _)| n == RESPOND_HEADER) {
        None => Ok(Vec::new()),
        Some((_, v)) => serde_json::from_str(v).map_err(|e| format!("{RESPOND_HEADER}: {e}")),
    };
    let (status, body, extra) = match extra {
        Ok(extra) => ("200 OK", body, extra),
        Err(e) => ("400 Bad Request", serde_json::json!({"echo_error": e}).to_string(), Vec::new()),
    };
    let mut out = format!("HTTP/1.1 {status}\r\ncontent-length: {}\r\n", body.len());
    // The echo's own content type, unless the test asked for one.
    if !extra.iter().any(|(n, _)| n.eq_ignore_ascii_case("content-type")) {
        out.push_str("content-type: application/json\r\n");
    }
    if close {
        out.push_str("connection: close\r\n");
    }
    for (name, value) in extra {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str("\r\n");
    out.push_str(&body);
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::Request;

    #[test]
    fn echoes_method_path_and_headers_in_order() {
        let echo = Echo::start("127.0.0.1:0").unwrap();
        let response = Request::get("/p?q=1")
            .header("Host", "h")
            .header("X-A", "1")
            .header("x-a", "2")
            .header(RESPOND_HEADER, r#"[["set-cookie","s=1"],["x-up","ok"]]"#)
            .send(echo.addr())
            .unwrap();
        assert_eq!(response.status, 200);
        assert_eq!(response.header_all("set-cookie"), ["s=1"]);
        assert_eq!(response.header("x-up"), Some("ok"));
        let echoed = Echoed::parse(&response.body).unwrap();
        assert_eq!((echoed.method.as_str(), echoed.path.as_str()), ("GET", "/p?q=1"));
        assert_eq!(echoed.header_all("x-a"), ["1", "2"]);
        assert_eq!(echoed.headers[0], ("host".to_string(), "h".to_string()));
    }
}
