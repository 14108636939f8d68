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

#[path = "../tests/lab/scenario.rs"]
mod scenario;

use std::ffi::c_void;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rustix::fs::{fcntl_add_seals, ftruncate, memfd_create, MemfdFlags, Mode, OFlags, SealFlags};
use scenario::{Error, Hcall, LabVm, Sandbox};
use tce_sidecar::kernel::abi::{self, ioc, Dir, IocArch, Ioctl, KvmCreateSpaprTce64, KVMIO};
use tce_sidecar::kernel::linux::{self, Linux, SharedMapping};
use tce_sidecar::kernel::{
    ContainerId, Errno, GroupId, Kernel, KernelOp, Mapping, Objects, OwnershipMode, RegionId,
    TableFd, TableId,
};
use tce_sidecar::protocol::{MemRegion, OpKind, RequestCode};

// ---- the KVM calls the crate does not make (VM creator only), powerpc layouts ----------------

/// `struct kvm_regs` of powerpc: pc, cr, ctr, lr, xer, msr, srr0, srr1, pid, sprg0..7, gpr[32].
#[repr(C)]
#[derive(Clone, Copy)]
struct KvmRegs([u64; 49]);
const REG_PC: usize = 0;
const REG_MSR: usize = 5;
const REG_GPR0: usize = 17;

#[repr(C)]
struct KvmOneReg {
    id: u64,
    addr: u64,
}

#[repr(C)]
struct KvmEnableCap {
    cap: u32,
    flags: u32,
    args: [u64; 4],
    pad: [u8; 64],
}

#[repr(C)]
struct KvmUserspaceMemoryRegion {
    slot: u32,
    flags: u32,
    guest_phys_addr: u64,
    memory_size: u64,
    userspace_addr: u64,
}

const fn kvm_io(dir: Dir, nr: u8, size: usize) -> u32 {
    ioc(IocArch::NATIVE, dir, KVMIO, nr, size)
}
const KVM_GET_VCPU_MMAP_SIZE: u32 = kvm_io(Dir::None, 0x04, 0);
const KVM_CREATE_VCPU: u32 = kvm_io(Dir::None, 0x41, 0);
const KVM_SET_USER_MEMORY_REGION: u32 =
    kvm_io(Dir::Write, 0x46, size_of::<KvmUserspaceMemoryRegion>());
const KVM_RUN: u32 = kvm_io(Dir::None, 0x80, 0);
const KVM_GET_REGS: u32 = kvm_io(Dir::Read, 0x81, size_of::<KvmRegs>());
const KVM_SET_REGS: u32 = kvm_io(Dir::Write, 0x82, size_of::<KvmRegs>());
const KVM_ENABLE_CAP: u32 = kvm_io(Dir::Write, 0xa3, size_of::<KvmEnableCap>());
const KVM_GET_ONE_REG: u32 = kvm_io(Dir::Write, 0xab, size_of::<KvmOneReg>());
const KVM_SET_ONE_REG: u32 = kvm_io(Dir::Write, 0xac, size_of::<KvmOneReg>());
const KVM_CAP_PPC_PAPR: u32 = 68;
const KVM_CAP_PPC_ENABLE_HCALL: u32 = 104;
const KVM_REG_PPC_LPCR_64: u64 = 0x1030_0000_0000_00b5;
const LPCR_ILE: u64 = 0x0200_0000;
/// MSR of the guest: 64-bit, machine check enabled, little-endian, real mode.
const GUEST_MSR: u64 = 0x8000_0000_0000_1001;
const KVM_EXIT_PAPR_HCALL: u64 = 19;

/// `ioctl(fd, nr, arg)` with a pointer argument.
///
/// # Safety
/// `T` must be the struct the kernel reads or writes for `nr`, and every pointer stored in it
/// must be valid for the call.
unsafe fn ioctl_ptr<T>(fd: BorrowedFd<'_>, nr: u32, arg: &mut T) -> Result<u32, Errno> {
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
fn ioctl_int(fd: BorrowedFd<'_>, nr: u32, value: u64) -> Result<u32, Errno> {
    // SAFETY: the ioctls passed here (KVM_CREATE_VCPU, KVM_RUN, KVM_GET_VCPU_MMAP_SIZE) take an
    // integer or nothing; no memory of this process is handed to the kernel.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), nr as libc::Ioctl, value as libc::c_ulong) };
    u32::try_from(r)
        .map_err(|_| Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::IO))
}

