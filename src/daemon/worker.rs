//! A worker: the process that serves exactly one session, in a sandbox, and exits with it.
//!
//! The listener starts it by executing its own binary again (`tce-sidecar worker ...`), never by
//! a `fork` of the threaded listener without `exec`, with three inherited fds: the connection,
//! the query channel and the status channel (`control`). Whatever happens in here — a fault, an
//! abort, a seccomp kill — ends this process only; the kernel then releases what it held (its
//! containers, its pinned memory), as for any process that exits.

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use clap::Args;
use rustix::io::Errno;
use tracing::{debug, info, warn};

use super::cli::KernelChoice;
use super::control::{Channel, Message};
use super::session::{self, SessionEntry};
use super::{sandbox, DaemonError};
use crate::engine::{Host, Limits, Session};
use crate::kernel::linux::{self, Linux};
use crate::kernel::model::server::ModelClient;
use crate::kernel::Kernel;
use crate::protocol::Reply;

/// The hidden `worker` command line, written by the listener.
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// The session's connection (inherited).
    #[arg(long, value_name = "FDNUM")]
    pub connection_fd: i32,
    /// The end of the query channel this worker answers (inherited).
    #[arg(long, value_name = "FDNUM")]
    pub query_fd: i32,
    /// The end of the status channel this worker asks on (inherited).
    #[arg(long, value_name = "FDNUM")]
    pub status_fd: i32,
    /// The listener's pid: the worker ends if it is not its parent.
    #[arg(long)]
    pub listener_pid: i32,
    #[arg(long)]
    pub session: u64,
    #[arg(long)]
    pub peer_pid: i32,
    #[arg(long)]
    pub peer_uid: u32,
    /// The features the host offers (the listener's `features()`).
    #[arg(long)]
    pub features: u64,
    #[arg(long, value_enum)]
    pub kernel: KernelChoice,
    /// With `--kernel model`: where the model kernel is served.
    #[arg(long, value_name = "PATH")]
    pub model_socket: Option<PathBuf>,
    #[arg(long, default_value = "info")]
    pub log_level: tracing::Level,
}

/// Runs the worker until its session ends.
pub fn run(args: WorkerArgs) -> Result<(), DaemonError> {
    // Only the fds the session needs: the listener may have inherited others from its parent.
    linux::close_other_fds(&[args.connection_fd, args.query_fd, args.status_fd])
        .map_err(|e| DaemonError::Worker(e.into()))?;
    // Executed as /proc/self/exe, the process would be named "exe".
    let _ = rustix::thread::set_name(c"tce-sidecar");
    // Before any thread starts: what this thread drops, every later thread lacks too.
    sandbox::restrict().map_err(DaemonError::Sandbox)?;
    let adopt =
        |fd| linux::adopt_inherited_socket(fd).map_err(|source| DaemonError::BadFd { fd, source });
    let connection = UnixStream::from(adopt(args.connection_fd)?);
    let query = Channel::from(adopt(args.query_fd)?);
    let status = Channel::from(adopt(args.status_fd)?);
    // End with the listener, and not outlive one that ended before this point.
    rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::TERM))
        .map_err(|e| DaemonError::Worker(e.into()))?;
    let parent = rustix::process::getppid().map_or(0, |p| p.as_raw_nonzero().get());
    if parent != args.listener_pid {
        return Err(DaemonError::ListenerGone);
    }
    let mut kernel: Box<dyn Kernel> = match args.kernel {
        KernelChoice::Linux => Box::new(Linux::new()),
        KernelChoice::Model => {
            let path = args
                .model_socket
                .as_ref()
                .ok_or(DaemonError::NoModelSocket)?;
            let client = ModelClient::connect(path).map_err(|source| DaemonError::Bind {
                path: path.clone(),
                source,
            })?;
            Box::new(crate::kernel::model_backend::ModelBackend::new(client))
        }
    };
    let host = Host {
        features: args.features,
        page_size: rustix::param::page_size() as u64,
        limits: Limits::default(),
    };
    let entry = Arc::new(SessionEntry {
        id: args.session,
        peer_pid: args.peer_pid,
        peer_uid: args.peer_uid,
        started: Instant::now(),
        engine: Mutex::new(Session::new(host)),
    });
    start_answering(&entry, query)?;
    start_stopping_on_signals(&connection)?;
    sandbox::filter_syscalls().map_err(DaemonError::Sandbox)?;
    info!(
        session = args.session,
        peer_pid = args.peer_pid,
        "worker serving"
    );
    let mut seq = 0;
    let mut status_of = |first: u32| {
        seq += 1;
        daemon_status(&status, seq, first)
    };
    session::serve(
        &entry,
        connection,
        kernel.as_mut(),
        &mut status_of,
        host.page_size,
    );
    Ok(())
}

/// The GET_STATUS reply: the listener gathers every worker's session.
fn daemon_status(status: &Channel, seq: u64, first: u32) -> Reply {
    match status.ask(&Message::StatusRequest { seq, first }) {
        Ok(Message::StatusReply { body, .. }) => Reply::ok(body.into_bytes()),
        Ok(other) => Reply::error(
            Errno::IO.raw_os_error(),
            format!("GET_STATUS: the listener answered {other:?}"),
        ),
        Err(err) => Reply::error(
            Errno::IO.raw_os_error(),
            format!("GET_STATUS: the listener did not answer: {err}"),
        ),
    }
}

/// Starts a thread and returns once it runs `body`: a thread's own startup makes system calls
/// the sandbox does not allow, so the filter goes on only after every thread has started.
fn start_thread(name: &str, body: impl FnOnce() + Send + 'static) -> Result<(), DaemonError> {
    let (started, running) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let _ = started.send(());
            body();
        })
        .map_err(DaemonError::Worker)?;
    running
        .recv()
        .map_err(|_| DaemonError::Worker(std::io::Error::other("a thread ended at start")))
}

/// A thread that answers the listener's status queries while the main thread serves.
fn start_answering(entry: &Arc<SessionEntry>, query: Channel) -> Result<(), DaemonError> {
    let entry = Arc::clone(entry);
    start_thread("status", move || loop {
        match query.recv(None) {
            Ok(Some(Message::Query { seq })) => {
                let session = serde_json::to_value(entry.status()).unwrap_or_default();
                if query.send(&Message::Snapshot { seq, session }).is_err() {
                    return;
                }
            }
            Ok(Some(other)) => debug!(?other, "ignored a control message"),
            // The listener is gone; the parent-death signal ends this worker.
            Ok(None) | Err(_) => return,
        }
    })
}

/// SIGTERM or SIGINT: shut the connection down, so the session tears down in order and the
/// worker exits.
fn start_stopping_on_signals(connection: &UnixStream) -> Result<(), DaemonError> {
    let connection = connection.try_clone().map_err(DaemonError::Worker)?;
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])
    .map_err(DaemonError::Signals)?;
    start_thread("signals", move || {
        if let Some(signal) = signals.forever().next() {
            warn!(signal, "stopping: the session tears down");
            let _ = connection.shutdown(std::net::Shutdown::Both);
        }
    })
}
