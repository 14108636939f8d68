//! The trust rules of §1.2: every fd checked when it arrives, refused fds closed, limits, one
//! session unable to disturb another, and a session ended in any state torn down.

use std::os::fd::{AsFd, BorrowedFd};

use super::accelerated::{self, ACCELERATED};
use super::framing::memfd;
use super::{group_add, id, own_session, page, region, status_page, wait_session_gone, Peer};
use crate::conformance::wire::*;
use crate::conformance::{Check, Checked, Failure};
use crate::ensure;

pub const CHECKS: &[Check<Peer>] = &[
    Check {
        name: "trust.isolated-memfd-seals",
        spec: "§1.2",
        run: isolated_memfd_seals,
    },
    Check {
        name: "trust.accelerated-table-fd",
        spec: "§1.2",
        run: accelerated_table_fd,
    },
    Check {
        name: "trust.refused-fds-closed",
        spec: "§2.1",
        run: refused_fds_closed,
    },
    Check {
        name: "trust.limits",
        spec: "§1.2",
        run: limits,
    },
    Check {
        name: "trust.sessions-independent",
        spec: "§1, §1.2",
        run: sessions_independent,
    },
    Check {
        name: "trust.disconnect-in-a-transaction",
        spec: "§9",
        run: disconnect_in_a_transaction,
    },
];

fn isolated_memfd_seals(peer: &Peer) -> Checked {
    let conn = peer.session(MODE_ISOLATED)?;
    let unsealed = memfd(page(), false)?;
    conn.call_fds(MEM_ADD, &region(1, 0, page()), &[unsealed.as_fd()])?
        .error(EPERM)?;
    let short = memfd(page(), true)?;
    conn.call_fds(MEM_ADD, &region(1, 0, 2 * page()), &[short.as_fd()])?
        .error(EINVAL)?;
    let path = std::env::temp_dir().join(format!("tce-conformance-{}", std::process::id()));
    let file = std::fs::File::create(&path).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_file(&path);
    file.set_len(page()).map_err(|e| e.to_string())?;
    conn.call_fds(MEM_ADD, &region(1, 0, page()), &[file.as_fd()])?
        .error(EPERM)?;
    // A table fd: the same seal is required.
    let mut fe = peer.front_end()?;
    conn.call_fds(MEM_ADD, &fe.mem_add(0), &[fe.ram_fd()])?
        .ok()?;
    let group = fe.group(1, 0, 1)?;
    conn.call_fds(GROUP_ADD, &group_add(1, 0, 1), &[group.as_fd()])?
        .ok()?;
    let table = fe.table(1, 0, 0, 64, true)?;
    conn.call_fds(TABLE_ADD, &table, &[unsealed.as_fd()])?
        .error(EPERM)?;
    Ok(())
}

fn accelerated_table_fd(peer: &Peer) -> Checked {
    let (conn, mut fe) = accelerated::start(peer, ACCELERATED)?;
    accelerated::add_group(&conn, &mut fe, 1)?.last.ok()?;
    let table = fe.table(1, 0, 0, 64, false)?;
    let not_kvm = memfd(4096, true)?;
    conn.call_fds(TABLE_ADD, &table, &[not_kvm.as_fd()])?
        .error(EBADF)?;
    // The KVM table holds 64 entries; the request names two host pages of them.
    let mut more = table.clone();
    more[24..32].copy_from_slice(&(2 * page() / 8).to_le_bytes());
    conn.call_fds(TABLE_ADD, &more, &[fe.table_fd(1)])?
        .error(EINVAL)?;
    conn.call_fds(TABLE_ADD, &table, &[fe.table_fd(1)])?.ok()?;
    Ok(())
}

fn open_fds(pid: u32) -> Result<usize, Failure> {
    match std::fs::read_dir(format!("/proc/{pid}/fd")) {
        Ok(dir) => Ok(dir.count()),
        Err(e) => Err(Failure::Skip(format!(
            "cannot count the fds of the session's process {pid}: {e}"
        ))),
    }
}

