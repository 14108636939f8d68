//! VFIO: group files, containers (`drivers/vfio/{group,container}.c`) and the sPAPR TCE IOMMU
//! driver (`drivers/vfio/vfio_iommu_spapr_tce.c`).
//!
//! K2: the first `REGISTER_MEMORY`, `TCE_CREATE` or `TCE_REMOVE` (or v1 `ENABLE`) binds the
//! container to the caller's mm; afterwards every container ioctl but `VFIO_CHECK_EXTENSION`
//! from another mm fails with `EPERM`. The VFIO core's own ioctls (`GET_API_VERSION`,
//! `SET_IOMMU`) and group ioctls check no mm.

use rustix::io::Errno;

use super::abi::{
    eeh_op, DmaDir, DmaMap, DmaUnmap, EehPeOp, PlatformKind, RegisterMemory, SpaprTceInfo,
    TceCreate, TceRemove, DMA_MAP_MINSZ, DMA_UNMAP_MINSZ, EEH_PE_OP_ERR_MINSZ, EEH_PE_OP_MINSZ,
    REGISTER_MEMORY_MINSZ, TCE_CREATE_MINSZ, TCE_INFO_DDW_SZ, TCE_INFO_MINSZ, TCE_REMOVE_MINSZ,
    VFIO_API_VERSION, VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE, VFIO_EEH,
    VFIO_EEH_PE_STATE_NORMAL, VFIO_GROUP_FLAGS_CONTAINER_SET, VFIO_GROUP_FLAGS_VIABLE,
    VFIO_IOMMU_SPAPR_INFO_DDW, VFIO_SPAPR_TCE_IOMMU, VFIO_SPAPR_TCE_V2_IOMMU,
};
use super::kernel::{
    Container, ContainerId, FileArg, FileId, HwTableId, HwTce, Mm, ModelKernel, Obj, TceDriver,
};

/// `IOMMU_PAGE_SHIFT_4K`: the default window's page size.
const DEFAULT_WINDOW_PAGE_SHIFT: u32 = 12;
/// `POWERNV_IOMMU_MAX_LEVELS`.
const POWERNV_MAX_LEVELS: u32 = 5;

impl ModelKernel {
    // ---- group files -----------------------------------------------------------------------

    /// `open("/dev/vfio/<no>")`: one open file per group at a time (`EBUSY`); `ENOENT` when the
    /// host has no such group.
    pub fn open_vfio_group(&mut self, no: u32) -> Result<FileId, Errno> {
        let g = self.groups.get(&no).ok_or(Errno::NOENT)?;
        if g.opened.is_some() {
            return Err(Errno::BUSY);
        }
        let file = self.new_file(Obj::Group(no));
        if let Some(g) = self.groups.get_mut(&no) {
            g.opened = Some(file);
        }
        Ok(file)
    }

    fn group_file(&self, file: FileId) -> Result<u32, Errno> {
        match self.obj(file) {
            Some(Obj::Group(no)) => Ok(no),
            Some(_) => Err(Errno::NOTTY),
            None => Err(Errno::BADF),
        }
    }

    /// The IOMMU group a group file opens.
    pub fn group_number(&self, file: FileId) -> Option<u32> {
        self.group_file(file).ok()
    }

    /// `VFIO_GROUP_GET_STATUS`: `VFIO_GROUP_FLAGS_*`. Every modelled group is viable.
    pub fn vfio_group_get_status(&self, file: FileId) -> Result<u32, Errno> {
        let no = self.group_file(file)?;
        let set = self.groups.get(&no).is_some_and(|g| g.container.is_some());
        Ok(VFIO_GROUP_FLAGS_VIABLE
            | if set {
                VFIO_GROUP_FLAGS_CONTAINER_SET
            } else {
                0
            })
    }

    /// `VFIO_GROUP_SET_CONTAINER` with the container's file.
    pub fn vfio_group_set_container(
        &mut self,
        group: FileId,
        container: FileArg,
    ) -> Result<(), Errno> {
        let no = self.group_file(group)?;
        let container = match container {
            FileArg::Bad => return Err(Errno::BADF),
            FileArg::Foreign => None,
            FileArg::File(f) => Some(f),
        };
        if self.groups.get(&no).is_some_and(|g| g.container.is_some()) {
            return Err(Errno::INVAL);
        }
        let c = match container.and_then(|f| self.obj(f)) {
            Some(Obj::Container(c)) => c,
            // Neither a container nor an iommufd.
            _ => return Err(Errno::BADFD),
        };
        // vfio_container_attach_group: claim DMA ownership, then, with an IOMMU driver set, the
        // driver must accept the group (and programs the container's windows into it).
        self.claim_dma_owner(no);
        if self.containers.get(&c).is_some_and(|x| x.driver.is_some()) {
            self.tce_attach_group(c, no)?;
        }
        let x = self.containers.get_mut(&c).ok_or(Errno::BADF)?;
        x.groups.insert(0, no);
        x.refs += 1;
        if let Some(g) = self.groups.get_mut(&no) {
            g.container = Some(c);
        }
        Ok(())
    }

