//! The lifecycle of each persistent connection: connect, heartbeats, disconnect.
//!
//! A connection is counted for PCC once both its ends are known (`Closed` carries the
//! interval to the meter), or, while it is still open, by the meter when a month closes.
//! Everything here is idempotent and tolerant of order (SPEC §2.1): a retried `connect` or
//! `disconnect` changes nothing, a `disconnect` may arrive before its `connect`, and a
//! connection that already counted is remembered (as a tombstone) so late retries of its
//! events stay harmless. When two `connect`s (or `disconnect`s) of one open connection
//! disagree on the time, the earliest wins, which keeps the result independent of order.
//!
//! Checkpoints ([`ConnectionTable::take_changes`]) write a connection that is still
//! pending as one record of its own, since it may change again, but counted connections
//! only in bulk: those counted since the last checkpoint go into new, immutable *segments*
//! of up to [`SEGMENT_LEN`] tombstones, and a connection that opened and closed between two
//! checkpoints never gets a record of its own. A segment is deleted once the month of its
//! latest tombstone is closed. Why: one changelog record per connection made the
//! changelog, not the events, the worker's bottleneck (a record per four events).

use std::collections::BTreeMap;

use rustc_hash::{FxHashMap, FxHashSet};
use serde::{Deserialize, Serialize};

use crate::ingest::ConnKey;
use crate::plan::AppId;
use crate::time::Timestamp;

/// What is known about one connection (opaque outside this module; see [`ConnRecord`]).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum Conn {
    /// Not yet counted: at least one of its events was seen.
    Pending { connected: Option<Timestamp>, disconnected: Option<Timestamp>, last_seen: Timestamp },
    /// Counted over an interval ending at `until`; kept only to absorb retries.
    Counted { until: Timestamp },
}

/// A connection's span `[from, until)`, ready to be counted.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Interval {
    /// The app.
    pub app_id: AppId,
    /// Connect time.
    pub from: Timestamp,
    /// Disconnect time (or last-seen time for an idle-closed connection).
    pub until: Timestamp,
}

/// The effect of one connection event.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ConnEffect {
    /// Nothing changed that counts: the event repeats one already known.
    Duplicate,
    /// Recorded; nothing to count yet.
    Recorded,
    /// The connection is now complete and must be counted over this interval.
    Closed(Interval),
}

/// One connection's state, as checkpointed.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct ConnRecord(Conn);

/// Version byte of an encoded [`ConnRecord`].
const CONN_FORMAT_VERSION: u8 = 1;

impl ConnRecord {
    /// The record's bytes: a version byte and the postcard encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![CONN_FORMAT_VERSION];
        out.extend(postcard::to_allocvec(&self.0).expect("connection states always serialize"));
        out
    }

    /// Reads a record written by [`ConnRecord::encode`].
    pub fn decode(bytes: &[u8]) -> Result<Self, super::CodecError> {
        match bytes.split_first() {
            Some((&CONN_FORMAT_VERSION, payload)) => postcard::from_bytes(payload)
                .map(ConnRecord)
                .map_err(|e| super::CodecError::Corrupt(e.to_string())),
            Some((&version, _)) => Err(super::CodecError::UnknownVersion(version)),
            None => Err(super::CodecError::Corrupt("empty connection record".into())),
        }
    }
}

/// Most tombstones in one segment: 24 bytes each, so a segment stays far below Kafka's
/// default 1 MB record limit.
pub const SEGMENT_LEN: usize = 8_192;

/// Version byte of an encoded segment.
const SEGMENT_FORMAT_VERSION: u8 = 1;

/// Bytes of one tombstone in a segment: app, connection, end (little-endian 64-bit each).
const TOMBSTONE_BYTES: usize = 24;

/// What a checkpoint writes for the connections: single records (`None` deletes one) and
/// segments of counted connections (`None` deletes one), each sorted by key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnChanges {
    /// Pending connections, and deletions of records no longer needed.
    pub records: Vec<((AppId, ConnKey), Option<ConnRecord>)>,
    /// New segments (encoded) and deleted ones, by sequence number.
    pub segments: Vec<(u64, Option<Vec<u8>>)>,
}

