//! What one metering commit writes, without a broker.

use std::collections::BTreeMap;
use std::time::Duration;

use super::*;
use crate::aggregate::{AppMonthAggregate, Meter, MeterSettings, StateKey};
use crate::changelog::parts::Assembler;
use crate::changelog::{ChangelogKey, ClosedMark};
use crate::ingest::{Action, UsageEvent, UserKey};
use crate::plan::AppId;
use crate::time::{Month, Timestamp};

fn month(text: &str) -> Month {
    text.parse().expect("valid month")
}

fn login(app_id: AppId, user: u64, at: &str) -> UsageEvent {
    let ts = Timestamp::parse_rfc3339(at).expect("valid");
    UsageEvent { app_id, ts, action: Action::Login { user: UserKey::of(&format!("u{user}")), ok: true } }
}

/// A meter as the worker runs one: months close an hour after their end.
fn streaming() -> Meter {
    Meter::new(MeterSettings {
        allowed_lateness: Some(Duration::from_secs(3600)),
        ..MeterSettings::default()
    })
}

fn changelogs(billing_partitions: u32, max_value: usize) -> Changelogs {
    Changelogs { billing_partitions, max_value }
}

fn source(partition: u32, input_offset: Option<i64>) -> Source<'static> {
    Source { partition, input_offset, owner: None }
}

fn keys(records: &[ChangelogRecord]) -> Vec<ChangelogKey> {
    records.iter().map(|r| ChangelogKey::from_bytes(&r.key).expect("a changelog key")).collect()
}

/// The records of one billing partition, whole (values written in parts put together),
/// as the billing stage reads them: key, value, parts.
fn read_billing(commit: &MeterCommit, partition: u32) -> Vec<(ChangelogKey, Vec<u8>, usize)> {
    let mut assembler = Assembler::default();
    let mut whole = Vec::new();
    for (q, record) in &commit.billing {
        if *q != partition {
            continue;
        }
        let value = record.value.as_deref().expect("metering deletes nothing of billing's");
        if let Some(done) = assembler.feed(&record.key, Some(value)).expect("parts add up") {
            let key = ChangelogKey::from_bytes(done.key).expect("a changelog key");
            whole.push((key, done.value.expect("a value").into_owned(), done.parts));
        }
    }
    whole
}

/// The metering partition's latest state read back from commits' records (parts put
/// together), as a restore reads it: key → (value, parts).
fn read_state<'a>(
    commits: impl IntoIterator<Item = &'a MeterCommit>,
) -> BTreeMap<StateKey, (Vec<u8>, usize)> {
    let mut assembler = Assembler::default();
    let mut latest = BTreeMap::new();
    for commit in commits {
        for record in &commit.state {
            let Some(done) = assembler.feed(&record.key, record.value.as_deref()).expect("parts add up")
            else {
                continue;
            };
            if let ChangelogKey::State(key) = ChangelogKey::from_bytes(done.key).expect("a changelog key") {
                match done.value {
                    Some(value) => latest.insert(key, (value.into_owned(), done.parts)),
                    None => latest.remove(&key),
                };
            }
        }
    }
    latest
}

fn restore(state: &BTreeMap<StateKey, (Vec<u8>, usize)>) -> Meter {
    let settings =
        MeterSettings { allowed_lateness: Some(Duration::from_secs(3600)), ..MeterSettings::default() };
    Meter::restore(settings, state.iter().map(|(k, (v, _))| (*k, v.clone()))).expect("restores")
}

