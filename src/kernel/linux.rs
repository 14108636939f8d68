//! The real kernel: [`Linux`] executes each [`KernelOp`] as the ioctl (or `mmap`) it names, in
//! the calling process, and reports the kernel's errno unchanged.
//!
//! This is the only module of the crate allowed `unsafe`, and only to pass argument structs to
//! `ioctl(2)`, adopt the fds the kernel returns, and read a mapped TCE table; every block says
//! why it is sound. It owns the fds of the containers it opens; every other fd and address comes
//! from the caller's [`Objects`]. It must not check the product's rules (that is the engine's
//! job, and the kernel checks its own); it checks only what keeps this process safe: a memory
//! range must lie inside the region it names, and a TCE read must stay inside the table (a
//! fault past the table's end is `SIGBUS`).
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::ffi::c_void;
use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use rustix::fs::{Mode, OFlags};

use super::abi::{
    self, vfio_eeh_pe_err, vfio_eeh_pe_op, vfio_eeh_pe_op__bindgen_ty_1, vfio_group_status,
    vfio_iommu_spapr_register_memory, vfio_iommu_spapr_tce_create, vfio_iommu_spapr_tce_info,
    vfio_iommu_spapr_tce_remove, vfio_iommu_type1_dma_map, vfio_iommu_type1_dma_unmap, Ioctl,
    KvmCreateDevice, KvmDeviceAttr, KvmVfioSpaprTce,
};
use super::shared_memory::Mapped;
pub use super::shared_memory::SharedMapping;
use super::{
    ContainerId, Errno, GroupStatus, Kernel, KernelOp, Objects, Output, RegionId, TableFd,
};
use crate::protocol::{DmaAccess, TceInfo};

/// The VFIO container device every container is opened from.
pub const VFIO_CONTAINER_PATH: &str = "/dev/vfio/vfio";

/// The Linux backend. Holds the containers it opened, by id.
#[derive(Debug, Default)]
pub struct Linux {
    containers: HashMap<ContainerId, OwnedFd>,
}

impl Linux {
    pub fn new() -> Self {
        Self::default()
    }

    fn container(&self, id: ContainerId) -> Result<BorrowedFd<'_>, Errno> {
        self.containers
            .get(&id)
            .map(|fd| fd.as_fd())
            .ok_or(Errno::BADF)
    }

    fn container_open(&mut self, id: ContainerId) -> Result<Output, Errno> {
        if self.containers.contains_key(&id) {
            return Err(Errno::EXIST);
        }
        let fd = rustix::fs::open(
            VFIO_CONTAINER_PATH,
            OFlags::RDWR | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        // SAFETY: VFIO_GET_API_VERSION takes no argument.
        let version = unsafe { ioctl_int(fd.as_fd(), Ioctl::VFIO_GET_API_VERSION, 0) }?;
        self.containers.insert(id, fd);
        Ok(Output::ApiVersion(version))
    }
}

impl Kernel for Linux {
    fn is_tce_table(&mut self, fd: BorrowedFd<'_>) -> Result<bool, Errno> {
        let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .map_err(|e| Errno::from_io_error(&e).unwrap_or(Errno::IO))?;
        Ok(link.as_os_str() == "anon_inode:kvm-spapr-tce")
    }

