//! `im-meter replay`: the whole pipeline over NDJSON files, no Kafka.
//!
//! ingest (decode each line, refuse bad ones to the dead-letter output) → aggregate (one
//! [`Meter`] over all events) → bill (subscriptions applied in time order, every billed
//! month closed at input end and priced) → a [`Report`] value the caller prints.
//!
//! Reading and decoding run on the calling thread, metering on a second one (the two
//! stages of [`meter_events`]), so a replay uses up to two cores.
//!
//! The result does not depend on the order of the input lines: the meter is
//! order-insensitive by construction, subscription events are sorted by time before they
//! are applied, and every output list is sorted.

mod dead_letters;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::mpsc;
use std::thread;

use im_meter_core::aggregate::Meter;
use im_meter_core::bill::{BillingBook, Pricing, Share, Subscriptions};
use im_meter_core::ingest::{
    decode_subscription_event, decode_usage_event, Rejection, SubscriptionEvent, UsageEvent,
};
use im_meter_core::plan::AppId;
use im_meter_core::time::{Month, Timestamp};

use crate::config::Config;
use crate::input::{self, ReadStats, Source};
use crate::report::{AuditRow, Report};
pub use dead_letters::DeadLetters;

/// What to replay.
#[derive(Debug, Clone)]
pub struct ReplayInput {
    /// SDK events, NDJSON.
    pub events: Source,
    /// Subscription events, NDJSON.
    pub subscriptions: Option<Source>,
    /// Where refused lines go (`None`: only counted).
    pub dead_letters: Option<PathBuf>,
    /// Also count users exactly and report the sketches' error.
    pub exact: bool,
    /// Show a progress bar on a terminal.
    pub progress: bool,
}

/// Runs the pipeline over the inputs.
pub fn replay(config: &Config, input: &ReplayInput) -> anyhow::Result<Report> {
    if input.events == Source::Stdin && input.subscriptions.as_ref() == Some(&Source::Stdin) {
        anyhow::bail!("--events and --subscriptions cannot both read stdin");
    }
    let mut dead = match &input.dead_letters {
        Some(path) => DeadLetters::to_file(path)?,
        None => DeadLetters::counting(),
    };

    let subscriptions = match &input.subscriptions {
        Some(source) => load_subscriptions(config, source, &mut dead)?,
        None => Subscriptions::new(config.meter.tz),
    };

    let (mut meter, events_read) = meter_events(config, input, &mut dead)?;
    dead.finish()?;

    let mut report = Report {
        usage: Vec::new(),
        charges: Vec::new(),
        alerts: Vec::new(),
        rejected: dead.by_reason().clone(),
        audit: input.exact.then(Vec::new),
        events_read,
    };
    close_and_bill(config, &mut meter, &subscriptions, &mut report)?;
    Ok(report)
}

/// Events decoded per hand-over between the two threads of [`meter_events`].
const BATCH: usize = 4096;

/// Decodes the event lines and applies them to one [`Meter`], as a two-stage pipeline:
/// this thread reads and decodes (refusing bad lines to `dead`), a second thread applies
/// batches of decoded events. The meter is insensitive to order, and the batches keep it
/// anyway; the stages only overlap in time.
fn meter_events(
    config: &Config,
    input: &ReplayInput,
    dead: &mut DeadLetters,
) -> anyhow::Result<(Meter, ReadStats)> {
    let settings = meter_settings(config, input.exact);
    let (batches, received) = mpsc::sync_channel::<Vec<UsageEvent>>(4);
    let (recycle, recycled) = mpsc::channel::<Vec<UsageEvent>>();
    thread::scope(|scope| {
        let aggregator = scope.spawn(move || {
            let mut meter = Meter::new(settings);
            for mut batch in received {
                // In replay nothing is late (months close only at input end) and duplicates
                // are absorbed by the meter: no outcome needs handling here.
                batch.iter().for_each(|event| {
                    meter.apply(event);
                });
                batch.clear();
                // The reader may have finished already; then the buffer is simply dropped.
                let _ = recycle.send(batch);
            }
            meter
        });
        let mut batch = Vec::with_capacity(BATCH);
        // Replay's own clock, read once: an event dated further ahead is refused as the
        // worker would refuse it, so one broken clock cannot create a month to bill.
        let now = Timestamp(crate::status::now_ms());
        let read = input::for_each_line(&input.events, input.progress, |line, bytes| {
            let decoded = decode_usage_event(bytes).and_then(|event| {
                Rejection::check_not_future(event.ts, now, config.billing.max_clock_skew)
                    .and_then(|()| Rejection::check_plausible(&event, config.billing.max_group_count))
                    .map(|()| event)
            });
            match decoded {
                Ok(event) => batch.push(event),
                Err(why) => dead.reject("events", line, bytes, &why)?,
            }
            if batch.len() == BATCH {
                let next = recycled.try_recv().unwrap_or_else(|_| Vec::with_capacity(BATCH));
                batches
                    .send(std::mem::replace(&mut batch, next))
                    .map_err(|_| anyhow::anyhow!("the metering thread stopped"))?;
            }
            Ok(())
        });
        let sent_last = batches.send(batch);
        drop(batches);
        let meter = aggregator.join().map_err(|_| anyhow::anyhow!("the metering thread panicked"))?;
        let read = read?;
        sent_last.map_err(|_| anyhow::anyhow!("the metering thread stopped"))?;
        Ok((meter, read))
    })
}

