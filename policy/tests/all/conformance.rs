//! Runner `native`: the conformance suite through the policy itself, no
//! wasm, so `cargo test -p keyswap-policy` runs every case in seconds.

use keyswap_conformance::{default_dir, Observed, Runner, Step, Suite, SuiteCase, SuiteReport, STEPS_START};
use keyswap_policy::credential::Record;
use keyswap_policy::{Decision, DenialReason, Policy, RequestView};

/// The policy's side of dynamic credentials, run natively: one record per
/// source (what every worker shares), a lease per due source, each call's
/// answer read by `Source::parse` and stored by `Record::succeeded` or
/// `Record::failed`. Workers are one engine here: the filter's
/// compare-and-swap makes them behave as one, which the harness and Envoy
/// runners check.
struct Engine<'p> {
    policy: &'p Policy,
    records: Vec<Record>,
    /// Sources with a call out, oldest first.
    pending: Vec<usize>,
}

impl Engine<'_> {
    fn step(&mut self, step: &Step, now: &mut i64) -> Result<(), String> {
        let start = STEPS_START.as_millis() as i64;
        let sources = self.policy.credential_sources();
        let take = |pending: &mut Vec<usize>, cluster: &str| {
            let at = pending.iter().position(|&s| sources[s].cluster == cluster);
            at.map(|at| pending.remove(at)).ok_or_else(|| format!("no call to cluster `{cluster}` is pending"))
        };
        match step {
            Step::TickAt(ms) => {
                *now = start + *ms as i64;
                for (s, source) in sources.iter().enumerate() {
                    if !self.pending.contains(&s) && self.records[s].due(*now) {
                        self.records[s] = self.records[s].leased(source, *now);
                        self.pending.push(s);
                    }
                }
            }
            Step::Answer(answer) => {
                let s = take(&mut self.pending, &answer.cluster)?;
                let source = &sources[s];
                if let Some(want) = &answer.call {
                    let headers: Vec<(String, Vec<u8>)> =
                        source.headers.iter().map(|(n, v)| (n.clone(), v.as_bytes().to_vec())).collect();
                    want.check(&headers, source.body.as_deref().unwrap_or_default())?;
                }
                self.records[s] = match source.parse(answer.status, &answer.body_bytes(), *now) {
                    Ok(fetched) => self.records[s].succeeded(fetched).0,
                    Err(_) => self.records[s].failed(*now),
                };
            }
            Step::Fail { cluster } => {
                let s = take(&mut self.pending, cluster)?;
                self.records[s] = self.records[s].failed(*now);
            }
            Step::Pending(n) if self.pending.len() != *n => {
                return Err(format!("{} calls are pending, not {n}", self.pending.len()));
            }
            Step::Pending(_) => {}
        }
        Ok(())
    }
}

fn denied(reason: DenialReason) -> Observed {
    let headers = reason.headers().iter().map(|(n, v)| (n.to_string(), v.to_string())).collect();
    Observed::Denied { status: reason.status(), headers, body: reason.body().into_bytes() }
}

fn observe(case: &SuiteCase) -> Result<Observed, String> {
    let env = |name: &str| case.env.get(name).cloned();
    let policy = match Policy::from_json(case.config.as_bytes(), &env) {
        Ok(policy) => policy,
        Err(err) => return Ok(Observed::ConfigRefused { log: err.to_string() }),
    };
    let mut engine = Engine {
        policy: &policy,
        records: vec![Record::default(); policy.credential_sources().len()],
        pending: Vec::new(),
    };
    let mut now_ms = STEPS_START.as_millis() as i64;
    for (i, step) in case.steps.iter().enumerate() {
        engine.step(step, &mut now_ms).map_err(|e| format!("step {i} ({step:?}): {e}"))?;
    }
    if let Some(at) = case.request_at_ms {
        now_ms = STEPS_START.as_millis() as i64 + at as i64;
    }
    // The two stages as in Envoy: the key is read and removed first, then
    // the request, as edited, is decided on its route and cluster.
    let mut headers = case.request.header_list();
    let key = policy.key_check(&RequestView::from_headers(None, &headers));
    policy.admit(&RequestView::from_headers(None, &headers)).apply(&mut headers);
    let admitted = headers.clone();
    let mut view = RequestView::from_headers(case.request.route_name.as_deref(), &admitted);
    view.cluster = case.request.cluster();
    let now = || {
        let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        since.map_or(0, |d| d.as_secs() as i64)
    };
    match policy.decide_with(&view, &key, &now) {
        Decision::Deny(denial) => Ok(denied(denial.reason)),
        Decision::Forward(forward) => {
            let route = forward.route.unwrap_or_default();
            let values: Vec<Option<&[String]>> = engine.records.iter().map(|r| r.usable(now_ms)).collect();
            let dynamic = if policy.route_sources(route).is_empty() {
                None
            } else {
                match policy.dynamic_edits(route, &view, &values) {
                    Ok(edits) => Some(edits),
                    Err(reason) => return Ok(denied(reason)),
                }
            };
            forward.apply(&mut headers);
            if let Some(edits) = &dynamic {
                edits.apply(&mut headers);
            }
            let text = |v: &[u8]| String::from_utf8_lossy(v).into_owned();
            let path = headers.iter().find(|(n, _)| n == ":path").map(|(_, v)| text(v)).unwrap_or_default();
            let upstream = headers.iter().filter(|(n, _)| !n.starts_with(':')).map(|(n, v)| (n.clone(), text(v)));
            let client_response = case.response.as_ref().map(|response| {
                let list: Vec<(String, Vec<u8>)> =
                    response.headers.iter().map(|(n, v)| (n.to_ascii_lowercase(), v.as_bytes().to_vec())).collect();
                // The final stage removes echoed credentials, then the first
                // stage strip_response_headers.
                let secrets: Vec<&str> = dynamic.iter().flat_map(|d| d.secrets.iter().map(String::as_str)).collect();
                let kept = policy.client_response(forward.route, &secrets, list);
                kept.iter().map(|(n, v)| (n.clone(), text(v))).collect()
            });
            Ok(Observed::Forwarded { path, headers: upstream.collect(), client_response })
        }
    }
}

#[test]
fn conformance_suite_passes_natively() {
    let suite = Suite::load(&default_dir()).unwrap_or_else(|e| panic!("the suite does not load: {e}"));
    let report = SuiteReport::run(&suite.plan(Runner::Native), observe);
    println!("{}", report.render());
    assert!(report.failed.is_empty(), "{}", report.render());
    assert!(report.passed >= 1, "no case ran");
}
