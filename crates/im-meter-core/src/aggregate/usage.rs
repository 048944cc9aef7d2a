//! The figures of one app's month, as reported and priced.

use serde::Serialize;

use super::unique::Counted;
use crate::plan::AppId;
use crate::time::{Month, Timestamp};

/// One app's usage in one billing month: every figure a rounded integer (SPEC §1.3).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MonthlyUsage {
    /// The app.
    pub app_id: AppId,
    /// The billing month.
    pub month: Month,
    /// Unique users with a successful login in the month.
    pub mau: u64,
    /// Whether `mau` is exact or an HLL++ estimate (rounded).
    #[serde(skip)]
    pub mau_counted: Counted,
    /// Unique users of the month's busiest calendar day.
    pub dau_peak: u64,
    /// Whether `dau_peak` is exact (every day's count is) or an estimate.
    #[serde(skip)]
    pub dau_peak_counted: Counted,
    /// Peak concurrent connections over the month's sample instants.
    pub pcc: u64,
    /// The first sample instant at which `pcc` was reached (`None` when `pcc` is 0).
    pub pcc_at: Option<Timestamp>,
    /// Peak of the `group_stats` samples dated in the month.
    pub group_count_peak: u64,
}

impl MonthlyUsage {
    /// A month with no usage at all.
    pub fn empty(app_id: AppId, month: Month) -> Self {
        MonthlyUsage {
            app_id,
            month,
            mau: 0,
            mau_counted: Counted::Exact,
            dau_peak: 0,
            dau_peak_counted: Counted::Exact,
            pcc: 0,
            pcc_at: None,
            group_count_peak: 0,
        }
    }
}
