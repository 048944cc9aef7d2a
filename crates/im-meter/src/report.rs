//! The published shapes: an app-month's usage as it is published ([`UsageItem`]), the
//! bills of one or more months ([`Report`]: usage, charges, alerts, and what replay refused
//! and read), and their printing — the JSON document of SPEC §5, or readable tables.
//! `replay` and the worker's `im-meter report` both produce a [`Report`].

use std::io::Write;

use std::collections::BTreeMap;

use im_meter_core::aggregate::{Counted, ExactLimit, MonthlyUsage, Precision};
use im_meter_core::bill::{Charge, QuotaAlert};
use im_meter_core::plan::AppId;
use im_meter_core::time::{BillingTz, Month, Timestamp};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::input::ReadStats;

/// Billed months as printed: by `replay`, or read back from the worker's output topics.
#[derive(Debug, Default)]
pub struct Report {
    /// Usage of every billed app-month, by app then month.
    pub usage: Vec<MonthlyUsage>,
    /// Every charge, by app, month and item.
    pub charges: Vec<Charge>,
    /// Quota alerts (Developer apps past the MAU cap), by app and month.
    pub alerts: Vec<QuotaAlert>,
    /// Refused lines of both inputs, by reason (replay).
    pub rejected: BTreeMap<&'static str, u64>,
    /// Sketch audit rows (`replay --exact` only).
    pub audit: Option<Vec<AuditRow>>,
    /// Event input counters (replay).
    pub events_read: ReadStats,
}

impl Report {
    /// Number of refused lines, both inputs.
    pub fn rejected_total(&self) -> u64 {
        self.rejected.values().sum()
    }
}

/// The sketch's estimates against exact counts for one app-month.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditRow {
    /// The app.
    pub app_id: AppId,
    /// The month.
    pub month: Month,
    /// Estimated MAU.
    pub mau: u64,
    /// Exact MAU.
    pub mau_exact: u64,
    /// Estimated peak DAU.
    pub dau_peak: u64,
    /// Exact peak DAU.
    pub dau_peak_exact: u64,
}

/// One app-month's usage as published: an item of replay's JSON `usage` array, and the
/// value of a record on the usage topic. Beyond SPEC §5's fields, it says how each unique
/// user figure was counted (`exact`, or `estimated` by HLL++ at `hll_precision`).
#[derive(Debug, Serialize, Deserialize)]
pub struct UsageItem {
    app_id: AppId,
    month: Month,
    mau: u64,
    dau_peak: u64,
    pcc: u64,
    /// The first instant of the PCC peak, RFC 3339 in the billing zone.
    pcc_at: Option<String>,
    group_count_peak: u64,
    /// How `mau` was counted (absent from records published before it existed).
    #[serde(default)]
    mau_counted: Option<CountedAs>,
    /// How `dau_peak` was counted.
    #[serde(default)]
    dau_peak_counted: Option<CountedAs>,
    /// The HLL++ precision of the estimates, when a figure is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    hll_precision: Option<u8>,
}

/// How a unique-user figure was counted, as published.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CountedAs {
    /// Exactly (a set of user hashes).
    Exact,
    /// Estimated by HLL++.
    Estimated,
}

impl UsageItem {
    /// Back to the figures (reading the usage topic). Items published before they said how
    /// they were counted were exact up to 512 users and estimated at the default precision
    /// above (the rule then).
    pub fn into_usage(self) -> anyhow::Result<MonthlyUsage> {
        let precision = match self.hll_precision {
            Some(p) => Precision::new(i64::from(p))?,
            None => Precision::default(),
        };
        let counted = |given: Option<CountedAs>, n: u64| match given {
            Some(CountedAs::Exact) => Counted::Exact,
            Some(CountedAs::Estimated) => Counted::Estimated(precision),
            None if n <= ExactLimit::FORMAT_2.get() => Counted::Exact,
            None => Counted::Estimated(precision),
        };
        Ok(MonthlyUsage {
            app_id: self.app_id,
            month: self.month,
            mau: self.mau,
            mau_counted: counted(self.mau_counted, self.mau),
            dau_peak: self.dau_peak,
            dau_peak_counted: counted(self.dau_peak_counted, self.dau_peak),
            pcc: self.pcc,
            pcc_at: self.pcc_at.as_deref().map(Timestamp::parse_rfc3339).transpose()?,
            group_count_peak: self.group_count_peak,
        })
    }

