//! One test per malformed-input class of the spec (§2.2, §3, §6, §7): broken frames end the
//! connection with a typed error; well-framed bad messages decode to an error with the errno the
//! spec assigns.

use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;

use rustix::event::{eventfd, EventfdFlags};
use tce_sidecar::protocol::*;

const EINVAL: i32 = 22;
const EBADF: i32 = 9;
const ENOSYS: i32 = 38;

fn fd() -> OwnedFd {
    eventfd(0, EventfdFlags::CLOEXEC).unwrap()
}

fn header_bytes(request: u32, flags: u32, size: u32) -> Vec<u8> {
    [
        request.to_le_bytes(),
        flags.to_le_bytes(),
        size.to_le_bytes(),
    ]
    .concat()
}

/// Writes `bytes`, closes the writing side, and receives one frame as the back-end would.
fn recv_after_writing(bytes: &[u8]) -> Result<Frame, RecvError> {
    let (mut front, back) = UnixStream::pair().unwrap();
    front.write_all(bytes).unwrap();
    drop(front);
    recv_frame(&back, false)
}

/// Decodes as a session with every fd (before negotiation, isolated, or no `FDS_BY_MODE`).
fn decode(code: u32, payload: &[u8], fds: usize) -> Result<Incoming, DecodeError> {
    decode_under(FdRule::Every, code, payload, fds)
}

fn decode_under(
    rule: FdRule,
    code: u32,
    payload: &[u8],
    fds: usize,
) -> Result<Incoming, DecodeError> {
    let header = Header::new(code, false, payload.len());
    decode_request(
        &header,
        payload,
        (0..fds).map(|_| fd()).collect(),
        None,
        rule,
    )
}

#[track_caller]
fn assert_refused(result: Result<Incoming, DecodeError>, errno: i32, kind: DecodeErrorKind) {
    let err = result.expect_err("the message must be refused");
    assert_eq!(err.kind, kind, "{err}");
    assert_eq!(err.errno(), errno, "{err}");
    assert!(!err.to_string().is_empty());
}

fn payload_of(request: &Request) -> Vec<u8> {
    encode_request(request)
}

// ---- broken frames (connection closes) ----

#[test]
fn recv_clean_close_before_header_reports_closed() {
    assert!(matches!(recv_after_writing(&[]), Err(RecvError::Closed)));
}

#[test]
fn recv_eof_inside_header_reports_truncated() {
    let bytes = &header_bytes(1, 1, 0)[..5];
    assert!(matches!(
        recv_after_writing(bytes),
        Err(RecvError::Truncated { got: 5, want: 12 })
    ));
}

#[test]
fn recv_eof_inside_payload_reports_truncated() {
    let mut bytes = header_bytes(2, 1, 8);
    bytes.extend_from_slice(&[1, 2, 3]);
    assert!(matches!(
        recv_after_writing(&bytes),
        Err(RecvError::Truncated { got: 15, want: 20 })
    ));
}

#[test]
fn header_version_other_than_one_is_a_broken_frame() {
    for version in [0, 2, 3] {
        let result = recv_after_writing(&header_bytes(1, version, 0));
        assert!(matches!(result, Err(RecvError::Frame(FrameError::BadVersion(v))) if v == version));
    }
}

#[test]
fn header_reserved_flag_bits_are_a_broken_frame() {
    for bit in 3..32 {
        let result = recv_after_writing(&header_bytes(1, 1 | 1 << bit, 0));
        assert!(
            matches!(result, Err(RecvError::Frame(FrameError::ReservedFlags(f))) if f == 1 << bit)
        );
    }
}

#[test]
fn header_reply_bit_on_a_request_is_a_broken_frame() {
    let result = recv_after_writing(&header_bytes(1, 1 | FLAG_REPLY, 0));
    assert!(matches!(
        result,
        Err(RecvError::Frame(FrameError::UnexpectedReply))
    ));
}

#[test]
fn header_request_where_reply_expected_is_a_broken_frame() {
    let bytes = header_bytes(1, 1, 0);
    assert_eq!(
        Header::decode(bytes[..12].try_into().unwrap(), true),
        Err(FrameError::UnexpectedRequest)
    );
}

