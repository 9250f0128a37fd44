//! Table memory: where page tables live, who owns them, and the only raw-pointer code of
//! `spt`.
//!
//! The walker reaches a table through its physical address; the embedder says how. Three
//! traits split what KVM arm64's `kvm_pgtable_mm_ops` does in one:
//!
//! - [`TableAlloc`] (safe): allocate a table for a level, free it. This is what an MMU
//!   memory cache implements and tops up outside the MMU lock (KVM `kvm_mmu_memory_cache`).
//! - [`TableMapping`] (`unsafe`): the physical address of a table → its 512 entries
//!   (`phys_to_virt`, aarch64-paging's `Translation`, the x86_64 crate's
//!   `PageTableFrameMapping`). Memory safety rests on this one method.
//! - [`TableLinks`] (safe): the ownership hook. A table may be linked from several parent
//!   entries (a shadow page is shared by every parent with the same gfn and role, KVM's
//!   `parent_ptes`); operations that install a table say so with [`TableLinks::link`], and
//!   operations that unlink one ask [`TableLinks::unlink`] whether it is now free or still
//!   linked elsewhere, instead of freeing it unconditionally. The default is a tree.
//!
//! [`TableMemory`] is all three. [`WithAlloc`] pairs a mapping with another allocator (a
//! cache), so an operation can take its tables from the cache.
//!
//! [`TableArena`] implements all three over 4 KiB aligned [`TableFrame`]s the caller
//! provides, with one out-of-band [`TableSlot`] per frame that holds the free-list link,
//! the link count and a per-table header of the embedder's type reachable in O(1) from the
//! table's address (KVM `page_private(virt_to_page(sptep))`, Asterinas
//! `PageTablePageMeta`). Nothing the arena relies on is stored inside a table, so no value
//! that safe code can write into an entry can mislead it.
//!
//! Every access to table memory is atomic: hardware walkers and other CPUs read entries
//! while they change, and a table freed after a TLB flush may still be read by a stale
//! walker until then. Under `cfg(loom)` the atomics are loom's.
#![allow(unsafe_code)]

/// Writes the progression `first + i * step` into the `len` words from `start` with one
/// 16-byte store instruction `$store` per two words (`"movdqa"`: through the cache;
/// `"movntdq"`: non-temporal), 16 words per loop trip, in address order. Expands to an
/// `asm!` block, so the caller writes it in an `unsafe` block whose `// SAFETY:` shows
/// that `[start, start + len)` is valid for writes, `start` is 16-byte aligned and `len`
/// a non-zero multiple of 16 (the loop stops exactly at the end). Each aligned 8-byte half
/// of such a store is written in one access on every x86_64 processor, so the block is
/// two relaxed atomic stores per instruction. It reads only its register inputs, touches
/// no stack and clobbers the flags (`add`, `cmp`), which `asm!` assumes by default.
#[cfg(all(target_arch = "x86_64", target_feature = "sse2", not(loom), not(miri)))]
macro_rules! progression_asm {
    ($store:literal, $start:expr, $len:expr, $first:expr, $step:expr) => {{
        let start: *mut u64 = $start;
        let end = start.wrapping_add($len);
        let (first, step): (u64, u64) = ($first, $step);
        core::arch::asm!(
            // v0 = [word 0, word 1], v1 = [word 2, word 3], inc = 4 * step in both
            // halves: two independent chains of adds, stores in address order.
            "movq {v0}, {a}",
            "movq {v1}, {b}",
            "punpcklqdq {v0}, {v1}",
            "movq {inc}, {d}",
            "punpcklqdq {inc}, {inc}",
            "movdqa {v1}, {v0}",
            "paddq {v1}, {inc}",
            "paddq {inc}, {inc}",
            "2:",
            concat!($store, " xmmword ptr [{p}], {v0}"),
            concat!($store, " xmmword ptr [{p} + 16], {v1}"),
            "paddq {v0}, {inc}",
            "paddq {v1}, {inc}",
            concat!($store, " xmmword ptr [{p} + 32], {v0}"),
            concat!($store, " xmmword ptr [{p} + 48], {v1}"),
            "paddq {v0}, {inc}",
            "paddq {v1}, {inc}",
            concat!($store, " xmmword ptr [{p} + 64], {v0}"),
            concat!($store, " xmmword ptr [{p} + 80], {v1}"),
            "paddq {v0}, {inc}",
            "paddq {v1}, {inc}",
            concat!($store, " xmmword ptr [{p} + 96], {v0}"),
            concat!($store, " xmmword ptr [{p} + 112], {v1}"),
            "paddq {v0}, {inc}",
            "paddq {v1}, {inc}",
            "add {p}, 128",
            "cmp {p}, {end}",
            "jne 2b",
            a = in(reg) first,
            b = in(reg) first.wrapping_add(step),
            d = in(reg) step.wrapping_mul(2),
            p = inout(reg) start => _,
            end = in(reg) end,
            v0 = out(xmm_reg) _,
            v1 = out(xmm_reg) _,
            inc = out(xmm_reg) _,
            options(nostack),
        );
    }};
}

