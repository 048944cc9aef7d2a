//! The metering stage: SDK events → one [`Meter`] per assigned partition → changelogs.
//!
//! Guarantee: exactly once. Every `commit_interval` one Kafka transaction carries the
//! consumed offsets (`send_offsets_to_transaction`), the changed metering state (changelog
//! partition = events partition), the final usage of every month closed since the last
//! commit (to the billing changelog's partition of its app), month-closed markers (to every
//! billing changelog partition) and the dead letters. Either all of it becomes visible or
//! none of it does, so the committed state always matches the committed offsets.
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
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context;
use im_meter_core::aggregate::{
    billing_partition, parts, ChangelogKey, ClosedMark, Meter, Outcome, StateKey,
};
use im_meter_core::ingest::{decode_usage_event, RejectReason, Rejection};
use im_meter_core::time::Timestamp;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tracing::{info, warn};

use super::admin::grow_topic;
use super::fetch::{self, Batch, Fetched, PartitionQueue};
use super::output::{BackgroundOutbox, DeadLetter, Outbox, TransactionFailed};
use super::poison::{AfterFailure, Covered, Hunt, RecordAt, POISON_AFTER};
use super::{changelog, with_retries};
use crate::config::Config;
use crate::metrics::{metrics, EventTally};
use crate::status::{now_ms, Board, ConsumerStatus, StageKind};
use crate::view::{is_app_month, MeterView, StateBytes, ViewUpdate};

/// How long a poll waits when nothing was fetched: bounds how late a commit, a shutdown or
/// the first records after a quiet spell can be.
const IDLE_WAIT: Duration = Duration::from_millis(20);

/// Most records taken from a partition's queue at once.
const BATCH: usize = 4096;

/// A failpoint for tests (`tests/http.rs`): while the file this variable names exists, the
/// metering loop stops polling, as a consumer stuck in a blocking call would.
const PAUSE_FILE: &str = "IM_METER_TEST_PAUSE_FILE";

/// A failpoint for tests (`tests/http.rs`): while the file this variable names exists, the
/// metering loop holds its stage locked, as a long restore or a commit waiting for the
/// broker does — the usage API and the metrics must not wait for it.
const HOLD_LOCK_FILE: &str = "IM_METER_TEST_HOLD_LOCK_FILE";

/// A failpoint for tests (`tests/kafka.rs`): while the file this variable names exists, a
/// metering transaction that closes a month stalls after writing its records, before it
/// adds the consumed offsets — a member blocked past `max.poll.interval.ms` while a month
/// is due, which must not be able to commit anything once it wakes up.
const STALL_CLOSE_FILE: &str = "IM_METER_TEST_STALL_CLOSE_FILE";

/// A failpoint for tests (`tests/kafka.rs`): a transaction holding a record whose payload
/// contains the text this variable names fails, as one a broker refuses for that record
/// would — a poison record ([`super::poison`]).
const POISON_MARKER: &str = "IM_METER_TEST_POISON_MARKER";

/// One assigned events partition.
struct Task {
    meter: Meter,
    /// The offset after the last applied record: what the next commit stores.
    next_offset: Option<i64>,
    /// Whether records were applied since the last commit.
    dirty: bool,
    last_record: Instant,
    /// Bytes of the latest value of each state key in the changelog, and their sum.
    state_sizes: HashMap<StateKey, usize>,
    state_bytes: u64,
    /// State keys whose latest value is written in parts, and how many.
    state_parts: HashMap<StateKey, usize>,
}

/// A record to write to one of the changelogs: partition, key, value (`None` deletes the key).
type Outgoing = (i32, Vec<u8>, Option<Vec<u8>>);

impl Task {
    /// Notes a state record written (or read back): `None` deletes the key.
    fn sized(&mut self, key: StateKey, len: Option<usize>) {
        let old = match len {
            Some(len) => self.state_sizes.insert(key, len),
            None => self.state_sizes.remove(&key),
        };
        self.state_bytes = self.state_bytes + len.unwrap_or(0) as u64 - old.unwrap_or(0) as u64;
    }

