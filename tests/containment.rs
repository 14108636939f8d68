//! Containment, against the real `tce-sidecar --kernel model` binary: a hostile or broken
//! front-end can hurt only its own session. Each hostile act gets a clear error (or ends only
//! its own connection), another live session of the same daemon still answers, and the
//! daemon's fd count is what it was. Workers killed in the middle of a transaction end only
//! their sessions, the listener logs and counts how, and the kernel releases what they held.

mod common;

use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

use common::{
    listener_fds, model_front_end, open_fds, sessions, wait_until, worker_pid, Sidecar, IO_TIMEOUT,
};
use rustix::fs::{ftruncate, memfd_create, MemfdFlags};
use rustix::io::Errno;
use rustix::process::{kill_process, Pid, Signal};
use tce_sidecar::client::model_vm::ModelVm;
use tce_sidecar::client::Client;
use tce_sidecar::kernel::shared_memory::{sealed_memfd, SharedMapping};
use tce_sidecar::kernel::OwnershipMode;
use tce_sidecar::protocol::{
    decode_reply, encode_request, recv_frame, send_frame, FdRule, GroupDesc, MemRegion, Reply,
    Request, TableDesc, TceEntries, TceUpdate, FEATURE_FDS_BY_MODE,
};

const RAM: u64 = 1 << 20;
const PAGE_SHIFT: u32 = 12;
const CONTAINER: u32 = 0;
/// 1 Mi entries declared; the fds below hold far fewer.
const DECLARED: u64 = 1 << 20;

/// One VM with RAM and one VFIO group in a session of `mode`, set up as QEMU does.
struct FrontEnd {
    vm: ModelVm,
    client: Client,
}

impl FrontEnd {
    fn set_up(sidecar: &Sidecar, mode: OwnershipMode, extra: u64, iommu_group: u32) -> Self {
        let (vm, client) = model_front_end(sidecar, mode, extra, iommu_group, RAM);
        Self { vm, client }
    }

    fn stream(&self) -> &UnixStream {
        self.client.stream()
    }

    /// A live session answers.
    fn answers(&mut self) {
        self.client
            .get_features()
            .expect("the other session answers");
    }
}

/// One request sent as is, and its reply.
fn raw(stream: &UnixStream, request: &Request, fd: Option<BorrowedFd<'_>>) -> Reply {
    let fds: Vec<BorrowedFd<'_>> = fd.into_iter().collect();
    send_frame(
        stream,
        request.code() as u32,
        false,
        &encode_request(request),
        &fds,
    )
    .expect("send");
    let frame = recv_frame(stream, true).expect("a reply, not a closed connection");
    decode_reply(&frame.header, &frame.payload, frame.fds.len()).expect("a well-formed reply")
}

fn table_add(table_id: u32, liobn: u32, entries: u64) -> Request {
    Request::TableAdd(TableDesc {
        table_id,
        container_id: CONTAINER,
        liobn,
        page_shift: PAGE_SHIFT,
        bus_offset: 0,
        entries,
    })
}

fn shared_update(table_id: u32, first_index: u64, count: u32) -> Request {
    Request::TceUpdate(TceUpdate {
        table_id,
        first_index,
        count,
        entries: TceEntries::Shared,
    })
}

fn assert_refused(reply: &Reply, errno: Errno, words: &str) {
    assert_eq!(reply.status, -errno.raw_os_error(), "{}", reply.text);
    assert!(reply.text.contains(words), "{}", reply.text);
}

fn unsealed_memfd(size: u64) -> OwnedFd {
    let fd = memfd_create("hostile", MemfdFlags::CLOEXEC).unwrap();
    ftruncate(&fd, size).unwrap();
    fd
}

