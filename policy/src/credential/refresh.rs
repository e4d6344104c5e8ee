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

use super::provider::{jwt_exp_ms, Answer, AnswerError, Provider, MIN_FORCED_REFRESH_MS};
use super::record::{Index, Record};

/// The largest answer a host reads from a token endpoint or credential
/// service; a larger one is a failed refresh ([`Reply::TooLarge`]).
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// How many times a refresh's outcome is written back before giving up on
/// a store that keeps changing under it.
const WRITE_ATTEMPTS: usize = 8;

/// Which shared record: one per provider, or, for a keyed provider (a
/// `{client}` fetch, an on-behalf-of exchange), one per (provider, key)
/// plus the provider's index of the keys it holds. The key is a client id
/// (a `{client}` fetch) or the digest of a subject token
/// ([`Provider::subject_key`]).
///
/// A key's record is stored in one of a fixed pool of `max_keys` slots per
/// provider ([`Slot::Pool`]), the one its [`Index`] entry names, reused by
/// another key once it is dropped or evicted: Envoy's shared data has no
/// delete, so a record per key ever seen would grow without bound. A host
/// stores [`Slot::Provider`], [`Slot::Pool`] and [`Slot::Index`];
/// [`SharedRecords::read`] and [`SharedRecords::write`] find a
/// [`Slot::Keyed`] record's pool slot and check the key it is stamped with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Slot<'k> {
    /// The one record of an unkeyed provider.
    Provider(usize),
    /// A keyed provider's record for one key, wherever it is stored.
    Keyed(usize, &'k str),
    /// A keyed provider's [`Index`].
    Index(usize),
    /// A keyed provider's pool slot: the record of the key the index gives
    /// it, if any.
    Pool(usize, u32),
}

impl Slot<'_> {
    /// The provider, by number.
    pub fn provider(self) -> usize {
        match self {
            Slot::Provider(p) | Slot::Keyed(p, _) | Slot::Index(p) | Slot::Pool(p, _) => p,
        }
    }

    /// The key of a keyed record.
    pub fn key(&self) -> Option<&str> {
        match self {
            Slot::Keyed(_, key) => Some(key),
            Slot::Provider(_) | Slot::Index(_) | Slot::Pool(..) => None,
        }
    }

    /// Its name in a host's shared storage (Envoy's shared data):
    /// `keyswap.credential.<provider id>`, with `.slot.<n>` or `.index` for
    /// a keyed provider. `None` for no such provider, and for
    /// [`Slot::Keyed`], which is stored in a pool slot.
    pub fn storage_key(self, providers: &[Provider]) -> Option<String> {
        let id = &providers.get(self.provider())?.id;
        match self {
            Slot::Provider(_) => Some(format!("keyswap.credential.{id}")),
            Slot::Keyed(..) => None,
            Slot::Index(_) => Some(format!("keyswap.credential.{id}.index")),
            Slot::Pool(_, n) => Some(format!("keyswap.credential.{id}.slot.{n}")),
        }
    }
}

/// The providers' records as a host keeps them ([`Slot`]), shared by every
/// worker, each written with compare-and-swap. The proxy-wasm filter keeps
/// them in Envoy's shared data; [`MemoryRecords`] keeps them in memory.
///
/// Versions are the host's: Envoy's are drawn from one counter for all of
/// shared data, so a version read from one slot never matches another's.
pub trait SharedRecords {
    /// The bytes stored for `slot` ([`Slot::Provider`], [`Slot::Index`] or
    /// [`Slot::Pool`]) and the version they were read at (for
    /// [`Self::write_bytes`]); `None` when nothing is stored yet.
    fn read_bytes(&self, slot: Slot<'_>) -> Option<(Vec<u8>, Option<u32>)>;

    /// Stores `bytes` for `slot` if the stored version is still `version`
    /// (`None`: whatever is stored). False when another writer came first,
    /// or they could not be stored.
    fn write_bytes(&mut self, slot: Slot<'_>, bytes: &[u8], version: Option<u32>) -> bool;

    /// The pool slot this worker last found keyed provider `provider`'s
    /// `key` in, if it keeps such hints (the filter does, so that a request
    /// reads one record, not the index too). A stale hint is harmless: the
    /// record there is stamped with another key, and the index is read.
    fn hint(&self, _provider: usize, _key: &str) -> Option<u32> {
        None
    }

    /// Remembers where `key` was found, for [`Self::hint`].
    fn remember(&self, _provider: usize, _key: &str, _slot: u32) {}

    /// The record stored for `slot`, as [`Self::read_bytes`]. For a
    /// [`Slot::Keyed`] one: the record in the key's pool slot (the hinted
    /// one, else the one its index entry names) when it is stamped with
    /// that key; a record of another key is never returned.
    fn read(&self, slot: Slot<'_>) -> Option<(Record, Option<u32>)> {
        let Slot::Keyed(p, key) = slot else {
            return self.read_bytes(slot).map(|(bytes, version)| (Record::decode(&bytes), version));
        };
        let owned = |n: u32| {
            let (bytes, version) = self.read_bytes(Slot::Pool(p, n))?;
            let record = Record::decode(&bytes);
            (record.owner == key).then_some((record, version))
        };
        let hinted = self.hint(p, key);
        if let Some(found) = hinted.and_then(owned) {
            return Some(found);
        }
        let n = listed_slot(self, p, key)?;
        if hinted != Some(n) {
            self.remember(p, key, n);
        }
        owned(n)
    }

    /// Stores a record, as [`Self::write_bytes`]. A [`Slot::Keyed`] record
    /// is stamped with its key and written to the key's pool slot only by
    /// compare-and-swap on a `version` read from it ([`Self::read`]), so it
    /// lands only over that key's own record: a write for a key evicted
    /// meanwhile (its slot given to another key) fails, as does one with no
    /// version (a key's record is made by [`admit`] alone).
    fn write(&mut self, slot: Slot<'_>, record: &Record, version: Option<u32>) -> bool {
        let Slot::Keyed(p, key) = slot else { return self.write_bytes(slot, &record.encode(), version) };
        if version.is_none() {
            return false;
        }
        let Some(n) = self.hint(p, key).or_else(|| listed_slot(self, p, key)) else { return false };
        let stamped = Record { owner: key.to_string(), ..record.clone() };
        self.write_bytes(Slot::Pool(p, n), &stamped.encode(), version)
    }
}

/// One worker's hints of the pool slot each key was last found in
/// ([`SharedRecords::hint`]), so that a request reads its key's record and
/// not the index too. At most `limit` are kept (past it all are forgotten
/// and found again in the index), so a worker's memory stays bounded
/// however many keys come and go.
#[derive(Default)]
pub struct Hints {
    slots: std::cell::RefCell<std::collections::HashMap<(usize, String), u32>>,
    limit: usize,
}

impl Hints {
    /// Room for `limit` hints: the providers' `max_keys`, summed.
    pub fn new(providers: &[Provider]) -> Self {
        let limit = providers.iter().filter_map(|p| p.keyed.as_ref()).map(|k| k.max_keys).sum();
        Self { slots: std::cell::RefCell::default(), limit }
    }

    /// Where `provider`'s `key` was last found.
    pub fn get(&self, provider: usize, key: &str) -> Option<u32> {
        self.slots.borrow().get(&(provider, key.to_string())).copied()
    }

    /// Remembers where `provider`'s `key` was found.
    pub fn set(&self, provider: usize, key: &str, slot: u32) {
        let mut slots = self.slots.borrow_mut();
        if slots.len() >= self.limit {
            slots.clear();
        }
        slots.insert((provider, key.to_string()), slot);
    }
}

// Keys may be subjects' digests: counted, not shown.
impl std::fmt::Debug for Hints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hints").field("slots", &self.slots.borrow().len()).field("limit", &self.limit).finish()
    }
}

