//! KVM: `/dev/kvm`, VM and vCPU files, KVM TCE tables (`arch/powerpc/kvm/book3s_64_vio.c`) and
//! the kvm-vfio device (`virt/kvm/vfio.c`).
//!
//! K1: every VM, vCPU and device ioctl from an mm other than the VM creator's fails with `EIO`
//! before anything else is looked at (`kvm_vm_ioctl`, `kvm_vcpu_ioctl`, `kvm_device_ioctl`).

use std::collections::BTreeMap;

use rustix::io::Errno;

use super::abi::{
    CreateSpaprTce64, UserMemoryRegion, H_GET_TCE, H_PUT_TCE, H_PUT_TCE_INDIRECT, H_STUFF_TCE,
    KVM_CAP_PPC_ENABLE_HCALL, KVM_CAP_SPAPR_MULTITCE, KVM_CAP_SPAPR_TCE, KVM_CAP_SPAPR_TCE_64,
    KVM_CAP_SPAPR_TCE_VFIO, KVM_CREATE_DEVICE_TEST, KVM_DEV_TYPE_VFIO, KVM_DEV_VFIO_FILE,
    KVM_DEV_VFIO_FILE_ADD, KVM_DEV_VFIO_FILE_DEL, KVM_DEV_VFIO_GROUP_SET_SPAPR_TCE,
    KVM_MEM_LOG_DIRTY_PAGES, KVM_USER_MEM_SLOTS,
};
use super::kernel::{
    DevId, FileArg, FileId, HcallStats, KvmVfio, KvmVfioFile, Memslot, Mm, ModelKernel, Obj, Stit,
    Stt, SttId, Vm, VmId,
};

/// Approximate `sizeof(struct kvmppc_spapr_tce_table)` without its page array; it only moves
/// the locked-memory charge across a page boundary.
const STT_HEADER_BYTES: u64 = 128;

impl ModelKernel {
    /// `open("/dev/kvm")`.
    pub fn open_kvm(&mut self) -> FileId {
        self.new_file(Obj::Kvm)
    }

    /// `KVM_CREATE_VM` on a `/dev/kvm` file: the caller's mm becomes the VM's creator.
    pub fn kvm_create_vm(&mut self, caller: Mm, kvm: FileId) -> Result<FileId, Errno> {
        match self.obj(kvm) {
            Some(Obj::Kvm) => {}
            Some(_) => return Err(Errno::NOTTY),
            None => return Err(Errno::BADF),
        }
        let vm = VmId(self.next_id());
        self.vms.insert(
            vm,
            Vm {
                creator: caller,
                refs: 1,
                memslots: BTreeMap::new(),
                stts: Vec::new(),
                vcpus: Default::default(),
                kvm_vfio: None,
                enabled_hcalls: Self::default_hcalls(),
                stats: HcallStats::default(),
            },
        );
        Ok(self.new_file(Obj::Vm(vm)))
    }

    /// `KVM_CHECK_EXTENSION` on `/dev/kvm` or on a VM file (where K1 applies).
    pub fn kvm_check_extension(&self, caller: Mm, file: FileId, cap: u32) -> Result<u32, Errno> {
        match self.obj(file) {
            Some(Obj::Kvm) => {}
            Some(Obj::Vm(vm)) => {
                self.vm_caller(caller, vm)?;
            }
            Some(_) => return Err(Errno::NOTTY),
            None => return Err(Errno::BADF),
        }
        Ok(match cap {
            KVM_CAP_SPAPR_TCE
            | KVM_CAP_SPAPR_TCE_64
            | KVM_CAP_SPAPR_MULTITCE
            | KVM_CAP_PPC_ENABLE_HCALL
            | KVM_CAP_SPAPR_TCE_VFIO => 1,
            _ => 0,
        })
    }

    /// K1 for VM objects.
    pub(super) fn vm_caller(&self, caller: Mm, vm: VmId) -> Result<&Vm, Errno> {
        let v = self.vms.get(&vm).ok_or(Errno::BADF)?;
        if v.creator != caller {
            return Err(Errno::IO);
        }
        Ok(v)
    }

