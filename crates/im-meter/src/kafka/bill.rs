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

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use im_meter_core::bill::publish::record_keys;
use im_meter_core::bill::subscription_log::{incarnation, topic_offset};
use im_meter_core::bill::{
    BilledPositions, BillingBook, Pricing, SubscriptionLog, SubscriptionRecord, TopicRead,
};
use im_meter_core::changelog::parts::Assembler;
use im_meter_core::changelog::{billing_partition, ChangelogKey, SubscriptionsRead};
use im_meter_core::ingest::{RejectReason, Rejection};
use im_meter_core::time::Month;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};
use tracing::{error, info, warn};

use super::changelog::{self, HighWatermarks, QuietEof};
use super::fetch::Fetched;
use super::output::{DeadLetter, Outbox, TransactionFailed};
use super::plan_book;
use super::with_retries;
use crate::config::Config;
use crate::failpoints::Failpoint;
use crate::metrics::metrics;
use crate::report::UsageItem;
use crate::status::{Board, ConsumerStatus, StageKind};

const POLL: Duration = Duration::from_millis(100);

/// What one billing changelog partition's records say, as far as they were read: its billing
/// book, the plan book copy marks, and the parts of values whose header has not come yet.
#[derive(Default)]
struct Absorbed {
    assembler: Assembler,
    book: BillingBook,
    /// Subscriptions partitions this partition's task copies into the plan book → the offset
    /// to copy from next.
    copied: BTreeMap<i32, i64>,
    /// The group id of the deployment whose state this is (`None`: not written yet).
    owner: Option<Vec<u8>>,
}

impl Absorbed {
    /// Nothing absorbed yet; the book bills no month before `start` (`billing.start_month`).
    fn starting(start: Option<Month>) -> Self {
        Absorbed { book: BillingBook::starting(start), ..Absorbed::default() }
    }

    /// Absorbs one record of the partition, as read (a part is kept until its value is whole).
    fn record(&mut self, key: Option<&[u8]>, value: Option<&[u8]>) -> anyhow::Result<()> {
        let mut assembler = std::mem::take(&mut self.assembler);
        let absorbed = changelog::assemble(&mut assembler, key, value, &mut |k, v, n| self.absorb(k, v, n));
        self.assembler = assembler;
        absorbed
    }

    fn absorb(&mut self, key: ChangelogKey, value: Option<&[u8]>, parts: usize) -> anyhow::Result<()> {
        if key == ChangelogKey::Owner {
            self.owner = value.map(<[u8]>::to_vec);
        }
        if let (ChangelogKey::PlanCopied { partition }, Some(bytes)) = (&key, value) {
            let next = std::str::from_utf8(bytes).ok().and_then(|t| t.parse().ok());
            let next: i64 = next.context("unreadable plan book copy mark")?;
            let mark = self.copied.entry(*partition as i32).or_default();
            // Only forward: the task reads its own earlier marks back.
            *mark = (*mark).max(next);
        }
        self.book.absorb(key, value, parts).context("in the billing changelog")
    }
}

/// A billing changelog partition this stage owns and has read back: it bills, alerts and
/// copies the plan book, each in a transaction of its own producer.
struct Task {
    outbox: Outbox,
    state: Absorbed,
    /// A transaction's outcome is unknown: the partition is read back before it writes again.
    reload: bool,
    /// Its producer was fenced by a newer one with its transactional id: another worker has
    /// taken the partition (this one was frozen past its session, say) and the rebalance
    /// that tells this one is on its way. The task is dropped until then
    /// ([`DEPOSED_WAIT_SESSIONS`]).
    deposed: bool,
}

/// How long a partition whose producer was fenced by a newer one waits for the rebalance
/// that takes it away, in sessions (`session.timeout.ms`): one for the group to notice this
/// member was gone, one more for the revocation to reach it. Still assigned after that, it
/// is read back with a new producer (fencing the other, as a restarted worker would).
const DEPOSED_WAIT_SESSIONS: u32 = 2;

/// What a deposed partition's status says while it waits.
const DEPOSED: &str =
    "its producer was fenced by a newer one with the same transactional id (another worker \
     took the partition): waiting for the rebalance that moves it, or to read it back if it stays here";

/// A billing changelog partition being read back. Billing commits no offsets, so the group
/// consumer hands out its records from the beginning; they are absorbed as they come. The
/// task is ready once the consumer's position reaches the partition's high watermark read
/// right after the task's producer fenced the previous owner's: then it has read everything
/// any earlier owner wrote — its billed-through marks above all — even past a transaction of
/// another producer that was open meanwhile (reading to the last stable offset would stop
/// below it, find the month unbilled, and bill it again).
struct Restoring {
    state: Absorbed,
    /// The task's producer once it has fenced the previous owner's, and where the partition
    /// ended just after (`None`: it held nothing).
    fenced: Option<(Outbox, Option<i64>)>,
    /// The records of the old layout (billing's marks in the metering changelog) were read.
    old_layout_read: bool,
    /// A transaction's outcome was unknown: this is its partition read back.
    after_unknown_outcome: bool,
    started: Instant,
    /// When the stage last said that it waits for open transactions.
    said_waiting: Option<Instant>,
}

