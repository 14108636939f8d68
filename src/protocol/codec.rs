//! Byte layout: the header, every request payload, replies, operation records and reply bodies.
//!
//! All integers are little-endian. Decoding is a pipeline of checks (header → request code →
//! payload size → fd count → field values → canonical form) and returns a typed error for each
//! malformed class; it never panics and never reads past the slice it is given.

use std::fmt;
use std::os::fd::OwnedFd;

use rustix::io::Errno;

use super::message::*;
use super::{
    FLAG_REPLY, FLAG_VERSION_MASK, HEADER_SIZE, MAX_FDS, MAX_INLINE_TCES, MAX_OPS, MAX_PAYLOAD,
    MAX_TEXT, VERSION,
};

/// The 12-byte frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub request: u32,
    pub flags: u32,
    pub size: u32,
}

/// A header that cannot be trusted to delimit a frame. The connection must be closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("header carries protocol version {0}; this side speaks version {VERSION}")]
    BadVersion(u32),
    #[error("reserved header flag bits {0:#x} are set")]
    ReservedFlags(u32),
    #[error("payload size {0} exceeds the maximum of {MAX_PAYLOAD} bytes")]
    Oversized(u32),
    #[error("a reply arrived where a request was expected")]
    UnexpectedReply,
    #[error("a request arrived where a reply was expected")]
    UnexpectedRequest,
}

impl Header {
    pub fn new(request: u32, reply: bool, size: usize) -> Self {
        let flags = VERSION | if reply { FLAG_REPLY } else { 0 };
        // Callers never build payloads above MAX_PAYLOAD (encode_* check it), so this fits.
        Self {
            request,
            flags,
            size: size as u32,
        }
    }

    pub fn to_bytes(self) -> [u8; HEADER_SIZE] {
        let mut out = [0u8; HEADER_SIZE];
        out[0..4].copy_from_slice(&self.request.to_le_bytes());
        out[4..8].copy_from_slice(&self.flags.to_le_bytes());
        out[8..12].copy_from_slice(&self.size.to_le_bytes());
        out
    }

    /// Decodes and checks a header. `expect_reply` is true on the front-end side.
    pub fn decode(bytes: &[u8; HEADER_SIZE], expect_reply: bool) -> Result<Self, FrameError> {
        let word =
            |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        let header = Self {
            request: word(0),
            flags: word(4),
            size: word(8),
        };
        let version = header.flags & FLAG_VERSION_MASK;
        if version != VERSION {
            return Err(FrameError::BadVersion(version));
        }
        let reserved = header.flags & !(FLAG_VERSION_MASK | FLAG_REPLY);
        if reserved != 0 {
            return Err(FrameError::ReservedFlags(reserved));
        }
        match (header.flags & FLAG_REPLY != 0, expect_reply) {
            (true, false) => return Err(FrameError::UnexpectedReply),
            (false, true) => return Err(FrameError::UnexpectedRequest),
            _ => {}
        }
        if header.size as usize > MAX_PAYLOAD {
            return Err(FrameError::Oversized(header.size));
        }
        Ok(header)
    }
}

