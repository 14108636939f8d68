//! WINDOW_ADOPT: a table's window that the lost session created and associated in KVM, taken
//! over by a rebuilt session. Answered without a kernel call: the window already exists.

use crate::engine::state::{HwWindow, State};
use crate::engine::{EngineError, Host};
use crate::kernel::{ContainerId, TableId};

use super::window_create::WindowCreate;

/// Records the window as WINDOW_CREATE would have left it and returns the reply body.
pub(super) fn adopt(
    state: &mut State,
    host: &Host,
    table: TableId,
) -> Result<Vec<u8>, EngineError> {
    let create = WindowCreate::check(state, host, table)?;
    let (container, start) = {
        let t = &state.tables[&table];
        (ContainerId(t.desc.container_id), t.desc.bus_offset)
    };
    let g = create.geometry;
    let c = state.containers.entry(container).or_default();
    c.windows.insert(
        start,
        HwWindow {
            size: g.window_size,
            page_shift: g.hw_page_shift,
            levels: g.levels,
            default: false,
        },
    );
    // The lost session associated every group of the container with the table.
    for group in state.groups.values_mut() {
        if group.container == container && group.attached {
            group.file_added = true;
            group.associations.insert(table);
        }
    }
    Ok(create.body_at(start))
}
