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
use crate::spt::memory::{
    ENTRIES, TableLinks, TableMapping, TableMemory, Tables, store_progression, stream_fence,
    stream_progression, table_ref,
};
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

/// The leaves one [`split_entry_run`] wrote, handed to its callback in one piece (KVM
/// `shadow_mmu_split_huge_page` adds each child's rmap entry in the same loop that writes
/// it; here the caller gets the whole run and can do its bookkeeping for all 512 leaves at
/// once). Leaf `i` is entry `i` of [`table`](Self::table), maps input address
/// `base + i * child page size` and holds `first + i * step`.
#[derive(Clone, Copy, Debug)]
pub struct SplitLeaves<F: PteFormat> {
    table: Hpa,
    /// Raw input address of entry 0.
    base: u64,
    /// The child level's shift.
    shift: u32,
    /// Entry 0's value and the increment per entry.
    first: u64,
    step: u64,
    /// Which entries were written (every bit set for a fresh child).
    written: [u64; ENTRIES / 64],
    _format: core::marker::PhantomData<F>,
}

impl<F: PteFormat> SplitLeaves<F> {
    /// The child table the leaves are in (4 KiB aligned).
    #[inline]
    pub fn table(&self) -> Hpa {
        self.table
    }

    /// Whether every one of the 512 entries was written (always, for a fresh child): then
    /// leaf `i` is entry `i` for every `i < 512`.
    #[inline]
    pub fn all_written(&self) -> bool {
        self.written.iter().all(|&w| w == u64::MAX)
    }

    /// Leaves written.
    #[inline]
    pub fn len(&self) -> usize {
        self.written.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Whether no leaf was written (an existing child that was already full).
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.written.iter().all(|&w| w == 0)
    }

    /// Whether entry `i` was written.
    #[inline]
    pub fn is_written(&self, i: usize) -> bool {
        self.written
            .get(i / 64)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    /// The input address of entry 0 (raw).
    #[inline]
    pub fn raw_base(&self) -> u64 {
        self.base
    }

    /// Each leaf written, in entry order: its handle, input address and value.
    pub fn iter(&self) -> impl Iterator<Item = (EntryRef, F::In, u64)> + '_ {
        (0..ENTRIES).filter(|&i| self.is_written(i)).map(|i| {
            (
                EntryRef::from_parts(self.table, i),
                in_addr::<F>(self.base + ((i as u64) << self.shift)),
                self.first + i as u64 * self.step,
            )
        })
    }
}

/// Splits the huge leaf at `at` into the child table `child` (KVM
/// `shadow_mmu_split_huge_page`, arm64 `stage2_split_walker` for one entry), then calls
/// `on_leaf(handle, input address, entry)` once for every leaf it wrote, so the caller can
/// add rmap entries without a second walk. [`split_entry_run`] is the same with one call
/// for all the leaves. The child is filled first and published last, by one release store
/// (or compare-exchange in shared mode) of the table entry; the link is recorded with
/// [`TableLinks::link`]. The callbacks run after the publish.
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
    split_entry_run(mem, at, child, |run| {
        for (e, a, v) in run.iter() {
            on_leaf(e, a, v);
        }
    })
}

/// [`split_entry`] with one callback for the whole run of leaves written, after the
/// publish (not called when the split is refused). A caller that keeps one record per leaf
/// in an array indexed like the child's entries (an rmap level) can fill it for all 512
/// at once when [`SplitLeaves::all_written`].
#[inline]
pub fn split_entry_run<F, M, C>(
    mem: &M,
    at: &mut VisitCtx<'_, F>,
    child: SplitChild,
    on_leaves: C,
) -> Result<EntrySplit, SplitEntryError>
where
    F: PteFormat,
    M: TableMapping + TableLinks + ?Sized,
    C: FnOnce(&SplitLeaves<F>),
{
    split_entry_run_with(mem, at, child, false, on_leaves)
}

/// [`split_entry_run`], a fresh child filled with non-temporal stores when `stream` (see
/// [`MmuConfig::stream_split_bytes`](crate::spt::mmu::MmuConfig::stream_split_bytes)),
/// fenced before the parent entry publishes it.
pub(crate) fn split_entry_run_with<F, M, C>(
    mem: &M,
    at: &mut VisitCtx<'_, F>,
    child: SplitChild,
    stream: bool,
    on_leaves: C,
) -> Result<EntrySplit, SplitEntryError>
where
    F: PteFormat,
    M: TableMapping + TableLinks + ?Sized,
    C: FnOnce(&SplitLeaves<F>),
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
    // `table_ref` only maps 4 KiB aligned tables; the handles below rely on it.
    if table.get() % PAGE_SIZE != 0 {
        return Err(SplitEntryError::BadChild);
    }
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
            // Wrapping: the value after the last child is never stored, and for a leaf
            // at the top of the address space with its high flag bits set it carries
            // out of the word. Up to child 511 the sum stays inside the huge page.
            value = value.wrapping_add(step);
        }
    } else {
        // Child i is child 0 plus i pages of the child size (KVM
        // `make_huge_page_split_spte`).
        if stream {
            stream_progression(entries, first, step);
            // Nobody can reach the fresh child yet; the fence makes the streamed entries
            // visible before the parent entry below does.
            stream_fence();
        } else {
            store_progression(entries, first, step);
        }
    }
    // The release store (or exchange) publishes the filled table.
    if !at.set(F::table_entry(table)) {
        return Err(SplitEntryError::NotHuge);
    }
    mem.link(table, below);
    on_leaves(&SplitLeaves {
        table,
        base: at.raw_addr(),
        shift,
        first,
        step,
        written,
        _format: core::marker::PhantomData,
    });
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
            match split_entry_run(tables.memory(), ctx, SplitChild::Fresh(table), |_| {}) {
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
