//! The billing stage: each source partition's usage of closed months → merged per app →
//! priced under the subscriptions → charges and quota alerts, exactly once.
//!
//! Billing is partitioned by app: the metering stage writes an app's usage of a closed month
//! to the billing changelog partition [`billing_partition`] gives, so one billing task sees
//! every source partition's share of an app and merges them (HLL union, instant-wise PCC
//! sums, max). The billing changelog's partition count is fixed at creation, so an app's
//! billing partition never moves, even when the events topic grows. A month is billed in a
//! billing changelog partition once every events partition there is now has written its
//! month-closed marker there. Each billing task has its own transactional producer
//! (`{group}-billing-{partition}`): a new owner's `init_transactions` fences the previous
//! one, and one transaction carries the month's charges, alerts, the partition's
//! billed-through mark and the deletion of the month's usage. Billing commits no consumer
//! offsets: on assignment a task reads its partition from the beginning (the compacted log
//! holds only unbilled usage and the billed-through mark) before it bills anything.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use im_meter_core::aggregate::meter::QUOTA_WATCH;
use im_meter_core::aggregate::parts::Assembler;
use im_meter_core::aggregate::{
    billing_partition, merge_shares, AppMonthAggregate, ChangelogKey, ClosedMark, MonthlyUsage,
};
use im_meter_core::bill::{bill_month, quota_alert, Subscriptions};
use im_meter_core::ingest::{decode_subscription_event, RejectReason, Rejection};
use im_meter_core::plan::AppId;
use im_meter_core::time::{Month, Timestamp};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};
use tracing::{error, info, warn};

use super::changelog::{self, QuietEof};
use super::fetch::Fetched;
use super::output::{DeadLetter, Outbox, TransactionFailed};
use super::plan_book::{self, SourceRecord};
use crate::config::Config;
use crate::metrics::metrics;
use crate::report::UsageItem;
use crate::status::{Board, ConsumerStatus, StageKind};

const POLL: Duration = Duration::from_millis(100);

/// What one billing changelog partition holds.
struct Task {
    outbox: Outbox,
    /// Records before this offset were read when the task was restored.
    skip_until: i64,
    /// (month, app) → source partition → that partition's final usage, and the number of
    /// parts its record was written in.
    usage: BTreeMap<(Month, AppId), BTreeMap<u32, (AppMonthAggregate, usize)>>,
    /// Keeps the parts of values written in parts until their header comes.
    assembler: Assembler,
    /// Source partition → how far it has closed months.
    closed: BTreeMap<u32, ClosedMark>,
    billed_through: Option<Month>,
    /// App-months whose MAU passed the Developer cap in some source partition, and where.
    crossed: BTreeMap<(Month, AppId), BTreeSet<u32>>,
    /// App-months whose quota alert is published.
    alerted: BTreeSet<(Month, AppId)>,
    /// Crossings found not to need an alert (the app is not on Developer): not re-checked.
    declined: BTreeSet<(Month, AppId)>,
    /// Subscriptions partitions this task copies into the plan book → the offset to copy
    /// from next.
    copied: BTreeMap<i32, i64>,
    /// Usage shares of months already billed, to refuse: (month, app, source) → the share
    /// and its number of parts. Only a partition added to the events topic after a month
    /// closed can write one (its first events were late everywhere else).
    late: BTreeMap<(Month, AppId, u32), (AppMonthAggregate, usize)>,
}

impl Task {
    fn new(outbox: Outbox) -> Self {
        Task {
            outbox,
            skip_until: 0,
            usage: BTreeMap::new(),
            closed: BTreeMap::new(),
            billed_through: None,
            crossed: BTreeMap::new(),
            alerted: BTreeSet::new(),
            declined: BTreeSet::new(),
            copied: BTreeMap::new(),
            late: BTreeMap::new(),
            assembler: Assembler::default(),
        }
    }

    /// Absorbs everything partition `partition` of `topic` holds, to its end (read_committed);
    /// returns the offset after the last record read. The task's assembler goes on with the
    /// group consumer: a value's parts and header can lie on both sides of where this stops.
    fn read(&mut self, client: &ClientConfig, topic: &str, partition: i32) -> anyhow::Result<i64> {
        let mut assembler = std::mem::take(&mut self.assembler);
        let read =
            changelog::read_partition(client, topic, partition, &mut assembler, |key, value, parts| {
                self.absorb(key, value, parts)
            });
        self.assembler = assembler;
        Ok(read?.next_offset)
    }

