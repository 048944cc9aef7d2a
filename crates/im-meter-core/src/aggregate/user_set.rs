//! An exact set of 64-bit user hashes ([`UserSet`]): compact in memory, fast to add to,
//! and encoded canonically in little more than the information it holds.
//!
//! In memory: a sorted, exactly sized `Vec<u64>` holds most users (8 bytes each), and a
//! hash set of the users added since it was last rebuilt holds the rest; when that set
//! grows past a sixteenth of the sorted part (at least [`MIN_RECENT`]), the two are merged
//! into a new sorted vector. So a user costs 8 bytes plus its share of the recent users'
//! hash table (8.1 bytes in all, measured by `benches/state_size.rs` from 1,000 to a
//! million users; a merge briefly holds the set twice), and an insert costs a binary search,
//! a hash lookup and, amortized, about sixteen element moves.
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

use super::unique::PassThroughHasher;
use super::CodecError;

/// The recent users' hash set may grow to this size before it is merged, however small
/// the sorted part is.
pub const MIN_RECENT: usize = 64;

/// See the module documentation.
#[derive(Clone, Debug, Default)]
pub struct UserSet {
    /// Sorted ascending, no repeats, exactly sized.
    sorted: Vec<u64>,
    /// Users not in `sorted`.
    recent: HashSet<u64, BuildHasherDefault<PassThroughHasher>>,
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
        self.sorted.len() + self.recent.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether it holds `key`.
    pub fn contains(&self, key: u64) -> bool {
        self.sorted.binary_search(&key).is_ok() || self.recent.contains(&key)
    }

    /// Adds `key`; `true` if it was not there yet.
    #[inline]
    pub fn insert(&mut self, key: u64) -> bool {
        if self.sorted.binary_search(&key).is_ok() || !self.recent.insert(key) {
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
        theirs.sort_unstable();
        self.compact_with(theirs);
    }

    /// Merges the recent users into the sorted part.
    pub fn compact(&mut self) {
        if !self.recent.is_empty() {
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
        self.sorted.iter().copied().chain(self.recent.iter().copied())
    }

    /// The users in ascending order (the recent ones are merged in first).
    pub fn sorted(&mut self) -> &[u64] {
        self.compact();
        &self.sorted
    }

    /// The canonical encoding (see the module documentation). Cheapest right after
    /// [`UserSet::compact`]; otherwise the recent users are merged into a copy.
    pub fn encode(&self) -> Vec<u8> {
        let merged;
        let keys: &[u64] = if self.recent.is_empty() {
            &self.sorted
        } else {
            let mut recent: Vec<u64> = self.recent.iter().copied().collect();
            recent.sort_unstable();
            merged = sorted_union(&self.sorted, &recent);
            &merged
        };
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

    /// Reads a set written by [`UserSet::encode`]; the bytes must be exactly one.
    pub fn decode(bytes: &[u8]) -> Result<(Self, usize), CodecError> {
        let corrupt = |why: &str| CodecError::Corrupt(format!("user set: {why}"));
        let (n, mut at) = get_varint(bytes).ok_or_else(|| corrupt("no count"))?;
        let n = usize::try_from(n).map_err(|_| corrupt("count out of range"))?;
        if n == 0 {
            return Ok((UserSet::new(), at));
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
            // The next set bit of the unary part.
            loop {
                let byte = *bytes.get(at + bit / 8).ok_or_else(|| corrupt("high bits cut short"))?;
                if byte >> (bit % 8) & 1 == 1 {
                    break;
                }
                bit += 1;
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
        Ok((UserSet { sorted: keys, recent: HashSet::default() }, at))
    }
}

/// Low bits per user for `n` users: `64 − ⌈log₂ n⌉`, at most 63.
fn low_bits(n: usize) -> u32 {
    let ceil_log2 = usize::BITS - (n.max(1) - 1).leading_zeros();
    (64 - ceil_log2).min(63)
}

/// The union of two sorted slices without repeats.
fn sorted_union(a: &[u64], b: &[u64]) -> Vec<u64> {
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
    fn get(&mut self, width: u32) -> u64 {
        let mut value = 0u64;
        for b in 0..width as usize {
            let at = self.at + b;
            let bit = self.bytes.get(at / 8).map_or(0, |byte| byte >> (at % 8) & 1);
            value |= u64::from(bit) << b;
        }
        self.at += width as usize;
        value
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
