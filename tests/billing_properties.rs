//! Property tests of the billing book against one pass: however the usage of the apps is
//! split over source partitions, however the partitions' records interleave in the billing
//! changelog, and wherever billing crashes and restores its book from those records, the
//! bills are those of one book fed each app-month's whole usage as a single share.

use std::collections::BTreeMap;
use std::time::Duration;

use im_meter_core::aggregate::{AppMonthAggregate, Counting, MonthlyUsage, SampleGrid};
use im_meter_core::bill::{BillingBook, Charge, PriceBook, Pricing, Share, Subscriptions};
use im_meter_core::changelog::{ChangelogKey, ClosedMark};
use im_meter_core::ingest::{decode_subscription_event, UserKey};
use im_meter_core::plan::AppId;
use im_meter_core::time::{BillingTz, Month};
use proptest::prelude::*;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// App 1 Standard, app 2 Developer, app 3 Premium from November, app 4 unknown to the plan
/// book (usage only).
fn plans() -> Subscriptions {
    let mut subs = Subscriptions::new(BillingTz::default());
    for line in [
        r#"{"type":"app_created","app_id":1,"ts":"2025-01-01T00:00:00+08:00","account_id":"a"}"#,
        r#"{"type":"plan_changed","app_id":1,"ts":"2025-02-01T00:00:00+08:00","plan":"standard"}"#,
        r#"{"type":"app_created","app_id":2,"ts":"2025-01-01T00:00:00+08:00","account_id":"a"}"#,
        r#"{"type":"app_created","app_id":3,"ts":"2026-10-20T00:00:00+08:00","account_id":"b"}"#,
        r#"{"type":"plan_changed","app_id":3,"ts":"2026-11-01T00:00:00+08:00","plan":"premium"}"#,
    ] {
        subs.apply(&decode_subscription_event(line.as_bytes()).unwrap()).unwrap();
    }
    subs
}

const MONTHS: [&str; 3] = ["2026-10", "2026-11", "2026-12"];

/// Logins, (user, day), and group counts.
type Activity = (Vec<(u32, u32)>, Vec<u64>);

/// Each app-month's activity.
type Usage = BTreeMap<(Month, AppId), Activity>;

/// A billing changelog record: key and value (`None` deletes).
type Record = (ChangelogKey, Option<Vec<u8>>);

fn usage(seed: u64) -> Usage {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut usage = Usage::new();
    for month in MONTHS {
        for app in 1..=4 {
            if rng.gen_bool(0.2) {
                continue;
            }
            let users = rng.gen_range(0..(if app == 1 { 12_000 } else { 400 }));
            let logins = (0..users).map(|u| (u, rng.gen_range(1..=28))).collect();
            let groups: Vec<u64> = (0..rng.gen_range(0..3)).map(|_| rng.gen_range(0..200_000)).collect();
            // An app-month without an event has no share (sources write one per app-month
            // they saw an event of); one pass must not be fed one either.
            if users == 0 && groups.is_empty() {
                continue;
            }
            usage.insert((month.parse().unwrap(), app), (logins, groups));
        }
    }
    usage
}

fn aggregate(month: Month, logins: &[(u32, u32)], groups: &[u64]) -> AppMonthAggregate {
    let mut aggregate = AppMonthAggregate::new(Counting::default(), false);
    for &(user, day) in logins {
        aggregate.record_login(month.day(day).unwrap(), UserKey::of(&format!("u-{user}")));
    }
    for &g in groups {
        aggregate.record_group_count(g);
    }
    aggregate
}

/// A bill, comparable: the month's usage and charges.
type Bill = (Vec<MonthlyUsage>, Vec<Charge>);

