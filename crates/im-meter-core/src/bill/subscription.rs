//! The subscription book: which plan and billing mode every app is on at any instant, and
//! its audio/video call trials.
//!
//! Owns the subscription rules of SPEC §1.1 and §1.2. [`Subscriptions::apply`] checks an
//! event against every rule before it touches any state, so a rejected event never changes
//! the book; pricing then only asks questions (plan at an instant, trials of a month).

use std::collections::{BTreeMap, BTreeSet};

use crate::ingest::{RejectReason, Rejection, SubscriptionChange, SubscriptionEvent};
use crate::plan::{AppId, BillingMode, Plan, CURRENT_MODE_START};
use crate::time::{BillingTz, Month, Timestamp};

/// Length of an audio/video call free trial: 60 days of 24 hours, `[start, start + 60 d)`.
pub const TRIAL_LENGTH_MS: i64 = 60 * 24 * 3_600_000;
/// Free audio/video call trials an app may start, ever.
pub const MAX_TRIALS_PER_APP: usize = 2;
/// Distinct apps one account may start audio/video call trials for.
pub const MAX_TRIAL_APPS_PER_ACCOUNT: usize = 10;

/// The start of time for apps that were never created: they exist "since forever".
const FOREVER: Timestamp = Timestamp(i64::MIN);

/// One audio/video call free trial of an app.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trial {
    /// 1-based number of the trial within its app (1 or 2).
    pub number: usize,
    /// First instant of the trial.
    pub start: Timestamp,
    /// First instant after the trial (`start` + 60 days).
    pub end: Timestamp,
    /// The account the trial counts against, where known.
    pub account_id: Option<String>,
}

/// Everything known about one app's subscription.
#[derive(Clone, Debug)]
struct AppBook {
    /// Creation instant and account, if an `app_created` was applied.
    created: Option<(Timestamp, Option<String>)>,
    /// Plan timeline, sorted by start: each plan is in force from its instant until the next
    /// entry's. The first entry is the entry plan at creation (or at [`FOREVER`]).
    plans: Vec<(Timestamp, Plan)>,
    /// When the migration to the current mode takes (or took) effect, if one was applied.
    migration_effective: Option<Timestamp>,
    /// Months (billing zone) in which the one allowed paid↔paid change was used.
    paid_switch_months: BTreeSet<Month>,
    /// Trials in start order.
    trials: Vec<Trial>,
    /// Every applied event (instant and change), to recognise a producer's retry.
    applied: BTreeSet<(Timestamp, SubscriptionChange)>,
    /// The latest applied event's instant.
    latest: Timestamp,
}

impl AppBook {
    /// An app that was never created: Developer, current mode, since forever.
    fn implicit() -> Self {
        Self::starting(FOREVER, None, Plan::Developer)
    }

    fn starting(at: Timestamp, created: Option<(Timestamp, Option<String>)>, plan: Plan) -> Self {
        AppBook {
            created,
            plans: vec![(at, plan)],
            migration_effective: None,
            paid_switch_months: BTreeSet::new(),
            trials: Vec::new(),
            applied: BTreeSet::new(),
            latest: at,
        }
    }

    /// The plan in force at `ts`, or `None` before the app existed.
    fn plan_at(&self, ts: Timestamp) -> Option<Plan> {
        let n = self.plans.partition_point(|(from, _)| *from <= ts);
        n.checked_sub(1).map(|i| self.plans[i].1)
    }

    /// Inserts a plan in force from `at`, after any entry starting at the same instant (so
    /// that same-instant changes keep their application order).
    fn insert_plan(&mut self, at: Timestamp, plan: Plan) {
        let i = self.plans.partition_point(|(from, _)| *from <= at);
        self.plans.insert(i, (at, plan));
    }
}

/// The subscription book of all apps, in one billing time zone.
#[derive(Clone, Debug)]
pub struct Subscriptions {
    tz: BillingTz,
    apps: BTreeMap<AppId, AppBook>,
    /// For each account, the apps it started trials for (the 10-app limit).
    trial_apps: BTreeMap<String, BTreeSet<AppId>>,
}

