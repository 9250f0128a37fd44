//! Page tables: entry formats, table memory, one composable walker, and the operations
//! built on it (map, unmap, protect, translate, split, collapse).
//!
//! # The idea
//! Every piece of page-table code a hypervisor has (the shadow MMU, the eager huge-page
//! splitter of Matlack's "Extend Eager Page Splitting to the shadow MMU" (2022), dirty
//! logging, an embedder's own EPT or a unikernel's paging)
//! stands on one walker that is generic over the entry format, the model being arm64
//! KVM's `kvm_pgtable_walk` (`arch/arm64/kvm/hyp/pgtable.c`):
//!
//! - [`PteFormat`] says what the bits of an entry mean: x86-64 4-level ([`X86_64`]) and
//!   5-level ([`X86_64La57`]) paging and Intel EPT ([`Ept`]), each with its bitflags type
//!   and a software *mmu-writable* bit (KVM `shadow_mmu_writable_mask`).
//! - [`TableMemory`] is three traits: [`TableAlloc`] (safe: where tables come from, what
//!   an MMU memory cache implements), [`TableMapping`] (`unsafe`: physical address →
//!   entries) and [`TableLinks`] (the ownership hook: how many parent entries link a
//!   table, for shadow pages shared by several parents). [`TableArena`] implements them
//!   over frames the caller provides, with an out-of-band [`TableSlot`] per frame that
//!   also carries a per-table header (KVM's `page_private`). The raw-pointer code is in
//!   one small module, `memory`.
//! - The walker ([`PageTable::walk`]) visits leaves, and tables before and after their
//!   subtree ([`WalkFlags`]), hands the [`Visitor`] a [`VisitCtx`], and reads an entry
//!   again after visiting it, so a visitor that installs a table gets it walked. It starts
//!   at any table ([`Subtree`]), and every entry has an [`EntryRef`] (table + index, 8
//!   bytes): what an rmap stores, and what [`EntryRef::ctx`] turns back into a
//!   [`VisitCtx`] to act on the entry later without a walk.
//! - [`split_entry`] splits one huge leaf into a child the caller provides (fresh from a
//!   cache, or an existing one to reuse) and reports each new leaf's handle (KVM
//!   `shadow_mmu_split_huge_page`), or with [`split_entry_run`] the whole run of new leaves
//!   at once; [`PageTable::split`] does a range with it.
//! - Each operation is a visitor on that walker: [`PageTable::map`] (largest page size
//!   alignment allows, or a forced one; KVM `kvm_tdp_mmu_map`, x86_64 `Mapper::map_to`),
//!   [`PageTable::unmap`] (KVM `kvm_tdp_mmu_zap_leafs`), [`PageTable::protect`],
//!   [`PageTable::translate`], [`PageTable::split`] (KVM `tdp_mmu_split_huge_page`) and
//!   [`PageTable::collapse`] (KVM `kvm_mmu_recover_huge_pages`' effect, done in place).
//! - Operations that remove or restrict translations (`unmap`, `protect`, `collapse`)
//!   return a `#[must_use]` [`PendingFlush`]: a bounded, deduplicated [`FlushGather`] of
//!   ranges with their page sizes for the embedder's [`TlbFlush`], and the tables they
//!   unlinked, freed only after the flush.
//!
//! Addresses are typed by the format: input addresses are [`PteFormat::In`] (a
//! [`Va`](crate::Va) for x86 paging, a [`Gpa`](crate::Gpa) for EPT), output addresses
//! [`PteFormat::Out`] ([`Hpa`]: host-physical, or the physical memory of whoever runs the
//! code when a guest builds its own tables). Table addresses are [`Hpa`]s, the numbers the
//! [`TableMapping`] knows tables by. A page table has a maximum leaf level
//! ([`PageTable::with_max_leaf`], KVM's `max_huge_page_level`).
//!
//! # Example
//! ```
//! use hvmem::spt::{FlushRange, MapSize, PageTable, SplitTo, TableArena, TableFrame};
//! use hvmem::spt::{TableSlot, TlbFlush, WalkFlags, X86_64, X86Flags};
//! use hvmem::{Hpa, Level, Va};
//!
//! /// The embedder's INVLPG / INVEPT.
//! struct Tlb(u64);
//! impl TlbFlush for Tlb {
//!     fn flush_range(&mut self, range: FlushRange) { self.0 += range.pages(); }
//!     fn flush_all(&mut self) { self.0 += 1; }
//! }
//!
//! // 16 table frames, physically at 1 GiB (a Vec here; guest RAM or a static pool works
//! // too), and their out-of-band slots.
//! let frames: Vec<TableFrame> = (0..16).map(|_| TableFrame::new()).collect();
//! let mut slots: Vec<TableSlot> = (0..16).map(|_| TableSlot::default()).collect();
//! let mut mem = TableArena::new(&frames, &mut slots, Hpa::new(1 << 30)?)?;
//! let mut pt = PageTable::<X86_64>::new(&mut mem)?;
//! let excl = WalkFlags::empty(); // the MMU lock held for write
//!
//! // Identity-map 4 MiB with 2 MiB pages, then split the first one into 4 KiB pages.
//! let rw = X86Flags::PRESENT | X86Flags::WRITABLE;
//! pt.map(&mut mem, Va::new(0)?, Hpa::new(0)?, 4 << 20, rw, MapSize::Largest, excl)?;
//! pt.split(&mut mem, Va::new(0)?, 2 << 20, SplitTo::Level(Level::L1), excl)?;
//! let t = pt.translate(&mem, Va::new(0x1234)?)?;
//! assert_eq!((t.pa.get(), t.level), (0x1234, Level::L1));
//!
//! // Unmap a page: flush the TLB, then the tables it emptied are freed.
//! let mut tlb = Tlb(0);
//! pt.unmap(&mut mem, Va::new(0x1000)?, 4096)?.flush(&mut tlb, &mut mem)?;
//! assert!(pt.translate(&mem, Va::new(0x1000)?).is_err());
//! // Map it back and collapse: one 2 MiB leaf again, its 4 KiB table freed after a flush.
//! pt.map(&mut mem, Va::new(0x1000)?, Hpa::new(0x1000)?, 4096, rw, MapSize::Largest, excl)?;
//! let pending = pt.collapse(&mut mem, Va::new(0)?, 4 << 20, Level::L2)?;
//! assert_eq!(pending.tables_to_free(), 1);
//! pending.flush(&mut tlb, &mut mem)?;
//! assert_eq!(mem.allocated(), pt.table_count(&mem)?);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Concurrency
//! Entries are atomics with release stores and acquire loads, because hardware walks the
//! tables and sets accessed/dirty bits concurrently. [`PageTable::walk`],
//! [`PageTable::map`], [`PageTable::protect`] and [`PageTable::split`] take a
//! [`WalkFlags`]: without [`WalkFlags::SHARED`] the caller holds the MMU lock for write and
//! updates are plain stores; with it the caller holds the lock for read, every update is a
//! compare-exchange against the value the visitor saw, a lost race re-evaluates the entry,
//! and a table allocated for a lost race is freed at once (it was never visible).
//! Operations that unlink tables (`unmap`, `collapse`, `destroy`) take `&mut PageTable`
//! and free those tables only after the TLB flush.

