//! A shadow MMU in direct mode: shadow pages, memory slots, the fault path and dirty
//! logging (Linux `arch/x86/kvm/mmu/mmu.c`, the shadow MMU half; the refactoring of
//! Matlack, "[00/23] Extend Eager Page Splitting to the shadow MMU", 2022-02-03, is its
//! starting point: every operation runs outside a vCPU context, a child's role is derived
//! from its parent's, and each memory cache has its own capacity).
//!
//! # What it is
//!
//! An [`Mmu`] maps guest frames (gfns, grouped into memory slots) to the embedder's host
//! frames through page tables of any [`PteFormat`] (EPT for a hardware guest, x86-64 for a
//! guest whose own CR3 points at these tables). Tables are built on demand by
//! [`Mmu::page_fault`], at the largest level the slot, the host mapping (the embedder's
//! [`HostMemory`]) and the page table allow. Each table is a *shadow page* with a header
//! ([`ShadowPage`]: gfn, [`Role`], parent entries), found by `(gfn, role)` in a hash with
//! no heap allocation on the fault path. Every present leaf entry is recorded in its slot's
//! reverse map ([`crate::rmap`]) at its level, so write-protecting a slot for dirty logging
//! touches exactly the entries that map it, without walking the tables.
//!
//! Shadowing a guest's own page tables (indirect pages, unsync) is a later step; the
//! [`Role`] and [`ShadowPage`] types already carry what it needs.
//!
//! # Locking
//!
//! One [`RwLock`](crate::sync::RwLock), the MMU lock, with a second way in for the fault
//! path's fast half ([`Mmu::page_fault`]'s first step, KVM `fast_page_fault`), which restores
//! a write bit with a compare-exchange: each vCPU ([`FaultCaches`]) has a shard of its own,
//! a spin lock on its own cache line over a copy of what the fast path reads of the slots
//! (where each is, its dirty log). Holding its shard excludes writers exactly as the read
//! lock does, without writing the line every vCPU shares: every writer takes the lock and
//! then each shard in use (Linux's per-CPU reader-writer locks trade the same way: cheap
//! readers, a writer that visits every CPU's line). Everything that changes the shape of the
//! tables, the rmaps or the headers runs under the write lock. Tables come from a
//! [`LockedArena`] and rmap descriptors from a [`DescPool`], both locked on their own, so
//! a vCPU tops its [`FaultCaches`] up *before* it takes the MMU lock and the slow path pops
//! from them without failing (KVM `mmu_topup_memory_caches`).
//!
//! # Dirty logging
//!
//! [`Mmu::enable_dirty_log`] write-protects every entry of the slot through its rmaps (or,
//! with [`LogMode::initially_set`], sets every bit and write-protects nothing);
//! a write to a write-protected page faults, the fault marks the page dirty and restores
//! the write bit — on the fast path when the entry is at or below the logging unit, on the
//! slow path otherwise, where a write-protected huge page is dropped and one 4 KiB page
//! mapped in its place (the lazy behaviour, KVM's `eager_page_split = N`).
//! [`get_and_clear_dirty_log`](Mmu::get_and_clear_dirty_log),
//! [`get_dirty_log`](Mmu::get_dirty_log) + [`clear_dirty_log`](Mmu::clear_dirty_log)
//! (64-page masks, KVM's alignment rules) and
//! [`disable_dirty_log`](Mmu::disable_dirty_log) (huge pages recovered in place where all
//! 512 pieces are there, zapped to be refaulted huge otherwise) complete it.
//!
//! ```
//! use hvmem::spt::mmu::{FaultCaches, HostMemory, HostPage, LogMode, Mmu, MmuConfig, SlotFlags, SlotId};
//! use hvmem::spt::{Ept, TableArena, TableFrame, TableSlot, TlbFlush, FlushRange};
//! use hvmem::{Gfn, Gpa, Level, Pfn};
//!
//! /// Guest frame n is host frame 0x10_0000 + n, mapped by the host with 2 MiB pages.
//! struct Host;
//! impl HostMemory for Host {
//!     fn host_page(&self, _slot: SlotId, gfn: Gfn) -> Option<HostPage> {
//!         Some(HostPage { pfn: Pfn::new(0x10_0000 + gfn.get()).ok()?, level: Level::L2, writable: true })
//!     }
//! }
//! struct NoTlb;
//! impl TlbFlush for NoTlb {
//!     fn flush_range(&mut self, _: FlushRange) {}
//!     fn flush_all(&mut self) {}
//! }
//!
//! let frames: Vec<TableFrame> = (0..64).map(|_| TableFrame::new()).collect();
//! let mut slots: Vec<TableSlot> = (0..64).map(|_| TableSlot::default()).collect();
//! let arena = TableArena::new(&frames, &mut slots, hvmem::Hpa::new(0x4000_0000).unwrap()).unwrap();
//! let mmu = Mmu::<Ept>::new(arena, MmuConfig::default()).unwrap();
//! mmu.add_slot(SlotId(0), Gfn::new(0).unwrap(), 4096, SlotFlags::empty()).unwrap();
//!
//! let mut caches = FaultCaches::new();
//! let (host, mut tlb) = (Host, NoTlb);
//! mmu.page_fault(&mut caches, &host, Gpa::new(0x20_3000).unwrap(), true, &mut tlb).unwrap();
//! assert_eq!(mmu.translate(Gpa::new(0x20_3000).unwrap()).unwrap().level, Level::L2);
//!
//! // Dirty logging: the 2 MiB page is write-protected; a write maps one 4 KiB page.
//! mmu.enable_dirty_log(SlotId(0), LogMode::PAGES, &mut tlb).unwrap();
//! mmu.page_fault(&mut caches, &host, Gpa::new(0x20_5000).unwrap(), true, &mut tlb).unwrap();
//! let mut log = vec![0u64; 64];
//! mmu.get_and_clear_dirty_log(SlotId(0), &mut log, &mut tlb).unwrap();
//! assert_eq!(log[(0x205 / 64) as usize], 1 << (0x205 % 64));
//! mmu.check().unwrap();
//! ```

