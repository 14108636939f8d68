//! A deliberately broken back-end: a proxy in front of the real daemon that forwards every frame
//! both ways and breaks exactly one rule of `protocol/PROTOCOL.md`, chosen by [`Break`]. The
//! conformance kit must fail the check of that rule against it; with [`Break::None`] it is a
//! faithful proxy and every check passes through it.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tce_sidecar::conformance::wire::*;

/// The one rule the proxy breaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Break {
    /// A faithful proxy.
    None,
    /// Answers a broken frame with an error reply instead of closing the connection (§2.2).
    AnswerBrokenFrames,
    /// Takes a 65536-byte payload for a broken frame (§2).
    CloseAtMaxPayload,
    /// Offers a reserved feature bit (§4.1).
    ReservedFeatureBit,
    /// Replies to `request` (0: any) with `-to` where the daemon said `-from`.
    Errno { request: u32, from: i32, to: i32 },
    /// Lists a session in phase `ready` before its `SET_FEATURES` (§7.3).
    PhaseLies,
    /// Ignores GET_STATUS's reserved word (§2.2: canonical form).
    IgnoresReservedField,
    /// Refuses state-bound requests before `SET_FEATURES` before it checks their fields
    /// (§2.2: the order of checks).
    StateFirst,
    /// Ends the session after its first error reply (§2.2: the session goes on).
    CloseAfterError,
    /// Names another container in the first operation of every reply with `OPS` (§6.3).
    OpOutOfScope,
    /// Answers a failed `OPS_RESULT` with a final error itself: nothing is rolled back (§6).
    SkipRollback,
    /// Gives an isolated `GROUP_ADD`'s final reply an owner operation (§1.1, §6.3).
    IsolatedOps,
    /// Keeps the session when its front-end closes the connection (§9).
    KeepClosedSessions,
    /// Keeps every fd it receives, and says it serves the session itself (§2.1).
    LeakFds,
    /// Closes every connection when one sends a broken frame (§1: sessions share nothing).
    BrokenFrameClosesAll,
}

/// What every connection of the proxy shares.
struct Shared {
    upstream: PathBuf,
    broken: Break,
    clients: Mutex<Vec<UnixStream>>,
    /// Kept alive on purpose: leaked fds and sessions kept open.
    kept: Mutex<Vec<OwnedFd>>,
}

/// The proxy: listens at `path`, forwards to the daemon at `upstream`. Runs until the test ends.
pub fn start(path: &Path, upstream: &Path, broken: Break) {
    let listener = UnixListener::bind(path).expect("bind the broken back-end");
    let shared = Arc::new(Shared {
        upstream: upstream.to_owned(),
        broken,
        clients: Mutex::new(Vec::new()),
        kept: Mutex::new(Vec::new()),
    });
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let shared = Arc::clone(&shared);
            std::thread::spawn(move || serve(client, &shared));
        }
    });
}

const PATIENCE: Duration = Duration::from_secs(30);

/// Per connection: the state both directions see.
#[derive(Default)]
struct Session {
    negotiated: AtomicBool,
    features: AtomicU64,
    errors: AtomicU64,
}

fn serve(client: UnixStream, shared: &Arc<Shared>) {
    let Ok(upstream) = UnixStream::connect(&shared.upstream) else {
        return;
    };
    if let Ok(copy) = client.try_clone() {
        shared.clients.lock().unwrap().push(copy);
    }
    let session = Arc::new(Session::default());
    let (client_r, upstream_w) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
    let replies = {
        let (shared, session) = (Arc::clone(shared), Arc::clone(&session));
        std::thread::spawn(move || forward_replies(upstream, client, &shared, &session))
    };
    forward_requests(client_r, upstream_w, shared, &session);
    let _ = replies.join();
}

fn conn(stream: UnixStream) -> Conn {
    Conn::new(stream, PATIENCE).expect("a proxy connection")
}

fn error_reply(code: u32, errno: i32, text: &str) -> Vec<u8> {
    Reply {
        code,
        status: -errno,
        text: text.to_owned(),
        ..Reply::default()
    }
    .encode()
}

