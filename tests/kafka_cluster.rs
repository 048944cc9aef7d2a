//! The worker on a three-node Kafka cluster (`scripts/kafka.sh cluster`, started here if it
//! is not running): its topics get three replicas and `min.insync.replicas` 2; kill -9 of the
//! leader of a changelog partition, or of the worker's transaction coordinator, while the
//! month is metered and closed, changes no charge; with two of three brokers down no write
//! can count, the worker waits and says why, and bills right once they are back.
//!
//! Each test uses its own topics and groups. The tests run one at a time: they kill nodes.

mod support;

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use support::*;

/// One test at a time: they kill and restart the cluster's nodes.
static SERIAL: Mutex<()> = Mutex::new(());

/// The cluster, and a deployment of the test's own on it whose subscriptions (and topics)
/// are in place but no event yet.
fn deployment(name: &str) -> Deployment {
    use_cluster();
    let d = Deployment::new(name);
    let (_, subscriptions) = input();
    d.produce_files(&d.file("no-events.ndjson", &[]), subscriptions);
    d
}

/// The input's event lines.
fn input_lines() -> Vec<String> {
    std::fs::read_to_string(&input().0).unwrap().lines().map(str::to_string).collect()
}

/// `im_meter_commits_total` of `stage`, from the worker's metrics.
fn commits(address: SocketAddr, stage: &str) -> u64 {
    let prefix = format!("im_meter_commits_total{{stage=\"{stage}\"}} ");
    let text = http_get(address, "/metrics").1;
    text.lines().find_map(|l| l.strip_prefix(&prefix)?.parse().ok()).unwrap_or(0)
}

/// Watches the worker's metering commits from `killed` on, in the background: the time
/// until a transaction begun after the kill has committed (two commits after the count at
/// the kill: at most one is in flight at a time).
fn time_to_next_commit(address: SocketAddr, killed: Instant) -> std::thread::JoinHandle<Duration> {
    let before = commits(address, "meter");
    std::thread::spawn(move || {
        eventually(Duration::from_secs(120), "a commit after the kill", || {
            (commits(address, "meter") >= before + 2).then(|| killed.elapsed())
        })
    })
}

/// Settings of a worker that reads events as they are produced: October is long over, so a
/// partition silent for `kafka.idle_partition_timeout` would close it by the clock, and the
/// events still to come would be late. Silence of a part's pause, or of a fault (a leader
/// moves in about 10 s), must not close it.
const STREAMING: [(&str, &str); 1] = [("IM_METER__KAFKA__IDLE_PARTITION_TIMEOUT", "30s")];

/// Sends the input's events in `chunks` parts, `pause` apart; before part `at`, calls `fault`.
fn stream_events(d: &Deployment, chunks: usize, pause: Duration, at: usize, mut fault: impl FnMut()) {
    let lines = input_lines();
    for (i, chunk) in lines.chunks(lines.len().div_ceil(chunks)).enumerate() {
        if i == at {
            fault();
        }
        produce_keyed(&d.topic("events"), chunk);
        std::thread::sleep(pause);
    }
}

#[test]
fn topics_get_three_replicas_and_two_in_sync() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let d = deployment("replicas");
    for topic in
        ["events", "subscriptions", "changelog", "billing_changelog", "plan_book", "charges", "usage"]
    {
        let topic = d.topic(topic);
        assert!(replica_counts(&topic).iter().all(|&r| r == 3), "{topic}: {:?}", replica_counts(&topic));
        assert_eq!(topic_setting(&topic, "min.insync.replicas"), "2", "{topic}");
    }
}

/// Streams the input to a worker of deployment `name` in `chunks` parts, `pause` apart, and
/// kills -9 the broker `pick` names before part `at`; prints the time from the kill to the
/// next committed transaction, starts the broker again, and checks the bill against replay.
fn bills_right_through_a_broker_kill(
    name: &str,
    (chunks, pause, at): (usize, Duration, usize),
    what: &str,
    pick: impl Fn(&Deployment) -> i32,
) {
    let d = deployment(name);
    let mut worker = d.worker_with("a", &STREAMING, &["--log-format", "json"]);
    let address = worker.http_address();
    let (mut killed, mut watch) = (None, None);
    stream_events(&d, chunks, pause, at, || {
        let node = pick(&d);
        watch = Some(time_to_next_commit(address, Instant::now()));
        killed = Some(KilledNode::kill(node));
    });
    let next_commit = watch.unwrap().join().unwrap();
    eprintln!("{what} kill → next committed transaction: {:.1} s", next_commit.as_secs_f64());
    killed.unwrap().restart();
    let mut workers = vec![worker];
    assert_same_as_replay(&d, &mut workers);
    workers.pop().unwrap().stop();
}

#[test]
fn killing_the_leader_of_a_changelog_partition_while_metering_changes_no_charge() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    bills_right_through_a_broker_kill("leader", (20, Duration::from_millis(500), 6), "leader", |d| {
        leader_of(&d.topic("changelog"), 0)
    });
}

#[test]
fn killing_the_transaction_coordinator_while_the_month_closes_changes_no_charge() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // The last part goes out right after the kill: the month closes while the coordinator
    // of the metering transactions moves.
    bills_right_through_a_broker_kill(
        "coordinator",
        (10, Duration::from_millis(300), 9),
        "coordinator",
        |d| transaction_coordinator(&format!("{}-meter-a", d.prefix)),
    );
}

#[test]
fn with_two_brokers_of_three_down_the_worker_waits_says_why_and_bills_right_after() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let d = deployment("quorum");
    d.produce_lines(&input_lines());
    // October is metered and closed; billing holds it until two brokers are down.
    let hold = std::env::temp_dir().join(format!("{}.hold-bills", d.prefix));
    std::fs::write(&hold, b"").unwrap();
    let mut worker = d.worker_with(
        "a",
        &[("IM_METER_TEST_HOLD_BILLS_FILE", hold.to_str().unwrap())],
        &["--log-format", "json"],
    );
    let address = worker.http_address();
    eventually(Duration::from_secs(120), "October to be ready to bill", || {
        worker.assert_alive();
        worker.log_text().contains("failpoint: billing holds its months").then_some(())
    });
    let down = [KilledNode::kill(2), KilledNode::kill(3)];
    std::fs::remove_file(&hold).unwrap();
    // No write can reach two replicas: billing cannot publish, and readiness says why.
    let problems = eventually(Duration::from_secs(90), "readiness to say why the worker waits", || {
        worker.assert_alive();
        let (status, body) = http_json(address, "/readyz");
        let problems = body["problems"].to_string();
        (status == 503 && problems.contains("waiting for the brokers")).then_some(problems)
    });
    eprintln!("not ready: {problems}");
    // Longer than a transaction may stay open (10 s): the worker goes on waiting.
    std::thread::sleep(Duration::from_secs(15));
    worker.assert_alive();
    drop(down);
    let mut workers = vec![worker];
    assert_same_as_replay(&d, &mut workers);
    let mut worker = workers.pop().unwrap();
    worker.assert_ready_within(address, Duration::from_secs(60));
    worker.stop();
}
