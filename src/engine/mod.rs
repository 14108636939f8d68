//! The per-session sPAPR IOMMU state machine.
//!
//! Inputs are decoded requests and the results of kernel calls; outputs are replies and kernel
//! calls, each routed to the process the kernel accepts it from ([`crate::kernel::route`]): the
//! sidecar executes its own share and hands the results back ([`Action::Execute`]); the
//! front-end's share travels as owner operations in a reply. The engine performs no I/O and
//! makes no system call, so it can be driven exhaustively against the model kernel.
//!
//! Every request runs as a *transaction*: a procedure emits calls stage by stage, computing each
//! stage from the kernel view ([`state::State`]) that successful results have updated. When a
//! call fails, additive procedures roll back by running the inverse of every call that
//! succeeded, newest first ([`state::rollback`]); a window's removal undoes its KVM calls, and
//! other removals stop and report exactly what is left.
#![deny(unsafe_code)]

mod mapped;
mod procedures;
mod region_runs;
pub mod state;
mod window;

use std::collections::{BTreeMap, VecDeque};
use std::fmt;

use rustix::io::Errno;

use crate::kernel::{from_op_result, route, KernelOp, Output, OwnershipMode, Side};
use crate::protocol::{
    FeaturesBody, OpResult, OwnerOp, Reply, Request, RequestCode, FEATURES_KNOWN,
    FEATURE_MODE_ACCELERATED, FEATURE_MODE_ISOLATED, MAX_OPS,
};

pub use mapped::MappedBits;
use procedures::{Failure, Procedure, Step};
pub use state::State;
pub use window::{geometry, Geometry};

/// A refusal or failure: the errno the reply carries and the text that explains it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineError {
    pub errno: Errno,
    pub text: String,
}

impl EngineError {
    pub fn new(errno: Errno, text: impl Into<String>) -> Self {
        Self {
            errno,
            text: text.into(),
        }
    }
}

impl fmt::Display for EngineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.text, self.errno)
    }
}

/// What the host offers, decided by the daemon before the session starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Host {
    /// Feature bits the back-end supports (GET_FEATURES).
    pub features: u64,
    /// The host's base page size.
    pub page_size: u64,
    pub limits: Limits,
}

/// Per-session object limits; a request beyond one is refused with `ENOSPC`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Limits {
    /// Guest RAM regions (QEMU uses at most 512 memory slots).
    pub regions: usize,
    pub groups: usize,
    pub tables: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            regions: 512,
            groups: 64,
            tables: 128,
        }
    }
}

/// Facts about the fd a MEM_ADD or TABLE_ADD carried, gathered by the daemon (`fstat`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FdFacts {
    /// Size of the file in bytes (0 for files without a size, such as a KVM TCE table).
    pub size: u64,
    /// Page size backing the file (a hugetlbfs page size, else the base page).
    pub page_size: u64,
}

/// What the caller must do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Execute these calls on the sidecar's own kernel backend, in order, stopping at the
    /// first failure, and pass the results to [`Session::sidecar_results`].
    Execute(Vec<KernelOp>),
    /// Send this reply. If it carries operations, the front-end answers with OPS_RESULT.
    Reply(Reply),
    /// The session's teardown is complete; nothing of it remains on the sidecar's side.
    Closed,
}

/// Per-session counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub requests: u64,
    /// Slow-path TCE updates received, and the entries they carried.
    pub updates_forwarded: u64,
    pub entries_forwarded: u64,
    /// MAP_DMA / UNMAP_DMA calls that succeeded.
    pub maps: u64,
    pub unmaps: u64,
    /// Successful kernel calls by the process that made them.
    pub ops_sidecar: u64,
    pub ops_front_end: u64,
    /// Failed requests and failed kernel calls, by errno name.
    pub errors: BTreeMap<String, u64>,
}

/// Where a session stands in the protocol's state machine (spec §8).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Before SET_FEATURES.
    New,
    Ready,
    /// Owner operations or sidecar calls are pending.
    Transaction,
    /// Disconnected; teardown may be running.
    Closing,
}

