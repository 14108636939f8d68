//! Frames on a unix stream socket, with fds passed by SCM_RIGHTS.
//!
//! Received fds are installed close-on-exec by the kernel (MSG_CMSG_CLOEXEC) and owned from the
//! moment they arrive, so no error path can leak one. Fds belong to the header: the sender
//! attaches them to the `sendmsg` that carries the header's first byte. These functions block;
//! they are meant for a blocking socket served by one thread.

use std::collections::VecDeque;
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
/// truncated the ancillary data. Without `accept_fds` there is no room for fds: the kernel
/// closes any that come and reports truncation.
fn recv_once(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    accept_fds: bool,
) -> io::Result<(usize, bool)> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let space = if accept_fds { &mut space[..] } else { &mut [] };
    let mut control = RecvAncillaryBuffer::new(space);
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

/// Fds that arrived with one `recvmsg`, and the stream bytes `[start, end)` that read returned.
struct Chunk {
    start: u64,
    end: u64,
    fds: Vec<OwnedFd>,
    truncated: bool,
}

/// Reads frames from one connection.
///
/// Fds belong to the message whose first byte arrived in the same read, and to the last such
/// message if several begin in that read (PROTOCOL §2.1); fds in a read where no message
/// begins arrived with later bytes of a message, which is then refused. A stream socket never
/// returns bytes sent after fd-carrying bytes in the same read (unix(7): ancillary data is a
/// barrier), so fds attached to a message's first byte always reach that message.
///
/// A buffered reader (the default) takes whatever the socket holds, up to 8 KiB or the rest
/// of the frame, with one `recvmsg`, and keeps bytes beyond the frame for the next call: a
/// frame sent with one `sendmsg` costs one read. An exact reader never reads past the frame
/// (header, then payload), for callers that hand the socket to someone else between frames.
pub struct FrameReader {
    expect_reply: bool,
    exact: bool,
    accept_fds: bool,
    buf: Vec<u8>,
    head: usize,
    tail: usize,
    /// Stream position of `buf[head]`.
    position: u64,
    chunks: VecDeque<Chunk>,
}

/// Space kept for reads; grown only for a frame that needs more. It holds a 512-entry TCE
/// update (4132 bytes), the largest frame of the hot path, so that frame costs one read.
const READ_SPACE: usize = 8192;

impl FrameReader {
    /// A buffered reader. `expect_reply` is true on the front-end side (it receives replies).
    pub fn new(expect_reply: bool) -> Self {
        Self {
            expect_reply,
            exact: false,
            accept_fds: true,
            buf: Vec::new(),
            head: 0,
            tail: 0,
            position: 0,
            chunks: VecDeque::new(),
        }
    }

    /// A reader that never reads past the current frame.
    pub fn exact(expect_reply: bool) -> Self {
        Self {
            exact: true,
            ..Self::new(expect_reply)
        }
    }

    /// Receives without room for fds, for a peer whose messages never carry any (the
    /// front-end's replies): fds that come anyway are closed by the kernel and the frame is
    /// marked as having too many. It also spares the kernel the control-message work of
    /// every read.
    pub fn refusing_fds(self) -> Self {
        Self {
            accept_fds: false,
            ..self
        }
    }

    fn available(&self) -> usize {
        self.tail - self.head
    }

    /// Reads more bytes, at most `want` when exact.
    fn read_more(&mut self, sock: BorrowedFd<'_>, want: usize) -> Result<usize, RecvError> {
        if self.head > 0 {
            self.buf.copy_within(self.head..self.tail, 0);
            self.tail -= self.head;
            self.head = 0;
        }
        let space = if self.exact {
            want
        } else {
            want.max(READ_SPACE)
        };
        if self.buf.len() < self.tail + space {
            self.buf.resize(self.tail + space, 0);
        }
        let mut fds = Vec::new();
        let end = self.tail + space;
        let (n, truncated) = recv_once(
            sock,
            &mut self.buf[self.tail..end],
            &mut fds,
            self.accept_fds,
        )?;
        if !fds.is_empty() || truncated {
            let start = self.position + self.available() as u64;
            self.chunks.push_back(Chunk {
                start,
                end: start + n as u64,
                fds,
                truncated,
            });
        }
        self.tail += n;
        Ok(n)
    }

