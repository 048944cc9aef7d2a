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

use im_meter_core::aggregate::{MeterSettings, Precision, SampleGrid};
use im_meter_core::bill::PriceBook;
use im_meter_core::time::{BillingTz, Timestamp};
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
                changelog: "im.meter.changelog".into(),
                billing_changelog: "im.billing.changelog".into(),
                charges: "im.billing.charges".into(),
                alerts: "im.billing.alerts".into(),
                usage: "im.billing.usage".into(),
                plan_book: "im.billing.plan-book".into(),
            },
            billing: BillingSection {
                timezone: "+08:00".into(),
                allowed_lateness: "1h".into(),
                max_clock_skew: "5m".into(),
                pcc_promotion_end: String::new(),
                av_call_price: String::new(),
            },
            metering: MeteringSection {
                hll_precision: i64::from(Precision::default().get()),
                sample_interval: "60s".into(),
                connection_idle_timeout: "off".into(),
                max_group_count: 100_000_000,
            },
            http: HttpSection {
                listen: "127.0.0.1:9464".into(),
                top_apps: 10,
                stall_timeout: "60s".into(),
                history_months: 3,
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
    pub changelog: String,
    /// Compacted changelog of the billing stage: closed months' usage shares, closed-through
    /// marks and billing's own marks, partitioned by app. Its partition count is fixed at
    /// creation, so that an app's billing partition never moves.
    pub billing_changelog: String,
    /// Charges out.
    pub charges: String,
    /// Quota alerts out.
    pub alerts: String,
    /// Each billed app-month's usage out (key `{app_id}/{YYYY-MM}`).
    pub usage: String,
    /// Compacted copy of the subscriptions topic kept by billing, so that the plan book
    /// outlives the subscriptions topic's retention.
    pub plan_book: String,
}

impl TopicsSection {
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
}

/// `[metering]`: how usage is measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeteringSection {
    /// HLL++ precision, 10–18.
    pub hll_precision: i64,
    /// PCC sample interval; must divide an hour.
    pub sample_interval: String,
    /// Close connections silent this long (`30m`), or `off`.
    pub connection_idle_timeout: String,
    /// The largest plausible `group_count`; larger ones are dead-lettered as `implausible`.
    pub max_group_count: i64,
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
}

/// A validated configuration, in the types the program uses.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file form (names of brokers, topics, group).
    pub file: FileConfig,
    /// How the meter measures.
    pub meter: MeterSettings,
    /// Prices that vary by date or deal.
    pub prices: PriceBook,
    /// How the Kafka worker runs.
    pub worker: WorkerSettings,
    /// The operator endpoints.
    pub http: HttpSettings,
    /// Events dated further than this after the clock of whoever receives them (the
    /// worker, or replay) are refused as `future` and never move event time.
    pub max_clock_skew: Duration,
    /// The largest plausible `group_count`: a larger one is refused as `implausible`.
    pub max_group_count: u64,
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
}

/// The Kafka worker's settings, validated.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// This worker's stable name in the group.
    pub instance_id: String,
    /// Partitions of topics the worker creates.
    pub partitions: i32,
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

