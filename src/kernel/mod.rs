//! The kernel boundary: every kernel call the product makes, as one typed enum, and the trait
//! the backends implement to execute it.
//!
//! This module owns *what* a call is ([`KernelOp`]), *which process* the kernel lets make it
//! ([`Executor`], from the kernel facts K1/K2 of the design), where it is therefore sent
//! ([`route`]), its typed result ([`Output`]), and the lossless mapping to and from the wire
//! form of the calls the front-end executes ([`OwnerOp`] and [`OpResult`]).
//! It must not decide policy (which call to make when is the engine's business) and holds no
//! `unsafe`: the real calls live in [`linux`], the only module allowed `unsafe`.
//! Objects are named by the session's typed ids, never by fd numbers; an [`Objects`] resolver
//! supplied by the caller maps them to the caller's fds and addresses.
#![deny(unsafe_code)]

pub mod abi;
pub mod linux;
pub mod model;
pub mod model_backend;
pub mod shared_memory;

use std::collections::BTreeMap;
use std::fmt;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

pub use rustix::io::Errno;

use crate::protocol::{DmaAccess, OpKind, OpResult, OwnerOp, TceInfo};

/// A VFIO container (one per guest PHB), as numbered by the front-end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContainerId(pub u32);

/// A VFIO group, as numbered by the front-end (not the IOMMU group number).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupId(pub u32);

/// A guest RAM region, as numbered by the front-end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RegionId(pub u32);

/// A KVM TCE table (the guest's view of one DMA window), as numbered by the front-end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableId(pub u32);

/// One kernel call. Every call the product makes is one variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelOp {
    /// `open("/dev/vfio/vfio")` then `VFIO_GET_API_VERSION`; the backend keeps the fd under
    /// `container` until [`KernelOp::ContainerClose`]. Output: [`Output::ApiVersion`].
    ContainerOpen { container: ContainerId },
    /// `close()` of the container's fd.
    ContainerClose { container: ContainerId },
    /// `VFIO_CHECK_EXTENSION`. Output: [`Output::Value`].
    CheckExtension {
        container: ContainerId,
        extension: u32,
    },
    /// `VFIO_SET_IOMMU` (the product uses `VFIO_SPAPR_TCE_v2_IOMMU`).
    SetIommu {
        container: ContainerId,
        iommu_type: u32,
    },
    /// `VFIO_GROUP_GET_STATUS`. Output: [`Output::GroupStatus`].
    GroupGetStatus { group: GroupId },
    /// `VFIO_GROUP_SET_CONTAINER` with the container's fd.
    GroupSetContainer {
        container: ContainerId,
        group: GroupId,
    },
    /// `VFIO_GROUP_UNSET_CONTAINER`.
    GroupUnsetContainer {
        container: ContainerId,
        group: GroupId,
    },
    /// `VFIO_IOMMU_SPAPR_TCE_GET_INFO`. Output: [`Output::TceInfo`].
    TceGetInfo { container: ContainerId },
    /// `VFIO_IOMMU_SPAPR_REGISTER_MEMORY` of `size` bytes at the region's address plus `offset`.
    RegisterMemory {
        container: ContainerId,
        region: RegionId,
        offset: u64,
        size: u64,
    },
    /// `VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY`, with the fields of the registration it undoes.
    UnregisterMemory {
        container: ContainerId,
        region: RegionId,
        offset: u64,
        size: u64,
    },
    /// `VFIO_IOMMU_SPAPR_TCE_CREATE`. Output: [`Output::StartAddr`].
    TceCreate {
        container: ContainerId,
        page_shift: u32,
        window_size: u64,
        levels: u32,
    },
    /// `VFIO_IOMMU_SPAPR_TCE_REMOVE`.
    TceRemove {
        container: ContainerId,
        start_addr: u64,
    },
    /// `VFIO_IOMMU_MAP_DMA` (v2: the memory must be registered) of `size` bytes at the
    /// region's address plus `offset` to bus address `iova`.
    MapDma {
        container: ContainerId,
        region: RegionId,
        offset: u64,
        iova: u64,
        size: u64,
        access: DmaAccess,
    },
    /// `VFIO_IOMMU_UNMAP_DMA`. Output: [`Output::Unmapped`].
    UnmapDma {
        container: ContainerId,
        iova: u64,
        size: u64,
    },
    /// `VFIO_EEH_PE_OP`; the `err_*` fields are used by `VFIO_EEH_PE_INJECT_ERR` only.
    /// Output: [`Output::Value`] (the PE state for `VFIO_EEH_PE_GET_STATE`).
    EehPeOp {
        container: ContainerId,
        op: u32,
        err_type: u32,
        err_func: u32,
        err_addr: u64,
        err_mask: u64,
    },
    /// `KVM_SET_DEVICE_ATTR(KVM_DEV_VFIO_FILE, KVM_DEV_VFIO_FILE_ADD)` on the kvm-vfio device.
    KvmFileAdd { group: GroupId },
    /// `KVM_SET_DEVICE_ATTR(KVM_DEV_VFIO_FILE, KVM_DEV_VFIO_FILE_DEL)`.
    KvmFileDel { group: GroupId },
    /// `KVM_SET_DEVICE_ATTR(KVM_DEV_VFIO_FILE, KVM_DEV_VFIO_GROUP_SET_SPAPR_TCE)` with the
    /// 8-byte `{groupfd, tablefd}` (K4).
    KvmSetSpaprTce { group: GroupId, table: TableId },
    /// `KVM_HAS_DEVICE_ATTR` on the kvm-vfio device: `Ok` when supported, `ENXIO` when not.
    KvmHasDeviceAttr { attr_group: u32, attr: u64 },
    /// Read `count` guest TCEs from entry `first_index` of a KVM TCE table by `mmap` of its fd
    /// (K6). Output: [`Output::Tces`], in host byte order.
    ReadTces {
        table: TableId,
        first_index: u64,
        count: u32,
    },
}

