//! The wasm floor for keyswap's benchmarks: a proxy-wasm HTTP filter built
//! with the same SDK, target and release profile as keyswap, that creates
//! its contexts and continues every stream without a single host call.
//! What Envoy spends on it is the price of running any wasm filter at all.
//!
//! With a plugin configuration it makes host calls, the ones named there
//! (comma-separated, in order; `NAME*N` makes a call N times), on every
//! request's headers and nothing else: each call's price in Envoy is then
//! what its listener costs over the empty configuration's, divided by N
//! (docs/performance.md, "What each host call costs": repeating a call
//! lifts its price above a shared machine's noise). The calls are the ones keyswap makes; none changes what is
//! proxied but `set_header` (adds `x-noop: 1`) and `remove_header`
//! (removes `x-noop-absent`, which no request has).

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, MetricType};

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(NoopRoot::default()) });
}}

/// A host call the filter can be told to make per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    /// `proxy_get_header_map_pairs`: the whole request header map.
    GetHeaders,
    /// `proxy_set_header_map_pairs`: the map read (read first if not yet), written back unchanged.
    SetHeaders,
    /// `proxy_get_header_map_value`: `authorization`.
    GetHeader,
    /// `proxy_replace_header_map_value`: `x-noop: 1`.
    SetHeader,
    /// `proxy_remove_header_map_value`: `x-noop-absent`.
    RemoveHeader,
    /// `proxy_get_property`: `xds.cluster_name` (present).
    GetProperty,
    /// `proxy_get_property`: filter state `noop_absent` (absent).
    GetPropertyAbsent,
    /// `proxy_set_property`: a 60-byte filter-state field, like keyswap's access-log field.
    SetProperty,
    /// `proxy_increment_metric`: a counter defined at configuration.
    IncrementMetric,
    /// `proxy_get_current_time_nanoseconds`.
    GetCurrentTime,
}

impl Call {
    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "get_headers" => Self::GetHeaders,
            "set_headers" => Self::SetHeaders,
            "get_header" => Self::GetHeader,
            "set_header" => Self::SetHeader,
            "remove_header" => Self::RemoveHeader,
            "get_property" => Self::GetProperty,
            "get_property_absent" => Self::GetPropertyAbsent,
            "set_property" => Self::SetProperty,
            "increment_metric" => Self::IncrementMetric,
            "get_current_time" => Self::GetCurrentTime,
            _ => return None,
        })
    }
}

#[derive(Default)]
struct NoopRoot {
    calls: Vec<Call>,
    counter: u32,
}

impl Context for NoopRoot {}

impl RootContext for NoopRoot {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let config = self.get_plugin_configuration().unwrap_or_default();
        let config = String::from_utf8_lossy(&config);
        let names = config.split(',').map(str::trim).filter(|n| !n.is_empty());
        let repeated = |n: &str| {
            let (name, times) = n.split_once('*').unwrap_or((n, "1"));
            Some(std::iter::repeat_n(Call::parse(name)?, times.parse().ok()?))
        };
        let Some(calls) =
            names.map(repeated).collect::<Option<Vec<_>>>().map(|c| c.into_iter().flatten().collect::<Vec<_>>())
        else {
            let _ = hostcalls::log(proxy_wasm::types::LogLevel::Error, &format!("noop: unknown call in {config:?}"));
            return false;
        };
        if calls.contains(&Call::IncrementMetric) {
            self.counter = hostcalls::define_metric(MetricType::Counter, "noop_requests_total").unwrap_or(0);
        }
        self.calls = calls;
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(NoopHttp { calls: self.calls.clone(), counter: self.counter }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct NoopHttp {
    calls: Vec<Call>,
    counter: u32,
}

impl Context for NoopHttp {}

impl HttpContext for NoopHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let mut headers = None;
        for call in &self.calls {
            match call {
                Call::GetHeaders => headers = Some(self.get_http_request_headers_bytes()),
                Call::SetHeaders => {
                    let map = headers.take().unwrap_or_else(|| self.get_http_request_headers_bytes());
                    self.set_http_request_headers_bytes(map.iter().map(|(n, v)| (n.as_str(), v.as_slice())).collect());
                    headers = Some(map);
                }
                Call::GetHeader => drop(self.get_http_request_header("authorization")),
                Call::SetHeader => self.set_http_request_header("x-noop", Some("1")),
                Call::RemoveHeader => self.set_http_request_header("x-noop-absent", None),
                Call::GetProperty => drop(self.get_property(vec!["xds", "cluster_name"])),
                Call::GetPropertyAbsent => drop(self.get_property(vec!["noop_absent"])),
                Call::SetProperty => self.set_property(
                    vec!["noop"],
                    Some(b"outcome=allowed reason=- route=bench client=client-000500 ...".as_slice()),
                ),
                Call::IncrementMetric => drop(hostcalls::increment_metric(self.counter, 1)),
                Call::GetCurrentTime => drop(self.get_current_time()),
            }
        }
        Action::Continue
    }
}