fn adopt(fd: u32) -> OwnedFd {
    // SAFETY: the kernel just returned this new fd to us; nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(fd as RawFd) }
}

fn enable_cap(fd: BorrowedFd<'_>, cap: u32, args: [u64; 4]) -> Result<(), Errno> {
    let mut arg = KvmEnableCap {
        cap,
        flags: 0,
        args,
        pad: [0; 64],
    };
    // SAFETY: KVM_ENABLE_CAP reads a `struct kvm_enable_cap` (104 bytes, laid out above).
    unsafe { ioctl_ptr(fd, KVM_ENABLE_CAP, &mut arg) }.map(drop)
}

// ---- the guest: a tiny real-mode program that issues the hypercalls of a table ---------------

const CODE_GPA: u64 = 0x1_0000;
const ARGS_GPA: u64 = 0x2_0000;
const ARG_SLOT: u64 = 48;
const DONE: u64 = 0x7004;
const TRAP: u64 = 0x7ff0;
const NOT_RUN: u64 = u64::MAX;

/// r31 walks a table of {nr, r4, r5, r6, r7, result}; nr 0 ends it.
const GUEST_CODE: [u32; 14] = [
    0xe87f_0000, // 0: ld r3,0(r31)
    0x2c23_0000, // 1: cmpdi r3,0
    0x4182_0024, // 2: beq 11 (+36)
    0xe89f_0008, // 3: ld r4,8(r31)
    0xe8bf_0010, // 4: ld r5,16(r31)
    0xe8df_0018, // 5: ld r6,24(r31)
    0xe8ff_0020, // 6: ld r7,32(r31)
    0x4400_0022, // 7: sc 1
    0xf87f_0028, // 8: std r3,40(r31)
    0x3bff_0030, // 9: addi r31,r31,48
    0x4bff_ffd8, // 10: b 0 (-40)
    0x3860_7004, // 11: li r3,0x7004 (DONE)
    0x4400_0022, // 12: sc 1
    0x4800_0000, // 13: b .
];
/// Every interrupt vector: report the interrupt as hypercall TRAP with SRR0 and SRR1.
const VECTOR_CODE: [u32; 5] = [
    0x3860_7ff0, // li r3,0x7ff0
    0x7c9a_02a6, // mfsrr0 r4
    0x7cbb_02a6, // mfsrr1 r5
    0x4400_0022, // sc 1
    0x4800_0000, // b .
];

struct RealVm {
    group_path: PathBuf,
    iommu_group: u32,
    /// `/dev/kvm`, kept open with the VM as QEMU does.
    _kvm: OwnedFd,
    vm: OwnedFd,
    vcpu: OwnedFd,
    run: SharedMapping,
    device: Option<OwnedFd>,
    ram_fd: OwnedFd,
    ram: SharedMapping,
    region: MemRegion,
    group: Option<OwnedFd>,
    table: Option<(OwnedFd, SharedMapping)>,
    program_len: usize,
}

impl RealVm {
    fn create(group_path: &Path) -> Result<Self, Error> {
        let iommu_group: u32 = group_path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse().ok())
            .ok_or("the group path is not /dev/vfio/<N>")?;
        let kvm = rustix::fs::open("/dev/kvm", OFlags::RDWR | OFlags::CLOEXEC, Mode::empty())?;
        let vm = linux::create_vm(kvm.as_fd())?;
        for hcall in [
            scenario::H_PUT_TCE,
            scenario::H_PUT_TCE_INDIRECT,
            scenario::H_STUFF_TCE,
        ] {
            enable_cap(vm.as_fd(), KVM_CAP_PPC_ENABLE_HCALL, [hcall, 1, 0, 0])
                .map_err(|e| format!("KVM_ENABLE_CAP(PPC_ENABLE_HCALL, {hcall:#x}): {e}"))?;
        }
        let device = linux::create_kvm_vfio_device(vm.as_fd())?;