    fn vm_file(&self, caller: Mm, file: FileId) -> Result<VmId, Errno> {
        match self.obj(file) {
            Some(Obj::Vm(vm)) => {
                self.vm_caller(caller, vm)?;
                Ok(vm)
            }
            Some(_) => Err(Errno::NOTTY),
            None => Err(Errno::BADF),
        }
    }

    /// The creator of the VM behind a VM file.
    pub fn vm_creator(&self, vm_file: FileId) -> Option<Mm> {
        match self.obj(vm_file)? {
            Obj::Vm(vm) | Obj::Vcpu(vm) => self.vms.get(&vm).map(|v| v.creator),
            _ => None,
        }
    }

    /// `KVM_CREATE_VCPU`.
    pub fn kvm_create_vcpu(
        &mut self,
        caller: Mm,
        vm_file: FileId,
        id: u32,
    ) -> Result<FileId, Errno> {
        let vm = self.vm_file(caller, vm_file)?;
        let v = self.vms.get_mut(&vm).ok_or(Errno::BADF)?;
        if !v.vcpus.insert(id) {
            return Err(Errno::EXIST);
        }
        v.refs += 1;
        Ok(self.new_file(Obj::Vcpu(vm)))
    }

    /// `KVM_ENABLE_CAP(KVM_CAP_PPC_ENABLE_HCALL, [hcall, enable])`: lets KVM handle `hcall`
    /// itself (1) or always exit to userspace for it (0). The model implements only the TCE
    /// hypercalls, so other numbers are refused as unimplemented ones are.
    pub fn kvm_enable_hcall(
        &mut self,
        caller: Mm,
        vm_file: FileId,
        hcall: u64,
        enable: u64,
    ) -> Result<(), Errno> {
        let vm = self.vm_file(caller, vm_file)?;
        if enable > 1
            || !matches!(
                hcall,
                H_PUT_TCE | H_GET_TCE | H_PUT_TCE_INDIRECT | H_STUFF_TCE
            )
        {
            return Err(Errno::INVAL);
        }
        let v = self.vms.get_mut(&vm).ok_or(Errno::BADF)?;
        if enable == 1 {
            v.enabled_hcalls.insert(hcall);
        } else {
            v.enabled_hcalls.remove(&hcall);
        }
        Ok(())
    }

    /// `KVM_SET_USER_MEMORY_REGION`: guest physical pages backed by the creator's memory at
    /// `userspace_addr`. Size 0 deletes the slot; an existing slot may only move.
    pub fn kvm_set_user_memory_region(
        &mut self,
        caller: Mm,
        vm_file: FileId,
        region: UserMemoryRegion,
    ) -> Result<(), Errno> {
        let vm = self.vm_file(caller, vm_file)?;
        let page = self.platform.page_size();
        let shift = self.platform.host_page_shift;
        let r = region;
        if r.flags & !KVM_MEM_LOG_DIRTY_PAGES != 0
            || r.memory_size % page != 0
            || r.guest_phys_addr % page != 0
            || r.userspace_addr % page != 0
            || r.slot >= KVM_USER_MEM_SLOTS
            || r.guest_phys_addr.checked_add(r.memory_size).is_none()
            || r.userspace_addr.checked_add(r.memory_size).is_none()
        {
            return Err(Errno::INVAL);
        }
        let v = self.vms.get_mut(&vm).ok_or(Errno::BADF)?;
        let base_gfn = r.guest_phys_addr >> shift;
        let npages = r.memory_size >> shift;
        if npages == 0 {
            return v.memslots.remove(&r.slot).map(|_| ()).ok_or(Errno::INVAL);
        }
        if let Some(old) = v.memslots.get(&r.slot) {
            if old.userspace_addr != r.userspace_addr || old.npages != npages {
                return Err(Errno::INVAL);
            }
        }
        let overlap = v.memslots.iter().any(|(&slot, m)| {
            slot != r.slot && m.base_gfn < base_gfn + npages && base_gfn < m.base_gfn + m.npages
        });
        if overlap {
            return Err(Errno::EXIST);
        }
        v.memslots.insert(
            r.slot,
            Memslot {
                base_gfn,
                npages,
                userspace_addr: r.userspace_addr,
            },
        );
        Ok(())
    }

