//! The usage aggregate of one app in one billing month, and its versioned encoding.
//!
//! [`AppMonthAggregate`] holds the MAU and per-day DAU counts, the PCC timeline and the
//! group-count peak. While every day's users are under the exact limit its counts are one
//! table of the month's users with the days each logged in on ([`UserDays`]), the MAU a
//! sketch of its own beside it once the month's pass the limit; once a day passes it,
//! separate counts (each day an exact set up to the limit, a sketch beyond: [`UniqueUsers`]). Aggregates of disjoint event sets (e.g. two Kafka partitions)
//! merge into the aggregate of their union: set (or HLL) union, instant-wise sums, max. The
//! encoding is what a worker checkpoints and a month's share carries: a magic, a format
//! version and a checksum around a postcard payload of separate counts, canonical (equal
//! aggregates encode to equal bytes, whichever form held them).

use std::collections::BTreeMap;

use rustc_hash::FxHashSet;
use serde::{Deserialize, Serialize};

use super::checkpoint::{StateKey, StateRecord};
use super::codec::CodecError;
use super::handover::Handover;
use super::pcc::PccTimeline;
use super::segments::SegmentWrites;
use super::totals::UserTotals;
use super::unique::{Counted, Counting, MergeError, Precision, UniqueUsers, UniqueUsersV2};
use super::usage::MonthlyUsage;
use super::user_count::UserCount;
use super::user_days::UserDays;
use super::user_set::UserSet;
use crate::ingest::UserKey;
use crate::plan::AppId;
use crate::time::{Day, Month};

/// Usage of one app in one month, as mergeable partial state.
#[derive(Clone, Debug)]
pub struct AppMonthAggregate {
    users: Users,
    pcc: PccTimeline,
    group_count_peak: u64,
    /// What pairs with the app-month's other shares: disconnects whose connect this share
    /// never saw, and connections handed over by a partition where the app was silent
    /// ([`Handover`]; [`merge_shares`] pairs them).
    handover: Handover,
    /// Exact user sets, kept only when auditing the sketches (`replay --exact`).
    exact: Option<Box<ExactUsers>>,
    /// What changed since the meter last checkpointed it (never encoded).
    unsaved: Unsaved,
}

/// The unique users of an app-month: MAU and each day's DAU.
#[derive(Clone, Debug)]
enum Users {
    /// Every day exact: one table of the month's users and their days; the MAU exact too,
    /// or, past the limit, a sketch of its own. Why the table past the limit: each of its
    /// users logged in on at least one day, so at ~12.2 bytes per monthly user it costs at most
    /// 1.5 times the ~8.1 per user per day of sets of their own, and far less at a few days a
    /// user; and it is bounded as they are, by the days' limit (a day past it takes the table
    /// apart).
    Table { counting: Counting, users: UserDays, month_sketch: Option<Box<UniqueUsers>> },
    /// Separate counts, once a day passed the limit (or read so).
    Counts { mau: UniqueUsers, dau: BTreeMap<u8, UniqueUsers> },
}

impl Users {
    /// The table if every day is an exact set (and the MAU one or a sketch), else the counts
    /// as they are.
    fn from_counts(mut mau: UniqueUsers, mut dau: BTreeMap<u8, UniqueUsers>) -> Self {
        if !dau.values().all(UniqueUsers::holds_exact_set) {
            return Users::Counts { mau, dau };
        }
        let counting = mau.counting();
        let days = |dau: &mut BTreeMap<u8, UniqueUsers>| {
            dau.iter_mut().map(|(&d, count)| (d, count.take_users().unwrap_or_default())).collect()
        };
        if mau.holds_exact_set() {
            let mau_set = mau.take_users().unwrap_or_default();
            return Users::Table {
                counting,
                users: UserDays::from_sets(mau_set, days(&mut dau)),
                month_sketch: None,
            };
        }
        if mau.is_exact() {
            // Exact, yet with segments of a set to delete: not a form a checkpoint leaves.
            return Users::Counts { mau, dau };
        }
        // The MAU a sketch, the days exact: a table of the days' users.
        let mut users = UserDays::from_sets(UserSet::new(), days(&mut dau));
        users.sketch_month();
        Users::Table { counting, users, month_sketch: Some(Box::new(mau)) }
    }

    /// The month's users passed the exact limit: the MAU becomes a sketch of them, the
    /// table holds on to the days.
    fn pass_month_limit(&mut self) {
        if let Users::Table { counting, users, month_sketch: month_sketch @ None } = self {
            let retired = users.sketch_month();
            *month_sketch = Some(Box::new(UniqueUsers::sketch_of(*counting, users.users(), retired)));
        }
    }

    /// Separate counts, taking the table apart if it is one (its segments go with its sets).
    fn counts_mut(&mut self) -> (&mut UniqueUsers, &mut BTreeMap<u8, UniqueUsers>) {
        if let Users::Table { counting, users, month_sketch } = self {
            let sets = std::mem::take(users).into_sets();
            let (mau, dau) = counts_from(*counting, sets, month_sketch.take().map(|sketch| *sketch));
            *self = Users::Counts { mau, dau };
        }
        match self {
            Users::Counts { mau, dau } => (mau, dau),
            Users::Table { .. } => unreachable!("the table was taken apart just above"),
        }
    }

    /// How its counts count.
    fn counting(&self) -> Counting {
        match self {
            Users::Table { counting, .. } => *counting,
            Users::Counts { mau, .. } => mau.counting(),
        }
    }
}

