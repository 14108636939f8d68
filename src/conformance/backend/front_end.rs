//! A front-end on the model kernel, for the checks that need owner operations executed: a VM
//! made as this process (`MODEL.md`), its objects, and a transaction runner that checks every
//! operation against §6.3 before it executes it, as §1.2 requires of a front-end.
//!
//! Operations run on the model through the crate's model backend: that is kernel work. The
//! wire side (records, results) is written by hand in [`super::super::wire`].

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use crate::client::model_vm::{GuestTable, ModelVm};
use crate::conformance::wire::*;
use crate::kernel::model::server::ModelClient;
use crate::kernel::model::MmStats;
use crate::kernel::model_backend::ModelBackend;
use crate::kernel::{
    ContainerId, GroupId, Kernel, KernelOp, Mapping, ObjectTable, Output, RegionId, TableId,
};
use crate::protocol::DmaAccess;

/// Guest RAM of every front-end here: region 0, at guest address 0.
pub const RAM: u64 = 1 << 20;
/// The most replies with `OPS` one transaction may take here (§1.2: bounded transactions).
const MAX_ROUNDS: usize = 64;

/// How the front-end answers the operations of one transaction.
#[derive(Clone, Copy, Debug, Default)]
pub enum Inject {
    /// Execute every operation in scope.
    #[default]
    None,
    /// Report the forward operation with this index (from 0, across the transaction's
    /// replies) as failed with `-EIO`, without executing it.
    FailAt(usize),
    /// Report the first forward operation of this kind as failed with `-EIO`, unexecuted.
    FailFirst(u16),
}

impl Inject {
    /// Whether to fail the forward operation `op`, number `index`; `failed_one` says whether
    /// one was failed already.
    fn fails(self, index: usize, op: &Op, failed_one: &mut bool) -> bool {
        let fails = match self {
            Inject::None => false,
            Inject::FailAt(i) => i == index,
            Inject::FailFirst(kind) => kind == op.kind && !*failed_one,
        };
        *failed_one |= fails;
        fails
    }
}

/// What a transaction asked for and how it ended.
#[derive(Debug)]
pub struct Transaction {
    pub last: Reply,
    /// Each reply's operations, and whether it carried `ROLLBACK`.
    pub batches: Vec<(bool, Vec<Op>)>,
    /// Operations that broke §6.3 (answered with `-EPERM`).
    pub violations: Vec<String>,
}

impl Transaction {
    /// Forward operations: those of replies without `ROLLBACK`.
    pub fn forward(&self) -> Vec<Op> {
        self.batches
            .iter()
            .filter(|(rollback, _)| !rollback)
            .flat_map(|(_, ops)| ops.iter().copied())
            .collect()
    }
    pub fn rollback(&self) -> Vec<Op> {
        self.batches
            .iter()
            .filter(|(rollback, _)| *rollback)
            .flat_map(|(_, ops)| ops.iter().copied())
            .collect()
    }
    /// The transaction asked for nothing out of scope.
    pub fn in_scope(self) -> Result<Self, String> {
        match self.violations.first() {
            None => Ok(self),
            Some(v) => Err(v.clone()),
        }
    }
}

/// The front-end's own objects, by protocol id, and the container each belongs to.
#[derive(Default)]
struct Registry {
    regions: BTreeMap<u32, u64>,
    groups: BTreeMap<u32, u32>,
    /// Each table's container and window (bus start, bus end).
    tables: BTreeMap<u32, (u32, u64, u64)>,
}

pub struct FrontEnd {
    pub vm: ModelVm,
    kernel: ModelBackend,
    objects: ObjectTable,
    registry: Registry,
    /// Copies of the group fds, to ask the model for their status.
    group_fds: BTreeMap<u32, OwnedFd>,
    /// The tables the front-end made, kept open as QEMU keeps them.
    pub tables: BTreeMap<u32, GuestTable>,
}

fn model_error(what: &str) -> impl Fn(crate::kernel::model::server::CallError) -> String + '_ {
    move |e| format!("the model kernel refused {what}: {e}")
}