extern crate alloc;

mod caches;
mod check;
mod dirty;
mod fault;
mod page;
mod role;
mod slot;
mod zap;

#[cfg(test)]
mod tests;

use alloc::vec::Vec;
use core::fmt;

use arrayvec::ArrayVec;
use core::marker::PhantomData;

pub(crate) use caches::TopUpFailed;
pub use caches::{ForeignCaches, MmuCaches};
pub use fault::{FAULT_DESCS, FAULT_TABLES, Fault, FaultCaches, FaultError, HostMemory, HostPage};
pub use page::ShadowPage;
pub use role::{Access, Role};
pub use slot::{LogMode, SlotFlags, SlotId};
pub(crate) use zap::Zapper;
pub use zap::{InvariantError, MmuCounts, Recovered};

use self::page::Pages;
use self::slot::FastView;
pub(crate) use self::slot::MemSlot;
use crate::addr::{Gfn, Gpa, Hpa, Level, PAGE_SHIFT};
use crate::cache::MemoryCache;
use crate::rmap::{DescId, DescPool, DescStore, RmapHead};
use crate::spt::memory::Table;
use crate::spt::{LockedArena, PteFormat, TableAlloc, TableArena, TlbFlush};
use crate::sync::{AtomicU64, Ordering, ShardedRwLock, ShardedWriteGuard};

/// KVM `KVM_MIN_FREE_MMU_PAGES`: below this many free shadow pages, a fault first zaps the
/// oldest pages.
pub const MIN_FREE_PAGES: usize = 5;
/// KVM `KVM_REFILL_PAGES`: how many free pages zapping the oldest aims for.
pub const REFILL_PAGES: usize = 25;

/// Descriptors recycled under the MMU lock (freed by a removal, reused by the next add)
/// before they go back to the pool.
const SPARE_DESCS: usize = 64;

/// Ranges gathered for one TLB flush.
const GATHER: usize = crate::spt::GATHER_RANGES;

/// Identities handed to MMUs; 0 means "no MMU yet" in a [`FaultCaches`]. A plain `core`
/// atomic even under loom: it is not part of any protocol being modelled.
static NEXT_MMU_ID: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(1);

/// Most address spaces (roots) an [`Mmu`] has.
pub const MAX_ADDRESS_SPACES: usize = 4;

