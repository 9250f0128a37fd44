//! Reverse maps: from a guest frame (or a shadow page) back to the page-table entries that
//! point at it (Linux `arch/x86/kvm/mmu/mmu.c`: `struct kvm_rmap_head`, `pte_list_add`,
//! `pte_list_remove`, `struct pte_list_desc`, `rmap_get_first` / `rmap_get_next`,
//! `__gfn_to_rmap`).
//!
//! # The idea
//!
//! A shadow MMU must find every entry that maps a guest frame without walking the page
//! tables: to write-protect a memslot when dirty logging starts, to zap a range, to split
//! the huge mappings of a slot eagerly (Matlack, "Extend Eager Page Splitting to the shadow
//! MMU", 2022, iterates the level-2 and level-3 rmaps of a memslot). KVM keeps one word per
//! frame and level, [`RmapHead`], that is empty, names one entry, or points to a chain of
//! [`PteListDesc`]s holding 14 entries each. Most frames are mapped once, so most heads
//! need no descriptor at all.
//!
//! | KVM | hvmem |
//! |---|---|
//! | `struct kvm_rmap_head` | [`RmapHead`] |
//! | `struct pte_list_desc`, `PTE_LIST_EXT` | [`PteListDesc`], [`PTE_LIST_EXT`] |
//! | `pte_list_add` | [`RmapHead::add`] |
//! | `pte_list_remove`, `pte_list_desc_remove_entry` | [`RmapHead::remove`] |
//! | `pte_list_count` | [`RmapHead::count`] |
//! | `rmap_get_first`, `rmap_get_next`, `for_each_rmap_spte` | [`RmapHead::iter`], [`RmapIter`] |
//! | `pte_list_destroy` (`kvm_zap_rmap`) | [`RmapHead::drain`] |
//! | `slot->arch.rmap[level]`, `__gfn_to_rmap`, `gfn_to_index` | [`SlotRmaps`] |
//! | `mmu_pte_list_desc_cache`, `pte_list_desc_cache` slab | a [`MemoryCache<DescId, N>`](crate::cache::MemoryCache) over a [`DescPool`] |
//!
//! An entry is an [`EntryRef`] (table and index: KVM stores the `u64 *sptep`). Nothing in
//! [`RmapHead`] is specific to leaves: the parent-pointer list of a shadow page (KVM
//! `sp->parent_ptes`, the entries of upper tables that point at the page's table) is just
//! another `RmapHead` of parent `EntryRef`s, stored in the shadow-page header and sharing
//! the same [`DescStore`].
//!
//! # Encoding of a head
//!
//! One `u64`: `0` is empty; bit 63 clear and bit 62 set: one entry, whose raw value
//! (`table | index`, below 2^52) is in the low bits; bit 63 set: a chain whose first
//! descriptor's [`DescId`] is in the low 32 bits. KVM tags a pointer with bit 0, which an
//! `EntryRef` uses for its index, and needs no tag for a single entry because a pointer is
//! never 0; a table at physical address 0 is legal here, hence the explicit tag.
//!
//! # Descriptors without pointers
//!
//! Descriptors live in a [`DescStore`] (an array fixed at creation, plain memory under the
//! MMU lock) and are named by [`DescId`]s. The free ids are kept by a [`DescPool`] with a
//! lock of its own, so the per-vCPU (or per-splitter) [`MemoryCache`] of descriptor ids is
//! topped up from it *outside* the MMU lock and popped by [`RmapHead::add`] under it, as KVM
//! tops up `mmu_pte_list_desc_cache`. A descriptor that [`RmapHead::remove`] or
//! [`RmapHead::drain`] releases is handed back to the caller, who puts it into its cache or
//! the pool. No pointer, no `unsafe`: a bad id (outside the store, or a descriptor not in
//! use where one should be) is a [`RmapError::BadDescriptor`], and every walk of a chain is
//! bounded by the store's capacity, so a corrupt chain can neither panic nor loop.
//!
//! # Concurrency
//!
//! Heads and the store are plain memory: the caller holds the MMU lock for write to change
//! them, or for read to iterate (KVM changes rmaps only under `mmu_lock` held for write in
//! the shadow MMU). Only the [`DescPool`] is shared and locked on its own.
//!
//! The module needs the `alloc` feature (the store and the per-slot arrays are allocated,
//! fallibly, at creation; nothing is allocated on the add or remove path).

