//! `im-meter produce` and `im-meter run` against a real Apache Kafka broker
//! (`scripts/kafka.sh start`; address in `IM_METER_TEST_BROKERS`, default 127.0.0.1:9092):
//! produce keys every line by app; the worker's usage and charges equal those of `replay`
//! over the same input, through poison records, kill -9 at any moment, consumer group
//! rebalances and a broker restart, and every output is published exactly once.
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
        let workload = Workload { month: input_month(), ..Workload::sample() };
        let mut file = std::fs::File::create(&events).unwrap();
        workload.write_events(&BillingTz::default(), &mut file).unwrap();
        // The sample's subscriptions plus two refused records: a change back to Developer
        // dated in October (its dead letter goes out with October's billing) and a line
        // that is not JSON (dated by its Kafka timestamp: now, a month not billed here).
        let subscriptions = dir.join("subscriptions.ndjson");
        let mut lines = std::fs::read_to_string(repo().join("deploy/sample/subscriptions.ndjson")).unwrap();
        lines.push_str(r#"{"type":"plan_changed","app_id":1400000003,"ts":"2026-10-15T00:00:00+08:00","plan":"developer"}"#);
        lines.push_str("\nnot a subscription\n");
        std::fs::write(&subscriptions, lines).unwrap();
        (events, subscriptions)
    })
}

/// The month of the input's usage events.
fn input_month() -> Month {
    Month::new(2026, 10).unwrap()
}

/// What `replay` says about the same input.
struct Expected {
    /// Charges by `charge_id`.
    charges: BTreeMap<String, Value>,
    /// Usage by `{app_id}/{month}`.
    usage: BTreeMap<String, Value>,
    /// Refused lines of the events file.
    refused_events: usize,
}