#[test]
fn header_size_over_maximum_is_a_broken_frame() {
    let result = recv_after_writing(&header_bytes(14, 1, MAX_PAYLOAD as u32 + 1));
    assert!(matches!(
        result,
        Err(RecvError::Frame(FrameError::Oversized(_)))
    ));
    let at_limit = header_bytes(14, 1, MAX_PAYLOAD as u32);
    assert!(Header::decode(at_limit[..12].try_into().unwrap(), false).is_ok());
}

// ---- refused messages (error reply, session goes on) ----

#[test]
fn request_unknown_code_is_refused_with_enosys() {
    for code in [0, 19, 1000, u32::MAX] {
        assert_refused(
            decode(code, &[], 0),
            ENOSYS,
            DecodeErrorKind::UnknownRequest,
        );
    }
}

#[test]
fn request_fixed_size_mismatch_is_refused_with_einval() {
    let fixed: [(RequestCode, usize); 16] = [
        (RequestCode::GetFeatures, 0),
        (RequestCode::SetFeatures, 8),
        (RequestCode::GetStatus, 8),
        (RequestCode::MemAdd, 40),
        (RequestCode::MemRemove, 40),
        (RequestCode::GroupAdd, 16),
        (RequestCode::GroupRemove, 8),
        (RequestCode::TableAdd, 32),
        (RequestCode::TableRemove, 8),
        (RequestCode::WindowQuery, 8),
        (RequestCode::WindowCreate, 8),
        (RequestCode::WindowRemove, 8),
        (RequestCode::WindowReset, 16),
        (RequestCode::EehOp, 32),
        (RequestCode::GroupAdopt, 16),
        (RequestCode::WindowAdopt, 8),
    ];
    for (code, size) in fixed {
        for got in [size + 1, size.saturating_sub(1)] {
            if got == size {
                continue;
            }
            let payload = vec![0u8; got];
            assert_refused(
                decode(code as u32, &payload, code.fd_count(FdRule::Every)),
                EINVAL,
                DecodeErrorKind::Size {
                    expected: size,
                    got,
                },
            );
        }
    }
}

fn tce_update_bytes(source: u32, count: u32, entries: usize) -> Vec<u8> {
    let mut p = vec![];
    p.extend_from_slice(&7u32.to_le_bytes());
    p.extend_from_slice(&source.to_le_bytes());
    p.extend_from_slice(&0u64.to_le_bytes());
    p.extend_from_slice(&count.to_le_bytes());
    p.extend_from_slice(&0u32.to_le_bytes());
    p.extend(std::iter::repeat_n(0u8, 8 * entries));
    p
}

#[test]
fn tce_update_size_not_matching_count_is_refused() {
    let code = RequestCode::TceUpdate as u32;
    assert_refused(
        decode(code, &[0; 23], 0),
        EINVAL,
        DecodeErrorKind::Size {
            expected: 24,
            got: 23,
        },
    );
    assert_refused(
        decode(code, &tce_update_bytes(1, 3, 2), 0),
        EINVAL,
        DecodeErrorKind::Size {
            expected: 48,
            got: 40,
        },
    );
    assert_refused(
        decode(code, &tce_update_bytes(0, 3, 1), 0),
        EINVAL,
        DecodeErrorKind::Size {
            expected: 24,
            got: 32,
        },
    );
    assert_refused(
        decode(code, &tce_update_bytes(2, 3, 0), 0),
        EINVAL,
        DecodeErrorKind::Size {
            expected: 32,
            got: 24,
        },
    );
}

