//! The cases: on each connection the kit plays a back-end that breaks one rule, and the case
//! passes if the front-end does what PROTOCOL.md asks of it (§1.2 "what the front-end MUST
//! check of the back-end", §2.2, §3, §6).

use super::peer::{Event, OpResult, OpsResult, Peer, Request};
use crate::conformance::wire::{
    self, Op, Reply, EEH_PE_OP, EIO, EPERM, FEATURE_EEH, FEATURE_FDS_BY_MODE, FLAG_REPLY,
    GET_STATUS, MAX_PAYLOAD, MODE_ACCELERATED, MODE_ISOLATED, OPS_RESULT, REPLY_FIXED, REPLY_OPS,
    REPLY_ROLLBACK, SET_FEATURES, VERSION_1,
};
use crate::conformance::Checked;
use crate::ensure;

/// One way of playing a back-end, for one connection.
pub struct Case {
    /// The check's name after `frontend.`.
    pub name: &'static str,
    /// Where the rule is written.
    pub spec: &'static str,
    /// What the kit does and what passes, in one line, for `--list`.
    pub about: &'static str,
    pub run: fn(&Peer) -> Checked,
}

/// Every case, in the order they are played.
pub const CASES: &[Case] = &[
    Case { name: "silence", spec: "§1.2", about: "never answers the first request; the front-end's deadline closes the connection", run: silence },
    Case { name: "broken-version", spec: "§2.2", about: "a reply with version bits 2; the front-end closes", run: broken_version },
    Case { name: "broken-reserved-flag", spec: "§2.2", about: "a reply with reserved header flag bit 3 set; the front-end closes", run: broken_reserved_flag },
    Case { name: "broken-reply-flag-clear", spec: "§2.2", about: "a reply without the REPLY flag; the front-end closes", run: broken_reply_flag_clear },
    Case { name: "broken-size", spec: "§2.2", about: "a reply of 65537 bytes; the front-end closes", run: broken_size },
    Case { name: "broken-end-of-stream", spec: "§2.2", about: "half a reply, then end of stream; the front-end closes and sends nothing more", run: broken_end_of_stream },
    Case { name: "malformed-code", spec: "§3", about: "a reply carrying SET_FEATURES's code to GET_FEATURES; the front-end closes", run: malformed_code },
    Case { name: "malformed-lengths", spec: "§3", about: "a reply whose size is not 24 + 40 × op_count + body_len + text_len; the front-end closes", run: malformed_lengths },
    Case { name: "malformed-error-without-text", spec: "§3", about: "an error reply (-EIO) without text; the front-end closes", run: malformed_error_without_text },
    Case { name: "malformed-body-size", spec: "§3", about: "a GET_FEATURES reply with a 4-byte body; the front-end closes", run: malformed_body_size },
    Case { name: "malformed-ops-without-transaction", spec: "§3", about: "OPS with transaction 0; the front-end closes", run: malformed_ops_without_transaction },
    Case { name: "malformed-rollback-without-ops", spec: "§3", about: "ROLLBACK without OPS; the front-end closes", run: malformed_rollback_without_ops },
    Case { name: "malformed-body-with-ops", spec: "§3", about: "OPS with a body (it belongs to the final reply); the front-end closes", run: malformed_body_with_ops },
    Case { name: "malformed-status-with-ops", spec: "§3", about: "status -EIO with OPS; the front-end closes", run: malformed_status_with_ops },
    Case { name: "malformed-reserved", spec: "§3", about: "the reply's reserved word is 1; the front-end closes", run: malformed_reserved },
    Case { name: "malformed-flags", spec: "§3", about: "an undefined reply flag (bit 2); the front-end closes", run: malformed_flags },
    Case { name: "malformed-text", spec: "§3", about: "a text that is not UTF-8; the front-end closes", run: malformed_text },
    Case { name: "op-not-allowed", spec: "§6.3", about: "GET_FEATURES answered with an EEH_PE_OP operation; the front-end reports it failed with -EPERM and goes on", run: op_not_allowed },
    Case { name: "endless-transaction", spec: "§1.2", about: "every OPS_RESULT answered with more operations; the front-end closes within --max-rounds", run: endless_transaction },
    Case { name: "transaction-id-changed", spec: "§6", about: "the second reply of transaction 7 carries transaction 8; the front-end closes", run: transaction_id_changed },
    Case { name: "unsolicited", spec: "§1", about: "after the handshake, a reply to no request; the front-end closes", run: unsolicited },
    Case { name: "no-fds-by-mode", spec: "§1.2", about: "accelerated mode offered without FDS_BY_MODE; the front-end does not negotiate accelerated mode", run: no_fds_by_mode },
];

