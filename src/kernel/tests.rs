use super::*;
use crate::protocol::{DmaAccess, OpKind, OpResult, OwnerOp, TceInfo};
use proptest::prelude::*;

const C: ContainerId = ContainerId(1);
const G: GroupId = GroupId(2);
const R: RegionId = RegionId(3);
const T: TableId = TableId(4);
const RW: DmaAccess = DmaAccess {
    read: true,
    write: true,
};

/// Position of the variant in the enum; exhaustive, so a new variant must be added here
/// and then to [`one_of_each`].
fn variant(op: &KernelOp) -> usize {
    match op {
        KernelOp::ContainerOpen { .. } => 0,
        KernelOp::ContainerClose { .. } => 1,
        KernelOp::CheckExtension { .. } => 2,
        KernelOp::SetIommu { .. } => 3,
        KernelOp::GroupGetStatus { .. } => 4,
        KernelOp::GroupSetContainer { .. } => 5,
        KernelOp::GroupUnsetContainer { .. } => 6,
        KernelOp::TceGetInfo { .. } => 7,
        KernelOp::RegisterMemory { .. } => 8,
        KernelOp::UnregisterMemory { .. } => 9,
        KernelOp::TceCreate { .. } => 10,
        KernelOp::TceRemove { .. } => 11,
        KernelOp::MapDma { .. } => 12,
        KernelOp::UnmapDma { .. } => 13,
        KernelOp::EehPeOp { .. } => 14,
        KernelOp::KvmFileAdd { .. } => 15,
        KernelOp::KvmFileDel { .. } => 16,
        KernelOp::KvmSetSpaprTce { .. } => 17,
        KernelOp::KvmHasDeviceAttr { .. } => 18,
        KernelOp::ReadTces { .. } => 19,
    }
}
const VARIANTS: usize = 20;

fn one_of_each() -> Vec<KernelOp> {
    vec![
        KernelOp::ContainerOpen { container: C },
        KernelOp::ContainerClose { container: C },
        KernelOp::CheckExtension {
            container: C,
            extension: 7,
        },
        KernelOp::SetIommu {
            container: C,
            iommu_type: 7,
        },
        KernelOp::GroupGetStatus { group: G },
        KernelOp::GroupSetContainer {
            container: C,
            group: G,
        },
        KernelOp::GroupUnsetContainer {
            container: C,
            group: G,
        },
        KernelOp::TceGetInfo { container: C },
        KernelOp::RegisterMemory {
            container: C,
            region: R,
            offset: 0,
            size: 1 << 16,
        },
        KernelOp::UnregisterMemory {
            container: C,
            region: R,
            offset: 0,
            size: 1 << 16,
        },
        KernelOp::TceCreate {
            container: C,
            page_shift: 16,
            window_size: 1 << 30,
            levels: 1,
        },
        KernelOp::TceRemove {
            container: C,
            start_addr: 1 << 59,
        },
        KernelOp::MapDma {
            container: C,
            region: R,
            offset: 0,
            iova: 0,
            size: 4096,
            access: RW,
        },
        KernelOp::UnmapDma {
            container: C,
            iova: 0,
            size: 4096,
        },
        KernelOp::EehPeOp {
            container: C,
            op: 4,
            err_type: 0,
            err_func: 0,
            err_addr: 0,
            err_mask: 0,
        },
        KernelOp::KvmFileAdd { group: G },
        KernelOp::KvmFileDel { group: G },
        KernelOp::KvmSetSpaprTce { group: G, table: T },
        KernelOp::KvmHasDeviceAttr {
            attr_group: 1,
            attr: 3,
        },
        KernelOp::ReadTces {
            table: T,
            first_index: 0,
            count: 8,
        },
    ]
}

#[test]
fn one_of_each_covers_every_variant_once() {
    let mut seen: Vec<usize> = one_of_each().iter().map(variant).collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..VARIANTS).collect::<Vec<_>>());
}

#[test]
fn route_kvm_device_ops_front_end_in_both_modes() {
    for op in one_of_each()
        .iter()
        .filter(|op| op.executor() == Executor::VmCreator)
    {
        assert_eq!(
            route(op, OwnershipMode::Accelerated),
            Side::FrontEnd,
            "{op:?}"
        );
        assert_eq!(route(op, OwnershipMode::Isolated), Side::FrontEnd, "{op:?}");
    }
}

