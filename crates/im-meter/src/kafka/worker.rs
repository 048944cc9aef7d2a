//! `im-meter run`: the long-lived worker. Creates missing topics, then runs the metering
//! and billing stages, each on its own OS thread, until a shutdown signal.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use tracing::{error, info, warn};

use super::admin::{
    ensure_topics, grow_topic, topic_configs, value_limit, Keep, TopicSpec, PRODUCER_MAX_BYTES,
};
use super::output::DEAD_LETTER_RECORD_MAX;
use super::{bill, changelog, client_config, clock, meter};
use crate::config::Config;
use crate::failpoints::Failpoint;
use crate::status::Board;

/// Which stages a worker runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// Both stages.
    All,
    /// Only metering (events → changelogs).
    Meter,
    /// Only billing (billing changelog → charges, alerts).
    Bill,
}

/// Creates every topic the worker uses that does not exist yet, and grows the metering
/// changelog to the events topic's partition count (the state of events partition p lives
/// in changelog partition p). Both changelogs are compacted; the billing changelog gets as
/// many partitions as the events topic when it is created and keeps them (an app's billing
/// partition must never move). Charges and usage are created without a time or size limit,
/// alerts and dead letters with the configured retention; every topic that exists already
/// is checked to keep as much, or the worker refuses to start naming the topic and the
/// setting. Returns the largest value to write as one changelog record, from the limits it
/// finds (said in the log): larger ones are written in parts.
pub async fn prepare_topics(config: &Config) -> anyhow::Result<usize> {
    if Failpoint::PrepareFails.fire() {
        let gone =
            rdkafka::error::KafkaError::AdminOp(rdkafka::types::RDKafkaErrorCode::BrokerTransportFailure);
        return Err(anyhow::Error::from(gone).context("failpoint: cannot add partitions to a topic"));
    }
    let client = client_config(config);
    let t = &config.file.topics;
    let n = config.kafka.partitions;
    let plain = |name| TopicSpec { name, partitions: n, config: vec![] };
    ensure_topics(&client, &[plain(&t.events), plain(&t.subscriptions)], config.kafka.replication_factor)
        .await?;
    let events = changelog::partition_count(&client, &t.events)? as i32;
    let compacted = |name, partitions| TopicSpec {
        name,
        partitions,
        config: vec![("cleanup.policy", "compact"), ("min.compaction.lag.ms", "60000")],
    };
    // One partition for each of the subscriptions topic's: a copied record keeps its place.
    let subscriptions = changelog::partition_count(&client, &t.subscriptions)? as i32;
    let forever = |name| TopicSpec {
        name,
        partitions: n,
        config: vec![("cleanup.policy", "delete"), ("retention.ms", "-1"), ("retention.bytes", "-1")],
    };
    let dead_letters_ms = config.kafka.dead_letters_retention.as_millis().to_string();
    let alerts_ms = config.kafka.alerts_retention.as_millis().to_string();
    let kept = |name, ms| TopicSpec { name, partitions: n, config: vec![("retention.ms", ms)] };
    let clock_topic = clock::topic(&config.file.kafka.group_id);
    // Stamped by the broker, for the clock probe; an hour of empty records is all it keeps.
    let clock = TopicSpec {
        name: &clock_topic,
        partitions: 1,
        config: vec![("message.timestamp.type", "LogAppendTime"), ("retention.ms", "3600000")],
    };
    let outputs = [
        clock,
        compacted(&t.changelog, events),
        compacted(&t.billing_changelog, events),
        compacted(&t.plan_book, subscriptions),
        kept(&t.dead_letters, &dead_letters_ms),
        forever(&t.charges),
        kept(&t.alerts, &alerts_ms),
        forever(&t.usage),
    ];
    ensure_topics(&client, &outputs, config.kafka.replication_factor).await?;
    let keeps = [
        (&t.changelog, Keep::Compacted),
        (&t.billing_changelog, Keep::Compacted),
        (&t.plan_book, Keep::Compacted),
        (&t.charges, Keep::Forever),
        (&t.usage, Keep::Forever),
        (&t.dead_letters, Keep::AtLeast(config.kafka.dead_letters_retention)),
        (&t.alerts, Keep::AtLeast(config.kafka.alerts_retention)),
    ];
    let names: Vec<&str> = keeps.iter().map(|(name, _)| name.as_str()).collect();
    let configs = topic_configs(&client, &names).await?;
    for (topic, (_, keep)) in configs.iter().zip(keeps) {
        topic.check_keeps(keep)?;
    }
    let copies = changelog::partition_count(&client, &t.plan_book)? as i32;
    anyhow::ensure!(
        copies >= subscriptions,
        "topic {} has {copies} partitions but {} has {subscriptions}: the plan book needs at least as many",
        t.plan_book,
        t.subscriptions
    );
    // The events topic grew while no worker ran (docs/operations.md, "Adding partitions").
    if changelog::partition_count(&client, &t.changelog)? < events as u32 {
        grow_topic(&client, &t.changelog, events as usize).await?;
    }
    // Values of the compacted topics (state, usage shares, plan book copies) over the limit
    // go in parts; dead letters are cut to a bounded size, which their topic must take.
    let limit_of = |name: &str| match configs.iter().find(|c| c.topic == name) {
        Some(config) => config.max_message_bytes(),
        None => anyhow::bail!("no configuration read for topic {name}"),
    };
    let mut topic_limit = usize::MAX;
    for topic in [&t.changelog, &t.billing_changelog, &t.plan_book] {
        topic_limit = topic_limit.min(limit_of(topic)?);
    }
    let limit = value_limit(topic_limit.min(PRODUCER_MAX_BYTES));
    let dead_letters = limit_of(&t.dead_letters)?;
    anyhow::ensure!(
        dead_letters >= DEAD_LETTER_RECORD_MAX,
        "topic {}: max.message.bytes is {dead_letters}, but a dead letter can take up to {DEAD_LETTER_RECORD_MAX} bytes \
         (64 KiB of the refused payload, 4 KiB of its key, its headers); raise it",
        t.dead_letters
    );
    info!(
        topics = ?[&t.changelog, &t.billing_changelog, &t.plan_book],
        topic_max_message_bytes = topic_limit,
        producer_message_max_bytes = PRODUCER_MAX_BYTES,
        max_value_bytes = limit,
        dead_letter_max_bytes = DEAD_LETTER_RECORD_MAX,
        "worker: record limits found; larger values are written in parts, dead letters cut to 64 KiB of payload"
    );
    Ok(limit)
}

