//! The meter: applies validated usage events to per app-month aggregates and closes months.
//!
//! One [`Meter`] owns the state of one slice of the input (all of it in `replay`, one
//! Kafka partition in the worker). It is synchronous and takes all time from the events:
//! its watermark is the largest event time it has seen. Closing a month counts the
//! connections still open into it and hands its aggregates out; events for a closed month
//! are refused as late.
//!
//! An open connection ends with the last month in which its app had usage in this slice:
//! when a month closes, the open connections of apps without usage in it (no event dated
//! in it, no connection known to be open throughout it) end at its start — counted through
//! the previous month, not in this one — and are dropped ([`Meter::close_month`]). So a
//! connection whose `disconnect` was lost neither counts nor stays in the state forever
//! once its app falls silent, even without an idle timeout.
//!
//! With an allowed lateness set (the worker), a month closes the moment the watermark
//! reaches its end plus the lateness — inside [`Meter::apply`] or
//! [`Meter::advance_watermark`], before the event that moved it is applied — so whether an
//! event is late depends only on the events before it, never on when the caller happens
//! to checkpoint. The slice then says it is *closed through* that month, whether or not it
//! held any data for it: a month's bill waits for every slice to say so, and a slice that
//! never saw an event says so all the same. Without a lateness (replay) months close only
//! when asked ([`Meter::close_month`]).

use std::collections::BTreeSet;
use std::time::Duration;

use rustc_hash::FxHashMap;

use super::app_month::AppMonthAggregate;
use super::checkpoint::{Progress, StateKey, StateRecord};
use super::codec::CodecError;
use super::connections::{ConnEffect, ConnRecord, ConnectionTable, Interval};
use super::handover::Handover;
use super::pcc::{MonthSamples, SampleGrid};
use super::segments::SegmentTotal;
use super::totals::{self, ConnectionTotals, UserTotals};
use super::unique::{Counting, ExactLimit, Precision};
use super::usage::MonthlyUsage;
use super::user_count::UserCount;
use crate::ingest::{Action, ConnKey, UsageEvent};
use crate::plan::AppId;
use crate::time::{BillingTz, Day, DayCache, Month, Timestamp};

/// How usage is measured.
#[derive(Clone, Debug)]
pub struct MeterSettings {
    /// The billing time zone: months and days are calendar periods in it.
    pub tz: BillingTz,
    /// HLL++ precision of the MAU and DAU sketches of app-months begun from now on: each
    /// count keeps the precision it was begun at, as it keeps its exact limit, so a change
    /// applies to the counts begun after it (a restored meter's open months keep theirs).
    pub precision: Precision,
    /// Distinct users a MAU or DAU count keeps exactly before it becomes a sketch.
    pub exact_limit: ExactLimit,
    /// The PCC sample instants.
    pub grid: SampleGrid,
    /// Open connections silent this long are closed at their last-seen time (`None`: off).
    pub idle_timeout: Option<Duration>,
    /// Also count users exactly, to audit the sketches (memory grows with users).
    pub exact: bool,
    /// Months close once the watermark passes their end plus this (`None`: only when
    /// asked, as in replay, whose input has no order).
    pub allowed_lateness: Option<Duration>,
    /// The most app-months one meter holds open at once (`None`: unbounded, as in replay):
    /// an event that would begin one more is refused ([`Outcome::TooManyApps`]), so that a
    /// producer bug putting user ids into `app_id` cannot exhaust memory nor make one bill
    /// too big.
    pub max_app_months: Option<usize>,
}

impl MeterSettings {
    /// How users are counted.
    pub fn counting(&self) -> Counting {
        Counting { precision: self.precision, exact_limit: self.exact_limit }
    }
}

impl Default for MeterSettings {
    fn default() -> Self {
        MeterSettings {
            tz: BillingTz::default(),
            precision: Precision::default(),
            exact_limit: ExactLimit::default(),
            grid: SampleGrid::new(Duration::from_secs(60)).expect("60 s divides an hour"),
            idle_timeout: None,
            exact: false,
            allowed_lateness: None,
            max_app_months: None,
        }
    }
}

/// What applying one event did.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The event was counted (or recorded for counting).
    Accepted,
    /// The event repeats one already counted and changed nothing.
    Duplicate,
    /// The event's month is closed: it was not applied.
    Late,
    /// The event would begin an app-month beyond [`MeterSettings::max_app_months`]: it was
    /// not applied.
    TooManyApps,
}

/// The closed aggregates of one month, by app.
pub type ClosedMonth = Vec<(AppId, AppMonthAggregate)>;

/// What closing months produced since it was last taken ([`Meter::take_closed`]).
#[derive(Debug)]
pub struct MonthsClosed {
    /// The slice is now closed through this month: no later event dated in it or before
    /// is applied.
    pub through: Month,
    /// The first month this slice ever applied an event for (`None`: none yet).
    pub first_active: Option<Month>,
    /// The aggregates of each month closed since, oldest first (months without data
    /// here are left out).
    pub months: Vec<(Month, ClosedMonth)>,
}

/// Why a meter could not be restored from the changelog's records: the partition's state
/// cannot be trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RestoreError {
    /// A record could not be read.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// An exact count of an app-month has fewer user segments, or users in them, than its
    /// last checkpoint wrote ([`super::totals`]).
    #[error(
        "app {app_id}, month {month}, {count}: its last checkpoint wrote {} user segments holding {} users, \
         the changelog holds {} holding {}: segment records are missing (deleted, or expired by a topic \
         that is not compacted-only), and restored, the month would count fewer users",
        .written.segments, .written.keys, .found.segments, .found.keys
    )]
    MissingUserSegments {
        /// The app.
        app_id: AppId,
        /// The month.
        month: Month,
        /// The count short of segments.
        count: UserCount,
        /// What its last checkpoint wrote.
        written: SegmentTotal,
        /// What the changelog holds.
        found: SegmentTotal,
    },
    /// A month's counted connections have fewer segments, or connections in them, than the
    /// last checkpoint wrote ([`super::totals`]).
    #[error(
        "month {month}, counted connections: the last checkpoint wrote {} segments holding {} connections, \
         the changelog holds {} holding {}: segment records are missing (deleted, or expired by a topic \
         that is not compacted-only), and restored, retried events of those connections would count again",
        .written.segments, .written.keys, .found.segments, .found.keys
    )]
    MissingConnectionSegments {
        /// The month.
        month: Month,
        /// What the last checkpoint wrote.
        written: SegmentTotal,
        /// What the changelog holds.
        found: SegmentTotal,
    },
}

