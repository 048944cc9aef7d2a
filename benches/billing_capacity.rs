//! What one billing partition needs to bill a month of many apps: time, memory and the size
//! of its transactions (README, "Capacity"; issue 17 §8).
//!
//! Builds the billing book of one partition as a restore would — every app's usage share of
//! the month absorbed from its encoded bytes (10 users each, as the small apps of a power-law
//! month are) — with a plan book where every tenth app is on Standard, then bills the month
//! and splits the bill into the parts the worker publishes (`billing.apps_per_transaction`).
//! Heap bytes come from a counting global allocator: live after absorbing (what the book
//! holds), and the peak while billing (book + the bill). Transaction sizes count the records
//! a part writes (charges and usage as JSON, alerts, the deletions of the shares, the marks)
//! and their bytes (keys + values).
//!
//! Not a criterion benchmark: it prints one table and exits. Run with:
//!
//! ```text
//! cargo bench -p im-meter-core --bench billing_capacity            # 100,000 apps
//! cargo bench -p im-meter-core --bench billing_capacity -- 20000   # another number
//! ```

use std::time::Instant;

use im_meter_core::aggregate::{AppMonthAggregate, Counting, SampleGrid};
use im_meter_core::bill::{BillPart, BillingBook, PriceBook, Pricing, Subscriptions};
use im_meter_core::changelog::{ChangelogKey, ClosedMark, SubscriptionsRead};
use im_meter_core::ingest::{decode_subscription_event, UserKey};
use im_meter_core::time::{BillingTz, Month};

#[path = "counting_alloc.rs"]
mod counting_alloc;
use counting_alloc::{live, peak, reset_peak};

const USERS_PER_APP: u32 = 10;
const APPS_PER_TRANSACTION: usize = 10_000;
/// The broker's default record limit less room for the key, as the worker sizes it.
const MAX_VALUE: usize = 1 << 19;

fn main() {
    let apps: u64 = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(100_000);
    let month: Month = "2026-11".parse().expect("a month");
    let grid = SampleGrid::new(std::time::Duration::from_secs(60)).expect("60 s divides an hour");

    let mut subscriptions = Subscriptions::new(BillingTz::default());
    for app in 1..=apps {
        let created = format!(r#"{{"type":"app_created","app_id":{app},"ts":"2025-01-01T00:00:00+08:00"}}"#);
        let event = decode_subscription_event(created.as_bytes()).expect("valid");
        subscriptions.apply(&event).expect("applies");
        if app % 10 == 0 {
            let plan = format!(
                r#"{{"type":"plan_changed","app_id":{app},"ts":"2025-02-01T00:00:00+08:00","plan":"standard"}}"#
            );
            subscriptions
                .apply(&decode_subscription_event(plan.as_bytes()).expect("valid"))
                .expect("applies");
        }
    }
    // The shares as the changelog holds them: encoded, read back by the restore.
    let shares: Vec<(ChangelogKey, Vec<u8>)> = (1..=apps)
        .map(|app| {
            let mut aggregate = AppMonthAggregate::new(Counting::default(), false);
            for u in 0..USERS_PER_APP {
                aggregate.record_login(month.day(1).expect("a day"), UserKey::of(&format!("{app}-{u}")));
            }
            (ChangelogKey::Usage { app_id: app, month, source: 0 }, aggregate.encode())
        })
        .collect();
    let encoded: usize = shares.iter().map(|(_, v)| v.len()).sum();

    let before = live();
    let started = Instant::now();
    let mut book = BillingBook::new();
    for (key, value) in &shares {
        book.absorb(*key, Some(value), 0).expect("absorbs");
    }
    let mark = ClosedMark { through: month, first_active: Some(month) };
    book.absorb(ChangelogKey::ClosedThrough { source: 0 }, Some(&mark.encode()), 0).expect("absorbs");
    book.finish_restore();
    let absorb_s = started.elapsed().as_secs_f64();
    let book_bytes = live() - before;

    reset_peak();
    let prices = PriceBook::default();
    let pricing = Pricing { subscriptions: &subscriptions, prices: &prices, grid };
    let started = Instant::now();
    let whole =
        book.bill_in_parts(month, pricing, subscriptions.apps(), usize::MAX, MAX_VALUE).expect("bills");
    let bill_s = started.elapsed().as_secs_f64();
    let peak_bytes = peak() - before;
    let whole = size(&whole[0]);
    let started = Instant::now();
    let parts = book
        .bill_in_parts(month, pricing, subscriptions.apps(), APPS_PER_TRANSACTION, MAX_VALUE)
        .expect("bills");
    let split_s = started.elapsed().as_secs_f64();
    let largest = parts.iter().map(size).max_by_key(|s| s.1).unwrap_or_default();

    println!("billing one partition: {apps} apps, {USERS_PER_APP} users each, every tenth on Standard");
    println!("| what | figure |");
    println!("|---|---|");
    println!(
        "| usage shares in the changelog | {:.1} MB ({} B per app) |",
        mb(encoded),
        encoded as u64 / apps
    );
    println!("| restore: absorb the shares | {absorb_s:.2} s |");
    println!(
        "| book in memory after the restore | {:.1} MB ({} B per app) |",
        mb(book_bytes as usize),
        book_bytes as u64 / apps
    );
    println!("| bill the month (merge, price) | {bill_s:.2} s in one part, {split_s:.2} s in parts |");
    println!("| heap peak while billing (book + bill) | {:.1} MB |", mb(peak_bytes as usize));
    println!("| the month in one transaction | {} records, {:.1} MB |", whole.0, mb(whole.1));
    println!(
        "| in parts of {APPS_PER_TRANSACTION} apps | {} transactions, the largest {} records, {:.1} MB |",
        parts.len(),
        largest.0,
        mb(largest.1)
    );
}

/// Records and bytes (keys and values) of the transaction publishing `part`.
fn size(part: &BillPart) -> (usize, usize) {
    let json = |v: &dyn erased::Json| v.len();
    let bill = &part.bill;
    let read = SubscriptionsRead(Default::default());
    let changelog = part.changelog_records(&read);
    let mut records = changelog.len();
    let mut bytes: usize = changelog.iter().map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len)).sum();
    for c in &bill.charges {
        records += 1;
        bytes += c.charge_id.len() + json(c);
    }
    for u in &bill.usage {
        records += 1;
        bytes += 20 + json(u);
    }
    for a in &bill.alerts {
        records += 1;
        bytes += a.alert_id.len() + json(a);
    }
    (records, bytes)
}

fn mb(bytes: usize) -> f64 {
    bytes as f64 / 1e6
}

/// JSON length of any serializable output.
mod erased {
    pub trait Json {
        fn len(&self) -> usize;
    }
    impl<T: serde::Serialize> Json for T {
        fn len(&self) -> usize {
            serde_json::to_vec(self).map_or(0, |v| v.len())
        }
    }
}
