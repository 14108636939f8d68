//! The guest's TCE hypercalls as KVM handles them in virtual mode (`book3s_64_vio.c`; the
//! real-mode handlers were removed in 2022).
//!
//! K3: for each hardware table attached to the KVM table, the guest address is translated
//! through the VM's memslots into the VM creator's user address and looked up with
//! `mm_iommu_lookup(kvm->mm, ...)`: memory pre-registered in any other mm is invisible here and
//! the call exits to userspace (`H_TOO_HARD`).

use rustix::io::Errno;

use super::abi::{
    DmaDir, Hcall, HcallOutcome, H_PARAMETER, H_SUCCESS, H_TOO_HARD, MAX_INDIRECT_TCES,
    TCE_PCI_READ, TCE_PCI_WRITE,
};
use super::kernel::{FileId, HwTableId, HwTce, Mm, ModelKernel, Obj, SttId, VmId};

type HResult = Result<(), i64>;

impl ModelKernel {
    /// The vCPU behind `vcpu` runs and its guest issues `hcall` (`KVM_RUN`). K1 applies to the
    /// vCPU file; the outcome says whether KVM completed the call or exited to userspace, and is
    /// counted in the VM's [`super::HcallStats`].
    pub fn vcpu_hcall(
        &mut self,
        caller: Mm,
        vcpu: FileId,
        hcall: Hcall,
    ) -> Result<HcallOutcome, Errno> {
        let vm = match self.obj(vcpu) {
            Some(Obj::Vcpu(vm)) => vm,
            Some(_) => return Err(Errno::NOTTY),
            None => return Err(Errno::BADF),
        };
        let creator = self.vm_caller(caller, vm)?.creator;
        let enabled = self
            .vms
            .get(&vm)
            .is_some_and(|v| v.enabled_hcalls.contains(&hcall.number()));
        let outcome = if !enabled {
            HcallOutcome::Exit
        } else {
            let (ret, value) = match hcall {
                Hcall::PutTce { liobn, ioba, tce } => {
                    (self.h_put_tce(vm, creator, liobn, ioba, tce), 0)
                }
                Hcall::PutTceIndirect {
                    liobn,
                    ioba,
                    tce_list,
                    npages,
                } => (
                    self.h_put_tce_indirect(vm, creator, liobn, ioba, tce_list, npages),
                    0,
                ),
                Hcall::StuffTce {
                    liobn,
                    ioba,
                    tce_value,
                    npages,
                } => (
                    self.h_stuff_tce(vm, creator, liobn, ioba, tce_value, npages),
                    0,
                ),
                Hcall::GetTce { liobn, ioba } => match self.h_get_tce(vm, liobn, ioba) {
                    Ok(v) => (H_SUCCESS, v),
                    Err(e) => (e, 0),
                },
            };
            if ret == H_TOO_HARD {
                HcallOutcome::Exit
            } else {
                HcallOutcome::Completed { ret, value }
            }
        };
        if let Some(v) = self.vms.get_mut(&vm) {
            match outcome {
                HcallOutcome::Exit => v.stats.exits += 1,
                HcallOutcome::Completed { .. } => v.stats.in_kernel += 1,
            }
        }
        Ok(outcome)
    }

    /// A hypercall by number and argument registers r4..r7. Numbers the model does not handle
    /// exit to userspace, as hypercalls KVM does not implement do.
    pub fn vcpu_hcall_raw(
        &mut self,
        caller: Mm,
        vcpu: FileId,
        number: u64,
        args: [u64; 4],
    ) -> Result<HcallOutcome, Errno> {
        if let Some(hcall) = Hcall::from_regs(number, args) {
            return self.vcpu_hcall(caller, vcpu, hcall);
        }
        let vm = match self.obj(vcpu) {
            Some(Obj::Vcpu(vm)) => vm,
            Some(_) => return Err(Errno::NOTTY),
            None => return Err(Errno::BADF),
        };
        self.vm_caller(caller, vm)?;
        if let Some(v) = self.vms.get_mut(&vm) {
            v.stats.exits += 1;
        }
        Ok(HcallOutcome::Exit)
    }

