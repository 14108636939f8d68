//! The `tce-sidecar` daemon: the listening socket, peer checks, one thread per session, the
//! status reply, and an orderly shutdown on SIGTERM/SIGINT.
//!
//! It owns processes, sockets and fds; it makes no decision about DMA state (the engine does)
//! and makes kernel calls only through a [`Kernel`] backend.

pub mod cli;
mod objects;
mod session;
pub mod status;

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags};
use rustix::io::Errno;
use serde::Serialize;
use tracing::{error, info, warn};

use crate::engine::{Host, Limits, Session};
use crate::kernel::linux::{self, HostCaps, Linux};
use crate::kernel::model::server::ModelServer;
use crate::kernel::model::{ModelKernel, Platform};
use crate::kernel::Kernel;
use crate::protocol::{
    encode_reply, recv_frame, send_frame, Reply, FEATURE_EEH, FEATURE_MODE_ACCELERATED,
    FEATURE_MODE_ISOLATED, FEATURE_REBUILD, MAX_PAYLOAD, MAX_TEXT, VERSION,
};
use session::SessionEntry;
use status::{DaemonStatus, SessionStatus, StatusReply};

/// How long shutdown waits for sessions to tear down before exiting anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(1500);
/// Connections being refused at once (each gets a thread that answers one request).
const MAX_REFUSING: usize = 16;

/// Errors that stop the daemon. Printed once, with their chain, by `main`.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("give exactly one of --socket-path, --fd or systemd socket activation (LISTEN_FDS)")]
    NoListener,
    #[error("cannot listen on {path}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("fd {fd} is not an inherited listening unix socket")]
    BadFd { fd: i32, source: Errno },
    #[error("systemd passed {0} sockets; tce-sidecar serves exactly one")]
    ActivationCount(String),
    #[error("cannot install the SIGTERM/SIGINT handlers")]
    Signals(#[source] io::Error),
    #[error("the accept loop failed")]
    Accept(#[source] io::Error),
}

/// The kernel sessions run on: the real one, or the model for demos and tests.
pub trait Backend: Send + Sync {
    /// `linux` or `model`, shown in logs and status.
    fn name(&self) -> &'static str;
    /// What the kernel offers the product.
    fn caps(&self) -> HostCaps;
    /// A kernel handle for one session (it keeps the containers that session opens).
    fn session_kernel(&self, peer_pid: i32) -> Box<dyn Kernel + Send>;
    /// Releases what the backend holds outside sessions, at exit.
    fn shutdown(&self) {}
}

/// The real kernel.
pub struct LinuxBackend {
    caps: HostCaps,
}

impl LinuxBackend {
    pub fn new() -> Self {
        Self {
            caps: linux::host_caps(),
        }
    }
}

impl Default for LinuxBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl Backend for LinuxBackend {
    fn name(&self) -> &'static str {
        "linux"
    }
    fn caps(&self) -> HostCaps {
        self.caps
    }
    fn session_kernel(&self, _peer_pid: i32) -> Box<dyn Kernel + Send> {
        Box::new(Linux::new())
    }
}

/// The model kernel, for demos and tests: the daemon serves it to front-ends on a second socket
/// and runs its own sessions on it as the sidecar process. Never chosen unless asked for.
pub struct ModelBackend {
    server: ModelServer,
    eeh: bool,
    socket: PathBuf,
}

impl ModelBackend {
    /// Simulates `platform` with IOMMU groups `groups`, and serves it on `socket`.
    pub fn start(platform: Platform, groups: &[u32], socket: &Path) -> Result<Self, DaemonError> {
        let eeh = platform.eeh;
        let server = ModelServer::new(ModelKernel::new(platform, groups));
        let listener = bind(socket)?;
        let serving = server.clone();
        std::thread::Builder::new()
            .name("model-kernel".into())
            .spawn(move || {
                if let Err(err) = serving.serve(listener) {
                    error!(%err, "the model kernel stopped serving");
                }
            })
            .map_err(DaemonError::Signals)?;
        Ok(Self {
            server,
            eeh,
            socket: socket.to_owned(),
        })
    }

