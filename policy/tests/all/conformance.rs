//! Runner `native`: the conformance suite through the policy itself, no
//! wasm, so `cargo test -p keyswap-policy` runs every case in seconds.

use keyswap_conformance::{
    default_dir, step_worker, Observed, Request, Runner, Step, Suite, SuiteCase, SuiteReport, STEPS_START,
};
use keyswap_policy::credential::{self, MemoryRecords, Provider, Refresher, Reply, Used};
use keyswap_policy::limit::{MemoryCounters, Taken};
use keyswap_policy::{Decision, Denial, DenialReason, Policy, RequestView};

/// The policy's refresh state machine, run natively over records in
/// memory: workers are one here (the filter's compare-and-swap makes them
/// behave as one, which the harness and Envoy runners check). Calls are
/// answered in order per cluster by the case's steps.
/// A request's headers, in order.
type Headers = Vec<(String, Vec<u8>)>;
/// A call out: id, cluster, headers, body.
type Call = (u32, String, Headers, Vec<u8>);

struct Engine<'p> {
    policy: &'p Policy,
    records: MemoryRecords,
    /// Rate-limit buckets, shared by the workers as the records are.
    counters: MemoryCounters,
    refresher: Refresher,
    /// Calls out (id, cluster, headers, body), oldest first.
    pending: Vec<Call>,
    calls: u32,
    /// Per worker, the request forwarded and waiting for its upstream's
    /// answer (`send`): the dynamic credentials it carried.
    open: Vec<Option<Vec<Used>>>,
    /// Per worker, a request held for per-client credentials (`send` with
    /// `waits`): its request, deadline and the records it waits for.
    held: Vec<Option<Held>>,
    /// Per worker, what came of a held request once let go.
    settled: Vec<Option<Settled>>,
}

struct Held {
    request: Request,
    deadline: i64,
    slots: Vec<(usize, String)>,
    caller: Caller,
}

enum Settled {
    Forwarded(Vec<(String, Vec<u8>)>, Vec<Used>),
    Refused(DenialReason),
}

