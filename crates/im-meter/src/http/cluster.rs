//! Any worker answers for any app. An app's month-to-date state lives in the metering views
//! of the workers that hold its events partitions (usually one; two or more after the
//! events topic grew). The worker a request reaches asks every member of the metering
//! group for what it holds of that app-month (`GET /internal/v1/apps/{app}/months/{month}`)
//! and merges the shares as billing does. The members are found in the group itself: each
//! metering consumer's `client.id` carries its worker's `http.advertised_address`, and
//! Kafka's group description lists them — Kafka stays the only membership service.
//!
//! An answer needs every events partition held exactly once and restored: while one moves
//! (revoked here, restoring there) the answer is 503 with `Retry-After`, never a figure
//! that misses or double-counts a partition.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::body::Bytes;
use axum::http::{header, Request, StatusCode};
use base64::Engine;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use im_meter_core::aggregate::AppMonthAggregate;
use im_meter_core::plan::AppId;
use im_meter_core::time::Month;
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde::{Deserialize, Serialize};
use tracing::warn;

use super::ApiError;
use crate::config::{Config, Secret};
use crate::view::MeterView;

/// What a metering consumer's `client.id` says: its worker's advertised address.
pub fn client_id(advertised: &str) -> String {
    format!("{CLIENT_ID_PREFIX}{advertised}")
}

const CLIENT_ID_PREFIX: &str = "im-meter@";

/// How long the group's members and the events topic's partition count are trusted.
const MEMBERS_TTL: Duration = Duration::from_secs(1);

/// How long another worker may take to answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(3);

/// The `Retry-After` of an answer that waits for a partition to settle, in seconds.
pub const RETRY_AFTER_SECS: u64 = 2;

/// The metering group as the usage API sees it.
pub struct Cluster {
    admin: BaseConsumer,
    group: String,
    events: String,
    /// This worker's advertised address.
    me: String,
    token: Option<Secret>,
    members: Mutex<Option<(Instant, Members)>>,
}

#[derive(Clone, Debug)]
struct Members {
    /// Advertised addresses of the workers with a metering consumer in the group.
    addresses: BTreeSet<String>,
    /// Partitions of the events topic.
    partitions: i32,
}

/// What one worker holds of an app-month: the internal endpoint's answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct Holding {
    /// Events partitions held, and whether each is restored.
    pub held: Vec<HeldPartition>,
    /// Whether the app has state in any month here.
    pub seen: bool,
    /// The app-month's share of each partition holding one.
    pub shares: Vec<HeldShare>,
}

/// A partition a worker holds.
#[derive(Debug, Serialize, Deserialize)]
pub struct HeldPartition {
    /// The events partition.
    pub partition: i32,
    /// Whether its state is restored (readable).
    pub restored: bool,
}

/// One partition's share of an app-month.
#[derive(Debug, Serialize, Deserialize)]
pub struct HeldShare {
    /// The events partition.
    pub partition: i32,
    /// The aggregate, encoded ([`AppMonthAggregate::encode`]), base64.
    pub aggregate: String,
}

/// An app-month as the whole cluster holds it.
pub struct Gathered {
    /// One share per partition holding the app-month.
    pub shares: Vec<AppMonthAggregate>,
    /// Whether any worker has state of the app in any month.
    pub seen: bool,
}

/// What this worker's view holds of an app-month.
pub fn holding(view: &MeterView, app_id: AppId, month: Month) -> Result<Holding, ApiError> {
    let (shares, seen) = view.shares(app_id, month).map_err(|e| {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("unreadable metering state: {e}"))
    })?;
    let held =
        view.held().into_iter().map(|h| HeldPartition { partition: h.partition, restored: h.restored });
    let encode = |mut a: AppMonthAggregate| base64::engine::general_purpose::STANDARD.encode(a.encode());
    Ok(Holding {
        held: held.collect(),
        seen,
        shares: shares
            .into_iter()
            .map(|(partition, a)| HeldShare { partition, aggregate: encode(a) })
            .collect(),
    })
}

impl Cluster {
    /// The cluster of `config`'s metering group, as seen by the worker at `me`.
    pub fn new(config: &Config, me: String) -> anyhow::Result<Self> {
        let admin: BaseConsumer = crate::kafka::client_config(config)
            .create()
            .context("cannot create the usage API's Kafka client")?;
        Ok(Cluster {
            admin,
            group: config.file.kafka.group_id.clone(),
            events: config.file.topics.events.clone(),
            me,
            token: config.http.api_token.clone(),
            members: Mutex::new(None),
        })
    }

    /// This worker's advertised address.
    pub fn me(&self) -> &str {
        &self.me
    }