        let size = scenario::RAM_SIZE;
        let ram_fd = sealed_memfd("guest-ram", size)?;
        let ram = SharedMapping::map(ram_fd.as_fd(), size as usize)?;
        let mut slot = KvmUserspaceMemoryRegion {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: size,
            userspace_addr: ram.addr(),
        };
        // SAFETY: KVM_SET_USER_MEMORY_REGION reads a `struct kvm_userspace_memory_region`; the
        // range it names is `ram`, mapped for as long as the VM (both live in this struct, and
        // the VM fd is closed first on drop, see the field order).
        unsafe { ioctl_ptr(vm.as_fd(), KVM_SET_USER_MEMORY_REGION, &mut slot) }?;

        let vcpu = adopt(ioctl_int(vm.as_fd(), KVM_CREATE_VCPU, 0)?);
        let run_size = ioctl_int(kvm.as_fd(), KVM_GET_VCPU_MMAP_SIZE, 0)? as usize;
        let run = SharedMapping::map(vcpu.as_fd(), run_size)?;
        enable_cap(vcpu.as_fd(), KVM_CAP_PPC_PAPR, [0; 4])?;
        let mut lpcr = 0u64;
        let mut get = KvmOneReg {
            id: KVM_REG_PPC_LPCR_64,
            addr: &mut lpcr as *mut u64 as u64,
        };
        // SAFETY: KVM_GET_ONE_REG writes the 8-byte LPCR to `get.addr`, which is `lpcr`.
        unsafe { ioctl_ptr(vcpu.as_fd(), KVM_GET_ONE_REG, &mut get) }?;
        let lpcr = lpcr | LPCR_ILE;
        let mut set = KvmOneReg {
            id: KVM_REG_PPC_LPCR_64,
            addr: &lpcr as *const u64 as u64,
        };
        // SAFETY: KVM_SET_ONE_REG reads the 8-byte LPCR from `set.addr`, which is `lpcr`.
        unsafe { ioctl_ptr(vcpu.as_fd(), KVM_SET_ONE_REG, &mut set) }?;

        let region = MemRegion {
            region_id: 0,
            guest_addr: 0,
            size,
            user_addr: ram.addr(),
            mmap_offset: 0,
            page_shift: 0,
        };
        Ok(Self {
            group_path: group_path.to_owned(),
            iommu_group,
            _kvm: kvm,
            vm,
            vcpu,
            run,
            device: Some(device),
            ram_fd,
            ram,
            region,
            group: None,
            table: None,
            program_len: 0,
        })
    }

    fn write_words(&self, gpa: u64, words: &[u32]) {
        for (i, pair) in words.chunks(2).enumerate() {
            let lo = u64::from(pair[0]);
            let hi = pair.get(1).map_or(0, |w| u64::from(*w));
            // Little-endian guest: the first instruction is the low half.
            self.write_ram(gpa + 8 * i as u64, lo | hi << 32);
        }
    }
}

/// A memfd of `size` bytes that can neither shrink nor grow, with its seals sealed, as QEMU's
/// `memory-backend-memfd` makes guest RAM.
fn sealed_memfd(name: &str, size: u64) -> Result<OwnedFd, Error> {
    let fd = memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)?;
    ftruncate(&fd, size)?;
    fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)?;
    Ok(fd)
}

/// The value of field `name` (e.g. `Seccomp:`) in a `/proc/PID/status` text.
fn status_field<'a>(status: &'a str, name: &str) -> Option<&'a str> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .map(str::trim)
}

/// The first word of a status field's value (`Uid:` has four), or `?`.
fn first_word(value: Option<&str>) -> &str {
    value
        .and_then(|v| v.split_whitespace().next())
        .unwrap_or("?")
}

fn locked_bytes(pid: u32) -> Result<u64, Error> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmLck:"))
        .ok_or("no VmLck")?;
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .ok_or("bad VmLck")?;
    Ok(kb * 1024)
}

