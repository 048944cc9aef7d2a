//! The usage aggregate of one app in one billing month, and its versioned encoding.
//!
//! [`AppMonthAggregate`] holds the MAU and per-day DAU counts (exact sets up to the exact
//! limit, HLL++ sketches beyond), the PCC timeline and the group-count peak. Aggregates of
//! disjoint event sets (e.g. two Kafka partitions) merge into the aggregate of their union:
//! set (or HLL) union, instant-wise sums, max. The encoding is
//! what a worker checkpoints: a magic, a format version and a checksum around a postcard
//! payload, canonical (equal aggregates encode to equal bytes).

use std::collections::BTreeMap;

use rustc_hash::FxHashSet;
use serde::{Deserialize, Serialize};

use super::checkpoint::{StateKey, StateRecord};
use super::pcc::PccTimeline;
use super::segments::SegmentWrites;
use super::unique::{Counted, Counting, Precision, PrecisionMismatch, UniqueUsers, UniqueUsersV2};
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
    /// Disconnects whose connect this share never saw, each counted like a connection from
    /// its time to the month's end. Where an app's shares come from several partitions the
    /// connect was counted in another share, open through the month's end, and merging
    /// takes these away from the sum ([`merge_shares`]); alone they count nothing.
    unpaired: PccTimeline,
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

