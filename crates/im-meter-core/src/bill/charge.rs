//! Charges: the line items of one app-month (SPEC §3.1), and [`bill_month`], which prices a
//! month's usage under the subscriptions in force.
//!
//! Every line is computed exactly in [`Decimal`] and rounded once, to cents, half away from
//! zero. Lines come in a fixed order so that output is deterministic.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::pricing::{round_cents, unit_price, PriceBook};
use super::subscription::{Subscriptions, MAX_TRIALS_PER_APP};
use crate::aggregate::{Counted, MonthlyUsage};
use crate::plan::{AppId, BillingMode, Plan};
use crate::time::{Month, Timestamp};

/// The kind of a charge line, in the order lines are emitted.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChargeItem {
    /// The resource plan's monthly fee, charged by day.
    PlanFee,
    /// MAU over the plan's included MAU (current mode).
    MauOverage,
    /// Peak concurrent connections (current mode; free while the promotion runs).
    Pcc,
    /// Started blocks of peak DAU over the quota (original mode).
    DauOverage,
    /// Started blocks of peak group count over the quota (original mode).
    GroupOverage,
    /// Audio/video calls (0.00 during a free trial).
    AvCall,
}

impl ChargeItem {
    /// The id used in `item` and in `charge_id`.
    pub const fn id(self) -> &'static str {
        match self {
            ChargeItem::PlanFee => "plan_fee",
            ChargeItem::MauOverage => "mau_overage",
            ChargeItem::Pcc => "pcc",
            ChargeItem::DauOverage => "dau_overage",
            ChargeItem::GroupOverage => "group_overage",
            ChargeItem::AvCall => "av_call",
        }
    }
}

/// One line item of one app's month, as published (SPEC §3.1).
///
/// `quantity`, `unit_price` and `amount` travel as decimal strings; `amount` always has two
/// decimals.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Charge {
    /// Deterministic idempotency key: `{app_id}/{YYYY-MM}/{item}`.
    pub charge_id: String,
    /// The app billed.
    pub app_id: AppId,
    /// The billing month, `YYYY-MM`.
    pub month: Month,
    /// The billing mode in force at the month's end.
    pub billing_mode: BillingMode,
    /// The plan in force at the month's end.
    pub plan: Plan,
    /// What is charged.
    pub item: ChargeItem,
    /// How many units (days, users, connections, blocks).
    #[serde(with = "rust_decimal::serde::str")]
    pub quantity: Decimal,
    /// USD per unit (for `plan_fee`, one unit: the month's fee, prorated by day).
    #[serde(with = "rust_decimal::serde::str")]
    pub unit_price: Decimal,
    /// USD, rounded to cents half away from zero.
    #[serde(with = "rust_decimal::serde::str")]
    pub amount: Decimal,
    /// Always `USD`.
    pub currency: String,
    /// A human sentence saying how the amount was computed.
    pub description: String,
}

/// A unique-user figure as a description shows it: the number, and for an estimate, that it
/// is one and its relative standard error.
fn figure(n: u64, counted: Counted) -> String {
    match counted {
        Counted::Exact => n.to_string(),
        Counted::Estimated(precision) => format!(
            "{n} (HyperLogLog++ estimate, relative standard error {:.2} %)",
            precision.standard_error() * 100.0
        ),
    }
}

/// What every line of one app-month shares.
struct Head {
    app_id: AppId,
    month: Month,
    plan: Plan,
}

impl Head {
    fn charge(
        &self,
        item: ChargeItem,
        quantity: u64,
        unit: Decimal,
        amount: Decimal,
        description: String,
    ) -> Charge {
        Charge {
            charge_id: format!("{}/{}/{}", self.app_id, self.month, item.id()),
            app_id: self.app_id,
            month: self.month,
            billing_mode: self.plan.mode(),
            plan: self.plan,
            item,
            quantity: Decimal::from(quantity),
            unit_price: unit_price(unit),
            amount: round_cents(amount),
            currency: "USD".to_string(),
            description,
        }
    }

    /// A line priced `quantity × unit`.
    fn priced(&self, item: ChargeItem, quantity: u64, unit: Decimal, description: String) -> Charge {
        let amount = Decimal::from(quantity).saturating_mul(unit);
        self.charge(item, quantity, unit, amount, description)
    }
}