#[test]
fn tce_update_invalid_fields_are_refused() {
    let code = RequestCode::TceUpdate as u32;
    assert_refused(
        decode(code, &tce_update_bytes(3, 1, 0), 0),
        EINVAL,
        DecodeErrorKind::Invalid {
            field: "source",
            value: 3,
        },
    );
    assert_refused(
        decode(code, &tce_update_bytes(1, 513, 513), 0),
        EINVAL,
        DecodeErrorKind::Invalid {
            field: "count",
            value: 513,
        },
    );
    assert_refused(
        decode(code, &tce_update_bytes(0, 0, 0), 0),
        EINVAL,
        DecodeErrorKind::Invalid {
            field: "count",
            value: 0,
        },
    );
    assert_refused(
        decode(code, &tce_update_bytes(0, 513, 0), 0),
        EINVAL,
        DecodeErrorKind::Invalid {
            field: "count",
            value: 513,
        },
    );
    assert!(decode(code, &tce_update_bytes(1, 512, 512), 0).is_ok());
    assert!(decode(code, &tce_update_bytes(0, 512, 0), 0).is_ok());
    assert!(decode(code, &tce_update_bytes(2, u32::MAX, 1), 0).is_ok());
}

#[test]
fn request_wrong_fd_count_is_refused_with_ebadf() {
    let mem = payload_of(&Request::MemAdd(MemRegion {
        region_id: 1,
        guest_addr: 0,
        size: 4096,
        user_addr: 4096,
        mmap_offset: 0,
        page_shift: 0,
    }));
    let code = RequestCode::MemAdd as u32;
    assert_refused(
        decode(code, &mem, 0),
        EBADF,
        DecodeErrorKind::FdCount {
            expected: 1,
            got: 0,
        },
    );
    assert_refused(
        decode(code, &mem, 2),
        EBADF,
        DecodeErrorKind::FdCount {
            expected: 1,
            got: 2,
        },
    );
    assert_refused(
        decode(RequestCode::GetFeatures as u32, &[], 1),
        EBADF,
        DecodeErrorKind::FdCount {
            expected: 0,
            got: 1,
        },
    );
    let remove = payload_of(&Request::MemRemove(MemRegion {
        region_id: 1,
        guest_addr: 0,
        size: 4096,
        user_addr: 4096,
        mmap_offset: 0,
        page_shift: 0,
    }));
    assert_refused(
        decode(RequestCode::MemRemove as u32, &remove, 1),
        EBADF,
        DecodeErrorKind::FdCount {
            expected: 0,
            got: 1,
        },
    );
}

/// Accelerated mode with `FDS_BY_MODE`: only TABLE_ADD carries an fd, and MEM_ADD's reserved
/// word becomes the region's page shift.
#[test]
fn fds_by_mode_accelerated_carries_only_table_fds() {
    let region = |page_shift| {
        payload_of(&Request::MemAdd(MemRegion {
            region_id: 1,
            guest_addr: 0,
            size: 1 << 16,
            user_addr: 1 << 16,
            mmap_offset: 0,
            page_shift,
        }))
    };
    let lean = FdRule::TablesOnly;
    let mem = RequestCode::MemAdd as u32;
    let incoming = decode_under(lean, mem, &region(24), 0).expect("MEM_ADD without its memfd");
    assert!(incoming.fd.is_none());
    assert!(matches!(incoming.request, Request::MemAdd(r) if r.page_shift == 24));
    assert_refused(
        decode_under(lean, mem, &region(16), 1),
        EBADF,
        DecodeErrorKind::FdCount {
            expected: 0,
            got: 1,
        },
    );
    for page_shift in [0, 11, 35, u32::MAX] {
        assert_refused(
            decode_under(lean, mem, &region(page_shift), 0),
            EINVAL,
            DecodeErrorKind::Invalid {
                field: "page_shift",
                value: page_shift.into(),
            },
        );
    }
    // MEM_REMOVE repeats the page shift under the same rule.
    let remove = RequestCode::MemRemove as u32;
    assert!(decode_under(lean, remove, &region(16), 0).is_ok());
    // Without the rule the word is reserved.
    assert_refused(
        decode(mem, &region(16), 1),
        EINVAL,
        DecodeErrorKind::NonCanonical { what: "MEM_ADD" },
    );
    let group = payload_of(&Request::GroupAdd(GroupDesc {
        group_id: 1,
        container_id: 0,
        iommu_group: 3,
    }));
    for code in [RequestCode::GroupAdd, RequestCode::GroupAdopt] {
        assert!(decode_under(lean, code as u32, &group, 0).is_ok());
        assert_refused(
            decode_under(lean, code as u32, &group, 1),
            EBADF,
            DecodeErrorKind::FdCount {
                expected: 0,
                got: 1,
            },
        );
    }
    let table = payload_of(&Request::TableAdd(TableDesc {
        table_id: 1,
        container_id: 0,
        liobn: 0x8000_0000,
        page_shift: 12,
        bus_offset: 0,
        entries: 512,
    }));
    let code = RequestCode::TableAdd as u32;
    assert!(decode_under(lean, code, &table, 1).is_ok());
    assert_refused(
        decode_under(lean, code, &table, 0),
        EBADF,
        DecodeErrorKind::FdCount {
            expected: 1,
            got: 0,
        },
    );
}