    /// `KVM_CREATE_SPAPR_TCE_64`: a guest-visible TCE table for `liobn`, charged to the VM
    /// creator's locked memory; returns its file, which any holder can map (K6).
    pub fn kvm_create_spapr_tce_64(
        &mut self,
        caller: Mm,
        vm_file: FileId,
        args: CreateSpaprTce64,
    ) -> Result<FileId, Errno> {
        let vm = self.vm_file(caller, vm_file)?;
        // `offset + size` wraps in the kernel's u64 arithmetic; only the shifted bound is checked.
        if args.size == 0
            || args.page_shift < 12
            || args.page_shift > 34
            || args.offset.wrapping_add(args.size) > (u64::MAX >> args.page_shift)
        {
            return Err(Errno::INVAL);
        }
        let page = self.platform.page_size();
        let tce_pages = args.size.saturating_mul(8).div_ceil(page);
        let stt_bytes = STT_HEADER_BYTES.saturating_add(tce_pages.saturating_mul(8));
        let stt_pages = tce_pages.saturating_add(stt_bytes.div_ceil(page));
        let creator = self.vms.get(&vm).ok_or(Errno::BADF)?.creator;
        self.account_locked(creator, stt_pages)?;
        // kzalloc of the table with its page-pointer array fails beyond KMALLOC_MAX_SIZE
        // (1 << (MAX_PAGE_ORDER + PAGE_SHIFT); taken as 4 MiB with 4K pages and 16 MiB with 64K
        // pages, the orders powerpc configures: an assumption, not read from a running host).
        let kmalloc_max = if self.platform.host_page_shift == 12 {
            4 << 20
        } else {
            16 << 20
        };
        if stt_bytes > kmalloc_max {
            self.unaccount_locked(creator, stt_pages);
            return Err(Errno::NOMEM);
        }
        let duplicate = self.vms.get(&vm).is_some_and(|v| {
            v.stts
                .iter()
                .any(|s| self.stts.get(s).is_some_and(|s| s.liobn == args.liobn))
        });
        if duplicate {
            self.unaccount_locked(creator, stt_pages);
            return Err(Errno::BUSY);
        }
        let store = match self.new_store(tce_pages * page) {
            Ok(store) => store,
            Err(e) => {
                self.unaccount_locked(creator, stt_pages);
                return Err(e);
            }
        };
        let stt = SttId(self.next_id());
        self.stts.insert(
            stt,
            Stt {
                vm,
                liobn: args.liobn,
                page_shift: args.page_shift,
                offset: args.offset,
                size: args.size,
                store,
                stits: Vec::new(),
                accounted_pages: stt_pages,
            },
        );
        if let Some(v) = self.vms.get_mut(&vm) {
            v.stts.insert(0, stt);
            v.refs += 1;
        }
        Ok(self.new_file(Obj::Stt(stt)))
    }

    /// The pages of a KVM TCE table: what `mmap` of its file shows (no caller check, K6).
    pub fn spapr_tce_store(&self, table: FileId) -> Option<&dyn super::store::TceStore> {
        match self.obj(table)? {
            Obj::Stt(stt) => self.stts.get(&stt).map(|s| s.store.as_ref()),
            _ => None,
        }
    }

    /// Entry `idx` (from the table's first entry) as a mapping of the table file reads it.
    pub fn spapr_tce_read(&self, table: FileId, idx: u64) -> Result<u64, Errno> {
        let Some(Obj::Stt(stt)) = self.obj(table) else {
            return Err(Errno::BADF);
        };
        let s = self.stts.get(&stt).ok_or(Errno::BADF)?;
        let capacity =
            (s.size * 8).div_ceil(self.platform.page_size()) * self.platform.page_size() / 8;
        // Beyond the table's pages the mapping faults (SIGBUS).
        if idx >= capacity {
            return Err(Errno::FAULT);
        }
        Ok(s.store.get(idx))
    }

