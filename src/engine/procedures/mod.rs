//! One procedure per request: the checks the engine makes before any kernel call, and the
//! kernel calls, stage by stage, in the order QEMU makes them today (qemu-notes §3–§11).
//!
//! Each procedure lives in its own file with its checks, its named stages and what it settles
//! once over. This module holds [`start`], which checks a request and picks its procedure, the
//! [`Procedure`] enum the transaction drives, and the call builders several procedures share.

mod eeh;
mod group_add;
mod group_adopt;
mod group_remove;
mod mem_add;
mod mem_remove;
mod table;
mod tce_update;
mod teardown;
mod window_adopt;
mod window_create;
mod window_query;
mod window_remove;
mod window_reset;

use rustix::io::Errno;

use crate::kernel::{ContainerId, GroupId, KernelOp, Output, OwnershipMode, TableId};
use crate::protocol::{Request, RequestCode, FEATURE_REBUILD};

use super::state::{Container, State};
use super::{EngineError, FdFacts, Host};

use eeh::Eeh;
use group_add::GroupAdd;
use group_adopt::GroupAdopt;
use group_remove::GroupRemove;
use mem_add::MemAdd;
use mem_remove::MemRemove;
pub use tce_update::tce_refusal_body;
use tce_update::TceUpdateProc;
use teardown::Teardown;
use window_create::WindowCreate;
use window_remove::WindowRemove;
use window_reset::WindowReset;

/// TCE permission bits.
const TCE_READ: u64 = 1;
const TCE_WRITE: u64 = 2;

pub enum Step {
    /// Answered without a kernel call.
    Done(Vec<u8>),
    Run(Procedure, RequestCode),
}

/// What to do after a call failed.
pub enum Failure {
    /// Replace the rest of the stage with these calls.
    Retry(Vec<KernelOp>),
    /// Go on with the remaining calls (teardown does its best).
    Continue,
    /// The request fails: roll back (or stop and report).
    Fail(EngineError),
}

#[derive(Debug)]
pub enum Procedure {
    GroupAdd(GroupAdd),
    GroupRemove(GroupRemove),
    /// A group the front-end already holds attached to its open container (GROUP_ADOPT).
    GroupAdopt(GroupAdopt),
    MemAdd(MemAdd),
    MemRemove(MemRemove),
    WindowCreate(WindowCreate),
    WindowRemove(WindowRemove),
    WindowReset(WindowReset),
    TceUpdate(TceUpdateProc),
    Eeh(Eeh),
    Teardown(Teardown),
}

fn err(errno: Errno, text: impl Into<String>) -> EngineError {
    EngineError::new(errno, text)
}

/// A container a request names that must have a group attached (its TCE info known): an id
/// no group names is unknown (`ENOENT`, spec §5); one whose attach has not completed is not
/// usable yet (`ENXIO`).
fn attached_container(state: &State, container: ContainerId) -> Result<&Container, EngineError> {
    let c = state
        .containers
        .get(&container)
        .ok_or_else(|| err(Errno::NOENT, format!("{container} is not registered")))?;
    if c.info.is_none() {
        return Err(err(
            Errno::NXIO,
            format!("{container} has no group attached"),
        ));
    }
    Ok(c)
}

