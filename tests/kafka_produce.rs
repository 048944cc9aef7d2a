//! `im-meter produce` against a real Apache Kafka broker (`scripts/kafka.sh start`; address
//! in `IM_METER_TEST_BROKERS`, default 127.0.0.1:9092). Each test uses its own topics.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

fn brokers() -> String {
    std::env::var("IM_METER_TEST_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// A topic name no other test (or earlier run) uses.
fn unique(name: &str) -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
    format!("test.{name}.{}.{nanos}", std::process::id())
}

/// Every record of a topic: `(partition, key, payload)`, read until each partition's end.
fn read_all(topic: &str) -> Vec<(i32, Option<String>, String)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create()
        .unwrap();
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
    let partitions = metadata.topics()[0].partitions().len();
    let mut assignment = TopicPartitionList::new();
    for p in 0..partitions as i32 {
        assignment.add_partition_offset(topic, p, Offset::Beginning).unwrap();
    }
    consumer.assign(&assignment).unwrap();
    let mut records = Vec::new();
    let mut at_end = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while at_end < partitions {
        assert!(Instant::now() < deadline, "timed out reading {topic}");
        match consumer.poll(Duration::from_millis(500)) {
            Some(Ok(m)) => records.push((
                m.partition(),
                m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned(),
            )),
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => at_end += 1,
            Some(Err(e)) => panic!("reading {topic}: {e}"),
            None => {}
        }
    }
    records
}

#[test]
fn produce_sends_every_line_keyed_by_app() {
    let events = unique("events");
    let subscriptions = unique("subscriptions");
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/sample");
    let out = Command::new(env!("CARGO_BIN_EXE_im-meter"))
        .args(["produce", "--sample", "--partitions", "3", "--subscriptions"])
        .arg(sample.join("subscriptions.ndjson"))
        .env("IM_METER__KAFKA__BROKERS", brokers())
        .env("IM_METER__TOPICS__EVENTS", &events)
        .env("IM_METER__TOPICS__SUBSCRIPTIONS", &subscriptions)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "produce failed (is the broker up? scripts/kafka.sh start): {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let expected = std::fs::read_to_string(sample.join("events.ndjson")).unwrap();
    let records = read_all(&events);
    assert_eq!(records.len(), expected.lines().count());
    let mut sent: Vec<&str> = expected.lines().collect();
    let mut got: Vec<&str> = records.iter().map(|(_, _, v)| v.as_str()).collect();
    sent.sort_unstable();
    got.sort_unstable();
    assert_eq!(got, sent, "every line arrives unchanged, malformed ones included");

    // Keyed by app_id, so each app's events sit in one partition; only lines without a
    // readable app_id go unkeyed.
    let mut partition_of: HashMap<String, i32> = HashMap::new();
    let mut unkeyed = 0;
    for (partition, key, value) in &records {
        match key {
            Some(app) => {
                assert!(value.contains(&format!("\"app_id\":{app}")), "{key:?} vs {value}");
                assert_eq!(*partition_of.entry(app.clone()).or_insert(*partition), *partition, "app {app}");
            }
            None => unkeyed += 1,
        }
    }
    assert_eq!(partition_of.len(), 6);
    assert!(unkeyed > 0 && unkeyed < 100, "{unkeyed} unkeyed");
    assert_eq!(read_all(&subscriptions).len(), 13);
}
