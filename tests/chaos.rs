//! The chaos run (`scripts/chaos.sh --seed S [--runs N] [--cluster]`): one seeded month of
//! events — several apps, plan changes, malformed and duplicate lines, lines a little out of
//! order — produced at a steady rate while a schedule of faults drawn from the same seed
//! applies at random instants: kill -9 of a worker and its restart, workers joining and
//! leaving, a worker frozen (SIGSTOP) past its session timeout and thawed (a zombie to fence),
//! kill -9 of a broker (on the cluster: a busy partition's leader, the transaction or group
//! coordinator) and its restart, the events topic growing, a worker whose clock is minutes
//! off, a 1 MB poison record. Then the workers settle, a burst of events dated in the billed
//! month arrives, and the run checks what `read_committed` readers see against `replay` over
//! exactly the events the producer had acknowledged: the same usage and charges, each
//! `charge_id` once; each dead letter once, with replay's reasons (and `late` for the burst);
//! nothing billed for a month that is not over.
//!
//! Not a libtest harness (`harness = false`): `main` reads the run's arguments. Each run has
//! a directory (`target/chaos/<brokers>-seed-<S>/`) with its schedule as it happened and
//! every worker's log; a line per run goes to the results file, and `--runs` skips seeds the
//! file already holds, so a long series can be gathered over several sittings.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use im_meter::workload::{AppLoad, Workload};
use im_meter_core::time::{BillingTz, Month, Timestamp};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::{ClientConfig, ClientContext};
use support::*;

/// `scripts/chaos.sh` passes its arguments here.
#[derive(Parser, Debug)]
struct Args {
    /// The first run's seed; run i uses seed + i.
    #[arg(long)]
    seed: u64,
    /// How many seeds to run (those already in the results file are skipped).
    #[arg(long, default_value_t = 1)]
    runs: u64,
    /// On the three-node cluster (`scripts/kafka.sh cluster`) instead of the single broker.
    #[arg(long)]
    cluster: bool,
    /// Where each run's outcome is appended [target/chaos/results.tsv].
    #[arg(long)]
    results: Option<PathBuf>,
}

/// When the faults may strike, from the start of production.
const FAULT_WINDOW: Duration = Duration::from_secs(40);
/// How long the month's events take to produce.
const PRODUCTION: Duration = Duration::from_secs(15);
/// `kafka.max_poll_interval` of the workers, and so their session timeout: a frozen worker
/// is out of the group this long after it stopped polling.
const SESSION: Duration = Duration::from_secs(15);
/// How long a worker asked to stop may take to leave (a broker away holds its last commit).
const LEAVE_WITHIN: Duration = Duration::from_secs(120);
/// How long the settled workers may take to bill what replay bills.
const SETTLE: Duration = Duration::from_secs(300);

