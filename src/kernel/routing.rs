//! Which process the kernel lets make each call (the kernel facts K1/K2), and therefore where
//! it is sent.

use super::KernelOp;
#[cfg(doc)]
use crate::protocol::OwnerOp;

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