impl Restoring {
    fn new(config: &Config, after_unknown_outcome: bool) -> Self {
        Restoring {
            state: Absorbed::starting(config.billing.start_month),
            fenced: None,
            old_layout_read: false,
            after_unknown_outcome,
            started: Instant::now(),
            said_waiting: None,
        }
    }

    /// Whether everything up to the high watermark seen after fencing is absorbed.
    fn caught_up(&self, position: Option<i64>) -> bool {
        match &self.fenced {
            Some((_, None)) => true,
            Some((_, Some(end))) => position.is_some_and(|at| at >= *end),
            None => false,
        }
    }
}

/// The subscription book, fed from the plan book's copy and then the whole subscriptions
/// topic (small: every billing task needs the plans of its apps, and reads them all).
///
/// Whether an event is late depends on which months its app's billing partition had billed
/// when the event was read: the feed's [`SubscriptionLog`] keeps every record and, for each
/// task of this process, the subscription positions its months were billed at
/// ([`BilledPositions`]); when a task is restored the book is derived again from the
/// records, so it says what it said live. (The usage API's ledger keeps the same log.)
struct SubscriptionFeed {
    consumer: BaseConsumer<QuietEof>,
    /// Where the subscriptions partitions end, every record counted.
    ends: HighWatermarks,
    topic: String,
    /// Subscriptions partitions.
    partitions: u32,
    /// Every record read, with its key, and the book billing's rule derives from them; where
    /// each partition's reading stands.
    log: SubscriptionLog,
    /// Since when (and when it last said so) billing waits for a transaction open in the
    /// subscriptions topic.
    waiting: Option<(Instant, Instant)>,
}

impl SubscriptionFeed {
    /// A feed that has applied the plan book's copy and reads the topic on from its end.
    fn new(client: &ClientConfig, config: &Config, billing_partitions: u32) -> anyhow::Result<Self> {
        let topics = &config.file.topics;
        let consumer: BaseConsumer<QuietEof> = changelog::reader(client)
            .create_with_context(QuietEof)
            .context("cannot create the subscriptions reader")?;
        let partitions = changelog::partition_count(client, &topics.subscriptions)?;
        let mut log = SubscriptionLog::new(config.meter.tz, billing_partitions);
        for record in plan_book::read(client, config)? {
            if let Some(Some(why)) = log.push(record) {
                warn!(reason = why.reason.code(), detail = %why.detail, "subscription record unreadable");
            }
        }
        let mut assignment = TopicPartitionList::new();
        for p in 0..partitions {
            let start = log.resume_at(p).map_or(Offset::Beginning, Offset::Offset);
            assignment.add_partition_offset(&topics.subscriptions, p as i32, start)?;
        }
        consumer.assign(&assignment)?;
        info!(
            copied = log.records().len(),
            apps = log.book().apps().count(),
            "billing: plan book restored from its copy"
        );
        Ok(SubscriptionFeed {
            consumer,
            ends: HighWatermarks::new(client)?,
            topic: topics.subscriptions.clone(),
            partitions,
            log,
            waiting: None,
        })
    }

    /// Keeps one record read from the topic and records its event in the book, as read now;
    /// a record that says the topic was created again makes its partition be read again from
    /// the beginning ([`SubscriptionLog::read_from_topic`]).
    fn absorb(&mut self, record: SubscriptionRecord) {
        let partition = record.partition;
        match self.log.read_from_topic(record) {
            TopicRead::Kept(None) | TopicRead::Resumed => {}
            // Bytes its partition holds already (the history produced again into a recreated
            // topic, a producer's retry): the same subscription event, kept once.
            TopicRead::Duplicate => metrics().subscription_duplicates.inc(),
            TopicRead::Kept(Some(why)) => {
                warn!(reason = why.reason.code(), detail = %why.detail, "subscription record unreadable")
            }
            TopicRead::ReadAgain => {
                warn!(topic = %self.topic, partition, "the subscriptions topic was created again: reading the partition from its beginning as a new incarnation (docs/operations.md, \"Recreating the subscriptions topic\")");
                let seek = self.consumer.seek(
                    &self.topic,
                    partition as i32,
                    Offset::Beginning,
                    Duration::from_secs(10),
                );
                if let Err(e) = seek {
                    error!(error = %e, partition, "cannot read the subscriptions partition again; restarting the stage");
                }
            }
        }
    }

    /// Notes that billing partition `partition` of this process billed its months at
    /// `billed`; the book is derived again from every record if that changes what it says,
    /// as this process would have read them live.
    fn billed_at(&mut self, partition: i32, billed: &BilledPositions) {
        self.log.billed_at(partition as u32, billed);
    }

    /// How far every partition has been read: what a bill made now has seen.
    fn read_positions(&self) -> SubscriptionsRead {
        self.log.read_positions(self.partitions)
    }

