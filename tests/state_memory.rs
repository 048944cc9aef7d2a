//! What an open app-month costs in memory, measured with a counting allocator: a day's
//! users are held as days of the month's users, not as sets of their own.
//!
//! Its own test binary (one test), so that no other test allocates while it measures.

use std::collections::BTreeMap;

use im_meter_core::aggregate::{
    AppMonthAggregate, Counting, SegmentUsers, StateKey, StateRecord, UserSegment,
};
use im_meter_core::ingest::UserKey;
use im_meter_core::time::Month;

#[path = "../benches/counting_alloc.rs"]
mod counting_alloc;
use counting_alloc::live;

/// Heap bytes per monthly user that `aggregate` holds: what dropping it frees.
fn heap_per_user(aggregate: AppMonthAggregate, users: u64) -> f64 {
    let before = live();
    drop(aggregate);
    (before - live()) as f64 / users as f64
}

const USERS: u64 = 20_000;
/// Days each user logs in on: 6 of 30, so a day's users are a fifth of the month's.
const ACTIVE_DAYS: u64 = 6;

/// Each day's logins of a month where every user logs in on `ACTIVE_DAYS` days.
fn logins_of_day(month: Month, day: u32) -> impl Iterator<Item = UserKey> {
    let days = u64::from(month.days());
    (0..USERS)
        .filter(move |u| (0..ACTIVE_DAYS).any(|k| (u * 7 + k * 5) % days + 1 == u64::from(day)))
        .map(|u| UserKey::of(&format!("user-{u}")))
}

/// A compacted changelog: the latest value of each key.
fn apply(log: &mut BTreeMap<StateKey, Vec<u8>>, records: Vec<StateRecord>) {
    for StateRecord { key, value } in records {
        match value {
            Some(value) => log.insert(key, value),
            None => log.remove(&key),
        };
    }
}

fn rebuild(log: &BTreeMap<StateKey, Vec<u8>>) -> AppMonthAggregate {
    let month = log.iter().find(|(k, _)| matches!(k, StateKey::AppMonth { .. })).expect("m/ record").1;
    let days = log.iter().filter(|(k, _)| matches!(k, StateKey::AppMonthDay { .. })).map(|(_, v)| &v[..]);
    let users = log.iter().filter_map(|(k, v)| match k {
        StateKey::Users { count, segment, .. } => Some((*count, *segment, &v[..])),
        _ => None,
    });
    AppMonthAggregate::from_parts(month, days, users).expect("readable")
}

/// A month of 20,000 users, each active on 6 of its 30 days (140,000 counted entries: the
/// MAU's and six days'). As sets of 8-byte hashes that is 57 bytes per monthly user; as the
/// month's users with a bit per day, about 13, plus, in a worker, the keys of the segments
/// its recent checkpoints wrote (the month's and the latest day's). The usage API's view of
/// the same changelog holds the table too (its segments would take ~45 bytes).
#[test]
fn a_day_s_users_cost_bits_of_the_month_s_not_a_set_of_their_own() {
    let month: Month = "2026-11".parse().unwrap();
    let grid = im_meter_core::aggregate::SampleGrid::new(std::time::Duration::from_secs(60)).unwrap();

    // As replay holds it (never checkpointed).
    let mut replayed = AppMonthAggregate::new(Counting::default(), false);
    // As a worker holds it: a checkpoint after each day's logins.
    let mut metered = AppMonthAggregate::new(Counting::default(), false);
    let mut log = BTreeMap::new();
    for day in 1..=month.days() {
        for user in logins_of_day(month, day) {
            replayed.record_login(month.day(day).unwrap(), user);
            metered.record_login(month.day(day).unwrap(), user);
        }
        apply(&mut log, metered.checkpoint(1, month));
    }
    let usage = replayed.usage(1, month, grid);
    assert_eq!(usage.mau, USERS);
    assert_eq!(metered.usage(1, month, grid), usage);
    let mut restored = rebuild(&log);
    assert_eq!(restored.usage(1, month, grid), usage);
    // A restore reads its days back as bits too, and checkpoints on from there.
    restored.record_login(month.day(30).unwrap(), UserKey::of("one more"));
    apply(&mut log, restored.checkpoint(1, month));
    assert_eq!(rebuild(&log).usage(1, month, grid).mau, USERS + 1);

    // What the usage API's view keeps of the changelog: the users its segments hold, as a
    // table, instead of the segments' bytes.
    let before = live();
    let mut written = SegmentUsers::default();
    let mut segment_bytes = 0;
    for (key, value) in &log {
        if let StateKey::Users { count, .. } = key {
            written.add(&UserSegment::read(*count, value).expect("readable"));
            segment_bytes += value.len();
        }
    }
    let view = (live() - before) as f64 / USERS as f64;
    let segments = segment_bytes as f64 / USERS as f64;
    let month_record = log.iter().find(|(k, _)| matches!(k, StateKey::AppMonth { .. })).expect("m/").1;
    let days = log.iter().filter(|(k, _)| matches!(k, StateKey::AppMonthDay { .. })).map(|(_, v)| &v[..]);
    let mut shown = AppMonthAggregate::from_written(month_record, days, &written).expect("readable");
    assert_eq!(shown.usage(1, month, grid).mau, USERS + 1);
    eprintln!("the view: {view:.1} heap bytes per monthly user, against {segments:.1} of segments");
    assert!(view <= 16.0, "the view: {view:.1} heap bytes per monthly user ({segments:.1} as segments)");

    // Past the exact limit the MAU is a sketch; the days, each under the limit, stay bits of
    // the month's users as long as that is the cheaper form (here: six days a user).
    let counting = Counting {
        exact_limit: im_meter_core::aggregate::ExactLimit::new(10_000).unwrap(),
        ..Counting::default()
    };
    let mut past_limit = AppMonthAggregate::new(counting, false);
    for day in 1..=month.days() {
        logins_of_day(month, day).for_each(|user| past_limit.record_login(month.day(day).unwrap(), user));
    }
    let usage = past_limit.usage(1, month, grid);
    assert!(!usage.mau_counted.is_exact() && usage.dau_peak_counted.is_exact(), "{usage:?}");
    let past_limit = heap_per_user(past_limit, USERS);
    eprintln!("past the limit: {past_limit:.1} heap bytes per monthly user");
    assert!(
        past_limit <= 16.0 + 40_000.0 / USERS as f64,
        "past the limit: {past_limit:.1} heap bytes per monthly user"
    );

    let replayed = heap_per_user(replayed, USERS);
    let metered = heap_per_user(metered, USERS);
    let restored = heap_per_user(restored, USERS);
    eprintln!(
        "heap bytes per monthly user: replay {replayed:.1}, worker {metered:.1}, restored {restored:.1}"
    );
    assert!(replayed <= 16.0, "replay: {replayed:.1} heap bytes per monthly user");
    assert!(metered <= 28.0, "worker: {metered:.1} heap bytes per monthly user");
    assert!(restored <= 28.0, "restored: {restored:.1} heap bytes per monthly user");
}
