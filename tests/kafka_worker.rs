//! `im-meter run` against a real Apache Kafka broker (`scripts/kafka.sh start`; address in
//! `IM_METER_TEST_BROKERS`, default 127.0.0.1:9092): the worker's charges equal those of
//! `replay` over the same input, through poison records, kill -9 at any moment, consumer
//! group rebalances and a broker restart, and every charge is published exactly once.
//!
//! Each test uses its own topics and groups. The tests run one at a time (they share the
//! broker, and one restarts it).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use im_meter::workload::Workload;
use im_meter_core::time::{BillingTz, Month};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::Value;

/// One test at a time: they share the broker (and one restarts it).
static SERIAL: Mutex<()> = Mutex::new(());

fn brokers() -> String {
    std::env::var("IM_METER_TEST_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The input of every test: the bundled sample apps over October 2026 (a closed month, so
/// idle partitions close it by the clock), with malformed lines and retries mixed in.
fn input() -> &'static (PathBuf, PathBuf) {
    static INPUT: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    INPUT.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("im-meter-worker-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let events = dir.join("events.ndjson");
        let workload = Workload { month: Month::new(2026, 10).unwrap(), ..Workload::sample() };
        let mut file = std::fs::File::create(&events).unwrap();
        workload.write_events(&BillingTz::default(), &mut file).unwrap();
        (events, repo().join("deploy/sample/subscriptions.ndjson"))
    })
}

/// What `replay` says about the same input: charges by id, and the refused event lines.
fn expected() -> &'static (BTreeMap<String, Value>, usize) {
    static EXPECTED: OnceLock<(BTreeMap<String, Value>, usize)> = OnceLock::new();
    EXPECTED.get_or_init(|| {
        let (events, subscriptions) = input();
        let dlq = events.with_extension("dlq");
        let out = Command::new(env!("CARGO_BIN_EXE_im-meter"))
            .args(["replay", "--format", "json", "--events"])
            .arg(events)
            .arg("--subscriptions")
            .arg(subscriptions)
            .arg("--dlq")
            .arg(&dlq)
            .output()
            .unwrap();
        assert!(out.status.success());
        let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
        let charges = doc["charges"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| (c["charge_id"].as_str().unwrap().to_string(), c.clone()))
            .collect();
        let refused_events = std::fs::read_to_string(dlq)
            .unwrap()
            .lines()
            .filter(|l| l.contains(r#""source":"events""#))
            .count();
        (charges, refused_events)
    })
}

/// A test's own topics and groups.
struct Deployment {
    prefix: String,
}

impl Deployment {
    fn new(name: &str) -> Self {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
        Deployment { prefix: format!("t{}.{name}.{nanos}", std::process::id()) }
    }

    fn topic(&self, name: &str) -> String {
        format!("{}.{name}", self.prefix)
    }

    fn env(&self) -> Vec<(String, String)> {
        let mut env = vec![
            ("IM_METER__KAFKA__BROKERS".to_string(), brokers()),
            ("IM_METER__KAFKA__GROUP_ID".into(), self.prefix.clone()),
            ("IM_METER__KAFKA__PARTITIONS".into(), "3".into()),
            ("IM_METER__KAFKA__COMMIT_INTERVAL".into(), "100ms".into()),
            ("IM_METER__KAFKA__IDLE_PARTITION_TIMEOUT".into(), "1s".into()),
            ("IM_METER__KAFKA__TRANSACTION_TIMEOUT".into(), "10s".into()),
        ];
        for t in ["events", "subscriptions", "dead_letters", "changelog", "charges", "alerts"] {
            env.push((format!("IM_METER__TOPICS__{}", t.to_uppercase()), self.topic(t)));
        }
        env
    }

    fn produce(&self) {
        let (events, subscriptions) = input();
        let out = Command::new(env!("CARGO_BIN_EXE_im-meter"))
            .args(["produce", "--events"])
            .arg(events)
            .arg("--subscriptions")
            .arg(subscriptions)
            .envs(self.env())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "produce failed (is the broker up?): {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn worker(&self, instance: &str) -> Worker {
        let log = std::env::temp_dir().join(format!("{}.{instance}.log", self.prefix));
        let child = Command::new(env!("CARGO_BIN_EXE_im-meter"))
            .arg("run")
            .envs(self.env())
            .env("IM_METER__KAFKA__INSTANCE_ID", instance)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Worker { child, log }
    }

    /// Waits until the charges topic holds as many records as replay's charges (or the
    /// deadline passes), then returns them, checking each id appears once.
    fn charges(&self, workers: &mut [Worker]) -> BTreeMap<String, Value> {
        let want = expected().0.len();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let records = read_all(&self.topic("charges"));
            if records.len() >= want || Instant::now() > deadline {
                let mut by_id = BTreeMap::new();
                for (key, value, _) in records {
                    let charge: Value = serde_json::from_slice(&value).unwrap();
                    assert_eq!(key.as_deref(), charge["charge_id"].as_str().map(str::as_bytes));
                    let previous = by_id.insert(charge["charge_id"].as_str().unwrap().to_string(), charge);
                    assert!(previous.is_none(), "charge published twice: {:?}", by_id.keys().last());
                }
                return by_id;
            }
            for w in workers.iter_mut() {
                w.assert_alive();
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

struct Worker {
    child: Child,
    log: PathBuf,
}

impl Worker {
    fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGINT: the worker commits and leaves the group; it must exit cleanly.
    fn stop(mut self) {
        Command::new("kill").args(["-INT", &self.child.id().to_string()]).status().unwrap();
        let status = self.child.wait().unwrap();
        assert!(
            status.success(),
            "worker exited with {status}; log: {}",
            std::fs::read_to_string(&self.log).unwrap()
        );
    }

    fn assert_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("worker died ({status}); log: {}", std::fs::read_to_string(&self.log).unwrap_or_default());
        }
    }
}

/// A record as read back: key, value, headers as text.
type Record = (Option<Vec<u8>>, Vec<u8>, BTreeMap<String, String>);

/// Every committed record of a topic.
fn read_all(topic: &str) -> Vec<Record> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", "im-meter-test-reader")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed")
        .create()
        .unwrap();
    let Ok(metadata) = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)) else {
        return Vec::new();
    };
    let partitions = metadata.topics().first().map_or(0, |t| t.partitions().len());
    if partitions == 0 {
        return Vec::new();
    }
    let mut assignment = TopicPartitionList::new();
    for p in 0..partitions as i32 {
        assignment.add_partition_offset(topic, p, Offset::Beginning).unwrap();
    }
    consumer.assign(&assignment).unwrap();
    let mut records = Vec::new();
    let mut at_end = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while at_end < partitions && Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| {
                                (
                                    h.key.to_string(),
                                    String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                records.push((
                    m.key().map(<[u8]>::to_vec),
                    m.payload().unwrap_or_default().to_vec(),
                    headers,
                ));
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => at_end += 1,
            _ => {}
        }
    }
    records
}

