//! MMU memory caches: objects taken ahead of time, outside the MMU lock, so that code under
//! the lock never has to allocate (Linux `struct kvm_mmu_memory_cache`).
//!
//! # The idea
//!
//! Code that runs under the MMU lock (a fault, an eager huge-page split) needs new objects
//! — page tables, shadow-page headers, reverse-map descriptors — but must not sleep, and an
//! embedder's allocator may have to (reclaim, a hypercall, a lock of its own). KVM's answer
//! is a small per-vCPU stack of objects filled *before* the lock is taken
//! (`kvm_mmu_topup_memory_cache(mc, min)`), popped under it (`kvm_mmu_memory_cache_alloc`)
//! and emptied back into the allocator when the vCPU goes away
//! (`kvm_mmu_free_memory_cache`). Here:
//!
//! | KVM | hvmem |
//! |---|---|
//! | `struct kvm_mmu_memory_cache` | [`MemoryCache<T, CAP>`] |
//! | `kvm_mmu_topup_memory_cache(mc, min)` | [`MemoryCache::top_up`] |
//! | `kvm_mmu_memory_cache_alloc(mc)` | [`MemoryCache::alloc`] |
//! | `kvm_mmu_free_memory_cache(mc)` | [`MemoryCache::drain_into`] |
//! | `kvm_mmu_memory_cache_nr_free_objects` | [`MemoryCache::len`] |
//! | `mmu_shadow_page_cache` (tables) | [`TableCache<CAP>`] |
//!
//! Objects come from an [`ObjectSource`], the embedder's fallible allocator (shadow-page
//! headers and `PteListDesc`s will come from one); tables come from any
//! [`TableAlloc`], usually the [`TableArena`](crate::spt::TableArena).
//!
//! # Why top-up is outside the lock
//!
//! The caller tops up with no lock held, then takes the MMU lock and pops. Under the lock
//! nothing can fail for lack of memory as long as it takes no more than it reserved; when it
//! needs more (the splitter between huge pages), it drops the lock, tops up, retakes the lock
//! and restarts from where it was. Each vCPU (or splitter) has its own cache, so popping
//! needs no lock of its own; only the source may be shared, and it is locked only during
//! top-up. `tests/loom_cache.rs` models this protocol.
//!
//! # Capacities per cache
//!
//! `CAP` is a const generic over `arrayvec` storage, so each cache has its own capacity and
//! no heap (Matlack, "KVM: Allow for different capacities in kvm_mmu_memory_cache structs",
//! in "[00/23] Extend Eager Page Splitting to the shadow MMU", 2022-02-03): the fault path
//! needs a handful of objects, the eager splitter reserves, **per huge page**, 513
//! `PteListDesc`s (one rmap descriptor for each of the 512 new leaves in the worst case,
//! plus one for the parent entry of the child), 1 shadow-page header and 1 table. A
//! `MemoryCache<PteListDesc, 513>` and a `MemoryCache<ShadowPage, 4>` are both fine.
//!
//! # Why `alloc` answers `Option`
//!
//! KVM's `kvm_mmu_memory_cache_alloc` cannot fail: after a successful top-up an empty cache
//! is a bug, so KVM `WARN_ON`s, tries a `GFP_ATOMIC` allocation and `BUG_ON`s if that
//! fails. We may not panic, so
//! [`alloc`](MemoryCache::alloc) answers `Option<T>` and the guarantee is made checkable
//! instead: a successful `top_up(src, min)` returns a [`Reserved`] count, and
//! `cache.len() >= min` holds until the caller takes objects; code under the lock compares
//! [`len`](MemoryCache::len) with what it is about to need *before* it changes anything
//! (the splitter checks its three caches before each huge page), so a `None` is never
//! reached mid-operation. A borrowing token that hands out exactly `min` objects would
//! encode the same thing in types, but it would hold `&mut cache` for the whole critical
//! section, and the table cache must be lent as `&mut` to
//! [`PageTable::split`](crate::spt::PageTable::split) through
//! [`WithAlloc`](crate::spt::WithAlloc), whose own interface ([`TableAlloc`]) is `Option`
//! anyway; the ranged split turns `None` into `resume_at`, not an error. So `Option` plus a
//! checked count is the one shape that works for both.
//!
//! # Levels
//!
//! [`TableCache`] is level-agnostic: it takes tables with `alloc_table_to_fill(Level::L1)`
//! and hands any of them out for any level. That is sound for the arena because it records
//! a table's level again when the table is linked (`TableLinks::link(table, level)`), which
//! every operation does before a walker can descend into it.