    /// `VFIO_GROUP_UNSET_CONTAINER`. Devices are not modelled, so the group has no other users.
    pub fn vfio_group_unset_container(&mut self, group: FileId) -> Result<(), Errno> {
        let no = self.group_file(group)?;
        let c = self
            .groups
            .get(&no)
            .and_then(|g| g.container)
            .ok_or(Errno::INVAL)?;
        self.group_detach_container(no, c);
        Ok(())
    }

    /// The host's own DMA windows leave the PE when VFIO owns it; the model does not simulate
    /// the host's tables, so the group starts with none.
    fn claim_dma_owner(&mut self, no: u32) {
        if let Some(g) = self.groups.get_mut(&no) {
            g.tables = [None, None];
        }
    }

    /// `vfio_group_detach_container`: the driver lets the group go, and the last group leaving
    /// releases the driver, dropping the container's mm binding and every window and region.
    fn group_detach_container(&mut self, no: u32, c: ContainerId) {
        if self.containers.get(&c).is_some_and(|x| x.driver.is_some()) {
            self.tce_detach_group(c, no);
        }
        if let Some(g) = self.groups.get_mut(&no) {
            g.container = None;
        }
        let empty = match self.containers.get_mut(&c) {
            Some(x) => {
                x.groups.retain(|&g| g != no);
                x.groups.is_empty()
            }
            None => false,
        };
        if empty {
            self.tce_release(c);
        }
        self.container_put(c);
    }

    /// `vfio_group_fops_release`.
    pub(super) fn group_release(&mut self, no: u32, file: FileId) {
        if let Some(c) = self.groups.get(&no).and_then(|g| g.container) {
            self.group_detach_container(no, c);
        }
        if let Some(g) = self.groups.get_mut(&no) {
            if g.opened == Some(file) {
                g.opened = None;
            }
        }
    }

    // ---- containers ------------------------------------------------------------------------

    /// `open("/dev/vfio/vfio")`.
    pub fn open_vfio_container(&mut self) -> FileId {
        let c = ContainerId(self.next_id());
        self.containers.insert(
            c,
            Container {
                refs: 1,
                groups: Vec::new(),
                driver: None,
            },
        );
        self.new_file(Obj::Container(c))
    }

    pub(super) fn container_put(&mut self, c: ContainerId) {
        if let Some(x) = self.containers.get_mut(&c) {
            x.refs -= 1;
            if x.refs == 0 {
                self.containers.remove(&c);
            }
        }
    }

    fn container_file(&self, file: FileId) -> Result<ContainerId, Errno> {
        match self.obj(file) {
            Some(Obj::Container(c)) => Ok(c),
            Some(_) => Err(Errno::NOTTY),
            None => Err(Errno::BADF),
        }
    }

    /// The mm a container is bound to (K2), if any.
    pub fn container_mm(&self, file: FileId) -> Option<Mm> {
        let c = self.container_file(file).ok()?;
        self.containers.get(&c)?.driver.as_ref()?.mm
    }

    /// `VFIO_GET_API_VERSION`.
    pub fn vfio_get_api_version(&self, container: FileId) -> Result<u32, Errno> {
        self.container_file(container)?;
        Ok(VFIO_API_VERSION)
    }

    /// `VFIO_CHECK_EXTENSION`: answered by the sPAPR driver, with no mm check.
    pub fn vfio_check_extension(&self, container: FileId, ext: u32) -> Result<u32, Errno> {
        self.container_file(container)?;
        Ok(match ext {
            VFIO_SPAPR_TCE_IOMMU | VFIO_SPAPR_TCE_V2_IOMMU => 1,
            VFIO_EEH => u32::from(self.platform.eeh),
            _ => 0,
        })
    }

    /// `VFIO_SET_IOMMU`: needs a group and no driver yet (`EINVAL`); `ENODEV` for a type no
    /// driver supports; then every group is attached to the new driver.
    pub fn vfio_set_iommu(&mut self, container: FileId, iommu_type: u32) -> Result<(), Errno> {
        let c = self.container_file(container)?;
        let x = self.containers.get(&c).ok_or(Errno::BADF)?;
        if x.groups.is_empty() || x.driver.is_some() {
            return Err(Errno::INVAL);
        }
        if iommu_type != VFIO_SPAPR_TCE_IOMMU && iommu_type != VFIO_SPAPR_TCE_V2_IOMMU {
            return Err(Errno::NODEV);
        }
        let groups = x.groups.clone();
        if let Some(x) = self.containers.get_mut(&c) {
            x.driver = Some(TceDriver {
                v2: iommu_type == VFIO_SPAPR_TCE_V2_IOMMU,
                enabled: false,
                def_window_pending: false,
                locked_pages: 0,
                mm: None,
                tables: [None, None],
                groups: Vec::new(),
                prereg: Vec::new(),
            });
        }
        // __vfio_container_attach_groups, in the container's list order.
        let mut attached = Vec::new();
        for no in groups {
            if let Err(e) = self.tce_attach_group(c, no) {
                for done in attached {
                    self.tce_detach_group(c, done);
                }
                self.tce_release(c);
                return Err(e);
            }
            attached.push(no);
        }
        Ok(())
    }

