//! Runner `harness`'s glue: a conformance [`SuiteCase`] through the filter
//! module, and what a host reports of it ([`Observed`]). The
//! `keyswap conformance` command and the harness's test both use it.

use std::collections::BTreeMap;

use keyswap_conformance::{step_worker, Observed, Runner, Step, Suite, SuiteCase, SuiteReport, STEPS_START};

use crate::error::HarnessError;
use crate::module::{FilterInstance, FilterModule, Handled};
use crate::state::{CallCounts, Clock};
use crate::SharedData;

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
pub fn run_case(module: &FilterModule, case: &SuiteCase) -> CaseRun {
    if !case.steps.is_empty() {
        return run_timeline(module, case);
    }
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

/// A case with steps: `case.workers` VMs sharing shared data and a clock
/// stopped at [`STEPS_START`], configured in order; the steps; then the
/// request on the last worker at `request_at_ms`.
fn run_timeline(module: &FilterModule, case: &SuiteCase) -> CaseRun {
    let shared = SharedData::default();
    let clock = Clock::fixed(std::time::UNIX_EPOCH + STEPS_START);
    let mut workers: Vec<FilterInstance> = Vec::with_capacity(case.workers);
    let mut result: Result<Option<Observed>, String> = Ok(None);
    for _ in 0..case.workers {
        let started = module.start_worker(&case.env, &shared, &clock).map_err(|e| e.to_string());
        let configured = started.and_then(|mut w| match w.configure(case.config.as_bytes()) {
            Ok(()) => Ok(Ok(w)),
            Err(HarnessError::Refused { log }) => Ok(Err(Observed::ConfigRefused { log })),
            Err(err) => Err(err.to_string()),
        });
        match configured {
            Ok(Ok(worker)) => workers.push(worker),
            Ok(Err(refused)) => {
                result = Ok(Some(refused));
                break;
            }
            Err(err) => {
                result = Err(err);
                break;
            }
        }
    }
    let mut at_ms = 0u64;
    if matches!(result, Ok(None)) {
        // Per worker: a request forwarded by `send`, waiting for `respond`.
        let mut open = vec![false; workers.len()];
        result = case
            .steps
            .iter()
            .enumerate()
            .try_for_each(|(i, step)| {
                run_step(&mut workers, &mut open, case, &clock, step, &mut at_ms)
                    .map_err(|e| format!("step {i} ({step:?}): {e}"))
            })
            .map(|()| None);
    }
    let observed = match result {
        Ok(Some(refused)) => Ok(refused),
        Err(err) => Err(err),
        Ok(None) => match workers.last_mut() {
            None => Err("no worker ran".to_string()),
            Some(first) => {
                clock.set(
                    std::time::UNIX_EPOCH
                        + STEPS_START
                        + std::time::Duration::from_millis(case.request_at_ms.unwrap_or(at_ms)),
                );
                observe(first, case).and_then(|observed| {
                    first.finish().map_err(|e| e.to_string())?;
                    Ok(observed)
                })
            }
        },
    };
    let mut unimplemented = BTreeMap::new();
    for worker in &workers {
        for (name, count) in worker.unimplemented_calls() {
            *unimplemented.entry(name.clone()).or_insert(0) += count;
        }
    }
    let observed = match observed {
        Err(err) => {
            let logs: Vec<String> = workers.iter().map(FilterInstance::log_text).collect();
            Err(format!(
                "{err}
worker logs:
{}",
                logs.join("\n--\n")
            ))
        }
        ok => ok,
    };
    let request_host_calls = workers.last().and_then(|w| w.last_request_host_calls().cloned());
    CaseRun { observed, unimplemented, request_host_calls }
}

fn run_step(
    workers: &mut [FilterInstance],
    open: &mut [bool],
    case: &SuiteCase,
    clock: &Clock,
    step: &Step,
    at_ms: &mut u64,
) -> Result<(), String> {
    let oldest = |workers: &mut [FilterInstance], cluster: &str| -> Result<(usize, u32), String> {
        workers
            .iter()
            .enumerate()
            .find_map(|(w, worker)| worker.pending_calls().iter().find(|c| c.cluster == cluster).map(|c| (w, c.token)))
            .ok_or_else(|| format!("no call to cluster `{cluster}` is pending"))
    };
    match step {
        Step::TickAt(ms) => {
            if *ms < *at_ms {
                return Err(format!("time goes back from {at_ms} ms"));
            }
            *at_ms = *ms;
            clock.set(std::time::UNIX_EPOCH + STEPS_START + std::time::Duration::from_millis(*ms));
            for worker in workers.iter_mut() {
                worker.tick().map_err(|e| e.to_string())?;
            }
            Ok(())
        }
        Step::Answer(answer) => {
            let (w, token) = oldest(workers, &answer.cluster)?;
            if let Some(want) = &answer.call {
                let call = workers[w].pending_calls().iter().find(|c| c.token == token).cloned();
                if let Some(call) = call {
                    want.check(&call.headers, &call.body)?;
                }
            }
            let headers = vec![
                (":status".to_string(), answer.status.to_string().into_bytes()),
                ("content-type".to_string(), b"application/json".to_vec()),
            ];
            workers[w].answer_call(token, Some((headers, answer.body_bytes()))).map_err(|e| e.to_string())
        }
        Step::Fail { cluster } => {
            let (w, token) = oldest(workers, cluster)?;
            workers[w].answer_call(token, None).map_err(|e| e.to_string())
        }
        Step::Pending(want) => {
            let got: usize = workers.iter().map(|w| w.pending_calls().len()).sum();
            if got == *want {
                Ok(())
            } else {
                Err(format!("{got} calls are pending, not {want}"))
            }
        }
        Step::Send(send) => {
            let w = step_worker(send.worker, workers.len())?;
            if open[w] {
                return Err(format!("worker {w} has a request open"));
            }
            let request = send.request(&case.request);
            let outcome = workers[w]
                .request_to(request.route_name.as_deref(), request.cluster(), &request.header_list())
                .map_err(|e| e.to_string())?;
            match outcome {
                Handled::Forwarded { .. } if send.waits => Err("the request was forwarded, not held".into()),
                Handled::Forwarded { headers } => {
                    open[w] = true;
                    send.check(&headers)
                }
                Handled::Local(local) => Err(format!("the request was answered {} locally", local.status)),
                Handled::Paused { .. } if send.waits => Ok(()),
                Handled::Paused { .. } => Err("the filter paused the request without answering it".into()),
            }
        }
        Step::Requests(requests) => {
            if requests.at_ms < *at_ms {
                return Err(format!("time goes back from {at_ms} ms"));
            }
            *at_ms = requests.at_ms;
            clock.set(std::time::UNIX_EPOCH + STEPS_START + std::time::Duration::from_millis(requests.at_ms));
            let w = step_worker(requests.worker, workers.len())?;
            if open[w] {
                return Err(format!("worker {w} has a request open"));
            }
            let request = requests.request(&case.request);
            for i in 0..requests.count {
                let outcome = workers[w]
                    .request_to(request.route_name.as_deref(), request.cluster(), &request.header_list())
                    .map_err(|e| e.to_string())?;
                match outcome {
                    Handled::Forwarded { .. } => requests.check(i, None)?,
                    Handled::Local(local) => {
                        let status = u16::try_from(local.status).unwrap_or(0);
                        requests.check(i, Some((status, &local.body)))?;
                    }
                    Handled::Paused { .. } => return Err("the filter paused the request without answering it".into()),
                }
            }
            workers[w].finish().map_err(|e| e.to_string())
        }
        Step::Resumed(resumed) => {
            let w = step_worker(resumed.worker, workers.len())?;
            match workers[w].held_outcome().map_err(|e| e.to_string())? {
                Some(Handled::Forwarded { headers }) => {
                    open[w] = true;
                    resumed.check(&headers)
                }
                Some(Handled::Local(local)) => Err(format!("the held request was answered {} locally", local.status)),
                _ => Err(format!("worker {w} holds no request let go")),
            }
        }
        Step::Refused(refused) => {
            let w = step_worker(refused.worker, workers.len())?;
            match workers[w].held_outcome().map_err(|e| e.to_string())? {
                Some(Handled::Local(local)) => {
                    let status = u16::try_from(local.status).unwrap_or(0);
                    refused.check(status, &local.body)
                }
                Some(Handled::Forwarded { .. }) => Err("the held request was forwarded".into()),
                _ => Err(format!("worker {w} holds no request answered")),
            }
        }
        Step::Respond(respond) => {
            let w = step_worker(respond.worker, workers.len())?;
            if !std::mem::take(&mut open[w]) {
                return Err(format!("worker {w} has no request open"));
            }
            let status = vec![(":status".to_string(), respond.status.to_string().into_bytes())];
            match workers[w].response(&status).map_err(|e| e.to_string())? {
                Handled::Forwarded { .. } => Ok(()),
                _ => Err("the filter did not pass the response on".into()),
            }
        }
    }
}

/// [`observe_request`], then the access-log field the filter set, when
/// the case says what it must be.
fn observe(instance: &mut FilterInstance, case: &SuiteCase) -> Result<Observed, String> {
    let observed = observe_request(instance, case)?;
    if case.access_log().is_some() {
        let state = instance.filter_state();
        let field = state.and_then(|s| s.get(ACCESS_LOG_STATE)).map(|v| String::from_utf8_lossy(v).into_owned());
        case.check_access_log(field.as_deref())?;
    }
    Ok(observed)
}

/// The filter-state entry Envoy's access log reads
/// (`%FILTER_STATE(wasm.keyswap:PLAIN)%`).
const ACCESS_LOG_STATE: &str = "wasm.keyswap";

fn observe_request(instance: &mut FilterInstance, case: &SuiteCase) -> Result<Observed, String> {
    let outcome = instance
        .request_to(case.request.route_name.as_deref(), case.request.cluster(), &case.request.header_list())
        .map_err(|e| e.to_string())?;
    match outcome {
        Handled::Local(local) => Ok(Observed::Denied {
            status: u16::try_from(local.status).map_err(|_| format!("local response status {}", local.status))?,
            headers: text_pairs(&local.headers),
            body: local.body,
        }),
        Handled::Paused { .. } => Err("the filter paused the request without answering it".into()),
        Handled::Forwarded { headers } => {
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
                        Handled::Forwarded { headers } => Some(text_pairs(&headers)),
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

/// The whole suite through `module`, as runner [`Runner::Harness`]: the
/// report, and every unimplemented host call any case made (which is a
/// failure too).
pub fn run_suite(module: &FilterModule, suite: &Suite) -> (SuiteReport, BTreeMap<String, u64>) {
    let mut unimplemented = BTreeMap::new();
    let report = SuiteReport::run(&suite.plan(Runner::Harness), |case| {
        let run = run_case(module, case);
        for (name, count) in run.unimplemented {
            *unimplemented.entry(name).or_insert(0) += count;
        }
        run.observed
    });
    (report, unimplemented)
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
