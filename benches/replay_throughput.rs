//! Replay throughput against a bare typed parse of the same bytes, measured in one run.
//!
//! Generates a synthetic month (~2 M events by default; `IM_METER_BENCH_USERS` scales it),
//! writes it to a temporary file, then alternately times `replay` (decode, validate,
//! aggregate, bill) and a bare `serde_json` parse of each line into a typed struct, read
//! through the same line reader. Prints events/s for both and their ratio (target ≥ 0.8).
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
    println!("input: {lines} events, {:.1} MB, 200 apps, {users} users", bytes as f64 / 1e6);

    let source = Source::File(path.clone());
    let replay_input = ReplayInput {
        events: source.clone(),
        subscriptions: None,
        dead_letters: None,
        exact: false,
        progress: false,
    };
    let mut best_replay = Duration::MAX;
    let mut best_parse = Duration::MAX;
    for _ in 0..3 {
        let started = Instant::now();
        let report = replay::replay(&config, &replay_input)?;
        best_replay = best_replay.min(started.elapsed());
        assert_eq!(report.events_read.lines, lines);
        black_box(report);

        let started = Instant::now();
        let mut parsed = 0u64;
        input::for_each_line(&source, false, |_, line| {
            let event: TypedEvent = serde_json::from_slice(line)?;
            black_box(&event);
            parsed += 1;
            Ok(())
        })?;
        best_parse = best_parse.min(started.elapsed());
        assert_eq!(parsed, lines);
    }
    std::fs::remove_file(&path)?;

    let rate = |d: Duration| lines as f64 / d.as_secs_f64();
    println!(
        "replay (decode + validate + aggregate + bill): {:>12.0} events/s  ({:.3} s)",
        rate(best_replay),
        best_replay.as_secs_f64()
    );
    println!(
        "bare typed serde_json parse:                    {:>12.0} events/s  ({:.3} s)",
        rate(best_parse),
        best_parse.as_secs_f64()
    );
    println!("ratio replay / bare parse: {:.2}", rate(best_replay) / rate(best_parse));
    Ok(())
}
