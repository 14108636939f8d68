//! The GET_STATUS reply: JSON describing the daemon and each session (spec §7.3).

use std::collections::BTreeMap;

use serde::Serialize;

use crate::engine::{Limits, Phase, Session, Stats};
use crate::kernel::OwnershipMode;

#[derive(Serialize)]
pub struct DaemonStatus {
    pub version: &'static str,
    pub protocol_version: u32,
    /// `linux`, or `model` (a simulation, never the real kernel).
    pub kernel: &'static str,
    pub uptime_secs: u64,
    pub sessions: usize,
    pub max_sessions: usize,
    pub limits: Limits,
    /// Workers that ended abnormally since the daemon started, by how: a signal's name
    /// (`SIGSEGV`) or `exit N`. Each took only its own session with it.
    pub worker_deaths: BTreeMap<String, u64>,
}

#[derive(Serialize)]
pub struct WindowStatus {
    pub container: u32,
    pub start: u64,
    pub size: u64,
    pub page_shift: u32,
    pub levels: u32,
    pub default: bool,
}

#[derive(Serialize)]
pub struct GroupStatus {
    pub id: u32,
    pub container: u32,
    pub iommu_group: u32,
    pub kvm_file_added: bool,
    pub attached: bool,
    pub associated_tables: Vec<u32>,
}

#[derive(Serialize)]
pub struct TableStatus {
    pub id: u32,
    pub container: u32,
    pub liobn: u32,
    pub page_shift: u32,
    pub bus_offset: u64,
    pub entries: u64,
    pub has_window: bool,
    pub entries_mapped: u64,
}

#[derive(Serialize)]
pub struct PinnedBytes {
    /// Guest RAM registered by the sidecar's own mm (isolated mode).
    pub sidecar: u64,
    /// Guest RAM registered by the front-end's mm on the sidecar's behalf (accelerated mode).
    pub front_end: u64,
}

#[derive(Serialize)]
pub struct Counters {
    pub requests: u64,
    pub updates_forwarded: u64,
    pub entries_forwarded: u64,
    pub maps: u64,
    pub unmaps: u64,
    pub ops_sidecar: u64,
    pub ops_front_end: u64,
}

#[derive(Serialize)]
pub struct SessionStatus {
    pub id: u64,
    /// The process serving this session (one worker per session).
    pub worker_pid: u32,
    pub mode: Option<&'static str>,
    pub phase: &'static str,
    pub peer_pid: i32,
    pub peer_uid: u32,
    pub regions: usize,
    pub groups: Vec<GroupStatus>,
    pub tables: Vec<TableStatus>,
    pub windows: Vec<WindowStatus>,
    pub registered_bytes: u64,
    pub pinned_bytes: PinnedBytes,
    pub counters: Counters,
    pub errors: BTreeMap<String, u64>,
    pub uptime_secs: u64,
}

#[derive(Serialize)]
pub struct StatusReply {
    pub daemon: DaemonStatus,
    /// The id of the session this reply was asked on.
    pub session: u64,
    /// Each session as its worker describes it ([`SessionStatus`]).
    pub sessions: Vec<serde_json::Value>,
    /// Index to ask for next when the sessions did not fit in one reply.
    pub next_session: Option<u32>,
}

pub fn mode_name(mode: OwnershipMode) -> &'static str {
    match mode {
        OwnershipMode::Accelerated => "accelerated",
        OwnershipMode::Isolated => "isolated",
    }
}

impl SessionStatus {
    pub fn new(id: u64, peer_pid: i32, peer_uid: u32, uptime_secs: u64, session: &Session) -> Self {
        let state = session.state();
        let registered = session.registered_bytes();
        let stats: &Stats = session.stats();
        let (sidecar, front_end) = match session.mode() {
            Some(OwnershipMode::Isolated) => (registered, 0),
            Some(OwnershipMode::Accelerated) => (0, registered),
            None => (0, 0),
        };
        Self {
            id,
            worker_pid: std::process::id(),
            mode: session.mode().map(mode_name),
            phase: match session.phase() {
                Phase::New => "new",
                Phase::Ready => "ready",
                Phase::Transaction => "transaction",
                Phase::Closing => "closing",
            },
            peer_pid,
            peer_uid,
            regions: state.regions.len(),
            groups: state
                .groups
                .iter()
                .map(|(id, g)| GroupStatus {
                    id: id.0,
                    container: g.container.0,
                    iommu_group: g.iommu_group,
                    kvm_file_added: g.file_added,
                    attached: g.attached,
                    associated_tables: g.associations.iter().map(|t| t.0).collect(),
                })
                .collect(),
            tables: state
                .tables
                .iter()
                .map(|(id, t)| TableStatus {
                    id: id.0,
                    container: t.desc.container_id,
                    liobn: t.desc.liobn,
                    page_shift: t.desc.page_shift,
                    bus_offset: t.desc.bus_offset,
                    entries: t.desc.entries,
                    has_window: state.window_of(*id).is_some(),
                    entries_mapped: t.mapped.count(),
                })
                .collect(),
            windows: state
                .containers
                .iter()
                .flat_map(|(cid, c)| {
                    c.windows.iter().map(move |(start, w)| WindowStatus {
                        container: cid.0,
                        start: *start,
                        size: w.size,
                        page_shift: w.page_shift,
                        levels: w.levels,
                        default: w.default,
                    })
                })
                .collect(),
            registered_bytes: registered,
            pinned_bytes: PinnedBytes { sidecar, front_end },
            counters: Counters {
                requests: stats.requests,
                updates_forwarded: stats.updates_forwarded,
                entries_forwarded: stats.entries_forwarded,
                maps: stats.maps,
                unmaps: stats.unmaps,
                ops_sidecar: stats.ops_sidecar,
                ops_front_end: stats.ops_front_end,
            },
            errors: stats.errors.clone(),
            uptime_secs,
        }
    }
}
