//! The model kernel as a service for real processes: a unix-socket server whose clients are
//! processes (caller identity = `SO_PEERCRED` pid, one mm per pid), and whose objects are
//! **stand-in fds** — real memfds the server creates and hands out by SCM_RIGHTS, which can be
//! passed between processes over any socket exactly like the real fds they stand for.
//!
//! This module owns the wire format, the stand-in registry and the two memfd-backed stores (KVM
//! TCE table pages, declared user memory). It must not decide any kernel rule: every request is
//! one [`ModelKernel`] call made as the peer's mm. The in-process [`ModelServer::handle`] makes
//! the owning process's own calls through the same dispatcher, as its own pid.
//!
//! # Stand-in fds
//! - "Opening" `/dev/kvm`, `/dev/vfio/vfio` or `/dev/vfio/N` is a request that returns a new
//!   memfd named like `model:vfio-container`; every file the kernel creates (VM, vCPU, device,
//!   KVM TCE table) comes back the same way.
//! - A stand-in passed back to the server is recognised by its inode (`fstat`); an fd the server
//!   did not create is a foreign file (e.g. `FILE_ADD` of it fails with `EINVAL`), and an fd slot
//!   of [`NO_FD`] is a number that names no file (`EBADF`).
//! - A KVM TCE table's stand-in is the memfd holding its entries (u64, host byte order), one
//!   kernel page per table page, so any holder can `mmap` it (K6) and sees the kernel's writes.
//! - The server cannot see fds being closed: `CLOSE` says the caller dropped the last fd of a
//!   file. The server keeps its own copy of every stand-in until the model releases the file.
//! - Guest RAM stays the caller's own memfd mapping; `MM_MAP` declares "this memfd is mapped at
//!   this address in my process" so the kernel can pin and read it.
//!
//! # Wire format
//! Frames are the product's (`protocol::send_frame`/`recv_frame`): a 12-byte header whose
//! `request` is the [`Op`] code, the `REPLY` flag on replies, fds with the header.
//! - Request payload: exactly [`Op::words`] little-endian u64 words, the op's arguments in the
//!   order of its documentation. Words naming a file are indexes into the fds of the frame.
//!   Words carrying a u32 field must fit 32 bits.
//! - Reply payload: a little-endian i64 status (0 or `-errno`), then the op's result words on
//!   success; a file result travels as the reply's one fd.
//! - Bad input gets an error reply and the connection goes on: unknown op `ENOSYS`, wrong
//!   payload size or a too-large u32 `EINVAL`, misplaced or too many fds `EBADF`. Only a broken
//!   frame closes the connection.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex, MutexGuard};

use rustix::fs::{fstat, memfd_create, MemfdFlags};
use rustix::io::{pread, pwrite};

use super::abi::{
    CreateSpaprTce64, DmaMap, DmaUnmap, EehPeOp, HcallOutcome, RegisterMemory, SpaprTceInfo,
    TceCreate, TceRemove, UserMemoryRegion, KVM_DEV_VFIO_FILE, KVM_DEV_VFIO_FILE_ADD,
    KVM_DEV_VFIO_FILE_DEL, KVM_DEV_VFIO_GROUP_SET_SPAPR_TCE,
};
use super::kernel::{FileArg, FileId, FileKind, HcallStats, HwTce, Mm, MmStats, ModelKernel};
use super::store::{TceStore, UserMemory};
use super::{DmaDir, Errno};
use crate::kernel::shared_memory::sealed_memfd;
use crate::protocol::{recv_frame, send_frame, FrameReader, RecvError};

/// An fd-slot word that names no file: the kernel's `fget` of it fails (`EBADF`).
pub const NO_FD: u64 = u64::MAX;

