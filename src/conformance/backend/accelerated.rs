//! Accelerated mode on the model kernel: the front-end executes the owner operations, each
//! checked against §6.3; every forward operation's failure is rolled back (§6); the KVM
//! association lets the guest's hypercalls complete in the kernel (§7.7).

use super::front_end::{FrontEnd, Inject, Transaction, RAM};
use super::{eeh, group_add, id, own_session, tce_inline, Peer};
use crate::conformance::wire::*;
use crate::conformance::{Check, Checked, Failure};
use crate::ensure;
use crate::kernel::model::{HcallOutcome, H_PUT_TCE};

pub const CHECKS: &[Check<Peer>] = &[
    Check {
        name: "accelerated.group-add",
        spec: "§6.3, §7.4, §7.5",
        run: group_add_check,
    },
    Check {
        name: "accelerated.window-create",
        spec: "§6.3, §7.7",
        run: window_create,
    },
    Check {
        name: "accelerated.tce-update",
        spec: "§6.3, §7.8",
        run: tce_update,
    },
    Check {
        name: "accelerated.fds-by-mode",
        spec: "§2.3",
        run: fds_by_mode,
    },
    Check {
        name: "accelerated.eeh",
        spec: "§6.3, §7.9",
        run: eeh_check,
    },
    Check {
        name: "accelerated.take-down",
        spec: "§6.3, §7.5, §7.7",
        run: take_down,
    },
    Check {
        name: "accelerated.rollback-group-add",
        spec: "§6",
        run: rollback_group_add,
    },
    Check {
        name: "accelerated.rollback-window-create",
        spec: "§6, §7.7",
        run: rollback_window_create,
    },
    Check {
        name: "accelerated.rollback-window-remove",
        spec: "§6, §7.7",
        run: rollback_window_remove,
    },
    Check {
        name: "accelerated.rollback-mem-add",
        spec: "§6, §7.4",
        run: rollback_mem_add,
    },
    Check {
        name: "accelerated.tce-update-failure",
        spec: "§7.8",
        run: tce_update_failure,
    },
    Check {
        name: "accelerated.rebuild",
        spec: "§7.11",
        run: rebuild,
    },
];

pub const ACCELERATED: u64 = MODE_ACCELERATED | FEATURE_FDS_BY_MODE;
/// Entries of every table here (4 KiB pages).
const ENTRIES: u64 = 64;
/// The hypercall status of a failed update (§7.8).
const H_HARDWARE: i64 = -1;
/// The bus offset of a second table's window: where sPAPR hosts place a dynamic window.
const SECOND_WINDOW: u64 = 1 << 59;

/// The host's page shift, which `MEM_ADD` names with `FDS_BY_MODE`.
fn page_shift() -> u32 {
    rustix::param::page_size().trailing_zeros()
}

/// A session and its front-end with guest RAM registered in the back-end.
pub fn start(peer: &Peer, features: u64) -> Result<(Conn, FrontEnd), Failure> {
    let conn = peer.session(features)?;
    let mut fe = peer.front_end()?;
    let payload = fe.mem_add(page_shift());
    conn.call(MEM_ADD, &payload)?.ok()?;
    Ok((conn, fe))
}

/// `GROUP_ADD` of group `group` (IOMMU group `group`) to container 0, run to its end.
pub fn add_group(conn: &Conn, fe: &mut FrontEnd, group: u32) -> Result<Transaction, String> {
    add_group_to(conn, fe, group, 0)
}

/// `GROUP_ADD` of group `group` (IOMMU group `group`) to `container`, run to its end.
fn add_group_to(
    conn: &Conn,
    fe: &mut FrontEnd,
    group: u32,
    container: u32,
) -> Result<Transaction, String> {
    fe.group(group, container, group)?;
    let payload = group_add(group, container, group);
    fe.transact(conn, GROUP_ADD, &payload, &[], Inject::None)?
        .in_scope()
}

/// `TABLE_ADD` of a KVM table and its `WINDOW_CREATE`, run to its end.
pub fn add_window(conn: &Conn, fe: &mut FrontEnd, table: u32, bus: u64) -> Result<Reply, String> {
    let payload = fe.table(table, 0, bus, ENTRIES, false)?;
    conn.call_fds(TABLE_ADD, &payload, &[fe.table_fd(table)])?
        .ok()?;
    let done = fe.transact(conn, WINDOW_CREATE, &id(table), &[], Inject::None)?;
    done.in_scope()?.last.ok()
}