#[derive(Debug)]
struct Transaction {
    /// Wire id, assigned when operations are first sent to the front-end.
    id: u32,
    code: Option<RequestCode>,
    procedure: Procedure,
    queue: VecDeque<KernelOp>,
    /// Successful calls of the forward phase with their outputs, for rollback.
    done: Vec<state::Done>,
    in_flight: Vec<KernelOp>,
    in_flight_side: Side,
    /// Set once a failure turned the transaction into a rollback.
    rolling_back: Option<EngineError>,
    /// Rollback calls that succeeded, by name, for the final reply's text.
    undone: Vec<&'static str>,
    /// Rollback calls that failed: what is left behind.
    left_behind: Vec<String>,
}

/// One session's engine.
#[derive(Debug)]
pub struct Session {
    host: Host,
    mode: Option<OwnershipMode>,
    features: u64,
    state: State,
    txn: Option<Transaction>,
    next_txn: u32,
    stats: Stats,
    closing: bool,
}

impl Session {
    pub fn new(host: Host) -> Self {
        Self {
            host,
            mode: None,
            features: 0,
            state: State::default(),
            txn: None,
            next_txn: 0,
            stats: Stats::default(),
            closing: false,
        }
    }

    pub fn mode(&self) -> Option<OwnershipMode> {
        self.mode
    }