macro_rules! ops {
    ($($(#[$doc:meta])* $name:ident = $code:literal, $words:literal;)*) => {
        /// Requests of the model kernel protocol. Arguments are listed as `[words]`; `fd:` marks a
        /// word that indexes the frame's fds.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        #[repr(u32)]
        pub enum Op { $($(#[$doc])* $name = $code,)* }

        impl Op {
            /// The op with this code.
            pub fn from_u32(code: u32) -> Option<Self> {
                match code { $($code => Some(Self::$name),)* _ => None }
            }

            /// How many u64 words the request carries.
            pub fn words(self) -> usize {
                match self { $(Self::$name => $words,)* }
            }
        }
    };
}

ops! {
    /// `open("/dev/kvm")` `[]` → fd.
    OpenKvm = 1, 0;
    /// `open("/dev/vfio/vfio")` `[]` → fd.
    OpenVfioContainer = 2, 0;
    /// `open("/dev/vfio/N")` `[N]` → fd.
    OpenVfioGroup = 3, 1;
    /// The caller dropped its last fd of a file `[fd:file]`.
    Close = 4, 1;
    /// `KVM_CREATE_VM` `[fd:kvm]` → fd.
    KvmCreateVm = 5, 1;
    /// `KVM_CHECK_EXTENSION` `[fd:kvm-or-vm, cap]` → `[value]`.
    KvmCheckExtension = 6, 2;
    /// `KVM_CREATE_VCPU` `[fd:vm, id]` → fd.
    KvmCreateVcpu = 7, 2;
    /// `KVM_ENABLE_CAP(KVM_CAP_PPC_ENABLE_HCALL)` `[fd:vm, hcall, enable]`.
    KvmEnableHcall = 8, 3;
    /// `KVM_SET_USER_MEMORY_REGION` `[fd:vm, slot, flags, gpa, size, ua]`.
    KvmSetUserMemoryRegion = 9, 6;
    /// `KVM_CREATE_SPAPR_TCE_64` `[fd:vm, liobn, page_shift, flags, offset, size]` → fd.
    KvmCreateSpaprTce64 = 10, 6;
    /// `KVM_CREATE_DEVICE` `[fd:vm, type, flags]` → fd (none with `KVM_CREATE_DEVICE_TEST`).
    KvmCreateDevice = 11, 3;
    /// `KVM_SET_DEVICE_ATTR` `[fd:device, group, attr, fd:a, fd:b]`: `FILE_ADD`/`FILE_DEL` take
    /// their file in `a`; `GROUP_SET_SPAPR_TCE` takes the group in `a` and the table in `b`.
    KvmSetDeviceAttr = 12, 5;
    /// `KVM_HAS_DEVICE_ATTR` `[fd:device, group, attr]`.
    KvmHasDeviceAttr = 13, 3;
    /// `KVM_GET_DEVICE_ATTR` `[fd:device, group, attr]`.
    KvmGetDeviceAttr = 14, 3;
    /// `KVM_RUN` up to the guest's hypercall `[fd:vcpu, number, r4, r5, r6, r7]` →
    /// `[exited, r3, r4]`.
    VcpuHcall = 15, 6;
    /// `VFIO_GROUP_GET_STATUS` `[fd:group]` → `[flags]`.
    VfioGroupGetStatus = 16, 1;
    /// `VFIO_GROUP_SET_CONTAINER` `[fd:group, fd:container]`.
    VfioGroupSetContainer = 17, 2;
    /// `VFIO_GROUP_UNSET_CONTAINER` `[fd:group]`.
    VfioGroupUnsetContainer = 18, 1;
    /// `VFIO_GET_API_VERSION` `[fd:container]` → `[version]`.
    VfioGetApiVersion = 19, 1;
    /// `VFIO_CHECK_EXTENSION` `[fd:container, extension]` → `[value]`.
    VfioCheckExtension = 20, 2;
    /// `VFIO_SET_IOMMU` `[fd:container, type]`.
    VfioSetIommu = 21, 2;
    /// `VFIO_IOMMU_ENABLE` `[fd:container]`.
    VfioIommuEnable = 22, 1;
    /// `VFIO_IOMMU_DISABLE` `[fd:container]`.
    VfioIommuDisable = 23, 1;
    /// `VFIO_IOMMU_SPAPR_TCE_GET_INFO` `[fd:container, argsz]` →
    /// `[flags, dma32_start, dma32_size, pgsizes, max_dynamic_windows, levels]`.
    SpaprTceGetInfo = 24, 2;
    /// `VFIO_IOMMU_SPAPR_REGISTER_MEMORY` `[fd:container, argsz, flags, vaddr, size]`.
    RegisterMemory = 25, 5;
    /// `VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY` `[fd:container, argsz, flags, vaddr, size]`.
    UnregisterMemory = 26, 5;
    /// `VFIO_IOMMU_SPAPR_TCE_CREATE` `[fd:container, argsz, flags, page_shift, window_size,
    /// levels]` → `[start_addr]`.
    TceCreate = 27, 6;
    /// `VFIO_IOMMU_SPAPR_TCE_REMOVE` `[fd:container, argsz, flags, start_addr]`.
    TceRemove = 28, 4;
    /// `VFIO_IOMMU_MAP_DMA` `[fd:container, argsz, flags, vaddr, iova, size]` → `[value]`.
    MapDma = 29, 6;
    /// `VFIO_IOMMU_UNMAP_DMA` `[fd:container, argsz, flags, iova, size]` → `[value]`.
    UnmapDma = 30, 5;
    /// `VFIO_EEH_PE_OP` `[fd:container, argsz, flags, op, err_type, err_func, err_addr,
    /// err_mask]` → `[value]`.
    EehPeOp = 31, 8;
    /// Model only: the caller maps `len` bytes of a memfd from `offset` at `ua`
    /// `[fd:memfd, ua, len, offset, page_shift, writable]`.
    MmMap = 32, 6;
    /// Model only: the caller unmapped the mapping starting at `ua` `[ua]`.
    MmUnmap = 33, 1;
    /// Model only: locked and pinned memory of a process `[pid or 0 for the caller]` →
    /// `[locked_vm_pages, pinned_pages, prereg_regions]`.
    MmStats = 34, 1;
    /// Model only: hypercall counters of a VM `[fd:vm-vcpu-or-table]` → `[in_kernel, exits]`.
    HcallStats = 35, 1;
    /// Model only: what a group's IOMMU holds for a bus address `[group, bus_addr]` →
    /// `[present, pid, ua, permission bits]`.
    IommuEntry = 36, 2;
    /// What `readlink(/proc/self/fd/N)` would show of a file `[fd:file]` → `[kind]`: 0 for a
    /// file the model does not know, else [`FileKind::code`].
    FileKind = 37, 1;
}

/// A KVM TCE table's pages in a memfd: entry `i` is the host-order u64 at byte `8 * i`.
struct MemfdTceStore {
    fd: OwnedFd,
    page_size: u64,
}

impl TceStore for MemfdTceStore {
    fn get(&self, idx: u64) -> u64 {
        let mut b = [0u8; 8];
        match pread(&self.fd, &mut b[..], idx * 8) {
            Ok(8) => u64::from_ne_bytes(b),
            _ => 0,
        }
    }

    fn put(&mut self, idx: u64, tce: u64) {
        // A zero never allocates a page: skip writing one where the entry already reads 0.
        if tce == 0 && self.get(idx) == 0 {
            return;
        }
        // A failed write leaves the entry as it was, as a failed page allocation does.
        let _ = pwrite(&self.fd, &tce.to_ne_bytes(), idx * 8);
    }

    fn allocated_pages(&self) -> u64 {
        fstat(&self.fd).map_or(0, |st| (st.st_blocks as u64 * 512).div_ceil(self.page_size))
    }

    fn memfd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.fd.as_fd())
    }
}

/// User memory read through the memfd that backs it.
struct MemfdMemory(OwnedFd);

impl UserMemory for MemfdMemory {
    fn read(&self, offset: u64, buf: &mut [u8]) -> bool {
        matches!(pread(&self.0, &mut *buf, offset), Ok(n) if n == buf.len())
    }
}

fn standin_name(kind: FileKind) -> &'static str {
    match kind {
        FileKind::Kvm => "model:kvm",
        FileKind::Vm => "model:kvm-vm",
        FileKind::Vcpu => "model:kvm-vcpu",
        FileKind::SpaprTce => "model:kvm-spapr-tce",
        FileKind::KvmVfio => "model:kvm-vfio",
        FileKind::VfioGroup => "model:vfio-group",
        FileKind::VfioContainer => "model:vfio-container",
    }
}

fn inode_of(fd: impl AsFd) -> Option<(u64, u64)> {
    fstat(fd).ok().map(|st| (st.st_dev, st.st_ino))
}

struct State {
    kernel: ModelKernel,
    by_inode: HashMap<(u64, u64), FileId>,
    standins: HashMap<FileId, OwnedFd>,
    /// The files each process opened or created and has not closed: what its exit closes.
    opened: HashMap<Mm, Vec<FileId>>,
    /// The kernel's released-file count at the last collection.
    collected: u64,
}

impl State {
    fn resolve(&self, fd: BorrowedFd<'_>) -> FileArg {
        match inode_of(fd).and_then(|ino| self.by_inode.get(&ino)) {
            Some(&id) if self.kernel.file_kind(id).is_some() => FileArg::File(id),
            _ => FileArg::Foreign,
        }
    }

    /// A new fd for `id`'s stand-in, creating the stand-in on first use.
    fn standin(&mut self, id: FileId) -> Result<OwnedFd, Errno> {
        if let Some(fd) = self.standins.get(&id) {
            return fd.try_clone().map_err(|_| Errno::MFILE);
        }
        let kind = self.kernel.file_kind(id).ok_or(Errno::BADF)?;
        let fd = match self.kernel.spapr_tce_store(id).and_then(|s| s.memfd()) {
            Some(table) => table.try_clone_to_owned().map_err(|_| Errno::MFILE)?,
            None => memfd_create(standin_name(kind), MemfdFlags::CLOEXEC)?,
        };
        let ino = inode_of(&fd).ok_or(Errno::BADF)?;
        self.by_inode.insert(ino, id);
        let copy = fd.try_clone().map_err(|_| Errno::MFILE)?;
        self.standins.insert(id, fd);
        Ok(copy)
    }

    /// Drops the copies of stand-ins whose files the model released. Scans only after a
    /// release: every call ends with a collection, and the maps grow with every session.
    fn collect(&mut self) {
        if self.kernel.released_files() == self.collected {
            return;
        }
        self.collected = self.kernel.released_files();
        let kernel = &self.kernel;
        self.standins
            .retain(|&id, _| kernel.file_kind(id).is_some());
        self.by_inode
            .retain(|_, id| kernel.file_kind(*id).is_some());
    }
}

/// An fd argument: received with a frame (owned), or lent by an in-process caller.
enum ArgFd<'a> {
    Owned(OwnedFd),
    Borrowed(BorrowedFd<'a>),
}

impl ArgFd<'_> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Self::Owned(fd) => fd.as_fd(),
            Self::Borrowed(fd) => *fd,
        }
    }

    fn into_owned(self) -> Option<OwnedFd> {
        match self {
            Self::Owned(fd) => Some(fd),
            // Only a call that keeps the file (MM_MAP) pays for a copy.
            Self::Borrowed(fd) => fd.try_clone_to_owned().ok(),
        }
    }
}

/// One decoded request.
struct Req<'a> {
    words: Vec<u64>,
    fds: Vec<Option<ArgFd<'a>>>,
}

impl Req<'_> {
    fn u64(&self, i: usize) -> u64 {
        self.words[i]
    }

    fn u32(&self, i: usize) -> Result<u32, Errno> {
        u32::try_from(self.words[i]).map_err(|_| Errno::INVAL)
    }

    fn fd(&self, i: usize) -> Option<BorrowedFd<'_>> {
        usize::try_from(self.words[i])
            .ok()
            .and_then(|slot| self.fds.get(slot))
            .and_then(Option::as_ref)
            .map(ArgFd::as_fd)
    }

    fn take_fd(&mut self, i: usize) -> Option<OwnedFd> {
        let slot = usize::try_from(self.words[i]).ok()?;
        self.fds.get_mut(slot)?.take()?.into_owned()
    }
}

/// What a successful request returns.
enum Out {
    Words(Vec<u64>),
    File(Option<FileId>),
}

fn none() -> Result<Out, Errno> {
    Ok(Out::Words(Vec::new()))
}

fn words(w: impl Into<Vec<u64>>) -> Result<Out, Errno> {
    Ok(Out::Words(w.into()))
}