/// How an [`Mmu`] is built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmuConfig {
    /// Most shadow pages alive at once, the root included (KVM `n_max_mmu_pages`); `None`:
    /// as many as the arena has tables.
    pub page_limit: Option<usize>,
    /// Hash buckets for the `(gfn, role)` lookup (rounded up to a power of two; KVM 4096).
    pub hash_buckets: usize,
    /// Rmap descriptors (14 entries each) the MMU can use at once.
    pub descriptors: usize,
    /// The largest leaf the MMU maps (KVM `max_huge_page_level`); capped at the format's.
    pub max_leaf: Level,
    /// Memory slots at most.
    pub max_slots: usize,
    /// Bits every leaf carries besides present and writable (e.g. EPT's execute bits, or
    /// x86's user bit), in the format's size-independent form.
    pub leaf_bits: u64,
    /// Address spaces, each with its own root (KVM has two on x86: normal and SMM), 1 to
    /// [`MAX_ADDRESS_SPACES`]. Every address space maps the same slots; shadow pages of
    /// different address spaces differ in [`Role::as_id`] and are never shared, so a gfn
    /// mapped in several address spaces has one entry per space in its rmap (aliases).
    pub address_spaces: u8,
    /// Split huge pages eagerly when dirty logging starts, and, under
    /// [`LogMode::initially_set`], when bits are cleared (KVM's `eager_page_split`
    /// module parameter). Off: a write to a write-protected huge page drops it and maps
    /// one 4 KiB page in the fault path (the lazy baseline).
    pub eager_split: bool,
    /// An eager split whose request writes at least this many bytes (16 per 4 KiB page
    /// of the range: the leaf and its rmap head) fills its fresh tables and their heads
    /// with non-temporal stores, which write a line without first reading it into the
    /// cache. Where the lines are not in the cache, that saves a memory read per line
    /// (1.3–1.9× faster splits measured); where they are (table frames zeroed or freed
    /// just before), each must be written back and dropped first, and streaming is up to
    /// five times slower. The default, 32 MiB, streams splits of 8 GiB and more, where
    /// the frames cannot all be cached and streaming won in every measurement; an embedder
    /// whose table frames come cold may set it lower (`BENCHMARKS.md`, "Streaming the big
    /// splits"). `u64::MAX`: never. Architectures without such stores (and Miri and loom)
    /// write normally either way.
    pub stream_split_bytes: u64,
}

impl Default for MmuConfig {
    fn default() -> Self {
        Self {
            page_limit: None,
            hash_buckets: 4096,
            descriptors: 1 << 16,
            max_leaf: Level::L3,
            max_slots: 64,
            leaf_bits: 0,
            address_spaces: 1,
            eager_split: false,
            stream_split_bytes: 32 << 20,
        }
    }
}

/// Why an [`Mmu`] could not be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum MmuError {
    /// No table for the root.
    NoRoot,
    /// Allocating the headers, hash or descriptors failed.
    OutOfMemory,
    /// The page limit is below the tables one fault needs (the format's root level).
    LimitTooSmall,
    /// Zero address spaces, or more than [`MAX_ADDRESS_SPACES`].
    BadAddressSpaces,
}

impl fmt::Display for MmuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NoRoot => "no table for the root",
            Self::OutOfMemory => "allocation of MMU metadata failed",
            Self::LimitTooSmall => "page limit below the depth of one translation",
            Self::BadAddressSpaces => "address spaces must be 1 to MAX_ADDRESS_SPACES",
        })
    }
}

impl core::error::Error for MmuError {}

/// Why a slot or dirty-log operation was refused; nothing changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SlotError {
    /// No slot with this id.
    NotFound,
    /// A slot with this id exists.
    Exists,
    /// The range overlaps another slot.
    Overlap,
    /// Zero pages, or a range past the format's input addresses.
    BadRange,
    /// `max_slots` slots exist.
    TooMany,
    /// Allocating the slot's metadata failed.
    OutOfMemory,
    /// Dirty logging is already on / not on for this slot.
    Logging,
    /// A flag that cannot change after creation (`READONLY`).
    FlagChange,
    /// A bitmap too short, or a clear not starting at a multiple of 64 units, or reaching
    /// past the slot.
    BadBitmap,
    /// The page limit is below the tables one fault needs.
    LimitTooSmall,
    /// A logging granularity other than 4 KiB or 2 MiB.
    BadMode,
    /// A flag bit [`SlotFlags`] does not define (KVM `check_memory_region_flags`: -EINVAL).
    BadFlags,
}

impl fmt::Display for SlotError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NotFound => "no such memory slot",
            Self::Exists => "memory slot id in use",
            Self::Overlap => "memory slot overlaps another",
            Self::BadRange => "memory slot range empty or out of range",
            Self::TooMany => "too many memory slots",
            Self::OutOfMemory => "allocation of slot metadata failed",
            Self::Logging => "dirty logging not in the required state",
            Self::FlagChange => "flag cannot change after creation",
            Self::BadBitmap => "dirty bitmap range or length invalid",
            Self::LimitTooSmall => "page limit below the depth of one translation",
            Self::BadMode => "dirty logging granularity must be 4 KiB or 2 MiB",
            Self::BadFlags => "memory slot flag bits outside LOG_DIRTY_PAGES and READONLY",
        })
    }
}

impl core::error::Error for SlotError {}

/// A translation through the shadow tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Mapping {
    /// The host address of the gpa.
    pub hpa: Hpa,
    /// The level of the leaf.
    pub level: Level,
    /// Whether the leaf is writable now.
    pub writable: bool,
    /// Whether the leaf may be made writable without the MMU lock.
    pub mmu_writable: bool,
}

