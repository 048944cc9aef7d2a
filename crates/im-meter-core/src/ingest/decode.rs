//! Bytes → validated events: the only place input is trusted or refused.
//!
//! Decoding is a pure function of one record's bytes. It never panics: every way a record
//! can be malformed (SPEC §2.1) maps to a [`Rejection`] naming the field. Known fields are
//! read as loosely typed scalars and checked here, so a wrong type is reported as
//! `invalid_field` with the field's name rather than as a serde message; unknown fields are
//! skipped without being materialised.

use std::fmt;

use serde::de::{Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use super::event::{Action, ConnKey, SubscriptionChange, SubscriptionEvent, UsageEvent, UserKey};
use super::rejection::{RejectReason, Rejection};
use crate::plan::{AppId, BillingMode, Plan};
use crate::time::{Timestamp, TimestampError};

/// Longest accepted `user_id`, `conn_id` and `account_id`, in bytes.
pub const MAX_ID_BYTES: usize = 128;

/// A JSON value as far as validation needs it: scalars kept, containers only noted.
#[derive(Debug)]
enum Scalar<'a> {
    Null,
    Bool(bool),
    Unsigned(u64),
    Negative(i64),
    /// A number with a fractional part.
    Fractional,
    /// An integer too large for 64 bits (JSON reads it as a float).
    OutOfRange,
    /// An integral value written with a decimal point or an exponent (`1.0`, `1e3`).
    NotInteger,
    Str(Text<'a>),
    Container,
}

/// A JSON string: borrowed from the line, or owned when it had escapes. (Not a `Cow`, whose
/// 24 bytes would make every field of [`RawRecord`] 32: the record is moved around whole.)
#[derive(Debug)]
enum Text<'a> {
    Borrowed(&'a str),
    Owned(Box<str>),
}

impl std::ops::Deref for Text<'_> {
    type Target = str;

    fn deref(&self) -> &str {
        match self {
            Text::Borrowed(s) => s,
            Text::Owned(s) => s,
        }
    }
}

const _: () = assert!(std::mem::size_of::<Option<Scalar<'static>>>() <= 24);

impl Scalar<'_> {
    fn kind(&self) -> &'static str {
        match self {
            Scalar::Null => "null",
            Scalar::Bool(_) => "a boolean",
            Scalar::Unsigned(_) | Scalar::Negative(_) => "an integer",
            Scalar::Fractional => "a fractional number",
            Scalar::OutOfRange => "an integer out of range (at most 64 bits)",
            Scalar::NotInteger => "a number not written as an integer",
            Scalar::Str(_) => "a string",
            Scalar::Container => "an array or object",
        }
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Scalar<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ScalarVisitor<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for ScalarVisitor<'a> {
            type Value = Scalar<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Scalar::Null)
            }
            fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
                Ok(Scalar::Bool(v))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
                Ok(Scalar::Unsigned(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
                Ok(if v >= 0 { Scalar::Unsigned(v as u64) } else { Scalar::Negative(v) })
            }
            fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
                // JSON integers that fit 64 bits arrive as u64/i64; a float is a literal
                // with a fraction or exponent, an integer too large, or `-0`.
                Ok(if v.fract() != 0.0 || !v.is_finite() {
                    Scalar::Fractional
                } else if v == 0.0 && v.is_sign_negative() {
                    // `-0`: the integer zero with a sign.
                    Scalar::Unsigned(0)
                } else if v.abs() >= 9_223_372_036_854_775_808.0 {
                    Scalar::OutOfRange
                } else {
                    Scalar::NotInteger
                })
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Scalar::Str(Text::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Scalar::Str(Text::Owned(v.into())))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(Scalar::Str(Text::Owned(v.into_boxed_str())))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Scalar::Container)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Scalar::Container)
            }
        }
        d.deserialize_any(ScalarVisitor(std::marker::PhantomData))
    }
}