/// Why a well-framed message was refused. The peer gets an error reply; the session goes on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeError {
    /// The request code from the header (the code answered, for replies).
    pub request: u32,
    pub kind: DecodeErrorKind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodeErrorKind {
    /// The request code is not defined by this version.
    UnknownRequest,
    /// The payload size does not fit the request's layout.
    Size { expected: usize, got: usize },
    /// The message carried the wrong number of fds (all of them were closed).
    FdCount { expected: usize, got: usize },
    /// More than [`MAX_FDS`] fds were attached (all were closed, including any the kernel
    /// cut off with MSG_CTRUNC).
    TooManyFds,
    /// Fds arrived with payload bytes instead of with the header.
    FdsMisplaced,
    /// A field holds a value the spec does not allow.
    Invalid { field: &'static str, value: u64 },
    /// An operation record names an unknown kind.
    UnknownOp { index: usize, kind: u16 },
    /// A reserved or unused field is not zero.
    NonCanonical { what: &'static str },
    /// The reply's text is longer than [`MAX_TEXT`] or not UTF-8.
    Text,
}

impl DecodeError {
    fn new(request: u32, kind: DecodeErrorKind) -> Self {
        Self { request, kind }
    }

    /// The errno the error reply carries (positive; sent negated).
    pub fn errno(&self) -> i32 {
        match self.kind {
            DecodeErrorKind::UnknownRequest => Errno::NOSYS,
            DecodeErrorKind::FdCount { .. }
            | DecodeErrorKind::TooManyFds
            | DecodeErrorKind::FdsMisplaced => Errno::BADF,
            DecodeErrorKind::Size { .. }
            | DecodeErrorKind::Invalid { .. }
            | DecodeErrorKind::UnknownOp { .. }
            | DecodeErrorKind::NonCanonical { .. }
            | DecodeErrorKind::Text => Errno::INVAL,
        }
        .raw_os_error()
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match RequestCode::from_u32(self.request) {
            Some(code) => write!(f, "{code}: ")?,
            None => write!(f, "request {}: ", self.request)?,
        }
        match &self.kind {
            DecodeErrorKind::UnknownRequest => write!(f, "unknown request code"),
            DecodeErrorKind::Size { expected, got } => {
                write!(f, "payload is {got} bytes, the layout needs {expected}")
            }
            DecodeErrorKind::FdCount { expected, got } => {
                write!(
                    f,
                    "carries exactly {expected} fd(s), received {got}; all were closed"
                )
            }
            DecodeErrorKind::TooManyFds => {
                write!(f, "more than {MAX_FDS} fds attached; all were closed")
            }
            DecodeErrorKind::FdsMisplaced => {
                write!(
                    f,
                    "fds must travel with the header, not the payload; all were closed"
                )
            }
            DecodeErrorKind::Invalid { field, value } => {
                write!(f, "field {field} has invalid value {value:#x}")
            }
            DecodeErrorKind::UnknownOp { index, kind } => {
                write!(f, "operation record {index} has unknown kind {kind}")
            }
            DecodeErrorKind::NonCanonical { what } => {
                write!(f, "reserved or unused fields of {what} must be zero")
            }
            DecodeErrorKind::Text => {
                write!(f, "error text is not UTF-8 or exceeds {MAX_TEXT} bytes")
            }
        }
    }
}

impl std::error::Error for DecodeError {}

/// Little-endian reader over a slice that is known to be long enough (sizes are checked first);
/// out-of-range reads return zero instead of panicking, and the canonical-form check catches them.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        if let Some(src) = self.buf.get(self.pos..self.pos + N) {
            out.copy_from_slice(src);
        }
        self.pos += N;
        out
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    fn i32(&mut self) -> i32 {
        i32::from_le_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
    fn i64(&mut self) -> i64 {
        i64::from_le_bytes(self.take())
    }
    /// `count` u64s; as for the other reads, those past the end read as zero.
    fn u64s(&mut self, count: usize) -> Vec<u64> {
        let rest = self.buf.get(self.pos..).unwrap_or_default();
        let mut out: Vec<u64> = rest
            .chunks_exact(8)
            .take(count)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
            .collect();
        out.resize(count, 0);
        self.pos += count * 8;
        out
    }
}

/// Little-endian writer.
#[derive(Default)]
struct Writer(Vec<u8>);

impl Writer {
    fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn i32(&mut self, v: i32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn i64(&mut self, v: i64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
}

const TCE_SOURCE_SHARED: u32 = 0;
const TCE_SOURCE_INLINE: u32 = 1;
const TCE_SOURCE_STUFF: u32 = 2;
const TCE_UPDATE_FIXED: usize = 24;
const OPS_RESULT_FIXED: usize = 8;
const WINDOW_RESET_CREATE_DEFAULT: u32 = 1;
/// Size of one owner-operation record and of one result record.
pub const OP_RECORD_SIZE: usize = 40;
/// Size of the fixed part of a reply payload.
pub const REPLY_FIXED: usize = 24;
const REPLY_FLAG_OPS: u32 = 1;
const REPLY_FLAG_ROLLBACK: u32 = 2;
const MAP_FLAG_READ: u16 = 1;
const MAP_FLAG_WRITE: u16 = 2;

/// Encodes a request's payload (without header). Returns the bytes; the caller sends them with
/// exactly `request.code().fd_count()` fds.
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
                .u32(0)
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

/// Decodes a request. `fds` are every fd received with the frame; `fd_problem` is what the
/// socket layer saw go wrong with them. On any error every fd is dropped (closed).
pub fn decode_request(
    header: &Header,
    payload: &[u8],
    fds: Vec<OwnedFd>,
    fd_problem: Option<FdProblem>,
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
    if fds.len() != code.fd_count() {
        return fail(DecodeErrorKind::FdCount {
            expected: code.fd_count(),
            got: fds.len(),
        });
    }
    let request =
        parse_request(code, payload).map_err(|kind| DecodeError::new(header.request, kind))?;
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
            let _reserved = r.u32();
            let region = MemRegion {
                region_id,
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

fn encode_op(w: &mut Writer, op: &OwnerOp) {
    // Record: kind u16, flags u16, container u32, object u32, aux u32, arg0..arg2 u64.
    let (mut flags, mut container, mut object, mut aux) = (0u16, 0u32, 0u32, 0u32);
    let mut args = [0u64; 3];
    match *op {
        OwnerOp::ContainerOpen { container: c }
        | OwnerOp::ContainerClose { container: c }
        | OwnerOp::TceGetInfo { container: c } => container = c,
        OwnerOp::CheckExtension {
            container: c,
            extension: x,
        }
        | OwnerOp::SetIommu {
            container: c,
            iommu_type: x,
        } => (container, aux) = (c, x),
        OwnerOp::GroupSetContainer {
            container: c,
            group,
        }
        | OwnerOp::GroupUnsetContainer {
            container: c,
            group,
        } => (container, object) = (c, group),
        OwnerOp::RegisterMemory {
            container: c,
            region,
            offset,
            size,
        }
        | OwnerOp::UnregisterMemory {
            container: c,
            region,
            offset,
            size,
        } => {
            (container, object) = (c, region);
            args = [offset, size, 0];
        }
        OwnerOp::TceCreate {
            container: c,
            page_shift,
            window_size,
            levels,
        } => {
            (container, aux) = (c, page_shift);
            args = [window_size, levels.into(), 0];
        }
        OwnerOp::TceRemove {
            container: c,
            start_addr,
        } => {
            container = c;
            args[0] = start_addr;
        }
        OwnerOp::MapDma {
            container: c,
            region,
            offset,
            iova,
            size,
            access,
        } => {
            (container, object) = (c, region);
            flags = if access.read { MAP_FLAG_READ } else { 0 }
                | if access.write { MAP_FLAG_WRITE } else { 0 };
            args = [offset, iova, size];
        }
        OwnerOp::UnmapDma {
            container: c,
            iova,
            size,
        } => {
            container = c;
            args = [iova, size, 0];
        }
        OwnerOp::EehPeOp {
            container: c,
            op,
            err_type,
            err_func,
            err_addr,
            err_mask,
        } => {
            (container, aux) = (c, op);
            args = [
                u64::from(err_type) | u64::from(err_func) << 32,
                err_addr,
                err_mask,
            ];
        }
        OwnerOp::KvmFileAdd { group } | OwnerOp::KvmFileDel { group } => object = group,
        OwnerOp::KvmSetSpaprTce { group, table } => (object, aux) = (group, table),
        OwnerOp::KvmHasDeviceAttr { attr_group, attr } => {
            aux = attr_group;
            args[0] = attr;
        }
    }
    w.u16(op.kind() as u16)
        .u16(flags)
        .u32(container)
        .u32(object)
        .u32(aux);
    args.iter().for_each(|a| {
        w.u64(*a);
    });
}

fn decode_op(index: usize, record: &[u8]) -> Result<OwnerOp, DecodeErrorKind> {
    let mut r = Reader::new(record);
    let raw_kind = r.u16();
    let flags = r.u16();
    let (container, object, aux) = (r.u32(), r.u32(), r.u32());
    let args = [r.u64(), r.u64(), r.u64()];
    let kind = OpKind::from_u16(raw_kind).ok_or(DecodeErrorKind::UnknownOp {
        index,
        kind: raw_kind,
    })?;
    let op = match kind {
        OpKind::ContainerOpen => OwnerOp::ContainerOpen { container },
        OpKind::ContainerClose => OwnerOp::ContainerClose { container },
        OpKind::CheckExtension => OwnerOp::CheckExtension {
            container,
            extension: aux,
        },
        OpKind::SetIommu => OwnerOp::SetIommu {
            container,
            iommu_type: aux,
        },
        OpKind::GroupSetContainer => OwnerOp::GroupSetContainer {
            container,
            group: object,
        },
        OpKind::GroupUnsetContainer => OwnerOp::GroupUnsetContainer {
            container,
            group: object,
        },
        OpKind::TceGetInfo => OwnerOp::TceGetInfo { container },
        OpKind::RegisterMemory => OwnerOp::RegisterMemory {
            container,
            region: object,
            offset: args[0],
            size: args[1],
        },
        OpKind::UnregisterMemory => OwnerOp::UnregisterMemory {
            container,
            region: object,
            offset: args[0],
            size: args[1],
        },
        OpKind::TceCreate => {
            let levels = u32::try_from(args[1]).map_err(|_| DecodeErrorKind::Invalid {
                field: "levels",
                value: args[1],
            })?;
            OwnerOp::TceCreate {
                container,
                page_shift: aux,
                window_size: args[0],
                levels,
            }
        }
        OpKind::TceRemove => OwnerOp::TceRemove {
            container,
            start_addr: args[0],
        },
        OpKind::MapDma => {
            if flags == 0 || flags & !(MAP_FLAG_READ | MAP_FLAG_WRITE) != 0 {
                return Err(DecodeErrorKind::Invalid {
                    field: "flags",
                    value: flags.into(),
                });
            }
            let access = DmaAccess {
                read: flags & MAP_FLAG_READ != 0,
                write: flags & MAP_FLAG_WRITE != 0,
            };
            OwnerOp::MapDma {
                container,
                region: object,
                offset: args[0],
                iova: args[1],
                size: args[2],
                access,
            }
        }
        OpKind::UnmapDma => OwnerOp::UnmapDma {
            container,
            iova: args[0],
            size: args[1],
        },
        OpKind::EehPeOp if aux > EEH_OP_MAX => {
            return Err(DecodeErrorKind::Invalid {
                field: "op",
                value: aux.into(),
            })
        }
        OpKind::EehPeOp => OwnerOp::EehPeOp {
            container,
            op: aux,
            err_type: args[0] as u32,
            err_func: (args[0] >> 32) as u32,
            err_addr: args[1],
            err_mask: args[2],
        },
        OpKind::KvmFileAdd => OwnerOp::KvmFileAdd { group: object },
        OpKind::KvmFileDel => OwnerOp::KvmFileDel { group: object },
        OpKind::KvmSetSpaprTce => OwnerOp::KvmSetSpaprTce {
            group: object,
            table: aux,
        },
        OpKind::KvmHasDeviceAttr => OwnerOp::KvmHasDeviceAttr {
            attr_group: aux,
            attr: args[0],
        },
    };
    let mut canonical = Writer::default();
    encode_op(&mut canonical, &op);
    if canonical.0 != record {
        return Err(DecodeErrorKind::NonCanonical {
            what: "an operation record",
        });
    }
    Ok(op)
}

/// Encodes a reply payload. Fails (with the reason) if the reply breaks the spec's limits, so a
/// bug on the sending side never puts an invalid frame on the wire.
pub fn encode_reply(reply: &Reply) -> Result<Vec<u8>, &'static str> {
    if reply.status > 0 {
        return Err("reply status must be 0 or a negative errno");
    }
    if reply.ops.len() > MAX_OPS {
        return Err("too many operations in one reply");
    }
    if reply.text.len() > MAX_TEXT {
        return Err("error text too long");
    }
    if reply.ops.is_empty() != (reply.transaction == 0) {
        return Err("operations and a transaction id go together");
    }
    if !reply.ops.is_empty() && reply.status != 0 {
        return Err("a reply with pending operations has status 0");
    }
    if reply.rollback && reply.ops.is_empty() {
        return Err("rollback needs operations");
    }
    if reply.status < 0 && reply.text.is_empty() {
        return Err("an error reply must explain itself");
    }
    let size = REPLY_FIXED + OP_RECORD_SIZE * reply.ops.len() + reply.body.len() + reply.text.len();
    if size > MAX_PAYLOAD {
        return Err("reply exceeds the maximum payload");
    }
    let mut w = Writer(Vec::with_capacity(size));
    let flags = if reply.ops.is_empty() {
        0
    } else {
        REPLY_FLAG_OPS
    } | if reply.rollback {
        REPLY_FLAG_ROLLBACK
    } else {
        0
    };
    w.i32(reply.status).u32(flags).u32(reply.transaction);
    w.u16(reply.ops.len() as u16).u16(reply.text.len() as u16);
    w.u32(reply.body.len() as u32).u32(0);
    reply.ops.iter().for_each(|op| encode_op(&mut w, op));
    w.0.extend_from_slice(&reply.body);
    w.0.extend_from_slice(reply.text.as_bytes());
    Ok(w.0)
}

/// Decodes a reply payload (front-end side). `fd_count` is the number of fds received with it;
/// replies never carry fds.
pub fn decode_reply(
    header: &Header,
    payload: &[u8],
    fd_count: usize,
) -> Result<Reply, DecodeError> {
    let fail = |kind| Err(DecodeError::new(header.request, kind));
    if RequestCode::from_u32(header.request).is_none() {
        return fail(DecodeErrorKind::UnknownRequest);
    }
    if fd_count != 0 {
        return fail(DecodeErrorKind::FdCount {
            expected: 0,
            got: fd_count,
        });
    }
    if payload.len() < REPLY_FIXED {
        return fail(DecodeErrorKind::Size {
            expected: REPLY_FIXED,
            got: payload.len(),
        });
    }
    let mut r = Reader::new(payload);
    let status = r.i32();
    let flags = r.u32();
    let transaction = r.u32();
    let op_count = r.u16() as usize;
    let text_len = r.u16() as usize;
    let body_len = r.u32() as usize;
    let reserved = r.u32();
    let expected = REPLY_FIXED + OP_RECORD_SIZE * op_count + body_len + text_len;
    if expected != payload.len() {
        return fail(DecodeErrorKind::Size {
            expected,
            got: payload.len(),
        });
    }
    if reserved != 0 || flags & !(REPLY_FLAG_OPS | REPLY_FLAG_ROLLBACK) != 0 {
        return fail(DecodeErrorKind::NonCanonical {
            what: "the reply header",
        });
    }
    if status > 0 {
        return fail(DecodeErrorKind::Invalid {
            field: "status",
            value: status as u64,
        });
    }
    let has_ops = flags & REPLY_FLAG_OPS != 0;
    let rollback = flags & REPLY_FLAG_ROLLBACK != 0;
    if op_count > MAX_OPS
        || has_ops != (op_count > 0)
        || has_ops != (transaction != 0)
        || (has_ops && status != 0)
        || (rollback && !has_ops)
    {
        return fail(DecodeErrorKind::Invalid {
            field: "flags",
            value: flags.into(),
        });
    }
    let ops_end = REPLY_FIXED + OP_RECORD_SIZE * op_count;
    let ops = payload[REPLY_FIXED..ops_end]
        .chunks_exact(OP_RECORD_SIZE)
        .enumerate()
        .map(|(i, rec)| decode_op(i, rec))
        .collect::<Result<Vec<_>, _>>();
    let ops = match ops {
        Ok(ops) => ops,
        Err(kind) => return fail(kind),
    };
    let body = payload[ops_end..ops_end + body_len].to_vec();
    let text = match std::str::from_utf8(&payload[ops_end + body_len..]) {
        Ok(t) if t.len() <= MAX_TEXT && (status == 0 || !t.is_empty()) => t.to_owned(),
        _ => return fail(DecodeErrorKind::Text),
    };
    Ok(Reply {
        status,
        transaction,
        rollback,
        ops,
        body,
        text,
    })
}

impl FeaturesBody {
    pub fn encode(&self) -> Vec<u8> {
        self.features.to_le_bytes().to_vec()
    }
    pub fn decode(body: &[u8]) -> Option<Self> {
        (body.len() == 8).then(|| Self {
            features: Reader::new(body).u64(),
        })
    }
}

impl WindowQueryBody {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u32(self.windows_available)
            .u32(self.windows_max)
            .u64(self.page_sizes)
            .u64(self.ram_size);
        w.0
    }
    pub fn decode(body: &[u8]) -> Option<Self> {
        let mut r = Reader::new(body);
        (body.len() == 24).then(|| Self {
            windows_available: r.u32(),
            windows_max: r.u32(),
            page_sizes: r.u64(),
            ram_size: r.u64(),
        })
    }
}

impl WindowCreateBody {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u64(self.start_addr)
            .u32(self.hw_page_shift)
            .u32(self.levels);
        w.0
    }
    pub fn decode(body: &[u8]) -> Option<Self> {
        let mut r = Reader::new(body);
        (body.len() == 16).then(|| Self {
            start_addr: r.u64(),
            hw_page_shift: r.u32(),
            levels: r.u32(),
        })
    }
}

impl TceUpdateBody {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.i64(self.h_status).u32(self.processed).u32(0);
        w.0
    }
    pub fn decode(body: &[u8]) -> Option<Self> {
        let mut r = Reader::new(body);
        let decoded = Self {
            h_status: r.i64(),
            processed: r.u32(),
        };
        (body.len() == 16 && r.u32() == 0).then_some(decoded)
    }
}

impl EehBody {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.i32(self.result).u32(0);
        w.0
    }
    pub fn decode(body: &[u8]) -> Option<Self> {
        let mut r = Reader::new(body);
        let decoded = Self { result: r.i32() };
        (body.len() == 8 && r.u32() == 0).then_some(decoded)
    }
}
