//! `tce-sidecar conformance backend`: the conformance suite, played as a front-end against the
//! back-end listening on a socket.
//!
//! Checks that need owner operations or kernel objects (VFIO groups, KVM TCE tables, guest
//! RAM) make them on the model kernel the back-end runs on (`protocol/MODEL.md`), as this
//! process; against a back-end on another kernel they are skipped, each with its reason.

mod accelerated;
mod framing;
pub mod front_end;
mod isolated;
mod state;
mod trust;

use std::error::Error;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::report::Report;
use super::wire::*;
use super::{run_checks, Check, Failure, OutputArgs};
use crate::ensure;
use front_end::FrontEnd;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The back-end's socket.
    #[arg(long, value_name = "PATH", required_unless_present = "list")]
    pub socket: Option<PathBuf>,
    /// The model kernel's socket (`MODEL.md`), for the checks that need kernel objects.
    /// Default: PATH.model, when the back-end's GET_STATUS says it runs on the model.
    #[arg(long, value_name = "PATH")]
    pub model_socket: Option<PathBuf>,
    /// How long to wait for each reply, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 10_000)]
    pub deadline_ms: u64,
    /// Print the checks, with the section of the spec each one checks, and exit.
    #[arg(long)]
    pub list: bool,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// The back-end under test.
pub struct Peer {
    pub socket: PathBuf,
    pub model_socket: Option<PathBuf>,
    pub deadline: Duration,
}

impl Peer {
    pub fn connect(&self) -> Result<Conn, String> {
        Conn::connect(&self.socket, self.deadline)
    }

    /// A connection whose session negotiated `features`, or a skip when the back-end does
    /// not offer them.
    pub fn session(&self, features: u64) -> Result<Conn, Failure> {
        let conn = self.connect()?;
        let offered = offered(&conn)?;
        if offered & features != features {
            return Err(Failure::Skip(format!(
                "the back-end does not offer features {:#x}",
                features & !offered
            )));
        }
        let reply = conn.call(SET_FEATURES, &features.to_le_bytes())?.ok()?;
        ensure!(
            reply.body == features.to_le_bytes(),
            "SET_FEATURES {features:#x} echoed {:?}",
            reply.body
        );
        Ok(conn)
    }

    /// A front-end VM on the back-end's model kernel, or a skip.
    pub fn front_end(&self) -> Result<FrontEnd, Failure> {
        match &self.model_socket {
            Some(path) => Ok(FrontEnd::new(path)?),
            None => Err(Failure::Skip(
                "needs kernel objects, and the back-end does not run on the model kernel \
                 (give --model-socket if it does)"
                    .to_owned(),
            )),
        }
    }
}

/// The features the back-end offers (`GET_FEATURES`).
pub fn offered(conn: &Conn) -> Result<u64, String> {
    conn.call(GET_FEATURES, &[])?.ok()?.body_u64(0)
}

/// `GET_STATUS` from `first_session`, parsed.
pub fn status_page(conn: &Conn, first_session: u32) -> Result<serde_json::Value, String> {
    let reply = conn
        .call(GET_STATUS, &Le::new().u32(first_session).u32(0).bytes())?
        .ok()?;
    serde_json::from_slice(&reply.body).map_err(|e| format!("GET_STATUS is not JSON: {e}"))
}

/// Every session the back-end lists, across the pages of `GET_STATUS`.
pub fn all_sessions(conn: &Conn) -> Result<Vec<serde_json::Value>, String> {
    let mut first = 0u32;
    let mut all = Vec::new();
    loop {
        let page = status_page(conn, first)?;
        all.extend(page["sessions"].as_array().cloned().unwrap_or_default());
        match page["next_session"].as_u64() {
            None => return Ok(all),
            Some(next) if next > u64::from(first) && next <= u64::from(u32::MAX) => {
                first = next as u32
            }
            Some(next) => return Err(format!("GET_STATUS: next_session {next} after {first}")),
        }
    }
}