#[test]
fn fd_rule_follows_the_negotiated_features() {
    let acc = FEATURE_MODE_ACCELERATED;
    let iso = FEATURE_MODE_ISOLATED;
    assert_eq!(FdRule::negotiated(0), FdRule::Every);
    assert_eq!(FdRule::negotiated(acc), FdRule::Every);
    assert_eq!(FdRule::negotiated(iso | FEATURE_FDS_BY_MODE), FdRule::Every);
    assert_eq!(
        FdRule::negotiated(acc | FEATURE_FDS_BY_MODE | FEATURE_EEH),
        FdRule::TablesOnly
    );
}

#[test]
fn request_fd_problems_are_refused_with_ebadf() {
    let group = payload_of(&Request::GroupAdd(GroupDesc {
        group_id: 1,
        container_id: 0,
        iommu_group: 3,
    }));
    let header = Header::new(RequestCode::GroupAdd as u32, false, group.len());
    for (problem, kind) in [
        (FdProblem::TooMany, DecodeErrorKind::TooManyFds),
        (FdProblem::Misplaced, DecodeErrorKind::FdsMisplaced),
    ] {
        assert_refused(
            decode_request(&header, &group, vec![fd()], Some(problem), FdRule::Every),
            EBADF,
            kind,
        );
    }
}

#[test]
fn request_reserved_fields_nonzero_are_refused() {
    let cases: Vec<(RequestCode, Vec<u8>, usize)> = vec![
        (
            RequestCode::GetStatus,
            payload_of(&Request::GetStatus { first_session: 0 }),
            4,
        ),
        (
            RequestCode::MemAdd,
            payload_of(&Request::MemAdd(MemRegion {
                region_id: 1,
                guest_addr: 0,
                size: 4096,
                user_addr: 0,
                mmap_offset: 0,
                page_shift: 0,
            })),
            4,
        ),
        (
            RequestCode::GroupAdd,
            payload_of(&Request::GroupAdd(GroupDesc {
                group_id: 1,
                container_id: 0,
                iommu_group: 3,
            })),
            12,
        ),
        (
            RequestCode::GroupRemove,
            payload_of(&Request::GroupRemove { group_id: 1 }),
            4,
        ),
        (
            RequestCode::TableRemove,
            payload_of(&Request::TableRemove { table_id: 1 }),
            7,
        ),
        (
            RequestCode::WindowQuery,
            payload_of(&Request::WindowQuery { container_id: 1 }),
            5,
        ),
        (
            RequestCode::WindowCreate,
            payload_of(&Request::WindowCreate { table_id: 1 }),
            6,
        ),
        (
            RequestCode::WindowRemove,
            payload_of(&Request::WindowRemove { table_id: 1 }),
            4,
        ),
        // Without CREATE_DEFAULT the table id is unused and must be zero.
        (
            RequestCode::WindowReset,
            payload_of(&Request::WindowReset {
                container_id: 1,
                default_table: None,
            }),
            8,
        ),
        (
            RequestCode::WindowReset,
            payload_of(&Request::WindowReset {
                container_id: 1,
                default_table: Some(2),
            }),
            12,
        ),
        (RequestCode::TceUpdate, tce_update_bytes(0, 1, 0), 20),
        (
            RequestCode::OpsResult,
            payload_of(&Request::OpsResult {
                transaction: 1,
                results: vec![OpResult {
                    kind: OpKind::TceGetInfo,
                    status: 0,
                    out: [0; 4],
                }],
            }),
            8 + 2,
        ),
    ];
    for (code, mut payload, reserved_at) in cases {
        payload[reserved_at] = 1;
        let result = decode(code as u32, &payload, code.fd_count(FdRule::Every));
        assert_refused(
            result,
            EINVAL,
            DecodeErrorKind::NonCanonical { what: code.name() },
        );
    }
}

