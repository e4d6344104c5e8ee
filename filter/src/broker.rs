//! The final stage's decision, and requests held for a client's first
//! per-client credential (a `{client}` fetch): thin glue over
//! `Policy::decide` and the policy's keyed records.
//!
//! ```text
//! final stage ──decide──▶ Go (edits applied) | Answered (denied) | Hold
//!   Hold: credential::admit (max_clients) ──▶ Refresher::demand(client, caller token) ──▶ paused,
//!         listed in Shared::waiters, the root's timer hurried
//! root: on_tick: ask_again (each waiter's demands: a failed first call is retried after its backoff) ──▶ tick
//! root: on_tick / on_http_call_response ──credential::ready or deadline──▶ set_effective_context(stream)
//!         ──decide again──▶ edits + resume_http_request | local 503 ──▶ set_effective_context(root)
//! ```
//!
//! The root context leads every call (it outlives the streams: a call made
//! by a stream would be cancelled by Envoy when that client goes away,
//! stranding every other request waiting for the same client). A held
//! request is let go by its own worker's root: at once when that worker's
//! call is answered, else at the next tick (every [`WAIT_TICK`] while
//! anything waits), when another worker led the call.

use std::cell::RefCell;
use std::rc::{Rc, Weak};
use std::time::Duration;

use keyswap_policy::credential;
use keyswap_policy::limit::{SharedCounters, Taken};
use keyswap_policy::{Decision, KeyCheck, RequestView};
use proxy_wasm::hostcalls;
use proxy_wasm::types::{LogLevel, MapType};

use crate::credentials::{self, EnvoyRecords};
use crate::metrics::Outcome as Counted;
use crate::root::Shared;
use crate::{deny, edits, log, now_millis, record, Stage};

/// The root's tick while a request is held or a call is asked for.
pub const WAIT_TICK: Duration = Duration::from_millis(50);
/// The root's first tick after a request is held: at once, to make its call.
const HURRY_TICK: Duration = Duration::from_millis(1);

/// What the final stage reads besides the headers, kept to decide a held
/// request again.
pub(crate) struct Request {
    pub key: KeyCheck,
    pub cluster: Option<String>,
    pub route_name: Option<String>,
    /// The caller's own token for the credential service: never logged.
    pub caller: Option<String>,
    /// The subject token of an on-behalf-of exchange: never logged.
    pub subject: Option<String>,
}

/// What came of a decision on the effective context's stream.
pub(crate) enum Outcome {
    /// Edits applied: the stream goes on in this stage.
    Go(Stage),
    /// Answered locally.
    Answered,
    /// To be held until the keyed records (provider, key) arrive, at most
    /// `timeout_ms`.
    Hold { slots: Vec<(usize, String)>, timeout_ms: u64 },
}

/// A held request.
pub(crate) struct Waiter {
    context_id: u32,
    deadline: i64,
    slots: Vec<(usize, String)>,
    request: Request,
    /// Where the stream reads its final stage once let go; gone when the
    /// stream is (the client went away).
    stage: Weak<RefCell<Option<Stage>>>,
}

