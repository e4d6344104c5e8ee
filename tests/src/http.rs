//! The tests' HTTP client for well-formed requests (to Envoy's listeners
//! and its admin, to the test servers): hyper's client, HTTP/1.1 or
//! HTTP/2 with prior knowledge, a new connection a request (so a request
//! can land on any Envoy worker). What a library will not send, or
//! rewrites (header case, interleaved repeats, any request line, malformed
//! framing), goes through [`crate::raw`].
//!
//! ```text
//! Request::get("/v1/models").header("host", "gateway.test").send(addr)? ─▶ Response { status, headers, body }
//! ```
//!
//! Nothing is added to what the test sets: no `host` unless given (over
//! HTTP/2 a given `host` becomes the `:authority`), and only the framing
//! hyper needs for a body (`content-length`).

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::server::runtime;

/// How long one request may take, connecting included.
pub const TIMEOUT: Duration = Duration::from_secs(15);

/// A request: method, origin-form target, headers in order, body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub target: String,
    /// Names and values as bytes; a name or value hyper refuses makes
    /// [`Request::send`] fail (send such bytes with [`crate::raw`]).
    pub headers: Vec<(Vec<u8>, Vec<u8>)>,
    pub body: Vec<u8>,
    /// HTTP/2 with prior knowledge (h2c) instead of HTTP/1.1.
    pub http2: bool,
}

impl Request {
    /// `METHOD TARGET`, with no headers.
    pub fn new(method: &str, target: &str) -> Self {
        Self { method: method.into(), target: target.into(), headers: Vec::new(), body: Vec::new(), http2: false }
    }

    /// `GET TARGET`, with no headers.
    pub fn get(target: &str) -> Self {
        Self::new("GET", target)
    }

    /// Appends a header (repeat the call for a repeated header).
    #[must_use]
    pub fn header(mut self, name: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Self {
        self.headers.push((name.as_ref().to_vec(), value.as_ref().to_vec()));
        self
    }

    /// Sets the body (hyper adds its `content-length`).
    #[must_use]
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    /// Sends over HTTP/2 with prior knowledge.
    #[must_use]
    pub fn http2(mut self) -> Self {
        self.http2 = true;
        self
    }

    /// Sends the request on a new connection and reads the whole response.
    ///
    /// # Errors
    /// The request is not one hyper sends, or connecting, sending or
    /// reading failed, or [`TIMEOUT`] passed.
    pub fn send(&self, addr: SocketAddr) -> io::Result<Response> {
        self.send_within(addr, TIMEOUT)
    }

    /// [`Request::send`], waiting at most `timeout` in all.
    ///
    /// # Errors
    /// As [`Request::send`].
    pub fn send_within(&self, addr: SocketAddr, timeout: Duration) -> io::Result<Response> {
        let invalid = |e: &dyn std::fmt::Display| io::Error::new(io::ErrorKind::InvalidInput, e.to_string());
        let mut builder = hyper::Request::builder().method(self.method.as_bytes());
        let host = self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(b"host")).map(|(_, v)| v.as_slice());
        builder = if self.http2 {
            // The `host` given is the `:authority`; hyper sends no `host`.
            let authority = host.map_or_else(|| addr.to_string(), |h| String::from_utf8_lossy(h).into_owned());
            builder.version(hyper::Version::HTTP_2).uri(format!("http://{authority}{}", self.target))
        } else {
            builder.uri(format!("http://{addr}{}", self.target))
        };
        for (name, value) in &self.headers {
            if !(self.http2 && name.eq_ignore_ascii_case(b"host")) {
                builder = builder.header(name.as_slice(), value.as_slice());
            }
        }
        let request = builder.body(Full::new(Bytes::from(self.body.clone()))).map_err(|e| invalid(&e))?;
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        connector.set_nodelay(true);
        // A client a request, pooling nothing: a new connection each time,
        // to `addr` whatever the URI's authority says.
        connector.enforce_http(false);
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .set_host(false)
            .http2_only(self.http2)
            .build(Fixed { addr, inner: connector });
        let exchange = async move {
            let response = client.request(request).await.map_err(|e| io::Error::other(chain(&e)))?;
            let (parts, body) = response.into_parts();
            let body = body.collect().await.map_err(|e| io::Error::other(chain(&e)))?.to_bytes();
            let text = |v: &hyper::header::HeaderValue| String::from_utf8_lossy(v.as_bytes()).into_owned();
            Ok(Response {
                status: parts.status.as_u16(),
                headers: parts.headers.iter().map(|(n, v)| (n.as_str().to_string(), text(v))).collect(),
                body: body.to_vec(),
            })
        };
        runtime()
            .block_on(async { tokio::time::timeout(timeout, exchange).await })
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("no answer within {timeout:?}")))?
    }
}

/// A connector that dials one address whatever the URI names (the URI's
/// authority is the `:authority` of an HTTP/2 request).
#[derive(Clone)]
struct Fixed {
    addr: SocketAddr,
    inner: HttpConnector,
}

impl tower_service::Service<hyper::Uri> for Fixed {
    type Response = <HttpConnector as tower_service::Service<hyper::Uri>>::Response;
    type Error = <HttpConnector as tower_service::Service<hyper::Uri>>::Error;
    type Future = <HttpConnector as tower_service::Service<hyper::Uri>>::Future;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, _: hyper::Uri) -> Self::Future {
        let uri = hyper::Uri::try_from(format!("http://{}/", self.addr)).unwrap_or_default();
        self.inner.call(uri)
    }
}

/// An error and its sources, `: `-separated (hyper-util's client error
/// alone says only "client error (Connect)").
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(e) = source {
        text.push_str(&format!(": {e}"));
        source = e.source();
    }
    text
}

/// One response: status, headers, and the body (de-chunked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// Names as received (lower case from hyper and from Envoy).
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The first value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// Every value of header `name` (any case), in order.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str()).collect()
    }

    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON.
    ///
    /// # Errors
    /// The body is not JSON.
    pub fn json(&self) -> Result<serde_json::Value, serde_json::Error> {
        serde_json::from_slice(&self.body)
    }
}
