//! The exact MAU and DAU of an app-month as one table ([`UserDays`]): each monthly user's
//! 64-bit hash once, with a bit for every day of the month it logged in on.
//!
//! Why one table: a day's users are among the month's, so holding each day as a set of its
//! own (8 bytes per user per day) stored most users six times over at a fifth of them active
//! a day. What a day still has to do is kept: a late login of a day counts once (its bit),
//! the peak is the largest day (a count per day), and shares of an app from several
//! partitions merge into exact per-day unions (the days of a user or-ed). In memory: a
//! sorted `Vec<u64>` of users with a parallel `Vec<u32>` of their days, and a hash map of the
//! users added since it was last rebuilt (merged in when it passes a sixteenth of the sorted
//! part): about 12.2 bytes per monthly user, whatever the number of days
//! (`tests/state_memory.rs`, `benches/state_size.rs`).
//!
//! The table serves while every day's users are under the exact limit, and counts the MAU
//! too while the month's are: past that, the MAU is a sketch of its own beside it
//! ([`UserDays::sketch_month`]: no MAU segments any more). Once a day passes the limit the
//! aggregate takes the table apart into separate counts (each day an exact set until it
//! passes the limit: [`super::unique`]).
//!
//! Checkpointed (the worker), it writes what separate counts would: the MAU's and each
//! day's users added since the last checkpoint, as segments of that count
//! ([`super::segments`]), so the changelog — read by restores, billing and the usage API — is
//! the same. The segments that are not full keep their keys for merges; so that the days
//! past do not each hold theirs all month, a day before the month's latest that a checkpoint
//! did not change has its small segments frozen: counted as full (never merged again), their
//! keys dropped (the table has them). A day that collects [`FROZEN_REWRITE`] frozen segments
//! (late logins trickling in) is rewritten whole at its next change, which bounds the
//! records a restore reads.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasherDefault;

use super::pass_through::PassThroughHasher;
use super::segments::{SegmentTotal, SegmentWrites, Segments};
use super::sorted::search;
use super::user_count::UserCount;
use super::user_set::{self, SetParts, UserSet, MIN_RECENT, SEGMENT_CAPACITY};

/// Frozen segments a day may collect before its next change rewrites it whole.
pub const FROZEN_REWRITE: usize = 8;

/// Count number 0 in a [`Log`]: the MAU; 1–31 are days of the month.
const MAU: u8 = 0;

/// See the module documentation.
#[derive(Clone, Debug, Default)]
pub(crate) struct UserDays {
    /// Users, sorted ascending, exactly sized.
    keys: Vec<u64>,
    /// `days[i]`: bit d set if `keys[i]` logged in on day d.
    days: Vec<u32>,
    /// Users not in `keys` yet, with their days.
    recent: HashMap<u64, u32, BuildHasherDefault<PassThroughHasher>>,
    /// Users of each day.
    day_len: [u32; 32],
    /// Checkpoint state, once checkpointed.
    log: Option<Box<Log>>,
    /// The month's users are counted by a sketch of their own (past the exact limit): the
    /// table writes no MAU segments.
    month_sketched: bool,
}

/// What a checkpointed table writes next, and its counts' segments.
#[derive(Clone, Debug, Default)]
struct Log {
    /// Users added to a count since the last checkpoint: (user, count number).
    fresh: Vec<(u64, u8)>,
    /// Each count's segments, by count number.
    counts: BTreeMap<u8, CountLog>,
}

/// One count's segments.
#[derive(Clone, Debug, Default)]
struct CountLog {
    segments: Segments,
    next_segment: u64,
    /// Small segments frozen (counted as full) since it was last written whole.
    frozen: usize,
}

fn count_of(number: u8) -> UserCount {
    match number {
        MAU => UserCount::Mau,
        day => UserCount::Dau(day),
    }
}

impl UserDays {
    /// Monthly users.
    pub fn len(&self) -> usize {
        self.keys.len() + self.recent.len()
    }

    /// Users of day `day`.
    pub fn day_len(&self, day: u8) -> u64 {
        u64::from(self.day_len[usize::from(day)])
    }

