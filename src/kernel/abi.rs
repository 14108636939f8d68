//! The kernel's binary interface for the calls in [`super::KernelOp`]: ioctl numbers for every
//! architecture the crate targets, the argument structs, and the constants put into them.
//!
//! This module owns numbers and layouts only. It must not issue a call (that is
//! [`super::linux`]) and holds no `unsafe`.
//!
//! Ioctl numbers are computed by [`ioc`], a pure `const fn` of the architecture's `_IOC`
//! encoding, so that one build can compute the numbers of another architecture: the ABI test
//! compares the powerpc64 numbers with the ppc64el kernel headers while running on x86_64. The
//! native numbers are additionally checked at compile time against `libc`'s `_IO`/`_IOW`/`_IOWR`.
//! The sPAPR VFIO structs come from `vfio-bindings`; the KVM structs are written here because
//! `kvm-bindings` is empty on powerpc64 and lacks `kvm_create_spapr_tce_64` everywhere. All of
//! them use fixed-width fields only, so their layout is the same on x86_64 and powerpc64 (both
//! align `u64` to 8); fields are in the host's byte order.

use std::mem::{offset_of, size_of};

pub use vfio_bindings::bindings::vfio::{
    vfio_eeh_pe_err, vfio_eeh_pe_op, vfio_eeh_pe_op__bindgen_ty_1, vfio_group_status,
    vfio_iommu_spapr_register_memory, vfio_iommu_spapr_tce_create, vfio_iommu_spapr_tce_ddw_info,
    vfio_iommu_spapr_tce_info, vfio_iommu_spapr_tce_remove, vfio_iommu_type1_dma_map,
    vfio_iommu_type1_dma_unmap, VFIO_SPAPR_TCE_v2_IOMMU, VFIO_API_VERSION, VFIO_DMA_MAP_FLAG_READ,
    VFIO_DMA_MAP_FLAG_WRITE, VFIO_EEH, VFIO_GROUP_FLAGS_CONTAINER_SET, VFIO_GROUP_FLAGS_VIABLE,
    VFIO_IOMMU_SPAPR_INFO_DDW,
};

/// The `_IOC` encoding of an architecture family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IocArch {
    /// `include/uapi/asm-generic/ioctl.h` (x86_64, aarch64, riscv64): 2 direction bits at 30,
    /// 14 size bits; none 0, write 1, read 2.
    Generic,
    /// `arch/powerpc/include/uapi/asm/ioctl.h`: 3 direction bits at 29, 13 size bits;
    /// none 1, read 2, write 4.
    Powerpc,
}

impl IocArch {
    /// The encoding of the architecture this crate is compiled for.
    pub const NATIVE: IocArch = if cfg!(target_arch = "powerpc64") {
        IocArch::Powerpc
    } else {
        IocArch::Generic
    };
}

/// Data direction of an ioctl, seen from userspace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// `_IO`: no argument struct (an integer argument, if any, is not encoded).
    None,
    /// `_IOR`: the kernel writes the struct.
    Read,
    /// `_IOW`: the kernel reads the struct.
    Write,
    /// `_IOWR`: both.
    ReadWrite,
}

/// `_IOC(dir, ty, nr, size)` for `arch`. Panics (at compile time, in a const) when `size` does
/// not fit the architecture's size field.
pub const fn ioc(arch: IocArch, dir: Dir, ty: u8, nr: u8, size: usize) -> u32 {
    let (size_bits, none, read, write) = match arch {
        IocArch::Generic => (14, 0, 2, 1),
        IocArch::Powerpc => (13, 1, 2, 4),
    };
    assert!(
        size < 1 << size_bits,
        "ioctl argument too large for the size field"
    );
    let dir_bits: u32 = match dir {
        Dir::None => none,
        Dir::Read => read,
        Dir::Write => write,
        Dir::ReadWrite => read | write,
    };
    // nr: bits 0-7, type: bits 8-15, size: from bit 16, direction: above the size field.
    (dir_bits << (16 + size_bits)) | ((size as u32) << 16) | ((ty as u32) << 8) | nr as u32
}

