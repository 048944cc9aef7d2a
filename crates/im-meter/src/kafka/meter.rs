//! The metering stage: SDK events → one [`Meter`] per assigned partition → changelogs.
//!
//! Guarantee: exactly once. Every `commit_interval` one Kafka transaction carries the
//! consumed offsets (`send_offsets_to_transaction`), the changed metering state (changelog
//! partition = events partition), the final usage of every month closed since the last
//! commit (to the billing changelog's partition of its app), month-closed markers (to every
//! billing changelog partition) and the dead letters. Either all of it becomes visible or
//! none of it does, so the committed state always matches the committed offsets. What a
//! transaction writes for each partition, and in which order, is the core's
//! ([`MeterCommit`]); this shell gathers the partitions' commits, adds the offsets and the
//! dead letters, and runs the transaction.
//! Preconditions: the changelogs are compacted, readers use `read_committed`, and a
//! restarted worker keeps its `instance_id` (its transactional id), which fences its
//! crashed predecessor at once.
//!
//! On assignment a partition's meter is rebuilt from its changelog partition before any of
//! its records is applied; on revocation the open work is committed inside the rebalance
//! callback, while the partition is still ours, and the meter dropped.
//!
//! Threading: one OS thread drives the consumer; the transactions run on a second one
//! ([`BackgroundOutbox`]), so that records are applied while the previous commit is on its
//! way (one in flight at a time). Every blocking Kafka call happens on these threads, never
//! on an async runtime. Records are read in batches from each partition's own fetch queue
//! ([`fetch`]); the consumer queue is polled between batches for rebalances and errors.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context;
use im_meter_core::aggregate::{Meter, Outcome, RestoreError, StateKey};
use im_meter_core::changelog::{ChangelogKey, Changelogs, MeterCommit, Source, WrittenState};
use im_meter_core::ingest::{decode_usage_event, RejectReason, Rejection};
use im_meter_core::time::Timestamp;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tracing::{info, warn};

use super::admin::grow_topic;
use super::fetch::{self, Batch, Fetched, PartitionQueue};
use super::output::{BackgroundOutbox, DeadLetter, Outbox, TransactionFailed};
use super::poison::{AfterFailure, Covered, Handled, Hunt, POISON_AFTER};
use super::{changelog, with_retries};
use crate::clock::ClockCheck;
use crate::config::Config;
use crate::failpoints::Failpoint;
use crate::metrics::{metrics, EventTally};
use crate::status::{Board, ConsumerStatus, StageKind};
use crate::view::{MeterView, StateBytes, ViewUpdate};

/// How long a poll waits when nothing was fetched: bounds how late a commit, a shutdown or
/// the first records after a quiet spell can be.
const IDLE_WAIT: Duration = Duration::from_millis(20);

/// Most records taken from a partition's queue at once.
const BATCH: usize = 4096;

/// A partition's changelog read back.
struct ReadBack {
    /// Its task, or why its state cannot be used.
    task: Result<Task, String>,
    /// Whether it held a progress record.
    has_progress: bool,
    /// Whether the read reached the partition's high watermark.
    complete: bool,
    /// Records read, and when the read began.
    records: u64,
    started: Instant,
    /// The app-months read, for the usage API once the task is in place.
    published: Vec<(StateKey, StateBytes)>,
}

/// What a restore of one partition came to.
enum Restored {
    /// Its task, as of the committed offset.
    Ready(Box<Task>),
    /// The changelog does not reflect the committed offset yet: read it again later.
    Behind,
    /// Its state cannot be trusted (why): the partition stops.
    Stopped(String),
}

/// One assigned events partition.
struct Task {
    meter: Meter,
    /// The offset after the last applied record: what the next commit stores.
    next_offset: Option<i64>,
    /// Whether records were applied since the last commit.
    dirty: bool,
    /// The changelog partition does not say which deployment owns it yet: the next commit
    /// writes it.
    owner_missing: bool,
    /// Whether the transaction in flight writes anything of this partition (state, usage,
    /// marks, a new offset): if it fails, this task's memory is ahead of the changelog.
    in_flight: bool,
    last_record: Instant,
    /// What the changelog partition holds of the meter's state (parts, sizes).
    written: WrittenState,
}