/// Which process the kernel lets make a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Executor {
    /// Only the process that created the VM: every KVM VM, vCPU and device ioctl from another
    /// process fails with `EIO` (K1).
    VmCreator,
    /// Only the process whose mm owns the container: the first process to register memory or
    /// create/remove a window binds the container to its mm, and every container ioctl but
    /// `VFIO_CHECK_EXTENSION` from another mm then fails with `EPERM` (K2).
    ContainerOwner,
    /// Any process holding the container's fd: the kernel checks no mm for these calls
    /// (`VFIO_CHECK_EXTENSION`; the VFIO core handles opening, `VFIO_SET_IOMMU`, attaching
    /// groups and closing without asking the sPAPR driver). K2 makes one process the owner,
    /// and only that process holds the fd.
    ContainerHolder,
    /// Any process holding the object's fd: `VFIO_GROUP_GET_STATUS` on a group fd, `mmap` of a
    /// KVM TCE table fd (K6).
    Anyone,
}

/// Which process a session's container belongs to, negotiated at the handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OwnershipMode {
    /// The front-end's mm owns the container, so KVM's in-kernel TCE path works (K3).
    Accelerated,
    /// The sidecar's mm owns the container; every TCE update is forwarded (K7).
    Isolated,
}

/// The process that executes a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    /// QEMU: the call travels as an [`OwnerOp`] in a reply.
    FrontEnd,
    /// The sidecar executes the call itself.
    Sidecar,
}

impl KernelOp {
    /// The process the kernel lets make this call.
    pub fn executor(&self) -> Executor {
        match self {
            Self::KvmFileAdd { .. }
            | Self::KvmFileDel { .. }
            | Self::KvmSetSpaprTce { .. }
            | Self::KvmHasDeviceAttr { .. } => Executor::VmCreator,
            Self::TceGetInfo { .. }
            | Self::RegisterMemory { .. }
            | Self::UnregisterMemory { .. }
            | Self::TceCreate { .. }
            | Self::TceRemove { .. }
            | Self::MapDma { .. }
            | Self::UnmapDma { .. }
            | Self::EehPeOp { .. } => Executor::ContainerOwner,
            Self::ContainerOpen { .. }
            | Self::ContainerClose { .. }
            | Self::CheckExtension { .. }
            | Self::SetIommu { .. }
            | Self::GroupSetContainer { .. }
            | Self::GroupUnsetContainer { .. } => Executor::ContainerHolder,
            Self::GroupGetStatus { .. } | Self::ReadTces { .. } => Executor::Anyone,
        }
    }
}

/// Where `op` must be executed in `mode`.
///
/// - K1: a KVM device ioctl from any process but the VM's creator fails with `EIO`, so
///   [`Executor::VmCreator`] calls always go to the front-end, in both modes.
/// - K2: the container answers only the mm that owns it (`EPERM` otherwise), so
///   [`Executor::ContainerOwner`] calls go to the front-end in accelerated mode and stay in the
///   sidecar in isolated mode. The container's fd lives only in its owner, so
///   [`Executor::ContainerHolder`] calls follow the same rule.
/// - [`Executor::Anyone`] calls need only fds the sidecar was sent (group, TCE table), so the
///   sidecar makes them itself and saves a round trip.
pub fn route(op: &KernelOp, mode: OwnershipMode) -> Side {
    match (op.executor(), mode) {
        (Executor::VmCreator, OwnershipMode::Accelerated | OwnershipMode::Isolated) => {
            Side::FrontEnd
        }
        (Executor::ContainerOwner | Executor::ContainerHolder, OwnershipMode::Accelerated) => {
            Side::FrontEnd
        }
        (Executor::ContainerOwner | Executor::ContainerHolder, OwnershipMode::Isolated) => {
            Side::Sidecar
        }
        (Executor::Anyone, OwnershipMode::Accelerated | OwnershipMode::Isolated) => Side::Sidecar,
    }
}

/// Whether a VFIO group can be used (`VFIO_GROUP_GET_STATUS`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct GroupStatus {
    /// `VFIO_GROUP_FLAGS_VIABLE`: every device of the group is bound to a VFIO driver or none.
    pub viable: bool,
    /// `VFIO_GROUP_FLAGS_CONTAINER_SET`: the group is attached to a container.
    pub container_set: bool,
}

/// The result of a successful call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// The call has no output.
    Done,
    /// `VFIO_GET_API_VERSION` after opening a container.
    ApiVersion(u32),
    /// The ioctl's non-negative return value (`VFIO_CHECK_EXTENSION`, `VFIO_EEH_PE_OP`).
    Value(u32),
    /// `VFIO_GROUP_GET_STATUS`.
    GroupStatus(GroupStatus),
    /// `VFIO_IOMMU_SPAPR_TCE_GET_INFO`.
    TceInfo(TceInfo),
    /// The bus address the platform chose for a new window.
    StartAddr(u64),
    /// Bytes unmapped by `VFIO_IOMMU_UNMAP_DMA`.
    Unmapped(u64),
    /// Guest TCEs in host byte order.
    Tces(Vec<u64>),
}

/// Why a wire operation result does not decode to an [`Output`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OutputError {
    /// A positive status: the wire carries 0 or a negative errno.
    #[error("{}: status {status} is positive", kind.name())]
    PositiveStatus { kind: OpKind, status: i32 },
    /// An output word that must be zero for this kind (or for a failed call) is not.
    #[error("{}: output word {word} must be zero, is {value:#x}", kind.name())]
    NonZeroWord {
        kind: OpKind,
        word: usize,
        value: u64,
    },
    /// A u32 output does not fit in 32 bits.
    #[error("{}: output word {word} does not fit 32 bits: {value:#x}", kind.name())]
    TooLarge {
        kind: OpKind,
        word: usize,
        value: u64,
    },
    /// The output does not belong to the operation kind.
    #[error("{}: output {output} does not belong to this operation", kind.name())]
    Mismatch { kind: OpKind, output: &'static str },
}

