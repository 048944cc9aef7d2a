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
    /// A well-formed subscription event that breaks a subscription rule.
    InvalidChange,
}

impl RejectReason {
    /// Every reason, for pre-registering metric series.
    pub const ALL: [RejectReason; 10] = [
        RejectReason::NotUtf8,
        RejectReason::NotJson,
        RejectReason::NotObject,
        RejectReason::UnknownType,
        RejectReason::MissingField,
        RejectReason::InvalidField,
        RejectReason::BadTimestamp,
        RejectReason::TimestampOutOfRange,
        RejectReason::Late,
        RejectReason::InvalidChange,
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
            RejectReason::InvalidChange => "invalid_change",
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

    /// A field has the wrong type or value.
    pub fn invalid(field: &str, why: impl fmt::Display) -> Self {
        Rejection::new(RejectReason::InvalidField, format!("`{field}` {why}"))
    }
}
