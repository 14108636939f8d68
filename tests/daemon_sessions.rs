//! Sessions of the real `tce-sidecar --kernel model` binary, driven by front-ends that play QEMU
//! (a [`ModelVm`] made as this process plus a [`Client`]): several at once in both modes, and a
//! front-end that vanishes in the middle of a transaction while another keeps working.

mod common;

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use common::{
    model_front_end, model_front_end_with, registered_left_at_end, sessions, wait_until, Sidecar,
    IO_TIMEOUT,
};
use tce_sidecar::client::model_vm::{GuestTable, ModelVm};
use tce_sidecar::client::Client;
use tce_sidecar::conformance::wire;
use tce_sidecar::kernel::model::{
    eeh_op, HcallOutcome, Mm, H_PUT_TCE, TCE_PCI_READ, TCE_PCI_WRITE, VFIO_EEH_PE_STATE_NORMAL,
};
use tce_sidecar::kernel::{ContainerId, Errno, Kernel, KernelOp, Objects, Output, OwnershipMode};
use tce_sidecar::protocol::{
    decode_reply, encode_request, recv_frame, send_frame, EehRequest, FdRule, GroupDesc, OpKind,
    Request, TableDesc, TceEntries, TceUpdate, FEATURE_EEH, FEATURE_FDS_BY_MODE,
};

/// Guest RAM per VM. Small: every VM of this process shares one mm and its 8 MiB memlock limit
/// in accelerated mode, as the daemon's isolated sessions share the daemon's.
const RAM: u64 = 1 << 20;
const ENTRIES: u64 = 64;
const PAGE_SHIFT: u32 = 12;
const CONTAINER: u32 = 0;
const TABLE_ID: u32 = 1;
const RW: u64 = TCE_PCI_READ | TCE_PCI_WRITE;

/// One VM and its front-end session, set up as QEMU does: RAM, one group, one table and its
/// window at bus 0 (the first window created after GROUP_ADD removed the default one).
struct FrontEnd {
    vm: ModelVm,
    client: Client,
    table: GuestTable,
    iommu_group: u32,
}

impl FrontEnd {
    fn set_up(sidecar: &Sidecar, mode: OwnershipMode, iommu_group: u32) -> Self {
        let (vm, mut client) =
            model_front_end(sidecar, mode, FEATURE_FDS_BY_MODE, iommu_group, RAM);
        let liobn = 0x8000_0000 | u64::from(iommu_group);
        let table = match mode {
            OwnershipMode::Accelerated => vm.kvm_table(liobn, PAGE_SHIFT, 0, ENTRIES),
            OwnershipMode::Isolated => vm.userspace_table(liobn, PAGE_SHIFT, 0, ENTRIES),
        }
        .expect("a guest TCE table");
        client
            .add_table(
                TableDesc {
                    table_id: TABLE_ID,
                    container_id: CONTAINER,
                    liobn: liobn as u32,
                    page_shift: PAGE_SHIFT,
                    bus_offset: 0,
                    entries: ENTRIES,
                },
                table.fd.try_clone().unwrap(),
            )
            .expect("TABLE_ADD");
        let window = client.create_window(TABLE_ID).expect("WINDOW_CREATE");
        assert_eq!(
            window.start_addr, 0,
            "the window lands at the table's bus offset"
        );
        Self {
            vm,
            client,
            table,
            iommu_group,
        }
    }