    /// The published form of `u`, instants in the billing zone `tz`.
    pub fn new(u: &MonthlyUsage, tz: &BillingTz) -> Self {
        let published = |counted: Counted| match counted {
            Counted::Exact => (CountedAs::Exact, None),
            Counted::Estimated(p) => (CountedAs::Estimated, Some(p.get())),
        };
        let (mau_counted, mau_precision) = published(u.mau_counted);
        let (dau_peak_counted, dau_precision) = published(u.dau_peak_counted);
        UsageItem {
            app_id: u.app_id,
            month: u.month,
            mau: u.mau,
            dau_peak: u.dau_peak,
            pcc: u.pcc,
            pcc_at: u.pcc_at.map(|t| t.to_rfc3339(tz)),
            group_count_peak: u.group_count_peak,
            mau_counted: Some(mau_counted),
            dau_peak_counted: Some(dau_peak_counted),
            hll_precision: mau_precision.or(dau_precision),
        }
    }
}

/// An audit item (`--exact`): the sketch against the exact count.
#[derive(Debug, Serialize)]
struct AuditItem {
    app_id: AppId,
    month: Month,
    mau: u64,
    mau_exact: u64,
    /// (estimate − exact) / exact; 0 when both are 0.
    mau_error: f64,
    dau_peak: u64,
    dau_peak_exact: u64,
    dau_peak_error: f64,
}

fn relative_error(estimate: u64, exact: u64) -> f64 {
    if exact == 0 {
        if estimate == 0 {
            0.0
        } else {
            f64::INFINITY
        }
    } else {
        (estimate as f64 - exact as f64) / exact as f64
    }
}

impl From<&AuditRow> for AuditItem {
    fn from(r: &AuditRow) -> Self {
        AuditItem {
            app_id: r.app_id,
            month: r.month,
            mau: r.mau,
            mau_exact: r.mau_exact,
            mau_error: relative_error(r.mau, r.mau_exact),
            dau_peak: r.dau_peak,
            dau_peak_exact: r.dau_peak_exact,
            dau_peak_error: relative_error(r.dau_peak, r.dau_peak_exact),
        }
    }
}

#[derive(Debug, Serialize)]
struct JsonReport<'a> {
    usage: Vec<UsageItem>,
    charges: &'a [Charge],
    rejected: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    audit: Option<Vec<AuditItem>>,
}

/// Writes the single JSON object `{"usage":[...],"charges":[...],"rejected":N}` (plus
/// `"audit"` with `--exact`).
pub fn write_json(out: &mut impl Write, report: &Report, tz: &BillingTz) -> anyhow::Result<()> {
    let doc = JsonReport {
        usage: report.usage.iter().map(|u| UsageItem::new(u, tz)).collect(),
        charges: &report.charges,
        rejected: report.rejected_total(),
        audit: report.audit.as_ref().map(|rows| rows.iter().map(AuditItem::from).collect()),
    };
    serde_json::to_writer(&mut *out, &doc)?;
    writeln!(out)?;
    Ok(())
}

