//! The Kafka edge: client settings shared by every stage, topic administration,
//! producing events (`im-meter produce`), and the worker's stages (`im-meter run`).

pub mod admin;
pub mod bill;
pub mod changelog;
pub mod clock;
pub mod fetch;
pub mod lag;
pub mod ledger;
pub mod meter;
pub mod output;
pub mod plan_book;
pub mod poison;
pub mod produce;
pub mod report;
pub mod worker;

use rdkafka::ClientConfig;

use crate::config::Config;

/// Client settings common to every producer, consumer and admin client.
pub fn client_config(config: &Config) -> ClientConfig {
    let kafka = &config.file.kafka;
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &kafka.brokers)
        // Name the process in broker logs and quotas.
        .set("client.id", "im-meter")
        .set("security.protocol", kafka.security_protocol.to_ascii_lowercase());
    if !kafka.sasl_mechanism.is_empty() {
        client.set("sasl.mechanism", &kafka.sasl_mechanism);
    }
    if !kafka.sasl_username.is_empty() {
        client.set("sasl.username", &kafka.sasl_username).set("sasl.password", kafka.sasl_password.expose());
    }
    client
}

/// The consumer groups' `session.timeout.ms`: librdkafka requires it not to exceed the poll
/// interval; at most 45 s, Kafka's default.
pub fn session_timeout(config: &Config) -> std::time::Duration {
    config.kafka.max_poll_interval.min(std::time::Duration::from_secs(45))
}

/// Settings of a member of consumer group `group` as both stages use them: offsets only
/// ever committed inside transactions, read_committed, cooperative rebalancing, and a new
/// group starting at the beginning of its topics.
pub fn group_member(config: &Config, group: &str) -> ClientConfig {
    let max_poll = config.kafka.max_poll_interval;
    let session = session_timeout(config);
    let mut member = client_config(config);
    member
        .set("group.id", group)
        .set("max.poll.interval.ms", max_poll.as_millis().to_string())
        .set("session.timeout.ms", session.as_millis().to_string())
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .set("partition.assignment.strategy", "cooperative-sticky")
        // A subscription sees partitions added to its topics at the next refresh.
        .set(
            "topic.metadata.refresh.interval.ms",
            config.kafka.metadata_refresh_interval.as_millis().to_string(),
        );
    member
}

/// How long a broker call is retried while the broker is unreachable (restarting).
pub const RETRY_FOR: std::time::Duration = std::time::Duration::from_secs(120);

/// Refuses the state of `topic` partition `partition` if another deployment wrote it:
/// `owner` is the group id its owner record names (`None`: none written yet).
pub fn check_owner(config: &Config, topic: &str, partition: i32, owner: Option<&[u8]>) -> anyhow::Result<()> {
    let ours = &config.file.kafka.group_id;
    match owner {
        Some(owner) if owner != ours.as_bytes() => anyhow::bail!(
            "topic {topic} partition {partition} holds the state of consumer group {:?}, but this worker's \
             kafka.group_id is {ours:?}: two deployments must not share internal topics. Give this deployment its own \
             (leave topics.changelog, topics.billing_changelog and topics.plan_book empty: they are named from the \
             group id), or, to rename a group on purpose, follow the README's \"Renaming a group\"",
            String::from_utf8_lossy(owner)
        ),
        _ => Ok(()),
    }
}

/// Whether `e`, from a broker call, is worth trying again later: it comes from the Kafka
/// client (a timeout, a broker unreachable or moving leaders, metadata not known yet), and
/// is not a fatal transactional error (fenced by a newer owner, a broken protocol). Errors
/// of our own — a topic missing, another group's state — are not.
pub fn is_transient(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<rdkafka::error::KafkaError>()
            .is_some_and(|k| !matches!(k, rdkafka::error::KafkaError::Transaction(t) if t.is_fatal()))
    })
}

/// Calls `f` until it succeeds or [`RETRY_FOR`] has passed, a second apart: for broker
/// calls that fail while a broker restarts. The last error is returned with `what`. While
/// it retries, readiness lists `what` and its last error.
pub fn with_retries<T>(
    what: &str,
    mut f: impl FnMut() -> rdkafka::error::KafkaResult<T>,
) -> anyhow::Result<T> {
    let deadline = std::time::Instant::now() + RETRY_FOR;
    loop {
        match f() {
            Ok(value) => {
                crate::status::call_done(what);
                return Ok(value);
            }
            Err(e) if std::time::Instant::now() < deadline => {
                tracing::warn!(error = %e, "{what} failed; retrying");
                // The stage waits here: readiness says so.
                crate::status::call_retrying(what, e.to_string());
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
            Err(e) => {
                crate::status::call_done(what);
                return Err(anyhow::Error::from(e).context(format!("{what} failed")));
            }
        }
    }
}
