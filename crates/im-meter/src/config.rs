//! Configuration: one TOML file, every field overridable by an environment variable.
//!
//! Layering, in one place: built-in defaults → the TOML file → `IM_METER__<SECTION>__<FIELD>`
//! variables. Unknown sections and fields are errors (a typo must not silently fall back to a
//! default), and [`Config::load`] reports *every* invalid value with its field path before
//! anything starts.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use im_meter_core::aggregate::{ExactLimit, MeterSettings, Precision, SampleGrid};
use im_meter_core::bill::PriceBook;
use im_meter_core::ingest::{Rejection, UsageEvent};
use im_meter_core::time::{Month, Timestamp};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// The prefix of configuration environment variables.
pub const ENV_PREFIX: &str = "IM_METER__";

/// The configuration file as written: every field has a default.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    /// `[kafka]`
    pub kafka: KafkaSection,
    /// `[topics]`
    pub topics: TopicsSection,
    /// `[billing]`
    pub billing: BillingSection,
    /// `[metering]`
    pub metering: MeteringSection,
    /// `[http]`
    pub http: HttpSection,
}

impl Default for FileConfig {
    fn default() -> Self {
        FileConfig {
            kafka: KafkaSection {
                brokers: "127.0.0.1:9092".into(),
                group_id: "im-meter".into(),
                instance_id: String::new(),
                partitions: 6,
                replication_factor: 0,
                commit_interval: "1s".into(),
                idle_partition_timeout: "30s".into(),
                transaction_timeout: "30s".into(),
                max_poll_interval: "5m".into(),
                metadata_refresh_interval: "1m".into(),
                meter_threads: 0,
                security_protocol: "plaintext".into(),
                sasl_mechanism: String::new(),
                sasl_username: String::new(),
                sasl_password: Secret::default(),
            },
            topics: TopicsSection {
                events: "im.sdk-events".into(),
                subscriptions: "im.subscriptions".into(),
                dead_letters: "im.meter.dead-letters".into(),
                // Named from the group id (see `TopicsSection::internal_defaults`).
                changelog: String::new(),
                billing_changelog: String::new(),
                charges: "im.billing.charges".into(),
                alerts: "im.billing.alerts".into(),
                usage: "im.billing.usage".into(),
                plan_book: String::new(),
                dead_letters_retention: "90d".into(),
                alerts_retention: "90d".into(),
            },
            billing: BillingSection {
                timezone: "+08:00".into(),
                allowed_lateness: "1h".into(),
                max_clock_skew: "5m".into(),
                pcc_promotion_end: String::new(),
                av_call_price: String::new(),
                max_group_count: 100_000_000,
                start_month: String::new(),
                apps_per_transaction: 10_000,
            },
            metering: MeteringSection {
                hll_precision: i64::from(Precision::default().get()),
                exact_limit: ExactLimit::DEFAULT.get() as i64,
                sample_interval: "60s".into(),
                connection_idle_timeout: "off".into(),
                max_app_months: 200_000,
            },
            http: HttpSection {
                listen: "127.0.0.1:9464".into(),
                top_apps: 10,
                stall_timeout: "60s".into(),
                history_months: 3,
                api_token: Secret::default(),
                api_token_file: String::new(),
                advertised_address: String::new(),
            },
        }
    }
}

/// `[kafka]`: where the broker is and which consumer group the workers share.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSection {
    /// Bootstrap servers, comma separated.
    pub brokers: String,
    /// The consumer group every worker joins.
    pub group_id: String,
    /// This worker's stable name within the group: its transactional id is derived from it,
    /// so a restarted worker fences its crashed predecessor at once. Empty: the host name.
    /// Two workers on one host need different ids.
    pub instance_id: String,
    /// Partitions of topics the worker creates because they are missing.
    pub partitions: i64,
    /// Replicas of each topic the worker creates (0: the broker's `default.replication.factor`);
    /// 3 or more also sets the topic's `min.insync.replicas` to 2.
    pub replication_factor: i64,
    /// How often consumed offsets, state and outputs are committed (one transaction).
    pub commit_interval: String,
    /// A caught-up partition with no record for this long follows the event time of the
    /// worker's other partitions (or the clock), so it does not hold months open.
    pub idle_partition_timeout: String,
    /// Kafka transaction timeout: how long a crashed worker's open transaction can hold
    /// back read_committed readers at most.
    pub transaction_timeout: String,
    /// A consumer that has not polled for this long leaves the group and its partitions
    /// move (librdkafka `max.poll.interval.ms`).
    pub max_poll_interval: String,
    /// How often the worker looks for partitions added to the topics it reads (librdkafka
    /// `topic.metadata.refresh.interval.ms`): how soon new events partitions are read.
    pub metadata_refresh_interval: String,
    /// Metering consumers this worker runs, each a member of the group on a thread of its
    /// own with its own transactional id; 0: one per CPU the process may use.
    pub meter_threads: i64,
    /// librdkafka `security.protocol`: plaintext, ssl, sasl_plaintext or sasl_ssl.
    pub security_protocol: String,
    /// librdkafka `sasl.mechanism` (e.g. PLAIN, SCRAM-SHA-512); empty: librdkafka's default.
    pub sasl_mechanism: String,
    /// SASL user name.
    pub sasl_username: String,
    /// SASL password: never printed or logged.
    pub sasl_password: Secret,
}

