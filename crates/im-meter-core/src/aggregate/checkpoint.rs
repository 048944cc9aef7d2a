//! The meter's state as changelog records (the Kafka Streams pattern, without Kafka).
//!
//! A [`Meter`](super::Meter) reports what changed since its last checkpoint as
//! [`StateRecord`]s — upserts and deletes keyed by [`StateKey`] — and can be rebuilt from the
//! latest value of every key (what a compacted changelog holds). Replaying the changelog and
//! then the input after the checkpointed offsets gives the state of an uninterrupted run;
//! the property tests check exactly that.
//!
//! Keys are short text, readable with any Kafka tool: `p` (the partition's progress),
//! `m/{app}/{YYYY-MM}` (an app-month aggregate without its DAU sketches),
//! `d/{app}/{YYYY-MM}/{day}` (one day's DAU count of it), `e/{app}/{YYYY-MM}/{m or
//! day}/{n}` (segment n of the exact users of its MAU or of a day's DAU),
//! `e/{app}/{YYYY-MM}/totals` (how many segments and users each of those counts has),
//! `c/{app}/{conn hash, 16 hex digits}` (a pending connection), `k/{n}` (segment n of
//! counted connections: hashes of one month's, small segments merged as they accumulate),
//! `k/totals` (how many segments and connections each month's counted connections have; both
//! totals: [`super::totals`]).
//!
//! These keys and their bytes are the meter's: they say how its state is laid out, and
//! change with it. The changelogs' other keys — what metering hands to billing, and
//! billing's own records — are the `changelog` module's, which wraps these
//! (`ChangelogKey::State`); this module does not know of them.

use serde::{Deserialize, Serialize};

use super::codec::CodecError;
use super::user_count::UserCount;
use crate::ingest::ConnKey;
use crate::plan::AppId;
use crate::time::Month;

/// What a state record is about.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StateKey {
    /// The slice's progress: watermark and closed months.
    Progress,
    /// One app-month's aggregate, without its DAU sketches.
    AppMonth {
        /// The app.
        app_id: AppId,
        /// The month.
        month: Month,
    },
    /// The DAU sketch of one day of an app-month (an aggregate holding only that).
    AppMonthDay {
        /// The app.
        app_id: AppId,
        /// The month.
        month: Month,
        /// The day of the month.
        day: u8,
    },
    /// A segment of the exact users of one count of an app-month.
    Users {
        /// The app.
        app_id: AppId,
        /// The month.
        month: Month,
        /// Its MAU, or one day's DAU.
        count: UserCount,
        /// The segment's number (within the count).
        segment: u64,
    },
    /// How many user segments, and users in them, each exact count of an app-month has
    /// ([`super::totals::UserTotals`]).
    UserTotals {
        /// The app.
        app_id: AppId,
        /// The month.
        month: Month,
    },
    /// One connection's state.
    Connection {
        /// The app.
        app_id: AppId,
        /// The connection.
        conn: ConnKey,
    },
    /// A segment of counted connections, remembered to absorb retries.
    CountedConnections {
        /// The segment's sequence number.
        segment: u64,
    },
    /// How many segments of counted connections, and connections in them, each month has
    /// ([`super::totals::ConnectionTotals`]).
    ConnectionTotals,
}

impl StateKey {
    /// Whether the record is part of an app-month's usage (its aggregate, a day's DAU, a
    /// user segment): what the usage API shows of an open month.
    pub fn is_app_month(&self) -> bool {
        matches!(self, StateKey::AppMonth { .. } | StateKey::AppMonthDay { .. } | StateKey::Users { .. })
    }

    /// The key's bytes, as written to the changelog.
    pub fn to_bytes(&self) -> Vec<u8> {
        match self {
            StateKey::Progress => b"p".to_vec(),
            StateKey::AppMonth { app_id, month } => format!("m/{app_id}/{month}").into_bytes(),
            StateKey::AppMonthDay { app_id, month, day } => format!("d/{app_id}/{month}/{day}").into_bytes(),
            StateKey::Users { app_id, month, count, segment } => {
                let count = match count {
                    UserCount::Mau => "m".to_string(),
                    UserCount::Dau(day) => day.to_string(),
                };
                format!("e/{app_id}/{month}/{count}/{segment}").into_bytes()
            }
            StateKey::UserTotals { app_id, month } => format!("e/{app_id}/{month}/totals").into_bytes(),
            StateKey::Connection { app_id, conn } => format!("c/{app_id}/{:016x}", conn.0).into_bytes(),
            StateKey::CountedConnections { segment } => format!("k/{segment}").into_bytes(),
            StateKey::ConnectionTotals => b"k/totals".to_vec(),
        }
    }