/// A table's counts as separate counts (a copy; not checkpointed).
fn counts_of(
    counting: Counting,
    users: &UserDays,
    month_sketch: Option<&UniqueUsers>,
) -> (UniqueUsers, BTreeMap<u8, UniqueUsers>) {
    counts_from(counting, users.to_sets(), month_sketch.cloned())
}

/// Counts of a table's sets: the MAU its sketch if it has one (past the limit), else its set.
fn counts_from(
    counting: Counting,
    (mau, days): (UserSet, BTreeMap<u8, UserSet>),
    month_sketch: Option<UniqueUsers>,
) -> (UniqueUsers, BTreeMap<u8, UniqueUsers>) {
    let dau = days.into_iter().map(|(d, users)| (d, UniqueUsers::from_set(counting, users))).collect();
    (month_sketch.unwrap_or_else(|| UniqueUsers::from_set(counting, mau)), dau)
}

/// The encoded layout (format 4), borrowed to write.
#[derive(Serialize)]
struct WireRef<'a> {
    mau: &'a UniqueUsers,
    dau: &'a BTreeMap<u8, UniqueUsers>,
    pcc: &'a PccTimeline,
    group_count_peak: u64,
    handover: &'a Handover,
}

/// The encoded layout (format 4), read.
#[derive(Deserialize)]
struct Wire {
    mau: UniqueUsers,
    dau: BTreeMap<u8, UniqueUsers>,
    pcc: PccTimeline,
    group_count_peak: u64,
    handover: Handover,
}

impl Wire {
    /// Adds `other`'s usage, count by count (reading an app-month's parts).
    fn merge(&mut self, other: Wire) -> Result<(), MergeError> {
        merge_counts((&mut self.mau, &mut self.dau), (&other.mau, &other.dau))?;
        self.pcc.merge(&other.pcc);
        self.handover.merge(&other.handover);
        self.group_count_peak = self.group_count_peak.max(other.group_count_peak);
        Ok(())
    }

    fn into_aggregate(self) -> AppMonthAggregate {
        let Wire { mau, dau, pcc, group_count_peak, handover } = self;
        AppMonthAggregate {
            users: Users::from_counts(mau, dau),
            pcc,
            group_count_peak,
            handover,
            exact: None,
            unsaved: Unsaved::default(),
        }
    }
}

/// Merges separate counts into `mau` and `dau`. Every day then counts exactly up to the
/// month's limit (the smallest any share had) and at the month's precision (the lowest): a
/// day's limit and precision are its month's, as in the table, so that shares counted at
/// different settings (changed mid-month) merge into the same state in any order, whether
/// their days were a table or counts of their own.
fn merge_counts(
    (mau, dau): (&mut UniqueUsers, &mut BTreeMap<u8, UniqueUsers>),
    (their_mau, their_dau): (&UniqueUsers, &BTreeMap<u8, UniqueUsers>),
) -> Result<(), MergeError> {
    mau.merge(their_mau)?;
    for (&d, count) in their_dau {
        match dau.get_mut(&d) {
            Some(mine) => mine.merge(count)?,
            None => {
                dau.insert(d, count.clone());
            }
        }
    }
    let Counting { precision, exact_limit } = mau.counting();
    for day in dau.values_mut() {
        day.precision_to(precision)?;
        day.limit_to(exact_limit);
    }
    Ok(())
}

