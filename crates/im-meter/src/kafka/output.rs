//! What the stages write: a transactional producer ([`Outbox`]), the same on a thread of
//! its own ([`BackgroundOutbox`]), and dead-letter records.

use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::Context;
use im_meter_core::ingest::Rejection;
use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, TopicPartitionList};
use tracing::warn;

use super::fetch::Fetched;
use crate::status::ConsumerStatus;

/// The most of a refused record's payload a dead letter carries: a larger payload is cut to
/// its first this many bytes (the whole record stays in its source topic, at the letter's
/// coordinates, for the topic's retention). Every letter says the payload's whole length
/// and SHA-256, so a cut one is known for what it is.
pub const DEAD_LETTER_PAYLOAD_MAX: usize = 64 * 1024;

/// The most of a refused record's key a dead letter carries (a longer one is cut too).
pub const DEAD_LETTER_KEY_MAX: usize = 4 * 1024;

/// The most of a rejection's detail a dead letter carries (details can quote the input).
const DEAD_LETTER_DETAIL_MAX: usize = 1024;

/// The largest dead letter record: payload, key, headers and the batch's overhead. The
/// dead-letter topic must take records this large (checked at start), so that no dead letter
/// can ever make its transaction fail.
pub const DEAD_LETTER_RECORD_MAX: usize = DEAD_LETTER_PAYLOAD_MAX + DEAD_LETTER_KEY_MAX + 8 * 1024;

/// A refused input record — its bytes as read (cut to [`DEAD_LETTER_PAYLOAD_MAX`] and
/// [`DEAD_LETTER_KEY_MAX`]), the whole payload's length and SHA-256, where it came from,
/// and why.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    key: Option<Vec<u8>>,
    raw: Vec<u8>,
    /// The whole payload's length and SHA-256 (lower-case hex).
    length: usize,
    sha256: String,
    /// The key's whole length, when it was cut.
    key_length: Option<usize>,
    reason: &'static str,
    detail: String,
    topic: String,
    partition: i32,
    offset: i64,
}

/// The first `max` bytes of `bytes`.
fn prefix(bytes: &[u8], max: usize) -> Vec<u8> {
    bytes[..bytes.len().min(max)].to_vec()
}

impl DeadLetter {
    /// A letter of `payload` (and `key`) as refused, cut to the documented limits.
    fn new(
        key: Option<&[u8]>,
        payload: &[u8],
        why: Rejection,
        topic: &str,
        partition: i32,
        offset: i64,
    ) -> Self {
        use sha2::Digest;
        let sha256 = sha2::Sha256::digest(payload).iter().map(|b| format!("{b:02x}")).collect();
        let mut detail = why.detail;
        if detail.len() > DEAD_LETTER_DETAIL_MAX {
            let mut end = DEAD_LETTER_DETAIL_MAX;
            while !detail.is_char_boundary(end) {
                end -= 1;
            }
            detail.truncate(end);
            detail.push('…');
        }
        DeadLetter {
            key: key.map(|k| prefix(k, DEAD_LETTER_KEY_MAX)),
            key_length: key.filter(|k| k.len() > DEAD_LETTER_KEY_MAX).map(<[u8]>::len),
            raw: prefix(payload, DEAD_LETTER_PAYLOAD_MAX),
            length: payload.len(),
            sha256,
            reason: why.reason.code(),
            detail,
            topic: topic.to_string(),
            partition,
            offset,
        }
    }

    /// Whether the letter holds less than the record it stands for.
    pub fn truncated(&self) -> bool {
        self.raw.len() < self.length || self.key_length.is_some()
    }

