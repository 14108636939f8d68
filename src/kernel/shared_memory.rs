//! Memory shared with another process, made safe to touch: guest RAM and TCE tables arrive as
//! fds, and a process that maps a file someone else can shrink dies of `SIGBUS` when it reads
//! past the new end. So every mapping of a received fd is validated when it is made: memfds must
//! be sealed against shrinking and large enough, and a TCE table's whole extent is prefaulted
//! (`MADV_POPULATE_READ` fails where an access would fault). After that no action of the other
//! process can make an access here fault.
//!
//! Part of the kernel boundary: the only `unsafe` is `mmap`, `munmap`, `madvise` and volatile
//! access inside mappings made here; every block says why it is sound.
#![allow(unsafe_code)]

use std::ffi::c_void;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::ptr::NonNull;

use rustix::fs::{
    fcntl_add_seals, fcntl_get_seals, ftruncate, memfd_create, MemfdFlags, SealFlags,
};
use rustix::mm::{MapFlags, ProtFlags};

use super::Errno;

const ENTRY: u64 = size_of::<u64>() as u64;

/// Why a received fd cannot be mapped safely.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unsafe {
    /// Not a memfd sealed with `F_SEAL_SHRINK` (`F_GET_SEALS` fails for other files).
    #[error("the fd is not a memfd sealed against shrinking (F_SEAL_SHRINK)")]
    NotSealed,
    /// Smaller than what would be mapped.
    #[error("the file has {size} bytes; {needed} are needed")]
    TooSmall { size: u64, needed: u64 },
    /// The mapping or its prefault failed with this errno.
    #[error("the file cannot be mapped: {0}")]
    Map(Errno),
}

impl Unsafe {
    /// The errno the protocol gives this refusal (`PROTOCOL.md`, Trust).
    pub fn errno(self) -> Errno {
        match self {
            Self::NotSealed => Errno::PERM,
            Self::TooSmall { .. } => Errno::INVAL,
            Self::Map(errno) => errno,
        }
    }
}

/// Checks that `fd` is a memfd that cannot shrink below `needed` bytes: sealed with
/// `F_SEAL_SHRINK` and at least that large now.
pub fn require_sealed(fd: BorrowedFd<'_>, needed: u64) -> Result<(), Unsafe> {
    let seals = fcntl_get_seals(fd).map_err(|_| Unsafe::NotSealed)?;
    if !seals.contains(SealFlags::SHRINK) {
        return Err(Unsafe::NotSealed);
    }
    let size = rustix::fs::fstat(fd)
        .map_err(Unsafe::Map)
        .map(|st| u64::try_from(st.st_size).unwrap_or(0))?;
    if size < needed {
        return Err(Unsafe::TooSmall { size, needed });
    }
    Ok(())
}

/// A new memfd of `size` bytes whose size can never change (sealed against shrinking, growing
/// and further sealing), as the protocol requires of shared memory (QEMU's
/// `memory-backend-memfd` seals the same way by default).
pub fn sealed_memfd(name: &str, size: u64) -> Result<OwnedFd, Errno> {
    let fd = memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)?;
    ftruncate(&fd, size)?;
    fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)?;
    Ok(fd)
}

/// Bytes a table of `entries` u64 entries takes, rounded up to whole pages.
pub fn table_bytes(entries: u64) -> Option<u64> {
    let page = rustix::param::page_size() as u64;
    entries.checked_mul(ENTRY)?.checked_next_multiple_of(page)
}

/// A TCE table mapped read-only, whole, and prefaulted when it arrived: reads inside it cannot
/// fault, whatever its other holders do (a KVM table's size is fixed at creation; a memfd table
/// is sealed against shrinking before it is mapped).
#[derive(Debug)]
pub struct TceView {
    mapping: Mapped,
    entries: u64,
}

