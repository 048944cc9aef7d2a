//! Criterion benchmarks of the core crate's hot paths, one group each:
//!
//! - `decode`: [`decode_usage_event`] over ~10k pre-generated NDJSON lines, a realistic
//!   mix (≈60 % login, connect/disconnect/heartbeat, some logout and group_stats; RFC 3339
//!   and epoch-millisecond timestamps, extra fields the decoder has to skip).
//! - `meter_apply`: [`Meter::apply`] over 100k pre-decoded, time-ordered events of 50 apps
//!   with a few thousand users each, over one billing month (2026-11, +08:00).
//! - `sketch`: [`UniqueUsers`] inserts into a sparse sketch (small app) and into a dense
//!   one (1M-user app, pre-filled), merge of two dense (and two sparse) sketches, estimate.
//! - `aggregate_codec`: [`AppMonthAggregate::encode`] / [`AppMonthAggregate::decode`] of a
//!   100k-user app-month with a busy PCC timeline (~40k change points at 60 s sampling).
//! - `bill_month`: [`bill_month`] pricing one app-month (current and original billing
//!   mode), and the `usage()` figures of the 100k-user aggregate that feed it.
//!
//! Throughput is reported in elements: events, user keys, sketches, aggregates or
//! app-months per second, as named in each benchmark's id.
//!
//! Run with:
//!
//! ```text
//! cargo bench -p im-meter-core --bench core
//! cargo bench -p im-meter-core --bench core -- sketch      # one group
//! ```
//!
//! Inputs are generated from fixed seeds, so runs are comparable.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, SamplingMode, Throughput};
use im_meter_core::aggregate::pcc::MonthSamples;
use im_meter_core::aggregate::{
    AppMonthAggregate, Counting, ExactLimit, Meter, MeterSettings, MonthlyUsage, SampleGrid, UniqueUsers,
};
use im_meter_core::bill::{bill_month, PriceBook, Subscriptions};
use im_meter_core::ingest::{
    decode_subscription_event, decode_usage_event, Action, ConnKey, UsageEvent, UserKey,
};
use im_meter_core::time::{BillingTz, Month, Timestamp};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const FIRST_APP: u64 = 1_400_000_001;
const MINUTE_MS: i64 = 60_000;

fn month() -> Month {
    "2026-11".parse().expect("valid month")
}

/// `[start, end)` of the benchmark month in the default billing zone, epoch ms.
fn month_bounds() -> (i64, i64) {
    let tz = BillingTz::default();
    (tz.start_of_month(month()).millis(), tz.end_of_month(month()).millis())
}

fn user(n: u64) -> UserKey {
    UserKey::of(&format!("user-{n}"))
}

/// `ts` as RFC 3339 in a few styles a producer might send (+08:00, Z, fractional seconds).
fn rfc3339(ms: i64, style: u32) -> String {
    let utc = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms).expect("in range");
    match style % 3 {
        0 => utc
            .with_timezone(&chrono::FixedOffset::east_opt(8 * 3600).unwrap())
            .format("%Y-%m-%dT%H:%M:%S%:z")
            .to_string(),
        1 => utc.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
        _ => utc.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
    }
}

// ---------------------------------------------------------------------------------------
// decode

