//! The engine's procedures, driven with scripted kernel results: which calls each request makes,
//! in which order, on which side, and what a failure leaves behind.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

use rustix::io::Errno;
use tce_sidecar::engine::{Action, FdFacts, Host, Limits, Phase, Session};
use tce_sidecar::kernel::{
    to_op_result, ContainerId, GroupId, KernelOp, Output, OwnershipMode, RegionId, Side, TableId,
};
use tce_sidecar::protocol::*;

const K64: u64 = 1 << 16;
const HOST: Host = Host {
    features: FEATURES_KNOWN,
    page_size: K64,
    limits: Limits {
        regions: 512,
        groups: 64,
        tables: 128,
    },
};
const C0: ContainerId = ContainerId(0);
const G1: GroupId = GroupId(1);
const G2: GroupId = GroupId(2);
const R1: RegionId = RegionId(1);
const T1: TableId = TableId(1);
const T2: TableId = TableId(2);

/// The powernv platform's GET_INFO.
fn powernv_info() -> TceInfo {
    TceInfo {
        flags: 1,
        dma32_window_start: 0,
        dma32_window_size: 1 << 31,
        pgsizes: 0x4021_1000,
        max_dynamic_windows: 2,
        levels: 5,
    }
}

/// Runs the engine to its final reply, answering every call with `kernel`, and logs each call
/// with the side that made it.
struct Driver<F: FnMut(&KernelOp) -> Result<Output, Errno>> {
    session: Session,
    kernel: F,
    log: Vec<(Side, KernelOp)>,
    /// The front-end's operations that came in replies flagged ROLLBACK.
    rollback: Vec<KernelOp>,
}

/// A powernv-like platform: two window slots, slot 0 at bus address 0 and slot 1 at 1 << 59;
/// the default 32-bit window holds slot 0 from GET_INFO until removed.
#[derive(Default)]
struct Platform {
    used: [bool; 2],
}

impl Platform {
    fn call(&mut self, op: &KernelOp) -> Result<Output, Errno> {
        Ok(match op {
            KernelOp::ContainerOpen { .. } => Output::ApiVersion(0),
            KernelOp::TceGetInfo { .. } => {
                self.used[0] = true;
                Output::TceInfo(powernv_info())
            }
            KernelOp::TceCreate { .. } => {
                let slot = self.used.iter().position(|u| !u).ok_or(Errno::NOSPC)?;
                self.used[slot] = true;
                Output::StartAddr(if slot == 0 { 0 } else { 1 << 59 })
            }
            KernelOp::TceRemove { start_addr, .. } => {
                self.used[usize::from(*start_addr != 0)] = false;
                Output::Done
            }
            KernelOp::UnmapDma { size, .. } => Output::Unmapped(*size),
            KernelOp::EehPeOp { .. } => Output::Value(0),
            _ => Output::Done,
        })
    }
}

/// The platform, with some calls answered differently.
fn platform_with(
    mut special: impl FnMut(&KernelOp) -> Option<Result<Output, Errno>>,
) -> impl FnMut(&KernelOp) -> Result<Output, Errno> {
    let mut platform = Platform::default();
    move |op| special(op).unwrap_or_else(|| platform.call(op))
}

fn platform() -> impl FnMut(&KernelOp) -> Result<Output, Errno> {
    platform_with(|_| None)
}

impl<F: FnMut(&KernelOp) -> Result<Output, Errno>> Driver<F> {
    fn new(mode: u64, kernel: F) -> Self {
        let mut session = Session::new(HOST);
        let Action::Reply(reply) = session.handle(Request::SetFeatures { features: mode }, None)
        else {
            panic!("negotiation makes no call")
        };
        assert_eq!(reply.status, 0);
        Self {
            session,
            kernel,
            log: Vec::new(),
            rollback: Vec::new(),
        }
    }

    fn request(&mut self, request: Request, fd: Option<FdFacts>) -> Reply {
        let mut action = self.session.handle(request, fd);
        let mut rolling_back = false;
        loop {
            match action {
                Action::Execute(ops) => {
                    let mut results = Vec::new();
                    for op in ops {
                        self.log.push((Side::Sidecar, op));
                        let r = (self.kernel)(&op);
                        let failed = r.is_err();
                        results.push(r);
                        if failed {
                            break;
                        }
                    }
                    action = self.session.sidecar_results(results);
                }
                Action::Reply(reply) if reply.ops.is_empty() => return reply,
                Action::Reply(reply) => {
                    assert!(
                        reply.rollback || !rolling_back,
                        "a rollback ends the transaction"
                    );
                    rolling_back = reply.rollback;
                    if reply.rollback {
                        self.rollback
                            .extend(reply.ops.iter().map(|o| KernelOp::from(*o)));
                    }
                    let mut results = Vec::new();
                    for owner_op in &reply.ops {
                        let op = KernelOp::from(*owner_op);
                        self.log.push((Side::FrontEnd, op));
                        let r = (self.kernel)(&op);
                        let failed = r.is_err();
                        results.push(to_op_result(owner_op.kind(), &r).unwrap());
                        if failed {
                            break;
                        }
                    }
                    let request = Request::OpsResult {
                        transaction: reply.transaction,
                        results,
                    };
                    action = self.session.handle(request, None);
                }
                Action::Closed => panic!("no teardown expected"),
            }
        }
    }

    fn ok(&mut self, request: Request, fd: Option<FdFacts>) -> Vec<u8> {
        let reply = self.request(request, fd);
        assert_eq!(reply.status, 0, "{}", reply.text);
        reply.body
    }

    fn take_log(&mut self) -> Vec<(Side, KernelOp)> {
        self.rollback.clear();
        std::mem::take(&mut self.log)
    }
}

fn memfd_facts(size: u64) -> Option<FdFacts> {
    Some(FdFacts {
        size,
        page_size: K64,
    })
}

