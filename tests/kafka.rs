//! `im-meter produce` and `im-meter run` against a real Apache Kafka broker
//! (`scripts/kafka.sh start`; address in `IM_METER_TEST_BROKERS`, default 127.0.0.1:9092):
//! produce keys every line by app; the worker's usage and charges equal those of `replay`
//! over the same input, through poison records, kill -9 at any moment, consumer group
//! rebalances and a broker restart, and every output is published exactly once.
//!
//! Each test uses its own topics and groups. The tests run one at a time (they share the
//! broker, and one restarts it).

mod support;

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

/// One test at a time: they share the broker (and one restarts it).
static SERIAL: Mutex<()> = Mutex::new(());

/// Waits until the charges and usage topics hold as many records of the months replay
/// billed as replay printed (or the deadline passes), then checks them against replay:
/// same records, each key once. Later months are left out: the worker closes them by
/// the clock once they are over and bills their plan fees, as it should, while replay
/// bills only months with usage in its input.
fn assert_same_as_replay(d: &Deployment, workers: &mut [Worker]) {
    let want = expected();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let charges = in_replayed_months(by_key(read_all(&d.topic("charges"))));
        let usage = in_replayed_months(by_key(read_all(&d.topic("usage"))));
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
    assert_same_as_replay(&d, &mut workers);
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
    assert_same_as_replay(&d, &mut workers);
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
    assert_same_as_replay(&d, &mut workers);
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
    assert_same_as_replay(&d, &mut workers);
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
