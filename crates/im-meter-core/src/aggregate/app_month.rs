//! The usage aggregate of one app in one billing month, and its versioned encoding.
//!
//! [`AppMonthAggregate`] holds MAU and per-day DAU sketches, the PCC timeline and the
//! group-count peak. Aggregates of disjoint event sets (e.g. two Kafka partitions) merge
//! into the aggregate of their union: HLL union, instant-wise sums, max. The encoding is
//! what a worker checkpoints: a magic, a format version and a checksum around a postcard
//! payload, canonical (equal aggregates encode to equal bytes).

use std::collections::BTreeMap;

use rustc_hash::FxHashSet;
use serde::{Deserialize, Serialize};

use super::pcc::PccTimeline;
use super::unique::{Precision, PrecisionMismatch, UniqueUsers};
use super::usage::MonthlyUsage;
use crate::ingest::UserKey;
use crate::plan::AppId;
use crate::time::{Day, Month};

/// Usage of one app in one month, as mergeable partial state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AppMonthAggregate {
    mau: UniqueUsers,
    /// Day of the month → that day's unique users.
    dau: BTreeMap<u8, UniqueUsers>,
    pcc: PccTimeline,
    group_count_peak: u64,
    /// Exact user sets, kept only when auditing the sketches (`replay --exact`).
    #[serde(skip)]
    exact: Option<Box<ExactUsers>>,
    /// What changed since the meter last checkpointed it (never encoded).
    #[serde(skip)]
    unsaved: Unsaved,
}

/// Changes not checkpointed yet: flags kept in the aggregate itself, so that applying an
/// event costs no lookup in a separate set of changed keys.
#[derive(Copy, Clone, Debug, Default)]
struct Unsaved {
    /// The aggregate changed (or is new).
    any: bool,
    /// Bit d: the DAU of day d changed.
    days: u32,
}

/// Exact MAU and DAU sets, the reference the sketches are audited against.
#[derive(Clone, Debug, Default)]
struct ExactUsers {
    mau: FxHashSet<u64>,
    dau: BTreeMap<u8, FxHashSet<u64>>,
}

/// Exactly counted unique users of an app-month, from an audit run.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct ExactCounts {
    /// Exact MAU.
    pub mau: u64,
    /// Exact users of the busiest day.
    pub dau_peak: u64,
}

impl AppMonthAggregate {
    /// An empty aggregate; `exact` also keeps exact user sets for auditing.
    pub fn new(precision: Precision, exact: bool) -> Self {
        AppMonthAggregate {
            mau: UniqueUsers::new(precision),
            dau: BTreeMap::new(),
            pcc: PccTimeline::new(),
            group_count_peak: 0,
            exact: exact.then(Box::default),
            unsaved: Unsaved { any: true, days: 0 },
        }
    }

    /// A successful login of `user` on `day`.
    #[inline]
    pub fn record_login(&mut self, day: Day, user: UserKey) {
        let precision = self.mau.precision();
        self.mau.insert(user);
        let d = day.number() as u8;
        self.dau.entry(d).or_insert_with(|| UniqueUsers::new(precision)).insert(user);
        self.unsaved.any = true;
        self.unsaved.days |= 1 << d;
        if let Some(exact) = self.exact.as_deref_mut() {
            exact.mau.insert(user.0);
            exact.dau.entry(d).or_default().insert(user.0);
        }
    }

    /// The MAU while it is still counted exactly (up to
    /// [`EXACT_LIMIT`](super::unique::EXACT_LIMIT) users).
    pub fn exact_mau(&self) -> Option<usize> {
        self.mau.exact_len()
    }

    /// A `group_stats` sample.
    pub fn record_group_count(&mut self, group_count: u64) {
        self.group_count_peak = self.group_count_peak.max(group_count);
        self.unsaved.any = true;
    }

    /// The HLL++ precision its sketches were made at.
    pub fn precision(&self) -> super::unique::Precision {
        self.mau.precision()
    }

    /// Notes a change the aggregate cannot see (the PCC timeline was handed out, an event
    /// made the app-month known).
    pub(crate) fn touch(&mut self) {
        self.unsaved.any = true;
    }

    /// Whether anything changed since the last [`AppMonthAggregate::take_unsaved_days`].
    pub(crate) fn is_unsaved(&self) -> bool {
        self.unsaved.any
    }

    /// The days whose DAU changed since the last call, ascending; the aggregate counts as
    /// saved afterwards.
    pub(crate) fn take_unsaved_days(&mut self) -> Vec<u8> {
        let days = std::mem::take(&mut self.unsaved).days;
        (1..=31u8).filter(|d| days & (1 << d) != 0).collect()
    }

