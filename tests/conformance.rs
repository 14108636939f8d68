//! Socket-level conformance of `tce-sidecar --kernel model` to `protocol/PROTOCOL.md`.
//!
//! The client here is written from the spec, not from the crate: every frame it sends is built
//! by hand with `to_le_bytes` and written with `UnixStream::write_all` (fds with a direct
//! `rustix::net::sendmsg`), and every reply is parsed by hand and checked against the rules of
//! spec §3. Owner operations are executed on the model kernel through the crate's model
//! backend, which is kernel work, not wire work.

mod common;

use std::io::{ErrorKind, IoSlice, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::{open_fds, wait_until, Sidecar, IO_TIMEOUT};
use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
use tce_sidecar::client::model_vm::ModelVm;
use tce_sidecar::kernel::model::Mm;
use tce_sidecar::kernel::model_backend::ModelBackend;
use tce_sidecar::kernel::{
    ContainerId, GroupId, Kernel, KernelOp, Mapping, ObjectTable, Output, RegionId, TableId,
};

// Request codes (§7.11).
const GET_FEATURES: u32 = 1;
const SET_FEATURES: u32 = 2;
const GET_STATUS: u32 = 3;
const MEM_ADD: u32 = 4;
const MEM_REMOVE: u32 = 5;
const GROUP_ADD: u32 = 6;
const GROUP_REMOVE: u32 = 7;
const TABLE_ADD: u32 = 8;
const TABLE_REMOVE: u32 = 9;
const WINDOW_QUERY: u32 = 10;
const WINDOW_CREATE: u32 = 11;
const WINDOW_REMOVE: u32 = 12;
const WINDOW_RESET: u32 = 13;
const TCE_UPDATE: u32 = 14;
const EEH_OP: u32 = 15;
const OPS_RESULT: u32 = 16;

// Header flags (§2).
const V1: u32 = 1;
const REPLY: u32 = 1 << 2;
const MAX_PAYLOAD: u32 = 65536;

// Reply flags (§3).
const OPS: u32 = 1;
const ROLLBACK: u32 = 2;

// Feature bits (§4.1).
const ACCELERATED: u64 = 1;
const ISOLATED: u64 = 2;
const EEH: u64 = 4;
const REBUILD: u64 = 8;
const FDS_BY_MODE: u64 = 16;

// Operation kinds (§6.1).
const CONTAINER_OPEN: u16 = 1;
const SET_IOMMU: u16 = 4;
const GROUP_SET_CONTAINER: u16 = 5;
const TCE_GET_INFO: u16 = 7;
const REGISTER_MEMORY: u16 = 8;
const TCE_CREATE: u16 = 10;
const TCE_REMOVE: u16 = 11;
const KVM_FILE_ADD: u16 = 15;
const KVM_FILE_DEL: u16 = 16;
const KVM_SET_SPAPR_TCE: u16 = 17;

// Errnos, as Linux numbers them.
const EBADF: i32 = 9;
const ENOENT: i32 = 2;
const EPERM: i32 = 1;
const EBUSY: i32 = 16;
const EINVAL: i32 = 22;
const ENOSYS: i32 = 38;
const EPROTO: i32 = 71;
const ENOTSUP: i32 = 95;
const EALREADY: i32 = 114;

const H_PARAMETER: i64 = -4;
const RAM: u64 = 1 << 20;
const ENTRIES: u64 = 64;
const LIOBN: u32 = 0x8000_0001;

/// A payload, field by field, little-endian.
#[derive(Default)]
struct Le(Vec<u8>);

impl Le {
    fn u16(mut self, v: u16) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn i32(mut self, v: i32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bytes(self) -> Vec<u8> {
        self.0
    }
}

/// A frame: the 12-byte header (request, flags, size) and the payload.
fn frame(code: u32, flags: u32, payload: &[u8]) -> Vec<u8> {
    let mut bytes = Le::default()
        .u32(code)
        .u32(flags)
        .u32(payload.len() as u32)
        .bytes();
    bytes.extend_from_slice(payload);
    bytes
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
}
fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// An owner operation record (§6.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Op {
    kind: u16,
    flags: u16,
    container: u32,
    object: u32,
    aux: u32,
    args: [u64; 3],
}

/// A reply, parsed by hand and checked against every rule of §3 on the way.
#[derive(Debug)]
struct RawReply {
    code: u32,
    status: i32,
    flags: u32,
    transaction: u32,
    ops: Vec<Op>,
    body: Vec<u8>,
    text: String,
}

impl RawReply {
    fn parse(header: [u8; 12], payload: Vec<u8>) -> Self {
        let code = le_u32(&header, 0);
        assert_eq!(le_u32(&header, 4), V1 | REPLY, "reply header flags");
        assert_eq!(le_u32(&header, 8) as usize, payload.len());
        assert!(payload.len() >= 24, "a reply has its 24-byte fixed part");
        let status = le_u32(&payload, 0) as i32;
        let flags = le_u32(&payload, 4);
        let transaction = le_u32(&payload, 8);
        let op_count = usize::from(le_u16(&payload, 12));
        let text_len = usize::from(le_u16(&payload, 14));
        let body_len = le_u32(&payload, 16) as usize;
        assert_eq!(le_u32(&payload, 20), 0, "reserved word of the reply");
        assert_eq!(
            payload.len(),
            24 + 40 * op_count + body_len + text_len,
            "size = 24 + 40 × op_count + body_len + text_len"
        );
        assert_eq!(flags & !(OPS | ROLLBACK), 0, "undefined reply flags");
        let has_ops = flags & OPS != 0;
        assert_eq!(
            has_ops,
            transaction != 0,
            "transaction nonzero exactly with OPS"
        );
        assert_eq!(has_ops, op_count != 0, "op_count nonzero exactly with OPS");
        assert!(flags & ROLLBACK == 0 || has_ops, "ROLLBACK requires OPS");
        assert!(status <= 0, "status is 0 or a negative errno");
        assert!(
            !has_ops || status == 0,
            "status is 0 while operations are pending"
        );
        assert!(op_count <= 512 && text_len <= 1024);
        let ops = payload[24..24 + 40 * op_count]
            .chunks(40)
            .map(|r| Op {
                kind: le_u16(r, 0),
                flags: le_u16(r, 2),
                container: le_u32(r, 4),
                object: le_u32(r, 8),
                aux: le_u32(r, 12),
                args: [le_u64(r, 16), le_u64(r, 24), le_u64(r, 32)],
            })
            .collect();
        let body_at = 24 + 40 * op_count;
        let body = payload[body_at..body_at + body_len].to_vec();
        let text = String::from_utf8(payload[body_at + body_len..].to_vec()).expect("UTF-8 text");
        assert!(status == 0 || !text.is_empty(), "an error reply has text");
        Self {
            code,
            status,
            flags,
            transaction,
            ops,
            body,
            text,
        }
    }

    fn ok(self) -> Self {
        assert_eq!((self.status, self.flags), (0, 0), "{}", self.text);
        self
    }

    fn error(&self, errno: i32) {
        assert_eq!(
            self.status, -errno,
            "request {}: {:?}",
            self.code, self.text
        );
        assert_eq!(self.flags, 0);
    }
}

/// A raw connection to the daemon.
struct Conn(UnixStream);

impl Conn {
    fn open(sidecar: &Sidecar) -> Self {
        Self(sidecar.connect())
    }

    fn send(&self, bytes: &[u8]) {
        (&self.0).write_all(bytes).expect("send");
    }

    /// Sends `bytes` with `fds` attached to the first byte, as §2.1 asks.
    fn send_fds(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) {
        let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(16))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        assert!(control.push(SendAncillaryMessage::ScmRights(fds)));
        let sent = sendmsg(
            &self.0,
            &[IoSlice::new(bytes)],
            &mut control,
            SendFlags::NOSIGNAL,
        )
        .expect("sendmsg");
        self.send(&bytes[sent..]);
    }

    fn reply(&self) -> RawReply {
        let mut header = [0u8; 12];
        (&self.0).read_exact(&mut header).expect("a reply header");
        let size = le_u32(&header, 8);
        assert!(size <= MAX_PAYLOAD);
        let mut payload = vec![0u8; size as usize];
        (&self.0).read_exact(&mut payload).expect("a reply payload");
        RawReply::parse(header, payload)
    }

    fn call(&self, code: u32, payload: &[u8]) -> RawReply {
        self.send(&frame(code, V1, payload));
        let reply = self.reply();
        assert_eq!(reply.code, code, "a reply carries the request's code");
        reply
    }

    fn call_fds(&self, code: u32, payload: &[u8], fds: &[BorrowedFd<'_>]) -> RawReply {
        self.send_fds(&frame(code, V1, payload), fds);
        let reply = self.reply();
        assert_eq!(reply.code, code);
        reply
    }

    fn handshake(&self, features: u64) {
        let reply = self.call(SET_FEATURES, &Le::default().u64(features).bytes());
        assert_eq!(reply.ok().body, features.to_le_bytes());
    }

    fn status(&self) -> serde_json::Value {
        let reply = self
            .call(GET_STATUS, &Le::default().u32(0).u32(0).bytes())
            .ok();
        serde_json::from_slice(&reply.body).expect("GET_STATUS is JSON")
    }

    /// The daemon closed the connection without sending anything.
    fn assert_closed_without_reply(&self, what: &str) {
        let mut buf = [0u8; 64];
        match (&self.0).read(&mut buf) {
            Ok(0) => {}
            // A reset is a close too (the daemon may close with our bytes unread).
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            Ok(n) => panic!("{what}: {n} bytes arrived; expected the connection closed"),
            Err(e) => panic!("{what}: the connection stayed open: {e}"),
        }
    }
}

fn memfd(size: u64) -> OwnedFd {
    tce_sidecar::kernel::shared_memory::sealed_memfd("conformance", size).unwrap()
}

fn group_add(group: u32, container: u32, iommu_group: u32) -> Vec<u8> {
    Le::default()
        .u32(group)
        .u32(container)
        .u32(iommu_group)
        .u32(0)
        .bytes()
}

/// EEH_OP on container 0 (no error injection).
fn eeh(op: u32) -> Vec<u8> {
    Le::default()
        .u32(0)
        .u32(op)
        .u32(0)
        .u32(0)
        .u64(0)
        .u64(0)
        .bytes()
}

fn id(v: u32) -> Vec<u8> {
    Le::default().u32(v).u32(0).bytes()
}

/// Sessions the daemon lists, across every page of GET_STATUS.
fn all_sessions(conn: &Conn) -> Vec<serde_json::Value> {
    let mut first = 0u32;
    let mut all = Vec::new();
    loop {
        let reply = conn
            .call(GET_STATUS, &Le::default().u32(first).u32(0).bytes())
            .ok();
        let page: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        all.extend(page["sessions"].as_array().cloned().unwrap_or_default());
        match page["next_session"].as_u64() {
            Some(next) => {
                assert!(next > u64::from(first));
                first = next as u32;
            }
            None => return all,
        }
    }
}

#[test]
fn handshake_features_negotiated_once_with_each_mismatch_refused() {
    let sidecar = Sidecar::start("c-handshake", &[]);
    let conn = Conn::open(&sidecar);
    let reply = conn.call(GET_FEATURES, &[]).ok();
    assert_eq!(
        reply.body,
        (ACCELERATED | ISOLATED | EEH | REBUILD | FDS_BY_MODE).to_le_bytes()
    );
    // A bit the back-end does not offer: -ENOTSUP, the text names it.
    let reply = conn.call(SET_FEATURES, &Le::default().u64(ISOLATED | 1 << 9).bytes());
    reply.error(ENOTSUP);
    assert!(reply.text.contains("0x200"), "{}", reply.text);
    // Two modes, then none: -EINVAL. The session stays unnegotiated.
    conn.call(
        SET_FEATURES,
        &Le::default().u64(ACCELERATED | ISOLATED).bytes(),
    )
    .error(EINVAL);
    conn.call(SET_FEATURES, &Le::default().u64(EEH).bytes())
        .error(EINVAL);
    conn.call(WINDOW_QUERY, &id(0)).error(EPROTO);
    conn.handshake(ACCELERATED | EEH);
    conn.call(SET_FEATURES, &Le::default().u64(ACCELERATED).bytes())
        .error(EALREADY);
    // GET_FEATURES and GET_STATUS stay valid after negotiation.
    assert_eq!(conn.call(GET_FEATURES, &[]).ok().body.len(), 8);
    let status = conn.status();
    let me = &status["sessions"].as_array().unwrap()[0];
    assert_eq!(me["mode"], "accelerated");
    assert_eq!(me["phase"], "ready");
}

#[test]
fn error_classes_each_answered_with_their_errno_and_session_goes_on() {
    let sidecar = Sidecar::start("c-errors", &[]);
    let conn = Conn::open(&sidecar);
    // Unknown request code.
    let reply = conn.call(99, &[]);
    reply.error(ENOSYS);
    assert!(reply.text.contains("99"), "{}", reply.text);
    conn.call(0, &[]).error(ENOSYS);
    // Payload size that does not match the layout.
    conn.call(SET_FEATURES, &Le::default().u32(ISOLATED as u32).bytes())
        .error(EINVAL);
    conn.call(GET_FEATURES, &Le::default().u64(0).bytes())
        .error(EINVAL);
    // A reserved field not zero.
    let reply = conn.call(GET_STATUS, &Le::default().u32(0).u32(1).bytes());
    reply.error(EINVAL);
    // A field outside its valid values (TCE_UPDATE source 7), checked before session state.
    let update = Le::default().u32(1).u32(7).u64(0).u32(1).u32(0).bytes();
    let reply = conn.call(TCE_UPDATE, &update);
    reply.error(EINVAL);
    assert!(reply.text.contains("source"), "{}", reply.text);
    // Requests before SET_FEATURES.
    let reply = conn.call(WINDOW_QUERY, &id(0));
    reply.error(EPROTO);
    assert!(reply.text.contains("before SET_FEATURES"), "{}", reply.text);
    let result = Le::default()
        .u32(1)
        .u32(1)
        .u16(KVM_FILE_ADD)
        .u16(0)
        .i32(0)
        .u64(0)
        .u64(0)
        .u64(0)
        .u64(0)
        .bytes();
    conn.call(OPS_RESULT, &result).error(EPROTO);
    conn.handshake(ISOLATED);
    // OPS_RESULT with no transaction open.
    let reply = conn.call(OPS_RESULT, &result);
    reply.error(EPROTO);
    assert!(reply.text.contains("no transaction"), "{}", reply.text);
    // Valid requests refused by their own rules: unknown ids.
    conn.call(WINDOW_QUERY, &id(5)).error(ENOENT);
    conn.call(TABLE_REMOVE, &id(3)).error(ENOENT);
    conn.call(GROUP_REMOVE, &id(3)).error(ENOENT);
    // Nothing above changed the session.
    let status = conn.status();
    let me = &status["sessions"].as_array().unwrap()[0];
    assert_eq!(
        (&me["mode"], &me["phase"]),
        (&"isolated".into(), &"ready".into())
    );
    assert_eq!(me["groups"].as_array().map(Vec::len), Some(0));
}

#[test]
fn fd_count_errors_ebadf_and_every_fd_closed() {
    let sidecar = Sidecar::start("c-fds", &[]);
    let conn = Conn::open(&sidecar);
    conn.handshake(ISOLATED);
    let worker = common::worker_pid(&conn.0);
    let before = open_fds(worker);
    let fd = memfd(4096);
    let many: Vec<OwnedFd> = (0..9).map(|_| memfd(4096)).collect();
    let borrowed: Vec<BorrowedFd<'_>> = many.iter().map(|f| f.as_fd()).collect();
    let group = group_add(1, 0, 1);
    // The payload size is checked before the fds.
    conn.call(GROUP_ADD, &group[..12]).error(EINVAL);
    // GROUP_ADD carries exactly one fd: none, two; GET_FEATURES carries none.
    let reply = conn.call(GROUP_ADD, &group);
    reply.error(EBADF);
    assert!(reply.text.contains("received 0"), "{}", reply.text);
    conn.call_fds(GROUP_ADD, &group, &borrowed[..2])
        .error(EBADF);
    conn.call_fds(GET_FEATURES, &[], &[fd.as_fd()]).error(EBADF);
    // More than 8 fds.
    let reply = conn.call_fds(GROUP_ADD, &group, &borrowed);
    reply.error(EBADF);
    assert!(reply.text.contains("more than 8"), "{}", reply.text);
    // An fd that arrives in a read in which its message did not begin (§2.1): it rides on the
    // last bytes of a 20,500-byte OPS_RESULT, beyond what the back-end reads (8 KiB) before it
    // knows a message's size. The fd check comes before the session state's.
    let mut results = Le::default().u32(1).u32(512).bytes();
    results.resize(8 + 512 * 40, 0);
    let whole = frame(OPS_RESULT, V1, &results);
    conn.send(&whole[..20_000]);
    conn.send_fds(&whole[20_000..], &[fd.as_fd()]);
    let reply = conn.reply();
    assert_eq!(reply.code, OPS_RESULT);
    reply.error(EBADF);
    assert!(reply.text.contains("with the header"), "{}", reply.text);
    // The fd of a message sent with its header alone, the payload following in a second write,
    // belongs to that message however the back-end's reads fall.
    let region = Le::default()
        .u32(1)
        .u32(0)
        .u64(0)
        .u64(4096)
        .u64(0x10000)
        .u64(0)
        .bytes();
    let whole = frame(MEM_ADD, V1, &region);
    conn.send_fds(&whole[..12], &[fd.as_fd()]);
    conn.send(&whole[12..]);
    assert_eq!(conn.reply().ok().code, MEM_ADD);
    conn.call(MEM_REMOVE, &region).ok();
    // Every fd of the refused messages was closed by the time their replies came.
    assert_eq!(open_fds(worker), before, "the daemon kept no refused fd");
    assert_eq!(conn.call(GET_FEATURES, &[]).ok().body.len(), 8);
}

#[test]
fn broken_frames_connection_closed_without_reply() {
    let sidecar = Sidecar::start("c-broken", &[]);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("version 0", frame(GET_FEATURES, 0, &[])),
        ("version 2", frame(GET_FEATURES, 2, &[])),
        ("version 3", frame(GET_FEATURES, 3, &[])),
        ("reserved flag bit 3", frame(GET_FEATURES, V1 | 1 << 3, &[])),
        (
            "reserved flag bit 31",
            frame(GET_FEATURES, V1 | 1 << 31, &[]),
        ),
        ("REPLY on a request", frame(GET_FEATURES, V1 | REPLY, &[])),
        (
            "size above 65536",
            Le::default()
                .u32(GET_STATUS)
                .u32(V1)
                .u32(MAX_PAYLOAD + 1)
                .bytes(),
        ),
    ];
    for (what, bytes) in cases {
        let conn = Conn::open(&sidecar);
        conn.send(&bytes);
        conn.assert_closed_without_reply(what);
    }
    // A broken frame after a good exchange ends the session as well.
    let conn = Conn::open(&sidecar);
    conn.handshake(ISOLATED);
    conn.send(&frame(GET_FEATURES, 0, &[]));
    conn.assert_closed_without_reply("version 0 after a handshake");
    // End of stream inside a header, and inside a payload.
    let conn = Conn::open(&sidecar);
    conn.send(&frame(SET_FEATURES, V1, &ISOLATED.to_le_bytes())[..6]);
    conn.0.shutdown(std::net::Shutdown::Write).unwrap();
    conn.assert_closed_without_reply("end of stream inside the header");
    let conn = Conn::open(&sidecar);
    conn.send(&frame(SET_FEATURES, V1, &ISOLATED.to_le_bytes())[..15]);
    conn.0.shutdown(std::net::Shutdown::Write).unwrap();
    conn.assert_closed_without_reply("end of stream inside the payload");

    // The daemon serves on, and every broken session is gone.
    let conn = Conn::open(&sidecar);
    wait_until("broken sessions torn down", IO_TIMEOUT, || {
        all_sessions(&conn).len() == 1
    });
    assert_eq!(conn.call(GET_FEATURES, &[]).ok().body.len(), 8);
}

