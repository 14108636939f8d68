//! TCE_UPDATE: a guest's TCE hypercall that reached the sidecar (the slow path, qemu-notes §6),
//! applied to the hardware window as MAP_DMA and UNMAP_DMA calls. The reply carries the
//! hypercall's return code and how many entries were applied.

use std::collections::VecDeque;

use rustix::io::Errno;

use crate::engine::state::{State, Table};
use crate::engine::EngineError;
use crate::kernel::{ContainerId, KernelOp, Output, OwnershipMode, RegionId, TableId};
use crate::protocol::{DmaAccess, TceEntries, TceUpdate, TceUpdateBody};

use super::{err, Failure, TCE_READ, TCE_WRITE};

/// Hypercall return codes (PAPR).
const H_SUCCESS: i64 = 0;
const H_HARDWARE: i64 = -1;
const H_PARAMETER: i64 = -4;

#[derive(Debug)]
pub struct TceUpdateProc {
    update: TceUpdate,
    values: Option<Vec<u64>>,
    stage: TceUpdateStage,
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TceUpdateStage {
    /// Read the entries from the shared table when the update leaves them there (nothing for
    /// inline entries, H_STUFF_TCE or an update already refused).
    ReadEntries,
    /// Map and unmap as the entries say; for a refused update, unmap every entry it names.
    Apply,
    /// Fail with the refusal, if any; otherwise count every entry as applied.
    Report,
    Done,
}

/// Where one entry points: `None` clears it, otherwise the region, the offset in it and the
/// access the entry grants.
type Target = Option<(RegionId, u64, DmaAccess)>;

impl TceUpdateProc {
    pub(super) fn start(state: &State, update: TceUpdate) -> Result<Self, EngineError> {
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
        Ok(Self {
            update,
            values: None,
            stage: TceUpdateStage::ReadEntries,
            op_starts: VecDeque::new(),
            processed: 0,
            h_failure,
            refusal,
            unsafe_left: false,
        })
    }

    pub(super) fn next(
        &mut self,
        state: &State,
        mode: OwnershipMode,
    ) -> Result<Option<Vec<KernelOp>>, EngineError> {
        match self.stage {
            TceUpdateStage::ReadEntries => {
                self.stage = TceUpdateStage::Apply;
                Ok(Some(match (&self.update.entries, &self.refusal) {
                    (TceEntries::Shared, None) => vec![KernelOp::ReadTces {
                        table: TableId(self.update.table_id),
                        first_index: self.update.first_index,
                        count: self.update.count,
                    }],
                    _ => Vec::new(),
                }))
            }
            TceUpdateStage::Apply => {
                self.stage = TceUpdateStage::Report;
                if self.refusal.is_none() {
                    match self.plan(state, mode) {
                        Ok(ops) => return Ok(Some(ops)),
                        Err(e) => self.refusal = Some(e),
                    }
                }
                Ok(Some(self.fail_safe(state, mode, 0)))
            }
            TceUpdateStage::Report => {
                self.stage = TceUpdateStage::Done;
                match self.refusal.take() {
                    Some(refusal) => Err(refusal),
                    None => {
                        self.processed = self.update.count.into();
                        Ok(None)
                    }
                }
            }
            TceUpdateStage::Done => Ok(None),
        }
    }

    fn plan(&mut self, state: &State, mode: OwnershipMode) -> Result<Vec<KernelOp>, EngineError> {
        let t = &state.tables[&TableId(self.update.table_id)];
        self.op_starts.clear();

        if let TceEntries::Stuff(_) = self.update.entries {
            // Permission bits were refused before the procedure started: this only clears.
            let (first, count) = (self.update.first_index, u64::from(self.update.count));
            return Ok(self.unmap_ops(t, mode, first, count));
        }
        let values = match (&mut self.update.entries, &mut self.values) {
            (TceEntries::Inline(v), _) | (TceEntries::Shared, Some(v)) => std::mem::take(v),
            (TceEntries::Shared, None) | (TceEntries::Stuff(_), _) => Vec::new(),
        };
        // Validate every entry before making any call, as H_PUT_TCE_INDIRECT does.
        let targets = self.targets(state, 1u64 << t.desc.page_shift, &values)?;
        Ok(self.coalesce(t, mode, &targets))
    }