    fn driver(&self, c: ContainerId) -> Option<&TceDriver> {
        self.containers.get(&c)?.driver.as_ref()
    }

    fn driver_mut(&mut self, c: ContainerId) -> Option<&mut TceDriver> {
        self.containers.get_mut(&c)?.driver.as_mut()
    }

    /// The prelude of every sPAPR driver ioctl: no driver yet → `EINVAL` (the VFIO core's
    /// default), then the mm sanity check (K2).
    fn spapr_ioctl(&self, caller: Mm, container: FileId) -> Result<ContainerId, Errno> {
        let c = self.container_file(container)?;
        let d = self.driver(c).ok_or(Errno::INVAL)?;
        if d.mm.is_some_and(|mm| mm != caller) {
            return Err(Errno::PERM);
        }
        Ok(c)
    }

    /// `tce_iommu_mm_set`.
    fn tce_mm_set(&mut self, c: ContainerId, caller: Mm) -> Result<Mm, Errno> {
        let d = self.driver_mut(c).ok_or(Errno::INVAL)?;
        match d.mm {
            Some(mm) if mm == caller => Ok(mm),
            Some(_) => Err(Errno::PERM),
            None => {
                d.mm = Some(caller);
                Ok(caller)
            }
        }
    }

    /// `tce_iommu_attach_group`.
    fn tce_attach_group(&mut self, c: ContainerId, no: u32) -> Result<(), Errno> {
        let d = self.driver(c).ok_or(Errno::INVAL)?;
        if d.v2 && self.platform.max_dynamic_windows_supported == 0 {
            return Err(Errno::INVAL);
        }
        if !d.v2 && !d.groups.is_empty() {
            return Err(Errno::BUSY);
        }
        if d.groups.contains(&no) {
            return Err(Errno::BUSY);
        }
        // Every group of one host shares the platform's ops, so none is incompatible (EPERM).
        let tables = d.tables;
        for (num, t) in tables.iter().enumerate() {
            if let Some(t) = t {
                self.set_window(no, num, *t);
            }
        }
        let d = self.driver_mut(c).ok_or(Errno::INVAL)?;
        if d.groups.is_empty() && d.tables[0].is_none() {
            d.def_window_pending = true;
        }
        d.groups.insert(0, no);
        Ok(())
    }

    /// `tce_iommu_detach_group` → `tce_iommu_release_ownership`: clear every window's TCEs
    /// (since "vfio/spapr: Always clear TCEs before unsetting the window", 2024), then unset it
    /// from the group.
    fn tce_detach_group(&mut self, c: ContainerId, no: u32) {
        let Some(d) = self.driver_mut(c) else {
            return;
        };
        if !d.groups.contains(&no) {
            return;
        }
        d.groups.retain(|&g| g != no);
        let tables = d.tables;
        for (num, t) in tables.iter().enumerate() {
            if let Some(t) = *t {
                self.tce_clear_all(c, t);
                self.unset_window(no, num);
            }
        }
    }

    /// `tce_iommu_release`: the driver goes away with the container's last group.
    fn tce_release(&mut self, c: ContainerId) {
        let groups = self.driver(c).map(|d| d.groups.clone()).unwrap_or_default();
        for no in groups {
            self.tce_detach_group(c, no);
        }
        let tables = self.driver(c).map(|d| d.tables).unwrap_or_default();
        for (num, t) in tables.iter().enumerate() {
            if let Some(t) = *t {
                self.tce_clear_all(c, t);
                self.tce_free_table(c, t);
                if let Some(d) = self.driver_mut(c) {
                    d.tables[num] = None;
                }
            }
        }
        let (mm, prereg) = match self.driver(c) {
            Some(d) => (d.mm, d.prereg.clone()),
            None => return,
        };
        if let Some(mm) = mm {
            // A region still mapped stays pinned (the kernel WARNs and leaks it).
            for id in prereg {
                let _ = self.mm_iommu_put(mm, id);
            }
        }
        self.tce_disable(c);
        if let Some(x) = self.containers.get_mut(&c) {
            x.driver = None;
        }
    }

    fn set_window(&mut self, no: u32, num: usize, t: HwTableId) {
        self.hw_get(t);
        if let Some(g) = self.groups.get_mut(&no) {
            g.tables[num] = Some(t);
        }
    }

    fn unset_window(&mut self, no: u32, num: usize) {
        if let Some(t) = self.groups.get_mut(&no).and_then(|g| g.tables[num].take()) {
            self.hw_put(t);
        }
    }