/// The pool slot keyed provider `p`'s index gives `key`, if listed.
fn listed_slot<R: SharedRecords + ?Sized>(records: &R, p: usize, key: &str) -> Option<u32> {
    let (bytes, _) = records.read_bytes(Slot::Index(p))?;
    Index::find(&bytes, key)
}

/// No records: for a host that keeps none (a route with dynamic
/// credentials is then refused, `credential_unavailable`).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoRecords;

impl SharedRecords for NoRecords {
    fn read_bytes(&self, _slot: Slot<'_>) -> Option<(Vec<u8>, Option<u32>)> {
        None
    }

    fn write_bytes(&mut self, _slot: Slot<'_>, _bytes: &[u8], _version: Option<u32>) -> bool {
        false
    }
}

/// Records in memory, versioned the way Envoy's shared data is (one
/// counter for every record): for a host with one worker (the native
/// conformance runner) and for tests.
#[derive(Debug, Clone, Default)]
pub struct MemoryRecords {
    providers: usize,
    records: std::collections::BTreeMap<(usize, u8, u32), (Vec<u8>, u32)>,
    versions: u32,
}

impl MemoryRecords {
    /// Room for the records of `providers` providers, none stored yet.
    pub fn new(providers: usize) -> Self {
        Self { providers, records: std::collections::BTreeMap::new(), versions: 0 }
    }

    fn at(&self, slot: Slot<'_>) -> Option<(usize, u8, u32)> {
        let at = match slot {
            Slot::Provider(p) => (p, 0, 0),
            Slot::Keyed(..) => return None,
            Slot::Pool(p, n) => (p, 1, n),
            Slot::Index(p) => (p, 2, 0),
        };
        (at.0 < self.providers).then_some(at)
    }

    /// How many records are stored (every slot written at least once).
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// True when nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

impl SharedRecords for MemoryRecords {
    fn read_bytes(&self, slot: Slot<'_>) -> Option<(Vec<u8>, Option<u32>)> {
        let (bytes, version) = self.records.get(&self.at(slot)?)?;
        Some((bytes.clone(), Some(*version)))
    }

    fn write_bytes(&mut self, slot: Slot<'_>, bytes: &[u8], version: Option<u32>) -> bool {
        let Some(at) = self.at(slot) else { return false };
        let stored = self.records.get(&at).map(|(_, v)| *v);
        if version.is_some() && stored.is_some() && version != stored {
            return false;
        }
        self.versions = self.versions.wrapping_add(1).max(1);
        self.records.insert(at, (bytes.to_vec(), self.versions));
        true
    }
}

/// How a host makes a call: the provider (cluster, timeout), the call's
/// headers ([`Provider::call_headers`]) and body ([`Provider::call_body`]);
/// the call's id, or why it could not be made.
pub type Call<'c> = dyn FnMut(&Provider, &[(String, String)], Option<&[u8]>) -> Result<u32, String> + 'c;

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
/// a first value, a keyed value dropped. Its `Display` never holds a value,
/// a token or a response body (a key is a client id, which logs name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note<'p> {
    pub provider: &'p Provider,
    /// The key of a keyed provider's record.
    pub key: Option<String>,
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
    /// A keyed record went unused for the idle time and was dropped.
    Dropped { idle_seconds: i64 },
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
        write!(f, "credential {path} ({kind})")?;
        match &self.key {
            // A subject's key is a digest: named by nothing.
            Some(_) if self.provider.subject.is_some() => write!(f, " for a subject")?,
            Some(key) => write!(f, " for client {key}")?,
            None => {}
        }
        match &self.event {
            Event::FirstValue => write!(f, ": first value fetched"),
            Event::Replaced => write!(f, ": new value fetched after the upstream rejected the last one"),
            Event::Recovered { after } => write!(f, ": refreshed again after {after} failed attempts"),
            Event::Failing { why, keeping } => {
                let keeping = if *keeping {
                    "keeping the last good value until it expires"
                } else {
                    "its routes answer 503 credential_unavailable until one arrives"
                };
                write!(f, ": refresh failed: {why}; {keeping}; retrying with backoff")
            }
            Event::NotStored => write!(f, ": could not store a refresh (shared data kept changing)"),
            Event::Dropped { idle_seconds } => write!(f, ": dropped after {idle_seconds} s unused"),
        }
    }
}

/// A keyed record a request asked for (its first value, or a refresh that
/// is due while the request uses the cached one), with the caller's own
/// token for the call when the request carried one.
struct Demand {
    provider: usize,
    key: String,
    authorization: Option<String>,
    /// The subject token of an on-behalf-of exchange.
    subject: Option<String>,
}

/// One worker's side of the refresh: the calls it has in flight, the keyed
/// records requests asked it for, and the keyed records it fetched and so
/// watches for idleness.
#[derive(Debug, Default)]
pub struct Refresher {
    /// (call id, provider number, key of a keyed record, the subject
    /// token's own expiry: the exchanged token is never kept past it).
    in_flight: Vec<(u32, usize, Option<String>, Option<i64>)>,
    demands: Vec<Demand>,
    /// (provider, key, when to look at it next): keyed records this worker
    /// asked for, dropped when unused for their idle time.
    tracked: Vec<(usize, String, i64)>,
}

// The caller's token never shows: demands are counted.
impl std::fmt::Debug for Demand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Demand")
            .field("provider", &self.provider)
            .field("key", &self.key)
            .field("authorization", &self.authorization.as_ref().map(|_| ".."))
            .field("subject", &self.subject.as_ref().map(|_| ".."))
            .finish()
    }
}

impl Refresher {
    /// For a newly loaded configuration: forgets the calls, demands and
    /// keyed records of an earlier one (known by provider numbers in it,
    /// their answers must not land in this one's records), and creates the
    /// unkeyed records and keyed providers' indexes that do not exist yet,
    /// so that every later write is a compare-and-swap.
    pub fn restart(&mut self, providers: &[Provider], records: &mut dyn SharedRecords) {
        self.in_flight.clear();
        self.demands.clear();
        self.tracked.clear();
        for (p, provider) in providers.iter().enumerate() {
            if provider.keyed.is_none() && records.read(Slot::Provider(p)).is_none() {
                records.write(Slot::Provider(p), &Record::default(), None);
            }
            if provider.keyed.is_some() && records.read_bytes(Slot::Index(p)).is_none() {
                records.write_bytes(Slot::Index(p), &Index::default().encode(), None);
            }
        }
    }

    /// The number of calls in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// True when requests asked for keyed records not called for yet (a
    /// host ticks soon then).
    pub fn has_demands(&self) -> bool {
        !self.demands.is_empty()
    }

    /// Keyed provider `provider`'s record for `key` is wanted by a request:
    /// called for on the next tick if due and this worker wins its lease,
    /// with `authorization` (the caller's own token) instead of the
    /// configured one when given, and for an on-behalf-of exchange with the
    /// request's `subject` token (whose digest `key` is). The record is then
    /// watched for idleness.
    pub fn demand(&mut self, provider: usize, key: &str, authorization: Option<&str>, subject: Option<&str>) {
        match self.demands.iter_mut().find(|d| d.provider == provider && d.key == key) {
            Some(known) => {
                if known.authorization.is_none() {
                    known.authorization = authorization.map(str::to_string);
                }
                if known.subject.is_none() {
                    known.subject = subject.map(str::to_string);
                }
            }
            None => self.demands.push(Demand {
                provider,
                key: key.to_string(),
                authorization: authorization.map(str::to_string),
                subject: subject.map(str::to_string),
            }),
        }
        if !self.tracked.iter().any(|(p, k, _)| *p == provider && k == key) {
            self.tracked.push((provider, key.to_string(), 0));
        }
    }

