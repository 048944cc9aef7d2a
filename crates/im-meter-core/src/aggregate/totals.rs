//! Segment totals: how many segments, and keys in them, each set checkpointed as segments
//! ([`super::segments`]) has — an app-month's exact user counts (`e/{app}/{YYYY-MM}/totals`)
//! and each month's counted connections (`k/totals`) — so that a restore can tell whether
//! the changelog still holds them all (issue 17 §4).
//!
//! Why: every segment is a changelog record of its own, and a full one is never written
//! again. A changelog that lost one (its records deleted, or expired by a topic that is not
//! compacted-only) restored a smaller set without a word: a month's DAU and MAU fell, and
//! counted connections were counted again when their events were retried. Now each
//! checkpoint that changes a set's segments also writes the set's totals, and a restore that
//! finds fewer segments or keys than they say refuses the state
//! ([`RestoreError`](super::meter::RestoreError)), which stops that partition.
//!
//! Checked as "at least": within one checkpoint the totals come after the segments it
//! writes and before the deletions of those it merged away, so a reader that stops inside a
//! commit (the last stable offset can fall there) finds more segments than the totals it
//! has seen say, never fewer. A whole state holds exactly what its totals say.
//!
//! State written before totals existed has none, and restores unchecked until a checkpoint
//! changes its segments (the totals then cover every segment, old ones included).
//!
//! The record's value is readable text, as the closed marks are: `{count}={segments}/{keys}`
//! separated by spaces, the count being `m` (the MAU) or a day of the month for users, a
//! month (`2026-11`) for connections; a set without segments is left out.

use std::collections::BTreeMap;

use super::codec::CodecError;
use super::segments::SegmentTotal;
use super::user_count::UserCount;
use super::user_set;
use crate::time::Month;

/// The totals of an app-month's user counts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UserTotals(pub BTreeMap<UserCount, SegmentTotal>);

/// The totals of each month's counted connections.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnectionTotals(pub BTreeMap<Month, SegmentTotal>);

impl UserTotals {
    /// The record's value: `m=2/131072 5=2/131072`.
    pub fn encode(&self) -> Vec<u8> {
        encode(self.0.iter().map(|(count, total)| (count_text(*count), total)))
    }

    /// Reads a value written by [`UserTotals::encode`].
    pub fn decode(bytes: &[u8]) -> Result<Self, CodecError> {
        decode(bytes, "user segment totals", |text| match text {
            "m" => Some(UserCount::Mau),
            day => day.parse().ok().filter(|d| (1..=31).contains(d)).map(UserCount::Dau),
        })
        .map(UserTotals)
    }

    /// What user segments read back hold: segments and users of each count.
    pub fn of_segments<'a>(
        segments: impl IntoIterator<Item = (UserCount, &'a [u8])>,
    ) -> Result<Self, CodecError> {
        let mut found: BTreeMap<UserCount, SegmentTotal> = BTreeMap::new();
        for (count, bytes) in segments {
            let total = found.entry(count).or_default();
            total.segments += 1;
            total.keys += user_set::segment_len(bytes)? as u64;
        }
        Ok(UserTotals(found))
    }
}

impl ConnectionTotals {
    /// The record's value: `2026-11=2/65635`.
    pub fn encode(&self) -> Vec<u8> {
        encode(self.0.iter().map(|(month, total)| (month.to_string(), total)))
    }

    /// Reads a value written by [`ConnectionTotals::encode`].
    pub fn decode(bytes: &[u8]) -> Result<Self, CodecError> {
        decode(bytes, "connection segment totals", |text| text.parse().ok()).map(ConnectionTotals)
    }
}

/// The first set of `written` that `found` holds fewer segments or keys of, with both totals.
pub fn shortfall<K: Ord + Copy>(
    written: &BTreeMap<K, SegmentTotal>,
    found: &BTreeMap<K, SegmentTotal>,
) -> Option<(K, SegmentTotal, SegmentTotal)> {
    written.iter().find_map(|(&set, written)| {
        let found = found.get(&set).copied().unwrap_or_default();
        found.short_of(written).then_some((set, *written, found))
    })
}

