//! Isolated mode on the model kernel: the back-end owns the container and makes every call
//! itself, on guest RAM it maps from the front-end's memfds; no reply carries an operation.

use std::os::fd::AsFd;

use super::front_end::{FrontEnd, RAM};
use super::{eeh, group_add, id, own_session, tce_inline, wait_session_gone, Peer};
use crate::conformance::wire::*;
use crate::conformance::{Check, Checked, Failure};
use crate::ensure;
use crate::kernel::model::Mm;

pub const CHECKS: &[Check<Peer>] = &[
    Check {
        name: "isolated.every-request",
        spec: "§1.1, §7",
        run: every_request,
    },
    Check {
        name: "isolated.tce-update-refusals",
        spec: "§7.8",
        run: tce_update_refusals,
    },
    Check {
        name: "isolated.teardown",
        spec: "§9",
        run: teardown,
    },
];

const ENTRIES: u64 = 64;
const H_PARAMETER: i64 = -4;

/// An isolated session with region 0, group 1 in container 0, and table 1 with its window.
fn start(peer: &Peer, features: u64) -> Result<(Conn, FrontEnd), Failure> {
    let conn = peer.session(MODE_ISOLATED | features)?;
    let mut fe = peer.front_end()?;
    let region = fe.mem_add(0);
    conn.call_fds(MEM_ADD, &region, &[fe.ram_fd()])?.ok()?;
    let group = fe.group(1, 0, 1)?;
    conn.call_fds(GROUP_ADD, &group_add(1, 0, 1), &[group.as_fd()])?
        .ok()?;
    let table = fe.table(1, 0, 0, ENTRIES, true)?;
    conn.call_fds(TABLE_ADD, &table, &[fe.table_fd(1)])?.ok()?;
    conn.call(WINDOW_CREATE, &id(1))?.ok()?;
    Ok((conn, fe))
}

fn mapped(fe: &FrontEnd, index: u64) -> Result<Option<Mm>, String> {
    let entry = fe
        .model()
        .iommu_entry(1, index << 12)
        .map_err(|e| e.to_string())?;
    Ok(entry.map(|e| e.mm))
}

fn every_request(peer: &Peer) -> Checked {
    let (conn, mut fe) = start(peer, FEATURE_EEH)?;
    let worker = super::worker_pid(&conn)?;
    let pinned = fe.mm(Some(worker))?.pinned_pages << 12;
    ensure!(
        pinned == RAM,
        "the back-end's mm pinned {pinned} bytes; the RAM is {RAM}"
    );
    ensure!(
        fe.mm(None)?.pinned_pages == 0,
        "the front-end's mm pinned memory in isolated mode"
    );
    let query = conn.call(WINDOW_QUERY, &id(0))?.ok()?;
    ensure!(
        query.body.len() == 24,
        "WINDOW_QUERY's body is {} bytes",
        query.body.len()
    );
    ensure!(
        query.body_u64(16)? == RAM,
        "WINDOW_QUERY's ram_size is {}",
        query.body_u64(16)?
    );
    ensure!(
        query.body_u64(8)? & 1 << 12 != 0,
        "WINDOW_QUERY offers no 4 KiB pages"
    );
    conn.call(WINDOW_CREATE, &id(1))?.error(EEXIST)?;
    // INLINE, SHARED (read from the table the front-end wrote), STUFF.
    let reply = conn
        .call(TCE_UPDATE, &tce_inline(1, 0, &[0x1000 | 3, 0x2000 | 1]))?
        .ok()?;
    ensure!(
        reply.body_u32(8)? == 2,
        "processed {} of 2",
        reply.body_u32(8)?
    );
    ensure!(
        mapped(&fe, 0)? == Some(Mm(worker)),
        "entry 0 is not mapped from the back-end's mm"
    );
    ensure!(
        fe.tables[&1].mapping.write_u64(4, 0x5000 | 3),
        "cannot write the table"
    );
    let shared = Le::new().u32(1).u32(0).u64(4).u32(1).u32(0).bytes();
    conn.call(TCE_UPDATE, &shared)?.ok()?;
    ensure!(
        mapped(&fe, 4)?.is_some(),
        "the SHARED entry 4 is not mapped"
    );
    let stuff = Le::new().u32(1).u32(2).u64(0).u32(8).u32(0).u64(0).bytes();
    conn.call(TCE_UPDATE, &stuff)?.ok()?;
    ensure!(
        mapped(&fe, 0)?.is_none() && mapped(&fe, 4)?.is_none(),
        "STUFF 0 left entries mapped"
    );
    let state = conn.call(EEH_OP, &eeh(0, 4))?.ok()?;
    ensure!(
        state.body.len() == 8,
        "EEH_OP's body is {} bytes",
        state.body.len()
    );
    let reset = Le::new().u32(0).u32(1).u32(1).u32(0).bytes();
    ensure!(
        conn.call(WINDOW_RESET, &reset)?.ok()?.body.len() == 16,
        "WINDOW_RESET's body"
    );
    conn.call(TABLE_REMOVE, &id(1))?.error(EBUSY)?;
    conn.call(WINDOW_REMOVE, &id(1))?.ok()?;
    conn.call(TABLE_REMOVE, &id(1))?.ok()?;
    conn.call(GROUP_REMOVE, &id(1))?.ok()?;
    let left = fe.mm(Some(worker))?;
    ensure!(
        left.pinned_pages == 0 && left.prereg_regions == 0,
        "the last group went and the back-end still pins {} pages",
        left.pinned_pages
    );
    let mut wrong = fe.mem_add(0);
    wrong[16] ^= 0x10;
    conn.call(MEM_REMOVE, &wrong)?.error(EINVAL)?;
    conn.call(MEM_REMOVE, &fe.mem_add(0))?.ok()?;
    ensure!(
        own_session(&conn)?["regions"] == 0,
        "a region is left after MEM_REMOVE"
    );
    Ok(())
}

