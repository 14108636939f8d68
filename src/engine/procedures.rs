//! One procedure per request: the checks the engine makes before any kernel call, and the
//! kernel calls, stage by stage, in the order QEMU makes them today (qemu-notes §3–§11).

use std::collections::VecDeque;

use rustix::io::Errno;

use crate::kernel::{ContainerId, GroupId, KernelOp, Output, OwnershipMode, RegionId, TableId};
use crate::protocol::{
    DmaAccess, EehBody, EehRequest, GroupDesc, MemRegion, Request, RequestCode, TableDesc,
    TceEntries, TceUpdate, TceUpdateBody, WindowCreateBody, WindowQueryBody, FEATURE_EEH,
    FEATURE_REBUILD, MAX_INLINE_TCES,
};

use super::state::{Container, Group, HwWindow, Region, State, Table};
use super::window::{geometry, Geometry};
use super::{EngineError, FdFacts, Host};

/// `VFIO_SPAPR_TCE_v2_IOMMU`.
const SPAPR_TCE_V2_IOMMU: u32 = 7;
/// Hypercall return codes (PAPR).
const H_SUCCESS: i64 = 0;
const H_HARDWARE: i64 = -1;
const H_PARAMETER: i64 = -4;
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
    GroupAdd {
        group: GroupId,
        container: ContainerId,
        stage: u8,
        new_container: bool,
    },
    GroupRemove {
        group: GroupId,
        stage: u8,
    },
    /// A group the front-end already holds attached to its open container (GROUP_ADOPT).
    GroupAdopt {
        group: GroupId,
        container: ContainerId,
        stage: u8,
        new_container: bool,
    },
    MemAdd {
        region: RegionId,
        stage: u8,
    },
    MemRemove {
        region: RegionId,
        stage: u8,
        /// The region's guest physical range.
        range: std::ops::Range<u64>,
        /// The guest-visible entries still to scan, `(table, next index)`.
        scan: VecDeque<(TableId, u64)>,
        /// An entry found pointing into the region.
        busy: Option<(TableId, u64)>,
    },
    WindowCreate(WindowCreate),
    WindowRemove {
        table: TableId,
        stage: u8,
    },
    WindowReset {
        container: ContainerId,
        stage: u8,
        default: Option<TableId>,
        create: Option<WindowCreate>,
        host: Host,
    },
    TceUpdate(TceUpdateProc),
    Eeh {
        request: EehRequest,
        stage: u8,
        result: Option<u32>,
    },
    Teardown {
        stage: u8,
    },
}

#[derive(Debug)]
pub struct WindowCreate {
    table: TableId,
    geometry: Geometry,
    levels: u32,
    start: Option<u64>,
    stage: u8,
}