mod arena;
mod stream;

pub use arena::{ArenaError, LockedArena, TableArena, TableSlot};
#[cfg(feature = "alloc")]
pub(crate) use stream::stream_heads;
pub(crate) use stream::{stream_fence, stream_progression};

use core::fmt;
use core::marker::PhantomData;
use core::ptr::NonNull;

use static_assertions::const_assert_eq;

use crate::addr::{Hpa, Level, PAGE_SIZE};
use crate::sync::{AtomicU64, Ordering};

/// Entries per table.
pub const ENTRIES: usize = 512;

/// One page table: 512 entries, each read and written atomically.
pub type Table = [AtomicU64; ENTRIES];

/// A 4 KiB, 4 KiB-aligned frame that can hold a [`Table`]: the unit of a [`TableArena`].
#[repr(C, align(4096))]
pub struct TableFrame(pub Table);

// Under loom the atomics are bigger tracked objects; the layout holds for the real ones.
#[cfg(not(loom))]
static_assertions::assert_eq_size!(TableFrame, [u8; 4096]);
#[cfg(not(loom))]
static_assertions::assert_eq_size!(Table, [u64; ENTRIES]);
const_assert_eq!(core::mem::align_of::<TableFrame>(), PAGE_SIZE as usize);

impl TableFrame {
    /// A zeroed frame.
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        Self([const { AtomicU64::new(0) }; ENTRIES])
    }

    /// A zeroed frame.
    #[cfg(loom)]
    pub fn new() -> Self {
        Self(core::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl Default for TableFrame {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for TableFrame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TableFrame")
    }
}

/// Why a table could not be freed. Nothing changes on error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FreeError {
    /// The address is not a table of this memory.
    NotATable,
    /// The table is not allocated (a double free, or a frame never handed out).
    NotAllocated,
    /// A parent entry still links the table (its link count is not zero).
    StillLinked,
    /// The allocator has no room to take the table back (a full cache); the caller still
    /// owns it.
    Full,
}

impl fmt::Display for FreeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NotATable => "address is not a table of this memory",
            Self::NotAllocated => "table is not allocated (double free?)",
            Self::StillLinked => "table is still linked from a parent entry",
            Self::Full => "no room to take the table back",
        })
    }
}

impl core::error::Error for FreeError {}

/// Where page tables come from (KVM `mm_ops->zalloc_page` / `put_page`,
/// `kvm_mmu_memory_cache`). Safe to implement: memory safety never depends on which
/// addresses it hands out, only on [`TableMapping`].
pub trait TableAlloc {
    /// Allocates a zeroed table that will sit at `level` (1 holds 4 KiB leaves), or `None`
    /// when out of memory.
    fn alloc_table(&mut self, level: Level) -> Option<Hpa>;

    /// Allocates a table whose 512 entries the caller overwrites before anyone can reach it
    /// (a split fills all of them), so they need not be zeroed. The default zeroes anyway.
    fn alloc_table_to_fill(&mut self, level: Level) -> Option<Hpa> {
        self.alloc_table(level)
    }

    /// Takes back a table `alloc_table` returned. The crate calls it only for tables no
    /// entry links any more and, where hardware may have cached them, only after the TLB
    /// flush. An implementation should refuse what it did not hand out.
    fn free_table(&mut self, table: Hpa) -> Result<(), FreeError>;
}

/// How the walker reaches a table from its physical address (KVM arm64
/// `mm_ops->phys_to_virt`, aarch64-paging `Translation`).
///
/// # Safety
/// When [`table_ptr`](Self::table_ptr) returns `Some(p)`, `p` must point to 4096 bytes,
/// aligned to 4096, that are valid for atomic reads and writes as a [`Table`] for as long
/// as `self` is alive, whether or not the address is currently allocated as a table, and
/// that nothing accesses other than atomically while `self` is alive. That memory must not
/// be part of `self` itself (it lies behind a pointer or reference `self` holds), so that
/// borrowing `self` mutably to allocate does not invalidate references into other tables.
///
/// The walker follows addresses it reads from entries, which a buggy visitor or a guest
/// owning the memory could have corrupted: `table_ptr` must answer `None` for any address
/// whose memory it cannot vouch for. Nothing else is needed for memory safety.
pub unsafe trait TableMapping {
    /// Where the table at `table` is, or `None` if this memory does not hold that address.
    fn table_ptr(&self, table: Hpa) -> Option<NonNull<Table>>;
}