impl Output {
    fn name(&self) -> &'static str {
        match self {
            Self::Done => "none",
            Self::ApiVersion(_) => "api version",
            Self::Value(_) => "value",
            Self::GroupStatus(_) => "group status",
            Self::TceInfo(_) => "TCE info",
            Self::StartAddr(_) => "start address",
            Self::Unmapped(_) => "unmapped size",
            Self::Tces(_) => "TCEs",
        }
    }

    /// The four output words of an [`OpResult`] of `kind` carrying this output. Fails when the
    /// output is not the one `kind` produces: [`Output::from_out`] is the one mapping between
    /// kinds and outputs, so the words must decode back to this output.
    pub fn to_out(&self, kind: OpKind) -> Result<[u64; 4], OutputError> {
        let words = match self {
            Self::Done => Some([0; 4]),
            Self::ApiVersion(v) | Self::Value(v) => Some([u64::from(*v), 0, 0, 0]),
            Self::TceInfo(info) => Some(info.to_out()),
            Self::StartAddr(a) | Self::Unmapped(a) => Some([*a, 0, 0, 0]),
            // Outputs of calls that never travel as owner operations.
            Self::GroupStatus(_) | Self::Tces(_) => None,
        };
        match words {
            Some(words) if Self::from_out(kind, words).as_ref() == Ok(self) => Ok(words),
            _ => Err(OutputError::Mismatch {
                kind,
                output: self.name(),
            }),
        }
    }

    /// The output an [`OpResult`] of `kind` carries in its four words. Words a kind does not
    /// use must be zero, and 32-bit outputs must fit, so the mapping is one-to-one.
    pub fn from_out(kind: OpKind, out: [u64; 4]) -> Result<Output, OutputError> {
        let zero_from = |first: usize| {
            out.iter()
                .enumerate()
                .skip(first)
                .find(|(_, v)| **v != 0)
                .map_or(Ok(()), |(word, v)| {
                    Err(OutputError::NonZeroWord {
                        kind,
                        word,
                        value: *v,
                    })
                })
        };
        let small = |word: usize| {
            u32::try_from(out[word]).map_err(|_| OutputError::TooLarge {
                kind,
                word,
                value: out[word],
            })
        };
        match kind {
            OpKind::ContainerOpen => {
                zero_from(1)?;
                Ok(Self::ApiVersion(small(0)?))
            }
            OpKind::CheckExtension | OpKind::EehPeOp => {
                zero_from(1)?;
                Ok(Self::Value(small(0)?))
            }
            OpKind::TceGetInfo => {
                // Word 0 holds the u32 flags; words 1 and 3 pack two u32 each, word 2 a u64.
                small(0)?;
                Ok(Self::TceInfo(TceInfo::from_out(out)))
            }
            OpKind::TceCreate => {
                zero_from(1)?;
                Ok(Self::StartAddr(out[0]))
            }
            OpKind::UnmapDma => {
                zero_from(1)?;
                Ok(Self::Unmapped(out[0]))
            }
            OpKind::ContainerClose
            | OpKind::SetIommu
            | OpKind::GroupSetContainer
            | OpKind::GroupUnsetContainer
            | OpKind::RegisterMemory
            | OpKind::UnregisterMemory
            | OpKind::TceRemove
            | OpKind::MapDma
            | OpKind::KvmFileAdd
            | OpKind::KvmFileDel
            | OpKind::KvmSetSpaprTce
            | OpKind::KvmHasDeviceAttr => {
                zero_from(0)?;
                Ok(Self::Done)
            }
        }
    }
}

/// The wire report of one executed call: status 0 and the output words, or the negated errno
/// and zero words.
pub fn to_op_result(kind: OpKind, result: &Result<Output, Errno>) -> Result<OpResult, OutputError> {
    match result {
        Ok(output) => Ok(OpResult {
            kind,
            status: 0,
            out: output.to_out(kind)?,
        }),
        Err(errno) => Ok(OpResult {
            kind,
            status: -errno.raw_os_error(),
            out: [0; 4],
        }),
    }
}

/// The typed result a wire report carries; the inverse of [`to_op_result`].
pub fn from_op_result(result: &OpResult) -> Result<Result<Output, Errno>, OutputError> {
    let kind = result.kind;
    match result.status {
        0 => Output::from_out(kind, result.out).map(Ok),
        status if status > 0 => Err(OutputError::PositiveStatus { kind, status }),
        status => match result.out.iter().position(|w| *w != 0) {
            Some(word) => Err(OutputError::NonZeroWord {
                kind,
                word,
                value: result.out[word],
            }),
            None => Ok(Err(Errno::from_raw_os_error(-status))),
        },
    }
}

/// A call that has no wire form: the front-end never executes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is made by the sidecar only and has no owner-operation form")]
pub struct NotAnOwnerOp(pub KernelOp);

impl TryFrom<KernelOp> for OwnerOp {
    type Error = NotAnOwnerOp;

