//! The shared state of one provider: what every worker of a host reads on
//! the request path and writes back, by compare-and-swap, after a refresh.

use std::fmt::Write as _;

use crate::json::{self, Reader};

use super::provider::{Answer, Provider, MAX_BACKOFF_MS, MIN_FORCED_REFRESH_MS};

/// The shared state of one provider.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Record {
    /// The last good values; empty until the first success.
    pub values: Vec<String>,
    /// Unix milliseconds; the values are refused from then on.
    pub expires_at: Option<i64>,
    /// Unix milliseconds at which the next refresh is due (0: now).
    pub refresh_at: i64,
    /// Failed refreshes since the last success.
    pub failures: u32,
    /// Unix milliseconds until which one worker's call is in flight.
    pub lease_until: i64,
    /// Bumped each time the values change.
    pub generation: u64,
    /// Unix milliseconds of the last refresh forced by an upstream's 401
    /// ([`Record::rejected`]); 0: never. The next forced refresh is due
    /// [`MIN_FORCED_REFRESH_MS`] later at the earliest.
    pub forced_at: i64,
    /// The generation whose values an upstream answered 401 to, while
    /// their replacement is being fetched ([`Record::rejected`]).
    pub rejected: Option<u64>,
    /// A keyed record: Unix milliseconds of the last request known to have
    /// used it (written at most once per [`super::Keyed::touch_ms`] per
    /// worker); it is dropped once unused for the provider's idle time.
    pub used_at: i64,
    /// An on-behalf-of exchange's record: the STS refused its subject
    /// (`invalid_grant`); requests with that subject are answered
    /// `invalid_subject_token` until `refresh_at`, when one may try again.
    pub refused: bool,
    /// A keyed record: the key (client id, or subject digest) it belongs
    /// to. Its pool slot is reused by another key once this one is dropped
    /// or evicted, so every read checks it: a record stamped with another
    /// key is absent ([`super::SharedRecords::read`]).
    pub owner: String,
}

/// What [`Record::succeeded`] changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Success {
    /// The values differ from the cached ones (or there were none).
    pub changed: bool,
    /// The failure streak this success ended (0 when there was none).
    pub recovered_after: u32,
}

impl Record {
    /// The values a request may use at `now`, if any.
    pub fn usable(&self, now: i64) -> Option<&[String]> {
        let fresh = self.expires_at.is_none_or(|at| now < at);
        (!self.values.is_empty() && fresh).then_some(self.values.as_slice())
    }

    /// True when a refresh is due and no worker holds the lease.
    pub fn due(&self, now: i64) -> bool {
        now >= self.refresh_at && now >= self.lease_until
    }

    /// This record with a lease taken at `now` for a call of `provider`.
    pub fn leased(&self, provider: &Provider, now: i64) -> Record {
        let lease = i64::try_from(provider.timeout_ms).unwrap_or(i64::MAX).saturating_add(1000);
        Record { lease_until: now.saturating_add(lease), ..self.clone() }
    }

    /// This record after a successful call. Unchanged values keep their
    /// generation (only changed values replace the cached ones).
    pub fn succeeded(&self, answer: Answer) -> (Record, Success) {
        let changed = answer.values != self.values;
        let record = Record {
            generation: if changed { self.generation.saturating_add(1) } else { self.generation },
            values: answer.values,
            expires_at: answer.expires_at,
            refresh_at: answer.refresh_at,
            failures: 0,
            lease_until: 0,
            forced_at: self.forced_at,
            rejected: None,
            used_at: self.used_at,
            refused: false,
            owner: self.owner.clone(),
        };
        (record, Success { changed, recovered_after: self.failures })
    }

    /// This record after a failed call at `now`: the last good values are
    /// kept (until they expire), unless an upstream rejected them (a
    /// rejected value is not kept past a failed refetch), and the next try
    /// waits 1 s, 2 s, 4 s, … up to [`MAX_BACKOFF_MS`].
    pub fn failed(&self, now: i64) -> Record {
        let failures = self.failures.saturating_add(1);
        let next = Record {
            failures,
            refresh_at: now.saturating_add(backoff_ms(failures)),
            lease_until: 0,
            refused: false,
            ..self.clone()
        };
        if self.rejected.is_some() {
            Record { values: Vec::new(), expires_at: None, rejected: None, ..next }
        } else {
            next
        }
    }

