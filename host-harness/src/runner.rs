//! Runner 2's glue: a conformance [`Case`] through the filter module, and
//! what a host reports of it ([`Observed`]). The `keyswap conformance`
//! command and the harness's test both use it.

use std::collections::BTreeMap;

use crate::conformance::{Case, Observed, Report, Suite};
use crate::error::HarnessError;
use crate::module::{FilterInstance, FilterModule, Outcome};
use crate::state::CallCounts;

/// The runner's name in `skip.json`.
pub const RUNNER: &str = "harness";

/// One case's run: what was observed (or why nothing could be), and what
/// the harness saw of the module while running it.
#[derive(Debug)]
pub struct CaseRun {
    /// An error is anything but a refused configuration that kept the case
    /// from running (a trap, a missing export), or an outcome no host may
    /// report (a paused request).
    pub observed: Result<Observed, String>,
    /// Calls to host functions the harness does not implement.
    pub unimplemented: BTreeMap<String, u64>,
    /// Host calls of the case's request stream, when one ran.
    pub request_host_calls: Option<CallCounts>,
}

/// Runs `case`: a fresh VM with the case's environment, its configuration,
/// its request on real time, and its upstream response when it has one.
pub fn run_case(module: &FilterModule, case: &Case) -> CaseRun {
    let mut instance = match module.start(&case.env) {
        Ok(instance) => instance,
        Err(err) => {
            return CaseRun { observed: Err(err.to_string()), unimplemented: BTreeMap::new(), request_host_calls: None }
        }
    };
    let observed = match instance.configure(case.config.as_bytes()) {
        Ok(()) => {
            instance.clock().set_real();
            observe(&mut instance, case).and_then(|observed| {
                instance.finish().map_err(|e| e.to_string())?;
                Ok(observed)
            })
        }
        Err(HarnessError::Refused { log }) => Ok(Observed::ConfigRefused { log }),
        Err(err) => Err(err.to_string()),
    };
    let unimplemented = instance.unimplemented_calls().clone();
    // The SDK panics on an UNIMPLEMENTED status, so a trap often has one
    // behind it: name it.
    let observed = match observed {
        Err(err) if !unimplemented.is_empty() => Err(format!("{err}\nunimplemented host calls: {unimplemented:?}")),
        other => other,
    };
    CaseRun { observed, unimplemented, request_host_calls: instance.last_request_host_calls().cloned() }
}

fn observe(instance: &mut FilterInstance, case: &Case) -> Result<Observed, String> {
    let outcome = instance
        .request(case.request.route_name.as_deref(), &case.request.header_list())
        .map_err(|e| e.to_string())?;
    match outcome {
        Outcome::Local(local) => Ok(Observed::Denied {
            status: u16::try_from(local.status).map_err(|_| format!("local response status {}", local.status))?,
            headers: text_pairs(&local.headers),
            body: local.body,
        }),
        Outcome::Paused { .. } => Err("the filter paused the request without answering it".into()),
        Outcome::Forwarded { headers } => {
            let path = headers
                .iter()
                .find(|(n, _)| n == ":path")
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default();
            let upstream: Vec<(String, Vec<u8>)> = headers.into_iter().filter(|(n, _)| !n.starts_with(':')).collect();
            let client_response = match &case.response {
                None => None,
                Some(response) => {
                    let sent: Vec<(String, Vec<u8>)> =
                        response.headers.iter().map(|(n, v)| (n.clone(), v.as_bytes().to_vec())).collect();
                    match instance.response(&sent).map_err(|e| e.to_string())? {
                        Outcome::Forwarded { headers } => Some(text_pairs(&headers)),
                        other => return Err(format!("the filter did not pass the response on: {other:?}")),
                    }
                }
            };
            Ok(Observed::Forwarded { path, headers: text_pairs(&upstream), client_response })
        }
    }
}

/// Header values as text, for reports (lossy for non-UTF-8 bytes).
pub fn text_pairs(headers: &[(String, Vec<u8>)]) -> Vec<(String, String)> {
    headers.iter().map(|(n, v)| (n.clone(), String::from_utf8_lossy(v).into_owned())).collect()
}

/// The whole suite through `module`, as runner [`RUNNER`]: the report, and
/// every unimplemented host call any case made (which is a failure too).
///
/// # Errors
/// A skip list that names no case, or gives no reason.
pub fn run_suite(module: &FilterModule, suite: &Suite) -> Result<(Report, BTreeMap<String, u64>), String> {
    let plan = suite.plan(RUNNER)?;
    let mut unimplemented = BTreeMap::new();
    let report = Report::run(&plan, |case| {
        let run = run_case(module, case);
        for (name, count) in run.unimplemented {
            *unimplemented.entry(name).or_insert(0) += count;
        }
        run.observed
    });
    Ok((report, unimplemented))
}

/// Fails loudly when any host call went to an `Unimplemented` stub: the
/// harness would then not be testing what Envoy runs.
///
/// # Errors
/// Every stubbed function called, with its count.
pub fn check_unimplemented(unimplemented: &BTreeMap<String, u64>) -> Result<(), String> {
    if unimplemented.is_empty() {
        return Ok(());
    }
    let calls: Vec<String> = unimplemented.iter().map(|(name, count)| format!("{name} ×{count}")).collect();
    Err(format!(
        "the filter called host functions the harness does not implement (they answered UNIMPLEMENTED): {}",
        calls.join(", ")
    ))
}
