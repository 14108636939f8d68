//! Stand-in fds and the stores behind them: the registry that maps a stand-in's inode to the
//! model file it names, the memfd that holds a KVM TCE table's entries, and user memory read
//! through the memfd the caller declared.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::fs::{fstat, memfd_create, MemfdFlags};
use rustix::io::{pread, pwrite};

use super::State;
use crate::kernel::model::kernel::{FileArg, FileId, FileKind};
use crate::kernel::model::store::{TceStore, UserMemory};
use crate::kernel::model::Errno;

/// A KVM TCE table's pages in a memfd: entry `i` is the host-order u64 at byte `8 * i`.
pub(super) struct MemfdTceStore {
    pub(super) fd: OwnedFd,
    pub(super) page_size: u64,
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
pub(super) struct MemfdMemory(pub(super) OwnedFd);

impl UserMemory for MemfdMemory {
    fn read(&self, offset: u64, buf: &mut [u8]) -> bool {
        matches!(pread(&self.0, &mut *buf, offset), Ok(n) if n == buf.len())
    }
}

pub(super) fn standin_name(kind: FileKind) -> &'static str {
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

pub(super) fn inode_of(fd: impl AsFd) -> Option<(u64, u64)> {
    fstat(fd).ok().map(|st| (st.st_dev, st.st_ino))
}

impl State {
    pub(super) fn resolve(&self, fd: BorrowedFd<'_>) -> FileArg {
        match inode_of(fd).and_then(|ino| self.by_inode.get(&ino)) {
            Some(&id) if self.kernel.file_kind(id).is_some() => FileArg::File(id),
            _ => FileArg::Foreign,
        }
    }

    /// A new fd for `id`'s stand-in, creating the stand-in on first use.
    pub(super) fn standin(&mut self, id: FileId) -> Result<OwnedFd, Errno> {
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
    pub(super) fn collect(&mut self) {
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