/// A value that must not appear in output or logs: `Debug` and [`Secret::redacted`] show
/// only whether it is set. (Serialization is the plain value: the layering of defaults,
/// file and environment goes through it.)
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The value, for the one place that needs it (the Kafka client settings).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// What may be shown instead.
    pub fn redacted(&self) -> Secret {
        Secret(if self.0.is_empty() { String::new() } else { "<redacted>".into() })
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() { "Secret(unset)" } else { "Secret(<redacted>)" })
    }
}

/// `[topics]`: names of the topics read and written.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicsSection {
    /// SDK events in.
    pub events: String,
    /// Subscription events in.
    pub subscriptions: String,
    /// Refused records out.
    pub dead_letters: String,
    /// Compacted changelog of the metering state: events partition p's in partition p.
    /// Empty: `{kafka.group_id}.meter-changelog`.
    pub changelog: String,
    /// Compacted changelog of the billing stage: closed months' usage shares, closed-through
    /// marks and billing's own marks, partitioned by app. Its partition count is fixed at
    /// creation, so that an app's billing partition never moves. Empty:
    /// `{kafka.group_id}.billing-changelog`.
    pub billing_changelog: String,
    /// Charges out.
    pub charges: String,
    /// Quota alerts out.
    pub alerts: String,
    /// Each billed app-month's usage out (key `{app_id}/{YYYY-MM}`).
    pub usage: String,
    /// Compacted copy of the subscriptions topic kept by billing, so that the plan book
    /// outlives the subscriptions topic's retention. Empty: `{kafka.group_id}.plan-book`.
    pub plan_book: String,
    /// How long the dead letters are kept at least (the topic's `retention.ms` when the
    /// worker creates it; an existing topic keeping them less is refused at start).
    pub dead_letters_retention: String,
    /// How long quota alerts are kept at least (as `dead_letters_retention`).
    pub alerts_retention: String,
}

impl TopicsSection {
    /// Gives the internal topics left empty their names from the group id: one
    /// deployment's state never lands in another's by default (as Kafka Streams names
    /// internal topics from its `application.id`).
    fn internal_defaults(&mut self, group_id: &str) {
        for (name, suffix) in [
            (&mut self.changelog, "meter-changelog"),
            (&mut self.billing_changelog, "billing-changelog"),
            (&mut self.plan_book, "plan-book"),
        ] {
            if name.trim().is_empty() {
                *name = format!("{group_id}.{suffix}");
            }
        }
    }

    /// Every topic setting: its field name and value.
    pub fn fields(&self) -> [(&'static str, &String); 9] {
        [
            ("events", &self.events),
            ("subscriptions", &self.subscriptions),
            ("dead_letters", &self.dead_letters),
            ("changelog", &self.changelog),
            ("billing_changelog", &self.billing_changelog),
            ("charges", &self.charges),
            ("alerts", &self.alerts),
            ("usage", &self.usage),
            ("plan_book", &self.plan_book),
        ]
    }
}

/// `[billing]`: the calendar and the price book.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BillingSection {
    /// Billing time zone: a fixed offset (`+08:00`) or an IANA name.
    pub timezone: String,
    /// How long after a month's end its events are still accepted (`1h`, `30m`).
    pub allowed_lateness: String,
    /// Events dated further than this after the receiving clock are refused as `future`.
    pub max_clock_skew: String,
    /// End of the PCC promotion (RFC 3339); empty = open-ended.
    pub pcc_promotion_end: String,
    /// Price of audio/video calls outside trials; empty = unpriced.
    pub av_call_price: String,
    /// The largest plausible `group_count`; larger ones are dead-lettered as `implausible`
    /// and never billed.
    pub max_group_count: i64,
    /// The first month billed (`YYYY-MM`); usage dated before it is dead-lettered as
    /// `before_start`. Empty: the first month any event is dated in.
    pub start_month: String,
    /// The most apps one billing transaction bills: a month with more is billed in several.
    pub apps_per_transaction: i64,
}

