//! How many bytes of state one app-month takes, in memory and encoded.
//!
//! Builds an [`AppMonthAggregate`] (exact counts at the default limit, precision 14 past it)
//! for apps with 10, 100, 10,000 and 1,000,000 distinct users, every user logging in on 5
//! different days of the month (so per-day DAU counts exist as well as the MAU), plus a "busy
//! PCC timeline": random 1–240 minute connections at 60 s sampling until the timeline has
//! ~40,000 change points, alone and on top of the 1M-user app.
//!
//! Heap bytes are measured with a counting `#[global_allocator]` wrapped around
//! [`std::alloc::System`]: live bytes after building minus live bytes before (so only what
//! the aggregate still holds counts, not temporaries). Columns:
//!
//! - `live heap`: the aggregate as the meter holds it while the month is open;
//! - `flushed`: the same after `encode()` flushed its counts (buffered keys merged);
//! - `decoded`: a fresh aggregate decoded from the encoded bytes;
//! - `peak`: the highest live heap while building (transient buffers included);
//! - `encoded`: `encode().len()`, the bytes of a closed month's usage share;
//! - `B/user`: live heap and encoded bytes divided by the number of users.
//!
//! A second table measures the connection table ([`ConnectionTable`]): a month of
//! checkpoints (`commits` of them, each after `N / commits` connections opened and closed,
//! all ending in the month) with the changelog kept as compaction leaves it. Columns:
//!
//! - `heap B/conn`: live heap of the table holding the counted connections, per connection
//!   (built in a run of its own, the checkpoints' records dropped);
//! - `k/ records`: segment records left in the compacted changelog at month end, and per
//!   10,000 connections;
//! - `max record B`: the largest segment record written;
//! - `written MB`: all segment bytes written over the month (merges rewrite some);
//! - `restore ms`: rebuilding a table from the segments left.
//!
//! Further tables: one exact user set at 10 to 1,000,000 users (`user-sets`), and a busy
//! app's month of checkpoints (`busy-app`, see [`busy_app_table`]).
//!
//! Not a criterion benchmark: it prints its tables and exits (under a minute). Run with:
//!
//! ```text
//! cargo bench -p im-meter-core --bench state_size
//! cargo bench -p im-meter-core --bench state_size -- connections   # one table
//! cargo bench -p im-meter-core --bench state_size -- user-sets     # exact user sets
//! cargo bench -p im-meter-core --bench state_size -- busy-app      # checkpoints of a busy app
//! ```

use std::io::Write as _;
use std::time::{Duration, Instant};

use std::collections::BTreeMap;

use im_meter_core::aggregate::connections::ConnectionTable;
use im_meter_core::aggregate::pcc::MonthSamples;
use im_meter_core::aggregate::user_set::UserSet;
use im_meter_core::aggregate::{AppMonthAggregate, Counting, Precision, SampleGrid, StateKey};
use im_meter_core::ingest::{ConnKey, UserKey};
use im_meter_core::time::{BillingTz, Month, Timestamp};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[path = "counting_alloc.rs"]
mod counting_alloc;
use counting_alloc::live;

/// Heap bytes `build` leaves allocated (its result kept alive), and the peak above the start.
fn measure<T>(build: impl FnOnce() -> T) -> (T, isize, isize) {
    let before = live();
    counting_alloc::reset_peak();
    let value = build();
    let after = live();
    (value, after - before, counting_alloc::peak() - before)
}

/// The key of `user-{n}`, hashed without touching the heap.
fn user(n: u64) -> UserKey {
    let mut buf = [0u8; 32];
    let mut w = &mut buf[..];
    write!(w, "user-{n}").expect("fits");
    let len = 32 - w.len();
    UserKey::of(std::str::from_utf8(&buf[..len]).expect("ascii"))
}

const LOGIN_DAYS: u32 = 5;
const PCC_CHANGE_POINTS: usize = 40_000;

/// The `k`-th login day (1-based) of user `u`: 5 distinct days, spread over the month.
fn login_day(u: u64, k: u32, days: u32) -> u32 {
    ((u * 7 + u64::from(k) * 6) % u64::from(days)) as u32 + 1
}

/// Number of days with at least one login, i.e. of DAU sketches (the pattern repeats
/// every `days` users).
fn dau_days(users: u64, days: u32) -> usize {
    let mut seen = [false; 32];
    for u in 0..users.min(u64::from(days)) {
        for k in 0..LOGIN_DAYS {
            seen[login_day(u, k, days) as usize] = true;
        }
    }
    seen.iter().filter(|&&s| s).count()
}

