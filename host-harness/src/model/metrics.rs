//! Metrics (`proxy_define_metric`, `proxy_increment_metric`,
//! `proxy_record_metric`, `proxy_get_metric`) with Envoy 1.40's semantics,
//! checked against a real Envoy 1.40 with a probe module:
//!
//! - ids carry their type in the low two bits (counter 0, gauge 1,
//!   histogram 2) and step by 4 from there, per VM: the first counter is 4,
//!   the first gauge 5, the first histogram 6;
//! - every define hands out a **new** id, even for a name already defined;
//!   ids of one name and type share one value (Envoy's stats store keeps one
//!   stat a name), so a counter defined twice and incremented through both
//!   ids counts both;
//! - a type above 2 is `BAD_ARGUMENT`;
//! - increment: a counter takes offsets > 0 (0 or less is `BAD_ARGUMENT`), a
//!   gauge any offset; a histogram id (or a type-3 id) is `BAD_ARGUMENT`;
//! - record: a counter *adds* the value, a gauge is set to it, a histogram
//!   records it;
//! - get: counters and gauges; a histogram id (or a type-3 id) is
//!   `BAD_ARGUMENT`;
//! - an id never handed out is `NOT_FOUND` (type-3 ids under record, too).
//!
//! Values wrap like Envoy's unsigned 64-bit stats. Envoy shows these stats
//! as `wasmcustom.<name>` and sums every VM of a plugin; the harness keeps
//! them per instance, under the name the module gave.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use super::status::Status;

/// `proxy_metric_type_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MetricType {
    Counter = 0,
    Gauge = 1,
    Histogram = 2,
}

impl MetricType {
    /// The type for an ABI value, if it is one.
    pub fn from_abi(value: u32) -> Option<Self> {
        match value {
            0 => Some(Self::Counter),
            1 => Some(Self::Gauge),
            2 => Some(Self::Histogram),
            _ => None,
        }
    }

    /// The type an id belongs to (its low two bits), if any.
    fn of_id(id: u32) -> Option<Self> {
        Self::from_abi(id & TYPE_MASK)
    }
}

impl fmt::Display for MetricType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Counter => "counter",
            Self::Gauge => "gauge",
            Self::Histogram => "histogram",
        })
    }
}

const TYPE_MASK: u32 = 0x3;
const ID_STEP: u32 = 0x4;

/// One stat: a name and a type, its value (counters and gauges) or its
/// recorded values (histograms).
#[derive(Debug, Clone)]
struct Stat {
    name: String,
    kind: MetricType,
    value: u64,
    samples: Vec<u64>,
}

/// Every metric one VM defined: ids to stats, stats by (type, name).
#[derive(Debug, Clone)]
pub struct MetricStore {
    stats: Vec<Stat>,
    by_name: HashMap<(MetricType, String), usize>,
    ids: HashMap<u32, usize>,
    /// The last id handed out, per type (starts at the type's value).
    last_id: [u32; 3],
}

impl Default for MetricStore {
    fn default() -> Self {
        Self {
            stats: Vec::new(),
            by_name: HashMap::new(),
            ids: HashMap::new(),
            last_id: [MetricType::Counter as u32, MetricType::Gauge as u32, MetricType::Histogram as u32],
        }
    }
}

impl MetricStore {
    /// `proxy_define_metric`: a new id for `name`, sharing the value of any
    /// earlier id of the same name and type.
    ///
    /// # Errors
    /// `BAD_ARGUMENT` for a type above 2; `INTERNAL_FAILURE` when a type's
    /// ids are exhausted.
    pub fn define(&mut self, kind: u32, name: &str) -> Result<u32, Status> {
        let kind = MetricType::from_abi(kind).ok_or(Status::BadArgument)?;
        let slot = &mut self.last_id[kind as usize];
        let id = slot.checked_add(ID_STEP).ok_or(Status::InternalFailure)?;
        *slot = id;
        let index = match self.by_name.get(&(kind, name.to_string())) {
            Some(&index) => index,
            None => {
                self.stats.push(Stat { name: name.to_string(), kind, value: 0, samples: Vec::new() });
                let index = self.stats.len() - 1;
                self.by_name.insert((kind, name.to_string()), index);
                index
            }
        };
        self.ids.insert(id, index);
        Ok(id)
    }

    fn stat(&mut self, id: u32) -> Option<&mut Stat> {
        let index = *self.ids.get(&id)?;
        self.stats.get_mut(index)
    }

    /// `proxy_increment_metric`.
    ///
    /// # Errors
    /// `BAD_ARGUMENT` for a histogram or type-3 id, or a counter offset that
    /// is not positive; `NOT_FOUND` for an unknown counter or gauge id.
    pub fn increment(&mut self, id: u32, offset: i64) -> Result<(), Status> {
        let kind = match MetricType::of_id(id) {
            Some(kind @ (MetricType::Counter | MetricType::Gauge)) => kind,
            _ => return Err(Status::BadArgument),
        };
        let stat = self.stat(id).ok_or(Status::NotFound)?;
        match (kind, offset > 0) {
            (_, true) => stat.value = stat.value.wrapping_add(offset.unsigned_abs()),
            (MetricType::Gauge, false) => stat.value = stat.value.wrapping_sub(offset.unsigned_abs()),
            _ => return Err(Status::BadArgument),
        }
        Ok(())
    }

