use rustix::fs::{fstat, memfd_create, MemfdFlags};

use super::*;
use crate::kernel::model::abi::{CreateSpaprTce64, HcallOutcome, UserMemoryRegion};
use crate::kernel::model::{
    Platform, H_GET_TCE, H_PUT_TCE, H_PUT_TCE_INDIRECT, VFIO_SPAPR_TCE_V2_IOMMU,
};
use crate::protocol::{recv_frame, send_bytes, Header};

/// A server with one connection served on a thread, and the raw client end.
fn connected() -> (ModelServer, UnixStream) {
    let server = ModelServer::new(ModelKernel::new(Platform::powernv(), &[1, 2]));
    let (ours, theirs) = UnixStream::pair().unwrap();
    let s = server.clone();
    std::thread::spawn(move || s.serve_connection(theirs));
    (server, ours)
}

/// A VM whose guest RAM at 0 is `ram` (1 MiB), and its vCPU 0; the KVM fd first.
fn vm_with_ram(client: &ModelClient, ram: &SharedMapping) -> (OwnedFd, OwnedFd, OwnedFd) {
    let kvm = client.open_kvm().unwrap();
    let vm = client.kvm_create_vm(kvm.as_fd()).unwrap();
    let vcpu = client.kvm_create_vcpu(vm.as_fd(), 0).unwrap();
    let region = UserMemoryRegion {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: 1 << 20,
        userspace_addr: ram.addr(),
    };
    client
        .kvm_set_user_memory_region(vm.as_fd(), region)
        .unwrap();
    (kvm, vm, vcpu)
}