    /// `VFIO_IOMMU_SPAPR_TCE_GET_INFO`.
    pub fn vfio_spapr_tce_get_info(
        &self,
        caller: Mm,
        container: FileId,
        argsz: u32,
    ) -> Result<SpaprTceInfo, Errno> {
        let c = self.spapr_ioctl(caller, container)?;
        let d = self.driver(c).ok_or(Errno::INVAL)?;
        if d.groups.is_empty() {
            return Err(Errno::NXIO);
        }
        if argsz < TCE_INFO_MINSZ {
            return Err(Errno::INVAL);
        }
        let p = &self.platform;
        let mut info = SpaprTceInfo {
            flags: 0,
            dma32_window_start: p.tce32_start as u32,
            dma32_window_size: p.tce32_size as u32,
            ..SpaprTceInfo::default()
        };
        if p.max_dynamic_windows_supported > 0 && d.v2 {
            info.flags |= VFIO_IOMMU_SPAPR_INFO_DDW;
            // Only copied out when the caller's struct has room for it.
            if argsz >= TCE_INFO_DDW_SZ {
                info.pgsizes = p.pgsizes;
                info.max_dynamic_windows_supported = p.max_dynamic_windows_supported;
                info.levels = p.max_levels;
            }
        }
        Ok(info)
    }

    /// `VFIO_IOMMU_ENABLE` (v1 only): binds the mm and charges the whole 32-bit window.
    pub fn vfio_iommu_enable(&mut self, caller: Mm, container: FileId) -> Result<(), Errno> {
        let c = self.spapr_ioctl(caller, container)?;
        let d = self.driver(c).ok_or(Errno::INVAL)?;
        if d.v2 {
            return Err(Errno::NOTTY);
        }
        if d.enabled {
            return Err(Errno::BUSY);
        }
        if d.groups.is_empty() {
            return Err(Errno::NODEV);
        }
        if self.platform.tce32_size == 0 {
            return Err(Errno::PERM);
        }
        let mm = self.tce_mm_set(c, caller)?;
        let locked = self.platform.tce32_size >> self.platform.host_page_shift;
        self.account_locked(mm, locked)?;
        let d = self.driver_mut(c).ok_or(Errno::INVAL)?;
        d.locked_pages = locked;
        d.enabled = true;
        Ok(())
    }

    /// `VFIO_IOMMU_DISABLE` (v1 only).
    pub fn vfio_iommu_disable(&mut self, caller: Mm, container: FileId) -> Result<(), Errno> {
        let c = self.spapr_ioctl(caller, container)?;
        if self.driver(c).is_some_and(|d| d.v2) {
            return Err(Errno::NOTTY);
        }
        self.tce_disable(c);
        Ok(())
    }

    fn tce_disable(&mut self, c: ContainerId) {
        let Some(d) = self.driver_mut(c) else {
            return;
        };
        if !d.enabled {
            return;
        }
        d.enabled = false;
        let (mm, pages) = (d.mm, d.locked_pages);
        if let Some(mm) = mm {
            self.unaccount_locked(mm, pages);
        }
    }

    /// `VFIO_IOMMU_SPAPR_REGISTER_MEMORY` (v2): pins `[vaddr, vaddr + size)` of the caller and
    /// links the region into the caller's mm (shared by every container of that mm).
    pub fn vfio_register_memory(
        &mut self,
        caller: Mm,
        container: FileId,
        arg: RegisterMemory,
    ) -> Result<(), Errno> {
        let c = self.spapr_ioctl(caller, container)?;
        if !self.driver(c).is_some_and(|d| d.v2) {
            return Err(Errno::NOTTY);
        }
        let mm = self.tce_mm_set(c, caller)?;
        if arg.argsz < REGISTER_MEMORY_MINSZ || arg.flags != 0 {
            return Err(Errno::INVAL);
        }
        let page = self.platform.page_size();
        if arg.vaddr % page != 0
            || arg.size % page != 0
            || arg.vaddr.checked_add(arg.size).is_none()
        {
            return Err(Errno::INVAL);
        }
        let entries = arg.size >> self.platform.host_page_shift;
        let id = match self.mm_iommu_get(mm, arg.vaddr, entries) {
            Some(id) => {
                if self.driver(c).is_some_and(|d| d.prereg.contains(&id)) {
                    let _ = self.mm_iommu_put(mm, id);
                    return Err(Errno::BUSY);
                }
                id
            }
            None => self.mm_iommu_new(mm, arg.vaddr, entries)?,
        };
        let d = self.driver_mut(c).ok_or(Errno::INVAL)?;
        d.prereg.insert(0, id);
        d.enabled = true;
        Ok(())
    }

