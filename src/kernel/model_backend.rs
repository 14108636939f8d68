//! The product's [`KernelOp`]s executed on the model kernel: each op becomes the model call that
//! stands for the ioctl the `linux` backend would make, on the stand-in fds the caller holds.
//!
//! It keeps the containers it opened, as the `linux` backend does; every other fd and address
//! comes from the caller's [`Objects`]. It decides nothing: the model answers as the kernel
//! would, and its errno is returned unchanged.
#![deny(unsafe_code)]

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use super::linux::{address_in, changed_nothing_if_positive, dma_flags, read_tces};
use super::model::server::{CallError, ModelClient};

use super::model::{DmaMap, DmaUnmap, EehPeOp, FileKind, RegisterMemory, TceCreate, TceRemove};
use super::{ContainerId, Errno, GroupStatus, Kernel, KernelOp, Objects, Output};
use crate::protocol::TceInfo;

/// `VFIO_GROUP_FLAGS_VIABLE` and `VFIO_GROUP_FLAGS_CONTAINER_SET`.
const GROUP_VIABLE: u64 = 1;
const GROUP_CONTAINER_SET: u64 = 2;

/// A process's kernel, simulated: its calls are made as this process on the model.
pub struct ModelBackend {
    client: ModelClient,
    containers: HashMap<ContainerId, OwnedFd>,
}

fn errno(e: CallError) -> Errno {
    // A broken connection to the model is this process losing its kernel: an I/O error.
    e.errno().unwrap_or(Errno::IO)
}

impl ModelBackend {
    pub fn new(client: ModelClient) -> Self {
        Self {
            client,
            containers: HashMap::new(),
        }
    }

    pub fn client(&self) -> &ModelClient {
        &self.client
    }

    /// The stand-in fd of a container this backend opened (for inspecting the model).
    pub fn container_fd(&self, id: ContainerId) -> Option<BorrowedFd<'_>> {
        self.containers.get(&id).map(|fd| fd.as_fd())
    }

    /// Tells the model this process closed every container it opened (the model cannot see
    /// fds close), as happens when the process exits.
    pub fn close_containers(&mut self) -> Result<(), Errno> {
        for (_, fd) in std::mem::take(&mut self.containers) {
            self.client.close(fd.as_fd()).map_err(errno)?;
        }
        Ok(())
    }

    fn container(&self, id: ContainerId) -> Result<BorrowedFd<'_>, Errno> {
        self.containers
            .get(&id)
            .map(|fd| fd.as_fd())
            .ok_or(Errno::BADF)
    }
}

impl Kernel for ModelBackend {
    fn is_tce_table(&mut self, fd: BorrowedFd<'_>) -> Result<bool, Errno> {
        let kind = self.client.file_kind(fd).map_err(errno)?;
        Ok(kind == Some(FileKind::SpaprTce))
    }