/// Every connection of the apps one meter owns.
#[derive(Clone, Debug, Default)]
pub struct ConnectionTable {
    conns: FxHashMap<(AppId, ConnKey), Conn>,
    /// Connections changed (or forgotten) since the last [`ConnectionTable::take_changes`]:
    /// pending ones that changed, ones counted since, and forgotten ones.
    changed: FxHashSet<(AppId, ConnKey)>,
    /// Connections with a record of their own in the changelog.
    recorded: FxHashSet<(AppId, ConnKey)>,
    /// Segments in the changelog: sequence number → end of its latest connection.
    segments: BTreeMap<u64, Timestamp>,
    /// Segments to delete at the next checkpoint.
    dropped_segments: Vec<u64>,
    /// The number of the next segment: never reused while the table lives (a number
    /// reused after a restart follows its deletion in the changelog, which is fine).
    next_segment: u64,
}

impl ConnectionTable {
    /// Number of connections known (open, pending or remembered).
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// Whether no connection is known.
    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// The connection's entry (a new, empty one first seen at `ts` if unknown), marked as
    /// changed for the next checkpoint unless it has counted already (then nothing can
    /// change it).
    fn touch(&mut self, app_id: AppId, conn: ConnKey, ts: Timestamp) -> &mut Conn {
        let entry = self.conns.entry((app_id, conn)).or_insert(Conn::Pending {
            connected: None,
            disconnected: None,
            last_seen: ts,
        });
        if !matches!(entry, Conn::Counted { .. }) {
            self.changed.insert((app_id, conn));
        }
        entry
    }

    /// A `connect` event.
    pub fn connect(&mut self, app_id: AppId, conn: ConnKey, ts: Timestamp) -> ConnEffect {
        let entry = self.touch(app_id, conn, ts);
        match entry {
            Conn::Counted { .. } => ConnEffect::Duplicate,
            Conn::Pending { connected: Some(t0), last_seen, .. } => {
                *t0 = (*t0).min(ts);
                *last_seen = (*last_seen).max(ts);
                ConnEffect::Duplicate
            }
            Conn::Pending { connected: None, disconnected: Some(t1), .. } => {
                let interval = Interval { app_id, from: ts, until: *t1 };
                *entry = Conn::Counted { until: *t1 };
                ConnEffect::Closed(interval)
            }
            Conn::Pending { connected: connected @ None, disconnected: None, last_seen } => {
                *connected = Some(ts);
                *last_seen = (*last_seen).max(ts);
                ConnEffect::Recorded
            }
        }
    }

    /// A `disconnect` event.
    pub fn disconnect(&mut self, app_id: AppId, conn: ConnKey, ts: Timestamp) -> ConnEffect {
        let entry = self.touch(app_id, conn, ts);
        match entry {
            Conn::Counted { .. } => ConnEffect::Duplicate,
            Conn::Pending { connected: Some(t0), .. } => {
                let interval = Interval { app_id, from: *t0, until: ts };
                *entry = Conn::Counted { until: ts };
                ConnEffect::Closed(interval)
            }
            Conn::Pending { connected: None, disconnected: Some(t1), .. } => {
                *t1 = (*t1).min(ts);
                ConnEffect::Duplicate
            }
            Conn::Pending { connected: None, disconnected: disconnected @ None, last_seen } => {
                *disconnected = Some(ts);
                *last_seen = (*last_seen).max(ts);
                ConnEffect::Recorded
            }
        }
    }

    /// A `heartbeat` event: the connection was alive at `ts`.
    pub fn heartbeat(&mut self, app_id: AppId, conn: ConnKey, ts: Timestamp) -> ConnEffect {
        // An unknown connection is remembered, so that a `connect` arriving later still
        // knows it was alive.
        match self.touch(app_id, conn, ts) {
            Conn::Counted { .. } => ConnEffect::Duplicate,
            Conn::Pending { last_seen, .. } => {
                *last_seen = (*last_seen).max(ts);
                ConnEffect::Recorded
            }
        }
    }

