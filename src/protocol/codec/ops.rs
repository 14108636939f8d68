//! Owner-operation records: the 40-byte layout shared by every operation kind.

use super::{DecodeErrorKind, Reader, Writer};
use crate::protocol::message::*;

/// Size of one owner-operation record and of one result record.
pub const OP_RECORD_SIZE: usize = 40;
const MAP_FLAG_READ: u16 = 1;
const MAP_FLAG_WRITE: u16 = 2;

pub(super) fn encode_op(w: &mut Writer, op: &OwnerOp) {
    // Record: kind u16, flags u16, container u32, object u32, aux u32, arg0..arg2 u64.
    let (mut flags, mut container, mut object, mut aux) = (0u16, 0u32, 0u32, 0u32);
    let mut args = [0u64; 3];
    match *op {
        OwnerOp::ContainerOpen { container: c }
        | OwnerOp::ContainerClose { container: c }
        | OwnerOp::TceGetInfo { container: c } => container = c,
        OwnerOp::CheckExtension {
            container: c,
            extension: x,
        }
        | OwnerOp::SetIommu {
            container: c,
            iommu_type: x,
        } => (container, aux) = (c, x),
        OwnerOp::GroupSetContainer {
            container: c,
            group,
        }
        | OwnerOp::GroupUnsetContainer {
            container: c,
            group,
        } => (container, object) = (c, group),
        OwnerOp::RegisterMemory {
            container: c,
            region,
            offset,
            size,
        }
        | OwnerOp::UnregisterMemory {
            container: c,
            region,
            offset,
            size,
        } => {
            (container, object) = (c, region);
            args = [offset, size, 0];
        }
        OwnerOp::TceCreate {
            container: c,
            page_shift,
            window_size,
            levels,
        } => {
            (container, aux) = (c, page_shift);
            args = [window_size, levels.into(), 0];
        }
        OwnerOp::TceRemove {
            container: c,
            start_addr,
        } => {
            container = c;
            args[0] = start_addr;
        }
        OwnerOp::MapDma {
            container: c,
            region,
            offset,
            iova,
            size,
            access,
        } => {
            (container, object) = (c, region);
            flags = if access.read { MAP_FLAG_READ } else { 0 }
                | if access.write { MAP_FLAG_WRITE } else { 0 };
            args = [offset, iova, size];
        }
        OwnerOp::UnmapDma {
            container: c,
            iova,
            size,
        } => {
            container = c;
            args = [iova, size, 0];
        }
        OwnerOp::EehPeOp {
            container: c,
            op,
            err_type,
            err_func,
            err_addr,
            err_mask,
        } => {
            (container, aux) = (c, op);
            args = [
                u64::from(err_type) | u64::from(err_func) << 32,
                err_addr,
                err_mask,
            ];
        }
        OwnerOp::KvmFileAdd { group } | OwnerOp::KvmFileDel { group } => object = group,
        OwnerOp::KvmSetSpaprTce { group, table } => (object, aux) = (group, table),
        OwnerOp::KvmHasDeviceAttr { attr_group, attr } => {
            aux = attr_group;
            args[0] = attr;
        }
    }
    w.u16(op.kind() as u16)
        .u16(flags)
        .u32(container)
        .u32(object)
        .u32(aux);
    args.iter().for_each(|a| {
        w.u64(*a);
    });
}

pub(super) fn decode_op(index: usize, record: &[u8]) -> Result<OwnerOp, DecodeErrorKind> {
    let mut r = Reader::new(record);
    let raw_kind = r.u16();
    let flags = r.u16();
    let (container, object, aux) = (r.u32(), r.u32(), r.u32());
    let args = [r.u64(), r.u64(), r.u64()];
    let kind = OpKind::from_u16(raw_kind).ok_or(DecodeErrorKind::UnknownOp {
        index,
        kind: raw_kind,
    })?;
    let op = match kind {
        OpKind::ContainerOpen => OwnerOp::ContainerOpen { container },
        OpKind::ContainerClose => OwnerOp::ContainerClose { container },
        OpKind::CheckExtension => OwnerOp::CheckExtension {
            container,
            extension: aux,
        },
        OpKind::SetIommu => OwnerOp::SetIommu {
            container,
            iommu_type: aux,
        },
        OpKind::GroupSetContainer => OwnerOp::GroupSetContainer {
            container,
            group: object,
        },
        OpKind::GroupUnsetContainer => OwnerOp::GroupUnsetContainer {
            container,
            group: object,
        },
        OpKind::TceGetInfo => OwnerOp::TceGetInfo { container },
        OpKind::RegisterMemory => OwnerOp::RegisterMemory {
            container,
            region: object,
            offset: args[0],
            size: args[1],
        },
        OpKind::UnregisterMemory => OwnerOp::UnregisterMemory {
            container,
            region: object,
            offset: args[0],
            size: args[1],
        },
        OpKind::TceCreate => {
            let levels = u32::try_from(args[1]).map_err(|_| DecodeErrorKind::Invalid {
                field: "levels",
                value: args[1],
            })?;
            OwnerOp::TceCreate {
                container,
                page_shift: aux,
                window_size: args[0],
                levels,
            }
        }
        OpKind::TceRemove => OwnerOp::TceRemove {
            container,
            start_addr: args[0],
        },
        OpKind::MapDma => {
            if flags == 0 || flags & !(MAP_FLAG_READ | MAP_FLAG_WRITE) != 0 {
                return Err(DecodeErrorKind::Invalid {
                    field: "flags",
                    value: flags.into(),
                });
            }
            let access = DmaAccess {
                read: flags & MAP_FLAG_READ != 0,
                write: flags & MAP_FLAG_WRITE != 0,
            };
            OwnerOp::MapDma {
                container,
                region: object,
                offset: args[0],
                iova: args[1],
                size: args[2],
                access,
            }
        }
        OpKind::UnmapDma => OwnerOp::UnmapDma {
            container,
            iova: args[0],
            size: args[1],
        },
        OpKind::EehPeOp if aux > EEH_OP_MAX => {
            return Err(DecodeErrorKind::Invalid {
                field: "op",
                value: aux.into(),
            })
        }
        OpKind::EehPeOp => OwnerOp::EehPeOp {
            container,
            op: aux,
            err_type: args[0] as u32,
            err_func: (args[0] >> 32) as u32,
            err_addr: args[1],
            err_mask: args[2],
        },
        OpKind::KvmFileAdd => OwnerOp::KvmFileAdd { group: object },
        OpKind::KvmFileDel => OwnerOp::KvmFileDel { group: object },
        OpKind::KvmSetSpaprTce => OwnerOp::KvmSetSpaprTce {
            group: object,
            table: aux,
        },
        OpKind::KvmHasDeviceAttr => OwnerOp::KvmHasDeviceAttr {
            attr_group: aux,
            attr: args[0],
        },
    };
    let mut canonical = Writer::default();
    encode_op(&mut canonical, &op);
    if canonical.0 != record {
        return Err(DecodeErrorKind::NonCanonical {
            what: "an operation record",
        });
    }
    Ok(op)
}