/// Runs `hostile` in a session of `mode` while a bystander session of the same daemon lives,
/// and checks what every hostile class must leave: the bystander answers, the hostile
/// session's worker holds no fd of a refused request, and once the hostile session is gone the
/// listener holds the fds it held before it came.
fn contained(name: &str, mode: OwnershipMode, hostile: impl FnOnce(&mut FrontEnd)) {
    contained_with(name, mode, FEATURE_FDS_BY_MODE, hostile)
}

/// [`contained`], the hostile session negotiating `extra` features beyond its mode.
fn contained_with(
    name: &str,
    mode: OwnershipMode,
    extra: u64,
    hostile: impl FnOnce(&mut FrontEnd),
) {
    let sidecar = Sidecar::start(name, &[]);
    let mut bystander = FrontEnd::set_up(&sidecar, mode, FEATURE_FDS_BY_MODE, 1);
    let listener = listener_fds(sidecar.pid());
    let mut attacker = FrontEnd::set_up(&sidecar, mode, extra, 2);
    let worker = worker_pid(attacker.stream());
    assert_only_needed_fds(worker);
    let worker_fds = open_fds(worker);
    hostile(&mut attacker);
    assert_eq!(open_fds(worker), worker_fds, "the worker kept a refused fd");
    attacker.answers();
    bystander.answers();
    drop(attacker);
    wait_until("the hostile session ends", IO_TIMEOUT, || {
        sessions(&sidecar.status()).len() == 1
    });
    // The model kernel's server (a thread of the listener) closes the dead worker's and the
    // VM's connections when it reads their end.
    wait_until("the listener holds the fds it held", IO_TIMEOUT, || {
        listener_fds(sidecar.pid()) == listener
    });
    bystander.answers();
}

/// A worker holds only what its session needs, whatever its listener inherited: stdin and
/// stdout on /dev/null, stderr (the log), the memfds the front-end sent (guest RAM, and on the
/// model kernel the stand-ins of its files), and sockets: the connection (and the copy that
/// SIGTERM shuts down), the query and status channels, the model kernel's socket, and the pair
/// that carries signals to the thread that handles them.
fn assert_only_needed_fds(worker: u32) {
    let mut sockets = 0;
    for entry in std::fs::read_dir(format!("/proc/{worker}/fd")).unwrap() {
        let entry = entry.unwrap();
        let fd: u32 = entry.file_name().to_string_lossy().parse().unwrap();
        let target = std::fs::read_link(entry.path()).unwrap();
        let target = target.to_string_lossy();
        match fd {
            0 | 1 => assert_eq!(target, "/dev/null"),
            2 => assert!(target.ends_with("sidecar.log"), "{target}"),
            _ if target.starts_with("socket:") => sockets += 1,
            _ if target.starts_with("/memfd:") => {}
            _ => panic!("worker {worker} holds fd {fd}: {target}"),
        }
    }
    assert_eq!(sockets, 7, "worker {worker}'s sockets");
}

#[test]
fn isolated_memfds_must_be_sealed_and_large_enough() {
    contained("iso-memfd", OwnershipMode::Isolated, |fe| {
        // Guest RAM that could be shrunk under the sidecar's mapping.
        let region = MemRegion {
            region_id: 7,
            guest_addr: 1 << 30,
            size: 4096,
            user_addr: 1 << 40,
            mmap_offset: 0,
            page_shift: 0,
        };
        let reply = raw(
            fe.stream(),
            &Request::MemAdd(region),
            Some(unsealed_memfd(4096).as_fd()),
        );
        assert_refused(&reply, Errno::PERM, "F_SEAL_SHRINK");
        // Sealed, but smaller than the region.
        let small = sealed_memfd("small", 4096).unwrap();
        let region = MemRegion {
            size: 8192,
            ..region
        };
        let reply = raw(fe.stream(), &Request::MemAdd(region), Some(small.as_fd()));
        assert_refused(&reply, Errno::INVAL, "8192 are needed");
        // The case: a 4 KiB table memfd, later truncated, then a SHARED TCE_UPDATE. An
        // unsealed one is refused at TABLE_ADD; a sealed one cannot be truncated.
        let table = unsealed_memfd(4096);
        let reply = raw(
            fe.stream(),
            &table_add(1, 0x8000_0001, 4),
            Some(table.as_fd()),
        );
        assert_refused(&reply, Errno::PERM, "F_SEAL_SHRINK");
        ftruncate(&table, 0).unwrap();
        let reply = raw(fe.stream(), &shared_update(1, 0, 4), None);
        assert!(reply.status < 0, "no table 1: {}", reply.text);
        let sealed = sealed_memfd("table", 4096).unwrap();
        assert_eq!(ftruncate(&sealed, 0), Err(Errno::PERM));
        // A sealed table smaller than it declares.
        let reply = raw(
            fe.stream(),
            &table_add(2, 0x8000_0002, DECLARED),
            Some(sealed.as_fd()),
        );
        assert_refused(&reply, Errno::INVAL, "are needed");
    });
}

