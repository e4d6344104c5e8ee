//! Audit lines for denials, rate-limited per worker so that a flood of bad
//! keys cannot flood the log. A line names the reason, the route and the
//! client when known; never a key or a credential.

use keyswap_policy::Denial;

/// Logged at error level when the fail-closed configuration
/// (`"refuse_all": true`) loads: what Envoy serves when it has no usable
/// configuration, so an operator sees it at once.
pub const REFUSING_ALL: &str =
    "keyswap: refusing every request (503 configuration_unavailable): this is the fail-closed \
                                configuration (\"refuse_all\": true), served when no usable configuration was \
                                delivered; push one";

/// Denial lines a worker writes per second at most.
pub const LINES_PER_SECOND: u32 = 10;

/// A fixed one-second window: up to [`LINES_PER_SECOND`] lines, then
/// silence, and the next line written says how many were left out.
#[derive(Debug, Default)]
pub struct Limiter {
    second: i64,
    written: u32,
    suppressed: u64,
}

impl Limiter {
    /// Whether to write a line at `now` (Unix seconds); `Some(n)` means
    /// yes, and `n` lines were suppressed since the last one written.
    pub fn admit(&mut self, now: i64) -> Option<u64> {
        if now != self.second {
            self.second = now;
            self.written = 0;
        }
        if self.written >= LINES_PER_SECOND {
            self.suppressed += 1;
            return None;
        }
        self.written += 1;
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// The audit line for a denial; `key=` (the id of one of the client's
/// `keys`, never the key) only when there is one.
pub fn denial_line(denial: &Denial<'_>, suppressed: u64) -> String {
    let mut line = format!(
        "keyswap: denied reason={} status={} route={} client={}",
        denial.reason.code(),
        denial.reason.status(),
        denial.route.unwrap_or("-"),
        denial.client.unwrap_or("-"),
    );
    if let Some(key) = denial.key {
        line.push_str(" key=");
        line.push_str(key);
    }
    if let Some(refusal) = &denial.limit {
        // `limit=route-rate 10/minute burst 2 retry_after=6`
        line.push_str(&format!(" limit={} retry_after={}", refusal.limit, refusal.retry_after_seconds()));
    }
    if suppressed > 0 {
        line.push_str(&format!(" (suppressed {suppressed} earlier denial lines)"));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyswap_policy::limit::{Kind, Limit, Refusal, Scope, Window};
    use keyswap_policy::DenialReason;

    #[test]
    fn admits_a_bounded_number_per_second_and_reports_the_rest() {
        let mut limiter = Limiter::default();
        let admitted = (0..25).filter(|_| limiter.admit(100).is_some()).count();
        assert_eq!(admitted, LINES_PER_SECOND as usize);
        assert_eq!(limiter.admit(101), Some(25 - u64::from(LINES_PER_SECOND)));
        assert_eq!(limiter.admit(101), Some(0));
    }

    #[test]
    fn lines_name_reason_route_and_client() {
        let denial = Denial {
            reason: DenialReason::RouteForbidden,
            route: Some("openai"),
            client: Some("team-a"),
            key: None,
            metadata: None,
            limit: None,
        };
        assert_eq!(
            denial_line(&denial, 0),
            "keyswap: denied reason=route_forbidden status=403 route=openai client=team-a"
        );
        let keyed = Denial { key: Some("k-2026-06"), reason: DenialReason::ExpiredKey, ..denial };
        assert_eq!(
            denial_line(&keyed, 0),
            "keyswap: denied reason=expired_key status=401 route=openai client=team-a key=k-2026-06"
        );
        let unknown = Denial {
            reason: DenialReason::InvalidKey,
            route: Some("openai"),
            client: None,
            key: None,
            metadata: None,
            limit: None,
        };
        assert_eq!(
            denial_line(&unknown, 3),
            "keyswap: denied reason=invalid_key status=401 route=openai client=- (suppressed 3 earlier denial lines)"
        );
        let limit = Limit::new(Kind::Rate { requests: 10, window: Window::Minute, burst: 2 }, Scope::Route);
        let limited = Denial {
            reason: DenialReason::RateLimited,
            route: Some("openai"),
            client: Some("team-a"),
            key: Some("k-2026-06"),
            metadata: None,
            limit: Some(Refusal { limit: &limit, retry_after_ms: 5_001 }),
        };
        assert_eq!(
            denial_line(&limited, 0),
            "keyswap: denied reason=rate_limited status=429 route=openai client=team-a key=k-2026-06 \
             limit=route-rate 10/minute burst 2 retry_after=6"
        );
    }
}
