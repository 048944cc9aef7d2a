//! The figures of one app's month, as reported and priced.

use serde::Serialize;

use crate::plan::AppId;
use crate::time::{Month, Timestamp};

/// One app's usage in one billing month: every figure a rounded integer (SPEC §1.3).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MonthlyUsage {
    /// The app.
    pub app_id: AppId,
    /// The billing month.
    pub month: Month,
    /// Unique users with a successful login in the month (HLL++ estimate, rounded).
    pub mau: u64,
    /// Unique users of the month's busiest calendar day (HLL++ estimate, rounded).
    pub dau_peak: u64,
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
        MonthlyUsage { app_id, month, mau: 0, dau_peak: 0, pcc: 0, pcc_at: None, group_count_peak: 0 }
    }
}