impl Engine<'_> {
    fn step(&mut self, case: &SuiteCase, step: &Step, now: &mut i64) -> Result<(), String> {
        let start = STEPS_START.as_millis() as i64;
        let providers = self.policy.credential_providers();
        let take = |pending: &mut Vec<Call>, cluster: &str| {
            let at = pending.iter().position(|(_, c, _, _)| c == cluster);
            at.map(|at| pending.remove(at)).ok_or_else(|| format!("no call to cluster `{cluster}` is pending"))
        };
        match step {
            Step::TickAt(ms) => {
                *now = start + *ms as i64;
                // Held requests ask again, as the filter's release does: a
                // first call that failed is tried again after its backoff.
                for held in self.held.iter().flatten() {
                    for (p, key) in &held.slots {
                        let caller = &held.caller;
                        self.refresher.demand(*p, key, caller.token.as_deref(), caller.subject.as_deref());
                    }
                }
                let (pending, calls) = (&mut self.pending, &mut self.calls);
                let mut call = |provider: &Provider, headers: &[(String, String)], body: Option<&[u8]>| {
                    *calls += 1;
                    let headers = headers.iter().map(|(n, v)| (n.clone(), v.as_bytes().to_vec())).collect();
                    pending.push((*calls, provider.cluster.clone(), headers, body.unwrap_or_default().to_vec()));
                    Ok(*calls)
                };
                self.refresher.tick(providers, &mut self.records, *now, &mut call);
            }
            Step::Answer(answer) => {
                let (id, _, headers, body) = take(&mut self.pending, &answer.cluster)?;
                if let Some(want) = &answer.call {
                    want.check(&headers, &body)?;
                }
                let body = answer.body_bytes();
                let reply = Reply::Answered { status: answer.status, body: &body };
                self.refresher.answer(providers, &mut self.records, id, reply, *now);
            }
            Step::Fail { cluster } => {
                let (id, ..) = take(&mut self.pending, cluster)?;
                self.refresher.answer(providers, &mut self.records, id, Reply::Lost, *now);
            }
            Step::Pending(n) if self.pending.len() != *n => {
                return Err(format!("{} calls are pending, not {n}", self.pending.len()));
            }
            Step::Pending(_) => {}
            Step::Send(send) => {
                let w = step_worker(send.worker, self.open.len())?;
                if self.open[w].is_some() || self.held[w].is_some() || self.settled[w].is_some() {
                    return Err(format!("worker {w} has a request open"));
                }
                let request = send.request(&case.request);
                let (decision, mut headers, token) =
                    decide(self.policy, &request, *now, &self.records, &mut self.counters, false);
                match decision {
                    Decision::Forward(forward) if !send.waits => {
                        forward.apply(&mut headers);
                        send.check(&headers)?;
                        self.used(&forward.used, &token, *now);
                        self.open[w] = Some(forward.used);
                    }
                    Decision::Forward(_) => return Err("the request was forwarded, not held".into()),
                    Decision::Deny(denial) => return Err(format!("the request was denied: {:?}", denial.reason)),
                    Decision::Wait(wait) if send.waits => {
                        let slots = wait.slots.clone();
                        if let Some(reason) = self.hold(&slots, &token, *now) {
                            return Err(format!("the request was denied: {reason:?}"));
                        }
                        let deadline = *now + wait.timeout_ms as i64;
                        self.held[w] = Some(Held { request, deadline, slots, caller: token });
                    }
                    Decision::Wait(_) => return Err("the request was held, not forwarded".into()),
                }
            }
            Step::Resumed(resumed) => {
                let w = step_worker(resumed.worker, self.open.len())?;
                match self.settled[w].take() {
                    Some(Settled::Forwarded(headers, used)) => {
                        resumed.check(&headers)?;
                        self.open[w] = Some(used);
                    }
                    Some(Settled::Refused(reason)) => return Err(format!("the held request was denied: {reason:?}")),
                    None => return Err(format!("worker {w} has no request let go")),
                }
            }
            Step::Refused(refused) => {
                let w = step_worker(refused.worker, self.open.len())?;
                match self.settled[w].take() {
                    Some(Settled::Refused(reason)) => refused.check(reason.status(), reason.body().as_bytes())?,
                    Some(Settled::Forwarded(..)) => return Err("the held request was forwarded".into()),
                    None => return Err(format!("worker {w} has no request let go")),
                }
            }
            Step::Requests(requests) => {
                if start + (requests.at_ms as i64) < *now {
                    return Err("time goes back".into());
                }
                *now = start + requests.at_ms as i64;
                let request = requests.request(&case.request);
                for i in 0..requests.count {
                    let (decision, ..) = decide(self.policy, &request, *now, &self.records, &mut self.counters, false);
                    let outcome = match decision.without_waiting() {
                        Ok(_) => None,
                        Err(denial) => Some((denial.reason.status(), denial.reason.body().into_bytes())),
                    };
                    requests.check(i, outcome.as_ref().map(|(s, b)| (*s, b.as_slice())))?;
                }
            }
            Step::Respond(respond) => {
                let w = step_worker(respond.worker, self.open.len())?;
                let used = self.open[w].take().ok_or_else(|| format!("worker {w} has no request open"))?;
                let at = *now;
                self.policy.upstream_status(respond.status, &used, &|| at, &mut self.records);
            }
        }
        self.settle(*now);
        Ok(())
    }

    /// Admits and asks for the keyed records a held request waits for, as
    /// the filter does; the denial when one is past its `max_clients`.
    fn hold(&mut self, slots: &[(usize, String)], caller: &Caller, now: i64) -> Option<DenialReason> {
        let providers = self.policy.credential_providers();
        for (p, key) in slots {
            if credential::admit(providers, &mut self.records, *p, key, now).is_err() {
                return Some(DenialReason::CredentialUnavailable);
            }
        }
        for (p, key) in slots {
            self.refresher.demand(*p, key, caller.token.as_deref(), caller.subject.as_deref());
        }
        None
    }

    /// What a forwarded request asks of its keyed records.
    fn used(&mut self, used: &[Used], caller: &Caller, now: i64) {
        for u in used {
            if u.touch {
                credential::touch(self.policy.credential_providers(), &mut self.records, u, now);
            }
            if let (true, Some(key)) = (u.due, &u.key) {
                self.refresher.demand(u.provider, key, caller.token.as_deref(), caller.subject.as_deref());
            }
        }
    }

    /// Lets go the held requests whose records arrived or whose time ran
    /// out, deciding them again.
    fn settle(&mut self, now: i64) {
        for w in 0..self.held.len() {
            let Some(held) = self.held[w].take() else { continue };
            if !(credential::ready(&self.records, &held.slots, now) || now >= held.deadline) {
                self.held[w] = Some(held);
                continue;
            }
            let (decision, mut headers, _) =
                decide(self.policy, &held.request, now, &self.records, &mut self.counters, true);
            self.settled[w] = Some(match decision {
                Decision::Forward(forward) => {
                    forward.apply(&mut headers);
                    Settled::Forwarded(headers, forward.used)
                }
                Decision::Deny(denial) => Settled::Refused(denial.reason),
                Decision::Wait(wait) => Settled::Refused(wait.denial().reason),
            });
        }
    }
}

/// What the first stage hands the final one for the calls a request may
/// ask for: the caller's own token (`caller_token_header`) and the subject
/// token of an on-behalf-of exchange.
struct Caller {
    token: Option<String>,
    subject: Option<String>,
}