    /// Queues the records that write state `key` ← `value` to changelog partition `p`: in
    /// parts when the value is over `max_value` bytes, with deletions of the parts of its
    /// previous value that are no longer used.
    fn write_state(
        &mut self,
        p: i32,
        key: StateKey,
        value: Option<Vec<u8>>,
        max_value: usize,
        out: &mut Vec<Outgoing>,
    ) {
        self.sized(key, value.as_ref().map(Vec::len));
        let bytes = ChangelogKey::State(key).to_bytes();
        let before = self.state_parts.remove(&key).unwrap_or(0);
        let now = match value {
            Some(value) => write_value(p, &bytes, value, max_value, out),
            None => {
                out.push((p, bytes.clone(), None));
                0
            }
        };
        out.extend(parts::part_keys(&bytes, now..before).into_iter().map(|k| (p, k, None)));
        if now > 0 {
            self.state_parts.insert(key, now);
        }
    }
}

/// Queues the records that write `key` ← `value` to partition `p`, in parts when over
/// `max_value` bytes; returns the number of parts (0: written whole).
fn write_value(p: i32, key: &[u8], value: Vec<u8>, max_value: usize, out: &mut Vec<Outgoing>) -> usize {
    let (records, parts) = parts::split(key, value, max_value);
    out.extend(records.into_iter().map(|(k, v)| (p, k, Some(v))));
    parts
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
    /// refused (a batch takes milliseconds; the skew is minutes).
    now: Timestamp,
    /// This consumer's number within the worker.
    member: usize,
    /// Where the committed state is published for the usage API and the metrics.
    view: Arc<MeterView>,
    /// The app-month records of the transaction in flight: published once it committed.
    in_flight_view: Vec<ViewUpdate>,
    /// The hunt for a record that makes every transaction fail, and what the transaction
    /// in flight covers for it.
    hunt: Hunt,
    in_flight: Option<Covered>,
    /// Records handled since the last transaction began: how many, the last one, and the
    /// one written as `poison` instead of applied.
    handled: (usize, Option<RecordAt>, Option<RecordAt>),
    /// The failpoint's text ([`POISON_MARKER`]), and whether a record holding it was applied
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
            metrics().rebalances.with_label_values(&["meter", "lost"]).inc();
        } else if let Err(e) = stage.commit(consumer).and_then(|()| stage.settle(consumer)) {
            // Commit while the partitions are still ours: after the callback another worker
            // may restore them, and it must find everything we applied.
            stage.failure = Some(e.context("commit before revocation failed"));
        }
        let partitions: Vec<i32> = revoked.elements().iter().map(|e| e.partition()).collect();
        for p in &partitions {
            stage.tasks.remove(p);
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
    let outbox =
        Outbox::transactional(&client, &transactional_id, config.kafka.transaction_timeout, "meter")?;
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
        status: board.consumer(StageKind::Meter, &member.to_string(), &topics.events),
        tally: EventTally::default(),
        now: Timestamp(now_ms()),
        member,
        view: board.view(),
        in_flight_view: Vec::new(),
        hunt: Hunt::default(),
        in_flight: None,
        handled: (0, None, None),
        poison_marker: std::env::var_os(POISON_MARKER).map(|m| m.into_encoded_bytes()),
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
    // While the stage is careful (a poison hunt): one record per transaction.
    let mut one = Batch::with_capacity(1);
    let mut wait = Duration::ZERO;
    let status = lock(&stage)?.status.clone();
    // The stage's lock, for the moments the loop lets go of it (the name is shadowed below).
    let stage_handle = Arc::clone(&stage);
    let pause = std::env::var_os(PAUSE_FILE).map(std::path::PathBuf::from);
    let hold = std::env::var_os(HOLD_LOCK_FILE).map(std::path::PathBuf::from);
    loop {
        // A failpoint for the stall test: the loop stops polling while the file exists.
        while pause.as_ref().is_some_and(|f| f.exists()) {
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
            stage.now = Timestamp(now_ms());
            let careful = stage.hunt.careful();
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
            for queue in queues.values() {
                if careful && taken > 0 {
                    break;
                }
                let batch = if careful { &mut one } else { &mut batch };
                taken += queue.fill(batch, Duration::ZERO);
                for record in batch.records() {
                    match record {
                        Ok(record) => stage.handle(&consumer, &record)?,
                        Err(e) => warn!(error = %e, partition = queue.partition(), "meter: fetch error"),
                    }
                }
            }
            // Nothing fetched: the next poll waits a little for records or a rebalance.
            wait = if taken == 0 { IDLE_WAIT } else { Duration::ZERO };
            if taken == 0 || Instant::now() >= round_ends || careful {
                break;
            }
        }
        let mut stage = lock(&stage)?;
        if hold.as_ref().is_some_and(|f| f.exists()) {
            warn!("failpoint: holding the metering stage's lock");
            while hold.as_ref().is_some_and(|f| f.exists()) {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        stage.restore_assigned(&consumer)?;
        stage.report_progress(&consumer);
        if shutdown.load(Ordering::Relaxed) {
            stage.commit(&consumer)?;
            stage.settle(&consumer)?;
            info!("meter: stopped");
            return Ok(());
        }
        if last_idle_check.elapsed() >= idle_check_every {
            last_idle_check = Instant::now();
            // Which silent partitions have read everything is a broker round trip each: asked
            // without the stage locked, so the usage API and the metrics never wait for it.
            // Nothing else changes the stage meanwhile: records and rebalances are handled on
            // this thread only.
            let silent = stage.silent_partitions(&consumer);
            drop(stage);
            let topic = &config.file.topics.events;
            let idle: BTreeSet<i32> = silent
                .into_iter()
                .filter(|&(p, next)| caught_up(&consumer, topic, p, next))
                .map(|(p, _)| p)
                .collect();
            stage = lock(&stage_handle)?;
            stage.follow_idle_partitions(&idle);
        }
        if stage.last_commit.elapsed() >= commit_interval || stage.hunt.careful() {
            stage.commit(&consumer)?;
        }
    }
}

impl Stage {
    /// Rebuilds the meter of a partition from its changelog partition.
    fn restore(&self, partition: i32) -> anyhow::Result<Task> {
        let started = Instant::now();
        let mut latest = BTreeMap::new();
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
                if let ChangelogKey::State(key) = key {
                    latest.insert(key, value.map(|v| (v.to_vec(), parts)));
                }
                Ok(())
            },
        )?;
        let state: Vec<(StateKey, (Vec<u8>, usize))> =
            latest.into_iter().filter_map(|(k, v)| v.map(|v| (k, v))).collect();
        let published: Vec<(StateKey, StateBytes)> = state
            .iter()
            .filter(|(k, _)| is_app_month(k))
            .map(|(k, (v, _))| (*k, StateBytes::from(&v[..])))
            .collect();
        let sizes: HashMap<StateKey, usize> = state.iter().map(|(k, (v, _))| (*k, v.len())).collect();
        let state_parts: HashMap<StateKey, usize> =
            state.iter().filter(|(_, (_, n))| *n > 0).map(|(k, (_, n))| (*k, *n)).collect();
        let state_bytes = sizes.values().map(|&n| n as u64).sum();
        let state = state.into_iter().map(|(k, (v, _))| (k, v));
        let meter = Meter::restore(self.config.meter.clone(), state)
            .with_context(|| format!("cannot restore the meter of partition {partition}"))?;
        metrics().restore_duration.with_label_values(&["meter"]).observe(started.elapsed().as_secs_f64());
        info!(
            partition,
            records = read.records,
            app_months = meter.app_months(),
            connections = meter.connections(),
            ms = started.elapsed().as_millis() as u64,
            "meter: partition restored"
        );
        self.view.restored(self.member, partition, published);
        Ok(Task {
            meter,
            next_offset: None,
            dirty: false,
            last_record: Instant::now(),
            state_sizes: sizes,
            state_bytes,
            state_parts,
        })
    }

    /// Restores the tasks of assigned partitions that have none yet, and learns where
    /// their input resumes (the committed offset), to tell when they have caught up.
    fn restore_assigned(&mut self, consumer: &BaseConsumer<StageContext>) -> anyhow::Result<()> {
        let missing: Vec<i32> =
            self.assigned.iter().filter(|p| !self.tasks.contains_key(p)).copied().collect();
        if missing.is_empty() {
            return Ok(());
        }
        if missing.iter().any(|p| *p as u32 >= self.changelog_partitions) {
            // The events topic grew: the new partitions' state needs changelog partitions
            // (docs/operations.md, "Adding partitions"). A commit before they exist aborts.
            self.grow_changelog()?;
        }
        // Restore after our own transaction in flight, if any, has settled.
        self.settle(consumer)?;
        let topic = &self.config.file.topics.events;
        let mut wanted = TopicPartitionList::new();
        for p in &missing {
            wanted.add_partition(topic, *p);
        }
        let timeout = self.config.kafka.transaction_timeout;
        let committed = with_retries("reading committed offsets", || {
            consumer.committed_offsets(wanted.clone(), timeout)
        })?;
        for p in missing {
            let committed = match committed.find_partition(topic, p).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => o,
                // Never committed: the group starts at the beginning (auto.offset.reset).
                _ => {
                    with_retries("reading the partition's start", || {
                        consumer.fetch_watermarks(topic, p, timeout)
                    })?
                    .0
                }
            };
            let task = self.restore_at(p, committed)?;
            self.tasks.insert(p, task);
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

    /// Restores partition `p` as of its committed offset. The changelog is read to its last
    /// stable offset, which can lag the committed offsets for a moment (the commit markers
    /// of the previous owner's last transaction are written after it returns); resuming
    /// from state older than the offsets would lose the events in between, so the read is
    /// repeated until the state says it reflects exactly the committed offset.
    fn restore_at(&self, p: i32, committed: i64) -> anyhow::Result<Task> {
        let deadline = Instant::now() + self.config.kafka.transaction_timeout + Duration::from_secs(30);
        loop {
            let mut task = self.restore(p)?;
            match task.meter.input_offset() {
                // State written before offsets were kept with it (format 1): nothing to check.
                None => {}
                Some(state) if state == committed => {}
                Some(state) if state < committed && Instant::now() < deadline => {
                    warn!(partition = p, state, committed, "meter: changelog behind the committed offset; reading it again");
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                }
                Some(state) => anyhow::bail!(
                    "the state of partition {p} in the changelog reflects offset {state}, but the committed offset is {committed}"
                ),
            }
            task.next_offset = Some(committed);
            // The state now says where it resumes (a partition never committed included).
            task.meter.set_input_offset(committed);
            return Ok(task);
        }
    }

    /// Applies one record (or sends it to the dead letters) and notes its offset.
    fn handle(&mut self, consumer: &BaseConsumer<StageContext>, record: &Fetched<'_>) -> anyhow::Result<()> {
        let p = record.partition;
        if !self.assigned.contains(&p) {
            // Fetched before the partition was revoked: its new owner applies it.
            return Ok(());
        }
        if !self.tasks.contains_key(&p) {
            self.restore_assigned(consumer)?;
        }
        let task = self.tasks.get_mut(&p).context("task restored above")?;
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
            self.handled = (self.handled.0 + 1, Some(at), Some(at));
            return Ok(());
        }
        self.handled = (self.handled.0 + 1, Some(at), self.handled.2);
        if let Some(marker) = &self.poison_marker {
            self.holds_marker |= memchr::memmem::find(record.payload, marker).is_some();
        }
        let decoded = decode_usage_event(record.payload).and_then(|event| {
            // Never applied, so it never moves event time: one broken clock must not close
            // months for everyone.
            Rejection::check_not_future(event.ts, self.now, self.config.billing.max_clock_skew)
                .and_then(|()| Rejection::check_plausible(&event, self.config.billing.max_group_count))
                .map(|()| event)
        });
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
            .map(|(&p, t)| (p, t.next_offset.max(position(&positions, topic, p))))
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
            // once a minute.
            None if idle.len() == self.tasks.len() => Timestamp(now_ms() / 60_000 * 60_000),
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
            state.partitions.entry(p).or_default().restored = self.tasks.contains_key(&p);
        }
        let consumer = self.status.consumer.as_str();
        metrics().assigned_partitions.with_label_values(&["meter", consumer]).set(self.assigned.len() as i64);
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
                task.next_offset.max(position(&positions, &self.config.file.topics.events, *p));
            entry.watermark = task.meter.watermark();
        }
        state.app_months = self.tasks.values().map(|t| t.meter.app_months() as u64).sum();
        state.connections = self.tasks.values().map(|t| t.meter.connections() as u64).sum();
        state.state_bytes = self.tasks.values().map(|t| t.state_bytes).sum();
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
        let mut records: Vec<Outgoing> = Vec::new();
        let mut for_billing: Vec<Outgoing> = Vec::new();
        let max_value = self.config.kafka.max_value_bytes;
        let mut closes_month = false;
        let mut anything = false;
        for (&p, task) in self.tasks.iter_mut() {
            if let Some(closing) = task.meter.take_closed() {
                closes_month |= !closing.months.is_empty();
                for (month, closed) in closing.months {
                    info!(partition = p, %month, apps = closed.len(), "meter: month closed");
                    for (app_id, mut aggregate) in closed {
                        let key = ChangelogKey::Usage { app_id, month, source: p as u32 };
                        let q = billing_partition(app_id, self.billing_partitions) as i32;
                        // Written once; billing deletes it, parts included, once billed.
                        write_value(q, &key.to_bytes(), aggregate.encode(), max_value, &mut for_billing);
                    }
                }
                // After the usage it covers, in the same transaction: a billing task that
                // reads the mark has read that usage.
                let mark = ClosedMark { through: closing.through, first_active: closing.first_active };
                let key = ChangelogKey::ClosedThrough { source: p as u32 }.to_bytes();
                for q in 0..self.billing_partitions as i32 {
                    for_billing.push((q, key.clone(), Some(mark.encode())));
                }
            }
            for (app_id, month) in task.meter.take_quota_crossings() {
                let q = billing_partition(app_id, self.billing_partitions) as i32;
                let key = ChangelogKey::QuotaCrossed { app_id, month, source: p as u32 };
                for_billing.push((q, key.to_bytes(), Some(Vec::new())));
            }
            if let Some(next) = task.next_offset {
                // The state says which input it reflects, in the transaction that commits
                // that offset: a restore checks the two against each other.
                task.meter.set_input_offset(next);
            }
            for record in task.meter.checkpoint() {
                if is_app_month(&record.key) {
                    let value = record.value.as_deref().map(StateBytes::from);
                    self.in_flight_view.push((p, record.key, value));
                }
                task.write_state(p, record.key, record.value, max_value, &mut records);
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
        if records.is_empty() && for_billing.is_empty() && !anything && self.dead_letters.is_empty() {
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
        let (count, last, poisoned) = std::mem::take(&mut self.handled);
        self.in_flight = Some(Covered {
            offsets: self.tasks.iter().filter_map(|(p, t)| Some((*p, t.next_offset?))).collect(),
            single: last.filter(|_| count == 1 && poisoned.is_none()),
            poisoned,
        });
        let refused_by_failpoint = std::mem::take(&mut self.holds_marker);
        let dead_letters = std::mem::take(&mut self.dead_letters);
        let started = self.last_commit;
        let stall = std::env::var_os(STALL_CLOSE_FILE).filter(|_| closes_month).map(std::path::PathBuf::from);
        // A crash anywhere from here until commit_transaction returns (on the transaction
        // thread) loses nothing: the transaction is aborted (by the coordinator on timeout,
        // or at once when this worker restarts with the same transactional id), none of its
        // records become visible to read_committed readers, and the restarted worker
        // restores the meters from the changelog as of the previous commit and re-reads the
        // events after the previously committed offsets — exactly the events whose effects
        // were lost (those applied meanwhile for the next commit included).
        let began = self.outbox.begin(move |tx| {
            for (partition, key, value) in &records {
                tx.send(&topics.changelog, Some(*partition), key, value.as_deref(), None)?;
            }
            for (partition, key, value) in &for_billing {
                tx.send(&topics.billing_changelog, Some(*partition), key, value.as_deref(), None)?;
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
                        warn!(failures = POISON_AFTER, "meter: transactions keep failing; committing one record at a time to find the one that fails them");
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

    /// Drops all in-memory state and moves every assigned partition back to its committed
    /// offset; the meters are restored from the changelog before their next record.
    fn rewind(&mut self, consumer: &BaseConsumer<StageContext>) -> anyhow::Result<()> {
        self.tasks.clear();
        self.dead_letters.clear();
        self.handled = (0, None, None);
        self.holds_marker = false;
        let timeout = self.config.kafka.transaction_timeout;
        let assignment = consumer.assignment().context("cannot read the assignment")?;
        let committed = with_retries("reading committed offsets", || {
            consumer.committed_offsets(assignment.clone(), timeout)
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

/// A partition's position in `positions` (the consumer's: the offset after the last record
/// it handed out, stepping over transaction markers, which are never handed out).
fn position(positions: &TopicPartitionList, topic: &str, partition: i32) -> Option<i64> {
    match positions.find_partition(topic, partition).map(|e| e.offset()) {
        Some(Offset::Offset(o)) => Some(o),
        _ => None,
    }
}

/// Whether everything a partition holds has been read: `next` — the consumer's position,
/// which steps over a transactional producer's commit markers, or the committed offset
/// before any record — has reached the partition's end. Asked of the broker only for
/// partitions already silent a while. Unknown is "no".
fn caught_up(consumer: &BaseConsumer<StageContext>, topic: &str, partition: i32, next: Option<i64>) -> bool {
    match consumer.fetch_watermarks(topic, partition, Duration::from_secs(2)) {
        Ok((low, high)) => next.unwrap_or(low) >= high,
        Err(_) => false,
    }
}
