//! The guest: a tiny real-mode program that issues the hypercalls of a table, on a real VM.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use rustix::fs::{fcntl_add_seals, ftruncate, memfd_create, MemfdFlags, Mode, OFlags, SealFlags};
use tce_sidecar::kernel::abi::{self, IocArch, Ioctl, KvmCreateSpaprTce64};
use tce_sidecar::kernel::linux::{self, Linux, SharedMapping};
use tce_sidecar::kernel::{
    ContainerId, Errno, GroupId, Kernel, KernelOp, Mapping, Objects, OwnershipMode, RegionId,
    TableFd, TableId,
};
use tce_sidecar::protocol::MemRegion;

use crate::kvm::{
    adopt, enable_cap, ioctl_int, ioctl_ptr, KvmOneReg, KvmRegs, KvmUserspaceMemoryRegion,
    GUEST_MSR, KVM_CAP_PPC_ENABLE_HCALL, KVM_CAP_PPC_PAPR, KVM_CREATE_VCPU, KVM_EXIT_PAPR_HCALL,
    KVM_GET_ONE_REG, KVM_GET_REGS, KVM_GET_VCPU_MMAP_SIZE, KVM_REG_PPC_LPCR_64, KVM_RUN,
    KVM_SET_ONE_REG, KVM_SET_REGS, KVM_SET_USER_MEMORY_REGION, LPCR_ILE, REG_GPR0, REG_MSR, REG_PC,
};
use crate::scenario::{self, Error, Hcall, LabVm, Sandbox};

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

pub(crate) struct RealVm {
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
    pub(crate) fn create(group_path: &Path) -> Result<Self, Error> {
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
pub(crate) fn status_field<'a>(status: &'a str, name: &str) -> Option<&'a str> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .map(str::trim)
}

/// The first word of a status field's value (`Uid:` has four), or `?`.
pub(crate) fn first_word(value: Option<&str>) -> &str {
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
pub(crate) struct Fds {
    pub(crate) group: Option<OwnedFd>,
    pub(crate) table: Option<OwnedFd>,
    pub(crate) device: Option<OwnedFd>,
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