#[derive(Debug)]
pub struct TceUpdateProc {
    update: TceUpdate,
    values: Option<Vec<u64>>,
    stage: u8,
    /// Index (relative to the update) of the first entry of each pending call.
    op_starts: VecDeque<u64>,
    processed: u64,
    h_failure: i64,
    /// Why the update is refused. A refused update still unmaps the entries it names: the
    /// front-end already wrote them in the guest-visible table, and hardware must never keep
    /// an older mapping than that table shows.
    refusal: Option<EngineError>,
    /// The fail-safe unmap failed: hardware may hold entries the table does not show.
    unsafe_left: bool,
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
    let full = |what: &str, limit: usize| {
        err(
            Errno::NOSPC,
            format!("the session already has {limit} {what}, the limit"),
        )
    };
    match &request {
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
    match request {
        Request::GetFeatures
        | Request::SetFeatures { .. }
        | Request::GetStatus { .. }
        | Request::OpsResult { .. } => Err(err(Errno::PROTO, "not a session request")),
        Request::MemAdd(desc) => {
            check_region(state, host, &desc, fd)?;
            let page_size = fd.map_or(host.page_size, |f| f.page_size.max(host.page_size));
            state
                .regions
                .insert(RegionId(desc.region_id), Region { desc, page_size });
            run(Procedure::MemAdd {
                region: RegionId(desc.region_id),
                stage: 0,
            })
        }
        Request::MemRemove(desc) => {
            let region = RegionId(desc.region_id);
            match state.regions.get(&region) {
                None => Err(err(Errno::NOENT, format!("{region} is not registered"))),
                Some(r) if r.desc != desc => Err(err(
                    Errno::INVAL,
                    format!("the fields do not match those {region} was added with"),
                )),
                Some(_) if state.tables.values().any(|t| t.suspect) => Err(err(
                    Errno::BUSY,
                    "an earlier UNMAP_DMA failed, so hardware may still map memory the guest's table \
                     no longer shows; remove that window before removing memory",
                )),
                Some(_)
                    if mode == OwnershipMode::Isolated
                        && state.tables.values().any(|t| t.mapped.count() > 0) =>
                {
                    // In isolated mode the sidecar's own mm pins what it maps, and only the
                    // session knows which entries it mapped, not where each points: any mapped
                    // entry may use the region, and unregistering it would leave it pinned.
                    let mapped: u64 = state.tables.values().map(|t| t.mapped.count()).sum();
                    Err(err(
                        Errno::BUSY,
                        format!("{mapped} entries are mapped for DMA; the guest must unmap them before {region} goes"),
                    ))
                }
                Some(_) => {
                    // Every table with a window is scanned for guest entries into the region.
                    let scan = state
                        .tables
                        .keys()
                        .filter(|t| state.window_of(**t).is_some())
                        .map(|t| (*t, 0))
                        .collect();
                    let range = desc.guest_addr..desc.guest_addr + desc.size;
                    run(Procedure::MemRemove {
                        region,
                        stage: 0,
                        range,
                        scan,
                        busy: None,
                    })
                }
            }
        }
        Request::GroupAdopt(desc) => {
            let container = ContainerId(desc.container_id);
            let new_container = !state.containers.contains_key(&container);
            if !new_container && !state.containers[&container].open {
                return Err(err(
                    Errno::INVAL,
                    format!("{container} is not open; only open containers are adopted"),
                ));
            }
            let group = add_group(state, &desc, true)?;
            if new_container {
                // What the front-end's container holds since it was set up in the lost
                // session: the IOMMU type, every region pre-registered, no default window.
                let c = state.containers.entry(container).or_default();
                c.open = true;
                c.iommu_set = true;
                c.registered = state.regions.keys().copied().collect();
            }
            run(Procedure::GroupAdopt {
                group,
                container,
                stage: 0,
                new_container,
            })
        }
        Request::WindowAdopt { table_id } => {
            let table = TableId(table_id);
            let create = WindowCreate::check(state, host, table)?;
            let (container, start) = {
                let t = &state.tables[&table];
                (ContainerId(t.desc.container_id), t.desc.bus_offset)
            };
            let g = create.geometry;
            let c = state.containers.entry(container).or_default();
            c.windows.insert(
                start,
                HwWindow {
                    size: g.window_size,
                    page_shift: g.hw_page_shift,
                    levels: g.levels,
                    default: false,
                },
            );
            // The lost session associated every group of the container with the table.
            for group in state.groups.values_mut() {
                if group.container == container && group.attached {
                    group.file_added = true;
                    group.associations.insert(table);
                }
            }
            Ok(Step::Done(create.body_at(start)))
        }
        Request::GroupAdd(desc) => {
            let group = add_group(state, &desc, false)?;
            let container = ContainerId(desc.container_id);
            run(Procedure::GroupAdd {
                group,
                container,
                stage: 0,
                new_container: false,
            })
        }
        Request::GroupRemove { group_id } => {
            let group = GroupId(group_id);
            if !state.groups.contains_key(&group) {
                return Err(err(Errno::NOENT, format!("{group} is not registered")));
            }
            run(Procedure::GroupRemove { group, stage: 0 })
        }
        Request::TableAdd(desc) => {
            check_table(state, mode, &desc, fd)?;
            state.tables.insert(
                TableId(desc.table_id),
                Table {
                    desc,
                    mapped: Default::default(),
                    suspect: false,
                },
            );
            Ok(Step::Done(Vec::new()))
        }
        Request::TableRemove { table_id } => {
            let table = TableId(table_id);
            if !state.tables.contains_key(&table) {
                return Err(err(Errno::NOENT, format!("{table} is not registered")));
            }
            if state.window_of(table).is_some() {
                return Err(err(
                    Errno::BUSY,
                    format!("{table} still has a window; remove it first"),
                ));
            }
            state.tables.remove(&table);
            Ok(Step::Done(Vec::new()))
        }
        Request::WindowQuery { container_id } => {
            let container = ContainerId(container_id);
            let c = attached_container(state, container)?;
            let info = c.info.unwrap_or_default();
            let used = c.windows.values().filter(|w| !w.default).count() as u32;
            let body = WindowQueryBody {
                windows_available: info.max_dynamic_windows.saturating_sub(used),
                windows_max: info.max_dynamic_windows,
                page_sizes: info.pgsizes,
                ram_size: state.regions.values().map(|r| r.desc.size).sum(),
            };
            Ok(Step::Done(body.encode()))
        }
        Request::WindowCreate { table_id } => {
            let create = WindowCreate::check(state, host, TableId(table_id))?;
            run(Procedure::WindowCreate(create))
        }
        Request::WindowRemove { table_id } => {
            let table = TableId(table_id);
            if !state.tables.contains_key(&table) {
                return Err(err(Errno::NOENT, format!("{table} is not registered")));
            }
            if state.window_of(table).is_none() {
                return Err(err(Errno::NOENT, format!("{table} has no window")));
            }
            run(Procedure::WindowRemove { table, stage: 0 })
        }
        Request::WindowReset {
            container_id,
            default_table,
        } => {
            let container = ContainerId(container_id);
            attached_container(state, container)?;
            let default = default_table.map(TableId);
            if let Some(t) = default {
                match state.tables.get(&t) {
                    None => return Err(err(Errno::NOENT, format!("{t} is not registered"))),
                    Some(table) if table.desc.container_id != container_id => {
                        return Err(err(
                            Errno::INVAL,
                            format!("{t} belongs to another container"),
                        ))
                    }
                    Some(_) => {}
                }
            }
            run(Procedure::WindowReset {
                container,
                stage: 0,
                default,
                create: None,
                host: *host,
            })
        }
        Request::TceUpdate(update) => {
            let table = TableId(update.table_id);
            let t = state
                .tables
                .get(&table)
                .ok_or_else(|| err(Errno::NOENT, format!("{table} is not registered")))?;
            if state.window_of(table).is_none() {
                return Err(err(Errno::INVAL, format!("{table} has no window")));
            }
            if let TceEntries::Stuff(value) = update.entries {
                if value & (TCE_READ | TCE_WRITE) != 0 {
                    // KVM's H_STUFF_TCE refuses this before it changes anything (book3s_64_vio.c);
                    // so does the sidecar, in both modes (§7.8): nothing is unmapped.
                    return Err(err(
                        Errno::INVAL,
                        "H_STUFF_TCE carries permission bits; it can only clear entries",
                    ));
                }
            }
            let end = update.first_index.checked_add(update.count.into());
            let refusal = end.is_none_or(|end| end > t.desc.entries).then(|| {
                err(
                    Errno::INVAL,
                    format!(
                        "entries {}..+{} lie outside {table} ({} entries)",
                        update.first_index, update.count, t.desc.entries
                    ),
                )
            });
            let h_failure = if refusal.is_some() {
                H_PARAMETER
            } else {
                H_HARDWARE
            };
            run(Procedure::TceUpdate(TceUpdateProc {
                update,
                values: None,
                stage: 0,
                op_starts: VecDeque::new(),
                processed: 0,
                h_failure,
                refusal,
                unsafe_left: false,
            }))
        }
        Request::EehOp(request) => {
            if features & FEATURE_EEH == 0 {
                return Err(err(Errno::NOTSUP, "EEH was not negotiated"));
            }
            let container = ContainerId(request.container_id);
            let c = attached_container(state, container)?;
            if c.groups.len() != 1 {
                return Err(err(
                    Errno::INVAL,
                    format!(
                        "EEH needs a container with exactly one group; {container} has {}",
                        c.groups.len()
                    ),
                ));
            }
            run(Procedure::Eeh {
                request,
                stage: 0,
                result: None,
            })
        }
    }
}

/// Records a new group in its container (created if new), once it passes the checks every new
/// group passes: an unused id and an IOMMU group not in the session yet.
fn add_group(state: &mut State, desc: &GroupDesc, attached: bool) -> Result<GroupId, EngineError> {
    let group = GroupId(desc.group_id);
    if state.groups.contains_key(&group) {
        return Err(err(Errno::EXIST, format!("{group} is already registered")));
    }
    if let Some((other, _)) = state
        .groups
        .iter()
        .find(|(_, g)| g.iommu_group == desc.iommu_group)
    {
        return Err(err(
            Errno::BUSY,
            format!(
                "IOMMU group {} is already in the session as {other}",
                desc.iommu_group
            ),
        ));
    }
    let container = ContainerId(desc.container_id);
    state.groups.insert(
        group,
        Group {
            container,
            iommu_group: desc.iommu_group,
            file_added: false,
            attached,
            associations: Default::default(),
        },
    );
    state
        .containers
        .entry(container)
        .or_default()
        .groups
        .insert(group);
    Ok(group)
}

fn check_region(
    state: &State,
    host: &Host,
    desc: &MemRegion,
    fd: Option<FdFacts>,
) -> Result<(), EngineError> {
    let region = RegionId(desc.region_id);
    if state.regions.contains_key(&region) {
        return Err(err(Errno::EXIST, format!("{region} is already registered")));
    }
    let page = host.page_size;
    let aligned = [desc.guest_addr, desc.size, desc.user_addr, desc.mmap_offset]
        .iter()
        .all(|v| v % page == 0);
    if desc.size == 0 || !aligned {
        return Err(err(
            Errno::INVAL,
            format!("guest address, size, user address and mmap offset must be nonzero multiples of the host page size {page:#x}"),
        ));
    }
    let end = desc
        .guest_addr
        .checked_add(desc.size)
        .ok_or_else(|| err(Errno::INVAL, "region wraps"))?;
    if let Some(fd) = fd {
        if desc
            .mmap_offset
            .checked_add(desc.size)
            .is_none_or(|e| e > fd.size)
        {
            return Err(err(
                Errno::INVAL,
                format!(
                    "the memfd holds {:#x} bytes, the region needs {:#x} at offset {:#x}",
                    fd.size, desc.size, desc.mmap_offset
                ),
            ));
        }
    }
    if let Some((other, _)) = state
        .regions
        .iter()
        .find(|(_, r)| desc.guest_addr < r.desc.guest_addr + r.desc.size && r.desc.guest_addr < end)
    {
        return Err(err(
            Errno::INVAL,
            format!("the region overlaps {other} in guest memory"),
        ));
    }
    Ok(())
}

fn check_table(
    state: &State,
    mode: OwnershipMode,
    desc: &TableDesc,
    fd: Option<FdFacts>,
) -> Result<(), EngineError> {
    let table = TableId(desc.table_id);
    let container = ContainerId(desc.container_id);
    if state.tables.contains_key(&table) {
        return Err(err(Errno::EXIST, format!("{table} is already registered")));
    }
    if !state.groups.values().any(|g| g.container == container) {
        return Err(err(Errno::NOENT, format!("{container} has no group")));
    }
    if !(12..=34).contains(&desc.page_shift) {
        return Err(err(
            Errno::INVAL,
            format!("page shift {} is outside 12..=34", desc.page_shift),
        ));
    }
    let size = desc
        .entries
        .checked_shl(desc.page_shift)
        .filter(|s| s >> desc.page_shift == desc.entries);
    let fits = size.and_then(|s| desc.bus_offset.checked_add(s)).is_some();
    if desc.entries == 0 || !fits || desc.bus_offset % (1 << desc.page_shift) != 0 {
        return Err(err(
            Errno::INVAL,
            "entries must be nonzero, the bus offset page aligned, and the window must not wrap",
        ));
    }
    if let Some((other, _)) = state
        .tables
        .iter()
        .find(|(_, t)| t.desc.liobn == desc.liobn)
    {
        return Err(err(
            Errno::EXIST,
            format!("LIOBN {:#x} is already used by {other}", desc.liobn),
        ));
    }
    // In isolated mode the fd is the front-end's shared userspace table, which must hold every
    // entry; a KVM table fd (accelerated) has no size to check.
    if mode == OwnershipMode::Isolated {
        let needed = desc.entries.saturating_mul(8);
        if fd.is_none_or(|f| f.size < needed) {
            return Err(err(
                Errno::INVAL,
                format!(
                    "in isolated mode the table is the front-end's userspace table in a memfd (never a KVM table: K7), which must hold {needed:#x} bytes ({} entries)",
                    desc.entries
                ),
            ));
        }
    }
    Ok(())
}

impl WindowCreate {
    fn check(state: &State, host: &Host, table: TableId) -> Result<Self, EngineError> {
        let t = state
            .tables
            .get(&table)
            .ok_or_else(|| err(Errno::NOENT, format!("{table} is not registered")))?;
        let container = ContainerId(t.desc.container_id);
        let c = attached_container(state, container)?;
        let info = c.info.unwrap_or_default();
        if state.window_of(table).is_some() {
            return Err(err(Errno::EXIST, format!("{table} already has a window")));
        }
        let (start, end) = (t.desc.bus_offset, t.desc.bus_offset + t.window_size());
        if let Some((at, w)) = c
            .windows
            .iter()
            .find(|(at, w)| **at < end && start < **at + w.size)
        {
            return Err(err(
                Errno::INVAL,
                format!(
                    "the window {start:#x}..{end:#x} overlaps the window at {at:#x} of {:#x} bytes",
                    w.size
                ),
            ));
        }
        let used = c.windows.values().filter(|w| !w.default).count() as u32;
        if used >= info.max_dynamic_windows {
            return Err(err(
                Errno::NOSPC,
                format!(
                    "{container} already has {used} of {} windows",
                    info.max_dynamic_windows
                ),
            ));
        }
        let ram_page = state
            .regions
            .values()
            .map(|r| r.page_size)
            .min()
            .unwrap_or(host.page_size);
        let geometry = geometry(
            t.desc.page_shift,
            t.desc.entries,
            info.pgsizes,
            info.levels,
            ram_page,
            host.page_size,
        )?;
        Ok(Self {
            table,
            geometry,
            levels: geometry.levels,
            start: None,
            stage: 0,
        })
    }

