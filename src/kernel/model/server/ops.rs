//! The op table of the model kernel protocol: each request's code and how many words it
//! carries, with the arguments and results documented per op.

macro_rules! ops {
    ($($(#[$doc:meta])* $name:ident = $code:literal, $words:literal;)*) => {
        /// Requests of the model kernel protocol. Arguments are listed as `[words]`; `fd:` marks a
        /// word that indexes the frame's fds.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        #[repr(u32)]
        pub enum Op { $($(#[$doc])* $name = $code,)* }

        impl Op {
            /// The op with this code.
            pub fn from_u32(code: u32) -> Option<Self> {
                match code { $($code => Some(Self::$name),)* _ => None }
            }

            /// How many u64 words the request carries.
            pub fn words(self) -> usize {
                match self { $(Self::$name => $words,)* }
            }
        }
    };
}

ops! {
    /// `open("/dev/kvm")` `[]` → fd.
    OpenKvm = 1, 0;
    /// `open("/dev/vfio/vfio")` `[]` → fd.
    OpenVfioContainer = 2, 0;
    /// `open("/dev/vfio/N")` `[N]` → fd.
    OpenVfioGroup = 3, 1;
    /// The caller dropped its last fd of a file `[fd:file]`.
    Close = 4, 1;
    /// `KVM_CREATE_VM` `[fd:kvm]` → fd.
    KvmCreateVm = 5, 1;
    /// `KVM_CHECK_EXTENSION` `[fd:kvm-or-vm, cap]` → `[value]`.
    KvmCheckExtension = 6, 2;
    /// `KVM_CREATE_VCPU` `[fd:vm, id]` → fd.
    KvmCreateVcpu = 7, 2;
    /// `KVM_ENABLE_CAP(KVM_CAP_PPC_ENABLE_HCALL)` `[fd:vm, hcall, enable]`.
    KvmEnableHcall = 8, 3;
    /// `KVM_SET_USER_MEMORY_REGION` `[fd:vm, slot, flags, gpa, size, ua]`.
    KvmSetUserMemoryRegion = 9, 6;
    /// `KVM_CREATE_SPAPR_TCE_64` `[fd:vm, liobn, page_shift, flags, offset, size]` → fd.
    KvmCreateSpaprTce64 = 10, 6;
    /// `KVM_CREATE_DEVICE` `[fd:vm, type, flags]` → fd (none with `KVM_CREATE_DEVICE_TEST`).
    KvmCreateDevice = 11, 3;
    /// `KVM_SET_DEVICE_ATTR` `[fd:device, group, attr, fd:a, fd:b]`: `FILE_ADD`/`FILE_DEL` take
    /// their file in `a`; `GROUP_SET_SPAPR_TCE` takes the group in `a` and the table in `b`.
    KvmSetDeviceAttr = 12, 5;
    /// `KVM_HAS_DEVICE_ATTR` `[fd:device, group, attr]`.
    KvmHasDeviceAttr = 13, 3;
    /// `KVM_GET_DEVICE_ATTR` `[fd:device, group, attr]`.
    KvmGetDeviceAttr = 14, 3;
    /// `KVM_RUN` up to the guest's hypercall `[fd:vcpu, number, r4, r5, r6, r7]` →
    /// `[exited, r3, r4]`.
    VcpuHcall = 15, 6;
    /// `VFIO_GROUP_GET_STATUS` `[fd:group]` → `[flags]`.
    VfioGroupGetStatus = 16, 1;
    /// `VFIO_GROUP_SET_CONTAINER` `[fd:group, fd:container]`.
    VfioGroupSetContainer = 17, 2;
    /// `VFIO_GROUP_UNSET_CONTAINER` `[fd:group]`.
    VfioGroupUnsetContainer = 18, 1;
    /// `VFIO_GET_API_VERSION` `[fd:container]` → `[version]`.
    VfioGetApiVersion = 19, 1;
    /// `VFIO_CHECK_EXTENSION` `[fd:container, extension]` → `[value]`.
    VfioCheckExtension = 20, 2;
    /// `VFIO_SET_IOMMU` `[fd:container, type]`.
    VfioSetIommu = 21, 2;
    /// `VFIO_IOMMU_ENABLE` `[fd:container]`.
    VfioIommuEnable = 22, 1;
    /// `VFIO_IOMMU_DISABLE` `[fd:container]`.
    VfioIommuDisable = 23, 1;
    /// `VFIO_IOMMU_SPAPR_TCE_GET_INFO` `[fd:container, argsz]` →
    /// `[flags, dma32_start, dma32_size, pgsizes, max_dynamic_windows, levels]`.
    SpaprTceGetInfo = 24, 2;
    /// `VFIO_IOMMU_SPAPR_REGISTER_MEMORY` `[fd:container, argsz, flags, vaddr, size]`.
    RegisterMemory = 25, 5;
    /// `VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY` `[fd:container, argsz, flags, vaddr, size]`.
    UnregisterMemory = 26, 5;
    /// `VFIO_IOMMU_SPAPR_TCE_CREATE` `[fd:container, argsz, flags, page_shift, window_size,
    /// levels]` → `[start_addr]`.
    TceCreate = 27, 6;
    /// `VFIO_IOMMU_SPAPR_TCE_REMOVE` `[fd:container, argsz, flags, start_addr]`.
    TceRemove = 28, 4;
    /// `VFIO_IOMMU_MAP_DMA` `[fd:container, argsz, flags, vaddr, iova, size]` → `[value]`.
    MapDma = 29, 6;
    /// `VFIO_IOMMU_UNMAP_DMA` `[fd:container, argsz, flags, iova, size]` → `[value]`.
    UnmapDma = 30, 5;
    /// `VFIO_EEH_PE_OP` `[fd:container, argsz, flags, op, err_type, err_func, err_addr,
    /// err_mask]` → `[value]`.
    EehPeOp = 31, 8;
    /// Model only: the caller maps `len` bytes of a memfd from `offset` at `ua`
    /// `[fd:memfd, ua, len, offset, page_shift, writable]`.
    MmMap = 32, 6;
    /// Model only: the caller unmapped the mapping starting at `ua` `[ua]`.
    MmUnmap = 33, 1;
    /// Model only: locked and pinned memory of a process `[pid or 0 for the caller]` →
    /// `[locked_vm_pages, pinned_pages, prereg_regions]`.
    MmStats = 34, 1;
    /// Model only: hypercall counters of a VM `[fd:vm-vcpu-or-table]` → `[in_kernel, exits]`.
    HcallStats = 35, 1;
    /// Model only: what a group's IOMMU holds for a bus address `[group, bus_addr]` →
    /// `[present, pid, ua, permission bits]`.
    IommuEntry = 36, 2;
    /// What `readlink(/proc/self/fd/N)` would show of a file `[fd:file]` → `[kind]`: 0 for a
    /// file the model does not know, else [`FileKind::code`].
    ///
    /// [`FileKind::code`]: crate::kernel::model::FileKind::code
    FileKind = 37, 1;
}