    /// Hardware tables a KVM TCE table is attached to (for tests and status).
    pub fn spapr_tce_attached(&self, table: FileId) -> usize {
        match self.obj(table) {
            Some(Obj::Stt(stt)) => self.stts.get(&stt).map_or(0, |s| s.stits.len()),
            _ => 0,
        }
    }

    /// `kvm_spapr_tce_release`: the table file's last reference is gone.
    pub(super) fn stt_release(&mut self, stt: SttId) {
        let Some(s) = self.stts.remove(&stt) else {
            return;
        };
        if let Some(v) = self.vms.get_mut(&s.vm) {
            v.stts.retain(|&x| x != stt);
        }
        for stit in &s.stits {
            self.hw_put(stit.hw);
        }
        if let Some(creator) = self.vms.get(&s.vm).map(|v| v.creator) {
            self.unaccount_locked(creator, s.accounted_pages);
        }
        self.kvm_put(s.vm);
    }

    /// `kvm_put_kvm`: the last reference destroys the VM.
    pub(super) fn kvm_put(&mut self, vm: VmId) {
        let Some(v) = self.vms.get_mut(&vm) else {
            return;
        };
        v.refs -= 1;
        if v.refs == 0 {
            self.vms.remove(&vm);
        }
    }

    /// `KVM_CREATE_DEVICE`. Only the kvm-vfio device is modelled; other types are refused as
    /// unknown ones are. With `KVM_CREATE_DEVICE_TEST`, only says whether it could be created.
    pub fn kvm_create_device(
        &mut self,
        caller: Mm,
        vm_file: FileId,
        dev_type: u32,
        flags: u32,
    ) -> Result<Option<FileId>, Errno> {
        let vm = self.vm_file(caller, vm_file)?;
        if dev_type != KVM_DEV_TYPE_VFIO {
            return Err(Errno::NODEV);
        }
        if flags & KVM_CREATE_DEVICE_TEST != 0 {
            return Ok(None);
        }
        // kvm_vfio_create: one kvm-vfio device per VM.
        if self.vms.get(&vm).ok_or(Errno::BADF)?.kvm_vfio.is_some() {
            return Err(Errno::BUSY);
        }
        let dev = DevId(self.next_id());
        let v = self.vms.get_mut(&vm).ok_or(Errno::BADF)?;
        v.kvm_vfio = Some(dev);
        v.refs += 1;
        self.devices.insert(
            dev,
            KvmVfio {
                vm,
                files: Vec::new(),
            },
        );
        Ok(Some(self.new_file(Obj::KvmVfio(dev))))
    }

    /// K1 for device files.
    fn device_file(&self, caller: Mm, file: FileId) -> Result<DevId, Errno> {
        match self.obj(file) {
            Some(Obj::KvmVfio(dev)) => {
                let vm = self.devices.get(&dev).ok_or(Errno::BADF)?.vm;
                self.vm_caller(caller, vm)?;
                Ok(dev)
            }
            Some(_) => Err(Errno::NOTTY),
            None => Err(Errno::BADF),
        }
    }

    /// `KVM_HAS_DEVICE_ATTR` on the kvm-vfio device.
    pub fn kvm_has_device_attr(
        &self,
        caller: Mm,
        dev: FileId,
        group: u32,
        attr: u64,
    ) -> Result<(), Errno> {
        self.device_file(caller, dev)?;
        match (group, attr) {
            (
                KVM_DEV_VFIO_FILE,
                KVM_DEV_VFIO_FILE_ADD | KVM_DEV_VFIO_FILE_DEL | KVM_DEV_VFIO_GROUP_SET_SPAPR_TCE,
            ) => Ok(()),
            _ => Err(Errno::NXIO),
        }
    }