    /// `VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY` (v2).
    ///
    /// Since `tce_iommu_unregister_pages` takes its own use of the region (`mm_iommu_get`), the
    /// container's `mm_iommu_put` never sees the last use: a region that TCEs still point into
    /// is unlinked from the container and the call returns 0, while the region stays in the mm's
    /// list, pinned and charged (the final put's `EBUSY` is ignored). Older kernels looked the
    /// region up without a use and returned `EBUSY`.
    pub fn vfio_unregister_memory(
        &mut self,
        caller: Mm,
        container: FileId,
        arg: RegisterMemory,
    ) -> Result<(), Errno> {
        let c = self.spapr_ioctl(caller, container)?;
        let d = self.driver(c).ok_or(Errno::INVAL)?;
        if !d.v2 {
            return Err(Errno::NOTTY);
        }
        let mm = d.mm.ok_or(Errno::PERM)?;
        if arg.argsz < REGISTER_MEMORY_MINSZ || arg.flags != 0 {
            return Err(Errno::INVAL);
        }
        let page = self.platform.page_size();
        if arg.vaddr % page != 0 || arg.size % page != 0 {
            return Err(Errno::INVAL);
        }
        let entries = arg.size >> self.platform.host_page_shift;
        let id = self
            .mm_iommu_get(mm, arg.vaddr, entries)
            .ok_or(Errno::NOENT)?;
        let ret = if self.driver(c).is_some_and(|d| d.prereg.contains(&id)) {
            // tce_iommu_prereg_free
            let r = self.mm_iommu_put(mm, id);
            if r.is_ok() {
                if let Some(d) = self.driver_mut(c) {
                    d.prereg.retain(|&x| x != id);
                }
            }
            r
        } else {
            Err(Errno::NOENT)
        };
        let _ = self.mm_iommu_put(mm, id);
        ret
    }

    /// Bytes of table memory `get_table_size` reports for a window, 0 when the platform cannot
    /// make it.
    fn table_size(&self, page_shift: u32, window_size: u64, levels: u32) -> u64 {
        let p = &self.platform;
        match p.kind {
            PlatformKind::PowerNv => {
                // pnv_pci_ioda2_get_table_size
                if levels == 0
                    || levels > POWERNV_MAX_LEVELS
                    || window_size > p.max_window_size
                    || !window_size.is_power_of_two()
                {
                    return 0;
                }
                let window_shift = window_size.trailing_zeros();
                // The kernel's unsigned arithmetic would wrap here; such a window is unusable.
                let Some(entries_shift) = window_shift.checked_sub(page_shift) else {
                    return 0;
                };
                let mut tce_table_size: u64 = 0x1000u64.max(1u64 << (entries_shift + 3).min(63));
                let per_level = entries_shift.div_ceil(levels);
                let direct = 1u64 << (per_level + 3).max(p.host_page_shift);
                let mut bytes = 0u64;
                for _ in 0..levels {
                    bytes = bytes.saturating_add(tce_table_size.div_ceil(direct) * direct);
                    tce_table_size = ((tce_table_size / direct) << 3).max(direct);
                }
                // One copy for the hardware, one for the userspace view (it_userspace).
                bytes.saturating_mul(2)
            }
            PlatformKind::PSeries => {
                // spapr_tce_get_table_size: multi-level asks for ~0U bytes, which the memlock
                // charge normally refuses.
                if levels > 1 {
                    return u64::from(u32::MAX);
                }
                window_size >> page_shift.saturating_sub(3)
            }
        }
    }

    /// `tce_iommu_create_window`.
    fn tce_create_window(
        &mut self,
        c: ContainerId,
        mm: Mm,
        page_shift: u32,
        window_size: u64,
        levels: u32,
    ) -> Result<u64, Errno> {
        let d = self.driver(c).ok_or(Errno::INVAL)?;
        let num = d
            .tables
            .iter()
            .position(Option::is_none)
            .ok_or(Errno::NOSPC)?;
        if page_shift >= 64 || self.platform.pgsizes & (1u64 << page_shift) == 0 {
            return Err(Errno::INVAL);
        }
        let bytes = self.table_size(page_shift, window_size, levels);
        if bytes == 0 {
            return Err(Errno::INVAL);
        }
        let pages = bytes >> self.platform.host_page_shift;
        self.account_locked(mm, pages)?;
        // create_table: the platform's own limits.
        let shift = self.platform.host_page_shift;
        let created = match self.platform.kind {
            PlatformKind::PowerNv => {
                let entries_shift = window_size.trailing_zeros() - page_shift;
                let level_shift = (entries_shift.div_ceil(levels) + 3).max(shift);
                (level_shift - 3) * levels + page_shift < 55
            }
            // Assumption: the hypervisor's DDW calls make single-level windows only.
            PlatformKind::PSeries => levels == 1,
        };
        if !created {
            self.unaccount_locked(mm, pages);
            return Err(Errno::INVAL);
        }
        let base = self.platform.window_base[num];
        let t = self.hw_new(page_shift, base >> page_shift, window_size >> page_shift);
        let groups = self.driver(c).map(|d| d.groups.clone()).unwrap_or_default();
        for no in groups {
            self.set_window(no, num, t);
        }
        if let Some(d) = self.driver_mut(c) {
            d.tables[num] = Some(t);
        }
        self.table_pages.insert(t, (mm, pages));
        Ok(base)
    }

