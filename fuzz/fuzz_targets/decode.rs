//! Fuzzes the header, request and reply decoders with arbitrary bytes. Beyond "never panics",
//! anything that decodes must re-encode to exactly the input bytes: the decoder accepts only
//! the canonical form the spec defines.
#![no_main]

use std::os::fd::OwnedFd;

use libfuzzer_sys::fuzz_target;
use rustix::event::{eventfd, EventfdFlags};
use tce_sidecar::protocol::{
    decode_reply, decode_request, encode_reply, encode_request, FdProblem, FdRule, Header, FLAG_REPLY,
    HEADER_SIZE, VERSION,
};

fuzz_target!(|data: &[u8]| {
    // Byte 0 chooses the side, the fd situation and the session's fd rule; the next 12 bytes are a header; the rest is
    // the payload.
    let Some((&selector, rest)) = data.split_first() else { return };
    let Some((header_bytes, payload)) = rest.split_first_chunk::<HEADER_SIZE>() else { return };
    let expect_reply = selector & 1 == 1;
    let _ = Header::decode(header_bytes, expect_reply);

    let request = u32::from_le_bytes([header_bytes[0], header_bytes[1], header_bytes[2], header_bytes[3]]);
    let flags = VERSION | if expect_reply { FLAG_REPLY } else { 0 };
    let header = Header { request, flags, size: payload.len() as u32 };
    if expect_reply {
        let fd_count = usize::from(selector >> 1 & 1);
        if let Ok(reply) = decode_reply(&header, payload, fd_count) {
            assert_eq!(encode_reply(&reply).expect("a decoded reply re-encodes"), payload);
        }
    } else {
        let fds: Vec<OwnedFd> =
            (0..(selector >> 1) % 3).map(|_| eventfd(0, EventfdFlags::CLOEXEC).expect("eventfd")).collect();
        let problem = match selector >> 3 & 3 {
            1 => Some(FdProblem::TooMany),
            2 => Some(FdProblem::Misplaced),
            _ => None,
        };
        let rule = if selector >> 5 & 1 == 1 { FdRule::TablesOnly } else { FdRule::Every };
        if let Ok(incoming) = decode_request(&header, payload, fds, problem, rule) {
            assert_eq!(encode_request(&incoming.request), payload);
            assert_eq!(incoming.fd.is_some(), incoming.request.code().fd_count(rule) == 1);
        }
    }
});
