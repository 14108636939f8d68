//! The model's state: files, processes (mm), and the kernel objects behind them, with the
//! reference counting that decides when an object is released.
//!
//! Calls live in `kvm.rs`, `vfio.rs` and `hcall.rs`; this file owns the shared machinery:
//! file lifetime, locked-memory accounting, the per-mm pre-registration list (`mm_iommu_*`)
//! and hardware TCE tables (`iommu_table`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use rustix::io::Errno;

use super::abi::{DmaDir, Platform, H_GET_TCE, H_PUT_TCE};
use super::store::{PagedTceStore, TceStore, UserMemory};

/// A process's address space (`struct mm_struct`), named by the process id that owns it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mm(pub u32);

/// An open file description (`struct file`): what an fd refers to. Two fds share one `FileId`
/// when one was passed (SCM_RIGHTS) or duplicated from the other.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileId(pub u64);

/// An fd argument as the kernel resolves it in the caller's fd table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileArg {
    /// The number does not name an open file (`fget` fails: `EBADF`).
    Bad,
    /// An open file the model knows nothing about (a plain file, a socket...).
    Foreign,
    /// One of the model's files.
    File(FileId),
}

/// What kind of object a file is, as `/proc/<pid>/fd` would show it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    /// `/dev/kvm`.
    Kvm = 1,
    /// `anon_inode:kvm-vm`.
    Vm = 2,
    /// `anon_inode:kvm-vcpu`.
    Vcpu = 3,
    /// `anon_inode:kvm-spapr-tce`.
    SpaprTce = 4,
    /// `anon_inode:kvm-vfio`.
    KvmVfio = 5,
    /// `/dev/vfio/<group>`.
    VfioGroup = 6,
    /// `/dev/vfio/vfio`.
    VfioContainer = 7,
}

impl FileKind {
    const ALL: [Self; 7] = [
        Self::Kvm,
        Self::Vm,
        Self::Vcpu,
        Self::SpaprTce,
        Self::KvmVfio,
        Self::VfioGroup,
        Self::VfioContainer,
    ];

    /// The kind's number in the model's wire format (never 0).
    pub fn code(self) -> u64 {
        self as u64
    }

    pub fn from_code(code: u64) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.code() == code)
    }
}

macro_rules! id_type {
    ($name:ident) => {
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub(super) struct $name(pub(super) u64);
    };
}
id_type!(VmId);
id_type!(SttId);
id_type!(DevId);
id_type!(ContainerId);
id_type!(HwTableId);
id_type!(PreregId);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Obj {
    Kvm,
    Vm(VmId),
    Vcpu(VmId),
    Stt(SttId),
    KvmVfio(DevId),
    Group(u32),
    Container(ContainerId),
}

pub(super) struct File {
    pub(super) obj: Obj,
    /// Open fds in any process plus references the kernel holds (`fget`).
    pub(super) refs: u32,
}

/// Locked-memory and pinning counters of one process, readable for tests and status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MmStats {
    /// `mm->locked_vm` in kernel pages: pre-registered memory, TCE table memory charged to the
    /// container's mm, KVM TCE tables charged to the VM creator's mm.
    pub locked_vm_pages: u64,
    /// Pages pinned for IOMMU use: pre-registered regions plus v1 mappings.
    pub pinned_pages: u64,
    /// Pre-registered regions in this mm's list (`mm->context.iommu_group_mem_list`).
    pub prereg_regions: u64,
}

pub(super) struct UserMapping {
    pub(super) len: u64,
    pub(super) writable: bool,
    /// Page size backing the mapping (larger than the kernel page for hugetlbfs).
    pub(super) page_shift: u32,
    pub(super) memory: Arc<dyn UserMemory>,
    pub(super) offset: u64,
}

/// `struct mm_iommu_table_group_mem_t`.
pub(super) struct Prereg {
    pub(super) id: PreregId,
    pub(super) ua: u64,
    pub(super) entries: u64,
    pub(super) pageshift: u32,
    pub(super) used: u64,
    /// The kernel's atomic: 1 when idle, +1 per live TCE, 0 once released.
    pub(super) mapped: u64,
}