    /// `tce_iommu_free_table`: gives back the table memory; KVM may still hold the table.
    fn tce_free_table(&mut self, _c: ContainerId, t: HwTableId) {
        if let Some((mm, pages)) = self.table_pages.remove(&t) {
            self.unaccount_locked(mm, pages);
        }
        self.hw_put(t);
    }

    /// `tce_iommu_create_default_window`: the 32-bit window that exists implicitly
    /// (`def_window_pending`) is really created before the first map, unmap or window creation.
    fn tce_create_default_window(&mut self, c: ContainerId) -> Result<(), Errno> {
        let d = self.driver(c).ok_or(Errno::INVAL)?;
        if !d.def_window_pending {
            return Ok(());
        }
        if d.groups.is_empty() {
            return Err(Errno::NODEV);
        }
        // v1 may get here before any call bound the mm; the kernel would charge a NULL mm.
        let mm = d.mm.ok_or(Errno::NODEV)?;
        let size = self.platform.tce32_size;
        self.tce_create_window(c, mm, DEFAULT_WINDOW_PAGE_SHIFT, size, 1)?;
        if let Some(d) = self.driver_mut(c) {
            d.def_window_pending = false;
        }
        Ok(())
    }

    /// `VFIO_IOMMU_SPAPR_TCE_CREATE` (v2): returns the bus address the platform chose.
    pub fn vfio_tce_create(
        &mut self,
        caller: Mm,
        container: FileId,
        arg: TceCreate,
    ) -> Result<u64, Errno> {
        let c = self.spapr_ioctl(caller, container)?;
        if !self.driver(c).is_some_and(|d| d.v2) {
            return Err(Errno::NOTTY);
        }
        let mm = self.tce_mm_set(c, caller)?;
        if self.driver(c).is_some_and(|d| d.groups.is_empty()) {
            return Err(Errno::NXIO);
        }
        if arg.argsz < TCE_CREATE_MINSZ || arg.flags != 0 {
            return Err(Errno::INVAL);
        }
        self.tce_create_default_window(c)?;
        self.tce_create_window(c, mm, arg.page_shift, arg.window_size, arg.levels)
    }

    /// `VFIO_IOMMU_SPAPR_TCE_REMOVE` (v2): the pending default window goes away for free.
    pub fn vfio_tce_remove(
        &mut self,
        caller: Mm,
        container: FileId,
        arg: TceRemove,
    ) -> Result<(), Errno> {
        let c = self.spapr_ioctl(caller, container)?;
        if !self.driver(c).is_some_and(|d| d.v2) {
            return Err(Errno::NOTTY);
        }
        self.tce_mm_set(c, caller)?;
        if self.driver(c).is_some_and(|d| d.groups.is_empty()) {
            return Err(Errno::NXIO);
        }
        if arg.argsz < TCE_REMOVE_MINSZ || arg.flags != 0 {
            return Err(Errno::INVAL);
        }
        let d = self.driver_mut(c).ok_or(Errno::INVAL)?;
        if d.def_window_pending && arg.start_addr == 0 {
            d.def_window_pending = false;
            return Ok(());
        }
        let (num, t) = self.find_window(c, arg.start_addr).ok_or(Errno::INVAL)?;
        // Clear before unset (2024): pSeries needs the TCEs gone while the window exists.
        self.tce_clear_all(c, t);
        let groups = self.driver(c).map(|d| d.groups.clone()).unwrap_or_default();
        for no in groups {
            self.unset_window(no, num);
        }
        self.tce_free_table(c, t);
        if let Some(d) = self.driver_mut(c) {
            d.tables[num] = None;
        }
        Ok(())
    }

    /// `tce_iommu_find_table`: the window whose entries cover `ioba`.
    fn find_window(&self, c: ContainerId, ioba: u64) -> Option<(usize, HwTableId)> {
        let d = self.driver(c)?;
        d.tables.iter().enumerate().find_map(|(num, t)| {
            let t = (*t)?;
            let hw = self.hw_tables.get(&t)?;
            let entry = ioba >> hw.page_shift;
            (hw.offset <= entry && entry < hw.offset + hw.size).then_some((num, t))
        })
    }

    /// `tce_iommu_clear` over a whole window.
    fn tce_clear_all(&mut self, c: ContainerId, t: HwTableId) {
        if let Some((first, count)) = self.hw_tables.get(&t).map(|h| (h.offset, h.size)) {
            self.tce_clear(c, t, first, count);
        }
    }