#[test]
fn accelerated_table_fd_must_be_a_kvm_table_as_large_as_declared() {
    contained("acc-table", OwnershipMode::Accelerated, |fe| {
        // A memfd claiming to be a KVM table, truncated after TABLE_ADD in the case.
        let fake = sealed_memfd("not-a-kvm-table", 4096).unwrap();
        let reply = raw(
            fe.stream(),
            &table_add(1, 0x8000_0001, 4),
            Some(fake.as_fd()),
        );
        assert_refused(&reply, Errno::BADF, "not a KVM TCE table");
        let fake = unsealed_memfd(4096);
        let reply = raw(
            fe.stream(),
            &table_add(1, 0x8000_0001, 4),
            Some(fake.as_fd()),
        );
        assert_refused(&reply, Errno::BADF, "not a KVM TCE table");
        // A real KVM table of 512 entries declared as 1 Mi entries; then the update past its
        // pages that used to raise SIGBUS.
        let table = fe.vm.kvm_table(0x8000_0002, PAGE_SHIFT, 0, 512).unwrap();
        let reply = raw(
            fe.stream(),
            &table_add(2, 0x8000_0002, DECLARED),
            Some(table.fd.as_fd()),
        );
        assert_refused(&reply, Errno::INVAL, "fewer than 1048576 entries");
        let reply = raw(fe.stream(), &shared_update(2, 0xF_FFFC, 4), None);
        assert!(reply.status < 0, "no table 2: {}", reply.text);
    });
}

fn memfds_held(worker: u32) -> usize {
    std::fs::read_dir(format!("/proc/{worker}/fd"))
        .unwrap()
        .filter(|entry| {
            let target = std::fs::read_link(entry.as_ref().unwrap().path()).unwrap();
            target.to_string_lossy().starts_with("/memfd:")
        })
        .count()
}

/// With FDS_BY_MODE an accelerated worker is sent no guest RAM and no group file: after
/// MEM_ADD and GROUP_ADD it holds no memfd (the model's files are memfd stand-ins) until a
/// TABLE_ADD sends the KVM table it reads. Without the feature it holds both.
#[test]
fn accelerated_with_fds_by_mode_holds_only_table_fds() {
    let sidecar = Sidecar::start("acc-lean", &[]);
    let every = FrontEnd::set_up(&sidecar, OwnershipMode::Accelerated, 0, 1);
    assert_eq!(every.client.fd_rule(), FdRule::Every);
    assert_eq!(memfds_held(worker_pid(every.stream())), 2, "RAM and group");
    let mut lean = FrontEnd::set_up(&sidecar, OwnershipMode::Accelerated, FEATURE_FDS_BY_MODE, 2);
    assert_eq!(lean.client.fd_rule(), FdRule::TablesOnly);
    let worker = worker_pid(lean.stream());
    assert_eq!(memfds_held(worker), 0);
    let table = lean.vm.kvm_table(0x8000_0002, PAGE_SHIFT, 0, 512).unwrap();
    lean.client
        .add_table(
            TableDesc {
                table_id: 1,
                container_id: CONTAINER,
                liobn: 0x8000_0002,
                page_shift: PAGE_SHIFT,
                bus_offset: 0,
                entries: 512,
            },
            table.fd,
        )
        .expect("TABLE_ADD");
    assert_eq!(memfds_held(worker), 1, "the table");
    lean.client.create_window(1).expect("WINDOW_CREATE");
    lean.answers();
}