#[derive(Default)]
pub(super) struct MmState {
    pub(super) locked_vm: u64,
    /// `RLIMIT_MEMLOCK` in pages; `None` when the process may lock without limit
    /// (`CAP_IPC_LOCK` or an infinite limit).
    pub(super) memlock_limit: Option<u64>,
    pub(super) prereg: Vec<Prereg>,
    pub(super) mappings: BTreeMap<u64, UserMapping>,
    /// Pages pinned by v1 `VFIO_IOMMU_MAP_DMA` (`pin_user_pages_fast`).
    pub(super) v1_pinned: u64,
}

/// One entry of a hardware TCE table: the page it points to (named by the mm and user address
/// it was pinned through; the model has no physical addresses) and its permission.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HwTce {
    pub mm: Mm,
    pub ua: u64,
    pub dir: DmaDir,
}

/// `struct iommu_table`: a hardware TCE table, shared by the container's slot, the groups it is
/// programmed into and KVM's attachments.
pub(super) struct HwTable {
    pub(super) page_shift: u32,
    /// `it_offset`, `it_size`: in IOMMU pages.
    pub(super) offset: u64,
    pub(super) size: u64,
    pub(super) entries: HwEntries,
    pub(super) refs: u32,
}

/// The entries of a hardware TCE table and its `it_userspace` cache, in pages of 512 entries
/// allocated on first write and kept until the table goes, as the kernel allocates the levels
/// of a multi-level table on demand.
#[derive(Default)]
pub(super) struct HwEntries {
    pages: BTreeMap<u64, Box<[HwSlot]>>,
}

#[derive(Clone, Copy, Default)]
struct HwSlot {
    tce: Option<HwTce>,
    /// The user address cached by whoever mapped the entry (0: none).
    ua: u64,
}

const HW_PAGE_ENTRIES: u64 = 512;

impl HwEntries {
    fn slot(&self, entry: u64) -> Option<&HwSlot> {
        let page = self.pages.get(&(entry / HW_PAGE_ENTRIES))?;
        page.get((entry % HW_PAGE_ENTRIES) as usize)
    }

    fn slot_mut(&mut self, entry: u64) -> &mut HwSlot {
        let page = self
            .pages
            .entry(entry / HW_PAGE_ENTRIES)
            .or_insert_with(|| vec![HwSlot::default(); HW_PAGE_ENTRIES as usize].into());
        &mut page[(entry % HW_PAGE_ENTRIES) as usize]
    }

    pub(super) fn get(&self, entry: u64) -> Option<HwTce> {
        self.slot(entry).and_then(|s| s.tce)
    }

    /// Stores `new` at `entry`, returning what was there.
    fn xchg(&mut self, entry: u64, new: Option<HwTce>) -> Option<HwTce> {
        if new.is_none() && self.get(entry).is_none() {
            return None;
        }
        std::mem::replace(&mut self.slot_mut(entry).tce, new)
    }

    fn userspace(&self, entry: u64) -> u64 {
        self.slot(entry).map_or(0, |s| s.ua)
    }

    fn set_userspace(&mut self, entry: u64, ua: u64) {
        if ua != 0 || self.userspace(entry) != 0 {
            self.slot_mut(entry).ua = ua;
        }
    }

    /// The entries in `[first, first + count)` that hold a TCE, in order.
    pub(super) fn present(&self, first: u64, count: u64) -> Vec<u64> {
        let end = first.saturating_add(count);
        if end <= first {
            return Vec::new();
        }
        let pages = first / HW_PAGE_ENTRIES..=(end - 1) / HW_PAGE_ENTRIES;
        self.pages
            .range(pages)
            .flat_map(|(&page, slots)| {
                let base = page * HW_PAGE_ENTRIES;
                slots
                    .iter()
                    .enumerate()
                    .filter(|(_, slot)| slot.tce.is_some())
                    .map(move |(i, _)| base + i as u64)
            })
            .filter(|entry| (first..end).contains(entry))
            .collect()
    }
}

