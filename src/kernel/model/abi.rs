//! Constants and argument structs of the calls the model simulates, at the kernel's level.
//!
//! Values are those of `include/uapi/linux/{vfio,kvm}.h` and `arch/powerpc/include/asm/hvcall.h`.
//! Argument structs carry the fields the kernel reads (including `argsz` and `flags`, which the
//! kernel checks), in host byte order; the model never sees the user's bytes.

/// `VFIO_API_VERSION`, returned by `VFIO_GET_API_VERSION`.
pub const VFIO_API_VERSION: u32 = 0;
/// `VFIO_SPAPR_TCE_IOMMU`: the v1 sPAPR IOMMU type (and `VFIO_CHECK_EXTENSION` argument).
pub const VFIO_SPAPR_TCE_IOMMU: u32 = 2;
/// `VFIO_EEH`: `VFIO_CHECK_EXTENSION` argument asking whether EEH is available.
pub const VFIO_EEH: u32 = 5;
/// `VFIO_SPAPR_TCE_v2_IOMMU`: the v2 sPAPR IOMMU type (pre-registration).
pub const VFIO_SPAPR_TCE_V2_IOMMU: u32 = 7;

/// `VFIO_GROUP_FLAGS_VIABLE` in `VFIO_GROUP_GET_STATUS`.
pub const VFIO_GROUP_FLAGS_VIABLE: u32 = 1 << 0;
/// `VFIO_GROUP_FLAGS_CONTAINER_SET` in `VFIO_GROUP_GET_STATUS`.
pub const VFIO_GROUP_FLAGS_CONTAINER_SET: u32 = 1 << 1;

/// `VFIO_DMA_MAP_FLAG_READ`: the device may read the memory.
pub const VFIO_DMA_MAP_FLAG_READ: u32 = 1 << 0;
/// `VFIO_DMA_MAP_FLAG_WRITE`: the device may write the memory.
pub const VFIO_DMA_MAP_FLAG_WRITE: u32 = 1 << 1;
/// `VFIO_IOMMU_SPAPR_INFO_DDW` in `vfio_iommu_spapr_tce_info.flags`.
pub const VFIO_IOMMU_SPAPR_INFO_DDW: u32 = 1 << 0;

/// `offsetofend(vfio_iommu_spapr_tce_info, dma32_window_size)`: the smallest `argsz`.
pub const TCE_INFO_MINSZ: u32 = 16;
/// `offsetofend(vfio_iommu_spapr_tce_info, ddw)`: `argsz` from which DDW info is copied out.
pub const TCE_INFO_DDW_SZ: u32 = 32;
/// `offsetofend(vfio_iommu_spapr_register_memory, size)`.
pub const REGISTER_MEMORY_MINSZ: u32 = 24;
/// `offsetofend(vfio_iommu_spapr_tce_create, start_addr)`.
pub const TCE_CREATE_MINSZ: u32 = 40;
/// `offsetofend(vfio_iommu_spapr_tce_remove, start_addr)`.
pub const TCE_REMOVE_MINSZ: u32 = 16;
/// `offsetofend(vfio_iommu_type1_dma_map, size)`.
pub const DMA_MAP_MINSZ: u32 = 32;
/// `offsetofend(vfio_iommu_type1_dma_unmap, size)`.
pub const DMA_UNMAP_MINSZ: u32 = 24;
/// `offsetofend(vfio_eeh_pe_op, op)`.
pub const EEH_PE_OP_MINSZ: u32 = 12;
/// `offsetofend(vfio_eeh_pe_op, err.mask)`: needed by `VFIO_EEH_PE_INJECT_ERR`.
pub const EEH_PE_OP_ERR_MINSZ: u32 = 40;

