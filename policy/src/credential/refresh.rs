//! The refresh state machine for dynamic credentials, over records every
//! worker of a host shares.
//!
//! ```text
//! tick (every worker) ──read──▶ Record::due? ──write leased (CAS)──▶ lease won? ──call──▶ call id
//! answer(call id, reply) ──Provider::parse──▶ Record::succeeded | failed ──write (CAS, retried)──▶ Note to log
//! upstream 401 ──reject(Used)──▶ Record::rejected (same generation only) ──write (CAS, retried)──▶ Rejection
//! ```
//!
//! One worker leads each refresh: it wins the compare-and-swap that writes
//! the lease, makes the one call, and writes the answer back. Requests never
//! wait for a call; they read the last good values ([`crate::decide`]).
//! The host makes the calls and logs the [`Note`]s; nothing here does I/O.

use super::provider::{Answer, AnswerError, Provider, MIN_FORCED_REFRESH_MS};
use super::record::Record;

/// The largest answer a host reads from a token endpoint or credential
/// service; a larger one is a failed refresh ([`Reply::TooLarge`]).
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// How many times a refresh's outcome is written back before giving up on
/// a store that keeps changing under it.
const WRITE_ATTEMPTS: usize = 8;

/// The providers' records as a host keeps them: one per provider (by its
/// number in [`crate::Policy::credential_providers`]), shared by every
/// worker, each written with compare-and-swap. The proxy-wasm filter keeps
/// them in Envoy's shared data; [`MemoryRecords`] keeps them in memory.
pub trait SharedRecords {
    /// Provider `provider`'s record and the version it was read at (for
    /// [`Self::write`]); `None` when none is stored yet.
    fn read(&self, provider: usize) -> Option<(Record, Option<u32>)>;

    /// Stores `record` as provider `provider`'s if the stored version is
    /// still `version` (`None`: whatever is stored). False when another
    /// writer came first, or the record could not be stored.
    fn write(&mut self, provider: usize, record: &Record, version: Option<u32>) -> bool;
}

/// No records: for a host that keeps none (a route with dynamic
/// credentials is then refused, `credential_unavailable`).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoRecords;

impl SharedRecords for NoRecords {
    fn read(&self, _provider: usize) -> Option<(Record, Option<u32>)> {
        None
    }

    fn write(&mut self, _provider: usize, _record: &Record, _version: Option<u32>) -> bool {
        false
    }
}

/// Records in memory, versioned the way Envoy's shared data is: for a host
/// with one worker (the native conformance runner) and for tests.
#[derive(Debug, Clone, Default)]
pub struct MemoryRecords {
    records: Vec<Option<(Record, u32)>>,
}

impl MemoryRecords {
    /// Room for `providers` records, none stored yet.
    pub fn new(providers: usize) -> Self {
        Self { records: vec![None; providers] }
    }
}

impl SharedRecords for MemoryRecords {
    fn read(&self, provider: usize) -> Option<(Record, Option<u32>)> {
        let (record, version) = self.records.get(provider)?.as_ref()?;
        Some((record.clone(), Some(*version)))
    }

    fn write(&mut self, provider: usize, record: &Record, version: Option<u32>) -> bool {
        let Some(slot) = self.records.get_mut(provider) else { return false };
        let stored = slot.as_ref().map(|(_, v)| *v);
        if version.is_some() && version != stored {
            return false;
        }
        *slot = Some((record.clone(), stored.map_or(1, |v| v.wrapping_add(1))));
        true
    }
}

/// What came back for a call.
#[derive(Debug, Clone, Copy)]
pub enum Reply<'b> {
    /// No answer: the call timed out or its connection failed.
    Lost,
    /// An answer whose body is larger than [`MAX_ANSWER_BYTES`] (not read).
    TooLarge,
    /// An answer: its status and body.
    Answered { status: u16, body: &'b [u8] },
}