    fn try_from(op: KernelOp) -> Result<Self, Self::Error> {
        Ok(match op {
            KernelOp::ContainerOpen { container } => OwnerOp::ContainerOpen {
                container: container.0,
            },
            KernelOp::ContainerClose { container } => OwnerOp::ContainerClose {
                container: container.0,
            },
            KernelOp::CheckExtension {
                container,
                extension,
            } => OwnerOp::CheckExtension {
                container: container.0,
                extension,
            },
            KernelOp::SetIommu {
                container,
                iommu_type,
            } => OwnerOp::SetIommu {
                container: container.0,
                iommu_type,
            },
            KernelOp::GroupSetContainer { container, group } => OwnerOp::GroupSetContainer {
                container: container.0,
                group: group.0,
            },
            KernelOp::GroupUnsetContainer { container, group } => OwnerOp::GroupUnsetContainer {
                container: container.0,
                group: group.0,
            },
            KernelOp::TceGetInfo { container } => OwnerOp::TceGetInfo {
                container: container.0,
            },
            KernelOp::RegisterMemory {
                container,
                region,
                offset,
                size,
            } => OwnerOp::RegisterMemory {
                container: container.0,
                region: region.0,
                offset,
                size,
            },
            KernelOp::UnregisterMemory {
                container,
                region,
                offset,
                size,
            } => OwnerOp::UnregisterMemory {
                container: container.0,
                region: region.0,
                offset,
                size,
            },
            KernelOp::TceCreate {
                container,
                page_shift,
                window_size,
                levels,
            } => OwnerOp::TceCreate {
                container: container.0,
                page_shift,
                window_size,
                levels,
            },
            KernelOp::TceRemove {
                container,
                start_addr,
            } => OwnerOp::TceRemove {
                container: container.0,
                start_addr,
            },
            KernelOp::MapDma {
                container,
                region,
                offset,
                iova,
                size,
                access,
            } => OwnerOp::MapDma {
                container: container.0,
                region: region.0,
                offset,
                iova,
                size,
                access,
            },
            KernelOp::UnmapDma {
                container,
                iova,
                size,
            } => OwnerOp::UnmapDma {
                container: container.0,
                iova,
                size,
            },
            KernelOp::EehPeOp {
                container,
                op,
                err_type,
                err_func,
                err_addr,
                err_mask,
            } => OwnerOp::EehPeOp {
                container: container.0,
                op,
                err_type,
                err_func,
                err_addr,
                err_mask,
            },
            KernelOp::KvmFileAdd { group } => OwnerOp::KvmFileAdd { group: group.0 },
            KernelOp::KvmFileDel { group } => OwnerOp::KvmFileDel { group: group.0 },
            KernelOp::KvmSetSpaprTce { group, table } => OwnerOp::KvmSetSpaprTce {
                group: group.0,
                table: table.0,
            },
            KernelOp::KvmHasDeviceAttr { attr_group, attr } => {
                OwnerOp::KvmHasDeviceAttr { attr_group, attr }
            }
            KernelOp::GroupGetStatus { .. } | KernelOp::ReadTces { .. } => {
                return Err(NotAnOwnerOp(op))
            }
        })
    }
}

impl From<OwnerOp> for KernelOp {
    fn from(op: OwnerOp) -> Self {
        match op {
            OwnerOp::ContainerOpen { container } => KernelOp::ContainerOpen {
                container: ContainerId(container),
            },
            OwnerOp::ContainerClose { container } => KernelOp::ContainerClose {
                container: ContainerId(container),
            },
            OwnerOp::CheckExtension {
                container,
                extension,
            } => KernelOp::CheckExtension {
                container: ContainerId(container),
                extension,
            },
            OwnerOp::SetIommu {
                container,
                iommu_type,
            } => KernelOp::SetIommu {
                container: ContainerId(container),
                iommu_type,
            },
            OwnerOp::GroupSetContainer { container, group } => KernelOp::GroupSetContainer {
                container: ContainerId(container),
                group: GroupId(group),
            },
            OwnerOp::GroupUnsetContainer { container, group } => KernelOp::GroupUnsetContainer {
                container: ContainerId(container),
                group: GroupId(group),
            },
            OwnerOp::TceGetInfo { container } => KernelOp::TceGetInfo {
                container: ContainerId(container),
            },
            OwnerOp::RegisterMemory {
                container,
                region,
                offset,
                size,
            } => KernelOp::RegisterMemory {
                container: ContainerId(container),
                region: RegionId(region),
                offset,
                size,
            },
            OwnerOp::UnregisterMemory {
                container,
                region,
                offset,
                size,
            } => KernelOp::UnregisterMemory {
                container: ContainerId(container),
                region: RegionId(region),
                offset,
                size,
            },
            OwnerOp::TceCreate {
                container,
                page_shift,
                window_size,
                levels,
            } => KernelOp::TceCreate {
                container: ContainerId(container),
                page_shift,
                window_size,
                levels,
            },
            OwnerOp::TceRemove {
                container,
                start_addr,
            } => KernelOp::TceRemove {
                container: ContainerId(container),
                start_addr,
            },
            OwnerOp::MapDma {
                container,
                region,
                offset,
                iova,
                size,
                access,
            } => KernelOp::MapDma {
                container: ContainerId(container),
                region: RegionId(region),
                offset,
                iova,
                size,
                access,
            },
            OwnerOp::UnmapDma {
                container,
                iova,
                size,
            } => KernelOp::UnmapDma {
                container: ContainerId(container),
                iova,
                size,
            },
            OwnerOp::EehPeOp {
                container,
                op,
                err_type,
                err_func,
                err_addr,
                err_mask,
            } => KernelOp::EehPeOp {
                container: ContainerId(container),
                op,
                err_type,
                err_func,
                err_addr,
                err_mask,
            },
            OwnerOp::KvmFileAdd { group } => KernelOp::KvmFileAdd {
                group: GroupId(group),
            },
            OwnerOp::KvmFileDel { group } => KernelOp::KvmFileDel {
                group: GroupId(group),
            },
            OwnerOp::KvmSetSpaprTce { group, table } => KernelOp::KvmSetSpaprTce {
                group: GroupId(group),
                table: TableId(table),
            },
            OwnerOp::KvmHasDeviceAttr { attr_group, attr } => {
                KernelOp::KvmHasDeviceAttr { attr_group, attr }
            }
        }
    }
}