    fn find_table(&self, vm: VmId, liobn: u64) -> Option<SttId> {
        self.vms
            .get(&vm)?
            .stts
            .iter()
            .copied()
            .find(|s| self.stts.get(s).is_some_and(|s| s.liobn == liobn))
    }

    /// `kvmppc_ioba_validate`.
    fn ioba_validate(&self, stt: SttId, ioba: u64, npages: u64) -> HResult {
        let s = self.stts.get(&stt).ok_or(H_PARAMETER)?;
        let mask = (1u64 << s.page_shift) - 1;
        let idx = ioba >> s.page_shift;
        if ioba & mask != 0
            || idx < s.offset
            || (idx - s.offset).wrapping_add(npages) > s.size
            || idx.wrapping_add(npages) < idx
        {
            return Err(H_PARAMETER);
        }
        Ok(())
    }

    /// `kvmppc_tce_to_ua`: the creator's user address for a TCE's guest address, through the
    /// memslots.
    fn tce_to_ua(&self, vm: VmId, tce: u64) -> Option<u64> {
        let shift = self.platform.host_page_shift;
        let gfn = tce >> shift;
        let slot = self
            .vms
            .get(&vm)?
            .memslots
            .values()
            .find(|m| m.base_gfn <= gfn && gfn < m.base_gfn + m.npages)?;
        let page_mask = !((1u64 << shift) - 1);
        Some(
            (slot.userspace_addr + ((gfn - slot.base_gfn) << shift))
                | (tce & !(page_mask | TCE_PCI_READ | TCE_PCI_WRITE)),
        )
    }

    fn stits(&self, stt: SttId) -> Vec<HwTableId> {
        self.stts
            .get(&stt)
            .map(|s| s.stits.iter().map(|x| x.hw).collect())
            .unwrap_or_default()
    }

    fn hw_shift(&self, t: HwTableId) -> u32 {
        self.hw_tables.get(&t).map_or(0, |h| h.page_shift)
    }

    /// `kvmppc_tce_validate`.
    fn tce_validate(&self, stt: SttId, vm: VmId, kvm_mm: Mm, tce: u64) -> HResult {
        let Some(s) = self.stts.get(&stt) else {
            return Err(H_PARAMETER);
        };
        let dir = DmaDir::of_tce(tce);
        // "Allow userspace to poison TCE table"
        if dir == DmaDir::None {
            return Ok(());
        }
        let gpa = tce & !(TCE_PCI_READ | TCE_PCI_WRITE);
        if gpa & ((1u64 << s.page_shift) - 1) != 0 {
            return Err(H_TOO_HARD);
        }
        let ua = self.tce_to_ua(vm, tce).ok_or(H_TOO_HARD)?;
        for t in self.stits(stt) {
            let shift = self.hw_shift(t);
            match self.mm_iommu_lookup(kvm_mm, ua, 1 << shift) {
                Some(id) if self.mm_iommu_ua_ok(kvm_mm, id, ua, shift) => {}
                _ => return Err(H_TOO_HARD),
            }
        }
        Ok(())
    }

    /// `kvmppc_tce_put`: the guest-visible entry.
    fn tce_put(&mut self, stt: SttId, entry: u64, tce: u64) {
        if let Some(s) = self.stts.get_mut(&stt) {
            let idx = entry - s.offset;
            s.store.put(idx, tce);
        }
    }

    fn subpages(&self, stt: SttId, t: HwTableId) -> (u64, u32) {
        let stt_shift = self.stts.get(&stt).map_or(0, |s| s.page_shift);
        let shift = self.hw_shift(t);
        (1u64 << (stt_shift - shift), shift)
    }

    /// `kvmppc_clear_tce`: empties the hardware entries of one guest entry, without giving any
    /// region its mapped count back and without touching the cached user address.
    fn clear_tce(&mut self, stt: SttId, t: HwTableId, entry: u64) {
        let (subpages, _) = self.subpages(stt, t);
        for i in 0..subpages {
            self.hw_xchg(t, entry * subpages + i, None);
        }
    }

