//! The model kernel across real processes: this binary serves the model, plays the VMM (the VM
//! creator), and re-executes itself as a second process that receives stand-in fds over a unix
//! socket, exactly as the sidecar receives the VMM's real fds. The second process must get
//! `EIO` and `EPERM` exactly where Linux would, and see the VMM's TCE table through `mmap` (K6).
//!
//! It has its own `main` (harness = false) so that the child role is not a test of its own.

use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use tce_sidecar::kernel::model::server::{CallError, ModelClient, ModelServer, SharedMapping};
use tce_sidecar::kernel::model::*;
use tce_sidecar::protocol::{recv_frame, send_frame};

const ROLE_ENV: &str = "TCE_MODEL_TEST_ROLE";
const MODEL_ENV: &str = "TCE_MODEL_TEST_SOCKET";
const PASS_ENV: &str = "TCE_MODEL_TEST_PASS";
const RAM: u64 = 16 << 20;
const WIN: u64 = 16 << 20;
const LIOBN: u64 = 0x8000_0000;
const RW: u64 = TCE_PCI_READ | TCE_PCI_WRITE;
const TIMEOUT: Duration = Duration::from_secs(30);

/// What the VMM hands to the other process: (stand-in) fds in this order.
const FDS: [&str; 7] = ["vm", "vcpu", "device", "group", "container", "table", "ram"];

fn main() -> ExitCode {
    match std::env::var(ROLE_ENV).as_deref() {
        Ok(role) => child(role),
        Err(_) => {
            let tests: [(&str, fn()); 2] = [
                (
                    "vmm_owns_container_other_process_gets_eio_eperm_and_reads_table",
                    vmm_owns_container_other_process_gets_eio_eperm_and_reads_table,
                ),
                (
                    "sidecar_owns_container_guest_maps_exit_and_vmm_gets_eperm",
                    sidecar_owns_container_guest_maps_exit_and_vmm_gets_eperm,
                ),
            ];
            println!("running {} tests", tests.len());
            for (name, test) in tests {
                test();
                println!("test {name} ... ok");
            }
            ExitCode::SUCCESS
        }
    }
}

/// The VMM's side of a VM on the model: guest RAM in a memslot, a vCPU, a container with
/// group 1, a KVM TCE table and the kvm-vfio device with the group added.
struct Vmm {
    model: ModelClient,
    ram: SharedMapping,
    ram_fd: OwnedFd,
    vm: OwnedFd,
    vcpu: OwnedFd,
    device: OwnedFd,
    group: OwnedFd,
    container: OwnedFd,
    table: Option<OwnedFd>,
}

impl Vmm {
    fn new(socket: &Path) -> Self {
        let model = ModelClient::connect(socket).expect("connect to the model");
        let (ram, ram_fd) =
            tce_sidecar::kernel::model::server::guest_ram(&model, RAM as usize).expect("guest RAM");
        let kvm = model.open_kvm().unwrap();
        let vm = model.kvm_create_vm(kvm.as_fd()).unwrap();
        let vcpu = model.kvm_create_vcpu(vm.as_fd(), 0).unwrap();
        let region = UserMemoryRegion {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: RAM,
            userspace_addr: ram.addr(),
        };
        model
            .kvm_set_user_memory_region(vm.as_fd(), region)
            .unwrap();
        let container = model.open_vfio_container().unwrap();
        let group = model.open_vfio_group(1).unwrap();
        model
            .vfio_group_set_container(group.as_fd(), Some(container.as_fd()))
            .unwrap();
        model
            .vfio_set_iommu(container.as_fd(), VFIO_SPAPR_TCE_V2_IOMMU)
            .unwrap();
        let device = model
            .kvm_create_device(vm.as_fd(), KVM_DEV_TYPE_VFIO, 0)
            .unwrap()
            .expect("a device");
        model
            .kvm_vfio_file_add(device.as_fd(), Some(group.as_fd()))
            .unwrap();
        Vmm {
            model,
            ram,
            ram_fd,
            vm,
            vcpu,
            device,
            group,
            container,
            table: None,
        }
    }

