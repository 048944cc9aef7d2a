//! Whether the worker's clock can be trusted: what the clock probe
//! ([`crate::kafka::clock`]) measured against the broker's, and the time the stages judge
//! events by. Nothing here talks to Kafka.
//!
//! Two decisions of the metering stage read the clock: an event more than
//! `billing.max_clock_skew` ahead of it is dead-lettered as `future`, and partitions that are
//! all idle close months by it. A worker whose own clock is off (a VM resumed, NTP broken)
//! would dead-letter every fresh event (slow) or close months before they end (fast). The
//! worker's clock is trusted while it agrees with the broker's within `billing.max_clock_skew`
//! (give or take half the round trip); beyond, the stages take the broker's time instead (the
//! worker's plus the measured offset), `/readyz` says why, `im_meter_clock_skew_seconds`
//! shows the offset and `ImMeterClockSkew` fires. Until the first answer, and when the last
//! is over two minutes old, idle partitions close nothing.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::metrics::metrics;
use crate::status::now_ms;

/// How long a measurement stays good: past it (the broker unreachable), the clock counts as
/// unchecked again.
const GOOD_FOR: Duration = Duration::from_secs(120);

/// What the probe found, shared with the stages (atomics: read on every poll round).
#[derive(Debug, Default)]
pub struct ClockCheck {
    /// The broker's clock minus the worker's, in milliseconds, at the last measurement.
    offset_ms: AtomicI64,
    /// When (worker clock, ms) the last measurement was taken; 0: never.
    measured_at_ms: AtomicI64,
    /// Whether the offset is beyond `billing.max_clock_skew` (and the round trip's doubt).
    suspect: AtomicBool,
}

impl ClockCheck {
    /// A check that has measured nothing yet.
    pub fn new() -> Arc<Self> {
        Arc::new(ClockCheck::default())
    }

    /// Records a measurement: the broker stamped `broker_ms` between the worker's `sent_ms`
    /// and `answered_ms`. The offset is taken against the midpoint, so it is known to within
    /// half the round trip; it counts as suspect only beyond `max_skew` by more than that.
    pub fn measured(&self, sent_ms: i64, answered_ms: i64, broker_ms: i64, max_skew: Duration) -> i64 {
        let midpoint = sent_ms + (answered_ms - sent_ms) / 2;
        let offset = broker_ms - midpoint;
        let doubt = (answered_ms - sent_ms) / 2;
        let suspect = offset.unsigned_abs() as u128 > max_skew.as_millis() + doubt.unsigned_abs() as u128;
        self.offset_ms.store(offset, Ordering::Relaxed);
        self.measured_at_ms.store(answered_ms.max(1), Ordering::Relaxed);
        self.suspect.store(suspect, Ordering::Relaxed);
        metrics().clock_skew.set(offset as f64 / 1000.0);
        offset
    }

    /// Whether a measurement is recent enough to go by.
    fn checked(&self, now: i64) -> bool {
        let at = self.measured_at_ms.load(Ordering::Relaxed);
        at > 0 && now - at <= GOOD_FOR.as_millis() as i64
    }

    /// The time to judge events by: the worker's clock, or the broker's when the two
    /// disagree by more than allowed.
    pub fn now_ms(&self) -> i64 {
        let local = now_ms();
        if self.suspect.load(Ordering::Relaxed) {
            local + self.offset_ms.load(Ordering::Relaxed)
        } else {
            local
        }
    }

    /// [`Self::now_ms`], but only once the worker's clock was checked recently: what idle
    /// partitions close months by (closing is not undone).
    pub fn checked_now_ms(&self) -> Option<i64> {
        self.checked(now_ms()).then(|| self.now_ms())
    }

    /// Why the clock cannot be trusted, if it cannot (for `/readyz`).
    pub fn problem(&self) -> Option<String> {
        if !self.suspect.load(Ordering::Relaxed) {
            return None;
        }
        let offset = self.offset_ms.load(Ordering::Relaxed);
        Some(format!(
            "clock: this worker's clock is {} s {} the broker's, beyond billing.max_clock_skew; events are judged by the broker's",
            (offset.unsigned_abs() + 500) / 1000,
            if offset > 0 { "behind" } else { "ahead of" }
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SKEW: Duration = Duration::from_secs(300);

    #[test]
    fn a_clock_within_the_allowed_skew_is_trusted_as_it_is() {
        let check = ClockCheck::default();
        assert_eq!(check.checked_now_ms(), None, "unchecked until the broker answers");
        let now = now_ms();
        // 4 min apart, 200 ms round trip: within 5 min.
        assert_eq!(check.measured(now - 200, now, now - 100 + 240_000, SKEW), 240_000);
        assert!(check.problem().is_none());
        let judged = check.checked_now_ms().expect("checked");
        assert!((judged - now_ms()).abs() < 1_000, "the worker's own clock");
    }

    #[test]
    fn a_clock_off_by_more_is_replaced_by_the_brokers() {
        let check = ClockCheck::default();
        let now = now_ms();
        // The worker is 10 min slow: the broker stamps 10 min later than the worker reads.
        check.measured(now - 100, now, now - 50 + 600_000, SKEW);
        let why = check.problem().expect("suspect");
        assert!(why.contains("600 s behind"), "{why}");
        assert!((check.now_ms() - (now_ms() + 600_000)).abs() < 1_000);
        // 2 h fast.
        check.measured(now - 100, now, now - 50 - 7_200_000, SKEW);
        assert!(check.problem().expect("suspect").contains("7200 s ahead of"));
        assert!((check.now_ms() - (now_ms() - 7_200_000)).abs() < 1_000);
    }

    #[test]
    fn a_long_round_trip_is_no_proof_of_skew() {
        let check = ClockCheck::default();
        let now = now_ms();
        // 5 min 1 s off, but the answer took 4 s: it may be 5 min 3 s or 4 min 59 s.
        check.measured(now - 4_000, now, now - 2_000 + 301_000, SKEW);
        assert!(check.problem().is_none());
    }
}
