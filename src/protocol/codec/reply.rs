//! Reply payloads and the typed reply bodies.

use super::ops::{decode_op, encode_op, OP_RECORD_SIZE};
use super::{DecodeError, DecodeErrorKind, Header, Reader, Writer};
use crate::protocol::message::*;
use crate::protocol::{MAX_OPS, MAX_PAYLOAD, MAX_TEXT};

/// Size of the fixed part of a reply payload.
pub const REPLY_FIXED: usize = 24;
const REPLY_FLAG_OPS: u32 = 1;
const REPLY_FLAG_ROLLBACK: u32 = 2;

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
    // The request's body comes with its final reply (§3).
    if has_ops && body_len != 0 {
        return fail(DecodeErrorKind::Invalid {
            field: "body_len",
            value: body_len as u64,
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