    fn absorb(&mut self, key: ChangelogKey, value: Option<&[u8]>, parts: usize) -> anyhow::Result<()> {
        match (key, value) {
            (ChangelogKey::Usage { app_id, month, source }, Some(bytes)) => {
                let aggregate =
                    AppMonthAggregate::decode(bytes).context("unreadable usage in the changelog")?;
                if self.billed_through.is_some_and(|b| month <= b) {
                    // Never changes a billed month: refused (dead letter `late`).
                    self.late.insert((month, app_id, source), (aggregate, parts));
                } else {
                    self.usage.entry((month, app_id)).or_default().insert(source, (aggregate, parts));
                }
            }
            (ChangelogKey::Usage { app_id, month, source }, None) => {
                if let Some(sources) = self.usage.get_mut(&(month, app_id)) {
                    sources.remove(&source);
                }
                self.late.remove(&(month, app_id, source));
            }
            (ChangelogKey::ClosedThrough { source }, Some(bytes)) => {
                let mark = ClosedMark::decode(bytes).context("unreadable closed mark in the changelog")?;
                self.closed.insert(source, mark);
            }
            (ChangelogKey::ClosedThrough { source }, None) => {
                self.closed.remove(&source);
            }
            (ChangelogKey::Billed, Some(bytes)) => {
                let text = std::str::from_utf8(bytes).context("unreadable billed-through mark")?;
                let month: Month = text.parse().context("unreadable billed-through mark")?;
                // Only forward: the task reads its own earlier marks back after it billed on.
                self.billed_through = self.billed_through.max(Some(month));
            }
            // Metering state of the partition's own source: not billing's business.
            (ChangelogKey::QuotaCrossed { app_id, month, source }, Some(_)) => {
                self.crossed.entry((month, app_id)).or_default().insert(source);
            }
            (ChangelogKey::Alerted { app_id, month }, Some(_)) => {
                self.alerted.insert((month, app_id));
            }
            // Deletions of markers come with the month's billing, which forgets them anyway.
            (ChangelogKey::QuotaCrossed { .. } | ChangelogKey::Alerted { .. }, None) => {}
            (ChangelogKey::PlanCopied { partition }, Some(bytes)) => {
                let next = std::str::from_utf8(bytes).ok().and_then(|t| t.parse().ok());
                let next: i64 = next.context("unreadable plan book copy mark")?;
                let mark = self.copied.entry(partition as i32).or_default();
                // Only forward: the task reads its own earlier marks back.
                *mark = (*mark).max(next);
            }
            (ChangelogKey::State(_), _) | (ChangelogKey::Billed | ChangelogKey::PlanCopied { .. }, None) => {}
        }
        Ok(())
    }

    /// The month to bill next, closed everywhere or not: the one after the last billed,
    /// or, before the first bill, the first month any source applied an event for.
    fn next_to_bill(&self) -> Option<Month> {
        match self.billed_through {
            Some(billed) => Some(billed.next()),
            None => self.closed.values().filter_map(|m| m.first_active).min(),
        }
    }

    /// The next month to bill, if every one of the `sources` partitions has closed it.
    /// Months are billed one after the other: none is ever skipped.
    fn next_billable(&self, sources: u32) -> Option<Month> {
        // `None` sorts first: one source without a mark yet holds every month back.
        let through = (0..sources).map(|s| self.closed.get(&s).map(|m| m.through)).min()??;
        self.next_to_bill().filter(|next| *next <= through)
    }
}

/// The subscription book, fed from the plan book's copy and then the whole subscriptions
/// topic (small: every billing task needs the plans of its apps, and reads them all).
struct SubscriptionFeed {
    consumer: BaseConsumer<QuietEof>,
    topic: String,
    /// Per partition: whether everything up to its end has been applied.
    at_end: Vec<bool>,
    /// Per partition: the offset after the last record applied (from the copy or the topic).
    seen: Vec<Option<i64>>,
    book: Subscriptions,
    /// Refused subscription records, each dead-lettered by one billing task (see
    /// [`Refused`]) with the month it belongs to.
    refused: Vec<Refused>,
}

