//! Framing, handshake and the error classes of §2.2, in their order.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use super::{group_add, id, offered, offered_mode, own_session, page, region, status_page, Peer};
use crate::conformance::wire::*;
use crate::conformance::{Check, Checked};
use crate::ensure;

pub const CHECKS: &[Check<Peer>] = &[
    Check {
        name: "frame.version",
        spec: "§2.2, §4.3",
        run: version,
    },
    Check {
        name: "frame.reserved-flags",
        spec: "§2.2",
        run: reserved_flags,
    },
    Check {
        name: "frame.size-limit",
        spec: "§2, §2.2",
        run: size_limit,
    },
    Check {
        name: "frame.end-of-stream",
        spec: "§2.2",
        run: end_of_stream,
    },
    Check {
        name: "handshake.get-features",
        spec: "§4.1, §7.1",
        run: get_features,
    },
    Check {
        name: "handshake.set-features-refused",
        spec: "§4.3",
        run: set_features_refused,
    },
    Check {
        name: "handshake.set-features-once",
        spec: "§4.2, §4.3",
        run: set_features_once,
    },
    Check {
        name: "handshake.status-in-every-state",
        spec: "§4.2, §7.3",
        run: status_in_every_state,
    },
    Check {
        name: "errors.unknown-code",
        spec: "§2.2",
        run: unknown_code,
    },
    Check {
        name: "errors.payload-size",
        spec: "§2.2, §7",
        run: payload_size,
    },
    Check {
        name: "errors.fd-count",
        spec: "§2.1, §2.2",
        run: fd_count,
    },
    Check {
        name: "errors.fds-with-the-header",
        spec: "§2.1",
        run: fds_with_the_header,
    },
    Check {
        name: "errors.field-values",
        spec: "§2.2, §7",
        run: field_values,
    },
    Check {
        name: "errors.reserved-fields",
        spec: "§2.2, §7",
        run: reserved_fields,
    },
    Check {
        name: "errors.order",
        spec: "§2.2",
        run: order,
    },
    Check {
        name: "errors.session-goes-on",
        spec: "§2.2",
        run: session_goes_on,
    },
];

/// A memfd of `size` bytes, sealed against shrinking unless `sealed` is false.
pub fn memfd(size: u64, sealed: bool) -> Result<OwnedFd, String> {
    let fd = if sealed {
        crate::kernel::shared_memory::sealed_memfd("conformance", size)
    } else {
        rustix::fs::memfd_create("conformance", rustix::fs::MemfdFlags::CLOEXEC)
            .and_then(|fd| rustix::fs::ftruncate(&fd, size).map(|()| fd))
    };
    fd.map_err(|e| format!("cannot make a memfd: {e}"))
}

/// Each frame on a connection of its own: the back-end closes it without a reply.
fn closed_each(peer: &Peer, frames: &[(&str, Vec<u8>)]) -> Checked {
    for (what, bytes) in frames {
        let conn = peer.connect()?;
        conn.send(bytes)?;
        conn.closed_without_reply()
            .map_err(|e| format!("{what}: {e}"))?;
    }
    Ok(())
}

fn version(peer: &Peer) -> Checked {
    closed_each(
        peer,
        &[
            ("version 0", frame(GET_FEATURES, 0, &[])),
            ("version 2", frame(GET_FEATURES, 2, &[])),
            ("version 3", frame(GET_FEATURES, 3, &[])),
        ],
    )?;
    // After a good exchange as well.
    let conn = peer.session(MODE_ISOLATED)?;
    conn.send(&frame(GET_FEATURES, 2, &[]))?;
    Ok(conn
        .closed_without_reply()
        .map_err(|e| format!("version 2 after a handshake: {e}"))?)
}

fn reserved_flags(peer: &Peer) -> Checked {
    closed_each(
        peer,
        &[
            (
                "reserved flag bit 3",
                frame(GET_FEATURES, VERSION_1 | 1 << 3, &[]),
            ),
            (
                "reserved flag bit 31",
                frame(GET_FEATURES, VERSION_1 | 1 << 31, &[]),
            ),
            (
                "REPLY on a request",
                frame(GET_FEATURES, VERSION_1 | FLAG_REPLY, &[]),
            ),
        ],
    )
}

