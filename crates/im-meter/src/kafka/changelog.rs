//! Reading the changelog topic back: a partition from its beginning to its last stable
//! offset, which is how both stages rebuild their state after an assignment or a crash.

use std::time::{Duration, Instant};

use anyhow::Context;
use im_meter_core::aggregate::ChangelogKey;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

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

/// Calls `each(key, value)` for every committed record of one changelog partition, oldest
/// first, until its last stable offset (records of open transactions are not waited for
/// beyond it; `None` values are deletions). Unreadable keys are skipped: they cannot have
/// been written by this program.
pub fn read_partition(
    client: &ClientConfig,
    topic: &str,
    partition: i32,
    mut each: impl FnMut(ChangelogKey, Option<&[u8]>) -> anyhow::Result<()>,
) -> anyhow::Result<u64> {
    let consumer: BaseConsumer = client
        .clone()
        // Assigned, not subscribed: no group membership, nothing committed.
        .set("group.id", "im-meter-restore")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed")
        .create()
        .context("cannot create a changelog reader")?;
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(topic, partition, Offset::Beginning)?;
    consumer.assign(&assignment)?;
    let deadline = Instant::now() + RESTORE_TIMEOUT;
    let mut records = 0u64;
    loop {
        anyhow::ensure!(
            Instant::now() < deadline,
            "reading {topic}[{partition}] took over {RESTORE_TIMEOUT:?}"
        );
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(message)) => {
                records += 1;
                if let Some(key) = message.key().and_then(|k| ChangelogKey::from_bytes(k).ok()) {
                    each(key, message.payload())?;
                }
            }
            Some(Err(KafkaError::PartitionEOF(_))) => return Ok(records),
            Some(Err(e)) => return Err(e).with_context(|| format!("cannot read {topic}[{partition}]")),
            None => {}
        }
    }
}
