//! The hostile proxy of the nested lab's hostile-cross case.

use std::os::fd::{AsFd, BorrowedFd};

use tce_sidecar::protocol::{OpKind, RequestCode};

use crate::scenario::Error;

/// A KVM_SET_SPAPR_TCE the proxy rewrote, until QEMU answers it in OPS_RESULT.
struct Rewritten {
    transaction: u32,
    /// The operation's index in its reply, and so of its result in OPS_RESULT.
    index: usize,
    container: u32,
    group: u32,
    table: u32,
}

/// Set once the one rewrite is done: later sessions are relayed untouched.
static REWRITE_DONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn request_name(code: u32) -> &'static str {
    RequestCode::from_u32(code).map_or("an unknown request", RequestCode::name)
}

/// `cross-proxy LISTEN SIDECAR`: listens on LISTEN and relays each connection to the sidecar at
/// SIDECAR, frame by frame with their fds, as a hostile back-end would answer QEMU: the first
/// KVM_SET_SPAPR_TCE that the sidecar asks for a group of another container than the session's
/// first gets that group replaced by a group of the first container (QEMU names groups by their
/// IOMMU group and has one container per guest PHB). Prints `CROSS-PROXY rewrote ...` then, from
/// QEMU's OPS_RESULT, `CROSS-PROXY answer status=N ...` (N the operation's result: -1 is EPERM).
/// Everything else passes unchanged.
pub(crate) fn cross_proxy(args: &[String]) -> Result<(), Error> {
    use std::os::unix::net::UnixListener;
    let [listen, sidecar] = args else {
        return Err("cross-proxy LISTEN_SOCKET SIDECAR_SOCKET".into());
    };
    let _ = std::fs::remove_file(listen);
    let listener = UnixListener::bind(listen)?;
    for qemu in listener.incoming() {
        let qemu = qemu?;
        let sidecar = sidecar.clone();
        std::thread::spawn(move || {
            if let Err(e) = relay(&qemu, &sidecar) {
                println!("CROSS-PROXY session ended: {e}");
            }
        });
    }
    Ok(())
}

/// Relays one session: QEMU's request, then the sidecar's reply (the protocol has no other
/// order), until either side closes.
fn relay(qemu: &std::os::unix::net::UnixStream, sidecar: &str) -> Result<(), Error> {
    use std::sync::atomic::Ordering;
    use tce_sidecar::protocol::{send_frame, FrameReader, RecvError, OP_RECORD_SIZE, REPLY_FIXED};
    let back = std::os::unix::net::UnixStream::connect(sidecar)?;
    let (mut from_qemu, mut from_sidecar) = (FrameReader::new(false), FrameReader::new(true));
    // (group id, container id) from GROUP_ADD, in order: the first names the first container
    let mut groups: Vec<(u32, u32)> = Vec::new();
    let mut opening = 0;
    let mut watched: Option<Rewritten> = None;
    loop {
        let request = match from_qemu.recv(qemu) {
            Err(RecvError::Closed) => return Ok(()),
            r => r?,
        };
        let p = &request.payload;
        let code = RequestCode::from_u32(request.header.request);
        if code != Some(RequestCode::OpsResult) {
            opening = request.header.request;
        }
        match code {
            Some(RequestCode::GroupAdd | RequestCode::GroupAdopt) if p.len() >= 8 => {
                groups.push((le32(p, 0), le32(p, 4)));
            }
            Some(RequestCode::GroupRemove) if p.len() >= 4 => groups.retain(|g| g.0 != le32(p, 0)),
            Some(RequestCode::OpsResult) => {
                if let Some(w) = watched.take_if(|w| p.len() >= 8 && le32(p, 0) == w.transaction) {
                    let (count, at) = (le32(p, 4) as usize, 8 + w.index * OP_RECORD_SIZE);
                    let answer = if w.index < count && p.len() >= at + 8 {
                        format!("status={}", le32(p, at + 4) as i32)
                    } else {
                        format!("status=none (QEMU stopped after {count} results)")
                    };
                    println!(
                        "CROSS-PROXY answer {answer} for KVM_SET_SPAPR_TCE container={} group={} table={} (transaction {})",
                        w.container, w.group, w.table, w.transaction
                    );
                }
            }
            _ => {}
        }
        let fds: Vec<BorrowedFd<'_>> = request.fds.iter().map(|f| f.as_fd()).collect();
        send_frame(&back, request.header.request, false, p, &fds)?;

        let mut reply = from_sidecar.recv(&back)?;
        let r = &mut reply.payload;
        let ops = if r.len() >= REPLY_FIXED && le32(r, 4) & 1 != 0 {
            usize::from(u16::from_le_bytes([r[12], r[13]]))
        } else {
            0
        };
        for index in 0..ops {
            let at = REPLY_FIXED + index * OP_RECORD_SIZE;
            if r.len() < at + OP_RECORD_SIZE
                || u16::from_le_bytes([r[at], r[at + 1]]) != OpKind::KvmSetSpaprTce as u16
                || REWRITE_DONE.load(Ordering::SeqCst)
            {
                continue;
            }
            // kvm-vfio operations name no container: the group's is the one concerned
            let (group, table) = (le32(r, at + 8), le32(r, at + 12));
            let Some(&(other, first_container)) = groups.first() else {
                continue;
            };
            let Some(&(_, container)) = groups.iter().find(|g| g.0 == group) else {
                continue;
            };
            if container == first_container {
                continue;
            }
            r[at + 8..at + 12].copy_from_slice(&other.to_le_bytes());
            REWRITE_DONE.store(true, Ordering::SeqCst);
            let transaction = le32(r, 8);
            println!(
                "CROSS-PROXY rewrote KVM_SET_SPAPR_TCE (op {} of {ops}, transaction {transaction}) in the reply to {}: container {container} table {table} group {group} -> {other}, a group of container {first_container}",
                index + 1,
                request_name(opening)
            );
            watched = Some(Rewritten {
                transaction,
                index,
                container,
                group: other,
                table,
            });
        }
        send_frame(qemu, reply.header.request, true, r, &[])?;
    }
}
