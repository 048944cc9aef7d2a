//! The subscription book: which plan and billing mode every app is on at any instant, and
//! its audio/video call trials.
//!
//! Owns the subscription rules of SPEC §1.1 and §1.2. The book keeps each app's events in
//! the order they arrived and derives the app's plans and trials from them, so that a rule
//! that depends on an event read later (an `app_created` behind a stray plan change) is
//! decided as if the events had come in their proper order:
//!
//! - an app's `app_created` goes first whenever it arrives: events of the app dated before
//!   it are the ones refused (unless the app was already billed as an app that always
//!   existed — then the creation is refused);
//! - an event dated in a month already billed when it was read is *late*: it never changes
//!   that month, it takes effect at the start of the first month still open, and it is
//!   reported (a [`Refusal`] with reason `late`) — a late `app_created` is refused;
//! - an account's 10 trial apps are the first ten by (first trial's date, app id), whatever
//!   order the apps' events were read in, so every billing process gives the same answer.
//!
//! Each app's events come from one subscriptions partition (the topic is keyed by app id),
//! so their arrival order is the same for every reader.

use std::collections::{BTreeMap, BTreeSet};

use crate::ingest::{RejectReason, Rejection, SubscriptionChange, SubscriptionEvent};
use crate::plan::{AppId, BillingMode, Plan, CURRENT_MODE_START};
use crate::time::{BillingTz, Day, Month, Timestamp};

/// Length of an audio/video call free trial: 60 days of 24 hours, `[start, start + 60 d)`.
pub const TRIAL_LENGTH_MS: i64 = 60 * 24 * 3_600_000;
/// Free audio/video call trials an app may start, ever.
pub const MAX_TRIALS_PER_APP: usize = 2;
/// Distinct apps one account may start audio/video call trials for.
pub const MAX_TRIAL_APPS_PER_ACCOUNT: usize = 10;

/// The start of time for apps that were never created: they exist "since forever".
const FOREVER: Timestamp = Timestamp(i64::MIN);

/// Where an event came from, as the caller numbers it (a line, an index into its records);
/// the book hands it back with the event's [`Refusal`].
pub type Origin = u64;

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

/// A subscription event the book refused, or applied late: what to dead-letter, and the
/// month whose bill carries the dead letter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The app.
    pub app_id: AppId,
    /// Where the event came from.
    pub origin: Origin,
    /// The event's month, or for a late event the first open month, where it took effect.
    pub month: Month,
    /// Why.
    pub rejection: Rejection,
}

/// One event as it arrived.
#[derive(Clone, Debug)]
struct Logged {
    event: SubscriptionEvent,
    origin: Origin,
    /// The first month not yet billed when the event was read (`None`: none billed).
    first_open: Option<Month>,
}

/// A trial as the book keeps it: where its event came from, and the date the event gave
/// (its start unless it was late).
#[derive(Clone, Debug)]
struct Started {
    trial: Trial,
    origin: Origin,
    dated: Timestamp,
}

/// What one app's events say, derived from them in [`AppLog::derive`].
#[derive(Clone, Debug)]
struct AppBook {
    /// Creation instant and account, if an `app_created` stands.
    created: Option<(Timestamp, Option<String>)>,
    /// Plan timeline, sorted by start: each plan is in force from its instant until the next
    /// entry's. The first entry is the entry plan at creation (or at [`FOREVER`]).
    plans: Vec<(Timestamp, Plan)>,
    /// When the migration to the current mode takes (or took) effect, if one was applied.
    migration_effective: Option<Timestamp>,
    /// Months (billing zone) in which the one allowed paid↔paid change was used.
    paid_switch_months: BTreeSet<Month>,
    /// Trials in start order.
    trials: Vec<Started>,
    /// Every applied event (effective instant and change), to recognise a producer's retry.
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

    /// The account the app's trials count against: its own (from `app_created`), else the
    /// one its first trial named.
    fn trial_account(&self) -> Option<&str> {
        match &self.created {
            Some((_, Some(own))) => Some(own),
            _ => self.trials.first().and_then(|s| s.trial.account_id.as_deref()),
        }
    }
}