use core::fmt;

use crate::addr::{Hpa, PAGE_SIZE};
use crate::cache::MemoryCache;
use crate::spt::EntryRef;

mod desc;
mod slot;
mod split;
#[cfg(test)]
mod tests;

pub use desc::{
    CapacityError, DescId, DescPool, DescStore, OutOfDescs, PTE_LIST_EXT, PoolError, PteListDesc,
};
pub use slot::SlotRmaps;
pub use split::{SPLIT_DESCS, SPLIT_TABLES, SplitCaches, SplitError, SplitStats};

/// Why an rmap operation was refused. Nothing changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RmapError {
    /// A new descriptor was needed and the cache is empty: top it up (outside the MMU lock)
    /// and retry.
    NoDescriptor,
    /// The entry is not in the rmap.
    NotFound,
    /// The head names a descriptor outside the store, a chain is corrupt (a free descriptor
    /// in it, a count out of range, a cycle), or the cache handed out a descriptor already
    /// in use: the head was used with another store, copied and used twice, or a
    /// descriptor id was freed twice.
    BadDescriptor,
}

impl fmt::Display for RmapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NoDescriptor => "no rmap descriptor in the cache",
            Self::NotFound => "entry not in the rmap",
            Self::BadDescriptor => "rmap descriptor outside the store or chain corrupt",
        })
    }
}

impl core::error::Error for RmapError {}

/// Tag of a head holding one entry.
const ONE: u64 = 1 << 62;
/// Tag of a head pointing to a descriptor chain.
const MANY: u64 = 1 << 63;
/// The bits of an entry's raw value (`table | index`, a 52-bit physical address).
const ENTRY_MASK: u64 = (1 << crate::addr::PHYS_ADDR_BITS) - 1;

/// The raw value of an entry handle: its table's address with the index in the low bits.
#[inline]
fn raw(e: EntryRef) -> u64 {
    e.table().get() | e.index() as u64
}

/// The entry handle of a raw value [`raw`] produced.
#[inline]
fn entry(raw: u64) -> Option<EntryRef> {
    let table = Hpa::new(raw & ENTRY_MASK & !(PAGE_SIZE - 1)).ok()?;
    EntryRef::new(table, (raw & (PAGE_SIZE - 1)) as usize)
}

/// What a head holds.
enum Kind {
    Empty,
    One(u64),
    Many(DescId),
    Corrupt,
}

/// The reverse map of one guest frame at one level, or the parent list of one shadow page
/// (KVM `struct kvm_rmap_head`): one `u64` that is empty, holds one [`EntryRef`], or names a
/// chain of [`PteListDesc`]s in a [`DescStore`] (see the module docs for the encoding).
///
/// The rmap is a multiset, as in KVM: [`add`](Self::add) does not look for the entry (that
/// would be a walk of the chain on every fault), so adding an entry twice stores it twice
/// and it takes two removes to go. The order of entries is unspecified.
///
/// Nothing here is specific to leaves: a shadow page's parent list (KVM `parent_ptes`) is an
/// `RmapHead` of the upper-level entries that point at its table.
///
/// A head is `Copy` because it is one word; the copies share the chain. Use one copy only:
/// changing a chain through two copies corrupts it (detected as
/// [`RmapError::BadDescriptor`] where possible, never a panic or an endless loop).
#[derive(Clone, Copy, PartialEq, Eq, Default, Debug)]
#[repr(transparent)]
pub struct RmapHead(u64);

static_assertions::assert_eq_size!(RmapHead, u64);

impl RmapHead {
    /// The empty rmap.
    pub const EMPTY: Self = Self(0);

    /// The raw tagged word (for debugging and audits).
    #[inline]
    pub const fn raw(self) -> u64 {
        self.0
    }

    /// The head whose raw tagged word is `raw` (for fills outside this module).
    #[inline]
    pub(crate) const fn from_raw(raw: u64) -> Self {
        Self(raw)
    }

    /// Whether the rmap holds no entry.
    #[inline]
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The entry of a head that holds exactly one (no descriptor): the common case,
    /// answered without touching the descriptor store.
    #[inline]
    pub fn single(self) -> Option<EntryRef> {
        match self.kind() {
            Kind::One(raw) => entry(raw),
            _ => None,
        }
    }

