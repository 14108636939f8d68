//! The `linux` backend against this machine's real KVM: the kvm-vfio device answers only the
//! process that created the VM (K1), whoever else holds its fd.
//!
//! Each test spawns this test binary again, filtered to the same test, as the VM's creator:
//! the child creates a VM and its kvm-vfio device, makes the device calls itself, and sends its
//! results and the device fd back over a unix socket (SCM_RIGHTS). The parent then makes the
//! same calls on the received fd. Spawning rather than forking keeps the harness's threads out
//! of the child. Without `/dev/kvm` the tests print a `SKIP:` line and pass.

use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rustix::event::EventfdFlags;
use rustix::fs::{Mode, OFlags};
use tce_sidecar::kernel::abi::{
    KVM_DEV_VFIO_FILE, KVM_DEV_VFIO_FILE_ADD, KVM_DEV_VFIO_GROUP_SET_SPAPR_TCE,
};
use tce_sidecar::kernel::linux::{self, Linux};
use tce_sidecar::kernel::{
    Errno, GroupId, Kernel, KernelOp, Mapping, Objects, Output, RegionId, TableFd, TableId,
};
use tce_sidecar::protocol::{recv_frame, send_frame};

/// Set in the child's environment to the socket path it reports to.
const CREATOR_SOCKET: &str = "TCE_SIDECAR_TEST_VM_CREATOR_SOCKET";
/// Request code of the child's single report frame (a test transport, not a protocol request).
const REPORT: u32 = 0;
const TIMEOUT: Duration = Duration::from_secs(30);

const HAS_FILE_ADD: KernelOp = KernelOp::KvmHasDeviceAttr {
    attr_group: KVM_DEV_VFIO_FILE,
    attr: KVM_DEV_VFIO_FILE_ADD,
};
const HAS_SET_SPAPR_TCE: KernelOp = KernelOp::KvmHasDeviceAttr {
    attr_group: KVM_DEV_VFIO_FILE,
    attr: KVM_DEV_VFIO_GROUP_SET_SPAPR_TCE,
};
const FILE_ADD: KernelOp = KernelOp::KvmFileAdd { group: GroupId(1) };
const FILE_DEL: KernelOp = KernelOp::KvmFileDel { group: GroupId(1) };
const SET_SPAPR_TCE: KernelOp = KernelOp::KvmSetSpaprTce {
    group: GroupId(1),
    table: TableId(1),
};

/// The device calls both processes make, in order.
const DEVICE_OPS: [KernelOp; 5] = [
    HAS_FILE_ADD,
    HAS_SET_SPAPR_TCE,
    FILE_ADD,
    FILE_DEL,
    SET_SPAPR_TCE,
];

/// The kvm-vfio device and stand-ins for a VFIO group and a KVM TCE table: eventfds, since
/// this host has no VFIO group and (x86) no sPAPR TCE table.
struct DeviceObjects {
    device: OwnedFd,
    group: OwnedFd,
    table: OwnedFd,
}

impl DeviceObjects {
    fn new(device: OwnedFd) -> Self {
        let eventfd = || rustix::event::eventfd(0, EventfdFlags::CLOEXEC).unwrap();
        Self {
            device,
            group: eventfd(),
            table: eventfd(),
        }
    }

    fn run(&self, ops: &[KernelOp]) -> Vec<Result<Output, Errno>> {
        let mut kernel = Linux::new();
        ops.iter().map(|op| kernel.execute(op, self)).collect()
    }
}

impl Objects for DeviceObjects {
    fn group(&self, _: GroupId) -> Option<BorrowedFd<'_>> {
        Some(self.group.as_fd())
    }
    fn table(&self, _: TableId) -> Option<TableFd<'_>> {
        Some(TableFd {
            fd: self.table.as_fd(),
            entries: 0,
            view: None,
        })
    }
    fn region(&self, _: RegionId) -> Option<Mapping> {
        None
    }
    fn kvm_vfio_device(&self) -> Option<BorrowedFd<'_>> {
        Some(self.device.as_fd())
    }
}

fn encode(results: &[Result<Output, Errno>]) -> Vec<u8> {
    let code = |r: &Result<Output, Errno>| match r {
        Ok(Output::Done) => 0,
        Ok(other) => panic!("a device call returned an output: {other:?}"),
        Err(errno) => errno.raw_os_error(),
    };
    results.iter().flat_map(|r| code(r).to_le_bytes()).collect()
}

fn decode(bytes: &[u8]) -> Vec<Result<Output, Errno>> {
    bytes
        .chunks_exact(4)
        .map(|c| match i32::from_le_bytes(c.try_into().unwrap()) {
            0 => Ok(Output::Done),
            raw => Err(Errno::from_raw_os_error(raw)),
        })
        .collect()
}

/// The child's part: create the VM and device, make the calls, report, wait for the parent.
fn vm_creator(socket: &str) {
    let kvm = rustix::fs::open("/dev/kvm", OFlags::RDWR | OFlags::CLOEXEC, Mode::empty())
        .expect("open /dev/kvm");
    let vm = linux::create_vm(kvm.as_fd()).expect("KVM_CREATE_VM");
    let device = linux::create_kvm_vfio_device(vm.as_fd()).expect("KVM_CREATE_DEVICE(VFIO)");
    let objects = DeviceObjects::new(device);
    let report = encode(&objects.run(&DEVICE_OPS));
    let mut stream = UnixStream::connect(socket).expect("connect to the parent");
    send_frame(&stream, REPORT, false, &report, &[objects.device.as_fd()]).expect("send report");
    // Stay alive, the VM with it, until the parent has made its calls and closes the socket.
    let _ = stream.read(&mut [0u8; 1]);
}