impl TceView {
    /// Maps the `entries` entries of `fd` and faults every page in. `EFAULT` (from
    /// `MADV_POPULATE_READ`) means the file holds fewer entries than that.
    pub fn new(fd: BorrowedFd<'_>, entries: u64) -> Result<Self, Errno> {
        let bytes = table_bytes(entries).ok_or(Errno::INVAL)?;
        let len = usize::try_from(bytes).map_err(|_| Errno::NOMEM)?;
        let mapping = Mapped::new(fd, len, 0)?;
        // SAFETY: the range is exactly the mapping just made; MADV_POPULATE_READ only faults
        // pages in (or reports that it cannot), changing no memory.
        let ret = unsafe { libc::madvise(mapping.ptr.as_ptr(), len, libc::MADV_POPULATE_READ) };
        if ret != 0 {
            let err = std::io::Error::last_os_error();
            return Err(Errno::from_io_error(&err).unwrap_or(Errno::FAULT));
        }
        Ok(Self { mapping, entries })
    }

    /// Entries `[first, first + count)`; `EINVAL` past the table's end.
    pub fn read(&self, first: u64, count: u32) -> Result<Vec<u64>, Errno> {
        let end = first.checked_add(count.into()).ok_or(Errno::INVAL)?;
        if end > self.entries {
            return Err(Errno::INVAL);
        }
        Ok(self.mapping.read_u64s(first as usize, count as usize))
    }

    pub fn entries(&self) -> u64 {
        self.entries
    }
}

/// A read-only shared mapping, unmapped on drop.
#[derive(Debug)]
pub(crate) struct Mapped {
    ptr: NonNull<c_void>,
    len: usize,
}

// SAFETY: a read-only mapping owned by this value; nothing in it is tied to a thread.
unsafe impl Send for Mapped {}

impl Mapped {
    pub(crate) fn new(fd: BorrowedFd<'_>, len: usize, offset: u64) -> Result<Self, Errno> {
        // SAFETY: a new mapping at an address the kernel chooses aliases no Rust object.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ,
                MapFlags::SHARED,
                fd,
                offset,
            )
        }?;
        Ok(Self {
            ptr: NonNull::new(ptr).ok_or(Errno::NOMEM)?,
            len,
        })
    }

    /// `count` u64s from byte `8 * first` of the mapping.
    ///
    /// # Panics
    /// If the range passes the mapping's end (callers check against the table first).
    pub(crate) fn read_u64s(&self, first: usize, count: usize) -> Vec<u64> {
        let end = first.checked_add(count).and_then(|e| e.checked_mul(8));
        assert!(end.is_some_and(|e| e <= self.len), "read past a mapping");
        let base = self.ptr.as_ptr().cast::<u64>();
        (first..first + count)
            // SAFETY: slot i lies inside the mapping (asserted above) and is 8-byte aligned
            // (the mapping is page aligned). The other holder may change entries at any time,
            // so each is read once, volatile.
            .map(|i| unsafe { base.add(i).read_volatile() })
            .collect()
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly the mapping made in `new`, and no reference into it
        // outlives `self`. An munmap of a valid mapping cannot fail, so the result is ignored.
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr(), self.len) };
    }
}

