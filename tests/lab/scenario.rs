//! The lab scenario: QEMU's part of one sidecar session, written once and played on a VM of the
//! real kernel (`examples/lab_frontend/`, inside the lab's ppc64le guest) or of the model
//! kernel (`tests/lab_on_model.rs`), with the same guest workload, so that the two kernels can
//! be compared result for result and count for count.
//!
//! One session: guest RAM, one VFIO group, one guest TCE table (a KVM table in accelerated
//! mode, a userspace table in isolated mode) and its window; then the guest's DMA workload of
//! `H_PUT_TCE_INDIRECT`, `H_STUFF_TCE` and `H_PUT_TCE`. Every hypercall KVM leaves to userspace
//! is handled as QEMU does: the front-end writes its view of the table and forwards a
//! `TCE_UPDATE`. Then an orderly teardown, after which neither process may hold locked memory
//! it did not hold before.
//!
//! The sidecar serves each session in a worker process of its own (`worker_pid` in the session's
//! GET_STATUS entry; the daemon itself where the status has none): the sidecar's locked memory
//! is the daemon's and the worker's, and in isolated mode the worker owns the container. Where the
//! VM can look at the worker (`LabVm::worker_sandbox`), it must be confined by a seccomp filter
//! with no_new_privs while it serves the session.

use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use tce_sidecar::client::Client;
use tce_sidecar::kernel::{Errno, Kernel, OwnershipMode};
use tce_sidecar::protocol::{
    GroupDesc, MemRegion, TableDesc, TceEntries, TceUpdate, FEATURE_FDS_BY_MODE,
};

pub type Error = Box<dyn std::error::Error>;

/// PAPR hypercall numbers (`arch/powerpc/include/asm/hvcall.h`).
pub const H_PUT_TCE: u64 = 0x20;
pub const H_PUT_TCE_INDIRECT: u64 = 0x13c;
pub const H_STUFF_TCE: u64 = 0x138;
pub const H_SUCCESS: i64 = 0;

/// The guest's LIOBN for its one table.
pub const LIOBN: u64 = 0x8000_0000;
/// Guest RAM: one region at guest address 0, small enough for the 8 MiB locked-memory limit a
/// user gets by default (the sidecar pins it in isolated mode, with its TCE tables).
pub const RAM_SIZE: u64 = 4 << 20;
/// The table: 256 MiB of 4 KiB IOMMU pages at bus address 0 (the default 32-bit window's place).
pub const BUS_OFFSET: u64 = 0;
pub const PAGE_SHIFT: u32 = 12;
pub const ENTRIES: u64 = (256 << 20) >> PAGE_SHIFT;
/// The workload: `BATCHES` rounds of one 512-entry `H_PUT_TCE_INDIRECT`, one `H_STUFF_TCE`
/// clearing it and one single `H_PUT_TCE` left mapped; then one `H_STUFF_TCE` clearing those.
pub const BATCHES: u64 = 32;
pub const BATCH: u64 = 512;
/// Guest pages holding the indirect lists (one per batch), and the guest RAM the TCEs map.
pub const LIST_GPA: u64 = 1 << 20;
pub const DMA_GPA: u64 = 2 << 20;
pub const DMA_SIZE: u64 = 2 << 20;

/// One hypercall of the guest program: number (r3) and arguments (r4..r7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hcall {
    pub number: u64,
    pub args: [u64; 4],
}

