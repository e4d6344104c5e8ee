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

use super::provider::{percent_encoded, Answer, AnswerError, Provider, MIN_FORCED_REFRESH_MS};
use super::record::{Index, Record};

/// The largest answer a host reads from a token endpoint or credential
/// service; a larger one is a failed refresh ([`Reply::TooLarge`]).
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// How many times a refresh's outcome is written back before giving up on
/// a store that keeps changing under it.
const WRITE_ATTEMPTS: usize = 8;

/// Which shared record: one per provider, or, for a keyed provider (a
/// `{client}` fetch), one per (provider, key) plus the provider's index of
/// the keys it holds. The key is a client id today; the next keyed
/// provider (an on-behalf-of exchange) keys by a subject's digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Slot<'k> {
    /// The one record of an unkeyed provider.
    Provider(usize),
    /// A keyed provider's record for one key.
    Keyed(usize, &'k str),
    /// A keyed provider's [`Index`].
    Index(usize),
}

impl Slot<'_> {
    /// The provider, by number.
    pub fn provider(self) -> usize {
        match self {
            Slot::Provider(p) | Slot::Keyed(p, _) | Slot::Index(p) => p,
        }
    }

    /// The key of a keyed record.
    pub fn key(&self) -> Option<&str> {
        match self {
            Slot::Keyed(_, key) => Some(key),
            Slot::Provider(_) | Slot::Index(_) => None,
        }
    }

    /// Its name in a host's shared storage (Envoy's shared data):
    /// `keyswap.credential.<provider id>`, with `.k.<key, percent-encoded>`
    /// or `.index` for a keyed provider. `None` for no such provider.
    pub fn storage_key(self, providers: &[Provider]) -> Option<String> {
        let id = &providers.get(self.provider())?.id;
        Some(match self {
            Slot::Provider(_) => format!("keyswap.credential.{id}"),
            Slot::Keyed(_, key) => format!("keyswap.credential.{id}.k.{}", percent_encoded(key)),
            Slot::Index(_) => format!("keyswap.credential.{id}.index"),
        })
    }
}