    fn execute(&mut self, op: &KernelOp, objects: &dyn Objects) -> Result<Output, Errno> {
        match *op {
            KernelOp::ContainerOpen { container } => self.container_open(container),
            KernelOp::ContainerClose { container } => {
                self.containers.remove(&container).ok_or(Errno::BADF)?;
                Ok(Output::Done)
            }
            KernelOp::CheckExtension {
                container,
                extension,
            } => {
                let fd = self.container(container)?;
                // SAFETY: VFIO_CHECK_EXTENSION takes the extension number by value.
                unsafe { ioctl_int(fd, Ioctl::VFIO_CHECK_EXTENSION, extension.into()) }
                    .map(Output::Value)
            }
            KernelOp::SetIommu {
                container,
                iommu_type,
            } => {
                let fd = self.container(container)?;
                // SAFETY: VFIO_SET_IOMMU takes the IOMMU type by value.
                unsafe { ioctl_int(fd, Ioctl::VFIO_SET_IOMMU, iommu_type.into()) }?;
                Ok(Output::Done)
            }
            KernelOp::GroupGetStatus { group } => {
                let fd = objects.group(group).ok_or(Errno::BADF)?;
                let mut status = vfio_group_status {
                    argsz: argsz::<vfio_group_status>(),
                    flags: 0,
                };
                // SAFETY: VFIO_GROUP_GET_STATUS writes a `struct vfio_group_status`, the
                // vfio-bindings type, within its `argsz`.
                unsafe { ioctl_ptr(fd, Ioctl::VFIO_GROUP_GET_STATUS, &mut status) }?;
                Ok(Output::GroupStatus(GroupStatus {
                    viable: status.flags & abi::VFIO_GROUP_FLAGS_VIABLE != 0,
                    container_set: status.flags & abi::VFIO_GROUP_FLAGS_CONTAINER_SET != 0,
                }))
            }
            KernelOp::GroupSetContainer { container, group } => {
                let container_fd: RawFd = self.container(container)?.as_raw_fd();
                let fd = objects.group(group).ok_or(Errno::BADF)?;
                let mut arg = container_fd;
                // SAFETY: VFIO_GROUP_SET_CONTAINER reads one `int`, the container fd.
                unsafe { ioctl_ptr(fd, Ioctl::VFIO_GROUP_SET_CONTAINER, &mut arg) }?;
                Ok(Output::Done)
            }
            KernelOp::GroupUnsetContainer {
                container: _,
                group,
            } => {
                // The kernel knows the group's container; the id only names it for the engine.
                let fd = objects.group(group).ok_or(Errno::BADF)?;
                // SAFETY: VFIO_GROUP_UNSET_CONTAINER takes no argument.
                unsafe { ioctl_int(fd, Ioctl::VFIO_GROUP_UNSET_CONTAINER, 0) }?;
                Ok(Output::Done)
            }
            KernelOp::TceGetInfo { container } => {
                let fd = self.container(container)?;
                let mut info = vfio_iommu_spapr_tce_info {
                    argsz: argsz::<vfio_iommu_spapr_tce_info>(),
                    ..Default::default()
                };
                // SAFETY: VFIO_IOMMU_SPAPR_TCE_GET_INFO writes a
                // `struct vfio_iommu_spapr_tce_info` (vfio-bindings) within its `argsz`.
                unsafe { ioctl_ptr(fd, Ioctl::VFIO_IOMMU_SPAPR_TCE_GET_INFO, &mut info) }?;
                Ok(Output::TceInfo(TceInfo {
                    flags: info.flags,
                    dma32_window_start: info.dma32_window_start,
                    dma32_window_size: info.dma32_window_size,
                    pgsizes: info.ddw.pgsizes,
                    max_dynamic_windows: info.ddw.max_dynamic_windows_supported,
                    levels: info.ddw.levels,
                }))
            }
            KernelOp::RegisterMemory {
                container,
                region,
                offset,
                size,
            }
            | KernelOp::UnregisterMemory {
                container,
                region,
                offset,
                size,
            } => {
                let request = if matches!(op, KernelOp::RegisterMemory { .. }) {
                    Ioctl::VFIO_IOMMU_SPAPR_REGISTER_MEMORY
                } else {
                    Ioctl::VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY
                };
                let vaddr = address_in(objects, region, offset, size)?;
                prereg(self.container(container)?, request, vaddr, size)
            }
            KernelOp::TceCreate {
                container,
                page_shift,
                window_size,
                levels,
            } => {
                let fd = self.container(container)?;
                let mut arg = vfio_iommu_spapr_tce_create {
                    argsz: argsz::<vfio_iommu_spapr_tce_create>(),
                    page_shift,
                    window_size,
                    levels,
                    ..Default::default()
                };
                // SAFETY: the call reads and writes back a `struct vfio_iommu_spapr_tce_create`.
                unsafe { ioctl_ptr(fd, Ioctl::VFIO_IOMMU_SPAPR_TCE_CREATE, &mut arg) }?;
                Ok(Output::StartAddr(arg.start_addr))
            }
            KernelOp::TceRemove {
                container,
                start_addr,
            } => {
                let fd = self.container(container)?;
                let mut arg = vfio_iommu_spapr_tce_remove {
                    argsz: argsz::<vfio_iommu_spapr_tce_remove>(),
                    flags: 0,
                    start_addr,
                };
                // SAFETY: the call reads a `struct vfio_iommu_spapr_tce_remove`.
                unsafe { ioctl_ptr(fd, Ioctl::VFIO_IOMMU_SPAPR_TCE_REMOVE, &mut arg) }?;
                Ok(Output::Done)
            }
            KernelOp::MapDma {
                container,
                region,
                offset,
                iova,
                size,
                access,
            } => {
                let fd = self.container(container)?;
                let vaddr = address_in(objects, region, offset, size)?;
                let mut arg = vfio_iommu_type1_dma_map {
                    argsz: argsz::<vfio_iommu_type1_dma_map>(),
                    flags: dma_flags(access),
                    vaddr,
                    iova,
                    size,
                };
                // SAFETY: the sPAPR driver reads a `struct vfio_iommu_type1_dma_map`; v2 looks
                // `vaddr` up among the registered regions of the container's mm.
                let ret = unsafe { ioctl_ptr(fd, Ioctl::VFIO_IOMMU_MAP_DMA, &mut arg) }?;
                changed_nothing_if_positive(ret)?;
                Ok(Output::Done)
            }
            KernelOp::UnmapDma {
                container,
                iova,
                size,
            } => {
                let fd = self.container(container)?;
                let mut arg = vfio_iommu_type1_dma_unmap {
                    argsz: argsz::<vfio_iommu_type1_dma_unmap>(),
                    flags: 0,
                    iova,
                    size,
                    ..Default::default()
                };
                // SAFETY: the call reads (and may write back) the fixed part of
                // `struct vfio_iommu_type1_dma_unmap`; `argsz` excludes the flexible array
                // and no flag that uses it is set.
                let ret = unsafe { ioctl_ptr(fd, Ioctl::VFIO_IOMMU_UNMAP_DMA, &mut arg) }?;
                changed_nothing_if_positive(ret)?;
                // The sPAPR driver clears the whole range or fails, and does not write `size`
                // back (Type1 does), so on success this is the size asked for.
                Ok(Output::Unmapped(arg.size))
            }
            KernelOp::EehPeOp {
                container,
                op,
                err_type,
                err_func,
                err_addr,
                err_mask,
            } => {
                let fd = self.container(container)?;
                let mut arg = vfio_eeh_pe_op {
                    argsz: argsz::<vfio_eeh_pe_op>(),
                    flags: 0,
                    op,
                    __bindgen_anon_1: vfio_eeh_pe_op__bindgen_ty_1 {
                        err: vfio_eeh_pe_err {
                            type_: err_type,
                            func: err_func,
                            addr: err_addr,
                            mask: err_mask,
                        },
                    },
                };
                // SAFETY: the call reads a `struct vfio_eeh_pe_op` within its `argsz`.
                unsafe { ioctl_ptr(fd, Ioctl::VFIO_EEH_PE_OP, &mut arg) }.map(Output::Value)
            }
            KernelOp::KvmFileAdd { group } => {
                let group_fd: RawFd = objects.group(group).ok_or(Errno::BADF)?.as_raw_fd();
                set_vfio_file_attr(objects, abi::KVM_DEV_VFIO_FILE_ADD, &group_fd)
            }
            KernelOp::KvmFileDel { group } => {
                let group_fd: RawFd = objects.group(group).ok_or(Errno::BADF)?.as_raw_fd();
                set_vfio_file_attr(objects, abi::KVM_DEV_VFIO_FILE_DEL, &group_fd)
            }
            KernelOp::KvmSetSpaprTce { group, table } => {
                let groupfd = objects.group(group).ok_or(Errno::BADF)?.as_raw_fd();
                let tablefd = objects.table(table).ok_or(Errno::BADF)?.fd.as_raw_fd();
                let param = KvmVfioSpaprTce { groupfd, tablefd };
                set_vfio_file_attr(objects, abi::KVM_DEV_VFIO_GROUP_SET_SPAPR_TCE, &param)
            }
            KernelOp::KvmHasDeviceAttr { attr_group, attr } => {
                let device = objects.kvm_vfio_device().ok_or(Errno::BADF)?;
                let mut arg = KvmDeviceAttr {
                    flags: 0,
                    group: attr_group,
                    attr,
                    addr: 0,
                };
                // SAFETY: KVM_HAS_DEVICE_ATTR reads a `struct kvm_device_attr` (abi.rs pins its
                // layout) and does not follow `addr`.
                unsafe { ioctl_ptr(device, Ioctl::KVM_HAS_DEVICE_ATTR, &mut arg) }?;
                Ok(Output::Done)
            }
            KernelOp::ReadTces {
                table,
                first_index,
                count,
            } => {
                let table = objects.table(table).ok_or(Errno::BADF)?;
                read_tces(table, first_index, count).map(Output::Tces)
            }
        }
    }
}