    /// `kvmppc_tce_iommu_mapped_dec`: the cached user address looked up in the VM creator's mm.
    fn iommu_mapped_dec(&mut self, kvm_mm: Mm, t: HwTableId, entry: u64) -> HResult {
        let ua = self.hw_userspace(t, entry);
        let id = self
            .mm_iommu_lookup(kvm_mm, ua, 1 << self.hw_shift(t))
            .ok_or(H_TOO_HARD)?;
        self.mm_iommu_mapped_dec(kvm_mm, id);
        self.hw_set_userspace(t, entry, 0);
        Ok(())
    }

    /// `kvmppc_tce_iommu_do_unmap`.
    fn iommu_do_unmap(&mut self, kvm_mm: Mm, t: HwTableId, entry: u64) -> HResult {
        let old = self.hw_xchg(t, entry, None);
        let Some(old) = old.filter(|o| o.dir != DmaDir::None) else {
            return Ok(());
        };
        let ret = self.iommu_mapped_dec(kvm_mm, t, entry);
        if ret.is_err() {
            // Put the entry back; the caller then clears it for good without the dec.
            self.hw_xchg(t, entry, Some(old));
        }
        ret
    }

    /// `kvmppc_tce_iommu_unmap`.
    fn iommu_unmap(&mut self, kvm_mm: Mm, stt: SttId, t: HwTableId, entry: u64) -> HResult {
        let (subpages, _) = self.subpages(stt, t);
        for i in 0..subpages {
            self.iommu_do_unmap(kvm_mm, t, entry * subpages + i)?;
        }
        Ok(())
    }

    /// `kvmppc_tce_iommu_do_map`.
    fn iommu_do_map(
        &mut self,
        kvm_mm: Mm,
        t: HwTableId,
        entry: u64,
        ua: u64,
        dir: DmaDir,
    ) -> HResult {
        let shift = self.hw_shift(t);
        // "This only handles v2 IOMMU type, v1 is handled via ioctl()"
        let id = self
            .mm_iommu_lookup(kvm_mm, ua, 1 << shift)
            .ok_or(H_TOO_HARD)?;
        if !self.mm_iommu_ua_ok(kvm_mm, id, ua, shift) || !self.mm_iommu_mapped_inc(kvm_mm, id) {
            return Err(H_TOO_HARD);
        }
        let old = self.hw_xchg(
            t,
            entry,
            Some(HwTce {
                mm: kvm_mm,
                ua,
                dir,
            }),
        );
        if old.is_some_and(|o| o.dir != DmaDir::None) {
            // The old entry's count: its result is ignored, so a miss leaks it.
            let _ = self.iommu_mapped_dec(kvm_mm, t, entry);
        }
        self.hw_set_userspace(t, entry, ua);
        Ok(())
    }

    /// `kvmppc_tce_iommu_map`.
    fn iommu_map(
        &mut self,
        kvm_mm: Mm,
        stt: SttId,
        t: HwTableId,
        entry: u64,
        ua: u64,
        dir: DmaDir,
    ) -> HResult {
        let (subpages, shift) = self.subpages(stt, t);
        for i in 0..subpages {
            self.iommu_do_map(
                kvm_mm,
                t,
                entry * subpages + i,
                ua.wrapping_add(i << shift),
                dir,
            )?;
        }
        Ok(())
    }

    /// `kvmppc_h_put_tce`.
    fn h_put_tce(&mut self, vm: VmId, kvm_mm: Mm, liobn: u64, ioba: u64, tce: u64) -> i64 {
        let Some(stt) = self.find_table(vm, liobn) else {
            return H_TOO_HARD;
        };
        let run = |k: &mut Self| -> HResult {
            k.ioba_validate(stt, ioba, 1)?;
            k.tce_validate(stt, vm, kvm_mm, tce)?;
            let dir = DmaDir::of_tce(tce);
            let ua = match dir {
                DmaDir::None => 0,
                _ => k.tce_to_ua(vm, tce).ok_or(H_PARAMETER)?,
            };
            let entry = ioba >> k.stts.get(&stt).map_or(0, |s| s.page_shift);
            for t in k.stits(stt) {
                let ret = match dir {
                    DmaDir::None => k.iommu_unmap(kvm_mm, stt, t, entry),
                    _ => k.iommu_map(kvm_mm, stt, t, entry, ua, dir),
                };
                if ret.is_err() {
                    k.clear_tce(stt, t, entry);
                    return ret;
                }
            }
            k.tce_put(stt, entry, tce);
            Ok(())
        };
        run(self).err().unwrap_or(H_SUCCESS)
    }

