//! The subscription log: every record of the subscriptions topic read, in the order read,
//! and the subscription book billing's rule derives from them. Billing's subscription feed
//! and the usage API's ledger each keep one, so that both say the same about every plan.
//! No Kafka, no clock, no I/O.
//!
//! The rule ([`super::subscription`]): an event dated in a month its app's billing partition
//! had already billed when the event was read is *late* — it takes effect from the first
//! month still open, or is refused. "Read after the bill" is decided by Kafka positions: each
//! bill says how far every subscriptions partition had been read ([`SubscriptionsRead`],
//! written with the bill as `s/{month}`), and the log judges each record by its own partition
//! and offset against the positions of its app's billing partition ([`BilledPositions`]).
//! When the log learns of a bill does not matter: a bill learned after records read later
//! than it (a billing task restored, the ledger reading the billing changelog and the
//! subscriptions at their own paces) judges those records again and derives the book anew,
//! so every reader ends with the book billing had when it billed.
//!
//! **A recreated topic.** Offsets in the log are *log offsets*: the topic's offset, with
//! above [`INCARNATION_SHIFT`] bits how many times the topic was found deleted and created
//! again — so they only grow, over every incarnation of the topic, and positions of bills
//! made before a recreation still say which records were read after them. A reader resumes
//! one record before where it stopped ([`SubscriptionLog::resume_at`]) and hands each record
//! with its topic offset to [`SubscriptionLog::read_from_topic`]: a record that goes back
//! (the reader found its offset gone and started over) or that is not the record the log
//! holds at that offset means the topic is another one — a new incarnation, read from its
//! beginning. A record whose bytes the log holds already for its partition (the history
//! produced again into the new topic, or a producer's retry) is kept once.
//!
//! ```
//! use im_meter_core::changelog::SubscriptionsRead;
//! use im_meter_core::bill::{SubscriptionLog, SubscriptionRecord};
//! use im_meter_core::plan::Plan;
//! use im_meter_core::time::{BillingTz, Timestamp};
//!
//! let record = |offset, json: &str| SubscriptionRecord {
//!     partition: 0,
//!     offset,
//!     timestamp: None,
//!     key: None,
//!     payload: json.as_bytes().to_vec(),
//! };
//! let mut log = SubscriptionLog::new(BillingTz::default(), 1);
//! log.push(record(0, r#"{"type":"app_created","app_id":7,"ts":"2026-01-01T00:00:00+08:00"}"#));
//! // October was billed with offset 0 of partition 0 read; offset 1 is read after the bill.
//! log.billed(0, "2026-10".parse().unwrap(), SubscriptionsRead([(0, 1)].into()));
//! log.push(record(1, r#"{"type":"plan_changed","app_id":7,"ts":"2026-10-20T10:00:00+08:00","plan":"premium"}"#));
//! let at = |t| Timestamp::parse_rfc3339(t).unwrap();
//! assert_eq!(log.book().plan_at(7, at("2026-10-31T12:00:00+08:00")), Some(Plan::Developer));
//! assert_eq!(log.book().plan_at(7, at("2026-11-01T00:00:00+08:00")), Some(Plan::Premium));
//! ```

use std::collections::BTreeMap;

use rustc_hash::FxHashMap;
use xxhash_rust::xxh3::xxh3_64;

use super::{BilledPositions, Subscriptions};
use crate::changelog::{billing_partition, SubscriptionsRead};
use crate::ingest::{decode_subscription_event, Rejection};
use crate::plan::AppId;
use crate::time::{BillingTz, Month, Timestamp};

/// One record of the subscriptions topic, as read from it or from the plan book's copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubscriptionRecord {
    /// Its partition in the subscriptions topic.
    pub partition: u32,
    /// Its offset there.
    pub offset: i64,
    /// Its Kafka timestamp (epoch milliseconds), if it had one: it dates an unreadable record.
    pub timestamp: Option<i64>,
    /// Its key, where the reader keeps it (for dead letters).
    pub key: Option<Vec<u8>>,
    /// Its value (empty when it had none).
    pub payload: Vec<u8>,
}