impl FrontEnd {
    /// A VM with [`RAM`] bytes of guest RAM as region 0, mapped in this process.
    pub fn new(model_socket: &Path) -> Result<Self, String> {
        let mut vm = ModelVm::create(model_socket).map_err(model_error("a VM"))?;
        vm.add_ram(0, 0, RAM).map_err(model_error("guest RAM"))?;
        let mut kernel = vm.kernel().map_err(model_error("a connection"))?;
        let ram = &vm.ram()[0];
        kernel
            .memory_mapped(ram.memfd.as_fd(), 0, ram.mapping.addr(), RAM)
            .map_err(|e| format!("the model kernel refused the RAM mapping: {e}"))?;
        let device = vm.kvm_vfio_device().map_err(|e| e.to_string())?;
        let mut objects = ObjectTable {
            kvm_vfio: Some(device),
            ..ObjectTable::default()
        };
        objects.regions.insert(
            RegionId(0),
            Mapping {
                addr: ram.mapping.addr(),
                size: RAM,
            },
        );
        Ok(Self {
            vm,
            kernel,
            objects,
            registry: Registry::default(),
            group_fds: BTreeMap::new(),
            tables: BTreeMap::new(),
        })
    }

    pub fn model(&self) -> &ModelClient {
        self.vm.model()
    }