/// `KVM_SET_DEVICE_ATTR(KVM_DEV_VFIO_FILE, attr)` on the kvm-vfio device with `payload`
/// (an `int` fd for FILE_ADD/DEL, a `struct kvm_vfio_spapr_tce` for SET_SPAPR_TCE).
fn set_vfio_file_attr<T>(objects: &dyn Objects, attr: u64, payload: &T) -> Result<Output, Errno> {
    let device = objects.kvm_vfio_device().ok_or(Errno::BADF)?;
    let mut arg = KvmDeviceAttr {
        flags: 0,
        group: abi::KVM_DEV_VFIO_FILE,
        attr,
        addr: payload as *const T as u64,
    };
    // SAFETY: KVM_SET_DEVICE_ATTR reads a `struct kvm_device_attr`; its `addr` points at
    // `payload`, which outlives the call and is the type the attribute expects (see callers).
    unsafe { ioctl_ptr(device, Ioctl::KVM_SET_DEVICE_ATTR, &mut arg) }?;
    Ok(Output::Done)
}

/// `KVM_CREATE_VM` with the default machine type: the calling process becomes the VM's creator
/// (the only process KVM serves, K1). Used by front-ends and tests.
pub fn create_vm(kvm: BorrowedFd<'_>) -> Result<OwnedFd, Errno> {
    // SAFETY: KVM_CREATE_VM takes the machine type by value.
    let fd = unsafe { ioctl_int(kvm, Ioctl::KVM_CREATE_VM, 0) }?;
    // SAFETY: on success KVM_CREATE_VM returns a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `KVM_CREATE_DEVICE` of the kvm-vfio device in `vm`. Used by front-ends and tests.
pub fn create_kvm_vfio_device(vm: BorrowedFd<'_>) -> Result<OwnedFd, Errno> {
    let mut arg = KvmCreateDevice {
        type_: abi::KVM_DEV_TYPE_VFIO,
        fd: 0,
        flags: 0,
    };
    // SAFETY: KVM_CREATE_DEVICE reads and writes back a `struct kvm_create_device` (abi.rs
    // pins its layout).
    unsafe { ioctl_ptr(vm, Ioctl::KVM_CREATE_DEVICE, &mut arg) }?;
    // SAFETY: on success the kernel stored a new fd in `arg.fd` that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(arg.fd as RawFd) })
}

fn argsz<T>() -> u32 {
    // Every argument struct is a few dozen bytes (abi.rs asserts the sizes).
    size_of::<T>() as u32
}

pub(crate) fn dma_flags(access: DmaAccess) -> u32 {
    let read = if access.read {
        abi::VFIO_DMA_MAP_FLAG_READ
    } else {
        0
    };
    let write = if access.write {
        abi::VFIO_DMA_MAP_FLAG_WRITE
    } else {
        0
    };
    read | write
}

/// `VFIO_IOMMU_SPAPR_(UN)REGISTER_MEMORY` of `size` bytes at `vaddr`.
fn prereg(container: BorrowedFd<'_>, op: Ioctl, vaddr: u64, size: u64) -> Result<Output, Errno> {
    let mut arg = vfio_iommu_spapr_register_memory {
        argsz: argsz::<vfio_iommu_spapr_register_memory>(),
        flags: 0,
        vaddr,
        size,
    };
    // SAFETY: both calls read a `struct vfio_iommu_spapr_register_memory`; the kernel validates
    // and pins (or unpins) the user range itself, and `vaddr` lies inside the caller's mapping
    // of the region (checked by `address_in`).
    unsafe { ioctl_ptr(container, op, &mut arg) }?;
    Ok(Output::Done)
}

/// The caller's address of `size` bytes at `offset` in `region`; `EFAULT` unless the whole
/// range lies inside the region's mapping, so a bad offset can never name other memory of this
/// process.
pub(crate) fn address_in(
    objects: &dyn Objects,
    region: RegionId,
    offset: u64,
    size: u64,
) -> Result<u64, Errno> {
    let mapping = objects.region(region).ok_or(Errno::FAULT)?;
    match offset.checked_add(size) {
        Some(end) if end <= mapping.size => mapping.addr.checked_add(offset).ok_or(Errno::FAULT),
        Some(_) | None => Err(Errno::FAULT),
    }
}

/// Reads `count` entries from `first_index` of a KVM TCE table by mapping the pages that hold
/// them (K6). The kernel stores each entry as a host-order u64 (`kvmppc_tce_put` writes
/// `tbl[idx] = tce` through a `u64 *`, and QEMU reads its mapping without swapping); only the
/// guest's H_PUT_TCE_INDIRECT list in guest memory is big-endian. `EINVAL` when the range passes
/// the table's end.
pub(crate) fn read_tces(
    table: TableFd<'_>,
    first_index: u64,
    count: u32,
) -> Result<Vec<u64>, Errno> {
    const ENTRY: u64 = size_of::<u64>() as u64;
    let end = first_index.checked_add(count.into()).ok_or(Errno::INVAL)?;
    if end > table.entries {
        return Err(Errno::INVAL);
    }
    if count == 0 {
        return Ok(Vec::new());
    }
    if let Some(view) = table.view {
        return view.read(first_index, count);
    }
    let page = rustix::param::page_size() as u64;
    let first_byte = first_index * ENTRY;
    let map_start = first_byte - first_byte % page;
    let map_end = (end * ENTRY).div_ceil(page) * page;
    let len = usize::try_from(map_end - map_start).map_err(|_| Errno::NOMEM)?;
    let mapping = Mapped::new(table.fd, len, map_start)?;
    let skip = ((first_byte - map_start) / ENTRY) as usize;
    Ok(mapping.read_u64s(skip, count as usize))
}

/// Takes ownership of an inherited fd (`--fd N`, systemd's fd 3) after checking that it is an
/// open, listening unix stream socket; marks it close-on-exec.
pub fn adopt_listening_socket(fd: RawFd) -> Result<OwnedFd, Errno> {
    // SAFETY: F_GETFD reads the fd's flags and touches no memory; it fails with EBADF for a
    // number that is not an open fd, which is what makes the adoption below sound.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(Errno::BADF);
    }
    // SAFETY: the fd is open (checked above) and was handed to this process to own; nothing
    // else in the process refers to it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let is_unix = rustix::net::sockopt::socket_domain(&owned)? == rustix::net::AddressFamily::UNIX;
    let is_stream = rustix::net::sockopt::socket_type(&owned)? == rustix::net::SocketType::STREAM;
    if !is_unix || !is_stream || !rustix::net::sockopt::socket_acceptconn(&owned)? {
        // Hand the fd back untouched: it was not ours to close.
        let _ = std::os::fd::IntoRawFd::into_raw_fd(owned);
        return Err(Errno::NOTSOCK);
    }
    rustix::io::fcntl_setfd(&owned, rustix::io::FdFlags::CLOEXEC)?;
    Ok(owned)
}

