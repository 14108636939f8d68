//! libvirt integration: one sidecar per VM, started and stopped by a libvirt hook, as libvirt
//! runs its own helpers (qemu-pr-helper, virtiofsd, passt, swtpm). libvirt cannot start this
//! helper itself, so the hook does, from what the domain's XML says.
//!
//! - [`domain`]: what the hook reads of a domain, and `tce-sidecar libvirt-xml`;
//! - [`hook`]: `tce-sidecar libvirt-hook`, run by libvirt from `qemu.d`;
//! - [`install`]: `tce-sidecar libvirt-install` / `libvirt-uninstall`;
//! - [`config`]: the hook's configuration, `/etc/tce-sidecar/libvirt.conf`.

pub mod config;
pub mod domain;
pub mod hook;
pub mod install;
mod tree;

pub use tree::XmlError;