#[derive(Default)]
pub(super) struct Group {
    pub(super) opened: Option<FileId>,
    pub(super) container: Option<ContainerId>,
    pub(super) kvm: Option<VmId>,
    /// `table_group->tables[]`: the windows currently programmed into this PE.
    pub(super) tables: [Option<HwTableId>; 2],
}

/// `struct tce_container`: the sPAPR IOMMU driver's state, alive from `VFIO_SET_IOMMU` until
/// the last group leaves the container.
pub(super) struct TceDriver {
    pub(super) v2: bool,
    pub(super) enabled: bool,
    pub(super) def_window_pending: bool,
    pub(super) locked_pages: u64,
    pub(super) mm: Option<Mm>,
    pub(super) tables: [Option<HwTableId>; 2],
    /// `group_list`, newest first (`list_add`).
    pub(super) groups: Vec<u32>,
    /// `prereg_list`, newest first.
    pub(super) prereg: Vec<PreregId>,
}

/// `struct vfio_container`.
pub(super) struct Container {
    /// The container file plus one per attached group (`vfio_container_get`).
    pub(super) refs: u32,
    /// `group_list`, newest first.
    pub(super) groups: Vec<u32>,
    pub(super) driver: Option<TceDriver>,
}

pub(super) struct Memslot {
    pub(super) base_gfn: u64,
    pub(super) npages: u64,
    pub(super) userspace_addr: u64,
}

/// `struct kvmppc_spapr_tce_iommu_table`: a KVM table's link to a hardware table.
pub(super) struct Stit {
    pub(super) hw: HwTableId,
    pub(super) kref: u32,
}

/// `struct kvmppc_spapr_tce_table`.
pub(super) struct Stt {
    pub(super) vm: VmId,
    pub(super) liobn: u64,
    pub(super) page_shift: u32,
    pub(super) offset: u64,
    pub(super) size: u64,
    pub(super) store: Box<dyn TceStore>,
    /// `iommu_tables`, newest first (`list_add_rcu`).
    pub(super) stits: Vec<Stit>,
    pub(super) accounted_pages: u64,
}

pub(super) struct KvmVfioFile {
    pub(super) file: FileId,
    pub(super) iommu_group: Option<u32>,
}

pub(super) struct KvmVfio {
    pub(super) vm: VmId,
    pub(super) files: Vec<KvmVfioFile>,
}

/// Hypercalls of one VM: how many KVM completed and how many exited to userspace. This is the
/// seed patch's effect made measurable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct HcallStats {
    pub in_kernel: u64,
    pub exits: u64,
}

pub(super) struct Vm {
    pub(super) creator: Mm,
    /// `users_count`: the VM file and every vCPU, TCE table and device file.
    pub(super) refs: u32,
    pub(super) memslots: BTreeMap<u32, Memslot>,
    /// `kvm->arch.spapr_tce_tables`, newest first.
    pub(super) stts: Vec<SttId>,
    pub(super) vcpus: BTreeSet<u32>,
    pub(super) kvm_vfio: Option<DevId>,
    pub(super) enabled_hcalls: BTreeSet<u64>,
    pub(super) stats: HcallStats,
}

type StoreFactory = Box<dyn Fn(u64) -> Result<Box<dyn TceStore>, Errno> + Send>;

/// The simulated kernel: every call names its caller's mm, and objects are named by file.
pub struct ModelKernel {
    pub(super) platform: Platform,
    next_id: u64,
    pub(super) files: BTreeMap<FileId, File>,
    pub(super) mms: BTreeMap<Mm, MmState>,
    pub(super) vms: BTreeMap<VmId, Vm>,
    pub(super) stts: BTreeMap<SttId, Stt>,
    pub(super) devices: BTreeMap<DevId, KvmVfio>,
    pub(super) groups: BTreeMap<u32, Group>,
    pub(super) containers: BTreeMap<ContainerId, Container>,
    pub(super) hw_tables: BTreeMap<HwTableId, HwTable>,
    /// Table memory charged by VFIO for each window it created, and to which mm.
    pub(super) table_pages: BTreeMap<HwTableId, (Mm, u64)>,
    /// Kernel warnings issued (`WARN_ON_ONCE` in Linux, counted here every time).
    pub(super) warnings: Vec<&'static str>,
    /// Files released so far, so a holder of stand-ins knows when to look for released ones.
    released_files: u64,
    store_factory: StoreFactory,
}

