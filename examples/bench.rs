//! Benchmarks, each printed as `name: value (target)` next to a baseline measured in the same
//! run on the same machine. `cargo run --release --example bench`.
//!
//! - P1 request latency: a 1-entry TCE update's round trip through the daemon, against a raw
//!   socketpair ping-pong of the same byte counts.
//! - P2 batched updates: 512-entry updates through the daemon (isolated mode, model kernel),
//!   the same updates applied in-process (engine + model, no socket), and the raw ping-pong;
//!   the overhead ratio (T_daemon - T_inproc) / T_ipc.
//! - P3 state memory: the engine's state for a 1 TiB DDW of 64 KiB pages with every entry
//!   mapped; the daemon's resident memory with one idle session.
//! - P4 many sessions: 256 concurrent sessions each doing P1, p50 and p99 against one session.
//!
//! Timings on the model kernel measure the sidecar's own costs: the model's MAP_DMA is far
//! cheaper than a real one, so entries per second are not a prediction for real hardware.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier, OnceLock};
use std::time::{Duration, Instant};

use tce_sidecar::client::model_vm::ModelVm;
use tce_sidecar::client::Client;
use tce_sidecar::engine::{Action, FdFacts, Host, Limits, MappedBits, Session};
use tce_sidecar::kernel::model::server::ModelServer;
use tce_sidecar::kernel::model::{Mm, ModelKernel, Platform};
use tce_sidecar::kernel::model_backend::ModelBackend;
use tce_sidecar::kernel::{
    GroupId, Kernel, Mapping, ObjectTable, OwnershipMode, RegionId, TableId,
};
use tce_sidecar::protocol::*;

type Error = Box<dyn std::error::Error>;

/// Small enough for the 8 MiB a user may lock by default: the sidecar's worker pins it in
/// isolated mode without any capability.
const RAM: u64 = 4 << 20;
const PAGE: u64 = 4096;
/// A DDW of 4 KiB pages over the RAM (the model host's pages), at bus address 0.
const ENTRIES: u64 = RAM / PAGE;

fn sidecar_binary() -> Result<PathBuf, Error> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or("no target directory")?;
    let binary = dir.join("tce-sidecar");
    if !binary.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build.args(["build", "--quiet", "--release", "--bin", "tce-sidecar"]);
        if !build.status()?.success() {
            return Err("cannot build tce-sidecar".into());
        }
    }
    Ok(binary)
}

/// Where the processes run. On a virtual machine a wake-up across CPUs costs more than the
/// work measured, and the scheduler places a single-threaded echo process and the multithreaded
/// daemon differently; so every figure is measured with a fixed placement, printed with it:
/// `BENCH_PLACEMENT=same` (default) runs everything on CPU 0; `split` runs this program on
/// CPU 0 and the daemon and the echo process on CPU 1.
fn placement() -> &'static str {
    match std::env::var("BENCH_PLACEMENT").as_deref() {
        Ok("split") => "split",
        _ => "same",
    }
}

/// A server process (the daemon, the echo), on the CPU the placement gives servers.
fn server_command(program: &Path) -> Command {
    let cpu = if placement() == "split" { "1" } else { "0" };
    let mut command = Command::new("taskset");
    command.args(["-c", cpu]).arg(program);
    command
}

/// Pins this program (and the threads it starts) to CPU 0.
fn pin_self() -> Result<(), Error> {
    let mut set = rustix::thread::CpuSet::new();
    set.set(0);
    rustix::thread::sched_setaffinity(None, &set)?;
    Ok(())
}

struct Sidecar {
    child: Child,
    socket: PathBuf,
    model: PathBuf,
    dir: PathBuf,
}

