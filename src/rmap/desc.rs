//! Reverse-map descriptors (KVM `struct pte_list_desc`), the store they live in and the
//! pool of free descriptor ids.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::fmt;
use core::num::NonZeroU32;

use crate::cache::ObjectSource;
use crate::sync::Mutex;

/// Entries in one descriptor (KVM `PTE_LIST_EXT`): 14 handles plus the link and the two
/// counts fill 128 bytes, two cache lines.
pub const PTE_LIST_EXT: usize = 14;

/// The id of a descriptor in a [`DescStore`]: its index plus one, so `Option<DescId>` is 4
/// bytes (KVM's `struct pte_list_desc *`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DescId(NonZeroU32);

static_assertions::assert_eq_size!(Option<DescId>, u32);

impl DescId {
    /// The id of the descriptor at `index` of a store, if `index + 1` fits in 32 bits.
    pub const fn from_index(index: usize) -> Option<Self> {
        if index >= u32::MAX as usize {
            return None;
        }
        match NonZeroU32::new(index as u32 + 1) {
            Some(n) => Some(Self(n)),
            None => None,
        }
    }

    /// The descriptor's index in its store.
    #[inline]
    pub const fn index(self) -> usize {
        (self.0.get() - 1) as usize
    }

    /// The raw id (index plus one, never zero).
    #[inline]
    pub const fn get(self) -> u32 {
        self.0.get()
    }

    /// The id whose raw value is `raw`, if it is not zero.
    #[inline]
    pub const fn new(raw: u32) -> Option<Self> {
        match NonZeroU32::new(raw) {
            Some(n) => Some(Self(n)),
            None => None,
        }
    }
}

/// A block of up to [`PTE_LIST_EXT`] reverse-map entries, linked into a chain that hangs
/// off an [`RmapHead`](super::RmapHead) (KVM `struct pte_list_desc`).
///
/// As in KVM, only the first descriptor of a chain (the head's) may be partly filled; every
/// descriptor after it is full, so `tail_count` (the entries in all descriptors after this
/// one) never changes once a descriptor is linked behind a new head, and the total is
/// `count + tail_count` of the head descriptor: O(1). A descriptor not in any chain has
/// `count == 0`; one in a chain has at least one entry (an emptied head descriptor is
/// released at once), which is how [`RmapHead::add`](super::RmapHead::add) recognises a
/// descriptor handed to it twice.
///
/// The entries are the raw values of [`EntryRef`](crate::spt::EntryRef)s, written only by
/// the rmap code.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PteListDesc {
    pub(super) more: Option<DescId>,
    pub(super) count: u32,
    pub(super) tail_count: u32,
    pub(super) entries: [u64; PTE_LIST_EXT],
}

static_assertions::assert_eq_size!(PteListDesc, [u8; 128]);

impl PteListDesc {
    /// The next (older, full) descriptor of the chain (KVM `more`).
    #[inline]
    pub fn more(&self) -> Option<DescId> {
        self.more
    }

    /// Entries in this descriptor (KVM `spte_count`); zero when it is free.
    #[inline]
    pub fn count(&self) -> usize {
        self.count as usize
    }

    /// Entries in all descriptors after this one (KVM `tail_count`).
    #[inline]
    pub fn tail_count(&self) -> usize {
        self.tail_count as usize
    }

    /// Whether the descriptor is in no chain.
    #[inline]
    pub fn is_free(&self) -> bool {
        self.count == 0
    }
}

/// Why a store or an rmap array could not be created.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CapacityError {
    /// The capacity is more than the ids or indices can name (a descriptor store over
    /// `u32::MAX - 1` entries, a slot past the last frame number).
    TooLarge,
    /// The allocator refused the memory.
    OutOfMemory,
}

impl fmt::Display for CapacityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::TooLarge => "capacity too large to index",
            Self::OutOfMemory => "allocation of rmap metadata failed",
        })
    }
}

impl core::error::Error for CapacityError {}

/// The descriptors of every rmap of one MMU, indexed by [`DescId`]: plain memory that the
/// MMU lock protects (KVM allocates each `pte_list_desc` from a slab; here they are slots of
/// one array of fixed capacity, chosen at creation). Which slots are free is kept by the
/// [`DescPool`] created with it.
pub struct DescStore {
    pub(super) descs: Box<[PteListDesc]>,
}