    fn create_table(&mut self) {
        let args = CreateSpaprTce64 {
            liobn: LIOBN,
            page_shift: 12,
            flags: 0,
            offset: 0,
            size: WIN >> 12,
        };
        self.table = Some(
            self.model
                .kvm_create_spapr_tce_64(self.vm.as_fd(), args)
                .unwrap(),
        );
    }

    fn table(&self) -> BorrowedFd<'_> {
        self.table.as_ref().expect("table").as_fd()
    }

    fn put_tce(&self, ioba: u64, tce: u64) -> HcallOutcome {
        self.model
            .vcpu_hcall(self.vcpu.as_fd(), H_PUT_TCE, [LIOBN, ioba, tce, 0])
            .unwrap()
    }

    fn fds(&self) -> [BorrowedFd<'_>; 7] {
        [
            self.vm.as_fd(),
            self.vcpu.as_fd(),
            self.device.as_fd(),
            self.group.as_fd(),
            self.container.as_fd(),
            self.table(),
            self.ram_fd.as_fd(),
        ]
    }
}

/// A model server on a fresh socket, served by a thread of this process.
fn start_server(dir: &Path) -> PathBuf {
    let path = dir.join("model.sock");
    let listener = UnixListener::bind(&path).expect("bind the model socket");
    let server = ModelServer::new(ModelKernel::new(Platform::powernv(), &[1]));
    std::thread::spawn(move || server.serve(listener));
    path
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tce-model-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// Runs this binary as `role`, hands it the VMM's fds and returns its report lines.
fn run_child(role: &str, dir: &Path, model: &Path, fds: &[BorrowedFd<'_>]) -> Vec<String> {
    let pass_path = dir.join(format!("{role}.sock"));
    let listener = UnixListener::bind(&pass_path).expect("bind the pass socket");
    let mut child = Command::new(std::env::current_exe().expect("own path"))
        .env(ROLE_ENV, role)
        .env(MODEL_ENV, model)
        .env(PASS_ENV, &pass_path)
        .spawn()
        .expect("spawn the second process");
    let (stream, _) = listener.accept().expect("child connects");
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    send_frame(&stream, 1, false, &[], fds).expect("pass the fds");
    let report = recv_frame(&stream, false).expect("child reports");
    let status = child.wait().expect("child exits");
    assert!(status.success(), "{role} process failed: {status}");
    String::from_utf8(report.payload)
        .expect("utf-8 report")
        .lines()
        .map(str::to_owned)
        .collect()
}

/// One line of the child's report: `name ok <value>` or `name err <errno>`.
fn line<T: std::fmt::Debug>(name: &str, r: Result<T, CallError>) -> String {
    match r {
        Ok(v) => format!("{name} ok {v:?}"),
        Err(e) => match e.errno() {
            Some(errno) => format!("{name} err {}", errno.raw_os_error()),
            None => format!("{name} broken {e}"),
        },
    }
}

fn err(name: &str, errno: Errno) -> String {
    format!("{name} err {}", errno.raw_os_error())
}

fn child(role: &str) -> ExitCode {
    let model =
        ModelClient::connect(std::env::var(MODEL_ENV).expect("model socket")).expect("connect");
    let pass = UnixStream::connect(std::env::var(PASS_ENV).expect("pass socket")).expect("connect");
    pass.set_read_timeout(Some(TIMEOUT)).unwrap();
    let frame = recv_frame(&pass, false).expect("receive the fds");
    assert_eq!(frame.fds.len(), FDS.len(), "fds received");
    let [vm, vcpu, device, group, container, table, ram_fd] = FDS.map(|name| {
        let i = FDS.iter().position(|n| *n == name).unwrap_or_default();
        frame.fds[i].as_fd()
    });
    let mut report = Vec::new();
    match role {
        "intruder" => {
            // K1: every VM, vCPU and device call.
            report.push(line(
                "file_add",
                model.kvm_vfio_file_add(device, Some(group)),
            ));
            report.push(line(
                "set_spapr_tce",
                model.kvm_vfio_set_spapr_tce(device, Some(group), Some(table)),
            ));
            report.push(line(
                "has_device_attr",
                model.kvm_has_device_attr(device, KVM_DEV_VFIO_FILE, KVM_DEV_VFIO_FILE_ADD),
            ));
            let args = CreateSpaprTce64 {
                liobn: 1,
                page_shift: 12,
                flags: 0,
                offset: 0,
                size: 1,
            };
            report.push(line(
                "create_spapr_tce",
                model.kvm_create_spapr_tce_64(vm, args).map(|_| ()),
            ));
            report.push(line(
                "hcall",
                model.vcpu_hcall(vcpu, H_PUT_TCE, [LIOBN, 0, 0, 0]),
            ));
            // K2: the container answers its owner only, but for CHECK_EXTENSION.
            report.push(line("get_info", model.vfio_spapr_tce_get_info(container)));
            report.push(line(
                "map_dma",
                model.vfio_map_dma(container, DmaMap::new(0x10000, 0, 4096)),
            ));
            report.push(line(
                "tce_create",
                model.vfio_tce_create(container, TceCreate::new(16, 1 << 30, 1)),
            ));
            report.push(line(
                "check_extension",
                model.vfio_check_extension(container, VFIO_SPAPR_TCE_V2_IOMMU),
            ));
            report.push(line("group_status", model.vfio_group_get_status(group)));
            // K6: the table maps here too; write entry 2 for the VMM to read back.
            let view = SharedMapping::map(table, 4096).expect("map the TCE table");
            report.push(format!(
                "table_entry_1 ok {:#x}",
                view.read_u64(1).unwrap_or_default()
            ));
            view.write_u64(2, 0x7000 | RW);
        }
        "owner" => {
            // The sidecar maps guest RAM from the VMM's memfd and owns the container.
            let ram = SharedMapping::map(ram_fd, RAM as usize).expect("map guest RAM");
            report.push(line(
                "mm_map",
                model.mm_map(ram_fd, ram.addr(), RAM, 0, 12, true),
            ));
            report.push(line(
                "register",
                model.vfio_register_memory(container, RegisterMemory::new(ram.addr(), RAM)),
            ));
            report.push(line(
                "remove_default",
                model.vfio_tce_remove(container, TceRemove::new(0)),
            ));
            report.push(line(
                "tce_create",
                model.vfio_tce_create(container, TceCreate::new(12, WIN, 1)),
            ));
            report.push(line(
                "map_dma",
                model.vfio_map_dma(container, DmaMap::new(ram.addr() + 0x5000, 0x1000, 0x1000)),
            ));
            report.push(line(
                "iommu_entry_mm_is_mine",
                model
                    .iommu_entry(1, 0x1000)
                    .map(|e| e.map(|t| t.mm.0 == std::process::id())),
            ));
            std::mem::forget(ram); // keep the memory mapped until exit, as a sidecar would
        }
        other => panic!("unknown role {other}"),
    }
    let text = report.join("\n");
    send_frame(&pass, 2, false, text.as_bytes(), &[]).expect("send the report");
    let _ = std::io::stdout().flush();
    ExitCode::SUCCESS
}

fn vmm_owns_container_other_process_gets_eio_eperm_and_reads_table() {
    let dir = temp_dir("vmm-owns");
    let socket = start_server(&dir);
    let mut vmm = Vmm::new(&socket);
    let m = &vmm.model;
    m.vfio_register_memory(
        vmm.container.as_fd(),
        RegisterMemory::new(vmm.ram.addr(), RAM),
    )
    .unwrap();
    m.vfio_tce_remove(vmm.container.as_fd(), TceRemove::new(0))
        .unwrap();
    assert_eq!(
        m.vfio_tce_create(vmm.container.as_fd(), TceCreate::new(12, WIN, 1))
            .unwrap(),
        0
    );
    vmm.create_table();
    vmm.model
        .kvm_vfio_set_spapr_tce(
            vmm.device.as_fd(),
            Some(vmm.group.as_fd()),
            Some(vmm.table()),
        )
        .unwrap();
    assert_eq!(
        vmm.put_tce(0x1000, 0x3000 | RW),
        HcallOutcome::Completed {
            ret: H_SUCCESS,
            value: 0
        }
    );

    let report = run_child("intruder", &dir, &socket, &vmm.fds());
    let expected = [
        err("file_add", Errno::IO),
        err("set_spapr_tce", Errno::IO),
        err("has_device_attr", Errno::IO),
        err("create_spapr_tce", Errno::IO),
        err("hcall", Errno::IO),
        err("get_info", Errno::PERM),
        err("map_dma", Errno::PERM),
        err("tce_create", Errno::PERM),
        "check_extension ok 1".to_owned(),
        format!(
            "group_status ok {}",
            VFIO_GROUP_FLAGS_VIABLE | VFIO_GROUP_FLAGS_CONTAINER_SET
        ),
        format!("table_entry_1 ok {:#x}", 0x3000 | RW),
    ];
    assert_eq!(report, expected);
    // The other process's write through its mapping is what the kernel's H_GET_TCE reads.
    let got = vmm
        .model
        .vcpu_hcall(vmm.vcpu.as_fd(), H_GET_TCE, [LIOBN, 0x2000, 0, 0])
        .unwrap();
    assert_eq!(
        got,
        HcallOutcome::Completed {
            ret: H_SUCCESS,
            value: 0x7000 | RW
        }
    );
    // And nothing the intruder tried changed the owner's view.
    let entry = vmm
        .model
        .iommu_entry(1, 0x1000)
        .unwrap()
        .expect("programmed by KVM");
    assert_eq!(
        (entry.mm, entry.ua),
        (Mm(std::process::id()), vmm.ram.addr() + 0x3000)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn sidecar_owns_container_guest_maps_exit_and_vmm_gets_eperm() {
    let dir = temp_dir("sidecar-owns");
    let socket = start_server(&dir);
    let mut vmm = Vmm::new(&socket);
    vmm.create_table();
    let report = run_child("owner", &dir, &socket, &vmm.fds());
    let expected = [
        "mm_map ok ()",
        "register ok ()",
        "remove_default ok ()",
        "tce_create ok 0",
        "map_dma ok 0",
        "iommu_entry_mm_is_mine ok Some(true)",
    ];
    assert_eq!(report, expected);
    // K2: the VMM is locked out of the container now.
    let m = &vmm.model;
    let reg = m.vfio_register_memory(
        vmm.container.as_fd(),
        RegisterMemory::new(vmm.ram.addr(), RAM),
    );
    assert_eq!(reg.map_err(|e| e.errno()), Err(Some(Errno::PERM)));
    // The association itself checks no mm, so the VMM can install it...
    m.kvm_vfio_set_spapr_tce(
        vmm.device.as_fd(),
        Some(vmm.group.as_fd()),
        Some(vmm.table()),
    )
    .unwrap();
    // ...but K3: KVM looks the guest's pages up in the VMM's mm, where nothing is registered.
    for i in 0..4 {
        assert_eq!(
            vmm.put_tce(0x2000 + (i << 12), (0x8000 + (i << 12)) | RW),
            HcallOutcome::Exit
        );
    }
    let stats = vmm.model.hcall_stats(vmm.vm.as_fd()).unwrap();
    assert_eq!(
        stats,
        HcallStats {
            in_kernel: 0,
            exits: 4
        }
    );
    let _ = std::fs::remove_dir_all(&dir);
}
