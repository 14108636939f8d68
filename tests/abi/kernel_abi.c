/*
 * Every ioctl number, struct size, field offset and constant tce-sidecar relies on, as the
 * kernel's uapi headers define them for the architecture this file is compiled for.
 *
 * Two ways to read the values (tests/kernel_abi.rs uses both):
 *  - built with -DABI_MAIN and run, it prints one "ABI <name> <value>" line per value;
 *  - compiled with -S (for a cross target whose programs cannot run here), each value appears
 *    in the assembly as a comment line "# ABI <name> <high> <low>", emitted by an asm statement
 *    whose operands are the constant's 32-bit halves. Nothing is executed, so no target libc is
 *    needed.
 *
 * Names: C macro names for ioctls and constants, size.<struct>, offset.<struct>.<field>.
 */
#include <stddef.h>
#include <linux/kvm.h>
#include <linux/vfio.h>

#define SIZE(s) V("size." #s, sizeof(struct s))
#define OFFSET(s, f) V("offset." #s "." #f, offsetof(struct s, f))
#define MACRO(m) V(#m, m)

#if defined(__powerpc__)
/* struct kvm_create_spapr_tce_64 lives in powerpc's asm/kvm.h only. */
#define POWERPC_VALUES                                                                         \
    MACRO(KVM_CREATE_SPAPR_TCE_64)                                                             \
    SIZE(kvm_create_spapr_tce_64)                                                              \
    OFFSET(kvm_create_spapr_tce_64, liobn)                                                     \
    OFFSET(kvm_create_spapr_tce_64, page_shift)                                                \
    OFFSET(kvm_create_spapr_tce_64, flags)                                                     \
    OFFSET(kvm_create_spapr_tce_64, offset)                                                    \
    OFFSET(kvm_create_spapr_tce_64, size)
#else
#define POWERPC_VALUES
#endif