    fn eof(&self, want: usize) -> RecvError {
        match self.available() {
            0 => RecvError::Closed,
            got => RecvError::Truncated { got, want },
        }
    }

    /// Receives one frame.
    pub fn recv(&mut self, sock: impl AsFd) -> Result<Frame, RecvError> {
        let sock = sock.as_fd();
        while self.available() < HEADER_SIZE {
            let need = HEADER_SIZE - self.available();
            if self.read_more(sock, need)? == 0 {
                return Err(self.eof(HEADER_SIZE));
            }
        }
        let mut header_bytes = [0u8; HEADER_SIZE];
        header_bytes.copy_from_slice(&self.buf[self.head..self.head + HEADER_SIZE]);
        let header = match Header::decode(&header_bytes, self.expect_reply) {
            Ok(header) => header,
            Err(err) => {
                // The connection ends; close every fd received so far.
                self.chunks.clear();
                return Err(err.into());
            }
        };
        let total = HEADER_SIZE + header.size as usize;
        while self.available() < total {
            let need = total - self.available();
            if self.read_more(sock, need)? == 0 {
                return Err(self.eof(total));
            }
        }
        let payload = self.buf[self.head + HEADER_SIZE..self.head + total].to_vec();
        let (start, end) = (self.position, self.position + total as u64);
        let (mut fds, mut misplaced, mut truncated) = (Vec::new(), false, false);
        // A read that ends inside this frame saw no later frame begin: its fds are this
        // frame's, well placed only if the read also holds the frame's first byte. A read that
        // ends beyond the frame holds the start of a later frame, which gets its fds.
        while self.chunks.front().is_some_and(|c| c.end <= end) {
            let chunk = self.chunks.pop_front().expect("checked above");
            truncated |= chunk.truncated;
            misplaced |= chunk.start > start && !chunk.fds.is_empty();
            fds.extend(chunk.fds);
        }
        self.head += total;
        self.position = end;
        // The control buffer has room for a few more than MAX_FDS (rustix adds alignment slack),
        // so "too many" is both the kernel's MSG_CTRUNC and a count above the limit.
        let fd_problem = if truncated || fds.len() > MAX_FDS {
            Some(FdProblem::TooMany)
        } else if misplaced {
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
}

/// Receives one frame without reading past it. `expect_reply` is true on the front-end side.
pub fn recv_frame(sock: impl AsFd, expect_reply: bool) -> Result<Frame, RecvError> {
    FrameReader::exact(expect_reply).recv(sock)
}

/// Sends `bytes` (one or more whole frames), attaching `fds` to the first byte.
pub fn send_bytes(sock: impl AsFd, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    send_slices(sock.as_fd(), &mut [IoSlice::new(bytes)], fds)
}

/// Sends every byte of `slices`, in order, attaching `fds` to the first byte.
fn send_slices(
    sock: BorrowedFd<'_>,
    mut slices: &mut [IoSlice<'_>],
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "more than 8 fds in one message",
        ));
    }
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "fds do not fit the control buffer",
        ));
    }
    let mut no_control = SendAncillaryBuffer::default();
    let mut first = true;
    // Drops leading empty slices: with nothing to send, nothing is sent.
    IoSlice::advance_slices(&mut slices, 0);
    while !slices.is_empty() {
        let control = if first { &mut control } else { &mut no_control };
        // MSG_NOSIGNAL: a peer that went away is an EPIPE error here, not a process-killing SIGPIPE.
        match sendmsg(sock, slices, control, SendFlags::NOSIGNAL) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                first = false;
                IoSlice::advance_slices(&mut slices, n);
            }
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Sends one frame: a header for `request` (as a reply when `reply` is set), the payload, and
/// `fds` attached to the header. One `sendmsg` carries both (no copy into a frame buffer).
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
    let header = Header::new(request, reply, payload.len()).to_bytes();
    send_slices(
        sock.as_fd(),
        &mut [IoSlice::new(&header), IoSlice::new(payload)],
        fds,
    )
}