impl LabVm for RealVm {
    fn ram(&self) -> (MemRegion, BorrowedFd<'_>) {
        (self.region, self.ram_fd.as_fd())
    }
    fn write_ram(&self, gpa: u64, value: u64) {
        assert!(self.ram.write_u64((gpa / 8) as usize, value));
    }
    fn read_ram(&self, gpa: u64) -> u64 {
        self.ram
            .read_u64((gpa / 8) as usize)
            .expect("inside guest RAM")
    }
    fn kvm_vfio_device(&self) -> Result<OwnedFd, Error> {
        Ok(self.device.as_ref().ok_or("device closed")?.try_clone()?)
    }
    fn kernel(&self) -> Result<Box<dyn Kernel + Send>, Error> {
        Ok(Box::new(Linux::new()))
    }
    fn iommu_group(&self) -> u32 {
        self.iommu_group
    }
    fn open_group(&mut self) -> Result<OwnedFd, Error> {
        let fd = rustix::fs::open(
            &self.group_path,
            OFlags::RDWR | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        self.group = Some(fd.try_clone()?);
        Ok(fd)
    }
    fn make_table(&mut self, mode: OwnershipMode) -> Result<OwnedFd, Error> {
        let bytes = (scenario::ENTRIES * 8) as usize;
        let fd = match mode {
            OwnershipMode::Accelerated => {
                let mut arg = KvmCreateSpaprTce64 {
                    liobn: scenario::LIOBN,
                    page_shift: scenario::PAGE_SHIFT,
                    flags: 0,
                    offset: scenario::BUS_OFFSET >> scenario::PAGE_SHIFT,
                    size: scenario::ENTRIES,
                };
                // SAFETY: KVM_CREATE_SPAPR_TCE_64 reads a `struct kvm_create_spapr_tce_64`
                // (abi.rs pins its layout) and returns a new fd.
                adopt(unsafe {
                    ioctl_ptr(
                        self.vm.as_fd(),
                        Ioctl::KVM_CREATE_SPAPR_TCE_64.number(IocArch::NATIVE),
                        &mut arg,
                    )
                }?)
            }
            OwnershipMode::Isolated => sealed_memfd("guest-tce-table", bytes as u64)?,
        };
        let mapping = SharedMapping::map(fd.as_fd(), bytes)?;
        let copy = fd.try_clone()?;
        self.table = Some((fd, mapping));
        Ok(copy)
    }
    fn write_table(&self, index: u64, tce: u64) {
        let (_, mapping) = self.table.as_ref().expect("a table");
        assert!(mapping.write_u64(index as usize, tce));
    }
    fn load(&mut self, program: &[Hcall]) -> Result<(), Error> {
        self.write_words(CODE_GPA, &GUEST_CODE);
        for vector in (0x100..0x1000).step_by(0x20) {
            self.write_words(vector, &VECTOR_CODE);
        }
        for (i, h) in program.iter().enumerate() {
            let slot = ARGS_GPA + ARG_SLOT * i as u64;
            self.write_ram(slot, h.number);
            for (j, a) in h.args.iter().enumerate() {
                self.write_ram(slot + 8 + 8 * j as u64, *a);
            }
            self.write_ram(slot + 40, NOT_RUN);
        }
        self.write_ram(ARGS_GPA + ARG_SLOT * program.len() as u64, 0);
        self.program_len = program.len();
        let mut regs = KvmRegs([0; 49]);
        // SAFETY: KVM_GET_REGS writes a powerpc `struct kvm_regs` (49 u64s).
        unsafe { ioctl_ptr(self.vcpu.as_fd(), KVM_GET_REGS, &mut regs) }?;
        regs.0[REG_PC] = CODE_GPA;
        regs.0[REG_MSR] = GUEST_MSR;
        regs.0[REG_GPR0 + 31] = ARGS_GPA;
        // SAFETY: KVM_SET_REGS reads a powerpc `struct kvm_regs`.
        unsafe { ioctl_ptr(self.vcpu.as_fd(), KVM_SET_REGS, &mut regs) }?;
        Ok(())
    }
    fn run(&mut self) -> Result<Option<Hcall>, Error> {
        // KVM_RUN on a thread of its own that ends with it: on this setup the FP/vector
        // registers of the thread that ran the vCPU come back holding the guest's values, so
        // nothing of this thread may be live in them across the call.
        let vcpu = self.vcpu.as_fd();
        std::thread::scope(|s| s.spawn(move || ioctl_int(vcpu, KVM_RUN, 0)).join())
            .map_err(|_| "the KVM_RUN thread panicked")?
            .map_err(|e| format!("KVM_RUN: {e}"))?;
        // struct kvm_run: exit_reason (u32) at byte 8; papr_hcall {nr, ret, args[9]} at 32.
        let word = |i: usize| self.run.read_u64(i).unwrap_or_default();
        let exit_reason = word(1) & 0xffff_ffff;
        if exit_reason != KVM_EXIT_PAPR_HCALL {
            return Err(format!("unexpected exit reason {exit_reason}").into());
        }
        let number = word(4);
        let args = [word(6), word(7), word(8), word(9)];
        match number {
            DONE => Ok(None),
            TRAP => Err(format!(
                "the guest took an interrupt: srr0 {:#x} srr1 {:#x}",
                args[0], args[1]
            )
            .into()),
            scenario::H_PUT_TCE | scenario::H_PUT_TCE_INDIRECT | scenario::H_STUFF_TCE => {
                Ok(Some(Hcall { number, args }))
            }
            other => Err(format!("unexpected hypercall {other:#x}").into()),
        }
    }
    fn complete(&mut self, ret: i64) {
        assert!(self.run.write_u64(5, ret as u64));
    }
    fn results(&self) -> Result<Vec<i64>, Error> {
        Ok((0..self.program_len)
            .map(|i| self.read_ram(ARGS_GPA + ARG_SLOT * i as u64 + 40) as i64)
            .collect())
    }
    fn locked_bytes(&self, pid: u32) -> Result<u64, Error> {
        locked_bytes(pid)
    }
    fn refusals(&mut self, container_owner: u32) -> Result<Option<(Errno, Errno)>, Error> {
        let exe = std::env::current_exe()?;
        let out = Command::new(exe)
            .args(["check-refusals", "--vm-pid"])
            .arg(std::process::id().to_string())
            .arg("--container-pid")
            .arg(container_owner.to_string())
            .stderr(Stdio::inherit())
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let value = |key: &str| -> Result<Errno, Error> {
            let v: i32 = text
                .split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("the refusal helper said {text:?}"))?;
            Ok(Errno::from_raw_os_error(v))
        };
        Ok(Some((value("eio=")?, value("eperm=")?)))
    }
    fn close_objects(&mut self) -> Result<(), Error> {
        self.table = None;
        self.group = None;
        self.device = None;
        Ok(())
    }
    fn worker_sandbox(&self, worker_pid: Option<u32>) -> Option<Result<Sandbox, String>> {
        let Some(pid) = worker_pid else {
            let why = "no worker_pid in the session's GET_STATUS entry";
            println!("WORKER pid=none why=\"{why}\"");
            return Some(Err(why.into()));
        };
        let status = match std::fs::read_to_string(format!("/proc/{pid}/status")) {
            Ok(s) => s,
            Err(e) => {
                let why = format!("reading /proc/{pid}/status: {e}");
                println!("WORKER pid={pid} why=\"{why}\"");
                return Some(Err(why));
            }
        };
        let number = |name: &str| status_field(&status, name).and_then(|v| v.parse().ok());
        let sandbox = Sandbox {
            pid,
            seccomp: number("Seccomp:"),
            no_new_privs: number("NoNewPrivs:"),
        };
        let show = |v: Option<u32>| v.map_or("none".into(), |v| v.to_string());
        println!(
            "WORKER pid={pid} seccomp={} no_new_privs={} uid={} ppid={}",
            show(sandbox.seccomp),
            show(sandbox.no_new_privs),
            first_word(status_field(&status, "Uid:")),
            first_word(status_field(&status, "PPid:")),
        );
        Some(Ok(sandbox))
    }
    fn group_reattachable(&mut self) -> Result<(), Error> {
        let group = rustix::fs::open(
            &self.group_path,
            OFlags::RDWR | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| format!("reopening {}: {e}", self.group_path.display()))?;
        let objects = Fds {
            group: Some(group),
            ..Fds::default()
        };
        let mut linux = Linux::new();
        let c = ContainerId(0);
        let g = GroupId(0);
        for op in [
            KernelOp::ContainerOpen { container: c },
            KernelOp::GroupSetContainer {
                container: c,
                group: g,
            },
            KernelOp::SetIommu {
                container: c,
                iommu_type: abi::VFIO_SPAPR_TCE_v2_IOMMU,
            },
            KernelOp::GroupUnsetContainer {
                container: c,
                group: g,
            },
            KernelOp::ContainerClose { container: c },
        ] {
            linux
                .execute(&op, &objects)
                .map_err(|e| format!("{op:?}: {e}"))?;
        }
        Ok(())
    }
}