    fn execute(&mut self, op: &KernelOp, objects: &dyn Objects) -> Result<Output, Errno> {
        let c = &self.client;
        let group = |id| objects.group(id).ok_or(Errno::BADF);
        let device = || objects.kvm_vfio_device().ok_or(Errno::BADF);
        let done = |r: Result<(), CallError>| r.map(|()| Output::Done).map_err(errno);
        match *op {
            KernelOp::ContainerOpen { container } => {
                if self.containers.contains_key(&container) {
                    return Err(Errno::EXIST);
                }
                let fd = c.open_vfio_container().map_err(errno)?;
                let version = c.vfio_get_api_version(fd.as_fd()).map_err(errno)?;
                self.containers.insert(container, fd);
                Ok(Output::ApiVersion(version as u32))
            }
            KernelOp::ContainerClose { container } => {
                let fd = self.containers.remove(&container).ok_or(Errno::BADF)?;
                // The model cannot see an fd close: tell it this process dropped its last one.
                done(c.close(fd.as_fd()))
            }
            KernelOp::CheckExtension {
                container,
                extension,
            } => {
                let v = c
                    .vfio_check_extension(self.container(container)?, extension)
                    .map_err(errno)?;
                Ok(Output::Value(v as u32))
            }
            KernelOp::SetIommu {
                container,
                iommu_type,
            } => done(c.vfio_set_iommu(self.container(container)?, iommu_type)),
            KernelOp::GroupGetStatus { group: id } => {
                let flags = c.vfio_group_get_status(group(id)?).map_err(errno)?;
                Ok(Output::GroupStatus(GroupStatus {
                    viable: flags & GROUP_VIABLE != 0,
                    container_set: flags & GROUP_CONTAINER_SET != 0,
                }))
            }
            KernelOp::GroupSetContainer {
                container,
                group: id,
            } => done(c.vfio_group_set_container(group(id)?, Some(self.container(container)?))),
            KernelOp::GroupUnsetContainer { group: id, .. } => {
                done(c.vfio_group_unset_container(group(id)?))
            }
            KernelOp::TceGetInfo { container } => {
                let info = c
                    .vfio_spapr_tce_get_info(self.container(container)?)
                    .map_err(errno)?;
                Ok(Output::TceInfo(TceInfo {
                    flags: info.flags,
                    dma32_window_start: info.dma32_window_start,
                    dma32_window_size: info.dma32_window_size,
                    pgsizes: info.pgsizes,
                    max_dynamic_windows: info.max_dynamic_windows_supported,
                    levels: info.levels,
                }))
            }
            KernelOp::RegisterMemory {
                container,
                region,
                offset,
                size,
            } => {
                let vaddr = address_in(objects, region, offset, size)?;
                done(c.vfio_register_memory(
                    self.container(container)?,
                    RegisterMemory::new(vaddr, size),
                ))
            }
            KernelOp::UnregisterMemory {
                container,
                region,
                offset,
                size,
            } => {
                let vaddr = address_in(objects, region, offset, size)?;
                done(c.vfio_unregister_memory(
                    self.container(container)?,
                    RegisterMemory::new(vaddr, size),
                ))
            }
            KernelOp::TceCreate {
                container,
                page_shift,
                window_size,
                levels,
            } => {
                let start = c
                    .vfio_tce_create(
                        self.container(container)?,
                        TceCreate::new(page_shift, window_size, levels),
                    )
                    .map_err(errno)?;
                Ok(Output::StartAddr(start))
            }
            KernelOp::TceRemove {
                container,
                start_addr,
            } => done(c.vfio_tce_remove(self.container(container)?, TceRemove::new(start_addr))),
            KernelOp::MapDma {
                container,
                region,
                offset,
                iova,
                size,
                access,
            } => {
                let vaddr = address_in(objects, region, offset, size)?;
                let map = DmaMap {
                    flags: dma_flags(access),
                    ..DmaMap::new(vaddr, iova, size)
                };
                let ret = c
                    .vfio_map_dma(self.container(container)?, map)
                    .map_err(errno)?;
                changed_nothing_if_positive(ret)?;
                Ok(Output::Done)
            }
            KernelOp::UnmapDma {
                container,
                iova,
                size,
            } => {
                let ret = c
                    .vfio_unmap_dma(self.container(container)?, DmaUnmap::new(iova, size))
                    .map_err(errno)?;
                changed_nothing_if_positive(ret)?;
                // As on Linux, the sPAPR driver clears the whole range or fails.
                Ok(Output::Unmapped(size))
            }
            KernelOp::EehPeOp {
                container,
                op,
                err_type,
                err_func,
                err_addr,
                err_mask,
            } => {
                let arg = EehPeOp {
                    err_type,
                    err_func,
                    err_addr,
                    err_mask,
                    ..EehPeOp::new(op)
                };
                let v = c
                    .vfio_eeh_pe_op(self.container(container)?, arg)
                    .map_err(errno)?;
                Ok(Output::Value(v as u32))
            }
            KernelOp::KvmFileAdd { group: id } => {
                done(c.kvm_vfio_file_add(device()?, Some(group(id)?)))
            }
            KernelOp::KvmFileDel { group: id } => {
                done(c.kvm_vfio_file_del(device()?, Some(group(id)?)))
            }
            KernelOp::KvmSetSpaprTce { group: id, table } => {
                let table = objects.table(table).ok_or(Errno::BADF)?;
                done(c.kvm_vfio_set_spapr_tce(device()?, Some(group(id)?), Some(table.fd)))
            }
            KernelOp::KvmHasDeviceAttr { attr_group, attr } => {
                done(c.kvm_has_device_attr(device()?, attr_group, attr))
            }
            // The stand-in of a KVM TCE table is a memfd of host-order entries: read it by mmap
            // exactly as a real table fd (K6).
            KernelOp::ReadTces {
                table,
                first_index,
                count,
            } => {
                let table = objects.table(table).ok_or(Errno::BADF)?;
                read_tces(table, first_index, count).map(Output::Tces)
            }
        }
    }

    fn memory_mapped(
        &mut self,
        fd: BorrowedFd<'_>,
        offset: u64,
        addr: u64,
        size: u64,
    ) -> Result<(), Errno> {
        let page_shift = rustix::param::page_size().trailing_zeros();
        self.client
            .mm_map(fd, addr, size, offset, page_shift, true)
            .map_err(errno)
    }

    fn memory_unmapped(&mut self, addr: u64) -> Result<(), Errno> {
        self.client.mm_unmap(addr).map_err(errno)
    }
}

impl Drop for ModelBackend {
    /// Dropping the backend closes the containers it opened, as dropping their fds would on
    /// Linux; the model cannot see fds close, so it is told.
    fn drop(&mut self) {
        let _ = self.close_containers();
    }
}