use core::fmt;

use arrayvec::ArrayVec;

use crate::addr::{Hpa, Level};
use crate::spt::{DEFER_TABLES, FreeError, TableAlloc};

#[cfg(test)]
mod tests;

/// The embedder's fallible allocator of cache objects (KVM fills its caches with
/// `kmem_cache_zalloc` or `__get_free_page`; shadow-page headers and `PteListDesc`s will
/// come from an implementation of this).
pub trait ObjectSource<T> {
    /// Why an object could not be allocated.
    type Error;

    /// A new object, or why there is none.
    fn alloc(&mut self) -> Result<T, Self::Error>;

    /// Takes back an object `alloc` returned.
    fn free(&mut self, obj: T);
}

/// Why a top-up did not reach its minimum. Objects taken before the failure stay in the
/// cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TopUpError<E> {
    /// `min` is larger than the cache's capacity: no top-up can reach it. Nothing was taken.
    OverCapacity {
        /// The minimum asked for.
        min: usize,
        /// The cache's capacity.
        capacity: usize,
    },
    /// The source failed before `min` objects were present.
    Source {
        /// The source's error.
        error: E,
        /// Objects in the cache now (fewer than the minimum, all kept).
        have: usize,
    },
}

impl<E: fmt::Display> fmt::Display for TopUpError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::OverCapacity { min, capacity } => {
                write!(f, "top-up minimum {min} exceeds cache capacity {capacity}")
            }
            Self::Source { error, have } => {
                write!(
                    f,
                    "object source failed with {have} objects cached: {error}"
                )
            }
        }
    }
}

impl<E: fmt::Debug + fmt::Display> core::error::Error for TopUpError<E> {}

/// What a successful top-up guarantees: at least `min` objects are in the cache, so the
/// next `min` calls to [`MemoryCache::alloc`] answer `Some` if nothing else takes objects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Reserved {
    /// The minimum asked for.
    pub min: usize,
    /// Objects in the cache (at least `min`).
    pub have: usize,
}

/// A per-user stack of up to `CAP` objects, filled outside the MMU lock and popped under it
/// (Linux `struct kvm_mmu_memory_cache`). No heap: the storage is an `ArrayVec`.
pub struct MemoryCache<T, const CAP: usize> {
    objects: ArrayVec<T, CAP>,
}

impl<T, const CAP: usize> MemoryCache<T, CAP> {
    /// An empty cache.
    pub const fn new() -> Self {
        Self {
            objects: ArrayVec::new_const(),
        }
    }

    /// Fills the cache up to `CAP` from `src` (KVM `kvm_mmu_topup_memory_cache(mc, min)`,
    /// which also fills to capacity so the next top-ups are free). Succeeds when at least
    /// `min` objects are present at the end: a source that fails after `min` is fine. On
    /// failure every object already taken stays in the cache. `min > CAP` is refused before
    /// anything is taken. Call it with no MMU lock held.
    pub fn top_up<S: ObjectSource<T> + ?Sized>(
        &mut self,
        src: &mut S,
        min: usize,
    ) -> Result<Reserved, TopUpError<S::Error>> {
        if min > CAP {
            return Err(TopUpError::OverCapacity { min, capacity: CAP });
        }
        while !self.objects.is_full() {
            match src.alloc() {
                // The loop runs only while there is room, so the push succeeds; were it
                // refused, the object goes straight back to the source.
                Ok(obj) => {
                    if let Err(e) = self.objects.try_push(obj) {
                        src.free(e.element());
                        break;
                    }
                }
                Err(error) if self.objects.len() < min => {
                    return Err(TopUpError::Source {
                        error,
                        have: self.objects.len(),
                    });
                }
                Err(_) => break,
            }
        }
        Ok(Reserved {
            min,
            have: self.objects.len(),
        })
    }

    /// Takes an object (KVM `kvm_mmu_memory_cache_alloc`); `None` only when the cache is
    /// empty, which a caller that checked [`len`](Self::len) against its needs never sees.
    #[inline]
    pub fn alloc(&mut self) -> Option<T> {
        self.objects.pop()
    }

    /// Orders the cached objects so that [`alloc`](Self::alloc) hands them out in
    /// ascending order (it pops from the end). Out of line: a top-up that took nothing
    /// (every slow fault's, most of the time) does not sort, and should not carry the code.
    #[inline(never)]
    fn order_ascending(&mut self)
    where
        T: Ord,
    {
        self.objects.sort_unstable_by(|a, b| b.cmp(a));
    }

