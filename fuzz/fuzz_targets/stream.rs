//! Fuzzes the receive path: arbitrary bytes written into a real socketpair are read back frame
//! by frame with either reader, and every frame is decoded. Frames may be
//! split, truncated or oversized; nothing may panic and every frame must be accounted for.
#![no_main]

use std::io::Write;
use std::os::unix::net::UnixStream;

use libfuzzer_sys::fuzz_target;
use tce_sidecar::protocol::{decode_request, FdRule, FrameReader, RecvError, HEADER_SIZE};

fuzz_target!(|data: &[u8]| {
    // Stay below the socket buffer so the write cannot block without a reader.
    if data.len() > 64 * 1024 {
        return;
    }
    // Byte 0 picks the reader: exact, or buffered (the back-end's and the front-end's).
    let Some((&mode, data)) = data.split_first() else { return };
    let (mut front, back) = UnixStream::pair().expect("socketpair");
    front.write_all(data).expect("write");
    drop(front);
    let mut reader = if mode & 1 == 0 { FrameReader::exact(false) } else { FrameReader::new(false) };
    let mut consumed = 0;
    loop {
        match reader.recv(&back) {
            Ok(frame) => {
                consumed += HEADER_SIZE + frame.payload.len();
                let _ = decode_request(&frame.header, &frame.payload, frame.fds, frame.fd_problem, FdRule::Every);
            }
            Err(RecvError::Closed) => {
                assert_eq!(consumed, data.len(), "a clean close only at a frame boundary");
                break;
            }
            Err(RecvError::Truncated { .. } | RecvError::Frame(_)) => break,
            Err(RecvError::Io(e)) => panic!("unexpected socket error: {e}"),
        }
    }
});
