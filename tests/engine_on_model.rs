//! The engine driven against the model kernel, as two simulated processes: the front-end (the
//! VM's creator, QEMU's role) and the sidecar, each with its own mm. Random sessions of region,
//! group and table changes, window requests, guest hypercalls, slow-path updates, injected
//! failures and disconnects; after every step the engine's view must equal the model's, and
//! after teardown nothing may be left. Plus the seed's effect: in accelerated mode the guest's
//! TCE hypercalls complete in the kernel; in isolated mode every one reaches the sidecar.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};

use proptest::prelude::*;
use rustix::io::Errno;
use tce_sidecar::engine::{Action, FdFacts, Host, Limits, Session};
use tce_sidecar::kernel::model::server::{ModelClient, ModelServer, SharedMapping};
use tce_sidecar::kernel::model::{
    CreateSpaprTce64, HcallOutcome, Mm, ModelKernel, Platform, UserMemoryRegion, H_PUT_TCE,
    H_PUT_TCE_INDIRECT, H_STUFF_TCE, KVM_DEV_TYPE_VFIO,
};
use tce_sidecar::kernel::model_backend::ModelBackend;
use tce_sidecar::kernel::{
    to_op_result, ContainerId, GroupId, Kernel, KernelOp, Mapping, ObjectTable, Output,
    OwnershipMode, RegionId, TableId,
};
use tce_sidecar::protocol::*;

const FRONT_END: Mm = Mm(1000);
const SIDECAR: Mm = Mm(2000);
/// The model's powernv host runs 4 KiB kernel pages (the lab's Debian 6.12 kernel).
const PAGE: u64 = 4096;
const REGION_SIZE: u64 = 1 << 20;
const REGIONS: u32 = 3;
const IOMMU_GROUPS: [u32; 2] = [11, 12];
const C0: ContainerId = ContainerId(0);
/// Two guest tables: the default window at bus 0 (4 KiB pages) and a DDW at 1 << 59 (64 KiB).
const TABLES: [(u64, u32, u64); 2] = [(0, 12, 64), (1 << 59, 16, 64)];

type Objs = ObjectTable;

struct Ram {
    front_end: SharedMapping,
    sidecar: SharedMapping,
}

/// A guest table as the front-end holds it: the KVM table (accelerated) or its userspace table
/// in a memfd (isolated), mapped so the front-end can write entries the kernel did not.
struct GuestTable {
    mapping: SharedMapping,
    liobn: u64,
}

/// Counts down to an injected failure of a kernel call, on either side.
#[derive(Default)]
struct Injector {
    countdown: Option<(u32, Errno)>,
    injected: u32,
    /// A SET_SPAPR_TCE failed before KVM looked at the group: its file then warns when it
    /// leaves the kvm-vfio device, whatever the sidecar does (the kernel's behaviour).
    association_refused_early: bool,
}

impl Injector {
    fn call(
        &mut self,
        kernel: &mut ModelBackend,
        op: &KernelOp,
        objects: &Objs,
    ) -> Result<Output, Errno> {
        if let Some((n, errno)) = self.countdown.as_mut() {
            if *n == 0 {
                let errno = *errno;
                self.countdown = None;
                self.injected += 1;
                if matches!(op, KernelOp::KvmSetSpaprTce { .. }) {
                    self.association_refused_early = true;
                }
                return Err(errno);
            }
            *n -= 1;
        }
        kernel.execute(op, objects)
    }
}

struct World {
    server: ModelServer,
    mode: OwnershipMode,
    fe_model: ModelClient,
    fe_kernel: ModelBackend,
    fe: Objs,
    sc_kernel: ModelBackend,
    sc: Objs,
    kvm: OwnedFd,
    vm: OwnedFd,
    vcpu: OwnedFd,
    ram: BTreeMap<u32, Ram>,
    guest_tables: BTreeMap<u32, GuestTable>,
    session: Session,
    injector: Injector,
}

fn host() -> Host {
    Host {
        features: FEATURES_KNOWN,
        page_size: PAGE,
        limits: Limits::default(),
    }
}

