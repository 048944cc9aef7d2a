//! Why an input record was refused: a bounded, machine-readable reason plus a human detail.
//!
//! Every refused record goes to the dead-letter output with its [`Rejection`]; the reason's
//! [`RejectReason::code`] is the bounded label metrics count by.

use std::fmt;

/// The class of a refusal. The set is closed so that metrics labels stay bounded.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RejectReason {
    /// The bytes are not UTF-8.
    NotUtf8,
    /// The text is not JSON.
    NotJson,
    /// The JSON value is not an object.
    NotObject,
    /// `type` names no known event.
    UnknownType,
    /// A required field is absent.
    MissingField,
    /// A field has the wrong type or an invalid value.
    InvalidField,
    /// `ts` is neither RFC 3339 nor integer epoch milliseconds.
    BadTimestamp,
    /// `ts` lies outside [2000-01-01, 2100-01-01).
    TimestampOutOfRange,
    /// The event's month was already closed when it arrived.
    Late,
    /// The event's month lies before `billing.start_month`, the first month the deployment
    /// bills: one stray old event must not bill every month since.
    BeforeStart,
    /// `ts` lies further ahead of the receiving clock than the allowed clock skew: a
    /// device or server with a broken clock, which must not move event time.
    Future,
    /// A well-formed subscription event that breaks a subscription rule.
    InvalidChange,
    /// A figure outside the plausible range (e.g. a `group_count` of 2⁶⁴ − 1): never
    /// billed, since one broken sender could otherwise bill millions.
    Implausible,
    /// A usage event that would begin an app-month beyond `metering.max_app_months` in its
    /// partition: a producer putting user ids into `app_id` must not exhaust the worker.
    TooManyApps,
    /// A record that made every transaction holding it fail, skipped so that its stage goes
    /// on (its dead letter carries its coordinates, length and SHA-256 only).
    Poison,
}

impl RejectReason {
    /// Every reason, for pre-registering metric series.
    pub const ALL: [RejectReason; 15] = [
        RejectReason::NotUtf8,
        RejectReason::NotJson,
        RejectReason::NotObject,
        RejectReason::UnknownType,
        RejectReason::MissingField,
        RejectReason::InvalidField,
        RejectReason::BadTimestamp,
        RejectReason::TimestampOutOfRange,
        RejectReason::Late,
        RejectReason::BeforeStart,
        RejectReason::Future,
        RejectReason::InvalidChange,
        RejectReason::Implausible,
        RejectReason::TooManyApps,
        RejectReason::Poison,
    ];