fn size_limit(peer: &Peer) -> Checked {
    let too_large = Le::new()
        .u32(GET_STATUS)
        .u32(VERSION_1)
        .u32(MAX_PAYLOAD + 1)
        .bytes();
    closed_each(peer, &[("size 65537", too_large)])?;
    // 65536 bytes is a frame: a payload of the wrong size for its request, refused.
    let conn = peer.connect()?;
    conn.call(OPS_RESULT, &vec![0u8; MAX_PAYLOAD as usize])?
        .error(EINVAL)?;
    Ok(())
}

fn end_of_stream(peer: &Peer) -> Checked {
    let whole = request(SET_FEATURES, &MODE_ISOLATED.to_le_bytes());
    for (what, cut) in [("inside the header", 6), ("inside the payload", 15)] {
        let conn = peer.connect()?;
        conn.send(&whole[..cut])?;
        conn.stream
            .shutdown(std::net::Shutdown::Write)
            .map_err(|e| e.to_string())?;
        conn.closed_without_reply()
            .map_err(|e| format!("end of stream {what}: {e}"))?;
    }
    Ok(())
}

fn get_features(peer: &Peer) -> Checked {
    let conn = peer.connect()?;
    let reply = conn.call(GET_FEATURES, &[])?.ok()?;
    ensure!(
        reply.body.len() == 8,
        "the body is {} bytes, not 8",
        reply.body.len()
    );
    let features = reply.body_u64(0)?;
    ensure!(
        features & !FEATURES_DEFINED == 0,
        "reserved feature bits offered: {:#x}",
        features & !FEATURES_DEFINED
    );
    ensure!(
        features & FEATURE_REBUILD == 0 || features & MODE_ACCELERATED != 0,
        "REBUILD offered without MODE_ACCELERATED"
    );
    Ok(())
}

fn set_features_refused(peer: &Peer) -> Checked {
    let conn = peer.connect()?;
    let features = offered(&conn)?;
    let mode = offered_mode(features, MODE_ISOLATED)?;
    conn.call(SET_FEATURES, &(mode | 1 << 9).to_le_bytes())?
        .error(ENOTSUP)?;
    // Two modes: -EINVAL, or -ENOTSUP if one is not offered (unsupported bits come first).
    let both = MODE_ACCELERATED | MODE_ISOLATED;
    let errno = if features & both == both {
        EINVAL
    } else {
        ENOTSUP
    };
    conn.call(SET_FEATURES, &both.to_le_bytes())?.error(errno)?;
    conn.call(SET_FEATURES, &0u64.to_le_bytes())?
        .error(EINVAL)?;
    // The session stays unnegotiated: state-bound requests are still refused as such.
    conn.call(WINDOW_QUERY, &id(0))?.error(EPROTO)?;
    let me = own_session(&conn)?;
    ensure!(
        me["phase"] == "new",
        "phase {} after refused SET_FEATURES",
        me["phase"]
    );
    let reply = conn.call(SET_FEATURES, &mode.to_le_bytes())?.ok()?;
    ensure!(
        reply.body == mode.to_le_bytes(),
        "SET_FEATURES echoed {:?}",
        reply.body
    );
    Ok(())
}

fn set_features_once(peer: &Peer) -> Checked {
    let conn = peer.connect()?;
    let features = offered(&conn)?;
    let mode = offered_mode(features, MODE_ACCELERATED)?;
    let wanted = features & !(MODE_ACCELERATED | MODE_ISOLATED) | mode;
    let reply = conn.call(SET_FEATURES, &wanted.to_le_bytes())?.ok()?;
    ensure!(
        reply.body == wanted.to_le_bytes(),
        "SET_FEATURES {wanted:#x} echoed {:?}",
        reply.body
    );
    conn.call(SET_FEATURES, &mode.to_le_bytes())?
        .error(EALREADY)?;
    ensure!(
        offered(&conn)? == features,
        "GET_FEATURES changed after negotiation"
    );
    Ok(())
}