    pub fn ram_fd(&self) -> BorrowedFd<'_> {
        self.vm.ram()[0].memfd.as_fd()
    }

    /// Guest RAM region 1: [`RAM`] bytes more, after region 0; returns its `MEM_ADD` payload.
    pub fn second_region(&mut self, page_shift: u32) -> Result<Vec<u8>, String> {
        let ram = self
            .vm
            .add_ram(1, RAM, RAM)
            .map_err(model_error("more guest RAM"))?;
        let (fd, addr) = (ram.memfd.as_fd(), ram.mapping.addr());
        self.kernel
            .memory_mapped(fd, 0, addr, RAM)
            .map_err(|e| format!("the model kernel refused the RAM mapping: {e}"))?;
        self.objects
            .regions
            .insert(RegionId(1), Mapping { addr, size: RAM });
        self.registry.regions.insert(1, RAM);
        Ok(Le::new()
            .u32(1)
            .u32(page_shift)
            .u64(RAM)
            .u64(RAM)
            .u64(addr)
            .u64(0)
            .bytes())
    }

    /// `MEM_ADD` of region 0 (`page_shift` 0 unless the session has `FDS_BY_MODE`).
    pub fn mem_add(&mut self, page_shift: u32) -> Vec<u8> {
        self.registry.regions.insert(0, RAM);
        Le::new()
            .u32(0)
            .u32(page_shift)
            .u64(0)
            .u64(RAM)
            .u64(self.vm.ram()[0].mapping.addr())
            .u64(0)
            .bytes()
    }

    /// Opens `iommu_group` as group `group` of `container`; returns the fd to send.
    pub fn group(
        &mut self,
        group: u32,
        container: u32,
        iommu_group: u32,
    ) -> Result<OwnedFd, String> {
        let fd = self
            .vm
            .open_group(iommu_group)
            .map_err(model_error("the VFIO group"))?;
        let copy = |fd: &OwnedFd| fd.try_clone().map_err(|e| e.to_string());
        self.objects.groups.insert(GroupId(group), copy(&fd)?);
        self.group_fds.insert(group, copy(&fd)?);
        self.registry.groups.insert(group, container);
        Ok(fd)
    }

    /// The fd of a group opened with [`FrontEnd::group`].
    pub fn group_fd(&self, group: u32) -> BorrowedFd<'_> {
        self.group_fds[&group].as_fd()
    }

    /// Forgets a group the back-end no longer has.
    pub fn forget_group(&mut self, group: u32) {
        self.registry.groups.remove(&group);
    }

    /// A guest table `table` of `container` (a KVM TCE table, or with `userspace` a sealed
    /// memfd as isolated mode needs), 4 KiB pages from `bus_offset`; returns `TABLE_ADD`'s
    /// payload.
    pub fn table(
        &mut self,
        table: u32,
        container: u32,
        bus_offset: u64,
        entries: u64,
        userspace: bool,
    ) -> Result<Vec<u8>, String> {
        let liobn = 0x8000_0000 | table;
        let made = if userspace {
            self.vm
                .userspace_table(u64::from(liobn), 12, bus_offset, entries)
        } else {
            self.vm.kvm_table(u64::from(liobn), 12, bus_offset, entries)
        }
        .map_err(model_error("the TCE table"))?;
        let copy = made.fd.try_clone().map_err(|e| e.to_string())?;
        self.objects.tables.insert(TableId(table), (copy, entries));
        self.registry
            .tables
            .insert(table, (container, bus_offset, bus_offset + (entries << 12)));
        self.tables.insert(table, made);
        Ok(Le::new()
            .u32(table)
            .u32(container)
            .u32(liobn)
            .u32(12)
            .u64(bus_offset)
            .u64(entries)
            .bytes())
    }

    pub fn table_fd(&self, table: u32) -> BorrowedFd<'_> {
        self.tables[&table].fd.as_fd()
    }

    /// The locked and pinned memory of this process's mm, or of `pid`'s.
    pub fn mm(&self, pid: Option<u32>) -> Result<MmStats, String> {
        self.model().mm_stats(pid).map_err(model_error("MM_STATS"))
    }

    /// `VFIO_GROUP_GET_STATUS` of each group this front-end opened.
    pub fn group_status(&self) -> Result<Vec<u64>, String> {
        self.group_fds
            .values()
            .map(|fd| {
                self.model()
                    .vfio_group_get_status(fd.as_fd())
                    .map_err(model_error("VFIO_GROUP_GET_STATUS"))
            })
            .collect()
    }

    /// Sends a request and runs its transaction to the final reply: each operation is checked
    /// against `request`'s scope (§6.3), then executed on the model in order, stopping at the
    /// first failure, and the results go back in `OPS_RESULT`.
    pub fn transact(
        &mut self,
        conn: &Conn,
        request: u32,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
        inject: Inject,
    ) -> Result<Transaction, String> {
        let scope = Scope::of(request, payload, &self.registry);
        let mut reply = conn.call_fds(request, payload, fds)?;
        let transaction = reply.transaction;
        let mut done = Transaction {
            last: Reply::default(),
            batches: Vec::new(),
            violations: Vec::new(),
        };
        let (mut forward_index, mut failed_one) = (0, false);
        while reply.flags & REPLY_OPS != 0 {
            if reply.transaction != transaction {
                return Err(format!(
                    "the transaction of {} changed id from {transaction} to {}",
                    request_name(request),
                    reply.transaction
                ));
            }
            if done.batches.len() == MAX_ROUNDS {
                return Err(format!(
                    "{} took more than {MAX_ROUNDS} replies with operations",
                    request_name(request)
                ));
            }
            let rollback = reply.flags & REPLY_ROLLBACK != 0;
            let mut results = Vec::new();
            for op in &reply.ops {
                let (status, out) = match scope.allows(op, rollback) {
                    Err(why) => {
                        done.violations
                            .push(format!("{}: {op}: {why}", request_name(request)));
                        (-EPERM, [0; 4])
                    }
                    Ok(()) if !rollback && inject.fails(forward_index, op, &mut failed_one) => {
                        (-EIO, [0; 4])
                    }
                    Ok(()) => self.execute(op)?,
                };
                forward_index += usize::from(!rollback);
                results.push(result_record(op.kind, status, out));
                if status != 0 {
                    break;
                }
            }
            done.batches.push((rollback, reply.ops.clone()));
            reply = conn.call(OPS_RESULT, &ops_result(transaction, &results))?;
        }
        done.last = reply;
        Ok(done)
    }

    /// Executes one operation as this process; the model's errno becomes the status.
    fn execute(&mut self, op: &Op) -> Result<(i32, [u64; 4]), String> {
        let call = kernel_op(op)?;
        Ok(match self.kernel.execute(&call, &self.objects) {
            Err(errno) => (-errno.raw_os_error(), [0; 4]),
            Ok(output) => (0, outputs(&output)?),
        })
    }
}