/// The asking session's own entry of `GET_STATUS`.
pub fn own_session(conn: &Conn) -> Result<serde_json::Value, String> {
    let mut first = 0u32;
    loop {
        let page = status_page(conn, first)?;
        let me = page["session"].clone();
        if let Some(entry) = page["sessions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["id"] == me)
        {
            return Ok(entry.clone());
        }
        match page["next_session"].as_u64() {
            Some(next) if next > u64::from(first) && next <= u64::from(u32::MAX) => {
                first = next as u32
            }
            _ => return Err(format!("GET_STATUS does not list the asking session {me}")),
        }
    }
}

/// The process serving the session (`worker_pid`, §7.3).
pub fn worker_pid(conn: &Conn) -> Result<u32, String> {
    own_session(conn)?["worker_pid"]
        .as_u64()
        .map(|pid| pid as u32)
        .ok_or_else(|| "GET_STATUS gives no worker_pid for the session".to_owned())
}

/// The host's page size: the unit of a region's alignment (§7.4).
pub fn page() -> u64 {
    rustix::param::page_size() as u64
}

/// `MEM_ADD` (and its `MEM_REMOVE`) of region `id`: `size` bytes at guest address `guest`.
pub fn region(id: u32, guest: u64, size: u64) -> Vec<u8> {
    Le::new()
        .u32(id)
        .u32(0)
        .u64(guest)
        .u64(size)
        .u64(0x7000_0000 + guest)
        .u64(0)
        .bytes()
}

/// One ownership mode the back-end offers in `features`: `preferred` if it offers it. A
/// back-end on a host without sPAPR VFIO offers none, and the check is skipped.
pub fn offered_mode(features: u64, preferred: u64) -> Result<u64, Failure> {
    match (
        features & preferred,
        features & (MODE_ACCELERATED | MODE_ISOLATED),
    ) {
        (0, 0) => Err(Failure::Skip(
            "the back-end offers no ownership mode (its host has no sPAPR VFIO)".to_owned(),
        )),
        (0, other) => Ok(other),
        _ => Ok(preferred),
    }
}

/// Waits until `GET_STATUS` no longer lists session `id`, as it must once the session ended.
pub fn wait_session_gone(peer: &Peer, id: &serde_json::Value) -> Result<(), String> {
    let watcher = peer.connect()?;
    let until = std::time::Instant::now() + peer.deadline;
    while all_sessions(&watcher)?.iter().any(|s| s["id"] == *id) {
        if std::time::Instant::now() >= until {
            return Err(format!(
                "the ended session {id} is still listed after the deadline"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// `u32 id, u32 reserved`: the payload of the requests that name one object.
pub fn id(v: u32) -> Vec<u8> {
    Le::new().u32(v).u32(0).bytes()
}

pub fn group_add(group: u32, container: u32, iommu_group: u32) -> Vec<u8> {
    Le::new()
        .u32(group)
        .u32(container)
        .u32(iommu_group)
        .u32(0)
        .bytes()
}

pub fn eeh(container: u32, op: u32) -> Vec<u8> {
    Le::new()
        .u32(container)
        .u32(op)
        .u32(0)
        .u32(0)
        .u64(0)
        .u64(0)
        .bytes()
}

/// `TCE_UPDATE` of `entries` `INLINE` from `first_index`.
pub fn tce_inline(table: u32, first_index: u64, entries: &[u64]) -> Vec<u8> {
    let mut payload = Le::new()
        .u32(table)
        .u32(1)
        .u64(first_index)
        .u32(entries.len() as u32)
        .u32(0);
    for entry in entries {
        payload = payload.u64(*entry);
    }
    payload.bytes()
}

/// Every check, in the order they run.
fn checks() -> Vec<Check<Peer>> {
    [
        framing::CHECKS,
        state::CHECKS,
        accelerated::CHECKS,
        isolated::CHECKS,
        trust::CHECKS,
    ]
    .iter()
    .flat_map(|group| group.iter())
    .map(|check| Check {
        name: check.name,
        spec: check.spec,
        run: check.run,
    })
    .collect()
}

/// The model socket: as given, else `PATH.model` when the back-end says it runs on the model.
fn model_socket(args: &Args, socket: &Path, deadline: Duration) -> Option<PathBuf> {
    if args.model_socket.is_some() {
        return args.model_socket.clone();
    }
    let conn = Conn::connect(socket, deadline).ok()?;
    let status = status_page(&conn, 0).ok()?;
    (status["daemon"]["kernel"] == "model").then(|| {
        let mut path = socket.as_os_str().to_owned();
        path.push(".model");
        PathBuf::from(path)
    })
}

pub fn run(args: Args) -> Result<bool, Box<dyn Error>> {
    let checks = checks();
    if args.list {
        for check in &checks {
            println!("{}  ({})", check.name, check.spec);
        }
        return Ok(true);
    }
    let deadline = Duration::from_millis(args.deadline_ms);
    let socket = args.socket.as_deref().ok_or("--socket PATH is required")?;
    if !socket.exists() {
        return Err(format!("{}: no such socket", socket.display()).into());
    }
    let peer = Peer {
        model_socket: model_socket(&args, socket, deadline),
        socket: socket.to_owned(),
        deadline,
    };
    let out = Box::new(std::io::stdout());
    let mut report = Report::new("backend", args.output.format, out);
    run_checks(&mut report, &checks, &peer, &args.output.only);
    super::finish(report, &args.output)
}
