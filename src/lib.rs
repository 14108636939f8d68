//! tce-sidecar: an out-of-process sPAPR IOMMU backend for QEMU on POWER KVM hosts.
//!
//! QEMU (the front-end) connects over a unix socket and hands the sidecar (the back-end) its
//! VFIO groups, KVM TCE tables and guest RAM; the sidecar runs the sPAPR DMA state machine.
//! The wire contract is written down in `protocol/PROTOCOL.md` and implemented in [`protocol`];
//! the kernel calls and the process the kernel lets make each are in [`kernel`].

pub mod client;
pub mod conformance;
pub mod daemon;
pub mod engine;
pub mod kernel;
pub mod libvirt;
pub mod protocol;