/// What the kit offers unless a case says otherwise: both modes, EEH and FDS_BY_MODE.
const FEATURES: u64 = MODE_ACCELERATED | MODE_ISOLATED | FEATURE_EEH | FEATURE_FDS_BY_MODE;

// Byte offsets in a reply frame: the header's, then the reply's fixed part after it (§2, §3).
const HEADER_CODE: usize = 0;
const HEADER_FLAGS: usize = 4;
const HEADER_SIZE_FIELD: usize = 8;
const REPLY_RESERVED: usize = wire::HEADER_SIZE + 20;

/// A final reply to `request` with `body`.
fn answer(request: &Request, body: Vec<u8>) -> Reply {
    Reply {
        code: request.code,
        body,
        ..Reply::default()
    }
}

fn features(request: &Request, bits: u64) -> Reply {
    answer(request, bits.to_le_bytes().to_vec())
}

/// The well-formed GET_FEATURES reply that a broken or malformed case spoils.
fn good(request: &Request) -> Reply {
    features(request, FEATURES)
}

/// An operation only `EEH_OP` may ask for (§6.3): `EEH_PE_OP` op 2 on container 1.
fn eeh_op() -> Op {
    Op {
        kind: EEH_PE_OP,
        container: 1,
        aux: 2,
        ..Op::default()
    }
}

/// A reply with `OPS`: one `EEH_PE_OP` in `transaction`.
fn with_ops(code: u32, transaction: u32) -> Reply {
    Reply {
        code,
        flags: REPLY_OPS,
        transaction,
        ops: vec![eeh_op()],
        ..Reply::default()
    }
}

/// The frame with the little-endian u32 at byte `at` replaced.
fn patch(mut frame: Vec<u8>, at: usize, value: u32) -> Vec<u8> {
    frame[at..at + 4].copy_from_slice(&value.to_le_bytes());
    frame
}

/// Answers the first request with the frame `bad` makes of it; passes if the front-end then
/// closes without another request.
fn refuses(peer: &Peer, bad: fn(&Request) -> Vec<u8>) -> Checked {
    let first = peer.first_request()?;
    peer.send_bad(&bad(&first));
    peer.closes_without_request()
}

fn silence(peer: &Peer) -> Checked {
    peer.request("a first request")?;
    peer.closes_without_request()
}

fn broken_version(peer: &Peer) -> Checked {
    refuses(peer, |r| {
        patch(good(r).encode(), HEADER_FLAGS, 2 | FLAG_REPLY)
    })
}

fn broken_reserved_flag(peer: &Peer) -> Checked {
    refuses(peer, |r| {
        patch(
            good(r).encode(),
            HEADER_FLAGS,
            VERSION_1 | FLAG_REPLY | 1 << 3,
        )
    })
}

fn broken_reply_flag_clear(peer: &Peer) -> Checked {
    refuses(peer, |r| patch(good(r).encode(), HEADER_FLAGS, VERSION_1))
}

/// The whole oversized frame is sent: a front-end must refuse it by its header.
fn broken_size(peer: &Peer) -> Checked {
    refuses(peer, |r| {
        let body = vec![0; MAX_PAYLOAD as usize + 1 - REPLY_FIXED];
        answer(r, body).encode()
    })
}

fn broken_end_of_stream(peer: &Peer) -> Checked {
    let first = peer.first_request()?;
    let reply = good(&first).encode();
    peer.send_bad(&reply[..reply.len() / 2]);
    peer.shut_down_writes();
    peer.closes_without_request()
}

fn malformed_code(peer: &Peer) -> Checked {
    refuses(peer, |r| patch(good(r).encode(), HEADER_CODE, SET_FEATURES))
}

/// `text_len` says 1 byte, which the frame (its size right) does not hold.
fn malformed_lengths(peer: &Peer) -> Checked {
    refuses(peer, |r| {
        let mut frame = Reply {
            text: "x".into(),
            ..good(r)
        }
        .encode();
        frame.pop();
        let size = (frame.len() - wire::HEADER_SIZE) as u32;
        patch(frame, HEADER_SIZE_FIELD, size)
    })
}

