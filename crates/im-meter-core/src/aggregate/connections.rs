//! The lifecycle of each persistent connection: connect, heartbeats, disconnect.
//!
//! A connection is counted for PCC once both its ends are known (`Closed` carries the
//! interval to the meter), or, while it is still open, by the meter when a month closes.
//! Everything here is idempotent and tolerant of order (SPEC §2.1): a retried `connect` or
//! `disconnect` changes nothing, a `disconnect` may arrive before its `connect`, and a
//! connection that already counted is remembered so late retries of its events stay
//! harmless. When two `connect`s (or `disconnect`s) of one connection disagree on the time,
//! the earliest wins, whichever arrives first — also after the connection counted: a
//! counted connection's span stays open to correction by an earlier-dated copy until the
//! month of its end closes ([`ConnEffect::Corrected`]), so the result is independent of
//! order.
//!
//! **Pending and counted connections.** A connection not counted yet is kept whole, by app
//! and connection key. A counted one is kept only to absorb retries and corrections until
//! the month of its end closes, as a 64-bit hash of its app and connection key
//! ([`counted_key`]) with its span in whole seconds ([`Span`]), in a hash map per month of its
//! end: about 18–37 bytes each instead of a full entry, and forgetting a closed month drops
//! its map whole. Two connections whose hashes collide look the same: with *n* counted
//! connections the expected number of colliding pairs is about n²/2⁶⁵ (3·10⁻⁸ for a
//! million), and a collision can only make a new connection look like a retry of a counted
//! one (it is then not counted, or corrects the other).
//!
//! **Checkpoints** ([`ConnectionTable::take_changes`]) write a pending connection as one
//! record of its own, since it may change again, but counted connections only in bulk:
//! those counted (or corrected) since the last checkpoint go into new, immutable *segments*
//! — one month's hashes with their spans, sorted, at most [`MAX_SEGMENT_BYTES`] encoded —
//! and a connection that opened and closed between two checkpoints never gets a record of
//! its own. A corrected connection's new span is written again, in a later segment; a merge
//! and a restore keep the least span of a key, which is the latest (a correction only ever
//! moves an end earlier). Segments are
//! merged size-tiered ([`super::segments`]): a month of N counted connections leaves about
//! N / [`SEGMENT_CAPACITY`] full segments plus at most `MERGE_FANOUT − 1` per tier, and
//! every hash is rewritten about once per tier (eight tiers). A month's segments are deleted
//! when it closes. Why: one changelog record per connection made the changelog, not the events,
//! the worker's bottleneck (a record per four events), and one segment per checkpoint
//! left millions of small records for a restore to read.
//!
//! The keys of the segments not full yet stay in memory too (a merge needs them): at most
//! about 260,000 hashes a month, whatever N.

use std::collections::BTreeMap;

use rustc_hash::{FxHashMap, FxHashSet};
use serde::{Deserialize, Serialize};

use super::codec::CodecError;
use super::segments::{SegmentWrites, Segments};
use super::totals::ConnectionTotals;
use crate::ingest::ConnKey;
use crate::plan::AppId;
use crate::time::{BillingTz, DayCache, Month, Timestamp};

/// A connection not counted yet: at least one of its events was seen.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
struct Pending {
    connected: Option<Timestamp>,
    disconnected: Option<Timestamp>,
    last_seen: Timestamp,
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
    /// An earlier-dated copy of a counted connection's `connect` or `disconnect`: it counts
    /// over `now` instead of `was` (in the months still open).
    Corrected {
        /// The span it was counted over.
        was: Interval,
        /// The span it counts over now.
        now: Interval,
    },
}

/// A counted connection's span `[from, until)` in whole seconds since 2000-01-01 UTC, rounded
/// up: the same sample instants as the milliseconds (sample intervals are whole seconds, and
/// rounding up twice is rounding up once), in half the bytes. Event times lie in [2000,
/// 2100), under 2³² seconds from its start.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Span {
    from: u32,
    until: u32,
}

/// 2000-01-01T00:00:00Z in Unix milliseconds.
const SPAN_EPOCH_MS: i64 = 946_684_800_000;

impl Span {
    /// The span of a connection counted from a segment that did not say it (formats 1 and
    /// 2): it absorbs retries but cannot be corrected.
    const UNKNOWN: Span = Span { from: u32::MAX, until: u32::MAX };

    fn of(from: Timestamp, until: Timestamp) -> Self {
        Span { from: Self::second(from), until: Self::second(until) }
    }

    fn second(ts: Timestamp) -> u32 {
        let ms = ts.millis().saturating_sub(SPAN_EPOCH_MS).max(0) as u64;
        ms.div_ceil(1000).min(u64::from(u32::MAX - 1)) as u32
    }

    fn instant(second: u32) -> Timestamp {
        Timestamp(SPAN_EPOCH_MS + i64::from(second) * 1000)
    }

    fn interval(self, app_id: AppId) -> Interval {
        Interval { app_id, from: Self::instant(self.from), until: Self::instant(self.until) }
    }
}

/// A counted connection as its month's segments hold it: its key and span.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct CountedEntry {
    key: u64,
    span: Span,
}

impl super::segments::Entry for CountedEntry {
    fn key(&self) -> u64 {
        self.key
    }
}

/// A pending connection's state, as checkpointed.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct ConnRecord(Pending);

/// The layout of a format-1 record: the table's state type of the time, whose `Counted`
/// variant was never written to a record (counted connections go to segments).
#[derive(Serialize, Deserialize)]
enum RecordV1 {
    Pending { connected: Option<Timestamp>, disconnected: Option<Timestamp>, last_seen: Timestamp },
    Counted { until: Timestamp },
}

/// Version byte of an encoded [`ConnRecord`].
const CONN_FORMAT_VERSION: u8 = 1;

impl ConnRecord {
    /// The record's bytes: a version byte and the postcard encoding.
    pub fn encode(&self) -> Vec<u8> {
        let Pending { connected, disconnected, last_seen } = self.0;
        let mut out = vec![CONN_FORMAT_VERSION];
        out.extend(
            postcard::to_allocvec(&RecordV1::Pending { connected, disconnected, last_seen })
                .expect("connection states always serialize"),
        );
        out
    }