fn refused_fds_closed(peer: &Peer) -> Checked {
    let conn = peer.session(MODE_ISOLATED)?;
    let worker = super::worker_pid(&conn)?;
    let before = open_fds(worker)?;
    let fds: Vec<_> = (0..3)
        .map(|_| memfd(4096, true))
        .collect::<Result<_, _>>()?;
    let fds: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
    let unsealed = memfd(page(), false)?;
    conn.call_fds(GET_FEATURES, &[], &fds[..1])?.error(EBADF)?;
    conn.call_fds(GROUP_ADD, &group_add(1, 0, 1), &fds[..2])?
        .error(EBADF)?;
    conn.call_fds(MEM_ADD, &region(1, 0, page()), &[unsealed.as_fd()])?
        .error(EPERM)?;
    conn.call_fds(
        TABLE_ADD,
        &Le::new()
            .u32(1)
            .u32(9)
            .u32(1)
            .u32(12)
            .u64(0)
            .u64(64)
            .bytes(),
        &fds[..1],
    )?
    .error(ENOENT)?;
    let after = open_fds(worker)?;
    ensure!(
        after == before,
        "the session's process had {before} fds before the refused requests and {after} after"
    );
    Ok(())
}

fn limits(peer: &Peer) -> Checked {
    let conn = peer.session(ACCELERATED)?;
    let status = status_page(&conn, 0)?;
    let limits = &status["daemon"]["limits"];
    let regions = limits["regions"]
        .as_u64()
        .ok_or("daemon.limits.regions is missing")?;
    ensure!(
        limits["groups"].is_u64() && limits["tables"].is_u64(),
        "daemon.limits lacks groups or tables: {limits}"
    );
    ensure!(
        regions <= 4096,
        "daemon.limits.regions is {regions}: too many to check here"
    );
    let shift = page().trailing_zeros();
    let add = |n: u64| {
        let mut payload = region(n as u32, n * page(), page());
        payload[4..8].copy_from_slice(&shift.to_le_bytes());
        conn.call(MEM_ADD, &payload)
    };
    for n in 0..regions {
        add(n)?.ok()?;
    }
    add(regions)?.error(ENOSPC)?;
    Ok(())
}

fn sessions_independent(peer: &Peer) -> Checked {
    let conn = peer.session(MODE_ISOLATED)?;
    let ram = memfd(page(), true)?;
    conn.call_fds(MEM_ADD, &region(1, 0, page()), &[ram.as_fd()])?
        .ok()?;
    let before = own_session(&conn)?;
    // Others: a broken frame, garbage, a refused request, and one that pipelines requests and
    // never reads its replies.
    let broken = peer.connect()?;
    broken.send(&frame(GET_FEATURES, 2, &[]))?;
    let garbage = peer.connect()?;
    garbage.send(&[0xff; 4096])?;
    let refused = peer.connect()?;
    refused
        .call(MEM_REMOVE, &region(1, 0, page()))?
        .error(EPROTO)?;
    let stalled = peer.connect()?;
    stalled
        .stream
        .set_nonblocking(true)
        .map_err(|e| e.to_string())?;
    let burst: Vec<u8> = (0..1024).flat_map(|_| request(GET_FEATURES, &[])).collect();
    for _ in 0..1000 {
        if std::io::Write::write(&mut &stalled.stream, &burst).is_err() {
            break;
        }
    }
    // The first session is served, unchanged.
    conn.call(GET_FEATURES, &[])?.ok()?;
    conn.call(MEM_REMOVE, &region(2, 0, page()))?
        .error(ENOENT)?;
    let after = own_session(&conn)?;
    ensure!(
        (after["regions"].clone(), after["phase"].clone())
            == (before["regions"].clone(), before["phase"].clone()),
        "the session changed while others misbehaved: before {before}, after {after}"
    );
    conn.call(MEM_REMOVE, &region(1, 0, page()))?.ok()?;
    Ok(())
}

fn disconnect_in_a_transaction(peer: &Peer) -> Checked {
    let conn = peer.session(ACCELERATED)?;
    let reply = conn.call(GROUP_ADD, &group_add(1, 0, 1))?;
    ensure!(
        reply.flags & REPLY_OPS != 0,
        "GROUP_ADD opened no transaction"
    );
    let me = own_session(&conn)?["id"].clone();
    drop(conn);
    wait_session_gone(peer, &me)?;
    peer.connect()?.call(WINDOW_QUERY, &id(0))?.error(EPROTO)?;
    Ok(())
}