    /// The first descriptor of the chain, if the head has one.
    #[inline]
    pub fn desc(self) -> Option<DescId> {
        match self.kind() {
            Kind::Many(id) => Some(id),
            _ => None,
        }
    }

    #[inline]
    fn kind(self) -> Kind {
        if self.0 == 0 {
            Kind::Empty
        } else if self.0 & MANY != 0 {
            match u32::try_from(self.0 & !MANY).ok().and_then(DescId::new) {
                Some(id) => Kind::Many(id),
                None => Kind::Corrupt,
            }
        } else if self.0 & !ENTRY_MASK == ONE {
            Kind::One(self.0 & ENTRY_MASK)
        } else {
            Kind::Corrupt
        }
    }

    #[inline]
    fn many(id: DescId) -> Self {
        Self(MANY | u64::from(id.get()))
    }

    /// Entries in the rmap, in O(1) (KVM `pte_list_count`: the head descriptor's count plus
    /// its `tail_count`). A head naming a descriptor outside `store` counts 0.
    #[inline]
    pub fn count(self, store: &DescStore) -> usize {
        match self.kind() {
            Kind::Empty | Kind::Corrupt => 0,
            Kind::One(_) => 1,
            Kind::Many(id) => store
                .get(id)
                .map_or(0, |d| d.count as usize + d.tail_count as usize),
        }
    }

    /// Adds `e` (KVM `pte_list_add`). A descriptor is needed when the head goes from one
    /// entry to two, and when the head descriptor is full (the new one becomes the head, so
    /// every descriptor after the first stays full); it is popped from `cache`.
    ///
    /// Refused, with nothing changed: [`RmapError::NoDescriptor`] when a descriptor is
    /// needed and `cache` is empty; [`RmapError::BadDescriptor`] when the head's chain is
    /// bad or the popped id is outside `store` or already in use (it is put back into
    /// `cache`).
    #[inline]
    pub fn add<const N: usize>(
        &mut self,
        e: EntryRef,
        store: &mut DescStore,
        cache: &mut MemoryCache<DescId, N>,
    ) -> Result<(), RmapError> {
        // The common case (a split's 512 new leaves, a fault's first mapping) inline: an
        // empty head takes the entry itself.
        if self.is_empty() {
            self.0 = ONE | raw(e);
            return Ok(());
        }
        self.add_to_nonempty(e, store, cache)
    }

    /// Adds entry `i` of `table` to `heads[i]`, for every head, when all of them are empty
    /// (a split's fresh child: its 512 leaves map 512 frames that had no 4 KiB mapping):
    /// each head takes its entry itself, no descriptor, and one vectorised pass checks and
    /// writes the heads sixteen at a time. `false`, with nothing changed, when a head
    /// is not empty or `heads` is longer than a table ([`ENTRIES`](crate::spt::ENTRIES));
    /// the caller then adds the entries one by one with [`add`](Self::add).
    pub fn fill_empty(heads: &mut [Self], table: Hpa) -> bool {
        if heads.len() > crate::spt::ENTRIES {
            return false;
        }
        // A table is 4 KiB aligned, so `table | i` is the handle of its entry `i`, and for
        // `i` below 512 that is `table + i`: the loops below count up instead of masking.
        let tagged = ONE | (table.get() & !(PAGE_SIZE - 1));
        // One pass, 16 heads (two lines) at a time: the 16 are checked empty, then
        // written, while their lines are at hand (a check pass and a write pass took 2.95
        // instructions per head, this 2.7). A head that is not empty ends the pass, and
        // the heads written before it are emptied again: they were empty.
        let mut written = 0;
        let mut clean = true;
        // The values of the next 16 heads, kept in registers and stepped by 16.
        let mut next: [u64; 16] = core::array::from_fn(|j| tagged + j as u64);
        let mut chunks = heads.chunks_exact_mut(16);
        for c in &mut chunks {
            if c.iter().fold(0, |acc, h| acc | h.0) != 0 {
                clean = false;
                break;
            }
            for (h, n) in c.iter_mut().zip(next.iter_mut()) {
                h.0 = *n;
                *n += 16;
            }
            written += 16;
        }
        if clean {
            let rest = chunks.into_remainder();
            if rest.iter().fold(0, |acc, h| acc | h.0) == 0 {
                for (j, h) in rest.iter_mut().enumerate() {
                    h.0 = tagged + (written + j) as u64;
                }
                return true;
            }
        }
        for h in &mut heads[..written] {
            *h = Self::EMPTY;
        }
        false
    }

