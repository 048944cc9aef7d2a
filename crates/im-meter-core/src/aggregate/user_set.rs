//! An exact set of 64-bit user hashes ([`UserSet`]): compact in memory, fast to add to,
//! encoded canonically in little more than the information it holds, and checkpointed by
//! what was added.
//!
//! In memory: a sorted, exactly sized `Vec<u64>` holds most users (8 bytes each), and a
//! hash set the users added since it was last rebuilt; when that set grows past a sixteenth
//! of the sorted part (at least [`MIN_RECENT`]), the two are merged into a new sorted
//! vector. So a user costs 8 bytes plus its share of the recent users' hash table (8.1 bytes
//! in all, measured by `benches/state_size.rs` from 1,000 to a million users; a merge
//! briefly holds the set twice), and an insert costs a binary search, a hash lookup and,
//! amortized, about sixteen element moves.
//!
//! Checkpointed ([`UserSet::checkpoint`], the worker): each checkpoint writes the users added
//! since the last one as immutable segments ([`super::segments`]: size-tiered, merged as
//! they accumulate, full at [`SEGMENT_CAPACITY`] users, at most [`MAX_SEGMENT_BYTES`]). The
//! recent users then wait for the next checkpoint instead of being merged on the way, the
//! users of segments not full yet are kept as those segments' sorted runs (each user is
//! still held once), and those of full segments in the sorted vector. A restore reads the
//! segments back: about n / 65,536 full ones plus at most three per size tier.
//!
//! Encoded: Elias–Fano over the sorted hashes (a varint count, each hash's low
//! `l = 64 − ⌈log₂ n⌉` bits packed, its high bits in unary): about `66 − log₂ n` bits per
//! user, so 8.0 bytes at 10 users, 7.0 at 1,000 and 5.8 at a million. Equal sets give equal
//! bytes, whatever the order users were added in or sets merged.
//!
//! Hashes collide: with n users, the expected number of colliding pairs is about
//! n² / 2⁶⁵ (3 · 10⁻⁶ at ten million), so a count may, that rarely, be one short.

use std::collections::HashSet;
use std::hash::BuildHasherDefault;

use super::codec::CodecError;
use super::pass_through::PassThroughHasher;
use super::segments::{SegmentTotal, SegmentWrites, Segments};
use super::sorted::search;

/// The recent users' hash set may grow to this size before it is merged, however small
/// the sorted part is.
pub const MIN_RECENT: usize = 64;

/// Users in a full segment: 65,536, at most 6.3 encoded bytes each.
pub const SEGMENT_CAPACITY: usize = 1 << 16;

/// The largest encoded segment: well under the broker's default record limit (1 MB).
pub const MAX_SEGMENT_BYTES: usize = 1 + 10 + SEGMENT_CAPACITY * 8;

/// Version byte of an encoded segment.
const SEGMENT_FORMAT_VERSION: u8 = 1;

/// See the module documentation.
#[derive(Clone, Debug, Default)]
pub struct UserSet {
    /// Sorted ascending, no repeats, exactly sized; checkpointed: the users of full segments.
    sorted: Vec<u64>,
    /// Users in no other part.
    recent: HashSet<u64, BuildHasherDefault<PassThroughHasher>>,
    /// Its segments, once checkpointed (`None`: no user is in a segment).
    checkpointed: Option<Box<Checkpointed>>,
}

/// The segments of a checkpointed set.
#[derive(Clone, Debug, Default)]
struct Checkpointed {
    /// Their runs hold the users of the segments not full.
    segments: Segments,
    /// Users in `segments`' runs.
    in_runs: usize,
    /// The number of the next segment.
    next_segment: u64,
}

impl PartialEq for UserSet {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter_unordered().all(|k| other.contains(k))
    }
}

impl Eq for UserSet {}

