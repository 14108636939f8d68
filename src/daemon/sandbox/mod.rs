//! The worker's sandbox: no new privileges, no capabilities, not dumpable, and a seccomp filter
//! that kills the process on any system call outside a reviewed list.
//!
//! The lists are data, one per architecture (`x86_64.txt`, `powerpc64le.txt` beside this file):
//! one system call name per line, `#` comments saying why each group is there. libseccomp
//! resolves the names for the architecture the binary runs on, so a name unknown there is an
//! error at startup, never a silent hole.
//!
//! Two steps, because capabilities and `no_new_privs` belong to each thread while the filter is
//! installed on every thread at once (`TSYNC`): [`restrict`] first, before the worker starts
//! any thread, then [`filter_syscalls`] once the threads it needs run.

use libseccomp::{ScmpAction, ScmpFilterContext, ScmpSyscall};
use rustix::process::DumpableBehavior;
use rustix::thread::{CapabilitySet, CapabilitySets};

#[cfg(target_arch = "x86_64")]
const ALLOWED: &str = include_str!("x86_64.txt");
#[cfg(all(target_arch = "powerpc64", target_endian = "little"))]
const ALLOWED: &str = include_str!("powerpc64le.txt");

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("cannot {what}")]
    Restrict {
        what: &'static str,
        source: rustix::io::Errno,
    },
    #[error("system call {0:?} of the allowlist is unknown on this architecture")]
    UnknownSyscall(String),
    #[error("cannot install the seccomp filter")]
    Seccomp(#[source] libseccomp::error::SeccompError),
}

/// The system calls a worker may make, from this architecture's list.
pub fn allowed() -> impl Iterator<Item = &'static str> {
    names(ALLOWED)
}

/// The names of a list: one per line, `#` starts a comment.
fn names(list: &str) -> impl Iterator<Item = &str> {
    list.lines()
        .map(|line| line.split('#').next().unwrap_or("").trim())
        .filter(|name| !name.is_empty())
}

/// Drops what the calling thread could ever gain or hold: sets `no_new_privs`, clears every
/// capability set, and makes the process not dumpable (no core file or ptrace of guest memory
/// by another process of the same user). Threads started afterwards inherit all of it.
pub fn restrict() -> Result<(), SandboxError> {
    let failed = |what| move |source| SandboxError::Restrict { what, source };
    rustix::thread::set_no_new_privs(true).map_err(failed("set no_new_privs"))?;
    rustix::thread::clear_ambient_capability_set()
        .or_else(ignore_unsupported)
        .map_err(failed("clear the ambient capabilities"))?;
    let none = CapabilitySet::empty();
    rustix::thread::set_capabilities(
        None,
        CapabilitySets {
            effective: none,
            permitted: none,
            inheritable: none,
        },
    )
    .map_err(failed("drop the capabilities"))?;
    rustix::process::set_dumpable_behavior(DumpableBehavior::NotDumpable)
        .map_err(failed("make the process not dumpable"))?;
    Ok(())
}

/// Kernels without ambient capabilities (before 4.3) have none to clear.
fn ignore_unsupported(errno: rustix::io::Errno) -> Result<(), rustix::io::Errno> {
    match errno {
        rustix::io::Errno::INVAL => Ok(()),
        other => Err(other),
    }
}

/// Installs the filter on every thread of the process: any call outside [`allowed`] kills it.
pub fn filter_syscalls() -> Result<(), SandboxError> {
    let mut filter =
        ScmpFilterContext::new(ScmpAction::KillProcess).map_err(SandboxError::Seccomp)?;
    filter.set_ctl_tsync(true).map_err(SandboxError::Seccomp)?;
    for name in allowed() {
        let syscall =
            ScmpSyscall::from_name(name).map_err(|_| SandboxError::UnknownSyscall(name.into()))?;
        filter
            .add_rule(ScmpAction::Allow, syscall)
            .map_err(SandboxError::Seccomp)?;
    }
    filter.load().map_err(SandboxError::Seccomp)
}

#[cfg(test)]
mod tests {
    use libseccomp::ScmpArch;

    use super::*;

    /// The calls ppc64le also offers through socketcall(2), which libseccomp names by pseudo
    /// numbers and turns into rules for both forms.
    const SOCKETCALLS: [&str; 9] = [
        "recvmsg",
        "sendmsg",
        "recvfrom",
        "sendto",
        "send",
        "recv",
        "shutdown",
        "setsockopt",
        "getsockopt",
    ];

    /// Both lists are compiled into a filter for their architecture on any build host: a name
    /// libseccomp cannot place in that architecture's filter would fail the worker at start.
    /// (Socket calls on ppc64le resolve to pseudo numbers that libseccomp turns into both the
    /// direct call and its `socketcall` form.)
    #[test]
    fn every_list_compiles_into_a_filter_for_its_architecture() {
        let lists = [
            (ScmpArch::X8664, include_str!("x86_64.txt")),
            (ScmpArch::Ppc64Le, include_str!("powerpc64le.txt")),
        ];
        for (arch, list) in lists {
            let mut filter = ScmpFilterContext::new(ScmpAction::KillProcess).unwrap();
            filter.add_arch(arch).unwrap();
            if arch != ScmpArch::native() {
                filter.remove_arch(ScmpArch::native()).unwrap();
            }
            let mut seen = std::collections::BTreeSet::new();
            for name in names(list) {
                assert!(seen.insert(name), "{arch:?}: {name} listed twice");
                let own = ScmpSyscall::from_name_by_arch(name, arch)
                    .unwrap_or_else(|_| panic!("{arch:?}: {name} is unknown"));
                // A negative number is a call the architecture does not have, which libseccomp
                // would leave out silently; only the socket calls are such on ppc64le.
                let socket_call = SOCKETCALLS.contains(&name) && arch == ScmpArch::Ppc64Le;
                assert!(i32::from(own) >= 0 || socket_call, "{arch:?} has no {name}");
                // Rules name calls by the build host's numbers; libseccomp translates them.
                let number = ScmpSyscall::from_name(name).unwrap();
                filter
                    .add_rule(ScmpAction::Allow, number)
                    .unwrap_or_else(|e| panic!("{arch:?}: {name}: {e}"));
            }
            let out = rustix::fs::memfd_create("bpf", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
            filter.export_bpf(&out).unwrap();
            let size = rustix::fs::fstat(&out).unwrap().st_size;
            assert!(size > 0, "{arch:?}: an empty filter");
        }
    }

    #[test]
    fn what_a_worker_must_never_do_is_on_no_list() {
        for list in [include_str!("x86_64.txt"), include_str!("powerpc64le.txt")] {
            for forbidden in [
                "execve",
                "execveat",
                "fork",
                "vfork",
                "clone",
                "clone3",
                "ptrace",
                "socket",
                "connect",
                "bind",
                "listen",
                "accept4",
                "kill",
                "setuid",
                "unshare",
                "mount",
                "init_module",
                "bpf",
                "process_vm_writev",
                "uname",
            ] {
                assert!(
                    names(list).all(|name| name != forbidden),
                    "{forbidden} is allowed"
                );
            }
        }
    }
}
