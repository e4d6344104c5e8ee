//! The `gateway` world's exports: `wasi:http/incoming-handler` and
//! `gateway-config`. Per request: read the headers once, ask the policy,
//! then answer the denial locally, or send the edited request to the
//! route's upstream and stream both bodies through `wasi:io` splices (the
//! bytes are moved by the host, a bounded chunk at a time, and never held
//! here).

use std::cell::RefCell;
use std::rc::Rc;

use keyswap_policy::{Decision, RequestView};

use crate::bindings::http::{
    Fields, IncomingBody, IncomingRequest, Method, OutgoingBody, OutgoingRequest, OutgoingResponse,
    ResponseOutparam, Scheme,
};
use crate::bindings::streams::{InputStream, OutputStream, StreamError};
use crate::bindings::{gateway_config, outgoing_handler, policy as wit};
use crate::config::{GatewayConfig, CONFIG_VAR};

/// The most bytes one splice moves.
const CHUNK: u64 = 256 * 1024;

/// Connection-level headers, never forwarded in either direction (RFC 9110,
/// 7.6.1), and `host`, which the upstream's authority replaces.
const HOP_BY_HOP: [&str; 8] =
    ["connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "host"];

thread_local! {
    /// The instance's gateway configuration, loaded on first use.
    static GATEWAY: RefCell<Option<Rc<GatewayConfig>>> = const { RefCell::new(None) };
}

/// The configuration, loaded from the environment the first time.
fn gateway() -> Result<Rc<GatewayConfig>, keyswap_policy::ConfigError> {
    if let Some(loaded) = GATEWAY.with(|g| g.borrow().clone()) {
        return Ok(loaded);
    }
    let env = crate::bindings::wasi::cli::environment::get_environment();
    let lookup = |name: &str| env.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
    let Some(text) = lookup(CONFIG_VAR) else {
        return Err(keyswap_policy::ConfigError {
            path: "$".to_string(),
            message: format!("{CONFIG_VAR} is not set in the component's environment"),
        });
    };
    let loaded = Rc::new(GatewayConfig::from_json(&text, &lookup)?);
    GATEWAY.with(|g| *g.borrow_mut() = Some(loaded.clone()));
    Ok(loaded)
}

impl gateway_config::Guest for crate::Component {
    fn check() -> Result<wit::Summary, wit::ConfigError> {
        crate::install_panic_hook();
        match gateway() {
            Ok(config) => Ok(crate::filter::summary(&config.policy)),
            Err(e) => Err(wit::ConfigError { path: e.path, message: e.message }),
        }
    }
}

impl crate::bindings::exports::wasi::http::incoming_handler::Guest for crate::Component {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        crate::install_panic_hook();
        let config = match gateway() {
            Ok(config) => config,
            Err(e) => {
                eprintln!("keyswap: error: configuration refused: {e}");
                let body = r#"{"error":"not_configured","message":"The gateway has no keyswap configuration."}"#;
                return respond(out, 500, &[("content-type", "application/json")], body);
            }
        };
        // The request as a proxy-wasm host sees it: pseudo-headers, then the
        // fields with lower-case names, so the policy's own `from_headers`
        // and `apply` do all the reading and editing.
        let method = request.method();
        let mut headers = vec![
            (":method".to_string(), method_name(&method).as_bytes().to_vec()),
            (":path".to_string(), request.path_with_query().unwrap_or_default().into_bytes()),
            (":authority".to_string(), request.authority().unwrap_or_default().into_bytes()),
        ];
        let fields = request.headers();
        headers.extend(fields.entries().into_iter().map(|(n, v)| (n.to_ascii_lowercase(), v)));
        drop(fields);
        let view = RequestView::from_headers(None, &headers);
        let forward = match config.policy.decide(&view, &crate::now) {
            Decision::Forward(forward) => forward,
            Decision::Deny(denial) => {
                let reason = denial.reason;
                return respond(out, reason.status(), reason.headers(), &reason.body());
            }
        };
        let Some(upstream) = config.upstream(forward.route) else {
            // Configuration gives every route and passed request an
            // upstream, so this is unreachable; fail closed all the same.
            return bad_gateway(out, "no upstream");
        };
        forward.apply(&mut headers);
        let path = headers.iter().find(|(n, _)| n == ":path").map(|(_, v)| String::from_utf8_lossy(v).into_owned());
        let scheme = if upstream.tls { Scheme::Https } else { Scheme::Http };
        let outgoing = OutgoingRequest::new(forwardable(&headers));
        let set = [
            outgoing.set_method(&method),
            outgoing.set_scheme(Some(&scheme)),
            outgoing.set_authority(Some(&upstream.authority)),
            outgoing.set_path_with_query(path.as_deref()),
        ];
        if set.iter().any(Result::is_err) {
            return bad_gateway(out, "the edited request was refused by the host");
        }
        let Ok(outgoing_body) = outgoing.body() else { return bad_gateway(out, "no request body") };
        let pending = match outgoing_handler::handle(outgoing, None) {
            Ok(pending) => pending,
            Err(code) => return bad_gateway(out, &format!("{code:?}")),
        };
        // The request body streams while the upstream reads it. If either
        // side fails, the upstream request is left unfinished (the host
        // aborts it), and whatever response the upstream managed to give is
        // still answered below.
        let _ = copy_body(request.consume().ok(), outgoing_body);
        pending.subscribe().block();
        let response = match pending.get() {
            Some(Ok(Ok(response))) => response,
            Some(Ok(Err(code))) => return bad_gateway(out, &format!("{code:?}")),
            _ => return bad_gateway(out, "no response"),
        };
        let fields = response.headers();
        let received: Vec<(String, Vec<u8>)> =
            fields.entries().into_iter().map(|(n, v)| (n.to_ascii_lowercase(), v)).collect();
        drop(fields);
        let removed = config.policy.response_removals(&received);
        let kept: Vec<(String, Vec<u8>)> =
            received.into_iter().filter(|(n, _)| !removed.contains(&n.as_str())).collect();
        let reply = OutgoingResponse::new(forwardable(&kept));
        if reply.set_status_code(response.status()).is_err() {
            return bad_gateway(out, "the upstream's status was refused by the host");
        }
        let Ok(reply_body) = reply.body() else { return bad_gateway(out, "no response body") };
        ResponseOutparam::set(out, Ok(reply));
        // Past this point the status is sent; a failure can only cut the
        // body short, which the host reports to the client.
        let _ = copy_body(response.consume().ok(), reply_body);
    }
}

