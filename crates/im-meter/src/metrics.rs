//! Every Prometheus metric the worker exports, defined in this one place.
//!
//! Names follow Prometheus conventions: the `im_meter_` prefix, base units in the name
//! (`_seconds`, `_bytes`), counters ending in `_total`. Labels are bounded: stages
//! (`meter`, `bill`), consumer threads, partitions, event types, reason codes and charge
//! items; per-app series exist only for the top [`crate::config::HttpSettings::top_apps`]
//! apps. `deploy/metrics.txt` lists the same names for the dashboards and alerting rules
//! (a test keeps the two in step).
//!
//! Hot paths do not touch these directly: the metering stage counts events in an
//! [`EventTally`] and adds it here once per round.

use std::sync::OnceLock;

use im_meter_core::aggregate::Outcome;
use im_meter_core::ingest::{Action, RejectReason};
use prometheus::{
    CounterVec, Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The worker's metrics and the registry they are gathered from.
pub struct Metrics {
    registry: Registry,
    /// Events by type and outcome.
    pub events: IntCounterVec,
    /// Refused events by reason.
    pub events_rejected: IntCounterVec,
    /// Events never read: skipped by an offset reset forward, or deleted by the events
    /// topic's retention before they were read.
    pub events_skipped: IntCounterVec,
    /// Dead letters written, by source (`events`, `subscriptions`).
    pub dead_letters: IntCounterVec,
    /// Records consumed, by stage.
    pub consumed_records: IntCounterVec,
    /// Record bytes (keys and values) consumed, by stage.
    pub consumed_bytes: IntCounterVec,
    /// Records of a partition not applied yet (its end minus the next offset to apply).
    pub consumer_lag: IntGaugeVec,
    /// Rebalance callbacks, by stage and kind (`assign`, `revoke`).
    pub rebalances: IntCounterVec,
    /// Partitions assigned, by stage and consumer.
    pub assigned_partitions: IntGaugeVec,
    /// Assigned partitions stopped because their state cannot be trusted, by stage.
    pub stopped_partitions: IntGaugeVec,
    /// How long a transaction took, from begin to committed (or aborted).
    pub commit_duration: HistogramVec,
    /// Committed transactions, by stage.
    pub commits: IntCounterVec,
    /// Transactions that did not commit, by stage and cause.
    pub transaction_aborts: IntCounterVec,
    /// Broker calls that failed transiently and are tried again at a later round, by stage.
    pub broker_errors: IntCounterVec,
    /// How long restoring a partition's state from the changelog took.
    pub restore_duration: HistogramVec,
    /// The event time each metering partition has reached.
    pub event_watermark: GaugeVec,
    /// Subscription records read with bytes their partition holds already, kept once.
    pub subscription_duplicates: IntCounter,
    /// App-months a metering partition holds open, by partition.
    pub partition_app_months: IntGaugeVec,
    /// `metering.max_app_months`: the most a partition holds open.
    pub partition_app_months_limit: IntGauge,
    /// End of the oldest month not closed (meter) or not billed (bill).
    pub oldest_open_month_end: GaugeVec,
    /// App-months held in metering state.
    pub state_app_months: IntGauge,
    /// Connections tracked in metering state (pending and remembered).
    pub state_open_connections: IntGauge,
    /// Bytes of the metering state as the changelog holds it (latest value of each key).
    pub state_bytes: IntGauge,
    /// When a stage's consumer last polled (Unix seconds).
    pub last_poll: GaugeVec,
    /// How long a consumer's transactions or broker calls have failed, none succeeding.
    pub failing: GaugeVec,
    /// The broker's clock minus this worker's, as last measured (seconds).
    pub clock_skew: Gauge,
    /// 1 while `/readyz` says ready.
    pub ready: IntGauge,
    /// Charge lines published, by item.
    pub charges: IntCounterVec,
    /// Money billed, by item: approximate (a float); invoices use the exact decimals of the
    /// charges topic.
    pub billed_usd: CounterVec,
    /// Quota alerts published.
    pub quota_alerts: IntCounter,
    /// Months billed, once per billing partition that billed them.
    pub months_billed: IntCounter,
    /// Month-to-date MAU of the top apps.
    pub app_mau: IntGaugeVec,
    /// Month-to-date PCC of the top apps.
    pub app_pcc: IntGaugeVec,
}

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| Metrics::new().expect("metric definitions are valid and unique"))
}

