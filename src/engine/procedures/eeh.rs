//! EEH_OP: an EEH operation on the PE behind a container (qemu-notes §9), passed to the
//! container as VFIO_EEH_PE_OP.

use rustix::io::Errno;

use crate::engine::state::State;
use crate::engine::EngineError;
use crate::kernel::{ContainerId, KernelOp, Output};
use crate::protocol::{EehBody, EehRequest, FEATURE_EEH};

use super::{attached_container, err};

#[derive(Debug)]
pub struct Eeh {
    request: EehRequest,
    stage: EehStage,
    result: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EehStage {
    /// Make the operation on the container.
    PeOp,
    Done,
}

impl Eeh {
    pub(super) fn start(
        state: &State,
        features: u64,
        request: EehRequest,
    ) -> Result<Self, EngineError> {
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
        Ok(Self {
            request,
            stage: EehStage::PeOp,
            result: None,
        })
    }

    pub(super) fn next(&mut self) -> Option<Vec<KernelOp>> {
        match self.stage {
            EehStage::PeOp => {
                self.stage = EehStage::Done;
                Some(vec![KernelOp::eeh_pe_op(&self.request)])
            }
            EehStage::Done => None,
        }
    }

    /// Keeps what the operation returned, for the reply.
    pub(super) fn succeeded(&mut self, op: &KernelOp, output: &Output) {
        if let (KernelOp::EehPeOp { .. }, Output::Value(v)) = (op, output) {
            self.result = Some(*v);
        }
    }

    pub(super) fn body(&self) -> Vec<u8> {
        EehBody {
            result: self.result.unwrap_or_default() as i32,
        }
        .encode()
    }
}
