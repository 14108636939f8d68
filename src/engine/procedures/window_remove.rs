//! WINDOW_REMOVE: take down a table's hardware window (qemu-notes §6–§7): end its KVM
//! associations, unmap what may be mapped, then remove it.

use rustix::io::Errno;

use crate::engine::state::State;
use crate::engine::EngineError;
use crate::kernel::{ContainerId, KernelOp, OwnershipMode, TableId};

use super::{err, remove_window_ops};

#[derive(Debug)]
pub struct WindowRemove {
    table: TableId,
    stage: WindowRemoveStage,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WindowRemoveStage {
    /// Sever, unmap and remove the table's window.
    Remove,
    Done,
}

impl WindowRemove {
    pub(super) fn start(state: &State, table: TableId) -> Result<Self, EngineError> {
        if !state.tables.contains_key(&table) {
            return Err(err(Errno::NOENT, format!("{table} is not registered")));
        }
        if state.window_of(table).is_none() {
            return Err(err(Errno::NOENT, format!("{table} has no window")));
        }
        Ok(Self {
            table,
            stage: WindowRemoveStage::Remove,
        })
    }

    pub(super) fn next(&mut self, state: &State, mode: OwnershipMode) -> Option<Vec<KernelOp>> {
        match self.stage {
            WindowRemoveStage::Remove => {
                self.stage = WindowRemoveStage::Done;
                let t = &state.tables[&self.table];
                Some(remove_window_ops(
                    state,
                    mode,
                    ContainerId(t.desc.container_id),
                    &[t.desc.bus_offset],
                ))
            }
            WindowRemoveStage::Done => None,
        }
    }
}
