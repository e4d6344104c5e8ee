//! Test infrastructure for running keyswap in the real Envoy.
//!
//! ```text
//!  test ──http::Request──▶ Envoy (envoy::Envoy, generated bootstrap) ──▶ echo::Echo
//!   ▲   (hyper; raw::Request  listener ─ keyswap.wasm (V8) ─ router    │ (hyper, h1 or h2c)
//!   │    for hostile bytes)                                           │
//!   └──────────── http::Response (echo JSON: method, path, headers) ◀─┘
//! ```
//!
//! - [`echo`]: an upstream that answers with JSON of exactly the request it
//!   received, and adds response headers a request asks for. Also the
//!   `echo-upstream` binary that `scripts/demo` runs.
//! - [`server`]: the loopback server every test upstream is built on
//!   (hyper; HTTP/1.1 and h2c on one port; a handler closure; stops on drop).
//! - [`http`]: the client for well-formed requests and Envoy's admin
//!   (hyper; HTTP/1.1 or h2c, a new connection a request).
//! - [`raw`]: the one raw-socket module, for what no library sends: any
//!   request line, exact header bytes and order, hand-made framing, one
//!   never-reconnecting connection, and the routing tests' recorder.
//! - [`envoy`]: finds Envoy and the filter, generates bootstraps, runs
//!   Envoy until ready and the filter's configuration is proven loaded,
//!   kills it on drop and prints its log when a test fails.
//!
//! - [`ecds`], [`manifest`]: the keyswap configuration as an ECDS resource
//!   and as platform manifests, from `keyswap-envoy-config`, so the tests
//!   write the bytes `keyswap push` and `keyswap manifest` write.
//! - [`bench`]: what the Envoy benchmark and the soak share: the
//!   responder as a (pinned) process, Envoy's CPU time and memory from /proc.
//! - [`load`]: bounded background load over keep-alive connections.
//! - [`revocation`]: an Envoy fed by an ECDS file, pushes, and which worker
//!   did what when (from Envoy's log).
//! - [`rejecting`]: an echo upstream that answers 401 to one credential
//!   value, holding a burst of such requests until all are in flight.
//! - [`routing`]: recording upstreams (a cluster each, trailers included),
//!   gateways of several virtual hosts with keyswap in both stages, an
//!   HTTP/2 relay, and raw HTTP/1.1 and curl HTTP/2 clients: what reached
//!   which upstream.
//! - [`token`]: a token endpoint / credential service for dynamic
//!   credentials: answers what the test sets, counts calls, can go down.
//!
//! The tests themselves are one binary, `tests/all/`, a module an area.

/// The ECDS resource and the manifests, exactly as the `keyswap` CLI
/// makes them.
pub use keyswap_envoy_config::{ecds, manifest};
pub mod bench;
pub mod echo;
pub mod envoy;
pub mod http;
pub mod load;
pub mod raw;
pub mod rejecting;
pub mod revocation;
pub mod routing;
pub mod server;
pub mod token;