/// Fds for the `linux` backend in the helper and the re-attach check.
#[derive(Default)]
struct Fds {
    group: Option<OwnedFd>,
    table: Option<OwnedFd>,
    device: Option<OwnedFd>,
}

impl Objects for Fds {
    fn group(&self, _: GroupId) -> Option<BorrowedFd<'_>> {
        self.group.as_ref().map(|f| f.as_fd())
    }
    fn table(&self, _: TableId) -> Option<TableFd<'_>> {
        self.table.as_ref().map(|f| TableFd {
            fd: f.as_fd(),
            entries: scenario::ENTRIES,
            view: None,
        })
    }
    fn region(&self, _: RegionId) -> Option<Mapping> {
        None
    }
    fn kvm_vfio_device(&self) -> Option<BorrowedFd<'_>> {
        self.device.as_ref().map(|f| f.as_fd())
    }
}

// ---- the refusal helper: a process that is neither the VM's creator nor the container's owner

/// A copy (pidfd_getfd) of the first fd of process `pid` whose link satisfies `want`.
fn grab(pid: u32, want: impl Fn(&str) -> bool) -> Result<Option<OwnedFd>, Error> {
    let pidfd = rustix::process::pidfd_open(
        rustix::process::Pid::from_raw(pid as i32).ok_or("bad pid")?,
        rustix::process::PidfdFlags::empty(),
    )?;
    let mut fds: Vec<(i32, String)> = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let entry = entry?;
        let Ok(n) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(link) = std::fs::read_link(entry.path()) {
            fds.push((n, link.to_string_lossy().into_owned()));
        }
    }
    fds.sort();
    for (n, link) in fds {
        if want(&link) {
            let fd =
                rustix::process::pidfd_getfd(&pidfd, n, rustix::process::PidfdGetfdFlags::empty())?;
            return Ok(Some(fd));
        }
    }
    Ok(None)
}