/// A refresh event worth a log line: the start and end of a failure streak,
/// a first value. Its `Display` never holds a value or a response body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note<'p> {
    pub provider: &'p Provider,
    pub event: Event,
}

/// See [`Note`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The provider's first value was stored.
    FirstValue,
    /// A value was stored after an upstream rejected the last one.
    Replaced,
    /// A refresh succeeded after this many failed ones.
    Recovered { after: u32 },
    /// The first failed refresh of a streak: why, and whether the last good
    /// value is kept (until it expires) meanwhile.
    Failing { why: String, keeping: bool },
    /// The outcome could not be stored: the records kept changing.
    NotStored,
}

impl Note<'_> {
    /// True for a failure (log it as a warning).
    pub fn is_warning(&self) -> bool {
        matches!(self.event, Event::Failing { .. } | Event::NotStored)
    }
}

impl std::fmt::Display for Note<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (path, kind) = (&self.provider.path, self.provider.kind.name());
        match &self.event {
            Event::FirstValue => write!(f, "credential {path} ({kind}): first value fetched"),
            Event::Replaced => {
                write!(f, "credential {path} ({kind}): new value fetched after the upstream rejected the last one")
            }
            Event::Recovered { after } => {
                write!(f, "credential {path} ({kind}): refreshed again after {after} failed attempts")
            }
            Event::Failing { why, keeping } => {
                let keeping = if *keeping {
                    "keeping the last good value until it expires"
                } else {
                    "its routes answer 503 credential_unavailable until one arrives"
                };
                write!(f, "credential {path} ({kind}): refresh failed: {why}; {keeping}; retrying with backoff")
            }
            Event::NotStored => {
                write!(f, "credential {path}: could not store a refresh (shared data kept changing)")
            }
        }
    }
}

/// One worker's side of the refresh: the calls it has in flight.
#[derive(Debug, Default)]
pub struct Refresher {
    /// (call id, provider number).
    in_flight: Vec<(u32, usize)>,
}

impl Refresher {
    /// For a newly loaded configuration: forgets the calls made for an
    /// earlier one (known by provider numbers in it, their answers must
    /// not land in this one's records), and creates the records that do
    /// not exist yet, so that every later write is a compare-and-swap.
    pub fn restart(&mut self, providers: &[Provider], records: &mut dyn SharedRecords) {
        self.in_flight.clear();
        for p in 0..providers.len() {
            if records.read(p).is_none() {
                records.write(p, &Record::default(), None);
            }
        }
    }

    /// The number of calls in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// One timer tick at `now` (Unix milliseconds): for each provider whose
    /// refresh is due and whose lease this worker wins, `call` makes the
    /// call (`call(number, provider)`) and gives its id, or says why it
    /// could not be made, which is a failed refresh at once.
    pub fn tick<'p>(
        &mut self,
        providers: &'p [Provider],
        records: &mut dyn SharedRecords,
        now: i64,
        call: &mut dyn FnMut(usize, &Provider) -> Result<u32, String>,
    ) -> Vec<Note<'p>> {
        let mut notes = Vec::new();
        for (p, provider) in providers.iter().enumerate() {
            if self.in_flight.iter().any(|&(_, f)| f == p) {
                continue;
            }
            let (record, version) = records.read(p).unwrap_or_default();
            if !record.due(now) {
                continue;
            }
            if !records.write(p, &record.leased(provider, now), version) {
                // Another worker took it first.
                continue;
            }
            match call(p, provider) {
                Ok(id) => self.in_flight.push((id, p)),
                Err(why) => notes.extend(finish(provider, p, records, now, Err(why))),
            }
        }
        notes
    }

    /// The reply to call `id`, received at `now`: read, and written into
    /// the provider's record. `None` when there is nothing to log, or the
    /// call is not this refresher's (made for an earlier configuration).
    pub fn answer<'p>(
        &mut self,
        providers: &'p [Provider],
        records: &mut dyn SharedRecords,
        id: u32,
        reply: Reply<'_>,
        now: i64,
    ) -> Option<Note<'p>> {
        let at = self.in_flight.iter().position(|&(call, _)| call == id)?;
        let (_, p) = self.in_flight.swap_remove(at);
        let provider = providers.get(p)?;
        let result = match reply {
            Reply::Lost => {
                Err(format!("no answer from cluster `{}` (timeout or connection failure)", provider.cluster))
            }
            Reply::TooLarge => Err(format!("the answer is larger than {MAX_ANSWER_BYTES} bytes")),
            Reply::Answered { status, body } => provider.parse(status, body, now).map_err(|AnswerError(why)| why),
        };
        finish(provider, p, records, now, result)
    }
}