struct Shared {
    state: Mutex<State>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere cannot leave the model half-updated in a way a later call would
        // trust less than a fresh lock; keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs one request as `caller`: status and result words, and the reply's fd.
    fn dispatch(
        &self,
        caller: Mm,
        code: u32,
        payload: &[u8],
        fds: Vec<ArgFd<'_>>,
    ) -> Result<(Vec<u64>, Option<OwnedFd>), Errno> {
        let op = Op::from_u32(code).ok_or(Errno::NOSYS)?;
        if payload.len() != op.words() * 8 {
            return Err(Errno::INVAL);
        }
        let words = payload
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
            .collect();
        let mut req = Req {
            words,
            fds: fds.into_iter().map(Some).collect(),
        };
        let mut state = self.lock();
        let result = Self::call(&mut state, caller, op, &mut req);
        let reply = match result {
            Ok(Out::Words(w)) => Ok((w, None)),
            Ok(Out::File(None)) => Ok((Vec::new(), None)),
            Ok(Out::File(Some(id))) => {
                state.opened.entry(caller).or_default().push(id);
                state.standin(id).map(|fd| (Vec::new(), Some(fd)))
            }
            Err(e) => Err(e),
        };
        state.collect();
        reply
    }

    fn call(s: &mut State, caller: Mm, op: Op, r: &mut Req<'_>) -> Result<Out, Errno> {
        let arg = |s: &State, r: &Req, i: usize| -> FileArg {
            match r.fd(i) {
                Some(fd) => s.resolve(fd),
                None => FileArg::Bad,
            }
        };
        // The file an ioctl is issued on: a non-model fd answers no model ioctl.
        let target = |s: &State, r: &Req, i: usize| -> Result<FileId, Errno> {
            match arg(s, r, i) {
                FileArg::File(id) => Ok(id),
                FileArg::Foreign => Err(Errno::NOTTY),
                FileArg::Bad => Err(Errno::BADF),
            }
        };
        let k = &mut s.kernel;
        match op {
            Op::OpenKvm => Ok(Out::File(Some(k.open_kvm()))),
            Op::OpenVfioContainer => Ok(Out::File(Some(k.open_vfio_container()))),
            Op::OpenVfioGroup => Ok(Out::File(Some(k.open_vfio_group(r.u32(0)?)?))),
            Op::Close => {
                let id = target(s, r, 0)?;
                if let Some(opened) = s.opened.get_mut(&caller) {
                    opened.retain(|&f| f != id);
                }
                s.kernel.close(id).map(|()| Out::Words(Vec::new()))
            }
            Op::KvmCreateVm => {
                let kvm = target(s, r, 0)?;
                Ok(Out::File(Some(s.kernel.kvm_create_vm(caller, kvm)?)))
            }
            Op::KvmCheckExtension => {
                let f = target(s, r, 0)?;
                words([u64::from(s.kernel.kvm_check_extension(
                    caller,
                    f,
                    r.u32(1)?,
                )?)])
            }
            Op::KvmCreateVcpu => {
                let vm = target(s, r, 0)?;
                Ok(Out::File(Some(s.kernel.kvm_create_vcpu(
                    caller,
                    vm,
                    r.u32(1)?,
                )?)))
            }
            Op::KvmEnableHcall => {
                let vm = target(s, r, 0)?;
                s.kernel.kvm_enable_hcall(caller, vm, r.u64(1), r.u64(2))?;
                none()
            }
            Op::KvmSetUserMemoryRegion => {
                let vm = target(s, r, 0)?;
                let region = UserMemoryRegion {
                    slot: r.u32(1)?,
                    flags: r.u32(2)?,
                    guest_phys_addr: r.u64(3),
                    memory_size: r.u64(4),
                    userspace_addr: r.u64(5),
                };
                s.kernel.kvm_set_user_memory_region(caller, vm, region)?;
                none()
            }
            Op::KvmCreateSpaprTce64 => {
                let vm = target(s, r, 0)?;
                let args = CreateSpaprTce64 {
                    liobn: r.u64(1),
                    page_shift: r.u32(2)?,
                    flags: r.u32(3)?,
                    offset: r.u64(4),
                    size: r.u64(5),
                };
                Ok(Out::File(Some(
                    s.kernel.kvm_create_spapr_tce_64(caller, vm, args)?,
                )))
            }
            Op::KvmCreateDevice => {
                let vm = target(s, r, 0)?;
                Ok(Out::File(s.kernel.kvm_create_device(
                    caller,
                    vm,
                    r.u32(1)?,
                    r.u32(2)?,
                )?))
            }
            Op::KvmSetDeviceAttr => {
                let dev = target(s, r, 0)?;
                let (a, b) = (arg(s, r, 3), arg(s, r, 4));
                let k = &mut s.kernel;
                match (r.u32(1)?, r.u64(2)) {
                    (KVM_DEV_VFIO_FILE, KVM_DEV_VFIO_FILE_ADD) => {
                        k.kvm_vfio_file_add(caller, dev, a)?
                    }
                    (KVM_DEV_VFIO_FILE, KVM_DEV_VFIO_FILE_DEL) => {
                        k.kvm_vfio_file_del(caller, dev, a)?
                    }
                    (KVM_DEV_VFIO_FILE, KVM_DEV_VFIO_GROUP_SET_SPAPR_TCE) => {
                        k.kvm_vfio_set_spapr_tce(caller, dev, a, b)?
                    }
                    // Unknown attributes still go through the device's caller check first.
                    (group, attr) => {
                        k.kvm_has_device_attr(caller, dev, group, attr)?;
                        return Err(Errno::NXIO);
                    }
                }
                none()
            }
            Op::KvmHasDeviceAttr => {
                let dev = target(s, r, 0)?;
                s.kernel
                    .kvm_has_device_attr(caller, dev, r.u32(1)?, r.u64(2))?;
                none()
            }
            Op::KvmGetDeviceAttr => {
                let dev = target(s, r, 0)?;
                s.kernel.kvm_get_device_attr(caller, dev)?;
                none()
            }
            Op::VcpuHcall => {
                let vcpu = target(s, r, 0)?;
                let regs = [r.u64(2), r.u64(3), r.u64(4), r.u64(5)];
                match s.kernel.vcpu_hcall_raw(caller, vcpu, r.u64(1), regs)? {
                    HcallOutcome::Exit => words([1, 0, 0]),
                    HcallOutcome::Completed { ret, value } => words([0, ret as u64, value]),
                }
            }
            Op::VfioGroupGetStatus => {
                let g = target(s, r, 0)?;
                words([u64::from(s.kernel.vfio_group_get_status(g)?)])
            }
            Op::VfioGroupSetContainer => {
                let g = target(s, r, 0)?;
                let c = arg(s, r, 1);
                s.kernel.vfio_group_set_container(g, c)?;
                none()
            }
            Op::VfioGroupUnsetContainer => {
                let g = target(s, r, 0)?;
                s.kernel.vfio_group_unset_container(g)?;
                none()
            }
            Op::VfioGetApiVersion => {
                let c = target(s, r, 0)?;
                words([u64::from(s.kernel.vfio_get_api_version(c)?)])
            }
            Op::VfioCheckExtension => {
                let c = target(s, r, 0)?;
                words([u64::from(s.kernel.vfio_check_extension(c, r.u32(1)?)?)])
            }
            Op::VfioSetIommu => {
                let c = target(s, r, 0)?;
                s.kernel.vfio_set_iommu(c, r.u32(1)?)?;
                none()
            }
            Op::VfioIommuEnable => {
                let c = target(s, r, 0)?;
                s.kernel.vfio_iommu_enable(caller, c)?;
                none()
            }
            Op::VfioIommuDisable => {
                let c = target(s, r, 0)?;
                s.kernel.vfio_iommu_disable(caller, c)?;
                none()
            }
            Op::SpaprTceGetInfo => {
                let c = target(s, r, 0)?;
                let i = s.kernel.vfio_spapr_tce_get_info(caller, c, r.u32(1)?)?;
                words([
                    u64::from(i.flags),
                    u64::from(i.dma32_window_start),
                    u64::from(i.dma32_window_size),
                    i.pgsizes,
                    u64::from(i.max_dynamic_windows_supported),
                    u64::from(i.levels),
                ])
            }
            Op::RegisterMemory | Op::UnregisterMemory => {
                let c = target(s, r, 0)?;
                let arg = RegisterMemory {
                    argsz: r.u32(1)?,
                    flags: r.u32(2)?,
                    vaddr: r.u64(3),
                    size: r.u64(4),
                };
                if op == Op::RegisterMemory {
                    s.kernel.vfio_register_memory(caller, c, arg)?;
                } else {
                    s.kernel.vfio_unregister_memory(caller, c, arg)?;
                }
                none()
            }
            Op::TceCreate => {
                let c = target(s, r, 0)?;
                let arg = TceCreate {
                    argsz: r.u32(1)?,
                    flags: r.u32(2)?,
                    page_shift: r.u32(3)?,
                    window_size: r.u64(4),
                    levels: r.u32(5)?,
                };
                words([s.kernel.vfio_tce_create(caller, c, arg)?])
            }
            Op::TceRemove => {
                let c = target(s, r, 0)?;
                let arg = TceRemove {
                    argsz: r.u32(1)?,
                    flags: r.u32(2)?,
                    start_addr: r.u64(3),
                };
                s.kernel.vfio_tce_remove(caller, c, arg)?;
                none()
            }
            Op::MapDma => {
                let c = target(s, r, 0)?;
                let arg = DmaMap {
                    argsz: r.u32(1)?,
                    flags: r.u32(2)?,
                    vaddr: r.u64(3),
                    iova: r.u64(4),
                    size: r.u64(5),
                };
                words([u64::from(s.kernel.vfio_map_dma(caller, c, arg)?)])
            }
            Op::UnmapDma => {
                let c = target(s, r, 0)?;
                let arg = DmaUnmap {
                    argsz: r.u32(1)?,
                    flags: r.u32(2)?,
                    iova: r.u64(3),
                    size: r.u64(4),
                };
                words([u64::from(s.kernel.vfio_unmap_dma(caller, c, arg)?)])
            }
            Op::EehPeOp => {
                let c = target(s, r, 0)?;
                let arg = EehPeOp {
                    argsz: r.u32(1)?,
                    flags: r.u32(2)?,
                    op: r.u32(3)?,
                    err_type: r.u32(4)?,
                    err_func: r.u32(5)?,
                    err_addr: r.u64(6),
                    err_mask: r.u64(7),
                };
                words([u64::from(s.kernel.vfio_eeh_pe_op(caller, c, arg)?)])
            }
            Op::MmMap => {
                let memfd = r.take_fd(0).ok_or(Errno::BADF)?;
                let memory = Arc::new(MemfdMemory(memfd));
                k.mm_map(
                    caller,
                    r.u64(1),
                    r.u64(2),
                    r.u64(5) != 0,
                    r.u32(4)?,
                    memory,
                    r.u64(3),
                )?;
                none()
            }
            Op::MmUnmap => {
                k.mm_unmap(caller, r.u64(0))?;
                none()
            }
            Op::MmStats => {
                let mm = match r.u32(0)? {
                    0 => caller,
                    pid => Mm(pid),
                };
                let st = k.mm_stats(mm);
                words([st.locked_vm_pages, st.pinned_pages, st.prereg_regions])
            }
            Op::HcallStats => {
                let f = target(s, r, 0)?;
                let st = s.kernel.hcall_stats(f).ok_or(Errno::NOTTY)?;
                words([st.in_kernel, st.exits])
            }
            Op::FileKind => {
                let code = match arg(s, r, 0) {
                    FileArg::Bad => return Err(Errno::BADF),
                    FileArg::File(id) => s.kernel.file_kind(id).map_or(0, FileKind::code),
                    FileArg::Foreign => 0,
                };
                words([code])
            }
            Op::IommuEntry => match k.iommu_entry(r.u32(0)?, r.u64(1)) {
                None => words([0, 0, 0, 0]),
                Some(t) => {
                    let bits = match t.dir {
                        DmaDir::None => 0,
                        DmaDir::ToDevice => 1,
                        DmaDir::FromDevice => 2,
                        DmaDir::Bidirectional => 3,
                    };
                    words([1, u64::from(t.mm.0), t.ua, bits])
                }
            },
        }
    }