    /// The dead letters billing partition `partition` publishes with its bill of `month`,
    /// whose previous bill was of `billed_before` ([`SubscriptionLog::refused`]).
    fn dead_letters(&self, partition: i32, month: Month, billed_before: Option<Month>) -> Vec<DeadLetter> {
        let refused = self.log.refused(partition as u32, month, billed_before);
        let letter = |(record, why): (&SubscriptionRecord, Rejection)| {
            let source = Fetched {
                topic: &self.topic,
                partition: record.partition as i32,
                offset: topic_offset(record.offset),
                key: record.key.as_deref(),
                payload: &record.payload,
            };
            DeadLetter::of(&source, why)
        };
        refused.into_iter().map(letter).collect()
    }

    /// Applies the subscription events fetched so far, without waiting for more.
    fn follow(&mut self) {
        while let Some(message) = self.next(Duration::ZERO) {
            self.handle(message);
        }
    }

    /// Applies every subscription event produced before this call: reads each partition up
    /// to its high watermark as the broker gives it now — past every record written so far,
    /// so a plan change inside a transaction still open is waited for, not billed without.
    /// `false` if that did not happen within [`CATCH_UP_WAIT`] (a transaction open, or much
    /// to read): the caller tries again at its next round, billing nothing meanwhile.
    fn catch_up(&mut self) -> anyhow::Result<bool> {
        let mut ends = Vec::with_capacity(self.partitions as usize);
        for p in 0..self.partitions as i32 {
            let (low, high) = self.ends.of(&self.topic, p, Duration::from_secs(30))?;
            ends.push((high > low).then_some(high));
        }
        let deadline = Instant::now() + CATCH_UP_WAIT;
        loop {
            let positions =
                self.consumer.position().context("cannot read the subscriptions reader's positions")?;
            let short: Vec<(usize, i64)> = ends
                .iter()
                .enumerate()
                .filter_map(|(p, end)| Some((p, (*end)?)))
                .filter(|&(p, end)| {
                    // Past a transaction's marker the position moves on without a record.
                    let read = self.log.next_topic_offset(p as u32);
                    let at = read.max(changelog::position_of(&positions, &self.topic, p as i32));
                    at.is_none_or(|at| at < end)
                })
                .collect();
            if short.is_empty() {
                if let Some((since, _)) = self.waiting.take() {
                    info!(
                        waited_ms = since.elapsed().as_millis() as u64,
                        "billing: the subscriptions are read to their end"
                    );
                }
                return Ok(true);
            }
            if Instant::now() >= deadline {
                let now = Instant::now();
                let (since, said) = self.waiting.get_or_insert((now, now - SAY_WAITING_EVERY));
                if said.elapsed() >= SAY_WAITING_EVERY {
                    *said = now;
                    warn!(
                        topic = %self.topic,
                        partitions_and_ends = ?short,
                        read = ?self.log.read_positions(self.partitions),
                        waiting_s = since.elapsed().as_secs(),
                        "billing: the subscriptions are not read to their high watermark yet; billing is {WAITS_FOR_OPEN_TRANSACTIONS} to end (or for the rest to be read)"
                    );
                }
                return Ok(false);
            }
            if let Some(message) = self.next(Duration::from_millis(50)) {
                self.handle(message);
            }
        }
    }

    /// The next message of the subscriptions reader, owned (so that the feed can change
    /// while it is handled), waiting up to `wait`.
    fn next(&mut self, wait: Duration) -> Option<KafkaResult<SubscriptionRecord>> {
        self.consumer.poll(wait).map(|r| {
            r.map(|m| SubscriptionRecord {
                partition: m.partition() as u32,
                offset: m.offset(),
                timestamp: m.timestamp().to_millis(),
                key: m.key().map(<[u8]>::to_vec),
                payload: m.payload().unwrap_or_default().to_vec(),
            })
        })
    }

