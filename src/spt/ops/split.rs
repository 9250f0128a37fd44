//! `split`: replace huge leaves by tables of smaller leaves with the same translation
//! (KVM `tdp_mmu_split_huge_page` + `make_huge_page_split_spte`, arm64
//! `kvm_pgtable_stage2_split`). No TLB flush is needed: every address translates as before.
//!
//! [`split_entry`] is the primitive: one huge leaf, named by a visit context (from a walk,
//! or rebuilt from an [`EntryRef`] an rmap holds), into a child table the caller provides
//! (fresh from a cache, or an existing shadow page to reuse; KVM
//! `shadow_mmu_split_huge_page`). [`PageTable::split`] walks a range with it, taking tables
//! from whatever [`TableAlloc`](crate::spt::TableAlloc) its memory has, and stops where the
//! tables ran out so the caller can top up (with the MMU lock dropped) and resume.

use super::{check_range, child_level};
use crate::addr::{Address, Hpa, Level, PAGE_SIZE};
use crate::spt::PageTable;
use crate::spt::error::{SplitEntryError, SplitError, flatten};
use crate::spt::format::PteFormat;
use crate::spt::memory::{ENTRIES, TableLinks, TableMapping, TableMemory, Tables, table_ref};
use crate::spt::walk::{Action, EntryRef, VisitCtx, VisitKind, Visitor, WalkFlags, in_addr};
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

/// The child table [`split_entry`] installs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SplitChild {
    /// A table just allocated (its contents are overwritten whole).
    Fresh(Hpa),
    /// A table that already exists and may hold entries (a shadow page found by gfn and
    /// role, KVM `shadow_mmu_get_sp_for_split`): present entries are kept, the others
    /// filled.
    Existing(Hpa),
}

/// What [`split_entry`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EntrySplit {
    /// The child table, now linked where the huge leaf was.
    pub child: Hpa,
    /// Leaves written into the child (each reported to the callback).
    pub filled: usize,
    /// Present entries of an existing child that were kept.
    pub kept: usize,
    /// Whether a kept entry is a table: then translations below it may differ from the
    /// huge leaf's, and the range needs a TLB flush (KVM's `flush |= !is_last_spte`).
    pub needs_flush: bool,
}

/// Where a ranged [`split`](PageTable::split) ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SplitDone<F: PteFormat> {
    /// Huge leaves split.
    pub split: usize,
    /// `Some(addr)` when the table memory ran out at the huge leaf mapping `addr`: top it
    /// up and split again from there. `None` when the range is done.
    pub resume_at: Option<F::In>,
}

/// Splits the huge leaf at `at` into the child table `child` (KVM
/// `shadow_mmu_split_huge_page`, arm64 `stage2_split_walker` for one entry), then calls
/// `on_leaf(handle, input address, entry)` once for every leaf it wrote, so the caller can
/// add rmap entries without a second walk. The child is filled first and published last,
/// by one release store (or compare-exchange in shared mode) of the table entry; the link
/// is recorded with [`TableLinks::link`]. The callbacks run after the publish.
///
/// Refused, changing nothing: an entry that is not a huge leaf, a child outside table
/// memory, an existing child whose leaves map other pages. In shared mode a lost race is
/// `NotHuge` (a fresh child was never visible and can be reused; an existing child may
/// have had missing leaves filled with the same translations).
#[inline]
pub fn split_entry<F, M, C>(
    mem: &M,
    at: &mut VisitCtx<'_, F>,
    child: SplitChild,
    mut on_leaf: C,
) -> Result<EntrySplit, SplitEntryError>
where
    F: PteFormat,
    M: TableMapping + TableLinks + ?Sized,
    C: FnMut(EntryRef, F::In, u64),
{
    let level = at.level();
    let huge = at.old();
    if !F::is_huge(huge, level) {
        return Err(SplitEntryError::NotHuge);
    }
    let (table, existing) = match child {
        SplitChild::Fresh(t) => (t, false),
        SplitChild::Existing(t) => (t, true),
    };
    let entries = table_ref(mem, table).ok_or(SplitEntryError::BadChild)?;
    let below = child_level(level);
    let shift = below.shift();
    let step = 1u64 << shift;
    let first = F::split_child(huge, level);
    let mut out = EntrySplit {
        child: table,
        filled: ENTRIES,
        kept: 0,
        needs_flush: false,
    };
    // Which entries this call writes (all of them for a fresh child).
    let mut written = [u64::MAX; ENTRIES / 64];
    if existing {
        let base = F::leaf_addr(first, below).get();
        for (i, entry) in entries.iter().enumerate() {
            let e = entry.load(Ordering::Acquire);
            if !F::is_present(e) {
                continue;
            }
            if F::is_leaf(e, below) && F::leaf_addr(e, below).get() != base + i as u64 * step {
                return Err(SplitEntryError::ChildMismatch);
            }
            written[i / 64] &= !(1 << (i % 64));
            out.kept += 1;
            out.needs_flush |= F::is_table(e, below);
        }
        out.filled = ENTRIES - out.kept;
        let mut value = first;
        for (i, entry) in entries.iter().enumerate() {
            if written[i / 64] & (1 << (i % 64)) != 0 {
                entry.store(value, Ordering::Relaxed);
            }
            value += step;
        }
    } else {
        // Child i is child 0 plus i pages of the child size (KVM
        // `make_huge_page_split_spte`), written eight at a time.
        let mut value = first;
        for chunk in entries.chunks_exact(8) {
            for entry in chunk {
                entry.store(value, Ordering::Relaxed);
                value += step;
            }
        }
    }
    // The release store (or exchange) publishes the filled table.
    if !at.set(F::table_entry(table)) {
        return Err(SplitEntryError::NotHuge);
    }
    mem.link(table, below);
    let base = at.raw_addr();
    let mut value = first;
    if existing {
        for i in 0..ENTRIES {
            if written[i / 64] & (1 << (i % 64)) != 0 {
                // `table` is 4 KiB aligned (it mapped) and `i < 512`.
                if let Some(handle) = EntryRef::new(table, i) {
                    on_leaf(handle, in_addr::<F>(base + ((i as u64) << shift)), value);
                }
            }
            value += step;
        }
    } else if table.get() % PAGE_SIZE == 0 {
        // A fresh child: every entry was written, no bitmap to consult, and the handles
        // are `table | i` (the alignment checked once, not per leaf).
        for i in 0..ENTRIES {
            on_leaf(
                EntryRef::from_parts(table, i),
                in_addr::<F>(base + ((i as u64) << shift)),
                value,
            );
            value += step;
        }
    }
    Ok(out)
}

