//! Byte layout: the header, every request payload, replies, operation records and reply bodies.
//!
//! All integers are little-endian. Decoding is a pipeline of checks (header → request code →
//! payload size → fd count → field values → canonical form) and returns a typed error for each
//! malformed class; it never panics and never reads past the slice it is given.
//!
//! This file holds the frame header, the decode errors and the little-endian reader and writer;
//! `request.rs` lays out requests, `reply.rs` replies and reply bodies, `ops.rs` owner-operation
//! records.

use std::fmt;

use rustix::io::Errno;

use super::message::*;
use super::{FLAG_REPLY, FLAG_VERSION_MASK, HEADER_SIZE, MAX_FDS, MAX_PAYLOAD, MAX_TEXT, VERSION};

mod ops;
mod reply;
mod request;

pub use ops::OP_RECORD_SIZE;
pub use reply::{decode_reply, encode_reply, REPLY_FIXED};
pub use request::{decode_request, encode_request, FdProblem};

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
