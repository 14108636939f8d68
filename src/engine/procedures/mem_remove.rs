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
                    && state.tables.values().any(|t| t.mapped.count() > 0) =>
            {
                // In isolated mode the sidecar's own mm pins what it maps, and only the
                // session knows which entries it mapped, not where each points: any mapped
                // entry may use the region, and unregistering it would leave it pinned.
                let mapped: u64 = state.tables.values().map(|t| t.mapped.count()).sum();
                Err(err(
                    Errno::BUSY,
                    format!("{mapped} entries are mapped for DMA; the guest must unmap them before {region} goes"),
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