#[test]
fn open_transaction_busy_for_other_requests_until_ops_result() {
    let sidecar = Sidecar::start("c-busy", &[]);
    let conn = Conn::open(&sidecar);
    conn.handshake(ACCELERATED);
    // In accelerated mode GROUP_ADD first asks the front-end to open the container and attach
    // the group. The sidecar does not touch the group fd, so any fd opens the transaction.
    let fd = memfd(4096);
    let reply = conn.call_fds(GROUP_ADD, &group_add(1, 0, 1), &[fd.as_fd()]);
    assert_eq!((reply.status, reply.flags), (0, OPS));
    let transaction = reply.transaction;
    assert_eq!(
        kinds(&reply.ops),
        [CONTAINER_OPEN, GROUP_SET_CONTAINER, SET_IOMMU, TCE_GET_INFO]
    );
    assert_eq!(reply.ops[1].object, 1);

    conn.call(WINDOW_QUERY, &id(0)).error(EBUSY);
    conn.call(SET_FEATURES, &Le::default().u64(ISOLATED).bytes())
        .error(EBUSY);
    let region = Le::default()
        .u32(1)
        .u32(0)
        .u64(0)
        .u64(4096)
        .u64(4096)
        .u64(0)
        .bytes();
    conn.call(MEM_REMOVE, &region).error(EBUSY);
    conn.call(GET_FEATURES, &[]).ok();
    let status = conn.status();
    assert_eq!(status["sessions"][0]["phase"], "transaction");
    let result = |kind: u16, status: i32| {
        Le::default()
            .u16(kind)
            .u16(0)
            .i32(status)
            .u64(0)
            .u64(0)
            .u64(0)
            .u64(0)
            .bytes()
    };
    let ops_result = |transaction: u32, results: &[Vec<u8>]| {
        let mut p = Le::default()
            .u32(transaction)
            .u32(results.len() as u32)
            .bytes();
        results.iter().for_each(|r| p.extend_from_slice(r));
        p
    };
    // Wrong transaction id, wrong shape (two results, both successes, for four ops), wrong
    // kind: -EINVAL, and the transaction stays open.
    conn.call(
        OPS_RESULT,
        &ops_result(transaction + 1, &[result(CONTAINER_OPEN, 0)]),
    )
    .error(EINVAL);
    let two = [result(CONTAINER_OPEN, 0), result(GROUP_SET_CONTAINER, 0)];
    conn.call(OPS_RESULT, &ops_result(transaction, &two))
        .error(EINVAL);
    conn.call(
        OPS_RESULT,
        &ops_result(transaction, &[result(KVM_FILE_DEL, 0)]),
    )
    .error(EINVAL);
    conn.call(WINDOW_QUERY, &id(0)).error(EBUSY);
    // The front-end refuses the operation: nothing to undo, the request fails with its errno.
    let reply = conn.call(
        OPS_RESULT,
        &ops_result(transaction, &[result(CONTAINER_OPEN, -EPERM)]),
    );
    reply.error(EPERM);
    assert!(reply.text.contains("CONTAINER_OPEN"), "{}", reply.text);
    // Ready again, with nothing registered.
    conn.call(WINDOW_QUERY, &id(0)).error(ENOENT);
    conn.call(
        OPS_RESULT,
        &ops_result(transaction, &[result(CONTAINER_OPEN, 0)]),
    )
    .error(EPROTO);
    assert_eq!(
        conn.status()["sessions"][0]["groups"],
        serde_json::json!([])
    );
}

