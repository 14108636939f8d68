//! Request payloads: encoding, the size each request code requires, and decoding with its
//! fd-count and canonical-form checks.

use std::os::fd::OwnedFd;

use super::ops::OP_RECORD_SIZE;
use super::{DecodeError, DecodeErrorKind, Header, Reader, Writer};
use crate::protocol::message::*;
use crate::protocol::{MAX_INLINE_TCES, MAX_OPS};

const TCE_SOURCE_SHARED: u32 = 0;
const TCE_SOURCE_INLINE: u32 = 1;
const TCE_SOURCE_STUFF: u32 = 2;
const TCE_UPDATE_FIXED: usize = 24;
const OPS_RESULT_FIXED: usize = 8;
const WINDOW_RESET_CREATE_DEFAULT: u32 = 1;

/// Encodes a request's payload (without header). Returns the bytes; the caller sends them with
/// exactly `request.code().fd_count(rule)` fds, `rule` being the session's [`FdRule`].
pub fn encode_request(request: &Request) -> Vec<u8> {
    let mut w = Writer::default();
    match request {
        Request::GetFeatures => {}
        Request::SetFeatures { features } => {
            w.u64(*features);
        }
        Request::GetStatus { first_session } => {
            w.u32(*first_session).u32(0);
        }
        Request::MemAdd(r) | Request::MemRemove(r) => {
            w.u32(r.region_id)
                .u32(r.page_shift)
                .u64(r.guest_addr)
                .u64(r.size)
                .u64(r.user_addr);
            w.u64(r.mmap_offset);
        }
        Request::GroupAdd(g) | Request::GroupAdopt(g) => {
            w.u32(g.group_id)
                .u32(g.container_id)
                .u32(g.iommu_group)
                .u32(0);
        }
        Request::GroupRemove { group_id: id }
        | Request::TableRemove { table_id: id }
        | Request::WindowQuery { container_id: id }
        | Request::WindowCreate { table_id: id }
        | Request::WindowAdopt { table_id: id }
        | Request::WindowRemove { table_id: id } => {
            w.u32(*id).u32(0);
        }
        Request::TableAdd(t) => {
            w.u32(t.table_id)
                .u32(t.container_id)
                .u32(t.liobn)
                .u32(t.page_shift);
            w.u64(t.bus_offset).u64(t.entries);
        }
        Request::WindowReset {
            container_id,
            default_table,
        } => {
            let (flags, table) = match default_table {
                Some(t) => (WINDOW_RESET_CREATE_DEFAULT, *t),
                None => (0, 0),
            };
            w.u32(*container_id).u32(flags).u32(table).u32(0);
        }
        Request::TceUpdate(u) => {
            w.0.extend_from_slice(&encode_tce_fixed(u));
            match &u.entries {
                TceEntries::Shared => {}
                TceEntries::Inline(v) => {
                    w.0.reserve(v.len() * 8);
                    v.iter().for_each(|e| {
                        w.u64(*e);
                    })
                }
                TceEntries::Stuff(v) => {
                    w.u64(*v);
                }
            }
        }
        Request::EehOp(e) => {
            w.u32(e.container_id)
                .u32(e.op)
                .u32(e.err_type)
                .u32(e.err_func);
            w.u64(e.err_addr).u64(e.err_mask);
        }
        Request::OpsResult {
            transaction,
            results,
        } => {
            w.u32(*transaction).u32(results.len() as u32);
            for r in results {
                w.u16(r.kind as u16).u16(0).i32(r.status);
                r.out.iter().for_each(|o| {
                    w.u64(*o);
                });
            }
        }
    }
    w.0
}

/// The fixed part of a TCE update (everything but the entries).
fn encode_tce_fixed(u: &TceUpdate) -> [u8; TCE_UPDATE_FIXED] {
    let source = match u.entries {
        TceEntries::Shared => TCE_SOURCE_SHARED,
        TceEntries::Inline(_) => TCE_SOURCE_INLINE,
        TceEntries::Stuff(_) => TCE_SOURCE_STUFF,
    };
    let mut out = [0u8; TCE_UPDATE_FIXED];
    out[0..4].copy_from_slice(&u.table_id.to_le_bytes());
    out[4..8].copy_from_slice(&source.to_le_bytes());
    out[8..16].copy_from_slice(&u.first_index.to_le_bytes());
    out[16..20].copy_from_slice(&u.count.to_le_bytes());
    out
}

