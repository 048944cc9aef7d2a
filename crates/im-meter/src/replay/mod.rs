//! `im-meter replay`: the whole pipeline over NDJSON files, no Kafka.
//!
//! ingest (decode each line, refuse bad ones to the dead-letter output) → aggregate (one
//! [`Meter`] per shard of the apps) → bill (subscriptions applied in time order, every billed
//! month closed at input end and priced) → a [`Report`] value the caller prints.
//!
//! Reading runs on the calling thread, decoding and metering on one thread per core
//! ([`meter_events`]); the meters split the apps, so their union is what one meter over the
//! whole input holds.
//!
//! The result does not depend on the order of the input lines: the meter is
//! order-insensitive by construction, subscription events are sorted by time before they
//! are applied, and every output list is sorted.

mod dead_letters;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{mpsc, Mutex};
use std::thread;

use im_meter_core::aggregate::Meter;
use im_meter_core::bill::{BillingBook, Pricing, Share, Subscriptions, CARRIED};
use im_meter_core::changelog::billing_partition;
use im_meter_core::ingest::{
    decode_subscription_event, decode_usage_event, Rejection, SubscriptionEvent, UsageEvent,
};
use im_meter_core::plan::AppId;
use im_meter_core::time::{Month, Timestamp};

use crate::config::Config;
use crate::input::{self, Chunk, ReadStats, Source};
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
    /// Threads decoding and metering (`None`: one per CPU).
    pub threads: Option<usize>,
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

    let (mut meters, events_read) = meter_events(config, input, &mut dead)?;
    dead.finish()?;

    let mut report = Report {
        usage: Vec::new(),
        charges: Vec::new(),
        alerts: Vec::new(),
        rejected: dead.by_reason().clone(),
        audit: input.exact.then(Vec::new),
        events_read,
    };
    close_and_bill(config, &mut meters, &subscriptions, &mut report)?;
    Ok(report)
}

/// Meters per thread: more shards than threads, so that two threads rarely want the same
/// one at once.
const SHARDS_PER_THREAD: usize = 4;

/// A line refused while decoding: its number, bytes and why.
type Refused = (u64, Vec<u8>, Rejection);

/// Decodes the event lines and applies them to meters, on every core: this thread reads the
/// input in chunks of whole lines and writes the dead letters in line order; one thread per
/// core decodes chunks (refusing bad lines) and applies each event to the meter of its
/// app's shard. Every app's events meet in one meter, which is insensitive to their order,
/// so the shards hold exactly what one meter over the whole input would, split by app.
fn meter_events(
    config: &Config,
    input: &ReplayInput,
    dead: &mut DeadLetters,
) -> anyhow::Result<(Vec<Meter>, ReadStats)> {
    let threads =
        input.threads.unwrap_or_else(|| thread::available_parallelism().map_or(1, usize::from)).max(1);
    let settings = meter_settings(config, input.exact);
    // One thread meters with one meter, as replay always did.
    let shards = if threads == 1 { 1 } else { threads * SHARDS_PER_THREAD };
    let shards: Vec<Mutex<Meter>> = (0..shards).map(|_| Mutex::new(Meter::new(settings.clone()))).collect();
    let (chunks, to_decode) = mpsc::sync_channel::<Chunk>(threads * 2);
    let to_decode = Mutex::new(to_decode);
    let (refusals, refused) = mpsc::channel::<(u64, Vec<Refused>, u64)>();
    // Buffers of chunks decoded, for the reader to fill again.
    let (recycle, recycled) = mpsc::channel::<Vec<u8>>();
    // Replay's own clock, read once: an event dated further ahead is refused as the worker
    // would refuse it, so one broken clock cannot create a month to bill.
    let now = Timestamp(crate::status::now_ms());
    let decode =
        |bytes: &[u8]| decode_usage_event(bytes).and_then(|event| config.admit(&event, now).map(|()| event));
    thread::scope(|scope| {
        let decoders: Vec<_> = (0..threads)
            .map(|_| {
                let (refusals, recycle) = (refusals.clone(), recycle.clone());
                let (to_decode, shards) = (&to_decode, &shards);
                scope.spawn(move || -> anyhow::Result<()> {
                    let mut by_shard: Vec<Vec<UsageEvent>> = vec![Vec::new(); shards.len()];
                    loop {
                        let next = to_decode.lock().unwrap_or_else(|e| e.into_inner()).recv();
                        let Ok(chunk) = next else { return Ok(()) };
                        let mut refused = Vec::new();
                        let lines = chunk.for_each_line(|line, bytes| {
                            match decode(bytes) {
                                Ok(event) => by_shard[shard_of(event.app_id, shards.len())].push(event),
                                Err(why) => refused.push((line, bytes.to_vec(), why)),
                            }
                            Ok(())
                        })?;
                        apply(shards, &mut by_shard);
                        // The reader may have stopped on an error; then nobody listens.
                        let _ = refusals.send((chunk.index, refused, lines));
                        if let Some(buffer) = chunk.into_buffer() {
                            let _ = recycle.send(buffer);
                        }
                    }
                })
            })
            .collect();
        drop((refusals, recycle));
        // Dead letters in line order: chunks' refusals, written as their turn comes.
        let mut waiting = BTreeMap::new();
        let (mut next_chunk, mut lines) = (0u64, 0u64);
        let mut write_in_order = |dead: &mut DeadLetters, (index, letters, n): (u64, Vec<Refused>, u64)| {
            lines += n;
            waiting.insert(index, letters);
            while let Some(letters) = waiting.remove(&next_chunk) {
                for (line, bytes, why) in letters {
                    dead.reject("events", line, &bytes, &why)?;
                }
                next_chunk += 1;
            }
            anyhow::Ok(())
        };
        let read = input::for_each_chunk(&input.events, input.progress, |chunk| {
            chunks.send(chunk).map_err(|_| anyhow::anyhow!("the decoding threads stopped"))?;
            while let Ok(done) = refused.try_recv() {
                write_in_order(dead, done)?;
            }
            Ok(recycled.try_recv().ok())
        });
        drop(chunks);
        for done in refused {
            write_in_order(dead, done)?;
        }
        for decoder in decoders {
            decoder.join().map_err(|_| anyhow::anyhow!("a decoding thread panicked"))??;
        }
        let mut read = read?;
        read.lines = lines;
        anyhow::Ok(read)
    })
    .map(|read| {
        (shards.into_iter().map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner())).collect(), read)
    })
}

