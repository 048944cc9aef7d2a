//! Reading the changelog topics back: a partition from its beginning to its end, which is
//! how both stages rebuild their state after an assignment or a crash.
//!
//! Two ends: the *last stable offset* (LSO), where a `read_committed` reader stops while a
//! transaction is open, and the *high watermark* (HW), past every record written. A reader
//! that must see everything a fenced producer wrote (billing reading back its billed-through
//! mark) reads to the HW: it waits for other producers' open transactions to end, because an
//! open transaction's first record holds the LSO below whatever was committed after it.

use std::time::{Duration, Instant};

use anyhow::Context;
use im_meter_core::changelog::parts::Assembler;
use im_meter_core::changelog::ChangelogKey;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};

use crate::failpoints::Failpoint;

/// A client context that does not log reaching a partition's end as an error (readers
/// here ask for end-of-partition events on purpose).
pub struct QuietEof;

impl ClientContext for QuietEof {
    fn error(&self, error: KafkaError, reason: &str) {
        let end_of_partition =
            matches!(error, KafkaError::PartitionEOF(_) | KafkaError::Global(RDKafkaErrorCode::PartitionEOF));
        if !end_of_partition {
            tracing::error!(error = %error, reason, "librdkafka error");
        }
    }
}

impl ConsumerContext for QuietEof {}

/// Settings of a reader of committed records that is assigned partitions (no group
/// membership, nothing committed) and told when it reaches each partition's end.
pub fn reader(client: &ClientConfig) -> ClientConfig {
    let mut reader = client.clone();
    reader
        .set("group.id", "im-meter-reader")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        // A start offset the partition no longer (or not yet) has: read what it has rather
        // than skip to its end (librdkafka's default), so nothing is passed over silently.
        .set("auto.offset.reset", "earliest")
        // Reading back is latency-bound: do not let the broker hold fetches open.
        .set("fetch.wait.max.ms", "20")
        .set("isolation.level", "read_committed");
    reader
}

/// How long reading one partition back may take before the worker gives up (a stuck
/// read is a fatal error: the supervisor restarts the worker).
const RESTORE_TIMEOUT: Duration = Duration::from_secs(300);

/// The number of partitions of a topic.
pub fn partition_count(client: &ClientConfig, topic: &str) -> anyhow::Result<u32> {
    if Failpoint::MetadataFails.active() {
        let timed_out = KafkaError::MetadataFetch(RDKafkaErrorCode::OperationTimedOut);
        return Err(anyhow::Error::from(timed_out)
            .context(format!("cannot read the metadata of {topic} (failpoint)")));
    }
    let consumer: BaseConsumer = client.create().context("cannot create a metadata client")?;
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(30))
        .with_context(|| format!("cannot read the metadata of {topic}"))?;
    let count = metadata.topics().first().map_or(0, |t| t.partitions().len());
    anyhow::ensure!(count > 0, "topic {topic} has no partitions (does it exist?)");
    Ok(count as u32)
}

/// Asks the broker where partitions end with every record counted, committed or not: the
/// high watermark. (A `read_committed` client's `fetch_watermarks` answers with the last
/// stable offset instead, which an open transaction holds back.)
pub struct HighWatermarks {
    config: ClientConfig,
    client: BaseConsumer,
}

impl HighWatermarks {
    /// A client for `client`'s cluster that asks for high watermarks.
    pub fn new(client: &ClientConfig) -> anyhow::Result<Self> {
        let mut config = client.clone();
        config.set("isolation.level", "read_uncommitted");
        let client = config.create().context("cannot create a watermark client")?;
        Ok(HighWatermarks { config, client })
    }

    /// `(low, high)`: the first offset the partition still holds and its high watermark.
    /// Retried while the broker is unreachable or moving leaders (a broker restart), each
    /// retry with a new client: after a broker restart the old one can keep answering
    /// "unknown partition" from its metadata until that is next refreshed (minutes).
    pub fn of(&self, topic: &str, partition: i32, timeout: Duration) -> anyhow::Result<(i64, i64)> {
        let mut fresh: Option<BaseConsumer> = None;
        super::with_retries(&format!("reading where {topic} [{partition}] ends"), || {
            let answer = fresh.as_ref().unwrap_or(&self.client).fetch_watermarks(topic, partition, timeout);
            if answer.is_err() {
                fresh = self.config.create().ok();
            }
            answer
        })
    }
}

/// Where a read back stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    /// The last stable offset: everything committed so far, as far as no open transaction
    /// holds it back.
    LastStable,
    /// The high watermark when the read starts: waits for the transactions open then to end.
    HighWatermark,
}

/// How far a read went.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReadBack {
    /// Records read.
    pub records: u64,
    /// Where the read ended: after the last record read, and past any transaction markers
    /// after it.
    pub next_offset: i64,
}

/// Calls `each(key, value, parts)` for every committed record of one changelog partition,
/// oldest first, until `until` (`None` values are deletions), with values
/// written in parts handed over whole (`parts`: how many they were written in, 0 for a
/// value written whole). `assembler` keeps the parts of a value whose header comes after
/// the end of this read: pass the same one on to whatever reads on from there. Unreadable
/// keys are skipped: they cannot have been written by this program.
pub fn read_partition(
    client: &ClientConfig,
    topic: &str,
    partition: i32,
    until: Until,
    assembler: &mut Assembler,
    mut each: impl FnMut(ChangelogKey, Option<&[u8]>, usize) -> anyhow::Result<()>,
) -> anyhow::Result<ReadBack> {
    let mut read = ReadBack::default();
    let ended = read_from(client, topic, &[(partition, Offset::Beginning)], until, |record| {
        read.records += 1;
        read.next_offset = record.offset + 1;
        assemble(assembler, record.key, record.value, &mut each)
    })?;
    // Past the transaction markers after the last record, too.
    read.next_offset = ended.iter().map(|(_, at)| *at).fold(read.next_offset, i64::max);
    Ok(read)
}