fn malformed_error_without_text(peer: &Peer) -> Checked {
    refuses(peer, |r| {
        Reply {
            status: -EIO,
            ..answer(r, Vec::new())
        }
        .encode()
    })
}

fn malformed_body_size(peer: &Peer) -> Checked {
    refuses(peer, |r| {
        answer(r, (FEATURES as u32).to_le_bytes().to_vec()).encode()
    })
}

fn malformed_ops_without_transaction(peer: &Peer) -> Checked {
    refuses(peer, |r| with_ops(r.code, 0).encode())
}

fn malformed_rollback_without_ops(peer: &Peer) -> Checked {
    refuses(peer, |r| {
        Reply {
            flags: REPLY_ROLLBACK,
            ..good(r)
        }
        .encode()
    })
}

fn malformed_body_with_ops(peer: &Peer) -> Checked {
    refuses(peer, |r| {
        Reply {
            body: FEATURES.to_le_bytes().to_vec(),
            ..with_ops(r.code, 5)
        }
        .encode()
    })
}

fn malformed_status_with_ops(peer: &Peer) -> Checked {
    refuses(peer, |r| {
        Reply {
            status: -EIO,
            text: "EEH failed".into(),
            ..with_ops(r.code, 5)
        }
        .encode()
    })
}

fn malformed_reserved(peer: &Peer) -> Checked {
    refuses(peer, |r| patch(good(r).encode(), REPLY_RESERVED, 1))
}

fn malformed_flags(peer: &Peer) -> Checked {
    refuses(peer, |r| {
        Reply {
            flags: 1 << 2,
            ..good(r)
        }
        .encode()
    })
}

/// A success with a text, which must be UTF-8 like any text: 0xff 0xfe is not.
fn malformed_text(peer: &Peer) -> Checked {
    refuses(peer, |r| {
        let mut frame = Reply {
            text: "??".into(),
            ..good(r)
        }
        .encode();
        let end = frame.len();
        frame[end - 2..].copy_from_slice(&[0xff, 0xfe]);
        frame
    })
}

/// The results a front-end gives for the one `EEH_PE_OP` of a request that does not allow it:
/// failed with `-EPERM`, no call made, so no output (§1.2, §6, §6.3).
fn check_refused(answer: &OpsResult, transaction: u32) -> Checked {
    let name = wire::op_name(EEH_PE_OP);
    ensure!(
        answer.transaction == transaction,
        "the front-end answered transaction {}; the reply opened {transaction}",
        answer.transaction
    );
    let [result] = answer.results[..] else {
        return Err(format!(
            "the front-end answered one operation with {} results",
            answer.results.len()
        )
        .into());
    };
    ensure!(
        result.kind == EEH_PE_OP,
        "the front-end answered {name} with a result of kind {}",
        wire::op_name(result.kind)
    );
    ensure!(
        result.status != 0,
        "the front-end reported {name} with status 0: it executed an operation GET_FEATURES does not allow"
    );
    let refused = OpResult {
        kind: EEH_PE_OP,
        status: -EPERM,
        out: [0; 4],
    };
    ensure!(
        result == refused,
        "the front-end reported {name} with status {} and outputs {:?}; a refused operation is reported as -EPERM, without a call (no outputs)",
        wire::status_name(result.status),
        result.out
    );
    Ok(())
}

fn op_not_allowed(peer: &Peer) -> Checked {
    let first = peer.first_request()?;
    peer.reply(&with_ops(first.code, 7))?;
    let answer = peer.expect(OPS_RESULT, "every reply with OPS is answered, §6")?;
    check_refused(&OpsResult::parse(&answer.payload)?, 7)?;
    // The final reply of the transaction completes GET_FEATURES (§7.10).
    peer.reply(&features(&answer, FEATURES))?;
    let next = peer.request("another request (the session goes on)")?;
    if next.code == SET_FEATURES {
        peer.reply(&answer_echo(&next))?;
    }
    peer.note(format!(
        "the front-end reported EEH_PE_OP as failed with -EPERM, without executing it, and went on with {next}"
    ));
    Ok(())
}

/// `SET_FEATURES` answered with the features it asks for.
fn answer_echo(request: &Request) -> Reply {
    answer(request, request.payload.clone())
}

