//! MEM_REMOVE: unregister a guest RAM region from every container, once no DMA entry can still
//! point into it.

use std::collections::VecDeque;

use rustix::io::Errno;

use crate::engine::state::State;
use crate::engine::EngineError;
use crate::kernel::{KernelOp, Output, OwnershipMode, RegionId, TableId};
use crate::protocol::{MemRegion, MAX_INLINE_TCES};

use super::{err, TCE_READ, TCE_WRITE};

#[derive(Debug)]
pub struct MemRemove {
    region: RegionId,
    stage: MemRemoveStage,
    /// The region's guest physical range.
    range: std::ops::Range<u64>,
    /// The guest-visible entries still to scan, `(table, next index)`.
    scan: VecDeque<(TableId, u64)>,
    /// An entry found pointing into the region.
    busy: Option<(TableId, u64)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MemRemoveStage {
    /// Read the guest-visible tables, a batch of entries at a time, for entries into the
    /// region.
    CheckEntries,
    /// Unregister the region from every container that registered it.
    Unregister,
    Done,
}

impl MemRemove {
    pub(super) fn start(
        state: &State,
        mode: OwnershipMode,
        desc: MemRegion,
    ) -> Result<Self, EngineError> {
        let region = RegionId(desc.region_id);
        match state.regions.get(&region) {
            None => Err(err(Errno::NOENT, format!("{region} is not registered"))),
            Some(r) if r.desc != desc => Err(err(
                Errno::INVAL,
                format!("the fields do not match those {region} was added with"),
            )),
            Some(_) if state.tables.values().any(|t| t.suspect) => Err(err(
                Errno::BUSY,
                "an earlier UNMAP_DMA failed, so hardware may still map memory the guest's table \
                 no longer shows; remove that window before removing memory",
            )),
            Some(_)
                if mode == OwnershipMode::Isolated
                    && state
                        .tables
                        .values()
                        .any(|t| t.mapped_regions.entries_in(region) > 0) =>
            {
                // In isolated mode the sidecar's own mm pins what it maps: unregistering a
                // region that mapped entries use would leave it pinned. The session knows which
                // region each entry it mapped maps; the table the guest sees may say otherwise.
                let mapped: u64 = state
                    .tables
                    .values()
                    .map(|t| t.mapped_regions.entries_in(region))
                    .sum();
                Err(err(
                    Errno::BUSY,
                    format!("{mapped} entries are mapped for DMA into {region}; the guest must unmap them before it goes"),
                ))
            }
            Some(_) => {
                // Every table with a window is scanned for guest entries into the region.
                let scan = state
                    .tables
                    .keys()
                    .filter(|t| state.window_of(**t).is_some())
                    .map(|t| (*t, 0))
                    .collect();
                let range = desc.guest_addr..desc.guest_addr + desc.size;
                Ok(Self {
                    region,
                    stage: MemRemoveStage::CheckEntries,
                    range,
                    scan,
                    busy: None,
                })
            }
        }
    }

    pub(super) fn next(&mut self, state: &State) -> Result<Option<Vec<KernelOp>>, EngineError> {
        // Unregistering memory that DMA entries still use would leave it pinned: since
        // Linux 6.4 the call returns 0 and the region stays pinned until the process
        // exits. So first read the guest-visible tables (K6) for entries into it.
        if let Some((table, index)) = self.busy {
            let region = self.region;
            return Err(err(
                Errno::BUSY,
                format!("{table} entry {index} still maps {region}; the guest must unmap it first"),
            ));
        }
        match self.stage {
            MemRemoveStage::CheckEntries => {
                if let Some(ops) = self.read_next(state) {
                    return Ok(Some(ops));
                }
                self.stage = MemRemoveStage::Unregister;
                self.next(state)
            }
            MemRemoveStage::Unregister => {
                self.stage = MemRemoveStage::Done;
                let region = self.region;
                Ok(Some(
                    state
                        .containers
                        .iter()
                        .filter(|(_, c)| c.registered.contains(&region))
                        .map(|(id, _)| KernelOp::UnregisterMemory {
                            container: *id,
                            region,
                            offset: 0,
                            size: state.regions[&region].desc.size,
                        })
                        .collect(),
                ))
            }
            MemRemoveStage::Done => Ok(None),
        }
    }

