//! `im-meter produce`: writes NDJSON event lines to a topic, keyed by `app_id`.
//!
//! Lines go out as they are, malformed ones included (tests and demos need poison records);
//! a line whose `app_id` can be read is keyed by it, as SPEC §2 asks of producers, the rest
//! are unkeyed. The producer is idempotent with `acks=all`, so broker retries never
//! duplicate a record; every send is confirmed before the command reports success.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use im_meter_core::ingest::{decode_subscription_event, decode_usage_event};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientConfig, ClientContext};

/// Which decoder finds a line's `app_id` for its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineKind {
    /// SDK events.
    Usage,
    /// Subscription events.
    Subscription,
}

/// What a produce run did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ProduceStats {
    /// Records confirmed by the broker.
    pub delivered: u64,
    /// Of those, records keyed by `app_id`.
    pub keyed: u64,
}

/// Counts deliveries and failures, reported by librdkafka's background thread.
#[derive(Default)]
struct DeliveryCounter {
    delivered: AtomicU64,
    failed: AtomicU64,
}

impl ClientContext for DeliveryCounter {}

impl ProducerContext for DeliveryCounter {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        let counter = if result.is_ok() { &self.delivered } else { &self.failed };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// How long the final flush may take before the run fails.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(60);

/// Sends lines to one topic, at most `rate` lines a second when given.
pub struct LineProducer {
    producer: ThreadedProducer<DeliveryCounter>,
    topic: String,
    kind: LineKind,
    rate: Option<u64>,
    started: Instant,
    sent: u64,
    keyed: u64,
    /// Whether the lines go out in transactions (one per [`LINES_PER_TRANSACTION`]).
    transactional: bool,
}

/// Lines per transaction of a transactional [`LineProducer`].
const LINES_PER_TRANSACTION: u64 = 10_000;

impl LineProducer {
    /// An idempotent producer (`acks=all`) to `topic`; with a `transactional_id`, one that
    /// sends in transactions.
    pub fn new(
        client: &ClientConfig,
        topic: &str,
        kind: LineKind,
        rate: Option<u64>,
        transactional_id: Option<&str>,
    ) -> anyhow::Result<Self> {
        let mut config = client.clone();
        config
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "10")
            .set("compression.type", "lz4")
            .set("queue.buffering.max.messages", "500000");
        if let Some(id) = transactional_id {
            config.set("transactional.id", id);
        }
        let producer: ThreadedProducer<DeliveryCounter> =
            config.create_with_context(DeliveryCounter::default()).context("cannot create Kafka producer")?;
        if transactional_id.is_some() {
            producer.init_transactions(FLUSH_TIMEOUT).context("cannot initialise transactions")?;
            producer.begin_transaction().context("cannot begin a transaction")?;
        }
        Ok(LineProducer {
            producer,
            topic: topic.to_string(),
            kind,
            rate: rate.filter(|r| *r > 0),
            started: Instant::now(),
            sent: 0,
            keyed: 0,
            transactional: transactional_id.is_some(),
        })
    }

    /// Queues one line, keyed by its `app_id` when it has a readable one.
    pub fn send(&mut self, line: &[u8]) -> anyhow::Result<()> {
        let app_id = match self.kind {
            LineKind::Usage => decode_usage_event(line).ok().map(|e| e.app_id),
            LineKind::Subscription => decode_subscription_event(line).ok().map(|e| e.app_id),
        };
        let key = app_id.map(|id| id.to_string());
        self.keyed += u64::from(key.is_some());
        let mut record = BaseRecord::<String, [u8]>::to(&self.topic).payload(line);
        if let Some(key) = key.as_ref() {
            record = record.key(key);
        }
        send(&self.producer, record)?;
        self.sent += 1;
        if self.transactional && self.sent.is_multiple_of(LINES_PER_TRANSACTION) {
            self.producer.commit_transaction(FLUSH_TIMEOUT).context("cannot commit a transaction")?;
            self.producer.begin_transaction().context("cannot begin a transaction")?;
        }
        if let Some(rate) = self.rate {
            pace(self.started, self.sent, rate);
        }
        Ok(())
    }

    /// Waits until the broker confirmed every line; fails if any was not delivered.
    pub fn finish(self) -> anyhow::Result<ProduceStats> {
        if self.transactional {
            self.producer.commit_transaction(FLUSH_TIMEOUT).context("cannot commit a transaction")?;
        }
        self.producer.flush(FLUSH_TIMEOUT).context("cannot flush the producer")?;
        let context = self.producer.context();
        let failed = context.failed.load(Ordering::Relaxed);
        let delivered = context.delivered.load(Ordering::Relaxed);
        if failed > 0 || delivered != self.sent {
            anyhow::bail!(
                "{} of {} records were not delivered to {}",
                self.sent - delivered,
                self.sent,
                self.topic
            );
        }
        Ok(ProduceStats { delivered, keyed: self.keyed })
    }
}

/// Sends one record, waiting while the local queue is full.
fn send(
    producer: &ThreadedProducer<DeliveryCounter>,
    mut record: BaseRecord<'_, String, [u8]>,
) -> anyhow::Result<()> {
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                // The background thread drains the queue; give it a moment.
                record = back;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err((e, _)) => return Err(e).context("cannot send a record"),
        }
    }
}

/// Sleeps so that `sent` records take at least `sent / rate` seconds.
fn pace(started: Instant, sent: u64, rate: u64) {
    let due = Duration::from_secs_f64(sent as f64 / rate as f64);
    if let Some(wait) = due.checked_sub(started.elapsed()) {
        std::thread::sleep(wait);
    }
}
