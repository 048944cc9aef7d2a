//! Unique-user counting (MAU, DAU): exact up to a limit, HyperLogLog++ beyond.
//!
//! [`UniqueUsers`] keeps the users of a count as an exact [`UserSet`] of their 64-bit
//! hashes ([`UserKey`], xxh3-64 of the `user_id`) up to its [`ExactLimit`]
//! (`metering.exact_limit`, a million by default), and past it switches, for good, to a
//! sketch of `hyperloglogplus::HyperLogLogPlus` (version pinned exactly: its serde layout
//! is part of our checkpoint format) built from the set. The sketch's own hasher passes the
//! key through unchanged: each id is hashed once, with a hash that is the same in every
//! process, which is what makes counts from different partitions and restarts mergeable.
//!
//! Accuracy: an exact count is exact up to hash collisions (with n users about n²/2⁶⁵
//! colliding pairs expected: 3 · 10⁻⁶ at ten million). A sketch has a relative standard
//! error of `1.04 / sqrt(2^p)` (0.81 % at the default p = 14); each figure says which it is
//! ([`Counted`]).
//!
//! Determinism: the form is a function of the set and the limit, and a flushed sketch's
//! state is a function of the *set* of keys inserted (register maxima; a sparse list
//! sorted and de-duplicated; the sparse→dense switch depends only on the size of the sparse
//! encoding, which never shrinks as keys are added). So any insertion order or merge order
//! gives byte-identical serializations.

use std::hash::{BuildHasher, Hasher};

use hyperloglogplus::{HyperLogLog, HyperLogLogPlus};
use serde::{Deserialize, Serialize};

use super::segments::SegmentWrites;
use super::user_set::UserSet;
use crate::ingest::UserKey;

/// HyperLogLog++ precision `p` (`2^p` registers): 10–18, default 14.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
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

/// How many distinct users a count keeps exactly (`metering.exact_limit`) before the HLL++
/// sketch takes over.
///
/// Memory is what bounds it: while its days are under the limit an app-month's users are one
/// table of about 12 bytes per monthly user (`user_days`), so the default of a million keeps
/// an app with a million users in about 12 MB, and one with days of under a million each in
/// at most 31 times that; once a day passes it, each day still exact is a set of about 8
/// bytes per user ([`UserSet`]).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ExactLimit(u64);

/// An exact limit below [`ExactLimit::MIN`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the exact limit must be at least {min} distinct users, got {0}", min = ExactLimit::MIN)]
pub struct ExactLimitError(pub i64);

impl ExactLimit {
    /// The smallest limit a configuration may set: the Developer plan's MAU cap (100) must
    /// be crossed while the count is exact, so that the crossing is seen exactly.
    pub const MIN: u64 = 1_000;
    /// The default: a million users (see the type's documentation).
    pub const DEFAULT: ExactLimit = ExactLimit(1_000_000);
    /// No limit: the identity of [`UniqueUsers::merge`]'s rule (the smaller limit wins).
    pub const UNBOUNDED: ExactLimit = ExactLimit(u64::MAX);
    /// The limit of counts written before it was configurable (aggregate format 2, and
    /// usage records published then).
    pub const FORMAT_2: ExactLimit = ExactLimit(512);

    /// A checked limit.
    pub fn new(n: i64) -> Result<Self, ExactLimitError> {
        u64::try_from(n).ok().filter(|n| *n >= Self::MIN).map(ExactLimit).ok_or(ExactLimitError(n))
    }

    /// The number of users.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl Default for ExactLimit {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// How unique users are counted: exactly up to a limit, then with HLL++ at a precision.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Counting {
    /// HLL++ precision of a count past the limit.
    pub precision: Precision,
    /// Distinct users counted exactly.
    pub exact_limit: ExactLimit,
}