/// The outputs of §6.1, packed as the result record carries them.
fn outputs(output: &Output) -> Result<[u64; 4], String> {
    Ok(match output {
        Output::Done => [0; 4],
        Output::ApiVersion(v) | Output::Value(v) => [u64::from(*v), 0, 0, 0],
        Output::StartAddr(a) | Output::Unmapped(a) => [*a, 0, 0, 0],
        Output::TceInfo(i) => [
            u64::from(i.flags),
            u64::from(i.dma32_window_start) | u64::from(i.dma32_window_size) << 32,
            i.pgsizes,
            u64::from(i.max_dynamic_windows) | u64::from(i.levels) << 32,
        ],
        other => return Err(format!("no wire output for {other:?}")),
    })
}

/// The kernel call an operation record asks for (§6.1).
fn kernel_op(op: &Op) -> Result<KernelOp, String> {
    let container = ContainerId(op.container);
    let group = GroupId(op.object);
    let region = RegionId(op.object);
    let [a0, a1, a2] = op.args;
    Ok(match op.kind {
        CONTAINER_OPEN => KernelOp::ContainerOpen { container },
        CONTAINER_CLOSE => KernelOp::ContainerClose { container },
        CHECK_EXTENSION => KernelOp::CheckExtension {
            container,
            extension: op.aux,
        },
        SET_IOMMU => KernelOp::SetIommu {
            container,
            iommu_type: op.aux,
        },
        GROUP_SET_CONTAINER => KernelOp::GroupSetContainer { container, group },
        GROUP_UNSET_CONTAINER => KernelOp::GroupUnsetContainer { container, group },
        TCE_GET_INFO => KernelOp::TceGetInfo { container },
        REGISTER_MEMORY => KernelOp::RegisterMemory {
            container,
            region,
            offset: a0,
            size: a1,
        },
        UNREGISTER_MEMORY => KernelOp::UnregisterMemory {
            container,
            region,
            offset: a0,
            size: a1,
        },
        TCE_CREATE => KernelOp::TceCreate {
            container,
            page_shift: op.aux,
            window_size: a0,
            levels: a1 as u32,
        },
        TCE_REMOVE => KernelOp::TceRemove {
            container,
            start_addr: a0,
        },
        MAP_DMA => KernelOp::MapDma {
            container,
            region,
            offset: a0,
            iova: a1,
            size: a2,
            access: DmaAccess {
                read: op.flags & 1 != 0,
                write: op.flags & 2 != 0,
            },
        },
        UNMAP_DMA => KernelOp::UnmapDma {
            container,
            iova: a0,
            size: a1,
        },
        EEH_PE_OP => KernelOp::EehPeOp {
            container,
            op: op.aux,
            err_type: a0 as u32,
            err_func: (a0 >> 32) as u32,
            err_addr: a1,
            err_mask: a2,
        },
        KVM_FILE_ADD => KernelOp::KvmFileAdd { group },
        KVM_FILE_DEL => KernelOp::KvmFileDel { group },
        KVM_SET_SPAPR_TCE => KernelOp::KvmSetSpaprTce {
            group,
            table: TableId(op.aux),
        },
        KVM_HAS_DEVICE_ATTR => KernelOp::KvmHasDeviceAttr {
            attr_group: op.aux,
            attr: a0,
        },
        kind => return Err(format!("operation kind {kind} is not in §6.1")),
    })
}

