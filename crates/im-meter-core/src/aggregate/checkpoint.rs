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
//! totals: [`super::totals`]). What metering hands to billing: `u/{app}/{YYYY-MM}/{source}`
//! (a source's usage of a closed month), `w/{source}` (how far the source has closed
//! months), `x/…` (quota crossings).

use std::collections::BTreeMap;

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

/// Every key of the changelog topic: a metering slice's state, and what the billing stage
/// reads (each source partition's final usage of a closed month, month-closed markers, and
/// billing's own progress).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ChangelogKey {
    /// Metering state of the partition the record sits in.
    State(StateKey),
    /// `u/{app}/{YYYY-MM}/{source}`: one source partition's usage of a closed app-month.
    Usage {
        /// The app.
        app_id: AppId,
        /// The month.
        month: Month,
        /// The events partition it was metered from.
        source: u32,
    },
    /// `w/{source}`: how far the source partition has closed months (a [`ClosedMark`]);
    /// each source's latest mark replaces its previous one.
    ClosedThrough {
        /// The events partition.
        source: u32,
    },
    /// `b`: the last month billed from the partition the record sits in.
    Billed,
    /// `x/{app}/{YYYY-MM}/{source}`: the app's MAU in the source partition just passed the
    /// Developer cap (a quota alert may be due).
    QuotaCrossed {
        /// The app.
        app_id: AppId,
        /// The month.
        month: Month,
        /// The events partition.
        source: u32,
    },
    /// `o/{partition}`: how far the billing task of this changelog partition has copied
    /// that subscriptions partition into the plan book (the value: the offset to copy next).
    PlanCopied {
        /// The subscriptions partition.
        partition: u32,
    },
    /// `h/{YYYY-MM}`: the month's bill is made in several transactions, and the apps up to
    /// the value (an app id) are billed; gone with the month's last transaction.
    BilledApps {
        /// The month being billed.
        month: Month,
    },
    /// `s/{YYYY-MM}`: how far each subscriptions partition had been read when the month was
    /// billed in the partition the record sits in (a [`SubscriptionsRead`]).
    SubscriptionsRead {
        /// The month billed.
        month: Month,
    },
    /// `g`: the deployment (consumer group id, the value) whose state the partition holds;
    /// a worker of another group refuses it.
    Owner,
    /// `a/{app}/{YYYY-MM}`: the quota alert of the app-month was published.
    Alerted {
        /// The app.
        app_id: AppId,
        /// The month.
        month: Month,
    },
}

impl ChangelogKey {
    /// The app the record is about, if it is about one app.
    pub fn app_id(&self) -> Option<AppId> {
        match self {
            ChangelogKey::Usage { app_id, .. }
            | ChangelogKey::QuotaCrossed { app_id, .. }
            | ChangelogKey::Alerted { app_id, .. } => Some(*app_id),
            ChangelogKey::State(_)
            | ChangelogKey::ClosedThrough { .. }
            | ChangelogKey::Billed
            | ChangelogKey::PlanCopied { .. }
            | ChangelogKey::SubscriptionsRead { .. }
            | ChangelogKey::BilledApps { .. }
            | ChangelogKey::Owner => None,
        }
    }