/// `[metering]`: how usage is measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeteringSection {
    /// HLL++ precision, 10–18.
    pub hll_precision: i64,
    /// Distinct users a MAU or DAU count keeps exactly before HLL++ takes over (≥ 1,000).
    pub exact_limit: i64,
    /// PCC sample interval; must divide an hour.
    pub sample_interval: String,
    /// Close connections silent this long (`30m`), or `off`.
    pub connection_idle_timeout: String,
    /// The most app-months one events partition holds open at once; an event beyond it is
    /// dead-lettered as `too_many_apps`.
    pub max_app_months: i64,
}

/// `[http]`: the operator endpoints.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSection {
    /// Listen address of `/metrics`, `/healthz`, `/readyz` and `/v1/...`.
    pub listen: String,
    /// Apps with per-app series (`im_meter_app_mau`, `im_meter_app_pcc`): the N with the
    /// most month-to-date MAU, so that Prometheus' cardinality stays bounded.
    pub top_apps: i64,
    /// `/readyz` fails when a consumer with records to read has not polled for this long.
    pub stall_timeout: String,
    /// Closed months whose usage and charges the usage API keeps in memory.
    pub history_months: i64,
    /// Bearer token the usage API (`/v1/...`) requires; empty: open. Set it from an
    /// environment variable (`IM_METER__HTTP__API_TOKEN`) or `api_token_file`, not in the file.
    pub api_token: Secret,
    /// A file holding the API token (e.g. a mounted Kubernetes secret); empty: none.
    pub api_token_file: String,
    /// `host:port` where the other workers reach this one's usage API; empty: this host's
    /// name (or the listen address, when it names one) and the port listened on.
    pub advertised_address: String,
}

/// A validated configuration, in the types the program uses: one field per section of the
/// file (`[metering]` and the calendar of `[billing]` make the meter's settings).
#[derive(Debug, Clone)]
pub struct Config {
    /// The file form (names of brokers, topics, group).
    pub file: FileConfig,
    /// How the meter measures (`[metering]`, and `[billing]`'s time zone and lateness).
    pub meter: MeterSettings,
    /// `[billing]`: prices and the bounds on what is billed.
    pub billing: BillingSettings,
    /// `[kafka]`: how the Kafka worker runs.
    pub kafka: KafkaSettings,
    /// `[http]`: the operator endpoints.
    pub http: HttpSettings,
}

/// The billing settings, validated.
#[derive(Debug, Clone)]
pub struct BillingSettings {
    /// Prices that vary by date or deal.
    pub prices: PriceBook,
    /// Events dated further than this after the clock of whoever receives them (the
    /// worker, or replay) are refused as `future` and never move event time.
    pub max_clock_skew: Duration,
    /// The largest plausible `group_count`: a larger one is refused as `implausible`.
    pub max_group_count: u64,
    /// The first month billed (`None`: the first month any event is dated in); usage before
    /// it is refused as `before_start`.
    pub start_month: Option<Month>,
    /// The first instant of `start_month` in the billing zone (events before it are refused).
    pub start_instant: Option<Timestamp>,
    /// The most apps one billing transaction bills.
    pub apps_per_transaction: usize,
}

/// The operator endpoints' settings, validated.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// Where to listen.
    pub listen: SocketAddr,
    /// Apps with per-app metric series.
    pub top_apps: usize,
    /// Consumer silence (with records waiting) after which the worker is not ready.
    pub stall_timeout: Duration,
    /// Closed months the usage API holds.
    pub history_months: usize,
    /// The bearer token `/v1/...` requires (`None`: the API is open).
    pub api_token: Option<Secret>,
    /// Where the other workers reach this one (`None`: derived when listening).
    pub advertised_address: Option<String>,
}

/// The Kafka worker's settings, validated.
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    /// This worker's stable name in the group.
    pub instance_id: String,
    /// Partitions of topics the worker creates.
    pub partitions: i32,
    /// Replicas of topics the worker creates (`None`: the broker's default).
    pub replication_factor: Option<i32>,
    /// Time between commits.
    pub commit_interval: Duration,
    /// Silence after which a caught-up partition counts as idle.
    pub idle_partition_timeout: Duration,
    /// Kafka transaction timeout.
    pub transaction_timeout: Duration,
    /// Poll silence after which a consumer leaves its group.
    pub max_poll_interval: Duration,
    /// How often topic metadata (the partition count) is refreshed.
    pub metadata_refresh_interval: Duration,
    /// The largest value written as one changelog record; larger ones go in parts. Found
    /// at start from the topics' and the producer's limits ([`crate::kafka::worker`]).
    pub max_value_bytes: usize,
    /// Metering consumers (threads) of this worker.
    pub meter_threads: usize,
    /// The least time dead letters and alerts are kept (`topics.*_retention`).
    pub dead_letters_retention: Duration,
    /// See `dead_letters_retention`.
    pub alerts_retention: Duration,
}