/// The charges of one app-month, in the order plan_fee, mau_overage, pcc, dau_overage,
/// group_overage, av_call. Months and days are those of `subs`' time zone.
///
/// The billing mode, plan, quotas and overage of the month are those in force at its end
/// (a migration filed this month takes effect next month, so this month stays original).
/// An app created after the month gets nothing.
pub fn bill_month(subs: &Subscriptions, usage: &MonthlyUsage, prices: &PriceBook) -> Vec<Charge> {
    let (app_id, month) = (usage.app_id, usage.month);
    let Some(plan) = subs.plan_at_month_end(app_id, month) else {
        return Vec::new();
    };
    let head = Head { app_id, month, plan };
    let mut charges: Vec<Charge> = plan_fee(subs, &head).into_iter().collect();

    // Free plans (Developer, Free) have no out-of-plan charges: Developer's MAU cap is an
    // alert, raised elsewhere.
    if plan.is_paid() {
        match plan.mode() {
            BillingMode::Current => {
                let over = usage.mau.saturating_sub(plan.included_mau());
                if over > 0 {
                    let description = format!(
                        "MAU {} over the {} included in {}: {over} × {} USD",
                        figure(usage.mau, usage.mau_counted),
                        plan.included_mau(),
                        plan.name(),
                        unit_price(prices.mau_overage)
                    );
                    charges.push(head.priced(ChargeItem::MauOverage, over, prices.mau_overage, description));
                }
                // Always emitted, so invoices show PCC usage even while it is free.
                let unit = prices.pcc_unit_price(subs.tz(), month);
                let description = if prices.pcc_promotion_applies(subs.tz(), month) {
                    format!(
                        "Peak concurrent connections {}: 0.00 USD under the promotion \"{}\" (list price {} USD per connection)",
                        usage.pcc,
                        prices.pcc_promotion_name,
                        unit_price(prices.pcc_list_price)
                    )
                } else {
                    format!("Peak concurrent connections {} × {} USD", usage.pcc, unit_price(unit))
                };
                charges.push(head.priced(ChargeItem::Pcc, usage.pcc, unit, description));
            }
            BillingMode::Original => {
                let blocks = [
                    (
                        ChargeItem::DauOverage,
                        "Peak DAU",
                        figure(usage.dau_peak, usage.dau_peak_counted),
                        usage.dau_peak,
                        plan.included_dau(),
                        prices.dau_block_size,
                        prices.dau_block_price,
                    ),
                    (
                        ChargeItem::GroupOverage,
                        "Peak group count",
                        usage.group_count_peak.to_string(),
                        usage.group_count_peak,
                        plan.included_groups(),
                        prices.group_block_size,
                        prices.group_block_price,
                    ),
                ];
                for (item, what, shown, peak, quota, size, price) in blocks {
                    // A zero block size is a configuration error; count single units rather
                    // than divide by zero.
                    let size = size.max(1);
                    let over = peak.saturating_sub(quota);
                    if over > 0 {
                        let n = over.div_ceil(size);
                        let description = format!(
                            "{what} {shown} over the {quota} included in {}: {n} started block(s) of {size} × {} USD",
                            plan.name(),
                            unit_price(price)
                        );
                        charges.push(head.priced(item, n, price, description));
                    }
                }
            }
        }
    }

    charges.extend(av_call(subs, &head));
    charges
}