    /// `tce_iommu_clear`: empties entries; v2 gives the region of the container's mm its count
    /// back (`tce_iommu_unuse_page_v2`), v1 unpins.
    fn tce_clear(&mut self, c: ContainerId, t: HwTableId, first: u64, count: u64) {
        let Some(d) = self.driver(c) else {
            return;
        };
        let (v2, mm) = (d.v2, d.mm);
        let present = match self.hw_tables.get(&t) {
            Some(h) => h.entries.present(first, count),
            None => return,
        };
        for entry in present {
            let Some(old) = self.hw_xchg(t, entry, None) else {
                continue;
            };
            if old.dir == DmaDir::None {
                continue;
            }
            if v2 {
                self.tce_unuse_page_v2(mm, t, entry);
            } else {
                let state = self.mm_mut(old.mm);
                state.v1_pinned = state.v1_pinned.saturating_sub(1);
            }
        }
    }

    /// `tce_iommu_unuse_page_v2`: looks the cached user address up in the container's mm.
    fn tce_unuse_page_v2(&mut self, mm: Option<Mm>, t: HwTableId, entry: u64) {
        let ua = self.hw_userspace(t, entry);
        let shift = self.hw_tables.get(&t).map_or(0, |h| h.page_shift);
        if let Some(mm) = mm {
            if let Some(id) = self.mm_iommu_lookup(mm, ua, 1 << shift) {
                self.mm_iommu_mapped_dec(mm, id);
            }
        }
        self.hw_set_userspace(t, entry, 0);
    }

    /// `VFIO_IOMMU_MAP_DMA`. Returns the ioctl's value: the kernel's `iommu_tce_put_param_check`
    /// is a boolean, so a misaligned `iova` "succeeds" with 1 and maps nothing.
    pub fn vfio_map_dma(
        &mut self,
        caller: Mm,
        container: FileId,
        arg: DmaMap,
    ) -> Result<u32, Errno> {
        let c = self.spapr_ioctl(caller, container)?;
        let d = self.driver(c).ok_or(Errno::INVAL)?;
        if !d.enabled {
            return Err(Errno::PERM);
        }
        let (v2, mm) = (d.v2, d.mm);
        if arg.argsz < DMA_MAP_MINSZ
            || arg.flags & !(VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE) != 0
        {
            return Err(Errno::INVAL);
        }
        self.tce_create_default_window(c)?;
        let (_, t) = self.find_window(c, arg.iova).ok_or(Errno::NXIO)?;
        let (shift, offset, size) = self
            .hw_tables
            .get(&t)
            .map(|h| (h.page_shift, h.offset, h.size))
            .ok_or(Errno::NXIO)?;
        let mask = (1u64 << shift) - 1;
        if arg.size & mask != 0 || arg.vaddr & mask != 0 {
            return Err(Errno::INVAL);
        }
        let dir = match (
            arg.flags & VFIO_DMA_MAP_FLAG_READ != 0,
            arg.flags & VFIO_DMA_MAP_FLAG_WRITE != 0,
        ) {
            (true, true) => DmaDir::Bidirectional,
            (true, false) => DmaDir::ToDevice,
            (false, true) => DmaDir::FromDevice,
            (false, false) => return Err(Errno::INVAL),
        };
        if arg.iova & mask != 0 {
            return Ok(1);
        }
        let first = arg.iova >> shift;
        let pages = arg.size >> shift;
        // The kernel checks only the first page against the window; past its end it would
        // write beyond the table. The model refuses instead of pretending.
        if first + pages > offset + size {
            return Err(Errno::INVAL);
        }
        let mm = mm.unwrap_or(caller);
        let mut done = 0;
        let mut ret = Ok(0);
        for i in 0..pages {
            let ua = arg.vaddr.wrapping_add(i << shift);
            let step = if v2 {
                self.tce_build_v2_page(c, mm, t, first + i, ua, shift, dir)
            } else {
                self.tce_build_v1_page(c, caller, t, first + i, ua, shift, dir)
            };
            match step {
                Ok(true) => done += 1,
                Ok(false) => break,
                Err(e) => {
                    ret = Err(e);
                    break;
                }
            }
        }
        if ret.is_err() {
            self.tce_clear(c, t, first, done);
        }
        ret
    }

    #[allow(clippy::too_many_arguments)]
    fn tce_build_v2_page(
        &mut self,
        c: ContainerId,
        mm: Mm,
        t: HwTableId,
        entry: u64,
        ua: u64,
        shift: u32,
        dir: DmaDir,
    ) -> Result<bool, Errno> {
        // tce_iommu_prereg_ua_to_hpa: in the container's mm.
        let id = self
            .mm_iommu_lookup(mm, ua, 1 << shift)
            .ok_or(Errno::INVAL)?;
        if !self.mm_iommu_ua_ok(mm, id, ua, shift) {
            return Err(Errno::INVAL);
        }
        if !self.mm_iommu_mapped_inc(mm, id) {
            // "The registered region is being unregistered": the kernel stops the loop with
            // success. Unreachable here, where a region found is never being released.
            return Ok(false);
        }
        let old = self.hw_xchg(t, entry, Some(HwTce { mm, ua, dir }));
        if old.is_some_and(|o| o.dir != DmaDir::None) {
            let d = self.driver(c).and_then(|d| d.mm);
            self.tce_unuse_page_v2(d, t, entry);
        }
        self.hw_set_userspace(t, entry, ua);
        Ok(true)
    }

