//! Teardown after a disconnect: everything the session holds in the kernel is released, in the
//! order QEMU releases it at shutdown (qemu-notes §11). It does its best: a failed call does
//! not stop the calls after it.

use crate::engine::state::State;
use crate::kernel::{GroupId, KernelOp, OwnershipMode};

use super::{register_ops, remove_window_ops};

#[derive(Debug)]
pub struct Teardown {
    stage: TeardownStage,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TeardownStage {
    /// Release every container, with its windows, memory and groups.
    ReleaseAll,
    Done,
}

impl Teardown {
    pub(super) fn new() -> Self {
        Self {
            stage: TeardownStage::ReleaseAll,
        }
    }

    pub(super) fn next(&mut self, state: &State, mode: OwnershipMode) -> Option<Vec<KernelOp>> {
        match self.stage {
            TeardownStage::ReleaseAll => {
                self.stage = TeardownStage::Done;
                Some(release_all_ops(state, mode))
            }
            TeardownStage::Done => None,
        }
    }
}

fn release_all_ops(state: &State, mode: OwnershipMode) -> Vec<KernelOp> {
    let mut ops = Vec::new();
    for (id, c) in &state.containers {
        let groups: Vec<GroupId> = state
            .groups
            .iter()
            .filter(|(_, g)| g.container == *id)
            .map(|(g, _)| *g)
            .collect();
        let starts: Vec<u64> = c.windows.keys().copied().collect();
        let removals = remove_window_ops(state, mode, *id, &starts);
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
    ops
}
