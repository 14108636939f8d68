//! The real-kernel lab's scenario (tests/lab/scenario.rs) on the model kernel, with the real
//! `tce-sidecar` binary serving the model (`--kernel model`) as a separate process. The counts
//! asserted here are the ones the lab's guest saw on Linux 6.12 (tests/lab/run.sh); any
//! difference between the two kernels is a model bug.

mod common;
#[path = "lab/scenario.rs"]
#[allow(dead_code)]
mod scenario;

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use scenario::{Error, Hcall, LabVm, Outcome, Sandbox};
use tce_sidecar::client::model_vm::{GuestTable, ModelVm};
use tce_sidecar::kernel::model::server::ModelClient;
use tce_sidecar::kernel::model::HcallOutcome;
use tce_sidecar::kernel::{Errno, Kernel, OwnershipMode};
use tce_sidecar::protocol::MemRegion;

const IOMMU_GROUP: u32 = 1;

struct Sidecar {
    child: Child,
    socket: PathBuf,
    model_socket: PathBuf,
    dir: PathBuf,
}

impl Sidecar {
    fn start(name: &str) -> Sidecar {
        let dir = std::env::temp_dir().join(format!("tce-lab-model-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // The daemon, an unprivileged user, creates its sockets here.
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .unwrap();
        let socket = dir.join("sidecar.sock");
        let mut command = Command::new(common::BIN);
        let options = common::unprivileged(&mut command, &[]);
        let child = command
            .args(["--kernel", "model", "--log-level", "warn", "--socket-path"])
            .arg(&socket)
            .args(options)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let model_socket = dir.join("sidecar.sock.model");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(socket.exists() && model_socket.exists()) {
            assert!(
                Instant::now() < deadline,
                "the sidecar did not create its sockets"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Sidecar {
            child,
            socket,
            model_socket,
            dir,
        }
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

/// The scenario's VM on the model: hypercalls are issued one by one through the model's vCPU.
struct ModelLab {
    socket: PathBuf,
    model: ModelClient,
    vm: Option<ModelVm>,
    table: Option<GuestTable>,
    /// Whether the table is a model file (a KVM table) rather than a plain memfd.
    kvm_table: bool,
    program: Vec<Hcall>,
    next: usize,
    results: Vec<i64>,
}

impl ModelLab {
    fn new(model_socket: &Path) -> Result<Self, Error> {
        let mut vm = ModelVm::create(model_socket)?;
        vm.add_ram(0, 0, scenario::RAM_SIZE)?;
        Ok(Self {
            socket: model_socket.to_owned(),
            model: ModelClient::connect(model_socket)?,
            vm: Some(vm),
            table: None,
            kvm_table: false,
            program: Vec::new(),
            next: 0,
            results: Vec::new(),
        })
    }

    fn vm(&self) -> &ModelVm {
        self.vm.as_ref().expect("the VM is open")
    }
}

impl LabVm for ModelLab {
    /// The model's workers are real processes of this host: their confinement is checked too.
    fn worker_sandbox(&self, worker_pid: Option<u32>) -> Option<Result<Sandbox, String>> {
        let read = |pid: u32| -> Result<Sandbox, String> {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
                .map_err(|e| format!("reading /proc/{pid}/status: {e}"))?;
            let number = |name: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .and_then(|v| v.trim().parse().ok())
            };
            Ok(Sandbox {
                pid,
                seccomp: number("Seccomp:"),
                no_new_privs: number("NoNewPrivs:"),
            })
        };
        Some(
            worker_pid
                .ok_or_else(|| "no worker_pid in the session's GET_STATUS entry".to_string())
                .and_then(read),
        )
    }

    fn ram(&self) -> (MemRegion, BorrowedFd<'_>) {
        let ram = &self.vm().ram()[0];
        (ram.region, ram.memfd.as_fd())
    }
    fn write_ram(&self, gpa: u64, value: u64) {
        assert!(self.vm().ram()[0]
            .mapping
            .write_u64((gpa / 8) as usize, value));
    }
    fn read_ram(&self, gpa: u64) -> u64 {
        self.vm().ram()[0]
            .mapping
            .read_u64((gpa / 8) as usize)
            .unwrap()
    }
    fn kvm_vfio_device(&self) -> Result<OwnedFd, Error> {
        Ok(self.vm().kvm_vfio_device()?)
    }
    fn kernel(&self) -> Result<Box<dyn Kernel + Send>, Error> {
        Ok(Box::new(self.vm().kernel()?))
    }
    fn iommu_group(&self) -> u32 {
        IOMMU_GROUP
    }
    fn open_group(&mut self) -> Result<OwnedFd, Error> {
        Ok(self.vm.as_mut().expect("open").open_group(IOMMU_GROUP)?)
    }
    fn make_table(&mut self, mode: OwnershipMode) -> Result<OwnedFd, Error> {
        let (l, s, b, e) = (
            scenario::LIOBN,
            scenario::PAGE_SHIFT,
            scenario::BUS_OFFSET,
            scenario::ENTRIES,
        );
        let table = match mode {
            OwnershipMode::Accelerated => self.vm().kvm_table(l, s, b, e)?,
            OwnershipMode::Isolated => self.vm().userspace_table(l, s, b, e)?,
        };
        let fd = table.fd.try_clone()?;
        self.table = Some(table);
        self.kvm_table = mode == OwnershipMode::Accelerated;
        Ok(fd)
    }
    fn write_table(&self, index: u64, tce: u64) {
        let table = self.table.as_ref().expect("a table");
        assert!(table.mapping.write_u64(index as usize, tce));
    }
    fn load(&mut self, program: &[Hcall]) -> Result<(), Error> {
        self.program = program.to_vec();
        self.next = 0;
        self.results.clear();
        Ok(())
    }
    fn run(&mut self) -> Result<Option<Hcall>, Error> {
        while let Some(h) = self.program.get(self.next).copied() {
            self.next += 1;
            match self.vm().hcall(h.number, h.args)? {
                HcallOutcome::Completed { ret, .. } => self.results.push(ret),
                HcallOutcome::Exit => return Ok(Some(h)),
            }
        }
        Ok(None)
    }
    fn complete(&mut self, ret: i64) {
        self.results.push(ret);
    }
    fn results(&self) -> Result<Vec<i64>, Error> {
        Ok(self.results.clone())
    }
    fn locked_bytes(&self, pid: u32) -> Result<u64, Error> {
        Ok(self.model.mm_stats(Some(pid))?.locked_vm_pages * 4096)
    }
    fn refusals(&mut self, _container_owner: u32) -> Result<Option<(Errno, Errno)>, Error> {
        // The model's EIO and EPERM from other processes: tests/model_cross_process.rs.
        Ok(None)
    }
    fn close_objects(&mut self) -> Result<(), Error> {
        let table = self.table.take();
        if let Some(vm) = self.vm.take() {
            let fds: Vec<&OwnedFd> = table
                .iter()
                .filter(|_| self.kvm_table)
                .map(|t| &t.fd)
                .collect();
            vm.close(&fds)?;
        }
        Ok(())
    }
    fn group_reattachable(&mut self) -> Result<(), Error> {
        let model = ModelClient::connect(&self.socket)?;
        let group = model.open_vfio_group(IOMMU_GROUP)?;
        let container = model.open_vfio_container()?;
        model.vfio_group_set_container(group.as_fd(), Some(container.as_fd()))?;
        model.vfio_set_iommu(
            container.as_fd(),
            tce_sidecar::kernel::abi::VFIO_SPAPR_TCE_v2_IOMMU,
        )?;
        model.vfio_group_unset_container(group.as_fd())?;
        model.close(container.as_fd())?;
        model.close(group.as_fd())?;
        Ok(())
    }
}

fn session(mode: OwnershipMode) -> Outcome {
    let sidecar = Sidecar::start(match mode {
        OwnershipMode::Accelerated => "acc",
        OwnershipMode::Isolated => "iso",
    });
    let mut vm = ModelLab::new(&sidecar.model_socket).unwrap();
    let outcome = scenario::run_session(&mut vm, &sidecar.socket, sidecar.child.id(), mode)
        .unwrap_or_else(|e| panic!("{mode:?} session failed: {e}"));
    println!("{}", scenario::summary("model", mode, &Ok(outcome.clone())));
    assert_eq!(outcome.failures(mode), Vec::<String>::new());
    outcome
}

#[test]
fn lab_scenario_accelerated_all_in_kernel() {
    let o = session(OwnershipMode::Accelerated);
    assert_eq!(
        (
            o.hypercalls,
            o.in_kernel,
            o.exits,
            o.forwarded,
            o.maps,
            o.unmaps
        ),
        (97, 97, 0, 0, 0, 0)
    );
}

#[test]
fn lab_scenario_isolated_every_update_forwarded_and_mapped() {
    let o = session(OwnershipMode::Isolated);
    assert_eq!(
        (
            o.hypercalls,
            o.in_kernel,
            o.exits,
            o.forwarded,
            o.maps,
            o.unmaps
        ),
        (97, 0, 97, 97, 64, 33)
    );
}
