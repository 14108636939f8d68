//! The session state machine (§8) and the shape of a transaction (§6).

use std::os::fd::AsFd;

use super::framing::memfd;
use super::{eeh, group_add, id, own_session, page, region, tce_inline, Peer};
use crate::conformance::wire::*;
use crate::conformance::{Check, Checked, Failure};
use crate::ensure;

pub const CHECKS: &[Check<Peer>] = &[
    Check {
        name: "state.before-set-features",
        spec: "§8",
        run: before_set_features,
    },
    Check {
        name: "state.ops-result-without-transaction",
        spec: "§6, §8",
        run: ops_result_without_transaction,
    },
    Check {
        name: "state.transaction-busy",
        spec: "§6, §8",
        run: transaction_busy,
    },
    Check {
        name: "state.ops-result-shape",
        spec: "§6, §7.10",
        run: ops_result_shape,
    },
    Check {
        name: "state.refused-operation",
        spec: "§6",
        run: refused_operation,
    },
];

/// A well-formed request of every state-bound kind, with the fd count it carries before
/// `SET_FEATURES` (§2.3): code, payload, fds.
fn state_bound_requests() -> Vec<(u32, Vec<u8>, usize)> {
    let region = region(1, 0, page());
    let table = Le::new()
        .u32(1)
        .u32(0)
        .u32(0x8000_0001)
        .u32(12)
        .u64(0)
        .u64(64)
        .bytes();
    let reset = Le::new().u32(0).u32(0).u32(0).u32(0).bytes();
    vec![
        (MEM_ADD, region.clone(), 1),
        (MEM_REMOVE, region, 0),
        (GROUP_ADD, group_add(1, 0, 1), 1),
        (GROUP_REMOVE, id(1), 0),
        (TABLE_ADD, table, 1),
        (TABLE_REMOVE, id(1), 0),
        (WINDOW_QUERY, id(0), 0),
        (WINDOW_CREATE, id(1), 0),
        (WINDOW_REMOVE, id(1), 0),
        (WINDOW_RESET, reset, 0),
        (TCE_UPDATE, tce_inline(1, 0, &[0]), 0),
        (EEH_OP, eeh(0, 1), 0),
        (GROUP_ADOPT, group_add(1, 0, 1), 1),
        (WINDOW_ADOPT, id(1), 0),
    ]
}

fn before_set_features(peer: &Peer) -> Checked {
    let conn = peer.connect()?;
    let fd = memfd(4096, true)?;
    for (code, payload, fds) in state_bound_requests() {
        let fds = if fds == 1 { vec![fd.as_fd()] } else { vec![] };
        conn.call_fds(code, &payload, &fds)?.error(EPROTO)?;
    }
    let result = ops_result(1, &[result_record(CONTAINER_OPEN, 0, [0; 4])]);
    conn.call(OPS_RESULT, &result)?.error(EPROTO)?;
    Ok(())
}

fn ops_result_without_transaction(peer: &Peer) -> Checked {
    for mode in [MODE_ISOLATED, MODE_ACCELERATED] {
        let conn = match peer.session(mode) {
            Err(Failure::Skip(_)) => continue,
            other => other?,
        };
        let result = ops_result(1, &[result_record(CONTAINER_OPEN, 0, [0; 4])]);
        conn.call(OPS_RESULT, &result)?.error(EPROTO)?;
    }
    Ok(())
}

/// An accelerated session with `FDS_BY_MODE` whose `GROUP_ADD` opened a transaction (the
/// back-end makes no call on the group in accelerated mode, so no kernel object is needed).
fn open_transaction(peer: &Peer) -> Result<(Conn, Reply), Failure> {
    let conn = peer.session(MODE_ACCELERATED | FEATURE_FDS_BY_MODE)?;
    let reply = conn.call(GROUP_ADD, &group_add(1, 0, 1))?;
    ensure!(
        reply.status == 0 && reply.flags == REPLY_OPS && !reply.ops.is_empty(),
        "an accelerated GROUP_ADD of a new container answered {} with flags {:#x}, \
         without owner operations: {:?}",
        status_name(reply.status),
        reply.flags,
        reply.text
    );
    Ok((conn, reply))
}

fn transaction_busy(peer: &Peer) -> Checked {
    let (conn, _) = open_transaction(peer)?;
    // Requests that need no feature beyond the mode, with the fds FDS_BY_MODE leaves them.
    for (code, payload, _) in state_bound_requests() {
        if matches!(code, EEH_OP | GROUP_ADOPT | WINDOW_ADOPT | TABLE_ADD) {
            continue;
        }
        let mut payload = payload;
        if code == MEM_ADD || code == MEM_REMOVE {
            payload[4..8].copy_from_slice(&16u32.to_le_bytes());
        }
        conn.call(code, &payload)?.error(EBUSY)?;
    }
    conn.call(SET_FEATURES, &MODE_ISOLATED.to_le_bytes())?
        .error(EBUSY)?;
    conn.call(GET_FEATURES, &[])?.ok()?;
    let me = own_session(&conn)?;
    ensure!(
        me["phase"] == "transaction",
        "phase {} with a transaction open",
        me["phase"]
    );
    Ok(())
}

fn ops_result_shape(peer: &Peer) -> Checked {
    let (conn, reply) = open_transaction(peer)?;
    let txn = reply.transaction;
    let first = reply.ops[0].kind;
    let successes = |n: usize| -> Vec<Vec<u8>> {
        reply
            .ops
            .iter()
            .cycle()
            .take(n)
            .map(|op| result_record(op.kind, 0, [0; 4]))
            .collect()
    };
    let cases = [
        (
            "a wrong transaction id",
            ops_result(txn.wrapping_add(1), &successes(1)),
        ),
        (
            "more results than operations",
            ops_result(txn, &successes(reply.ops.len() + 1)),
        ),
        (
            "a result of another kind",
            ops_result(txn, &[result_record(first % 18 + 1, 0, [0; 4])]),
        ),
    ];
    for (what, payload) in cases {
        let answer = conn.call(OPS_RESULT, &payload)?;
        ensure!(
            answer.status == -EINVAL && answer.flags == 0,
            "OPS_RESULT with {what} answered {} with flags {:#x}; the spec says -EINVAL",
            status_name(answer.status),
            answer.flags
        );
        conn.call(WINDOW_QUERY, &id(0))?
            .error(EBUSY)
            .map_err(|e| format!("after OPS_RESULT with {what}, the transaction is closed: {e}"))?;
    }
    Ok(())
}

fn refused_operation(peer: &Peer) -> Checked {
    let (conn, reply) = open_transaction(peer)?;
    let first = reply.ops[0].kind;
    let refused = ops_result(reply.transaction, &[result_record(first, -EPERM, [0; 4])]);
    let last = conn.call(OPS_RESULT, &refused)?.error(EPERM)?;
    ensure!(
        last.text.contains(&op_name(first)),
        "the final reply's text does not name the failed {}: {:?}",
        op_name(first),
        last.text
    );
    conn.call(OPS_RESULT, &refused)?.error(EPROTO)?;
    let me = own_session(&conn)?;
    ensure!(
        me["phase"] == "ready" && me["groups"].as_array().is_some_and(Vec::is_empty),
        "after the refused GROUP_ADD: {me}"
    );
    Ok(())
}
