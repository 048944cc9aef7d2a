//! A month-end projection of an open month's usage, for the usage API's projected bill.
//!
//! How: MAU grows with time, so the month-to-date MAU is extrapolated linearly over the
//! month (`mau × month length / elapsed`, elapsed counted as at least one day, so that the
//! first hours do not explode); peaks (PCC, peak DAU, peak group count) are kept as they
//! are so far, since a peak already reached stays the month's at least and nothing says it
//! will be beaten. The projected usage is then priced like any month ([`super::bill_month`]).
//! A deliberately simple, stated rule: it over-projects apps whose users return all month
//! and under-projects apps that grow.

use crate::aggregate::MonthlyUsage;

/// The usage `so_far`, measured over `elapsed_ms` of a month `month_ms` long, projected to
/// the month's end. Past the end (or over a whole month) it is `so_far` unchanged.
pub fn project_month_end(so_far: &MonthlyUsage, elapsed_ms: i64, month_ms: i64) -> MonthlyUsage {
    const DAY_MS: i64 = 86_400_000;
    let month_ms = month_ms.max(1);
    let elapsed_ms = elapsed_ms.clamp(DAY_MS.min(month_ms), month_ms);
    // Integer arithmetic, rounded half up: the same inputs always give the same projection.
    let mau = (u128::from(so_far.mau) * month_ms as u128 * 2 + elapsed_ms as u128) / (2 * elapsed_ms as u128);
    MonthlyUsage { mau: u64::try_from(mau).unwrap_or(u64::MAX), ..so_far.clone() }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400_000;

    fn so_far(mau: u64) -> MonthlyUsage {
        MonthlyUsage { mau, pcc: 40, dau_peak: 9, ..MonthlyUsage::empty(1, "2026-11".parse().unwrap()) }
    }

    #[test]
    fn mau_is_extrapolated_and_peaks_are_kept() {
        let p = project_month_end(&so_far(100), 10 * DAY, 30 * DAY);
        assert_eq!((p.mau, p.pcc, p.dau_peak), (300, 40, 9));
        assert_eq!(project_month_end(&so_far(7), 20 * DAY, 30 * DAY).mau, 11, "10.5 rounds up");
    }

    #[test]
    fn the_first_day_counts_as_a_whole_day_and_a_closed_month_is_not_projected() {
        assert_eq!(project_month_end(&so_far(10), 60_000, 30 * DAY).mau, 300);
        assert_eq!(project_month_end(&so_far(10), 0, 30 * DAY).mau, 300);
        assert_eq!(project_month_end(&so_far(10), 45 * DAY, 30 * DAY).mau, 10);
    }
}
