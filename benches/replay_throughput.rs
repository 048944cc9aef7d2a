//! Replay throughput against a lean single-core parse of the same bytes, measured in one run.
//!
//! Generates a synthetic month (~2 M events by default; `IM_METER_BENCH_USERS` scales it),
//! writes it to a temporary file, then alternately times, best of three each:
//!
//! - `replay` on every core (decode, validate, aggregate with exact counts, bill), and on
//!   one thread;
//! - the *lean parse*: a typed `serde_json` parse of each line with borrowed `&str` fields
//!   and `ts` kept as a raw value (no allocation), on one core, through the same reader —
//!   and the same over the bytes already in memory (no reading at all), the strictest
//!   baseline;
//! - the earlier baseline: a typed parse into `Cow` fields and a `serde_json::Value` `ts`.
//!
//! Prints events/s for each and the ratio of replay (every core) to the lean parse
//! (target ≥ 0.8).
//!
//! Run: `cargo bench -p im-meter --bench replay_throughput`

use std::borrow::Cow;
use std::hint::black_box;
use std::time::{Duration, Instant};

use im_meter::config::Config;
use im_meter::input::{self, Source};
use im_meter::replay::{self, ReplayInput};
use im_meter::workload::Workload;
use im_meter_core::time::Month;
use serde::Deserialize;
use serde_json::value::RawValue;

/// The event as a plain typed struct: what any consumer would parse, nothing checked.
#[derive(Deserialize)]
#[allow(dead_code)] // fields are parsed to be measured, not read
struct TypedEvent<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    app_id: u64,
    ts: serde_json::Value,
    #[serde(borrow)]
    user_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    conn_id: Option<Cow<'a, str>>,
    ok: Option<bool>,
    group_count: Option<u64>,
    #[serde(borrow)]
    platform: Option<Cow<'a, str>>,
}

/// The lean parse: borrowed fields, `ts` raw; nothing allocated.
#[derive(Deserialize)]
#[allow(dead_code)] // fields are parsed to be measured, not read
struct LeanEvent<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    app_id: u64,
    #[serde(borrow)]
    ts: &'a RawValue,
    user_id: Option<&'a str>,
    conn_id: Option<&'a str>,
    ok: Option<bool>,
    group_count: Option<u64>,
    platform: Option<&'a str>,
}

/// Times `parse` over every line, on this thread.
fn time_parse(
    source: &Source,
    lines: u64,
    parse: impl Fn(&[u8]) -> anyhow::Result<()>,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut parsed = 0u64;
    input::for_each_line(source, false, |_, line| {
        parse(line)?;
        parsed += 1;
        Ok(())
    })?;
    assert_eq!(parsed, lines);
    Ok(started.elapsed())
}

fn main() -> anyhow::Result<()> {
    let users: u64 =
        std::env::var("IM_METER_BENCH_USERS").ok().and_then(|v| v.parse().ok()).unwrap_or(400_000);
    let config = Config::load(None, std::iter::empty())?;
    let workload = Workload::synthetic(Month::new(2026, 11).expect("valid month"), 200, users, 7);
    let path = std::env::temp_dir().join(format!("im-meter-bench-{}.ndjson", std::process::id()));
    let mut file = std::io::BufWriter::new(std::fs::File::create(&path)?);
    let lines = workload.write_events(&config.meter.tz, &mut file)?;
    drop(file);
    let bytes = std::fs::metadata(&path)?.len();
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    println!("input: {lines} events, {:.1} MB, 200 apps, {users} users; {cores} cores", bytes as f64 / 1e6);

    let source = Source::File(path.clone());
    let replay_on = |threads: usize| ReplayInput {
        events: source.clone(),
        subscriptions: None,
        dead_letters: None,
        exact: false,
        progress: false,
        threads: Some(threads),
    };
    let in_memory = std::fs::read(&path)?;
    let mut best = [Duration::MAX; 5];
    for _ in 0..3 {
        for (i, threads) in [cores, 1].into_iter().enumerate() {
            let started = Instant::now();
            let report = replay::replay(&config, &replay_on(threads))?;
            best[i] = best[i].min(started.elapsed());
            assert_eq!(report.events_read.lines, lines);
            black_box(report);
        }
        let lean = time_parse(&source, lines, |line| {
            black_box(serde_json::from_slice::<LeanEvent>(line)?);
            Ok(())
        })?;
        best[2] = best[2].min(lean);
        let typed = time_parse(&source, lines, |line| {
            black_box(serde_json::from_slice::<TypedEvent>(line)?);
            Ok(())
        })?;
        best[3] = best[3].min(typed);
        let started = Instant::now();
        let mut parsed = 0u64;
        for line in in_memory.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            black_box(serde_json::from_slice::<LeanEvent>(line)?);
            parsed += 1;
        }
        assert_eq!(parsed, lines);
        best[4] = best[4].min(started.elapsed());
    }
    std::fs::remove_file(&path)?;

    let rate = |d: Duration| lines as f64 / d.as_secs_f64();
    let names = [
        format!("replay, {cores} threads (decode + validate + aggregate + bill)"),
        "replay, 1 thread".to_string(),
        "lean parse, 1 core (&str fields, raw ts)".to_string(),
        "typed parse, 1 core (Cow fields, Value ts)".to_string(),
        "lean parse, 1 core, bytes in memory (no reading)".to_string(),
    ];
    for (name, d) in names.iter().zip(best) {
        println!("{name:<62} {:>12.0} events/s  ({:.3} s)", rate(d), d.as_secs_f64());
    }
    println!("ratio replay ({cores} threads) / lean parse: {:.2}", rate(best[0]) / rate(best[2]));
    println!("ratio replay ({cores} threads) / lean parse in memory: {:.2}", rate(best[0]) / rate(best[4]));
    Ok(())
}