#[test]
fn route_each_op_expected_side_per_mode() {
    use OwnershipMode::{Accelerated, Isolated};
    use Side::{FrontEnd, Sidecar};
    // (variant, accelerated, isolated), written out from K1/K2 rather than derived.
    let expected = [
        (0, FrontEnd, Sidecar),   // ContainerOpen
        (1, FrontEnd, Sidecar),   // ContainerClose
        (2, FrontEnd, Sidecar),   // CheckExtension: needs the owner's container fd
        (3, FrontEnd, Sidecar),   // SetIommu
        (4, Sidecar, Sidecar),    // GroupGetStatus: the sidecar holds the group fd
        (5, FrontEnd, Sidecar),   // GroupSetContainer
        (6, FrontEnd, Sidecar),   // GroupUnsetContainer
        (7, FrontEnd, Sidecar),   // TceGetInfo: EPERM from another mm (K2)
        (8, FrontEnd, Sidecar),   // RegisterMemory
        (9, FrontEnd, Sidecar),   // UnregisterMemory
        (10, FrontEnd, Sidecar),  // TceCreate
        (11, FrontEnd, Sidecar),  // TceRemove
        (12, FrontEnd, Sidecar),  // MapDma
        (13, FrontEnd, Sidecar),  // UnmapDma
        (14, FrontEnd, Sidecar),  // EehPeOp
        (15, FrontEnd, FrontEnd), // KvmFileAdd: EIO from another process (K1)
        (16, FrontEnd, FrontEnd), // KvmFileDel
        (17, FrontEnd, FrontEnd), // KvmSetSpaprTce
        (18, FrontEnd, FrontEnd), // KvmHasDeviceAttr
        (19, Sidecar, Sidecar),   // ReadTces: mmap of the table fd (K6)
    ];
    for op in one_of_each() {
        let (_, accelerated, isolated) = expected[variant(&op)];
        assert_eq!(route(&op, Accelerated), accelerated, "{op:?}");
        assert_eq!(route(&op, Isolated), isolated, "{op:?}");
    }
}

#[test]
fn owner_op_form_exists_exactly_for_ops_routable_to_front_end() {
    for op in one_of_each() {
        let routable = route(&op, OwnershipMode::Accelerated) == Side::FrontEnd;
        match OwnerOp::try_from(op) {
            Ok(wire) => {
                assert!(routable, "{op:?}");
                assert_eq!(KernelOp::from(wire), op);
            }
            Err(NotAnOwnerOp(back)) => {
                assert!(!routable, "{op:?}");
                assert_eq!(back, op);
            }
        }
    }
}

fn owner_op() -> impl Strategy<Value = OwnerOp> {
    let access = (any::<bool>(), any::<bool>()).prop_map(|(read, write)| DmaAccess { read, write });
    prop_oneof![
        any::<u32>().prop_map(|container| OwnerOp::ContainerOpen { container }),
        any::<u32>().prop_map(|container| OwnerOp::ContainerClose { container }),
        any::<(u32, u32)>().prop_map(|(container, extension)| OwnerOp::CheckExtension {
            container,
            extension
        }),
        any::<(u32, u32)>().prop_map(|(container, iommu_type)| OwnerOp::SetIommu {
            container,
            iommu_type
        }),
        any::<(u32, u32)>()
            .prop_map(|(container, group)| OwnerOp::GroupSetContainer { container, group }),
        any::<(u32, u32)>()
            .prop_map(|(container, group)| OwnerOp::GroupUnsetContainer { container, group }),
        any::<u32>().prop_map(|container| OwnerOp::TceGetInfo { container }),
        any::<(u32, u32, u64, u64)>().prop_map(|(container, region, offset, size)| {
            OwnerOp::RegisterMemory {
                container,
                region,
                offset,
                size,
            }
        }),
        any::<(u32, u32, u64, u64)>().prop_map(|(container, region, offset, size)| {
            OwnerOp::UnregisterMemory {
                container,
                region,
                offset,
                size,
            }
        }),
        any::<(u32, u32, u64, u32)>().prop_map(|(container, page_shift, window_size, levels)| {
            OwnerOp::TceCreate {
                container,
                page_shift,
                window_size,
                levels,
            }
        }),
        any::<(u32, u64)>().prop_map(|(container, start_addr)| OwnerOp::TceRemove {
            container,
            start_addr
        }),
        (any::<(u32, u32, u64, u64, u64)>(), access).prop_map(
            |((container, region, offset, iova, size), access)| OwnerOp::MapDma {
                container,
                region,
                offset,
                iova,
                size,
                access
            }
        ),
        any::<(u32, u64, u64)>().prop_map(|(container, iova, size)| OwnerOp::UnmapDma {
            container,
            iova,
            size
        }),
        any::<(u32, u32, u32, u32, u64, u64)>().prop_map(
            |(container, op, err_type, err_func, err_addr, err_mask)| OwnerOp::EehPeOp {
                container,
                op,
                err_type,
                err_func,
                err_addr,
                err_mask
            }
        ),
        any::<u32>().prop_map(|group| OwnerOp::KvmFileAdd { group }),
        any::<u32>().prop_map(|group| OwnerOp::KvmFileDel { group }),
        any::<(u32, u32)>().prop_map(|(group, table)| OwnerOp::KvmSetSpaprTce { group, table }),
        any::<(u32, u64)>()
            .prop_map(|(attr_group, attr)| OwnerOp::KvmHasDeviceAttr { attr_group, attr }),
    ]
}