/// `VFIO_TYPE`, the ioctl type byte of every VFIO call (`';'`).
pub const VFIO_TYPE: u8 = b';';
/// `VFIO_BASE`, the first VFIO ioctl nr.
pub const VFIO_BASE: u8 = 100;
/// `KVMIO`, the ioctl type byte of every KVM call.
pub const KVMIO: u8 = 0xAE;

/// `KVM_CAP_SPAPR_TCE_VFIO`: KVM can associate its TCE tables with VFIO groups (the in-kernel
/// fast path for passed-through devices).
pub const KVM_CAP_SPAPR_TCE_VFIO: u32 = 142;
/// `KVM_DEV_TYPE_VFIO`: the kvm-vfio pseudo device.
pub const KVM_DEV_TYPE_VFIO: u32 = 4;
/// `KVM_DEV_VFIO_FILE` (alias `KVM_DEV_VFIO_GROUP`): the kvm-vfio attribute group.
pub const KVM_DEV_VFIO_FILE: u32 = 1;
/// `KVM_DEV_VFIO_FILE_ADD` (alias `KVM_DEV_VFIO_GROUP_ADD`).
pub const KVM_DEV_VFIO_FILE_ADD: u64 = 1;
/// `KVM_DEV_VFIO_FILE_DEL` (alias `KVM_DEV_VFIO_GROUP_DEL`).
pub const KVM_DEV_VFIO_FILE_DEL: u64 = 2;
/// `KVM_DEV_VFIO_GROUP_SET_SPAPR_TCE`.
pub const KVM_DEV_VFIO_GROUP_SET_SPAPR_TCE: u64 = 3;

/// `struct kvm_device_attr` (`linux/kvm.h`): the argument of `KVM_{SET,GET,HAS}_DEVICE_ATTR`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvmDeviceAttr {
    /// No flags are defined; 0.
    pub flags: u32,
    /// Attribute group (for kvm-vfio: [`KVM_DEV_VFIO_FILE`]).
    pub group: u32,
    /// Attribute within the group.
    pub attr: u64,
    /// Userspace address of the attribute's payload.
    pub addr: u64,
}
const _: () = assert!(size_of::<KvmDeviceAttr>() == 24);
const _: () = assert!(offset_of!(KvmDeviceAttr, flags) == 0);
const _: () = assert!(offset_of!(KvmDeviceAttr, group) == 4);
const _: () = assert!(offset_of!(KvmDeviceAttr, attr) == 8);
const _: () = assert!(offset_of!(KvmDeviceAttr, addr) == 16);

/// `struct kvm_vfio_spapr_tce` (`linux/kvm.h`): the payload of
/// `KVM_DEV_VFIO_GROUP_SET_SPAPR_TCE`. Exactly 8 bytes: the seed's v8 form with `argsz` and
/// `flags` in front was dropped in review, and the kernel copies only these 8 bytes (K4).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvmVfioSpaprTce {
    /// The VFIO group fd previously added with `KVM_DEV_VFIO_FILE_ADD`.
    pub groupfd: i32,
    /// The fd returned by `KVM_CREATE_SPAPR_TCE_64`.
    pub tablefd: i32,
}
const _: () = assert!(size_of::<KvmVfioSpaprTce>() == 8);
const _: () = assert!(offset_of!(KvmVfioSpaprTce, groupfd) == 0);
const _: () = assert!(offset_of!(KvmVfioSpaprTce, tablefd) == 4);

/// `struct kvm_create_spapr_tce_64` (powerpc `asm/kvm.h`): the argument of the VM ioctl
/// `KVM_CREATE_SPAPR_TCE_64`, which only the front-end (the VM's creator, K1) can make.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvmCreateSpaprTce64 {
    /// The guest's logical I/O bus number.
    pub liobn: u64,
    /// log2 of the guest IOMMU page size.
    pub page_shift: u32,
    /// No flags are defined; 0.
    pub flags: u32,
    /// Bus offset of the window, in IOMMU pages.
    pub offset: u64,
    /// Window size, in IOMMU pages.
    pub size: u64,
}
const _: () = assert!(size_of::<KvmCreateSpaprTce64>() == 32);
const _: () = assert!(offset_of!(KvmCreateSpaprTce64, liobn) == 0);
const _: () = assert!(offset_of!(KvmCreateSpaprTce64, page_shift) == 8);
const _: () = assert!(offset_of!(KvmCreateSpaprTce64, flags) == 12);
const _: () = assert!(offset_of!(KvmCreateSpaprTce64, offset) == 16);
const _: () = assert!(offset_of!(KvmCreateSpaprTce64, size) == 24);