struct Case {
    name: &'static str,
    users: u64,
    busy_pcc: bool,
}

fn build(case: &Case, month: Month) -> AppMonthAggregate {
    let mut agg = AppMonthAggregate::new(Counting::default(), false);
    let days = month.days();
    for u in 0..case.users {
        let key = user(u);
        // 5 distinct days per user, spread over the month.
        for k in 0..LOGIN_DAYS {
            agg.record_login(month.day(login_day(u, k, days)).expect("valid day"), key);
        }
    }
    if case.busy_pcc {
        let mut rng = StdRng::seed_from_u64(7);
        let tz = BillingTz::default();
        let grid = SampleGrid::new(Duration::from_secs(60)).expect("60 s");
        let samples = MonthSamples::new(grid, tz.start_of_month(month), tz.end_of_month(month));
        while agg.pcc().change_points() < PCC_CHANGE_POINTS {
            let from = rng.gen_range(samples.first..samples.end);
            let until = from + rng.gen_range(1..=240);
            agg.pcc_mut().add_connection(samples, from, Some(until));
        }
    }
    agg
}

fn per_user(bytes: isize, users: u64) -> String {
    if users == 0 {
        "-".to_string()
    } else {
        format!("{:.1}", bytes as f64 / users as f64)
    }
}

/// A month of connections and checkpoints: `connections` connections of 100 apps, each
/// opened and closed within the month, the table checkpointed `commits` times at even
/// intervals.
struct ConnCase {
    connections: u64,
    commits: u64,
}

/// Opens and closes connection `i` of `n`, ending at its share of the month.
fn open_and_close(table: &mut ConnectionTable, i: u64, n: u64, month: Month) {
    let tz = BillingTz::default();
    let (start, end) = (tz.start_of_month(month).millis(), tz.end_of_month(month).millis());
    let until = start + ((end - start - 1) as u128 * u128::from(i) / u128::from(n.max(1))) as i64;
    // Connection ids as the decoder hashes them: uniformly spread 64-bit keys.
    let conn = ConnKey(xorshift(i + 1));
    let app = 1_400_000_000 + i % 100;
    table.connect(app, conn, Timestamp(until - 60_000));
    table.disconnect(app, conn, Timestamp(until));
}