impl ModelKernel {
    /// A host of `platform` with the given IOMMU group numbers, all viable.
    pub fn new(platform: Platform, iommu_groups: &[u32]) -> Self {
        let page_size = platform.page_size();
        Self {
            platform,
            next_id: 1,
            files: BTreeMap::new(),
            released_files: 0,
            mms: BTreeMap::new(),
            vms: BTreeMap::new(),
            stts: BTreeMap::new(),
            devices: BTreeMap::new(),
            groups: iommu_groups
                .iter()
                .map(|&n| (n, Group::default()))
                .collect(),
            containers: BTreeMap::new(),
            hw_tables: BTreeMap::new(),
            table_pages: BTreeMap::new(),
            warnings: Vec::new(),
            store_factory: Box::new(move |_bytes| Ok(Box::new(PagedTceStore::new(page_size)))),
        }
    }

    /// Replaces how KVM TCE table pages are provided (the server uses memfds). The factory gets
    /// the table's size in bytes, whole kernel pages.
    pub fn set_tce_store_factory(
        &mut self,
        factory: impl Fn(u64) -> Result<Box<dyn TceStore>, Errno> + Send + 'static,
    ) {
        self.store_factory = Box::new(factory);
    }

    /// The platform this kernel simulates.
    pub fn platform(&self) -> &Platform {
        &self.platform
    }

    pub(super) fn next_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    pub(super) fn new_store(&self, bytes: u64) -> Result<Box<dyn TceStore>, Errno> {
        (self.store_factory)(bytes)
    }

    // ---- processes -------------------------------------------------------------------------

    pub(super) fn mm_mut(&mut self, mm: Mm) -> &mut MmState {
        self.mms.entry(mm).or_default()
    }

    /// Sets the process's `RLIMIT_MEMLOCK` in bytes; `None` for no limit (`CAP_IPC_LOCK`).
    pub fn set_memlock_limit(&mut self, mm: Mm, bytes: Option<u64>) {
        let shift = self.platform.host_page_shift;
        self.mm_mut(mm).memlock_limit = bytes.map(|b| b >> shift);
    }

    /// Records that `mm` maps `len` bytes of `memory` (from `offset` in it) at `ua`, backed by
    /// pages of `1 << page_shift` bytes. The model cannot see a process's page tables, so a
    /// process that wants the kernel to pin or read its memory declares it here; the real
    /// kernel fails those calls for memory that is not mapped, and so does the model.
    #[allow(clippy::too_many_arguments)]
    pub fn mm_map(
        &mut self,
        mm: Mm,
        ua: u64,
        len: u64,
        writable: bool,
        page_shift: u32,
        memory: Arc<dyn UserMemory>,
        offset: u64,
    ) -> Result<(), Errno> {
        let page = self.platform.page_size();
        let end = ua.checked_add(len).ok_or(Errno::INVAL)?;
        if len == 0
            || ua % page != 0
            || len % page != 0
            || page_shift < self.platform.host_page_shift
            || offset.checked_add(len).is_none()
        {
            return Err(Errno::INVAL);
        }
        let state = self.mm_mut(mm);
        if state
            .mappings
            .range(..end)
            .next_back()
            .is_some_and(|(&start, m)| start + m.len > ua)
        {
            return Err(Errno::EXIST);
        }
        state.mappings.insert(
            ua,
            UserMapping {
                len,
                writable,
                page_shift,
                memory,
                offset,
            },
        );
        Ok(())
    }

    /// Forgets the mapping of `mm` that starts at `ua` (`munmap`). Pinned pages stay pinned, as
    /// in the kernel.
    pub fn mm_unmap(&mut self, mm: Mm, ua: u64) -> Result<(), Errno> {
        self.mm_mut(mm)
            .mappings
            .remove(&ua)
            .map(|_| ())
            .ok_or(Errno::INVAL)
    }