impl World {
    fn new(mode: OwnershipMode) -> Self {
        let server = ModelServer::new(ModelKernel::new(Platform::powernv(), &IOMMU_GROUPS));
        let fe_model = server.handle_as(FRONT_END);
        let kvm = fe_model.open_kvm().unwrap();
        let vm = fe_model.kvm_create_vm(kvm.as_fd()).unwrap();
        let vcpu = fe_model.kvm_create_vcpu(vm.as_fd(), 0).unwrap();
        // QEMU enables the multi-TCE hypercalls in the kernel (kvmppc_spapr_enable_inkernel_multitce).
        fe_model
            .kvm_enable_hcall(vm.as_fd(), H_PUT_TCE_INDIRECT, true)
            .unwrap();
        fe_model
            .kvm_enable_hcall(vm.as_fd(), H_STUFF_TCE, true)
            .unwrap();
        let device = fe_model
            .kvm_create_device(vm.as_fd(), KVM_DEV_TYPE_VFIO, 0)
            .unwrap();
        let mut session = Session::new(host());
        let features = match mode {
            OwnershipMode::Accelerated => FEATURE_MODE_ACCELERATED,
            OwnershipMode::Isolated => FEATURE_MODE_ISOLATED,
        };
        assert!(
            matches!(session.handle(Request::SetFeatures { features }, None), Action::Reply(r) if r.status == 0)
        );
        Self {
            fe_kernel: ModelBackend::new(server.handle_as(FRONT_END)),
            sc_kernel: ModelBackend::new(server.handle_as(SIDECAR)),
            server,
            mode,
            fe_model,
            fe: Objs {
                kvm_vfio: device,
                ..Objs::default()
            },
            sc: Objs::default(),
            kvm,
            vm,
            vcpu,
            ram: BTreeMap::new(),
            guest_tables: BTreeMap::new(),
            session,
            injector: Injector::default(),
        }
    }

    /// Runs a request to its final reply, executing each side's calls as that side.
    fn request(&mut self, request: Request, fd: Option<FdFacts>) -> Reply {
        let action = self.session.handle(request, fd);
        self.drive(action).expect("a request ends in a reply")
    }

    fn drive(&mut self, mut action: Action) -> Option<Reply> {
        loop {
            match action {
                Action::Execute(ops) => {
                    let mut results = Vec::new();
                    for op in &ops {
                        let r = self.injector.call(&mut self.sc_kernel, op, &self.sc);
                        let failed = r.is_err();
                        results.push(r);
                        if failed {
                            break;
                        }
                    }
                    action = self.session.sidecar_results(results);
                }
                Action::Reply(reply) if reply.ops.is_empty() => return Some(reply),
                Action::Reply(reply) => {
                    let mut results = Vec::new();
                    for owner_op in &reply.ops {
                        let op = KernelOp::from(*owner_op);
                        let r = self.injector.call(&mut self.fe_kernel, &op, &self.fe);
                        let failed = r.is_err();
                        results.push(to_op_result(owner_op.kind(), &r).unwrap());
                        if failed {
                            break;
                        }
                    }
                    let request = Request::OpsResult {
                        transaction: reply.transaction,
                        results,
                    };
                    action = self.session.handle(request, None);
                }
                Action::Closed => return None,
            }
        }
    }

    fn add_region(&mut self, i: u32) -> Reply {
        let memfd = rustix::fs::memfd_create("guest-ram", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&memfd, REGION_SIZE).unwrap();
        let front_end = SharedMapping::map(memfd.as_fd(), REGION_SIZE as usize).unwrap();
        let sidecar = SharedMapping::map(memfd.as_fd(), REGION_SIZE as usize).unwrap();
        let desc = MemRegion {
            region_id: i,
            guest_addr: u64::from(i) * REGION_SIZE,
            size: REGION_SIZE,
            user_addr: front_end.addr(),
            mmap_offset: 0,
            page_shift: 0,
        };
        if self.ram.contains_key(&i) {
            return self.request(
                Request::MemAdd(desc),
                Some(FdFacts {
                    size: REGION_SIZE,
                    page_size: PAGE,
                }),
            );
        }
        // The front-end's memslot and mapping (QEMU's guest RAM), and the sidecar's mapping.
        self.fe_kernel
            .memory_mapped(memfd.as_fd(), 0, front_end.addr(), REGION_SIZE)
            .unwrap();
        self.sc_kernel
            .memory_mapped(memfd.as_fd(), 0, sidecar.addr(), REGION_SIZE)
            .unwrap();
        let slot = UserMemoryRegion {
            slot: i,
            flags: 0,
            guest_phys_addr: desc.guest_addr,
            memory_size: REGION_SIZE,
            userspace_addr: front_end.addr(),
        };
        self.fe_model
            .kvm_set_user_memory_region(self.vm.as_fd(), slot)
            .unwrap();
        let id = RegionId(i);
        self.fe.regions.insert(
            id,
            Mapping {
                addr: front_end.addr(),
                size: REGION_SIZE,
            },
        );
        self.sc.regions.insert(
            id,
            Mapping {
                addr: sidecar.addr(),
                size: REGION_SIZE,
            },
        );
        let reply = self.request(
            Request::MemAdd(desc),
            Some(FdFacts {
                size: REGION_SIZE,
                page_size: PAGE,
            }),
        );
        let ram = Ram { front_end, sidecar };
        if reply.status == 0 {
            self.ram.insert(i, ram);
        } else {
            self.forget_region(i, ram);
        }
        reply
    }