/// A KVM TCE table as the caller holds it.
#[derive(Clone, Copy, Debug)]
pub struct TableFd<'a> {
    /// The fd `KVM_CREATE_SPAPR_TCE_64` returned (or a copy received over the socket).
    pub fd: BorrowedFd<'a>,
    /// Number of entries in the table; reading past it would fault.
    pub entries: u64,
    /// The table mapped and prefaulted when it arrived from another process (reads use it and
    /// cannot fault); `None` for a table of the caller's own, mapped for each read.
    pub view: Option<&'a shared_memory::TceView>,
}

/// A guest RAM region as mapped in the calling process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// The caller's virtual address of the region's first byte.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
}

/// Resolves the ids a [`KernelOp`] names to the caller's objects. A backend answers `EBADF`
/// for an id that resolves to no fd and `EFAULT` for a region that resolves to no mapping.
/// Containers are not resolved here: the backend that opened a container keeps its fd.
pub trait Objects {
    /// The fd of a VFIO group.
    fn group(&self, id: GroupId) -> Option<BorrowedFd<'_>>;
    /// A KVM TCE table.
    fn table(&self, id: TableId) -> Option<TableFd<'_>>;
    /// Where a guest RAM region is mapped in the calling process.
    fn region(&self, id: RegionId) -> Option<Mapping>;
    /// The VM's kvm-vfio device (one per VM).
    fn kvm_vfio_device(&self) -> Option<BorrowedFd<'_>>;
}

/// The plain resolver: fds and mappings by id, as a front-end (or a test playing one) holds
/// them.
#[derive(Debug, Default)]
pub struct ObjectTable {
    pub groups: BTreeMap<GroupId, OwnedFd>,
    /// Each table's fd and its number of entries.
    pub tables: BTreeMap<TableId, (OwnedFd, u64)>,
    pub regions: BTreeMap<RegionId, Mapping>,
    pub kvm_vfio: Option<OwnedFd>,
}

impl Objects for ObjectTable {
    fn group(&self, id: GroupId) -> Option<BorrowedFd<'_>> {
        self.groups.get(&id).map(|fd| fd.as_fd())
    }
    fn table(&self, id: TableId) -> Option<TableFd<'_>> {
        self.tables.get(&id).map(|(fd, entries)| TableFd {
            fd: fd.as_fd(),
            entries: *entries,
            view: None,
        })
    }
    fn region(&self, id: RegionId) -> Option<Mapping> {
        self.regions.get(&id).copied()
    }
    fn kvm_vfio_device(&self) -> Option<BorrowedFd<'_>> {
        self.kvm_vfio.as_ref().map(|fd| fd.as_fd())
    }
}

/// Executes kernel calls. `linux` makes the real calls; a simulation implements the same
/// trait. Failures are the errno the kernel returned, unchanged.
pub trait Kernel {
    fn execute(&mut self, op: &KernelOp, objects: &dyn Objects) -> Result<Output, Errno>;

    /// The caller mapped `size` bytes of `fd` from `offset` at `addr` in its own address space
    /// (guest RAM it will register). The real kernel sees the mapping by itself; a simulation
    /// must be told.
    fn memory_mapped(
        &mut self,
        _fd: BorrowedFd<'_>,
        _offset: u64,
        _addr: u64,
        _size: u64,
    ) -> Result<(), Errno> {
        Ok(())
    }

    /// The caller unmapped the memory it declared at `addr` with [`Kernel::memory_mapped`].
    fn memory_unmapped(&mut self, _addr: u64) -> Result<(), Errno> {
        Ok(())
    }

    /// Whether `fd` is a KVM TCE table (`KVM_CREATE_SPAPR_TCE_64`), as `/proc/self/fd` shows.
    fn is_tce_table(&mut self, fd: BorrowedFd<'_>) -> Result<bool, Errno>;
}

impl KernelOp {
    /// The spec's name of the call (`protocol/PROTOCOL.md` §6.1).
    pub fn name(&self) -> &'static str {
        match self {
            Self::ContainerOpen { .. } => "CONTAINER_OPEN",
            Self::ContainerClose { .. } => "CONTAINER_CLOSE",
            Self::CheckExtension { .. } => "CHECK_EXTENSION",
            Self::SetIommu { .. } => "SET_IOMMU",
            Self::GroupGetStatus { .. } => "GROUP_GET_STATUS",
            Self::GroupSetContainer { .. } => "GROUP_SET_CONTAINER",
            Self::GroupUnsetContainer { .. } => "GROUP_UNSET_CONTAINER",
            Self::TceGetInfo { .. } => "TCE_GET_INFO",
            Self::RegisterMemory { .. } => "REGISTER_MEMORY",
            Self::UnregisterMemory { .. } => "UNREGISTER_MEMORY",
            Self::TceCreate { .. } => "TCE_CREATE",
            Self::TceRemove { .. } => "TCE_REMOVE",
            Self::MapDma { .. } => "MAP_DMA",
            Self::UnmapDma { .. } => "UNMAP_DMA",
            Self::EehPeOp { .. } => "EEH_PE_OP",
            Self::KvmFileAdd { .. } => "KVM_FILE_ADD",
            Self::KvmFileDel { .. } => "KVM_FILE_DEL",
            Self::KvmSetSpaprTce { .. } => "KVM_SET_SPAPR_TCE",
            Self::KvmHasDeviceAttr { .. } => "KVM_HAS_DEVICE_ATTR",
            Self::ReadTces { .. } => "READ_TCES",
        }
    }
}

