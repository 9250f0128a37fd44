//! `unmap`: clear the leaves of a range and unlink the tables that become empty (KVM
//! `kvm_tdp_mmu_zap_leafs` + `tdp_mmu_zap_sp`, arm64 `kvm_pgtable_stage2_unmap`).

use super::{RangeError, check_range, straddles_huge_leaf};
use crate::spt::error::{UnmapError, flatten};
use crate::spt::flush::PendingFlush;
use crate::spt::format::PteFormat;
use crate::spt::memory::{TableMemory, Tables};
use crate::spt::walk::{Action, VisitCtx, VisitKind, Visitor, WalkFlags};
use crate::spt::{PageTable, Va};
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
                    self.pending.gather.add(ctx.addr(), ctx.size());
                }
                Ok(Action::Continue)
            }
            VisitKind::TablePre => Ok(Action::Continue),
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
                if empty {
                    let _ = ctx.set(0);
                    // Paging-structure caches may hold the table for any address under it.
                    self.pending.gather.add(ctx.addr(), ctx.size());
                    self.pending.tables.push(child, tables);
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
    ///
    /// A range that covers part of a huge page is refused before anything changes; split
    /// the page first. `BadTable` (a table entry pointing outside table memory: a corrupted
    /// tree) can stop the walk after some leaves were cleared; flush the whole TLB then.
    /// The tables unlinked before it are not freed.
    pub fn unmap<M: TableMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        va: Va,
        len: u64,
    ) -> Result<PendingFlush, UnmapError> {
        let end = check_range::<F>(va, len).map_err(|e| match e {
            RangeError::Unaligned => UnmapError::Unaligned,
            RangeError::OutOfRange => UnmapError::OutOfRange,
        })?;
        if len == 0 {
            return Ok(PendingFlush::new());
        }
        match straddles_huge_leaf(self, mem, va.get(), end) {
            Ok(false) => {}
            Ok(true) => return Err(UnmapError::SplitsHugePage),
            Err(()) => return Err(UnmapError::BadTable),
        }
        let mut visitor = UnmapVisitor {
            pending: PendingFlush::new(),
        };
        let flags = WalkFlags::LEAF | WalkFlags::TABLE_POST;
        self.walk(mem, va, len, flags, &mut visitor)
            .map_err(|e| flatten(e, UnmapError::OutOfRange, UnmapError::BadTable))?;
        Ok(visitor.pending)
    }
}