fn errno_of<T>(r: Result<T, Errno>) -> i32 {
    r.map_or_else(|e| e.raw_os_error(), |_| 0)
}

fn check_refusals(vm_pid: u32, container_pid: u32) -> Result<(), Error> {
    let is_group = |l: &str| {
        l.strip_prefix("/dev/vfio/")
            .is_some_and(|n| n.chars().all(|c| c.is_ascii_digit()))
    };
    let objects = Fds {
        group: grab(vm_pid, is_group)?,
        table: grab(vm_pid, |l| l == "anon_inode:kvm-spapr-tce")?,
        device: grab(vm_pid, |l| l == "anon_inode:kvm-vfio")?,
    };
    if objects.device.is_none() || objects.group.is_none() {
        return Err("the VM creator has no kvm-vfio device or group open".into());
    }
    // KVM refuses every device ioctl from outside the VM creator's mm before it reads the
    // payload; without a KVM table (isolated mode) the group stands in for the table fd.
    let objects = Fds {
        table: objects
            .table
            .or(objects.group.as_ref().map(|g| g.try_clone()).transpose()?),
        ..objects
    };
    let eio = errno_of(Linux::new().execute(
        &KernelOp::KvmSetSpaprTce {
            group: GroupId(0),
            table: TableId(0),
        },
        &objects,
    ));
    let container = grab(container_pid, |l| l == linux::VFIO_CONTAINER_PATH)?
        .ok_or("the container owner has no container open")?;
    let mut info = abi::vfio_iommu_spapr_tce_info {
        argsz: size_of::<abi::vfio_iommu_spapr_tce_info>() as u32,
        ..Default::default()
    };
    // SAFETY: VFIO_IOMMU_SPAPR_TCE_GET_INFO writes a `struct vfio_iommu_spapr_tce_info`
    // (vfio-bindings) within its `argsz`.
    let eperm = errno_of(unsafe {
        ioctl_ptr(
            container.as_fd(),
            Ioctl::VFIO_IOMMU_SPAPR_TCE_GET_INFO.number(IocArch::NATIVE),
            &mut info,
        )
    });
    println!("REFUSALS eio={eio} eperm={eperm}");
    Ok(())
}