/// Every field any input record may carry; anything else is ignored.
#[derive(Deserialize, Debug, Default)]
struct RawRecord<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<Scalar<'a>>,
    #[serde(borrow)]
    app_id: Option<Scalar<'a>>,
    #[serde(borrow)]
    ts: Option<Scalar<'a>>,
    #[serde(borrow)]
    id: Option<Scalar<'a>>,
    #[serde(borrow)]
    user_id: Option<Scalar<'a>>,
    #[serde(borrow)]
    ok: Option<Scalar<'a>>,
    #[serde(borrow)]
    conn_id: Option<Scalar<'a>>,
    #[serde(borrow)]
    group_count: Option<Scalar<'a>>,
    #[serde(borrow)]
    platform: Option<Scalar<'a>>,
    #[serde(borrow)]
    account_id: Option<Scalar<'a>>,
    #[serde(borrow)]
    plan: Option<Scalar<'a>>,
}

/// Absent and `null` mean the same: not given.
fn given<'s, 'a>(field: &'s Option<Scalar<'a>>) -> Option<&'s Scalar<'a>> {
    field.as_ref().filter(|v| !matches!(v, Scalar::Null))
}

#[inline(always)]
fn parse_record(bytes: &[u8]) -> Result<RawRecord<'_>, Rejection> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        Rejection::new(RejectReason::NotUtf8, format!("invalid UTF-8 at byte {}", e.valid_up_to()))
    })?;
    // serde would happily read a struct from a JSON array; the spec wants objects only.
    match text.trim_start().as_bytes().first() {
        Some(b'{') => {}
        None => return Err(Rejection::new(RejectReason::NotJson, "empty record")),
        Some(_) => {
            return Err(match serde_json::from_str::<IgnoredAny>(text) {
                Ok(_) => Rejection::new(RejectReason::NotObject, "the record is JSON but not an object"),
                Err(e) => Rejection::new(RejectReason::NotJson, e.to_string()),
            })
        }
    }
    serde_json::from_str::<RawRecord<'_>>(text).map_err(|e| match e.classify() {
        // The only data error left once every field accepts any value is a repeated key.
        serde_json::error::Category::Data => Rejection::new(RejectReason::InvalidField, e.to_string()),
        _ => Rejection::new(RejectReason::NotJson, e.to_string()),
    })
}

fn required<'s, 'a>(
    field: &'s Option<Scalar<'a>>,
    name: &str,
    kind: &str,
) -> Result<&'s Scalar<'a>, Rejection> {
    given(field).ok_or_else(|| Rejection::missing(name, kind))
}

fn type_name<'s>(raw: &'s RawRecord<'_>) -> Result<&'s str, Rejection> {
    match given(&raw.kind) {
        None => Err(Rejection::new(RejectReason::MissingField, "`type` is required")),
        Some(Scalar::Str(s)) => Ok(s),
        Some(other) => {
            Err(Rejection::invalid("type", format_args!("must be a string, got {}", other.kind())))
        }
    }
}

fn app_id(raw: &RawRecord<'_>, kind: &str) -> Result<AppId, Rejection> {
    match required(&raw.app_id, "app_id", kind)? {
        Scalar::Unsigned(v) if *v > 0 => Ok(*v),
        Scalar::Unsigned(_) | Scalar::Negative(_) => {
            Err(Rejection::invalid("app_id", "must be a positive integer"))
        }
        other => Err(Rejection::invalid(
            "app_id",
            format_args!("must be a positive integer, got {}", other.kind()),
        )),
    }
}

fn timestamp(raw: &RawRecord<'_>, kind: &str) -> Result<Timestamp, Rejection> {
    let out_of_range = |e: TimestampError| match e {
        TimestampError::OutOfRange(_) => {
            Rejection::new(RejectReason::TimestampOutOfRange, format!("`ts` {e}"))
        }
        TimestampError::Unparsable(_) => Rejection::new(RejectReason::BadTimestamp, format!("`ts` is {e}")),
    };
    match required(&raw.ts, "ts", kind)? {
        Scalar::Str(s) => Timestamp::parse_rfc3339(s).map_err(out_of_range),
        Scalar::Unsigned(ms) => {
            Timestamp::from_millis(i64::try_from(*ms).unwrap_or(i64::MAX)).map_err(out_of_range)
        }
        Scalar::Negative(ms) => Timestamp::from_millis(*ms).map_err(out_of_range),
        other => Err(Rejection::new(
            RejectReason::BadTimestamp,
            format!("`ts` must be an RFC 3339 string or integer epoch milliseconds, got {}", other.kind()),
        )),
    }
}

