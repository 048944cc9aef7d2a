//! The billing book: what billing knows of one billing partition, and the rules that turn
//! it into bills. No Kafka, no clock, no I/O.
//!
//! It absorbs what metering publishes for billing — each source partition's usage share of
//! a closed month, the sources' closed-through marks, quota crossings — and billing's own
//! marks (billed through, alerts published). It says which month is billable next, and
//! bills a month into everything the month produces ([`BilledMonth`]): usage, charges,
//! alerts and the records the month no longer needs. The caller publishes that, then tells
//! the book ([`BillingBook::billed`]). The worker's billing stage feeds it the billing
//! changelog; `replay` feeds it its meter's closed months, as one source.

use std::collections::{BTreeMap, BTreeSet};

use super::{bill_month, quota_alert, BillPart, Charge, PriceBook, QuotaAlert, Subscriptions};
use crate::aggregate::meter::QUOTA_WATCH;
use crate::aggregate::{merge_shares, AppMonthAggregate, CodecError, MergeError, MonthlyUsage, SampleGrid};
use crate::changelog::{ChangelogKey, ClosedMark, SubscriptionsRead};
use crate::ingest::RejectReason;
use crate::plan::AppId;
use crate::time::{Day, Month};

/// One source partition's usage of an app-month, and the number of parts its record was
/// written in (0: whole), so that billing deletes every one of them.
#[derive(Clone, Debug)]
pub struct Share {
    /// The usage.
    pub aggregate: AppMonthAggregate,
    /// Parts of its record.
    pub parts: usize,
}

/// What billing needs besides the book: the plans, the prices, and how usage was measured.
/// (Not the HLL++ precision: each count carries its own, and shares merge at the lowest.)
#[derive(Clone, Copy)]
pub struct Pricing<'a> {
    /// The plan book.
    pub subscriptions: &'a Subscriptions,
    /// The prices.
    pub prices: &'a PriceBook,
    /// PCC sample instants.
    pub grid: SampleGrid,
}

/// Everything billing one month produces.
#[derive(Debug)]
pub struct BilledMonth {
    /// The month.
    pub month: Month,
    /// Each billed app's usage, by app.
    pub usage: Vec<MonthlyUsage>,
    /// Charge lines, by app (in [`bill_month`]'s order within an app).
    pub charges: Vec<Charge>,
    /// Quota alerts not published during the month, by app.
    pub alerts: Vec<QuotaAlert>,
    /// Records the month no longer needs, to delete with the bill: usage shares (with
    /// their number of parts), quota crossings and alert marks.
    pub dropped: Vec<(ChangelogKey, usize)>,
    /// Connections handed over and still open at the month's end, and disconnects that
    /// paired with none, by app: each app's share of the next month from [`CARRIED`]
    /// ([`crate::aggregate::handover`]).
    pub carried: Vec<(AppId, AppMonthAggregate)>,
}

/// The source partition number of the shares billing carries into the next month
/// ([`BilledMonth::carried`]): no metering partition has it.
pub const CARRIED: u32 = u32::MAX;

impl BilledMonth {
    /// The bill in parts of at most `max_apps` apps each (at least one part, in app order),
    /// each holding its apps' usage, charges, alerts and records to drop
    /// ([`BillPart::split`]).
    pub fn into_parts(self, max_apps: usize) -> Vec<BilledMonth> {
        let max_apps = max_apps.max(1);
        // The last app of each part: every billed app has a usage line.
        let bounds: Vec<AppId> =
            self.usage.chunks(max_apps).filter_map(|c| c.last()).map(|u| u.app_id).collect();
        let mut parts: Vec<BilledMonth> = (0..bounds.len().max(1))
            .map(|_| BilledMonth {
                month: self.month,
                usage: Vec::new(),
                charges: Vec::new(),
                alerts: Vec::new(),
                dropped: Vec::new(),
                carried: Vec::new(),
            })
            .collect();
        let last = parts.len() - 1;
        let part_of = |app: AppId| bounds.partition_point(|&b| b < app).min(last);
        for usage in self.usage {
            parts[part_of(usage.app_id)].usage.push(usage);
        }
        for charge in self.charges {
            parts[part_of(charge.app_id)].charges.push(charge);
        }
        for alert in self.alerts {
            parts[part_of(alert.app_id)].alerts.push(alert);
        }
        for (key, n) in self.dropped {
            let part = key.app_id().map_or(last, part_of);
            parts[part].dropped.push((key, n));
        }
        for (app_id, share) in self.carried {
            parts[part_of(app_id)].carried.push((app_id, share));
        }
        parts
    }

    /// The last app this bill (or part) bills.
    pub fn last_app(&self) -> Option<AppId> {
        self.usage.last().map(|u| u.app_id)
    }
}

/// A share of a month already billed (`late`) or before the first month billed
/// (`before_start`): it is refused, never billed.
#[derive(Debug)]
pub struct RefusedShare {
    /// Why: [`RejectReason::Late`] or [`RejectReason::BeforeStart`].
    pub reason: RejectReason,
    /// Its key.
    pub key: ChangelogKey,
    /// Parts of its record.
    pub parts: usize,
    /// Its figures, for the dead letter.
    pub usage: MonthlyUsage,
}

/// Why a record could not be absorbed or a month billed.
#[derive(Debug, thiserror::Error)]
pub enum BookError {
    /// A record's value is damaged or of an unknown format.
    #[error("unreadable {what}: {source}")]
    Unreadable {
        /// What the record is.
        what: &'static str,
        /// Why.
        source: CodecError,
    },
    /// Shares of one app-month that do not merge: a sketch in them does not read as the
    /// pinned HLL++ crate writes it (different precisions do merge, at the lowest).
    #[error("cannot merge the usage of app {app_id} in {month} from partitions {sources:?}: {source}")]
    Unmergeable {
        /// The app.
        app_id: AppId,
        /// The month.
        month: Month,
        /// The source partitions of its shares.
        sources: Vec<u32>,
        /// Why.
        source: MergeError,
    },
}

/// When each month of a billing partition was billed, as how far the subscriptions had been
/// read then: what says, for any subscription record, which months were billed before it
/// was read — the same answer live and after a restore.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BilledPositions(BTreeMap<Month, SubscriptionsRead>);