/// The payload size a request code requires, given the fixed part already read where the size
/// depends on it. `None` means the fixed part is too short to tell.
fn expected_size(code: RequestCode, payload: &[u8]) -> Result<usize, DecodeErrorKind> {
    Ok(match code {
        RequestCode::GetFeatures => 0,
        RequestCode::SetFeatures
        | RequestCode::GetStatus
        | RequestCode::GroupRemove
        | RequestCode::TableRemove
        | RequestCode::WindowQuery
        | RequestCode::WindowCreate
        | RequestCode::WindowAdopt
        | RequestCode::WindowRemove => 8,
        RequestCode::GroupAdd | RequestCode::GroupAdopt | RequestCode::WindowReset => 16,
        RequestCode::TableAdd | RequestCode::EehOp => 32,
        RequestCode::MemAdd | RequestCode::MemRemove => 40,
        RequestCode::TceUpdate => {
            if payload.len() < TCE_UPDATE_FIXED {
                return Err(DecodeErrorKind::Size {
                    expected: TCE_UPDATE_FIXED,
                    got: payload.len(),
                });
            }
            let mut r = Reader::new(&payload[4..]);
            let source = r.u32();
            let _first = r.u64();
            let count = r.u32();
            // SHARED and INLINE updates carry at most one H_PUT_TCE_INDIRECT's worth of
            // entries; only STUFF (one value) may cover a whole table.
            if source != TCE_SOURCE_STUFF && count > MAX_INLINE_TCES {
                return Err(DecodeErrorKind::Invalid {
                    field: "count",
                    value: count.into(),
                });
            }
            match source {
                TCE_SOURCE_SHARED => TCE_UPDATE_FIXED,
                TCE_SOURCE_STUFF => TCE_UPDATE_FIXED + 8,
                TCE_SOURCE_INLINE => {
                    if count > MAX_INLINE_TCES {
                        return Err(DecodeErrorKind::Invalid {
                            field: "count",
                            value: count.into(),
                        });
                    }
                    TCE_UPDATE_FIXED + 8 * count as usize
                }
                other => {
                    return Err(DecodeErrorKind::Invalid {
                        field: "source",
                        value: other.into(),
                    })
                }
            }
        }
        RequestCode::OpsResult => {
            if payload.len() < OPS_RESULT_FIXED {
                return Err(DecodeErrorKind::Size {
                    expected: OPS_RESULT_FIXED,
                    got: payload.len(),
                });
            }
            let count = Reader::new(&payload[4..]).u32();
            if count == 0 || count as usize > MAX_OPS {
                return Err(DecodeErrorKind::Invalid {
                    field: "count",
                    value: count.into(),
                });
            }
            OPS_RESULT_FIXED + OP_RECORD_SIZE * count as usize
        }
    })
}

/// Page shifts a `MEM_ADD` may name under [`FdRule::TablesOnly`]: 4 KiB to 16 GiB pages.
const REGION_PAGE_SHIFTS: std::ops::RangeInclusive<u32> = 12..=34;

/// Decodes a request of a session whose fds follow `rule`. `fds` are every fd received with
/// the frame; `fd_problem` is what the socket layer saw go wrong with them. On any error every
/// fd is dropped (closed).
pub fn decode_request(
    header: &Header,
    payload: &[u8],
    fds: Vec<OwnedFd>,
    fd_problem: Option<FdProblem>,
    rule: FdRule,
) -> Result<Incoming, DecodeError> {
    let fail = |kind| Err(DecodeError::new(header.request, kind));
    let Some(code) = RequestCode::from_u32(header.request) else {
        return fail(DecodeErrorKind::UnknownRequest);
    };
    match expected_size(code, payload) {
        Ok(expected) if expected == payload.len() => {}
        Ok(expected) => {
            return fail(DecodeErrorKind::Size {
                expected,
                got: payload.len(),
            })
        }
        Err(kind) => return fail(kind),
    }
    match fd_problem {
        Some(FdProblem::TooMany) => return fail(DecodeErrorKind::TooManyFds),
        Some(FdProblem::Misplaced) => return fail(DecodeErrorKind::FdsMisplaced),
        None => {}
    }
    if fds.len() != code.fd_count(rule) {
        return fail(DecodeErrorKind::FdCount {
            expected: code.fd_count(rule),
            got: fds.len(),
        });
    }
    let request =
        parse_request(code, payload).map_err(|kind| DecodeError::new(header.request, kind))?;
    // A region's page shift is a field only where no memfd shows the page size.
    if let Request::MemAdd(region) | Request::MemRemove(region) = &request {
        match rule {
            FdRule::TablesOnly if !REGION_PAGE_SHIFTS.contains(&region.page_shift) => {
                return fail(DecodeErrorKind::Invalid {
                    field: "page_shift",
                    value: region.page_shift.into(),
                })
            }
            FdRule::Every if region.page_shift != 0 => {
                return fail(DecodeErrorKind::NonCanonical { what: code.name() })
            }
            _ => {}
        }
    }
    // Canonical form: re-encoding must give back the same bytes, so every reserved and unused
    // field was zero and nothing was ignored. A TCE update's entries are any u64s, so only its
    // fixed part is re-encoded (its size check already covered the entries).
    let canonical = match &request {
        Request::TceUpdate(u) => encode_tce_fixed(u) == payload[..TCE_UPDATE_FIXED],
        _ => encode_request(&request) == payload,
    };
    if !canonical {
        return fail(DecodeErrorKind::NonCanonical { what: code.name() });
    }
    Ok(Incoming {
        request,
        fd: fds.into_iter().next(),
    })
}

/// What went wrong with the fds of a frame, as seen by the socket layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FdProblem {
    /// More than [`MAX_FDS`] fds were attached (received, or cut off by the kernel: MSG_CTRUNC).
    TooMany,
    /// Fds arrived in a read in which the frame did not begin: with payload bytes, not with
    /// the header.
    Misplaced,
}

