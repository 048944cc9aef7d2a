//! Connections that pair across the shares of an app-month: what one source partition hands
//! to billing besides its figures, and how billing pairs it when it merges the shares.
//!
//! Events of one connection can land in two partitions: its `connect` in one, its
//! `disconnect` in another, when the events topic grew in between (the app's key maps to a
//! new partition) or its producers do not key by app. Each partition meters its own events,
//! so neither knows the whole connection. Two rules need the whole app-month, and billing,
//! which merges every partition's share, is where it is known:
//! - A disconnect whose connect this share never saw ([`Handover::add_disconnects`]) ends the
//!   connection another share counted open.
//! - A connection that never disconnects ends at the start of the first month its app is
//!   silent in — silent in every partition, not only in the one holding the connection
//!   (README, "Decisions"). A partition where the app is silent in a month does not end its
//!   open connections: it hands them over ([`Handover::silent`]), and billing counts them
//!   from the month's start if another share has usage, and carries those still open into
//!   the next month's share ([`Handover::carry`]), or drops them if none has.
//!
//! Each connection is named by its connection key ([`crate::ingest::ConnKey`]), the same in
//! every partition, so a handed-over connection pairs with its own disconnect exactly.

use serde::{Deserialize, Serialize};

use super::pcc::PccTimeline;

/// What a share hands over to be paired with the other shares of its app-month. Its vectors
/// are kept sorted, so that equal handovers encode to equal bytes whatever the merge order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handover {
    /// The share's partition saw no sign of life of the app in the month: the share only
    /// hands connections over, and has no usage of its own.
    silent: bool,
    /// Connections open since before the month, handed over: connection key, and the sample
    /// index from which each counts (the month's first).
    handed: Vec<(u64, u32)>,
    /// Disconnects whose connect this share never saw: connection key (0: not known, from
    /// a format-3 share) and the sample index from which the connection no longer counts.
    disconnects: Vec<(u64, u32)>,
    /// Keys of the previous month's disconnects that paired with no handed connection: a
    /// connection handed over now with one of these keys ended then, and does not count.
    gone: Vec<u64>,
}

impl Handover {
    /// The handover of a partition where the app was silent all month: its connections
    /// still open, each counting from sample index `from` (the month's first) if the
    /// app-month has usage elsewhere.
    pub fn silent(connections: impl IntoIterator<Item = u64>, from: u32) -> Self {
        let mut handed: Vec<(u64, u32)> = connections.into_iter().map(|key| (key, from)).collect();
        handed.sort_unstable();
        handed.dedup_by_key(|(key, _)| *key);
        Handover { silent: true, handed, ..Handover::default() }
    }

    /// Whether the share has no usage of its own.
    pub fn is_silent(&self) -> bool {
        self.silent
    }

    /// The keys of the connections handed over.
    pub fn handed(&self) -> impl Iterator<Item = u64> + '_ {
        self.handed.iter().map(|(key, _)| *key)
    }

    /// Notes disconnects whose connect this share never saw, each as its connection `key`
    /// and the sample index `at` from which the connection stops counting (one sort for all
    /// of them: a partition whose producers do not key by app has many).
    pub fn add_disconnects(&mut self, disconnects: impl IntoIterator<Item = (u64, u32)>) {
        self.disconnects.extend(disconnects);
        self.disconnects.sort_unstable();
    }

    /// Whether there is nothing to hand over.
    pub fn is_empty(&self) -> bool {
        self.handed.is_empty() && self.disconnects.is_empty() && self.gone.is_empty()
    }

    /// Adds `other`'s, as of one share of the union: silent only if both are.
    pub(super) fn merge(&mut self, other: &Handover) {
        self.silent &= other.silent;
        merge_sorted(&mut self.handed, &other.handed);
        self.handed.dedup_by_key(|(key, _)| *key);
        merge_sorted(&mut self.disconnects, &other.disconnects);
        merge_sorted(&mut self.gone, &other.gone);
        self.gone.dedup();
    }

    /// Pairs the merged shares' handovers, `active` of them with usage of their own, into
    /// `pcc`: each handed connection not gone counts from its index to its disconnect, or
    /// to the month's end; a disconnect that pairs with no handed connection ends one that
    /// another share counted open, if there is another share with usage (with one, it
    /// counts nothing). What is left is what the next month needs: the handed connections
    /// still open, and the keys of the disconnects that paired with none ([`Handover::carry`]).
    pub(super) fn pair(&mut self, pcc: &mut PccTimeline, active: usize) {
        let gone = std::mem::take(&mut self.gone);
        self.handed.retain(|(key, _)| gone.binary_search(key).is_err());
        for &(_, from) in &self.handed {
            pcc.change(from, 1);
        }
        let mut unmatched = Vec::new();
        for (key, at) in std::mem::take(&mut self.disconnects) {
            match self.handed.binary_search_by_key(&key, |(k, _)| *k) {
                Ok(i) => {
                    let (_, from) = self.handed.remove(i);
                    pcc.change(at.max(from), -1);
                }
                Err(_) => {
                    if active > 1 {
                        pcc.change(at, -1);
                    }
                    if key != 0 {
                        unmatched.push(key);
                    }
                }
            }
        }
        unmatched.sort_unstable();
        unmatched.dedup();
        self.gone = unmatched;
    }

    /// The handover a paired app-month ([`Handover::pair`]) leaves for its next month, whose
    /// first sample index is `next_first`: its connections still open, and the keys of its
    /// disconnects that paired with none (`None`: nothing to carry).
    pub fn carry(&self, next_first: u32) -> Option<Handover> {
        let handed: Vec<(u64, u32)> = self.handed.iter().map(|&(key, _)| (key, next_first)).collect();
        let carried = Handover { silent: true, handed, disconnects: Vec::new(), gone: self.gone.clone() };
        (!carried.is_empty()).then_some(carried)
    }

    /// A format-3 share's disconnects, kept as a timeline of +1 at each one's index: their
    /// connection keys were not written (they pair with no handed connection).
    pub(super) fn from_unpaired_timeline(unpaired: &PccTimeline) -> Self {
        let mut disconnects = Vec::new();
        for (index, delta) in unpaired.changes() {
            disconnects.extend(std::iter::repeat_n((0, index), usize::try_from(delta).unwrap_or(0)));
        }
        Handover { disconnects, ..Handover::default() }
    }
}

