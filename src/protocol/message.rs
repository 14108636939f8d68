//! Message types: requests, replies, owner operations and their results, as plain data.
//!
//! Every type here mirrors one payload table of the specification. Byte layout lives in
//! `codec/`; these types only say what a message means.

use std::fmt;
use std::os::fd::OwnedFd;

/// Request codes (header field `request`). A reply carries the code of the request it answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum RequestCode {
    GetFeatures = 1,
    SetFeatures = 2,
    GetStatus = 3,
    MemAdd = 4,
    MemRemove = 5,
    GroupAdd = 6,
    GroupRemove = 7,
    TableAdd = 8,
    TableRemove = 9,
    WindowQuery = 10,
    WindowCreate = 11,
    WindowRemove = 12,
    WindowReset = 13,
    TceUpdate = 14,
    EehOp = 15,
    OpsResult = 16,
    GroupAdopt = 17,
    WindowAdopt = 18,
}

impl RequestCode {
    /// Every request code, in numeric order.
    pub const ALL: [RequestCode; 18] = [
        Self::GetFeatures,
        Self::SetFeatures,
        Self::GetStatus,
        Self::MemAdd,
        Self::MemRemove,
        Self::GroupAdd,
        Self::GroupRemove,
        Self::TableAdd,
        Self::TableRemove,
        Self::WindowQuery,
        Self::WindowCreate,
        Self::WindowRemove,
        Self::WindowReset,
        Self::TceUpdate,
        Self::EehOp,
        Self::OpsResult,
        Self::GroupAdopt,
        Self::WindowAdopt,
    ];

    pub fn from_u32(code: u32) -> Option<Self> {
        Self::ALL.iter().copied().find(|c| *c as u32 == code)
    }

    /// The exact number of fds a request of this type carries under `rule`.
    pub fn fd_count(self, rule: FdRule) -> usize {
        match (self, rule) {
            (Self::TableAdd, _) => 1,
            (Self::MemAdd | Self::GroupAdd | Self::GroupAdopt, FdRule::Every) => 1,
            _ => 0,
        }
    }

    /// The spec's name of the request, used in error texts and logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::GetFeatures => "GET_FEATURES",
            Self::SetFeatures => "SET_FEATURES",
            Self::GetStatus => "GET_STATUS",
            Self::MemAdd => "MEM_ADD",
            Self::MemRemove => "MEM_REMOVE",
            Self::GroupAdd => "GROUP_ADD",
            Self::GroupRemove => "GROUP_REMOVE",
            Self::TableAdd => "TABLE_ADD",
            Self::TableRemove => "TABLE_REMOVE",
            Self::WindowQuery => "WINDOW_QUERY",
            Self::WindowCreate => "WINDOW_CREATE",
            Self::WindowRemove => "WINDOW_REMOVE",
            Self::WindowReset => "WINDOW_RESET",
            Self::TceUpdate => "TCE_UPDATE",
            Self::EehOp => "EEH_OP",
            Self::OpsResult => "OPS_RESULT",
            Self::GroupAdopt => "GROUP_ADOPT",
            Self::WindowAdopt => "WINDOW_ADOPT",
        }
    }
}

impl fmt::Display for RequestCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which requests carry an fd in a session (PROTOCOL.md §2.1, §4.1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FdRule {
    /// `MEM_ADD`, `GROUP_ADD`, `GROUP_ADOPT` and `TABLE_ADD` each carry one: before
    /// negotiation, in isolated mode, and in accelerated mode without `FDS_BY_MODE`.
    #[default]
    Every,
    /// Accelerated mode with `FDS_BY_MODE`: the back-end never uses guest RAM or group fds
    /// there, so only `TABLE_ADD` carries one, and `MEM_ADD` names its page size instead.
    TablesOnly,
}

impl FdRule {
    /// The rule a session's negotiated `features` (0 before `SET_FEATURES`) set.
    pub fn negotiated(features: u64) -> Self {
        let lean = crate::protocol::FEATURE_FDS_BY_MODE | crate::protocol::FEATURE_MODE_ACCELERATED;
        if features & lean == lean {
            Self::TablesOnly
        } else {
            Self::Every
        }
    }
}

/// One guest RAM region, in vhost-user's memory-region layout (MEM_ADD, MEM_REMOVE).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemRegion {
    /// Front-end chosen id, unique among the session's regions.
    pub region_id: u32,
    /// Guest physical address of the first byte.
    pub guest_addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// The front-end's virtual address of the first byte (used for accelerated-mode
    /// registration, which happens in the front-end's mm).
    pub user_addr: u64,
    /// Offset of the first byte in the memfd.
    pub mmap_offset: u64,
    /// Under [`FdRule::TablesOnly`], log2 of the size of the pages backing the region (no
    /// memfd travels to show it); otherwise 0, the layout's reserved word.
    pub page_shift: u32,
}

