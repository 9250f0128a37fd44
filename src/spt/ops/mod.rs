//! The operations, each one visitor on the walker of `walk.rs`.

mod collapse;
mod map;
mod protect;
mod split;
mod translate;
mod unmap;

pub use map::MapSize;
#[cfg(feature = "alloc")]
pub(crate) use split::split_entry_run_with;
pub use split::{
    EntrySplit, SplitChild, SplitDone, SplitLeaves, SplitTo, split_entry, split_entry_run,
};
pub use translate::Translation;

use super::format::PteFormat;
use super::memory::TableMemory;
use super::walk::{Action, Subtree, VisitCtx, VisitKind, WalkError, WalkFlags, walk};
use super::{PageTable, Tables};
use crate::addr::{Address, Level, PAGE_SIZE};

/// What is wrong with a range, before any operation-specific check. Each operation's error
/// has a `From` impl for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RangeError {
    Unaligned,
    OutOfRange,
}

/// Checks that `[start, start + len)` is 4 KiB aligned and inside the format's input
/// addresses; returns `(start, end)` as raw addresses.
pub(crate) fn check_range<F: PteFormat>(start: F::In, len: u64) -> Result<(u64, u64), RangeError> {
    let start = start.raw();
    if start % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 {
        return Err(RangeError::Unaligned);
    }
    match start.checked_add(len) {
        Some(end) if end <= 1 << F::INPUT_BITS => Ok((start, end)),
        _ => Err(RangeError::OutOfRange),
    }
}

/// A leaf that the range `[start, end)` covers only in part, if any: looks at the entries
/// holding `start` and `end - 1`, since a leaf can stick out of the range only at its
/// ends. Leaves of any level count, even above the format's largest leaf (an entry with
/// the page-size bit set where hardware would fault on it), so the check is total.
/// `Err(())` on a bad table.
pub(crate) fn straddles_leaf<F: PteFormat, M: TableMemory + ?Sized>(
    pt: &PageTable<F>,
    mem: &M,
    start: u64,
    end: u64,
) -> Result<bool, ()> {
    // No leaf is larger than one entry of the root table.
    let largest = F::ROOT_LEVEL.page_size();
    for probe in [start, end - 1] {
        if probe == start && start % largest == 0 || probe == end - 1 && end % largest == 0 {
            continue;
        }
        let mut straddles = false;
        let mut visitor = |_: VisitKind, ctx: &mut VisitCtx<'_, F>, _: &mut Tables<'_, M>| {
            straddles = F::is_present(ctx.old()) && !ctx.covered_by(start, end);
            Ok::<_, ()>(Action::Stop)
        };
        match pt.walk_read(mem, probe, probe + 1, WalkFlags::LEAF, &mut visitor) {
            Ok(()) => {}
            Err(_) => return Err(()),
        }
        if straddles {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Whether `[start, end)` covers part of a table that another parent entry links too. Only
/// tables on the paths of the range's two ends can be covered in part, so two walks from
/// the root decide it. `Err` for a table entry outside table memory.
pub(crate) fn straddles_shared_table<F: PteFormat, M: TableMemory + ?Sized>(
    pt: &PageTable<F>,
    mem: &M,
    start: u64,
    end: u64,
) -> Result<bool, ()> {
    for probe in [start, end - 1] {
        let mut shared = false;
        let mut visitor =
            |kind: VisitKind, ctx: &mut VisitCtx<'_, F>, tables: &mut Tables<'_, M>| {
                if kind == VisitKind::TablePre
                    && !ctx.covered_by(start, end)
                    && tables.links(F::table_addr(ctx.old())) > 1
                {
                    shared = true;
                    return Ok::<_, ()>(Action::Stop);
                }
                Ok(Action::Continue)
            };
        if pt
            .walk_read(mem, probe, probe + 1, WalkFlags::TABLE_PRE, &mut visitor)
            .is_err()
        {
            return Err(());
        }
        if shared {
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

impl<F: PteFormat> PageTable<F> {
    /// Walks read-only (visitors cannot allocate, free or change link counts).
    #[inline]
    pub(crate) fn walk_read<M, V>(
        &self,
        mem: &M,
        start: u64,
        end: u64,
        flags: WalkFlags,
        visitor: &mut V,
    ) -> Result<(), WalkError<V::Error>>
    where
        M: TableMemory + ?Sized,
        V: super::walk::Visitor<F, M>,
    {
        let flags = flags & !WalkFlags::SHARED;
        self.walk_in(&mut Tables::read_only(mem), start, end, flags, visitor)
    }

    /// Walks `[start, end)` (raw) with full access.
    #[inline]
    pub(crate) fn walk_raw<M, V>(
        &self,
        mem: &mut M,
        start: u64,
        end: u64,
        flags: WalkFlags,
        visitor: &mut V,
    ) -> Result<(), WalkError<V::Error>>
    where
        M: TableMemory + ?Sized,
        V: super::walk::Visitor<F, M>,
    {
        self.walk_in(&mut Tables::new(mem), start, end, flags, visitor)
    }

    #[inline]
    fn walk_in<M, V>(
        &self,
        tables: &mut Tables<'_, M>,
        start: u64,
        end: u64,
        flags: WalkFlags,
        visitor: &mut V,
    ) -> Result<(), WalkError<V::Error>>
    where
        M: TableMemory + ?Sized,
        V: super::walk::Visitor<F, M>,
    {
        walk::<F, M, V>(
            Subtree::root::<F>(self.root()),
            tables,
            start,
            end,
            flags,
            visitor,
        )
    }
}