    /// `kvmppc_h_put_tce_indirect`: up to 512 big-endian TCEs from a 4K-aligned guest page,
    /// read from the creator's memory.
    #[allow(clippy::too_many_arguments)]
    fn h_put_tce_indirect(
        &mut self,
        vm: VmId,
        kvm_mm: Mm,
        liobn: u64,
        ioba: u64,
        tce_list: u64,
        npages: u64,
    ) -> i64 {
        let Some(stt) = self.find_table(vm, liobn) else {
            return H_TOO_HARD;
        };
        let run = |k: &mut Self| -> HResult {
            let entry = ioba >> k.stts.get(&stt).map_or(0, |s| s.page_shift);
            if npages > MAX_INDIRECT_TCES || tce_list & 0xfff != 0 {
                return Err(H_PARAMETER);
            }
            k.ioba_validate(stt, ioba, npages)?;
            let list_ua = k.tce_to_ua(vm, tce_list).ok_or(H_TOO_HARD)?;
            let get = |k: &Self, i: u64| -> Result<u64, i64> {
                let mut b = [0u8; 8];
                if !list_ua
                    .checked_add(8 * i)
                    .is_some_and(|ua| k.read_user(kvm_mm, ua, &mut b))
                {
                    return Err(H_TOO_HARD);
                }
                Ok(u64::from_be_bytes(b))
            };
            for i in 0..npages {
                let tce = get(k, i)?;
                k.tce_validate(stt, vm, kvm_mm, tce)?;
            }
            for i in 0..npages {
                let tce = get(k, i)?;
                let ua = k.tce_to_ua(vm, tce).ok_or(H_PARAMETER)?;
                for t in k.stits(stt) {
                    let ret = k.iommu_map(kvm_mm, stt, t, entry + i, ua, DmaDir::of_tce(tce));
                    if ret.is_err() {
                        k.clear_tce(stt, t, entry + i);
                        return ret;
                    }
                }
                k.tce_put(stt, entry + i, tce);
            }
            Ok(())
        };
        run(self).err().unwrap_or(H_SUCCESS)
    }

    /// `kvmppc_h_stuff_tce`: sets `npages` entries to a value without permission bits.
    #[allow(clippy::too_many_arguments)]
    fn h_stuff_tce(
        &mut self,
        vm: VmId,
        kvm_mm: Mm,
        liobn: u64,
        ioba: u64,
        tce_value: u64,
        npages: u64,
    ) -> i64 {
        let Some(stt) = self.find_table(vm, liobn) else {
            return H_TOO_HARD;
        };
        if let Err(e) = self.ioba_validate(stt, ioba, npages) {
            return e;
        }
        if tce_value & (TCE_PCI_READ | TCE_PCI_WRITE) != 0 {
            return H_PARAMETER;
        }
        let shift = self.stts.get(&stt).map_or(0, |s| s.page_shift);
        let entry = ioba >> shift;
        for t in self.stits(stt) {
            for i in 0..npages {
                match self.iommu_unmap(kvm_mm, stt, t, entry + i) {
                    Ok(()) => {}
                    Err(H_TOO_HARD) => return H_TOO_HARD,
                    Err(_) => self.clear_tce(stt, t, entry + i),
                }
            }
        }
        for i in 0..npages {
            self.tce_put(stt, entry + i, tce_value);
        }
        H_SUCCESS
    }

    /// `kvmppc_h_get_tce`: the guest-visible entry.
    fn h_get_tce(&self, vm: VmId, liobn: u64, ioba: u64) -> Result<u64, i64> {
        let stt = self.find_table(vm, liobn).ok_or(H_TOO_HARD)?;
        self.ioba_validate(stt, ioba, 1)?;
        let s = self.stts.get(&stt).ok_or(H_PARAMETER)?;
        Ok(s.store.get((ioba >> s.page_shift) - s.offset))
    }
}