fn status_in_every_state(peer: &Peer) -> Checked {
    let conn = peer.connect()?;
    let page = status_page(&conn, 0)?;
    ensure!(
        page["daemon"]["protocol_version"] == 1,
        "daemon.protocol_version is {}",
        page["daemon"]["protocol_version"]
    );
    for member in [
        "version",
        "kernel",
        "uptime_secs",
        "sessions",
        "max_sessions",
        "limits",
    ] {
        ensure!(
            !page["daemon"][member].is_null(),
            "daemon.{member} is missing"
        );
    }
    let me = own_session(&conn)?;
    ensure!(
        me["phase"] == "new" && me["mode"].is_null(),
        "before SET_FEATURES the session is listed as phase {}, mode {}",
        me["phase"],
        me["mode"]
    );
    let mode = offered_mode(offered(&conn)?, MODE_ISOLATED)?;
    conn.call(SET_FEATURES, &mode.to_le_bytes())?.ok()?;
    let me = own_session(&conn)?;
    let name = if mode == MODE_ISOLATED {
        "isolated"
    } else {
        "accelerated"
    };
    ensure!(
        me["phase"] == "ready" && me["mode"] == name,
        "after SET_FEATURES the session is listed as phase {}, mode {}",
        me["phase"],
        me["mode"]
    );
    Ok(())
}

fn unknown_code(peer: &Peer) -> Checked {
    let conn = peer.connect()?;
    for code in [0, 19, 99, u32::MAX] {
        let reply = conn.call(code, &[])?.error(ENOSYS)?;
        ensure!(!reply.text.is_empty(), "request {code}: no text");
    }
    Ok(())
}

fn payload_size(peer: &Peer) -> Checked {
    let conn = peer.connect()?;
    conn.call(GET_FEATURES, &[0; 8])?.error(EINVAL)?;
    conn.call(SET_FEATURES, &[0; 4])?.error(EINVAL)?;
    conn.call(GET_STATUS, &[0; 12])?.error(EINVAL)?;
    conn.call(TCE_UPDATE, &[0; 25])?.error(EINVAL)?;
    conn.call(OPS_RESULT, &[0; 9])?.error(EINVAL)?;
    Ok(())
}

fn fd_count(peer: &Peer) -> Checked {
    let conn = peer.connect()?;
    let fd = memfd(4096, true)?;
    let many: Vec<OwnedFd> = (0..9)
        .map(|_| memfd(4096, true))
        .collect::<Result<_, _>>()?;
    let borrowed: Vec<BorrowedFd<'_>> = many.iter().map(|f| f.as_fd()).collect();
    let group = group_add(1, 0, 1);
    conn.call(GROUP_ADD, &group)?.error(EBADF)?;
    conn.call_fds(GROUP_ADD, &group, &borrowed[..2])?
        .error(EBADF)?;
    conn.call_fds(GET_FEATURES, &[], &[fd.as_fd()])?
        .error(EBADF)?;
    conn.call_fds(GROUP_ADD, &group, &borrowed)?.error(EBADF)?;
    Ok(())
}

fn fds_with_the_header(peer: &Peer) -> Checked {
    let conn = peer.session(MODE_ISOLATED)?;
    let fd = memfd(page(), true)?;
    // The fd rides on the last bytes of a 20,508-byte OPS_RESULT: it arrives in a read in which
    // its message did not begin.
    let mut results = Le::new().u32(1).u32(512).bytes();
    results.resize(8 + 512 * OP_SIZE, 0);
    let whole = request(OPS_RESULT, &results);
    conn.send(&whole[..20_000])?;
    conn.send_fds(&whole[20_000..], &[fd.as_fd()])?;
    let reply = conn.reply()?;
    ensure!(
        reply.code == OPS_RESULT,
        "the reply carries code {}",
        reply.code
    );
    reply.error(EBADF)?;
    // With the header, then the payload in a second write: the fd is the message's.
    let added = region(1, 0, page());
    let whole = request(MEM_ADD, &added);
    conn.send_fds(&whole[..HEADER_SIZE], &[fd.as_fd()])?;
    conn.send(&whole[HEADER_SIZE..])?;
    let reply = conn.reply()?;
    ensure!(
        reply.code == MEM_ADD,
        "the reply carries code {}",
        reply.code
    );
    reply.ok()?;
    conn.call(MEM_REMOVE, &added)?.ok()?;
    Ok(())
}