    /// Its reason's code (`late`, `invalid_change`, …).
    pub fn reason(&self) -> &'static str {
        self.reason
    }

    /// The dead letter of a record this worker wrote itself (`offset` -1: it was not
    /// consumed from anywhere), e.g. usage that reached billing after its month was billed.
    pub fn written(key: &[u8], raw: &[u8], why: Rejection, topic: &str, partition: i32) -> Self {
        Self::new(Some(key), raw, why, topic, partition, -1)
    }

    /// The dead letter of a consumed record.
    pub fn of(record: &Fetched<'_>, why: Rejection) -> Self {
        Self::new(record.key, record.payload, why, record.topic, record.partition, record.offset)
    }

    /// The dead letter of a poison record ([`super::poison`]): its coordinates, length and
    /// SHA-256 only, since its bytes may be what made the transactions fail.
    pub fn poison(record: &Fetched<'_>, detail: String) -> Self {
        let why = Rejection::new(im_meter_core::ingest::RejectReason::Poison, detail);
        let mut letter = Self::new(None, record.payload, why, record.topic, record.partition, record.offset);
        letter.raw.clear();
        letter
    }
}

/// The one transaction open at a time on an [`Outbox`].
pub struct Transaction<'a> {
    producer: &'a BaseProducer,
    timeout: Duration,
    /// Records queued so far.
    sent: std::cell::Cell<usize>,
}

impl Transaction<'_> {
    /// Queues a record (`partition: None` lets the key choose; `value: None` is a tombstone).
    pub fn send(
        &self,
        topic: &str,
        partition: Option<i32>,
        key: &[u8],
        value: Option<&[u8]>,
        headers: Option<OwnedHeaders>,
    ) -> anyhow::Result<()> {
        let mut record = BaseRecord::<[u8], [u8]>::to(topic).key(key);
        if let Some(p) = partition {
            record = record.partition(p);
        }
        if let Some(v) = value {
            record = record.payload(v);
        }
        if let Some(h) = headers {
            record = record.headers(h);
        }
        self.queue(topic, record)
    }

    /// Queues a copy of a record to partition `partition`, with the original's timestamp
    /// and one header (`name`, `value`) saying where it came from.
    pub fn send_copy(
        &self,
        topic: &str,
        partition: i32,
        key: &[u8],
        value: &[u8],
        timestamp: Option<i64>,
        (name, header): (&str, &str),
    ) -> anyhow::Result<()> {
        let headers = OwnedHeaders::new().insert(Header { key: name, value: Some(header) });
        let mut record =
            BaseRecord::<[u8], [u8]>::to(topic).partition(partition).key(key).payload(value).headers(headers);
        if let Some(ts) = timestamp {
            record = record.timestamp(ts);
        }
        self.queue(topic, record)
    }

    fn queue<'r>(&self, topic: &str, mut record: BaseRecord<'r, [u8], [u8]>) -> anyhow::Result<()> {
        // Set at the first unknown partition only: no clock read per record.
        let mut deadline = None;
        loop {
            match self.producer.send(record) {
                Ok(()) => {
                    self.sent.set(self.sent.get() + 1);
                    return Ok(());
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    self.producer.poll(Duration::from_millis(10));
                }
                // A partition added since the producer last refreshed its metadata (the
                // changelog grows with the events topic; the periodic refresh is minutes
                // away): refresh it now — a metadata request updates the producer's cache.
                Err((e @ KafkaError::MessageProduction(RDKafkaErrorCode::UnknownPartition), back))
                    if Instant::now() < *deadline.get_or_insert_with(|| Instant::now() + self.timeout) =>
                {
                    record = back;
                    tracing::info!(error = %e, topic, "a partition unknown to the producer; refreshing its metadata");
                    let _ = self.producer.client().fetch_metadata(Some(topic), self.timeout);
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err((e, _)) => return Err(e).with_context(|| format!("cannot send to {topic}")),
            }
        }
    }

    /// Queues a record whose value is `value` as JSON.
    pub fn send_json(&self, topic: &str, key: &str, value: &impl serde::Serialize) -> anyhow::Result<()> {
        self.send(topic, None, key.as_bytes(), Some(&serde_json::to_vec(value)?), None)
    }

    /// Queues a dead letter: the raw bytes (or their first [`DEAD_LETTER_PAYLOAD_MAX`]) as
    /// value, the reason, the source and what the whole payload was as headers.
    pub fn dead_letter(&self, topic: &str, letter: &DeadLetter) -> anyhow::Result<()> {
        let (partition, offset) = (letter.partition.to_string(), letter.offset.to_string());
        let length = letter.length.to_string();
        let mut headers = OwnedHeaders::new()
            .insert(Header { key: "reason", value: Some(letter.reason) })
            .insert(Header { key: "detail", value: Some(&letter.detail) })
            .insert(Header { key: "source_topic", value: Some(&letter.topic) })
            .insert(Header { key: "source_partition", value: Some(&partition) })
            .insert(Header { key: "source_offset", value: Some(&offset) })
            .insert(Header { key: "payload_length", value: Some(&length) })
            .insert(Header { key: "payload_sha256", value: Some(&letter.sha256) })
            .insert(Header {
                key: "truncated",
                value: Some(if letter.truncated() { "true" } else { "false" }),
            });
        if let Some(key_length) = letter.key_length {
            headers = headers.insert(Header { key: "key_length", value: Some(&key_length.to_string()) });
        }
        let key = letter.key.as_deref().unwrap_or_default();
        self.send(topic, None, key, Some(&letter.raw), Some(headers))
    }

    /// Adds consumed offsets to the transaction (committed with it, for the group).
    pub fn send_offsets(
        &self,
        offsets: &TopicPartitionList,
        group: &ConsumerGroupMetadata,
    ) -> anyhow::Result<()> {
        self.producer.send_offsets_to_transaction(offsets, group, self.timeout).context("cannot add offsets")
    }
}