/// The two stages as in Envoy: the key (and the caller's and subject
/// tokens) are read and removed first, then the request, as edited, is
/// decided on its route and cluster at `now_ms`. Returns the decision, the
/// admitted headers it applies to, and what the first stage read.
fn decide<'p>(
    policy: &'p Policy,
    request: &Request,
    now_ms: i64,
    records: &MemoryRecords,
    counters: &mut MemoryCounters,
    counted: bool,
) -> (Decision<'p>, Headers, Caller) {
    let mut headers = request.header_list();
    let key = policy.key_check(&RequestView::from_headers(None, &headers));
    let text = |t: &[u8]| String::from_utf8_lossy(t).into_owned();
    let first = RequestView::from_headers(None, &headers);
    let caller =
        Caller { token: policy.caller_token(&first).map(text), subject: policy.subject_token(&first).map(text) };
    policy.admit_with_id(&RequestView::from_headers(None, &headers), &key, &|| now_ms).apply(&mut headers);
    let mut view = RequestView::from_headers(request.route_name.as_deref(), &headers);
    view.cluster = request.cluster();
    view.key = Some(&key);
    view.subject = caller.subject.as_deref().map(str::as_bytes);
    // The harness's clock: stopped at STEPS_START, moved by the steps.
    let decision = if counted {
        // A held request let go: its limits took it when it was first decided.
        policy.decide_limited(&view, &|| now_ms, records, &mut Taken)
    } else {
        policy.decide_limited(&view, &|| now_ms, records, counters)
    };
    (decision, headers, caller)
}

fn denied(denial: &Denial<'_>) -> Observed {
    let reason = denial.reason;
    let headers = denial.headers().iter().map(|(n, v)| (n.to_string(), v.to_string())).collect();
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
        records: MemoryRecords::new(policy.credential_providers().len()),
        counters: MemoryCounters::default(),
        refresher: Refresher::default(),
        pending: Vec::new(),
        calls: 0,
        open: vec![None; case.workers],
        held: (0..case.workers).map(|_| None).collect(),
        settled: (0..case.workers).map(|_| None).collect(),
    };
    engine.refresher.restart(policy.credential_providers(), &mut engine.records);
    let mut now_ms = STEPS_START.as_millis() as i64;
    for (i, step) in case.steps.iter().enumerate() {
        engine.step(case, step, &mut now_ms).map_err(|e| format!("step {i} ({step:?}): {e}"))?;
    }
    if let Some(at) = case.request_at_ms {
        now_ms = STEPS_START.as_millis() as i64 + at as i64;
    }
    let (decision, mut headers, token) =
        decide(&policy, &case.request, now_ms, &engine.records, &mut engine.counters, false);
    predicted(&policy, &decision)?;
    // The access-log field, as every host writes it.
    let mut field = String::new();
    match &decision {
        Decision::Deny(denial) => denial.access_log().write(&mut field),
        Decision::Wait(wait) => wait.denial().access_log().write(&mut field),
        Decision::Forward(forward) => forward.access_log().write(&mut field),
    }
    case.check_access_log(Some(&field))?;
    match decision {
        Decision::Deny(denial) => Ok(denied(&denial)),
        // The case's own request is never held: it is refused at once when
        // its client cannot be admitted, and a failure otherwise.
        Decision::Wait(wait) => {
            let slots = wait.slots.clone();
            match engine.hold(&slots, &token, now_ms) {
                Some(reason) => {
                    let (route, client, key, metadata) = (Some(wait.route), None, None, None);
                    Ok(denied(&Denial { reason, route, client, key, metadata, limit: None }))
                }
                None => Err("the request was held for its credentials (use a `send` with `waits`)".into()),
            }
        }
        Decision::Forward(forward) => {
            forward.apply(&mut headers);
            let text = |v: &[u8]| String::from_utf8_lossy(v).into_owned();
            let path = headers.iter().find(|(n, _)| n == ":path").map(|(_, v)| text(v)).unwrap_or_default();
            let upstream = headers.iter().filter(|(n, _)| !n.starts_with(':')).map(|(n, v)| (n.clone(), text(v)));
            let client_response = case.response.as_ref().map(|response| {
                let list: Vec<(String, Vec<u8>)> =
                    response.headers.iter().map(|(n, v)| (n.to_ascii_lowercase(), v.as_bytes().to_vec())).collect();
                // The final stage removes echoed credentials, then the first
                // stage strip_response_headers.
                let secrets: Vec<&str> = forward.secrets.iter().map(String::as_str).collect();
                let kept = policy.client_response(forward.route, &secrets, list);
                kept.iter().map(|(n, v)| (n.clone(), text(v))).collect()
            });
            Ok(Observed::Forwarded { path, headers: upstream.collect(), client_response })
        }
    }
}

/// Checks that the policy listed `decision` among the answers it can give
/// (`route_denials`, `unrouted_outcomes`): a host defines a counter for
/// each, so an answer missing from them would go uncounted.
fn predicted(policy: &Policy, decision: &Decision<'_>) -> Result<(), String> {
    let (route, reason) = match decision {
        Decision::Deny(denial) => (denial.route, Some(denial.reason)),
        Decision::Wait(wait) => (Some(wait.route), Some(wait.denial().reason)),
        Decision::Forward(forward) => (forward.route, None),
    };
    let listed = match (route, reason) {
        (Some(route), Some(reason)) => policy.route_denials(route).any(|r| r == reason),
        (Some(_), None) => true,
        (None, outcome) => policy.unrouted_outcomes().contains(&outcome),
    };
    if listed {
        Ok(())
    } else {
        Err(format!("the answer {reason:?} on route {route:?} is not among the answers the policy lists for it"))
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