impl BilledPositions {
    /// Notes how far the subscriptions had been read when `month` was billed.
    pub fn insert(&mut self, month: Month, read: SubscriptionsRead) {
        self.0.insert(month, read);
    }

    /// The first month that was not billed yet when the record at `offset` of subscriptions
    /// partition `partition` was read (`None`: no month with known positions was billed
    /// before it). An event dated before that month is late.
    pub fn first_open_when_read(&self, partition: u32, offset: i64) -> Option<Month> {
        // Reading only moves forward: a later bill had read at least what an earlier one had
        // (a partition a bill does not name had nothing new).
        let mut read = 0;
        let mut first_open = None;
        for (month, positions) in &self.0 {
            read = read.max(positions.of(partition));
            if read <= offset {
                first_open = Some(month.next());
            }
        }
        first_open
    }
}

/// The source partitions where an app-month's MAU passed the Developer cap, and the
/// earliest day one of them says it did.
#[derive(Debug)]
struct Crossed {
    sources: BTreeSet<u32>,
    day: Day,
}

/// What one billing partition knows. See the module documentation.
#[derive(Debug, Default)]
pub struct BillingBook {
    /// (month, app) → source partition → its share.
    /// (Boxed: a B-tree node holds room for 11 values, and a share is a few hundred bytes
    /// inline — unboxed, a month of 100,000 small apps took 3.9 KB per app instead of 0.67.)
    usage: BTreeMap<(Month, AppId), BTreeMap<u32, Box<Share>>>,
    /// Source partition → how far it has closed months.
    closed: BTreeMap<u32, ClosedMark>,
    billed_through: Option<Month>,
    /// The month being billed in several transactions, and the last app already billed.
    billed_apps: Option<(Month, AppId)>,
    /// The first month billed (`None`: the first month any source applied an event for).
    start: Option<Month>,
    /// App-months whose MAU passed the Developer cap in some source partition, and where.
    crossed: BTreeMap<(Month, AppId), Crossed>,
    /// App-months whose quota alert is published.
    alerted: BTreeSet<(Month, AppId)>,
    /// Crossings found not to need an alert (the app is not on Developer): not re-checked.
    declined: BTreeSet<(Month, AppId)>,
    /// Shares of months already billed or before the start, to refuse.
    refused: BTreeMap<(Month, AppId, u32), Box<Share>>,
    /// Per billed month, how far the subscriptions had been read when it was billed.
    subscriptions_read: BilledPositions,
}

impl BillingBook {
    /// An empty book.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty book that bills no month before `start` (`billing.start_month`): usage of
    /// earlier months is refused as `before_start`, as a billed month's is as `late`.
    pub fn starting(start: Option<Month>) -> Self {
        BillingBook { start, ..Self::default() }
    }

    /// The last month no usage may be billed for any more: the last billed, or the one
    /// before the start.
    fn closed_to_billing(&self) -> Option<Month> {
        self.billed_through.max(self.start.map(Month::prev))
    }

    /// Whether usage of the app-month can no longer be billed: its month is closed to
    /// billing, or a committed part of the month's bill billed the app.
    fn is_billed(&self, month: Month, app_id: AppId) -> bool {
        self.closed_to_billing().is_some_and(|b| month <= b)
            || self.billed_apps_through(month).is_some_and(|through| app_id <= through)
    }

    /// Absorbs one record of the billing changelog (`value: None` deletes the key). Keys
    /// that are not billing's (metering state, the plan book copy marks) are ignored.
    pub fn absorb(&mut self, key: ChangelogKey, value: Option<&[u8]>, parts: usize) -> Result<(), BookError> {
        let unreadable = |what| move |source| BookError::Unreadable { what, source };
        match (key, value) {
            (ChangelogKey::Usage { app_id, month, source }, Some(bytes)) => {
                let aggregate = AppMonthAggregate::decode(bytes).map_err(unreadable("usage share"))?;
                self.add_share(month, app_id, source, Share { aggregate, parts });
            }
            (ChangelogKey::Usage { app_id, month, source }, None) => {
                if let Some(shares) = self.usage.get_mut(&(month, app_id)) {
                    shares.remove(&source);
                }
                self.refused.remove(&(month, app_id, source));
            }
            (ChangelogKey::ClosedThrough { source }, Some(bytes)) => {
                self.close_through(source, ClosedMark::decode(bytes).map_err(unreadable("closed mark"))?);
            }
            (ChangelogKey::ClosedThrough { source }, None) => {
                self.closed.remove(&source);
            }
            (ChangelogKey::Billed, Some(bytes)) => {
                let month = std::str::from_utf8(bytes).ok().and_then(|t| t.parse().ok());
                let month: Month = month.ok_or_else(|| {
                    unreadable("billed-through mark")(CodecError::Corrupt(format!("{bytes:?}")))
                })?;
                // Only forward: a task reads its own earlier marks back after it billed on.
                // What the month held is deleted after the mark, in the same transaction.
                self.billed_through = self.billed_through.max(Some(month));
            }
            (ChangelogKey::BilledApps { month }, Some(bytes)) => {
                let app = std::str::from_utf8(bytes).ok().and_then(|t| t.parse().ok());
                let app: AppId = app.ok_or_else(|| {
                    unreadable("billed-apps mark")(CodecError::Corrupt(format!("{bytes:?}")))
                })?;
                self.billed_apps = Some((month, app));
            }
            (ChangelogKey::BilledApps { month }, None) => {
                self.billed_apps = self.billed_apps.filter(|(m, _)| *m != month);
            }
            (ChangelogKey::SubscriptionsRead { month }, Some(bytes)) => {
                let read = SubscriptionsRead::decode(bytes).map_err(unreadable("subscription positions"))?;
                self.subscriptions_read.insert(month, read);
            }
            (ChangelogKey::QuotaCrossed { app_id, month, source }, Some(bytes)) => {
                // A marker that does not say its day (written before markers did) is taken
                // as of the month's last day, where the plan at the month's end decides.
                let day = match bytes {
                    [] => month.day(month.days()),
                    _ => std::str::from_utf8(bytes)
                        .ok()
                        .and_then(|t| t.parse().ok())
                        .and_then(|d| month.day(d)),
                };
                let day = day
                    .ok_or_else(|| unreadable("quota crossing")(CodecError::Corrupt(format!("{bytes:?}"))))?;
                let crossed =
                    self.crossed.entry((month, app_id)).or_insert(Crossed { sources: BTreeSet::new(), day });
                crossed.sources.insert(source);
                // Each source's logins passed the cap by its day; all of them, by the earliest.
                crossed.day = crossed.day.min(day);
            }
            (ChangelogKey::Alerted { app_id, month }, Some(_)) => {
                self.alerted.insert((month, app_id));
            }
            // Deletions of markers come with the month's bill, which forgets them anyway.
            (
                ChangelogKey::QuotaCrossed { .. }
                | ChangelogKey::Alerted { .. }
                | ChangelogKey::Billed
                | ChangelogKey::SubscriptionsRead { .. },
                None,
            ) => {}
            (ChangelogKey::State(_) | ChangelogKey::PlanCopied { .. } | ChangelogKey::Owner, _) => {}
        }
        Ok(())
    }