#[test]
fn accelerated_guest_ram_is_never_mapped_so_shrinking_it_harms_nothing() {
    contained_with("acc-ram", OwnershipMode::Accelerated, 0, |fe| {
        // Without FDS_BY_MODE the memfd of guest RAM travels. Unsealed: accelerated mode never
        // maps it in the sidecar (the front-end registers its own addresses), so it is taken,
        // and shrinking it later makes nothing of the sidecar fault.
        let ram = unsealed_memfd(RAM);
        let mapping = SharedMapping::map(ram.as_fd(), RAM as usize).unwrap();
        let region = MemRegion {
            region_id: 7,
            guest_addr: 1 << 30,
            size: RAM,
            user_addr: mapping.addr(),
            mmap_offset: 0,
            page_shift: 0,
        };
        fe.client.add_region(region, ram.as_fd()).expect("MEM_ADD");
        drop(mapping);
        ftruncate(&ram, 0).unwrap();
        fe.answers();
        fe.client.remove_region(region).expect("MEM_REMOVE");
    });
}

/// Kills the worker of a session in the middle of a transaction: a raw GROUP_ADD of a second
/// group opens one (the front-end's GROUP_SET_CONTAINER), which is never answered. Returns the
/// worker's pid.
fn kill_mid_transaction(fe: &mut FrontEnd, iommu_group: u32, signal: Signal) -> u32 {
    let worker = worker_pid(fe.stream());
    let group = fe.vm.open_group(iommu_group).unwrap();
    let request = Request::GroupAdd(GroupDesc {
        group_id: 2,
        container_id: CONTAINER,
        iommu_group,
    });
    let sent = (fe.client.fd_rule() == FdRule::Every).then_some(group.as_fd());
    let reply = raw(fe.stream(), &request, sent);
    assert_ne!(
        reply.transaction, 0,
        "a transaction is open: {}",
        reply.text
    );
    let pid = Pid::from_raw(worker as i32).unwrap();
    kill_process(pid, signal).unwrap();
    if signal == Signal::SEGV {
        // Rust's runtime catches SIGSEGV to report stack overflows: a SIGSEGV that is not its
        // own guard page's fault restores the default action and returns, so a signal sent from
        // outside is survived once. The second acts as a real fault does.
        std::thread::sleep(std::time::Duration::from_millis(50));
        let _ = kill_process(pid, signal);
    }
    worker
}

/// The connection of a session whose worker died ends: end of stream, no reply.
fn connection_ends(fe: &FrontEnd) {
    let request = Request::GetFeatures;
    let _ = send_frame(
        fe.stream(),
        request.code() as u32,
        false,
        &encode_request(&request),
        &[],
    );
    let frame = recv_frame(fe.stream(), true);
    assert!(
        frame.is_err(),
        "the dead worker's session ended: {:?}",
        frame.map(|f| decode_reply(&f.header, &f.payload, 0))
    );
}

