//! GROUP_ADOPT: a group the front-end already holds attached to its open container, taken over
//! by a session rebuilt after the back-end restarted. Nothing is changed in the kernel; only a
//! container new to the session has its TCE info read.

use rustix::io::Errno;

use crate::engine::state::State;
use crate::engine::EngineError;
use crate::kernel::{ContainerId, GroupId, KernelOp};
use crate::protocol::GroupDesc;

use super::err;
use super::group_add::add_group;

#[derive(Debug)]
pub struct GroupAdopt {
    group: GroupId,
    container: ContainerId,
    stage: GroupAdoptStage,
    new_container: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum GroupAdoptStage {
    /// Read the TCE info of a container new to the session (nothing for a known one).
    ReadInfo,
    Done,
}

impl GroupAdopt {
    pub(super) fn start(state: &mut State, desc: &GroupDesc) -> Result<Self, EngineError> {
        let container = ContainerId(desc.container_id);
        let new_container = !state.containers.contains_key(&container);
        if !new_container && !state.containers[&container].open {
            return Err(err(
                Errno::INVAL,
                format!("{container} is not open; only open containers are adopted"),
            ));
        }
        let group = add_group(state, desc, true)?;
        if new_container {
            // What the front-end's container holds since it was set up in the lost
            // session: the IOMMU type, every region pre-registered, no default window.
            let c = state.containers.entry(container).or_default();
            c.open = true;
            c.iommu_set = true;
            c.registered = state.regions.keys().copied().collect();
        }
        Ok(Self {
            group,
            container,
            stage: GroupAdoptStage::ReadInfo,
            new_container,
        })
    }

    pub(super) fn next(&mut self) -> Option<Vec<KernelOp>> {
        match self.stage {
            GroupAdoptStage::ReadInfo => {
                self.stage = GroupAdoptStage::Done;
                self.new_container.then(|| {
                    vec![KernelOp::TceGetInfo {
                        container: self.container,
                    }]
                })
            }
            GroupAdoptStage::Done => None,
        }
    }

    pub(super) fn finished(&self, state: &mut State, ok: bool) {
        let (group, container) = (self.group, self.container);
        if ok {
            if self.new_container {
                // TCE_GET_INFO recorded the default window a new container starts with; the
                // front-end removed it when it set the container up.
                if let Some(c) = state.containers.get_mut(&container) {
                    c.windows.retain(|_, w| !w.default);
                }
            }
            return;
        }
        // Nothing was done in the kernel: forget what the request recorded.
        state.groups.remove(&group);
        if self.new_container {
            state.containers.remove(&container);
        } else if let Some(c) = state.containers.get_mut(&container) {
            c.groups.remove(&group);
        }
    }
}