/// The guest's program and what it stores in its RAM first (the big-endian indirect lists), as
/// `(guest address, u64 in host order)`.
pub fn workload() -> (Vec<Hcall>, Vec<(u64, u64)>) {
    let mut program = Vec::new();
    let mut memory = Vec::new();
    let ioba = |index: u64| BUS_OFFSET + (index << PAGE_SHIFT);
    for batch in 0..BATCHES {
        let first = batch * BATCH;
        let list = LIST_GPA + batch * 4096;
        for i in 0..BATCH {
            let gpa = DMA_GPA + ((first + i) << PAGE_SHIFT) % DMA_SIZE;
            // The guest writes its list big-endian; stored as a host-order u64 of those bytes.
            memory.push((list + 8 * i, (gpa | 3).to_be()));
        }
        program.push(Hcall {
            number: H_PUT_TCE_INDIRECT,
            args: [LIOBN, ioba(first), list, BATCH],
        });
        program.push(Hcall {
            number: H_STUFF_TCE,
            args: [LIOBN, ioba(first), 0, BATCH],
        });
        let single = ENTRIES - 1 - batch;
        program.push(Hcall {
            number: H_PUT_TCE,
            args: [
                LIOBN,
                ioba(single),
                (DMA_GPA + (batch << PAGE_SHIFT)) | 3,
                0,
            ],
        });
    }
    program.push(Hcall {
        number: H_STUFF_TCE,
        args: [LIOBN, ioba(ENTRIES - BATCHES), 0, BATCHES],
    });
    (program, memory)
}

/// The confinement of a process, as its `/proc/PID/status` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sandbox {
    pub pid: u32,
    /// `Seccomp:` (2: a filter), absent when the kernel does not show it.
    pub seccomp: Option<u32>,
    /// `NoNewPrivs:` (1: set).
    pub no_new_privs: Option<u32>,
}

/// What a front-end needs of its VM, on the real kernel or on the model.
pub trait LabVm {
    /// The guest RAM region (mapped in this process) and its memfd.
    fn ram(&self) -> (MemRegion, BorrowedFd<'_>);
    /// Stores a host-order u64 at guest address `gpa`.
    fn write_ram(&self, gpa: u64, value: u64);
    /// The host-order u64 at guest address `gpa`.
    fn read_ram(&self, gpa: u64) -> u64;
    /// A copy of the kvm-vfio device fd, for the client.
    fn kvm_vfio_device(&self) -> Result<OwnedFd, Error>;
    /// The kernel backend that executes owner operations as this process.
    fn kernel(&self) -> Result<Box<dyn Kernel + Send>, Error>;
    /// The IOMMU group number of the passed-through device.
    fn iommu_group(&self) -> u32;
    /// Opens the VFIO group (QEMU keeps this file; the client sends a copy).
    fn open_group(&mut self) -> Result<OwnedFd, Error>;
    /// Makes the guest's table: a KVM TCE table (accelerated) or a userspace memfd table
    /// (isolated), kept mapped by the VM. Returns a copy of its fd for TABLE_ADD.
    fn make_table(&mut self, mode: OwnershipMode) -> Result<OwnedFd, Error>;
    /// Stores entry `index` in the front-end's view of the table.
    fn write_table(&self, index: u64, tce: u64);
    /// Loads the guest program.
    fn load(&mut self, program: &[Hcall]) -> Result<(), Error>;
    /// Runs the guest until a hypercall exits to userspace (returned) or the program ends
    /// (`None`).
    fn run(&mut self) -> Result<Option<Hcall>, Error>;
    /// The return value of the exit just handled, as the guest will see it in r3.
    fn complete(&mut self, ret: i64);
    /// r3 after each hypercall of the program, as the guest stored it.
    fn results(&self) -> Result<Vec<i64>, Error>;
    /// Locked memory of process `pid`, in bytes (`VmLck`).
    fn locked_bytes(&self, pid: u32) -> Result<u64, Error>;
    /// The refusals, asserted from a process that is neither the VM's creator nor the
    /// container's owner: `(SET_SPAPR_TCE, container call)`; `None` when this VM cannot check.
    fn refusals(&mut self, container_owner: u32) -> Result<Option<(Errno, Errno)>, Error>;
    /// Closes every file of the session's objects (group, table, kvm-vfio device); the VM
    /// itself may stay.
    fn close_objects(&mut self) -> Result<(), Error>;
    /// Whether the group can be opened again and attached to a new container, then released.
    fn group_reattachable(&mut self) -> Result<(), Error>;
    /// The confinement of the worker serving the session (`worker_pid` from its status entry,
    /// `None` when the entry has none), asked once the session has done its work: `None` when
    /// this VM does not check it, `Some(Err)` when it cannot.
    fn worker_sandbox(&self, worker_pid: Option<u32>) -> Option<Result<Sandbox, String>> {
        let _ = worker_pid;
        None
    }
}

/// What one session did and saw.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub hypercalls: u64,
    pub in_kernel: u64,
    pub exits: u64,
    pub forwarded: u64,
    pub maps: u64,
    pub unmaps: u64,
    /// The first hypercall (index in the program, r3) that did not return `H_SUCCESS`.
    pub first_failure: Option<(usize, i64)>,
    /// Locked bytes of (front-end, sidecar): at the start, with the window, at the end.
    pub locked_start: (u64, u64),
    pub locked_during: (u64, u64),
    pub locked_end: (u64, u64),
    pub refusals: Option<(Errno, Errno)>,
    pub reattached: bool,
    /// Wall time of the guest's workload, exits and their forwarding included.
    pub workload: Duration,
    /// The part of it spent handling exits: the front-end's table writes and the TCE_UPDATE
    /// round trips (the sidecar's MAP_DMA and UNMAP_DMA in isolated mode).
    pub forwarding: Duration,
    /// The worker that served the session, from the status (`None`: the daemon itself).
    pub worker_pid: Option<u32>,
    /// The worker's confinement while it served the session (`None`: not checked on this VM).
    pub sandbox: Option<Result<Sandbox, String>>,
    /// Failures the front-end found after the session (e.g. how its worker ended).
    pub later_failures: Vec<String>,
}

