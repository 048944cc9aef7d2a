//! Finding the one input record that makes every metering transaction fail — a poison
//! record — so that a stage never reads the same records again forever.
//!
//! Every output record of the worker is bounded (values in parts, dead letters cut), so no
//! record should ever make a transaction fail; this is the net under what cannot be foreseen
//! (a topic setting changed under a running worker, a broker-side policy, a bug). It never
//! blames a record it has not isolated:
//!
//! 1. After [`POISON_AFTER`] metering transactions in a row failed for a reason other than
//!    the broker being unreachable, the stage goes *careful* until it has committed past
//!    every offset those transactions covered: transactions hold at most half the records
//!    of the last failed one, halving again after each failure and doubling after each
//!    commit — a binary search that narrows 40,000 records down to one in about 16 failed
//!    transactions, where one record per transaction would take 40,000 commits.
//! 2. A careful transaction holding record R alone that fails [`POISON_AFTER`] times in a row
//!    (each retry after a longer pause, so that a short outage is not taken for R) makes R a
//!    *suspect*: the next transaction writes R's dead letter as `poison` (its coordinates,
//!    length and SHA-256 only) instead of applying R.
//! 3. If that transaction commits, R was the poison: it stays skipped, counted and alerted.
//!    If it fails too, R was not the cause: it is applied again, never suspected again, and
//!    the stage goes on retrying (the transaction-abort alert fires meanwhile).
//!
//! This module only keeps the books; the metering stage runs the transactions.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// Failed transactions in a row before the stage goes careful, and careful transactions of
/// one record in a row before that record is suspected.
pub const POISON_AFTER: u32 = 3;

/// A record: its partition and offset.
pub type RecordAt = (i32, i64);

/// What one metering transaction covered: per partition, the offset after the last record
/// it applied, how many records it held, and the one record if it held exactly one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Covered {
    /// Partition → the offset its commit stores.
    pub offsets: BTreeMap<i32, i64>,
    /// Input records it held (applied or written as poison).
    pub records: usize,
    /// The only record applied in it, if it held exactly one.
    pub single: Option<RecordAt>,
    /// The record it wrote as `poison` instead of applying it, if any.
    pub poisoned: Option<RecordAt>,
}

/// The records handled since the last transaction began, as the hunt needs them.
#[derive(Debug, Clone, Default)]
pub struct Handled {
    records: usize,
    last: Option<RecordAt>,
    poisoned: Option<RecordAt>,
}

impl Handled {
    /// A record was applied.
    pub fn applied(&mut self, at: RecordAt) {
        self.records += 1;
        self.last = Some(at);
    }

    /// A record was written as `poison` instead of being applied.
    pub fn poisoned(&mut self, at: RecordAt) {
        self.applied(at);
        self.poisoned = Some(at);
    }

    /// What the transaction that holds them covers, with the offsets it commits.
    pub fn covered(self, offsets: BTreeMap<i32, i64>) -> Covered {
        let single = self.last.filter(|_| self.records == 1 && self.poisoned.is_none());
        Covered { offsets, records: self.records, single, poisoned: self.poisoned }
    }
}

/// The hunt's books. See the module documentation.
#[derive(Debug, Default)]
pub struct Hunt {
    /// Transactions failed in a row (the broker being unreachable does not count).
    failures_in_a_row: u32,
    /// While not empty: careful (batches of at most `limit`), until every partition here has committed
    /// its offset.
    careful_until: BTreeMap<i32, i64>,
    /// While careful: the most records a transaction holds.
    limit: usize,
    /// Careful transactions of one record that failed in a row, by record.
    strikes: BTreeMap<RecordAt, u32>,
    /// Records to write as `poison` instead of applying them.
    suspects: BTreeSet<RecordAt>,
    /// Records found not to be the cause: never suspected again.
    cleared: BTreeSet<RecordAt>,
}

/// What the stage should do after a failed transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterFailure {
    /// Retry (after rewinding), after this pause.
    Retry(Duration),
    /// Retry after this pause; the stage has just gone careful.
    GoCareful(Duration),
    /// The record is suspected from now on: it is written as `poison` when read again.
    Suspect(RecordAt),
    /// The suspect was written as `poison` and that failed too: it is not the cause.
    Cleared(RecordAt),
}