    /// The front-end and sidecar unmap a region and the front-end deletes its memslot.
    fn forget_region(&mut self, i: u32, ram: Ram) {
        self.fe.regions.remove(&RegionId(i));
        self.sc.regions.remove(&RegionId(i));
        self.fe_kernel
            .memory_unmapped(ram.front_end.addr())
            .unwrap();
        self.sc_kernel.memory_unmapped(ram.sidecar.addr()).unwrap();
        let slot = UserMemoryRegion {
            slot: i,
            flags: 0,
            guest_phys_addr: u64::from(i) * REGION_SIZE,
            memory_size: 0,
            userspace_addr: ram.front_end.addr(),
        };
        self.fe_model
            .kvm_set_user_memory_region(self.vm.as_fd(), slot)
            .unwrap();
    }

    fn remove_region(&mut self, i: u32) -> Reply {
        let desc = MemRegion {
            region_id: i,
            guest_addr: u64::from(i) * REGION_SIZE,
            size: REGION_SIZE,
            user_addr: self.ram.get(&i).map_or(0, |r| r.front_end.addr()),
            mmap_offset: 0,
            page_shift: 0,
        };
        let reply = self.request(Request::MemRemove(desc), None);
        if reply.status == 0 {
            if let Some(ram) = self.ram.remove(&i) {
                self.forget_region(i, ram);
            }
        }
        reply
    }

    fn add_group(&mut self, i: u32) -> Reply {
        let id = GroupId(i);
        let desc = GroupDesc {
            group_id: i,
            container_id: C0.0,
            iommu_group: IOMMU_GROUPS[i as usize],
        };
        if self.fe.groups.contains_key(&id) {
            return self.request(Request::GroupAdd(desc), None);
        }
        let fd = self.fe_model.open_vfio_group(desc.iommu_group).unwrap();
        self.sc.groups.insert(id, fd.try_clone().unwrap());
        self.fe.groups.insert(id, fd);
        let reply = self.request(Request::GroupAdd(desc), None);
        if reply.status != 0 && !self.session.state().groups.contains_key(&id) {
            self.drop_group(id);
        }
        reply
    }

    fn drop_group(&mut self, id: GroupId) {
        self.sc.groups.remove(&id);
        if let Some(fd) = self.fe.groups.remove(&id) {
            self.fe_model.close(fd.as_fd()).unwrap();
        }
    }

    fn remove_group(&mut self, i: u32) -> Reply {
        let reply = self.request(Request::GroupRemove { group_id: i }, None);
        if !self.session.state().groups.contains_key(&GroupId(i)) {
            self.drop_group(GroupId(i));
        }
        reply
    }