/// How a transaction ended when it did not commit.
#[derive(Debug, thiserror::Error)]
pub enum TransactionFailed {
    /// Aborted: nothing of it is visible. The caller must rebuild its state from what was
    /// committed before (it had already moved on in memory).
    #[error("transaction aborted: {0:#}")]
    Aborted(anyhow::Error),
    /// The commit was attempted and then failed, and the abort could not confirm that
    /// nothing was committed: the producer was replaced (fencing the old one, which makes
    /// the broker complete or abort the transaction), and the transaction may or may not be
    /// visible. The caller must learn the outcome from Kafka — re-read its state — before
    /// it writes again: redoing the work could publish it twice.
    #[error("transaction outcome unknown: {0:#}")]
    Unknown(anyhow::Error),
    /// The producer cannot go on (fenced by a newer worker with the same id, or a fatal
    /// broker error): the worker must stop.
    #[error("transactional producer failed: {0:#}")]
    Fatal(anyhow::Error),
}

impl TransactionFailed {
    /// Why, in a word (the `cause` label of `im_meter_transaction_aborts_total`): `broker`
    /// (unreachable, slow, a leader or coordinator moving), `fenced` (the consumer group
    /// moved on: a rebalance, a member past its poll limit), `unknown_outcome`, `fatal`
    /// (the producer fenced by a newer one with its id), `other` (a record refused).
    pub fn cause(&self) -> &'static str {
        use RDKafkaErrorCode as C;
        const FENCED: &[RDKafkaErrorCode] = &[
            C::IllegalGeneration,
            C::UnknownMemberId,
            C::FencedInstanceId,
            C::RebalanceInProgress,
            C::InvalidProducerEpoch,
        ];
        let fenced = |e: &anyhow::Error| {
            e.chain()
                .filter_map(|cause| cause.downcast_ref::<KafkaError>())
                .any(|k| k.rdkafka_error_code().is_some_and(|code| FENCED.contains(&code)))
        };
        match self {
            Self::Fatal(_) => "fatal",
            Self::Unknown(_) => "unknown_outcome",
            _ if self.transient() => "broker",
            Self::Aborted(e) if fenced(e) => "fenced",
            Self::Aborted(_) => "other",
        }
    }

    /// Whether the producer was fenced by a newer one with its transactional id (another
    /// worker took over what it wrote for): fatal for the producer, not for the worker.
    pub fn fenced_by_newer_producer(&self) -> bool {
        use RDKafkaErrorCode as C;
        let Self::Fatal(e) = self else { return false };
        e.chain()
            .filter_map(|cause| cause.downcast_ref::<KafkaError>())
            .any(|k| k.rdkafka_error_code().is_some_and(|code| matches!(code, C::Fenced | C::ProducerFenced)))
    }

    /// Whether it failed for a reason that says nothing about what it held: the broker
    /// unreachable or slow, a leader or coordinator moving, a timeout.
    pub fn transient(&self) -> bool {
        let (Self::Aborted(e) | Self::Unknown(e) | Self::Fatal(e)) = self;
        has_transient_cause(e)
    }
}

