//! The price book (rates that are not part of a plan) and the money rounding rule.
//!
//! Plan fees and quotas belong to [`crate::plan::Plan`]; everything here may be set by
//! configuration. All money is [`Decimal`], never floating point (SPEC §1.3).

use rust_decimal::{Decimal, RoundingStrategy};

use crate::time::{BillingTz, Month, Timestamp};

/// Out-of-plan rates, effective-dated promotions and block sizes.
///
/// `Default` is the published price list of SPEC §1.1 and §1.2.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PriceBook {
    /// USD per MAU over the plan's included MAU (current mode).
    pub mau_overage: Decimal,
    /// List price in USD per connection of the month's PCC (current mode).
    pub pcc_list_price: Decimal,
    /// The promotion that makes PCC free, as named on invoices.
    pub pcc_promotion_name: String,
    /// When the PCC promotion ends (`None`: open-ended).
    pub pcc_promotion_end: Option<Timestamp>,
    /// USD per started block of `dau_block_size` peak DAU over the quota (original mode).
    pub dau_block_price: Decimal,
    /// Users in one DAU overage block.
    pub dau_block_size: u64,
    /// USD per started block of `group_block_size` groups over the quota (original mode).
    pub group_block_price: Decimal,
    /// Groups in one group-count overage block.
    pub group_block_size: u64,
    /// Price of audio/video calls outside a free trial (`None`: unpriced beta).
    ///
    /// No usage metric for calls exists yet, so even when set no `av_call` line is emitted
    /// outside trials; the field is here so configuration stays stable when one does.
    pub av_call_price: Option<Decimal>,
}

impl Default for PriceBook {
    fn default() -> Self {
        PriceBook {
            mau_overage: Decimal::new(15, 3),
            pcc_list_price: Decimal::new(20, 2),
            pcc_promotion_name: "PCC free for a limited time".to_string(),
            pcc_promotion_end: None,
            dau_block_price: Decimal::new(44_999, 2),
            dau_block_size: 10_000,
            group_block_price: Decimal::new(44_999, 2),
            group_block_size: 100_000,
            av_call_price: None,
        }
    }
}

impl PriceBook {
    /// Whether the PCC promotion prices `month` at zero.
    ///
    /// Decision: a month's PCC is one figure (its peak), so it gets one price; the
    /// promotion applies when it is still in force at the month's first instant
    /// (`pcc_promotion_end > start_of_month`). A promotion ending mid-month therefore
    /// covers that whole month, and the list price applies from the next one.
    pub fn pcc_promotion_applies(&self, tz: &BillingTz, month: Month) -> bool {
        match self.pcc_promotion_end {
            None => true,
            Some(end) => end > tz.start_of_month(month),
        }
    }

    /// The unit price of the month's PCC: zero under the promotion, else the list price.
    pub fn pcc_unit_price(&self, tz: &BillingTz, month: Month) -> Decimal {
        if self.pcc_promotion_applies(tz, month) {
            Decimal::ZERO
        } else {
            self.pcc_list_price
        }
    }
}

/// Rounds a charge line to cents, half away from zero, and shows exactly two decimals
/// (`466` → `466.00`, `201.855` → `201.86`).
pub fn round_cents(amount: Decimal) -> Decimal {
    let mut cents = amount.round_dp_with_strategy(2, RoundingStrategy::MidpointAwayFromZero);
    cents.rescale(2);
    cents
}

/// A unit price as shown on a charge: its natural scale, but at least cents
/// (`399` → `399.00`, `0.015` stays `0.015`).
pub fn unit_price(price: Decimal) -> Decimal {
    let mut shown = price.normalize();
    if shown.scale() < 2 {
        shown.rescale(2);
    }
    shown
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_is_half_away_from_zero_with_two_decimals() {
        let d = |s: &str| s.parse::<Decimal>().unwrap();
        assert_eq!(round_cents(d("201.855")).to_string(), "201.86");
        // Banker's rounding would give 0.04 and -0.04.
        assert_eq!(round_cents(d("0.045")).to_string(), "0.05");
        assert_eq!(round_cents(d("-0.045")).to_string(), "-0.05");
        assert_eq!(round_cents(d("0.0449999")).to_string(), "0.04");
        assert_eq!(round_cents(d("466")).to_string(), "466.00");
        assert_eq!(round_cents(Decimal::ZERO).to_string(), "0.00");
        assert_eq!(unit_price(d("399")).to_string(), "399.00");
        assert_eq!(unit_price(d("0.0150")).to_string(), "0.015");
        assert_eq!(unit_price(d("0.2")).to_string(), "0.20");
    }

    #[test]
    fn pcc_promotion_covers_a_month_in_force_at_its_start() {
        let tz = BillingTz::default();
        let nov: Month = "2026-11".parse().unwrap();
        let mut prices = PriceBook::default();
        assert!(prices.pcc_promotion_applies(&tz, nov));
        prices.pcc_promotion_end = Some(Timestamp::parse_rfc3339("2026-11-15T00:00:00+08:00").unwrap());
        assert_eq!(prices.pcc_unit_price(&tz, nov), Decimal::ZERO);
        assert_eq!(prices.pcc_unit_price(&tz, nov.next()).to_string(), "0.20");
        prices.pcc_promotion_end = Some(tz.start_of_month(nov));
        assert!(!prices.pcc_promotion_applies(&tz, nov));
    }
}