/// Every problem found in a configuration, each naming its field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid configuration:")?;
        for problem in &self.0 {
            writeln!(f, "  - {problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl Config {
    /// Whether a decoded usage event may be metered — the same rule in the worker and in
    /// `replay`: not dated beyond the receiving clock (`now`) by more than the allowed skew
    /// (`future`: it would move event time), not in a month before the first one billed
    /// (`before_start`), its figures plausible (`implausible`).
    pub fn admit(&self, event: &UsageEvent, now: Timestamp) -> Result<(), Rejection> {
        Rejection::check_not_future(event.ts, now, self.billing.max_clock_skew)?;
        // An integer compare per event; the month (a time-zone lookup) only for one refused.
        if self.billing.start_instant.is_some_and(|start| event.ts < start) {
            Rejection::check_not_before_start(self.meter.tz.month_of(event.ts), self.billing.start_month)?;
        }
        Rejection::check_plausible(event, self.billing.max_group_count)
    }

    /// Loads defaults, then `path` (if any), then `IM_METER__*` variables from `env`, and
    /// validates the result.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigErrors> {
        let one = |msg: String| ConfigErrors(vec![msg]);
        let mut tree = toml::Value::try_from(FileConfig::default()).map_err(|e| one(e.to_string()))?;
        if let Some(path) = path {
            let text = std::fs::read_to_string(path)
                .map_err(|e| one(format!("cannot read config file {}: {e}", path.display())))?;
            let file: toml::Value =
                toml::from_str(&text).map_err(|e| one(format!("{}: {}", path.display(), e.message())))?;
            overlay(&mut tree, file);
        }
        apply_env(&mut tree, env)?;
        let file: FileConfig = serde_path_to_error::deserialize(tree).map_err(|e| {
            let path = e.path().to_string();
            one(format!("{path}: {}", e.into_inner().message()))
        })?;
        file.validate()
    }
}

/// Replaces in `base` every value `top` sets (tables recursively).
fn overlay(base: &mut toml::Value, top: toml::Value) {
    match (base, top) {
        (toml::Value::Table(base), toml::Value::Table(top)) => {
            for (key, value) in top {
                match base.get_mut(&key) {
                    Some(existing) => overlay(existing, value),
                    None => {
                        base.insert(key, value);
                    }
                }
            }
        }
        (base, top) => *base = top,
    }
}

/// Applies `IM_METER__SECTION__FIELD=value` variables. A value is read as the type of the
/// field it replaces (so `IM_METER__KAFKA__GROUP_ID=123` stays a string).
fn apply_env(
    tree: &mut toml::Value,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigErrors> {
    let mut problems = Vec::new();
    let vars: BTreeMap<String, String> = env.into_iter().filter(|(k, _)| k.starts_with(ENV_PREFIX)).collect();
    for (name, raw) in vars {
        let path: Vec<String> = name[ENV_PREFIX.len()..].split("__").map(str::to_ascii_lowercase).collect();
        let [section, field] = path.as_slice() else {
            problems.push(format!("{name}: expected IM_METER__<SECTION>__<FIELD>"));
            continue;
        };
        let Some(slot) = tree.get_mut(section.as_str()).and_then(|s| s.get_mut(field.as_str())) else {
            problems.push(format!("{name}: there is no field {section}.{field}"));
            continue;
        };
        let value = match slot {
            toml::Value::Integer(_) => raw.trim().parse().map(toml::Value::Integer).ok(),
            toml::Value::Boolean(_) => raw.trim().parse().map(toml::Value::Boolean).ok(),
            _ => Some(toml::Value::String(raw.clone())),
        };
        match value {
            Some(v) => *slot = v,
            None => problems
                .push(format!("{section}.{field} (from {name}): {raw:?} is not a valid {}", slot.type_str())),
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ConfigErrors(problems))
    }
}

fn duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("{text:?} is not a duration like 90s, 30m or 1h ({e})"))
}

fn positive(d: Duration) -> Result<Duration, String> {
    (!d.is_zero()).then_some(d).ok_or_else(|| "must be positive".into())
}