    /// One timer tick at `now` (Unix milliseconds): for each unkeyed
    /// provider, and each keyed record a request asked for, whose refresh
    /// is due and whose lease this worker wins, `call` makes the call
    /// (`call(provider, headers)`) and gives its id, or says why it could
    /// not be made, which is a failed refresh at once. Keyed records this
    /// worker watches that went unused for their idle time are dropped.
    pub fn tick<'p>(
        &mut self,
        providers: &'p [Provider],
        records: &mut dyn SharedRecords,
        now: i64,
        call: &mut Call<'_>,
    ) -> Vec<Note<'p>> {
        let mut notes = Vec::new();
        for (p, provider) in providers.iter().enumerate() {
            if provider.keyed.is_some() || self.in_flight.iter().any(|(_, f, _, _)| *f == p) {
                continue;
            }
            let headers = provider.call_headers(None, None);
            let request = (&headers[..], provider.body.as_deref(), None);
            self.lead(provider, Slot::Provider(p), records, now, request, call, &mut notes);
        }
        let mut waiting = Vec::new();
        for demand in std::mem::take(&mut self.demands) {
            let Some(provider) = providers.get(demand.provider).filter(|p| p.keyed.is_some()) else { continue };
            let slot = Slot::Keyed(demand.provider, &demand.key);
            if self.calling(slot) {
                continue;
            }
            // An exchange authenticates as configured (its client), never
            // with a caller's token, and needs the request's subject.
            let (authorization, body, cap) = match (&provider.subject, &demand.subject) {
                (None, _) => (demand.authorization.as_deref(), provider.body.clone(), None),
                (Some(_), Some(subject)) => (None, provider.call_body(Some(subject)), jwt_exp_ms(subject)),
                (Some(_), None) => continue,
            };
            let headers = provider.call_headers(Some(&demand.key), authorization);
            let request = (&headers[..], body.as_deref(), cap);
            if self.lead(provider, slot, records, now, request, call, &mut notes) == Lead::Later {
                waiting.push(demand);
            }
        }
        // A first value whose last call failed is asked for again once its
        // backoff ends; a demand for a record that has a value, or whose
        // call another worker leads, is served.
        self.demands = waiting;
        self.drop_idle(providers, records, now, &mut notes);
        notes
    }

    fn calling(&self, slot: Slot<'_>) -> bool {
        self.in_flight.iter().any(|(_, p, key, _)| *p == slot.provider() && key.as_deref() == slot.key())
    }

    /// Takes `slot`'s lease if its refresh is due and makes the call.
    #[allow(clippy::too_many_arguments)]
    fn lead<'p>(
        &mut self,
        provider: &'p Provider,
        slot: Slot<'_>,
        records: &mut dyn SharedRecords,
        now: i64,
        (headers, body, cap): Request<'_>,
        call: &mut Call<'_>,
        notes: &mut Vec<Note<'p>>,
    ) -> Lead {
        let Some((record, version)) = records.read(slot) else { return Lead::Done };
        if !record.due(now) {
            let backing_off = record.values.is_empty() && now >= record.lease_until;
            return if backing_off { Lead::Later } else { Lead::Done };
        }
        if !records.write(slot, &record.leased(provider, now), version) {
            // Another worker took it first.
            return Lead::Done;
        }
        match call(provider, headers, body) {
            Ok(id) => self.in_flight.push((id, slot.provider(), slot.key().map(str::to_string), cap)),
            Err(why) => notes.extend(finish(provider, slot, records, now, Err(why))),
        }
        Lead::Done
    }

    /// Drops the watched keyed records unused for their idle time (one
    /// worker's compare-and-swap wins), and forgets those gone.
    fn drop_idle<'p>(
        &mut self,
        providers: &'p [Provider],
        records: &mut dyn SharedRecords,
        now: i64,
        notes: &mut Vec<Note<'p>>,
    ) {
        let mut kept = Vec::with_capacity(self.tracked.len());
        for (p, key, check_at) in std::mem::take(&mut self.tracked) {
            let Some(keyed) = providers.get(p).and_then(|provider| provider.keyed.as_ref()) else { continue };
            if check_at > now || self.calling(Slot::Keyed(p, &key)) {
                kept.push((p, key, check_at));
                continue;
            }
            let Some((record, version)) = records.read(Slot::Keyed(p, &key)) else { continue };
            if !record.idle(keyed.idle_ms, now) {
                let next = record.used_at.saturating_add(keyed.idle_ms).max(now.saturating_add(1));
                kept.push((p, key, next));
                continue;
            }
            if records.write(Slot::Keyed(p, &key), &record.dropped(), version) {
                unlist(records, p, &key);
                notes.push(Note {
                    provider: &providers[p],
                    key: Some(key),
                    event: Event::Dropped { idle_seconds: keyed.idle_ms / 1000 },
                });
            }
            // Dropped here or by another worker: either way not watched.
        }
        self.tracked = kept;
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
        let at = self.in_flight.iter().position(|(call, _, _, _)| *call == id)?;
        let (_, p, key, cap) = self.in_flight.swap_remove(at);
        let provider = providers.get(p)?;
        let slot = match &key {
            Some(key) => Slot::Keyed(p, key),
            None => Slot::Provider(p),
        };
        let result = match reply {
            Reply::Lost => {
                Err(format!("no answer from cluster `{}` (timeout or connection failure)", provider.cluster))
            }
            Reply::TooLarge => Err(format!("the answer is larger than {MAX_ANSWER_BYTES} bytes")),
            // The STS refused the subject (or it expired before the
            // answer): the caller's token is bad, not the STS.
            Reply::Answered { status, body } if provider.refuses_subject(status, body) => {
                return refuse(provider, slot, records, now);
            }
            Reply::Answered { .. } if cap.is_some_and(|cap| cap <= now) => return refuse(provider, slot, records, now),
            Reply::Answered { status, body } => {
                provider.parse(status, body, now).map(|a| a.capped(cap)).map_err(|AnswerError(why)| why)
            }
        };
        finish(provider, slot, records, now, result)
    }
}

/// One call's headers and body, and the subject token's own expiry (an
/// on-behalf-of exchange's token is never kept past it).
type Request<'r> = (&'r [(String, String)], Option<&'r [u8]>, Option<i64>);

/// What [`Refresher::lead`] made of a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lead {
    /// Called, led by another worker, or holding a value: nothing more.
    Done,
    /// No value and in backoff after a failed call: ask again later.
    Later,
}

/// Writes the STS's refusal of a subject into `slot`'s record
/// ([`Record::refused_subject`]). Nothing to log: the caller is answered
/// `invalid_subject_token`, and a refused token is the caller's doing.
fn refuse<'p>(provider: &'p Provider, slot: Slot<'_>, records: &mut dyn SharedRecords, now: i64) -> Option<Note<'p>> {
    for _ in 0..WRITE_ATTEMPTS {
        // Evicted meanwhile (its slot perhaps another subject's): nothing
        // to keep.
        let (record, version) = records.read(slot)?;
        if records.write(slot, &record.refused_subject(now), version) {
            return None;
        }
    }
    Some(Note { provider, key: slot.key().map(str::to_string), event: Event::NotStored })
}

/// A keyed record past its provider's `max_keys` keys ([`admit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full {
    pub max_keys: usize,
}