impl Outcome {
    /// The checks of the lab, as failure messages (empty: PASS).
    pub fn failures(&self, mode: OwnershipMode) -> Vec<String> {
        let mut f = Vec::new();
        let mut expect = |ok: bool, what: String| {
            if !ok {
                f.push(what);
            }
        };
        expect(
            self.first_failure.is_none(),
            format!(
                "hypercall (index, r3) {:?} did not return H_SUCCESS",
                self.first_failure
            ),
        );
        expect(
            self.in_kernel + self.exits == self.hypercalls,
            format!(
                "in_kernel {} + exits {} != hypercalls {}",
                self.in_kernel, self.exits, self.hypercalls
            ),
        );
        match mode {
            OwnershipMode::Accelerated => {
                expect(
                    self.in_kernel * 100 >= self.hypercalls * 99,
                    format!(
                        "only {} of {} in the kernel",
                        self.in_kernel, self.hypercalls
                    ),
                );
                expect(
                    self.locked_during.0 >= self.locked_start.0 + RAM_SIZE,
                    format!(
                        "front-end locked {:?} -> {:?}: RAM not registered by it",
                        self.locked_start, self.locked_during
                    ),
                );
            }
            OwnershipMode::Isolated => {
                expect(
                    self.in_kernel == 0 && self.forwarded == self.exits,
                    format!(
                        "in_kernel {} forwarded {} exits {}",
                        self.in_kernel, self.forwarded, self.exits
                    ),
                );
                expect(self.maps > 0, "no MAP_DMA".into());
                expect(
                    self.locked_during.1 >= self.locked_start.1 + RAM_SIZE,
                    format!(
                        "sidecar locked {:?} -> {:?}: RAM not registered by it",
                        self.locked_start, self.locked_during
                    ),
                );
            }
        }
        expect(
            self.locked_end == self.locked_start,
            format!(
                "locked memory {:?} at start, {:?} at end",
                self.locked_start, self.locked_end
            ),
        );
        if let Some((eio, eperm)) = self.refusals {
            expect(
                eio == Errno::IO,
                format!("SET_SPAPR_TCE from another process: {eio:?}, not EIO"),
            );
            expect(
                eperm == Errno::PERM,
                format!("container call from a non-owner: {eperm:?}, not EPERM"),
            );
        }
        expect(self.reattached, "group not re-attachable".into());
        match &self.sandbox {
            None => {}
            Some(Err(e)) => expect(false, format!("worker sandbox: {e}")),
            Some(Ok(s)) => expect(
                s.seccomp == Some(2) && s.no_new_privs == Some(1),
                format!(
                    "worker pid {} has Seccomp {} and NoNewPrivs {}, not 2 and 1",
                    s.pid,
                    s.seccomp.map_or("(none)".into(), |v| v.to_string()),
                    s.no_new_privs.map_or("(none)".into(), |v| v.to_string())
                ),
            ),
        }
        f.extend(self.later_failures.iter().cloned());
        f
    }
}

