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
//! A [`crate::server::Server`]: HTTP/1.1 with keep-alive and HTTP/2 (h2c),
//! as Envoy's cluster speaks; the JSON says which (`"version"`). Over
//! HTTP/2 the `:authority` is reported as `host`, first.

use std::io;
use std::net::SocketAddr;

use crate::server::{Received, Reply, Server};

/// The request header that carries the response headers a test wants:
/// `x-echo-respond: [["set-cookie", "a=1"], ["x-upstream", "ok"]]`.
pub const RESPOND_HEADER: &str = "x-echo-respond";

/// What the echo received, parsed back from its response body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Echoed {
    pub method: String,
    /// The request target exactly as received.
    pub path: String,
    /// `HTTP/1.1` or `HTTP/2.0`: how the upstream was spoken to.
    pub version: String,
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
            version: json.get("version")?.as_str()?.to_string(),
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

/// A running echo upstream; stops on drop.
pub struct Echo {
    server: Server,
}

impl Echo {
    /// Listens on `addr` (`127.0.0.1:0` for any free port) and serves in
    /// the background.
    ///
    /// # Errors
    /// The address cannot be bound.
    pub fn start(addr: &str) -> io::Result<Self> {
        Ok(Self { server: Server::start(addr, answer)? })
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// Serves until the process ends (the `echo-upstream` program).
    pub fn wait(self) {
        self.server.wait();
    }
}

/// The response to one request: 200 with the echo JSON, plus the headers
/// asked for (which replace the echo's `content-type`; never ask for
/// `content-length`); 400 when [`RESPOND_HEADER`] is not a list of pairs.
/// Other upstreams answer with it what they do not answer themselves
/// ([`crate::rejecting`]).
pub fn answer(request: Received) -> Reply {
    let Received { method, target, version, headers, .. } = request;
    let body = serde_json::json!({"method": method, "path": target, "version": version, "headers": headers});
    let extra: Result<Vec<(String, String)>, String> = match headers.iter().find(|(n, _)| n == RESPOND_HEADER) {
        None => Ok(Vec::new()),
        Some((_, v)) => serde_json::from_str(v).map_err(|e| format!("{RESPOND_HEADER}: {e}")),
    };
    match extra {
        Ok(extra) => {
            let mut reply = Reply::json(200, body.to_string());
            // The echo's own content type, unless the test asked for one.
            if extra.iter().any(|(n, _)| n.eq_ignore_ascii_case("content-type")) {
                reply.headers.clear();
            }
            reply.headers.extend(extra);
            reply
        }
        Err(e) => Reply::json(400, serde_json::json!({"echo_error": e}).to_string()),
    }
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
        assert_eq!(echoed.version, "HTTP/1.1");
    }

    #[test]
    fn speaks_http2_with_prior_knowledge() {
        let echo = Echo::start("127.0.0.1:0").unwrap();
        let response = Request::get("/p?q=1").header("host", "h").header("x-a", "1").http2().send(echo.addr()).unwrap();
        assert_eq!(response.status, 200);
        let echoed = Echoed::parse(&response.body).unwrap();
        assert_eq!((echoed.version.as_str(), echoed.path.as_str()), ("HTTP/2.0", "/p?q=1"));
        assert_eq!(echoed.headers[0], ("host".to_string(), "h".to_string()));
        assert_eq!(echoed.header("x-a"), Some("1"));
    }
}
