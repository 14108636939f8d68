//! A VM on the model kernel, as a front-end creates it: what QEMU does with `/dev/kvm` before it
//! talks to the sidecar (VM, vCPU, the kvm-vfio device, guest RAM and its memslots, KVM TCE
//! tables, VFIO group fds), made through the model's socket as this process. Used by the demo
//! and the tests that play QEMU; a real front-end makes the same calls on the real kernel.

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use crate::kernel::shared_memory::sealed_memfd;

use crate::kernel::model::server::{CallError, ModelClient, SharedMapping};
use crate::kernel::model::{
    CreateSpaprTce64, HcallOutcome, HcallStats, UserMemoryRegion, H_PUT_TCE_INDIRECT, H_STUFF_TCE,
    KVM_DEV_TYPE_VFIO,
};
use crate::kernel::model_backend::ModelBackend;
use crate::protocol::MemRegion;

/// Guest RAM: a memfd mapped in this process, with its memslot.
pub struct GuestRam {
    pub region: MemRegion,
    pub memfd: OwnedFd,
    pub mapping: SharedMapping,
}

/// A guest TCE table as the front-end holds it, mapped so it can store the entries the kernel
/// left to userspace (QEMU's `tcet->table`).
pub struct GuestTable {
    pub fd: OwnedFd,
    pub mapping: SharedMapping,
    pub liobn: u64,
    pub bus_offset: u64,
    pub page_shift: u32,
    pub entries: u64,
}

pub struct ModelVm {
    socket: std::path::PathBuf,
    model: ModelClient,
    kvm: OwnedFd,
    vm: OwnedFd,
    vcpu: OwnedFd,
    device: OwnedFd,
    ram: Vec<GuestRam>,
    /// Copies of the group fds handed out, to close at exit.
    groups: Vec<OwnedFd>,
}

impl ModelVm {
    /// Creates a VM with one vCPU and its kvm-vfio device on the model served at `socket`, and
    /// enables the in-kernel multi-TCE hypercalls as QEMU does.
    pub fn create(socket: &Path) -> Result<Self, CallError> {
        let model = ModelClient::connect(socket)?;
        let kvm = model.open_kvm()?;
        let vm = model.kvm_create_vm(kvm.as_fd())?;
        let vcpu = model.kvm_create_vcpu(vm.as_fd(), 0)?;
        model.kvm_enable_hcall(vm.as_fd(), H_PUT_TCE_INDIRECT, true)?;
        model.kvm_enable_hcall(vm.as_fd(), H_STUFF_TCE, true)?;
        let device = model
            .kvm_create_device(vm.as_fd(), KVM_DEV_TYPE_VFIO, 0)?
            .ok_or(CallError::Reply("no kvm-vfio device fd"))?;
        Ok(Self {
            socket: socket.to_owned(),
            model,
            kvm,
            vm,
            vcpu,
            device,
            ram: Vec::new(),
            groups: Vec::new(),
        })
    }

    pub fn model(&self) -> &ModelClient {
        &self.model
    }

    /// A kernel backend for the front-end's owner operations, as this process.
    pub fn kernel(&self) -> Result<ModelBackend, CallError> {
        Ok(ModelBackend::new(ModelClient::connect(&self.socket)?))
    }

    /// A copy of the kvm-vfio device fd, for the client.
    pub fn kvm_vfio_device(&self) -> std::io::Result<OwnedFd> {
        self.device.try_clone()
    }

    /// Adds `size` bytes of guest RAM at `guest_addr`: a memfd, its mapping here, and the
    /// memslot KVM translates guest addresses with.
    pub fn add_ram(
        &mut self,
        region_id: u32,
        guest_addr: u64,
        size: u64,
    ) -> Result<&GuestRam, CallError> {
        let memfd = sealed_memfd("guest-ram", size)?;
        let mapping = SharedMapping::map(memfd.as_fd(), size as usize)?;
        let slot = UserMemoryRegion {
            slot: region_id,
            flags: 0,
            guest_phys_addr: guest_addr,
            memory_size: size,
            userspace_addr: mapping.addr(),
        };
        self.model
            .kvm_set_user_memory_region(self.vm.as_fd(), slot)?;
        let region = MemRegion {
            region_id,
            guest_addr,
            size,
            user_addr: mapping.addr(),
            mmap_offset: 0,
            page_shift: 0,
        };
        self.ram.push(GuestRam {
            region,
            memfd,
            mapping,
        });
        Ok(self.ram.last().expect("just pushed"))
    }

    pub fn ram(&self) -> &[GuestRam] {
        &self.ram
    }

    pub fn open_group(&mut self, iommu_group: u32) -> Result<OwnedFd, CallError> {
        let fd = self.model.open_vfio_group(iommu_group)?;
        self.groups.push(fd.try_clone()?);
        Ok(fd)
    }

    /// A KVM TCE table (accelerated mode), mapped here.
    pub fn kvm_table(
        &self,
        liobn: u64,
        page_shift: u32,
        bus_offset: u64,
        entries: u64,
    ) -> Result<GuestTable, CallError> {
        let arg = CreateSpaprTce64 {
            liobn,
            page_shift,
            flags: 0,
            offset: bus_offset >> page_shift,
            size: entries,
        };
        let fd = self.model.kvm_create_spapr_tce_64(self.vm.as_fd(), arg)?;
        let mapping = SharedMapping::map(fd.as_fd(), table_bytes(entries))?;
        Ok(GuestTable {
            fd,
            mapping,
            liobn,
            bus_offset,
            page_shift,
            entries,
        })
    }

    /// A userspace TCE table in a memfd (isolated mode: KVM does not know the LIOBN, so every
    /// hypercall for it exits to the front-end).
    pub fn userspace_table(
        &self,
        liobn: u64,
        page_shift: u32,
        bus_offset: u64,
        entries: u64,
    ) -> Result<GuestTable, CallError> {
        let fd = sealed_memfd("guest-tce-table", table_bytes(entries) as u64)?;
        let mapping = SharedMapping::map(fd.as_fd(), table_bytes(entries))?;
        Ok(GuestTable {
            fd,
            mapping,
            liobn,
            bus_offset,
            page_shift,
            entries,
        })
    }

    /// The guest on vCPU 0 makes hypercall `number` with arguments r4..r7.
    pub fn hcall(&self, number: u64, args: [u64; 4]) -> Result<HcallOutcome, CallError> {
        self.model.vcpu_hcall(self.vcpu.as_fd(), number, args)
    }

    /// Hypercalls completed in the kernel and exits to userspace, for this VM.
    pub fn hcall_stats(&self) -> Result<HcallStats, CallError> {
        self.model.hcall_stats(self.vm.as_fd())
    }

    /// The front-end exits: tells the model this process closed `extra` (e.g. its KVM tables)
    /// and, on drop, every file the VM holds.
    pub fn close(self, extra: &[&OwnedFd]) -> Result<(), CallError> {
        for fd in extra {
            self.model.close(fd.as_fd())?;
        }
        Ok(())
    }
}

impl Drop for ModelVm {
    /// The model cannot see fds close or a process exit: tell it, as the exit would on Linux.
    fn drop(&mut self) {
        for fd in self
            .groups
            .iter()
            .chain([&self.device, &self.vcpu, &self.vm, &self.kvm])
        {
            let _ = self.model.close(fd.as_fd());
        }
        for ram in &self.ram {
            let _ = self.model.mm_unmap(ram.mapping.addr());
        }
    }
}

fn table_bytes(entries: u64) -> usize {
    // Whole 4 KiB pages, as the kernel maps a TCE table.
    (entries * 8).div_ceil(4096) as usize * 4096
}