impl UserSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many users it holds.
    pub fn len(&self) -> usize {
        self.sorted.len() + self.recent.len() + self.checkpointed.as_ref().map_or(0, |c| c.in_runs)
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether it holds `key`.
    pub fn contains(&self, key: u64) -> bool {
        search(&self.sorted, key).is_ok()
            || self.recent.contains(&key)
            || self.checkpointed.as_ref().is_some_and(|c| c.segments.runs_contain(key))
    }

    /// Adds `key`; `true` if it was not there yet.
    #[inline]
    pub fn insert(&mut self, key: u64) -> bool {
        if search(&self.sorted, key).is_ok() {
            return false;
        }
        if let Some(c) = &self.checkpointed {
            // The recent users wait for the next checkpoint.
            return !c.segments.runs_contain(key) && self.recent.insert(key);
        }
        if !self.recent.insert(key) {
            return false;
        }
        if self.recent.len() > MIN_RECENT.max(self.sorted.len() / 16) {
            self.compact();
        }
        true
    }

    /// Adds every user of `other`.
    pub fn union(&mut self, other: &UserSet) {
        let mut theirs: Vec<u64> = other.iter_unordered().filter(|k| !self.contains(*k)).collect();
        if theirs.is_empty() {
            return;
        }
        if self.checkpointed.is_some() {
            self.recent.extend(theirs);
            return;
        }
        theirs.sort_unstable();
        self.compact_with(theirs);
    }

    /// Merges the recent users into the sorted part (a set never checkpointed; a
    /// checkpointed one keeps them for its next checkpoint).
    pub fn compact(&mut self) {
        if !self.recent.is_empty() && self.checkpointed.is_none() {
            self.compact_with(Vec::new());
        }
    }

    /// Merges `more` (sorted, none of them held) and the recent users into the sorted part,
    /// a new vector of exactly the size needed.
    fn compact_with(&mut self, more: Vec<u64>) {
        let mut recent: Vec<u64> = std::mem::take(&mut self.recent).into_iter().collect();
        recent.sort_unstable();
        self.sorted = sorted_union(&self.sorted, &sorted_union(&more, &recent));
    }

    /// The users, in no particular order.
    pub fn iter_unordered(&self) -> impl Iterator<Item = u64> + '_ {
        let runs = self.checkpointed.iter().flat_map(|c| c.segments.run_keys());
        self.sorted.iter().copied().chain(runs).chain(self.recent.iter().copied())
    }

    /// The canonical encoding (see the module documentation). Cheapest right after
    /// [`UserSet::compact`] of a set never checkpointed; otherwise its parts are merged into
    /// a copy.
    pub fn encode(&self) -> Vec<u8> {
        if self.recent.is_empty() && self.checkpointed.as_ref().is_none_or(|c| c.in_runs == 0) {
            return encode_sorted(&self.sorted);
        }
        let mut all: Vec<u64> = self.iter_unordered().collect();
        all.sort_unstable();
        encode_sorted(&all)
    }

    /// Writes the users added since the last checkpoint (all of them, the first time) as
    /// new segments, merging segments as [`super::segments`] says; writes and deletions go
    /// to `out`, by segment number.
    pub fn checkpoint(&mut self, out: &mut SegmentWrites) {
        let first = self.checkpointed.is_none();
        let c = self.checkpointed.get_or_insert_with(Box::default);
        let mut fresh: Vec<u64> = self.recent.drain().collect();
        if first {
            fresh.extend(std::mem::take(&mut self.sorted));
        }
        self.recent.shrink_to_fit();
        fresh.sort_unstable();
        let mut full: Vec<u64> = Vec::new();
        let encode = |keys: &[u64]| encode_segment(keys);
        c.segments.checkpoint(fresh, SEGMENT_CAPACITY, &mut c.next_segment, &encode, out, &mut |keys| {
            full.extend_from_slice(keys)
        });
        c.in_runs = c.segments.runs_len();
        if !full.is_empty() {
            full.sort_unstable();
            self.sorted = sorted_union(&self.sorted, &full);
        }
    }

    /// Puts back segments [`UserSet::checkpoint`] wrote (restoring), by number and bytes.
    /// The full ones' users are merged into the sorted part once, all together.
    pub fn restore_segments<'a>(
        &mut self,
        segments: impl IntoIterator<Item = (u64, &'a [u8])>,
    ) -> Result<(), CodecError> {
        let c = self.checkpointed.get_or_insert_with(Box::default);
        let mut full: Vec<u64> = Vec::new();
        for (segment, bytes) in segments {
            let keys = decode_segment(bytes)?;
            c.next_segment = c.next_segment.max(segment + 1);
            if let Some(keys) = c.segments.restore(segment, keys.into_boxed_slice(), SEGMENT_CAPACITY) {
                full.extend_from_slice(&keys);
            }
        }
        c.in_runs = c.segments.runs_len();
        if !full.is_empty() {
            full.sort_unstable();
            self.sorted = sorted_union(&self.sorted, &full);
        }
        Ok(())
    }

    /// Its segments and the users they hold (`None`: none).
    pub(crate) fn segment_total(&self) -> Option<SegmentTotal> {
        self.checkpointed.as_ref().map(|c| c.segments.total()).filter(|total| total.segments > 0)
    }

    /// The numbers of its segments (to delete them when the set goes).
    pub fn segments(&self) -> Vec<u64> {
        self.checkpointed.as_ref().map(|c| c.segments.numbers().collect()).unwrap_or_default()
    }

    /// A set never checkpointed holding `keys` (sorted ascending, no repeats).
    pub(crate) fn from_sorted(keys: Vec<u64>) -> Self {
        debug_assert!(keys.windows(2).all(|w| w[0] < w[1]));
        UserSet { sorted: keys, ..UserSet::default() }
    }

    /// Takes the set apart: its users (sorted), those of them not checkpointed yet, and its
    /// segments with the next segment's number, once checkpointed.
    pub(crate) fn into_parts(mut self) -> SetParts {
        // The sorted part as it is; the few others sorted and merged in.
        let runs = self.checkpointed.iter().flat_map(|c| c.segments.run_keys());
        let mut rest: Vec<u64> = runs.chain(self.recent.iter().copied()).collect();
        rest.sort_unstable();
        let users = if rest.is_empty() {
            std::mem::take(&mut self.sorted)
        } else {
            sorted_union(&self.sorted, &rest)
        };
        let unsaved = match self.checkpointed {
            Some(_) => self.recent.into_iter().collect(),
            None => Vec::new(),
        };
        SetParts { users, unsaved, log: self.checkpointed.map(|c| (c.segments, c.next_segment)) }
    }

    /// Puts a set back together from [`UserSet::into_parts`]' parts (or parts kept
    /// elsewhere meanwhile): `users` sorted, `unsaved` among them.
    pub(crate) fn from_parts(parts: SetParts) -> Self {
        let SetParts { users, unsaved, log } = parts;
        let Some((segments, next_segment)) = log else { return UserSet::from_sorted(users) };
        // Each user in one part: the runs' own, the recent ones, the rest sorted.
        let mut elsewhere: Vec<u64> = segments.run_keys().chain(unsaved.iter().copied()).collect();
        elsewhere.sort_unstable();
        let sorted = sorted_difference(&users, &elsewhere);
        let in_runs = segments.runs_len();
        UserSet {
            sorted,
            recent: unsaved.into_iter().collect(),
            checkpointed: Some(Box::new(Checkpointed { segments, in_runs, next_segment })),
        }
    }

    /// Reads a set written by [`UserSet::encode`]; the bytes must be exactly one.
    pub fn decode(bytes: &[u8]) -> Result<(Self, usize), CodecError> {
        let (keys, used) = decode_sorted(bytes)?;
        Ok((UserSet { sorted: keys, ..UserSet::default() }, used))
    }
}

