//! Reading the changelog topic back: a partition from its beginning to its last stable
//! offset, which is how both stages rebuild their state after an assignment or a crash.

use std::time::{Duration, Instant};

use anyhow::Context;
use im_meter_core::aggregate::parts::Assembler;
use im_meter_core::aggregate::ChangelogKey;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};

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
    let consumer: BaseConsumer = client.create().context("cannot create a metadata client")?;
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(30))
        .with_context(|| format!("cannot read the metadata of {topic}"))?;
    let count = metadata.topics().first().map_or(0, |t| t.partitions().len());
    anyhow::ensure!(count > 0, "topic {topic} has no partitions (does it exist?)");
    Ok(count as u32)
}

/// How far a read went.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReadBack {
    /// Records read.
    pub records: u64,
    /// The offset after the last record read.
    pub next_offset: i64,
}

/// Calls `each(key, value, parts)` for every committed record of one changelog partition,
/// oldest first, until its last stable offset (`None` values are deletions), with values
/// written in parts handed over whole (`parts`: how many they were written in, 0 for a
/// value written whole). `assembler` keeps the parts of a value whose header comes after
/// the end of this read: pass the same one on to whatever reads on from there. Unreadable
/// keys are skipped: they cannot have been written by this program.
pub fn read_partition(
    client: &ClientConfig,
    topic: &str,
    partition: i32,
    assembler: &mut Assembler,
    mut each: impl FnMut(ChangelogKey, Option<&[u8]>, usize) -> anyhow::Result<()>,
) -> anyhow::Result<ReadBack> {
    let mut read = ReadBack::default();
    read_to_end(client, topic, &[partition], |record| {
        read.records += 1;
        read.next_offset = record.offset + 1;
        assemble(assembler, record.key, record.value, &mut each)
    })?;
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
    read_from(client, topic, &from, each).map(|_| ())
}

/// Calls `each` for every committed record of `topic` from the given `(partition, offset)`
/// starts until each partition's last stable offset; returns where each partition ended
/// (its position, which steps over transaction markers).
pub fn read_from(
    client: &ClientConfig,
    topic: &str,
    from: &[(i32, Offset)],
    mut each: impl FnMut(Record<'_>) -> anyhow::Result<()>,
) -> anyhow::Result<Vec<(i32, i64)>> {
    let consumer: BaseConsumer<QuietEof> =
        reader(client).create_with_context(QuietEof).context("cannot create a topic reader")?;
    let mut assignment = TopicPartitionList::new();
    for (p, offset) in from {
        assignment.add_partition_offset(topic, *p, *offset)?;
    }
    consumer.assign(&assignment)?;
    let deadline = Instant::now() + RESTORE_TIMEOUT;
    let mut at_end = 0;
    while at_end < from.len() {
        anyhow::ensure!(Instant::now() < deadline, "reading {topic} took over {RESTORE_TIMEOUT:?}");
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => each(Record {
                partition: m.partition(),
                offset: m.offset(),
                key: m.key(),
                value: m.payload(),
                timestamp: m.timestamp().to_millis(),
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
