//! A token endpoint for dynamic-credential tests: a loopback
//! [`crate::server::Server`] (HTTP/1.1 and h2c) that answers every request
//! with the JSON the test set (an OAuth2 token answer, or a credential
//! service's document), counts the calls, and can be taken down (it then
//! answers 503) and brought back. [`TokenServer::start_numbered`] issues a
//! new token each call (`{n}` in the answer is the call's number), so a
//! test tells apart the tokens of separate calls.
//!
//! ```text
//! Envoy (keyswap root context) ──POST /oauth/token──▶ TokenServer ── {"access_token": …, "expires_in": …}
//! ```

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

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
}

/// A running token server; stops on drop.
pub struct TokenServer {
    server: Server,
    state: Arc<Mutex<State>>,
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
        let state = Arc::new(Mutex::new(State { answer: Some(answer.to_string()), numbered, calls: Vec::new() }));
        let shared = Arc::clone(&state);
        let server = Server::start("127.0.0.1:0", move |request| respond(&shared, request))?;
        Ok(Self { server, state })
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// Answers `answer` from now on (and is up).
    pub fn set_answer(&self, answer: &str) {
        if let Ok(mut s) = self.state.lock() {
            s.answer = Some(answer.to_string());
        }
    }

    /// Answers 503 from now on, until [`Self::set_answer`].
    pub fn take_down(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.answer = None;
        }
    }

    /// Every call so far.
    pub fn calls(&self) -> Vec<TokenCall> {
        self.state.lock().map(|s| s.calls.clone()).unwrap_or_default()
    }

    /// How many calls so far.
    pub fn count(&self) -> usize {
        self.state.lock().map(|s| s.calls.len()).unwrap_or_default()
    }
}

/// Records the call, then answers what the test set (or 503 when down).
fn respond(state: &Mutex<State>, request: Received) -> Reply {
    let Received { method, target: path, headers, body, .. } = request;
    let body = String::from_utf8_lossy(&body).into_owned();
    let answer = state.lock().ok().and_then(|mut s| {
        s.calls.push(TokenCall { at: Instant::now(), method, path, headers, body });
        let n = s.calls.len().to_string();
        s.answer.as_ref().map(|a| if s.numbered { a.replace("{n}", &n) } else { a.clone() })
    });
    match answer {
        Some(body) => Reply::json(200, body),
        None => Reply::json(503, r#"{"error":"temporarily_unavailable"}"#),
    }
}