/// Whether a table is still linked after one parent entry stopped pointing to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Unlinked {
    /// No entry links it any more: it (and what only it links) may be freed after the
    /// TLB flush.
    Free,
    /// Another parent entry still links it: keep it and its contents.
    StillLinked,
}

/// The ownership hook: how many parent entries link each table (KVM's `parent_ptes` of a
/// shadow page), and at which level each table serves. The defaults describe a tree, where
/// every table has exactly one parent, and know no levels.
///
/// Operations call [`link`](Self::link) when they install a table entry and
/// [`unlink`](Self::unlink) when they clear one; a visitor or an embedder that links a
/// table from a second parent (a shadow page shared by two parents) calls `link` itself.
/// The walker asks [`is_table_at`](Self::is_table_at) before it descends into a table, so
/// a memory that keeps levels (as [`TableArena`] does) turns an entry pointing at a table
/// of the wrong level — its own table, an ancestor, a freed frame: a cycle written by a
/// visitor or by a guest that owns the memory — into [`WalkError::BadTable`] instead of a
/// walk that revisits the same tables exponentially often.
///
/// [`WalkError::BadTable`]: crate::spt::WalkError::BadTable
pub trait TableLinks {
    /// A parent entry at level `level + 1` now points to `table`, which serves at `level`.
    fn link(&self, table: Hpa, level: Level) {
        let _ = (table, level);
    }

    /// A parent entry no longer points to `table`: is it free now?
    fn unlink(&self, table: Hpa) -> Unlinked {
        let _ = table;
        Unlinked::Free
    }

    /// How many parent entries point to `table` (1 in a tree).
    fn links(&self, table: Hpa) -> u32 {
        let _ = table;
        1
    }

    /// Whether `table` is a live table serving at `level` (`true` when unknown).
    fn is_table_at(&self, table: Hpa, level: Level) -> bool {
        let _ = (table, level);
        true
    }
}

/// Table memory as the walker and the operations use it: allocation, mapping and the
/// ownership hook. Implemented for every type that has the three.
pub trait TableMemory: TableAlloc + TableMapping + TableLinks {}

impl<T: TableAlloc + TableMapping + TableLinks + ?Sized> TableMemory for T {}

/// A [`TableMapping`] (with its [`TableLinks`]) paired with a different [`TableAlloc`]: an
/// operation on `mapping`'s tables that takes new tables from `alloc` (an MMU memory cache
/// topped up outside the lock) and gives freed ones back to it.
pub struct WithAlloc<'a, M: ?Sized, A: ?Sized> {
    /// The tables and their link counts.
    pub mapping: &'a M,
    /// Where new tables come from.
    pub alloc: &'a mut A,
}

impl<M: ?Sized, A: ?Sized> fmt::Debug for WithAlloc<'_, M, A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WithAlloc").finish_non_exhaustive()
    }
}

impl<M: ?Sized, A: TableAlloc + ?Sized> TableAlloc for WithAlloc<'_, M, A> {
    #[inline]
    fn alloc_table(&mut self, level: Level) -> Option<Hpa> {
        self.alloc.alloc_table(level)
    }

    #[inline]
    fn alloc_table_to_fill(&mut self, level: Level) -> Option<Hpa> {
        self.alloc.alloc_table_to_fill(level)
    }

    #[inline]
    fn free_table(&mut self, table: Hpa) -> Result<(), FreeError> {
        self.alloc.free_table(table)
    }
}

// SAFETY: `table_ptr` is `mapping`'s, which upholds the contract; the memory it points to
// is outside `*mapping` and so outside this struct, which holds only references.
unsafe impl<M: TableMapping + ?Sized, A: ?Sized> TableMapping for WithAlloc<'_, M, A> {
    #[inline]
    fn table_ptr(&self, table: Hpa) -> Option<NonNull<Table>> {
        self.mapping.table_ptr(table)
    }
}

impl<M: TableLinks + ?Sized, A: ?Sized> TableLinks for WithAlloc<'_, M, A> {
    #[inline]
    fn link(&self, table: Hpa, level: Level) {
        self.mapping.link(table, level);
    }

    #[inline]
    fn unlink(&self, table: Hpa) -> Unlinked {
        self.mapping.unlink(table)
    }

    #[inline]
    fn links(&self, table: Hpa) -> u32 {
        self.mapping.links(table)
    }

    #[inline]
    fn is_table_at(&self, table: Hpa, level: Level) -> bool {
        self.mapping.is_table_at(table, level)
    }
}