    /// An on-behalf-of exchange's record after the STS refused its subject
    /// at `now`: no value, marked refused until the backoff ends (1 s, 2 s,
    /// … up to [`MAX_BACKOFF_MS`]), so a refused token costs at most one
    /// call per that interval however often it is presented.
    pub fn refused_subject(&self, now: i64) -> Record {
        let failures = self.failures.saturating_add(1);
        Record {
            values: Vec::new(),
            expires_at: None,
            failures,
            refresh_at: now.saturating_add(backoff_ms(failures)),
            lease_until: 0,
            rejected: None,
            refused: true,
            ..self.clone()
        }
    }

    /// This record after an upstream answered 401 at `now` to a request
    /// that carried the values of `generation`: a refresh is due at once,
    /// or [`MIN_FORCED_REFRESH_MS`] after the last forced one, whichever is
    /// later, so an upstream that rejects every value causes at most one
    /// call per that interval. The values are kept until that refresh
    /// replaces them, and dropped if it fails: a route's values are shared
    /// by all its clients, and dropping them at once would let any one
    /// client that can draw a 401 from the upstream turn the route into
    /// `credential_unavailable` for every other client. `None` when there
    /// is nothing to do: the values of `generation` were already rejected,
    /// or replaced by newer ones (a late 401 never touches a newer value).
    pub fn rejected(&self, generation: u64, now: i64) -> Option<Record> {
        if generation != self.generation || self.values.is_empty() || self.rejected == Some(generation) {
            return None;
        }
        let due = if self.forced_at == 0 { now } else { now.max(self.forced_at.saturating_add(MIN_FORCED_REFRESH_MS)) };
        Some(Record { refresh_at: due, forced_at: due, rejected: Some(generation), ..self.clone() })
    }

    /// A keyed record after its key went unused for the idle time: no
    /// values (a later request fetches anew), a new generation (a late 401
    /// for the old values touches nothing), no failure streak.
    pub fn dropped(&self) -> Record {
        Record {
            generation: self.generation.saturating_add(1),
            used_at: self.used_at,
            owner: self.owner.clone(),
            ..Record::default()
        }
    }

    /// True when a keyed record has gone unused for `idle_ms` at `now`.
    pub fn idle(&self, idle_ms: i64, now: i64) -> bool {
        now.saturating_sub(self.used_at) >= idle_ms
    }

    /// The shared-data encoding: a JSON object of the fields (`refused`
    /// and `owner` only when set).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = String::with_capacity(160);
        out.push_str("{\"values\":[");
        for (i, value) in self.values.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            json::write_string(&mut out, value);
        }
        out.push_str("],\"expires_at\":");
        match self.expires_at {
            Some(at) => write!(out, "{at}"),
            None => write!(out, "null"),
        }
        .unwrap_or_default();
        let _ = write!(
            out,
            ",\"refresh_at\":{},\"failures\":{},\"lease_until\":{},\"generation\":{},\"forced_at\":{},\"rejected\":",
            self.refresh_at, self.failures, self.lease_until, self.generation, self.forced_at
        );
        match self.rejected {
            Some(generation) => write!(out, "{generation}"),
            None => write!(out, "null"),
        }
        .unwrap_or_default();
        let _ = write!(out, ",\"used_at\":{}", self.used_at);
        if self.refused {
            out.push_str(",\"refused\":true");
        }
        if !self.owner.is_empty() {
            out.push_str(",\"owner\":");
            json::write_string(&mut out, &self.owner);
        }
        out.push('}');
        out.into_bytes()
    }

    /// Reads [`Record::encode`]'s output (fields in any order, unknown ones
    /// skipped); anything else is an empty record.
    pub fn decode(bytes: &[u8]) -> Record {
        Self::read(bytes).unwrap_or_default()
    }

    fn read(bytes: &[u8]) -> Result<Record, json::Error> {
        let mut r = Reader::new(bytes);
        let mut record = Record::default();
        let mut o = r.object("a record")?;
        while let Some(key) = r.key(&mut o)? {
            match &*key {
                "values" => {
                    let mut a = r.array("a sequence")?;
                    while r.item(&mut a)?.is_some() {
                        record.values.push(r.string()?.into_owned());
                    }
                }
                "expires_at" => record.expires_at = if r.null()? { None } else { Some(r.i64()?) },
                "refresh_at" => record.refresh_at = r.i64()?,
                "failures" => record.failures = u32::try_from(r.u64()?).map_err(|_| r.error("too many failures"))?,
                "lease_until" => record.lease_until = r.i64()?,
                "generation" => record.generation = r.u64()?,
                "forced_at" => record.forced_at = r.i64()?,
                "rejected" => record.rejected = if r.null()? { None } else { Some(r.u64()?) },
                "used_at" => record.used_at = r.i64()?,
                "refused" => record.refused = r.bool()?,
                "owner" => record.owner = r.string()?.into_owned(),
                _ => r.skip()?,
            }
        }
        r.end()?;
        Ok(record)
    }
}

