//! What each transaction of a month's bill writes: the protocol between the billing book and
//! the billing changelog, decided here so that it is unit-tested without a broker; the
//! Kafka shell sends what a [`BillPart`] lists and tells the book once it committed.
//!
//! A month's bill ([`BilledMonth`]) is published in parts of at most a number of apps, each
//! in a transaction of its own, so that none grows with the number of apps:
//! - every part: its apps' usage, charges and alerts; the shares billing carries into the
//!   next month for them ([`BilledMonth::carried`], in parts when large); then the deletions
//!   of the records the month no longer needs for them (after the marks: once the mark is
//!   read, they can go);
//! - the first part (not a resumed bill): how far the subscriptions had been read
//!   ([`ChangelogKey::SubscriptionsRead`]) — every part is priced with that plan book, live
//!   or after a restore — and the refused subscription events (the shell's dead letters);
//! - every part but the last: how far the month's apps are billed
//!   ([`ChangelogKey::BilledApps`]), which a restored book resumes after;
//! - the last part: the billed-through mark ([`ChangelogKey::Billed`]), and the removal of
//!   the parts mark if there was one.
//!
//! A month of up to the part size is one transaction, as it always was.

use super::book::{BilledMonth, CARRIED};
use crate::changelog::parts::{self, part_keys};
use crate::changelog::{ChangelogKey, SubscriptionsRead};
use crate::plan::AppId;

/// One transaction of a month's bill. See the module documentation.
#[derive(Debug)]
pub struct BillPart {
    /// Its apps' usage, charges, alerts and records to drop.
    pub bill: BilledMonth,
    /// The first transaction of the month's bill (a resumed bill has none): it writes the
    /// subscription positions and the refused subscription events.
    pub first: bool,
    /// The last: it writes the billed-through mark.
    pub last: bool,
    /// The month is billed in several transactions (or resumed): the parts mark exists.
    pub in_parts: bool,
    /// The records of the shares carried into the next month, and each share's number of
    /// parts (in the order of `bill.carried`).
    carried: Vec<(Vec<parts::Record>, usize)>,
}

impl BillPart {
    /// Splits `bill` into parts of at most `max_apps` apps (at least one part, in app
    /// order); `resumed`: parts of the month's bill were committed before. A record value
    /// over `max_value` bytes is written in parts.
    pub fn split(bill: BilledMonth, max_apps: usize, resumed: bool, max_value: usize) -> Vec<BillPart> {
        let parts = bill.into_parts(max_apps);
        let last = parts.len() - 1;
        parts
            .into_iter()
            .enumerate()
            .map(|(i, bill)| {
                let next = bill.month.next();
                let carried = bill
                    .carried
                    .iter()
                    .map(|(app_id, share)| {
                        let key = ChangelogKey::Usage { app_id: *app_id, month: next, source: CARRIED };
                        parts::split(&key.to_bytes(), share.clone().encode(), max_value)
                    })
                    .collect();
                BillPart {
                    bill,
                    first: i == 0 && !resumed,
                    last: i == last,
                    in_parts: last > 0 || resumed,
                    carried,
                }
            })
            .collect()
    }

    /// The shares the part carries into the next month: app, share, and its number of
    /// parts, as [`BillPart::changelog_records`] writes them.
    pub fn carried(&self) -> impl Iterator<Item = (AppId, &crate::aggregate::AppMonthAggregate, usize)> + '_ {
        self.bill
            .carried
            .iter()
            .zip(&self.carried)
            .map(|((app_id, share), (_, parts))| (*app_id, share, *parts))
    }

    /// The last app the part bills (`None`: a month without any app).
    pub fn through(&self) -> Option<AppId> {
        self.bill.last_app()
    }

    /// The billing changelog records the part writes, in order, after its outputs: the
    /// shares carried into the next month, the marks, then the deletions (`None` values). `read`: how far the subscriptions had been
    /// read when the month's bill began.
    pub fn changelog_records(&self, read: &SubscriptionsRead) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
        let month = self.bill.month;
        let mut records: Vec<(Vec<u8>, Option<Vec<u8>>)> = self
            .carried
            .iter()
            .flat_map(|(share, _)| share.iter().map(|(key, value)| (key.clone(), Some(value.clone()))))
            .collect();
        if self.first {
            records.push((ChangelogKey::SubscriptionsRead { month }.to_bytes(), Some(read.encode())));
        }
        let parts_mark = ChangelogKey::BilledApps { month }.to_bytes();
        if self.last {
            records.push((ChangelogKey::Billed.to_bytes(), Some(month.to_string().into_bytes())));
            if self.in_parts {
                records.push((parts_mark, None));
            }
        } else if let Some(app) = self.through() {
            records.push((parts_mark, Some(app.to_string().into_bytes())));
        }
        for (key, parts) in &self.bill.dropped {
            records.extend(record_keys(&key.to_bytes(), *parts).into_iter().map(|k| (k, None)));
        }
        records
    }
}

/// The record keys of a value written under `key` in `parts` parts (0: whole): its parts'
/// and its own.
pub fn record_keys(key: &[u8], parts: usize) -> Vec<Vec<u8>> {
    let mut keys = part_keys(key, 0..parts);
    keys.push(key.to_vec());
    keys
}
