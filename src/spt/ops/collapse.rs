//! `collapse`: replace a table whose 512 leaves map one contiguous, aligned block with
//! identical attributes by one huge leaf (the effect of KVM's
//! `kvm_mmu_recover_huge_pages` / `kvm_tdp_mmu_recover_huge_pages`, done in place like
//! Linux's `collapse_huge_page`). The replaced table is freed after the TLB flush.

use arrayvec::ArrayVec;

use super::{RangeError, check_range, child_level};
use crate::addr::{Hpa, Level};
use crate::spt::error::{CollapseError, flatten};
use crate::spt::flush::{FlushGather, GATHER_RANGES, TlbFlush};
use crate::spt::format::PteFormat;
use crate::spt::memory::{TableMemory, Tables};
use crate::spt::walk::{Action, VisitCtx, VisitKind, Visitor, WalkFlags};
use crate::spt::{PageTable, Va};
use crate::sync::Ordering;

/// Tables replaced before the flush that frees them. Unlike unmapped tables they still hold
/// valid leaves a stale hardware walk may use, so they cannot be chained through their own
/// entries: they wait here, and a full batch forces a flush in the middle of the walk.
const BATCH: usize = 32;

struct CollapseVisitor<'t, T: ?Sized> {
    max: u8,
    tlb: &'t mut T,
    gather: FlushGather<GATHER_RANGES>,
    replaced: ArrayVec<Hpa, BATCH>,
    collapsed: usize,
}

impl<T: TlbFlush + ?Sized> CollapseVisitor<'_, T> {
    fn flush<M: TableMemory + ?Sized>(&mut self, tables: &mut Tables<'_, M>) {
        self.gather.flush(self.tlb);
        for table in self.replaced.drain(..) {
            tables.free(table);
        }
    }
}

/// The huge leaf that can replace the table `child` at `level`, if its leaves allow it.
fn collapsed_leaf<F: PteFormat>(entries: &crate::spt::Table, level: Level) -> Option<u64> {
    let child = child_level(level);
    let ad = F::ACCESSED | F::DIRTY;
    let first = entries[0].load(Ordering::Acquire);
    if !F::is_leaf(first, child) {
        return None;
    }
    let base = F::leaf_addr(first, child).get();
    if base % level.page_size() != 0 {
        return None;
    }
    let attrs = F::leaf_flags(first, child) & !ad;
    let mut seen_ad = 0;
    let step = child.page_size();
    for (i, entry) in entries.iter().enumerate() {
        let pte = entry.load(Ordering::Acquire);
        let flags = F::leaf_flags(pte, child);
        if !F::is_leaf(pte, child)
            || F::leaf_addr(pte, child).get() != base + i as u64 * step
            || flags & !ad != attrs
        {
            return None;
        }
        seen_ad |= flags & ad;
    }
    Some(F::leaf_entry(
        super::super::hpa(base),
        level,
        attrs | seen_ad,
    ))
}

impl<F: PteFormat, M: TableMemory + ?Sized, T: TlbFlush + ?Sized> Visitor<F, M>
    for CollapseVisitor<'_, T>
{
    type Error = CollapseError;

    fn visit(
        &mut self,
        _kind: VisitKind,
        ctx: &mut VisitCtx<'_, F>,
        tables: &mut Tables<'_, M>,
    ) -> Result<Action, CollapseError> {
        let level = ctx.level();
        if level.get() > self.max || !ctx.covered() {
            return Ok(Action::Continue);
        }
        let child = F::table_addr(ctx.old());
        let Some(entries) = tables.table(child) else {
            return Err(CollapseError::BadTable);
        };
        let Some(leaf) = collapsed_leaf::<F>(entries, level) else {
            return Ok(Action::Continue);
        };
        if self.replaced.is_full() {
            self.flush(tables);
        }
        let _ = ctx.set(leaf);
        self.gather.add(ctx.addr(), ctx.size());
        self.replaced.push(child);
        self.collapsed += 1;
        Ok(Action::Continue)
    }
}

impl<F: PteFormat> PageTable<F> {
    /// Collapses, bottom-up, every table inside `[va, va + len)` at levels up to `max`
    /// whose 512 leaves map one contiguous block aligned to the huge size, with identical
    /// flags apart from accessed and dirty (the huge leaf gets the union of those). A
    /// collapsed level-2 table can then let its level-3 parent collapse too. Flushes the TLB
    /// through `tlb` and only then frees the replaced tables. Returns how many tables were
    /// collapsed.
    ///
    /// `max` above the format's largest leaf is lowered to it; level 1 is refused.
    pub fn collapse<M: TableMemory + ?Sized, T: TlbFlush + ?Sized>(
        &mut self,
        mem: &mut M,
        tlb: &mut T,
        va: Va,
        len: u64,
        max: Level,
    ) -> Result<usize, CollapseError> {
        if max.get() < 2 {
            return Err(CollapseError::BadLevel);
        }
        let max = max.min(F::LARGEST_LEAF);
        check_range::<F>(va, len).map_err(|e| match e {
            RangeError::Unaligned => CollapseError::Unaligned,
            RangeError::OutOfRange => CollapseError::OutOfRange,
        })?;
        let mut visitor = CollapseVisitor {
            max: max.get(),
            tlb,
            gather: FlushGather::new(),
            replaced: ArrayVec::new(),
            collapsed: 0,
        };
        let result = self.walk(mem, va, len, WalkFlags::TABLE_POST, &mut visitor);
        // Even after an error, what was replaced is flushed and freed.
        visitor.flush(&mut Tables::new(mem));
        result.map_err(|e| flatten(e, CollapseError::OutOfRange, CollapseError::BadTable))?;
        Ok(visitor.collapsed)
    }
}