struct SplitVisitor {
    /// Split leaves above this level; `None` for one level.
    target: Option<u8>,
    split: usize,
    /// Where the table memory ran out.
    stopped: Option<u64>,
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
        loop {
            let Some(table) = tables.alloc_to_fill(child) else {
                self.stopped = Some(ctx.raw_addr());
                return Ok(Action::Stop);
            };
            match split_entry(tables.memory(), ctx, SplitChild::Fresh(table), |_, _, _| {}) {
                Ok(_) => {
                    self.split += 1;
                    break;
                }
                Err(e) => {
                    // Never published: give it back at once.
                    let _ = tables.free(table);
                    if e == SplitEntryError::BadChild {
                        return Err(SplitError::BadTable);
                    }
                    if !F::is_huge(ctx.old(), level) {
                        // Someone else split or zapped it; the walker reads it again.
                        return Ok(Action::Continue);
                    }
                }
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
    /// range is split whole; its parts outside the range are not split further), with new
    /// tables from `mem`'s allocator (pair a mapping with an MMU memory cache through
    /// [`WithAlloc`](crate::spt::WithAlloc)). Translations do not change, so nothing needs
    /// a TLB flush. `mode` may be [`WalkFlags::SHARED`] (KVM's eager split under the read
    /// lock, `tdp_mmu_split_huge_pages_root`): a leaf changed under a split is split again
    /// from its new value; one unmapped or split by someone else is left to them.
    ///
    /// When the allocator runs dry the split stops and [`SplitDone::resume_at`] says where
    /// to go on; the leaves split so far stay split, which is harmless.
    pub fn split<M: TableMemory + ?Sized>(
        &self,
        mem: &mut M,
        va: F::In,
        len: u64,
        to: SplitTo,
        mode: WalkFlags,
    ) -> Result<SplitDone<F>, SplitError> {
        let (start, end) = check_range::<F>(va, len)?;
        let mut visitor = SplitVisitor {
            target: match to {
                SplitTo::OneLevel => None,
                SplitTo::Level(l) => Some(l.get()),
            },
            split: 0,
            stopped: None,
        };
        let flags = match to {
            SplitTo::OneLevel => WalkFlags::LEAF,
            SplitTo::Level(_) => WalkFlags::LEAF | WalkFlags::TABLE_PRE,
        } | (mode & WalkFlags::SHARED);
        self.walk_raw(mem, start, end, flags, &mut visitor)
            .map_err(|e| flatten(e, SplitError::OutOfRange, SplitError::BadTable))?;
        Ok(SplitDone {
            split: visitor.split,
            resume_at: visitor.stopped.and_then(|a| F::In::from_raw(a).ok()),
        })
    }
}
