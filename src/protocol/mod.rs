//! The tce-sidecar wire protocol, version 1 (`protocol/PROTOCOL.md` is the normative text).
//!
//! This module owns the byte layout of every message and the transport rules (framing, fd
//! passing). It decodes untrusted input without panicking and without leaking a received fd on
//! any path. It must not know about sessions, kernel calls or policy: whether a request is valid
//! *now* is the daemon's and engine's business; whether it is well-formed is decided here.
#![deny(unsafe_code)]

mod codec;
mod message;
mod socket;

pub use codec::{
    decode_reply, decode_request, encode_reply, encode_request, DecodeError, DecodeErrorKind,
    FdProblem, FrameError, Header, OP_RECORD_SIZE, REPLY_FIXED,
};
pub use message::*;
pub use socket::{recv_frame, send_bytes, send_frame, Frame, FrameReader, RecvError};

/// The protocol version carried in flags bits 0–1 of every header.
pub const VERSION: u32 = 1;
/// Size of the fixed header: request, flags, size (three little-endian u32).
pub const HEADER_SIZE: usize = 12;
/// Largest payload a peer may send. Fits a 512-entry TCE update (4120 bytes) and a reply with
/// the largest operation batch plus error text.
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// At most this many fds travel with one message (SCM_RIGHTS).
pub const MAX_FDS: usize = 8;
/// Largest number of TCE entries in one INLINE or SHARED update (H_PUT_TCE_INDIRECT's limit).
pub const MAX_INLINE_TCES: u32 = 512;
/// Largest number of owner operations in one reply, and so of results in one OPS_RESULT.
pub const MAX_OPS: usize = 512;
/// Longest error text in a reply, in bytes of UTF-8.
pub const MAX_TEXT: usize = 1024;

/// Header flags: bits 0–1 carry the version.
pub const FLAG_VERSION_MASK: u32 = 0x3;
/// Header flags: set on every reply, clear on every request.
pub const FLAG_REPLY: u32 = 1 << 2;

/// Feature bit: accelerated ownership (the front-end's mm owns the container).
pub const FEATURE_MODE_ACCELERATED: u64 = 1 << 0;
/// Feature bit: isolated ownership (the sidecar's mm owns the container).
pub const FEATURE_MODE_ISOLATED: u64 = 1 << 1;
/// Feature bit: EEH operations are available on this host.
pub const FEATURE_EEH: u64 = 1 << 2;
/// Feature bit: GROUP_ADOPT and WINDOW_ADOPT rebuild an accelerated session after the back-end
/// restarted.
pub const FEATURE_REBUILD: u64 = 1 << 3;
/// Feature bit: requests carry only the fds the negotiated mode uses ([`FdRule`]).
pub const FEATURE_FDS_BY_MODE: u64 = 1 << 4;
/// Every feature bit version 1 defines.
pub const FEATURES_KNOWN: u64 = FEATURE_MODE_ACCELERATED
    | FEATURE_MODE_ISOLATED
    | FEATURE_EEH
    | FEATURE_REBUILD
    | FEATURE_FDS_BY_MODE;