/// `struct kvm_create_device` (`linux/kvm.h`): the argument of the VM ioctl
/// `KVM_CREATE_DEVICE`, used by a front-end (and the tests) to create the kvm-vfio device.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvmCreateDevice {
    /// `KVM_DEV_TYPE_*`.
    pub type_: u32,
    /// Out: the device fd.
    pub fd: u32,
    /// `KVM_CREATE_DEVICE_TEST` or 0.
    pub flags: u32,
}
const _: () = assert!(size_of::<KvmCreateDevice>() == 12);
const _: () = assert!(offset_of!(KvmCreateDevice, type_) == 0);
const _: () = assert!(offset_of!(KvmCreateDevice, fd) == 4);
const _: () = assert!(offset_of!(KvmCreateDevice, flags) == 8);

/// Every ioctl the crate issues or describes, named after its C macro.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Ioctl {
    VFIO_GET_API_VERSION,
    VFIO_CHECK_EXTENSION,
    VFIO_SET_IOMMU,
    VFIO_GROUP_GET_STATUS,
    VFIO_GROUP_SET_CONTAINER,
    VFIO_GROUP_UNSET_CONTAINER,
    VFIO_IOMMU_SPAPR_TCE_GET_INFO,
    VFIO_IOMMU_MAP_DMA,
    VFIO_IOMMU_UNMAP_DMA,
    VFIO_IOMMU_SPAPR_REGISTER_MEMORY,
    VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY,
    VFIO_IOMMU_SPAPR_TCE_CREATE,
    VFIO_IOMMU_SPAPR_TCE_REMOVE,
    VFIO_EEH_PE_OP,
    KVM_CHECK_EXTENSION,
    KVM_CREATE_VM,
    KVM_CREATE_DEVICE,
    KVM_SET_DEVICE_ATTR,
    KVM_HAS_DEVICE_ATTR,
    KVM_CREATE_SPAPR_TCE_64,
}

impl Ioctl {
    /// Every ioctl, in declaration order.
    pub const ALL: [Ioctl; 20] = [
        Self::VFIO_GET_API_VERSION,
        Self::VFIO_CHECK_EXTENSION,
        Self::VFIO_SET_IOMMU,
        Self::VFIO_GROUP_GET_STATUS,
        Self::VFIO_GROUP_SET_CONTAINER,
        Self::VFIO_GROUP_UNSET_CONTAINER,
        Self::VFIO_IOMMU_SPAPR_TCE_GET_INFO,
        Self::VFIO_IOMMU_MAP_DMA,
        Self::VFIO_IOMMU_UNMAP_DMA,
        Self::VFIO_IOMMU_SPAPR_REGISTER_MEMORY,
        Self::VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY,
        Self::VFIO_IOMMU_SPAPR_TCE_CREATE,
        Self::VFIO_IOMMU_SPAPR_TCE_REMOVE,
        Self::VFIO_EEH_PE_OP,
        Self::KVM_CHECK_EXTENSION,
        Self::KVM_CREATE_VM,
        Self::KVM_CREATE_DEVICE,
        Self::KVM_SET_DEVICE_ATTR,
        Self::KVM_HAS_DEVICE_ATTR,
        Self::KVM_CREATE_SPAPR_TCE_64,
    ];