/// A set taken apart ([`UserSet::into_parts`]).
#[derive(Debug, Default)]
pub(crate) struct SetParts {
    /// Every user, sorted ascending.
    pub users: Vec<u64>,
    /// The users no checkpoint wrote yet.
    pub unsaved: Vec<u64>,
    /// Its segments and the number of the next, once checkpointed.
    pub log: Option<(Segments, u64)>,
}

/// A segment's bytes: the format version, then the users' Elias–Fano encoding.
pub(crate) fn encode_segment(keys: &[u64]) -> Vec<u8> {
    let mut out = vec![SEGMENT_FORMAT_VERSION];
    out.extend(encode_sorted(keys));
    debug_assert!(out.len() <= MAX_SEGMENT_BYTES);
    out
}

/// Reads a segment written by [`encode_segment`].
pub(crate) fn decode_segment(bytes: &[u8]) -> Result<Vec<u64>, CodecError> {
    match bytes.split_first() {
        Some((&SEGMENT_FORMAT_VERSION, encoded)) => match decode_sorted(encoded)? {
            (keys, used) if used == encoded.len() => Ok(keys),
            _ => Err(CodecError::Corrupt("user segment: trailing bytes".into())),
        },
        Some((&version, _)) => Err(CodecError::UnknownVersion(version)),
        None => Err(CodecError::Corrupt("empty user segment".into())),
    }
}