    fn create_op(&self, container: ContainerId) -> KernelOp {
        KernelOp::TceCreate {
            container,
            page_shift: self.geometry.hw_page_shift,
            window_size: self.geometry.window_size,
            levels: self.levels,
        }
    }

    fn next(
        &mut self,
        state: &State,
        mode: OwnershipMode,
    ) -> Result<Option<Vec<KernelOp>>, EngineError> {
        let t = &state.tables[&self.table];
        let container = ContainerId(t.desc.container_id);
        self.stage += 1;
        match self.stage {
            1 => Ok(Some(vec![self.create_op(container)])),
            2 => {
                let start = self.start.unwrap_or(u64::MAX);
                if start != t.desc.bus_offset {
                    return Err(err(
                        Errno::INVAL,
                        format!(
                            "the host placed the window at {start:#x} but {} expects {:#x}; the host cannot serve this window",
                            self.table, t.desc.bus_offset
                        ),
                    ));
                }
                if mode == OwnershipMode::Isolated {
                    // K7: the sidecar's mm owns the container, so KVM must not be told about the
                    // hardware table; the front-end keeps this table in userspace.
                    return Ok(Some(Vec::new()));
                }
                // The kernel's own checks for the association (kvm_spapr_tce_attach_iommu_group),
                // made here first so a refusal says why.
                let g = self.geometry;
                if g.hw_page_shift > t.desc.page_shift || g.window_size < t.window_size() {
                    return Err(err(
                        Errno::INVAL,
                        "the hardware window cannot back the guest table",
                    ));
                }
                let groups = state
                    .groups
                    .iter()
                    .filter(|(_, g)| g.container == container && g.attached);
                Ok(Some(
                    groups
                        .flat_map(|(id, _)| associate_ops(state, *id, &[self.table]))
                        .collect(),
                ))
            }
            _ => Ok(None),
        }
    }