/// Bits of a log offset that hold the topic's offset (a trillion records per partition);
/// the bits above count the topic's incarnations.
pub const INCARNATION_SHIFT: u32 = 40;

/// The log offset of `offset` in the topic's `incarnation` (0: as first created).
pub fn log_offset(incarnation: u32, offset: i64) -> i64 {
    (i64::from(incarnation) << INCARNATION_SHIFT) | offset
}

/// The topic offset of a log offset.
pub fn topic_offset(log_offset: i64) -> i64 {
    log_offset & ((1 << INCARNATION_SHIFT) - 1)
}

/// The incarnation of the topic a log offset is in.
pub fn incarnation(log_offset: i64) -> u32 {
    (log_offset >> INCARNATION_SHIFT) as u32
}

/// What [`SubscriptionLog::read_from_topic`] did with a record.
#[derive(Debug, PartialEq, Eq)]
pub enum TopicRead {
    /// Kept (and applied, unless it is not a subscription event: why, then).
    Kept(Option<Rejection>),
    /// The record a reader resumed on, the one the log holds there: the topic is the same.
    Resumed,
    /// The log holds the same bytes for its partition already: not kept again.
    Duplicate,
    /// The record is not the one the log holds at its offset: the topic was recreated and
    /// refilled past it. Read the partition again from its beginning.
    ReadAgain,
}

/// Where reading one subscriptions partition stands.
#[derive(Clone, Copy, Debug, Default)]
struct Cursor {
    /// The topic's incarnation being read.
    incarnation: u32,
    /// The topic offset after the last record kept (`None`: none yet in this incarnation).
    next: Option<i64>,
    /// The record before `next` is known (it was pushed), so a reader resuming on it can check it.
    checked: bool,
}

/// What a record is to the book.
#[derive(Clone, Debug)]
enum Judged {
    /// A subscription event of `app_id`, read when `first_open` was the first month its
    /// billing partition had not billed (as far as the log knows; `None`: none billed).
    Event { app_id: AppId, first_open: Option<Month> },
    /// Not a subscription event; dated in `month` by its Kafka time.
    Unreadable { month: Month, why: Rejection },
}

/// Every subscriptions record read and the book derived from them. See the module
/// documentation.
#[derive(Clone, Debug)]
pub struct SubscriptionLog {
    /// In read order; a record's origin in the book is its index here.
    records: Vec<SubscriptionRecord>,
    /// What each record is, index for index.
    judged: Vec<Judged>,
    book: Subscriptions,
    /// Billing partition → when its months were billed, in subscription positions.
    billed: BTreeMap<u32, BilledPositions>,
    /// Billing changelog partitions (an app's billing partition says whose bills count).
    billing_partitions: u32,
    /// Per subscriptions partition: where reading it stands.
    cursors: BTreeMap<u32, Cursor>,
    /// (Partition, hash of the bytes) → the records holding them: a record is kept once.
    contents: FxHashMap<(u32, u64), Vec<usize>>,
    /// Records not kept again, their bytes already held.
    duplicates: u64,
}

impl SubscriptionLog {
    /// An empty log; months are those of `tz`, apps spread over `billing_partitions`.
    pub fn new(tz: BillingTz, billing_partitions: u32) -> Self {
        SubscriptionLog {
            records: Vec::new(),
            judged: Vec::new(),
            book: Subscriptions::new(tz),
            billed: BTreeMap::new(),
            billing_partitions: billing_partitions.max(1),
            cursors: BTreeMap::new(),
            contents: FxHashMap::default(),
            duplicates: 0,
        }
    }

    /// Records not kept because the log held their bytes for their partition already.
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// The index of the record holding `payload` in `partition`, if any.
    fn holding(&self, partition: u32, payload: &[u8]) -> Option<usize> {
        let same = self.contents.get(&(partition, xxh3_64(payload)))?;
        same.iter().copied().find(|&i| self.records[i].payload == payload)
    }

