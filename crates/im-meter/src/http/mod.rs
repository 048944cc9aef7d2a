//! The operator endpoints, on `http.listen`: `GET /metrics` (Prometheus), `GET /healthz`
//! (the process is alive), `GET /readyz` (ready to carry load, see
//! [`Board::not_ready`]) and the usage API ([`usage`], described in `docs/openapi.yaml`).
//!
//! The server runs on a small tokio runtime of its own thread. Handlers never touch a
//! stage: month-to-date state comes from the metering view (`crate::view`) and the other
//! workers (`cluster`); what takes a lock or asks the broker (the ledger, the group's
//! members) runs on the blocking pool, so the health checks never wait behind it.

pub mod cluster;
pub mod usage;

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::Context;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use im_meter_core::aggregate::{merge_shares, AppMonthAggregate, MonthlyUsage};
use im_meter_core::plan::AppId;
use serde_json::json;
use tracing::{info, warn};

use crate::config::Config;
use crate::kafka::ledger::Ledger;
use crate::metrics::metrics;
use crate::status::{now_ms, Board, StageKind};
use cluster::Cluster;

/// What the handlers read.
pub struct Api {
    /// The configuration in force.
    pub config: Config,
    /// What the stages report, and the metering view they publish.
    pub board: Arc<Board>,
    /// Closed months and the subscription book.
    pub ledger: Arc<Ledger>,
    /// The other workers of the metering group.
    pub cluster: Arc<Cluster>,
}

/// Binds `http.listen` now (so that a taken port fails start-up, naming the field) and
/// serves on a thread of its own until the process ends. Returns the address the other
/// workers reach this one at (`http.advertised_address`, or derived from the bound one),
/// which the metering consumers announce in the group.
pub fn start(config: Config, board: Arc<Board>, ledger: Arc<Ledger>) -> anyhow::Result<String> {
    let listen = config.http.listen;
    let listener = std::net::TcpListener::bind(listen)
        .with_context(|| format!("http.listen: cannot listen on {listen}"))?;
    listener.set_nonblocking(true)?;
    let local = listener.local_addr()?;
    let advertised = match &config.http.advertised_address {
        Some(address) => address.clone(),
        None if local.ip().is_unspecified() => format!("{}:{}", host_name(), local.port()),
        None => local.to_string(),
    };
    let cluster = Arc::new(Cluster::new(&config, advertised.clone())?);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let app = router(Arc::new(Api { config, board, ledger, cluster }));
    std::thread::Builder::new().name("im-meter-http".into()).spawn(move || {
        runtime.block_on(async move {
            match tokio::net::TcpListener::from_std(listener) {
                Ok(listener) => {
                    if let Err(e) = axum::serve(listener, app).await {
                        warn!(error = %e, "http: server stopped");
                    }
                }
                Err(e) => warn!(error = %e, "http: cannot serve"),
            }
        });
    })?;
    info!(address = %local, %advertised, "http: serving /metrics, /healthz, /readyz, /v1");
    Ok(advertised)
}

/// This host's name, for the advertised address of a worker listening on every interface.
fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Longest request target (path and query) answered; longer ones get a JSON 414 (hyper
/// itself answers, with an empty body, only far beyond this).
const MAX_URI_BYTES: usize = 8 * 1024;

/// Most header bytes answered; more get a JSON 431 (hyper's own limit is far beyond).
const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Every route.
pub fn router(api: Arc<Api>) -> Router {
    // The usage API shows what each app pays: behind `http.api_token` when one is set. The
    // internal route serves the other workers of the group (see `cluster`).
    let usage_api = Router::new()
        .route("/v1/apps/{app_id}/usage", get(usage::app_usage))
        .route("/v1/months/{month}/charges", get(usage::month_charges))
        .route("/internal/v1/apps/{app_id}/months/{month}", get(usage::holding))
        .route_layer(axum::middleware::from_fn_with_state(Arc::clone(&api), require_token));
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .merge(usage_api)
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "only GET is allowed here")
        })
        .layer(axum::middleware::from_fn(within_limits))
        .with_state(api)
}

/// Answers an over-long request target (414) or too many header bytes (431) in JSON.
async fn within_limits(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let target = request.uri().path_and_query().map_or(0, |pq| pq.as_str().len());
    if target > MAX_URI_BYTES {
        let message = format!("the request target is {target} bytes; at most {MAX_URI_BYTES} are answered");
        return ApiError::new(StatusCode::URI_TOO_LONG, message).into_response();
    }
    let headers: usize = request.headers().iter().map(|(k, v)| k.as_str().len() + v.len() + 4).sum();
    if headers > MAX_HEADER_BYTES {
        let message = format!(
            "the request carries {headers} bytes of headers; at most {MAX_HEADER_BYTES} are answered"
        );
        return ApiError::new(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, message).into_response();
    }
    next.run(request).await
}

