//! Searching sorted slices of 64-bit key hashes: the lookup of the exact user sets
//! ([`super::user_set`], [`super::user_days`]) and of the segments' sorted runs
//! ([`super::segments`]).

/// Where `key` is in `sorted` (as `slice::binary_search` says), found from where a uniform
/// hash of its value would be: user keys are hashes, so a key's rank is about `key / 2⁶⁴ · n`,
/// give or take `√n / 2`. From that guess the search gallops outwards and then bisects, so it
/// touches a few neighbouring cache lines instead of the ~log₂ n scattered ones a bisection of
/// the whole slice reads — which, interleaved over many apps' sets, miss the cache. Any sorted
/// slice is searched correctly; uniform ones fast.
#[inline]
pub(crate) fn search(sorted: &[u64], key: u64) -> Result<usize, usize> {
    let n = sorted.len();
    if n < 64 {
        return sorted.binary_search(&key);
    }
    let guess = (((u128::from(key) * n as u128) >> 64) as usize).min(n - 1);
    let (mut lo, mut hi) = if sorted[guess] < key {
        // The key lies in (guess, n): double the step until an element is not below it.
        let (mut lo, mut step) = (guess, 1);
        loop {
            let probe = lo + step;
            if probe >= n {
                break (lo + 1, n);
            }
            if sorted[probe] >= key {
                break (lo + 1, probe + 1);
            }
            lo = probe;
            step *= 2;
        }
    } else {
        // The key lies in [0, guess]: the same downwards.
        let (mut hi, mut step) = (guess, 1);
        loop {
            if step > hi {
                break (0, hi + 1);
            }
            let probe = hi - step;
            if sorted[probe] < key {
                break (probe + 1, hi + 1);
            }
            hi = probe;
            step *= 2;
        }
    };
    // Bisect [lo, hi), which holds the key's place.
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        match sorted[mid].cmp(&key) {
            std::cmp::Ordering::Less => lo = mid + 1,
            std::cmp::Ordering::Greater => hi = mid,
            std::cmp::Ordering::Equal => return Ok(mid),
        }
    }
    Err(lo)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// The search finds what a bisection finds, in uniform and in skewed slices.
        #[test]
        fn the_search_agrees_with_a_bisection(
            mut keys in prop::collection::vec(any::<u64>(), 0..2000),
            skew in 0u32..60,
            probes in prop::collection::vec(any::<u64>(), 1..50),
        ) {
            keys.iter_mut().for_each(|k| *k >>= skew);
            keys.sort_unstable();
            keys.dedup();
            let present: Vec<u64> = keys.iter().step_by(7).copied().collect();
            for key in probes.into_iter().map(|p| p >> skew).chain(present).chain([0, u64::MAX]) {
                prop_assert_eq!(search(&keys, key), keys.binary_search(&key), "key {}", key);
            }
        }
    }
}
