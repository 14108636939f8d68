//! Exhaustive tests of the pure model: one case per rule and error code, named
//! `subject_condition_outcome`, plus the K1/K2/K3/K7 scenarios.

use std::sync::Arc;

use super::store::VecMemory;
use super::*;

const QEMU: Mm = Mm(100);
const SIDECAR: Mm = Mm(200);
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// Guest RAM: 64 MiB at guest physical 0, mapped by QEMU at `QEMU_UA`, by the sidecar (from the
/// same memfd) at `SIDECAR_UA`.
const RAM: u64 = 64 * MIB;
const QEMU_UA: u64 = 0x7f00_0000_0000;
const SIDECAR_UA: u64 = 0x7e00_0000_0000;
const LIOBN: u64 = 0x8000_0000;
/// The product's first window: 4K pages, 256 MiB at bus address 0.
const WIN: u64 = 256 * MIB;

struct Fx {
    k: ModelKernel,
    ram: VecMemory,
    vm: FileId,
    vcpu: FileId,
    container: FileId,
    group: FileId,
    dev: Option<FileId>,
    table: Option<FileId>,
}

impl Fx {
    /// A VM of QEMU with one vCPU and guest RAM in a memslot; an empty container; group 1 open.
    fn bare_on(platform: Platform) -> Self {
        let mut k = ModelKernel::new(platform, &[1, 2]);
        let ram = VecMemory::new(RAM as usize);
        k.mm_map(QEMU, QEMU_UA, RAM, true, 12, Arc::new(ram.clone()), 0)
            .unwrap();
        let kvm = k.open_kvm();
        let vm = k.kvm_create_vm(QEMU, kvm).unwrap();
        let vcpu = k.kvm_create_vcpu(QEMU, vm, 0).unwrap();
        k.kvm_set_user_memory_region(
            QEMU,
            vm,
            UserMemoryRegion {
                slot: 0,
                flags: 0,
                guest_phys_addr: 0,
                memory_size: RAM,
                userspace_addr: QEMU_UA,
            },
        )
        .unwrap();
        let container = k.open_vfio_container();
        let group = k.open_vfio_group(1).unwrap();
        Fx {
            k,
            ram,
            vm,
            vcpu,
            container,
            group,
            dev: None,
            table: None,
        }
    }

    fn bare() -> Self {
        Self::bare_on(Platform::powernv())
    }

    /// `bare` plus the group in the container and the v2 IOMMU set.
    fn attached() -> Self {
        let mut f = Self::bare();
        f.k.vfio_group_set_container(f.group, FileArg::File(f.container))
            .unwrap();
        f.k.vfio_set_iommu(f.container, VFIO_SPAPR_TCE_V2_IOMMU)
            .unwrap();
        f
    }

    /// The container owned by `owner`, which registered its view of guest RAM and replaced the
    /// default window by a 4K 256 MiB window at 0; QEMU's KVM table for it and the kvm-vfio
    /// device with the group added.
    fn windowed(owner: Mm) -> Self {
        let mut f = Self::attached();
        let ua = f.owner_ram(owner);
        f.k.vfio_register_memory(owner, f.container, RegisterMemory::new(ua, RAM))
            .unwrap();
        f.k.vfio_tce_remove(owner, f.container, TceRemove::new(0))
            .unwrap();
        assert_eq!(
            f.k.vfio_tce_create(owner, f.container, TceCreate::new(12, WIN, 1)),
            Ok(0)
        );
        f.table = Some(f.kvm_table(LIOBN, 12, 0, WIN >> 12).unwrap());
        let dev =
            f.k.kvm_create_device(QEMU, f.vm, KVM_DEV_TYPE_VFIO, 0)
                .unwrap();
        f.dev = dev;
        f.k.kvm_vfio_file_add(QEMU, f.dev(), FileArg::File(f.group))
            .unwrap();
        f
    }

    /// `windowed` plus the association (QEMU's `GROUP_SET_SPAPR_TCE`).
    fn associated(owner: Mm) -> Self {
        let mut f = Self::windowed(owner);
        f.set_spapr_tce(QEMU, FileArg::File(f.group), FileArg::File(f.table()))
            .unwrap();
        f
    }

    /// The address at which `owner` sees guest RAM (the sidecar maps it on first use).
    fn owner_ram(&mut self, owner: Mm) -> u64 {
        if owner == QEMU {
            return QEMU_UA;
        }
        let ram = Arc::new(self.ram.clone());
        match self.k.mm_map(owner, SIDECAR_UA, RAM, true, 12, ram, 0) {
            Ok(()) | Err(Errno::EXIST) => SIDECAR_UA,
            Err(e) => panic!("mapping the sidecar's view of RAM: {e:?}"),
        }
    }

    fn dev(&self) -> FileId {
        self.dev.expect("device created")
    }

    fn table(&self) -> FileId {
        self.table.expect("table created")
    }

    fn kvm_table(
        &mut self,
        liobn: u64,
        page_shift: u32,
        offset: u64,
        size: u64,
    ) -> Result<FileId, Errno> {
        let args = CreateSpaprTce64 {
            liobn,
            page_shift,
            flags: 0,
            offset,
            size,
        };
        self.k.kvm_create_spapr_tce_64(QEMU, self.vm, args)
    }

    fn set_spapr_tce(&mut self, caller: Mm, group: FileArg, table: FileArg) -> Result<(), Errno> {
        let dev = self.dev();
        self.k.kvm_vfio_set_spapr_tce(caller, dev, group, table)
    }

    fn hcall(&mut self, hcall: Hcall) -> HcallOutcome {
        self.k.vcpu_hcall(QEMU, self.vcpu, hcall).unwrap()
    }

    fn put_tce(&mut self, ioba: u64, tce: u64) -> HcallOutcome {
        self.hcall(Hcall::PutTce {
            liobn: LIOBN,
            ioba,
            tce,
        })
    }

    fn map(&mut self, caller: Mm, vaddr: u64, iova: u64, size: u64) -> Result<u32, Errno> {
        self.k
            .vfio_map_dma(caller, self.container, DmaMap::new(vaddr, iova, size))
    }

    fn unmap(&mut self, caller: Mm, iova: u64, size: u64) -> Result<u32, Errno> {
        self.k
            .vfio_unmap_dma(caller, self.container, DmaUnmap::new(iova, size))
    }

    /// Live TCEs counted against the owner's whole-RAM region.
    fn mapped(&self, owner: Mm) -> Option<u64> {
        let ua = if owner == QEMU { QEMU_UA } else { SIDECAR_UA };
        self.k.prereg_mapped(owner, ua)
    }
}

const OK: HcallOutcome = HcallOutcome::Completed {
    ret: H_SUCCESS,
    value: 0,
};
const PARAM: HcallOutcome = HcallOutcome::Completed {
    ret: H_PARAMETER,
    value: 0,
};
const RW: u64 = TCE_PCI_READ | TCE_PCI_WRITE;

