//! `split`: replace huge leaves by tables of smaller leaves with the same translation
//! (KVM `tdp_mmu_split_huge_page` + `make_huge_page_split_spte`, arm64
//! `kvm_pgtable_stage2_split`). No TLB flush is needed: every address translates as before.

use super::{RangeError, check_range, child_level};
use crate::addr::Level;
use crate::spt::error::{SplitError, flatten};
use crate::spt::format::PteFormat;
use crate::spt::memory::{TableMemory, Tables};
use crate::spt::walk::{Action, VisitCtx, VisitKind, Visitor, WalkFlags, walk};
use crate::spt::{PageTable, Va};
use crate::sync::Ordering;

/// How far `split` goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SplitTo {
    /// Each huge leaf becomes 512 leaves one level down (1 GiB → 2 MiB, 2 MiB → 4 KiB).
    OneLevel,
    /// Every huge leaf above this level is split down to it (level 1: all 4 KiB pages;
    /// level 2: 2 MiB granularity, for dirty logging in 2 MiB chunks).
    Level(Level),
}

struct SplitVisitor {
    /// Split leaves above this level; `None` for one level.
    target: Option<u8>,
    split: usize,
}

impl<F: PteFormat, M: TableMemory + ?Sized> Visitor<F, M> for SplitVisitor {
    type Error = SplitError;

    #[inline]
    fn visit(
        &mut self,
        kind: VisitKind,
        ctx: &mut VisitCtx<'_, F>,
        tables: &mut Tables<'_, M>,
    ) -> Result<Action, SplitError> {
        let level = ctx.level();
        let target = self.target.unwrap_or(1);
        if kind == VisitKind::TablePre {
            // Children at or below the target level have nothing to split.
            return Ok(if level.get() - 1 <= target {
                Action::SkipSubtree
            } else {
                Action::Continue
            });
        }
        if level.get() <= target || !F::is_huge(ctx.old(), level) {
            return Ok(Action::Continue);
        }
        let child = child_level(level);
        let shift = child.shift();
        loop {
            let table = tables.alloc().ok_or(SplitError::OutOfTables)?;
            let Some(entries) = tables.table(table) else {
                tables.free(table);
                return Err(SplitError::BadTable);
            };
            let first = F::split_child(ctx.old(), level);
            for (i, entry) in entries.iter().enumerate() {
                entry.store(first + ((i as u64) << shift), Ordering::Relaxed);
            }
            // The release store (or exchange) publishes the filled table.
            if ctx.set(F::table_entry(table)) {
                self.split += 1;
                break;
            }
            tables.free(table);
            if !F::is_huge(ctx.old(), level) {
                // Someone else split or zapped it; the walker reads the entry again.
                return Ok(Action::Continue);
            }
        }
        Ok(match self.target {
            Some(t) if child.get() > t => Action::Continue,
            _ => Action::SkipSubtree,
        })
    }
}

impl<F: PteFormat> PageTable<F> {
    /// Splits the huge leaves that intersect `[va, va + len)` (a leaf sticking out of the
    /// range is split whole; its parts outside the range are not split further). Returns
    /// how many huge leaves were split. Translations do not change, so nothing needs a
    /// TLB flush.
    ///
    /// On `OutOfTables` the leaves split so far stay split, which is harmless.
    pub fn split<M: TableMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        va: Va,
        len: u64,
        to: SplitTo,
    ) -> Result<usize, SplitError> {
        self.split_inner(mem, va, len, to, false)
    }

    /// [`split`](Self::split) in shared mode (KVM's eager split under the read lock,
    /// `tdp_mmu_split_huge_pages_root`). A leaf changed under a split is split again from
    /// its new value; one unmapped or split by someone else is left to them.
    pub fn split_shared<M: TableMemory + ?Sized>(
        &self,
        mem: &mut M,
        va: Va,
        len: u64,
        to: SplitTo,
    ) -> Result<usize, SplitError> {
        self.split_inner(mem, va, len, to, true)
    }

    fn split_inner<M: TableMemory + ?Sized>(
        &self,
        mem: &mut M,
        va: Va,
        len: u64,
        to: SplitTo,
        shared: bool,
    ) -> Result<usize, SplitError> {
        let end = check_range::<F>(va, len).map_err(|e| match e {
            RangeError::Unaligned => SplitError::Unaligned,
            RangeError::OutOfRange => SplitError::OutOfRange,
        })?;
        let mut visitor = SplitVisitor {
            target: match to {
                SplitTo::OneLevel => None,
                SplitTo::Level(l) => Some(l.get()),
            },
            split: 0,
        };
        let flags = match to {
            SplitTo::OneLevel => WalkFlags::LEAF,
            SplitTo::Level(_) => WalkFlags::LEAF | WalkFlags::TABLE_PRE,
        };
        walk::<F, M, _>(
            self.root,
            &mut Tables::new(mem),
            va.get(),
            end,
            flags,
            &mut visitor,
            shared,
        )
        .map_err(|e| flatten(e, SplitError::OutOfRange, SplitError::BadTable))?;
        Ok(visitor.split)
    }
}