    /// The guest maps guest page `page` at entry `index` with H_PUT_TCE. When the kernel exits
    /// to userspace, the front-end stores the entry in its table and forwards it with
    /// TCE_UPDATE, as QEMU's h_put_tce does. Returns whether the kernel completed the call.
    fn guest_put_tce(&mut self, index: u64, page: u64) -> bool {
        let tce = (page << PAGE_SHIFT) | RW;
        let ioba = index << PAGE_SHIFT;
        match self
            .vm
            .hcall(H_PUT_TCE, [self.table.liobn, ioba, tce, 0])
            .expect("H_PUT_TCE")
        {
            HcallOutcome::Completed { ret, .. } => {
                assert_eq!(ret, 0, "H_PUT_TCE in the kernel");
                true
            }
            HcallOutcome::Exit => {
                assert!(self.table.mapping.write_u64(index as usize, tce));
                let body = self
                    .client
                    .tce_update(TceUpdate {
                        table_id: TABLE_ID,
                        first_index: index,
                        count: 1,
                        entries: TceEntries::Shared,
                    })
                    .expect("TCE_UPDATE");
                assert_eq!((body.h_status, body.processed), (0, 1));
                false
            }
        }
    }

    /// The process whose mm the IOMMU entry at `index` points into, if one is mapped.
    fn entry_mm(
        &self,
        model: &tce_sidecar::kernel::model::server::ModelClient,
        index: u64,
    ) -> Option<Mm> {
        model
            .iommu_entry(self.iommu_group, index << PAGE_SHIFT)
            .expect("read the IOMMU")
            .map(|e| e.mm)
    }
}

/// Whose mm maps the guest's entries: the front-end's, or in isolated mode the worker's that
/// serves its session.
fn owner_pid(mode: OwnershipMode, fe: &FrontEnd) -> Mm {
    match mode {
        OwnershipMode::Accelerated => Mm(std::process::id()),
        OwnershipMode::Isolated => Mm(common::worker_pid(fe.client.stream())),
    }
}

#[test]
fn concurrent_sessions_both_modes_all_updates_succeed() {
    let sidecar = Arc::new(Sidecar::start("concurrent", &[]));
    let modes = [
        OwnershipMode::Accelerated,
        OwnershipMode::Isolated,
        OwnershipMode::Accelerated,
        OwnershipMode::Isolated,
    ];
    // Every front-end set up → the main thread checks status → every front-end updates. Bounded
    // channels rather than barriers, so a thread that fails makes the others fail, not hang.
    let (ready, set_up) = mpsc::channel();
    let mut go = Vec::new();
    let threads: Vec<_> = modes
        .iter()
        .enumerate()
        .map(|(i, &mode)| {
            let (sidecar, ready) = (Arc::clone(&sidecar), ready.clone());
            let (go_tx, checked) = mpsc::channel::<()>();
            go.push(go_tx);
            std::thread::spawn(move || {
                let iommu_group = 1 + i as u32;
                let mut fe = FrontEnd::set_up(&sidecar, mode, iommu_group);
                ready.send(()).unwrap();
                checked.recv_timeout(IO_TIMEOUT).expect("the status check");
                let mut in_kernel = 0;
                for index in 0..16 {
                    if fe.guest_put_tce(index, 16 + index) {
                        in_kernel += 1;
                    }
                }
                // Accelerated: KVM completes every H_PUT_TCE. Isolated: KVM does not know the
                // LIOBN, so every one reaches the sidecar.
                let expected = match mode {
                    OwnershipMode::Accelerated => 16,
                    OwnershipMode::Isolated => 0,
                };
                assert_eq!(in_kernel, expected, "{mode:?}: hypercalls completed in KVM");
                let model = sidecar.model();
                let owner = owner_pid(mode, &fe);
                for index in 0..16 {
                    assert_eq!(
                        fe.entry_mm(&model, index),
                        Some(owner),
                        "{mode:?}: entry {index} is mapped by the container's owner"
                    );
                }
                assert_eq!(
                    fe.entry_mm(&model, 16),
                    None,
                    "{mode:?}: entry 16 untouched"
                );
                fe
            })
        })
        .collect();
    drop(ready);
    for _ in &modes {
        set_up
            .recv_timeout(IO_TIMEOUT)
            .expect("every front-end sets up");
    }
    let status = sidecar.status();
    assert_eq!(status["daemon"]["kernel"], "model");
    let listed = sessions(&status);
    assert_eq!(
        listed.len(),
        modes.len(),
        "one session per front-end: {status}"
    );
    for session in &listed {
        assert_eq!(session["peer_pid"], std::process::id());
        assert_eq!(session["phase"], "ready");
        assert_eq!(session["windows"].as_array().map(Vec::len), Some(1));
        assert_eq!(session["registered_bytes"], RAM);
    }
    let isolated = listed.iter().filter(|s| s["mode"] == "isolated").count();
    assert_eq!(isolated, 2);
    for go in go {
        go.send(()).unwrap();
    }
    let front_ends: Vec<FrontEnd> = threads
        .into_iter()
        .map(|t| t.join().expect("a front-end thread"))
        .collect();
    let status = sidecar.status();
    for session in sessions(&status) {
        let forwarded = &session["counters"]["updates_forwarded"];
        match session["mode"].as_str() {
            Some("isolated") => assert_eq!(forwarded, 16, "{session}"),
            _ => assert_eq!(forwarded, 0, "{session}"),
        }
    }
    // The workers of the two isolated sessions pin exactly their RAM; the others nothing.
    let model = sidecar.model();
    for session in sessions(&status) {
        let worker = session["worker_pid"].as_u64().unwrap() as u32;
        let pinned = model.mm_stats(Some(worker)).unwrap().pinned_pages << 12;
        match session["mode"].as_str() {
            Some("isolated") => assert_eq!(pinned, RAM, "{session}"),
            _ => assert_eq!(pinned, 0, "{session}"),
        }
    }
    drop(front_ends);
}

