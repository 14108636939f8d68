//! MEM_ADD: a guest RAM region, pre-registered with every container that has a group attached
//! (qemu-notes §2). Containers set up later register it when their first group attaches.

use rustix::io::Errno;

use crate::engine::state::{Region, State};
use crate::engine::{EngineError, FdFacts, Host};
use crate::kernel::{KernelOp, RegionId};
use crate::protocol::MemRegion;

use super::err;

#[derive(Debug)]
pub struct MemAdd {
    region: RegionId,
    stage: MemAddStage,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MemAddStage {
    /// Register the region with every container that has its TCE info.
    Register,
    Done,
}

impl MemAdd {
    pub(super) fn start(
        state: &mut State,
        host: &Host,
        desc: MemRegion,
        fd: Option<FdFacts>,
    ) -> Result<Self, EngineError> {
        check_region(state, host, &desc, fd)?;
        // The memfd shows its page size; without one (FdRule::TablesOnly) the request names it.
        let page_size = match fd {
            Some(f) => f.page_size.max(host.page_size),
            None => 1 << desc.page_shift,
        };
        state
            .regions
            .insert(RegionId(desc.region_id), Region { desc, page_size });
        Ok(Self {
            region: RegionId(desc.region_id),
            stage: MemAddStage::Register,
        })
    }

    pub(super) fn next(&mut self, state: &State) -> Option<Vec<KernelOp>> {
        match self.stage {
            MemAddStage::Register => {
                self.stage = MemAddStage::Done;
                Some(
                    state
                        .containers
                        .iter()
                        .filter(|(_, c)| c.info.is_some())
                        .map(|(id, _)| KernelOp::RegisterMemory {
                            container: *id,
                            region: self.region,
                            offset: 0,
                            size: state.regions[&self.region].desc.size,
                        })
                        .collect(),
                )
            }
            MemAddStage::Done => None,
        }
    }

    /// A region no container kept registered after a failure is forgotten.
    pub(super) fn finished(&self, state: &mut State, ok: bool) {
        if !ok
            && !state
                .containers
                .values()
                .any(|c| c.registered.contains(&self.region))
        {
            state.regions.remove(&self.region);
        }
    }
}

fn check_region(
    state: &State,
    host: &Host,
    desc: &MemRegion,
    fd: Option<FdFacts>,
) -> Result<(), EngineError> {
    let region = RegionId(desc.region_id);
    if state.regions.contains_key(&region) {
        return Err(err(Errno::EXIST, format!("{region} is already registered")));
    }
    let page = host.page_size;
    let aligned = [desc.guest_addr, desc.size, desc.user_addr, desc.mmap_offset]
        .iter()
        .all(|v| v % page == 0);
    if desc.size == 0 || !aligned {
        return Err(err(
            Errno::INVAL,
            format!("guest address, size, user address and mmap offset must be nonzero multiples of the host page size {page:#x}"),
        ));
    }
    let end = desc
        .guest_addr
        .checked_add(desc.size)
        .ok_or_else(|| err(Errno::INVAL, "region wraps"))?;
    // A shift of 64 or more names no page at all.
    if fd.is_none() && 1u64.checked_shl(desc.page_shift).unwrap_or(0) < page {
        return Err(err(
            Errno::INVAL,
            format!(
                "page_shift {} names pages smaller than the host page size {page:#x}",
                desc.page_shift
            ),
        ));
    }
    if let Some(fd) = fd {
        if desc
            .mmap_offset
            .checked_add(desc.size)
            .is_none_or(|e| e > fd.size)
        {
            return Err(err(
                Errno::INVAL,
                format!(
                    "the memfd holds {:#x} bytes, the region needs {:#x} at offset {:#x}",
                    fd.size, desc.size, desc.mmap_offset
                ),
            ));
        }
    }
    if let Some((other, _)) = state
        .regions
        .iter()
        .find(|(_, r)| desc.guest_addr < r.desc.guest_addr + r.desc.size && r.desc.guest_addr < end)
    {
        return Err(err(
            Errno::INVAL,
            format!("the region overlaps {other} in guest memory"),
        ));
    }
    Ok(())
}