/// A refused subscription record and who publishes its dead letter: the billing task of the
/// app's partition (or, when no app can be read, of the source partition's number), in
/// the transaction billing the month of the event (or, when it has no readable time, of
/// the record's Kafka timestamp). The billed-through mark makes that exactly once.
struct Refused {
    /// Which app's billing partition publishes it (`None`: by source partition).
    app_id: Option<AppId>,
    source_partition: i32,
    month: Month,
    letter: DeadLetter,
}

impl SubscriptionFeed {
    /// A feed that has applied the plan book's copy and reads the topic on from its end.
    fn new(client: &ClientConfig, config: &Config) -> anyhow::Result<Self> {
        let topics = &config.file.topics;
        let consumer: BaseConsumer<QuietEof> = changelog::reader(client)
            .create_with_context(QuietEof)
            .context("cannot create the subscriptions reader")?;
        let partitions = changelog::partition_count(client, &topics.subscriptions)? as usize;
        let copy = plan_book::read(client, &topics.plan_book)?;
        let mut feed = SubscriptionFeed {
            consumer,
            topic: topics.subscriptions.clone(),
            at_end: vec![false; partitions],
            seen: vec![None; partitions],
            book: Subscriptions::new(config.meter.tz),
            refused: Vec::new(),
        };
        for record in &copy.records {
            feed.absorb(record, None);
        }
        let mut assignment = TopicPartitionList::new();
        for p in 0..partitions as i32 {
            assignment.add_partition_offset(&topics.subscriptions, p, copy.start_of(p))?;
            if let Some(seen) = feed.seen.get_mut(p as usize) {
                *seen = copy.ends.get(&p).copied();
            }
        }
        feed.consumer.assign(&assignment)?;
        info!(
            copied = copy.records.len(),
            apps = feed.book.apps().count(),
            "billing: plan book restored from its copy"
        );
        Ok(feed)
    }

    /// Applies one subscription record, or notes it refused.
    fn absorb(&mut self, record: &SourceRecord, key: Option<&[u8]>) {
        if let Some(seen) = self.seen.get_mut(record.partition as usize) {
            *seen = (*seen).max(Some(record.offset + 1));
        }
        let (app_id, ts, why) = match decode_subscription_event(&record.payload) {
            Ok(event) => match self.book.apply(&event) {
                Ok(()) => return,
                Err(why) => (Some(event.app_id), Some(event.ts), why),
            },
            Err(why) => (None, None, why),
        };
        warn!(app_id, reason = why.reason.code(), detail = %why.detail, "subscription event refused");
        let record_time = record.timestamp.map(Timestamp).unwrap_or(Timestamp::MIN);
        let month = self.book.tz().month_of(ts.unwrap_or(record_time));
        let source = Fetched {
            topic: &self.topic,
            partition: record.partition,
            offset: record.offset,
            key,
            payload: &record.payload,
        };
        let letter = DeadLetter::of(&source, why);
        self.refused.push(Refused { app_id, source_partition: record.partition, month, letter });
    }

    /// Applies the subscription events fetched so far, without waiting for more.
    fn follow(&mut self) {
        while let Some(message) = self.next(Duration::ZERO) {
            self.handle(message);
        }
    }

    /// Applies every subscription event up to the end of the topic as fetched now.
    fn catch_up(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            anyhow::ensure!(Instant::now() < deadline, "reading subscriptions took too long");
            match self.next(Duration::from_millis(50)) {
                Some(message) => self.handle(message),
                // Nothing more fetched: done once every partition reported its end.
                None if self.at_end.iter().all(|e| *e) => return Ok(()),
                None => {}
            }
        }
    }

    /// The next message of the subscriptions reader, owned (so that the feed can change
    /// while it is handled), waiting up to `wait`.
    fn next(&mut self, wait: Duration) -> Option<KafkaResult<(SourceRecord, Option<Vec<u8>>)>> {
        self.consumer.poll(wait).map(|r| {
            r.map(|m| {
                let record = SourceRecord {
                    partition: m.partition(),
                    offset: m.offset(),
                    timestamp: m.timestamp().to_millis(),
                    payload: m.payload().unwrap_or_default().to_vec(),
                };
                (record, m.key().map(<[u8]>::to_vec))
            })
        })
    }

    /// Applies a record, or notes where a partition ends.
    fn handle(&mut self, message: KafkaResult<(SourceRecord, Option<Vec<u8>>)>) {
        match message {
            Ok((record, key)) => {
                if let Some(end) = self.at_end.get_mut(record.partition as usize) {
                    *end = false;
                }
                self.absorb(&record, key.as_deref());
            }
            Err(KafkaError::PartitionEOF(p)) => {
                if let Some(end) = self.at_end.get_mut(p as usize) {
                    *end = true;
                }
            }
            Err(e) => warn!(error = %e, "subscriptions reader error"),
        }
    }
}

