//! [`KernelOp`]: one variant per kernel call the product makes, its spec name and the form
//! logs and error texts show.

use std::fmt;

#[cfg(doc)]
use super::Output;
use super::{ContainerId, GroupId, RegionId, TableId};
use crate::protocol::{DmaAccess, EehRequest};

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

impl KernelOp {
    /// The `VFIO_EEH_PE_OP` an `EEH_OP` request asks for, on its container.
    pub fn eeh_pe_op(request: &EehRequest) -> Self {
        Self::EehPeOp {
            container: ContainerId(request.container_id),
            op: request.op,
            err_type: request.err_type,
            err_func: request.err_func,
            err_addr: request.err_addr,
            err_mask: request.err_mask,
        }
    }
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