/// The call as logs and error texts show it: the spec's name and its arguments.
impl fmt::Display for KernelOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = self.name();
        match *self {
            Self::ContainerOpen { container } | Self::ContainerClose { container } | Self::TceGetInfo { container } => {
                write!(f, "{name} of {container}")
            }
            Self::CheckExtension { container, extension: x } | Self::SetIommu { container, iommu_type: x } => {
                write!(f, "{name}({x}) of {container}")
            }
            Self::GroupGetStatus { group } | Self::KvmFileAdd { group } | Self::KvmFileDel { group } => {
                write!(f, "{name} of {group}")
            }
            Self::GroupSetContainer { container, group } | Self::GroupUnsetContainer { container, group } => {
                write!(f, "{name} of {group} in {container}")
            }
            Self::RegisterMemory { container, region, offset, size }
            | Self::UnregisterMemory { container, region, offset, size } => {
                write!(f, "{name} of {region} (offset {offset:#x}, {size:#x} bytes) in {container}")
            }
            Self::TceCreate { container, page_shift, window_size, levels } => write!(
                f,
                "{name} in {container} ({window_size:#x} bytes of {:#x}-byte pages, {levels} levels)",
                1u64 << page_shift.min(63)
            ),
            Self::TceRemove { container, start_addr } => write!(f, "{name} at {start_addr:#x} in {container}"),
            Self::MapDma { container, region, offset, iova, size, .. } => {
                write!(f, "{name} of {region} offset {offset:#x} to {iova:#x} ({size:#x} bytes) in {container}")
            }
            Self::UnmapDma { container, iova, size } => write!(f, "{name} at {iova:#x} ({size:#x} bytes) in {container}"),
            Self::EehPeOp { container, op, .. } => write!(f, "{name}({op}) of {container}"),
            Self::KvmSetSpaprTce { group, table } => write!(f, "{name} of {group} with {table}"),
            Self::KvmHasDeviceAttr { attr_group, attr } => write!(f, "{name}({attr_group}, {attr})"),
            Self::ReadTces { table, first_index, count } => {
                write!(f, "{name} of {table} entries {first_index}..+{count}")
            }
        }
    }
}

impl fmt::Display for ContainerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "container {}", self.0)
    }
}

impl fmt::Display for GroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "group {}", self.0)
    }
}

impl fmt::Display for RegionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "region {}", self.0)
    }
}