/// Copies into the plan book what the feed has seen of one subscriptions partition that
/// task `partition` copies (`j % partitions == partition`) and has not copied yet, with the
/// task's copy mark, in one transaction of the task. One partition a call: a copy reads the
/// topic back (about half a second), and the loop must keep polling in between. Returns
/// whether it copied anything.
fn copy_subscriptions(
    config: &Config,
    client: &ClientConfig,
    shape: Shape,
    task: &mut Task,
    feed: &SubscriptionFeed,
) -> anyhow::Result<bool> {
    let topics = &config.file.topics;
    for (j, seen) in feed.seen.iter().enumerate() {
        let j = j as i32;
        let copied = task.copied.get(&j).copied();
        if j % shape.partitions as i32 != shape.partition || *seen <= copied {
            continue;
        }
        let from = copied.map_or(Offset::Beginning, Offset::Offset);
        let (records, end) = plan_book::read_source(client, &topics.subscriptions, j, from)?;
        let Some(end) = end else { continue };
        if let (Some(first), Some(copied)) = (records.first(), copied) {
            if first.offset > copied {
                error!(
                    partition = j,
                    from = copied,
                    to = first.offset,
                    "subscription records expired before the plan book copied them: those changes are lost"
                );
            }
        }
        let mark = ChangelogKey::PlanCopied { partition: j as u32 };
        let result = task.outbox.transaction(|tx| {
            plan_book::copy(tx, &topics.plan_book, &records)?;
            tx.send(
                &topics.billing_changelog,
                Some(shape.partition),
                &mark.to_bytes(),
                Some(end.to_string().as_bytes()),
                None,
            )
        });
        match result {
            Ok(()) => {
                info!(
                    partition = j,
                    records = records.len(),
                    next = end,
                    "billing: subscriptions copied into the plan book"
                );
                task.copied.insert(j, end);
            }
            // Nothing was written; the next pass copies again.
            Err(TransactionFailed::Aborted(e)) => {
                warn!(partition = j, error = %format!("{e:#}"), "billing: plan book copy aborted, will retry");
            }
            Err(fatal @ TransactionFailed::Fatal(_)) => return Err(fatal.into()),
        }
        return Ok(true);
    }
    Ok(false)
}

/// Shared between the poll loop and the rebalance callbacks.
#[derive(Default)]
struct Assignment {
    added: BTreeSet<i32>,
    revoked: BTreeSet<i32>,
}

struct StageContext {
    assignment: Arc<Mutex<Assignment>>,
}

impl ClientContext for StageContext {}

impl ConsumerContext for StageContext {
    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Ok(mut a) = self.assignment.lock() else { return };
        match rebalance {
            Rebalance::Assign(tpl) => a.added.extend(tpl.elements().iter().map(|e| e.partition())),
            Rebalance::Revoke(tpl) => a.revoked.extend(tpl.elements().iter().map(|e| e.partition())),
            Rebalance::Error(_) => {}
        }
    }
}