/// Counters of what the MMU did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MmuStats {
    /// Faults fixed by the fast path.
    pub fast_fixes: u64,
    /// Faults handled by the slow path.
    pub slow_faults: u64,
    /// Huge leaves dropped by a fault that needed a smaller page (lazy splitting).
    pub huge_dropped: u64,
    /// Shadow pages created.
    pub pages_created: u64,
    /// Shadow pages zapped.
    pub pages_zapped: u64,
    /// Entries write-protected.
    pub write_protected: u64,
    /// Rmap or parent-list updates that found the structures inconsistent (never expected).
    pub inconsistencies: u64,
    /// Huge entries the eager splitter split (when the MMU started it: enabling or clearing
    /// the dirty log).
    pub eager_splits: u64,
    /// Eager splits the MMU started that stopped early (best effort, like KVM's: the lazy
    /// path handles what is left).
    pub eager_split_failures: u64,
}

/// The state behind the MMU lock.
pub(crate) struct State {
    pub(crate) pages: Pages,
    /// Sorted by base gfn, disjoint.
    pub(crate) slots: Vec<MemSlot>,
    pub(crate) store: DescStore,
    pub(crate) spare: MemoryCache<DescId, SPARE_DESCS>,
    pub(crate) limit: usize,
    pub(crate) stats: MmuStats,
    /// Page ids of the roots, by address space.
    pub(crate) root_ids: ArrayVec<u32, MAX_ADDRESS_SPACES>,
    /// Slots created or moved so far: each new [`MemSlot`] takes the next number as its
    /// `epoch`, so a slot deleted and made again with the same id and bounds while the
    /// splitter had dropped the lock is not mistaken for the one it was splitting.
    pub(crate) slot_epochs: u64,
}

/// The MMU lock held for write (with every shard in use).
pub(crate) type StateGuard<'a> = ShardedWriteGuard<'a, State, FastView>;

/// Makes room for `n` slots in every shard's view (before the slots change, so that
/// [`publish_views`] cannot fail after they did).
pub(crate) fn reserve_views(st: &mut StateGuard<'_>, n: usize) -> Result<(), SlotError> {
    let (_, views) = st.split_views();
    for view in views {
        view.reserve(n).map_err(|_| SlotError::OutOfMemory)?;
    }
    Ok(())
}

/// Copies the slots' places and logs into every shard's view: after any change to them,
/// before the write lock is released.
pub(crate) fn publish_views(st: &mut StateGuard<'_>) {
    let (state, views) = st.split_views();
    slot::publish(&state.slots, views);
}

impl State {
    /// Index of the slot holding `gfn`.
    pub(crate) fn slot_index(&self, gfn: u64) -> Option<usize> {
        let i = self.slots.partition_point(|s| s.end() <= gfn);
        self.slots.get(i).filter(|s| s.contains(gfn)).map(|_| i)
    }

    pub(crate) fn slot_by_id(&self, id: SlotId) -> Option<usize> {
        self.slots.iter().position(|s| s.id == id)
    }
}

/// A shadow MMU over the tables of a [`LockedArena`], in direct mode (gfn → host frame).
pub struct Mmu<'a, F: PteFormat> {
    tables: LockedArena<'a>,
    descs: DescPool,
    /// The MMU lock: the state, and per-vCPU copies of the [`FastView`] the fault fast path
    /// reads holding only its own shard.
    pub(crate) state: ShardedRwLock<State, FastView>,
    /// The splitter's caches for splits the MMU starts itself (enabling or clearing the
    /// dirty log; KVM keeps these per VM too), locked before the MMU lock.
    pub(crate) split_caches: crate::sync::Mutex<crate::rmap::SplitCaches>,
    roots: ArrayVec<Hpa, MAX_ADDRESS_SPACES>,
    config: MmuConfig,
    max_leaf: Level,
    /// Gfns below this fit the format's input addresses.
    gfn_limit: u64,
    /// Unique per MMU (see [`Mmu::id`]).
    id: u64,
    _format: PhantomData<F>,
}