/// The shard metering an app's events: a fixed hash of the app id (the one that spreads
/// apps over billing partitions).
fn shard_of(app_id: AppId, shards: usize) -> usize {
    billing_partition(app_id, shards as u32) as usize
}

/// Applies each shard's events to its meter, taking first the meters no other thread
/// holds, and empties the lists. In replay nothing is late (months close only at input end)
/// and duplicates are absorbed by the meter: no outcome needs handling here.
fn apply(shards: &[Mutex<Meter>], by_shard: &mut [Vec<UsageEvent>]) {
    let drain = |meter: &mut Meter, events: &mut Vec<UsageEvent>| {
        events.drain(..).for_each(|event| {
            meter.apply(&event);
        })
    };
    let mut pending: Vec<usize> = (0..shards.len()).filter(|&s| !by_shard[s].is_empty()).collect();
    while let Some(&first) = pending.first() {
        let before = pending.len();
        pending.retain(|&s| match shards[s].try_lock() {
            Ok(mut meter) => {
                drain(&mut meter, &mut by_shard[s]);
                false
            }
            Err(_) => true,
        });
        if pending.len() == before {
            // Every one is held elsewhere: wait for the first.
            pending.remove(0);
            drain(&mut shards[first].lock().unwrap_or_else(|e| e.into_inner()), &mut by_shard[first]);
        }
    }
}

/// Replay's input has no order, so months close only at its end (no lateness); a run over
/// a file holds what it reads, so app-months are not bounded (a worker's partition is).
fn meter_settings(config: &Config, exact: bool) -> im_meter_core::aggregate::MeterSettings {
    im_meter_core::aggregate::MeterSettings {
        exact,
        allowed_lateness: None,
        max_app_months: None,
        ..config.meter.clone()
    }
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
    meters: &mut [Meter],
    subscriptions: &Subscriptions,
    report: &mut Report,
) -> anyhow::Result<()> {
    let grid = config.meter.grid;
    let billed_months: BTreeSet<Month> =
        meters.iter().flat_map(|m| m.active_months().iter().copied()).collect();
    let apps: BTreeSet<AppId> = meters.iter().flat_map(Meter::apps).chain(subscriptions.apps()).collect();
    // Event time is the whole input's, in every shard (idle connections close by it).
    if let Some(watermark) = meters.iter().filter_map(Meter::watermark).max() {
        meters.iter_mut().for_each(|m| m.advance_watermark(watermark));
    }
    let pricing = Pricing { subscriptions, prices: &config.billing.prices, grid };
    let mut book = BillingBook::starting(config.billing.start_month);
    for month in billed_months {
        // Shards hold disjoint apps: each app-month has one share.
        let closed = meters.iter_mut().flat_map(|m| m.close_month(month));
        for (app_id, mut aggregate) in closed {
            let audited = report.audit.as_mut().filter(|_| !aggregate.is_silent());
            if let (Some(rows), Some(counts)) = (audited, aggregate.exact_counts()) {
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
        // (One share per app-month: no connection is handed over to a share with usage,
        // so nothing is carried; done all the same, as the worker's book does.)
        for (app_id, aggregate) in billed.carried {
            book.add_share(month.next(), app_id, CARRIED, Share { aggregate, parts: 0 });
        }
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