/// One app's events in arrival order, and what they say.
#[derive(Clone, Debug)]
struct AppLog {
    events: Vec<Logged>,
    book: AppBook,
    /// The app's own refusals (and late notes); the account limit is checked on top.
    refused: Vec<Refusal>,
}

fn invalid(detail: String) -> Rejection {
    Rejection::new(RejectReason::InvalidChange, detail)
}

impl AppLog {
    /// Derives the app's book from its events: the first `app_created` first (if it stands),
    /// then every other event in arrival order, each at its effective instant.
    fn derive(app_id: AppId, events: &[Logged], tz: &BillingTz) -> (AppBook, Vec<Refusal>) {
        let at = |ts: Timestamp| ts.to_rfc3339(tz);
        // A late event takes effect at the start of the first month open when it was read.
        let effective = |l: &Logged| match l.first_open {
            Some(open) if tz.month_of(l.event.ts) < open => (tz.start_of_month(open), Some(open)),
            _ => (l.event.ts, None),
        };
        let mut refused = Vec::new();
        let mut refuse = |l: &Logged, month: Month, rejection: Rejection| {
            refused.push(Refusal { app_id, origin: l.origin, month, rejection });
        };
        let mut book = AppBook::implicit();
        let creation =
            events.iter().position(|l| matches!(l.event.change, SubscriptionChange::AppCreated { .. }));
        if let Some(i) = creation {
            let l = &events[i];
            let month = tz.month_of(l.event.ts);
            // An earlier-read event of the app dated in a month that was billed before the
            // creation was read: the app was billed as one that always existed.
            let billed_before = events[..i]
                .iter()
                .map(|e| tz.month_of(effective(e).0))
                .find(|m| l.first_open.is_some_and(|open| *m < open));
            if let (Some(open), true) = (l.first_open, effective(l).1.is_some()) {
                let detail = format!(
                    "app_created at {} is dated in {month}, which was already billed (the app was billed as a \
                     Developer app that always existed); a creation cannot take effect later, so it is not applied \
                     (first open month {open})",
                    at(l.event.ts)
                );
                refuse(l, open, Rejection::new(RejectReason::Late, detail));
            } else if let Some(billed) = billed_before {
                let detail = format!(
                    "app_created at {} arrives after the app was billed for {billed} as a Developer app that \
                     always existed; that history stands",
                    at(l.event.ts)
                );
                refuse(l, month, invalid(detail));
            } else if let SubscriptionChange::AppCreated { account_id } = &l.event.change {
                let mode = if l.event.ts < CURRENT_MODE_START {
                    BillingMode::Original
                } else {
                    BillingMode::Current
                };
                book =
                    AppBook::starting(l.event.ts, Some((l.event.ts, account_id.clone())), mode.entry_plan());
                book.applied.insert((l.event.ts, l.event.change.clone()));
            }
        }
        for (i, l) in events.iter().enumerate() {
            if Some(i) == creation {
                continue;
            }
            let (ts, late) = effective(l);
            let month = late.unwrap_or_else(|| tz.month_of(ts));
            let ev = SubscriptionEvent { ts, ..l.event.clone() };
            if book.applied.contains(&(ts, ev.change.clone())) {
                continue; // a producer's retry
            }
            match book.check(&ev, tz) {
                Ok(()) => {
                    book.apply(&ev, l.event.ts, l.origin, tz);
                    if let Some(open) = late {
                        let detail = format!(
                            "{} dated {} falls in {}, which was already billed; it takes effect from {} instead",
                            ev.change.type_name(),
                            at(l.event.ts),
                            tz.month_of(l.event.ts),
                            at(tz.start_of_month(open))
                        );
                        refuse(l, month, Rejection::new(RejectReason::Late, detail));
                    }
                }
                Err(why) => refuse(l, month, why),
            }
        }
        (book, refused)
    }
}

