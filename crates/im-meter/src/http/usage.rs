//! The usage API (`docs/openapi.yaml`):
//!
//! - `GET /v1/apps/{app_id}/usage?month=YYYY-MM` (month: default the current one): a
//!   billed month as billing published it; an open month to date, from the metering state
//!   of the whole cluster ([`super::cluster`]), with the charges so far (the month priced as
//!   if it ended now) and a projected month-end bill ([`project_month_end`]).
//! - `GET /v1/months/{YYYY-MM}/charges`: every charge line of a billed month.
//! - `GET /internal/v1/apps/{app_id}/months/{YYYY-MM}`: what this worker holds of an
//!   app-month, for the other workers.
//!
//! Errors are JSON: a malformed app id, month or query is 400; an app nobody knows, a month
//! neither billed nor open (not begun, before the app existed, or older than billing goes)
//! is 404; a month that cannot be answered right now (a partition moving, the ledger still
//! reading) is 503 with `Retry-After`.

use std::sync::Arc;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use im_meter_core::aggregate::{merge_shares, MonthlyUsage};
use im_meter_core::bill::{bill_month, project_month_end, Charge};
use im_meter_core::plan::AppId;
use im_meter_core::time::{Month, Timestamp};
use rust_decimal::Decimal;
use serde_json::{json, Value};

use super::cluster::{self, Gathered, Holding};
use super::{blocking, Api, ApiError};
use crate::report::UsageItem;
use crate::status::now_ms;

fn bad_request(message: String) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, message)
}

/// A month as the API takes it: `YYYY-MM`, month 01–12.
fn parse_month(text: &str) -> Result<Month, ApiError> {
    text.parse().map_err(|_| bad_request(format!("month must be YYYY-MM (month 01 to 12), got {text:?}")))
}

/// An app id as the API takes it: a positive decimal integer up to 2^63 − 1, written
/// plainly (no sign, no leading zeros), so that each app has one URL.
fn parse_app_id(text: &str) -> Result<AppId, ApiError> {
    let plain = !text.is_empty()
        && text.len() <= 19
        && text.bytes().all(|b| b.is_ascii_digit())
        && !text.starts_with('0');
    plain
        .then(|| text.parse::<i64>().ok())
        .flatten()
        .map(|id| id as AppId)
        .ok_or_else(|| bad_request(format!("app_id must be a positive integer up to 9223372036854775807 without sign or leading zeros, got {text:?}")))
}

/// The path's text, or a JSON 400 (e.g. invalid UTF-8 in it).
fn path_text<T>(path: Result<Path<T>, PathRejection>) -> Result<T, ApiError> {
    path.map(|Path(p)| p).map_err(|e| bad_request(format!("unreadable path: {}", e.body_text())))
}

/// The `month` query parameter, if given once; any other parameter is refused.
fn month_param(
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Option<Month>, ApiError> {
    let Query(pairs) = query.map_err(|e| bad_request(format!("unreadable query: {}", e.body_text())))?;
    let mut month = None;
    for (name, value) in pairs {
        match name.as_str() {
            "month" if month.is_some() => return Err(bad_request("month is given more than once".into())),
            "month" => month = Some(parse_month(&value)?),
            other => {
                return Err(bad_request(format!("unknown query parameter {other:?} (only month is known)")))
            }
        }
    }
    Ok(month)
}

/// `GET /v1/apps/{app_id}/usage`.
pub async fn app_usage(
    State(api): State<Arc<Api>>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let app_id = parse_app_id(&path_text(path)?)?;
    let month = month_param(query)?;
    let now = Timestamp(now_ms());
    let month = month.unwrap_or_else(|| api.config.meter.tz.month_of(now));
    let ledger_api = Arc::clone(&api);
    if let Some(billed) = blocking(move || billed_or_open(&ledger_api, app_id, month, now)).await?? {
        return Ok(Json(billed));
    }
    let gathered = Arc::clone(&api.cluster).gather(api.board.view(), app_id, month).await?;
    blocking(move || open_month(&api, app_id, month, now, gathered)).await?.map(Json)
}

/// `GET /internal/v1/apps/{app_id}/months/{month}`: what this worker holds of it.
pub async fn holding(
    State(api): State<Arc<Api>>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Json<Holding>, ApiError> {
    let (app_id, month) = path_text(path)?;
    let (app_id, month) = (parse_app_id(&app_id)?, parse_month(&month)?);
    blocking(move || cluster::holding(&api.board.view(), app_id, month)).await?.map(Json)
}

/// `GET /v1/months/{month}/charges`.
pub async fn month_charges(
    State(api): State<Arc<Api>>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let month = parse_month(&path_text(path)?)?;
    blocking(move || {
        let ledger = api.ledger.state();
        if !ledger.is_billed(month) {
            let why = match ledger.forgotten_before {
                Some(oldest) if month < oldest => format!(
                    "{month} is older than the months this worker keeps (from {oldest}; http.history_months); use `im-meter report --month {month}`"
                ),
                _ if !ledger.caught_up => {
                    return Err(ApiError::try_again(format!("{month} is not billed as far as read so far (still reading the topics)")))
                }
                _ => format!("{month} is not billed (yet)"),
            };
            return Err(ApiError::new(StatusCode::NOT_FOUND, why));
        }
        let charges: Vec<&Charge> =
            ledger.charges.range((month, 0)..=(month, AppId::MAX)).flat_map(|(_, lines)| lines).collect();
        let total: Decimal = charges.iter().map(|c| c.amount).sum();
        Ok(Json(json!({ "month": month, "charges": charges, "total": money(total), "currency": "USD" })))
    })
    .await?
}

fn not_found(message: String) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, message)
}