/// Admits `key` to keyed provider `provider` at `now`, for a request that
/// waits for its first value: listed in the provider's [`Index`] (by
/// compare-and-swap) unless listed already, with a pool slot no listed key
/// holds (or, for subjects past `max_keys`, the slot of the least recently
/// used key, which is evicted), and its record made there, stamped with
/// the key, so that the next tick calls for it. A key already holding a
/// value is admitted as it is.
///
/// Of two workers admitting different keys at once, the index's
/// compare-and-swap lets one win; the other reads the index again and
/// takes another slot (or evicts the next key).
///
/// # Errors
/// [`Full`] when `max_keys` other keys are listed of a provider that does
/// not evict (a `{client}` fetch): the request is refused
/// (`credential_unavailable`) and nothing is evicted, so a burst of new
/// clients never pushes out the values of clients in use; a key is
/// unlisted when it is dropped for idleness.
pub fn admit(
    providers: &[Provider],
    records: &mut dyn SharedRecords,
    provider: usize,
    key: &str,
    now: i64,
) -> Result<(), Full> {
    let Some(keyed) = providers.get(provider).and_then(|p| p.keyed.as_ref()) else { return Ok(()) };
    for _ in 0..WRITE_ATTEMPTS {
        let stored = records.read(Slot::Keyed(provider, key));
        if stored.as_ref().is_some_and(|(record, _)| !record.values.is_empty()) {
            return Ok(());
        }
        let Some((n, listed)) = list(records, provider, key, keyed)? else { return Ok(()) };
        records.remember(provider, key, n);
        match stored {
            // Not yet stored in its slot (or found by a hint at a slot it
            // just lost): made there, over whatever record of an evicted
            // or dropped key the slot holds.
            _ if listed => claim(records, provider, n, key, now),
            None => claim(records, provider, n, key, now),
            Some((record, version)) if record.idle(keyed.touch_ms(), now) => {
                records.write(Slot::Keyed(provider, key), &Record { used_at: now, ..record }, version);
            }
            Some(_) => {}
        }
        // Its record is there, unless a concurrent admission took its slot
        // before it was made: listed again then.
        if records.read(Slot::Keyed(provider, key)).is_some() {
            return Ok(());
        }
    }
    Ok(())
}

/// Lists `key` in keyed provider `provider`'s index unless listed already:
/// its pool slot, and whether this call listed it. `None` when the index
/// kept changing under it.
fn list(
    records: &mut dyn SharedRecords,
    provider: usize,
    key: &str,
    keyed: &super::Keyed,
) -> Result<Option<(u32, bool)>, Full> {
    for _ in 0..WRITE_ATTEMPTS {
        let Some((bytes, version)) = records.read_bytes(Slot::Index(provider)) else {
            // Made by Refresher::restart; should it be missing, made here
            // and read again: a key is only ever listed by compare-and-swap.
            records.write_bytes(Slot::Index(provider), &Index::default().encode(), None);
            continue;
        };
        let mut index = Index::decode(&bytes);
        if let Some(n) = index.slot_of(key) {
            return Ok(Some((n, false)));
        }
        let mut evicted = Vec::new();
        while index.entries.len() >= keyed.max_keys {
            if !keyed.evicts || index.entries.is_empty() {
                return Err(Full { max_keys: keyed.max_keys });
            }
            // Subjects: the least recently used (listed first) makes room.
            evicted.push(index.entries.remove(0));
        }
        // Fewer than max_keys listed: a slot under max_keys is free.
        let Some(n) = index.free_slot(keyed.max_keys) else { return Err(Full { max_keys: keyed.max_keys }) };
        index.entries.push((key.to_string(), n));
        if version.is_some() && records.write_bytes(Slot::Index(provider), &index.encode(), version) {
            for (old, m) in evicted.into_iter().filter(|(_, m)| *m != n) {
                evict(records, provider, m, &old);
            }
            return Ok(Some((n, true)));
        }
    }
    Ok(None)
}

/// Makes `key`'s record in pool slot `n` of keyed provider `p`, over the
/// record of the key that held it before (compare-and-swap, retried), for
/// as long as the index still gives `n` to `key`: a worker that lost the
/// slot to a later admission (`key` evicted in between) stops, and never
/// writes over the newer key's record. Two workers making the same key's
/// record at once leave one (the second finds it stamped and stops).
fn claim(records: &mut dyn SharedRecords, p: usize, n: u32, key: &str, now: i64) {
    for _ in 0..WRITE_ATTEMPTS {
        let current = records.read_bytes(Slot::Pool(p, n));
        if current.as_ref().is_some_and(|(bytes, _)| Record::decode(bytes).owner == key) {
            return;
        }
        if listed_slot(records, p, key) != Some(n) {
            return;
        }
        let record = Record { used_at: now, owner: key.to_string(), ..Record::default() };
        if records.write_bytes(Slot::Pool(p, n), &record.encode(), current.and_then(|(_, version)| version)) {
            return;
        }
    }
}

/// True when every keyed record `slots` (provider, key) holds a usable
/// value at `now`, or one was refused by the STS: a request waiting for
/// them can be decided again.
pub fn ready(records: &dyn SharedRecords, slots: &[(usize, String)], now: i64) -> bool {
    let settled = |(record, _): (Record, Option<u32>)| record.usable(now).is_some() || record.refused;
    slots.iter().all(|(p, key)| records.read(Slot::Keyed(*p, key)).is_some_and(settled))
}

/// Drops the record of `key` in pool slot `n`, evicted from keyed provider
/// `p`'s index (compare-and-swap, retried) when the slot is not reused at
/// once (the index shrank: `max_keys` lowered), so that it is not served
/// meanwhile; a slot reused by the admission is made over by [`claim`].
fn evict(records: &mut dyn SharedRecords, p: usize, n: u32, key: &str) {
    for _ in 0..WRITE_ATTEMPTS {
        let Some((bytes, version)) = records.read_bytes(Slot::Pool(p, n)) else { return };
        let record = Record::decode(&bytes);
        if record.owner != key || records.write_bytes(Slot::Pool(p, n), &record.dropped().encode(), version) {
            return;
        }
    }
}

/// Moves `key` to the end of keyed provider `p`'s index (most recently
/// used), for a provider that evicts its least recently used key: done on
/// a touch, so at most once per [`super::Keyed::touch_ms`] per worker.
fn relist(records: &mut dyn SharedRecords, p: usize, key: &str) {
    let Some((bytes, version)) = records.read_bytes(Slot::Index(p)) else { return };
    let mut index = Index::decode(&bytes);
    let Some(at) = index.entries.iter().position(|(k, _)| k == key) else { return };
    if at + 1 == index.entries.len() {
        return;
    }
    let moved = index.entries.remove(at);
    index.entries.push(moved);
    // One try: a lost race leaves the order a little stale, nothing more.
    records.write_bytes(Slot::Index(p), &index.encode(), version);
}

/// Removes `key` from keyed provider `p`'s index (compare-and-swap,
/// retried), which frees its pool slot.
fn unlist(records: &mut dyn SharedRecords, p: usize, key: &str) {
    for _ in 0..WRITE_ATTEMPTS {
        let Some((bytes, version)) = records.read_bytes(Slot::Index(p)) else { return };
        let mut index = Index::decode(&bytes);
        let before = index.entries.len();
        index.entries.retain(|(k, _)| k != key);
        if index.entries.len() == before || records.write_bytes(Slot::Index(p), &index.encode(), version) {
            return;
        }
    }
}

/// Marks a keyed record used at `now` (one compare-and-swap, not retried:
/// a lost write is made by the next request). Hosts call it only for a
/// [`Used`] with `touch` set, so at most once per
/// [`super::Keyed::touch_ms`] per worker.
pub fn touch(providers: &[Provider], records: &mut dyn SharedRecords, used: &Used, now: i64) {
    let Some(key) = &used.key else { return };
    let slot = Slot::Keyed(used.provider, key);
    if let Some((record, version)) = records.read(slot) {
        if record.used_at < now {
            records.write(slot, &Record { used_at: now, ..record }, version);
        }
    }
    if providers.get(used.provider).and_then(|p| p.keyed.as_ref()).is_some_and(|k| k.evicts) {
        relist(records, used.provider, key);
    }
}

/// A dynamic credential a forwarded request carried: its provider's
/// number, the key of a keyed record, and the generation of the values
/// sent ([`Record::generation`]). A host keeps these with the request
/// ([`crate::Forward`]'s `used`, which holds no value) and hands them back
/// with the upstream's answer. `touch` and `due` ask the host for work on a
/// keyed record: mark it used ([`touch`]), and ask for its refresh
/// ([`Refresher::demand`]), which is due while the cached value is used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Used {
    pub provider: usize,
    pub key: Option<String>,
    pub generation: u64,
    pub touch: bool,
    pub due: bool,
}

