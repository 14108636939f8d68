//! `tce-sidecar libvirt-hook NAME OP SUBOP EXTRA`: libvirt's `qemu.d` hook, the domain's XML on
//! stdin. For a domain whose metadata asks for a sidecar it starts one instance before QEMU
//! (`prepare begin`), stops it once QEMU is gone (`release end`), and refuses migration; any
//! other domain and operation is left alone. It never calls back into libvirt, which would
//! deadlock: everything it needs is in the XML and its configuration.

use std::fs::{DirBuilder, OpenOptions};
use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Resource, Rlimit, Signal};

use super::config::{user_ids, HookConfig};
use super::domain::Domain;
use crate::kernel::OwnershipMode;
use crate::protocol::{decode_reply, encode_request, recv_frame, send_frame, Request};

/// How long a new sidecar has to answer its first request.
const START_DEADLINE: Duration = Duration::from_secs(10);
/// How long a sidecar has to exit after SIGTERM before it gets SIGKILL.
const STOP_DEADLINE: Duration = Duration::from_secs(5);

/// The files of one domain's instance.
struct Instance {
    socket: PathBuf,
    pid_file: PathBuf,
    /// The model kernel's socket directory, owned by the sidecar's user (`kernel = model`).
    model_dir: PathBuf,
    log: PathBuf,
}

impl Instance {
    fn of(domain: &Domain, config: &HookConfig) -> Self {
        let dir = &config.socket_dir;
        Self {
            socket: dir.join(format!("{}.sock", domain.uuid)),
            pid_file: dir.join(format!("{}.pid", domain.uuid)),
            model_dir: dir.join(format!("{}.model.d", domain.uuid)),
            log: config.log_dir.join(format!("{}.log", domain.name)),
        }
    }
}

/// Runs the hook for `args` (`NAME OP SUBOP EXTRA`) and the domain XML `xml`. An error is the
/// message libvirt shows (in `virsh start`'s error for `prepare`).
pub fn run(args: &[String], xml: &str, config_path: &Path) -> Result<(), String> {
    let [name, op, subop, ..] = args else {
        return Err("usage: libvirt-hook NAME OP SUBOP EXTRA, the domain XML on stdin".into());
    };
    // Parse only for the operations that act: libvirt also calls hooks with no XML worth reading.
    let acts = matches!(
        (op.as_str(), subop.as_str()),
        ("prepare", "begin") | ("release", "end") | ("migrate", "begin")
    );
    if !acts {
        return Ok(());
    }
    let domain = Domain::parse(xml).map_err(|e| format!("domain {name}: {e}"))?;
    let Some(mode) = domain.sidecar else {
        return Ok(());
    };
    let config = HookConfig::load(config_path)?;
    match (op.as_str(), subop.as_str()) {
        ("prepare", "begin") => start(&domain, mode, &config),
        ("release", "end") => stop(&domain, &config),
        _ => Err(format!(
            "domain {name} uses a tce-sidecar: it cannot migrate (QEMU blocks the migration of \
             VFIO devices on a sidecar-backed container)"
        )),
    }
}

/// The locked memory an isolated sidecar needs: all guest RAM, and in each container (at most one
/// per hostdev) the tables of QEMU's default window (1 GiB of 4 KiB pages) and of a DDW over the
/// RAM in 64 KiB pages, each table counted twice (the table and its userspace view). README,
/// "Running without root".
pub fn isolated_memlock(max_memory: u64, hostdevs: usize) -> u64 {
    const PAGE: u64 = 64 << 10;
    let table = |entries: u64| 2 * (8 * entries).div_ceil(PAGE) * PAGE;
    let per_container = table((1 << 30) >> 12) + table(max_memory >> 16);
    max_memory.saturating_add(per_container.saturating_mul(hostdevs.max(1) as u64))
}

