//! Quota alerts (SPEC §3.3): a Developer app past its 100-MAU cap.
//!
//! The Developer plan has no out-of-plan charge; passing the cap is something the backend
//! must enforce, so the pipeline raises an alert (once per app and month) instead of a charge.

use serde::{Deserialize, Serialize};

use super::subscription::Subscriptions;
use crate::aggregate::MonthlyUsage;
use crate::plan::{AppId, Plan};
use crate::time::Month;

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

/// The alert due for an app-month: its plan at the month's end is Developer and its MAU is
/// over the cap. For a month in progress, pass month-to-date usage.
pub fn quota_alert(subs: &Subscriptions, usage: &MonthlyUsage) -> Option<QuotaAlert> {
    let plan = subs.plan_at_month_end(usage.app_id, usage.month)?;
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
        usage.mau = 100;
        assert_eq!(quota_alert(&subs, &usage), None);
        usage.mau = 101;
        let alert = quota_alert(&subs, &usage).unwrap();
        assert_eq!(alert.alert_id, "1/2026-11/quota_exceeded");
        assert_eq!((alert.mau, alert.quota), (101, 100));
        let upgrade = decode_subscription_event(
            br#"{"type":"plan_changed","app_id":1,"ts":"2026-11-20T00:00:00+08:00","plan":"standard"}"#,
        )
        .unwrap();
        subs.apply(&upgrade).unwrap();
        assert_eq!(quota_alert(&subs, &usage), None);
    }
}