/// Whether KVM completes the guest's `H_PUT_TCE` on `table`'s window in the kernel, which it
/// does only for a table associated with the container's groups (§1.1). The entry is cleared,
/// so the probe changes nothing.
fn in_kernel(fe: &FrontEnd, table: u32) -> Result<bool, String> {
    let t = &fe.tables[&table];
    match fe.vm.hcall(H_PUT_TCE, [t.liobn, t.bus_offset, 0, 0]) {
        Ok(HcallOutcome::Completed { ret: 0, .. }) => Ok(true),
        Ok(HcallOutcome::Completed { ret, .. }) => Err(format!("H_PUT_TCE returned {ret}")),
        Ok(HcallOutcome::Exit) => Ok(false),
        Err(e) => Err(format!("the model refused the hypercall: {e}")),
    }
}

fn group_add_check(peer: &Peer) -> Checked {
    let (conn, mut fe) = start(peer, ACCELERATED)?;
    add_group(&conn, &mut fe, 1)?.last.ok()?;
    // The front-end's mm registered the RAM; the back-end's holds nothing.
    let mine = fe.mm(None)?;
    ensure!(
        (mine.pinned_pages << 12, mine.prereg_regions) == (RAM, 1),
        "the front-end's mm has {} pinned bytes in {} regions; the RAM is {RAM} bytes",
        mine.pinned_pages << 12,
        mine.prereg_regions
    );
    let worker = fe.mm(Some(super::worker_pid(&conn)?))?;
    ensure!(
        worker.pinned_pages == 0 && worker.locked_vm_pages == 0,
        "the back-end's mm pinned {} pages in accelerated mode",
        worker.pinned_pages
    );
    let me = own_session(&conn)?;
    ensure!(
        me["groups"][0]["attached"] == true,
        "GET_STATUS: {}",
        me["groups"]
    );
    Ok(())
}

fn window_create(peer: &Peer) -> Checked {
    let (conn, mut fe) = start(peer, ACCELERATED)?;
    add_group(&conn, &mut fe, 1)?.last.ok()?;
    let created = add_window(&conn, &mut fe, 1, 0)?;
    ensure!(
        created.body.len() == 16,
        "WINDOW_CREATE's body is {} bytes",
        created.body.len()
    );
    ensure!(
        created.body_u64(0)? == 0 && created.body_u32(8)? == 12,
        "WINDOW_CREATE: start {:#x}, page shift {}; the table asks for 0 and 12",
        created.body_u64(0)?,
        created.body_u32(8)?
    );
    ensure!(
        in_kernel(&fe, 1)?,
        "H_PUT_TCE on the new window exits to the front-end: no KVM association"
    );
    Ok(())
}

fn tce_update(peer: &Peer) -> Checked {
    let (conn, mut fe) = start(peer, ACCELERATED)?;
    add_group(&conn, &mut fe, 1)?.last.ok()?;
    add_window(&conn, &mut fe, 1, 0)?;
    let update = tce_inline(1, 2, &[0x1000 | 3, 0x2000 | 3]);
    let done = fe
        .transact(&conn, TCE_UPDATE, &update, &[], Inject::None)?
        .in_scope()?;
    let last = done.last.ok()?;
    ensure!(
        last.body_u64(0)? == 0 && last.body_u32(8)? == 2,
        "TCE_UPDATE: h_status {}, processed {}",
        last.body_u64(0)? as i64,
        last.body_u32(8)?
    );
    let entry = fe
        .model()
        .iommu_entry(1, 2 << 12)
        .map_err(|e| e.to_string())?;
    ensure!(
        entry.is_some(),
        "the IOMMU has no entry for index 2 after the update"
    );
    let stuff = Le::new()
        .u32(1)
        .u32(2)
        .u64(0)
        .u32(ENTRIES as u32)
        .u32(0)
        .u64(0)
        .bytes();
    fe.transact(&conn, TCE_UPDATE, &stuff, &[], Inject::None)?
        .in_scope()?
        .last
        .ok()?;
    let entry = fe
        .model()
        .iommu_entry(1, 2 << 12)
        .map_err(|e| e.to_string())?;
    ensure!(
        entry.is_none(),
        "the IOMMU still maps index 2 after H_STUFF_TCE cleared it"
    );
    Ok(())
}

