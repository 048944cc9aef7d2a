//! The plan book's durable history: billing copies every record of the subscriptions topic,
//! byte for byte, into a compacted topic (`topics.plan_book`), so that the subscription
//! history every bill depends on outlives the subscriptions topic's retention.
//!
//! Subscriptions partition *j* is copied into plan-book partition *j*, each record keyed by
//! its source offset (decimal text, so compaction never removes one) with its original
//! timestamp; a record larger than the topic takes is copied in parts
//! ([`im_meter_core::aggregate::parts`]: `{offset}#0…` then a header under `{offset}`), and
//! read back whole. The copy of *j* is made by the billing task of changelog partition
//! `j % changelog partitions`, in a transaction of that task's producer that also moves the
//! task's copy mark (`o/{j}` in its changelog partition): a task's new owner fences the old
//! one and goes on from the mark, so every record is copied once.
//!
//! Whoever needs the plan book (the billing feed, the usage API's ledger) reads the copy
//! first, then the subscriptions topic from where the copy ends: the same records in the same
//! order per partition as the whole topic, whatever retention removed since.

use std::collections::BTreeMap;

use anyhow::Context;
use im_meter_core::aggregate::parts::{self, Assembler};
use im_meter_core::bill::SubscriptionRecord;
use rdkafka::{ClientConfig, Offset};

use super::changelog;
use super::output::Transaction;

/// A record of the subscriptions topic, read from it or from the copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceRecord {
    /// Its partition in the subscriptions topic.
    pub partition: i32,
    /// Its offset there.
    pub offset: i64,
    /// Its timestamp (epoch milliseconds), if it had one.
    pub timestamp: Option<i64>,
    /// Its value (empty when it had none).
    pub payload: Vec<u8>,
}

impl From<changelog::Record<'_>> for SourceRecord {
    fn from(record: changelog::Record<'_>) -> Self {
        SourceRecord {
            partition: record.partition,
            offset: record.offset,
            timestamp: record.timestamp,
            payload: record.value.unwrap_or_default().to_vec(),
        }
    }
}

/// A record as the subscription logs keep it (no key: the copy keeps none).
impl From<SourceRecord> for SubscriptionRecord {
    fn from(record: SourceRecord) -> Self {
        SubscriptionRecord {
            partition: record.partition as u32,
            offset: record.offset,
            timestamp: record.timestamp,
            key: None,
            payload: record.payload,
        }
    }
}

/// What the copy holds: the copied records, by partition then offset, and for each
/// partition the subscriptions offset from which the topic is read on.
#[derive(Debug, Default)]
pub struct Copy {
    /// Copied records, oldest first within each partition.
    pub records: Vec<SourceRecord>,
    /// Subscriptions partition → the offset after its last copied record.
    pub ends: BTreeMap<i32, i64>,
}

impl Copy {
    /// Where to start reading subscriptions partition `p`: after the copy, or its beginning.
    pub fn start_of(&self, partition: i32) -> Offset {
        self.ends.get(&partition).map_or(Offset::Beginning, |&o| Offset::Offset(o))
    }
}

/// Reads the whole copy (committed records only), values copied in parts whole.
pub fn read(client: &ClientConfig, topic: &str) -> anyhow::Result<Copy> {
    let mut copy = Copy::default();
    // Parts and their header are in one partition, in order: one assembler per partition.
    let mut assemblers: BTreeMap<i32, Assembler> = BTreeMap::new();
    changelog::read_to_end(client, topic, &[], |record| {
        let key = record.key.unwrap_or_default();
        let assembler = assemblers.entry(record.partition).or_default();
        let whole = assembler
            .feed(key, record.value)
            .with_context(|| format!("{topic}: a record copied in parts is damaged at {}", record.offset))?;
        let Some(whole) = whole else { return Ok(()) };
        let offset: i64 = std::str::from_utf8(whole.key)
            .ok()
            .and_then(|k| k.parse().ok())
            .with_context(|| format!("{topic}: a key that is not a source offset at {}", record.offset))?;
        let end = copy.ends.entry(record.partition).or_default();
        *end = (*end).max(offset + 1);
        // The copy's own offset is not the source's: the key says where it came from.
        copy.records.push(SourceRecord {
            partition: record.partition,
            offset,
            timestamp: record.timestamp,
            payload: whole.value.map(|v| v.into_owned()).unwrap_or_default(),
        });
        Ok(())
    })?;
    // Read per partition in offset order already; sorted to say so.
    copy.records.sort_by_key(|r| (r.partition, r.offset));
    Ok(copy)
}

/// Reads subscriptions partition `partition` from `from` to its end: its records, and the
/// offset to copy from next time (the position reached, past any transaction marker).
pub fn read_source(
    client: &ClientConfig,
    topic: &str,
    partition: i32,
    from: Offset,
) -> anyhow::Result<(Vec<SourceRecord>, Option<i64>)> {
    let mut records = Vec::new();
    let ends =
        changelog::read_from(client, topic, &[(partition, from)], changelog::Until::LastStable, |record| {
            records.push(SourceRecord::from(record));
            Ok(())
        })?;
    let end = ends.iter().find(|(p, _)| *p == partition).map(|(_, o)| *o);
    let last = records.last().map(|r| r.offset + 1);
    Ok((records, end.max(last)))
}

/// Queues the copies of `records` in transaction `tx`, each in parts if it is over
/// `max_value` bytes.
pub fn copy(
    tx: &Transaction<'_>,
    topic: &str,
    records: &[SourceRecord],
    max_value: usize,
) -> anyhow::Result<()> {
    for r in records {
        let (copies, _) = parts::split(r.offset.to_string().as_bytes(), r.payload.clone(), max_value);
        for (key, value) in &copies {
            tx.send_at(topic, r.partition, key, value, r.timestamp)?;
        }
    }
    Ok(())
}