fn io(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> String {
    move |e| format!("{what}: {e}")
}

/// Creates `dir` and its parents with `mode`, if missing.
fn create_dir(dir: &Path, mode: u32) -> Result<(), String> {
    DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .map_err(io(format!("cannot create {}", dir.display())))
}

fn start(domain: &Domain, mode: OwnershipMode, config: &HookConfig) -> Result<(), String> {
    let fail = |why: String| format!("cannot start the sidecar of domain {}: {why}", domain.name);
    let instance = Instance::of(domain, config);
    let (uid, gid) = user_ids(&config.user).map_err(fail)?;
    let (qemu_uid, qemu_gid) = match domain.qemu_ids {
        Some(ids) => ids,
        None => user_ids(&config.qemu_user).map_err(fail)?,
    };
    if let Some(pid) = running(&instance, uid) {
        return Err(fail(format!("one already runs (pid {pid})")));
    }
    create_dir(&config.socket_dir, 0o755).map_err(fail)?;
    // The socket is made here, as root, for QEMU's user alone; the sidecar inherits it.
    let listener = crate::daemon::bind(&instance.socket)
        .map_err(|e| format!("cannot create its socket: {e}"))
        .map_err(fail)?;
    let chown = |path: &Path, uid: u32, gid: u32| {
        rustix::fs::chown(
            path,
            Some(rustix::fs::Uid::from_raw(uid)),
            Some(rustix::fs::Gid::from_raw(gid)),
        )
        .map_err(|e| fail(format!("cannot give {} to uid {uid}: {e}", path.display())))
    };
    chown(&instance.socket, qemu_uid, qemu_gid)?;
    create_dir(&config.log_dir, 0o750).map_err(fail)?;
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(&instance.log)
        .map_err(io(format!("cannot open {}", instance.log.display())))
        .map_err(fail)?;
    // The listener must survive exec in the child (its fd number is passed on).
    rustix::io::fcntl_setfd(listener.as_fd(), rustix::io::FdFlags::empty())
        .map_err(|e| fail(format!("cannot pass the socket on: {e}")))?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&listener);
    let binary = std::env::current_exe()
        .map_err(io("cannot find this program"))
        .map_err(fail)?;
    let mut command = Command::new(binary);
    command
        .arg("--fd")
        .arg(fd.to_string())
        .args(["--allow-uid", &qemu_uid.to_string(), "--allow-uid", "0"])
        .args(["--kernel", &config.kernel]);
    if config.kernel == "model" {
        DirBuilder::new()
            .mode(0o700)
            .create(&instance.model_dir)
            .or_else(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => Ok(()),
                _ => Err(e),
            })
            .map_err(io(format!(
                "cannot create {}",
                instance.model_dir.display()
            )))
            .map_err(fail)?;
        chown(&instance.model_dir, uid, gid)?;
        command
            .arg("--model-socket")
            .arg(instance.model_dir.join("kernel.sock"));
    }
    let stderr = log
        .try_clone()
        .map_err(io("cannot duplicate the log"))
        .map_err(fail)?;
    // Its own process group: nothing libvirt sends to the hook's group reaches it; its output
    // goes to the log, never to libvirt's pipes (libvirt waits for those to close).
    command
        .uid(uid)
        .gid(gid)
        .process_group(0)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(stderr);
    let mut child = command
        .spawn()
        .map_err(io("cannot run the sidecar"))
        .map_err(fail)?;
    let pid = child.id();
    let started = (|| {
        if mode == OwnershipMode::Isolated {
            let limit = isolated_memlock(domain.max_memory, domain.hostdevs);
            let both = Rlimit {
                current: Some(limit),
                maximum: Some(limit),
            };
            rustix::process::prlimit(Pid::from_raw(pid as i32), Resource::Memlock, both)
                .map_err(|e| format!("cannot set its locked-memory limit to {limit} bytes: {e}"))?;
        }
        std::fs::write(&instance.pid_file, format!("{pid}\n"))
            .map_err(io(format!("cannot write {}", instance.pid_file.display())))?;
        wait_until_it_answers(&instance, &mut child)
    })();
    drop(listener);
    if let Err(why) = started {
        let _ = child.kill();
        let _ = child.wait();
        remove_files(&instance);
        return Err(fail(why));
    }
    Ok(())
}