/// Everything the poll loop and the rebalance callbacks share.
struct Stage {
    config: Config,
    outbox: BackgroundOutbox,
    /// Partitions of the metering changelog: grown when the events topic grows.
    changelog_partitions: u32,
    /// Partitions of the billing changelog: fixed, so an app's billing partition never moves.
    billing_partitions: u32,
    tasks: BTreeMap<i32, Task>,
    /// Partitions assigned to this worker; their tasks are restored before use.
    assigned: BTreeSet<i32>,
    dead_letters: Vec<DeadLetter>,
    last_commit: Instant,
    /// An error raised inside a rebalance callback, for the loop to act on.
    failure: Option<anyhow::Error>,
    /// What this consumer reports to the operator endpoints.
    status: Arc<ConsumerStatus>,
    /// Events counted since the metrics were last updated.
    tally: EventTally,
    /// The clock, read once per batch: events dated beyond it plus the allowed skew are
    /// refused (a batch takes milliseconds; the skew is minutes). The worker's own, or the
    /// broker's when the two disagree ([`ClockCheck`]).
    now: Timestamp,
    /// Whether the worker's clock agrees with the broker's, and the time to go by.
    clock: Arc<ClockCheck>,
    /// This consumer's number within the worker.
    member: usize,
    /// Where the committed state is published for the usage API and the metrics.
    view: Arc<MeterView>,
    /// The app-month records of the transaction in flight: published once it committed.
    in_flight_view: Vec<ViewUpdate>,
    /// Assigned partitions whose changelog was read before it reflected their committed
    /// offset (the previous owner's commit markers not written yet): read again in a later
    /// round, until the deadline.
    behind: BTreeMap<i32, Instant>,
    /// Assigned partitions whose state in the changelog cannot be trusted, and why: never
    /// restored nor read (paused), so nothing is metered from a state that lost records;
    /// the other partitions go on. Readiness, a metric and an alert say so.
    stopped: BTreeMap<i32, String>,
    /// Asks where changelog partitions end (their high watermark).
    ends: changelog::HighWatermarks,
    /// The hunt for a record that makes every transaction fail, and what the transaction
    /// in flight covers for it.
    hunt: Hunt,
    in_flight: Option<Covered>,
    /// Records handled since the last transaction began (for the hunt).
    /// one written as `poison` instead of applied.
    handled: Handled,
    /// The failpoint's text ([`Failpoint::PoisonMarker`]), and whether a record holding it was applied
    /// since the last transaction began.
    poison_marker: Option<Vec<u8>>,
    holds_marker: bool,
}

struct StageContext {
    stage: Arc<Mutex<Stage>>,
}

impl ClientContext for StageContext {}

impl ConsumerContext for StageContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(assigned) = rebalance {
            metrics().rebalances.with_label_values(&["meter", "assign"]).inc();
            // Before librdkafka starts fetching them: their records go to their own queues.
            for e in assigned.elements() {
                fetch::split(consumer, e.topic(), e.partition());
            }
        }
        let Rebalance::Revoke(revoked) = rebalance else { return };
        let Ok(mut stage) = self.stage.lock() else { return };
        if consumer.assignment_lost() {
            // Lost, not handed over (we left the group, e.g. past max.poll.interval.ms):
            // another member may own them already, so nothing is written for them. What was
            // applied since the last commit is dropped; its new owner re-reads it.
            if let Err(TransactionFailed::Fatal(e)) = stage.outbox.settle() {
                stage.failure = Some(e.context("the transaction in flight failed"));
            }
            stage.tasks.clear();
            stage.dead_letters.clear();
            // Whether that transaction committed is not known here: the view keeps the last
            // state it knows was.
            stage.in_flight_view.clear();
            stage.in_flight = None;
            warn!("meter: assignment lost (this member left the group); dropping what was applied since the last commit");
            metrics().rebalances.with_label_values(&["meter", "lost"]).inc();
        } else if let Err(e) = stage.commit(consumer).and_then(|()| stage.settle(consumer)) {
            // Commit while the partitions are still ours: after the callback another worker
            // may restore them, and it must find everything we applied.
            stage.failure = Some(e.context("commit before revocation failed"));
        }
        let partitions: Vec<i32> = revoked.elements().iter().map(|e| e.partition()).collect();
        for p in &partitions {
            stage.tasks.remove(p);
            stage.behind.remove(p);
            stage.stopped.remove(p);
            stage.assigned.remove(p);
            stage.view.revoked(stage.member, *p);
        }
        metrics().rebalances.with_label_values(&["meter", "revoke"]).inc();
        stage.report_assignment();
        info!(partitions = ?partitions, "meter: partitions revoked");
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Assign(assigned) = rebalance else { return };
        let Ok(mut stage) = self.stage.lock() else { return };
        let partitions: Vec<i32> = assigned.elements().iter().map(|e| e.partition()).collect();
        stage.assigned.extend(&partitions);
        for &p in &partitions {
            stage.view.assigned(stage.member, p);
        }
        stage.report_assignment();
        info!(partitions = ?partitions, "meter: partitions assigned");
    }
}

fn lock(stage: &Mutex<Stage>) -> anyhow::Result<MutexGuard<'_, Stage>> {
    stage.lock().map_err(|_| anyhow::anyhow!("metering state poisoned by a panic"))
}