/// Checks a request and returns its procedure (or its immediate answer).
pub fn start(
    state: &mut State,
    host: &Host,
    mode: OwnershipMode,
    features: u64,
    request: Request,
    fd: Option<FdFacts>,
) -> Result<Step, EngineError> {
    let code = request.code();
    let run = |p| Ok(Step::Run(p, code));
    check_session_allows(state, host, mode, features, &request)?;
    match request {
        Request::GetFeatures
        | Request::SetFeatures { .. }
        | Request::GetStatus { .. }
        | Request::OpsResult { .. } => Err(err(Errno::PROTO, "not a session request")),
        Request::MemAdd(desc) => run(Procedure::MemAdd(MemAdd::start(state, host, desc, fd)?)),
        Request::MemRemove(desc) => run(Procedure::MemRemove(MemRemove::start(state, mode, desc)?)),
        Request::GroupAdopt(desc) => run(Procedure::GroupAdopt(GroupAdopt::start(state, &desc)?)),
        Request::WindowAdopt { table_id } => {
            window_adopt::adopt(state, host, TableId(table_id)).map(Step::Done)
        }
        Request::GroupAdd(desc) => run(Procedure::GroupAdd(GroupAdd::start(state, &desc)?)),
        Request::GroupRemove { group_id } => run(Procedure::GroupRemove(GroupRemove::start(
            state,
            GroupId(group_id),
        )?)),
        Request::TableAdd(desc) => {
            table::add(state, mode, desc, fd)?;
            Ok(Step::Done(Vec::new()))
        }
        Request::TableRemove { table_id } => {
            table::remove(state, TableId(table_id))?;
            Ok(Step::Done(Vec::new()))
        }
        Request::WindowQuery { container_id } => {
            window_query::answer(state, ContainerId(container_id)).map(Step::Done)
        }
        Request::WindowCreate { table_id } => run(Procedure::WindowCreate(WindowCreate::check(
            state,
            host,
            TableId(table_id),
        )?)),
        Request::WindowRemove { table_id } => run(Procedure::WindowRemove(WindowRemove::start(
            state,
            TableId(table_id),
        )?)),
        Request::WindowReset {
            container_id,
            default_table,
        } => run(Procedure::WindowReset(WindowReset::start(
            state,
            host,
            ContainerId(container_id),
            default_table.map(TableId),
        )?)),
        Request::TceUpdate(update) => {
            run(Procedure::TceUpdate(TceUpdateProc::start(state, update)?))
        }
        Request::EehOp(request) => run(Procedure::Eeh(Eeh::start(state, features, request)?)),
    }
}

/// The checks that come before a request's own: the session's limits on what it holds, and
/// what rebuilding a lost session needs.
fn check_session_allows(
    state: &State,
    host: &Host,
    mode: OwnershipMode,
    features: u64,
    request: &Request,
) -> Result<(), EngineError> {
    let full = |what: &str, limit: usize| {
        err(
            Errno::NOSPC,
            format!("the session already has {limit} {what}, the limit"),
        )
    };
    match request {
        Request::MemAdd(_) if state.regions.len() >= host.limits.regions => {
            return Err(full("regions", host.limits.regions))
        }
        Request::GroupAdd(_) | Request::GroupAdopt(_)
            if state.groups.len() >= host.limits.groups =>
        {
            return Err(full("groups", host.limits.groups))
        }
        Request::GroupAdopt(_) | Request::WindowAdopt { .. } => {
            if features & FEATURE_REBUILD == 0 {
                return Err(err(Errno::NOTSUP, "REBUILD was not negotiated"));
            }
            if mode != OwnershipMode::Accelerated {
                return Err(err(
                    Errno::INVAL,
                    "only accelerated sessions are rebuilt: in isolated mode the containers die \
                     with the back-end",
                ));
            }
        }
        Request::TableAdd(_) if state.tables.len() >= host.limits.tables => {
            return Err(full("tables", host.limits.tables))
        }
        _ => {}
    }
    Ok(())
}

/// Calls that associate `group` with `tables` in KVM (accelerated mode), adding the group file
/// to the kvm-vfio device first if it is not there. The file is added only here, right before
/// its first SET_SPAPR_TCE: Linux warns (`kvm_spapr_tce_release_vfio_group`) when the device
/// lets go of a file that never had one, and on POWER the file serves nothing else.
pub fn associate_ops(state: &State, group: GroupId, tables: &[TableId]) -> Vec<KernelOp> {
    if tables.is_empty() {
        return Vec::new();
    }
    let added = state.groups.get(&group).is_some_and(|g| g.file_added);
    let mut ops = Vec::new();
    if !added {
        ops.push(KernelOp::KvmFileAdd { group });
    }
    ops.extend(
        tables
            .iter()
            .map(|t| KernelOp::KvmSetSpaprTce { group, table: *t }),
    );
    ops
}

/// Calls that end KVM's associations of `group` with `tables`: there is no call for one
/// association, so the group is deleted from the kvm-vfio device (releasing the associations
/// with all its current tables) and, if it has other tables, added back and associated again
/// with them. Nothing if the group has none of `tables`.
pub fn sever_group_ops(state: &State, group: GroupId, tables: &[TableId]) -> Vec<KernelOp> {
    let Some(g) = state.groups.get(&group) else {
        return Vec::new();
    };
    if !g.file_added || !tables.iter().any(|t| g.associations.contains(t)) {
        return Vec::new();
    }
    let mut ops = vec![KernelOp::KvmFileDel { group }];
    let others: Vec<TableId> = g
        .associations
        .iter()
        .filter(|t| !tables.contains(t))
        .copied()
        .collect();
    if !others.is_empty() {
        ops.push(KernelOp::KvmFileAdd { group });
        ops.extend(
            others
                .iter()
                .map(|t| KernelOp::KvmSetSpaprTce { group, table: *t }),
        );
    }
    ops
}