impl Used {
    /// The record these values came from.
    pub fn slot(&self) -> Slot<'_> {
        match &self.key {
            Some(key) => Slot::Keyed(self.provider, key),
            None => Slot::Provider(self.provider),
        }
    }
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

/// Marks the values `used` rejected after an upstream answered 401 at
/// `now` to a request that carried them ([`Record::rejected`]: refreshed at
/// once, within the bound; kept until replaced, dropped if the refresh
/// fails), by compare-and-swap: of two workers that saw 401s for the same
/// values one marks them, and a 401 for values already replaced does
/// nothing. `None` when nothing was marked.
pub fn reject<'p>(
    providers: &'p [Provider],
    records: &mut dyn SharedRecords,
    used: &Used,
    now: i64,
) -> Option<Rejection<'p>> {
    let provider = providers.get(used.provider)?;
    for _ in 0..WRITE_ATTEMPTS {
        let (record, version) = records.read(used.slot())?;
        let next = record.rejected(used.generation, now)?;
        if records.write(used.slot(), &next, version) {
            return Some(Rejection { provider, refresh_at: next.refresh_at, now });
        }
    }
    None
}

/// Writes a refresh's outcome into `slot`'s record (compare-and-swap,
/// retried on a concurrent write); the start and end of a failure streak,
/// and a first value, are noted.
fn finish<'p>(
    provider: &'p Provider,
    slot: Slot<'_>,
    records: &mut dyn SharedRecords,
    now: i64,
    result: Result<Answer, String>,
) -> Option<Note<'p>> {
    let key = slot.key().map(str::to_string);
    for _ in 0..WRITE_ATTEMPTS {
        let (record, version) = match records.read(slot) {
            Some(read) => read,
            // A keyed record dropped or evicted while its call was in
            // flight (its slot perhaps given to another key): the answer
            // is not stored anywhere.
            None if key.is_some() => return None,
            None => Default::default(),
        };
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
        if records.write(slot, &next, version) {
            return event.map(|event| Note { provider, key, event });
        }
    }
    Some(Note { provider, key, event: Event::NotStored })
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
            keyed: None,
            subject: None,
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
        let mut call = |_: &Provider, _: &[(String, String)], _: Option<&[u8]>| {
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
        let record = store.read(Slot::Provider(0)).map(|(r, _)| r).unwrap_or_default();
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
        let mut refused =
            |_: &Provider, _: &[(String, String)], _: Option<&[u8]>| Err("the call was refused".to_string());
        assert!(a.tick(&providers, &mut store, due + 1000, &mut refused).is_empty(), "second failure, not noted");
        let record = store.read(Slot::Provider(0)).map(|(r, _)| r).unwrap_or_default();
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
        let mut call = |_: &Provider, _: &[(String, String)], _: Option<&[u8]>| {
            ids += 1;
            Ok(ids)
        };
        let token = |t: &str| format!(r#"{{"access_token":"{t}","expires_in":3600}}"#);
        let record = |store: &MemoryRecords| store.read(Slot::Provider(0)).map(|(r, _)| r).unwrap_or_default();
        fn answered(body: &str) -> Reply<'_> {
            Reply::Answered { status: 200, body: body.as_bytes() }
        }
        a.tick(&providers, &mut store, 0, &mut call);
        let body = token("tok-1");
        a.answer(&providers, &mut store, 1, answered(&body), 0);
        let first = Used { provider: 0, key: None, generation: record(&store).generation, touch: false, due: false };

        // Two workers saw a 401 for tok-1: one mark.
        let marked = reject(&providers, &mut store, &first, 1000);
        assert_eq!(marked.as_ref().map(|r| r.refresh_at), Some(1000));
        assert_eq!(
            marked.map(|r| r.to_string()).as_deref(),
            Some("credential routes[0].inject[0].value.oauth2 (oauth2): the upstream answered 401 to it; replacing it, fetching a new one")
        );
        assert_eq!(reject(&providers, &mut store, &first, 1000), None, "already marked");
        let now = record(&store);
        assert_eq!(now.usable(1000).map(<[String]>::len), Some(1), "kept until replaced");
        assert!(now.due(1000), "due at once");

        // The next tick fetches tok-2; a late 401 for tok-1 leaves it.
        assert!(a.tick(&providers, &mut store, 1500, &mut call).is_empty());
        let body = token("tok-2");
        let note = a.answer(&providers, &mut store, 2, answered(&body), 1600);
        assert_eq!(note.map(|n| n.event), Some(Event::Replaced));
        assert_eq!(record(&store).values, ["tok-2"]);
        assert_eq!(reject(&providers, &mut store, &first, 1700), None, "a stale 401 touches no newer value");
        let second = Used { provider: 0, key: None, generation: record(&store).generation, touch: false, due: false };
        assert_ne!(first, second);

        // tok-2 rejected too, 1.7 s after the last forced refresh: kept,
        // and the next call waits until 5 s after the last one.
        let marked = reject(&providers, &mut store, &second, 1700).map(|r| r.refresh_at);
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

    fn keyed_provider(max_keys: usize) -> Provider {
        Provider {
            kind: Kind::Fetch,
            path: "routes[0].inject[0].value.fetch".into(),
            headers: vec![
                (":method".into(), "GET".into()),
                (":path".into(), "/creds/{client}".into()),
                (":authority".into(), "vault".into()),
                ("authorization".into(), "Bearer gateway".into()),
            ],
            pointers: vec!["/key".into()],
            refresh_ms: 60_000,
            keyed: Some(crate::credential::Keyed { idle_ms: 120_000, max_keys, evicts: false }),
            ..provider()
        }
    }

    /// The keyed state machine: a key is admitted (bounded), asked for
    /// with the caller's token, fetched by one call into its own record,
    /// and dropped when idle; each key's value is its own.
    #[test]
    fn keyed_records_are_per_key_bounded_and_dropped_when_idle() {
        let providers = [keyed_provider(2)];
        let mut store = MemoryRecords::new(1);
        let (mut a, mut b) = (Refresher::default(), Refresher::default());
        a.restart(&providers, &mut store);
        assert_eq!(store.len(), 1, "keyed records are made on demand, not at start: only the index is");
        assert_eq!(index(&store), []);
        let calls: std::cell::RefCell<Vec<Vec<(String, String)>>> = std::cell::RefCell::default();
        let mut call = |_: &Provider, headers: &[(String, String)], _: Option<&[u8]>| {
            calls.borrow_mut().push(headers.to_vec());
            Ok(u32::try_from(calls.borrow().len()).unwrap_or(0))
        };

        // Two keys admitted; a third is refused, nothing evicted.
        assert_eq!(admit(&providers, &mut store, 0, "team/a", 0), Ok(()));
        assert_eq!(admit(&providers, &mut store, 0, "team-b", 0), Ok(()));
        assert_eq!(admit(&providers, &mut store, 0, "team-c", 0), Err(Full { max_keys: 2 }));
        assert_eq!(admit(&providers, &mut store, 0, "team/a", 0), Ok(()), "admitted again");

        // Both workers are asked for team/a: one call, with the caller's
        // token on one and the gateway's identity never mixed in.
        a.demand(0, "team/a", Some("Bearer user-1"), None);
        b.demand(0, "team/a", None, None);
        a.demand(0, "team-b", None, None);
        assert!(a.has_demands());
        a.tick(&providers, &mut store, 0, &mut call);
        b.tick(&providers, &mut store, 0, &mut call);
        assert!(!a.has_demands() && !b.has_demands());
        let made = calls.borrow().clone();
        assert_eq!(made.len(), 2, "one call per key, whichever worker asks");
        let get = |h: &[(String, String)], n: &str| h.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
        assert_eq!(get(&made[0], ":path").as_deref(), Some("/creds/team%2Fa"));
        assert_eq!(get(&made[0], "authorization").as_deref(), Some("Bearer user-1"));
        assert_eq!(get(&made[1], ":path").as_deref(), Some("/creds/team-b"));
        assert_eq!(get(&made[1], "authorization").as_deref(), Some("Bearer gateway"));

        let answered = |body: &'static str| Reply::Answered { status: 200, body: body.as_bytes() };
        let note = a.answer(&providers, &mut store, 1, answered(r#"{"key":"k-a"}"#), 10);
        assert_eq!(
            note.map(|n| n.to_string()).as_deref(),
            Some("credential routes[0].inject[0].value.fetch (fetch) for client team/a: first value fetched")
        );
        a.answer(&providers, &mut store, 2, answered(r#"{"key":"k-b"}"#), 10);
        let slots = |key: &str| vec![(0usize, key.to_string())];
        assert!(ready(&store, &slots("team/a"), 10) && ready(&store, &slots("team-b"), 10));
        let value = |store: &MemoryRecords, key: &str| {
            store.read(Slot::Keyed(0, key)).and_then(|(r, _)| r.usable(10).map(<[String]>::to_vec))
        };
        assert_eq!(value(&store, "team/a"), Some(vec!["k-a".to_string()]));
        assert_eq!(value(&store, "team-b"), Some(vec!["k-b".to_string()]));

        // team-b is used at 100 s; team/a is not: at 120 s team/a is
        // dropped (and unlisted, which frees a place), team-b kept.
        let used = Used { provider: 0, key: Some("team-b".into()), generation: 1, touch: true, due: false };
        touch(&providers, &mut store, &used, 100_000);
        let notes = a.tick(&providers, &mut store, 120_000, &mut call);
        let notes: Vec<String> = notes.iter().map(ToString::to_string).collect();
        assert_eq!(
            notes,
            ["credential routes[0].inject[0].value.fetch (fetch) for client team/a: dropped after 120 s unused"]
        );
        assert_eq!(value(&store, "team/a"), None);
        assert_eq!(value(&store, "team-b"), Some(vec!["k-b".to_string()]));
        assert_eq!(admit(&providers, &mut store, 0, "team-c", 120_000), Ok(()), "the drop freed a place");
        assert_eq!(calls.borrow().len(), 2, "no call without a demand");
    }

    fn subject_provider(max_keys: usize) -> Provider {
        Provider {
            kind: Kind::TokenExchange,
            path: "routes[0].inject[0].value.token_exchange".into(),
            body: Some(b"grant_type=x&audience=a".to_vec()),
            keyed: Some(crate::credential::Keyed { idle_ms: 120_000, max_keys, evicts: true }),
            subject: Some(crate::credential::SubjectSource { header: "x-user-token".into(), prefix: None }),
            ..provider()
        }
    }

    /// Subjects: past `max_keys` the least recently used one is evicted
    /// (its record dropped), never a refusal; a touch makes a key the most
    /// recently used; the call carries the subject in its form and never a
    /// caller's token; an STS refusal marks the record refused (no value,
    /// nothing logged), an answer for a subject already expired too.
    #[test]
    fn subjects_evict_the_least_recently_used_and_refusals_are_kept() {
        let providers = [subject_provider(2)];
        let mut store = MemoryRecords::new(1);
        let mut a = Refresher::default();
        let bodies: std::cell::RefCell<Vec<Vec<u8>>> = std::cell::RefCell::default();
        let mut call = |_: &Provider, headers: &[(String, String)], body: Option<&[u8]>| {
            assert!(!headers.iter().any(|(n, v)| n == "authorization" && v.contains("caller")));
            bodies.borrow_mut().push(body.unwrap_or_default().to_vec());
            Ok(u32::try_from(bodies.borrow().len()).unwrap_or(0))
        };
        let key = |s: &str| providers[0].subject_key(s.as_bytes());
        let (k1, k2, k3) = (key("s1"), key("s2"), key("s3"));
        for k in [&k1, &k2] {
            assert_eq!(admit(&providers, &mut store, 0, k, 0), Ok(()));
        }
        a.demand(0, &k1, Some("Bearer caller"), Some("s1"));
        a.tick(&providers, &mut store, 0, &mut call);
        assert_eq!(bodies.borrow()[0], b"grant_type=x&audience=a&subject_token=s1");
        let token = Reply::Answered { status: 200, body: br#"{"access_token":"t1","expires_in":60}"# };
        assert_eq!(a.answer(&providers, &mut store, 1, token, 10).map(|n| n.to_string()).as_deref(),
            Some("credential routes[0].inject[0].value.token_exchange (token_exchange) for a subject: first value fetched"));
        // k1 used since k2 was listed: k2 is the least recently used.
        let used = Used { provider: 0, key: Some(k1.clone()), generation: 1, touch: true, due: false };
        touch(&providers, &mut store, &used, 20);
        assert_eq!(admit(&providers, &mut store, 0, &k3, 30), Ok(()), "a new subject is never refused");
        let index = Index::decode(&store.read_bytes(Slot::Index(0)).map(|(b, _)| b).unwrap_or_default());
        assert_eq!(index.entries, [(k1.clone(), 0), (k3.clone(), 1)], "k3 takes the slot of k2, evicted");
        let value = |store: &MemoryRecords, k: &str| {
            store.read(Slot::Keyed(0, k)).and_then(|(r, _)| r.usable(40).map(<[String]>::to_vec))
        };
        assert_eq!(value(&store, &k1), Some(vec!["t1".to_string()]), "the recently used one is kept");

        // The STS refuses s3: refused, no value, nothing to log; ready.
        a.demand(0, &k3, None, Some("s3"));
        a.tick(&providers, &mut store, 40, &mut call);
        let refusal = Reply::Answered { status: 400, body: br#"{"error":"invalid_grant"}"# };
        assert_eq!(a.answer(&providers, &mut store, 2, refusal, 50), None);
        let record = store.read(Slot::Keyed(0, &k3)).map(|(r, _)| r).unwrap_or_default();
        assert!(record.refused && record.values.is_empty() && record.refresh_at == 1050);
        assert!(ready(&store, &[(0, k3.clone())], 50));
        // Other statuses are the STS's trouble, not the subject's.
        assert!(!providers[0].refuses_subject(400, br#"{"error":"invalid_request"}"#));
        assert!(!providers[0].refuses_subject(503, b""));
        assert!(providers[0].refuses_subject(401, b""));
    }

    /// A first value whose call failed is asked for again once the backoff
    /// ends (the waiting request is still there), not before.
    #[test]
    fn a_failed_first_fetch_is_retried_after_its_backoff() {
        let providers = [keyed_provider(10)];
        let mut store = MemoryRecords::new(1);
        let mut a = Refresher::default();
        let mut n = 0;
        let mut call = |_: &Provider, _: &[(String, String)], _: Option<&[u8]>| {
            n += 1;
            Ok(n)
        };
        assert_eq!(admit(&providers, &mut store, 0, "c", 0), Ok(()));
        a.demand(0, "c", None, None);
        a.tick(&providers, &mut store, 0, &mut call);
        a.answer(&providers, &mut store, 1, Reply::Lost, 100);
        a.demand(0, "c", None, None);
        a.tick(&providers, &mut store, 500, &mut call);
        assert_eq!(a.in_flight(), 0, "in backoff");
        assert!(a.has_demands(), "kept for after the backoff");
        a.tick(&providers, &mut store, 1100, &mut call);
        assert_eq!(a.in_flight(), 1);
    }

    #[test]
    fn writes_are_compare_and_swap() {
        let mut store = MemoryRecords::new(1);
        assert!(store.read(Slot::Provider(0)).is_none());
        assert!(store.write(Slot::Provider(0), &Record::default(), None));
        let (_, version) = store.read(Slot::Provider(0)).unwrap_or_default();
        assert!(store.write(Slot::Provider(0), &Record::default(), version));
        assert!(!store.write(Slot::Provider(0), &Record::default(), version), "a stale version loses");
        assert!(!store.write(Slot::Provider(1), &Record::default(), None), "no such provider");
        assert!(store.write(Slot::Pool(0, 0), &Record::default(), None), "pool slots are their own");
        assert!(!store.write(Slot::Keyed(0, "a"), &Record::default(), None), "a keyed record is made by admit");
        assert!(!store.write(Slot::Keyed(0, "a"), &Record::default(), version), "an unlisted key has no slot");
        assert!(store.read(Slot::Keyed(0, "b")).is_none());
        assert!(store.read(Slot::Index(0)).is_none());
    }

    /// A worker's view of the shared store: its own hints, and optionally
    /// another worker's step run just before its first write to a slot
    /// `when` picks (an interleaving of the two).
    struct Worker<'s> {
        store: &'s mut MemoryRecords,
        hints: &'s Hints,
        when: fn(Slot<'_>) -> bool,
        meanwhile: Option<Step<'s>>,
    }

    /// Another worker's step, run on the shared store.
    type Step<'s> = Box<dyn FnOnce(&mut MemoryRecords) + 's>;

    impl<'s> Worker<'s> {
        fn new(store: &'s mut MemoryRecords, hints: &'s Hints) -> Self {
            Self { store, hints, when: |_| false, meanwhile: None }
        }

        fn racing(mut self, when: fn(Slot<'_>) -> bool, meanwhile: impl FnOnce(&mut MemoryRecords) + 's) -> Self {
            self.when = when;
            self.meanwhile = Some(Box::new(meanwhile));
            self
        }
    }

    impl SharedRecords for Worker<'_> {
        fn read_bytes(&self, slot: Slot<'_>) -> Option<(Vec<u8>, Option<u32>)> {
            self.store.read_bytes(slot)
        }

        fn write_bytes(&mut self, slot: Slot<'_>, bytes: &[u8], version: Option<u32>) -> bool {
            if (self.when)(slot) {
                if let Some(step) = self.meanwhile.take() {
                    step(self.store);
                }
            }
            self.store.write_bytes(slot, bytes, version)
        }

        fn hint(&self, provider: usize, key: &str) -> Option<u32> {
            self.hints.get(provider, key)
        }

        fn remember(&self, provider: usize, key: &str, slot: u32) {
            self.hints.set(provider, key, slot);
        }
    }

    /// The index is searched without decoding it: the same answer as a
    /// decode for every key, listed or not, including keys that are a
    /// prefix or a suffix of another or hold JSON's special characters.
    #[test]
    fn an_index_is_searched_as_decoded() {
        let keys = ["a", "ab", "b\"a", "x\\", "[\"a\",", "team/a", ""];
        let entries: Vec<(String, u32)> =
            keys.iter().zip([7, 12, 0, 3, 4, 1000, 9]).map(|(k, n)| (k.to_string(), n)).collect();
        let bytes = Index { entries: entries.clone() }.encode();
        for (key, n) in &entries {
            assert_eq!(Index::find(&bytes, key), Some(*n), "{key}");
        }
        for key in ["b", "a\"", "x", "\"a\",", "1000", "team"] {
            assert_eq!(Index::find(&bytes, key), None, "{key}");
            assert_eq!(Index::decode(&bytes).slot_of(key), None);
        }
        assert_eq!(Index::find(b"", "a"), None);
    }

    fn index(store: &MemoryRecords) -> Vec<(String, u32)> {
        Index::decode(&store.read_bytes(Slot::Index(0)).map(|(b, _)| b).unwrap_or_default()).entries
    }

    fn values(records: &dyn SharedRecords, key: &str) -> Option<Vec<String>> {
        records.read(Slot::Keyed(0, key)).and_then(|(r, _)| r.usable(10).map(<[String]>::to_vec))
    }

    /// Stores `value` as `key`'s exchanged token, as a refresh's answer
    /// would (compare-and-swap on the key's own record).
    fn give(records: &mut dyn SharedRecords, key: &str, value: &str) -> bool {
        let Some((record, version)) = records.read(Slot::Keyed(0, key)) else { return false };
        let answer = Answer { values: vec![value.to_string()], expires_at: None, refresh_at: 1_000_000 };
        records.write(Slot::Keyed(0, key), &record.succeeded(answer).0, version)
    }

    /// 200 subjects through a cache of 3: never more than 3 pool records
    /// and the index are stored, each subject reads back its own token
    /// while cached, and an evicted subject reads nothing (its slot holds
    /// another subject's record).
    #[test]
    fn subjects_reuse_a_fixed_pool_of_records() {
        let providers = [subject_provider(3)];
        let mut store = MemoryRecords::new(1);
        let key = |i: usize| providers[0].subject_key(format!("subject-{i}").as_bytes());
        for i in 0..200 {
            assert_eq!(admit(&providers, &mut store, 0, &key(i), i as i64), Ok(()));
            assert!(give(&mut store, &key(i), &format!("token-{i}")));
            assert!(store.len() <= 4, "{} records after {i} subjects", store.len());
            for j in i.saturating_sub(2)..=i {
                assert_eq!(values(&store, &key(j)), Some(vec![format!("token-{j}")]), "subject {j} after {i}");
            }
            if i >= 3 {
                assert_eq!(values(&store, &key(i - 3)), None, "evicted subject {}", i - 3);
                assert!(store.read(Slot::Keyed(0, &key(i - 3))).is_none());
            }
        }
        let mut slots: Vec<u32> = index(&store).iter().map(|(_, n)| *n).collect();
        slots.sort_unstable();
        assert_eq!(slots, [0, 1, 2]);
    }

    /// Two workers admit different new subjects at once into a full
    /// cache: the index's compare-and-swap lets one win; the loser reads it
    /// again and evicts the next least recently used subject. No slot is
    /// given twice, and neither new subject reads the evicted one's token.
    #[test]
    fn concurrent_admissions_take_distinct_slots() {
        let providers = [subject_provider(2)];
        let mut store = MemoryRecords::new(1);
        let key = |s: &str| providers[0].subject_key(s.as_bytes());
        let (k1, k2, k3, k4) = (key("s1"), key("s2"), key("s3"), key("s4"));
        for (k, token) in [(&k1, "t1"), (&k2, "t2")] {
            assert_eq!(admit(&providers, &mut store, 0, k, 0), Ok(()));
            assert!(give(&mut store, k, token));
        }
        let (ha, hb) = (Hints { limit: 10, ..Hints::default() }, Hints { limit: 10, ..Hints::default() });
        let k4b = k4.clone();
        let hb_ref = &hb;
        let provs = &providers;
        // Worker a read the index ([k1, k2]) and chose to evict k1; before
        // its write, worker b admits k4, evicting k1 itself.
        let mut a = Worker::new(&mut store, &ha).racing(
            |slot| matches!(slot, Slot::Index(_)),
            move |inner| {
                let mut b = Worker::new(inner, hb_ref);
                assert_eq!(admit(provs, &mut b, 0, &k4b, 5), Ok(()));
            },
        );
        assert_eq!(admit(&providers, &mut a, 0, &k3, 5), Ok(()));
        drop(a);
        assert_eq!(index(&store), [(k4.clone(), 0), (k3.clone(), 1)], "k1 then k2 evicted, one slot each");
        for k in [&k1, &k2] {
            assert_eq!(values(&store, k), None);
        }
        for k in [&k3, &k4] {
            assert!(store.read(Slot::Keyed(0, k)).is_some(), "its record made in its slot");
            assert_eq!(values(&store, k), None, "no token of the evicted subjects");
        }
        assert_eq!(store.len(), 3);
    }

    /// A worker that found a subject at a slot keeps that hint after the
    /// subject is evicted and the slot given to another: the stamp check
    /// makes it read nothing (never the other subject's token), and a
    /// write with its stale version fails.
    #[test]
    fn a_stale_slot_hint_never_serves_another_subject() {
        let providers = [subject_provider(1)];
        let mut store = MemoryRecords::new(1);
        let key = |s: &str| providers[0].subject_key(s.as_bytes());
        let (k1, k2) = (key("s1"), key("s2"));
        let ha = Hints { limit: 10, ..Hints::default() };
        let mut a = Worker::new(&mut store, &ha);
        assert_eq!(admit(&providers, &mut a, 0, &k1, 0), Ok(()));
        assert!(give(&mut a, &k1, "t1"));
        let (_, stale) = a.read(Slot::Keyed(0, &k1)).unwrap_or_default();
        assert_eq!(a.hint(0, &k1), Some(0));
        drop(a);

        // Another worker admits k2: k1 evicted, slot 0 is k2's.
        assert_eq!(admit(&providers, &mut store, 0, &k2, 10), Ok(()));
        assert!(give(&mut store, &k2, "t2"));

        let mut a = Worker::new(&mut store, &ha);
        assert_eq!(a.hint(0, &k1), Some(0), "the hint is stale");
        assert_eq!(values(&a, &k1), None, "k2's token is never k1's");
        let record = Record { values: vec!["t1-late".into()], ..Record::default() };
        assert!(!a.write(Slot::Keyed(0, &k1), &record, stale), "a stale write lands nowhere");
        assert_eq!(values(&a, &k2), Some(vec!["t2".to_string()]));
        drop(a);
        assert_eq!(store.len(), 2);
    }

    /// An exchange in flight for a subject evicted meanwhile answers after
    /// its slot was given to a new subject: the token is stored nowhere
    /// (the new subject's record stays without a value and gets its own),
    /// whether the eviction came before the answer or between its read and
    /// its write.
    #[test]
    fn a_late_answer_for_an_evicted_subject_lands_nowhere() {
        let providers = [subject_provider(1)];
        let key = |s: &str| providers[0].subject_key(s.as_bytes());
        let (k1, k2) = (key("s1"), key("s2"));
        let ids = std::cell::Cell::new(0);
        let mut call = |_: &Provider, _: &[(String, String)], _: Option<&[u8]>| {
            ids.set(ids.get() + 1);
            Ok(ids.get())
        };
        let provs = &providers;
        let token = |t: &'static str| match t {
            "t1" => Reply::Answered { status: 200, body: br#"{"access_token":"t1","expires_in":60}"# },
            _ => Reply::Answered { status: 200, body: br#"{"access_token":"t2","expires_in":60}"# },
        };
        for between in [false, true] {
            let mut store = MemoryRecords::new(1);
            let (mut a, mut b) = (Refresher::default(), Refresher::default());
            assert_eq!(admit(&providers, &mut store, 0, &k1, 0), Ok(()));
            a.demand(0, &k1, None, Some("s1"));
            a.tick(&providers, &mut store, 0, &mut call);
            assert_eq!(a.in_flight(), 1);
            let id = ids.get();
            let hb = Hints { limit: 10, ..Hints::default() };
            let k2b = k2.clone();
            let evict_k1 = move |inner: &mut MemoryRecords| {
                let mut w = Worker::new(inner, &hb);
                assert_eq!(admit(provs, &mut w, 0, &k2b, 5), Ok(()));
            };
            if between {
                // The answer read k1's record; k2 takes the slot before
                // the answer's write.
                let ha = Hints { limit: 10, ..Hints::default() };
                let mut w = Worker::new(&mut store, &ha).racing(|slot| matches!(slot, Slot::Pool(..)), evict_k1);
                assert_eq!(a.answer(&providers, &mut w, id, token("t1"), 10), None);
            } else {
                evict_k1(&mut store);
                assert_eq!(a.answer(&providers, &mut store, id, token("t1"), 10), None);
            }
            assert_eq!(values(&store, &k1), None);
            assert_eq!(values(&store, &k2), None, "never k1's token (between: {between})");
            assert!(store.read(Slot::Keyed(0, &k2)).is_some_and(|(r, _)| r.values.is_empty() && r.due(10)));
            b.demand(0, &k2, None, Some("s2"));
            b.tick(&providers, &mut store, 10, &mut call);
            assert_eq!(b.in_flight(), 1, "k2's own call");
            b.answer(&providers, &mut store, ids.get(), token("t2"), 20);
            assert_eq!(values(&store, &k2), Some(vec!["t2".to_string()]));
            assert_eq!(store.len(), 2);
        }
    }

    /// A worker that listed a subject at a slot but had not made its record
    /// there before the subject was evicted and the slot given to another
    /// does not write over the newer subject's record.
    #[test]
    fn a_late_claim_never_overwrites_the_next_owner() {
        let providers = [subject_provider(1)];
        let mut store = MemoryRecords::new(1);
        let key = |s: &str| providers[0].subject_key(s.as_bytes());
        let (k1, k2) = (key("s1"), key("s2"));
        assert_eq!(admit(&providers, &mut store, 0, &k2, 0), Ok(()));
        assert!(give(&mut store, &k2, "t2"));
        // k1 was given slot 0 and evicted for k2 before making its record.
        claim(&mut store, 0, 0, &k1, 5);
        assert_eq!(values(&store, &k2), Some(vec!["t2".to_string()]));
        assert_eq!(store.read(Slot::Keyed(0, &k1)), None);
    }

    /// A worker listed a subject, and before it made the subject's record
    /// another worker's admission evicted it and took the slot: the first
    /// finds its record missing and lists it again (evicting in turn), so
    /// a request it admitted does not wait for a record nobody makes; the
    /// other subject never reads its record.
    #[test]
    fn an_admission_that_lost_its_slot_lists_again() {
        let providers = [subject_provider(1)];
        let mut store = MemoryRecords::new(1);
        Refresher::default().restart(&providers, &mut store);
        let key = |s: &str| providers[0].subject_key(s.as_bytes());
        let (k0, k1, k2) = (key("s0"), key("s1"), key("s2"));
        assert_eq!(admit(&providers, &mut store, 0, &k0, 0), Ok(()));
        let (ha, hb) = (Hints { limit: 10, ..Hints::default() }, Hints { limit: 10, ..Hints::default() });
        let (provs, k2b, hb) = (&providers, k2.clone(), &hb);
        let mut a = Worker::new(&mut store, &ha).racing(
            |slot| matches!(slot, Slot::Pool(..)),
            move |inner| {
                let mut b = Worker::new(inner, hb);
                assert_eq!(admit(provs, &mut b, 0, &k2b, 5), Ok(()));
                assert!(give(&mut b, &k2b, "t2"));
            },
        );
        assert_eq!(admit(&providers, &mut a, 0, &k1, 5), Ok(()));
        assert!(a.read(Slot::Keyed(0, &k1)).is_some_and(|(r, _)| r.values.is_empty()), "k1's own record");
        drop(a);
        assert_eq!(index(&store), [(k1.clone(), 0)]);
        assert_eq!(values(&store, &k1), None, "never k2's token");
        assert_eq!(store.read(Slot::Keyed(0, &k2)), None);
    }

    /// A client dropped for idleness frees its slot for the next client
    /// (a `{client}` fetch, refused past max_keys): the pool holds
    /// max_keys records however many clients come and go.
    #[test]
    fn a_dropped_client_frees_its_slot() {
        let providers = [keyed_provider(1)];
        let mut store = MemoryRecords::new(1);
        let mut a = Refresher::default();
        let mut call = |_: &Provider, _: &[(String, String)], _: Option<&[u8]>| Ok(1);
        assert_eq!(admit(&providers, &mut store, 0, "c1", 0), Ok(()));
        assert!(give(&mut store, "c1", "k-1"));
        assert_eq!(admit(&providers, &mut store, 0, "c2", 0), Err(Full { max_keys: 1 }));
        a.demand(0, "c1", None, None);
        a.tick(&providers, &mut store, 120_000, &mut call);
        assert_eq!(index(&store), []);
        assert_eq!(admit(&providers, &mut store, 0, "c2", 120_000), Ok(()));
        assert_eq!(index(&store), [("c2".to_string(), 0)]);
        assert_eq!(values(&store, "c1"), None);
        assert_eq!(values(&store, "c2"), None, "never c1's value");
        assert_eq!(store.len(), 2);
    }
}