    /// Reads a record written by [`ConnRecord::encode`].
    pub fn decode(bytes: &[u8]) -> Result<Self, CodecError> {
        match bytes.split_first() {
            Some((&CONN_FORMAT_VERSION, payload)) => {
                match postcard::from_bytes(payload).map_err(|e| CodecError::Corrupt(e.to_string()))? {
                    RecordV1::Pending { connected, disconnected, last_seen } => {
                        Ok(ConnRecord(Pending { connected, disconnected, last_seen }))
                    }
                    RecordV1::Counted { .. } => {
                        Err(CodecError::Corrupt("a counted connection in a record of its own".into()))
                    }
                }
            }
            Some((&version, _)) => Err(CodecError::UnknownVersion(version)),
            None => Err(CodecError::Corrupt("empty connection record".into())),
        }
    }
}

/// Largest encoded segment: half the broker's default record limit (1 MB), so a segment
/// always fits with room to spare.
pub const MAX_SEGMENT_BYTES: usize = 512 * 1024;

/// Bytes before a segment's entries: the version byte, the year (i32) and the month (u8).
const SEGMENT_HEADER_BYTES: usize = 6;

/// Bytes of one connection in a segment: its hash (u64) and span (two u32).
const ENTRY_BYTES: usize = 16;

/// Most connections in one segment: 32,767.
pub const SEGMENT_CAPACITY: usize = (MAX_SEGMENT_BYTES - SEGMENT_HEADER_BYTES) / ENTRY_BYTES;

/// Version byte of an encoded segment: 3 holds one month's sorted hashes with their spans;
/// 2 held the hashes only, 1 app, connection and end time per connection, of any months
/// (both still read).
const SEGMENT_FORMAT_VERSION: u8 = 3;

/// Version 2 of the segment format.
const SEGMENT_FORMAT_V2: u8 = 2;

/// Version 1 of the segment format.
const SEGMENT_FORMAT_V1: u8 = 1;

/// Bytes of one connection in a version-1 segment: app, connection, end (64-bit LE each).
const V1_TOMBSTONE_BYTES: usize = 24;

/// What a checkpoint writes for the connections: single records (`None` deletes one) and
/// segments of counted connections (`None` deletes one), each sorted by key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnChanges {
    /// Pending connections, and deletions of records no longer needed.
    pub records: Vec<((AppId, ConnKey), Option<ConnRecord>)>,
    /// New segments (encoded) and deleted ones, by sequence number.
    pub segments: SegmentWrites,
    /// Each month's segments and connections in them, when any segment changed: to write
    /// after the new segments and before the deletions ([`super::totals`]).
    pub totals: Option<ConnectionTotals>,
}

/// The key a counted connection is remembered by: xxh3-64 of its app and connection key
/// (16 little-endian bytes), a fixed hash, since segments persist it.
pub fn counted_key(app_id: AppId, conn: ConnKey) -> u64 {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&app_id.to_le_bytes());
    bytes[8..].copy_from_slice(&conn.0.to_le_bytes());
    xxhash_rust::xxh3::xxh3_64(&bytes)
}

/// The counted connections whose end lies in one month, and the segments holding them.
#[derive(Clone, Debug, Default)]
struct CountedMonth {
    /// Every one of them, by [`counted_key`], with its span: what lookups ask.
    keys: FxHashMap<u64, Span>,
    /// Those counted or corrected since the last checkpoint, not in a segment as they are
    /// now.
    fresh: Vec<CountedEntry>,
    /// The segments holding the others (their keys are in `keys` too).
    segments: Segments<CountedEntry>,
}

/// Every connection of the apps one meter owns.
#[derive(Clone, Debug)]
pub struct ConnectionTable {
    /// The month of an instant (counted connections are kept by the month of their end).
    days: DayCache,
    /// Connections not counted yet.
    pending: FxHashMap<(AppId, ConnKey), Pending>,
    /// Counted connections by the month of their end (or the first open month, for one
    /// that ended in a month already closed).
    counted: BTreeMap<Month, CountedMonth>,
    /// Version-1 segments read by a restore: number → latest month of its connections.
    /// Never merged; deleted when that month closes.
    legacy: BTreeMap<u64, Month>,
    /// The latest month closed ([`ConnectionTable::forget_through`]).
    closed: Option<Month>,
    /// Pending connections changed (or gone) since the last [`ConnectionTable::take_changes`].
    changed: FxHashSet<(AppId, ConnKey)>,
    /// Whether changes are noted: from the first checkpoint (or a restore) on. Before it,
    /// everything held is new; a table never checkpointed (replay) notes nothing.
    tracking: bool,
    /// Connections with a record of their own in the changelog.
    recorded: FxHashSet<(AppId, ConnKey)>,
    /// Segments to delete at the next checkpoint.
    dropped_segments: Vec<u64>,
    /// The number of the next segment: never reused while the table lives (a number
    /// reused after a restart follows its deletion in the changelog, which is fine).
    next_segment: u64,
}

/// Whether a counted connection has this key.
fn is_counted(counted: &BTreeMap<Month, CountedMonth>, key: u64) -> bool {
    // One map per open month holding counted connections: one or two in the worker.
    counted.values().any(|month| month.keys.contains_key(&key))
}

impl ConnectionTable {
    /// An empty table, whose months are calendar months in `tz`.
    pub fn new(tz: BillingTz) -> Self {
        ConnectionTable {
            days: DayCache::new(tz),
            pending: FxHashMap::default(),
            counted: BTreeMap::new(),
            legacy: BTreeMap::new(),
            closed: None,
            changed: FxHashSet::default(),
            tracking: false,
            recorded: FxHashSet::default(),
            dropped_segments: Vec::new(),
            next_segment: 0,
        }
    }

    /// Number of connections known (pending or counted).
    pub fn len(&self) -> usize {
        self.pending.len() + self.counted_len()
    }

    /// Number of counted connections remembered.
    pub fn counted_len(&self) -> usize {
        self.counted.values().map(|month| month.keys.len()).sum()
    }