    /// The read of the next batch of entries still to scan; `None` once every table is read.
    fn read_next(&mut self, state: &State) -> Option<Vec<KernelOp>> {
        let (table, first) = self.scan.front_mut()?;
        let entries = state.tables.get(table).map_or(0, |t| t.desc.entries);
        let count = (entries - (*first).min(entries)).min(u64::from(MAX_INLINE_TCES)) as u32;
        let op = KernelOp::ReadTces {
            table: *table,
            first_index: *first,
            count,
        };
        *first += u64::from(count);
        if *first >= entries {
            self.scan.pop_front();
        }
        Some(if count == 0 { Vec::new() } else { vec![op] })
    }

    /// Notes the first entry a read found pointing into the region.
    pub(super) fn succeeded(&mut self, op: &KernelOp, output: &Output) {
        if self.busy.is_some() {
            return;
        }
        if let (
            KernelOp::ReadTces {
                table, first_index, ..
            },
            Output::Tces(values),
        ) = (op, output)
        {
            let range = &self.range;
            let into = |v: &u64| {
                v & (TCE_READ | TCE_WRITE) != 0 && range.contains(&(v & !(TCE_READ | TCE_WRITE)))
            };
            self.busy = values
                .iter()
                .position(into)
                .map(|i| (*table, first_index + i as u64));
        }
    }

    pub(super) fn finished(&self, state: &mut State, ok: bool) {
        if ok {
            state.regions.remove(&self.region);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::state::{Region, Table};
    use crate::kernel::ContainerId;
    use crate::protocol::{DmaAccess, TableDesc};

    const GIB: u64 = 1 << 30;

    fn region(id: u32, guest_addr: u64) -> MemRegion {
        MemRegion {
            region_id: id,
            guest_addr,
            size: GIB,
            user_addr: 0,
            mmap_offset: 0,
            page_shift: 16,
        }
    }

    /// Isolated: boot RAM (region 1) and a hot-plugged DIMM (region 2), a DDW of 16 MiB pages
    /// whose first entries the sidecar mapped into region 1, as a guest's DDW maps its RAM.
    fn isolated_state() -> State {
        let mut state = State {
            track_mapped: true,
            ..State::default()
        };
        for (id, guest_addr) in [(1, 0), (2, GIB)] {
            let desc = region(id, guest_addr);
            let page_size = 1 << 16;
            state
                .regions
                .insert(RegionId(id), Region { desc, page_size });
        }
        let desc = TableDesc {
            table_id: 1,
            container_id: 0,
            liobn: 0x8000_0001,
            page_shift: 24,
            bus_offset: 1 << 59,
            entries: 128,
        };
        let table = Table {
            desc,
            mapped: Default::default(),
            mapped_regions: Default::default(),
            suspect: false,
        };
        state.tables.insert(TableId(1), table);
        state.apply(
            &KernelOp::MapDma {
                container: ContainerId(0),
                region: RegionId(1),
                offset: 0,
                iova: 1 << 59,
                size: 16 << 24,
                access: DmaAccess {
                    read: true,
                    write: true,
                },
            },
            &Output::Done,
        );
        state
    }

    #[test]
    fn isolated_refuses_only_a_region_mapped_entries_still_map() {
        let mut state = isolated_state();
        // The DIMM no entry maps goes (to the scan of the guest-visible tables, then away).
        assert!(MemRemove::start(&state, OwnershipMode::Isolated, region(2, GIB)).is_ok());
        // The boot RAM the DDW maps does not.
        let refused = MemRemove::start(&state, OwnershipMode::Isolated, region(1, 0)).unwrap_err();
        assert_eq!(refused.errno, Errno::BUSY);
        assert!(
            refused
                .text
                .starts_with("16 entries are mapped for DMA into region 1"),
            "{}",
            refused.text
        );
        // Once the guest unmapped them, it may go too.
        state.apply(
            &KernelOp::UnmapDma {
                container: ContainerId(0),
                iova: 1 << 59,
                size: 16 << 24,
            },
            &Output::Unmapped(16 << 24),
        );
        assert!(MemRemove::start(&state, OwnershipMode::Isolated, region(1, 0)).is_ok());
    }
}