/// A dynamic credential a forwarded request carried: its provider's
/// number and the generation of the values sent ([`Record::generation`]).
/// A host keeps these with the request ([`crate::Forward`]'s `used`, which
/// holds no value) and hands them back with the upstream's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Used {
    pub provider: usize,
    pub generation: u64,
}

/// A provider's values rejected by an upstream and being replaced
/// ([`reject`]): what a host logs (never a value) and counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection<'p> {
    pub provider: &'p Provider,
    /// Unix milliseconds at which the new value's call is due: the time of
    /// the 401, or later when the last forced refresh was under
    /// [`MIN_FORCED_REFRESH_MS`] before.
    pub refresh_at: i64,
    /// When the 401 arrived (Unix milliseconds).
    pub now: i64,
}

impl std::fmt::Display for Rejection<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (path, kind) = (&self.provider.path, self.provider.kind.name());
        write!(f, "credential {path} ({kind}): the upstream answered 401 to it; replacing it, ")?;
        let wait = self.refresh_at.saturating_sub(self.now);
        if wait <= 0 {
            write!(f, "fetching a new one")
        } else {
            write!(
                f,
                "fetching a new one in {} ms (at most one forced refresh per {} s)",
                wait,
                MIN_FORCED_REFRESH_MS / 1000
            )
        }
    }
}

/// Marks provider `used.provider`'s values rejected after an upstream
/// answered 401 at `now` to a request that carried them
/// ([`Record::rejected`]: refreshed at once, within the bound; kept until
/// replaced, dropped if the refresh fails), by compare-and-swap: of two
/// workers that saw 401s for the same values one marks them, and a 401 for
/// values already replaced does nothing. `None` when nothing was marked.
pub fn reject<'p>(
    providers: &'p [Provider],
    records: &mut dyn SharedRecords,
    used: Used,
    now: i64,
) -> Option<Rejection<'p>> {
    let provider = providers.get(used.provider)?;
    for _ in 0..WRITE_ATTEMPTS {
        let (record, version) = records.read(used.provider)?;
        let next = record.rejected(used.generation, now)?;
        if records.write(used.provider, &next, version) {
            return Some(Rejection { provider, refresh_at: next.refresh_at, now });
        }
    }
    None
}