    /// Applies a record. (A partition's end is found by position, in `catch_up`.)
    fn handle(&mut self, message: KafkaResult<SubscriptionRecord>) {
        match message {
            Ok(record) => self.absorb(record),
            Err(KafkaError::PartitionEOF(_)) => {}
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
    shape: Shape,
    task: &mut Task,
    feed: &SubscriptionFeed,
) -> anyhow::Result<bool> {
    let topics = &config.file.topics;
    for j in 0..feed.partitions {
        let copied = task.state.copied.get(&(j as i32)).copied();
        let read = feed.log.position(j);
        if j % shape.partitions != shape.partition as u32 || read <= copied {
            continue;
        }
        let Some(read) = read else { continue };
        // In log offsets: a record of a topic created again comes after every earlier one.
        let records: Vec<&SubscriptionRecord> = feed
            .log
            .records()
            .iter()
            .filter(|r| r.partition == j && copied.is_none_or(|c| r.offset >= c))
            .collect();
        if let (Some(first), Some(copied)) = (records.first(), copied) {
            if first.offset > copied && incarnation(first.offset) == incarnation(copied) {
                error!(
                    partition = j,
                    from = copied,
                    to = first.offset,
                    "subscription records expired before the plan book copied them: those changes are lost"
                );
            }
        }
        let mark = ChangelogKey::PlanCopied { partition: j };
        let result = task.outbox.transaction(|tx| {
            plan_book::copy(tx, config, j, &records)?;
            tx.send(
                &topics.billing_changelog,
                Some(shape.partition),
                &mark.to_bytes(),
                Some(read.to_string().as_bytes()),
                None,
            )
        });
        match result {
            Ok(()) => {
                info!(
                    partition = j,
                    records = records.len(),
                    next = read,
                    "billing: subscriptions copied into the plan book"
                );
                task.state.copied.insert(j as i32, read);
            }
            Err(failure) => failed(task, "plan book copy", failure)?,
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
    let mut subscriptions = SubscriptionFeed::new(&client, config, partitions)?;
    let ends = HighWatermarks::new(&client)?;
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
    let mut restoring: BTreeMap<i32, Restoring> = BTreeMap::new();
    // Partitions being read back whose producer has not fenced the previous owner's yet: one
    // a poll, so that fencing several never keeps the consumer from polling for longer than
    // one producer's start (past `kafka.max_poll_interval` the member would leave the group).
    let mut to_fence: VecDeque<i32> = VecDeque::new();
    // Partitions whose producer a newer one fenced, since when.
    let mut deposed: BTreeMap<i32, Instant> = BTreeMap::new();
    let deposed_wait = super::session_timeout(config) * DEPOSED_WAIT_SESSIONS;
    let mut last_report = Instant::now();
    let mut last_round = Instant::now();
    let mut backoff = Backoff { failures: 0, until: None, status: Arc::clone(&status) };
    // Exported at 0 from the start, so that a rate over it has a series to start from.
    metrics().broker_errors.with_label_values(&["bill"]);
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
                restoring.remove(&p);
                deposed.remove(&p);
                to_fence.retain(|&q| q != p);
                status.state().partitions.remove(&p);
                info!(partition = p, "billing: partition revoked");
            }
            for p in added {
                status.state().partitions.entry(p).or_default().restored = false;
                restoring.insert(p, Restoring::new(config, false));
                to_fence.push_back(p);
            }
        }
        if let Some(p) = to_fence.pop_front().filter(|_| !backoff.waiting()) {
            if let Some(r) = restoring.get_mut(&p) {
                match backoff.retry_later(fence(config, &client, &ends, p, &status))? {
                    Some(fenced) => r.fenced = Some(fenced),
                    None => to_fence.push_front(p),
                }
            }
        }
        let busy = matches!(message, Some(Ok(_)));
        match message {
            Some(Ok(m)) => {
                let p = m.partition();
                if let Some(task) = tasks.get_mut(&p) {
                    task.state.record(m.key(), m.payload())?;
                } else if let Some(r) = restoring.get_mut(&p) {
                    r.state.record(m.key(), m.payload())?;
                }
            }
            Some(Err(e)) => warn!(error = %e, "billing: consumer error"),
            None => {}
        }
        if !restoring.is_empty() {
            let positions = consumer.position().context("cannot read the changelog consumer's positions")?;
            let at = |p: i32| changelog::position_of(&positions, &topics.billing_changelog, p);
            let ready: Vec<i32> =
                restoring.iter().filter(|(p, r)| r.caught_up(at(**p))).map(|(p, _)| *p).collect();
            for p in ready {
                if backoff.waiting() {
                    break;
                }
                let Some(r) = restoring.remove(&p) else { continue };
                match backoff.retry_later(finish_restore(config, &client, &consumer, p, r))? {
                    // The read failed halfway: the partition is read back again, fenced again.
                    None => {
                        read_again_from_the_beginning(&consumer, &topics.billing_changelog, p)?;
                        restoring.insert(p, Restoring::new(config, false));
                        to_fence.push_back(p);
                    }
                    Some(Restored::Ready(task)) => {
                        // Fenced and read to its end: the brokers answer. Said here, as a
                        // read back after a lost commit answer may leave nothing to publish,
                        // and no later transaction would say it.
                        status.broker_answered();
                        subscriptions.billed_at(p, task.state.book.billed_positions());
                        let mut state = status.state();
                        let entry = state.partitions.entry(p).or_default();
                        (entry.restored, entry.next_offset) = (true, at(p));
                        drop(state);
                        tasks.insert(p, task);
                    }
                    Some(Restored::ReadAgain(r)) => {
                        restoring.insert(p, r);
                    }
                }
            }
            metrics().assigned_partitions.with_label_values(&["bill", "0"]).set(tasks.len() as i64);
        }
        if last_report.elapsed() >= REPORT_EVERY {
            last_report = Instant::now();
            report_positions(&consumer, &topics.billing_changelog, &status);
        }
        // The oldest month waiting to be billed (closed by every source or not).
        status.state().oldest_open_month_end = tasks
            .values()
            .filter_map(|t| t.state.book.next_to_bill())
            .min()
            .map(|m| config.meter.tz.end_of_month(m));
        // Records keep coming: read them first, but look at the rest at least once a second.
        if busy && last_round.elapsed() < ROUND_EVERY {
            continue;
        }
        last_round = Instant::now();
        for (&p, r) in restoring.iter_mut() {
            say_if_waiting(config, &consumer, p, r)?;
        }
        if !backoff.waiting() {
            let round =
                serve_tasks(config, &client, &mut tasks, &mut subscriptions, &mut sources, partitions);
            backoff.retry_later(round)?;
        }
        let fenced: Vec<i32> = tasks.iter().filter(|(_, t)| t.deposed).map(|(p, _)| *p).collect();
        for p in fenced {
            // Nothing more is written for it. A crash here loses nothing: whether its last
            // transaction committed (the fence completes or aborts it), whoever bills the
            // partition next reads it back to its high watermark first.
            tasks.remove(&p);
            deposed.insert(p, Instant::now());
            let mut state = status.state();
            let entry = state.partitions.entry(p).or_default();
            (entry.restored, entry.stopped) = (false, Some(DEPOSED.into()));
            warn!(partition = p, wait = ?deposed_wait, "billing: partition dropped, its producer fenced by a newer one");
        }
        // Read back from the beginning: a new producer with the task's transactional id
        // fences the old one (the broker then completes or aborts its transaction), and the
        // partition, read to its high watermark, says what was published.
        let mut read_back = |p: i32| -> anyhow::Result<()> {
            read_again_from_the_beginning(&consumer, &topics.billing_changelog, p)?;
            restoring.insert(p, Restoring::new(config, true));
            to_fence.push_front(p);
            let mut state = status.state();
            let entry = state.partitions.entry(p).or_default();
            (entry.restored, entry.stopped) = (false, None);
            Ok(())
        };
        let still_here: Vec<i32> =
            deposed.iter().filter(|(_, since)| since.elapsed() >= deposed_wait).map(|(p, _)| *p).collect();
        for p in still_here {
            // No rebalance took it: this worker still owns it, and fences the other as a
            // restart of this worker would.
            deposed.remove(&p);
            read_back(p)?;
            info!(partition = p, "billing: a fenced partition is still assigned here; reading it back");
        }
        let reload: Vec<i32> = tasks.iter().filter(|(_, t)| t.reload).map(|(p, _)| *p).collect();
        for p in reload {
            tasks.remove(&p);
            read_back(p)?;
            info!(partition = p, "billing: reading the partition back after an unknown outcome");
        }
    }
    info!("billing: stopped");
    Ok(())
}

/// One round of billing's work on its tasks, each step in a transaction of its own: the
/// owner record, the plan book copy (one source partition a round), quota alerts, late
/// usage refused, and every month ready to bill. A transient broker error ends the round
/// early (the caller tries again later); the steps done stay done.
fn serve_tasks(
    config: &Config,
    client: &ClientConfig,
    tasks: &mut BTreeMap<i32, Task>,
    subscriptions: &mut SubscriptionFeed,
    sources: &mut u32,
    partitions: u32,
) -> anyhow::Result<()> {
    let topics = &config.file.topics;
    subscriptions.follow();
    let mut copied = false;
    for (&p, task) in tasks.iter_mut() {
        if !task.reload && task.state.owner.is_none() {
            write_owner(config, p, task)?;
        }
        if !copied {
            let shape = Shape { partition: p, partitions };
            copied = copy_subscriptions(config, shape, task, subscriptions)?;
        }
        // After a transaction whose outcome is unknown, nothing more until the task is
        // read back (the stage loop does that after this round).
        if !task.reload {
            alert_as_it_happens(config, p, task, subscriptions)?;
        }
        if !task.reload {
            refuse_shares(config, p, task)?;
        }
        while let Some(month) = task.state.book.next_billable(*sources).filter(|_| !task.reload) {
            if Failpoint::HoldBills.active() {
                static SAID: std::sync::Once = std::sync::Once::new();
                SAID.call_once(|| warn!(partition = p, %month, "failpoint: billing holds its months"));
                break;
            }
            // The events topic may have grown since it was last looked at: a month
            // waits for every partition there is when it is billed.
            let now = changelog::partition_count(client, &topics.events)?;
            if now != *sources {
                info!(from = *sources, to = now, "billing: the events topic has a new partition count");
                *sources = now;
                continue;
            }
            let shape = Shape { partition: p, partitions };
            if !subscriptions.catch_up()? || !bill(config, shape, month, task, subscriptions)? {
                break;
            }
        }
    }
    Ok(())
}

/// When billing tries broker calls again after a transient error: 1, 2, 4, … s later, at
/// most 30 (the consumer keeps polling meanwhile), back to at once after a call succeeds.
/// Failures are told to the stage's status (readiness says why billing waits).
struct Backoff {
    failures: u32,
    until: Option<Instant>,
    status: Arc<ConsumerStatus>,
}

impl Backoff {
    /// Whether broker calls are put off now.
    fn waiting(&self) -> bool {
        self.until.is_some_and(|t| Instant::now() < t)
    }