impl Hunt {
    /// Whether the stage is careful.
    pub fn careful(&self) -> bool {
        !self.careful_until.is_empty()
    }

    /// While careful, the most input records the next transaction may hold.
    pub fn batch_limit(&self) -> Option<usize> {
        self.careful().then_some(self.limit.max(1))
    }

    /// Whether `record` is to be written as `poison` instead of being applied.
    pub fn suspected(&self, record: RecordAt) -> bool {
        self.suspects.contains(&record)
    }

    /// A transaction that covered `covered` committed.
    pub fn committed(&mut self, covered: &Covered) {
        self.failures_in_a_row = 0;
        if let Some(record) = covered.single {
            self.strikes.remove(&record);
        }
        if let Some(poison) = covered.poisoned {
            // Written for good: it will not be read again.
            self.suspects.remove(&poison);
            self.strikes.remove(&poison);
        }
        for (p, offset) in &covered.offsets {
            if self.careful_until.get(p).is_some_and(|until| offset >= until) {
                self.careful_until.remove(p);
            }
        }
        self.limit = self.limit.saturating_mul(2);
    }

    /// A transaction that covered `covered` failed; `transient`: for a reason that says
    /// nothing about its records (the broker unreachable, a coordinator moving).
    pub fn failed(&mut self, covered: &Covered, transient: bool) -> AfterFailure {
        if transient {
            return AfterFailure::Retry(Duration::from_secs(1));
        }
        if let Some(poison) = covered.poisoned {
            // Skipping it did not help: it was not the cause.
            self.suspects.remove(&poison);
            self.strikes.remove(&poison);
            self.cleared.insert(poison);
            return AfterFailure::Cleared(poison);
        }
        self.failures_in_a_row += 1;
        if self.careful() && covered.records > 1 {
            // Narrowing down: no pause, a failure here says only which half to look in.
            self.limit = covered.records / 2;
            return AfterFailure::Retry(Duration::ZERO);
        }
        if let (true, Some(record)) = (self.careful(), covered.single) {
            if self.cleared.contains(&record) {
                return AfterFailure::Retry(pause(self.failures_in_a_row));
            }
            let strikes = self.strikes.entry(record).or_default();
            *strikes += 1;
            if *strikes >= POISON_AFTER {
                self.suspects.insert(record);
                return AfterFailure::Suspect(record);
            }
            return AfterFailure::Retry(pause(*strikes));
        }
        if self.failures_in_a_row >= POISON_AFTER && !self.careful() {
            // Careful past everything the failing transactions may have held.
            self.careful_until = covered.offsets.clone();
            self.limit = covered.records / 2;
            return AfterFailure::GoCareful(pause(1));
        }
        AfterFailure::Retry(pause(self.failures_in_a_row))
    }
}