#[test]
fn workers_killed_mid_transaction_end_only_their_sessions() {
    let sidecar = Sidecar::start("killed", &[]);
    let model = sidecar.model();
    let mut isolated = FrontEnd::set_up(&sidecar, OwnershipMode::Isolated, FEATURE_FDS_BY_MODE, 1);
    let mut accelerated =
        FrontEnd::set_up(&sidecar, OwnershipMode::Accelerated, FEATURE_FDS_BY_MODE, 2);
    let mut killed = FrontEnd::set_up(&sidecar, OwnershipMode::Accelerated, FEATURE_FDS_BY_MODE, 3);
    let mut faulted =
        FrontEnd::set_up(&sidecar, OwnershipMode::Accelerated, FEATURE_FDS_BY_MODE, 4);
    let pinning = FrontEnd::set_up(&sidecar, OwnershipMode::Isolated, FEATURE_FDS_BY_MODE, 5);
    let pinning_worker = worker_pid(pinning.stream());
    let held = model.mm_stats(Some(pinning_worker)).unwrap();
    assert_eq!(
        held.pinned_pages << 12,
        RAM,
        "the isolated worker pins its guest's RAM"
    );

    kill_mid_transaction(&mut killed, 6, Signal::KILL);
    kill_mid_transaction(&mut faulted, 7, Signal::SEGV);
    kill_process(Pid::from_raw(pinning_worker as i32).unwrap(), Signal::KILL).unwrap();
    connection_ends(&killed);
    connection_ends(&faulted);
    connection_ends(&pinning);

    // The listener saw each end, logged its signal and counts it; the others go on.
    wait_until("the listener counts the deaths", IO_TIMEOUT, || {
        let deaths = &sidecar.status()["daemon"]["worker_deaths"];
        deaths["SIGKILL"] == 2 && deaths["SIGSEGV"] == 1
    });
    let log = sidecar.log();
    assert!(
        log.contains("signal=SIGKILL") && log.contains("signal=SIGSEGV"),
        "{log}"
    );
    assert_eq!(sessions(&sidecar.status()).len(), 2);

    // The kernel released what the isolated worker held: its pinned memory and its container,
    // whose group a new session can take.
    let gone = model.mm_stats(Some(pinning_worker)).unwrap();
    assert_eq!(
        (gone.locked_vm_pages, gone.pinned_pages, gone.prereg_regions),
        (0, 0, 0)
    );
    drop(pinning);
    let mut successor = FrontEnd::set_up(&sidecar, OwnershipMode::Isolated, FEATURE_FDS_BY_MODE, 5);
    successor.answers();

    // The survivors finish their work: a table and its window each, then an orderly end.
    for (fe, group) in [(&mut isolated, 1u64), (&mut accelerated, 2)] {
        let liobn = 0x8000_0000 | group;
        let table = match fe.client.mode() {
            OwnershipMode::Accelerated => fe.vm.kvm_table(liobn, PAGE_SHIFT, 0, 64),
            OwnershipMode::Isolated => fe.vm.userspace_table(liobn, PAGE_SHIFT, 0, 64),
        }
        .unwrap();
        let desc = TableDesc {
            table_id: 1,
            container_id: CONTAINER,
            liobn: liobn as u32,
            page_shift: PAGE_SHIFT,
            bus_offset: 0,
            entries: 64,
        };
        fe.client
            .add_table(desc, table.fd.try_clone().unwrap())
            .unwrap();
        fe.client.create_window(1).expect("WINDOW_CREATE");
        fe.client.remove_window(1).unwrap();
        fe.client.remove_table(1).unwrap();
        fe.client.remove_group(1).unwrap();
    }
    drop((isolated, accelerated, killed, faulted, successor));
}

/// Makes worker `pid` call a libc function, through gdb: the worker runs it itself, under its
/// own sandbox, with nothing added to the daemon for the test.
fn make_worker_call(pid: u32, call: &str) -> String {
    let output = common::run_bounded(
        std::process::Command::new("gdb")
            .args(["-batch", "-nx", "-p", &pid.to_string()])
            // gdb may stumble when its inferior dies under it: no core file of gdb then.
            .args(["-iex", "maint set internal-error corefile no"])
            .args(["-ex", "set language c", "-ex", &format!("call {call}")]),
        IO_TIMEOUT,
    );
    String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr)
}