fn parse_request(code: RequestCode, payload: &[u8]) -> Result<Request, DecodeErrorKind> {
    let mut r = Reader::new(payload);
    Ok(match code {
        RequestCode::GetFeatures => Request::GetFeatures,
        RequestCode::SetFeatures => Request::SetFeatures { features: r.u64() },
        RequestCode::GetStatus => Request::GetStatus {
            first_session: r.u32(),
        },
        RequestCode::MemAdd | RequestCode::MemRemove => {
            let region_id = r.u32();
            let page_shift = r.u32();
            let region = MemRegion {
                region_id,
                page_shift,
                guest_addr: r.u64(),
                size: r.u64(),
                user_addr: r.u64(),
                mmap_offset: r.u64(),
            };
            if code == RequestCode::MemAdd {
                Request::MemAdd(region)
            } else {
                Request::MemRemove(region)
            }
        }
        RequestCode::GroupAdd | RequestCode::GroupAdopt => {
            let desc = GroupDesc {
                group_id: r.u32(),
                container_id: r.u32(),
                iommu_group: r.u32(),
            };
            if code == RequestCode::GroupAdd {
                Request::GroupAdd(desc)
            } else {
                Request::GroupAdopt(desc)
            }
        }
        RequestCode::GroupRemove => Request::GroupRemove { group_id: r.u32() },
        RequestCode::TableAdd => Request::TableAdd(TableDesc {
            table_id: r.u32(),
            container_id: r.u32(),
            liobn: r.u32(),
            page_shift: r.u32(),
            bus_offset: r.u64(),
            entries: r.u64(),
        }),
        RequestCode::TableRemove => Request::TableRemove { table_id: r.u32() },
        RequestCode::WindowQuery => Request::WindowQuery {
            container_id: r.u32(),
        },
        RequestCode::WindowCreate => Request::WindowCreate { table_id: r.u32() },
        RequestCode::WindowAdopt => Request::WindowAdopt { table_id: r.u32() },
        RequestCode::WindowRemove => Request::WindowRemove { table_id: r.u32() },
        RequestCode::WindowReset => {
            let container_id = r.u32();
            let flags = r.u32();
            let table = r.u32();
            let default_table = match flags {
                0 => None,
                WINDOW_RESET_CREATE_DEFAULT => Some(table),
                other => {
                    return Err(DecodeErrorKind::Invalid {
                        field: "flags",
                        value: other.into(),
                    })
                }
            };
            Request::WindowReset {
                container_id,
                default_table,
            }
        }
        RequestCode::TceUpdate => {
            let table_id = r.u32();
            let source = r.u32();
            let first_index = r.u64();
            let count = r.u32();
            let _reserved = r.u32();
            if count == 0 {
                return Err(DecodeErrorKind::Invalid {
                    field: "count",
                    value: 0,
                });
            }
            let entries = match source {
                TCE_SOURCE_SHARED => TceEntries::Shared,
                TCE_SOURCE_STUFF => TceEntries::Stuff(r.u64()),
                // expected_size() admitted only the three sources and bounded count.
                _ => TceEntries::Inline(r.u64s(count as usize)),
            };
            Request::TceUpdate(TceUpdate {
                table_id,
                first_index,
                count,
                entries,
            })
        }
        RequestCode::EehOp => {
            let e = EehRequest {
                container_id: r.u32(),
                op: r.u32(),
                err_type: r.u32(),
                err_func: r.u32(),
                err_addr: r.u64(),
                err_mask: r.u64(),
            };
            if e.op > EEH_OP_MAX {
                return Err(DecodeErrorKind::Invalid {
                    field: "op",
                    value: e.op.into(),
                });
            }
            // The error-injection fields are unused by every other operation (§2.2).
            let injection = [e.err_type.into(), e.err_func.into(), e.err_addr, e.err_mask];
            if e.op != EEH_OP_INJECT_ERR && injection.iter().any(|&v: &u64| v != 0) {
                return Err(DecodeErrorKind::NonCanonical { what: "EEH_OP" });
            }
            Request::EehOp(e)
        }
        RequestCode::OpsResult => {
            let transaction = r.u32();
            let count = r.u32() as usize;
            if transaction == 0 {
                return Err(DecodeErrorKind::Invalid {
                    field: "transaction",
                    value: 0,
                });
            }
            let mut results = Vec::with_capacity(count);
            for index in 0..count {
                let raw_kind = r.u16();
                let _reserved = r.u16();
                let status = r.i32();
                let out = [r.u64(), r.u64(), r.u64(), r.u64()];
                let Some(kind) = OpKind::from_u16(raw_kind) else {
                    return Err(DecodeErrorKind::UnknownOp {
                        index,
                        kind: raw_kind,
                    });
                };
                if status > 0 {
                    return Err(DecodeErrorKind::Invalid {
                        field: "status",
                        value: status as u64,
                    });
                }
                results.push(OpResult { kind, status, out });
            }
            Request::OpsResult {
                transaction,
                results,
            }
        }
    })
}
