//! A growing set of 64-bit keys checkpointed as immutable, size-tiered *segments*: what the
//! counted connections ([`super::connections`]) and the exact user sets
//! ([`super::user_set`]) write to the changelog instead of themselves whole.
//!
//! Each checkpoint writes the keys added since the last one as new segments of at most a
//! capacity of keys each. Small segments are merged size-tiered: once [`MERGE_FANOUT`]
//! segments fall in one size tier (lengths within a factor of [`MERGE_FANOUT`]), the
//! checkpoint writes their union as new segments and deletes them, in the same checkpoint (so
//! the same transaction). Full segments are never merged again. So a set of N keys leaves
//! about N / capacity full segments plus at most `MERGE_FANOUT − 1` per tier, however many
//! checkpoints wrote it — a restore reads that many records — and every key is rewritten
//! about once per tier. The keys of the segments not full yet stay here (a merge needs them);
//! the owner keeps the full ones' keys as it needs.
//!
//! An entry is a key or a key with a value ([`Entry`]): the counted connections keep each
//! connection's span beside its key. A key whose value changed is written again, in a later
//! segment; a merge keeps the least entry of a key, which the owner makes the current one.

use super::sorted::search;

/// Segments in one size tier that are merged into one.
pub const MERGE_FANOUT: usize = 4;

/// Segment writes: a segment's number and its bytes (`None` deletes it).
pub type SegmentWrites = Vec<(u64, Option<Vec<u8>>)>;

/// How many segments a set has and how many keys they hold: what a checkpoint records beside
/// them ([`super::totals`]), so that a restore can tell whether it read them all.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct SegmentTotal {
    /// Segments.
    pub segments: u64,
    /// Keys in them (each key is in one segment of its set).
    pub keys: u64,
}

impl SegmentTotal {
    /// Whether it falls short of `written` in segments or in keys.
    pub fn short_of(&self, written: &SegmentTotal) -> bool {
        self.segments < written.segments || self.keys < written.keys
    }
}

/// An entry of a segmented set: sorted (and so merged) by its key first. Of the entries of
/// one key, merges keep the least.
pub(crate) trait Entry: Copy + Ord {
    /// Its key.
    fn key(&self) -> u64;
}

impl Entry for u64 {
    fn key(&self) -> u64 {
        *self
    }
}

/// The size tier of a segment of `len` keys.
pub(crate) fn tier(len: usize) -> u32 {
    len.max(1).ilog(MERGE_FANOUT)
}

/// The segments of one set: see the module documentation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Segments<T = u64> {
    /// Full segments (never merged again), by number: only their numbers.
    pub full: Vec<u64>,
    /// Entries in the full segments.
    pub full_keys: u64,
    /// The other segments, by number, with their sorted entries, which a merge rewrites.
    pub runs: Vec<(u64, Box<[T]>)>,
}

impl<T> Default for Segments<T> {
    fn default() -> Self {
        Segments { full: Vec::new(), full_keys: 0, runs: Vec::new() }
    }
}

impl<T: Entry> Segments<T> {
    /// Writes `fresh` (sorted, without repeats, in no segment yet) into new segments of at
    /// most `capacity` keys, then merges every size tier holding [`MERGE_FANOUT`] segments or
    /// more, until none does. Writes (made by `encode`) and deletions go to `out` (a segment
    /// made and merged away in one checkpoint is never written); the keys of each segment
    /// made full go to `made_full`.
    pub fn checkpoint(
        &mut self,
        fresh: Vec<T>,
        capacity: usize,
        next_segment: &mut u64,
        encode: &dyn Fn(&[T]) -> Vec<u8>,
        out: &mut SegmentWrites,
        made_full: &mut dyn FnMut(&[T]),
    ) {
        let mut cut = Cut { capacity, next_segment, encode, out, made_full, made: Vec::new() };
        cut.split(&mut self.full, &mut self.full_keys, fresh);
        loop {
            let mut tiers = std::collections::BTreeMap::<u32, usize>::new();
            for len in self.runs.iter().map(|(_, keys)| keys.len()).chain(cut.made.iter().map(|k| k.len())) {
                *tiers.entry(tier(len)).or_default() += 1;
            }
            let Some((&due, _)) = tiers.iter().find(|&(_, &n)| n >= MERGE_FANOUT) else { break };
            let mut merged: Vec<T> = Vec::new();
            self.runs.retain(|(segment, keys)| {
                let member = tier(keys.len()) == due;
                if member {
                    merged.extend_from_slice(keys);
                    cut.out.push((*segment, None));
                }
                !member
            });
            cut.made.retain(|keys| {
                let member = tier(keys.len()) == due;
                if member {
                    merged.extend_from_slice(keys);
                }
                !member
            });
            merged.sort_unstable();
            merged.dedup_by_key(|entry| entry.key());
            cut.split(&mut self.full, &mut self.full_keys, merged);
        }
        for keys in std::mem::take(&mut cut.made) {
            let segment = take_number(cut.next_segment);
            cut.out.push((segment, Some((cut.encode)(&keys))));
            self.runs.push((segment, keys));
        }
    }

    /// Puts back a segment read from the changelog (restoring), in number order. Returns
    /// the keys of a full segment, which are the caller's to keep.
    pub fn restore(&mut self, segment: u64, keys: Box<[T]>, capacity: usize) -> Option<Box<[T]>> {
        if keys.len() >= capacity {
            let at = self.full.partition_point(|&s| s < segment);
            self.full.insert(at, segment);
            self.full_keys += keys.len() as u64;
            Some(keys)
        } else {
            // Merges look at segments oldest first, as the live set holds them.
            let at = self.runs.partition_point(|(s, _)| *s < segment);
            self.runs.insert(at, (segment, keys));
            None
        }
    }