impl fmt::Display for TableId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "table {}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const C: ContainerId = ContainerId(1);
    const G: GroupId = GroupId(2);
    const R: RegionId = RegionId(3);
    const T: TableId = TableId(4);
    const RW: DmaAccess = DmaAccess {
        read: true,
        write: true,
    };

    /// Position of the variant in the enum; exhaustive, so a new variant must be added here
    /// and then to [`one_of_each`].
    fn variant(op: &KernelOp) -> usize {
        match op {
            KernelOp::ContainerOpen { .. } => 0,
            KernelOp::ContainerClose { .. } => 1,
            KernelOp::CheckExtension { .. } => 2,
            KernelOp::SetIommu { .. } => 3,
            KernelOp::GroupGetStatus { .. } => 4,
            KernelOp::GroupSetContainer { .. } => 5,
            KernelOp::GroupUnsetContainer { .. } => 6,
            KernelOp::TceGetInfo { .. } => 7,
            KernelOp::RegisterMemory { .. } => 8,
            KernelOp::UnregisterMemory { .. } => 9,
            KernelOp::TceCreate { .. } => 10,
            KernelOp::TceRemove { .. } => 11,
            KernelOp::MapDma { .. } => 12,
            KernelOp::UnmapDma { .. } => 13,
            KernelOp::EehPeOp { .. } => 14,
            KernelOp::KvmFileAdd { .. } => 15,
            KernelOp::KvmFileDel { .. } => 16,
            KernelOp::KvmSetSpaprTce { .. } => 17,
            KernelOp::KvmHasDeviceAttr { .. } => 18,
            KernelOp::ReadTces { .. } => 19,
        }
    }
    const VARIANTS: usize = 20;

    fn one_of_each() -> Vec<KernelOp> {
        vec![
            KernelOp::ContainerOpen { container: C },
            KernelOp::ContainerClose { container: C },
            KernelOp::CheckExtension {
                container: C,
                extension: 7,
            },
            KernelOp::SetIommu {
                container: C,
                iommu_type: 7,
            },
            KernelOp::GroupGetStatus { group: G },
            KernelOp::GroupSetContainer {
                container: C,
                group: G,
            },
            KernelOp::GroupUnsetContainer {
                container: C,
                group: G,
            },
            KernelOp::TceGetInfo { container: C },
            KernelOp::RegisterMemory {
                container: C,
                region: R,
                offset: 0,
                size: 1 << 16,
            },
            KernelOp::UnregisterMemory {
                container: C,
                region: R,
                offset: 0,
                size: 1 << 16,
            },
            KernelOp::TceCreate {
                container: C,
                page_shift: 16,
                window_size: 1 << 30,
                levels: 1,
            },
            KernelOp::TceRemove {
                container: C,
                start_addr: 1 << 59,
            },
            KernelOp::MapDma {
                container: C,
                region: R,
                offset: 0,
                iova: 0,
                size: 4096,
                access: RW,
            },
            KernelOp::UnmapDma {
                container: C,
                iova: 0,
                size: 4096,
            },
            KernelOp::EehPeOp {
                container: C,
                op: 4,
                err_type: 0,
                err_func: 0,
                err_addr: 0,
                err_mask: 0,
            },
            KernelOp::KvmFileAdd { group: G },
            KernelOp::KvmFileDel { group: G },
            KernelOp::KvmSetSpaprTce { group: G, table: T },
            KernelOp::KvmHasDeviceAttr {
                attr_group: 1,
                attr: 3,
            },
            KernelOp::ReadTces {
                table: T,
                first_index: 0,
                count: 8,
            },
        ]
    }

    #[test]
    fn one_of_each_covers_every_variant_once() {
        let mut seen: Vec<usize> = one_of_each().iter().map(variant).collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..VARIANTS).collect::<Vec<_>>());
    }

    #[test]
    fn route_kvm_device_ops_front_end_in_both_modes() {
        for op in one_of_each()
            .iter()
            .filter(|op| op.executor() == Executor::VmCreator)
        {
            assert_eq!(
                route(op, OwnershipMode::Accelerated),
                Side::FrontEnd,
                "{op:?}"
            );
            assert_eq!(route(op, OwnershipMode::Isolated), Side::FrontEnd, "{op:?}");
        }
    }

    #[test]
    fn route_each_op_expected_side_per_mode() {
        use OwnershipMode::{Accelerated, Isolated};
        use Side::{FrontEnd, Sidecar};
        // (variant, accelerated, isolated), written out from K1/K2 rather than derived.
        let expected = [
            (0, FrontEnd, Sidecar),   // ContainerOpen
            (1, FrontEnd, Sidecar),   // ContainerClose
            (2, FrontEnd, Sidecar),   // CheckExtension: needs the owner's container fd
            (3, FrontEnd, Sidecar),   // SetIommu
            (4, Sidecar, Sidecar),    // GroupGetStatus: the sidecar holds the group fd
            (5, FrontEnd, Sidecar),   // GroupSetContainer
            (6, FrontEnd, Sidecar),   // GroupUnsetContainer
            (7, FrontEnd, Sidecar),   // TceGetInfo: EPERM from another mm (K2)
            (8, FrontEnd, Sidecar),   // RegisterMemory
            (9, FrontEnd, Sidecar),   // UnregisterMemory
            (10, FrontEnd, Sidecar),  // TceCreate
            (11, FrontEnd, Sidecar),  // TceRemove
            (12, FrontEnd, Sidecar),  // MapDma
            (13, FrontEnd, Sidecar),  // UnmapDma
            (14, FrontEnd, Sidecar),  // EehPeOp
            (15, FrontEnd, FrontEnd), // KvmFileAdd: EIO from another process (K1)
            (16, FrontEnd, FrontEnd), // KvmFileDel
            (17, FrontEnd, FrontEnd), // KvmSetSpaprTce
            (18, FrontEnd, FrontEnd), // KvmHasDeviceAttr
            (19, Sidecar, Sidecar),   // ReadTces: mmap of the table fd (K6)
        ];
        for op in one_of_each() {
            let (_, accelerated, isolated) = expected[variant(&op)];
            assert_eq!(route(&op, Accelerated), accelerated, "{op:?}");
            assert_eq!(route(&op, Isolated), isolated, "{op:?}");
        }
    }

    #[test]
    fn owner_op_form_exists_exactly_for_ops_routable_to_front_end() {
        for op in one_of_each() {
            let routable = route(&op, OwnershipMode::Accelerated) == Side::FrontEnd;
            match OwnerOp::try_from(op) {
                Ok(wire) => {
                    assert!(routable, "{op:?}");
                    assert_eq!(KernelOp::from(wire), op);
                }
                Err(NotAnOwnerOp(back)) => {
                    assert!(!routable, "{op:?}");
                    assert_eq!(back, op);
                }
            }
        }
    }

    fn owner_op() -> impl Strategy<Value = OwnerOp> {
        let access =
            (any::<bool>(), any::<bool>()).prop_map(|(read, write)| DmaAccess { read, write });
        prop_oneof![
            any::<u32>().prop_map(|container| OwnerOp::ContainerOpen { container }),
            any::<u32>().prop_map(|container| OwnerOp::ContainerClose { container }),
            any::<(u32, u32)>().prop_map(|(container, extension)| OwnerOp::CheckExtension {
                container,
                extension
            }),
            any::<(u32, u32)>().prop_map(|(container, iommu_type)| OwnerOp::SetIommu {
                container,
                iommu_type
            }),
            any::<(u32, u32)>()
                .prop_map(|(container, group)| OwnerOp::GroupSetContainer { container, group }),
            any::<(u32, u32)>()
                .prop_map(|(container, group)| OwnerOp::GroupUnsetContainer { container, group }),
            any::<u32>().prop_map(|container| OwnerOp::TceGetInfo { container }),
            any::<(u32, u32, u64, u64)>().prop_map(|(container, region, offset, size)| {
                OwnerOp::RegisterMemory {
                    container,
                    region,
                    offset,
                    size,
                }
            }),
            any::<(u32, u32, u64, u64)>().prop_map(|(container, region, offset, size)| {
                OwnerOp::UnregisterMemory {
                    container,
                    region,
                    offset,
                    size,
                }
            }),
            any::<(u32, u32, u64, u32)>().prop_map(
                |(container, page_shift, window_size, levels)| {
                    OwnerOp::TceCreate {
                        container,
                        page_shift,
                        window_size,
                        levels,
                    }
                }
            ),
            any::<(u32, u64)>().prop_map(|(container, start_addr)| OwnerOp::TceRemove {
                container,
                start_addr
            }),
            (any::<(u32, u32, u64, u64, u64)>(), access).prop_map(
                |((container, region, offset, iova, size), access)| OwnerOp::MapDma {
                    container,
                    region,
                    offset,
                    iova,
                    size,
                    access
                }
            ),
            any::<(u32, u64, u64)>().prop_map(|(container, iova, size)| OwnerOp::UnmapDma {
                container,
                iova,
                size
            }),
            any::<(u32, u32, u32, u32, u64, u64)>().prop_map(
                |(container, op, err_type, err_func, err_addr, err_mask)| OwnerOp::EehPeOp {
                    container,
                    op,
                    err_type,
                    err_func,
                    err_addr,
                    err_mask
                }
            ),
            any::<u32>().prop_map(|group| OwnerOp::KvmFileAdd { group }),
            any::<u32>().prop_map(|group| OwnerOp::KvmFileDel { group }),
            any::<(u32, u32)>().prop_map(|(group, table)| OwnerOp::KvmSetSpaprTce { group, table }),
            any::<(u32, u64)>()
                .prop_map(|(attr_group, attr)| OwnerOp::KvmHasDeviceAttr { attr_group, attr }),
        ]
    }

    /// An output of the kind `kind` produces.
    fn output_of(kind: OpKind) -> BoxedStrategy<Output> {
        match kind {
            OpKind::ContainerOpen => any::<u32>().prop_map(Output::ApiVersion).boxed(),
            OpKind::CheckExtension | OpKind::EehPeOp => {
                any::<u32>().prop_map(Output::Value).boxed()
            }
            OpKind::TceGetInfo => any::<(u32, u32, u32, u64, u32, u32)>()
                .prop_map(|(flags, start, size, pgsizes, windows, levels)| {
                    Output::TceInfo(TceInfo {
                        flags,
                        dma32_window_start: start,
                        dma32_window_size: size,
                        pgsizes,
                        max_dynamic_windows: windows,
                        levels,
                    })
                })
                .boxed(),
            OpKind::TceCreate => any::<u64>().prop_map(Output::StartAddr).boxed(),
            OpKind::UnmapDma => any::<u64>().prop_map(Output::Unmapped).boxed(),
            OpKind::ContainerClose
            | OpKind::SetIommu
            | OpKind::GroupSetContainer
            | OpKind::GroupUnsetContainer
            | OpKind::RegisterMemory
            | OpKind::UnregisterMemory
            | OpKind::TceRemove
            | OpKind::MapDma
            | OpKind::KvmFileAdd
            | OpKind::KvmFileDel
            | OpKind::KvmSetSpaprTce
            | OpKind::KvmHasDeviceAttr => Just(Output::Done).boxed(),
        }
    }

    fn kind_and_output() -> impl Strategy<Value = (OpKind, Output)> {
        proptest::sample::select(OpKind::ALL.to_vec())
            .prop_flat_map(|kind| output_of(kind).prop_map(move |output| (kind, output)))
    }

    proptest! {
        #[test]
        fn owner_op_through_kernel_op_unchanged(wire in owner_op()) {
            let op = KernelOp::from(wire);
            prop_assert_eq!(OwnerOp::try_from(op), Ok(wire));
            prop_assert_ne!(op.executor(), Executor::Anyone);
        }

        #[test]
        fn output_through_op_result_unchanged((kind, output) in kind_and_output()) {
            let result = to_op_result(kind, &Ok(output.clone())).unwrap();
            prop_assert_eq!(result.status, 0);
            prop_assert_eq!(from_op_result(&result), Ok(Ok(output)));
        }

        #[test]
        fn op_result_words_decode_then_encode_unchanged(
            kind in proptest::sample::select(OpKind::ALL.to_vec()),
            out in any::<[u64; 4]>(),
        ) {
            // Either the words are rejected, or they are the canonical form of one output.
            if let Ok(output) = Output::from_out(kind, out) {
                prop_assert_eq!(output.to_out(kind), Ok(out));
            }
        }

        #[test]
        fn errno_through_op_result_unchanged(
            kind in proptest::sample::select(OpKind::ALL.to_vec()),
            raw in 1i32..4096,
        ) {
            let errno = Errno::from_raw_os_error(raw);
            let result = to_op_result(kind, &Err(errno)).unwrap();
            prop_assert_eq!(result.status, -raw);
            prop_assert_eq!(result.out, [0; 4]);
            prop_assert_eq!(from_op_result(&result), Ok(Err(errno)));
        }
    }

    #[test]
    fn from_out_unused_word_set_rejected() {
        let err = Output::from_out(OpKind::MapDma, [0, 0, 5, 0]);
        assert_eq!(
            err,
            Err(OutputError::NonZeroWord {
                kind: OpKind::MapDma,
                word: 2,
                value: 5
            })
        );
        let err = Output::from_out(OpKind::TceCreate, [1 << 59, 1, 0, 0]);
        assert_eq!(
            err,
            Err(OutputError::NonZeroWord {
                kind: OpKind::TceCreate,
                word: 1,
                value: 1
            })
        );
    }

    #[test]
    fn from_out_api_version_above_u32_rejected() {
        let err = Output::from_out(OpKind::ContainerOpen, [1 << 32, 0, 0, 0]);
        assert_eq!(
            err,
            Err(OutputError::TooLarge {
                kind: OpKind::ContainerOpen,
                word: 0,
                value: 1 << 32
            })
        );
    }

    #[test]
    fn to_out_output_of_other_kind_rejected() {
        assert_eq!(
            Output::StartAddr(0).to_out(OpKind::UnmapDma),
            Err(OutputError::Mismatch {
                kind: OpKind::UnmapDma,
                output: "start address"
            })
        );
        assert_eq!(
            Output::Tces(vec![1]).to_out(OpKind::KvmSetSpaprTce),
            Err(OutputError::Mismatch {
                kind: OpKind::KvmSetSpaprTce,
                output: "TCEs"
            })
        );
    }

    #[test]
    fn from_op_result_positive_status_rejected() {
        let result = OpResult {
            kind: OpKind::MapDma,
            status: 22,
            out: [0; 4],
        };
        assert_eq!(
            from_op_result(&result),
            Err(OutputError::PositiveStatus {
                kind: OpKind::MapDma,
                status: 22
            })
        );
    }

    #[test]
    fn from_op_result_failure_with_output_words_rejected() {
        let result = OpResult {
            kind: OpKind::TceCreate,
            status: -28,
            out: [1 << 59, 0, 0, 0],
        };
        assert_eq!(
            from_op_result(&result),
            Err(OutputError::NonZeroWord {
                kind: OpKind::TceCreate,
                word: 0,
                value: 1 << 59
            })
        );
    }
}