    /// Connections that are open (connected, no disconnect yet): `(app, connect time)`.
    pub fn open(&self) -> impl Iterator<Item = (AppId, Timestamp)> + '_ {
        self.conns.iter().filter_map(|(&(app_id, _), conn)| match conn {
            Conn::Pending { connected: Some(t0), disconnected: None, .. } => Some((app_id, *t0)),
            _ => None,
        })
    }

    /// Closes, at their last-seen time, open connections silent for at least `timeout`
    /// as of `now` (a gateway died and their disconnects were lost).
    pub fn expire_idle(&mut self, now: Timestamp, timeout_ms: i64) -> Vec<Interval> {
        let mut closed = Vec::new();
        for (&(app_id, key), conn) in self.conns.iter_mut() {
            if let Conn::Pending { connected: Some(t0), disconnected: None, last_seen } = *conn {
                if last_seen.millis().saturating_add(timeout_ms) <= now.millis() {
                    closed.push(Interval { app_id, from: t0, until: last_seen });
                    *conn = Conn::Counted { until: last_seen };
                    self.changed.insert((app_id, key));
                }
            }
        }
        // Map order is arbitrary; callers get a stable order.
        closed.sort_by_key(|i| (i.app_id, i.from, i.until));
        closed
    }

    /// Forgets what can no longer matter once every event before `cutoff` is late:
    /// tombstones of connections that ended before it, and disconnects or heartbeats
    /// before it whose `connect` never came (that `connect` would be late too).
    pub fn forget_before(&mut self, cutoff: Timestamp) {
        let changed = &mut self.changed;
        self.conns.retain(|key, conn| {
            let keep = Self::outlives(conn, cutoff);
            if !keep {
                changed.insert(*key);
            }
            keep
        });
        let gone: Vec<u64> = self.segments.iter().filter(|(_, &end)| end < cutoff).map(|(&s, _)| s).collect();
        for segment in gone {
            self.segments.remove(&segment);
            self.dropped_segments.push(segment);
        }
    }

    /// Whether a connection still matters once every event before `cutoff` is late.
    fn outlives(conn: &Conn, cutoff: Timestamp) -> bool {
        match *conn {
            Conn::Counted { until } => until >= cutoff,
            Conn::Pending { connected: None, last_seen, .. } => last_seen >= cutoff,
            Conn::Pending { connected: Some(_), .. } => true,
        }
    }

    /// What changed since the last call, as changelog writes: a record for every changed
    /// pending connection, the connections counted since in new segments (their own
    /// records, if they had any, deleted), and deletions for what was forgotten.
    pub fn take_changes(&mut self) -> ConnChanges {
        let mut keys: Vec<(AppId, ConnKey)> = self.changed.drain().collect();
        keys.sort_unstable();
        let mut changes = ConnChanges::default();
        let mut counted = Vec::new();
        for key in keys {
            match self.conns.get(&key) {
                Some(&conn @ Conn::Pending { .. }) => {
                    self.recorded.insert(key);
                    changes.records.push((key, Some(ConnRecord(conn))));
                    continue;
                }
                Some(&Conn::Counted { until }) => counted.push((key, until)),
                None => {}
            }
            if self.recorded.remove(&key) {
                changes.records.push((key, None));
            }
        }
        changes.segments.extend(self.dropped_segments.drain(..).map(|s| (s, None)));
        for chunk in counted.chunks(SEGMENT_LEN) {
            let end = chunk.iter().map(|&(_, until)| until).max().unwrap_or(Timestamp::MIN);
            let segment = self.next_segment;
            self.next_segment += 1;
            self.segments.insert(segment, end);
            changes.segments.push((segment, Some(encode_segment(chunk))));
        }
        changes.segments.sort_unstable_by_key(|&(s, _)| s);
        changes
    }

    /// Puts back a checkpointed connection (restoring; not a change).
    pub fn restore(&mut self, app_id: AppId, conn: ConnKey, record: ConnRecord) {
        self.recorded.insert((app_id, conn));
        self.conns.insert((app_id, conn), record.0);
    }

    /// Puts back a checkpointed segment of counted connections (restoring; not a change).
    /// A connection with a record of its own keeps it: the record is newer.
    pub fn restore_segment(&mut self, segment: u64, bytes: &[u8]) -> Result<(), super::CodecError> {
        let mut end = Timestamp::MIN;
        for (key, until) in decode_segment(bytes)? {
            end = end.max(until);
            self.conns.entry(key).or_insert(Conn::Counted { until });
        }
        self.segments.insert(segment, end);
        self.next_segment = self.next_segment.max(segment + 1);
        Ok(())
    }

    /// Ends a restore: drops what a live table had already forgotten by `cutoff` (a
    /// segment outlives some of its connections until its last one is forgotten).
    pub fn finish_restore(&mut self, cutoff: Option<Timestamp>) {
        if let Some(cutoff) = cutoff {
            self.conns.retain(|_, conn| Self::outlives(conn, cutoff));
        }
    }
}

/// A counted connection as a segment holds it: which one, and when it ended.
type Tombstone = ((AppId, ConnKey), Timestamp);