/// A count as the totals (and the segments' keys) name it.
fn count_text(count: UserCount) -> String {
    match count {
        UserCount::Mau => "m".to_string(),
        UserCount::Dau(day) => day.to_string(),
    }
}

fn encode<'a>(totals: impl Iterator<Item = (String, &'a SegmentTotal)>) -> Vec<u8> {
    let items: Vec<String> =
        totals.map(|(set, total)| format!("{set}={}/{}", total.segments, total.keys)).collect();
    items.join(" ").into_bytes()
}

fn decode<K: Ord>(
    bytes: &[u8],
    what: &str,
    set: impl Fn(&str) -> Option<K>,
) -> Result<BTreeMap<K, SegmentTotal>, CodecError> {
    let bad = || CodecError::Corrupt(format!("not {what}: {:?}", String::from_utf8_lossy(bytes)));
    let text = std::str::from_utf8(bytes).map_err(|_| bad())?;
    text.split_whitespace()
        .map(|item| {
            let (name, total) = item.split_once('=').ok_or_else(bad)?;
            let (segments, keys) = total.split_once('/').ok_or_else(bad)?;
            let total = SegmentTotal {
                segments: segments.parse().map_err(|_| bad())?,
                keys: keys.parse().map_err(|_| bad())?,
            };
            Ok((set(name).ok_or_else(bad)?, total))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_round_trip_and_read_well() {
        let total = |segments, keys| SegmentTotal { segments, keys };
        let users = UserTotals(BTreeMap::from([
            (UserCount::Mau, total(2, 131_072)),
            (UserCount::Dau(5), total(1, 7)),
        ]));
        assert_eq!(users.encode(), b"m=2/131072 5=1/7");
        assert_eq!(UserTotals::decode(&users.encode()).unwrap(), users);
        assert_eq!(UserTotals::decode(b"").unwrap(), UserTotals::default());
        let month: Month = "2026-11".parse().unwrap();
        let conns = ConnectionTotals(BTreeMap::from([(month, total(2, 65_635))]));
        assert_eq!(conns.encode(), b"2026-11=2/65635");
        assert_eq!(ConnectionTotals::decode(&conns.encode()).unwrap(), conns);
        for bad in [&b"m=1"[..], b"m=1/x", b"0=1/1", b"32=1/1", b"x=1/1", b"m:1/1", b"\xff"] {
            assert!(UserTotals::decode(bad).is_err(), "{bad:?}");
        }
        assert!(ConnectionTotals::decode(b"m=1/1").is_err());
    }

    #[test]
    fn a_shortfall_is_fewer_segments_or_keys_never_more() {
        let total = |segments, keys| SegmentTotal { segments, keys };
        let written = BTreeMap::from([(UserCount::Mau, total(3, 100)), (UserCount::Dau(1), total(1, 10))]);
        let found = |mau, day| BTreeMap::from([(UserCount::Mau, mau), (UserCount::Dau(1), day)]);
        assert_eq!(shortfall(&written, &found(total(3, 100), total(1, 10))), None);
        assert_eq!(
            shortfall(&written, &found(total(5, 140), total(2, 20))),
            None,
            "more: a commit read in part"
        );
        assert_eq!(
            shortfall(&written, &found(total(2, 100), total(1, 10))),
            Some((UserCount::Mau, total(3, 100), total(2, 100)))
        );
        assert_eq!(
            shortfall(&written, &found(total(3, 100), total(1, 9))),
            Some((UserCount::Dau(1), total(1, 10), total(1, 9)))
        );
        assert_eq!(
            shortfall(&written, &BTreeMap::from([(UserCount::Mau, total(3, 100))])),
            Some((UserCount::Dau(1), total(1, 10), SegmentTotal::default())),
            "a count with no segment left"
        );
    }
}