/// The bytes of an encoded aggregate: header and checksum around the postcard payload.
fn encode_wire(wire: WireRef<'_>) -> Vec<u8> {
    let payload = postcard::to_allocvec(&wire).expect("in-memory aggregates always serialize");
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(MAGIC);
    out.push(FORMAT_VERSION);
    out.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    out
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
    /// An empty aggregate counting users as `counting` says; `exact` also keeps exact user
    /// sets whatever the limit, to audit the estimates (`replay --exact`).
    pub fn new(counting: Counting, exact: bool) -> Self {
        AppMonthAggregate {
            users: Users::Table { counting, users: UserDays::default(), month_sketch: None },
            pcc: PccTimeline::new(),
            group_count_peak: 0,
            handover: Handover::default(),
            exact: exact.then(Box::default),
            unsaved: Unsaved { any: true, days: 0 },
        }
    }

    /// A successful login of `user` on `day`.
    #[inline]
    pub fn record_login(&mut self, day: Day, user: UserKey) {
        let d = day.number() as u8;
        match &mut self.users {
            Users::Table { counting, users, month_sketch } => {
                let new = users.insert(user.0, d);
                let limit = counting.exact_limit.get();
                match month_sketch {
                    None if new && users.len() as u64 > limit => {
                        // The same login may take its day past the limit too: then each
                        // day a count of its own, as when the month had passed it before.
                        let day_past = users.day_len(d) > limit;
                        self.users.pass_month_limit();
                        if day_past {
                            self.users.counts_mut();
                        }
                    }
                    Some(sketch) => {
                        if new {
                            sketch.insert(user);
                        }
                        // A day past the limit too: each day a count of its own.
                        if users.day_len(d) > limit {
                            self.users.counts_mut();
                        }
                    }
                    None => {}
                }
            }
            Users::Counts { mau, dau } => {
                let counting = mau.counting();
                // Every day's users are among the month's: a user its day's count already
                // held is in the MAU too (most logins repeat one of the same day, and that
                // count is small).
                if dau.entry(d).or_insert_with(|| UniqueUsers::new(counting)).insert(user) {
                    mau.insert(user);
                }
            }
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
        match &self.users {
            Users::Table { users, month_sketch: None, .. } => Some(users.len()),
            Users::Table { .. } => None,
            Users::Counts { mau, .. } => mau.exact_len(),
        }
    }

    /// The first day of the month by whose end more than `n` users had logged in (each
    /// user counted from its first login's day), for `n` below the exact limit; `None` if
    /// the month has `n` users or fewer. A function of the set of logins, whatever their
    /// order: it dates a quota crossing.
    pub fn day_passing(&self, n: u64) -> Option<u8> {
        match &self.users {
            Users::Table { users, .. } => users.day_passing(n),
            Users::Counts { dau, .. } => {
                let mut so_far = UserSet::new();
                for (&day, count) in dau {
                    match count.exact_users() {
                        Some(users) => so_far.union(users),
                        // A day counted by a sketch holds more users than the limit, so more
                        // than `n`.
                        None => return Some(day),
                    }
                    if so_far.len() as u64 > n {
                        return Some(day);
                    }
                }
                None
            }
        }
    }

    /// A `group_stats` sample.
    pub fn record_group_count(&mut self, group_count: u64) {
        self.group_count_peak = self.group_count_peak.max(group_count);
        self.unsaved.any = true;
    }

    /// The HLL++ precision its counts are sketches at, or become sketches at past the limit:
    /// the one configured when the app-month was begun (kept, as the limit is), or the lowest
    /// of the shares merged into it.
    pub fn precision(&self) -> Precision {
        self.users.counting().precision
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

    /// What this share hands over to pair with the app-month's others (see [`merge_shares`]).
    pub fn handover_mut(&mut self) -> &mut Handover {
        &mut self.handover
    }

    /// What this share hands over; after [`merge_shares`], what the next month needs
    /// ([`Handover::carry`]).
    pub fn handover(&self) -> &Handover {
        &self.handover
    }

    /// Whether no events of the app-month are in it: it only hands connections over
    /// ([`Handover::silent`]).
    pub fn is_silent(&self) -> bool {
        self.handover.is_silent()
    }

    /// An app-month share without usage that hands `handover` over (a carried one).
    pub fn handing_over(handover: Handover) -> Self {
        AppMonthAggregate { handover, ..AppMonthAggregate::new(Counting::merging(), false) }
    }

    /// Adds the usage of `other`, an aggregate of other events of the same app-month.
    /// Counts at different precisions merge at the lower ([`UniqueUsers::merge`]); it fails
    /// only on a sketch that does not read as the pinned HLL++ crate writes it.
    pub fn merge(&mut self, other: &AppMonthAggregate) -> Result<(), MergeError> {
        match (&mut self.users, &other.users) {
            (
                Users::Table { counting, users, month_sketch: None },
                Users::Table { counting: their_counting, users: theirs, month_sketch: None },
            ) => {
                // The smaller limit and the lower precision, as separate counts merge theirs;
                // past the limit, the form a login would have left (the MAU a sketch; a day
                // past it, counts of their own).
                counting.exact_limit = counting.exact_limit.min(their_counting.exact_limit);
                counting.precision = counting.precision.min(their_counting.precision);
                users.union(theirs);
                let limit = counting.exact_limit.get();
                let (month_past, day_past) = (users.len() as u64 > limit, users.peak_day() > limit);
                if month_past {
                    self.users.pass_month_limit();
                }
                if day_past {
                    self.users.counts_mut();
                }
            }
            (_, theirs) => {
                let copied;
                let (their_mau, their_dau) = match theirs {
                    Users::Counts { mau, dau } => (mau, dau),
                    Users::Table { counting, users, month_sketch } => {
                        copied = counts_of(*counting, users, month_sketch.as_deref());
                        (&copied.0, &copied.1)
                    }
                };
                merge_counts(self.users.counts_mut(), (their_mau, their_dau))?;
            }
        }
        self.pcc.merge(&other.pcc);
        self.handover.merge(&other.handover);
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
        // A sketch counts a set known to have passed the exact limit: it bills at least
        // limit + 1, whatever its estimate says (just past the limit it can read below it).
        let billed = |count: &mut UniqueUsers| match count.counted() {
            Counted::Exact => count.estimate(),
            Counted::Estimated(_) => count.estimate().max(count.counting().exact_limit.get() + 1),
        };
        let (mau, mau_counted, dau_peak, dau_peak_counted) = match &mut self.users {
            Users::Table { users, month_sketch: None, .. } => {
                (users.len() as u64, Counted::Exact, users.peak_day(), Counted::Exact)
            }
            Users::Table { users, month_sketch: Some(sketch), .. } => {
                (billed(sketch), sketch.counted(), users.peak_day(), Counted::Exact)
            }
            Users::Counts { mau, dau } => (
                billed(mau),
                mau.counted(),
                dau.values_mut().map(billed).max().unwrap_or(0),
                // The peak is exact only if every day is: an estimated day might be the busiest.
                dau.values().map(UniqueUsers::counted).fold(Counted::Exact, Counted::and),
            ),
        };
        // A day's users are some of the month's: no estimate may say otherwise.
        let dau_peak = dau_peak.min(mau);
        MonthlyUsage {
            app_id,
            month,
            mau,
            mau_counted,
            dau_peak,
            dau_peak_counted,
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

    /// Encodes the aggregate as separate counts (flushing them first, so equal aggregates
    /// give equal bytes).
    pub fn encode(&mut self) -> Vec<u8> {
        let (pcc, group_count_peak, handover) = (&self.pcc, self.group_count_peak, &self.handover);
        match &mut self.users {
            Users::Table { counting, users, month_sketch } => {
                if let Some(sketch) = month_sketch.as_deref_mut() {
                    sketch.flush();
                }
                let (mau, dau) = counts_of(*counting, users, month_sketch.as_deref());
                encode_wire(WireRef { mau: &mau, dau: &dau, pcc, group_count_peak, handover })
            }
            Users::Counts { mau, dau } => {
                mau.flush();
                dau.values_mut().for_each(UniqueUsers::flush);
                encode_wire(WireRef { mau, dau, pcc, group_count_peak, handover })
            }
        }
    }

    /// The days of the month with at least one login, ascending.
    pub fn days(&self) -> Vec<u8> {
        match &self.users {
            Users::Table { users, .. } => users.days().collect(),
            Users::Counts { dau, .. } => dau.keys().copied().collect(),
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
    ///
    /// When any segment is written or deleted, the counts' segment totals are written too
    /// (`e/…/totals`, [`UserTotals`]), after the segments written and before the deletions
    /// of those merged away, so that a restore can tell whether it read every segment, and
    /// one stopping inside the commit finds more than the totals it saw say, never fewer.
    ///
    /// [`UserSet::checkpoint`]: super::user_set::UserSet::checkpoint
    pub fn checkpoint(&mut self, app_id: AppId, month: Month) -> Vec<StateRecord> {
        let days = self.take_unsaved_days();
        let counting = self.users.counting();
        let (pcc, group_count_peak, handover) = (&self.pcc, self.group_count_peak, &self.handover);
        let mut users: Vec<(UserCount, SegmentWrites)> = Vec::new();
        // A count without its users, as `m/` and `d/` carry exact ones.
        let empty = UniqueUsers::new(counting);
        let (no_days, no_pcc, no_handover) = (BTreeMap::new(), PccTimeline::new(), Handover::default());
        let day_record = |day: u8, count: &UniqueUsers| {
            let dau = BTreeMap::from([(day, count.clone())]);
            let wire =
                WireRef { mau: &empty, dau: &dau, pcc: &no_pcc, group_count_peak: 0, handover: &no_handover };
            StateRecord { key: StateKey::AppMonthDay { app_id, month, day }, value: Some(encode_wire(wire)) }
        };
        let mut records = Vec::with_capacity(1 + days.len());
        match &mut self.users {
            Users::Table { users: table, month_sketch, .. } => {
                table.checkpoint(&mut users);
                // Past the limit the MAU is its sketch (which deletes the segments of the set
                // it was); under it, the table's users are in the segments.
                let mau = match month_sketch.as_deref_mut() {
                    Some(sketch) => {
                        let mut writes = SegmentWrites::new();
                        sketch.checkpoint(&mut writes);
                        users.push((UserCount::Mau, writes));
                        sketch.flush();
                        &*sketch
                    }
                    None => &empty,
                };
                let wire = WireRef { mau, dau: &no_days, pcc, group_count_peak, handover };
                records.push(StateRecord {
                    key: StateKey::AppMonth { app_id, month },
                    value: Some(encode_wire(wire)),
                });
                records.extend(
                    days.into_iter().filter(|&d| table.day_len(d) > 0).map(|d| day_record(d, &empty)),
                );
            }
            Users::Counts { mau, dau } => {
                for count in std::iter::once(UserCount::Mau).chain(days.iter().map(|&d| UserCount::Dau(d))) {
                    let unique = match count {
                        UserCount::Mau => Some(&mut *mau),
                        UserCount::Dau(day) => dau.get_mut(&day),
                    };
                    if let Some(unique) = unique {
                        let mut writes = SegmentWrites::new();
                        unique.checkpoint(&mut writes);
                        users.push((count, writes));
                    }
                }
                // The counts themselves, their exact users taken out meanwhile.
                mau.flush();
                let mau_users = mau.take_users();
                let wire = WireRef { mau, dau: &no_days, pcc, group_count_peak, handover };
                records.push(StateRecord {
                    key: StateKey::AppMonth { app_id, month },
                    value: Some(encode_wire(wire)),
                });
                mau.put_users(mau_users);
                for day in days {
                    let Some(count) = dau.get_mut(&day) else { continue };
                    count.flush();
                    let taken = count.take_users();
                    records.push(day_record(day, count));
                    count.put_users(taken);
                }
            }
        }
        // Segments written, then the totals, then the deletions (see above).
        let mut deletions = Vec::new();
        for (count, writes) in users {
            for (segment, value) in writes {
                let record = StateRecord { key: StateKey::Users { app_id, month, count, segment }, value };
                match record.value {
                    Some(_) => records.push(record),
                    None => deletions.push(record),
                }
            }
        }
        // A segment is never written and deleted in one checkpoint (new ones take new
        // numbers), so the order changes no key's latest value.
        debug_assert!(deletions.iter().all(|d| records.iter().all(|r| r.key != d.key)));
        if !deletions.is_empty() || records.iter().any(|r| matches!(r.key, StateKey::Users { .. })) {
            let totals = self.segment_totals();
            let value = (!totals.0.is_empty()).then(|| totals.encode());
            records.push(StateRecord { key: StateKey::UserTotals { app_id, month }, value });
        }
        records.append(&mut deletions);
        records
    }

    /// Each exact count's segments and the users they hold.
    fn segment_totals(&self) -> UserTotals {
        let totals = match &self.users {
            // A sketch of the month has no segments.
            Users::Table { users, .. } => users.segment_totals().collect(),
            Users::Counts { mau, dau } => std::iter::once((UserCount::Mau, mau))
                .chain(dau.iter().map(|(&day, count)| (UserCount::Dau(day), count)))
                .filter_map(|(count, unique)| Some((count, unique.segment_total()?)))
                .collect(),
        };
        UserTotals(totals)
    }

    /// The deletions of every record [`AppMonthAggregate::checkpoint`] wrote for it: what a
    /// checkpoint writes when the app-month leaves the state.
    pub fn deletions(&self, app_id: AppId, month: Month) -> Vec<StateRecord> {
        // The totals first: a reader stopping inside the commit checks no segments gone.
        // The app-month's own record last: a reader stopping inside the commit finds parts
        // with their app-month (a restore that is behind, read again), never parts without.
        let mut records = vec![StateRecord { key: StateKey::UserTotals { app_id, month }, value: None }];
        records.extend(
            self.days()
                .into_iter()
                .map(|day| StateRecord { key: StateKey::AppMonthDay { app_id, month, day }, value: None }),
        );
        let segments: Vec<(UserCount, Vec<u64>)> = match &self.users {
            Users::Table { users, month_sketch, .. } => {
                let mut segments = users.segments();
                segments.extend(month_sketch.iter().map(|sketch| (UserCount::Mau, sketch.segments())));
                segments
            }
            Users::Counts { mau, dau } => std::iter::once((UserCount::Mau, mau.segments()))
                .chain(dau.iter().map(|(&day, count)| (UserCount::Dau(day), count.segments())))
                .collect(),
        };
        for (count, numbers) in segments {
            records.extend(numbers.into_iter().map(|segment| StateRecord {
                key: StateKey::Users { app_id, month, count, segment },
                value: None,
            }));
        }
        records.push(StateRecord { key: StateKey::AppMonth { app_id, month }, value: None });
        records
    }

    /// Rebuilds an app-month from its checkpoint records ([`AppMonthAggregate::checkpoint`]):
    /// the month's, its days', and its counts' user segments.
    pub fn from_parts<'a>(
        month: &[u8],
        days: impl IntoIterator<Item = &'a [u8]>,
        users: impl IntoIterator<Item = (UserCount, u64, &'a [u8])>,
    ) -> Result<Self, CodecError> {
        let mut wire = decode_wire(month)?;
        for day in days {
            wire.merge(decode_wire(day)?).map_err(|e| CodecError::Corrupt(e.to_string()))?;
        }
        let mut by_count: BTreeMap<UserCount, Vec<(u64, &[u8])>> = BTreeMap::new();
        for (count, segment, bytes) in users {
            by_count.entry(count).or_default().push((segment, bytes));
        }
        for (count, segments) in by_count {
            let unique = match count {
                UserCount::Mau => Some(&mut wire.mau),
                UserCount::Dau(day) => wire.dau.get_mut(&day),
            };
            let unique = unique.ok_or_else(|| {
                CodecError::Corrupt(format!("user segments of {count:?} without their count"))
            })?;
            unique.restore_segments(segments)?;
        }
        Ok(wire.into_aggregate())
    }

    /// Rebuilds an app-month from its month and day records and the users its segments hold
    /// ([`SegmentUsers`]: what a reader of the changelog keeps instead of the segments).
    pub fn from_written<'a>(
        month: &[u8],
        days: impl IntoIterator<Item = &'a [u8]>,
        users: &SegmentUsers,
    ) -> Result<Self, CodecError> {
        let mut wire = decode_wire(month)?;
        for day in days {
            wire.merge(decode_wire(day)?).map_err(|e| CodecError::Corrupt(e.to_string()))?;
        }
        let Wire { mut mau, mut dau, pcc, group_count_peak, handover } = wire;
        let users = if mau.holds_exact_set() && dau.values().all(UniqueUsers::holds_exact_set) {
            Users::Table { counting: mau.counting(), users: users.0.clone(), month_sketch: None }
        } else {
            // Each exact count takes its users from the segments' (a count that is a sketch
            // is whole in its record; users its deleted segments left behind are not its).
            let (mau_users, mut day_users) = users.0.to_sets();
            mau.put_users(Some(mau_users));
            for (day, count) in dau.iter_mut() {
                count.put_users(Some(day_users.remove(day).unwrap_or_default()));
            }
            Users::Counts { mau, dau }
        };
        Ok(AppMonthAggregate {
            users,
            pcc,
            group_count_peak,
            handover,
            exact: None,
            unsaved: Unsaved::default(),
        })
    }

    /// Decodes an encoded aggregate, checking magic, version and checksum.
    pub fn decode(bytes: &[u8]) -> Result<Self, CodecError> {
        decode_wire(bytes).map(Wire::into_aggregate)
    }
}

/// Every user the user segments of an app-month hold, with the counts holding them: what a
/// reader of the changelog (the usage API's view) keeps instead of the segments' bytes — one
/// table of about 12 bytes per monthly user, against ~6.5 bytes per counted entry (the
/// month's and each day's) as segments. Fed each segment written; deletions need not be
/// applied, because segments only ever add users to their count: a merge rewrites the union
/// of the segments it replaces, and a count that became a sketch is whole in its own record
/// ([`AppMonthAggregate::from_written`] takes no users for it).
#[derive(Clone, Debug, Default)]
pub struct SegmentUsers(UserDays);

impl SegmentUsers {
    /// Adds the users of a segment.
    pub fn add(&mut self, segment: &UserSegment) {
        segment.keys.iter().for_each(|&key| {
            self.0.add_days(key, segment.days);
        });
    }
}

/// The users of one user segment, read from the changelog's bytes: decoding is kept apart
/// from [`SegmentUsers::add`] so that a reader can do it outside its lock.
#[derive(Debug)]
pub struct UserSegment {
    /// The days its count is (none: the MAU's).
    days: u32,
    keys: Vec<u64>,
}

impl UserSegment {
    /// Reads a segment of `count`, as the changelog holds it.
    pub fn read(count: UserCount, bytes: &[u8]) -> Result<Self, CodecError> {
        let days = match count {
            UserCount::Mau => 0,
            UserCount::Dau(day @ 1..=31) => 1 << day,
            UserCount::Dau(day) => return Err(CodecError::Corrupt(format!("user segment of day {day}"))),
        };
        Ok(UserSegment { days, keys: super::user_set::decode_segment(bytes)? })
    }
}

/// Reads an encoded aggregate as separate counts.
fn decode_wire(bytes: &[u8]) -> Result<Wire, CodecError> {
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
        3 => postcard::from_bytes::<AggregateV3>(payload).map_err(corrupt).map(AggregateV3::upgrade),
        2 => postcard::from_bytes::<AggregateV2>(payload).map_err(corrupt).map(AggregateV2::upgrade),
        _ => postcard::from_bytes::<AggregateV1>(payload).map_err(corrupt).map(AggregateV1::upgrade),
    }
}

/// The layout of format 3: disconnects without their connect as a timeline, without their
/// connection keys, and no connections handed over.
#[derive(Deserialize)]
struct AggregateV3 {
    mau: UniqueUsers,
    dau: BTreeMap<u8, UniqueUsers>,
    pcc: PccTimeline,
    group_count_peak: u64,
    unpaired: PccTimeline,
}

impl AggregateV3 {
    fn upgrade(self) -> Wire {
        let AggregateV3 { mau, dau, pcc, group_count_peak, unpaired } = self;
        let handover = Handover::from_unpaired_timeline(&unpaired);
        Wire { mau, dau, pcc, group_count_peak, handover }
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
    fn upgrade(self) -> Wire {
        let AggregateV2 { mau, dau, pcc, group_count_peak, unpaired } = self;
        AggregateV3 {
            mau: mau.upgrade(),
            dau: dau.into_iter().map(|(d, users)| (d, users.upgrade())).collect(),
            pcc,
            group_count_peak,
            unpaired,
        }
        .upgrade()
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
    fn upgrade(self) -> Wire {
        let AggregateV1 { mau, dau, pcc, group_count_peak } = self;
        AggregateV2 { mau, dau, pcc, group_count_peak, unpaired: PccTimeline::new() }.upgrade()
    }
}

/// Merges the shares of one app-month written by different source partitions, and pairs
/// connections across them ([`Handover::pair`]): a disconnect in one share whose connect is
/// in another (the app moved partition when the events topic grew, or its producers do not
/// key by app) ends, at its time, the connection the other share counted open through the
/// month's end, or the one handed over by a partition where the app was silent; with one
/// share with usage there is nothing to pair it with (it counts nothing). Connections
/// handed over count from the month's start. All shares silent: the app had no usage in
/// the month (the result [`AppMonthAggregate::is_silent`]), and what they hand over ends.
///
/// Shares counted at different HLL++ precisions (`metering.hll_precision` changed while the
/// month was open, and one partition began the app-month after the change) merge at the
/// lowest of them, exactly ([`UniqueUsers::merge`]).
pub fn merge_shares<'a>(
    shares: impl IntoIterator<Item = &'a AppMonthAggregate>,
) -> Result<AppMonthAggregate, MergeError> {
    let mut shares = shares.into_iter();
    // The first share as it is (a copy, not a merge into an empty aggregate).
    let mut merged = match shares.next() {
        Some(first) => AppMonthAggregate { exact: None, unsaved: Unsaved::default(), ..first.clone() },
        None => return Ok(AppMonthAggregate::new(Counting::merging(), false)),
    };
    let mut active = usize::from(!merged.is_silent());
    for share in shares {
        merged.merge(share)?;
        active += usize::from(!share.is_silent());
    }
    merged.handover.pair(&mut merged.pcc, active);
    Ok(merged)
}

const MAGIC: &[u8; 4] = b"IMAM";
/// Version 4: postcard of `AppMonthAggregate`: exact counts as `UserSet` bytes up to their
/// stored limit, hyperloglogplus 0.4.1 sketches beyond, and the [`Handover`]. Still read:
/// version 3 (unpaired disconnects as a timeline, without their keys), 2 (also exact as a
/// sorted list up to 512 users) and 1 (also without unpaired disconnects).
const FORMAT_VERSION: u8 = 4;
const HEADER_LEN: usize = 4 + 1 + 8;

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
            [(4, 41_494, 0x0744_f33d_3594_987a), (4, 15_935, 0x3421_7bbd_b764_9d42)],
            "format changed: bump FORMAT_VERSION and keep a decoder for version 4"
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

    /// One login that takes both its day and the month past the limit leaves the form the
    /// same as when the month passed it earlier: a day past the limit is a count of its own
    /// in either order (it stayed an exact set, labelled exact, when the crossings coincided).
    #[test]
    fn the_form_does_not_depend_on_which_login_passes_the_limit() {
        let counting = Counting {
            exact_limit: super::super::unique::ExactLimit::new(1_000).unwrap(),
            ..Counting::default()
        };
        let month: Month = "2026-11".parse().unwrap();
        let (d2, d3) = (month.day(2).unwrap(), month.day(3).unwrap());
        let mut logins: Vec<(Day, UserKey)> =
            (0..1_000).map(|u| (d2, UserKey::of(&format!("u-{u}")))).collect();
        logins.push((d2, UserKey::of("x")));
        let y = (d3, UserKey::of("y"));
        // y last: x takes day 2 and the month to 1,001 at once. y first: the month passes
        // the limit at day 2's 1,000th user, and x then takes day 2 past it.
        let orders = [[logins.clone(), vec![y]].concat(), [vec![y], logins].concat()];
        let [mut a, mut b] = orders.map(|order| {
            let mut agg = AppMonthAggregate::new(counting, false);
            for (day, user) in order {
                agg.record_login(day, user);
            }
            agg
        });
        let grid = crate::aggregate::SampleGrid::new(std::time::Duration::from_secs(60)).unwrap();
        assert_eq!(a.usage(1, month, grid), b.usage(1, month, grid));
        assert!(a.encode() == b.encode(), "the same users give the same bytes");
    }

    /// A count that passed the exact limit is known to be above it: its estimate never
    /// bills less than limit + 1 (at precision 10 an estimate is off by about 3 %, so just
    /// past the limit it can read below it), and no day's peak exceeds the month's MAU.
    #[test]
    fn an_estimate_never_bills_below_the_limit_it_passed_nor_a_day_above_the_month() {
        let limit = super::super::unique::ExactLimit::new(5_000).unwrap();
        let counting = Counting { precision: Precision::new(10).unwrap(), exact_limit: limit };
        let month: Month = "2026-11".parse().unwrap();
        let grid = crate::aggregate::SampleGrid::new(std::time::Duration::from_secs(60)).unwrap();
        // Users named w-0, w-1, ... (or z-...) are estimated below 5,001 (4,773-4,985: seen).
        for (users, prefix) in (5_001..5_400).step_by(37).flat_map(|n| ["u", "w", "z"].map(move |p| (n, p))) {
            // Every user on day 1 (the day passes the limit with the month), and the month
            // alone past it (one day short of it).
            for days in [1, 2] {
                let mut agg = AppMonthAggregate::new(counting, false);
                for u in 0..users {
                    let day = month.day(1 + u % days).unwrap();
                    agg.record_login(day, UserKey::of(&format!("{prefix}-{u}")));
                }
                let usage = agg.usage(1, month, grid);
                let what = format!("{users} users {prefix}-* over {days} day(s): {usage:?}");
                assert!(usage.mau > 5_000, "{what}");
                assert!(usage.dau_peak <= usage.mau, "{what}");
            }
        }
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
    fn version_3_aggregates_are_still_read_with_their_unpaired_disconnects() {
        let v4 = golden_aggregate(Counting::default()).encode();
        // Format 3's layout is format 4's with the unpaired timeline where the handover is
        // (postcard writes it last: an empty handover is 4 bytes).
        let as_version_3 = |unpaired: &PccTimeline| {
            let mut payload = v4[HEADER_LEN..v4.len() - 4].to_vec();
            payload.extend(postcard::to_allocvec(unpaired).unwrap());
            let mut out = b"IMAM\x03".to_vec();
            out.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(&payload).to_le_bytes());
            out.extend_from_slice(&payload);
            out
        };
        let v3 = as_version_3(&PccTimeline::new());
        assert_eq!(
            (v3.len(), xxhash_rust::xxh3::xxh3_64(&v3)),
            (41_491, 0xf1ad_c741_68f2_2b26),
            "format 3 as the pin of its time"
        );
        let mut read = AppMonthAggregate::decode(&v3).unwrap();
        assert_eq!(read.encode(), v4);
        let samples = MonthSamples { first: 29_866_560, end: 29_909_760 };
        let mut unpaired = PccTimeline::new();
        unpaired.add_connection(samples, 29_866_650, None);
        let read = AppMonthAggregate::decode(&as_version_3(&unpaired)).unwrap();
        // Its disconnect ends the connection open from 29,866,650 in another share.
        let mut other = AppMonthAggregate::new(Counting::default(), false);
        other.pcc_mut().add_connection(samples, 29_866_600, None);
        let merged = merge_shares([&read, &other]).unwrap();
        assert_eq!(merged.pcc().peak().0, 2, "golden's two connections, one of them ended");
        assert_eq!(merged.pcc().changes().last(), Some((29_866_700, -1)));
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
        closed.handover_mut().add_disconnects([(77, 1_250)]);
        closed.pcc_mut().add_connection(samples, 1_500, Some(1_600));
        let mut merged = merge_shares([&opened, &closed]).unwrap();
        let mut expected = AppMonthAggregate::new(Counting::default(), false);
        for (from, until) in [(1_100, 1_250), (1_200, 1_300), (1_500, 1_600)] {
            expected.pcc_mut().add_connection(samples, from, Some(until));
        }
        assert_eq!(merged.pcc(), expected.pcc());
        assert_eq!(merged.usage(1, month, grid).pcc, 2);
        // Alone, the disconnect's share counts only its own connection.
        let mut alone = merge_shares([&closed]).unwrap();
        assert_eq!(alone.usage(1, month, grid).pcc, 1);
    }

    /// A partition where the app was silent all month hands its open connections over: with
    /// a share with usage they count from the month's start (one of them until its
    /// disconnect there), and those still open are carried into the next month; without
    /// one, the app was silent everywhere and they end.
    #[test]
    fn connections_handed_over_count_only_where_the_app_has_usage() {
        let samples = MonthSamples { first: 1_000, end: 2_000 };
        let month: Month = "2026-11".parse().unwrap();
        let grid = crate::aggregate::SampleGrid::new(std::time::Duration::from_secs(60)).unwrap();
        let mut silent = AppMonthAggregate::new(Counting::default(), false);
        *silent.handover_mut() = Handover::silent([11, 12, 13], samples.first);
        let mut busy = AppMonthAggregate::new(Counting::default(), false);
        busy.pcc_mut().add_connection(samples, 1_100, Some(1_200));
        busy.handover_mut().add_disconnects([(12, 1_500)]);
        let mut merged = merge_shares([&silent, &busy]).unwrap();
        assert!(!merged.is_silent());
        let usage = merged.usage(1, month, grid);
        assert_eq!((usage.pcc, usage.pcc_at), (4, Some(grid.instant(1_100))));
        let mut expected = AppMonthAggregate::new(Counting::default(), false);
        for (from, until) in [(1_000, None), (1_000, None), (1_000, Some(1_500)), (1_100, Some(1_200))] {
            expected.pcc_mut().add_connection(samples, from, until);
        }
        assert_eq!(merged.pcc(), expected.pcc());
        let carried = merged.handover().carry(2_000).expect("two are still open");
        let mut next = merge_shares([&AppMonthAggregate::handing_over(carried)]).unwrap();
        assert!(next.is_silent(), "a carried share alone is no usage");
        let _ = next.usage(1, month.next(), grid);
        // Silent everywhere: nothing is counted.
        let alone = merge_shares([&silent]).unwrap();
        assert!(alone.is_silent());
    }

    /// Shares of one app-month counted at different precisions (the setting changed
    /// mid-month, and one partition began the app-month after it) merge, in any order, into
    /// the app-month counted at the lower precision: exact counts are sets, and a sketch at
    /// the finer precision folds exactly to the coarser.
    #[test]
    fn shares_at_different_precisions_merge_at_the_lower() {
        let month: Month = "2026-11".parse().unwrap();
        let counting = |p: i64| Counting {
            precision: Precision::new(p).unwrap(),
            exact_limit: ExactLimit::new(1_000).unwrap(),
        };
        let share = |p: i64, users: std::ops::Range<u32>| {
            let mut agg = AppMonthAggregate::new(counting(p), false);
            for u in users {
                // Day 1 past the limit (a sketch), days 2 and 3 exact.
                let day = if u % 50 == 0 { 2 + u % 2 } else { 1 };
                agg.record_login(month.day(day).unwrap(), UserKey::of(&format!("user-{u}")));
            }
            agg
        };
        let (at_14, at_16) = (share(14, 0..30_000), share(16, 20_000..60_000));
        let mut want = share(14, 0..60_000).encode();
        for (a, b) in [(&at_14, &at_16), (&at_16, &at_14)] {
            let mut merged = merge_shares([a, b]).expect("shares merge at any precision");
            assert_eq!(merged.precision(), Precision::new(14).unwrap());
            assert_eq!(merged.encode(), want);
        }
        // Exact shares (no sketch yet) merge whatever their precision.
        let (small_14, small_16) = (share(14, 0..300), share(16, 200..600));
        want = share(14, 0..600).encode();
        let mut merged = merge_shares([&small_16, &small_14]).expect("exact shares merge");
        assert_eq!(merged.encode(), want);
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

    /// Days past hold no keys of their own once a checkpoint leaves them alone (the table
    /// has their users); late logins trickling into one keep its segments bounded (a
    /// rewrite every few freezes), and every state reads back whole.
    #[test]
    fn past_days_drop_their_segment_keys_and_late_logins_stay_bounded() {
        let month: Month = "2026-11".parse().unwrap();
        let mut agg = AppMonthAggregate::new(Counting::default(), false);
        let mut log = Log::default();
        let login = |agg: &mut AppMonthAggregate, day: u32, u: u32| {
            agg.record_login(month.day(day).unwrap(), UserKey::of(&format!("user-{u}")))
        };
        let held = |agg: &AppMonthAggregate| match &agg.users {
            Users::Table { users, .. } => users.segment_keys_held(),
            Users::Counts { .. } => panic!("under the limit: a table"),
        };
        (0..3_000).for_each(|u| login(&mut agg, 1, u));
        (3_000..5_000).for_each(|u| login(&mut agg, 2, u));
        log.commit(agg.checkpoint(1, month));
        let (mau, day_1, day_2) = (5_000, 3_000, 2_000);
        assert_eq!(held(&agg), mau + day_1 + day_2, "small segments keep their keys");
        // Day 3 begins: days 1 and 2, untouched, drop theirs.
        login(&mut agg, 3, 0);
        log.commit(agg.checkpoint(1, month));
        assert_eq!(held(&agg), mau + 1);
        assert_eq!(log.rebuild().encode(), agg.encode());
        let day_1_segments = |log: &Log| {
            log.0.keys().filter(|k| matches!(k, StateKey::Users { count: UserCount::Dau(1), .. })).count()
        };
        let mut most = 0;
        for late in 0..40 {
            // A late login on day 1 (a user of day 2), then a commit without one.
            login(&mut agg, 1, 3_000 + late);
            log.commit(agg.checkpoint(1, month));
            login(&mut agg, 3, 1);
            log.commit(agg.checkpoint(1, month));
            most = most.max(day_1_segments(&log));
            assert_eq!(log.rebuild().encode(), agg.encode(), "after {late} late logins");
        }
        assert!(most <= 2 * super::super::user_days::FROZEN_REWRITE, "{most} segments of day 1");
        let grid = crate::aggregate::SampleGrid::new(std::time::Duration::from_secs(60)).unwrap();
        assert_eq!(agg.usage(1, month, grid).dau_peak, 3_040);
    }

    #[test]
    fn damaged_or_foreign_bytes_are_refused() {
        let bytes = golden_aggregate(Counting::default()).encode();
        assert_eq!(AppMonthAggregate::decode(b"nope").unwrap_err(), CodecError::NotAnAggregate);
        let mut newer = bytes.clone();
        newer[4] = 5;
        assert_eq!(AppMonthAggregate::decode(&newer).unwrap_err(), CodecError::UnknownVersion(5));
        let mut flipped = bytes.clone();
        flipped[20] ^= 1;
        assert!(matches!(AppMonthAggregate::decode(&flipped), Err(CodecError::Corrupt(_))));
        assert!(AppMonthAggregate::decode(&bytes).is_ok());
    }
}