fn main() {
    let args = Args::parse();
    let brokers = if args.cluster { "cluster" } else { "single" };
    if args.cluster {
        use_cluster();
    }
    let root = repo().join("target/chaos");
    std::fs::create_dir_all(&root).unwrap();
    let results = args.results.clone().unwrap_or_else(|| root.join("results.tsv"));
    let done = seeds_done(&results, brokers);
    let (mut passed, mut failed) = (0, Vec::new());
    for seed in args.seed..args.seed + args.runs {
        if done.contains(&seed) {
            println!("chaos: seed {seed} ({brokers}) is in {} already; skipped", results.display());
            continue;
        }
        let dir = root.join(format!("{brokers}-seed-{seed}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let started = Instant::now();
        println!("chaos: seed {seed} on the {brokers} broker(s), run directory {}", dir.display());
        let outcome = std::panic::catch_unwind(|| run(seed, args.cluster, &dir));
        // Whatever happened, the next run finds every broker up.
        restore_brokers(args.cluster);
        let secs = started.elapsed().as_secs();
        let (verdict, note) = match &outcome {
            Ok(notes) => ("pass", notes.join("; ")),
            Err(panic) => ("FAIL", panic_text(panic)),
        };
        let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&results).unwrap();
        writeln!(file, "{seed}\t{brokers}\t{verdict}\t{secs}\t{}", note.replace(['\t', '\n'], " ")).unwrap();
        if outcome.is_ok() {
            passed += 1;
            println!(
                "chaos: seed {seed}: pass in {secs} s{}",
                if note.is_empty() { String::new() } else { format!(" ({note})") }
            );
        } else {
            failed.push(seed);
            eprintln!("chaos: seed {seed} FAILED after {secs} s: {note}");
            eprintln!("chaos: the schedule as it happened:");
            eprintln!("{}", std::fs::read_to_string(dir.join("schedule.log")).unwrap_or_default());
            eprintln!("chaos: the workers' logs in {}", dir.display());
            eprintln!(
                "chaos: the brokers' logs (kafka.out, logs/server.log) in {}",
                broker_dirs(args.cluster)
            );
            eprintln!(
                "chaos: reproduce with: scripts/chaos.sh --seed {seed}{}",
                if args.cluster { " --cluster" } else { "" }
            );
        }
    }
    println!("chaos: {passed} passed, {} failed {failed:?}; results in {}", failed.len(), results.display());
    std::process::exit(if failed.is_empty() { 0 } else { 1 });
}

/// Where the brokers keep their logs (scripts/kafka.sh's data directories).
fn broker_dirs(cluster: bool) -> String {
    let var = |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.to_string());
    let cache = repo().join(".cache/kafka");
    if cluster {
        let port = var("KAFKA_CLUSTER_PORT", "19092");
        format!("{}", cache.join(format!("cluster-{port}/node-*")).display())
    } else {
        format!("{}", cache.join(format!("data-{}", var("KAFKA_PORT", "9092"))).display())
    }
}

/// Seeds the results file holds for `brokers`.
fn seeds_done(results: &Path, brokers: &str) -> BTreeSet<u64> {
    let text = std::fs::read_to_string(results).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let mut fields = l.split('\t');
            let seed = fields.next()?.parse().ok()?;
            (fields.next()? == brokers).then_some(seed)
        })
        .collect()
}

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}

