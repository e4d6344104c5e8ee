//! A token endpoint for dynamic-credential tests: loopback HTTP/1.1 that
//! answers every request with the JSON the test set (an OAuth2 token
//! answer, or a credential service's document), counts the calls, and can
//! be taken down (it then answers 503) and brought back.
//!
//! ```text
//! Envoy (keyswap root context) ──POST /oauth/token──▶ TokenServer ── {"access_token": …, "expires_in": …}
//! ```

use std::io::{self, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::http::{read_request, ServerRequest};

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
    calls: Vec<TokenCall>,
}

/// A running token server; stops accepting on drop.
pub struct TokenServer {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl TokenServer {
    /// Listens on a free loopback port, answering `answer` (a JSON text).
    ///
    /// # Errors
    /// The port cannot be bound.
    pub fn start(answer: &str) -> io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State { answer: Some(answer.to_string()), calls: Vec::new() }));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, f) = (Arc::clone(&state), Arc::clone(&stop));
        let acceptor = std::thread::Builder::new().name(format!("token-{}", addr.port())).spawn(move || {
            for stream in listener.incoming() {
                if f.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                let s = Arc::clone(&s);
                let _ = std::thread::Builder::new().name("token-conn".into()).spawn(move || {
                    let _ = connection(stream, &s);
                });
            }
        })?;
        Ok(Self { addr, state, stop, acceptor: Some(acceptor) })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
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

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

fn connection(stream: TcpStream, state: &Mutex<State>) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let Some(ServerRequest { method, path, headers, body, .. }) = read_request(&mut reader)? else {
            return Ok(());
        };
        let answer = {
            let mut s = state.lock().map_err(|_| io::Error::other("poisoned"))?;
            let body = String::from_utf8_lossy(&body).into_owned();
            s.calls.push(TokenCall { at: Instant::now(), method, path, headers, body });
            s.answer.clone()
        };
        let (status, body) = match answer {
            Some(body) => ("200 OK", body),
            None => ("503 Service Unavailable", r#"{"error":"temporarily_unavailable"}"#.to_string()),
        };
        let out = format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        writer.write_all(out.as_bytes())?;
        writer.flush()?;
    }
}
