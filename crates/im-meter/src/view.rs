//! The metering view: the month-to-date state of the events partitions this worker holds,
//! as last committed — what the usage API and the per-app metrics read.
//!
//! The metering stages publish into it; readers never touch a stage. A stage notes a
//! partition assigned (not readable yet), restored (the app-month records it read back from
//! the changelog) or revoked, and after each transaction that committed, the app-month
//! records it wrote (the same bytes as in the changelog; user segments are added to a table
//! of the app-month's users rather than kept). So the view always shows state
//! that is durable in Kafka, at most one commit behind the stage, and a reader holds its
//! lock only to copy a few shared buffers: never across a broker round trip, a restore or a
//! commit.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};

use im_meter_core::aggregate::{
    AppMonthAggregate, CodecError, MonthlyUsage, SampleGrid, SegmentUsers, StateKey, UserSegment,
};
use im_meter_core::plan::AppId;
use im_meter_core::time::Month;

/// An app-month record as written to the changelog (shared, never copied).
pub type StateBytes = Arc<[u8]>;

/// One app-month of one partition: its month and day records, the users its user segments
/// hold (a table, not the segments: a third of their bytes at a fifth of the monthly users
/// active a day), and its figures once computed.
#[derive(Default, Clone)]
struct Stored {
    month: Option<StateBytes>,
    days: BTreeMap<u8, StateBytes>,
    /// Shared with readers, who build the aggregate outside the lock (a commit that finds
    /// one still reading copies it).
    users: Arc<SegmentUsers>,
    /// Why a segment could not be read, if one could not: the app-month cannot be shown.
    damaged: Option<CodecError>,
    /// Its usage, computed on first use (the per-app metrics ask for every app).
    usage: OnceLock<Option<MonthlyUsage>>,
}

impl Stored {
    fn aggregate(&self) -> Result<Option<AppMonthAggregate>, CodecError> {
        if let Some(damage) = &self.damaged {
            return Err(damage.clone());
        }
        let Some(month) = &self.month else { return Ok(None) };
        AppMonthAggregate::from_written(month, self.days.values().map(|d| &d[..]), &self.users).map(Some)
    }
}

/// One events partition as a stage published it.
struct PartitionView {
    /// The metering consumer (of this worker) that holds it.
    member: usize,
    /// Whether its state has been restored (before that, it cannot be read).
    restored: bool,
    months: BTreeMap<(AppId, Month), Stored>,
}

/// A partition held here, as the usage API reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    /// The events partition.
    pub partition: i32,
    /// Whether its state can be read (restored).
    pub restored: bool,
}

/// See the module documentation.
#[derive(Default)]
pub struct MeterView {
    partitions: RwLock<BTreeMap<i32, PartitionView>>,
}

/// An app-month record a commit wrote (`None`: deleted).
pub type ViewUpdate = (i32, StateKey, Option<StateBytes>);

