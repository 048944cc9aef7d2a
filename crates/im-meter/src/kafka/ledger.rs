//! The ledger the usage API answers closed months from: the usage and charges the billing
//! stage published (whichever worker billed them) and the subscription book, kept by
//! following the usage, charges and subscriptions topics (read_committed) from their start.
//!
//! The subscription book is billing's: a [`SubscriptionLog`], in which an event read after its
//! month was billed is late as billing decided it. When each month was billed, in
//! subscription positions, the ledger learns from the `s/{month}` marks each bill writes to
//! its billing changelog partition (read first to their end, then followed): the usage and
//! charges topics say that a month was billed, not what the bill had read. So the usage
//! API prices an open month as billing will bill it.
//!
//! Only the latest `http.history_months` billed months are kept in memory; older ones are
//! read with `im-meter report`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context;
use im_meter_core::aggregate::MonthlyUsage;
use im_meter_core::bill::{Charge, SubscriptionLog, SubscriptionRecord, Subscriptions, TopicRead};
use im_meter_core::changelog::{ChangelogKey, SubscriptionsRead};
use im_meter_core::plan::AppId;
use im_meter_core::time::Month;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tracing::warn;

use super::changelog::{self, QuietEof};
use super::client_config;
use super::plan_book;
use crate::config::Config;
use crate::report::UsageItem;

/// What the ledger holds.
pub struct LedgerState {
    /// Billed usage by month and app.
    pub usage: BTreeMap<(Month, AppId), MonthlyUsage>,
    /// Charge lines by month and app, in the order billing emits them (by item).
    pub charges: BTreeMap<(Month, AppId), Vec<Charge>>,
    /// Every subscription record read, and the book billing's rule derives from them
    /// (refused events left out, late ones from the first open month, as billing does).
    subscriptions: SubscriptionLog,
    /// Whether everything published before the ledger started has been read.
    pub caught_up: bool,
    /// Months before this one were billed but are no longer kept.
    pub forgotten_before: Option<Month>,
    /// A usage partition that lost records (deleted, or expired by a retention that
    /// should not be there) and the first offset it still holds: a month not found may
    /// have been billed all the same.
    pub usage_deleted: Option<(i32, i64)>,
    keep_months: usize,
}

impl LedgerState {
    /// The subscription book, as billing has it.
    pub fn book(&self) -> &Subscriptions {
        self.subscriptions.book()
    }

    /// Whether `month` has been billed (some app's usage of it was published).
    pub fn is_billed(&self, month: Month) -> bool {
        self.usage.range((month, 0)..=(month, AppId::MAX)).next().is_some()
    }

    /// The latest month billed (as far as read).
    pub fn newest_billed(&self) -> Option<Month> {
        self.usage.keys().next_back().map(|(m, _)| *m)
    }

    /// Whether records of `month` are kept: it is among the newest `keep_months` seen.
    fn keeps(&self, month: Month) -> bool {
        self.forgotten_before.is_none_or(|cutoff| month >= cutoff)
    }

    /// A billed app-month's usage. A month newer than any before moves the window of kept
    /// months (and only then are older ones dropped: reading a long topic stays linear).
    fn add_usage(&mut self, usage: MonthlyUsage) {
        let newest = self.usage.keys().next_back().map(|(m, _)| *m);
        if newest.is_none_or(|n| usage.month > n) {
            let mut cutoff = usage.month;
            for _ in 1..self.keep_months {
                cutoff = cutoff.prev();
            }
            if self.usage.keys().next().is_some_and(|(m, _)| *m < cutoff) {
                self.forgotten_before = self.forgotten_before.max(Some(cutoff));
                self.usage.retain(|(m, _), _| *m >= cutoff);
                self.charges.retain(|(m, _), _| *m >= cutoff);
            }
        }
        if self.keeps(usage.month) {
            self.usage.insert((usage.month, usage.app_id), usage);
        }
    }
}

/// The ledger, shared between its follower thread and the HTTP handlers.
pub struct Ledger {
    state: Mutex<LedgerState>,
}