/// A string identifier of 1–128 bytes.
fn id_str<'s>(value: &'s Scalar<'_>, name: &str) -> Result<&'s str, Rejection> {
    match value {
        Scalar::Str(s) if s.is_empty() => Err(Rejection::invalid(name, "must not be empty")),
        Scalar::Str(s) if s.len() > MAX_ID_BYTES => Err(Rejection::invalid(
            name,
            format_args!("is {} bytes long, at most {MAX_ID_BYTES} allowed", s.len()),
        )),
        Scalar::Str(s) => Ok(s),
        other => Err(Rejection::invalid(name, format_args!("must be a string, got {}", other.kind()))),
    }
}

fn required_id<'s>(field: &'s Option<Scalar<'_>>, name: &str, kind: &str) -> Result<&'s str, Rejection> {
    id_str(required(field, name, kind)?, name)
}

fn optional_id<'s>(field: &'s Option<Scalar<'_>>, name: &str) -> Result<Option<&'s str>, Rejection> {
    given(field).map(|v| id_str(v, name)).transpose()
}

/// Informational strings: any length, but they must be strings when given.
fn optional_text(field: &Option<Scalar<'_>>, name: &str) -> Result<(), Rejection> {
    match given(field) {
        None | Some(Scalar::Str(_)) => Ok(()),
        Some(other) => Err(Rejection::invalid(name, format_args!("must be a string, got {}", other.kind()))),
    }
}

/// Decodes and validates one SDK event record.
///
/// ```
/// use im_meter_core::ingest::{decode_usage_event, Action};
/// let ev = decode_usage_event(br#"{"type":"login","app_id":7,"user_id":"alice","ts":"2026-11-03T08:15:00Z"}"#).unwrap();
/// assert!(matches!(ev.action, Action::Login { ok: true, .. }));
/// let bad = decode_usage_event(br#"{"type":"login","app_id":0,"user_id":"a","ts":1}"#).unwrap_err();
/// assert_eq!(bad.reason.code(), "invalid_field");
/// ```
pub fn decode_usage_event(bytes: &[u8]) -> Result<UsageEvent, Rejection> {
    let raw = parse_record(bytes)?;
    let kind = type_name(&raw)?;
    if !matches!(kind, "login" | "logout" | "connect" | "disconnect" | "heartbeat" | "group_stats") {
        return Err(unknown_type(kind, "login, logout, connect, disconnect, heartbeat or group_stats"));
    }
    let app_id = app_id(&raw, kind)?;
    let ts = timestamp(&raw, kind)?;
    optional_text(&raw.id, "id")?;
    optional_text(&raw.platform, "platform")?;
    let action = match kind {
        "login" => Action::Login {
            user: UserKey::of(required_id(&raw.user_id, "user_id", kind)?),
            ok: match given(&raw.ok) {
                None => true,
                Some(Scalar::Bool(ok)) => *ok,
                Some(other) => {
                    return Err(Rejection::invalid(
                        "ok",
                        format_args!("must be a boolean, got {}", other.kind()),
                    ))
                }
            },
        },
        "logout" => Action::Logout { user: UserKey::of(required_id(&raw.user_id, "user_id", kind)?) },
        "connect" => Action::Connect {
            user: UserKey::of(required_id(&raw.user_id, "user_id", kind)?),
            conn: ConnKey::of(required_id(&raw.conn_id, "conn_id", kind)?),
        },
        "disconnect" => Action::Disconnect { conn: ConnKey::of(required_id(&raw.conn_id, "conn_id", kind)?) },
        "heartbeat" => Action::Heartbeat { conn: ConnKey::of(required_id(&raw.conn_id, "conn_id", kind)?) },
        _ => Action::GroupStats {
            group_count: match required(&raw.group_count, "group_count", kind)? {
                Scalar::Unsigned(n) => *n,
                Scalar::Negative(_) => return Err(Rejection::invalid("group_count", "must be >= 0")),
                other => {
                    return Err(Rejection::invalid(
                        "group_count",
                        format_args!("must be a non-negative integer, got {}", other.kind()),
                    ))
                }
            },
        },
    };
    Ok(UsageEvent { app_id, ts, action })
}