/// What one request's transaction may ask for (§6.3).
struct Scope {
    request: u32,
    forward: &'static [u16],
    rollback: &'static [u16],
    /// The request's container; `None` for `MEM_ADD`/`MEM_REMOVE` (any of the session's).
    container: Option<u32>,
    containers: BTreeSet<u32>,
    /// Groups and tables of that container; regions of the session.
    groups: BTreeSet<u32>,
    tables: BTreeMap<u32, (u64, u64)>,
    regions: BTreeMap<u32, u64>,
    /// The request's own group (`GROUP_ADD`), the only one outside a rollback.
    own_group: Option<u32>,
    /// `EEH_OP`: the operation record it allows, but for the kind.
    eeh: Option<Op>,
    /// `TCE_UPDATE`: its table's window.
    window: Option<(u64, u64)>,
}

const GROUP_ADD_FORWARD: &[u16] = &[
    CONTAINER_OPEN,
    GROUP_SET_CONTAINER,
    SET_IOMMU,
    TCE_GET_INFO,
    REGISTER_MEMORY,
    TCE_REMOVE,
    KVM_FILE_ADD,
    KVM_SET_SPAPR_TCE,
];
const GROUP_ADD_ROLLBACK: &[u16] = &[
    CONTAINER_CLOSE,
    GROUP_UNSET_CONTAINER,
    UNREGISTER_MEMORY,
    KVM_FILE_DEL,
    KVM_FILE_ADD,
    KVM_SET_SPAPR_TCE,
];
const WINDOW_RESET_FORWARD: &[u16] = &[
    KVM_FILE_DEL,
    KVM_FILE_ADD,
    KVM_SET_SPAPR_TCE,
    UNMAP_DMA,
    TCE_REMOVE,
    TCE_CREATE,
];
const WINDOW_RESET_ROLLBACK: &[u16] = &[KVM_FILE_DEL, KVM_FILE_ADD, KVM_SET_SPAPR_TCE, TCE_REMOVE];

impl Scope {
    fn of(request: u32, payload: &[u8], registry: &Registry) -> Self {
        let word = |at| u32_at(payload, at).unwrap_or(u32::MAX);
        let (forward, rollback, container): (&[u16], &[u16], _) = match request {
            MEM_ADD => (&[REGISTER_MEMORY], &[UNREGISTER_MEMORY], None),
            MEM_REMOVE => (&[UNREGISTER_MEMORY], &[REGISTER_MEMORY], None),
            GROUP_ADD => (GROUP_ADD_FORWARD, GROUP_ADD_ROLLBACK, Some(word(4))),
            GROUP_REMOVE => (
                &[
                    KVM_FILE_DEL,
                    UNMAP_DMA,
                    TCE_REMOVE,
                    UNREGISTER_MEMORY,
                    GROUP_UNSET_CONTAINER,
                    CONTAINER_CLOSE,
                ],
                &[REGISTER_MEMORY],
                registry.groups.get(&word(0)).copied(),
            ),
            GROUP_ADOPT => (&[TCE_GET_INFO], &[], Some(word(4))),
            WINDOW_CREATE => (
                &[TCE_CREATE, KVM_FILE_ADD, KVM_SET_SPAPR_TCE],
                &[TCE_REMOVE, KVM_FILE_DEL, KVM_FILE_ADD, KVM_SET_SPAPR_TCE],
                registry.tables.get(&word(0)).map(|t| t.0),
            ),
            WINDOW_REMOVE => (
                &[
                    KVM_FILE_DEL,
                    KVM_FILE_ADD,
                    KVM_SET_SPAPR_TCE,
                    UNMAP_DMA,
                    TCE_REMOVE,
                ],
                &[KVM_FILE_DEL, KVM_FILE_ADD, KVM_SET_SPAPR_TCE],
                registry.tables.get(&word(0)).map(|t| t.0),
            ),
            WINDOW_RESET => (WINDOW_RESET_FORWARD, WINDOW_RESET_ROLLBACK, Some(word(0))),
            TCE_UPDATE => (
                &[MAP_DMA, UNMAP_DMA],
                &[UNMAP_DMA],
                registry.tables.get(&word(0)).map(|t| t.0),
            ),
            EEH_OP => (&[EEH_PE_OP], &[], Some(word(0))),
            _ => (&[], &[], None),
        };
        let in_container = |c: &u32| container.is_none_or(|mine| *c == mine);
        Self {
            request,
            forward,
            rollback,
            container,
            containers: registry.groups.values().copied().collect(),
            groups: registry
                .groups
                .iter()
                .filter(|(_, c)| in_container(c))
                .map(|(g, _)| *g)
                .collect(),
            tables: registry
                .tables
                .iter()
                .filter(|(_, (c, ..))| in_container(c))
                .map(|(t, (_, start, end))| (*t, (*start, *end)))
                .collect(),
            regions: registry.regions.clone(),
            own_group: (request == GROUP_ADD).then(|| word(0)),
            eeh: (request == EEH_OP).then(|| Op {
                kind: EEH_PE_OP,
                flags: 0,
                container: word(0),
                object: 0,
                aux: word(4),
                args: [
                    u64::from(word(8)) | u64::from(word(12)) << 32,
                    u64_at(payload, 16).unwrap_or(0),
                    u64_at(payload, 24).unwrap_or(0),
                ],
            }),
            window: (request == TCE_UPDATE)
                .then(|| registry.tables.get(&word(0)).map(|t| (t.1, t.2)))
                .flatten(),
        }
    }