/// A VFIO group (GROUP_ADD).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupDesc {
    /// Front-end chosen id, unique among the session's groups.
    pub group_id: u32,
    /// Front-end chosen id of the container (one per guest PHB) the group belongs to.
    pub container_id: u32,
    /// The IOMMU group number N of `/dev/vfio/N`.
    pub iommu_group: u32,
}

/// A guest TCE table (TABLE_ADD): the table behind one guest DMA window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableDesc {
    /// Front-end chosen id, unique among the session's tables.
    pub table_id: u32,
    /// The container (guest PHB) whose window this table describes.
    pub container_id: u32,
    /// The guest's logical I/O bus number.
    pub liobn: u32,
    /// log2 of the guest's IOMMU page size.
    pub page_shift: u32,
    /// Bus address of the first entry.
    pub bus_offset: u64,
    /// Number of entries.
    pub entries: u64,
}

/// Where the entries of a slow-path TCE update come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TceEntries {
    /// Read `count` entries (at most [`crate::protocol::MAX_INLINE_TCES`]) from the shared
    /// table, starting at `first_index`.
    Shared,
    /// The entries, carried in the message (at most [`crate::protocol::MAX_INLINE_TCES`]).
    Inline(Vec<u64>),
    /// One value stored into `count` consecutive entries (H_STUFF_TCE).
    Stuff(u64),
}

/// A slow-path TCE update (TCE_UPDATE).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TceUpdate {
    pub table_id: u32,
    pub first_index: u64,
    pub count: u32,
    pub entries: TceEntries,
}

/// An EEH request (EEH_OP), the fields of `struct vfio_eeh_pe_op`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EehRequest {
    pub container_id: u32,
    /// `VFIO_EEH_PE_*`, 0..=9.
    pub op: u32,
    /// `vfio_eeh_pe_err` fields, used by INJECT_ERR only (zero otherwise).
    pub err_type: u32,
    pub err_func: u32,
    pub err_addr: u64,
    pub err_mask: u64,
}

/// Largest defined `VFIO_EEH_PE_*` operation (INJECT_ERR).
pub const EEH_OP_MAX: u32 = EEH_OP_INJECT_ERR;
/// `VFIO_EEH_PE_INJECT_ERR`: the one operation that uses the error-injection fields.
pub const EEH_OP_INJECT_ERR: u32 = 9;

/// A decoded request, without its fd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    GetFeatures,
    SetFeatures {
        features: u64,
    },
    GetStatus {
        first_session: u32,
    },
    MemAdd(MemRegion),
    MemRemove(MemRegion),
    GroupAdd(GroupDesc),
    GroupRemove {
        group_id: u32,
    },
    TableAdd(TableDesc),
    TableRemove {
        table_id: u32,
    },
    WindowQuery {
        container_id: u32,
    },
    WindowCreate {
        table_id: u32,
    },
    WindowRemove {
        table_id: u32,
    },
    /// Remove every window of the container; then, if `default_table` is set, create the
    /// default window from that table.
    WindowReset {
        container_id: u32,
        default_table: Option<u32>,
    },
    TceUpdate(TceUpdate),
    EehOp(EehRequest),
    OpsResult {
        transaction: u32,
        results: Vec<OpResult>,
    },
    /// A group the front-end already attached to its open container (rebuilding a session).
    GroupAdopt(GroupDesc),
    /// A table whose window already exists and is associated in KVM (rebuilding a session).
    WindowAdopt {
        table_id: u32,
    },
}