    /// Whether the cache holds `obj` (a linear scan of at most `CAP` objects).
    pub fn contains(&self, obj: &T) -> bool
    where
        T: PartialEq,
    {
        self.objects.contains(obj)
    }

    /// Puts an unused object back if there is room; gives it back when the cache is full.
    #[inline]
    pub fn put(&mut self, obj: T) -> Result<(), T> {
        self.objects.try_push(obj).map_err(|e| e.element())
    }

    /// Puts an unused object back if there is room, else returns it to `src`.
    pub fn free<S: ObjectSource<T> + ?Sized>(&mut self, obj: T, src: &mut S) {
        if let Err(obj) = self.put(obj) {
            src.free(obj);
        }
    }

    /// Returns every cached object to `src` (KVM `kvm_mmu_free_memory_cache`).
    pub fn drain_into<S: ObjectSource<T> + ?Sized>(&mut self, src: &mut S) {
        while let Some(obj) = self.objects.pop() {
            src.free(obj);
        }
    }

    /// Objects in the cache (KVM `kvm_mmu_memory_cache_nr_free_objects`).
    #[inline]
    pub fn len(&self) -> usize {
        self.objects.len()
    }

    /// Whether the cache is empty.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }

    /// The most objects the cache holds: `CAP`.
    #[inline]
    pub const fn capacity(&self) -> usize {
        CAP
    }
}

impl<T, const CAP: usize> Default for MemoryCache<T, CAP> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T, const CAP: usize> fmt::Debug for MemoryCache<T, CAP> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryCache")
            .field("len", &self.objects.len())
            .field("capacity", &CAP)
            .finish()
    }
}

/// The table allocator ran dry during a top-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OutOfTables;

impl fmt::Display for OutOfTables {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("no table memory left")
    }
}

impl core::error::Error for OutOfTables {}

/// Any [`TableAlloc`] as an [`ObjectSource`] of tables whose entries the taker overwrites
/// (`alloc_table_to_fill`). A table the allocator refuses to take back is dropped from the
/// cache's view; [`TableCache::drain_into`] reports such refusals instead.
struct Tables<'a, A: ?Sized>(&'a mut A);

impl<A: TableAlloc + ?Sized> ObjectSource<Hpa> for Tables<'_, A> {
    type Error = OutOfTables;

    fn alloc(&mut self) -> Result<Hpa, OutOfTables> {
        self.0.alloc_table_to_fill(Level::L1).ok_or(OutOfTables)
    }

    fn free(&mut self, table: Hpa) {
        let _ = self.0.free_table(table);
    }
}

/// An MMU memory cache of page tables (KVM `mmu_shadow_page_cache`): a
/// [`MemoryCache<Hpa, CAP>`] topped up from any [`TableAlloc`], itself a [`TableAlloc`], so an
/// operation takes its tables from it through
/// [`WithAlloc { mapping: &arena, alloc: &mut cache }`](crate::spt::WithAlloc).
///
/// The tables come from `alloc_table_to_fill`: their entries are unspecified. The cache has
/// no mapping to zero them with, so [`alloc_table`](TableAlloc::alloc_table) (a zeroed
/// table) answers `None` and only [`alloc_table_to_fill`](TableAlloc::alloc_table_to_fill)
/// pops: the cache serves operations that overwrite every entry (`split`, `split_entry`),
/// while `map` through it reports it is out of tables.
///
/// **Ownership.** Every table the cache holds is allocated in the source (the arena counts
/// it in `allocated()`) and owned by the cache: nothing links it. A table freed into the
/// cache ([`free_table`](TableAlloc::free_table), e.g. by a `PendingFlush` or a split that
/// lost a race) is kept for reuse if there is room; otherwise it waits in an overflow of up
/// to [`DEFER_TABLES`] tables (one pending flush's worth) until
/// [`release_overflow`](Self::release_overflow) or [`drain_into`](Self::drain_into) gives it
/// back to the arena. Both must be given the allocator the tables came from.
pub struct TableCache<const CAP: usize> {
    tables: MemoryCache<Hpa, CAP>,
    overflow: ArrayVec<Hpa, DEFER_TABLES>,
}

impl<const CAP: usize> TableCache<CAP> {
    /// An empty cache.
    pub const fn new() -> Self {
        Self {
            tables: MemoryCache::new(),
            overflow: ArrayVec::new_const(),
        }
    }

