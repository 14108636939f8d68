//! The session's view of the kernel: what each successful kernel call changed, and the call that
//! undoes it. This view is updated only from results (never from intentions), so after a
//! failure or a disconnect it says exactly what the kernel holds.

use std::collections::{BTreeMap, BTreeSet};

use crate::kernel::{ContainerId, GroupId, KernelOp, Output, RegionId, TableId};
use crate::protocol::{MemRegion, TableDesc, TceInfo};

use super::mapped::MappedBits;
use super::region_runs::RegionRuns;

/// A guest RAM region the front-end registered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Region {
    pub desc: MemRegion,
    /// Page size of the memory backing the region (hugetlbfs pages, or the base page).
    pub page_size: u64,
}

/// A hardware DMA window, keyed in its container by start address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HwWindow {
    pub size: u64,
    pub page_shift: u32,
    pub levels: u32,
    /// The kernel's default 32-bit window, created implicitly when the first group attaches.
    pub default: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Container {
    pub groups: BTreeSet<GroupId>,
    pub open: bool,
    pub iommu_set: bool,
    pub info: Option<TceInfo>,
    pub registered: BTreeSet<RegionId>,
    pub windows: BTreeMap<u64, HwWindow>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    pub container: ContainerId,
    pub iommu_group: u32,
    pub file_added: bool,
    pub attached: bool,
    /// Tables KVM associated with this group's hardware windows (accelerated mode).
    pub associations: BTreeSet<TableId>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Table {
    pub desc: TableDesc,
    /// Entries mapped through this session (isolated mode only).
    pub mapped: MappedBits,
    /// The region each of those maps.
    pub mapped_regions: RegionRuns,
    /// A failed UNMAP_DMA may have left hardware entries that the guest-visible table no
    /// longer shows; cleared when the window goes or its entries are cleared.
    pub suspect: bool,
}

impl Table {
    pub fn window_size(&self) -> u64 {
        self.desc.entries << self.desc.page_shift
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct State {
    /// Whether mapped entries are tracked: only where every map and unmap passes through the
    /// session (isolated mode). In accelerated mode KVM maps and unmaps in the kernel, unseen.
    pub track_mapped: bool,
    pub regions: BTreeMap<RegionId, Region>,
    pub containers: BTreeMap<ContainerId, Container>,
    pub groups: BTreeMap<GroupId, Group>,
    pub tables: BTreeMap<TableId, Table>,
}

impl State {
    /// The table whose window contains bus address `iova` in `container`.
    pub fn table_at(&self, container: ContainerId, iova: u64) -> Option<TableId> {
        self.tables
            .iter()
            .find(|(_, t)| {
                t.desc.container_id == container.0
                    && iova >= t.desc.bus_offset
                    && iova - t.desc.bus_offset < t.window_size()
            })
            .map(|(id, _)| *id)
    }

    /// The hardware window serving `table`, if one exists at its bus offset and covers it.
    pub fn window_of(&self, table: TableId) -> Option<(u64, HwWindow)> {
        let t = self.tables.get(&table)?;
        let c = self.containers.get(&ContainerId(t.desc.container_id))?;
        let w = c.windows.get(&t.desc.bus_offset)?;
        (!w.default && w.size >= t.window_size()).then_some((t.desc.bus_offset, *w))
    }

    /// Records the effect of a successful call.
    pub fn apply(&mut self, op: &KernelOp, output: &Output) {
        match *op {
            KernelOp::ContainerOpen { container } => self.container(container).open = true,
            KernelOp::ContainerClose { container } => {
                let c = self.container(container);
                // Closing the container fd releases everything the kernel held for it.
                *c = Container {
                    groups: std::mem::take(&mut c.groups),
                    ..Container::default()
                };
                self.clear_mapped(container);
            }
            KernelOp::SetIommu { container, .. } => self.container(container).iommu_set = true,
            KernelOp::GroupSetContainer { group, .. } => {
                if let Some(g) = self.groups.get_mut(&group) {
                    g.attached = true;
                }
            }
            KernelOp::GroupUnsetContainer { container, group } => {
                if let Some(g) = self.groups.get_mut(&group) {
                    g.attached = false;
                }
                // Detaching any group clears every entry of the container's tables, which all
                // groups share (tce_iommu_release_ownership); the tables stay allocated until
                // removed or the container closes.
                self.clear_mapped(container);
            }
            KernelOp::TceGetInfo { container } => {
                if let Output::TceInfo(info) = output {
                    let c = self.container(container);
                    c.info = Some(*info);
                    // The v2 driver creates the default 32-bit window lazily for the first group
                    // ("def_window_pending"); it exists until removed.
                    if c.windows.is_empty() && info.dma32_window_size != 0 {
                        c.windows.insert(
                            info.dma32_window_start.into(),
                            HwWindow {
                                size: info.dma32_window_size.into(),
                                page_shift: 12,
                                levels: 1,
                                default: true,
                            },
                        );
                    }
                }
            }
            KernelOp::RegisterMemory {
                container, region, ..
            } => {
                self.container(container).registered.insert(region);
            }
            KernelOp::UnregisterMemory {
                container, region, ..
            } => {
                self.container(container).registered.remove(&region);
            }
            KernelOp::TceCreate {
                container,
                page_shift,
                window_size,
                levels,
            } => {
                if let Output::StartAddr(start) = output {
                    self.container(container).windows.insert(
                        *start,
                        HwWindow {
                            size: window_size,
                            page_shift,
                            levels,
                            default: false,
                        },
                    );
                }
            }
            KernelOp::TceRemove {
                container,
                start_addr,
            } => {
                self.container(container).windows.remove(&start_addr);
                // The kernel clears the window's entries before removing it.
                let tables: Vec<TableId> = self
                    .tables
                    .iter()
                    .filter(|(_, t)| {
                        t.desc.container_id == container.0 && t.desc.bus_offset == start_addr
                    })
                    .map(|(id, _)| *id)
                    .collect();
                for id in tables {
                    if let Some(t) = self.tables.get_mut(&id) {
                        t.mapped.clear();
                        t.mapped_regions.clear();
                        t.suspect = false;
                    }
                    for g in self.groups.values_mut() {
                        g.associations.remove(&id);
                    }
                }
            }
            KernelOp::MapDma {
                container,
                region,
                iova,
                size,
                ..
            } => self.mark(container, iova, size, Some(region)),
            KernelOp::UnmapDma {
                container,
                iova,
                size,
            } => self.mark(container, iova, size, None),
            KernelOp::KvmFileAdd { group } => {
                if let Some(g) = self.groups.get_mut(&group) {
                    g.file_added = true;
                }
            }
            KernelOp::KvmFileDel { group } => {
                if let Some(g) = self.groups.get_mut(&group) {
                    g.file_added = false;
                    // FILE_DEL releases the group's TCE associations in KVM.
                    g.associations.clear();
                }
            }
            KernelOp::KvmSetSpaprTce { group, table } => {
                if let Some(g) = self.groups.get_mut(&group) {
                    g.associations.insert(table);
                }
            }
            KernelOp::CheckExtension { .. }
            | KernelOp::GroupGetStatus { .. }
            | KernelOp::EehPeOp { .. }
            | KernelOp::KvmHasDeviceAttr { .. }
            | KernelOp::ReadTces { .. } => {}
        }
    }

    fn container(&mut self, id: ContainerId) -> &mut Container {
        self.containers.entry(id).or_default()
    }

    fn clear_mapped(&mut self, container: ContainerId) {
        for t in self
            .tables
            .values_mut()
            .filter(|t| t.desc.container_id == container.0)
        {
            t.mapped.clear();
            t.mapped_regions.clear();
            t.suspect = false;
        }
    }

    /// Entries of `iova..iova + size` now map `region` (`None`: nothing).
    fn mark(&mut self, container: ContainerId, iova: u64, size: u64, region: Option<RegionId>) {
        if !self.track_mapped {
            return;
        }
        // A range may span several windows only by mistake; mark what each window covers.
        let mut at = iova;
        let end = iova.saturating_add(size);
        while at < end {
            let Some(id) = self.table_at(container, at) else {
                return;
            };
            let Some(t) = self.tables.get_mut(&id) else {
                return;
            };
            let shift = t.desc.page_shift;
            let first = (at - t.desc.bus_offset) >> shift;
            let window_end = t.desc.bus_offset + t.window_size();
            let stop = end.min(window_end);
            let count = (stop - at).div_ceil(1 << shift);
            t.mapped.set_range(first, count, region.is_some());
            match region {
                Some(region) => t.mapped_regions.map(first, count, region),
                None => t.mapped_regions.unmap(first, count),
            }
            at = stop;
        }
    }
}

/// A successful call of a transaction, as kept for rolling it back.
#[derive(Clone, Debug)]
pub struct Done {
    pub op: KernelOp,
    pub output: Output,
    /// What the call ended that the kernel view no longer shows once it is applied: for
    /// KVM_FILE_DEL, the tables its group was associated with.
    pub ended: Vec<TableId>,
}

impl Done {
    /// Records `op`, which succeeded with `output`; called before `state` applies it.
    pub fn record(op: &KernelOp, output: Output, state: &State) -> Self {
        let ended = match *op {
            KernelOp::KvmFileDel { group } => state
                .groups
                .get(&group)
                .map(|g| g.associations.iter().copied().collect())
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        Self {
            op: *op,
            output,
            ended,
        }
    }
}

/// The calls that undo `done`, newest first. Each call's inverse is computed on the kernel view
/// as the inverses before it leave it, so that undoing a sequence composes: a sever and re-add
/// (§7.7) undone in reverse ends with each group associated as it was.
pub fn rollback(done: &[Done], state: &State) -> Vec<KernelOp> {
    let mut view = state.clone();
    view.track_mapped = false;
    let mut undo = Vec::new();
    for d in done.iter().rev() {
        for op in inverse(d, &view) {
            view.apply(&op, &Output::Done);
            undo.push(op);
        }
    }
    undo
}

/// The calls that undo one successful call, computed on `state`, the kernel view when they run.
/// Calls with no inverse (a removal, a query) return nothing. KVM associations have no calls of
/// their own: one is ended by deleting its group's file and re-adding the file with its other
/// tables ([`super::procedures::sever_group_ops`]); the file's deletion is undone by re-adding it
/// with the tables it had that still have their window.
pub fn inverse(done: &Done, state: &State) -> Vec<KernelOp> {
    let single = match done.op {
        KernelOp::ContainerOpen { container } => KernelOp::ContainerClose { container },
        KernelOp::GroupSetContainer { container, group } => {
            KernelOp::GroupUnsetContainer { container, group }
        }
        KernelOp::RegisterMemory {
            container,
            region,
            offset,
            size,
        } => KernelOp::UnregisterMemory {
            container,
            region,
            offset,
            size,
        },
        KernelOp::UnregisterMemory {
            container,
            region,
            offset,
            size,
        } => KernelOp::RegisterMemory {
            container,
            region,
            offset,
            size,
        },
        KernelOp::TceCreate { container, .. } => match done.output {
            Output::StartAddr(start_addr) => KernelOp::TceRemove {
                container,
                start_addr,
            },
            _ => return Vec::new(),
        },
        KernelOp::MapDma {
            container,
            iova,
            size,
            ..
        } => KernelOp::UnmapDma {
            container,
            iova,
            size,
        },
        // Undoing the associations made after it may have deleted the file already.
        KernelOp::KvmFileAdd { group } => match state.groups.get(&group) {
            Some(g) if g.file_added => KernelOp::KvmFileDel { group },
            _ => return Vec::new(),
        },
        KernelOp::KvmSetSpaprTce { group, table } => {
            return super::procedures::sever_group_ops(state, group, &[table])
        }
        KernelOp::KvmFileDel { group } => {
            let associated = |t: &TableId| {
                state
                    .groups
                    .get(&group)
                    .is_some_and(|g| g.file_added && g.associations.contains(t))
            };
            let tables: Vec<TableId> = done
                .ended
                .iter()
                .filter(|t| state.window_of(**t).is_some() && !associated(t))
                .copied()
                .collect();
            return super::procedures::associate_ops(state, group, &tables);
        }
        KernelOp::ContainerClose { .. }
        | KernelOp::CheckExtension { .. }
        | KernelOp::SetIommu { .. }
        | KernelOp::GroupGetStatus { .. }
        | KernelOp::GroupUnsetContainer { .. }
        | KernelOp::TceGetInfo { .. }
        | KernelOp::TceRemove { .. }
        | KernelOp::UnmapDma { .. }
        | KernelOp::EehPeOp { .. }
        | KernelOp::KvmHasDeviceAttr { .. }
        | KernelOp::ReadTces { .. } => return Vec::new(),
    };
    vec![single]
}
