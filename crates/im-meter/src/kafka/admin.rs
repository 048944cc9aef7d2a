//! Topic administration: create the topics a stage needs, if they are missing, and check
//! that existing ones keep what the worker needs them to keep.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::admin::{
    AdminClient, AdminOptions, NewPartitions, NewTopic, ResourceSpecifier, TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::ClientConfig;
use tracing::warn;

/// A topic to have: its name, partitions and extra configuration.
#[derive(Debug, Clone)]
pub struct TopicSpec<'a> {
    /// Topic name.
    pub name: &'a str,
    /// Partition count, when created.
    pub partitions: i32,
    /// Extra topic configuration (e.g. `cleanup.policy=compact`).
    pub config: Vec<(&'a str, &'a str)>,
}

/// The topic settings that go with `replicas`: with three or more, a write counts once two
/// replicas have it (`min.insync.replicas` 2; the worker's producers use `acks=all`), so one
/// broker lost loses no committed record and stops no write.
fn durability(replicas: Option<i32>) -> Option<(&'static str, &'static str)> {
    replicas.filter(|&r| r >= 3).map(|_| ("min.insync.replicas", "2"))
}

/// Creates every topic of `specs` that does not exist yet (existing ones are left as
/// they are), with `replicas` replicas each (`None`: the broker's default).
pub async fn ensure_topics(
    client: &ClientConfig,
    specs: &[TopicSpec<'_>],
    replicas: Option<i32>,
) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> =
        client.create().context("cannot create Kafka admin client")?;
    let topics: Vec<NewTopic> = specs
        .iter()
        .map(|s| {
            let new = NewTopic::new(s.name, s.partitions, TopicReplication::Fixed(replicas.unwrap_or(-1)));
            s.config.iter().chain(durability(replicas).iter()).fold(new, |t, (k, v)| t.set(k, v))
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin.create_topics(&topics, &options).await.context("cannot create topics")?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, RDKafkaErrorCode::InvalidReplicationFactor)) => anyhow::bail!(
                "cannot create topic {topic}: kafka.replication_factor is {}, more than the brokers the cluster \
                 has up; lower it, or 0 for the broker's default",
                replicas.unwrap_or(-1)
            ),
            Err((topic, code)) => anyhow::bail!("cannot create topic {topic}: {code}"),
        }
    }
    // The controller has created them; the broker's metadata says so a moment later (right
    // after a broker start, long enough for a reader to find "no partitions").
    let names: Vec<String> = specs.iter().map(|s| s.name.to_string()).collect();
    let client = client.clone();
    tokio::task::spawn_blocking(move || wait_for_metadata(&client, &names, replicas))
        .await
        .context("waiting for the topics' metadata")?
}

/// Waits (up to 30 s) until the metadata shows every topic of `names` with partitions, and
/// warns of each one with fewer than `replicas` replicas (one that existed before: it is left
/// as it is, and a broker lost can lose or stop what it holds).
fn wait_for_metadata(client: &ClientConfig, names: &[String], replicas: Option<i32>) -> anyhow::Result<()> {
    let reader: BaseConsumer = client.create().context("cannot create a metadata client")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    for name in names {
        loop {
            let found = reader.fetch_metadata(Some(name), Duration::from_secs(5)).ok().and_then(|m| {
                let topic = m.topics().first()?;
                let fewest = topic.partitions().iter().map(|p| p.replicas().len()).min()?;
                Some(fewest)
            });
            if let Some(fewest) = found {
                if let Some(wanted) = replicas.filter(|&r| (fewest as i32) < r) {
                    warn!(
                        topic = %name,
                        replicas = fewest,
                        wanted,
                        "topic has fewer replicas than kafka.replication_factor asks (it existed before); \
                         add replicas with kafka-reassign-partitions.sh"
                    );
                }
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "topic {name} has no partitions 30 s after it was created"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(())
}

/// librdkafka's `message.max.bytes`, which the worker's producers keep: no record may be
/// larger, whatever the topic allows.
pub const PRODUCER_MAX_BYTES: usize = 1_000_000;

/// The largest value to write as one record when records may be `record_limit` bytes: a
/// sixteenth is left for the key, headers and batch overhead (compression of a sketch
/// can even grow it a little).
pub fn value_limit(record_limit: usize) -> usize {
    record_limit - record_limit / 16
}

/// A topic's configuration as the broker reports it: its own settings and the broker's
/// defaults for the rest.
#[derive(Debug, Clone, Default)]
pub struct TopicConfig {
    /// The topic's name.
    pub topic: String,
    entries: BTreeMap<String, String>,
}

impl TopicConfig {
    /// A configuration of `entries` (for tests).
    #[cfg(test)]
    pub fn of(topic: &str, entries: &[(&str, &str)]) -> Self {
        let entries = entries.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        TopicConfig { topic: topic.to_string(), entries }
    }

    /// A numeric setting.
    fn number(&self, key: &str) -> anyhow::Result<i64> {
        let value = self.entries.get(key).with_context(|| format!("topic {} has no {key}", self.topic))?;
        value.parse().with_context(|| format!("topic {}: {key} {value:?} is not a number", self.topic))
    }

    /// `max.message.bytes`: the largest record batch the topic takes.
    pub fn max_message_bytes(&self) -> anyhow::Result<usize> {
        let bytes = self.number("max.message.bytes")?;
        usize::try_from(bytes).with_context(|| format!("topic {}: max.message.bytes is {bytes}", self.topic))
    }

    /// Refuses a topic that would drop records sooner than `keep` says, naming the setting
    /// and the command that fixes it.
    pub fn check_keeps(&self, keep: Keep) -> anyhow::Result<()> {
        let policy = self.entries.get("cleanup.policy").map_or("delete", String::as_str);
        let compacts = policy.split(',').any(|p| p.trim() == "compact");
        let deletes = policy.split(',').any(|p| p.trim() == "delete");
        let (ms, bytes) = (self.number("retention.ms")?, self.number("retention.bytes")?);
        let topic = &self.topic;
        let alter =
            format!("kafka-configs.sh --alter --entity-type topics --entity-name {topic} --add-config");
        let expires = deletes && (ms >= 0 || bytes >= 0);
        match keep {
            Keep::Compacted => anyhow::ensure!(
                compacts && !expires,
                "topic {topic} keeps the worker's state, but its cleanup.policy is {policy:?} (retention.ms {ms}, \
                 retention.bytes {bytes}): records dropped by retention would silently shrink the state. It must be \
                 compacted and never expire: {alter} cleanup.policy=compact"
            ),
            Keep::Forever => anyhow::ensure!(
                !expires,
                "topic {topic} holds the published bill, but it drops records (cleanup.policy {policy:?}, \
                 retention.ms {ms}, retention.bytes {bytes}): bills must stay readable. Keep them without a limit: \
                 {alter} retention.ms=-1,retention.bytes=-1"
            ),
            Keep::AtLeast(least) => anyhow::ensure!(
                !deletes || ms < 0 || ms as u128 >= least.as_millis(),
                "topic {topic} keeps records {ms} ms (retention.ms), less than the {} ms the configuration asks \
                 for: {alter} retention.ms={}, or lower the setting",
                least.as_millis(),
                least.as_millis()
            ),
        }
        Ok(())
    }
}

/// How long a topic must keep its records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// The worker's state: compacted, never expired by time or size.
    Compacted,
    /// The published bill: never expired (compacted, or no time and size limit).
    Forever,
    /// At least this long (alerts, dead letters).
    AtLeast(Duration),
}

/// The configuration of each of `topics`, in their order.
pub async fn topic_configs(client: &ClientConfig, topics: &[&str]) -> anyhow::Result<Vec<TopicConfig>> {
    let admin: AdminClient<DefaultClientContext> =
        client.create().context("cannot create Kafka admin client")?;
    let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(30)));
    let resources: Vec<ResourceSpecifier<'_>> = topics.iter().map(|t| ResourceSpecifier::Topic(t)).collect();
    let results = admin
        .describe_configs(&resources, &options)
        .await
        .with_context(|| format!("cannot read the configuration of topics {topics:?}"))?;
    anyhow::ensure!(
        results.len() == topics.len(),
        "configurations of {} topics returned for {topics:?}",
        results.len()
    );
    topics
        .iter()
        .zip(results)
        .map(|(topic, result)| {
            let resource = result
                .map_err(|code| anyhow::anyhow!("cannot read the configuration of topic {topic}: {code}"))?;
            let entries =
                resource.entries.into_iter().filter_map(|entry| Some((entry.name, entry.value?))).collect();
            Ok(TopicConfig { topic: topic.to_string(), entries })
        })
        .collect()
}

