//! A token endpoint for dynamic-credential tests: a loopback
//! [`crate::server::Server`] (HTTP/1.1 and h2c) that answers every request
//! with the JSON the test set (an OAuth2 token answer, or a credential
//! service's document), counts the calls, and can be taken down (it then
//! answers 503) and brought back. [`TokenServer::start_numbered`] issues a
//! new token each call (`{n}` in the answer is the call's number), so a
//! test tells apart the tokens of separate calls. [`TokenServer::hold`]
//! keeps the calls that arrive waiting (recorded, unanswered) until
//! [`TokenServer::release`], so a test sees what keyswap serves while a
//! refresh is in flight.
//!
//! ```text
//! Envoy (keyswap root context) ──POST /oauth/token──▶ TokenServer ── {"access_token": …, "expires_in": …}
//! ```

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::server::{Received, Reply, Server};

/// One call the server received.
#[derive(Debug, Clone)]
pub struct TokenCall {
    pub at: Instant,
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

#[derive(Debug)]
struct State {
    /// The answer body; `None`: down (503).
    answer: Option<String>,
    /// `{n}` in the answer is replaced by the call's number (from 1).
    numbered: bool,
    calls: Vec<TokenCall>,
    /// Calls wait until this is false ([`TokenServer::hold`]).
    held: bool,
}

/// How long a held call waits for [`TokenServer::release`] at most.
pub const HOLD_TIMEOUT: Duration = Duration::from_secs(30);

/// A running token server; stops on drop.
pub struct TokenServer {
    server: Server,
    state: Arc<(Mutex<State>, Condvar)>,
}

impl TokenServer {
    /// Listens on a free loopback port, answering `answer` (a JSON text).
    ///
    /// # Errors
    /// The port cannot be bound.
    pub fn start(answer: &str) -> io::Result<Self> {
        Self::serve(answer, false)
    }

    /// [`Self::start`], answering each call with `answer` where every
    /// `{n}` is the call's number: `tok-{n}` issues `tok-1`, `tok-2`, ….
    ///
    /// # Errors
    /// The port cannot be bound.
    pub fn start_numbered(answer: &str) -> io::Result<Self> {
        Self::serve(answer, true)
    }

    fn serve(answer: &str, numbered: bool) -> io::Result<Self> {
        let state = State { answer: Some(answer.to_string()), numbered, calls: Vec::new(), held: false };
        let state = Arc::new((Mutex::new(state), Condvar::new()));
        let shared = Arc::clone(&state);
        let server = Server::start("127.0.0.1:0", move |request| respond(&shared, request))?;
        Ok(Self { server, state })
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// Answers `answer` from now on (and is up).
    pub fn set_answer(&self, answer: &str) {
        if let Ok(mut s) = self.state.0.lock() {
            s.answer = Some(answer.to_string());
        }
    }

    /// Answers 503 from now on, until [`Self::set_answer`].
    pub fn take_down(&self) {
        if let Ok(mut s) = self.state.0.lock() {
            s.answer = None;
        }
    }

    /// Calls from now on are recorded when they arrive and answered only
    /// at [`Self::release`] (or after [`HOLD_TIMEOUT`]), with the answer
    /// set then.
    pub fn hold(&self) {
        if let Ok(mut s) = self.state.0.lock() {
            s.held = true;
        }
    }

    /// Answers the held calls, and every call from now on at once.
    pub fn release(&self) {
        if let Ok(mut s) = self.state.0.lock() {
            s.held = false;
        }
        self.state.1.notify_all();
    }

    /// Every call so far.
    pub fn calls(&self) -> Vec<TokenCall> {
        self.state.0.lock().map(|s| s.calls.clone()).unwrap_or_default()
    }

    /// How many calls so far.
    pub fn count(&self) -> usize {
        self.state.0.lock().map(|s| s.calls.len()).unwrap_or_default()
    }
}

/// Records the call, waits while held, then answers what the test set
/// (or 503 when down). Handlers run on the blocking pool
/// ([`crate::server`]), so a held call stalls no other connection.
fn respond(state: &(Mutex<State>, Condvar), request: Received) -> Reply {
    let (lock, released) = state;
    let Received { method, target: path, headers, body, .. } = request;
    let body = String::from_utf8_lossy(&body).into_owned();
    let Ok(mut s) = lock.lock() else {
        return Reply::json(500, r#"{"error":"state"}"#);
    };
    s.calls.push(TokenCall { at: Instant::now(), method, path, headers, body });
    let n = s.calls.len().to_string();
    if s.held {
        s = match released.wait_timeout_while(s, HOLD_TIMEOUT, |s| s.held) {
            Ok((s, _)) => s,
            Err(poisoned) => poisoned.into_inner().0,
        };
    }
    match s.answer.as_ref().map(|a| if s.numbered { a.replace("{n}", &n) } else { a.clone() }) {
        Some(body) => Reply::json(200, body),
        None => Reply::json(503, r#"{"error":"temporarily_unavailable"}"#),
    }
}
