//! The ledger the usage API answers closed months from: the usage and charges the billing
//! stage published (whichever worker billed them) and the subscription book, kept by
//! following the usage, charges and subscriptions topics (read_committed) from their start.
//!
//! Only the latest `http.history_months` billed months are kept in memory; older ones are
//! read with `im-meter report`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context;
use im_meter_core::aggregate::MonthlyUsage;
use im_meter_core::bill::{Charge, Subscriptions};
use im_meter_core::ingest::decode_subscription_event;
use im_meter_core::plan::AppId;
use im_meter_core::time::Month;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tracing::warn;

use super::changelog::{self, QuietEof};
use super::client_config;
use crate::config::Config;
use crate::report::UsageItem;

/// What the ledger holds.
pub struct LedgerState {
    /// Billed usage by month and app.
    pub usage: BTreeMap<(Month, AppId), MonthlyUsage>,
    /// Charge lines by month and app, in the order they were published.
    pub charges: BTreeMap<(Month, AppId), Vec<Charge>>,
    /// Every subscription event applied (refused ones left out, as billing does).
    pub book: Subscriptions,
    /// Whether everything published before the ledger started has been read.
    pub caught_up: bool,
    /// Months before this one were billed but are no longer kept.
    pub forgotten_before: Option<Month>,
    keep_months: usize,
}

impl LedgerState {
    /// Whether `month` has been billed (some app's usage of it was published).
    pub fn is_billed(&self, month: Month) -> bool {
        self.usage.range((month, 0)..=(month, AppId::MAX)).next().is_some()
    }

    /// Drops months beyond the newest `keep_months`.
    fn trim(&mut self) {
        let Some(&(newest, _)) = self.usage.keys().next_back() else { return };
        let mut cutoff = newest;
        for _ in 1..self.keep_months {
            cutoff = cutoff.prev();
        }
        if self.usage.keys().next().is_some_and(|(m, _)| *m < cutoff) {
            self.forgotten_before = self.forgotten_before.max(Some(cutoff));
        }
        self.usage.retain(|(m, _), _| *m >= cutoff);
        self.charges.retain(|(m, _), _| *m >= cutoff);
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
                book: Subscriptions::new(config.meter.tz),
                caught_up: false,
                forgotten_before: None,
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
    let followed = [&topics.usage, &topics.charges, &topics.subscriptions];
    let mut assignment = TopicPartitionList::new();
    let mut partitions = 0;
    for topic in followed {
        for p in 0..changelog::partition_count(&client, topic)? as i32 {
            assignment.add_partition_offset(topic, p, Offset::Beginning)?;
            partitions += 1;
        }
    }
    consumer.assign(&assignment).context("cannot assign the ledger reader")?;
    let mut at_end = 0;
    while !shutdown.load(Ordering::Relaxed) {
        let Some(message) = consumer.poll(Duration::from_millis(200)) else { continue };
        let m = match message {
            Ok(m) => m,
            Err(rdkafka::error::KafkaError::PartitionEOF(_)) => {
                at_end += 1;
                if at_end >= partitions {
                    ledger.state().caught_up = true;
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
                let usage = item.into_usage()?;
                state.usage.insert((usage.month, usage.app_id), usage);
                state.trim();
                Ok(())
            })
        } else if m.topic() == topics.charges.as_str() {
            serde_json::from_slice::<Charge>(value).map_err(anyhow::Error::from).map(|charge| {
                let lines = state.charges.entry((charge.month, charge.app_id)).or_default();
                lines.retain(|c| c.charge_id != charge.charge_id);
                lines.push(charge);
            })
        } else {
            // Refused subscription events were dead-lettered by billing; skip them here too.
            if let Ok(event) = decode_subscription_event(value) {
                let _ = state.book.apply(&event);
            }
            Ok(())
        };
        if let Err(e) = read {
            warn!(topic = m.topic(), offset = m.offset(), error = %format!("{e:#}"), "ledger: unreadable record skipped");
        }
    }
    Ok(())
}
