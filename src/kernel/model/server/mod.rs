//! The model kernel as a service for real processes: a unix-socket server whose clients are
//! processes (caller identity = `SO_PEERCRED` pid, one mm per pid), and whose objects are
//! **stand-in fds** — real memfds the server creates and hands out by SCM_RIGHTS, which can be
//! passed between processes over any socket exactly like the real fds they stand for.
//!
//! This module owns the wire format, the stand-in registry and the two memfd-backed stores (KVM
//! TCE table pages, declared user memory). It must not decide any kernel rule: every request is
//! one [`ModelKernel`] call made as the peer's mm. The in-process [`ModelServer::handle`] makes
//! the owning process's own calls through the same dispatcher, as its own pid.
//!
//! # Stand-in fds
//! - "Opening" `/dev/kvm`, `/dev/vfio/vfio` or `/dev/vfio/N` is a request that returns a new
//!   memfd named like `model:vfio-container`; every file the kernel creates (VM, vCPU, device,
//!   KVM TCE table) comes back the same way.
//! - A stand-in passed back to the server is recognised by its inode (`fstat`); an fd the server
//!   did not create is a foreign file (e.g. `FILE_ADD` of it fails with `EINVAL`), and an fd slot
//!   of [`NO_FD`] is a number that names no file (`EBADF`).
//! - A KVM TCE table's stand-in is the memfd holding its entries (u64, host byte order), one
//!   kernel page per table page, so any holder can `mmap` it (K6) and sees the kernel's writes.
//! - The server cannot see fds being closed, nor passed on. A file is released when the
//!   connection that opened or created it says `CLOSE` (it dropped its last fd), or ends, as
//!   the process's exit would close it. A file passed to another process that outlives its
//!   opener is not modelled: the receiver's fd names a released file from then on. The server
//!   keeps its own copy of every stand-in until the model releases the file.
//! - Guest RAM stays the caller's own memfd mapping; `MM_MAP` declares "this memfd is mapped at
//!   this address in my process" so the kernel can pin and read it.
//!
//! # Wire format
//! Frames are the product's (`protocol::send_frame`/`recv_frame`): a 12-byte header whose
//! `request` is the [`Op`] code, the `REPLY` flag on replies, fds with the header.
//! - Request payload: exactly [`Op::words`] little-endian u64 words, the op's arguments in the
//!   order of its documentation. Words naming a file are indexes into the fds of the frame.
//!   Words carrying a u32 field must fit 32 bits.
//! - Reply payload: a little-endian i64 status (0 or `-errno`), then the op's result words on
//!   success; a file result travels as the reply's one fd.
//! - Bad input gets an error reply and the connection goes on: unknown op `ENOSYS`, wrong
//!   payload size or a too-large u32 `EINVAL`, misplaced or too many fds `EBADF`. Only a broken
//!   frame closes the connection.

use std::collections::{HashMap, HashSet};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::kernel::{FileId, FileKind, Mm, ModelKernel};
use super::store::TceStore;
use super::Errno;
use crate::kernel::shared_memory::sealed_memfd;
use crate::protocol::{send_frame, FrameReader, RecvError};

mod client;
mod dispatch;
mod ops;
mod standins;

#[cfg(test)]
mod tests;

pub use crate::kernel::linux::SharedMapping;
pub use client::{guest_ram, CallError, FdArg, ModelClient};
pub use ops::Op;

use client::Transport;
use dispatch::{encode_reply, ArgFd};
use standins::{inode_of, standin_name, MemfdTceStore};

/// An fd-slot word that names no file: the kernel's `fget` of it fails (`EBADF`).
pub const NO_FD: u64 = u64::MAX;

struct State {
    kernel: ModelKernel,
    by_inode: HashMap<(u64, u64), FileId>,
    standins: HashMap<FileId, OwnedFd>,
    /// The files each holder opened or created and has not closed: what its end closes.
    holds: HashMap<Holder, HashSet<FileId>>,
    /// Live connections per process: when its last one ends, the process is taken as gone.
    connections: HashMap<Mm, usize>,
    /// The kernel's released-file count at the last collection.
    collected: u64,
}