    /// Adds source partition `source`'s share of an app-month. A share of a month already
    /// billed, or before the start, is kept apart, to be refused ([`BillingBook::refused_shares`]).
    pub fn add_share(&mut self, month: Month, app_id: AppId, source: u32, share: Share) {
        if self.is_billed(month, app_id) {
            self.refused.insert((month, app_id, source), Box::new(share));
        } else {
            self.usage.entry((month, app_id)).or_default().insert(source, Box::new(share));
        }
    }

    /// Notes how far source partition `source` has closed months.
    pub fn close_through(&mut self, source: u32, mark: ClosedMark) {
        self.closed.insert(source, mark);
    }

    /// The last month billed.
    pub fn billed_through(&self) -> Option<Month> {
        self.billed_through
    }

    /// The month to bill next, closed everywhere or not: the one after the last billed,
    /// or, before the first bill, the first month any source applied an event for (never
    /// before the start).
    pub fn next_to_bill(&self) -> Option<Month> {
        match self.billed_through {
            Some(billed) => Some(billed.next()),
            None => {
                let first = self.closed.values().filter_map(|m| m.first_active).min()?;
                Some(self.start.map_or(first, |start| first.max(start)))
            }
        }
    }

    /// The next month to bill, if every one of the `sources` partitions has closed it.
    /// Months are billed one after the other: none is ever skipped.
    pub fn next_billable(&self, sources: u32) -> Option<Month> {
        // `None` sorts first: one source without a mark yet holds every month back.
        let through = (0..sources).map(|s| self.closed.get(&s).map(|m| m.through)).min()??;
        self.next_to_bill().filter(|next| *next <= through)
    }

    /// Bills `month`: every app with usage in it, and every app of `known` (apps billing
    /// knows otherwise, e.g. from the plan book) that existed before the month's end — each
    /// app's shares merged into one usage ([`merge_shares`]) and priced. Changes nothing:
    /// call [`BillingBook::billed`] once the result is published.
    pub fn bill(
        &self,
        month: Month,
        pricing: Pricing<'_>,
        known: impl IntoIterator<Item = AppId>,
    ) -> Result<BilledMonth, BookError> {
        let subscriptions = pricing.subscriptions;
        let month_end = subscriptions.tz().end_of_month(month);
        let with_usage = self.usage.range((month, 0)..=(month, AppId::MAX));
        // An app whose shares all only hand connections over had no usage.
        let active = |shares: &&BTreeMap<u32, Box<Share>>| shares.values().any(|s| !s.aggregate.is_silent());
        let mut apps: BTreeSet<AppId> =
            with_usage.clone().filter(|(_, shares)| active(shares)).map(|((_, app), _)| *app).collect();
        apps.extend(
            known
                .into_iter()
                .filter(|a| subscriptions.created_at(*a).is_none_or(|created| created < month_end)),
        );
        // A bill made in parts resumes after the apps its committed parts billed (whose
        // records those parts dropped).
        let through = self.billed_apps_through(month);
        let unbilled = |app: &AppId| through.is_none_or(|t| *app > t);
        apps.retain(unbilled);
        let mut billed = BilledMonth {
            month,
            usage: Vec::new(),
            charges: Vec::new(),
            alerts: Vec::new(),
            dropped: Vec::new(),
            carried: Vec::new(),
        };
        let next_first = pricing.grid.first_at_or_after(subscriptions.tz().start_of_month(month.next()));
        for app_id in apps {
            let (usage, crossed_on) = match self.usage.get(&(month, app_id)).filter(active) {
                Some(shares) => {
                    let mut aggregate =
                        merge_shares(shares.values().map(|s| &s.aggregate)).map_err(|source| {
                            BookError::Unmergeable {
                                app_id,
                                month,
                                sources: shares.keys().copied().collect(),
                                source,
                            }
                        })?;
                    let usage = aggregate.usage(app_id, month, pricing.grid);
                    if let Some(carried) = aggregate.handover().carry(next_first) {
                        billed.carried.push((app_id, AppMonthAggregate::handing_over(carried)));
                    }
                    // The day the cap was passed, for an alert not raised yet (a scan of the
                    // users, so only then).
                    let crossed_on = (usage.mau > QUOTA_WATCH && !self.alerted.contains(&(month, app_id)))
                        .then(|| aggregate.day_passing(QUOTA_WATCH))
                        .flatten()
                        .and_then(|d| month.day(u32::from(d)));
                    (usage, crossed_on)
                }
                None => (MonthlyUsage::empty(app_id, month), None),
            };
            billed.charges.extend(bill_month(subscriptions, &usage, pricing.prices));
            // (Not when alerted during the month already: once per app and month.)
            if let Some(day) = crossed_on {
                billed.alerts.extend(quota_alert(subscriptions, &usage, day));
            }
            billed.usage.push(usage);
        }
        for ((_, app_id), shares) in with_usage.filter(|((_, app), _)| unbilled(app)) {
            for (&source, share) in shares {
                billed.dropped.push((ChangelogKey::Usage { app_id: *app_id, month, source }, share.parts));
            }
        }
        for (&(_, app_id), crossed) in
            self.crossed.range((month, 0)..=(month, AppId::MAX)).filter(|((_, a), _)| unbilled(a))
        {
            for &source in &crossed.sources {
                billed.dropped.push((ChangelogKey::QuotaCrossed { app_id, month, source }, 0));
            }
        }
        for &(_, app_id) in self.alerted.range((month, 0)..=(month, AppId::MAX)).filter(|(_, a)| unbilled(a))
        {
            billed.dropped.push((ChangelogKey::Alerted { app_id, month }, 0));
        }
        Ok(billed)
    }