    /// Fills the cache up to `CAP` tables from `src` and succeeds when at least `min` are
    /// present ([`MemoryCache::top_up`]). Call it with no MMU lock held. Tables waiting in
    /// the overflow are taken first (they are this cache's already).
    #[inline]
    pub fn top_up<A: TableAlloc + ?Sized>(
        &mut self,
        src: &mut A,
        min: usize,
    ) -> Result<Reserved, TopUpError<OutOfTables>> {
        if min > CAP {
            return Err(TopUpError::OverCapacity { min, capacity: CAP });
        }
        while let Some(table) = self.overflow.pop() {
            if let Err(table) = self.tables.put(table) {
                // Full: keep it where it was (cannot fail, it was just popped).
                let _ = self.overflow.try_push(table);
                break;
            }
        }
        let before = self.tables.len();
        let reserved = self.tables.top_up(&mut Tables(src), min);
        // Hand the tables out lowest address first. A free list gives them back in the
        // reverse of the order they were freed, so a zap followed by a split fills table
        // after table at falling addresses; hardware prefetchers follow rising streams,
        // and a split writes 4 KiB into each table at once (`benches/split.rs`: an 8 GiB
        // split 2.6-4.2x slower with the tables in falling order). 40 tables sort in
        // well under a microsecond, once per 40 splits.
        if self.tables.len() != before {
            self.tables.order_ascending();
        }
        reserved
    }

    /// Gives the tables of the overflow back to `src`; the first refusal is returned after
    /// every table was offered (a refused table is dropped: the allocator says it is not
    /// its own).
    pub fn release_overflow<A: TableAlloc + ?Sized>(
        &mut self,
        src: &mut A,
    ) -> Result<(), FreeError> {
        let mut result = Ok(());
        for table in self.overflow.drain(..) {
            if let Err(e) = src.free_table(table) {
                result = result.and(Err(e));
            }
        }
        result
    }

    /// Gives every table back to `src` (KVM `kvm_mmu_free_memory_cache`): the cached ones and
    /// the overflow. The first refusal is returned after every table was offered.
    pub fn drain_into<A: TableAlloc + ?Sized>(&mut self, src: &mut A) -> Result<(), FreeError> {
        let mut result = self.release_overflow(src);
        while let Some(table) = self.tables.alloc() {
            if let Err(e) = src.free_table(table) {
                result = result.and(Err(e));
            }
        }
        result
    }

    /// Tables ready to hand out.
    #[inline]
    pub fn len(&self) -> usize {
        self.tables.len()
    }

    /// Whether no table is ready to hand out.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }

    /// Tables waiting to go back to the allocator.
    #[inline]
    pub fn overflow(&self) -> usize {
        self.overflow.len()
    }

    /// The most tables the cache hands out without a top-up: `CAP`.
    #[inline]
    pub const fn capacity(&self) -> usize {
        CAP
    }
}

impl<const CAP: usize> Default for TableCache<CAP> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const CAP: usize> fmt::Debug for TableCache<CAP> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TableCache")
            .field("len", &self.tables.len())
            .field("capacity", &CAP)
            .field("overflow", &self.overflow.len())
            .finish()
    }
}

impl<const CAP: usize> TableAlloc for TableCache<CAP> {
    /// `None`: the cache's tables are not zeroed and it cannot zero them (see the type).
    fn alloc_table(&mut self, _level: Level) -> Option<Hpa> {
        None
    }

    /// Pops a table; any level (the arena records the level again at `link`).
    fn alloc_table_to_fill(&mut self, _level: Level) -> Option<Hpa> {
        self.tables.alloc()
    }

    /// Keeps the table for reuse, or in the overflow when the cache is full. Refused with
    /// [`FreeError::Full`] only when the overflow is full too (the caller still owns
    /// the table then): call [`release_overflow`](Self::release_overflow) first. A table
    /// the cache already holds is refused with [`FreeError::NotAllocated`] (a double free,
    /// which would hand the same table out twice), as the arena refuses it.
    fn free_table(&mut self, table: Hpa) -> Result<(), FreeError> {
        if self.tables.contains(&table) || self.overflow.contains(&table) {
            return Err(FreeError::NotAllocated);
        }
        match self.tables.put(table) {
            Ok(()) => Ok(()),
            Err(table) => self.overflow.try_push(table).map_err(|_| FreeError::Full),
        }
    }
}