/// The table at `table` in `mem`, for as long as `mem` is borrowed.
#[inline]
pub(crate) fn table_ref<M: TableMapping + ?Sized>(mem: &M, table: Hpa) -> Option<&Table> {
    let ptr = mem.table_ptr(table)?;
    // SAFETY: by the `TableMapping` contract `ptr` is aligned and valid for atomic access
    // for as long as `mem` is alive and lies outside `*mem`; the returned reference lives no
    // longer than the borrow of `mem`. All access to it is atomic, so sharing is fine.
    Some(unsafe { ptr.as_ref() })
}

/// Stores `first + i * step` (wrapping) into `entries[i]` for every `i`, each entry as by
/// one relaxed atomic store: the fill of a fresh split child (KVM
/// `make_huge_page_split_spte` for all 512 children), whose entries form an arithmetic
/// progression.
///
/// On x86_64 the entries are written two per aligned 16-byte SSE2 store (`movdqa`), which
/// halves the instructions of the fill (a store and a vector add per two entries, against a
/// store and an add per entry): 17 % of a 2 MiB split. Every x86_64 processor writes each
/// aligned 8-byte half of such a store in one access (those with AVX the whole 16 bytes;
/// Intel SDM vol. 3A, "Guaranteed Atomic Operations"; AMD APM vol. 1 on 16-byte accesses),
/// so no reader, hardware walker or other thread, ever sees a torn entry, and the store
/// is two relaxed atomic stores. It is written in `asm!` because an intrinsic store
/// (`_mm_store_si128`) would be a non-atomic write to memory shared as atomics. An
/// unaligned first entry and an odd last one take a plain atomic store. Elsewhere (other
/// architectures, and x86_64 targets built without SSE2 such as the `x86_64-unknown-none`
/// kernel target, where the kernel does not save vector registers), under Miri and under
/// loom, one atomic store per entry.
#[inline]
pub(crate) fn store_progression(entries: &[AtomicU64], first: u64, step: u64) {
    #[cfg(all(target_arch = "x86_64", target_feature = "sse2", not(loom), not(miri)))]
    store_progression_sse2(entries, first, step);
    #[cfg(not(all(target_arch = "x86_64", target_feature = "sse2", not(loom), not(miri))))]
    store_progression_atomic(entries, first, step);
}

/// [`store_progression`] one relaxed atomic store per entry, 32 entries per loop trip (the
/// loop's own count and branch are then a tenth of an instruction per entry).
#[inline]
fn store_progression_atomic(entries: &[AtomicU64], first: u64, step: u64) {
    let mut value = first;
    let mut chunks = entries.chunks_exact(32);
    for chunk in &mut chunks {
        for entry in chunk {
            entry.store(value, Ordering::Relaxed);
            // Wrapping: the value after the last entry is never stored, and for a leaf at
            // the top of the address space with its high flag bits set it carries out of
            // the word.
            value = value.wrapping_add(step);
        }
    }
    for entry in chunks.remainder() {
        entry.store(value, Ordering::Relaxed);
        value = value.wrapping_add(step);
    }
}

/// [`store_progression`] with aligned 16-byte stores: see there. Sixteen entries (eight
/// stores) per loop trip; the entries before the first 16-byte boundary and after the last
/// whole group of sixteen take atomic stores.
#[cfg(all(target_arch = "x86_64", target_feature = "sse2", not(loom), not(miri)))]
#[inline]
fn store_progression_sse2(entries: &[AtomicU64], first: u64, step: u64) {
    const GROUP: usize = 16;
    let at = |i: usize| first.wrapping_add(step.wrapping_mul(i as u64));
    // An `AtomicU64` is 8-byte aligned: at most one entry before a 16-byte boundary.
    let skip = usize::from(entries.as_ptr() as usize % 16 != 0).min(entries.len());
    let (head, rest) = entries.split_at(skip);
    let groups = rest.len() / GROUP;
    let (body, tail) = rest.split_at(groups * GROUP);
    store_progression_atomic(head, first, step);
    if groups > 0 {
        let start = body.as_ptr().cast::<u64>().cast_mut();
        // SAFETY: `[start, start + body.len())` is `body`, whole `AtomicU64`s (the layout
        // of `u64`) borrowed from `entries` and valid for writes through the shared
        // reference (atomics are interior mutable); `start` is 16-byte aligned (`rest`
        // starts on a 16-byte boundary), as `movdqa` requires, and `body` is a non-zero
        // multiple of 16 entries. Each `movdqa` is two relaxed atomic stores (see
        // `progression_asm`).
        unsafe { progression_asm!("movdqa", start, body.len(), at(skip), step) };
    }
    store_progression_atomic(tail, at(entries.len() - tail.len()), step);
}