/// Front-end to daemon.
fn forward_requests(client: UnixStream, upstream: UnixStream, shared: &Shared, session: &Session) {
    let (client, upstream) = (conn(client), conn(upstream));
    loop {
        let mut frame = match client.read_frame(PATIENCE) {
            Ok(frame) => frame,
            Err(ReadEnd::Closed) if shared.broken == Break::KeepClosedSessions => {
                // The daemon never learns the front-end left.
                let kept = upstream.stream.as_fd().try_clone_to_owned().unwrap();
                shared.kept.lock().unwrap().push(kept);
                return;
            }
            Err(end) => {
                if shared.broken == Break::AnswerBrokenFrames && end != ReadEnd::Closed {
                    let _ = client.send(&error_reply(0, EINVAL, "a broken frame"));
                }
                let _ = upstream.stream.shutdown(std::net::Shutdown::Both);
                return;
            }
        };
        let flags = frame.flags();
        if flags != VERSION_1 {
            match shared.broken {
                Break::AnswerBrokenFrames => {
                    let _ = client.send(&error_reply(frame.code(), EINVAL, "a broken frame"));
                    continue;
                }
                Break::BrokenFrameClosesAll => {
                    for other in shared.clients.lock().unwrap().iter() {
                        let _ = other.shutdown(std::net::Shutdown::Both);
                    }
                }
                _ => {}
            }
        }
        if shared.broken == Break::CloseAtMaxPayload && frame.payload.len() == MAX_PAYLOAD as usize
        {
            let _ = client.stream.shutdown(std::net::Shutdown::Both);
            return;
        }
        let code = frame.code();
        let mut payload = std::mem::take(&mut frame.payload);
        if shared.broken == Break::IgnoresReservedField && code == GET_STATUS && payload.len() == 8
        {
            payload[4..8].fill(0);
        }
        let state_bound = matches!(code, MEM_ADD..=EEH_OP | GROUP_ADOPT | WINDOW_ADOPT);
        if shared.broken == Break::StateFirst
            && state_bound
            && !session.negotiated.load(Ordering::SeqCst)
        {
            let _ = client.send(&error_reply(code, EPROTO, "before SET_FEATURES"));
            continue;
        }
        if shared.broken == Break::SkipRollback && code == OPS_RESULT && failed_result(&payload) {
            let _ = client.send(&error_reply(OPS_RESULT, EIO, "an operation failed"));
            continue;
        }
        let fds: Vec<BorrowedFd<'_>> = frame.fds.iter().map(|fd| fd.as_fd()).collect();
        let bytes = Le::new()
            .raw(&frame.header[..8])
            .u32(payload.len() as u32)
            .raw(&payload)
            .bytes();
        if upstream.send_fds(&bytes, &fds).is_err() {
            return;
        }
        if shared.broken == Break::LeakFds {
            shared.kept.lock().unwrap().extend(frame.fds);
        }
    }
}

/// Whether an `OPS_RESULT` payload reports a failed operation.
fn failed_result(payload: &[u8]) -> bool {
    let count = u32_at(payload, 4).unwrap_or(0) as usize;
    (0..count).any(|i| u32_at(payload, 8 + i * OP_SIZE + 4).is_some_and(|s| s != 0))
}

/// Daemon to front-end.
fn forward_replies(upstream: UnixStream, client: UnixStream, shared: &Shared, session: &Session) {
    let (upstream, client) = (conn(upstream), conn(client));
    loop {
        let Ok(frame) = upstream.read_frame(Duration::from_secs(3600)) else {
            let _ = client.stream.shutdown(std::net::Shutdown::Both);
            return;
        };
        let Ok(mut reply) = Reply::parse(&frame.header, &frame.payload) else {
            let _ = client.send(&frame.header);
            let _ = client.send(&frame.payload);
            continue;
        };
        if reply.code == SET_FEATURES && reply.status == 0 {
            session.negotiated.store(true, Ordering::SeqCst);
            session
                .features
                .store(u64_at(&reply.body, 0).unwrap_or(0), Ordering::SeqCst);
        }
        let error = reply.status < 0;
        breaks_reply(&mut reply, shared.broken, session);
        if client.send(&reply.encode()).is_err() {
            return;
        }
        if error
            && shared.broken == Break::CloseAfterError
            && session.errors.fetch_add(1, Ordering::SeqCst) == 0
        {
            let _ = client.stream.shutdown(std::net::Shutdown::Both);
            return;
        }
    }
}

fn breaks_reply(reply: &mut Reply, broken: Break, session: &Session) {
    match broken {
        Break::ReservedFeatureBit if reply.code == GET_FEATURES && reply.body.len() == 8 => {
            reply.body[5] |= 1;
        }
        Break::Errno { request, from, to }
            if (request == 0 || request == reply.code) && reply.status == -from =>
        {
            reply.status = -to;
        }
        Break::PhaseLies | Break::LeakFds if reply.code == GET_STATUS && reply.status == 0 => {
            let Ok(mut status) = serde_json::from_slice::<serde_json::Value>(&reply.body) else {
                return;
            };
            for entry in status["sessions"].as_array_mut().into_iter().flatten() {
                if broken == Break::PhaseLies && entry["phase"] == "new" {
                    entry["phase"] = "ready".into();
                }
                if broken == Break::LeakFds {
                    entry["worker_pid"] = std::process::id().into();
                }
            }
            reply.body = serde_json::to_vec(&status).unwrap();
        }
        Break::OpOutOfScope if !reply.ops.is_empty() => {
            reply.ops[0].container += 7;
            reply.ops[0].object += 7;
        }
        Break::IsolatedOps
            if reply.code == GROUP_ADD
                && reply.status == 0
                && session.features.load(Ordering::SeqCst) & MODE_ISOLATED != 0 =>
        {
            reply.flags = REPLY_OPS;
            reply.transaction = 99;
            reply.ops = vec![Op {
                kind: TCE_GET_INFO,
                ..Op::default()
            }];
        }
        _ => {}
    }
}
