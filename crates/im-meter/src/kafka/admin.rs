//! Topic administration: create the topics a stage needs, if they are missing.

use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::admin::{
    AdminClient, AdminOptions, NewPartitions, NewTopic, ResourceSpecifier, TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::ClientConfig;

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

/// Creates every topic of `specs` that does not exist yet (existing ones are left as
/// they are). Replication factor is the broker's default.
pub async fn ensure_topics(client: &ClientConfig, specs: &[TopicSpec<'_>]) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> =
        client.create().context("cannot create Kafka admin client")?;
    let topics: Vec<NewTopic> = specs
        .iter()
        .map(|s| {
            s.config
                .iter()
                .fold(NewTopic::new(s.name, s.partitions, TopicReplication::Fixed(-1)), |t, (k, v)| {
                    t.set(k, v)
                })
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin.create_topics(&topics, &options).await.context("cannot create topics")?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => anyhow::bail!("cannot create topic {topic}: {code}"),
        }
    }
    // The controller has created them; the broker's metadata says so a moment later (right
    // after a broker start, long enough for a reader to find "no partitions").
    let names: Vec<String> = specs.iter().map(|s| s.name.to_string()).collect();
    let client = client.clone();
    tokio::task::spawn_blocking(move || wait_for_metadata(&client, &names))
        .await
        .context("waiting for the topics' metadata")?
}

/// Waits (up to 30 s) until the metadata shows every topic of `names` with partitions.
fn wait_for_metadata(client: &ClientConfig, names: &[String]) -> anyhow::Result<()> {
    let reader: BaseConsumer = client.create().context("cannot create a metadata client")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    for name in names {
        loop {
            let known = reader
                .fetch_metadata(Some(name), Duration::from_secs(5))
                .map(|m| m.topics().first().is_some_and(|t| !t.partitions().is_empty()));
            if known.unwrap_or(false) {
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

/// A topic's `max.message.bytes` (its own setting or the broker's default).
pub async fn max_message_bytes(client: &ClientConfig, topic: &str) -> anyhow::Result<usize> {
    let admin: AdminClient<DefaultClientContext> =
        client.create().context("cannot create Kafka admin client")?;
    let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .describe_configs(&[ResourceSpecifier::Topic(topic)], &options)
        .await
        .with_context(|| format!("cannot read the configuration of topic {topic}"))?;
    let resource = results
        .into_iter()
        .next()
        .context("no configuration returned")?
        .map_err(|code| anyhow::anyhow!("cannot read the configuration of topic {topic}: {code}"))?;
    let value = resource
        .get("max.message.bytes")
        .and_then(|entry| entry.value.as_deref())
        .with_context(|| format!("topic {topic} has no max.message.bytes"))?;
    value.parse().with_context(|| format!("topic {topic}: max.message.bytes {value:?} is not a number"))
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
