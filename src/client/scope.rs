//! The operation kinds each request's transaction may ask for (PROTOCOL.md §6.3): a front-end
//! refuses any other kind with `-EPERM`, whatever objects it names.

use crate::kernel::KernelOp;
use crate::protocol::{EehRequest, OpKind, RequestCode};

use OpKind::*;

const GROUP_ADD: &[OpKind] = &[
    ContainerOpen,
    GroupSetContainer,
    SetIommu,
    TceGetInfo,
    RegisterMemory,
    TceRemove,
    KvmFileAdd,
    KvmSetSpaprTce,
];
const GROUP_ADD_ROLLBACK: &[OpKind] = &[
    ContainerClose,
    GroupUnsetContainer,
    UnregisterMemory,
    KvmFileDel,
    KvmFileAdd,
    KvmSetSpaprTce,
];
const GROUP_REMOVE: &[OpKind] = &[
    KvmFileDel,
    UnmapDma,
    TceRemove,
    UnregisterMemory,
    GroupUnsetContainer,
    ContainerClose,
];
const WINDOW_CREATE: &[OpKind] = &[TceCreate, KvmFileAdd, KvmSetSpaprTce];
const WINDOW_CREATE_ROLLBACK: &[OpKind] = &[TceRemove, KvmFileDel, KvmFileAdd, KvmSetSpaprTce];
const WINDOW_REMOVE: &[OpKind] = &[KvmFileDel, KvmFileAdd, KvmSetSpaprTce, UnmapDma, TceRemove];
const KVM_ASSOCIATIONS: &[OpKind] = &[KvmFileDel, KvmFileAdd, KvmSetSpaprTce];
const WINDOW_RESET: &[OpKind] = &[
    KvmFileDel,
    KvmFileAdd,
    KvmSetSpaprTce,
    UnmapDma,
    TceRemove,
    TceCreate,
];

/// The kinds `request` allows in its forward operations, or with `rollback` in its rollback.
pub fn allowed_kinds(request: RequestCode, rollback: bool) -> &'static [OpKind] {
    match (request, rollback) {
        (RequestCode::MemAdd, false) | (RequestCode::MemRemove, true) => &[RegisterMemory],
        (RequestCode::MemAdd, true) | (RequestCode::MemRemove, false) => &[UnregisterMemory],
        (RequestCode::GroupAdd, false) => GROUP_ADD,
        (RequestCode::GroupAdd, true) => GROUP_ADD_ROLLBACK,
        (RequestCode::GroupRemove, false) => GROUP_REMOVE,
        (RequestCode::GroupRemove, true) => &[RegisterMemory],
        (RequestCode::GroupAdopt, false) => &[TceGetInfo],
        (RequestCode::WindowCreate, false) => WINDOW_CREATE,
        (RequestCode::WindowCreate, true) | (RequestCode::WindowReset, true) => {
            WINDOW_CREATE_ROLLBACK
        }
        (RequestCode::WindowRemove, false) => WINDOW_REMOVE,
        (RequestCode::WindowRemove, true) => KVM_ASSOCIATIONS,
        (RequestCode::WindowReset, false) => WINDOW_RESET,
        (RequestCode::TceUpdate, false) => &[MapDma, UnmapDma],
        (RequestCode::TceUpdate, true) => &[UnmapDma],
        (RequestCode::EehOp, false) => &[EehPeOp],
        _ => &[],
    }
}

/// Whether `op` is the PE operation an `EEH_OP` asked for (§6.3: its container, `op` and error
/// fields); operations of other kinds are not its concern.
pub fn requested_eeh(op: &KernelOp, eeh: Option<EehRequest>) -> bool {
    match (op, eeh) {
        (KernelOp::EehPeOp { .. }, Some(e)) => *op == KernelOp::eeh_pe_op(&e),
        (KernelOp::EehPeOp { .. }, None) => false,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_without_operations_allow_none() {
        for code in [
            RequestCode::GetFeatures,
            RequestCode::SetFeatures,
            RequestCode::GetStatus,
            RequestCode::TableAdd,
            RequestCode::TableRemove,
            RequestCode::WindowQuery,
            RequestCode::WindowAdopt,
            RequestCode::OpsResult,
        ] {
            assert!(allowed_kinds(code, false).is_empty(), "{code:?}");
            assert!(allowed_kinds(code, true).is_empty(), "{code:?}");
        }
        assert!(!allowed_kinds(RequestCode::GetFeatures, false).contains(&EehPeOp));
        assert!(!allowed_kinds(RequestCode::TceUpdate, false).contains(&TceRemove));
    }
}