    pub fn server(&self) -> &ModelServer {
        &self.server
    }
}

impl Backend for ModelBackend {
    fn name(&self) -> &'static str {
        "model"
    }
    fn caps(&self) -> HostCaps {
        HostCaps {
            spapr_tce_vfio: true,
            eeh: self.eeh,
            vfio: true,
        }
    }
    fn session_kernel(&self, _peer_pid: i32) -> Box<dyn Kernel + Send> {
        Box::new(crate::kernel::model_backend::ModelBackend::new(
            self.server.handle(),
        ))
    }
    fn shutdown(&self) {
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// `--print-capabilities` of the model kernel, without starting it.
pub fn model_capabilities(platform: &Platform) -> Capabilities {
    struct Described(HostCaps);
    impl Backend for Described {
        fn name(&self) -> &'static str {
            "model"
        }
        fn caps(&self) -> HostCaps {
            self.0
        }
        fn session_kernel(&self, _: i32) -> Box<dyn Kernel + Send> {
            Box::new(Linux::new())
        }
    }
    capabilities(&Described(HostCaps {
        spapr_tce_vfio: true,
        eeh: platform.eeh,
        vfio: true,
    }))
}

/// The features a backend lets sessions negotiate: accelerated only where KVM can associate
/// its tables with VFIO groups, isolated only where VFIO containers exist.
pub fn features(caps: HostCaps) -> u64 {
    let mut features = 0;
    if caps.spapr_tce_vfio && caps.vfio {
        features |= FEATURE_MODE_ACCELERATED | FEATURE_REBUILD;
    }
    if caps.vfio {
        features |= FEATURE_MODE_ISOLATED;
    }
    if caps.eeh {
        features |= FEATURE_EEH;
    }
    features
}

/// `--print-capabilities`.
#[derive(Serialize)]
pub struct Capabilities {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub version: &'static str,
    pub protocol_version: u32,
    pub kernel: &'static str,
    pub modes: Vec<&'static str>,
    pub features: Vec<&'static str>,
}