impl Counting {
    /// Counting at `precision` with no exact limit: merges of counts made elsewhere start
    /// from it (the counts' own limits decide).
    pub fn merging(precision: Precision) -> Self {
        Counting { precision, exact_limit: ExactLimit::UNBOUNDED }
    }
}

/// A mergeable count of unique users: an exact set up to its [`ExactLimit`], HLL++ beyond.
///
/// The form depends only on the set of users and the limit (exact if and only if at most
/// `limit` users), and the sketch made at the switch holds exactly the set's users, so
/// equal sets give equal states whatever the order of inserts and merges. Merging takes
/// the smaller of the two limits (a minimum, so any merge order gives the same one).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UniqueUsers {
    precision: Precision,
    limit: ExactLimit,
    users: Users,
    /// Segments of the exact set this count was until it switched to a sketch, to delete at
    /// the next checkpoint.
    #[serde(skip)]
    retired: Vec<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
enum Users {
    /// At most `limit` users, encoded canonically ([`UserSet::encode`]).
    Exact(#[serde(with = "user_set_bytes")] UserSet),
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
    pub fn new(counting: Counting) -> Self {
        UniqueUsers {
            precision: counting.precision,
            limit: counting.exact_limit,
            users: Users::Exact(UserSet::new()),
            retired: Vec::new(),
        }
    }

    /// A count of the users of `users` (a sketch of them if they pass the limit).
    pub(crate) fn from_set(counting: Counting, users: UserSet) -> Self {
        let mut count = UniqueUsers { users: Users::Exact(users), ..UniqueUsers::new(counting) };
        if count.exact_len().is_some_and(|n| n as u64 > count.limit.get()) {
            count.promote();
        }
        count
    }

    /// A sketch of `users`, past the limit however few they are, with the segments of the
    /// exact set it was (to delete at the next checkpoint).
    pub(crate) fn sketch_of(counting: Counting, users: impl Iterator<Item = u64>, retired: Vec<u64>) -> Self {
        let mut sketch = empty_sketch(counting.precision);
        users.for_each(|key| sketch.insert(&key));
        UniqueUsers { users: Users::Sketch(sketch), retired, ..UniqueUsers::new(counting) }
    }

    /// Lowers its limit to `limit` if that is smaller (a sketch from then on if it holds more
    /// users).
    pub(crate) fn limit_to(&mut self, limit: ExactLimit) {
        if limit < self.limit {
            self.limit = limit;
            if self.exact_len().is_some_and(|n| n as u64 > limit.get()) {
                self.promote();
            }
        }
    }

    /// Whether it is an exact set and nothing else (no segments of a set it was, to delete).
    pub(crate) fn holds_exact_set(&self) -> bool {
        self.is_exact() && self.retired.is_empty()
    }

    /// The sketch's precision.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// How it counts.
    pub fn counting(&self) -> Counting {
        Counting { precision: self.precision, exact_limit: self.limit }
    }

    /// Whether the users are still counted exactly.
    pub fn is_exact(&self) -> bool {
        matches!(self.users, Users::Exact(_))
    }

    /// The exact count while there is one.
    pub fn exact_len(&self) -> Option<usize> {
        match &self.users {
            Users::Exact(users) => Some(users.len()),
            Users::Sketch(_) => None,
        }
    }

    /// Counts a user (again: repeats change nothing). `false` when it is known to have been
    /// counted already (an exact count held it); `true` when it is new, or a sketch cannot
    /// tell.
    #[inline]
    pub fn insert(&mut self, user: UserKey) -> bool {
        match &mut self.users {
            Users::Sketch(sketch) => {
                sketch.insert(&user.0);
                true
            }
            Users::Exact(users) => {
                let new = users.insert(user.0);
                if new && users.len() as u64 > self.limit.get() {
                    self.promote();
                }
                new
            }
        }
    }

    /// Replaces the exact set by a sketch of the same users, for good.
    fn promote(&mut self) {
        if let Users::Exact(users) = &self.users {
            let mut sketch = empty_sketch(self.precision);
            users.iter_unordered().for_each(|key| sketch.insert(&key));
            self.retired.extend(users.segments());
            self.users = Users::Sketch(sketch);
        }
    }

    /// What changed since the last checkpoint, as user segments ([`UserSet::checkpoint`];
    /// a count that switched to a sketch deletes its set's segments, the sketch being
    /// written with the count itself).
    pub fn checkpoint(&mut self, out: &mut SegmentWrites) {
        out.extend(self.retired.drain(..).map(|segment| (segment, None)));
        if let Users::Exact(users) = &mut self.users {
            users.checkpoint(out);
        }
    }

    /// Puts back segments of its exact set (restoring), by number and bytes. A count that is
    /// a sketch already holds every user of its set: segments left over are deleted at the
    /// next checkpoint.
    pub fn restore_segments<'a>(
        &mut self,
        segments: impl IntoIterator<Item = (u64, &'a [u8])>,
    ) -> Result<(), super::CodecError> {
        match &mut self.users {
            Users::Exact(users) => users.restore_segments(segments),
            Users::Sketch(_) => {
                self.retired.extend(segments.into_iter().map(|(segment, _)| segment));
                Ok(())
            }
        }
    }

    /// The numbers of its segments (to delete them with the count).
    pub fn segments(&self) -> Vec<u64> {
        let mut segments = self.retired.clone();
        if let Users::Exact(users) = &self.users {
            segments.extend(users.segments());
        }
        segments
    }

    /// Takes its exact set out, leaving an empty one (to encode the count without its users,
    /// which checkpoints write as segments); `None` for a sketch.
    pub(crate) fn take_users(&mut self) -> Option<UserSet> {
        match &mut self.users {
            Users::Exact(users) => Some(std::mem::take(users)),
            Users::Sketch(_) => None,
        }
    }

    /// Puts back what [`UniqueUsers::take_users`] took.
    pub(crate) fn put_users(&mut self, taken: Option<UserSet>) {
        if let (Users::Exact(users), Some(taken)) = (&mut self.users, taken) {
            *users = taken;
        }
    }

    /// Adds every user of `other` (set union; HLL union once either is a sketch, or the
    /// union passes the smaller of the two limits).
    pub fn merge(&mut self, other: &UniqueUsers) -> Result<(), PrecisionMismatch> {
        let mismatch = PrecisionMismatch(self.precision.get(), other.precision.get());
        if self.precision != other.precision {
            return Err(mismatch);
        }
        self.limit = self.limit.min(other.limit);
        match (&mut self.users, &other.users) {
            (Users::Sketch(mine), Users::Sketch(theirs)) => {
                mine.merge(theirs.as_ref()).map_err(|_| mismatch)?
            }
            (Users::Sketch(mine), Users::Exact(theirs)) => {
                theirs.iter_unordered().for_each(|k| mine.insert(&k))
            }
            (Users::Exact(mine), Users::Sketch(theirs)) => {
                let mut sketch = theirs.clone();
                mine.iter_unordered().for_each(|k| sketch.insert(&k));
                self.retired.extend(mine.segments());
                self.users = Users::Sketch(sketch);
            }
            (Users::Exact(mine), Users::Exact(theirs)) => mine.union(theirs),
        }
        if self.exact_len().is_some_and(|n| n as u64 > self.limit.get()) {
            self.promote();
        }
        Ok(())
    }

    /// Moves buffered keys into the body (the sketch's, or the set's sorted part), so that
    /// serialization is canonical and cheap.
    pub fn flush(&mut self) {
        match &mut self.users {
            Users::Sketch(sketch) => {
                sketch.count();
            }
            Users::Exact(users) => users.compact(),
        }
    }

    /// The number of unique users: exact while it can be, else the HLL++ estimate rounded
    /// half away from zero.
    pub fn estimate(&mut self) -> u64 {
        match &mut self.users {
            Users::Exact(users) => users.len() as u64,
            // `f64::round` rounds half away from zero; estimates are never negative.
            Users::Sketch(sketch) => sketch.count().round().max(0.0) as u64,
        }
    }

    /// How the figure [`UniqueUsers::estimate`] gives was counted.
    pub fn counted(&self) -> Counted {
        match self.users {
            Users::Exact(_) => Counted::Exact,
            Users::Sketch(_) => Counted::Estimated(self.precision),
        }
    }
}

/// How a unique-user figure was counted.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Counted {
    /// Exactly (up to 64-bit hash collisions: see [`UserSet`]).
    Exact,
    /// Estimated by HLL++ at this precision.
    Estimated(Precision),
}