    /// Reads a key written by [`StateKey::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CodecError> {
        let bad = || CodecError::Corrupt(format!("not a state key: {:?}", String::from_utf8_lossy(bytes)));
        let text = std::str::from_utf8(bytes).map_err(|_| bad())?;
        if text == "p" {
            return Ok(StateKey::Progress);
        }
        if text == "k/totals" {
            return Ok(StateKey::ConnectionTotals);
        }
        if let Some(segment) = text.strip_prefix("k/") {
            return Ok(StateKey::CountedConnections { segment: segment.parse().map_err(|_| bad())? });
        }
        let mut parts = text.splitn(3, '/');
        let (Some(kind), Some(app), Some(rest)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad());
        };
        let app_id: AppId = app.parse().map_err(|_| bad())?;
        let day = |text: &str| text.parse::<u8>().ok().filter(|d| (1..=31).contains(d)).ok_or_else(bad);
        match kind {
            "m" => Ok(StateKey::AppMonth { app_id, month: rest.parse().map_err(|_| bad())? }),
            "d" => {
                let (month, d) = rest.split_once('/').ok_or_else(bad)?;
                Ok(StateKey::AppMonthDay { app_id, month: month.parse().map_err(|_| bad())?, day: day(d)? })
            }
            "e" if rest.ends_with("/totals") => {
                let month = rest.strip_suffix("/totals").unwrap_or(rest);
                Ok(StateKey::UserTotals { app_id, month: month.parse().map_err(|_| bad())? })
            }
            "e" => {
                let [month, count, segment] = rest.splitn(3, '/').collect::<Vec<_>>()[..] else {
                    return Err(bad());
                };
                let count = match count {
                    "m" => UserCount::Mau,
                    d => UserCount::Dau(day(d)?),
                };
                let segment = segment.parse().map_err(|_| bad())?;
                Ok(StateKey::Users { app_id, month: month.parse().map_err(|_| bad())?, count, segment })
            }
            "c" if rest.len() == 16 => Ok(StateKey::Connection {
                app_id,
                conn: ConnKey(u64::from_str_radix(rest, 16).map_err(|_| bad())?),
            }),
            _ => Err(bad()),
        }
    }
}

/// One changelog entry: the key's new value, or `None` when the key is gone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateRecord {
    /// What changed.
    pub key: StateKey,
    /// Its encoded state; `None` deletes it (a tombstone in a compacted topic).
    pub value: Option<Vec<u8>>,
}

/// The progress of a meter: how far event time has come, which months are closed, and
/// the input position the state reflects.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Progress {
    pub watermark: Option<i64>,
    pub closed_through: Option<Month>,
    pub active_months: Vec<Month>,
    pub input_offset: Option<i64>,
}

/// Version 1 had no input offset.
#[derive(Deserialize)]
struct ProgressV1 {
    watermark: Option<i64>,
    closed_through: Option<Month>,
    active_months: Vec<Month>,
}

const PROGRESS_FORMAT_VERSION: u8 = 2;

impl Progress {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = vec![PROGRESS_FORMAT_VERSION];
        out.extend(postcard::to_allocvec(self).expect("progress always serializes"));
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, CodecError> {
        let corrupt = |e: postcard::Error| CodecError::Corrupt(e.to_string());
        match bytes.split_first() {
            Some((&PROGRESS_FORMAT_VERSION, payload)) => postcard::from_bytes(payload).map_err(corrupt),
            Some((1, payload)) => {
                let v1: ProgressV1 = postcard::from_bytes(payload).map_err(corrupt)?;
                Ok(Progress {
                    watermark: v1.watermark,
                    closed_through: v1.closed_through,
                    active_months: v1.active_months,
                    input_offset: None,
                })
            }
            Some((&version, _)) => Err(CodecError::UnknownVersion(version)),
            None => Err(CodecError::Corrupt("empty progress record".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_read_well() {
        let keys = [
            StateKey::Progress,
            StateKey::AppMonth { app_id: 1_400_000_001, month: "2026-11".parse().unwrap() },
            StateKey::Connection { app_id: 7, conn: ConnKey(0xdead_beef) },
            StateKey::CountedConnections { segment: 12 },
            StateKey::AppMonthDay { app_id: 7, month: "2026-11".parse().unwrap(), day: 30 },
            StateKey::Users {
                app_id: 7,
                month: "2026-11".parse().unwrap(),
                count: UserCount::Mau,
                segment: 3,
            },
            StateKey::Users {
                app_id: 7,
                month: "2026-11".parse().unwrap(),
                count: UserCount::Dau(9),
                segment: 0,
            },
            StateKey::UserTotals { app_id: 7, month: "2026-11".parse().unwrap() },
            StateKey::ConnectionTotals,
        ];
        for key in keys {
            assert_eq!(StateKey::from_bytes(&key.to_bytes()).unwrap(), key);
        }
        assert_eq!(keys[1].to_bytes(), b"m/1400000001/2026-11");
        assert_eq!(keys[2].to_bytes(), b"c/7/00000000deadbeef");
        assert_eq!(keys[3].to_bytes(), b"k/12");
        assert_eq!(keys[4].to_bytes(), b"d/7/2026-11/30");
        assert_eq!(keys[5].to_bytes(), b"e/7/2026-11/m/3");
        assert_eq!(keys[6].to_bytes(), b"e/7/2026-11/9/0");
        assert_eq!(keys[7].to_bytes(), b"e/7/2026-11/totals");
        assert_eq!(keys[8].to_bytes(), b"k/totals");
        for bad in [
            &b"x/1/2"[..],
            b"m/x/2026-11",
            b"c/7/zz",
            b"m/7",
            b"k/",
            b"k/-1",
            b"d/7/2026-11/0",
            b"d/7/2026-11",
            b"e/7/2026-11/0/1",
            b"e/7/2026-11/m",
            b"e/7/2026-11/m/x",
            b"e/7/2026-11/m/totals",
            b"e/7/x/totals",
            b"k/total",
            b"\xff",
        ] {
            assert!(StateKey::from_bytes(bad).is_err());
        }
    }
}