/// Decides the effective context's request and applies the answer; with
/// `give_up`, a request that would still wait is refused. `counters` are
/// the rate-limit buckets ([`crate::limits::EnvoyCounters`]), or
/// [`Taken`] for a held request decided again: its limits took it when it
/// was first decided, before anything was fetched for it.
pub(crate) fn decide(shared: &Shared, request: &Request, give_up: bool, counters: &mut dyn SharedCounters) -> Outcome {
    let policy = &shared.policy;
    let headers = hostcalls::get_map_bytes(MapType::HttpRequestHeaders).unwrap_or_default();
    let mut view = RequestView::from_headers(request.route_name.as_deref(), &headers);
    view.cluster = request.cluster.as_deref();
    view.key = Some(&request.key);
    view.subject = request.subject.as_deref().map(str::as_bytes);
    let mut records = EnvoyRecords::new(shared);
    match policy.decide_limited(&view, &now_millis, &records, counters) {
        Decision::Forward(mut forward) => {
            let outcome = if forward.route.is_some() { Counted::Allowed } else { Counted::Passed };
            record(shared, &forward.access_log(), outcome);
            let (secrets, used) = (std::mem::take(&mut forward.secrets), std::mem::take(&mut forward.used));
            credentials::used(shared, &mut records, &used, request);
            if !forward.is_noop() {
                edits::apply(&forward, &headers);
            }
            Outcome::Go(Stage::Final { route: forward.route.map(str::to_string), secrets, used })
        }
        Decision::Deny(denial) => {
            deny(shared, &denial);
            Outcome::Answered
        }
        Decision::Wait(wait) if give_up => {
            deny(shared, &wait.denial());
            Outcome::Answered
        }
        Decision::Wait(wait) => {
            let now = now_millis();
            let providers = policy.credential_providers();
            for (p, key) in &wait.slots {
                if let Err(full) = credential::admit(providers, &mut records, *p, key, now) {
                    if let Some(suppressed) = shared.audit.borrow_mut().admit(now.div_euclid(1000)) {
                        let path = providers.get(*p).map_or("?", |p| p.path.as_str());
                        log(
                            LogLevel::Warn,
                            &format!(
                                "keyswap: credential {path}: {} clients cached (max_clients), client {key} refused \
                                 until one is dropped for idleness ({suppressed} suppressed)",
                                full.max_keys
                            ),
                        );
                    }
                    deny(shared, &wait.denial());
                    return Outcome::Answered;
                }
            }
            let mut refresher = shared.refresher.borrow_mut();
            for (p, key) in &wait.slots {
                refresher.demand(*p, key, request.caller.as_deref(), request.subject.as_deref());
            }
            Outcome::Hold { slots: wait.slots, timeout_ms: wait.timeout_ms }
        }
    }
}

/// Lists stream `context_id` as held for `slots`, and hurries the root's
/// timer so that its call is made at once; returns where the stream finds
/// its final stage once let go.
pub(crate) fn hold(
    shared: &Shared,
    context_id: u32,
    request: Request,
    slots: Vec<(usize, String)>,
    timeout_ms: u64,
) -> Rc<RefCell<Option<Stage>>> {
    let cell = Rc::new(RefCell::new(None));
    let deadline = now_millis().saturating_add(i64::try_from(timeout_ms).unwrap_or(i64::MAX));
    let waiter = Waiter { context_id, deadline, slots, request, stage: Rc::downgrade(&cell) };
    shared.waiters.borrow_mut().push(waiter);
    credentials::pace(shared, Some(HURRY_TICK));
    cell
}

/// Asks again for what every held request waits for, before the root's
/// tick: a first call that failed is made again once its backoff ends,
/// while the request still waits (a demand for a record with a value, a
/// call in flight or leased by another worker is a no-op).
pub(crate) fn ask_again(shared: &Shared) {
    let waiters = shared.waiters.borrow();
    let mut refresher = shared.refresher.borrow_mut();
    for waiter in waiters.iter().filter(|w| w.stage.strong_count() > 0) {
        for (p, key) in &waiter.slots {
            refresher.demand(*p, key, waiter.request.caller.as_deref(), waiter.request.subject.as_deref());
        }
    }
}

/// Lets go every held request whose records arrived or whose time ran out
/// (on the root context, at `now`): each decided again on its own stream.
pub(crate) fn release(shared: &Shared, root_id: u32, now: i64) {
    let held = std::mem::take(&mut *shared.waiters.borrow_mut());
    if held.is_empty() {
        return;
    }
    let records = EnvoyRecords::new(shared);
    let mut kept = Vec::with_capacity(held.len());
    let mut switched = false;
    for waiter in held {
        let Some(cell) = waiter.stage.upgrade() else { continue };
        let give_up = now >= waiter.deadline;
        if !give_up && !credential::ready(&records, &waiter.slots, now) {
            kept.push(waiter);
            continue;
        }
        switched = true;
        if hostcalls::set_effective_context(waiter.context_id).is_err() {
            continue;
        }
        match decide(shared, &waiter.request, give_up, &mut Taken) {
            Outcome::Go(stage) => {
                *cell.borrow_mut() = Some(stage);
                let _ = hostcalls::resume_http_request();
            }
            Outcome::Answered => {}
            Outcome::Hold { .. } => kept.push(waiter),
        }
    }
    if switched {
        let _ = hostcalls::set_effective_context(root_id);
    }
    shared.waiters.borrow_mut().extend(kept);
}