impl Metrics {
    fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let r = &registry;
        let metrics = Metrics {
            events: counter_vec(r, "im_meter_events_total", "SDK events by type and outcome.", &["type", "outcome"])?,
            events_rejected: counter_vec(
                r,
                "im_meter_events_rejected_total",
                "Refused records (dead-lettered), by reason.",
                &["reason"],
            )?,
            events_skipped: counter_vec(
                r,
                "im_meter_events_skipped_total",
                "Events never read, so never metered: skipped by a reset of the group's offsets past them (offsets_reset), or deleted by the events topic's retention before they were read (retention).",
                &["reason"],
            )?,
            dead_letters: counter_vec(
                r,
                "im_meter_dead_letters_total",
                "Dead letters written, by source topic kind.",
                &["source"],
            )?,
            consumed_records: counter_vec(
                r,
                "im_meter_consumed_records_total",
                "Records consumed, by stage.",
                &["stage"],
            )?,
            consumed_bytes: counter_vec(
                r,
                "im_meter_consumed_bytes_total",
                "Bytes of records (keys and values) consumed, by stage.",
                &["stage"],
            )?,
            consumer_lag: gauge_vec(
                r,
                "im_meter_consumer_lag_records",
                "Records of an assigned partition not applied yet: its end minus the next offset to apply.",
                &["stage", "partition"],
            )?,
            rebalances: counter_vec(
                r,
                "im_meter_rebalances_total",
                "Rebalance callbacks, by stage and kind (assign, revoke, lost: revoked without a handover, nothing committed for them).",
                &["stage", "kind"],
            )?,
            assigned_partitions: gauge_vec(
                r,
                "im_meter_assigned_partitions",
                "Partitions assigned, by stage and consumer.",
                &["stage", "consumer"],
            )?,
            stopped_partitions: gauge_vec(
                r,
                "im_meter_stopped_partitions",
                "Assigned partitions stopped because their state in the changelog cannot be trusted (records deleted, another group's state), by stage and consumer.",
                &["stage", "consumer"],
            )?,
            commit_duration: histogram_vec(
                r,
                "im_meter_commit_duration_seconds",
                "Duration of a transaction, from begin to committed or aborted.",
                &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0],
            )?,
            commits: counter_vec(r, "im_meter_commits_total", "Committed transactions, by stage.", &["stage"])?,
            transaction_aborts: counter_vec(
                r,
                "im_meter_transaction_aborts_total",
                "Transactions that did not commit, by stage and cause (broker, fenced, unknown_outcome, fatal, other).",
                &["stage", "cause"],
            )?,
            broker_errors: counter_vec(
                r,
                "im_meter_broker_errors_total",
                "Broker calls that failed transiently (a timeout, a broker restarting) and are tried again at a later round, by stage.",
                &["stage"],
            )?,
            restore_duration: histogram_vec(
                r,
                "im_meter_state_restore_duration_seconds",
                "Time to restore a partition's state from the changelog.",
                &[0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0],
            )?,
            event_watermark: float_gauge_vec(
                r,
                "im_meter_event_watermark_timestamp_seconds",
                "Event time a metering partition has reached (Unix seconds).",
                &["partition"],
            )?,
            subscription_duplicates: counter(
                r,
                "im_meter_subscription_duplicates_total",
                "Subscription records read with bytes their partition holds already (history produced again, a retry), kept once.",
            )?,
            partition_app_months: gauge_vec(
                r,
                "im_meter_partition_app_months",
                "App-months a metering partition holds open (events beyond metering.max_app_months are refused).",
                &["partition"],
            )?,
            partition_app_months_limit: gauge(
                r,
                "im_meter_partition_app_months_limit",
                "metering.max_app_months: the most app-months one metering partition holds open.",
            )?,
            oldest_open_month_end: float_gauge_vec(
                r,
                "im_meter_oldest_open_month_end_timestamp_seconds",
                "End (Unix seconds) of the oldest month not yet closed (stage meter) or billed (stage bill); 0 when none.",
                &["stage"],
            )?,
            state_app_months: gauge(r, "im_meter_state_app_months", "App-months held in metering state.")?,
            state_open_connections: gauge(
                r,
                "im_meter_state_open_connections",
                "Connections tracked in metering state (pending ones and counted ones remembered for retries).",
            )?,
            state_bytes: gauge(
                r,
                "im_meter_state_bytes",
                "Bytes of the metering state in the changelog (the latest value of each key).",
            )?,
            clock_skew: float_gauge(
                r,
                "im_meter_clock_skew_seconds",
                "The broker's clock minus this worker's, as the clock probe last measured it (seconds): beyond billing.max_clock_skew, events are judged by the broker's clock.",
            )?,
            last_poll: float_gauge_vec(
                r,
                "im_meter_last_poll_timestamp_seconds",
                "When a stage's consumer last polled (Unix seconds).",
                &["stage", "consumer"],
            )?,
            failing: float_gauge_vec(
                r,
                "im_meter_failing_seconds",
                "How long a stage's consumer has waited for the brokers: its transactions or broker calls failing, none succeeding since (seconds; 0 once one succeeds).",
                &["stage", "consumer"],
            )?,
            ready: gauge(r, "im_meter_ready", "1 while the worker is ready (GET /readyz), else 0.")?,
            charges: counter_vec(r, "im_meter_charges_total", "Charge lines published, by item.", &["item"])?,
            billed_usd: {
                let c = CounterVec::new(
                    Opts::new(
                        "im_meter_billed_usd_total",
                        "Money billed, by item (approximate: a float; invoices use the exact decimals of the charges topic).",
                    ),
                    &["item"],
                )?;
                r.register(Box::new(c.clone()))?;
                c
            },
            quota_alerts: counter(r, "im_meter_quota_alerts_total", "Quota alerts published.")?,
            months_billed: {
                let c = IntCounter::new(
                    "im_meter_months_billed_total",
                    "Months billed, counted once per billing partition that billed them.",
                )?;
                r.register(Box::new(c.clone()))?;
                c
            },
            app_mau: gauge_vec(
                r,
                "im_meter_app_mau",
                "Month-to-date MAU of the apps with the most, top N only.",
                &["app_id"],
            )?,
            app_pcc: gauge_vec(
                r,
                "im_meter_app_pcc",
                "Month-to-date PCC of the apps with the most MAU, top N only.",
                &["app_id"],
            )?,
            registry,
        };
        let build =
            IntGaugeVec::new(Opts::new("im_meter_build_info", "Build information; always 1."), &["version"])?;
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        metrics.registry.register(Box::new(build))?;
        #[cfg(target_os = "linux")]
        metrics.registry.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;
        Ok(metrics)
    }

    /// The text exposition of every metric (Prometheus format 0.0.4).
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding gathered families into a Vec cannot fail.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> prometheus::Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> prometheus::Result<IntGaugeVec> {
    let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

fn float_gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> prometheus::Result<GaugeVec> {
    let g = GaugeVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

fn counter(r: &Registry, name: &str, help: &str) -> prometheus::Result<IntCounter> {
    let c = IntCounter::new(name, help)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn gauge(r: &Registry, name: &str, help: &str) -> prometheus::Result<IntGauge> {
    let g = IntGauge::new(name, help)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

fn float_gauge(r: &Registry, name: &str, help: &str) -> prometheus::Result<Gauge> {
    let g = Gauge::new(name, help)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

fn histogram_vec(r: &Registry, name: &str, help: &str, buckets: &[f64]) -> prometheus::Result<HistogramVec> {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets.to_vec()), &["stage"])?;
    r.register(Box::new(h.clone()))?;
    Ok(h)
}

/// Event types as labelled; `invalid` for records that did not decode.
const TYPES: [&str; 7] = ["login", "logout", "connect", "disconnect", "heartbeat", "group_stats", "invalid"];
const OUTCOMES: [&str; 4] = ["accepted", "duplicate", "late", "rejected"];

/// Counts of one stretch of consumed records, added to [`Metrics`] in one go.
#[derive(Debug, Default)]
pub struct EventTally {
    events: [[u64; OUTCOMES.len()]; TYPES.len()],
    rejected: [u64; RejectReason::ALL.len()],
    records: u64,
    bytes: u64,
    dead_letters: u64,
}

impl EventTally {
    /// A record of `bytes` bytes was consumed.
    pub fn consumed(&mut self, bytes: usize) {
        self.records += 1;
        self.bytes += bytes as u64;
    }

    /// A decoded event was applied with `outcome`.
    pub fn applied(&mut self, action: &Action, outcome: Outcome) {
        let t = match action {
            Action::Login { .. } => 0,
            Action::Logout { .. } => 1,
            Action::Connect { .. } => 2,
            Action::Disconnect { .. } => 3,
            Action::Heartbeat { .. } => 4,
            Action::GroupStats { .. } => 5,
        };
        let o = match outcome {
            Outcome::Accepted => 0,
            Outcome::Duplicate => 1,
            Outcome::Late => 2,
            Outcome::TooManyApps => 3,
        };
        self.events[t][o] += 1;
        match outcome {
            Outcome::Late => self.refused(RejectReason::Late),
            Outcome::TooManyApps => self.refused(RejectReason::TooManyApps),
            Outcome::Accepted | Outcome::Duplicate => {}
        }
    }

    /// A record did not decode.
    pub fn invalid(&mut self, reason: RejectReason) {
        self.events[TYPES.len() - 1][OUTCOMES.len() - 1] += 1;
        self.refused(reason);
    }

    fn refused(&mut self, reason: RejectReason) {
        if let Some(i) = RejectReason::ALL.iter().position(|r| *r == reason) {
            self.rejected[i] += 1;
        }
        self.dead_letters += 1;
    }

    /// Adds the counts to the metrics of `stage` and starts again from zero.
    pub fn flush(&mut self, stage: &str) {
        let m = metrics();
        for (t, outcomes) in self.events.iter().enumerate() {
            for (o, &n) in outcomes.iter().enumerate() {
                if n > 0 {
                    m.events.with_label_values(&[TYPES[t], OUTCOMES[o]]).inc_by(n);
                }
            }
        }
        for (i, &n) in self.rejected.iter().enumerate() {
            if n > 0 {
                m.events_rejected.with_label_values(&[RejectReason::ALL[i].code()]).inc_by(n);
            }
        }
        if self.dead_letters > 0 {
            m.dead_letters.with_label_values(&["events"]).inc_by(self.dead_letters);
        }
        m.consumed_records.with_label_values(&[stage]).inc_by(self.records);
        m.consumed_bytes.with_label_values(&[stage]).inc_by(self.bytes);
        *self = EventTally::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `deploy/metrics.txt` (what the dashboards, alerts and docs are checked against)
    /// lists exactly the metrics exported here.
    #[test]
    fn the_documented_metric_list_is_the_exported_one() {
        let m = metrics();
        // Vectors only appear once they have a series: give each one.
        let mut tally = EventTally::default();
        tally.invalid(RejectReason::NotJson);
        tally.flush("meter");
        m.consumer_lag.with_label_values(&["meter", "0"]).set(0);
        m.rebalances.with_label_values(&["meter", "assign"]).inc();
        m.assigned_partitions.with_label_values(&["meter", "0"]).set(0);
        m.stopped_partitions.with_label_values(&["meter", "0"]).set(0);
        m.events_skipped.with_label_values(&["retention"]).inc();
        m.commit_duration.with_label_values(&["meter"]).observe(0.1);
        m.commits.with_label_values(&["meter"]).inc();
        m.transaction_aborts.with_label_values(&["meter", "broker"]).inc();
        m.broker_errors.with_label_values(&["bill"]).inc();
        m.restore_duration.with_label_values(&["meter"]).observe(0.1);
        m.event_watermark.with_label_values(&["0"]).set(0.0);
        m.partition_app_months.with_label_values(&["0"]).set(0);
        m.subscription_duplicates.inc();
        m.oldest_open_month_end.with_label_values(&["meter"]).set(0.0);
        m.last_poll.with_label_values(&["meter", "0"]).set(0.0);
        m.failing.with_label_values(&["meter", "0"]).set(0.0);
        m.charges.with_label_values(&["pcc"]).inc();
        m.billed_usd.with_label_values(&["pcc"]).inc_by(0.0);
        m.app_mau.with_label_values(&["1"]).set(0);
        m.app_pcc.with_label_values(&["1"]).set(0);
        let exported: std::collections::BTreeSet<String> =
            m.registry.gather().iter().map(|f| f.name().to_string()).collect();
        let listed =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/metrics.txt"))
                .expect("deploy/metrics.txt");
        let listed: std::collections::BTreeSet<String> = listed
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect();
        assert_eq!(exported, listed);
    }
}