/// Writes a refresh's outcome into the provider's record (compare-and-swap,
/// retried on a concurrent write); the start and end of a failure streak,
/// and a first value, are noted.
fn finish<'p>(
    provider: &'p Provider,
    p: usize,
    records: &mut dyn SharedRecords,
    now: i64,
    result: Result<Answer, String>,
) -> Option<Note<'p>> {
    for _ in 0..WRITE_ATTEMPTS {
        let (record, version) = records.read(p).unwrap_or_default();
        let (next, event) = match &result {
            Ok(answer) => {
                let (next, success) = record.succeeded(answer.clone());
                let event = if success.recovered_after > 0 {
                    Some(Event::Recovered { after: success.recovered_after })
                } else if record.rejected.is_some() {
                    Some(Event::Replaced)
                } else if record.values.is_empty() {
                    Some(Event::FirstValue)
                } else {
                    None
                };
                (next, event)
            }
            Err(why) => {
                let next = record.failed(now);
                // What the next request finds: a rejected value is dropped
                // by a failed refetch, so it is not "kept".
                let keeping = next.usable(now).is_some();
                let event = (next.failures == 1).then(|| Event::Failing { why: why.clone(), keeping });
                (next, event)
            }
        };
        if records.write(p, &next, version) {
            return event.map(|event| Note { provider, event });
        }
    }
    Some(Note { provider, event: Event::NotStored })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credential::Kind;

    fn provider() -> Provider {
        Provider {
            id: "p".into(),
            path: "routes[0].inject[0].value.oauth2".into(),
            kind: Kind::Oauth2,
            cluster: "idp".into(),
            headers: Vec::new(),
            body: None,
            timeout_ms: 5000,
            pointers: Vec::new(),
            margin_ms: 60_000,
            refresh_ms: 300_000,
        }
    }

    /// Two workers share one store: one call, whoever answers, and the
    /// other worker sees the value; a failure streak is noted once.
    #[test]
    fn one_worker_leads_each_refresh() {
        let providers = [provider()];
        let mut store = MemoryRecords::new(1);
        let (mut a, mut b) = (Refresher::default(), Refresher::default());
        a.restart(&providers, &mut store);
        b.restart(&providers, &mut store);
        let mut ids = 0;
        let mut call = |_: usize, _: &Provider| {
            ids += 1;
            Ok(ids)
        };
        assert!(a.tick(&providers, &mut store, 0, &mut call).is_empty());
        assert!(b.tick(&providers, &mut store, 0, &mut call).is_empty());
        assert_eq!((a.in_flight(), b.in_flight()), (1, 0), "the lease lets one worker call");
        let body = br#"{"access_token":"tok-1","expires_in":3600}"#;
        let note = a.answer(&providers, &mut store, 1, Reply::Answered { status: 200, body }, 10);
        assert_eq!(
            note.map(|n| n.to_string()).as_deref(),
            Some("credential routes[0].inject[0].value.oauth2 (oauth2): first value fetched")
        );
        assert_eq!(b.answer(&providers, &mut store, 1, Reply::Lost, 10), None, "not b's call");
        let record = store.read(0).map(|(r, _)| r).unwrap_or_default();
        assert_eq!(record.usable(20), Some(&["tok-1".to_string()][..]));

        // Due again: two failures in a row are one streak.
        let due = record.refresh_at;
        assert!(b.tick(&providers, &mut store, due, &mut call).is_empty());
        let note = b.answer(&providers, &mut store, 2, Reply::Answered { status: 500, body: b"tok-1" }, due);
        let note = note.map(|n| (n.is_warning(), n.to_string()));
        assert_eq!(
            note,
            Some((
                true,
                "credential routes[0].inject[0].value.oauth2 (oauth2): refresh failed: the token endpoint answered \
                 status 500; keeping the last good value until it expires; retrying with backoff"
                    .to_string()
            ))
        );
        let mut refused = |_: usize, _: &Provider| Err("the call was refused".to_string());
        assert!(a.tick(&providers, &mut store, due + 1000, &mut refused).is_empty(), "second failure, not noted");
        let record = store.read(0).map(|(r, _)| r).unwrap_or_default();
        assert_eq!(record.failures, 2);
    }

    /// A 401 marks the values it was sent with, once, and forces one
    /// refresh at once; the values are kept until replaced (so one client's
    /// 401 never cuts the others off) and dropped if the refresh fails; a
    /// 401 for values already marked or replaced does nothing; forced
    /// refreshes are at least MIN_FORCED_REFRESH_MS apart.
    #[test]
    fn a_rejected_value_is_replaced_once_with_a_bound() {
        let providers = [provider()];
        let mut store = MemoryRecords::new(1);
        let mut a = Refresher::default();
        a.restart(&providers, &mut store);
        let mut ids = 0;
        let mut call = |_: usize, _: &Provider| {
            ids += 1;
            Ok(ids)
        };
        let token = |t: &str| format!(r#"{{"access_token":"{t}","expires_in":3600}}"#);
        let record = |store: &MemoryRecords| store.read(0).map(|(r, _)| r).unwrap_or_default();
        fn answered(body: &str) -> Reply<'_> {
            Reply::Answered { status: 200, body: body.as_bytes() }
        }
        a.tick(&providers, &mut store, 0, &mut call);
        let body = token("tok-1");
        a.answer(&providers, &mut store, 1, answered(&body), 0);
        let first = Used { provider: 0, generation: record(&store).generation };

        // Two workers saw a 401 for tok-1: one mark.
        let marked = reject(&providers, &mut store, first, 1000);
        assert_eq!(marked.as_ref().map(|r| r.refresh_at), Some(1000));
        assert_eq!(
            marked.map(|r| r.to_string()).as_deref(),
            Some("credential routes[0].inject[0].value.oauth2 (oauth2): the upstream answered 401 to it; replacing it, fetching a new one")
        );
        assert_eq!(reject(&providers, &mut store, first, 1000), None, "already marked");
        let now = record(&store);
        assert_eq!(now.usable(1000).map(<[String]>::len), Some(1), "kept until replaced");
        assert!(now.due(1000), "due at once");

        // The next tick fetches tok-2; a late 401 for tok-1 leaves it.
        assert!(a.tick(&providers, &mut store, 1500, &mut call).is_empty());
        let body = token("tok-2");
        let note = a.answer(&providers, &mut store, 2, answered(&body), 1600);
        assert_eq!(note.map(|n| n.event), Some(Event::Replaced));
        assert_eq!(record(&store).values, ["tok-2"]);
        assert_eq!(reject(&providers, &mut store, first, 1700), None, "a stale 401 touches no newer value");
        let second = Used { provider: 0, generation: record(&store).generation };
        assert_ne!(first, second);

        // tok-2 rejected too, 1.7 s after the last forced refresh: kept,
        // and the next call waits until 5 s after the last one.
        let marked = reject(&providers, &mut store, second, 1700).map(|r| r.refresh_at);
        assert_eq!(marked, Some(1000 + MIN_FORCED_REFRESH_MS));
        assert!(a.tick(&providers, &mut store, 2000, &mut call).is_empty());
        assert!(a.tick(&providers, &mut store, 5999, &mut call).is_empty());
        assert_eq!(a.in_flight(), 0, "no call before the bound");
        assert_eq!(record(&store).usable(5999).map(<[String]>::len), Some(1));
        a.tick(&providers, &mut store, 6000, &mut call);
        assert_eq!(a.in_flight(), 1);

        // That refresh fails: a rejected value is not kept past it, and
        // the warning says so (not "keeping the last good value").
        let note = a.answer(&providers, &mut store, 3, Reply::Lost, 6100);
        assert_eq!(record(&store).usable(6100), None, "dropped after a failed refetch");
        assert_eq!(
            note.map(|n| n.to_string()).as_deref(),
            Some(
                "credential routes[0].inject[0].value.oauth2 (oauth2): refresh failed: no answer from cluster `idp` \
                 (timeout or connection failure); its routes answer 503 credential_unavailable until one arrives; \
                 retrying with backoff"
            )
        );
    }

    #[test]
    fn writes_are_compare_and_swap() {
        let mut store = MemoryRecords::new(1);
        assert!(store.read(0).is_none());
        assert!(store.write(0, &Record::default(), None));
        let (_, version) = store.read(0).unwrap_or_default();
        assert!(store.write(0, &Record::default(), version));
        assert!(!store.write(0, &Record::default(), version), "a stale version loses");
        assert!(!store.write(1, &Record::default(), None), "no such provider");
    }
}