/// A VM creator in another process: its results, and the device fd it sent.
struct Creator {
    results: Vec<Result<Output, Errno>>,
    device: OwnedFd,
    child: Child,
    stream: UnixStream,
}

impl Creator {
    /// Spawns this binary, filtered to `test`, as the VM's creator. `None` (after printing a
    /// `SKIP:` line) when this machine has no usable `/dev/kvm`.
    fn spawn(test: &str) -> Option<Creator> {
        if !Path::new("/dev/kvm").exists() {
            let _ = writeln!(std::io::stderr(), "SKIP: {test} (/dev/kvm missing)");
            return None;
        }
        if let Err(e) = rustix::fs::open("/dev/kvm", OFlags::RDWR | OFlags::CLOEXEC, Mode::empty())
        {
            let _ = writeln!(
                std::io::stderr(),
                "SKIP: {test} (cannot open /dev/kvm: {e})"
            );
            return None;
        }
        let path = socket_path(test);
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        listener.set_nonblocking(true).unwrap();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", test, "--nocapture", "--test-threads=1"])
            .env(CREATOR_SOCKET, &path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stream = accept(&listener, &mut child);
        let _ = std::fs::remove_file(&path);
        let mut frame = recv_frame(&stream, false).expect("the child's report");
        assert_eq!(frame.header.request, REPORT);
        assert_eq!(frame.fds.len(), 1, "the child sends exactly the device fd");
        let device = frame.fds.pop().unwrap();
        Some(Creator {
            results: decode(&frame.payload),
            device,
            child,
            stream,
        })
    }

    /// Lets the child exit, and fails the test if it did not exit cleanly.
    fn finish(self) {
        drop(self.stream);
        let output = self.child.wait_with_output().unwrap();
        assert!(output.status.success(), "VM creator failed: {output:?}");
    }
}

fn socket_path(test: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{test}.{}.sock", std::process::id()))
}

/// Accepts the child's connection; panics with the child's output if it exits first.
fn accept(listener: &UnixListener, child: &mut Child) -> UnixStream {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).unwrap();
                return stream;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("accept: {e}"),
        }
        if child.try_wait().unwrap().is_some() || Instant::now() > deadline {
            let _ = child.kill();
            let mut out = String::new();
            let mut err = String::new();
            let _ = child.stdout.take().unwrap().read_to_string(&mut out);
            let _ = child.stderr.take().unwrap().read_to_string(&mut err);
            panic!("VM creator never reported.\nstdout:\n{out}\nstderr:\n{err}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn kvm_vfio_device_call_from_other_process_eio() {
    if let Ok(socket) = std::env::var(CREATOR_SOCKET) {
        return vm_creator(&socket);
    }
    let Some(creator) = Creator::spawn("kvm_vfio_device_call_from_other_process_eio") else {
        return;
    };
    let objects = DeviceObjects::new(creator.device.try_clone().unwrap());
    // K1: kvm_device_ioctl() refuses any process whose mm is not the VM's before it looks at
    // the call, so every device call fails with EIO, whatever fds the attribute names.
    let results = objects.run(&DEVICE_OPS);
    assert_eq!(results, vec![Err(Errno::IO); DEVICE_OPS.len()]);
    creator.finish();
}

#[test]
fn kvm_vfio_device_call_from_creator_reaches_kvm_vfio() {
    if let Ok(socket) = std::env::var(CREATOR_SOCKET) {
        return vm_creator(&socket);
    }
    let Some(creator) = Creator::spawn("kvm_vfio_device_call_from_creator_reaches_kvm_vfio") else {
        return;
    };
    // The same calls from the creator reach virt/kvm/vfio.c, and its answers are these:
    let expected = vec![
        // kvm_vfio_has_attr() advertises FILE_ADD.
        Ok(Output::Done),
        // GROUP_SET_SPAPR_TCE exists only with CONFIG_SPAPR_TCE_IOMMU (powerpc); elsewhere
        // the attribute is unknown: ENXIO.
        Err(Errno::NXIO),
        // kvm_vfio_file_add(): the fd is open but not a VFIO file: EINVAL.
        Err(Errno::INVAL),
        // kvm_vfio_file_del(): the fd was never added: ENOENT.
        Err(Errno::NOENT),
        // kvm_vfio_set_file() rejects the unknown attribute before reading its payload: ENXIO.
        Err(Errno::NXIO),
    ];
    assert_eq!(creator.results, expected);
    creator.finish();
}

#[test]
fn kvm_check_extension_on_x86_reports_no_spapr_tce_vfio() {
    if !Path::new("/dev/kvm").exists() {
        eprintln!("SKIP: kvm_check_extension_on_x86_reports_no_spapr_tce_vfio (/dev/kvm missing)");
        return;
    }
    let kvm = rustix::fs::open("/dev/kvm", OFlags::RDWR | OFlags::CLOEXEC, Mode::empty()).unwrap();
    // KVM_CAP_USER_MEMORY (3) exists on every KVM: proves the ioctl number reaches KVM.
    assert!(linux::kvm_check_extension(kvm.as_fd(), 3).unwrap() > 0);
    let spapr = linux::kvm_check_extension(kvm.as_fd(), 142).unwrap();
    if cfg!(target_arch = "x86_64") {
        assert_eq!(spapr, 0, "x86 KVM has no sPAPR TCE");
        assert!(!linux::host_caps().spapr_tce_vfio);
    }
}