/// Gives `topic` at least `partitions` partitions (it never shrinks). Several workers may
/// grow it at once: a request the broker refuses because the topic already has that many
/// is success.
pub async fn grow_topic(client: &ClientConfig, topic: &str, partitions: usize) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> =
        client.create().context("cannot create Kafka admin client")?;
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .create_partitions(&[NewPartitions::new(topic, partitions)], &options)
        .await
        .with_context(|| format!("cannot add partitions to topic {topic}"))?;
    for result in results {
        match result {
            Ok(_) => tracing::info!(topic, partitions, "topic grown"),
            // "Topic already has N partitions": another worker got there first.
            Err((_, RDKafkaErrorCode::InvalidPartitions)) => {}
            Err((topic, code)) => anyhow::bail!("cannot add partitions to topic {topic}: {code}"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(policy: &str, ms: &str, bytes: &str) -> TopicConfig {
        TopicConfig::of(
            "t",
            &[
                ("cleanup.policy", policy),
                ("retention.ms", ms),
                ("retention.bytes", bytes),
                ("max.message.bytes", "1048588"),
            ],
        )
    }

    #[test]
    fn state_topics_must_be_compacted_and_never_expire() {
        assert!(config("compact", "604800000", "-1").check_keeps(Keep::Compacted).is_ok());
        assert!(config("compact,delete", "-1", "-1").check_keeps(Keep::Compacted).is_ok());
        let refused = config("delete", "-1", "-1").check_keeps(Keep::Compacted).unwrap_err().to_string();
        assert!(refused.contains("topic t") && refused.contains("cleanup.policy=compact"), "{refused}");
        assert!(config("compact,delete", "604800000", "-1").check_keeps(Keep::Compacted).is_err());
        assert!(config("compact,delete", "-1", "1000000").check_keeps(Keep::Compacted).is_err());
    }

    #[test]
    fn the_bill_is_kept_without_a_limit_and_the_rest_as_long_as_configured() {
        assert!(config("delete", "-1", "-1").check_keeps(Keep::Forever).is_ok());
        assert!(config("compact", "604800000", "-1").check_keeps(Keep::Forever).is_ok());
        let refused = config("delete", "604800000", "-1").check_keeps(Keep::Forever).unwrap_err().to_string();
        assert!(refused.contains("retention.ms=-1"), "{refused}");
        let ninety_days = Keep::AtLeast(Duration::from_secs(90 * 86_400));
        assert!(config("delete", "7776000000", "-1").check_keeps(ninety_days).is_ok());
        assert!(config("delete", "-1", "-1").check_keeps(ninety_days).is_ok());
        assert!(config("delete", "604800000", "-1").check_keeps(ninety_days).is_err());
        assert_eq!(config("delete", "1", "1").max_message_bytes().unwrap(), 1_048_588);
    }
}