    /// The PCC timeline, to count connections into.
    pub fn pcc_mut(&mut self) -> &mut PccTimeline {
        &mut self.pcc
    }

    /// The PCC timeline.
    pub fn pcc(&self) -> &PccTimeline {
        &self.pcc
    }

    /// Adds the usage of `other`, an aggregate of other events of the same app-month.
    pub fn merge(&mut self, other: &AppMonthAggregate) -> Result<(), PrecisionMismatch> {
        self.mau.merge(&other.mau)?;
        for (&d, sketch) in &other.dau {
            match self.dau.get_mut(&d) {
                Some(mine) => mine.merge(sketch)?,
                None => {
                    self.dau.insert(d, sketch.clone());
                }
            }
        }
        self.pcc.merge(&other.pcc);
        self.group_count_peak = self.group_count_peak.max(other.group_count_peak);
        if let (Some(mine), Some(theirs)) = (self.exact.as_deref_mut(), other.exact.as_deref()) {
            mine.mau.extend(&theirs.mau);
            for (&d, users) in &theirs.dau {
                mine.dau.entry(d).or_default().extend(users);
            }
        }
        Ok(())
    }

    /// The month's figures. `grid` turns the PCC peak's sample index into an instant.
    pub fn usage(&mut self, app_id: AppId, month: Month, grid: super::pcc::SampleGrid) -> MonthlyUsage {
        let (pcc, peak_index) = self.pcc.peak();
        MonthlyUsage {
            app_id,
            month,
            mau: self.mau.estimate(),
            dau_peak: self.dau.values_mut().map(UniqueUsers::estimate).max().unwrap_or(0),
            pcc,
            pcc_at: peak_index.map(|i| grid.instant(i)),
            group_count_peak: self.group_count_peak,
        }
    }

    /// Exact counts, when the aggregate was built for an audit.
    pub fn exact_counts(&self) -> Option<ExactCounts> {
        self.exact.as_deref().map(|e| ExactCounts {
            mau: e.mau.len() as u64,
            dau_peak: e.dau.values().map(|s| s.len() as u64).max().unwrap_or(0),
        })
    }

    /// Encodes the aggregate (flushing the sketches first, so equal aggregates give
    /// equal bytes).
    pub fn encode(&mut self) -> Vec<u8> {
        self.mau.flush();
        self.dau.values_mut().for_each(UniqueUsers::flush);
        let payload = postcard::to_allocvec(&*self).expect("in-memory aggregates always serialize");
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
        out.extend_from_slice(MAGIC);
        out.push(FORMAT_VERSION);
        out.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(&payload).to_le_bytes());
        out.extend_from_slice(&payload);
        out
    }

    /// The days of the month with at least one login.
    pub fn days(&self) -> impl Iterator<Item = u8> + '_ {
        self.dau.keys().copied()
    }

    /// Encodes the aggregate in parts, as the worker checkpoints it: the aggregate without
    /// its DAU sketches, and, for each of `days` it has, an aggregate holding only that
    /// day's sketch. Merging the parts gives the aggregate back. Why: a commit then writes
    /// the sketches of the days that changed (usually one) instead of every day's.
    pub fn encode_parts(&mut self, days: impl IntoIterator<Item = u8>) -> (Vec<u8>, Vec<(u8, Vec<u8>)>) {
        let mut dau = std::mem::take(&mut self.dau);
        let whole = self.encode();
        let mut part = AppMonthAggregate::new(self.mau.precision(), false);
        let mut parts = Vec::new();
        for d in days {
            if let Some(sketch) = dau.remove(&d) {
                part.dau.insert(d, sketch);
                parts.push((d, part.encode()));
                dau.extend(part.dau.remove(&d).map(|sketch| (d, sketch)));
            }
        }
        self.dau = dau;
        (whole, parts)
    }

    /// Decodes an encoded aggregate, checking magic, version and checksum.
    pub fn decode(bytes: &[u8]) -> Result<Self, CodecError> {
        if bytes.len() < HEADER_LEN || &bytes[..4] != MAGIC {
            return Err(CodecError::NotAnAggregate);
        }
        if bytes[4] != FORMAT_VERSION {
            return Err(CodecError::UnknownVersion(bytes[4]));
        }
        let (checksum, payload) = bytes[5..].split_at(8);
        let expected = u64::from_le_bytes(checksum.try_into().map_err(|_| CodecError::NotAnAggregate)?);
        if xxhash_rust::xxh3::xxh3_64(payload) != expected {
            return Err(CodecError::Corrupt("checksum mismatch".into()));
        }
        postcard::from_bytes(payload).map_err(|e| CodecError::Corrupt(e.to_string()))
    }
}

