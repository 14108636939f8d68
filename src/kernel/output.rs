//! [`Output`], the typed result of a successful call, and its lossless mapping to and from the
//! output words and status of a wire [`OpResult`].

use super::Errno;
use crate::protocol::{OpKind, OpResult, TceInfo};

/// Whether a VFIO group can be used (`VFIO_GROUP_GET_STATUS`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct GroupStatus {
    /// `VFIO_GROUP_FLAGS_VIABLE`: every device of the group is bound to a VFIO driver or none.
    pub viable: bool,
    /// `VFIO_GROUP_FLAGS_CONTAINER_SET`: the group is attached to a container.
    pub container_set: bool,
}

/// The result of a successful call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// The call has no output.
    Done,
    /// `VFIO_GET_API_VERSION` after opening a container.
    ApiVersion(u32),
    /// The ioctl's non-negative return value (`VFIO_CHECK_EXTENSION`, `VFIO_EEH_PE_OP`).
    Value(u32),
    /// `VFIO_GROUP_GET_STATUS`.
    GroupStatus(GroupStatus),
    /// `VFIO_IOMMU_SPAPR_TCE_GET_INFO`.
    TceInfo(TceInfo),
    /// The bus address the platform chose for a new window.
    StartAddr(u64),
    /// Bytes unmapped by `VFIO_IOMMU_UNMAP_DMA`.
    Unmapped(u64),
    /// Guest TCEs in host byte order.
    Tces(Vec<u64>),
}

/// Why a wire operation result does not decode to an [`Output`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OutputError {
    /// A positive status: the wire carries 0 or a negative errno.
    #[error("{}: status {status} is positive", kind.name())]
    PositiveStatus { kind: OpKind, status: i32 },
    /// An output word that must be zero for this kind (or for a failed call) is not.
    #[error("{}: output word {word} must be zero, is {value:#x}", kind.name())]
    NonZeroWord {
        kind: OpKind,
        word: usize,
        value: u64,
    },
    /// A u32 output does not fit in 32 bits.
    #[error("{}: output word {word} does not fit 32 bits: {value:#x}", kind.name())]
    TooLarge {
        kind: OpKind,
        word: usize,
        value: u64,
    },
    /// The output does not belong to the operation kind.
    #[error("{}: output {output} does not belong to this operation", kind.name())]
    Mismatch { kind: OpKind, output: &'static str },
}

impl Output {
    fn name(&self) -> &'static str {
        match self {
            Self::Done => "none",
            Self::ApiVersion(_) => "api version",
            Self::Value(_) => "value",
            Self::GroupStatus(_) => "group status",
            Self::TceInfo(_) => "TCE info",
            Self::StartAddr(_) => "start address",
            Self::Unmapped(_) => "unmapped size",
            Self::Tces(_) => "TCEs",
        }
    }

    /// The four output words of an [`OpResult`] of `kind` carrying this output. Fails when the
    /// output is not the one `kind` produces: [`Output::from_out`] is the one mapping between
    /// kinds and outputs, so the words must decode back to this output.
    pub fn to_out(&self, kind: OpKind) -> Result<[u64; 4], OutputError> {
        let words = match self {
            Self::Done => Some([0; 4]),
            Self::ApiVersion(v) | Self::Value(v) => Some([u64::from(*v), 0, 0, 0]),
            Self::TceInfo(info) => Some(info.to_out()),
            Self::StartAddr(a) | Self::Unmapped(a) => Some([*a, 0, 0, 0]),
            // Outputs of calls that never travel as owner operations.
            Self::GroupStatus(_) | Self::Tces(_) => None,
        };
        match words {
            Some(words) if Self::from_out(kind, words).as_ref() == Ok(self) => Ok(words),
            _ => Err(OutputError::Mismatch {
                kind,
                output: self.name(),
            }),
        }
    }

    /// The output an [`OpResult`] of `kind` carries in its four words. Words a kind does not
    /// use must be zero, and 32-bit outputs must fit, so the mapping is one-to-one.
    pub fn from_out(kind: OpKind, out: [u64; 4]) -> Result<Output, OutputError> {
        let zero_from = |first: usize| {
            out.iter()
                .enumerate()
                .skip(first)
                .find(|(_, v)| **v != 0)
                .map_or(Ok(()), |(word, v)| {
                    Err(OutputError::NonZeroWord {
                        kind,
                        word,
                        value: *v,
                    })
                })
        };
        let small = |word: usize| {
            u32::try_from(out[word]).map_err(|_| OutputError::TooLarge {
                kind,
                word,
                value: out[word],
            })
        };
        match kind {
            OpKind::ContainerOpen => {
                zero_from(1)?;
                Ok(Self::ApiVersion(small(0)?))
            }
            OpKind::CheckExtension | OpKind::EehPeOp => {
                zero_from(1)?;
                Ok(Self::Value(small(0)?))
            }
            OpKind::TceGetInfo => {
                // Word 0 holds the u32 flags; words 1 and 3 pack two u32 each, word 2 a u64.
                small(0)?;
                Ok(Self::TceInfo(TceInfo::from_out(out)))
            }
            OpKind::TceCreate => {
                zero_from(1)?;
                Ok(Self::StartAddr(out[0]))
            }
            OpKind::UnmapDma => {
                zero_from(1)?;
                Ok(Self::Unmapped(out[0]))
            }
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
            | OpKind::KvmHasDeviceAttr => {
                zero_from(0)?;
                Ok(Self::Done)
            }
        }
    }
}

/// The wire report of one executed call: status 0 and the output words, or the negated errno
/// and zero words.
pub fn to_op_result(kind: OpKind, result: &Result<Output, Errno>) -> Result<OpResult, OutputError> {
    match result {
        Ok(output) => Ok(OpResult {
            kind,
            status: 0,
            out: output.to_out(kind)?,
        }),
        Err(errno) => Ok(OpResult {
            kind,
            status: -errno.raw_os_error(),
            out: [0; 4],
        }),
    }
}

/// The typed result a wire report carries; the inverse of [`to_op_result`].
pub fn from_op_result(result: &OpResult) -> Result<Result<Output, Errno>, OutputError> {
    let kind = result.kind;
    match result.status {
        0 => Output::from_out(kind, result.out).map(Ok),
        status if status > 0 => Err(OutputError::PositiveStatus { kind, status }),
        status => match result.out.iter().position(|w| *w != 0) {
            Some(word) => Err(OutputError::NonZeroWord {
                kind,
                word,
                value: result.out[word],
            }),
            None => Ok(Err(Errno::from_raw_os_error(-status))),
        },
    }
}