/// The wait before retry number `failures` (1-based).
pub fn backoff_ms(failures: u32) -> i64 {
    let exp = failures.saturating_sub(1).min(16);
    (1000i64 << exp).min(MAX_BACKOFF_MS)
}

// Credentials never show in Debug output: values are counted, not printed.
impl std::fmt::Debug for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Record")
            .field("values", &format_args!("[{} redacted]", self.values.len()))
            .field("expires_at", &self.expires_at)
            .field("refresh_at", &self.refresh_at)
            .field("failures", &self.failures)
            .field("lease_until", &self.lease_until)
            .field("generation", &self.generation)
            .field("forced_at", &self.forced_at)
            .field("rejected", &self.rejected)
            .field("used_at", &self.used_at)
            .field("refused", &self.refused)
            // A subject's digest is named by nothing either.
            .field("owner", &format_args!("[{} bytes]", self.owner.len()))
            .finish()
    }
}

/// A keyed provider's index: the keys that hold a record with (or waiting
/// for) values, at most the provider's `max_keys`, each with the number of
/// the pool slot its record is stored in (`0..max_keys`: a slot freed by a
/// dropped or evicted key is given to the next new one, so a provider never
/// has more than `max_keys` records however many keys come and go), least
/// recently used first. Written by compare-and-swap when a key is admitted
/// and when it is dropped, never on a request that finds its value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Index {
    pub entries: Vec<(String, u32)>,
}

