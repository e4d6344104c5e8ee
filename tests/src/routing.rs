//! Routing agreement through the real Envoy: what reached which upstream.
//!
//! ```text
//!  test ─h1 (raw, trailers) / h2 (curl)─▶ Envoy: listener ─ keyswap ─ router ─▶ cluster ─ keyswap ─▶ Recorder (one a cluster)
//!                                                                       └─ h2 ─▶ relay Envoy ─ h1 + trailers ─▶ Recorder
//! ```
//!
//! - [`Recorder`] (raw, in [`crate::raw::upstream`]): an HTTP/1.1 upstream that keeps every request it
//!   received (headers, target, body and trailers) under its cluster's
//!   name, reflects every request header back as `x-r-<name>` (the
//!   target as `x-r-target`, a Basic `authorization` decoded as
//!   `x-r-basic-decoded` if asked), as a careless upstream would, and answers a
//!   redirect, trailers or a `TRACE` echo when a request asks for them
//!   ([`REDIRECT_HEADER`], [`TRAILERS_HEADER`]).
//! - [`bootstrap`]: a gateway of several virtual hosts, its listeners
//!   (`codec_type: AUTO`, path normalisation, underscore handling and
//!   HTTP/1.1 trailers each optional) and one cluster a [`Recorder`], with
//!   keyswap placed as [`Placement`] says.
//! - [`relay`]: an Envoy without keyswap that accepts HTTP/2 and forwards
//!   to a recorder over HTTP/1.1 with trailers, so a gateway cluster can
//!   speak HTTP/2 to its upstream.
//! - [`send_h1`] (raw bytes, response trailers kept; [`crate::raw::upstream`]) and [`send_h2`]
//!   (curl's HTTP/2 with prior knowledge, many requests a process).

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use serde_json::json;

use crate::envoy::{self, keyswap_filter, Listener};
pub use crate::raw::upstream::{
    send_h1, Received, Recorder, Reply, BASIC_DECODED_HEADER, EARLY_HINTS_HEADER, REDIRECT_HEADER, RESPONSE_TRAILERS,
    TRAILERS_HEADER,
};

/// One HTTP/2 request for [`send_h2`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct H2Request {
    pub method: String,
    /// `:path`, sent as is.
    pub path: String,
    /// `:authority` (curl sends a `host` header given to it as that).
    pub authority: String,
    pub headers: Vec<(String, String)>,
}

/// Sends `requests` over HTTP/2 with prior knowledge to `addr` with curl,
/// one process for all of them (each a connection of its own), and
/// returns an answer for each: status 0 when curl got none.
///
/// curl and not the crate's hyper client (`crate::http`), on purpose: these
/// are an attacker's requests, and curl sends each `:path` and
/// `:authority` byte for byte (`--path-as-is`, `--request-target`, a
/// `host` header as `:authority`), where hyper builds both from an
/// `http::Uri` that validates and normalises them first. The setup
/// installs curl (Debian's, with HTTP/2; the routing tests fail without
/// it, see [`curl_has_http2`]).
///
/// # Errors
/// curl cannot be run.
pub fn send_h2(addr: SocketAddr, requests: &[H2Request]) -> Result<Vec<Reply>, String> {
    let mut args: Vec<String> = Vec::new();
    for (i, r) in requests.iter().enumerate() {
        if i > 0 {
            args.push("--next".into());
        }
        // A name of its own for each request, so curl opens a connection
        // each (curl 7.88 fails a second request on a reused prior-knowledge
        // HTTP/2 connection).
        let name = format!("r{i}.keyswap.invalid");
        let url = format!("http://{name}:{}/", addr.port());
        args.extend(["--resolve".into(), format!("{name}:{}:{}", addr.port(), addr.ip())]);
        args.extend(["--http2-prior-knowledge", "-s", "--path-as-is", "--max-time", "15", "-D", "-"].map(String::from));
        args.extend(["-X".into(), r.method.clone(), "--request-target".into(), r.path.clone()]);
        args.extend(["-H".into(), format!("host: {}", r.authority)]);
        for (n, v) in &r.headers {
            args.extend(["-H".into(), format!("{n}: {v}")]);
        }
        args.extend(["-w".into(), format!("\n{}\n", end_marker(i)), url]);
    }
    let output = Command::new("curl").args(&args).output().map_err(|e| format!("curl: {e}"))?;
    let mut out = output.stdout.as_slice();
    let mut replies = Vec::with_capacity(requests.len());
    for i in 0..requests.len() {
        let marker = format!("\n{}\n", end_marker(i));
        let Some(at) = find(out, marker.as_bytes()) else {
            replies.push(Reply::default());
            continue;
        };
        replies.push(parse_curl(&out[..at]));
        out = &out[at + marker.len()..];
    }
    Ok(replies)
}

fn end_marker(i: usize) -> String {
    format!("@@keyswap-routing-end-{i}@@")
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// curl's `-D -` output and body; informational (1xx) blocks are skipped
/// but kept in `raw`.
fn parse_curl(raw: &[u8]) -> Reply {
    let mut rest = raw;
    for _ in 0..10 {
        let Some(split) = find(rest, b"\r\n\r\n") else {
            break;
        };
        let text = String::from_utf8_lossy(&rest[..split]);
        let mut lines = text.lines();
        let status: u16 = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|s| s.parse().ok()).unwrap_or(0);
        if (100..200).contains(&status) {
            rest = &rest[split + 4..];
            continue;
        }
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        return Reply { status, headers, body: rest[split + 4..].to_vec(), trailers: Vec::new(), raw: raw.to_vec() };
    }
    Reply { raw: raw.to_vec(), ..Reply::default() }
}