/// Per app-month usage state of one slice of the input.
#[derive(Debug)]
pub struct Meter {
    settings: MeterSettings,
    months: FxHashMap<(AppId, Month), AppMonthAggregate>,
    connections: ConnectionTable,
    days: DayCache,
    month_samples: FxHashMap<Month, MonthSamples>,
    closed_through: Option<Month>,
    watermark: Option<Timestamp>,
    /// Months holding at least one applied event.
    active_months: BTreeSet<Month>,
    /// The deletions of the records of app-months gone from the state since the last
    /// checkpoint. (What changed in the others, each aggregate knows itself.)
    dropped: Vec<StateRecord>,
    /// Whether the progress changed since the last checkpoint.
    progress_changed: bool,
    /// App-months whose MAU here just passed [`QUOTA_WATCH`], not yet taken.
    quota_crossings: Vec<QuotaCrossing>,
    /// The watermark (ms) from which the next month is due to close: a cache, so that
    /// `apply` only compares two numbers.
    close_at: i64,
    /// Months closed and not taken yet, and whether `closed_through` moved since.
    closed_out: Vec<(Month, ClosedMonth)>,
    closing_untaken: bool,
    /// The caller's position in its input (the Kafka offset of the next record) that the
    /// state reflects, checkpointed with it.
    input_offset: Option<i64>,
}

/// The MAU cap watched as it happens: the Developer plan's 100 users (SPEC §3.3). Whether
/// the app is on that plan is for billing to say; the meter reports the crossing.
pub const QUOTA_WATCH: u64 = crate::plan::Plan::Developer.included_mau();

// Crossings are detected on the exact count: the watch must lie below any exact limit.
const _: () = assert!(QUOTA_WATCH < ExactLimit::MIN);

/// An app-month whose MAU in one slice of the input passed [`QUOTA_WATCH`].
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct QuotaCrossing {
    /// The app.
    pub app_id: AppId,
    /// The month.
    pub month: Month,
    /// The first day by whose end the slice had seen more than [`QUOTA_WATCH`] users: its
    /// logins' days, not the order they came in, say which (an earlier-dated login that
    /// arrives later can only move it earlier, and billing takes the earliest it hears of).
    pub day: Day,
}

impl Meter {
    /// An empty meter.
    pub fn new(settings: MeterSettings) -> Self {
        Meter {
            days: DayCache::new(settings.tz),
            connections: ConnectionTable::new(settings.tz),
            settings,
            months: FxHashMap::default(),
            month_samples: FxHashMap::default(),
            closed_through: None,
            watermark: None,
            active_months: BTreeSet::new(),
            dropped: Vec::new(),
            progress_changed: false,
            quota_crossings: Vec::new(),
            close_at: i64::MIN,
            closed_out: Vec::new(),
            closing_untaken: false,
            input_offset: None,
        }
    }

    /// The settings in force.
    pub fn settings(&self) -> &MeterSettings {
        &self.settings
    }

    /// The largest event time applied so far.
    pub fn watermark(&self) -> Option<Timestamp> {
        self.watermark
    }

    /// The latest closed month.
    pub fn closed_through(&self) -> Option<Month> {
        self.closed_through
    }

    /// Months holding at least one applied (accepted or duplicate) event.
    pub fn active_months(&self) -> &BTreeSet<Month> {
        &self.active_months
    }

    /// Apps with state in a month not yet closed, in ascending order.
    pub fn apps(&self) -> BTreeSet<AppId> {
        self.months.keys().map(|&(app_id, _)| app_id).collect()
    }

    /// Number of app-months held.
    pub fn app_months(&self) -> usize {
        self.months.len()
    }

    /// Number of connections tracked.
    pub fn connections(&self) -> usize {
        self.connections.len()
    }

    /// Number of connections open (connected, no disconnect yet).
    pub fn open_connections(&self) -> usize {
        self.connections.open().count()
    }

    /// Every aggregate held, in no particular order.
    pub fn aggregates(&self) -> impl Iterator<Item = (AppId, Month, &AppMonthAggregate)> {
        self.months.iter().map(|(&(app_id, month), aggregate)| (app_id, month, aggregate))
    }

    /// The usage so far of every app with state in `month`, sorted by app (reading the
    /// sketches flushes them, which changes no figure and no encoding).
    pub fn usage_in(&mut self, month: Month) -> Vec<MonthlyUsage> {
        let grid = self.settings.grid;
        let mut usage: Vec<MonthlyUsage> = self
            .months
            .iter_mut()
            .filter(|((_, m), _)| *m == month)
            .map(|(&(app_id, m), aggregate)| aggregate.usage(app_id, m, grid))
            .collect();
        usage.sort_by_key(|u| u.app_id);
        usage
    }

    /// The aggregate of an app-month, if any event touched it.
    pub fn aggregate(&self, app_id: AppId, month: Month) -> Option<&AppMonthAggregate> {
        self.months.get(&(app_id, month))
    }

    fn is_closed(&self, month: Month) -> bool {
        self.closed_through.is_some_and(|c| month <= c)
    }

    /// The billing month of an instant.
    pub fn month_of(&mut self, ts: Timestamp) -> Month {
        self.days.day_of(ts).month()
    }

    /// Applies one event. With an allowed lateness, months the event's time makes due
    /// are closed first.
    pub fn apply(&mut self, event: &UsageEvent) -> Outcome {
        let day = self.days.day_of(event.ts);
        let month = day.month();
        if self.is_closed(month) {
            return Outcome::Late;
        }
        if self.settings.max_app_months.is_some_and(|max| self.months.len() >= max)
            && !self.months.contains_key(&(event.app_id, month))
        {
            // Refused before anything changes: it does not move event time either.
            return Outcome::TooManyApps;
        }
        if self.watermark < Some(event.ts) {
            self.watermark = Some(event.ts);
            // Closes only months that ended before this event: its own month stays open.
            if event.ts.millis() >= self.close_at {
                self.close_due();
            }
        }
        self.progress_changed = true;
        if self.active_months.last() != Some(&month) {
            self.active_months.insert(month);
        }
        let (app_id, ts) = (event.app_id, event.ts);
        let effect = match event.action {
            Action::Connect { conn, .. } => self.connections.connect(app_id, conn, ts),
            Action::Disconnect { conn } => self.connections.disconnect(app_id, conn, ts),
            Action::Heartbeat { conn } => self.connections.heartbeat(app_id, conn, ts),
            Action::Login { .. } | Action::Logout { .. } | Action::GroupStats { .. } => ConnEffect::Recorded,
        };
        // Every accepted event makes its app-month known, even when it counts nothing.
        let (counting, exact) = (self.settings.counting(), self.settings.exact);
        let aggregate =
            self.months.entry((app_id, month)).or_insert_with(|| AppMonthAggregate::new(counting, exact));
        aggregate.touch();
        match event.action {
            Action::Login { user, ok: true } => {
                let before = aggregate.exact_mau();
                aggregate.record_login(day, user);
                // The watch is far below the exact limit, so crossing it is seen exactly.
                if before == Some(QUOTA_WATCH as usize)
                    && aggregate.exact_mau() == Some(QUOTA_WATCH as usize + 1)
                {
                    let crossed = aggregate.day_passing(QUOTA_WATCH).and_then(|d| month.day(u32::from(d)));
                    self.quota_crossings.push(QuotaCrossing { app_id, month, day: crossed.unwrap_or(day) });
                }
            }
            Action::GroupStats { group_count } => aggregate.record_group_count(group_count),
            _ => {}
        }
        match effect {
            ConnEffect::Duplicate => Outcome::Duplicate,
            ConnEffect::Recorded => Outcome::Accepted,
            ConnEffect::Closed(interval) => {
                self.count_interval(interval, true);
                Outcome::Accepted
            }
            ConnEffect::Corrected { was, now } => {
                // In the months still open: where either lies in a closed month, the two
                // agree there (the correcting copy is dated in an open month, and each
                // differs from the other only after it).
                self.count_interval(was, false);
                self.count_interval(now, true);
                Outcome::Accepted
            }
        }
    }