    /// [`fill_empty`](Self::fill_empty) for heads the caller knows are empty
    /// ([`SlotRmaps::known_empty`], tracked by the splitter through its pass): writes
    /// head `i` with entry `i` of `table` without reading any head first, two heads per
    /// vector store. Heads past a table's entries are left alone.
    #[inline]
    pub(crate) fn fill_known_empty(heads: &mut [Self], table: Hpa) {
        let tagged = ONE | (table.get() & !(PAGE_SIZE - 1));
        let len = heads.len().min(crate::spt::ENTRIES);
        let heads = &mut heads[..len];
        // Sixteen heads per loop trip, their values kept in registers and stepped by 16
        // (the compiler writes them two per vector store).
        let mut next: [u64; 16] = core::array::from_fn(|j| tagged + j as u64);
        let mut chunks = heads.chunks_exact_mut(16);
        for c in &mut chunks {
            for (h, n) in c.iter_mut().zip(next.iter_mut()) {
                h.0 = *n;
                *n += 16;
            }
        }
        for (h, n) in chunks.into_remainder().iter_mut().zip(next) {
            h.0 = n;
        }
    }

    /// [`fill_known_empty`](Self::fill_known_empty) with non-temporal stores, for a
    /// split bigger than the caches: the caller runs [`stream_fence`] before anything reads
    /// or writes the heads again.
    ///
    /// [`stream_fence`]: crate::spt::stream_fence
    #[inline]
    pub(crate) fn stream_known_empty(heads: &mut [Self], table: Hpa) {
        let tagged = ONE | (table.get() & !(PAGE_SIZE - 1));
        let len = heads.len().min(crate::spt::ENTRIES);
        crate::spt::stream_heads(&mut heads[..len], tagged);
    }

    /// [`add`](Self::add) past the empty case.
    #[inline(never)]
    fn add_to_nonempty<const N: usize>(
        &mut self,
        e: EntryRef,
        store: &mut DescStore,
        cache: &mut MemoryCache<DescId, N>,
    ) -> Result<(), RmapError> {
        let new = raw(e);
        match self.kind() {
            Kind::Empty => {
                self.0 = ONE | new;
                Ok(())
            }
            Kind::One(old) => {
                let id = take_desc(store, cache)?;
                let d = store.get_mut(id).ok_or(RmapError::BadDescriptor)?;
                *d = PteListDesc::default();
                d.entries[0] = old;
                d.entries[1] = new;
                d.count = 2;
                *self = Self::many(id);
                Ok(())
            }
            Kind::Many(head) => {
                let hd = store.get(head).ok_or(RmapError::BadDescriptor)?;
                let count = hd.count as usize;
                if count == 0 || count > PTE_LIST_EXT {
                    return Err(RmapError::BadDescriptor);
                }
                if count < PTE_LIST_EXT {
                    let hd = store.get_mut(head).ok_or(RmapError::BadDescriptor)?;
                    hd.entries[count] = new;
                    hd.count += 1;
                    return Ok(());
                }
                let total = hd
                    .tail_count
                    .checked_add(hd.count)
                    .ok_or(RmapError::BadDescriptor)?;
                let id = take_desc(store, cache)?;
                let d = store.get_mut(id).ok_or(RmapError::BadDescriptor)?;
                *d = PteListDesc::default();
                d.more = Some(head);
                d.tail_count = total;
                d.entries[0] = new;
                d.count = 1;
                *self = Self::many(id);
                Ok(())
            }
            Kind::Corrupt => Err(RmapError::BadDescriptor),
        }
    }