/// How many users a segment written by [`encode_segment`] holds, read from its start.
pub(crate) fn segment_len(bytes: &[u8]) -> Result<usize, CodecError> {
    match bytes.split_first() {
        Some((&SEGMENT_FORMAT_VERSION, encoded)) => get_varint(encoded)
            .and_then(|(n, _)| usize::try_from(n).ok())
            .ok_or_else(|| CodecError::Corrupt("user segment: no count".into())),
        Some((&version, _)) => Err(CodecError::UnknownVersion(version)),
        None => Err(CodecError::Corrupt("empty user segment".into())),
    }
}

/// The Elias–Fano encoding of sorted keys without repeats.
fn encode_sorted(keys: &[u64]) -> Vec<u8> {
    let n = keys.len();
    let mut out = Vec::with_capacity(n * 8 + 10);
    put_varint(&mut out, n as u64);
    if n == 0 {
        return out;
    }
    let l = low_bits(n);
    let mut bits = BitWriter::new(&mut out);
    for &k in keys {
        bits.put(k, l);
    }
    bits.finish();
    // High parts in unary: user i sets bit (k >> l) + i.
    let highs = (keys[n - 1] >> l) as usize + n;
    let mut unary = vec![0u8; highs.div_ceil(8)];
    for (i, &k) in keys.iter().enumerate() {
        let at = (k >> l) as usize + i;
        unary[at / 8] |= 1 << (at % 8);
    }
    out.extend(unary);
    out
}

/// Reads keys written by [`encode_sorted`], and how many bytes they took.
fn decode_sorted(bytes: &[u8]) -> Result<(Vec<u64>, usize), CodecError> {
    let corrupt = |why: &str| CodecError::Corrupt(format!("user set: {why}"));
    let (n, mut at) = get_varint(bytes).ok_or_else(|| corrupt("no count"))?;
    let n = usize::try_from(n).map_err(|_| corrupt("count out of range"))?;
    if n == 0 {
        return Ok((Vec::new(), at));
    }
    // Each user takes at least one bit: a count larger than the bytes is damage.
    if n > bytes.len().saturating_sub(at).saturating_mul(8) {
        return Err(corrupt("count larger than the data"));
    }
    let l = low_bits(n);
    let low_bytes = (n * l as usize).div_ceil(8);
    let lows = bytes.get(at..at + low_bytes).ok_or_else(|| corrupt("low bits cut short"))?;
    at += low_bytes;
    let mut reader = BitReader { bytes: lows, at: 0 };
    let mut keys = Vec::with_capacity(n);
    let mut bit = 0usize;
    for i in 0..n {
        // The next set bit of the unary part, a byte at a time.
        loop {
            let byte = *bytes.get(at + bit / 8).ok_or_else(|| corrupt("high bits cut short"))?;
            let ahead = byte >> (bit % 8);
            if ahead != 0 {
                bit += ahead.trailing_zeros() as usize;
                break;
            }
            bit += 8 - bit % 8;
        }
        let high = (bit - i) as u64;
        // `l` is at most 63: the shift never overflows its amount (damaged data may lose
        // high bits, and is then refused as out of order or read as some set).
        let key = (high << l) | reader.get(l);
        if keys.last().is_some_and(|last| *last >= key) {
            return Err(corrupt("users not strictly ascending"));
        }
        keys.push(key);
        bit += 1;
    }
    at += bit.div_ceil(8);
    Ok((keys, at))
}

/// Low bits per user for `n` users: `64 − ⌈log₂ n⌉`, at most 63.
fn low_bits(n: usize) -> u32 {
    let ceil_log2 = usize::BITS - (n.max(1) - 1).leading_zeros();
    (64 - ceil_log2).min(63)
}

/// The keys of sorted `a` that are not in sorted `b`.
fn sorted_difference(a: &[u64], b: &[u64]) -> Vec<u64> {
    let mut out = Vec::with_capacity(a.len().saturating_sub(b.len()));
    let mut j = 0;
    for &k in a {
        while j < b.len() && b[j] < k {
            j += 1;
        }
        if b.get(j) != Some(&k) {
            out.push(k);
        }
    }
    out
}

