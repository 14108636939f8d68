//! Decoding a request and running it: the payload's words and fds become one [`ModelKernel`]
//! call made as the caller's mm, and its outcome becomes the reply's status, words and fd.
//!
//! [`ModelKernel`]: crate::kernel::model::ModelKernel

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use super::standins::MemfdMemory;
use super::{Holder, Op, Shared, State};
use crate::kernel::model::abi::{
    CreateSpaprTce64, DmaMap, DmaUnmap, EehPeOp, HcallOutcome, RegisterMemory, TceCreate,
    TceRemove, UserMemoryRegion, KVM_DEV_VFIO_FILE, KVM_DEV_VFIO_FILE_ADD, KVM_DEV_VFIO_FILE_DEL,
    KVM_DEV_VFIO_GROUP_SET_SPAPR_TCE,
};
use crate::kernel::model::kernel::{FileArg, FileId, FileKind, Mm};
use crate::kernel::model::{DmaDir, Errno};

/// An fd argument: received with a frame (owned), or lent by an in-process caller.
pub(super) enum ArgFd<'a> {
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

impl Shared {
    /// Runs one request as `caller`: status and result words, and the reply's fd.
    pub(super) fn dispatch(
        &self,
        holder: Holder,
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
        let result = call(&mut state, holder, op, &mut req);
        let reply = match result {
            Ok(Out::Words(w)) => Ok((w, None)),
            Ok(Out::File(None)) => Ok((Vec::new(), None)),
            Ok(Out::File(Some(id))) => {
                state.hold(holder, id);
                state.standin(id).map(|fd| (Vec::new(), Some(fd)))
            }
            Err(e) => Err(e),
        };
        state.collect();
        reply
    }
}

pub(super) fn encode_reply(
    result: Result<(Vec<u64>, Option<OwnedFd>), Errno>,
) -> (Vec<u8>, Option<OwnedFd>) {
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

/// Runs `op` on the kernel as `caller`: each group of ops has its own function.
fn call(s: &mut State, holder: Holder, op: Op, r: &mut Req<'_>) -> Result<Out, Errno> {
    let caller = holder.mm();
    match op {
        Op::OpenKvm | Op::OpenVfioContainer | Op::OpenVfioGroup | Op::Close | Op::FileKind => {
            files(s, holder, op, r)
        }
        Op::KvmCreateVm
        | Op::KvmCheckExtension
        | Op::KvmCreateVcpu
        | Op::KvmEnableHcall
        | Op::KvmSetUserMemoryRegion
        | Op::KvmCreateSpaprTce64 => kvm_vm(s, caller, op, r),
        Op::KvmCreateDevice
        | Op::KvmSetDeviceAttr
        | Op::KvmHasDeviceAttr
        | Op::KvmGetDeviceAttr
        | Op::VcpuHcall => kvm_device_vcpu(s, caller, op, r),
        Op::VfioGroupGetStatus
        | Op::VfioGroupSetContainer
        | Op::VfioGroupUnsetContainer
        | Op::VfioGetApiVersion
        | Op::VfioCheckExtension
        | Op::VfioSetIommu
        | Op::VfioIommuEnable
        | Op::VfioIommuDisable => vfio_group_container(s, caller, op, r),
        Op::SpaprTceGetInfo
        | Op::RegisterMemory
        | Op::UnregisterMemory
        | Op::TceCreate
        | Op::TceRemove
        | Op::MapDma
        | Op::UnmapDma
        | Op::EehPeOp => vfio_spapr_iommu(s, caller, op, r),
        Op::MmMap | Op::MmUnmap | Op::MmStats | Op::HcallStats | Op::IommuEntry => {
            model_only(s, caller, op, r)
        }
    }
}

/// A file argument: what the fd in word `i` names.
fn arg(s: &State, r: &Req<'_>, i: usize) -> FileArg {
    match r.fd(i) {
        Some(fd) => s.resolve(fd),
        None => FileArg::Bad,
    }
}

/// The file an ioctl is issued on: a non-model fd answers no model ioctl.
fn target(s: &State, r: &Req<'_>, i: usize) -> Result<FileId, Errno> {
    match arg(s, r, i) {
        FileArg::File(id) => Ok(id),
        FileArg::Foreign => Err(Errno::NOTTY),
        FileArg::Bad => Err(Errno::BADF),
    }
}

/// Opening the device nodes, closing a file, and what kind of file an fd is.
fn files(s: &mut State, holder: Holder, op: Op, r: &mut Req<'_>) -> Result<Out, Errno> {
    let k = &mut s.kernel;
    match op {
        Op::OpenKvm => Ok(Out::File(Some(k.open_kvm()))),
        Op::OpenVfioContainer => Ok(Out::File(Some(k.open_vfio_container()))),
        Op::OpenVfioGroup => Ok(Out::File(Some(k.open_vfio_group(r.u32(0)?)?))),
        Op::Close => {
            let id = target(s, r, 0)?;
            s.release(holder, id).map(|()| Out::Words(Vec::new()))
        }
        Op::FileKind => {
            let code = match arg(s, r, 0) {
                FileArg::Bad => return Err(Errno::BADF),
                FileArg::File(id) => s.kernel.file_kind(id).map_or(0, FileKind::code),
                FileArg::Foreign => 0,
            };
            words([code])
        }
        // `call` routes only this group's ops here.
        _ => Err(Errno::NOSYS),
    }
}

/// `/dev/kvm` and VM ioctls: the VM and its vCPUs, extensions, hypercall enabling, memory
/// slots, KVM TCE tables.
fn kvm_vm(s: &mut State, caller: Mm, op: Op, r: &mut Req<'_>) -> Result<Out, Errno> {
    match op {
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
        // `call` routes only this group's ops here.
        _ => Err(Errno::NOSYS),
    }
}

/// KVM devices (kvm-vfio and its attributes) and running a vCPU up to its hypercall.
fn kvm_device_vcpu(s: &mut State, caller: Mm, op: Op, r: &mut Req<'_>) -> Result<Out, Errno> {
    match op {
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
        // `call` routes only this group's ops here.
        _ => Err(Errno::NOSYS),
    }
}

/// VFIO group and container ioctls, up to enabling the IOMMU.
fn vfio_group_container(s: &mut State, caller: Mm, op: Op, r: &mut Req<'_>) -> Result<Out, Errno> {
    match op {
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
        // `call` routes only this group's ops here.
        _ => Err(Errno::NOSYS),
    }
}

/// The sPAPR TCE IOMMU driver's ioctls: windows, pre-registration, DMA mappings, EEH.
fn vfio_spapr_iommu(s: &mut State, caller: Mm, op: Op, r: &mut Req<'_>) -> Result<Out, Errno> {
    match op {
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
        // `call` routes only this group's ops here.
        _ => Err(Errno::NOSYS),
    }
}

/// Model-only requests: declared user memory and what the model's counters and IOMMU hold.
fn model_only(s: &mut State, caller: Mm, op: Op, r: &mut Req<'_>) -> Result<Out, Errno> {
    let k = &mut s.kernel;
    match op {
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
        // `call` routes only this group's ops here.
        _ => Err(Errno::NOSYS),
    }
}
