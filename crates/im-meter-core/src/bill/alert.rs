//! Quota alerts (SPEC §3.3): a Developer app past its 100-MAU cap.
//!
//! The Developer plan has no out-of-plan charge; passing the cap is something the backend
//! must enforce, so the pipeline raises an alert (once per app and month) instead of a charge.
//!
//! Whether an app was a Developer app when it passed the cap is decided by the plan of the
//! day it did ([`Subscriptions::plan_on`]: the plan at the day's end, as the plan fee counts
//! days), that day being a function of the month's logins, not of their order
//! ([`crate::aggregate::AppMonthAggregate::day_passing`]). The plan at the month's end would
//! let an upgrade after the crossing take back an alert the worker raised when it happened.

use serde::{Deserialize, Serialize};

use super::subscription::Subscriptions;
use crate::aggregate::MonthlyUsage;
use crate::plan::{AppId, Plan};
use crate::time::{Day, Month};

/// `quota_exceeded`: an app's MAU passed the hard cap of its free plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaAlert {
    /// Deterministic idempotency key: `{app_id}/{YYYY-MM}/quota_exceeded`.
    pub alert_id: String,
    /// The app.
    pub app_id: AppId,
    /// The month (`YYYY-MM` in JSON).
    pub month: Month,
    /// The plan whose cap was passed.
    pub plan: Plan,
    /// The MAU that passed it.
    pub mau: u64,
    /// The cap.
    pub quota: u64,
}

/// The alert due for an app-month whose users passed the cap on `crossed_on`: the app was on
/// Developer that day and its MAU is over the cap. For a month in progress, pass
/// month-to-date usage.
pub fn quota_alert(subs: &Subscriptions, usage: &MonthlyUsage, crossed_on: Day) -> Option<QuotaAlert> {
    let plan = subs.plan_on(usage.app_id, crossed_on)?;
    let quota = plan.included_mau();
    (plan == Plan::Developer && usage.mau > quota).then(|| QuotaAlert {
        alert_id: alert_id(usage.app_id, usage.month),
        app_id: usage.app_id,
        month: usage.month,
        plan,
        mau: usage.mau,
        quota,
    })
}

fn alert_id(app_id: AppId, month: Month) -> String {
    format!("{app_id}/{month}/quota_exceeded")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::decode_subscription_event;
    use crate::time::BillingTz;

    #[test]
    fn developer_apps_over_the_cap_alert_and_paid_ones_do_not() {
        let mut subs = Subscriptions::new(BillingTz::default());
        let nov: Month = "2026-11".parse().unwrap();
        let mut usage = MonthlyUsage::empty(1, nov);
        let (nov_5, nov_20) = (nov.day(5).unwrap(), nov.day(20).unwrap());
        usage.mau = 100;
        assert_eq!(quota_alert(&subs, &usage, nov_5), None);
        usage.mau = 101;
        let alert = quota_alert(&subs, &usage, nov_5).unwrap();
        assert_eq!(alert.alert_id, "1/2026-11/quota_exceeded");
        assert_eq!((alert.mau, alert.quota), (101, 100));
        let upgrade = decode_subscription_event(
            br#"{"type":"plan_changed","app_id":1,"ts":"2026-11-20T00:00:00+08:00","plan":"standard"}"#,
        )
        .unwrap();
        subs.apply(&upgrade).unwrap();
        assert!(quota_alert(&subs, &usage, nov_5).is_some(), "a Developer app on the day it passed the cap");
        assert_eq!(quota_alert(&subs, &usage, nov_20), None, "Standard from November 20");
    }
}