    fn samples(&mut self, month: Month) -> MonthSamples {
        let (tz, grid) = (self.settings.tz, self.settings.grid);
        *self
            .month_samples
            .entry(month)
            .or_insert_with(|| MonthSamples::new(grid, tz.start_of_month(month), tz.end_of_month(month)))
    }

    fn aggregate_mut(&mut self, app_id: AppId, month: Month) -> &mut AppMonthAggregate {
        let (counting, exact) = (self.settings.counting(), self.settings.exact);
        let aggregate =
            self.months.entry((app_id, month)).or_insert_with(|| AppMonthAggregate::new(counting, exact));
        aggregate.touch();
        aggregate
    }

    /// Counts a complete connection into every open month it overlaps (`add`), or takes it
    /// back from them.
    fn count_interval(&mut self, interval: Interval, add: bool) {
        if interval.until <= interval.from {
            return;
        }
        let grid = self.settings.grid;
        let (from, until) = (grid.first_at_or_after(interval.from), grid.first_at_or_after(interval.until));
        let last = self.month_of(interval.until);
        let mut month = self.month_of(interval.from);
        while month <= last {
            if !self.is_closed(month) {
                let samples = self.samples(month);
                if from < samples.end && until > samples.first {
                    let pcc = self.aggregate_mut(interval.app_id, month).pcc_mut();
                    if add {
                        pcc.add_connection(samples, from, Some(until));
                    } else {
                        pcc.remove_connection(samples, from, Some(until));
                    }
                }
            }
            month = month.next();
        }
    }

