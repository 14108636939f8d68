//! GROUP_REMOVE: detach a group from its container. The last group of a container takes its
//! windows, its registered memory and the container itself with it (qemu-notes §11).

use rustix::io::Errno;

use crate::engine::state::State;
use crate::engine::EngineError;
use crate::kernel::{GroupId, KernelOp, OwnershipMode};

use super::{err, register_ops, remove_window_ops};

#[derive(Debug)]
pub struct GroupRemove {
    group: GroupId,
    stage: GroupRemoveStage,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum GroupRemoveStage {
    /// Delete the group file from the kvm-vfio device, if it was added.
    DeleteFromKvm,
    /// Detach the group; for the container's last group, take down its windows and memory
    /// first and close it after.
    Detach,
    Done,
}

impl GroupRemove {
    pub(super) fn start(state: &State, group: GroupId) -> Result<Self, EngineError> {
        if !state.groups.contains_key(&group) {
            return Err(err(Errno::NOENT, format!("{group} is not registered")));
        }
        Ok(Self {
            group,
            stage: GroupRemoveStage::DeleteFromKvm,
        })
    }

    pub(super) fn next(&mut self, state: &State, mode: OwnershipMode) -> Option<Vec<KernelOp>> {
        let group = self.group;
        let g = &state.groups[&group];
        let container = g.container;
        match self.stage {
            // FILE_DEL before the windows go: KVM releases the group's associations by
            // walking the group's current tables.
            GroupRemoveStage::DeleteFromKvm => {
                self.stage = GroupRemoveStage::Detach;
                Some(if g.file_added {
                    vec![KernelOp::KvmFileDel { group }]
                } else {
                    Vec::new()
                })
            }
            GroupRemoveStage::Detach => {
                self.stage = GroupRemoveStage::Done;
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
                    ops.extend(remove_window_ops(state, mode, container, &starts));
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
            GroupRemoveStage::Done => None,
        }
    }

    /// Forgets the group once it is gone: removed, or never attached nor added to KVM.
    pub(super) fn finished(&self, state: &mut State, ok: bool) {
        let group = self.group;
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
}
