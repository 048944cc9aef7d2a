//! Unique-user counting (MAU, DAU) with HyperLogLog++.
//!
//! [`UniqueUsers`] wraps `hyperloglogplus::HyperLogLogPlus` (version pinned exactly: its
//! serde layout is part of our checkpoint format). Users arrive already hashed
//! ([`UserKey`], xxh3-64 of the `user_id`), so the sketch's own hasher passes the key
//! through unchanged: each id is hashed once, with a hash that is the same in every
//! process, which is what makes sketches from different partitions and restarts mergeable.
//!
//! Up to [`EXACT_LIMIT`] distinct users are kept exactly, as sorted hashes; past that the
//! sketch takes over.
//!
//! Accuracy: HLL++ keeps a sparse representation with 25-bit indices while the app is
//! small, which is exact in practice (collisions among 1,000 users: ~1.5 % chance of one),
//! then switches to `2^p` six-bit registers with a relative standard error of
//! `1.04 / sqrt(2^p)` (0.81 % at the default p = 14).
//!
//! Determinism: once flushed, the sketch's state is a function of the *set* of keys
//! inserted (register maxima; a sparse list sorted and de-duplicated; the sparse→dense
//! switch depends only on the size of the sparse encoding, which never shrinks as keys are
//! added). So any insertion order or merge order gives byte-identical serializations.

use std::hash::{BuildHasher, Hasher};

use hyperloglogplus::{HyperLogLog, HyperLogLogPlus};
use serde::{Deserialize, Serialize};

use crate::ingest::UserKey;

/// HyperLogLog++ precision `p` (`2^p` registers): 10–18, default 14.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Precision(u8);

/// A precision outside the supported range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("HyperLogLog precision must be between {min} and {max}, got {0}", min = Precision::MIN, max = Precision::MAX)]
pub struct PrecisionError(pub i64);

impl Precision {
    /// The smallest supported precision (1,024 registers, ~3.3 % error).
    pub const MIN: u8 = 10;
    /// The largest supported precision (262,144 registers, ~0.2 % error).
    pub const MAX: u8 = 18;

    /// A checked precision.
    pub fn new(p: i64) -> Result<Self, PrecisionError> {
        u8::try_from(p)
            .ok()
            .filter(|p| (Self::MIN..=Self::MAX).contains(p))
            .map(Precision)
            .ok_or(PrecisionError(p))
    }

    /// The value of `p`.
    pub fn get(self) -> u8 {
        self.0
    }

    /// The relative standard error of the dense sketch, `1.04 / sqrt(2^p)`.
    pub fn standard_error(self) -> f64 {
        1.04 / f64::from(1u32 << self.0).sqrt()
    }
}

impl Default for Precision {
    fn default() -> Self {
        Precision(14)
    }
}

/// Passes an already-hashed [`UserKey`] through as the sketch's hash.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct PassThrough;

/// The hasher of [`PassThrough`]: returns the last `u64` written.
#[derive(Default)]
pub struct PassThroughHasher(u64);