    /// Notes `month` billed (its [`BilledMonth`] published, with the deletion of what it
    /// dropped): what the book kept for it is forgotten.
    pub fn billed(&mut self, month: Month) {
        self.billed_through = self.billed_through.max(Some(month));
        self.billed_apps = None;
        self.forget_through(month);
    }

    /// Bills `month` as [`BillingBook::bill`] does, in the parts of at most `max_apps` apps
    /// it is published in ([`BillPart`]), resuming after the parts committed before. A
    /// record value over `max_value` bytes is written in parts.
    pub fn bill_in_parts(
        &self,
        month: Month,
        pricing: Pricing<'_>,
        known: impl IntoIterator<Item = AppId>,
        max_apps: usize,
        max_value: usize,
    ) -> Result<Vec<BillPart>, BookError> {
        let resumed = self.billed_apps_through(month).is_some();
        Ok(BillPart::split(self.bill(month, pricing, known)?, max_apps, resumed, max_value))
    }

    /// Notes `part` published (its transaction committed), the subscriptions read as far as
    /// `read` when the month's bill began: what [`BillPart::changelog_records`] wrote, as
    /// [`BillingBook::absorb`] would read it back.
    pub fn published(&mut self, part: &BillPart, read: &SubscriptionsRead) {
        let month = part.bill.month;
        if part.first {
            self.subscriptions_read(month, read.clone());
        }
        for (app_id, share, parts) in part.carried() {
            self.add_share(month.next(), app_id, CARRIED, Share { aggregate: share.clone(), parts });
        }
        if part.last {
            self.billed(month);
        } else if let Some(app) = part.through() {
            self.billed_part(month, app);
        }
    }

    /// Notes a part of `month`'s bill published, its apps billed through `app`: the book
    /// forgets what it kept for them, and a bill of the month made now (live, or after a
    /// restore) resumes after them.
    fn billed_part(&mut self, month: Month, app: AppId) {
        self.billed_apps = Some((month, app));
        let done = |&(m, a): &(Month, AppId)| m == month && a <= app;
        self.usage.retain(|k, _| !done(k));
        self.crossed.retain(|k, _| !done(k));
        self.alerted.retain(|k| !done(k));
    }

    /// The last app of `month` a committed part of its bill billed, if it is billed in parts.
    pub fn billed_apps_through(&self, month: Month) -> Option<AppId> {
        self.billed_apps.filter(|(m, _)| *m == month).map(|(_, a)| a)
    }

    /// Notes how far the subscriptions had been read when `month` was billed (written with
    /// its bill as [`ChangelogKey::SubscriptionsRead`]).
    pub fn subscriptions_read(&mut self, month: Month, read: SubscriptionsRead) {
        self.subscriptions_read.insert(month, read);
    }

    /// When each month was billed, in subscription positions.
    pub fn billed_positions(&self) -> &BilledPositions {
        &self.subscriptions_read
    }

    /// Ends a restore from the billing changelog: shares still held for months already
    /// billed were written after the bill's snapshot was taken (the bill deleted only the
    /// shares it had) — they are late, as they would have been had they been read live;
    /// shares before the start are refused as they would have been.
    pub fn finish_restore(&mut self) {
        let usage = std::mem::take(&mut self.usage);
        for ((month, app_id), shares) in usage {
            if self.is_billed(month, app_id) {
                for (source, share) in shares {
                    self.refused.insert((month, app_id, source), share);
                }
            } else {
                self.usage.insert((month, app_id), shares);
            }
        }
        if let Some(closed) = self.closed_to_billing() {
            self.forget_through(closed);
        }
        if let Some((month, app)) = self.billed_apps {
            self.billed_part(month, app);
        }
    }

    fn forget_through(&mut self, month: Month) {
        let keep = (month.next(), 0);
        self.usage = self.usage.split_off(&keep);
        self.crossed = self.crossed.split_off(&keep);
        self.alerted = self.alerted.split_off(&keep);
        self.declined = self.declined.split_off(&keep);
    }

    /// Whether quota crossings wait to be checked against the plans
    /// ([`BillingBook::alerts_due`]).
    pub fn has_crossings_to_check(&self) -> bool {
        self.crossed.keys().any(|k| {
            !self.alerted.contains(k)
                && !self.declined.contains(k)
                && self.closed_to_billing().is_none_or(|b| k.0 > b)
        })
    }

    /// Quota alerts to publish now: app-months of months not billed yet whose MAU passed
    /// the Developer cap in some source partition, for apps on Developer the day it did
    /// (the earliest day a source says), not alerted yet. A crossing of an app on another
    /// plan that day is declined until the month's bill, which decides again from all the
    /// month's logins. Publish them, then call [`BillingBook::alerted`].
    pub fn alerts_due(&mut self, subscriptions: &Subscriptions) -> Vec<QuotaAlert> {
        let pending: Vec<(Month, AppId, Day)> = self
            .crossed
            .iter()
            .filter(|(k, _)| !self.alerted.contains(k) && !self.declined.contains(k))
            .filter(|((m, _), _)| self.closed_to_billing().is_none_or(|b| *m > b))
            .map(|(&(month, app_id), crossed)| (month, app_id, crossed.day))
            .collect();
        let mut alerts = Vec::new();
        for (month, app_id, day) in pending {
            // The crossing says the MAU is now past the cap: it is at least cap + 1.
            let usage = MonthlyUsage { mau: QUOTA_WATCH + 1, ..MonthlyUsage::empty(app_id, month) };
            match quota_alert(subscriptions, &usage, day) {
                Some(alert) => alerts.push(alert),
                None => {
                    self.declined.insert((month, app_id));
                }
            }
        }
        alerts
    }

    /// Notes alerts published.
    pub fn alerted(&mut self, alerts: &[QuotaAlert]) {
        self.alerted.extend(alerts.iter().map(|a| (a.month, a.app_id)));
    }