/// Who holds files: a model connection (whose end drops its holds), or a process calling in
/// process (whose holds only its exit drops).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Holder {
    Connection { id: u64, caller: Mm },
    Local(Mm),
}

impl Holder {
    fn mm(self) -> Mm {
        match self {
            Self::Connection { caller, .. } | Self::Local(caller) => caller,
        }
    }
}

impl State {
    /// `holder` opened or created `id`.
    pub(super) fn hold(&mut self, holder: Holder, id: FileId) {
        self.holds.entry(holder).or_default().insert(id);
    }

    /// `holder` dropped its last fd for `id`: the kernel closes the file (its one holder is its
    /// opener). A holder that does not hold `id` has no fd to close: `EBADF`.
    pub(super) fn release(&mut self, holder: Holder, id: FileId) -> Result<(), Errno> {
        let held = self.holds.get_mut(&holder).ok_or(Errno::BADF)?;
        if !held.remove(&id) {
            return Err(Errno::BADF);
        }
        if held.is_empty() {
            self.holds.remove(&holder);
        }
        self.kernel.close(id)
    }

    /// Every hold of `holder` ends (its connection ended, or its process exited).
    fn release_all(&mut self, holder: Holder) {
        for id in self.holds.remove(&holder).unwrap_or_default() {
            let _ = self.kernel.close(id);
        }
    }
}

struct Shared {
    state: Mutex<State>,
}

/// The ids of model connections, for their holds.
static NEXT_CONNECTION: AtomicU64 = AtomicU64::new(1);

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere cannot leave the model half-updated in a way a later call would
        // trust less than a fresh lock; keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Gives `caller` the locked-memory limit its process really has, so that accounting
    /// refuses what the kernel would refuse it.
    fn adopt_memlock_limit(&self, caller: Mm) {
        if let Some(limit) = proc_memlock_limit(caller.0) {
            self.lock().kernel.set_memlock_limit(caller, limit);
        }
    }

    /// Serves one connection until the peer closes it or breaks a frame; then the files it
    /// held and nothing else holds are closed, and with the process's last connection its
    /// address space goes (declared memory, pre-registrations, locked-memory charge), as its
    /// exit would end them.
    fn serve_connection(&self, stream: UnixStream) -> io::Result<()> {
        let cred = rustix::net::sockopt::socket_peercred(&stream)?;
        let caller = Mm(cred.pid.as_raw_nonzero().get() as u32);
        let holder = Holder::Connection {
            id: NEXT_CONNECTION.fetch_add(1, Ordering::Relaxed),
            caller,
        };
        self.adopt_memlock_limit(caller);
        *self.lock().connections.entry(caller).or_default() += 1;
        let served = self.serve_frames(&stream, holder);
        let mut state = self.lock();
        state.release_all(holder);
        let left = state.connections.get_mut(&caller).map(|n| {
            *n -= 1;
            *n
        });
        if left == Some(0) {
            state.connections.remove(&caller);
            state.kernel.exit_mm(caller);
        }
        state.collect();
        served
    }

    fn serve_frames(&self, stream: &UnixStream, holder: Holder) -> io::Result<()> {
        let mut reader = FrameReader::exact(false);
        loop {
            let frame = match reader.recv(stream) {
                Ok(frame) => frame,
                Err(RecvError::Closed) => return Ok(()),
                Err(RecvError::Io(e)) => return Err(e),
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
            };
            let code = frame.header.request;
            let result = if frame.fd_problem.is_some() {
                Err(Errno::BADF)
            } else {
                self.dispatch(
                    holder,
                    code,
                    &frame.payload,
                    frame.fds.into_iter().map(ArgFd::Owned).collect(),
                )
            };
            let (payload, fd) = encode_reply(result);
            let fds: Vec<BorrowedFd<'_>> = fd.iter().map(|f| f.as_fd()).collect();
            send_frame(stream, code, true, &payload, &fds)?;
        }
    }
}