/// Feeds one changelog record to `assembler` and hands what it completes to `each`.
pub fn assemble(
    assembler: &mut Assembler,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    each: &mut impl FnMut(ChangelogKey, Option<&[u8]>, usize) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let Some(key) = key else { return Ok(()) };
    let Some(whole) = assembler.feed(key, value).context("a value written in parts is damaged")? else {
        return Ok(());
    };
    match ChangelogKey::from_bytes(whole.key) {
        Ok(key) => each(key, whole.value.as_deref(), whole.parts),
        Err(_) => Ok(()),
    }
}

/// A record read back.
pub struct Record<'a> {
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// Its key.
    pub key: Option<&'a [u8]>,
    /// Its value (`None`: a tombstone).
    pub value: Option<&'a [u8]>,
    /// Its timestamp (epoch milliseconds), if it has one.
    pub timestamp: Option<i64>,
    /// Its headers, if it has any.
    pub headers: Option<&'a rdkafka::message::BorrowedHeaders>,
}

/// Calls `each` for every committed record of the given partitions of `topic` (all of them
/// when `partitions` is empty), until each partition's last stable offset.
pub fn read_to_end(
    client: &ClientConfig,
    topic: &str,
    partitions: &[i32],
    each: impl FnMut(Record<'_>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let partitions: Vec<i32> = if partitions.is_empty() {
        (0..partition_count(client, topic)? as i32).collect()
    } else {
        partitions.to_vec()
    };
    let from: Vec<(i32, Offset)> = partitions.into_iter().map(|p| (p, Offset::Beginning)).collect();
    read_from(client, topic, &from, Until::LastStable, each).map(|_| ())
}

/// Calls `each` for every committed record of `topic` from the given `(partition, offset)`
/// starts until each partition's end as `until` says; returns where each partition ended
/// (its position, which steps over transaction markers).
pub fn read_from(
    client: &ClientConfig,
    topic: &str,
    from: &[(i32, Offset)],
    until: Until,
    mut each: impl FnMut(Record<'_>) -> anyhow::Result<()>,
) -> anyhow::Result<Vec<(i32, i64)>> {
    let consumer: BaseConsumer<QuietEof> =
        reader(client).create_with_context(QuietEof).context("cannot create a topic reader")?;
    let mut assignment = TopicPartitionList::new();
    for (p, offset) in from {
        assignment.add_partition_offset(topic, *p, *offset)?;
    }
    consumer.assign(&assignment)?;
    // Reading to the high watermark: where each partition ends now, aborted records and
    // transaction markers included (the position steps over them). Empty ones are done.
    let mut targets: Vec<(i32, i64)> = Vec::new();
    if until == Until::HighWatermark {
        let ends = HighWatermarks::new(client)?;
        for (p, _) in from {
            let (low, high) = ends.of(topic, *p, Duration::from_secs(30))?;
            if high > low {
                targets.push((*p, high));
            }
        }
    }
    let deadline = Instant::now() + RESTORE_TIMEOUT;
    let mut at_end = 0;
    let done = |at_end: usize, targets: &[(i32, i64)]| -> anyhow::Result<bool> {
        match until {
            Until::LastStable => Ok(at_end >= from.len()),
            Until::HighWatermark => {
                let positions = consumer.position().context("cannot read the reader's positions")?;
                Ok(targets
                    .iter()
                    .all(|(p, high)| position_of(&positions, topic, *p).is_some_and(|o| o >= *high)))
            }
        }
    };
    while !done(at_end, &targets)? {
        if Instant::now() >= deadline {
            let positions = consumer.position().unwrap_or_default();
            let behind: Vec<String> = targets
                .iter()
                .map(|(p, high)| format!("[{p}] at {:?} of {high}", position_of(&positions, topic, *p)))
                .collect();
            anyhow::bail!(
                "reading {topic} took over {RESTORE_TIMEOUT:?} ({until:?}; {}): if a partition stays short of its \
                 high watermark, a transaction is open in it (docs/operations.md, \"An open transaction holds billing back\")",
                behind.join(", ")
            );
        }
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => each(Record {
                partition: m.partition(),
                offset: m.offset(),
                key: m.key(),
                value: m.payload(),
                timestamp: m.timestamp().to_millis(),
                headers: m.headers(),
            })?,
            Some(Err(KafkaError::PartitionEOF(_))) => at_end += 1,
            // Transient (a broker restarting): librdkafka reconnects; the deadline bounds it.
            Some(Err(e)) => tracing::warn!(error = %e, topic, "read error"),
            None => {}
        }
    }
    let positions = consumer.position().context("cannot read the reader's positions")?;
    Ok(positions
        .elements_for_topic(topic)
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) => Some((e.partition(), o)),
            _ => None,
        })
        .collect())
}

/// A partition's offset in `positions` (a consumer's: after the last record it handed out,
/// stepping over transaction markers and aborted records), if it has one yet.
pub fn position_of(positions: &TopicPartitionList, topic: &str, partition: i32) -> Option<i64> {
    match positions.find_partition(topic, partition).map(|e| e.offset()) {
        Some(Offset::Offset(o)) => Some(o),
        _ => None,
    }
}