    /// Gives `caller` the locked-memory limit its process really has, so that accounting
    /// refuses what the kernel would refuse it.
    fn adopt_memlock_limit(&self, caller: Mm) {
        if let Some(limit) = proc_memlock_limit(caller.0) {
            self.lock().kernel.set_memlock_limit(caller, limit);
        }
    }

    /// Serves one connection until the peer closes it or breaks a frame.
    fn serve_connection(&self, stream: UnixStream) -> io::Result<()> {
        let cred = rustix::net::sockopt::socket_peercred(&stream)?;
        let caller = Mm(cred.pid.as_raw_nonzero().get() as u32);
        self.adopt_memlock_limit(caller);
        let mut reader = FrameReader::exact(false);
        loop {
            let frame = match reader.recv(&stream) {
                Ok(frame) => frame,
                Err(RecvError::Closed) => return Ok(()),
                Err(RecvError::Io(e)) => return Err(e),
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
            };
            let code = frame.header.request;
            let result = if frame.fd_problem.is_some() {
                Err(Errno::BADF)
            } else {
                self.dispatch(
                    caller,
                    code,
                    &frame.payload,
                    frame.fds.into_iter().map(ArgFd::Owned).collect(),
                )
            };
            let (payload, fd) = encode_reply(result);
            let fds: Vec<BorrowedFd<'_>> = fd.iter().map(|f| f.as_fd()).collect();
            send_frame(&stream, code, true, &payload, &fds)?;
        }
    }
}

/// `RLIMIT_MEMLOCK` of process `pid` in bytes, `None` inside when it may lock without limit
/// (an infinite limit, or `CAP_IPC_LOCK`, bit 14 of its effective capabilities). The outer
/// `None` means `/proc` could not tell.
fn proc_memlock_limit(pid: u32) -> Option<Option<u64>> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())?;
    if cap_eff & (1 << 14) != 0 {
        return Some(None);
    }
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let soft = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max locked memory"))?
        .split_whitespace()
        .next()?;
    match soft {
        "unlimited" => Some(None),
        bytes => bytes.parse().ok().map(Some),
    }
}

fn encode_reply(result: Result<(Vec<u64>, Option<OwnedFd>), Errno>) -> (Vec<u8>, Option<OwnedFd>) {
    match result {
        Ok((words, fd)) => {
            let mut payload = 0i64.to_le_bytes().to_vec();
            for w in words {
                payload.extend_from_slice(&w.to_le_bytes());
            }
            (payload, fd)
        }
        Err(e) => ((-i64::from(e.raw_os_error())).to_le_bytes().to_vec(), None),
    }
}

/// The model kernel server: owns a [`ModelKernel`] and serves it to processes.
#[derive(Clone)]
pub struct ModelServer {
    shared: Arc<Shared>,
}

impl ModelServer {
    /// Serves `kernel`, backing its KVM TCE tables with memfds.
    pub fn new(mut kernel: ModelKernel) -> Self {
        let page_size = kernel.platform().page_size();
        kernel.set_tce_store_factory(move |bytes| {
            // A KVM table's size is fixed at creation: its stand-in is sealed the same way.
            let fd = sealed_memfd(standin_name(FileKind::SpaprTce), bytes)?;
            Ok(Box::new(MemfdTceStore { fd, page_size }) as Box<dyn TceStore>)
        });
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    kernel,
                    by_inode: HashMap::new(),
                    standins: HashMap::new(),
                    opened: HashMap::new(),
                    collected: 0,
                }),
            }),
        }
    }

    /// Accepts connections on `listener` forever, one thread per connection. Returns only when
    /// accepting fails.
    pub fn serve(&self, listener: UnixListener) -> io::Result<()> {
        loop {
            let (stream, _) = listener.accept()?;
            let shared = Arc::clone(&self.shared);
            std::thread::spawn(move || {
                // A connection's failure ends that connection only.
                let _ = shared.serve_connection(stream);
            });
        }
    }

    /// Serves one already-connected stream on the calling thread.
    pub fn serve_connection(&self, stream: UnixStream) -> io::Result<()> {
        self.shared.serve_connection(stream)
    }

    /// A client for this process's own calls, made as this process's mm without a socket.
    pub fn handle(&self) -> ModelClient {
        self.shared.adopt_memlock_limit(Mm(std::process::id()));
        ModelClient {
            transport: Transport::Local {
                shared: Arc::clone(&self.shared),
                caller: Mm(std::process::id()),
            },
        }
    }

    /// A client whose calls are made as `caller`, without a socket: several simulated
    /// processes in one test process (each keeps its own mm, as separate processes would).
    pub fn handle_as(&self, caller: Mm) -> ModelClient {
        ModelClient {
            transport: Transport::Local {
                shared: Arc::clone(&self.shared),
                caller,
            },
        }
    }

    /// Process `mm` exited: the kernel closes the files it opened and still held, then tears
    /// its address space down (its pre-registered memory and locked-memory charge go). The
    /// server cannot see fds being closed or passed on, so it closes what the process itself
    /// opened or created: a process that passed such a file to another before exiting is not
    /// modelled (the sidecar never passes its own files).
    pub fn process_exited(&self, mm: Mm) {
        let mut state = self.shared.lock();
        for id in state.opened.remove(&mm).unwrap_or_default() {
            if state.kernel.file_kind(id).is_some() {
                let _ = state.kernel.close(id);
            }
        }
        state.kernel.exit_mm(mm);
        state.collect();
    }

    /// The model file a stand-in fd names, if it names one.
    pub fn file_of(&self, fd: BorrowedFd<'_>) -> Option<FileId> {
        let state = self.shared.lock();
        let id = *state.by_inode.get(&inode_of(fd)?)?;
        state.kernel.file_kind(id).map(|_| id)
    }

    /// Runs `f` on the kernel (status, tests).
    pub fn with_kernel<R>(&self, f: impl FnOnce(&mut ModelKernel) -> R) -> R {
        let mut state = self.shared.lock();
        let r = f(&mut state.kernel);
        state.collect();
        r
    }
}

