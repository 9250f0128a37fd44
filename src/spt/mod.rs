//! Page tables: entry formats, table memory, one composable walker, and the operations
//! built on it (map, unmap, protect, translate, split, collapse).
//!
//! # The idea
//! Every piece of page-table code a hypervisor has (the shadow MMU, the eager huge-page
//! splitter of seed 004, dirty logging, an embedder's own EPT or a unikernel's paging)
//! stands on one walker that is generic over the entry format, the model being arm64
//! KVM's `kvm_pgtable_walk` (`arch/arm64/kvm/hyp/pgtable.c`):
//!
//! - [`PteFormat`] says what the bits of an entry mean: x86-64 4-level ([`X86_64`]) and
//!   5-level ([`X86_64La57`]) paging and Intel EPT ([`Ept`]), each with its bitflags type
//!   and a software *mmu-writable* bit (KVM `shadow_mmu_writable_mask`).
//! - [`TableMemory`] says where tables come from and how their physical addresses are
//!   reached (KVM `kvm_pgtable_mm_ops`); [`TableArena`] implements it over frames the
//!   caller provides. The raw-pointer code is in one small module, `memory`.
//! - The walker ([`PageTable::walk`]) visits leaves, and tables before and after their
//!   subtree ([`WalkFlags`]), hands the [`Visitor`] a [`VisitCtx`], and reads an entry
//!   again after visiting it, so a visitor that installs a table gets it walked.
//! - Each operation is a visitor on that walker: [`PageTable::map`] (largest page size
//!   alignment allows, or a forced one; KVM `kvm_tdp_mmu_map`, x86_64 `Mapper::map_to`),
//!   [`PageTable::unmap`] (KVM `kvm_tdp_mmu_zap_leafs`), [`PageTable::protect`],
//!   [`PageTable::translate`], [`PageTable::split`] (KVM `tdp_mmu_split_huge_page`) and
//!   [`PageTable::collapse`] (KVM `kvm_mmu_recover_huge_pages`' effect, done in place).
//! - Operations that remove or restrict translations return a `#[must_use]`
//!   [`PendingFlush`]: a bounded [`FlushGather`] for the embedder's [`TlbFlush`], and the
//!   tables they unlinked, freed only after the flush.
//!
//! Input addresses are [`Va`]s (a virtual address for x86 paging, a guest-physical one for
//! EPT); output and table addresses are [`Hpa`]s (host-physical, or the physical memory of
//! whoever runs the code when a guest builds its own tables).
//!
//! # Concurrency
//! Exclusive operations take `&mut PageTable` (the MMU lock held for write). Entries are
//! still atomics with release stores and acquire loads, because hardware walks the tables
//! and sets accessed/dirty bits concurrently. [`PageTable::walk_shared`],
//! [`PageTable::map_shared`], [`PageTable::split_shared`] and [`PageTable::protect_shared`]
//! take `&PageTable` (the lock held for read): every update is a compare-exchange against
//! the value the visitor saw, a lost race re-evaluates the entry, and a table allocated for
//! a lost race is freed at once (it was never visible). Operations that unlink tables
//! (`unmap`, `collapse`) are exclusive only, and free those tables after the TLB flush.

mod error;
mod flush;
pub mod format;
mod memory;
mod ops;
mod walk;

#[cfg(test)]
mod tests;

use core::fmt;
use core::marker::PhantomData;

pub use error::{
    CollapseError, MapError, NewError, ProtectError, SplitError, TranslateError, UnmapError,
};
pub use flush::{CountingFlush, FlushGather, GATHER_RANGES, PendingFlush, TlbFlush};
pub use format::{ADDR_MASK, Ept, EptFlags, PteFormat, X86_64, X86_64La57, X86Flags};
pub use memory::{ArenaError, ENTRIES, Table, TableArena, TableFrame, TableMemory, Tables};
pub use ops::{MapSize, SplitTo, Translation};
pub use walk::{Action, VisitCtx, VisitKind, Visitor, WalkError, WalkFlags};

use crate::addr::{AddrError, Hpa, Level, PAGE_SIZE, Pfn};

/// An input address of a page table: a virtual address for x86-64 paging, a guest-physical
/// address for EPT (KVM walks by `gva`/`gpa`; arm64 by `addr`). At most 57 bits wide; each
/// format checks its own width when an operation runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Va(u64);

impl Va {
    /// The widest input address any format takes: 57 bits (5-level paging).
    pub const BITS: u32 = 57;

    /// An input address, if it is below `1 << 57`.
    pub const fn new(addr: u64) -> Result<Self, AddrError> {
        if addr >> Self::BITS == 0 {
            Ok(Self(addr))
        } else {
            Err(AddrError::OutOfRange)
        }
    }