impl Index {
    /// The pool slot of `key`, if listed.
    pub fn slot_of(&self, key: &str) -> Option<u32> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, slot)| *slot)
    }

    /// The pool slot of `key` in [`Index::encode`]'s output, found without
    /// decoding it (a request for a key this worker has no hint of reads
    /// the index; at 1,000 keys a decode is most of that). An entry is
    /// encoded `["<key, JSON-escaped>",<slot>]`: inside a JSON string a `"`
    /// is always escaped, so `["` opens an entry's key and the match is
    /// that whole key.
    pub fn find(bytes: &[u8], key: &str) -> Option<u32> {
        let mut needle = "[".to_string();
        json::write_string(&mut needle, key);
        needle.push(',');
        let needle = needle.as_bytes();
        let at = bytes.windows(needle.len()).position(|w| w == needle)? + needle.len();
        let digits = bytes.get(at..)?.iter().take_while(|b| b.is_ascii_digit()).count();
        std::str::from_utf8(bytes.get(at..at + digits)?).ok()?.parse().ok()
    }

    /// The lowest slot number under `max_keys` no listed key holds.
    pub fn free_slot(&self, max_keys: usize) -> Option<u32> {
        let max = u32::try_from(max_keys).unwrap_or(u32::MAX);
        (0..max).find(|n| !self.entries.iter().any(|(_, slot)| slot == n))
    }

    /// The shared-data encoding: `{"entries":[["<key>",<slot>],…]}`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = String::with_capacity(16 + self.entries.len() * 72);
        out.push_str("{\"entries\":[");
        for (i, (key, slot)) in self.entries.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push('[');
            json::write_string(&mut out, key);
            let _ = write!(out, ",{slot}]");
        }
        out.push_str("]}");
        out.into_bytes()
    }

    /// Reads [`Index::encode`]'s output; anything else is an empty index.
    pub fn decode(bytes: &[u8]) -> Index {
        Self::read(bytes).unwrap_or_default()
    }

    fn read(bytes: &[u8]) -> Result<Index, json::Error> {
        let mut r = Reader::new(bytes);
        let mut index = Index::default();
        let mut o = r.object("an index")?;
        while let Some(key) = r.key(&mut o)? {
            if key != "entries" {
                r.skip()?;
                continue;
            }
            let mut entries = r.array("a sequence")?;
            while r.item(&mut entries)?.is_some() {
                let mut pair = r.array("a pair")?;
                let (key, slot) = match (r.item(&mut pair)?, r.string()?, r.item(&mut pair)?, r.u64()?) {
                    (Some(_), key, Some(_), slot) => (key.into_owned(), slot),
                    _ => return Err(r.error("a pair")),
                };
                if r.item(&mut pair)?.is_some() {
                    return Err(r.error("a pair"));
                }
                index.entries.push((key, u32::try_from(slot).map_err(|_| r.error("a slot"))?));
            }
        }
        r.end()?;
        Ok(index)
    }
}

#[cfg(test)]
mod tests {
    use super::{Index, Record};

    /// Records and the index are shared with the VMs of the module they
    /// replace during a push: the encoding is byte for byte what the
    /// serde_json build wrote (fields in this order, `refused` and `owner`
    /// only when set), and each reads the other's.
    #[test]
    fn the_encoding_is_the_one_the_previous_module_wrote() {
        let record = Record {
            values: vec!["tok-\"1\"".into(), "b".into()],
            expires_at: Some(1_800_000_000_000),
            refresh_at: 1_799_999_000_000,
            generation: 7,
            rejected: Some(6),
            used_at: -1,
            ..Record::default()
        };
        let written = r#"{"values":["tok-\"1\"","b"],"expires_at":1800000000000,"refresh_at":1799999000000,"failures":0,"lease_until":0,"generation":7,"forced_at":0,"rejected":6,"used_at":-1}"#;
        assert_eq!(String::from_utf8_lossy(&record.encode()), written);
        assert_eq!(Record::decode(written.as_bytes()), record);
        let keyed = Record { refused: true, owner: "client-7".into(), ..Record::default() };
        let written = r#"{"values":[],"expires_at":null,"refresh_at":0,"failures":0,"lease_until":0,"generation":0,"forced_at":0,"rejected":null,"used_at":0,"refused":true,"owner":"client-7"}"#;
        assert_eq!(String::from_utf8_lossy(&keyed.encode()), written);
        assert_eq!(Record::decode(written.as_bytes()), keyed);
        // Fields in another order, one unknown: still read; anything else
        // is an empty record.
        let shuffled = br#"{"generation":3,"new_field":[1,{"a":2}],"values":["v"]}"#;
        assert_eq!(Record::decode(shuffled), Record { generation: 3, values: vec!["v".into()], ..Record::default() });
        assert_eq!(Record::decode(br#"{"values":[1]}"#), Record::default());

        let index = Index { entries: vec![("a\"b".into(), 3), ("c".into(), 0)] };
        let written = r#"{"entries":[["a\"b",3],["c",0]]}"#;
        assert_eq!(String::from_utf8_lossy(&index.encode()), written);
        assert_eq!(Index::decode(written.as_bytes()), index);
        assert_eq!(Index::find(written.as_bytes(), "a\"b"), Some(3));
        assert_eq!(Index::decode(br#"{"entries":[["a"]]}"#), Index::default());
    }
}