    /// `KVM_GET_DEVICE_ATTR`: the kvm-vfio device has no `get_attr`.
    pub fn kvm_get_device_attr(&self, caller: Mm, dev: FileId) -> Result<(), Errno> {
        self.device_file(caller, dev)?;
        Err(Errno::PERM)
    }

    /// `KVM_SET_DEVICE_ATTR(KVM_DEV_VFIO_FILE, KVM_DEV_VFIO_FILE_ADD)` with `file`.
    pub fn kvm_vfio_file_add(
        &mut self,
        caller: Mm,
        dev: FileId,
        file: FileArg,
    ) -> Result<(), Errno> {
        let dev = self.device_file(caller, dev)?;
        let file = match file {
            FileArg::Bad => return Err(Errno::BADF),
            // vfio_file_is_valid: group and cdev device files only.
            FileArg::Foreign => return Err(Errno::INVAL),
            FileArg::File(f) => f,
        };
        let Some(Obj::Group(no)) = self.obj(file) else {
            return Err(Errno::INVAL);
        };
        let d = self.devices.get_mut(&dev).ok_or(Errno::BADF)?;
        if d.files.iter().any(|k| k.file == file) {
            return Err(Errno::EXIST);
        }
        d.files.push(KvmVfioFile {
            file,
            iommu_group: None,
        });
        let vm = d.vm;
        self.fget(file);
        if let Some(g) = self.groups.get_mut(&no) {
            g.kvm = Some(vm);
        }
        Ok(())
    }

    /// `KVM_SET_DEVICE_ATTR(KVM_DEV_VFIO_FILE, KVM_DEV_VFIO_FILE_DEL)` with `file`: drops the
    /// group's KVM TCE links and the device's reference to the file.
    pub fn kvm_vfio_file_del(
        &mut self,
        caller: Mm,
        dev: FileId,
        file: FileArg,
    ) -> Result<(), Errno> {
        let dev = self.device_file(caller, dev)?;
        let file = match file {
            FileArg::Bad => return Err(Errno::BADF),
            FileArg::Foreign => return Err(Errno::NOENT),
            FileArg::File(f) => f,
        };
        let d = self.devices.get_mut(&dev).ok_or(Errno::BADF)?;
        let pos = d
            .files
            .iter()
            .position(|k| k.file == file)
            .ok_or(Errno::NOENT)?;
        let kvf = d.files.remove(pos);
        let vm = d.vm;
        self.kvm_vfio_drop_file(vm, kvf);
        Ok(())
    }

    fn kvm_vfio_drop_file(&mut self, vm: VmId, kvf: KvmVfioFile) {
        match kvf.iommu_group {
            Some(no) => self.kvm_spapr_tce_release_iommu_group(vm, no),
            // kvm_spapr_tce_release_vfio_group() warns about a file that never had
            // SET_SPAPR_TCE (seen in the lab with Linux 6.12, virt/kvm/vfio.c:103); harmless,
            // but it taints the kernel, so callers must not add files they will not associate.
            None => self.warnings.push("kvm_spapr_tce_release_vfio_group"),
        }
        if let Some(Obj::Group(no)) = self.obj(kvf.file) {
            if let Some(g) = self.groups.get_mut(&no) {
                g.kvm = None;
            }
        }
        self.fput(kvf.file);
    }

