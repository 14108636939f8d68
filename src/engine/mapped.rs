//! One bit per TCE table entry: is the entry mapped in the hardware table through this session?
//!
//! Sparse, in chunks of 4096 entries allocated on first use, so memory follows what is mapped
//! (a fully mapped 1 TiB window of 64 KiB pages, 16 Mi entries, costs 2 MiB plus the chunk index)
//! and a huge but empty table costs nothing.

use std::collections::BTreeMap;

const CHUNK_BITS: u64 = 4096;
const WORDS: usize = (CHUNK_BITS / 64) as usize;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MappedBits {
    chunks: BTreeMap<u64, Box<[u64; WORDS]>>,
    count: u64,
}

impl MappedBits {
    pub fn get(&self, index: u64) -> bool {
        let (chunk, offset) = (index / CHUNK_BITS, index % CHUNK_BITS);
        self.chunks
            .get(&chunk)
            .is_some_and(|c| c[(offset / 64) as usize] & (1 << (offset % 64)) != 0)
    }

    /// Sets or clears `count` consecutive bits from `first`, a word at a time.
    pub fn set_range(&mut self, first: u64, count: u64, mapped: bool) {
        let end = first.saturating_add(count);
        let mut index = first;
        while index < end {
            let chunk = index / CHUNK_BITS;
            let chunk_end = end.min((chunk + 1).saturating_mul(CHUNK_BITS));
            if mapped {
                let words = self
                    .chunks
                    .entry(chunk)
                    .or_insert_with(|| Box::new([0; WORDS]));
                for (word, mask) in Self::words_in(chunk, index, chunk_end) {
                    self.count += u64::from((mask & !words[word]).count_ones());
                    words[word] |= mask;
                }
            } else if let Some(words) = self.chunks.get_mut(&chunk) {
                for (word, mask) in Self::words_in(chunk, index, chunk_end) {
                    self.count -= u64::from((mask & words[word]).count_ones());
                    words[word] &= !mask;
                }
                if words.iter().all(|w| *w == 0) {
                    self.chunks.remove(&chunk);
                }
            }
            index = chunk_end;
        }
    }

    /// Whether any bit in `first..first + count` is set.
    pub fn any_in(&self, first: u64, count: u64) -> bool {
        self.words_between(first, first.saturating_add(count))
            .any(|(_, bits)| bits != 0)
    }

