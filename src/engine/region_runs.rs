//! Which guest RAM region each mapped entry of a TCE table maps, as runs of consecutive entries.
//!
//! Isolated mode needs it to refuse `MEM_REMOVE` of a region hardware entries still map, and
//! only then: the sidecar's mm pins what it maps, and unregistering a region an entry maps would
//! leave it pinned. The table the guest sees cannot say it, since the front-end writes it. A
//! `MAP_DMA` maps a run of entries into one region, and a guest maps its RAM in runs (a DDW maps
//! all of it once), so runs keep this small: one per `MAP_DMA` at most, merged when adjacent.

use std::collections::BTreeMap;

use crate::kernel::RegionId;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegionRuns {
    /// First entry of a run → (entries in it, the region they map). Runs never overlap.
    runs: BTreeMap<u64, (u64, RegionId)>,
    /// Entries mapped per region.
    per_region: BTreeMap<RegionId, u64>,
}

impl RegionRuns {
    /// Entries `first..first + count` now map `region` (whatever they mapped before).
    pub fn map(&mut self, first: u64, count: u64, region: RegionId) {
        if count == 0 {
            return;
        }
        self.unmap(first, count);
        let mut start = first;
        let mut len = count;
        // Merge with a run of the same region that ends where this one starts, or starts where
        // it ends.
        if let Some((&before, &(n, r))) = self.runs.range(..first).next_back() {
            if r == region && before + n == first {
                self.runs.remove(&before);
                start = before;
                len += n;
            }
        }
        if let Some(&(n, r)) = self.runs.get(&(first + count)) {
            if r == region {
                self.runs.remove(&(first + count));
                len += n;
            }
        }
        self.runs.insert(start, (len, region));
        *self.per_region.entry(region).or_default() += count;
    }

    /// Entries `first..first + count` map nothing now.
    pub fn unmap(&mut self, first: u64, count: u64) {
        let end = first.saturating_add(count);
        // The runs that overlap first..end: the one that starts before `first`, if it reaches
        // past it, and those that start inside.
        let mut overlapping: Vec<u64> = self
            .runs
            .range(..first)
            .next_back()
            .filter(|(&s, &(n, _))| s + n > first)
            .map(|(&s, _)| s)
            .into_iter()
            .collect();
        overlapping.extend(self.runs.range(first..end).map(|(&s, _)| s));
        for start in overlapping {
            let (n, region) = self.runs.remove(&start).expect("a run found above");
            let run_end = start + n;
            if start < first {
                self.runs.insert(start, (first - start, region));
            }
            if run_end > end {
                self.runs.insert(end, (run_end - end, region));
            }
            let removed = run_end.min(end) - start.max(first);
            let left = self
                .per_region
                .get_mut(&region)
                .expect("counted when mapped");
            *left -= removed;
            if *left == 0 {
                self.per_region.remove(&region);
            }
        }
    }

    /// Every entry maps nothing now (the window went, or the container).
    pub fn clear(&mut self) {
        self.runs.clear();
        self.per_region.clear();
    }

    /// How many entries map `region`.
    pub fn entries_in(&self, region: RegionId) -> u64 {
        self.per_region.get(&region).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: RegionId = RegionId(1);
    const B: RegionId = RegionId(2);

    fn runs(r: &RegionRuns) -> Vec<(u64, u64, u32)> {
        r.runs.iter().map(|(&s, &(n, g))| (s, n, g.0)).collect()
    }

    #[test]
    fn adjacent_maps_of_one_region_merge_and_count() {
        let mut r = RegionRuns::default();
        r.map(0, 512, A);
        r.map(512, 512, A);
        r.map(2048, 16, B);
        assert_eq!(runs(&r), [(0, 1024, 1), (2048, 16, 2)]);
        assert_eq!((r.entries_in(A), r.entries_in(B)), (1024, 16));
    }

    #[test]
    fn unmap_splits_runs_and_counts_only_what_was_mapped() {
        let mut r = RegionRuns::default();
        r.map(0, 100, A);
        r.map(100, 100, B);
        // across the boundary, and past the end of what is mapped
        r.unmap(90, 20);
        r.unmap(150, 1000);
        assert_eq!(runs(&r), [(0, 90, 1), (110, 40, 2)]);
        assert_eq!((r.entries_in(A), r.entries_in(B)), (90, 40));
        r.unmap(0, u64::MAX);
        assert_eq!(runs(&r), []);
        assert_eq!((r.entries_in(A), r.entries_in(B)), (0, 0));
    }

    #[test]
    fn remapping_an_entry_moves_it_to_its_new_region() {
        let mut r = RegionRuns::default();
        r.map(0, 10, A);
        r.map(4, 2, B);
        assert_eq!(runs(&r), [(0, 4, 1), (4, 2, 2), (6, 4, 1)]);
        assert_eq!((r.entries_in(A), r.entries_in(B)), (8, 2));
        r.map(4, 2, A);
        assert_eq!(runs(&r), [(0, 10, 1)]);
        assert_eq!(r.entries_in(A), 10);
        r.clear();
        assert_eq!(r.entries_in(A), 0);
    }
}