/// The mm of a worker on the model: (locked_vm, pinned, pre-registered regions).
fn worker_mm(sidecar: &Sidecar, worker: u32) -> (u64, u64, u64) {
    let s = sidecar.model().mm_stats(Some(worker)).unwrap();
    (s.locked_vm_pages, s.pinned_pages, s.prereg_regions)
}

#[test]
fn front_end_gone_mid_transaction_session_torn_down_other_keeps_working() {
    let sidecar = Sidecar::start("killed", &[]);
    let mut survivor = FrontEnd::set_up(&sidecar, OwnershipMode::Isolated, 1);
    assert!(!survivor.guest_put_tce(0, 1));
    // The survivor's worker holds its registration, table and mapping; the victim must leave
    // it exactly so.
    let survivor_worker = common::worker_pid(survivor.client.stream());
    let baseline = worker_mm(&sidecar, survivor_worker);
    assert_eq!(
        baseline.1 << 12,
        RAM,
        "the survivor's RAM is pinned by the sidecar"
    );

    // Only accelerated sessions give the front-end owner operations, so the victim is one: its
    // own process pins its RAM and KVM maps its guest's TCEs.
    let mut victim = FrontEnd::set_up(&sidecar, OwnershipMode::Accelerated, 2);
    assert!(victim.guest_put_tce(3, 7), "completed in the kernel");
    let model = sidecar.model();
    let victim_mm = Mm(std::process::id());
    assert_eq!(victim.entry_mm(&model, 3), Some(victim_mm));
    assert_eq!(
        worker_mm(&sidecar, survivor_worker),
        baseline,
        "the victim pins nothing in the survivor's worker"
    );

    // A raw GROUP_ADD of a second group: the reply opens a transaction with the front-end's
    // GROUP_SET_CONTAINER, which the victim never answers.
    let group = victim.vm.open_group(3).unwrap();
    let request = Request::GroupAdd(GroupDesc {
        group_id: 2,
        container_id: CONTAINER,
        iommu_group: 3,
    });
    let stream = victim.client.stream();
    let fds = match victim.client.fd_rule() {
        FdRule::Every => vec![group.as_fd()],
        FdRule::TablesOnly => Vec::new(),
    };
    send_frame(
        stream,
        request.code() as u32,
        false,
        &encode_request(&request),
        &fds,
    )
    .unwrap();
    let frame = recv_frame(stream, true).expect("the GROUP_ADD reply");
    let reply = decode_reply(&frame.header, &frame.payload, frame.fds.len()).unwrap();
    assert_eq!(reply.status, 0);
    assert_ne!(reply.transaction, 0);
    assert_eq!(
        reply.ops.iter().map(|op| op.kind()).collect::<Vec<_>>(),
        [OpKind::GroupSetContainer]
    );
    let victim_id = {
        let status = sidecar.status();
        let open: Vec<_> = sessions(&status)
            .into_iter()
            .filter(|s| s["phase"] == "transaction")
            .collect();
        assert_eq!(open.len(), 1, "the victim's transaction is open: {status}");
        open[0]["id"].clone()
    };

    // The front-end goes away: its socket closes with the transaction open.
    let FrontEnd { vm, client, .. } = victim;
    drop(client);
    wait_until("the victim's session ends", Duration::from_secs(5), || {
        !sessions(&sidecar.status())
            .iter()
            .any(|s| s["id"] == victim_id)
    });

    // The survivor's worker holds what it held; the victim's container and its mappings are
    // its own process's until that process exits.
    assert_eq!(worker_mm(&sidecar, survivor_worker), baseline);
    assert_eq!(
        model.iommu_entry(2, 3 << PAGE_SHIFT).unwrap().map(|e| e.mm),
        Some(victim_mm)
    );
    let log = sidecar.log();
    let victim_id = victim_id.as_u64().unwrap();
    assert_eq!(registered_left_at_end(&log, victim_id), Some(0), "{log}");
    vm.close(&[&group]).expect("the victim's VM exits");

    // The survivor never noticed.
    assert!(!survivor.guest_put_tce(5, 9));
    assert_eq!(survivor.entry_mm(&model, 5), Some(Mm(survivor_worker)));
    let status = sidecar.status();
    let left = sessions(&status);
    assert_eq!(left.len(), 1, "{status}");
    assert_eq!(left[0]["counters"]["updates_forwarded"], 2);
    assert_eq!(left[0]["phase"], "ready");
}

