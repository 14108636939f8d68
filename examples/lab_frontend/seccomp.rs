//! The seccomp probe: a process its own seccomp filter kills, for the lab to find in the log.

use crate::scenario::Error;

/// Sets no_new_privs and a filter killing the process on getppid(2), then calls it.
pub(crate) fn seccomp_probe() -> Result<(), Error> {
    use libc::{sock_filter, sock_fprog, BPF_ABS, BPF_JEQ, BPF_JMP, BPF_K, BPF_LD, BPF_RET, BPF_W};
    let op = |code: u32, jt: u8, jf: u8, k: u32| sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    let mut filter = [
        // seccomp_data.nr
        op(BPF_LD | BPF_W | BPF_ABS, 0, 0, 0),
        op(BPF_JMP | BPF_JEQ | BPF_K, 0, 1, libc::SYS_getppid as u32),
        op(BPF_RET | BPF_K, 0, 0, libc::SECCOMP_RET_KILL_PROCESS),
        op(BPF_RET | BPF_K, 0, 0, libc::SECCOMP_RET_ALLOW),
    ];
    let program = sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_mut_ptr(),
    };
    let (one, zero): (libc::c_ulong, libc::c_ulong) = (1, 0);
    // SAFETY: PR_SET_NO_NEW_PRIVS takes integers only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, one, zero, zero, zero) } != 0 {
        return Err(format!("PR_SET_NO_NEW_PRIVS: {}", std::io::Error::last_os_error()).into());
    }
    // SAFETY: PR_SET_SECCOMP with SECCOMP_MODE_FILTER reads the `sock_fprog` and its `len`
    // instructions, both live for the call; the kernel copies the program.
    if unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::c_ulong::from(libc::SECCOMP_MODE_FILTER),
            &program as *const sock_fprog,
        )
    } != 0
    {
        return Err(format!("PR_SET_SECCOMP: {}", std::io::Error::last_os_error()).into());
    }
    // SAFETY: getppid(2) takes no arguments; the filter kills the process here.
    unsafe { libc::syscall(libc::SYS_getppid) };
    Err("the seccomp filter did not kill the process".into())
}