fn tce_update_refusals(peer: &Peer) -> Checked {
    let (conn, fe) = start(peer, 0)?;
    let refused = |payload: Vec<u8>, what: &str| -> Checked {
        let reply = conn
            .call(TCE_UPDATE, &payload)?
            .error(EINVAL)
            .map_err(|e| format!("{what}: {e}"))?;
        let h_status = reply.body_u64(0)? as i64;
        ensure!(
            h_status == H_PARAMETER && reply.body.len() == 16,
            "{what}: h_status {h_status}, body {} bytes",
            reply.body.len()
        );
        Ok(())
    };
    refused(
        tce_inline(1, ENTRIES, &[0x1000 | 3]),
        "an index past the table",
    )?;
    refused(
        tce_inline(1, 0, &[(RAM + 0x1000) | 3]),
        "an address outside guest RAM",
    )?;
    let stuff = Le::new()
        .u32(1)
        .u32(2)
        .u64(0)
        .u32(2)
        .u32(0)
        .u64(0x1000 | 3)
        .bytes();
    refused(stuff, "STUFF with permission bits")?;
    // A refused update leaves no entry it names mapped (§7.8): entry 1 was mapped before.
    conn.call(TCE_UPDATE, &tce_inline(1, 1, &[0x3000 | 3]))?
        .ok()?;
    refused(
        tce_inline(1, 0, &[0x1000 | 3, 0x2000 | 3, (RAM + 0x1000) | 3]),
        "a bad third entry",
    )?;
    ensure!(
        mapped(&fe, 1)?.is_none(),
        "entry 1 stays mapped after the refused update named it"
    );
    Ok(())
}

fn teardown(peer: &Peer) -> Checked {
    let (conn, mut fe) = start(peer, 0)?;
    conn.call(TCE_UPDATE, &tce_inline(1, 0, &[0x1000 | 3]))?
        .ok()?;
    let me = own_session(&conn)?["id"].clone();
    let worker = super::worker_pid(&conn)?;
    drop(conn);
    // The session goes from GET_STATUS, and with it what it pinned and mapped.
    wait_session_gone(peer, &me)?;
    ensure!(
        mapped(&fe, 0)?.is_none(),
        "the IOMMU still maps the closed session's entry"
    );
    let left = fe.mm(Some(worker)).map(|mm| mm.pinned_pages).unwrap_or(0);
    ensure!(
        left == 0,
        "the closed session's process still pins {left} pages"
    );
    // The group is free again: a new session takes it.
    let conn = peer.session(MODE_ISOLATED)?;
    conn.call_fds(MEM_ADD, &fe.mem_add(0), &[fe.ram_fd()])?
        .ok()?;
    conn.call_fds(GROUP_ADD, &group_add(1, 0, 1), &[fe.group_fd(1)])?
        .ok()?;
    Ok(())
}