    /// Locked memory and pinned pages of `mm`.
    /// The kernel warnings issued so far, by the function that issued them.
    pub fn warnings(&self) -> &[&'static str] {
        &self.warnings
    }

    pub fn mm_stats(&self, mm: Mm) -> MmStats {
        self.mms
            .get(&mm)
            .map_or_else(MmStats::default, |s| MmStats {
                locked_vm_pages: s.locked_vm,
                pinned_pages: s.v1_pinned + s.prereg.iter().map(|p| p.entries).sum::<u64>(),
                prereg_regions: s.prereg.len() as u64,
            })
    }

    /// Whether `[ua, ua + len)` of `mm` is mapped without holes (possibly by several adjacent
    /// mappings): `Some((writable, page_shift))` with every mapping writable or not and the
    /// smallest page size backing the range.
    pub(super) fn user_range(&self, mm: Mm, ua: u64, len: u64) -> Option<(bool, u32)> {
        let end = ua.checked_add(len)?;
        let state = self.mms.get(&mm)?;
        let (mut at, mut writable, mut shift) = (ua, true, u32::MAX);
        while at < end {
            let (&start, m) = state.mappings.range(..=at).next_back()?;
            if start + m.len <= at {
                return None;
            }
            writable &= m.writable;
            shift = shift.min(m.page_shift);
            at = start + m.len;
        }
        Some((writable, shift))
    }

    /// `get_user`/`copy_from_user` from `mm`.
    pub(super) fn read_user(&self, mm: Mm, ua: u64, buf: &mut [u8]) -> bool {
        let Some((&start, m)) = self
            .mms
            .get(&mm)
            .and_then(|s| s.mappings.range(..=ua).next_back())
        else {
            return false;
        };
        let Some(end) = ua.checked_add(buf.len() as u64) else {
            return false;
        };
        end <= start + m.len
            && m.offset
                .checked_add(ua - start)
                .is_some_and(|at| m.memory.read(at, buf))
    }

    /// `account_locked_vm(mm, pages, true)`.
    pub(super) fn account_locked(&mut self, mm: Mm, pages: u64) -> Result<(), Errno> {
        let state = self.mm_mut(mm);
        let locked = state.locked_vm.saturating_add(pages);
        if state.memlock_limit.is_some_and(|limit| locked > limit) {
            return Err(Errno::NOMEM);
        }
        state.locked_vm = locked;
        Ok(())
    }

    /// `account_locked_vm(mm, pages, false)`.
    pub(super) fn unaccount_locked(&mut self, mm: Mm, pages: u64) {
        let state = self.mm_mut(mm);
        state.locked_vm = state.locked_vm.saturating_sub(pages);
    }

    // ---- files -----------------------------------------------------------------------------

    pub(super) fn new_file(&mut self, obj: Obj) -> FileId {
        let id = FileId(self.next_id());
        self.files.insert(id, File { obj, refs: 1 });
        id
    }

    pub(super) fn obj(&self, file: FileId) -> Option<Obj> {
        self.files.get(&file).map(|f| f.obj)
    }

    /// What kind of object `file` is; `None` once it is released.
    pub fn file_kind(&self, file: FileId) -> Option<FileKind> {
        Some(match self.obj(file)? {
            Obj::Kvm => FileKind::Kvm,
            Obj::Vm(_) => FileKind::Vm,
            Obj::Vcpu(_) => FileKind::Vcpu,
            Obj::Stt(_) => FileKind::SpaprTce,
            Obj::KvmVfio(_) => FileKind::KvmVfio,
            Obj::Group(_) => FileKind::VfioGroup,
            Obj::Container(_) => FileKind::VfioContainer,
        })
    }

    /// The process owning `mm` exited, its files already closed: its address space goes, with
    /// whatever it still had pre-registered (`mm_iommu_cleanup`) and its locked-memory charge.
    pub fn exit_mm(&mut self, mm: Mm) {
        self.mms.remove(&mm);
    }

    /// How many files have been released since the kernel started.
    pub fn released_files(&self) -> u64 {
        self.released_files
    }