/// The pause before the `n`-th retry: 1, 2, 4, … seconds, at most 30.
pub(super) fn pause(n: u32) -> Duration {
    Duration::from_secs(1u64 << n.saturating_sub(1).min(5)).min(Duration::from_secs(30))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn covered(offsets: &[(i32, i64)], single: Option<RecordAt>) -> Covered {
        let records = if single.is_some() { 1 } else { 100 };
        Covered { offsets: offsets.iter().copied().collect(), records, single, poisoned: None }
    }

    #[test]
    fn a_record_failing_alone_is_suspected_then_found_poison() {
        let mut hunt = Hunt::default();
        let batch = covered(&[(0, 100), (1, 50)], None);
        assert!(matches!(hunt.failed(&batch, false), AfterFailure::Retry(_)));
        assert!(matches!(hunt.failed(&batch, false), AfterFailure::Retry(_)));
        assert!(matches!(hunt.failed(&batch, false), AfterFailure::GoCareful(_)));
        assert!(hunt.careful());
        // Halves, then quarters, ...: records before the poison commit in ever smaller
        // batches, the batch after a commit twice as large.
        assert_eq!(hunt.batch_limit(), Some(50));
        let half = Covered { records: 50, ..covered(&[(0, 50), (1, 50)], None) };
        assert_eq!(hunt.failed(&half, false), AfterFailure::Retry(Duration::ZERO));
        assert_eq!(hunt.batch_limit(), Some(25));
        hunt.committed(&Covered { records: 25, ..covered(&[(0, 25)], None) });
        assert_eq!(hunt.batch_limit(), Some(50));
        for records in [50, 25, 12, 6, 3] {
            hunt.failed(&Covered { records, ..covered(&[(0, 41)], None) }, false);
        }
        assert_eq!(hunt.batch_limit(), Some(1));
        hunt.committed(&covered(&[(0, 41)], Some((0, 40))));
        assert_eq!(hunt.batch_limit(), Some(2));
        let alone = covered(&[(0, 42)], Some((0, 41)));
        assert!(matches!(hunt.failed(&alone, false), AfterFailure::Retry(_)));
        // An outage meanwhile says nothing about the record.
        assert!(matches!(hunt.failed(&alone, true), AfterFailure::Retry(_)));
        assert!(matches!(hunt.failed(&alone, false), AfterFailure::Retry(_)));
        assert!(!hunt.suspected((0, 41)));
        assert_eq!(hunt.failed(&alone, false), AfterFailure::Suspect((0, 41)));
        assert!(hunt.suspected((0, 41)));
        // Written as poison, and that commits: skipped for good.
        hunt.committed(&Covered {
            offsets: [(0, 42)].into(),
            records: 1,
            single: None,
            poisoned: Some((0, 41)),
        });
        assert!(!hunt.suspected((0, 41)));
        assert!(hunt.careful(), "partition 1 has not passed 50 yet");
        hunt.committed(&covered(&[(0, 100), (1, 50)], Some((1, 49))));
        assert!(!hunt.careful());
    }

    #[test]
    fn a_suspect_whose_skipping_does_not_help_is_cleared_for_good() {
        let mut hunt = Hunt::default();
        let batch = covered(&[(0, 10)], None);
        for _ in 0..POISON_AFTER {
            hunt.failed(&batch, false);
        }
        let alone = covered(&[(0, 6)], Some((0, 5)));
        for _ in 0..POISON_AFTER {
            hunt.failed(&alone, false);
        }
        assert!(hunt.suspected((0, 5)));
        let skipped = Covered { offsets: [(0, 6)].into(), records: 1, single: None, poisoned: Some((0, 5)) };
        assert_eq!(hunt.failed(&skipped, false), AfterFailure::Cleared((0, 5)));
        assert!(!hunt.suspected((0, 5)));
        for _ in 0..2 * POISON_AFTER {
            assert!(matches!(hunt.failed(&alone, false), AfterFailure::Retry(_)));
        }
        assert!(!hunt.suspected((0, 5)), "never suspected again");
    }

    #[test]
    fn a_transaction_of_one_applied_record_names_it() {
        let mut one = Handled::default();
        one.applied((0, 7));
        assert_eq!(one.clone().covered([(0, 8)].into()).single, Some((0, 7)));
        let mut poisoned = Handled::default();
        poisoned.poisoned((0, 7));
        let covered = poisoned.covered([(0, 8)].into());
        assert_eq!((covered.single, covered.poisoned, covered.records), (None, Some((0, 7)), 1));
        let mut two = one;
        two.applied((1, 3));
        assert_eq!(two.covered(BTreeMap::new()).single, None);
    }

    #[test]
    fn outages_alone_never_make_the_stage_careful() {
        let mut hunt = Hunt::default();
        for _ in 0..10 * POISON_AFTER {
            hunt.failed(&covered(&[(0, 10)], Some((0, 9))), true);
        }
        assert!(!hunt.careful() && !hunt.suspected((0, 9)));
    }

    #[test]
    fn pauses_grow_and_stay_bounded() {
        assert_eq!(pause(1), Duration::from_secs(1));
        assert_eq!(pause(3), Duration::from_secs(4));
        assert_eq!(pause(40), Duration::from_secs(30));
    }
}