/// The table memory of one walk, as visitors see it: allocate, free and read tables, and
/// keep link counts, but never replace or drop the memory itself while the walker holds
/// references into it.
pub struct Tables<'m, M: TableMemory + ?Sized> {
    mem: NonNull<M>,
    writable: bool,
    _borrow: PhantomData<&'m mut M>,
}

impl<'m, M: TableMemory + ?Sized> Tables<'m, M> {
    /// Tables that can be allocated and freed.
    #[inline]
    pub(crate) fn new(mem: &'m mut M) -> Self {
        Self {
            mem: NonNull::from(mem),
            writable: true,
            _borrow: PhantomData,
        }
    }

    /// Tables that can only be read (for `translate` and counting walks): `alloc` answers
    /// `None`, `free` refuses and link counts do not change.
    #[inline]
    pub(crate) fn read_only(mem: &'m M) -> Self {
        Self {
            mem: NonNull::from(mem),
            writable: false,
            _borrow: PhantomData,
        }
    }

    /// The memory, for reading.
    #[inline]
    pub fn memory(&self) -> &M {
        // SAFETY: `mem` comes from a reference that lives for 'm; `Tables` never hands out
        // a `&mut M` that could outlive this shared borrow.
        unsafe { self.mem.as_ref() }
    }

    /// The memory, for allocating and freeing; `None` when read-only.
    #[inline]
    fn memory_mut(&mut self) -> Option<&mut M> {
        if !self.writable {
            return None;
        }
        // SAFETY: `writable` is set only by `new`, which took `&'m mut M`, and `&mut self`
        // makes this the only reference derived from it right now; the references `table`
        // handed out point outside `*M` (the `TableMapping` contract), so they stay valid.
        Some(unsafe { self.mem.as_mut() })
    }

    /// Allocates a zeroed table for `level`; `None` when the memory is exhausted (or
    /// read-only).
    #[inline]
    pub fn alloc(&mut self, level: Level) -> Option<Hpa> {
        self.memory_mut()?.alloc_table(level)
    }

    /// Allocates a table for `level` that the caller fills entirely before it installs it
    /// (its entries may hold anything until then).
    #[inline]
    pub fn alloc_to_fill(&mut self, level: Level) -> Option<Hpa> {
        self.memory_mut()?.alloc_table_to_fill(level)
    }

    /// Gives a table back. Only for tables no entry links and no TLB may hold; the memory
    /// refuses a table it did not hand out or that is still linked.
    #[inline]
    pub fn free(&mut self, table: Hpa) -> Result<(), FreeError> {
        match self.memory_mut() {
            Some(mem) => mem.free_table(table),
            None => Err(FreeError::NotAllocated),
        }
    }

    /// The table at `table` if the memory holds it and (where it keeps levels) it serves at
    /// `level`: what the walker descends into.
    #[inline]
    pub fn table_at(&self, table: Hpa, level: Level) -> Option<&'m Table> {
        if !self.memory().is_table_at(table, level) {
            return None;
        }
        self.table(table)
    }

    /// The table at `table`, or `None` if the memory does not hold that address.
    #[inline]
    pub fn table(&self, table: Hpa) -> Option<&'m Table> {
        let ptr = self.memory().table_ptr(table)?;
        // SAFETY: by the `TableMapping` contract `ptr` is aligned and valid for atomic
        // access for as long as the memory is alive, and is not inside `*M`. The memory is
        // borrowed for 'm, and `Tables` never lets anyone move or drop it, so it outlives
        // the returned reference. All access to it is atomic, so sharing is fine.
        Some(unsafe { ptr.as_ref() })
    }

    /// Records that an entry now links `table`, serving at `level` (see [`TableLinks`]).
    #[inline]
    pub fn link(&self, table: Hpa, level: Level) {
        if self.writable {
            self.memory().link(table, level);
        }
    }

    /// Records that an entry stopped linking `table`; whether it is free now.
    #[inline]
    pub fn unlink(&self, table: Hpa) -> Unlinked {
        if self.writable {
            self.memory().unlink(table)
        } else {
            Unlinked::StillLinked
        }
    }

    /// How many entries link `table`.
    #[inline]
    pub fn links(&self, table: Hpa) -> u32 {
        self.memory().links(table)
    }
}

impl<M: TableMemory + ?Sized> fmt::Debug for Tables<'_, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tables")
            .field("writable", &self.writable)
            .finish_non_exhaustive()
    }
}
