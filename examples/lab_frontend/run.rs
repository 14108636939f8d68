//! The lab run: the real sidecar as a separate process and the scenario's session per mode.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tce_sidecar::kernel::OwnershipMode;

use crate::arg;
use crate::scenario::{self, Error};
use crate::vm::{first_word, status_field, RealVm};

/// The running kernel's upstream version, e.g. `6.12.57` for `6.12.57+deb12-powerpc64le`.
fn kernel_version() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|r| {
            r.trim()
                .split(['+', '-'])
                .next()
                .unwrap_or_default()
                .to_owned()
        })
        .unwrap_or_else(|_| "unknown".into())
}

struct Sidecar {
    child: Child,
    binary: PathBuf,
    socket: PathBuf,
}

impl Sidecar {
    /// Starts the sidecar, as `user` (uid, gid) if given, allowing this process's uid.
    fn start(binary: &Path, dir: &Path, user: Option<(u32, u32)>) -> Result<Self, Error> {
        std::fs::create_dir_all(dir)?;
        let socket = dir.join("sidecar.sock");
        let _ = std::fs::remove_file(&socket);
        let mut command = Command::new(binary);
        command.args(["--kernel", "linux", "--log-level", "warn", "--socket-path"]);
        command.arg(&socket);
        if let Some((uid, gid)) = user {
            use std::os::unix::process::CommandExt;
            std::os::unix::fs::chown(dir, Some(uid), Some(gid))?;
            // The child drops its supplementary groups, then takes the gid and the uid.
            command.uid(uid).gid(gid);
            command
                .arg("--allow-uid")
                .arg(rustix::process::getuid().as_raw().to_string());
        }
        let child = command.spawn()?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            if Instant::now() > deadline {
                return Err("the sidecar did not create its socket".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(Self {
            child,
            binary: binary.to_owned(),
            socket,
        })
    }

    /// The daemon's status, asked with `tce-sidecar status`.
    fn status(&self) -> Result<serde_json::Value, Error> {
        let out = Command::new(&self.binary)
            .arg("status")
            .arg("--socket-path")
            .arg(&self.socket)
            .stderr(Stdio::inherit())
            .output()?;
        if !out.status.success() {
            return Err(format!("tce-sidecar status: {}", out.status).into());
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// How the worker of an ended session ended: it must be gone (reaped) within 5 s, and the
    /// daemon's `worker_deaths` (abnormal ends) must be empty. Returns the failures.
    fn worker_end(&self, worker: u32) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let started = Instant::now();
        // present until the daemon has reaped it
        let state = || {
            std::fs::read_to_string(format!("/proc/{worker}/status"))
                .ok()
                .map(|s| status_field(&s, "State:").unwrap_or("?").to_owned())
        };
        while state().is_some() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some(state) = state() {
            let why = if state.starts_with('Z') {
                format!("worker {worker} exited but was not reaped by the daemon within 5 s")
            } else {
                format!("worker {worker} still running ({state}) 5 s after its session ended")
            };
            println!("WORKER-END pid={worker} result=FAIL why=\"{why}\"");
            return vec![why];
        }
        let gone_ms = started.elapsed().as_millis();
        // the daemon records an abnormal end as it reaps the worker
        std::thread::sleep(Duration::from_millis(100));
        let deaths = match self.status() {
            Ok(s) => s["daemon"]["worker_deaths"].clone(),
            Err(e) => {
                println!("WORKER-END pid={worker} result=FAIL why=\"{e}\"");
                return vec![format!("status after the session: {e}")];
            }
        };
        let bad: Vec<String> = deaths
            .as_object()
            .map(|m| m.iter().map(|(how, n)| format!("{how}: {n}")).collect())
            .unwrap_or_default();
        println!(
            "WORKER-END pid={worker} gone_after_ms={gone_ms} worker_deaths={deaths} result={}",
            if bad.is_empty() { "PASS" } else { "FAIL" }
        );
        bad.into_iter()
            .map(|b| format!("a worker ended by {b}"))
            .collect()
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let _ = self.child.wait();
    }
}

pub(crate) fn run(args: &[String]) -> Result<bool, Error> {
    let machine = arg(args, "--machine")?;
    let group = PathBuf::from(arg(args, "--group")?);
    let binary = PathBuf::from(arg(args, "--sidecar")?);
    let modes = match arg(args, "--mode").ok().as_deref() {
        None => vec![OwnershipMode::Accelerated, OwnershipMode::Isolated],
        Some("accelerated") => vec![OwnershipMode::Accelerated],
        Some("isolated") => vec![OwnershipMode::Isolated],
        Some(other) => return Err(format!("unknown mode {other}").into()),
    };
    let user = match arg(args, "--sidecar-user").ok() {
        None => None,
        Some(u) => {
            let (uid, gid) = u.split_once(':').ok_or("--sidecar-user takes UID:GID")?;
            Some((uid.parse()?, gid.parse()?))
        }
    };
    let kernel = kernel_version();
    let sidecar = Sidecar::start(&binary, Path::new("/tmp/tce-lab"), user)?;
    let pid = sidecar.child.id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let memlock = std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Max locked memory"))
        .map(|l| l.split_whitespace().skip(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    println!(
        "lab: sidecar pid {pid} on {}, uid {} gid {}, locked-memory limit (soft hard) {memlock}",
        sidecar.socket.display(),
        first_word(status_field(&status, "Uid:")),
        first_word(status_field(&status, "Gid:")),
    );
    let mut pass = true;
    for mode in modes {
        let started = Instant::now();
        let outcome = RealVm::create(&group)
            .and_then(|mut vm| scenario::run_session(&mut vm, &sidecar.socket, pid, mode));
        let mut outcome = outcome.map_err(|e| e.to_string());
        if let Ok(o) = &mut outcome {
            if let Some(worker) = o.worker_pid {
                o.later_failures = sidecar.worker_end(worker);
            }
            println!(
                "lab: {mode:?}: locked (front-end, sidecar) start {:?} during {:?} end {:?}; {} ms",
                o.locked_start,
                o.locked_during,
                o.locked_end,
                started.elapsed().as_millis()
            );
        }
        pass &= outcome.as_ref().is_ok_and(|o| o.failures(mode).is_empty());
        let line = scenario::summary(&machine, mode, &outcome);
        println!(
            "{}",
            line.replacen("LAB ", &format!("LAB kernel={kernel} "), 1)
        );
    }
    Ok(pass)
}