impl Counted {
    /// `Exact` if both are, else the estimate (the coarser precision, were they to differ).
    pub fn and(self, other: Counted) -> Counted {
        match (self, other) {
            (Counted::Exact, c) | (c, Counted::Exact) => c,
            (Counted::Estimated(a), Counted::Estimated(b)) => Counted::Estimated(a.min(b)),
        }
    }

    /// Whether the figure is exact.
    pub fn is_exact(self) -> bool {
        self == Counted::Exact
    }
}

/// Exact sets travel as their canonical bytes.
mod user_set_bytes {
    use serde::de::Error as _;
    use serde::{Deserializer, Serializer};

    use super::UserSet;

    pub fn serialize<S: Serializer>(users: &UserSet, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&users.encode())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<UserSet, D::Error> {
        let bytes: &[u8] = serde::Deserialize::deserialize(d)?;
        match UserSet::decode(bytes) {
            Ok((users, used)) if used == bytes.len() => Ok(users),
            Ok(_) => Err(D::Error::custom("user set: trailing bytes")),
            Err(e) => Err(D::Error::custom(e)),
        }
    }
}

/// A count as aggregate format 2 wrote it: exact as a sorted list up to 512 users.
#[derive(Deserialize)]
pub(super) struct UniqueUsersV2 {
    precision: Precision,
    users: UsersV2,
}