    /// Whether no connection is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The pending connection's entry (a new, empty one first seen at `ts` if unknown),
    /// marked as changed for the next checkpoint; `None` if it has counted already (then
    /// nothing can change it).
    fn touch(&mut self, app_id: AppId, conn: ConnKey, ts: Timestamp) -> Option<&mut Pending> {
        use std::collections::hash_map::Entry;
        let entry = match self.pending.entry((app_id, conn)) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(_) if is_counted(&self.counted, counted_key(app_id, conn)) => return None,
            Entry::Vacant(entry) => {
                entry.insert(Pending { connected: None, disconnected: None, last_seen: ts })
            }
        };
        if self.tracking {
            self.changed.insert((app_id, conn));
        }
        Some(entry)
    }

    /// Moves a pending connection to the counted ones, counted over `interval`.
    fn count(&mut self, conn: ConnKey, interval: Interval) {
        let Interval { app_id, from, until } = interval;
        self.pending.remove(&(app_id, conn));
        if self.tracking {
            self.changed.insert((app_id, conn));
        }
        let mut month = self.days.day_of(until).month();
        if let Some(closed) = self.closed.filter(|&closed| month <= closed) {
            // Its month is closed, but a retry dated later must still find it.
            month = closed.next();
        }
        let entry = CountedEntry { key: counted_key(app_id, conn), span: Span::of(from, until) };
        let counted = self.counted.entry(month).or_default();
        if counted.keys.insert(entry.key, entry.span).is_none() && self.tracking {
            counted.fresh.push(entry);
        }
    }

    /// A `connect` (at `connected`) or `disconnect` (at `disconnected`) of a counted
    /// connection: an earlier-dated copy moves its end there (each end the earliest of its
    /// copies); any other is a duplicate. `None` if it has not counted.
    fn correct(
        &mut self,
        app_id: AppId,
        conn: ConnKey,
        connected: Option<Timestamp>,
        disconnected: Option<Timestamp>,
    ) -> Option<ConnEffect> {
        let key = counted_key(app_id, conn);
        let tracking = self.tracking;
        let counted = self.counted.values_mut().find(|month| month.keys.contains_key(&key))?;
        let span = counted.keys.get_mut(&key)?;
        let was = *span;
        if was == Span::UNKNOWN {
            // Counted before spans were kept: as before, a retry changes nothing.
            return Some(ConnEffect::Duplicate);
        }
        span.from = span.from.min(connected.map_or(u32::MAX, Span::second));
        span.until = span.until.min(disconnected.map_or(u32::MAX, Span::second));
        let now = *span;
        if now == was {
            return Some(ConnEffect::Duplicate);
        }
        // Kept under the month of its first end (a later month), so it is remembered at
        // least as long as before.
        if tracking {
            counted.fresh.push(CountedEntry { key, span: now });
        }
        Some(ConnEffect::Corrected { was: was.interval(app_id), now: now.interval(app_id) })
    }

    /// A `connect` event.
    pub fn connect(&mut self, app_id: AppId, conn: ConnKey, ts: Timestamp) -> ConnEffect {
        let Some(entry) = self.touch(app_id, conn, ts) else {
            return self.correct(app_id, conn, Some(ts), None).unwrap_or(ConnEffect::Duplicate);
        };
        match entry {
            Pending { connected: Some(t0), last_seen, .. } => {
                *t0 = (*t0).min(ts);
                *last_seen = (*last_seen).max(ts);
                ConnEffect::Duplicate
            }
            Pending { connected: None, disconnected: Some(t1), .. } => {
                let interval = Interval { app_id, from: ts, until: *t1 };
                self.count(conn, interval);
                ConnEffect::Closed(interval)
            }
            Pending { connected: connected @ None, disconnected: None, last_seen } => {
                *connected = Some(ts);
                *last_seen = (*last_seen).max(ts);
                ConnEffect::Recorded
            }
        }
    }

    /// A `disconnect` event.
    pub fn disconnect(&mut self, app_id: AppId, conn: ConnKey, ts: Timestamp) -> ConnEffect {
        let Some(entry) = self.touch(app_id, conn, ts) else {
            return self.correct(app_id, conn, None, Some(ts)).unwrap_or(ConnEffect::Duplicate);
        };
        match entry {
            Pending { connected: Some(t0), .. } => {
                let interval = Interval { app_id, from: *t0, until: ts };
                self.count(conn, interval);
                ConnEffect::Closed(interval)
            }
            Pending { connected: None, disconnected: Some(t1), .. } => {
                *t1 = (*t1).min(ts);
                ConnEffect::Duplicate
            }
            Pending { connected: None, disconnected: disconnected @ None, last_seen } => {
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
            None => ConnEffect::Duplicate,
            Some(Pending { last_seen, .. }) => {
                *last_seen = (*last_seen).max(ts);
                ConnEffect::Recorded
            }
        }
    }

    /// Connections that are open (connected, no disconnect yet): `(app, connect time)`.
    pub fn open(&self) -> impl Iterator<Item = (AppId, Timestamp)> + '_ {
        self.pending.iter().filter_map(|(&(app_id, _), conn)| match conn {
            Pending { connected: Some(t0), disconnected: None, .. } => Some((app_id, *t0)),
            _ => None,
        })
    }

    /// The disconnects dated in `[from, until)` whose connect never came: app, time and
    /// connection.
    pub fn unpaired_disconnects(
        &self,
        from: Timestamp,
        until: Timestamp,
    ) -> Vec<(AppId, Timestamp, ConnKey)> {
        let mut unpaired: Vec<(AppId, Timestamp, ConnKey)> = self
            .pending
            .iter()
            .filter_map(|(&(app_id, conn), p)| match *p {
                Pending { connected: None, disconnected: Some(t1), .. } if from <= t1 && t1 < until => {
                    Some((app_id, t1, conn))
                }
                _ => None,
            })
            .collect();
        // Map order is arbitrary; callers get a stable order.
        unpaired.sort_unstable();
        unpaired
    }

    /// Closes, at their last-seen time, open connections silent for at least `timeout`
    /// as of `now` (a gateway died and their disconnects were lost).
    pub fn expire_idle(&mut self, now: Timestamp, timeout_ms: i64) -> Vec<Interval> {
        let mut closed: Vec<(ConnKey, Interval)> = self
            .pending
            .iter()
            .filter_map(|(&(app_id, conn), p)| match *p {
                Pending { connected: Some(from), disconnected: None, last_seen }
                    if last_seen.millis().saturating_add(timeout_ms) <= now.millis() =>
                {
                    Some((conn, Interval { app_id, from, until: last_seen }))
                }
                _ => None,
            })
            .collect();
        // Map order is arbitrary; callers get a stable order.
        closed.sort_by_key(|&(conn, i)| (i.app_id, i.from, i.until, conn));
        for &(conn, interval) in &closed {
            self.count(conn, interval);
        }
        closed.into_iter().map(|(_, interval)| interval).collect()
    }

    /// Ends the open connections connected before `before` whose app `ends` names: they
    /// are dropped, neither counted nor remembered here (their records are deleted at the
    /// next checkpoint), so a later event of theirs is that of an unknown connection.
    /// Returns them, by app and connection, sorted (the caller hands them over).
    pub fn end_open(
        &mut self,
        before: Timestamp,
        mut ends: impl FnMut(AppId) -> bool,
    ) -> Vec<(AppId, ConnKey)> {
        let (changed, tracking) = (&mut self.changed, self.tracking);
        let mut ended = Vec::new();
        self.pending.retain(|&(app_id, conn), p| {
            let open_before =
                matches!(*p, Pending { connected: Some(t0), disconnected: None, .. } if t0 < before);
            let end = open_before && ends(app_id);
            if end {
                ended.push((app_id, conn));
                if tracking {
                    changed.insert((app_id, conn));
                }
            }
            !end
        });
        ended.sort_unstable();
        ended
    }

    /// Forgets what can no longer matter once `month` is closed (every event dated in it
    /// or before is late): the counted connections that ended in it or before (their
    /// segments are deleted at the next checkpoint), and disconnects or heartbeats dated
    /// before its end whose `connect` never came (that `connect` would be late too).
    pub fn forget_through(&mut self, month: Month) {
        self.closed = self.closed.max(Some(month));
        let cutoff = self.days.tz().end_of_month(month);
        let (changed, tracking) = (&mut self.changed, self.tracking);
        self.pending.retain(|key, conn| {
            let keep = Self::outlives(conn, cutoff);
            if !keep && tracking {
                changed.insert(*key);
            }
            keep
        });
        let open = self.counted.split_off(&month.next());
        for (_, gone) in std::mem::replace(&mut self.counted, open) {
            self.dropped_segments.extend(gone.segments.numbers());
        }
        let dropped = &mut self.dropped_segments;
        self.legacy.retain(|&segment, &mut latest| {
            let keep = latest > month;
            if !keep {
                dropped.push(segment);
            }
            keep
        });
    }

    /// Whether a pending connection still matters once every event before `cutoff` is late.
    fn outlives(conn: &Pending, cutoff: Timestamp) -> bool {
        match *conn {
            Pending { connected: None, last_seen, .. } => last_seen >= cutoff,
            Pending { connected: Some(_), .. } => true,
        }
    }

    /// What changed since the last call, as changelog writes: a record for every changed
    /// pending connection (a deletion for one counted or forgotten since), the connections
    /// counted since in new segments, merged segments and the deletion of those they
    /// replace, and deletions of the segments of closed months.
    pub fn take_changes(&mut self) -> ConnChanges {
        if !std::mem::replace(&mut self.tracking, true) {
            // The first checkpoint: everything held is new.
            self.changed.extend(self.pending.keys().copied());
            for counted in self.counted.values_mut() {
                counted.fresh.extend(counted.keys.iter().map(|(&key, &span)| CountedEntry { key, span }));
            }
        }
        let mut keys: Vec<(AppId, ConnKey)> = self.changed.drain().collect();
        keys.sort_unstable();
        let mut changes = ConnChanges::default();
        for key in keys {
            if let Some(&conn) = self.pending.get(&key) {
                self.recorded.insert(key);
                changes.records.push((key, Some(ConnRecord(conn))));
            } else if self.recorded.remove(&key) {
                changes.records.push((key, None));
            }
        }
        changes.segments.extend(self.dropped_segments.drain(..).map(|s| (s, None)));
        for (&month, counted) in self.counted.iter_mut() {
            counted.checkpoint(month, &mut self.next_segment, &mut changes.segments);
        }
        changes.segments.sort_unstable_by_key(|&(s, _)| s);
        if !changes.segments.is_empty() {
            changes.totals = Some(self.segment_totals());
        }
        changes
    }

    /// Each month's segments of counted connections, and the connections they hold (the
    /// months with any; version-1 segments, which hold several months, are not counted).
    pub fn segment_totals(&self) -> ConnectionTotals {
        ConnectionTotals(
            self.counted
                .iter()
                .map(|(&month, counted)| (month, counted.segments.total()))
                .filter(|(_, total)| total.segments > 0)
                .collect(),
        )
    }

    /// Puts back a checkpointed pending connection (restoring; not a change).
    pub fn restore(&mut self, app_id: AppId, conn: ConnKey, record: ConnRecord) {
        self.recorded.insert((app_id, conn));
        self.pending.insert((app_id, conn), record.0);
    }

    /// Puts back a checkpointed segment of counted connections (restoring; not a change).
    pub fn restore_segment(&mut self, segment: u64, bytes: &[u8]) -> Result<(), CodecError> {
        match decode_segment(bytes)? {
            Segment::Month { month, entries } => {
                let counted = self.counted.entry(month).or_default();
                for entry in &entries {
                    // A corrected connection is in a later segment again, with an earlier
                    // end or start: the least of each is the latest.
                    let span = counted.keys.entry(entry.key).or_insert(entry.span);
                    *span = Span {
                        from: span.from.min(entry.span.from),
                        until: span.until.min(entry.span.until),
                    };
                }
                // A full segment's keys are in `keys` already.
                counted.segments.restore(segment, entries.into_boxed_slice(), SEGMENT_CAPACITY);
            }
            Segment::V1(tombstones) => {
                let mut latest = None;
                for ((app_id, conn), until) in tombstones {
                    let month = self.days.day_of(until).month();
                    latest = latest.max(Some(month));
                    self.counted
                        .entry(month)
                        .or_default()
                        .keys
                        .insert(counted_key(app_id, conn), Span::UNKNOWN);
                }
                if let Some(latest) = latest {
                    self.legacy.insert(segment, latest);
                }
            }
        }
        self.next_segment = self.next_segment.max(segment + 1);
        Ok(())
    }

    /// Ends a restore, `closed` being the latest month closed: drops what a live table had
    /// already forgotten (a version-1 segment outlives some of its connections until its
    /// last one is forgotten).
    pub fn finish_restore(&mut self, closed: Option<Month>) {
        // Restored state is what the changelog holds: changes are noted from here on.
        self.tracking = true;
        self.closed = closed;
        if let Some(closed) = closed {
            let cutoff = self.days.tz().end_of_month(closed);
            self.pending.retain(|_, conn| Self::outlives(conn, cutoff));
            self.counted = self.counted.split_off(&closed.next());
        }
    }
}

