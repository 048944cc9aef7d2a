//! What the worker's stages say about themselves, for the operator endpoints: each
//! consumer's last poll, its partitions and how far it has read them, its state's size,
//! and a handle on the live metering state for the usage API and per-app metrics.
//!
//! The stages write here in passing (an atomic store per poll, a small lock per round);
//! the HTTP side only reads. Nothing here talks to Kafka.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use im_meter_core::time::Timestamp;

use crate::clock::ClockCheck;
use crate::failpoints::Failpoint;
use crate::view::MeterView;

/// Which stage a consumer belongs to.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum StageKind {
    /// Events → metering state.
    Meter,
    /// Changelog → charges.
    Bill,
}

impl StageKind {
    /// The `stage` label.
    pub fn label(self) -> &'static str {
        match self {
            StageKind::Meter => "meter",
            StageKind::Bill => "bill",
        }
    }
}

/// Where a consumer is with one partition.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PartitionState {
    /// Its state is restored and records are being applied.
    pub restored: bool,
    /// Why it is stopped, if its state cannot be trusted (it is not restored then).
    pub stopped: Option<String>,
    /// The offset of the next record to apply (`None`: none applied yet, none committed).
    pub next_offset: Option<i64>,
    /// The partition's end when last asked (the lag sampler asks).
    pub end_offset: Option<i64>,
    /// The event time the partition has reached (metering only).
    pub watermark: Option<Timestamp>,
    /// App-months it holds open (metering only).
    pub app_months: u64,
}

impl PartitionState {
    /// Records not applied yet, when the end is known.
    pub fn lag(&self) -> Option<i64> {
        self.end_offset.map(|end| (end - self.next_offset.unwrap_or(0)).max(0))
    }
}

/// A consumer's state as last reported.
#[derive(Clone, Debug, Default)]
pub struct ConsumerState {
    /// Assigned partitions.
    pub partitions: BTreeMap<i32, PartitionState>,
    /// App-months held (metering).
    pub app_months: u64,
    /// Connections tracked (metering).
    pub connections: u64,
    /// Bytes of state in the changelog (metering).
    pub state_bytes: u64,
    /// End of the oldest month not yet closed (metering) or billed (billing).
    pub oldest_open_month_end: Option<Timestamp>,
    /// Its transactions or broker calls fail, and have since the last that succeeded.
    pub failing: Option<FailingCalls>,
}

/// Transactions or broker calls failing one after another (brokers down, too few in-sync
/// replicas, the coordinator moving): readiness says so until one succeeds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailingCalls {
    /// When the first of them failed (Unix milliseconds).
    pub since_ms: i64,
    /// How many failed.
    pub failures: u64,
    /// The last error.
    pub error: String,
}

impl FailingCalls {
    /// Notes one more failure, with its error, in `failing` (begun now if it is not yet).
    fn note(failing: &mut Option<FailingCalls>, error: String) {
        let f = failing.get_or_insert_with(|| FailingCalls {
            since_ms: now_ms(),
            failures: 0,
            error: String::new(),
        });
        f.failures += 1;
        f.error = error;
    }

    /// What readiness says of `who`'s failures at `now_ms`.
    fn problem(&self, who: &str, what: &str, now_ms: i64) -> String {
        let secs = (now_ms - self.since_ms).max(0) / 1000;
        format!(
            "{who}: {what} failing for {secs} s ({} in a row), waiting for the brokers: {}",
            self.failures, self.error
        )
    }
}

/// One consumer thread of a stage.
#[derive(Debug)]
pub struct ConsumerStatus {
    /// Its stage.
    pub stage: StageKind,
    /// Its name within the worker (`0`, `1`, ... for metering; `0` for billing).
    pub consumer: String,
    /// The topic it reads.
    pub topic: String,
    last_poll_ms: AtomicI64,
    state: Mutex<ConsumerState>,
}

impl ConsumerStatus {
    /// Notes a poll of the consumer.
    pub fn polled(&self) {
        self.last_poll_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// Notes a transaction, a producer's start or a broker call that failed with `error`.
    pub fn broker_failed(&self, error: String) {
        FailingCalls::note(&mut self.state().failing, error);
    }

    /// Notes a transaction that committed, or a broker call that succeeded.
    pub fn broker_answered(&self) {
        self.state().failing = None;
    }

    /// When the consumer last polled (Unix milliseconds; 0: never).
    pub fn last_poll_ms(&self) -> i64 {
        self.last_poll_ms.load(Ordering::Relaxed)
    }

    /// The state to read or change (the lock is held briefly by everyone).
    pub fn state(&self) -> MutexGuard<'_, ConsumerState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records waiting in all partitions whose end is known.
    pub fn lag(&self) -> i64 {
        self.state().partitions.values().filter_map(PartitionState::lag).sum()
    }
}

/// Everything the stages report, shared with the operator endpoints.
#[derive(Default)]
pub struct Board {
    consumers: Mutex<Vec<Arc<ConsumerStatus>>>,
    view: Arc<MeterView>,
    /// How many consumers the worker starts: not ready until all have registered.
    expected: AtomicUsize,
    /// Whether the worker's clock agrees with the broker's.
    clock: Arc<ClockCheck>,
}

impl Board {
    /// A new, empty board.
    pub fn new() -> Arc<Self> {
        Arc::new(Board::default())
    }

