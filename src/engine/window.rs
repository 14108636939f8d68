//! Hardware DMA window geometry, computed as QEMU's `vfio_spapr_create_window` computes it.
//!
//! The guest's TCE table fixes the bus offset, the window size and the guest page size; the
//! host chooses a hardware page no larger than that and than the page backing guest RAM, from
//! the page sizes the platform supports, and a table depth (levels) that fits the window.

use super::EngineError;
use rustix::io::Errno;

/// What `WINDOW_CREATE` asks the kernel for first, and how far it may retry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub hw_page_shift: u32,
    pub window_size: u64,
    /// Levels to try first.
    pub levels: u32,
    /// Deepest levels to retry with when creation fails (host memory fragmentation).
    pub max_levels: u32,
}

/// Computes the hardware window for a guest table of `entries` pages of `1 << page_shift`.
///
/// - `pgsizes`: the platform's supported IOMMU page sizes (bit n = `1 << n`), from GET_INFO;
/// - `max_levels`: the platform's deepest table (GET_INFO `ddw.levels`);
/// - `ram_page_size`: the smallest page backing guest RAM (a larger hardware page could not be
///   pinned as one piece);
/// - `host_page_size`: the host's base page size (sizes one level of the hardware table).
pub fn geometry(
    page_shift: u32,
    entries: u64,
    pgsizes: u64,
    max_levels: u32,
    ram_page_size: u64,
    host_page_size: u64,
) -> Result<Geometry, EngineError> {
    let mut pagesize = 1u64 << page_shift;
    // The host may not support the guest's IOMMU page size: use smaller physical pages.
    if pagesize > ram_page_size {
        pagesize = ram_page_size;
    }
    let usable = pgsizes & (pagesize | (pagesize - 1));
    if usable == 0 {
        return Err(EngineError::new(
            Errno::INVAL,
            format!(
                "the host supports no IOMMU page size up to {pagesize:#x} (host page sizes {pgsizes:#x})"
            ),
        ));
    }
    let hw_page_shift = 63 - usable.leading_zeros();
    let window_size = entries
        .checked_shl(page_shift)
        .filter(|size| size >> page_shift == entries)
        .ok_or_else(|| {
            EngineError::new(Errno::INVAL, "the table's window size overflows 64 bits")
        })?;

    let hw_entries = window_size >> hw_page_shift;
    let bits_total = (hw_entries.saturating_mul(8)).trailing_zeros();
    let bits_per_level = host_page_size.trailing_zeros() + 8;
    let levels = bits_total.div_ceil(bits_per_level).max(1);
    // QEMU's bound for the retry loop, capped by what the platform reports.
    let depth_bound = (64 - hw_page_shift) / host_page_size.trailing_zeros().max(1);
    let max_levels = max_levels.min(depth_bound);
    if levels > max_levels {
        return Err(EngineError::new(
            Errno::INVAL,
            if max_levels <= 1 {
                format!(
                    "the host does not support multi-level TCE tables and a {window_size:#x}-byte \
                     window of {:#x}-byte pages needs {levels}; use a larger IO page size",
                    1u64 << hw_page_shift
                )
            } else {
                format!("the window needs {levels} table levels, the host supports {max_levels}")
            },
        ));
    }
    Ok(Geometry {
        hw_page_shift,
        window_size,
        levels,
        max_levels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 4 KiB, 64 KiB, 2 MiB and 1 GiB, as a powernv PHB reports them.
    const POWERNV_PGSIZES: u64 = 0x4021_1000;
    const K64: u64 = 1 << 16;

    #[test]
    fn geometry_guest_page_larger_than_ram_page_uses_ram_page() {
        // 16 MiB guest pages on 64 KiB-backed RAM: hardware pages are 64 KiB.
        let g = geometry(24, 1 << 16, POWERNV_PGSIZES, 5, K64, K64).unwrap();
        assert_eq!(g.hw_page_shift, 16);
        assert_eq!(g.window_size, 1 << 40);
    }

    #[test]
    fn geometry_picks_largest_supported_page_not_above_guest_page() {
        // Guest 2 MiB pages on 16 MiB hugepage-backed RAM, a host with 4 KiB and 64 KiB pages:
        // the largest supported size not above 2 MiB is 64 KiB.
        let g = geometry(21, 512, (1 << 12) | (1 << 16), 5, 1 << 24, K64).unwrap();
        assert_eq!(g.hw_page_shift, 16);
    }

    #[test]
    fn geometry_no_supported_page_is_einval() {
        let err = geometry(12, 1024, 1 << 16, 5, K64, K64).unwrap_err();
        assert_eq!(err.errno, Errno::INVAL);
    }

    #[test]
    fn geometry_levels_follow_window_size() {
        // 1 GiB of 4 KiB pages: 2^18 entries, 2^21 bytes of TCEs; with 64 KiB host pages a
        // level resolves 24 bits, so one level.
        assert_eq!(
            geometry(12, 1 << 18, 1 << 12, 5, K64, K64).unwrap().levels,
            1
        );
        // 1 TiB of 64 KiB pages: 2^24 entries, 2^27 bytes of TCEs: two levels.
        assert_eq!(
            geometry(16, 1 << 24, 1 << 16, 5, K64, K64).unwrap().levels,
            2
        );
    }

    #[test]
    fn geometry_single_level_host_refuses_deep_window() {
        let err = geometry(16, 1 << 24, 1 << 16, 1, K64, K64).unwrap_err();
        assert!(err.text.contains("multi-level"), "{}", err.text);
    }

    #[test]
    fn geometry_overflowing_window_is_einval() {
        assert!(geometry(34, 1 << 40, 1 << 16, 5, K64, K64).is_err());
    }
}