impl DescStore {
    /// A store of `capacity` descriptors and the pool holding all their ids, allocated
    /// fallibly (`try_reserve`): 128 bytes plus a 4-byte pool slot per descriptor.
    pub fn new(capacity: usize) -> Result<(Self, DescPool), CapacityError> {
        if capacity >= u32::MAX as usize {
            return Err(CapacityError::TooLarge);
        }
        let mut descs = Vec::new();
        descs
            .try_reserve_exact(capacity)
            .map_err(|_| CapacityError::OutOfMemory)?;
        descs.resize(capacity, PteListDesc::default());
        let mut ids = Vec::new();
        ids.try_reserve_exact(capacity)
            .map_err(|_| CapacityError::OutOfMemory)?;
        // Highest index first, so the first ids handed out are the lowest.
        ids.extend((0..capacity).rev().filter_map(DescId::from_index));
        let words = capacity.div_ceil(64);
        let mut in_pool = Vec::new();
        in_pool
            .try_reserve_exact(words)
            .map_err(|_| CapacityError::OutOfMemory)?;
        in_pool.resize(words, u64::MAX);
        let pool = DescPool {
            free: Mutex::new(FreeIds {
                ids,
                in_pool: in_pool.into_boxed_slice(),
            }),
            capacity,
        };
        Ok((
            Self {
                descs: descs.into_boxed_slice(),
            },
            pool,
        ))
    }

    /// The descriptor `id`, if it is in the store.
    #[inline]
    pub fn get(&self, id: DescId) -> Option<&PteListDesc> {
        self.descs.get(id.index())
    }

    #[inline]
    pub(super) fn get_mut(&mut self, id: DescId) -> Option<&mut PteListDesc> {
        self.descs.get_mut(id.index())
    }

    /// Descriptors in the store, free or not.
    #[inline]
    pub fn capacity(&self) -> usize {
        self.descs.len()
    }

    /// Descriptors in some chain (a scan of the store: for audits and tests).
    pub fn in_use(&self) -> usize {
        self.descs.iter().filter(|d| !d.is_free()).count()
    }
}

impl fmt::Debug for DescStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DescStore")
            .field("capacity", &self.descs.len())
            .finish_non_exhaustive()
    }
}

/// The descriptor pool ran dry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OutOfDescs;

impl fmt::Display for OutOfDescs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("no rmap descriptor left")
    }
}

impl core::error::Error for OutOfDescs {}

/// Why the pool refused an id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PoolError {
    /// The id is outside the store the pool was created with.
    OutOfRange,
    /// The id is in the pool already (a double free).
    DoubleFree,
}

impl fmt::Display for PoolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::OutOfRange => "descriptor id outside the store",
            Self::DoubleFree => "descriptor id freed twice",
        })
    }
}

impl core::error::Error for PoolError {}

/// The free descriptor ids of a [`DescStore`], locked on its own (not by the MMU lock), so
/// MMU memory caches are topped up from it with no MMU lock held: `&DescPool` is an
/// [`ObjectSource<DescId>`], and a [`MemoryCache<DescId, N>`](crate::cache::MemoryCache)
/// filled from it feeds [`RmapHead::add`](super::RmapHead::add) under the lock.
pub struct DescPool {
    free: Mutex<FreeIds>,
    capacity: usize,
}

/// The ids in the pool: a stack, and a bit per id saying whether it is on the stack (so a
/// double free is refused instead of handing one descriptor to two chains later).
struct FreeIds {
    ids: Vec<DescId>,
    in_pool: Box<[u64]>,
}

impl FreeIds {
    /// The word and bit of `id` in `in_pool`.
    fn bit(id: DescId) -> (usize, u64) {
        (id.index() / 64, 1 << (id.index() % 64))
    }
}

impl DescPool {
    /// Takes a free id.
    pub fn alloc(&self) -> Result<DescId, OutOfDescs> {
        let mut free = self.free.lock();
        let id = free.ids.pop().ok_or(OutOfDescs)?;
        let (w, b) = FreeIds::bit(id);
        if let Some(word) = free.in_pool.get_mut(w) {
            *word &= !b;
        }
        Ok(id)
    }

    /// Returns an id to the pool. Refused when it is outside the store or already in the
    /// pool (nothing changes then). The caller must return only ids of descriptors that are
    /// in no chain (released by [`RmapHead::remove`](super::RmapHead::remove) or
    /// [`RmapHead::drain`](super::RmapHead::drain), or never used).
    pub fn free(&self, id: DescId) -> Result<(), PoolError> {
        if id.index() >= self.capacity {
            return Err(PoolError::OutOfRange);
        }
        let mut free = self.free.lock();
        let (w, b) = FreeIds::bit(id);
        let word = free.in_pool.get_mut(w).ok_or(PoolError::OutOfRange)?;
        if *word & b != 0 {
            return Err(PoolError::DoubleFree);
        }
        *word |= b;
        // Never reallocates: the vector was reserved for `capacity` ids, and each id is on
        // it at most once.
        free.ids.push(id);
        Ok(())
    }

    /// Free ids in the pool.
    pub fn len(&self) -> usize {
        self.free.lock().ids.len()
    }

    /// Whether no id is free.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Ids the pool was created with (the store's capacity).
    #[inline]
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

impl fmt::Debug for DescPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DescPool")
            .field("free", &self.len())
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl ObjectSource<DescId> for &DescPool {
    type Error = OutOfDescs;

    fn alloc(&mut self) -> Result<DescId, OutOfDescs> {
        DescPool::alloc(self)
    }

    fn free(&mut self, id: DescId) {
        let _ = DescPool::free(self, id);
    }
}