impl<F: PteFormat> fmt::Debug for Mmu<'_, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mmu")
            .field("format", &F::NAME)
            .field("roots", &self.roots)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<'a, F: PteFormat> Mmu<'a, F> {
    /// An MMU whose tables come from `arena` (one shadow-page header per frame), with an
    /// empty root.
    pub fn new(arena: TableArena<'a>, config: MmuConfig) -> Result<Self, MmuError> {
        let spaces = usize::from(config.address_spaces);
        if spaces == 0 || spaces > MAX_ADDRESS_SPACES {
            return Err(MmuError::BadAddressSpaces);
        }
        let limit = config.page_limit.unwrap_or(arena.capacity());
        if limit < spaces + F::ROOT_LEVEL.get() as usize - 1 {
            return Err(MmuError::LimitTooSmall);
        }
        let tables = LockedArena::new(arena);
        let mut pages = Pages::new(
            tables.capacity(),
            config.hash_buckets,
            tables.phys_base().get(),
        )
        .ok_or(MmuError::OutOfMemory)?;
        let (store, descs) =
            DescStore::new(config.descriptors).map_err(|_| MmuError::OutOfMemory)?;
        let mut roots = ArrayVec::new();
        let mut root_ids = ArrayVec::new();
        for as_id in 0..config.address_spaces {
            let root = (&tables)
                .alloc_table(F::ROOT_LEVEL)
                .ok_or(MmuError::NoRoot)?;
            let root_id = pages.id_of(root).ok_or(MmuError::NoRoot)?;
            let role = Role::direct_root(F::ROOT_LEVEL, as_id);
            if !pages.insert(root_id, Gfn::ZERO, role, true) {
                return Err(MmuError::NoRoot);
            }
            roots.push(root);
            root_ids.push(root_id);
        }
        let max_leaf = if config.max_leaf > F::LARGEST_LEAF {
            F::LARGEST_LEAF
        } else {
            config.max_leaf
        };
        Ok(Self {
            tables,
            descs,
            // The shards (2 KiB of padded locks) are on the heap: inline they would make
            // every `Mmu` value that large.
            state: ShardedRwLock::new(
                State {
                    pages,
                    slots: Vec::new(),
                    store,
                    spare: MemoryCache::new(),
                    limit,
                    stats: MmuStats::default(),
                    root_ids,
                    slot_epochs: 0,
                },
                FastView::default,
            )
            .ok_or(MmuError::OutOfMemory)?,
            split_caches: crate::sync::Mutex::new(crate::rmap::SplitCaches::new()),
            roots,
            config,
            max_leaf,
            gfn_limit: 1u64 << (F::INPUT_BITS - PAGE_SHIFT),
            id: NEXT_MMU_ID.fetch_add(1, core::sync::atomic::Ordering::Relaxed),
            _format: PhantomData,
        })
    }

    /// The root table of address space 0 (what goes into CR3 or the EPT pointer).
    pub fn root(&self) -> Hpa {
        self.roots[0]
    }

    /// The root table of address space `as_id`, if there is one.
    pub fn root_of(&self, as_id: u8) -> Option<Hpa> {
        self.roots.get(usize::from(as_id)).copied()
    }

    /// Address spaces (roots).
    pub fn address_spaces(&self) -> u8 {
        self.roots.len() as u8
    }

    /// The table memory. Not public: a table freed behind the MMU's back (the root has
    /// no link to protect it) would corrupt the tree.
    pub(crate) fn tables(&self) -> &LockedArena<'a> {
        &self.tables
    }

    /// The descriptor pool (not public, like the tables).
    pub(crate) fn descriptors(&self) -> &DescPool {
        &self.descs
    }

    /// Tables allocated from the arena: live shadow pages plus tables held in caches.
    pub fn tables_allocated(&self) -> usize {
        self.tables.allocated()
    }

    /// Tables held by the splitter caches the MMU keeps for the splits it starts itself
    /// (enabling or clearing the log with `eager_split`).
    pub fn tables_in_split_caches(&self) -> usize {
        self.split_caches.lock().tables()
    }

    /// Gives the tables and descriptors of the MMU's own splitter caches back to the arena
    /// and the pool (they are topped up again at the next eager split).
    pub fn release_split_caches(&self) {
        // The caches are this MMU's: release cannot be refused.
        let _ = self.split_caches.lock().release(self);
    }

    /// Rmap descriptors in the pool (not in use, not in a cache).
    pub fn descriptors_free(&self) -> usize {
        self.descs.len()
    }

    /// Rmap descriptors the MMU was built with.
    pub fn descriptors_capacity(&self) -> usize {
        self.descs.capacity()
    }

    /// This MMU's identity, which [`FaultCaches`] remember so a cache is never used with
    /// the tables of another MMU.
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// A shard of the MMU lock for a new [`FaultCaches`] (one per vCPU), round robin: its
    /// fast path reads that shard's view and counts its fixes there.
    pub(crate) fn new_shard(&self) -> u8 {
        self.state.new_shard() as u8
    }

    /// The largest leaf level the MMU maps.
    pub fn max_leaf(&self) -> Level {
        self.max_leaf
    }

    /// Whether an eager split of `pages` 4 KiB pages streams its writes
    /// ([`MmuConfig::stream_split_bytes`]).
    #[inline]
    pub(crate) fn streams_split(&self, pages: u64) -> bool {
        pages.saturating_mul(16) >= self.config.stream_split_bytes
    }

    /// Counters so far.
    pub fn stats(&self) -> MmuStats {
        let mut stats = self.state.read().stats;
        // Wrapping, as each counter does.
        stats.fast_fixes = self.state.counted();
        stats
    }

    /// Live shadow pages, the root included.
    pub fn pages_used(&self) -> usize {
        self.state.read().pages.used()
    }

    /// The header of the shadow page whose table is at `table`, if it is live.
    pub fn shadow_page(&self, table: Hpa) -> Option<ShadowPage> {
        let st = self.state.read();
        let id = st.pages.live_id(table)?;
        st.pages.get(id).cloned()
    }

    /// Whether someone waits for the MMU lock (for long operations that drop it).
    pub fn is_contended(&self) -> bool {
        self.state.is_contended()
    }

    /// Adds a memory slot of `npages` frames from `base` (KVM `KVM_SET_USER_MEMORY_REGION`
    /// creating a slot). `LOG_DIRTY_PAGES` in `flags` starts 4 KiB logging at once; a bit
    /// `SlotFlags` does not define is refused ([`SlotError::BadFlags`]), as KVM refuses it.
    pub fn add_slot(
        &self,
        id: SlotId,
        base: Gfn,
        npages: u64,
        flags: SlotFlags,
    ) -> Result<(), SlotError> {
        if SlotFlags::from_bits(flags.bits()).is_none() {
            return Err(SlotError::BadFlags);
        }
        let end = base.get().checked_add(npages).ok_or(SlotError::BadRange)?;
        if npages == 0 || end > self.gfn_limit {
            return Err(SlotError::BadRange);
        }
        let mut slot =
            MemSlot::new(id, base, npages, flags, self.max_leaf).ok_or(SlotError::OutOfMemory)?;
        if flags.contains(SlotFlags::LOG_DIRTY_PAGES) {
            slot.log = Some(alloc::sync::Arc::new(
                slot::DirtyLog::new(base, npages, LogMode::PAGES).ok_or(SlotError::OutOfMemory)?,
            ));
            slot.flags |= SlotFlags::LOG_DIRTY_PAGES;
        }
        let mut st = self.state.write();
        if st.slot_by_id(id).is_some() {
            return Err(SlotError::Exists);
        }
        if st.slots.len() >= self.config.max_slots {
            return Err(SlotError::TooMany);
        }
        let at = st.slots.partition_point(|s| s.end() <= base.get());
        if st.slots.get(at).is_some_and(|s| s.base < end) {
            return Err(SlotError::Overlap);
        }
        st.slots
            .try_reserve(1)
            .map_err(|_| SlotError::OutOfMemory)?;
        let n = st.slots.len() + 1;
        reserve_views(&mut st, n)?;
        // A new slot has no entries yet: no rmap to fill (KVM zaps nothing on create).
        st.slot_epochs = st.slot_epochs.wrapping_add(1);
        slot.epoch = st.slot_epochs;
        st.slots.insert(at, slot);
        publish_views(&mut st);
        Ok(())
    }

    /// Removes a slot, zapping every entry that maps it first (KVM
    /// `kvm_arch_flush_shadow_memslot`).
    pub fn delete_slot<T: TlbFlush + ?Sized>(
        &self,
        id: SlotId,
        tlb: &mut T,
    ) -> Result<(), SlotError> {
        let mut st = self.state.write();
        let i = st.slot_by_id(id).ok_or(SlotError::NotFound)?;
        let mut z = self.zapper();
        z.zap_slot_leaves(&mut st, i);
        z.finish(&mut st, tlb);
        st.slots.remove(i);
        publish_views(&mut st);
        Ok(())
    }

    /// Moves a slot to start at `new_base`, keeping its size, flags, logging mode and dirty
    /// log (KVM `kvm_prepare_memory_region` reuses the old bitmap on `KVM_MR_MOVE`: a write
    /// logged before the move is reported after it; with 2 MiB units and a move by less
    /// than a unit, every new unit that holds a page of a dirty old unit is dirty); every
    /// entry of the old range is zapped (KVM `KVM_MR_MOVE`). Refused with nothing changed
    /// when the new range overlaps another slot or its metadata cannot be allocated.
    pub fn move_slot<T: TlbFlush + ?Sized>(
        &self,
        id: SlotId,
        new_base: Gfn,
        tlb: &mut T,
    ) -> Result<(), SlotError> {
        let mut st = self.state.write();
        let i = st.slot_by_id(id).ok_or(SlotError::NotFound)?;
        let (npages, flags, old_base) = {
            let s = &st.slots[i];
            (s.npages, s.flags, s.base)
        };
        let end = new_base
            .get()
            .checked_add(npages)
            .ok_or(SlotError::BadRange)?;
        if end > self.gfn_limit {
            return Err(SlotError::BadRange);
        }
        if st
            .slots
            .iter()
            .any(|s| s.id != id && s.base < end && new_base.get() < s.end())
        {
            return Err(SlotError::Overlap);
        }
        let mut moved = MemSlot::new(id, new_base, npages, flags, self.max_leaf)
            .ok_or(SlotError::OutOfMemory)?;
        if let Some(log) = st.slots[i].log.as_ref() {
            moved.log = Some(alloc::sync::Arc::new(
                log.moved(old_base, new_base.get(), npages)
                    .ok_or(SlotError::OutOfMemory)?,
            ));
            moved.flags |= SlotFlags::LOG_DIRTY_PAGES;
        }
        let n = st.slots.len();
        reserve_views(&mut st, n)?;
        let mut z = self.zapper();
        z.zap_slot_leaves(&mut st, i);
        z.finish(&mut st, tlb);
        st.slots.remove(i);
        let at = st.slots.partition_point(|s| s.end() <= new_base.get());
        st.slot_epochs = st.slot_epochs.wrapping_add(1);
        moved.epoch = st.slot_epochs;
        st.slots.insert(at, moved);
        publish_views(&mut st);
        Ok(())
    }

    /// Changes a slot's flags: `LOG_DIRTY_PAGES` turns 4 KiB dirty logging on
    /// ([`enable_dirty_log`](Self::enable_dirty_log) with [`LogMode::PAGES`]) or off
    /// ([`disable_dirty_log`](Self::disable_dirty_log)); `READONLY` cannot change.
    pub fn update_slot_flags<H: HostMemory + ?Sized, T: TlbFlush + ?Sized>(
        &self,
        id: SlotId,
        flags: SlotFlags,
        host: &H,
        tlb: &mut T,
    ) -> Result<(), SlotError> {
        if SlotFlags::from_bits(flags.bits()).is_none() {
            return Err(SlotError::BadFlags);
        }
        let old = {
            let st = self.state.read();
            let i = st.slot_by_id(id).ok_or(SlotError::NotFound)?;
            st.slots[i].flags
        };
        if (old ^ flags).contains(SlotFlags::READONLY) {
            return Err(SlotError::FlagChange);
        }
        let on = flags.contains(SlotFlags::LOG_DIRTY_PAGES);
        match (old.contains(SlotFlags::LOG_DIRTY_PAGES), on) {
            (false, true) => self.enable_dirty_log(id, LogMode::PAGES, tlb),
            (true, false) => self.disable_dirty_log(id, host, tlb).map(|_| ()),
            _ => Ok(()),
        }
    }

    /// The slots, as `(id, base, npages, flags)`, by base.
    pub fn slots(&self) -> Vec<(SlotId, Gfn, u64, SlotFlags)> {
        let st = self.state.read();
        st.slots
            .iter()
            .filter_map(|s| Some((s.id, Gfn::new(s.base).ok()?, s.npages, s.flags)))
            .collect()
    }

    /// Sets the most shadow pages alive at once, zapping the oldest until the MMU fits
    /// (KVM `kvm_mmu_change_mmu_pages`). Returns how many pages were zapped.
    pub fn set_page_limit<T: TlbFlush + ?Sized>(
        &self,
        limit: usize,
        tlb: &mut T,
    ) -> Result<usize, SlotError> {
        if limit < self.roots.len() + F::ROOT_LEVEL.get() as usize - 1 {
            return Err(SlotError::LimitTooSmall);
        }
        let mut st = self.state.write();
        st.limit = limit;
        let mut z = self.zapper();
        let before = st.pages.used();
        while st.pages.used() > limit {
            if !z.zap_oldest(&mut st) {
                break;
            }
        }
        z.finish(&mut st, tlb);
        Ok(before - st.pages.used())
    }

    /// The page limit.
    pub fn page_limit(&self) -> usize {
        self.state.read().limit
    }

    /// Zaps every leaf mapping a gfn of `[start, end)` (a huge leaf that overlaps it is
    /// zapped whole), through the rmaps (KVM `kvm_zap_gfn_range`). Returns how many
    /// entries were zapped.
    pub fn zap_gfn_range<T: TlbFlush + ?Sized>(&self, start: Gfn, end: Gfn, tlb: &mut T) -> u64 {
        let mut st = self.state.write();
        let mut z = self.zapper();
        let mut zapped = 0;
        for i in 0..st.slots.len() {
            let (s, e) = (st.slots[i].base, st.slots[i].end());
            let lo = s.max(start.get());
            let hi = e.min(end.get());
            if lo < hi {
                zapped += z.zap_leaves_in(&mut st, i, lo, hi);
            }
        }
        z.finish(&mut st, tlb);
        zapped
    }

    /// What the shadow tables of address space 0 map `gpa` to, read under the MMU lock
    /// held for read.
    pub fn translate(&self, gpa: Gpa) -> Option<Mapping> {
        self.translate_in(0, gpa)
    }

    /// [`translate`](Self::translate) in address space `as_id` (`None` when there is no
    /// such address space).
    pub fn translate_in(&self, as_id: u8, gpa: Gpa) -> Option<Mapping> {
        let _st = self.state.read();
        self.walk_leaf(as_id, gpa)
    }

    /// What a hardware page walker would find for `gpa` now: the same walk as
    /// [`translate`](Self::translate) without the MMU lock (acquire loads from the root;
    /// a software TLB or a simulated vCPU uses this). Memory-safe at any time — tables are
    /// frames of the arena — but, like a hardware walk, only meaningful under the TLB
    /// protocol: the embedder's [`TlbFlush`] must not return while a walk that began
    /// before it is still running (KVM's flush IPIs wait for the vCPUs), because tables the
    /// flush was for are reused after it.
    pub fn translate_lockless(&self, gpa: Gpa) -> Option<Mapping> {
        self.walk_leaf(0, gpa)
    }

    fn walk_leaf(&self, as_id: u8, gpa: Gpa) -> Option<Mapping> {
        let (entry, level) = self.find_leaf(as_id, gpa.get() >> PAGE_SHIFT)?;
        let v = entry.load(Ordering::Acquire);
        let base = F::leaf_addr(v, level).get();
        let offset = gpa.get() & (level.page_size() - 1);
        Some(Mapping {
            hpa: crate::spt::hpa(base + offset),
            level,
            writable: v & F::WRITABLE != 0,
            mmu_writable: v & F::MMU_WRITABLE != 0,
        })
    }

    /// The entries of the table at `table`.
    pub(crate) fn table(&self, table: Hpa) -> Option<&Table> {
        self.tables.table(table)
    }

    /// The present leaf mapping `gfn` and its level, by a walk from the root that reads
    /// entries only; a table entry pointing outside the arena ends the walk.
    pub(crate) fn find_leaf(&self, as_id: u8, gfn: u64) -> Option<(&AtomicU64, Level)> {
        if gfn >= self.gfn_limit {
            return None;
        }
        let addr = gfn << PAGE_SHIFT;
        let mut table = *self.roots.get(usize::from(as_id))?;
        let mut level = F::ROOT_LEVEL;
        loop {
            let entry = &self.table(table)?[index_of(addr, level)];
            let v = entry.load(Ordering::Acquire);
            if F::is_leaf(v, level) {
                return Some((entry, level));
            }
            if !F::is_table(v, level) {
                return None;
            }
            table = F::table_addr(v);
            level = level.lower()?;
        }
    }

    pub(crate) fn zapper(&self) -> zap::Zapper<'_, 'a, F> {
        zap::Zapper::new(&self.tables, &self.descs)
    }
}