#[test]
fn a_system_call_outside_the_list_kills_the_worker_and_only_it() {
    let gdb = std::process::Command::new("gdb").arg("--version").output();
    if !gdb.is_ok_and(|o| o.status.success()) {
        // Straight to stderr: the test harness would hide a println of a passing test.
        let _ = writeln!(
            std::io::stderr(),
            "SKIP: the seccomp kill of a worker (no gdb; tests/setup/test-tools.sh installs it)"
        );
        return;
    }
    // Some hypervisors refuse ptrace's register writes (gdb: "Couldn't write extended state
    // status"), so gdb cannot make a call in any process: try one in a bystander first.
    let mut probe = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .expect("sleep");
    let answer = make_worker_call(probe.id(), "(int)getpid()");
    let _ = probe.kill();
    let _ = probe.wait();
    if !answer.contains(&format!("= {}", probe.id())) {
        let why = answer.lines().rfind(|l| !l.starts_with('[')).unwrap_or("");
        let _ = writeln!(
            std::io::stderr(),
            "SKIP: the seccomp kill of a worker (gdb cannot make a call in a process on this \
             machine: {why})"
        );
        return;
    }
    let sidecar = Sidecar::start("seccomp", &[]);
    let mut bystander = FrontEnd::set_up(&sidecar, OwnershipMode::Isolated, FEATURE_FDS_BY_MODE, 1);
    let mut target = FrontEnd::set_up(&sidecar, OwnershipMode::Accelerated, FEATURE_FDS_BY_MODE, 2);
    let worker = worker_pid(target.stream());
    // A call on the list: the worker makes it and goes on serving.
    let allowed = make_worker_call(worker, "(int)getpid()");
    assert!(allowed.contains(&format!("= {worker}")), "{allowed}");
    target.answers();
    // uname(2) is not on the list: the filter kills the worker (what gdb prints about its
    // inferior dying varies; the listener's count is the proof).
    let forbidden = make_worker_call(worker, "(int)uname(0)");
    connection_ends(&target);
    wait_until("the listener counts the kill", IO_TIMEOUT, || {
        sidecar.status()["daemon"]["worker_deaths"]["SIGSYS"] == 1
    });
    assert!(
        !std::path::Path::new(&format!("/proc/{worker}")).exists(),
        "{forbidden}"
    );
    assert!(sidecar.log().contains("signal=SIGSYS"));
    bystander.answers();
}

/// A worker that does not answer (stopped here) is left out of status replies, which still
/// come: the listener waits for all workers at once, within the asking worker's own deadline.
#[test]
fn a_stuck_worker_is_left_out_of_status_and_delays_no_other_session() {
    let sidecar = Sidecar::start("stuck", &[]);
    let mut asker = FrontEnd::set_up(&sidecar, OwnershipMode::Accelerated, FEATURE_FDS_BY_MODE, 1);
    let stuck = FrontEnd::set_up(&sidecar, OwnershipMode::Isolated, FEATURE_FDS_BY_MODE, 2);
    let stuck_worker = worker_pid(stuck.stream());
    let pid = Pid::from_raw(stuck_worker as i32).unwrap();
    kill_process(pid, Signal::STOP).unwrap();
    // kill(2) only queues the signal: wait until the worker has stopped.
    wait_until("the worker stops", IO_TIMEOUT, || {
        std::fs::read_to_string(format!("/proc/{stuck_worker}/stat")).is_ok_and(|stat| {
            stat.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.starts_with(" T"))
        })
    });
    let status: serde_json::Value =
        serde_json::from_slice(&asker.client.status().expect("GET_STATUS answers")).unwrap();
    let listed: Vec<u64> = status["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["worker_pid"].as_u64())
        .collect();
    assert!(!listed.contains(&u64::from(stuck_worker)), "{status}");
    assert_eq!(status["daemon"]["sessions"], 2, "{status}");
    asker.answers();
    kill_process(pid, Signal::CONT).unwrap();
    let mut stuck = stuck;
    stuck.answers();
}