    /// Whether shares of billed months, or of months before the start, wait to be refused.
    pub fn has_refused_shares(&self) -> bool {
        !self.refused.is_empty()
    }

    /// The shares of months already billed or before the start, with their figures: refuse
    /// them (dead letter with their reason, and delete their records), then call
    /// [`BillingBook::refused`].
    pub fn refused_shares(&self, grid: SampleGrid) -> Vec<RefusedShare> {
        self.refused
            .iter()
            .map(|(&(month, app_id, source), share)| RefusedShare {
                reason: if self.start.is_some_and(|s| month < s) {
                    RejectReason::BeforeStart
                } else {
                    RejectReason::Late
                },
                key: ChangelogKey::Usage { app_id, month, source },
                parts: share.parts,
                usage: share.aggregate.clone().usage(app_id, month, grid),
            })
            .collect()
    }

    /// Notes the refused shares dead-lettered and deleted.
    pub fn refused(&mut self) {
        self.refused.clear();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::ingest::{decode_subscription_event, UserKey};
    use crate::time::BillingTz;

    const STANDARD: AppId = 1;
    const DEVELOPER: AppId = 2;

    fn month(text: &str) -> Month {
        text.parse().unwrap()
    }

    fn grid() -> SampleGrid {
        SampleGrid::new(Duration::from_secs(60)).unwrap()
    }

    /// The plan book of these subscription events.
    fn subscriptions(lines: &[&str]) -> Subscriptions {
        let mut subs = Subscriptions::new(BillingTz::default());
        for line in lines {
            subs.apply(&decode_subscription_event(line.as_bytes()).unwrap()).unwrap();
        }
        subs
    }

    /// App 1 on Standard since 2025, app 2 on Developer, app 3 created in December 2026.
    fn plans() -> Subscriptions {
        subscriptions(&[
            r#"{"type":"app_created","app_id":1,"ts":"2025-01-01T00:00:00+08:00","account_id":"a"}"#,
            r#"{"type":"plan_changed","app_id":1,"ts":"2025-02-01T00:00:00+08:00","plan":"standard"}"#,
            r#"{"type":"app_created","app_id":2,"ts":"2025-01-01T00:00:00+08:00","account_id":"a"}"#,
            r#"{"type":"app_created","app_id":3,"ts":"2026-12-05T00:00:00+08:00","account_id":"a"}"#,
        ])
    }

    /// A share with the users `users` logged in on the month's first day.
    fn share(of: Month, users: std::ops::Range<u32>) -> Share {
        let mut aggregate = AppMonthAggregate::new(crate::aggregate::Counting::default(), false);
        for u in users {
            aggregate.record_login(of.day(1).unwrap(), UserKey::of(&format!("u-{u}")));
        }
        Share { aggregate, parts: 0 }
    }

    fn mark(through: &str, first: &str) -> ClosedMark {
        ClosedMark { through: month(through), first_active: Some(month(first)) }
    }

    fn bill(book: &BillingBook, m: &str, subs: &Subscriptions) -> BilledMonth {
        let prices = PriceBook::default();
        let pricing = Pricing { subscriptions: subs, prices: &prices, grid: grid() };
        book.bill(month(m), pricing, subs.apps()).unwrap()
    }

    /// Connections handed over by a source where the app was silent count where another
    /// source has usage, and those still open are carried into the next month by records the
    /// bill writes (in parts when large): a book restored from them bills that month as the
    /// live book does. An app whose shares all hand over only is not billed.
    #[test]
    fn connections_handed_over_are_carried_into_the_next_month_through_the_changelog() {
        use crate::aggregate::handover::Handover;
        let subs = plans();
        let (oct, nov) = (month("2026-10"), month("2026-11"));
        let samples = |m: Month| grid().first_at_or_after(subs.tz().start_of_month(m));
        let silent = |m: Month, keys: std::ops::Range<u64>| Share {
            aggregate: AppMonthAggregate::handing_over(Handover::silent(keys, samples(m))),
            parts: 0,
        };
        let mut book = BillingBook::new();
        book.add_share(oct, STANDARD, 0, silent(oct, 0..40));
        book.add_share(oct, STANDARD, 1, share(oct, 0..3));
        // App 2 is silent everywhere: its connections end.
        book.add_share(oct, DEVELOPER, 0, silent(oct, 100..103));
        let prices = PriceBook::default();
        let pricing = Pricing { subscriptions: &subs, prices: &prices, grid: grid() };
        let parts = book.bill_in_parts(oct, pricing, [], 1, 128).unwrap();
        let usage: Vec<(AppId, u64)> =
            parts.iter().flat_map(|p| &p.bill.usage).map(|u| (u.app_id, u.pcc)).collect();
        assert_eq!(usage, vec![(STANDARD, 40)]);
        let mut log = Vec::new();
        for part in &parts {
            log.extend(part.changelog_records(&SubscriptionsRead::default()));
            book.published(part, &SubscriptionsRead::default());
        }
        assert!(
            log.iter().any(|(key, _)| key.ends_with(b"#0")),
            "40 connections are over 128 bytes: written in parts"
        );
        let mut restored = BillingBook::new();
        let mut assembler = crate::changelog::parts::Assembler::default();
        for (key, value) in &log {
            if let Some(whole) = assembler.feed(key, value.as_deref()).unwrap() {
                let key = ChangelogKey::from_bytes(whole.key).unwrap();
                restored.absorb(key, whole.value.as_deref(), whole.parts).unwrap();
            }
        }
        restored.finish_restore();
        // November: usage in source 1 only, one of the carried connections disconnected there.
        for book in [&mut book, &mut restored] {
            let mut busy = share(nov, 0..1);
            busy.aggregate.handover_mut().add_disconnects([(5, samples(nov) + 10)]);
            book.add_share(nov, STANDARD, 1, busy);
        }
        let billed = [&book, &restored].map(|b| {
            let billed = b.bill(nov, pricing, []).unwrap();
            (
                billed.usage.iter().map(|u| (u.app_id, u.pcc, u.pcc_at)).collect::<Vec<_>>(),
                billed.carried.len(),
            )
        });
        assert_eq!(billed[0], (vec![(STANDARD, 40, Some(grid().instant(samples(nov))))], 1));
        assert_eq!(billed[0], billed[1]);
    }

    #[test]
    fn months_are_billed_in_order_once_every_source_closed_them() {
        let mut book = BillingBook::new();
        assert_eq!(book.next_billable(2), None);
        book.close_through(0, mark("2026-11", "2026-10"));
        assert_eq!(book.next_billable(2), None, "source 1 has no mark yet");
        // Source 1 started a month later: October is still the first to bill.
        book.close_through(1, mark("2026-10", "2026-11"));
        assert_eq!(book.next_to_bill(), Some(month("2026-10")));
        assert_eq!(book.next_billable(2), Some(month("2026-10")));
        book.billed(month("2026-10"));
        assert_eq!(book.next_billable(2), None, "November is not closed in source 1");
        book.close_through(1, mark("2026-12", "2026-11"));
        assert_eq!(book.next_billable(2), Some(month("2026-11")));
        // A third source appears: it holds the month back until it has a mark.
        assert_eq!(book.next_billable(3), None);
    }

    #[test]
    fn an_apps_shares_merge_and_every_known_app_is_billed_from_its_creation() {
        let subs = plans();
        let mut book = BillingBook::new();
        let nov = month("2026-11");
        // Users 0..10,300 in one partition, 5,000..10,600 in another: 10,600 in all.
        book.add_share(nov, STANDARD, 0, share(nov, 0..10_300));
        book.add_share(nov, STANDARD, 1, Share { parts: 2, ..share(nov, 5_000..10_600) });
        let billed = bill(&book, "2026-11", &subs);
        let apps: Vec<AppId> = billed.usage.iter().map(|u| u.app_id).collect();
        assert_eq!(apps, [STANDARD, DEVELOPER], "app 3 did not exist in November");
        let mau = billed.usage[0].mau;
        assert!(mau.abs_diff(10_600) <= 212, "MAU {mau}: the union (10,600), not the sum (15,900)");
        let items: Vec<&str> =
            billed.charges.iter().filter(|c| c.app_id == STANDARD).map(|c| c.item.id()).collect();
        assert_eq!(items, ["plan_fee", "mau_overage", "pcc"]);
        assert_eq!(billed.usage[1], MonthlyUsage::empty(DEVELOPER, nov));
        // The month's shares go, parts included.
        let dropped: Vec<(Vec<u8>, usize)> = billed.dropped.iter().map(|(k, n)| (k.to_bytes(), *n)).collect();
        assert_eq!(dropped, [(b"u/1/2026-11/0".to_vec(), 0), (b"u/1/2026-11/1".to_vec(), 2)]);
        let december = bill(&book, "2026-12", &subs);
        assert_eq!(december.usage.iter().map(|u| u.app_id).collect::<Vec<_>>(), [1, 2, 3]);
    }

    /// `metering.hll_precision` changed mid-month and one partition began the app-month
    /// after it: its shares, at 14 and 16, are billed (at 14), never refused.
    #[test]
    fn shares_counted_at_different_precisions_are_billed() {
        let subs = plans();
        let nov = month("2026-11");
        let mut book = BillingBook::new();
        let at_16 = |users: std::ops::Range<u32>| {
            let counting = crate::aggregate::Counting {
                precision: crate::aggregate::Precision::new(16).unwrap(),
                exact_limit: crate::aggregate::ExactLimit::new(1_000).unwrap(),
            };
            let mut aggregate = AppMonthAggregate::new(counting, false);
            for u in users {
                aggregate.record_login(nov.day(1).unwrap(), UserKey::of(&format!("u-{u}")));
            }
            Share { aggregate, parts: 0 }
        };
        book.add_share(nov, STANDARD, 0, share(nov, 0..10_300));
        book.add_share(nov, STANDARD, 1, at_16(5_000..10_600));
        book.add_share(nov, DEVELOPER, 0, share(nov, 0..40));
        book.add_share(nov, DEVELOPER, 1, at_16(30..90));
        let billed = bill(&book, "2026-11", &subs);
        let mau = billed.usage[0].mau;
        assert!(mau.abs_diff(10_600) <= 212, "MAU {mau}: the union (10,600)");
        assert_eq!(
            billed.usage[0].mau_counted,
            crate::aggregate::Counted::Estimated(crate::aggregate::Precision::default())
        );
        assert_eq!(
            (billed.usage[1].mau, billed.usage[1].mau_counted),
            (90, crate::aggregate::Counted::Exact)
        );
    }

    #[test]
    fn a_share_of_a_billed_month_is_refused_never_billed() {
        let subs = plans();
        let (oct, nov) = (month("2026-10"), month("2026-11"));
        let mut book = BillingBook::new();
        book.add_share(oct, STANDARD, 0, share(oct, 0..5));
        bill(&book, "2026-10", &subs);
        book.billed(oct);
        assert!(!book.has_refused_shares());
        book.add_share(oct, STANDARD, 3, share(oct, 0..7));
        let late = book.refused_shares(grid());
        assert_eq!(late.len(), 1);
        assert_eq!((late[0].key.to_bytes(), late[0].usage.mau), (b"u/1/2026-10/3".to_vec(), 7));
        let november = bill(&book, "2026-11", &subs);
        assert!(november.usage.iter().all(|u| u.month == nov && u.mau == 0));
        book.refused();
        assert!(!book.has_refused_shares());
    }

    /// Usage before `billing.start_month` is refused as `before_start` (one stray event
    /// dated 2000-01 must not bill 320 months), live and after a restore, and alerts nothing.
    #[test]
    fn months_before_the_start_are_refused_never_billed() {
        let subs = plans();
        let (old, oct) = (month("2000-01"), month("2026-10"));
        let records = [
            (
                ChangelogKey::Usage { app_id: STANDARD, month: old, source: 0 },
                Some(share(old, 0..3).aggregate.encode()),
            ),
            (ChangelogKey::QuotaCrossed { app_id: DEVELOPER, month: old, source: 0 }, Some(Vec::new())),
            (
                ChangelogKey::Usage { app_id: STANDARD, month: oct, source: 0 },
                Some(share(oct, 0..5).aggregate.encode()),
            ),
            (
                ChangelogKey::ClosedThrough { source: 0 },
                Some(ClosedMark { through: oct, first_active: Some(old) }.encode()),
            ),
        ];
        let mut unbounded = BillingBook::new();
        let mut live = BillingBook::starting(Some(oct));
        let mut restored = BillingBook::starting(Some(oct));
        for (key, value) in &records {
            unbounded.absorb(*key, value.as_deref(), 0).unwrap();
            live.absorb(*key, value.as_deref(), 0).unwrap();
            restored.absorb(*key, value.as_deref(), 0).unwrap();
        }
        restored.finish_restore();
        assert_eq!(unbounded.next_billable(1), Some(old), "without a start, the first month metered");
        for book in [&mut live, &mut restored] {
            assert_eq!(book.next_billable(1), Some(oct));
            assert!(!book.has_crossings_to_check());
            assert!(book.alerts_due(&subs).is_empty());
            let refused = book.refused_shares(grid());
            assert_eq!(refused.len(), 1);
            assert_eq!(
                (refused[0].reason, refused[0].key.to_bytes()),
                (RejectReason::BeforeStart, b"u/1/2000-01/0".to_vec())
            );
            let october = bill(book, "2026-10", &subs);
            assert_eq!(october.usage.iter().map(|u| u.mau).sum::<u64>(), 5);
        }
    }

    /// Restored from the changelog, the book is the one that wrote it: a share written
    /// after the bill took its snapshot (before the mark in the log, never deleted) is late.
    #[test]
    fn a_restore_from_the_records_gives_the_same_book() {
        let subs = plans();
        let oct = month("2026-10");
        let mut restored = BillingBook::new();
        let mut records: Vec<(ChangelogKey, Option<Vec<u8>>)> = vec![
            (
                ChangelogKey::Usage { app_id: STANDARD, month: oct, source: 0 },
                Some(share(oct, 0..5).aggregate.encode()),
            ),
            (ChangelogKey::QuotaCrossed { app_id: DEVELOPER, month: oct, source: 0 }, Some(Vec::new())),
            (ChangelogKey::Alerted { app_id: DEVELOPER, month: oct }, Some(b"1".to_vec())),
            (
                ChangelogKey::Usage { app_id: STANDARD, month: oct, source: 1 },
                Some(share(oct, 5..9).aggregate.encode()),
            ),
            (ChangelogKey::ClosedThrough { source: 0 }, Some(mark("2026-10", "2026-10").encode())),
            (ChangelogKey::Billed, Some(b"2026-10".to_vec())),
        ];
        // The bill deleted the one share it had.
        records.push((ChangelogKey::Usage { app_id: STANDARD, month: oct, source: 0 }, None));
        for (key, value) in &records {
            restored.absorb(*key, value.as_deref(), 0).unwrap();
        }
        restored.finish_restore();
        assert_eq!(restored.billed_through(), Some(oct));
        let late: Vec<Vec<u8>> = restored.refused_shares(grid()).iter().map(|l| l.key.to_bytes()).collect();
        assert_eq!(late, [b"u/1/2026-10/1".to_vec()]);
        assert!(bill(&restored, "2026-11", &subs).usage.iter().all(|u| u.mau == 0));
        assert!(restored.alerts_due(&subs).is_empty(), "October's crossing is billed and gone");
        assert!(matches!(
            restored.absorb(ChangelogKey::Billed, Some(b"not a month"), 0),
            Err(BookError::Unreadable { .. })
        ));
    }

    #[test]
    fn quota_alerts_are_due_once_and_only_for_developer_apps() {
        let subs = plans();
        let nov = month("2026-11");
        let mut book = BillingBook::new();
        for (app_id, source) in [(DEVELOPER, 0), (DEVELOPER, 1), (STANDARD, 0)] {
            book.absorb(ChangelogKey::QuotaCrossed { app_id, month: nov, source }, Some(b""), 0).unwrap();
        }
        assert!(book.has_crossings_to_check());
        let due = book.alerts_due(&subs);
        assert_eq!(due.iter().map(|a| (a.app_id, a.mau)).collect::<Vec<_>>(), [(DEVELOPER, 101)]);
        assert!(book.has_crossings_to_check(), "due until published");
        book.alerted(&due);
        assert!(!book.has_crossings_to_check(), "published, and the Standard app declined");
        // At the month's end the alert is not repeated; its mark goes with the month.
        book.add_share(nov, DEVELOPER, 0, share(nov, 0..150));
        let billed = bill(&book, "2026-11", &subs);
        assert!(billed.alerts.is_empty());
        assert!(billed.dropped.iter().any(|(k, _)| k.to_bytes() == b"a/2/2026-11"));
    }

    /// The quota alert follows the plan in force when the Developer app passed 100 users
    /// (day by day, each day on the plan at its end, as the plan fee counts), not the plan at
    /// the month's end: the same at the month's end as live, in any order of the events. (A
    /// paid plan never goes back to Developer, so no app becomes one while over the cap.)
    #[test]
    fn the_quota_alert_follows_the_plan_on_the_day_the_cap_was_passed() {
        const UPGRADED: AppId = 10;
        const UPGRADED_FIRST: AppId = 11;
        let subs = subscriptions(&[
            // Developer until November 20, then Standard.
            r#"{"type":"app_created","app_id":10,"ts":"2025-01-01T00:00:00+08:00","account_id":"a"}"#,
            r#"{"type":"plan_changed","app_id":10,"ts":"2026-11-20T10:00:00+08:00","plan":"standard"}"#,
            // Standard from November 5 (10:00, so that day is Standard's), before its 101st user.
            r#"{"type":"app_created","app_id":11,"ts":"2025-01-01T00:00:00+08:00","account_id":"a"}"#,
            r#"{"type":"plan_changed","app_id":11,"ts":"2026-11-05T10:00:00+08:00","plan":"standard"}"#,
        ]);
        let nov = month("2026-11");
        // 60 users on November 1, 41 more on November 7 (the 101st), 30 more on the 25th;
        // logged in the other way round (the latest day first).
        let share = || {
            let mut aggregate = AppMonthAggregate::new(crate::aggregate::Counting::default(), false);
            for (day, users) in [(25, 101..131), (7, 60..101), (1, 0..60)] {
                for u in users {
                    aggregate.record_login(nov.day(day).unwrap(), UserKey::of(&format!("u-{u}")));
                }
            }
            Share { aggregate, parts: 0 }
        };
        let mut book = BillingBook::new();
        for app_id in [UPGRADED, UPGRADED_FIRST] {
            book.add_share(nov, app_id, 0, share());
        }
        let billed = bill(&book, "2026-11", &subs);
        let alerted: Vec<(AppId, u64)> = billed.alerts.iter().map(|a| (a.app_id, a.mau)).collect();
        assert_eq!(alerted, [(UPGRADED, 131)], "at the month's end");

        // Live: each crossing marker says the day its partition passed 100 users.
        let mut live = BillingBook::new();
        for app_id in [UPGRADED, UPGRADED_FIRST] {
            live.absorb(ChangelogKey::QuotaCrossed { app_id, month: nov, source: 0 }, Some(b"7"), 0).unwrap();
        }
        let due: Vec<AppId> = live.alerts_due(&subs).iter().map(|a| a.app_id).collect();
        assert_eq!(due, [UPGRADED], "live");
        let unreadable = ChangelogKey::QuotaCrossed { app_id: UPGRADED, month: nov, source: 1 };
        assert!(live.absorb(unreadable, Some(b"32"), 0).is_err(), "November has no 32nd");
    }

    /// Which months were billed before a subscription record was read, from the positions
    /// each bill wrote: the same from the records as live.
    #[test]
    fn the_months_billed_before_a_subscription_record_was_read() {
        let month = |m: &str| m.parse::<Month>().unwrap();
        let mut book = BillingBook::new();
        let sep = SubscriptionsRead([(0, 5), (1, 2)].into_iter().collect());
        let oct = SubscriptionsRead([(0, 9)].into_iter().collect());
        assert_eq!(SubscriptionsRead::decode(&sep.encode()).unwrap(), sep);
        assert!(SubscriptionsRead::decode(b"0=x").is_err());
        let key = ChangelogKey::SubscriptionsRead { month: month("2026-09") };
        assert_eq!(ChangelogKey::from_bytes(&key.to_bytes()).unwrap(), key);
        book.absorb(key, Some(&sep.encode()), 0).unwrap();
        book.subscriptions_read(month("2026-10"), oct);
        let positions = book.billed_positions();
        // Partition 0: offsets 0..5 read before September's bill, 5..9 before October's.
        assert_eq!(positions.first_open_when_read(0, 4), None);
        assert_eq!(positions.first_open_when_read(0, 5), Some(month("2026-10")));
        assert_eq!(positions.first_open_when_read(0, 9), Some(month("2026-11")));
        // Partition 1 is not named in October's positions: nothing new of it was read then.
        assert_eq!(positions.first_open_when_read(1, 1), None);
        assert_eq!(positions.first_open_when_read(1, 2), Some(month("2026-11")));
    }

    /// A month billed in parts of any size, with a restore from the changelog after any
    /// committed part, publishes exactly what one transaction would: every app once, every
    /// record dropped once; and the changelog ends as after one transaction.
    #[test]
    fn a_bill_in_parts_resumed_after_any_part_equals_the_bill_in_one() {
        let subs = plans();
        let nov = month("2026-11");
        let mut records: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::new();
        for app in [STANDARD, DEVELOPER, 5, 6, 7, 8, 9] {
            let key = ChangelogKey::Usage { app_id: app, month: nov, source: 0 };
            records.push((key.to_bytes(), Some(share(nov, 0..app as u32).aggregate.encode())));
        }
        records.push((
            ChangelogKey::QuotaCrossed { app_id: 7, month: nov, source: 0 }.to_bytes(),
            Some(Vec::new()),
        ));
        let mark = ClosedMark { through: nov, first_active: Some(nov) };
        records.push((ChangelogKey::ClosedThrough { source: 0 }.to_bytes(), Some(mark.encode())));
        // The latest value of each key, as compaction leaves the log.
        let compacted = |log: &[(Vec<u8>, Option<Vec<u8>>)]| {
            let mut latest = BTreeMap::new();
            for (key, value) in log {
                latest.insert(key.clone(), value.clone());
            }
            latest.into_iter().filter_map(|(k, v)| Some((k, v?))).collect::<BTreeMap<_, _>>()
        };
        let book_of = |log: &[(Vec<u8>, Option<Vec<u8>>)]| {
            let mut book = BillingBook::new();
            for (key, value) in compacted(log) {
                book.absorb(ChangelogKey::from_bytes(&key).unwrap(), Some(&value), 0).unwrap();
            }
            book.finish_restore();
            book
        };
        let read = SubscriptionsRead(BTreeMap::from([(0, 4)]));
        let pricing = Pricing { subscriptions: &subs, prices: &PriceBook::default(), grid: grid() };
        // Publishes every part (the book told, or restored from the log after part
        // `crash_after`): the lines published, and the log.
        let publish = |max_apps: usize, crash_after: usize| {
            let mut log = records.clone();
            let mut book = book_of(&log);
            let mut lines: Vec<String> = Vec::new();
            for committed in 1.. {
                let parts = book.bill_in_parts(nov, pricing, [], max_apps, 1 << 20).unwrap();
                let part = parts.into_iter().next().unwrap();
                lines.extend(part.bill.usage.iter().map(|u| format!("{} {}", u.app_id, u.mau)));
                lines.extend(part.bill.charges.iter().map(|c| format!("{} {}", c.charge_id, c.amount)));
                log.extend(part.changelog_records(&read));
                if committed == crash_after {
                    book = book_of(&log);
                } else {
                    book.published(&part, &read);
                }
                if part.last {
                    // (In parts, the lines come app by app.)
                    lines.sort();
                    return (lines, compacted(&log));
                }
            }
            unreachable!()
        };
        let whole = publish(usize::MAX, 0);
        assert_eq!(whole.0.len(), 7 + 2, "seven apps, Standard's two lines");
        let left: Vec<&[u8]> = whole.1.keys().map(Vec::as_slice).collect();
        assert_eq!(left, [b"b".as_slice(), b"s/2026-11", b"w/0"], "only marks left");
        for max_apps in 1..=8 {
            for crash_after in 0..8 {
                assert_eq!(
                    publish(max_apps, crash_after),
                    whole,
                    "parts of {max_apps}, crash after part {crash_after}"
                );
            }
        }
    }
}