    /// The days with a user, ascending.
    pub fn days(&self) -> impl Iterator<Item = u8> + '_ {
        (1..=31u8).filter(|&d| self.day_len[usize::from(d)] > 0)
    }

    /// From now on the month's users are counted by a sketch of their own: the table writes
    /// no MAU segments. Returns those it wrote, to delete.
    pub fn sketch_month(&mut self) -> Vec<u64> {
        self.month_sketched = true;
        let Some(log) = self.log.as_deref_mut() else { return Vec::new() };
        log.fresh.retain(|&(_, number)| number != MAU);
        log.counts.remove(&MAU).map(|count| count.segments.numbers().collect()).unwrap_or_default()
    }

    /// The first day by whose end more than `n` users had logged in this month (each user
    /// counted from its first day); `None` if the month has `n` users or fewer.
    pub fn day_passing(&self, n: u64) -> Option<u8> {
        let mut first_days = [0u64; 32];
        for &mask in self.days.iter().chain(self.recent.values()) {
            first_days[mask.trailing_zeros().min(31) as usize] += 1;
        }
        let mut users = 0;
        (1..=31u8).find(|&d| {
            users += first_days[usize::from(d)];
            users > n
        })
    }

    /// The busiest day's users.
    pub fn peak_day(&self) -> u64 {
        self.day_len.iter().copied().max().map_or(0, u64::from)
    }

    /// A login of `key` on day `day` (1–31); `true` if `key` is a new monthly user.
    #[inline]
    pub fn insert(&mut self, key: u64, day: u8) -> bool {
        self.add_days(key, 1 << day)
    }

    /// Adds the days `mask` to `key`'s (none: a monthly user); `true` if `key` is a new
    /// monthly user.
    #[inline]
    pub fn add_days(&mut self, key: u64, mask: u32) -> bool {
        let (known, had) = match search(&self.keys, key) {
            Ok(i) => {
                let had = self.days[i];
                self.days[i] = had | mask;
                (true, had)
            }
            Err(_) => match self.recent.entry(key) {
                Entry::Occupied(mut e) => {
                    let had = *e.get();
                    *e.get_mut() = had | mask;
                    (true, had)
                }
                Entry::Vacant(e) => {
                    e.insert(mask);
                    (false, 0)
                }
            },
        };
        let added = mask & !had;
        if added != 0 {
            let mut bits = added;
            while bits != 0 {
                self.day_len[bits.trailing_zeros() as usize] += 1;
                bits &= bits - 1;
            }
            if let Some(log) = &mut self.log {
                if !known && !self.month_sketched {
                    log.fresh.push((key, MAU));
                }
                let mut bits = added;
                while bits != 0 {
                    log.fresh.push((key, bits.trailing_zeros() as u8));
                    bits &= bits - 1;
                }
            }
        }
        if !known && self.recent.len() > MIN_RECENT.max(self.keys.len() / 16) {
            self.compact();
        }
        !known
    }

    /// Adds every user of `other` with its days (the union of the month's and each day's).
    pub fn union(&mut self, other: &UserDays) {
        other.for_each_sorted(|key, mask| {
            self.add_days(key, mask);
        });
    }

    /// Merges the recent users into the sorted part.
    fn compact(&mut self) {
        if self.recent.is_empty() {
            return;
        }
        let mut recent: Vec<(u64, u32)> = std::mem::take(&mut self.recent).into_iter().collect();
        recent.sort_unstable_by_key(|&(key, _)| key);
        let n = self.keys.len() + recent.len();
        let (mut keys, mut days) = (Vec::with_capacity(n), Vec::with_capacity(n));
        let mut recent = recent.into_iter().peekable();
        for (&key, &mask) in self.keys.iter().zip(&self.days) {
            while let Some((k, m)) = recent.next_if(|&(k, _)| k < key) {
                keys.push(k);
                days.push(m);
            }
            keys.push(key);
            days.push(mask);
        }
        for (k, m) in recent {
            keys.push(k);
            days.push(m);
        }
        self.keys = keys;
        self.days = days;
    }

    /// The month's users, in no particular order.
    pub fn users(&self) -> impl Iterator<Item = u64> + '_ {
        self.keys.iter().chain(self.recent.keys()).copied()
    }

    /// Calls `f` with every user and its days, users ascending.
    fn for_each_sorted(&self, mut f: impl FnMut(u64, u32)) {
        let mut recent: Vec<(u64, u32)> = self.recent.iter().map(|(&k, &m)| (k, m)).collect();
        recent.sort_unstable_by_key(|&(key, _)| key);
        let mut recent = recent.into_iter().peekable();
        for (&key, &mask) in self.keys.iter().zip(&self.days) {
            while let Some((k, m)) = recent.next_if(|&(k, _)| k < key) {
                f(k, m);
            }
            f(key, mask);
        }
        recent.for_each(|(k, m)| f(k, m));
    }

    /// The users of count `number` (0: every monthly user), ascending.
    fn users_of(&self, number: u8) -> Vec<u64> {
        let mut users = Vec::with_capacity(match number {
            MAU => self.len(),
            day => self.day_len(day) as usize,
        });
        self.for_each_sorted(|key, mask| {
            if number == MAU || mask & (1 << number) != 0 {
                users.push(key);
            }
        });
        users
    }

    /// The month's users and each day's, ascending.
    fn split(&self) -> (Vec<u64>, BTreeMap<u8, Vec<u64>>) {
        let mut days: BTreeMap<u8, Vec<u64>> =
            self.days().map(|d| (d, Vec::with_capacity(self.day_len(d) as usize))).collect();
        let mut mau = Vec::with_capacity(self.len());
        self.for_each_sorted(|key, mut mask| {
            mau.push(key);
            while mask != 0 {
                if let Some(users) = days.get_mut(&(mask.trailing_zeros() as u8)) {
                    users.push(key);
                }
                mask &= mask - 1;
            }
        });
        (mau, days)
    }

    /// The month's users and each day's, as exact sets (not checkpointed).
    pub fn to_sets(&self) -> (UserSet, BTreeMap<u8, UserSet>) {
        let (mau, days) = self.split();
        (
            UserSet::from_sorted(mau),
            days.into_iter().map(|(d, users)| (d, UserSet::from_sorted(users))).collect(),
        )
    }

    /// Builds the table from separate exact counts (restoring, or reading a share): their
    /// segments become the table's.
    pub fn from_sets(mau: UserSet, days: BTreeMap<u8, UserSet>) -> Self {
        let mut table = UserDays::default();
        let mut log = Log::default();
        let mut checkpointed = false;
        let mut parts: Vec<(u8, SetParts)> =
            std::iter::once((MAU, mau)).chain(days).map(|(number, set)| (number, set.into_parts())).collect();
        if parts[0].1.users.is_empty() {
            // No month's set (past the limit the MAU is a sketch): its users are the days'.
            let month = parts[1..]
                .iter()
                .fold(Vec::new(), |month, (_, day)| user_set::sorted_union(&month, &day.users));
            parts[0].1.users = month;
        }
        for (number, SetParts { users, unsaved, log: segments }) in parts {
            let mask = if number == MAU { 0 } else { 1 << number };
            if number == MAU {
                // The month's users first, in order: the sorted part, built at once.
                table.days = vec![0; users.len()];
                table.keys = users;
            } else {
                // Both sorted: one walk sets the day's bits. Every day's user is a monthly
                // user; one that is not (damaged state) is added as one.
                let mut at = 0;
                for key in users {
                    // Galloping from the last one: a day holds a good share of the month's
                    // users, so the next is usually a few places on.
                    let mut step = 1;
                    while table.keys.get(at + step).is_some_and(|&k| k < key) {
                        step *= 2;
                    }
                    let window = &table.keys[at..table.keys.len().min(at + step + 1)];
                    at += window.partition_point(|&k| k < key);
                    match table.keys.get(at) {
                        Some(&k) if k == key => {
                            table.days[at] |= mask;
                            table.day_len[usize::from(number)] += 1;
                        }
                        _ => {
                            table.add_days(key, mask);
                        }
                    }
                }
            }
            log.fresh.extend(unsaved.into_iter().map(|key| (key, number)));
            if let Some((segments, next_segment)) = segments {
                checkpointed = true;
                log.counts.insert(number, CountLog { segments, next_segment, frozen: 0 });
            }
        }
        table.compact();
        if checkpointed {
            table.log = Some(Box::new(log));
        }
        table
    }

    /// Takes the table apart into separate exact counts, their segments with them.
    pub fn into_sets(mut self) -> (UserSet, BTreeMap<u8, UserSet>) {
        let mut log = self.log.take().map(|log| *log);
        let mut parts = |number: u8, users: Vec<u64>| {
            let Some(log) = log.as_mut() else { return UserSet::from_sorted(users) };
            let unsaved = log.fresh.iter().filter(|&&(_, n)| n == number).map(|&(key, _)| key).collect();
            // A count with no segments yet: all its users are fresh.
            let count = log.counts.remove(&number).unwrap_or_default();
            UserSet::from_parts(SetParts { users, unsaved, log: Some((count.segments, count.next_segment)) })
        };
        let (mau, days) = self.split();
        let days = days.into_iter().map(|(d, users)| (d, parts(d, users))).collect();
        (parts(MAU, mau), days)
    }

    /// Writes the users added to each count since the last checkpoint (all of them, the
    /// first time) as segments of that count, into `out`, and freezes the small segments of
    /// the days past that it leaves untouched (see the module documentation).
    pub fn checkpoint(&mut self, out: &mut Vec<(UserCount, SegmentWrites)>) {
        let fresh: Vec<(u64, u8)> = match self.log.as_deref_mut() {
            Some(log) => std::mem::take(&mut log.fresh),
            None => {
                let mut all = Vec::new();
                let month = !self.month_sketched;
                self.for_each_sorted(|key, mut mask| {
                    if month {
                        all.push((key, MAU));
                    }
                    while mask != 0 {
                        all.push((key, mask.trailing_zeros() as u8));
                        mask &= mask - 1;
                    }
                });
                all
            }
        };
        let mut by_count: BTreeMap<u8, Vec<u64>> = BTreeMap::new();
        for (key, number) in fresh {
            by_count.entry(number).or_default().push(key);
        }
        // Counts due a rewrite: written whole (their users read from the table).
        let rewrites: Vec<u8> = match self.log.as_deref() {
            Some(log) => by_count
                .keys()
                .copied()
                .filter(|n| log.counts.get(n).is_some_and(|c| c.frozen >= FROZEN_REWRITE))
                .collect(),
            None => Vec::new(),
        };
        for &number in &rewrites {
            by_count.insert(number, self.users_of(number));
        }
        let log = self.log.get_or_insert_with(Box::default);
        let latest = (1..=31u8).rev().find(|&d| self.day_len[usize::from(d)] > 0).unwrap_or(0);
        for (&number, count) in log.counts.iter_mut() {
            // A past day this checkpoint does not touch: its small segments are frozen.
            if number != MAU
                && number < latest
                && !by_count.contains_key(&number)
                && !count.segments.runs.is_empty()
            {
                count.frozen += count.segments.freeze_runs();
            }
        }
        for (number, mut keys) in by_count {
            let count = log.counts.entry(number).or_default();
            let mut writes = SegmentWrites::new();
            if rewrites.contains(&number) {
                writes.extend(count.segments.numbers().map(|segment| (segment, None)));
                count.segments = Segments::default();
                count.frozen = 0;
            }
            keys.sort_unstable();
            keys.dedup();
            count.segments.checkpoint(
                keys,
                SEGMENT_CAPACITY,
                &mut count.next_segment,
                &user_set::encode_segment,
                &mut writes,
                &mut |_| {},
            );
            out.push((count_of(number), writes));
        }
    }

    /// Keys the counts' small segments hold (besides the table's).
    #[cfg(test)]
    pub fn segment_keys_held(&self) -> usize {
        self.log.iter().flat_map(|log| log.counts.values()).map(|c| c.segments.runs_len()).sum()
    }

    /// Each count's segments and the users they hold (the counts with any).
    pub fn segment_totals(&self) -> impl Iterator<Item = (UserCount, SegmentTotal)> + '_ {
        self.log
            .iter()
            .flat_map(|log| log.counts.iter())
            .map(|(&number, count)| (count_of(number), count.segments.total()))
            .filter(|(_, total)| total.segments > 0)
    }

    /// Each count's segment numbers (to delete them with the app-month).
    pub fn segments(&self) -> Vec<(UserCount, Vec<u64>)> {
        self.log
            .iter()
            .flat_map(|log| log.counts.iter())
            .map(|(&number, count)| (count_of(number), count.segments.numbers().collect()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, HashSet};

    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// The table holds each day's users and the month's, however they came.
        #[test]
        fn holds_the_month_s_and_each_day_s_users(
            logins in prop::collection::vec((any::<u64>().prop_map(|k| k % 5_000), 1u8..=31), 0..4_000),
            split in 0usize..4_000,
        ) {
            let mut want: BTreeMap<u8, BTreeSet<u64>> = BTreeMap::new();
            let mut one = UserDays::default();
            for &(key, day) in &logins {
                want.entry(day).or_default().insert(key);
                one.insert(key, day);
            }
            let split = split.min(logins.len());
            let (mut a, mut b) = (UserDays::default(), UserDays::default());
            logins[..split].iter().for_each(|&(k, d)| { a.insert(k, d); });
            logins[split..].iter().for_each(|&(k, d)| { b.insert(k, d); });
            b.union(&a);
            let month: HashSet<u64> = logins.iter().map(|&(k, _)| k).collect();
            for table in [&one, &b] {
                prop_assert_eq!(table.len(), month.len());
                let (mau, days) = table.to_sets();
                prop_assert_eq!(mau.len(), month.len());
                prop_assert_eq!(days.keys().copied().collect::<Vec<_>>(), want.keys().copied().collect::<Vec<_>>());
                for (d, users) in &want {
                    prop_assert_eq!(table.day_len(*d), users.len() as u64);
                    prop_assert!(users.iter().all(|k| days[d].contains(*k)));
                }
                // Apart and together again: the same table.
                let (mau, days) = table.clone().into_sets();
                let back = UserDays::from_sets(mau, days);
                prop_assert_eq!(back.to_sets(), table.to_sets());
            }
        }
    }
}
