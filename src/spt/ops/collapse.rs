//! `collapse`: replace a table whose 512 leaves map one contiguous, aligned block with
//! identical attributes by one huge leaf (the effect of KVM's
//! `kvm_mmu_recover_huge_pages` / `kvm_tdp_mmu_recover_huge_pages`, done in place like
//! Linux's `collapse_huge_page`). The replaced table is freed after the TLB flush: until
//! then a stale hardware walk may still use its (valid) leaves.

use super::{check_range, child_level};
use crate::addr::Level;
use crate::spt::PageTable;
use crate::spt::error::{CollapseError, flatten};
use crate::spt::flush::PendingFlush;
use crate::spt::format::PteFormat;
use crate::spt::memory::{TableMemory, Tables, Unlinked};
use crate::spt::walk::{Action, VisitCtx, VisitKind, Visitor, WalkFlags};
use crate::sync::Ordering;

struct CollapseVisitor {
    max: u8,
    pending: PendingFlush,
    /// A table entry pointing outside table memory was skipped.
    bad: bool,
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

impl<F: PteFormat, M: TableMemory + ?Sized> Visitor<F, M> for CollapseVisitor {
    type Error = CollapseError;

    fn visit(
        &mut self,
        kind: VisitKind,
        ctx: &mut VisitCtx<'_, F>,
        tables: &mut Tables<'_, M>,
    ) -> Result<Action, CollapseError> {
        let level = ctx.level();
        if kind == VisitKind::TablePre {
            // Skip (and remember) a corrupt subtree instead of failing halfway with
            // collapsed tables whose flush would be lost.
            if tables.table(F::table_addr(ctx.old())).is_none() {
                self.bad = true;
                return Ok(Action::SkipSubtree);
            }
            return Ok(Action::Continue);
        }
        if level.get() > self.max || !ctx.covered() || self.pending.is_incomplete() {
            return Ok(Action::Continue);
        }
        let child = F::table_addr(ctx.old());
        let Some(entries) = tables.table(child) else {
            self.bad = true;
            return Ok(Action::Continue);
        };
        let Some(leaf) = collapsed_leaf::<F>(entries, level) else {
            return Ok(Action::Continue);
        };
        if !self.pending.has_room() {
            // Stop collapsing; the caller flushes and runs collapse again.
            self.pending.set_incomplete();
            return Ok(Action::Continue);
        }
        let _ = ctx.set(leaf);
        // The child's leaves may be cached one by one.
        self.pending
            .gather
            .add_raw(ctx.raw_addr(), ctx.size(), child_level(level));
        if tables.unlink(child) == Unlinked::Free {
            let _ = self.pending.defer(child);
        }
        Ok(Action::Continue)
    }
}

impl<F: PteFormat> PageTable<F> {
    /// Collapses, bottom-up, every table inside `[va, va + len)` at levels up to `max`
    /// (lowered to the page table's maximum leaf level) whose 512 leaves map one contiguous
    /// block aligned to the huge size, with identical flags apart from accessed and dirty
    /// (the huge leaf gets the union of those). A collapsed level-2 table can then let its
    /// level-3 parent collapse too. Exclusive: the caller holds the MMU lock for write.
    ///
    /// Returns the TLB flush to do, after which the replaced tables are freed;
    /// [`tables_to_free`](PendingFlush::tables_to_free) is the number collapsed (a replaced
    /// table another parent still links is kept and not counted). At most
    /// [`DEFER_TABLES`](crate::spt::DEFER_TABLES) tables collapse per call; when more could,
    /// the token [is incomplete](PendingFlush::is_incomplete): flush and call again.
    /// Level 1 is refused. A table entry pointing outside table memory (a corrupt tree)
    /// is skipped; `BadTable` is returned only when nothing was collapsed, so a pending
    /// flush is never lost.
    pub fn collapse<M: TableMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        va: F::In,
        len: u64,
        max: Level,
    ) -> Result<PendingFlush, CollapseError> {
        if max.get() < 2 {
            return Err(CollapseError::BadLevel);
        }
        let max = max.min(self.max_leaf());
        let (start, end) = check_range::<F>(va, len)?;
        if max.get() < 2 {
            return Ok(PendingFlush::new());
        }
        let mut visitor = CollapseVisitor {
            max: max.get(),
            pending: PendingFlush::new(),
            bad: false,
        };
        let flags = WalkFlags::TABLE_PRE | WalkFlags::TABLE_POST;
        self.walk_raw(mem, start, end, flags, &mut visitor)
            .map_err(|e| flatten(e, CollapseError::OutOfRange, CollapseError::BadTable))?;
        if visitor.bad && visitor.pending.is_empty() {
            return Err(CollapseError::BadTable);
        }
        Ok(visitor.pending)
    }
}