fn mem_add(size: u64) -> Request {
    Request::MemAdd(MemRegion {
        region_id: 1,
        guest_addr: 0,
        size,
        user_addr: 0x7000_0000_0000,
        mmap_offset: 0,
        page_shift: 0,
    })
}

fn group_add(group: u32, iommu_group: u32) -> Request {
    Request::GroupAdd(GroupDesc {
        group_id: group,
        container_id: 0,
        iommu_group,
    })
}

fn table_add(table: u32, liobn: u32, page_shift: u32, bus_offset: u64, entries: u64) -> Request {
    Request::TableAdd(TableDesc {
        table_id: table,
        container_id: 0,
        liobn,
        page_shift,
        bus_offset,
        entries,
    })
}

/// RAM, one group and a window for table 1 at bus address 0 (64 KiB pages, 1 GiB).
fn set_up<F: FnMut(&KernelOp) -> Result<Output, Errno>>(d: &mut Driver<F>) {
    d.ok(mem_add(1 << 30), memfd_facts(1 << 30));
    d.ok(group_add(1, 7), None);
    d.ok(
        table_add(1, 0x8000_0001, 16, 0, 1 << 14),
        memfd_facts(8 << 14),
    );
    d.ok(Request::WindowCreate { table_id: 1 }, None);
    d.take_log();
}

/// Maps entry 0 of table 1 (read-write, guest page 0), so that its window has a mapping.
fn map_entry_0<F: FnMut(&KernelOp) -> Result<Output, Errno>>(d: &mut Driver<F>) {
    let update = TceUpdate {
        table_id: 1,
        first_index: 0,
        count: 1,
        entries: TceEntries::Inline(vec![3]),
    };
    d.ok(Request::TceUpdate(update), None);
}

#[test]
fn group_add_accelerated_front_end_makes_every_call_in_qemu_order() {
    let mut d = Driver::new(FEATURE_MODE_ACCELERATED, platform());
    d.ok(mem_add(1 << 30), memfd_facts(1 << 30));
    d.ok(group_add(1, 7), None);
    let log = d.take_log();
    assert!(
        log.iter().all(|(side, _)| *side == Side::FrontEnd),
        "{log:?}"
    );
    let ops: Vec<KernelOp> = log.into_iter().map(|(_, op)| op).collect();
    assert_eq!(
        ops,
        vec![
            KernelOp::ContainerOpen { container: C0 },
            KernelOp::GroupSetContainer {
                container: C0,
                group: G1
            },
            KernelOp::SetIommu {
                container: C0,
                iommu_type: 7
            },
            KernelOp::TceGetInfo { container: C0 },
            KernelOp::RegisterMemory {
                container: C0,
                region: R1,
                offset: 0,
                size: 1 << 30
            },
            KernelOp::TceRemove {
                container: C0,
                start_addr: 0
            },
        ]
    );
}

/// No table is ever associated in KVM in isolated mode, and on POWER the kvm-vfio device
/// serves nothing else: the group file never joins it (Linux warns when a file that never had
/// SET_SPAPR_TCE leaves the device).
#[test]
fn group_add_isolated_the_sidecar_makes_every_call() {
    let mut d = Driver::new(FEATURE_MODE_ISOLATED, platform());
    d.ok(mem_add(1 << 30), memfd_facts(1 << 30));
    d.ok(group_add(1, 7), None);
    let log = d.take_log();
    assert!(
        log.iter().all(|(side, _)| *side == Side::Sidecar),
        "{log:?}"
    );
    assert!(
        !log.iter()
            .any(|(_, op)| matches!(op, KernelOp::KvmFileAdd { .. })),
        "{log:?}"
    );
    assert_eq!(d.session.registered_bytes(), 1 << 30);
}

#[test]
fn window_create_accelerated_associates_every_group_after_create() {
    let mut d = Driver::new(FEATURE_MODE_ACCELERATED, platform());
    d.ok(mem_add(1 << 30), memfd_facts(1 << 30));
    d.ok(group_add(1, 7), None);
    d.ok(group_add(2, 8), None);
    d.ok(table_add(9, 0x8000_0000, 16, 0, 1 << 14), None);
    d.ok(Request::WindowCreate { table_id: 9 }, None);
    d.ok(table_add(1, 0x8000_0001, 16, 1 << 59, 1 << 14), None);
    d.take_log();
    let body = d.ok(Request::WindowCreate { table_id: 1 }, None);
    assert_eq!(
        WindowCreateBody::decode(&body),
        Some(WindowCreateBody {
            start_addr: 1 << 59,
            hw_page_shift: 16,
            levels: 1
        })
    );
    let ops: Vec<KernelOp> = d.take_log().into_iter().map(|(_, op)| op).collect();
    assert_eq!(
        ops,
        vec![
            KernelOp::TceCreate {
                container: C0,
                page_shift: 16,
                window_size: 1 << 30,
                levels: 1
            },
            KernelOp::KvmSetSpaprTce {
                group: G1,
                table: T1
            },
            KernelOp::KvmSetSpaprTce {
                group: G2,
                table: T1
            },
        ]
    );
}

/// With FDS_BY_MODE in accelerated mode no memfd shows the page size of guest RAM: the region
/// names it, and it bounds the window's hardware pages as the memfd's would.
#[test]
fn region_page_shift_bounds_the_hardware_page_without_a_memfd() {
    let lean = FEATURE_MODE_ACCELERATED | FEATURE_FDS_BY_MODE;
    let region = |page_shift| {
        Request::MemAdd(MemRegion {
            region_id: 1,
            guest_addr: 0,
            size: 1 << 30,
            user_addr: 0x7000_0000_0000,
            mmap_offset: 0,
            page_shift,
        })
    };
    // The platform offers 4 KiB, 64 KiB, 2 MiB and 1 GiB pages.
    for (ram_shift, hw_shift) in [(21, 21), (16, 16)] {
        let mut d = Driver::new(lean, platform());
        d.ok(region(ram_shift), None);
        d.ok(group_add(1, 7), None);
        d.ok(table_add(1, 0x8000_0001, 21, 0, 64), None);
        let body = d.ok(Request::WindowCreate { table_id: 1 }, None);
        let created = WindowCreateBody::decode(&body).unwrap();
        assert_eq!(
            created.hw_page_shift, hw_shift,
            "RAM in 1 << {ram_shift} pages"
        );
    }
    // Pages smaller than the host's cannot back guest RAM, and a shift past 63 names none.
    for page_shift in [12, 64, u32::MAX] {
        let mut d = Driver::new(lean, platform());
        let reply = d.request(region(page_shift), None);
        assert_eq!(reply.status, -Errno::INVAL.raw_os_error(), "{}", reply.text);
        assert!(
            reply.text.contains(&format!("page_shift {page_shift}")),
            "{}",
            reply.text
        );
    }
}