type Call = fn(&mut Fx) -> Result<(), Errno>;
type Case = (&'static str, fn() -> Fx, Call, Result<(), Errno>);

fn run_cases(cases: &[Case]) {
    let mut failures = Vec::new();
    for (name, setup, call, expected) in cases {
        let mut f = setup();
        let got = call(&mut f);
        if got != *expected {
            failures.push(format!("{name}: expected {expected:?}, got {got:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn windowed_qemu() -> Fx {
    Fx::windowed(QEMU)
}

fn associated_qemu() -> Fx {
    Fx::associated(QEMU)
}

#[test]
fn kvm_create_spapr_tce_64_rules() {
    fn t(f: &mut Fx, page_shift: u32, offset: u64, size: u64) -> Result<(), Errno> {
        f.kvm_table(LIOBN, page_shift, offset, size).map(|_| ())
    }
    run_cases(&[
        (
            "spapr_tce_valid_ok",
            Fx::bare,
            |f| t(f, 12, 0, 1 << 16),
            Ok(()),
        ),
        (
            "spapr_tce_zero_size_einval",
            Fx::bare,
            |f| t(f, 12, 0, 0),
            Err(Errno::INVAL),
        ),
        (
            "spapr_tce_page_shift_11_einval",
            Fx::bare,
            |f| t(f, 11, 0, 1),
            Err(Errno::INVAL),
        ),
        (
            "spapr_tce_page_shift_34_ok",
            Fx::bare,
            |f| t(f, 34, 0, 1),
            Ok(()),
        ),
        (
            "spapr_tce_page_shift_35_einval",
            Fx::bare,
            |f| t(f, 35, 0, 1),
            Err(Errno::INVAL),
        ),
        (
            "spapr_tce_end_beyond_bus_space_einval",
            Fx::bare,
            |f| t(f, 12, u64::MAX >> 12, 1),
            Err(Errno::INVAL),
        ),
        (
            "spapr_tce_end_at_bus_space_limit_ok",
            Fx::bare,
            |f| t(f, 12, (u64::MAX >> 12) - 1, 1),
            Ok(()),
        ),
        // The kernel adds offset and size in u64 without an overflow check.
        (
            "spapr_tce_offset_size_wrap_accepted_ok",
            Fx::bare,
            |f| t(f, 12, u64::MAX, 2),
            Ok(()),
        ),
        (
            "spapr_tce_duplicate_liobn_ebusy",
            Fx::bare,
            |f| {
                t(f, 12, 0, 16)?;
                t(f, 16, 0, 16)
            },
            Err(Errno::BUSY),
        ),
        (
            "spapr_tce_other_mm_eio",
            Fx::bare,
            |f| {
                let args = CreateSpaprTce64 {
                    liobn: LIOBN,
                    page_shift: 12,
                    flags: 0,
                    offset: 0,
                    size: 16,
                };
                f.k.kvm_create_spapr_tce_64(SIDECAR, f.vm, args).map(|_| ())
            },
            Err(Errno::IO),
        ),
        (
            "spapr_tce_page_array_beyond_kmalloc_max_enomem",
            Fx::bare,
            |f| t(f, 12, 0, 1 << 30),
            Err(Errno::NOMEM),
        ),
        (
            "spapr_tce_over_memlock_enomem",
            Fx::bare,
            |f| {
                f.k.set_memlock_limit(QEMU, Some(64 << 10));
                t(f, 12, 0, 1 << 16)
            },
            Err(Errno::NOMEM),
        ),
    ]);
}

#[test]
fn spapr_tce_table_charged_to_creator_and_allocated_lazily() {
    let mut f = Fx::bare();
    let before = f.k.mm_stats(QEMU).locked_vm_pages;
    // 2^16 entries of 8 bytes: 128 table pages of 4K plus the page-pointer array.
    let table = f.kvm_table(LIOBN, 12, 0, 1 << 16).unwrap();
    assert_eq!(f.k.mm_stats(QEMU).locked_vm_pages - before, 128 + 1);
    assert_eq!(f.k.spapr_tce_store(table).unwrap().allocated_pages(), 0);
    assert_eq!(f.put_tce(0x1000, 0), OK);
    assert_eq!(
        f.k.spapr_tce_store(table).unwrap().allocated_pages(),
        0,
        "a zero TCE allocates nothing"
    );
    assert_eq!(f.put_tce(0x1000, 0x2000 | RW), OK);
    assert_eq!(f.k.spapr_tce_store(table).unwrap().allocated_pages(), 1);
    // Host byte order, as QEMU's mmap reads it.
    assert_eq!(f.k.spapr_tce_read(table, 1), Ok(0x2000 | RW));
    assert_eq!(f.k.spapr_tce_read(table, 1 << 16), Err(Errno::FAULT));
    f.k.close(table).unwrap();
    assert_eq!(f.k.mm_stats(QEMU).locked_vm_pages, before);
}

#[test]
fn kvm_vfio_device_rules() {
    fn dev(f: &mut Fx) -> Result<(), Errno> {
        f.dev = f.k.kvm_create_device(QEMU, f.vm, KVM_DEV_TYPE_VFIO, 0)?;
        Ok(())
    }
    run_cases(&[
        ("device_first_ok", Fx::bare, dev, Ok(())),
        (
            "device_second_ebusy",
            Fx::bare,
            |f| {
                dev(f)?;
                dev(f)
            },
            Err(Errno::BUSY),
        ),
        (
            "device_again_after_close_ok",
            Fx::bare,
            |f| {
                dev(f)?;
                f.k.close(f.dev())?;
                dev(f)
            },
            Ok(()),
        ),
        (
            "device_other_type_enodev",
            Fx::bare,
            |f| f.k.kvm_create_device(QEMU, f.vm, 3, 0).map(|_| ()),
            Err(Errno::NODEV),
        ),
        (
            "device_test_flag_then_create_ok",
            Fx::bare,
            |f| {
                assert_eq!(
                    f.k.kvm_create_device(QEMU, f.vm, KVM_DEV_TYPE_VFIO, KVM_CREATE_DEVICE_TEST),
                    Ok(None)
                );
                dev(f)
            },
            Ok(()),
        ),
        (
            "device_other_mm_eio",
            Fx::bare,
            |f| {
                f.k.kvm_create_device(SIDECAR, f.vm, KVM_DEV_TYPE_VFIO, 0)
                    .map(|_| ())
            },
            Err(Errno::IO),
        ),
        (
            "file_add_group_ok",
            Fx::bare,
            |f| {
                dev(f)?;
                f.k.kvm_vfio_file_add(QEMU, f.dev(), FileArg::File(f.group))
            },
            Ok(()),
        ),
        (
            "file_add_bad_fd_ebadf",
            Fx::bare,
            |f| {
                dev(f)?;
                f.k.kvm_vfio_file_add(QEMU, f.dev(), FileArg::Bad)
            },
            Err(Errno::BADF),
        ),
        (
            "file_add_foreign_file_einval",
            Fx::bare,
            |f| {
                dev(f)?;
                f.k.kvm_vfio_file_add(QEMU, f.dev(), FileArg::Foreign)
            },
            Err(Errno::INVAL),
        ),
        (
            "file_add_container_file_einval",
            Fx::bare,
            |f| {
                dev(f)?;
                f.k.kvm_vfio_file_add(QEMU, f.dev(), FileArg::File(f.container))
            },
            Err(Errno::INVAL),
        ),
        (
            "file_add_duplicate_eexist",
            Fx::bare,
            |f| {
                dev(f)?;
                f.k.kvm_vfio_file_add(QEMU, f.dev(), FileArg::File(f.group))?;
                f.k.kvm_vfio_file_add(QEMU, f.dev(), FileArg::File(f.group))
            },
            Err(Errno::EXIST),
        ),
        (
            "file_add_other_mm_eio",
            Fx::bare,
            |f| {
                dev(f)?;
                f.k.kvm_vfio_file_add(SIDECAR, f.dev(), FileArg::File(f.group))
            },
            Err(Errno::IO),
        ),
        (
            "file_del_added_ok",
            Fx::bare,
            |f| {
                dev(f)?;
                f.k.kvm_vfio_file_add(QEMU, f.dev(), FileArg::File(f.group))?;
                f.k.kvm_vfio_file_del(QEMU, f.dev(), FileArg::File(f.group))
            },
            Ok(()),
        ),
        (
            "file_del_not_added_enoent",
            Fx::bare,
            |f| {
                dev(f)?;
                f.k.kvm_vfio_file_del(QEMU, f.dev(), FileArg::File(f.group))
            },
            Err(Errno::NOENT),
        ),
        (
            "file_del_bad_fd_ebadf",
            Fx::bare,
            |f| {
                dev(f)?;
                f.k.kvm_vfio_file_del(QEMU, f.dev(), FileArg::Bad)
            },
            Err(Errno::BADF),
        ),
        (
            "file_del_other_mm_eio",
            Fx::bare,
            |f| {
                dev(f)?;
                f.k.kvm_vfio_file_add(QEMU, f.dev(), FileArg::File(f.group))?;
                f.k.kvm_vfio_file_del(SIDECAR, f.dev(), FileArg::File(f.group))
            },
            Err(Errno::IO),
        ),
        (
            "has_attr_file_add_ok",
            Fx::bare,
            |f| {
                dev(f)?;
                f.k.kvm_has_device_attr(QEMU, f.dev(), KVM_DEV_VFIO_FILE, KVM_DEV_VFIO_FILE_ADD)
            },
            Ok(()),
        ),
        (
            "has_attr_file_del_ok",
            Fx::bare,
            |f| {
                dev(f)?;
                f.k.kvm_has_device_attr(QEMU, f.dev(), KVM_DEV_VFIO_FILE, KVM_DEV_VFIO_FILE_DEL)
            },
            Ok(()),
        ),
        (
            "has_attr_set_spapr_tce_ok",
            Fx::bare,
            |f| {
                dev(f)?;
                f.k.kvm_has_device_attr(
                    QEMU,
                    f.dev(),
                    KVM_DEV_VFIO_FILE,
                    KVM_DEV_VFIO_GROUP_SET_SPAPR_TCE,
                )
            },
            Ok(()),
        ),
        (
            "has_attr_unknown_attr_enxio",
            Fx::bare,
            |f| {
                dev(f)?;
                f.k.kvm_has_device_attr(QEMU, f.dev(), KVM_DEV_VFIO_FILE, 4)
            },
            Err(Errno::NXIO),
        ),
        (
            "has_attr_unknown_group_enxio",
            Fx::bare,
            |f| {
                dev(f)?;
                f.k.kvm_has_device_attr(QEMU, f.dev(), 2, KVM_DEV_VFIO_FILE_ADD)
            },
            Err(Errno::NXIO),
        ),
        (
            "has_attr_other_mm_eio",
            Fx::bare,
            |f| {
                dev(f)?;
                f.k.kvm_has_device_attr(SIDECAR, f.dev(), KVM_DEV_VFIO_FILE, KVM_DEV_VFIO_FILE_ADD)
            },
            Err(Errno::IO),
        ),
        (
            "get_attr_not_supported_eperm",
            Fx::bare,
            |f| {
                dev(f)?;
                f.k.kvm_get_device_attr(QEMU, f.dev())
            },
            Err(Errno::PERM),
        ),
    ]);
}

#[test]
fn set_spapr_tce_rules() {
    run_cases(&[
        (
            "set_spapr_tce_compatible_ok",
            windowed_qemu,
            |f| f.set_spapr_tce(QEMU, FileArg::File(f.group), FileArg::File(f.table())),
            Ok(()),
        ),
        (
            "set_spapr_tce_again_ok",
            associated_qemu,
            |f| f.set_spapr_tce(QEMU, FileArg::File(f.group), FileArg::File(f.table())),
            Ok(()),
        ),
        (
            "set_spapr_tce_other_mm_eio",
            windowed_qemu,
            |f| f.set_spapr_tce(SIDECAR, FileArg::File(f.group), FileArg::File(f.table())),
            Err(Errno::IO),
        ),
        (
            "set_spapr_tce_bad_groupfd_ebadf",
            windowed_qemu,
            |f| f.set_spapr_tce(QEMU, FileArg::Bad, FileArg::File(f.table())),
            Err(Errno::BADF),
        ),
        // The group fd is checked first: a bad table fd with an unknown group is ENOENT.
        (
            "set_spapr_tce_group_not_added_enoent",
            windowed_qemu,
            |f| f.set_spapr_tce(QEMU, FileArg::File(f.container), FileArg::Bad),
            Err(Errno::NOENT),
        ),
        (
            "set_spapr_tce_reopened_group_file_enoent",
            windowed_qemu,
            |f| {
                f.k.kvm_vfio_file_del(QEMU, f.dev(), FileArg::File(f.group))?;
                f.k.close(f.group)?;
                let reopened = f.k.open_vfio_group(1)?;
                f.set_spapr_tce(QEMU, FileArg::File(reopened), FileArg::File(f.table()))
            },
            Err(Errno::NOENT),
        ),
        (
            "set_spapr_tce_bad_tablefd_ebadf",
            windowed_qemu,
            |f| f.set_spapr_tce(QEMU, FileArg::File(f.group), FileArg::Bad),
            Err(Errno::BADF),
        ),
        (
            "set_spapr_tce_foreign_tablefd_einval",
            windowed_qemu,
            |f| f.set_spapr_tce(QEMU, FileArg::File(f.group), FileArg::Foreign),
            Err(Errno::INVAL),
        ),
        (
            "set_spapr_tce_tablefd_not_a_table_einval",
            windowed_qemu,
            |f| f.set_spapr_tce(QEMU, FileArg::File(f.group), FileArg::File(f.vm)),
            Err(Errno::INVAL),
        ),
        (
            "set_spapr_tce_other_vms_table_einval",
            windowed_qemu,
            |f| {
                let kvm = f.k.open_kvm();
                let vm2 = f.k.kvm_create_vm(QEMU, kvm)?;
                let args = CreateSpaprTce64 {
                    liobn: LIOBN,
                    page_shift: 12,
                    flags: 0,
                    offset: 0,
                    size: WIN >> 12,
                };
                let other = f.k.kvm_create_spapr_tce_64(QEMU, vm2, args)?;
                f.set_spapr_tce(QEMU, FileArg::File(f.group), FileArg::File(other))
            },
            Err(Errno::INVAL),
        ),
        (
            "set_spapr_tce_no_window_einval",
            || {
                let mut f = Fx::attached();
                f.table = Some(f.kvm_table(LIOBN, 12, 0, WIN >> 12).unwrap());
                f.dev =
                    f.k.kvm_create_device(QEMU, f.vm, KVM_DEV_TYPE_VFIO, 0)
                        .unwrap();
                f.k.kvm_vfio_file_add(QEMU, f.dev(), FileArg::File(f.group))
                    .unwrap();
                f
            },
            |f| f.set_spapr_tce(QEMU, FileArg::File(f.group), FileArg::File(f.table())),
            Err(Errno::INVAL),
        ),
        (
            "set_spapr_tce_hw_page_larger_einval",
            windowed_qemu,
            |f| {
                f.k.vfio_tce_create(QEMU, f.container, TceCreate::new(16, GIB, 1))?;
                let t = f.kvm_table(LIOBN + 1, 12, (1 << 59) >> 12, GIB >> 12)?;
                f.set_spapr_tce(QEMU, FileArg::File(f.group), FileArg::File(t))
            },
            Err(Errno::INVAL),
        ),
        (
            "set_spapr_tce_hw_page_smaller_ok",
            windowed_qemu,
            |f| {
                let t = f.kvm_table(LIOBN + 1, 16, 0, WIN >> 16)?;
                f.set_spapr_tce(QEMU, FileArg::File(f.group), FileArg::File(t))
            },
            Ok(()),
        ),
        (
            "set_spapr_tce_offset_differs_einval",
            windowed_qemu,
            |f| {
                let t = f.kvm_table(LIOBN + 1, 12, (1 << 59) >> 12, WIN >> 12)?;
                f.set_spapr_tce(QEMU, FileArg::File(f.group), FileArg::File(t))
            },
            Err(Errno::INVAL),
        ),
        (
            "set_spapr_tce_hw_window_smaller_einval",
            windowed_qemu,
            |f| {
                let t = f.kvm_table(LIOBN + 1, 12, 0, (2 * WIN) >> 12)?;
                f.set_spapr_tce(QEMU, FileArg::File(f.group), FileArg::File(t))
            },
            Err(Errno::INVAL),
        ),
        (
            "set_spapr_tce_hw_window_larger_ok",
            windowed_qemu,
            |f| {
                let t = f.kvm_table(LIOBN + 1, 12, 0, (WIN / 2) >> 12)?;
                f.set_spapr_tce(QEMU, FileArg::File(f.group), FileArg::File(t))
            },
            Ok(()),
        ),
    ]);
}

#[test]
fn file_del_releases_the_groups_association() {
    let mut f = Fx::associated(QEMU);
    assert_eq!(f.k.spapr_tce_attached(f.table()), 1);
    f.k.kvm_vfio_file_del(QEMU, f.dev(), FileArg::File(f.group))
        .unwrap();
    assert_eq!(f.k.spapr_tce_attached(f.table()), 0);
    // Without the link, KVM completes a map without touching the IOMMU (K7).
    assert_eq!(f.put_tce(0, 0x10000 | RW), OK);
    assert_eq!(f.k.iommu_entry(1, 0), None);
}

#[test]
fn file_del_drops_one_reference_of_a_twice_set_association() {
    let mut f = Fx::associated(QEMU);
    f.set_spapr_tce(QEMU, FileArg::File(f.group), FileArg::File(f.table()))
        .unwrap();
    f.k.kvm_vfio_file_del(QEMU, f.dev(), FileArg::File(f.group))
        .unwrap();
    assert_eq!(f.k.spapr_tce_attached(f.table()), 1, "kref was 2");
}

#[test]
fn vfio_group_and_container_rules() {
    run_cases(&[
        (
            "open_group_unknown_enoent",
            Fx::bare,
            |f| f.k.open_vfio_group(7).map(|_| ()),
            Err(Errno::NOENT),
        ),
        (
            "open_group_already_open_ebusy",
            Fx::bare,
            |f| f.k.open_vfio_group(1).map(|_| ()),
            Err(Errno::BUSY),
        ),
        (
            "open_group_after_close_ok",
            Fx::bare,
            |f| {
                f.k.close(f.group)?;
                f.k.open_vfio_group(1).map(|_| ())
            },
            Ok(()),
        ),
        (
            "group_status_viable_ok",
            Fx::bare,
            |f| assert_status(f, VFIO_GROUP_FLAGS_VIABLE),
            Ok(()),
        ),
        (
            "group_status_container_set_ok",
            Fx::attached,
            |f| assert_status(f, VFIO_GROUP_FLAGS_VIABLE | VFIO_GROUP_FLAGS_CONTAINER_SET),
            Ok(()),
        ),
        (
            "set_container_bad_fd_ebadf",
            Fx::bare,
            |f| f.k.vfio_group_set_container(f.group, FileArg::Bad),
            Err(Errno::BADF),
        ),
        (
            "set_container_foreign_fd_ebadfd",
            Fx::bare,
            |f| f.k.vfio_group_set_container(f.group, FileArg::Foreign),
            Err(Errno::BADFD),
        ),
        (
            "set_container_vm_fd_ebadfd",
            Fx::bare,
            |f| f.k.vfio_group_set_container(f.group, FileArg::File(f.vm)),
            Err(Errno::BADFD),
        ),
        (
            "set_container_already_set_einval",
            Fx::attached,
            |f| {
                f.k.vfio_group_set_container(f.group, FileArg::File(f.container))
            },
            Err(Errno::INVAL),
        ),
        (
            "set_container_second_group_v2_ok",
            Fx::attached,
            |f| {
                let g2 = f.k.open_vfio_group(2)?;
                f.k.vfio_group_set_container(g2, FileArg::File(f.container))
            },
            Ok(()),
        ),
        (
            "set_container_second_group_v1_ebusy",
            Fx::bare,
            |f| {
                f.k.vfio_group_set_container(f.group, FileArg::File(f.container))?;
                f.k.vfio_set_iommu(f.container, VFIO_SPAPR_TCE_IOMMU)?;
                let g2 = f.k.open_vfio_group(2)?;
                f.k.vfio_group_set_container(g2, FileArg::File(f.container))
            },
            Err(Errno::BUSY),
        ),
        (
            "unset_container_not_set_einval",
            Fx::bare,
            |f| f.k.vfio_group_unset_container(f.group),
            Err(Errno::INVAL),
        ),
        (
            "unset_container_set_ok",
            Fx::attached,
            |f| f.k.vfio_group_unset_container(f.group),
            Ok(()),
        ),
        (
            "set_iommu_no_group_einval",
            Fx::bare,
            |f| f.k.vfio_set_iommu(f.container, VFIO_SPAPR_TCE_V2_IOMMU),
            Err(Errno::INVAL),
        ),
        (
            "set_iommu_twice_einval",
            Fx::attached,
            |f| f.k.vfio_set_iommu(f.container, VFIO_SPAPR_TCE_V2_IOMMU),
            Err(Errno::INVAL),
        ),
        (
            "set_iommu_type1v2_enodev",
            Fx::bare,
            |f| {
                f.k.vfio_group_set_container(f.group, FileArg::File(f.container))?;
                f.k.vfio_set_iommu(f.container, 3)
            },
            Err(Errno::NODEV),
        ),
        (
            "set_iommu_v1_two_groups_ebusy",
            Fx::bare,
            |f| {
                f.k.vfio_group_set_container(f.group, FileArg::File(f.container))?;
                let g2 = f.k.open_vfio_group(2)?;
                f.k.vfio_group_set_container(g2, FileArg::File(f.container))?;
                f.k.vfio_set_iommu(f.container, VFIO_SPAPR_TCE_IOMMU)
            },
            Err(Errno::BUSY),
        ),
        (
            "api_version_is_zero_ok",
            Fx::bare,
            |f| {
                assert_eq!(f.k.vfio_get_api_version(f.container), Ok(VFIO_API_VERSION));
                Ok(())
            },
            Ok(()),
        ),
        (
            "check_extension_values_ok",
            Fx::bare,
            |f| {
                assert_eq!(
                    f.k.vfio_check_extension(f.container, VFIO_SPAPR_TCE_IOMMU),
                    Ok(1)
                );
                assert_eq!(
                    f.k.vfio_check_extension(f.container, VFIO_SPAPR_TCE_V2_IOMMU),
                    Ok(1)
                );
                assert_eq!(f.k.vfio_check_extension(f.container, VFIO_EEH), Ok(1));
                assert_eq!(f.k.vfio_check_extension(f.container, 1), Ok(0));
                Ok(())
            },
            Ok(()),
        ),
        (
            "spapr_ioctl_without_iommu_einval",
            Fx::bare,
            |f| {
                f.k.vfio_spapr_tce_get_info(QEMU, f.container, 32)
                    .map(|_| ())
            },
            Err(Errno::INVAL),
        ),
        (
            "get_info_argsz_short_einval",
            Fx::attached,
            |f| {
                f.k.vfio_spapr_tce_get_info(QEMU, f.container, 15)
                    .map(|_| ())
            },
            Err(Errno::INVAL),
        ),
        (
            "get_info_v1_enable_wrong_type_enotty",
            Fx::attached,
            |f| f.k.vfio_iommu_enable(QEMU, f.container),
            Err(Errno::NOTTY),
        ),
    ]);
}

fn assert_status(f: &mut Fx, want: u32) -> Result<(), Errno> {
    assert_eq!(f.k.vfio_group_get_status(f.group)?, want);
    Ok(())
}

#[test]
fn get_info_reports_the_platform() {
    let f = Fx::attached();
    let info = f.k.vfio_spapr_tce_get_info(QEMU, f.container, 32).unwrap();
    assert_eq!(
        info,
        SpaprTceInfo {
            flags: VFIO_IOMMU_SPAPR_INFO_DDW,
            dma32_window_start: 0,
            dma32_window_size: 0x8000_0000,
            pgsizes: 0x4021_1000,
            max_dynamic_windows_supported: 2,
            levels: 5,
        }
    );
    // An argsz without room for ddw gets the flag but not the values.
    let short = f.k.vfio_spapr_tce_get_info(QEMU, f.container, 16).unwrap();
    assert_eq!(
        (short.flags, short.pgsizes, short.levels),
        (VFIO_IOMMU_SPAPR_INFO_DDW, 0, 0)
    );

    let mut p = Fx::bare_on(Platform::pseries());
    p.k.vfio_group_set_container(p.group, FileArg::File(p.container))
        .unwrap();
    p.k.vfio_set_iommu(p.container, VFIO_SPAPR_TCE_V2_IOMMU)
        .unwrap();
    let info = p.k.vfio_spapr_tce_get_info(QEMU, p.container, 32).unwrap();
    assert_eq!(
        (
            info.dma32_window_size,
            info.pgsizes,
            info.max_dynamic_windows_supported,
            info.levels
        ),
        (0x4000_0000, 0x121_1000, 2, 1)
    );
}

#[test]
fn container_binds_to_first_mm_k2() {
    // Each binding call, made first by QEMU, locks the sidecar out of every other call.
    let binders: [(&str, Call); 3] = [
        ("register_memory", |f| {
            f.k.vfio_register_memory(QEMU, f.container, RegisterMemory::new(QEMU_UA, RAM))
        }),
        ("tce_create", |f| {
            f.k.vfio_tce_create(QEMU, f.container, TceCreate::new(16, GIB, 1))
                .map(|_| ())
        }),
        ("tce_remove", |f| {
            f.k.vfio_tce_remove(QEMU, f.container, TceRemove::new(0))
        }),
    ];
    for (name, bind) in binders {
        let mut f = Fx::attached();
        let sidecar_ua = f.owner_ram(SIDECAR);
        bind(&mut f).unwrap_or_else(|e| panic!("{name}: {e:?}"));
        assert_eq!(f.k.container_mm(f.container), Some(QEMU), "{name}");
        let c = f.container;
        let k = &mut f.k;
        assert_eq!(
            k.vfio_spapr_tce_get_info(SIDECAR, c, 32).map(|_| ()),
            Err(Errno::PERM),
            "{name}: get_info"
        );
        assert_eq!(
            k.vfio_register_memory(SIDECAR, c, RegisterMemory::new(sidecar_ua, RAM)),
            Err(Errno::PERM),
            "{name}: register"
        );
        assert_eq!(
            k.vfio_unregister_memory(SIDECAR, c, RegisterMemory::new(sidecar_ua, RAM)),
            Err(Errno::PERM),
            "{name}: unregister"
        );
        assert_eq!(
            k.vfio_tce_create(SIDECAR, c, TceCreate::new(12, WIN, 1)),
            Err(Errno::PERM),
            "{name}: create"
        );
        assert_eq!(
            k.vfio_tce_remove(SIDECAR, c, TceRemove::new(0)),
            Err(Errno::PERM),
            "{name}: remove"
        );
        assert_eq!(
            k.vfio_map_dma(SIDECAR, c, DmaMap::new(sidecar_ua, 0, 4096)),
            Err(Errno::PERM),
            "{name}: map"
        );
        assert_eq!(
            k.vfio_unmap_dma(SIDECAR, c, DmaUnmap::new(0, 4096)),
            Err(Errno::PERM),
            "{name}: unmap"
        );
        assert_eq!(
            k.vfio_eeh_pe_op(SIDECAR, c, EehPeOp::new(eeh_op::GET_STATE)),
            Err(Errno::PERM),
            "{name}: eeh"
        );
        // VFIO_CHECK_EXTENSION and the core's own ioctls check no mm.
        assert_eq!(
            k.vfio_check_extension(c, VFIO_SPAPR_TCE_V2_IOMMU),
            Ok(1),
            "{name}: check_extension"
        );
        assert_eq!(k.vfio_get_api_version(c), Ok(0), "{name}: api version");
        // The owner still works.
        assert_eq!(
            k.vfio_spapr_tce_get_info(QEMU, c, 32).map(|i| i.levels),
            Ok(5),
            "{name}: owner"
        );
    }
}

#[test]
fn get_info_does_not_bind_the_container() {
    let mut f = Fx::attached();
    f.k.vfio_spapr_tce_get_info(SIDECAR, f.container, 32)
        .unwrap();
    assert_eq!(f.k.container_mm(f.container), None);
    f.k.vfio_register_memory(QEMU, f.container, RegisterMemory::new(QEMU_UA, RAM))
        .unwrap();
    assert_eq!(f.k.container_mm(f.container), Some(QEMU));
}

#[test]
fn last_group_leaving_releases_the_binding() {
    let mut f = Fx::attached();
    f.k.vfio_register_memory(QEMU, f.container, RegisterMemory::new(QEMU_UA, RAM))
        .unwrap();
    assert_eq!(f.k.mm_stats(QEMU).pinned_pages, RAM >> 12);
    f.k.vfio_group_unset_container(f.group).unwrap();
    assert_eq!(f.k.mm_stats(QEMU), MmStats::default());
    // A fresh driver: the sidecar may own it now.
    let ua = f.owner_ram(SIDECAR);
    f.k.vfio_group_set_container(f.group, FileArg::File(f.container))
        .unwrap();
    f.k.vfio_set_iommu(f.container, VFIO_SPAPR_TCE_V2_IOMMU)
        .unwrap();
    assert_eq!(
        f.k.vfio_register_memory(SIDECAR, f.container, RegisterMemory::new(ua, RAM)),
        Ok(())
    );
}

#[test]
fn register_memory_rules() {
    fn reg(f: &mut Fx, vaddr: u64, size: u64) -> Result<(), Errno> {
        f.k.vfio_register_memory(QEMU, f.container, RegisterMemory::new(vaddr, size))
    }
    run_cases(&[
        (
            "register_whole_ram_ok",
            Fx::attached,
            |f| reg(f, QEMU_UA, RAM),
            Ok(()),
        ),
        (
            "register_flags_einval",
            Fx::attached,
            |f| {
                f.k.vfio_register_memory(
                    QEMU,
                    f.container,
                    RegisterMemory {
                        flags: 1,
                        ..RegisterMemory::new(QEMU_UA, RAM)
                    },
                )
            },
            Err(Errno::INVAL),
        ),
        (
            "register_argsz_short_einval",
            Fx::attached,
            |f| {
                f.k.vfio_register_memory(
                    QEMU,
                    f.container,
                    RegisterMemory {
                        argsz: 16,
                        ..RegisterMemory::new(QEMU_UA, RAM)
                    },
                )
            },
            Err(Errno::INVAL),
        ),
        (
            "register_vaddr_unaligned_einval",
            Fx::attached,
            |f| reg(f, QEMU_UA + 8, 4096),
            Err(Errno::INVAL),
        ),
        (
            "register_size_unaligned_einval",
            Fx::attached,
            |f| reg(f, QEMU_UA, 4095),
            Err(Errno::INVAL),
        ),
        (
            "register_wraps_einval",
            Fx::attached,
            |f| reg(f, !0xfff, 0x2000),
            Err(Errno::INVAL),
        ),
        // vzalloc(0) fails: the kernel has no explicit check for an empty region.
        (
            "register_zero_size_enomem",
            Fx::attached,
            |f| reg(f, QEMU_UA, 0),
            Err(Errno::NOMEM),
        ),
        (
            "register_same_region_twice_ebusy",
            Fx::attached,
            |f| {
                reg(f, QEMU_UA, RAM)?;
                reg(f, QEMU_UA, RAM)
            },
            Err(Errno::BUSY),
        ),
        (
            "register_overlapping_region_einval",
            Fx::attached,
            |f| {
                reg(f, QEMU_UA, RAM / 2)?;
                reg(f, QEMU_UA + 4096, RAM / 2)
            },
            Err(Errno::INVAL),
        ),
        (
            "register_adjacent_region_ok",
            Fx::attached,
            |f| {
                reg(f, QEMU_UA, RAM / 2)?;
                reg(f, QEMU_UA + RAM / 2, RAM / 2)
            },
            Ok(()),
        ),
        (
            "register_over_memlock_enomem",
            Fx::attached,
            |f| {
                f.k.set_memlock_limit(QEMU, Some(RAM - 4096));
                reg(f, QEMU_UA, RAM)
            },
            Err(Errno::NOMEM),
        ),
        (
            "register_unmapped_memory_efault",
            Fx::attached,
            |f| reg(f, QEMU_UA + RAM, 4096),
            Err(Errno::FAULT),
        ),
        (
            "register_read_only_mapping_efault",
            Fx::attached,
            |f| {
                let ro = VecMemory::new(4096);
                f.k.mm_map(QEMU, 0x1000_0000, 4096, false, 12, Arc::new(ro), 0)?;
                reg(f, 0x1000_0000, 4096)
            },
            Err(Errno::FAULT),
        ),
        (
            "register_v1_container_enotty",
            Fx::bare,
            |f| {
                f.k.vfio_group_set_container(f.group, FileArg::File(f.container))?;
                f.k.vfio_set_iommu(f.container, VFIO_SPAPR_TCE_IOMMU)?;
                reg(f, QEMU_UA, RAM)
            },
            Err(Errno::NOTTY),
        ),
    ]);
}

#[test]
fn register_memory_is_per_mm_and_shared_by_containers() {
    let mut f = Fx::attached();
    f.k.vfio_register_memory(QEMU, f.container, RegisterMemory::new(QEMU_UA, RAM))
        .unwrap();
    let c2 = f.k.open_vfio_container();
    let g2 = f.k.open_vfio_group(2).unwrap();
    f.k.vfio_group_set_container(g2, FileArg::File(c2)).unwrap();
    f.k.vfio_set_iommu(c2, VFIO_SPAPR_TCE_V2_IOMMU).unwrap();
    // The same region again from the same mm: shared, pinned and charged once.
    assert_eq!(
        f.k.vfio_register_memory(QEMU, c2, RegisterMemory::new(QEMU_UA, RAM)),
        Ok(())
    );
    let stats = f.k.mm_stats(QEMU);
    assert_eq!((stats.prereg_regions, stats.pinned_pages), (1, RAM >> 12));
    // One container letting go leaves it for the other.
    f.k.vfio_unregister_memory(QEMU, f.container, RegisterMemory::new(QEMU_UA, RAM))
        .unwrap();
    assert_eq!(f.k.mm_stats(QEMU).pinned_pages, RAM >> 12);
    f.k.vfio_unregister_memory(QEMU, c2, RegisterMemory::new(QEMU_UA, RAM))
        .unwrap();
    assert_eq!(f.k.mm_stats(QEMU).pinned_pages, 0);
}

#[test]
fn unregister_memory_rules() {
    fn unreg(f: &mut Fx, vaddr: u64, size: u64) -> Result<(), Errno> {
        f.k.vfio_unregister_memory(QEMU, f.container, RegisterMemory::new(vaddr, size))
    }
    run_cases(&[
        (
            "unregister_registered_ok",
            windowed_qemu,
            |f| unreg(f, QEMU_UA, RAM),
            Ok(()),
        ),
        (
            "unregister_unbound_container_eperm",
            Fx::attached,
            |f| unreg(f, QEMU_UA, RAM),
            Err(Errno::PERM),
        ),
        (
            "unregister_not_registered_enoent",
            windowed_qemu,
            |f| unreg(f, QEMU_UA + RAM, 4096),
            Err(Errno::NOENT),
        ),
        (
            "unregister_part_of_region_enoent",
            windowed_qemu,
            |f| unreg(f, QEMU_UA, RAM / 2),
            Err(Errno::NOENT),
        ),
        (
            "unregister_unaligned_einval",
            windowed_qemu,
            |f| unreg(f, QEMU_UA + 1, RAM),
            Err(Errno::INVAL),
        ),
        (
            "unregister_flags_einval",
            windowed_qemu,
            |f| {
                f.k.vfio_unregister_memory(
                    QEMU,
                    f.container,
                    RegisterMemory {
                        flags: 1,
                        ..RegisterMemory::new(QEMU_UA, RAM)
                    },
                )
            },
            Err(Errno::INVAL),
        ),
        (
            "unregister_twice_enoent",
            windowed_qemu,
            |f| {
                unreg(f, QEMU_UA, RAM)?;
                unreg(f, QEMU_UA, RAM)
            },
            Err(Errno::NOENT),
        ),
    ]);
}

#[test]
fn unregister_memory_while_mapped_returns_0_and_keeps_the_region_pinned() {
    let mut f = Fx::windowed(QEMU);
    f.map(QEMU, QEMU_UA, 0, 4096).unwrap();
    assert_eq!(
        f.k.vfio_unregister_memory(QEMU, f.container, RegisterMemory::new(QEMU_UA, RAM)),
        Ok(())
    );
    assert_eq!(f.k.mm_stats(QEMU).pinned_pages, RAM >> 12, "still pinned");
    // The container no longer references it: a second try finds nothing.
    assert_eq!(
        f.k.vfio_unregister_memory(QEMU, f.container, RegisterMemory::new(QEMU_UA, RAM)),
        Err(Errno::NOENT)
    );
}

#[test]
fn tce_create_rules() {
    fn create(f: &mut Fx, page_shift: u32, size: u64, levels: u32) -> Result<(), Errno> {
        f.k.vfio_tce_create(QEMU, f.container, TceCreate::new(page_shift, size, levels))
            .map(|_| ())
    }
    fn removed_default() -> Fx {
        let mut f = Fx::attached();
        f.k.vfio_tce_remove(QEMU, f.container, TceRemove::new(0))
            .unwrap();
        f
    }
    run_cases(&[
        (
            "create_4k_one_level_ok",
            removed_default,
            |f| create(f, 12, WIN, 1),
            Ok(()),
        ),
        (
            "create_64k_multi_level_ok",
            removed_default,
            |f| create(f, 16, 64 * GIB, 2),
            Ok(()),
        ),
        (
            "create_flags_einval",
            removed_default,
            |f| {
                f.k.vfio_tce_create(
                    QEMU,
                    f.container,
                    TceCreate {
                        flags: 1,
                        ..TceCreate::new(12, WIN, 1)
                    },
                )
                .map(|_| ())
            },
            Err(Errno::INVAL),
        ),
        (
            "create_page_8k_not_in_pgsizes_einval",
            removed_default,
            |f| create(f, 13, WIN, 1),
            Err(Errno::INVAL),
        ),
        (
            "create_page_16m_not_on_powernv_einval",
            removed_default,
            |f| create(f, 24, 16 * GIB, 1),
            Err(Errno::INVAL),
        ),
        (
            "create_levels_0_einval",
            removed_default,
            |f| create(f, 12, WIN, 0),
            Err(Errno::INVAL),
        ),
        (
            "create_levels_6_einval",
            removed_default,
            |f| create(f, 12, WIN, 6),
            Err(Errno::INVAL),
        ),
        (
            "create_size_not_power_of_2_einval",
            removed_default,
            |f| create(f, 12, 3 * MIB, 1),
            Err(Errno::INVAL),
        ),
        (
            "create_size_below_page_einval",
            removed_default,
            |f| create(f, 16, 4096, 1),
            Err(Errno::INVAL),
        ),
        (
            "create_third_window_enospc",
            removed_default,
            |f| {
                create(f, 12, WIN, 1)?;
                create(f, 16, GIB, 1)?;
                create(f, 16, GIB, 1)
            },
            Err(Errno::NOSPC),
        ),
        (
            "create_over_memlock_enomem",
            removed_default,
            |f| {
                f.k.set_memlock_limit(QEMU, Some(MIB));
                create(f, 12, 4 * GIB, 1)
            },
            Err(Errno::NOMEM),
        ),
        (
            "create_v1_container_enotty",
            Fx::bare,
            |f| {
                f.k.vfio_group_set_container(f.group, FileArg::File(f.container))?;
                f.k.vfio_set_iommu(f.container, VFIO_SPAPR_TCE_IOMMU)?;
                create(f, 12, WIN, 1)
            },
            Err(Errno::NOTTY),
        ),
        (
            "create_pseries_16m_ok",
            || {
                let mut f = Fx::bare_on(Platform::pseries());
                f.k.vfio_group_set_container(f.group, FileArg::File(f.container))
                    .unwrap();
                f.k.vfio_set_iommu(f.container, VFIO_SPAPR_TCE_V2_IOMMU)
                    .unwrap();
                f
            },
            |f| create(f, 24, 16 * GIB, 1),
            Ok(()),
        ),
        (
            "create_pseries_two_levels_enomem",
            || {
                let mut f = Fx::bare_on(Platform::pseries());
                f.k.vfio_group_set_container(f.group, FileArg::File(f.container))
                    .unwrap();
                f.k.vfio_set_iommu(f.container, VFIO_SPAPR_TCE_V2_IOMMU)
                    .unwrap();
                f.k.set_memlock_limit(QEMU, Some(GIB));
                f
            },
            |f| create(f, 16, 16 * GIB, 2),
            Err(Errno::NOMEM),
        ),
    ]);
}

#[test]
fn tce_create_places_windows_at_platform_addresses() {
    // With the default window still pending, it takes slot 0 first.
    let mut f = Fx::attached();
    assert_eq!(
        f.k.vfio_tce_create(QEMU, f.container, TceCreate::new(16, GIB, 1)),
        Ok(1 << 59)
    );
    assert_eq!(
        f.k.container_windows(f.container),
        vec![(0, 12, 2 * GIB), (1 << 59, 16, GIB)]
    );
    // Removed first, as QEMU does: window 0 at 0, window 1 at 1 << 59.
    let mut f = Fx::attached();
    f.k.vfio_tce_remove(QEMU, f.container, TceRemove::new(0))
        .unwrap();
    assert_eq!(f.k.container_windows(f.container), vec![]);
    assert_eq!(
        f.k.vfio_tce_create(QEMU, f.container, TceCreate::new(12, WIN, 1)),
        Ok(0)
    );
    assert_eq!(
        f.k.vfio_tce_create(QEMU, f.container, TceCreate::new(16, 64 * GIB, 2)),
        Ok(1 << 59)
    );
    assert_eq!(f.k.iommu_entry(1, 1 << 59), None);
}

#[test]
fn tce_create_charges_table_memory_to_the_container_mm() {
    let mut f = Fx::attached();
    f.k.vfio_tce_remove(QEMU, f.container, TceRemove::new(0))
        .unwrap();
    f.k.vfio_tce_create(QEMU, f.container, TceCreate::new(12, WIN, 1))
        .unwrap();
    // 65536 entries of 8 bytes = 512K per copy, two copies (hardware and userspace view).
    assert_eq!(f.k.mm_stats(QEMU).locked_vm_pages, 2 * (512 << 10) / 4096);
    f.k.vfio_tce_remove(QEMU, f.container, TceRemove::new(0))
        .unwrap();
    assert_eq!(f.k.mm_stats(QEMU).locked_vm_pages, 0);
}

#[test]
fn tce_remove_rules() {
    fn remove(f: &mut Fx, start: u64) -> Result<(), Errno> {
        f.k.vfio_tce_remove(QEMU, f.container, TceRemove::new(start))
    }
    run_cases(&[
        (
            "remove_pending_default_ok",
            Fx::attached,
            |f| remove(f, 0),
            Ok(()),
        ),
        (
            "remove_existing_window_ok",
            windowed_qemu,
            |f| remove(f, 0),
            Ok(()),
        ),
        (
            "remove_unknown_start_einval",
            windowed_qemu,
            |f| remove(f, 1 << 59),
            Err(Errno::INVAL),
        ),
        (
            "remove_twice_einval",
            windowed_qemu,
            |f| {
                remove(f, 0)?;
                remove(f, 0)
            },
            Err(Errno::INVAL),
        ),
        (
            "remove_flags_einval",
            windowed_qemu,
            |f| {
                f.k.vfio_tce_remove(
                    QEMU,
                    f.container,
                    TceRemove {
                        flags: 1,
                        ..TceRemove::new(0)
                    },
                )
            },
            Err(Errno::INVAL),
        ),
    ]);
}

#[test]
fn tce_remove_clears_tces_first() {
    let mut f = Fx::windowed(QEMU);
    f.map(QEMU, QEMU_UA, 0, 8192).unwrap();
    assert_eq!(f.mapped(QEMU), Some(2));
    f.k.vfio_tce_remove(QEMU, f.container, TceRemove::new(0))
        .unwrap();
    assert_eq!(f.mapped(QEMU), Some(0));
    assert_eq!(f.k.iommu_entry(1, 0), None);
}

#[test]
fn map_dma_rules() {
    run_cases(&[
        (
            "map_registered_ok",
            windowed_qemu,
            |f| f.map(QEMU, QEMU_UA, 0, 4096).map(|_| ()),
            Ok(()),
        ),
        (
            "map_before_register_eperm",
            || {
                let mut f = Fx::attached();
                f.k.vfio_tce_remove(QEMU, f.container, TceRemove::new(0))
                    .unwrap();
                f.k.vfio_tce_create(QEMU, f.container, TceCreate::new(12, WIN, 1))
                    .unwrap();
                f
            },
            |f| f.map(QEMU, QEMU_UA, 0, 4096).map(|_| ()),
            Err(Errno::PERM),
        ),
        (
            "map_unknown_flag_einval",
            windowed_qemu,
            |f| {
                f.k.vfio_map_dma(
                    QEMU,
                    f.container,
                    DmaMap {
                        flags: 4,
                        ..DmaMap::new(QEMU_UA, 0, 4096)
                    },
                )
                .map(|_| ())
            },
            Err(Errno::INVAL),
        ),
        (
            "map_no_permission_einval",
            windowed_qemu,
            |f| {
                f.k.vfio_map_dma(
                    QEMU,
                    f.container,
                    DmaMap {
                        flags: 0,
                        ..DmaMap::new(QEMU_UA, 0, 4096)
                    },
                )
                .map(|_| ())
            },
            Err(Errno::INVAL),
        ),
        (
            "map_iova_outside_windows_enxio",
            windowed_qemu,
            |f| f.map(QEMU, QEMU_UA, WIN, 4096).map(|_| ()),
            Err(Errno::NXIO),
        ),
        (
            "map_size_unaligned_einval",
            windowed_qemu,
            |f| f.map(QEMU, QEMU_UA, 0, 100).map(|_| ()),
            Err(Errno::INVAL),
        ),
        (
            "map_vaddr_unaligned_einval",
            windowed_qemu,
            |f| f.map(QEMU, QEMU_UA + 8, 0, 4096).map(|_| ()),
            Err(Errno::INVAL),
        ),
        (
            "map_vaddr_not_registered_einval",
            windowed_qemu,
            |f| f.map(QEMU, QEMU_UA + RAM, 0, 4096).map(|_| ()),
            Err(Errno::INVAL),
        ),
        (
            "map_vaddr_registered_in_other_mm_einval",
            windowed_qemu,
            |f| {
                // The sidecar's own view of RAM is pinned nowhere the container looks.
                f.owner_ram(SIDECAR);
                f.map(QEMU, SIDECAR_UA, 0, 4096).map(|_| ())
            },
            Err(Errno::INVAL),
        ),
        (
            "map_past_window_end_einval",
            windowed_qemu,
            |f| f.map(QEMU, QEMU_UA, WIN - 4096, 8192).map(|_| ()),
            Err(Errno::INVAL),
        ),
        (
            "map_iommu_page_larger_than_host_page_einval",
            windowed_qemu,
            |f| {
                f.k.vfio_tce_create(QEMU, f.container, TceCreate::new(16, GIB, 1))?;
                f.map(QEMU, QEMU_UA, 1 << 59, 1 << 16).map(|_| ())
            },
            Err(Errno::INVAL),
        ),
        (
            "map_misaligned_iova_returns_1_ok",
            windowed_qemu,
            |f| {
                assert_eq!(f.map(QEMU, QEMU_UA, 0x800, 4096), Ok(1));
                assert_eq!(f.k.iommu_entry(1, 0), None);
                Ok(())
            },
            Ok(()),
        ),
        (
            "unmap_mapped_ok",
            windowed_qemu,
            |f| f.unmap(QEMU, 0, 4096).map(|_| ()),
            Ok(()),
        ),
        (
            "unmap_flags_einval",
            windowed_qemu,
            |f| {
                f.k.vfio_unmap_dma(
                    QEMU,
                    f.container,
                    DmaUnmap {
                        flags: 1,
                        ..DmaUnmap::new(0, 4096)
                    },
                )
                .map(|_| ())
            },
            Err(Errno::INVAL),
        ),
        (
            "unmap_size_unaligned_einval",
            windowed_qemu,
            |f| f.unmap(QEMU, 0, 100).map(|_| ()),
            Err(Errno::INVAL),
        ),
        (
            "unmap_outside_windows_enxio",
            windowed_qemu,
            |f| f.unmap(QEMU, WIN, 4096).map(|_| ()),
            Err(Errno::NXIO),
        ),
        (
            "unmap_before_enable_eperm",
            Fx::attached,
            |f| f.unmap(QEMU, 0, 4096).map(|_| ()),
            Err(Errno::PERM),
        ),
    ]);
}

#[test]
fn map_dma_programs_the_iommu_and_counts_mappings() {
    let mut f = Fx::windowed(QEMU);
    assert_eq!(f.map(QEMU, QEMU_UA + 0x10000, 0x2000, 0x3000), Ok(0));
    assert_eq!(f.mapped(QEMU), Some(3));
    assert_eq!(
        f.k.iommu_entry(1, 0x3000),
        Some(HwTce {
            mm: QEMU,
            ua: QEMU_UA + 0x11000,
            dir: DmaDir::Bidirectional
        })
    );
    // Replacing a mapping gives the old one's count back.
    assert_eq!(f.map(QEMU, QEMU_UA, 0x2000, 0x1000), Ok(0));
    assert_eq!(f.mapped(QEMU), Some(3));
    assert_eq!(f.unmap(QEMU, 0, WIN), Ok(0));
    assert_eq!(f.mapped(QEMU), Some(0));
    assert_eq!(f.k.iommu_entry(1, 0x3000), None);
}

#[test]
fn map_dma_v1_pins_each_page() {
    let mut f = Fx::bare();
    f.k.vfio_group_set_container(f.group, FileArg::File(f.container))
        .unwrap();
    f.k.vfio_set_iommu(f.container, VFIO_SPAPR_TCE_IOMMU)
        .unwrap();
    assert_eq!(
        f.map(QEMU, QEMU_UA, 0, 4096),
        Err(Errno::PERM),
        "v1 needs ENABLE"
    );
    f.k.vfio_iommu_enable(QEMU, f.container).unwrap();
    assert_eq!(f.k.vfio_iommu_enable(QEMU, f.container), Err(Errno::BUSY));
    assert_eq!(
        f.k.mm_stats(QEMU).locked_vm_pages,
        (2 * GIB) >> 12,
        "the whole 32-bit window"
    );
    assert_eq!(f.map(QEMU, QEMU_UA, 0, 0x2000), Ok(0));
    assert_eq!(f.k.mm_stats(QEMU).pinned_pages, 2);
    assert_eq!(
        f.map(QEMU, QEMU_UA + RAM, 0x2000, 0x1000),
        Err(Errno::FAULT)
    );
    assert_eq!(f.unmap(QEMU, 0, 0x2000), Ok(0));
    assert_eq!(f.k.mm_stats(QEMU).pinned_pages, 0);
}

#[test]
fn eeh_pe_op_rules() {
    fn eeh(f: &mut Fx, arg: EehPeOp) -> Result<(), Errno> {
        f.k.vfio_eeh_pe_op(QEMU, f.container, arg).map(|_| ())
    }
    run_cases(&[
        (
            "eeh_get_state_ok",
            Fx::attached,
            |f| eeh(f, EehPeOp::new(eeh_op::GET_STATE)),
            Ok(()),
        ),
        (
            "eeh_unknown_op_einval",
            Fx::attached,
            |f| eeh(f, EehPeOp::new(10)),
            Err(Errno::INVAL),
        ),
        (
            "eeh_flags_einval",
            Fx::attached,
            |f| {
                eeh(
                    f,
                    EehPeOp {
                        flags: 1,
                        ..EehPeOp::new(eeh_op::ENABLE)
                    },
                )
            },
            Err(Errno::INVAL),
        ),
        (
            "eeh_inject_short_argsz_einval",
            Fx::attached,
            |f| {
                eeh(
                    f,
                    EehPeOp {
                        argsz: EEH_PE_OP_MINSZ,
                        ..EehPeOp::new(eeh_op::INJECT_ERR)
                    },
                )
            },
            Err(Errno::INVAL),
        ),
        (
            "eeh_disabled_platform_enodev",
            || {
                let mut p = Platform::powernv();
                p.eeh = false;
                let mut f = Fx::bare_on(p);
                f.k.vfio_group_set_container(f.group, FileArg::File(f.container))
                    .unwrap();
                f.k.vfio_set_iommu(f.container, VFIO_SPAPR_TCE_V2_IOMMU)
                    .unwrap();
                f
            },
            |f| eeh(f, EehPeOp::new(eeh_op::ENABLE)),
            Err(Errno::NODEV),
        ),
    ]);
}

#[test]
fn hcall_rules() {
    fn h(f: &mut Fx, hcall: Hcall, want: HcallOutcome) -> Result<(), Errno> {
        let got = f.hcall(hcall);
        assert_eq!(got, want, "{hcall:?}");
        Ok(())
    }
    run_cases(&[
        (
            "put_tce_unknown_liobn_exits",
            associated_qemu,
            |f| {
                h(
                    f,
                    Hcall::PutTce {
                        liobn: 7,
                        ioba: 0,
                        tce: 0,
                    },
                    HcallOutcome::Exit,
                )
            },
            Ok(()),
        ),
        (
            "put_tce_ioba_unaligned_parameter",
            associated_qemu,
            |f| {
                h(
                    f,
                    Hcall::PutTce {
                        liobn: LIOBN,
                        ioba: 8,
                        tce: 0,
                    },
                    PARAM,
                )
            },
            Ok(()),
        ),
        (
            "put_tce_ioba_beyond_table_parameter",
            associated_qemu,
            |f| {
                h(
                    f,
                    Hcall::PutTce {
                        liobn: LIOBN,
                        ioba: WIN,
                        tce: 0,
                    },
                    PARAM,
                )
            },
            Ok(()),
        ),
        (
            "put_tce_map_registered_completes",
            associated_qemu,
            |f| {
                h(
                    f,
                    Hcall::PutTce {
                        liobn: LIOBN,
                        ioba: 0,
                        tce: 0x5000 | RW,
                    },
                    OK,
                )
            },
            Ok(()),
        ),
        (
            "put_tce_map_outside_memslots_exits",
            associated_qemu,
            |f| {
                h(
                    f,
                    Hcall::PutTce {
                        liobn: LIOBN,
                        ioba: 0,
                        tce: RAM | RW,
                    },
                    HcallOutcome::Exit,
                )
            },
            Ok(()),
        ),
        (
            "put_tce_unmap_completes",
            associated_qemu,
            |f| {
                h(
                    f,
                    Hcall::PutTce {
                        liobn: LIOBN,
                        ioba: 0,
                        tce: 0,
                    },
                    OK,
                )
            },
            Ok(()),
        ),
        (
            "put_tce_other_mm_eio",
            associated_qemu,
            |f| {
                f.k.vcpu_hcall(
                    SIDECAR,
                    f.vcpu,
                    Hcall::PutTce {
                        liobn: LIOBN,
                        ioba: 0,
                        tce: 0,
                    },
                )
                .map(|_| ())
            },
            Err(Errno::IO),
        ),
        (
            "put_tce_gpa_unaligned_to_table_page_exits",
            || {
                let mut f = Fx::associated(QEMU);
                let t = f.kvm_table(LIOBN + 1, 16, 0, WIN >> 16).unwrap();
                f.set_spapr_tce(QEMU, FileArg::File(f.group), FileArg::File(t))
                    .unwrap();
                f
            },
            |f| {
                h(
                    f,
                    Hcall::PutTce {
                        liobn: LIOBN + 1,
                        ioba: 0,
                        tce: 0x1000 | RW,
                    },
                    HcallOutcome::Exit,
                )
            },
            Ok(()),
        ),
        (
            "indirect_not_enabled_exits",
            associated_qemu,
            |f| {
                h(
                    f,
                    Hcall::PutTceIndirect {
                        liobn: LIOBN,
                        ioba: 0,
                        tce_list: 0x1000,
                        npages: 1,
                    },
                    HcallOutcome::Exit,
                )
            },
            Ok(()),
        ),
        (
            "indirect_513_parameter",
            indirect_enabled,
            |f| {
                h(
                    f,
                    Hcall::PutTceIndirect {
                        liobn: LIOBN,
                        ioba: 0,
                        tce_list: 0x1000,
                        npages: 513,
                    },
                    PARAM,
                )
            },
            Ok(()),
        ),
        (
            "indirect_list_unaligned_parameter",
            indirect_enabled,
            |f| {
                h(
                    f,
                    Hcall::PutTceIndirect {
                        liobn: LIOBN,
                        ioba: 0,
                        tce_list: 0x1008,
                        npages: 1,
                    },
                    PARAM,
                )
            },
            Ok(()),
        ),
        (
            "indirect_list_outside_memslots_exits",
            indirect_enabled,
            |f| {
                h(
                    f,
                    Hcall::PutTceIndirect {
                        liobn: LIOBN,
                        ioba: 0,
                        tce_list: RAM,
                        npages: 1,
                    },
                    HcallOutcome::Exit,
                )
            },
            Ok(()),
        ),
        (
            "indirect_unknown_liobn_exits",
            indirect_enabled,
            |f| {
                h(
                    f,
                    Hcall::PutTceIndirect {
                        liobn: 7,
                        ioba: 0,
                        tce_list: 0x1000,
                        npages: 1,
                    },
                    HcallOutcome::Exit,
                )
            },
            Ok(()),
        ),
        (
            "indirect_range_beyond_table_parameter",
            indirect_enabled,
            |f| {
                h(
                    f,
                    Hcall::PutTceIndirect {
                        liobn: LIOBN,
                        ioba: WIN - 4096,
                        tce_list: 0x1000,
                        npages: 2,
                    },
                    PARAM,
                )
            },
            Ok(()),
        ),
        (
            "stuff_not_enabled_exits",
            associated_qemu,
            |f| {
                h(
                    f,
                    Hcall::StuffTce {
                        liobn: LIOBN,
                        ioba: 0,
                        tce_value: 0,
                        npages: 1,
                    },
                    HcallOutcome::Exit,
                )
            },
            Ok(()),
        ),
        (
            "stuff_permission_bits_parameter",
            indirect_enabled,
            |f| {
                h(
                    f,
                    Hcall::StuffTce {
                        liobn: LIOBN,
                        ioba: 0,
                        tce_value: 1,
                        npages: 1,
                    },
                    PARAM,
                )
            },
            Ok(()),
        ),
        (
            "stuff_range_beyond_table_parameter",
            indirect_enabled,
            |f| {
                h(
                    f,
                    Hcall::StuffTce {
                        liobn: LIOBN,
                        ioba: 0,
                        tce_value: 0,
                        npages: (WIN >> 12) + 1,
                    },
                    PARAM,
                )
            },
            Ok(()),
        ),
        (
            "get_tce_unknown_liobn_exits",
            associated_qemu,
            |f| h(f, Hcall::GetTce { liobn: 7, ioba: 0 }, HcallOutcome::Exit),
            Ok(()),
        ),
        (
            "get_tce_unaligned_parameter",
            associated_qemu,
            |f| {
                h(
                    f,
                    Hcall::GetTce {
                        liobn: LIOBN,
                        ioba: 1,
                    },
                    PARAM,
                )
            },
            Ok(()),
        ),
        (
            "get_tce_never_written_zero",
            associated_qemu,
            |f| {
                h(
                    f,
                    Hcall::GetTce {
                        liobn: LIOBN,
                        ioba: 0x1000,
                    },
                    OK,
                )
            },
            Ok(()),
        ),
        (
            "enable_hcall_other_mm_eio",
            associated_qemu,
            |f| f.k.kvm_enable_hcall(SIDECAR, f.vm, H_STUFF_TCE, 1),
            Err(Errno::IO),
        ),
        (
            "enable_hcall_unmodelled_einval",
            associated_qemu,
            |f| f.k.kvm_enable_hcall(QEMU, f.vm, 0x8, 1),
            Err(Errno::INVAL),
        ),
    ]);
}

fn indirect_enabled() -> Fx {
    let mut f = Fx::associated(QEMU);
    f.k.kvm_enable_hcall(QEMU, f.vm, H_PUT_TCE_INDIRECT, 1)
        .unwrap();
    f.k.kvm_enable_hcall(QEMU, f.vm, H_STUFF_TCE, 1).unwrap();
    f
}

#[test]
fn put_tce_in_kernel_programs_the_iommu_and_reads_back() {
    let mut f = Fx::associated(QEMU);
    assert_eq!(f.put_tce(0x3000, 0x7000 | RW), OK);
    assert_eq!(
        f.k.iommu_entry(1, 0x3000),
        Some(HwTce {
            mm: QEMU,
            ua: QEMU_UA + 0x7000,
            dir: DmaDir::Bidirectional
        })
    );
    assert_eq!(f.mapped(QEMU), Some(1));
    assert_eq!(
        f.hcall(Hcall::GetTce {
            liobn: LIOBN,
            ioba: 0x3000
        }),
        HcallOutcome::Completed {
            ret: H_SUCCESS,
            value: 0x7000 | RW
        }
    );
    assert_eq!(f.put_tce(0x3000, 0), OK);
    assert_eq!(f.k.iommu_entry(1, 0x3000), None);
    assert_eq!(f.mapped(QEMU), Some(0));
    assert_eq!(
        f.k.hcall_stats(f.vm),
        Some(HcallStats {
            in_kernel: 3,
            exits: 0
        })
    );
}

#[test]
fn put_tce_indirect_reads_big_endian_list_from_guest_memory() {
    let mut f = indirect_enabled();
    // Three TCEs in a list at guest physical 0x1000.
    for (i, tce) in [0x20000 | RW, 0x21000 | TCE_PCI_READ, 0x22000 | RW]
        .iter()
        .enumerate()
    {
        f.ram.write(0x1000 + 8 * i, &tce.to_be_bytes());
    }
    let out = f.hcall(Hcall::PutTceIndirect {
        liobn: LIOBN,
        ioba: 0x10000,
        tce_list: 0x1000,
        npages: 3,
    });
    assert_eq!(out, OK);
    assert_eq!(f.mapped(QEMU), Some(3));
    assert_eq!(
        f.k.iommu_entry(1, 0x11000).map(|t| (t.ua, t.dir)),
        Some((QEMU_UA + 0x21000, DmaDir::ToDevice))
    );
    assert_eq!(f.k.spapr_tce_read(f.table(), 0x12), Ok(0x22000 | RW));
    // H_STUFF_TCE clears them again and gives the counts back.
    let out = f.hcall(Hcall::StuffTce {
        liobn: LIOBN,
        ioba: 0x10000,
        tce_value: 0,
        npages: 3,
    });
    assert_eq!(out, OK);
    assert_eq!(f.mapped(QEMU), Some(0));
    assert_eq!(f.k.iommu_entry(1, 0x11000), None);
}

#[test]
fn put_tce_with_smaller_hw_pages_maps_every_subpage() {
    let mut f = Fx::associated(QEMU);
    let t = f.kvm_table(LIOBN + 1, 16, 0, WIN >> 16).unwrap();
    f.set_spapr_tce(QEMU, FileArg::File(f.group), FileArg::File(t))
        .unwrap();
    let out = f.hcall(Hcall::PutTce {
        liobn: LIOBN + 1,
        ioba: 0x10000,
        tce: 0x30000 | RW,
    });
    assert_eq!(out, OK);
    assert_eq!(f.mapped(QEMU), Some(16));
    assert_eq!(
        f.k.iommu_entry(1, 0x1f000).map(|t| t.ua),
        Some(QEMU_UA + 0x3f000)
    );
}

/// K3: the same guest `H_PUT_TCE` completes in the kernel when the VM creator registered the
/// memory, and exits to userspace when another mm did — on every map, for good.
#[test]
fn put_tce_prereg_in_creator_mm_completes_in_other_mm_exits_k3() {
    let mut accelerated = Fx::associated(QEMU);
    let mut isolated = Fx::associated(SIDECAR);
    for i in 0..8u64 {
        assert_eq!(accelerated.put_tce(i << 12, (0x40000 + (i << 12)) | RW), OK);
        assert_eq!(
            isolated.put_tce(i << 12, (0x40000 + (i << 12)) | RW),
            HcallOutcome::Exit
        );
    }
    assert_eq!(
        accelerated.k.hcall_stats(accelerated.vm),
        Some(HcallStats {
            in_kernel: 8,
            exits: 0
        })
    );
    assert_eq!(
        isolated.k.hcall_stats(isolated.vm),
        Some(HcallStats {
            in_kernel: 0,
            exits: 8
        })
    );
    assert_eq!(isolated.k.iommu_entry(1, 0), None, "KVM programmed nothing");
    // An exit leaves the guest-visible table as it was: userspace completes the call.
    assert_eq!(isolated.k.spapr_tce_read(isolated.table(), 0), Ok(0));
}

/// K7, first half: a KVM table without a hardware table completes every map in the kernel and
/// programs no IOMMU.
#[test]
fn put_tce_unattached_table_completes_without_programming_iommu_k7() {
    let mut f = Fx::windowed(SIDECAR);
    assert_eq!(f.put_tce(0x1000, 0x9000 | RW), OK);
    assert_eq!(f.k.spapr_tce_read(f.table(), 1), Ok(0x9000 | RW));
    assert_eq!(f.k.iommu_entry(1, 0x1000), None);
    assert_eq!(
        f.k.hcall_stats(f.vm),
        Some(HcallStats {
            in_kernel: 1,
            exits: 0
        })
    );
}

/// K7, second half: with the KVM table attached while the container lives in the sidecar's mm,
/// a guest unmap of a sidecar mapping leaks the sidecar's pinned pages.
#[test]
fn put_tce_unmap_with_container_in_other_mm_leaks_pinned_pages_k7() {
    for attach in [false, true] {
        let mut f = if attach {
            Fx::associated(SIDECAR)
        } else {
            Fx::windowed(SIDECAR)
        };
        // The slow path: the sidecar maps guest page 0x5000 at bus address 0x1000.
        f.map(SIDECAR, SIDECAR_UA + 0x5000, 0x1000, 0x1000).unwrap();
        assert_eq!(f.mapped(SIDECAR), Some(1));
        // The guest unmaps it.
        let out = f.put_tce(0x1000, 0);
        if attach {
            // KVM clears the entry, fails to find the sidecar's address in QEMU's mm, puts the
            // entry back, then clears it for good without the count: exit to userspace.
            assert_eq!(out, HcallOutcome::Exit);
            assert_eq!(
                f.k.iommu_entry(1, 0x1000),
                None,
                "hardware entry already gone"
            );
        } else {
            assert_eq!(out, OK);
            assert!(
                f.k.iommu_entry(1, 0x1000).is_some(),
                "unattached: userspace must unmap"
            );
        }
        // QEMU forwards the unmap; the sidecar's UNMAP_DMA finds an empty entry if KVM got there.
        assert_eq!(f.unmap(SIDECAR, 0x1000, 0x1000), Ok(0));
        assert_eq!(f.mapped(SIDECAR), Some(u64::from(attach)));
        let unreg =
            f.k.vfio_unregister_memory(SIDECAR, f.container, RegisterMemory::new(SIDECAR_UA, RAM));
        assert_eq!(unreg, Ok(()), "returns 0 either way");
        let pinned = f.k.mm_stats(SIDECAR).pinned_pages;
        if attach {
            assert_eq!(pinned, RAM >> 12, "leaked: the whole region stays pinned");
            assert!(f.k.mm_stats(SIDECAR).locked_vm_pages >= RAM >> 12);
        } else {
            assert_eq!(pinned, 0);
        }
    }
}

#[test]
fn closing_the_table_file_drops_its_associations() {
    let mut f = Fx::associated(QEMU);
    let before = f.k.mm_stats(QEMU).locked_vm_pages;
    f.k.close(f.table()).unwrap();
    assert_eq!(f.k.file_kind(f.table()), None);
    assert_eq!(
        f.put_tce(0, 0x1000 | RW),
        HcallOutcome::Exit,
        "no table for the LIOBN"
    );
    assert!(f.k.mm_stats(QEMU).locked_vm_pages < before);
    assert_eq!(f.k.close(f.table()), Err(Errno::BADF));
}

#[test]
fn group_file_added_to_kvm_outlives_its_fd() {
    let mut f = Fx::associated(QEMU);
    f.k.close(f.group).unwrap();
    // The kvm-vfio device still holds the file: still attached, still in the container, and
    // the group cannot be opened again.
    assert_eq!(f.k.file_kind(f.group), Some(FileKind::VfioGroup));
    assert_eq!(f.k.open_vfio_group(1), Err(Errno::BUSY));
    assert_eq!(f.put_tce(0, 0x1000 | RW), OK);
    // Dropping the device releases the file, which leaves the container and frees the driver.
    f.k.close(f.dev()).unwrap();
    assert_eq!(f.k.file_kind(f.group), None);
    assert_eq!(f.k.container_mm(f.container), None);
    assert!(f.k.open_vfio_group(1).is_ok());
}

#[test]
fn vm_calls_from_other_mm_eio_k1() {
    let mut f = Fx::bare();
    let region = UserMemoryRegion {
        slot: 1,
        flags: 0,
        guest_phys_addr: RAM,
        memory_size: 4096,
        userspace_addr: QEMU_UA + RAM,
    };
    assert_eq!(
        f.k.kvm_set_user_memory_region(SIDECAR, f.vm, region),
        Err(Errno::IO)
    );
    assert_eq!(
        f.k.kvm_create_vcpu(SIDECAR, f.vm, 1).map(|_| ()),
        Err(Errno::IO)
    );
    assert_eq!(
        f.k.kvm_check_extension(SIDECAR, f.vm, KVM_CAP_SPAPR_TCE_VFIO),
        Err(Errno::IO)
    );
    assert_eq!(
        f.k.kvm_check_extension(QEMU, f.vm, KVM_CAP_SPAPR_TCE_VFIO),
        Ok(1)
    );
    let kvm = f.k.open_kvm();
    // /dev/kvm itself has no owner.
    assert_eq!(
        f.k.kvm_check_extension(SIDECAR, kvm, KVM_CAP_SPAPR_TCE_64),
        Ok(1)
    );
}

#[test]
fn memslot_rules() {
    fn slot(f: &mut Fx, slot: u32, flags: u32, gpa: u64, size: u64, ua: u64) -> Result<(), Errno> {
        let r = UserMemoryRegion {
            slot,
            flags,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: ua,
        };
        f.k.kvm_set_user_memory_region(QEMU, f.vm, r)
    }
    run_cases(&[
        (
            "memslot_new_ok",
            Fx::bare,
            |f| slot(f, 1, 0, RAM, 4096, QEMU_UA + RAM),
            Ok(()),
        ),
        (
            "memslot_unaligned_einval",
            Fx::bare,
            |f| slot(f, 1, 0, RAM + 1, 4096, QEMU_UA + RAM),
            Err(Errno::INVAL),
        ),
        (
            "memslot_readonly_flag_einval",
            Fx::bare,
            |f| slot(f, 1, 2, RAM, 4096, QEMU_UA + RAM),
            Err(Errno::INVAL),
        ),
        (
            "memslot_overlap_eexist",
            Fx::bare,
            |f| slot(f, 1, 0, 0, 4096, QEMU_UA + RAM),
            Err(Errno::EXIST),
        ),
        (
            "memslot_slot_out_of_range_einval",
            Fx::bare,
            |f| slot(f, 512, 0, RAM, 4096, QEMU_UA + RAM),
            Err(Errno::INVAL),
        ),
        (
            "memslot_resize_einval",
            Fx::bare,
            |f| slot(f, 0, 0, 0, RAM / 2, QEMU_UA),
            Err(Errno::INVAL),
        ),
        (
            "memslot_move_ok",
            Fx::bare,
            |f| slot(f, 0, 0, 2 * RAM, RAM, QEMU_UA),
            Ok(()),
        ),
        (
            "memslot_delete_ok",
            Fx::bare,
            |f| slot(f, 0, 0, 0, 0, QEMU_UA),
            Ok(()),
        ),
        (
            "memslot_delete_missing_einval",
            Fx::bare,
            |f| slot(f, 3, 0, 0, 0, 0),
            Err(Errno::INVAL),
        ),
    ]);
}

/// FILE_DEL releases only links to the group's *current* tables: removing the window first
/// leaves KVM's link (and its reference to the hardware table) in place until the KVM table
/// itself is closed. QEMU deletes the file before removing windows for this reason.
#[test]
fn file_del_after_window_removal_keeps_the_link() {
    let mut f = Fx::associated(QEMU);
    f.k.vfio_tce_remove(QEMU, f.container, TceRemove::new(0))
        .unwrap();
    f.k.kvm_vfio_file_del(QEMU, f.dev(), FileArg::File(f.group))
        .unwrap();
    assert_eq!(f.k.spapr_tce_attached(f.table()), 1);
    // KVM still programs the orphaned table, which no IOMMU uses any more.
    assert_eq!(f.put_tce(0, 0x1000 | RW), OK);
    assert_eq!(f.k.iommu_entry(1, 0), None);
    f.k.close(f.table()).unwrap();
    assert!(
        f.k.hw_tables.is_empty(),
        "the last reference freed the table"
    );
}

/// A group joining a container gets the container's existing windows, with their entries: the
/// hardware table is shared by every group of the container.
#[test]
fn group_joining_container_shares_its_windows() {
    let mut f = Fx::windowed(QEMU);
    f.map(QEMU, QEMU_UA + 0x4000, 0x1000, 0x1000).unwrap();
    let g2 = f.k.open_vfio_group(2).unwrap();
    f.k.vfio_group_set_container(g2, FileArg::File(f.container))
        .unwrap();
    assert_eq!(f.k.iommu_entry(2, 0x1000), f.k.iommu_entry(1, 0x1000));
    assert!(f.k.iommu_entry(2, 0x1000).is_some());
    // Leaving clears the windows' TCEs (2024 kernels) and takes them off the group.
    f.k.vfio_group_unset_container(g2).unwrap();
    assert_eq!(f.k.iommu_entry(2, 0x1000), None);
    assert_eq!(f.k.iommu_entry(1, 0x1000), None);
    assert_eq!(f.mapped(QEMU), Some(0));
}

#[test]
fn hcall_numbers_match_papr_and_kvm_enable_hcall_accepts_them() {
    // PAPR / hvcall.h numbers; the lab's Linux 6.12 accepts KVM_CAP_PPC_ENABLE_HCALL for
    // exactly these (it refuses numbers that are not multiples of 4 with EINVAL).
    use crate::kernel::model::{H_GET_TCE, H_PUT_TCE, H_PUT_TCE_INDIRECT, H_STUFF_TCE};
    assert_eq!(
        [H_GET_TCE, H_PUT_TCE, H_PUT_TCE_INDIRECT, H_STUFF_TCE],
        [0x1c, 0x20, 0x13c, 0x138]
    );
    assert!([H_GET_TCE, H_PUT_TCE, H_PUT_TCE_INDIRECT, H_STUFF_TCE]
        .iter()
        .all(|h| h % 4 == 0));
}

/// Linux 6.12 warns (virt/kvm/vfio.c:103, seen in the nested lab) when the kvm-vfio device lets
/// go of a group file that never had SET_SPAPR_TCE, by FILE_DEL or when the device is released.
/// A file whose SET_SPAPR_TCE was tried, even if refused, goes quietly.
#[test]
fn kvm_vfio_warns_for_a_file_never_associated() {
    let mut f = Fx::windowed(QEMU);
    let dev = f.dev();
    f.k.kvm_vfio_file_del(QEMU, dev, FileArg::File(f.group))
        .unwrap();
    assert_eq!(f.k.warnings(), ["kvm_spapr_tce_release_vfio_group"]);

    // Released with the device (the VM process exits).
    f.k.kvm_vfio_file_add(QEMU, dev, FileArg::File(f.group))
        .unwrap();
    f.k.close(dev).unwrap();
    assert_eq!(f.k.warnings().len(), 2);

    let mut f = Fx::associated(QEMU);
    let dev = f.dev();
    f.k.kvm_vfio_file_del(QEMU, dev, FileArg::File(f.group))
        .unwrap();
    f.k.close(dev).unwrap();
    assert!(f.k.warnings().is_empty());

    // A refused association still records the group, as kvm_vfio_file_set_spapr_tce() does.
    let mut f = Fx::windowed(QEMU);
    let dev = f.dev();
    let foreign = FileArg::File(f.container);
    assert!(f
        .set_spapr_tce(QEMU, FileArg::File(f.group), foreign)
        .is_err());
    f.k.kvm_vfio_file_del(QEMU, dev, FileArg::File(f.group))
        .unwrap();
    assert!(f.k.warnings().is_empty());
}