/// The host name, else a fixed name: stable across restarts of one machine's worker.
fn default_instance_id() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "im-meter".into())
}

fn topic_name(name: &str) -> Result<(), String> {
    let legal = !name.is_empty()
        && name.len() <= 249
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    legal.then_some(()).ok_or_else(|| format!("{name:?} is not a legal Kafka topic name"))
}

/// `http.advertised_address`: empty, or `host:port` with a port.
fn advertised_address(text: &str) -> Result<Option<String>, String> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    match text.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {
            Ok(Some(text.to_string()))
        }
        _ => Err(format!("{text:?} is not host:port (e.g. 10.0.0.5:9464)")),
    }
}

/// The usage API's token: `http.api_token`, or the trimmed content of `http.api_token_file`.
fn api_token(token: &Secret, file: &str) -> Result<Option<Secret>, String> {
    let file = file.trim();
    match (token.expose().is_empty(), file.is_empty()) {
        (true, true) => Ok(None),
        (false, true) => Ok(Some(token.clone())),
        (true, false) => {
            let text = std::fs::read_to_string(file).map_err(|e| format!("cannot read {file:?}: {e}"))?;
            let text = text.trim();
            if text.is_empty() {
                return Err(format!("{file:?} is empty"));
            }
            Ok(Some(Secret(text.to_string())))
        }
        (false, false) => Err("set http.api_token or http.api_token_file, not both".into()),
    }
}

/// The problems found so far, each naming its field.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    /// The value of `field`, or `None` with the problem noted.
    fn take<T>(&mut self, field: &str, value: Result<T, String>) -> Option<T> {
        value.map_err(|e| self.0.push(format!("{field}: {e}"))).ok()
    }
}

/// `Some(value)` unless `text` says the setting is off (empty or `off`).
fn unless_off<T>(text: &str, parse: impl FnOnce(&str) -> Result<T, String>) -> Result<Option<T>, String> {
    let text = text.trim();
    if text.is_empty() || text.eq_ignore_ascii_case("off") {
        Ok(None)
    } else {
        parse(text).map(Some)
    }
}

/// A non-empty text.
fn not_empty(text: &str, what: &str) -> Result<(), String> {
    (!text.trim().is_empty()).then_some(()).ok_or_else(|| what.to_string())
}

/// An integer setting converted to `T` when `accept` holds, else `why`.
fn within<T: TryFrom<i64>>(value: i64, accept: impl FnOnce(&T) -> bool, why: &str) -> Result<T, String> {
    T::try_from(value).ok().filter(accept).ok_or_else(|| format!("{why}, got {value}"))
}

impl FileConfig {
    /// The configuration with every secret replaced by `<redacted>`, to print or log.
    pub fn redacted(&self) -> FileConfig {
        let mut shown = self.clone();
        shown.kafka.sasl_password = self.kafka.sasl_password.redacted();
        shown.http.api_token = self.http.api_token.redacted();
        shown
    }