    /// The topic offset to resume reading `partition` at: one before the next record, so
    /// that the reader finds out whether the topic is still the one the log read
    /// (`None`: from its beginning).
    pub fn resume_at(&self, partition: u32) -> Option<i64> {
        let cursor = self.cursors.get(&partition)?;
        let next = cursor.next?;
        Some(if cursor.checked { (next - 1).max(0) } else { next })
    }

    /// The topic offset after the last record kept of `partition` in the incarnation being
    /// read (`None`: none yet).
    pub fn next_topic_offset(&self, partition: u32) -> Option<i64> {
        self.cursors.get(&partition)?.next
    }

    /// The log offset after the last record read of `partition` (`None`: none read).
    pub fn position(&self, partition: u32) -> Option<i64> {
        let cursor = self.cursors.get(&partition)?;
        Some(log_offset(cursor.incarnation, cursor.next.unwrap_or(0)))
    }

    /// How far each of `partitions` subscriptions partitions has been read, in log offsets:
    /// what a bill made now has seen.
    pub fn read_positions(&self, partitions: u32) -> SubscriptionsRead {
        SubscriptionsRead((0..partitions).map(|p| (p, self.position(p).unwrap_or(0))).collect())
    }

    /// Hands over a record read from the subscriptions topic, `record.offset` its topic
    /// offset: kept with its log offset, a duplicate, or the sign that the topic was
    /// recreated (module documentation).
    pub fn read_from_topic(&mut self, mut record: SubscriptionRecord) -> TopicRead {
        let partition = record.partition;
        let cursor = self.cursors.get(&partition).copied().unwrap_or_default();
        let mut incarnation = cursor.incarnation;
        if let Some(next) = cursor.next {
            let resumed_on = next - 1;
            if record.offset < resumed_on {
                // Gone back: the reader found its offset past the partition's end (a new,
                // shorter topic) and started over from its beginning.
                incarnation += 1;
            } else if record.offset == resumed_on && cursor.checked {
                // The record the reader resumed on: the one the log holds, or another topic.
                let held = self.holding(partition, &record.payload);
                if held.is_some_and(|i| self.records[i].offset == log_offset(incarnation, resumed_on)) {
                    return TopicRead::Resumed;
                }
                self.cursors
                    .insert(partition, Cursor { incarnation: incarnation + 1, next: None, checked: false });
                return TopicRead::ReadAgain;
            }
        }
        record.offset = log_offset(incarnation, record.offset);
        if incarnation != cursor.incarnation {
            self.cursors.insert(partition, Cursor { incarnation, next: None, checked: false });
        }
        match self.push(record) {
            Some(unreadable) => TopicRead::Kept(unreadable.cloned()),
            None => TopicRead::Duplicate,
        }
    }

    /// The subscription book, as billing decides it from the records and bills known.
    pub fn book(&self) -> &Subscriptions {
        &self.book
    }

    /// Every record read, in read order.
    pub fn records(&self) -> &[SubscriptionRecord] {
        &self.records
    }