/// The plan fee, charged by day: each calendar day goes to the plan in force at its end
/// (free if the app did not exist then); `Σ fee × days_on_plan / days_in_month`, summed
/// exactly and rounded once, billed as one unit at that price. `None` when nothing is owed.
fn plan_fee(subs: &Subscriptions, head: &Head) -> Option<Charge> {
    let days = head.month.days();
    // Runs of consecutive days on the same plan; `None` = the app did not exist.
    let mut runs: Vec<(Option<Plan>, u32)> = Vec::new();
    for day in (1..=days).filter_map(|d| head.month.day(d)) {
        let plan = subs.plan_on(head.app_id, day);
        match runs.last_mut() {
            Some((p, n)) if *p == plan => *n += 1,
            _ => runs.push((plan, 1)),
        }
    }
    let paid: Vec<(Plan, u32)> =
        runs.into_iter().filter_map(|(p, n)| p.filter(|p| p.is_paid()).map(|p| (p, n))).collect();
    // One division by the month's length keeps the sum exact until the single rounding.
    let numerator: Decimal = paid.iter().map(|(p, n)| p.monthly_fee() * Decimal::from(*n)).sum();
    let total = numerator / Decimal::from(days);
    if total <= Decimal::ZERO {
        return None;
    }
    let segment =
        |p: Plan, n: u32| format!("{n} of {days} days ({} × {n}/{days})", unit_price(p.monthly_fee()));
    let description = match paid.as_slice() {
        [(p, n)] => format!("{} plan fee, {}", p.name(), segment(*p, *n)),
        _ => {
            let parts: Vec<String> =
                paid.iter().map(|(p, n)| format!("{} {}", p.name(), segment(*p, *n))).collect();
            format!("Plan fee by day: {}", parts.join(" + "))
        }
    };
    // One unit, the month's prorated fee: amount = quantity × unit price holds to the cent,
    // as invoice systems check; the days and plans are in the description.
    let fee = round_cents(total);
    Some(head.charge(ChargeItem::PlanFee, 1, fee, fee, description))
}

