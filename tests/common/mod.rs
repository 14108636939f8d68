//! Shared by the tests that run the real `tce-sidecar` binary: a guard that starts the daemon
//! in a fresh directory, waits for its sockets, and always stops it; plus bounded waits.
//!
//! Every blocking step is bounded. The guard's watchdog kills a daemon that outlives
//! [`WATCHDOG`], which turns any test blocked on it (a socket read, a model call) into a
//! failure instead of a hung CI job.
// Each test binary uses a different part of this module.
#![allow(dead_code)]

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::process::{kill_process, Pid, Signal};
use tce_sidecar::kernel::model::server::ModelClient;

/// The daemon under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_tce-sidecar");
/// A daemon alive this long is killed: no test of these binaries takes more than a few seconds.
pub const WATCHDOG: Duration = Duration::from_secs(60);
/// How long a daemon may take to create its sockets.
pub const READY: Duration = Duration::from_secs(10);
/// Read and write timeout of every test socket.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Who the daemon runs as when the tests run as root: the daemon needs no privilege, and the
/// tests prove it (`nobody` on Debian).
pub const DAEMON_UID: u32 = 65534;
/// The daemon's locked-memory limit: its workers have no `CAP_IPC_LOCK`, and isolated sessions
/// pin their guest RAM plus TCE tables. Only a process with `CAP_SYS_RESOURCE` may raise a hard
/// limit, and root in a container often lacks it: the limit is then the hard limit root has
/// (8 MiB by default), which the tests' guests fit in.
pub const DAEMON_MEMLOCK: u64 = 64 << 20;

/// Makes `command` start the daemon as [`DAEMON_UID`] (when this process is root) with a
/// locked-memory limit of [`DAEMON_MEMLOCK`], dying with the test thread that starts it. Returns
/// the extra options the daemon then needs: `--allow-uid` for this process, unless `extra`
/// gives one.
pub fn unprivileged(command: &mut Command, extra: &[&str]) -> Vec<String> {
    let root = rustix::process::geteuid().is_root();
    // SAFETY: the hook runs in the forked child before exec and makes only async-signal-safe
    // system calls (setrlimit, setgroups, setgid, setuid, prctl) on plain values.
    unsafe {
        command.pre_exec(move || {
            let check = |r: libc::c_int| match r {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            };
            if root {
                // Raised while still root, as far as the hard limit lets (beyond it only with
                // CAP_SYS_RESOURCE).
                let mut limit = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                check(libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit))?;
                let wanted = libc::rlimit {
                    rlim_cur: DAEMON_MEMLOCK,
                    rlim_max: DAEMON_MEMLOCK,
                };
                if libc::setrlimit(libc::RLIMIT_MEMLOCK, &wanted) != 0 {
                    limit.rlim_cur = limit.rlim_max;
                    check(libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit))?;
                }
                check(libc::setgroups(0, std::ptr::null()))?;
                check(libc::setgid(DAEMON_UID))?;
                check(libc::setuid(DAEMON_UID))?;
            }
            // After the uid change, which clears it: the daemon dies with the test thread that
            // started it, even when a failing test never reaches the guard's drop.
            check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL))
        });
    }
    let mut options = Vec::new();
    if root && !extra.contains(&"--allow-uid") {
        options.extend(["--allow-uid".to_string(), "0".to_string()]);
    }
    options
}

/// A directory of its own for one test, removed on drop.
pub struct TestDir(PathBuf);