#[test]
fn window_create_isolated_never_associates() {
    let mut d = Driver::new(FEATURE_MODE_ISOLATED, platform());
    set_up(&mut d);
    assert!(d.session.state().groups[&G1].associations.is_empty());
    d.ok(Request::WindowRemove { table_id: 1 }, None);
    assert_eq!(
        d.take_log(),
        vec![(
            Side::Sidecar,
            KernelOp::TceRemove {
                container: C0,
                start_addr: 0
            }
        )],
        "nothing was mapped, so no unmap"
    );
    d.ok(Request::WindowCreate { table_id: 1 }, None);
    let log = d.take_log();
    assert_eq!(log.len(), 1, "only TCE_CREATE: {log:?}");
    assert!(matches!(
        log[0],
        (Side::Sidecar, KernelOp::TceCreate { .. })
    ));
}

#[test]
fn window_create_failure_retries_deeper_levels_then_fails() {
    let mut d = Driver::new(
        FEATURE_MODE_ISOLATED,
        platform_with(|op: &KernelOp| match op {
            KernelOp::TceCreate { .. } => Some(Err(Errno::NOMEM)),
            _ => None,
        }),
    );
    d.ok(mem_add(1 << 30), memfd_facts(1 << 30));
    d.ok(group_add(1, 7), None);
    d.ok(
        table_add(1, 0x8000_0001, 16, 1 << 59, 1 << 14),
        memfd_facts(8 << 14),
    );
    d.take_log();
    let reply = d.request(Request::WindowCreate { table_id: 1 }, None);
    assert_eq!(reply.status, -Errno::NOMEM.raw_os_error());
    let levels: Vec<u32> = d
        .take_log()
        .into_iter()
        .map(|(_, op)| match op {
            KernelOp::TceCreate { levels, .. } => levels,
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    // (64 - 16) / 16 = 3 bounds QEMU's loop below the platform's 5.
    assert_eq!(levels, vec![1, 2, 3]);
    assert!(reply.text.contains("TCE_CREATE"), "{}", reply.text);
    assert_eq!(d.session.phase(), Phase::Ready);
}

#[test]
fn window_create_wrong_start_removes_the_window() {
    let mut d = Driver::new(
        FEATURE_MODE_ACCELERATED,
        platform_with(|op: &KernelOp| match op {
            KernelOp::TceCreate { .. } => Some(Ok(Output::StartAddr(1 << 40))),
            _ => None,
        }),
    );
    d.ok(mem_add(1 << 30), memfd_facts(1 << 30));
    d.ok(group_add(1, 7), None);
    d.ok(table_add(1, 0x8000_0001, 16, 1 << 59, 1 << 14), None);
    d.take_log();
    let reply = d.request(Request::WindowCreate { table_id: 1 }, None);
    assert_eq!(reply.status, -Errno::INVAL.raw_os_error());
    assert!(reply.text.contains("0x10000000000"), "{}", reply.text);
    let ops: Vec<KernelOp> = d.take_log().into_iter().map(|(_, op)| op).collect();
    assert_eq!(
        ops[1],
        KernelOp::TceRemove {
            container: C0,
            start_addr: 1 << 40
        }
    );
    assert!(d.session.state().containers[&C0].windows.is_empty());
}

#[test]
fn window_create_refused_association_rolls_back_the_window() {
    let mut d = Driver::new(
        FEATURE_MODE_ACCELERATED,
        platform_with(|op: &KernelOp| match op {
            KernelOp::KvmSetSpaprTce { .. } => Some(Err(Errno::INVAL)),
            _ => None,
        }),
    );
    d.ok(mem_add(1 << 30), memfd_facts(1 << 30));
    d.ok(group_add(1, 7), None);
    d.ok(table_add(1, 0x8000_0001, 16, 0, 1 << 14), None);
    d.take_log();
    let reply = d.request(Request::WindowCreate { table_id: 1 }, None);
    assert_eq!(reply.status, -Errno::INVAL.raw_os_error());
    let log = d.take_log();
    assert_eq!(
        log.last(),
        Some(&(
            Side::FrontEnd,
            KernelOp::TceRemove {
                container: C0,
                start_addr: 0
            }
        ))
    );
    assert!(d.session.state().window_of(T1).is_none());
    // The text says what the rollback did, in order.
    let failed = log
        .iter()
        .position(|(_, op)| matches!(op, KernelOp::KvmSetSpaprTce { .. }))
        .expect("the association was tried");
    let undone: Vec<&str> = log[failed + 1..].iter().map(|(_, op)| op.name()).collect();
    assert!(undone.contains(&"TCE_REMOVE"), "{undone:?}");
    assert!(
        reply
            .text
            .ends_with(&format!("; undone with {}", undone.join(", "))),
        "{}",
        reply.text
    );
    assert!(!reply.text.contains("stay in KVM"), "{}", reply.text);
}

#[test]
fn group_add_failure_midway_rolls_back_in_reverse() {
    let mut d = Driver::new(
        FEATURE_MODE_ISOLATED,
        platform_with(|op: &KernelOp| match op {
            KernelOp::RegisterMemory { .. } => Some(Err(Errno::NOMEM)),
            _ => None,
        }),
    );
    d.ok(mem_add(1 << 30), memfd_facts(1 << 30));
    d.take_log();
    let reply = d.request(group_add(1, 7), None);
    assert_eq!(reply.status, -Errno::NOMEM.raw_os_error());
    assert!(
        reply.text.contains("RLIMIT_MEMLOCK") && reply.text.contains("1073741824"),
        "{}",
        reply.text
    );
    let undo: Vec<KernelOp> = d.take_log().into_iter().skip(5).map(|(_, op)| op).collect();
    assert_eq!(
        undo,
        vec![
            KernelOp::GroupUnsetContainer {
                container: C0,
                group: G1
            },
            KernelOp::ContainerClose { container: C0 },
        ]
    );
    assert!(d.session.state().groups.is_empty());
    assert!(d.session.state().containers.is_empty());
}

#[test]
fn tce_update_inline_coalesces_contiguous_runs() {
    let mut d = Driver::new(FEATURE_MODE_ISOLATED, platform());
    set_up(&mut d);
    // Entries 0-2 contiguous read/write, 3 jumps, 4 read-only, 5 clear (never mapped: no call).
    let page = 1u64 << 16;
    let entries = vec![
        3,
        page | 3,
        (2 * page) | 3,
        (10 * page) | 3,
        (11 * page) | 1,
        0,
    ];
    let update = TceUpdate {
        table_id: 1,
        first_index: 4,
        count: 6,
        entries: TceEntries::Inline(entries),
    };
    let body = d.ok(Request::TceUpdate(update), None);
    assert_eq!(
        TceUpdateBody::decode(&body),
        Some(TceUpdateBody {
            h_status: 0,
            processed: 6
        })
    );
    let ops: Vec<KernelOp> = d.take_log().into_iter().map(|(_, op)| op).collect();
    let rw = DmaAccess {
        read: true,
        write: true,
    };
    let bus = 4 * page;
    assert_eq!(
        ops,
        vec![
            KernelOp::MapDma {
                container: C0,
                region: R1,
                offset: 0,
                iova: bus,
                size: 3 * page,
                access: rw
            },
            KernelOp::MapDma {
                container: C0,
                region: R1,
                offset: 10 * page,
                iova: bus + 3 * page,
                size: page,
                access: rw
            },
            KernelOp::MapDma {
                container: C0,
                region: R1,
                offset: 11 * page,
                iova: bus + 4 * page,
                size: page,
                access: DmaAccess {
                    read: true,
                    write: false
                },
            },
        ]
    );
    assert_eq!(d.session.entries_mapped(), 5);
    // H_STUFF_TCE with permission bits is refused as KVM refuses it: before anything changes,
    // so the mapped entries stay mapped (§7.8).
    let stuff = TceUpdate {
        table_id: 1,
        first_index: 0,
        count: 20,
        entries: TceEntries::Stuff(3),
    };
    let reply = d.request(Request::TceUpdate(stuff), None);
    assert_eq!(reply.status, -Errno::INVAL.raw_os_error());
    assert!(reply.text.contains("permission bits"), "{}", reply.text);
    assert_eq!(
        TceUpdateBody::decode(&reply.body),
        Some(TceUpdateBody {
            h_status: -4,
            processed: 0
        })
    );
    assert!(d.take_log().is_empty());
    assert_eq!(d.session.entries_mapped(), 5);
    // Clearing them unmaps exactly the mapped run.
    let clear = TceUpdate {
        table_id: 1,
        first_index: 0,
        count: 20,
        entries: TceEntries::Stuff(0),
    };
    d.ok(Request::TceUpdate(clear), None);
    let ops: Vec<KernelOp> = d.take_log().into_iter().map(|(_, op)| op).collect();
    assert_eq!(
        ops,
        vec![KernelOp::UnmapDma {
            container: C0,
            iova: bus,
            size: 5 * page
        }]
    );
    assert_eq!(d.session.entries_mapped(), 0);
}

#[test]
fn tce_update_bad_entries_are_refused_with_h_parameter_and_no_call() {
    let mut d = Driver::new(FEATURE_MODE_ISOLATED, platform());
    set_up(&mut d);
    let cases = [
        (0, vec![0x1000 | 3], "not aligned"),
        (0, vec![(2u64 << 30) | 3], "outside registered RAM"),
        ((1 << 14) - 1, vec![3, 3], "outside"),
    ];
    for (first, entries, why) in cases {
        let count = entries.len() as u32;
        let update = TceUpdate {
            table_id: 1,
            first_index: first,
            count,
            entries: TceEntries::Inline(entries),
        };
        let reply = d.request(Request::TceUpdate(update), None);
        assert_eq!(reply.status, -Errno::INVAL.raw_os_error());
        assert!(reply.text.contains(why), "{}", reply.text);
        assert_eq!(
            TceUpdateBody::decode(&reply.body),
            Some(TceUpdateBody {
                h_status: -4,
                processed: 0
            })
        );
    }
    let stuff = TceUpdate {
        table_id: 1,
        first_index: 0,
        count: 4,
        entries: TceEntries::Stuff(3),
    };
    assert_eq!(
        d.request(Request::TceUpdate(stuff), None).status,
        -Errno::INVAL.raw_os_error()
    );
    assert!(d.take_log().is_empty());
}

#[test]
fn tce_update_failed_map_reports_entries_processed() {
    let mut calls = 0;
    let kernel = platform_with(move |op: &KernelOp| match op {
        KernelOp::MapDma { .. } => {
            calls += 1;
            Some(if calls == 2 {
                Err(Errno::NOMEM)
            } else {
                Ok(Output::Done)
            })
        }
        _ => None,
    });
    let mut d = Driver::new(FEATURE_MODE_ACCELERATED, kernel);
    set_up(&mut d);
    let page = 1u64 << 16;
    let update = TceUpdate {
        table_id: 1,
        first_index: 0,
        count: 3,
        entries: TceEntries::Inline(vec![3, page | 3, (5 * page) | 3]),
    };
    let reply = d.request(Request::TceUpdate(update), None);
    assert_eq!(reply.status, -Errno::NOMEM.raw_os_error());
    assert_eq!(
        TceUpdateBody::decode(&reply.body),
        Some(TceUpdateBody {
            h_status: -1,
            processed: 2
        })
    );
}

#[test]
fn ops_result_malformed_is_refused_and_transaction_stays_open() {
    let mut session = Session::new(HOST);
    session.handle(
        Request::SetFeatures {
            features: FEATURE_MODE_ACCELERATED,
        },
        None,
    );
    let Action::Reply(reply) = session.handle(group_add(1, 7), None) else {
        panic!()
    };
    assert_eq!(
        reply.ops,
        vec![
            OwnerOp::ContainerOpen { container: 0 },
            OwnerOp::GroupSetContainer {
                container: 0,
                group: 1
            },
            OwnerOp::SetIommu {
                container: 0,
                iommu_type: 7
            },
            OwnerOp::TceGetInfo { container: 0 },
        ]
    );
    let txn = reply.transaction;
    let wrong = |s: &mut Session, transaction, kind, status| match s.handle(
        Request::OpsResult {
            transaction,
            results: vec![OpResult {
                kind,
                status,
                out: [0; 4],
            }],
        },
        None,
    ) {
        Action::Reply(r) => r.status,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        wrong(&mut session, txn + 1, OpKind::ContainerOpen, 0),
        -Errno::INVAL.raw_os_error()
    );
    assert_eq!(
        wrong(&mut session, txn, OpKind::KvmFileDel, 0),
        -Errno::INVAL.raw_os_error()
    );
    // Another request while the transaction is open.
    let Action::Reply(busy) = session.handle(Request::WindowQuery { container_id: 0 }, None) else {
        panic!()
    };
    assert_eq!(busy.status, -Errno::BUSY.raw_os_error());
    assert_eq!(session.phase(), Phase::Transaction);
    // The right answer moves on: no RAM yet, so the next stage only drops the default window.
    let ok = |kind, out| OpResult {
        kind,
        status: 0,
        out,
    };
    let info = [0, (1 << 30) << 32, 0x0101_1000, 2 | (5 << 32)];
    let Action::Reply(next) = session.handle(
        Request::OpsResult {
            transaction: txn,
            results: vec![
                ok(OpKind::ContainerOpen, [0; 4]),
                ok(OpKind::GroupSetContainer, [0; 4]),
                ok(OpKind::SetIommu, [0; 4]),
                ok(OpKind::TceGetInfo, info),
            ],
        },
        None,
    ) else {
        panic!()
    };
    assert_eq!(next.transaction, txn);
    assert_eq!(
        next.ops,
        vec![OwnerOp::TceRemove {
            container: 0,
            start_addr: 0
        }]
    );
}

#[test]
fn requests_before_negotiation_are_refused_with_eproto() {
    let mut session = Session::new(HOST);
    let Action::Reply(r) = session.handle(group_add(1, 7), None) else {
        panic!()
    };
    assert_eq!(r.status, -Errno::PROTO.raw_os_error());
    let Action::Reply(r) = session.handle(Request::SetFeatures { features: 3 }, None) else {
        panic!()
    };
    assert_eq!(r.status, -Errno::INVAL.raw_os_error(), "two modes");
    let Action::Reply(r) = session.handle(Request::SetFeatures { features: 1 << 9 }, None) else {
        panic!()
    };
    assert_eq!(r.status, -Errno::NOTSUP.raw_os_error());
    let Action::Reply(r) = session.handle(
        Request::SetFeatures {
            features: FEATURE_MODE_ISOLATED,
        },
        None,
    ) else {
        panic!()
    };
    assert_eq!(r.status, 0);
    assert_eq!(session.mode(), Some(OwnershipMode::Isolated));
    let Action::Reply(r) = session.handle(
        Request::SetFeatures {
            features: FEATURE_MODE_ISOLATED,
        },
        None,
    ) else {
        panic!()
    };
    assert_eq!(r.status, -Errno::ALREADY.raw_os_error());
}

#[test]
fn disconnect_isolated_tears_down_in_order() {
    let mut d = Driver::new(FEATURE_MODE_ISOLATED, platform());
    set_up(&mut d);
    map_entry_0(&mut d);
    let Action::Execute(ops) = d.session.disconnect() else {
        panic!("the sidecar owns state")
    };
    assert_eq!(
        ops,
        vec![
            KernelOp::UnmapDma {
                container: C0,
                iova: 0,
                size: 1 << 30
            },
            KernelOp::TceRemove {
                container: C0,
                start_addr: 0
            },
            KernelOp::UnregisterMemory {
                container: C0,
                region: R1,
                offset: 0,
                size: 1 << 30
            },
            KernelOp::GroupUnsetContainer {
                container: C0,
                group: G1
            },
            KernelOp::ContainerClose { container: C0 },
        ]
    );
    let mut platform = Platform {
        used: [true, false],
    };
    let results = ops.iter().map(|op| platform.call(op)).collect();
    assert_eq!(d.session.sidecar_results(results), Action::Closed);
    assert_eq!(d.session.registered_bytes(), 0);
    assert_eq!(d.session.entries_mapped(), 0);
}

#[test]
fn disconnect_accelerated_leaves_front_end_state_to_the_front_end() {
    let mut d = Driver::new(FEATURE_MODE_ACCELERATED, platform());
    set_up(&mut d);
    assert_eq!(d.session.disconnect(), Action::Closed);
}

#[test]
fn container_requests_unknown_container_enoent_without_calls() {
    let mut d = Driver::new(FEATURE_MODE_ISOLATED | FEATURE_EEH, platform());
    set_up(&mut d);
    // Container 5 was never named by a group: an unknown id (spec §5), not a device error.
    let requests = [
        Request::WindowQuery { container_id: 5 },
        Request::WindowReset {
            container_id: 5,
            default_table: None,
        },
        Request::EehOp(EehRequest {
            container_id: 5,
            op: 1,
            err_type: 0,
            err_func: 0,
            err_addr: 0,
            err_mask: 0,
        }),
    ];
    for request in requests {
        let code = request.code();
        let reply = d.request(request, None);
        assert_eq!(
            reply.status,
            -Errno::NOENT.raw_os_error(),
            "{code:?}: {}",
            reply.text
        );
        assert!(
            reply.text.ends_with("container 5 is not registered"),
            "{}",
            reply.text
        );
    }
    assert!(d.take_log().is_empty());
    // The known container still answers.
    let body = d.ok(Request::WindowQuery { container_id: 0 }, None);
    assert_eq!(
        WindowQueryBody::decode(&body).map(|b| b.windows_max),
        Some(2)
    );
}

/// A session rebuilt after the back-end restarted: the front-end re-sends its RAM, adopts its
/// group (its container is open, its memory registered, the default window gone) and its window
/// (created and associated in KVM). The new session then knows what the lost one knew, without
/// a single call beyond TCE_GET_INFO, and takes the window down the same way.
#[test]
fn adopt_rebuilds_an_accelerated_session_as_it_was() {
    let mut lost = Driver::new(FEATURE_MODE_ACCELERATED, platform());
    set_up(&mut lost);

    let mut d = Driver::new(FEATURE_MODE_ACCELERATED | FEATURE_REBUILD, platform());
    d.ok(mem_add(1 << 30), memfd_facts(1 << 30));
    let adopt = |group_id, iommu_group| {
        Request::GroupAdopt(GroupDesc {
            group_id,
            container_id: 0,
            iommu_group,
        })
    };
    d.ok(adopt(1, 7), None);
    let calls: Vec<KernelOp> = d.take_log().into_iter().map(|(_, op)| op).collect();
    assert_eq!(calls, [KernelOp::TceGetInfo { container: C0 }]);
    d.ok(
        table_add(1, 0x8000_0001, 16, 0, 1 << 14),
        memfd_facts(8 << 14),
    );
    let body = d.ok(Request::WindowAdopt { table_id: 1 }, None);
    assert!(d.take_log().is_empty());
    assert_eq!(
        WindowCreateBody::decode(&body),
        Some(WindowCreateBody {
            start_addr: 0,
            hw_page_shift: 16,
            levels: 1
        })
    );
    let (was, is) = (lost.session.state(), d.session.state());
    assert_eq!(is.containers[&C0].windows, was.containers[&C0].windows);
    assert_eq!(
        is.containers[&C0].registered,
        was.containers[&C0].registered
    );
    assert_eq!(is.groups[&G1], was.groups[&G1]);
    assert_eq!(
        d.session.registered_bytes(),
        lost.session.registered_bytes()
    );

    // A window adopted twice is refused like WINDOW_CREATE of a table that has one.
    assert_eq!(
        d.request(Request::WindowAdopt { table_id: 1 }, None).status,
        -Errno::EXIST.raw_os_error()
    );
    // The same group twice: refused as GROUP_ADD would be.
    assert_eq!(
        d.request(adopt(1, 7), None).status,
        -Errno::EXIST.raw_os_error()
    );
    // A second group of the same, already adopted container: no call, and the session keeps it.
    d.ok(adopt(2, 8), None);
    assert!(d.take_log().is_empty());
    assert_eq!(d.session.state().groups[&G2].container, C0);
    assert!(d.session.state().containers[&C0].groups.contains(&G2));

    lost.ok(Request::WindowRemove { table_id: 1 }, None);
    d.ok(Request::WindowRemove { table_id: 1 }, None);
    assert_eq!(d.take_log(), lost.take_log());
}

#[test]
fn adopt_needs_the_feature_and_accelerated_mode() {
    let adopt = Request::GroupAdopt(GroupDesc {
        group_id: 1,
        container_id: 0,
        iommu_group: 7,
    });
    let mut d = Driver::new(FEATURE_MODE_ACCELERATED, platform());
    assert_eq!(
        d.request(adopt.clone(), None).status,
        -Errno::NOTSUP.raw_os_error()
    );
    let mut d = Driver::new(FEATURE_MODE_ISOLATED | FEATURE_REBUILD, platform());
    let reply = d.request(adopt, None);
    assert_eq!(reply.status, -Errno::INVAL.raw_os_error());
    assert!(reply.text.contains("accelerated"), "{}", reply.text);
    assert!(d.session.state().groups.is_empty());
}

/// Fails one call, the `n`th from when it is armed (0: the next), as the front-end reports a
/// failed or refused operation.
#[derive(Clone, Default)]
struct FailAt(Rc<Cell<Option<(usize, Errno)>>>);

impl FailAt {
    fn arm(&self, n: usize, errno: Errno) {
        self.0.set(Some((n, errno)));
    }

    fn check(&self) -> Option<Result<Output, Errno>> {
        let (n, errno) = self.0.get()?;
        self.0.set(n.checked_sub(1).map(|n| (n, errno)));
        (n == 0).then_some(Err(errno))
    }
}

/// The kvm-vfio device as the kernel keeps it (§7.7): a group file joins once and leaves only
/// if it is in, ending its associations; an association needs the file in and its table's
/// hardware window (T1's at bus 0, T2's at 1 << 59); no window may go while associated.
#[derive(Debug, Default)]
struct KvmDevice {
    files: BTreeMap<GroupId, BTreeSet<TableId>>,
    windows: BTreeSet<u64>,
}

fn bus_of(table: TableId) -> u64 {
    if table == T1 {
        0
    } else {
        1 << 59
    }
}

impl KvmDevice {
    fn call(&mut self, op: &KernelOp, result: Result<Output, Errno>) -> Result<Output, Errno> {
        match (*op, &result) {
            (KernelOp::KvmFileAdd { group }, _) if self.files.contains_key(&group) => {
                return Err(Errno::EXIST)
            }
            (KernelOp::KvmFileAdd { group }, _) => {
                self.files.insert(group, BTreeSet::new());
            }
            (KernelOp::KvmFileDel { group }, _) => {
                self.files.remove(&group).ok_or(Errno::NOENT)?;
            }
            (KernelOp::KvmSetSpaprTce { group, table }, _) => {
                if !self.windows.contains(&bus_of(table)) {
                    return Err(Errno::INVAL);
                }
                self.files
                    .get_mut(&group)
                    .ok_or(Errno::NOENT)?
                    .insert(table);
            }
            (KernelOp::TceCreate { .. }, Ok(Output::StartAddr(start))) => {
                self.windows.insert(*start);
            }
            (KernelOp::TceRemove { start_addr, .. }, Ok(_)) => {
                assert!(
                    !self
                        .files
                        .values()
                        .flatten()
                        .any(|t| bus_of(*t) == start_addr),
                    "the window at {start_addr:#x} goes while associated: {self:?}"
                );
                self.windows.remove(&start_addr);
            }
            _ => {}
        }
        result
    }
}

/// An accelerated session on the platform with the kvm-vfio device's rules: RAM, `groups`,
/// tables T1 (bus 0) and T2 (bus 1 << 59), and windows for `windows`. `fail` is left unarmed.
fn kvm_session(
    groups: &[u32],
    windows: &[u32],
    fail: &FailAt,
    device: &Rc<RefCell<KvmDevice>>,
) -> Driver<impl FnMut(&KernelOp) -> Result<Output, Errno>> {
    let (fail, device) = (fail.clone(), device.clone());
    let mut platform = Platform::default();
    let kernel = move |op: &KernelOp| {
        fail.check()
            .unwrap_or_else(|| device.borrow_mut().call(op, platform.call(op)))
    };
    let mut d = Driver::new(FEATURE_MODE_ACCELERATED, kernel);
    d.ok(mem_add(1 << 30), memfd_facts(1 << 30));
    for g in groups {
        d.ok(group_add(*g, 6 + g), None);
    }
    d.ok(table_add(1, 0x8000_0001, 16, 0, 1 << 14), None);
    d.ok(table_add(2, 0x8000_0002, 16, 1 << 59, 1 << 14), None);
    for t in windows {
        d.ok(Request::WindowCreate { table_id: *t }, None);
    }
    d.take_log();
    d
}

/// The tables `group` is associated with, as the engine sees it and as KVM holds them (both
/// must agree), or `None` if its file is not in the kvm-vfio device.
fn associations<F: FnMut(&KernelOp) -> Result<Output, Errno>>(
    d: &Driver<F>,
    device: &Rc<RefCell<KvmDevice>>,
    group: GroupId,
) -> Option<BTreeSet<TableId>> {
    let g = &d.session.state().groups[&group];
    let kvm = device.borrow().files.get(&group).cloned();
    assert_eq!(
        g.file_added.then(|| g.associations.clone()),
        kvm,
        "the engine's view is the kernel's"
    );
    kvm
}

/// A WINDOW_REMOVE whose UNMAP_DMA fails after its KVM_FILE_DEL re-adds the group file and
/// re-associates the table: the window stays, and KVM keeps serving its H_PUT_TCE.
#[test]
fn window_remove_accelerated_failed_unmap_restores_the_association() {
    let (fail, device) = (FailAt::default(), Rc::default());
    let mut d = kvm_session(&[1], &[1], &fail, &device);
    fail.arm(1, Errno::IO);
    let reply = d.request(Request::WindowRemove { table_id: 1 }, None);
    let unmap = KernelOp::UnmapDma {
        container: C0,
        iova: 0,
        size: 1 << 30,
    };
    let undo = vec![
        KernelOp::KvmFileAdd { group: G1 },
        KernelOp::KvmSetSpaprTce {
            group: G1,
            table: T1,
        },
    ];
    assert_eq!(d.rollback, undo, "the rollback carries ROLLBACK");
    let ops: Vec<KernelOp> = d.take_log().into_iter().map(|(_, op)| op).collect();
    assert_eq!(
        ops,
        [vec![KernelOp::KvmFileDel { group: G1 }, unmap], undo].concat()
    );
    assert_eq!(reply.status, -Errno::IO.raw_os_error());
    assert!(
        reply.text.contains(&format!("{unmap} failed"))
            && reply
                .text
                .ends_with("; undone with KVM_FILE_ADD, KVM_SET_SPAPR_TCE"),
        "{}",
        reply.text
    );
    assert_eq!(associations(&d, &device, G1), Some(BTreeSet::from([T1])));
    assert!(d.session.state().window_of(T1).is_some());
    assert_eq!(d.session.phase(), Phase::Ready);
    // The window is still whole: removing it again works.
    d.ok(Request::WindowRemove { table_id: 1 }, None);
    assert_eq!(associations(&d, &device, G1), None);
}

/// WINDOW_REMOVE of one of a group's two tables severs it by FILE_DEL, FILE_ADD and
/// SET_SPAPR_TCE of the other (§7.7). Whichever call fails, the rollback leaves the group
/// associated with exactly the two tables it had.
#[test]
fn window_remove_accelerated_failure_at_each_call_restores_every_association() {
    let forward = [
        KernelOp::KvmFileDel { group: G1 },
        KernelOp::KvmFileAdd { group: G1 },
        KernelOp::KvmSetSpaprTce {
            group: G1,
            table: T2,
        },
        KernelOp::UnmapDma {
            container: C0,
            iova: 0,
            size: 1 << 30,
        },
        KernelOp::TceRemove {
            container: C0,
            start_addr: 0,
        },
    ];
    for at in 0..forward.len() {
        let (fail, device) = (FailAt::default(), Rc::default());
        let mut d = kvm_session(&[1], &[1, 2], &fail, &device);
        fail.arm(at, Errno::PERM);
        let reply = d.request(Request::WindowRemove { table_id: 1 }, None);
        assert_eq!(reply.status, -Errno::PERM.raw_os_error(), "{}", reply.text);
        assert!(
            reply.text.contains(&format!("{} failed", forward[at])),
            "{}",
            reply.text
        );
        assert!(!reply.text.contains("incomplete"), "{}", reply.text);
        let rollback = d.rollback.clone();
        let ops: Vec<KernelOp> = d.take_log().into_iter().map(|(_, op)| op).collect();
        assert_eq!(ops[..=at], forward[..=at], "failing call {at}");
        assert_eq!(ops[at + 1..], rollback, "failing call {at}");
        assert_eq!(
            associations(&d, &device, G1),
            Some(BTreeSet::from([T1, T2])),
            "failing call {at}: {ops:?}"
        );
        assert!(d.session.state().window_of(T1).is_some());
        assert!(d.session.state().window_of(T2).is_some());
    }
}

/// WINDOW_RESET takes every window down the same way. The associations come back for every
/// window still there after the failure; a window already removed cannot come back.
#[test]
fn window_reset_accelerated_failure_restores_the_associations_of_the_windows_left() {
    let (fail, device) = (FailAt::default(), Rc::default());
    let reset = Request::WindowReset {
        container_id: 0,
        default_table: None,
    };
    let mut d = kvm_session(&[1], &[1, 2], &fail, &device);
    d.ok(reset.clone(), None);
    let forward: Vec<KernelOp> = d.take_log().into_iter().map(|(_, op)| op).collect();
    assert_eq!(associations(&d, &device, G1), None);
    assert!(d.session.state().containers[&C0].windows.is_empty());
    for at in 1..forward.len() {
        let (fail, device) = (FailAt::default(), Rc::default());
        let mut d = kvm_session(&[1], &[1, 2], &fail, &device);
        fail.arm(at, Errno::PERM);
        let reply = d.request(reset.clone(), None);
        assert_eq!(reply.status, -Errno::PERM.raw_os_error(), "{}", reply.text);
        assert!(!reply.text.contains("incomplete"), "{}", reply.text);
        let left: BTreeSet<TableId> = [T1, T2]
            .into_iter()
            .filter(|t| d.session.state().window_of(*t).is_some())
            .collect();
        assert!(!left.is_empty(), "failing call {at}: {forward:?}");
        assert_eq!(
            associations(&d, &device, G1),
            Some(left),
            "failing call {at}: {:?}",
            d.log
        );
    }
}

/// The rollback of a GROUP_ADD that associated some of the container's tables with the new
/// group ends the new group's associations only, deleting its file once.
#[test]
fn group_add_accelerated_failed_association_leaves_the_other_groups_alone() {
    let (fail, device) = (FailAt::default(), Rc::default());
    let mut d = kvm_session(&[1], &[1, 2], &fail, &device);
    // GROUP_SET_CONTAINER, KVM_FILE_ADD, SET_SPAPR_TCE with T1, then with T2.
    fail.arm(3, Errno::PERM);
    let reply = d.request(group_add(2, 8), None);
    assert_eq!(reply.status, -Errno::PERM.raw_os_error(), "{}", reply.text);
    assert!(!reply.text.contains("incomplete"), "{}", reply.text);
    assert_eq!(
        d.rollback,
        vec![
            KernelOp::KvmFileDel { group: G2 },
            KernelOp::GroupUnsetContainer {
                container: C0,
                group: G2
            },
        ]
    );
    assert_eq!(
        associations(&d, &device, G1),
        Some(BTreeSet::from([T1, T2]))
    );
    assert!(!d.session.state().groups.contains_key(&G2));
}

/// The rollback of a WINDOW_CREATE that associated its table with some groups deletes each
/// group's file once, then removes the window.
#[test]
fn window_create_accelerated_failed_association_deletes_each_file_once() {
    let (fail, device) = (FailAt::default(), Rc::default());
    let mut d = kvm_session(&[1, 2], &[], &fail, &device);
    // TCE_CREATE, then FILE_ADD and SET_SPAPR_TCE for each group.
    fail.arm(4, Errno::PERM);
    let reply = d.request(Request::WindowCreate { table_id: 1 }, None);
    assert_eq!(reply.status, -Errno::PERM.raw_os_error(), "{}", reply.text);
    assert!(!reply.text.contains("incomplete"), "{}", reply.text);
    assert_eq!(
        d.rollback,
        vec![
            KernelOp::KvmFileDel { group: G2 },
            KernelOp::KvmFileDel { group: G1 },
            KernelOp::TceRemove {
                container: C0,
                start_addr: 0
            },
        ]
    );
    assert_eq!(associations(&d, &device, G1), None);
    assert_eq!(associations(&d, &device, G2), None);
    assert!(d.session.state().window_of(T1).is_none());
}

/// In isolated mode a window goes with no KVM call, so a failure leaves nothing to undo.
#[test]
fn window_remove_isolated_failure_has_nothing_to_roll_back() {
    let fail = FailAt::default();
    let check = fail.clone();
    let mut d = Driver::new(FEATURE_MODE_ISOLATED, platform_with(move |_| check.check()));
    set_up(&mut d);
    map_entry_0(&mut d);
    d.take_log();
    fail.arm(1, Errno::BUSY);
    let reply = d.request(Request::WindowRemove { table_id: 1 }, None);
    assert_eq!(reply.status, -Errno::BUSY.raw_os_error(), "{}", reply.text);
    assert!(!reply.text.contains("undone"), "{}", reply.text);
    let log = d.take_log();
    assert!(
        matches!(
            log[..],
            [
                (Side::Sidecar, KernelOp::UnmapDma { .. }),
                (Side::Sidecar, KernelOp::TceRemove { .. })
            ]
        ),
        "{log:?}"
    );
    assert!(d.session.state().window_of(T1).is_some());
    assert!(d.session.state().groups[&G1].associations.is_empty());
}