/// A fault, or the end of one.
#[derive(Debug, Clone, PartialEq)]
enum Action {
    /// kill -9 of a worker (it stays down until started).
    KillWorker(&'static str),
    /// Starts a worker (a second or third member, or one killed before).
    StartWorker(&'static str),
    /// SIGINT: the worker commits, leaves the group and exits.
    StopWorker(&'static str),
    /// SIGSTOP: the worker stops, holding its partitions, until thawed.
    Freeze(&'static str),
    /// SIGCONT.
    Thaw(&'static str),
    /// kill -9 of a broker.
    KillBroker(BrokerTarget),
    /// Starts every broker killed.
    RestartBrokers,
    /// The events topic grows to this many partitions.
    GrowEvents(i32),
    /// A 1 MB record that is no valid event.
    Poison,
}

/// Which broker a kill hits.
#[derive(Debug, Clone, Copy, PartialEq)]
enum BrokerTarget {
    /// The single broker.
    Single,
    /// The leader of events partition 0.
    EventsLeader,
    /// The leader of metering changelog partition 0.
    ChangelogLeader,
    /// The transaction coordinator of worker a's first metering producer.
    TransactionCoordinator,
    /// The metering consumer group's coordinator.
    GroupCoordinator,
}

/// A fault at its instant (from the start of production).
#[derive(Debug, Clone)]
struct Step {
    at: Duration,
    action: Action,
}

/// The schedule drawn from `rng`: each kind of fault once, at random instants of the window.
fn schedule(rng: &mut StdRng, cluster: bool) -> Vec<Step> {
    let secs = |rng: &mut StdRng, from: f64, to: f64| Duration::from_secs_f64(rng.gen_range(from..to));
    let window = FAULT_WINDOW.as_secs_f64();
    let mut steps = Vec::new();
    let mut add = |at: Duration, action| steps.push(Step { at, action });
    // kill -9 of the first worker, restarted 1-5 s later.
    let at = secs(rng, 3.0, window - 10.0);
    add(at, Action::KillWorker("a"));
    add(at + secs(rng, 1.0, 5.0), Action::StartWorker("a"));
    // Two more join and leave.
    for name in ["b", "c"] {
        let at = secs(rng, 1.0, window - 20.0);
        add(at, Action::StartWorker(name));
        add(at + secs(rng, 5.0, 20.0), Action::StopWorker(name));
    }
    // A worker frozen past its session, then thawed: a zombie the group has moved on from.
    let at = secs(rng, 3.0, window - 25.0);
    add(at, Action::Freeze("a"));
    add(at + SESSION + secs(rng, 2.0, 6.0), Action::Thaw("a"));
    // A broker killed and restarted.
    let target = if cluster {
        [
            BrokerTarget::EventsLeader,
            BrokerTarget::ChangelogLeader,
            BrokerTarget::TransactionCoordinator,
            BrokerTarget::GroupCoordinator,
        ][rng.gen_range(0..4)]
    } else {
        BrokerTarget::Single
    };
    let at = secs(rng, 5.0, window - 15.0);
    add(at, Action::KillBroker(target));
    add(at + secs(rng, 1.0, 6.0), Action::RestartBrokers);
    // The events topic grows.
    add(secs(rng, 5.0, window - 10.0), Action::GrowEvents(3 + rng.gen_range(1..=3)));
    // A worker whose clock is minutes off joins and leaves.
    let at = secs(rng, 2.0, window - 25.0);
    add(at, Action::StartWorker("skewed"));
    add(at + secs(rng, 10.0, 25.0), Action::StopWorker("skewed"));
    add(secs(rng, 1.0, window), Action::Poison);
    steps.sort_by_key(|s| s.at);
    steps
}

/// What a run sends: its month, the event lines and the subscriptions.
struct RunInput {
    month: Month,
    /// Event lines in the order they are sent.
    lines: Vec<String>,
    /// Subscription lines.
    subscriptions: Vec<String>,
}

/// A past month (over by any clock this runs on) of four apps with a few thousand events
/// each, retries and malformed lines mixed in, and a little out of order; their
/// subscriptions, with plan changes inside the month.
fn month_of(rng: &mut StdRng, seed: u64) -> RunInput {
    let month = Month::new(2026, rng.gen_range(1..=9)).unwrap();
    let app = |i: u64, rng: &mut StdRng| AppLoad {
        app_id: 1_400_001_000 + i,
        users: rng.gen_range(400..1_500),
        logins_per_user: 2.0,
        connection_share: 0.3,
        mean_session_minutes: 30.0,
        groups: rng.gen_range(0..5_000),
    };
    let apps: Vec<AppLoad> = (1..=4).map(|i| app(i, rng)).collect();
    let workload = Workload {
        month,
        apps,
        malformed_share: 0.002,
        duplicate_share: 0.01,
        failed_login_share: 0.02,
        seed,
    };
    let mut lines = workload.lines(&BillingTz::default());
    // A little out of order: a line in twenty swaps with one of the next five.
    for i in 0..lines.len().saturating_sub(6) {
        if rng.gen_bool(0.05) {
            let j = i + rng.gen_range(1..=5);
            lines.swap(i, j);
        }
    }
    let day = |rng: &mut StdRng| {
        format!("{month}-{:02}T{:02}:00:00+08:00", rng.gen_range(2..=28), rng.gen_range(0..24))
    };
    let plans = ["standard", "premium"];
    let mut subscriptions = vec![
        // Original billing mode (created before 2022-12-26), migrated in the month or not.
        r#"{"type":"app_created","app_id":1400001001,"ts":"2021-05-01T00:00:00+08:00","account_id":"acct-chaos-1"}"#.to_string(),
        r#"{"type":"plan_changed","app_id":1400001001,"ts":"2021-06-01T00:00:00+08:00","plan":"pro"}"#.to_string(),
        r#"{"type":"app_created","app_id":1400001002,"ts":"2025-01-10T00:00:00+08:00","account_id":"acct-chaos-1"}"#.to_string(),
        r#"{"type":"app_created","app_id":1400001003,"ts":"2024-03-03T00:00:00+08:00","account_id":"acct-chaos-2"}"#.to_string(),
        r#"{"type":"plan_changed","app_id":1400001003,"ts":"2024-04-01T00:00:00+08:00","plan":"standard"}"#.to_string(),
        r#"{"type":"app_created","app_id":1400001004,"ts":"2025-08-08T00:00:00+08:00","account_id":"acct-chaos-3"}"#.to_string(),
    ];
    if rng.gen_bool(0.5) {
        subscriptions.push(format!(
            r#"{{"type":"billing_mode_migrated","app_id":1400001001,"ts":"{}","plan":"premium"}}"#,
            day(rng)
        ));
    }
    // The Developer app upgrades in the month; the Standard one changes plan.
    subscriptions.push(format!(
        r#"{{"type":"plan_changed","app_id":1400001002,"ts":"{}","plan":"{}"}}"#,
        day(rng),
        plans[rng.gen_range(0..2)]
    ));
    subscriptions.push(format!(
        r#"{{"type":"plan_changed","app_id":1400001003,"ts":"{}","plan":"premium"}}"#,
        day(rng)
    ));
    RunInput { month, lines, subscriptions }
}

/// The late burst: logins dated in the billed month, sent once it is billed.
fn late_burst(rng: &mut StdRng, month: Month) -> Vec<String> {
    (0..rng.gen_range(5..20))
        .map(|i| {
            format!(
                r#"{{"type":"login","app_id":{},"user_id":"late-{i}","ts":"{month}-{:02}T12:00:00+08:00"}}"#,
                1_400_001_001 + rng.gen_range(0..4),
                rng.gen_range(1..=28)
            )
        })
        .collect()
}

/// The 1 MB poison record: a login whose user id is far past any limit.
fn poison(month: Month) -> String {
    let head = r#"{"type":"login","app_id":1400001002,"user_id":""#;
    let tail = format!(r#"","ts":"{month}-15T10:00:00+08:00"}}"#);
    format!("{head}{}{tail}", "p".repeat(1_010_000 - head.len() - tail.len()))
}

/// The run's log of what happened when.
struct Journal {
    start: Instant,
    file: std::fs::File,
}

impl Journal {
    fn say(&mut self, what: &str) {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        let line =
            format!("+{:6.1}s  unix {:.1}  {what}", self.start.elapsed().as_secs_f64(), now.as_secs_f64());
        writeln!(self.file, "{line}").unwrap();
        println!("  {line}");
    }
}

/// The workers of a run, by name, each wanted up or not; one that exits while wanted is
/// started again (as its supervisor would), and the run notes it.
struct Workers<'a> {
    d: &'a Deployment,
    dir: &'a Path,
    running: BTreeMap<&'static str, Worker>,
    /// Workers asked to stop, and since when.
    leaving: Vec<(&'static str, Worker, Instant)>,
    wanted: BTreeSet<&'static str>,
    frozen: BTreeSet<&'static str>,
    skew_ms: i64,
    notes: Vec<String>,
}

impl Workers<'_> {
    fn env(&self, name: &str) -> Vec<(&'static str, String)> {
        let mut env = vec![
            ("IM_METER__KAFKA__IDLE_PARTITION_TIMEOUT", "20s".to_string()),
            ("IM_METER__KAFKA__MAX_POLL_INTERVAL", format!("{}s", SESSION.as_secs())),
            ("IM_METER__KAFKA__METER_THREADS", "1".to_string()),
            ("IM_METER__KAFKA__METADATA_REFRESH_INTERVAL", "2s".to_string()),
        ];
        if name == "skewed" {
            env.push(("IM_METER_TEST_CLOCK_OFFSET_MS", self.skew_ms.to_string()));
        }
        env
    }

    fn start(&mut self, name: &'static str, journal: &mut Journal) {
        self.stop_now(name);
        let env = self.env(name);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let worker = self.d.worker_appending(name, &env, &self.dir.join(format!("worker-{name}.log")));
        journal.say(&format!("worker {name} started (pid {})", worker.child.id()));
        self.running.insert(name, worker);
        self.wanted.insert(name);
        self.frozen.remove(name);
    }

    fn kill(&mut self, name: &'static str, journal: &mut Journal) {
        self.wanted.remove(name);
        if let Some(mut w) = self.running.remove(name) {
            journal.say(&format!("kill -9 of worker {name} (pid {})", w.child.id()));
            let _ = w.child.kill();
            let _ = w.child.wait();
        }
    }

    /// SIGINT: the worker commits, leaves the group and exits — in the background (with a
    /// broker away that can take as long as the broker does), watched by
    /// [`Workers::supervise`].
    fn stop(&mut self, name: &'static str, journal: &mut Journal) {
        self.wanted.remove(name);
        let Some(w) = self.running.remove(name) else { return };
        self.signal(&w, "CONT");
        journal.say(&format!("SIGINT to worker {name} (pid {})", w.child.id()));
        self.signal(&w, "INT");
        self.leaving.push((name, w, Instant::now()));
    }

    /// Waits until every worker asked to stop has exited (or was killed for taking too long).
    fn wait_for_leavers(&mut self, journal: &mut Journal) {
        while !self.leaving.is_empty() {
            self.supervise(journal);
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills `name` without a word (before it is started again).
    fn stop_now(&mut self, name: &'static str) {
        if let Some(mut w) = self.running.remove(name) {
            let _ = w.child.kill();
            let _ = w.child.wait();
        }
    }

    fn signal(&self, w: &Worker, signal: &str) {
        Command::new("kill").args([&format!("-{signal}"), &w.child.id().to_string()]).status().unwrap();
    }

    fn freeze(&mut self, name: &'static str, thaw: bool, journal: &mut Journal) {
        let Some(w) = self.running.get(name) else {
            journal.say(&format!(
                "worker {name} is not running: nothing to {}",
                if thaw { "thaw" } else { "freeze" }
            ));
            return;
        };
        journal.say(&format!(
            "SIG{} to worker {name} (pid {})",
            if thaw { "CONT" } else { "STOP" },
            w.child.id()
        ));
        self.signal(w, if thaw { "CONT" } else { "STOP" });
        if thaw {
            self.frozen.remove(name);
        } else {
            self.frozen.insert(name);
        }
    }

    /// Notes the workers asked to stop that have exited (one that exits with an error, or
    /// is still there [`LEAVE_WITHIN`] after its SIGINT, is killed and noted), and starts
    /// again every wanted worker that exited by itself.
    fn supervise(&mut self, journal: &mut Journal) {
        for (name, mut w, since) in std::mem::take(&mut self.leaving) {
            match w.child.try_wait().unwrap() {
                Some(status) if status.success() => journal.say(&format!("worker {name} left")),
                None if since.elapsed() < LEAVE_WITHIN => self.leaving.push((name, w, since)),
                status => {
                    let note = format!("worker {name} did not leave cleanly after its SIGINT ({status:?})");
                    journal.say(&note);
                    self.notes.push(note);
                    let _ = w.child.kill();
                    let _ = w.child.wait();
                }
            }
        }
        let exited: Vec<(&'static str, String)> = self
            .running
            .iter_mut()
            .filter_map(|(name, w)| Some((*name, format!("{}", w.child.try_wait().ok()??))))
            .collect();
        for (name, status) in exited {
            let note = format!("worker {name} exited by itself ({status})");
            journal.say(&note);
            self.notes.push(note);
            self.running.remove(name);
            if self.wanted.contains(name) {
                self.start(name, journal);
            }
        }
    }
}

/// Kills the broker `target` names (resolved now) and returns its node id.
fn kill_broker(target: BrokerTarget, d: &Deployment) -> i32 {
    let node = match target {
        BrokerTarget::Single => {
            kafka_sh(&["kill"]);
            return 1;
        }
        BrokerTarget::EventsLeader => leader_of(&d.topic("events"), 0),
        BrokerTarget::ChangelogLeader => leader_of(&d.topic("changelog"), 0),
        BrokerTarget::TransactionCoordinator => transaction_coordinator(&format!("{}-meter-a", d.prefix)),
        BrokerTarget::GroupCoordinator => group_coordinator(&d.prefix),
    };
    kafka_sh(&["cluster", "kill", &node.to_string()]);
    node
}

/// `scripts/kafka.sh ARGS`, which must succeed.
fn kafka_sh(args: &[&str]) {
    let out = Command::new(repo().join("scripts/kafka.sh")).args(args).output().unwrap();
    assert!(out.status.success(), "kafka.sh {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Every broker up again (after a run, whatever happened in it).
fn restore_brokers(cluster: bool) {
    if cluster {
        kafka_sh(&["cluster", "start", "3"]);
    } else {
        kafka_sh(&["start"]);
    }
}

/// Counts deliveries that failed.
#[derive(Default)]
struct Deliveries {
    failed: AtomicUsize,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if result.is_err() {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Sends `lines` to `topic` keyed by app (what is not JSON unkeyed) at a steady pace over
/// [`PRODUCTION`], in the background; the thread returns once every line is acknowledged.
fn produce_steadily(topic: String, lines: Vec<String>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let producer: BaseProducer<Deliveries> = ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .set("enable.idempotence", "true")
            .set("acks", "all")
            // Through any broker outage of the run: a line given up on would leave its
            // fate unknown.
            .set("message.timeout.ms", "300000")
            .set("topic.metadata.refresh.interval.ms", "1000")
            .create_with_context(Deliveries::default())
            .unwrap();
        let chunks = (PRODUCTION.as_millis() / 100) as usize;
        let started = Instant::now();
        for (i, chunk) in lines.chunks(lines.len().div_ceil(chunks)).enumerate() {
            for line in chunk {
                let key = app_key(line);
                loop {
                    let sent = match &key {
                        Some(key) => {
                            producer.send(BaseRecord::to(&topic).key(key).payload(line)).map_err(|(e, _)| e)
                        }
                        None => {
                            producer.send(BaseRecord::<(), _>::to(&topic).payload(line)).map_err(|(e, _)| e)
                        }
                    };
                    match sent {
                        Ok(()) => break,
                        // The queue is full while a broker is away: wait for room.
                        Err(KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)) => {
                            producer.poll(Duration::from_millis(100));
                        }
                        Err(e) => panic!("cannot send an event line: {e}"),
                    }
                }
                producer.poll(Duration::ZERO);
            }
            let due = Duration::from_millis(100 * (i as u64 + 1));
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                producer.poll(wait);
            }
        }
        producer.flush(Duration::from_secs(300)).unwrap();
        assert_eq!(
            producer.context().failed.load(Ordering::Relaxed),
            0,
            "lines the broker never acknowledged"
        );
    })
}

/// One run: returns notes (workers that exited by themselves) when everything checks out.
fn run(seed: u64, cluster: bool, dir: &Path) -> Vec<String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let input = month_of(&mut rng, seed);
    let steps = schedule(&mut rng, cluster);
    let burst = late_burst(&mut rng, input.month);
    let skew_ms = rng.gen_range(60_000..240_000) * if rng.gen_bool(0.5) { 1 } else { -1 };
    let d = Deployment::new(&format!("chaos{seed}"));
    let mut journal =
        Journal { start: Instant::now(), file: std::fs::File::create(dir.join("schedule.log")).unwrap() };
    journal.say(&format!(
        "seed {seed}: {} on the {} broker(s), {} event lines, deployment {}, skewed clock {skew_ms} ms",
        input.month,
        if cluster { "three-node" } else { "single" },
        input.lines.len(),
        d.prefix
    ));
    for step in &steps {
        journal.say(&format!("planned at +{:.1}s: {:?}", step.at.as_secs_f64(), step.action));
    }
    let subscriptions = d.file("subscriptions.ndjson", &input.subscriptions);
    d.produce_files(&d.file("no-events.ndjson", &[]), &subscriptions);

    let mut workers = Workers {
        d: &d,
        dir,
        running: BTreeMap::new(),
        leaving: Vec::new(),
        wanted: BTreeSet::new(),
        frozen: BTreeSet::new(),
        skew_ms,
        notes: Vec::new(),
    };
    workers.start("a", &mut journal);
    journal.start = Instant::now();
    journal.say("production starts");
    let producing = produce_steadily(d.topic("events"), input.lines.clone());
    let mut sent = input.lines.clone();
    // Brokers killed and not started again yet.
    let mut down: Vec<i32> = Vec::new();
    let mut background = Vec::new();
    for step in &steps {
        while journal.start.elapsed() < step.at {
            workers.supervise(&mut journal);
            std::thread::sleep(Duration::from_millis(100));
        }
        match step.action.clone() {
            Action::KillWorker(name) => workers.kill(name, &mut journal),
            Action::StartWorker(name) => workers.start(name, &mut journal),
            Action::StopWorker(name) => workers.stop(name, &mut journal),
            Action::Freeze(name) => workers.freeze(name, false, &mut journal),
            Action::Thaw(name) => workers.freeze(name, true, &mut journal),
            Action::KillBroker(target) => {
                let node = kill_broker(target, &d);
                journal.say(&format!("kill -9 of broker {node} ({target:?})"));
                down.push(node);
            }
            Action::RestartBrokers => {
                for node in std::mem::take(&mut down) {
                    if cluster {
                        kafka_sh(&["cluster", "restart", &node.to_string()]);
                    } else {
                        kafka_sh(&["start"]);
                    }
                    journal.say(&format!("broker {node} answers again"));
                }
            }
            // These two may find the broker away: they go on in the background, so that the
            // schedule (and the broker's restart) is not held up.
            Action::GrowEvents(partitions) => {
                background.push(grow_in_background(d.topic("events"), partitions as usize));
                journal.say(&format!("events topic growing to {partitions} partitions"));
            }
            Action::Poison => {
                let line = poison(input.month);
                background.push(send_in_background(d.topic("events"), "1400001002", line.clone()));
                journal.say("1 MB poison record sending");
                sent.push(line);
            }
        }
    }
    producing.join().expect("the producer failed");
    for task in background {
        task.join().expect("a fault's background work failed");
    }
    journal.say("production acknowledged; the schedule is over, the workers settle");

    // Settle: only worker a, thawed and running.
    for name in ["b", "c", "skewed"] {
        workers.stop(name, &mut journal);
    }
    workers.wait_for_leavers(&mut journal);
    if workers.frozen.contains("a") {
        workers.freeze("a", true, &mut journal);
    }
    if !workers.running.contains_key("a") {
        workers.start("a", &mut journal);
    }
    let want = Expected::of(&d.file("acknowledged.ndjson", &sent), &subscriptions);
    let mut settled: Vec<Worker> = workers.running.remove("a").into_iter().collect();
    assert_same_as_within(&want, &d, &mut settled, SETTLE);
    journal.say(&format!(
        "billed as replay bills: {} charges, {} usage records",
        want.charges.len(),
        want.usage.len()
    ));
    workers.running.insert("a", settled.pop().unwrap());

    // The burst: usage of the billed month is late, and each such event a dead letter.
    produce_keyed(&d.topic("events"), &burst);
    journal.say(&format!("{} late events sent", burst.len()));
    let mut want_reasons = want.event_reasons.clone();
    *want_reasons.entry("late".into()).or_default() += burst.len();
    let letters = eventually(Duration::from_secs(120), "a dead letter for each late event", || {
        workers.supervise(&mut journal);
        let letters = read_all(&d.topic("dead_letters"));
        let late = letters.iter().filter(|r| r.headers.get("reason").is_some_and(|r| r == "late")).count();
        (late >= burst.len()).then_some(letters)
    });
    let events_topic = d.topic("events");
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    let mut places = BTreeSet::new();
    for letter in letters.iter().filter(|r| r.headers["source_topic"] == events_topic) {
        let place = (letter.headers["source_partition"].clone(), letter.headers["source_offset"].clone());
        assert!(places.insert(place.clone()), "dead letter of {place:?} written twice");
        *reasons.entry(letter.headers["reason"].clone()).or_default() += 1;
    }
    assert_eq!(reasons, want_reasons, "dead letters of events by reason (worker, replay)");
    // Nothing billed for a month that is not over: the worker bills the months after the
    // run's month by the clock, all of them past.
    let this_month = BillingTz::default().month_of(Timestamp(now_ms()));
    for record in read_all(&d.topic("charges")) {
        let key = String::from_utf8(record.key.unwrap()).unwrap();
        let month: Month = key.split('/').nth(1).unwrap().parse().unwrap();
        assert!(month < this_month, "{key} billed before its month is over");
    }
    journal.say("dead letters and months check out");
    workers.stop("a", &mut journal);
    workers.wait_for_leavers(&mut journal);
    workers.notes
}

/// Grows `topic` to `partitions`, trying again while the broker is away.
fn grow_in_background(topic: String, partitions: usize) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        eventually(Duration::from_secs(180), "the events topic to grow", || {
            let grown = std::panic::catch_unwind(|| {
                if partition_count(&topic) < partitions {
                    grow_topic(&topic, partitions);
                }
            });
            grown.ok()
        })
    })
}

/// Sends one record of up to 2 MB, waiting for its acknowledgement through a broker's absence.
fn send_in_background(topic: String, key: &'static str, value: String) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let producer: BaseProducer<Deliveries> = ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .set("message.max.bytes", "2000000")
            .set("message.timeout.ms", "300000")
            .create_with_context(Deliveries::default())
            .unwrap();
        producer.send(BaseRecord::to(&topic).key(key).payload(&value)).map_err(|(e, _)| e).unwrap();
        producer.flush(Duration::from_secs(300)).unwrap();
        assert_eq!(
            producer.context().failed.load(Ordering::Relaxed),
            0,
            "the poison record was not acknowledged"
        );
    })
}

/// The clock now, in Unix milliseconds.
fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

/// The coordinator of consumer group `group`, as Kafka's `kafka-consumer-groups.sh
/// --describe --state` reports it: a header line (whose `COORDINATOR (ID)` has brackets
/// too), then the group's line, `group  host:port  (id)  …`.
fn group_coordinator(group: &str) -> i32 {
    let out = Command::new(repo().join("scripts/kafka.sh"))
        .args([
            "run-class",
            "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
            "--bootstrap-server",
        ])
        .arg(brokers())
        .args(["--describe", "--state", "--group", group])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|line| line.split_whitespace().next() == Some(group));
    let id = line
        .and_then(|line| line.split('(').nth(1))
        .and_then(|rest| rest.split(')').next())
        .and_then(|id| id.trim().parse().ok());
    id.unwrap_or_else(|| panic!("no coordinator in: {text}{}", String::from_utf8_lossy(&out.stderr)))
}