/// The front-end's kernel backend, recording each owner operation it is asked to execute.
struct Recording {
    inner: Box<dyn Kernel + Send>,
    log: Arc<Mutex<Vec<KernelOp>>>,
}

impl Kernel for Recording {
    fn execute(&mut self, op: &KernelOp, objects: &dyn Objects) -> Result<Output, Errno> {
        self.log.lock().unwrap().push(*op);
        self.inner.execute(op, objects)
    }

    fn memory_mapped(
        &mut self,
        fd: BorrowedFd<'_>,
        offset: u64,
        addr: u64,
        size: u64,
    ) -> Result<(), Errno> {
        self.inner.memory_mapped(fd, offset, addr, size)
    }

    fn memory_unmapped(&mut self, addr: u64) -> Result<(), Errno> {
        self.inner.memory_unmapped(addr)
    }

    fn is_tce_table(&mut self, fd: BorrowedFd<'_>) -> Result<bool, Errno> {
        self.inner.is_tce_table(fd)
    }
}

/// A guest's EEH recovery as QEMU's RTAS handlers turn it into EEH_OP requests
/// (ibm,set-eeh-option, ibm,read-slot-reset-state2, ibm,set-slot-reset hot then deactivate,
/// ibm,configure-pe, and the state again) reaches the PE in both modes: in accelerated mode the
/// front-end executes exactly one EEH_PE_OP per request, the one requested, on the request's
/// container; in isolated mode the sidecar makes each call itself and the front-end none. The
/// PE's state is what the kernel reports (normal).
#[test]
fn eeh_recovery_reaches_the_pe_in_both_modes() {
    let sidecar = Sidecar::start("eeh", &[]);
    let recovery = [
        eeh_op::ENABLE,
        eeh_op::GET_STATE,
        eeh_op::RESET_HOT,
        eeh_op::RESET_DEACTIVATE,
        eeh_op::CONFIGURE,
        eeh_op::GET_STATE,
    ];
    for (mode, iommu_group) in [
        (OwnershipMode::Accelerated, 1),
        (OwnershipMode::Isolated, 2),
    ] {
        let log = Arc::new(Mutex::new(Vec::new()));
        let recorded = log.clone();
        let (_vm, mut client) = model_front_end_with(
            &sidecar,
            mode,
            FEATURE_FDS_BY_MODE | FEATURE_EEH,
            iommu_group,
            RAM,
            move |inner| {
                Box::new(Recording {
                    inner,
                    log: recorded,
                })
            },
        );
        assert_ne!(
            client.features() & FEATURE_EEH,
            0,
            "{mode:?}: EEH negotiated"
        );
        for op in recovery {
            log.lock().unwrap().clear();
            let result = client
                .eeh(EehRequest {
                    container_id: CONTAINER,
                    op,
                    err_type: 0,
                    err_func: 0,
                    err_addr: 0,
                    err_mask: 0,
                })
                .unwrap_or_else(|e| panic!("{mode:?}: EEH_OP {op}: {e}"));
            assert_eq!(
                result,
                if op == eeh_op::GET_STATE {
                    VFIO_EEH_PE_STATE_NORMAL as i32
                } else {
                    0
                },
                "{mode:?}: EEH_OP {op}"
            );
            let executed = log.lock().unwrap().clone();
            match mode {
                OwnershipMode::Accelerated => assert_eq!(
                    executed,
                    [KernelOp::EehPeOp {
                        container: ContainerId(CONTAINER),
                        op,
                        err_type: 0,
                        err_func: 0,
                        err_addr: 0,
                        err_mask: 0,
                    }],
                    "EEH_OP {op}"
                ),
                OwnershipMode::Isolated => assert!(executed.is_empty(), "{executed:?}"),
            }
        }
    }
}