/// The index of `addr`'s entry in a table of `level`.
#[inline]
pub(crate) fn index_of(addr: u64, level: Level) -> usize {
    ((addr >> level.shift()) & 511) as usize
}

/// Frames a `level` page covers.
#[inline]
pub(crate) fn frames(level: Level) -> u64 {
    level.page_size() >> PAGE_SHIFT
}

/// Gives a descriptor freed by an rmap removal back: to the spare cache under the lock, or
/// to the pool when that is full.
pub(crate) fn free_desc(spare: &mut MemoryCache<DescId, SPARE_DESCS>, pool: &DescPool, id: DescId) {
    if let Err(id) = spare.put(id) {
        let mut pool = pool;
        crate::cache::ObjectSource::free(&mut pool, id);
    }
}

/// Removes `e` from `head`, recycling a freed descriptor; false when `e` was not there.
pub(crate) fn rmap_remove(
    head: &mut RmapHead,
    e: crate::spt::EntryRef,
    store: &mut DescStore,
    spare: &mut MemoryCache<DescId, SPARE_DESCS>,
    pool: &DescPool,
) -> bool {
    match head.remove(e, store) {
        Ok(Some(id)) => {
            free_desc(spare, pool, id);
            true
        }
        Ok(None) => true,
        Err(_) => false,
    }
}