#[derive(Deserialize)]
enum UsersV2 {
    Exact(Vec<u64>),
    Sketch(Box<HyperLogLogPlus<u64, PassThrough>>),
}

impl UniqueUsersV2 {
    /// The same count, keeping the limit it was made under (a count past 512 users was
    /// already a sketch, and stays one).
    pub(super) fn upgrade(self) -> UniqueUsers {
        let users = match self.users {
            UsersV2::Exact(keys) => {
                let mut set = UserSet::new();
                keys.into_iter().for_each(|k| {
                    set.insert(k);
                });
                set.compact();
                Users::Exact(set)
            }
            UsersV2::Sketch(sketch) => Users::Sketch(sketch),
        };
        UniqueUsers { precision: self.precision, limit: ExactLimit::FORMAT_2, users, retired: Vec::new() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limited(limit: u64) -> Counting {
        Counting { precision: Precision::default(), exact_limit: ExactLimit(limit) }
    }

    fn count_of(limit: u64, users: impl IntoIterator<Item = u64>) -> UniqueUsers {
        let mut s = UniqueUsers::new(limited(limit));
        for u in users {
            s.insert(UserKey::of(&format!("user-{u}")));
        }
        s
    }

    fn bytes(s: &mut UniqueUsers) -> Vec<u8> {
        s.flush();
        postcard::to_allocvec(s).unwrap()
    }

    #[test]
    fn counts_are_exact_up_to_the_limit_and_repeats_do_not_count() {
        let mut s = count_of(ExactLimit::DEFAULT.get(), (0..20_000).chain(0..20_000));
        assert_eq!((s.estimate(), s.counted()), (20_000, Counted::Exact));
        assert_eq!(UniqueUsers::new(Counting::default()).estimate(), 0);
    }

    #[test]
    fn serialization_is_canonical_for_any_order() {
        for limit in [1_000, 10_000] {
            let mut a = count_of(limit, 0..5000);
            let mut b = count_of(limit, (0..5000).rev());
            assert_eq!(a.is_exact(), limit == 10_000);
            assert_eq!(bytes(&mut a), bytes(&mut b));
        }
    }

    #[test]
    fn counts_turn_into_sketches_past_the_exact_limit_whatever_the_path() {
        let limit = 1_000;
        let mut small = count_of(limit, 0..limit);
        assert!(small.is_exact());
        assert_eq!(small.estimate(), limit);
        let mut inserted = count_of(limit, 0..limit + 1);
        assert_eq!(inserted.counted(), Counted::Estimated(Precision::default()));
        // The same set by merging two exact halves, and exact into a sketch.
        let mut merged = count_of(limit, 0..limit / 2);
        merged.merge(&count_of(limit, limit / 2..limit + 1)).unwrap();
        assert!(!merged.is_exact());
        let mut into_sketch = count_of(limit, 0..limit + 1);
        into_sketch.merge(&count_of(limit, 0..10)).unwrap();
        let mut sketch_into = count_of(limit, 0..10);
        sketch_into.merge(&count_of(limit, 0..limit + 1)).unwrap();
        let want = bytes(&mut inserted);
        for s in [&mut merged, &mut into_sketch, &mut sketch_into] {
            assert_eq!(bytes(s), want);
        }
    }

    #[test]
    fn a_merge_takes_the_smaller_limit() {
        // 600 users: exact under a limit of 1,000, a sketch under the format-2 limit (512).
        let mut big_limit = count_of(1_000, 0..300);
        let mut old = UniqueUsers::new(Counting { exact_limit: ExactLimit::FORMAT_2, ..Counting::default() });
        (300..600).for_each(|u| {
            old.insert(UserKey::of(&format!("user-{u}")));
        });
        big_limit.merge(&old).unwrap();
        assert!(!big_limit.is_exact());
        let mut unbounded = UniqueUsers::new(Counting::merging(Precision::default()));
        unbounded.merge(&count_of(1_000, 0..600)).unwrap();
        assert_eq!((unbounded.counting().exact_limit, unbounded.estimate()), (ExactLimit(1_000), 600));
    }

    #[test]
    fn format_2_counts_are_read_with_their_limit() {
        let keys: Vec<u64> = (0..5u64).map(|u| UserKey::of(&format!("user-{u}")).0).collect();
        #[derive(Serialize)]
        enum V2<'a> {
            Exact(&'a [u64]),
        }
        let v2 = postcard::to_allocvec(&(Precision::default(), V2::Exact(&keys))).unwrap();
        let read: UniqueUsersV2 = postcard::from_bytes(&v2).unwrap();
        let mut read = read.upgrade();
        assert_eq!(read.counting(), Counting { exact_limit: ExactLimit(512), ..Counting::default() });
        let mut fresh = UniqueUsers::new(Counting { exact_limit: ExactLimit(512), ..Counting::default() });
        keys.iter().for_each(|&k| {
            fresh.insert(UserKey(k));
        });
        assert_eq!(bytes(&mut read), bytes(&mut fresh));
    }

    #[test]
    fn limits_and_precisions_are_checked() {
        assert!(ExactLimit::new(999).is_err());
        assert!(ExactLimit::new(-1).is_err());
        assert_eq!(ExactLimit::new(1_000).unwrap().get(), 1_000);
        assert!(Precision::new(9).is_err());
        assert!(Precision::new(19).is_err());
        assert_eq!(Precision::new(16).unwrap().get(), 16);
        let mut a =
            UniqueUsers::new(Counting { precision: Precision::new(12).unwrap(), ..Counting::default() });
        assert!(a.merge(&UniqueUsers::new(Counting::default())).is_err());
    }
}