/// Guest RAM mapped shared from the front-end's memfd, so that in isolated mode the sidecar has
/// addresses of its own for REGISTER_MEMORY and MAP_DMA (K2: the container's owner registers
/// memory of its own mm). Unmapped on drop.
#[derive(Debug)]
pub struct SharedMapping {
    ptr: NonNull<c_void>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory owned by this value; nothing in it is tied to the
// thread that created it, and every access goes through volatile reads and writes of aligned
// u64s.
unsafe impl Send for SharedMapping {}

impl SharedMapping {
    /// Maps `len` bytes of `fd` from `offset`, readable and writable, shared.
    pub fn new(fd: BorrowedFd<'_>, offset: u64, len: u64) -> Result<Self, Errno> {
        let len = usize::try_from(len).map_err(|_| Errno::NOMEM)?;
        // SAFETY: a new mapping at an address the kernel chooses aliases no Rust object.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                fd,
                offset,
            )
        }?;
        Ok(Self {
            ptr: NonNull::new(ptr).ok_or(Errno::NOMEM)?,
            len,
        })
    }

    /// Maps the first `len` bytes of `fd`.
    pub fn map(fd: BorrowedFd<'_>, len: usize) -> Result<Self, Errno> {
        if len == 0 {
            return Err(Errno::INVAL);
        }
        Self::new(fd, 0, len as u64)
    }

    /// The mapping's address in this process.
    pub fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    fn slot(&self, index: usize) -> Option<*mut u64> {
        let end = index.checked_add(1)?.checked_mul(8)?;
        // The mapping is page-aligned, so every u64 slot is aligned.
        (end <= self.len).then(|| self.ptr.as_ptr().cast::<u64>().wrapping_add(index))
    }

    /// The u64 at `index` (host byte order), or `None` past the end.
    pub fn read_u64(&self, index: usize) -> Option<u64> {
        // SAFETY: `slot` checked bounds and alignment; the memory is mapped while `self` lives;
        // volatile because another process (or the kernel) may write it.
        self.slot(index).map(|p| unsafe { p.read_volatile() })
    }

    /// Stores `value` (host byte order) at `index`; false past the end.
    pub fn write_u64(&self, index: usize, value: u64) -> bool {
        // SAFETY: as in `read_u64`; the mapping is writable.
        self.slot(index)
            .map(|p| unsafe { p.write_volatile(value) })
            .is_some()
    }

    pub fn len(&self) -> u64 {
        self.len as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for SharedMapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly the mapping made in `new`; nothing references it.
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    fn page() -> u64 {
        rustix::param::page_size() as u64
    }

    #[test]
    fn an_unsealed_memfd_is_refused_whatever_its_size() {
        let fd = memfd_create("plain", MemfdFlags::CLOEXEC).unwrap();
        ftruncate(&fd, page()).unwrap();
        assert_eq!(require_sealed(fd.as_fd(), 8), Err(Unsafe::NotSealed));
        // Sealable but not sealed against shrinking.
        let fd = memfd_create("grow-only", MemfdFlags::ALLOW_SEALING).unwrap();
        ftruncate(&fd, page()).unwrap();
        fcntl_add_seals(&fd, SealFlags::GROW).unwrap();
        assert_eq!(require_sealed(fd.as_fd(), 8), Err(Unsafe::NotSealed));
        assert_eq!(Unsafe::NotSealed.errno(), Errno::PERM);
    }

    #[test]
    fn a_sealed_memfd_must_hold_what_is_mapped() {
        let fd = sealed_memfd("sealed", page()).unwrap();
        assert_eq!(require_sealed(fd.as_fd(), page()), Ok(()));
        let too_small = require_sealed(fd.as_fd(), page() + 1).unwrap_err();
        assert_eq!(
            too_small,
            Unsafe::TooSmall {
                size: page(),
                needed: page() + 1
            }
        );
        assert_eq!(too_small.errno(), Errno::INVAL);
        // The seal holds: the sender cannot shrink it later.
        assert_eq!(ftruncate(&fd, 0), Err(Errno::PERM));
    }

    #[test]
    fn a_table_view_is_refused_where_the_file_ends_before_the_declared_entries() {
        // One page of entries in a file of one page: fine. Twice as many: the second page
        // would raise SIGBUS, and the view is refused instead.
        let entries = page() / 8;
        let fd = sealed_memfd("table", page()).unwrap();
        let view = TceView::new(fd.as_fd(), entries).unwrap();
        assert_eq!(view.read(entries - 1, 1), Ok(vec![0]));
        assert_eq!(view.read(entries, 1), Err(Errno::INVAL));
        assert_eq!(
            TceView::new(fd.as_fd(), 2 * entries).unwrap_err(),
            Errno::FAULT
        );
    }
}