impl TestDir {
    pub fn new(name: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        // Short: a unix socket path must fit 108 bytes.
        let path = std::env::temp_dir().join(format!("tce-{}-{n}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir(&path).expect("create the test directory");
        // The daemon, an unprivileged user, creates its sockets here.
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .expect("open the test directory to the daemon");
        Self(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Polls `done` every few milliseconds until it holds; panics after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// How the daemon gets its listening socket.
pub enum Listen {
    /// `--socket-path <dir>/sidecar.sock`: the daemon creates it; the model socket is the
    /// default `<socket-path>.model`.
    Path,
    /// `--fd N` with this listener (bound at `<dir>/sidecar.sock`) inherited as fd N.
    Fd(UnixListener),
    /// systemd socket activation: this listener as fd 3, `LISTEN_FDS=1`, `LISTEN_PID` = the
    /// daemon's pid.
    Activation(UnixListener),
}

/// A running `tce-sidecar --kernel model`, killed and reaped on drop.
pub struct Sidecar {
    child: Child,
    pub socket: PathBuf,
    pub model_socket: PathBuf,
    log: PathBuf,
    watchdog: Option<(mpsc::Sender<()>, JoinHandle<()>)>,
    fired: Arc<AtomicBool>,
    exited: Option<ExitStatus>,
    dir: TestDir,
}

impl Sidecar {
    /// `tce-sidecar --kernel model --socket-path <dir>/sidecar.sock` plus `extra`.
    pub fn start(name: &str, extra: &[&str]) -> Self {
        Self::start_with(TestDir::new(name), Listen::Path, extra)
    }

    /// The daemon on the model kernel in `dir`, listening as `listen` says, with `extra`
    /// options. Returns once its sockets exist.
    pub fn start_with(dir: TestDir, listen: Listen, extra: &[&str]) -> Self {
        let socket = dir.path().join("sidecar.sock");
        let log = dir.path().join("sidecar.log");
        let mut args: Vec<String> = vec!["--kernel".into(), "model".into()];
        let (model_socket, mut command, inherited) = match listen {
            Listen::Path => {
                args.extend(["--socket-path".into(), socket.display().to_string()]);
                (
                    dir.path().join("sidecar.sock.model"),
                    Command::new(BIN),
                    None,
                )
            }
            Listen::Fd(listener) => {
                let fd = listener.as_raw_fd();
                args.extend(["--fd".into(), fd.to_string()]);
                (
                    dir.path().join("model.sock"),
                    Command::new(BIN),
                    Some((listener, fd)),
                )
            }
            Listen::Activation(listener) => {
                // `$$` is the shell's pid, which `exec` hands to the daemon.
                let mut command = Command::new("sh");
                command
                    .arg("-c")
                    .arg(r#"LISTEN_PID=$$ exec "$0" "$@""#)
                    .arg(BIN)
                    .env("LISTEN_FDS", "1");
                (dir.path().join("model.sock"), command, Some((listener, 3)))
            }
        };
        if inherited.is_some() {
            args.extend(["--model-socket".into(), model_socket.display().to_string()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        args.extend(unprivileged(&mut command, extra));
        command
            .args(&args)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("create the daemon log"));
        let inherit = inherited
            .as_ref()
            .map(|(l, target)| (l.as_raw_fd(), *target));
        // SAFETY: the hook runs in the forked child before exec and makes only
        // async-signal-safe calls (dup2, fcntl) on plain integers; it allocates nothing.
        unsafe {
            command.pre_exec(move || {
                // The listener loses close-on-exec in the child only, so no other child this
                // test process spawns meanwhile inherits it.
                let r = match inherit {
                    None => 0,
                    Some((source, target)) if source == target => {
                        libc::fcntl(target, libc::F_SETFD, 0)
                    }
                    // dup2 leaves the new fd without close-on-exec.
                    Some((source, target)) => libc::dup2(source, target),
                };
                if r < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().expect("spawn tce-sidecar");
        // The daemon has its own copy now.
        drop(inherited);
        let fired = Arc::new(AtomicBool::new(false));
        let (stop, stopped) = mpsc::channel::<()>();
        let pid = child.id();
        let watchdog_fired = Arc::clone(&fired);
        let watchdog = std::thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(WATCHDOG) {
                watchdog_fired.store(true, Ordering::SeqCst);
                // The child is reaped only after this thread is joined, so the pid is still
                // the daemon's.
                if let Some(pid) = Pid::from_raw(pid as i32) {
                    let _ = kill_process(pid, Signal::KILL);
                }
            }
        });
        let mut sidecar = Self {
            child,
            socket,
            model_socket,
            log,
            watchdog: Some((stop, watchdog)),
            fired,
            exited: None,
            dir,
        };
        let deadline = Instant::now() + READY;
        loop {
            let socket_ready = match sidecar.listens_on_path() {
                true => sidecar.socket.exists(),
                false => true,
            };
            if socket_ready && sidecar.model_socket.exists() {
                break;
            }
            if let Some(status) = sidecar.child.try_wait().expect("poll the daemon") {
                sidecar.exited = Some(status);
                panic!("tce-sidecar exited with {status} before it was ready");
            }
            assert!(
                Instant::now() < deadline,
                "tce-sidecar not ready in {READY:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        sidecar
    }

    fn listens_on_path(&self) -> bool {
        self.model_socket.file_name() != Some("model.sock".as_ref())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A connection to the daemon's socket, with bounded reads and writes.
    pub fn connect(&self) -> UnixStream {
        let stream = UnixStream::connect(&self.socket).expect("connect to tce-sidecar");
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        stream
    }

    /// This process's handle on the daemon's model kernel.
    pub fn model(&self) -> ModelClient {
        ModelClient::connect(&self.model_socket).expect("connect to the model kernel")
    }

    /// `tce-sidecar status --socket-path <socket>`, parsed.
    pub fn status(&self) -> serde_json::Value {
        let output = run_bounded(
            Command::new(BIN)
                .arg("status")
                .arg("--socket-path")
                .arg(&self.socket),
            IO_TIMEOUT,
        );
        assert!(
            output.status.success(),
            "tce-sidecar status failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).expect("status prints JSON")
    }

    /// Sends `signal` to the daemon.
    pub fn signal(&self, signal: Signal) {
        let pid = Pid::from_raw(self.pid() as i32).expect("a child pid is positive");
        kill_process(pid, signal).expect("signal the daemon");
    }

    /// The daemon's exit status, if it exits within `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited {
                return Some(status);
            }
            if let Some(status) = self.child.try_wait().expect("poll the daemon") {
                self.exited = Some(status);
                continue;
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// What the daemon logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        if let Some((stop, watchdog)) = self.watchdog.take() {
            drop(stop);
            let _ = watchdog.join();
        }
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            if self.fired.load(Ordering::SeqCst) {
                eprintln!("the watchdog killed tce-sidecar after {WATCHDOG:?}");
            }
            eprintln!("--- tce-sidecar log ---\n{}--- end of log ---", self.log());
        }
    }
}

/// Runs `command` to completion with its output captured; panics if it takes longer than
/// `timeout` (after killing it).
pub fn run_bounded(command: &mut Command, timeout: Duration) -> std::process::Output {
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn a command");
    let pid = child.id();
    let (done, result) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let _ = done.send(child.wait_with_output());
    });
    match result.recv_timeout(timeout) {
        Ok(output) => {
            let _ = waiter.join();
            output.expect("wait for a command")
        }
        Err(_) => {
            // Not reaped yet (the waiter is still waiting), so the pid is still the child's.
            if let Some(pid) = Pid::from_raw(pid as i32) {
                let _ = kill_process(pid, Signal::KILL);
            }
            let _ = waiter.join();
            panic!("{command:?} did not finish in {timeout:?}");
        }
    }
}

/// The session entries of a status reply whose peer is this process (`tce-sidecar status`
/// lists its own session too).
pub fn sessions(status: &serde_json::Value) -> Vec<serde_json::Value> {
    let me = serde_json::Value::from(std::process::id());
    status["sessions"]
        .as_array()
        .map(|all| {
            all.iter()
                .filter(|s| s["peer_pid"] == me)
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

/// The `sidecar_registered_left` value the daemon logged when session `id` ended, if it did.
pub fn registered_left_at_end(log: &str, id: u64) -> Option<u64> {
    let marker = format!("session ended session={id} ");
    let line = log.lines().find(|l| l.contains(&marker))?;
    let value = line.split("sidecar_registered_left=").nth(1)?;
    value.split_whitespace().next()?.parse().ok()
}

/// The pid of the worker serving the session on `stream`, from a GET_STATUS asked on it (the
/// session's state is unchanged by it).
pub fn worker_pid(stream: &UnixStream) -> u32 {
    use tce_sidecar::protocol::{decode_reply, encode_request, recv_frame, send_frame, Request};
    let request = Request::GetStatus { first_session: 0 };
    let payload = encode_request(&request);
    send_frame(stream, request.code() as u32, false, &payload, &[]).expect("send GET_STATUS");
    let frame = recv_frame(stream, true).expect("the GET_STATUS reply");
    let reply = decode_reply(&frame.header, &frame.payload, frame.fds.len()).expect("a reply");
    assert_eq!(reply.status, 0, "GET_STATUS: {}", reply.text);
    let status: serde_json::Value = serde_json::from_slice(&reply.body).expect("JSON");
    let mine = &status["session"];
    let pid = status["sessions"]
        .as_array()
        .and_then(|all| all.iter().find(|s| &s["id"] == mine))
        .and_then(|s| s["worker_pid"].as_u64())
        .expect("the asking session is listed with its worker") as u32;
    assert_sandboxed(pid);
    pid
}

/// Every worker serves its session under a seccomp filter, with no_new_privs.
pub fn assert_sandboxed(pid: u32) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the worker lives");
    for (field, value) in [("Seccomp", "2"), ("NoNewPrivs", "1")] {
        let shown = status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{field}:")))
            .map(str::trim);
        assert_eq!(shown, Some(value), "worker {pid}: {field}");
    }
}

/// How many fds the daemon's listener `pid` holds for itself: the model kernel it also serves
/// keeps a stand-in for every file of the simulated kernel (`memfd:model:...`), which belong to
/// the simulation, not to the daemon.
pub fn listener_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the listener lives")
        .filter_map(Result::ok)
        .filter(|fd| {
            std::fs::read_link(fd.path())
                .map(|target| !target.to_string_lossy().starts_with("/memfd:model:"))
                .unwrap_or(false)
        })
        .count()
}

/// How many fds process `pid` has open.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the process lives")
        .count()
}

/// A VM on the daemon's model kernel with `ram` bytes of guest RAM and VFIO group `iommu_group`,
/// and its session in `mode` with `extra_features`, set up as QEMU does: negotiated, RAM added,
/// the group added as group 1 of container 0. Replies are read with [`IO_TIMEOUT`].
pub fn model_front_end(
    sidecar: &Sidecar,
    mode: tce_sidecar::kernel::OwnershipMode,
    extra_features: u64,
    iommu_group: u32,
    ram: u64,
) -> (
    tce_sidecar::client::model_vm::ModelVm,
    tce_sidecar::client::Client,
) {
    model_front_end_with(sidecar, mode, extra_features, iommu_group, ram, |k| k)
}

/// [`model_front_end`], the front-end's kernel backend being what `wrap` makes of the model's
/// (to watch the owner operations it executes, say).
pub fn model_front_end_with(
    sidecar: &Sidecar,
    mode: tce_sidecar::kernel::OwnershipMode,
    extra_features: u64,
    iommu_group: u32,
    ram: u64,
    wrap: impl FnOnce(
        Box<dyn tce_sidecar::kernel::Kernel + Send>,
    ) -> Box<dyn tce_sidecar::kernel::Kernel + Send>,
) -> (
    tce_sidecar::client::model_vm::ModelVm,
    tce_sidecar::client::Client,
) {
    use std::os::fd::AsFd;
    let mut vm = tce_sidecar::client::model_vm::ModelVm::create(&sidecar.model_socket)
        .expect("create a VM on the model");
    vm.add_ram(0, 0, ram).expect("guest RAM");
    let kernel = vm.kernel().expect("a kernel backend");
    let mut client = tce_sidecar::client::Client::connect(
        &sidecar.socket,
        mode,
        extra_features,
        wrap(Box::new(kernel)),
        Some(vm.kvm_vfio_device().unwrap()),
    )
    .expect("connect and negotiate");
    client.stream().set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let ram = &vm.ram()[0];
    client
        .add_region(ram.region, ram.memfd.as_fd())
        .expect("MEM_ADD");
    let group = vm.open_group(iommu_group).expect("open the VFIO group");
    let desc = tce_sidecar::protocol::GroupDesc {
        group_id: 1,
        container_id: 0,
        iommu_group,
    };
    client.add_group(desc, group).expect("GROUP_ADD");
    (vm, client)
}

/// The names of the checks (`backend`) or cases (`frontend`) of `tce-sidecar conformance
/// TARGET --list`, in order.
pub fn kit_names(target: &str) -> Vec<String> {
    let out = Command::new(BIN)
        .args(["conformance", target, "--list"])
        .output()
        .expect("run tce-sidecar conformance --list");
    assert!(
        out.status.success(),
        "--list: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next().map(str::to_owned))
        .collect()
}