/// Lets a request through when no token is configured or it carries
/// `Authorization: Bearer <token>`; answers 401 otherwise.
async fn require_token(
    State(api): State<Arc<Api>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(token) = &api.config.http.api_token else {
        return next.run(request).await;
    };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given.is_some_and(|g| same_secret(g.as_bytes(), token.expose().as_bytes())) {
        return next.run(request).await;
    }
    let mut response =
        ApiError::new(StatusCode::UNAUTHORIZED, "this endpoint needs Authorization: Bearer <http.api_token>")
            .into_response();
    response.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
    response
}

/// Compares two secrets in time that depends on their lengths only, not on where they differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

/// An error as the API returns it: a status and `{"error": "..."}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    /// Seconds after which to try again (`Retry-After`).
    retry_after: Option<u64>,
}

impl ApiError {
    /// An error with `status` saying `message`.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into(), retry_after: None }
    }

    /// A 503 saying `message` and to try again after [`cluster::RETRY_AFTER_SECS`].
    pub fn try_again(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
            retry_after: Some(cluster::RETRY_AFTER_SECS),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(json!({ "error": self.message }))).into_response();
        if let Some(seconds) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from(seconds));
        }
        response
    }
}

/// Runs `f` on the blocking pool (it may wait for a stage's lock).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("handler failed: {e}")))
}

async fn readyz(State(api): State<Arc<Api>>) -> Response {
    let problems = api.board.not_ready(api.config.http.stall_timeout);
    metrics().ready.set(i64::from(problems.is_empty()));
    if problems.is_empty() {
        (StatusCode::OK, Json(json!({ "ready": true }))).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "ready": false, "problems": problems })))
            .into_response()
    }
}

async fn metrics_text(State(api): State<Arc<Api>>) -> Result<Response, ApiError> {
    let text = blocking(move || {
        refresh_gauges(&api);
        metrics().render()
    })
    .await?;
    Ok(([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], text).into_response())
}

/// Sets the gauges that are read off the board rather than updated as things happen.
fn refresh_gauges(api: &Api) {
    let m = metrics();
    let consumers = api.board.consumers();
    m.ready.set(i64::from(api.board.not_ready(api.config.http.stall_timeout).is_empty()));
    m.event_watermark.reset();
    m.partition_app_months.reset();
    m.partition_app_months_limit.set(api.config.meter.max_app_months.map_or(0, |n| n as i64));
    let (mut app_months, mut connections, mut bytes) = (0, 0, 0);
    let mut oldest: BTreeMap<StageKind, f64> = BTreeMap::new();
    for c in &consumers {
        let stage = c.stage.label();
        m.last_poll.with_label_values(&[stage, &c.consumer]).set(c.last_poll_ms() as f64 / 1000.0);
        let state = c.state();
        let failing = state.failing.as_ref().map_or(0.0, |f| (now_ms() - f.since_ms).max(0) as f64 / 1000.0);
        m.failing.with_label_values(&[stage, &c.consumer]).set(failing);
        if c.stage == StageKind::Meter {
            for (p, s) in &state.partitions {
                if let Some(w) = s.watermark {
                    m.event_watermark.with_label_values(&[&p.to_string()]).set(w.millis() as f64 / 1000.0);
                }
                m.partition_app_months.with_label_values(&[&p.to_string()]).set(s.app_months as i64);
            }
            (app_months, connections, bytes) =
                (app_months + state.app_months, connections + state.connections, bytes + state.state_bytes);
        }
        let end = state.oldest_open_month_end.map_or(0.0, |t| t.millis() as f64 / 1000.0);
        let slot = oldest.entry(c.stage).or_insert(0.0);
        if end > 0.0 && (*slot == 0.0 || end < *slot) {
            *slot = end;
        }
    }
    for (stage, end) in oldest {
        m.oldest_open_month_end.with_label_values(&[stage.label()]).set(end);
    }
    m.state_app_months.set(app_months as i64);
    m.state_open_connections.set(connections as i64);
    m.state_bytes.set(bytes as i64);
    refresh_top_apps(api);
}

