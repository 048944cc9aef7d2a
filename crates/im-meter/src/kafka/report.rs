//! `im-meter report`: reads back what the worker published for a billed month — usage,
//! charges, quota alerts — once every billing partition has billed it.

use std::time::{Duration, Instant};

use anyhow::Context;
use im_meter_core::bill::{Charge, QuotaAlert};
use im_meter_core::changelog::ChangelogKey;
use im_meter_core::time::Month;
use serde::de::DeserializeOwned;

use super::changelog::{partition_count, read_partition, read_to_end, HighWatermarks, Until};
use super::client_config;
use crate::config::Config;
use crate::report::{Report, UsageItem};

/// Waits (up to `wait`) until every billing changelog partition's billed-through mark has reached
/// `month`, then reads the month's usage, charges and alerts, sorted like replay's.
pub fn read_billed_month(config: &Config, month: Month, wait: Duration) -> anyhow::Result<Report> {
    let client = client_config(config);
    let topics = &config.file.topics;
    let partitions = partition_count(&client, &topics.billing_changelog)? as i32;
    let deadline = Instant::now() + wait;
    'waiting: loop {
        for p in 0..partitions {
            let mut billed = None;
            read_partition(
                &client,
                &topics.billing_changelog,
                p,
                // A mark an open transaction hides only makes this wait for it.
                Until::LastStable,
                &mut Default::default(),
                |key, value, _| {
                    if let (ChangelogKey::Billed, Some(v)) = (key, value) {
                        billed = std::str::from_utf8(v).ok().and_then(|t| t.parse::<Month>().ok());
                    }
                    Ok(())
                },
            )?;
            if billed.is_none_or(|b| b < month) {
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "{month} is not billed yet (billing changelog partition {p})"
                );
                std::thread::sleep(Duration::from_secs(1));
                continue 'waiting;
            }
        }
        break;
    }
    let mut usage = Vec::new();
    for item in read_json::<UsageItem>(config, &topics.usage)? {
        let u = item.into_usage()?;
        if u.month == month {
            usage.push(u);
        }
    }
    if usage.is_empty() {
        // Billed, yet nothing of it in the usage topic: say why rather than print an empty
        // bill, if the topic lost records.
        let ends = HighWatermarks::new(&client)?;
        for p in 0..partition_count(&client, &topics.usage)? as i32 {
            let (start, _) = ends.of(&topics.usage, p, Duration::from_secs(30))?;
            anyhow::ensure!(
                start == 0,
                "{month} is billed, but topic {} no longer holds its usage: partition {p} lost the records before \
                 offset {start} (deleted, or a retention the worker does not set); replay the month's events to \
                 derive the bill again",
                topics.usage
            );
        }
    }
    let mut charges: Vec<Charge> = read_json::<Charge>(config, &topics.charges)?;
    charges.retain(|c| c.month == month);
    let mut alerts: Vec<QuotaAlert> = read_json(config, &topics.alerts)?;
    alerts.retain(|a| a.month == month);
    usage.sort_by_key(|u| u.app_id);
    // Within an app, charge lines keep the order billing published them in.
    charges.sort_by_key(|c| c.app_id);
    alerts.sort_by_key(|a| a.app_id);
    Ok(Report { usage, charges, alerts, ..Report::default() })
}

/// Every value of a topic, as JSON of type `T`.
fn read_json<T: DeserializeOwned>(config: &Config, topic: &str) -> anyhow::Result<Vec<T>> {
    let mut values = Vec::new();
    read_to_end(&client_config(config), topic, &[], |record| {
        if let Some(value) = record.value {
            values.push(
                serde_json::from_slice(value).with_context(|| format!("unreadable record in {topic}"))?,
            );
        }
        Ok(())
    })?;
    Ok(values)
}