/// Whether a Kafka error that comes and goes with the cluster is among `e`'s causes.
fn has_transient_cause(e: &anyhow::Error) -> bool {
    e.chain().filter_map(|cause| cause.downcast_ref::<KafkaError>()).any(is_transient)
}

/// Kafka errors that come and go with the cluster, whatever a transaction holds.
fn is_transient(e: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    const TRANSIENT: &[RDKafkaErrorCode] = &[
        C::BrokerTransportFailure,
        C::Resolve,
        C::MessageTimedOut,
        C::AllBrokersDown,
        C::OperationTimedOut,
        C::TimedOutQueue,
        C::LeaderNotAvailable,
        C::NotLeaderForPartition,
        C::RequestTimedOut,
        C::NetworkException,
        C::CoordinatorLoadInProgress,
        C::CoordinatorNotAvailable,
        C::NotCoordinator,
        C::NotEnoughReplicas,
        C::NotEnoughReplicasAfterAppend,
        C::ConcurrentTransactions,
        C::KafkaStorageError,
    ];
    matches!(e, KafkaError::Transaction(t) if t.is_retriable())
        || e.rdkafka_error_code().is_some_and(|code| TRANSIENT.contains(&code))
}

/// A transactional producer.
pub struct Outbox {
    client: ClientConfig,
    producer: BaseProducer,
    timeout: Duration,
    /// The consumer it writes for: its stage labels the metrics, and failures are reported
    /// to it (readiness says why the worker waits).
    status: Arc<ConsumerStatus>,
    /// A failpoint for tests: the next commit that succeeds is reported as failed.
    fail_next_commit: bool,
}

/// How long the worker keeps trying to (re)initialise transactions, e.g. while the broker
/// restarts or its transaction coordinator loads, before it gives up.
const INIT_DEADLINE: Duration = Duration::from_secs(180);

fn is_fatal(e: &KafkaError) -> bool {
    matches!(e, KafkaError::Transaction(t) if t.is_fatal())
}

/// An operation not valid in the producer's transactional state (e.g. an abort with no
/// transaction in progress).
fn is_state_error(e: &KafkaError) -> bool {
    matches!(e, KafkaError::Transaction(t) if t.code() == RDKafkaErrorCode::State)
}

impl Outbox {
    /// A producer with `transactional_id`, initialised: any transaction a previous process
    /// with the same id left open is aborted now.
    pub fn transactional(
        client: &ClientConfig,
        transactional_id: &str,
        timeout: Duration,
        status: Arc<ConsumerStatus>,
    ) -> anyhow::Result<Self> {
        let mut client = client.clone();
        client
            .set("transactional.id", transactional_id)
            // Implied by transactions (they need idempotence, which needs all in-sync
            // replicas), said here so that no setting can weaken it: a record counts once
            // the topic's min.insync.replicas brokers have it.
            .set("acks", "all")
            .set("transaction.timeout.ms", timeout.as_millis().to_string())
            .set("linger.ms", "5")
            .set("compression.type", "lz4");
        let producer = Self::connect(&client, timeout, &status)?;
        Ok(Outbox { client, producer, timeout, status, fail_next_commit: false })
    }

    /// Creates and initialises the producer, retrying what is not fatal (a broker down,
    /// its coordinator loading) until [`INIT_DEADLINE`]; each failure is told to `status`.
    fn connect(
        client: &ClientConfig,
        timeout: Duration,
        status: &ConsumerStatus,
    ) -> anyhow::Result<BaseProducer> {
        let deadline = Instant::now() + INIT_DEADLINE;
        loop {
            let producer: BaseProducer =
                client.create().context("cannot create the transactional producer")?;
            match producer.init_transactions(timeout) {
                Ok(()) => return Ok(producer),
                Err(e) if !is_fatal(&e) && Instant::now() < deadline => {
                    warn!(error = %e, "cannot initialise transactions yet; retrying");
                    status.broker_failed(format!("cannot initialise transactions: {e}"));
                    std::thread::sleep(Duration::from_secs(1));
                }
                Err(e) => return Err(e).context("cannot initialise transactions"),
            }
        }
    }

