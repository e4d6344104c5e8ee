//! The `gateway` world's exports: `wasi:http/incoming-handler` and
//! `gateway-config`. Per request: read the headers once, ask the policy,
//! then answer the denial locally, or send the edited request to the
//! route's upstream and stream both bodies through (see [`crate::wasi_http`]
//! for the plumbing); a response header that echoes the route's credential
//! is cleaned or removed ([`keyswap_policy::Policy::reflections`]).

use std::cell::RefCell;
use std::rc::Rc;

use keyswap_policy::credential::NoRecords;
use keyswap_policy::RequestView;

use crate::bindings::http::{IncomingRequest, OutgoingRequest, OutgoingResponse, ResponseOutparam, Scheme};
use crate::bindings::{gateway_config, outgoing_handler, policy as wit};
use crate::config::{GatewayConfig, CONFIG_VAR};
use crate::wasi_http::{copy_body, forwardable, method_name, respond};

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
                let why = keyswap_policy::Unconfigured::NoConfiguration;
                let json = [("content-type", "application/json")];
                return respond(out, keyswap_policy::Unconfigured::STATUS, &json, why.body());
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
        // The gateway refuses dynamic credentials at configuration: no records.
        let mut forward = match config.policy.decide(&view, &crate::now_ms, &NoRecords).without_waiting() {
            Ok(forward) => forward,
            Err(denial) => {
                let reason = denial.reason;
                return respond(out, reason.status(), reason.headers(), &reason.body());
            }
        };
        let route = forward.route.map(str::to_string);
        // What a response must not carry back beyond the route's own
        // static credentials (a client's own ones, here).
        let secrets = std::mem::take(&mut forward.secrets);
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
        // A response header echoing the route's credential (a `location`
        // keeping its query parameter, say) is cleaned or dropped, and
        // strip_response_headers removed.
        let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
        let kept = config.policy.client_response(route.as_deref(), &secrets, received);
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

/// The upstream could not be reached, or failed before its response.
fn bad_gateway(out: ResponseOutparam, why: &str) {
    eprintln!("keyswap: error: upstream request failed: {why}");
    let body = r#"{"error":"bad_gateway","message":"The upstream could not be reached."}"#;
    respond(out, 502, &[("content-type", "application/json"), ("cache-control", "no-store")], body);
}