    /// Removes one occurrence of `e` (KVM `pte_list_remove`): the last entry of the head
    /// descriptor moves into the hole, so the descriptors after the head stay full and their
    /// `tail_count`s stay right. When the head descriptor becomes empty it is released
    /// (reset to free) and its id returned, for the caller to put back into a cache or the
    /// pool; the next descriptor becomes the head. As in KVM, a chain that drops to one
    /// entry keeps its descriptor.
    ///
    /// Refused, with nothing changed: [`RmapError::NotFound`] when `e` is not in the rmap,
    /// [`RmapError::BadDescriptor`] when the chain is bad before `e` is found.
    pub fn remove(
        &mut self,
        e: EntryRef,
        store: &mut DescStore,
    ) -> Result<Option<DescId>, RmapError> {
        let target = raw(e);
        match self.kind() {
            Kind::Empty => Err(RmapError::NotFound),
            Kind::One(old) if old == target => {
                *self = Self::EMPTY;
                Ok(None)
            }
            Kind::One(_) => Err(RmapError::NotFound),
            Kind::Corrupt => Err(RmapError::BadDescriptor),
            Kind::Many(head) => {
                let (at, i) = find(store, head, target)?;
                let hd = store.get_mut(head).ok_or(RmapError::BadDescriptor)?;
                // `find` checked the head descriptor's count is in 1..=PTE_LIST_EXT.
                let j = (hd.count as usize).wrapping_sub(1);
                let last = *hd.entries.get(j).ok_or(RmapError::BadDescriptor)?;
                let d = store.get_mut(at).ok_or(RmapError::BadDescriptor)?;
                d.entries[i] = last;
                let hd = store.get_mut(head).ok_or(RmapError::BadDescriptor)?;
                hd.entries[j] = 0;
                hd.count -= 1;
                if hd.count > 0 {
                    return Ok(None);
                }
                *self = hd.more.map_or(Self::EMPTY, Self::many);
                *hd = PteListDesc::default();
                Ok(Some(head))
            }
        }
    }

    /// The first entry [`iter`](Self::iter) yields (KVM `rmap_get_first`): to take entries
    /// out one at a time while changing the rmap, `while let Some(e) = head.first(&store)
    /// { ...; head.remove(e, &mut store) }`.
    #[inline]
    pub fn first(self, store: &DescStore) -> Option<EntryRef> {
        self.iter(store).next()
    }

    /// Whether `e` is in the rmap (a walk of the chain).
    pub fn contains(self, e: EntryRef, store: &DescStore) -> bool {
        self.iter(store).any(|x| x == e)
    }

    /// The entries (KVM `rmap_get_first` / `rmap_get_next`): the single entry, or the head
    /// descriptor's entries and then each older descriptor's. The walk stops early, and
    /// quietly, at a bad descriptor or after as many descriptors as the store holds;
    /// [`check`](Self::check) says whether the chain is sound.
    #[inline]
    pub fn iter(self, store: &DescStore) -> RmapIter<'_> {
        let state = match self.kind() {
            Kind::Empty | Kind::Corrupt => State::Done,
            Kind::One(raw) => State::One(raw),
            Kind::Many(id) => State::Chain {
                desc: id,
                i: 0,
                steps: 0,
            },
        };
        RmapIter { store, state }
    }

    /// Checks the chain: every descriptor in `store` and in use, the first holding 1 to
    /// [`PTE_LIST_EXT`] entries and the others full, each `tail_count` the entries after it,
    /// no cycle. Returns the number of entries (equal to [`count`](Self::count) when sound).
    pub fn check(self, store: &DescStore) -> Result<usize, RmapError> {
        let mut cur = match self.kind() {
            Kind::Empty => return Ok(0),
            Kind::One(_) => return Ok(1),
            Kind::Corrupt => return Err(RmapError::BadDescriptor),
            Kind::Many(id) => Some(id),
        };
        // The tail counts seen, from the head down; each must equal the next one's
        // count + tail_count.
        let mut expect: Option<u32> = None;
        let mut total = 0usize;
        let mut steps = 0usize;
        let mut first = true;
        while let Some(id) = cur {
            steps += 1;
            if steps > store.capacity() {
                return Err(RmapError::BadDescriptor);
            }
            let d = store.get(id).ok_or(RmapError::BadDescriptor)?;
            let count = d.count as usize;
            let count_ok = if first {
                (1..=PTE_LIST_EXT).contains(&count)
            } else {
                count == PTE_LIST_EXT
            };
            let total_here = d.count.checked_add(d.tail_count);
            if !count_ok || expect.is_some_and(|t| Some(t) != total_here) {
                return Err(RmapError::BadDescriptor);
            }
            expect = Some(d.tail_count);
            total += count;
            first = false;
            cur = d.more;
        }
        if expect != Some(0) {
            return Err(RmapError::BadDescriptor);
        }
        Ok(total)
    }

    /// Empties the rmap (KVM `pte_list_destroy`): calls `f` on every entry and `freed` on
    /// every descriptor it releases (reset to free; the caller puts it into a cache or the
    /// pool). A bad descriptor ends the chain there: the head is empty afterwards in any
    /// case, and descriptors after the bad one are neither visited nor released.
    pub fn drain(
        &mut self,
        store: &mut DescStore,
        mut f: impl FnMut(EntryRef),
        mut freed: impl FnMut(DescId),
    ) {
        let kind = self.kind();
        *self = Self::EMPTY;
        let mut cur = match kind {
            Kind::Empty | Kind::Corrupt => return,
            Kind::One(raw) => {
                if let Some(e) = entry(raw) {
                    f(e);
                }
                return;
            }
            Kind::Many(id) => Some(id),
        };
        // Each descriptor is reset as it is released, so a cycle meets a free descriptor
        // and stops; the step bound is a second guard.
        let capacity = store.capacity();
        let mut steps = 0;
        while let Some(id) = cur {
            steps += 1;
            let Some(d) = store.get_mut(id) else { return };
            if d.is_free() || steps > capacity {
                return;
            }
            let n = (d.count as usize).min(PTE_LIST_EXT);
            cur = d.more;
            let entries = d.entries;
            *d = PteListDesc::default();
            entries[..n]
                .iter()
                .filter_map(|&r| entry(r))
                .for_each(&mut f);
            freed(id);
        }
    }
}

