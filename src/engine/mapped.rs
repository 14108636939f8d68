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
        let (chunk, word, bit) = Self::split(index);
        self.chunks.get(&chunk).is_some_and(|c| c[word] & bit != 0)
    }

    /// Sets or clears `count` consecutive bits from `first`.
    pub fn set_range(&mut self, first: u64, count: u64, mapped: bool) {
        for index in first..first.saturating_add(count) {
            let (chunk, word, bit) = Self::split(index);
            if mapped {
                let c = self
                    .chunks
                    .entry(chunk)
                    .or_insert_with(|| Box::new([0; WORDS]));
                if c[word] & bit == 0 {
                    c[word] |= bit;
                    self.count += 1;
                }
            } else if let Some(c) = self.chunks.get_mut(&chunk) {
                if c[word] & bit != 0 {
                    c[word] &= !bit;
                    self.count -= 1;
                    if c.iter().all(|w| *w == 0) {
                        self.chunks.remove(&chunk);
                    }
                }
            }
        }
    }

    /// Whether any bit in `first..first + count` is set.
    pub fn any_in(&self, first: u64, count: u64) -> bool {
        self.set_in(first, count).next().is_some()
    }

    /// The set bits in `first..first + count`, in order; visits only allocated chunks.
    pub fn set_in(&self, first: u64, count: u64) -> impl Iterator<Item = u64> + '_ {
        let end = first.saturating_add(count);
        let chunks = if count == 0 {
            self.chunks.range(1..1)
        } else {
            self.chunks
                .range(first / CHUNK_BITS..=(end - 1) / CHUNK_BITS)
        };
        chunks
            .flat_map(move |(&chunk, words)| {
                let base = chunk * CHUNK_BITS;
                words.iter().enumerate().flat_map(move |(w, &word)| {
                    (0..64u64)
                        .filter(move |b| word & (1 << b) != 0)
                        .map(move |b| base + w as u64 * 64 + b)
                })
            })
            .filter(move |index| *index >= first && *index < end)
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

    fn split(index: u64) -> (u64, usize, u64) {
        let offset = index % CHUNK_BITS;
        (
            index / CHUNK_BITS,
            (offset / 64) as usize,
            1 << (offset % 64),
        )
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
}
