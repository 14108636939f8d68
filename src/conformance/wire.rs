//! The protocol's wire format as `protocol/PROTOCOL.md` writes it, by hand: the kit builds and
//! reads every frame field by field, with no use of the crate's codec, so that a mistake shared
//! by the codec and the daemon cannot pass its checks.
//!
//! Both directions are here: the requests a front-end sends and the replies it reads (for
//! `backend`), and the requests a back-end reads and the replies it sends (for `frontend`).
//! Every reader is bounded by a deadline and reports a broken rule as an error, never a panic.

use std::io::{ErrorKind, IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

// Request codes (§7.12).
pub const GET_FEATURES: u32 = 1;
pub const SET_FEATURES: u32 = 2;
pub const GET_STATUS: u32 = 3;
pub const MEM_ADD: u32 = 4;
pub const MEM_REMOVE: u32 = 5;
pub const GROUP_ADD: u32 = 6;
pub const GROUP_REMOVE: u32 = 7;
pub const TABLE_ADD: u32 = 8;
pub const TABLE_REMOVE: u32 = 9;
pub const WINDOW_QUERY: u32 = 10;
pub const WINDOW_CREATE: u32 = 11;
pub const WINDOW_REMOVE: u32 = 12;
pub const WINDOW_RESET: u32 = 13;
pub const TCE_UPDATE: u32 = 14;
pub const EEH_OP: u32 = 15;
pub const OPS_RESULT: u32 = 16;
pub const GROUP_ADOPT: u32 = 17;
pub const WINDOW_ADOPT: u32 = 18;

/// The name of a request code, for messages.
pub fn request_name(code: u32) -> String {
    const NAMES: [&str; 18] = [
        "GET_FEATURES",
        "SET_FEATURES",
        "GET_STATUS",
        "MEM_ADD",
        "MEM_REMOVE",
        "GROUP_ADD",
        "GROUP_REMOVE",
        "TABLE_ADD",
        "TABLE_REMOVE",
        "WINDOW_QUERY",
        "WINDOW_CREATE",
        "WINDOW_REMOVE",
        "WINDOW_RESET",
        "TCE_UPDATE",
        "EEH_OP",
        "OPS_RESULT",
        "GROUP_ADOPT",
        "WINDOW_ADOPT",
    ];
    match code.checked_sub(1).and_then(|i| NAMES.get(i as usize)) {
        Some(name) => (*name).to_owned(),
        None => format!("request {code}"),
    }
}

// Header (§2).
pub const HEADER_SIZE: usize = 12;
pub const VERSION_1: u32 = 1;
pub const VERSION_MASK: u32 = 3;
pub const FLAG_REPLY: u32 = 1 << 2;
pub const MAX_PAYLOAD: u32 = 65536;
pub const MAX_FDS: usize = 8;

// Reply (§3).
pub const REPLY_FIXED: usize = 24;
pub const REPLY_OPS: u32 = 1;
pub const REPLY_ROLLBACK: u32 = 2;
pub const MAX_OPS: usize = 512;
pub const MAX_TEXT: usize = 1024;
pub const OP_SIZE: usize = 40;

// Feature bits (§4.1).
pub const MODE_ACCELERATED: u64 = 1;
pub const MODE_ISOLATED: u64 = 2;
pub const FEATURE_EEH: u64 = 4;
pub const FEATURE_REBUILD: u64 = 8;
pub const FEATURE_FDS_BY_MODE: u64 = 16;
pub const FEATURES_DEFINED: u64 = 0x1f;

// Owner operation kinds (§6.1).
pub const CONTAINER_OPEN: u16 = 1;
pub const CONTAINER_CLOSE: u16 = 2;
pub const CHECK_EXTENSION: u16 = 3;
pub const SET_IOMMU: u16 = 4;
pub const GROUP_SET_CONTAINER: u16 = 5;
pub const GROUP_UNSET_CONTAINER: u16 = 6;
pub const TCE_GET_INFO: u16 = 7;
pub const REGISTER_MEMORY: u16 = 8;
pub const UNREGISTER_MEMORY: u16 = 9;
pub const TCE_CREATE: u16 = 10;
pub const TCE_REMOVE: u16 = 11;
pub const MAP_DMA: u16 = 12;
pub const UNMAP_DMA: u16 = 13;
pub const EEH_PE_OP: u16 = 14;
pub const KVM_FILE_ADD: u16 = 15;
pub const KVM_FILE_DEL: u16 = 16;
pub const KVM_SET_SPAPR_TCE: u16 = 17;
pub const KVM_HAS_DEVICE_ATTR: u16 = 18;

/// The name of an operation kind, for messages.
pub fn op_name(kind: u16) -> String {
    const NAMES: [&str; 18] = [
        "CONTAINER_OPEN",
        "CONTAINER_CLOSE",
        "CHECK_EXTENSION",
        "SET_IOMMU",
        "GROUP_SET_CONTAINER",
        "GROUP_UNSET_CONTAINER",
        "TCE_GET_INFO",
        "REGISTER_MEMORY",
        "UNREGISTER_MEMORY",
        "TCE_CREATE",
        "TCE_REMOVE",
        "MAP_DMA",
        "UNMAP_DMA",
        "EEH_PE_OP",
        "KVM_FILE_ADD",
        "KVM_FILE_DEL",
        "KVM_SET_SPAPR_TCE",
        "KVM_HAS_DEVICE_ATTR",
    ];
    match kind.checked_sub(1).and_then(|i| NAMES.get(usize::from(i))) {
        Some(name) => (*name).to_owned(),
        None => format!("kind {kind}"),
    }
}

// Errnos, as Linux numbers them (the protocol carries Linux's numbers on every host).
pub const EPERM: i32 = 1;
pub const ENOENT: i32 = 2;
pub const EIO: i32 = 5;
pub const ENXIO: i32 = 6;
pub const EBADF: i32 = 9;
pub const EAGAIN: i32 = 11;
pub const EACCES: i32 = 13;
pub const EBUSY: i32 = 16;
pub const EEXIST: i32 = 17;
pub const EINVAL: i32 = 22;
pub const ENOSPC: i32 = 28;
pub const ENOSYS: i32 = 38;
pub const EPROTO: i32 = 71;
pub const ENOTSUP: i32 = 95;
pub const EALREADY: i32 = 114;

/// `-EINVAL`-style name of a reply status, for messages.
pub fn status_name(status: i32) -> String {
    let name = match -status {
        0 => return "0".to_owned(),
        EPERM => "EPERM",
        ENOENT => "ENOENT",
        EIO => "EIO",
        ENXIO => "ENXIO",
        EBADF => "EBADF",
        EAGAIN => "EAGAIN",
        EACCES => "EACCES",
        EBUSY => "EBUSY",
        EEXIST => "EEXIST",
        EINVAL => "EINVAL",
        ENOSPC => "ENOSPC",
        ENOSYS => "ENOSYS",
        EPROTO => "EPROTO",
        ENOTSUP => "ENOTSUP",
        EALREADY => "EALREADY",
        _ => return format!("{status}"),
    };
    format!("-{name}")
}

/// A payload, field by field, little-endian.
#[derive(Clone, Debug, Default)]
pub struct Le(pub Vec<u8>);

impl Le {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn u16(mut self, v: u16) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn i32(mut self, v: i32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn i64(mut self, v: i64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn raw(mut self, bytes: &[u8]) -> Self {
        self.0.extend_from_slice(bytes);
        self
    }
    pub fn bytes(self) -> Vec<u8> {
        self.0
    }
}

/// Little-endian reads at a byte offset; `None` past the end.
pub fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
pub fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
pub fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// A frame: the 12-byte header (request, flags, size) and the payload.
pub fn frame(code: u32, flags: u32, payload: &[u8]) -> Vec<u8> {
    Le::new()
        .u32(code)
        .u32(flags)
        .u32(payload.len() as u32)
        .raw(payload)
        .bytes()
}

/// A request frame of version 1.
pub fn request(code: u32, payload: &[u8]) -> Vec<u8> {
    frame(code, VERSION_1, payload)
}

/// An owner operation record (§6.1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Op {
    pub kind: u16,
    pub flags: u16,
    pub container: u32,
    pub object: u32,
    pub aux: u32,
    pub args: [u64; 3],
}

impl Op {
    pub fn parse(record: &[u8]) -> Self {
        let at = |i| u64_at(record, i).unwrap_or(0);
        Self {
            kind: u16_at(record, 0).unwrap_or(0),
            flags: u16_at(record, 2).unwrap_or(0),
            container: u32_at(record, 4).unwrap_or(0),
            object: u32_at(record, 8).unwrap_or(0),
            aux: u32_at(record, 12).unwrap_or(0),
            args: [at(16), at(24), at(32)],
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        Le::new()
            .u16(self.kind)
            .u16(self.flags)
            .u32(self.container)
            .u32(self.object)
            .u32(self.aux)
            .u64(self.args[0])
            .u64(self.args[1])
            .u64(self.args[2])
            .bytes()
    }
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (container {}, object {}, aux {}, args {:#x} {:#x} {:#x})",
            op_name(self.kind),
            self.container,
            self.object,
            self.aux,
            self.args[0],
            self.args[1],
            self.args[2]
        )
    }
}

/// A result record (§6.2).
pub fn result_record(kind: u16, status: i32, out: [u64; 4]) -> Vec<u8> {
    Le::new()
        .u16(kind)
        .u16(0)
        .i32(status)
        .u64(out[0])
        .u64(out[1])
        .u64(out[2])
        .u64(out[3])
        .bytes()
}

/// An `OPS_RESULT` payload (§7.10) from result records.
pub fn ops_result(transaction: u32, records: &[Vec<u8>]) -> Vec<u8> {
    let mut payload = Le::new().u32(transaction).u32(records.len() as u32);
    for record in records {
        payload = payload.raw(record);
    }
    payload.bytes()
}

/// The fields of a reply (§3), in the order they are encoded.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reply {
    pub code: u32,
    pub status: i32,
    pub flags: u32,
    pub transaction: u32,
    pub ops: Vec<Op>,
    pub body: Vec<u8>,
    pub text: String,
}

impl Reply {
    /// Parses a reply frame and checks it against every rule of §2 and §3.
    pub fn parse(header: &[u8; HEADER_SIZE], payload: &[u8]) -> Result<Self, String> {
        let code = u32_at(header, 0).unwrap_or(0);
        let flags = u32_at(header, 4).unwrap_or(0);
        if flags != VERSION_1 | FLAG_REPLY {
            return Err(format!(
                "reply header flags {flags:#x}, not {:#x}",
                VERSION_1 | FLAG_REPLY
            ));
        }
        if payload.len() < REPLY_FIXED {
            return Err(format!(
                "a reply of {} bytes, shorter than its 24-byte fixed part",
                payload.len()
            ));
        }
        let word = |at| u32_at(payload, at).unwrap_or(0);
        let status = word(0) as i32;
        let reply_flags = word(4);
        let transaction = word(8);
        let op_count = usize::from(u16_at(payload, 12).unwrap_or(0));
        let text_len = usize::from(u16_at(payload, 14).unwrap_or(0));
        let body_len = word(16) as usize;
        let expected = REPLY_FIXED + OP_SIZE * op_count + body_len + text_len;
        let has_ops = reply_flags & REPLY_OPS != 0;
        let broken = if word(20) != 0 {
            Some("its reserved word is not 0".to_owned())
        } else if payload.len() != expected {
            Some(format!(
                "size {} is not 24 + 40 × {op_count} + {body_len} + {text_len}",
                payload.len()
            ))
        } else if reply_flags & !(REPLY_OPS | REPLY_ROLLBACK) != 0 {
            Some(format!("undefined reply flags {reply_flags:#x}"))
        } else if has_ops != (transaction != 0) {
            Some("transaction is not nonzero exactly with OPS".to_owned())
        } else if has_ops != (op_count != 0) {
            Some("op_count is not nonzero exactly with OPS".to_owned())
        } else if has_ops && body_len != 0 {
            Some(format!("a body of {body_len} bytes with OPS"))
        } else if reply_flags & REPLY_ROLLBACK != 0 && !has_ops {
            Some("ROLLBACK without OPS".to_owned())
        } else if status > 0 {
            Some(format!("status {status} is positive"))
        } else if has_ops && status != 0 {
            Some(format!("status {status} while operations are pending"))
        } else if op_count > MAX_OPS || text_len > MAX_TEXT {
            Some(format!(
                "{op_count} operations, {text_len} bytes of text: beyond 512, 1024"
            ))
        } else {
            None
        };
        if let Some(rule) = broken {
            return Err(format!("reply to {}: {rule}", request_name(code)));
        }
        let ops = payload[REPLY_FIXED..REPLY_FIXED + OP_SIZE * op_count]
            .chunks(OP_SIZE)
            .map(Op::parse)
            .collect();
        let body_at = REPLY_FIXED + OP_SIZE * op_count;
        let body = payload[body_at..body_at + body_len].to_vec();
        let text = String::from_utf8(payload[body_at + body_len..].to_vec())
            .map_err(|_| format!("reply to {}: its text is not UTF-8", request_name(code)))?;
        if status < 0 && text.is_empty() {
            return Err(format!(
                "reply to {}: status {} without a text",
                request_name(code),
                status_name(status)
            ));
        }
        Ok(Self {
            code,
            status,
            flags: reply_flags,
            transaction,
            ops,
            body,
            text,
        })
    }

    /// The reply as a frame, for a back-end (or a test double) to send.
    pub fn encode(&self) -> Vec<u8> {
        let mut payload = Le::new()
            .i32(self.status)
            .u32(self.flags)
            .u32(self.transaction)
            .u16(self.ops.len() as u16)
            .u16(self.text.len() as u16)
            .u32(self.body.len() as u32)
            .u32(0);
        for op in &self.ops {
            payload = payload.raw(&op.encode());
        }
        let payload = payload.raw(&self.body).raw(self.text.as_bytes()).bytes();
        frame(self.code, VERSION_1 | FLAG_REPLY, &payload)
    }

    /// The reply, if it is a final success.
    pub fn ok(self) -> Result<Self, String> {
        if self.status != 0 || self.flags != 0 {
            return Err(format!(
                "{} answered {}{}: {:?}",
                request_name(self.code),
                status_name(self.status),
                if self.flags & REPLY_OPS != 0 {
                    " with operations"
                } else {
                    ""
                },
                self.text
            ));
        }
        Ok(self)
    }

    /// The reply, if it is a final error with `-errno`.
    pub fn error(self, errno: i32) -> Result<Self, String> {
        if self.status != -errno || self.flags != 0 {
            return Err(format!(
                "{} answered {}{} ({:?}); the spec says {}",
                request_name(self.code),
                status_name(self.status),
                if self.flags & REPLY_OPS != 0 {
                    " with operations"
                } else {
                    ""
                },
                self.text,
                status_name(-errno)
            ));
        }
        Ok(self)
    }

    pub fn body_u32(&self, at: usize) -> Result<u32, String> {
        u32_at(&self.body, at).ok_or_else(|| self.short_body(at + 4))
    }
    pub fn body_u64(&self, at: usize) -> Result<u64, String> {
        u64_at(&self.body, at).ok_or_else(|| self.short_body(at + 8))
    }
    fn short_body(&self, needed: usize) -> String {
        format!(
            "the reply to {} has a body of {} bytes; {needed} needed",
            request_name(self.code),
            self.body.len()
        )
    }
}

/// A frame as read off a socket, with the fds that came with it.
#[derive(Debug)]
pub struct Frame {
    pub header: [u8; HEADER_SIZE],
    pub payload: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

impl Frame {
    pub fn code(&self) -> u32 {
        u32_at(&self.header, 0).unwrap_or(0)
    }
    pub fn flags(&self) -> u32 {
        u32_at(&self.header, 4).unwrap_or(0)
    }
}

/// What a read found instead of a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadEnd {
    /// The peer closed the connection (or reset it) before the first byte of a frame.
    Closed,
    /// The peer closed it inside a frame.
    ClosedInside,
    /// Nothing, or not all of the frame, came before the deadline.
    Timeout,
    /// A header `size` beyond 65536.
    TooLarge(u32),
    Io(String),
}

impl std::fmt::Display for ReadEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Closed => write!(f, "the connection was closed"),
            Self::ClosedInside => write!(f, "the connection was closed inside a frame"),
            Self::Timeout => write!(f, "nothing came before the deadline"),
            Self::TooLarge(size) => write!(f, "a frame of {size} bytes, beyond 65536"),
            Self::Io(e) => write!(f, "{e}"),
        }
    }
}

