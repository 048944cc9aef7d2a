//! Batched consumption: each assigned partition's fetched records read from its own
//! librdkafka queue, thousands per call.
//!
//! Why: rust-rdkafka's `BaseConsumer::poll` hands out one record per call through
//! librdkafka's event API, an allocation and a queue lock each — about 4 µs a record here,
//! which capped the worker below a bare librdkafka consumer. `rd_kafka_consume_batch_queue`
//! takes up to a whole buffer of records under one lock (measured here: 2.1 M records/s
//! against 0.25 M/s for a `poll` loop, same topic). rust-rdkafka does not wrap it, so this
//! module is the one place with `unsafe` Kafka calls; everything else uses the safe API.
//!
//! How it fits the group protocol: [`split`] detaches a partition's fetch queue from the
//! consumer queue. It must be called in `pre_rebalance(Assign)`, before librdkafka starts
//! fetching: librdkafka leaves a queue the application forwarded itself alone when it
//! (re)starts fetching (`RD_KAFKA_Q_F_FWD_APP` in `rd_kafka_toppar_op_fetch_start`), so
//! the partition's records then only ever reach its own queue, in offset order. Rebalance
//! and error events stay on the consumer queue, which the caller must keep polling
//! (`BaseConsumer::poll`) to serve them. librdkafka's version barriers still apply: records
//! fetched before a seek are dropped inside the batch call.

use std::ffi::CString;
use std::marker::PhantomData;
use std::ptr;
use std::time::Duration;

use rdkafka::bindings as rd;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::types::RDKafkaErrorCode;

/// A consumed record, however it was fetched.
#[derive(Debug, Clone, Copy)]
pub struct Fetched<'a> {
    /// Its topic.
    pub topic: &'a str,
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// Its key.
    pub key: Option<&'a [u8]>,
    /// Its value (empty when it has none).
    pub payload: &'a [u8],
}

impl<'a> Fetched<'a> {
    /// A record polled the ordinary way.
    pub fn of(message: &'a BorrowedMessage<'_>) -> Self {
        Fetched {
            topic: message.topic(),
            partition: message.partition(),
            offset: message.offset(),
            key: message.key(),
            payload: message.payload().unwrap_or_default(),
        }
    }
}

/// Detaches the fetch queue of `topic`/`partition` from the consumer queue, so that its
/// records are read through a [`PartitionQueue`]. Call it in `pre_rebalance(Assign)` for
/// every newly assigned partition (librdkafka stops forwarding when a partition is
/// revoked, and must not start again when it comes back). Returns `false` if librdkafka
/// does not know the partition.
pub fn split<C: ConsumerContext>(consumer: &BaseConsumer<C>, topic: &str, partition: i32) -> bool {
    PartitionQueue::open(consumer, topic, partition).is_some_and(|queue| {
        // SAFETY: `queue.ptr` is a live queue handle; a null destination means "no
        // forwarding", which librdkafka remembers as set by the application.
        unsafe { rd::rd_kafka_queue_forward(queue.ptr, ptr::null_mut()) };
        true
    })
}

/// The end (high watermark) of `topic`/`partition` as the consumer's last fetch response
/// for it said — no broker round trip. The consumer keeps fetching an assigned partition
/// that has no records (long polls of `fetch.wait.max.ms`), so for a caught-up partition
/// this is at most that old. `None` before the first response.
pub fn known_end<C: ConsumerContext>(consumer: &BaseConsumer<C>, topic: &str, partition: i32) -> Option<i64> {
    let name = CString::new(topic).ok()?;
    let (mut low, mut high) = (-1_i64, -1_i64);
    // SAFETY: the client pointer is valid while `consumer` is borrowed; librdkafka only
    // reads the name and writes the two integers.
    let err = unsafe {
        rd::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            name.as_ptr(),
            partition,
            &mut low,
            &mut high,
        )
    };
    (err == rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0).then_some(high)
}

/// The fetch queue of one partition, borrowed from its consumer (it cannot outlive it).
pub struct PartitionQueue<'c> {
    ptr: *mut rd::rd_kafka_queue_t,
    topic: String,
    partition: i32,
    consumer: PhantomData<&'c ()>,
}

