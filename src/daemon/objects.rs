//! The fds a session received, by the ids the front-end gave them, and the sidecar's own
//! mappings of guest RAM. Implements [`Objects`] so a kernel backend can resolve a call's ids.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::io::Errno;

use crate::engine::{FdFacts, State};
use crate::kernel::shared_memory::{SharedMapping, TceView};
use crate::kernel::{GroupId, Kernel, Mapping, Objects, RegionId, TableFd, TableId};
use crate::protocol::{MemRegion, TableDesc};

struct RegionObject {
    /// Held for the session's life, like every fd the front-end sent.
    _fd: OwnedFd,
    /// The sidecar's own mapping (isolated mode: it registers and maps its addresses).
    mapping: Option<SharedMapping>,
}

#[derive(Default)]
pub struct SessionObjects {
    groups: BTreeMap<GroupId, OwnedFd>,
    /// Each table's fd and its validated view (reads cannot fault).
    tables: BTreeMap<TableId, (OwnedFd, TceView)>,
    regions: BTreeMap<RegionId, RegionObject>,
}

/// `fstat` facts of a received fd: its size and the page size backing it.
pub fn facts(fd: BorrowedFd<'_>, host_page: u64) -> Result<FdFacts, Errno> {
    let stat = rustix::fs::fstat(fd)?;
    // hugetlbfs reports its huge page size as the block size; memfd/tmpfs the base page.
    let page_size = u64::try_from(stat.st_blksize).unwrap_or(0).max(host_page);
    Ok(FdFacts {
        size: u64::try_from(stat.st_size).unwrap_or(0),
        page_size,
    })
}

impl SessionObjects {
    /// Keeps a region's memfd, mapping it when the sidecar will use its own addresses, and tells
    /// the kernel backend about the mapping.
    pub fn add_region(
        &mut self,
        desc: &MemRegion,
        fd: OwnedFd,
        map: bool,
        kernel: &mut dyn Kernel,
    ) -> Result<(), Errno> {
        let id = RegionId(desc.region_id);
        if self.regions.contains_key(&id) {
            // The engine refuses the duplicate; keep the registered fd.
            return Ok(());
        }
        let mapping = if map {
            Some(SharedMapping::new(fd.as_fd(), desc.mmap_offset, desc.size)?)
        } else {
            None
        };
        if let Some(m) = &mapping {
            kernel.memory_mapped(fd.as_fd(), desc.mmap_offset, m.addr(), m.len())?;
        }
        self.regions.insert(id, RegionObject { _fd: fd, mapping });
        Ok(())
    }

    pub fn add_group(&mut self, id: GroupId, fd: OwnedFd) {
        self.groups.entry(id).or_insert(fd);
    }

    pub fn add_table(&mut self, desc: &TableDesc, fd: OwnedFd, view: TceView) {
        self.tables
            .entry(TableId(desc.table_id))
            .or_insert((fd, view));
    }

    /// Drops every fd the engine no longer knows (a refused add, a completed remove), and
    /// unmaps the sidecar's mappings of regions that went.
    pub fn sync(&mut self, state: &State, kernel: &mut dyn Kernel) {
        self.groups.retain(|id, _| state.groups.contains_key(id));
        self.tables.retain(|id, _| state.tables.contains_key(id));
        let gone: Vec<RegionId> = self
            .regions
            .keys()
            .filter(|id| !state.regions.contains_key(id))
            .copied()
            .collect();
        for id in gone {
            self.drop_region(id, kernel);
        }
    }

    /// Releases everything at the end of the session.
    pub fn release(&mut self, kernel: &mut dyn Kernel) {
        let all: Vec<RegionId> = self.regions.keys().copied().collect();
        for id in all {
            self.drop_region(id, kernel);
        }
        self.groups.clear();
        self.tables.clear();
    }

    fn drop_region(&mut self, id: RegionId, kernel: &mut dyn Kernel) {
        if let Some(region) = self.regions.remove(&id) {
            if let Some(mapping) = &region.mapping {
                // The mapping goes with `region`; a simulated kernel must be told.
                let _ = kernel.memory_unmapped(mapping.addr());
            }
        }
    }

    pub fn fd_count(&self) -> usize {
        self.groups.len() + self.tables.len() + self.regions.len()
    }
}

impl Objects for SessionObjects {
    fn group(&self, id: GroupId) -> Option<BorrowedFd<'_>> {
        self.groups.get(&id).map(|fd| fd.as_fd())
    }

    fn table(&self, id: TableId) -> Option<TableFd<'_>> {
        self.tables.get(&id).map(|(fd, view)| TableFd {
            fd: fd.as_fd(),
            entries: view.entries(),
            view: Some(view),
        })
    }

    fn region(&self, id: RegionId) -> Option<Mapping> {
        let mapping = self.regions.get(&id)?.mapping.as_ref()?;
        Some(Mapping {
            addr: mapping.addr(),
            size: mapping.len(),
        })
    }

    fn kvm_vfio_device(&self) -> Option<BorrowedFd<'_>> {
        // The kvm-vfio device answers only the VM's creator (K1); the sidecar never holds it.
        None
    }
}