/// Runs one metering consumer, the worker's `member`-th, until `shutdown` is set (then it
/// commits and leaves the group). It reports to `board`.
pub fn run(config: &Config, member: usize, shutdown: &AtomicBool, board: &Board) -> anyhow::Result<()> {
    let client = super::client_config(config);
    let topics = &config.file.topics;
    let changelog_partitions = changelog::partition_count(&client, &topics.changelog)?;
    let billing_partitions = changelog::partition_count(&client, &topics.billing_changelog)?;
    // Stable across restarts of this worker with as many threads, so that it fences its
    // crashed predecessor at once.
    let mut transactional_id = format!("{}-meter-{}", config.file.kafka.group_id, config.kafka.instance_id);
    if member > 0 {
        transactional_id.push_str(&format!("-{member}"));
    }
    let status = board.consumer(StageKind::Meter, &member.to_string(), &topics.events);
    let timeout = config.kafka.transaction_timeout;
    let outbox = Outbox::transactional(&client, &transactional_id, timeout, Arc::clone(&status))?;
    let outbox = BackgroundOutbox::start(outbox, &format!("im-meter-commit-{member}"))?;
    let stage = Arc::new(Mutex::new(Stage {
        config: config.clone(),
        outbox,
        changelog_partitions,
        billing_partitions,
        tasks: BTreeMap::new(),
        assigned: BTreeSet::new(),
        dead_letters: Vec::new(),
        last_commit: Instant::now(),
        failure: None,
        status,
        tally: EventTally::default(),
        now: Timestamp(board.clock().now_ms()),
        clock: board.clock(),
        member,
        view: board.view(),
        in_flight_view: Vec::new(),
        behind: BTreeMap::new(),
        stopped: BTreeMap::new(),
        ends: changelog::HighWatermarks::new(&client)?,
        hunt: Hunt::default(),
        in_flight: None,
        handled: Handled::default(),
        poison_marker: Failpoint::PoisonMarker.value().map(|m| m.into_encoded_bytes()),
        holds_marker: false,
    }));
    let mut member_config = super::group_member(config, &config.file.kafka.group_id);
    if let Some(address) = &config.http.advertised_address {
        // How the other workers' usage API finds this one (`http::cluster`).
        member_config.set("client.id", crate::http::cluster::client_id(address));
    }
    let consumer: BaseConsumer<StageContext> = member_config
        // A partition whose queue holds `queued.min.messages` is not fetched for this long;
        // librdkafka's default (1 s) leaves a fast reader idle for most of that second.
        .set("fetch.queue.backoff.ms", "10")
        .create_with_context(StageContext { stage: Arc::clone(&stage) })
        .context("cannot create the events consumer")?;
    consumer.subscribe(&[&topics.events]).context("cannot subscribe to the events topic")?;
    info!(topic = %topics.events, %transactional_id, "meter: started");

    let commit_interval = config.kafka.commit_interval;
    // Idle checks ask the broker for partition ends: not on every commit.
    let idle_check_every = (config.kafka.idle_partition_timeout / 2).max(Duration::from_millis(500));
    let mut last_idle_check = Instant::now();
    // Declared after the consumer, so dropped before it (the borrow checker insists).
    let mut queues: BTreeMap<i32, PartitionQueue<'_>> = BTreeMap::new();
    let mut batch = Batch::with_capacity(BATCH);
    let mut wait = Duration::ZERO;
    let status = lock(&stage)?.status.clone();
    loop {
        // A failpoint for the stall test: the loop stops polling while the file exists.
        while Failpoint::Pause.active() {
            std::thread::sleep(Duration::from_millis(100));
        }
        // A round: serve rebalances and errors on the consumer queue, then take what each
        // partition has fetched, until the commit is due or nothing more has arrived. The
        // stage is locked per batch, never across a poll: the rebalance callbacks run
        // inside poll and lock it themselves.
        let round_ends = Instant::now() + commit_interval;
        loop {
            let message = consumer.poll(wait);
            status.polled();
            let mut stage = lock(&stage)?;
            if let Some(e) = stage.failure.take() {
                return Err(e);
            }
            stage.now = Timestamp(stage.clock.now_ms());
            // While careful (a poison hunt), the round is one transaction of at most this many.
            let limit = stage.hunt.batch_limit();
            let mut taken = 0;
            match message {
                // Only records fetched before their partition's queue was split come here.
                Some(Ok(m)) => {
                    taken += 1;
                    stage.handle(&consumer, &Fetched::of(&m))?;
                }
                // Transient client errors (a broker restarting): librdkafka reconnects.
                Some(Err(e)) => warn!(error = %e, "meter: consumer error"),
                None => {}
            }
            // Follow the assignment the callbacks just changed: a revoked partition's queue
            // is never read again (its leftovers are not ours), a new one is opened.
            queues.retain(|p, _| stage.assigned.contains(p));
            for &p in &stage.assigned {
                if let Entry::Vacant(slot) = queues.entry(p) {
                    if let Some(queue) = PartitionQueue::open(&consumer, &topics.events, p) {
                        slot.insert(queue);
                    }
                }
            }
            for (p, queue) in &queues {
                let room = limit.map_or(usize::MAX, |limit| limit.saturating_sub(taken));
                if room == 0 {
                    break;
                }
                if !stage.tasks.contains_key(p) {
                    // Not restored yet: its records wait in its queue.
                    continue;
                }
                taken += queue.fill(&mut batch, room, Duration::ZERO);
                for record in batch.records() {
                    match record {
                        Ok(record) => stage.handle(&consumer, &record)?,
                        Err(e) => warn!(error = %e, partition = queue.partition(), "meter: fetch error"),
                    }
                }
            }
            // Nothing fetched: the next poll waits a little for records or a rebalance.
            wait = if taken == 0 { IDLE_WAIT } else { Duration::ZERO };
            if taken == 0 || Instant::now() >= round_ends || limit.is_some() {
                break;
            }
        }
        let mut stage = lock(&stage)?;
        if Failpoint::HoldLock.active() {
            warn!("failpoint: holding the metering stage's lock");
            while Failpoint::HoldLock.active() {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        // One partition per round, between polls: each restore can take seconds, and
        // several back to back would outlast max.poll.interval.ms — the member would be
        // evicted, get the same partitions back, and restore them again, forever.
        stage.restore_next(&consumer)?;
        stage.report_progress(&consumer);
        if shutdown.load(Ordering::Relaxed) {
            stage.commit(&consumer)?;
            stage.settle(&consumer)?;
            info!("meter: stopped");
            return Ok(());
        }
        if last_idle_check.elapsed() >= idle_check_every {
            last_idle_check = Instant::now();
            let topic = &config.file.topics.events;
            let idle: BTreeSet<i32> = stage
                .silent_partitions(&consumer)
                .into_iter()
                .filter(|&(p, next)| caught_up(&consumer, topic, p, next))
                .map(|(p, _)| p)
                .collect();
            stage.follow_idle_partitions(&idle);
        }
        if stage.last_commit.elapsed() >= commit_interval || stage.hunt.careful() {
            stage.commit(&consumer)?;
        }
    }
}

impl Stage {
    /// Rebuilds the meter of a partition from its changelog partition: the task, or why its
    /// state cannot be used (`Err` inside: the partition stops), and whether the changelog
    /// held a progress record.
    fn restore(&self, partition: i32) -> anyhow::Result<ReadBack> {
        let started = Instant::now();
        if let Some(ms) = Failpoint::SlowRestoreMs.value().and_then(|ms| ms.to_str()?.parse().ok()) {
            std::thread::sleep(Duration::from_millis(ms));
        }
        let mut latest = BTreeMap::new();
        let mut owner: Option<Vec<u8>> = None;
        let client = super::client_config(&self.config);
        let read = changelog::read_partition(
            &client,
            &self.config.file.topics.changelog,
            partition,
            // The progress record says whether what was read is the committed state (see
            // `restore_at`), so the last stable offset is enough here.
            changelog::Until::LastStable,
            &mut Default::default(),
            |key, value, parts| {
                // Only state: a changelog written before billing had one of its own also
                // holds usage and markers, which belong to billing.
                match key {
                    ChangelogKey::State(key) => {
                        latest.insert(key, value.map(|v| (v.to_vec(), parts)));
                    }
                    ChangelogKey::Owner => owner = value.map(<[u8]>::to_vec),
                    _ => {}
                }
                Ok(())
            },
        )?;
        let state: Vec<(StateKey, (Vec<u8>, usize))> =
            latest.into_iter().filter_map(|(k, v)| v.map(|v| (k, v))).collect();
        let has_progress = state.iter().any(|(k, _)| *k == StateKey::Progress);
        // Whether the read reached the high watermark: then no open transaction can still
        // hold a newer progress record.
        let timeout = self.config.kafka.transaction_timeout;
        let complete =
            read.next_offset >= self.ends.of(&self.config.file.topics.changelog, partition, timeout)?.1;
        super::check_owner(&self.config, &self.config.file.topics.changelog, partition, owner.as_deref())?;
        let published: Vec<(StateKey, StateBytes)> = state
            .iter()
            .filter(|(k, _)| k.is_app_month())
            .map(|(k, (v, _))| (*k, StateBytes::from(&v[..])))
            .collect();
        let written = WrittenState::read_back(state.iter().map(|(k, (v, n))| (*k, v.len(), *n)));
        let state = state.into_iter().map(|(k, (v, _))| (k, v));
        let meter = match Meter::restore(self.config.meter.clone(), state) {
            Ok(meter) => meter,
            Err(e) => {
                let task = Err(match e {
                    RestoreError::Codec(e) => format!("its state in the changelog cannot be read: {e}"),
                    // Segments fewer than their totals: records lost, not damaged.
                    missing => format!(
                        "its state in the changelog lost records: {missing} (docs/operations.md, ImMeterPartitionStopped)"
                    ),
                });
                return Ok(ReadBack {
                    task,
                    has_progress,
                    complete,
                    records: read.records,
                    started,
                    published,
                });
            }
        };
        let task = Ok(Task {
            meter,
            next_offset: None,
            dirty: false,
            owner_missing: owner.is_none(),
            in_flight: false,
            last_record: Instant::now(),
            written,
        });
        Ok(ReadBack { task, has_progress, complete, records: read.records, started, published })
    }

    /// Restores the task of one assigned partition that has none yet (those never tried
    /// first), and learns where its input resumes (the committed offset), to tell when it
    /// has caught up.
    fn restore_next(&mut self, consumer: &BaseConsumer<StageContext>) -> anyhow::Result<()> {
        let Some(p) = self
            .assigned
            .iter()
            .filter(|p| !self.tasks.contains_key(p) && !self.stopped.contains_key(p))
            .min_by_key(|p| (self.behind.contains_key(p), **p))
            .copied()
        else {
            return Ok(());
        };
        if p as u32 >= self.changelog_partitions {
            // The events topic grew: the new partitions' state needs changelog partitions
            // (docs/operations.md, "Adding partitions"). A commit before they exist aborts.
            self.grow_changelog()?;
        }
        // Restore after our own transaction in flight, if any, has settled.
        if !self.settle(consumer)? {
            // It failed and the stage rewound: the next round restores.
            return Ok(());
        }
        let topic = self.config.file.topics.events.clone();
        let mut wanted = TopicPartitionList::new();
        wanted.add_partition(&topic, p);
        let timeout = self.config.kafka.transaction_timeout;
        let committed = with_retries("reading committed offsets", || {
            consumer.committed_offsets(wanted.clone(), timeout)
        })?;
        let committed = match committed.find_partition(&topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => Some(o),
            _ => None,
        };
        match self.restore_at(p, committed, consumer)? {
            Restored::Ready(task) => {
                self.behind.remove(&p);
                self.tasks.insert(p, *task);
            }
            Restored::Behind => {}
            Restored::Stopped(why) => {
                tracing::error!(partition = p, reason = %why, "meter: partition stopped; the others go on");
                let mut paused = TopicPartitionList::new();
                paused.add_partition(&topic, p);
                consumer.pause(&paused).context("cannot pause a stopped partition")?;
                self.behind.remove(&p);
                self.stopped.insert(p, why);
            }
        }
        Ok(())
    }

    /// Grows the metering changelog to the events topic's partition count.
    fn grow_changelog(&mut self) -> anyhow::Result<()> {
        let client = super::client_config(&self.config);
        let topics = &self.config.file.topics;
        let events = changelog::partition_count(&client, &topics.events)?;
        info!(topic = %topics.changelog, from = self.changelog_partitions, to = events, "meter: the events topic grew; growing the changelog");
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        runtime.block_on(grow_topic(&client, &topics.changelog, events as usize))?;
        // The new partitions reach every broker's metadata a moment later.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            self.changelog_partitions = changelog::partition_count(&client, &topics.changelog)?;
            if self.changelog_partitions >= events {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "topic {} has {} partitions 30 s after growing it to {events}",
                topics.changelog,
                self.changelog_partitions
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Restores partition `p` and decides where its input resumes. The changelog's progress
    /// record (the input offset its state reflects) is the truth; the group's committed
    /// offset (`None`: none, e.g. expired 7 days after the group emptied, or deleted) agrees
    /// with it after every commit, and otherwise:
    /// - none committed, or committed behind the progress (offsets deleted, reset back): it
    ///   resumes from the progress — re-reading would count those events twice;
    /// - committed ahead of the progress: while the changelog may still hold a newer
    ///   progress (its last stable offset lags the previous owner's commit markers for a
    ///   moment) the partition is read again in a later round (`Behind`); once it is read to
    ///   its end, the offsets were reset forward on purpose (to skip a poison record): it
    ///   resumes there, and the events skipped are counted and alerted;
    /// - a progress beyond the events partition's end (the topic recreated), or state that
    ///   cannot be trusted: the partition stops.
    ///
    /// Events the events topic deleted (retention) before they were read are counted too.
    fn restore_at(
        &mut self,
        p: i32,
        committed: Option<i64>,
        consumer: &BaseConsumer<StageContext>,
    ) -> anyhow::Result<Restored> {
        let ReadBack { task, has_progress, complete, records, started, published } = self.restore(p)?;
        let mut task = match task {
            Ok(task) => task,
            Err(why) => return Ok(Restored::Stopped(why)),
        };
        let (topic, timeout) =
            (self.config.file.topics.events.clone(), self.config.kafka.transaction_timeout);
        let (start, end) = with_retries("reading where the events partition starts and ends", || {
            consumer.fetch_watermarks(&topic, p, timeout)
        })?;
        let resume = match (task.meter.input_offset(), committed) {
            // The group has committed offsets for it, so a commit wrote its progress there:
            // without it, the changelog lost records (deleted, or the topic recreated), and
            // resuming would restart its open months from nothing.
            (None, Some(committed)) if !has_progress => {
                return Ok(Restored::Stopped(format!(
                    "the group's committed offset is {committed} but changelog partition {p} holds no progress record: \
                     its records were deleted or the topic recreated (docs/operations.md, ImMeterPartitionStopped)"
                )))
            }
            // State written before offsets were kept with it (format 1), or a partition
            // never committed: where the group is (its start when never committed).
            (None, committed) => committed.unwrap_or(start),
            (Some(state), _) if state > end => {
                return Ok(Restored::Stopped(format!(
                    "changelog partition {p} reflects events up to offset {state}, beyond the events partition's end \
                     {end}: the events topic was deleted and recreated (docs/operations.md, ImMeterPartitionStopped)"
                )))
            }
            (Some(state), None) => {
                info!(partition = p, state, "meter: no committed offset (expired or deleted); resuming from the changelog's progress");
                state
            }
            (Some(state), Some(committed)) if state >= committed => {
                if state > committed {
                    warn!(partition = p, state, committed, "meter: committed offset behind the changelog's progress (offsets reset back); resuming from the progress");
                }
                state
            }
            (Some(state), Some(committed)) if complete => {
                let skipped = committed - state;
                warn!(partition = p, state, committed, skipped, "meter: the group's offsets were reset forward past the changelog's progress; those events are skipped");
                metrics().events_skipped.with_label_values(&["offsets_reset"]).inc_by(skipped as u64);
                committed
            }
            (Some(state), Some(committed)) => {
                let wait = self.config.kafka.transaction_timeout + Duration::from_secs(30);
                let deadline = *self.behind.entry(p).or_insert_with(|| Instant::now() + wait);
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "the state of partition {p} in the changelog reflects offset {state}, but the committed offset is {committed}, still after {} s",
                    wait.as_secs()
                );
                warn!(partition = p, state, committed, "meter: changelog behind the committed offset; reading it again later");
                return Ok(Restored::Behind);
            }
        };
        let resume = if resume < start {
            let deleted = start - resume;
            warn!(
                partition = p,
                resume,
                start,
                deleted,
                "meter: events deleted by the events topic's retention before they were read; skipped"
            );
            metrics().events_skipped.with_label_values(&["retention"]).inc_by(deleted as u64);
            start
        } else {
            resume
        };
        if Some(resume) != committed {
            // The consumer starts at the committed offset (or, without one, at the start).
            with_retries("seeking to where the partition resumes", || {
                consumer.seek(&topic, p, Offset::Offset(resume), timeout)
            })?;
        }
        task.next_offset = Some(resume);
        // The state now says where it resumes (a partition never committed included).
        task.meter.set_input_offset(resume);
        // Restored only now, its task in place: a read found behind or untrusted is not.
        metrics().restore_duration.with_label_values(&["meter"]).observe(started.elapsed().as_secs_f64());
        info!(
            partition = p,
            records,
            app_months = task.meter.app_months(),
            connections = task.meter.connections(),
            ms = started.elapsed().as_millis() as u64,
            "meter: partition restored"
        );
        self.view.restored(self.member, p, published);
        Ok(Restored::Ready(Box::new(task)))
    }

    /// Applies one record (or sends it to the dead letters) and notes its offset.
    fn handle(&mut self, consumer: &BaseConsumer<StageContext>, record: &Fetched<'_>) -> anyhow::Result<()> {
        let p = record.partition;
        if !self.assigned.contains(&p) {
            // Fetched before the partition was revoked: its new owner applies it.
            return Ok(());
        }
        let Some(task) = self.tasks.get_mut(&p) else {
            // Fetched before its partition's queue was split, and not restored yet (that
            // happens between polls): read again once it is.
            let timeout = self.config.kafka.transaction_timeout;
            let topic = &self.config.file.topics.events;
            return with_retries("seeking back", || {
                consumer.seek(topic, p, Offset::Offset(record.offset), timeout)
            });
        };
        self.tally.consumed(record.payload.len() + record.key.map_or(0, <[u8]>::len));
        let at = (p, record.offset);
        if self.hunt.suspected(at) {
            // Every transaction that held it alone failed: written as poison, not applied.
            tracing::error!(
                partition = p,
                offset = record.offset,
                "meter: a record made every transaction holding it fail; skipping it as poison"
            );
            let detail = format!(
                "{POISON_AFTER} transactions holding this record alone failed; it is skipped (its bytes are at its coordinates)"
            );
            self.dead_letters.push(DeadLetter::poison(record, detail));
            self.tally.invalid(RejectReason::Poison);
            task.next_offset = Some(record.offset + 1);
            task.dirty = true;
            self.handled.poisoned(at);
            return Ok(());
        }
        self.handled.applied(at);
        if let Some(marker) = &self.poison_marker {
            self.holds_marker |= memchr::memmem::find(record.payload, marker).is_some();
        }
        // A refused event is never applied, so it never moves event time: one broken clock
        // must not close months for everyone.
        let decoded = decode_usage_event(record.payload)
            .and_then(|event| self.config.admit(&event, self.now).map(|()| event));
        let rejection = match decoded {
            Ok(event) => {
                let outcome = task.meter.apply(&event);
                self.tally.applied(&event.action, outcome);
                match outcome {
                    Outcome::Accepted | Outcome::Duplicate => None,
                    Outcome::Late => Some(Rejection::new(
                        RejectReason::Late,
                        format!("its month {} is already closed", task.meter.month_of(event.ts)),
                    )),
                    Outcome::TooManyApps => Some(Rejection::new(
                        RejectReason::TooManyApps,
                        format!(
                            "partition {p} holds {} app-months open, the most `metering.max_app_months` allows; app {} in {} would be one more",
                            task.meter.app_months(),
                            event.app_id,
                            task.meter.month_of(event.ts)
                        ),
                    )),
                }
            }
            Err(why) => {
                self.tally.invalid(why.reason);
                Some(why)
            }
        };
        task.next_offset = Some(record.offset + 1);
        task.dirty = true;
        if let Some(why) = rejection {
            self.dead_letters.push(DeadLetter::of(record, why));
        }
        Ok(())
    }

    /// The partitions silent for `idle_partition_timeout`, each with the offset it will
    /// read next: idle once that is the partition's end ([`caught_up`]).
    fn silent_partitions(&self, consumer: &BaseConsumer<StageContext>) -> Vec<(i32, Option<i64>)> {
        let idle_after = self.config.kafka.idle_partition_timeout;
        let topic = &self.config.file.topics.events;
        let positions = consumer.position().unwrap_or_default();
        self.tasks
            .iter()
            .filter(|(_, t)| t.last_record.elapsed() >= idle_after)
            .map(|(&p, t)| (p, t.next_offset.max(changelog::position_of(&positions, topic, p))))
            .collect()
    }

    /// Moves the event time of the `idle` partitions forward: to the latest event time of
    /// this worker's busy partitions, or, when every partition is idle, to the clock. Idle
    /// means caught up with the partition's end *and* silent for `idle_partition_timeout`; a
    /// partition with a backlog is never idle, however long its records take to arrive.
    fn follow_idle_partitions(&mut self, idle: &BTreeSet<i32>) {
        let busy_watermark = self
            .tasks
            .iter()
            .filter(|(p, _)| !idle.contains(p))
            .filter_map(|(_, t)| t.meter.watermark())
            .max();
        let target = match busy_watermark {
            Some(w) => w,
            // Whole minutes: the clock moves the watermark (and so causes a commit) at most
            // once a minute. Only a clock checked against the broker's closes months: a
            // month closed early cannot be reopened.
            None if idle.len() == self.tasks.len() => match self.clock.checked_now_ms() {
                Some(now) => Timestamp(now / 60_000 * 60_000),
                None => return,
            },
            None => return,
        };
        for p in idle {
            if let Some(task) = self.tasks.get_mut(p) {
                task.meter.advance_watermark(target);
            }
        }
    }

    /// Tells the board which partitions are assigned and which of them are restored.
    fn report_assignment(&self) {
        let mut state = self.status.state();
        state.partitions.retain(|p, _| self.assigned.contains(p));
        for &p in &self.assigned {
            let entry = state.partitions.entry(p).or_default();
            entry.restored = self.tasks.contains_key(&p);
            entry.stopped = self.stopped.get(&p).cloned();
        }
        let consumer = self.status.consumer.as_str();
        metrics().assigned_partitions.with_label_values(&["meter", consumer]).set(self.assigned.len() as i64);
        metrics().stopped_partitions.with_label_values(&["meter", consumer]).set(self.stopped.len() as i64);
    }

    /// Tells the board and the metrics how far each partition is and how big the state is.
    fn report_progress(&mut self, consumer: &BaseConsumer<StageContext>) {
        self.tally.flush("meter");
        self.report_assignment();
        let tz = self.config.meter.tz;
        // The consumer's position also steps over transaction markers, which are never
        // applied: without it a transactional input would always look one record behind.
        let positions = consumer.position().unwrap_or_default();
        let mut state = self.status.state();
        for (p, task) in &self.tasks {
            let entry = state.partitions.entry(*p).or_default();
            entry.next_offset =
                task.next_offset.max(changelog::position_of(&positions, &self.config.file.topics.events, *p));
            entry.watermark = task.meter.watermark();
            entry.app_months = task.meter.app_months() as u64;
        }
        state.app_months = self.tasks.values().map(|t| t.meter.app_months() as u64).sum();
        state.connections = self.tasks.values().map(|t| t.meter.connections() as u64).sum();
        state.state_bytes = self.tasks.values().map(|t| t.written.bytes()).sum();
        // The oldest month with events that is not closed yet, over all partitions.
        state.oldest_open_month_end = self
            .tasks
            .values()
            .filter_map(|t| {
                let closed = t.meter.closed_through();
                t.meter.active_months().iter().find(|m| closed.is_none_or(|c| **m > c)).copied()
            })
            .min()
            .map(|m| tz.end_of_month(m));
    }

    /// Begins the transaction of everything applied since the last commit, once the one
    /// in flight (if any) has settled; it commits in the background.
    fn commit(&mut self, consumer: &BaseConsumer<StageContext>) -> anyhow::Result<()> {
        if !self.settle(consumer)? {
            return Ok(());
        }
        self.last_commit = Instant::now();
        let topics = self.config.file.topics.clone();
        let mut offsets = TopicPartitionList::new();
        // What each partition's meter commits (`MeterCommit`: what, and in which order).
        let mut commits: Vec<(i32, MeterCommit)> = Vec::new();
        let changelogs = Changelogs {
            billing_partitions: self.billing_partitions,
            max_value: self.config.kafka.max_value_bytes,
        };
        // Which deployment owns the state: the consumer group id.
        let owner = self.config.file.kafka.group_id.as_bytes();
        let mut closes_month = false;
        let mut anything = false;
        for (&p, task) in self.tasks.iter_mut() {
            let source = Source {
                partition: p as u32,
                input_offset: task.next_offset,
                // Until a commit writing it is durable: a rewind restores and so retries it.
                owner: std::mem::take(&mut task.owner_missing).then_some(owner),
            };
            let mut commit = MeterCommit::take(&mut task.meter, &mut task.written, source, &changelogs);
            for (month, apps) in &commit.closed {
                info!(partition = p, %month, apps, "meter: month closed");
            }
            closes_month |= commit.closes_month();
            let seen = std::mem::take(&mut commit.app_months);
            self.in_flight_view.extend(seen.into_iter().map(|(key, value)| (p, key, value)));
            task.in_flight = task.dirty || !commit.is_empty();
            if !commit.is_empty() {
                commits.push((p, commit));
            }
            if task.dirty {
                // Records arrived since the last commit: not idle (one clock read per commit).
                task.last_record = self.last_commit;
                anything = true;
            }
            if let Some(next) = task.next_offset {
                // Every partition we own, whether or not it was read since: the group
                // coordinator then refuses the whole transaction if we no longer own them
                // (KIP-447), even one that only closes a month or writes progress.
                offsets.add_partition_offset(&topics.events, p, Offset::Offset(next))?;
            }
            task.dirty = false;
        }
        if commits.is_empty() && !anything && self.dead_letters.is_empty() {
            return Ok(());
        }
        if consumer.assignment_lost() {
            // We know already that another member may own them: write nothing, drop what was
            // applied since the last commit, and let the next poll serve the rebalance.
            warn!("meter: assignment lost; dropping what was applied since the last commit");
            self.tasks.clear();
            self.dead_letters.clear();
            self.in_flight_view.clear();
            return Ok(());
        }
        let group = consumer.group_metadata().context("the consumer has no group metadata")?;
        let covers = self.tasks.iter().filter_map(|(p, t)| Some((*p, t.next_offset?))).collect();
        self.in_flight = Some(std::mem::take(&mut self.handled).covered(covers));
        let refused_by_failpoint = std::mem::take(&mut self.holds_marker);
        let dead_letters = std::mem::take(&mut self.dead_letters);
        let started = self.last_commit;
        let stall = Failpoint::StallClose.file().filter(|_| closes_month);
        // A crash anywhere from here until commit_transaction returns (on the transaction
        // thread) loses nothing: the transaction is aborted (by the coordinator on timeout,
        // or at once when this worker restarts with the same transactional id), none of its
        // records become visible to read_committed readers, and the restarted worker
        // restores the meters from the changelog as of the previous commit and re-reads the
        // events after the previously committed offsets — exactly the events whose effects
        // were lost (those applied meanwhile for the next commit included).
        let began = self.outbox.begin(move |tx| {
            // Every partition's state, then every partition's records for billing.
            for (partition, commit) in &commits {
                for record in &commit.state {
                    tx.send(&topics.changelog, Some(*partition), &record.key, record.value.as_deref(), None)?;
                }
            }
            for (partition, record) in commits.iter().flat_map(|(_, commit)| &commit.billing) {
                let (key, value) = (&record.key, record.value.as_deref());
                tx.send(&topics.billing_changelog, Some(*partition as i32), key, value, None)?;
            }
            for letter in &dead_letters {
                tx.dead_letter(&topics.dead_letters, letter)?;
            }
            if let Some(file) = stall.filter(|f| f.exists()) {
                warn!("failpoint: a transaction closing a month stalls");
                while file.exists() {
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            if refused_by_failpoint {
                anyhow::bail!("failpoint: a record this transaction holds is refused");
            }
            if offsets.count() > 0 {
                tx.send_offsets(&offsets, &group)?;
            }
            tracing::debug!(ms = started.elapsed().as_millis() as u64, "meter: transaction filled");
            Ok(())
        });
        began.map_err(anyhow::Error::from)
    }

    /// Waits for the transaction in flight, if any. Returns whether the state in memory
    /// is still good: after an aborted transaction it is not, and the stage rewinds.
    fn settle(&mut self, consumer: &BaseConsumer<StageContext>) -> anyhow::Result<bool> {
        let published = std::mem::take(&mut self.in_flight_view);
        // What the transaction in flight covers (`None`: nothing is in flight).
        let covered = self.in_flight.take();
        match self.outbox.settle() {
            // Committed (or nothing was in flight): state, outputs and offsets are durable
            // together, and the usage API may show them.
            Ok(()) => {
                self.view.committed(published);
                if let Some(covered) = covered {
                    self.hunt.committed(&covered);
                }
                Ok(true)
            }
            // Nothing of it is visible (or, outcome unknown, maybe all of it: the producer
            // was replaced, which settled it on the broker), and the meters have moved on in
            // memory: go back to what Kafka holds — state from the changelog, input from the
            // committed offsets, which agree either way.
            Err(fatal @ TransactionFailed::Fatal(_)) => Err(fatal.into()),
            Err(failure) => {
                warn!(error = %failure, "meter: commit failed, rewinding to the last commit");
                let pause = match self.hunt.failed(&covered.unwrap_or_default(), failure.transient()) {
                    AfterFailure::Retry(pause) => pause,
                    AfterFailure::GoCareful(pause) => {
                        warn!(failures = POISON_AFTER, "meter: transactions keep failing; halving them to find the record that fails them");
                        pause
                    }
                    AfterFailure::Suspect((partition, offset)) => {
                        warn!(partition, offset, "meter: every transaction holding this record alone failed; writing it as poison next");
                        Duration::from_secs(1)
                    }
                    AfterFailure::Cleared((partition, offset)) => {
                        warn!(partition, offset, "meter: transactions fail without that record too: it is not the cause; applying it again");
                        Duration::from_secs(1)
                    }
                };
                // Not polling meanwhile: the pauses stay far below max.poll.interval.
                std::thread::sleep(pause);
                self.rewind(consumer)?;
                Ok(false)
            }
        }
    }

    /// Drops the in-memory state the failed transaction invalidated — the tasks it wrote
    /// for, or that applied records since — and moves those partitions back to their
    /// committed offsets; they are restored from the changelog one per round. A task the
    /// transaction did not touch is exactly what the changelog holds, and stays.
    fn rewind(&mut self, consumer: &BaseConsumer<StageContext>) -> anyhow::Result<()> {
        let invalid: Vec<i32> =
            self.tasks.iter().filter(|(_, t)| t.in_flight || t.dirty).map(|(p, _)| *p).collect();
        info!(partitions = ?invalid, kept = self.tasks.len() - invalid.len(), "meter: rewinding");
        self.tasks.retain(|p, _| !invalid.contains(p));
        // Only the invalid partitions had records since the last commit, so all of these
        // are theirs; reading those partitions again writes them again.
        self.dead_letters.clear();
        self.handled = Handled::default();
        self.holds_marker = false;
        if invalid.is_empty() {
            return Ok(());
        }
        let timeout = self.config.kafka.transaction_timeout;
        let topic = &self.config.file.topics.events;
        let mut wanted = TopicPartitionList::new();
        for p in &invalid {
            wanted.add_partition(topic, *p);
        }
        let committed = with_retries("reading committed offsets", || {
            consumer.committed_offsets(wanted.clone(), timeout)
        })?;
        for e in committed.elements() {
            let offset = match e.offset() {
                Offset::Offset(o) => Offset::Offset(o),
                _ => Offset::Beginning,
            };
            with_retries("seeking back", || consumer.seek(e.topic(), e.partition(), offset, timeout))?;
        }
        Ok(())
    }
}

/// Whether everything a partition holds has been read: `next` — the consumer's position,
/// which steps over a transactional producer's commit markers, or the committed offset
/// before any record — has reached the partition's end, its high watermark (so a producer's
/// transaction still open in it keeps it from being idle) as the last fetch response said.
/// Asked only for partitions already silent a while. Unknown is "no".
fn caught_up(consumer: &BaseConsumer<StageContext>, topic: &str, partition: i32, next: Option<i64>) -> bool {
    match (next, fetch::known_end(consumer, topic, partition)) {
        (Some(next), Some(end)) => next >= end,
        _ => false,
    }
}