fn bill(book: &BillingBook, month: Month, subs: &Subscriptions) -> (Bill, Vec<Record>) {
    let prices = PriceBook::default();
    let grid = SampleGrid::new(Duration::from_secs(60)).unwrap();
    let pricing = Pricing { subscriptions: subs, prices: &prices, grid };
    let billed = book.bill(month, pricing, subs.apps()).unwrap();
    // What the worker commits with the bill: the mark, then the deletions.
    let mut records = vec![(ChangelogKey::Billed, Some(month.to_string().into_bytes()))];
    records.extend(billed.dropped.iter().map(|(key, _)| (*key, None)));
    ((billed.usage, billed.charges), records)
}

/// One book, each app-month's whole usage as one share of one source.
fn one_pass(usage: &Usage, subs: &Subscriptions) -> BTreeMap<Month, Bill> {
    let mut book = BillingBook::new();
    let mut bills = BTreeMap::new();
    for month in MONTHS.map(|m| m.parse::<Month>().unwrap()) {
        for ((_, app), (logins, groups)) in usage.range((month, 0)..=(month, AppId::MAX)) {
            book.add_share(month, *app, 0, Share { aggregate: aggregate(month, logins, groups), parts: 0 });
        }
        bills.insert(month, bill(&book, month, subs).0);
        book.billed(month);
    }
    bills
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn any_split_interleaving_and_crash_bills_as_one_pass(
        seed in any::<u64>(),
        sources in 1u32..5,
        crashes in proptest::collection::vec(0usize..200, 0..4),
    ) {
        let subs = plans();
        let usage = usage(seed);
        let want = one_pass(&usage, &subs);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed);
        // Each source's records in the order it writes them: per month, its shares (each
        // login and group count in one source or, retried, in two), then its closed mark.
        let mut streams: Vec<Vec<Record>> = vec![Vec::new(); sources as usize];
        for month in MONTHS.map(|m| m.parse::<Month>().unwrap()) {
            let mut split: BTreeMap<(u32, AppId), Activity> = BTreeMap::new();
            for ((_, app), (logins, groups)) in usage.range((month, 0)..=(month, AppId::MAX)) {
                for &login in logins {
                    for _ in 0..rng.gen_range(1..=2) {
                        split.entry((rng.gen_range(0..sources), *app)).or_default().0.push(login);
                    }
                }
                for &g in groups {
                    split.entry((rng.gen_range(0..sources), *app)).or_default().1.push(g);
                }
            }
            for ((source, app_id), (logins, groups)) in split {
                let key = ChangelogKey::Usage { app_id, month, source };
                streams[source as usize].push((key, Some(aggregate(month, &logins, &groups).encode())));
            }
            for (source, stream) in streams.iter_mut().enumerate() {
                let mark = ClosedMark { through: month, first_active: Some(MONTHS[0].parse().unwrap()) };
                stream.push((ChangelogKey::ClosedThrough { source: source as u32 }, Some(mark.encode())));
            }
        }
        // The billing changelog: the sources' records interleaved, billing's own appended
        // as it bills.
        let mut log: Vec<Record> = Vec::new();
        let mut next = vec![0usize; streams.len()];
        let mut book = BillingBook::new();
        let mut got: BTreeMap<Month, Bill> = BTreeMap::new();
        let mut step = 0;
        loop {
            let open: Vec<usize> = (0..streams.len()).filter(|&s| next[s] < streams[s].len()).collect();
            let Some(&s) = open.choose(&mut rng) else { break };
            let record = streams[s][next[s]].clone();
            next[s] += 1;
            book.absorb(record.0, record.1.as_deref(), 0).unwrap();
            log.push(record);
            while let Some(month) = book.next_billable(sources) {
                let (bill, records) = bill(&book, month, &subs);
                prop_assert!(got.insert(month, bill).is_none(), "{} billed twice", month);
                log.extend(records);
                book.billed(month);
            }
            step += 1;
            if crashes.contains(&step) {
                // A crash: a new owner restores the book from the changelog as written.
                book = BillingBook::new();
                for (key, value) in &log {
                    book.absorb(*key, value.as_deref(), 0).unwrap();
                }
                book.finish_restore();
                prop_assert!(!book.has_refused_shares());
            }
        }
        prop_assert_eq!(got, want);
    }
}