fn fds_by_mode(peer: &Peer) -> Checked {
    let conn = peer.session(ACCELERATED)?;
    let mut fe = peer.front_end()?;
    let payload = fe.mem_add(page_shift());
    conn.call_fds(MEM_ADD, &payload, &[fe.ram_fd()])?
        .error(EBADF)?;
    conn.call(MEM_ADD, &fe.mem_add(0))?.error(EINVAL)?;
    conn.call(MEM_ADD, &payload)?.ok()?;
    fe.group(1, 0, 1)?;
    conn.call_fds(GROUP_ADD, &group_add(1, 0, 1), &[fe.group_fd(1)])?
        .error(EBADF)?;
    fe.transact(&conn, GROUP_ADD, &group_add(1, 0, 1), &[], Inject::None)?
        .in_scope()?
        .last
        .ok()?;
    let table = fe.table(1, 0, 0, ENTRIES, false)?;
    conn.call(TABLE_ADD, &table)?.error(EBADF)?;
    // Isolated mode: the fds still travel.
    let isolated = peer.session(MODE_ISOLATED | FEATURE_FDS_BY_MODE)?;
    isolated.call(MEM_ADD, &payload)?.error(EBADF)?;
    Ok(())
}

fn eeh_check(peer: &Peer) -> Checked {
    let (conn, mut fe) = start(peer, ACCELERATED | FEATURE_EEH)?;
    add_group(&conn, &mut fe, 1)?.last.ok()?;
    for op in [1, 4] {
        let done = fe
            .transact(&conn, EEH_OP, &eeh(0, op), &[], Inject::None)?
            .in_scope()?;
        let forward = done.forward();
        ensure!(
            forward.len() == 1,
            "EEH_OP {op} asked for {} operations, not the one EEH_PE_OP",
            forward.len()
        );
        let last = done.last.ok()?;
        ensure!(
            last.body.len() == 8,
            "EEH_OP's body is {} bytes",
            last.body.len()
        );
    }
    let without = peer.session(ACCELERATED)?;
    without.call(EEH_OP, &eeh(0, 1))?.error(ENOTSUP)?;
    Ok(())
}

/// Everything taken down again, each request's operations in scope: the windows (one reset to
/// the default), the table, the last group (its memory unregistered, its container closed) and
/// the region.
fn take_down(peer: &Peer) -> Checked {
    let (conn, mut fe) = start(peer, ACCELERATED)?;
    add_group(&conn, &mut fe, 1)?.last.ok()?;
    add_window(&conn, &mut fe, 1, 0)?;
    add_window(&conn, &mut fe, 2, SECOND_WINDOW)?;
    let mapped = tce_inline(2, 0, &[0x1000 | 3]);
    fe.transact(&conn, TCE_UPDATE, &mapped, &[], Inject::None)?
        .in_scope()?
        .last
        .ok()?;
    let reset = Le::new().u32(0).u32(1).u32(1).u32(0).bytes();
    let done = fe
        .transact(&conn, WINDOW_RESET, &reset, &[], Inject::None)?
        .in_scope()?;
    ensure!(
        done.last.clone().ok()?.body.len() == 16,
        "WINDOW_RESET's body"
    );
    ensure!(
        in_kernel(&fe, 1)?,
        "the reset default window is not served in the kernel"
    );
    ensure!(
        fe.model()
            .iommu_entry(1, SECOND_WINDOW)
            .map_err(|e| e.to_string())?
            .is_none(),
        "the reset left the second window's entry mapped"
    );
    conn.call(TABLE_REMOVE, &id(1))?.error(EBUSY)?;
    let done = fe.transact(&conn, WINDOW_REMOVE, &id(1), &[], Inject::None)?;
    done.in_scope()?.last.ok()?;
    for table in [1, 2] {
        conn.call(TABLE_REMOVE, &id(table))?.ok()?;
    }
    let done = fe.transact(&conn, GROUP_REMOVE, &id(1), &[], Inject::None)?;
    done.in_scope()?.last.ok()?;
    fe.forget_group(1);
    let mine = fe.mm(None)?;
    ensure!(
        mine.pinned_pages == 0 && mine.prereg_regions == 0,
        "after the last GROUP_REMOVE the front-end's mm still pins {} pages",
        mine.pinned_pages
    );
    ensure!(
        fe.group_status()? == [1],
        "the group is still attached: {:?}",
        fe.group_status()?
    );
    conn.call(MEM_REMOVE, &fe.mem_add(page_shift()))?.ok()?;
    let me = own_session(&conn)?;
    ensure!(
        me["regions"] == 0 && me["groups"].as_array().is_some_and(Vec::is_empty),
        "objects left: {me}"
    );
    Ok(())
}

