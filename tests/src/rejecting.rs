//! An upstream that rejects one credential: the echo upstream
//! ([`crate::echo::answer`]), except that a request whose `authorization`
//! is the value the test named is answered `401` (what an API does with a
//! revoked or wrong token), so a test sees what keyswap does with a
//! dynamic credential the upstream refuses.
//!
//! ```text
//! Envoy ──authorization: Bearer tok-1──▶ Rejecting ── 401 {"error":"invalid_token"}
//!       ──authorization: Bearer tok-2──▶           ── 200 echo JSON
//! ```
//!
//! A burst: with `hold` > 1, the first `hold` rejected requests are each
//! held until all `hold` have arrived (at most [`HOLD_TIMEOUT`]), so that
//! many requests carrying the value are in flight on Envoy's workers at
//! once and their 401s arrive together, as when a token is revoked under
//! load. Handlers run on the blocking pool ([`crate::server`]), so a held
//! request stalls no other connection.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::server::{Received, Reply, Server};

/// How long a held request waits for the rest of its burst.
pub const HOLD_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
struct State {
    /// The `authorization` value answered 401.
    rejected: Option<String>,
    /// How many rejected requests to hold until all have arrived.
    hold: usize,
    /// Rejected requests received.
    arrived: usize,
    /// When the first 401 was answered.
    first_answered: Option<Instant>,
}

/// A running rejecting upstream; stops on drop.
pub struct Rejecting {
    server: Server,
    state: Arc<(Mutex<State>, Condvar)>,
}

impl Rejecting {
    /// Listens on a free loopback port; echoes every request until
    /// [`Self::reject`].
    ///
    /// # Errors
    /// The port cannot be bound.
    pub fn start() -> io::Result<Self> {
        let state = Arc::new((Mutex::new(State::default()), Condvar::new()));
        let shared = Arc::clone(&state);
        let server = Server::start("127.0.0.1:0", move |request| respond(&shared, request))?;
        Ok(Self { server, state })
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// From now on answers 401 to every request whose `authorization` is
    /// `authorization`, holding the first `hold` of them until all `hold`
    /// are in flight (1: no holding).
    pub fn reject(&self, authorization: &str, hold: usize) {
        if let Ok(mut s) = self.state.0.lock() {
            *s = State { rejected: Some(authorization.to_string()), hold, ..State::default() };
        }
    }

    /// How many requests carried the rejected value (each answered 401).
    pub fn rejected(&self) -> usize {
        self.state.0.lock().map(|s| s.arrived).unwrap_or_default()
    }

    /// When the first 401 for the rejected value was answered (keyswap
    /// can drop the value no earlier).
    pub fn first_rejected_at(&self) -> Option<Instant> {
        self.state.0.lock().ok().and_then(|s| s.first_answered)
    }
}

fn respond(state: &(Mutex<State>, Condvar), request: Received) -> Reply {
    let (lock, arrived) = state;
    let Ok(mut s) = lock.lock() else {
        return Reply::json(500, r#"{"error":"state"}"#);
    };
    if s.rejected.is_none() || request.header("authorization") != s.rejected.as_deref() {
        drop(s);
        return crate::echo::answer(request);
    }
    s.arrived += 1;
    if s.arrived < s.hold {
        // Wait for the rest of the burst.
        let hold = s.hold;
        s = match arrived.wait_timeout_while(s, HOLD_TIMEOUT, |s| s.arrived < hold) {
            Ok((s, _)) => s,
            Err(poisoned) => poisoned.into_inner().0,
        };
    } else {
        arrived.notify_all();
    }
    s.first_answered.get_or_insert_with(Instant::now);
    drop(s);
    let mut reply = Reply::json(401, r#"{"error":"invalid_token"}"#);
    reply.headers.push(("www-authenticate".into(), r#"Bearer error="invalid_token""#.into()));
    reply
}