/// The union of two sorted slices without repeats.
pub(crate) fn sorted_union(a: &[u64], b: &[u64]) -> Vec<u64> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => (out.push(a[i]), i += 1),
            std::cmp::Ordering::Greater => (out.push(b[j]), j += 1),
            std::cmp::Ordering::Equal => (out.push(a[i]), (i, j) = (i + 1, j + 1)),
        };
    }
    out.extend_from_slice(&a[i..]);
    out.extend_from_slice(&b[j..]);
    out
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(bytes: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, &b) in bytes.iter().enumerate().take(10) {
        v |= u64::from(b & 0x7f).checked_shl(7 * i as u32)?;
        if b & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

/// Packs the low `width` bits of values, least significant first.
struct BitWriter<'a> {
    out: &'a mut Vec<u8>,
    acc: u128,
    filled: u32,
}

impl<'a> BitWriter<'a> {
    fn new(out: &'a mut Vec<u8>) -> Self {
        BitWriter { out, acc: 0, filled: 0 }
    }

    fn put(&mut self, value: u64, width: u32) {
        let mask = if width == 64 { u64::MAX } else { (1u64 << width) - 1 };
        self.acc |= u128::from(value & mask) << self.filled;
        self.filled += width;
        while self.filled >= 8 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.filled -= 8;
        }
    }

    fn finish(self) {
        if self.filled > 0 {
            self.out.push(self.acc as u8);
        }
    }
}

struct BitReader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl BitReader<'_> {
    /// The next `width` (at most 64) bits, least significant first; bits past the end read
    /// as zeros.
    fn get(&mut self, width: u32) -> u64 {
        // The (at most nine) bytes holding them, as one little-endian number.
        let (first, shift) = (self.at / 8, self.at % 8);
        let mut window = [0u8; 16];
        let available = self.bytes.len().saturating_sub(first).min(9);
        window[..available].copy_from_slice(&self.bytes[first..first + available]);
        let bits = u128::from_le_bytes(window) >> shift;
        self.at += width as usize;
        let mask = if width == 64 { u64::MAX } else { (1u64 << width) - 1 };
        (bits as u64) & mask
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    fn set_of(keys: &[u64]) -> UserSet {
        let mut s = UserSet::new();
        for &k in keys {
            s.insert(k);
        }
        s
    }

    proptest! {
        /// The set holds exactly the distinct keys, however they came (inserted one by
        /// one, or split and merged), and its encoding is the same bytes and reads back.
        #[test]
        fn holds_exactly_the_distinct_keys(keys in prop::collection::vec(any::<u64>(), 0..3000), split in 0usize..3000) {
            let want: BTreeSet<u64> = keys.iter().copied().collect();
            let one = set_of(&keys);
            prop_assert_eq!(one.len(), want.len());
            let split = split.min(keys.len());
            let mut merged = set_of(&keys[split..]);
            merged.union(&set_of(&keys[..split]));
            let mut reversed: Vec<u64> = keys.clone();
            reversed.reverse();
            let backwards = set_of(&reversed);
            let bytes = one.encode();
            prop_assert_eq!(&bytes, &merged.encode());
            prop_assert_eq!(&bytes, &backwards.encode());
            let (back, used) = UserSet::decode(&bytes).unwrap();
            prop_assert_eq!(used, bytes.len());
            prop_assert_eq!(back.sorted.clone(), want.iter().copied().collect::<Vec<_>>());
            prop_assert!(want.iter().all(|k| one.contains(*k)));
        }

        /// Damaged bytes are refused or read as some set, never a panic.
        #[test]
        fn damaged_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = UserSet::decode(&bytes);
        }
    }

    #[test]
    fn extreme_keys_and_sizes_round_trip() {
        for keys in [vec![], vec![0], vec![u64::MAX], vec![0, u64::MAX], vec![1, 2, 3, u64::MAX - 1]] {
            let s = set_of(&keys);
            let (back, _) = UserSet::decode(&s.encode()).unwrap();
            assert_eq!(back, s, "{keys:?}");
        }
    }

    /// The encoding's size follows from the count alone (Elias–Fano): at most 8 bytes a
    /// user from 10 users on. (Heap bytes are measured by `benches/state_size.rs`.)
    #[test]
    fn an_encoded_user_takes_at_most_eight_bytes() {
        let mut k = 0x9e37_79b9_7f4a_7c15u64;
        let mut keys = Vec::new();
        for n in [10, 1_000, 100_000] {
            while keys.len() < n {
                k = k.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                keys.push(k);
            }
            let s = set_of(&keys);
            let encoded = s.encode().len() as f64 / s.len() as f64;
            assert!(encoded <= 8.0, "{encoded} encoded bytes per user at {n}");
        }
    }
}