/// A fixed, well-mixed 64-bit function of `x` (splitmix64), so keys need no allocation.
fn xorshift(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn new_table() -> ConnectionTable {
    ConnectionTable::new(BillingTz::default())
}

/// Runs a month of `case`; `log` receives every segment write (`Some`) and delete (`None`).
fn run_month(case: &ConnCase, month: Month, mut log: impl FnMut(u64, Option<Vec<u8>>)) -> ConnectionTable {
    let mut table = new_table();
    let per_commit = case.connections.div_ceil(case.commits.max(1));
    let mut i = 0;
    while i < case.connections {
        for _ in 0..per_commit.min(case.connections - i) {
            open_and_close(&mut table, i, case.connections, month);
            i += 1;
        }
        for (segment, bytes) in table.take_changes().segments {
            log(segment, bytes);
        }
    }
    table
}

fn connection_table(month: Month) {
    let cases = [
        ConnCase { connections: 1_000_000, commits: 10_000 },
        ConnCase { connections: 1_000_000, commits: 100_000 },
        ConnCase { connections: 100_000, commits: 10_000 },
    ];
    println!();
    println!("counted connections over a month of checkpoints, all ending in {month}");
    println!(
        "{:>11} {:>8} {:>12} {:>11} {:>12} {:>13} {:>11} {:>11} {:>7}",
        "connections",
        "commits",
        "heap B/conn",
        "k/ records",
        "per 10k conn",
        "max record B",
        "written MB",
        "restore ms",
        "secs"
    );
    for case in &cases {
        let started = Instant::now();
        let (table, heap, _) = measure(|| run_month(case, month, |_, _| {}));
        drop(table);
        let mut changelog: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        let (mut written, mut largest) = (0usize, 0usize);
        let table = run_month(case, month, |segment, bytes| match bytes {
            Some(bytes) => {
                written += bytes.len();
                largest = largest.max(bytes.len());
                changelog.insert(segment, bytes);
            }
            None => {
                changelog.remove(&segment);
            }
        });
        let restore_started = Instant::now();
        let mut restored = new_table();
        for (&segment, bytes) in &changelog {
            restored.restore_segment(segment, bytes).expect("our own segment");
        }
        let restore_ms = restore_started.elapsed().as_secs_f64() * 1e3;
        assert_eq!(restored.len(), table.len(), "the restore holds every counted connection");
        println!(
            "{:>11} {:>8} {:>12.1} {:>11} {:>12.2} {:>13} {:>11.1} {:>11.1} {:>7.2}",
            case.connections,
            case.commits,
            heap as f64 / case.connections as f64,
            changelog.len(),
            changelog.len() as f64 * 10_000.0 / case.connections as f64,
            largest,
            written as f64 / 1e6,
            restore_ms,
            started.elapsed().as_secs_f64()
        );
    }
}

fn main() {
    // `cargo bench` passes `--bench`; a filter `app-month` or `connections` runs one table.
    let filter = std::env::args().skip(1).find(|a| !a.starts_with("--"));
    let month: Month = "2026-11".parse().expect("valid month");
    if filter.is_none() || filter.as_deref() == Some("app-month") {
        app_month_table(month);
    }
    if filter.is_none() || filter.as_deref() == Some("connections") {
        connection_table(month);
    }
    if filter.is_none() || filter.as_deref() == Some("user-sets") {
        user_set_table();
    }
    if filter.is_none() || filter.as_deref() == Some("busy-app") {
        busy_app_table(month);
    }
}

/// A busy app's month of checkpoints: `users` distinct users, each logging in on
/// [`LOGIN_DAYS`] days, in day order, a checkpoint after every `per_commit` logins; the
/// changelog kept as compaction leaves it. What each commit writes for the app-month (all
/// its records: `m/`, the changed days' `d/`, the user segments `e/`), against rewriting
/// its counts whole, and what a restore reads at the month's end.
fn busy_app_table(month: Month) {
    println!();
    println!("a busy app's checkpoints over a month (exact counts, {LOGIN_DAYS} login days per user)");
    println!(
        "{:>9} {:>8} {:>10} {:>12} {:>12} {:>12} {:>12} {:>9} {:>10} {:>11}",
        "users",
        "commits",
        "logins/c",
        "mean B/c",
        "max B/c",
        "whole B/c",
        "max rec B",
        "records",
        "restore ms",
        "heap B/entry"
    );
    for (users, per_commit) in [(100_000u64, 1_000usize), (1_000_000, 5_000)] {
        let days = month.days();
        let mut logins: Vec<(u32, u64)> =
            (0..users).flat_map(|u| (0..LOGIN_DAYS).map(move |k| (login_day(u, k, days), u))).collect();
        logins.sort_unstable();
        let mut agg = AppMonthAggregate::new(Counting::default(), false);
        let mut log: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        let (mut commits, mut written, mut max_commit, mut max_record) = (0usize, 0usize, 0usize, 0usize);
        for chunk in logins.chunks(per_commit) {
            for &(day, u) in chunk {
                agg.record_login(month.day(day).expect("valid day"), user(u));
            }
            let mut bytes = 0;
            for record in agg.checkpoint(1, month) {
                let key = record.key.to_bytes();
                match record.value {
                    Some(value) => {
                        bytes += key.len() + value.len();
                        max_record = max_record.max(value.len());
                        log.insert(key, value);
                    }
                    None => {
                        log.remove(&key);
                    }
                }
            }
            commits += 1;
            written += bytes;
            max_commit = max_commit.max(bytes);
        }
        // Rewriting the counts whole instead: the MAU's set and one (average) day's.
        let mut mau = UserSet::new();
        (0..users).for_each(|u| {
            mau.insert(user(u).0);
        });
        let mau_bytes = mau.encode().len();
        let whole_commit = mau_bytes + mau_bytes * LOGIN_DAYS as usize / days as usize;
        let started = Instant::now();
        let records: Vec<(StateKey, &[u8])> =
            log.iter().map(|(k, v)| (StateKey::from_bytes(k).expect("a state key"), &v[..])).collect();
        let month_record =
            records.iter().find(|(k, _)| matches!(k, StateKey::AppMonth { .. })).expect("m/").1;
        let day_records =
            records.iter().filter(|(k, _)| matches!(k, StateKey::AppMonthDay { .. })).map(|r| r.1);
        let user_records = records.iter().filter_map(|(k, v)| match k {
            StateKey::Users { count, segment, .. } => Some((*count, *segment, *v)),
            _ => None,
        });
        let mut restored =
            AppMonthAggregate::from_parts(month_record, day_records, user_records).expect("restores");
        let restore_ms = started.elapsed().as_secs_f64() * 1000.0;
        assert_eq!(restored.encode(), agg.encode(), "the records give the aggregate back");
        // The live aggregate's heap (what dropping it frees), per counted entry: the MAU's
        // and each login day's.
        drop((restored, records));
        let with = live();
        drop(agg);
        let per_entry = (with - live()) as f64 / (users * (1 + u64::from(LOGIN_DAYS))) as f64;
        println!(
            "{:>9} {:>8} {:>10} {:>12} {:>12} {:>12} {:>12} {:>9} {:>10.1} {:>11.2}",
            users,
            commits,
            per_commit,
            written / commits,
            max_commit,
            whole_commit,
            max_record,
            log.len(),
            restore_ms,
            per_entry
        );
    }
}

/// Exact sets of user hashes ([`UserSet`]): heap and encoded bytes per user, and inserts a
/// second, at the sizes issue 10 names.
fn user_set_table() {
    println!();
    println!("exact user sets (64-bit user hashes)");
    println!(
        "{:>9} {:>12} {:>10} {:>12} {:>10} {:>12} {:>14}",
        "users", "heap B", "heap B/usr", "encoded B", "enc B/usr", "peak B", "inserts/s"
    );
    for users in [10u64, 1_000, 100_000, 1_000_000] {
        let started = Instant::now();
        let (set, heap, peak) = measure(|| {
            let mut set = UserSet::new();
            for n in 0..users {
                set.insert(user(n).0);
            }
            set
        });
        let rate = users as f64 / started.elapsed().as_secs_f64();
        let encoded = set.encode().len();
        println!(
            "{:>9} {:>12} {:>10.2} {:>12} {:>10.2} {:>12} {:>14.0}",
            users,
            heap,
            heap as f64 / users as f64,
            encoded,
            encoded as f64 / users as f64,
            peak,
            rate
        );
    }
}

fn app_month_table(month: Month) {
    let cases = [
        Case { name: "users-10", users: 10, busy_pcc: false },
        Case { name: "users-100", users: 100, busy_pcc: false },
        Case { name: "users-10k", users: 10_000, busy_pcc: false },
        Case { name: "users-1M", users: 1_000_000, busy_pcc: false },
        Case { name: "busy-pcc", users: 0, busy_pcc: true },
        Case { name: "users-1M+busy-pcc", users: 1_000_000, busy_pcc: true },
    ];
    println!(
        "app-month state at precision {}, {LOGIN_DAYS} login days per user, 60 s PCC grid",
        Precision::default().get()
    );
    println!(
        "{:<18} {:>9} {:>4} {:>7} {:>12} {:>12} {:>12} {:>12} {:>10} {:>10} {:>10} {:>7}",
        "case",
        "users",
        "DAUs",
        "PCC pts",
        "live heap B",
        "flushed B",
        "decoded B",
        "peak B",
        "encoded B",
        "heap B/usr",
        "enc B/usr",
        "secs"
    );
    for case in &cases {
        let started = Instant::now();
        let (mut agg, live_heap, peak) = measure(|| build(case, month));
        let before_encode = live();
        let bytes = agg.encode();
        let encoded = bytes.len();
        let flushed = live() - before_encode - bytes.capacity() as isize + live_heap;
        let (decoded, decoded_heap, _) = measure(|| AppMonthAggregate::decode(&bytes).expect("round trip"));
        let mut decoded = decoded;
        let figures =
            decoded.usage(case.users, month, SampleGrid::new(Duration::from_secs(60)).expect("60 s"));
        println!(
            "{:<18} {:>9} {:>4} {:>7} {:>12} {:>12} {:>12} {:>12} {:>10} {:>10} {:>10} {:>7.2}",
            case.name,
            case.users,
            dau_days(case.users, month.days()),
            agg.pcc().change_points(),
            live_heap,
            flushed,
            decoded_heap,
            peak,
            encoded,
            per_user(live_heap, case.users),
            per_user(encoded as isize, case.users),
            started.elapsed().as_secs_f64()
        );
        // Sanity: the counts hold what was inserted (exact here).
        assert_eq!(figures.mau, case.users, "{}", case.name);
    }
}