/// Takes ownership of a socket a worker inherited from its listener (`--connection-fd` and
/// the control channels) and marks it close-on-exec.
pub fn adopt_inherited_socket(fd: RawFd) -> Result<OwnedFd, Errno> {
    // SAFETY: F_GETFD reads the fd's flags and touches no memory; it fails with EBADF for a
    // number that is not an open fd, which is what makes the adoption below sound.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(Errno::BADF);
    }
    // SAFETY: the fd is open (checked above) and the listener handed it to this process to
    // own; nothing else in the process refers to it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    if rustix::net::sockopt::socket_domain(&owned)? != rustix::net::AddressFamily::UNIX {
        let _ = std::os::fd::IntoRawFd::into_raw_fd(owned);
        return Err(Errno::NOTSOCK);
    }
    rustix::io::fcntl_setfd(&owned, rustix::io::FdFlags::CLOEXEC)?;
    Ok(owned)
}

/// Closes every fd of the process but stdin, stdout, stderr and `keep`: a worker starts with
/// only the fds it needs, whatever its listener inherited from whoever started it.
///
/// Must run first thing in the process, before anything opens a file.
pub fn close_other_fds(keep: &[RawFd]) -> Result<(), Errno> {
    let mut keep: Vec<u32> = keep
        .iter()
        .filter_map(|&fd| u32::try_from(fd).ok())
        .collect();
    keep.sort_unstable();
    let mut first = 3u32;
    for fd in keep.into_iter().chain([u32::MAX]) {
        if fd > first {
            // SAFETY: close_range(2) only closes fds; the caller runs this before anything in
            // the process owns an fd in these ranges (nothing refers to them afterwards).
            let ret = unsafe { libc::syscall(libc::SYS_close_range, first, fd - 1, 0) };
            if ret != 0 {
                let err = std::io::Error::last_os_error();
                return Err(Errno::from_io_error(&err).unwrap_or(Errno::IO));
            }
        }
        first = first.max(fd.saturating_add(1));
    }
    Ok(())
}

