//! Topic administration: create the topics a stage needs, if they are missing.

use std::time::Duration;

use anyhow::Context;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
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
    Ok(())
}