    pub fn features(&self) -> u64 {
        self.features
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn phase(&self) -> Phase {
        match (self.closing, &self.txn, self.mode) {
            (true, _, _) => Phase::Closing,
            (false, Some(_), _) => Phase::Transaction,
            (false, None, None) => Phase::New,
            (false, None, Some(_)) => Phase::Ready,
        }
    }

    /// Bytes of guest RAM registered in at least one container.
    pub fn registered_bytes(&self) -> u64 {
        let registered = |id| {
            self.state
                .containers
                .values()
                .any(|c| c.registered.contains(id))
        };
        self.state
            .regions
            .iter()
            .filter(|(id, _)| registered(id))
            .map(|(_, r)| r.desc.size)
            .sum()
    }

    /// Entries mapped through this session, over all tables.
    pub fn entries_mapped(&self) -> u64 {
        self.state.tables.values().map(|t| t.mapped.count()).sum()
    }

    /// Handles one request. `fd` describes the fd of MEM_ADD and TABLE_ADD.
    pub fn handle(&mut self, request: Request, fd: Option<FdFacts>) -> Action {
        self.stats.requests += 1;
        if let Request::TceUpdate(update) = &request {
            self.stats.updates_forwarded += 1;
            self.stats.entries_forwarded += u64::from(update.count);
        }
        let code = request.code();
        let result = self.dispatch(request, fd);
        match result {
            Ok(action) => action,
            Err(err) => self.refuse(code, err),
        }
    }

    fn refuse(&mut self, code: RequestCode, err: EngineError) -> Action {
        *self.stats.errors.entry(errno_name(err.errno)).or_default() += 1;
        let mut reply = Reply::error(err.errno.raw_os_error(), format!("{code}: {}", err.text));
        if code == RequestCode::TceUpdate {
            reply.body = procedures::tce_refusal_body(err.errno);
        }
        Action::Reply(reply)
    }

    fn dispatch(&mut self, request: Request, fd: Option<FdFacts>) -> Result<Action, EngineError> {
        let in_txn = self.txn.is_some();
        match (&request, self.mode, in_txn) {
            (Request::GetFeatures, _, _) => {
                return Ok(Action::Reply(Reply::ok(
                    FeaturesBody {
                        features: self.host.features,
                    }
                    .encode(),
                )))
            }
            (
                Request::OpsResult {
                    transaction,
                    results,
                },
                _,
                true,
            ) => return self.front_end_results(*transaction, results),
            (Request::OpsResult { .. }, _, false) => {
                return Err(EngineError::new(Errno::PROTO, "no transaction is open"))
            }
            (_, _, true) => {
                return Err(EngineError::new(
                    Errno::BUSY,
                    "a transaction is open; answer it with OPS_RESULT first",
                ))
            }
            (Request::SetFeatures { features }, None, false) => return self.negotiate(*features),
            (Request::SetFeatures { .. }, Some(_), false) => {
                return Err(EngineError::new(
                    Errno::ALREADY,
                    "features are already negotiated",
                ))
            }
            (Request::GetStatus { .. }, _, _) => {
                return Err(EngineError::new(
                    Errno::PROTO,
                    "GET_STATUS is answered by the daemon, not a session",
                ))
            }
            (_, None, false) => {
                return Err(EngineError::new(
                    Errno::PROTO,
                    "not valid before SET_FEATURES",
                ))
            }
            (_, Some(_), false) => {}
        }
        let mode = self.mode.unwrap_or(OwnershipMode::Isolated);
        let procedure = procedures::start(
            &mut self.state,
            &self.host,
            mode,
            self.features,
            request,
            fd,
        )?;
        match procedure {
            Step::Done(body) => Ok(Action::Reply(Reply::ok(body))),
            Step::Run(procedure, code) => {
                self.txn = Some(Transaction {
                    id: 0,
                    code: Some(code),
                    procedure,
                    queue: VecDeque::new(),
                    done: Vec::new(),
                    in_flight: Vec::new(),
                    in_flight_side: Side::Sidecar,
                    rolling_back: None,
                    undone: Vec::new(),
                    left_behind: Vec::new(),
                });
                Ok(self.advance())
            }
        }
    }

    fn negotiate(&mut self, requested: u64) -> Result<Action, EngineError> {
        let unsupported = requested & !(self.host.features & FEATURES_KNOWN);
        if unsupported != 0 {
            return Err(EngineError::new(
                Errno::NOTSUP,
                format!(
                    "feature bits {unsupported:#x} are not supported (supported: {:#x})",
                    self.host.features
                ),
            ));
        }
        let mode = match (
            requested & FEATURE_MODE_ACCELERATED != 0,
            requested & FEATURE_MODE_ISOLATED != 0,
        ) {
            (true, false) => OwnershipMode::Accelerated,
            (false, true) => OwnershipMode::Isolated,
            (true, true) | (false, false) => {
                return Err(EngineError::new(
                    Errno::INVAL,
                    "exactly one ownership mode bit must be set",
                ))
            }
        };
        self.mode = Some(mode);
        self.features = requested;
        self.state.track_mapped = mode == OwnershipMode::Isolated;
        Ok(Action::Reply(Reply::ok(
            FeaturesBody {
                features: requested,
            }
            .encode(),
        )))
    }

    /// Results of the calls of the last [`Action::Execute`], in order: one per call executed,
    /// stopping at (and including) the first failure.
    pub fn sidecar_results(&mut self, results: Vec<Result<Output, Errno>>) -> Action {
        self.absorb(results)
    }

    fn front_end_results(
        &mut self,
        transaction: u32,
        results: &[OpResult],
    ) -> Result<Action, EngineError> {
        let txn = self
            .txn
            .as_ref()
            .ok_or_else(|| EngineError::new(Errno::PROTO, "no transaction is open"))?;
        if txn.in_flight_side != Side::FrontEnd || txn.id != transaction {
            return Err(EngineError::new(
                Errno::INVAL,
                format!("transaction {transaction} is not the open one ({})", txn.id),
            ));
        }
        let sent = &txn.in_flight;
        if results.is_empty() || results.len() > sent.len() {
            return Err(EngineError::new(
                Errno::INVAL,
                format!("{} results for {} operations", results.len(), sent.len()),
            ));
        }
        let mut typed = Vec::with_capacity(results.len());
        for (i, (result, op)) in results.iter().zip(sent).enumerate() {
            let expected = OwnerOp::try_from(*op).map(|o| o.kind()).ok();
            if expected != Some(result.kind) {
                return Err(EngineError::new(
                    Errno::INVAL,
                    format!(
                        "result {i} answers {} but operation {i} is {op}",
                        result.kind.name()
                    ),
                ));
            }
            let value = from_op_result(result)
                .map_err(|e| EngineError::new(Errno::INVAL, e.to_string()))?;
            let failed = value.is_err();
            typed.push(value);
            if failed && i + 1 != results.len() {
                return Err(EngineError::new(
                    Errno::INVAL,
                    "results continue after a failed operation",
                ));
            }
        }
        if typed.len() < sent.len() && typed.last().is_some_and(|r| r.is_ok()) {
            return Err(EngineError::new(
                Errno::INVAL,
                format!(
                    "{} results for {} operations and none failed",
                    typed.len(),
                    sent.len()
                ),
            ));
        }
        Ok(self.absorb(typed))
    }

    fn absorb(&mut self, results: Vec<Result<Output, Errno>>) -> Action {
        let Some(txn) = self.txn.as_mut() else {
            return Action::Reply(Reply::error(
                Errno::PROTO.raw_os_error(),
                "no transaction is open",
            ));
        };
        let side = txn.in_flight_side;
        let in_flight = std::mem::take(&mut txn.in_flight);
        for (op, result) in in_flight.iter().zip(results) {
            match result {
                Ok(output) => {
                    let done = state::Done::record(op, output, &self.state);
                    self.state.apply(op, &done.output);
                    match side {
                        Side::Sidecar => self.stats.ops_sidecar += 1,
                        Side::FrontEnd => self.stats.ops_front_end += 1,
                    }
                    match op {
                        KernelOp::MapDma { .. } => self.stats.maps += 1,
                        KernelOp::UnmapDma { .. } => self.stats.unmaps += 1,
                        _ => {}
                    }
                    txn.procedure.succeeded(op, &done.output);
                    if txn.rolling_back.is_none() {
                        txn.done.push(done);
                    } else {
                        txn.undone.push(op.name());
                    }
                }
                Err(errno) => {
                    *self.stats.errors.entry(errno_name(errno)).or_default() += 1;
                    if txn.rolling_back.is_some() {
                        txn.left_behind
                            .push(format!("undoing with {op} failed: {errno}"));
                        // Stop here: the kernel view keeps what could not be undone.
                        txn.queue.clear();
                        break;
                    }
                    match txn.procedure.failed(op, errno, &self.state, self.mode) {
                        Failure::Retry(ops) => {
                            txn.queue.clear();
                            txn.queue.extend(ops);
                        }
                        Failure::Continue => {
                            // The calls after the failed one were not made: make them now.
                            let position = in_flight.iter().position(|o| std::ptr::eq(o, op));
                            let rest = position.map_or(&[][..], |p| &in_flight[p + 1..]);
                            for later in rest.iter().rev() {
                                txn.queue.push_front(*later);
                            }
                        }
                        Failure::Fail(err) => start_rollback(txn, err, &self.state),
                    }
                    break;
                }
            }
        }
        self.advance()
    }

    /// Emits the next batch of calls, or the final reply.
    fn advance(&mut self) -> Action {
        let mode = self.mode.unwrap_or(OwnershipMode::Isolated);
        loop {
            let Some(txn) = self.txn.as_mut() else {
                return Action::Closed;
            };
            if txn.queue.is_empty() {
                if let Some(err) = txn.rolling_back.clone() {
                    return self.finish(Err(err));
                }
                match txn.procedure.next(&self.state, mode) {
                    Ok(Some(ops)) => txn.queue.extend(ops),
                    Ok(None) => {
                        let body = txn.procedure.body(&self.state);
                        return self.finish(Ok(body));
                    }
                    Err(err) => start_rollback(txn, err, &self.state),
                }
                continue;
            }
            let side = if self.closing {
                Side::Sidecar
            } else {
                route(&txn.queue[0], mode)
            };
            let mut batch = Vec::new();
            while let Some(op) = txn.queue.front() {
                let op_side = route(op, mode);
                if self.closing && op_side == Side::FrontEnd {
                    // The front-end is gone; what it owned is released when its fds close.
                    txn.queue.pop_front();
                    continue;
                }
                if op_side != side || batch.len() == MAX_OPS {
                    break;
                }
                batch.extend(txn.queue.pop_front());
            }
            if batch.is_empty() {
                continue;
            }
            txn.in_flight = batch.clone();
            txn.in_flight_side = side;
            match side {
                Side::Sidecar => return Action::Execute(batch),
                Side::FrontEnd => {
                    if txn.id == 0 {
                        self.next_txn = self.next_txn.wrapping_add(1).max(1);
                        txn.id = self.next_txn;
                    }
                    let ops = batch
                        .into_iter()
                        .filter_map(|op| OwnerOp::try_from(op).ok())
                        .collect();
                    return Action::Reply(Reply::ops(txn.id, ops, txn.rolling_back.is_some()));
                }
            }
        }
    }

    fn finish(&mut self, result: Result<Vec<u8>, EngineError>) -> Action {
        let Some(txn) = self.txn.take() else {
            return Action::Closed;
        };
        let code = txn.code;
        txn.procedure.finished(&mut self.state, result.is_ok());
        self.prune();
        if self.closing {
            return Action::Closed;
        }
        let code = code.map_or("request", |c| c.name());
        match result {
            Ok(body) => Action::Reply(Reply::ok(body)),
            Err(err) => {
                *self.stats.errors.entry(errno_name(err.errno)).or_default() += 1;
                let mut text = format!("{code}: {}", err.text);
                if !txn.undone.is_empty() {
                    text.push_str("; undone with ");
                    text.push_str(&txn.undone.join(", "));
                }
                if !txn.left_behind.is_empty() {
                    text.push_str("; rollback incomplete: ");
                    text.push_str(&txn.left_behind.join("; "));
                }
                truncate_text(&mut text);
                let mut reply = Reply::error(err.errno.raw_os_error(), text);
                reply.body = txn.procedure.failure_body(err.errno);
                Action::Reply(reply)
            }
        }
    }

    /// Drops containers that hold nothing: no group, not open.
    fn prune(&mut self) {
        let groups = &self.state.groups;
        self.state
            .containers
            .retain(|id, c| c.open || groups.values().any(|g| g.container == *id));
    }

    /// The connection closed: abandon any open transaction and tear down what the sidecar owns,
    /// in order (unmap, remove windows, unregister memory, detach groups, close containers).
    /// Calls the front-end would have made are skipped: its fds closing releases them.
    pub fn disconnect(&mut self) -> Action {
        self.closing = true;
        self.txn = Some(Transaction {
            id: 0,
            code: None,
            procedure: Procedure::teardown(),
            queue: VecDeque::new(),
            done: Vec::new(),
            in_flight: Vec::new(),
            in_flight_side: Side::Sidecar,
            rolling_back: None,
            undone: Vec::new(),
            left_behind: Vec::new(),
        });
        self.advance()
    }
}

fn start_rollback(txn: &mut Transaction, err: EngineError, state: &State) {
    txn.queue.clear();
    if txn.procedure.rolls_back() {
        txn.queue.extend(state::rollback(&txn.done, state));
    }
    txn.done.clear();
    txn.rolling_back = Some(err);
}

fn truncate_text(text: &mut String) {
    if text.len() > crate::protocol::MAX_TEXT {
        let mut end = crate::protocol::MAX_TEXT - 3;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str("...");
    }
}

/// A short errno name for counters and texts ("EINVAL").
pub fn errno_name(errno: Errno) -> String {
    let known = [
        (Errno::PERM, "EPERM"),
        (Errno::NOENT, "ENOENT"),
        (Errno::IO, "EIO"),
        (Errno::NXIO, "ENXIO"),
        (Errno::BADF, "EBADF"),
        (Errno::NOMEM, "ENOMEM"),
        (Errno::FAULT, "EFAULT"),
        (Errno::BUSY, "EBUSY"),
        (Errno::EXIST, "EEXIST"),
        (Errno::NODEV, "ENODEV"),
        (Errno::INVAL, "EINVAL"),
        (Errno::NOSPC, "ENOSPC"),
        (Errno::NOSYS, "ENOSYS"),
        (Errno::NOTTY, "ENOTTY"),
        (Errno::PROTO, "EPROTO"),
        (Errno::NOTSUP, "ENOTSUP"),
        (Errno::ALREADY, "EALREADY"),
    ];
    known.iter().find(|(e, _)| *e == errno).map_or_else(
        || format!("errno {}", errno.raw_os_error()),
        |(_, n)| (*n).to_owned(),
    )
}