    /// `fget`: the kernel keeps a reference to the file.
    pub(super) fn fget(&mut self, file: FileId) {
        if let Some(f) = self.files.get_mut(&file) {
            f.refs += 1;
        }
    }

    /// `fput`: drops a reference; the last one releases the file.
    pub(super) fn fput(&mut self, file: FileId) {
        let Some(f) = self.files.get_mut(&file) else {
            return;
        };
        f.refs -= 1;
        if f.refs == 0 {
            let obj = f.obj;
            self.files.remove(&file);
            self.released_files += 1;
            self.release(file, obj);
        }
    }

    /// `close()` of the last fd referring to `file` in userspace. The model cannot see fds being
    /// closed, so the holder of the last fd says so; references the kernel itself holds (a
    /// group file added to the kvm-vfio device) keep the file alive, as they do in Linux.
    pub fn close(&mut self, file: FileId) -> Result<(), Errno> {
        if !self.files.contains_key(&file) {
            return Err(Errno::BADF);
        }
        self.fput(file);
        Ok(())
    }

    fn release(&mut self, file: FileId, obj: Obj) {
        match obj {
            Obj::Kvm => {}
            Obj::Vm(vm) | Obj::Vcpu(vm) => self.kvm_put(vm),
            Obj::Stt(stt) => self.stt_release(stt),
            Obj::KvmVfio(dev) => self.kvm_vfio_release(dev),
            Obj::Group(no) => self.group_release(no, file),
            Obj::Container(c) => self.container_put(c),
        }
    }

    // ---- pre-registration (arch/powerpc/mm/book3s64/iommu_api.c) -----------------------------

    pub(super) fn prereg(&self, mm: Mm, id: PreregId) -> Option<&Prereg> {
        self.mms.get(&mm)?.prereg.iter().find(|p| p.id == id)
    }

    pub(super) fn prereg_mut(&mut self, mm: Mm, id: PreregId) -> Option<&mut Prereg> {
        self.mms
            .get_mut(&mm)?
            .prereg
            .iter_mut()
            .find(|p| p.id == id)
    }

    /// `mm_iommu_lookup(mm, ua, size)`: the region of `mm` containing `[ua, ua + size)`.
    pub(super) fn mm_iommu_lookup(&self, mm: Mm, ua: u64, size: u64) -> Option<PreregId> {
        let shift = self.platform.host_page_shift;
        self.mms.get(&mm)?.prereg.iter().find_map(|p| {
            let end = p.ua + (p.entries << shift);
            (p.ua <= ua && ua.checked_add(size).is_some_and(|e| e <= end)).then_some(p.id)
        })
    }

    /// `mm_iommu_ua_to_hpa`: fails (`EFAULT`) beyond the region or for an IOMMU page larger
    /// than the pages backing it.
    pub(super) fn mm_iommu_ua_ok(&self, mm: Mm, id: PreregId, ua: u64, pageshift: u32) -> bool {
        let shift = self.platform.host_page_shift;
        self.prereg(mm, id)
            .is_some_and(|p| (ua - p.ua) >> shift < p.entries && pageshift <= p.pageshift)
    }

    /// `mm_iommu_get(mm, ua, entries)`: exact match, takes a use.
    pub(super) fn mm_iommu_get(&mut self, mm: Mm, ua: u64, entries: u64) -> Option<PreregId> {
        let p = self
            .mms
            .get_mut(&mm)?
            .prereg
            .iter_mut()
            .find(|p| p.ua == ua && p.entries == entries)?;
        p.used += 1;
        Some(p.id)
    }

