//! GROUP_ADD: attach a VFIO group to its container. The first group of a container opens and
//! sets it up as QEMU does (qemu-notes §2–§3); a later group joins the windows it already has.

use rustix::io::Errno;

use crate::engine::state::{Group, State};
use crate::engine::EngineError;
use crate::kernel::{ContainerId, GroupId, KernelOp, OwnershipMode, TableId};
use crate::protocol::GroupDesc;

use super::{associate_ops, err, register_ops};

/// `VFIO_SPAPR_TCE_v2_IOMMU`.
const SPAPR_TCE_V2_IOMMU: u32 = 7;

#[derive(Debug)]
pub struct GroupAdd {
    group: GroupId,
    container: ContainerId,
    stage: GroupAddStage,
}

/// The stages of GROUP_ADD, in order; after attaching, only one of the two next stages runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum GroupAddStage {
    /// Attach the group to its container, opening the container, setting its IOMMU type and
    /// reading its TCE info first if it is not open yet.
    Attach,
    /// The container is new: pre-register all guest RAM and drop the default window.
    SetUpContainer,
    /// The container was open already: tell KVM about the windows it has.
    AssociateWindows,
    Done,
}

impl GroupAdd {
    pub(super) fn start(state: &mut State, desc: &GroupDesc) -> Result<Self, EngineError> {
        let group = add_group(state, desc, false)?;
        let container = ContainerId(desc.container_id);
        Ok(Self {
            group,
            container,
            stage: GroupAddStage::Attach,
        })
    }

    pub(super) fn next(&mut self, state: &State, mode: OwnershipMode) -> Option<Vec<KernelOp>> {
        let (group, container) = (self.group, self.container);
        match self.stage {
            // No FILE_ADD yet: a group file is added to the kvm-vfio device only to be
            // associated (see `associate_ops`).
            GroupAddStage::Attach => {
                let open = state.containers.get(&container).is_some_and(|c| c.open);
                let attach = KernelOp::GroupSetContainer { container, group };
                Some(if open {
                    self.stage = GroupAddStage::AssociateWindows;
                    vec![attach]
                } else {
                    self.stage = GroupAddStage::SetUpContainer;
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
            GroupAddStage::SetUpContainer => {
                self.stage = GroupAddStage::Done;
                // Pre-register all guest RAM, then drop the default window: windows are
                // created from the guest's tables (WINDOW_CREATE), as QEMU does.
                let mut ops = register_ops(state, container, true);
                let c = &state.containers[&container];
                ops.extend(
                    c.windows
                        .iter()
                        .filter(|(_, w)| w.default)
                        .map(|(start, _)| KernelOp::TceRemove {
                            container,
                            start_addr: *start,
                        }),
                );
                Some(ops)
            }
            GroupAddStage::AssociateWindows => {
                self.stage = GroupAddStage::Done;
                Some(match mode {
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
                })
            }
            GroupAddStage::Done => None,
        }
    }

    /// Fully rolled back: forget the group. Otherwise it stays, as the kernel holds it.
    pub(super) fn finished(&self, state: &mut State, ok: bool) {
        let group = self.group;
        if !ok
            && state
                .groups
                .get(&group)
                .is_some_and(|g| !g.file_added && !g.attached)
        {
            state.groups.remove(&group);
            if let Some(c) = state.containers.get_mut(&self.container) {
                c.groups.remove(&group);
            }
        }
    }
}

/// Records a new group in its container (created if new), once it passes the checks every new
/// group passes: an unused id and an IOMMU group not in the session yet.
pub(super) fn add_group(
    state: &mut State,
    desc: &GroupDesc,
    attached: bool,
) -> Result<GroupId, EngineError> {
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