/// October closes at the first event an hour past its end: the commit writes each app's
/// share of October to its app's billing partition, then the closed-through mark to every
/// billing partition — after the usage it covers, so that a billing task that read the
/// mark has read the usage.
#[test]
fn a_month_close_writes_the_shares_before_the_marks_to_every_billing_partition() {
    let mut meter = streaming();
    let apps: Vec<AppId> = (1..=6).collect();
    for &app in &apps {
        meter.apply(&login(app, 1, "2026-10-20T10:00:00+08:00"));
    }
    let mut written = WrittenState::default();
    let first = MeterCommit::take(&mut meter, &mut written, source(2, Some(6)), &changelogs(3, 1 << 20));
    assert!(first.closed.is_empty() && !first.closes_month());
    meter.apply(&login(1, 2, "2026-11-01T01:00:00+08:00"));
    let commit = MeterCommit::take(&mut meter, &mut written, source(2, Some(7)), &changelogs(3, 1 << 20));
    assert_eq!(commit.closed, vec![(month("2026-10"), apps.len())]);
    assert!(commit.closes_month());

    let billing = keys(&commit.billing.iter().map(|(_, r)| r.clone()).collect::<Vec<_>>());
    let oct = month("2026-10");
    let shares: Vec<ChangelogKey> =
        apps.iter().map(|&app_id| ChangelogKey::Usage { app_id, month: oct, source: 2 }).collect();
    let mark = ChangelogKey::ClosedThrough { source: 2 };
    assert_eq!(billing[..shares.len()], shares[..], "the shares first, by app");
    assert_eq!(billing[shares.len()..], [mark; 3], "then one mark per billing partition");
    let mark_value = ClosedMark { through: oct, first_active: Some(oct) }.encode();
    for (i, (q, record)) in commit.billing.iter().enumerate() {
        match i.checked_sub(shares.len()) {
            // Each share in its app's partition.
            None => assert_eq!(*q, crate::changelog::billing_partition(apps[i], 3)),
            Some(n) => {
                assert_eq!(*q, n as u32);
                assert_eq!(record.value.as_deref(), Some(&mark_value[..]));
            }
        }
    }
    // Every billing partition reads a mark after every share it holds.
    for q in 0..3 {
        let read = read_billing(&commit, q);
        let at_mark = read.iter().position(|(k, _, _)| *k == mark).expect("a mark in every partition");
        assert_eq!(at_mark, read.len() - 1, "the mark after the shares of partition {q}");
    }
    // The closed month's records leave the state in the same commit.
    assert!(keys(&commit.state).contains(&ChangelogKey::State(StateKey::AppMonth { app_id: 3, month: oct })));
    assert!(commit.state.iter().any(|r| r.value.is_none()));
}

/// A share over the value limit is written in parts, then its header, under keys the
/// parts reader puts back together into the share's bytes; so is state over the limit,
/// and a rewrite with fewer parts deletes the parts it no longer uses.
#[test]
fn a_large_share_is_split_into_parts_that_read_back_whole() {
    let max_value = 200;
    let mut meter = streaming();
    for user in 0..300 {
        meter.apply(&login(7, user, "2026-10-20T10:00:00+08:00"));
    }
    let mut written = WrittenState::default();
    let first = MeterCommit::take(&mut meter, &mut written, source(0, Some(300)), &changelogs(2, max_value));
    assert!(first
        .state
        .iter()
        .chain(first.billing.iter().map(|(_, r)| r))
        .all(|r| { r.value.as_ref().is_none_or(|v| v.len() <= max_value) }));
    assert!(written.bytes() > 0);
    // The state read back whole restores the same meter.
    let state = read_state([&first]);
    assert!(state.values().any(|(_, parts)| *parts > 0), "some state was written in parts");
    let mut expected = restore(&state);

    meter.apply(&login(7, 1, "2026-11-01T01:00:00+08:00"));
    let commit = MeterCommit::take(&mut meter, &mut written, source(0, Some(301)), &changelogs(2, max_value));
    let oct = month("2026-10");
    let share = ChangelogKey::Usage { app_id: 7, month: oct, source: 0 };
    let q = crate::changelog::billing_partition(7, 2);
    let read = read_billing(&commit, q);
    let (_, bytes, parts) = read.iter().find(|(k, _, _)| *k == share).expect("the share, whole");
    assert!(*parts > 1, "{} bytes in {parts} parts", bytes.len());
    let part_keys: Vec<Vec<u8>> = commit
        .billing
        .iter()
        .filter(|(p, r)| *p == q && r.key.starts_with(&share.to_bytes()))
        .map(|(_, r)| r.key.clone())
        .collect();
    let mut want = crate::changelog::parts::part_keys(&share.to_bytes(), 0..*parts);
    want.push(share.to_bytes());
    assert_eq!(part_keys, want, "parts #0.. then the header under the share's own key");
    let grid = expected.settings().grid;
    let (_, mut closed) = expected.close_month(oct).into_iter().next().expect("app 7's October");
    let mut got = AppMonthAggregate::decode(bytes).expect("a share");
    assert_eq!(got.usage(7, oct, grid), closed.usage(7, oct, grid));
    assert_eq!(got.usage(7, oct, grid).mau, 300);

    // October's state is deleted, each key written in parts with its parts: nothing of it
    // is left to read.
    for (key, (_, parts)) in state.iter().filter(|(_, (_, parts))| *parts > 0) {
        let key = key.to_bytes();
        let mut want = vec![key.clone()];
        want.extend(crate::changelog::parts::part_keys(&key, 0..*parts));
        let deleted: Vec<Vec<u8>> = commit
            .state
            .iter()
            .filter(|r| r.value.is_none() && r.key.starts_with(&key))
            .map(|r| r.key.clone())
            .collect();
        assert_eq!(deleted, want, "{}", String::from_utf8_lossy(&key));
    }
    let after = read_state([&first, &commit]);
    let october = |k: &StateKey| {
        matches!(k, StateKey::AppMonth { month, .. } | StateKey::AppMonthDay { month, .. }
            | StateKey::Users { month, .. } | StateKey::UserTotals { month, .. } if *month == oct)
    };
    assert!(!after.keys().any(october), "{:?}", after.keys());
}