/// [`prepare_topics`], tried again a second later while a broker call fails for a cause that
/// comes and goes with the brokers (one restarting as the worker starts), for up to
/// [`super::RETRY_FOR`]; any other failure (a topic that does not keep what it must) at once.
/// Preparing is idempotent: topics and partitions that exist are left as they are.
pub async fn prepare_topics_when_reachable(config: &Config) -> anyhow::Result<usize> {
    let deadline = std::time::Instant::now() + super::RETRY_FOR;
    loop {
        match prepare_topics(config).await {
            Err(e) if super::is_transient(&e) && std::time::Instant::now() < deadline => {
                warn!(
                    error = format!("{e:#}"),
                    "worker: the brokers do not answer yet; preparing the topics again"
                );
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
            prepared => return prepared,
        }
    }
}

/// A stage's entry point: runs until the flag is set or it fails.
type Stage<'a> = Box<dyn FnOnce(&AtomicBool) -> anyhow::Result<()> + Send + 'a>;

/// Runs the chosen stages until `shutdown` is set or one fails (then the others are
/// stopped too and the first error returned): `worker.meter_threads` metering consumers
/// and one billing stage, all reporting to `board`.
pub fn run(config: &Config, role: Role, shutdown: Arc<AtomicBool>, board: &Board) -> anyhow::Result<()> {
    let mut stages: Vec<(String, Stage<'_>)> = Vec::new();
    if config.billing.start_month.is_none() {
        warn!("billing.start_month is not set: billing starts at the first month any event is dated in, so one stray old event bills every month since (README, Decisions)");
    }
    if matches!(role, Role::All | Role::Meter) {
        for member in 0..config.kafka.meter_threads {
            let stage: Stage<'_> = Box::new(move |stop| meter::run(config, member, stop, board));
            stages.push((format!("meter-{member}"), stage));
        }
    }
    if matches!(role, Role::All | Role::Bill) {
        stages.push(("billing".into(), Box::new(|stop| bill::run(config, stop, board))));
    }
    board.expect_consumers(stages.len());
    // The clock is checked before any event is judged by it (docs/operations.md, "Clock").
    let clock = board.clock();
    let mut probe = clock::Probe::new(
        &client_config(config),
        &config.file.kafka.group_id,
        config.billing.max_clock_skew,
    )?;
    probe.measure(&clock)?;
    stages.push(("clock".into(), Box::new(move |stop| probe.run(&clock, stop))));
    std::thread::scope(|scope| {
        let handles: Vec<_> = stages
            .into_iter()
            .map(|(name, stage)| {
                let shutdown = Arc::clone(&shutdown);
                let thread_name = name.clone();
                let handle = std::thread::Builder::new()
                    .name(format!("im-meter-{name}"))
                    .spawn_scoped(scope, move || {
                        // Every log line of the stage says which one it is.
                        let _span = tracing::info_span!("stage", consumer = %thread_name).entered();
                        let result = stage(&shutdown);
                        if let Err(e) = &result {
                            error!(error = %format!("{e:#}"), "stage failed; stopping the worker");
                        }
                        // One stage down takes the worker down: a supervisor restarts it whole.
                        shutdown.store(true, Ordering::Relaxed);
                        result
                    })
                    .with_context(|| format!("cannot start the {name} stage"))?;
                Ok::<_, anyhow::Error>((name, handle))
            })
            .collect::<Result<_, _>>()?;
        let mut first_error = None;
        for (name, handle) in handles {
            let result =
                handle.join().map_err(|_| anyhow::anyhow!("the {name} stage panicked")).and_then(|r| r);
            if let Err(e) = result {
                first_error.get_or_insert(e);
            }
        }
        info!("worker stopped");
        first_error.map_or(Ok(()), Err)
    })
}
