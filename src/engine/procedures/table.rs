//! TABLE_ADD and TABLE_REMOVE: the guest's TCE tables as the session knows them. Both are
//! answered without a kernel call; a table's hardware window is a request of its own.

use rustix::io::Errno;

use crate::engine::state::{State, Table};
use crate::engine::{EngineError, FdFacts};
use crate::kernel::{ContainerId, OwnershipMode, TableId};
use crate::protocol::TableDesc;

use super::err;

/// Records a table once it passes [`check_table`].
pub(super) fn add(
    state: &mut State,
    mode: OwnershipMode,
    desc: TableDesc,
    fd: Option<FdFacts>,
) -> Result<(), EngineError> {
    check_table(state, mode, &desc, fd)?;
    state.tables.insert(
        TableId(desc.table_id),
        Table {
            desc,
            mapped: Default::default(),
            mapped_regions: Default::default(),
            suspect: false,
        },
    );
    Ok(())
}

/// Forgets a table that has no window.
pub(super) fn remove(state: &mut State, table: TableId) -> Result<(), EngineError> {
    if !state.tables.contains_key(&table) {
        return Err(err(Errno::NOENT, format!("{table} is not registered")));
    }
    if state.window_of(table).is_some() {
        return Err(err(
            Errno::BUSY,
            format!("{table} still has a window; remove it first"),
        ));
    }
    state.tables.remove(&table);
    Ok(())
}

fn check_table(
    state: &State,
    mode: OwnershipMode,
    desc: &TableDesc,
    fd: Option<FdFacts>,
) -> Result<(), EngineError> {
    let table = TableId(desc.table_id);
    let container = ContainerId(desc.container_id);
    if state.tables.contains_key(&table) {
        return Err(err(Errno::EXIST, format!("{table} is already registered")));
    }
    if !state.groups.values().any(|g| g.container == container) {
        return Err(err(Errno::NOENT, format!("{container} has no group")));
    }
    if !(12..=34).contains(&desc.page_shift) {
        return Err(err(
            Errno::INVAL,
            format!("page shift {} is outside 12..=34", desc.page_shift),
        ));
    }
    let size = desc
        .entries
        .checked_shl(desc.page_shift)
        .filter(|s| s >> desc.page_shift == desc.entries);
    let fits = size.and_then(|s| desc.bus_offset.checked_add(s)).is_some();
    if desc.entries == 0 || !fits || desc.bus_offset % (1 << desc.page_shift) != 0 {
        return Err(err(
            Errno::INVAL,
            "entries must be nonzero, the bus offset page aligned, and the window must not wrap",
        ));
    }
    if let Some((other, _)) = state
        .tables
        .iter()
        .find(|(_, t)| t.desc.liobn == desc.liobn)
    {
        return Err(err(
            Errno::EXIST,
            format!("LIOBN {:#x} is already used by {other}", desc.liobn),
        ));
    }
    // In isolated mode the fd is the front-end's shared userspace table, which must hold every
    // entry; a KVM table fd (accelerated) has no size to check.
    if mode == OwnershipMode::Isolated {
        let needed = desc.entries.saturating_mul(8);
        if fd.is_none_or(|f| f.size < needed) {
            return Err(err(
                Errno::INVAL,
                format!(
                    "in isolated mode the table is the front-end's userspace table in a memfd (never a KVM table: K7), which must hold {needed:#x} bytes ({} entries)",
                    desc.entries
                ),
            ));
        }
    }
    Ok(())
}
