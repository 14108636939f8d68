//! The `tce-sidecar` binary's life: how it gets its socket (`--socket-path`, `--fd`, systemd
//! socket activation), what it prints for `--print-capabilities`, whom it refuses (peer uid,
//! session limit), and an orderly SIGTERM with sessions open.

mod common;

use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::Command;
use std::time::Duration;

use common::{
    registered_left_at_end, run_bounded, sessions, wait_until, Listen, Sidecar, TestDir, BIN,
    IO_TIMEOUT,
};
use rustix::io::Errno;
use rustix::process::Signal;
use tce_sidecar::client::model_vm::ModelVm;
use tce_sidecar::client::Client;
use tce_sidecar::kernel::OwnershipMode;
use tce_sidecar::protocol::{
    decode_reply, encode_request, recv_frame, send_frame, GroupDesc, Reply, Request, TableDesc,
    TceEntries, TceUpdate, FEATURES_KNOWN,
};

const RAM: u64 = 1 << 20;

/// One request and its reply, on a raw connection.
fn request(stream: &UnixStream, request: &Request) -> Reply {
    send_frame(
        stream,
        request.code() as u32,
        false,
        &encode_request(request),
        &[],
    )
    .expect("send a request");
    let frame = recv_frame(stream, true).expect("a reply");
    assert_eq!(frame.header.request, request.code() as u32);
    decode_reply(&frame.header, &frame.payload, frame.fds.len()).expect("a well-formed reply")
}

/// The peer closes the connection: the next read sees end of stream (not a timeout).
fn assert_closed(stream: &mut UnixStream) {
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Ok(0) => {}
        Ok(_) => panic!("unexpected data after the refusal"),
        Err(err) => panic!("the connection is still open: {err}"),
    }
}

fn listener(dir: &TestDir) -> UnixListener {
    UnixListener::bind(dir.path().join("sidecar.sock")).expect("bind the launcher's socket")
}

/// The socket file appears only once it listens (bound under a temporary name, then renamed),
/// so a client that sees it is never refused; a path too long for the temporary name is bound
/// in place. No temporary file is left behind.
#[test]
fn bound_socket_listens_as_soon_as_it_exists() {
    let dir = TestDir::new("bind");
    let long_name = "s".repeat(107 - dir.path().as_os_str().len() - 1);
    for name in ["sidecar.sock", long_name.as_str()] {
        let path = dir.path().join(name);
        let listener = tce_sidecar::daemon::bind(&path).expect("bind");
        UnixStream::connect(&path).expect("a client that sees the socket is served");
        let entries: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(entries, [std::ffi::OsString::from(name)]);
        let mode = std::fs::metadata(&path).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        drop(listener);
        std::fs::remove_file(&path).unwrap();
    }
}

/// A handshake and a status round trip on a daemon that got its socket from its launcher.
fn assert_serves(sidecar: &Sidecar) {
    let stream = sidecar.connect();
    let features = request(&stream, &Request::GetFeatures);
    assert_eq!(features.status, 0, "{}", features.text);
    assert_eq!(
        features.body,
        FEATURES_KNOWN.to_le_bytes(),
        "the model offers every feature"
    );
    let status = sidecar.status();
    assert_eq!(status["daemon"]["kernel"], "model");
    assert_eq!(sessions(&status).len(), 1, "{status}");
}

#[test]
fn fd_option_inherited_listener_served_and_left_in_place() {
    let dir = TestDir::new("fd");
    let listener = listener(&dir);
    let mut sidecar = Sidecar::start_with(dir, Listen::Fd(listener), &[]);
    assert_serves(&sidecar);
    sidecar.signal(Signal::TERM);
    let exit = sidecar
        .wait_exit(Duration::from_secs(2))
        .expect("exits on SIGTERM");
    assert!(exit.success(), "{exit}");
    // The socket file belongs to whoever created it; the daemon removes only its own files.
    assert!(
        sidecar.socket.exists(),
        "the inherited socket's file is kept"
    );
    assert!(
        !sidecar.model_socket.exists(),
        "the model socket is removed"
    );
}

