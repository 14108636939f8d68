//! The client side: a process's calls to the model kernel, over the server's socket or, for
//! the server's own process, straight to its dispatcher.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use super::dispatch::ArgFd;
use super::{Holder, Op, Shared, SharedMapping, NO_FD};
use crate::kernel::model::abi::{
    CreateSpaprTce64, DmaMap, DmaUnmap, EehPeOp, HcallOutcome, RegisterMemory, SpaprTceInfo,
    TceCreate, TceRemove, UserMemoryRegion, KVM_DEV_VFIO_FILE, KVM_DEV_VFIO_FILE_ADD,
    KVM_DEV_VFIO_FILE_DEL, KVM_DEV_VFIO_GROUP_SET_SPAPR_TCE,
};
use crate::kernel::model::kernel::{FileKind, HcallStats, HwTce, Mm, MmStats};
use crate::kernel::model::{DmaDir, Errno};
use crate::kernel::shared_memory::sealed_memfd;
use crate::protocol::{recv_frame, send_frame, RecvError};

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

pub(super) enum Transport {
    Socket(Mutex<UnixStream>),
    Local { shared: Arc<Shared>, caller: Mm },
}

/// A process's handle on the model kernel: every method is one kernel call made as this
/// process, with stand-in fds in and out.
pub struct ModelClient {
    pub(super) transport: Transport,
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
                Ok(shared.dispatch(Holder::Local(*caller), op as u32, &payload, lent)?)
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

/// New guest RAM: a memfd of `len` bytes mapped here and declared to `model` as this process's
/// memory (4K pages, writable). Returns the mapping and its memfd (to pass on).
pub fn guest_ram(model: &ModelClient, len: usize) -> Result<(SharedMapping, OwnedFd), CallError> {
    let fd = sealed_memfd("guest-ram", len as u64)?;
    let map = SharedMapping::map(fd.as_fd(), len)?;
    model.mm_map(fd.as_fd(), map.addr(), len as u64, 0, 12, true)?;
    Ok((map, fd))
}