fn endless_transaction(peer: &Peer) -> Checked {
    let first = peer.first_request()?;
    peer.reply(&with_ops(first.code, 3))?;
    let mut rounds = 0;
    loop {
        let (event, after) = peer.next();
        let request = match event {
            Event::Request(request) if request.code == OPS_RESULT => request,
            Event::Closed => {
                peer.note(format!(
                    "the front-end answered {rounds} replies with operations, then closed the connection {after}"
                ));
                return Ok(());
            }
            other => {
                let wanted = format!("OPS_RESULT (it answered {rounds} replies with operations)");
                return Err(peer.failure(other, &after, &wanted));
            }
        };
        let transaction = OpsResult::parse(&request.payload)?.transaction;
        ensure!(
            transaction == 3,
            "the front-end answered transaction {transaction}; the back-end's is 3"
        );
        rounds += 1;
        ensure!(
            rounds <= peer.max_rounds,
            "the front-end answered {} replies with operations of one transaction and still went on: it sets no bound (§1.2)",
            peer.max_rounds
        );
        peer.reply(&with_ops(OPS_RESULT, 3))?;
    }
}

fn transaction_id_changed(peer: &Peer) -> Checked {
    let first = peer.first_request()?;
    peer.reply(&with_ops(first.code, 7))?;
    peer.expect(OPS_RESULT, "every reply with OPS is answered, §6")?;
    peer.send_bad(&with_ops(OPS_RESULT, 8).encode());
    peer.closes_without_request()
}

/// GET_FEATURES answered with FEATURES and SET_FEATURES echoed: a negotiated session (§4.2).
fn negotiate(peer: &Peer) -> Checked {
    let first = peer.first_request()?;
    peer.reply(&good(&first))?;
    let set = peer.expect(SET_FEATURES, "the handshake, §4.2")?;
    peer.reply(&answer_echo(&set))
}

/// Requests that follow the unsolicited reply get no answer: the session is broken.
fn unsolicited(peer: &Peer) -> Checked {
    negotiate(peer)?;
    let stray = Reply {
        code: GET_STATUS,
        ..Reply::default()
    };
    peer.send(&stray.encode(), "the unsolicited reply")?;
    let mut sent: Vec<String> = Vec::new();
    let meanwhile = |sent: &[String]| match sent {
        [] => "nothing after the unsolicited reply".to_owned(),
        _ => format!(
            "{} after the unsolicited reply, unanswered",
            sent.join(", ")
        ),
    };
    loop {
        let (event, after) = peer.next();
        match event {
            Event::Request(request) => sent.push(request.to_string()),
            Event::Closed if sent.is_empty() => {
                peer.note(format!(
                    "the front-end closed the connection {after}, without another request"
                ));
                return Ok(());
            }
            Event::Closed => {
                let sent = meanwhile(&sent);
                peer.note(format!(
                    "the front-end closed the connection {after}; it sent {sent}"
                ));
                return Ok(());
            }
            Event::Silent => {
                let more = format!("; it sent {}", meanwhile(&sent));
                return Err(peer.still_connected(&more).into());
            }
            broken => return Err(peer.failure(broken, &after, "closing the connection")),
        }
        ensure!(
            sent.len() <= peer.max_rounds as usize,
            "the front-end sent {} requests after the unsolicited reply without closing the connection",
            sent.len()
        );
    }
}

/// §1.2: a front-end "does not use a back-end that does not offer [FDS_BY_MODE] in accelerated
/// mode"; isolated mode needs no such feature.
fn no_fds_by_mode(peer: &Peer) -> Checked {
    let first = peer.first_request()?;
    peer.reply(&features(&first, FEATURES & !FEATURE_FDS_BY_MODE))?;
    let (event, after) = peer.next();
    let set = match event {
        Event::Request(request) if request.code == SET_FEATURES => request,
        Event::Closed => {
            peer.note(format!(
                "the front-end closed the connection {after}, without SET_FEATURES"
            ));
            return Ok(());
        }
        other => return Err(peer.failure(other, &after, "SET_FEATURES or closing the connection")),
    };
    ensure!(
        set.features() & MODE_ACCELERATED == 0,
        "the front-end sent {set}: it negotiates accelerated mode with a back-end that does not offer FDS_BY_MODE"
    );
    peer.reply(&answer_echo(&set))?;
    peer.note(format!(
        "the front-end negotiated isolated mode ({set}), which needs no FDS_BY_MODE"
    ));
    Ok(())
}