/// Replay's input has no order, so months close only at its end (no lateness).
fn meter_settings(config: &Config, exact: bool) -> im_meter_core::aggregate::MeterSettings {
    im_meter_core::aggregate::MeterSettings { exact, allowed_lateness: None, ..config.meter.clone() }
}

/// Reads, sorts by time and applies the subscription events; refused ones go to `dead`.
fn load_subscriptions(
    config: &Config,
    source: &Source,
    dead: &mut DeadLetters,
) -> anyhow::Result<Subscriptions> {
    let mut events: Vec<(SubscriptionEvent, u64, Vec<u8>)> = Vec::new();
    input::for_each_line(source, false, |line, bytes| match decode_subscription_event(bytes) {
        Ok(event) => {
            events.push((event, line, bytes.to_vec()));
            Ok(())
        }
        Err(why) => dead.reject("subscriptions", line, bytes, &why),
    })?;
    // Rules such as "one paid-plan switch a month" depend on order: apply by event time,
    // ties broken by content so that input order never matters.
    events.sort_by(|(a, _, _), (b, _, _)| (a.ts, a.app_id, &a.change).cmp(&(b.ts, b.app_id, &b.change)));
    // Nothing is billed before the whole input is read: no event is late. Refusals are
    // final only once every event is in (a creation can refuse an event read before it).
    let mut subscriptions = Subscriptions::new(config.meter.tz);
    for (i, (event, _, _)) in events.iter().enumerate() {
        subscriptions.record(event, i as u64, None);
    }
    let mut refusals: Vec<_> =
        subscriptions.apps_logged().flat_map(|app| subscriptions.refusals(app)).collect();
    refusals.sort_by_key(|r| r.origin);
    for refusal in refusals {
        let (_, line, raw) = &events[refusal.origin as usize];
        dead.reject("subscriptions", *line, raw, &refusal.rejection)?;
    }
    Ok(subscriptions)
}

/// Closes every month holding an event and bills every known app for it from its creation
/// on (through a [`BillingBook`] fed the closed months as one source), filling `report`'s
/// usage, charges, alerts and (when present) audit rows.
fn close_and_bill(
    config: &Config,
    meter: &mut Meter,
    subscriptions: &Subscriptions,
    report: &mut Report,
) -> anyhow::Result<()> {
    let grid = config.meter.grid;
    let billed_months: Vec<Month> = meter.active_months().iter().copied().collect();
    let apps: BTreeSet<AppId> = meter.apps().into_iter().chain(subscriptions.apps()).collect();
    let pricing =
        Pricing { subscriptions, prices: &config.billing.prices, precision: config.meter.precision, grid };
    let mut book = BillingBook::new();
    for month in billed_months {
        for (app_id, mut aggregate) in meter.close_month(month) {
            if let (Some(rows), Some(counts)) = (report.audit.as_mut(), aggregate.exact_counts()) {
                let figures = aggregate.usage(app_id, month, grid);
                rows.push(AuditRow {
                    app_id,
                    month,
                    mau: figures.mau,
                    mau_exact: counts.mau,
                    dau_peak: figures.dau_peak,
                    dau_peak_exact: counts.dau_peak,
                });
            }
            book.add_share(month, app_id, 0, Share { aggregate, parts: 0 });
        }
        let billed = book.bill(month, pricing, apps.iter().copied())?;
        report.charges.extend(billed.charges);
        report.alerts.extend(billed.alerts);
        report.usage.extend(billed.usage);
        book.billed(month);
    }
    // Months are billed in order and apps in order within each, so the lists are sorted
    // by month then app; the report is by app then month. Within an app-month, charges
    // keep the item order bill_month gives (the sort is stable).
    report.usage.sort_by_key(|u| (u.app_id, u.month));
    report.charges.sort_by_key(|c| (c.app_id, c.month));
    report.alerts.sort_by_key(|a| (a.app_id, a.month));
    if let Some(rows) = report.audit.as_mut() {
        rows.sort_by_key(|r| (r.app_id, r.month));
    }
    Ok(())
}
