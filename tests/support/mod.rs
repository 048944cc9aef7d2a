//! What the broker-backed tests share: the broker's address, the input (the bundled sample
//! month with poison records mixed in) and what `replay` says about it, a deployment's own
//! topics and groups, worker processes, and reading topics back.
//!
//! Each integration test binary includes this module (`mod support;`); not every one uses
//! every item.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use im_meter::config::FileConfig;
use im_meter::workload::Workload;
use im_meter_core::time::{BillingTz, Month};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::Value;

pub fn brokers() -> String {
    if let Some(cluster) = CLUSTER.get() {
        return cluster.clone();
    }
    std::env::var("IM_METER_TEST_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// The bootstrap list of the three-node test cluster, once a test binary uses it.
static CLUSTER: OnceLock<String> = OnceLock::new();

/// Points this test binary at the three-node cluster of `scripts/kafka.sh cluster`
/// (`KAFKA_CLUSTER_PORT`, default 19092 and up), starting it if it is not running, and
/// returns its bootstrap list. Its deployments create their topics with three replicas.
pub fn use_cluster() -> &'static str {
    CLUSTER.get_or_init(|| {
        let out =
            Command::new(repo().join("scripts/kafka.sh")).args(["cluster", "start", "3"]).output().unwrap();
        assert!(out.status.success(), "cluster start: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    })
}

/// `scripts/kafka.sh cluster kill|restart NODE`: kill -9 of a node, or its start (waiting
/// until it answers).
fn cluster_command(command: &str, node: i32) {
    let out = Command::new(repo().join("scripts/kafka.sh"))
        .args(["cluster", command, &node.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "cluster {command} {node}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A cluster node killed (kill -9); it starts again when this is dropped, also when the
/// test fails, so that the next test finds the whole cluster.
pub struct KilledNode(i32);

impl KilledNode {
    /// Kills node `node`.
    pub fn kill(node: i32) -> Self {
        cluster_command("kill", node);
        KilledNode(node)
    }

    /// Starts it again and waits until it answers.
    pub fn restart(self) {}
}

impl Drop for KilledNode {
    fn drop(&mut self) {
        cluster_command("restart", self.0);
    }
}

/// The broker (node) id leading partition `partition` of `topic`.
pub fn leader_of(topic: &str, partition: i32) -> i32 {
    let reader: BaseConsumer = ClientConfig::new().set("bootstrap.servers", brokers()).create().unwrap();
    let metadata = reader.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
    metadata.topics()[0].partitions().iter().find(|p| p.id() == partition).unwrap().leader()
}

/// The replicas of each partition of `topic`.
pub fn replica_counts(topic: &str) -> Vec<usize> {
    let reader: BaseConsumer = ClientConfig::new().set("bootstrap.servers", brokers()).create().unwrap();
    let metadata = reader.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
    metadata.topics()[0].partitions().iter().map(|p| p.replicas().len()).collect()
}

/// The broker that is the transaction coordinator of `transactional_id`, as Kafka's
/// `kafka-transactions.sh describe` reports it.
pub fn transaction_coordinator(transactional_id: &str) -> i32 {
    let out = Command::new(repo().join("scripts/kafka.sh"))
        .args(["run-class", "org.apache.kafka.tools.TransactionsCommand", "--bootstrap-server"])
        .arg(brokers())
        .args(["describe", "--transactional-id", transactional_id])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    // A header line (CoordinatorId first), then one line for the transactional id.
    let line =
        text.lines().nth(1).unwrap_or_else(|| panic!("{text}{}", String::from_utf8_lossy(&out.stderr)));
    line.split_whitespace().next().and_then(|id| id.parse().ok()).unwrap_or_else(|| panic!("{text}"))
}

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The input of every test: the bundled sample apps over October 2026 (a closed month, so
/// idle partitions close it by the clock), with malformed lines and retries mixed in.
pub fn input() -> &'static (PathBuf, PathBuf) {
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
pub fn input_month() -> Month {
    Month::new(2026, 10).unwrap()
}

/// What `replay` says about the same input.
pub struct Expected {
    /// Charges by `charge_id`.
    pub charges: BTreeMap<String, Value>,
    /// Usage by `{app_id}/{month}`.
    pub usage: BTreeMap<String, Value>,
    /// Refused lines of the events file.
    pub refused_events: usize,
    /// Refused lines of the events file by reason.
    pub event_reasons: BTreeMap<String, usize>,
}

pub fn expected() -> &'static Expected {
    static EXPECTED: OnceLock<Expected> = OnceLock::new();
    EXPECTED.get_or_init(|| {
        let (events, subscriptions) = input();
        Expected::of(events, subscriptions)
    })
}

impl Expected {
    /// What `replay` says about these inputs.
    pub fn of(events: &Path, subscriptions: &Path) -> Expected {
        Self::with_settings(events, subscriptions, &[])
    }

    /// What `replay` says about these inputs with extra settings (`IM_METER__...`).
    pub fn with_settings(events: &Path, subscriptions: &Path, env: &[(&str, &str)]) -> Expected {
        let dlq = events.with_extension("dlq");
        let out = Command::new(env!("CARGO_BIN_EXE_im-meter"))
            .envs(env.iter().copied())
            .args(["replay", "--format", "json", "--events"])
            .arg(events)
            .arg("--subscriptions")
            .arg(subscriptions)
            .arg("--dlq")
            .arg(&dlq)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
        let list = |name: &str| doc[name].as_array().unwrap().clone();
        let charges =
            list("charges").into_iter().map(|c| (c["charge_id"].as_str().unwrap().to_string(), c)).collect();
        let usage = list("usage")
            .into_iter()
            .map(|u| (format!("{}/{}", u["app_id"], u["month"].as_str().unwrap()), u))
            .collect();
        let letters = std::fs::read_to_string(dlq).unwrap();
        let mut event_reasons = BTreeMap::new();
        for letter in letters.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()) {
            if letter["source"] == "events" {
                *event_reasons.entry(letter["reason"].as_str().unwrap().to_string()).or_default() += 1;
            }
        }
        let refused_events = event_reasons.values().sum();
        Expected { charges, usage, refused_events, event_reasons }
    }

    /// The months replay billed.
    pub fn months(&self) -> std::collections::BTreeSet<String> {
        self.usage.keys().filter_map(|k| k.split('/').nth(1)).map(str::to_string).collect()
    }
}

/// The sample's event lines for `month`, malformed lines and retries included.
pub fn sample_lines(month: Month) -> Vec<String> {
    Workload { month, ..Workload::sample() }.lines(&BillingTz::default())
}

/// The lines of `lines` that belong to one of `apps` (by their `"app_id":N` text).
pub fn lines_of_apps(lines: &[String], apps: &[u64]) -> Vec<String> {
    lines.iter().filter(|l| apps.iter().any(|a| l.contains(&format!("\"app_id\":{a},")))).cloned().collect()
}

/// The sample's subscription events.
pub fn sample_subscriptions() -> PathBuf {
    repo().join("deploy/sample/subscriptions.ndjson")
}

/// A test's own topics and groups.
pub struct Deployment {
    /// Prefix of its topic and group names.
    pub prefix: String,
    /// Partitions of the topics the worker (or produce) creates.
    pub partitions: u32,
}

impl Deployment {
    pub fn new(name: &str) -> Self {
        Self::with_partitions(name, 3)
    }

    pub fn with_partitions(name: &str, partitions: u32) -> Self {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
        Deployment { prefix: format!("t{}.{name}.{nanos}", std::process::id()), partitions }
    }

    /// A file of this deployment's named `name`, holding `lines`.
    pub fn file(&self, name: &str, lines: &[String]) -> PathBuf {
        let path = std::env::temp_dir().join(format!("{}.{name}", self.prefix));
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        path
    }

    /// A failpoint's file of this deployment's, named `name`, holding `content`: its path,
    /// as the worker's `IM_METER_TEST_*_FILE` variable takes it.
    pub fn failpoint(&self, name: &str, content: &[u8]) -> PathBuf {
        let path = std::env::temp_dir().join(format!("{}.{name}", self.prefix));
        std::fs::write(&path, content).unwrap();
        path
    }

    /// Produces an events file and a subscriptions file.
    pub fn produce_files(&self, events: &Path, subscriptions: &Path) {
        self.produce_files_with(events, subscriptions, &[]);
    }

    /// [`Deployment::produce_files`] with extra `produce` arguments.
    pub fn produce_files_with(&self, events: &Path, subscriptions: &Path, args: &[&str]) {
        let out = Command::new(env!("CARGO_BIN_EXE_im-meter"))
            .args(["produce", "--events"])
            .arg(events)
            .arg("--subscriptions")
            .arg(subscriptions)
            .args(args)
            .envs(self.env())
            .output()
            .unwrap();
        assert!(out.status.success(), "produce failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    pub fn topic(&self, name: &str) -> String {
        format!("{}.{name}", self.prefix)
    }

    pub fn env(&self) -> Vec<(String, String)> {
        let mut env = vec![
            ("IM_METER__KAFKA__BROKERS".to_string(), brokers()),
            ("IM_METER__KAFKA__GROUP_ID".into(), self.prefix.clone()),
            ("IM_METER__KAFKA__PARTITIONS".into(), self.partitions.to_string()),
            ("IM_METER__KAFKA__COMMIT_INTERVAL".into(), "100ms".into()),
            ("IM_METER__KAFKA__IDLE_PARTITION_TIMEOUT".into(), "1s".into()),
            ("IM_METER__KAFKA__TRANSACTION_TIMEOUT".into(), "10s".into()),
            ("IM_METER__KAFKA__METADATA_REFRESH_INTERVAL".into(), "1s".into()),
            // Several workers run at once: each on a port of its own.
            ("IM_METER__HTTP__LISTEN".into(), "127.0.0.1:0".into()),
            // The sample is October 2026 and the worker bills every month since by the
            // clock: the usage API must keep October whatever the date (10 years).
            ("IM_METER__HTTP__HISTORY_MONTHS".into(), "120".into()),
        ];
        if CLUSTER.get().is_some() {
            env.push(("IM_METER__KAFKA__REPLICATION_FACTOR".into(), "3".into()));
        }
        for (t, _) in FileConfig::default().topics.fields() {
            env.push((format!("IM_METER__TOPICS__{}", t.to_uppercase()), self.topic(t)));
        }
        env
    }

    pub fn produce(&self) {
        let (events, subscriptions) = input();
        self.produce_files(events, subscriptions);
    }

    /// Sends `lines` (NDJSON events) to the events topic.
    pub fn produce_lines(&self, lines: &[String]) {
        let file = self.file("extra.ndjson", lines);
        let out = Command::new(env!("CARGO_BIN_EXE_im-meter"))
            .args(["produce", "--events"])
            .arg(&file)
            .envs(self.env())
            .output()
            .unwrap();
        assert!(out.status.success(), "produce failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// A worker `im-meter run` with this deployment's settings.
    pub fn worker(&self, instance: &str) -> Worker {
        self.worker_with(instance, &[], &[])
    }

    /// A worker with extra settings (`IM_METER_...` variables) and arguments.
    pub fn worker_with(&self, instance: &str, env: &[(&str, &str)], args: &[&str]) -> Worker {
        let log = std::env::temp_dir().join(format!("{}.{instance}.log", self.prefix));
        self.worker_logging_to(instance, env, args, std::fs::File::create(&log).unwrap(), log)
    }

    /// A worker like [`Deployment::worker_with`] whose log is appended to `log` (a restarted
    /// worker's log follows its predecessor's).
    pub fn worker_appending(&self, instance: &str, env: &[(&str, &str)], log: &Path) -> Worker {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        self.worker_logging_to(instance, env, &[], file, log.to_path_buf())
    }

    fn worker_logging_to(
        &self,
        instance: &str,
        env: &[(&str, &str)],
        args: &[&str],
        file: std::fs::File,
        log: PathBuf,
    ) -> Worker {
        let child = Command::new(env!("CARGO_BIN_EXE_im-meter"))
            .arg("run")
            .args(args)
            .envs(self.env())
            .env("IM_METER__KAFKA__INSTANCE_ID", instance)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap();
        Worker { child, log }
    }
}

pub struct Worker {
    pub child: Child,
    /// Where its stderr goes.
    pub log: PathBuf,
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
    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGINT: the worker commits and leaves the group; it must exit cleanly.
    pub fn stop(mut self) {
        Command::new("kill").args(["-INT", &self.child.id().to_string()]).status().unwrap();
        let status = self.child.wait().unwrap();
        assert!(
            status.success(),
            "worker exited with {status}; log: {}",
            std::fs::read_to_string(&self.log).unwrap()
        );
    }

    /// Everything the worker logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The address its HTTP endpoints listen on, from its log (started with
    /// `--log-format json`), waiting for it up to a minute.
    pub fn http_address(&mut self) -> std::net::SocketAddr {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let found = self.log_text().lines().find_map(|line| {
                let v: Value = serde_json::from_str(line).ok()?;
                v["fields"]["address"].as_str()?.parse().ok()
            });
            if let Some(address) = found {
                return address;
            }
            self.assert_alive();
            assert!(Instant::now() < deadline, "no HTTP address logged: {}", self.log_text());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits (up to `within`) until its `/readyz` at `address` answers 200; panics with the
    /// last answer and the end of its log if it does not.
    pub fn assert_ready_within(&mut self, address: std::net::SocketAddr, within: Duration) {
        let deadline = Instant::now() + within;
        let mut last = String::new();
        while Instant::now() < deadline {
            self.assert_alive();
            let (status, body) = http_get(address, "/readyz");
            if status == 200 {
                return;
            }
            last = body;
            std::thread::sleep(Duration::from_millis(200));
        }
        let log = self.log_text();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        panic!("not ready after {within:?}: {last}\nthe worker's log ends:\n{}", tail.join("\n"));
    }

    pub fn assert_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("worker died ({status}); log: {}", std::fs::read_to_string(&self.log).unwrap_or_default());
        }
    }
}

/// Waits until the charges and usage topics hold as many records of the months replay
/// billed as replay printed (or the deadline passes), then checks them against replay:
/// same records, each key once. Later months are left out: the worker closes them by
/// the clock once they are over and bills their plan fees, as it should, while replay
/// bills only months with usage in its input.
pub fn assert_same_as_replay(d: &Deployment, workers: &mut [Worker]) {
    assert_same_as(expected(), d, workers);
}

/// [`assert_same_as_replay`] for any input's replay.
pub fn assert_same_as(want: &Expected, d: &Deployment, workers: &mut [Worker]) {
    assert_same_as_within(want, d, workers, Duration::from_secs(120));
}

/// [`assert_same_as`], waiting up to `within` for the records.
pub fn assert_same_as_within(want: &Expected, d: &Deployment, workers: &mut [Worker], within: Duration) {
    let months = want.months();
    let in_months = |mut records: BTreeMap<String, Value>| {
        records.retain(|key, _| key.split('/').nth(1).is_some_and(|m| months.contains(m)));
        records
    };
    let deadline = Instant::now() + within;
    loop {
        let charges = in_months(by_key(read_all(&d.topic("charges"))));
        let usage = in_months(by_key(read_all(&d.topic("usage"))));
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

/// Runs one worker (`instance` a, with extra `settings`) until it has billed what replay
/// billed of `want`, checks it did so alike, and stops it.
pub fn one_worker_bills_as(want: &Expected, d: &Deployment, settings: &[(&str, &str)]) {
    let mut workers = vec![d.worker_with("a", settings, &[])];
    assert_same_as(want, d, &mut workers);
    workers.pop().unwrap().stop();
}

/// Records by key; a key published twice fails the test.
pub fn by_key(records: Vec<Record>) -> BTreeMap<String, Value> {
    let mut by_key = BTreeMap::new();
    for record in records {
        let key = String::from_utf8(record.key.expect("outputs are keyed")).unwrap();
        let previous = by_key.insert(key.clone(), serde_json::from_slice(&record.value).unwrap());
        assert!(previous.is_none(), "{key} published twice");
    }
    by_key
}

pub fn assert_same(got: BTreeMap<String, Value>, want: &BTreeMap<String, Value>, what: &str) {
    assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "{what}");
    for (key, value) in &got {
        assert_eq!(value, &want[key], "{what} {key}");
    }
}

/// A record as read back.
#[derive(Debug)]
pub struct Record {
    pub partition: i32,
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    /// The record has no value (a deletion in a compacted topic).
    pub tombstone: bool,
    /// Headers, values as text.
    pub headers: BTreeMap<String, String>,
}

/// Every committed record of a topic.
pub fn read_all(topic: &str) -> Vec<Record> {
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
                    tombstone: m.payload().is_none(),
                    headers,
                });
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => at_end += 1,
            _ => {}
        }
    }
    records
}

/// `GET path` on `address`: the status code and the body. A small HTTP/1.1 client: the
/// endpoints answer with a Content-Length and close the connection when asked.
pub fn http_get(address: std::net::SocketAddr, path: &str) -> (u16, String) {
    http_get_with(address, path, "")
}

/// [`http_get`] with extra header lines (each ending in `\r\n`).
pub fn http_get_with(address: std::net::SocketAddr, path: &str, headers: &str) -> (u16, String) {
    let (status, _, body) = http_request(address, "GET", path, headers);
    (status, body)
}

/// `method path` on `address` with extra header lines: the status, the head (status line
/// and headers, lower-cased) and the body.
pub fn http_request(
    address: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &str,
) -> (u16, String, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&address, Duration::from_secs(5)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(stream, "{method} {path} HTTP/1.1\r\nHost: {address}\r\n{headers}Connection: close\r\n\r\n")
        .unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    let text = String::from_utf8(response).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let head = head.to_ascii_lowercase();
    let body = if head.contains("transfer-encoding: chunked") { dechunk(body) } else { body.to_string() };
    (status, head, body)
}

/// The body of a chunked response (Prometheus' API answers so).
fn dechunk(mut rest: &str) -> String {
    let mut body = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 || after.len() < size {
            break;
        }
        body.push_str(&after[..size]);
        rest = after[size..].trim_start_matches("\r\n");
    }
    body
}

/// `GET path` whose body is JSON.
pub fn http_json(address: std::net::SocketAddr, path: &str) -> (u16, Value) {
    let (status, body) = http_get(address, path);
    let value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {body}"));
    (status, value)
}

/// Waits (up to `within`) until `check` returns `Some`, and returns it.
pub fn eventually<T>(within: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// An admin client of the test broker, and a runtime to wait for its answers on.
fn admin() -> (rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext>, tokio::runtime::Runtime) {
    let admin = ClientConfig::new().set("bootstrap.servers", brokers()).create().unwrap();
    (admin, tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap())
}

/// Deletes every record of `topic` (all partitions, up to their ends), as retention would.
pub fn delete_all_records(topic: &str) {
    delete_records(topic, None);
}

/// Deletes every record of the `only` partitions of `topic` (all when `None`), up to their
/// ends, as retention or an operator's `kafka-delete-records.sh` would.
pub fn delete_records(topic: &str, only: Option<&[i32]>) {
    use rdkafka::admin::AdminOptions;
    let (admin, runtime) = admin();
    let reader: BaseConsumer = ClientConfig::new().set("bootstrap.servers", brokers()).create().unwrap();
    let metadata = reader.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
    let mut offsets = TopicPartitionList::new();
    for p in metadata.topics()[0].partitions().iter().filter(|p| only.is_none_or(|o| o.contains(&p.id()))) {
        let (_, high) = reader.fetch_watermarks(topic, p.id(), Duration::from_secs(10)).unwrap();
        offsets.add_partition_offset(topic, p.id(), Offset::Offset(high)).unwrap();
    }
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let deleted = runtime.block_on(admin.delete_records(&offsets, &options)).unwrap();
    for e in deleted.elements() {
        assert!(e.error().is_ok(), "{topic}/{}: {:?}", e.partition(), e.error());
    }
}

/// Creates `topic` with `partitions` and topic `settings`, as an operator would.
pub fn create_topic(topic: &str, partitions: i32, settings: &[(&str, &str)]) {
    use rdkafka::admin::{AdminOptions, NewTopic, TopicReplication};
    let (admin, runtime) = admin();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let new = settings
        .iter()
        .fold(NewTopic::new(topic, partitions, TopicReplication::Fixed(1)), |t, (k, v)| t.set(k, v));
    for result in runtime.block_on(admin.create_topics(&[new], &options)).unwrap() {
        result.unwrap();
    }
}

/// Deletes `topic` and creates it again with `partitions`, as an operator would: its
/// offsets start over.
pub fn recreate_topic(topic: &str, partitions: i32) {
    use rdkafka::admin::{AdminOptions, NewTopic, TopicReplication};
    let (admin, runtime) = admin();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for result in runtime.block_on(admin.delete_topics(&[topic], &options)).unwrap() {
        result.unwrap();
    }
    // The deletion completes in the background: creating fails until it has.
    eventually(Duration::from_secs(60), "the topic to be created again", || {
        let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
        let created = runtime.block_on(admin.create_topics(&[new], &options)).ok()?;
        created.into_iter().all(|r| r.is_ok()).then_some(())
    });
}

/// The value of one setting of `topic`, as the broker reports it.
pub fn topic_setting(topic: &str, key: &str) -> String {
    use rdkafka::admin::{AdminOptions, ResourceSpecifier};
    let (admin, runtime) = admin();
    let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(30)));
    let results =
        runtime.block_on(admin.describe_configs(&[ResourceSpecifier::Topic(topic)], &options)).unwrap();
    let resource = results.into_iter().next().unwrap().unwrap();
    resource.get(key).and_then(|e| e.value.clone()).unwrap_or_else(|| panic!("{topic} has no {key}"))
}

/// Sets `topic`'s configuration to `settings` (the others return to the broker's defaults),
/// as `kafka-configs.sh --alter` would.
pub fn set_topic_config(topic: &str, settings: &[(&str, &str)]) {
    use rdkafka::admin::{AdminOptions, AlterConfig, ResourceSpecifier};
    let (admin, runtime) = admin();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let config =
        settings.iter().fold(AlterConfig::new(ResourceSpecifier::Topic(topic)), |c, (k, v)| c.set(k, v));
    for result in runtime.block_on(admin.alter_configs(&[config], &options)).unwrap() {
        result.unwrap();
    }
}

/// Deletes consumer group `group` with its committed offsets, as Kafka does 7 days after a
/// group empties (or `kafka-consumer-groups.sh --delete`). The group must be empty.
pub fn delete_group(group: &str) {
    use rdkafka::admin::AdminOptions;
    let (admin, runtime) = admin();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for result in runtime.block_on(admin.delete_groups(&[group], &options)).unwrap() {
        result.unwrap();
    }
}

/// Moves the committed offsets of the empty group `group` on `topic` to each partition's
/// end, as `kafka-consumer-groups.sh --reset-offsets --to-latest --execute` does.
pub fn reset_group_to_latest(group: &str, topic: &str) {
    use rdkafka::consumer::CommitMode;
    let consumer: BaseConsumer =
        ClientConfig::new().set("bootstrap.servers", brokers()).set("group.id", group).create().unwrap();
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
    let mut offsets = TopicPartitionList::new();
    for p in metadata.topics()[0].partitions() {
        let (_, high) = consumer.fetch_watermarks(topic, p.id(), Duration::from_secs(10)).unwrap();
        offsets.add_partition_offset(topic, p.id(), Offset::Offset(high)).unwrap();
    }
    consumer.commit(&offsets, CommitMode::Sync).unwrap();
}

/// Adds partitions to `topic` until it has `partitions`, as an operator would.
pub fn grow_topic(topic: &str, partitions: usize) {
    use rdkafka::admin::{AdminOptions, NewPartitions};
    let (admin, runtime) = admin();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let grown = runtime.block_on(admin.create_partitions(&[NewPartitions::new(topic, partitions)], &options));
    for result in grown.unwrap() {
        result.unwrap();
    }
}

/// The partition count of `topic`.
pub fn partition_count(topic: &str) -> usize {
    let reader: BaseConsumer = ClientConfig::new().set("bootstrap.servers", brokers()).create().unwrap();
    let metadata = reader.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
    metadata.topics()[0].partitions().len()
}

/// Sends event lines to `topic` keyed by their app (lines that are not JSON unkeyed), with
/// librdkafka's default partitioner —
/// as the IM backend would, with a producer of its own (not `im-meter produce`, which also
/// prepares the worker's topics).
pub fn produce_keyed(topic: &str, lines: &[String]) {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("enable.idempotence", "true")
        // A fresh producer sees the partitions the topic has now.
        .set("topic.metadata.refresh.interval.ms", "1000")
        .create()
        .unwrap();
    for line in lines {
        let key = app_key(line);
        match &key {
            Some(key) => producer.send(BaseRecord::to(topic).key(key).payload(line)).map_err(|(e, _)| e),
            None => producer.send(BaseRecord::<(), _>::to(topic).payload(line)).map_err(|(e, _)| e),
        }
        .unwrap();
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(30)).unwrap();
}

/// The key an event line goes out with: its app id (a line that is not JSON goes unkeyed,
/// as `im-meter produce` sends it).
pub fn app_key(line: &str) -> Option<String> {
    serde_json::from_str::<Value>(line).ok().map(|event| event["app_id"].to_string())
}

/// Writes one record, `key` ← `value`, to partition `partition` of `topic`.
pub fn write_record(topic: &str, partition: i32, key: &[u8], value: &[u8]) {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let producer: BaseProducer = ClientConfig::new().set("bootstrap.servers", brokers()).create().unwrap();
    producer
        .send(BaseRecord::to(topic).partition(partition).key(key).payload(value))
        .map_err(|(e, _)| e)
        .unwrap();
    producer.flush(Duration::from_secs(30)).unwrap();
}

/// A transaction of a producer of the test's own, left open until the test ends it: it holds
/// the last stable offset of every partition it wrote to below its first record, as a slow
/// or stalled producer of the deployment's (or another one's) would.
pub struct OpenTransaction {
    producer: rdkafka::producer::BaseProducer,
}

impl OpenTransaction {
    /// Begins a transaction with `transactional_id` (its timeout long enough for any test)
    /// and writes `key` ← `value` to each of `partitions` of `topic`, delivered but not
    /// committed.
    pub fn begin(transactional_id: &str, topic: &str, partitions: &[i32], key: &[u8], value: &[u8]) -> Self {
        use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .set("transactional.id", transactional_id)
            .set("transaction.timeout.ms", "600000")
            .create()
            .unwrap();
        producer.init_transactions(Duration::from_secs(30)).unwrap();
        producer.begin_transaction().unwrap();
        for &p in partitions {
            producer
                .send(BaseRecord::to(topic).partition(p).key(key).payload(value))
                .map_err(|(e, _)| e)
                .unwrap();
        }
        producer.flush(Duration::from_secs(30)).unwrap();
        OpenTransaction { producer }
    }

    /// Commits it: its records become visible.
    pub fn commit(self) {
        use rdkafka::producer::Producer;
        self.producer.commit_transaction(Duration::from_secs(30)).unwrap();
    }

    /// Aborts it: none of its records is ever visible.
    pub fn abort(self) {
        use rdkafka::producer::Producer;
        self.producer.abort_transaction(Duration::from_secs(30)).unwrap();
    }
}

/// Sends one record of any size up to the broker's limit (`im-meter produce` keeps
/// librdkafka's 1,000,000-byte `message.max.bytes`; a Java producer's default
/// `max.request.size` allows a little more, and the broker's default record limit is
/// 1,048,588 bytes).
pub fn produce_large(topic: &str, key: &str, value: &[u8]) {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("message.max.bytes", "2000000")
        .create()
        .unwrap();
    producer.send(BaseRecord::to(topic).key(key).payload(value)).map_err(|(e, _)| e).unwrap();
    producer.flush(Duration::from_secs(30)).unwrap();
}

/// The SHA-256 of `bytes`, in lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}