#define ABI_VALUES                                                                             \
    MACRO(VFIO_GET_API_VERSION)                                                                \
    MACRO(VFIO_CHECK_EXTENSION)                                                                \
    MACRO(VFIO_SET_IOMMU)                                                                      \
    MACRO(VFIO_GROUP_GET_STATUS)                                                               \
    MACRO(VFIO_GROUP_SET_CONTAINER)                                                            \
    MACRO(VFIO_GROUP_UNSET_CONTAINER)                                                          \
    MACRO(VFIO_IOMMU_SPAPR_TCE_GET_INFO)                                                       \
    MACRO(VFIO_IOMMU_MAP_DMA)                                                                  \
    MACRO(VFIO_IOMMU_UNMAP_DMA)                                                                \
    MACRO(VFIO_IOMMU_SPAPR_REGISTER_MEMORY)                                                    \
    MACRO(VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY)                                                  \
    MACRO(VFIO_IOMMU_SPAPR_TCE_CREATE)                                                         \
    MACRO(VFIO_IOMMU_SPAPR_TCE_REMOVE)                                                         \
    MACRO(VFIO_EEH_PE_OP)                                                                      \
    MACRO(KVM_CHECK_EXTENSION)                                                                 \
    MACRO(KVM_CREATE_VM)                                                                       \
    MACRO(KVM_CREATE_DEVICE)                                                                   \
    MACRO(KVM_SET_DEVICE_ATTR)                                                                 \
    MACRO(KVM_HAS_DEVICE_ATTR)                                                                 \
    MACRO(VFIO_API_VERSION)                                                                    \
    MACRO(VFIO_SPAPR_TCE_v2_IOMMU)                                                             \
    MACRO(VFIO_EEH)                                                                            \
    MACRO(VFIO_GROUP_FLAGS_VIABLE)                                                             \
    MACRO(VFIO_GROUP_FLAGS_CONTAINER_SET)                                                      \
    MACRO(VFIO_DMA_MAP_FLAG_READ)                                                              \
    MACRO(VFIO_DMA_MAP_FLAG_WRITE)                                                             \
    MACRO(VFIO_IOMMU_SPAPR_INFO_DDW)                                                           \
    MACRO(KVM_CAP_SPAPR_TCE_VFIO)                                                              \
    MACRO(KVM_DEV_TYPE_VFIO)                                                                   \
    MACRO(KVM_DEV_VFIO_GROUP)                                                                  \
    MACRO(KVM_DEV_VFIO_GROUP_ADD)                                                              \
    MACRO(KVM_DEV_VFIO_GROUP_DEL)                                                              \
    MACRO(KVM_DEV_VFIO_GROUP_SET_SPAPR_TCE)                                                    \
    SIZE(vfio_group_status)                                                                    \
    OFFSET(vfio_group_status, flags)                                                           \
    SIZE(vfio_iommu_spapr_tce_info)                                                            \
    OFFSET(vfio_iommu_spapr_tce_info, flags)                                                   \
    OFFSET(vfio_iommu_spapr_tce_info, dma32_window_start)                                      \
    OFFSET(vfio_iommu_spapr_tce_info, dma32_window_size)                                       \
    OFFSET(vfio_iommu_spapr_tce_info, ddw)                                                     \
    SIZE(vfio_iommu_spapr_tce_ddw_info)                                                        \
    OFFSET(vfio_iommu_spapr_tce_ddw_info, pgsizes)                                             \
    OFFSET(vfio_iommu_spapr_tce_ddw_info, max_dynamic_windows_supported)                       \
    OFFSET(vfio_iommu_spapr_tce_ddw_info, levels)                                              \
    SIZE(vfio_iommu_type1_dma_map)                                                             \
    OFFSET(vfio_iommu_type1_dma_map, flags)                                                    \
    OFFSET(vfio_iommu_type1_dma_map, vaddr)                                                    \
    OFFSET(vfio_iommu_type1_dma_map, iova)                                                     \
    OFFSET(vfio_iommu_type1_dma_map, size)                                                     \
    SIZE(vfio_iommu_type1_dma_unmap)                                                           \
    OFFSET(vfio_iommu_type1_dma_unmap, flags)                                                  \
    OFFSET(vfio_iommu_type1_dma_unmap, iova)                                                   \
    OFFSET(vfio_iommu_type1_dma_unmap, size)                                                   \
    SIZE(vfio_iommu_spapr_register_memory)                                                     \
    OFFSET(vfio_iommu_spapr_register_memory, flags)                                            \
    OFFSET(vfio_iommu_spapr_register_memory, vaddr)                                            \
    OFFSET(vfio_iommu_spapr_register_memory, size)                                             \
    SIZE(vfio_iommu_spapr_tce_create)                                                          \
    OFFSET(vfio_iommu_spapr_tce_create, page_shift)                                            \
    OFFSET(vfio_iommu_spapr_tce_create, window_size)                                           \
    OFFSET(vfio_iommu_spapr_tce_create, levels)                                                \
    OFFSET(vfio_iommu_spapr_tce_create, start_addr)                                            \
    SIZE(vfio_iommu_spapr_tce_remove)                                                          \
    OFFSET(vfio_iommu_spapr_tce_remove, start_addr)                                            \
    SIZE(vfio_eeh_pe_op)                                                                       \
    OFFSET(vfio_eeh_pe_op, op)                                                                 \
    OFFSET(vfio_eeh_pe_op, err)                                                                \
    SIZE(vfio_eeh_pe_err)                                                                      \
    OFFSET(vfio_eeh_pe_err, type)                                                              \
    OFFSET(vfio_eeh_pe_err, func)                                                              \
    OFFSET(vfio_eeh_pe_err, addr)                                                              \
    OFFSET(vfio_eeh_pe_err, mask)                                                              \
    SIZE(kvm_device_attr)                                                                      \
    OFFSET(kvm_device_attr, flags)                                                             \
    OFFSET(kvm_device_attr, group)                                                             \
    OFFSET(kvm_device_attr, attr)                                                              \
    OFFSET(kvm_device_attr, addr)                                                              \
    SIZE(kvm_vfio_spapr_tce)                                                                   \
    OFFSET(kvm_vfio_spapr_tce, groupfd)                                                        \
    OFFSET(kvm_vfio_spapr_tce, tablefd)                                                        \
    SIZE(kvm_create_device)                                                                    \
    OFFSET(kvm_create_device, type)                                                            \
    OFFSET(kvm_create_device, fd)                                                              \
    OFFSET(kvm_create_device, flags)                                                           \
    POWERPC_VALUES

/*
 * The assembly form: "%c0" prints a constant operand bare on every GCC target. x86_64 takes
 * only 32-bit signed immediates, so each value travels as two 32-bit halves (high, low), which
 * the reader reassembles; a half at or above 2^31 prints as a negative number.
 */
#define V(name, value)                                                                         \
    __asm__ volatile("# ABI " name " %c0 %c1"                                                  \
                     :                                                                         \
                     : "i"((int)((unsigned long long)(value) >> 32)),                          \
                       "i"((int)((unsigned long long)(value) & 0xffffffffu)));
void tce_sidecar_abi_values(void)
{
    ABI_VALUES
}
#undef V

#ifdef ABI_MAIN
#include <stdio.h>
#define V(name, value) printf("ABI %s %llu\n", name, (unsigned long long)(value));
int main(void)
{
    ABI_VALUES
    return 0;
}
#undef V
#endif
