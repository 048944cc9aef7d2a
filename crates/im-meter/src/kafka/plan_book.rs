//! The plan book's durable history: billing copies every record of the subscriptions topic,
//! byte for byte, into a compacted topic (`topics.plan_book`), so that the subscription
//! history every bill depends on outlives the subscriptions topic's retention — and its
//! deletion: a topic created again under the same name starts its offsets over.
//!
//! Subscriptions partition *j* is copied into plan-book partition *j*, each record keyed by
//! the SHA-256 of its bytes (hex), so that compaction never removes one and the same bytes
//! copied again (the history produced again into a recreated topic) are one record, with
//! its original timestamp and its *log offset* (the topic offset and the topic's
//! incarnation, [`im_meter_core::bill::subscription_log`]) in header `source_offset`. A
//! record larger than the topic takes is copied in parts ([`im_meter_core::changelog::parts`]:
//! `{key}#0…` then a header under `{key}`), and read back whole. Copies written before keys
//! were contents are keyed by their source offset (decimal text) and read as such. Each
//! copy transaction also writes `g` = the consumer group whose workers copy: a worker of
//! another group refuses the plan book at start, naming both.
//!
//! The copy of *j* is made by the billing task of changelog partition `j % changelog
//! partitions`, from what its [`SubscriptionLog`](im_meter_core::bill::SubscriptionLog) has
//! read, in a transaction of that task's producer that also moves the task's copy mark
//! (`o/{j}`, a log offset, in its changelog partition): a task's new owner fences the old
//! one and goes on from the mark, so every record is copied once.
//!
//! Whoever needs the plan book (the billing feed, the usage API's ledger) pushes the copy
//! into its log first, then reads the subscriptions topic from where the log says
//! ([`SubscriptionLog::resume_at`](im_meter_core::bill::SubscriptionLog::resume_at)): the
//! same records in the same order per partition as the whole topic's history, whatever
//! retention removed and whatever topic was created again since.

use std::collections::BTreeMap;

use anyhow::Context;
use im_meter_core::bill::SubscriptionRecord;
use im_meter_core::changelog::parts::{self, Assembler};
use im_meter_core::changelog::ChangelogKey;
use rdkafka::message::Headers;
use rdkafka::ClientConfig;
use sha2::{Digest, Sha256};

use super::changelog;
use super::output::Transaction;
use crate::config::Config;

/// The header of a copy that holds its log offset.
const SOURCE_OFFSET: &str = "source_offset";

/// Reads the whole copy (committed records only), values copied in parts whole: the
/// records with their log offsets, by partition then offset. A copy that another
/// deployment's workers made (its owner record `g` names another group) is refused.
pub fn read(client: &ClientConfig, config: &Config) -> anyhow::Result<Vec<SubscriptionRecord>> {
    let topic = &config.file.topics.plan_book;
    let mut records = Vec::new();
    // Parts and their header are in one partition, in order: one assembler per partition.
    let mut assemblers: BTreeMap<i32, Assembler> = BTreeMap::new();
    let owner_key = ChangelogKey::Owner.to_bytes();
    changelog::read_to_end(client, topic, &[], |record| {
        let key = record.key.unwrap_or_default();
        if key == owner_key.as_slice() {
            return super::check_owner(config, topic, record.partition, record.value);
        }
        let offset = record.headers.and_then(|h| {
            h.iter()
                .find(|h| h.key == SOURCE_OFFSET)
                .and_then(|h| std::str::from_utf8(h.value?).ok()?.parse().ok())
        });
        let assembler = assemblers.entry(record.partition).or_default();
        let whole = assembler
            .feed(key, record.value)
            .with_context(|| format!("{topic}: a record copied in parts is damaged at {}", record.offset))?;
        let Some(whole) = whole else { return Ok(()) };
        // A copy keyed by its source offset (before keys were contents) says it in its key.
        let offset =
            offset.or_else(|| std::str::from_utf8(whole.key).ok()?.parse().ok()).with_context(|| {
                format!(
                    "{topic}: a copy with neither a source offset header nor a source offset key at {}",
                    record.offset
                )
            })?;
        // The copy's own offset is not the source's: the header (or key) says where it came from.
        records.push(SubscriptionRecord {
            partition: record.partition as u32,
            offset,
            timestamp: record.timestamp,
            key: None,
            payload: whole.value.map(|v| v.into_owned()).unwrap_or_default(),
        });
        Ok(())
    })?;
    // Read per partition in offset order already; sorted to say so.
    records.sort_by_key(|r| (r.partition, r.offset));
    Ok(records)
}

/// The key of a record's copy: the SHA-256 of its bytes, in hex.
pub fn copy_key(payload: &[u8]) -> String {
    Sha256::digest(payload).iter().map(|b| format!("{b:02x}")).collect()
}

/// Queues the copies of `records` (log offsets) of subscriptions partition `partition` in
/// transaction `tx`, each in parts if it is over `max_value` bytes, and the record saying
/// which deployment (consumer group) the copy is of.
pub fn copy(
    tx: &Transaction<'_>,
    config: &Config,
    partition: u32,
    records: &[&SubscriptionRecord],
) -> anyhow::Result<()> {
    let (topic, max_value) = (&config.file.topics.plan_book, config.kafka.max_value_bytes);
    let owner = config.file.kafka.group_id.as_bytes();
    tx.send(topic, Some(partition as i32), &ChangelogKey::Owner.to_bytes(), Some(owner), None)?;
    for r in records {
        let offset = r.offset.to_string();
        let (copies, _) = parts::split(copy_key(&r.payload).as_bytes(), r.payload.clone(), max_value);
        for (key, value) in &copies {
            tx.send_copy(topic, r.partition as i32, key, value, r.timestamp, (SOURCE_OFFSET, &offset))?;
        }
    }
    Ok(())
}