    /// Keeps a record just read (`record.offset`: its log offset) and records its event in
    /// the book, late for the months its app's billing partition had billed before it was
    /// read. `None` if the log holds its bytes for its partition already (not kept again);
    /// else `Some` with why the record is not a subscription event, if it is not (it stays
    /// in the log, for the dead letters).
    pub fn push(&mut self, record: SubscriptionRecord) -> Option<Option<&Rejection>> {
        let duplicate = self.holding(record.partition, &record.payload).is_some();
        let (read_in, next) = (incarnation(record.offset), topic_offset(record.offset) + 1);
        let cursor = self.cursors.entry(record.partition).or_default();
        if read_in > cursor.incarnation
            || (read_in == cursor.incarnation && cursor.next.is_none_or(|n| next > n))
        {
            // `checked`: the log holds this record at this offset, to check a resumed read on.
            *cursor = Cursor { incarnation: read_in, next: Some(next), checked: !duplicate };
        }
        if duplicate {
            self.duplicates += 1;
            return None;
        }
        let origin = self.records.len() as u64;
        self.contents.entry((record.partition, xxh3_64(&record.payload))).or_default().push(origin as usize);
        let judged = match decode_subscription_event(&record.payload) {
            Ok(event) => {
                let first_open = first_open(&self.billed, self.billing_partitions, event.app_id, &record);
                self.book.record(&event, origin, first_open);
                Judged::Event { app_id: event.app_id, first_open }
            }
            Err(why) => {
                let dated = record.timestamp.map(Timestamp).unwrap_or(Timestamp::MIN);
                Judged::Unreadable { month: self.book.tz().month_of(dated), why }
            }
        };
        self.records.push(record);
        self.judged.push(judged);
        Some(match self.judged.last() {
            Some(Judged::Unreadable { why, .. }) => Some(why),
            _ => None,
        })
    }

    /// Notes that billing partition `partition` billed `month` when the subscriptions had
    /// been read to `read` (a bill just committed, or its `s/{month}` mark read).
    pub fn billed(&mut self, partition: u32, month: Month, read: SubscriptionsRead) {
        self.billed.entry(partition).or_default().insert(month, read);
        self.judge_again();
    }

    /// Notes when billing partition `partition` billed each of its months (a restored
    /// task's marks), in place of what was known of it.
    pub fn billed_at(&mut self, partition: u32, billed: &BilledPositions) {
        if self.billed.get(&partition) == Some(billed) {
            return;
        }
        self.billed.insert(partition, billed.clone());
        self.judge_again();
    }

    /// Judges every event again by the bills known now; if any was read after a bill the
    /// log had not known of (or the bills known changed), derives the book anew from every
    /// record, in read order. A bill made after every record read so far changes nothing.
    fn judge_again(&mut self) {
        let mut changed = false;
        for (record, judged) in self.records.iter().zip(&mut self.judged) {
            if let Judged::Event { app_id, first_open: was } = judged {
                let now = first_open(&self.billed, self.billing_partitions, *app_id, record);
                changed |= now != *was;
                *was = now;
            }
        }
        if !changed {
            return;
        }
        self.book = Subscriptions::new(*self.book.tz());
        for (origin, (record, judged)) in self.records.iter().zip(&self.judged).enumerate() {
            if let Judged::Event { first_open, .. } = judged {
                // Decoded when pushed: it decodes alike.
                if let Ok(event) = decode_subscription_event(&record.payload) {
                    self.book.record(&event, origin as u64, *first_open);
                }
            }
        }
    }

    /// What billing partition `partition` dead-letters with its bill of `month`, whose
    /// previous bill was of `billed_before`, in read order: the refused (and late) events of
    /// its apps whose month (for a late one, the month it took effect in) lies in between, and
    /// the unreadable records of the subscriptions partitions of its number, by their Kafka
    /// time.
    pub fn refused(
        &self,
        partition: u32,
        month: Month,
        billed_before: Option<Month>,
    ) -> Vec<(&SubscriptionRecord, Rejection)> {
        let due = |m: Month| m <= month && billed_before.is_none_or(|b| m > b);
        let ours = |app| billing_partition(app, self.billing_partitions) == partition;
        let refused = self.book.apps_logged().filter(|a| ours(*a)).flat_map(|a| self.book.refusals(a));
        let mut letters: Vec<(usize, Rejection)> =
            refused.filter(|r| due(r.month)).map(|r| (r.origin as usize, r.rejection)).collect();
        for (index, (record, judged)) in self.records.iter().zip(&self.judged).enumerate() {
            if let Judged::Unreadable { month: dated, why } = judged {
                if due(*dated) && record.partition % self.billing_partitions == partition {
                    letters.push((index, why.clone()));
                }
            }
        }
        letters.sort_by_key(|(index, _)| *index);
        letters.into_iter().map(|(index, why)| (&self.records[index], why)).collect()
    }
}