fn mode_name(mode: OwnershipMode) -> &'static str {
    match mode {
        OwnershipMode::Accelerated => "accelerated",
        OwnershipMode::Isolated => "isolated",
    }
}

/// The machine-readable summary line of a session.
pub fn summary(machine: &str, mode: OwnershipMode, outcome: &Result<Outcome, String>) -> String {
    let name = mode_name(mode);
    match outcome {
        Ok(o) => {
            let failures = o.failures(mode);
            let refusals = match o.refusals {
                Some((eio, eperm)) => {
                    format!(" eio={} eperm={}", eio.raw_os_error(), eperm.raw_os_error())
                }
                None => String::new(),
            };
            let worker = match &o.sandbox {
                Some(Ok(s)) => format!(
                    " worker_pid={} seccomp={} no_new_privs={}",
                    s.pid,
                    s.seccomp.map_or("none".into(), |v| v.to_string()),
                    s.no_new_privs.map_or("none".into(), |v| v.to_string())
                ),
                _ => String::new(),
            };
            format!(
                "LAB machine={machine} mode={name} result={} in_kernel={} exits={} maps={} unmaps={} forwarded={} hypercalls={}{refusals} reattached={}{worker} workload_us={} forwarding_us={}{}",
                if failures.is_empty() { "PASS" } else { "FAIL" },
                o.in_kernel,
                o.exits,
                o.maps,
                o.unmaps,
                o.forwarded,
                o.hypercalls,
                o.reattached,
                o.workload.as_micros(),
                o.forwarding.as_micros(),
                if failures.is_empty() { String::new() } else { format!(" why=\"{}\"", failures.join("; ")) },
            )
        }
        Err(e) => format!("LAB machine={machine} mode={name} result=FAIL why=\"{e}\""),
    }
}

/// The hypercall an exit stands for, handled as QEMU does: the front-end's view of the table is
/// written first, then the update is forwarded. Returns what the guest sees.
fn handle_exit<V: LabVm>(vm: &V, client: &mut Client, h: &Hcall) -> Result<i64, Error> {
    let [liobn, ioba, third, npages] = h.args;
    if liobn != LIOBN || ioba.checked_sub(BUS_OFFSET).is_none() {
        return Err(format!("exit for an unknown table: {h:?}").into());
    }
    let first = (ioba - BUS_OFFSET) >> PAGE_SHIFT;
    let (count, entries) = match h.number {
        H_PUT_TCE => {
            vm.write_table(first, third);
            (1, TceEntries::Shared)
        }
        H_PUT_TCE_INDIRECT => {
            for i in 0..npages {
                vm.write_table(first + i, u64::from_be(vm.read_ram(third + 8 * i)));
            }
            (npages, TceEntries::Shared)
        }
        H_STUFF_TCE => {
            for i in 0..npages {
                vm.write_table(first + i, third);
            }
            (npages, TceEntries::Stuff(third))
        }
        _ => return Err(format!("unexpected exit: {h:?}").into()),
    };
    let body = client.tce_update(TceUpdate {
        table_id: 0,
        first_index: first,
        count: count as u32,
        entries,
    })?;
    Ok(body.h_status)
}

/// This process's session in the sidecar's status (GET_STATUS).
fn own_session(client: &mut Client) -> Result<serde_json::Value, Error> {
    let status: serde_json::Value = serde_json::from_slice(&client.status()?)?;
    let me = std::process::id();
    status["sessions"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["peer_pid"] == me))
        .cloned()
        .ok_or_else(|| "no session of this process in the sidecar's status".into())
}

fn worker_pid(session: &serde_json::Value) -> Option<u32> {
    session["worker_pid"]
        .as_u64()
        .and_then(|p| u32::try_from(p).ok())
}