impl Hasher for PassThroughHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` keys are inserted; fold anything else in rather than drop it.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, key: u64) {
        self.0 = key;
    }
}

impl BuildHasher for PassThrough {
    type Hasher = PassThroughHasher;

    fn build_hasher(&self) -> PassThroughHasher {
        PassThroughHasher(0)
    }
}

/// Distinct users a [`UniqueUsers`] keeps exactly (as sorted key hashes, 8 bytes each)
/// before the HLL++ sketch takes over. Small apps, and the daily sets of most apps, stay
/// small and exact, and never pay the sketch's buffering.
pub const EXACT_LIMIT: usize = 512;

/// A mergeable count of unique users: exact while small, HLL++ beyond [`EXACT_LIMIT`].
///
/// Which form a count has depends only on the set of users it holds (exact if and only if
/// at most `EXACT_LIMIT`), so equal sets give equal states whatever the order of inserts
/// and merges.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UniqueUsers {
    precision: Precision,
    users: Users,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
enum Users {
    /// At most `EXACT_LIMIT` distinct keys, sorted ascending.
    Exact(Vec<u64>),
    /// More than that.
    Sketch(Box<HyperLogLogPlus<u64, PassThrough>>),
}

/// Two sketches of different precision cannot be merged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot merge sketches of precision {0} and {1}")]
pub struct PrecisionMismatch(pub u8, pub u8);

fn empty_sketch(precision: Precision) -> Box<HyperLogLogPlus<u64, PassThrough>> {
    Box::new(
        HyperLogLogPlus::new(precision.get(), PassThrough)
            .expect("Precision is checked to lie in the range hyperloglogplus accepts"),
    )
}

impl UniqueUsers {
    /// An empty count.
    pub fn new(precision: Precision) -> Self {
        UniqueUsers { precision, users: Users::Exact(Vec::new()) }
    }

    /// The sketch's precision.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Whether the users are still counted exactly.
    pub fn is_exact(&self) -> bool {
        matches!(self.users, Users::Exact(_))
    }

    /// The exact count while there is one (at most [`EXACT_LIMIT`] users).
    pub fn exact_len(&self) -> Option<usize> {
        match &self.users {
            Users::Exact(keys) => Some(keys.len()),
            Users::Sketch(_) => None,
        }
    }

    /// Counts a user (again: repeats change nothing).
    #[inline]
    pub fn insert(&mut self, user: UserKey) {
        match &mut self.users {
            Users::Sketch(sketch) => sketch.insert(&user.0),
            Users::Exact(keys) => {
                if let Err(at) = keys.binary_search(&user.0) {
                    keys.insert(at, user.0);
                    if keys.len() > EXACT_LIMIT {
                        self.promote();
                    }
                }
            }
        }
    }

    /// Moves the exact keys into a sketch.
    fn promote(&mut self) {
        if let Users::Exact(keys) = &self.users {
            let mut sketch = empty_sketch(self.precision);
            for key in keys {
                sketch.insert(key);
            }
            self.users = Users::Sketch(sketch);
        }
    }

    /// Adds every user of `other` (set union; HLL union once either is a sketch).
    pub fn merge(&mut self, other: &UniqueUsers) -> Result<(), PrecisionMismatch> {
        let mismatch = PrecisionMismatch(self.precision.get(), other.precision.get());
        if self.precision != other.precision {
            return Err(mismatch);
        }
        match (&mut self.users, &other.users) {
            (Users::Sketch(mine), Users::Sketch(theirs)) => {
                mine.merge(theirs.as_ref()).map_err(|_| mismatch)?
            }
            (Users::Sketch(mine), Users::Exact(theirs)) => theirs.iter().for_each(|k| mine.insert(k)),
            (Users::Exact(mine), Users::Sketch(theirs)) => {
                let mut sketch = theirs.clone();
                mine.iter().for_each(|k| sketch.insert(k));
                self.users = Users::Sketch(sketch);
            }
            (Users::Exact(mine), Users::Exact(theirs)) => {
                mine.extend_from_slice(theirs);
                mine.sort_unstable();
                mine.dedup();
                if mine.len() > EXACT_LIMIT {
                    self.promote();
                }
            }
        }
        Ok(())
    }

    /// Moves the sketch's buffered keys into its body, so that serialization is canonical.
    pub fn flush(&mut self) {
        if let Users::Sketch(sketch) = &mut self.users {
            sketch.count();
        }
    }

    /// The number of unique users: exact while small, else the HLL++ estimate rounded
    /// half away from zero.
    pub fn estimate(&mut self) -> u64 {
        match &mut self.users {
            Users::Exact(keys) => keys.len() as u64,
            // `f64::round` rounds half away from zero; estimates are never negative.
            Users::Sketch(sketch) => sketch.count().round().max(0.0) as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sketch_of(users: impl IntoIterator<Item = u64>) -> UniqueUsers {
        let mut s = UniqueUsers::new(Precision::default());
        for u in users {
            s.insert(UserKey::of(&format!("user-{u}")));
        }
        s
    }

    #[test]
    fn small_sets_are_exact_and_repeats_do_not_count() {
        let mut s = sketch_of((0..1000).chain(0..1000));
        assert_eq!(s.estimate(), 1000);
        assert_eq!(UniqueUsers::new(Precision::default()).estimate(), 0);
    }

    #[test]
    fn serialization_is_canonical_for_any_order() {
        let mut a = sketch_of(0..5000);
        let mut b = sketch_of((0..5000).rev());
        a.flush();
        b.flush();
        assert_eq!(postcard::to_allocvec(&a).unwrap(), postcard::to_allocvec(&b).unwrap());
    }

    #[test]
    fn counts_turn_into_sketches_past_the_exact_limit_whatever_the_path() {
        let limit = EXACT_LIMIT as u64;
        let mut small = sketch_of(0..limit);
        assert!(small.is_exact());
        assert_eq!(small.estimate(), limit);
        let mut inserted = sketch_of(0..limit + 1);
        assert!(!inserted.is_exact());
        // The same set by merging two exact halves, and exact into a sketch.
        let mut merged = sketch_of(0..limit / 2);
        merged.merge(&sketch_of(limit / 2..limit + 1)).unwrap();
        assert!(!merged.is_exact());
        let mut into_sketch = sketch_of(0..limit + 1);
        into_sketch.merge(&sketch_of(0..10)).unwrap();
        for s in [&mut inserted, &mut merged, &mut into_sketch] {
            s.flush();
        }
        let bytes = |s: &UniqueUsers| postcard::to_allocvec(s).unwrap();
        assert_eq!(bytes(&inserted), bytes(&merged));
        assert_eq!(bytes(&inserted), bytes(&into_sketch));
    }

    #[test]
    fn precision_is_checked() {
        assert!(Precision::new(9).is_err());
        assert!(Precision::new(19).is_err());
        assert_eq!(Precision::new(16).unwrap().get(), 16);
        let mut a = UniqueUsers::new(Precision::new(12).unwrap());
        assert!(a.merge(&UniqueUsers::new(Precision::default())).is_err());
    }
}