/// Runs the billing stage until `shutdown` is set. It reports to `board`.
pub fn run(config: &Config, shutdown: &AtomicBool, board: &Board) -> anyhow::Result<()> {
    let client = super::client_config(config);
    let topics = &config.file.topics;
    let mut sources = changelog::partition_count(&client, &topics.events)?;
    let partitions = changelog::partition_count(&client, &topics.billing_changelog)?;
    let mut subscriptions = SubscriptionFeed::new(&client, config)?;
    let assignment = Arc::new(Mutex::new(Assignment::default()));
    // No offsets are ever committed in this group: every assignment starts from the beginning.
    let consumer: BaseConsumer<StageContext> =
        super::group_member(config, &format!("{}-billing", config.file.kafka.group_id))
            .create_with_context(StageContext { assignment: Arc::clone(&assignment) })
            .context("cannot create the changelog consumer")?;
    consumer.subscribe(&[&topics.billing_changelog]).context("cannot subscribe to the changelog")?;
    info!(topic = %topics.billing_changelog, sources, "billing: started");
    let status = board.consumer(StageKind::Bill, "0", &topics.billing_changelog);

    let mut tasks: BTreeMap<i32, Task> = BTreeMap::new();
    let mut last_report = Instant::now();
    let mut last_round = Instant::now();
    while !shutdown.load(Ordering::Relaxed) {
        let message = consumer.poll(POLL);
        status.polled();
        {
            let mut a = assignment.lock().map_err(|_| anyhow::anyhow!("assignment poisoned"))?;
            let (revoked, added) = (std::mem::take(&mut a.revoked), std::mem::take(&mut a.added));
            drop(a);
            if !revoked.is_empty() {
                metrics().rebalances.with_label_values(&["bill", "revoke"]).inc();
            }
            if !added.is_empty() {
                metrics().rebalances.with_label_values(&["bill", "assign"]).inc();
            }
            for p in revoked {
                tasks.remove(&p);
                status.state().partitions.remove(&p);
                info!(partition = p, "billing: partition revoked");
            }
            for p in added {
                status.state().partitions.entry(p).or_default().restored = false;
                let task = restore(config, &client, p)?;
                let mut state = status.state();
                let entry = state.partitions.entry(p).or_default();
                (entry.restored, entry.next_offset) = (true, Some(task.skip_until));
                drop(state);
                tasks.insert(p, task);
            }
            metrics().assigned_partitions.with_label_values(&["bill", "0"]).set(tasks.len() as i64);
        }
        let busy = matches!(message, Some(Ok(_)));
        match message {
            Some(Ok(m)) => {
                if let Some(task) = tasks.get_mut(&m.partition()) {
                    if m.offset() >= task.skip_until {
                        let mut assembler = std::mem::take(&mut task.assembler);
                        let absorbed =
                            changelog::assemble(&mut assembler, m.key(), m.payload(), &mut |k, v, n| {
                                task.absorb(k, v, n)
                            });
                        task.assembler = assembler;
                        absorbed?;
                    }
                }
            }
            Some(Err(e)) => warn!(error = %e, "billing: consumer error"),
            None => {}
        }
        if last_report.elapsed() >= REPORT_EVERY {
            last_report = Instant::now();
            report_positions(&consumer, &topics.billing_changelog, &status);
        }
        // The oldest month waiting to be billed (closed by every source or not).
        status.state().oldest_open_month_end =
            tasks.values().filter_map(Task::next_to_bill).min().map(|m| config.meter.tz.end_of_month(m));
        // Records keep coming: read them first, but look at the rest at least once a second.
        if busy && last_round.elapsed() < ROUND_EVERY {
            continue;
        }
        last_round = Instant::now();
        subscriptions.follow();
        let mut copied = false;
        for (&p, task) in tasks.iter_mut() {
            if !copied {
                let shape = Shape { partition: p, partitions };
                copied = copy_subscriptions(config, &client, shape, task, &subscriptions)?;
            }
            alert_as_it_happens(config, p, task, &mut subscriptions)?;
            refuse_late_usage(config, p, task)?;
            while let Some(month) = task.next_billable(sources) {
                // The events topic may have grown since it was last looked at: a month
                // waits for every partition there is when it is billed.
                let now = changelog::partition_count(&client, &topics.events)?;
                if now != sources {
                    info!(from = sources, to = now, "billing: the events topic has a new partition count");
                    sources = now;
                    continue;
                }
                subscriptions.catch_up()?;
                let shape = Shape { partition: p, partitions };
                if !bill(config, shape, month, task, &subscriptions)? {
                    break;
                }
            }
        }
    }
    info!("billing: stopped");
    Ok(())
}

/// How often the billing consumer's positions are reported.
const REPORT_EVERY: Duration = Duration::from_millis(500);