    /// The key's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        match self {
            ChangelogKey::State(key) => key.to_bytes(),
            ChangelogKey::Usage { app_id, month, source } => {
                format!("u/{app_id}/{month}/{source}").into_bytes()
            }
            ChangelogKey::ClosedThrough { source } => format!("w/{source}").into_bytes(),
            ChangelogKey::Billed => b"b".to_vec(),
            ChangelogKey::Owner => b"g".to_vec(),
            ChangelogKey::QuotaCrossed { app_id, month, source } => {
                format!("x/{app_id}/{month}/{source}").into_bytes()
            }
            ChangelogKey::Alerted { app_id, month } => format!("a/{app_id}/{month}").into_bytes(),
            ChangelogKey::PlanCopied { partition } => format!("o/{partition}").into_bytes(),
            ChangelogKey::SubscriptionsRead { month } => format!("s/{month}").into_bytes(),
            ChangelogKey::BilledApps { month } => format!("h/{month}").into_bytes(),
        }
    }

    /// Reads a key written by [`ChangelogKey::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CodecError> {
        let bad =
            || CodecError::Corrupt(format!("not a changelog key: {:?}", String::from_utf8_lossy(bytes)));
        match bytes.first() {
            Some(b'b') if bytes.len() == 1 => Ok(ChangelogKey::Billed),
            Some(b'g') if bytes.len() == 1 => Ok(ChangelogKey::Owner),
            Some(b'u' | b'w' | b'x' | b'a' | b'o' | b's' | b'h') => {
                let text = std::str::from_utf8(bytes).map_err(|_| bad())?;
                let parts: Vec<&str> = text.split('/').collect();
                match parts.as_slice() {
                    ["u", app, month, source] => Ok(ChangelogKey::Usage {
                        app_id: app.parse().map_err(|_| bad())?,
                        month: month.parse().map_err(|_| bad())?,
                        source: source.parse().map_err(|_| bad())?,
                    }),
                    ["w", source] => {
                        Ok(ChangelogKey::ClosedThrough { source: source.parse().map_err(|_| bad())? })
                    }
                    ["x", app, month, source] => Ok(ChangelogKey::QuotaCrossed {
                        app_id: app.parse().map_err(|_| bad())?,
                        month: month.parse().map_err(|_| bad())?,
                        source: source.parse().map_err(|_| bad())?,
                    }),
                    ["o", partition] => {
                        Ok(ChangelogKey::PlanCopied { partition: partition.parse().map_err(|_| bad())? })
                    }
                    ["s", month] => {
                        Ok(ChangelogKey::SubscriptionsRead { month: month.parse().map_err(|_| bad())? })
                    }
                    ["h", month] => Ok(ChangelogKey::BilledApps { month: month.parse().map_err(|_| bad())? }),
                    ["a", app, month] => Ok(ChangelogKey::Alerted {
                        app_id: app.parse().map_err(|_| bad())?,
                        month: month.parse().map_err(|_| bad())?,
                    }),
                    _ => Err(bad()),
                }
            }
            _ => StateKey::from_bytes(bytes).map(ChangelogKey::State),
        }
    }
}

/// The changelog partition holding an app's usage for billing: a fixed hash of the app id,
/// so every source partition's usage of one app meets in one billing task.
pub fn billing_partition(app_id: AppId, partitions: u32) -> u32 {
    (xxhash_rust::xxh3::xxh3_64(&app_id.to_le_bytes()) % u64::from(partitions.max(1))) as u32
}

/// What a source partition says with its `w/{source}` record: every month through
/// `through` is closed there (whether or not it had data for it), and the first month it
/// ever applied an event for. Billing bills a month once every source is closed through
/// it, starting from the earliest first month of all sources.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct ClosedMark {
    /// Every month up to and including this one is closed in the source.
    pub through: Month,
    /// The first month the source applied an event for (`None`: none yet).
    pub first_active: Option<Month>,
}

impl ClosedMark {
    /// The record's value, readable text: `through=2026-10 first=2026-09` (`first=-`
    /// when the source has seen no event).
    pub fn encode(&self) -> Vec<u8> {
        let first = self.first_active.map_or_else(|| "-".to_string(), |m| m.to_string());
        format!("through={} first={first}", self.through).into_bytes()
    }

