//! The `tce-sidecar` daemon: the listener (the socket, peer checks, one worker process per
//! session, the status reply, an orderly shutdown on SIGTERM/SIGINT) and the worker that serves
//! one session in a sandbox.
//!
//! It owns processes, sockets and fds; it makes no decision about DMA state (the engine does)
//! and makes kernel calls only through a [`Kernel`](crate::kernel::Kernel) backend.

pub mod cli;
mod control;
mod listener;
mod objects;
pub mod sandbox;
mod session;
pub mod status;
pub mod worker;

pub use listener::{serve, Daemon, WorkerCommand};

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use rustix::io::Errno;
use serde::Serialize;
use tracing::error;

use crate::kernel::linux::{self, HostCaps};
use crate::kernel::model::server::ModelServer;
use crate::kernel::model::{ModelKernel, Platform};
use crate::protocol::{
    recv_frame, send_frame, FEATURE_EEH, FEATURE_FDS_BY_MODE, FEATURE_MODE_ACCELERATED,
    FEATURE_MODE_ISOLATED, FEATURE_REBUILD, VERSION,
};

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
    #[error("a worker needs --model-socket with --kernel model")]
    NoModelSocket,
    #[error("the listener that started this worker is gone")]
    ListenerGone,
    #[error("the worker cannot start")]
    Worker(#[source] io::Error),
    #[error("the worker's sandbox cannot be entered")]
    Sandbox(#[source] sandbox::SandboxError),
}

/// The kernel sessions run on: the real one, or the model for demos and tests.
pub trait Backend: Send + Sync {
    /// `linux` or `model`, shown in logs and status.
    fn name(&self) -> &'static str;
    /// What the kernel offers the product.
    fn caps(&self) -> HostCaps;
    /// A worker exited and was reaped. The real kernel has released what it held by then; a
    /// simulated one is told here.
    fn process_exited(&self, _pid: u32) {}
    /// Releases what the backend holds outside sessions, at exit.
    fn shutdown(&self) {}
}

/// The real kernel.
pub struct LinuxBackend {
    caps: HostCaps,
}

impl LinuxBackend {
    pub fn new() -> Self {
        let caps = linux::host_caps();
        if !caps.spapr_tce_vfio {
            // Say why accelerated mode is not offered when the reason is the sidecar's own
            // access, not the host: it only asks /dev/kvm for KVM_CAP_SPAPR_TCE_VFIO.
            let flags = rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC;
            let opened = rustix::fs::open("/dev/kvm", flags, rustix::fs::Mode::empty());
            if let Err(errno @ (Errno::ACCESS | Errno::PERM)) = opened {
                tracing::warn!(
                    %errno,
                    "cannot open /dev/kvm: accelerated mode is not offered; the sidecar only \
                     asks it whether KVM can take TCE updates over (KVM_CAP_SPAPR_TCE_VFIO), so \
                     give its user read access (on Debian, the kvm group)"
                );
            }
        }
        Self { caps }
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
}

/// The model kernel, for demos and tests: the listener serves it on a second socket, to
/// front-ends and to its own workers alike, each a process with its own mm. Never chosen unless
/// asked for.
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
    fn process_exited(&self, pid: u32) {
        self.server.process_exited(crate::kernel::model::Mm(pid));
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
    }
    capabilities(&Described(HostCaps {
        spapr_tce_vfio: true,
        eeh: platform.eeh,
        vfio: true,
    }))
}

/// The features a backend lets sessions negotiate: accelerated only where KVM can associate
/// its tables with VFIO groups, isolated only where VFIO containers exist. Requests may always
/// carry only the fds their mode uses.
pub fn features(caps: HostCaps) -> u64 {
    let mut features = 0;
    if caps.spapr_tce_vfio && caps.vfio {
        features |= FEATURE_MODE_ACCELERATED | FEATURE_REBUILD;
    }
    if caps.vfio {
        features |= FEATURE_MODE_ISOLATED | FEATURE_FDS_BY_MODE;
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
        features: pick(&[
            (FEATURE_EEH, "eeh"),
            (FEATURE_REBUILD, "rebuild"),
            (FEATURE_FDS_BY_MODE, "fds-by-mode"),
        ]),
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
    // The socket appears at `path` only once it listens: bound under a temporary name beside
    // it, then renamed, so a client that sees the file is never refused (ECONNREFUSED). A path
    // too long for a temporary sibling is bound in place.
    let temporary = temporary_sibling(path);
    let bound = temporary.as_deref().unwrap_or(path);
    if let Some(stale) = &temporary {
        let _ = std::fs::remove_file(stale);
    }
    // The umask applies at bind time, so the socket never exists with a wider mode.
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
    let listener = UnixListener::bind(bound);
    rustix::process::umask(old);
    let listener = listener.map_err(bind_error)?;
    if let Some(temporary) = &temporary {
        if let Err(source) = std::fs::rename(temporary, path) {
            let _ = std::fs::remove_file(temporary);
            return Err(bind_error(source));
        }
    }
    Ok(listener)
}

/// `DIR/.NAME.PID` beside `DIR/NAME`, if it fits a socket address (107 bytes and a NUL).
fn temporary_sibling(path: &Path) -> Option<PathBuf> {
    let name = path.file_name()?.to_str()?;
    let temporary = path.with_file_name(format!(".{name}.{}", std::process::id()));
    (temporary.as_os_str().len() <= 107).then_some(temporary)
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
