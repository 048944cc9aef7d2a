//! The changelogs' keys: every key a record of either changelog is written under
//! ([`ChangelogKey`]), its bytes, and the billing changelog partition an app's records go to
//! ([`billing_partition`]).
//!
//! Keys are short text, readable with any Kafka tool. The metering state's own keys
//! (`p`, `m/…`, `d/…`, `e/…`, `c/…`, `k/…`) are the meter's: [`StateKey`], which
//! [`ChangelogKey::State`] wraps and whose bytes it reads and writes unchanged. What
//! metering hands to billing: `u/{app}/{YYYY-MM}/{source}` (a source's usage of a closed
//! month), `w/{source}` (how far the source has closed months: a
//! [`ClosedMark`](super::ClosedMark)), `x/…` (quota crossings). What billing keeps of its
//! own progress: `b`, `h/…`, `s/…` (a [`SubscriptionsRead`](super::SubscriptionsRead)),
//! `o/…`, `a/…`. Both stages: `g` (the owning deployment).

use crate::aggregate::{CodecError, StateKey};
use crate::plan::AppId;
use crate::time::Month;

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
    /// `w/{source}`: how far the source partition has closed months (a [`ClosedMark`](super::ClosedMark));
    /// each source's latest mark replaces its previous one.
    ClosedThrough {
        /// The events partition.
        source: u32,
    },
    /// `b`: the last month billed from the partition the record sits in.
    Billed,
    /// `x/{app}/{YYYY-MM}/{source}`: the app's MAU in the source partition just passed the
    /// Developer cap (a quota alert may be due); the value is the day of the month by whose
    /// end it had (decimal; empty in records written before it said).
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
    /// billed in the partition the record sits in (a [`SubscriptionsRead`](super::SubscriptionsRead)).
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

#[cfg(test)]
mod tests {
    use super::*;

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