// ---- the seccomp probe -------------------------------------------------------------------------

/// Sets no_new_privs and a filter killing the process on getppid(2), then calls it.
fn seccomp_probe() -> Result<(), Error> {
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

// ---- the lab run ------------------------------------------------------------------------------

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

fn arg(args: &[String], name: &str) -> Result<String, Error> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .ok_or_else(|| format!("missing {name}").into())
}

fn run(args: &[String]) -> Result<bool, Error> {
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

/// `qmp SOCKET COMMAND`: runs one QMP command without arguments on QEMU's monitor and prints
/// `QMP ms=N REPLY`, N the milliseconds from sending the command to its reply; for the nested
/// lab's L1, which has no QMP client. Every read has a 10 s deadline.
fn qmp(args: &[String]) -> Result<(), Error> {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;
    let [socket, command] = args else {
        return Err("qmp SOCKET COMMAND".into());
    };
    let stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    // Events may come before a reply; the reply is the first line with "return" or "error".
    let mut reply = || -> Result<String, Error> {
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                return Err("QEMU closed the monitor".into());
            }
            if line.contains("\"return\"") || line.contains("\"error\"") {
                return Ok(line.trim_end().to_string());
            }
        }
    };
    // The greeting has neither, so the first reply read is that of qmp_capabilities.
    writeln!(writer, "{{\"execute\": \"qmp_capabilities\"}}")?;
    reply()?;
    let start = Instant::now();
    writeln!(writer, "{{\"execute\": \"{command}\"}}")?;
    let answer = reply()?;
    println!("QMP ms={} {answer}", start.elapsed().as_millis());
    Ok(())
}

// ---- the hostile proxy of the nested lab's hostile-cross case -------------------------------

/// A KVM_SET_SPAPR_TCE the proxy rewrote, until QEMU answers it in OPS_RESULT.
struct Rewritten {
    transaction: u32,
    /// The operation's index in its reply, and so of its result in OPS_RESULT.
    index: usize,
    container: u32,
    group: u32,
    table: u32,
}

/// Set once the one rewrite is done: later sessions are relayed untouched.
static REWRITE_DONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn request_name(code: u32) -> &'static str {
    RequestCode::from_u32(code).map_or("an unknown request", RequestCode::name)
}

/// `cross-proxy LISTEN SIDECAR`: listens on LISTEN and relays each connection to the sidecar at
/// SIDECAR, frame by frame with their fds, as a hostile back-end would answer QEMU: the first
/// KVM_SET_SPAPR_TCE that the sidecar asks for a group of another container than the session's
/// first gets that group replaced by a group of the first container (QEMU names groups by their
/// IOMMU group and has one container per guest PHB). Prints `CROSS-PROXY rewrote ...` then, from
/// QEMU's OPS_RESULT, `CROSS-PROXY answer status=N ...` (N the operation's result: -1 is EPERM).
/// Everything else passes unchanged.
fn cross_proxy(args: &[String]) -> Result<(), Error> {
    use std::os::unix::net::UnixListener;
    let [listen, sidecar] = args else {
        return Err("cross-proxy LISTEN_SOCKET SIDECAR_SOCKET".into());
    };
    let _ = std::fs::remove_file(listen);
    let listener = UnixListener::bind(listen)?;
    for qemu in listener.incoming() {
        let qemu = qemu?;
        let sidecar = sidecar.clone();
        std::thread::spawn(move || {
            if let Err(e) = relay(&qemu, &sidecar) {
                println!("CROSS-PROXY session ended: {e}");
            }
        });
    }
    Ok(())
}