/// An output of the kind `kind` produces.
fn output_of(kind: OpKind) -> BoxedStrategy<Output> {
    match kind {
        OpKind::ContainerOpen => any::<u32>().prop_map(Output::ApiVersion).boxed(),
        OpKind::CheckExtension | OpKind::EehPeOp => any::<u32>().prop_map(Output::Value).boxed(),
        OpKind::TceGetInfo => any::<(u32, u32, u32, u64, u32, u32)>()
            .prop_map(|(flags, start, size, pgsizes, windows, levels)| {
                Output::TceInfo(TceInfo {
                    flags,
                    dma32_window_start: start,
                    dma32_window_size: size,
                    pgsizes,
                    max_dynamic_windows: windows,
                    levels,
                })
            })
            .boxed(),
        OpKind::TceCreate => any::<u64>().prop_map(Output::StartAddr).boxed(),
        OpKind::UnmapDma => any::<u64>().prop_map(Output::Unmapped).boxed(),
        OpKind::ContainerClose
        | OpKind::SetIommu
        | OpKind::GroupSetContainer
        | OpKind::GroupUnsetContainer
        | OpKind::RegisterMemory
        | OpKind::UnregisterMemory
        | OpKind::TceRemove
        | OpKind::MapDma
        | OpKind::KvmFileAdd
        | OpKind::KvmFileDel
        | OpKind::KvmSetSpaprTce
        | OpKind::KvmHasDeviceAttr => Just(Output::Done).boxed(),
    }
}

fn kind_and_output() -> impl Strategy<Value = (OpKind, Output)> {
    proptest::sample::select(OpKind::ALL.to_vec())
        .prop_flat_map(|kind| output_of(kind).prop_map(move |output| (kind, output)))
}

proptest! {
    #[test]
    fn owner_op_through_kernel_op_unchanged(wire in owner_op()) {
        let op = KernelOp::from(wire);
        prop_assert_eq!(OwnerOp::try_from(op), Ok(wire));
        prop_assert_ne!(op.executor(), Executor::Anyone);
    }

    #[test]
    fn output_through_op_result_unchanged((kind, output) in kind_and_output()) {
        let result = to_op_result(kind, &Ok(output.clone())).unwrap();
        prop_assert_eq!(result.status, 0);
        prop_assert_eq!(from_op_result(&result), Ok(Ok(output)));
    }

    #[test]
    fn op_result_words_decode_then_encode_unchanged(
        kind in proptest::sample::select(OpKind::ALL.to_vec()),
        out in any::<[u64; 4]>(),
    ) {
        // Either the words are rejected, or they are the canonical form of one output.
        if let Ok(output) = Output::from_out(kind, out) {
            prop_assert_eq!(output.to_out(kind), Ok(out));
        }
    }

    #[test]
    fn errno_through_op_result_unchanged(
        kind in proptest::sample::select(OpKind::ALL.to_vec()),
        raw in 1i32..4096,
    ) {
        let errno = Errno::from_raw_os_error(raw);
        let result = to_op_result(kind, &Err(errno)).unwrap();
        prop_assert_eq!(result.status, -raw);
        prop_assert_eq!(result.out, [0; 4]);
        prop_assert_eq!(from_op_result(&result), Ok(Err(errno)));
    }
}

#[test]
fn from_out_unused_word_set_rejected() {
    let err = Output::from_out(OpKind::MapDma, [0, 0, 5, 0]);
    assert_eq!(
        err,
        Err(OutputError::NonZeroWord {
            kind: OpKind::MapDma,
            word: 2,
            value: 5
        })
    );
    let err = Output::from_out(OpKind::TceCreate, [1 << 59, 1, 0, 0]);
    assert_eq!(
        err,
        Err(OutputError::NonZeroWord {
            kind: OpKind::TceCreate,
            word: 1,
            value: 1
        })
    );
}

#[test]
fn from_out_api_version_above_u32_rejected() {
    let err = Output::from_out(OpKind::ContainerOpen, [1 << 32, 0, 0, 0]);
    assert_eq!(
        err,
        Err(OutputError::TooLarge {
            kind: OpKind::ContainerOpen,
            word: 0,
            value: 1 << 32
        })
    );
}

#[test]
fn to_out_output_of_other_kind_rejected() {
    assert_eq!(
        Output::StartAddr(0).to_out(OpKind::UnmapDma),
        Err(OutputError::Mismatch {
            kind: OpKind::UnmapDma,
            output: "start address"
        })
    );
    assert_eq!(
        Output::Tces(vec![1]).to_out(OpKind::KvmSetSpaprTce),
        Err(OutputError::Mismatch {
            kind: OpKind::KvmSetSpaprTce,
            output: "TCEs"
        })
    );
}

#[test]
fn from_op_result_positive_status_rejected() {
    let result = OpResult {
        kind: OpKind::MapDma,
        status: 22,
        out: [0; 4],
    };
    assert_eq!(
        from_op_result(&result),
        Err(OutputError::PositiveStatus {
            kind: OpKind::MapDma,
            status: 22
        })
    );
}

#[test]
fn from_op_result_failure_with_output_words_rejected() {
    let result = OpResult {
        kind: OpKind::TceCreate,
        status: -28,
        out: [1 << 59, 0, 0, 0],
    };
    assert_eq!(
        from_op_result(&result),
        Err(OutputError::NonZeroWord {
            kind: OpKind::TceCreate,
            word: 0,
            value: 1 << 59
        })
    );
}