/// What this host's kernel offers the product.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostCaps {
    /// `/dev/kvm` reports `KVM_CAP_SPAPR_TCE_VFIO`: accelerated mode is possible.
    pub spapr_tce_vfio: bool,
    /// `/dev/vfio/vfio` exists and reports `VFIO_EEH`.
    pub eeh: bool,
    /// `/dev/vfio/vfio` opens and its containers support the sPAPR TCE v2 IOMMU (on other
    /// platforms VFIO exists but cannot serve this product).
    pub vfio: bool,
}

/// Asks the kernel what it supports. `KVM_CHECK_EXTENSION` on `/dev/kvm` and
/// `VFIO_CHECK_EXTENSION` on a fresh container are system queries any process may make.
pub fn host_caps() -> HostCaps {
    let open = |path| rustix::fs::open(path, OFlags::RDWR | OFlags::CLOEXEC, Mode::empty()).ok();
    // Only asked, never used: reading is enough (Debian gives the kvm group access).
    let kvm = rustix::fs::open("/dev/kvm", OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty()).ok();
    let vfio = open(VFIO_CONTAINER_PATH);
    let present =
        |fd: &Option<OwnedFd>, check: fn(BorrowedFd<'_>, u32) -> Result<u32, Errno>, cap| {
            fd.as_ref()
                .is_some_and(|fd| check(fd.as_fd(), cap).is_ok_and(|v| v > 0))
        };
    HostCaps {
        spapr_tce_vfio: present(&kvm, kvm_check_extension, abi::KVM_CAP_SPAPR_TCE_VFIO),
        eeh: present(&vfio, vfio_check_extension, abi::VFIO_EEH),
        vfio: present(&vfio, vfio_check_extension, abi::VFIO_SPAPR_TCE_v2_IOMMU),
    }
}