    /// The definition from the kernel headers: direction, type, nr and argument size. VFIO
    /// calls are all `_IO` (their structs carry `argsz` instead of an encoded size).
    pub const fn definition(self) -> (Dir, u8, u8, usize) {
        match self {
            Self::VFIO_GET_API_VERSION => vfio(0),
            Self::VFIO_CHECK_EXTENSION => vfio(1),
            Self::VFIO_SET_IOMMU => vfio(2),
            Self::VFIO_GROUP_GET_STATUS => vfio(3),
            Self::VFIO_GROUP_SET_CONTAINER => vfio(4),
            Self::VFIO_GROUP_UNSET_CONTAINER => vfio(5),
            Self::VFIO_IOMMU_SPAPR_TCE_GET_INFO => vfio(12),
            Self::VFIO_IOMMU_MAP_DMA => vfio(13),
            Self::VFIO_IOMMU_UNMAP_DMA => vfio(14),
            Self::VFIO_IOMMU_SPAPR_REGISTER_MEMORY => vfio(17),
            Self::VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY => vfio(18),
            Self::VFIO_IOMMU_SPAPR_TCE_CREATE => vfio(19),
            Self::VFIO_IOMMU_SPAPR_TCE_REMOVE => vfio(20),
            Self::VFIO_EEH_PE_OP => vfio(21),
            Self::KVM_CHECK_EXTENSION => (Dir::None, KVMIO, 0x03, 0),
            Self::KVM_CREATE_VM => (Dir::None, KVMIO, 0x01, 0),
            Self::KVM_CREATE_DEVICE => (Dir::ReadWrite, KVMIO, 0xe0, size_of::<KvmCreateDevice>()),
            Self::KVM_SET_DEVICE_ATTR => (Dir::Write, KVMIO, 0xe1, size_of::<KvmDeviceAttr>()),
            Self::KVM_HAS_DEVICE_ATTR => (Dir::Write, KVMIO, 0xe3, size_of::<KvmDeviceAttr>()),
            Self::KVM_CREATE_SPAPR_TCE_64 => {
                (Dir::Write, KVMIO, 0xa8, size_of::<KvmCreateSpaprTce64>())
            }
        }
    }

    /// The ioctl number on `arch`.
    pub const fn number(self, arch: IocArch) -> u32 {
        let (dir, ty, nr, size) = self.definition();
        ioc(arch, dir, ty, nr, size)
    }

    /// The ioctl number for the architecture this crate is compiled for, in libc's type.
    pub const fn native(self) -> libc::Ioctl {
        self.number(IocArch::NATIVE) as libc::Ioctl
    }

