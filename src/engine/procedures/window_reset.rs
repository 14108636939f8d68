//! WINDOW_RESET: the guest's `ibm,reset-pe-dma-window` (qemu-notes §7): every window of the
//! container goes, then the default table, if one is given, gets its window back the way
//! WINDOW_CREATE makes one.

use rustix::io::Errno;

use crate::engine::state::State;
use crate::engine::{EngineError, Host};
use crate::kernel::{ContainerId, KernelOp, Output, OwnershipMode, TableId};

use super::window_create::WindowCreate;
use super::{attached_container, describe, err, remove_window_ops, Failure};

#[derive(Debug)]
pub struct WindowReset {
    container: ContainerId,
    stage: WindowResetStage,
    default: Option<TableId>,
    host: Host,
}

#[derive(Debug)]
enum WindowResetStage {
    /// Remove every window of the container, the default one included.
    RemoveWindows,
    /// Check the default table, if one is given; without one the reset is complete.
    CheckDefault,
    /// Create the default table's window, through WINDOW_CREATE's own stages.
    CreateDefault(WindowCreate),
    Done,
}

impl WindowReset {
    pub(super) fn start(
        state: &State,
        host: &Host,
        container: ContainerId,
        default: Option<TableId>,
    ) -> Result<Self, EngineError> {
        attached_container(state, container)?;
        if let Some(t) = default {
            match state.tables.get(&t) {
                None => return Err(err(Errno::NOENT, format!("{t} is not registered"))),
                Some(table) if table.desc.container_id != container.0 => {
                    return Err(err(
                        Errno::INVAL,
                        format!("{t} belongs to another container"),
                    ))
                }
                Some(_) => {}
            }
        }
        Ok(Self {
            container,
            stage: WindowResetStage::RemoveWindows,
            default,
            host: *host,
        })
    }

    pub(super) fn next(
        &mut self,
        state: &State,
        mode: OwnershipMode,
    ) -> Result<Option<Vec<KernelOp>>, EngineError> {
        match &mut self.stage {
            WindowResetStage::RemoveWindows => {
                self.stage = WindowResetStage::CheckDefault;
                let container = self.container;
                let starts: Vec<u64> = state.containers[&container]
                    .windows
                    .keys()
                    .copied()
                    .collect();
                Ok(Some(remove_window_ops(state, mode, container, &starts)))
            }
            WindowResetStage::CheckDefault => {
                let Some(table) = self.default else {
                    self.stage = WindowResetStage::Done;
                    return Ok(None);
                };
                let create = WindowCreate::check(state, &self.host, table)?;
                self.stage = WindowResetStage::CreateDefault(create);
                self.next(state, mode)
            }
            WindowResetStage::CreateDefault(create) => create.next(state, mode),
            WindowResetStage::Done => Ok(None),
        }
    }

    pub(super) fn succeeded(&mut self, op: &KernelOp, output: &Output) {
        if let WindowResetStage::CreateDefault(create) = &mut self.stage {
            create.succeeded(op, output);
        }
    }

    pub(super) fn failed(
        &mut self,
        op: &KernelOp,
        errno: Errno,
        state: &State,
        mode: Option<OwnershipMode>,
    ) -> Failure {
        match &mut self.stage {
            WindowResetStage::CreateDefault(create) => create.failed(op, errno),
            _ => Failure::Fail(describe(op, errno, state, mode)),
        }
    }

    pub(super) fn body(&self) -> Vec<u8> {
        match &self.stage {
            WindowResetStage::CreateDefault(create) => create.body(),
            _ => Vec::new(),
        }
    }
}