/// `VFIO_EEH_PE_*` operations, in `vfio_eeh_pe_op.op`.
pub mod eeh_op {
    pub const DISABLE: u32 = 0;
    pub const ENABLE: u32 = 1;
    pub const UNFREEZE_IO: u32 = 2;
    pub const UNFREEZE_DMA: u32 = 3;
    pub const GET_STATE: u32 = 4;
    pub const RESET_DEACTIVATE: u32 = 5;
    pub const RESET_HOT: u32 = 6;
    pub const RESET_FUNDAMENTAL: u32 = 7;
    pub const CONFIGURE: u32 = 8;
    pub const INJECT_ERR: u32 = 9;
}
/// `VFIO_EEH_PE_STATE_NORMAL`: what a healthy PE reports to `VFIO_EEH_PE_GET_STATE`.
pub const VFIO_EEH_PE_STATE_NORMAL: u32 = 0;

/// `KVM_DEV_TYPE_VFIO` for `KVM_CREATE_DEVICE`.
pub const KVM_DEV_TYPE_VFIO: u32 = 4;
/// `KVM_CREATE_DEVICE_TEST`: only ask whether the device type could be created.
pub const KVM_CREATE_DEVICE_TEST: u32 = 1;
/// `KVM_DEV_VFIO_FILE` (alias `KVM_DEV_VFIO_GROUP`): the kvm-vfio attribute group.
pub const KVM_DEV_VFIO_FILE: u32 = 1;
/// `KVM_DEV_VFIO_FILE_ADD` (alias `KVM_DEV_VFIO_GROUP_ADD`).
pub const KVM_DEV_VFIO_FILE_ADD: u64 = 1;
/// `KVM_DEV_VFIO_FILE_DEL` (alias `KVM_DEV_VFIO_GROUP_DEL`).
pub const KVM_DEV_VFIO_FILE_DEL: u64 = 2;
/// `KVM_DEV_VFIO_GROUP_SET_SPAPR_TCE`, argument `struct kvm_vfio_spapr_tce {s32 groupfd, tablefd}`.
pub const KVM_DEV_VFIO_GROUP_SET_SPAPR_TCE: u64 = 3;

/// `KVM_CAP_SPAPR_TCE`.
pub const KVM_CAP_SPAPR_TCE: u32 = 63;
/// `KVM_CAP_SPAPR_MULTITCE`: `H_PUT_TCE_INDIRECT`/`H_STUFF_TCE` can be handled in the kernel.
pub const KVM_CAP_SPAPR_MULTITCE: u32 = 94;
/// `KVM_CAP_PPC_ENABLE_HCALL`.
pub const KVM_CAP_PPC_ENABLE_HCALL: u32 = 104;
/// `KVM_CAP_SPAPR_TCE_64`: `KVM_CREATE_SPAPR_TCE_64`.
pub const KVM_CAP_SPAPR_TCE_64: u32 = 125;
/// `KVM_CAP_SPAPR_TCE_VFIO`: `KVM_DEV_VFIO_GROUP_SET_SPAPR_TCE`.
pub const KVM_CAP_SPAPR_TCE_VFIO: u32 = 142;

/// `TCE_PCI_READ`: the low permission bit of a TCE.
pub const TCE_PCI_READ: u64 = 1;
/// `TCE_PCI_WRITE`.
pub const TCE_PCI_WRITE: u64 = 2;

/// Hypercall numbers (`arch/powerpc/include/asm/hvcall.h`).
pub const H_GET_TCE: u64 = 0x1c;
pub const H_PUT_TCE: u64 = 0x20;
pub const H_PUT_TCE_INDIRECT: u64 = 0x13c;
pub const H_STUFF_TCE: u64 = 0x138;
/// Hypercall return codes.
pub const H_SUCCESS: i64 = 0;
pub const H_PARAMETER: i64 = -4;
/// Not a PAPR code: KVM's "exit to userspace and let it handle the call".
pub const H_TOO_HARD: i64 = 9999;

/// Largest `npages` of `H_PUT_TCE_INDIRECT`: the list fits one 4K page.
pub const MAX_INDIRECT_TCES: u64 = 512;