    /// Counts the segments that are not full as full from now on (never merged again),
    /// dropping their keys (which the owner holds); returns how many they were.
    pub fn freeze_runs(&mut self) -> usize {
        let runs = std::mem::take(&mut self.runs);
        self.full_keys += runs.iter().map(|(_, keys)| keys.len() as u64).sum::<u64>();
        self.full.extend(runs.iter().map(|(segment, _)| *segment));
        self.full.sort_unstable();
        runs.len()
    }

    /// How many segments there are, and keys in them.
    pub fn total(&self) -> SegmentTotal {
        SegmentTotal {
            segments: (self.full.len() + self.runs.len()) as u64,
            keys: self.full_keys + self.runs_len() as u64,
        }
    }

    /// Every segment's number.
    pub fn numbers(&self) -> impl Iterator<Item = u64> + '_ {
        self.full.iter().copied().chain(self.runs.iter().map(|(segment, _)| *segment))
    }

    /// How many entries the segments that are not full hold.
    pub fn runs_len(&self) -> usize {
        self.runs.iter().map(|(_, keys)| keys.len()).sum()
    }
}

impl Segments<u64> {
    /// Whether a key is in a segment that is not full.
    pub fn runs_contain(&self, key: u64) -> bool {
        self.runs.iter().any(|(_, keys)| search(keys, key).is_ok())
    }

    /// The keys of the segments that are not full.
    pub fn run_keys(&self) -> impl Iterator<Item = u64> + '_ {
        self.runs.iter().flat_map(|(_, keys)| keys.iter().copied())
    }
}

/// One checkpoint's cutting of sorted entries into segments.
struct Cut<'a, T> {
    capacity: usize,
    next_segment: &'a mut u64,
    encode: &'a dyn Fn(&[T]) -> Vec<u8>,
    out: &'a mut SegmentWrites,
    made_full: &'a mut dyn FnMut(&[T]),
    /// Segments made by this checkpoint and not full, not written yet (they may still merge).
    made: Vec<Box<[T]>>,
}

impl<T: Entry> Cut<'_, T> {
    /// Cuts sorted entries into segments: full ones are written at once; the rest, if any,
    /// is made (it may still be merged).
    fn split(&mut self, full: &mut Vec<u64>, full_keys: &mut u64, keys: Vec<T>) {
        for chunk in keys.chunks(self.capacity) {
            if chunk.len() == self.capacity {
                let segment = take_number(self.next_segment);
                self.out.push((segment, Some((self.encode)(chunk))));
                (self.made_full)(chunk);
                full.push(segment);
                *full_keys += chunk.len() as u64;
            } else {
                self.made.push(chunk.into());
            }
        }
    }
}

/// The next segment number.
fn take_number(next_segment: &mut u64) -> u64 {
    let segment = *next_segment;
    *next_segment += 1;
    segment
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(keys: &[u64]) -> Vec<u8> {
        keys.iter().flat_map(|k| k.to_le_bytes()).collect()
    }

    #[test]
    fn merges_of_large_segments_are_cut_at_the_capacity() {
        let capacity = 1_000;
        let mut segments = Segments::default();
        let (mut next, mut out, mut full_keys) = (10, Vec::new(), Vec::new());
        // Three segments in the top tier, and as many fresh keys again.
        let len = capacity - 100;
        let mut all: Vec<u64> = (0..4 * len as u64).map(|i| i * 7919).collect();
        for (n, run) in all.chunks(len).take(3).enumerate() {
            segments.runs.push((n as u64, run.into()));
        }
        let fresh = all[3 * len..].to_vec();
        segments.checkpoint(fresh, capacity, &mut next, &encode, &mut out, &mut |k| {
            full_keys.extend_from_slice(k)
        });
        let deleted: Vec<u64> = out.iter().filter(|(_, b)| b.is_none()).map(|(s, _)| *s).collect();
        assert_eq!(deleted, vec![0, 1, 2]);
        let mut union: Vec<u64> = Vec::new();
        for bytes in out.iter().filter_map(|(_, b)| b.as_ref()) {
            assert!(bytes.len() <= capacity * 8);
            union.extend(bytes.chunks(8).map(|b| u64::from_le_bytes(b.try_into().unwrap())));
        }
        union.sort_unstable();
        all.sort_unstable();
        assert_eq!(union, all, "the union, each key once");
        assert_eq!(segments.full.len(), 3, "full segments, never merged again");
        assert_eq!(segments.total(), SegmentTotal { segments: 4, keys: all.len() as u64 });
        assert_eq!(full_keys.len(), 3 * capacity, "their keys handed out");
        assert_eq!(
            segments.runs.iter().map(|(_, k)| k.len()).collect::<Vec<_>>(),
            vec![4 * len - 3 * capacity]
        );
    }

    #[test]
    fn restored_segments_are_kept_in_number_order() {
        let mut segments = Segments::default();
        for n in [5u64, 2, 9] {
            assert!(segments.restore(n, vec![n].into(), 10).is_none());
        }
        assert!(segments.restore(4, (0..10).collect::<Vec<u64>>().into(), 10).is_some());
        assert_eq!(segments.numbers().collect::<Vec<_>>(), vec![4, 2, 5, 9]);
        assert!(segments.runs_contain(9) && !segments.runs_contain(3));
        assert_eq!(segments.total(), SegmentTotal { segments: 4, keys: 13 });
        assert_eq!(segments.freeze_runs(), 3);
        assert_eq!(
            (segments.full.clone(), segments.total()),
            (vec![2, 4, 5, 9], SegmentTotal { segments: 4, keys: 13 })
        );
    }
}