/// Writes the usage table, then the charges of each app with totals.
pub fn write_tables(out: &mut impl Write, report: &Report, tz: &BillingTz) -> anyhow::Result<()> {
    writeln!(out, "Usage")?;
    writeln!(
        out,
        "{:>12}  {:7}  {:>10}  {:>10}  {:>8}  {:25}  {:>12}",
        "APP", "MONTH", "MAU", "DAU PEAK", "PCC", "PCC AT", "GROUPS PEAK"
    )?;
    for u in &report.usage {
        let at = u.pcc_at.map(|t| t.to_rfc3339(tz)).unwrap_or_else(|| "-".into());
        writeln!(
            out,
            "{:>12}  {:7}  {:>10}  {:>10}  {:>8}  {:25}  {:>12}",
            u.app_id, u.month, u.mau, u.dau_peak, u.pcc, at, u.group_count_peak
        )?;
    }

    writeln!(out, "\nCharges (USD)")?;
    let mut grand_total = Decimal::ZERO;
    let mut rest = report.charges.as_slice();
    while let Some(first) = rest.first() {
        let n = rest.iter().take_while(|c| c.app_id == first.app_id && c.month == first.month).count();
        let (group, tail) = rest.split_at(n);
        rest = tail;
        writeln!(
            out,
            "  app {} · {} · {} mode, plan {}",
            first.app_id, first.month, first.billing_mode, first.plan
        )?;
        let mut total = Decimal::ZERO;
        for c in group {
            writeln!(
                out,
                "    {:14} {:>10} × {:>8} = {:>10}   {}",
                c.item.id(),
                c.quantity.to_string(),
                c.unit_price.to_string(),
                c.amount.to_string(),
                c.description
            )?;
            total += c.amount;
        }
        writeln!(out, "    {:14} {:>34}", "total", total.to_string())?;
        grand_total += total;
    }
    writeln!(out, "  {:16} {:>34}", "all apps", grand_total.to_string())?;

    if !report.alerts.is_empty() {
        writeln!(out, "\nAlerts")?;
        for a in &report.alerts {
            writeln!(
                out,
                "  quota_exceeded  app {} · {} · {} plan: MAU {} over its cap of {}",
                a.app_id, a.month, a.plan, a.mau, a.quota
            )?;
        }
    }

    if let Some(rows) = &report.audit {
        writeln!(out, "\nSketch audit (estimate vs exact)")?;
        writeln!(
            out,
            "{:>12}  {:7}  {:>10}  {:>10}  {:>8}  {:>10}  {:>10}  {:>8}",
            "APP", "MONTH", "MAU", "EXACT", "ERROR", "DAU PEAK", "EXACT", "ERROR"
        )?;
        for r in rows {
            let item = AuditItem::from(r);
            writeln!(
                out,
                "{:>12}  {:7}  {:>10}  {:>10}  {:>7.3}%  {:>10}  {:>10}  {:>7.3}%",
                r.app_id,
                r.month,
                r.mau,
                r.mau_exact,
                item.mau_error * 100.0,
                r.dau_peak,
                r.dau_peak_exact,
                item.dau_peak_error * 100.0
            )?;
        }
    }

    let read = report.events_read;
    if read.lines > 0 {
        writeln!(out, "\nRead {} event lines ({} bytes).", read.lines, read.bytes)?;
    }
    let rejected = report.rejected_total();
    if rejected > 0 {
        let reasons: Vec<String> = report.rejected.iter().map(|(r, n)| format!("{r}: {n}")).collect();
        writeln!(out, "Rejected lines, both inputs: {rejected} ({})", reasons.join(", "))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An item says how its figures were counted and reads back the same; one published
    /// before it said so is read with the rule of its time (exact up to 512 users).
    #[test]
    fn usage_items_round_trip_and_old_ones_follow_the_old_rule() {
        let tz = BillingTz::default();
        let month: Month = "2026-11".parse().expect("a month");
        let usage = MonthlyUsage {
            mau: 12_000,
            mau_counted: Counted::Estimated(Precision::default()),
            dau_peak: 300,
            ..MonthlyUsage::empty(7, month)
        };
        let json = serde_json::to_value(UsageItem::new(&usage, &tz)).expect("serializes");
        assert_eq!(
            (&json["mau_counted"], &json["dau_peak_counted"], &json["hll_precision"]),
            (&"estimated".into(), &"exact".into(), &14.into())
        );
        let back: UsageItem = serde_json::from_value(json).expect("reads back");
        assert_eq!(back.into_usage().expect("valid"), usage);
        for (mau, counted) in [(512, Counted::Exact), (513, Counted::Estimated(Precision::default()))] {
            let old = serde_json::json!({"app_id": 7, "month": "2026-11", "mau": mau, "dau_peak": 1,
                "pcc": 0, "pcc_at": null, "group_count_peak": 0});
            let read = serde_json::from_value::<UsageItem>(old).expect("reads").into_usage().expect("valid");
            assert_eq!((read.mau_counted, read.dau_peak_counted), (counted, Counted::Exact), "MAU {mau}");
        }
    }
}