/// Direction of a DMA mapping (`enum dma_data_direction`), from a TCE's two permission bits
/// (`iommu_tce_direction`) or from `VFIO_DMA_MAP_FLAG_*`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DmaDir {
    /// Neither bit: no access (an unmapped or poisoned entry).
    None,
    /// `TCE_PCI_READ` only: the device reads memory.
    ToDevice,
    /// `TCE_PCI_WRITE` only: the device writes memory.
    FromDevice,
    /// Both bits.
    Bidirectional,
}

impl DmaDir {
    /// `iommu_tce_direction()`: the direction a TCE's permission bits grant.
    pub fn of_tce(tce: u64) -> Self {
        match (tce & TCE_PCI_READ != 0, tce & TCE_PCI_WRITE != 0) {
            (true, true) => Self::Bidirectional,
            (true, false) => Self::ToDevice,
            (false, true) => Self::FromDevice,
            (false, false) => Self::None,
        }
    }

    /// Whether the device may write the memory (the page must be pinned writable).
    pub fn device_writes(self) -> bool {
        matches!(self, Self::FromDevice | Self::Bidirectional)
    }
}

/// `struct kvm_create_spapr_tce_64`. `offset` and `size` count IOMMU pages of `1 << page_shift`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CreateSpaprTce64 {
    pub liobn: u64,
    pub page_shift: u32,
    pub flags: u32,
    pub offset: u64,
    pub size: u64,
}

/// `struct kvm_userspace_memory_region`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UserMemoryRegion {
    pub slot: u32,
    pub flags: u32,
    pub guest_phys_addr: u64,
    pub memory_size: u64,
    pub userspace_addr: u64,
}

/// `KVM_MEM_LOG_DIRTY_PAGES`, the only memslot flag the model accepts (`KVM_MEM_READONLY` is
/// not available on powerpc).
pub const KVM_MEM_LOG_DIRTY_PAGES: u32 = 1;
/// `KVM_USER_MEM_SLOTS` on powerpc.
pub const KVM_USER_MEM_SLOTS: u32 = 512;

/// `struct vfio_iommu_spapr_register_memory`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegisterMemory {
    pub argsz: u32,
    pub flags: u32,
    pub vaddr: u64,
    pub size: u64,
}

impl RegisterMemory {
    /// The argument the product passes: full `argsz`, no flags.
    pub fn new(vaddr: u64, size: u64) -> Self {
        Self {
            argsz: REGISTER_MEMORY_MINSZ,
            flags: 0,
            vaddr,
            size,
        }
    }
}

/// `struct vfio_iommu_spapr_tce_create` (inputs; `start_addr` is the output).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TceCreate {
    pub argsz: u32,
    pub flags: u32,
    pub page_shift: u32,
    pub window_size: u64,
    pub levels: u32,
}

impl TceCreate {
    /// The argument the product passes: full `argsz`, no flags.
    pub fn new(page_shift: u32, window_size: u64, levels: u32) -> Self {
        Self {
            argsz: TCE_CREATE_MINSZ,
            flags: 0,
            page_shift,
            window_size,
            levels,
        }
    }
}

/// `struct vfio_iommu_spapr_tce_remove`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TceRemove {
    pub argsz: u32,
    pub flags: u32,
    pub start_addr: u64,
}

impl TceRemove {
    /// The argument the product passes: full `argsz`, no flags.
    pub fn new(start_addr: u64) -> Self {
        Self {
            argsz: TCE_REMOVE_MINSZ,
            flags: 0,
            start_addr,
        }
    }
}

/// `struct vfio_iommu_type1_dma_map`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaMap {
    pub argsz: u32,
    pub flags: u32,
    pub vaddr: u64,
    pub iova: u64,
    pub size: u64,
}

