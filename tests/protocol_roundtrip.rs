//! Property-based round trips of every request, reply and owner operation through the codec,
//! plus known-answer byte layouts for one message of each shape (the spec's tables, in bytes).

use std::os::fd::OwnedFd;

use proptest::prelude::*;
use rustix::event::{eventfd, EventfdFlags};
use tce_sidecar::protocol::*;

fn fresh_fd() -> OwnedFd {
    eventfd(0, EventfdFlags::CLOEXEC).expect("eventfd")
}

/// Encodes, decodes and compares; fd-carrying requests travel with one real fd. A region that
/// names its page shift travels as accelerated mode with `FDS_BY_MODE` sends it, without fd.
fn request_round_trip(request: &Request) -> Result<(), TestCaseError> {
    let rule = match request {
        Request::MemAdd(r) | Request::MemRemove(r) if r.page_shift != 0 => FdRule::TablesOnly,
        _ => FdRule::Every,
    };
    let payload = encode_request(request);
    let header = Header::new(request.code() as u32, false, payload.len());
    let fds: Vec<OwnedFd> = (0..request.code().fd_count(rule))
        .map(|_| fresh_fd())
        .collect();
    let incoming = decode_request(&header, &payload, fds, None, rule)
        .map_err(|e| TestCaseError::fail(format!("{request:?} did not decode: {e}")))?;
    prop_assert_eq!(&incoming.request, request);
    prop_assert_eq!(incoming.fd.is_some(), request.code().fd_count(rule) == 1);
    Ok(())
}

fn arb_group() -> impl Strategy<Value = GroupDesc> {
    any::<(u32, u32, u32)>().prop_map(|(group_id, container_id, iommu_group)| GroupDesc {
        group_id,
        container_id,
        iommu_group,
    })
}