    fn failed(&mut self, op: &KernelOp, errno: Errno) -> Failure {
        match *op {
            KernelOp::TceCreate { container, .. } if self.levels < self.geometry.max_levels => {
                // Deeper tables need smaller contiguous allocations: retry as QEMU does.
                self.levels += 1;
                Failure::Retry(vec![self.create_op(container)])
            }
            KernelOp::TceCreate { .. } => Failure::Fail(err(
                errno,
                format!(
                    "TCE_CREATE of a {:#x}-byte window of {:#x}-byte pages failed with {} to {} levels: {errno}",
                    self.geometry.window_size,
                    1u64 << self.geometry.hw_page_shift,
                    self.geometry.levels,
                    self.levels
                ),
            )),
            KernelOp::KvmSetSpaprTce { group, table } => Failure::Fail(err(
                errno,
                format!(
                    "KVM refused to associate {table} with {group}: {errno}"
                ),
            )),
            _ => Failure::Fail(err(errno, format!("{op} failed: {errno}"))),
        }
    }

    fn body(&self) -> Vec<u8> {
        self.body_at(self.start.unwrap_or_default())
    }

    fn body_at(&self, start_addr: u64) -> Vec<u8> {
        WindowCreateBody {
            start_addr,
            hw_page_shift: self.geometry.hw_page_shift,
            levels: self.levels,
        }
        .encode()
    }
}

/// Calls that associate `group` with `tables` in KVM (accelerated mode), adding the group file
/// to the kvm-vfio device first if it is not there. The file is added only here, right before
/// its first SET_SPAPR_TCE: Linux warns (`kvm_spapr_tce_release_vfio_group`) when the device
/// lets go of a file that never had one, and on POWER the file serves nothing else.
fn associate_ops(state: &State, group: GroupId, tables: &[TableId]) -> Vec<KernelOp> {
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

/// Calls that end KVM's association of `table` with every group: there is no call for one
/// association, so each associated group is deleted from the kvm-vfio device (releasing the
/// associations with its current tables) and, if it has other tables, added back and
/// associated again with them. Needed before the table's hardware window goes: KVM keeps
/// programming a removed hardware table, and the pages it maps there are never unpinned.
pub fn sever_ops(state: &State, table: TableId) -> Vec<KernelOp> {
    let mut ops = Vec::new();
    for (id, g) in &state.groups {
        if !g.file_added || !g.associations.contains(&table) {
            continue;
        }
        ops.push(KernelOp::KvmFileDel { group: *id });
        let others: Vec<TableId> = g
            .associations
            .iter()
            .filter(|t| **t != table)
            .copied()
            .collect();
        if !others.is_empty() {
            ops.push(KernelOp::KvmFileAdd { group: *id });
            ops.extend(others.iter().map(|t| KernelOp::KvmSetSpaprTce {
                group: *id,
                table: *t,
            }));
        }
    }
    ops
}

/// Calls that take down one hardware window: unmap what may be mapped, then remove it.
fn remove_window_ops(
    state: &State,
    mode: OwnershipMode,
    container: ContainerId,
    start: u64,
) -> Vec<KernelOp> {
    let Some(w) = state
        .containers
        .get(&container)
        .and_then(|c| c.windows.get(&start))
    else {
        return Vec::new();
    };
    let table = state.table_at(container, start).filter(|_| !w.default);
    // In accelerated mode the kernel maps entries itself, so only a full unmap is certain to
    // release them (QEMU unmaps the whole section too); in isolated mode the session knows.
    let unmap = match (mode, table) {
        (_, None) => false,
        (OwnershipMode::Accelerated, Some(_)) => true,
        (OwnershipMode::Isolated, Some(t)) => state.tables[&t].mapped.count() > 0,
    };
    // KVM must stop mapping into the window before it goes: an association left on a removed
    // hardware table keeps taking guest maps that nothing ever unpins.
    let mut ops = table.map(|t| sever_ops(state, t)).unwrap_or_default();
    if unmap {
        ops.push(KernelOp::UnmapDma {
            container,
            iova: start,
            size: w.size,
        });
    }
    ops.push(KernelOp::TceRemove {
        container,
        start_addr: start,
    });
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

impl TceUpdateProc {
    fn plan(&mut self, state: &State, mode: OwnershipMode) -> Result<Vec<KernelOp>, EngineError> {
        let table = TableId(self.update.table_id);
        let t = &state.tables[&table];
        let container = ContainerId(t.desc.container_id);
        let shift = t.desc.page_shift;
        let page = 1u64 << shift;
        let first = self.update.first_index;
        let count = u64::from(self.update.count);
        let iova = |index: u64| t.desc.bus_offset + (index << shift);
        self.op_starts.clear();
        let mut ops = Vec::new();

        if let TceEntries::Stuff(_) = self.update.entries {
            // Permission bits were refused before the procedure started: this only clears.
            for (start, len) in self.unmap_runs(t, mode, first, count) {
                self.op_starts.push_back(start - first);
                ops.push(KernelOp::UnmapDma {
                    container,
                    iova: iova(start),
                    size: len << shift,
                });
            }
            return Ok(ops);
        }
        let values = match (&mut self.update.entries, &mut self.values) {
            (TceEntries::Inline(v), _) | (TceEntries::Shared, Some(v)) => std::mem::take(v),
            (TceEntries::Shared, None) | (TceEntries::Stuff(_), _) => Vec::new(),
        };
        // Validate every entry before making any call, as H_PUT_TCE_INDIRECT does.
        let mut targets = Vec::with_capacity(values.len());
        for (i, &value) in values.iter().enumerate() {
            let access = DmaAccess {
                read: value & TCE_READ != 0,
                write: value & TCE_WRITE != 0,
            };
            if !access.read && !access.write {
                targets.push(None);
                continue;
            }
            let addr = value & !(TCE_READ | TCE_WRITE);
            if addr % page != 0 {
                return Err(self.parameter(format!(
                    "entry {i}: address {addr:#x} is not aligned to the {page:#x}-byte IOMMU page"
                )));
            }
            let region = state.regions.iter().find(|(_, r)| {
                addr >= r.desc.guest_addr
                    && addr
                        .checked_add(page)
                        .is_some_and(|e| e <= r.desc.guest_addr + r.desc.size)
            });
            let Some((region, r)) = region else {
                return Err(self.parameter(format!(
                    "entry {i}: guest address {addr:#x} is outside registered RAM"
                )));
            };
            targets.push(Some((*region, addr - r.desc.guest_addr, access)));
        }
        // Coalesce: consecutive entries whose bus and host addresses are both contiguous, with
        // the same permissions, become one call.
        let mut i = 0;
        while i < targets.len() {
            let index = first + i as u64;
            match targets[i] {
                Some((region, offset, access)) => {
                    let mut n = 1;
                    while i + n < targets.len()
                        && targets[i + n] == Some((region, offset + n as u64 * page, access))
                    {
                        n += 1;
                    }
                    self.op_starts.push_back(i as u64);
                    ops.push(KernelOp::MapDma {
                        container,
                        region,
                        offset,
                        iova: iova(index),
                        size: n as u64 * page,
                        access,
                    });
                    i += n;
                }
                None => {
                    let mut n = 1;
                    while i + n < targets.len() && targets[i + n].is_none() {
                        n += 1;
                    }
                    for (start, len) in self.unmap_runs(t, mode, index, n as u64) {
                        self.op_starts.push_back(start - first);
                        ops.push(KernelOp::UnmapDma {
                            container,
                            iova: iova(start),
                            size: len << shift,
                        });
                    }
                    i += n;
                }
            }
        }
        Ok(ops)
    }

    /// Unmaps every entry a refused update names inside the table, so no hardware entry keeps
    /// a mapping the guest-visible table no longer shows.
    fn fail_safe(&mut self, state: &State, mode: OwnershipMode, from: u64) -> Vec<KernelOp> {
        let table = TableId(self.update.table_id);
        let t = &state.tables[&table];
        let container = ContainerId(t.desc.container_id);
        let first = self
            .update
            .first_index
            .saturating_add(from)
            .min(t.desc.entries);
        let end = first
            .saturating_add(self.update.count.into())
            .min(t.desc.entries);
        self.op_starts.clear();
        self.unmap_runs(t, mode, first, end - first)
            .into_iter()
            .map(|(start, len)| KernelOp::UnmapDma {
                container,
                iova: t.desc.bus_offset + (start << t.desc.page_shift),
                size: len << t.desc.page_shift,
            })
            .collect()
    }

    /// Runs of entries in `first..first + count` to unmap: all of them in accelerated mode (the
    /// kernel may have mapped any), only those this session mapped in isolated mode.
    fn unmap_runs(
        &self,
        t: &Table,
        mode: OwnershipMode,
        first: u64,
        count: u64,
    ) -> Vec<(u64, u64)> {
        if mode == OwnershipMode::Accelerated {
            return vec![(first, count)];
        }
        t.mapped.set_runs(first, count)
    }

    fn parameter(&mut self, text: impl Into<String>) -> EngineError {
        self.h_failure = H_PARAMETER;
        err(Errno::INVAL, text)
    }
}

pub fn tce_refusal_body(errno: Errno) -> Vec<u8> {
    let h_status = if errno == Errno::INVAL || errno == Errno::NOENT {
        H_PARAMETER
    } else {
        H_HARDWARE
    };
    TceUpdateBody {
        h_status,
        processed: 0,
    }
    .encode()
}

impl Procedure {
    pub fn teardown() -> Self {
        Self::Teardown { stage: 0 }
    }

    /// Whether a failure undoes the calls that succeeded. Removals and updates cannot be
    /// undone faithfully; they stop and report what is left.
    pub fn rolls_back(&self) -> bool {
        match self {
            Self::GroupAdd { .. }
            | Self::MemAdd { .. }
            | Self::MemRemove { .. }
            | Self::WindowCreate(_) => true,
            Self::WindowReset { .. } => true,
            Self::GroupRemove { .. }
            | Self::GroupAdopt { .. }
            | Self::WindowRemove { .. }
            | Self::TceUpdate(_)
            | Self::Eeh { .. }
            | Self::Teardown { .. } => false,
        }
    }

    /// The calls of the next stage; `None` when the procedure is complete.
    pub fn next(
        &mut self,
        state: &State,
        mode: OwnershipMode,
    ) -> Result<Option<Vec<KernelOp>>, EngineError> {
        match self {
            Self::GroupAdd {
                group,
                container,
                stage,
                new_container,
            } => {
                let (group, container) = (*group, *container);
                *stage += 1;
                Ok(match *stage {
                    // No FILE_ADD yet: a group file is added to the kvm-vfio device only to be
                    // associated (see `associate_ops`).
                    1 => {
                        let open = state.containers.get(&container).is_some_and(|c| c.open);
                        *new_container = !open;
                        let attach = KernelOp::GroupSetContainer { container, group };
                        Some(if open {
                            vec![attach]
                        } else {
                            vec![
                                KernelOp::ContainerOpen { container },
                                attach,
                                KernelOp::SetIommu {
                                    container,
                                    iommu_type: SPAPR_TCE_V2_IOMMU,
                                },
                                KernelOp::TceGetInfo { container },
                            ]
                        })
                    }
                    2 if *new_container => {
                        // Pre-register all guest RAM, then drop the default window: windows are
                        // created from the guest's tables (WINDOW_CREATE), as QEMU does.
                        let mut ops = register_ops(state, container, true);
                        let c = &state.containers[&container];
                        ops.extend(c.windows.iter().filter(|(_, w)| w.default).map(
                            |(start, _)| KernelOp::TceRemove {
                                container,
                                start_addr: *start,
                            },
                        ));
                        Some(ops)
                    }
                    2 => Some(match mode {
                        // The kernel sets existing windows on the new group; KVM must learn of
                        // them too.
                        OwnershipMode::Accelerated => {
                            let tables: Vec<TableId> = state
                                .tables
                                .keys()
                                .filter(|t| {
                                    state.window_of(**t).is_some()
                                        && state.tables[t].desc.container_id == container.0
                                })
                                .copied()
                                .collect();
                            associate_ops(state, group, &tables)
                        }
                        OwnershipMode::Isolated => Vec::new(),
                    }),
                    _ => None,
                })
            }
            Self::GroupAdopt {
                container,
                stage,
                new_container,
                ..
            } => {
                *stage += 1;
                Ok((*stage == 1 && *new_container).then(|| {
                    vec![KernelOp::TceGetInfo {
                        container: *container,
                    }]
                }))
            }
            Self::GroupRemove { group, stage } => {
                let group = *group;
                let g = &state.groups[&group];
                let container = g.container;
                *stage += 1;
                Ok(match *stage {
                    // FILE_DEL before the windows go: KVM releases the group's associations by
                    // walking the group's current tables.
                    1 => Some(if g.file_added {
                        vec![KernelOp::KvmFileDel { group }]
                    } else {
                        Vec::new()
                    }),
                    2 => {
                        let last = !state
                            .groups
                            .iter()
                            .any(|(id, o)| *id != group && o.container == container);
                        let mut ops = Vec::new();
                        let c = state.containers.get(&container);
                        if last {
                            let starts: Vec<u64> = c
                                .map(|c| c.windows.keys().copied().collect())
                                .unwrap_or_default();
                            for start in starts {
                                ops.extend(remove_window_ops(state, mode, container, start));
                            }
                            ops.extend(register_ops(state, container, false));
                        }
                        if g.attached {
                            ops.push(KernelOp::GroupUnsetContainer { container, group });
                        }
                        if last && c.is_some_and(|c| c.open) {
                            ops.push(KernelOp::ContainerClose { container });
                        }
                        Some(ops)
                    }
                    _ => None,
                })
            }
            Self::MemAdd { region, stage } => {
                *stage += 1;
                Ok((*stage == 1).then(|| {
                    state
                        .containers
                        .iter()
                        .filter(|(_, c)| c.info.is_some())
                        .map(|(id, _)| KernelOp::RegisterMemory {
                            container: *id,
                            region: *region,
                            offset: 0,
                            size: state.regions[region].desc.size,
                        })
                        .collect()
                }))
            }
            Self::MemRemove {
                region,
                stage,
                scan,
                busy,
                ..
            } => {
                // Unregistering memory that DMA entries still use would leave it pinned: since
                // Linux 6.4 the call returns 0 and the region stays pinned until the process
                // exits. So first read the guest-visible tables (K6) for entries into it.
                if let Some((table, index)) = busy {
                    return Err(err(
                        Errno::BUSY,
                        format!("{table} entry {index} still maps {region}; the guest must unmap it first"),
                    ));
                }
                if let Some((table, first)) = scan.front_mut() {
                    let entries = state.tables.get(table).map_or(0, |t| t.desc.entries);
                    let count =
                        (entries - (*first).min(entries)).min(u64::from(MAX_INLINE_TCES)) as u32;
                    let op = KernelOp::ReadTces {
                        table: *table,
                        first_index: *first,
                        count,
                    };
                    *first += u64::from(count);
                    if *first >= entries {
                        scan.pop_front();
                    }
                    return Ok(Some(if count == 0 { Vec::new() } else { vec![op] }));
                }
                *stage += 1;
                Ok((*stage == 1).then(|| {
                    state
                        .containers
                        .iter()
                        .filter(|(_, c)| c.registered.contains(region))
                        .map(|(id, _)| KernelOp::UnregisterMemory {
                            container: *id,
                            region: *region,
                            offset: 0,
                            size: state.regions[region].desc.size,
                        })
                        .collect()
                }))
            }
            Self::WindowCreate(create) => create.next(state, mode),
            Self::WindowRemove { table, stage } => {
                *stage += 1;
                Ok((*stage == 1).then(|| {
                    let t = &state.tables[table];
                    remove_window_ops(
                        state,
                        mode,
                        ContainerId(t.desc.container_id),
                        t.desc.bus_offset,
                    )
                }))
            }
            Self::WindowReset {
                container,
                stage,
                default,
                create,
                host,
            } => {
                *stage += 1;
                if *stage == 1 {
                    let starts: Vec<u64> = state.containers[container]
                        .windows
                        .keys()
                        .copied()
                        .collect();
                    return Ok(Some(
                        starts
                            .into_iter()
                            .flat_map(|s| remove_window_ops(state, mode, *container, s))
                            .collect(),
                    ));
                }
                if *stage == 2 {
                    let Some(table) = *default else {
                        return Ok(None);
                    };
                    *create = Some(WindowCreate::check(state, host, table)?);
                }
                match create {
                    Some(c) => c.next(state, mode),
                    None => Ok(None),
                }
            }
            Self::TceUpdate(update) => {
                update.stage += 1;
                match update.stage {
                    1 => Ok(Some(match (&update.update.entries, &update.refusal) {
                        (TceEntries::Shared, None) => vec![KernelOp::ReadTces {
                            table: TableId(update.update.table_id),
                            first_index: update.update.first_index,
                            count: update.update.count,
                        }],
                        _ => Vec::new(),
                    })),
                    2 => {
                        if update.refusal.is_none() {
                            match update.plan(state, mode) {
                                Ok(ops) => return Ok(Some(ops)),
                                Err(e) => update.refusal = Some(e),
                            }
                        }
                        Ok(Some(update.fail_safe(state, mode, 0)))
                    }
                    _ => match update.refusal.take() {
                        Some(refusal) => Err(refusal),
                        None => {
                            update.processed = update.update.count.into();
                            Ok(None)
                        }
                    },
                }
            }
            Self::Eeh { request, stage, .. } => {
                *stage += 1;
                Ok((*stage == 1).then(|| {
                    vec![KernelOp::EehPeOp {
                        container: ContainerId(request.container_id),
                        op: request.op,
                        err_type: request.err_type,
                        err_func: request.err_func,
                        err_addr: request.err_addr,
                        err_mask: request.err_mask,
                    }]
                }))
            }
            Self::Teardown { stage } => {
                *stage += 1;
                if *stage > 1 {
                    return Ok(None);
                }
                let mut ops = Vec::new();
                for (id, c) in &state.containers {
                    let groups: Vec<GroupId> = state
                        .groups
                        .iter()
                        .filter(|(_, g)| g.container == *id)
                        .map(|(g, _)| *g)
                        .collect();
                    let starts: Vec<u64> = c.windows.keys().copied().collect();
                    let removals: Vec<KernelOp> = starts
                        .iter()
                        .flat_map(|s| remove_window_ops(state, mode, *id, *s))
                        .collect();
                    // Unmap first, then FILE_DEL, then remove windows, unregister, detach, close.
                    let (unmaps, removes): (Vec<_>, Vec<_>) = removals
                        .into_iter()
                        .partition(|op| matches!(op, KernelOp::UnmapDma { .. }));
                    ops.extend(unmaps);
                    ops.extend(
                        groups
                            .iter()
                            .filter(|g| state.groups[g].file_added)
                            .map(|g| KernelOp::KvmFileDel { group: *g }),
                    );
                    ops.extend(removes);
                    ops.extend(register_ops(state, *id, false));
                    ops.extend(groups.iter().filter(|g| state.groups[g].attached).map(|g| {
                        KernelOp::GroupUnsetContainer {
                            container: *id,
                            group: *g,
                        }
                    }));
                    if c.open {
                        ops.push(KernelOp::ContainerClose { container: *id });
                    }
                }
                Ok(Some(ops))
            }
        }
    }

    /// Records what a successful call returned that later stages need.
    pub fn succeeded(&mut self, op: &KernelOp, output: &Output) {
        match (self, op, output) {
            (Self::WindowCreate(c), KernelOp::TceCreate { .. }, Output::StartAddr(start))
            | (
                Self::WindowReset {
                    create: Some(c), ..
                },
                KernelOp::TceCreate { .. },
                Output::StartAddr(start),
            ) => {
                c.start = Some(*start);
            }
            (Self::TceUpdate(u), KernelOp::ReadTces { .. }, Output::Tces(values)) => {
                u.values = Some(values.clone())
            }
            (Self::TceUpdate(u), KernelOp::MapDma { .. } | KernelOp::UnmapDma { .. }, _) => {
                u.op_starts.pop_front();
            }
            (Self::Eeh { result, .. }, KernelOp::EehPeOp { .. }, Output::Value(v)) => {
                *result = Some(*v)
            }
            (
                Self::MemRemove {
                    range,
                    busy: busy @ None,
                    ..
                },
                KernelOp::ReadTces {
                    table, first_index, ..
                },
                Output::Tces(values),
            ) => {
                let into = |v: &u64| {
                    v & (TCE_READ | TCE_WRITE) != 0
                        && range.contains(&(v & !(TCE_READ | TCE_WRITE)))
                };
                *busy = values
                    .iter()
                    .position(into)
                    .map(|i| (*table, first_index + i as u64));
            }
            _ => {}
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
            Self::Teardown { .. } => Failure::Continue,
            Self::WindowCreate(c)
            | Self::WindowReset {
                create: Some(c), ..
            } => c.failed(op, errno),
            Self::TceUpdate(u) => {
                let text = format!("{op} failed: {errno}");
                if matches!(op, KernelOp::ReadTces { .. }) {
                    return Failure::Fail(err(errno, text));
                }
                if let Some(refusal) = &u.refusal {
                    // The fail-safe unmap itself failed: say so, and remember it.
                    u.unsafe_left = true;
                    let text = format!(
                        "{}; unmapping the entries it names then failed too: {text}",
                        refusal.text
                    );
                    return Failure::Fail(err(refusal.errno, text));
                }
                // The guest-visible table already holds the new entries: unmap every entry not
                // applied yet, so hardware never keeps a mapping the table does not show.
                u.processed = u.op_starts.front().copied().unwrap_or_default();
                u.h_failure = H_HARDWARE;
                u.refusal = Some(err(errno, format!("{text} after {} entries", u.processed)));
                Failure::Retry(u.fail_safe(
                    state,
                    mode.unwrap_or(OwnershipMode::Isolated),
                    u.processed,
                ))
            }
            Self::GroupAdd { .. }
            | Self::GroupRemove { .. }
            | Self::GroupAdopt { .. }
            | Self::MemAdd { .. }
            | Self::MemRemove { .. }
            | Self::WindowRemove { .. }
            | Self::WindowReset { create: None, .. }
            | Self::Eeh { .. } => Failure::Fail(describe(op, errno, state, mode)),
        }
    }

    /// The body of the final successful reply.
    pub fn body(&self, _state: &State) -> Vec<u8> {
        match self {
            Self::WindowCreate(c)
            | Self::WindowReset {
                create: Some(c), ..
            } => c.body(),
            Self::TceUpdate(u) => TceUpdateBody {
                h_status: H_SUCCESS,
                processed: u.processed as u32,
            }
            .encode(),
            Self::Eeh { result, .. } => EehBody {
                result: result.unwrap_or_default() as i32,
            }
            .encode(),
            Self::GroupAdd { .. }
            | Self::GroupRemove { .. }
            | Self::GroupAdopt { .. }
            | Self::MemAdd { .. }
            | Self::MemRemove { .. }
            | Self::WindowRemove { .. }
            | Self::WindowReset { create: None, .. }
            | Self::Teardown { .. } => Vec::new(),
        }
    }

    /// The body of the final error reply.
    pub fn failure_body(&self, _errno: Errno) -> Vec<u8> {
        match self {
            Self::TceUpdate(u) => TceUpdateBody {
                h_status: u.h_failure,
                processed: u.processed as u32,
            }
            .encode(),
            _ => Vec::new(),
        }
    }

    /// Settles the objects the request added or removed, once it is over.
    pub fn finished(&self, state: &mut State, ok: bool) {
        match *self {
            // TCE_GET_INFO recorded the default window a new container starts with; the
            // front-end removed it when it set the container up.
            Self::GroupAdopt {
                container,
                new_container: true,
                ..
            } if ok => {
                if let Some(c) = state.containers.get_mut(&container) {
                    c.windows.retain(|_, w| !w.default);
                }
            }
            // Nothing was done in the kernel: forget what the request recorded.
            Self::GroupAdopt {
                group,
                container,
                new_container,
                ..
            } => {
                state.groups.remove(&group);
                if new_container {
                    state.containers.remove(&container);
                } else if let Some(c) = state.containers.get_mut(&container) {
                    c.groups.remove(&group);
                }
            }
            // Fully rolled back: forget the group. Otherwise it stays, as the kernel holds it.
            Self::GroupAdd {
                group, container, ..
            } if !ok
                && state
                    .groups
                    .get(&group)
                    .is_some_and(|g| !g.file_added && !g.attached) =>
            {
                state.groups.remove(&group);
                if let Some(c) = state.containers.get_mut(&container) {
                    c.groups.remove(&group);
                }
            }
            Self::GroupRemove { group, .. } => {
                let gone = state
                    .groups
                    .get(&group)
                    .is_some_and(|g| !g.file_added && !g.attached);
                if ok || gone {
                    if let Some(g) = state.groups.remove(&group) {
                        if let Some(c) = state.containers.get_mut(&g.container) {
                            c.groups.remove(&group);
                        }
                    }
                }
            }
            Self::MemAdd { region, .. }
                if !ok
                    && !state
                        .containers
                        .values()
                        .any(|c| c.registered.contains(&region)) =>
            {
                state.regions.remove(&region);
            }
            Self::MemRemove { region, .. } if ok => {
                state.regions.remove(&region);
            }
            Self::TceUpdate(ref u) if u.unsafe_left => {
                if let Some(t) = state.tables.get_mut(&TableId(u.update.table_id)) {
                    t.suspect = true;
                }
            }
            _ => {}
        }
    }
}