    /// Reads a value written by [`ClosedMark::encode`].
    pub fn decode(bytes: &[u8]) -> Result<Self, CodecError> {
        let bad = || CodecError::Corrupt(format!("not a closed mark: {:?}", String::from_utf8_lossy(bytes)));
        let text = std::str::from_utf8(bytes).map_err(|_| bad())?;
        let (through, first) = text.split_once(' ').ok_or_else(bad)?;
        let through = through.strip_prefix("through=").ok_or_else(bad)?.parse().map_err(|_| bad())?;
        let first_active = match first.strip_prefix("first=").ok_or_else(bad)? {
            "-" => None,
            month => Some(month.parse().map_err(|_| bad())?),
        };
        Ok(ClosedMark { through, first_active })
    }
}

/// How far each subscriptions partition had been read (the offset after the last record
/// applied; a partition not named: none) when a month was billed. Records at or after these
/// offsets were read after the bill, so they cannot have changed it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SubscriptionsRead(pub BTreeMap<u32, i64>);

impl SubscriptionsRead {
    /// The record's value, readable text: `0=15 1=7`.
    pub fn encode(&self) -> Vec<u8> {
        let pairs: Vec<String> = self.0.iter().map(|(p, o)| format!("{p}={o}")).collect();
        pairs.join(" ").into_bytes()
    }

    /// Reads a value written by [`SubscriptionsRead::encode`].
    pub fn decode(bytes: &[u8]) -> Result<Self, CodecError> {
        let bad = || {
            CodecError::Corrupt(format!("not subscription positions: {:?}", String::from_utf8_lossy(bytes)))
        };
        let text = std::str::from_utf8(bytes).map_err(|_| bad())?;
        text.split_whitespace()
            .map(|pair| {
                let (p, o) = pair.split_once('=').ok_or_else(bad)?;
                Ok((p.parse().map_err(|_| bad())?, o.parse().map_err(|_| bad())?))
            })
            .collect::<Result<_, _>>()
            .map(SubscriptionsRead)
    }

    /// How far partition `partition` had been read.
    pub fn of(&self, partition: u32) -> i64 {
        self.0.get(&partition).copied().unwrap_or(0)
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

    #[test]
    fn closed_marks_round_trip() {
        let month: Month = "2026-10".parse().unwrap();
        for mark in [
            ClosedMark { through: month, first_active: None },
            ClosedMark { through: month, first_active: Some("2026-09".parse().unwrap()) },
        ] {
            assert_eq!(ClosedMark::decode(&mark.encode()).unwrap(), mark);
        }
        assert_eq!(ClosedMark { through: month, first_active: None }.encode(), b"through=2026-10 first=-");
        for bad in [&b""[..], b"through=2026-10", b"through=x first=-", b"through=2026-10 first=13"] {
            assert!(ClosedMark::decode(bad).is_err());
        }
    }

    #[test]
    fn changelog_keys_round_trip() {
        let month = "2026-11".parse().unwrap();
        let keys = [
            ChangelogKey::State(StateKey::Progress),
            ChangelogKey::Usage { app_id: 9, month, source: 3 },
            ChangelogKey::ClosedThrough { source: 0 },
            ChangelogKey::Billed,
            ChangelogKey::QuotaCrossed { app_id: 9, month, source: 2 },
            ChangelogKey::Alerted { app_id: 9, month },
            ChangelogKey::PlanCopied { partition: 4 },
            ChangelogKey::Owner,
            ChangelogKey::SubscriptionsRead { month },
            ChangelogKey::BilledApps { month },
        ];
        for key in keys {
            assert_eq!(ChangelogKey::from_bytes(&key.to_bytes()).unwrap(), key);
        }
        assert_eq!(keys[1].to_bytes(), b"u/9/2026-11/3");
        assert_eq!(keys[2].to_bytes(), b"w/0");
        assert_eq!(keys[9].to_bytes(), b"h/2026-11");
        assert!(ChangelogKey::from_bytes(b"u/9/2026-11").is_err());
        assert!(ChangelogKey::from_bytes(b"w/2026-11/0").is_err());
        let spread: std::collections::BTreeSet<u32> = (1..100).map(|a| billing_partition(a, 6)).collect();
        assert_eq!(spread.len(), 6);
    }
}