fn arb_region() -> impl Strategy<Value = MemRegion> {
    (
        any::<u32>(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        prop_oneof![Just(0u32), 12u32..=34],
    )
        .prop_map(
            |(region_id, guest_addr, size, user_addr, mmap_offset, page_shift)| MemRegion {
                region_id,
                guest_addr,
                size,
                user_addr,
                mmap_offset,
                page_shift,
            },
        )
}

fn arb_result() -> impl Strategy<Value = OpResult> {
    (
        prop::sample::select(OpKind::ALL.to_vec()),
        i32::MIN..=0,
        any::<[u64; 4]>(),
    )
        .prop_map(|(kind, status, out)| OpResult { kind, status, out })
}

fn arb_request() -> impl Strategy<Value = Request> {
    prop_oneof![
        Just(Request::GetFeatures),
        any::<u64>().prop_map(|features| Request::SetFeatures { features }),
        any::<u32>().prop_map(|first_session| Request::GetStatus { first_session }),
        arb_region().prop_map(Request::MemAdd),
        arb_region().prop_map(Request::MemRemove),
        arb_group().prop_map(Request::GroupAdd),
        arb_group().prop_map(Request::GroupAdopt),
        any::<u32>().prop_map(|table_id| Request::WindowAdopt { table_id }),
        any::<u32>().prop_map(|group_id| Request::GroupRemove { group_id }),
        any::<(u32, u32, u32, u32, u64, u64)>().prop_map(|(a, b, c, d, e, f)| {
            Request::TableAdd(TableDesc {
                table_id: a,
                container_id: b,
                liobn: c,
                page_shift: d,
                bus_offset: e,
                entries: f,
            })
        }),
        any::<u32>().prop_map(|table_id| Request::TableRemove { table_id }),
        any::<u32>().prop_map(|container_id| Request::WindowQuery { container_id }),
        any::<u32>().prop_map(|table_id| Request::WindowCreate { table_id }),
        any::<u32>().prop_map(|table_id| Request::WindowRemove { table_id }),
        (any::<u32>(), any::<Option<u32>>()).prop_map(|(container_id, default_table)| {
            Request::WindowReset {
                container_id,
                default_table,
            }
        }),
        (any::<u32>(), any::<u64>(), 1u32..=MAX_INLINE_TCES).prop_map(
            |(table_id, first_index, count)| {
                Request::TceUpdate(TceUpdate {
                    table_id,
                    first_index,
                    count,
                    entries: TceEntries::Shared,
                })
            }
        ),
        (
            any::<u32>(),
            any::<u64>(),
            prop::collection::vec(any::<u64>(), 1..=512)
        )
            .prop_map(|(table_id, first_index, v)| Request::TceUpdate(TceUpdate {
                table_id,
                first_index,
                count: v.len() as u32,
                entries: TceEntries::Inline(v),
            })),
        (any::<u32>(), any::<u64>(), 1u32..=u32::MAX, any::<u64>()).prop_map(
            |(table_id, first_index, count, value)| Request::TceUpdate(TceUpdate {
                table_id,
                first_index,
                count,
                entries: TceEntries::Stuff(value),
            })
        ),
        (
            any::<u32>(),
            0u32..=EEH_OP_MAX,
            any::<(u32, u32, u64, u64)>()
        )
            .prop_map(|(container_id, op, injection)| {
                // The injection fields are zero unless the operation injects (§2.2).
                let (err_type, err_func, err_addr, err_mask) = if op == EEH_OP_INJECT_ERR {
                    injection
                } else {
                    Default::default()
                };
                Request::EehOp(EehRequest {
                    container_id,
                    op,
                    err_type,
                    err_func,
                    err_addr,
                    err_mask,
                })
            }),
        (
            1u32..=u32::MAX,
            prop::collection::vec(arb_result(), 1..=MAX_OPS)
        )
            .prop_map(|(transaction, results)| Request::OpsResult {
                transaction,
                results
            }),
    ]
}

fn arb_access() -> impl Strategy<Value = DmaAccess> {
    prop_oneof![
        Just(DmaAccess {
            read: true,
            write: false
        }),
        Just(DmaAccess {
            read: false,
            write: true
        }),
        Just(DmaAccess {
            read: true,
            write: true
        }),
    ]
}

fn arb_op() -> impl Strategy<Value = OwnerOp> {
    let c = any::<u32>();
    prop_oneof![
        c.prop_map(|container| OwnerOp::ContainerOpen { container }),
        c.prop_map(|container| OwnerOp::ContainerClose { container }),
        (c, any::<u32>()).prop_map(|(container, extension)| OwnerOp::CheckExtension {
            container,
            extension
        }),
        (c, any::<u32>()).prop_map(|(container, iommu_type)| OwnerOp::SetIommu {
            container,
            iommu_type
        }),
        (c, any::<u32>())
            .prop_map(|(container, group)| OwnerOp::GroupSetContainer { container, group }),
        (c, any::<u32>())
            .prop_map(|(container, group)| OwnerOp::GroupUnsetContainer { container, group }),
        c.prop_map(|container| OwnerOp::TceGetInfo { container }),
        (c, any::<(u32, u64, u64)>()).prop_map(|(container, (region, offset, size))| {
            OwnerOp::RegisterMemory {
                container,
                region,
                offset,
                size,
            }
        }),
        (c, any::<(u32, u64, u64)>()).prop_map(|(container, (region, offset, size))| {
            OwnerOp::UnregisterMemory {
                container,
                region,
                offset,
                size,
            }
        }),
        (c, any::<(u32, u64, u32)>()).prop_map(|(container, (page_shift, window_size, levels))| {
            OwnerOp::TceCreate {
                container,
                page_shift,
                window_size,
                levels,
            }
        }),
        (c, any::<u64>()).prop_map(|(container, start_addr)| OwnerOp::TceRemove {
            container,
            start_addr
        }),
        (c, any::<(u32, u64, u64, u64)>(), arb_access()).prop_map(
            |(container, (region, offset, iova, size), access)| OwnerOp::MapDma {
                container,
                region,
                offset,
                iova,
                size,
                access,
            }
        ),
        (c, any::<(u64, u64)>()).prop_map(|(container, (iova, size))| OwnerOp::UnmapDma {
            container,
            iova,
            size
        }),
        (c, 0..=EEH_OP_MAX, any::<(u32, u32, u64, u64)>()).prop_map(
            |(container, op, (err_type, err_func, err_addr, err_mask))| OwnerOp::EehPeOp {
                container,
                op,
                err_type,
                err_func,
                err_addr,
                err_mask,
            }
        ),
        any::<u32>().prop_map(|group| OwnerOp::KvmFileAdd { group }),
        any::<u32>().prop_map(|group| OwnerOp::KvmFileDel { group }),
        any::<(u32, u32)>().prop_map(|(group, table)| OwnerOp::KvmSetSpaprTce { group, table }),
        any::<(u32, u64)>()
            .prop_map(|(attr_group, attr)| OwnerOp::KvmHasDeviceAttr { attr_group, attr }),
    ]
}

fn arb_reply() -> impl Strategy<Value = Reply> {
    let text = "[ -~]{1,200}";
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..4096).prop_map(Reply::ok),
        (1i32..=4095, text).prop_map(|(errno, text)| Reply::error(errno, text)),
        (
            1u32..=u32::MAX,
            prop::collection::vec(arb_op(), 1..=MAX_OPS),
            any::<bool>()
        )
            .prop_map(|(transaction, ops, rollback)| Reply::ops(
                transaction,
                ops,
                rollback
            )),
        (
            1i32..=4095,
            prop::collection::vec(any::<u8>(), 1..64),
            "[ -~]{1,64}"
        )
            .prop_map(|(errno, body, text)| Reply {
                body,
                ..Reply::error(errno, text)
            }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn request_any_round_trips_exactly(request in arb_request()) {
        request_round_trip(&request)?;
    }

    #[test]
    fn reply_any_round_trips_exactly(reply in arb_reply(), code in prop::sample::select(RequestCode::ALL.to_vec())) {
        let payload = encode_reply(&reply).map_err(TestCaseError::fail)?;
        prop_assert!(payload.len() <= MAX_PAYLOAD);
        let header = Header::new(code as u32, true, payload.len());
        let decoded = decode_reply(&header, &payload, 0).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(decoded, reply);
    }

    #[test]
    fn tce_info_any_packs_losslessly(flags: u32, start: u32, size: u32, pgsizes: u64, windows: u32, levels: u32) {
        let info = TceInfo {
            flags,
            dma32_window_start: start,
            dma32_window_size: size,
            pgsizes,
            max_dynamic_windows: windows,
            levels,
        };
        prop_assert_eq!(TceInfo::from_out(info.to_out()), info);
    }

    #[test]
    fn reply_bodies_any_round_trip(a: u32, b: u32, c: u64, d: u64, h: i64, n: u32, r: i32) {
        let q = WindowQueryBody { windows_available: a, windows_max: b, page_sizes: c, ram_size: d };
        prop_assert_eq!(WindowQueryBody::decode(&q.encode()), Some(q));
        let w = WindowCreateBody { start_addr: c, hw_page_shift: a, levels: b };
        prop_assert_eq!(WindowCreateBody::decode(&w.encode()), Some(w));
        let t = TceUpdateBody { h_status: h, processed: n };
        prop_assert_eq!(TceUpdateBody::decode(&t.encode()), Some(t));
        let e = EehBody { result: r };
        prop_assert_eq!(EehBody::decode(&e.encode()), Some(e));
        let f = FeaturesBody { features: d };
        prop_assert_eq!(FeaturesBody::decode(&f.encode()), Some(f));
    }
}

#[test]
fn request_every_code_has_a_round_trip_case() {
    // The strategy above is hand-written; make sure no request code is missing from it by
    // round-tripping one fixed example of each code.
    let examples = [
        Request::GetFeatures,
        Request::SetFeatures {
            features: FEATURE_MODE_ISOLATED,
        },
        Request::GetStatus { first_session: 3 },
        Request::MemAdd(MemRegion {
            region_id: 1,
            guest_addr: 0,
            size: 1 << 30,
            user_addr: 0x7f00_0000_0000,
            mmap_offset: 0,
            page_shift: 0,
        }),
        Request::MemRemove(MemRegion {
            region_id: 1,
            guest_addr: 0,
            size: 1 << 30,
            user_addr: 0x7f00_0000_0000,
            mmap_offset: 0,
            page_shift: 0,
        }),
        Request::GroupAdd(GroupDesc {
            group_id: 1,
            container_id: 0,
            iommu_group: 42,
        }),
        Request::GroupAdopt(GroupDesc {
            group_id: 1,
            container_id: 0,
            iommu_group: 42,
        }),
        Request::WindowAdopt { table_id: 2 },
        Request::GroupRemove { group_id: 1 },
        Request::TableAdd(TableDesc {
            table_id: 2,
            container_id: 0,
            liobn: 0x8000_0001,
            page_shift: 16,
            bus_offset: 1 << 59,
            entries: 1 << 20,
        }),
        Request::TableRemove { table_id: 2 },
        Request::WindowQuery { container_id: 0 },
        Request::WindowCreate { table_id: 2 },
        Request::WindowRemove { table_id: 2 },
        Request::WindowReset {
            container_id: 0,
            default_table: Some(1),
        },
        Request::TceUpdate(TceUpdate {
            table_id: 2,
            first_index: 7,
            count: 2,
            entries: TceEntries::Inline(vec![0x1003, 0x2001]),
        }),
        Request::EehOp(EehRequest {
            container_id: 0,
            op: 4,
            err_type: 0,
            err_func: 0,
            err_addr: 0,
            err_mask: 0,
        }),
        Request::OpsResult {
            transaction: 9,
            results: vec![OpResult {
                kind: OpKind::TceCreate,
                status: 0,
                out: [1 << 59, 0, 0, 0],
            }],
        },
    ];
    let mut codes: Vec<u32> = examples.iter().map(|r| r.code() as u32).collect();
    codes.sort_unstable();
    assert_eq!(
        codes,
        RequestCode::ALL
            .iter()
            .map(|c| *c as u32)
            .collect::<Vec<_>>()
    );
    for request in &examples {
        request_round_trip(request).unwrap();
    }
}

#[test]
fn group_add_known_bytes_match_the_spec_table() {
    let payload = encode_request(&Request::GroupAdd(GroupDesc {
        group_id: 0x11,
        container_id: 0x22,
        iommu_group: 0x33,
    }));
    assert_eq!(
        payload,
        [0x11, 0, 0, 0, 0x22, 0, 0, 0, 0x33, 0, 0, 0, 0, 0, 0, 0]
    );
    let header = Header::new(RequestCode::GroupAdd as u32, false, payload.len()).to_bytes();
    assert_eq!(header, [6, 0, 0, 0, 1, 0, 0, 0, 16, 0, 0, 0]);
}

#[test]
fn reply_with_op_known_bytes_match_the_spec_table() {
    let reply = Reply::ops(
        5,
        vec![OwnerOp::MapDma {
            container: 1,
            region: 2,
            offset: 0x1000,
            iova: 0x2000,
            size: 0x10000,
            access: DmaAccess {
                read: true,
                write: true,
            },
        }],
        false,
    );
    let payload = encode_reply(&reply).unwrap();
    let mut expected = vec![];
    expected.extend_from_slice(&0i32.to_le_bytes()); // status
    expected.extend_from_slice(&1u32.to_le_bytes()); // flags: OPS
    expected.extend_from_slice(&5u32.to_le_bytes()); // transaction
    expected.extend_from_slice(&1u16.to_le_bytes()); // op_count
    expected.extend_from_slice(&0u16.to_le_bytes()); // text_len
    expected.extend_from_slice(&0u32.to_le_bytes()); // body_len
    expected.extend_from_slice(&0u32.to_le_bytes()); // reserved
    expected.extend_from_slice(&12u16.to_le_bytes()); // kind MAP_DMA
    expected.extend_from_slice(&3u16.to_le_bytes()); // READ | WRITE
    expected.extend_from_slice(&1u32.to_le_bytes()); // container
    expected.extend_from_slice(&2u32.to_le_bytes()); // object = region
    expected.extend_from_slice(&0u32.to_le_bytes()); // aux
    expected.extend_from_slice(&0x1000u64.to_le_bytes());
    expected.extend_from_slice(&0x2000u64.to_le_bytes());
    expected.extend_from_slice(&0x10000u64.to_le_bytes());
    assert_eq!(payload, expected);
}

#[test]
fn tce_update_inline_512_fits_max_payload() {
    let request = Request::TceUpdate(TceUpdate {
        table_id: 1,
        first_index: 0,
        count: MAX_INLINE_TCES,
        entries: TceEntries::Inline(vec![0x1003; MAX_INLINE_TCES as usize]),
    });
    let payload = encode_request(&request);
    assert_eq!(payload.len(), 24 + 8 * 512);
    assert!(payload.len() <= MAX_PAYLOAD);
}

#[test]
fn reply_largest_fits_max_payload() {
    let ops = vec![
        OwnerOp::UnmapDma {
            container: 0,
            iova: 0,
            size: 4096
        };
        MAX_OPS
    ];
    let mut reply = Reply::ops(1, ops, true);
    reply.text = "x".repeat(MAX_TEXT);
    let payload = encode_reply(&reply).unwrap();
    assert_eq!(
        payload.len(),
        REPLY_FIXED + OP_RECORD_SIZE * MAX_OPS + MAX_TEXT
    );
    assert!(payload.len() <= MAX_PAYLOAD);
}