/// Calls that end KVM's associations of `tables` with every group ([`sever_group_ops`]).
/// Needed before the tables' hardware windows go: KVM keeps programming a removed hardware
/// table, and the pages it maps there are never unpinned.
fn sever_ops(state: &State, tables: &[TableId]) -> Vec<KernelOp> {
    state
        .groups
        .keys()
        .flat_map(|g| sever_group_ops(state, *g, tables))
        .collect()
}

/// Calls that take down hardware windows of `container` (those at `starts`): end KVM's
/// associations with their tables, then unmap what may be mapped in each and remove it. The
/// associations of all of them end first, together: a group re-added with its other tables must
/// not be associated again with a window that goes next.
fn remove_window_ops(
    state: &State,
    mode: OwnershipMode,
    container: ContainerId,
    starts: &[u64],
) -> Vec<KernelOp> {
    let Some(c) = state.containers.get(&container) else {
        return Vec::new();
    };
    let windows: Vec<(u64, u64, Option<TableId>)> = starts
        .iter()
        .filter_map(|s| {
            let w = c.windows.get(s)?;
            let table = state.table_at(container, *s).filter(|_| !w.default);
            Some((*s, w.size, table))
        })
        .collect();
    // KVM must stop mapping into the windows before they go: an association left on a removed
    // hardware table keeps taking guest maps that nothing ever unpins.
    let tables: Vec<TableId> = windows.iter().filter_map(|(_, _, t)| *t).collect();
    let mut ops = sever_ops(state, &tables);
    for (start, size, table) in windows {
        // In accelerated mode the kernel maps entries itself, so only a full unmap is certain
        // to release them (QEMU unmaps the whole section too); in isolated mode the session
        // knows.
        let unmap = match (mode, table) {
            (_, None) => false,
            (OwnershipMode::Accelerated, Some(_)) => true,
            (OwnershipMode::Isolated, Some(t)) => state.tables[&t].mapped.count() > 0,
        };
        if unmap {
            ops.push(KernelOp::UnmapDma {
                container,
                iova: start,
                size,
            });
        }
        ops.push(KernelOp::TceRemove {
            container,
            start_addr: start,
        });
    }
    ops
}

fn register_ops(state: &State, container: ContainerId, register: bool) -> Vec<KernelOp> {
    let c = state.containers.get(&container);
    state
        .regions
        .iter()
        .filter(|(id, _)| c.is_some_and(|c| c.registered.contains(id)) != register)
        .map(|(id, r)| {
            let (region, offset, size) = (*id, 0, r.desc.size);
            if register {
                KernelOp::RegisterMemory {
                    container,
                    region,
                    offset,
                    size,
                }
            } else {
                KernelOp::UnregisterMemory {
                    container,
                    region,
                    offset,
                    size,
                }
            }
        })
        .collect()
}

/// Explains a failed REGISTER_MEMORY: ENOMEM means the owner's locked-memory limit.
fn describe(
    op: &KernelOp,
    errno: Errno,
    state: &State,
    mode: Option<OwnershipMode>,
) -> EngineError {
    match op {
        KernelOp::RegisterMemory { region, size, .. } if errno == Errno::NOMEM => {
            let total: u64 = state.regions.values().map(|r| r.desc.size).sum();
            let owner = match mode {
                Some(OwnershipMode::Accelerated) => "the front-end (QEMU)",
                Some(OwnershipMode::Isolated) | None => "the sidecar",
            };
            err(
                errno,
                format!(
                    "registering {region} ({size:#x} bytes) exceeded the locked-memory limit: \
                     {owner} needs RLIMIT_MEMLOCK of at least {total} bytes to pin all guest RAM"
                ),
            )
        }
        KernelOp::UnregisterMemory { region, .. } if errno == Errno::BUSY => err(
            errno,
            format!("{region} is still mapped for DMA; unmap it first"),
        ),
        _ => err(errno, format!("{op} failed: {errno}")),
    }
}

impl Procedure {
    pub fn teardown() -> Self {
        Self::Teardown(Teardown::new())
    }

