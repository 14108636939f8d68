//! WINDOW_QUERY: what a container can still offer the guest's DDW requests (qemu-notes §7),
//! answered from the TCE info without a kernel call.

use crate::engine::state::State;
use crate::engine::EngineError;
use crate::kernel::ContainerId;
use crate::protocol::WindowQueryBody;

use super::attached_container;

/// The reply body: windows left and at most, page sizes, and the guest RAM to cover.
pub(super) fn answer(state: &State, container: ContainerId) -> Result<Vec<u8>, EngineError> {
    let c = attached_container(state, container)?;
    let info = c.info.unwrap_or_default();
    let used = c.windows.values().filter(|w| !w.default).count() as u32;
    let body = WindowQueryBody {
        windows_available: info.max_dynamic_windows.saturating_sub(used),
        windows_max: info.max_dynamic_windows,
        page_sizes: info.pgsizes,
        ram_size: state.regions.values().map(|r| r.desc.size).sum(),
    };
    Ok(body.encode())
}