    /// Runs `fill` inside one transaction and commits it. On failure the transaction is
    /// aborted — if the broker cannot even be told, the producer is replaced, which aborts
    /// it on the broker's side — and nothing of it is visible.
    pub fn transaction(
        &mut self,
        fill: impl FnOnce(&Transaction<'_>) -> anyhow::Result<()>,
    ) -> Result<(), TransactionFailed> {
        let started = Instant::now();
        let mut records = 0;
        let result = self.run_transaction(fill, &mut records);
        let m = crate::metrics::metrics();
        let stage = self.status.stage.label();
        m.commit_duration.with_label_values(&[stage]).observe(started.elapsed().as_secs_f64());
        match &result {
            Ok(()) => {
                self.status.broker_answered();
                m.commits.with_label_values(&[stage]).inc();
                // One line per checkpoint: what it wrote and how long it took.
                let ms = started.elapsed().as_millis() as u64;
                tracing::info!(stage, records, ms, "checkpoint committed");
            }
            Err(failure) => m.transaction_aborts.with_label_values(&[stage, failure.cause()]).inc(),
        }
        result
    }

    /// A failpoint for tests: the next transaction that commits is reported as failed
    /// after its commit succeeded (as when the commit's answer is lost), and goes down the
    /// failure path from there.
    pub fn fail_next_commit(&mut self) {
        self.fail_next_commit = true;
    }

    fn run_transaction(
        &mut self,
        fill: impl FnOnce(&Transaction<'_>) -> anyhow::Result<()>,
        records: &mut usize,
    ) -> Result<(), TransactionFailed> {
        // Whether commit_transaction was called: from then on a failure may hide a commit.
        let mut committing = false;
        let result = self.producer.begin_transaction().map_err(anyhow::Error::from).and_then(|()| {
            let tx =
                Transaction { producer: &self.producer, timeout: self.timeout, sent: Default::default() };
            let filled = fill(&tx);
            *records = tx.sent.get();
            filled.and_then(|()| {
                committing = true;
                self.commit_with_retries()
            })
        });
        let result = match result {
            Ok(()) if std::mem::take(&mut self.fail_next_commit) => {
                warn!("failpoint: a commit that succeeded is reported as failed");
                // As a commit whose answer did not come back in time.
                let timed_out = KafkaError::MessageProduction(RDKafkaErrorCode::OperationTimedOut);
                Err(anyhow::Error::from(timed_out).context("failpoint: commit reported failed"))
            }
            other => other,
        };
        let Err(e) = result else { return Ok(()) };
        // A broker away or moving is said at once (aborting, or replacing the producer, can
        // take as long again); a refused record is not waiting for the brokers.
        if has_transient_cause(&e) {
            self.status.broker_failed(format!("{e:#}"));
        }
        // Fenced by a newer worker with our id, or a broken protocol: this worker must stop.
        if e.downcast_ref::<KafkaError>().is_some_and(is_fatal) {
            return Err(TransactionFailed::Fatal(e));
        }
        warn!(error = %format!("{e:#}"), "aborting transaction");
        let deadline = Instant::now() + self.timeout;
        // librdkafka's abort waits for the delivery reports of what was sent, which only
        // a poll serves: without this it waits out its whole timeout, then fails.
        self.serve_deliveries(deadline);
        loop {
            match self.producer.abort_transaction(self.timeout) {
                // The coordinator aborted it: nothing of it is visible.
                Ok(()) => return Err(TransactionFailed::Aborted(e)),
                // "No transaction in progress" (it committed after all, or never began)
                // never changes with retries.
                Err(abort) if !is_fatal(&abort) && !is_state_error(&abort) && Instant::now() < deadline => {
                    warn!(error = %abort, "abort failed; retrying");
                }
                Err(abort) => {
                    warn!(error = %abort, "cannot abort; replacing the producer");
                    // Its init_transactions fences the old producer: the broker completes
                    // a transaction prepared to commit, or aborts it.
                    self.producer = Self::connect(&self.client, self.timeout, &self.status)
                        .map_err(TransactionFailed::Fatal)?;
                    return Err(if committing {
                        warn!("the transaction may have committed: its outcome must be read back");
                        TransactionFailed::Unknown(e)
                    } else {
                        TransactionFailed::Aborted(e)
                    });
                }
            }
        }
    }

    /// Serves delivery reports until nothing sent is in flight (or `deadline`).
    fn serve_deliveries(&self, deadline: Instant) {
        while self.producer.in_flight_count() > 0 && Instant::now() < deadline {
            self.producer.poll(Duration::from_millis(1));
        }
    }

    /// Commits the open transaction, retrying what librdkafka calls retriable (a broker
    /// restarting) within the transaction timeout.
    fn commit_with_retries(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + self.timeout;
        // Deliver what is queued first: rdkafka's own flush inside commit_transaction
        // waits for delivery reports in 100 ms steps, which would make every commit take at
        // least that long.
        self.serve_deliveries(deadline);
        loop {
            match self.producer.commit_transaction(self.timeout) {
                Ok(()) => return Ok(()),
                Err(KafkaError::Transaction(e)) if e.is_retriable() && Instant::now() < deadline => {
                    warn!(error = %e, "commit failed, retrying");
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// What a transaction writes, handed to a [`BackgroundOutbox`].
type Fill = Box<dyn FnOnce(&Transaction<'_>) -> anyhow::Result<()> + Send>;

/// An [`Outbox`] on a thread of its own: a transaction is handed over and commits while the
/// caller goes on working (its broker round trips take tens of milliseconds). At most one
/// is in flight; its outcome must be taken ([`BackgroundOutbox::settle`]) before the next
/// begins, so transactions commit in the order they were begun.
pub struct BackgroundOutbox {
    requests: Option<mpsc::SyncSender<Fill>>,
    outcomes: mpsc::Receiver<Result<(), TransactionFailed>>,
    in_flight: bool,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BackgroundOutbox {
    /// Moves `outbox` to a new thread named `name`.
    pub fn start(mut outbox: Outbox, name: &str) -> anyhow::Result<Self> {
        let (requests, inbox) = mpsc::sync_channel::<Fill>(1);
        let (report, outcomes) = mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                for fill in inbox {
                    if report.send(outbox.transaction(fill)).is_err() {
                        return;
                    }
                }
            })
            .with_context(|| format!("cannot start thread {name}"))?;
        Ok(BackgroundOutbox { requests: Some(requests), outcomes, in_flight: false, thread: Some(thread) })
    }

    /// Begins a transaction that `fill` fills; it commits in the background. The previous
    /// one must be settled.
    pub fn begin(
        &mut self,
        fill: impl FnOnce(&Transaction<'_>) -> anyhow::Result<()> + Send + 'static,
    ) -> Result<(), TransactionFailed> {
        let gone = || TransactionFailed::Fatal(anyhow::anyhow!("the transaction thread has stopped"));
        if self.in_flight {
            return Err(TransactionFailed::Fatal(anyhow::anyhow!("a transaction is already in flight")));
        }
        self.requests.as_ref().ok_or_else(gone)?.send(Box::new(fill)).map_err(|_| gone())?;
        self.in_flight = true;
        Ok(())
    }

    /// Waits for the transaction in flight, if any, and says how it ended.
    pub fn settle(&mut self) -> Result<(), TransactionFailed> {
        if !std::mem::take(&mut self.in_flight) {
            return Ok(());
        }
        self.outcomes
            .recv()
            .unwrap_or_else(|_| Err(TransactionFailed::Fatal(anyhow::anyhow!("the transaction thread died"))))
    }
}

impl Drop for BackgroundOutbox {
    fn drop(&mut self) {
        // Closing the channel ends the thread once the transaction in flight is done.
        self.requests = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use im_meter_core::ingest::RejectReason;

    fn letter(key: &[u8], payload: &[u8], detail: &str) -> DeadLetter {
        let record = Fetched { topic: "events", partition: 2, offset: 7, key: Some(key), payload };
        DeadLetter::of(&record, Rejection::new(RejectReason::InvalidField, detail))
    }

    #[test]
    fn an_unreachable_broker_is_transient_a_refused_record_is_not() {
        let failed =
            |e: KafkaError| TransactionFailed::Aborted(anyhow::Error::from(e).context("cannot commit"));
        assert!(failed(KafkaError::MessageProduction(RDKafkaErrorCode::AllBrokersDown)).transient());
        assert!(failed(KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut)).transient());
        assert!(!failed(KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge)).transient());
        assert!(!TransactionFailed::Aborted(anyhow::anyhow!("a record is refused")).transient());
    }

    #[test]
    fn an_abort_is_counted_by_its_cause() {
        let aborted = |code| {
            TransactionFailed::Aborted(
                anyhow::Error::from(KafkaError::MessageProduction(code)).context("commit"),
            )
        };
        assert_eq!(aborted(RDKafkaErrorCode::NotEnoughReplicas).cause(), "broker");
        assert_eq!(aborted(RDKafkaErrorCode::IllegalGeneration).cause(), "fenced");
        assert_eq!(aborted(RDKafkaErrorCode::UnknownMemberId).cause(), "fenced");
        assert_eq!(aborted(RDKafkaErrorCode::MessageSizeTooLarge).cause(), "other");
        assert_eq!(TransactionFailed::Unknown(anyhow::anyhow!("lost")).cause(), "unknown_outcome");
        assert_eq!(TransactionFailed::Fatal(anyhow::anyhow!("fenced by a newer producer")).cause(), "fatal");
    }

    #[test]
    fn only_a_newer_producers_fence_drops_a_billing_partition() {
        let fatal = |code| {
            TransactionFailed::Fatal(anyhow::Error::from(KafkaError::Global(code)).context("add partitions"))
        };
        assert!(fatal(RDKafkaErrorCode::Fenced).fenced_by_newer_producer());
        assert!(fatal(RDKafkaErrorCode::ProducerFenced).fenced_by_newer_producer());
        assert!(!fatal(RDKafkaErrorCode::TransactionalIdAuthorizationFailed).fenced_by_newer_producer());
        let aborted =
            TransactionFailed::Aborted(anyhow::Error::from(KafkaError::Global(RDKafkaErrorCode::Fenced)));
        assert!(!aborted.fenced_by_newer_producer(), "only a fatal failure");
    }

    #[test]
    fn a_letter_is_cut_to_its_limits_and_says_what_it_stood_for() {
        let payload = vec![b'x'; DEAD_LETTER_PAYLOAD_MAX + 10];
        let key = vec![b'k'; DEAD_LETTER_KEY_MAX + 1];
        // A detail quoting the input, cut on a character boundary.
        let detail = "é".repeat(DEAD_LETTER_DETAIL_MAX);
        let cut = letter(&key, &payload, &detail);
        assert!(cut.truncated());
        assert_eq!((cut.raw.len(), cut.length), (DEAD_LETTER_PAYLOAD_MAX, payload.len()));
        assert_eq!(
            (cut.key.as_ref().map(Vec::len), cut.key_length),
            (Some(DEAD_LETTER_KEY_MAX), Some(key.len()))
        );
        assert!(cut.detail.len() <= DEAD_LETTER_DETAIL_MAX + '…'.len_utf8() && cut.detail.ends_with('…'));
        use sha2::Digest;
        let whole: String = sha2::Sha256::digest(&payload).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(cut.sha256, whole);
        // The largest letter fits the record the dead-letter topic is checked for.
        let headers = cut.detail.len() + 512;
        assert!(cut.raw.len() + DEAD_LETTER_KEY_MAX + headers < DEAD_LETTER_RECORD_MAX);

        let whole = letter(b"1400000003", b"{}", "not an object");
        assert!(!whole.truncated());
        assert_eq!((whole.raw.as_slice(), whole.length, whole.key_length), (&b"{}"[..], 2, None));
    }
}