/// `RLIMIT_MEMLOCK` of process `pid` in bytes, `None` inside when it may lock without limit
/// (an infinite limit, or `CAP_IPC_LOCK`, bit 14 of its effective capabilities). The outer
/// `None` means `/proc` could not tell.
fn proc_memlock_limit(pid: u32) -> Option<Option<u64>> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())?;
    if cap_eff & (1 << 14) != 0 {
        return Some(None);
    }
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let soft = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max locked memory"))?
        .split_whitespace()
        .next()?;
    match soft {
        "unlimited" => Some(None),
        bytes => bytes.parse().ok().map(Some),
    }
}

/// The model kernel server: owns a [`ModelKernel`] and serves it to processes.
#[derive(Clone)]
pub struct ModelServer {
    shared: Arc<Shared>,
}

impl ModelServer {
    /// Serves `kernel`, backing its KVM TCE tables with memfds.
    pub fn new(mut kernel: ModelKernel) -> Self {
        let page_size = kernel.platform().page_size();
        kernel.set_tce_store_factory(move |bytes| {
            // A KVM table's size is fixed at creation: its stand-in is sealed the same way.
            let fd = sealed_memfd(standin_name(FileKind::SpaprTce), bytes)?;
            Ok(Box::new(MemfdTceStore { fd, page_size }) as Box<dyn TceStore>)
        });
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    kernel,
                    by_inode: HashMap::new(),
                    standins: HashMap::new(),
                    holds: HashMap::new(),
                    connections: HashMap::new(),
                    collected: 0,
                }),
            }),
        }
    }

    /// Accepts connections on `listener` forever, one thread per connection. Returns only when
    /// accepting fails.
    pub fn serve(&self, listener: UnixListener) -> io::Result<()> {
        loop {
            let (stream, _) = listener.accept()?;
            let shared = Arc::clone(&self.shared);
            std::thread::spawn(move || {
                // A connection's failure ends that connection only.
                let _ = shared.serve_connection(stream);
            });
        }
    }

    /// Serves one already-connected stream on the calling thread.
    pub fn serve_connection(&self, stream: UnixStream) -> io::Result<()> {
        self.shared.serve_connection(stream)
    }

    /// A client for this process's own calls, made as this process's mm without a socket.
    pub fn handle(&self) -> ModelClient {
        self.shared.adopt_memlock_limit(Mm(std::process::id()));
        ModelClient {
            transport: Transport::Local {
                shared: Arc::clone(&self.shared),
                caller: Mm(std::process::id()),
            },
        }
    }

    /// A client whose calls are made as `caller`, without a socket: several simulated
    /// processes in one test process (each keeps its own mm, as separate processes would).
    pub fn handle_as(&self, caller: Mm) -> ModelClient {
        ModelClient {
            transport: Transport::Local {
                shared: Arc::clone(&self.shared),
                caller,
            },
        }
    }

    /// Process `mm` exited: its holds end, in process and on its connections (the kernel
    /// closes each file nothing else holds), then its address space goes (its pre-registered
    /// memory and locked-memory charge).
    pub fn process_exited(&self, mm: Mm) {
        let mut state = self.shared.lock();
        let holders: Vec<Holder> = state
            .holds
            .keys()
            .filter(|h| h.mm() == mm)
            .copied()
            .collect();
        for holder in holders {
            state.release_all(holder);
        }
        state.kernel.exit_mm(mm);
        state.collect();
    }

    /// The model file a stand-in fd names, if it names one.
    pub fn file_of(&self, fd: BorrowedFd<'_>) -> Option<FileId> {
        let state = self.shared.lock();
        let id = *state.by_inode.get(&inode_of(fd)?)?;
        state.kernel.file_kind(id).map(|_| id)
    }

    /// Runs `f` on the kernel (status, tests).
    pub fn with_kernel<R>(&self, f: impl FnOnce(&mut ModelKernel) -> R) -> R {
        let mut state = self.shared.lock();
        let r = f(&mut state.kernel);
        state.collect();
        r
    }
}
