//! A loopback HTTP server for the tests' upstreams (the echo upstream, the
//! token endpoint / credential service, an STS, a module server), built on
//! hyper: HTTP/1.1 and HTTP/2 with prior knowledge (h2c) on the same port
//! (hyper-util's `auto`), as Envoy may speak either to an upstream.
//!
//! ```text
//! Server::start("127.0.0.1:0", |request: Received| Reply::json(200, "{}"))
//!   .addr()  ─ the bound port          drop ─ stops accepting, closes every connection
//! ```
//!
//! A handler is a plain closure from the whole request (body collected) to
//! the whole answer, run on tokio's blocking pool (it may sleep or wait);
//! hyper does the framing, keep-alive and chunking.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::sync::watch;

/// The runtime every test server and the [`crate::http`] client run on:
/// two workers, started at first use, kept for the process.
#[allow(clippy::expect_used, reason = "no test can run without it; the panic says why")]
pub(crate) fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("keyswap-tests-http")
            .enable_all()
            .build()
            .expect("the tests' tokio runtime starts")
    })
}

/// One request as the server received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    /// The request target: origin-form (`/p?q=1`) over HTTP/2, as sent
    /// over HTTP/1.1.
    pub target: String,
    /// `HTTP/1.1`, `HTTP/2.0`, ….
    pub version: String,
    /// Names lower-cased; repeats kept, grouped under their first
    /// occurrence (hyper's header map). Over HTTP/2 the `:authority` comes
    /// first as `host`, where HTTP/1.1 carries it.
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl Received {
    /// The first value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// A whole answer.
#[derive(Debug, Clone, Default)]
pub struct Reply {
    pub status: u16,
    /// Sent in order; a name or value hyper refuses makes the answer a 500.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    /// `status` with a JSON body.
    pub fn json(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Self { status, headers: vec![("content-type".into(), "application/json".into())], body: body.into() }
    }
}

/// What answers each request.
pub type Handler = dyn Fn(Received) -> Reply + Send + Sync;

/// A running server; stops on drop.
pub struct Server {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
}

impl Server {
    /// Listens on `addr` (`127.0.0.1:0` for any free port) and answers every
    /// request with `handler`, in the background.
    ///
    /// # Errors
    /// The address cannot be bound.
    pub fn start(addr: &str, handler: impl Fn(Received) -> Reply + Send + Sync + 'static) -> io::Result<Self> {
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let listener = {
            let _entered = runtime().enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        let (stop, stopped) = watch::channel(false);
        let handler: Arc<Handler> = Arc::new(handler);
        runtime().spawn(accept(listener, handler, stopped));
        Ok(Self { addr, stop })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until the process ends (for the `echo-upstream` program).
    pub fn wait(self) {
        loop {
            std::thread::park();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

async fn accept(listener: tokio::net::TcpListener, handler: Arc<Handler>, mut stopped: watch::Receiver<bool>) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stopped.changed() => return,
        };
        let Ok((stream, _)) = accepted else { continue };
        let _ = stream.set_nodelay(true);
        let (handler, mut stopped) = (Arc::clone(&handler), stopped.clone());
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let handler = Arc::clone(&handler);
                async move { Ok::<_, Infallible>(respond(handler, request).await) }
            });
            let builder = auto::Builder::new(TokioExecutor::new());
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = connection => {}
                _ = stopped.changed() => {}
            }
        });
    }
}

async fn respond(handler: Arc<Handler>, request: hyper::Request<Incoming>) -> hyper::Response<Full<Bytes>> {
    let (parts, body) = request.into_parts();
    let body = match body.collect().await {
        Ok(body) => body.to_bytes(),
        Err(e) => return plain(400, &format!("reading the body: {e}")),
    };
    let text = |v: &hyper::header::HeaderValue| String::from_utf8_lossy(v.as_bytes()).into_owned();
    let mut headers: Vec<(String, String)> = Vec::with_capacity(parts.headers.len() + 1);
    let h2 = parts.version == hyper::Version::HTTP_2;
    if let (true, Some(authority)) = (h2 && !parts.headers.contains_key("host"), parts.uri.authority()) {
        headers.push(("host".into(), authority.to_string()));
    }
    headers.extend(parts.headers.iter().map(|(n, v)| (n.as_str().to_string(), text(v))));
    let target = if h2 {
        parts.uri.path_and_query().map_or_else(|| "/".to_string(), ToString::to_string)
    } else {
        parts.uri.to_string()
    };
    let received =
        Received { method: parts.method.to_string(), target, version: format!("{:?}", parts.version), headers, body };
    // On the blocking pool: a handler may sleep or wait (a slow token
    // server, an upstream holding requests) without stalling the runtime's
    // two workers, which every server and client of the tests share.
    let reply = match tokio::task::spawn_blocking(move || handler(received)).await {
        Ok(reply) => reply,
        Err(e) => return plain(500, &format!("the handler failed: {e}")),
    };
    let mut response = hyper::Response::builder().status(reply.status);
    for (name, value) in &reply.headers {
        response = response.header(name.as_str(), value.as_str());
    }
    response.body(Full::new(Bytes::from(reply.body))).unwrap_or_else(|e| plain(500, &format!("the answer: {e}")))
}

fn plain(status: u16, text: &str) -> hyper::Response<Full<Bytes>> {
    let mut response = hyper::Response::new(Full::new(Bytes::from(text.to_string())));
    *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    response
}