/// Asks the new sidecar for its features until it answers, it exits, or the deadline passes.
fn wait_until_it_answers(instance: &Instance, child: &mut Child) -> Result<(), String> {
    let deadline = Instant::now() + START_DEADLINE;
    loop {
        if let Some(status) = child.try_wait().map_err(io("cannot watch the sidecar"))? {
            return Err(format!("it exited ({status}): {}", log_tail(&instance.log)));
        }
        match answers(&instance.socket) {
            Ok(()) => return Ok(()),
            Err(why) if Instant::now() > deadline => {
                return Err(format!(
                    "it did not answer within {} s ({why}): {}",
                    START_DEADLINE.as_secs(),
                    log_tail(&instance.log)
                ))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn answers(socket: &Path) -> Result<(), String> {
    let stream = std::os::unix::net::UnixStream::connect(socket).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    let request = Request::GetFeatures;
    send_frame(
        &stream,
        request.code() as u32,
        false,
        &encode_request(&request),
        &[],
    )
    .map_err(|e| e.to_string())?;
    let frame = recv_frame(&stream, true).map_err(|e| e.to_string())?;
    let reply =
        decode_reply(&frame.header, &frame.payload, frame.fds.len()).map_err(|e| e.to_string())?;
    if reply.status < 0 {
        return Err(reply.text);
    }
    Ok(())
}

/// The last lines of a sidecar's log, for an error message.
fn log_tail(log: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut file) = std::fs::File::open(log) {
        let _ = file.read_to_string(&mut text);
    }
    let lines: Vec<&str> = text.lines().rev().take(3).collect();
    match lines.is_empty() {
        true => format!("see {}", log.display()),
        false => lines.into_iter().rev().collect::<Vec<_>>().join(" | "),
    }
}

/// The pid of the instance's sidecar if it still runs: the pid file names a live process of the
/// sidecar's user (a pid reused by anything else does not count).
fn running(instance: &Instance, uid: u32) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(&instance.pid_file)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
    };
    let alive = field("State:").is_some_and(|s| !s.starts_with('Z') && !s.starts_with('X'));
    let owned = field("Uid:")
        .and_then(|ids| ids.split_whitespace().next())
        .is_some_and(|real| real == uid.to_string());
    (alive && owned).then_some(pid)
}

fn remove_files(instance: &Instance) {
    let _ = std::fs::remove_file(&instance.socket);
    let _ = std::fs::remove_file(&instance.pid_file);
    let _ = std::fs::remove_dir_all(&instance.model_dir);
}

fn stop(domain: &Domain, config: &HookConfig) -> Result<(), String> {
    let instance = Instance::of(domain, config);
    let uid = user_ids(&config.user)?.0;
    if let Some(pid) = running(&instance, uid) {
        let pid = Pid::from_raw(pid as i32).ok_or("pid 0")?;
        let _ = rustix::process::kill_process(pid, Signal::TERM);
        let deadline = Instant::now() + STOP_DEADLINE;
        while running(&instance, uid).is_some() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if running(&instance, uid).is_some() {
            let _ = rustix::process::kill_process(pid, Signal::KILL);
        }
    }
    remove_files(&instance);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn isolated_memlock_counts_ram_and_the_tables_of_each_container() {
        // 16 GiB: the README's example, 16 GiB + 4 MiB + 4 MiB for one container.
        let gib16 = 16 << 30;
        assert_eq!(isolated_memlock(gib16, 1), gib16 + (4 << 20) + (4 << 20));
        assert_eq!(isolated_memlock(gib16, 0), isolated_memlock(gib16, 1));
        assert_eq!(isolated_memlock(gib16, 2), gib16 + 2 * (8 << 20));
    }

    #[test]
    fn other_domains_and_operations_are_left_alone() {
        let plain = "<domain type='kvm'><name>vm</name><uuid>6f1e0a44-58f6-4a45-9b5e-3a0b3c1d2e4f</uuid></domain>";
        let args = |op: &str, sub: &str| vec!["vm".into(), op.into(), sub.into(), "-".into()];
        let none = Path::new("/nonexistent/libvirt.conf");
        for (op, sub) in [
            ("prepare", "begin"),
            ("release", "end"),
            ("migrate", "begin"),
        ] {
            assert_eq!(run(&args(op, sub), plain, none), Ok(()), "{op} {sub}");
        }
        // Operations the hook does not act on do not even read the XML.
        assert_eq!(run(&args("started", "begin"), "not xml", none), Ok(()));
        assert!(run(&args("prepare", "begin"), "not xml", none).is_err());
    }

    #[test]
    fn migration_of_a_sidecar_domain_is_refused() {
        let xml = "<domain><name>vm</name><uuid>6f1e0a44-58f6-4a45-9b5e-3a0b3c1d2e4f</uuid>\
                   <metadata><tce:sidecar xmlns:tce='urn:x-tce-sidecar:libvirt:1' mode='isolated'/></metadata></domain>";
        let args: Vec<String> = ["vm", "migrate", "begin", "-"].map(String::from).to_vec();
        let err = run(&args, xml, Path::new("/nonexistent/libvirt.conf")).unwrap_err();
        assert!(err.contains("cannot migrate"), "{err}");
    }
}