/// ~10k NDJSON lines: 60 % login (a few failed), 11 % connect, 11 % disconnect,
/// 14 % heartbeat, 2 % logout, 2 % group_stats; half RFC 3339, half epoch-ms timestamps.
fn ndjson_lines(n: usize) -> Vec<Vec<u8>> {
    let mut rng = StdRng::seed_from_u64(1);
    let (start, end) = month_bounds();
    let platforms = ["ios", "android", "web", "windows", "mac"];
    (0..n)
        .map(|i| {
            let app = FIRST_APP + rng.gen_range(0..50);
            let ms = rng.gen_range(start..end);
            let ts = if rng.gen_bool(0.5) {
                ms.to_string()
            } else {
                format!("\"{}\"", rfc3339(ms, rng.gen()))
            };
            let uid = format!("u{}-{:06}", app % 1000, rng.gen_range(0..5_000));
            let cid = format!("conn-{:08x}", rng.gen::<u32>());
            let platform = platforms[rng.gen_range(0..platforms.len())];
            let roll: f64 = rng.gen();
            let line = if roll < 0.60 {
                let ok = if rng.gen_bool(0.03) { r#","ok":false"# } else { "" };
                format!(
                    r#"{{"id":"evt-{i}","type":"login","app_id":{app},"user_id":"{uid}","platform":"{platform}"{ok},"ts":{ts},"sdk_version":"8.4.6667"}}"#
                )
            } else if roll < 0.71 {
                format!(
                    r#"{{"id":"evt-{i}","type":"connect","app_id":{app},"user_id":"{uid}","conn_id":"{cid}","platform":"{platform}","ts":{ts}}}"#
                )
            } else if roll < 0.82 {
                format!(
                    r#"{{"id":"evt-{i}","type":"disconnect","app_id":{app},"conn_id":"{cid}","ts":{ts},"reason":"client_close"}}"#
                )
            } else if roll < 0.96 {
                format!(
                    r#"{{"type":"heartbeat","app_id":{app},"conn_id":"{cid}","ts":{ts}}}"#
                )
            } else if roll < 0.98 {
                format!(
                    r#"{{"id":"evt-{i}","type":"logout","app_id":{app},"user_id":"{uid}","ts":{ts}}}"#
                )
            } else {
                format!(
                    r#"{{"id":"evt-{i}","type":"group_stats","app_id":{app},"group_count":{},"ts":{ts}}}"#,
                    rng.gen_range(0..200_000)
                )
            };
            line.into_bytes()
        })
        .collect()
}

fn bench_decode(c: &mut Criterion) {
    let lines = ndjson_lines(10_000);
    for line in &lines {
        decode_usage_event(line).unwrap_or_else(|r| {
            panic!("{}: {r:?}", String::from_utf8_lossy(line));
        });
    }
    let bytes: usize = lines.iter().map(Vec::len).sum();
    eprintln!(
        "decode: {} lines, {bytes} bytes, {:.0} bytes/line",
        lines.len(),
        bytes as f64 / lines.len() as f64
    );
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(lines.len() as u64));
    g.bench_function("mixed_10k_events", |b| {
        b.iter(|| {
            for line in &lines {
                black_box(decode_usage_event(black_box(line)).ok());
            }
        })
    });
    // The two timestamp forms on the same login record, one line per iteration.
    let rfc = br#"{"id":"evt-1","type":"login","app_id":1400000001,"user_id":"u1-000042","platform":"ios","ts":"2026-11-03T16:15:00+08:00"}"#;
    let epoch = br#"{"id":"evt-1","type":"login","app_id":1400000001,"user_id":"u1-000042","platform":"ios","ts":1793693700000}"#;
    g.throughput(Throughput::Elements(1));
    g.bench_function("login_rfc3339", |b| b.iter(|| decode_usage_event(black_box(rfc))));
    g.bench_function("login_epoch_ms", |b| b.iter(|| decode_usage_event(black_box(epoch))));
    g.finish();
}

// ---------------------------------------------------------------------------------------
// meter_apply

/// ~100k events of one month, time-ordered: 50 apps with 1,000–5,900 users each (app `a`
/// has `1000 + 100·a`); ≈60 % logins (3 % failed), ≈1 % group_stats, connections of 1–120 minutes (5 % never closed) with
/// heartbeats every 5 minutes, a few group_stats.
fn month_of_events(target: usize) -> Vec<UsageEvent> {
    let mut rng = StdRng::seed_from_u64(2);
    let (start, end) = month_bounds();
    let apps: Vec<(u64, u64)> = (0..50u64).map(|a| (FIRST_APP + a, 1000 + 100 * a)).collect();
    let pick_app = |rng: &mut StdRng| apps[rng.gen_range(0..apps.len())];
    let mut events = Vec::with_capacity(target + 16);
    let mut conn_no = 0u64;
    while events.len() < target {
        let roll: f64 = rng.gen();
        let (app_id, users) = pick_app(&mut rng);
        let uid = user(app_id * 10_000_000 + rng.gen_range(0..users));
        let ts = rng.gen_range(start..end);
        if roll < 0.8 {
            events.push(UsageEvent {
                app_id,
                ts: Timestamp(ts),
                action: Action::Login { user: uid, ok: !rng.gen_bool(0.03) },
            });
        } else if roll < 0.805 {
            events.push(UsageEvent {
                app_id,
                ts: Timestamp(ts),
                action: Action::GroupStats { group_count: rng.gen_range(0..200_000) },
            });
        } else {
            // A connection: connect, heartbeats, disconnect ≈ 3.5 events on average.
            conn_no += 1;
            let conn = ConnKey::of(&format!("conn-{conn_no}"));
            let until = (ts + rng.gen_range(1..=120) * MINUTE_MS).min(end - 1);
            events.push(UsageEvent {
                app_id,
                ts: Timestamp(ts),
                action: Action::Connect { conn, user: uid },
            });
            let mut hb = ts + 5 * MINUTE_MS;
            while hb < until && rng.gen_bool(0.5) {
                events.push(UsageEvent { app_id, ts: Timestamp(hb), action: Action::Heartbeat { conn } });
                hb += 5 * MINUTE_MS;
            }
            if !rng.gen_bool(0.05) {
                events.push(UsageEvent { app_id, ts: Timestamp(until), action: Action::Disconnect { conn } });
            }
        }
    }
    events.sort_by_key(|e| e.ts);
    events
}

