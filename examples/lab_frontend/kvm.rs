//! The KVM calls the crate does not make (VM creator only): raw ioctls and powerpc layouts.

use std::ffi::c_void;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use tce_sidecar::kernel::abi::{ioc, Dir, IocArch, KVMIO};
use tce_sidecar::kernel::Errno;

/// `struct kvm_regs` of powerpc: pc, cr, ctr, lr, xer, msr, srr0, srr1, pid, sprg0..7, gpr[32].
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct KvmRegs(pub(crate) [u64; 49]);
pub(crate) const REG_PC: usize = 0;
pub(crate) const REG_MSR: usize = 5;
pub(crate) const REG_GPR0: usize = 17;

#[repr(C)]
pub(crate) struct KvmOneReg {
    pub(crate) id: u64,
    pub(crate) addr: u64,
}

#[repr(C)]
struct KvmEnableCap {
    cap: u32,
    flags: u32,
    args: [u64; 4],
    pad: [u8; 64],
}

#[repr(C)]
pub(crate) struct KvmUserspaceMemoryRegion {
    pub(crate) slot: u32,
    pub(crate) flags: u32,
    pub(crate) guest_phys_addr: u64,
    pub(crate) memory_size: u64,
    pub(crate) userspace_addr: u64,
}

const fn kvm_io(dir: Dir, nr: u8, size: usize) -> u32 {
    ioc(IocArch::NATIVE, dir, KVMIO, nr, size)
}
pub(crate) const KVM_GET_VCPU_MMAP_SIZE: u32 = kvm_io(Dir::None, 0x04, 0);
pub(crate) const KVM_CREATE_VCPU: u32 = kvm_io(Dir::None, 0x41, 0);
pub(crate) const KVM_SET_USER_MEMORY_REGION: u32 =
    kvm_io(Dir::Write, 0x46, size_of::<KvmUserspaceMemoryRegion>());
pub(crate) const KVM_RUN: u32 = kvm_io(Dir::None, 0x80, 0);
pub(crate) const KVM_GET_REGS: u32 = kvm_io(Dir::Read, 0x81, size_of::<KvmRegs>());
pub(crate) const KVM_SET_REGS: u32 = kvm_io(Dir::Write, 0x82, size_of::<KvmRegs>());
const KVM_ENABLE_CAP: u32 = kvm_io(Dir::Write, 0xa3, size_of::<KvmEnableCap>());
pub(crate) const KVM_GET_ONE_REG: u32 = kvm_io(Dir::Write, 0xab, size_of::<KvmOneReg>());
pub(crate) const KVM_SET_ONE_REG: u32 = kvm_io(Dir::Write, 0xac, size_of::<KvmOneReg>());
pub(crate) const KVM_CAP_PPC_PAPR: u32 = 68;
pub(crate) const KVM_CAP_PPC_ENABLE_HCALL: u32 = 104;
pub(crate) const KVM_REG_PPC_LPCR_64: u64 = 0x1030_0000_0000_00b5;
pub(crate) const LPCR_ILE: u64 = 0x0200_0000;
/// MSR of the guest: 64-bit, machine check enabled, little-endian, real mode.
pub(crate) const GUEST_MSR: u64 = 0x8000_0000_0000_1001;
pub(crate) const KVM_EXIT_PAPR_HCALL: u64 = 19;

/// `ioctl(fd, nr, arg)` with a pointer argument.
///
/// # Safety
/// `T` must be the struct the kernel reads or writes for `nr`, and every pointer stored in it
/// must be valid for the call.
pub(crate) unsafe fn ioctl_ptr<T>(fd: BorrowedFd<'_>, nr: u32, arg: &mut T) -> Result<u32, Errno> {
    // SAFETY: `arg` is a live exclusive reference for the call; the caller vouches for its type.
    let r = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            nr as libc::Ioctl,
            arg as *mut T as *mut c_void,
        )
    };
    u32::try_from(r)
        .map_err(|_| Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::IO))
}

/// `ioctl(fd, nr, value)` with an integer argument the kernel does not dereference.
pub(crate) fn ioctl_int(fd: BorrowedFd<'_>, nr: u32, value: u64) -> Result<u32, Errno> {
    // SAFETY: the ioctls passed here (KVM_CREATE_VCPU, KVM_RUN, KVM_GET_VCPU_MMAP_SIZE) take an
    // integer or nothing; no memory of this process is handed to the kernel.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), nr as libc::Ioctl, value as libc::c_ulong) };
    u32::try_from(r)
        .map_err(|_| Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::IO))
}

pub(crate) fn adopt(fd: u32) -> OwnedFd {
    // SAFETY: the kernel just returned this new fd to us; nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(fd as RawFd) }
}

pub(crate) fn enable_cap(fd: BorrowedFd<'_>, cap: u32, args: [u64; 4]) -> Result<(), Errno> {
    let mut arg = KvmEnableCap {
        cap,
        flags: 0,
        args,
        pad: [0; 64],
    };
    // SAFETY: KVM_ENABLE_CAP reads a `struct kvm_enable_cap` (104 bytes, laid out above).
    unsafe { ioctl_ptr(fd, KVM_ENABLE_CAP, &mut arg) }.map(drop)
}