/// Sends raw `payload` as request `code` and returns the reply's status word.
fn raw(stream: &UnixStream, code: u32, payload: &[u8], fds: &[BorrowedFd<'_>]) -> i64 {
    send_frame(stream, code, false, payload, fds).unwrap();
    let reply = recv_frame(stream, true).unwrap();
    assert_eq!(reply.header.request, code);
    i64::from_le_bytes(reply.payload[..8].try_into().unwrap())
}

fn neg(e: Errno) -> i64 {
    -i64::from(e.raw_os_error())
}

#[test]
fn request_unknown_op_enosys() {
    let (_s, c) = connected();
    assert_eq!(raw(&c, 999, &[], &[]), neg(Errno::NOSYS));
}

#[test]
fn request_wrong_payload_size_einval() {
    let (_s, c) = connected();
    assert_eq!(
        raw(&c, Op::OpenVfioGroup as u32, &[0; 7], &[]),
        neg(Errno::INVAL)
    );
    assert_eq!(raw(&c, Op::OpenKvm as u32, &[0; 8], &[]), neg(Errno::INVAL));
}

#[test]
fn request_u32_field_too_large_einval() {
    let (_s, c) = connected();
    let group = (1u64 << 32 | 1).to_le_bytes();
    assert_eq!(
        raw(&c, Op::OpenVfioGroup as u32, &group, &[]),
        neg(Errno::INVAL)
    );
}

#[test]
fn request_fd_slot_without_fd_ebadf() {
    let (_s, c) = connected();
    assert_eq!(
        raw(&c, Op::KvmCreateVm as u32, &0u64.to_le_bytes(), &[]),
        neg(Errno::BADF)
    );
    assert_eq!(
        raw(&c, Op::KvmCreateVm as u32, &NO_FD.to_le_bytes(), &[]),
        neg(Errno::BADF)
    );
}

#[test]
fn request_fds_with_payload_bytes_ebadf_and_connection_survives() {
    let (_s, c) = connected();
    let memfd = memfd_create("x", MemfdFlags::CLOEXEC).unwrap();
    let mut frame = Header::new(Op::VfioGetApiVersion as u32, false, 8)
        .to_bytes()
        .to_vec();
    send_bytes(&c, &frame, &[]).unwrap();
    frame.clear();
    frame.extend_from_slice(&0u64.to_le_bytes());
    send_bytes(&c, &frame, &[memfd.as_fd()]).unwrap();
    let reply = recv_frame(&c, true).unwrap();
    assert_eq!(
        i64::from_le_bytes(reply.payload[..8].try_into().unwrap()),
        neg(Errno::BADF)
    );
    assert_eq!(raw(&c, 999, &[], &[]), neg(Errno::NOSYS), "still serving");
}

#[test]
fn request_on_foreign_fd_enotty() {
    let (_s, c) = connected();
    let memfd = memfd_create("not-a-model-file", MemfdFlags::CLOEXEC).unwrap();
    let client = ModelClient::from_stream(c);
    let r = client.vfio_get_api_version(memfd.as_fd());
    assert_eq!(r.map_err(|e| e.errno()), Err(Some(Errno::NOTTY)));
}

#[test]
fn standin_passed_back_names_the_same_file() {
    let (s, c) = connected();
    let client = ModelClient::from_stream(c);
    let container = client.open_vfio_container().unwrap();
    let group = client.open_vfio_group(1).unwrap();
    // A duplicate, like an fd received over another socket, is the same open file.
    let dup = container.try_clone().unwrap();
    client
        .vfio_group_set_container(group.as_fd(), Some(dup.as_fd()))
        .unwrap();
    client
        .vfio_set_iommu(container.as_fd(), VFIO_SPAPR_TCE_V2_IOMMU)
        .unwrap();
    assert_eq!(client.vfio_group_get_status(group.as_fd()).unwrap(), 3);
    // A foreign file is not a container.
    let g2 = client.open_vfio_group(2).unwrap();
    let other = memfd_create("model:vfio-container", MemfdFlags::CLOEXEC).unwrap();
    let r = client.vfio_group_set_container(g2.as_fd(), Some(other.as_fd()));
    assert_eq!(r.map_err(|e| e.errno()), Err(Some(Errno::BADFD)));
    let r = client.vfio_group_set_container(g2.as_fd(), None);
    assert_eq!(r.map_err(|e| e.errno()), Err(Some(Errno::BADF)));
    drop(s);
}

#[test]
fn close_releases_the_file_and_its_standin() {
    let (s, c) = connected();
    let client = ModelClient::from_stream(c);
    let group = client.open_vfio_group(1).unwrap();
    assert_eq!(
        client.open_vfio_group(1).map_err(|e| e.errno()).err(),
        Some(Some(Errno::BUSY))
    );
    let id = s.file_of(group.as_fd()).expect("a model file");
    client.close(group.as_fd()).unwrap();
    assert_eq!(s.with_kernel(|k| k.file_kind(id)), None);
    assert_eq!(s.file_of(group.as_fd()), None);
    // The old stand-in names nothing now; the group opens again.
    assert_eq!(
        client
            .vfio_group_get_status(group.as_fd())
            .map_err(|e| e.errno())
            .err(),
        Some(Some(Errno::NOTTY))
    );
    assert!(client.open_vfio_group(1).is_ok());
}

#[test]
fn memlock_limit_read_from_proc() {
    let limit = proc_memlock_limit(std::process::id()).expect("/proc is readable");
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let cap_ipc_lock = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap() & (1 << 14) != 0)
        .unwrap();
    if cap_ipc_lock {
        assert_eq!(limit, None);
    } else {
        // The shell reports the same soft limit in KiB.
        let out = std::process::Command::new("sh")
            .args(["-c", "ulimit -l"])
            .output()
            .unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        let want = match text.trim() {
            "unlimited" => None,
            kib => Some(kib.parse::<u64>().unwrap() * 1024),
        };
        assert_eq!(limit, want);
    }
}

#[test]
fn local_handle_calls_as_this_process() {
    let server = ModelServer::new(ModelKernel::new(Platform::powernv(), &[1]));
    let me = server.handle();
    let kvm = me.open_kvm().unwrap();
    let vm = me.kvm_create_vm(kvm.as_fd()).unwrap();
    let id = server.file_of(vm.as_fd()).expect("a model file");
    assert_eq!(
        server.with_kernel(|k| k.vm_creator(id)),
        Some(Mm(std::process::id()))
    );
    assert_eq!(me.kvm_check_extension(vm.as_fd(), 142).unwrap(), 1);
}