impl Ledger {
    /// An empty ledger for `config`.
    pub fn new(config: &Config) -> Self {
        Ledger {
            state: Mutex::new(LedgerState {
                usage: BTreeMap::new(),
                charges: BTreeMap::new(),
                // (The billing partitions are counted when the ledger starts following.)
                subscriptions: SubscriptionLog::new(config.meter.tz, 1),
                caught_up: false,
                forgotten_before: None,
                usage_deleted: None,
                keep_months: config.http.history_months,
            }),
        }
    }

    /// The state, to read.
    pub fn state(&self) -> MutexGuard<'_, LedgerState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Follows the topics into `ledger` until `shutdown` is set. Unreadable records are
/// skipped with a warning (they are not ours to refuse: billing wrote them, or
/// dead-lettered them already).
pub fn follow(config: &Config, ledger: &Ledger, shutdown: &AtomicBool) -> anyhow::Result<()> {
    let client = client_config(config);
    let topics = &config.file.topics;
    let consumer: BaseConsumer<QuietEof> = changelog::reader(&client)
        .create_with_context(QuietEof)
        .context("cannot create the ledger reader")?;
    let followed = [&topics.usage, &topics.charges, &topics.subscriptions, &topics.billing_changelog];
    // When each month was billed, first: then every subscription record is judged as it is
    // read, instead of the book being derived again at each mark read after it.
    let billing_partitions = changelog::partition_count(&client, &topics.billing_changelog)?;
    let mut subscriptions = SubscriptionLog::new(config.meter.tz, billing_partitions);
    let from: Vec<(i32, Offset)> = (0..billing_partitions as i32).map(|p| (p, Offset::Beginning)).collect();
    let marks_end: BTreeMap<i32, i64> = changelog::read_from(
        &client,
        &topics.billing_changelog,
        &from,
        changelog::Until::LastStable,
        |record| {
            billed_mark(&mut subscriptions, record.partition, record.key, record.value);
            Ok(())
        },
    )?
    .into_iter()
    .collect();
    // The subscription history starts in the plan book's copy; the topic is read on from
    // where the copy ends (older records may be gone with the topic's retention).
    for record in plan_book::read(&client, config)? {
        subscriptions.push(record);
    }
    let resume_at: Vec<Option<i64>> = (0..changelog::partition_count(&client, &topics.subscriptions)?)
        .map(|p| subscriptions.resume_at(p))
        .collect();
    ledger.state().subscriptions = subscriptions;
    let mut assignment = TopicPartitionList::new();
    // Where each partition ended when the ledger started: caught up once read that far.
    let mut pending = BTreeMap::new();
    for topic in followed {
        for p in 0..changelog::partition_count(&client, topic)? as i32 {
            let start_at = if topic == &topics.subscriptions {
                resume_at.get(p as usize).copied().flatten().map_or(Offset::Beginning, Offset::Offset)
            } else if topic == &topics.billing_changelog {
                marks_end.get(&p).map_or(Offset::Beginning, |&o| Offset::Offset(o))
            } else {
                Offset::Beginning
            };
            assignment.add_partition_offset(topic, p, start_at)?;
            let (start, end) = consumer.fetch_watermarks(topic, p, Duration::from_secs(30))?;
            if topic == &topics.usage && start > 0 {
                warn!(topic = %topic, partition = p, start, "ledger: the usage topic lost records; months not found in it are answered as gone");
                ledger.state().usage_deleted.get_or_insert((p, start));
            }
            // Nothing to wait for where the read starts at the end: a partition whose
            // records were all deleted, or a subscriptions partition the plan book has
            // copied whole (its position would stay unknown, no record ever read).
            let from = match start_at {
                Offset::Offset(o) => o.max(start),
                _ => start,
            };
            if end > from {
                pending.insert((topic.to_string(), p), end);
            }
        }
    }
    consumer.assign(&assignment).context("cannot assign the ledger reader")?;
    ledger.state().caught_up = pending.is_empty();
    while !shutdown.load(Ordering::Relaxed) {
        let Some(message) = consumer.poll(Duration::from_millis(200)) else { continue };
        let m = match message {
            Ok(m) => m,
            Err(rdkafka::error::KafkaError::PartitionEOF(_)) => {
                // The position steps over transaction markers, which no message shows.
                if !pending.is_empty() {
                    for e in consumer.position()?.elements() {
                        if let Offset::Offset(at) = e.offset() {
                            let key = (e.topic().to_string(), e.partition());
                            if pending.get(&key).is_some_and(|end| at >= *end) {
                                pending.remove(&key);
                            }
                        }
                    }
                    ledger.state().caught_up = pending.is_empty();
                }
                continue;
            }
            Err(e) => {
                warn!(error = %e, "ledger: read error");
                continue;
            }
        };
        let Some(value) = m.payload() else { continue };
        let mut state = ledger.state();
        let read = if m.topic() == topics.usage.as_str() {
            serde_json::from_slice::<UsageItem>(value).map_err(anyhow::Error::from).and_then(|item| {
                state.add_usage(item.into_usage()?);
                Ok(())
            })
        } else if m.topic() == topics.charges.as_str() {
            serde_json::from_slice::<Charge>(value).map_err(anyhow::Error::from).map(|charge| {
                if state.keeps(charge.month) {
                    let lines = state.charges.entry((charge.month, charge.app_id)).or_default();
                    lines.retain(|c| c.charge_id != charge.charge_id);
                    lines.push(charge);
                    // In the order billing emits them, whatever order the charges topic's
                    // partitions were read in: every worker answers alike.
                    lines.sort_by_key(|c| c.item);
                }
            })
        } else if m.topic() == topics.subscriptions.as_str() {
            // Refused events were dead-lettered by billing; the log leaves them out too.
            let read = state.subscriptions.read_from_topic(SubscriptionRecord {
                partition: m.partition() as u32,
                offset: m.offset(),
                timestamp: m.timestamp().to_millis(),
                key: None,
                payload: value.to_vec(),
            });
            if read == TopicRead::ReadAgain {
                // The topic was created again and refilled past where the ledger was.
                warn!(
                    partition = m.partition(),
                    "ledger: the subscriptions topic was created again; reading it from its beginning"
                );
                consumer.seek(m.topic(), m.partition(), Offset::Beginning, Duration::from_secs(10))?;
            }
            Ok(())
        } else {
            billed_mark(&mut state.subscriptions, m.partition(), m.key(), Some(value));
            Ok(())
        };
        if let Err(e) = read {
            warn!(topic = m.topic(), offset = m.offset(), error = %format!("{e:#}"), "ledger: unreadable record skipped");
        }
    }
    Ok(())
}

/// Notes a bill's `s/{month}` mark in `subscriptions`, if this record of billing changelog
/// partition `partition` is one; every other record of the changelog is billing's own
/// business. An unreadable mark is skipped with a warning.
fn billed_mark(
    subscriptions: &mut SubscriptionLog,
    partition: i32,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
) {
    let Some(Ok(ChangelogKey::SubscriptionsRead { month })) = key.map(ChangelogKey::from_bytes) else {
        return;
    };
    match value.map(SubscriptionsRead::decode) {
        Some(Ok(read)) => subscriptions.billed(partition as u32, month, read),
        Some(Err(e)) => {
            warn!(partition, %month, error = %e, "ledger: unreadable subscription positions skipped")
        }
        None => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_newest_months_are_kept_and_older_records_stay_out() {
        let config = Config::load(None, [("IM_METER__HTTP__HISTORY_MONTHS".to_string(), "2".to_string())])
            .expect("valid");
        let ledger = Ledger::new(&config);
        let mut state = ledger.state();
        let month = |m: &str| m.parse::<Month>().expect("month");
        for m in ["2026-09", "2026-10", "2026-09", "2026-11"] {
            state.add_usage(MonthlyUsage::empty(7, month(m)));
        }
        assert_eq!(state.forgotten_before, Some(month("2026-10")));
        assert!(!state.is_billed(month("2026-09")) && state.is_billed(month("2026-10")));
        // A late record of a forgotten month does not come back.
        state.add_usage(MonthlyUsage::empty(8, month("2026-09")));
        assert_eq!(state.usage.len(), 2);
    }
}
