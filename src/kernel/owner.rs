//! The lossless mapping between a [`KernelOp`] and the [`OwnerOp`] the front-end executes.

use super::{ContainerId, GroupId, KernelOp, RegionId, TableId};
use crate::protocol::OwnerOp;

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