    fn add_table(&mut self, i: u32) -> Reply {
        let (bus_offset, page_shift, entries) = TABLES[i as usize];
        let liobn = 0x8000_0000 | u64::from(i);
        let desc = TableDesc {
            table_id: i,
            container_id: C0.0,
            liobn: liobn as u32,
            page_shift,
            bus_offset,
            entries,
        };
        let id = TableId(i);
        if self.fe.tables.contains_key(&id) {
            return self.request(
                Request::TableAdd(desc),
                Some(FdFacts {
                    size: entries * 8,
                    page_size: PAGE,
                }),
            );
        }
        let fd = match self.mode {
            OwnershipMode::Accelerated => {
                let arg = CreateSpaprTce64 {
                    liobn,
                    page_shift,
                    flags: 0,
                    offset: bus_offset >> page_shift,
                    size: entries,
                };
                self.fe_model
                    .kvm_create_spapr_tce_64(self.vm.as_fd(), arg)
                    .unwrap()
            }
            OwnershipMode::Isolated => {
                let fd = rustix::fs::memfd_create("guest-table", rustix::fs::MemfdFlags::CLOEXEC)
                    .unwrap();
                rustix::fs::ftruncate(&fd, entries * 8).unwrap();
                fd
            }
        };
        let size = rustix::fs::fstat(&fd).unwrap().st_size as u64;
        let mapping = SharedMapping::map(fd.as_fd(), (entries * 8).max(PAGE) as usize).unwrap();
        self.sc
            .tables
            .insert(id, (fd.try_clone().unwrap(), entries));
        self.fe.tables.insert(id, (fd, entries));
        let reply = self.request(
            Request::TableAdd(desc),
            Some(FdFacts {
                size,
                page_size: PAGE,
            }),
        );
        if reply.status == 0 {
            self.guest_tables.insert(i, GuestTable { mapping, liobn });
        } else {
            self.drop_table(id);
        }
        reply
    }

    fn drop_table(&mut self, id: TableId) {
        self.sc.tables.remove(&id);
        self.guest_tables.remove(&id.0);
        if let Some((fd, _)) = self.fe.tables.remove(&id) {
            if self.mode == OwnershipMode::Accelerated {
                self.fe_model.close(fd.as_fd()).unwrap();
            }
        }
    }

    fn remove_table(&mut self, i: u32) -> Reply {
        let reply = self.request(Request::TableRemove { table_id: i }, None);
        if reply.status == 0 {
            self.drop_table(TableId(i));
        }
        reply
    }

    /// The guest maps guest page `gpa` at entry `index` of table `i` with `H_PUT_TCE`; when the
    /// kernel exits to userspace, the front-end stores the entry in its table and forwards it,
    /// as QEMU's `h_put_tce` does. Returns whether the kernel completed it.
    fn guest_put_tce(&mut self, i: u32, index: u64, tce: u64) -> Option<bool> {
        let table = self.guest_tables.get(&i)?;
        let (bus_offset, page_shift, entries) = TABLES[i as usize];
        if index >= entries {
            return None;
        }
        let ioba = bus_offset + (index << page_shift);
        let outcome = self
            .fe_model
            .vcpu_hcall(self.vcpu.as_fd(), H_PUT_TCE, [table.liobn, ioba, tce, 0])
            .unwrap();
        match outcome {
            HcallOutcome::Completed { .. } => Some(true),
            HcallOutcome::Exit => {
                table.mapping.write_u64(index as usize, tce);
                let update = TceUpdate {
                    table_id: i,
                    first_index: index,
                    count: 1,
                    entries: TceEntries::Shared,
                };
                self.request(Request::TceUpdate(update), None);
                Some(false)
            }
        }
    }

    /// Stores entries in the front-end's guest-visible table (entries past its end are
    /// dropped: the engine refuses such an update anyway).
    fn write_guest_table(&self, i: u32, first: u64, values: &[u64]) {
        if let Some(table) = self.guest_tables.get(&i) {
            for (k, v) in values.iter().enumerate() {
                table.mapping.write_u64((first as usize) + k, *v);
            }
        }
    }

    fn owner(&self) -> (Mm, &ModelBackend) {
        match self.mode {
            OwnershipMode::Accelerated => (FRONT_END, &self.fe_kernel),
            OwnershipMode::Isolated => (SIDECAR, &self.sc_kernel),
        }
    }