impl MeterView {
    fn read(&self) -> RwLockReadGuard<'_, BTreeMap<i32, PartitionView>> {
        self.partitions.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, BTreeMap<i32, PartitionView>> {
        self.partitions.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Consumer `member` was assigned `partition`: held, not readable until restored.
    pub fn assigned(&self, member: usize, partition: i32) {
        self.write().insert(partition, PartitionView { member, restored: false, months: BTreeMap::new() });
    }

    /// Consumer `member` lost `partition` (another consumer of this worker may hold it now).
    pub fn revoked(&self, member: usize, partition: i32) {
        let mut partitions = self.write();
        if partitions.get(&partition).is_some_and(|v| v.member == member) {
            partitions.remove(&partition);
        }
    }

    /// `partition` was restored from these records (any state key; app-months are kept).
    pub fn restored(
        &self,
        member: usize,
        partition: i32,
        records: impl IntoIterator<Item = (StateKey, StateBytes)>,
    ) {
        let mut view = PartitionView { member, restored: true, months: BTreeMap::new() };
        for (key, value) in records {
            let record = Record::read(&key, Some(value));
            put(&mut view.months, key, record);
        }
        self.write().insert(partition, view);
    }

    /// A commit of these records succeeded.
    pub fn committed(&self, updates: Vec<ViewUpdate>) {
        if updates.is_empty() {
            return;
        }
        // Segments decoded before the lock is taken: readers wait only for their users to
        // be added.
        let records: Vec<(i32, StateKey, Record)> = updates
            .into_iter()
            .map(|(partition, key, value)| (partition, key, Record::read(&key, value)))
            .collect();
        let mut partitions = self.write();
        for (partition, key, record) in records {
            if let Some(view) = partitions.get_mut(&partition) {
                put(&mut view.months, key, record);
            }
        }
    }

    /// The partitions held here.
    pub fn held(&self) -> Vec<Held> {
        self.read().iter().map(|(&partition, v)| Held { partition, restored: v.restored }).collect()
    }

    /// The app's shares of `month`, one per partition holding any (decoded now, outside the
    /// lock), and whether the app has state in any month here.
    pub fn shares(
        &self,
        app_id: AppId,
        month: Month,
    ) -> Result<(Vec<(i32, AppMonthAggregate)>, bool), CodecError> {
        let mut found = Vec::new();
        let mut seen = false;
        let earliest = Month::new(i32::MIN, 1).expect("January is a month");
        {
            let partitions = self.read();
            for (&p, view) in partitions.iter() {
                seen |=
                    view.months.range((app_id, earliest)..).next().is_some_and(|((a, _), _)| *a == app_id);
                if let Some(stored) = view.months.get(&(app_id, month)) {
                    // Shared buffers: a copy of their handles, decoded outside the lock.
                    found.push((p, stored.clone()));
                }
            }
        }
        let mut shares = Vec::new();
        for (p, stored) in found {
            if let Some(aggregate) = stored.aggregate()? {
                shares.push((p, aggregate));
            }
        }
        Ok((shares, seen))
    }

    /// The usage so far of every app with state in `month`, per partition (an app spread
    /// over several partitions appears once per partition), and the shares of those spread
    /// apps, to merge.
    pub fn usage_in(&self, month: Month, grid: SampleGrid) -> Vec<MonthlyUsage> {
        let partitions = self.read();
        let mut usage = Vec::new();
        for view in partitions.values() {
            for ((app_id, m), stored) in &view.months {
                if *m != month {
                    continue;
                }
                let figures = stored.usage.get_or_init(|| {
                    stored.aggregate().ok().flatten().map(|mut a| a.usage(*app_id, month, grid))
                });
                usage.extend(figures.clone());
            }
        }
        usage
    }

    /// Every app-month share held of the apps `wanted` names in `month`.
    pub fn aggregates(
        &self,
        month: Month,
        wanted: &dyn Fn(AppId) -> bool,
    ) -> Vec<(AppId, AppMonthAggregate)> {
        let partitions = self.read();
        let mut found = Vec::new();
        for view in partitions.values() {
            for ((app_id, m), stored) in &view.months {
                if *m == month && wanted(*app_id) {
                    if let Ok(Some(aggregate)) = stored.aggregate() {
                        found.push((*app_id, aggregate));
                    }
                }
            }
        }
        found
    }

    /// The latest month with state here.
    pub fn latest_month(&self) -> Option<Month> {
        self.read().values().flat_map(|v| v.months.keys().map(|(_, m)| *m)).max()
    }
}

/// An app-month record as the view takes it: month and day records as their bytes, a user
/// segment read into its users (`None`: deleted).
enum Record {
    Bytes(Option<StateBytes>),
    Segment(Result<UserSegment, CodecError>),
}

impl Record {
    fn read(key: &StateKey, value: Option<StateBytes>) -> Self {
        match (key, value) {
            (StateKey::Users { count, .. }, Some(bytes)) => {
                Record::Segment(UserSegment::read(*count, &bytes))
            }
            (_, value) => Record::Bytes(value),
        }
    }
}

/// Puts one record into a partition's app-months (other state keys are not the view's).
fn put(months: &mut BTreeMap<(AppId, Month), Stored>, key: StateKey, record: Record) {
    let (app_id, month) = match key {
        StateKey::AppMonth { app_id, month }
        | StateKey::AppMonthDay { app_id, month, .. }
        | StateKey::Users { app_id, month, .. } => (app_id, month),
        _ => return,
    };
    let deleted = matches!(record, Record::Bytes(None));
    if deleted && matches!(key, StateKey::AppMonth { .. }) {
        months.remove(&(app_id, month));
        return;
    }
    // A deletion of a part of an app-month already gone leaves nothing behind.
    let stored = match deleted {
        false => months.entry((app_id, month)).or_default(),
        true => match months.get_mut(&(app_id, month)) {
            Some(stored) => stored,
            None => return,
        },
    };
    // Its figures change with it.
    stored.usage = OnceLock::new();
    match (key, record) {
        (StateKey::AppMonth { .. }, Record::Bytes(value)) => stored.month = value,
        (StateKey::AppMonthDay { day, .. }, Record::Bytes(Some(value))) => {
            stored.days.insert(day, value);
        }
        (StateKey::AppMonthDay { day, .. }, Record::Bytes(None)) => {
            stored.days.remove(&day);
        }
        (StateKey::Users { .. }, Record::Segment(Ok(segment))) => {
            Arc::make_mut(&mut stored.users).add(&segment)
        }
        (StateKey::Users { .. }, Record::Segment(Err(damage))) => stored.damaged = Some(damage),
        // Segments only add users to their count (`SegmentUsers`): a deleted one's are in
        // the segment that replaced it, or its count is a sketch now.
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use im_meter_core::aggregate::{AppMonthAggregate, Counting, StateKey};
    use im_meter_core::ingest::UserKey;
    use im_meter_core::time::Month;

    use super::*;

    /// The records of an app-month with `users` logged in on the 1st.
    fn records(app_id: AppId, month: Month, users: std::ops::Range<u32>) -> Vec<(StateKey, StateBytes)> {
        let mut agg = AppMonthAggregate::new(Counting::default(), false);
        for u in users {
            agg.record_login(month.day(1).unwrap(), UserKey::of(&format!("user-{u}")));
        }
        agg.checkpoint(app_id, month)
            .into_iter()
            .filter_map(|r| Some((r.key, StateBytes::from(r.value?))))
            .collect()
    }

    fn grid() -> SampleGrid {
        SampleGrid::new(std::time::Duration::from_secs(60)).unwrap()
    }

    fn mau(view: &MeterView, app_id: AppId, month: Month) -> Vec<(i32, u64)> {
        let (shares, _) = view.shares(app_id, month).unwrap();
        shares.into_iter().map(|(p, mut a)| (p, a.usage(app_id, month, grid()).mau)).collect()
    }

    #[test]
    fn the_view_shows_what_was_restored_and_committed_and_nothing_revoked() {
        let month: Month = "2026-12".parse().unwrap();
        let view = MeterView::default();
        view.assigned(0, 3);
        assert_eq!(view.held(), vec![Held { partition: 3, restored: false }]);
        view.restored(0, 3, records(7, month, 0..10));
        assert_eq!(view.held(), vec![Held { partition: 3, restored: true }]);
        assert_eq!(mau(&view, 7, month), vec![(3, 10)]);
        // A commit rewrites the app-month; the figures follow (the cached ones too).
        assert_eq!(view.usage_in(month, grid())[0].mau, 10);
        let update = records(7, month, 0..25).into_iter().map(|(k, v)| (3, k, Some(v))).collect();
        view.committed(update);
        assert_eq!(mau(&view, 7, month), vec![(3, 25)]);
        assert_eq!(view.usage_in(month, grid())[0].mau, 25);
        // A record of a partition not held is not the view's.
        view.committed(records(8, month, 0..5).into_iter().map(|(k, v)| (4, k, Some(v))).collect());
        assert!(view.shares(8, month).unwrap().0.is_empty());
        // Deleted once billed (a tombstone), then gone.
        view.committed(vec![(3, StateKey::AppMonth { app_id: 7, month }, None)]);
        let (shares, seen) = view.shares(7, month).unwrap();
        assert!(shares.is_empty() && !seen);
        // Only the consumer holding a partition lets go of it.
        view.revoked(1, 3);
        assert_eq!(view.held().len(), 1);
        view.revoked(0, 3);
        assert!(view.held().is_empty());
    }

    /// A segment that cannot be read makes its app-month unreadable (an error, not figures
    /// short of its users); the other app-months are shown.
    #[test]
    fn a_damaged_segment_is_an_error_not_fewer_users() {
        let month: Month = "2026-12".parse().unwrap();
        let view = MeterView::default();
        let mut written = records(7, month, 0..10);
        written.extend(records(8, month, 0..10));
        for (key, value) in written.iter_mut() {
            if matches!(key, StateKey::Users { app_id: 7, .. }) {
                *value = StateBytes::from(&b"\x01garbage"[..]);
            }
        }
        view.restored(0, 3, written);
        assert!(view.shares(7, month).is_err());
        assert_eq!(mau(&view, 8, month), vec![(3, 10)]);
    }

    /// The view keeps an app-month's users as a table fed by the segments written; through
    /// merges that delete segments, and past the exact limit (the MAU a sketch, its segments
    /// deleted; the days still exact), its figures and bytes are the meter's.
    #[test]
    fn the_view_follows_the_meter_s_counts_through_merges_and_past_the_limit() {
        use im_meter_core::aggregate::ExactLimit;
        let month: Month = "2026-12".parse().unwrap();
        let counting = Counting { exact_limit: ExactLimit::new(3_000).unwrap(), ..Counting::default() };
        let mut agg = AppMonthAggregate::new(counting, false);
        let view = MeterView::default();
        view.assigned(0, 1);
        view.restored(0, 1, Vec::new());
        for commit in 0..40u32 {
            for u in commit * 100..commit * 100 + 100 {
                agg.record_login(month.day(1 + u % 3).unwrap(), UserKey::of(&format!("user-{u}")));
            }
            let records = agg.checkpoint(7, month);
            view.committed(records.into_iter().map(|r| (1, r.key, r.value.map(StateBytes::from))).collect());
            let (mut shares, _) = view.shares(7, month).unwrap();
            let (_, shown) = &mut shares[0];
            assert_eq!(shown.usage(7, month, grid()), agg.usage(7, month, grid()), "after commit {commit}");
            assert_eq!(shown.encode(), agg.encode(), "after commit {commit}");
        }
        let usage = agg.usage(7, month, grid());
        assert!(!usage.mau_counted.is_exact() && usage.dau_peak_counted.is_exact(), "{usage:?}");
    }
}
