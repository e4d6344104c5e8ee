//! Bounded background load over keep-alive connections: a few threads, each
//! holding ONE connection for its whole run and sending the same request
//! again and again, so a test sees every answer and every dropped
//! connection (a thread never reconnects: an I/O error ends it and is
//! recorded).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use crate::http::{Request, Response};
// Raw on purpose: each thread must hold ONE connection and never
// reconnect (the revocation tests read which connection Envoy closed and
// when), and time every request on its own; wrk/h2load report aggregates
// and a pooled client reconnects silently.
use crate::raw::KeepAlive;

/// One request of the load: when it was sent, how long it took, and what
/// came back (an I/O error as text).
#[derive(Debug, Clone)]
pub struct Sample {
    pub connection: usize,
    pub sent: SystemTime,
    pub latency: Duration,
    pub result: Result<Response, String>,
}

/// Limits of a [`Load`]: it stops at whichever comes first.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub connections: usize,
    /// Pause between one answer and the next request, per connection.
    pub pause: Duration,
    pub max_requests_per_connection: usize,
    pub max_duration: Duration,
}

/// A running load; [`Load::stop`] ends it and returns every sample.
pub struct Load {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Sample>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    /// Opens `bounds.connections` connections to `addr` and starts sending
    /// `request` on each.
    ///
    /// # Errors
    /// A connection could not be opened.
    pub fn start(addr: SocketAddr, request: &Request, bounds: Bounds) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        for connection in 0..bounds.connections {
            let mut conn = KeepAlive::connect(addr)?;
            let (stop, samples, request) = (stop.clone(), samples.clone(), crate::raw::Request::from(request));
            threads.push(std::thread::spawn(move || {
                let started = Instant::now();
                for _ in 0..bounds.max_requests_per_connection {
                    if stop.load(Ordering::SeqCst) || started.elapsed() > bounds.max_duration {
                        break;
                    }
                    let sent = SystemTime::now();
                    let clock = Instant::now();
                    let result = conn.send(&request).map_err(|e| e.to_string());
                    let failed = result.is_err();
                    let sample = Sample { connection, sent, latency: clock.elapsed(), result };
                    if let Ok(mut all) = samples.lock() {
                        all.push(sample);
                    }
                    if failed {
                        break;
                    }
                    std::thread::sleep(bounds.pause);
                }
            }));
        }
        Ok(Self { stop, samples, threads })
    }

    /// Samples so far.
    pub fn count(&self) -> usize {
        self.samples.lock().map_or(0, |s| s.len())
    }

    /// Stops every connection and returns all samples, in the order taken.
    pub fn stop(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::SeqCst);
        for thread in self.threads {
            let _ = thread.join();
        }
        let mut samples = self.samples.lock().map(|s| s.clone()).unwrap_or_default();
        samples.sort_by_key(|s| s.sent);
        samples
    }
}

/// The `p`-th percentile (0-100) of `values`, nearest rank; `None` when empty.
pub fn percentile(values: &[Duration], p: f64) -> Option<Duration> {
    let mut sorted = values.to_vec();
    sorted.sort();
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let ms: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&ms, 50.0), Some(Duration::from_millis(50)));
        assert_eq!(percentile(&ms, 99.0), Some(Duration::from_millis(99)));
        assert_eq!(percentile(&ms, 100.0), Some(Duration::from_millis(100)));
        assert_eq!(percentile(&ms, 0.0), Some(Duration::from_millis(1)));
        assert_eq!(percentile(&[], 50.0), None);
    }
}