    /// `mm_iommu_new(mm, ua, entries)`: accounts, pins `mm`'s pages at `ua` (the caller is that
    /// mm's process), refuses overlaps.
    pub(super) fn mm_iommu_new(
        &mut self,
        mm: Mm,
        ua: u64,
        entries: u64,
    ) -> Result<PreregId, Errno> {
        let shift = self.platform.host_page_shift;
        self.account_locked(mm, entries)?;
        // vzalloc(0) fails: a zero-sized region ends as ENOMEM, not EINVAL.
        if entries == 0 {
            self.unaccount_locked(mm, entries);
            return Err(Errno::NOMEM);
        }
        let len = entries << shift;
        // pin_user_pages(FOLL_WRITE | FOLL_LONGTERM): every page must be mapped writable.
        let backing_shift = match self.user_range(mm, ua, len) {
            Some((true, page_shift)) => page_shift,
            _ => {
                self.unaccount_locked(mm, entries);
                return Err(Errno::FAULT);
            }
        };
        let overlaps = self.mms.get(&mm).is_some_and(|s| {
            s.prereg
                .iter()
                .any(|p| p.ua < ua + len && ua < p.ua + (p.entries << shift))
        });
        if overlaps {
            self.unaccount_locked(mm, entries);
            return Err(Errno::INVAL);
        }
        // Natural alignment of the region bounds the IOMMU page size; pages bigger than the
        // kernel's are usable only when hugetlb backs them.
        let natural = (ua | (entries << shift)).trailing_zeros();
        let pageshift = natural.min(backing_shift.max(shift));
        let id = PreregId(self.next_id());
        self.mm_mut(mm).prereg.insert(
            0,
            Prereg {
                id,
                ua,
                entries,
                pageshift,
                used: 1,
                mapped: 1,
            },
        );
        Ok(id)
    }

    /// `mm_iommu_put`: drops a use; the last one releases the region unless TCEs still point
    /// into it (`EBUSY`).
    pub(super) fn mm_iommu_put(&mut self, mm: Mm, id: PreregId) -> Result<(), Errno> {
        let Some(p) = self.prereg_mut(mm, id) else {
            return Err(Errno::NOENT);
        };
        if p.used == 0 {
            return Err(Errno::NOENT);
        }
        p.used -= 1;
        if p.used > 0 {
            return Ok(());
        }
        if p.mapped != 1 {
            p.used += 1;
            return Err(Errno::BUSY);
        }
        let entries = p.entries;
        if let Some(state) = self.mms.get_mut(&mm) {
            state.prereg.retain(|p| p.id != id);
        }
        self.unaccount_locked(mm, entries);
        Ok(())
    }

    /// `mm_iommu_mapped_inc`.
    pub(super) fn mm_iommu_mapped_inc(&mut self, mm: Mm, id: PreregId) -> bool {
        match self.prereg_mut(mm, id) {
            Some(p) if p.mapped > 0 => {
                p.mapped += 1;
                true
            }
            _ => false,
        }
    }

    /// `mm_iommu_mapped_dec`: never below the idle bias of 1.
    pub(super) fn mm_iommu_mapped_dec(&mut self, mm: Mm, id: PreregId) {
        if let Some(p) = self.prereg_mut(mm, id) {
            if p.mapped > 1 {
                p.mapped -= 1;
            }
        }
    }

    /// Live TCEs counted against the region of `mm` that starts at `ua` (`mapped` minus the
    /// idle bias), or `None` when no region starts there. For tests and status.
    pub fn prereg_mapped(&self, mm: Mm, ua: u64) -> Option<u64> {
        self.mms
            .get(&mm)?
            .prereg
            .iter()
            .find(|p| p.ua == ua)
            .map(|p| p.mapped.saturating_sub(1))
    }

    // ---- hardware TCE tables ---------------------------------------------------------------

    pub(super) fn hw_new(&mut self, page_shift: u32, offset: u64, size: u64) -> HwTableId {
        let id = HwTableId(self.next_id());
        self.hw_tables.insert(
            id,
            HwTable {
                page_shift,
                offset,
                size,
                entries: HwEntries::default(),
                refs: 1,
            },
        );
        id
    }

    pub(super) fn hw_get(&mut self, id: HwTableId) {
        if let Some(t) = self.hw_tables.get_mut(&id) {
            t.refs += 1;
        }
    }

    /// `iommu_tce_table_put`.
    pub(super) fn hw_put(&mut self, id: HwTableId) {
        if let Some(t) = self.hw_tables.get_mut(&id) {
            t.refs -= 1;
            if t.refs == 0 {
                self.hw_tables.remove(&id);
            }
        }
    }