impl FileConfig {
    /// Checks every field and converts to the program's types, reporting all problems.
    pub fn validate(self) -> Result<Config, ConfigErrors> {
        let mut problems = Vec::new();
        let mut check = |field: &str, result: Result<(), String>| {
            if let Err(e) = result {
                problems.push(format!("{field}: {e}"));
            }
        };
        let mut tz = BillingTz::default();
        check("billing.timezone", self.billing.timezone.parse().map(|t| tz = t).map_err(|e| format!("{e}")));
        let mut allowed_lateness = Duration::from_secs(3600);
        let mut max_clock_skew = Duration::from_secs(300);
        let mut worker = WorkerSettings {
            instance_id: match self.kafka.instance_id.trim() {
                "" => default_instance_id(),
                id => id.to_string(),
            },
            partitions: 6,
            commit_interval: Duration::from_secs(1),
            idle_partition_timeout: Duration::from_secs(30),
            transaction_timeout: Duration::from_secs(30),
            max_poll_interval: Duration::from_secs(300),
            metadata_refresh_interval: Duration::from_secs(60),
            max_value_bytes: crate::kafka::admin::value_limit(crate::kafka::admin::PRODUCER_MAX_BYTES),
            meter_threads: 1,
        };
        check(
            "billing.allowed_lateness",
            duration(&self.billing.allowed_lateness).map(|d| allowed_lateness = d),
        );
        check("billing.max_clock_skew", duration(&self.billing.max_clock_skew).map(|d| max_clock_skew = d));
        check(
            "kafka.partitions",
            i32::try_from(self.kafka.partitions)
                .ok()
                .filter(|p| *p > 0)
                .map(|p| worker.partitions = p)
                .ok_or_else(|| {
                    format!("must be a positive number of partitions, got {}", self.kafka.partitions)
                }),
        );
        check(
            "kafka.commit_interval",
            duration(&self.kafka.commit_interval).and_then(positive).map(|d| worker.commit_interval = d),
        );
        check(
            "kafka.idle_partition_timeout",
            duration(&self.kafka.idle_partition_timeout)
                .and_then(positive)
                .map(|d| worker.idle_partition_timeout = d),
        );
        check(
            "kafka.max_poll_interval",
            duration(&self.kafka.max_poll_interval)
                .and_then(|d| {
                    (Duration::from_secs(1)..=Duration::from_secs(86_400))
                        .contains(&d)
                        .then_some(d)
                        .ok_or_else(|| "must be between 1s and 24h".to_string())
                })
                .map(|d| worker.max_poll_interval = d),
        );
        check(
            "kafka.metadata_refresh_interval",
            duration(&self.kafka.metadata_refresh_interval)
                .and_then(positive)
                .map(|d| worker.metadata_refresh_interval = d),
        );
        let meter_threads = match usize::try_from(self.kafka.meter_threads) {
            Ok(0) => Ok(std::thread::available_parallelism().map_or(1, usize::from)),
            Ok(n) if n <= 256 => Ok(n),
            _ => Err(format!("must be 0 (one per CPU) to 256, got {}", self.kafka.meter_threads)),
        };
        check("kafka.meter_threads", meter_threads.map(|n| worker.meter_threads = n));
        check(
            "kafka.transaction_timeout",
            duration(&self.kafka.transaction_timeout)
                .and_then(|d| {
                    (d >= Duration::from_secs(1))
                        .then_some(d)
                        .ok_or_else(|| "must be at least 1s".to_string())
                })
                .map(|d| worker.transaction_timeout = d),
        );
        let mut prices = PriceBook::default();
        if !self.billing.pcc_promotion_end.trim().is_empty() {
            check(
                "billing.pcc_promotion_end",
                Timestamp::parse_rfc3339(self.billing.pcc_promotion_end.trim())
                    .map(|t| prices.pcc_promotion_end = Some(t))
                    .map_err(|e| e.to_string()),
            );
        }
        if !self.billing.av_call_price.trim().is_empty() {
            check(
                "billing.av_call_price",
                self.billing
                    .av_call_price
                    .trim()
                    .parse::<Decimal>()
                    .ok()
                    .filter(|p| !p.is_sign_negative())
                    .map(|p| prices.av_call_price = Some(p))
                    .ok_or_else(|| {
                        format!("{:?} is not a non-negative decimal price", self.billing.av_call_price)
                    }),
            );
        }
        let mut meter =
            MeterSettings { tz, allowed_lateness: Some(allowed_lateness), ..MeterSettings::default() };
        check(
            "metering.hll_precision",
            Precision::new(self.metering.hll_precision)
                .map(|p| meter.precision = p)
                .map_err(|e| e.to_string()),
        );
        check(
            "metering.sample_interval",
            duration(&self.metering.sample_interval)
                .and_then(|d| SampleGrid::new(d).map_err(|e| e.to_string()))
                .map(|g| meter.grid = g),
        );
        let idle = self.metering.connection_idle_timeout.trim();
        if !idle.eq_ignore_ascii_case("off") && !idle.is_empty() {
            check(
                "metering.connection_idle_timeout",
                duration(idle).and_then(|d| {
                    (!d.is_zero())
                        .then(|| meter.idle_timeout = Some(d))
                        .ok_or_else(|| "must be positive or \"off\"".into())
                }),
            );
        }
        check(
            "kafka.brokers",
            (!self.kafka.brokers.trim().is_empty())
                .then_some(())
                .ok_or_else(|| "must name at least one broker".into()),
        );
        check(
            "kafka.group_id",
            (!self.kafka.group_id.trim().is_empty()).then_some(()).ok_or_else(|| "must not be empty".into()),
        );
        for (field, name) in self.topics.fields() {
            check(&format!("topics.{field}"), topic_name(name));
        }
        let mut http = HttpSettings {
            listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
            top_apps: 10,
            stall_timeout: Duration::from_secs(60),
            history_months: 3,
        };
        check(
            "http.listen",
            self.http
                .listen
                .parse::<SocketAddr>()
                .map(|a| http.listen = a)
                .map_err(|_| format!("{:?} is not an address like 127.0.0.1:9464", self.http.listen)),
        );
        check(
            "http.top_apps",
            usize::try_from(self.http.top_apps)
                .ok()
                .filter(|n| *n <= 1000)
                .map(|n| http.top_apps = n)
                .ok_or_else(|| format!("must be 0 to 1000 apps, got {}", self.http.top_apps)),
        );
        check(
            "http.stall_timeout",
            duration(&self.http.stall_timeout).and_then(positive).map(|d| http.stall_timeout = d),
        );
        check(
            "http.history_months",
            usize::try_from(self.http.history_months)
                .ok()
                .filter(|n| (1..=120).contains(n))
                .map(|n| http.history_months = n)
                .ok_or_else(|| format!("must be 1 to 120 months, got {}", self.http.history_months)),
        );
        const PROTOCOLS: [&str; 4] = ["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"];
        check(
            "kafka.security_protocol",
            PROTOCOLS
                .contains(&self.kafka.security_protocol.to_ascii_lowercase().as_str())
                .then_some(())
                .ok_or_else(|| format!("must be one of {}", PROTOCOLS.join(", "))),
        );
        let max_group_count = u64::try_from(self.metering.max_group_count).unwrap_or(0);
        check(
            "metering.max_group_count",
            (max_group_count > 0)
                .then_some(())
                .ok_or_else(|| format!("must be a positive number, got {}", self.metering.max_group_count)),
        );
        if problems.is_empty() {
            Ok(Config { file: self, meter, prices, worker, http, max_clock_skew, max_group_count })
        } else {
            Err(ConfigErrors(problems))
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
        assert_eq!(c.file.topics.changelog, "im.meter.changelog");
        assert_eq!(c.meter.tz.to_string(), "+08:00");
        assert_eq!(c.meter.allowed_lateness, Some(Duration::from_secs(3600)));
        assert_eq!(c.max_clock_skew, Duration::from_secs(300));
        assert_eq!(c.file.http.listen, "127.0.0.1:9464");
        assert_eq!(c.meter.precision.get(), 14);
        assert!(c.meter.idle_timeout.is_none());
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
                ("IM_METER__TOPICS__CHARGES", "bad topic"),
                ("IM_METER__HTTP__LISTEN", "nowhere"),
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
            "topics.charges",
            "http.listen",
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
    fn the_example_config_in_deploy_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/im-meter.toml");
        let c = Config::load(Some(&path), env(&[])).unwrap();
        assert_eq!(c.file.topics.events, "im.sdk-events");
    }
}
