//! The changelogs' typed marks: the values of the records by which one stage tells the
//! other, or itself after a restart, how far it has come — a source's [`ClosedMark`]
//! (`w/{source}`, written by metering, read by billing) and the [`SubscriptionsRead`] of a
//! billed month (`s/{YYYY-MM}`, written and read by billing). Both are readable text.

use std::collections::BTreeMap;

use crate::aggregate::CodecError;
use crate::time::Month;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