/// Pops a free descriptor id from `cache`, or puts a bad one back.
fn take_desc<const N: usize>(
    store: &DescStore,
    cache: &mut MemoryCache<DescId, N>,
) -> Result<DescId, RmapError> {
    let id = cache.alloc().ok_or(RmapError::NoDescriptor)?;
    if store.get(id).is_some_and(PteListDesc::is_free) {
        Ok(id)
    } else {
        // Just popped, so there is room.
        let _ = cache.put(id);
        Err(RmapError::BadDescriptor)
    }
}

/// Where `target` is in the chain starting at `head`: (descriptor, index). Checks each
/// descriptor on the way (in the store, count in range, the tail ones full).
fn find(store: &DescStore, head: DescId, target: u64) -> Result<(DescId, usize), RmapError> {
    let mut cur = Some(head);
    let mut steps = 0;
    while let Some(id) = cur {
        steps += 1;
        if steps > store.capacity() {
            return Err(RmapError::BadDescriptor);
        }
        let d = store.get(id).ok_or(RmapError::BadDescriptor)?;
        let count = d.count as usize;
        if count == 0 || count > PTE_LIST_EXT || (id != head && count != PTE_LIST_EXT) {
            return Err(RmapError::BadDescriptor);
        }
        if let Some(i) = d.entries[..count].iter().position(|&r| r == target) {
            return Ok((id, i));
        }
        cur = d.more;
    }
    Err(RmapError::NotFound)
}

enum State {
    Done,
    One(u64),
    Chain {
        desc: DescId,
        i: usize,
        steps: usize,
    },
}

/// The entries of an rmap ([`RmapHead::iter`]; KVM `struct rmap_iterator`).
pub struct RmapIter<'s> {
    store: &'s DescStore,
    state: State,
}

impl Iterator for RmapIter<'_> {
    type Item = EntryRef;

    #[inline]
    fn next(&mut self) -> Option<EntryRef> {
        loop {
            match self.state {
                State::Done => return None,
                State::One(raw) => {
                    self.state = State::Done;
                    return entry(raw);
                }
                State::Chain { desc, i, steps } => {
                    let Some(d) = self.store.get(desc) else {
                        self.state = State::Done;
                        return None;
                    };
                    let count = (d.count as usize).min(PTE_LIST_EXT);
                    if i < count {
                        self.state = State::Chain {
                            desc,
                            i: i + 1,
                            steps,
                        };
                        match entry(d.entries[i]) {
                            Some(e) => return Some(e),
                            None => continue,
                        }
                    }
                    self.state = match d.more {
                        Some(next) if steps + 1 < self.store.capacity() => State::Chain {
                            desc: next,
                            i: 0,
                            steps: steps + 1,
                        },
                        _ => State::Done,
                    };
                }
            }
        }
    }
}

impl fmt::Debug for RmapIter<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RmapIter").finish_non_exhaustive()
    }
}