fn invalid(detail: String) -> Rejection {
    Rejection::new(RejectReason::InvalidChange, detail)
}

impl Subscriptions {
    /// An empty book; months and days are those of `tz`.
    pub fn new(tz: BillingTz) -> Self {
        Subscriptions { tz, apps: BTreeMap::new(), trial_apps: BTreeMap::new() }
    }

    /// The billing time zone.
    pub fn tz(&self) -> &BillingTz {
        &self.tz
    }

    /// Every app some event was applied for, in ascending id order.
    pub fn apps(&self) -> impl Iterator<Item = AppId> + '_ {
        self.apps.keys().copied()
    }

    /// When the app was created (`None`: never created, so it exists since forever).
    pub fn created_at(&self, app: AppId) -> Option<Timestamp> {
        self.apps.get(&app).and_then(|b| b.created.as_ref()).map(|(ts, _)| *ts)
    }

    /// The plan in force at `ts`; `None` if the app did not exist yet. An unknown app is a
    /// Developer app.
    pub fn plan_at(&self, app: AppId, ts: Timestamp) -> Option<Plan> {
        match self.apps.get(&app) {
            None => Some(Plan::Developer),
            Some(book) => book.plan_at(ts),
        }
    }

    /// The billing mode in force at `ts` (that of the plan in force); `None` before creation.
    pub fn billing_mode_at(&self, app: AppId, ts: Timestamp) -> Option<BillingMode> {
        self.plan_at(app, ts).map(Plan::mode)
    }

    /// The plan in force at the last instant of `month`, which sets the month's billing mode,
    /// quotas and overage; `None` if the app was created after the month.
    pub fn plan_at_month_end(&self, app: AppId, month: Month) -> Option<Plan> {
        self.plan_at(app, Timestamp(self.tz.end_of_month(month).0 - 1))
    }

    /// The billing mode of `month`: that of the plan in force at its end (a migration filed
    /// during the month leaves it original); `None` if the app was created after the month.
    pub fn billing_mode_of_month(&self, app: AppId, month: Month) -> Option<BillingMode> {
        self.plan_at_month_end(app, month).map(Plan::mode)
    }

    /// When the app's migration to the current mode takes (or took) effect, if it migrated.
    pub fn migration_effective(&self, app: AppId) -> Option<Timestamp> {
        self.apps.get(&app).and_then(|b| b.migration_effective)
    }

    /// The app's audio/video call trials, in start order.
    pub fn trials(&self, app: AppId) -> &[Trial] {
        self.apps.get(&app).map_or(&[], |b| &b.trials)
    }

    /// The app's trials overlapping `month` (billing zone).
    pub fn trials_in(&self, app: AppId, month: Month) -> impl Iterator<Item = &Trial> + '_ {
        let (start, end) = (self.tz.start_of_month(month), self.tz.end_of_month(month));
        self.trials(app).iter().filter(move |t| t.start < end && start < t.end)
    }

    /// Checks `ev` against every subscription rule and, if it passes, applies it.
    ///
    /// Events must come in timestamp order per app (equal instants are applied in arrival
    /// order); one dated before the app's latest applied event is rejected, since rules such
    /// as "never while a trial runs" were checked against the later state. An exact repeat of
    /// an applied event (a producer's retry) is accepted and changes nothing. A rejected event
    /// changes nothing.
    pub fn apply(&mut self, ev: &SubscriptionEvent) -> Result<(), Rejection> {
        let key = (ev.ts, ev.change.clone());
        if self.apps.get(&ev.app_id).is_some_and(|b| b.applied.contains(&key)) {
            return Ok(());
        }
        self.check(ev)?;

        let tz = self.tz;
        if let SubscriptionChange::AppCreated { account_id } = &ev.change {
            let mode = if ev.ts < CURRENT_MODE_START { BillingMode::Original } else { BillingMode::Current };
            let created = Some((ev.ts, account_id.clone()));
            self.apps.insert(ev.app_id, AppBook::starting(ev.ts, created, mode.entry_plan()));
        }
        let book = self.apps.entry(ev.app_id).or_insert_with(AppBook::implicit);
        match &ev.change {
            SubscriptionChange::AppCreated { .. } => {}
            SubscriptionChange::PlanChanged { plan } => {
                if book.plan_at(ev.ts).is_some_and(Plan::is_paid) {
                    book.paid_switch_months.insert(tz.month_of(ev.ts));
                }
                book.insert_plan(ev.ts, *plan);
            }
            SubscriptionChange::BillingModeMigrated { plan } => {
                let effective = tz.end_of_month(tz.month_of(ev.ts));
                book.migration_effective = Some(effective);
                book.insert_plan(effective, *plan);
            }
            SubscriptionChange::AvCallTrialStarted { account_id } => {
                let account = trial_account(account_id, book);
                book.trials.push(Trial {
                    number: book.trials.len() + 1,
                    start: ev.ts,
                    end: Timestamp(ev.ts.0.saturating_add(TRIAL_LENGTH_MS)),
                    account_id: account.clone(),
                });
                if let Some(account) = account {
                    self.trial_apps.entry(account).or_default().insert(ev.app_id);
                }
            }
        }
        book.applied.insert(key);
        book.latest = book.latest.max(ev.ts);
        Ok(())
    }

    /// Every rule of SPEC §1.1/§1.2, without changing anything.
    fn check(&self, ev: &SubscriptionEvent) -> Result<(), Rejection> {
        let tz = &self.tz;
        let at = |ts: Timestamp| ts.to_rfc3339(tz);
        let existing = self.apps.get(&ev.app_id);
        let kind = ev.change.type_name();

        if let Some(book) = existing {
            if let Some((created, account)) = &book.created {
                if let SubscriptionChange::AppCreated { .. } = ev.change {
                    let account = account.as_deref().unwrap_or("none");
                    return Err(invalid(format!(
                        "app {} was already created at {} (account {account}); a second app_created is not allowed",
                        ev.app_id,
                        at(*created)
                    )));
                }
                if ev.ts < *created {
                    return Err(invalid(format!(
                        "{kind} at {} is dated before the app's creation at {}",
                        at(ev.ts),
                        at(*created)
                    )));
                }
            } else if let SubscriptionChange::AppCreated { .. } = ev.change {
                // The app has been billed as a default Developer app since forever; creating
                // it now would rewrite history that earlier events relied on.
                return Err(invalid(format!(
                    "app_created for app {} arrives after other subscription events of the app \
                     were applied (it was treated as a Developer app that always existed)",
                    ev.app_id
                )));
            }
            if ev.ts < book.latest {
                return Err(invalid(format!(
                    "{kind} at {} is out of order: the app's latest applied change is at {}",
                    at(ev.ts),
                    at(book.latest)
                )));
            }
        }
        let implicit;
        let book = match existing {
            Some(book) => book,
            None => {
                implicit = AppBook::implicit();
                &implicit
            }
        };
        // Not before creation (checked above), so the app exists at `ev.ts`.
        let current = book.plan_at(ev.ts).unwrap_or(Plan::Developer);

        match &ev.change {
            SubscriptionChange::AppCreated { .. } => Ok(()),
            SubscriptionChange::PlanChanged { plan } => {
                let plan = *plan;
                if plan.mode() != current.mode() {
                    let pending = match book.migration_effective {
                        Some(eff) if eff > ev.ts => {
                            format!(" (its migration to the current mode takes effect at {})", at(eff))
                        }
                        _ => String::new(),
                    };
                    return Err(invalid(format!(
                        "plan {plan} belongs to the {} billing mode, but at {} the app is billed under the {} mode{pending}",
                        plan.mode(),
                        at(ev.ts),
                        current.mode()
                    )));
                }
                if plan == current {
                    return Err(invalid(format!("the app is already on the {plan} plan at {}", at(ev.ts))));
                }
                if !plan.is_paid() {
                    return Err(invalid(format!(
                        "a change from {current} back to the free {plan} plan is not allowed"
                    )));
                }
                let month = tz.month_of(ev.ts);
                if current.is_paid() && book.paid_switch_months.contains(&month) {
                    return Err(invalid(format!(
                        "a second change between paid plans in {month} ({current} → {plan}) is not allowed: at most one a month"
                    )));
                }
                Ok(())
            }
            SubscriptionChange::BillingModeMigrated { plan } => {
                if let Some(eff) = book.migration_effective {
                    return Err(invalid(format!(
                        "the app already migrated to the current billing mode (effective {}); migration is one-way and happens once",
                        at(eff)
                    )));
                }
                if current.mode() != BillingMode::Original {
                    return Err(invalid(format!(
                        "only apps in the original billing mode can migrate; the app is in the current mode (migration to {plan} refused)"
                    )));
                }
                Ok(())
            }
            SubscriptionChange::AvCallTrialStarted { account_id } => {
                if book.trials.len() >= MAX_TRIALS_PER_APP {
                    return Err(invalid(format!(
                        "the app already used its {MAX_TRIALS_PER_APP} audio/video call trials"
                    )));
                }
                if let Some(running) = book.trials.last().filter(|t| t.end > ev.ts) {
                    return Err(invalid(format!(
                        "audio/video call trial {} is still running until {}",
                        running.number,
                        at(running.end)
                    )));
                }
                let own = book.created.as_ref().and_then(|(_, a)| a.as_deref());
                if let (Some(own), Some(named)) = (own, account_id.as_deref()) {
                    if own != named {
                        return Err(invalid(format!(
                            "the trial names account {named}, but the app belongs to account {own}: a trial counts against the app's own account"
                        )));
                    }
                }
                if let Some(account) = trial_account(account_id, book) {
                    let apps = self.trial_apps.get(&account);
                    let count = apps.map_or(0, BTreeSet::len);
                    let known = apps.is_some_and(|a| a.contains(&ev.app_id));
                    if !known && count >= MAX_TRIAL_APPS_PER_ACCOUNT {
                        return Err(invalid(format!(
                            "account {account} already trialled audio/video calls on {count} apps, at most {MAX_TRIAL_APPS_PER_ACCOUNT} allowed"
                        )));
                    }
                }
                Ok(())
            }
        }
    }
}