/// Why a model call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The model kernel refused the call, as Linux would.
    #[error("model kernel: {0}")]
    Kernel(Errno),
    /// The connection to the server failed.
    #[error("model kernel connection: {0}")]
    Io(#[from] io::Error),
    /// The server closed the connection or broke a frame.
    #[error("model kernel connection: {0}")]
    Recv(#[from] RecvError),
    /// The server's reply does not match the request.
    #[error("model kernel reply: {0}")]
    Reply(&'static str),
}

impl CallError {
    /// The errno the kernel answered, if the call reached it.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            Self::Kernel(e) => Some(*e),
            Self::Io(_) | Self::Recv(_) | Self::Reply(_) => None,
        }
    }
}

impl From<Errno> for CallError {
    fn from(e: Errno) -> Self {
        Self::Kernel(e)
    }
}

enum Transport {
    Socket(Mutex<UnixStream>),
    Local { shared: Arc<Shared>, caller: Mm },
}

/// A process's handle on the model kernel: every method is one kernel call made as this
/// process, with stand-in fds in and out.
pub struct ModelClient {
    transport: Transport,
}

/// An fd argument: a file or a number that names none.
pub type FdArg<'a> = Option<BorrowedFd<'a>>;

impl ModelClient {
    /// Connects to a server's socket.
    pub fn connect(path: impl AsRef<std::path::Path>) -> io::Result<Self> {
        Ok(Self::from_stream(UnixStream::connect(path)?))
    }

    /// A client on an already-connected stream.
    pub fn from_stream(stream: UnixStream) -> Self {
        Self {
            transport: Transport::Socket(Mutex::new(stream)),
        }
    }