fn assert_same_as_replay(charges: &BTreeMap<String, Value>) {
    let want = &expected().0;
    assert_eq!(charges.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>());
    for (id, charge) in charges {
        assert_eq!(charge, &want[id], "charge {id}");
    }
}

#[test]
fn same_charges_as_replay_and_poison_records_go_to_dead_letters() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let d = Deployment::new("same");
    d.produce();
    let mut workers = vec![d.worker("a")];
    let charges = d.charges(&mut workers);
    assert_same_as_replay(&charges);
    workers.pop().unwrap().stop();

    let letters = read_all(&d.topic("dead_letters"));
    assert_eq!(letters.len(), expected().1, "every malformed line, once");
    for (_, raw, headers) in &letters {
        assert!(!headers["reason"].is_empty() && !headers["detail"].is_empty());
        assert_eq!(headers["source_topic"], d.topic("events"));
        assert!(headers["source_offset"].parse::<i64>().is_ok());
        assert!(!raw.is_empty());
    }
    // Developer apps over the cap: one alert each.
    let alerts = read_all(&d.topic("alerts"));
    let ids: Vec<String> =
        alerts.iter().map(|(k, _, _)| String::from_utf8_lossy(k.as_deref().unwrap()).into_owned()).collect();
    assert_eq!(ids.len(), 2, "{ids:?}");
}

#[test]
fn kill_9_at_any_moment_changes_no_charge() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let d = Deployment::new("kill");
    d.produce();
    // Killed during restore, mid-batch and mid-transaction (commits run every 100 ms), then
    // restarted with the same instance id each time.
    for delay_ms in [700, 2_500, 4_000, 5_500, 7_000] {
        let mut w = d.worker("a");
        std::thread::sleep(Duration::from_millis(delay_ms));
        w.kill9();
    }
    let mut workers = vec![d.worker("a")];
    let charges = d.charges(&mut workers);
    assert_same_as_replay(&charges);
    workers.pop().unwrap().stop();
}

#[test]
fn workers_joining_and_leaving_the_group_change_no_charge() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let d = Deployment::new("rebalance");
    // The input is in place first: October is long over, so a worker with nothing to read
    // would close it by the clock (idle partitions follow the clock).
    d.produce();
    let first = d.worker("a");
    std::thread::sleep(Duration::from_secs(2));
    let second = d.worker("b");
    std::thread::sleep(Duration::from_secs(2));
    first.stop();
    let third = d.worker("c");
    let mut workers = vec![second, third];
    let charges = d.charges(&mut workers);
    assert_same_as_replay(&charges);
    for w in workers {
        w.stop();
    }
}

#[test]
fn a_broker_restart_changes_no_charge() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let d = Deployment::new("broker");
    d.produce();
    let mut workers = vec![d.worker("a")];
    std::thread::sleep(Duration::from_secs(3));
    let restart = Command::new(repo().join("scripts/kafka.sh")).arg("restart").output().unwrap();
    assert!(restart.status.success(), "{}", String::from_utf8_lossy(&restart.stderr));
    let charges = d.charges(&mut workers);
    assert_same_as_replay(&charges);
    workers.pop().unwrap().stop();
}