    /// The group's members and the events topic's partitions: from the broker at most once
    /// a [`MEMBERS_TTL`] (blocking: call it off the server's thread).
    fn members(&self) -> Result<Members, ApiError> {
        let mut cached = self.members.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, members)) = cached.as_ref().filter(|(at, _)| at.elapsed() < MEMBERS_TTL) {
            let _ = at;
            return Ok(members.clone());
        }
        let unavailable = |e: rdkafka::error::KafkaError| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("cannot ask Kafka for the metering group: {e}"),
            )
        };
        let groups =
            self.admin.fetch_group_list(Some(&self.group), Duration::from_secs(5)).map_err(unavailable)?;
        let addresses = groups
            .groups()
            .iter()
            .flat_map(|g| g.members())
            .filter_map(|m| m.client_id().strip_prefix(CLIENT_ID_PREFIX).map(str::to_string))
            .collect();
        let metadata =
            self.admin.fetch_metadata(Some(&self.events), Duration::from_secs(5)).map_err(unavailable)?;
        let partitions = metadata.topics().first().map_or(0, |t| t.partitions().len() as i32);
        let members = Members { addresses, partitions };
        *cached = Some((Instant::now(), members.clone()));
        Ok(members)
    }

    /// Every share of the app-month in the cluster: this worker's from `view`, the others'
    /// asked for. 503 while any events partition is not held exactly once, restored.
    pub async fn gather(
        self: Arc<Self>,
        view: Arc<MeterView>,
        app_id: AppId,
        month: Month,
    ) -> Result<Gathered, ApiError> {
        let cluster = Arc::clone(&self);
        let members = tokio::task::spawn_blocking(move || cluster.members()).await.map_err(|e| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("handler failed: {e}"))
        })??;
        let mut asks = tokio::task::JoinSet::new();
        for address in members.addresses.iter().filter(|a| **a != self.me) {
            let (address, token) = (address.clone(), self.token.as_ref().map(|t| t.expose().to_string()));
            let path = format!("/internal/v1/apps/{app_id}/months/{month}");
            asks.spawn(async move {
                let asked = tokio::time::timeout(ASK_TIMEOUT, ask(&address, &path, token.as_deref())).await;
                (address, asked.unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within {ASK_TIMEOUT:?}"))))
            });
        }
        let mut holdings = vec![(self.me.clone(), holding(&view, app_id, month)?)];
        while let Some(joined) = asks.join_next().await {
            let (address, asked) = joined.map_err(|e| {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("handler failed: {e}"))
            })?;
            match asked {
                Ok(h) => holdings.push((address, h)),
                Err(e) => {
                    warn!(worker = %address, error = %format!("{e:#}"), "http: a worker of the group did not answer");
                    return Err(ApiError::try_again(format!(
                        "worker {address} of the metering group does not answer: {e:#}"
                    )));
                }
            }
        }
        combine(members.partitions, holdings)
    }
}

/// Checks that every events partition is held once, restored, and decodes the shares.
fn combine(partitions: i32, holdings: Vec<(String, Holding)>) -> Result<Gathered, ApiError> {
    let mut holders: BTreeMap<i32, Vec<(&str, bool)>> = BTreeMap::new();
    for (address, h) in &holdings {
        for p in &h.held {
            holders.entry(p.partition).or_default().push((address, p.restored));
        }
    }
    for p in 0..partitions {
        match holders.get(&p).map(Vec::as_slice) {
            Some([(_, true)]) => {}
            Some([(address, false)]) => {
                return Err(ApiError::try_again(format!(
                    "events partition {p} is being restored by worker {address}"
                )))
            }
            Some(many) if many.len() > 1 => {
                let who: Vec<&str> = many.iter().map(|(a, _)| *a).collect();
                return Err(ApiError::try_again(format!(
                    "events partition {p} is moving between workers {who:?}"
                )));
            }
            _ => {
                return Err(ApiError::try_again(format!(
                    "events partition {p} is not held by any worker right now"
                )))
            }
        }
    }
    let mut shares = Vec::new();
    for (address, h) in holdings.iter() {
        for share in &h.shares {
            let bytes = base64::engine::general_purpose::STANDARD.decode(&share.aggregate).map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    format!("worker {address} sent an unreadable share: {e}"),
                )
            })?;
            let aggregate = AppMonthAggregate::decode(&bytes).map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    format!("worker {address} sent an unreadable share: {e}"),
                )
            })?;
            shares.push(aggregate);
        }
    }
    Ok(Gathered { shares, seen: holdings.iter().any(|(_, h)| h.seen) })
}

/// Asks the worker at `address` what it holds (one request, one connection).
async fn ask(address: &str, path: &str, token: Option<&str>) -> anyhow::Result<Holding> {
    let stream = tokio::net::TcpStream::connect(address)
        .await
        .with_context(|| format!("cannot connect to {address}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let mut request = Request::get(path).header(header::HOST, address);
    if let Some(token) = token {
        request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let response = sender.send_request(request.body(Empty::<Bytes>::new())?).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    anyhow::ensure!(status == StatusCode::OK, "answered {status}: {}", String::from_utf8_lossy(&body));
    Ok(serde_json::from_slice(&body)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holding(held: &[(i32, bool)]) -> Holding {
        Holding {
            held: held.iter().map(|&(partition, restored)| HeldPartition { partition, restored }).collect(),
            seen: false,
            shares: Vec::new(),
        }
    }

    #[test]
    fn every_partition_must_be_held_once_and_restored() {
        let answer = |hs: Vec<(&str, Holding)>| {
            combine(3, hs.into_iter().map(|(a, h)| (a.to_string(), h)).collect())
                .map(|_| ())
                .map_err(|e| e.message)
        };
        assert!(answer(vec![("a", holding(&[(0, true), (2, true)])), ("b", holding(&[(1, true)]))]).is_ok());
        let missing = answer(vec![("a", holding(&[(0, true)])), ("b", holding(&[(1, true)]))]).unwrap_err();
        assert!(missing.contains("partition 2 is not held"), "{missing}");
        let restoring = answer(vec![("a", holding(&[(0, true), (2, false)])), ("b", holding(&[(1, true)]))]);
        assert!(restoring.unwrap_err().contains("being restored"));
        let twice =
            answer(vec![("a", holding(&[(0, true), (1, true), (2, true)])), ("b", holding(&[(1, true)]))]);
        assert!(twice.unwrap_err().contains("moving between workers"));
    }
}