/// The `av_call` line of a month overlapping a free trial: quantity = the month's calendar
/// days overlapping a trial, 0.00.
///
/// Emitted on any plan, Developer and Free included: the trial is a value-added service
/// separate from the resource plan, and the invoice names it (SPEC §1.1). Outside trials
/// there is no line even if `PriceBook::av_call_price` is set: no call-usage metric exists
/// to price yet.
fn av_call(subs: &Subscriptions, head: &Head) -> Option<Charge> {
    let tz = subs.tz();
    let trials: Vec<_> = subs.trials_in(head.app_id, head.month).collect();
    if trials.is_empty() {
        return None;
    }
    let days = (1..=head.month.days())
        .filter_map(|d| head.month.day(d))
        .filter(|day| {
            let date = day.date();
            let (start, end) = (tz.start_of_date(date), tz.start_of_date(date.succ_opt().unwrap_or(date)));
            trials.iter().any(|t| t.start < end && start < t.end)
        })
        .count() as u64;
    let names: Vec<String> = trials
        .iter()
        .map(|t| {
            format!(
                "free trial {} of {MAX_TRIALS_PER_APP}, {} – {}",
                t.number,
                tz.date_of(t.start),
                tz.date_of(Timestamp(t.end.0 - 1))
            )
        })
        .collect();
    let description = format!("Audio/video call {}", names.join("; "));
    Some(head.charge(ChargeItem::AvCall, days, Decimal::ZERO, Decimal::ZERO, description))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bill::subscription::tests::{changed, created, migrated, trial, ts};
    use crate::time::BillingTz;

    const APP: AppId = 1_400_000_001;

    fn nov() -> Month {
        "2026-11".parse().unwrap()
    }

    fn subs_with(events: &[crate::ingest::SubscriptionEvent]) -> Subscriptions {
        let mut subs = Subscriptions::new(BillingTz::default());
        for e in events {
            subs.apply(e).unwrap();
        }
        subs
    }

    fn usage(month: Month, f: impl FnOnce(&mut MonthlyUsage)) -> MonthlyUsage {
        let mut u = MonthlyUsage::empty(APP, month);
        f(&mut u);
        u
    }

    /// (item, quantity, unit_price, amount) as strings, for compact assertions. Every line
    /// must also hold as invoice systems check it: amount = quantity × unit price, to the cent.
    fn lines(charges: &[Charge]) -> Vec<(&'static str, String, String, String)> {
        for c in charges {
            assert_eq!(round_cents(c.quantity * c.unit_price), c.amount, "{c:?}");
        }
        charges
            .iter()
            .map(|c| (c.item.id(), c.quantity.to_string(), c.unit_price.to_string(), c.amount.to_string()))
            .collect()
    }

    fn line(item: &'static str, q: &str, u: &str, a: &str) -> (&'static str, String, String, String) {
        (item, q.into(), u.into(), a.into())
    }

    #[test]
    fn standard_all_month_with_mau_overage() {
        let subs = subs_with(&[
            created(APP, "2026-01-01T00:00:00+08:00", None),
            changed(APP, "2026-10-01T00:00:00+08:00", Plan::Standard),
        ]);
        let charges =
            bill_month(&subs, &usage(nov(), |u| (u.mau, u.pcc) = (23_457, 57)), &PriceBook::default());
        assert_eq!(
            lines(&charges),
            vec![
                line("plan_fee", "1", "399.00", "399.00"),
                line("mau_overage", "13457", "0.015", "201.86"),
                line("pcc", "57", "0.00", "0.00"),
            ]
        );
        let pcc = &charges[2];
        assert!(
            pcc.description.contains("PCC free for a limited time") && pcc.description.contains("0.20"),
            "{}",
            pcc.description
        );
        assert_eq!(charges[0].charge_id, "1400000001/2026-11/plan_fee");
        assert_eq!(charges[0].description, "Standard plan fee, 30 of 30 days (399.00 × 30/30)");
        assert!(charges.iter().all(|c| c.billing_mode == BillingMode::Current && c.plan == Plan::Standard));
    }

    #[test]
    fn developer_to_premium_mid_month_is_charged_by_day() {
        let subs = subs_with(&[changed(APP, "2026-11-11T10:00:00+08:00", Plan::Premium)]);
        let charges = bill_month(&subs, &usage(nov(), |u| u.mau = 10_300), &PriceBook::default());
        assert_eq!(
            lines(&charges),
            vec![
                line("plan_fee", "1", "466.00", "466.00"),
                line("mau_overage", "300", "0.015", "4.50"),
                line("pcc", "0", "0.00", "0.00"),
            ]
        );
        assert_eq!(charges[0].description, "Premium plan fee, 20 of 30 days (699.00 × 20/30)");
    }

    #[test]
    fn paid_to_paid_segments_are_summed_exactly_and_rounded_once() {
        // Standard 10 days (Nov 1–10), Premium 20 days: 399 × 10/30 + 699 × 20/30 = 599.
        let subs = subs_with(&[
            created(APP, "2026-01-01T00:00:00+08:00", None),
            changed(APP, "2026-10-01T00:00:00+08:00", Plan::Standard),
            changed(APP, "2026-11-11T09:00:00+08:00", Plan::Premium),
        ]);
        let charges = bill_month(&subs, &usage(nov(), |_| ()), &PriceBook::default());
        assert_eq!(charges[0].amount.to_string(), "599.00");
        assert_eq!(
            (charges[0].quantity.to_string(), charges[0].unit_price.to_string()),
            ("1".into(), "599.00".into())
        );
        assert_eq!(
            charges[0].description,
            "Plan fee by day: Standard 10 of 30 days (399.00 × 10/30) + Premium 20 of 30 days (699.00 × 20/30)"
        );
        // Pro for 7 days of a 30-day month: 449.99 × 7/30 = 104.99766… → 105.00.
        let subs = subs_with(&[
            created(APP, "2021-05-01T00:00:00+08:00", None),
            changed(APP, "2026-11-24T08:00:00+08:00", Plan::Pro),
        ]);
        let charges = bill_month(&subs, &usage(nov(), |_| ()), &PriceBook::default());
        assert_eq!(lines(&charges), vec![line("plan_fee", "1", "105.00", "105.00")]);
    }

    #[test]
    fn original_pro_with_dau_and_group_overage() {
        let subs = subs_with(&[
            created(APP, "2021-05-01T00:00:00+08:00", None),
            changed(APP, "2021-06-01T00:00:00+08:00", Plan::Pro),
        ]);
        let u = usage(nov(), |u| {
            u.dau_peak = 31_000;
            u.group_count_peak = 100_001;
            u.mau = 50_000;
            u.pcc = 900;
        });
        let charges = bill_month(&subs, &u, &PriceBook::default());
        assert_eq!(
            lines(&charges),
            vec![
                line("plan_fee", "1", "449.99", "449.99"),
                line("dau_overage", "3", "449.99", "1349.97"),
                line("group_overage", "1", "449.99", "449.99"),
            ]
        );
        assert!(charges.iter().all(|c| c.billing_mode == BillingMode::Original && c.plan == Plan::Pro));
    }

    /// A stray trial dated before the app's creation, read first, does not unmake the
    /// creation: the app is an original-mode Pro app and pays for its groups.
    #[test]
    fn a_stray_event_before_the_creation_does_not_unmake_it() {
        let subs = subs_with(&[
            trial(APP, "2020-03-01T00:00:00+08:00", Some("acct")),
            created(APP, "2021-05-01T00:00:00+08:00", Some("acct")),
            changed(APP, "2021-06-01T00:00:00+08:00", Plan::Pro),
        ]);
        let u = usage(nov(), |u| u.group_count_peak = 300_000);
        let charges = bill_month(&subs, &u, &PriceBook::default());
        let total: Decimal = charges.iter().map(|c| c.amount).sum();
        assert_eq!(total.to_string(), "1349.97", "{:?}", lines(&charges));
        assert!(charges.iter().all(|c| c.billing_mode == BillingMode::Original && c.plan == Plan::Pro));
    }

    #[test]
    fn free_plans_have_no_charges() {
        let busy =
            |m| usage(m, |u| (u.mau, u.pcc, u.dau_peak, u.group_count_peak) = (500, 40, 20_000, 300_000));
        let developer = subs_with(&[created(APP, "2026-01-01T00:00:00+08:00", None)]);
        assert!(bill_month(&developer, &busy(nov()), &PriceBook::default()).is_empty());
        let free = subs_with(&[created(APP, "2021-05-01T00:00:00+08:00", None)]);
        assert!(bill_month(&free, &busy(nov()), &PriceBook::default()).is_empty());
        // A month before the app's creation is not billed.
        let later = subs_with(&[
            created(APP, "2026-12-05T00:00:00+08:00", None),
            changed(APP, "2026-12-06T00:00:00+08:00", Plan::Standard),
        ]);
        assert!(bill_month(&later, &busy(nov()), &PriceBook::default()).is_empty());
    }

    #[test]
    fn paid_app_without_usage_gets_its_plan_fee_and_pcc_line() {
        let subs = subs_with(&[changed(APP, "2026-10-15T00:00:00+08:00", Plan::Premium)]);
        let charges = bill_month(&subs, &usage(nov(), |_| ()), &PriceBook::default());
        assert_eq!(
            lines(&charges),
            vec![line("plan_fee", "1", "699.00", "699.00"), line("pcc", "0", "0.00", "0.00")]
        );
    }

    #[test]
    fn overage_rounds_half_away_from_zero() {
        // 3 × 0.015 = 0.045 → 0.05 (banker's rounding would give 0.04).
        let subs = subs_with(&[changed(APP, "2026-10-15T00:00:00+08:00", Plan::Standard)]);
        let charges = bill_month(&subs, &usage(nov(), |u| u.mau = 10_003), &PriceBook::default());
        assert_eq!(lines(&charges[1..2]), vec![line("mau_overage", "3", "0.015", "0.05")]);
    }

    /// An estimated figure says so on its line, with the sketch's relative standard error;
    /// an exact one is just the number.
    #[test]
    fn an_estimated_figure_states_its_error_on_the_bill() {
        let estimated = Counted::Estimated(crate::aggregate::Precision::default());
        let standard = subs_with(&[changed(APP, "2026-10-15T00:00:00+08:00", Plan::Standard)]);
        for (counted, shown) in [
            (Counted::Exact, "MAU 12000 over"),
            (estimated, "MAU 12000 (HyperLogLog++ estimate, relative standard error 0.81 %) over"),
        ] {
            let u = usage(nov(), |u| (u.mau, u.mau_counted) = (12_000, counted));
            let charges = bill_month(&standard, &u, &PriceBook::default());
            assert!(charges[1].description.starts_with(shown), "{}", charges[1].description);
        }
        let pro = subs_with(&[
            created(APP, "2021-05-01T00:00:00+08:00", None),
            changed(APP, "2021-06-01T00:00:00+08:00", Plan::Pro),
        ]);
        let u = usage(nov(), |u| (u.dau_peak, u.dau_peak_counted) = (12_000, estimated));
        let charges = bill_month(&pro, &u, &PriceBook::default());
        assert!(
            charges[1]
                .description
                .starts_with("Peak DAU 12000 (HyperLogLog++ estimate, relative standard error 0.81 %)"),
            "{}",
            charges[1].description
        );
    }

    #[test]
    fn pcc_list_price_after_the_promotion() {
        let subs = subs_with(&[changed(APP, "2026-10-15T00:00:00+08:00", Plan::Standard)]);
        let prices =
            PriceBook { pcc_promotion_end: Some(ts("2026-11-01T00:00:00+08:00")), ..PriceBook::default() };
        let charges = bill_month(&subs, &usage(nov(), |u| u.pcc = 1_234), &prices);
        assert_eq!(
            lines(&charges),
            vec![line("plan_fee", "1", "399.00", "399.00"), line("pcc", "1234", "0.20", "246.80")]
        );
        assert_eq!(charges[1].description, "Peak concurrent connections 1234 × 0.20 USD");
    }

    #[test]
    fn migration_bills_original_this_month_and_current_from_the_next() {
        let subs = subs_with(&[
            created(APP, "2021-05-01T00:00:00+08:00", None),
            changed(APP, "2021-06-01T00:00:00+08:00", Plan::Pro),
            migrated(APP, "2026-11-15T12:00:00+08:00", Plan::Standard),
        ]);
        let u = |m| usage(m, |u| (u.mau, u.dau_peak) = (12_000, 12_000));
        let nov_charges = bill_month(&subs, &u(nov()), &PriceBook::default());
        assert_eq!(
            lines(&nov_charges),
            vec![line("plan_fee", "1", "449.99", "449.99"), line("dau_overage", "1", "449.99", "449.99")]
        );
        assert_eq!(nov_charges[0].billing_mode, BillingMode::Original);
        let dec_charges = bill_month(&subs, &u(nov().next()), &PriceBook::default());
        assert_eq!(
            lines(&dec_charges),
            vec![
                line("plan_fee", "1", "399.00", "399.00"),
                line("mau_overage", "2000", "0.015", "30.00"),
                line("pcc", "0", "0.00", "0.00")
            ]
        );
        assert_eq!(dec_charges[0].billing_mode, BillingMode::Current);
    }

    #[test]
    fn av_call_trial_line_counts_trial_days_of_the_month() {
        let subs = subs_with(&[
            created(APP, "2026-01-01T00:00:00+08:00", Some("acct")),
            trial(APP, "2026-11-03T10:00:00+08:00", None),
        ]);
        let u = |m| usage(m, |_| ());
        let charges = bill_month(&subs, &u(nov()), &PriceBook::default());
        assert_eq!(lines(&charges), vec![line("av_call", "28", "0.00", "0.00")]);
        assert_eq!(charges[0].description, "Audio/video call free trial 1 of 2, 2026-11-03 – 2027-01-02");
        assert_eq!(
            lines(&bill_month(&subs, &u(nov().next()), &PriceBook::default())),
            vec![line("av_call", "31", "0.00", "0.00")]
        );
        let jan = nov().next().next();
        assert_eq!(
            lines(&bill_month(&subs, &u(jan), &PriceBook::default())),
            vec![line("av_call", "2", "0.00", "0.00")]
        );
        // Outside trials: no line, even with a price configured.
        let priced = PriceBook { av_call_price: Some(Decimal::new(5, 1)), ..PriceBook::default() };
        assert!(bill_month(&subs, &u(jan.next()), &priced).is_empty());
    }

    #[test]
    fn charge_json_round_trip_uses_decimal_strings() {
        let subs = subs_with(&[changed(APP, "2026-11-11T10:00:00+08:00", Plan::Premium)]);
        let charges = bill_month(&subs, &usage(nov(), |u| u.mau = 10_300), &PriceBook::default());
        let json = serde_json::to_value(&charges[1]).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "charge_id": "1400000001/2026-11/mau_overage",
                "app_id": 1_400_000_001u64,
                "month": "2026-11",
                "billing_mode": "current",
                "plan": "premium",
                "item": "mau_overage",
                "quantity": "300",
                "unit_price": "0.015",
                "amount": "4.50",
                "currency": "USD",
                "description": "MAU 10300 over the 10000 included in Premium: 300 × 0.015 USD",
            })
        );
        let text = serde_json::to_string(&charges).unwrap();
        assert!(text.contains(r#""amount":"466.00""#), "{text}");
        let back: Vec<Charge> = serde_json::from_str(&text).unwrap();
        assert_eq!(back, charges);
        assert_eq!(back[0].amount.to_string(), "466.00");
    }
}