    #[allow(clippy::too_many_arguments)]
    fn tce_build_v1_page(
        &mut self,
        _c: ContainerId,
        caller: Mm,
        t: HwTableId,
        entry: u64,
        ua: u64,
        shift: u32,
        dir: DmaDir,
    ) -> Result<bool, Errno> {
        // pin_user_pages_fast of the caller's page; writable unless the device only reads.
        let page_shift = match self.user_range(caller, ua, 1) {
            Some((writable, ps)) if writable || !dir.device_writes() => ps,
            _ => return Err(Errno::FAULT),
        };
        if page_shift < shift {
            return Err(Errno::PERM);
        }
        self.mm_mut(caller).v1_pinned += 1;
        let old = self.hw_xchg(
            t,
            entry,
            Some(HwTce {
                mm: caller,
                ua,
                dir,
            }),
        );
        if let Some(o) = old.filter(|o| o.dir != DmaDir::None) {
            let state = self.mm_mut(o.mm);
            state.v1_pinned = state.v1_pinned.saturating_sub(1);
        }
        Ok(true)
    }

    /// `VFIO_IOMMU_UNMAP_DMA`. Returns the ioctl's value (1 for a bad `iova`, as for map).
    pub fn vfio_unmap_dma(
        &mut self,
        caller: Mm,
        container: FileId,
        arg: DmaUnmap,
    ) -> Result<u32, Errno> {
        let c = self.spapr_ioctl(caller, container)?;
        if !self.driver(c).is_some_and(|d| d.enabled) {
            return Err(Errno::PERM);
        }
        if arg.argsz < DMA_UNMAP_MINSZ || arg.flags != 0 {
            return Err(Errno::INVAL);
        }
        self.tce_create_default_window(c)?;
        let (_, t) = self.find_window(c, arg.iova).ok_or(Errno::NXIO)?;
        let (shift, offset, size) = self
            .hw_tables
            .get(&t)
            .map(|h| (h.page_shift, h.offset, h.size))
            .ok_or(Errno::NXIO)?;
        let mask = (1u64 << shift) - 1;
        if arg.size & mask != 0 {
            return Err(Errno::INVAL);
        }
        if arg.iova & mask != 0 {
            return Ok(1);
        }
        let first = arg.iova >> shift;
        let pages = arg.size >> shift;
        // As for map: the kernel would run past the window's end.
        if first + pages > offset + size {
            return Err(Errno::INVAL);
        }
        self.tce_clear(c, t, first, pages);
        Ok(0)
    }

    /// `VFIO_EEH_PE_OP`: applied to every group's PE in turn; 0 with no group.
    pub fn vfio_eeh_pe_op(
        &mut self,
        caller: Mm,
        container: FileId,
        arg: EehPeOp,
    ) -> Result<u32, Errno> {
        let c = self.spapr_ioctl(caller, container)?;
        let groups = self.driver(c).map(|d| d.groups.clone()).unwrap_or_default();
        let mut ret = 0;
        for _no in groups {
            // eeh_iommu_group_to_pe finds no PE when EEH is off.
            if !self.platform.eeh {
                return Err(Errno::NODEV);
            }
            if arg.argsz < EEH_PE_OP_MINSZ || arg.flags != 0 {
                return Err(Errno::INVAL);
            }
            ret = match arg.op {
                eeh_op::DISABLE
                | eeh_op::ENABLE
                | eeh_op::UNFREEZE_IO
                | eeh_op::UNFREEZE_DMA
                | eeh_op::RESET_DEACTIVATE
                | eeh_op::RESET_HOT
                | eeh_op::RESET_FUNDAMENTAL
                | eeh_op::CONFIGURE => 0,
                eeh_op::GET_STATE => VFIO_EEH_PE_STATE_NORMAL,
                eeh_op::INJECT_ERR => {
                    if arg.argsz < EEH_PE_OP_ERR_MINSZ {
                        return Err(Errno::INVAL);
                    }
                    // eeh_pe_inject_err: 32- or 64-bit error type; the function must be one
                    // of EEH_ERR_FUNC_* (0..=19 per the uapi as read; the bound is not verified).
                    if arg.err_type > 1 || arg.err_func > 19 {
                        return Err(Errno::INVAL);
                    }
                    0
                }
                _ => return Err(Errno::INVAL),
            };
        }
        Ok(ret)
    }

    /// Windows a container has, as `(bus address, page shift, size in bytes)` (for tests).
    pub fn container_windows(&self, container: FileId) -> Vec<(u64, u32, u64)> {
        let Ok(c) = self.container_file(container) else {
            return Vec::new();
        };
        self.driver(c)
            .map(|d| {
                d.tables
                    .iter()
                    .flatten()
                    .filter_map(|t| self.hw_tables.get(t))
                    .map(|h| {
                        (
                            h.offset << h.page_shift,
                            h.page_shift,
                            h.size << h.page_shift,
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}