#[test]
fn socket_activation_listen_fds_served() {
    let dir = TestDir::new("activation");
    let listener = listener(&dir);
    let sidecar = Sidecar::start_with(dir, Listen::Activation(listener), &[]);
    assert_serves(&sidecar);
    let log = sidecar.log();
    assert!(log.contains("tce-sidecar serving"), "{log}");
}

#[test]
fn socket_activation_for_another_pid_not_adopted() {
    let dir = TestDir::new("activation-other");
    // LISTEN_PID names another process (pid 1): the fds are not this daemon's to take, so with
    // no other listener it must refuse to start, and create nothing.
    let output = run_bounded(
        Command::new(BIN)
            .args(["--kernel", "model", "--model-socket"])
            .arg(dir.path().join("model.sock"))
            .env("LISTEN_PID", "1")
            .env("LISTEN_FDS", "1"),
        IO_TIMEOUT,
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("give exactly one of --socket-path, --fd"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

fn capabilities(args: &[&str]) -> serde_json::Value {
    let output = run_bounded(Command::new(BIN).args(args), IO_TIMEOUT);
    assert!(output.status.success());
    serde_json::from_slice(&output.stdout).expect("the capabilities are JSON")
}

#[test]
fn print_capabilities_model_offers_both_modes_eeh_and_rebuild() {
    let expected = serde_json::json!({
        "type": "spapr-tce-iommu",
        "version": env!("CARGO_PKG_VERSION"),
        "protocol_version": 1,
        "kernel": "model",
        "modes": ["accelerated", "isolated"],
        "features": ["eeh", "rebuild", "fds-by-mode"],
    });
    assert_eq!(
        capabilities(&["--print-capabilities", "--kernel", "model"]),
        expected
    );
}

#[test]
fn print_capabilities_linux_without_spapr_kvm_offers_no_accelerated_mode() {
    let caps = capabilities(&["--print-capabilities"]);
    assert_eq!(caps["kernel"], "linux");
    assert_eq!(caps["type"], "spapr-tce-iommu");
    assert_eq!(caps["protocol_version"], 1);
    let accelerated = serde_json::Value::from("accelerated");
    if cfg!(target_arch = "x86_64") {
        // No x86 KVM has KVM_CAP_SPAPR_TCE_VFIO.
        assert!(!caps["modes"].as_array().unwrap().contains(&accelerated));
    }
    if cfg!(target_arch = "x86_64") && !std::path::Path::new("/dev/vfio/vfio").exists() {
        // The test host: no VFIO at all, so nothing to offer.
        let expected = serde_json::json!({
            "type": "spapr-tce-iommu",
            "version": env!("CARGO_PKG_VERSION"),
            "protocol_version": 1,
            "kernel": "linux",
            "modes": [],
            "features": [],
        });
        assert_eq!(caps, expected);
    }
}

#[test]
fn allow_uid_other_uid_first_request_eacces_then_closed() {
    let me = rustix::process::getuid().as_raw();
    let other = if me == 4242 { 4243 } else { 4242 };
    let sidecar = Sidecar::start("uid", &["--allow-uid", &other.to_string()]);
    let mut stream = sidecar.connect();
    let reply = request(&stream, &Request::GetFeatures);
    assert_eq!(reply.status, -Errno::ACCESS.raw_os_error());
    assert_eq!(reply.text, format!("uid {me} may not use this sidecar"));
    assert!(reply.ops.is_empty() && reply.body.is_empty());
    assert_closed(&mut stream);
    let log = sidecar.log();
    assert!(
        log.contains("refused a peer whose uid is not allowed"),
        "{log}"
    );
}

#[test]
fn max_sessions_two_third_connection_eagain_until_one_ends() {
    let sidecar = Sidecar::start("limit", &["--max-sessions", "2"]);
    let first = sidecar.connect();
    let second = sidecar.connect();
    // A reply proves each connection was accepted as a session.
    for stream in [&first, &second] {
        assert_eq!(request(stream, &Request::GetFeatures).status, 0);
    }
    let mut third = sidecar.connect();
    let reply = request(&third, &Request::GetFeatures);
    assert_eq!(reply.status, -Errno::AGAIN.raw_os_error());
    assert_eq!(
        reply.text,
        "the sidecar already serves 2 sessions, its limit"
    );
    assert_closed(&mut third);
    // The sessions that were served are unaffected.
    assert_eq!(request(&second, &Request::GetFeatures).status, 0);

    // When one ends, a new connection is served again.
    drop(first);
    wait_until("a session slot frees up", Duration::from_secs(5), || {
        let stream = sidecar.connect();
        request(&stream, &Request::GetFeatures).status == 0
    });
}

/// A session set up to the point where the sidecar (isolated) or the front-end (accelerated)
/// has RAM registered and an entry mapped.
fn open_session(sidecar: &Sidecar, mode: OwnershipMode, iommu_group: u32) -> (ModelVm, Client) {
    let mut vm = ModelVm::create(&sidecar.model_socket).unwrap();
    vm.add_ram(0, 0, RAM).unwrap();
    let mut client = Client::connect(
        &sidecar.socket,
        mode,
        0,
        Box::new(vm.kernel().unwrap()),
        Some(vm.kvm_vfio_device().unwrap()),
    )
    .unwrap();
    client.stream().set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let ram = &vm.ram()[0];
    client.add_region(ram.region, ram.memfd.as_fd()).unwrap();
    let group = vm.open_group(iommu_group).unwrap();
    let desc = GroupDesc {
        group_id: 1,
        container_id: 0,
        iommu_group,
    };
    client.add_group(desc, group).unwrap();
    let table = match mode {
        OwnershipMode::Accelerated => vm.kvm_table(0x8000_0001, 12, 0, 64),
        OwnershipMode::Isolated => vm.userspace_table(0x8000_0001, 12, 0, 64),
    }
    .unwrap();
    let desc = TableDesc {
        table_id: 1,
        container_id: 0,
        liobn: 0x8000_0001,
        page_shift: 12,
        bus_offset: 0,
        entries: 64,
    };
    client
        .add_table(desc, table.fd.try_clone().unwrap())
        .unwrap();
    client.create_window(1).unwrap();
    let update = TceUpdate {
        table_id: 1,
        first_index: 0,
        count: 1,
        entries: TceEntries::Inline(vec![0x3000 | 3]),
    };
    assert_eq!(client.tce_update(update).unwrap().h_status, 0);
    (vm, client)
}

#[test]
fn sigterm_with_sessions_open_exits_zero_removes_sockets_and_tears_down() {
    let mut sidecar = Sidecar::start("sigterm", &[]);
    let (_vm_a, mut isolated) = open_session(&sidecar, OwnershipMode::Isolated, 1);
    let (_vm_b, mut accelerated) = open_session(&sidecar, OwnershipMode::Accelerated, 2);
    let status = sidecar.status();
    let open = sessions(&status);
    assert_eq!(open.len(), 2, "{status}");
    let isolated_id = open
        .iter()
        .find(|s| s["mode"] == "isolated")
        .and_then(|s| s["id"].as_u64())
        .unwrap();
    let isolated_worker = open
        .iter()
        .find(|s| s["mode"] == "isolated")
        .and_then(|s| s["worker_pid"].as_u64())
        .unwrap() as u32;
    let pinned = sidecar
        .model()
        .mm_stats(Some(isolated_worker))
        .unwrap()
        .pinned_pages;
    assert_eq!(
        pinned << 12,
        RAM,
        "the isolated session's RAM is pinned by its worker"
    );
    // `tce-sidecar status` was a session too; let it end so exactly two remain.
    wait_until("the status session ends", Duration::from_secs(5), || {
        sidecar.log().contains("session ended")
    });

    sidecar.signal(Signal::TERM);
    let exit = sidecar
        .wait_exit(Duration::from_secs(2))
        .expect("the daemon exits within 2 s of SIGTERM");
    assert!(exit.success(), "{exit}");
    assert!(!sidecar.socket.exists(), "the socket file is removed");
    assert!(
        !sidecar.model_socket.exists(),
        "the model socket file is removed"
    );
    assert!(
        isolated.get_features().is_err(),
        "the session's connection is closed"
    );
    assert!(accelerated.get_features().is_err());

    // The model kernel died with the daemon, so its pins cannot be read after exit. What can
    // be checked is that the daemon ran each session's teardown to the end before exiting:
    // it logs what the engine still believes registered in the sidecar's mm, and the engine
    // forgets a registration only once the kernel confirmed its UNREGISTER_MEMORY (a failed
    // compensating call keeps it, spec §6). Above, the model's pins equalled that session's
    // registration, so a 0 here means the unregister reached the model. Shutdown must also not
    // have given up on a session still tearing down.
    let log = sidecar.log();
    assert!(log.contains("shutting down sessions=2"), "{log}");
    assert_eq!(registered_left_at_end(&log, isolated_id), Some(0), "{log}");
    assert_eq!(
        log.matches("session ended").count(),
        3,
        "two sessions and status: {log}"
    );
    assert!(!log.contains("still tearing down"), "{log}");
}

/// The daemon's fds to memfds named `name` (`/memfd:name`).
fn memfds_named(pid: u32, name: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the process lives")
        .filter_map(Result::ok)
        .filter(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|target| {
                target
                    .to_string_lossy()
                    .starts_with(&format!("/memfd:{name}"))
            })
        })
        .count()
}

/// A front-end that ends its model connection without closing its files (it crashed, or never
/// heard of CLOSE) leaves nothing behind: the files it opened are released and its declared
/// guest RAM forgotten, as its exit would do; the daemon drops their stand-ins and its copy of
/// the RAM's memfd, and the group opens again. A CLOSE of a file the caller never opened is
/// EBADF, as close(2) of an fd one does not have.
#[test]
fn model_releases_the_files_of_a_connection_that_ends() {
    use tce_sidecar::kernel::model::server::{guest_ram, ModelClient};
    let sidecar = Sidecar::start("model-release", &[]);
    let before = memfds_named(sidecar.pid(), "model:");
    let front_end = ModelClient::connect(&sidecar.model_socket).unwrap();
    let (_ram, _ram_fd) = guest_ram(&front_end, 1 << 20).unwrap();
    assert_eq!(memfds_named(sidecar.pid(), "guest-ram"), 1);
    let kvm = front_end.open_kvm().unwrap();
    let vm = front_end.kvm_create_vm(kvm.as_fd()).unwrap();
    let group = front_end.open_vfio_group(1).unwrap();
    let container = front_end.open_vfio_container().unwrap();
    front_end
        .vfio_group_set_container(group.as_fd(), Some(container.as_fd()))
        .unwrap();
    assert_eq!(memfds_named(sidecar.pid(), "model:"), before + 4);
    // A second open of a group in use is refused, as Linux refuses it.
    let other = ModelClient::connect(&sidecar.model_socket).unwrap();
    assert_eq!(
        other.open_vfio_group(1).unwrap_err().errno(),
        Some(Errno::BUSY)
    );
    assert_eq!(
        other.close(group.as_fd()).unwrap_err().errno(),
        Some(Errno::BADF)
    );
    // ... and the refused CLOSE left the opener's group open.
    assert_eq!(
        other.open_vfio_group(1).unwrap_err().errno(),
        Some(Errno::BUSY)
    );
    // The model knows processes by pid: this one is gone once neither connection is left.
    drop((front_end, other, kvm, vm, group, container));
    wait_until(
        "the daemon drops the stand-ins and the RAM of the ended connection",
        Duration::from_secs(5),
        || {
            memfds_named(sidecar.pid(), "model:") == before
                && memfds_named(sidecar.pid(), "guest-ram") == 0
        },
    );
    let again = ModelClient::connect(&sidecar.model_socket).unwrap();
    let group = again.open_vfio_group(1).expect("the group opens again");
    again.close(group.as_fd()).unwrap();
}