/// Waits up to 5 s for `check` to hold (the sidecar ends a session on its own thread).
fn eventually<T: PartialEq + Copy>(
    mut read: impl FnMut() -> Result<T, Error>,
    want: T,
) -> Result<T, Error> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let v = read()?;
        if v == want || Instant::now() > deadline {
            return Ok(v);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One session of `mode` with the sidecar at `socket` (process `sidecar_pid`).
pub fn run_session<V: LabVm>(
    vm: &mut V,
    socket: &Path,
    sidecar_pid: u32,
    mode: OwnershipMode,
) -> Result<Outcome, Error> {
    let me = std::process::id();
    let front_end_start = vm.locked_bytes(me)?;
    let mut client = Client::connect(
        socket,
        mode,
        FEATURE_FDS_BY_MODE,
        vm.kernel()?,
        Some(vm.kvm_vfio_device()?),
    )?;
    let worker = worker_pid(&own_session(&mut client)?).filter(|w| *w != sidecar_pid);
    // The sidecar's locked memory: the daemon's and its worker's (none once the worker is gone).
    let locked = |vm: &V| -> Result<(u64, u64), Error> {
        let worker = worker.map_or(0, |w| vm.locked_bytes(w).unwrap_or(0));
        Ok((vm.locked_bytes(me)?, vm.locked_bytes(sidecar_pid)? + worker))
    };
    let mut o = Outcome {
        locked_start: (front_end_start, locked(vm)?.1),
        worker_pid: worker,
        ..Outcome::default()
    };
    let (region, memfd) = vm.ram();
    client.add_region(region, memfd)?;
    let group = GroupDesc {
        group_id: 0,
        container_id: 0,
        iommu_group: vm.iommu_group(),
    };
    let group_fd = vm.open_group()?;
    client.add_group(group, group_fd)?;
    let table = TableDesc {
        table_id: 0,
        container_id: 0,
        liobn: LIOBN as u32,
        page_shift: PAGE_SHIFT,
        bus_offset: BUS_OFFSET,
        entries: ENTRIES,
    };
    let table_fd = vm.make_table(mode)?;
    client.add_table(table, table_fd)?;
    let window = client.create_window(0)?;
    if window.start_addr != BUS_OFFSET {
        return Err(format!("window at {:#x}, not {BUS_OFFSET:#x}", window.start_addr).into());
    }
    o.locked_during = locked(vm)?;
    let owner = match mode {
        OwnershipMode::Accelerated => me,
        OwnershipMode::Isolated => worker.unwrap_or(sidecar_pid),
    };
    o.refusals = vm.refusals(owner)?;

    let (program, memory) = workload();
    for (gpa, value) in memory {
        vm.write_ram(gpa, value);
    }
    vm.load(&program)?;
    let started = Instant::now();
    while let Some(h) = vm.run()? {
        o.exits += 1;
        let handling = Instant::now();
        let ret = handle_exit(vm, &mut client, &h)?;
        o.forwarding += handling.elapsed();
        vm.complete(ret);
    }
    o.workload = started.elapsed();
    let results = vm.results()?;
    o.hypercalls = program.len() as u64;
    o.in_kernel = o.hypercalls - o.exits;
    o.first_failure = if results.len() == program.len() {
        results
            .iter()
            .copied()
            .enumerate()
            .find(|(_, r)| *r != H_SUCCESS)
    } else {
        Some((results.len(), i64::MIN))
    };
    let session = own_session(&mut client)?;
    let counter = |name: &str| session["counters"][name].as_u64().unwrap_or_default();
    o.forwarded = counter("updates_forwarded");
    o.maps = counter("maps");
    o.unmaps = counter("unmaps");
    // The worker has done the session's work and still serves it.
    o.sandbox = vm.worker_sandbox(worker_pid(&session));

    // Orderly teardown, as QEMU does at machine exit.
    client.remove_window(0)?;
    client.remove_table(0)?;
    client.remove_group(0)?;
    client.remove_region(region)?;
    drop(client);
    vm.close_objects()?;
    let start = o.locked_start;
    o.locked_end = eventually(|| locked(vm), start)?;
    o.reattached = {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match vm.group_reattachable() {
                Ok(()) => break true,
                Err(e) if Instant::now() > deadline => {
                    eprintln!("group not re-attachable: {e}");
                    break false;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    };
    Ok(o)
}