    /// The name of the C macro.
    pub const fn name(self) -> &'static str {
        match self {
            Self::VFIO_GET_API_VERSION => "VFIO_GET_API_VERSION",
            Self::VFIO_CHECK_EXTENSION => "VFIO_CHECK_EXTENSION",
            Self::VFIO_SET_IOMMU => "VFIO_SET_IOMMU",
            Self::VFIO_GROUP_GET_STATUS => "VFIO_GROUP_GET_STATUS",
            Self::VFIO_GROUP_SET_CONTAINER => "VFIO_GROUP_SET_CONTAINER",
            Self::VFIO_GROUP_UNSET_CONTAINER => "VFIO_GROUP_UNSET_CONTAINER",
            Self::VFIO_IOMMU_SPAPR_TCE_GET_INFO => "VFIO_IOMMU_SPAPR_TCE_GET_INFO",
            Self::VFIO_IOMMU_MAP_DMA => "VFIO_IOMMU_MAP_DMA",
            Self::VFIO_IOMMU_UNMAP_DMA => "VFIO_IOMMU_UNMAP_DMA",
            Self::VFIO_IOMMU_SPAPR_REGISTER_MEMORY => "VFIO_IOMMU_SPAPR_REGISTER_MEMORY",
            Self::VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY => "VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY",
            Self::VFIO_IOMMU_SPAPR_TCE_CREATE => "VFIO_IOMMU_SPAPR_TCE_CREATE",
            Self::VFIO_IOMMU_SPAPR_TCE_REMOVE => "VFIO_IOMMU_SPAPR_TCE_REMOVE",
            Self::VFIO_EEH_PE_OP => "VFIO_EEH_PE_OP",
            Self::KVM_CHECK_EXTENSION => "KVM_CHECK_EXTENSION",
            Self::KVM_CREATE_VM => "KVM_CREATE_VM",
            Self::KVM_CREATE_DEVICE => "KVM_CREATE_DEVICE",
            Self::KVM_SET_DEVICE_ATTR => "KVM_SET_DEVICE_ATTR",
            Self::KVM_HAS_DEVICE_ATTR => "KVM_HAS_DEVICE_ATTR",
            Self::KVM_CREATE_SPAPR_TCE_64 => "KVM_CREATE_SPAPR_TCE_64",
        }
    }

    /// Whether the kernel headers define the ioctl only for powerpc (its struct lives in
    /// powerpc's `asm/kvm.h`).
    pub const fn powerpc_only(self) -> bool {
        matches!(self, Self::KVM_CREATE_SPAPR_TCE_64)
    }

    /// The same number computed by libc's per-architecture `_IO`/`_IOW`/`_IOWR`, for the
    /// compile-time cross-check below.
    const fn libc_native(self) -> libc::Ioctl {
        let ty = VFIO_TYPE as u32;
        let base = VFIO_BASE as u32;
        let kvm = KVMIO as u32;
        match self {
            Self::VFIO_GET_API_VERSION => libc::_IO(ty, base),
            Self::VFIO_CHECK_EXTENSION => libc::_IO(ty, base + 1),
            Self::VFIO_SET_IOMMU => libc::_IO(ty, base + 2),
            Self::VFIO_GROUP_GET_STATUS => libc::_IO(ty, base + 3),
            Self::VFIO_GROUP_SET_CONTAINER => libc::_IO(ty, base + 4),
            Self::VFIO_GROUP_UNSET_CONTAINER => libc::_IO(ty, base + 5),
            Self::VFIO_IOMMU_SPAPR_TCE_GET_INFO => libc::_IO(ty, base + 12),
            Self::VFIO_IOMMU_MAP_DMA => libc::_IO(ty, base + 13),
            Self::VFIO_IOMMU_UNMAP_DMA => libc::_IO(ty, base + 14),
            Self::VFIO_IOMMU_SPAPR_REGISTER_MEMORY => libc::_IO(ty, base + 17),
            Self::VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY => libc::_IO(ty, base + 18),
            Self::VFIO_IOMMU_SPAPR_TCE_CREATE => libc::_IO(ty, base + 19),
            Self::VFIO_IOMMU_SPAPR_TCE_REMOVE => libc::_IO(ty, base + 20),
            Self::VFIO_EEH_PE_OP => libc::_IO(ty, base + 21),
            Self::KVM_CHECK_EXTENSION => libc::_IO(kvm, 0x03),
            Self::KVM_CREATE_VM => libc::_IO(kvm, 0x01),
            Self::KVM_CREATE_DEVICE => libc::_IOWR::<KvmCreateDevice>(kvm, 0xe0),
            Self::KVM_SET_DEVICE_ATTR => libc::_IOW::<KvmDeviceAttr>(kvm, 0xe1),
            Self::KVM_HAS_DEVICE_ATTR => libc::_IOW::<KvmDeviceAttr>(kvm, 0xe3),
            Self::KVM_CREATE_SPAPR_TCE_64 => libc::_IOW::<KvmCreateSpaprTce64>(kvm, 0xa8),
        }
    }
}

const fn vfio(offset: u8) -> (Dir, u8, u8, usize) {
    (Dir::None, VFIO_TYPE, VFIO_BASE + offset, 0)
}

// Our encoder and libc's must agree on the architecture being compiled for.
const _: () = {
    let mut i = 0;
    while i < Ioctl::ALL.len() {
        assert!(Ioctl::ALL[i].native() == Ioctl::ALL[i].libc_native());
        i += 1;
    }
};
// The number the design documents quote for both encodings.
const _: () = assert!(Ioctl::VFIO_GET_API_VERSION.number(IocArch::Powerpc) == 0x2000_3b64);
const _: () = assert!(Ioctl::VFIO_GET_API_VERSION.number(IocArch::Generic) == 0x3b64);

/// One size, offset or constant the crate relies on, named as the ABI test's C program names it:
/// `size.<struct>`, `offset.<struct>.<field>`, or the C macro's name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fact {
    pub name: &'static str,
    pub value: u64,
    /// Defined by the kernel headers of powerpc only.
    pub powerpc_only: bool,
}

const fn fact(name: &'static str, value: usize) -> Fact {
    Fact {
        name,
        value: value as u64,
        powerpc_only: false,
    }
}