impl Request {
    pub fn code(&self) -> RequestCode {
        match self {
            Self::GetFeatures => RequestCode::GetFeatures,
            Self::SetFeatures { .. } => RequestCode::SetFeatures,
            Self::GetStatus { .. } => RequestCode::GetStatus,
            Self::MemAdd(_) => RequestCode::MemAdd,
            Self::MemRemove(_) => RequestCode::MemRemove,
            Self::GroupAdd(_) => RequestCode::GroupAdd,
            Self::GroupRemove { .. } => RequestCode::GroupRemove,
            Self::TableAdd(_) => RequestCode::TableAdd,
            Self::TableRemove { .. } => RequestCode::TableRemove,
            Self::WindowQuery { .. } => RequestCode::WindowQuery,
            Self::WindowCreate { .. } => RequestCode::WindowCreate,
            Self::WindowRemove { .. } => RequestCode::WindowRemove,
            Self::WindowReset { .. } => RequestCode::WindowReset,
            Self::TceUpdate(_) => RequestCode::TceUpdate,
            Self::EehOp(_) => RequestCode::EehOp,
            Self::OpsResult { .. } => RequestCode::OpsResult,
            Self::GroupAdopt(_) => RequestCode::GroupAdopt,
            Self::WindowAdopt { .. } => RequestCode::WindowAdopt,
        }
    }
}

/// A request as received: the decoded payload and the fd it carried, if its type carries one.
/// Dropping it closes the fd.
#[derive(Debug)]
pub struct Incoming {
    pub request: Request,
    pub fd: Option<OwnedFd>,
}

/// Owner operation kinds (field `kind` of an operation record).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum OpKind {
    ContainerOpen = 1,
    ContainerClose = 2,
    CheckExtension = 3,
    SetIommu = 4,
    GroupSetContainer = 5,
    GroupUnsetContainer = 6,
    TceGetInfo = 7,
    RegisterMemory = 8,
    UnregisterMemory = 9,
    TceCreate = 10,
    TceRemove = 11,
    MapDma = 12,
    UnmapDma = 13,
    EehPeOp = 14,
    KvmFileAdd = 15,
    KvmFileDel = 16,
    KvmSetSpaprTce = 17,
    KvmHasDeviceAttr = 18,
}

impl OpKind {
    pub const ALL: [OpKind; 18] = [
        Self::ContainerOpen,
        Self::ContainerClose,
        Self::CheckExtension,
        Self::SetIommu,
        Self::GroupSetContainer,
        Self::GroupUnsetContainer,
        Self::TceGetInfo,
        Self::RegisterMemory,
        Self::UnregisterMemory,
        Self::TceCreate,
        Self::TceRemove,
        Self::MapDma,
        Self::UnmapDma,
        Self::EehPeOp,
        Self::KvmFileAdd,
        Self::KvmFileDel,
        Self::KvmSetSpaprTce,
        Self::KvmHasDeviceAttr,
    ];

    pub fn from_u16(kind: u16) -> Option<Self> {
        Self::ALL.iter().copied().find(|k| *k as u16 == kind)
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::ContainerOpen => "CONTAINER_OPEN",
            Self::ContainerClose => "CONTAINER_CLOSE",
            Self::CheckExtension => "CHECK_EXTENSION",
            Self::SetIommu => "SET_IOMMU",
            Self::GroupSetContainer => "GROUP_SET_CONTAINER",
            Self::GroupUnsetContainer => "GROUP_UNSET_CONTAINER",
            Self::TceGetInfo => "TCE_GET_INFO",
            Self::RegisterMemory => "REGISTER_MEMORY",
            Self::UnregisterMemory => "UNREGISTER_MEMORY",
            Self::TceCreate => "TCE_CREATE",
            Self::TceRemove => "TCE_REMOVE",
            Self::MapDma => "MAP_DMA",
            Self::UnmapDma => "UNMAP_DMA",
            Self::EehPeOp => "EEH_PE_OP",
            Self::KvmFileAdd => "KVM_FILE_ADD",
            Self::KvmFileDel => "KVM_FILE_DEL",
            Self::KvmSetSpaprTce => "KVM_SET_SPAPR_TCE",
            Self::KvmHasDeviceAttr => "KVM_HAS_DEVICE_ATTR",
        }
    }
}

/// DMA direction of a MAP_DMA operation (`VFIO_DMA_MAP_FLAG_READ`/`_WRITE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaAccess {
    /// The device may read the memory.
    pub read: bool,
    /// The device may write the memory.
    pub write: bool,
}