    /// `proxy_record_metric`.
    ///
    /// # Errors
    /// `NOT_FOUND` for an id never handed out (type-3 ids included).
    pub fn record(&mut self, id: u32, value: u64) -> Result<(), Status> {
        let stat = self.stat(id).ok_or(Status::NotFound)?;
        match stat.kind {
            MetricType::Counter => stat.value = stat.value.wrapping_add(value),
            MetricType::Gauge => stat.value = value,
            MetricType::Histogram => stat.samples.push(value),
        }
        Ok(())
    }

    /// `proxy_get_metric`.
    ///
    /// # Errors
    /// `BAD_ARGUMENT` for a histogram or type-3 id; `NOT_FOUND` for an
    /// unknown counter or gauge id.
    pub fn get(&mut self, id: u32) -> Result<u64, Status> {
        match MetricType::of_id(id) {
            Some(MetricType::Counter | MetricType::Gauge) => {}
            _ => return Err(Status::BadArgument),
        }
        self.stat(id).map(|s| s.value).ok_or(Status::NotFound)
    }

    /// Counters and gauges by name, with their values; histograms with the
    /// number of values recorded. One entry a name: Envoy lets a module
    /// define one name as two types (two stats no sink can tell apart);
    /// here the one defined first is listed.
    pub fn snapshot(&self) -> BTreeMap<String, (MetricType, u64)> {
        let mut out = BTreeMap::new();
        for stat in &self.stats {
            let value = match stat.kind {
                MetricType::Histogram => u64::try_from(stat.samples.len()).unwrap_or(u64::MAX),
                _ => stat.value,
            };
            out.entry(stat.name.clone()).or_insert((stat.kind, value));
        }
        out
    }

    /// The values recorded into a histogram, in order.
    pub fn histogram(&self, name: &str) -> Option<&[u64]> {
        let index = *self.by_name.get(&(MetricType::Histogram, name.to_string()))?;
        self.stats.get(index).map(|s| s.samples.as_slice())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COUNTER: u32 = 0;
    const GAUGE: u32 = 1;
    const HISTOGRAM: u32 = 2;

    /// The statuses and values a probe module saw in Envoy 1.40.
    #[test]
    fn matches_envoy() {
        let mut store = MetricStore::default();
        let c1 = store.define(COUNTER, "c").unwrap();
        let c2 = store.define(COUNTER, "c").unwrap();
        let d = store.define(COUNTER, "d").unwrap();
        let g = store.define(GAUGE, "g").unwrap();
        let h = store.define(HISTOGRAM, "h").unwrap();
        assert_eq!((c1, c2, d, g, h), (4, 8, 12, 5, 6));
        assert_eq!(store.define(3, "x"), Err(Status::BadArgument));
        assert_eq!(store.define(GAUGE, "c"), Ok(9), "a gauge may share a counter's name");

        assert_eq!(store.increment(c1, 1), Ok(()));
        assert_eq!(store.increment(c1, 0), Err(Status::BadArgument));
        assert_eq!(store.increment(c1, -1), Err(Status::BadArgument));
        assert_eq!(store.increment(g, 5), Ok(()));
        assert_eq!(store.increment(g, -2), Ok(()));
        assert_eq!(store.increment(h, 1), Err(Status::BadArgument));
        assert_eq!(store.increment(4000, 1), Err(Status::NotFound));
        assert_eq!(store.increment(4001, 1), Err(Status::NotFound));
        assert_eq!(store.increment(7, 1), Err(Status::BadArgument));

        assert_eq!(store.get(g), Ok(3));
        assert_eq!(store.record(c1, 10), Ok(()), "record on a counter adds");
        assert_eq!(store.record(g, 7), Ok(()), "record on a gauge sets");
        assert_eq!(store.record(h, 3), Ok(()));
        assert_eq!(store.record(4000, 1), Err(Status::NotFound));
        assert_eq!(store.record(7, 1), Err(Status::NotFound));

        assert_eq!(store.get(c1), Ok(11));
        assert_eq!(store.get(c2), Ok(11), "ids of one name share its value");
        assert_eq!(store.get(g), Ok(7));
        assert_eq!(store.get(h), Err(Status::BadArgument));
        assert_eq!(store.get(4000), Err(Status::NotFound));
        assert_eq!(store.get(7), Err(Status::BadArgument));

        let snapshot = store.snapshot();
        assert_eq!(snapshot["c"], (MetricType::Counter, 11), "the counter was defined first");
        assert_eq!(snapshot["d"], (MetricType::Counter, 0));
        assert_eq!(snapshot["g"], (MetricType::Gauge, 7));
        assert_eq!(snapshot["h"], (MetricType::Histogram, 1));
        assert_eq!(store.histogram("h"), Some(&[3][..]));
    }

    #[test]
    fn gauges_wrap_like_envoy() {
        let mut store = MetricStore::default();
        let g = store.define(GAUGE, "g").unwrap();
        store.record(g, 1 << 63).unwrap();
        store.increment(g, i64::MIN).unwrap();
        assert_eq!(store.get(g), Ok(0));
    }
}