#[test]
fn client_that_stops_reading_does_not_stall_others() {
    let sidecar = Sidecar::start("c-stalled", &[]);
    let stalled = Conn::open(&sidecar);
    stalled.handshake(ISOLATED);
    // Pipelined requests, never read: the daemon's replies fill the socket, its session
    // thread blocks sending, and then our own sends block.
    stalled.0.set_nonblocking(true).unwrap();
    let burst: Vec<u8> = (0..1024)
        .flat_map(|_| frame(GET_FEATURES, V1, &[]))
        .collect();
    let mut blocked = false;
    for _ in 0..10_000 {
        match (&stalled.0).write(&burst) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                blocked = true;
                break;
            }
            Err(e) => panic!("send: {e}"),
        }
    }
    assert!(blocked, "the daemon kept reading a client that never reads");

    // Another client is served in full meanwhile.
    let other = Conn::open(&sidecar);
    other.call(GET_FEATURES, &[]).ok();
    other.handshake(ACCELERATED);
    other.call(WINDOW_QUERY, &id(0)).error(ENOENT);
    let sessions = all_sessions(&other);
    assert_eq!(sessions.len(), 2);

    // Closing the stalled client ends its session.
    drop(stalled);
    wait_until("the stalled session ends", IO_TIMEOUT, || {
        all_sessions(&other).len() == 1
    });
}

