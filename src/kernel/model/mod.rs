//! The `model` kernel backend: a simulation of the Linux calls the product makes — KVM (VM,
//! vCPU, KVM TCE tables, the kvm-vfio device), VFIO (groups, containers, the sPAPR TCE IOMMU
//! driver) and the guest's TCE hypercalls — enforcing the kernel's rules by caller identity.
//!
//! It owns: the simulated objects and their lifetimes, the per-process (mm) pre-registration
//! lists and locked-memory accounting, hardware TCE tables, and hypercall statistics. It is
//! designed at the kernel's own level: calls take an [`Mm`] (the calling process) and
//! [`FileId`]s (open files), not the product's ids, so an adapter translates `KernelOp`s into
//! model calls exactly as the `linux` backend translates them into ioctls.
//!
//! It must not be more permissive than Linux, nor invent rules: every check cites the kernel
//! function it mirrors, in the kernel's order, and where the kernel's behaviour was uncertain
//! the comment says so and follows the kernel's code (torvalds/linux `book3s_64_vio.c`,
//! `iommu_api.c`, linuxppc `vfio_iommu_spapr_tce.c` in its 6.4+ shape, `virt/kvm/vfio.c` 6.12+).
//!
//! The rules that shape the product (see `ARCHITECTURE.md` §1):
//! - **K1** — VM, vCPU and device ioctls from any mm but the VM creator's: `EIO`.
//! - **K2** — the container binds to the mm of its first `REGISTER_MEMORY`/`TCE_CREATE`/
//!   `TCE_REMOVE`; every later container ioctl but `VFIO_CHECK_EXTENSION` from another mm:
//!   `EPERM`. Pre-registered regions belong to the mm, shared by all its containers.
//! - **K3** — in-kernel `H_PUT_TCE` looks memory up in the VM creator's mm only; memory
//!   registered elsewhere makes every map exit to userspace (`H_TOO_HARD`).
//! - **K5** — `GROUP_SET_SPAPR_TCE` needs the same group file added with `FILE_ADD` and a
//!   hardware window with page size ≤, the same bus offset and size ≥ the KVM table's.
//! - **K6** — a KVM TCE table can be mapped by any process holding its file; entries are u64
//!   in host byte order (the kernel stores `tbl[idx] = tce`; QEMU reads them unswapped). Only
//!   the TCEs inside a guest's `H_PUT_TCE_INDIRECT` list are big-endian.
//! - **K7** — a KVM table with no hardware table attached completes `H_PUT_TCE` in the kernel
//!   and programs no IOMMU. And a KVM table attached while the container lives in another mm
//!   leaks pinned pages: the guest's unmap clears the hardware entry (`kvmppc_clear_tce`)
//!   after failing to find the region in the creator's mm, without `mm_iommu_mapped_dec`; the
//!   container owner's later `UNMAP_DMA` finds the entry empty and gives nothing back; its
//!   `UNREGISTER_MEMORY` then returns 0 (kernels since the `mm_iommu_get` rework; older ones
//!   returned `EBUSY`) but the region stays in the owner's mm, pinned and charged, until the
//!   process exits. `tests` demonstrates it.
//! - **K8** — only the virtual-mode hypercall handlers exist; `H_TOO_HARD` exits to userspace.
//!
//! What the model does not simulate, and how it behaves instead:
//! - Physical memory: a hardware TCE points at `(mm, user address)`, and user memory exists
//!   only where a process declared a mapping with [`ModelKernel::mm_map`] (the kernel fails to
//!   pin or read undeclared memory, as it fails for unmapped memory).
//! - Devices in groups, device fds, the host's own DMA windows (a group outside a container has
//!   none), interrupts, dirty tracking; KVM devices other than kvm-vfio (`ENODEV`); hypercalls
//!   other than the four TCE ones (`KVM_CAP_PPC_ENABLE_HCALL` refuses them with `EINVAL`).
//! - File lifetime: the model cannot see fds being closed, so [`ModelKernel::close`] says that
//!   userspace dropped its last fd of a file; references the kernel holds are counted.
//! - Where the kernel would write past a table's end (`MAP_DMA`/`UNMAP_DMA` whose range runs
//!   out of the window; the kernel checks only the first page), the model returns `EINVAL`.
//!
//! [`server`] makes the model usable from several real processes through stand-in fds. The
//! model has no `unsafe`: memfds are mapped through the kernel boundary's `SharedMapping`.
#![deny(unsafe_code)]

pub mod abi;
mod hcall;
mod kernel;
mod kvm;
pub mod server;
pub mod store;
mod vfio;

#[cfg(test)]
mod tests;

pub use abi::*;
pub use kernel::{FileArg, FileId, FileKind, HcallStats, HwTce, Mm, MmStats, ModelKernel};
pub use rustix::io::Errno;