/// The first month app `app_id`'s billing partition had not billed when `record` was read,
/// as far as `billed` says.
fn first_open(
    billed: &BTreeMap<u32, BilledPositions>,
    billing_partitions: u32,
    app_id: AppId,
    record: &SubscriptionRecord,
) -> Option<Month> {
    let partition = billing_partition(app_id, billing_partitions);
    billed.get(&partition).and_then(|b| b.first_open_when_read(record.partition, record.offset))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::RejectReason;
    use crate::plan::Plan;

    fn month(m: &str) -> Month {
        m.parse().unwrap()
    }

    fn ts(t: &str) -> Timestamp {
        Timestamp::parse_rfc3339(t).unwrap()
    }

    fn record(partition: u32, offset: i64, payload: &str) -> SubscriptionRecord {
        let payload = payload.as_bytes().to_vec();
        SubscriptionRecord {
            partition,
            offset,
            timestamp: Some(ts("2026-11-03T00:00:00+08:00").0),
            key: None,
            payload,
        }
    }

    fn change(app: AppId, at: &str, plan: &str) -> String {
        format!(r#"{{"type":"plan_changed","app_id":{app},"ts":"{at}","plan":"{plan}"}}"#)
    }

    fn created(app: AppId) -> String {
        format!(r#"{{"type":"app_created","app_id":{app},"ts":"2026-01-01T00:00:00+08:00"}}"#)
    }

    /// Two apps in different billing partitions (of two), each on Standard since February,
    /// then, in partition 0 of the topic: a Standard→Premium change dated October 20 and a
    /// Premium→Standard change on November 5 for each, and a record that is no event.
    fn records() -> (AppId, AppId, Vec<SubscriptionRecord>) {
        let mut apps = (1..).filter(|a| billing_partition(*a, 2) == 0);
        let billed_app = apps.next().unwrap();
        let other = (1..).find(|a| billing_partition(*a, 2) == 1).unwrap();
        let mut lines = Vec::new();
        for app in [billed_app, other] {
            lines.push(created(app));
            lines.push(change(app, "2026-02-01T00:00:00+08:00", "standard"));
        }
        for app in [billed_app, other] {
            lines.push(change(app, "2026-10-20T10:00:00+08:00", "premium"));
            lines.push(change(app, "2026-11-05T10:00:00+08:00", "standard"));
        }
        lines.push("not a subscription".into());
        let records = lines.iter().enumerate().map(|(i, l)| record(0, i as i64, l)).collect();
        (billed_app, other, records)
    }

    /// October billed in billing partition 0 with the first four records read.
    fn october_billed() -> SubscriptionsRead {
        SubscriptionsRead([(0, 4)].into())
    }

    /// What a book says that matters here: each app's plan through October and November, by
    /// day, and its refusals.
    fn view(log: &SubscriptionLog, apps: &[AppId]) -> Vec<String> {
        let book = log.book();
        let mut lines = Vec::new();
        for &app in apps {
            for day in ["2026-10-19", "2026-10-21", "2026-10-31", "2026-11-01", "2026-11-06", "2026-11-30"] {
                lines.push(format!(
                    "{app} {day} {:?}",
                    book.plan_at(app, ts(&format!("{day}T12:00:00+08:00")))
                ));
            }
            for r in book.refusals(app) {
                lines.push(format!("{app} refused {} {} {}", r.origin, r.month, r.rejection.reason.code()));
            }
        }
        lines
    }

    /// A change read after its month was billed is late for the apps of the billing partition
    /// that billed it, and only those: it takes effect from November 1, and the change of
    /// November 5 is then a second change between paid plans in November, refused. The other
    /// partition's app, whose October was not billed, takes both changes at their dates.
    #[test]
    fn a_change_read_after_its_month_was_billed_is_late_in_that_billing_partition_only() {
        let (billed_app, other, records) = records();
        let mut log = SubscriptionLog::new(BillingTz::default(), 2);
        for r in records.iter().take(4).cloned() {
            assert_eq!(log.push(r), Some(None));
        }
        log.billed(0, month("2026-10"), october_billed());
        for r in records.iter().skip(4).cloned() {
            log.push(r);
        }
        let book = log.book();
        let plan = |app, t| book.plan_at(app, ts(t));
        assert_eq!(book.plan_at_month_end(billed_app, month("2026-10")), Some(Plan::Standard), "as billed");
        assert_eq!(plan(billed_app, "2026-11-01T00:00:00+08:00"), Some(Plan::Premium));
        assert_eq!(
            plan(billed_app, "2026-11-30T12:00:00+08:00"),
            Some(Plan::Premium),
            "November's change refused"
        );
        let refused: Vec<(u64, Month, RejectReason)> =
            book.refusals(billed_app).into_iter().map(|r| (r.origin, r.month, r.rejection.reason)).collect();
        assert_eq!(
            refused,
            [(4, month("2026-11"), RejectReason::Late), (5, month("2026-11"), RejectReason::InvalidChange)]
        );
        assert_eq!(plan(other, "2026-10-21T00:00:00+08:00"), Some(Plan::Premium));
        assert_eq!(plan(other, "2026-11-30T12:00:00+08:00"), Some(Plan::Standard));
        assert!(book.refusals(other).is_empty());

        // The dead letters of partition 0's bill of November: the late change and the
        // refused one; the unreadable record (dated November by its Kafka time) too, source
        // partition 0 being partition 0's. Partition 1's bill carries none of them.
        let letters = log.refused(0, month("2026-11"), Some(month("2026-10")));
        let offsets: Vec<(i64, &str)> =
            letters.iter().map(|(r, why)| (r.offset, why.reason.code())).collect();
        assert_eq!(offsets, [(4, "late"), (5, "invalid_change"), (8, "not_json")]);
        assert!(log.refused(1, month("2026-11"), Some(month("2026-10"))).is_empty());
        assert!(log.refused(0, month("2026-10"), None).is_empty(), "nothing dated October");
    }

    /// Wherever the bill is learned — before the records read after it (billing, live),
    /// after them (the ledger reading the billing changelog late; a restored billing task,
    /// with all its marks at once) — the book is the same.
    #[test]
    fn the_book_does_not_depend_on_when_the_bill_is_learned() {
        let (billed_app, other, records) = records();
        let apps = [billed_app, other];
        let mut live = SubscriptionLog::new(BillingTz::default(), 2);
        for (i, r) in records.iter().cloned().enumerate() {
            if i == 4 {
                live.billed(0, month("2026-10"), october_billed());
            }
            live.push(r);
        }
        let want = view(&live, &apps);
        assert!(want.iter().any(|l| l.contains("refused 5 2026-11 invalid_change")), "{want:?}");

        for learned_at in 5..=records.len() {
            let mut late = SubscriptionLog::new(BillingTz::default(), 2);
            for (i, r) in records.iter().cloned().enumerate() {
                if i == learned_at {
                    late.billed(0, month("2026-10"), october_billed());
                }
                late.push(r);
            }
            if learned_at == records.len() {
                late.billed(0, month("2026-10"), october_billed());
            }
            assert_eq!(view(&late, &apps), want, "bill learned after {learned_at} records");
        }

        let mut restored = SubscriptionLog::new(BillingTz::default(), 2);
        for r in records.iter().cloned() {
            restored.push(r);
        }
        let mut positions = BilledPositions::default();
        positions.insert(month("2026-09"), SubscriptionsRead([(0, 4)].into()));
        positions.insert(month("2026-10"), october_billed());
        restored.billed_at(0, &positions);
        assert_eq!(view(&restored, &apps), want);
        // The same again changes nothing; September's earlier bill made no record late.
        restored.billed_at(0, &positions);
        assert_eq!(view(&restored, &apps), want);
    }

    /// A bill made after every record read so far (billing's own, as it commits it) judges
    /// none of them late: the book stays as it was.
    #[test]
    fn a_bill_after_every_record_read_changes_nothing() {
        let (billed_app, other, records) = records();
        let mut log = SubscriptionLog::new(BillingTz::default(), 2);
        for r in records.iter().cloned() {
            log.push(r);
        }
        let before = view(&log, &[billed_app, other]);
        log.billed(0, month("2026-11"), SubscriptionsRead([(0, records.len() as i64)].into()));
        assert_eq!(view(&log, &[billed_app, other]), before);
        assert_eq!(log.records().len(), records.len());
    }

    /// The subscriptions topic deleted and created again: its offsets start over, and a
    /// change read from it after October was billed must still be late for October — under
    /// bare topic offsets it sat below October's positions and counted as read before.
    #[test]
    fn a_recreated_topic_is_a_new_incarnation_read_after_every_earlier_bill() {
        let app = (1..).find(|a| billing_partition(*a, 1) == 0).unwrap();
        let first = [created(app), change(app, "2026-02-01T00:00:00+08:00", "standard")];
        let premium = change(app, "2026-10-20T10:00:00+08:00", "premium");
        let fresh = || {
            let mut log = SubscriptionLog::new(BillingTz::default(), 1);
            for (i, line) in first.iter().enumerate() {
                assert_eq!(log.read_from_topic(record(0, i as i64, line)), TopicRead::Kept(None));
            }
            // October billed with both read (partition 0 read to offset 2).
            log.billed(0, month("2026-10"), SubscriptionsRead([(0, 2)].into()));
            assert_eq!(log.resume_at(0), Some(1), "resumes on the last record, to check it");
            log
        };
        let premium_from = |log: &SubscriptionLog| log.book().plan_at(app, ts("2026-10-25T00:00:00+08:00"));

        // The same topic: the record resumed on is the one held, the next is read after it.
        let mut same = fresh();
        assert_eq!(same.read_from_topic(record(0, 1, &first[1])), TopicRead::Resumed);
        assert_eq!(same.read_from_topic(record(0, 2, &premium)), TopicRead::Kept(None));
        assert_eq!(same.records()[2].offset, 2);
        assert_eq!(premium_from(&same), Some(Plan::Standard), "late: October was billed");

        // Recreated, shorter: the reader starts over at 0, below where it resumed. The
        // history produced again is kept once; the change is late as it would have been.
        let mut shorter = fresh();
        assert_eq!(shorter.read_from_topic(record(0, 0, &first[0])), TopicRead::Duplicate);
        assert_eq!(shorter.read_from_topic(record(0, 1, &premium)), TopicRead::Kept(None));
        assert_eq!(shorter.records()[2].offset, log_offset(1, 1));
        assert_eq!(premium_from(&shorter), Some(Plan::Standard), "late: read after October's bill");
        assert_eq!(shorter.book().plan_at(app, ts("2026-11-01T00:00:00+08:00")), Some(Plan::Premium));
        assert_eq!(shorter.read_positions(1), SubscriptionsRead([(0, log_offset(1, 2))].into()));

        // Recreated and refilled past where it resumed: the record there is another one, so
        // the partition is read again from its beginning, as a new incarnation.
        let mut refilled = fresh();
        assert_eq!(refilled.read_from_topic(record(0, 1, &premium)), TopicRead::ReadAgain);
        assert_eq!(refilled.resume_at(0), None, "from the beginning");
        assert_eq!(refilled.read_from_topic(record(0, 0, &first[0])), TopicRead::Duplicate);
        assert_eq!(refilled.read_from_topic(record(0, 1, &premium)), TopicRead::Kept(None));
        assert_eq!(refilled.records()[2].offset, log_offset(1, 1));
        assert_eq!(premium_from(&refilled), Some(Plan::Standard));
        assert_eq!(refilled.duplicates(), 1);
    }
}