#[test]
fn eeh_injection_fields_are_unused_by_other_operations() {
    let eeh = |op, err_type| {
        payload_of(&Request::EehOp(EehRequest {
            container_id: 0,
            op,
            err_type,
            err_func: 0,
            err_addr: 0,
            err_mask: 0,
        }))
    };
    // GET_STATE (5) with an error type: the field is unused, so it must be zero (§2.2).
    assert_refused(
        decode(RequestCode::EehOp as u32, &eeh(5, 1), 0),
        EINVAL,
        DecodeErrorKind::NonCanonical { what: "EEH_OP" },
    );
    assert!(decode(RequestCode::EehOp as u32, &eeh(5, 0), 0).is_ok());
    assert!(decode(RequestCode::EehOp as u32, &eeh(EEH_OP_INJECT_ERR, 1), 0).is_ok());
}

#[test]
fn request_invalid_enumerations_are_refused() {
    let mut eeh = payload_of(&Request::EehOp(EehRequest {
        container_id: 0,
        op: 0,
        err_type: 0,
        err_func: 0,
        err_addr: 0,
        err_mask: 0,
    }));
    eeh[4] = 10;
    assert_refused(
        decode(RequestCode::EehOp as u32, &eeh, 0),
        EINVAL,
        DecodeErrorKind::Invalid {
            field: "op",
            value: 10,
        },
    );
    let mut reset = payload_of(&Request::WindowReset {
        container_id: 1,
        default_table: None,
    });
    reset[4] = 2;
    assert_refused(
        decode(RequestCode::WindowReset as u32, &reset, 0),
        EINVAL,
        DecodeErrorKind::Invalid {
            field: "flags",
            value: 2,
        },
    );
}

fn ops_result_bytes(transaction: u32, count: u32, records: &[(u16, i32)]) -> Vec<u8> {
    let mut p = vec![];
    p.extend_from_slice(&transaction.to_le_bytes());
    p.extend_from_slice(&count.to_le_bytes());
    for (kind, status) in records {
        p.extend_from_slice(&kind.to_le_bytes());
        p.extend_from_slice(&0u16.to_le_bytes());
        p.extend_from_slice(&status.to_le_bytes());
        p.extend_from_slice(&[0; 32]);
    }
    p
}

#[test]
fn ops_result_malformed_is_refused() {
    let code = RequestCode::OpsResult as u32;
    let invalid = |field, value| DecodeErrorKind::Invalid { field, value };
    assert_refused(
        decode(code, &ops_result_bytes(1, 0, &[]), 0),
        EINVAL,
        invalid("count", 0),
    );
    assert_refused(
        decode(code, &ops_result_bytes(1, 513, &[]), 0),
        EINVAL,
        invalid("count", 513),
    );
    assert_refused(
        decode(code, &ops_result_bytes(1, 2, &[(7, 0)]), 0),
        EINVAL,
        DecodeErrorKind::Size {
            expected: 88,
            got: 48,
        },
    );
    assert_refused(
        decode(code, &ops_result_bytes(0, 1, &[(7, 0)]), 0),
        EINVAL,
        invalid("transaction", 0),
    );
    assert_refused(
        decode(code, &ops_result_bytes(1, 2, &[(7, 0), (99, 0)]), 0),
        EINVAL,
        DecodeErrorKind::UnknownOp { index: 1, kind: 99 },
    );
    assert_refused(
        decode(code, &ops_result_bytes(1, 1, &[(7, 5)]), 0),
        EINVAL,
        invalid("status", 5),
    );
    assert!(decode(code, &ops_result_bytes(1, 1, &[(7, -22)]), 0).is_ok());
}

