//! The listener's channels to one worker: two `SOCK_SEQPACKET` socket pairs, one message per
//! packet, JSON. Each has one asking side, so no reader ever sees an answer meant for another:
//!
//! - **query** (the listener asks): `Query` → `Snapshot`, the worker's session as GET_STATUS
//!   shows it. A thread of the worker answers while its main thread serves the session; a thread
//!   of the listener hands each answer to whoever asked, by `seq`, so any number of status
//!   requests may ask at once.
//! - **status** (the worker asks): `StatusRequest` → `StatusReply`, the whole daemon's GET_STATUS
//!   body, which only the listener can gather. Its end of the worker's status socket also tells
//!   the listener when the worker has gone (end of stream).
//!
//! Every wait has a deadline: a worker that does not answer is left out of a status reply, and a
//! listener that does not answer gets the front-end an error reply, never a hang.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use rustix::net::{
    recv, send, socketpair, AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType,
};
use serde::{Deserialize, Serialize};

/// How long one side waits for the other's answer.
pub const ANSWER_DEADLINE: Duration = Duration::from_secs(2);
/// The largest message: a GET_STATUS body fits in a protocol frame (64 KiB).
const MAX_MESSAGE: usize = 128 * 1024;

/// A message; an answer carries the `seq` of its question, so an answer that came too late
/// for one question is never taken for the answer to the next.
#[derive(Debug, Serialize, Deserialize)]
pub enum Message {
    /// Listener → worker: describe your session.
    Query { seq: u64 },
    /// Worker → listener: the session, as GET_STATUS lists it.
    Snapshot {
        seq: u64,
        session: serde_json::Value,
    },
    /// Worker → listener: the GET_STATUS body from session index `first`.
    StatusRequest { seq: u64, first: u32 },
    /// Listener → worker: that body (JSON text).
    StatusReply { seq: u64, body: String },
}

impl Message {
    fn seq(&self) -> u64 {
        match self {
            Self::Query { seq }
            | Self::Snapshot { seq, .. }
            | Self::StatusRequest { seq, .. }
            | Self::StatusReply { seq, .. } => *seq,
        }
    }
}

/// One end of a control channel.
#[derive(Debug)]
pub struct Channel {
    socket: UnixStream,
}

/// A connected pair of channels (this process's end, the other process's end).
pub fn pair() -> io::Result<(Channel, OwnedFd)> {
    let (mine, theirs) = socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?;
    Ok((Channel::from(mine), theirs))
}

impl From<OwnedFd> for Channel {
    fn from(fd: OwnedFd) -> Self {
        Self {
            socket: UnixStream::from(fd),
        }
    }
}

impl Channel {
    pub fn send(&self, message: &Message) -> io::Result<()> {
        let bytes = serde_json::to_vec(message).map_err(io::Error::other)?;
        if bytes.len() > MAX_MESSAGE {
            return Err(io::Error::other("control message too large"));
        }
        send(self.socket.as_fd(), &bytes, SendFlags::NOSIGNAL)?;
        Ok(())
    }

    /// The next message; `Ok(None)` at end of stream (the other process is gone). With a
    /// deadline, a late answer is `TimedOut`.
    pub fn recv(&self, deadline: Option<Duration>) -> io::Result<Option<Message>> {
        self.socket.set_read_timeout(deadline)?;
        let mut buf = vec![0u8; MAX_MESSAGE];
        let (len, _) = match recv(self.socket.as_fd(), &mut buf[..], RecvFlags::empty()) {
            Ok(read) => read,
            Err(rustix::io::Errno::AGAIN) => {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "no answer in time"))
            }
            Err(err) => return Err(err.into()),
        };
        if len == 0 {
            return Ok(None);
        }
        serde_json::from_slice(&buf[..len])
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    /// A second handle on this end (one thread reads while others send).
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            socket: self.socket.try_clone()?,
        })
    }

    /// Sends `message` and waits, until [`ANSWER_DEADLINE`], for the answer with its `seq`.
    /// One asker per channel at a time.
    pub fn ask(&self, message: &Message) -> io::Result<Message> {
        self.send(message)?;
        self.answer(message.seq(), Instant::now() + ANSWER_DEADLINE)
    }

    /// The answer to the question numbered `seq`, if it comes before `deadline`; late answers
    /// to earlier questions are dropped.
    pub fn answer(&self, seq: u64, deadline: Instant) -> io::Result<Message> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "no answer in time"));
            }
            match self.recv(Some(left))? {
                Some(answer) if answer.seq() == seq => return Ok(answer),
                Some(_) => continue,
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the peer is gone",
                    ))
                }
            }
        }
    }
}
