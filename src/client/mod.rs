//! The front-end side of the protocol, as a library: what QEMU does, in Rust. It connects,
//! negotiates, sends guest RAM, groups and tables, asks for windows, forwards slow-path TCE
//! updates, and executes the owner operations the sidecar returns on its own fds through a
//! kernel backend (the real kernel, or the model).
//!
//! It is the reference the QEMU patch follows, so it stays small and does nothing clever: one
//! request at a time, each reply read to the end, operations executed strictly in order, and
//! only on objects this front-end registered.
#![deny(unsafe_code)]

pub mod model_vm;
mod scope;

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::Shutdown;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use rustix::io::Errno;

use crate::kernel::{
    to_op_result, ContainerId, GroupId, Kernel, KernelOp, Mapping, ObjectTable, OwnershipMode,
    RegionId, TableId,
};
use crate::protocol::{
    decode_reply, encode_request, send_frame, DecodeError, EehBody, EehRequest, FdRule,
    FeaturesBody, FrameReader, GroupDesc, MemRegion, OpResult, OwnerOp, RecvError, Reply, Request,
    RequestCode, TableDesc, TceUpdate, TceUpdateBody, WindowCreateBody, WindowQueryBody,
    FEATURE_MODE_ACCELERATED, FEATURE_MODE_ISOLATED, MAX_OPS,
};

/// How long [`Client::connect`] lets the sidecar take to answer, on connecting and for every
/// reply (§1.2 "a deadline on every wait"); generous enough for an isolated `MEM_ADD` to pin a
/// guest's RAM. Callers change it with `stream().set_read_timeout()`.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(10);

/// A transaction may take at most this many replies with operations, and this many operations
/// in all (§1.2 "bounded transactions"), QEMU's bounds: the most a session's own objects can
/// need is a GROUP_ADD registering each of 512 regions or a TCE_UPDATE of 512 entries (an unmap
/// and a map each), then a rollback of as many.
const MAX_ROUNDS: u32 = 16;
const MAX_TRANSACTION_OPS: usize = 4 * MAX_OPS;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the sidecar")]
    Io(#[from] io::Error),
    #[error("no reply from the sidecar")]
    Recv(#[from] RecvError),
    #[error("the sidecar sent a malformed reply: {0}")]
    Decode(#[from] DecodeError),
    #[error("{text} ({errno})")]
    Refused {
        errno: Errno,
        text: String,
        body: Vec<u8>,
    },
    #[error("protocol violation by the sidecar: {0}")]
    Protocol(String),
}

impl ClientError {
    /// The errno of a refused request.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            Self::Refused { errno, .. } => Some(*errno),
            Self::Io(_) | Self::Recv(_) | Self::Decode(_) | Self::Protocol(_) => None,
        }
    }
}

/// Counts of what the front-end executed for the sidecar.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientStats {
    pub requests: u64,
    pub owner_ops: u64,
    pub owner_ops_failed: u64,
}

/// A connected, negotiated front-end session.
pub struct Client {
    stream: UnixStream,
    reader: FrameReader,
    mode: OwnershipMode,
    features: u64,
    kernel: Box<dyn Kernel + Send>,
    objects: ObjectTable,
    /// The container each group belongs to.
    group_containers: BTreeMap<GroupId, ContainerId>,
    containers: BTreeSet<ContainerId>,
    /// The page shift each MEM_ADD named, repeated by its MEM_REMOVE.
    region_page_shifts: BTreeMap<RegionId, u32>,
    stats: ClientStats,
}

impl Client {
    /// Connects to the sidecar at `path` and negotiates `mode` plus `extra` feature bits (with
    /// `FEATURE_FDS_BY_MODE` the requests carry only the fds the mode uses).
    /// `kernel` executes the owner operations; `kvm_vfio` is the VM's kvm-vfio device.
    pub fn connect(
        path: impl AsRef<Path>,
        mode: OwnershipMode,
        extra: u64,
        kernel: Box<dyn Kernel + Send>,
        kvm_vfio: Option<OwnedFd>,
    ) -> Result<Self, ClientError> {
        Self::connect_within(path, mode, extra, kernel, kvm_vfio, DEFAULT_DEADLINE)
    }