/// One kernel call the sidecar asks the front-end to make on its own fds. Objects are named by
/// the ids the front-end registered; the front-end never receives a raw fd number or ioctl.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OwnerOp {
    /// `open("/dev/vfio/vfio")` for a container id the front-end has no fd for yet, then
    /// `VFIO_GET_API_VERSION`. Output: the API version.
    ContainerOpen { container: u32 },
    /// `close()` of the container's fd.
    ContainerClose { container: u32 },
    /// `VFIO_CHECK_EXTENSION`. Output: the ioctl's return value.
    CheckExtension { container: u32, extension: u32 },
    /// `VFIO_SET_IOMMU`.
    SetIommu { container: u32, iommu_type: u32 },
    /// `VFIO_GROUP_SET_CONTAINER` with the container's fd.
    GroupSetContainer { container: u32, group: u32 },
    /// `VFIO_GROUP_UNSET_CONTAINER`.
    GroupUnsetContainer { container: u32, group: u32 },
    /// `VFIO_IOMMU_SPAPR_TCE_GET_INFO`. Outputs: see [`TceInfo`].
    TceGetInfo { container: u32 },
    /// `VFIO_IOMMU_SPAPR_REGISTER_MEMORY` of `size` bytes at the front-end's address of the
    /// region plus `offset`.
    RegisterMemory {
        container: u32,
        region: u32,
        offset: u64,
        size: u64,
    },
    /// `VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY`, same fields as the registration it undoes.
    UnregisterMemory {
        container: u32,
        region: u32,
        offset: u64,
        size: u64,
    },
    /// `VFIO_IOMMU_SPAPR_TCE_CREATE`. Output: the window's start address.
    TceCreate {
        container: u32,
        page_shift: u32,
        window_size: u64,
        levels: u32,
    },
    /// `VFIO_IOMMU_SPAPR_TCE_REMOVE`.
    TceRemove { container: u32, start_addr: u64 },
    /// `VFIO_IOMMU_MAP_DMA` of `size` bytes at the region's address plus `offset` to `iova`.
    MapDma {
        container: u32,
        region: u32,
        offset: u64,
        iova: u64,
        size: u64,
        access: DmaAccess,
    },
    /// `VFIO_IOMMU_UNMAP_DMA`. Output: the number of bytes unmapped.
    UnmapDma {
        container: u32,
        iova: u64,
        size: u64,
    },
    /// `VFIO_EEH_PE_OP`. Output: the ioctl's return value (the PE state for GET_STATE).
    EehPeOp {
        container: u32,
        op: u32,
        err_type: u32,
        err_func: u32,
        err_addr: u64,
        err_mask: u64,
    },
    /// `KVM_SET_DEVICE_ATTR(KVM_DEV_VFIO_FILE, KVM_DEV_VFIO_FILE_ADD)` with the group's fd.
    KvmFileAdd { group: u32 },
    /// `KVM_SET_DEVICE_ATTR(KVM_DEV_VFIO_FILE, KVM_DEV_VFIO_FILE_DEL)` with the group's fd.
    KvmFileDel { group: u32 },
    /// `KVM_SET_DEVICE_ATTR(KVM_DEV_VFIO_FILE, KVM_DEV_VFIO_GROUP_SET_SPAPR_TCE)` with
    /// `{groupfd, tablefd}` of the named group and table.
    KvmSetSpaprTce { group: u32, table: u32 },
    /// `KVM_HAS_DEVICE_ATTR` on the kvm-vfio device. Status 0: supported; -ENXIO: not.
    KvmHasDeviceAttr { attr_group: u32, attr: u64 },
}

impl OwnerOp {
    pub fn kind(&self) -> OpKind {
        match self {
            Self::ContainerOpen { .. } => OpKind::ContainerOpen,
            Self::ContainerClose { .. } => OpKind::ContainerClose,
            Self::CheckExtension { .. } => OpKind::CheckExtension,
            Self::SetIommu { .. } => OpKind::SetIommu,
            Self::GroupSetContainer { .. } => OpKind::GroupSetContainer,
            Self::GroupUnsetContainer { .. } => OpKind::GroupUnsetContainer,
            Self::TceGetInfo { .. } => OpKind::TceGetInfo,
            Self::RegisterMemory { .. } => OpKind::RegisterMemory,
            Self::UnregisterMemory { .. } => OpKind::UnregisterMemory,
            Self::TceCreate { .. } => OpKind::TceCreate,
            Self::TceRemove { .. } => OpKind::TceRemove,
            Self::MapDma { .. } => OpKind::MapDma,
            Self::UnmapDma { .. } => OpKind::UnmapDma,
            Self::EehPeOp { .. } => OpKind::EehPeOp,
            Self::KvmFileAdd { .. } => OpKind::KvmFileAdd,
            Self::KvmFileDel { .. } => OpKind::KvmFileDel,
            Self::KvmSetSpaprTce { .. } => OpKind::KvmSetSpaprTce,
            Self::KvmHasDeviceAttr { .. } => OpKind::KvmHasDeviceAttr,
        }
    }
}