/// How often, at least, billing looks for months to bill, alerts and subscriptions to copy
/// while changelog records keep coming.
const ROUND_EVERY: Duration = Duration::from_secs(1);

/// Reports how far the consumer has read each partition (its position steps over
/// transaction markers, which carry no record).
fn report_positions(consumer: &BaseConsumer<StageContext>, topic: &str, status: &ConsumerStatus) {
    let Ok(positions) = consumer.position() else { return };
    let mut state = status.state();
    for e in positions.elements_for_topic(topic) {
        if let (Offset::Offset(o), Some(entry)) = (e.offset(), state.partitions.get_mut(&e.partition())) {
            entry.next_offset = entry.next_offset.max(Some(o));
        }
    }
}

/// A task for a newly assigned partition: its producer (fencing the previous owner) first,
/// then everything the partition holds.
fn restore(config: &Config, client: &ClientConfig, partition: i32) -> anyhow::Result<Task> {
    let started = Instant::now();
    let topics = &config.file.topics;
    let id = format!("{}-billing-{partition}", config.file.kafka.group_id);
    let outbox = Outbox::transactional(client, &id, config.worker.transaction_timeout, "bill")?;
    let mut task = Task::new(outbox);
    let mut next_offset = task.read(client, &topics.billing_changelog, partition)?;
    if task.billed_through.is_none()
        && (partition as u32) < changelog::partition_count(client, &topics.changelog)?
    {
        // Nothing billed here yet: this may be the first start after an upgrade from a
        // version that kept billing's records in the metering changelog (same partition
        // numbers). Those records first, then this partition's on top, so that billing
        // goes on where it was instead of billing every month again.
        let mut upgraded = Task::new(task.outbox);
        upgraded.read(client, &topics.changelog, partition)?;
        upgraded.assembler = Assembler::default();
        next_offset = upgraded.read(client, &topics.billing_changelog, partition)?;
        task = upgraded;
    }
    // The group consumer starts from the beginning too; what was read here is skipped.
    task.skip_until = next_offset;
    metrics().restore_duration.with_label_values(&["bill"]).observe(started.elapsed().as_secs_f64());
    info!(partition, billed_through = ?task.billed_through, "billing: partition restored");
    Ok(task)
}

/// Where a billing task sits: its changelog partition and how many there are.
#[derive(Debug, Clone, Copy)]
struct Shape {
    partition: i32,
    partitions: u32,
}