// ---- replies (front-end side) ----

fn reply_fixed(
    status: i32,
    flags: u32,
    transaction: u32,
    ops: u16,
    text: u16,
    body: u32,
) -> Vec<u8> {
    let mut p = vec![];
    p.extend_from_slice(&status.to_le_bytes());
    p.extend_from_slice(&flags.to_le_bytes());
    p.extend_from_slice(&transaction.to_le_bytes());
    p.extend_from_slice(&ops.to_le_bytes());
    p.extend_from_slice(&text.to_le_bytes());
    p.extend_from_slice(&body.to_le_bytes());
    p.extend_from_slice(&0u32.to_le_bytes());
    p
}

fn op_record(kind: u16, flags: u16, aux: u32, args: [u64; 3]) -> Vec<u8> {
    let mut p = vec![];
    p.extend_from_slice(&kind.to_le_bytes());
    p.extend_from_slice(&flags.to_le_bytes());
    p.extend_from_slice(&[0; 8]);
    p.extend_from_slice(&aux.to_le_bytes());
    args.iter()
        .for_each(|a| p.extend_from_slice(&a.to_le_bytes()));
    p
}

#[track_caller]
fn assert_reply_refused(payload: &[u8], fds: usize, kind: DecodeErrorKind) {
    let header = Header::new(RequestCode::WindowCreate as u32, true, payload.len());
    let err = decode_reply(&header, payload, fds).expect_err("the reply must be refused");
    assert_eq!(err.kind, kind, "{err}");
}

#[test]
fn reply_malformed_fixed_part_is_refused() {
    let invalid_flags = |v| DecodeErrorKind::Invalid {
        field: "flags",
        value: v,
    };
    assert_reply_refused(
        &[0; 23],
        0,
        DecodeErrorKind::Size {
            expected: 24,
            got: 23,
        },
    );
    assert_reply_refused(
        &reply_fixed(0, 0, 0, 0, 0, 4),
        0,
        DecodeErrorKind::Size {
            expected: 28,
            got: 24,
        },
    );
    assert_reply_refused(
        &reply_fixed(0, 0, 0, 0, 0, 0),
        1,
        DecodeErrorKind::FdCount {
            expected: 0,
            got: 1,
        },
    );
    assert_reply_refused(
        &reply_fixed(5, 0, 0, 0, 0, 0),
        0,
        DecodeErrorKind::Invalid {
            field: "status",
            value: 5,
        },
    );
    assert_reply_refused(
        &reply_fixed(0, 4, 0, 0, 0, 0),
        0,
        DecodeErrorKind::NonCanonical {
            what: "the reply header",
        },
    );
    let mut reserved = reply_fixed(0, 0, 0, 0, 0, 0);
    reserved[20] = 1;
    assert_reply_refused(
        &reserved,
        0,
        DecodeErrorKind::NonCanonical {
            what: "the reply header",
        },
    );
    // OPS flag without operations, operations without a transaction, operations with an error
    // status, rollback without operations.
    assert_reply_refused(&reply_fixed(0, 1, 1, 0, 0, 0), 0, invalid_flags(1));
    let rec = op_record(7, 0, 0, [0; 3]);
    assert_reply_refused(
        &[reply_fixed(0, 1, 0, 1, 0, 0), rec.clone()].concat(),
        0,
        invalid_flags(1),
    );
    assert_reply_refused(
        &[reply_fixed(0, 0, 3, 1, 0, 0), rec.clone()].concat(),
        0,
        invalid_flags(0),
    );
    assert_reply_refused(
        &[reply_fixed(-5, 1, 3, 1, 0, 0), rec].concat(),
        0,
        invalid_flags(1),
    );
    assert_reply_refused(&reply_fixed(0, 2, 0, 0, 0, 0), 0, invalid_flags(2));
    // A body with operations: it belongs to the final reply.
    assert_reply_refused(
        &[
            reply_fixed(0, 1, 3, 1, 0, 8),
            op_record(7, 0, 0, [0; 3]),
            vec![0; 8],
        ]
        .concat(),
        0,
        DecodeErrorKind::Invalid {
            field: "body_len",
            value: 8,
        },
    );
}

