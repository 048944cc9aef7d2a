//! Peak concurrent connections (PCC) by the sampled-instant definition (SPEC §1.1).
//!
//! Sample instants are the multiples of the sample interval since the Unix epoch
//! ([`SampleGrid`]); a connection open over `[t0, t1)` counts at instant `s` when
//! `t0 <= s < t1`. One app-month's [`PccTimeline`] stores, for the month's instants only,
//! the change of the open-connection count (+1 where a connection starts counting, −1
//! where it stops). Timelines of disjoint connection sets add up instant by instant, so
//! per-partition timelines merge exactly; the peak is the largest running sum.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::time::Timestamp;

/// The sample instants: every `interval`, aligned to the epoch (and so to the minute).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SampleGrid {
    interval_ms: i64,
}

/// A sample interval that does not divide an hour into whole seconds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("sample interval must be a whole number of seconds that divides one hour (e.g. 1s, 30s, 60s, 300s), got {0:?}")]
pub struct SampleIntervalError(pub Duration);

impl SampleGrid {
    /// A grid of instants `interval` apart. The interval must divide an hour, so that
    /// instants fall on the same clock positions every hour (and on every minute when it
    /// is 60 s or less).
    pub fn new(interval: Duration) -> Result<Self, SampleIntervalError> {
        let ms = interval.as_millis();
        if ms == 0 || !ms.is_multiple_of(1000) || !3_600_000u128.is_multiple_of(ms) {
            return Err(SampleIntervalError(interval));
        }
        Ok(SampleGrid { interval_ms: ms as i64 })
    }

    /// The interval in milliseconds.
    pub fn interval_ms(self) -> i64 {
        self.interval_ms
    }

    /// The index of the first sample instant at or after `ts`.
    #[inline]
    pub fn first_at_or_after(self, ts: Timestamp) -> u32 {
        // Timestamps are within [2000, 2100) and the interval is >= 1 s, so indices fit u32.
        (ts.millis() + self.interval_ms - 1).div_euclid(self.interval_ms) as u32
    }

    /// The instant of a sample index.
    pub fn instant(self, index: u32) -> Timestamp {
        Timestamp(i64::from(index) * self.interval_ms)
    }
}

/// The sample indices `[first, end)` that belong to one billing month.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct MonthSamples {
    /// The first sample index in the month.
    pub first: u32,
    /// The first sample index of the next month.
    pub end: u32,
}

impl MonthSamples {
    /// The samples of the month spanning `[start, end)`.
    pub fn new(grid: SampleGrid, start: Timestamp, end: Timestamp) -> Self {
        MonthSamples { first: grid.first_at_or_after(start), end: grid.first_at_or_after(end) }
    }
}

/// The open-connection count of one app over one month, as changes at sample instants.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PccTimeline {
    /// Sample index → change of the count there. Zero entries are removed so equal
    /// timelines have equal (and canonically serialized) maps.
    deltas: BTreeMap<u32, i32>,
}

impl PccTimeline {
    /// An empty timeline.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether no connection was ever counted.
    pub fn is_empty(&self) -> bool {
        self.deltas.is_empty()
    }

    /// Number of instants at which the count changes.
    pub fn change_points(&self) -> usize {
        self.deltas.len()
    }

    /// The changes of the count, by sample index, ascending.
    pub(crate) fn changes(&self) -> impl Iterator<Item = (u32, i32)> + '_ {
        self.deltas.iter().map(|(&index, &delta)| (index, delta))
    }

    /// Changes the count by `delta` from sample index `index` on.
    pub(crate) fn change(&mut self, index: u32, delta: i32) {
        let entry = self.deltas.entry(index).or_insert(0);
        *entry += delta;
        if *entry == 0 {
            self.deltas.remove(&index);
        }
    }

    /// Counts a connection over the sample indices `[from, until)`, clipped to the month.
    /// `until = None` means still open at the month's end.
    pub fn add_connection(&mut self, month: MonthSamples, from: u32, until: Option<u32>) {
        self.count_connection(month, from, until, 1);
    }

    /// Takes back a connection counted by [`PccTimeline::add_connection`] with the same
    /// arguments (its span was corrected).
    pub fn remove_connection(&mut self, month: MonthSamples, from: u32, until: Option<u32>) {
        self.count_connection(month, from, until, -1);
    }

    fn count_connection(&mut self, month: MonthSamples, from: u32, until: Option<u32>, sign: i32) {
        let lo = from.max(month.first);
        let hi = until.map_or(month.end, |u| u.min(month.end));
        if lo >= hi {
            return;
        }
        self.change(lo, sign);
        // A connection still open at the month's last instant needs no −1 inside it.
        if hi < month.end {
            self.change(hi, -sign);
        }
    }

    /// Adds `other`'s connections to these (instant-wise sum).
    pub fn merge(&mut self, other: &PccTimeline) {
        for (&index, &delta) in &other.deltas {
            self.change(index, delta);
        }
    }

    /// The peak count and the first sample index reaching it (`None` when nothing was open).
    pub fn peak(&self) -> (u64, Option<u32>) {
        let mut open: i64 = 0;
        let mut best: (i64, Option<u32>) = (0, None);
        for (&index, &delta) in &self.deltas {
            open += i64::from(delta);
            if open > best.0 {
                best = (open, Some(index));
            }
        }
        (best.0.max(0) as u64, best.1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minute_grid() -> SampleGrid {
        SampleGrid::new(Duration::from_secs(60)).unwrap()
    }

    #[test]
    fn grid_rounds_up_to_the_next_instant() {
        let g = minute_grid();
        assert_eq!(g.first_at_or_after(Timestamp(1_800_000_000_000)), 30_000_000);
        assert_eq!(g.first_at_or_after(Timestamp(1_800_000_000_001)), 30_000_001);
        assert!(SampleGrid::new(Duration::from_secs(7)).is_err());
        assert!(SampleGrid::new(Duration::from_millis(1500)).is_err());
        assert!(SampleGrid::new(Duration::from_secs(300)).is_ok());
    }

    #[test]
    fn overlapping_connections_peak_where_they_overlap() {
        let month = MonthSamples { first: 100, end: 200 };
        let mut t = PccTimeline::new();
        t.add_connection(month, 110, Some(150));
        t.add_connection(month, 140, Some(160));
        t.add_connection(month, 150, None);
        // At 150 the first has stopped counting (t1 is exclusive) and the third has started.
        assert_eq!(t.peak(), (2, Some(140)));
        // Clipping: a connection from before the month to after it counts all month.
        t.add_connection(month, 50, Some(500));
        assert_eq!(t.peak(), (3, Some(140)));
        // Zero-length and out-of-month connections count nowhere.
        let mut empty = PccTimeline::new();
        empty.add_connection(month, 120, Some(120));
        empty.add_connection(month, 200, Some(300));
        assert_eq!(empty.peak(), (0, None));
        assert!(empty.is_empty());
    }
}