    /// Closes idle connections (when an idle timeout is set) as of the watermark.
    fn expire_idle(&mut self) {
        let (Some(timeout), Some(now)) = (self.settings.idle_timeout, self.watermark) else {
            return;
        };
        let timeout_ms = i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX);
        for interval in self.connections.expire_idle(now, timeout_ms) {
            self.count_interval(interval, true);
        }
    }

    /// Closes `month` (and drops any earlier month not closed yet): ends the open
    /// connections of apps without usage in it (and in each month dropped on the way),
    /// counts the connections still open into it and returns its aggregates, sorted by
    /// app. Later events dated in it or before are late. Closing a month at or before the
    /// last closed one returns nothing.
    pub fn close_month(&mut self, month: Month) -> ClosedMonth {
        if self.is_closed(month) {
            return Vec::new();
        }
        self.expire_idle();
        // In order, each month not closed yet: replay closes only the months holding
        // events, and a month without any is one in which every app was silent.
        let mut open = match self.closed_through {
            Some(closed) => closed.next(),
            None => self.months.keys().map(|&(_, m)| m).min().map_or(month, |m| m.min(month)),
        };
        let samples = self.samples(month);
        while open <= month {
            let ended = self.end_connections_without_usage(open);
            // Handed over to billing in the month's share, which counts them if the app
            // has usage in another partition (`merge_shares`). A month closed in passing
            // has no share (replay closes only months holding events, so the app was
            // silent everywhere): they end.
            if open == month {
                for (app_id, connections) in ended.chunk_by(|a, b| a.0 == b.0).map(|c| (c[0].0, c)) {
                    let keys = connections.iter().map(|(_, conn)| conn.0);
                    *self.aggregate_mut(app_id, month).handover_mut() = Handover::silent(keys, samples.first);
                }
            }
            open = open.next();
        }
        let grid = self.settings.grid;
        let open: Vec<(AppId, Timestamp)> = self.connections.open().collect();
        for (app_id, from) in open {
            let from = grid.first_at_or_after(from);
            if from < samples.end {
                self.aggregate_mut(app_id, month).pcc_mut().add_connection(samples, from, None);
            }
        }
        // Disconnects whose connect this slice never saw: noted for billing, which pairs
        // them with a connect another slice counted open (`merge_shares`). Forgotten below.
        let (start, end) = (self.settings.tz.start_of_month(month), self.settings.tz.end_of_month(month));
        let unpaired = self.connections.unpaired_disconnects(start, end);
        for by_app in unpaired.chunk_by(|a, b| a.0 == b.0) {
            let at = |ts: Timestamp| grid.first_at_or_after(ts);
            let disconnects =
                by_app.iter().map(|&(_, ts, conn)| (conn.0, at(ts))).filter(|&(_, at)| at < samples.end);
            let disconnects: Vec<(u64, u32)> = disconnects.collect();
            if !disconnects.is_empty() {
                self.aggregate_mut(by_app[0].0, month).handover_mut().add_disconnects(disconnects);
            }
        }
        let dropped = &mut self.dropped;
        let mut closed: ClosedMonth = self
            .months
            .extract_if(|&(_, m), _| m <= month)
            .inspect(|((app_id, m), aggregate)| {
                // Gone from the state: the checkpoint deletes it (a share that only hands
                // connections over was made just now, never checkpointed).
                if !aggregate.is_silent() {
                    dropped.extend(aggregate.deletions(*app_id, *m));
                }
            })
            .filter(|((_, m), _)| *m == month)
            .map(|((app_id, _), aggregate)| (app_id, aggregate))
            .collect();
        closed.sort_by_key(|(app_id, _)| *app_id);
        self.closed_through = Some(month);
        self.progress_changed = true;
        self.connections.forget_through(month);
        self.month_samples.retain(|&m, _| m > month);
        closed
    }

    /// Ends here, at the start of `month`, the open connections of apps without usage in
    /// it in this slice — no event dated in it, and no connection known to be open
    /// throughout it (which [`Meter::count_interval`] counted there) — and returns them, by
    /// app, sorted. They counted through the end of the previous month; whether they count
    /// in this one depends on the app's usage in the other slices, which billing knows: the
    /// caller hands them over. (An app that shows no sign of life anywhere for a whole month
    /// is not billed for connections it may no longer hold: their disconnects were lost.)
    /// Decided before the open connections are counted into `month`, which creates the
    /// aggregates this looks at.
    fn end_connections_without_usage(&mut self, month: Month) -> Vec<(AppId, ConnKey)> {
        let start = self.settings.tz.start_of_month(month);
        let months = &self.months;
        self.connections.end_open(start, |app_id| !months.contains_key(&(app_id, month)))
    }

    /// App-months whose MAU in this slice passed [`QUOTA_WATCH`] since the last call: each
    /// app-month at most once per slice (the count only grows, and restored state does not
    /// cross again).
    pub fn take_quota_crossings(&mut self) -> Vec<QuotaCrossing> {
        std::mem::take(&mut self.quota_crossings)
    }

    /// Moves event time forward without an event, so that months can close while this
    /// slice of the input is idle (its peers' event time, or the clock, has moved on).
    /// Never moves back.
    pub fn advance_watermark(&mut self, ts: Timestamp) {
        if self.watermark < Some(ts) {
            self.watermark = Some(ts);
            self.progress_changed = true;
            if ts.millis() >= self.close_at {
                self.close_due();
            }
        }
    }

    /// Closes, oldest first, every month that ended at least the allowed lateness before
    /// the watermark, and notes the slice closed through the latest of them even where it
    /// holds no data for it. A month between the last closed one and those is closed too
    /// (connections still open count in it).
    fn close_due(&mut self) {
        let (Some(lateness), Some(watermark)) = (self.settings.allowed_lateness, self.watermark) else {
            self.close_at = i64::MAX;
            return;
        };
        let lateness_ms = i64::try_from(lateness.as_millis()).unwrap_or(i64::MAX);
        let horizon = watermark.millis().saturating_sub(lateness_ms);
        let tz = self.settings.tz;
        if horizon < Timestamp::MIN.millis() {
            // No month since the start of time has ended that long ago.
            self.close_at = Timestamp::MIN.millis().saturating_add(lateness_ms);
            return;
        }
        // The latest month whose end lies at or before the horizon.
        let due = tz.month_of(Timestamp(horizon)).prev();
        self.close_at = tz.end_of_month(due.next()).millis().saturating_add(lateness_ms);
        if self.closed_through >= Some(due) {
            return;
        }
        let mut month = match self.closed_through {
            Some(closed) => closed.next(),
            // Never closed: from the first month holding data (nothing before it exists here).
            None => self.months.keys().map(|&(_, m)| m).min().unwrap_or(due.next()),
        };
        while month <= due {
            let closed = self.close_month(month);
            if !closed.is_empty() {
                self.closed_out.push((month, closed));
            }
            month = month.next();
        }
        self.closed_through = Some(due);
        self.progress_changed = true;
        self.closing_untaken = true;
    }

    /// What closing months produced since the last call: `None` if no month closed.
    pub fn take_closed(&mut self) -> Option<MonthsClosed> {
        if !std::mem::take(&mut self.closing_untaken) {
            return None;
        }
        Some(MonthsClosed {
            through: self.closed_through?,
            first_active: self.active_months.first().copied(),
            months: std::mem::take(&mut self.closed_out),
        })
    }

    /// The caller's input position that the state reflects (checkpointed with it).
    pub fn input_offset(&self) -> Option<i64> {
        self.input_offset
    }

    /// Records the caller's input position: the offset of the next record to apply.
    pub fn set_input_offset(&mut self, offset: i64) {
        if self.input_offset != Some(offset) {
            self.input_offset = Some(offset);
            self.progress_changed = true;
        }
    }

    /// The state changed since the last checkpoint, as changelog records: the aggregate
    /// of every touched app-month, every changed pending connection, segments of the
    /// connections counted since, and the progress; `None` values for what was closed or
    /// forgotten.
    ///
    /// The progress comes last: a reader that stops inside a commit's records (the topic's
    /// last stable offset can fall there, held back by another producer's open
    /// transaction) has seen all of them once it has seen the progress, and otherwise sees
    /// an input offset older than the committed one.
    pub fn checkpoint(&mut self) -> Vec<StateRecord> {
        let mut records = Vec::new();
        let mut months: Vec<(AppId, Month)> =
            self.months.iter().filter(|(_, a)| a.is_unsaved()).map(|(key, _)| *key).collect();
        months.sort_unstable();
        for (app_id, month) in months {
            let Some(aggregate) = self.months.get_mut(&(app_id, month)) else { continue };
            records.extend(aggregate.checkpoint(app_id, month));
        }
        records.append(&mut self.dropped);
        let connections = self.connections.take_changes();
        for ((app_id, conn), record) in connections.records {
            let value = record.map(|r| r.encode());
            records.push(StateRecord { key: StateKey::Connection { app_id, conn }, value });
        }
        // New segments, then the totals, then the deletions ([`super::totals`]).
        let (written, deleted): (Vec<_>, Vec<_>) =
            connections.segments.into_iter().partition(|(_, value)| value.is_some());
        for (segment, value) in written {
            records.push(StateRecord { key: StateKey::CountedConnections { segment }, value });
        }
        if let Some(totals) = connections.totals {
            let value = (!totals.0.is_empty()).then(|| totals.encode());
            records.push(StateRecord { key: StateKey::ConnectionTotals, value });
        }
        for (segment, value) in deleted {
            records.push(StateRecord { key: StateKey::CountedConnections { segment }, value });
        }
        // Any state written comes with the progress after it, as the mark of a whole commit.
        if std::mem::take(&mut self.progress_changed) || !records.is_empty() {
            let progress = Progress {
                watermark: self.watermark.map(Timestamp::millis),
                closed_through: self.closed_through,
                active_months: self.active_months.iter().copied().collect(),
                input_offset: self.input_offset,
            };
            records.push(StateRecord { key: StateKey::Progress, value: Some(progress.encode()) });
        }
        records
    }

    /// Rebuilds a meter from the latest value of each key (a compacted changelog; keys whose
    /// latest record is a deletion are simply absent). The result has nothing to checkpoint.
    /// Segments fewer than their totals say refuse the state ([`RestoreError`]).
    pub fn restore(
        settings: MeterSettings,
        records: impl IntoIterator<Item = (StateKey, Vec<u8>)>,
    ) -> Result<Meter, RestoreError> {
        let mut meter = Meter::new(settings);
        // App-month → its month record, its days', its user segments and their totals.
        type Parts = (Option<Vec<u8>>, Vec<Vec<u8>>, Vec<(UserCount, u64, Vec<u8>)>, Option<Vec<u8>>);
        let mut app_months: FxHashMap<(AppId, Month), Parts> = FxHashMap::default();
        let mut connection_totals = None;
        for (key, value) in records {
            match key {
                StateKey::Progress => {
                    let progress = Progress::decode(&value)?;
                    meter.watermark = progress.watermark.map(Timestamp);
                    meter.closed_through = progress.closed_through;
                    meter.active_months = progress.active_months.into_iter().collect();
                    meter.input_offset = progress.input_offset;
                }
                StateKey::AppMonth { app_id, month } => {
                    app_months.entry((app_id, month)).or_default().0 = Some(value)
                }
                StateKey::AppMonthDay { app_id, month, .. } => {
                    app_months.entry((app_id, month)).or_default().1.push(value);
                }
                StateKey::Users { app_id, month, count, segment } => {
                    app_months.entry((app_id, month)).or_default().2.push((count, segment, value));
                }
                StateKey::UserTotals { app_id, month } => {
                    app_months.entry((app_id, month)).or_default().3 = Some(value);
                }
                StateKey::ConnectionTotals => connection_totals = Some(ConnectionTotals::decode(&value)?),
                StateKey::Connection { app_id, conn } => {
                    meter.connections.restore(app_id, conn, ConnRecord::decode(&value)?);
                }
                // In any order: a pending connection is looked up before the counted ones
                // (a connection's own record is newer than a segment).
                StateKey::CountedConnections { segment } => {
                    meter.connections.restore_segment(segment, &value)?;
                }
            }
        }
        for ((app_id, month), (whole, days, users, written)) in app_months {
            let whole = whole.ok_or_else(|| {
                CodecError::Corrupt(format!("a part of app-month {app_id}/{month} without it"))
            })?;
            if let Some(written) = written {
                let written = UserTotals::decode(&written)?;
                let found =
                    UserTotals::of_segments(users.iter().map(|(count, _, bytes)| (*count, &bytes[..])))?;
                if let Some((count, written, found)) = totals::shortfall(&written.0, &found.0) {
                    return Err(RestoreError::MissingUserSegments { app_id, month, count, written, found });
                }
            }
            let aggregate = AppMonthAggregate::from_parts(
                &whole,
                days.iter().map(Vec::as_slice),
                users.iter().map(|(count, segment, bytes)| (*count, *segment, bytes.as_slice())),
            )?;
            meter.months.insert((app_id, month), aggregate);
        }
        if let Some(written) = connection_totals {
            let found = meter.connections.segment_totals();
            if let Some((month, written, found)) = totals::shortfall(&written.0, &found.0) {
                return Err(RestoreError::MissingConnectionSegments { month, written, found });
            }
        }
        meter.connections.finish_restore(meter.closed_through);
        Ok(meter)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::aggregate::Counted;
    use crate::aggregate::{connections, user_set};
    use crate::ingest::UserKey;

    fn login(app_id: AppId, user: u64) -> UsageEvent {
        login_at(app_id, user, "2026-11-05T10:00:00+08:00")
    }

    fn login_at(app_id: AppId, user: u64, at: &str) -> UsageEvent {
        let ts = Timestamp::parse_rfc3339(at).expect("valid");
        UsageEvent { app_id, ts, action: Action::Login { user: UserKey::of(&format!("u{user}")), ok: true } }
    }

    fn month(text: &str) -> Month {
        text.parse().expect("valid month")
    }

    fn streaming() -> MeterSettings {
        MeterSettings { allowed_lateness: Some(Duration::from_secs(3600)), ..MeterSettings::default() }
    }

    /// `metering.hll_precision` changed between a checkpoint and the restore: the open
    /// month's counts keep the precision they were made at (as they keep their exact limit),
    /// exact ones stay exact and one passing the limit later becomes a sketch at its own
    /// precision; counts begun after the restore (a new month, a new app) take the new one.
    #[test]
    fn a_precision_change_applies_to_counts_begun_after_it() {
        let (p14, p16) = (Precision::new(14).unwrap(), Precision::new(16).unwrap());
        let limited = |precision| MeterSettings {
            precision,
            exact_limit: ExactLimit::new(1_000).unwrap(),
            ..MeterSettings::default()
        };
        let mut meter = Meter::new(limited(p14));
        (0..10).for_each(|u| {
            meter.apply(&login(1, u));
        });
        let state: Vec<(StateKey, Vec<u8>)> =
            meter.checkpoint().into_iter().filter_map(|r| r.value.map(|v| (r.key, v))).collect();
        let mut meter = Meter::restore(limited(p16), state).expect("a precision change is no reason to stop");
        let (nov, dec) = (month("2026-11"), month("2026-12"));
        // Still exact, and still counting at 14 past the limit.
        (10..1_100).for_each(|u| {
            meter.apply(&login(1, u));
        });
        meter.apply(&login(2, 1));
        (0..1_100).for_each(|u| {
            meter.apply(&login_at(1, u, "2026-12-05T10:00:00+08:00"));
        });
        let grid = meter.settings().grid;
        let counted = |meter: &mut Meter, m: Month| -> Vec<(AppId, Counted, Precision)> {
            meter
                .close_month(m)
                .into_iter()
                .map(|(app_id, mut a)| (app_id, a.usage(app_id, m, grid).mau_counted, a.precision()))
                .collect()
        };
        assert_eq!(
            counted(&mut meter, nov),
            [(1, Counted::Estimated(p14), p14), (2, Counted::Exact, p16)],
            "the open month's counts keep 14; an app first seen after the restore counts at 16"
        );
        assert_eq!(counted(&mut meter, dec), [(1, Counted::Estimated(p16), p16)], "December begins at 16");
    }

    /// An exact count has no sketch yet: a precision change can never be a reason to refuse it.
    #[test]
    fn exact_counts_restore_at_any_precision() {
        let mut meter = Meter::new(MeterSettings::default());
        meter.apply(&login(1, 1));
        let state: Vec<(StateKey, Vec<u8>)> =
            meter.checkpoint().into_iter().filter_map(|r| r.value.map(|v| (r.key, v))).collect();
        for p in [Precision::MIN, 16, Precision::MAX] {
            let settings =
                MeterSettings { precision: Precision::new(p.into()).unwrap(), ..MeterSettings::default() };
            let mut restored = Meter::restore(settings, state.clone()).expect("restores");
            let closed = restored.close_month(month("2026-11"));
            let grid = restored.settings().grid;
            let usage: Vec<_> =
                closed.into_iter().map(|(app_id, mut a)| a.usage(app_id, month("2026-11"), grid)).collect();
            assert_eq!((usage[0].mau, usage[0].mau_counted), (1, Counted::Exact));
        }
    }

    #[test]
    fn a_slice_without_events_closes_months_all_the_same() {
        let mut meter = Meter::new(streaming());
        // Event time follows its peers (or the clock) to an hour past October's end.
        meter.advance_watermark(Timestamp::parse_rfc3339("2026-11-01T01:00:00+08:00").unwrap());
        let closed = meter.take_closed().expect("October is closed here too");
        assert_eq!((closed.through, closed.first_active, closed.months.len()), (month("2026-10"), None, 0));
        assert!(meter.take_closed().is_none(), "taken once");
        // A minute earlier, October would still have been open.
        let mut meter = Meter::new(streaming());
        meter.advance_watermark(Timestamp::parse_rfc3339("2026-11-01T00:59:59+08:00").unwrap());
        assert_eq!(meter.take_closed().map(|c| c.through), Some(month("2026-09")));
    }

    #[test]
    fn a_first_event_in_a_later_month_closes_the_earlier_ones_without_data() {
        let mut meter = Meter::new(streaming());
        assert_eq!(meter.apply(&login(1, 1)), Outcome::Accepted);
        let closed = meter.take_closed().expect("closed through October");
        assert_eq!(closed.through, month("2026-10"));
        assert_eq!(closed.first_active, Some(month("2026-11")));
        assert!(closed.months.is_empty());
        assert_eq!(meter.apply(&login_at(1, 2, "2026-10-31T23:00:00+08:00")), Outcome::Late);
    }

    #[test]
    fn a_month_closes_at_the_event_that_passes_its_end_plus_lateness() {
        let mut meter = Meter::new(streaming());
        meter.apply(&login_at(1, 1, "2026-10-31T23:00:00+08:00"));
        let conn = crate::ingest::ConnKey::of("c");
        let ts = Timestamp::parse_rfc3339("2026-10-20T00:00:00+08:00").unwrap();
        meter.apply(&UsageEvent { app_id: 2, ts, action: Action::Connect { conn, user: UserKey::of("u") } });
        meter.take_closed();
        // Within the lateness, October events still count.
        assert_eq!(meter.apply(&login_at(1, 2, "2026-11-01T00:59:00+08:00")), Outcome::Accepted);
        assert_eq!(meter.apply(&login_at(1, 3, "2026-10-31T23:30:00+08:00")), Outcome::Accepted);
        // This one closes October before it is applied; the next October event is late.
        assert_eq!(meter.apply(&login_at(1, 4, "2026-11-01T01:00:00+08:00")), Outcome::Accepted);
        assert_eq!(meter.apply(&login_at(1, 5, "2026-10-31T23:30:00+08:00")), Outcome::Late);
        let closed = meter.take_closed().expect("October closed");
        assert_eq!(closed.through, month("2026-10"));
        let (oct, mut apps) = closed.months.into_iter().next().expect("October had data");
        assert_eq!((oct, apps.iter().map(|(a, _)| *a).collect::<Vec<_>>()), (month("2026-10"), vec![1, 2]));
        let grid = meter.settings().grid;
        assert_eq!(apps[0].1.usage(1, oct, grid).mau, 2, "users 1 and 3");
        assert_eq!(apps[1].1.usage(2, oct, grid).pcc, 1, "the open connection counts in October");
    }

    #[test]
    fn without_a_lateness_months_close_only_when_asked() {
        let mut meter = Meter::new(MeterSettings::default());
        meter.apply(&login_at(1, 1, "2026-10-31T23:00:00+08:00"));
        meter.apply(&login_at(1, 2, "2027-03-01T00:00:00+08:00"));
        assert!(meter.take_closed().is_none());
        assert_eq!(meter.apply(&login_at(1, 3, "2026-10-01T00:00:00+08:00")), Outcome::Accepted);
    }

    fn connect(app_id: AppId, conn: &str, at: &str) -> UsageEvent {
        let ts = Timestamp::parse_rfc3339(at).expect("valid");
        let conn = crate::ingest::ConnKey::of(conn);
        UsageEvent { app_id, ts, action: Action::Connect { conn, user: UserKey::of("u") } }
    }

    /// Each app's PCC in `closed` as billing bills this slice alone ([`merge_shares`]): an
    /// app whose share only hands connections over had no usage, and is left out.
    fn pcc_of(meter: &Meter, closed: ClosedMonth, month: Month) -> Vec<(AppId, u64)> {
        let grid = meter.settings().grid;
        closed
            .into_iter()
            .filter(|(_, a)| !a.is_silent())
            .map(|(app_id, a)| {
                let mut billed = crate::aggregate::merge_shares([&a]).expect("merges");
                (app_id, billed.usage(app_id, month, grid).pcc)
            })
            .collect()
    }

    /// The connections each app's share in `closed` hands over.
    fn handed_over(closed: &ClosedMonth) -> Vec<(AppId, Vec<u64>)> {
        closed
            .iter()
            .filter(|(_, a)| a.is_silent())
            .map(|(app_id, a)| (*app_id, a.handover().handed().collect()))
            .collect()
    }

    fn disconnect(app_id: AppId, conn: &str, at: &str) -> UsageEvent {
        let ts = Timestamp::parse_rfc3339(at).expect("valid");
        UsageEvent { app_id, ts, action: Action::Disconnect { conn: crate::ingest::ConnKey::of(conn) } }
    }

    /// PCC of app 1 in each month of `events`, applied in the order given (replay's way: no
    /// lateness, every month closed at the end).
    fn pcc_by_month(events: &[UsageEvent]) -> Vec<(Month, u64)> {
        let mut meter = Meter::new(MeterSettings::default());
        for event in events {
            meter.apply(event);
        }
        let months: Vec<Month> = meter.active_months().iter().copied().collect();
        let mut pcc = Vec::new();
        for month in months {
            let closed = meter.close_month(month);
            pcc.extend(pcc_of(&meter, closed, month).into_iter().map(|(_, p)| (month, p)));
        }
        pcc
    }

    /// Issue 19: when two copies of a `connect` (or `disconnect`) disagree on the time, the
    /// earliest wins whichever arrives first — also after the connection counted.
    #[test]
    fn retried_connects_and_disconnects_count_by_their_earliest_copy_in_any_order() {
        // A 10:00–10:05 (its disconnect retried as 10:30), B 10:20–10:40: never both open.
        let stretched = [
            connect(1, "a", "2026-11-05T10:00:00+08:00"),
            disconnect(1, "a", "2026-11-05T10:30:00+08:00"),
            disconnect(1, "a", "2026-11-05T10:05:00+08:00"),
            connect(1, "b", "2026-11-05T10:20:00+08:00"),
            disconnect(1, "b", "2026-11-05T10:40:00+08:00"),
        ];
        // A 10:00 (its connect retried as 10:25) to 10:30, B 10:10–10:20: both open at 10:10.
        let shortened = [
            connect(1, "a", "2026-11-05T10:25:00+08:00"),
            disconnect(1, "a", "2026-11-05T10:30:00+08:00"),
            connect(1, "a", "2026-11-05T10:00:00+08:00"),
            connect(1, "b", "2026-11-05T10:10:00+08:00"),
            disconnect(1, "b", "2026-11-05T10:20:00+08:00"),
        ];
        // Five seconds on September 30 whose disconnect was retried dated October 1: it
        // counts in September only.
        let across = [
            connect(1, "a", "2026-09-30T23:57:00+08:00"),
            disconnect(1, "a", "2026-10-01T00:00:53+08:00"),
            disconnect(1, "a", "2026-09-30T23:57:05+08:00"),
        ];
        let (sep, oct, nov) = (month("2026-09"), month("2026-10"), month("2026-11"));
        for (events, want) in [
            (&stretched[..], vec![(nov, 1)]),
            (&shortened[..], vec![(nov, 2)]),
            (&across[..], vec![(sep, 1), (oct, 0)]),
        ] {
            let mut reversed = events.to_vec();
            reversed.reverse();
            assert_eq!(pcc_by_month(events), want, "{events:?}");
            assert_eq!(pcc_by_month(&reversed), want, "{reversed:?}");
        }
    }

    #[test]
    fn an_open_connection_ends_with_the_last_month_its_app_had_usage_in() {
        let mut meter = Meter::new(MeterSettings::default());
        // Both apps open a connection in October and never disconnect it; only app 2 has
        // any event in November.
        meter.apply(&connect(1, "c", "2026-10-10T10:00:00+08:00"));
        meter.apply(&connect(2, "c", "2026-10-10T10:00:00+08:00"));
        meter.apply(&login_at(2, 1, "2026-11-20T10:00:00+08:00"));
        let closed = meter.close_month(month("2026-10"));
        assert_eq!(pcc_of(&meter, closed, month("2026-10")), vec![(1, 1), (2, 1)]);
        let conn = crate::ingest::ConnKey::of("c");
        let recorded = StateKey::Connection { app_id: 1, conn };
        assert!(meter.checkpoint().iter().any(|r| r.key == recorded && r.value.is_some()));
        let closed = meter.close_month(month("2026-11"));
        assert_eq!(handed_over(&closed), vec![(1, vec![conn.0])], "app 1's connection is handed to billing");
        assert_eq!(
            pcc_of(&meter, closed, month("2026-11")),
            vec![(2, 1)],
            "app 1's connection ended at November's start"
        );
        assert_eq!(meter.connections(), 1, "app 1's connection is gone");
        let records = meter.checkpoint();
        assert!(records.contains(&StateRecord { key: recorded, value: None }), "its record is deleted");
        // Its id used again later is a new connection.
        let dec = "2026-12-05T10:00:00+08:00";
        assert_eq!(meter.apply(&connect(1, "c", dec)), Outcome::Accepted);
        assert_eq!(meter.open_connections(), 2);
        // App 2 had no event in December: its connection ends there, not counted.
        let closed = meter.close_month(month("2026-12"));
        assert_eq!(pcc_of(&meter, closed, month("2026-12")), vec![(1, 1)]);
        assert_eq!(meter.open_connections(), 1);
    }

    #[test]
    fn a_month_closed_in_passing_still_ends_the_connections_of_apps_silent_in_it() {
        let mut meter = Meter::new(MeterSettings::default());
        meter.apply(&connect(1, "c", "2026-10-10T10:00:00+08:00"));
        meter.apply(&login_at(1, 1, "2026-12-20T10:00:00+08:00"));
        meter.close_month(month("2026-10"));
        // November had no event at all: replay closes December without it.
        let closed = meter.close_month(month("2026-12"));
        assert_eq!(pcc_of(&meter, closed, month("2026-12")), vec![(1, 0)]);
        assert_eq!(meter.open_connections(), 0);
    }

    #[test]
    fn the_worker_ends_the_open_connections_of_silent_apps_at_the_same_close() {
        let mut meter = Meter::new(streaming());
        meter.apply(&connect(1, "c", "2026-10-10T10:00:00+08:00"));
        meter.apply(&connect(2, "c", "2026-10-10T10:00:00+08:00"));
        meter.apply(&login_at(2, 1, "2026-11-20T10:00:00+08:00"));
        // An hour past November's end closes it.
        meter.apply(&login_at(2, 1, "2026-12-01T01:00:00+08:00"));
        let closed = meter.take_closed().expect("closed through November");
        let months: Vec<_> =
            closed.months.into_iter().map(|(m, apps)| (m, pcc_of(&meter, apps, m))).collect();
        assert_eq!(months, vec![(month("2026-10"), vec![(1, 1), (2, 1)]), (month("2026-11"), vec![(2, 1)])]);
        // Restored from its checkpoint, the meter holds the same connections.
        let state: Vec<_> =
            meter.checkpoint().into_iter().filter_map(|r| r.value.map(|v| (r.key, v))).collect();
        let restored = Meter::restore(streaming(), state).expect("restores");
        assert_eq!((restored.connections(), restored.open_connections()), (1, 1));
    }

    /// A changelog that lost full user segments (deleted, or expired by a topic that is not
    /// compacted-only) must not restore a smaller month without a word: the day's segment
    /// alone (its DAU shrinks), the MAU's and the day's, written by the same commit and so
    /// expired together (the MAU shrinks too), or the MAU's alone (the days still hold its
    /// users, but the changelog is damaged all the same).
    #[test]
    fn a_restore_missing_a_full_user_segment_is_refused() {
        let nov = month("2026-11");
        let mut meter = Meter::new(MeterSettings::default());
        let users = user_set::SEGMENT_CAPACITY as u64 + 1_000;
        for u in 0..users {
            meter.apply(&login(1, u));
        }
        let state: Vec<(StateKey, Vec<u8>)> =
            meter.checkpoint().into_iter().filter_map(|r| r.value.map(|v| (r.key, v))).collect();
        // Each count's first segment is full: 65,536 of its users.
        let first = |mau: bool| {
            state
                .iter()
                .map(|(key, _)| *key)
                .find(|key| match key {
                    StateKey::Users { count: UserCount::Mau, segment: 0, .. } => mau,
                    StateKey::Users { count: UserCount::Dau(_), segment: 0, .. } => !mau,
                    _ => false,
                })
                .expect("a first segment")
        };
        let (mau, day) = (first(true), first(false));
        let mut silent = Vec::new();
        for lost in [vec![day], vec![mau, day], vec![mau]] {
            let damaged: Vec<(StateKey, Vec<u8>)> =
                state.iter().filter(|(key, _)| !lost.contains(key)).cloned().collect();
            assert_eq!(damaged.len(), state.len() - lost.len());
            match Meter::restore(MeterSettings::default(), damaged) {
                Ok(mut restored) => {
                    let usage = &restored.usage_in(nov)[0];
                    silent.push(format!("without {lost:?}: MAU {}, peak DAU {}", usage.mau, usage.dau_peak));
                }
                Err(e) => {
                    // The first count short is named: the MAU's if it is.
                    let StateKey::Users { count, .. } = (if lost.contains(&mau) { mau } else { day }) else {
                        unreachable!("user segments")
                    };
                    let capacity = user_set::SEGMENT_CAPACITY as u64;
                    assert!(
                        matches!(e, RestoreError::MissingUserSegments { app_id: 1, month, count: c, written, found }
                            if month == nov && c == count
                                && (written.segments, written.keys) == (2, users)
                                && (found.segments, found.keys) == (1, users - capacity)),
                        "{e:?}"
                    );
                }
            }
        }
        assert!(silent.is_empty(), "{users} users; restored silently {silent:#?}");
    }

    /// The same for counted connections: a lost full segment would take its connections
    /// for new ones when their events are retried, and count them again.
    #[test]
    fn a_restore_missing_a_full_connection_segment_is_refused() {
        let mut meter = Meter::new(MeterSettings::default());
        let conns = connections::SEGMENT_CAPACITY + 100;
        let event = |i: usize, time: &str, connect: bool| {
            let conn = crate::ingest::ConnKey::of(&format!("c{i}"));
            let ts = Timestamp::parse_rfc3339(&format!("2026-11-05T{time}+08:00")).expect("valid");
            let action = match connect {
                true => Action::Connect { conn, user: UserKey::of("u") },
                false => Action::Disconnect { conn },
            };
            UsageEvent { app_id: 1, ts, action }
        };
        for i in 0..conns {
            meter.apply(&event(i, "10:00:00", true));
            meter.apply(&event(i, "10:30:00", false));
        }
        let mut state: Vec<(StateKey, Vec<u8>)> =
            meter.checkpoint().into_iter().filter_map(|r| r.value.map(|v| (r.key, v))).collect();
        let full = state
            .iter()
            .filter(|(key, _)| matches!(key, StateKey::CountedConnections { .. }))
            .max_by_key(|(_, value)| value.len())
            .map(|(key, _)| *key)
            .expect("segments");
        state.retain(|(key, _)| *key != full);
        match Meter::restore(MeterSettings::default(), state) {
            Ok(mut restored) => {
                let again = (0..conns)
                    .filter(|&i| restored.apply(&event(i, "10:00:00", true)) == Outcome::Accepted)
                    .count();
                panic!(
                    "restored silently without {full:?}: a retried connect of {again} of {conns} counted \
                     connections opens a new one"
                )
            }
            Err(e) => {
                let (capacity, nov) = (connections::SEGMENT_CAPACITY as u64, month("2026-11"));
                assert!(
                    matches!(e, RestoreError::MissingConnectionSegments { month, written, found }
                        if month == nov && (written.segments, written.keys) == (2, conns as u64)
                            && (found.segments, found.keys) == (1, conns as u64 - capacity)),
                    "{e:?}"
                );
            }
        }
    }

    /// A compacted changelog: the latest value of each key.
    type Log = BTreeMap<StateKey, Vec<u8>>;

    fn commit(log: &mut Log, records: &[StateRecord]) {
        for record in records {
            match &record.value {
                Some(value) => log.insert(record.key, value.clone()),
                None => log.remove(&record.key),
            };
        }
    }

    fn restore(log: &Log) -> Result<Meter, RestoreError> {
        Meter::restore(limited(), log.iter().map(|(key, value)| (*key, value.clone())))
    }

    /// Exact up to the smallest limit, so that counts turn into sketches.
    fn limited() -> MeterSettings {
        MeterSettings { exact_limit: ExactLimit::new(1_000).unwrap(), ..MeterSettings::default() }
    }

    fn is_missing(result: &Result<Meter, RestoreError>) -> bool {
        matches!(
            result,
            Err(RestoreError::MissingUserSegments { .. } | RestoreError::MissingConnectionSegments { .. })
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

        /// Segment totals raise no false alarm and miss no lost segment. A meter checkpointed
        /// after every step — logins of two apps in two months (segments merged and the
        /// merged ones deleted, days frozen and rewritten, counts past the limit turned into
        /// sketches and their segments deleted), connections counted, October closed and its
        /// records deleted — restores the same from the compacted changelog after each commit,
        /// and from every prefix of a commit's records (a reader stopping inside it) without a
        /// missing segment; the final state without any one of its segments is refused.
        #[test]
        fn segment_totals_raise_no_false_alarm_and_catch_any_lost_segment(
            steps in prop::collection::vec((0u8..4, 0u64..3_000, 1u64..300), 1..20),
        ) {
            let (oct, nov) = (month("2026-10"), month("2026-11"));
            let mut meter = Meter::new(limited());
            let mut log = Log::new();
            for (kind, start, n) in steps {
                let day = 1 + start % 5;
                match kind {
                    0 | 1 => {
                        let (app_id, m) = if kind == 0 { (1, "11") } else { (2, "10") };
                        let at = format!("2026-{m}-{day:02}T10:00:00+08:00");
                        for user in start..start + n {
                            meter.apply(&login_at(app_id, user, &at));
                        }
                    }
                    2 => {
                        let m = if start % 2 == 0 { "10" } else { "11" };
                        let (from, until) =
                            (format!("2026-{m}-{day:02}T10:00:00+08:00"), format!("2026-{m}-{day:02}T11:00:00+08:00"));
                        let until = Timestamp::parse_rfc3339(&until).unwrap();
                        for i in start..start + n {
                            let name = format!("c{i}");
                            meter.apply(&connect(1, &name, &from));
                            let conn = crate::ingest::ConnKey::of(&name);
                            meter.apply(&UsageEvent { app_id: 1, ts: until, action: Action::Disconnect { conn } });
                        }
                    }
                    _ => {
                        meter.close_month(oct);
                    }
                }
                let records = meter.checkpoint();
                // Only no missing segment: a prefix of a commit can be refused for another
                // reason (e.g. a day's segments written before its count record).
                for cut in 0..records.len() {
                    let mut partial = log.clone();
                    commit(&mut partial, &records[..cut]);
                    let restored = restore(&partial);
                    let why = restored.as_ref().err();
                    prop_assert!(!is_missing(&restored), "{} of {} records: {:?}", cut, records.len(), why);
                }
                commit(&mut log, &records);
                let mut restored = restore(&log).expect("the whole state restores");
                for m in [oct, nov] {
                    prop_assert_eq!(restored.usage_in(m), meter.usage_in(m));
                }
                prop_assert_eq!(restored.connections(), meter.connections());
            }
            let segments: Vec<StateKey> = log
                .keys()
                .filter(|key| matches!(key, StateKey::Users { .. } | StateKey::CountedConnections { .. }))
                .copied()
                .collect();
            for lost in segments {
                let mut damaged = log.clone();
                damaged.remove(&lost);
                let restored = restore(&damaged);
                prop_assert!(is_missing(&restored), "without {:?}: {:?}", lost, restored.map(|_| "restored"));
            }
        }
    }

    #[test]
    fn passing_the_developer_cap_is_reported_once_with_its_day() {
        let mut meter = Meter::new(MeterSettings::default());
        // The 100 users of November 5, the last of them first on the 9th (arriving first).
        meter.apply(&login_at(1, QUOTA_WATCH - 1, "2026-11-09T10:00:00+08:00"));
        for u in 0..QUOTA_WATCH {
            meter.apply(&login(1, u));
            meter.apply(&login(1, u));
        }
        assert!(meter.take_quota_crossings().is_empty(), "100 users is not over the cap");
        // The 101st logs in on the 7th: the month passed 100 users that day, whatever the
        // order the logins came in.
        meter.apply(&login_at(1, QUOTA_WATCH, "2026-11-07T10:00:00+08:00"));
        let nov: Month = "2026-11".parse().expect("valid");
        let crossing = QuotaCrossing { app_id: 1, month: nov, day: nov.day(7).expect("a day") };
        assert_eq!(meter.take_quota_crossings(), vec![crossing]);
        meter.apply(&login(1, QUOTA_WATCH + 1));
        assert!(meter.take_quota_crossings().is_empty());
        // A restored meter is already past the cap: no second report.
        let state = meter.checkpoint().into_iter().filter_map(|r| r.value.map(|v| (r.key, v)));
        let mut restored = Meter::restore(MeterSettings::default(), state).expect("restores");
        restored.apply(&login(1, QUOTA_WATCH + 2));
        assert!(restored.take_quota_crossings().is_empty());
    }

    #[test]
    fn an_app_month_beyond_the_bound_is_refused_and_changes_nothing() {
        let mut meter = Meter::new(MeterSettings { max_app_months: Some(2), ..streaming() });
        assert_eq!(meter.apply(&login_at(1, 1, "2026-10-01T00:00:00Z")), Outcome::Accepted);
        assert_eq!(meter.apply(&login_at(2, 1, "2026-10-01T00:00:00Z")), Outcome::Accepted);
        let watermark = meter.watermark();
        assert_eq!(meter.apply(&login_at(3, 1, "2026-10-02T00:00:00Z")), Outcome::TooManyApps);
        assert_eq!((meter.app_months(), meter.watermark()), (2, watermark), "nothing changed");
        // The apps it holds go on counting.
        assert_eq!(meter.apply(&login_at(2, 2, "2026-10-02T00:00:00Z")), Outcome::Accepted);
        assert_eq!(meter.aggregate(2, month("2026-10")).and_then(|a| a.exact_mau()), Some(2));
    }
}