impl Sidecar {
    fn start() -> Result<Self, Error> {
        let dir = std::env::temp_dir().join(format!("tce-sidecar-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let socket = dir.join("s.sock");
        let child = server_command(&sidecar_binary()?)
            .args([
                "--kernel",
                "model",
                "--log-level",
                "error",
                "--max-sessions",
                "600",
                "--model-iommu-groups",
                "600",
                "--socket-path",
            ])
            .arg(&socket)
            .stderr(Stdio::null())
            .spawn()?;
        let model = dir.join("s.sock.model");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !model.exists() || !socket.exists() {
            if Instant::now() > deadline {
                return Err("the sidecar did not start".into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(Self {
            child,
            socket,
            model,
            dir,
        })
    }

    /// The daemon's processes: the listener and the worker of each live session.
    fn pids(&self) -> Vec<u32> {
        let listener = self.child.id();
        let workers = std::fs::read_dir("/proc").into_iter().flatten().flatten();
        let children = workers.filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            // Field 4, after the parenthesised command name, is the parent's pid.
            let ppid: u32 = stat
                .rsplit(')')
                .next()?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            (ppid == listener).then_some(pid)
        });
        std::iter::once(listener).chain(children).collect()
    }

    /// CPU time the daemon's live threads have run, in ns (`/proc/PID/task/*/schedstat` of the
    /// listener and its workers).
    fn cpu_ns(&self) -> u64 {
        self.pids()
            .into_iter()
            .flat_map(|pid| std::fs::read_dir(format!("/proc/{pid}/task")).into_iter())
            .flatten()
            .flatten()
            .map(|task| schedstat_ns(task.path().join("schedstat")))
            .sum()
    }

    /// Resident memory of the listener and of its workers, in KiB.
    fn rss_kib(&self) -> (u64, u64) {
        let rss = |pid: u32| {
            std::fs::read_to_string(format!("/proc/{pid}/status"))
                .unwrap_or_default()
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let pids = self.pids();
        (rss(pids[0]), pids[1..].iter().map(|&pid| rss(pid)).sum())
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An isolated session with RAM, one group and a window over the RAM.
fn session(sidecar: &Sidecar, iommu_group: u32) -> Result<(ModelVm, Client), Error> {
    let mut vm = ModelVm::create(&sidecar.model)?;
    vm.add_ram(0, 0, RAM)?;
    let mut client = Client::connect(
        &sidecar.socket,
        OwnershipMode::Isolated,
        0,
        Box::new(vm.kernel()?),
        Some(vm.kvm_vfio_device()?),
    )?;
    let region = vm.ram()[0].region;
    client.add_region(region, vm.ram()[0].memfd.as_fd())?;
    client.add_group(
        GroupDesc {
            group_id: 0,
            container_id: 0,
            iommu_group,
        },
        vm.open_group(iommu_group)?,
    )?;
    let table = vm.userspace_table(0x8000_0000, 12, 0, ENTRIES)?;
    client.add_table(
        TableDesc {
            table_id: 0,
            container_id: 0,
            liobn: 0x8000_0000,
            page_shift: 12,
            bus_offset: 0,
            entries: ENTRIES,
        },
        table.fd.try_clone()?,
    )?;
    client.create_window(0)?;
    Ok((vm, client))
}

fn one_entry(i: u64) -> TceUpdate {
    // Alternate map and unmap of the same entry: every update makes one kernel call.
    let value = if i % 2 == 0 {
        ((i % ENTRIES) * PAGE) | 3
    } else {
        0
    };
    TceUpdate {
        table_id: 0,
        first_index: (i / 2) % ENTRIES,
        count: 1,
        entries: TceEntries::Inline(vec![value]),
    }
}

fn batch(i: u64) -> TceUpdate {
    let first = (i * 512) % ENTRIES;
    let entries = (0..512).map(|k| ((first + k) * PAGE) | 3).collect();
    TceUpdate {
        table_id: 0,
        first_index: first,
        count: 512,
        entries: TceEntries::Inline(entries),
    }
}

fn clear(i: u64) -> TceUpdate {
    TceUpdate {
        table_id: 0,
        first_index: (i * 512) % ENTRIES,
        count: 512,
        entries: TceEntries::Stuff(0),
    }
}

/// The IPC floor for a given traffic: round trips of `request` and `reply` byte counts over a
/// socketpair with another, long-lived process echoing (this program, re-run as `bench echo`),
/// as the daemon is another long-lived process.
struct Echo {
    sock: UnixStream,
    child: Child,
    request: Vec<u8>,
    reply: Vec<u8>,
    /// Set when this side plays the front-end's system calls too (`request` is then a frame).
    front_end: Option<FrameReader>,
}

impl Echo {
    fn start(request: usize, reply: usize) -> Result<Self, Error> {
        Self::spawn("echo", vec![0; request], reply, None)
    }

    /// The floor of a back-end whose kernel is another process, as the model kernel is to the
    /// daemon's workers: the echo makes one round trip of a model call's bytes
    /// ([`MODEL_CALL`]) with a second echo process before each reply.
    fn relayed(request: usize, reply: usize) -> Result<Self, Error> {
        let (sock, theirs) = UnixStream::pair()?;
        let child = server_command(&std::env::current_exe()?)
            .args(["relay", &request.to_string(), &reply.to_string()])
            .args([MODEL_CALL.0.to_string(), MODEL_CALL.1.to_string()])
            .stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
            .spawn()?;
        let mut echo = Self {
            sock,
            child,
            request: vec![0; request],
            reply: vec![0; reply],
            front_end: None,
        };
        echo.round_trips(100)?;
        Ok(echo)
    }

    /// A ping-pong with the system calls of the front-end and the daemon and no work: this
    /// side sends `request` (a whole frame) with one `sendmsg` of header and payload, and
    /// reads the reply with one `recvmsg`, as the client does; the echo reads as the daemon
    /// reads (one `recvmsg` with room for fds), makes an `fstat` where the daemon calls the
    /// kernel, and replies with one `sendmsg`.
    fn with_syscalls(request: Vec<u8>, reply: usize) -> Result<Self, Error> {
        let reader = FrameReader::new(true).refusing_fds();
        Self::spawn("echo-syscalls", request, reply, Some(reader))
    }

    fn spawn(
        kind: &str,
        request: Vec<u8>,
        reply: usize,
        front_end: Option<FrameReader>,
    ) -> Result<Self, Error> {
        let (sock, theirs) = UnixStream::pair()?;
        let child = server_command(&std::env::current_exe()?)
            .args([kind, &request.len().to_string(), &reply.to_string()])
            .stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
            .spawn()?;
        let mut echo = Self {
            sock,
            child,
            request,
            reply: vec![0; reply],
            front_end,
        };
        echo.round_trips(100)?;
        Ok(echo)
    }

    fn round_trips(&mut self, rounds: u64) -> Result<Duration, Error> {
        let start = Instant::now();
        if let Some(reader) = &mut self.front_end {
            let (header, payload) = self.request.split_at(HEADER_SIZE);
            let code = u32::from_le_bytes(header[..4].try_into()?);
            for _ in 0..rounds {
                send_frame(&self.sock, code, false, payload, &[])?;
                reader.recv(&self.sock)?;
            }
        } else {
            for _ in 0..rounds {
                self.sock.write_all(&self.request)?;
                self.sock.read_exact(&mut self.reply)?;
            }
        }
        Ok(start.elapsed())
    }
}

impl Echo {
    /// CPU time the echo process has run, in ns.
    fn cpu_ns(&self) -> u64 {
        schedstat_ns(format!("/proc/{}/schedstat", self.child.id()))
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        let _ = self.child.wait();
    }
}

/// `bench echo REQUEST REPLY`: the far end of [`Echo`], on stdin, until end of stream.
fn echo(args: &[String]) -> Result<(), Error> {
    let n = |i: usize| -> Result<usize, Error> {
        Ok(args.get(i).ok_or("echo needs 2 numbers")?.parse()?)
    };
    let (request, reply) = (n(0)?, n(1)?);
    let mut sock = UnixStream::from(std::io::stdin().as_fd().try_clone_to_owned()?);
    let mut buf = vec![0u8; request];
    let out = vec![0u8; reply];
    while sock.read_exact(&mut buf).is_ok() {
        sock.write_all(&out)?;
    }
    Ok(())
}

/// `bench relay REQUEST REPLY KERNEL_REQUEST KERNEL_REPLY`: the far end of
/// [`Echo::relayed`]; it starts its own `bench echo` for the kernel's side.
fn relay(args: &[String]) -> Result<(), Error> {
    let n = |i: usize| -> Result<usize, Error> {
        Ok(args.get(i).ok_or("relay needs 4 numbers")?.parse()?)
    };
    let mut kernel = Echo::start(n(2)?, n(3)?)?;
    let mut sock = UnixStream::from(std::io::stdin().as_fd().try_clone_to_owned()?);
    let mut buf = vec![0u8; n(0)?];
    let out = vec![0u8; n(1)?];
    while sock.read_exact(&mut buf).is_ok() {
        kernel.round_trips(1)?;
        sock.write_all(&out)?;
    }
    Ok(())
}

/// `bench echo-syscalls REQUEST REPLY`: the far end of [`Echo::with_daemon_syscalls`].
fn echo_syscalls(args: &[String]) -> Result<(), Error> {
    let reply: usize = args.get(1).ok_or("echo needs 2 numbers")?.parse()?;
    let sock = UnixStream::from(std::io::stdin().as_fd().try_clone_to_owned()?);
    let kernel = rustix::fs::memfd_create("kernel", rustix::fs::MemfdFlags::CLOEXEC)?;
    let out = vec![0u8; reply - HEADER_SIZE];
    let mut reader = FrameReader::new(false);
    while let Ok(frame) = reader.recv(&sock) {
        rustix::fs::fstat(&kernel)?;
        send_frame(&sock, frame.header.request, true, &out, &[])?;
    }
    Ok(())
}

/// CPU time a task has run, in ns: the first field of its `schedstat` (0 if unreadable).
fn schedstat_ns(path: impl AsRef<Path>) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// CPU time the calling thread has run, in ns.
fn thread_cpu_ns() -> u64 {
    schedstat_ns("/proc/thread-self/schedstat")
}

fn frame_len(payload: usize) -> usize {
    HEADER_SIZE + payload
}

fn update_bytes(update: &TceUpdate) -> (usize, usize) {
    let request = frame_len(encode_request(&Request::TceUpdate(update.clone())).len());
    let reply = frame_len(REPLY_FIXED + 16);
    (request, reply)
}

fn per(d: Duration, n: u64) -> f64 {
    d.as_nanos() as f64 / n as f64
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Trials alternate between the measured path and its baseline, so both see the same machine
/// load; the medians are compared.
const TRIALS: usize = 15;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Bytes of one model kernel call as a worker makes it, and of its answer: MAP_DMA is a 12-byte
/// header and 6 words; the answer a header, the status and one word (UNMAP_DMA is 8 bytes
/// shorter). On Linux the call is an ioctl; the model kernel puts it behind a socket.
const MODEL_CALL: (usize, usize) = (12 + 6 * 8, 12 + 2 * 8);

/// Updates a P1 session makes before it is measured.
const WARM_UP: u64 = 1000;
/// Updates each P4 session makes before it is measured (256 sessions).
const P4_WARM_UP: u64 = 20;

fn p1(sidecar: &Sidecar) -> Result<f64, Error> {
    let (_vm, mut client) = session(sidecar, 1)?;
    let rounds = 3000;
    for i in 0..WARM_UP {
        client.tce_update(one_entry(i))?;
    }
    let (request, reply) = update_bytes(&one_entry(0));
    let mut floor = Echo::start(request, reply)?;
    let mut relayed_floor = Echo::relayed(request, reply)?;
    let frame = Request::TceUpdate(one_entry(0));
    let payload = encode_request(&frame);
    let mut request_frame = Header::new(frame.code() as u32, false, payload.len())
        .to_bytes()
        .to_vec();
    request_frame.extend_from_slice(&payload);
    let mut syscalls_floor = Echo::with_syscalls(request_frame, reply)?;
    let mut work = InProc::new()?;
    for i in 0..WARM_UP {
        work.run(Request::TceUpdate(one_entry(i)), None)?;
    }
    let mut inproc = Vec::new();
    let (mut daemon, mut ipc, mut relayed) = (Vec::new(), Vec::new(), Vec::new());
    let (mut daemon_cpu, mut echo_cpu, mut syscalls) = (Vec::new(), Vec::new(), Vec::new());
    let (mut client_cpu, mut floor_client_cpu) = (Vec::new(), Vec::new());
    for _ in 0..TRIALS {
        let (start, cpu, own) = (Instant::now(), sidecar.cpu_ns(), thread_cpu_ns());
        for i in 0..rounds {
            client.tce_update(one_entry(i))?;
        }
        daemon.push(per(start.elapsed(), rounds));
        client_cpu.push((thread_cpu_ns() - own) as f64 / rounds as f64);
        daemon_cpu.push((sidecar.cpu_ns() - cpu) as f64 / rounds as f64);
        let (cpu, own) = (floor.cpu_ns(), thread_cpu_ns());
        ipc.push(per(floor.round_trips(rounds)?, rounds));
        floor_client_cpu.push((thread_cpu_ns() - own) as f64 / rounds as f64);
        echo_cpu.push((floor.cpu_ns() - cpu) as f64 / rounds as f64);
        syscalls.push(per(syscalls_floor.round_trips(rounds)?, rounds));
        relayed.push(per(relayed_floor.round_trips(rounds)?, rounds));
        let start = Instant::now();
        for i in 0..rounds {
            work.run(Request::TceUpdate(one_entry(i)), None)?;
        }
        inproc.push(per(start.elapsed(), rounds));
    }
    let (daemon, ipc, relayed) = (median(daemon), median(ipc), median(relayed));
    // Each update makes one model kernel call from the worker: the comparable floor is the
    // relayed ping-pong.
    let ratio = daemon / relayed;
    let (daemon_cpu, echo_cpu) = (median(daemon_cpu), median(echo_cpu));
    println!(
        "P1 request latency (1-entry update through the daemon): {:.1} us",
        daemon / 1000.0
    );
    println!(
        "P1 CPU time per round trip: the daemon {:.1} us, the echo process {:.1} us",
        daemon_cpu / 1000.0,
        echo_cpu / 1000.0
    );
    println!(
        "P1 CPU time per round trip: the front-end {:.1} us, the ping-pong's {:.1} us",
        median(client_cpu) / 1000.0,
        median(floor_client_cpu) / 1000.0
    );
    println!(
        "P1 raw socketpair ping-pong ({request}+{reply} bytes): {:.1} us",
        ipc / 1000.0
    );
    let syscalls = median(syscalls);
    println!(
        "P1 the same ping-pong with the front-end's and the daemon's system calls and no work: {:.1} us ({:.2} x ipc)",
        syscalls / 1000.0,
        syscalls / ipc
    );
    println!(
        "P1 the same updates in-process (engine + model, no socket): {:.1} us",
        median(inproc) / 1000.0
    );
    println!(
        "P1 the ping-pong relayed through a second process, as a worker calls the model kernel ({}+{} bytes): {:.1} us ({:.2} x ipc)",
        MODEL_CALL.0,
        MODEL_CALL.1,
        relayed / 1000.0,
        relayed / ipc
    );
    println!("P1 latency ratio daemon/relayed ipc: {ratio:.2} (target <= 1.25)");
    Ok(ratio)
}

/// A session applied by the engine and the model in one process, as the sidecar would
/// without the socket. Front-end calls (FILE_ADD) are answered as done: the timed loops make
/// none.
struct InProc {
    session: Session,
    kernel: ModelBackend,
    objects: ObjectTable,
    _ram: tce_sidecar::kernel::linux::SharedMapping,
}

impl InProc {
    /// An isolated session with the RAM, one group, one table and its window.
    fn new() -> Result<Self, Error> {
        let server = ModelServer::new(ModelKernel::new(Platform::powernv(), &[1]));
        let model = server.handle_as(Mm(7));
        let mut kernel = ModelBackend::new(server.handle_as(Mm(7)));
        let memfd = rustix::fs::memfd_create("ram", rustix::fs::MemfdFlags::CLOEXEC)?;
        rustix::fs::ftruncate(&memfd, RAM)?;
        let map = tce_sidecar::kernel::linux::SharedMapping::map(memfd.as_fd(), RAM as usize)?;
        kernel.memory_mapped(memfd.as_fd(), 0, map.addr(), RAM)?;
        let mut objects = ObjectTable::default();
        objects.regions.insert(
            RegionId(0),
            Mapping {
                addr: map.addr(),
                size: RAM,
            },
        );
        objects.groups.insert(GroupId(0), model.open_vfio_group(1)?);
        let table = rustix::fs::memfd_create("table", rustix::fs::MemfdFlags::CLOEXEC)?;
        rustix::fs::ftruncate(&table, ENTRIES * 8)?;
        objects.tables.insert(TableId(0), (table, ENTRIES));
        let host = Host {
            features: FEATURES_KNOWN,
            page_size: PAGE,
            limits: Limits::default(),
        };
        let region = MemRegion {
            region_id: 0,
            guest_addr: 0,
            size: RAM,
            user_addr: map.addr(),
            mmap_offset: 0,
            page_shift: 0,
        };
        let mut this = Self {
            session: Session::new(host),
            kernel,
            objects,
            _ram: map,
        };
        this.run(
            Request::SetFeatures {
                features: FEATURE_MODE_ISOLATED,
            },
            None,
        )?;
        let ram = FdFacts {
            size: RAM,
            page_size: PAGE,
        };
        this.run(Request::MemAdd(region), Some(ram))?;
        this.run(
            Request::GroupAdd(GroupDesc {
                group_id: 0,
                container_id: 0,
                iommu_group: 1,
            }),
            None,
        )?;
        let desc = TableDesc {
            table_id: 0,
            container_id: 0,
            liobn: 1,
            page_shift: 12,
            bus_offset: 0,
            entries: ENTRIES,
        };
        let table = FdFacts {
            size: ENTRIES * 8,
            page_size: PAGE,
        };
        this.run(Request::TableAdd(desc), Some(table))?;
        this.run(Request::WindowCreate { table_id: 0 }, None)?;
        Ok(this)
    }

    /// Runs one request to its final reply.
    fn run(&mut self, request: Request, fd: Option<FdFacts>) -> Result<(), Error> {
        let mut action = self.session.handle(request, fd);
        loop {
            action = match action {
                Action::Execute(ops) => {
                    let results = ops
                        .iter()
                        .map(|op| self.kernel.execute(op, &self.objects))
                        .collect();
                    self.session.sidecar_results(results)
                }
                Action::Reply(reply) if reply.ops.is_empty() => {
                    return if reply.status == 0 {
                        Ok(())
                    } else {
                        Err(reply.text.into())
                    };
                }
                Action::Reply(reply) => {
                    let results = reply
                        .ops
                        .iter()
                        .map(|op| OpResult {
                            kind: op.kind(),
                            status: 0,
                            out: [0; 4],
                        })
                        .collect();
                    self.session.handle(
                        Request::OpsResult {
                            transaction: reply.transaction,
                            results,
                        },
                        None,
                    )
                }
                Action::Closed => return Ok(()),
            }
        }
    }
}

/// The same 512-entry updates and clears as P2, applied in-process on a new session.
fn inproc(rounds: u64) -> Result<Duration, Error> {
    let mut inproc = InProc::new()?;
    let start = Instant::now();
    for i in 0..rounds {
        inproc.run(Request::TceUpdate(batch(i)), None)?;
        inproc.run(Request::TceUpdate(clear(i)), None)?;
    }
    Ok(start.elapsed())
}

fn p2(sidecar: &Sidecar) -> Result<f64, Error> {
    let rounds = 300;
    let (_vm, mut client) = session(sidecar, 2)?;
    let (map_req, reply) = update_bytes(&batch(0));
    let (clear_req, _) = update_bytes(&clear(0));
    // Each update and each clear make one model kernel call (one MAP_DMA for the contiguous
    // run, one UNMAP_DMA): the floor relays each round trip through a second process.
    let (mut map_floor, mut clear_floor) = (
        Echo::relayed(map_req, reply)?,
        Echo::relayed(clear_req, reply)?,
    );
    let (mut daemon, mut inproc_t, mut ipc) = (Vec::new(), Vec::new(), Vec::new());
    let mut daemon_cpu = Vec::new();
    for _ in 0..TRIALS {
        let (start, cpu) = (Instant::now(), sidecar.cpu_ns());
        for i in 0..rounds {
            client.tce_update(batch(i))?;
            client.tce_update(clear(i))?;
        }
        daemon.push(start.elapsed().as_secs_f64());
        daemon_cpu.push((sidecar.cpu_ns() - cpu) as f64 / 1e9);
        inproc_t.push(inproc(rounds)?.as_secs_f64());
        ipc.push((map_floor.round_trips(rounds)? + clear_floor.round_trips(rounds)?).as_secs_f64());
    }
    let (daemon, inproc_t, ipc) = (median(daemon), median(inproc_t), median(ipc));
    let daemon_cpu = median(daemon_cpu);
    let entries = (rounds * 1024) as f64;
    println!(
        "P2 512-entry updates through the daemon: {:.0} entries/s",
        entries / daemon
    );
    println!(
        "P2 the daemon's own CPU time per 512-entry update and clear: {:.1} us",
        daemon_cpu * 1e6 / rounds as f64
    );
    println!(
        "P2 same updates in-process (engine + model): {:.0} entries/s",
        entries / inproc_t
    );
    println!(
        "P2 socketpair ping-pong of the same bytes, each relayed through a second process as the model kernel's calls are: {:.0} entries/s",
        entries / ipc
    );
    let ratio = (daemon - inproc_t) / ipc;
    println!(
        "P2 overhead ratio (T_daemon - T_inproc) / T_relayed_ipc: {ratio:.2} (target <= 1.25)"
    );
    Ok(ratio)
}

fn p3(sidecar: &Sidecar) -> Result<(), Error> {
    // 1 TiB of 64 KiB pages: 16 Mi entries, every one mapped.
    let entries = (1u64 << 40) >> 16;
    let mut bits = MappedBits::default();
    bits.set_range(0, entries, true);
    assert_eq!(bits.count(), entries);
    let bytes = bits.heap_bytes() + std::mem::size_of::<MappedBits>();
    println!(
        "P3 state for a fully mapped 1 TiB DDW (16 Mi entries): {:.2} MiB (target <= 4 MiB)",
        bytes as f64 / (1 << 20) as f64
    );
    let (_vm, _client) = session(sidecar, 3)?;
    let (listener, worker) = sidecar.rss_kib();
    println!(
        "P3 daemon resident memory with one idle session: listener {listener} KiB (with the \
         model kernel it serves), the session's worker {worker} KiB"
    );
    Ok(())
}

/// A P4 session, set up and warmed up: first-touch costs are not the steady state P1 measures.
fn warmed_session(sidecar: &Sidecar, iommu_group: u32) -> Result<(ModelVm, Client), Error> {
    let (vm, mut client) = session(sidecar, iommu_group)?;
    for i in 0..P4_WARM_UP {
        client.tce_update(one_entry(i))?;
    }
    Ok((vm, client))
}

/// One session's latencies: a 1-entry update every `pace`, starting at `phase` into the
/// period (an open loop, as a guest's slow path is: without pacing, 256 closed loops on 2 cores
/// measure only the run queue).
fn latencies(
    sidecar: &Sidecar,
    iommu_group: u32,
    rounds: u64,
    pace: Duration,
    phase: f64,
    start: &(Barrier, OnceLock<Instant>),
) -> Result<Vec<Duration>, Error> {
    let (barrier, epoch) = start;
    let set_up = warmed_session(sidecar, iommu_group);
    // Every thread reaches both barriers, whatever fails, so none waits forever.
    barrier.wait();
    // Phases count from one instant for all sessions, not from each thread's wake-up after
    // the barrier (hundreds of threads wake over milliseconds, in no set order, which would
    // bunch their updates). The margin lets every thread wake before its first update.
    let epoch = *epoch.get_or_init(|| Instant::now() + Duration::from_millis(20));
    let measured = set_up.and_then(|(vm, mut client)| {
        let mut samples = Vec::with_capacity(rounds as usize);
        let mut next = epoch + pace.mul_f64(phase);
        for i in 0..rounds {
            let now = Instant::now();
            if next > now {
                std::thread::sleep(next - now);
            }
            next += pace;
            let t = Instant::now();
            client.tce_update(one_entry(i))?;
            samples.push(t.elapsed());
        }
        Ok((samples, vm, client))
    });
    // Sessions end together: one ending (its teardown) must not delay another's updates.
    barrier.wait();
    measured.map(|(samples, _, _)| samples)
}

/// Latencies of `sessions` concurrent sessions sharing `rate` updates per second for
/// `seconds`, each session at its own phase within its period, as independent guests are.
fn load(
    sidecar: &Arc<Sidecar>,
    sessions: u32,
    first_group: u32,
    rate: f64,
    seconds: f64,
) -> Result<Vec<Duration>, Error> {
    let pace = Duration::from_secs_f64(f64::from(sessions) / rate);
    let rounds = (seconds * rate / f64::from(sessions)) as u64;
    let start = Arc::new((Barrier::new(sessions as usize), OnceLock::new()));
    let threads: Vec<_> = (0..sessions)
        .map(|i| {
            let (sidecar, start) = (Arc::clone(sidecar), Arc::clone(&start));
            let phase = f64::from(i) / f64::from(sessions);
            std::thread::spawn(move || {
                latencies(&sidecar, first_group + i, rounds, pace, phase, &start)
                    .map_err(|e| e.to_string())
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in threads {
        all.extend(t.join().map_err(|_| "a session thread panicked")??);
    }
    all.sort_unstable();
    Ok(all)
}

fn p4(sidecar: Arc<Sidecar>) -> Result<f64, Error> {
    // 2,560 updates/s in all (256 sessions x one per 100 ms), well within 2 cores (the
    // benchmark's own front-ends run on the same cores). The baseline is one session carrying
    // the same rate, so the figure is the cost of many sessions, not of more load.
    let (rate, seconds, sessions) = (2560.0, 8.0, 256);
    let single = load(&sidecar, 1, 4, rate, seconds)?;
    let all = load(&sidecar, sessions, 10, rate, seconds)?;
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let print = |what: String, sorted: &[Duration]| {
        let (p50, p99) = (us(percentile(sorted, 0.5)), us(percentile(sorted, 0.99)));
        println!("P4 {what}, {rate} updates/s: p50 {p50:.1} us, p99 {p99:.1} us");
    };
    print("one session".into(), &single);
    print(format!("{sessions} concurrent sessions"), &all);
    let cycling = cycle(&sidecar, sessions, 300, rate, seconds)?;
    print(
        format!("one front-end thread cycling through {sessions} sessions"),
        &cycling,
    );
    let ratio = us(percentile(&all, 0.99)) / us(percentile(&single, 0.99));
    println!("P4 p99 ratio {sessions} sessions / one: {ratio:.2} (target <= 2)");
    Ok(ratio)
}

/// Latencies of one thread sending `rate` updates per second to `sessions` sessions in turn:
/// the daemon's side of many sessions without the front-ends' threads (a diagnostic for P4).
fn cycle(
    sidecar: &Sidecar,
    sessions: u32,
    first_group: u32,
    rate: f64,
    seconds: f64,
) -> Result<Vec<Duration>, Error> {
    let mut clients = Vec::new();
    for group in first_group..first_group + sessions {
        clients.push(warmed_session(sidecar, group)?);
    }
    let pace = Duration::from_secs_f64(1.0 / rate);
    let updates = (rate * seconds) as u64;
    let mut samples = Vec::with_capacity(updates as usize);
    let mut next = Instant::now();
    for i in 0..updates {
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        }
        next += pace;
        let (_, client) = &mut clients[(i % u64::from(sessions)) as usize];
        let t = Instant::now();
        client.tce_update(one_entry(P4_WARM_UP + i / u64::from(sessions)))?;
        samples.push(t.elapsed());
    }
    samples.sort_unstable();
    Ok(samples)
}

fn main() -> Result<(), Error> {
    // `bench [p1|p2|p3|p4]...` runs the named figures only (for profiling); default all.
    let only: Vec<String> = std::env::args().skip(1).collect();
    match only.first().map(String::as_str) {
        Some("echo") => return echo(&only[1..]),
        Some("echo-syscalls") => return echo_syscalls(&only[1..]),
        Some("relay") => return relay(&only[1..]),
        _ => {}
    }
    println!(
        "machine: {} cores; placement {} (BENCH_PLACEMENT)",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        placement()
    );
    pin_self()?;
    let wanted = |name: &str| only.is_empty() || only.iter().any(|o| o == name);
    let sidecar = Arc::new(Sidecar::start()?);
    if wanted("p1") {
        p1(&sidecar)?;
    }
    if wanted("p2") {
        p2(&sidecar)?;
    }
    if wanted("p3") {
        p3(&sidecar)?;
    }
    if wanted("p4") {
        p4(Arc::clone(&sidecar))?;
    }
    println!("P5 the seed's effect in the lab guest: run by tests/lab (needs the ppc64le lab)");
    Ok(())
}
