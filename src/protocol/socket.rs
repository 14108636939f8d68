//! Frames on a unix stream socket, with fds passed by SCM_RIGHTS.
//!
//! Received fds are installed close-on-exec by the kernel (MSG_CMSG_CLOEXEC) and owned from the
//! moment they arrive, so no error path can leak one. Fds belong to the header: the sender
//! attaches them to the `sendmsg` that carries the header's first byte. These functions block;
//! they are meant for a blocking socket served by one thread.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::io::Errno;
use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags,
};

use super::codec::{FdProblem, FrameError, Header};
use super::{HEADER_SIZE, MAX_FDS, MAX_PAYLOAD};

/// One received frame: its header, its payload and every fd that came with it.
#[derive(Debug)]
pub struct Frame {
    pub header: Header,
    pub payload: Vec<u8>,
    pub fds: Vec<OwnedFd>,
    /// Set when the fds cannot be trusted; the decoder then refuses the message.
    pub fd_problem: Option<FdProblem>,
}

/// Why no frame could be received. Every variant ends the connection.
#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    #[error("peer closed the connection")]
    Closed,
    #[error("peer closed the connection inside a frame ({got} of {want} bytes received)")]
    Truncated { got: usize, want: usize },
    #[error("broken frame header: {0}")]
    Frame(#[from] FrameError),
    #[error("socket receive failed: {0}")]
    Io(#[from] io::Error),
}

/// Receives into `buf` once, appending any fds; returns the bytes read and whether the kernel
/// truncated the ancillary data.
fn recv_once(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<(usize, bool)> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = loop {
        match recvmsg(sock, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC) {
            // A signal arrived while waiting; nothing was consumed, so just wait again.
            Err(Errno::INTR) => continue,
            result => break result?,
        }
    };
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = message {
            fds.extend(received);
        }
    }
    Ok((msg.bytes, msg.flags.contains(ReturnFlags::CTRUNC)))
}

/// Receives one frame. `expect_reply` is true on the front-end side (it receives replies).
pub fn recv_frame(sock: impl AsFd, expect_reply: bool) -> Result<Frame, RecvError> {
    let sock = sock.as_fd();
    let mut fds = Vec::new();
    let mut truncated = false;

    let mut header_bytes = [0u8; HEADER_SIZE];
    let mut got = 0;
    while got < HEADER_SIZE {
        let (n, trunc) = recv_once(sock, &mut header_bytes[got..], &mut fds)?;
        truncated |= trunc;
        if n == 0 {
            return Err(if got == 0 {
                RecvError::Closed
            } else {
                RecvError::Truncated {
                    got,
                    want: HEADER_SIZE,
                }
            });
        }
        got += n;
    }
    let header = Header::decode(&header_bytes, expect_reply)?;

    let header_fds = fds.len();
    let mut payload = vec![0u8; header.size as usize];
    let mut got = 0;
    while got < payload.len() {
        let (n, trunc) = recv_once(sock, &mut payload[got..], &mut fds)?;
        truncated |= trunc;
        if n == 0 {
            return Err(RecvError::Truncated {
                got: HEADER_SIZE + got,
                want: HEADER_SIZE + payload.len(),
            });
        }
        got += n;
    }
    // The control buffer has room for a few more than MAX_FDS (rustix adds alignment slack), so
    // "too many" is both the kernel's MSG_CTRUNC and a count above the limit.
    let fd_problem = if truncated || fds.len() > MAX_FDS {
        Some(FdProblem::TooMany)
    } else if fds.len() != header_fds {
        Some(FdProblem::Misplaced)
    } else {
        None
    };
    Ok(Frame {
        header,
        payload,
        fds,
        fd_problem,
    })
}

/// Sends `bytes` (one or more whole frames), attaching `fds` to the first byte.
pub fn send_bytes(sock: impl AsFd, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "more than 8 fds in one message",
        ));
    }
    let sock = sock.as_fd();
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "fds do not fit the control buffer",
        ));
    }
    let mut no_control = SendAncillaryBuffer::default();
    let mut sent = 0;
    while sent < bytes.len() {
        let control = if sent == 0 {
            &mut control
        } else {
            &mut no_control
        };
        // MSG_NOSIGNAL: a peer that went away is an EPIPE error here, not a process-killing SIGPIPE.
        match sendmsg(
            sock,
            &[IoSlice::new(&bytes[sent..])],
            control,
            SendFlags::NOSIGNAL,
        ) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => sent += n,
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Sends one frame: a header for `request` (as a reply when `reply` is set), the payload, and
/// `fds` attached to the header.
pub fn send_frame(
    sock: impl AsFd,
    request: u32,
    reply: bool,
    payload: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    if payload.len() > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "payload exceeds the maximum",
        ));
    }
    let mut frame = Vec::with_capacity(HEADER_SIZE + payload.len());
    frame.extend_from_slice(&Header::new(request, reply, payload.len()).to_bytes());
    frame.extend_from_slice(payload);
    send_bytes(sock, &frame, fds)
}