/// One end of a protocol connection, every read and write bounded by `deadline`.
pub struct Conn {
    pub stream: UnixStream,
    pub deadline: Duration,
}

impl Conn {
    pub fn connect(path: &Path, deadline: Duration) -> Result<Self, String> {
        let stream = UnixStream::connect(path)
            .map_err(|e| format!("cannot connect to {}: {e}", path.display()))?;
        Self::new(stream, deadline)
    }

    pub fn new(stream: UnixStream, deadline: Duration) -> Result<Self, String> {
        stream
            .set_write_timeout(Some(deadline))
            .map_err(|e| e.to_string())?;
        Ok(Self { stream, deadline })
    }

    /// Writes `bytes`, with `fds` attached to the first byte (§2.1).
    pub fn send_fds(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), String> {
        let mut sent = 0;
        if !fds.is_empty() {
            let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(16))];
            let mut control = SendAncillaryBuffer::new(&mut space);
            if !control.push(SendAncillaryMessage::ScmRights(fds)) {
                return Err(format!("cannot attach {} fds", fds.len()));
            }
            sent = sendmsg(
                &self.stream,
                &[IoSlice::new(bytes)],
                &mut control,
                SendFlags::NOSIGNAL,
            )
            .map_err(|e| format!("sendmsg: {e}"))?;
        }
        (&self.stream)
            .write_all(&bytes[sent..])
            .map_err(|e| format!("send: {e}"))
    }

    pub fn send(&self, bytes: &[u8]) -> Result<(), String> {
        self.send_fds(bytes, &[])
    }

    /// Reads exactly `buf.len()` bytes by `until`, keeping the fds that arrive with them.
    fn read_exact_until(
        &self,
        buf: &mut [u8],
        until: Instant,
        fds: &mut Vec<OwnedFd>,
    ) -> Result<(), ReadEnd> {
        let mut filled = 0;
        while filled < buf.len() {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ReadEnd::Timeout);
            }
            self.stream
                .set_read_timeout(Some(left))
                .map_err(|e| ReadEnd::Io(e.to_string()))?;
            let mut space =
                vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS + 8))];
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let received = recvmsg(
                &self.stream,
                &mut [IoSliceMut::new(&mut buf[filled..])],
                &mut control,
                RecvFlags::CMSG_CLOEXEC,
            );
            for message in control.drain() {
                if let RecvAncillaryMessage::ScmRights(received) = message {
                    fds.extend(received);
                }
            }
            match received {
                Ok(msg) if msg.bytes == 0 => {
                    return Err(if filled == 0 {
                        ReadEnd::Closed
                    } else {
                        ReadEnd::ClosedInside
                    })
                }
                Ok(msg) => filled += msg.bytes,
                Err(e) if e == rustix::io::Errno::INTR => {}
                Err(e) if e == rustix::io::Errno::AGAIN => return Err(ReadEnd::Timeout),
                Err(e) if e == rustix::io::Errno::CONNRESET => {
                    return Err(if filled == 0 {
                        ReadEnd::Closed
                    } else {
                        ReadEnd::ClosedInside
                    })
                }
                Err(e) => return Err(ReadEnd::Io(e.to_string())),
            }
        }
        Ok(())
    }

    /// Reads one frame within `within`: its header, then `size` bytes of payload.
    pub fn read_frame(&self, within: Duration) -> Result<Frame, ReadEnd> {
        let until = Instant::now() + within;
        let mut fds = Vec::new();
        let mut header = [0u8; HEADER_SIZE];
        self.read_exact_until(&mut header, until, &mut fds)?;
        let size = u32_at(&header, 8).unwrap_or(0);
        if size > MAX_PAYLOAD {
            return Err(ReadEnd::TooLarge(size));
        }
        let mut payload = vec![0u8; size as usize];
        self.read_exact_until(&mut payload, until, &mut fds)
            .map_err(|end| match end {
                ReadEnd::Closed => ReadEnd::ClosedInside,
                other => other,
            })?;
        Ok(Frame {
            header,
            payload,
            fds,
        })
    }

    /// Reads and checks the next reply (§3), within the deadline.
    pub fn reply(&self) -> Result<Reply, String> {
        let frame = self
            .read_frame(self.deadline)
            .map_err(|end| format!("no reply: {end}"))?;
        if !frame.fds.is_empty() {
            return Err(format!(
                "a reply carried {} fds; replies carry none",
                frame.fds.len()
            ));
        }
        Reply::parse(&frame.header, &frame.payload)
    }

    /// Sends a request and reads its reply, which must carry the request's code.
    pub fn call_fds(
        &self,
        code: u32,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<Reply, String> {
        self.send_fds(&request(code, payload), fds)?;
        let reply = self.reply()?;
        if reply.code != code {
            return Err(format!(
                "the reply to {} carries the code of {}",
                request_name(code),
                request_name(reply.code)
            ));
        }
        Ok(reply)
    }

    pub fn call(&self, code: u32, payload: &[u8]) -> Result<Reply, String> {
        self.call_fds(code, payload, &[])
    }

    /// The peer closes the connection within the deadline, without sending a byte.
    pub fn closed_without_reply(&self) -> Result<(), String> {
        self.stream
            .set_read_timeout(Some(self.deadline))
            .map_err(|e| e.to_string())?;
        let mut buf = [0u8; 64];
        match (&self.stream).read(&mut buf) {
            Ok(0) => Ok(()),
            // A reset is a close too (the peer may close with bytes of ours unread).
            Err(e) if e.kind() == ErrorKind::ConnectionReset => Ok(()),
            Ok(n) => Err(format!(
                "{n} bytes arrived; the connection should have been closed without a reply"
            )),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                Err(format!(
                "the connection stayed open for {} ms without a reply; it should have been closed",
                self.deadline.as_millis()
            ))
            }
            Err(e) => Err(format!("reading: {e}")),
        }
    }
}