/// Month-to-date MAU and PCC of the `http.top_apps` apps with the most MAU in the latest
/// month held; apps that drop out of the top lose their series.
fn refresh_top_apps(api: &Api) {
    let m = metrics();
    let top = top_apps(api);
    m.app_mau.reset();
    m.app_pcc.reset();
    for u in &top {
        let app = u.app_id.to_string();
        m.app_mau.with_label_values(&[&app]).set(u.mau as i64);
        m.app_pcc.with_label_values(&[&app]).set(u.pcc as i64);
    }
}

/// The shares of each app (from several partitions) merged into one aggregate per app, as
/// billing merges them ([`merge_shares`]); an app whose shares cannot merge (a sketch that
/// does not read as the pinned HLL++ crate writes it) is left out.
fn merge_by_app(
    parts: impl IntoIterator<Item = (AppId, AppMonthAggregate)>,
) -> BTreeMap<AppId, AppMonthAggregate> {
    let mut by_app: BTreeMap<AppId, Vec<AppMonthAggregate>> = BTreeMap::new();
    for (app_id, aggregate) in parts {
        by_app.entry(app_id).or_default().push(aggregate);
    }
    by_app
        .into_iter()
        .filter_map(|(app_id, shares)| match merge_shares(&shares) {
            Ok(merged) => Some((app_id, merged)),
            Err(e) => {
                warn!(app_id, error = %e, "http: the shares of the app's usage cannot be merged");
                None
            }
        })
        .collect()
}

/// The usage so far of the `http.top_apps` apps with the most MAU in the latest month held
/// here (the metrics of each worker cover its own partitions), most first. Only an app
/// spread over several partitions is merged from its shares.
fn top_apps(api: &Api) -> Vec<MonthlyUsage> {
    let view = api.board.view();
    let Some(month) = view.latest_month() else { return Vec::new() };
    let grid = api.config.meter.grid;
    let mut by_app: BTreeMap<AppId, Vec<MonthlyUsage>> = BTreeMap::new();
    for u in view.usage_in(month, grid) {
        by_app.entry(u.app_id).or_default().push(u);
    }
    let split: Vec<AppId> = by_app.iter().filter(|(_, parts)| parts.len() > 1).map(|(a, _)| *a).collect();
    let mut usage: Vec<MonthlyUsage> =
        by_app.into_values().filter(|parts| parts.len() == 1).flatten().collect();
    if !split.is_empty() {
        let parts = view.aggregates(month, &|app| split.binary_search(&app).is_ok());
        let merged = merge_by_app(parts);
        usage.extend(merged.into_iter().map(|(app, mut agg)| agg.usage(app, month, grid)));
    }
    usage.sort_by(|a, b| b.mau.cmp(&a.mau).then(a.app_id.cmp(&b.app_id)));
    usage.truncate(api.config.http.top_apps);
    usage
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use im_meter_core::aggregate::{AppMonthAggregate, Counting};
    use im_meter_core::ingest::UserKey;
    use im_meter_core::plan::AppId;
    use im_meter_core::time::Month;

    use super::*;

    /// Publishes a partition's worth of committed state: app → users who logged in.
    fn publish(board: &Board, partition: i32, apps: &[(AppId, std::ops::Range<u32>)]) {
        let month: Month = "2026-12".parse().unwrap();
        let records = apps.iter().flat_map(|(app_id, users)| {
            let mut agg = AppMonthAggregate::new(Counting::default(), false);
            for u in users.clone() {
                agg.record_login(month.day(1).unwrap(), UserKey::of(&format!("user-{u}")));
            }
            agg.checkpoint(*app_id, month).into_iter().filter_map(|r| Some((r.key, r.value?.into())))
        });
        board.view().restored(0, partition, records.collect::<Vec<_>>());
    }

    #[test]
    fn only_the_top_apps_get_series_and_split_apps_are_merged_not_added() {
        let config =
            crate::config::Config::load(None, [("IM_METER__HTTP__TOP_APPS".to_string(), "2".to_string())])
                .expect("valid");
        let board = Board::new();
        // App 7's users are spread over two partitions, half of them in both: 150 in all,
        // not 200. App 8 has 120, app 9 has 10 (not in the top 2).
        publish(&board, 0, &[(7, 0..100), (9, 0..10)]);
        publish(&board, 1, &[(7, 50..150), (8, 0..120)]);
        let ledger = Arc::new(Ledger::new(&config));
        let cluster = Arc::new(Cluster::new(&config, "127.0.0.1:1".into()).expect("a client"));
        let api = Api { config, board, ledger, cluster };
        let top: Vec<(AppId, u64)> = top_apps(&api).iter().map(|u| (u.app_id, u.mau)).collect();
        assert_eq!(top, vec![(7, 150), (8, 120)]);
    }
}