pub fn capabilities(backend: &dyn Backend) -> Capabilities {
    let f = features(backend.caps());
    let pick = |bits: &[(u64, &'static str)]| {
        bits.iter()
            .filter(|(b, _)| f & b != 0)
            .map(|(_, n)| *n)
            .collect()
    };
    Capabilities {
        kind: "spapr-tce-iommu",
        version: env!("CARGO_PKG_VERSION"),
        protocol_version: VERSION,
        kernel: backend.name(),
        modes: pick(&[
            (FEATURE_MODE_ACCELERATED, "accelerated"),
            (FEATURE_MODE_ISOLATED, "isolated"),
        ]),
        features: pick(&[(FEATURE_EEH, "eeh"), (FEATURE_REBUILD, "rebuild")]),
    }
}

/// Where the daemon listens.
pub enum Listen {
    /// A socket file it creates (and removes at exit).
    Path(PathBuf),
    /// An inherited listening socket (`--fd` or systemd socket activation).
    Inherited(OwnedFd),
}

pub struct Config {
    pub listen: Listen,
    /// Peer uids allowed to connect (SO_PEERCRED); others are refused and logged.
    pub allowed_uids: Vec<u32>,
}

/// The daemon's shared state.
pub struct Daemon {
    backend: Box<dyn Backend>,
    host: Host,
    started: Instant,
    max_sessions: usize,
    sessions: Mutex<BTreeMap<u64, Arc<SessionEntry>>>,
    next_id: AtomicU64,
    refusing: AtomicUsize,
}

impl Daemon {
    pub fn new(backend: Box<dyn Backend>, max_sessions: usize, limits: Limits) -> Self {
        let host = Host {
            features: features(backend.caps()),
            page_size: rustix::param::page_size() as u64,
            limits,
        };
        Self {
            backend,
            host,
            started: Instant::now(),
            max_sessions,
            sessions: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(1),
            refusing: AtomicUsize::new(0),
        }
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<SessionEntry>>> {
        self.sessions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn remove_session(&self, id: u64) {
        self.sessions().remove(&id);
    }

    pub fn session_count(&self) -> usize {
        self.sessions().len()
    }

    /// The GET_STATUS body from session index `first`, as many sessions as fit in one reply.
    pub fn status_json(&self, first: u32) -> Vec<u8> {
        let entries: Vec<Arc<SessionEntry>> = self.sessions().values().cloned().collect();
        let daemon = DaemonStatus {
            version: env!("CARGO_PKG_VERSION"),
            protocol_version: VERSION,
            kernel: self.backend.name(),
            uptime_secs: self.started.elapsed().as_secs(),
            sessions: entries.len(),
            max_sessions: self.max_sessions,
            limits: self.host.limits,
        };
        let budget = MAX_PAYLOAD - MAX_TEXT - 1024;
        let mut used = 0;
        let mut sessions = Vec::new();
        let mut next_session = None;
        for (index, entry) in entries.iter().enumerate().skip(first as usize) {
            let status = {
                let engine = entry.engine();
                let uptime = entry.started.elapsed().as_secs();
                SessionStatus::new(entry.id, entry.peer_pid, entry.peer_uid, uptime, &engine)
            };
            let size = serde_json::to_vec(&status).map_or(0, |v| v.len()) + 1;
            if used + size > budget && !sessions.is_empty() {
                next_session = Some(index as u32);
                break;
            }
            used += size;
            sessions.push(status);
        }
        serde_json::to_vec(&StatusReply {
            daemon,
            sessions,
            next_session,
        })
        .unwrap_or_default()
    }
}

/// Adopts the listening socket systemd passed (LISTEN_PID/LISTEN_FDS), if any.
pub fn socket_activation() -> Result<Option<OwnedFd>, DaemonError> {
    let pid = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok());
    if pid != Some(std::process::id()) {
        return Ok(None);
    }
    match std::env::var("LISTEN_FDS").as_deref() {
        Ok("1") => {
            let fd = linux::adopt_listening_socket(3)
                .map_err(|source| DaemonError::BadFd { fd: 3, source })?;
            Ok(Some(fd))
        }
        Ok(other) => Err(DaemonError::ActivationCount(other.to_owned())),
        Err(_) => Ok(None),
    }
}

/// Binds a new socket file readable and writable by its owner only.
pub fn bind(path: &Path) -> Result<UnixListener, DaemonError> {
    let bind_error = |source| DaemonError::Bind {
        path: path.to_owned(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) => {
            std::fs::remove_file(path).map_err(bind_error)?;
        }
        Ok(_) => {
            return Err(bind_error(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "a non-socket file is in the way",
            )))
        }
        Err(_) => {}
    }
    // The umask applies at bind time, so the socket never exists with a wider mode.
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
    let listener = UnixListener::bind(path);
    rustix::process::umask(old);
    listener.map_err(bind_error)
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

fn accept(daemon: &Arc<Daemon>, stream: UnixStream, allowed: &[u32]) {
    let cred = match rustix::net::sockopt::socket_peercred(&stream) {
        Ok(cred) => cred,
        Err(err) => {
            warn!(%err, "cannot read the peer's credentials; closing");
            return;
        }
    };
    let (pid, uid) = (cred.pid.as_raw_nonzero().get(), cred.uid.as_raw());
    if !allowed.contains(&uid) {
        warn!(
            peer_pid = pid,
            peer_uid = uid,
            "refused a peer whose uid is not allowed"
        );
        refuse(
            daemon,
            stream,
            Errno::ACCESS,
            format!("uid {uid} may not use this sidecar"),
        );
        return;
    }
    let mut sessions = daemon.sessions();
    if sessions.len() >= daemon.max_sessions {
        drop(sessions);
        warn!(
            peer_pid = pid,
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
    let shutdown_handle = match stream.try_clone() {
        Ok(handle) => handle,
        Err(err) => {
            warn!(%err, "cannot keep a handle on the connection; closing");
            return;
        }
    };
    let id = daemon.next_id.fetch_add(1, Ordering::SeqCst);
    let entry = Arc::new(SessionEntry {
        id,
        peer_pid: pid,
        peer_uid: uid,
        started: Instant::now(),
        engine: Mutex::new(Session::new(daemon.host)),
        stream: shutdown_handle,
    });
    sessions.insert(id, Arc::clone(&entry));
    drop(sessions);
    info!(
        session = id,
        peer_pid = pid,
        peer_uid = uid,
        "session started"
    );
    let kernel = daemon.backend.session_kernel(pid);
    let thread_daemon = Arc::clone(daemon);
    let spawned = std::thread::Builder::new()
        .name(format!("session-{id}"))
        .spawn(move || session::serve(thread_daemon, entry, stream, kernel));
    if let Err(err) = spawned {
        error!(session = id, %err, "cannot start the session's thread");
        daemon.remove_session(id);
    }
}

/// Serves until SIGTERM or SIGINT, then tears every session down and returns.
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
        kernel = daemon.backend.name(),
        features = daemon.host.features,
        "tce-sidecar serving"
    );
    if daemon.backend.name() == "model" {
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
    for entry in daemon.sessions().values() {
        let _ = entry.stream.shutdown(std::net::Shutdown::Both);
    }
    let deadline = Instant::now() + SHUTDOWN_GRACE;
    while daemon.session_count() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let left = daemon.session_count();
    if left > 0 {
        warn!(sessions = left, "sessions still tearing down at exit");
    }
    daemon.backend.shutdown();
    Ok(())
}

/// `tce-sidecar status`: asks a running sidecar for every page of its status.
pub fn query_status(socket: &Path) -> Result<serde_json::Value, StatusError> {
    let stream = UnixStream::connect(socket).map_err(|source| StatusError::Connect {
        path: socket.to_owned(),
        source,
    })?;
    let mut first = 0u32;
    let mut merged: Option<serde_json::Value> = None;
    loop {
        let request = crate::protocol::Request::GetStatus {
            first_session: first,
        };
        let payload = crate::protocol::encode_request(&request);
        send_frame(&stream, request.code() as u32, false, &payload, &[])
            .map_err(StatusError::Io)?;
        let frame = recv_frame(&stream, true).map_err(StatusError::Recv)?;
        let reply = crate::protocol::decode_reply(&frame.header, &frame.payload, frame.fds.len())
            .map_err(|e| StatusError::Reply(e.to_string()))?;
        if reply.status != 0 {
            return Err(StatusError::Reply(reply.text));
        }
        let mut page: serde_json::Value =
            serde_json::from_slice(&reply.body).map_err(|e| StatusError::Reply(e.to_string()))?;
        let next = page.get("next_session").and_then(|n| n.as_u64());
        match merged.as_mut() {
            None => merged = Some(page),
            Some(all) => {
                let more = page["sessions"]
                    .as_array_mut()
                    .map(std::mem::take)
                    .unwrap_or_default();
                if let Some(list) = all["sessions"].as_array_mut() {
                    list.extend(more);
                }
            }
        }
        match next {
            Some(n) if n > u64::from(first) => first = n as u32,
            _ => break,
        }
    }
    let mut all = merged.unwrap_or_default();
    all["next_session"] = serde_json::Value::Null;
    Ok(all)
}

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("cannot connect to {path}")]
    Connect { path: PathBuf, source: io::Error },
    #[error("socket error")]
    Io(#[source] io::Error),
    #[error("no reply")]
    Recv(#[source] crate::protocol::RecvError),
    #[error("bad reply: {0}")]
    Reply(String),
}

/// Keeps `fd` usable by the listener (`--fd`): it must be a listening unix stream socket.
pub fn inherited(fd: i32) -> Result<OwnedFd, DaemonError> {
    linux::adopt_listening_socket(fd).map_err(|source| DaemonError::BadFd { fd, source })
}
