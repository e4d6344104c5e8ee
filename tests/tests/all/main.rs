//! keyswap in the real Envoy: one test binary, a module an area.
//!
//! - [`broker`]: the per-client fetch with two workers: clients
//!   interleaved, each gets only its own value, one call per client.
//! - [`conformance`]: runner `envoy`, the whole conformance suite through Envoy.
//! - [`credentials`]: dynamic credentials (oauth2, token exchange, fetch)
//!   with a local token server: first token, rotation, outage and expiry,
//!   two workers, a token the upstream answers 401 to.
//! - [`gateway`]: named end-to-end behaviours the suite cannot express (the
//!   shipped `envoy.yaml`, refusing to start, environment credentials,
//!   surviving hostile traffic).
//! - [`keys`]: several keys per client: `keyswap rotate` under load (both
//!   keys in the grace, the old one refused after it), `keyswap revoke
//!   --key` of one key; client metadata sent upstream, client-sent copies
//!   never, key ids and metadata in Envoy's access log.
//! - [`limits`]: rate limits and quotas with two workers: exactly N per
//!   window under 32 connections, clients never sharing a bucket, a push
//!   keeping the counts of an unchanged limit.
//! - [`obo`]: on-behalf-of token exchange with two workers and a loopback
//!   STS: 50 subjects and 50 broker clients interleaved, each request
//!   carrying its own subject's token, one exchange per (subject,
//!   audience); laziness; JWT expiry, refusals, an STS outage.
//! - [`per_client`]: per-client credentials (`clients[].inject`) attacked
//!   from outside: hundreds of interleaved requests each carrying exactly
//!   its own client's credentials, smuggling under any injected name,
//!   another client's route, each client's own OAuth2 token and its 401.
//! - [`revocation`]: configuration pushed through ECDS while Envoy serves:
//!   a revoked key stops on every worker under load, a bad resource changes
//!   nothing, `keyswap push` confirms with Envoy.
//! - [`routing`]: issue 13's six classes and the routing agreement: a
//!   credential reaches only a cluster its route is bound to, as Envoy
//!   finally routes; thousands of generated requests judged by one oracle.
//! - [`platforms`]: the manifests `keyswap manifest` makes for Istio and
//!   Envoy Gateway, run by Envoy in the shape each control plane gives
//!   them: credentials, other routes, revocation, fail-closed faults.
//! - [`leaks`]: Envoy at `trace`; no key, environment credential, client
//!   secret or issued token in its log, local responses, `/config_dump`,
//!   `/stats` or what `keyswap push` prints.
//! - [`image`]: shipping the module: `scripts/image`'s plugin image pushed
//!   to a real registry with skopeo and judged by Istio's and Envoy
//!   Gateway's fetcher rules; Envoy loading keyswap from an http URL with
//!   its sha256, and failing closed on a wrong one.
//! - [`validate`]: `envoy --mode validate` on every shipped Envoy
//!   configuration, keyswap's configuration loaded in each (`scripts/test`
//!   runs it first).
//!
//! Needs Envoy and the built filter: run `scripts/setup` first.

// All of this binary is test code: its helpers fail the test the way
// `#[test]` functions do (clippy.toml allows these in tests already).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod broker;
mod conformance;
mod credentials;
mod gateway;
mod image;
mod keys;
mod leaks;
mod limits;
mod obo;
mod operations;
mod per_client;
mod platforms;
mod revocation;
mod routing;
mod validate;

/// Lowercase hex SHA-256 of `data`, as `key_sha256` and `sha256` fields
/// take it.
fn sha256_hex(data: impl AsRef<[u8]>) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}
