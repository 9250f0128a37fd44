//! One shape for every MMU memory cache set (KVM `struct kvm_mmu_memory_cache`, one per
//! kind of object): tables and rmap descriptors, each with its own capacity (Matlack 2022,
//! "Allow for different capacities"), bound to the MMU they came from.

use core::fmt;

use super::Mmu;
use crate::cache::{MemoryCache, TableCache};
use crate::rmap::DescId;
use crate::spt::PteFormat;

/// Tables (`TABLES` at most) and rmap descriptors (`DESCS` at most) for one user of the
/// MMU: a vCPU's fault path ([`FaultCaches`](super::FaultCaches)) or the splitter
/// ([`SplitCaches`](crate::rmap::SplitCaches)). Topped up with no MMU lock held, popped
/// under it. The first top-up binds the caches to that MMU: objects of one MMU never
/// reach another (arenas at the same physical addresses would otherwise name each
/// other's frames), and caches hold nothing of an MMU they are not bound to.
#[derive(Debug, Default)]
pub struct MmuCaches<const TABLES: usize, const DESCS: usize> {
    pub(crate) tables: TableCache<TABLES>,
    pub(crate) descs: MemoryCache<DescId, DESCS>,
    /// The MMU whose objects these are (0: none).
    owner: u64,
    /// The shard of the MMU lock this vCPU's fast path takes, plus one (0: none chosen
    /// yet), and the MMU it is a shard of (0: none).
    shard: u8,
    shard_of: u64,
    /// The splitter retook the MMU lock after dropping it and has not split anything since:
    /// it does not drop it again for a waiter until it has (see [`should_yield`](Self::should_yield)).
    retook: bool,
    /// Test hook: make every `n`th check of the splitter drop the lock (0: never).
    #[cfg(any(test, fuzzing, feature = "testing"))]
    force_drop: (u32, u32),
}

/// The caches hold another MMU's tables or descriptors; nothing changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ForeignCaches;

impl fmt::Display for ForeignCaches {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("caches belong to another MMU")
    }
}

impl core::error::Error for ForeignCaches {}

/// Why a top-up failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum TopUpFailed {
    Tables,
    Descriptors,
    Foreign,
}

impl<const TABLES: usize, const DESCS: usize> MmuCaches<TABLES, DESCS> {
    /// Empty caches, bound to no MMU.
    pub fn new() -> Self {
        Self::default()
    }

    /// Tables held.
    pub fn tables(&self) -> usize {
        self.tables.len()
    }

    /// Descriptors held.
    pub fn descriptors(&self) -> usize {
        self.descs.len()
    }

    /// Gives everything back to `mmu`'s arena and pool (KVM `kvm_mmu_free_memory_caches`)
    /// and unbinds the caches. Refused, with nothing changed, when they are another MMU's.
    pub fn release<F: PteFormat>(&mut self, mmu: &Mmu<'_, F>) -> Result<(), ForeignCaches> {
        self.claim(mmu.id())?;
        let mut tables = mmu.tables();
        // Tables in a cache were never linked: freeing them cannot be refused.
        let _ = self.tables.drain_into(&mut tables);
        let mut pool = mmu.descriptors();
        self.descs.drain_into(&mut pool);
        self.owner = 0;
        Ok(())
    }

    /// Binds the caches to MMU `id`; refused when they hold another MMU's objects.
    pub(crate) fn claim(&mut self, id: u64) -> Result<(), ForeignCaches> {
        if self.owner != id {
            if self.owner != 0 && (!self.tables.is_empty() || !self.descs.is_empty()) {
                return Err(ForeignCaches);
            }
            self.owner = id;
        }
        Ok(())
    }

    /// Fills both caches to capacity from `mmu`'s arena and pool, succeeding when at least
    /// `tables` tables and `descs` descriptors are there (KVM `mmu_topup_memory_caches`).
    /// Call it with no MMU lock held.
    pub(crate) fn top_up<F: PteFormat>(
        &mut self,
        mmu: &Mmu<'_, F>,
        tables: usize,
        descs: usize,
    ) -> Result<(), TopUpFailed> {
        self.claim(mmu.id()).map_err(|_| TopUpFailed::Foreign)?;
        let mut arena = mmu.tables();
        self.tables
            .top_up(&mut arena, tables)
            .map_err(|_| TopUpFailed::Tables)?;
        let mut pool = mmu.descriptors();
        self.descs
            .top_up(&mut pool, descs)
            .map_err(|_| TopUpFailed::Descriptors)?;
        Ok(())
    }

    /// The shard of `mmu`'s lock these caches' fast path takes, handed out at first use
    /// with that MMU (another MMU's shard index could be one this MMU has not handed out,
    /// whose readers its writers would not wait for: [`ShardedRwLock`] refuses those, so
    /// it would only be slow).
    ///
    /// [`ShardedRwLock`]: crate::sync::ShardedRwLock
    #[inline]
    pub(crate) fn shard<F: PteFormat>(&mut self, mmu: &Mmu<'_, F>) -> usize {
        if self.shard == 0 || self.shard_of != mmu.id() {
            self.shard = mmu.new_shard() + 1;
            self.shard_of = mmu.id();
        }
        usize::from(self.shard - 1)
    }

    /// Whether at least `tables` tables and `descs` descriptors are held.
    pub(crate) fn holds(&self, tables: usize, descs: usize) -> bool {
        self.tables.len() >= tables && self.descs.len() >= descs
    }

    /// Whether the splitter should drop the MMU lock now for someone else: `contended` (a
    /// thread waits for it) or the test hook says so, and it has split something since it
    /// last retook the lock. Without that progress rule a waiting writer that keeps losing
    /// the race for the free lock (waiting writers are not queued) would have the splitter
    /// drop and retake it forever without splitting anything (loom found such schedules:
    /// over a thousand drops in one run).
    #[inline]
    pub(crate) fn should_yield(&mut self, contended: bool) -> bool {
        !self.retook && (contended || self.forced_drop())
    }

    /// The splitter retook the MMU lock after dropping it.
    #[inline]
    pub(crate) fn retaken(&mut self) {
        self.retook = true;
    }

    /// The splitter split a huge page.
    #[inline]
    pub(crate) fn progressed(&mut self) {
        self.retook = false;
    }

    /// Whether a long operation should drop the MMU lock now although nobody waits: only
    /// under the test hook [`force_lock_drops`](Self::force_lock_drops).
    #[inline]
    pub(crate) fn forced_drop(&mut self) -> bool {
        #[cfg(any(test, fuzzing, feature = "testing"))]
        {
            let (every, seen) = self.force_drop;
            if every != 0 {
                let seen = seen + 1;
                self.force_drop.1 = seen % every;
                return seen % every == 0;
            }
        }
        false
    }

    /// Test hook (hidden): the splitter using these caches drops and retakes the MMU lock
    /// at every `every`th check before a huge page as if someone waited (it still splits
    /// one huge page after each retake before it drops again: [`should_yield`]); 0 turns
    /// it off.
    ///
    /// [`should_yield`]: Self::should_yield
    #[cfg(any(test, fuzzing, feature = "testing"))]
    #[doc(hidden)]
    pub fn force_lock_drops(&mut self, every: u32) {
        self.force_drop = (every, 0);
    }
}