fn bench_meter_apply(c: &mut Criterion) {
    let events = month_of_events(100_000);
    let logins = events.iter().filter(|e| matches!(e.action, Action::Login { .. })).count();
    eprintln!(
        "meter_apply: {} events, {:.1} % logins",
        events.len(),
        100.0 * logins as f64 / events.len() as f64
    );

    let mut g = c.benchmark_group("meter_apply");
    g.sampling_mode(SamplingMode::Flat);
    g.measurement_time(Duration::from_secs(3));
    g.throughput(Throughput::Elements(events.len() as u64));
    g.bench_function("100k_events_50_apps", |b| {
        b.iter_batched(
            || Meter::new(MeterSettings::default()),
            |mut meter| {
                for e in &events {
                    black_box(meter.apply(e));
                }
                meter // dropped outside the timed section
            },
            BatchSize::LargeInput,
        )
    });
    // The same, then closing the month (open connections counted, aggregates handed out).
    g.bench_function("100k_events_50_apps_and_close", |b| {
        b.iter_batched(
            || Meter::new(MeterSettings::default()),
            |mut meter| {
                for e in &events {
                    black_box(meter.apply(e));
                }
                let closed = meter.close_month(month());
                (meter, closed)
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

// ---------------------------------------------------------------------------------------
// sketch

fn keys(range: std::ops::Range<u64>) -> Vec<UserKey> {
    range.map(user).collect()
}

/// A count of `keys`: exact at the default limit, a sketch past [`ExactLimit::MIN`] with
/// `sketched`.
fn sketch_of(keys: &[UserKey], sketched: bool) -> UniqueUsers {
    let counting = if sketched {
        Counting {
            exact_limit: ExactLimit::new(ExactLimit::MIN as i64).expect("the minimum"),
            ..Counting::default()
        }
    } else {
        Counting::default()
    };
    let mut s = UniqueUsers::new(counting);
    for &k in keys {
        s.insert(k);
    }
    s.flush();
    s
}

fn bench_sketch(c: &mut Criterion) {
    let small = keys(0..1_000);
    let small_b = keys(500..1_500);
    let million = keys(0..1_000_000);
    let fresh = keys(1_000_000..1_100_000);
    let mut dense = sketch_of(&million, true);
    let dense_b = sketch_of(&keys(500_000..1_500_000), true);
    let exact_a = sketch_of(&small, false);
    let exact_b = sketch_of(&small_b, false);
    drop(million);

    let mut g = c.benchmark_group("sketch");
    g.throughput(Throughput::Elements(small.len() as u64));
    // 1,000 distinct users into an empty count: stays exact (a hash set of recent users,
    // merged into the sorted part as it grows).
    g.bench_function("insert_exact_1k_users", |b| {
        b.iter_batched_ref(
            || UniqueUsers::new(Counting::default()),
            |s| {
                for &k in &small {
                    s.insert(k);
                }
            },
            BatchSize::SmallInput,
        )
    });
    // 1,000 repeat logins of users already in a small app's count.
    let mut warm = sketch_of(&small, false);
    g.bench_function("insert_exact_1k_repeats", |b| {
        b.iter(|| {
            for &k in &small {
                warm.insert(black_box(k));
            }
        })
    });
    g.throughput(Throughput::Elements(fresh.len() as u64));
    g.bench_function("insert_dense_100k_into_1m", |b| {
        b.iter(|| {
            for &k in &fresh {
                dense.insert(black_box(k));
            }
        })
    });
    g.throughput(Throughput::Elements(1));
    g.bench_function("merge_dense_dense", |b| {
        b.iter_batched_ref(
            || dense.clone(),
            |s| s.merge(&dense_b).expect("same precision"),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("merge_exact_exact_1k", |b| {
        b.iter_batched_ref(
            || exact_a.clone(),
            |s| {
                s.merge(&exact_b).expect("same precision");
                s.flush();
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("estimate_dense_1m", |b| b.iter(|| dense.estimate()));
    let mut exact_est = exact_a.clone();
    g.bench_function("estimate_exact_1k", |b| b.iter(|| exact_est.estimate()));
    g.finish();
}

// ---------------------------------------------------------------------------------------
// aggregate_codec

/// A 100k-user app-month: every user logs in on 3 days of the month; PCC gets random
/// 1–240 minute connections until the timeline has ≥ 40,000 change points (60 s grid).
fn big_aggregate() -> AppMonthAggregate {
    let mut rng = StdRng::seed_from_u64(3);
    let m = month();
    let mut agg = AppMonthAggregate::new(Counting::default(), false);
    for u in 0..100_000u64 {
        let key = user(u);
        for _ in 0..3 {
            let day = m.day(rng.gen_range(1..=m.days())).expect("valid day");
            agg.record_login(day, key);
        }
    }
    let (start, end) = month_bounds();
    let grid = SampleGrid::new(Duration::from_secs(60)).expect("60 s");
    let samples = MonthSamples::new(grid, Timestamp(start), Timestamp(end));
    while agg.pcc().change_points() < 40_000 {
        let from = rng.gen_range(samples.first..samples.end);
        let until = from + rng.gen_range(1..=240);
        agg.pcc_mut().add_connection(samples, from, Some(until));
    }
    agg
}

fn bench_aggregate_codec(c: &mut Criterion) {
    let mut agg = big_aggregate();
    let bytes = agg.encode();
    eprintln!(
        "aggregate_codec: 100k users, {} PCC change points, {} encoded bytes",
        agg.pcc().change_points(),
        bytes.len()
    );
    let mut g = c.benchmark_group("aggregate_codec");
    g.throughput(Throughput::Elements(1));
    g.bench_function("encode_100k_users_busy_pcc", |b| b.iter(|| agg.encode()));
    g.bench_function("decode_100k_users_busy_pcc", |b| {
        // The decoded aggregate is dropped outside the timed section.
        b.iter_with_large_drop(|| AppMonthAggregate::decode(black_box(&bytes)).expect("round trip"))
    });
    g.finish();
}

// ---------------------------------------------------------------------------------------
// bill_month

fn subscriptions() -> Subscriptions {
    let mut subs = Subscriptions::new(BillingTz::default());
    for line in [
        // Current mode: created 2025, Premium since February 2025.
        r#"{"type":"app_created","app_id":1400000001,"ts":"2025-01-10T09:00:00+08:00","account_id":"acct-1"}"#,
        r#"{"type":"plan_changed","app_id":1400000001,"ts":"2025-02-01T10:00:00+08:00","plan":"premium"}"#,
        // Original mode: created 2021, Pro since mid-2021.
        r#"{"type":"app_created","app_id":1400000002,"ts":"2021-05-01T09:00:00+08:00","account_id":"acct-2"}"#,
        r#"{"type":"plan_changed","app_id":1400000002,"ts":"2021-06-01T10:00:00+08:00","plan":"pro"}"#,
        // Mid-month paid → paid switch in the benchmark month, plus a call trial.
        r#"{"type":"app_created","app_id":1400000003,"ts":"2025-01-10T09:00:00+08:00"}"#,
        r#"{"type":"plan_changed","app_id":1400000003,"ts":"2025-03-01T10:00:00+08:00","plan":"standard"}"#,
        r#"{"type":"av_call_trial_started","app_id":1400000003,"ts":"2026-10-20T10:00:00+08:00","account_id":"acct-3"}"#,
        r#"{"type":"plan_changed","app_id":1400000003,"ts":"2026-11-11T10:00:00+08:00","plan":"premium"}"#,
    ] {
        let ev = decode_subscription_event(line.as_bytes()).expect("valid event");
        subs.apply(&ev).expect("valid change");
    }
    subs
}

fn usage_of(app_id: u64) -> MonthlyUsage {
    MonthlyUsage {
        app_id,
        month: month(),
        mau: 123_456,
        dau_peak: 37_001,
        pcc: 8_765,
        pcc_at: Some(Timestamp(month_bounds().0 + 3_600_000)),
        group_count_peak: 250_001,
        ..MonthlyUsage::empty(app_id, month())
    }
}

fn bench_bill_month(c: &mut Criterion) {
    let subs = subscriptions();
    let prices = PriceBook::default();
    let mut g = c.benchmark_group("bill_month");
    g.throughput(Throughput::Elements(1));
    for (name, app) in [
        ("current_premium_overage", FIRST_APP),
        ("original_pro_overage", FIRST_APP + 1),
        ("plan_switch_and_trial", FIRST_APP + 2),
    ] {
        let usage = usage_of(app);
        assert!(!bill_month(&subs, &usage, &prices).is_empty());
        g.bench_function(name, |b| b.iter(|| bill_month(black_box(&subs), black_box(&usage), &prices)));
    }
    // The figures fed to pricing: 31 sketch estimates and a PCC sweep of a 100k-user app.
    let mut agg = big_aggregate();
    agg.encode(); // flushed, as after a checkpoint
    let grid = SampleGrid::new(Duration::from_secs(60)).expect("60 s");
    g.bench_function("usage_of_100k_user_aggregate", |b| b.iter(|| agg.usage(FIRST_APP, month(), grid)));
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .measurement_time(Duration::from_millis(2500))
        .warm_up_time(Duration::from_secs(1))
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_decode, bench_meter_apply, bench_sketch, bench_aggregate_codec, bench_bill_month
}
criterion_main!(benches);