impl DmaMap {
    /// The argument the product passes: full `argsz`, READ|WRITE.
    pub fn new(vaddr: u64, iova: u64, size: u64) -> Self {
        Self {
            argsz: DMA_MAP_MINSZ,
            flags: VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
            vaddr,
            iova,
            size,
        }
    }
}

/// `struct vfio_iommu_type1_dma_unmap`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaUnmap {
    pub argsz: u32,
    pub flags: u32,
    pub iova: u64,
    pub size: u64,
}

impl DmaUnmap {
    /// The argument the product passes: full `argsz`, no flags.
    pub fn new(iova: u64, size: u64) -> Self {
        Self {
            argsz: DMA_UNMAP_MINSZ,
            flags: 0,
            iova,
            size,
        }
    }
}

/// `struct vfio_eeh_pe_op`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EehPeOp {
    pub argsz: u32,
    pub flags: u32,
    pub op: u32,
    pub err_type: u32,
    pub err_func: u32,
    pub err_addr: u64,
    pub err_mask: u64,
}

impl EehPeOp {
    /// The argument the product passes: full `argsz`, no flags, no error description.
    pub fn new(op: u32) -> Self {
        Self {
            argsz: EEH_PE_OP_ERR_MINSZ,
            flags: 0,
            op,
            err_type: 0,
            err_func: 0,
            err_addr: 0,
            err_mask: 0,
        }
    }
}

/// `struct vfio_iommu_spapr_tce_info` as the kernel fills it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SpaprTceInfo {
    pub flags: u32,
    pub dma32_window_start: u32,
    pub dma32_window_size: u32,
    /// `ddw.pgsizes`: a bit per supported IOMMU page size.
    pub pgsizes: u64,
    pub max_dynamic_windows_supported: u32,
    pub levels: u32,
}

/// Which platform code answers `iommu_table_group_ops`: it decides table sizes (and so the
/// memory charged) and which windows can be created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlatformKind {
    /// Bare-metal POWER8/9/10 with IODA2/PHB4 (`arch/powerpc/platforms/powernv/pci-ioda*.c`).
    PowerNv,
    /// A pSeries guest (nested KVM on PowerVM or KVM) using the hypervisor's DDW calls
    /// (`arch/powerpc/platforms/pseries/iommu.c`).
    PSeries,
}

/// The host the model simulates: what every IOMMU group (PE) reports and how windows are placed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Platform {
    pub kind: PlatformKind,
    /// The kernel's `PAGE_SHIFT`: alignment of pre-registration and memslots, unit of locked
    /// memory accounting and of the KVM TCE table's pages.
    pub host_page_shift: u32,
    /// `table_group->pgsizes`.
    pub pgsizes: u64,
    /// `table_group->tce32_start`, `tce32_size`: the default 32-bit window.
    pub tce32_start: u64,
    pub tce32_size: u64,
    /// `table_group->max_dynamic_windows_supported`.
    pub max_dynamic_windows_supported: u32,
    /// `table_group->max_levels`.
    pub max_levels: u32,
    /// Bus address the platform gives the window in table slot 0 and slot 1.
    pub window_base: [u64; 2],
    /// `memory_hotplug_max()`: a window may not be larger (powernv's `get_table_size`).
    pub max_window_size: u64,
    /// `eeh_enabled()`.
    pub eeh: bool,
}

impl Platform {
    /// A POWER9 powernv host as the lab reports it: `pgsizes` 0x40211000 = 4K|64K|2M|1G
    /// (bits 12, 16, 21, 30), 2 GiB 32-bit window at 0, two dynamic windows, 5 levels, window 0
    /// at bus address 0 and window 1 at `1 << 59` (`pe->tce_bypass_base`), 4K kernel pages
    /// (the Debian 6.12 kernel of the lab).
    pub fn powernv() -> Self {
        Self {
            kind: PlatformKind::PowerNv,
            host_page_shift: 12,
            pgsizes: 0x4021_1000,
            tce32_start: 0,
            tce32_size: 2 << 30,
            max_dynamic_windows_supported: 2,
            max_levels: 5,
            window_base: [0, 1 << 59],
            max_window_size: 1 << 40,
            eeh: true,
        }
    }

