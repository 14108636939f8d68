//! The refusal helper: a process that is neither the VM's creator nor the container's owner.

use std::os::fd::{AsFd, OwnedFd};

use tce_sidecar::kernel::abi::{self, IocArch, Ioctl};
use tce_sidecar::kernel::linux::{self, Linux};
use tce_sidecar::kernel::{Errno, GroupId, Kernel, KernelOp, TableId};

use crate::kvm::ioctl_ptr;
use crate::scenario::Error;
use crate::vm::Fds;

/// A copy (pidfd_getfd) of the first fd of process `pid` whose link satisfies `want`.
fn grab(pid: u32, want: impl Fn(&str) -> bool) -> Result<Option<OwnedFd>, Error> {
    let pidfd = rustix::process::pidfd_open(
        rustix::process::Pid::from_raw(pid as i32).ok_or("bad pid")?,
        rustix::process::PidfdFlags::empty(),
    )?;
    let mut fds: Vec<(i32, String)> = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let entry = entry?;
        let Ok(n) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(link) = std::fs::read_link(entry.path()) {
            fds.push((n, link.to_string_lossy().into_owned()));
        }
    }
    fds.sort();
    for (n, link) in fds {
        if want(&link) {
            let fd =
                rustix::process::pidfd_getfd(&pidfd, n, rustix::process::PidfdGetfdFlags::empty())?;
            return Ok(Some(fd));
        }
    }
    Ok(None)
}

fn errno_of<T>(r: Result<T, Errno>) -> i32 {
    r.map_or_else(|e| e.raw_os_error(), |_| 0)
}

pub(crate) fn check_refusals(vm_pid: u32, container_pid: u32) -> Result<(), Error> {
    let is_group = |l: &str| {
        l.strip_prefix("/dev/vfio/")
            .is_some_and(|n| n.chars().all(|c| c.is_ascii_digit()))
    };
    let objects = Fds {
        group: grab(vm_pid, is_group)?,
        table: grab(vm_pid, |l| l == "anon_inode:kvm-spapr-tce")?,
        device: grab(vm_pid, |l| l == "anon_inode:kvm-vfio")?,
    };
    if objects.device.is_none() || objects.group.is_none() {
        return Err("the VM creator has no kvm-vfio device or group open".into());
    }
    // KVM refuses every device ioctl from outside the VM creator's mm before it reads the
    // payload; without a KVM table (isolated mode) the group stands in for the table fd.
    let objects = Fds {
        table: objects
            .table
            .or(objects.group.as_ref().map(|g| g.try_clone()).transpose()?),
        ..objects
    };
    let eio = errno_of(Linux::new().execute(
        &KernelOp::KvmSetSpaprTce {
            group: GroupId(0),
            table: TableId(0),
        },
        &objects,
    ));
    let container = grab(container_pid, |l| l == linux::VFIO_CONTAINER_PATH)?
        .ok_or("the container owner has no container open")?;
    let mut info = abi::vfio_iommu_spapr_tce_info {
        argsz: size_of::<abi::vfio_iommu_spapr_tce_info>() as u32,
        ..Default::default()
    };
    // SAFETY: VFIO_IOMMU_SPAPR_TCE_GET_INFO writes a `struct vfio_iommu_spapr_tce_info`
    // (vfio-bindings) within its `argsz`.
    let eperm = errno_of(unsafe {
        ioctl_ptr(
            container.as_fd(),
            Ioctl::VFIO_IOMMU_SPAPR_TCE_GET_INFO.number(IocArch::NATIVE),
            &mut info,
        )
    });
    println!("REFUSALS eio={eio} eperm={eperm}");
    Ok(())
}
