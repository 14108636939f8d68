//! Memory the model reads and writes: KVM TCE table pages and user pages of a process.
//!
//! The pure core never touches real memory itself; it goes through these two traits. The
//! in-memory implementations here serve the exhaustive tests; the server backs both with
//! memfds (see `server`), so that a real process can `mmap` a TCE table (K6) and guest RAM
//! stays the VMM's own mapping.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// The pages of one KVM TCE table (`stt->pages`): u64 entries in host byte order, allocated
/// lazily one kernel page at a time.
pub trait TceStore: Send {
    /// Entry `idx` (0 for a page never allocated, as `kvmppc_h_get_tce` returns).
    fn get(&self, idx: u64) -> u64;
    /// `kvmppc_tce_put`: stores `tce` at `idx`, allocating its page unless `tce` is 0.
    fn put(&mut self, idx: u64, tce: u64);
    /// Pages allocated so far.
    fn allocated_pages(&self) -> u64;
    /// The memfd holding the entries, when the store is shared with other processes.
    fn memfd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        None
    }
}

/// A lazily allocated in-memory table.
#[derive(Debug)]
pub struct PagedTceStore {
    tces_per_page: u64,
    pages: BTreeMap<u64, Vec<u64>>,
}

impl PagedTceStore {
    /// A table whose pages hold `page_size / 8` entries each.
    pub fn new(page_size: u64) -> Self {
        Self {
            tces_per_page: page_size / 8,
            pages: BTreeMap::new(),
        }
    }
}

impl TceStore for PagedTceStore {
    fn get(&self, idx: u64) -> u64 {
        self.pages
            .get(&(idx / self.tces_per_page))
            .map_or(0, |p| p[(idx % self.tces_per_page) as usize])
    }

    fn put(&mut self, idx: u64, tce: u64) {
        let page = idx / self.tces_per_page;
        if tce == 0 && !self.pages.contains_key(&page) {
            return;
        }
        let per_page = self.tces_per_page as usize;
        self.pages.entry(page).or_insert_with(|| vec![0; per_page])
            [(idx % self.tces_per_page) as usize] = tce;
    }

    fn allocated_pages(&self) -> u64 {
        self.pages.len() as u64
    }
}

/// Memory a process has mapped (its guest RAM, typically): what `get_user` reads.
pub trait UserMemory: Send + Sync {
    /// Reads `buf.len()` bytes at `offset` into the mapping; false when they are not there.
    fn read(&self, offset: u64, buf: &mut [u8]) -> bool;
}

/// Anonymous memory for tests, shared between the test and the model.
#[derive(Clone, Debug, Default)]
pub struct VecMemory(pub Arc<Mutex<Vec<u8>>>);

impl VecMemory {
    /// `len` zero bytes.
    pub fn new(len: usize) -> Self {
        Self(Arc::new(Mutex::new(vec![0; len])))
    }

    /// Writes `bytes` at `offset`. Panics when out of range (test helper).
    pub fn write(&self, offset: usize, bytes: &[u8]) {
        let mut mem = self.0.lock().unwrap_or_else(|e| e.into_inner());
        mem[offset..offset + bytes.len()].copy_from_slice(bytes);
    }
}

impl UserMemory for VecMemory {
    fn read(&self, offset: u64, buf: &mut [u8]) -> bool {
        let mem = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let Ok(start) = usize::try_from(offset) else {
            return false;
        };
        match start
            .checked_add(buf.len())
            .and_then(|end| mem.get(start..end))
        {
            Some(src) => {
                buf.copy_from_slice(src);
                true
            }
            None => false,
        }
    }
}