/// The account a trial counts against: the app's own (from `app_created`), else the
/// event's, else none.
fn trial_account(event_account: &Option<String>, book: &AppBook) -> Option<String> {
    book.created.as_ref().and_then(|(_, a)| a.clone()).or_else(|| event_account.clone())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn ts(s: &str) -> Timestamp {
        Timestamp::parse_rfc3339(s).unwrap()
    }

    pub(crate) fn ev(app: AppId, at: &str, change: SubscriptionChange) -> SubscriptionEvent {
        SubscriptionEvent { app_id: app, ts: ts(at), change }
    }

    pub(crate) fn created(app: AppId, at: &str, account: Option<&str>) -> SubscriptionEvent {
        ev(app, at, SubscriptionChange::AppCreated { account_id: account.map(Into::into) })
    }

    pub(crate) fn changed(app: AppId, at: &str, plan: Plan) -> SubscriptionEvent {
        ev(app, at, SubscriptionChange::PlanChanged { plan })
    }

    pub(crate) fn migrated(app: AppId, at: &str, plan: Plan) -> SubscriptionEvent {
        ev(app, at, SubscriptionChange::BillingModeMigrated { plan })
    }

    pub(crate) fn trial(app: AppId, at: &str, account: Option<&str>) -> SubscriptionEvent {
        ev(app, at, SubscriptionChange::AvCallTrialStarted { account_id: account.map(Into::into) })
    }

    fn book() -> Subscriptions {
        Subscriptions::new(BillingTz::default())
    }

    /// Applies and expects a rejection whose detail mentions `needle`; the book is unchanged.
    fn rejected(subs: &mut Subscriptions, e: SubscriptionEvent, needle: &str) {
        let before = format!("{subs:?}");
        let err = subs.apply(&e).unwrap_err();
        assert_eq!(err.reason, RejectReason::InvalidChange, "{err}");
        assert!(err.detail.contains(needle), "{:?} should mention {needle:?}", err.detail);
        assert_eq!(format!("{subs:?}"), before, "a rejected event changed the book");
    }

    #[test]
    fn creation_date_sets_the_billing_mode() {
        let mut subs = book();
        subs.apply(&created(1, "2022-12-25T23:30:00+08:00", None)).unwrap();
        subs.apply(&created(2, "2022-12-26T00:00:00+08:00", None)).unwrap();
        let later = ts("2023-01-01T00:00:00Z");
        assert_eq!(subs.plan_at(1, later), Some(Plan::Free));
        assert_eq!(subs.billing_mode_at(1, later), Some(BillingMode::Original));
        assert_eq!(subs.plan_at(2, later), Some(Plan::Developer));
        assert_eq!(subs.billing_mode_at(2, later), Some(BillingMode::Current));
        // Before creation the app does not exist; an unknown app is Developer forever.
        assert_eq!(subs.plan_at(2, ts("2022-12-25T00:00:00Z")), None);
        assert_eq!(subs.plan_at(99, ts("2001-01-01T00:00:00Z")), Some(Plan::Developer));
        assert_eq!(subs.created_at(1), Some(ts("2022-12-25T23:30:00+08:00")));
        assert_eq!(subs.apps().collect::<Vec<_>>(), vec![1, 2]);
    }

    /// The original-mode cut-off is one instant, 2022-12-26T00:00+08:00, whatever zone the
    /// bills are made in.
    #[test]
    fn the_original_mode_cut_off_is_one_instant_in_every_billing_zone() {
        for zone in ["UTC", "+08:00", "America/Los_Angeles", "+14:00"] {
            let mut subs = Subscriptions::new(zone.parse().unwrap());
            subs.apply(&created(1, "2022-12-25T15:59:59Z", None)).unwrap();
            subs.apply(&created(2, "2022-12-26T00:00:00+08:00", None)).unwrap();
            let later = ts("2023-02-01T00:00:00Z");
            assert_eq!(subs.billing_mode_at(1, later), Some(BillingMode::Original), "{zone}");
            assert_eq!(subs.billing_mode_at(2, later), Some(BillingMode::Current), "{zone}");
        }
    }

    /// A trial counts against the app's own account: a trial event naming another account
    /// cannot move it elsewhere (and so past the 10-app limit).
    #[test]
    fn a_trial_counts_against_the_apps_own_account() {
        let mut subs = book();
        for app in 1..=11 {
            subs.apply(&created(app, "2026-01-01T00:00:00Z", Some("acct"))).unwrap();
        }
        for app in 1..=10 {
            subs.apply(&trial(app, "2026-02-01T00:00:00Z", None)).unwrap();
        }
        rejected(&mut subs, trial(11, "2026-02-01T00:00:00Z", Some("elsewhere")), "account acct");
        rejected(&mut subs, trial(11, "2026-02-01T00:00:00Z", None), "at most 10");
        // An app created without an account: the event's account is the one there is.
        subs.apply(&created(12, "2026-01-01T00:00:00Z", None)).unwrap();
        subs.apply(&trial(12, "2026-02-01T00:00:00Z", Some("solo"))).unwrap();
        assert_eq!(subs.trials(12)[0].account_id.as_deref(), Some("solo"));
        // Naming its own account is fine.
        subs.apply(&created(13, "2026-01-01T00:00:00Z", Some("other"))).unwrap();
        subs.apply(&trial(13, "2026-02-01T00:00:00Z", Some("other"))).unwrap();
    }

    #[test]
    fn creation_rules() {
        let mut subs = book();
        let first = created(1, "2026-01-01T00:00:00Z", Some("acct"));
        subs.apply(&first).unwrap();
        rejected(&mut subs, created(1, "2026-02-01T00:00:00Z", Some("acct")), "already created");
        rejected(&mut subs, created(1, "2026-01-01T00:00:00Z", Some("other")), "already created");
        rejected(&mut subs, changed(1, "2025-12-31T00:00:00Z", Plan::Standard), "before the app's creation");
        // An app implicitly Developer cannot be created afterwards.
        subs.apply(&changed(2, "2026-01-05T00:00:00Z", Plan::Standard)).unwrap();
        rejected(&mut subs, created(2, "2026-01-06T00:00:00Z", None), "after other subscription events");
    }

    #[test]
    fn exact_repeat_is_accepted_and_changes_nothing() {
        let mut subs = book();
        let events = [
            created(1, "2026-01-01T00:00:00Z", Some("acct")),
            changed(1, "2026-11-02T00:00:00Z", Plan::Standard),
            trial(1, "2026-11-03T00:00:00Z", None),
        ];
        for e in &events {
            subs.apply(e).unwrap();
        }
        let before = format!("{subs:?}");
        for e in &events {
            subs.apply(e).unwrap();
        }
        assert_eq!(format!("{subs:?}"), before);
        assert_eq!(subs.trials(1).len(), 1);
    }

    #[test]
    fn plan_changes_follow_the_rules() {
        let mut subs = book();
        subs.apply(&created(1, "2026-01-01T00:00:00Z", None)).unwrap();
        // Developer → Standard → Premium in one month: one paid↔paid change, allowed.
        subs.apply(&changed(1, "2026-11-02T00:00:00Z", Plan::Standard)).unwrap();
        subs.apply(&changed(1, "2026-11-05T00:00:00Z", Plan::Premium)).unwrap();
        // A second paid↔paid change the same month is rejected; the first is kept.
        rejected(
            &mut subs,
            changed(1, "2026-11-20T00:00:00Z", Plan::Standard),
            "second change between paid plans",
        );
        assert_eq!(subs.plan_at(1, ts("2026-11-25T00:00:00Z")), Some(Plan::Premium));
        // Next month (billing zone) it is allowed again.
        rejected(&mut subs, changed(1, "2026-11-30T15:59:59Z", Plan::Standard), "at most one a month");
        subs.apply(&changed(1, "2026-11-30T16:00:00Z", Plan::Standard)).unwrap();
        rejected(&mut subs, changed(1, "2026-12-03T00:00:00Z", Plan::Developer), "back to the free");
        rejected(
            &mut subs,
            changed(1, "2026-12-03T00:00:00Z", Plan::Standard),
            "already on the standard plan",
        );
        rejected(
            &mut subs,
            changed(1, "2026-12-03T00:00:00Z", Plan::Pro),
            "belongs to the original billing mode",
        );
        rejected(&mut subs, changed(1, "2026-11-29T00:00:00Z", Plan::Premium), "out of order");
    }

    #[test]
    fn original_mode_plan_changes() {
        let mut subs = book();
        subs.apply(&created(1, "2021-05-01T00:00:00+08:00", None)).unwrap();
        rejected(
            &mut subs,
            changed(1, "2026-10-01T00:00:00Z", Plan::Standard),
            "belongs to the current billing mode",
        );
        subs.apply(&changed(1, "2026-10-01T00:00:00Z", Plan::Pro)).unwrap();
        subs.apply(&changed(1, "2026-11-01T00:00:00Z", Plan::Ultimate)).unwrap();
        rejected(&mut subs, changed(1, "2026-11-20T00:00:00Z", Plan::Pro), "at most one a month");
        rejected(&mut subs, changed(1, "2026-11-20T00:00:00Z", Plan::Free), "back to the free");
    }

    #[test]
    fn migration_takes_effect_next_month_and_is_one_way() {
        let mut subs = book();
        subs.apply(&created(1, "2021-05-01T00:00:00+08:00", None)).unwrap();
        subs.apply(&changed(1, "2026-10-01T00:00:00+08:00", Plan::Pro)).unwrap();
        subs.apply(&migrated(1, "2026-11-15T12:00:00+08:00", Plan::Standard)).unwrap();
        let effective = ts("2026-12-01T00:00:00+08:00");
        assert_eq!(subs.migration_effective(1), Some(effective));
        assert_eq!(subs.plan_at(1, Timestamp(effective.0 - 1)), Some(Plan::Pro));
        assert_eq!(subs.plan_at(1, effective), Some(Plan::Standard));
        let nov: Month = "2026-11".parse().unwrap();
        assert_eq!(subs.plan_at_month_end(1, nov), Some(Plan::Pro));
        assert_eq!(subs.billing_mode_of_month(1, nov), Some(BillingMode::Original));
        assert_eq!(subs.billing_mode_of_month(1, nov.next()), Some(BillingMode::Current));
        // Until then the app is original: current-mode changes refused, original ones allowed.
        rejected(
            &mut subs,
            changed(1, "2026-11-20T00:00:00+08:00", Plan::Premium),
            "takes effect at 2026-12-01T00:00:00+08:00",
        );
        subs.apply(&changed(1, "2026-11-20T00:00:00+08:00", Plan::Ultimate)).unwrap();
        assert_eq!(subs.plan_at(1, Timestamp(effective.0 - 1)), Some(Plan::Ultimate));
        assert_eq!(subs.plan_at(1, effective), Some(Plan::Standard));
        rejected(&mut subs, migrated(1, "2026-11-25T00:00:00+08:00", Plan::Premium), "one-way");
        // After it: current-mode rules.
        rejected(&mut subs, changed(1, "2026-12-02T00:00:00+08:00", Plan::Pro), "belongs to the original");
        rejected(&mut subs, changed(1, "2026-12-02T00:00:00+08:00", Plan::Developer), "back to the free");
        subs.apply(&changed(1, "2026-12-02T00:00:00+08:00", Plan::Premium)).unwrap();
        rejected(&mut subs, migrated(1, "2027-01-02T00:00:00+08:00", Plan::Standard), "one-way");
        // A current-mode app cannot migrate.
        subs.apply(&created(2, "2026-01-01T00:00:00Z", None)).unwrap();
        rejected(&mut subs, migrated(2, "2026-02-01T00:00:00Z", Plan::Standard), "only apps in the original");
    }

    #[test]
    fn trial_rules() {
        let mut subs = book();
        subs.apply(&created(1, "2026-01-01T00:00:00Z", Some("acct"))).unwrap();
        subs.apply(&trial(1, "2026-01-10T00:00:00Z", None)).unwrap();
        // Still running on day 59; the next may start exactly at its end.
        rejected(&mut subs, trial(1, "2026-03-10T23:59:59Z", None), "still running");
        subs.apply(&trial(1, "2026-03-11T00:00:00Z", None)).unwrap();
        rejected(&mut subs, trial(1, "2026-09-01T00:00:00Z", None), "already used its 2");
        assert_eq!(subs.trials(1)[1].number, 2);
        assert_eq!(subs.trials(1)[1].account_id.as_deref(), Some("acct"));

        // One account, at most 10 distinct apps (app 1 already counts for "acct").
        for app in 2..=10 {
            subs.apply(&trial(app, "2026-02-01T00:00:00Z", Some("acct"))).unwrap();
        }
        rejected(&mut subs, trial(11, "2026-02-01T00:00:00Z", Some("acct")), "at most 10");
        // The creator's account counts when the event names none.
        subs.apply(&created(12, "2026-01-01T00:00:00Z", Some("acct"))).unwrap();
        rejected(&mut subs, trial(12, "2026-02-01T00:00:00Z", None), "account acct");
        // An app already counted may start its second trial; other accounts are unaffected.
        subs.apply(&trial(2, "2026-04-02T00:00:00Z", Some("acct"))).unwrap();
        subs.apply(&trial(11, "2026-02-01T00:00:00Z", Some("other"))).unwrap();
        subs.apply(&trial(13, "2026-02-01T00:00:00Z", None)).unwrap();
    }
}
