//! One connection = one session, served by the main thread of its worker process.
//!
//! Why blocking reads rather than an event loop: the protocol is strictly one request, one
//! reply; each request may make blocking kernel calls (MAP_DMA pins pages); and a slow, stuck
//! or malicious client then blocks only its own worker. Shutdown wakes the thread by shutting
//! its socket down.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use rustix::io::Errno;
use tracing::{debug, info, warn};

use crate::engine::{Action, FdFacts, Session};
use crate::kernel::shared_memory::{require_sealed, TceView, Unsafe};
use crate::kernel::{GroupId, Kernel, KernelOp, Output, OwnershipMode};
use crate::protocol::{
    decode_request, encode_reply, send_frame, FdRule, FrameReader, Incoming, RecvError, Reply,
    Request, RequestCode,
};

use super::objects::{facts, SessionObjects};
use super::status::SessionStatus;

/// What the worker knows of its session, shared with the thread that answers status queries.
pub struct SessionEntry {
    pub id: u64,
    pub peer_pid: i32,
    pub peer_uid: u32,
    pub started: Instant,
    pub engine: Mutex<Session>,
}

impl SessionEntry {
    pub fn engine(&self) -> MutexGuard<'_, Session> {
        // A panic while holding the lock would be a bug; the engine's state is still the best
        // description of the kernel's, so keep using it.
        self.engine
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The session as GET_STATUS lists it.
    pub fn status(&self) -> SessionStatus {
        let uptime = self.started.elapsed().as_secs();
        SessionStatus::new(
            self.id,
            self.peer_pid,
            self.peer_uid,
            uptime,
            &self.engine(),
        )
    }
}

fn send_reply(stream: &UnixStream, code: u32, reply: &Reply) -> std::io::Result<()> {
    let payload = match encode_reply(reply) {
        Ok(payload) => payload,
        Err(why) => {
            warn!(code, why, "refusing to send an invalid reply");
            let fallback = Reply::error(Errno::IO.raw_os_error(), format!("internal error: {why}"));
            encode_reply(&fallback).unwrap_or_default()
        }
    };
    send_frame(stream, code, true, &payload, &[])
}

fn execute(
    kernel: &mut dyn Kernel,
    objects: &SessionObjects,
    ops: &[KernelOp],
) -> Vec<Result<Output, Errno>> {
    let mut results = Vec::with_capacity(ops.len());
    for op in ops {
        let result = kernel.execute(op, objects);
        if let Err(errno) = result {
            debug!(?op, %errno, "sidecar call failed");
        }
        let failed = result.is_err();
        results.push(result);
        if failed {
            break;
        }
    }
    results
}

/// Runs the engine until it needs the front-end (a reply) or is done.
fn drive(
    entry: &SessionEntry,
    kernel: &mut dyn Kernel,
    objects: &SessionObjects,
    mut action: Action,
) -> Option<Reply> {
    loop {
        match action {
            Action::Execute(ops) => {
                let results = execute(kernel, objects, &ops);
                action = entry.engine().sidecar_results(results);
            }
            Action::Reply(reply) => return Some(reply),
            Action::Closed => return None,
        }
    }
}

/// Keeps the fd a request carried, after checking that nothing its sender does later can make
/// this process fault on it (PROTOCOL.md, Trust), and returns the facts the engine checks.
fn keep_fd(
    objects: &mut SessionObjects,
    kernel: &mut dyn Kernel,
    request: &Request,
    fd: OwnedFd,
    mode: Option<OwnershipMode>,
    host_page: u64,
) -> Result<FdFacts, (Errno, String)> {
    let plain = |errno: Errno| (errno, format!("the fd cannot be used: {errno}"));
    let facts = facts(fd.as_fd(), host_page).map_err(plain)?;
    // Before SET_FEATURES the engine refuses the request; its fd is dropped unused.
    let Some(mode) = mode else {
        return Ok(facts);
    };
    let isolated = mode == OwnershipMode::Isolated;
    let refused = |why: Unsafe| (why.errno(), why.to_string());
    match request {
        Request::MemAdd(desc) => {
            // Isolated sessions map guest RAM to use the sidecar's own addresses (K2).
            if isolated {
                let end = desc.mmap_offset.saturating_add(desc.size);
                require_sealed(fd.as_fd(), end).map_err(refused)?;
            }
            let map = isolated && desc.size > 0;
            objects
                .add_region(desc, fd, map, kernel)
                .map_err(|errno| refused(Unsafe::Map(errno)))?;
        }
        Request::GroupAdd(desc) | Request::GroupAdopt(desc) => {
            objects.add_group(GroupId(desc.group_id), fd)
        }
        Request::TableAdd(desc) => {
            if isolated {
                let bytes = desc.entries.saturating_mul(8);
                require_sealed(fd.as_fd(), bytes).map_err(refused)?;
            } else if !kernel.is_tce_table(fd.as_fd()).map_err(plain)? {
                return Err((
                    Errno::BADF,
                    "the fd is not a KVM TCE table (KVM_CREATE_SPAPR_TCE_64)".into(),
                ));
            }
            let view = TceView::new(fd.as_fd(), desc.entries).map_err(|errno| match errno {
                Errno::FAULT => (
                    Errno::INVAL,
                    format!("the table holds fewer than {} entries", desc.entries),
                ),
                errno => refused(Unsafe::Map(errno)),
            })?;
            objects.add_table(desc, fd, view);
        }
        _ => {}
    }
    Ok(facts)
}