mod error;
mod flush;
pub mod format;
mod memory;
#[cfg(feature = "alloc")]
pub mod mmu;
mod ops;
mod walk;

#[cfg(test)]
mod tests;

use core::fmt;
use core::marker::PhantomData;

pub use error::{
    CollapseError, MapError, NewError, ProtectError, SplitEntryError, SplitError, TranslateError,
    UnmapError,
};
pub use flush::{
    DEFER_TABLES, FLUSH_ALL_PAGES, FlushGather, FlushRange, GATHER_RANGES, PendingFlush, TlbFlush,
};
pub use format::{ADDR_MASK, Ept, EptFlags, PteFormat, X86_64, X86_64La57, X86Flags};
#[cfg(any(test, fuzzing, feature = "testing"))]
pub(crate) use memory::table_ref;
pub use memory::{
    ArenaError, ENTRIES, FreeError, LockedArena, Table, TableAlloc, TableArena, TableFrame,
    TableLinks, TableMapping, TableMemory, TableSlot, Tables, Unlinked, WithAlloc,
};
#[cfg(feature = "alloc")]
pub(crate) use memory::{stream_fence, stream_heads};
#[cfg(feature = "alloc")]
pub(crate) use ops::split_entry_run_with;
pub use ops::{
    EntrySplit, MapSize, SplitChild, SplitDone, SplitLeaves, SplitTo, Translation, split_entry,
    split_entry_run,
};
// The rmap-driven splitter (behind `alloc`) names gfns in the walker's address type.
#[cfg(feature = "alloc")]
pub(crate) use walk::in_addr;
pub use walk::{
    Action, EntryError, EntryRef, Subtree, VisitCtx, VisitKind, Visitor, WalkError, WalkFlags,
};

use crate::addr::{Hpa, Level, PAGE_SIZE, Pfn};

/// The `Hpa` of a raw value known to fit in 52 bits (masked to be sure).
#[inline]
pub(crate) fn hpa(raw: u64) -> Hpa {
    let raw = raw & ((1 << crate::addr::PHYS_ADDR_BITS) - 1);
    Pfn::from_raw(raw >> crate::addr::PAGE_SHIFT)
        .addr()
        .checked_add(raw & (PAGE_SIZE - 1))
        .unwrap_or(Pfn::ZERO.addr())
}

/// One tree of page tables in format `F`, known by its root table (KVM `struct
/// kvm_pgtable`, x86_64 `MappedPageTable`), with the largest leaf it may hold. It owns no
/// memory itself: every operation is given the [`TableMemory`] its tables live in.
/// Dropping it leaks its tables; give them back with [`destroy`](Self::destroy).
pub struct PageTable<F: PteFormat> {
    root: Hpa,
    max_leaf: Level,
    _format: PhantomData<fn() -> F>,
}