/// `KVM_CHECK_EXTENSION` on `/dev/kvm` (or a VM fd): 0 when absent, else positive.
pub fn kvm_check_extension(kvm: BorrowedFd<'_>, cap: u32) -> Result<u32, Errno> {
    // SAFETY: KVM_CHECK_EXTENSION takes the capability number by value.
    unsafe { ioctl_int(kvm, Ioctl::KVM_CHECK_EXTENSION, cap.into()) }
}

/// `VFIO_CHECK_EXTENSION` on a container fd.
pub fn vfio_check_extension(container: BorrowedFd<'_>, extension: u32) -> Result<u32, Errno> {
    // SAFETY: VFIO_CHECK_EXTENSION takes the extension number by value.
    unsafe { ioctl_int(container, Ioctl::VFIO_CHECK_EXTENSION, extension.into()) }
}

/// `ioctl(fd, op, arg)` with an integer argument; returns the non-negative result.
///
/// # Safety
/// `op` must take its argument by value (or none), so the kernel dereferences nothing.
unsafe fn ioctl_int(fd: BorrowedFd<'_>, op: Ioctl, arg: libc::c_ulong) -> Result<u32, Errno> {
    // SAFETY: the caller guarantees the argument is not a pointer the kernel follows.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), op.native(), arg) };
    check(ret)
}

