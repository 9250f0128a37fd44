//! `unmap`: clear the leaves of a range and unlink the tables that become empty (KVM
//! `kvm_tdp_mmu_zap_leafs` + `tdp_mmu_zap_sp`, arm64 `kvm_pgtable_stage2_unmap`). A table
//! that another parent entry also links (a shared shadow page) is only unlinked from this
//! parent, its contents kept (KVM `mmu_page_zap_pte` → `drop_parent_pte`).

use super::{check_range, straddles_leaf, straddles_shared_table};
use crate::addr::Level;
use crate::spt::PageTable;
use crate::spt::error::{UnmapError, flatten};
use crate::spt::flush::PendingFlush;
use crate::spt::format::PteFormat;
use crate::spt::memory::{TableMemory, Tables, Unlinked};
use crate::spt::walk::{Action, VisitCtx, VisitKind, Visitor, WalkFlags};
use crate::sync::Ordering;

struct UnmapVisitor {
    pending: PendingFlush,
}

impl<F: PteFormat, M: TableMemory + ?Sized> Visitor<F, M> for UnmapVisitor {
    type Error = UnmapError;

    #[inline]
    fn visit(
        &mut self,
        kind: VisitKind,
        ctx: &mut VisitCtx<'_, F>,
        tables: &mut Tables<'_, M>,
    ) -> Result<Action, UnmapError> {
        match kind {
            VisitKind::Leaf => {
                if F::is_present(ctx.old()) {
                    if !ctx.covered() {
                        // The boundary check makes this unreachable.
                        return Err(UnmapError::SplitsHugePage);
                    }
                    let _ = ctx.set(0);
                    ctx.gather(&mut self.pending.gather);
                }
                Ok(Action::Continue)
            }
            VisitKind::TablePre => {
                let child = F::table_addr(ctx.old());
                if ctx.covered() && tables.links(child) > 1 {
                    // Shared with another parent: drop this link only. Whatever the
                    // subtree maps may be cached under this parent's addresses.
                    let _ = ctx.set(0);
                    let _ = tables.unlink(child);
                    self.pending
                        .gather
                        .add_raw(ctx.raw_addr(), ctx.size(), Level::L1);
                    return Ok(Action::SkipSubtree);
                }
                Ok(Action::Continue)
            }
            VisitKind::TablePost => {
                let child = F::table_addr(ctx.old());
                // A covered table had every entry cleared by this walk; one at the ends of
                // the range is empty only if nothing else in it is present.
                let empty = ctx.covered()
                    || tables.table(child).is_some_and(|entries| {
                        entries
                            .iter()
                            .all(|e| !F::is_present(e.load(Ordering::Acquire)))
                    });
                if !empty {
                    return Ok(Action::Continue);
                }
                if !self.pending.has_room() {
                    // Leave the empty table linked; a later unmap reclaims it.
                    self.pending.set_incomplete();
                    return Ok(Action::Continue);
                }
                let _ = ctx.set(0);
                // Paging-structure caches may hold the table for any address under it.
                ctx.gather_table(&mut self.pending.gather);
                if tables.unlink(child) == Unlinked::Free {
                    let _ = self.pending.defer(child);
                }
                Ok(Action::Continue)
            }
        }
    }
}

impl<F: PteFormat> PageTable<F> {
    /// Unmaps `[va, va + len)`: clears every leaf in it and unlinks every table that
    /// becomes empty. Unmapped holes in the range are fine. Returns the TLB flush to do,
    /// after which the unlinked tables are freed (x86_64 `Mapper::unmap` + `MapperFlush`).
    /// Exclusive: the caller holds the MMU lock for write.
    ///
    /// A table linked from another parent too is unlinked from this one and kept whole; a
    /// range that covers only part of such a table is refused before anything changes
    /// ([`UnmapError::SplitsSharedTable`]).
    /// Every leaf of the range is always cleared; if more than
    /// [`DEFER_TABLES`](crate::spt::DEFER_TABLES) tables empty, the rest stay linked (empty)
    /// and the token [is incomplete](PendingFlush::is_incomplete): flush it and unmap again
    /// to reclaim them.
    ///
    /// A range that covers part of a leaf of any level is refused before anything changes;
    /// split it first. `BadTable` (a table entry pointing outside table memory: a corrupted
    /// tree) can stop the walk after some leaves were cleared; flush the whole TLB then.
    /// The tables unlinked before it are not freed.
    pub fn unmap<M: TableMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        va: F::In,
        len: u64,
    ) -> Result<PendingFlush, UnmapError> {
        let (start, end) = check_range::<F>(va, len)?;
        if len == 0 {
            return Ok(PendingFlush::new());
        }
        match straddles_leaf(self, mem, start, end) {
            Ok(false) => {}
            Ok(true) => return Err(UnmapError::SplitsHugePage),
            Err(()) => return Err(UnmapError::BadTable),
        }
        match straddles_shared_table(self, mem, start, end) {
            Ok(false) => {}
            Ok(true) => return Err(UnmapError::SplitsSharedTable),
            Err(()) => return Err(UnmapError::BadTable),
        }
        let mut visitor = UnmapVisitor {
            pending: PendingFlush::new(),
        };
        let flags = WalkFlags::LEAF | WalkFlags::TABLE_PRE | WalkFlags::TABLE_POST;
        self.walk_raw(mem, start, end, flags, &mut visitor)
            .map_err(|e| flatten(e, UnmapError::OutOfRange, UnmapError::BadTable))?;
        Ok(visitor.pending)
    }
}