impl<F: PteFormat> fmt::Debug for PageTable<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PageTable")
            .field("format", &F::NAME)
            .field("root", &self.root)
            .field("max_leaf", &self.max_leaf.get())
            .finish()
    }
}

impl<F: PteFormat> PageTable<F> {
    /// An empty page table: one zeroed root table from `mem`.
    pub fn new<M: TableMemory + ?Sized>(mem: &mut M) -> Result<Self, NewError> {
        let root = mem
            .alloc_table(F::ROOT_LEVEL)
            .ok_or(NewError::OutOfTables)?;
        Ok(Self::from_root(root))
    }

    /// The page table whose root table is at `root` (for tables built earlier, or shared
    /// with another user). Memory safety does not depend on `root`: a walk only reaches
    /// memory the [`TableMapping`] vouches for.
    pub const fn from_root(root: Hpa) -> Self {
        Self {
            root,
            max_leaf: F::LARGEST_LEAF,
            _format: PhantomData,
        }
    }

    /// The same page table, with leaves no larger than `level` (KVM's
    /// `max_huge_page_level`: a host without 1 GiB pages passes level 2). `map` never
    /// installs, and `collapse` never makes, a leaf above it. Level 1 allows 4 KiB leaves
    /// only; a level above the format's largest leaf is lowered to it.
    pub const fn with_max_leaf(mut self, level: Level) -> Self {
        self.max_leaf = if level.get() < F::LARGEST_LEAF.get() {
            level
        } else {
            F::LARGEST_LEAF
        };
        self
    }

    /// The largest level a leaf may sit at.
    pub const fn max_leaf(&self) -> Level {
        self.max_leaf
    }

    /// The physical address of the root table: what goes into CR3 or the EPT pointer.
    pub const fn root(&self) -> Hpa {
        self.root
    }

    /// The level of the root table.
    pub const fn root_level(&self) -> Level {
        F::ROOT_LEVEL
    }

    /// The whole tree as a [`Subtree`] (root table, root level, address 0).
    pub const fn subtree(&self) -> Subtree {
        Subtree::root::<F>(self.root)
    }

    /// Walks the entries that intersect `[start, start + len)` (KVM `kvm_pgtable_walk`).
    /// With [`WalkFlags::SHARED`] in `flags`, [`VisitCtx::set`] is a compare-exchange, so
    /// several walkers can change the tree at once under a read lock; `mem` is then this
    /// walker's own handle to the table memory (a per-CPU cache, say) and must reach every
    /// table of the tree.
    pub fn walk<M, V>(
        &self,
        mem: &mut M,
        start: F::In,
        len: u64,
        flags: WalkFlags,
        visitor: &mut V,
    ) -> Result<(), WalkError<V::Error>>
    where
        M: TableMemory + ?Sized,
        V: Visitor<F, M>,
    {
        self.subtree().walk(mem, start, len, flags, visitor)
    }

    /// The number of tables in the tree, the root included (a table linked twice counts
    /// twice).
    pub fn table_count<M: TableMemory + ?Sized>(
        &self,
        mem: &M,
    ) -> Result<usize, WalkError<core::convert::Infallible>> {
        let mut count = 1usize;
        let mut visitor = |_: VisitKind, _: &mut VisitCtx<'_, F>, _: &mut Tables<'_, M>| {
            count += 1;
            Ok(Action::Continue)
        };
        self.walk_read(
            mem,
            0,
            1 << F::INPUT_BITS,
            WalkFlags::TABLE_PRE,
            &mut visitor,
        )?;
        Ok(count)
    }

    /// Frees every table of the tree, the root last (KVM `kvm_pgtable_stage2_destroy`).
    /// A table another parent still links is unlinked from this tree and kept whole. Only
    /// for a page table no hardware walks any more and whose translations no TLB holds.
    /// On `BadTable` (an entry pointing outside table memory, or at a table of the wrong
    /// level such as an ancestor) the tables reachable so far are freed and the rest leak.
    pub fn destroy<M: TableMemory + ?Sized>(self, mem: &mut M) -> Result<(), Hpa> {
        let mut visitor =
            |kind: VisitKind, ctx: &mut VisitCtx<'_, F>, tables: &mut Tables<'_, M>| {
                let child = F::table_addr(ctx.old());
                if kind == VisitKind::TablePre {
                    if tables.links(child) <= 1 {
                        return Ok(Action::Continue);
                    }
                    let _ = ctx.set(0);
                    let _ = tables.unlink(child);
                    return Ok(Action::SkipSubtree);
                }
                // Exclusive walk: the store always succeeds.
                let _ = ctx.set(0);
                if tables.unlink(child) == Unlinked::Free {
                    let _ = tables.free(child);
                }
                Ok::<_, core::convert::Infallible>(Action::Continue)
            };
        let flags = WalkFlags::TABLE_PRE | WalkFlags::TABLE_POST;
        let result = self.walk_raw(mem, 0, 1 << F::INPUT_BITS, flags, &mut visitor);
        match result {
            Ok(()) => {
                let _ = mem.free_table(self.root);
                Ok(())
            }
            Err(WalkError::BadTable(pa)) => Err(pa),
            Err(_) => Err(self.root),
        }
    }
}