impl CountedMonth {
    /// Writes what was counted since the last checkpoint into new segments, merging them
    /// as [`Segments::checkpoint`] does. Writes go to `out`.
    fn checkpoint(&mut self, month: Month, next_segment: &mut u64, out: &mut SegmentWrites) {
        let mut fresh = std::mem::take(&mut self.fresh);
        // A connection counted and corrected since the last checkpoint: its least span is
        // the one it has now.
        fresh.sort_unstable();
        fresh.dedup_by_key(|entry| entry.key);
        let encode = |entries: &[CountedEntry]| encode_segment(month, entries);
        // A full segment's keys stay in `keys`, for lookups.
        self.segments.checkpoint(fresh, SEGMENT_CAPACITY, next_segment, &encode, out, &mut |_| {});
    }
}

/// A decoded segment.
enum Segment {
    /// Versions 2 and 3: one month's counted connections, sorted by key (version 2 without
    /// their spans: [`Span::UNKNOWN`]).
    Month { month: Month, entries: Vec<CountedEntry> },
    /// Version 1: app, connection and end of each.
    V1(Vec<((AppId, ConnKey), Timestamp)>),
}

/// A segment's bytes: the version byte, the month (year as i32, month number as u8), then
/// the entries sorted by key, each the key (u64) and the span's start and end (u32), all
/// little-endian.
fn encode_segment(month: Month, entries: &[CountedEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(SEGMENT_HEADER_BYTES + entries.len() * ENTRY_BYTES);
    out.push(SEGMENT_FORMAT_VERSION);
    out.extend_from_slice(&month.year().to_le_bytes());
    out.push(month.number() as u8);
    for entry in entries {
        out.extend_from_slice(&entry.key.to_le_bytes());
        out.extend_from_slice(&entry.span.from.to_le_bytes());
        out.extend_from_slice(&entry.span.until.to_le_bytes());
    }
    debug_assert!(out.len() <= MAX_SEGMENT_BYTES);
    out
}

/// Reads a segment written by [`encode_segment`] (or by version 1).
fn decode_segment(bytes: &[u8]) -> Result<Segment, CodecError> {
    let corrupt = |why: &str| CodecError::Corrupt(format!("segment of {} bytes: {why}", bytes.len()));
    let word = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap_or_default());
    let half = |b: &[u8]| u32::from_le_bytes(b.try_into().unwrap_or_default());
    match bytes.split_first() {
        None => Err(corrupt("empty")),
        Some((&version @ (SEGMENT_FORMAT_VERSION | SEGMENT_FORMAT_V2), rest)) => {
            if bytes.len() > MAX_SEGMENT_BYTES || rest.len() < SEGMENT_HEADER_BYTES - 1 {
                return Err(corrupt("bad length"));
            }
            let (header, body) = rest.split_at(SEGMENT_HEADER_BYTES - 1);
            let year = i32::from_le_bytes([header[0], header[1], header[2], header[3]]);
            let month = Month::new(year, u32::from(header[4])).ok_or_else(|| corrupt("bad month"))?;
            let size = if version == SEGMENT_FORMAT_V2 { 8 } else { ENTRY_BYTES };
            if body.len() % size != 0 {
                return Err(corrupt("bad length"));
            }
            let entries: Vec<CountedEntry> = body
                .chunks_exact(size)
                .map(|e| CountedEntry {
                    key: word(&e[0..8]),
                    span: match size {
                        ENTRY_BYTES => Span { from: half(&e[8..12]), until: half(&e[12..16]) },
                        _ => Span::UNKNOWN,
                    },
                })
                .collect();
            if entries.windows(2).any(|pair| pair[0].key >= pair[1].key) {
                return Err(corrupt("keys not sorted"));
            }
            Ok(Segment::Month { month, entries })
        }
        Some((&SEGMENT_FORMAT_V1, body)) => {
            if body.len() % V1_TOMBSTONE_BYTES != 0 {
                return Err(corrupt("bad length"));
            }
            Ok(Segment::V1(
                body.chunks_exact(V1_TOMBSTONE_BYTES)
                    .map(|t| ((word(&t[0..8]), ConnKey(word(&t[8..16]))), Timestamp(word(&t[16..24]) as i64)))
                    .collect(),
            ))
        }
        Some((&version, _)) => Err(CodecError::UnknownVersion(version)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::segments::{tier, MERGE_FANOUT};
    use proptest::prelude::*;

    const APP: AppId = 7;

    fn key(s: &str) -> ConnKey {
        ConnKey::of(s)
    }

    fn table() -> ConnectionTable {
        ConnectionTable::new(BillingTz::default())
    }

    fn month(text: &str) -> Month {
        text.parse().expect("valid month")
    }

    fn at(text: &str) -> Timestamp {
        Timestamp::parse_rfc3339(text).expect("valid time")
    }

    #[test]
    fn in_order_retried_and_reversed_events_give_one_interval() {
        let closed = ConnEffect::Closed(Interval { app_id: APP, from: Timestamp(10), until: Timestamp(50) });
        type Step = fn(&mut ConnectionTable, ConnKey) -> ConnEffect;
        let connect: Step = |t, c| t.connect(APP, c, Timestamp(10));
        let disconnect: Step = |t, c| t.disconnect(APP, c, Timestamp(50));
        for (first, second) in [(connect, disconnect), (disconnect, connect)] {
            let mut t = table();
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
                    Some(b) => {
                        assert!(b.len() <= MAX_SEGMENT_BYTES, "a segment of {} bytes", b.len());
                        self.segments.insert(segment, b)
                    }
                    None => self.segments.remove(&segment),
                };
            }
        }

        fn restore(&self, closed: Option<Month>) -> ConnectionTable {
            let mut t = table();
            // Segments first: the order does not matter.
            for (&segment, bytes) in self.segments.iter().rev() {
                t.restore_segment(segment, bytes).expect("our own segment");
            }
            for (&(app_id, conn), &record) in &self.records {
                t.restore(app_id, conn, record);
            }
            t.finish_restore(closed);
            t
        }
    }

    /// Everything a table holds, in a comparable form.
    type Snapshot = (
        Vec<((AppId, ConnKey), Pending)>,
        Vec<(Month, Vec<(u64, Span)>, Segments<CountedEntry>)>,
        Vec<(u64, Month)>,
        Option<Month>,
    );

    fn snapshot(t: &ConnectionTable) -> Snapshot {
        let mut pending: Vec<_> = t.pending.iter().map(|(k, p)| (*k, *p)).collect();
        pending.sort_unstable_by_key(|(k, _)| *k);
        let counted = t
            .counted
            .iter()
            .map(|(&month, c)| {
                let mut keys: Vec<(u64, Span)> = c.keys.iter().map(|(&k, &s)| (k, s)).collect();
                keys.sort_unstable();
                (month, keys, c.segments.clone())
            })
            .collect();
        (pending, counted, t.legacy.iter().map(|(s, m)| (*s, *m)).collect(), t.closed)
    }

    #[test]
    fn counted_connections_are_checkpointed_in_segments_only() {
        let mut t = table();
        let mut log = Changelog::default();
        // Opened and closed between two checkpoints: no record of its own.
        t.connect(APP, key("short"), Timestamp(10));
        t.disconnect(APP, key("short"), Timestamp(20));
        // Still open at the checkpoint: a record, which goes when it counts.
        t.connect(APP, key("long"), Timestamp(10));
        let first = t.take_changes();
        assert_eq!(
            first.records,
            vec![((APP, key("long")), Some(ConnRecord(t.pending[&(APP, key("long"))])))]
        );
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
        assert_eq!(snapshot(&restored), snapshot(&t));
        assert!(restored.take_changes() == ConnChanges::default(), "a restore is not a change");
        assert_eq!(restored.connect(APP, key("short"), Timestamp(10)), ConnEffect::Duplicate);
        assert_eq!(restored.disconnect(APP, key("long"), Timestamp(90)), ConnEffect::Duplicate);
    }

    #[test]
    fn a_closed_months_segments_go_and_its_connection_ids_are_new_again() {
        let mut t = table();
        let mut log = Changelog::default();
        let closed = |t: &mut ConnectionTable, name: &str, until: &str| {
            t.connect(APP, key(name), at("2026-10-01T00:00:00+08:00"));
            t.disconnect(APP, key(name), at(until));
        };
        closed(&mut t, "early", "2026-10-20T00:00:00+08:00");
        log.commit(t.take_changes());
        closed(&mut t, "early-2", "2026-10-31T23:59:59+08:00");
        closed(&mut t, "late", "2026-11-01T00:00:00+08:00");
        log.commit(t.take_changes());
        assert_eq!(log.segments.len(), 3, "two of October, one of November");
        t.forget_through(month("2026-10"));
        assert_eq!(t.len(), 1);
        log.commit(t.take_changes());
        // October's segments are gone; November's stays.
        assert_eq!(log.segments.keys().copied().collect::<Vec<_>>(), vec![2]);
        let restored = log.restore(Some(month("2026-10")));
        assert_eq!(snapshot(&restored), snapshot(&t));
        // A forgotten connection's id used again is a new connection, with its own record.
        let reused = at("2026-11-02T00:00:00+08:00");
        assert_eq!(t.connect(APP, key("early"), reused), ConnEffect::Recorded);
        assert_eq!(t.connect(APP, key("late"), reused), ConnEffect::Duplicate, "still remembered");
        log.commit(t.take_changes());
        assert_eq!(log.restore(Some(month("2026-10"))).open().collect::<Vec<_>>(), vec![(APP, reused)]);
    }

    #[test]
    fn a_connection_ending_in_a_closed_month_is_remembered_until_the_next_one_closes() {
        let mut t = table();
        let mut log = Changelog::default();
        // A disconnect dated in October, kept past October's close by a later heartbeat.
        t.disconnect(APP, key("a"), at("2026-10-31T23:00:00+08:00"));
        t.heartbeat(APP, key("a"), at("2026-11-01T00:30:00+08:00"));
        t.forget_through(month("2026-10"));
        // Its connect, dated in November, counts it (at no instant); a retry of that
        // connect must still find it.
        let connect = at("2026-11-01T00:10:00+08:00");
        assert!(matches!(t.connect(APP, key("a"), connect), ConnEffect::Closed(_)));
        log.commit(t.take_changes());
        let mut restored = log.restore(Some(month("2026-10")));
        assert_eq!(snapshot(&restored), snapshot(&t));
        assert_eq!(restored.connect(APP, key("a"), connect), ConnEffect::Duplicate);
        t.forget_through(month("2026-11"));
        assert!(t.is_empty());
    }

    #[test]
    fn many_counted_connections_split_into_full_segments_that_round_trip() {
        let mut t = table();
        let n = SEGMENT_CAPACITY + 10;
        for i in 0..n {
            t.connect(APP, ConnKey(i as u64), Timestamp(i as i64));
            t.disconnect(APP, ConnKey(i as u64), Timestamp(i as i64 + 5));
        }
        let changes = t.take_changes();
        let sizes: Vec<usize> =
            changes.segments.iter().map(|(_, b)| b.as_ref().map_or(0, Vec::len)).collect();
        assert_eq!(
            sizes,
            vec![
                SEGMENT_HEADER_BYTES + ENTRY_BYTES * SEGMENT_CAPACITY,
                SEGMENT_HEADER_BYTES + ENTRY_BYTES * 10
            ]
        );
        assert!(sizes[0] <= MAX_SEGMENT_BYTES);
        let mut log = Changelog::default();
        log.commit(changes);
        let restored = log.restore(None);
        assert_eq!(restored.len(), n);
        assert_eq!(snapshot(&restored), snapshot(&t));
    }

    #[test]
    fn damaged_segments_are_refused() {
        let entries = |keys: &[u64]| -> Vec<CountedEntry> {
            keys.iter().map(|&key| CountedEntry { key, span: Span { from: 1, until: 2 } }).collect()
        };
        let good = encode_segment(month("2026-11"), &entries(&[1, 2, 3]));
        assert!(
            matches!(decode_segment(&good), Ok(Segment::Month { entries: e, .. }) if e == entries(&[1, 2, 3]))
        );
        let unsorted = encode_segment(month("2026-11"), &entries(&[2, 1]));
        let mut bad_month = good.clone();
        bad_month[5] = 13;
        for bad in
            [&[][..], &[3], &good[..good.len() - 1], &unsorted, &bad_month, &[SEGMENT_FORMAT_V1, 1, 2, 3]]
        {
            assert!(decode_segment(bad).is_err(), "{bad:?}");
        }
    }

    /// A segment as version 1 wrote it.
    fn encode_v1(tombstones: &[((AppId, ConnKey), Timestamp)]) -> Vec<u8> {
        let mut out = vec![SEGMENT_FORMAT_V1];
        for &((app_id, conn), until) in tombstones {
            out.extend_from_slice(&app_id.to_le_bytes());
            out.extend_from_slice(&conn.0.to_le_bytes());
            out.extend_from_slice(&until.millis().to_le_bytes());
        }
        out
    }

    #[test]
    fn version_1_segments_are_still_read_and_go_with_their_last_month() {
        let oct = at("2026-10-31T10:00:00+08:00");
        let nov = at("2026-11-02T10:00:00+08:00");
        let mut log = Changelog::default();
        log.segments.insert(4, encode_v1(&[((APP, key("a")), oct), ((APP, key("b")), nov)]));
        log.segments.insert(5, encode_v1(&[((APP, key("c")), oct)]));
        let mut t = log.restore(None);
        assert_eq!(t.len(), 3);
        assert_eq!(t.connect(APP, key("a"), oct), ConnEffect::Duplicate);
        assert_eq!(t.take_changes(), ConnChanges::default());
        // Closing October forgets a and c, and deletes the segment holding only October.
        t.forget_through(month("2026-10"));
        assert_eq!(t.len(), 1);
        assert_eq!(t.take_changes().segments, vec![(5, None)]);
        log.segments.remove(&5);
        assert_eq!(snapshot(&log.restore(Some(month("2026-10")))), snapshot(&t));
        t.forget_through(month("2026-11"));
        assert_eq!(t.take_changes().segments, vec![(4, None)]);
        // New segments take numbers after the ones read.
        t.connect(APP, key("d"), nov);
        t.disconnect(APP, key("d"), nov);
        assert_eq!(t.take_changes().segments.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![6]);
    }

    /// A version-2 segment (hashes without spans) is still read: its connections absorb
    /// retries, earlier-dated ones included (their spans are unknown), and a merge carries
    /// them on.
    #[test]
    fn version_2_segments_are_still_read_and_absorb_retries() {
        let nov = month("2026-11");
        let mut v2 = vec![SEGMENT_FORMAT_V2];
        v2.extend_from_slice(&nov.year().to_le_bytes());
        v2.push(nov.number() as u8);
        let mut keys = [counted_key(APP, key("a")), counted_key(APP, key("b"))];
        keys.sort_unstable();
        keys.iter().for_each(|k| v2.extend_from_slice(&k.to_le_bytes()));
        let mut log = Changelog::default();
        log.segments.insert(3, v2);
        let mut t = log.restore(None);
        assert_eq!(t.counted_len(), 2);
        assert_eq!(t.connect(APP, key("a"), at("2026-11-02T10:00:00+08:00")), ConnEffect::Duplicate);
        assert_eq!(t.disconnect(APP, key("b"), at("2026-11-01T00:00:00+08:00")), ConnEffect::Duplicate);
        // Corrections and new connections are written in version 3.
        t.connect(APP, key("c"), at("2026-11-02T10:00:00+08:00"));
        t.disconnect(APP, key("c"), at("2026-11-02T11:00:00+08:00"));
        let written = t.take_changes().segments;
        assert!(written.iter().all(|(_, b)| b.as_ref().is_some_and(|b| b[0] == SEGMENT_FORMAT_VERSION)));
    }

    /// A counted connection's span is corrected by an earlier-dated copy of either end, once;
    /// the correction is checkpointed in a later segment and a restore reads the corrected
    /// span back, so a copy dated between the two is a duplicate there too.
    #[test]
    fn a_counted_connections_span_is_corrected_by_earlier_copies_and_restored_so() {
        let (t0, t1) = (at("2026-11-02T10:00:00+08:00"), at("2026-11-02T11:00:00+08:00"));
        let earlier = |ts: Timestamp, minutes: i64| Timestamp(ts.millis() - minutes * 60_000);
        let interval = |from, until| Interval { app_id: APP, from, until };
        let mut t = table();
        let mut log = Changelog::default();
        t.connect(APP, key("a"), t0);
        assert_eq!(t.disconnect(APP, key("a"), t1), ConnEffect::Closed(interval(t0, t1)));
        log.commit(t.take_changes());
        assert_eq!(t.disconnect(APP, key("a"), Timestamp(t1.millis() + 60_000)), ConnEffect::Duplicate);
        assert_eq!(
            t.disconnect(APP, key("a"), earlier(t1, 20)),
            ConnEffect::Corrected { was: interval(t0, t1), now: interval(t0, earlier(t1, 20)) }
        );
        assert_eq!(
            t.connect(APP, key("a"), earlier(t0, 5)),
            ConnEffect::Corrected {
                was: interval(t0, earlier(t1, 20)),
                now: interval(earlier(t0, 5), earlier(t1, 20))
            }
        );
        log.commit(t.take_changes());
        assert_eq!(log.segments.len(), 2, "the corrected span in a segment of its own");
        let mut restored = log.restore(None);
        assert_eq!(snapshot(&restored), snapshot(&t));
        assert_eq!(restored.disconnect(APP, key("a"), earlier(t1, 10)), ConnEffect::Duplicate);
        assert_eq!(restored.connect(APP, key("a"), earlier(t0, 5)), ConnEffect::Duplicate);
    }

    #[test]
    fn idle_connections_close_at_their_last_sign_of_life() {
        let mut t = table();
        t.connect(APP, key("a"), Timestamp(0));
        t.heartbeat(APP, key("a"), Timestamp(1_000));
        t.connect(APP, key("b"), Timestamp(0));
        t.heartbeat(APP, key("b"), Timestamp(9_000));
        let closed = t.expire_idle(Timestamp(10_000), 5_000);
        assert_eq!(closed, vec![Interval { app_id: APP, from: Timestamp(0), until: Timestamp(1_000) }]);
        assert_eq!(t.open().collect::<Vec<_>>(), vec![(APP, Timestamp(0))]);
        // A heartbeat after the idle close is a late retry: ignored.
        assert_eq!(t.heartbeat(APP, key("a"), Timestamp(11_000)), ConnEffect::Duplicate);
        t.forget_through(month("1970-01"));
        assert_eq!(t.len(), 1);
    }

    /// Opens and closes connection `i` (ending at `i` ms past `base`).
    fn closed(t: &mut ConnectionTable, i: u64, base: i64) {
        t.connect(APP, ConnKey(i), Timestamp(base + i as i64));
        t.disconnect(APP, ConnKey(i), Timestamp(base + i as i64 + 5));
    }

    #[test]
    fn a_month_of_small_checkpoints_leaves_few_segments() {
        let mut t = table();
        let mut log = Changelog::default();
        let mut i = 0;
        for _ in 0..2_000 {
            for _ in 0..5 {
                closed(&mut t, i, 0);
                i += 1;
            }
            log.commit(t.take_changes());
        }
        // 10,000 connections: far fewer records than checkpoints, at most
        // `MERGE_FANOUT - 1` segments in each of the tiers up to 10,000.
        let bound = (MERGE_FANOUT - 1) * (tier(10_000) as usize + 1);
        assert!(log.segments.len() <= bound, "{} segments", log.segments.len());
        let mut restored = log.restore(None);
        assert_eq!(snapshot(&restored), snapshot(&t));
        for i in 0..i {
            assert_eq!(restored.connect(APP, ConnKey(i), Timestamp(i as i64)), ConnEffect::Duplicate);
            assert_eq!(t.connect(APP, ConnKey(i), Timestamp(i as i64)), ConnEffect::Duplicate);
        }
        assert_eq!(restored.take_changes(), ConnChanges::default());
        assert_eq!(t.take_changes(), ConnChanges::default());
    }

    #[test]
    fn a_merge_deletes_the_segments_it_replaces_in_the_same_checkpoint() {
        let mut t = table();
        let mut log = Changelog::default();
        let mut written = Vec::new();
        let mut i = 0;
        let merge = loop {
            closed(&mut t, i, 0);
            i += 1;
            let changes = t.take_changes();
            if changes.segments.iter().any(|(_, b)| b.is_none()) {
                break changes;
            }
            written.extend(changes.segments.iter().map(|(s, _)| *s));
            log.commit(changes);
            assert!(i < 100, "segments are merged before long");
        };
        let deleted: Vec<u64> = merge.segments.iter().filter(|(_, b)| b.is_none()).map(|(s, _)| *s).collect();
        let added: Vec<u64> = merge.segments.iter().filter(|(_, b)| b.is_some()).map(|(s, _)| *s).collect();
        assert!(deleted.len() >= 2 && deleted.iter().all(|s| written.contains(s)), "{deleted:?}");
        assert_eq!(added.len(), 1, "one merged segment");
        log.commit(merge);
        assert_eq!(log.segments.keys().copied().collect::<Vec<_>>(), added);
        assert_eq!(log.restore(None).len(), i as usize);
    }

    /// One step of a random run of a table.
    #[derive(Clone, Debug)]
    enum Op {
        Connect(u8, i64),
        Disconnect(u8, i64),
        Heartbeat(u8, i64),
        /// A connection of its own opened and closed: `(key, connect, minutes)`.
        Session(u16, i64, i64),
        Checkpoint,
        Crash,
        CloseOctober,
    }

    fn op() -> impl Strategy<Value = Op> {
        // Times from mid-October to mid-November (+08:00), in minutes.
        let start = at("2026-10-15T00:00:00+08:00").millis();
        let ts = (0i64..30 * 24 * 60).prop_map(move |m| start + m * 60_000);
        prop_oneof![
            4 => (any::<u8>(), ts.clone()).prop_map(|(c, t)| Op::Connect(c, t)),
            4 => (any::<u8>(), ts.clone()).prop_map(|(c, t)| Op::Disconnect(c, t)),
            1 => (any::<u8>(), ts.clone()).prop_map(|(c, t)| Op::Heartbeat(c, t)),
            6 => (any::<u16>(), ts, 0i64..600).prop_map(|(c, t, m)| Op::Session(c, t, m)),
            2 => Just(Op::Checkpoint),
            1 => Just(Op::Crash),
            1 => Just(Op::CloseOctober),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// Checkpointed, merged, restored at any point: the restored table holds what the
        /// live one does, and answers every event alike.
        #[test]
        fn a_restore_after_merges_equals_the_live_table(ops in proptest::collection::vec(op(), 0..600)) {
            let mut live = table();
            let mut log = Changelog::default();
            let mut closed = None;
            let november = at("2026-11-01T00:00:00+08:00").millis();
            for op in ops {
                if let (Op::Connect(_, t) | Op::Disconnect(_, t) | Op::Heartbeat(_, t) | Op::Session(_, t, _), Some(_)) = (&op, closed) {
                    if *t < november {
                        // The meter refuses events dated in a closed month (late).
                        continue;
                    }
                }
                match op {
                    Op::Connect(c, t) => { live.connect(APP, ConnKey(u64::from(c)), Timestamp(t)); }
                    Op::Disconnect(c, t) => { live.disconnect(APP, ConnKey(u64::from(c)), Timestamp(t)); }
                    Op::Heartbeat(c, t) => { live.heartbeat(APP, ConnKey(u64::from(c)), Timestamp(t)); }
                    Op::Session(c, t, minutes) => {
                        let conn = ConnKey(1_000 + u64::from(c));
                        live.connect(APP, conn, Timestamp(t));
                        live.disconnect(APP, conn, Timestamp(t + minutes * 60_000));
                    }
                    Op::Checkpoint => {
                        log.commit(live.take_changes());
                        let restored = log.restore(closed);
                        prop_assert_eq!(snapshot(&restored), snapshot(&live));
                    }
                    Op::Crash => live = log.restore(closed),
                    Op::CloseOctober => {
                        live.forget_through(month("2026-10"));
                        closed = Some(month("2026-10"));
                    }
                }
            }
            log.commit(live.take_changes());
            let mut restored = log.restore(closed);
            prop_assert_eq!(snapshot(&restored), snapshot(&live));
            let probe = at("2026-11-20T00:00:00+08:00");
            for c in 0..=u8::MAX {
                let conn = ConnKey(u64::from(c));
                prop_assert_eq!(restored.disconnect(APP, conn, probe), live.disconnect(APP, conn, probe));
            }
        }
    }
}
