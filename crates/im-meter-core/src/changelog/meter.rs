//! What one metering commit writes: a [`Meter`]'s changes since its last commit, as the
//! records of one transaction.
//!
//! A commit takes from the meter, in this order: the months it closed (each app's usage
//! share, then the closed-through mark), the quota crossings, and its state records — with
//! the input offset the transaction commits in the state's progress record. All of it is
//! written in one transaction with that offset, so a crash anywhere before the commit
//! returns loses all of it together (nothing becomes visible to `read_committed` readers,
//! and the events are read again after the previous commit's offset); a crash after loses
//! nothing. The order matters to a reader that stops *inside* a committed transaction (a
//! partition's last stable offset can fall there, held back by another producer's
//! transaction still open): each rule below says what such a reader sees.

use std::collections::HashMap;
use std::sync::Arc;

use super::keys::{billing_partition, ChangelogKey};
use super::marks::ClosedMark;
use super::parts;
use crate::aggregate::meter::QuotaCrossing;
use crate::aggregate::{Meter, StateKey};
use crate::time::Month;

/// One record as written to a changelog partition: key and value bytes (`None` deletes
/// the key).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChangelogRecord {
    /// The key's bytes ([`ChangelogKey::to_bytes`], or a part key of one).
    pub key: Vec<u8>,
    /// The value (a whole value, a part, or a parts header); `None`: a deletion.
    pub value: Option<Vec<u8>>,
}

/// The changelogs' shape: the same for every commit of a worker.
#[derive(Copy, Clone, Debug)]
pub struct Changelogs {
    /// Partitions of the billing changelog: fixed, so an app's billing partition never moves.
    pub billing_partitions: u32,
    /// The largest value one record may hold: larger values are written in parts
    /// ([`parts`]).
    pub max_value: usize,
}

/// The source partition committed, as the shell knows it.
#[derive(Copy, Clone, Debug)]
pub struct Source<'a> {
    /// The events partition the meter meters: its metering changelog partition has the
    /// same number, and its billing records say it is their source.
    pub partition: u32,
    /// The offset after the last event applied, which the transaction commits (`None`:
    /// nothing read or restored yet).
    pub input_offset: Option<i64>,
    /// The deployment that owns the state (its consumer group id), when the changelog
    /// partition does not say so yet: written as [`ChangelogKey::Owner`].
    pub owner: Option<&'a [u8]>,
}

/// What the metering changelog partition holds of one meter's state, as far as commits
/// need it: the number of parts each key's latest value was written in (a rewrite in fewer
/// parts, or a deletion, deletes the parts no longer used), and the bytes of each (the
/// state's size, for the metrics).
#[derive(Clone, Debug, Default)]
pub struct WrittenState {
    sizes: HashMap<StateKey, usize>,
    bytes: u64,
    parts: HashMap<StateKey, usize>,
}

impl WrittenState {
    /// What a restore read back: each key's latest value's length and number of parts (0:
    /// written whole).
    pub fn read_back(state: impl IntoIterator<Item = (StateKey, usize, usize)>) -> Self {
        let mut written = WrittenState::default();
        for (key, len, parts) in state {
            written.sized(key, Some(len));
            if parts > 0 {
                written.parts.insert(key, parts);
            }
        }
        written
    }

    /// The bytes of the latest value of every key.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Notes a state value written: `None` deletes the key.
    fn sized(&mut self, key: StateKey, len: Option<usize>) {
        let old = match len {
            Some(len) => self.sizes.insert(key, len),
            None => self.sizes.remove(&key),
        };
        self.bytes = self.bytes + len.unwrap_or(0) as u64 - old.unwrap_or(0) as u64;
    }

    /// Appends the records that write state `key` ← `value`: in parts when the value is
    /// over `max_value` bytes, then the deletions of the parts of its previous value that
    /// are no longer used. Those come after the value's header, which names the parts it
    /// needs: a reader stopping between the two reads the new value, whole.
    fn write(
        &mut self,
        key: StateKey,
        value: Option<Vec<u8>>,
        max_value: usize,
        out: &mut Vec<ChangelogRecord>,
    ) {
        self.sized(key, value.as_ref().map(Vec::len));
        let bytes = ChangelogKey::State(key).to_bytes();
        let before = self.parts.remove(&key).unwrap_or(0);
        let now = match value {
            Some(value) => write_value(&bytes, value, max_value, |record| out.push(record)),
            None => {
                out.push(ChangelogRecord { key: bytes.clone(), value: None });
                0
            }
        };
        out.extend(
            parts::part_keys(&bytes, now..before).into_iter().map(|key| ChangelogRecord { key, value: None }),
        );
        if now > 0 {
            self.parts.insert(key, now);
        }
    }
}

