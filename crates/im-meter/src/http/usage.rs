//! The usage API (`docs/openapi.yaml`):
//!
//! - `GET /v1/apps/{app_id}/usage?month=YYYY-MM` (month: default the current one): a
//!   billed month as billing published it; an open month to date, from the metering state
//!   this worker holds, with the charges so far (the month priced as if it ended now) and a
//!   projected month-end bill ([`project_month_end`]).
//! - `GET /v1/months/{YYYY-MM}/charges`: every charge line of a billed month.
//!
//! Errors are JSON: a malformed app id or month is 400, an app nobody knows (no usage
//! held, nothing billed, no subscription event) or a month not billed is 404.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use im_meter_core::aggregate::MonthlyUsage;
use im_meter_core::bill::{bill_month, project_month_end, Charge};
use im_meter_core::plan::AppId;
use im_meter_core::time::{Month, Timestamp};
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{blocking, merge_by_app, Api, ApiError};
use crate::report::UsageItem;
use crate::status::now_ms;

/// `?month=YYYY-MM`.
#[derive(Debug, Deserialize)]
pub struct MonthQuery {
    month: Option<String>,
}

fn parse_month(text: &str) -> Result<Month, ApiError> {
    text.parse()
        .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, format!("month must be YYYY-MM, got {text:?}")))
}

/// `GET /v1/apps/{app_id}/usage`.
pub async fn app_usage(
    State(api): State<Arc<Api>>,
    Path(app_id): Path<String>,
    Query(query): Query<MonthQuery>,
) -> Result<Json<Value>, ApiError> {
    let app_id: AppId = app_id.parse().ok().filter(|a| *a > 0).ok_or_else(|| {
        ApiError::new(StatusCode::BAD_REQUEST, format!("app_id must be a positive integer, got {app_id:?}"))
    })?;
    let now = Timestamp(now_ms());
    let month = match &query.month {
        Some(text) => parse_month(text)?,
        None => api.config.meter.tz.month_of(now),
    };
    blocking(move || usage_report(&api, app_id, month, now)).await?.map(Json)
}

/// `GET /v1/months/{month}/charges`.
pub async fn month_charges(
    State(api): State<Arc<Api>>,
    Path(month): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let month = parse_month(&month)?;
    let ledger = api.ledger.state();
    if !ledger.is_billed(month) {
        let why = match ledger.forgotten_before {
            Some(oldest) if month < oldest => format!(
                "{month} is older than the months this worker keeps (from {oldest}; http.history_months); use `im-meter report --month {month}`"
            ),
            _ if !ledger.caught_up => format!("{month} is not billed as far as read so far (still reading the topics)"),
            _ => format!("{month} is not billed (yet)"),
        };
        return Err(ApiError::new(StatusCode::NOT_FOUND, why));
    }
    let charges: Vec<&Charge> =
        ledger.charges.range((month, 0)..=(month, AppId::MAX)).flat_map(|(_, lines)| lines).collect();
    let total: Decimal = charges.iter().map(|c| c.amount).sum();
    Ok(Json(json!({ "month": month, "charges": charges, "total": money(total), "currency": "USD" })))
}

/// The usage answer for one app-month.
fn usage_report(api: &Api, app_id: AppId, month: Month, now: Timestamp) -> Result<Value, ApiError> {
    let tz = api.config.meter.tz;
    let ledger = api.ledger.state();
    if ledger.is_billed(month) {
        let usage =
            ledger.usage.get(&(month, app_id)).cloned().unwrap_or_else(|| MonthlyUsage::empty(app_id, month));
        let charges = ledger.charges.get(&(month, app_id)).cloned().unwrap_or_default();
        let known = ledger.usage.contains_key(&(month, app_id)) || ledger.book.created_at(app_id).is_some();
        if !known {
            return Err(unknown(app_id));
        }
        return Ok(json!({
            "app_id": app_id,
            "month": month,
            "status": "billed",
            "usage": UsageItem::new(&usage, &tz),
            "charges": charges,
            "total": money(charges.iter().map(|c| c.amount).sum()),
            "currency": "USD",
        }));
    }
    // An open month (or one not billed yet): what this worker's metering state holds.
    let live = api.board.live_usage();
    let mut held: Vec<i32> = live.iter().flat_map(|l| l.partitions()).collect();
    held.sort_unstable();
    let mut parts = Vec::new();
    for source in &live {
        parts.extend(source.aggregates(&|a, _| a == app_id).ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the metering state is being restored; try again shortly",
            )
        })?);
    }
    let seen_app = !parts.is_empty();
    let in_month = parts.into_iter().filter(|(_, m, _)| *m == month);
    let merged = merge_by_app(api.config.meter.precision, in_month).remove(&app_id);
    let known = seen_app
        || ledger.book.created_at(app_id).is_some()
        || ledger.usage.keys().any(|(_, a)| *a == app_id);
    if !known {
        return Err(unknown(app_id));
    }
    let usage = match merged {
        Some(mut aggregate) => aggregate.usage(app_id, month, api.config.meter.grid),
        None => MonthlyUsage::empty(app_id, month),
    };
    let (start, end) = (tz.start_of_month(month), tz.end_of_month(month));
    let charges = bill_month(&ledger.book, &usage, &api.config.billing.prices);
    let projected = project_month_end(&usage, now.millis() - start.millis(), end.millis() - start.millis());
    let projected_charges = bill_month(&ledger.book, &projected, &api.config.billing.prices);
    let elapsed_days =
        ((now.millis().clamp(start.millis(), end.millis()) - start.millis()) as f64) / 86_400_000.0;
    Ok(json!({
        "app_id": app_id,
        "month": month,
        "status": "open",
        "as_of": now.to_rfc3339(&tz),
        "usage": UsageItem::new(&usage, &tz),
        "charges": charges,
        "total": money(charges.iter().map(|c| c.amount).sum()),
        "currency": "USD",
        "projection": {
            "method": "MAU extrapolated linearly to the month's end (elapsed time counted as at least one day); PCC, peak DAU and peak group count kept as reached so far; priced like a closed month",
            "elapsed_days": (elapsed_days * 100.0).round() / 100.0,
            "days_in_month": month.days(),
            "usage": UsageItem::new(&projected, &tz),
            "charges": projected_charges,
            "total": money(projected_charges.iter().map(|c| c.amount).sum()),
        },
        "partitions_held": held,
    }))
}

fn unknown(app_id: AppId) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!(
            "unknown app {app_id}: no usage in the partitions this worker holds, nothing billed and no subscription event"
        ),
    )
}

/// Money as the charges carry it: a decimal string with two places.
fn money(amount: Decimal) -> String {
    format!("{:.2}", amount.round_dp(2))
}