    /// Says how many consumers the worker starts.
    pub fn expect_consumers(&self, n: usize) {
        self.expected.store(n, Ordering::Relaxed);
    }

    /// Registers a consumer and returns its status to report into.
    pub fn consumer(&self, stage: StageKind, consumer: &str, topic: &str) -> Arc<ConsumerStatus> {
        let status = Arc::new(ConsumerStatus {
            stage,
            consumer: consumer.to_string(),
            topic: topic.to_string(),
            last_poll_ms: AtomicI64::new(0),
            state: Mutex::new(ConsumerState::default()),
        });
        self.consumers.lock().unwrap_or_else(|e| e.into_inner()).push(Arc::clone(&status));
        status
    }

    /// What the clock probe found, and the time to judge events by.
    pub fn clock(&self) -> Arc<ClockCheck> {
        Arc::clone(&self.clock)
    }

    /// The metering view the stages publish into.
    pub fn view(&self) -> Arc<MeterView> {
        Arc::clone(&self.view)
    }

    /// Every registered consumer.
    pub fn consumers(&self) -> Vec<Arc<ConsumerStatus>> {
        self.consumers.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Why the worker is not ready, if it is not: a consumer not started, a partition being
    /// restored, or a consumer that has not polled for `stall_timeout` while records wait.
    /// A consumer with nothing assigned (more consumers than partitions) is ready.
    pub fn not_ready(&self, stall_timeout: Duration) -> Vec<String> {
        let consumers = self.consumers();
        let expected = self.expected.load(Ordering::Relaxed).max(1);
        if consumers.len() < expected {
            return vec![format!("{} of {expected} consumers have started", consumers.len())];
        }
        let now = now_ms();
        let mut problems: Vec<String> = self.clock.problem().into_iter().collect();
        for ((thread, what), f) in RETRYING.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            problems.extend(f.as_ref().map(|f| f.problem(thread, what, now)));
        }
        for c in consumers {
            let name = format!("{}-{}", c.stage.label(), c.consumer);
            let last = c.last_poll_ms();
            if last == 0 {
                problems.push(format!("{name}: has not polled yet"));
                continue;
            }
            let state = c.state();
            let restoring: Vec<i32> = state
                .partitions
                .iter()
                .filter(|(_, p)| !p.restored && p.stopped.is_none())
                .map(|(p, _)| *p)
                .collect();
            if !restoring.is_empty() {
                problems.push(format!("{name}: restoring partitions {restoring:?}"));
            }
            for (p, why) in state.partitions.iter().filter_map(|(p, s)| Some((p, s.stopped.as_ref()?))) {
                problems.push(format!("{name}: partition {p} stopped: {why}"));
            }
            if let Some(f) = &state.failing {
                problems.push(f.problem(&name, "transactions or broker calls", now));
            }
            drop(state);
            let silent = Duration::from_millis(u64::try_from(now - last).unwrap_or(0));
            let lag = c.lag();
            if silent >= stall_timeout && lag > 0 {
                problems.push(format!(
                    "{name}: has not polled for {} s with {lag} records waiting",
                    silent.as_secs()
                ));
            }
        }
        problems
    }
}

/// Broker calls being retried in place right now ([`crate::kafka::with_retries`]: a stage
/// waits inside the call), by the thread waiting and what the call does. Process-wide, as
/// the retrying call sites are deep in either stage; readiness lists them.
static RETRYING: Mutex<BTreeMap<(String, String), Option<FailingCalls>>> = Mutex::new(BTreeMap::new());

/// The calling thread's entry key for `what`.
fn retry_key(what: &str) -> (String, String) {
    let thread = std::thread::current();
    (thread.name().unwrap_or("worker").to_string(), what.to_string())
}

/// Notes that this thread's broker call `what` failed with `error` and is tried again.
pub fn call_retrying(what: &str, error: String) {
    let mut retrying = RETRYING.lock().unwrap_or_else(|e| e.into_inner());
    FailingCalls::note(retrying.entry(retry_key(what)).or_default(), error);
}

/// Notes that this thread's broker call `what` is no longer retried (it succeeded, or gave up).
pub fn call_done(what: &str) {
    RETRYING.lock().unwrap_or_else(|e| e.into_inner()).remove(&retry_key(what));
}

/// The worker's clock in Unix milliseconds (with the failpoints, off by the test's offset).
pub fn now_ms() -> i64 {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
    now + clock_offset_ms()
}

/// How far off a test sets the worker's clock ([`Failpoint::ClockOffsetMs`]): read once.
fn clock_offset_ms() -> i64 {
    static OFFSET: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    *OFFSET
        .get_or_init(|| Failpoint::ClockOffsetMs.value().and_then(|v| v.to_str()?.parse().ok()).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tests that read readiness, one at a time: the retried calls are process-wide.
    static READINESS: Mutex<()> = Mutex::new(());

    #[test]
    fn a_stalled_consumer_with_records_waiting_is_not_ready() {
        let _one = READINESS.lock().unwrap_or_else(|e| e.into_inner());
        let board = Board::new();
        board.expect_consumers(2);
        assert!(!board.not_ready(Duration::from_secs(1)).is_empty(), "nothing started yet");
        let c = board.consumer(StageKind::Meter, "0", "events");
        c.polled();
        assert_eq!(board.not_ready(Duration::from_secs(1)), vec!["1 of 2 consumers have started"]);
        let billing = board.consumer(StageKind::Bill, "0", "changelog");
        billing.polled();
        c.polled();
        c.state().partitions.insert(3, PartitionState { restored: false, ..Default::default() });
        assert!(board.not_ready(Duration::from_secs(1))[0].contains("restoring partitions [3]"));
        c.state().partitions.insert(
            3,
            PartitionState {
                restored: true,
                next_offset: Some(10),
                end_offset: Some(10),
                ..Default::default()
            },
        );
        assert!(board.not_ready(Duration::from_secs(60)).is_empty());
        // Silent, but nothing waits: still ready (an idle topic is not a stall).
        c.last_poll_ms.store(now_ms() - 5_000, Ordering::Relaxed);
        assert!(board.not_ready(Duration::from_secs(1)).is_empty());
        // Silent with records waiting: not ready; polling again makes it ready.
        c.state().partitions.get_mut(&3).unwrap().end_offset = Some(25);
        let problems = board.not_ready(Duration::from_secs(1));
        assert!(problems[0].contains("with 15 records waiting"), "{problems:?}");
        c.polled();
        assert!(board.not_ready(Duration::from_secs(1)).is_empty());
        // A stopped partition says why.
        c.state().partitions.insert(
            4,
            PartitionState { stopped: Some("its changelog lost records".into()), ..Default::default() },
        );
        assert_eq!(
            board.not_ready(Duration::from_secs(1)),
            vec!["meter-0: partition 4 stopped: its changelog lost records"]
        );
    }

    #[test]
    fn failing_broker_calls_make_the_worker_not_ready_until_one_succeeds() {
        let _one = READINESS.lock().unwrap_or_else(|e| e.into_inner());
        let board = Board::new();
        let c = board.consumer(StageKind::Bill, "0", "changelog");
        c.polled();
        assert!(board.not_ready(Duration::from_secs(60)).is_empty());
        c.broker_failed("NOT_ENOUGH_REPLICAS".into());
        c.broker_failed("all brokers down".into());
        let problems = board.not_ready(Duration::from_secs(60));
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with("bill-0: transactions or broker calls failing for 0 s (2 in a row)"),
            "{problems:?}"
        );
        assert!(problems[0].ends_with(": all brokers down"), "the last error: {problems:?}");
        c.broker_answered();
        assert!(board.not_ready(Duration::from_secs(60)).is_empty());
    }

    #[test]
    fn a_broker_call_retried_in_place_makes_the_worker_not_ready_until_it_is_done() {
        let _one = READINESS.lock().unwrap_or_else(|e| e.into_inner());
        let board = Board::new();
        board.consumer(StageKind::Meter, "0", "events").polled();
        let what = "reading where test-topic [7] ends";
        call_retrying(what, "Local: Timed out".into());
        let problems = board.not_ready(Duration::from_secs(60));
        assert!(
            problems
                .iter()
                .any(|p| p.contains(what) && p.ends_with("waiting for the brokers: Local: Timed out")),
            "{problems:?}"
        );
        call_done(what);
        let problems = board.not_ready(Duration::from_secs(60));
        assert!(!problems.iter().any(|p| p.contains(what)), "{problems:?}");
    }
}