    /// Where each entry points, once every entry is checked: aligned to the IOMMU page and
    /// inside registered RAM.
    fn targets(
        &mut self,
        state: &State,
        page: u64,
        values: &[u64],
    ) -> Result<Vec<Target>, EngineError> {
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
        Ok(targets)
    }

    /// Coalesce: consecutive entries whose bus and host addresses are both contiguous, with
    /// the same permissions, become one call.
    fn coalesce(&mut self, t: &Table, mode: OwnershipMode, targets: &[Target]) -> Vec<KernelOp> {
        let container = ContainerId(t.desc.container_id);
        let shift = t.desc.page_shift;
        let page = 1u64 << shift;
        let first = self.update.first_index;
        let mut ops = Vec::new();
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
                        iova: t.desc.bus_offset + (index << shift),
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
                    ops.extend(self.unmap_ops(t, mode, index, n as u64));
                    i += n;
                }
            }
        }
        ops
    }

    /// The unmaps of entries `index..index + count` (see [`Self::unmap_runs`]), each noted
    /// with where it starts in the update.
    fn unmap_ops(
        &mut self,
        t: &Table,
        mode: OwnershipMode,
        index: u64,
        count: u64,
    ) -> Vec<KernelOp> {
        let container = ContainerId(t.desc.container_id);
        let shift = t.desc.page_shift;
        let first = self.update.first_index;
        let mut ops = Vec::new();
        for (start, len) in self.unmap_runs(t, mode, index, count) {
            self.op_starts.push_back(start - first);
            ops.push(KernelOp::UnmapDma {
                container,
                iova: t.desc.bus_offset + (start << shift),
                size: len << shift,
            });
        }
        ops
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

    /// Keeps the entries read from the shared table, and counts the calls applied.
    pub(super) fn succeeded(&mut self, op: &KernelOp, output: &Output) {
        match (op, output) {
            (KernelOp::ReadTces { .. }, Output::Tces(values)) => self.values = Some(values.clone()),
            (KernelOp::MapDma { .. } | KernelOp::UnmapDma { .. }, _) => {
                self.op_starts.pop_front();
            }
            _ => {}
        }
    }

    pub(super) fn failed(
        &mut self,
        op: &KernelOp,
        errno: Errno,
        state: &State,
        mode: Option<OwnershipMode>,
    ) -> Failure {
        let text = format!("{op} failed: {errno}");
        if matches!(op, KernelOp::ReadTces { .. }) {
            return Failure::Fail(err(errno, text));
        }
        if let Some(refusal) = &self.refusal {
            // The fail-safe unmap itself failed: say so, and remember it.
            self.unsafe_left = true;
            let text = format!(
                "{}; unmapping the entries it names then failed too: {text}",
                refusal.text
            );
            return Failure::Fail(err(refusal.errno, text));
        }
        // The guest-visible table already holds the new entries: unmap every entry not
        // applied yet, so hardware never keeps a mapping the table does not show.
        self.processed = self.op_starts.front().copied().unwrap_or_default();
        self.h_failure = H_HARDWARE;
        self.refusal = Some(err(
            errno,
            format!("{text} after {} entries", self.processed),
        ));
        Failure::Retry(self.fail_safe(
            state,
            mode.unwrap_or(OwnershipMode::Isolated),
            self.processed,
        ))
    }

    pub(super) fn body(&self) -> Vec<u8> {
        TceUpdateBody {
            h_status: H_SUCCESS,
            processed: self.processed as u32,
        }
        .encode()
    }

    pub(super) fn failure_body(&self) -> Vec<u8> {
        TceUpdateBody {
            h_status: self.h_failure,
            processed: self.processed as u32,
        }
        .encode()
    }

    /// A failed fail-safe unmap marks the table suspect: hardware may map memory its entries
    /// no longer show.
    pub(super) fn finished(&self, state: &mut State) {
        if self.unsafe_left {
            if let Some(t) = state.tables.get_mut(&TableId(self.update.table_id)) {
                t.suspect = true;
            }
        }
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