/// Bills one month of one changelog partition in one transaction; `false` if the
/// transaction was aborted (nothing published, state unchanged, to be retried).
fn bill(
    config: &Config,
    shape: Shape,
    month: Month,
    task: &mut Task,
    feed: &SubscriptionFeed,
) -> anyhow::Result<bool> {
    let subscriptions = &feed.book;
    let Shape { partition, partitions } = shape;
    let month_end = config.meter.tz.end_of_month(month);
    let mut apps: BTreeSet<AppId> =
        task.usage.range((month, 0)..=(month, AppId::MAX)).map(|((_, a), _)| *a).collect();
    apps.extend(
        subscriptions
            .apps()
            .filter(|a| billing_partition(*a, partitions) as i32 == partition)
            .filter(|a| subscriptions.created_at(*a).is_none_or(|c| c < month_end)),
    );
    let mut charges = Vec::new();
    let mut alerts = Vec::new();
    let mut usages = Vec::new();
    for &app_id in &apps {
        let usage = match task.usage.get(&(month, app_id)) {
            Some(shares) => {
                let mut merged =
                    merge_shares(config.meter.precision, shares.values().map(|(share, _)| share)).map_err(
                        |e| {
                            anyhow::anyhow!(
                            "cannot merge the usage of app {app_id} in {month} from partitions {:?}: {e}; \
                             metering.hll_precision must be the same in every worker and must not change \
                             while a month is open",
                            shares.keys().collect::<Vec<_>>()
                        )
                        },
                    )?;
                merged.usage(app_id, month, config.meter.grid)
            }
            None => MonthlyUsage::empty(app_id, month),
        };
        charges.extend(bill_month(subscriptions, &usage, &config.prices));
        // Alerted during the month already: once per app and month.
        if !task.alerted.contains(&(month, app_id)) {
            alerts.extend(quota_alert(subscriptions, &usage));
        }
        usages.push(usage);
    }
    let topics = &config.file.topics;
    let ours = |r: &&Refused| match r.app_id {
        Some(app_id) => billing_partition(app_id, partitions) as i32 == partition,
        None => r.source_partition % partitions as i32 == partition,
    };
    let refused: Vec<&DeadLetter> = feed
        .refused
        .iter()
        .filter(ours)
        .filter(|r| r.month <= month && task.billed_through.is_none_or(|b| r.month > b))
        .map(|r| &r.letter)
        .collect();
    // Each share's record, and its parts if it was written in parts.
    let usage_keys: Vec<Vec<u8>> = task
        .usage
        .range((month, 0)..=(month, AppId::MAX))
        .flat_map(|((_, app_id), shares)| {
            shares.iter().flat_map(move |(&source, &(_, parts))| {
                share_keys(&ChangelogKey::Usage { app_id: *app_id, month, source }.to_bytes(), parts)
            })
        })
        .collect();
    let result = task.outbox.transaction(|tx| {
        for charge in &charges {
            tx.send_json(&topics.charges, &charge.charge_id, charge)?;
        }
        for usage in &usages {
            let key = format!("{}/{}", usage.app_id, usage.month);
            tx.send_json(&topics.usage, &key, &UsageItem::new(usage, &config.meter.tz))?;
        }
        for letter in &refused {
            tx.dead_letter(&topics.dead_letters, letter)?;
        }
        for alert in &alerts {
            tx.send_json(&topics.alerts, &alert.alert_id, alert)?;
        }
        tx.send(
            &topics.billing_changelog,
            Some(partition),
            &ChangelogKey::Billed.to_bytes(),
            Some(month.to_string().as_bytes()),
            None,
        )?;
        // The month is done: its usage and markers can go (compaction removes them).
        for key in &usage_keys {
            tx.send(&topics.billing_changelog, Some(partition), key, None, None)?;
        }
        for (&(_, app_id), sources) in task.crossed.range((month, 0)..=(month, AppId::MAX)) {
            for &source in sources {
                let key = ChangelogKey::QuotaCrossed { app_id, month, source };
                tx.send(&topics.billing_changelog, Some(partition), &key.to_bytes(), None, None)?;
            }
        }
        for &(m, app_id) in task.alerted.iter().filter(|(m, _)| *m == month) {
            tx.send(
                &topics.billing_changelog,
                Some(partition),
                &ChangelogKey::Alerted { app_id, month: m }.to_bytes(),
                None,
                None,
            )?;
        }
        Ok(())
    });
    match result {
        Ok(()) => {
            info!(partition, %month, apps = apps.len(), charges = charges.len(), alerts = alerts.len(), "billing: month billed");
            let m = metrics();
            for charge in &charges {
                m.charges.with_label_values(&[charge.item.id()]).inc();
                let usd = rust_decimal::prelude::ToPrimitive::to_f64(&charge.amount).unwrap_or(0.0);
                m.billed_usd.with_label_values(&[charge.item.id()]).inc_by(usd);
            }
            m.quota_alerts.inc_by(alerts.len() as u64);
            m.dead_letters.with_label_values(&["subscriptions"]).inc_by(refused.len() as u64);
            m.months_billed.inc();
            task.billed_through = Some(month);
            task.usage.retain(|(m, _), _| *m != month);
            task.crossed.retain(|(m, _), _| *m != month);
            task.alerted.retain(|(m, _)| *m != month);
            task.declined.retain(|(m, _)| *m != month);
            Ok(true)
        }
        // Nothing was published and the task's state is unchanged: the next pass retries.
        Err(TransactionFailed::Aborted(e)) => {
            warn!(partition, %month, error = %format!("{e:#}"), "billing: transaction aborted, will retry");
            Ok(false)
        }
        Err(fatal @ TransactionFailed::Fatal(_)) => Err(fatal.into()),
    }
}