    /// Whether the request allows `op` (§6.3), and if not, why.
    fn allows(&self, op: &Op, rollback: bool) -> Result<(), String> {
        let kinds = if rollback {
            self.rollback
        } else {
            self.forward
        };
        if !kinds.contains(&op.kind) {
            return Err(format!(
                "{} does not allow {}{}",
                request_name(self.request),
                op_name(op.kind),
                if rollback { " in its rollback" } else { "" }
            ));
        }
        let kvm = matches!(op.kind, KVM_FILE_ADD | KVM_FILE_DEL | KVM_SET_SPAPR_TCE);
        if !kvm {
            let ours = match self.container {
                Some(c) => op.container == c,
                None => self.containers.contains(&op.container),
            };
            if !ours {
                return Err(format!("container {} is not the request's", op.container));
            }
        }
        if matches!(op.kind, GROUP_SET_CONTAINER | GROUP_UNSET_CONTAINER) || kvm {
            let group_ok = match self.own_group {
                Some(own) if !(kvm && rollback) => op.object == own,
                _ => self.groups.contains(&op.object) || self.own_group == Some(op.object),
            };
            if !group_ok {
                return Err(format!("group {} is not one of the container's", op.object));
            }
        }
        if op.kind == KVM_SET_SPAPR_TCE && !self.tables.contains_key(&op.aux) {
            return Err(format!("table {} is not one of the container's", op.aux));
        }
        if matches!(op.kind, REGISTER_MEMORY | UNREGISTER_MEMORY | MAP_DMA) {
            let Some(size) = self.regions.get(&op.object) else {
                return Err(format!("region {} was never sent", op.object));
            };
            let (offset, len) = match op.kind {
                MAP_DMA => (op.args[0], op.args[2]),
                _ => (op.args[0], op.args[1]),
            };
            if matches!(op.kind, REGISTER_MEMORY | UNREGISTER_MEMORY) && (offset, len) != (0, *size)
            {
                return Err(format!(
                    "it names {len:#x} bytes at {offset:#x}, not the whole region"
                ));
            }
            if offset.checked_add(len).is_none_or(|end| end > *size) {
                return Err("its range is outside the region".to_owned());
            }
        }
        if let (MAP_DMA | UNMAP_DMA, Some((start, end))) = (op.kind, self.window) {
            let (iova, size) = match op.kind {
                MAP_DMA => (op.args[1], op.args[2]),
                _ => (op.args[0], op.args[1]),
            };
            if iova < start || iova.checked_add(size).is_none_or(|e| e > end) {
                return Err(format!("{iova:#x}+{size:#x} is outside the table's window"));
            }
        }
        if let Some(eeh) = &self.eeh {
            if *op != *eeh {
                return Err("it is not the EEH operation requested".to_owned());
            }
        }
        Ok(())
    }
}
