//! The listener: accepts connections, checks each peer, and hands each session to a worker
//! process of its own (`worker.rs`). It keeps no guest state: what it knows of a session is the
//! worker's pid and the peer's credentials; everything else it asks the worker for.
//!
//! One supervising thread per worker waits on the worker's status channel: it answers the
//! worker's GET_STATUS requests and, at end of stream, reaps the worker and logs how it ended.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags};
use rustix::io::{Errno, FdFlags};
use rustix::process::{kill_process, Pid, Signal};
use tracing::{error, info, warn};

use super::cli::KernelChoice;
use super::control::{self, Channel, Message};
use super::status::{DaemonStatus, StatusReply};
use super::{bind, features, Backend, Config, DaemonError, Listen};
use crate::engine::Limits;
use crate::protocol::{
    encode_reply, recv_frame, send_frame, Reply, MAX_PAYLOAD, MAX_TEXT, VERSION,
};

/// How long a status reply waits for the workers' answers (less than the asking worker waits
/// for the reply: [`control::ANSWER_DEADLINE`]).
const GATHER_DEADLINE: Duration = Duration::from_secs(1);
/// How long shutdown waits for workers to tear their sessions down before killing them.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(1500);
/// Connections being refused at once (each gets a thread that answers one request).
const MAX_REFUSING: usize = 16;

/// How the listener starts a worker.
#[derive(Clone, Debug)]
pub struct WorkerCommand {
    /// The binary to execute: this one (`/proc/self/exe`).
    pub exe: PathBuf,
    pub kernel: KernelChoice,
    pub model_socket: Option<PathBuf>,
    pub log_level: tracing::Level,
}

/// A live worker, as the listener knows it.
struct Worker {
    pid: u32,
    /// Where the listener asks for the session's status: one packet per question, so any number
    /// of askers may send at once.
    query: Channel,
    /// The askers waiting for an answer, by question; [`read_answers`] hands each its own.
    waiting: Mutex<HashMap<u64, mpsc::Sender<serde_json::Value>>>,
}

/// Hands each of a worker's answers to the asker waiting for it, until the worker is gone.
fn read_answers(worker: Arc<Worker>, answers: Channel) {
    while let Ok(Some(message)) = answers.recv(None) {
        if let Message::Snapshot { seq, session } = message {
            if let Some(asker) = locked(&worker.waiting).remove(&seq) {
                let _ = asker.send(session);
            }
        }
    }
}

/// The listener's state.
pub struct Daemon {
    backend: Arc<dyn Backend>,
    kernel: &'static str,
    features: u64,
    limits: Limits,
    started: Instant,
    max_sessions: usize,
    workers: Mutex<BTreeMap<u64, Arc<Worker>>>,
    deaths: Mutex<BTreeMap<String, u64>>,
    next_id: AtomicU64,
    next_seq: AtomicU64,
    refusing: AtomicUsize,
    command: WorkerCommand,
}

fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Daemon {
    pub fn new(backend: Arc<dyn Backend>, max_sessions: usize, command: WorkerCommand) -> Self {
        Self {
            kernel: backend.name(),
            features: features(backend.caps()),
            backend,
            limits: Limits::default(),
            started: Instant::now(),
            max_sessions,
            workers: Mutex::new(BTreeMap::new()),
            deaths: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(1),
            next_seq: AtomicU64::new(1),
            refusing: AtomicUsize::new(0),
            command,
        }
    }

    pub fn session_count(&self) -> usize {
        locked(&self.workers).len()
    }

    /// The GET_STATUS body from session index `first`, as many sessions as fit in one reply,
    /// for session `asker`. A worker that does not answer in time is left out.
    pub fn status_json(&self, first: u32, asker: u64) -> Vec<u8> {
        let workers: Vec<Arc<Worker>> = locked(&self.workers).values().cloned().collect();
        let daemon = DaemonStatus {
            version: env!("CARGO_PKG_VERSION"),
            protocol_version: VERSION,
            kernel: self.kernel,
            uptime_secs: self.started.elapsed().as_secs(),
            sessions: workers.len(),
            max_sessions: self.max_sessions,
            limits: self.limits,
            worker_deaths: locked(&self.deaths).clone(),
        };
        let budget = MAX_PAYLOAD - MAX_TEXT - 1024;
        let mut used = 0;
        let mut sessions = Vec::new();
        let mut next_session = None;
        let listed = workers.get(first as usize..).unwrap_or_default();
        let snapshots = self.snapshots(listed);
        for (index, snapshot) in snapshots.into_iter().enumerate() {
            let index = index + first as usize;
            let Some(session) = snapshot else {
                continue;
            };
            let size = serde_json::to_vec(&session).map_or(0, |v| v.len()) + 1;
            if used + size > budget && !sessions.is_empty() {
                next_session = Some(index as u32);
                break;
            }
            used += size;
            sessions.push(session);
        }
        serde_json::to_vec(&StatusReply {
            daemon,
            session: asker,
            sessions,
            next_session,
        })
        .unwrap_or_default()
    }

    /// Every worker's session, asked of all at once and collected until one deadline, so a
    /// worker that does not answer delays a status reply by [`GATHER_DEADLINE`] at most, and a
    /// reply reaches the asking worker within its own deadline. `None` for a worker that did
    /// not answer.
    fn snapshots(&self, workers: &[Arc<Worker>]) -> Vec<Option<serde_json::Value>> {
        let deadline = Instant::now() + GATHER_DEADLINE;
        let asked: Vec<Option<(u64, mpsc::Receiver<serde_json::Value>)>> = workers
            .iter()
            .map(|worker| {
                let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
                let (answer, answered) = mpsc::channel();
                locked(&worker.waiting).insert(seq, answer);
                if worker.query.send(&Message::Query { seq }).is_err() {
                    locked(&worker.waiting).remove(&seq);
                    return None;
                }
                Some((seq, answered))
            })
            .collect();
        asked
            .into_iter()
            .zip(workers)
            .map(|(asked, worker)| {
                let (seq, answered) = asked?;
                let left = deadline.saturating_duration_since(Instant::now());
                match answered.recv_timeout(left) {
                    Ok(session) => Some(session),
                    Err(_) => {
                        locked(&worker.waiting).remove(&seq);
                        warn!(
                            worker = worker.pid,
                            "a worker did not describe its session in time"
                        );
                        None
                    }
                }
            })
            .collect()
    }

    fn record_death(&self, how: String) {
        *locked(&self.deaths).entry(how).or_default() += 1;
    }
}

/// Answers one request of a connection that cannot be served, then closes it.
fn refuse(daemon: &Arc<Daemon>, stream: UnixStream, errno: Errno, text: String) {
    if daemon.refusing.fetch_add(1, Ordering::SeqCst) >= MAX_REFUSING {
        daemon.refusing.fetch_sub(1, Ordering::SeqCst);
        return;
    }
    let daemon = Arc::clone(daemon);
    std::thread::spawn(move || {
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        if let Ok(frame) = recv_frame(&stream, false) {
            let reply = Reply::error(errno.raw_os_error(), text);
            if let Ok(payload) = encode_reply(&reply) {
                let _ = send_frame(&stream, frame.header.request, true, &payload, &[]);
            }
        }
        daemon.refusing.fetch_sub(1, Ordering::SeqCst);
    });
}

/// Who is connecting.
struct Peer {
    pid: i32,
    uid: u32,
}