#[test]
fn sixty_four_concurrent_clients_each_served_correctly() {
    const CLIENTS: usize = 64;
    let sidecar = Arc::new(Sidecar::start("c-64", &[]));
    let negotiated = Arc::new(AtomicUsize::new(0));
    let checked = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (sidecar, negotiated, checked) = (
                Arc::clone(&sidecar),
                Arc::clone(&negotiated),
                Arc::clone(&checked),
            );
            std::thread::spawn(move || {
                let conn = Conn::open(&sidecar);
                let features = conn.call(GET_FEATURES, &[]).ok().body;
                assert_eq!(
                    features,
                    (ACCELERATED | ISOLATED | EEH | REBUILD | FDS_BY_MODE).to_le_bytes()
                );
                let mode = if i % 2 == 0 { ACCELERATED } else { ISOLATED };
                conn.handshake(mode);
                negotiated.fetch_add(1, Ordering::SeqCst);
                // Every client queries while all 64 sessions are open.
                wait_until("every client negotiated", IO_TIMEOUT, || {
                    negotiated.load(Ordering::SeqCst) == CLIENTS
                });
                let first = conn.status();
                assert_eq!(first["daemon"]["sessions"], CLIENTS);
                let sessions = all_sessions(&conn);
                assert_eq!(sessions.len(), CLIENTS);
                let isolated = sessions.iter().filter(|s| s["mode"] == "isolated").count();
                assert_eq!(isolated, CLIENTS / 2);
                checked.fetch_add(1, Ordering::SeqCst);
                wait_until("every client checked", IO_TIMEOUT, || {
                    checked.load(Ordering::SeqCst) == CLIENTS
                });
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a client thread");
    }
}

/// The front-end's objects, for the model backend that executes its owner operations.
type FrontEnd = ObjectTable;

/// The kernel call an operation record asks for (only the kinds these sessions receive).
fn kernel_op(op: &Op) -> KernelOp {
    let container = ContainerId(op.container);
    match op.kind {
        CONTAINER_OPEN => KernelOp::ContainerOpen { container },
        SET_IOMMU => KernelOp::SetIommu {
            container,
            iommu_type: op.aux,
        },
        GROUP_SET_CONTAINER => KernelOp::GroupSetContainer {
            container,
            group: GroupId(op.object),
        },
        TCE_GET_INFO => KernelOp::TceGetInfo { container },
        REGISTER_MEMORY => KernelOp::RegisterMemory {
            container,
            region: RegionId(op.object),
            offset: op.args[0],
            size: op.args[1],
        },
        TCE_CREATE => KernelOp::TceCreate {
            container,
            page_shift: op.aux,
            window_size: op.args[0],
            levels: op.args[1] as u32,
        },
        TCE_REMOVE => KernelOp::TceRemove {
            container,
            start_addr: op.args[0],
        },
        KVM_FILE_ADD => KernelOp::KvmFileAdd {
            group: GroupId(op.object),
        },
        KVM_FILE_DEL => KernelOp::KvmFileDel {
            group: GroupId(op.object),
        },
        KVM_SET_SPAPR_TCE => KernelOp::KvmSetSpaprTce {
            group: GroupId(op.object),
            table: TableId(op.aux),
        },
        kind => panic!("unexpected operation kind {kind}"),
    }
}

/// A result record (§6.2), its outputs packed by hand as §6.1 says.
fn result_record(kind: u16, result: &Result<Output, rustix::io::Errno>) -> Vec<u8> {
    let (status, out) = match result {
        Err(errno) => (-errno.raw_os_error(), [0; 4]),
        Ok(Output::Done) => (0, [0; 4]),
        Ok(Output::ApiVersion(v) | Output::Value(v)) => (0, [u64::from(*v), 0, 0, 0]),
        Ok(Output::StartAddr(a) | Output::Unmapped(a)) => (0, [*a, 0, 0, 0]),
        Ok(Output::TceInfo(i)) => (
            0,
            [
                u64::from(i.flags),
                u64::from(i.dma32_window_start) | u64::from(i.dma32_window_size) << 32,
                i.pgsizes,
                u64::from(i.max_dynamic_windows) | u64::from(i.levels) << 32,
            ],
        ),
        Ok(other) => panic!("no wire output for {other:?}"),
    };
    Le::default()
        .u16(kind)
        .u16(0)
        .i32(status)
        .u64(out[0])
        .u64(out[1])
        .u64(out[2])
        .u64(out[3])
        .bytes()
}

/// A front-end on the model: a VM made as this process, its kernel backend and objects.
struct Vm {
    vm: ModelVm,
    kernel: ModelBackend,
    objects: FrontEnd,
}

impl Vm {
    fn new(sidecar: &Sidecar) -> Self {
        let mut vm = ModelVm::create(&sidecar.model_socket).unwrap();
        vm.add_ram(0, 0, RAM).unwrap();
        let mut kernel = vm.kernel().unwrap();
        let ram = &vm.ram()[0];
        // The front-end's mapping of its RAM, which its REGISTER_MEMORY names.
        kernel
            .memory_mapped(ram.memfd.as_fd(), 0, ram.mapping.addr(), RAM)
            .unwrap();
        let mut objects = FrontEnd {
            kvm_vfio: Some(vm.kvm_vfio_device().unwrap()),
            ..FrontEnd::default()
        };
        objects.regions.insert(
            RegionId(0),
            Mapping {
                addr: ram.mapping.addr(),
                size: RAM,
            },
        );
        Self {
            vm,
            kernel,
            objects,
        }
    }

    fn mem_add(&self) -> Vec<u8> {
        let ram = &self.vm.ram()[0];
        Le::default()
            .u32(0)
            .u32(0)
            .u64(0)
            .u64(RAM)
            .u64(ram.mapping.addr())
            .u64(0)
            .bytes()
    }

    /// Executes each batch of owner operations in order and answers with OPS_RESULT, until the
    /// final reply. `fail` makes the first operation of that kind fail with `-EPERM`,
    /// unexecuted (a rollback then runs in full). Returns the final reply and every batch.
    fn run(
        &mut self,
        conn: &Conn,
        mut reply: RawReply,
        mut fail: Option<u16>,
    ) -> (RawReply, Vec<Vec<Op>>) {
        let mut batches = Vec::new();
        let transaction = reply.transaction;
        while reply.flags & OPS != 0 {
            assert_eq!(reply.transaction, transaction, "one transaction to the end");
            let mut results = Vec::new();
            for op in &reply.ops {
                let outcome = if Some(op.kind) == fail.take_if(|k| *k == op.kind) {
                    Err(rustix::io::Errno::PERM)
                } else {
                    self.kernel.execute(&kernel_op(op), &self.objects)
                };
                results.push(result_record(op.kind, &outcome));
                if outcome.is_err() {
                    break;
                }
            }
            let mut payload = Le::default()
                .u32(transaction)
                .u32(results.len() as u32)
                .bytes();
            results.iter().for_each(|r| payload.extend_from_slice(r));
            batches.push(reply.ops.clone());
            reply = conn.call(OPS_RESULT, &payload);
        }
        (reply, batches)
    }

    fn group_fd(&mut self, group: u32, iommu_group: u32) -> OwnedFd {
        let fd = self.vm.open_group(iommu_group).unwrap();
        self.objects
            .groups
            .insert(GroupId(group), fd.try_clone().unwrap());
        fd
    }
}

/// TABLE_ADD of table 1 in container 0: LIOBN, 4K pages from bus address 0, ENTRIES entries.
fn table_add_1() -> Vec<u8> {
    Le::default()
        .u32(1)
        .u32(0)
        .u32(LIOBN)
        .u32(12)
        .u64(0)
        .u64(ENTRIES)
        .bytes()
}

fn kinds(batch: &[Op]) -> Vec<u16> {
    batch.iter().map(|op| op.kind).collect()
}

#[test]
fn accelerated_group_add_and_window_owner_operations_executed_by_front_end() {
    let sidecar = Sidecar::start("c-accelerated", &[]);
    let model = sidecar.model();
    let mut vm = Vm::new(&sidecar);
    let conn = Conn::open(&sidecar);
    conn.handshake(ACCELERATED);
    conn.call_fds(MEM_ADD, &vm.mem_add(), &[vm.vm.ram()[0].memfd.as_fd()])
        .ok();

    let group = vm.group_fd(1, 1);
    let reply = conn.call_fds(GROUP_ADD, &group_add(1, 0, 1), &[group.as_fd()]);
    let (last, batches) = vm.run(&conn, reply, None);
    last.ok();
    // The calls QEMU makes for a new container, in order, each on the front-end's own fds.
    assert_eq!(
        batches.iter().map(|b| kinds(b)).collect::<Vec<_>>(),
        [
            vec![CONTAINER_OPEN, GROUP_SET_CONTAINER, SET_IOMMU, TCE_GET_INFO],
            vec![REGISTER_MEMORY, TCE_REMOVE],
        ]
    );
    assert_eq!(batches[0][2].aux, 7, "VFIO_SPAPR_TCE_v2_IOMMU");
    assert_eq!(
        batches[1][0].args[..2],
        [0, RAM],
        "all of region 0 registered"
    );
    // The front-end's mm registered the RAM; the sidecar's holds nothing.
    let me = model.mm_stats(None).unwrap();
    assert_eq!((me.pinned_pages << 12, me.prereg_regions), (RAM, 1));
    let sidecar_mm = model.mm_stats(Some(common::worker_pid(&conn.0))).unwrap();
    assert_eq!(
        (sidecar_mm.pinned_pages, sidecar_mm.locked_vm_pages),
        (0, 0)
    );

    // A KVM TCE table and its window: TCE_CREATE by the front-end, then the group file joins the
    // kvm-vfio device and KVM learns the table.
    let table = vm.vm.kvm_table(u64::from(LIOBN), 12, 0, ENTRIES).unwrap();
    vm.objects
        .tables
        .insert(TableId(1), (table.fd.try_clone().unwrap(), ENTRIES));
    let desc = table_add_1();
    conn.call_fds(TABLE_ADD, &desc, &[table.fd.as_fd()]).ok();
    let reply = conn.call(WINDOW_CREATE, &id(1));
    let (last, batches) = vm.run(&conn, reply, None);
    let last = last.ok();
    assert_eq!(
        batches.iter().map(|b| kinds(b)).collect::<Vec<_>>(),
        [vec![TCE_CREATE], vec![KVM_FILE_ADD, KVM_SET_SPAPR_TCE]]
    );
    assert_eq!(batches[1][0].object, 1);
    assert_eq!((batches[1][1].object, batches[1][1].aux), (1, 1));
    assert_eq!(
        le_u64(&last.body, 0),
        0,
        "the window starts at the table's bus offset"
    );
    assert_eq!(le_u32(&last.body, 8), 12);

    // A second group whose attach the front-end refuses: nothing to roll back (its file would
    // join the kvm-vfio device only with the association) and the request fails with the
    // front-end's errno.
    let group2 = vm.group_fd(2, 2);
    let reply = conn.call_fds(GROUP_ADD, &group_add(2, 0, 2), &[group2.as_fd()]);
    let (last, batches) = vm.run(&conn, reply, Some(GROUP_SET_CONTAINER));
    last.error(EPERM);
    assert!(last.text.contains("GROUP_SET_CONTAINER"), "{}", last.text);
    assert_eq!(
        batches.iter().map(|b| kinds(b)).collect::<Vec<_>>(),
        [vec![GROUP_SET_CONTAINER]]
    );
    // EEH was not negotiated in this session.
    conn.call(EEH_OP, &eeh(1)).error(ENOTSUP);
    let status = conn.status();
    let groups = status["sessions"][0]["groups"].as_array().unwrap().clone();
    assert_eq!(
        groups.len(),
        1,
        "only the first group is registered: {status}"
    );
}

/// §4.1 `FDS_BY_MODE` in accelerated mode: MEM_ADD, GROUP_ADD carry no fd (MEM_ADD names its
/// page shift at offset 4), TABLE_ADD still carries its KVM table; the owner operations are
/// the same. In isolated mode the feature changes nothing.
#[test]
fn fds_by_mode_accelerated_session_sends_only_table_fds() {
    let sidecar = Sidecar::start("c-fds-by-mode", &[]);
    let mut vm = Vm::new(&sidecar);
    let conn = Conn::open(&sidecar);
    conn.handshake(ACCELERATED | FDS_BY_MODE);
    let ram = vm.vm.ram()[0].memfd.try_clone().unwrap();
    let region = vm.mem_add();
    let with_page_shift = |shift: u32| {
        let mut region = region.clone();
        region[4..8].copy_from_slice(&shift.to_le_bytes());
        region
    };
    let reply = conn.call_fds(MEM_ADD, &with_page_shift(16), &[ram.as_fd()]);
    reply.error(EBADF);
    assert!(reply.text.contains("exactly 0 fd(s)"), "{}", reply.text);
    let reply = conn.call(MEM_ADD, &region);
    reply.error(EINVAL);
    assert!(reply.text.contains("page_shift"), "{}", reply.text);
    conn.call(MEM_ADD, &with_page_shift(16)).ok();

    let group = vm.group_fd(1, 1);
    conn.call_fds(GROUP_ADD, &group_add(1, 0, 1), &[group.as_fd()])
        .error(EBADF);
    let reply = conn.call(GROUP_ADD, &group_add(1, 0, 1));
    let (last, batches) = vm.run(&conn, reply, None);
    last.ok();
    assert_eq!(
        batches.iter().map(|b| kinds(b)).collect::<Vec<_>>(),
        [
            vec![CONTAINER_OPEN, GROUP_SET_CONTAINER, SET_IOMMU, TCE_GET_INFO],
            vec![REGISTER_MEMORY, TCE_REMOVE],
        ]
    );

    let table = vm.vm.kvm_table(u64::from(LIOBN), 12, 0, ENTRIES).unwrap();
    vm.objects
        .tables
        .insert(TableId(1), (table.fd.try_clone().unwrap(), ENTRIES));
    conn.call(TABLE_ADD, &table_add_1()).error(EBADF);
    conn.call_fds(TABLE_ADD, &table_add_1(), &[table.fd.as_fd()])
        .ok();
    let reply = conn.call(WINDOW_CREATE, &id(1));
    let (last, batches) = vm.run(&conn, reply, None);
    last.ok();
    assert_eq!(
        batches.iter().map(|b| kinds(b)).collect::<Vec<_>>(),
        [vec![TCE_CREATE], vec![KVM_FILE_ADD, KVM_SET_SPAPR_TCE]]
    );

    // Isolated: the sidecar maps guest RAM and owns the group, so both still travel.
    let isolated = Conn::open(&sidecar);
    isolated.handshake(ISOLATED | FDS_BY_MODE);
    let reply = isolated.call(MEM_ADD, &region);
    reply.error(EBADF);
    assert!(reply.text.contains("exactly 1 fd(s)"), "{}", reply.text);
    isolated.call(MEM_ADD, &with_page_shift(16)).error(EBADF);
}

#[test]
fn isolated_session_every_request_type_on_the_model() {
    let sidecar = Sidecar::start("c-isolated", &[]);
    let model = sidecar.model();
    let mut vm = Vm::new(&sidecar);
    let conn = Conn::open(&sidecar);
    conn.handshake(ISOLATED | EEH);
    let worker = common::worker_pid(&conn.0);
    let daemon = Mm(worker);
    let mem_add = vm.mem_add();
    conn.call_fds(MEM_ADD, &mem_add, &[vm.vm.ram()[0].memfd.as_fd()])
        .ok();
    // GROUP_ADD: the sidecar does it all itself; no table will ever be associated in KVM, so
    // the group file does not join the kvm-vfio device either.
    let group = vm.group_fd(1, 1);
    let reply = conn.call_fds(GROUP_ADD, &group_add(1, 0, 1), &[group.as_fd()]);
    let (last, batches) = vm.run(&conn, reply, None);
    last.ok();
    assert!(batches.is_empty(), "{batches:?}");
    let sidecar_mm = model.mm_stats(Some(worker)).unwrap();
    assert_eq!(
        sidecar_mm.pinned_pages << 12,
        RAM,
        "the sidecar registered the RAM"
    );
    assert_eq!(model.mm_stats(None).unwrap().pinned_pages, 0);

    let table = vm
        .vm
        .userspace_table(u64::from(LIOBN), 12, 0, ENTRIES)
        .unwrap();
    let desc = table_add_1();
    conn.call_fds(TABLE_ADD, &desc, &[table.fd.as_fd()]).ok();
    let query = conn.call(WINDOW_QUERY, &id(0)).ok();
    assert_eq!(query.body.len(), 24);
    assert_eq!((le_u32(&query.body, 0), le_u32(&query.body, 4)), (2, 2));
    assert_ne!(le_u64(&query.body, 8) & 1 << 12, 0, "4 KiB IOMMU pages");
    assert_eq!(le_u64(&query.body, 16), RAM);
    let created = conn.call(WINDOW_CREATE, &id(1)).ok();
    assert_eq!(created.body.len(), 16);
    assert_eq!(le_u64(&created.body, 0), 0);
    assert_eq!(le_u32(&created.body, 8), 12);
    conn.call(WINDOW_CREATE, &id(1)).error(17);

    // TCE_UPDATE: INLINE, SHARED (from the table fd), STUFF, and an index past the table.
    let inline = Le::default()
        .u32(1)
        .u32(1)
        .u64(0)
        .u32(2)
        .u32(0)
        .u64(0x1000 | 3)
        .u64(0x2000 | 1)
        .bytes();
    let reply = conn.call(TCE_UPDATE, &inline).ok();
    assert_eq!((le_u64(&reply.body, 0), le_u32(&reply.body, 8)), (0, 2));
    let entry = model.iommu_entry(1, 0).unwrap().expect("entry 0 mapped");
    assert_eq!(entry.mm, daemon, "mapped from the sidecar's own mapping");
    assert!(table.mapping.write_u64(4, 0x5000 | 3));
    let shared = Le::default().u32(1).u32(0).u64(4).u32(1).u32(0).bytes();
    conn.call(TCE_UPDATE, &shared).ok();
    assert!(model.iommu_entry(1, 4 << 12).unwrap().is_some());
    let stuff = Le::default()
        .u32(1)
        .u32(2)
        .u64(0)
        .u32(8)
        .u32(0)
        .u64(0)
        .bytes();
    conn.call(TCE_UPDATE, &stuff).ok();
    assert!(
        model.iommu_entry(1, 0).unwrap().is_none(),
        "entry 0 cleared"
    );
    assert!(model.iommu_entry(1, 4 << 12).unwrap().is_none());
    let outside = Le::default()
        .u32(1)
        .u32(1)
        .u64(ENTRIES)
        .u32(1)
        .u32(0)
        .u64(0x1000 | 3)
        .bytes();
    let reply = conn.call(TCE_UPDATE, &outside);
    reply.error(EINVAL);
    assert_eq!(le_u64(&reply.body, 0) as i64, H_PARAMETER);

    // EEH on the container's one group: enable, then the PE's state.
    let reply = conn.call(EEH_OP, &eeh(1)).ok();
    assert_eq!(reply.body.len(), 8);
    conn.call(EEH_OP, &eeh(4)).ok();

    // WINDOW_RESET with CREATE_DEFAULT re-creates the table's window.
    let reset = Le::default().u32(0).u32(1).u32(1).u32(0).bytes();
    let reply = conn.call(WINDOW_RESET, &reset).ok();
    assert_eq!(reply.body.len(), 16);
    conn.call(TABLE_REMOVE, &id(1)).error(EBUSY);
    conn.call(WINDOW_REMOVE, &id(1)).ok();
    conn.call(TABLE_REMOVE, &id(1)).ok();

    // GROUP_REMOVE of the last group: the sidecar unregisters and closes the container; the
    // front-end has nothing to do.
    let reply = conn.call(GROUP_REMOVE, &id(1));
    let (last, batches) = vm.run(&conn, reply, None);
    last.ok();
    assert!(batches.is_empty(), "{batches:?}");
    let sidecar_mm = model.mm_stats(Some(worker)).unwrap();
    assert_eq!((sidecar_mm.pinned_pages, sidecar_mm.prereg_regions), (0, 0));
    // MEM_REMOVE must repeat MEM_ADD's fields.
    let mut wrong = mem_add.clone();
    wrong[16] ^= 0x10;
    conn.call(MEM_REMOVE, &wrong).error(EINVAL);
    conn.call(MEM_REMOVE, &mem_add).ok();
    let status = conn.status();
    assert_eq!(status["sessions"][0]["regions"], 0);
}