    /// A pSeries host (nested KVM) as the lab reports it: `pgsizes` 0x1211000 = 4K|64K|2M|16M
    /// (bits 12, 16, 21, 24), 1 GiB 32-bit window at 0, two dynamic windows, 1 level, the 64-bit
    /// window at `1 << 59` (QEMU's `dma64_win_addr`, which the hypervisor returns).
    pub fn pseries() -> Self {
        Self {
            kind: PlatformKind::PSeries,
            host_page_shift: 12,
            pgsizes: 0x121_1000,
            tce32_start: 0,
            tce32_size: 1 << 30,
            max_dynamic_windows_supported: 2,
            max_levels: 1,
            window_base: [0, 1 << 59],
            max_window_size: 1 << 40,
            eeh: true,
        }
    }

    /// The kernel's `PAGE_SIZE`.
    pub fn page_size(&self) -> u64 {
        1 << self.host_page_shift
    }
}

/// One hypercall as a vCPU issues it (`sc 1` with r3 = number, r4.. = arguments).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hcall {
    PutTce {
        liobn: u64,
        ioba: u64,
        tce: u64,
    },
    /// `tce_list` is a guest physical address of a list of big-endian TCEs.
    PutTceIndirect {
        liobn: u64,
        ioba: u64,
        tce_list: u64,
        npages: u64,
    },
    StuffTce {
        liobn: u64,
        ioba: u64,
        tce_value: u64,
        npages: u64,
    },
    GetTce {
        liobn: u64,
        ioba: u64,
    },
}

impl Hcall {
    /// The hypercall number (r3).
    pub fn number(&self) -> u64 {
        match self {
            Self::PutTce { .. } => H_PUT_TCE,
            Self::PutTceIndirect { .. } => H_PUT_TCE_INDIRECT,
            Self::StuffTce { .. } => H_STUFF_TCE,
            Self::GetTce { .. } => H_GET_TCE,
        }
    }

    /// The call from its number and argument registers r4..r7; `None` for a number the model
    /// does not handle.
    pub fn from_regs(number: u64, args: [u64; 4]) -> Option<Self> {
        let [a, b, c, d] = args;
        Some(match number {
            H_PUT_TCE => Self::PutTce {
                liobn: a,
                ioba: b,
                tce: c,
            },
            H_PUT_TCE_INDIRECT => Self::PutTceIndirect {
                liobn: a,
                ioba: b,
                tce_list: c,
                npages: d,
            },
            H_STUFF_TCE => Self::StuffTce {
                liobn: a,
                ioba: b,
                tce_value: c,
                npages: d,
            },
            H_GET_TCE => Self::GetTce { liobn: a, ioba: b },
            _ => return None,
        })
    }

    /// The argument registers r4..r7.
    pub fn regs(&self) -> [u64; 4] {
        match *self {
            Self::PutTce { liobn, ioba, tce } => [liobn, ioba, tce, 0],
            Self::PutTceIndirect {
                liobn,
                ioba,
                tce_list,
                npages,
            } => [liobn, ioba, tce_list, npages],
            Self::StuffTce {
                liobn,
                ioba,
                tce_value,
                npages,
            } => [liobn, ioba, tce_value, npages],
            Self::GetTce { liobn, ioba } => [liobn, ioba, 0, 0],
        }
    }
}

/// What became of a hypercall.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HcallOutcome {
    /// KVM completed it: the guest resumes with `ret` in r3 and `value` in r4 (`H_GET_TCE`).
    Completed { ret: i64, value: u64 },
    /// KVM exited to userspace (`KVM_EXIT_PAPR_HCALL`): the VMM handles it (`H_TOO_HARD`, or a
    /// hypercall not enabled in the kernel).
    Exit,
}