    /// `Some(value)`; for a transient error, `None` after counting it and putting broker
    /// calls off; any other error is returned (it stops the stage).
    fn retry_later<T>(&mut self, result: anyhow::Result<T>) -> anyhow::Result<Option<T>> {
        match result {
            Ok(value) => {
                if self.failures > 0 {
                    self.status.broker_answered();
                }
                (self.failures, self.until) = (0, None);
                Ok(Some(value))
            }
            Err(e) if super::is_transient(&e) => {
                self.failures += 1;
                self.status.broker_failed(format!("{e:#}"));
                let pause = super::poison::pause(self.failures);
                self.until = Some(Instant::now() + pause);
                metrics().broker_errors.with_label_values(&["bill"]).inc();
                warn!(
                    error = format!("{e:#}"),
                    retry_in_s = pause.as_secs(),
                    "billing: a broker call failed; trying again later"
                );
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

/// How long billing waits, at most, for the subscriptions to be read to their end before it
/// bills or alerts, in one round: it tries again at the next (the consumer must keep polling).
const CATCH_UP_WAIT: Duration = Duration::from_secs(2);

/// How often billing says that it waits for open transactions, while it does.
const SAY_WAITING_EVERY: Duration = Duration::from_secs(30);

/// How long a partition's read back may wait for other producers' open transactions before
/// the stage gives up with an error: Kafka's default `transaction.max.timeout.ms` (15 min)
/// bounds how long any transaction stays open, unless the cluster allows more.
const OPEN_TRANSACTION_WAIT: Duration = Duration::from_secs(16 * 60);

/// What billing logs while it waits: the tests look for it.
const WAITS_FOR_OPEN_TRANSACTIONS: &str = "waiting for open transactions";

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

/// The producer of billing partition `partition`'s task, which fences the previous owner's
/// (the broker completes or aborts its open transaction), and where the partition ends right
/// after: every record any earlier owner wrote lies below (`None`: the partition is empty).
fn fence(
    config: &Config,
    client: &ClientConfig,
    ends: &HighWatermarks,
    partition: i32,
    status: &Arc<ConsumerStatus>,
) -> anyhow::Result<(Outbox, Option<i64>)> {
    let id = format!("{}-billing-{partition}", config.file.kafka.group_id);
    let outbox = Outbox::transactional(client, &id, config.kafka.transaction_timeout, Arc::clone(status))?;
    let (low, high) = ends.of(&config.file.topics.billing_changelog, partition, Duration::from_secs(30))?;
    Ok((outbox, (high > low).then_some(high)))
}

/// What reading a partition back came to.
enum Restored {
    Ready(Task),
    /// The old layout's records were found: the partition is read again on top of them.
    ReadAgain(Restoring),
}

/// Finishes reading billing partition `partition` back, now that its records up to the high
/// watermark are absorbed.
///
/// Nothing billed here yet may be the first start after an upgrade from a version that kept
/// billing's records in the metering changelog (same partition numbers): those records
/// first, then this partition's on top, so that billing goes on where it was instead of
/// billing every month again. When the metering changelog holds none (the usual case), what
/// was read stands.
fn finish_restore(
    config: &Config,
    client: &ClientConfig,
    consumer: &BaseConsumer<StageContext>,
    partition: i32,
    mut r: Restoring,
) -> anyhow::Result<Restored> {
    let topics = &config.file.topics;
    if r.state.book.billed_through().is_none()
        && !r.old_layout_read
        && (partition as u32) < changelog::partition_count(client, &topics.changelog)?
    {
        r.old_layout_read = true;
        let mut old = Absorbed::starting(config.billing.start_month);
        let mut billing_records = 0;
        let mut assembler = Assembler::default();
        changelog::read_partition(
            client,
            &topics.changelog,
            partition,
            changelog::Until::HighWatermark,
            &mut assembler,
            |key, value, parts| {
                // (The metering state and its owner are the meters'.)
                billing_records += usize::from(!matches!(key, ChangelogKey::State(_) | ChangelogKey::Owner));
                old.absorb(key, value, parts)
            },
        )?;
        if billing_records > 0 {
            info!(
                partition,
                billing_records,
                "billing: the old layout's records found; reading the partition again on top of them"
            );
            r.state = old;
            read_again_from_the_beginning(consumer, &topics.billing_changelog, partition)?;
            return Ok(Restored::ReadAgain(r));
        }
    }
    let Some((outbox, _)) = r.fenced else { anyhow::bail!("partition {partition} restored unfenced") };
    super::check_owner(config, &topics.billing_changelog, partition, r.state.owner.as_deref())?;
    r.state.book.finish_restore();
    metrics().restore_duration.with_label_values(&["bill"]).observe(r.started.elapsed().as_secs_f64());
    let billed_through = r.state.book.billed_through();
    let ms = r.started.elapsed().as_millis() as u64;
    if r.after_unknown_outcome {
        info!(partition, ?billed_through, ms, "billing: partition read back after an unknown outcome");
    } else {
        info!(partition, ?billed_through, ms, "billing: partition restored");
    }
    Ok(Restored::Ready(Task { outbox, state: r.state, reload: false, deposed: false }))
}

/// Moves the group consumer back to the beginning of billing partition `partition`: its
/// position reads as unknown at once, and records fetched before are dropped.
fn read_again_from_the_beginning(
    consumer: &BaseConsumer<StageContext>,
    topic: &str,
    partition: i32,
) -> anyhow::Result<()> {
    with_retries("seeking back", || {
        consumer.seek(topic, partition, Offset::Beginning, Duration::from_secs(10))
    })
}

/// Says (every [`SAY_WAITING_EVERY`]) that partition `partition` is read to its last stable
/// offset and short of the high watermark its task waits for: a transaction is open in it.
/// Past [`OPEN_TRANSACTION_WAIT`], an error: the task cannot know what it published.
fn say_if_waiting(
    config: &Config,
    consumer: &BaseConsumer<StageContext>,
    partition: i32,
    r: &mut Restoring,
) -> anyhow::Result<()> {
    let Some((_, Some(end))) = &r.fenced else { return Ok(()) };
    if r.started.elapsed() < Duration::from_secs(2)
        || r.said_waiting.is_some_and(|t| t.elapsed() < SAY_WAITING_EVERY)
    {
        return Ok(());
    }
    let topic = &config.file.topics.billing_changelog;
    // A read_committed client's watermark is the last stable offset.
    let Ok((_, stable)) = consumer.fetch_watermarks(topic, partition, Duration::from_secs(5)) else {
        return Ok(());
    };
    let positions = consumer.position().unwrap_or_default();
    let at = changelog::position_of(&positions, topic, partition);
    if stable >= *end || at.is_none_or(|at| at < stable) {
        return Ok(()); // still reading, not waiting
    }
    r.said_waiting = Some(Instant::now());
    anyhow::ensure!(
        r.started.elapsed() < OPEN_TRANSACTION_WAIT,
        "billing changelog {topic} [{partition}]: read_committed reads stop at {stable}, below the high watermark {end} \
         seen when this task fenced the previous owner, for over {OPEN_TRANSACTION_WAIT:?}: a transaction of another producer \
         is open there (docs/operations.md, \"An open transaction holds billing back\")"
    );
    warn!(
        partition,
        stable_offset = stable,
        high_watermark = end,
        waiting_s = r.started.elapsed().as_secs(),
        "billing: partition read to its last stable offset, short of its high watermark: {WAITS_FOR_OPEN_TRANSACTIONS} to end before it bills"
    );
    Ok(())
}

/// Where a billing task sits: its changelog partition and how many there are.
#[derive(Debug, Clone, Copy)]
struct Shape {
    partition: i32,
    partitions: u32,
}

/// Bills one month of one changelog partition, in parts of at most
/// `billing.apps_per_transaction` apps, each in a transaction of its own (one for most
/// months; what each writes: [`BillPart`]); `false` if a transaction was aborted (what it
/// held unpublished, state unchanged, to be retried: parts committed before it stay, and
/// the month resumes after them).
fn bill(
    config: &Config,
    shape: Shape,
    month: Month,
    task: &mut Task,
    feed: &mut SubscriptionFeed,
) -> anyhow::Result<bool> {
    let subscriptions = feed.log.book();
    let Shape { partition, partitions } = shape;
    let pricing = Pricing { subscriptions, prices: &config.billing.prices, grid: config.meter.grid };
    let ours = subscriptions.apps().filter(|a| billing_partition(*a, partitions) as i32 == partition);
    let (max_apps, max_value) = (config.billing.apps_per_transaction, config.kafka.max_value_bytes);
    let parts = task.state.book.bill_in_parts(month, pricing, ours, max_apps, max_value)?;
    let topics = &config.file.topics;
    // Published with the first part (a resumed bill published them already).
    let refused = match parts.first() {
        Some(part) if part.first => feed.dead_letters(partition, month, task.state.book.billed_through()),
        _ => Vec::new(),
    };
    // Every subscription record below these positions was read before this bill; one at or
    // after them, dated in this month or before, is late (see `SubscriptionFeed`).
    let read = feed.read_positions();
    for part in parts {
        if part.last && Failpoint::FailAfterBill.fire() {
            warn!(partition, %month, "failpoint: this bill's commit will be reported failed");
            task.outbox.fail_next_commit();
        }
        let changelog = part.changelog_records(&read);
        // A crash anywhere before commit_transaction returns publishes nothing of this part:
        // the restarted (or new) owner fences this producer, restores the book from the
        // changelog as it was (with the parts committed before), and bills the rest again.
        let result = task.outbox.transaction(|tx| {
            for charge in &part.bill.charges {
                tx.send_json(&topics.charges, &charge.charge_id, charge)?;
            }
            for usage in &part.bill.usage {
                let key = format!("{}/{}", usage.app_id, usage.month);
                tx.send_json(&topics.usage, &key, &UsageItem::new(usage, &config.meter.tz))?;
            }
            for alert in &part.bill.alerts {
                tx.send_json(&topics.alerts, &alert.alert_id, alert)?;
            }
            if part.first {
                for letter in &refused {
                    tx.dead_letter(&topics.dead_letters, letter)?;
                }
            }
            for (key, value) in &changelog {
                tx.send(&topics.billing_changelog, Some(partition), key, value.as_deref(), None)?;
            }
            Ok(())
        });
        if let Err(failure) = result {
            failed(task, "bill", failure)?;
            return Ok(false);
        }
        let m = metrics();
        for charge in &part.bill.charges {
            m.charges.with_label_values(&[charge.item.id()]).inc();
            let usd = rust_decimal::prelude::ToPrimitive::to_f64(&charge.amount).unwrap_or(0.0);
            m.billed_usd.with_label_values(&[charge.item.id()]).inc_by(usd);
        }
        m.quota_alerts.inc_by(part.bill.alerts.len() as u64);
        if part.first {
            m.dead_letters.with_label_values(&["subscriptions"]).inc_by(refused.len() as u64);
            for letter in &refused {
                m.events_rejected.with_label_values(&[letter.reason()]).inc();
            }
            feed.log.billed(partition as u32, month, read.clone());
        }
        task.state.book.published(&part, &read);
        let (apps, charges, alerts) =
            (part.bill.usage.len(), part.bill.charges.len(), part.bill.alerts.len());
        if part.last {
            info!(partition, %month, apps, charges, alerts, "billing: month billed");
            m.months_billed.inc();
        } else {
            info!(partition, %month, apps, charges, alerts, through_app = part.through(), "billing: part of the month billed");
            if Failpoint::ExitAfterBillPart.fire() {
                warn!(partition, %month, "failpoint: exiting after a part of the month's bill");
                std::process::abort();
            }
        }
    }
    Ok(true)
}

/// Sends the usage shares of months already billed (reason `late`) or before the first
/// month billed (`before_start`) to the dead letters, the share's figures as JSON, and
/// deletes them, in one transaction. A billed month's charges never change.
fn refuse_shares(config: &Config, partition: i32, task: &mut Task) -> anyhow::Result<()> {
    if !task.state.book.has_refused_shares() {
        return Ok(());
    }
    let topics = &config.file.topics;
    let mut letters = Vec::new();
    let mut deletions = Vec::new();
    for refused in task.state.book.refused_shares(config.meter.grid) {
        let (app_id, month, reason) = (refused.usage.app_id, refused.usage.month, refused.reason);
        warn!(partition, app_id, %month, key = ?refused.key, %reason, "billing: usage share refused");
        let detail = match reason {
            RejectReason::BeforeStart => {
                format!("usage share of {month}, before the first month billed (`billing.start_month`)")
            }
            _ => format!("usage share of {month}, which was already billed"),
        };
        let raw = serde_json::to_vec(&UsageItem::new(&refused.usage, &config.meter.tz))?;
        let key = refused.key.to_bytes();
        deletions.extend(record_keys(&key, refused.parts));
        letters.push(DeadLetter::written(
            &key,
            &raw,
            Rejection::new(reason, detail),
            &topics.billing_changelog,
            partition,
        ));
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
            task.state.book.refused();
            Ok(())
        }
        Err(failure) => failed(task, "refused usage", failure),
    }
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
    if !task.state.book.has_crossings_to_check() {
        return Ok(());
    }
    if !feed.catch_up()? {
        return Ok(());
    }
    let alerts = task.state.book.alerts_due(feed.log.book());
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
            for alert in &alerts {
                info!(partition, app_id = alert.app_id, month = %alert.month, "billing: quota alert");
            }
            task.state.book.alerted(&alerts);
            Ok(())
        }
        Err(failure) => failed(task, "quota alert", failure),
    }
}

/// Writes which deployment the partition's state belongs to (key `g`, the group id), in a
/// transaction of its own; until it commits, the next round tries again. A crash before
/// that loses nothing: the next owner writes it.
fn write_owner(config: &Config, partition: i32, task: &mut Task) -> anyhow::Result<()> {
    let group = config.file.kafka.group_id.as_bytes();
    let topic = &config.file.topics.billing_changelog;
    let owner = ChangelogKey::Owner.to_bytes();
    match task.outbox.transaction(|tx| tx.send(topic, Some(partition), &owner, Some(group), None)) {
        Ok(()) => {
            task.state.owner = Some(group.to_vec());
            Ok(())
        }
        Err(failure) => failed(task, "owner", failure),
    }
}

/// What a billing transaction that did not commit means for its task. Aborted: nothing
/// was published and the book is unchanged, so the next pass does it again. Outcome
/// unknown: it may have been published — doing it again could publish every charge twice —
/// so the task is restored from its changelog partition first, where the transaction's
/// marks (billed through, alerted, copied) say whether it committed. Fenced by a newer
/// producer with its id: the partition is someone else's now, the task is dropped
/// ([`Task::deposed`]). Any other fatal failure: stop.
fn failed(task: &mut Task, what: &str, failure: TransactionFailed) -> anyhow::Result<()> {
    match failure {
        fenced if fenced.fenced_by_newer_producer() => {
            warn!(error = %format!("{fenced:#}"), "billing: {what} transaction fenced by a newer producer; dropping the partition");
            task.deposed = true;
            Ok(())
        }
        TransactionFailed::Aborted(e) => {
            warn!(error = %format!("{e:#}"), "billing: {what} transaction aborted, will retry");
            Ok(())
        }
        TransactionFailed::Unknown(e) => {
            warn!(error = %format!("{e:#}"), "billing: {what} transaction outcome unknown; reading the partition back");
            task.reload = true;
            Ok(())
        }
        fatal @ TransactionFailed::Fatal(_) => Err(fatal.into()),
    }
}