fn accept(daemon: &Arc<Daemon>, stream: UnixStream, allowed: &[u32]) {
    let cred = match rustix::net::sockopt::socket_peercred(&stream) {
        Ok(cred) => cred,
        Err(err) => {
            warn!(%err, "cannot read the peer's credentials; closing");
            return;
        }
    };
    let peer = Peer {
        pid: cred.pid.as_raw_nonzero().get(),
        uid: cred.uid.as_raw(),
    };
    if !allowed.contains(&peer.uid) {
        warn!(
            peer_pid = peer.pid,
            peer_uid = peer.uid,
            "refused a peer whose uid is not allowed"
        );
        let text = format!("uid {} may not use this sidecar", peer.uid);
        refuse(daemon, stream, Errno::ACCESS, text);
        return;
    }
    // Held until the worker is registered, so that two accepts cannot both take the last place.
    let mut workers = locked(&daemon.workers);
    if workers.len() >= daemon.max_sessions {
        drop(workers);
        warn!(
            peer_pid = peer.pid,
            max = daemon.max_sessions,
            "refused a session: limit reached"
        );
        let text = format!(
            "the sidecar already serves {} sessions, its limit",
            daemon.max_sessions
        );
        refuse(daemon, stream, Errno::AGAIN, text);
        return;
    }
    let id = daemon.next_id.fetch_add(1, Ordering::SeqCst);
    let (child, query, status) = match start_worker(daemon, stream, id, &peer) {
        Ok(started) => started,
        Err(err) => {
            error!(session = id, %err, "cannot start a worker; closing the connection");
            return;
        }
    };
    let answers = match query.try_clone() {
        Ok(answers) => answers,
        Err(err) => {
            error!(session = id, %err, "cannot read the worker's answers; stopping it");
            stop(child.id(), Signal::KILL);
            return;
        }
    };
    let worker = Arc::new(Worker {
        pid: child.id(),
        query,
        waiting: Mutex::new(HashMap::new()),
    });
    workers.insert(id, Arc::clone(&worker));
    drop(workers);
    let reading = Arc::clone(&worker);
    let reader = std::thread::Builder::new()
        .name(format!("answers-{id}"))
        .spawn(move || read_answers(reading, answers));
    if let Err(err) = reader {
        // Its status would never be read; the supervisor still reaps it.
        error!(session = id, %err, "cannot read the worker's answers; stopping it");
        stop(worker.pid, Signal::KILL);
    }
    info!(
        session = id,
        worker = worker.pid,
        peer_pid = peer.pid,
        peer_uid = peer.uid,
        "session started"
    );
    let supervising = Arc::clone(daemon);
    let spawned = std::thread::Builder::new()
        .name(format!("session-{id}"))
        .spawn(move || supervise(&supervising, id, child, status));
    if let Err(err) = spawned {
        // Without its supervisor the worker could not be reaped: stop it now.
        error!(session = id, %err, "cannot supervise the worker; stopping it");
        stop(worker.pid, Signal::KILL);
        locked(&daemon.workers).remove(&id);
    }
}

/// Executes this binary again as the session's worker, the connection and its ends of the
/// control channels inherited. Only the accept loop starts processes, so no other exec can
/// inherit the fds while they are not close-on-exec.
fn start_worker(
    daemon: &Daemon,
    stream: UnixStream,
    id: u64,
    peer: &Peer,
) -> io::Result<(Child, Channel, Channel)> {
    let (query, query_theirs) = control::pair()?;
    let (status, status_theirs) = control::pair()?;
    let connection = OwnedFd::from(stream);
    for fd in [&connection, &query_theirs, &status_theirs] {
        rustix::io::fcntl_setfd(fd, FdFlags::empty())?;
    }
    let raw = |fd: &OwnedFd| std::os::fd::AsRawFd::as_raw_fd(fd).to_string();
    let command = &daemon.command;
    let mut worker = Command::new(&command.exe);
    worker
        .arg0("tce-sidecar")
        .arg("worker")
        .args(["--connection-fd", &raw(&connection)])
        .args(["--query-fd", &raw(&query_theirs)])
        .args(["--status-fd", &raw(&status_theirs)])
        .args(["--listener-pid", &std::process::id().to_string()])
        .args(["--session", &id.to_string()])
        .args(["--peer-pid", &peer.pid.to_string()])
        .args(["--peer-uid", &peer.uid.to_string()])
        .args(["--features", &daemon.features.to_string()])
        .args(["--log-level", &command.log_level.to_string()])
        .args(["--kernel", command.kernel.name()])
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    if let Some(path) = &command.model_socket {
        worker.arg("--model-socket").arg(path);
    }
    let child = worker.spawn()?;
    // The listener's copies close here: the connection is the worker's alone.
    drop((connection, query_theirs, status_theirs));
    Ok((child, query, status))
}

/// Serves a worker's GET_STATUS requests until its status channel ends, then reaps it.
fn supervise(daemon: &Daemon, id: u64, mut child: Child, status: Channel) {
    loop {
        match status.recv(None) {
            Ok(Some(Message::StatusRequest { seq, first })) => {
                let body = String::from_utf8(daemon.status_json(first, id)).unwrap_or_default();
                if status.send(&Message::StatusReply { seq, body }).is_err() {
                    break;
                }
            }
            Ok(Some(other)) => warn!(session = id, ?other, "unexpected control message"),
            Ok(None) => break,
            Err(err) => {
                warn!(session = id, %err, "the worker's status channel failed");
                break;
            }
        }
    }
    // Removed before it is reaped: a signal sent by pid then never reaches a reused pid.
    locked(&daemon.workers).remove(&id);
    let pid = child.id();
    let exit = child.wait();
    daemon.backend.process_exited(pid);
    match exit {
        Ok(exit) => match (exit.signal(), exit.code()) {
            (Some(signal), _) => {
                let name = signal_name(signal);
                warn!(session = id, worker = pid, signal = %name, "a worker was killed; only its session ended");
                daemon.record_death(name);
            }
            (None, Some(0)) => info!(session = id, worker = pid, "worker exited"),
            (None, code) => {
                let how = format!("exit {}", code.unwrap_or(-1));
                warn!(session = id, worker = pid, how = %how, "a worker failed; only its session ended");
                daemon.record_death(how);
            }
        },
        Err(err) => error!(session = id, worker = pid, %err, "cannot reap a worker"),
    }
}