/// The front-end's report of one executed owner operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpResult {
    /// The kind of the operation this result answers (checked against the operation sent).
    pub kind: OpKind,
    /// 0 on success, or the negative errno the call failed with.
    pub status: i32,
    /// Outputs, defined per kind; zero where a kind has none.
    pub out: [u64; 4],
}

/// The outputs of TCE_GET_INFO, packed into an [`OpResult`]'s four words.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TceInfo {
    pub flags: u32,
    pub dma32_window_start: u32,
    pub dma32_window_size: u32,
    pub pgsizes: u64,
    pub max_dynamic_windows: u32,
    pub levels: u32,
}

impl TceInfo {
    pub fn to_out(self) -> [u64; 4] {
        [
            u64::from(self.flags),
            u64::from(self.dma32_window_start) | u64::from(self.dma32_window_size) << 32,
            self.pgsizes,
            u64::from(self.max_dynamic_windows) | u64::from(self.levels) << 32,
        ]
    }

    pub fn from_out(out: [u64; 4]) -> Self {
        // Truncations are the packing rule of the spec: each word holds two u32 halves.
        Self {
            flags: out[0] as u32,
            dma32_window_start: out[1] as u32,
            dma32_window_size: (out[1] >> 32) as u32,
            pgsizes: out[2],
            max_dynamic_windows: out[3] as u32,
            levels: (out[3] >> 32) as u32,
        }
    }
}

/// A reply. Every request gets exactly one.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Reply {
    /// 0, or a negative errno. Always 0 while operations are pending.
    pub status: i32,
    /// Nonzero exactly when `ops` is not empty: the transaction the front-end answers with
    /// OPS_RESULT.
    pub transaction: u32,
    /// The pending operations undo a failed transaction; the final reply will carry its error.
    pub rollback: bool,
    /// Owner operations to execute in order.
    pub ops: Vec<OwnerOp>,
    /// The request's reply body (see each request in the spec).
    pub body: Vec<u8>,
    /// Human-readable text; never empty when `status` is negative.
    pub text: String,
}

impl Reply {
    /// A successful final reply with a body.
    pub fn ok(body: Vec<u8>) -> Self {
        Self {
            body,
            ..Self::default()
        }
    }

    /// A final error reply: `errno` is positive (e.g. `libc::EINVAL`), sent negated.
    pub fn error(errno: i32, text: impl Into<String>) -> Self {
        Self {
            status: -errno.abs(),
            text: text.into(),
            ..Self::default()
        }
    }

    /// A reply that opens or continues a transaction.
    pub fn ops(transaction: u32, ops: Vec<OwnerOp>, rollback: bool) -> Self {
        Self {
            transaction,
            ops,
            rollback,
            ..Self::default()
        }
    }
}

/// Reply body of GET_FEATURES and SET_FEATURES.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FeaturesBody {
    pub features: u64,
}

/// Reply body of WINDOW_QUERY.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowQueryBody {
    /// Windows that can still be created in the container.
    pub windows_available: u32,
    /// Windows the host supports in the container in all.
    pub windows_max: u32,
    /// Host IOMMU page sizes: bit n set means 1 << n is supported.
    pub page_sizes: u64,
    /// Bytes of guest RAM registered in the session: the largest window worth creating.
    pub ram_size: u64,
}

/// Reply body of WINDOW_CREATE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowCreateBody {
    /// Bus address of the window (equal to the table's bus offset).
    pub start_addr: u64,
    /// log2 of the hardware IOMMU page size chosen.
    pub hw_page_shift: u32,
    /// Levels of the hardware table.
    pub levels: u32,
}

/// Reply body of TCE_UPDATE (on success and on failure).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TceUpdateBody {
    /// The hypercall return code the guest should see (H_SUCCESS 0, H_PARAMETER -4, ...).
    pub h_status: i64,
    /// Entries applied before the update stopped (all of them on success).
    pub processed: u32,
}

/// Reply body of EEH_OP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EehBody {
    /// The ioctl's return value (the PE state for GET_STATE).
    pub result: i32,
}