    /// `KVM_SET_DEVICE_ATTR(KVM_DEV_VFIO_FILE, KVM_DEV_VFIO_GROUP_SET_SPAPR_TCE)` with the 8-byte
    /// `{groupfd, tablefd}`: lets KVM program the group's hardware table from the guest's
    /// `H_PUT_TCE`. Checks in the kernel's order (K5).
    pub fn kvm_vfio_set_spapr_tce(
        &mut self,
        caller: Mm,
        dev: FileId,
        group: FileArg,
        table: FileArg,
    ) -> Result<(), Errno> {
        let dev = self.device_file(caller, dev)?;
        let group_file = match group {
            FileArg::Bad => return Err(Errno::BADF),
            FileArg::Foreign => return Err(Errno::NOENT),
            FileArg::File(f) => f,
        };
        let d = self.devices.get(&dev).ok_or(Errno::BADF)?;
        // The same open file that FILE_ADD got, not merely the same group.
        let pos = d
            .files
            .iter()
            .position(|k| k.file == group_file)
            .ok_or(Errno::NOENT)?;
        let vm = d.vm;
        let no = match (d.files[pos].iommu_group, self.obj(group_file)) {
            (Some(no), _) | (None, Some(Obj::Group(no))) => no,
            // vfio_file_iommu_group() is NULL for anything but a group file.
            _ => return Err(Errno::IO),
        };
        if let Some(d) = self.devices.get_mut(&dev) {
            d.files[pos].iommu_group = Some(no);
        }
        self.kvm_spapr_tce_attach_iommu_group(vm, table, no)
    }

    /// `kvm_spapr_tce_attach_iommu_group`.
    fn kvm_spapr_tce_attach_iommu_group(
        &mut self,
        vm: VmId,
        table: FileArg,
        no: u32,
    ) -> Result<(), Errno> {
        let table = match table {
            FileArg::Bad => return Err(Errno::BADF),
            FileArg::Foreign => return Err(Errno::INVAL),
            FileArg::File(f) => f,
        };
        let stt_id = match self.obj(table) {
            Some(Obj::Stt(stt)) if self.vms.get(&vm).is_some_and(|v| v.stts.contains(&stt)) => stt,
            _ => return Err(Errno::INVAL),
        };
        let stt = self.stts.get(&stt_id).ok_or(Errno::INVAL)?;
        let group = self.groups.get(&no).ok_or(Errno::FAULT)?;
        let compatible = group.tables.iter().flatten().copied().find(|id| {
            self.hw_tables.get(id).is_some_and(|t| {
                t.page_shift <= stt.page_shift
                    && t.offset << t.page_shift == stt.offset << stt.page_shift
                    && t.size << t.page_shift >= stt.size << stt.page_shift
            })
        });
        let hw = compatible.ok_or(Errno::INVAL)?;
        let stt = self.stts.get_mut(&stt_id).ok_or(Errno::INVAL)?;
        if let Some(stit) = stt.stits.iter_mut().find(|s| s.hw == hw) {
            stit.kref += 1;
            return Ok(());
        }
        stt.stits.insert(0, Stit { hw, kref: 1 });
        self.hw_get(hw);
        Ok(())
    }

    /// `kvm_spapr_tce_release_iommu_group`: drops one reference of every KVM link to a table
    /// the group currently has.
    pub(super) fn kvm_spapr_tce_release_iommu_group(&mut self, vm: VmId, no: u32) {
        let current: Vec<_> = self
            .groups
            .get(&no)
            .map(|g| g.tables.iter().flatten().copied().collect())
            .unwrap_or_default();
        let stts = self
            .vms
            .get(&vm)
            .map(|v| v.stts.clone())
            .unwrap_or_default();
        let mut freed = Vec::new();
        for stt in stts {
            let Some(s) = self.stts.get_mut(&stt) else {
                continue;
            };
            for stit in s.stits.iter_mut().filter(|x| current.contains(&x.hw)) {
                stit.kref -= 1;
                if stit.kref == 0 {
                    freed.push(stit.hw);
                }
            }
            s.stits.retain(|x| x.kref > 0);
        }
        for hw in freed {
            self.hw_put(hw);
        }
    }

    /// `kvm_vfio_release`: the device file's last reference is gone.
    pub(super) fn kvm_vfio_release(&mut self, dev: DevId) {
        let Some(d) = self.devices.remove(&dev) else {
            return;
        };
        for kvf in d.files {
            self.kvm_vfio_drop_file(d.vm, kvf);
        }
        if let Some(v) = self.vms.get_mut(&d.vm) {
            v.kvm_vfio = None;
        }
        self.kvm_put(d.vm);
    }
}