const MAGIC: &[u8; 4] = b"IMAM";
/// Version 1: postcard of `AppMonthAggregate` with hyperloglogplus 0.4.1 sketches.
const FORMAT_VERSION: u8 = 1;
const HEADER_LEN: usize = 4 + 1 + 8;

/// Why bytes could not be decoded into an aggregate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The bytes do not start like an encoded aggregate.
    #[error("not an encoded app-month aggregate")]
    NotAnAggregate,
    /// Written by a newer (or unknown) format version.
    #[error("unknown aggregate format version {0}")]
    UnknownVersion(u8),
    /// The payload is damaged.
    #[error("corrupt aggregate: {0}")]
    Corrupt(String),
    /// State counted at another HLL++ precision than the one configured: sketches of two
    /// precisions do not merge.
    #[error(
        "state counted at HLL precision {stored}, but metering.hll_precision is {configured}: the precision \
         may only change when no month is open (set it back to {stored} until the open months are billed)"
    )]
    PrecisionChanged {
        /// The precision the state was counted at.
        stored: u8,
        /// The precision configured now.
        configured: u8,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::pcc::MonthSamples;

    /// An aggregate exercising every part of the format: a sketch past the exact limit, a
    /// sparse day, an exact day, a PCC timeline and a group peak.
    fn golden_aggregate() -> AppMonthAggregate {
        let month: Month = "2026-11".parse().unwrap();
        let mut agg = AppMonthAggregate::new(Precision::default(), false);
        for u in 0..3_000u32 {
            let day = month.day(1 + u % 3).unwrap();
            agg.record_login(day, UserKey::of(&format!("user-{u}")));
        }
        agg.record_login(month.day(30).unwrap(), UserKey::of("late-user"));
        let samples = MonthSamples { first: 29_866_560, end: 29_909_760 };
        agg.pcc_mut().add_connection(samples, 29_866_600, Some(29_866_700));
        agg.pcc_mut().add_connection(samples, 29_866_650, None);
        agg.record_group_count(42);
        agg
    }

    /// The checkpoint format must not change by accident (a dependency bump, a reordered
    /// field): a changed encoding needs a new FORMAT_VERSION and a migration.
    #[test]
    fn the_encoding_is_pinned() {
        let bytes = golden_aggregate().encode();
        assert_eq!(&bytes[..5], b"IMAM\x01");
        assert_eq!(
            (bytes.len(), xxhash_rust::xxh3::xxh3_64(&bytes)),
            (15_920, 0x1a48_8ce2_ed0b_90f9),
            "format changed: bump FORMAT_VERSION and keep a decoder for version 1"
        );
    }

    #[test]
    fn parts_merge_into_the_whole() {
        let mut agg = golden_aggregate();
        let whole = agg.encode();
        let days: Vec<u8> = agg.days().collect();
        assert_eq!(days, vec![1, 2, 3, 30]);
        let (base, parts) = agg.encode_parts(days.iter().copied().chain([17]));
        assert_eq!(parts.iter().map(|(d, _)| *d).collect::<Vec<_>>(), days, "only days it has");
        assert_eq!(agg.encode(), whole, "encoding in parts leaves the aggregate as it was");
        let mut rebuilt = AppMonthAggregate::decode(&base).unwrap();
        assert_eq!(rebuilt.days().count(), 0);
        for (_, part) in &parts {
            rebuilt.merge(&AppMonthAggregate::decode(part).unwrap()).unwrap();
        }
        assert_eq!(rebuilt.encode(), whole);
    }

    #[test]
    fn damaged_or_foreign_bytes_are_refused() {
        let bytes = golden_aggregate().encode();
        assert_eq!(AppMonthAggregate::decode(b"nope").unwrap_err(), CodecError::NotAnAggregate);
        let mut newer = bytes.clone();
        newer[4] = 2;
        assert_eq!(AppMonthAggregate::decode(&newer).unwrap_err(), CodecError::UnknownVersion(2));
        let mut flipped = bytes.clone();
        flipped[20] ^= 1;
        assert!(matches!(AppMonthAggregate::decode(&flipped), Err(CodecError::Corrupt(_))));
        assert!(AppMonthAggregate::decode(&bytes).is_ok());
    }
}