#[test]
fn reply_bad_text_is_refused() {
    assert_reply_refused(&reply_fixed(-22, 0, 0, 0, 0, 0), 0, DecodeErrorKind::Text);
    assert_reply_refused(
        &[reply_fixed(-22, 0, 0, 0, 2, 0), vec![0xff, 0xfe]].concat(),
        0,
        DecodeErrorKind::Text,
    );
    let long = vec![b'x'; MAX_TEXT + 1];
    assert_reply_refused(
        &[reply_fixed(-22, 0, 0, 0, long.len() as u16, 0), long].concat(),
        0,
        DecodeErrorKind::Text,
    );
}

#[test]
fn reply_bad_operation_records_are_refused() {
    let with = |rec: Vec<u8>| [reply_fixed(0, 1, 3, 1, 0, 0), rec].concat();
    assert_reply_refused(
        &with(op_record(0, 0, 0, [0; 3])),
        0,
        DecodeErrorKind::UnknownOp { index: 0, kind: 0 },
    );
    assert_reply_refused(
        &with(op_record(19, 0, 0, [0; 3])),
        0,
        DecodeErrorKind::UnknownOp { index: 0, kind: 19 },
    );
    // TCE_GET_INFO uses no argument: a nonzero arg0 is not canonical.
    assert_reply_refused(
        &with(op_record(7, 0, 0, [1, 0, 0])),
        0,
        DecodeErrorKind::NonCanonical {
            what: "an operation record",
        },
    );
    // Flags belong to MAP_DMA only; MAP_DMA needs READ and/or WRITE and nothing else.
    assert_reply_refused(
        &with(op_record(7, 1, 0, [0; 3])),
        0,
        DecodeErrorKind::NonCanonical {
            what: "an operation record",
        },
    );
    assert_reply_refused(
        &with(op_record(12, 0, 0, [0; 3])),
        0,
        DecodeErrorKind::Invalid {
            field: "flags",
            value: 0,
        },
    );
    assert_reply_refused(
        &with(op_record(12, 4, 0, [0; 3])),
        0,
        DecodeErrorKind::Invalid {
            field: "flags",
            value: 4,
        },
    );
    assert_reply_refused(
        &with(op_record(10, 0, 16, [1 << 30, 1 << 32, 0])),
        0,
        DecodeErrorKind::Invalid {
            field: "levels",
            value: 1 << 32,
        },
    );
    assert_reply_refused(
        &with(op_record(14, 0, 10, [0; 3])),
        0,
        DecodeErrorKind::Invalid {
            field: "op",
            value: 10,
        },
    );
}

#[test]
fn reply_unknown_request_code_is_refused() {
    let payload = reply_fixed(0, 0, 0, 0, 0, 0);
    let header = Header::new(77, true, payload.len());
    assert_eq!(
        decode_reply(&header, &payload, 0).unwrap_err().kind,
        DecodeErrorKind::UnknownRequest
    );
}

#[test]
fn encode_reply_refuses_to_emit_invalid_replies() {
    assert!(encode_reply(&Reply {
        status: 1,
        ..Reply::default()
    })
    .is_err());
    assert!(encode_reply(&Reply {
        status: -22,
        ..Reply::default()
    })
    .is_err());
    assert!(encode_reply(&Reply {
        transaction: 1,
        ..Reply::default()
    })
    .is_err());
    assert!(encode_reply(&Reply {
        rollback: true,
        ..Reply::default()
    })
    .is_err());
    assert!(encode_reply(&Reply::error(22, "x".repeat(MAX_TEXT + 1))).is_err());
    let op = OwnerOp::TceGetInfo { container: 0 };
    assert!(encode_reply(&Reply {
        status: -1,
        text: "t".into(),
        ..Reply::ops(1, vec![op], false)
    })
    .is_err());
    assert!(encode_reply(&Reply::ops(1, vec![op; MAX_OPS + 1], false)).is_err());
    assert!(encode_reply(&Reply::ok(vec![0; MAX_PAYLOAD])).is_err());
}