/// The answer for a billed month, `None` for an open one, or why the month is neither.
///
/// A month is open when it has begun, billing has not passed it (it is after the latest
/// billed month; with nothing billed yet, it is this month or the previous one, which may
/// still be closing) and the app existed before its end.
fn billed_or_open(api: &Api, app_id: AppId, month: Month, now: Timestamp) -> Result<Option<Value>, ApiError> {
    let tz = api.config.meter.tz;
    let ledger = api.ledger.state();
    if ledger.is_billed(month) {
        let usage =
            ledger.usage.get(&(month, app_id)).cloned().unwrap_or_else(|| MonthlyUsage::empty(app_id, month));
        let charges = ledger.charges.get(&(month, app_id)).cloned().unwrap_or_default();
        if !ledger.usage.contains_key(&(month, app_id)) && ledger.book().created_at(app_id).is_none() {
            return Err(unknown(app_id));
        }
        return Ok(Some(json!({
            "app_id": app_id,
            "month": month,
            "status": "billed",
            "usage": UsageItem::new(&usage, &tz),
            "charges": charges,
            "total": money(charges.iter().map(|c| c.amount).sum()),
            "currency": "USD",
        })));
    }
    if !ledger.caught_up {
        return Err(ApiError::try_again(format!(
            "{month} is not billed as far as read so far (still reading the topics)"
        )));
    }
    let current = tz.month_of(now);
    if month > current {
        return Err(not_found(format!("{month} has not begun (it is {current} in the billing time zone)")));
    }
    if let (Some((partition, start)), true) = (ledger.usage_deleted, month < current) {
        // Never "open" with zeros for a month that may have been billed.
        return Err(ApiError::new(
            StatusCode::GONE,
            format!(
                "{month} is not in topic {} any more: its partition {partition} lost the records before offset {start} \
                 (deleted, or a retention the worker does not set), and {month} may have been billed; billing's own \
                 record of it: `im-meter report --month {month}`",
                api.config.file.topics.usage
            ),
        ));
    }
    match ledger.newest_billed() {
        Some(billed) if month <= billed => {
            let kept = match ledger.forgotten_before {
                Some(oldest) if month < oldest => {
                    format!(
                        "; months before {oldest} are not kept here (use `im-meter report --month {month}`)"
                    )
                }
                _ => String::new(),
            };
            return Err(not_found(format!(
                "{month} is neither billed nor open: billing has gone through {billed}, and the app has no bill for it{kept}"
            )));
        }
        None if month < current.prev() => {
            return Err(not_found(format!(
                "{month} is neither billed nor open: nothing is billed yet, and only {} and {current} are open",
                current.prev()
            )));
        }
        _ => {}
    }
    if let Some(created) = ledger.book().created_at(app_id).filter(|c| *c >= tz.end_of_month(month)) {
        return Err(not_found(format!(
            "app {app_id} was created at {}, after {month}",
            created.to_rfc3339(&tz)
        )));
    }
    Ok(None)
}

/// The answer for an open month, from every share the cluster holds.
fn open_month(
    api: &Api,
    app_id: AppId,
    month: Month,
    now: Timestamp,
    gathered: Gathered,
) -> Result<Value, ApiError> {
    let tz = api.config.meter.tz;
    let ledger = api.ledger.state();
    let known =
        gathered.seen || ledger.book().knows(app_id) || ledger.usage.keys().any(|(_, a)| *a == app_id);
    if !known {
        return Err(unknown(app_id));
    }
    let usage = match gathered.shares.is_empty() {
        true => MonthlyUsage::empty(app_id, month),
        false => merge_shares(&gathered.shares)
            .map_err(|e| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("the app's shares do not merge: {e}"),
                )
            })?
            .usage(app_id, month, api.config.meter.grid),
    };
    let (start, end) = (tz.start_of_month(month), tz.end_of_month(month));
    let charges = bill_month(ledger.book(), &usage, &api.config.billing.prices);
    let projected = project_month_end(&usage, now.millis() - start.millis(), end.millis() - start.millis());
    let projected_charges = bill_month(ledger.book(), &projected, &api.config.billing.prices);
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
    }))
}

fn unknown(app_id: AppId) -> ApiError {
    not_found(format!(
        "unknown app {app_id}: no usage in any worker's partitions, nothing billed and no subscription event"
    ))
}

/// Money as the charges carry it: a decimal string with two places.
fn money(amount: Decimal) -> String {
    format!("{:.2}", amount.round_dp(2))
}