/// The sessions `GET_STATUS` lists, across its pages, over the kit's hand-written wire.
fn listed_sessions(conn: &wire::Conn) -> Vec<serde_json::Value> {
    let mut first = 0u32;
    let mut all = Vec::new();
    loop {
        let payload = wire::Le::new().u32(first).u32(0).bytes();
        let reply = conn.call(wire::GET_STATUS, &payload).unwrap().ok().unwrap();
        let page: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        all.extend(page["sessions"].as_array().cloned().unwrap_or_default());
        match page["next_session"].as_u64() {
            Some(next) => first = next as u32,
            None => return all,
        }
    }
}

#[test]
fn sixty_four_concurrent_clients_each_served_correctly() {
    const CLIENTS: usize = 64;
    let sidecar = Arc::new(Sidecar::start("s-64", &[]));
    let negotiated = Arc::new(std::sync::Barrier::new(CLIENTS));
    let checked = Arc::new(std::sync::Barrier::new(CLIENTS));
    let threads: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (sidecar, negotiated, checked) = (
                Arc::clone(&sidecar),
                Arc::clone(&negotiated),
                Arc::clone(&checked),
            );
            std::thread::spawn(move || {
                let conn = wire::Conn::connect(&sidecar.socket, IO_TIMEOUT).unwrap();
                let mode = if i % 2 == 0 {
                    wire::MODE_ACCELERATED
                } else {
                    wire::MODE_ISOLATED
                };
                let reply = conn.call(wire::SET_FEATURES, &mode.to_le_bytes()).unwrap();
                assert_eq!(reply.ok().unwrap().body, mode.to_le_bytes());
                // Every client lists the sessions while all 64 are open.
                negotiated.wait();
                let sessions = listed_sessions(&conn);
                assert_eq!(sessions.len(), CLIENTS);
                let isolated = sessions.iter().filter(|s| s["mode"] == "isolated").count();
                assert_eq!(isolated, CLIENTS / 2);
                checked.wait();
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a client thread");
    }
}
