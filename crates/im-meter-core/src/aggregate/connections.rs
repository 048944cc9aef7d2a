//! The lifecycle of each persistent connection: connect, heartbeats, disconnect.
//!
//! A connection is counted for PCC once both its ends are known (`Closed` carries the
//! interval to the meter), or, while it is still open, by the meter when a month closes.
//! Everything here is idempotent and tolerant of order (SPEC §2.1): a retried `connect` or
//! `disconnect` changes nothing, a `disconnect` may arrive before its `connect`, and a
//! connection that already counted is remembered (as a tombstone) so late retries of its
//! events stay harmless. When two `connect`s (or `disconnect`s) of one open connection
//! disagree on the time, the earliest wins, which keeps the result independent of order.

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

/// Every connection of the apps one meter owns.
#[derive(Clone, Debug, Default)]
pub struct ConnectionTable {
    conns: FxHashMap<(AppId, ConnKey), Conn>,
    /// Connections changed (or forgotten) since the last [`ConnectionTable::take_changes`].
    changed: FxHashSet<(AppId, ConnKey)>,
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
    /// changed for the next checkpoint.
    fn touch(&mut self, app_id: AppId, conn: ConnKey, ts: Timestamp) -> &mut Conn {
        self.changed.insert((app_id, conn));
        self.conns.entry((app_id, conn)).or_insert(Conn::Pending {
            connected: None,
            disconnected: None,
            last_seen: ts,
        })
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
        self.changed.insert((app_id, conn));
        match self.conns.get_mut(&(app_id, conn)) {
            Some(Conn::Counted { .. }) => ConnEffect::Duplicate,
            Some(Conn::Pending { last_seen, .. }) => {
                *last_seen = (*last_seen).max(ts);
                ConnEffect::Recorded
            }
            None => {
                // Remembered so that a `connect` arriving later still knows it was alive.
                self.conns.insert(
                    (app_id, conn),
                    Conn::Pending { connected: None, disconnected: None, last_seen: ts },
                );
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
            let keep = match *conn {
                Conn::Counted { until } => until >= cutoff,
                Conn::Pending { connected: None, last_seen, .. } => last_seen >= cutoff,
                Conn::Pending { connected: Some(_), .. } => true,
            };
            if !keep {
                changed.insert(*key);
            }
            keep
        });
    }

    /// The connections changed or forgotten since the last call, with their state now
    /// (`None`: forgotten), sorted by key.
    pub fn take_changes(&mut self) -> Vec<((AppId, ConnKey), Option<ConnRecord>)> {
        let mut keys: Vec<(AppId, ConnKey)> = self.changed.drain().collect();
        keys.sort_unstable();
        keys.into_iter().map(|k| (k, self.conns.get(&k).copied().map(ConnRecord))).collect()
    }

    /// Puts back a checkpointed connection (restoring; not a change).
    pub fn restore(&mut self, app_id: AppId, conn: ConnKey, record: ConnRecord) {
        self.conns.insert((app_id, conn), record.0);
    }
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