fn signal_name(signal: i32) -> String {
    let known = [
        (libc::SIGKILL, "SIGKILL"),
        (libc::SIGSEGV, "SIGSEGV"),
        (libc::SIGBUS, "SIGBUS"),
        (libc::SIGABRT, "SIGABRT"),
        (libc::SIGSYS, "SIGSYS"),
        (libc::SIGTERM, "SIGTERM"),
        (libc::SIGILL, "SIGILL"),
        (libc::SIGFPE, "SIGFPE"),
    ];
    known.iter().find(|(s, _)| *s == signal).map_or_else(
        || format!("signal {signal}"),
        |(_, name)| (*name).to_owned(),
    )
}

fn stop(pid: u32, signal: Signal) {
    if let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) {
        let _ = kill_process(pid, signal);
    }
}

/// Serves until SIGTERM or SIGINT, then stops every worker and returns.
pub fn serve(daemon: Arc<Daemon>, config: Config) -> Result<(), DaemonError> {
    let (listener, created) = match config.listen {
        Listen::Path(path) => (bind(&path)?, Some(path)),
        Listen::Inherited(fd) => (UnixListener::from(fd), None),
    };
    listener
        .set_nonblocking(true)
        .map_err(DaemonError::Accept)?;
    let (mut wake_read, wake_write) = UnixStream::pair().map_err(DaemonError::Signals)?;
    let signal_write = wake_write.try_clone().map_err(DaemonError::Signals)?;
    signal_hook::low_level::pipe::register(signal_hook::consts::SIGTERM, wake_write)
        .map_err(DaemonError::Signals)?;
    signal_hook::low_level::pipe::register(signal_hook::consts::SIGINT, signal_write)
        .map_err(DaemonError::Signals)?;
    info!(
        kernel = daemon.kernel,
        features = daemon.features,
        "tce-sidecar serving"
    );
    if daemon.kernel == "model" {
        warn!("sessions run on the MODEL kernel, a simulation: no real device is programmed");
    }

    'serve: loop {
        let mut fds = [
            PollFd::new(&listener, PollFlags::IN),
            PollFd::new(&wake_read, PollFlags::IN),
        ];
        match poll(&mut fds, None) {
            Ok(_) => {}
            // A signal interrupted the wait; its handler wrote to the wake socket.
            Err(Errno::INTR) => continue,
            Err(err) => return Err(DaemonError::Accept(err.into())),
        }
        if !fds[1].revents().is_empty() {
            break 'serve;
        }
        loop {
            match listener.accept() {
                Ok((stream, _)) => accept(&daemon, stream, &config.allowed_uids),
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                // A connection that died before accept, or out of fds: keep serving the others.
                Err(err) => {
                    warn!(%err, "accept failed");
                    break;
                }
            }
        }
    }

    let mut byte = [0u8; 1];
    let _ = wake_read.read(&mut byte);
    info!(sessions = daemon.session_count(), "shutting down");
    drop(listener);
    if let Some(path) = created {
        let _ = std::fs::remove_file(path);
    }
    stop_workers(&daemon);
    Ok(())
}

/// Asks every worker to tear its session down (SIGTERM), and kills those still running after
/// the grace period.
fn stop_workers(daemon: &Daemon) {
    for worker in locked(&daemon.workers).values() {
        stop(worker.pid, Signal::TERM);
    }
    let deadline = Instant::now() + SHUTDOWN_GRACE;
    while daemon.session_count() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let left: Vec<u32> = locked(&daemon.workers).values().map(|w| w.pid).collect();
    if !left.is_empty() {
        warn!(
            workers = left.len(),
            "workers still tearing down at exit; killing them"
        );
        for pid in left {
            stop(pid, Signal::KILL);
        }
        let deadline = Instant::now() + Duration::from_millis(300);
        while daemon.session_count() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