/// Which unique-user count of an app-month.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum UserCount {
    /// The month's (MAU).
    Mau,
    /// One day's (DAU), by day of the month.
    Dau(u8),
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
    /// An empty aggregate counting users as `counting` says; `exact` also keeps exact user
    /// sets whatever the limit, to audit the estimates (`replay --exact`).
    pub fn new(counting: Counting, exact: bool) -> Self {
        AppMonthAggregate {
            mau: UniqueUsers::new(counting),
            dau: BTreeMap::new(),
            pcc: PccTimeline::new(),
            group_count_peak: 0,
            unpaired: PccTimeline::new(),
            exact: exact.then(Box::default),
            unsaved: Unsaved { any: true, days: 0 },
        }
    }

    /// A successful login of `user` on `day`.
    #[inline]
    pub fn record_login(&mut self, day: Day, user: UserKey) {
        let counting = self.mau.counting();
        let d = day.number() as u8;
        // Every day's users are among the month's: a user its day's count already held is
        // in the MAU too (most logins repeat one of the same day, and that count is small).
        if self.dau.entry(d).or_insert_with(|| UniqueUsers::new(counting)).insert(user) {
            self.mau.insert(user);
        }
        self.unsaved.any = true;
        self.unsaved.days |= 1 << d;
        if let Some(exact) = self.exact.as_deref_mut() {
            exact.mau.insert(user.0);
            exact.dau.entry(d).or_default().insert(user.0);
        }
    }

    /// The MAU while it is still counted exactly (up to the exact limit).
    pub fn exact_mau(&self) -> Option<usize> {
        self.mau.exact_len()
    }

    /// A `group_stats` sample.
    pub fn record_group_count(&mut self, group_count: u64) {
        self.group_count_peak = self.group_count_peak.max(group_count);
        self.unsaved.any = true;
    }

    /// The HLL++ precision its sketches were made at.
    pub fn precision(&self) -> Precision {
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
    fn take_unsaved_days(&mut self) -> Vec<u8> {
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

    /// The disconnects without a connect in this share (see [`merge_shares`]).
    pub fn unpaired_mut(&mut self) -> &mut PccTimeline {
        &mut self.unpaired
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
        self.unpaired.merge(&other.unpaired);
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
            mau_counted: self.mau.counted(),
            dau_peak: self.dau.values_mut().map(UniqueUsers::estimate).max().unwrap_or(0),
            // The peak is exact only if every day is: an estimated day might be the busiest.
            dau_peak_counted: self.dau.values().map(UniqueUsers::counted).fold(Counted::Exact, Counted::and),
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

    /// Encodes the aggregate (flushing the counts first, so equal aggregates give equal
    /// bytes).
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

    /// The count `count` names, if the aggregate has it.
    fn count_mut(&mut self, count: UserCount) -> Option<&mut UniqueUsers> {
        match count {
            UserCount::Mau => Some(&mut self.mau),
            UserCount::Dau(day) => self.dau.get_mut(&day),
        }
    }

    /// The changelog records of what changed since the last checkpoint, as the worker
    /// writes them ([`StateKey`]): the aggregate without its DAU counts and without the
    /// users of its exact counts (`m/…`); for each day whose DAU changed, an aggregate
    /// holding only that day's count, again without exact users (`d/…`); and the users added
    /// to each exact count since, as segments of it (`e/…`, [`UserSet::checkpoint`]). Why:
    /// a commit then writes the days that changed (usually one) instead of every day, and
    /// the users that are new instead of every user. [`AppMonthAggregate::from_parts`]
    /// reads them back.
    pub fn checkpoint(&mut self, app_id: AppId, month: Month) -> Vec<StateRecord> {
        let days = self.take_unsaved_days();
        let mut users: Vec<(UserCount, SegmentWrites)> = Vec::new();
        for count in std::iter::once(UserCount::Mau).chain(days.iter().map(|&d| UserCount::Dau(d))) {
            if let Some(unique) = self.count_mut(count) {
                let mut writes = SegmentWrites::new();
                unique.checkpoint(&mut writes);
                users.push((count, writes));
            }
        }
        // The counts themselves, their exact users taken out meanwhile.
        let mau_users = self.mau.take_users();
        let mut dau = std::mem::take(&mut self.dau);
        let mut records =
            vec![StateRecord { key: StateKey::AppMonth { app_id, month }, value: Some(self.encode()) }];
        let mut part = AppMonthAggregate::new(self.mau.counting(), false);
        for day in days {
            let Some(mut count) = dau.remove(&day) else { continue };
            let taken = count.take_users();
            part.dau.insert(day, count);
            records.push(StateRecord {
                key: StateKey::AppMonthDay { app_id, month, day },
                value: Some(part.encode()),
            });
            if let Some(mut count) = part.dau.remove(&day) {
                count.put_users(taken);
                dau.insert(day, count);
            }
        }
        self.dau = dau;
        self.mau.put_users(mau_users);
        for (count, writes) in users {
            records.extend(writes.into_iter().map(|(segment, value)| StateRecord {
                key: StateKey::Users { app_id, month, count, segment },
                value,
            }));
        }
        records
    }

    /// The deletions of every record [`AppMonthAggregate::checkpoint`] wrote for it: what a
    /// checkpoint writes when the app-month leaves the state.
    pub fn deletions(&self, app_id: AppId, month: Month) -> Vec<StateRecord> {
        let mut records = vec![StateRecord { key: StateKey::AppMonth { app_id, month }, value: None }];
        let counts = std::iter::once((UserCount::Mau, &self.mau))
            .chain(self.dau.iter().map(|(&day, count)| (UserCount::Dau(day), count)));
        for (count, unique) in counts {
            if let UserCount::Dau(day) = count {
                records.push(StateRecord { key: StateKey::AppMonthDay { app_id, month, day }, value: None });
            }
            records.extend(unique.segments().into_iter().map(|segment| StateRecord {
                key: StateKey::Users { app_id, month, count, segment },
                value: None,
            }));
        }
        records
    }

    /// Rebuilds an app-month from its checkpoint records ([`AppMonthAggregate::checkpoint`]):
    /// the month's, its days', and its counts' user segments.
    pub fn from_parts<'a>(
        month: &[u8],
        days: impl IntoIterator<Item = &'a [u8]>,
        users: impl IntoIterator<Item = (UserCount, u64, &'a [u8])>,
    ) -> Result<Self, CodecError> {
        let mut aggregate = Self::decode(month)?;
        for day in days {
            aggregate.merge(&Self::decode(day)?).map_err(|e| CodecError::Corrupt(e.to_string()))?;
        }
        let mut by_count: BTreeMap<UserCount, Vec<(u64, &[u8])>> = BTreeMap::new();
        for (count, segment, bytes) in users {
            by_count.entry(count).or_default().push((segment, bytes));
        }
        for (count, segments) in by_count {
            let unique = aggregate.count_mut(count).ok_or_else(|| {
                CodecError::Corrupt(format!("user segments of {count:?} without their count"))
            })?;
            unique.restore_segments(segments)?;
        }
        Ok(aggregate)
    }

    /// Decodes an encoded aggregate, checking magic, version and checksum.
    pub fn decode(bytes: &[u8]) -> Result<Self, CodecError> {
        if bytes.len() < HEADER_LEN || &bytes[..4] != MAGIC {
            return Err(CodecError::NotAnAggregate);
        }
        let version = bytes[4];
        if !(1..=FORMAT_VERSION).contains(&version) {
            return Err(CodecError::UnknownVersion(version));
        }
        let (checksum, payload) = bytes[5..].split_at(8);
        let expected = u64::from_le_bytes(checksum.try_into().map_err(|_| CodecError::NotAnAggregate)?);
        if xxhash_rust::xxh3::xxh3_64(payload) != expected {
            return Err(CodecError::Corrupt("checksum mismatch".into()));
        }
        let corrupt = |e: postcard::Error| CodecError::Corrupt(e.to_string());
        match version {
            FORMAT_VERSION => postcard::from_bytes(payload).map_err(corrupt),
            2 => postcard::from_bytes::<AggregateV2>(payload).map_err(corrupt).map(AggregateV2::upgrade),
            _ => postcard::from_bytes::<AggregateV1>(payload).map_err(corrupt).map(AggregateV1::upgrade),
        }
    }
}

/// The layout of format 2: counts exact up to 512 users, as sorted lists.
#[derive(Deserialize)]
struct AggregateV2 {
    mau: UniqueUsersV2,
    dau: BTreeMap<u8, UniqueUsersV2>,
    pcc: PccTimeline,
    group_count_peak: u64,
    unpaired: PccTimeline,
}

impl AggregateV2 {
    fn upgrade(self) -> AppMonthAggregate {
        let AggregateV2 { mau, dau, pcc, group_count_peak, unpaired } = self;
        AppMonthAggregate {
            mau: mau.upgrade(),
            dau: dau.into_iter().map(|(d, users)| (d, users.upgrade())).collect(),
            pcc,
            group_count_peak,
            unpaired,
            exact: None,
            unsaved: Unsaved::default(),
        }
    }
}

/// The layout of format 1, before shares kept their unpaired disconnects.
#[derive(Deserialize)]
struct AggregateV1 {
    mau: UniqueUsersV2,
    dau: BTreeMap<u8, UniqueUsersV2>,
    pcc: PccTimeline,
    group_count_peak: u64,
}

impl AggregateV1 {
    fn upgrade(self) -> AppMonthAggregate {
        let AggregateV1 { mau, dau, pcc, group_count_peak } = self;
        AggregateV2 { mau, dau, pcc, group_count_peak, unpaired: PccTimeline::new() }.upgrade()
    }
}

/// Merges the shares of one app-month written by different source partitions, and pairs
/// disconnects across them: a disconnect in one share whose connect is in another (the app
/// moved partition when the events topic grew, or its producers do not key by app) ends,
/// at its time, the connection the other share counted open through the month's end. With
/// one share there is nothing to pair (a disconnect without its connect counts nothing).
pub fn merge_shares<'a>(
    precision: Precision,
    shares: impl IntoIterator<Item = &'a AppMonthAggregate>,
) -> Result<AppMonthAggregate, PrecisionMismatch> {
    let mut shares = shares.into_iter();
    // The first share as it is (a copy, not a merge into an empty aggregate).
    let mut merged = match shares.next() {
        Some(first) if first.precision() == precision => {
            AppMonthAggregate { exact: None, unsaved: Unsaved::default(), ..first.clone() }
        }
        Some(first) => return Err(PrecisionMismatch(precision.get(), first.precision().get())),
        None => return Ok(AppMonthAggregate::new(Counting::merging(precision), false)),
    };
    let mut count = 1;
    for share in shares {
        merged.merge(share)?;
        count += 1;
    }
    if count > 1 {
        let unpaired = std::mem::take(&mut merged.unpaired);
        merged.pcc.subtract(&unpaired);
    }
    Ok(merged)
}

const MAGIC: &[u8; 4] = b"IMAM";
/// Version 3: postcard of `AppMonthAggregate`: exact counts as `UserSet` bytes up to their
/// stored limit, hyperloglogplus 0.4.1 sketches beyond. Still read: version 2 (exact as a
/// sorted list up to 512 users) and 1 (also without unpaired disconnects).
const FORMAT_VERSION: u8 = 3;
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
    use crate::aggregate::ExactLimit;

    /// An aggregate exercising every part of the format: 3,000 users over three days and one
    /// on a fourth (exact counts by default; under format 2's limit of 512, a sketch past
    /// it, sparse days and an exact day), a PCC timeline and a group peak.
    fn golden_aggregate(counting: Counting) -> AppMonthAggregate {
        let month: Month = "2026-11".parse().unwrap();
        let mut agg = AppMonthAggregate::new(counting, false);
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
        let mut exact = golden_aggregate(Counting::default());
        let mut sketched = golden_aggregate(format_2_counting());
        let pins =
            [exact.encode(), sketched.encode()].map(|b| (b[4], b.len(), xxhash_rust::xxh3::xxh3_64(&b)));
        assert_eq!(
            pins,
            [(3, 41_491, 0xf1ad_c741_68f2_2b26), (3, 15_932, 0x75b3_1fd8_b962_e155)],
            "format changed: bump FORMAT_VERSION and keep a decoder for version 3"
        );
        let month = "2026-11".parse().unwrap();
        let grid = crate::aggregate::SampleGrid::new(std::time::Duration::from_secs(60)).unwrap();
        let usage = exact.usage(1, month, grid);
        assert_eq!(
            (usage.mau, usage.mau_counted, usage.dau_peak, usage.dau_peak_counted),
            (3_001, Counted::Exact, 1_000, Counted::Exact)
        );
        let usage = sketched.usage(1, month, grid);
        let estimated = Counted::Estimated(Precision::default());
        assert_eq!((usage.mau_counted, usage.dau_peak_counted), (estimated, estimated));
    }

    fn format_2_counting() -> Counting {
        Counting { exact_limit: super::super::unique::ExactLimit::FORMAT_2, ..Counting::default() }
    }

    /// `golden_aggregate(Counting::default())` as format 2 wrote it (exact up to 512 users).
    const VERSION_2: &[u8] = include_bytes!("testdata/aggregate_v2.bin");

    #[test]
    fn version_2_aggregates_are_still_read_with_their_limit() {
        let mut read = AppMonthAggregate::decode(VERSION_2).unwrap();
        assert_eq!(read.encode(), golden_aggregate(format_2_counting()).encode());
    }

    /// Bytes as format 1 wrote them: version 2's without the (empty) unpaired timeline,
    /// which postcard writes last, as one byte (its length, 0).
    fn as_version_1(v2: &[u8]) -> Vec<u8> {
        let payload = &v2[HEADER_LEN..v2.len() - 1];
        let mut out = b"IMAM\x01".to_vec();
        out.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(payload).to_le_bytes());
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn version_1_aggregates_are_still_read() {
        assert_eq!(*VERSION_2.last().unwrap(), 0, "an empty unpaired timeline is the last byte");
        let mut read = AppMonthAggregate::decode(&as_version_1(VERSION_2)).unwrap();
        assert_eq!(read.encode(), golden_aggregate(format_2_counting()).encode());
    }

    /// One connection's connect in one share and its disconnect in another: merged, they
    /// count as that one connection; a share alone keeps its unpaired disconnect out.
    #[test]
    fn a_disconnect_pairs_with_a_connect_of_another_share() {
        let samples = MonthSamples { first: 1_000, end: 2_000 };
        let month: Month = "2026-11".parse().unwrap();
        let grid = crate::aggregate::SampleGrid::new(std::time::Duration::from_secs(60)).unwrap();
        let (mut opened, mut closed) = (
            AppMonthAggregate::new(Counting::default(), false),
            AppMonthAggregate::new(Counting::default(), false),
        );
        opened.pcc_mut().add_connection(samples, 1_100, None);
        opened.pcc_mut().add_connection(samples, 1_200, Some(1_300));
        closed.unpaired_mut().add_connection(samples, 1_250, None);
        closed.pcc_mut().add_connection(samples, 1_500, Some(1_600));
        let mut merged = merge_shares(Precision::default(), [&opened, &closed]).unwrap();
        let mut expected = AppMonthAggregate::new(Counting::default(), false);
        for (from, until) in [(1_100, 1_250), (1_200, 1_300), (1_500, 1_600)] {
            expected.pcc_mut().add_connection(samples, from, Some(until));
        }
        assert_eq!(merged.pcc(), expected.pcc());
        assert_eq!(merged.usage(1, month, grid).pcc, 2);
        // Alone, the disconnect's share counts only its own connection.
        let mut alone = merge_shares(Precision::default(), [&closed]).unwrap();
        assert_eq!(alone.usage(1, month, grid).pcc, 1);
    }

    /// A compacted changelog of one app-month's records: the latest value of each key.
    #[derive(Default)]
    struct Log(BTreeMap<StateKey, Vec<u8>>);

    impl Log {
        /// Applies a checkpoint's records; returns the bytes of the user segments written.
        fn commit(&mut self, records: Vec<StateRecord>) -> usize {
            let mut user_bytes = 0;
            for StateRecord { key, value } in records {
                match value {
                    Some(value) => {
                        user_bytes += if matches!(key, StateKey::Users { .. }) { value.len() } else { 0 };
                        self.0.insert(key, value);
                    }
                    None => {
                        self.0.remove(&key);
                    }
                }
            }
            user_bytes
        }

        fn rebuild(&self) -> AppMonthAggregate {
            let month = self.0.iter().find(|(k, _)| matches!(k, StateKey::AppMonth { .. })).unwrap().1;
            let days =
                self.0.iter().filter(|(k, _)| matches!(k, StateKey::AppMonthDay { .. })).map(|(_, v)| &v[..]);
            let users = self.0.iter().filter_map(|(k, v)| match k {
                StateKey::Users { count, segment, .. } => Some((*count, *segment, &v[..])),
                _ => None,
            });
            AppMonthAggregate::from_parts(month, days, users).unwrap()
        }
    }

    /// Checkpoints write the days that changed and the users added since the last one; the
    /// records read back give the aggregate whole, through the switch to a sketch too.
    #[test]
    fn checkpoints_write_what_changed_and_read_back_whole() {
        let month: Month = "2026-11".parse().unwrap();
        let counting = Counting { exact_limit: ExactLimit::new(5_000).unwrap(), ..Counting::default() };
        let mut agg = AppMonthAggregate::new(counting, false);
        let mut log = Log::default();
        let login = |agg: &mut AppMonthAggregate, day: u32, users: std::ops::Range<u32>| {
            for u in users {
                agg.record_login(month.day(day).unwrap(), UserKey::of(&format!("user-{u}")));
            }
        };
        login(&mut agg, 1, 0..3_000);
        login(&mut agg, 2, 0..1_000);
        let first = log.commit(agg.checkpoint(1, month));
        assert_eq!(log.rebuild().encode(), agg.encode());
        // Ten new users on day 2: the segments written hold them, not the 3,000 (twice: the
        // MAU's and the day's).
        login(&mut agg, 2, 3_000..3_010);
        let records = agg.checkpoint(1, month);
        assert!(
            !records.iter().any(|r| r.key == StateKey::AppMonthDay { app_id: 1, month, day: 1 }),
            "day 1 unchanged"
        );
        let second = log.commit(records);
        assert!(second < 2 * 10 * 9 + 64, "{second} bytes for 10 users (first: {first})");
        assert_eq!(log.rebuild().encode(), agg.encode());
        // Many checkpoints: merged, read back the same, and a bounded number of segments.
        for batch in 0..100 {
            login(&mut agg, 3, 3_010 + batch * 10..3_020 + batch * 10);
            log.commit(agg.checkpoint(1, month));
        }
        let segments = log.0.keys().filter(|k| matches!(k, StateKey::Users { .. })).count();
        assert!(segments <= 2 * 3 * 8, "{segments} segments");
        assert_eq!(log.rebuild().encode(), agg.encode());
        // Past the limit the MAU becomes a sketch: its segments go, the sketch is in `m/…`.
        login(&mut agg, 4, 4_000..6_000);
        log.commit(agg.checkpoint(1, month));
        assert!(!log.0.keys().any(|k| matches!(k, StateKey::Users { count: UserCount::Mau, .. })));
        let mut rebuilt = log.rebuild();
        assert_eq!(rebuilt.encode(), agg.encode());
        let grid = crate::aggregate::SampleGrid::new(std::time::Duration::from_secs(60)).unwrap();
        assert_eq!(rebuilt.usage(1, month, grid), agg.usage(1, month, grid));
        // Gone from the state: every record is deleted.
        log.commit(agg.deletions(1, month));
        assert!(log.0.is_empty(), "{:?}", log.0.keys().collect::<Vec<_>>());
    }

    #[test]
    fn damaged_or_foreign_bytes_are_refused() {
        let bytes = golden_aggregate(Counting::default()).encode();
        assert_eq!(AppMonthAggregate::decode(b"nope").unwrap_err(), CodecError::NotAnAggregate);
        let mut newer = bytes.clone();
        newer[4] = 4;
        assert_eq!(AppMonthAggregate::decode(&newer).unwrap_err(), CodecError::UnknownVersion(4));
        let mut flipped = bytes.clone();
        flipped[20] ^= 1;
        assert!(matches!(AppMonthAggregate::decode(&flipped), Err(CodecError::Corrupt(_))));
        assert!(AppMonthAggregate::decode(&bytes).is_ok());
    }
}