#[test]
fn table_standin_is_the_entries_memfd() {
    let (_s, c) = connected();
    let client = ModelClient::from_stream(c);
    let (ram, _ram_fd) = guest_ram(&client, 1 << 20).unwrap();
    let (_kvm, vm, vcpu) = vm_with_ram(&client, &ram);
    let args = CreateSpaprTce64 {
        liobn: 9,
        page_shift: 12,
        flags: 0,
        offset: 0,
        size: 1024,
    };
    let table = client.kvm_create_spapr_tce_64(vm.as_fd(), args).unwrap();
    assert_eq!(fstat(&table).unwrap().st_size, 8192);
    let view = SharedMapping::map(table.as_fd(), 8192).unwrap();
    let out = client
        .vcpu_hcall(vcpu.as_fd(), H_PUT_TCE, [9, 0x3000, 0x5003, 0])
        .unwrap();
    assert_eq!(out, HcallOutcome::Completed { ret: 0, value: 0 });
    assert_eq!(view.read_u64(3), Some(0x5003), "host byte order");
    assert!(view.write_u64(4, 0x6001));
    let out = client
        .vcpu_hcall(vcpu.as_fd(), H_GET_TCE, [9, 0x4000, 0, 0])
        .unwrap();
    assert_eq!(
        out,
        HcallOutcome::Completed {
            ret: 0,
            value: 0x6001
        }
    );
    assert_eq!(view.read_u64(1024), None);
    // H_PUT_TCE_INDIRECT is not enabled by default: it exits.
    let out = client
        .vcpu_hcall(vcpu.as_fd(), H_PUT_TCE_INDIRECT, [9, 0, 0, 1])
        .unwrap();
    assert_eq!(out, HcallOutcome::Exit);
    // Guest memory is read through the declared memfd: a big-endian list at gpa 0x1000.
    client
        .kvm_enable_hcall(vm.as_fd(), H_PUT_TCE_INDIRECT, true)
        .unwrap();
    assert!(ram.write_u64(0x1000 / 8, 0x9003u64.to_be()));
    let out = client
        .vcpu_hcall(vcpu.as_fd(), H_PUT_TCE_INDIRECT, [9, 0x8000, 0x1000, 1])
        .unwrap();
    assert_eq!(out, HcallOutcome::Completed { ret: 0, value: 0 });
    assert_eq!(view.read_u64(8), Some(0x9003));
}

/// Every op with arbitrary words and fds drawn from live stand-ins, a foreign memfd and
/// missing slots: the server answers each one and the connection survives.
#[test]
fn arbitrary_requests_get_replies_never_a_dead_server() {
    let (_s, c) = connected();
    let client = ModelClient::from_stream(c.try_clone().unwrap());
    let (ram, ram_fd) = guest_ram(&client, 1 << 20).unwrap();
    let (kvm, vm, vcpu) = vm_with_ram(&client, &ram);
    let container = client.open_vfio_container().unwrap();
    let group = client.open_vfio_group(1).unwrap();
    client
        .vfio_group_set_container(group.as_fd(), Some(container.as_fd()))
        .unwrap();
    client
        .vfio_set_iommu(container.as_fd(), VFIO_SPAPR_TCE_V2_IOMMU)
        .unwrap();
    let dev = client.kvm_create_device(vm.as_fd(), 4, 0).unwrap().unwrap();
    let args = CreateSpaprTce64 {
        liobn: 1,
        page_shift: 12,
        flags: 0,
        offset: 0,
        size: 256,
    };
    let table = client.kvm_create_spapr_tce_64(vm.as_fd(), args).unwrap();
    let foreign = memfd_create("foreign", MemfdFlags::CLOEXEC).unwrap();
    let fds = [
        &kvm, &vm, &vcpu, &container, &group, &dev, &table, &foreign, &ram_fd,
    ];
    let interesting = [
        0,
        1,
        2,
        3,
        7,
        12,
        16,
        24,
        0x1000,
        0x10000,
        1 << 20,
        1 << 30,
        1 << 59,
        ram.addr(),
        u64::MAX,
        u64::MAX >> 12,
        1 << 32,
    ];
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut succeeded = 0;
    for _ in 0..4000 {
        let code = (next() % 38) as u32;
        let n = Op::from_u32(code).map_or((next() % 4) as usize, Op::words);
        let words: Vec<u64> = (0..n)
            .map(|_| match next() % 4 {
                0 => next() % 12,
                1 => next(),
                _ => interesting[(next() % interesting.len() as u64) as usize],
            })
            .collect();
        let attach: Vec<BorrowedFd<'_>> = (0..next() % 4)
            .map(|_| fds[(next() % fds.len() as u64) as usize].as_fd())
            .collect();
        let payload: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let status = raw(&c, code, &payload, &attach);
        assert!(status <= 0, "op {code}: status {status}");
        succeeded += u32::from(status == 0);
    }
    // Enough calls got past the checks to have exercised the kernel, not only the decoder.
    assert!(succeeded > 200, "{succeeded} calls succeeded");
    // Random CLOSEs may have released any of the files; the server itself still works.
    assert!(client.open_vfio_container().is_ok());
}