fn unknown_type(kind: &str, expected: &str) -> Rejection {
    let shown: String = kind.chars().take(64).collect();
    Rejection::new(RejectReason::UnknownType, format!("unknown event type {shown:?}, expected {expected}"))
}

/// Decodes and validates one subscription event record (its rules are checked on apply).
pub fn decode_subscription_event(bytes: &[u8]) -> Result<SubscriptionEvent, Rejection> {
    let raw = parse_record(bytes)?;
    let kind = type_name(&raw)?;
    if !matches!(kind, "app_created" | "plan_changed" | "billing_mode_migrated" | "av_call_trial_started") {
        return Err(unknown_type(
            kind,
            "app_created, plan_changed, billing_mode_migrated or av_call_trial_started",
        ));
    }
    let app_id = app_id(&raw, kind)?;
    let ts = timestamp(&raw, kind)?;
    optional_text(&raw.id, "id")?;
    let plan = |mode: Option<BillingMode>| -> Result<Plan, Rejection> {
        let id = required_id(&raw.plan, "plan", kind)?;
        let plan = Plan::from_id(id).ok_or_else(|| {
            Rejection::invalid(
                "plan",
                format_args!("{id:?} is not a plan (developer, standard, premium, free, pro, ultimate)"),
            )
        })?;
        match mode {
            Some(mode) if plan.mode() != mode => Err(Rejection::invalid(
                "plan",
                format_args!("{id:?} is not a plan of the {mode} billing mode"),
            )),
            _ => Ok(plan),
        }
    };
    let account_id = || optional_id(&raw.account_id, "account_id").map(|a| a.map(str::to_owned));
    let change = match kind {
        "app_created" => SubscriptionChange::AppCreated { account_id: account_id()? },
        "plan_changed" => SubscriptionChange::PlanChanged { plan: plan(None)? },
        "billing_mode_migrated" => {
            SubscriptionChange::BillingModeMigrated { plan: plan(Some(BillingMode::Current))? }
        }
        _ => SubscriptionChange::AvCallTrialStarted { account_id: account_id()? },
    };
    Ok(SubscriptionEvent { app_id, ts, change })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(json: &[u8]) -> (&'static str, String) {
        let r = decode_usage_event(json).unwrap_err();
        (r.reason.code(), r.detail)
    }

    #[test]
    fn accepts_both_timestamp_forms_and_ignores_unknown_fields() {
        let a = decode_usage_event(
            br#"{"type":"connect","app_id":1400000001,"user_id":"alice","conn_id":"c-91","ts":1793693700000,"extra":{"x":[1,2]}}"#,
        )
        .unwrap();
        let b = decode_usage_event(
            br#"{"type":"connect","app_id":1400000001,"user_id":"alice","conn_id":"c-91","ts":"2026-11-03T16:15:00+08:00"}"#,
        )
        .unwrap();
        assert_eq!(a, b);
        assert_eq!(a.ts.millis(), 1_793_693_700_000);
        let escaped =
            decode_usage_event(br#"{"type":"login","app_id":1,"user_id":"\u0061lice","ts":1700000000000}"#)
                .unwrap();
        assert_eq!(escaped.action, Action::Login { user: UserKey::of("alice"), ok: true });
        let failed =
            decode_usage_event(br#"{"type":"login","app_id":1,"user_id":"a","ok":false,"ts":1700000000000}"#)
                .unwrap();
        assert_eq!(failed.action, Action::Login { user: UserKey::of("a"), ok: false });
        let nulls = decode_usage_event(
            br#"{"type":"login","app_id":1,"user_id":"a","ok":null,"platform":null,"ts":1700000000000}"#,
        )
        .unwrap();
        assert_eq!(nulls.action, Action::Login { user: UserKey::of("a"), ok: true });
    }

    #[test]
    fn every_malformed_case_has_its_reason() {
        let long =
            format!(r#"{{"type":"login","app_id":1,"user_id":"{}","ts":1700000000000}}"#, "u".repeat(129));
        let cases: Vec<(Vec<u8>, &str, &str)> = vec![
            (b"\xff\xfe".to_vec(), "not_utf8", "UTF-8"),
            (b"not json".to_vec(), "not_json", ""),
            (b"".to_vec(), "not_json", "empty"),
            (br#"{"type":"login""#.to_vec(), "not_json", ""),
            (br#"["login",1]"#.to_vec(), "not_object", ""),
            (b"42".to_vec(), "not_object", ""),
            (br#"{"app_id":1,"ts":1700000000000}"#.to_vec(), "missing_field", "type"),
            (br#"{"type":7,"app_id":1,"ts":1700000000000}"#.to_vec(), "invalid_field", "type"),
            (br#"{"type":"purchase","app_id":1,"ts":1700000000000}"#.to_vec(), "unknown_type", "purchase"),
            (br#"{"type":"login","user_id":"a","ts":1700000000000}"#.to_vec(), "missing_field", "app_id"),
            (
                br#"{"type":"login","app_id":0,"user_id":"a","ts":1700000000000}"#.to_vec(),
                "invalid_field",
                "app_id",
            ),
            (
                br#"{"type":"login","app_id":-5,"user_id":"a","ts":1700000000000}"#.to_vec(),
                "invalid_field",
                "app_id",
            ),
            (
                br#"{"type":"login","app_id":"1","user_id":"a","ts":1700000000000}"#.to_vec(),
                "invalid_field",
                "app_id",
            ),
            (
                br#"{"type":"login","app_id":1.5,"user_id":"a","ts":1700000000000}"#.to_vec(),
                "invalid_field",
                "app_id",
            ),
            (br#"{"type":"login","app_id":1,"user_id":"a"}"#.to_vec(), "missing_field", "ts"),
            (
                br#"{"type":"login","app_id":1,"user_id":"a","ts":"yesterday"}"#.to_vec(),
                "bad_timestamp",
                "ts",
            ),
            (br#"{"type":"login","app_id":1,"user_id":"a","ts":1.5}"#.to_vec(), "bad_timestamp", "ts"),
            (br#"{"type":"login","app_id":1,"user_id":"a","ts":5}"#.to_vec(), "timestamp_out_of_range", "ts"),
            (
                br#"{"type":"login","app_id":1,"user_id":"a","ts":"2100-01-01T00:00:00Z"}"#.to_vec(),
                "timestamp_out_of_range",
                "ts",
            ),
            (br#"{"type":"login","app_id":1,"ts":1700000000000}"#.to_vec(), "missing_field", "user_id"),
            (
                br#"{"type":"login","app_id":1,"user_id":"","ts":1700000000000}"#.to_vec(),
                "invalid_field",
                "user_id",
            ),
            (long.into_bytes(), "invalid_field", "129 bytes"),
            (
                br#"{"type":"login","app_id":1,"user_id":5,"ts":1700000000000}"#.to_vec(),
                "invalid_field",
                "user_id",
            ),
            (
                br#"{"type":"login","app_id":1,"user_id":"a","ok":"false","ts":1700000000000}"#.to_vec(),
                "invalid_field",
                "ok",
            ),
            (
                br#"{"type":"connect","app_id":1,"user_id":"a","ts":1700000000000}"#.to_vec(),
                "missing_field",
                "conn_id",
            ),
            (
                br#"{"type":"connect","app_id":1,"conn_id":"c","ts":1700000000000}"#.to_vec(),
                "missing_field",
                "user_id",
            ),
            (
                br#"{"type":"heartbeat","app_id":1,"conn_id":"","ts":1700000000000}"#.to_vec(),
                "invalid_field",
                "conn_id",
            ),
            (
                br#"{"type":"group_stats","app_id":1,"ts":1700000000000}"#.to_vec(),
                "missing_field",
                "group_count",
            ),
            (
                br#"{"type":"group_stats","app_id":1,"group_count":-1,"ts":1700000000000}"#.to_vec(),
                "invalid_field",
                ">= 0",
            ),
            (
                br#"{"type":"group_stats","app_id":1,"group_count":"9","ts":1700000000000}"#.to_vec(),
                "invalid_field",
                "group_count",
            ),
            (
                br#"{"type":"login","app_id":1,"app_id":2,"user_id":"a","ts":1700000000000}"#.to_vec(),
                "invalid_field",
                "duplicate",
            ),
            (
                br#"{"type":"login","app_id":1,"user_id":"a","platform":3,"ts":1700000000000}"#.to_vec(),
                "invalid_field",
                "platform",
            ),
        ];
        for (input, code, needle) in cases {
            let (got, detail) = reason(&input);
            assert_eq!(got, code, "{}: {detail}", String::from_utf8_lossy(&input));
            assert!(detail.contains(needle), "{detail:?} should mention {needle:?}");
        }
    }

    /// Numbers are refused for what they are: an integer too large is out of range, not
    /// fractional; `-0` is the integer zero; `1.5` and `1e3` are not integers.
    #[test]
    fn numbers_are_refused_for_what_they_are() {
        let group =
            |n: &str| format!(r#"{{"type":"group_stats","app_id":1,"group_count":{n},"ts":1700000000000}}"#);
        for (n, needle) in [
            ("18446744073709551616", "out of range"),
            ("99999999999999999999999", "out of range"),
            ("-9223372036854775809", "out of range"),
            ("1.5", "a fractional number"),
            ("1e3", "not written as an integer"),
        ] {
            let (got, detail) = reason(group(n).as_bytes());
            assert_eq!(got, "invalid_field", "{n}: {detail}");
            assert!(detail.contains(needle), "{n}: {detail:?} should mention {needle:?}");
        }
        let zero = decode_usage_event(group("-0").as_bytes()).unwrap();
        assert_eq!(zero.action, Action::GroupStats { group_count: 0 });
        let (got, detail) = reason(br#"{"type":"login","app_id":18446744073709551616,"user_id":"a","ts":1}"#);
        assert!(got == "invalid_field" && detail.contains("out of range"), "{detail}");
    }

    #[test]
    fn subscription_events_decode_and_check_plans() {
        let ev = decode_subscription_event(
            br#"{"type":"plan_changed","app_id":9,"ts":"2026-11-11T10:00:00+08:00","plan":"premium"}"#,
        )
        .unwrap();
        assert_eq!(ev.change, SubscriptionChange::PlanChanged { plan: Plan::Premium });
        let created = decode_subscription_event(
            br#"{"type":"app_created","app_id":9,"ts":1700000000000,"account_id":"acct-1"}"#,
        )
        .unwrap();
        assert_eq!(created.change, SubscriptionChange::AppCreated { account_id: Some("acct-1".into()) });
        let err = decode_subscription_event(
            br#"{"type":"billing_mode_migrated","app_id":9,"ts":1700000000000,"plan":"pro"}"#,
        )
        .unwrap_err();
        assert_eq!(err.reason, RejectReason::InvalidField);
        let err = decode_subscription_event(
            br#"{"type":"plan_changed","app_id":9,"ts":1700000000000,"plan":"gold"}"#,
        )
        .unwrap_err();
        assert!(err.detail.contains("gold"));
        let err =
            decode_subscription_event(br#"{"type":"login","app_id":9,"ts":1700000000000}"#).unwrap_err();
        assert_eq!(err.reason, RejectReason::UnknownType);
    }
}