/// Sends the usage shares of months already billed to the dead letters (reason `late`,
/// the share's figures as JSON) and deletes them, in one transaction. A billed month's
/// charges never change.
fn refuse_late_usage(config: &Config, partition: i32, task: &mut Task) -> anyhow::Result<()> {
    if task.late.is_empty() {
        return Ok(());
    }
    let topics = &config.file.topics;
    let mut letters = Vec::new();
    let mut deletions = Vec::new();
    for (&(month, app_id, source), (share, parts)) in &mut task.late {
        let usage = share.usage(app_id, month, config.meter.grid);
        warn!(partition, app_id, %month, source, "billing: usage of a month already billed; refused as late");
        let why = Rejection::new(
            RejectReason::Late,
            format!("usage of events partition {source} for {month}, which was already billed"),
        );
        let raw = serde_json::to_vec(&UsageItem::new(&usage, &config.meter.tz))?;
        let key = ChangelogKey::Usage { app_id, month, source }.to_bytes();
        letters.push(DeadLetter::written(key.clone(), raw, why, &topics.billing_changelog, partition));
        deletions.extend(share_keys(&key, *parts));
    }
    let result = task.outbox.transaction(|tx| {
        for letter in &letters {
            tx.dead_letter(&topics.dead_letters, letter)?;
        }
        for key in &deletions {
            tx.send(&topics.billing_changelog, Some(partition), key, None, None)?;
        }
        Ok(())
    });
    match result {
        Ok(()) => {
            metrics().dead_letters.with_label_values(&["usage"]).inc_by(letters.len() as u64);
            task.late.clear();
            Ok(())
        }
        // Nothing published; tried again on the next pass.
        Err(TransactionFailed::Aborted(e)) => {
            warn!(partition, error = %format!("{e:#}"), "billing: late usage transaction aborted, will retry");
            Ok(())
        }
        Err(fatal @ TransactionFailed::Fatal(_)) => Err(fatal.into()),
    }
}

/// The record keys of a usage share: its key, and its parts' if it was written in parts.
fn share_keys(key: &[u8], parts: usize) -> Vec<Vec<u8>> {
    let mut keys = im_meter_core::aggregate::parts::part_keys(key, 0..parts);
    keys.push(key.to_vec());
    keys
}

/// Publishes the quota alert of every app-month whose MAU just passed the Developer cap in
/// some source partition, if the app is on the Developer plan — as it happens, not at the
/// month's end — together with the mark that it was published, in one transaction.
fn alert_as_it_happens(
    config: &Config,
    partition: i32,
    task: &mut Task,
    feed: &mut SubscriptionFeed,
) -> anyhow::Result<()> {
    let pending: Vec<(Month, AppId)> = task
        .crossed
        .keys()
        .filter(|k| !task.alerted.contains(k) && !task.declined.contains(k))
        .filter(|(m, _)| task.billed_through.is_none_or(|b| *m > b))
        .copied()
        .collect();
    if pending.is_empty() {
        return Ok(());
    }
    feed.catch_up()?;
    let mut alerts = Vec::new();
    for (month, app_id) in pending {
        // The crossing says the MAU is now past the cap: it is at least cap + 1.
        let usage = MonthlyUsage { mau: QUOTA_WATCH + 1, ..MonthlyUsage::empty(app_id, month) };
        match quota_alert(&feed.book, &usage) {
            Some(alert) => alerts.push(alert),
            None => {
                task.declined.insert((month, app_id));
            }
        }
    }
    if alerts.is_empty() {
        return Ok(());
    }
    let topics = &config.file.topics;
    let result = task.outbox.transaction(|tx| {
        for alert in &alerts {
            tx.send_json(&topics.alerts, &alert.alert_id, alert)?;
            let mark = ChangelogKey::Alerted { app_id: alert.app_id, month: alert.month };
            tx.send(&topics.billing_changelog, Some(partition), &mark.to_bytes(), Some(b"1"), None)?;
        }
        Ok(())
    });
    match result {
        Ok(()) => {
            metrics().quota_alerts.inc_by(alerts.len() as u64);
            for alert in alerts {
                info!(partition, app_id = alert.app_id, month = %alert.month, "billing: quota alert");
                task.alerted.insert((alert.month, alert.app_id));
            }
            Ok(())
        }
        // Nothing published; the crossings stay pending and are tried again.
        Err(TransactionFailed::Aborted(e)) => {
            warn!(partition, error = %format!("{e:#}"), "billing: alert transaction aborted, will retry");
            Ok(())
        }
        Err(fatal @ TransactionFailed::Fatal(_)) => Err(fatal.into()),
    }
}