const fn constant(name: &'static str, value: u64) -> Fact {
    Fact {
        name,
        value,
        powerpc_only: false,
    }
}

const fn powerpc_fact(name: &'static str, value: usize) -> Fact {
    Fact {
        name,
        value: value as u64,
        powerpc_only: true,
    }
}

/// Every struct size, field offset and constant the crate relies on. Layouts are the same on
/// every architecture the crate targets (fixed-width fields only), so one list serves all.
pub const FACTS: &[Fact] = &[
    constant("VFIO_API_VERSION", VFIO_API_VERSION as u64),
    constant("VFIO_SPAPR_TCE_v2_IOMMU", VFIO_SPAPR_TCE_v2_IOMMU as u64),
    constant("VFIO_EEH", VFIO_EEH as u64),
    constant("VFIO_GROUP_FLAGS_VIABLE", VFIO_GROUP_FLAGS_VIABLE as u64),
    constant(
        "VFIO_GROUP_FLAGS_CONTAINER_SET",
        VFIO_GROUP_FLAGS_CONTAINER_SET as u64,
    ),
    constant("VFIO_DMA_MAP_FLAG_READ", VFIO_DMA_MAP_FLAG_READ as u64),
    constant("VFIO_DMA_MAP_FLAG_WRITE", VFIO_DMA_MAP_FLAG_WRITE as u64),
    constant(
        "VFIO_IOMMU_SPAPR_INFO_DDW",
        VFIO_IOMMU_SPAPR_INFO_DDW as u64,
    ),
    constant("KVM_CAP_SPAPR_TCE_VFIO", KVM_CAP_SPAPR_TCE_VFIO as u64),
    constant("KVM_DEV_TYPE_VFIO", KVM_DEV_TYPE_VFIO as u64),
    constant("KVM_DEV_VFIO_GROUP", KVM_DEV_VFIO_FILE as u64),
    constant("KVM_DEV_VFIO_GROUP_ADD", KVM_DEV_VFIO_FILE_ADD),
    constant("KVM_DEV_VFIO_GROUP_DEL", KVM_DEV_VFIO_FILE_DEL),
    constant(
        "KVM_DEV_VFIO_GROUP_SET_SPAPR_TCE",
        KVM_DEV_VFIO_GROUP_SET_SPAPR_TCE,
    ),
    fact("size.vfio_group_status", size_of::<vfio_group_status>()),
    fact(
        "offset.vfio_group_status.flags",
        offset_of!(vfio_group_status, flags),
    ),
    fact(
        "size.vfio_iommu_spapr_tce_info",
        size_of::<vfio_iommu_spapr_tce_info>(),
    ),
    fact(
        "offset.vfio_iommu_spapr_tce_info.flags",
        offset_of!(vfio_iommu_spapr_tce_info, flags),
    ),
    fact(
        "offset.vfio_iommu_spapr_tce_info.dma32_window_start",
        offset_of!(vfio_iommu_spapr_tce_info, dma32_window_start),
    ),
    fact(
        "offset.vfio_iommu_spapr_tce_info.dma32_window_size",
        offset_of!(vfio_iommu_spapr_tce_info, dma32_window_size),
    ),
    fact(
        "offset.vfio_iommu_spapr_tce_info.ddw",
        offset_of!(vfio_iommu_spapr_tce_info, ddw),
    ),
    fact(
        "size.vfio_iommu_spapr_tce_ddw_info",
        size_of::<vfio_iommu_spapr_tce_ddw_info>(),
    ),
    fact(
        "offset.vfio_iommu_spapr_tce_ddw_info.pgsizes",
        offset_of!(vfio_iommu_spapr_tce_ddw_info, pgsizes),
    ),
    fact(
        "offset.vfio_iommu_spapr_tce_ddw_info.max_dynamic_windows_supported",
        offset_of!(vfio_iommu_spapr_tce_ddw_info, max_dynamic_windows_supported),
    ),
    fact(
        "offset.vfio_iommu_spapr_tce_ddw_info.levels",
        offset_of!(vfio_iommu_spapr_tce_ddw_info, levels),
    ),
    fact(
        "size.vfio_iommu_type1_dma_map",
        size_of::<vfio_iommu_type1_dma_map>(),
    ),
    fact(
        "offset.vfio_iommu_type1_dma_map.flags",
        offset_of!(vfio_iommu_type1_dma_map, flags),
    ),
    fact(
        "offset.vfio_iommu_type1_dma_map.vaddr",
        offset_of!(vfio_iommu_type1_dma_map, vaddr),
    ),
    fact(
        "offset.vfio_iommu_type1_dma_map.iova",
        offset_of!(vfio_iommu_type1_dma_map, iova),
    ),
    fact(
        "offset.vfio_iommu_type1_dma_map.size",
        offset_of!(vfio_iommu_type1_dma_map, size),
    ),
    fact(
        "size.vfio_iommu_type1_dma_unmap",
        size_of::<vfio_iommu_type1_dma_unmap>(),
    ),
    fact(
        "offset.vfio_iommu_type1_dma_unmap.flags",
        offset_of!(vfio_iommu_type1_dma_unmap, flags),
    ),
    fact(
        "offset.vfio_iommu_type1_dma_unmap.iova",
        offset_of!(vfio_iommu_type1_dma_unmap, iova),
    ),
    fact(
        "offset.vfio_iommu_type1_dma_unmap.size",
        offset_of!(vfio_iommu_type1_dma_unmap, size),
    ),
    fact(
        "size.vfio_iommu_spapr_register_memory",
        size_of::<vfio_iommu_spapr_register_memory>(),
    ),
    fact(
        "offset.vfio_iommu_spapr_register_memory.flags",
        offset_of!(vfio_iommu_spapr_register_memory, flags),
    ),
    fact(
        "offset.vfio_iommu_spapr_register_memory.vaddr",
        offset_of!(vfio_iommu_spapr_register_memory, vaddr),
    ),
    fact(
        "offset.vfio_iommu_spapr_register_memory.size",
        offset_of!(vfio_iommu_spapr_register_memory, size),
    ),
    fact(
        "size.vfio_iommu_spapr_tce_create",
        size_of::<vfio_iommu_spapr_tce_create>(),
    ),
    fact(
        "offset.vfio_iommu_spapr_tce_create.page_shift",
        offset_of!(vfio_iommu_spapr_tce_create, page_shift),
    ),
    fact(
        "offset.vfio_iommu_spapr_tce_create.window_size",
        offset_of!(vfio_iommu_spapr_tce_create, window_size),
    ),
    fact(
        "offset.vfio_iommu_spapr_tce_create.levels",
        offset_of!(vfio_iommu_spapr_tce_create, levels),
    ),
    fact(
        "offset.vfio_iommu_spapr_tce_create.start_addr",
        offset_of!(vfio_iommu_spapr_tce_create, start_addr),
    ),
    fact(
        "size.vfio_iommu_spapr_tce_remove",
        size_of::<vfio_iommu_spapr_tce_remove>(),
    ),
    fact(
        "offset.vfio_iommu_spapr_tce_remove.start_addr",
        offset_of!(vfio_iommu_spapr_tce_remove, start_addr),
    ),
    fact("size.vfio_eeh_pe_op", size_of::<vfio_eeh_pe_op>()),
    fact("offset.vfio_eeh_pe_op.op", offset_of!(vfio_eeh_pe_op, op)),
    fact(
        "offset.vfio_eeh_pe_op.err",
        offset_of!(vfio_eeh_pe_op, __bindgen_anon_1),
    ),
    fact("size.vfio_eeh_pe_err", size_of::<vfio_eeh_pe_err>()),
    fact(
        "offset.vfio_eeh_pe_err.type",
        offset_of!(vfio_eeh_pe_err, type_),
    ),
    fact(
        "offset.vfio_eeh_pe_err.func",
        offset_of!(vfio_eeh_pe_err, func),
    ),
    fact(
        "offset.vfio_eeh_pe_err.addr",
        offset_of!(vfio_eeh_pe_err, addr),
    ),
    fact(
        "offset.vfio_eeh_pe_err.mask",
        offset_of!(vfio_eeh_pe_err, mask),
    ),
    fact("size.kvm_device_attr", size_of::<KvmDeviceAttr>()),
    fact(
        "offset.kvm_device_attr.flags",
        offset_of!(KvmDeviceAttr, flags),
    ),
    fact(
        "offset.kvm_device_attr.group",
        offset_of!(KvmDeviceAttr, group),
    ),
    fact(
        "offset.kvm_device_attr.attr",
        offset_of!(KvmDeviceAttr, attr),
    ),
    fact(
        "offset.kvm_device_attr.addr",
        offset_of!(KvmDeviceAttr, addr),
    ),
    fact("size.kvm_vfio_spapr_tce", size_of::<KvmVfioSpaprTce>()),
    fact(
        "offset.kvm_vfio_spapr_tce.groupfd",
        offset_of!(KvmVfioSpaprTce, groupfd),
    ),
    fact(
        "offset.kvm_vfio_spapr_tce.tablefd",
        offset_of!(KvmVfioSpaprTce, tablefd),
    ),
    fact("size.kvm_create_device", size_of::<KvmCreateDevice>()),
    fact(
        "offset.kvm_create_device.type",
        offset_of!(KvmCreateDevice, type_),
    ),
    fact(
        "offset.kvm_create_device.fd",
        offset_of!(KvmCreateDevice, fd),
    ),
    fact(
        "offset.kvm_create_device.flags",
        offset_of!(KvmCreateDevice, flags),
    ),
    powerpc_fact(
        "size.kvm_create_spapr_tce_64",
        size_of::<KvmCreateSpaprTce64>(),
    ),
    powerpc_fact(
        "offset.kvm_create_spapr_tce_64.liobn",
        offset_of!(KvmCreateSpaprTce64, liobn),
    ),
    powerpc_fact(
        "offset.kvm_create_spapr_tce_64.page_shift",
        offset_of!(KvmCreateSpaprTce64, page_shift),
    ),
    powerpc_fact(
        "offset.kvm_create_spapr_tce_64.flags",
        offset_of!(KvmCreateSpaprTce64, flags),
    ),
    powerpc_fact(
        "offset.kvm_create_spapr_tce_64.offset",
        offset_of!(KvmCreateSpaprTce64, offset),
    ),
    powerpc_fact(
        "offset.kvm_create_spapr_tce_64.size",
        offset_of!(KvmCreateSpaprTce64, size),
    ),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioc_powerpc_write_struct_sets_direction_bit_31() {
        // KVM_SET_DEVICE_ATTR: _IOW(0xAE, 0xe1, 24 bytes); the rust-crates survey quotes
        // 0x8018aee1 on powerpc64 (vmm-sys-util's wrong 0x4018aee1 has the x86 write bit).
        assert_eq!(
            Ioctl::KVM_SET_DEVICE_ATTR.number(IocArch::Powerpc),
            0x8018_aee1
        );
        assert_eq!(
            Ioctl::KVM_SET_DEVICE_ATTR.number(IocArch::Generic),
            0x4018_aee1
        );
    }

    #[test]
    fn ioc_read_write_struct_same_bits_on_both_encodings() {
        // 3 << 30 == 6 << 29: _IOWR is the one encoding the two families share.
        assert_eq!(
            Ioctl::KVM_CREATE_DEVICE.number(IocArch::Powerpc),
            Ioctl::KVM_CREATE_DEVICE.number(IocArch::Generic)
        );
        assert_eq!(
            Ioctl::KVM_CREATE_DEVICE.number(IocArch::Generic),
            0xc00c_aee0
        );
    }

    #[test]
    fn ioc_size_at_powerpc_limit_panics() {
        let result = std::panic::catch_unwind(|| ioc(IocArch::Powerpc, Dir::Write, 0, 0, 1 << 13));
        assert!(result.is_err());
        assert_eq!(
            ioc(IocArch::Generic, Dir::Write, 0, 0, 1 << 13),
            0x6000_0000
        );
    }

    #[test]
    fn ioctl_names_unique() {
        let mut names: Vec<_> = Ioctl::ALL.iter().map(|i| i.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Ioctl::ALL.len());
    }

    #[test]
    fn facts_names_unique() {
        let mut names: Vec<_> = FACTS.iter().map(|f| f.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), FACTS.len());
    }
}
