//! The product catalog: billing modes, plans, their monthly fees and included quotas.
//!
//! Shared by ingest (plan ids in subscription events) and billing (fees and quotas). Prices
//! that vary by date or deal (PCC promotion, overage rates) live in `bill::PriceBook`.

use std::fmt;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// The SDKAppID of an IM app (a positive integer).
pub type AppId = u64;

/// Which price list an app is billed under.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BillingMode {
    /// The billing mode of apps created on or after 2022-12-26: MAU based.
    Current,
    /// The original mode of apps created before 2022-12-26: peak DAU and group count based.
    Original,
}

impl BillingMode {
    /// The id used in charges: `current` or `original`.
    pub const fn id(self) -> &'static str {
        match self {
            BillingMode::Current => "current",
            BillingMode::Original => "original",
        }
    }

    /// The free plan every app of this mode starts on.
    pub const fn entry_plan(self) -> Plan {
        match self {
            BillingMode::Current => Plan::Developer,
            BillingMode::Original => Plan::Free,
        }
    }
}

impl fmt::Display for BillingMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.id())
    }
}

/// The instant from which new apps get the current billing mode, 2022-12-26T00:00:00+08:00
/// (the product's own zone), whatever zone bills are made in; apps created earlier stay on
/// the original mode unless migrated.
pub const CURRENT_MODE_START: crate::time::Timestamp = crate::time::Timestamp(1_671_984_000_000);

/// A resource plan.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Plan {
    /// Current mode, free, at most 100 MAU.
    Developer,
    /// Current mode, 399 USD a month, 10,000 MAU included.
    Standard,
    /// Current mode, 699 USD a month, 10,000 MAU included.
    Premium,
    /// Original mode, free trial plan.
    Free,
    /// Original mode, 449.99 USD a month.
    Pro,
    /// Original mode, 899.99 USD a month.
    Ultimate,
}

impl Plan {
    /// Every plan.
    pub const ALL: [Plan; 6] =
        [Plan::Developer, Plan::Standard, Plan::Premium, Plan::Free, Plan::Pro, Plan::Ultimate];

    /// The plan id used in events and charges.
    pub const fn id(self) -> &'static str {
        match self {
            Plan::Developer => "developer",
            Plan::Standard => "standard",
            Plan::Premium => "premium",
            Plan::Free => "free",
            Plan::Pro => "pro",
            Plan::Ultimate => "ultimate",
        }
    }

    /// The plan with this id, if any.
    pub fn from_id(id: &str) -> Option<Plan> {
        Plan::ALL.into_iter().find(|p| p.id() == id)
    }

    /// The human name used in charge descriptions.
    pub const fn name(self) -> &'static str {
        match self {
            Plan::Developer => "Developer",
            Plan::Standard => "Standard",
            Plan::Premium => "Premium",
            Plan::Free => "Free (Trial)",
            Plan::Pro => "Pro",
            Plan::Ultimate => "Ultimate",
        }
    }

    /// The billing mode the plan belongs to.
    pub const fn mode(self) -> BillingMode {
        match self {
            Plan::Developer | Plan::Standard | Plan::Premium => BillingMode::Current,
            Plan::Free | Plan::Pro | Plan::Ultimate => BillingMode::Original,
        }
    }

    /// Whether the plan carries a monthly fee (and so out-of-plan charges).
    pub const fn is_paid(self) -> bool {
        !matches!(self, Plan::Developer | Plan::Free)
    }

    /// The monthly plan fee in USD.
    pub fn monthly_fee(self) -> Decimal {
        match self {
            Plan::Developer | Plan::Free => Decimal::ZERO,
            Plan::Standard => Decimal::new(399, 0),
            Plan::Premium => Decimal::new(699, 0),
            Plan::Pro => Decimal::new(44_999, 2),
            Plan::Ultimate => Decimal::new(89_999, 2),
        }
    }

    /// Included MAU a month (current mode); for Developer also the hard cap.
    pub const fn included_mau(self) -> u64 {
        match self {
            Plan::Developer => 100,
            Plan::Standard | Plan::Premium => 10_000,
            Plan::Free | Plan::Pro | Plan::Ultimate => 0,
        }
    }

    /// Included peak DAU (original mode).
    pub const fn included_dau(self) -> u64 {
        match self {
            Plan::Free => 100,
            Plan::Pro | Plan::Ultimate => 10_000,
            Plan::Developer | Plan::Standard | Plan::Premium => 0,
        }
    }

    /// Included peak group count (original mode).
    pub const fn included_groups(self) -> u64 {
        match self {
            Plan::Free | Plan::Pro | Plan::Ultimate => 100_000,
            Plan::Developer | Plan::Standard | Plan::Premium => 0,
        }
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.id())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_fees_match_the_price_list() {
        for plan in Plan::ALL {
            assert_eq!(Plan::from_id(plan.id()), Some(plan));
        }
        assert_eq!(Plan::from_id("enterprise"), None);
        assert_eq!(Plan::Standard.monthly_fee().to_string(), "399");
        assert_eq!(Plan::Ultimate.monthly_fee().to_string(), "899.99");
        assert!(!Plan::Developer.is_paid() && Plan::Pro.is_paid());
        assert_eq!(Plan::Pro.mode(), BillingMode::Original);
    }
}