fn field_values(peer: &Peer) -> Checked {
    let conn = peer.session(MODE_ISOLATED)?;
    let source_7 = Le::new().u32(1).u32(7).u64(0).u32(1).u32(0).bytes();
    conn.call(TCE_UPDATE, &source_7)?.error(EINVAL)?;
    conn.call(EEH_OP, &super::eeh(0, 10))?.error(EINVAL)?;
    let reset_flag_1 = Le::new().u32(0).u32(2).u32(0).u32(0).bytes();
    conn.call(WINDOW_RESET, &reset_flag_1)?.error(EINVAL)?;
    let count_0 = Le::new().u32(1).u32(1).u64(0).u32(0).u32(0).bytes();
    conn.call(TCE_UPDATE, &count_0)?.error(EINVAL)?;
    Ok(())
}

fn reserved_fields(peer: &Peer) -> Checked {
    let conn = peer.connect()?;
    conn.call(GET_STATUS, &Le::new().u32(0).u32(1).bytes())?
        .error(EINVAL)?;
    let conn = peer.session(MODE_ISOLATED)?;
    conn.call(GROUP_REMOVE, &Le::new().u32(1).u32(1).bytes())?
        .error(EINVAL)?;
    let injection_fields = Le::new().u32(0).u32(4).u32(0).u32(0).u64(1).u64(0).bytes();
    conn.call(EEH_OP, &injection_fields)?.error(EINVAL)?;
    Ok(())
}

/// Checks run in the order of §2.2; the first failing one decides the reply.
fn order(peer: &Peer) -> Checked {
    let conn = peer.connect()?;
    let fd = memfd(page(), true)?;
    // Payload size before fds.
    conn.call(GROUP_ADD, &group_add(1, 0, 1)[..12])?
        .error(EINVAL)?;
    // Fds before field values (EEH_OP op 10).
    conn.call_fds(EEH_OP, &super::eeh(0, 10), &[fd.as_fd()])?
        .error(EBADF)?;
    // Field values and canonical form before session state.
    let source_7 = Le::new().u32(1).u32(7).u64(0).u32(1).u32(0).bytes();
    conn.call(TCE_UPDATE, &source_7)?.error(EINVAL)?;
    conn.call(WINDOW_QUERY, &Le::new().u32(0).u32(1).bytes())?
        .error(EINVAL)?;
    // Session state before the request's own rules (an unknown id).
    conn.call(GROUP_REMOVE, &id(7))?.error(EPROTO)?;
    // The fd the request carries before the request's own rules: an isolated MEM_ADD whose
    // region id is in use and whose fd is not sealed.
    let conn = peer.session(MODE_ISOLATED)?;
    conn.call_fds(MEM_ADD, &region(1, 0, page()), &[fd.as_fd()])?
        .ok()?;
    let unsealed = memfd(page(), false)?;
    let other = region(1, page(), page());
    conn.call_fds(MEM_ADD, &other, &[unsealed.as_fd()])?
        .error(EPERM)?;
    conn.call_fds(MEM_ADD, &other, &[fd.as_fd()])?
        .error(EEXIST)?;
    Ok(())
}

/// After every kind of error reply the session answers the next request, unchanged.
fn session_goes_on(peer: &Peer) -> Checked {
    let conn = peer.connect()?;
    conn.call(99, &[])?.error(ENOSYS)?;
    conn.call(GET_FEATURES, &[0; 8])?.error(EINVAL)?;
    conn.call(WINDOW_QUERY, &id(0))?.error(EPROTO)?;
    let features = offered(&conn)?;
    let mode = offered_mode(features, MODE_ISOLATED)?;
    conn.call(SET_FEATURES, &mode.to_le_bytes())?.ok()?;
    conn.call(GROUP_ADD, &group_add(1, 0, 1))?.error(EBADF)?;
    conn.call(WINDOW_QUERY, &id(5))?.error(ENOENT)?;
    conn.call(TABLE_REMOVE, &id(3))?.error(ENOENT)?;
    let me = own_session(&conn)?;
    ensure!(
        me["phase"] == "ready",
        "phase {} after refused requests",
        me["phase"]
    );
    ensure!(
        me["groups"].as_array().is_some_and(Vec::is_empty)
            && me["tables"].as_array().is_some_and(Vec::is_empty)
            && me["regions"] == 0,
        "refused requests left objects: {me}"
    );
    Ok(())
}