/// The providers' records as a host keeps them ([`Slot`]), shared by every
/// worker, each written with compare-and-swap. The proxy-wasm filter keeps
/// them in Envoy's shared data; [`MemoryRecords`] keeps them in memory.
pub trait SharedRecords {
    /// The bytes stored for `slot` and the version they were read at (for
    /// [`Self::write_bytes`]); `None` when nothing is stored yet.
    fn read_bytes(&self, slot: Slot<'_>) -> Option<(Vec<u8>, Option<u32>)>;

    /// Stores `bytes` for `slot` if the stored version is still `version`
    /// (`None`: whatever is stored). False when another writer came first,
    /// or they could not be stored.
    fn write_bytes(&mut self, slot: Slot<'_>, bytes: &[u8], version: Option<u32>) -> bool;

    /// The record stored for `slot`, as [`Self::read_bytes`].
    fn read(&self, slot: Slot<'_>) -> Option<(Record, Option<u32>)> {
        self.read_bytes(slot).map(|(bytes, version)| (Record::decode(&bytes), version))
    }

    /// Stores a record, as [`Self::write_bytes`].
    fn write(&mut self, slot: Slot<'_>, record: &Record, version: Option<u32>) -> bool {
        self.write_bytes(slot, &record.encode(), version)
    }
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

/// Records in memory, versioned the way Envoy's shared data is: for a host
/// with one worker (the native conformance runner) and for tests.
#[derive(Debug, Clone, Default)]
pub struct MemoryRecords {
    providers: usize,
    records: std::collections::BTreeMap<(usize, u8, String), (Vec<u8>, u32)>,
}

impl MemoryRecords {
    /// Room for the records of `providers` providers, none stored yet.
    pub fn new(providers: usize) -> Self {
        Self { providers, records: std::collections::BTreeMap::new() }
    }

    fn at(&self, slot: Slot<'_>) -> Option<(usize, u8, String)> {
        let at = match slot {
            Slot::Provider(p) => (p, 0, String::new()),
            Slot::Keyed(p, key) => (p, 1, key.to_string()),
            Slot::Index(p) => (p, 2, String::new()),
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
        if version.is_some() && version != stored {
            return false;
        }
        self.records.insert(at, (bytes.to_vec(), stored.map_or(1, |v| v.wrapping_add(1))));
        true
    }
}

/// How a host makes a call: the provider (cluster, body, timeout) and the
/// call's headers ([`Provider::call_headers`]); the call's id, or why it
/// could not be made.
pub type Call<'c> = dyn FnMut(&Provider, &[(String, String)]) -> Result<u32, String> + 'c;

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
        if let Some(key) = &self.key {
            write!(f, " for client {key}")?;
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
}

/// One worker's side of the refresh: the calls it has in flight, the keyed
/// records requests asked it for, and the keyed records it fetched and so
/// watches for idleness.
#[derive(Debug, Default)]
pub struct Refresher {
    /// (call id, provider number, key of a keyed record).
    in_flight: Vec<(u32, usize, Option<String>)>,
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
            .finish()
    }
}

impl Refresher {
    /// For a newly loaded configuration: forgets the calls, demands and
    /// keyed records of an earlier one (known by provider numbers in it,
    /// their answers must not land in this one's records), and creates the
    /// unkeyed records that do not exist yet, so that every later write is
    /// a compare-and-swap.
    pub fn restart(&mut self, providers: &[Provider], records: &mut dyn SharedRecords) {
        self.in_flight.clear();
        self.demands.clear();
        self.tracked.clear();
        for (p, provider) in providers.iter().enumerate() {
            if provider.keyed.is_none() && records.read(Slot::Provider(p)).is_none() {
                records.write(Slot::Provider(p), &Record::default(), None);
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
    /// configured one when given. The record is then watched for idleness.
    pub fn demand(&mut self, provider: usize, key: &str, authorization: Option<&str>) {
        match self.demands.iter_mut().find(|d| d.provider == provider && d.key == key) {
            Some(known) => {
                if known.authorization.is_none() {
                    known.authorization = authorization.map(str::to_string);
                }
            }
            None => self.demands.push(Demand {
                provider,
                key: key.to_string(),
                authorization: authorization.map(str::to_string),
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
            if provider.keyed.is_some() || self.in_flight.iter().any(|(_, f, _)| *f == p) {
                continue;
            }
            let headers = provider.call_headers(None, None);
            self.lead(provider, Slot::Provider(p), records, now, &headers, call, &mut notes);
        }
        let mut waiting = Vec::new();
        for demand in std::mem::take(&mut self.demands) {
            let Some(provider) = providers.get(demand.provider).filter(|p| p.keyed.is_some()) else { continue };
            let slot = Slot::Keyed(demand.provider, &demand.key);
            if self.calling(slot) {
                continue;
            }
            let headers = provider.call_headers(Some(&demand.key), demand.authorization.as_deref());
            if self.lead(provider, slot, records, now, &headers, call, &mut notes) == Lead::Later {
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
        self.in_flight.iter().any(|(_, p, key)| *p == slot.provider() && key.as_deref() == slot.key())
    }

    /// Takes `slot`'s lease if its refresh is due and makes the call.
    #[allow(clippy::too_many_arguments)]
    fn lead<'p>(
        &mut self,
        provider: &'p Provider,
        slot: Slot<'_>,
        records: &mut dyn SharedRecords,
        now: i64,
        headers: &[(String, String)],
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
        match call(provider, headers) {
            Ok(id) => self.in_flight.push((id, slot.provider(), slot.key().map(str::to_string))),
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
        let at = self.in_flight.iter().position(|(call, _, _)| *call == id)?;
        let (_, p, key) = self.in_flight.swap_remove(at);
        let provider = providers.get(p)?;
        let result = match reply {
            Reply::Lost => {
                Err(format!("no answer from cluster `{}` (timeout or connection failure)", provider.cluster))
            }
            Reply::TooLarge => Err(format!("the answer is larger than {MAX_ANSWER_BYTES} bytes")),
            Reply::Answered { status, body } => provider.parse(status, body, now).map_err(|AnswerError(why)| why),
        };
        let slot = match &key {
            Some(key) => Slot::Keyed(p, key),
            None => Slot::Provider(p),
        };
        finish(provider, slot, records, now, result)
    }
}

/// What [`Refresher::lead`] made of a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lead {
    /// Called, led by another worker, or holding a value: nothing more.
    Done,
    /// No value and in backoff after a failed call: ask again later.
    Later,
}

/// A keyed record past its provider's `max_keys` keys ([`admit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full {
    pub max_keys: usize,
}

/// Admits `key` to keyed provider `provider` at `now`, for a request that
/// waits for its first value: listed in the provider's [`Index`] (by
/// compare-and-swap) unless listed already, and its record made (or, after
/// a drop, marked used) so that the next tick calls for it. A key already
/// holding a value is admitted as it is.
///
/// # Errors
/// [`Full`] when `max_keys` other keys are listed: the request is refused
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
    let slot = Slot::Keyed(provider, key);
    let stored = records.read(slot);
    if stored.as_ref().is_some_and(|(record, _)| !record.values.is_empty()) {
        return Ok(());
    }
    for _ in 0..WRITE_ATTEMPTS {
        let (bytes, version) = records.read_bytes(Slot::Index(provider)).unwrap_or_default();
        let mut index = Index::decode(&bytes);
        if index.keys.iter().any(|k| k == key) {
            break;
        }
        if index.keys.len() >= keyed.max_keys {
            return Err(Full { max_keys: keyed.max_keys });
        }
        index.keys.push(key.to_string());
        if records.write_bytes(Slot::Index(provider), &index.encode(), version) {
            break;
        }
    }
    match stored {
        // Two workers admitting the same new key at the same instant may
        // both create it (shared data has no create-if-absent); the lease
        // that follows is compare-and-swap, so at worst one extra call.
        None => {
            records.write(slot, &Record { used_at: now, ..Record::default() }, None);
        }
        Some((record, version)) if record.idle(keyed.touch_ms(), now) => {
            records.write(slot, &Record { used_at: now, ..record }, version);
        }
        Some(_) => {}
    }
    Ok(())
}

/// True when every keyed record `slots` (provider, key) holds a usable
/// value at `now`: a request waiting for them can be decided again.
pub fn ready(records: &dyn SharedRecords, slots: &[(usize, String)], now: i64) -> bool {
    slots
        .iter()
        .all(|(p, key)| records.read(Slot::Keyed(*p, key)).is_some_and(|(record, _)| record.usable(now).is_some()))
}

/// Removes `key` from keyed provider `p`'s index (compare-and-swap, retried).
fn unlist(records: &mut dyn SharedRecords, p: usize, key: &str) {
    for _ in 0..WRITE_ATTEMPTS {
        let Some((bytes, version)) = records.read_bytes(Slot::Index(p)) else { return };
        let mut index = Index::decode(&bytes);
        let before = index.keys.len();
        index.keys.retain(|k| k != key);
        if index.keys.len() == before || records.write_bytes(Slot::Index(p), &index.encode(), version) {
            return;
        }
    }
}

/// Marks a keyed record used at `now` (one compare-and-swap, not retried:
/// a lost write is made by the next request). Hosts call it only for a
/// [`Used`] with `touch` set, so at most once per
/// [`super::Keyed::touch_ms`] per worker.
pub fn touch(records: &mut dyn SharedRecords, used: &Used, now: i64) {
    let Some(key) = &used.key else { return };
    let slot = Slot::Keyed(used.provider, key);
    if let Some((record, version)) = records.read(slot) {
        if record.used_at < now {
            records.write(slot, &Record { used_at: now, ..record }, version);
        }
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
        let (record, version) = records.read(slot).unwrap_or_default();
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
        let mut call = |_: &Provider, _: &[(String, String)]| {
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
        let mut refused = |_: &Provider, _: &[(String, String)]| Err("the call was refused".to_string());
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
        let mut call = |_: &Provider, _: &[(String, String)]| {
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
            keyed: Some(crate::credential::Keyed { idle_ms: 120_000, max_keys }),
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
        assert!(store.is_empty(), "keyed records are made on demand, not at start");
        let calls: std::cell::RefCell<Vec<Vec<(String, String)>>> = std::cell::RefCell::default();
        let mut call = |_: &Provider, headers: &[(String, String)]| {
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
        a.demand(0, "team/a", Some("Bearer user-1"));
        b.demand(0, "team/a", None);
        a.demand(0, "team-b", None);
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
        touch(&mut store, &used, 100_000);
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

    /// A first value whose call failed is asked for again once the backoff
    /// ends (the waiting request is still there), not before.
    #[test]
    fn a_failed_first_fetch_is_retried_after_its_backoff() {
        let providers = [keyed_provider(10)];
        let mut store = MemoryRecords::new(1);
        let mut a = Refresher::default();
        let mut n = 0;
        let mut call = |_: &Provider, _: &[(String, String)]| {
            n += 1;
            Ok(n)
        };
        assert_eq!(admit(&providers, &mut store, 0, "c", 0), Ok(()));
        a.demand(0, "c", None);
        a.tick(&providers, &mut store, 0, &mut call);
        a.answer(&providers, &mut store, 1, Reply::Lost, 100);
        a.demand(0, "c", None);
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
        assert!(store.write(Slot::Keyed(0, "a"), &Record::default(), None), "keyed slots are their own");
        assert!(store.read(Slot::Keyed(0, "b")).is_none());
        assert!(store.read(Slot::Index(0)).is_none());
    }
}