/// Merges sorted `theirs` into sorted `mine`.
fn merge_sorted<T: Ord + Copy>(mine: &mut Vec<T>, theirs: &[T]) {
    if theirs.is_empty() {
        return;
    }
    mine.extend_from_slice(theirs);
    mine.sort_unstable();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peak(pcc: &PccTimeline) -> u64 {
        pcc.peak().0
    }

    #[test]
    fn handed_connections_count_from_the_month_start_until_their_disconnect() {
        let mut silent = Handover::silent([7, 8, 9], 100);
        let mut active = Handover::default();
        active.add_disconnects([(8, 150)]);
        silent.merge(&active);
        assert!(!silent.is_silent());
        let mut pcc = PccTimeline::new();
        silent.pair(&mut pcc, 1);
        assert_eq!(pcc.changes().collect::<Vec<_>>(), vec![(100, 3), (150, -1)]);
        let next = silent.carry(200).expect("two still open");
        assert_eq!(next.handed, vec![(7, 200), (9, 200)]);
        assert!(next.gone.is_empty() && next.is_silent());
    }

    #[test]
    fn a_disconnect_without_its_handed_connection_ends_one_counted_in_another_share_and_is_remembered() {
        let mut one = Handover::default();
        one.add_disconnects([(5, 120)]);
        let mut lone = one.clone();
        let mut pcc = PccTimeline::new();
        lone.pair(&mut pcc, 1);
        assert!(pcc.is_empty(), "alone it counts nothing");
        let mut pcc = PccTimeline::new();
        one.pair(&mut pcc, 2);
        assert_eq!(pcc.changes().collect::<Vec<_>>(), vec![(120, -1)]);
        // Next month the partition that held the connection hands it over: it had ended.
        let mut next = one.carry(300).expect("the key is remembered");
        next.merge(&Handover::silent([5, 6], 300));
        next.merge(&Handover::default());
        let mut pcc = PccTimeline::new();
        next.pair(&mut pcc, 1);
        assert_eq!(peak(&pcc), 1, "only connection 6 counts");
        assert!(next.carry(400).is_some_and(|c| c.gone.is_empty() && c.handed == vec![(6, 400)]));
    }

    #[test]
    fn merging_in_any_order_gives_the_same_handover() {
        let a = Handover::silent([3, 1], 10);
        let mut b = Handover::default();
        b.add_disconnects([(3, 20), (2, 15)]);
        let c = Handover { gone: vec![4], ..Handover::silent([1], 10) };
        let orders = [[&a, &b, &c], [&c, &b, &a], [&b, &a, &c]];
        let merged: Vec<Handover> = orders
            .iter()
            .map(|order| {
                let mut m = order[0].clone();
                m.merge(order[1]);
                m.merge(order[2]);
                m
            })
            .collect();
        assert!(merged.windows(2).all(|w| w[0] == w[1]), "{merged:?}");
    }

    #[test]
    fn a_format_3_timeline_reads_as_disconnects_without_keys() {
        let mut timeline = PccTimeline::new();
        timeline.change(40, 2);
        timeline.change(41, 1);
        let read = Handover::from_unpaired_timeline(&timeline);
        assert_eq!(read.disconnects, vec![(0, 40), (0, 40), (0, 41)]);
        let mut pcc = PccTimeline::new();
        let mut paired = read.clone();
        paired.pair(&mut pcc, 2);
        assert_eq!(pcc.changes().collect::<Vec<_>>(), vec![(40, -2), (41, -1)]);
        assert!(paired.gone.is_empty(), "keyless disconnects are not remembered");
    }
}