    /// Checks every field and converts to the program's types, reporting all problems.
    /// Every default lives in [`FileConfig::default`]; this only reads and checks.
    pub fn validate(mut self) -> Result<Config, ConfigErrors> {
        let group_id = self.kafka.group_id.clone();
        self.topics.internal_defaults(&group_id);
        let mut p = Problems::default();
        let (k, b, m, h) = (&self.kafka, &self.billing, &self.metering, &self.http);

        let tz = p.take("billing.timezone", b.timezone.parse().map_err(|e| format!("{e}")));
        let allowed_lateness = p.take("billing.allowed_lateness", duration(&b.allowed_lateness));
        let max_clock_skew = p.take("billing.max_clock_skew", duration(&b.max_clock_skew));
        let pcc_promotion_end = p.take(
            "billing.pcc_promotion_end",
            unless_off(&b.pcc_promotion_end, |t| Timestamp::parse_rfc3339(t).map_err(|e| e.to_string())),
        );
        let av_call_price = p.take(
            "billing.av_call_price",
            unless_off(&b.av_call_price, |t| {
                t.parse::<Decimal>()
                    .ok()
                    .filter(|p| !p.is_sign_negative())
                    .ok_or_else(|| format!("{t:?} is not a non-negative decimal price"))
            }),
        );
        let max_group_count = p
            .take("billing.max_group_count", within(b.max_group_count, |n: &u64| *n > 0, "must be positive"));
        let apps_per_transaction = p.take(
            "billing.apps_per_transaction",
            within(b.apps_per_transaction, |n: &usize| *n >= 1, "must be at least 1"),
        );
        let start_month = p.take(
            "billing.start_month",
            unless_off(&b.start_month, |t| {
                t.parse::<Month>().map_err(|_| format!("{t:?} is not a month (YYYY-MM), nor empty"))
            }),
        );

        let precision =
            p.take("metering.hll_precision", Precision::new(m.hll_precision).map_err(|e| e.to_string()));
        let exact_limit =
            p.take("metering.exact_limit", ExactLimit::new(m.exact_limit).map_err(|e| e.to_string()));
        let grid = p.take(
            "metering.sample_interval",
            duration(&m.sample_interval).and_then(|d| SampleGrid::new(d).map_err(|e| e.to_string())),
        );
        let max_app_months = p.take(
            "metering.max_app_months",
            within(m.max_app_months, |n: &usize| *n >= 1000, "must be at least 1000 app-months"),
        );
        let idle_timeout = p.take(
            "metering.connection_idle_timeout",
            unless_off(&m.connection_idle_timeout, |t| duration(t).and_then(positive))
                .map_err(|e| format!("{e} (or \"off\")")),
        );

        p.take("kafka.brokers", not_empty(&k.brokers, "must name at least one broker"));
        p.take("kafka.group_id", not_empty(&k.group_id, "must not be empty"));
        const PROTOCOLS: [&str; 4] = ["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"];
        p.take(
            "kafka.security_protocol",
            PROTOCOLS
                .contains(&k.security_protocol.to_ascii_lowercase().as_str())
                .then_some(())
                .ok_or_else(|| format!("must be one of {}", PROTOCOLS.join(", "))),
        );
        let partitions = p.take(
            "kafka.partitions",
            within(k.partitions, |n: &i32| *n > 0, "must be a positive number of partitions"),
        );
        let replication_factor = p.take(
            "kafka.replication_factor",
            within(
                k.replication_factor,
                |n: &i32| (0..=32).contains(n),
                "must be 0 (the broker's default) to 32",
            )
            .map(|n| (n > 0).then_some(n)),
        );
        let commit_interval =
            p.take("kafka.commit_interval", duration(&k.commit_interval).and_then(positive));
        let idle_partition_timeout =
            p.take("kafka.idle_partition_timeout", duration(&k.idle_partition_timeout).and_then(positive));
        let max_poll_interval = p.take(
            "kafka.max_poll_interval",
            duration(&k.max_poll_interval).and_then(|d| {
                (Duration::from_secs(1)..=Duration::from_secs(86_400))
                    .contains(&d)
                    .then_some(d)
                    .ok_or_else(|| "must be between 1s and 24h".to_string())
            }),
        );
        let metadata_refresh_interval = p.take(
            "kafka.metadata_refresh_interval",
            duration(&k.metadata_refresh_interval).and_then(positive),
        );
        let transaction_timeout = p.take(
            "kafka.transaction_timeout",
            duration(&k.transaction_timeout).and_then(|d| {
                (d >= Duration::from_secs(1)).then_some(d).ok_or_else(|| "must be at least 1s".to_string())
            }),
        );
        let meter_threads = p.take(
            "kafka.meter_threads",
            within(k.meter_threads, |n: &usize| *n <= 256, "must be 0 (one per CPU) to 256").map(
                |n| match n {
                    0 => std::thread::available_parallelism().map_or(1, usize::from),
                    n => n,
                },
            ),
        );
        for (field, name) in self.topics.fields() {
            p.take(&format!("topics.{field}"), topic_name(name));
        }
        let t = &self.topics;
        let dead_letters_retention =
            p.take("topics.dead_letters_retention", duration(&t.dead_letters_retention).and_then(positive));
        let alerts_retention =
            p.take("topics.alerts_retention", duration(&t.alerts_retention).and_then(positive));

        let listen = p.take(
            "http.listen",
            h.listen
                .parse::<SocketAddr>()
                .map_err(|_| format!("{:?} is not an address like 127.0.0.1:9464", h.listen)),
        );
        let top_apps =
            p.take("http.top_apps", within(h.top_apps, |n: &usize| *n <= 1000, "must be 0 to 1000 apps"));
        let stall_timeout = p.take("http.stall_timeout", duration(&h.stall_timeout).and_then(positive));
        let history_months = p.take(
            "http.history_months",
            within(h.history_months, |n: &usize| (1..=120).contains(n), "must be 1 to 120 months"),
        );
        let api_token = p.take("http.api_token_file", api_token(&h.api_token, &h.api_token_file));
        let advertised_address = p.take("http.advertised_address", advertised_address(&h.advertised_address));

        // Every value is `Some` exactly when no problem was found.
        let built = (|| {
            let (tz, start_month) = (tz?, start_month?);
            Some(Config {
                meter: MeterSettings {
                    tz,
                    precision: precision?,
                    exact_limit: exact_limit?,
                    grid: grid?,
                    idle_timeout: idle_timeout?,
                    exact: false,
                    allowed_lateness: Some(allowed_lateness?),
                    max_app_months: Some(max_app_months?),
                },
                billing: BillingSettings {
                    prices: PriceBook {
                        pcc_promotion_end: pcc_promotion_end?,
                        av_call_price: av_call_price?,
                        ..PriceBook::default()
                    },
                    max_clock_skew: max_clock_skew?,
                    max_group_count: max_group_count?,
                    start_month,
                    start_instant: start_month.map(|m| tz.start_of_month(m)),
                    apps_per_transaction: apps_per_transaction?,
                },
                kafka: KafkaSettings {
                    instance_id: match k.instance_id.trim() {
                        "" => default_instance_id(),
                        id => id.to_string(),
                    },
                    partitions: partitions?,
                    replication_factor: replication_factor?,
                    commit_interval: commit_interval?,
                    idle_partition_timeout: idle_partition_timeout?,
                    transaction_timeout: transaction_timeout?,
                    max_poll_interval: max_poll_interval?,
                    metadata_refresh_interval: metadata_refresh_interval?,
                    // Replaced at start by what the topics allow (`kafka::worker`).
                    max_value_bytes: crate::kafka::admin::value_limit(
                        crate::kafka::admin::PRODUCER_MAX_BYTES,
                    ),
                    meter_threads: meter_threads?,
                    dead_letters_retention: dead_letters_retention?,
                    alerts_retention: alerts_retention?,
                },
                http: HttpSettings {
                    listen: listen?,
                    top_apps: top_apps?,
                    stall_timeout: stall_timeout?,
                    history_months: history_months?,
                    api_token: api_token?,
                    advertised_address: advertised_address?,
                },
                file: self.clone(),
            })
        })();
        match built {
            Some(config) if p.0.is_empty() => Ok(config),
            _ => Err(ConfigErrors(p.0)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = Config::load(None, env(&[])).unwrap();
        assert_eq!(c.file.kafka.brokers, "127.0.0.1:9092");
        assert_eq!(c.file.topics.changelog, "im-meter.meter-changelog");
        assert_eq!(c.file.topics.billing_changelog, "im-meter.billing-changelog");
        assert_eq!(c.file.topics.plan_book, "im-meter.plan-book");
        assert_eq!(c.kafka.dead_letters_retention, Duration::from_secs(90 * 86_400));
        // Another deployment's internal topics are its own.
        let other = Config::load(None, env(&[("IM_METER__KAFKA__GROUP_ID", "billing-eu")])).unwrap();
        assert_eq!(other.file.topics.changelog, "billing-eu.meter-changelog");
        assert_eq!(other.file.topics.plan_book, "billing-eu.plan-book");
        // Set by name, a topic keeps it.
        let named =
            Config::load(None, env(&[("IM_METER__TOPICS__CHANGELOG", "im.meter.changelog")])).unwrap();
        assert_eq!(named.file.topics.changelog, "im.meter.changelog");
        assert_eq!(c.meter.tz.to_string(), "+08:00");
        assert_eq!(c.meter.allowed_lateness, Some(Duration::from_secs(3600)));
        assert_eq!(c.billing.max_clock_skew, Duration::from_secs(300));
        assert_eq!(c.file.http.listen, "127.0.0.1:9464");
        assert_eq!(c.meter.precision.get(), 14);
        assert_eq!(c.meter.exact_limit.get(), 1_000_000);
        assert!(c.meter.idle_timeout.is_none());
        assert_eq!(c.kafka.replication_factor, None, "the broker's default");
        let three = Config::load(None, env(&[("IM_METER__KAFKA__REPLICATION_FACTOR", "3")])).unwrap();
        assert_eq!(three.kafka.replication_factor, Some(3));
    }

    #[test]
    fn env_overrides_file_and_keeps_field_types() {
        let dir = std::env::temp_dir().join(format!("im-meter-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(&path, "[kafka]\nbrokers = \"file:9092\"\n[metering]\nhll_precision = 12\n").unwrap();
        let c = Config::load(
            Some(&path),
            env(&[
                ("IM_METER__KAFKA__BROKERS", "env:9092"),
                ("IM_METER__KAFKA__GROUP_ID", "123"),
                ("IM_METER__METERING__HLL_PRECISION", "16"),
                ("IM_METER__BILLING__TIMEZONE", "Asia/Shanghai"),
                ("OTHER", "ignored"),
            ]),
        )
        .unwrap();
        assert_eq!(c.file.kafka.brokers, "env:9092");
        assert_eq!(c.file.kafka.group_id, "123");
        assert_eq!(c.meter.precision.get(), 16);
        assert_eq!(c.meter.tz.to_string(), "Asia/Shanghai");
    }

    #[test]
    fn every_bad_field_is_named() {
        let err = Config::load(
            None,
            env(&[
                ("IM_METER__BILLING__TIMEZONE", "Mars/Base"),
                ("IM_METER__BILLING__ALLOWED_LATENESS", "soon"),
                ("IM_METER__BILLING__MAX_CLOCK_SKEW", "-5m"),
                ("IM_METER__METERING__HLL_PRECISION", "22"),
                ("IM_METER__METERING__SAMPLE_INTERVAL", "7s"),
                ("IM_METER__METERING__EXACT_LIMIT", "999"),
                ("IM_METER__TOPICS__CHARGES", "bad topic"),
                ("IM_METER__HTTP__LISTEN", "nowhere"),
                ("IM_METER__KAFKA__REPLICATION_FACTOR", "-1"),
            ]),
        )
        .unwrap_err();
        let text = err.to_string();
        for field in [
            "billing.timezone",
            "billing.allowed_lateness",
            "billing.max_clock_skew",
            "metering.hll_precision",
            "metering.sample_interval",
            "metering.exact_limit",
            "topics.charges",
            "http.listen",
            "kafka.replication_factor",
        ] {
            assert!(text.contains(field), "{field} missing from {text}");
        }
        let err = Config::load(None, env(&[("IM_METER__KAFKA__BROKER", "x")])).unwrap_err();
        assert!(err.to_string().contains("kafka.broker"), "{err}");
        let err = Config::load(None, env(&[("IM_METER__METERING__HLL_PRECISION", "many")])).unwrap_err();
        assert!(err.to_string().contains("metering.hll_precision"), "{err}");
    }

    #[test]
    fn unknown_file_fields_are_refused_with_their_path() {
        let dir = std::env::temp_dir().join(format!("im-meter-config-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(&path, "[billing]\ntimezon = \"+08:00\"\n").unwrap();
        let err = Config::load(Some(&path), env(&[])).unwrap_err();
        assert!(err.to_string().contains("billing"), "{err}");
        assert!(err.to_string().contains("timezon"), "{err}");
    }

    #[test]
    fn the_api_token_comes_from_the_environment_or_a_file_and_never_shows() {
        let file = std::env::temp_dir().join(format!("im-meter-api-token-{}", std::process::id()));
        std::fs::write(&file, "from-a-file\n").unwrap();
        let path = file.to_str().unwrap();
        let from_file = Config::load(None, env(&[("IM_METER__HTTP__API_TOKEN_FILE", path)])).unwrap();
        assert_eq!(from_file.http.api_token.as_ref().map(Secret::expose), Some("from-a-file"));
        assert!(!format!("{from_file:?}").contains("from-a-file"), "the token shows in Debug");
        let from_env = Config::load(None, env(&[("IM_METER__HTTP__API_TOKEN", "from-env")])).unwrap();
        assert_eq!(from_env.http.api_token.as_ref().map(Secret::expose), Some("from-env"));
        assert!(Config::load(None, env(&[])).unwrap().http.api_token.is_none(), "open by default");
        let both = env(&[("IM_METER__HTTP__API_TOKEN", "x"), ("IM_METER__HTTP__API_TOKEN_FILE", path)]);
        let missing = env(&[("IM_METER__HTTP__API_TOKEN_FILE", "/nonexistent/token")]);
        for bad in [both, missing] {
            let err = Config::load(None, bad).unwrap_err().to_string();
            assert!(err.contains("http.api_token_file"), "{err}");
        }
        std::fs::remove_file(&file).unwrap();
    }

    #[test]
    fn the_example_config_in_deploy_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/im-meter.toml");
        let c = Config::load(Some(&path), env(&[])).unwrap();
        assert_eq!(c.file.topics.events, "im.sdk-events");
        // The example documents every key with its default: the file is the defaults,
        // written once in `FileConfig::default`, spelled out (a changed default fails here).
        let text = std::fs::read_to_string(&path).unwrap();
        let example: toml::Value = toml::from_str(&text).unwrap();
        let defaults = toml::Value::try_from(FileConfig::default()).unwrap();
        assert_eq!(example, defaults, "deploy/im-meter.toml and FileConfig::default disagree");
    }
}