fn expected() -> &'static Expected {
    static EXPECTED: OnceLock<Expected> = OnceLock::new();
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
        let list = |name: &str| doc[name].as_array().unwrap().clone();
        let charges =
            list("charges").into_iter().map(|c| (c["charge_id"].as_str().unwrap().to_string(), c)).collect();
        let usage = list("usage")
            .into_iter()
            .map(|u| (format!("{}/{}", u["app_id"], u["month"].as_str().unwrap()), u))
            .collect();
        let letters = std::fs::read_to_string(dlq).unwrap();
        let refused_events = letters.lines().filter(|l| l.contains(r#""source":"events""#)).count();
        Expected { charges, usage, refused_events }
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
            // Several workers run at once: each on a port of its own.
            ("IM_METER__HTTP__LISTEN".into(), "127.0.0.1:0".into()),
        ];
        for t in ["events", "subscriptions", "dead_letters", "changelog", "charges", "alerts", "usage"] {
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

    /// Waits until the charges and usage topics hold as many records of the months replay
    /// billed as replay printed (or the deadline passes), then checks them against replay:
    /// same records, each key once. Later months are left out: the worker closes them by
    /// the clock once they are over and bills their plan fees, as it should, while replay
    /// bills only months with usage in its input.
    fn assert_same_as_replay(&self, workers: &mut [Worker]) {
        let want = expected();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let charges = in_replayed_months(by_key(read_all(&self.topic("charges"))));
            let usage = in_replayed_months(by_key(read_all(&self.topic("usage"))));
            let complete = charges.len() >= want.charges.len() && usage.len() >= want.usage.len();
            if complete || Instant::now() > deadline {
                assert_same(charges, &want.charges, "charges");
                assert_same(usage, &want.usage, "usage");
                return;
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

/// A worker left running by a failed test would go on using the broker and the CPU.
impl Drop for Worker {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
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

/// A record as read back.
#[derive(Debug)]
struct Record {
    partition: i32,
    key: Option<Vec<u8>>,
    value: Vec<u8>,
    /// Headers, values as text.
    headers: BTreeMap<String, String>,
}

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
                records.push(Record {
                    partition: m.partition(),
                    key: m.key().map(<[u8]>::to_vec),
                    value: m.payload().unwrap_or_default().to_vec(),
                    headers,
                });
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => at_end += 1,
            _ => {}
        }
    }
    records
}

/// Records by key; a key published twice fails the test.
fn by_key(records: Vec<Record>) -> BTreeMap<String, Value> {
    let mut by_key = BTreeMap::new();
    for record in records {
        let key = String::from_utf8(record.key.expect("outputs are keyed")).unwrap();
        let previous = by_key.insert(key.clone(), serde_json::from_slice(&record.value).unwrap());
        assert!(previous.is_none(), "{key} published twice");
    }
    by_key
}

/// The records of the month replay billed (keys `{app_id}/{YYYY-MM}[/{item}]`).
fn in_replayed_months(mut records: BTreeMap<String, Value>) -> BTreeMap<String, Value> {
    let month = input_month().to_string();
    records.retain(|key, _| key.split('/').nth(1) == Some(month.as_str()));
    records
}

fn assert_same(got: BTreeMap<String, Value>, want: &BTreeMap<String, Value>, what: &str) {
    assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "{what}");
    for (key, value) in &got {
        assert_eq!(value, &want[key], "{what} {key}");
    }
}

#[test]
fn same_charges_as_replay_and_poison_records_go_to_dead_letters() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let d = Deployment::new("same");
    d.produce();
    let mut workers = vec![d.worker("a")];
    d.assert_same_as_replay(&mut workers);
    workers.pop().unwrap().stop();

    let letters = read_all(&d.topic("dead_letters"));
    let (events, subscriptions): (Vec<_>, Vec<_>) =
        letters.iter().partition(|r| r.headers["source_topic"] == d.topic("events"));
    assert_eq!(events.len(), expected().refused_events, "every malformed event line, once");
    // Refused subscription events go out once each, with their month's billing: October's
    // here (and the sample's November one once November is over and billed too).
    let offsets: std::collections::BTreeSet<&String> =
        subscriptions.iter().map(|r| &r.headers["source_offset"]).collect();
    assert_eq!(offsets.len(), subscriptions.len(), "each once: {subscriptions:?}");
    let month = format!(r#""ts":"{}-"#, input_month());
    let october: Vec<_> =
        subscriptions.iter().filter(|r| String::from_utf8_lossy(&r.value).contains(&month)).collect();
    assert_eq!(october.len(), 1, "{subscriptions:?}");
    assert_eq!(october[0].headers["reason"], "invalid_change");
    for Record { value: raw, headers, .. } in &letters {
        assert!(!headers["reason"].is_empty() && !headers["detail"].is_empty());
        assert!(headers["source_offset"].parse::<i64>().is_ok());
        assert!(!raw.is_empty());
    }
    // Developer apps over the cap: one alert each.
    let alerts = read_all(&d.topic("alerts"));
    let ids: Vec<String> =
        alerts.iter().map(|r| String::from_utf8_lossy(r.key.as_deref().unwrap()).into_owned()).collect();
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
    d.assert_same_as_replay(&mut workers);
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
    d.assert_same_as_replay(&mut workers);
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
    d.assert_same_as_replay(&mut workers);
    workers.pop().unwrap().stop();
}

#[test]
fn produce_sends_every_line_keyed_by_app() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let d = Deployment::new("produce");
    d.produce();
    let (events, subscriptions) = input();
    let expected = std::fs::read_to_string(events).unwrap();
    let records = read_all(&d.topic("events"));
    let mut sent: Vec<&str> = expected.lines().collect();
    let mut got: Vec<String> =
        records.iter().map(|r| String::from_utf8_lossy(&r.value).into_owned()).collect();
    sent.sort_unstable();
    got.sort_unstable();
    assert_eq!(got, sent, "every line arrives unchanged, malformed ones included");

    // Keyed by app_id, so each app's events sit in one partition; only lines without a
    // readable app_id go unkeyed.
    let mut partition_of: BTreeMap<String, i32> = BTreeMap::new();
    let mut unkeyed = 0;
    for r in &records {
        match &r.key {
            Some(app) => {
                let app = String::from_utf8_lossy(app).into_owned();
                assert!(String::from_utf8_lossy(&r.value).contains(&format!("\"app_id\":{app}")));
                assert_eq!(*partition_of.entry(app.clone()).or_insert(r.partition), r.partition, "app {app}");
            }
            None => unkeyed += 1,
        }
    }
    assert_eq!(partition_of.len(), 6);
    assert!(unkeyed > 0 && unkeyed < 100, "{unkeyed} unkeyed");
    let subscription_lines = std::fs::read_to_string(subscriptions).unwrap().lines().count();
    assert_eq!(read_all(&d.topic("subscriptions")).len(), subscription_lines);
}