/// Relays one session: QEMU's request, then the sidecar's reply (the protocol has no other
/// order), until either side closes.
fn relay(qemu: &std::os::unix::net::UnixStream, sidecar: &str) -> Result<(), Error> {
    use std::sync::atomic::Ordering;
    use tce_sidecar::protocol::{send_frame, FrameReader, RecvError, OP_RECORD_SIZE, REPLY_FIXED};
    let back = std::os::unix::net::UnixStream::connect(sidecar)?;
    let (mut from_qemu, mut from_sidecar) = (FrameReader::new(false), FrameReader::new(true));
    // (group id, container id) from GROUP_ADD, in order: the first names the first container
    let mut groups: Vec<(u32, u32)> = Vec::new();
    let mut opening = 0;
    let mut watched: Option<Rewritten> = None;
    loop {
        let request = match from_qemu.recv(qemu) {
            Err(RecvError::Closed) => return Ok(()),
            r => r?,
        };
        let p = &request.payload;
        let code = RequestCode::from_u32(request.header.request);
        if code != Some(RequestCode::OpsResult) {
            opening = request.header.request;
        }
        match code {
            Some(RequestCode::GroupAdd | RequestCode::GroupAdopt) if p.len() >= 8 => {
                groups.push((le32(p, 0), le32(p, 4)));
            }
            Some(RequestCode::GroupRemove) if p.len() >= 4 => groups.retain(|g| g.0 != le32(p, 0)),
            Some(RequestCode::OpsResult) => {
                if let Some(w) = watched.take_if(|w| p.len() >= 8 && le32(p, 0) == w.transaction) {
                    let (count, at) = (le32(p, 4) as usize, 8 + w.index * OP_RECORD_SIZE);
                    let answer = if w.index < count && p.len() >= at + 8 {
                        format!("status={}", le32(p, at + 4) as i32)
                    } else {
                        format!("status=none (QEMU stopped after {count} results)")
                    };
                    println!(
                        "CROSS-PROXY answer {answer} for KVM_SET_SPAPR_TCE container={} group={} table={} (transaction {})",
                        w.container, w.group, w.table, w.transaction
                    );
                }
            }
            _ => {}
        }
        let fds: Vec<BorrowedFd<'_>> = request.fds.iter().map(|f| f.as_fd()).collect();
        send_frame(&back, request.header.request, false, p, &fds)?;

        let mut reply = from_sidecar.recv(&back)?;
        let r = &mut reply.payload;
        let ops = if r.len() >= REPLY_FIXED && le32(r, 4) & 1 != 0 {
            usize::from(u16::from_le_bytes([r[12], r[13]]))
        } else {
            0
        };
        for index in 0..ops {
            let at = REPLY_FIXED + index * OP_RECORD_SIZE;
            if r.len() < at + OP_RECORD_SIZE
                || u16::from_le_bytes([r[at], r[at + 1]]) != OpKind::KvmSetSpaprTce as u16
                || REWRITE_DONE.load(Ordering::SeqCst)
            {
                continue;
            }
            // kvm-vfio operations name no container: the group's is the one concerned
            let (group, table) = (le32(r, at + 8), le32(r, at + 12));
            let Some(&(other, first_container)) = groups.first() else {
                continue;
            };
            let Some(&(_, container)) = groups.iter().find(|g| g.0 == group) else {
                continue;
            };
            if container == first_container {
                continue;
            }
            r[at + 8..at + 12].copy_from_slice(&other.to_le_bytes());
            REWRITE_DONE.store(true, Ordering::SeqCst);
            let transaction = le32(r, 8);
            println!(
                "CROSS-PROXY rewrote KVM_SET_SPAPR_TCE (op {} of {ops}, transaction {transaction}) in the reply to {}: container {container} table {table} group {group} -> {other}, a group of container {first_container}",
                index + 1,
                request_name(opening)
            );
            watched = Some(Rewritten {
                transaction,
                index,
                container,
                group: other,
                table,
            });
        }
        send_frame(qemu, reply.header.request, true, r, &[])?;
    }
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
        _ => Err("usage: lab_frontend run --machine NAME --group /dev/vfio/N --sidecar PATH [--mode accelerated|isolated] [--sidecar-user UID:GID] | check-refusals --vm-pid PID --container-pid PID | seccomp-probe | run-as UID:GID PROGRAM [ARG]... | qmp SOCKET COMMAND | cross-proxy LISTEN_SOCKET SIDECAR_SOCKET".into()),
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