/// Hands out the records that write `key` ← `value`, in parts when over `max_value` bytes
/// (the parts, then their header under `key`: a reader that has not reached the header
/// yet still reads the previous value); returns the number of parts (0: written whole).
fn write_value(key: &[u8], value: Vec<u8>, max_value: usize, mut out: impl FnMut(ChangelogRecord)) -> usize {
    let (records, parts) = parts::split(key, value, max_value);
    for (key, value) in records {
        out(ChangelogRecord { key, value: Some(value) });
    }
    parts
}

/// Everything one metering commit writes for one source partition, in the order it must
/// be written. See the module documentation.
#[derive(Debug, Default)]
pub struct MeterCommit {
    /// For the source's metering changelog partition, in order: the owner record when due,
    /// then the state changed since the last commit (values in parts when large), the
    /// progress record last.
    pub state: Vec<ChangelogRecord>,
    /// For the billing changelog, in order, each with its partition: usage shares of the
    /// months closed, then the closed-through mark, then quota crossings.
    pub billing: Vec<(u32, ChangelogRecord)>,
    /// The months closed that held usage here, oldest first, with how many apps each
    /// (months without any are closed all the same, and said so only by the mark).
    pub closed: Vec<(Month, usize)>,
    /// The app-month records among `state`, with their values whole ([`StateKey::is_app_month`]):
    /// what the usage API's view must see once the commit is durable.
    pub app_months: Vec<(StateKey, Option<Arc<[u8]>>)>,
}

impl MeterCommit {
    /// Takes from `meter` everything it has to commit for `source`: the months it closed,
    /// its quota crossings and its changed state, the progress saying `source.input_offset`.
    /// `written` is what the changelog holds already, updated with what this commit writes.
    /// Nothing new (no event, no close, the same offset, no owner due): nothing to write.
    pub fn take(
        meter: &mut Meter,
        written: &mut WrittenState,
        source: Source<'_>,
        changelogs: &Changelogs,
    ) -> Self {
        let Changelogs { billing_partitions, max_value } = *changelogs;
        let p = source.partition;
        let mut commit = MeterCommit::default();
        if let Some(closing) = meter.take_closed() {
            for (month, closed) in closing.months {
                commit.closed.push((month, closed.len()));
                for (app_id, mut aggregate) in closed {
                    let key = ChangelogKey::Usage { app_id, month, source: p };
                    let q = billing_partition(app_id, billing_partitions);
                    // Written once; billing deletes it, parts included, once billed.
                    write_value(&key.to_bytes(), aggregate.encode(), max_value, |record| {
                        commit.billing.push((q, record))
                    });
                }
            }
            // After the usage it covers, in the same transaction: a billing task that
            // reads the mark has read that usage.
            let mark = ClosedMark { through: closing.through, first_active: closing.first_active };
            let key = ChangelogKey::ClosedThrough { source: p }.to_bytes();
            for q in 0..billing_partitions {
                commit.billing.push((q, ChangelogRecord { key: key.clone(), value: Some(mark.encode()) }));
            }
        }
        for crossing in meter.take_quota_crossings() {
            let QuotaCrossing { app_id, month, day } = crossing;
            let q = billing_partition(app_id, billing_partitions);
            let key = ChangelogKey::QuotaCrossed { app_id, month, source: p };
            // The value is the day of the month it passed the cap (empty before it said).
            let value = Some(day.number().to_string().into_bytes());
            commit.billing.push((q, ChangelogRecord { key: key.to_bytes(), value }));
        }
        if let Some(next) = source.input_offset {
            // The state says which input it reflects, in the transaction that commits that
            // offset: a restore checks the two against each other.
            meter.set_input_offset(next);
        }
        if let Some(owner) = source.owner {
            // Which deployment the state belongs to: a worker of another refuses it.
            commit
                .state
                .push(ChangelogRecord { key: ChangelogKey::Owner.to_bytes(), value: Some(owner.to_vec()) });
        }
        // The progress comes last ([`Meter::checkpoint`]): a restore that stops inside
        // these records reads an input offset older than the committed one, and reads
        // again.
        for record in meter.checkpoint() {
            if record.key.is_app_month() {
                commit.app_months.push((record.key, record.value.as_deref().map(Arc::from)));
            }
            written.write(record.key, record.value, max_value, &mut commit.state);
        }
        commit
    }

    /// Whether the commit writes nothing.
    pub fn is_empty(&self) -> bool {
        self.state.is_empty() && self.billing.is_empty()
    }

    /// Whether a month that held usage here closed.
    pub fn closes_month(&self) -> bool {
        !self.closed.is_empty()
    }
}
