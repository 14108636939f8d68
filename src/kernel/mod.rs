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

#[cfg(doc)]
use crate::protocol::{OpResult, OwnerOp};

mod op;
mod output;
mod owner;
mod routing;

pub use op::KernelOp;
pub use output::{from_op_result, to_op_result, GroupStatus, Output, OutputError};
pub use owner::NotAnOwnerOp;
pub use routing::{route, Executor, OwnershipMode, Side};

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

#[cfg(test)]
mod tests;
