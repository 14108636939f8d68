//! The real-kernel lab's front-end: inside the lab's ppc64le guest (tests/lab/run.sh) it plays
//! QEMU on the REAL kernel. It creates the VM (vCPU, guest RAM as a memfd and memslot, the
//! kvm-vfio device, KVM TCE tables), opens the VFIO group of a device bound to vfio-pci, starts
//! the real `tce-sidecar --kernel linux` as a separate process and runs the session of
//! tests/lab/scenario.rs in both ownership modes: the owner operations the sidecar returns are
//! executed through the crate's `linux` backend, and a tiny real-mode guest issues the
//! hypercalls. One `LAB ...` summary line per mode on stdout.
//!
//! ```text
//! lab_frontend run --machine NAME --group /dev/vfio/N --sidecar PATH [--mode accelerated|isolated]
//!                  [--sidecar-user UID:GID]
//! lab_frontend check-refusals --vm-pid PID --container-pid PID   (the helper process)
//! lab_frontend seccomp-probe                                     (killed by its own filter)
//! lab_frontend run-as UID:GID PROGRAM [ARG]...                    (the nested lab's L1)
//! lab_frontend qmp SOCKET COMMAND [ARGUMENTS]                      (the nested lab's L1)
//! lab_frontend cross-proxy LISTEN_SOCKET SIDECAR_SOCKET           (the nested lab's hostile proxy)
//! ```
//!
//! With `--sidecar-user` the sidecar runs as that user (allowing this process's uid to connect),
//! with the locked-memory limit this process has: the init of the lab sets one large enough for
//! isolated mode. The summary lines name the running kernel (`LAB kernel=<version> ...`). After a
//! session's work its worker must be confined (`WORKER pid=N seccomp=2 no_new_privs=1`), and once
//! the session is over the worker must be gone, not killed by a signal (`WORKER-END ...`).
//!
//! `seccomp-probe` sets no_new_privs and a seccomp filter that kills the process
//! (`SECCOMP_RET_KILL_PROCESS`) on getppid(2), then calls it: the lab checks that the kernel logs
//! such a kill, so that the absence of any other record in the log means something.
//!
//! Guest RAM and, in isolated mode, the TCE table are memfds sealed against shrinking and growing
//! (`F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL`), as the sidecar requires of the memory it maps.
//!
//! `KVM_RUN` runs on a short-lived thread of its own: on this setup the userspace FP and vector
//! registers of the thread that ran the vCPU were seen clobbered across the call, which breaks
//! any value the compiler keeps in a callee-saved FP/vector register of a caller.

#[path = "../../tests/lab/scenario.rs"]
mod scenario;

mod cross_proxy;
mod kvm;
mod qmp;
mod refusals;
mod run;
mod seccomp;
mod vm;

use std::process::Command;

use cross_proxy::cross_proxy;
use qmp::qmp;
use refusals::check_refusals;
use run::run;
use scenario::Error;
use seccomp::seccomp_probe;

fn arg(args: &[String], name: &str) -> Result<String, Error> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .ok_or_else(|| format!("missing {name}").into())
}

/// `run-as UID:GID PROGRAM [ARG]...`: executes PROGRAM as that user, without supplementary
/// groups; for the nested lab's L1, whose busybox cannot change users.
fn run_as(args: &[String]) -> Result<(), Error> {
    use std::os::unix::process::CommandExt;
    let [user, program, rest @ ..] = args else {
        return Err("run-as UID:GID PROGRAM [ARG]...".into());
    };
    let (uid, gid) = user.split_once(':').ok_or("run-as takes UID:GID")?;
    let err = Command::new(program)
        .args(rest)
        .uid(uid.parse()?)
        .gid(gid.parse()?)
        .exec();
    Err(format!("cannot execute {program}: {err}").into())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let result = match args.get(1).map(String::as_str) {
        Some("run") => run(&args),
        Some("check-refusals") => (|| {
            let vm: u32 = arg(&args, "--vm-pid")?.parse()?;
            let owner: u32 = arg(&args, "--container-pid")?.parse()?;
            check_refusals(vm, owner).map(|()| true)
        })(),
        Some("seccomp-probe") => seccomp_probe().map(|()| true),
        Some("run-as") => run_as(&args[2..]).map(|()| true),
        Some("qmp") => qmp(&args[2..]).map(|()| true),
        Some("cross-proxy") => cross_proxy(&args[2..]).map(|()| true),
        _ => Err("usage: lab_frontend run --machine NAME --group /dev/vfio/N --sidecar PATH [--mode accelerated|isolated] [--sidecar-user UID:GID] | check-refusals --vm-pid PID --container-pid PID | seccomp-probe | run-as UID:GID PROGRAM [ARG]... | qmp SOCKET COMMAND [ARGUMENTS] | cross-proxy LISTEN_SOCKET SIDECAR_SOCKET".into()),
    };
    match result {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("lab_frontend: {e}");
            std::process::exit(2);
        }
    }
}