/// What a failed request must leave as it found: the front-end's pinned memory and groups, the
/// back-end's account of the session, and which windows KVM serves in the kernel.
fn snapshot(conn: &Conn, fe: &FrontEnd) -> Result<String, String> {
    let mm = fe.mm(None)?;
    let me = own_session(conn)?;
    let mut probes = Vec::new();
    for table in me["tables"].as_array().into_iter().flatten() {
        if table["has_window"] == true {
            let id = table["id"].as_u64().unwrap_or(0) as u32;
            probes.push((id, in_kernel(fe, id)?));
        }
    }
    Ok(format!(
        "pinned {} prereg {} groups {:?} | session groups {} tables {} windows {} | in kernel {:?}",
        mm.pinned_pages,
        mm.prereg_regions,
        fe.group_status()?,
        me["groups"],
        me["tables"],
        me["windows"],
        probes
    ))
}

/// For each forward operation of the request in turn, a fresh session prepared by `setup`
/// reports it failed with `-EIO`: the final reply says so and names it, the rollback asks for
/// operations in scope, and the state afterwards is the state before.
fn rollback_each(
    peer: &Peer,
    setup: fn(&Conn, &mut FrontEnd) -> Result<Vec<u8>, String>,
    request: u32,
) -> Checked {
    for index in 0.. {
        let (conn, mut fe) = start(peer, ACCELERATED)?;
        let payload = setup(&conn, &mut fe)?;
        let before = snapshot(&conn, &fe)?;
        let done = fe.transact(&conn, request, &payload, &[], Inject::FailAt(index))?;
        let forward = done.forward();
        let done = done.in_scope()?;
        if index >= forward.len() {
            ensure!(
                index > 0,
                "{} asked for no operation",
                request_name(request)
            );
            done.last.ok()?;
            return Ok(());
        }
        let failed = forward[index];
        if done.last.status == 0 && done.last.flags == 0 {
            // The back-end recovered from the failure by itself (e.g. it tried another
            // TCE_CREATE): the request succeeded, which is not a rollback to check.
            continue;
        }
        let last = done
            .last
            .clone()
            .error(EIO)
            .map_err(|e| format!("{failed} failed: {e}"))?;
        ensure!(
            last.text.contains(&op_name(failed.kind)),
            "{failed} failed; the final text does not name it: {:?}",
            last.text
        );
        let after = snapshot(&conn, &fe)?;
        ensure!(
            after == before,
            "{} with its operation {index} ({failed}) failed: the state before was\n  {before}\n\
             and after the rollback ({:?}) it is\n  {after}",
            request_name(request),
            done.rollback()
                .iter()
                .map(|op| op_name(op.kind))
                .collect::<Vec<_>>()
        );
    }
    Ok(())
}

fn rollback_group_add(peer: &Peer) -> Checked {
    fn setup(conn: &Conn, fe: &mut FrontEnd) -> Result<Vec<u8>, String> {
        // A window already exists, so the new group must be associated with its table.
        add_group(conn, fe, 1)?.last.ok()?;
        add_window(conn, fe, 1, 0)?;
        fe.group(2, 0, 2)?;
        Ok(group_add(2, 0, 2))
    }
    rollback_each(peer, setup, GROUP_ADD)
}

fn rollback_window_create(peer: &Peer) -> Checked {
    fn setup(conn: &Conn, fe: &mut FrontEnd) -> Result<Vec<u8>, String> {
        add_group(conn, fe, 1)?.last.ok()?;
        add_group(conn, fe, 2)?.last.ok()?;
        let payload = fe.table(1, 0, 0, ENTRIES, false)?;
        conn.call_fds(TABLE_ADD, &payload, &[fe.table_fd(1)])?
            .ok()?;
        Ok(id(1))
    }
    rollback_each(peer, setup, WINDOW_CREATE)
}