/// Serves one session until the peer disconnects or the worker shuts the socket down, then
/// tears down what the sidecar owns. `status` answers GET_STATUS (the whole daemon's).
pub fn serve(
    entry: &SessionEntry,
    stream: UnixStream,
    kernel: &mut dyn Kernel,
    status: &mut dyn FnMut(u32) -> Reply,
    host_page: u64,
) {
    let mut objects = SessionObjects::default();
    // One read per frame in the common case; fds go to the message that begins in their read
    // (PROTOCOL §2.1).
    let mut reader = FrameReader::new(false);
    let id = entry.id;
    loop {
        let frame = match reader.recv(&stream) {
            Ok(frame) => frame,
            Err(RecvError::Closed) => {
                debug!(session = id, "peer closed the connection");
                break;
            }
            Err(err) => {
                warn!(session = id, %err, "closing the connection");
                break;
            }
        };
        let code = frame.header.request;
        let rule = FdRule::negotiated(entry.engine().features());
        let decoded = decode_request(
            &frame.header,
            &frame.payload,
            frame.fds,
            frame.fd_problem,
            rule,
        );
        let Incoming { request, fd } = match decoded {
            Ok(incoming) => incoming,
            Err(err) => {
                debug!(session = id, %err, "refused a malformed request");
                if send_reply(&stream, code, &Reply::error(err.errno(), err.to_string())).is_err() {
                    break;
                }
                continue;
            }
        };
        if let Request::GetStatus { first_session } = request {
            if send_reply(&stream, code, &status(first_session)).is_err() {
                break;
            }
            continue;
        }
        let facts = match fd {
            Some(fd) => {
                let mode = entry.engine().mode();
                match keep_fd(&mut objects, kernel, &request, fd, mode, host_page) {
                    Ok(facts) => Some(facts),
                    Err((errno, why)) => {
                        let text = format!("{}: {why}", request.code());
                        if send_reply(&stream, code, &Reply::error(errno.raw_os_error(), text))
                            .is_err()
                        {
                            break;
                        }
                        continue;
                    }
                }
            }
            None => None,
        };
        let is_ops_result = request.code() == RequestCode::OpsResult;
        let action = entry.engine().handle(request, facts);
        let Some(reply) = drive(entry, kernel, &objects, action) else {
            break;
        };
        if reply.status < 0 {
            debug!(session = id, status = reply.status, text = %reply.text, "request failed");
        }
        if reply.ops.is_empty() || is_ops_result {
            objects.sync(entry.engine().state(), kernel);
        }
        if send_reply(&stream, code, &reply).is_err() {
            break;
        }
    }
    // Teardown: whatever the sidecar owns goes, in order; the front-end's fds closing releases
    // what it owns.
    let action = entry.engine().disconnect();
    drive(entry, kernel, &objects, action);
    let engine = entry.engine();
    let sidecar_left = if engine.mode() == Some(OwnershipMode::Isolated) {
        engine.registered_bytes()
    } else {
        0
    };
    drop(engine);
    info!(
        session = id,
        fds = objects.fd_count(),
        sidecar_registered_left = sidecar_left,
        "session ended"
    );
    objects.release(kernel);
}