/// True when curl can speak HTTP/2 here.
pub fn curl_has_http2() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        Command::new("curl").arg("--version").output().is_ok_and(|o| {
            String::from_utf8_lossy(&o.stdout).lines().any(|l| l.starts_with("Features:") && l.contains("HTTP2"))
        })
    })
}

// ---- bootstraps -----------------------------------------------------------

/// How a cluster speaks to its upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    /// HTTP/1.1 with `enable_trailers`.
    Http1Trailers,
    Http2,
}

/// A cluster of the gateway and its one upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSpec {
    pub name: String,
    pub upstream: SocketAddr,
    pub protocol: Protocol,
    /// Without keyswap's upstream filter even in [`Placement::TwoStages`]
    /// (a cluster deployed against the documentation).
    pub bare: bool,
}

/// A listener of the gateway: all serve the same virtual hosts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListenerSpec {
    pub name: String,
    /// `normalize_path` and `merge_slashes`.
    pub normalize: bool,
    /// `headers_with_underscores_action: REJECT_REQUEST` (else Envoy's
    /// default, `ALLOW`).
    pub reject_underscores: bool,
    /// `http_protocol_options.enable_trailers` (HTTP/1.1 downstream).
    pub trailers: bool,
}

/// Where keyswap runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// The listener's HTTP filter and every cluster's upstream filter.
    TwoStages,
    /// The listener's HTTP filter only: how keyswap was deployed before
    /// issue 13.
    ListenerOnly,
}

impl Placement {
    /// `ListenerOnly` when `KEYSWAP_PLACEMENT=listener-only`: to run the
    /// same tests against a filter built before the two stages.
    pub fn from_env() -> Self {
        match std::env::var("KEYSWAP_PLACEMENT").as_deref() {
            Ok("listener-only") => Self::ListenerOnly,
            _ => Self::TwoStages,
        }
    }
}

fn cluster_json(c: &ClusterSpec, filter: Option<&serde_json::Value>) -> serde_json::Value {
    let protocol = match c.protocol {
        Protocol::Http1 => json!({"http_protocol_options": {}}),
        Protocol::Http1Trailers => json!({"http_protocol_options": {"enable_trailers": true}}),
        Protocol::Http2 => json!({"http2_protocol_options": {}}),
    };
    envoy::cluster_speaking(&c.name, c.upstream, protocol, filter)
}

fn hcm(l: &ListenerSpec, virtual_hosts: &serde_json::Value, filters: Vec<serde_json::Value>) -> serde_json::Value {
    let mut options = serde_json::Map::new();
    options.insert("codec_type".into(), json!("AUTO"));
    if l.normalize {
        options.insert("normalize_path".into(), json!(true));
        options.insert("merge_slashes".into(), json!(true));
    }
    if l.reject_underscores {
        options.insert(
            "common_http_protocol_options".into(),
            json!({"headers_with_underscores_action": "REJECT_REQUEST"}),
        );
    }
    if l.trailers {
        options.insert("http_protocol_options".into(), json!({"enable_trailers": true}));
    }
    envoy::http_listener_hosts(&l.name, virtual_hosts.clone(), filters, options)
}

/// A gateway: `listeners` all serving `virtual_hosts` (Envoy's
/// `route_config.virtual_hosts`), `clusters`, keyswap with `config` loaded
/// from `wasm` and placed as `placement` says.
pub fn bootstrap(
    listeners: &[ListenerSpec],
    virtual_hosts: &serde_json::Value,
    clusters: &[ClusterSpec],
    config: &str,
    wasm: &Path,
    placement: Placement,
) -> serde_json::Value {
    let filter =
        keyswap_filter(&Listener { name: "gateway".into(), config: config.into(), ..Listener::default() }, wasm);
    let upstream_filter = (placement == Placement::TwoStages).then_some(&filter);
    let listeners: Vec<_> = listeners.iter().map(|l| hcm(l, virtual_hosts, vec![filter.clone()])).collect();
    let clusters: Vec<_> =
        clusters.iter().map(|c| cluster_json(c, if c.bare { None } else { upstream_filter })).collect();
    envoy::bootstrap(listeners, clusters)
}

/// An Envoy without keyswap: for each `(name, upstream)` a listener `name`
/// that takes HTTP/2 (or HTTP/1.1) and forwards everything to `upstream`
/// over HTTP/1.1 with trailers.
pub fn relay(targets: &[(String, SocketAddr)]) -> serde_json::Value {
    let mut listeners = Vec::new();
    let mut clusters = Vec::new();
    for (name, upstream) in targets {
        let spec = ListenerSpec { name: name.clone(), trailers: true, ..ListenerSpec::default() };
        let hosts = json!([{"name": "all", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "route": {"cluster": name}}]}]);
        listeners.push(hcm(&spec, &hosts, Vec::new()));
        let c = ClusterSpec { name: name.clone(), upstream: *upstream, protocol: Protocol::Http1Trailers, bare: true };
        clusters.push(cluster_json(&c, None));
    }
    envoy::bootstrap(listeners, clusters)
}