/// A segment's bytes: a version byte, then per connection its app, key and end.
fn encode_segment(tombstones: &[Tombstone]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + tombstones.len() * TOMBSTONE_BYTES);
    out.push(SEGMENT_FORMAT_VERSION);
    for &((app_id, conn), until) in tombstones {
        out.extend_from_slice(&app_id.to_le_bytes());
        out.extend_from_slice(&conn.0.to_le_bytes());
        out.extend_from_slice(&until.millis().to_le_bytes());
    }
    out
}

/// Reads a segment written by [`encode_segment`].
fn decode_segment(bytes: &[u8]) -> Result<Vec<Tombstone>, super::CodecError> {
    use super::CodecError;
    let (&version, body) = bytes.split_first().ok_or_else(|| CodecError::Corrupt("empty segment".into()))?;
    if version != SEGMENT_FORMAT_VERSION {
        return Err(CodecError::UnknownVersion(version));
    }
    if body.len() % TOMBSTONE_BYTES != 0 {
        return Err(CodecError::Corrupt(format!("segment of {} bytes", bytes.len())));
    }
    let word = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap_or_default());
    Ok(body
        .chunks_exact(TOMBSTONE_BYTES)
        .map(|t| ((word(&t[0..8]), ConnKey(word(&t[8..16]))), Timestamp(word(&t[16..24]) as i64)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const APP: AppId = 7;

    fn key(s: &str) -> ConnKey {
        ConnKey::of(s)
    }

    #[test]
    fn in_order_retried_and_reversed_events_give_one_interval() {
        let closed = ConnEffect::Closed(Interval { app_id: APP, from: Timestamp(10), until: Timestamp(50) });
        type Step = fn(&mut ConnectionTable, ConnKey) -> ConnEffect;
        let connect: Step = |t, c| t.connect(APP, c, Timestamp(10));
        let disconnect: Step = |t, c| t.disconnect(APP, c, Timestamp(50));
        for (first, second) in [(connect, disconnect), (disconnect, connect)] {
            let mut t = ConnectionTable::default();
            let c = key("a");
            assert_eq!(first(&mut t, c), ConnEffect::Recorded);
            assert_eq!(first(&mut t, c), ConnEffect::Duplicate, "a retry changes nothing");
            assert_eq!(second(&mut t, c), closed);
            assert_eq!(second(&mut t, c), ConnEffect::Duplicate);
            assert_eq!(first(&mut t, c), ConnEffect::Duplicate, "late retries stay harmless");
            assert_eq!(t.open().count(), 0);
        }
    }

    /// A changelog as compaction leaves it: the latest value of every key.
    #[derive(Default)]
    struct Changelog {
        records: BTreeMap<(AppId, ConnKey), ConnRecord>,
        segments: BTreeMap<u64, Vec<u8>>,
    }

    impl Changelog {
        fn commit(&mut self, changes: ConnChanges) {
            for (key, record) in changes.records {
                match record {
                    Some(r) => self.records.insert(key, r),
                    None => self.records.remove(&key),
                };
            }
            for (segment, bytes) in changes.segments {
                match bytes {
                    Some(b) => self.segments.insert(segment, b),
                    None => self.segments.remove(&segment),
                };
            }
        }

        fn restore(&self, cutoff: Option<Timestamp>) -> ConnectionTable {
            let mut t = ConnectionTable::default();
            for (&(app_id, conn), &record) in &self.records {
                t.restore(app_id, conn, record);
            }
            for (&segment, bytes) in &self.segments {
                t.restore_segment(segment, bytes).expect("our own segment");
            }
            t.finish_restore(cutoff);
            t
        }
    }

    #[test]
    fn counted_connections_are_checkpointed_in_segments_only() {
        let mut t = ConnectionTable::default();
        let mut log = Changelog::default();
        // Opened and closed between two checkpoints: no record of its own.
        t.connect(APP, key("short"), Timestamp(10));
        t.disconnect(APP, key("short"), Timestamp(20));
        // Still open at the checkpoint: a record, which goes when it counts.
        t.connect(APP, key("long"), Timestamp(10));
        let first = t.take_changes();
        assert_eq!(first.records, vec![((APP, key("long")), Some(ConnRecord(t.conns[&(APP, key("long"))])))]);
        assert_eq!(first.segments.len(), 1);
        log.commit(first);
        // Retries of a counted connection change nothing, so nothing is written for them.
        t.connect(APP, key("short"), Timestamp(10));
        t.heartbeat(APP, key("short"), Timestamp(15));
        assert_eq!(t.take_changes(), ConnChanges::default());
        t.disconnect(APP, key("long"), Timestamp(90));
        let second = t.take_changes();
        assert_eq!(second.records, vec![((APP, key("long")), None)]);
        assert_eq!(
            second.segments.iter().map(|(s, b)| (*s, b.is_some())).collect::<Vec<_>>(),
            vec![(1, true)]
        );
        log.commit(second);
        // Restored from the changelog, both are remembered: their retries stay harmless.
        let mut restored = log.restore(None);
        assert_eq!(restored.len(), 2);
        assert!(restored.take_changes() == ConnChanges::default(), "a restore is not a change");
        assert_eq!(restored.connect(APP, key("short"), Timestamp(10)), ConnEffect::Duplicate);
        assert_eq!(restored.disconnect(APP, key("long"), Timestamp(90)), ConnEffect::Duplicate);
    }

    #[test]
    fn segments_go_when_their_last_connection_is_forgotten() {
        let mut t = ConnectionTable::default();
        let mut log = Changelog::default();
        let closed = |t: &mut ConnectionTable, name: &str, until: i64| {
            t.connect(APP, key(name), Timestamp(0));
            t.disconnect(APP, key(name), Timestamp(until));
        };
        closed(&mut t, "early", 100);
        log.commit(t.take_changes());
        closed(&mut t, "early-2", 100);
        closed(&mut t, "late", 1_000);
        log.commit(t.take_changes());
        assert_eq!(log.segments.len(), 2);
        t.forget_before(Timestamp(500));
        assert_eq!(t.len(), 1);
        log.commit(t.take_changes());
        // The first segment is gone; the second stays for its late connection, and a
        // restore forgets its early one again.
        assert_eq!(log.segments.keys().copied().collect::<Vec<_>>(), vec![1]);
        let restored = log.restore(Some(Timestamp(500)));
        assert_eq!(restored.len(), 1);
        assert_eq!(restored.conns.get(&(APP, key("late"))), Some(&Conn::Counted { until: Timestamp(1_000) }));
        // A forgotten connection's id used again is a new connection, with its own record.
        t.connect(APP, key("early"), Timestamp(600));
        log.commit(t.take_changes());
        assert_eq!(log.restore(Some(Timestamp(500))).open().collect::<Vec<_>>(), vec![(APP, Timestamp(600))]);
    }

    #[test]
    fn many_counted_connections_split_into_segments_that_round_trip() {
        let mut t = ConnectionTable::default();
        let n = SEGMENT_LEN + 10;
        for i in 0..n {
            t.connect(APP, ConnKey(i as u64), Timestamp(i as i64));
            t.disconnect(APP, ConnKey(i as u64), Timestamp(i as i64 + 5));
        }
        let changes = t.take_changes();
        let sizes: Vec<usize> = changes
            .segments
            .iter()
            .map(|(_, b)| decode_segment(b.as_deref().unwrap()).unwrap().len())
            .collect();
        assert_eq!(sizes, vec![SEGMENT_LEN, 10]);
        let mut log = Changelog::default();
        log.commit(changes);
        assert_eq!(log.restore(None).len(), n);
        for bad in [&[][..], &[2], &[SEGMENT_FORMAT_VERSION, 1, 2, 3]] {
            assert!(decode_segment(bad).is_err());
        }
    }

    #[test]
    fn idle_connections_close_at_their_last_sign_of_life() {
        let mut t = ConnectionTable::default();
        t.connect(APP, key("a"), Timestamp(0));
        t.heartbeat(APP, key("a"), Timestamp(1_000));
        t.connect(APP, key("b"), Timestamp(0));
        t.heartbeat(APP, key("b"), Timestamp(9_000));
        let closed = t.expire_idle(Timestamp(10_000), 5_000);
        assert_eq!(closed, vec![Interval { app_id: APP, from: Timestamp(0), until: Timestamp(1_000) }]);
        assert_eq!(t.open().collect::<Vec<_>>(), vec![(APP, Timestamp(0))]);
        // A heartbeat after the idle close is a late retry: ignored.
        assert_eq!(t.heartbeat(APP, key("a"), Timestamp(11_000)), ConnEffect::Duplicate);
        t.forget_before(Timestamp(5_000));
        assert_eq!(t.len(), 1);
    }
}