    /// The engine's view equals the model's.
    fn check(&self) -> Result<(), TestCaseError> {
        let state = self.session.state();
        let (owner, owner_kernel) = self.owner();
        let other = if owner == FRONT_END {
            SIDECAR
        } else {
            FRONT_END
        };
        for (cid, c) in &state.containers {
            let fd = owner_kernel.container_fd(*cid);
            prop_assert_eq!(fd.is_some(), c.open, "container {} open", cid.0);
            let Some(fd) = fd else { continue };
            let file = self.server.file_of(fd).expect("a live container");
            let (mm, mut windows) = self
                .server
                .with_kernel(|k| (k.container_mm(file), k.container_windows(file)));
            let mut expected: Vec<(u64, u32, u64)> = c
                .windows
                .iter()
                .filter(|(_, w)| !w.default)
                .map(|(s, w)| (*s, w.page_shift, w.size))
                .collect();
            windows.sort_unstable();
            expected.sort_unstable();
            prop_assert_eq!(windows, expected, "windows of container {}", cid.0);
            if !c.registered.is_empty() {
                prop_assert_eq!(mm, Some(owner), "the container belongs to the owner's mm");
            }
        }
        let warnings = self.server.with_kernel(|k| k.warnings().to_vec());
        prop_assert!(
            warnings.is_empty() || self.injector.association_refused_early,
            "kernel warnings: {:?}",
            warnings
        );
        let stats = |mm| self.server.with_kernel(|k| k.mm_stats(mm));
        prop_assert_eq!(
            stats(owner).pinned_pages * PAGE,
            self.session.registered_bytes(),
            "pinned = registered"
        );
        prop_assert_eq!(
            stats(other).pinned_pages,
            0,
            "nothing pinned by the other process"
        );
        for (tid, t) in &state.tables {
            let Some((start, _)) = state.window_of(*tid) else {
                prop_assert_eq!(t.mapped.count(), 0, "no mapped entry outside a window");
                continue;
            };
            let container = ContainerId(t.desc.container_id);
            let Some(group) = state
                .groups
                .values()
                .find(|g| g.container == container && g.attached)
            else {
                continue;
            };
            for index in 0..t.desc.entries {
                let bus = start + (index << t.desc.page_shift);
                let entry = self
                    .server
                    .with_kernel(|k| k.iommu_entry(group.iommu_group, bus));
                let mapped = t.mapped.get(index);
                match self.mode {
                    OwnershipMode::Isolated => {
                        prop_assert_eq!(entry.is_some(), mapped, "table {} entry {}", tid.0, index);
                        if let Some(e) = entry {
                            prop_assert_eq!(e.mm, SIDECAR);
                        }
                    }
                    // KVM maps and unmaps in the kernel, unseen by the engine, which therefore
                    // tracks nothing; every entry is in the front-end's mm.
                    OwnershipMode::Accelerated => {
                        prop_assert!(!mapped);
                        if let Some(e) = entry {
                            prop_assert_eq!(e.mm, FRONT_END);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Disconnects, lets the sidecar tear down, then lets the front-end "exit": it closes every
    /// file it holds. Nothing may remain pinned or locked in either mm.
    fn end(mut self) -> Result<(), TestCaseError> {
        self.injector.countdown = None;
        let action = self.session.disconnect();
        prop_assert!(
            self.drive(action).is_none(),
            "teardown ends without a reply"
        );
        if self.mode == OwnershipMode::Isolated {
            let s = self.server.with_kernel(|k| k.mm_stats(SIDECAR));
            prop_assert_eq!(
                (s.pinned_pages, s.locked_vm_pages),
                (0, 0),
                "the sidecar holds nothing after teardown"
            );
            prop_assert_eq!(self.session.registered_bytes(), 0);
            prop_assert_eq!(self.session.entries_mapped(), 0);
        }
        self.fe_kernel.close_containers().unwrap();
        self.sc_kernel.close_containers().unwrap();
        for (_, fd) in std::mem::take(&mut self.fe.groups) {
            self.fe_model.close(fd.as_fd()).unwrap();
        }
        if self.mode == OwnershipMode::Accelerated {
            for (_, (fd, _)) in std::mem::take(&mut self.fe.tables) {
                self.fe_model.close(fd.as_fd()).unwrap();
            }
        }
        if let Some(device) = self.fe.kvm_vfio.take() {
            self.fe_model.close(device.as_fd()).unwrap();
        }
        for fd in [&self.vcpu, &self.vm, &self.kvm] {
            self.fe_model.close(fd.as_fd()).unwrap();
        }
        let s = self.server.with_kernel(|k| k.mm_stats(FRONT_END));
        prop_assert_eq!(
            (s.pinned_pages, s.locked_vm_pages),
            (0, 0),
            "the front-end holds nothing after exit"
        );
        let s = self.server.with_kernel(|k| k.mm_stats(SIDECAR));
        prop_assert_eq!((s.pinned_pages, s.locked_vm_pages), (0, 0));
        // The kvm-vfio device went with the front-end: no file it held may warn.
        let warnings = self.server.with_kernel(|k| k.warnings().to_vec());
        prop_assert!(
            warnings.is_empty() || self.injector.association_refused_early,
            "kernel warnings at exit: {:?}",
            warnings
        );
        Ok(())
    }
}

#[derive(Clone, Debug)]
enum Step {
    AddRegion(u32),
    RemoveRegion(u32),
    AddGroup(u32),
    RemoveGroup(u32),
    AddTable(u32),
    RemoveTable(u32),
    CreateWindow(u32),
    RemoveWindow(u32),
    Reset(Option<u32>),
    /// Inline update of table `.0` from entry `.1`: (region, page, permission bits) per entry.
    Update(u32, u64, Vec<(u32, u64, u64)>),
    Stuff(u32, u64, u32),
    GuestPut(u32, u64, u32, u64, u64),
    FailAfter(u32, i32),
}

fn step() -> impl Strategy<Value = Step> {
    let region = 0..REGIONS + 1;
    let group = 0..IOMMU_GROUPS.len() as u32;
    let table = 0..TABLES.len() as u32;
    let errno = prop::sample::select(vec![
        Errno::INVAL,
        Errno::NOMEM,
        Errno::BUSY,
        Errno::PERM,
        Errno::NOSPC,
    ]);
    prop_oneof![
        3 => region.clone().prop_map(Step::AddRegion),
        1 => region.clone().prop_map(Step::RemoveRegion),
        3 => group.clone().prop_map(Step::AddGroup),
        1 => group.prop_map(Step::RemoveGroup),
        3 => table.clone().prop_map(Step::AddTable),
        1 => table.clone().prop_map(Step::RemoveTable),
        3 => table.clone().prop_map(Step::CreateWindow),
        1 => table.clone().prop_map(Step::RemoveWindow),
        1 => prop::option::of(table.clone()).prop_map(Step::Reset),
        4 => (table.clone(), 0u64..70, prop::collection::vec((region.clone(), 0u64..300, 0u64..4), 1..8))
            .prop_map(|(t, first, entries)| Step::Update(t, first, entries)),
        1 => (table.clone(), 0u64..70, 1u32..80).prop_map(|(t, first, count)| Step::Stuff(t, first, count)),
        3 => (table, 0u64..66, region, 0u64..300, 0u64..4)
            .prop_map(|(t, index, r, page, perm)| Step::GuestPut(t, index, r, page, perm)),
        1 => (0u32..12, errno).prop_map(|(n, e)| Step::FailAfter(n, e.raw_os_error())),
    ]
}

fn tce(region: u32, page: u64, perm: u64) -> u64 {
    (u64::from(region) * REGION_SIZE + page * PAGE) | perm
}

fn run(world: &mut World, step: &Step) {
    match *step {
        Step::AddRegion(i) => drop(world.add_region(i)),
        Step::RemoveRegion(i) => drop(world.remove_region(i)),
        Step::AddGroup(i) => drop(world.add_group(i)),
        Step::RemoveGroup(i) => drop(world.remove_group(i)),
        Step::AddTable(i) => drop(world.add_table(i)),
        Step::RemoveTable(i) => drop(world.remove_table(i)),
        Step::CreateWindow(i) => drop(world.request(Request::WindowCreate { table_id: i }, None)),
        // The guest removes a window: QEMU removes it and disables the table (closing the KVM
        // table fd), so no association to the removed hardware table outlives it.
        Step::RemoveWindow(i) => {
            if world
                .request(Request::WindowRemove { table_id: i }, None)
                .status
                == 0
            {
                world.remove_table(i);
            }
        }

        // ibm,reset-pe-dma-window: QEMU removes every window and table, then enables the
        // default table again and creates its window.
        Step::Reset(default) => {
            let reply = world.request(
                Request::WindowReset {
                    container_id: 0,
                    default_table: None,
                },
                None,
            );
            if reply.status == 0 {
                for i in 0..TABLES.len() as u32 {
                    world.remove_table(i);
                }
                if let Some(d) = default {
                    if world.add_table(d).status == 0 {
                        world.request(Request::WindowCreate { table_id: d }, None);
                    }
                }
            }
        }
        // QEMU's put_tce_emu stores each entry in its table, then forwards it.
        Step::Update(t, first, ref entries) => {
            let values: Vec<u64> = entries
                .iter()
                .map(|(r, p, perm)| tce(*r, *p, *perm))
                .collect();
            world.write_guest_table(t, first, &values);
            let update = TceUpdate {
                table_id: t,
                first_index: first,
                count: values.len() as u32,
                entries: TceEntries::Inline(values),
            };
            world.request(Request::TceUpdate(update), None);
        }
        Step::Stuff(t, first, count) => {
            world.write_guest_table(t, first, &vec![0; count as usize]);
            let update = TceUpdate {
                table_id: t,
                first_index: first,
                count,
                entries: TceEntries::Stuff(0),
            };
            world.request(Request::TceUpdate(update), None);
        }
        Step::GuestPut(t, index, r, page, perm) => {
            world.guest_put_tce(t, index, tce(r, page, perm));
        }
        Step::FailAfter(n, errno) => {
            world.injector.countdown = Some((n, Errno::from_raw_os_error(errno)))
        }
    }
}

fn session_run(mode: OwnershipMode, steps: Vec<Step>) -> Result<(), TestCaseError> {
    let mut world = World::new(mode);
    for step in &steps {
        run(&mut world, step);
        world.check()?;
    }
    world.end()
}

/// Sessions usually start as QEMU's do (RAM, a group, tables, windows), each setup step kept
/// with high probability, then go random.
fn session() -> impl Strategy<Value = Vec<Step>> {
    let setup = vec![
        Step::AddRegion(0),
        Step::AddRegion(1),
        Step::AddRegion(2),
        Step::AddGroup(0),
        Step::AddGroup(1),
        Step::AddTable(0),
        Step::AddTable(1),
        Step::CreateWindow(0),
        Step::CreateWindow(1),
    ];
    let keep = prop::collection::vec(prop::bool::weighted(0.9), setup.len());
    (keep, prop::collection::vec(step(), 1..40)).prop_map(move |(keep, random)| {
        setup
            .iter()
            .zip(keep)
            .filter(|(_, k)| *k)
            .map(|(s, _)| s.clone())
            .chain(random)
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn random_sessions_accelerated_engine_matches_model(steps in session()) {
        session_run(OwnershipMode::Accelerated, steps)?;
    }

    #[test]
    fn random_sessions_isolated_engine_matches_model(steps in session()) {
        session_run(OwnershipMode::Isolated, steps)?;
    }
}

/// A set-up session: RAM, one group, both windows.
fn set_up(mode: OwnershipMode) -> World {
    let mut w = World::new(mode);
    for i in 0..REGIONS {
        assert_eq!(w.add_region(i).status, 0);
    }
    assert_eq!(w.add_group(0).status, 0);
    for i in 0..2 {
        assert_eq!(w.add_table(i).status, 0);
        let reply = w.request(Request::WindowCreate { table_id: i }, None);
        assert_eq!(reply.status, 0, "{}", reply.text);
    }
    w
}

/// The guest's TCE workload: H_PUT_TCE, H_PUT_TCE_INDIRECT (a big-endian list in guest RAM)
/// and H_STUFF_TCE on the DDW. Returns the kernel's (completed, exits) counts.
fn guest_workload(w: &mut World) -> (u64, u64) {
    let table = 1u32;
    let (bus, shift, _) = TABLES[table as usize];
    let liobn = w.guest_tables[&table].liobn;
    let mut completed = 0;
    let mut exits = 0;
    for index in 0..8 {
        match w
            .guest_put_tce(table, index, tce(1, index * 16, 3))
            .unwrap()
        {
            true => completed += 1,
            false => exits += 1,
        }
    }
    // A list of 16 TCEs in guest page 0 of region 2, big-endian as the guest writes it.
    let list_gpa = 2 * REGION_SIZE;
    for i in 0..16u64 {
        w.ram[&2]
            .front_end
            .write_u64(i as usize, tce(0, 32 + i * 16, 3).to_be());
    }
    let ioba = bus + (16 << shift);
    let outcome = w
        .fe_model
        .vcpu_hcall(
            w.vcpu.as_fd(),
            H_PUT_TCE_INDIRECT,
            [liobn, ioba, list_gpa, 16],
        )
        .unwrap();
    match outcome {
        HcallOutcome::Completed { ret, .. } => {
            assert_eq!(ret, 0);
            completed += 1;
        }
        HcallOutcome::Exit => {
            // QEMU's h_put_tce_indirect: read the list, store each entry, forward them.
            let entries: Vec<u64> = (0..16)
                .map(|i| u64::from_be(w.ram[&2].front_end.read_u64(i).unwrap()))
                .collect();
            for (i, e) in entries.iter().enumerate() {
                w.guest_tables[&table].mapping.write_u64(16 + i, *e);
            }
            let update = TceUpdate {
                table_id: table,
                first_index: 16,
                count: 16,
                entries: TceEntries::Shared,
            };
            assert_eq!(w.request(Request::TceUpdate(update), None).status, 0);
            exits += 1;
        }
    }
    let stuff = w
        .fe_model
        .vcpu_hcall(w.vcpu.as_fd(), H_STUFF_TCE, [liobn, bus, 0, 8])
        .unwrap();
    match stuff {
        HcallOutcome::Completed { ret, .. } => {
            assert_eq!(ret, 0);
            completed += 1;
        }
        HcallOutcome::Exit => {
            let update = TceUpdate {
                table_id: table,
                first_index: 0,
                count: 8,
                entries: TceEntries::Stuff(0),
            };
            assert_eq!(w.request(Request::TceUpdate(update), None).status, 0);
            exits += 1;
        }
    }
    (completed, exits)
}

#[test]
fn seed_effect_accelerated_hypercalls_complete_in_kernel() {
    let mut w = set_up(OwnershipMode::Accelerated);
    let (completed, exits) = guest_workload(&mut w);
    assert_eq!(
        (completed, exits),
        (10, 0),
        "every hypercall completed in the kernel"
    );
    assert_eq!(w.session.stats().updates_forwarded, 0);
    // The hardware entries point at the front-end's memory, mapped by KVM itself.
    let entry = w
        .server
        .with_kernel(|k| k.iommu_entry(IOMMU_GROUPS[0], (1 << 59) + (20 << 16)));
    assert_eq!(entry.map(|e| e.mm), Some(FRONT_END));
    w.check().unwrap();
    w.end().unwrap();
}

#[test]
fn seed_effect_isolated_every_hypercall_reaches_the_sidecar() {
    let mut w = set_up(OwnershipMode::Isolated);
    let (completed, exits) = guest_workload(&mut w);
    assert_eq!(
        (completed, exits),
        (0, 10),
        "every hypercall exits to userspace"
    );
    assert_eq!(w.session.stats().updates_forwarded, 10);
    assert_eq!(w.session.stats().entries_forwarded, 8 + 16 + 8);
    // Entries 16..32 mapped by the sidecar from the forwarded list; 0..8 cleared by the stuff.
    assert_eq!(w.session.entries_mapped(), 16);
    let entry = w
        .server
        .with_kernel(|k| k.iommu_entry(IOMMU_GROUPS[0], (1 << 59) + (20 << 16)));
    assert_eq!(entry.map(|e| e.mm), Some(SIDECAR));
    w.check().unwrap();
    w.end().unwrap();
}

/// Linux's sPAPR driver answers a MAP_DMA or UNMAP_DMA whose bus address its IOMMU page does not
/// align with 1 and changes nothing; the kernel backend reports that as EINVAL (PROTOCOL.md
/// §6.1), not as done.
#[test]
fn misaligned_map_and_unmap_dma_fail_with_einval() {
    let mut w = set_up(OwnershipMode::Accelerated);
    let (bus, _, _) = TABLES[1];
    let map = KernelOp::MapDma {
        container: C0,
        region: RegionId(0),
        offset: 0,
        iova: bus + PAGE / 2,
        size: 1 << 16,
        access: DmaAccess {
            read: true,
            write: true,
        },
    };
    let unmap = KernelOp::UnmapDma {
        container: C0,
        iova: bus + PAGE / 2,
        size: 1 << 16,
    };
    for op in [map, unmap] {
        assert_eq!(w.fe_kernel.execute(&op, &w.fe), Err(Errno::INVAL), "{op:?}");
    }
}