    /// One raw request: `fds` are attached in order and referenced by index from `args`.
    pub fn call(
        &self,
        op: Op,
        args: &[u64],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(Vec<u64>, Option<OwnedFd>), CallError> {
        let payload: Vec<u8> = args.iter().flat_map(|w| w.to_le_bytes()).collect();
        match &self.transport {
            Transport::Local { shared, caller } => {
                let lent = fds.iter().map(|f| ArgFd::Borrowed(*f)).collect();
                Ok(shared.dispatch(*caller, op as u32, &payload, lent)?)
            }
            Transport::Socket(stream) => {
                let stream = stream.lock().unwrap_or_else(|e| e.into_inner());
                send_frame(&*stream, op as u32, false, &payload, fds)?;
                let frame = recv_frame(&*stream, true)?;
                if frame.header.request != op as u32 || frame.fd_problem.is_some() {
                    return Err(CallError::Reply("does not answer the request"));
                }
                let p = &frame.payload;
                if p.len() < 8 || p.len() % 8 != 0 || frame.fds.len() > 1 {
                    return Err(CallError::Reply("malformed"));
                }
                let mut w = p
                    .chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()));
                let status = w.next().unwrap_or_default() as i64;
                if status < 0 {
                    return Err(CallError::Kernel(Errno::from_raw_os_error(
                        (-status) as i32,
                    )));
                }
                Ok((w.collect(), frame.fds.into_iter().next()))
            }
        }
    }

    fn file(&self, op: Op, args: &[u64], fds: &[BorrowedFd<'_>]) -> Result<OwnedFd, CallError> {
        self.call(op, args, fds)?.1.ok_or(CallError::Reply("no fd"))
    }

    fn unit(&self, op: Op, args: &[u64], fds: &[BorrowedFd<'_>]) -> Result<(), CallError> {
        self.call(op, args, fds).map(|_| ())
    }

    fn value(&self, op: Op, args: &[u64], fds: &[BorrowedFd<'_>]) -> Result<u64, CallError> {
        self.call(op, args, fds)?
            .0
            .first()
            .copied()
            .ok_or(CallError::Reply("no value"))
    }

    /// `open("/dev/kvm")`.
    pub fn open_kvm(&self) -> Result<OwnedFd, CallError> {
        self.file(Op::OpenKvm, &[], &[])
    }

    /// `open("/dev/vfio/vfio")`.
    pub fn open_vfio_container(&self) -> Result<OwnedFd, CallError> {
        self.file(Op::OpenVfioContainer, &[], &[])
    }

    /// `open("/dev/vfio/<group>")`.
    pub fn open_vfio_group(&self, group: u32) -> Result<OwnedFd, CallError> {
        self.file(Op::OpenVfioGroup, &[u64::from(group)], &[])
    }

    /// Drops this process's last fd of `file` (the caller closes its own copy).
    pub fn close(&self, file: BorrowedFd<'_>) -> Result<(), CallError> {
        self.unit(Op::Close, &[0], &[file])
    }

    /// `KVM_CREATE_VM`.
    pub fn kvm_create_vm(&self, kvm: BorrowedFd<'_>) -> Result<OwnedFd, CallError> {
        self.file(Op::KvmCreateVm, &[0], &[kvm])
    }

    /// `KVM_CHECK_EXTENSION` on `/dev/kvm` or a VM.
    pub fn kvm_check_extension(&self, file: BorrowedFd<'_>, cap: u32) -> Result<u64, CallError> {
        self.value(Op::KvmCheckExtension, &[0, u64::from(cap)], &[file])
    }

    /// `KVM_CREATE_VCPU`.
    pub fn kvm_create_vcpu(&self, vm: BorrowedFd<'_>, id: u32) -> Result<OwnedFd, CallError> {
        self.file(Op::KvmCreateVcpu, &[0, u64::from(id)], &[vm])
    }

    /// `KVM_ENABLE_CAP(KVM_CAP_PPC_ENABLE_HCALL, [hcall, enable])`.
    pub fn kvm_enable_hcall(
        &self,
        vm: BorrowedFd<'_>,
        hcall: u64,
        enable: bool,
    ) -> Result<(), CallError> {
        self.unit(Op::KvmEnableHcall, &[0, hcall, u64::from(enable)], &[vm])
    }

    /// `KVM_SET_USER_MEMORY_REGION`.
    pub fn kvm_set_user_memory_region(
        &self,
        vm: BorrowedFd<'_>,
        r: UserMemoryRegion,
    ) -> Result<(), CallError> {
        let args = [
            0,
            u64::from(r.slot),
            u64::from(r.flags),
            r.guest_phys_addr,
            r.memory_size,
            r.userspace_addr,
        ];
        self.unit(Op::KvmSetUserMemoryRegion, &args, &[vm])
    }

    /// `KVM_CREATE_SPAPR_TCE_64`: the table's fd, a memfd of its entries.
    pub fn kvm_create_spapr_tce_64(
        &self,
        vm: BorrowedFd<'_>,
        a: CreateSpaprTce64,
    ) -> Result<OwnedFd, CallError> {
        let args = [
            0,
            a.liobn,
            u64::from(a.page_shift),
            u64::from(a.flags),
            a.offset,
            a.size,
        ];
        self.file(Op::KvmCreateSpaprTce64, &args, &[vm])
    }

    /// `KVM_CREATE_DEVICE`; `None` with `KVM_CREATE_DEVICE_TEST`.
    pub fn kvm_create_device(
        &self,
        vm: BorrowedFd<'_>,
        dev_type: u32,
        flags: u32,
    ) -> Result<Option<OwnedFd>, CallError> {
        Ok(self
            .call(
                Op::KvmCreateDevice,
                &[0, u64::from(dev_type), u64::from(flags)],
                &[vm],
            )?
            .1)
    }

    /// `KVM_SET_DEVICE_ATTR` with up to two fd arguments (see [`Op::KvmSetDeviceAttr`]).
    pub fn kvm_set_device_attr<'a>(
        &self,
        dev: BorrowedFd<'a>,
        group: u32,
        attr: u64,
        a: FdArg<'a>,
        b: FdArg<'a>,
    ) -> Result<(), CallError> {
        let mut fds = vec![dev];
        let mut slot = |f: FdArg<'a>| match f {
            Some(fd) => {
                fds.push(fd);
                (fds.len() - 1) as u64
            }
            None => NO_FD,
        };
        let (sa, sb) = (slot(a), slot(b));
        self.unit(
            Op::KvmSetDeviceAttr,
            &[0, u64::from(group), attr, sa, sb],
            &fds,
        )
    }

    /// `KVM_SET_DEVICE_ATTR(KVM_DEV_VFIO_FILE, KVM_DEV_VFIO_FILE_ADD)`.
    pub fn kvm_vfio_file_add(&self, dev: BorrowedFd<'_>, file: FdArg<'_>) -> Result<(), CallError> {
        self.kvm_set_device_attr(dev, KVM_DEV_VFIO_FILE, KVM_DEV_VFIO_FILE_ADD, file, None)
    }

    /// `KVM_SET_DEVICE_ATTR(KVM_DEV_VFIO_FILE, KVM_DEV_VFIO_FILE_DEL)`.
    pub fn kvm_vfio_file_del(&self, dev: BorrowedFd<'_>, file: FdArg<'_>) -> Result<(), CallError> {
        self.kvm_set_device_attr(dev, KVM_DEV_VFIO_FILE, KVM_DEV_VFIO_FILE_DEL, file, None)
    }

    /// `KVM_SET_DEVICE_ATTR(KVM_DEV_VFIO_FILE, KVM_DEV_VFIO_GROUP_SET_SPAPR_TCE)`.
    pub fn kvm_vfio_set_spapr_tce(
        &self,
        dev: BorrowedFd<'_>,
        group: FdArg<'_>,
        table: FdArg<'_>,
    ) -> Result<(), CallError> {
        self.kvm_set_device_attr(
            dev,
            KVM_DEV_VFIO_FILE,
            KVM_DEV_VFIO_GROUP_SET_SPAPR_TCE,
            group,
            table,
        )
    }

    /// `KVM_HAS_DEVICE_ATTR`.
    pub fn kvm_has_device_attr(
        &self,
        dev: BorrowedFd<'_>,
        group: u32,
        attr: u64,
    ) -> Result<(), CallError> {
        self.unit(Op::KvmHasDeviceAttr, &[0, u64::from(group), attr], &[dev])
    }

    /// The guest on `vcpu` issues hypercall `number` with arguments r4..r7.
    pub fn vcpu_hcall(
        &self,
        vcpu: BorrowedFd<'_>,
        number: u64,
        args: [u64; 4],
    ) -> Result<HcallOutcome, CallError> {
        let [a, b, c, d] = args;
        let w = self
            .call(Op::VcpuHcall, &[0, number, a, b, c, d], &[vcpu])?
            .0;
        match w.as_slice() {
            [1, _, _] => Ok(HcallOutcome::Exit),
            [0, ret, value] => Ok(HcallOutcome::Completed {
                ret: *ret as i64,
                value: *value,
            }),
            _ => Err(CallError::Reply("malformed hypercall outcome")),
        }
    }

    /// `VFIO_GROUP_GET_STATUS`.
    pub fn vfio_group_get_status(&self, group: BorrowedFd<'_>) -> Result<u64, CallError> {
        self.value(Op::VfioGroupGetStatus, &[0], &[group])
    }

    /// `VFIO_GROUP_SET_CONTAINER`.
    pub fn vfio_group_set_container(
        &self,
        group: BorrowedFd<'_>,
        container: FdArg<'_>,
    ) -> Result<(), CallError> {
        match container {
            Some(c) => self.unit(Op::VfioGroupSetContainer, &[0, 1], &[group, c]),
            None => self.unit(Op::VfioGroupSetContainer, &[0, NO_FD], &[group]),
        }
    }

    /// `VFIO_GROUP_UNSET_CONTAINER`.
    pub fn vfio_group_unset_container(&self, group: BorrowedFd<'_>) -> Result<(), CallError> {
        self.unit(Op::VfioGroupUnsetContainer, &[0], &[group])
    }

    /// `VFIO_GET_API_VERSION`.
    pub fn vfio_get_api_version(&self, container: BorrowedFd<'_>) -> Result<u64, CallError> {
        self.value(Op::VfioGetApiVersion, &[0], &[container])
    }

    /// `VFIO_CHECK_EXTENSION`.
    pub fn vfio_check_extension(
        &self,
        container: BorrowedFd<'_>,
        ext: u32,
    ) -> Result<u64, CallError> {
        self.value(Op::VfioCheckExtension, &[0, u64::from(ext)], &[container])
    }

    /// `VFIO_SET_IOMMU`.
    pub fn vfio_set_iommu(
        &self,
        container: BorrowedFd<'_>,
        iommu_type: u32,
    ) -> Result<(), CallError> {
        self.unit(Op::VfioSetIommu, &[0, u64::from(iommu_type)], &[container])
    }

    /// `VFIO_IOMMU_SPAPR_TCE_GET_INFO` with a full-size struct.
    pub fn vfio_spapr_tce_get_info(
        &self,
        container: BorrowedFd<'_>,
    ) -> Result<SpaprTceInfo, CallError> {
        let w = self.call(Op::SpaprTceGetInfo, &[0, 32], &[container])?.0;
        match w.as_slice() {
            &[flags, start, size, pgsizes, windows, levels] => Ok(SpaprTceInfo {
                flags: flags as u32,
                dma32_window_start: start as u32,
                dma32_window_size: size as u32,
                pgsizes,
                max_dynamic_windows_supported: windows as u32,
                levels: levels as u32,
            }),
            _ => Err(CallError::Reply("malformed TCE info")),
        }
    }

    /// `VFIO_IOMMU_SPAPR_REGISTER_MEMORY`.
    pub fn vfio_register_memory(
        &self,
        container: BorrowedFd<'_>,
        a: RegisterMemory,
    ) -> Result<(), CallError> {
        let args = [0, u64::from(a.argsz), u64::from(a.flags), a.vaddr, a.size];
        self.unit(Op::RegisterMemory, &args, &[container])
    }

    /// `VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY`.
    pub fn vfio_unregister_memory(
        &self,
        container: BorrowedFd<'_>,
        a: RegisterMemory,
    ) -> Result<(), CallError> {
        let args = [0, u64::from(a.argsz), u64::from(a.flags), a.vaddr, a.size];
        self.unit(Op::UnregisterMemory, &args, &[container])
    }

    /// `VFIO_IOMMU_SPAPR_TCE_CREATE`: the window's bus address.
    pub fn vfio_tce_create(
        &self,
        container: BorrowedFd<'_>,
        a: TceCreate,
    ) -> Result<u64, CallError> {
        let args = [
            0,
            u64::from(a.argsz),
            u64::from(a.flags),
            u64::from(a.page_shift),
            a.window_size,
            u64::from(a.levels),
        ];
        self.value(Op::TceCreate, &args, &[container])
    }

    /// `VFIO_IOMMU_SPAPR_TCE_REMOVE`.
    pub fn vfio_tce_remove(
        &self,
        container: BorrowedFd<'_>,
        a: TceRemove,
    ) -> Result<(), CallError> {
        self.unit(
            Op::TceRemove,
            &[0, u64::from(a.argsz), u64::from(a.flags), a.start_addr],
            &[container],
        )
    }

    /// `VFIO_IOMMU_MAP_DMA`: the ioctl's value.
    pub fn vfio_map_dma(&self, container: BorrowedFd<'_>, a: DmaMap) -> Result<u64, CallError> {
        let args = [
            0,
            u64::from(a.argsz),
            u64::from(a.flags),
            a.vaddr,
            a.iova,
            a.size,
        ];
        self.value(Op::MapDma, &args, &[container])
    }

    /// `VFIO_IOMMU_UNMAP_DMA`: the ioctl's value.
    pub fn vfio_unmap_dma(&self, container: BorrowedFd<'_>, a: DmaUnmap) -> Result<u64, CallError> {
        let args = [0, u64::from(a.argsz), u64::from(a.flags), a.iova, a.size];
        self.value(Op::UnmapDma, &args, &[container])
    }

    /// `VFIO_EEH_PE_OP`: the ioctl's value.
    pub fn vfio_eeh_pe_op(&self, container: BorrowedFd<'_>, a: EehPeOp) -> Result<u64, CallError> {
        let args = [
            0,
            u64::from(a.argsz),
            u64::from(a.flags),
            u64::from(a.op),
            u64::from(a.err_type),
            u64::from(a.err_func),
            a.err_addr,
            a.err_mask,
        ];
        self.value(Op::EehPeOp, &args, &[container])
    }

    /// Declares that this process maps `len` bytes of `memfd` from `offset` at `ua`.
    pub fn mm_map(
        &self,
        memfd: BorrowedFd<'_>,
        ua: u64,
        len: u64,
        offset: u64,
        page_shift: u32,
        writable: bool,
    ) -> Result<(), CallError> {
        self.unit(
            Op::MmMap,
            &[
                0,
                ua,
                len,
                offset,
                u64::from(page_shift),
                u64::from(writable),
            ],
            &[memfd],
        )
    }

    /// Declares that this process unmapped the mapping at `ua`.
    pub fn mm_unmap(&self, ua: u64) -> Result<(), CallError> {
        self.unit(Op::MmUnmap, &[ua], &[])
    }

    /// What kind of kernel file `file` is (`None`: not one of the model's files).
    pub fn file_kind(&self, file: BorrowedFd<'_>) -> Result<Option<FileKind>, CallError> {
        let w = self.call(Op::FileKind, &[0], &[file])?.0;
        Ok(w.first().and_then(|&code| FileKind::from_code(code)))
    }

    /// Locked and pinned memory of process `pid` (`None`: this process).
    pub fn mm_stats(&self, pid: Option<u32>) -> Result<MmStats, CallError> {
        let w = self
            .call(Op::MmStats, &[u64::from(pid.unwrap_or(0))], &[])?
            .0;
        match w.as_slice() {
            &[locked_vm_pages, pinned_pages, prereg_regions] => Ok(MmStats {
                locked_vm_pages,
                pinned_pages,
                prereg_regions,
            }),
            _ => Err(CallError::Reply("malformed mm stats")),
        }
    }

    /// Hypercalls completed in the kernel and exits to userspace of the VM behind `file`.
    pub fn hcall_stats(&self, file: BorrowedFd<'_>) -> Result<HcallStats, CallError> {
        let w = self.call(Op::HcallStats, &[0], &[file])?.0;
        match w.as_slice() {
            &[in_kernel, exits] => Ok(HcallStats { in_kernel, exits }),
            _ => Err(CallError::Reply("malformed hypercall stats")),
        }
    }

    /// What the IOMMU of `group` holds for `bus_addr`.
    pub fn iommu_entry(&self, group: u32, bus_addr: u64) -> Result<Option<HwTce>, CallError> {
        let w = self
            .call(Op::IommuEntry, &[u64::from(group), bus_addr], &[])?
            .0;
        match w.as_slice() {
            [0, ..] => Ok(None),
            &[1, pid, ua, bits] => Ok(Some(HwTce {
                mm: Mm(pid as u32),
                ua,
                dir: DmaDir::of_tce(bits),
            })),
            _ => Err(CallError::Reply("malformed IOMMU entry")),
        }
    }
}