impl AppBook {
    /// Every rule of SPEC §1.1/§1.2 for one app, without changing anything (the account-wide
    /// trial limit is [`Subscriptions`]'s).
    fn check(&self, ev: &SubscriptionEvent, tz: &BillingTz) -> Result<(), Rejection> {
        let at = |ts: Timestamp| ts.to_rfc3339(tz);
        let kind = ev.change.type_name();
        if let SubscriptionChange::AppCreated { .. } = ev.change {
            return Err(invalid(match &self.created {
                Some((created, account)) => format!(
                    "app {} was already created at {} (account {}); a second app_created is not allowed",
                    ev.app_id,
                    at(*created),
                    account.as_deref().unwrap_or("none")
                ),
                None => format!("app {}: a second app_created is not allowed", ev.app_id),
            }));
        }
        if let Some((created, _)) = &self.created {
            if ev.ts < *created {
                return Err(invalid(format!(
                    "{kind} at {} is dated before the app's creation at {}",
                    at(ev.ts),
                    at(*created)
                )));
            }
        }
        if ev.ts < self.latest {
            return Err(invalid(format!(
                "{kind} at {} is out of order: the app's latest applied change is at {}",
                at(ev.ts),
                at(self.latest)
            )));
        }
        // Not before creation (checked above), so the app exists at `ev.ts`.
        let current = self.plan_at(ev.ts).unwrap_or(Plan::Developer);
        match &ev.change {
            SubscriptionChange::AppCreated { .. } => Ok(()),
            SubscriptionChange::PlanChanged { plan } => {
                let plan = *plan;
                if plan.mode() != current.mode() {
                    let pending = match self.migration_effective {
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
                if current.is_paid() && self.paid_switch_months.contains(&month) {
                    return Err(invalid(format!(
                        "a second change between paid plans in {month} ({current} → {plan}) is not allowed: at most one a month"
                    )));
                }
                Ok(())
            }
            SubscriptionChange::BillingModeMigrated { plan } => {
                if let Some(eff) = self.migration_effective {
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
                if self.trials.len() >= MAX_TRIALS_PER_APP {
                    return Err(invalid(format!(
                        "the app already used its {MAX_TRIALS_PER_APP} audio/video call trials"
                    )));
                }
                if let Some(running) = self.trials.last().map(|s| &s.trial).filter(|t| t.end > ev.ts) {
                    return Err(invalid(format!(
                        "audio/video call trial {} is still running until {}",
                        running.number,
                        at(running.end)
                    )));
                }
                if let (Some(own), Some(named)) = (self.trial_account(), account_id.as_deref()) {
                    if own != named {
                        return Err(invalid(format!(
                            "the trial names account {named}, but the app's trials count against account {own}"
                        )));
                    }
                }
                Ok(())
            }
        }
    }

    /// Applies an event [`AppBook::check`] passed.
    fn apply(&mut self, ev: &SubscriptionEvent, dated: Timestamp, origin: Origin, tz: &BillingTz) {
        match &ev.change {
            SubscriptionChange::AppCreated { .. } => {}
            SubscriptionChange::PlanChanged { plan } => {
                if self.plan_at(ev.ts).is_some_and(Plan::is_paid) {
                    self.paid_switch_months.insert(tz.month_of(ev.ts));
                }
                self.insert_plan(ev.ts, *plan);
            }
            SubscriptionChange::BillingModeMigrated { plan } => {
                let effective = tz.end_of_month(tz.month_of(ev.ts));
                self.migration_effective = Some(effective);
                self.insert_plan(effective, *plan);
            }
            SubscriptionChange::AvCallTrialStarted { account_id } => {
                let account = self.trial_account().map(str::to_string).or_else(|| account_id.clone());
                let trial = Trial {
                    number: self.trials.len() + 1,
                    start: ev.ts,
                    end: Timestamp(ev.ts.0.saturating_add(TRIAL_LENGTH_MS)),
                    account_id: account,
                };
                self.trials.push(Started { trial, origin, dated });
            }
        }
        self.applied.insert((ev.ts, ev.change.clone()));
        self.latest = self.latest.max(ev.ts);
    }
}

/// The subscription book of all apps, in one billing time zone.
#[derive(Clone, Debug)]
pub struct Subscriptions {
    tz: BillingTz,
    apps: BTreeMap<AppId, AppLog>,
    /// For each account, the apps that started trials against it, by (first trial's
    /// start, app): the first [`MAX_TRIAL_APPS_PER_ACCOUNT`] count.
    trial_apps: BTreeMap<String, BTreeSet<(Timestamp, AppId)>>,
    /// Events recorded so far (the origin [`Subscriptions::apply`] gives).
    recorded: u64,
}

impl Subscriptions {
    /// An empty book; months and days are those of `tz`.
    pub fn new(tz: BillingTz) -> Self {
        Subscriptions { tz, apps: BTreeMap::new(), trial_apps: BTreeMap::new(), recorded: 0 }
    }

    /// The billing time zone.
    pub fn tz(&self) -> &BillingTz {
        &self.tz
    }

    /// Every app some event counts for, in ascending id order.
    pub fn apps(&self) -> impl Iterator<Item = AppId> + '_ {
        self.apps.iter().filter(|(&app, log)| self.counts_for(app, &log.book)).map(|(app, _)| *app)
    }

    /// Whether some applied event of the app counts (a trial its account refused does not).
    fn counts_for(&self, app: AppId, book: &AppBook) -> bool {
        book.applied.len() > book.trials.len() || (!book.trials.is_empty() && self.trials_admitted(app))
    }

    fn book(&self, app: AppId) -> Option<&AppBook> {
        self.apps.get(&app).map(|log| &log.book)
    }

    /// When the app was created (`None`: never created, so it exists since forever).
    pub fn created_at(&self, app: AppId) -> Option<Timestamp> {
        self.book(app).and_then(|b| b.created.as_ref()).map(|(ts, _)| *ts)
    }

    /// The plan in force at `ts`; `None` if the app did not exist yet. An unknown app is a
    /// Developer app.
    pub fn plan_at(&self, app: AppId, ts: Timestamp) -> Option<Plan> {
        match self.book(app) {
            None => Some(Plan::Developer),
            Some(book) => book.plan_at(ts),
        }
    }

    /// The plan of calendar day `day`: the one in force at its end, as the plan fee counts
    /// days; `None` if the app did not exist then.
    pub fn plan_on(&self, app: AppId, day: Day) -> Option<Plan> {
        let date = day.date();
        let next = self.tz.start_of_date(date.succ_opt().unwrap_or(date));
        self.plan_at(app, Timestamp(next.0 - 1))
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
        self.book(app).and_then(|b| b.migration_effective)
    }

    /// Whether the app's trials count: its account has not reached
    /// [`MAX_TRIAL_APPS_PER_ACCOUNT`] other apps whose first trial came before its own (by
    /// start, then app id).
    fn trials_admitted(&self, app: AppId) -> bool {
        let Some(key) = self.book(app).and_then(trial_key) else { return true };
        let earlier = self.trial_apps.get(&key.0).map_or(0, |apps| apps.range(..(key.1, app)).count());
        earlier < MAX_TRIAL_APPS_PER_ACCOUNT
    }

    /// The app's audio/video call trials that count, in start order.
    pub fn trials(&self, app: AppId) -> Vec<&Trial> {
        match self.book(app) {
            Some(book) if self.trials_admitted(app) => book.trials.iter().map(|s| &s.trial).collect(),
            _ => Vec::new(),
        }
    }

    /// The app's trials overlapping `month` (billing zone).
    pub fn trials_in(&self, app: AppId, month: Month) -> impl Iterator<Item = &Trial> + '_ {
        let (start, end) = (self.tz.start_of_month(month), self.tz.end_of_month(month));
        self.trials(app).into_iter().filter(move |t| t.start < end && start < t.end)
    }

    /// Records `ev`, read from `origin` when `first_open` was the first month not yet billed
    /// for the app (`None`: none billed yet), and derives the app's book again.
    pub fn record(&mut self, ev: &SubscriptionEvent, origin: Origin, first_open: Option<Month>) {
        self.recorded += 1;
        let app_id = ev.app_id;
        if let Some(old) = self.book(app_id).and_then(trial_key) {
            self.unlist_trials(app_id, old);
        }
        let mut events = self.apps.remove(&app_id).map(|log| log.events).unwrap_or_default();
        events.push(Logged { event: ev.clone(), origin, first_open });
        let (book, refused) = AppLog::derive(app_id, &events, &self.tz);
        if let Some((account, start)) = trial_key(&book) {
            self.trial_apps.entry(account).or_default().insert((start, app_id));
        }
        self.apps.insert(app_id, AppLog { events, book, refused });
    }

    fn unlist_trials(&mut self, app_id: AppId, (account, start): (String, Timestamp)) {
        if let Some(apps) = self.trial_apps.get_mut(&account) {
            apps.remove(&(start, app_id));
        }
    }

    /// Records `ev` (its origin: how many events were recorded before it) as read before
    /// any month was billed, and says whether it was applied. A later event can still
    /// refuse it (see the module documentation): [`Subscriptions::refusals`] has the last
    /// word.
    pub fn apply(&mut self, ev: &SubscriptionEvent) -> Result<(), Rejection> {
        let origin = self.recorded;
        self.record(ev, origin, None);
        match self.refusals(ev.app_id).into_iter().find(|r| r.origin == origin) {
            Some(refusal) => Err(refusal.rejection),
            None => Ok(()),
        }
    }

    /// Whether some event counts for the app (it is one of [`Subscriptions::apps`]).
    pub fn knows(&self, app: AppId) -> bool {
        self.apps.get(&app).is_some_and(|log| self.counts_for(app, &log.book))
    }

    /// Every app some event was recorded for, applied or refused, in ascending id order.
    pub fn apps_logged(&self) -> impl Iterator<Item = AppId> + '_ {
        self.apps.keys().copied()
    }

