//! End-to-end throughput of `im-meter run` against a bare consumer of the same topic.
//!
//! Produces a synthetic month (~6 M events; `IM_METER_BENCH_USERS` scales it, 1.2 M users
//! by default) to a fresh events topic on the local broker (`scripts/kafka.sh start`), then,
//! in the same run and alternating, so that both see the same machine:
//! - `kcat -C -e -o beginning` reading the whole events topic to /dev/null, five times (a
//!   bare librdkafka consumer: `scripts/bench-deps.sh` installs kcat);
//! - the worker, four times, each time with its own consumer group and output topics
//!   (deleted after its run, so that compacting them does not load the broker later), timed from
//!   its first commit to the commit that covers the last event (the committed offsets of its
//!   group, polled every 100 ms), so group join and state restore are not counted — as
//!   kcat's own start-up is negligible.
//!
//! Prints every rate, the medians and their ratio (target ≥ 0.8).
//!
//! Run: `scripts/kafka.sh start && scripts/bench-deps.sh && cargo bench -p im-meter --bench worker_throughput`

use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use im_meter::config::{Config, FileConfig};
use im_meter::kafka::produce::{LineKind, LineProducer};
use im_meter::kafka::{client_config, worker};
use im_meter::workload::Workload;
use im_meter_core::time::Month;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

const PARTITIONS: i32 = 6;
/// Worker runs, each between two kcat runs: medians of 4 and 5 (single runs on this machine
/// spread by a factor of two).
const WORKER_RUNS: usize = 4;
const APPS: u64 = 200;

fn main() -> anyhow::Result<()> {
    let brokers = std::env::var("IM_METER_TEST_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let users: u64 =
        std::env::var("IM_METER_BENCH_USERS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_200_000);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
    let prefix = format!("bench.{nanos}");
    let events_topic = format!("{prefix}.events");

    // Every run reads the same events topic; the rest is per run.
    let run_env = |run: &str| {
        let mut env = vec![
            ("IM_METER__KAFKA__BROKERS".to_string(), brokers.clone()),
            ("IM_METER__KAFKA__GROUP_ID".into(), format!("{prefix}.{run}")),
            ("IM_METER__KAFKA__INSTANCE_ID".into(), format!("{prefix}.{run}")),
            ("IM_METER__KAFKA__PARTITIONS".into(), PARTITIONS.to_string()),
            ("IM_METER__TOPICS__EVENTS".into(), events_topic.clone()),
            ("IM_METER__HTTP__LISTEN".into(), "127.0.0.1:0".into()),
        ];
        for (t, _) in FileConfig::default().topics.fields().into_iter().filter(|(t, _)| *t != "events") {
            env.push((format!("IM_METER__TOPICS__{}", t.to_uppercase()), format!("{prefix}.{run}.{t}")));
        }
        env
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let config = Config::load(None, run_env("produce"))?;
    runtime.block_on(worker::prepare_topics(&config))?;

    let workload = Workload::synthetic(Month::new(2026, 10).context("month")?, APPS, users, 11);
    let lines = workload.lines(&config.meter.tz);
    let total = lines.len() as i64;
    let bytes: usize = lines.iter().map(String::len).sum();
    let mut producer =
        LineProducer::new(&client_config(&config), &events_topic, LineKind::Usage, None, None)?;
    for line in &lines {
        producer.send(line.as_bytes())?;
    }
    producer.finish()?;
    drop(lines);
    println!(
        "input: {total} events, {:.1} MB, {PARTITIONS} partitions, {APPS} apps, {users} users",
        bytes as f64 / 1e6
    );

    let mut kcat = Vec::new();
    let mut worker = Vec::new();
    let admin: AdminClient<DefaultClientContext> = client_config(&config).create()?;
    for round in 0..=WORKER_RUNS {
        kcat.push(kcat_rate(&brokers, &events_topic, total)?);
        println!("kcat   run {}: {:>10.0} events/s", round + 1, kcat[round]);
        if round < WORKER_RUNS {
            let env = run_env(&format!("w{round}"));
            let config = Config::load(None, env.clone())?;
            runtime.block_on(worker::prepare_topics(&config))?;
            worker.push(worker_rate(&config, env, total)?);
            println!("worker run {}: {:>10.0} events/s", round + 1, worker[round]);
            // Its output topics go, so that the broker does not compact them under the
            // runs that follow.
            let topics: Vec<&str> = config
                .file
                .topics
                .fields()
                .into_iter()
                .filter(|(t, _)| *t != "events")
                .map(|(_, n)| n.as_str())
                .collect();
            let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
            runtime.block_on(admin.delete_topics(&topics, &options))?;
        }
    }
    let (kcat, worker) = (median(kcat), median(worker));
    println!("worker (decode + meter + changelog + transactions), median: {worker:>10.0} events/s");
    println!("kcat -C -e -o beginning (bare consumer), median:            {kcat:>10.0} events/s");
    println!("ratio worker / bare consumer: {:.2}", worker / kcat);
    Ok(())
}

/// Reads the whole topic with kcat to /dev/null.
fn kcat_rate(brokers: &str, topic: &str, total: i64) -> anyhow::Result<f64> {
    let started = Instant::now();
    let status = Command::new("kcat")
        .args(["-C", "-b", brokers, "-t", topic, "-o", "beginning", "-e", "-q"])
        .stdout(Stdio::null())
        .status()
        .context("cannot run kcat (scripts/bench-deps.sh installs it)")?;
    anyhow::ensure!(status.success(), "kcat failed");
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

/// Runs the worker over the whole topic and returns its rate between its first commit and
/// the commit covering the last event.
fn worker_rate(config: &Config, env: Vec<(String, String)>, total: i64) -> anyhow::Result<f64> {
    let topic = &config.file.topics.events;
    let mut child = Command::new(env!("CARGO_BIN_EXE_im-meter"))
        .arg("run")
        .envs(env)
        .env("IM_METER_LOG", std::env::var("IM_METER_LOG").unwrap_or_else(|_| "warn".into()))
        .stdout(Stdio::null())
        .spawn()?;
    let watcher: BaseConsumer =
        client_config(config).set("group.id", &config.file.kafka.group_id).create()?;
    let mut partitions = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        partitions.add_partition(topic, p);
    }
    let deadline = Instant::now() + Duration::from_secs(900);
    let mut first: Option<(Instant, i64)> = None;
    let finished = loop {
        anyhow::ensure!(Instant::now() < deadline, "the worker did not finish in time");
        let committed = watcher.committed_offsets(partitions.clone(), Duration::from_secs(10))?;
        let done: i64 = committed
            .elements()
            .iter()
            .map(|e| match e.offset() {
                Offset::Offset(o) => o,
                _ => 0,
            })
            .sum();
        if done > 0 && first.is_none() {
            first = Some((Instant::now(), done));
        }
        if done >= total {
            break Instant::now();
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    Command::new("kill").args(["-INT", &child.id().to_string()]).status()?;
    child.wait()?;
    let (start, already) = first.context("no commit seen")?;
    Ok((total - already) as f64 / finished.duration_since(start).as_secs_f64())
}

fn median(mut rates: Vec<f64>) -> f64 {
    rates.sort_by(f64::total_cmp);
    match rates.len() {
        0 => 0.0,
        n if n % 2 == 1 => rates[n / 2],
        n => (rates[n / 2 - 1] + rates[n / 2]) / 2.0,
    }
}