impl<'c> PartitionQueue<'c> {
    /// The queue of a partition [`split`] earlier. `None` if librdkafka does not know it.
    pub fn open<C: ConsumerContext>(
        consumer: &'c BaseConsumer<C>,
        topic: &str,
        partition: i32,
    ) -> Option<Self> {
        let name = CString::new(topic).ok()?;
        // SAFETY: the client pointer is valid while `consumer` is borrowed, which the
        // returned queue's lifetime enforces; the name is a valid C string.
        let ptr = unsafe {
            rd::rd_kafka_queue_get_partition(consumer.client().native_ptr(), name.as_ptr(), partition)
        };
        (!ptr.is_null()).then(|| PartitionQueue {
            ptr,
            topic: topic.to_string(),
            partition,
            consumer: PhantomData,
        })
    }

    /// Its partition.
    pub fn partition(&self) -> i32 {
        self.partition
    }

    /// Moves the records already fetched (up to `max` and the batch's capacity) into
    /// `batch`, waiting up to `wait` for the first. Returns how many were taken. Records of
    /// a previous fill still in `batch` are released first.
    pub fn fill(&self, batch: &mut Batch<'c>, max: usize, wait: Duration) -> usize {
        batch.clear();
        let wait_ms = wait.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: the queue handle is live; `batch.messages` has room for `capacity`
        // pointers, of which librdkafka fills the first `n` with messages we now own.
        let n = unsafe {
            rd::rd_kafka_consume_batch_queue(
                self.ptr,
                wait_ms,
                batch.messages.as_mut_ptr(),
                batch.messages.capacity().min(max),
            )
        };
        let n = usize::try_from(n).unwrap_or(0);
        // SAFETY: librdkafka initialised the first `n` slots.
        unsafe { batch.messages.set_len(n) };
        batch.topic.clone_from(&self.topic);
        n
    }
}

impl Drop for PartitionQueue<'_> {
    fn drop(&mut self) {
        // SAFETY: the handle is live and dropped once; the partition's queue itself (and
        // its forwarding setting) lives on with the consumer.
        unsafe { rd::rd_kafka_queue_destroy(self.ptr) }
    }
}

/// Records taken from a [`PartitionQueue`], owned until the next fill or the drop.
pub struct Batch<'c> {
    messages: Vec<*mut rd::rd_kafka_message_t>,
    topic: String,
    consumer: PhantomData<&'c ()>,
}

impl<'c> Batch<'c> {
    /// An empty batch taking up to `capacity` records per fill.
    pub fn with_capacity(capacity: usize) -> Self {
        Batch { messages: Vec::with_capacity(capacity.max(1)), topic: String::new(), consumer: PhantomData }
    }

    /// The records, in offset order; an error librdkafka reported for the partition
    /// comes as `Err` in its place.
    pub fn records(&self) -> impl Iterator<Item = Result<Fetched<'_>, KafkaError>> {
        self.messages.iter().map(|&m| {
            // SAFETY: every pointer in `messages` is a message we own until `clear`.
            let m = unsafe { &*m };
            if m.err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
                return Err(KafkaError::MessageConsumption(RDKafkaErrorCode::from(m.err)));
            }
            Ok(Fetched {
                topic: &self.topic,
                partition: m.partition,
                offset: m.offset,
                key: bytes(m.key, m.key_len),
                payload: bytes(m.payload, m.len).unwrap_or_default(),
            })
        })
    }

    fn clear(&mut self) {
        for m in self.messages.drain(..) {
            // SAFETY: each message is owned by us and destroyed exactly once.
            unsafe { rd::rd_kafka_message_destroy(m) }
        }
    }
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        self.clear();
    }
}

/// The bytes librdkafka points at, `None` for a null pointer.
fn bytes<'a>(ptr: *const std::ffi::c_void, len: usize) -> Option<&'a [u8]> {
    // SAFETY: librdkafka guarantees `len` readable bytes at a non-null `ptr`, alive as
    // long as the message (which outlives the returned borrow through `Batch::records`).
    (!ptr.is_null()).then(|| unsafe { std::slice::from_raw_parts(ptr.cast::<u8>(), len) })
}