/// The method as it goes on the wire.
fn method_name(method: &Method) -> &str {
    match method {
        Method::Get => "GET",
        Method::Head => "HEAD",
        Method::Post => "POST",
        Method::Put => "PUT",
        Method::Delete => "DELETE",
        Method::Connect => "CONNECT",
        Method::Options => "OPTIONS",
        Method::Trace => "TRACE",
        Method::Patch => "PATCH",
        Method::Other(other) => other,
    }
}

/// The fields to send on: no pseudo-headers, no hop-by-hop headers, and
/// none the host forbids a guest to set (it refuses those one by one).
fn forwardable(headers: &[(String, Vec<u8>)]) -> Fields {
    let fields = Fields::new();
    for (name, value) in headers {
        if !name.starts_with(':') && !HOP_BY_HOP.contains(&name.as_str()) {
            let _ = fields.append(name, value);
        }
    }
    fields
}

/// Streams `from` (when there is a body) into `to` and finishes `to`.
fn copy_body(from: Option<IncomingBody>, to: OutgoingBody) -> Result<(), ()> {
    if let Some(from) = from {
        let (Ok(input), Ok(output)) = (from.stream(), to.write()) else { return Err(()) };
        splice_all(&input, &output)?;
        drop((input, output));
        drop(IncomingBody::finish(from));
    }
    OutgoingBody::finish(to, None).map_err(|_| ())
}

/// Moves bytes until the input ends; an error when either side fails.
fn splice_all(input: &InputStream, output: &OutputStream) -> Result<(), ()> {
    loop {
        match output.blocking_splice(input, CHUNK) {
            Ok(_) => {}
            // `closed` is the input's end, or the output's: only an output
            // that still takes writes proves it was the input's.
            Err(StreamError::Closed) => return output.check_write().map(drop).map_err(drop),
            Err(StreamError::LastOperationFailed(_)) => return Err(()),
        }
    }
}

/// Answers locally with a small body.
fn respond(out: ResponseOutparam, status: u16, headers: &[(&str, &str)], body: &str) {
    let fields = Fields::new();
    for (name, value) in headers {
        let _ = fields.append(name, value.as_bytes());
    }
    let _ = fields.append("content-length", body.len().to_string().as_bytes());
    let response = OutgoingResponse::new(fields);
    let _ = response.set_status_code(status);
    let Ok(outgoing_body) = response.body() else { return };
    ResponseOutparam::set(out, Ok(response));
    if let Ok(stream) = outgoing_body.write() {
        for chunk in body.as_bytes().chunks(4096) {
            if stream.blocking_write_and_flush(chunk).is_err() {
                return;
            }
        }
        drop(stream);
    }
    let _ = OutgoingBody::finish(outgoing_body, None);
}

/// The upstream could not be reached, or failed before its response.
fn bad_gateway(out: ResponseOutparam, why: &str) {
    eprintln!("keyswap: error: upstream request failed: {why}");
    let body = r#"{"error":"bad_gateway","message":"The upstream could not be reached."}"#;
    respond(out, 502, &[("content-type", "application/json"), ("cache-control", "no-store")], body);
}
