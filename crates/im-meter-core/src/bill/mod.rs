//! Bill: subscriptions and monthly usage → charges in exact decimal money.
//!
//! - [`subscription`]: the subscription book — plans, billing modes, migrations and
//!   audio/video call trials over time, with every rule of SPEC §1.1/§1.2 checked on apply.
//! - [`subscription_log`]: every subscriptions record read and the book derived from them,
//!   late where read after its month was billed: what billing and the usage API both keep.
//! - [`pricing`]: the [`PriceBook`] (out-of-plan rates, the PCC promotion) and the rounding
//!   rule (cents, half away from zero).
//! - [`charge`]: [`Charge`] lines (SPEC §3.1) and [`bill_month`], which prices one
//!   app-month.
//! - [`alert`]: quota alerts for Developer apps past their MAU cap.
//! - [`projection`]: an open month's usage projected to its end.
//! - [`book`]: the [`BillingBook`] of one billing partition: usage shares and marks in,
//!   the next billable month, and each month's bill out.
//! - [`publish`]: what each transaction of a month's bill writes ([`BillPart`]).
//!
//! ```
//! use im_meter_core::aggregate::MonthlyUsage;
//! use im_meter_core::bill::{bill_month, PriceBook, Subscriptions};
//! use im_meter_core::ingest::decode_subscription_event;
//! use im_meter_core::time::BillingTz;
//!
//! let mut subs = Subscriptions::new(BillingTz::default());
//! let ev = decode_subscription_event(
//!     br#"{"type":"plan_changed","app_id":7,"ts":"2026-11-11T10:00:00+08:00","plan":"premium"}"#,
//! )
//! .unwrap();
//! subs.apply(&ev).unwrap();
//! let mut usage = MonthlyUsage::empty(7, "2026-11".parse().unwrap());
//! usage.mau = 10_300;
//! let charges = bill_month(&subs, &usage, &PriceBook::default());
//! assert_eq!(charges[0].amount.to_string(), "466.00"); // 699 × 20/30
//! assert_eq!(charges[1].amount.to_string(), "4.50"); // 300 × 0.015
//! ```

pub mod alert;
pub mod book;
pub mod charge;
pub mod pricing;
pub mod projection;
pub mod publish;
pub mod subscription;
pub mod subscription_log;

pub use alert::{quota_alert, QuotaAlert};
pub use book::{BilledMonth, BilledPositions, BillingBook, BookError, Pricing, RefusedShare, Share, CARRIED};
pub use charge::{bill_month, Charge, ChargeItem};
pub use pricing::{round_cents, PriceBook};
pub use projection::project_month_end;
pub use publish::BillPart;
pub use subscription::{
    Subscriptions, Trial, MAX_TRIALS_PER_APP, MAX_TRIAL_APPS_PER_ACCOUNT, TRIAL_LENGTH_MS,
};
pub use subscription_log::{SubscriptionLog, SubscriptionRecord, TopicRead};