    /// The stable snake_case code written to dead letters and used as a metric label.
    pub const fn code(self) -> &'static str {
        match self {
            RejectReason::NotUtf8 => "not_utf8",
            RejectReason::NotJson => "not_json",
            RejectReason::NotObject => "not_object",
            RejectReason::UnknownType => "unknown_type",
            RejectReason::MissingField => "missing_field",
            RejectReason::InvalidField => "invalid_field",
            RejectReason::BadTimestamp => "bad_timestamp",
            RejectReason::TimestampOutOfRange => "timestamp_out_of_range",
            RejectReason::Late => "late",
            RejectReason::BeforeStart => "before_start",
            RejectReason::Future => "future",
            RejectReason::InvalidChange => "invalid_change",
            RejectReason::Implausible => "implausible",
            RejectReason::TooManyApps => "too_many_apps",
            RejectReason::Poison => "poison",
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// A refused record: the reason class and a sentence saying exactly what was wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {detail}")]
pub struct Rejection {
    /// The bounded class.
    pub reason: RejectReason,
    /// What was wrong, naming the field where there is one.
    pub detail: String,
}

impl Rejection {
    /// A rejection of class `reason` with a detail sentence.
    pub fn new(reason: RejectReason, detail: impl Into<String>) -> Self {
        Rejection { reason, detail: detail.into() }
    }

    /// A required field is missing.
    pub fn missing(field: &str, kind: &str) -> Self {
        Rejection::new(RejectReason::MissingField, format!("`{field}` is required for {kind}"))
    }

    /// Refuses an event dated more than `max_skew` after `now` (the receiver's clock), as
    /// [`RejectReason::Future`]: one broken clock must not close months for everyone.
    pub fn check_not_future(
        ts: crate::time::Timestamp,
        now: crate::time::Timestamp,
        max_skew: std::time::Duration,
    ) -> Result<(), Rejection> {
        let skew_ms = i64::try_from(max_skew.as_millis()).unwrap_or(i64::MAX);
        let ahead = ts.millis().saturating_sub(now.millis());
        if ahead <= skew_ms {
            return Ok(());
        }
        Err(Rejection::new(
            RejectReason::Future,
            format!(
                "`ts` is {} ahead of the receiving clock (at most {} allowed)",
                humanize_ms(ahead),
                humanize_ms(skew_ms)
            ),
        ))
    }

    /// Refuses an event dated in `month` when billing starts later (`start`: the first month
    /// billed; `None`: the first month any event is dated in), as [`RejectReason::BeforeStart`].
    pub fn check_not_before_start(
        month: crate::time::Month,
        start: Option<crate::time::Month>,
    ) -> Result<(), Rejection> {
        match start {
            Some(start) if month < start => Err(Rejection::new(
                RejectReason::BeforeStart,
                format!(
                    "its month {month} is before {start}, the first month billed (`billing.start_month`)"
                ),
            )),
            _ => Ok(()),
        }
    }

    /// Refuses a usage event whose figure lies outside the plausible range, as
    /// [`RejectReason::Implausible`]: a `group_count` over `max_group_count`.
    pub fn check_plausible(event: &super::UsageEvent, max_group_count: u64) -> Result<(), Rejection> {
        match event.action {
            super::Action::GroupStats { group_count } if group_count > max_group_count => Err(Rejection::new(
                RejectReason::Implausible,
                format!("`group_count` {group_count} is over the plausible {max_group_count} (billing.max_group_count)"),
            )),
            _ => Ok(()),
        }
    }

    /// A field has the wrong type or value.
    pub fn invalid(field: &str, why: impl fmt::Display) -> Self {
        Rejection::new(RejectReason::InvalidField, format!("`{field}` {why}"))
    }
}

/// A span of milliseconds for a sentence: `2h 5m 3s`, `12s`, `250ms`.
fn humanize_ms(ms: i64) -> String {
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let secs = ms / 1000;
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    let parts: Vec<String> = [(d, "d"), (h, "h"), (m, "m"), (s, "s")]
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, unit)| format!("{n}{unit}"))
        .collect();
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::Timestamp;
    use std::time::Duration;

    #[test]
    fn implausible_group_counts_are_refused() {
        let at = Timestamp(1_800_000_000_000);
        let event = |group_count| super::super::UsageEvent {
            app_id: 1,
            ts: at,
            action: super::super::Action::GroupStats { group_count },
        };
        assert_eq!(Rejection::check_plausible(&event(100), 100), Ok(()));
        let refused = Rejection::check_plausible(&event(u64::MAX), 100).unwrap_err();
        assert_eq!(refused.reason.code(), "implausible");
        assert!(refused.detail.contains("billing.max_group_count"), "{}", refused.detail);
    }

    #[test]
    fn only_events_beyond_the_skew_are_from_the_future() {
        let now = Timestamp::parse_rfc3339("2026-12-01T00:00:00Z").unwrap();
        let skew = Duration::from_secs(300);
        let at = |s: &str| Timestamp::parse_rfc3339(s).unwrap();
        assert!(Rejection::check_not_future(at("2026-11-30T00:00:00Z"), now, skew).is_ok());
        assert!(Rejection::check_not_future(at("2026-12-01T00:05:00Z"), now, skew).is_ok(), "at the edge");
        let why = Rejection::check_not_future(at("2026-12-01T02:05:01Z"), now, skew).unwrap_err();
        assert_eq!(why.reason, RejectReason::Future);
        assert_eq!(why.detail, "`ts` is 2h 5m 1s ahead of the receiving clock (at most 5m allowed)");
        let far = Rejection::check_not_future(at("2099-06-01T00:00:00Z"), now, skew).unwrap_err();
        assert!(far.detail.contains("d "), "{}", far.detail);
    }

    #[test]
    fn only_months_before_the_start_are_refused() {
        let month = |s: &str| s.parse::<crate::time::Month>().unwrap();
        let start = Some(month("2026-10"));
        assert!(Rejection::check_not_before_start(month("2026-10"), start).is_ok());
        assert!(
            Rejection::check_not_before_start(month("2000-01"), None).is_ok(),
            "no start: nothing refused"
        );
        let why = Rejection::check_not_before_start(month("2000-01"), start).unwrap_err();
        assert_eq!(why.reason.code(), "before_start");
        assert!(why.detail.contains("billing.start_month"), "{}", why.detail);
    }
}