/// `ioctl(fd, op, arg)` with a pointer argument; returns the non-negative result.
///
/// # Safety
/// `T` must be the type the kernel reads and writes for `op` (layout and size), and any pointer
/// stored inside it must be valid for the call.
unsafe fn ioctl_ptr<T>(fd: BorrowedFd<'_>, op: Ioctl, arg: &mut T) -> Result<u32, Errno> {
    // SAFETY: `arg` is a live, exclusive reference for the duration of the call; the caller
    // guarantees it has the layout the kernel expects.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), op.native(), arg as *mut T as *mut c_void) };
    check(ret)
}

/// The sPAPR driver's MAP_DMA and UNMAP_DMA return 1, having changed nothing, when their
/// parameter check (a boolean in Linux) fails on a misaligned address (PROTOCOL.md §6.1).
pub(crate) fn changed_nothing_if_positive(ret: impl Into<u64>) -> Result<(), Errno> {
    match ret.into() {
        0 => Ok(()),
        _ => Err(Errno::INVAL),
    }
}

fn check(ret: libc::c_int) -> Result<u32, Errno> {
    match u32::try_from(ret) {
        Ok(value) => Ok(value),
        Err(_) => {
            let err = std::io::Error::last_os_error();
            Err(Errno::from_io_error(&err).unwrap_or(Errno::IO))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::{GroupId, Mapping, TableId};

    /// Objects for tests: each kind resolves to at most one object.
    #[derive(Default)]
    struct Fixture {
        table: Option<(OwnedFd, u64)>,
        region: Option<Mapping>,
    }

    impl Objects for Fixture {
        fn group(&self, _: GroupId) -> Option<BorrowedFd<'_>> {
            None
        }
        fn table(&self, _: TableId) -> Option<TableFd<'_>> {
            self.table.as_ref().map(|(fd, entries)| TableFd {
                fd: fd.as_fd(),
                entries: *entries,
                view: None,
            })
        }
        fn region(&self, _: RegionId) -> Option<Mapping> {
            self.region
        }
        fn kvm_vfio_device(&self) -> Option<BorrowedFd<'_>> {
            None
        }
    }

    /// A memfd standing in for a KVM TCE table fd: both are mmap-able files of host-order
    /// entries; a real TCE table needs a powerpc KVM host.
    fn table_of(entries: &[u64]) -> OwnedFd {
        let fd = rustix::fs::memfd_create("tces", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        let bytes: Vec<u8> = entries.iter().flat_map(|e| e.to_ne_bytes()).collect();
        rustix::io::write(&fd, &bytes).unwrap();
        fd
    }

    fn read(fixture: &Fixture, first_index: u64, count: u32) -> Result<Output, Errno> {
        Linux::new().execute(
            &KernelOp::ReadTces {
                table: TableId(1),
                first_index,
                count,
            },
            fixture,
        )
    }

    #[test]
    fn read_tces_range_across_page_boundary_host_order() {
        // 1024 entries span two 4 KiB pages (one 64 KiB page on ppc64le hosts).
        let entries: Vec<u64> = (0..1024u64)
            .map(|i| 0x0123_4567_0000_0000 | i << 12 | 3)
            .collect();
        let fixture = Fixture {
            table: Some((table_of(&entries), 1024)),
            ..Default::default()
        };
        assert_eq!(
            read(&fixture, 509, 6),
            Ok(Output::Tces(entries[509..515].to_vec()))
        );
        assert_eq!(read(&fixture, 0, 1024), Ok(Output::Tces(entries)));
    }

    #[test]
    fn read_tces_past_table_end_einval() {
        let fixture = Fixture {
            table: Some((table_of(&[1, 2, 3, 4]), 4)),
            ..Default::default()
        };
        assert_eq!(read(&fixture, 3, 2), Err(Errno::INVAL));
        assert_eq!(read(&fixture, u64::MAX, 2), Err(Errno::INVAL));
        assert_eq!(read(&fixture, 4, 0), Ok(Output::Tces(Vec::new())));
    }

    #[test]
    fn read_tces_unknown_table_ebadf() {
        assert_eq!(read(&Fixture::default(), 0, 1), Err(Errno::BADF));
    }

    #[test]
    fn address_in_range_outside_region_efault() {
        let fixture = Fixture {
            region: Some(Mapping {
                addr: 0x7000_0000,
                size: 0x1_0000,
            }),
            ..Default::default()
        };
        assert_eq!(
            address_in(&fixture, RegionId(1), 0x8000, 0x8000),
            Ok(0x7000_8000)
        );
        assert_eq!(
            address_in(&fixture, RegionId(1), 0x8000, 0x8001),
            Err(Errno::FAULT)
        );
        assert_eq!(
            address_in(&fixture, RegionId(1), u64::MAX, 2),
            Err(Errno::FAULT)
        );
        assert_eq!(
            address_in(&Fixture::default(), RegionId(1), 0, 1),
            Err(Errno::FAULT)
        );
    }

    #[test]
    fn container_op_unknown_container_ebadf() {
        let op = KernelOp::TceGetInfo {
            container: ContainerId(9),
        };
        assert_eq!(
            Linux::new().execute(&op, &Fixture::default()),
            Err(Errno::BADF)
        );
    }

    #[test]
    fn dma_flags_each_access_maps_to_vfio_bits() {
        assert_eq!(
            dma_flags(DmaAccess {
                read: false,
                write: false
            }),
            0
        );
        assert_eq!(
            dma_flags(DmaAccess {
                read: true,
                write: false
            }),
            1
        );
        assert_eq!(
            dma_flags(DmaAccess {
                read: false,
                write: true
            }),
            2
        );
        assert_eq!(
            dma_flags(DmaAccess {
                read: true,
                write: true
            }),
            3
        );
    }
}
