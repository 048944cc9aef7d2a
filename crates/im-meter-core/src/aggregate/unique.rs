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
//!
//! Precision: each count keeps the precision it was made at, as it keeps its limit, so
//! `metering.hll_precision` applies to counts begun after it changed. Counts at different
//! precisions merge at the lower one (a minimum, so any merge order gives the same): an exact
//! set needs nothing, a sketch at a finer precision is folded to the coarser one
//! ([`fold`]), exactly — the coarse registers are a function of the fine ones.

use hyperloglogplus::{HyperLogLog, HyperLogLogPlus};
use serde::{Deserialize, Serialize};

use super::codec::CodecError;
use super::pass_through::PassThrough;
use super::segments::{SegmentTotal, SegmentWrites};
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
    /// Counting with no exact limit at the finest precision: the identity of merges (which
    /// take the smaller limit and the lower precision), so that merges of counts made
    /// elsewhere can start from it (the counts' own limits and precisions decide).
    pub fn merging() -> Self {
        Counting { precision: Precision(Precision::MAX), exact_limit: ExactLimit::UNBOUNDED }
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

/// The sketch of a count: the pinned hyperloglogplus's, over keys passed through.
type Sketch = HyperLogLogPlus<u64, PassThrough>;

/// Two counts could not be merged: a sketch did not read as the pinned hyperloglogplus lays
/// it out, so it could not be folded to a lower precision (damaged state, or a dependency
/// that changed under the pin).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot merge HLL++ sketches: {0}")]
pub struct MergeError(String);

fn empty_sketch(precision: Precision) -> Box<Sketch> {
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
    ) -> Result<(), CodecError> {
        match &mut self.users {
            Users::Exact(users) => users.restore_segments(segments),
            Users::Sketch(_) => {
                self.retired.extend(segments.into_iter().map(|(segment, _)| segment));
                Ok(())
            }
        }
    }

    /// The segments of its exact set and the users they hold (`None`: none, or a sketch,
    /// which is whole in its record).
    pub(crate) fn segment_total(&self) -> Option<SegmentTotal> {
        match &self.users {
            Users::Exact(users) => users.segment_total(),
            Users::Sketch(_) => None,
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

    /// Its exact set; `None` for a sketch.
    pub(crate) fn exact_users(&self) -> Option<&UserSet> {
        match &self.users {
            Users::Exact(users) => Some(users),
            Users::Sketch(_) => None,
        }
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

    /// Lowers its precision to `precision` if that is lower: an exact count only notes it
    /// (the precision it will become a sketch at), a sketch is folded to it.
    pub(crate) fn precision_to(&mut self, precision: Precision) -> Result<(), MergeError> {
        if precision < self.precision {
            if let Users::Sketch(sketch) = &mut self.users {
                *sketch = fold::fold(sketch, precision)?;
            }
            self.precision = precision;
        }
        Ok(())
    }

    /// Adds every user of `other` (set union; HLL union once either is a sketch, or the
    /// union passes the smaller of the two limits), at the lower of the two precisions.
    /// Fails only on a sketch that does not read as the pinned crate writes it.
    pub fn merge(&mut self, other: &UniqueUsers) -> Result<(), MergeError> {
        self.limit = self.limit.min(other.limit);
        self.precision_to(other.precision)?;
        // Their sketch at ours, when theirs is finer (ours is never finer now).
        let folded = match &other.users {
            Users::Sketch(theirs) if other.precision > self.precision => {
                Some(Users::Sketch(fold::fold(theirs, self.precision)?))
            }
            _ => None,
        };
        match (&mut self.users, folded.as_ref().unwrap_or(&other.users)) {
            (Users::Sketch(mine), Users::Sketch(theirs)) => mine
                .merge(theirs.as_ref())
                .map_err(|e| MergeError(format!("sketches of precision {}: {e:?}", self.precision.get())))?,
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

/// Folding a sketch to a lower precision, which hyperloglogplus 0.4.1 has no call for: its
/// state is read through its serde layout (pinned with the crate's version, as it is part of
/// our checkpoint format already) and the keys it stands for are inserted again at the lower
/// precision.
///
/// Why it is exact: a register at precision `p` holds, for the keys whose top `p` bits are
/// its index, the largest rank (1 + leading zeros of the bits after them). At `q < p` a key's
/// index is the top `q` of those bits, and its rank the leading zeros of the other `p - q`
/// index bits, or, if they are all zero, `p - q` plus its rank at `p`. So one key per
/// non-empty register — its index, then the rank's pattern — gives every register at `q` the
/// value the keys themselves would have. A sparse sketch is a list of keys cut to 25 bits
/// (with the rank of the rest when bits `p..25` are zero), which re-inserted give, at any
/// `q < p`, the very list (or registers) the keys would have.
pub(crate) mod fold {
    use std::marker::PhantomData;

    use hyperloglogplus::HyperLogLog;
    use serde::{Deserialize, Serialize};

    use super::{empty_sketch, MergeError, PassThrough, Precision, Sketch};

    /// The precision of the keys in the sparse form.
    const SPARSE_BITS: u32 = 25;

    /// `HyperLogLogPlus<u64, PassThrough>`'s fields, in the order its serde derive writes them.
    #[derive(Serialize, Deserialize)]
    struct Fields {
        builder: PassThrough,
        precision: u8,
        /// Registers, sparse-form registers, and the sparse form's size limit in bytes.
        counts: (usize, usize, usize),
        /// Sparse-form keys not merged into `sparse` yet (a `HashSet<u32>`).
        tmpset: Vec<u32>,
        sparse: SparseFields,
        registers: Option<RegisterFields>,
        phantom: PhantomData<u64>,
    }

    /// The sparse form: sorted keys, difference- then varint-encoded.
    #[derive(Serialize, Deserialize)]
    struct SparseFields {
        count: usize,
        last: u32,
        buf: Vec<u8>,
    }

    /// The dense form: 6-bit registers, five to a `u32` from the least significant bits.
    #[derive(Serialize, Deserialize)]
    struct RegisterFields {
        buf: Vec<u32>,
        count: usize,
        zeros: usize,
    }

    const PER_WORD: usize = 5;

    fn broken(what: impl std::fmt::Display) -> MergeError {
        MergeError(format!("a sketch does not read as hyperloglogplus 0.4.1 lays it out: {what}"))
    }

    fn fields_of(sketch: &Sketch) -> Result<Fields, MergeError> {
        let bytes = postcard::to_allocvec(sketch).map_err(broken)?;
        postcard::from_bytes(&bytes).map_err(broken)
    }

    fn sketch_of(fields: &Fields) -> Result<Box<Sketch>, MergeError> {
        let bytes = postcard::to_allocvec(fields).map_err(broken)?;
        postcard::from_bytes(&bytes).map(Box::new).map_err(broken)
    }

    /// An empty sketch at `precision` in the dense form: what a fold of a dense sketch goes
    /// into, since keys standing for registers must not be counted as keys by the sparse
    /// form's estimate (a dense sketch at a finer precision holds more keys than would keep
    /// the coarser one sparse, so it is the form the keys themselves would have given).
    fn empty_dense(precision: Precision) -> Result<Box<Sketch>, MergeError> {
        let mut fields = fields_of(&empty_sketch(precision))?;
        let count = fields.counts.0;
        fields.registers =
            Some(RegisterFields { buf: vec![0; count.div_ceil(PER_WORD)], count, zeros: count });
        sketch_of(&fields)
    }

    /// The keys of a sparse form's varint-encoded differences.
    fn sparse_keys(sparse: &SparseFields) -> Result<Vec<u32>, MergeError> {
        let mut keys = Vec::with_capacity(sparse.count);
        let (mut last, mut value, mut shift) = (0u32, 0u32, 0u32);
        for &byte in &sparse.buf {
            let bits = u32::from(byte & 0x7f);
            value |= bits
                .checked_shl(shift)
                .filter(|v| v >> shift == bits)
                .ok_or_else(|| broken("a varint overflows"))?;
            shift += 7;
            if byte & 0x80 == 0 {
                last = last.checked_add(value).ok_or_else(|| broken("sparse keys overflow"))?;
                keys.push(last);
                (value, shift) = (0, 0);
            }
        }
        if shift != 0 {
            return Err(broken("a truncated varint"));
        }
        Ok(keys)
    }

    /// A 64-bit key whose sparse-form encoding is `code` (the index's 25 bits, then, when
    /// the encoding carries it, the rank of the bits after them).
    fn key_of_code(code: u32) -> u64 {
        let rest = 64 - SPARSE_BITS;
        if code & 1 == 1 {
            let (index, rank) = (u64::from(code >> 7), (code >> 1) & 0x3f);
            index << rest | rank_pattern(rest, rank)
        } else {
            // Bits p..25 are not all zero: the rank at any precision up to p is among them.
            u64::from(code >> 1) << rest | 1 << (rest - 1)
        }
    }

    /// Bits (the `width` lowest) whose rank — 1 + their leading zeros, or `width + 1` when
    /// all zero — is `rank`.
    fn rank_pattern(width: u32, rank: u32) -> u64 {
        match rank {
            1..=64 if rank <= width => 1 << (width - rank),
            _ => 0,
        }
    }

    /// Whether `sketch` is in the dense form (for tests to know which form they fold).
    #[cfg(test)]
    pub(crate) fn is_dense(sketch: &Sketch) -> bool {
        fields_of(sketch).is_ok_and(|fields| fields.registers.is_some())
    }

    /// `sketch` at `to`, a lower precision than its own (see the module documentation).
    pub(crate) fn fold(sketch: &Sketch, to: Precision) -> Result<Box<Sketch>, MergeError> {
        let fields = fields_of(sketch)?;
        let from = u32::from(fields.precision);
        // Checked so that the shifts below cannot overflow on a damaged sketch.
        if from <= u32::from(to.get()) || from > u32::from(Precision::MAX) {
            return Err(broken(format!("a fold from precision {from} to {}", to.get())));
        }
        match &fields.registers {
            None => {
                let mut folded = empty_sketch(to);
                for code in fields.tmpset.iter().copied().chain(sparse_keys(&fields.sparse)?) {
                    folded.insert(&key_of_code(code));
                }
                Ok(folded)
            }
            Some(registers) => {
                let mut folded = empty_dense(to)?;
                let values = registers
                    .buf
                    .iter()
                    .flat_map(|word| (0..PER_WORD).map(move |i| (word >> (6 * i)) & 0x3f))
                    .take(registers.count);
                let width = 64 - from;
                if registers.count != 1 << from {
                    return Err(broken(format!("{} registers at precision {from}", registers.count)));
                }
                for (index, rank) in values.enumerate().filter(|&(_, rank)| rank > 0) {
                    folded.insert(&((index as u64) << width | rank_pattern(width, rank)));
                }
                Ok(folded)
            }
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
        let mut unbounded = UniqueUsers::new(Counting::merging());
        unbounded.merge(&count_of(1_000, 0..600)).unwrap();
        assert_eq!((unbounded.counting(), unbounded.estimate()), (limited(1_000), 600));
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
    }

    fn at(precision: u8, limit: u64, users: impl IntoIterator<Item = u64>) -> UniqueUsers {
        let counting = Counting { precision: Precision(precision), exact_limit: ExactLimit(limit) };
        let mut s = UniqueUsers::new(counting);
        for u in users {
            s.insert(UserKey::of(&format!("user-{u}")));
        }
        s
    }

    /// Exact counts are sets: their precision is only the one they would become a sketch at,
    /// and a merge takes the lower (a minimum, as for the limit: any order gives the same).
    #[test]
    fn exact_counts_merge_whatever_their_precision() {
        let mut a = at(12, 10_000, 0..600);
        a.merge(&at(16, 10_000, 300..900)).expect("exact counts always merge");
        assert_eq!((a.estimate(), a.counted(), a.precision().get()), (900, Counted::Exact, 12));
        let mut b = at(16, 10_000, 300..900);
        b.merge(&at(12, 10_000, 0..600)).expect("exact counts always merge");
        assert_eq!(bytes(&mut a), bytes(&mut b));
        // Past the limit, the union becomes a sketch at the lower precision.
        let mut c = at(16, 1_000, 0..600);
        c.merge(&at(12, 1_000, 600..1_200)).expect("exact counts always merge");
        assert_eq!(bytes(&mut c), bytes(&mut at(12, 1_000, 0..1_200)));
    }

    /// A sketch at a finer precision is folded to the coarser one exactly: merged, two
    /// counts at 14 and 16 give the bytes of the union counted at 14, sparse or dense, in
    /// either order, with an exact side or a sketch.
    #[test]
    fn sketches_at_different_precisions_merge_at_the_lower() {
        let mut forms = std::collections::BTreeSet::new();
        for (n, lower) in [(3_000u64, 14u8), (120_000, 14), (120_000, 10)] {
            let want = bytes(&mut at(lower, 1_000, 0..n));
            let halves = [(0..n / 2 + 100, n / 2..n), (0..500, 200..n)];
            for (first, second) in halves {
                for (p, q) in [(lower, 16), (16, lower), (18, lower)] {
                    let finer = at(p.max(q), 1_000, if p > q { first.clone() } else { second.clone() });
                    if let Users::Sketch(sketch) = &finer.users {
                        forms.insert(fold::is_dense(sketch));
                    }
                    let mut merged = at(p, 1_000, first.clone());
                    merged.merge(&at(q, 1_000, second.clone())).expect("precisions merge at the lower");
                    assert_eq!(merged.precision().get(), lower);
                    assert_eq!(bytes(&mut merged), want, "{n} users, {p} ∪ {q}");
                }
            }
        }
        assert_eq!(forms.into_iter().collect::<Vec<_>>(), [false, true], "sparse and dense sketches folded");
    }
}