    /// [`Client::connect`] with `deadline` on every read and write of the session: a sidecar
    /// that takes longer is taken for gone.
    pub fn connect_within(
        path: impl AsRef<Path>,
        mode: OwnershipMode,
        extra: u64,
        kernel: Box<dyn Kernel + Send>,
        kvm_vfio: Option<OwnedFd>,
        deadline: Duration,
    ) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(deadline))?;
        stream.set_write_timeout(Some(deadline))?;
        let mut client = Self {
            stream,
            reader: FrameReader::new(true).refusing_fds(),
            mode,
            features: 0,
            kernel,
            group_containers: BTreeMap::new(),
            objects: ObjectTable {
                kvm_vfio,
                ..ObjectTable::default()
            },
            containers: BTreeSet::new(),
            region_page_shifts: BTreeMap::new(),
            stats: ClientStats::default(),
        };
        let supported = client.get_features()?;
        let wanted = extra
            | match mode {
                OwnershipMode::Accelerated => FEATURE_MODE_ACCELERATED,
                OwnershipMode::Isolated => FEATURE_MODE_ISOLATED,
            };
        if wanted & !supported != 0 {
            return Err(ClientError::Refused {
                errno: Errno::NOTSUP,
                text: format!("the sidecar supports features {supported:#x}, not {wanted:#x}"),
                body: Vec::new(),
            });
        }
        let reply = client.transact(Request::SetFeatures { features: wanted }, None)?;
        client.features = FeaturesBody::decode(&reply.body).map_or(0, |f| f.features);
        Ok(client)
    }

    pub fn mode(&self) -> OwnershipMode {
        self.mode
    }

    pub fn features(&self) -> u64 {
        self.features
    }

    pub fn stats(&self) -> ClientStats {
        self.stats
    }

    pub fn objects(&self) -> &ObjectTable {
        &self.objects
    }

    pub fn kernel(&mut self) -> &mut dyn Kernel {
        self.kernel.as_mut()
    }

    pub fn get_features(&mut self) -> Result<u64, ClientError> {
        let reply = self.transact(Request::GetFeatures, None)?;
        FeaturesBody::decode(&reply.body)
            .map(|f| f.features)
            .ok_or_else(|| ClientError::Protocol("GET_FEATURES reply without features".into()))
    }

    /// Which requests carry an fd in this session.
    pub fn fd_rule(&self) -> FdRule {
        FdRule::negotiated(self.features)
    }

    /// MEM_ADD of a region this process mapped at `region.user_addr`. Under
    /// [`FdRule::TablesOnly`] the memfd stays here and its page size is sent instead.
    pub fn add_region(
        &mut self,
        mut region: MemRegion,
        memfd: BorrowedFd<'_>,
    ) -> Result<(), ClientError> {
        let lean = self.fd_rule() == FdRule::TablesOnly;
        if lean {
            // hugetlbfs shows its huge page size as the block size, memfd/tmpfs the base page.
            let blksize = rustix::fs::fstat(memfd)
                .map_err(io::Error::from)?
                .st_blksize;
            region.page_shift = u64::try_from(blksize).unwrap_or(0).max(1).ilog2();
        }
        let id = RegionId(region.region_id);
        // The front-end registers its own addresses (accelerated mode); a simulated kernel must
        // be told they are mapped (the real one sees it).
        self.kernel
            .memory_mapped(memfd, region.mmap_offset, region.user_addr, region.size)
            .map_err(|errno| ClientError::Refused {
                errno,
                text: "the kernel backend refused the region's mapping".into(),
                body: Vec::new(),
            })?;
        self.objects.regions.insert(
            id,
            Mapping {
                addr: region.user_addr,
                size: region.size,
            },
        );
        let result = self.transact(Request::MemAdd(region), (!lean).then_some(memfd));
        if result.is_err() {
            self.objects.regions.remove(&id);
            let _ = self.kernel.memory_unmapped(region.user_addr);
        } else {
            self.region_page_shifts.insert(id, region.page_shift);
        }
        result.map(drop)
    }

    pub fn remove_region(&mut self, mut region: MemRegion) -> Result<(), ClientError> {
        let id = RegionId(region.region_id);
        region.page_shift = self.region_page_shifts.get(&id).copied().unwrap_or(0);
        self.transact(Request::MemRemove(region), None)?;
        self.region_page_shifts.remove(&id);
        self.objects.regions.remove(&id);
        let _ = self.kernel.memory_unmapped(region.user_addr);
        Ok(())
    }

    /// GROUP_ADD. The same open file stays with the front-end (KVM matches SET_SPAPR_TCE against
    /// the file FILE_ADD registered), so the fd is kept here and a copy is sent.
    pub fn add_group(&mut self, group: GroupDesc, fd: OwnedFd) -> Result<(), ClientError> {
        let id = GroupId(group.group_id);
        let container = ContainerId(group.container_id);
        let sent = fd.try_clone()?;
        self.objects.groups.insert(id, fd);
        self.group_containers.insert(id, container);
        let sent = (self.fd_rule() == FdRule::Every).then_some(sent.as_fd());
        let result = self.transact(Request::GroupAdd(group), sent);
        if result.is_err() {
            self.objects.groups.remove(&id);
            self.group_containers.remove(&id);
        }
        result.map(drop)
    }

    pub fn remove_group(&mut self, group_id: u32) -> Result<(), ClientError> {
        self.transact(Request::GroupRemove { group_id }, None)?;
        self.objects.groups.remove(&GroupId(group_id));
        self.group_containers.remove(&GroupId(group_id));
        Ok(())
    }

    /// TABLE_ADD: the KVM TCE table fd (accelerated) or the shared userspace table (isolated).
    pub fn add_table(&mut self, table: TableDesc, fd: OwnedFd) -> Result<(), ClientError> {
        let id = TableId(table.table_id);
        let sent = fd.try_clone()?;
        self.objects.tables.insert(id, (fd, table.entries));
        let result = self.transact(Request::TableAdd(table), Some(sent.as_fd()));
        if result.is_err() {
            self.objects.tables.remove(&id);
        }
        result.map(drop)
    }

    pub fn remove_table(&mut self, table_id: u32) -> Result<(), ClientError> {
        self.transact(Request::TableRemove { table_id }, None)?;
        self.objects.tables.remove(&TableId(table_id));
        Ok(())
    }

    pub fn query_windows(&mut self, container_id: u32) -> Result<WindowQueryBody, ClientError> {
        let reply = self.transact(Request::WindowQuery { container_id }, None)?;
        WindowQueryBody::decode(&reply.body)
            .ok_or_else(|| ClientError::Protocol("bad WINDOW_QUERY body".into()))
    }

    pub fn create_window(&mut self, table_id: u32) -> Result<WindowCreateBody, ClientError> {
        let reply = self.transact(Request::WindowCreate { table_id }, None)?;
        WindowCreateBody::decode(&reply.body)
            .ok_or_else(|| ClientError::Protocol("bad WINDOW_CREATE body".into()))
    }

    pub fn remove_window(&mut self, table_id: u32) -> Result<(), ClientError> {
        self.transact(Request::WindowRemove { table_id }, None)
            .map(drop)
    }

    pub fn reset_windows(
        &mut self,
        container_id: u32,
        default_table: Option<u32>,
    ) -> Result<(), ClientError> {
        self.transact(
            Request::WindowReset {
                container_id,
                default_table,
            },
            None,
        )
        .map(drop)
    }

    /// Forwards a slow-path TCE update; the body says what the guest's hypercall returns.
    pub fn tce_update(&mut self, update: TceUpdate) -> Result<TceUpdateBody, ClientError> {
        let reply = self.transact(Request::TceUpdate(update), None)?;
        TceUpdateBody::decode(&reply.body)
            .ok_or_else(|| ClientError::Protocol("bad TCE_UPDATE body".into()))
    }

    pub fn eeh(&mut self, request: EehRequest) -> Result<i32, ClientError> {
        let reply = self.transact(Request::EehOp(request), None)?;
        EehBody::decode(&reply.body)
            .map(|b| b.result)
            .ok_or_else(|| ClientError::Protocol("bad EEH_OP body".into()))
    }

    /// GET_STATUS, first page.
    pub fn status(&mut self) -> Result<Vec<u8>, ClientError> {
        Ok(self
            .transact(Request::GetStatus { first_session: 0 }, None)?
            .body)
    }

    /// Whether the sidecar may ask for `op`: only objects this front-end registered, and only
    /// containers of its groups.
    fn allowed(&self, op: &KernelOp) -> bool {
        let container_ok = |c: &ContainerId| self.group_containers.values().any(|gc| gc == c);
        match op {
            KernelOp::ContainerOpen { container } => {
                container_ok(container) && !self.containers.contains(container)
            }
            KernelOp::ContainerClose { container }
            | KernelOp::CheckExtension { container, .. }
            | KernelOp::SetIommu { container, .. }
            | KernelOp::TceGetInfo { container }
            | KernelOp::TceCreate { container, .. }
            | KernelOp::TceRemove { container, .. }
            | KernelOp::UnmapDma { container, .. }
            | KernelOp::EehPeOp { container, .. } => self.containers.contains(container),
            KernelOp::GroupSetContainer { container, group }
            | KernelOp::GroupUnsetContainer { container, group } => {
                self.containers.contains(container)
                    && self.group_containers.get(group) == Some(container)
            }
            KernelOp::RegisterMemory {
                container, region, ..
            }
            | KernelOp::UnregisterMemory {
                container, region, ..
            }
            | KernelOp::MapDma {
                container, region, ..
            } => self.containers.contains(container) && self.objects.regions.contains_key(region),
            KernelOp::KvmFileAdd { group } | KernelOp::KvmFileDel { group } => {
                self.objects.groups.contains_key(group)
            }
            KernelOp::KvmSetSpaprTce { group, table } => {
                self.objects.groups.contains_key(group) && self.objects.tables.contains_key(table)
            }
            KernelOp::KvmHasDeviceAttr { .. } => true,
            // Never sent to a front-end.
            KernelOp::GroupGetStatus { .. } | KernelOp::ReadTces { .. } => false,
        }
    }

    /// Executes a batch of owner operations in order, stopping at the first failure. Only the
    /// kinds `request` allows (none in isolated mode), on this front-end's objects, are executed;
    /// an `EEH_OP` allows only the PE operation it asked for.
    fn execute(
        &mut self,
        request: RequestCode,
        eeh: Option<EehRequest>,
        rollback: bool,
        ops: &[OwnerOp],
    ) -> Vec<OpResult> {
        let kinds = match self.mode {
            OwnershipMode::Accelerated => scope::allowed_kinds(request, rollback),
            OwnershipMode::Isolated => &[],
        };
        let mut results = Vec::with_capacity(ops.len());
        for owner_op in ops {
            let op = KernelOp::from(*owner_op);
            let in_scope = kinds.contains(&owner_op.kind()) && scope::requested_eeh(&op, eeh);
            let result = if in_scope && self.allowed(&op) {
                self.kernel.execute(&op, &self.objects)
            } else {
                Err(Errno::PERM)
            };
            self.stats.owner_ops += 1;
            match (&op, &result) {
                (KernelOp::ContainerOpen { container }, Ok(_)) => {
                    self.containers.insert(*container);
                }
                (KernelOp::ContainerClose { container }, Ok(_)) => {
                    self.containers.remove(container);
                }
                _ => {}
            }
            let failed = result.is_err();
            if failed {
                self.stats.owner_ops_failed += 1;
            }
            // An output of the wrong shape is a backend bug; report it as EIO rather than lie.
            let reported = to_op_result(owner_op.kind(), &result).unwrap_or(OpResult {
                kind: owner_op.kind(),
                status: -Errno::IO.raw_os_error(),
                out: [0; 4],
            });
            results.push(reported);
            if failed {
                break;
            }
        }
        results
    }

    fn send(&self, request: &Request, fd: Option<BorrowedFd<'_>>) -> Result<(), ClientError> {
        let payload = encode_request(request);
        let fds: Vec<BorrowedFd<'_>> = fd.into_iter().collect();
        send_frame(&self.stream, request.code() as u32, false, &payload, &fds)?;
        Ok(())
    }

    fn receive(&mut self, code: u32) -> Result<Reply, ClientError> {
        let frame = self.reader.recv(&self.stream)?;
        if frame.header.request != code {
            return Err(ClientError::Protocol(format!(
                "reply to request {} while waiting for {code}",
                frame.header.request
            )));
        }
        Ok(decode_reply(
            &frame.header,
            &frame.payload,
            frame.fds.len(),
        )?)
    }

    /// Sends a request and runs its transaction to the final reply.
    pub fn transact(
        &mut self,
        request: Request,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<Reply, ClientError> {
        let result = self.run_transaction(request, fd);
        if result.as_ref().is_err_and(|e| e.errno().is_none()) {
            // A broken reply, a missed deadline or a lost connection ends the session (§1.2):
            // no later request may take a late or stray reply for its own.
            let _ = self.stream.shutdown(Shutdown::Both);
        }
        result
    }

    fn run_transaction(
        &mut self,
        request: Request,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<Reply, ClientError> {
        self.stats.requests += 1;
        let opening = request.code();
        let name = opening.name();
        let eeh = match &request {
            Request::EehOp(eeh) => Some(*eeh),
            _ => None,
        };
        let mut code = request.code() as u32;
        self.send(&request, fd)?;
        let (mut transaction, mut rounds, mut ops) = (0, 0, 0);
        loop {
            let reply = self.receive(code)?;
            if reply.ops.is_empty() {
                if reply.status < 0 {
                    return Err(ClientError::Refused {
                        errno: Errno::from_raw_os_error(-reply.status),
                        text: reply.text,
                        body: reply.body,
                    });
                }
                return Ok(reply);
            }
            // The first reply with operations fixes the transaction's id (§6).
            if transaction != 0 && reply.transaction != transaction {
                return Err(ClientError::Protocol(format!(
                    "the sidecar changed the transaction of {name} from {transaction} to {}",
                    reply.transaction
                )));
            }
            transaction = reply.transaction;
            rounds += 1;
            ops += reply.ops.len();
            if rounds > MAX_ROUNDS || ops > MAX_TRANSACTION_OPS {
                return Err(ClientError::Protocol(format!(
                    "the transaction of {name} goes on beyond {MAX_ROUNDS} replies or {MAX_TRANSACTION_OPS} operations"
                )));
            }
            let results = self.execute(opening, eeh, reply.rollback, &reply.ops);
            let answer = Request::OpsResult {
                transaction: reply.transaction,
                results,
            };
            code = answer.code() as u32;
            self.send(&answer, None)?;
        }
    }

    /// The raw socket, for tests that need to misbehave.
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }
}