    /// The raw address.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// This address plus `bytes`, if it stays below `1 << 57`.
    pub const fn checked_add(self, bytes: u64) -> Option<Self> {
        match self.0.checked_add(bytes) {
            Some(a) if a >> Self::BITS == 0 => Some(Self(a)),
            _ => None,
        }
    }
}

impl fmt::Display for Va {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

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
/// kvm_pgtable`, x86_64 `MappedPageTable`). It owns no memory itself: every operation is
/// given the [`TableMemory`] its tables live in. Dropping it leaks its tables; give them
/// back with [`destroy`](Self::destroy).
pub struct PageTable<F: PteFormat> {
    root: Hpa,
    _format: PhantomData<fn() -> F>,
}

impl<F: PteFormat> fmt::Debug for PageTable<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PageTable")
            .field("format", &F::NAME)
            .field("root", &self.root)
            .finish()
    }
}

impl<F: PteFormat> PageTable<F> {
    /// An empty page table: one zeroed root table from `mem`.
    pub fn new<M: TableMemory + ?Sized>(mem: &mut M) -> Result<Self, NewError> {
        let root = mem.alloc_table().ok_or(NewError::OutOfTables)?;
        Ok(Self::from_root(root))
    }

    /// The page table whose root table is at `root` (for tables built earlier, or shared
    /// with another user). Memory safety does not depend on `root`: a walk only reaches
    /// memory the [`TableMemory`] vouches for.
    pub const fn from_root(root: Hpa) -> Self {
        Self {
            root,
            _format: PhantomData,
        }
    }

    /// The physical address of the root table: what goes into CR3 or the EPT pointer.
    pub const fn root(&self) -> Hpa {
        self.root
    }

    /// Walks the entries that intersect `[start, start + len)` with exclusive access
    /// (KVM `kvm_pgtable_walk`).
    pub fn walk<M, V>(
        &mut self,
        mem: &mut M,
        start: Va,
        len: u64,
        flags: WalkFlags,
        visitor: &mut V,
    ) -> Result<(), WalkError<V::Error>>
    where
        M: TableMemory + ?Sized,
        V: Visitor<F, M>,
    {
        let end = start.get().checked_add(len).ok_or(WalkError::OutOfRange)?;
        walk::walk::<F, M, V>(
            self.root,
            &mut Tables::new(mem),
            start.get(),
            end,
            flags,
            visitor,
            false,
        )
    }

    /// Walks like [`walk`](Self::walk), in shared mode: [`VisitCtx::set`] is a
    /// compare-exchange, so several walkers can change the tree at once under a read lock.
    /// `mem` is this walker's own handle to the table memory (a per-CPU cache, say); it
    /// must reach every table of the tree.
    pub fn walk_shared<M, V>(
        &self,
        mem: &mut M,
        start: Va,
        len: u64,
        flags: WalkFlags,
        visitor: &mut V,
    ) -> Result<(), WalkError<V::Error>>
    where
        M: TableMemory + ?Sized,
        V: Visitor<F, M>,
    {
        let end = start.get().checked_add(len).ok_or(WalkError::OutOfRange)?;
        walk::walk::<F, M, V>(
            self.root,
            &mut Tables::new(mem),
            start.get(),
            end,
            flags,
            visitor,
            true,
        )
    }

    /// Walks read-only (visitors cannot allocate or free).
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
        V: Visitor<F, M>,
    {
        walk::walk::<F, M, V>(
            self.root,
            &mut Tables::read_only(mem),
            start,
            end,
            flags,
            visitor,
            false,
        )
    }

    /// The number of tables in the tree, the root included.
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
    /// Only for a page table no hardware walks any more and whose translations no TLB
    /// holds. On `BadTable` the tables reachable so far are freed and the rest leak.
    pub fn destroy<M: TableMemory + ?Sized>(self, mem: &mut M) -> Result<(), Hpa> {
        let mut visitor =
            |kind: VisitKind, ctx: &mut VisitCtx<'_, F>, tables: &mut Tables<'_, M>| {
                if kind == VisitKind::TablePost {
                    let child = F::table_addr(ctx.old());
                    // Exclusive walk: the store always succeeds.
                    let _ = ctx.set(0);
                    tables.free(child);
                }
                Ok::<_, core::convert::Infallible>(Action::Continue)
            };
        let result = walk::walk::<F, M, _>(
            self.root,
            &mut Tables::new(mem),
            0,
            1 << F::INPUT_BITS,
            WalkFlags::TABLE_POST,
            &mut visitor,
            false,
        );
        match result {
            Ok(()) => {
                mem.free_table(self.root);
                Ok(())
            }
            Err(WalkError::BadTable(pa)) => Err(pa),
            Err(_) => Err(self.root),
        }
    }

    /// The level of the root table.
    pub const fn root_level(&self) -> Level {
        F::ROOT_LEVEL
    }
}
