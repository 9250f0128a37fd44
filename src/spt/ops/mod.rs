//! The operations, each one visitor on the walker of `walk.rs`.

mod collapse;
mod map;
mod protect;
mod split;
mod translate;
mod unmap;

pub use map::MapSize;
pub use split::SplitTo;
pub use translate::Translation;

use super::format::PteFormat;
use super::memory::TableMemory;
use super::walk::{Action, VisitCtx, VisitKind, WalkError, WalkFlags};
use super::{PageTable, Tables, Va};
use crate::addr::{Level, PAGE_SIZE};

/// What is wrong with a range, before any operation-specific check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RangeError {
    Unaligned,
    OutOfRange,
}

/// Checks that `[start, start + len)` is 4 KiB aligned and inside the format's input
/// addresses; returns the end.
pub(crate) fn check_range<F: PteFormat>(start: Va, len: u64) -> Result<u64, RangeError> {
    if start.get() % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 {
        return Err(RangeError::Unaligned);
    }
    match start.get().checked_add(len) {
        Some(end) if end <= 1 << F::INPUT_BITS => Ok(end),
        _ => Err(RangeError::OutOfRange),
    }
}

/// A huge leaf at `addr` that the range `[start, end)` covers only in part, if any:
/// looks at the leaves holding `start` and `end - 1` (a huge leaf can stick out of the
/// range only at its ends). `Err(())` on a bad table.
pub(crate) fn straddles_huge_leaf<F: PteFormat, M: TableMemory + ?Sized>(
    pt: &PageTable<F>,
    mem: &M,
    start: u64,
    end: u64,
) -> Result<bool, ()> {
    let largest = F::LARGEST_LEAF.page_size();
    for probe in [start, end - 1] {
        if probe == start && start % largest == 0 || probe == end - 1 && end % largest == 0 {
            continue;
        }
        let mut straddles = false;
        let mut visitor = |_: VisitKind, ctx: &mut VisitCtx<'_, F>, _: &mut Tables<'_, M>| {
            straddles = F::is_huge(ctx.old(), ctx.level()) && !ctx.covered_by(start, end);
            Ok::<_, ()>(Action::Stop)
        };
        match pt.walk_read(mem, probe, probe + 1, WalkFlags::LEAF, &mut visitor) {
            Ok(()) => {}
            Err(WalkError::Visitor(()))
            | Err(WalkError::BadTable(_))
            | Err(WalkError::OutOfRange) => {
                return Err(());
            }
        }
        if straddles {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The level below `level` (level 1 for level 1, which never has one).
#[inline]
pub(crate) fn child_level(level: Level) -> Level {
    level.lower().unwrap_or(Level::L1)
}
