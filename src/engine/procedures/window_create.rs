//! WINDOW_CREATE: a hardware DMA window for a guest table (qemu-notes §4, §7), associated with
//! the table in KVM in accelerated mode (§5). WINDOW_RESET runs the same procedure for the
//! default table it re-creates.

use rustix::io::Errno;

use crate::engine::state::State;
use crate::engine::window::{geometry, Geometry};
use crate::engine::{EngineError, Host};
use crate::kernel::{ContainerId, KernelOp, Output, OwnershipMode, TableId};
use crate::protocol::WindowCreateBody;

use super::{associate_ops, attached_container, err, Failure};

#[derive(Debug)]
pub struct WindowCreate {
    table: TableId,
    pub(super) geometry: Geometry,
    levels: u32,
    start: Option<u64>,
    stage: WindowCreateStage,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WindowCreateStage {
    /// Create the hardware window (TCE_CREATE), deeper on each allocation failure.
    Create,
    /// Check that the host placed the window where the table expects it, then associate the
    /// table with every attached group in KVM (accelerated mode only).
    Associate,
    Done,
}

impl WindowCreate {
    pub(super) fn check(state: &State, host: &Host, table: TableId) -> Result<Self, EngineError> {
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
            stage: WindowCreateStage::Create,
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

    pub(super) fn next(
        &mut self,
        state: &State,
        mode: OwnershipMode,
    ) -> Result<Option<Vec<KernelOp>>, EngineError> {
        let t = &state.tables[&self.table];
        let container = ContainerId(t.desc.container_id);
        match self.stage {
            WindowCreateStage::Create => {
                self.stage = WindowCreateStage::Associate;
                Ok(Some(vec![self.create_op(container)]))
            }
            WindowCreateStage::Associate => {
                self.stage = WindowCreateStage::Done;
                self.associate(state, mode).map(Some)
            }
            WindowCreateStage::Done => Ok(None),
        }
    }

    /// The calls that associate the new window's table with the container's attached groups,
    /// once the window is known to sit where the table expects it.
    fn associate(&self, state: &State, mode: OwnershipMode) -> Result<Vec<KernelOp>, EngineError> {
        let t = &state.tables[&self.table];
        let container = ContainerId(t.desc.container_id);
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
            return Ok(Vec::new());
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
        Ok(groups
            .flat_map(|(id, _)| associate_ops(state, *id, &[self.table]))
            .collect())
    }

    /// Records where the host placed the window.
    pub(super) fn succeeded(&mut self, op: &KernelOp, output: &Output) {
        if let (KernelOp::TceCreate { .. }, Output::StartAddr(start)) = (op, output) {
            self.start = Some(*start);
        }
    }

    pub(super) fn failed(&mut self, op: &KernelOp, errno: Errno) -> Failure {
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
            // The front-end reports KVM's refusal and its own (an association it may not make)
            // alike.
            KernelOp::KvmSetSpaprTce { group, table } => Failure::Fail(err(
                errno,
                format!("KVM_SET_SPAPR_TCE of {table} with {group} failed: {errno}"),
            )),
            _ => Failure::Fail(err(errno, format!("{op} failed: {errno}"))),
        }
    }

    pub(super) fn body(&self) -> Vec<u8> {
        self.body_at(self.start.unwrap_or_default())
    }

    pub(super) fn body_at(&self, start_addr: u64) -> Vec<u8> {
        WindowCreateBody {
            start_addr,
            hw_page_shift: self.geometry.hw_page_shift,
            levels: self.levels,
        }
        .encode()
    }
}