    /// The app's refused events and late notes as of now, in arrival order.
    pub fn refusals(&self, app: AppId) -> Vec<Refusal> {
        let Some(log) = self.apps.get(&app) else { return Vec::new() };
        let mut refusals = log.refused.clone();
        if !self.trials_admitted(app) {
            let account = log.book.trial_account().unwrap_or_default();
            for Started { trial, origin, .. } in &log.book.trials {
                let detail = format!(
                    "account {account} already trialled audio/video calls on {MAX_TRIAL_APPS_PER_ACCOUNT} apps \
                     whose first trial started earlier, at most {MAX_TRIAL_APPS_PER_ACCOUNT} allowed"
                );
                let month = self.tz.month_of(trial.start);
                refusals.push(Refusal { app_id: app, origin: *origin, month, rejection: invalid(detail) });
            }
        }
        let order: BTreeMap<Origin, usize> =
            log.events.iter().enumerate().map(|(i, l)| (l.origin, i)).collect();
        refusals.sort_by_key(|r| order.get(&r.origin).copied());
        refusals
    }
}

/// Where an app stands in its account's trial queue: the account and its first trial's
/// start (the event's own date, late or not, so that every reader ranks it alike).
fn trial_key(book: &AppBook) -> Option<(String, Timestamp)> {
    let first = book.trials.first()?;
    Some((book.trial_account()?.to_string(), first.dated))
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

    /// What the book says about every app: plans, creation, migration, counted trials.
    fn view(subs: &Subscriptions) -> String {
        let apps: Vec<_> = subs
            .apps()
            .map(|a| {
                let book = subs.book(a).unwrap();
                (a, &book.created, &book.plans, book.migration_effective, subs.trials(a))
            })
            .collect();
        format!("{apps:?}")
    }

    /// Applies and expects a rejection whose detail mentions `needle`; what the book says
    /// is unchanged.
    fn rejected(subs: &mut Subscriptions, e: SubscriptionEvent, needle: &str) {
        let before = view(subs);
        let err = subs.apply(&e).unwrap_err();
        assert_eq!(err.reason, RejectReason::InvalidChange, "{err}");
        assert!(err.detail.contains(needle), "{:?} should mention {needle:?}", err.detail);
        assert_eq!(view(subs), before, "a rejected event changed the book");
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
    }

    /// An `app_created` read after a stray event of the app dated before it stands; the
    /// stray event is the one refused (a creation read first refuses it the same way).
    #[test]
    fn a_creation_read_after_an_earlier_dated_event_stands() {
        for creation_first in [false, true] {
            let mut subs = book();
            let stray = trial(1, "2020-01-01T00:00:00Z", None);
            let creation = created(1, "2021-05-01T00:00:00+08:00", Some("acct"));
            let events = if creation_first { [&creation, &stray] } else { [&stray, &creation] };
            for e in events {
                subs.apply(e).ok();
            }
            subs.apply(&changed(1, "2026-10-01T00:00:00Z", Plan::Pro)).unwrap();
            assert_eq!(subs.created_at(1), Some(ts("2021-05-01T00:00:00+08:00")), "{creation_first}");
            assert_eq!(subs.billing_mode_at(1, ts("2026-11-01T00:00:00Z")), Some(BillingMode::Original));
            assert_eq!(subs.plan_at(1, ts("2026-11-01T00:00:00Z")), Some(Plan::Pro));
            assert!(subs.trials(1).is_empty());
            let refusals = subs.refusals(1);
            assert_eq!(refusals.len(), 1, "{refusals:?}");
            assert_eq!(refusals[0].origin, u64::from(creation_first), "the stray trial is refused");
            assert!(refusals[0].rejection.detail.contains("before the app's creation"), "{refusals:?}");
            assert_eq!(refusals[0].month, "2020-01".parse().unwrap());
        }
    }

    /// A plan change dated in a month already billed when it was read never changes that
    /// month: it takes effect at the start of the first open month, reported as late.
    #[test]
    fn a_late_plan_change_takes_effect_in_the_first_open_month() {
        let (oct, nov): (Month, Month) = ("2026-10".parse().unwrap(), "2026-11".parse().unwrap());
        let mut subs = book();
        subs.record(&created(1, "2026-01-01T00:00:00+08:00", None), 0, None);
        subs.record(&changed(1, "2026-10-31T23:30:00+08:00", Plan::Premium), 1, Some(nov));
        assert_eq!(subs.plan_at_month_end(1, oct), Some(Plan::Developer), "October stays as billed");
        assert_eq!(subs.plan_at(1, ts("2026-11-01T00:00:00+08:00")), Some(Plan::Premium));
        assert_eq!(subs.plan_at(1, ts("2026-10-31T23:59:00+08:00")), Some(Plan::Developer));
        let refusals = subs.refusals(1);
        assert_eq!(refusals.len(), 1, "{refusals:?}");
        let late = &refusals[0];
        assert_eq!((late.origin, late.month, late.rejection.reason), (1, nov, RejectReason::Late));
        assert!(late.rejection.detail.contains("2026-11-01T00:00:00+08:00"), "{late:?}");
        // Read while October was still open, the same event changes October.
        let mut on_time = book();
        on_time.record(&created(1, "2026-01-01T00:00:00+08:00", None), 0, None);
        on_time.record(&changed(1, "2026-10-31T23:30:00+08:00", Plan::Premium), 1, Some(oct));
        assert_eq!(on_time.plan_at_month_end(1, oct), Some(Plan::Premium));
        assert!(on_time.refusals(1).is_empty());
    }

    /// A creation cannot take effect later than its date, and cannot rewrite months the app
    /// was billed for as an app that always existed: then it is the one refused.
    #[test]
    fn a_creation_after_billed_history_is_refused() {
        let nov: Month = "2026-11".parse().unwrap();
        let mut late = book();
        late.record(&created(1, "2026-10-05T00:00:00+08:00", Some("acct")), 0, Some(nov));
        assert_eq!(late.created_at(1), None);
        assert_eq!(late.refusals(1)[0].rejection.reason, RejectReason::Late);
        assert!(late.apps().next().is_none(), "a refused creation makes no app");

        let mut billed = book();
        billed.record(&changed(1, "2026-10-05T00:00:00+08:00", Plan::Standard), 0, None);
        billed.record(&created(1, "2026-11-02T00:00:00+08:00", None), 1, Some(nov));
        assert_eq!(billed.created_at(1), None);
        assert_eq!(billed.plan_at(1, ts("2026-11-05T00:00:00+08:00")), Some(Plan::Standard));
        let refusals = billed.refusals(1);
        assert_eq!(refusals.len(), 1, "{refusals:?}");
        assert_eq!(refusals[0].origin, 1);
        assert!(refusals[0].rejection.detail.contains("billed for 2026-10"), "{refusals:?}");
    }

    /// Two billing processes that read the same trials in different orders (the apps' events
    /// sit in different subscriptions partitions) give every app the same trials and refusals.
    #[test]
    fn the_account_trial_limit_does_not_depend_on_the_reading_order() {
        // Apps 1..=14 of one account; even apps in one partition, odd in another; the
        // later-numbered apps trial earlier.
        let events: Vec<SubscriptionEvent> = (1..=14)
            .map(|app| trial(app, &format!("2026-02-{:02}T00:00:00Z", 20 - app), Some("acct")))
            .collect();
        let (even, odd): (Vec<_>, Vec<_>) = events.iter().partition(|e| e.app_id % 2 == 0);
        let orders: Vec<Vec<&SubscriptionEvent>> = vec![
            even.iter().chain(&odd).copied().collect(),
            odd.iter().chain(&even).copied().collect(),
            odd.iter().zip(&even).flat_map(|(a, b)| [*a, *b]).collect(),
            events.iter().rev().collect(),
        ];
        let outcome = |order: &Vec<&SubscriptionEvent>| {
            let mut subs = book();
            for e in order {
                // The origin names the event, whatever the order.
                subs.record(e, e.app_id, None);
            }
            let refused: Vec<_> = (1..=14).flat_map(|a| subs.refusals(a)).collect();
            (view(&subs), refused)
        };
        let first = outcome(&orders[0]);
        for order in &orders[1..] {
            assert_eq!(outcome(order), first);
        }
        // The ten earliest trials count: apps 5..=14; apps 1..=4 are refused.
        let refused: Vec<Origin> = first.1.iter().map(|r| r.origin).collect();
        assert_eq!(refused, vec![1, 2, 3, 4], "{:?}", first.1);
        assert!(first.1.iter().all(|r| r.rejection.detail.contains("at most 10")));
    }

    /// An app whose trial stops counting for an account (its creation, read later, names
    /// another) no longer takes one of that account's ten places.
    #[test]
    fn a_trial_that_stops_counting_frees_its_place() {
        let mut subs = book();
        subs.apply(&trial(1, "2026-01-01T00:00:00Z", Some("a"))).unwrap();
        for app in 2..=11 {
            subs.apply(&trial(app, "2026-02-01T00:00:00Z", Some("a"))).unwrap_or(());
        }
        assert!(subs.trials(11).is_empty(), "app 1 holds a place: app 11 is the eleventh");
        subs.apply(&created(1, "2025-01-01T00:00:00Z", Some("b"))).unwrap();
        assert!(subs.trials(1).is_empty());
        assert!(subs.refusals(1)[0].rejection.detail.contains("count against account b"));
        assert_eq!(subs.trials(11).len(), 1, "app 11 is among account a's ten now");
        assert!(subs.refusals(11).is_empty());
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
        let before = view(&subs);
        for e in &events {
            subs.apply(e).unwrap();
        }
        assert_eq!(view(&subs), before);
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
        subs.apply(&trial(14, "2026-02-01T00:00:00Z", Some("other"))).unwrap();
        subs.apply(&trial(13, "2026-02-01T00:00:00Z", None)).unwrap();
    }
}
