//! Consumer lag, measured from outside the consumers: every few seconds the end of each
//! assigned partition is asked of the broker and compared with how far the consumer has
//! applied it.
//!
//! Why not librdkafka's statistics: they arrive through the consumer's own poll, so a
//! stalled consumer would also stop reporting its lag — the failure readiness must catch
//! (librdkafka#657); and the consumer never learns the offsets its transactions commit.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer};
use tracing::debug;

use super::client_config;
use crate::config::Config;
use crate::metrics::metrics;
use crate::status::Board;

/// How often partition ends are asked for.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(2);

/// Samples lag into `board` and the metrics until `shutdown` is set.
pub fn sample(config: &Config, board: &Board, shutdown: &AtomicBool) -> anyhow::Result<()> {
    let consumer: BaseConsumer = client_config(config).create().context("cannot create the lag sampler")?;
    // Series of partitions no longer assigned are removed, not left at their last value.
    let mut exported: BTreeSet<(&'static str, i32)> = BTreeSet::new();
    while !shutdown.load(Ordering::Relaxed) {
        let mut now_exported = BTreeSet::new();
        for status in board.consumers() {
            let partitions: Vec<i32> = status.state().partitions.keys().copied().collect();
            for p in partitions {
                // A broker that does not answer leaves the last known end in place.
                let end = consumer.fetch_watermarks(&status.topic, p, Duration::from_secs(5));
                if let Err(e) = &end {
                    debug!(partition = p, error = %e, "lag: cannot read the partition's end");
                }
                let mut state = status.state();
                let Some(entry) = state.partitions.get_mut(&p) else { continue };
                if let Ok((_, high)) = end {
                    entry.end_offset = Some(high);
                }
                if let Some(lag) = entry.lag() {
                    let stage = status.stage.label();
                    metrics().consumer_lag.with_label_values(&[stage, &p.to_string()]).set(lag);
                    now_exported.insert((stage, p));
                }
            }
        }
        for (stage, p) in exported.difference(&now_exported) {
            let partition = p.to_string();
            let _ = metrics().consumer_lag.remove_label_values(&[stage, partition.as_str()]);
        }
        exported = now_exported;
        let mut slept = Duration::ZERO;
        while slept < SAMPLE_EVERY && !shutdown.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(100));
            slept += Duration::from_millis(100);
        }
    }
    Ok(())
}