    /// Whether a failure undoes the calls that succeeded. A window's removal undoes its KVM
    /// calls, which end and restore associations, but a window removed stays removed. Other
    /// removals and updates cannot be undone faithfully; they stop and report what is left.
    pub fn rolls_back(&self) -> bool {
        match self {
            Self::GroupAdd(_) | Self::MemAdd(_) | Self::MemRemove(_) | Self::WindowCreate(_) => {
                true
            }
            Self::WindowRemove(_) | Self::WindowReset(_) => true,
            Self::GroupRemove(_)
            | Self::GroupAdopt(_)
            | Self::TceUpdate(_)
            | Self::Eeh(_)
            | Self::Teardown(_) => false,
        }
    }

    /// The calls of the next stage; `None` when the procedure is complete.
    pub fn next(
        &mut self,
        state: &State,
        mode: OwnershipMode,
    ) -> Result<Option<Vec<KernelOp>>, EngineError> {
        match self {
            Self::GroupAdd(p) => Ok(p.next(state, mode)),
            Self::GroupAdopt(p) => Ok(p.next()),
            Self::GroupRemove(p) => Ok(p.next(state, mode)),
            Self::MemAdd(p) => Ok(p.next(state)),
            Self::MemRemove(p) => p.next(state),
            Self::WindowCreate(p) => p.next(state, mode),
            Self::WindowRemove(p) => Ok(p.next(state, mode)),
            Self::WindowReset(p) => p.next(state, mode),
            Self::TceUpdate(p) => p.next(state, mode),
            Self::Eeh(p) => Ok(p.next()),
            Self::Teardown(p) => Ok(p.next(state, mode)),
        }
    }

    /// Records what a successful call returned that later stages need.
    pub fn succeeded(&mut self, op: &KernelOp, output: &Output) {
        match self {
            Self::WindowCreate(p) => p.succeeded(op, output),
            Self::WindowReset(p) => p.succeeded(op, output),
            Self::TceUpdate(p) => p.succeeded(op, output),
            Self::Eeh(p) => p.succeeded(op, output),
            Self::MemRemove(p) => p.succeeded(op, output),
            Self::GroupAdd(_)
            | Self::GroupRemove(_)
            | Self::GroupAdopt(_)
            | Self::MemAdd(_)
            | Self::WindowRemove(_)
            | Self::Teardown(_) => {}
        }
    }

    pub fn failed(
        &mut self,
        op: &KernelOp,
        errno: Errno,
        state: &State,
        mode: Option<OwnershipMode>,
    ) -> Failure {
        match self {
            Self::Teardown(_) => Failure::Continue,
            Self::WindowCreate(p) => p.failed(op, errno),
            Self::WindowReset(p) => p.failed(op, errno, state, mode),
            Self::TceUpdate(p) => p.failed(op, errno, state, mode),
            Self::GroupAdd(_)
            | Self::GroupRemove(_)
            | Self::GroupAdopt(_)
            | Self::MemAdd(_)
            | Self::MemRemove(_)
            | Self::WindowRemove(_)
            | Self::Eeh(_) => Failure::Fail(describe(op, errno, state, mode)),
        }
    }

    /// The body of the final successful reply.
    pub fn body(&self, _state: &State) -> Vec<u8> {
        match self {
            Self::WindowCreate(p) => p.body(),
            Self::WindowReset(p) => p.body(),
            Self::TceUpdate(p) => p.body(),
            Self::Eeh(p) => p.body(),
            Self::GroupAdd(_)
            | Self::GroupRemove(_)
            | Self::GroupAdopt(_)
            | Self::MemAdd(_)
            | Self::MemRemove(_)
            | Self::WindowRemove(_)
            | Self::Teardown(_) => Vec::new(),
        }
    }

    /// The body of the final error reply.
    pub fn failure_body(&self, _errno: Errno) -> Vec<u8> {
        match self {
            Self::TceUpdate(p) => p.failure_body(),
            _ => Vec::new(),
        }
    }

    /// Settles the objects the request added or removed, once it is over.
    pub fn finished(&self, state: &mut State, ok: bool) {
        match self {
            Self::GroupAdopt(p) => p.finished(state, ok),
            Self::GroupAdd(p) => p.finished(state, ok),
            Self::GroupRemove(p) => p.finished(state, ok),
            Self::MemAdd(p) => p.finished(state, ok),
            Self::MemRemove(p) => p.finished(state, ok),
            Self::TceUpdate(p) => p.finished(state),
            Self::WindowCreate(_)
            | Self::WindowRemove(_)
            | Self::WindowReset(_)
            | Self::Eeh(_)
            | Self::Teardown(_) => {}
        }
    }
}