    /// `iommu_tce_xchg_no_kill`: stores `new` at `entry` and returns what was there. A `new`
    /// with [`DmaDir::None`] keeps its address with no permission, as `pnv_tce_xchg` does.
    pub(super) fn hw_xchg(
        &mut self,
        id: HwTableId,
        entry: u64,
        new: Option<HwTce>,
    ) -> Option<HwTce> {
        self.hw_tables.get_mut(&id)?.entries.xchg(entry, new)
    }

    pub(super) fn hw_userspace(&self, id: HwTableId, entry: u64) -> u64 {
        self.hw_tables
            .get(&id)
            .map_or(0, |t| t.entries.userspace(entry))
    }

    pub(super) fn hw_set_userspace(&mut self, id: HwTableId, entry: u64, ua: u64) {
        if let Some(t) = self.hw_tables.get_mut(&id) {
            t.entries.set_userspace(entry, ua);
        }
    }

    /// The entry the IOMMU of `group` uses for bus address `bus_addr`: what a device's DMA would
    /// reach. `None` when no window covers the address or the entry is empty.
    pub fn iommu_entry(&self, group: u32, bus_addr: u64) -> Option<HwTce> {
        self.groups
            .get(&group)?
            .tables
            .iter()
            .flatten()
            .find_map(|id| {
                let t = self.hw_tables.get(id)?;
                let entry = bus_addr >> t.page_shift;
                (t.offset <= entry && entry < t.offset + t.size)
                    .then(|| t.entries.get(entry))
                    .flatten()
            })
    }

    /// Hypercall counters of the VM behind `vm_file` (a VM, vCPU or TCE table file).
    pub fn hcall_stats(&self, vm_file: FileId) -> Option<HcallStats> {
        let vm = match self.obj(vm_file)? {
            Obj::Vm(vm) | Obj::Vcpu(vm) => vm,
            Obj::Stt(stt) => self.stts.get(&stt)?.vm,
            _ => return None,
        };
        self.vms.get(&vm).map(|v| v.stats)
    }

    /// Hypercalls enabled in the kernel by default (`default_hcall_list` with
    /// `CONFIG_SPAPR_TCE_IOMMU`); the multi-TCE ones need `KVM_CAP_PPC_ENABLE_HCALL`.
    pub(super) fn default_hcalls() -> BTreeSet<u64> {
        [H_PUT_TCE, H_GET_TCE].into_iter().collect()
    }
}

#[cfg(test)]
mod hw_entries_tests {
    use super::*;

    fn tce(ua: u64) -> Option<HwTce> {
        Some(HwTce {
            mm: Mm(1),
            ua,
            dir: DmaDir::Bidirectional,
        })
    }

    #[test]
    fn entries_across_pages_are_found_by_range_and_emptied_by_xchg() {
        let mut entries = HwEntries::default();
        for entry in [0, 511, 512, 1023, 5000] {
            assert_eq!(entries.xchg(entry, tce(entry << 12)), None);
        }
        assert_eq!(entries.present(500, 20), [511, 512]);
        assert_eq!(entries.present(512, 1), [512]);
        assert_eq!(entries.present(1, 510), Vec::<u64>::new());
        assert_eq!(entries.present(0, u64::MAX), [0, 511, 512, 1023, 5000]);
        assert_eq!(entries.present(5000, 0), Vec::<u64>::new());
        assert_eq!(entries.get(1023), tce(1023 << 12));
        assert_eq!(entries.xchg(1023, None), tce(1023 << 12));
        assert_eq!(entries.get(1023), None);
        assert_eq!(entries.present(512, 1024), [512]);
    }

    #[test]
    fn emptying_or_clearing_an_untouched_entry_allocates_no_page() {
        let mut entries = HwEntries::default();
        assert_eq!(entries.xchg(7 << 20, None), None);
        entries.set_userspace(7 << 20, 0);
        assert!(entries.pages.is_empty());
        entries.set_userspace(3, 0x1000);
        assert_eq!((entries.userspace(3), entries.get(3)), (0x1000, None));
        assert_eq!(entries.pages.len(), 1);
    }
}