pub use crate::kernel::linux::SharedMapping;

/// New guest RAM: a memfd of `len` bytes mapped here and declared to `model` as this process's
/// memory (4K pages, writable). Returns the mapping and its memfd (to pass on).
pub fn guest_ram(model: &ModelClient, len: usize) -> Result<(SharedMapping, OwnedFd), CallError> {
    let fd = sealed_memfd("guest-ram", len as u64)?;
    let map = SharedMapping::map(fd.as_fd(), len)?;
    model.mm_map(fd.as_fd(), map.addr(), len as u64, 0, 12, true)?;
    Ok((map, fd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::model::{Platform, VFIO_SPAPR_TCE_V2_IOMMU};
    use crate::protocol::{send_bytes, Header};

    /// A server with one connection served on a thread, and the raw client end.
    fn connected() -> (ModelServer, UnixStream) {
        let server = ModelServer::new(ModelKernel::new(Platform::powernv(), &[1, 2]));
        let (ours, theirs) = UnixStream::pair().unwrap();
        let s = server.clone();
        std::thread::spawn(move || s.serve_connection(theirs));
        (server, ours)
    }

    /// Sends raw `payload` as request `code` and returns the reply's status word.
    fn raw(stream: &UnixStream, code: u32, payload: &[u8], fds: &[BorrowedFd<'_>]) -> i64 {
        send_frame(stream, code, false, payload, fds).unwrap();
        let reply = recv_frame(stream, true).unwrap();
        assert_eq!(reply.header.request, code);
        i64::from_le_bytes(reply.payload[..8].try_into().unwrap())
    }

    fn neg(e: Errno) -> i64 {
        -i64::from(e.raw_os_error())
    }

    #[test]
    fn request_unknown_op_enosys() {
        let (_s, c) = connected();
        assert_eq!(raw(&c, 999, &[], &[]), neg(Errno::NOSYS));
    }

    #[test]
    fn request_wrong_payload_size_einval() {
        let (_s, c) = connected();
        assert_eq!(
            raw(&c, Op::OpenVfioGroup as u32, &[0; 7], &[]),
            neg(Errno::INVAL)
        );
        assert_eq!(raw(&c, Op::OpenKvm as u32, &[0; 8], &[]), neg(Errno::INVAL));
    }

    #[test]
    fn request_u32_field_too_large_einval() {
        let (_s, c) = connected();
        let group = (1u64 << 32 | 1).to_le_bytes();
        assert_eq!(
            raw(&c, Op::OpenVfioGroup as u32, &group, &[]),
            neg(Errno::INVAL)
        );
    }

    #[test]
    fn request_fd_slot_without_fd_ebadf() {
        let (_s, c) = connected();
        assert_eq!(
            raw(&c, Op::KvmCreateVm as u32, &0u64.to_le_bytes(), &[]),
            neg(Errno::BADF)
        );
        assert_eq!(
            raw(&c, Op::KvmCreateVm as u32, &NO_FD.to_le_bytes(), &[]),
            neg(Errno::BADF)
        );
    }

    #[test]
    fn request_fds_with_payload_bytes_ebadf_and_connection_survives() {
        let (_s, c) = connected();
        let memfd = memfd_create("x", MemfdFlags::CLOEXEC).unwrap();
        let mut frame = Header::new(Op::VfioGetApiVersion as u32, false, 8)
            .to_bytes()
            .to_vec();
        send_bytes(&c, &frame, &[]).unwrap();
        frame.clear();
        frame.extend_from_slice(&0u64.to_le_bytes());
        send_bytes(&c, &frame, &[memfd.as_fd()]).unwrap();
        let reply = recv_frame(&c, true).unwrap();
        assert_eq!(
            i64::from_le_bytes(reply.payload[..8].try_into().unwrap()),
            neg(Errno::BADF)
        );
        assert_eq!(raw(&c, 999, &[], &[]), neg(Errno::NOSYS), "still serving");
    }

    #[test]
    fn request_on_foreign_fd_enotty() {
        let (_s, c) = connected();
        let memfd = memfd_create("not-a-model-file", MemfdFlags::CLOEXEC).unwrap();
        let client = ModelClient::from_stream(c);
        let r = client.vfio_get_api_version(memfd.as_fd());
        assert_eq!(r.map_err(|e| e.errno()), Err(Some(Errno::NOTTY)));
    }

    #[test]
    fn standin_passed_back_names_the_same_file() {
        let (s, c) = connected();
        let client = ModelClient::from_stream(c);
        let container = client.open_vfio_container().unwrap();
        let group = client.open_vfio_group(1).unwrap();
        // A duplicate, like an fd received over another socket, is the same open file.
        let dup = container.try_clone().unwrap();
        client
            .vfio_group_set_container(group.as_fd(), Some(dup.as_fd()))
            .unwrap();
        client
            .vfio_set_iommu(container.as_fd(), VFIO_SPAPR_TCE_V2_IOMMU)
            .unwrap();
        assert_eq!(client.vfio_group_get_status(group.as_fd()).unwrap(), 3);
        // A foreign file is not a container.
        let g2 = client.open_vfio_group(2).unwrap();
        let other = memfd_create("model:vfio-container", MemfdFlags::CLOEXEC).unwrap();
        let r = client.vfio_group_set_container(g2.as_fd(), Some(other.as_fd()));
        assert_eq!(r.map_err(|e| e.errno()), Err(Some(Errno::BADFD)));
        let r = client.vfio_group_set_container(g2.as_fd(), None);
        assert_eq!(r.map_err(|e| e.errno()), Err(Some(Errno::BADF)));
        drop(s);
    }

    #[test]
    fn close_releases_the_file_and_its_standin() {
        let (s, c) = connected();
        let client = ModelClient::from_stream(c);
        let group = client.open_vfio_group(1).unwrap();
        assert_eq!(
            client.open_vfio_group(1).map_err(|e| e.errno()).err(),
            Some(Some(Errno::BUSY))
        );
        let id = s.file_of(group.as_fd()).expect("a model file");
        client.close(group.as_fd()).unwrap();
        assert_eq!(s.with_kernel(|k| k.file_kind(id)), None);
        assert_eq!(s.file_of(group.as_fd()), None);
        // The old stand-in names nothing now; the group opens again.
        assert_eq!(
            client
                .vfio_group_get_status(group.as_fd())
                .map_err(|e| e.errno())
                .err(),
            Some(Some(Errno::NOTTY))
        );
        assert!(client.open_vfio_group(1).is_ok());
    }

    #[test]
    fn memlock_limit_read_from_proc() {
        let limit = proc_memlock_limit(std::process::id()).expect("/proc is readable");
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let cap_ipc_lock = status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .map(|v| u64::from_str_radix(v.trim(), 16).unwrap() & (1 << 14) != 0)
            .unwrap();
        if cap_ipc_lock {
            assert_eq!(limit, None);
        } else {
            // The shell reports the same soft limit in KiB.
            let out = std::process::Command::new("sh")
                .args(["-c", "ulimit -l"])
                .output()
                .unwrap();
            let text = String::from_utf8(out.stdout).unwrap();
            let want = match text.trim() {
                "unlimited" => None,
                kib => Some(kib.parse::<u64>().unwrap() * 1024),
            };
            assert_eq!(limit, want);
        }
    }

    #[test]
    fn local_handle_calls_as_this_process() {
        let server = ModelServer::new(ModelKernel::new(Platform::powernv(), &[1]));
        let me = server.handle();
        let kvm = me.open_kvm().unwrap();
        let vm = me.kvm_create_vm(kvm.as_fd()).unwrap();
        let id = server.file_of(vm.as_fd()).expect("a model file");
        assert_eq!(
            server.with_kernel(|k| k.vm_creator(id)),
            Some(Mm(std::process::id()))
        );
        assert_eq!(me.kvm_check_extension(vm.as_fd(), 142).unwrap(), 1);
    }

    #[test]
    fn table_standin_is_the_entries_memfd() {
        let (_s, c) = connected();
        let client = ModelClient::from_stream(c);
        let (ram, _ram_fd) = guest_ram(&client, 1 << 20).unwrap();
        let kvm = client.open_kvm().unwrap();
        let vm = client.kvm_create_vm(kvm.as_fd()).unwrap();
        let vcpu = client.kvm_create_vcpu(vm.as_fd(), 0).unwrap();
        let region = UserMemoryRegion {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: 1 << 20,
            userspace_addr: ram.addr(),
        };
        client
            .kvm_set_user_memory_region(vm.as_fd(), region)
            .unwrap();
        let args = CreateSpaprTce64 {
            liobn: 9,
            page_shift: 12,
            flags: 0,
            offset: 0,
            size: 1024,
        };
        let table = client.kvm_create_spapr_tce_64(vm.as_fd(), args).unwrap();
        assert_eq!(fstat(&table).unwrap().st_size, 8192);
        let view = SharedMapping::map(table.as_fd(), 8192).unwrap();
        let out = client
            .vcpu_hcall(
                vcpu.as_fd(),
                super::super::H_PUT_TCE,
                [9, 0x3000, 0x5003, 0],
            )
            .unwrap();
        assert_eq!(out, HcallOutcome::Completed { ret: 0, value: 0 });
        assert_eq!(view.read_u64(3), Some(0x5003), "host byte order");
        assert!(view.write_u64(4, 0x6001));
        let out = client
            .vcpu_hcall(vcpu.as_fd(), super::super::H_GET_TCE, [9, 0x4000, 0, 0])
            .unwrap();
        assert_eq!(
            out,
            HcallOutcome::Completed {
                ret: 0,
                value: 0x6001
            }
        );
        assert_eq!(view.read_u64(1024), None);
        // H_PUT_TCE_INDIRECT is not enabled by default: it exits.
        let out = client
            .vcpu_hcall(vcpu.as_fd(), super::super::H_PUT_TCE_INDIRECT, [9, 0, 0, 1])
            .unwrap();
        assert_eq!(out, HcallOutcome::Exit);
        // Guest memory is read through the declared memfd: a big-endian list at gpa 0x1000.
        client
            .kvm_enable_hcall(vm.as_fd(), super::super::H_PUT_TCE_INDIRECT, true)
            .unwrap();
        assert!(ram.write_u64(0x1000 / 8, 0x9003u64.to_be()));
        let out = client
            .vcpu_hcall(
                vcpu.as_fd(),
                super::super::H_PUT_TCE_INDIRECT,
                [9, 0x8000, 0x1000, 1],
            )
            .unwrap();
        assert_eq!(out, HcallOutcome::Completed { ret: 0, value: 0 });
        assert_eq!(view.read_u64(8), Some(0x9003));
    }

    /// Every op with arbitrary words and fds drawn from live stand-ins, a foreign memfd and
    /// missing slots: the server answers each one and the connection survives.
    #[test]
    fn arbitrary_requests_get_replies_never_a_dead_server() {
        let (_s, c) = connected();
        let client = ModelClient::from_stream(c.try_clone().unwrap());
        let (ram, ram_fd) = guest_ram(&client, 1 << 20).unwrap();
        let kvm = client.open_kvm().unwrap();
        let vm = client.kvm_create_vm(kvm.as_fd()).unwrap();
        let vcpu = client.kvm_create_vcpu(vm.as_fd(), 0).unwrap();
        let region = UserMemoryRegion {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: 1 << 20,
            userspace_addr: ram.addr(),
        };
        client
            .kvm_set_user_memory_region(vm.as_fd(), region)
            .unwrap();
        let container = client.open_vfio_container().unwrap();
        let group = client.open_vfio_group(1).unwrap();
        client
            .vfio_group_set_container(group.as_fd(), Some(container.as_fd()))
            .unwrap();
        client
            .vfio_set_iommu(container.as_fd(), VFIO_SPAPR_TCE_V2_IOMMU)
            .unwrap();
        let dev = client.kvm_create_device(vm.as_fd(), 4, 0).unwrap().unwrap();
        let args = CreateSpaprTce64 {
            liobn: 1,
            page_shift: 12,
            flags: 0,
            offset: 0,
            size: 256,
        };
        let table = client.kvm_create_spapr_tce_64(vm.as_fd(), args).unwrap();
        let foreign = memfd_create("foreign", MemfdFlags::CLOEXEC).unwrap();
        let fds = [
            &kvm, &vm, &vcpu, &container, &group, &dev, &table, &foreign, &ram_fd,
        ];
        let interesting = [
            0,
            1,
            2,
            3,
            7,
            12,
            16,
            24,
            0x1000,
            0x10000,
            1 << 20,
            1 << 30,
            1 << 59,
            ram.addr(),
            u64::MAX,
            u64::MAX >> 12,
            1 << 32,
        ];
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut succeeded = 0;
        for _ in 0..4000 {
            let code = (next() % 38) as u32;
            let n = Op::from_u32(code).map_or((next() % 4) as usize, Op::words);
            let words: Vec<u64> = (0..n)
                .map(|_| match next() % 4 {
                    0 => next() % 12,
                    1 => next(),
                    _ => interesting[(next() % interesting.len() as u64) as usize],
                })
                .collect();
            let attach: Vec<BorrowedFd<'_>> = (0..next() % 4)
                .map(|_| fds[(next() % fds.len() as u64) as usize].as_fd())
                .collect();
            let payload: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
            let status = raw(&c, code, &payload, &attach);
            assert!(status <= 0, "op {code}: status {status}");
            succeeded += u32::from(status == 0);
        }
        // Enough calls got past the checks to have exercised the kernel, not only the decoder.
        assert!(succeeded > 200, "{succeeded} calls succeeded");
        // Random CLOSEs may have released any of the files; the server itself still works.
        assert!(client.open_vfio_container().is_ok());
    }
}