/// The progress record, last of the state records, says which input the state reflects:
/// the offset the transaction commits.
#[test]
fn the_progress_record_carries_the_input_offset() {
    let mut meter = streaming();
    meter.apply(&login(1, 1, "2026-10-20T10:00:00+08:00"));
    let mut written = WrittenState::default();
    let commit = MeterCommit::take(&mut meter, &mut written, source(0, Some(42)), &changelogs(1, 1 << 20));
    assert_eq!(keys(&commit.state).last(), Some(&ChangelogKey::State(StateKey::Progress)));
    assert_eq!(restore(&read_state([&commit])).input_offset(), Some(42));
    // A commit of no new event but a new offset (records dead-lettered, say) writes the
    // progress alone.
    let commit = MeterCommit::take(&mut meter, &mut written, source(0, Some(45)), &changelogs(1, 1 << 20));
    assert_eq!(keys(&commit.state), [ChangelogKey::State(StateKey::Progress)]);
    assert!(commit.billing.is_empty() && commit.app_months.is_empty());
}

/// A meter with nothing new writes nothing: neither a fresh one, nor one just committed,
/// nor one just restored at the offset its state says. The owner record is written when
/// due, first, whatever else the commit holds.
#[test]
fn nothing_is_written_for_an_untouched_meter() {
    let mut written = WrittenState::default();
    let mut fresh = streaming();
    let commit = MeterCommit::take(&mut fresh, &mut written, source(0, None), &changelogs(2, 1 << 20));
    assert!(commit.is_empty(), "{commit:?}");

    let mut meter = streaming();
    meter.apply(&login(1, 1, "2026-10-20T10:00:00+08:00"));
    let first = MeterCommit::take(&mut meter, &mut written, source(0, Some(1)), &changelogs(2, 1 << 20));
    assert!(!first.is_empty());
    assert_eq!(first.app_months.len(), first.app_months.iter().filter(|(k, _)| k.is_app_month()).count());
    assert!(!first.app_months.is_empty(), "the usage API sees the new app-month");
    let again = MeterCommit::take(&mut meter, &mut written, source(0, Some(1)), &changelogs(2, 1 << 20));
    assert!(again.is_empty(), "{again:?}");

    let mut restored = restore(&read_state([&first]));
    let mut written = WrittenState::default();
    let commit = MeterCommit::take(&mut restored, &mut written, source(0, Some(1)), &changelogs(2, 1 << 20));
    assert!(commit.is_empty(), "{commit:?}");

    let owner = Source { owner: Some(b"billing-eu"), ..source(0, Some(1)) };
    let commit = MeterCommit::take(&mut restored, &mut written, owner, &changelogs(2, 1 << 20));
    assert_eq!(keys(&commit.state), [ChangelogKey::Owner]);
    assert_eq!(commit.state[0].value.as_deref(), Some(&b"billing-eu"[..]));
    let owner = Source { owner: Some(b"billing-eu"), ..source(0, Some(2)) };
    let commit = MeterCommit::take(&mut restored, &mut written, owner, &changelogs(2, 1 << 20));
    assert_eq!(keys(&commit.state), [ChangelogKey::Owner, ChangelogKey::State(StateKey::Progress)]);
}

/// A crossing of the Developer cap is written to the app's billing partition, after the
/// month's shares and marks, with the day it happened.
#[test]
fn a_quota_crossing_goes_to_its_apps_billing_partition() {
    let mut meter = streaming();
    for user in 0..=crate::aggregate::meter::QUOTA_WATCH {
        meter.apply(&login(9, user, "2026-10-20T10:00:00+08:00"));
    }
    let mut written = WrittenState::default();
    let commit = MeterCommit::take(&mut meter, &mut written, source(4, Some(101)), &changelogs(5, 1 << 20));
    let crossed = ChangelogKey::QuotaCrossed { app_id: 9, month: month("2026-10"), source: 4 };
    let q = crate::changelog::billing_partition(9, 5);
    // The first event closed September (no data) everywhere: five marks, then the crossing.
    let billing = keys(&commit.billing.iter().map(|(_, r)| r.clone()).collect::<Vec<_>>());
    assert_eq!(billing, [[ChangelogKey::ClosedThrough { source: 4 }; 5].as_slice(), &[crossed]].concat());
    let (partition, record) = commit.billing.last().expect("the crossing");
    assert_eq!((*partition, record.value.as_deref()), (q, Some(&b"20"[..])));
}