    /// The runs of set bits in `first..first + count`, in order, as `(start, length)`; visits
    /// only allocated chunks, a word at a time.
    pub fn set_runs(&self, first: u64, count: u64) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (base, mut bits) in self.words_between(first, first.saturating_add(count)) {
            while bits != 0 {
                let skip = bits.trailing_zeros();
                let ones = (bits >> skip).trailing_ones();
                let start = base + u64::from(skip);
                match runs.last_mut() {
                    Some((s, len)) if *s + *len == start => *len += u64::from(ones),
                    _ => runs.push((start, u64::from(ones))),
                }
                bits = if skip + ones >= 64 {
                    0
                } else {
                    bits & (u64::MAX << (skip + ones))
                };
            }
        }
        runs
    }

    /// Number of set bits.
    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn clear(&mut self) {
        self.chunks.clear();
        self.count = 0;
    }

    /// Heap bytes held (the chunks), for the state-memory figure.
    pub fn heap_bytes(&self) -> usize {
        self.chunks.len() * (std::mem::size_of::<[u64; WORDS]>() + 3 * std::mem::size_of::<u64>())
    }

    /// The words of `chunk` that hold bits of `first..end` (both within the chunk), each with
    /// the mask of those bits.
    fn words_in(chunk: u64, first: u64, end: u64) -> impl Iterator<Item = (usize, u64)> {
        let (lo, hi) = (first - chunk * CHUNK_BITS, end - chunk * CHUNK_BITS);
        (lo / 64..hi.div_ceil(64)).map(move |word| {
            let (start, stop) = (word * 64, word * 64 + 64);
            let low = if lo > start {
                u64::MAX << (lo - start)
            } else {
                u64::MAX
            };
            let high = if hi < stop {
                u64::MAX >> (stop - hi)
            } else {
                u64::MAX
            };
            (word as usize, low & high)
        })
    }

    /// Every allocated word holding bits of `first..end`, as (index of its bit 0, its bits in
    /// the range), in order.
    fn words_between(&self, first: u64, end: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let chunks = if first < end {
            self.chunks
                .range(first / CHUNK_BITS..=(end - 1) / CHUNK_BITS)
        } else {
            self.chunks.range(1..1)
        };
        chunks.flat_map(move |(&chunk, words)| {
            let base = chunk * CHUNK_BITS;
            let (lo, hi) = (first.max(base), end.min(base.saturating_add(CHUNK_BITS)));
            Self::words_in(chunk, lo, hi)
                .map(move |(word, mask)| (base + word as u64 * 64, words[word] & mask))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_range_across_chunks_counts_and_clears() {
        let mut bits = MappedBits::default();
        bits.set_range(4090, 10, true);
        assert_eq!(bits.count(), 10);
        assert!(bits.get(4090) && bits.get(4099) && !bits.get(4100) && !bits.get(4089));
        assert!(bits.any_in(4099, 5));
        assert!(!bits.any_in(4100, 1000));
        bits.set_range(4090, 10, true);
        assert_eq!(bits.count(), 10, "setting a set bit does not count twice");
        bits.set_range(4090, 10, false);
        assert_eq!(bits.count(), 0);
        assert_eq!(bits.heap_bytes(), 0, "empty chunks are freed");
    }

    #[test]
    fn huge_index_costs_one_chunk() {
        let mut bits = MappedBits::default();
        bits.set_range(1 << 40, 1, true);
        assert!(bits.get(1 << 40));
        assert_eq!(bits.chunks.len(), 1);
    }

    /// Runs of set bits, from a plain list of booleans.
    fn runs_of(plain: &[bool], first: u64, count: u64) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for index in first..(first + count).min(plain.len() as u64) {
            if plain[index as usize] {
                match runs.last_mut() {
                    Some((s, len)) if *s + *len == index => *len += 1,
                    _ => runs.push((index, 1)),
                }
            }
        }
        runs
    }

    proptest::proptest! {
        /// Word-at-a-time updates and queries agree with one boolean per entry.
        #[test]
        fn agrees_with_one_bool_per_entry(
            steps in proptest::collection::vec((0u64..3 * CHUNK_BITS, 0u64..CHUNK_BITS + 70, proptest::bool::ANY), 1..40),
            query in (0u64..3 * CHUNK_BITS, 0u64..2 * CHUNK_BITS),
        ) {
            let size = 5 * CHUNK_BITS;
            let (mut bits, mut plain) = (MappedBits::default(), vec![false; size as usize]);
            for (first, count, mapped) in steps {
                bits.set_range(first, count, mapped);
                plain[first as usize..(first + count) as usize].fill(mapped);
                proptest::prop_assert_eq!(bits.count(), plain.iter().filter(|b| **b).count() as u64);
            }
            let (first, count) = query;
            let expected = runs_of(&plain, first, count);
            proptest::prop_assert_eq!(bits.any_in(first, count), !expected.is_empty());
            proptest::prop_assert_eq!(bits.set_runs(first, count), expected);
            proptest::prop_assert_eq!(bits.get(first), plain[first as usize]);
            let allocated = (0..5).filter(|c| bits.chunks.contains_key(c)).count();
            let needed = plain.chunks(CHUNK_BITS as usize).filter(|c| c.contains(&true)).count();
            proptest::prop_assert_eq!(allocated, needed, "empty chunks are freed");
        }
    }

    #[test]
    fn runs_at_the_top_of_the_index_space() {
        let mut bits = MappedBits::default();
        bits.set_range(u64::MAX - 100, 200, true);
        assert_eq!(bits.count(), 100);
        assert_eq!(
            bits.set_runs(u64::MAX - 200, 300),
            vec![(u64::MAX - 100, 100)]
        );
        bits.set_range(u64::MAX - 100, 200, false);
        assert_eq!(bits.count(), 0);
    }
}