fn rollback_window_remove(peer: &Peer) -> Checked {
    fn setup(conn: &Conn, fe: &mut FrontEnd) -> Result<Vec<u8>, String> {
        // Two windows: removing one re-associates the group with the other (§7.7).
        add_group(conn, fe, 1)?.last.ok()?;
        add_window(conn, fe, 1, 0)?;
        add_window(conn, fe, 2, SECOND_WINDOW)?;
        Ok(id(1))
    }
    rollback_each(peer, setup, WINDOW_REMOVE)
}

/// A region registered in two containers: a failed registration in one is undone in the other.
fn rollback_mem_add(peer: &Peer) -> Checked {
    fn setup(conn: &Conn, fe: &mut FrontEnd) -> Result<Vec<u8>, String> {
        add_group_to(conn, fe, 1, 0)?.last.ok()?;
        add_group_to(conn, fe, 2, 1)?.last.ok()?;
        fe.second_region(page_shift())
    }
    rollback_each(peer, setup, MEM_ADD)
}

/// A `TCE_UPDATE` whose `MAP_DMA` fails: the hardware keeps no entry the update names, since
/// the guest's table shows the new ones (§7.8), and the guest hears `H_HARDWARE`.
fn tce_update_failure(peer: &Peer) -> Checked {
    let (conn, mut fe) = start(peer, ACCELERATED)?;
    add_group(&conn, &mut fe, 1)?.last.ok()?;
    add_window(&conn, &mut fe, 1, 0)?;
    let mapped = tce_inline(1, 0, &[0x1000 | 3, 0x2000 | 3]);
    let done = fe.transact(&conn, TCE_UPDATE, &mapped, &[], Inject::None)?;
    done.in_scope()?.last.ok()?;
    // The same entries to other pages, the first MAP_DMA failing.
    let update = tce_inline(1, 0, &[0x5000 | 3, 0x6000 | 3]);
    let done = fe.transact(&conn, TCE_UPDATE, &update, &[], Inject::FailFirst(MAP_DMA))?;
    let done = done.in_scope()?;
    ensure!(
        done.forward().iter().any(|op| op.kind == MAP_DMA),
        "the update asked for no MAP_DMA"
    );
    let last = done.last.clone().error(EIO)?;
    ensure!(
        last.body.len() == 16 && last.body_u64(0)? as i64 == H_HARDWARE,
        "the failed update's body: h_status {:?}, not H_HARDWARE",
        last.body_u64(0).map(|h| h as i64)
    );
    for entry in 0..2u64 {
        let mapped = fe
            .model()
            .iommu_entry(1, entry << 12)
            .map_err(|e| e.to_string())?;
        ensure!(
            mapped.is_none(),
            "entry {entry} is still mapped after its update failed; the operations: {:?}",
            done.batches
        );
    }
    Ok(())
}

fn rebuild(peer: &Peer) -> Checked {
    let (first, mut fe) = start(peer, ACCELERATED | FEATURE_REBUILD)?;
    add_group(&first, &mut fe, 1)?.last.ok()?;
    add_window(&first, &mut fe, 1, 0)?;
    drop(first);
    // A new session learns the kernel state the front-end kept, without making any of it.
    let conn = peer.session(ACCELERATED | FEATURE_REBUILD)?;
    conn.call(MEM_ADD, &fe.mem_add(page_shift()))?.ok()?;
    let adopted = fe.transact(&conn, GROUP_ADOPT, &group_add(1, 0, 1), &[], Inject::None)?;
    adopted.in_scope()?.last.ok()?;
    let payload = Le::new()
        .u32(1)
        .u32(0)
        .u32(0x8000_0001)
        .u32(12)
        .u64(0)
        .u64(ENTRIES)
        .bytes();
    conn.call_fds(TABLE_ADD, &payload, &[fe.table_fd(1)])?
        .ok()?;
    let window = conn.call(WINDOW_ADOPT, &id(1))?.ok()?;
    ensure!(
        window.body.len() == 16 && window.body_u64(0)? == 0,
        "WINDOW_ADOPT's body: {:?}",
        window.body
    );
    ensure!(
        in_kernel(&fe, 1)?,
        "the adopted window is no longer served in the kernel"
    );
    let me = own_session(&conn)?;
    ensure!(
        me["tables"][0]["has_window"] == true,
        "GET_STATUS: {}",
        me["tables"]
    );
    // Without REBUILD, and in isolated mode, adopting is refused.
    let plain = peer.session(ACCELERATED)?;
    plain
        .call(GROUP_ADOPT, &group_add(1, 0, 1))?
        .error(ENOTSUP)?;
    Ok(())
}
