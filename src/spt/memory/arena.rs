//! [`TableArena`]: table memory over caller-provided frames, with its bookkeeping out of
//! band in a parallel slice of [`TableSlot`]s; [`LockedArena`] shares one between walkers.

use core::fmt;
use core::marker::PhantomData;
use core::ptr::NonNull;

use super::{FreeError, Table, TableAlloc, TableFrame, TableLinks, TableMapping, Unlinked};
use crate::addr::{Hpa, Level, PAGE_SHIFT, PAGE_SIZE, PHYS_ADDR_BITS};
use crate::sync::{AtomicU8, AtomicU32, Ordering};

/// Why a [`TableArena`] could not be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ArenaError {
    /// The base physical address is not 4 KiB aligned.
    Unaligned,
    /// The frames would reach beyond the 52-bit physical address space.
    OutOfRange,
    /// There are fewer slots than frames.
    TooFewSlots,
    /// More frames than a 32-bit slot index can name.
    TooManyFrames,
}

impl fmt::Display for ArenaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Unaligned => "arena base physical address is not 4 KiB aligned",
            Self::OutOfRange => "arena reaches beyond the physical address space",
            Self::TooFewSlots => "fewer table slots than table frames",
            Self::TooManyFrames => "more table frames than 2^32 - 1",
        })
    }
}

impl core::error::Error for ArenaError {}

const FREE: u8 = 0;
const ALLOCATED: u8 = 1;

/// The out-of-band record of one table frame of a [`TableArena`]: its state, its free-list
/// link, how many parent entries link it, the level it was allocated for, and a header `H`
/// of the embedder's (a shadow MMU puts its `ShadowPage` there; KVM keeps it in
/// `page_private` of the table's page). 12 bytes plus `H`.
pub struct TableSlot<H = ()> {
    links: AtomicU32,
    /// Index + 1 of the next free slot, 0 at the end of the list.
    next_free: u32,
    state: u8,
    /// The level the table serves at: set when it is allocated and when it is linked, 0
    /// while the frame is free (so one load tells a live table of a level).
    level: AtomicU8,
    header: H,
}

impl<H> TableSlot<H> {
    /// A slot with `header` (the arena resets everything else when it first hands out the
    /// frame).
    #[cfg(not(loom))]
    pub const fn new(header: H) -> Self {
        Self {
            links: AtomicU32::new(0),
            next_free: 0,
            state: FREE,
            level: AtomicU8::new(0),
            header,
        }
    }

    /// A slot with `header`.
    #[cfg(loom)]
    pub fn new(header: H) -> Self {
        Self {
            links: AtomicU32::new(0),
            next_free: 0,
            state: FREE,
            level: AtomicU8::new(0),
            header,
        }
    }
}

impl<H: Default> Default for TableSlot<H> {
    fn default() -> Self {
        Self::new(H::default())
    }
}

impl<H> fmt::Debug for TableSlot<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TableSlot")
            .field("state", &self.state)
            .field("level", &self.level.load(Ordering::Relaxed))
            .field("links", &self.links.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

#[cfg(not(loom))]
static_assertions::assert_eq_size!(TableSlot<()>, [u32; 3]);

/// Table memory over caller-provided frames: frame `i` has physical address
/// `phys_base + i * 4096` and its bookkeeping in `slots[i]`. Allocation reuses freed
/// frames first (a free list through the slots), then bumps through never-used ones, and
/// zeroes the frame it hands out (as the x86_64 crate's `create_next_table` does).
///
/// Nothing is kept inside the tables: a frame that safe code scribbled on (through a
/// visitor, or the `&[TableFrame]` the caller still holds) can only hold wrong entries,
/// never mislead the arena. Freeing is checked: a frame that is not allocated, or that an
/// entry still links, is refused.
pub struct TableArena<'a, H = ()> {
    base: NonNull<TableFrame>,
    frames: usize,
    phys_base: u64,
    slots: &'a mut [TableSlot<H>],
    /// Frames `next..frames` were never handed out (their slots hold stale values).
    next: usize,
    /// Index + 1 of the first freed frame, 0 when none.
    free_head: u32,
    allocated: usize,
    _frames: PhantomData<&'a [TableFrame]>,
}

// SAFETY: the arena refers to frames it borrows for 'a as `&[TableFrame]`, made of atomics,
// which may be shared and sent between threads; the slots are a `&mut` borrow whose header
// type must itself be sendable.
unsafe impl<H: Send> Send for TableArena<'_, H> {}
// SAFETY: as above; `&TableArena` reads the bounds, hands out pointers to atomics, updates
// link counts atomically and gives `&H`, which needs `H: Sync`.
unsafe impl<H: Sync> Sync for TableArena<'_, H> {}

impl<'a, H> TableArena<'a, H> {
    /// An arena over `frames`, frame `i` at physical address `phys_base + i * 4096`, with
    /// `slots[i]` its record (`slots` may be longer). Takes constant time: a frame and its
    /// slot are reset when the frame is first handed out, so recycled slices are fine.
    pub fn new(
        frames: &'a [TableFrame],
        slots: &'a mut [TableSlot<H>],
        phys_base: Hpa,
    ) -> Result<Self, ArenaError> {
        Self::check(frames.len(), slots.len(), phys_base)?;
        Ok(Self {
            base: NonNull::from(frames).cast(),
            frames: frames.len(),
            phys_base: phys_base.get(),
            slots,
            next: 0,
            free_head: 0,
            allocated: 0,
            _frames: PhantomData,
        })
    }

    /// An arena over `frames` frames at `ptr`, frame `i` at physical address
    /// `phys_base + i * 4096`, for memory that is not a Rust slice (guest RAM mapped with
    /// `mmap`).
    ///
    /// # Safety
    /// `ptr` must be valid for reads and writes of `frames * 4096` bytes for `'a`, and
    /// nothing else may access that memory during `'a` other than atomically (hardware
    /// page walks, and a guest that does not write into it while the host runs, are fine).
    pub unsafe fn from_raw_parts(
        ptr: NonNull<TableFrame>,
        frames: usize,
        slots: &'a mut [TableSlot<H>],
        phys_base: Hpa,
    ) -> Result<Self, ArenaError> {
        // SAFETY: the caller promises `ptr` is valid for `frames` frames for 'a with only
        // atomic access; `TableFrame` is plain atomics with no invalid bit patterns, and
        // `NonNull<TableFrame>` is aligned by its type.
        let slice: &'a [TableFrame] = unsafe { core::slice::from_raw_parts(ptr.as_ptr(), frames) };
        Self::new(slice, slots, phys_base)
    }

    fn check(frames: usize, slots: usize, phys_base: Hpa) -> Result<(), ArenaError> {
        if phys_base.page_offset() != 0 {
            return Err(ArenaError::Unaligned);
        }
        if slots < frames {
            return Err(ArenaError::TooFewSlots);
        }
        if u32::try_from(frames).map_or(true, |f| f == u32::MAX) {
            return Err(ArenaError::TooManyFrames);
        }
        // The last frame may end exactly at the top of the physical address space.
        let end = (frames as u64)
            .checked_mul(PAGE_SIZE)
            .and_then(|bytes| phys_base.get().checked_add(bytes));
        match end {
            Some(end) if end <= 1 << PHYS_ADDR_BITS => Ok(()),
            _ => Err(ArenaError::OutOfRange),
        }
    }

    /// Tables currently allocated.
    pub fn allocated(&self) -> usize {
        self.allocated
    }

    /// Frames in the arena.
    pub fn capacity(&self) -> usize {
        self.frames
    }

    /// The physical address of frame 0.
    pub fn phys_base(&self) -> Hpa {
        crate::spt::hpa(self.phys_base)
    }

    /// The header of an allocated table (KVM `sptep_to_sp`, from the table's address).
    #[inline]
    pub fn header(&self, table: Hpa) -> Option<&H> {
        let index = self.allocated_index(table)?;
        Some(&self.slots[index].header)
    }

    /// The header of an allocated table, to fill or change.
    #[inline]
    pub fn header_mut(&mut self, table: Hpa) -> Option<&mut H> {
        let index = self.allocated_index(table)?;
        Some(&mut self.slots[index].header)
    }

    /// [`TableLinks::link`] with the arena held exclusively (as `LockedArena` holds it
    /// under its lock): the count is read and written back, where the shared version needs
    /// a locked read-modify-write, which on x86 waits for every store before it to drain
    /// (a split's 512 table entries and 512 rmap heads).
    #[inline]
    fn link_exclusive(&mut self, table: Hpa, level: Level) {
        if let Some(index) = self.allocated_index(table) {
            let slot = &self.slots[index];
            slot.level.store(level.get(), Ordering::Release);
            let n = slot.links.load(Ordering::Relaxed);
            slot.links.store(n.wrapping_add(1), Ordering::Release);
        }
    }

    /// [`TableLinks::unlink`] with the arena held exclusively, as [`link_exclusive`].
    ///
    /// [`link_exclusive`]: Self::link_exclusive
    #[inline]
    fn unlink_exclusive(&mut self, table: Hpa) -> Unlinked {
        let Some(index) = self.allocated_index(table) else {
            return Unlinked::Free;
        };
        let links = &self.slots[index].links;
        match links.load(Ordering::Relaxed).checked_sub(1) {
            Some(n) => {
                links.store(n, Ordering::Release);
                if n > 0 {
                    Unlinked::StillLinked
                } else {
                    Unlinked::Free
                }
            }
            None => Unlinked::Free,
        }
    }

    /// The level an allocated table was allocated for.
    pub fn level(&self, table: Hpa) -> Option<Level> {
        let index = self.allocated_index(table)?;
        Level::new(self.slots[index].level.load(Ordering::Relaxed)).ok()
    }

    #[inline]
    fn frame(&self, index: usize) -> &Table {
        debug_assert!(index < self.frames);
        // SAFETY: callers pass `index < self.frames` (every index comes from `index()` or
        // from the bump pointer, both bounded by `frames`); the memory is a `[TableFrame]`
        // of `frames` elements borrowed for 'a, which outlives `&self`.
        unsafe { &(*self.base.as_ptr().add(index)).0 }
    }

    #[inline]
    fn index(&self, table: Hpa) -> Option<usize> {
        frame_index(self.phys_base, self.frames, table)
    }

    /// The index of `table` if it is allocated.
    #[inline]
    fn allocated_index(&self, table: Hpa) -> Option<usize> {
        let index = self.index(table)?;
        (index < self.next && self.slots[index].state == ALLOCATED).then_some(index)
    }

    #[inline]
    fn addr(&self, index: usize) -> Hpa {
        crate::spt::hpa(self.phys_base + index as u64 * PAGE_SIZE)
    }
}

/// The frame index of `table` in frames at `phys_base`, if it is one of `frames`.
#[inline]
fn frame_index(phys_base: u64, frames: usize, table: Hpa) -> Option<usize> {
    let offset = table.get().wrapping_sub(phys_base);
    let index = usize::try_from(offset >> PAGE_SHIFT).ok()?;
    (offset % PAGE_SIZE == 0 && index < frames).then_some(index)
}

impl<H> fmt::Debug for TableArena<'_, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TableArena")
            .field("frames", &self.frames)
            .field("phys_base", &self.phys_base)
            .field("allocated", &self.allocated)
            .finish_non_exhaustive()
    }
}

impl<H> TableAlloc for TableArena<'_, H> {
    fn alloc_table(&mut self, level: Level) -> Option<Hpa> {
        let table = self.alloc_table_to_fill(level)?;
        if let Some(index) = self.index(table) {
            for entry in self.frame(index) {
                entry.store(0, Ordering::Relaxed);
            }
        }
        Some(table)
    }

    fn alloc_table_to_fill(&mut self, level: Level) -> Option<Hpa> {
        let index = if self.free_head != 0 {
            // The list lives in the slots, which only the arena writes: every link was
            // written by `free_table` with an index below `next`.
            let index = self.free_head as usize - 1;
            self.free_head = self.slots[index].next_free;
            index
        } else if self.next < self.frames {
            self.next += 1;
            self.next - 1
        } else {
            return None;
        };
        let slot = &mut self.slots[index];
        slot.state = ALLOCATED;
        slot.level.store(level.get(), Ordering::Relaxed);
        slot.next_free = 0;
        slot.links.store(0, Ordering::Relaxed);
        self.allocated += 1;
        Some(self.addr(index))
    }

    fn free_table(&mut self, table: Hpa) -> Result<(), FreeError> {
        let index = self.index(table).ok_or(FreeError::NotATable)?;
        if index >= self.next || self.slots[index].state != ALLOCATED {
            return Err(FreeError::NotAllocated);
        }
        let slot = &mut self.slots[index];
        if slot.links.load(Ordering::Acquire) != 0 {
            return Err(FreeError::StillLinked);
        }
        slot.state = FREE;
        slot.level.store(0, Ordering::Relaxed);
        slot.next_free = self.free_head;
        // `index < frames < u32::MAX` (checked in `new`).
        self.free_head = index as u32 + 1;
        self.allocated -= 1;
        Ok(())
    }
}

// SAFETY: `table_ptr` answers `Some` only for the arena's own frames, which are borrowed for
// 'a (the arena's lifetime) as `&[TableFrame]`, 4 KiB aligned by type, outside the arena
// struct, and only ever accessed through atomics.
unsafe impl<H> TableMapping for TableArena<'_, H> {
    #[inline]
    fn table_ptr(&self, table: Hpa) -> Option<NonNull<Table>> {
        let index = self.index(table)?;
        Some(NonNull::from(self.frame(index)))
    }
}

impl<H> TableLinks for TableArena<'_, H> {
    #[inline]
    fn link(&self, table: Hpa, level: Level) {
        if let Some(index) = self.allocated_index(table) {
            let slot = &self.slots[index];
            slot.level.store(level.get(), Ordering::Release);
            slot.links.fetch_add(1, Ordering::AcqRel);
        }
    }

    #[inline]
    fn unlink(&self, table: Hpa) -> Unlinked {
        let Some(index) = self.allocated_index(table) else {
            return Unlinked::Free;
        };
        let links = &self.slots[index].links;
        match links.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1)) {
            Ok(n) if n > 1 => Unlinked::StillLinked,
            _ => Unlinked::Free,
        }
    }

    #[inline]
    fn links(&self, table: Hpa) -> u32 {
        self.allocated_index(table)
            .map_or(0, |index| self.slots[index].links.load(Ordering::Acquire))
    }

    #[inline]
    fn is_table_at(&self, table: Hpa, level: Level) -> bool {
        // Level 0 marks a free frame, and frames past `next` were never handed out.
        self.index(table)
            .filter(|&index| index < self.next)
            .and_then(|index| self.slots.get(index))
            .is_some_and(|slot| slot.level.load(Ordering::Acquire) == level.get())
    }
}

/// A [`TableArena`] shared by several walkers at once (shared-mode walks under a read lock,
/// each CPU with its own handle): `&LockedArena` is the table memory; allocation, freeing
/// and link counts take a spin lock, finding a table takes none.
pub struct LockedArena<'a, H = ()> {
    base: NonNull<TableFrame>,
    frames: usize,
    phys_base: u64,
    inner: crate::sync::Mutex<TableArena<'a, H>>,
}

// SAFETY: the pointer refers to the arena's frames, atomics borrowed for 'a; the rest is
// behind the lock.
unsafe impl<H: Send> Send for LockedArena<'_, H> {}
// SAFETY: as above; the headers are reached only under the lock.
unsafe impl<H: Send> Sync for LockedArena<'_, H> {}

impl<'a, H> LockedArena<'a, H> {
    /// Shares `arena`.
    pub fn new(arena: TableArena<'a, H>) -> Self {
        Self {
            base: arena.base,
            frames: arena.frames,
            phys_base: arena.phys_base,
            inner: crate::sync::Mutex::new(arena),
        }
    }

    /// Tables currently allocated.
    pub fn allocated(&self) -> usize {
        self.inner.lock().allocated()
    }

    /// The arena back.
    pub fn into_inner(self) -> TableArena<'a, H> {
        self.inner.into_inner()
    }

    /// The physical address of the first frame.
    pub fn phys_base(&self) -> Hpa {
        crate::spt::hpa(self.phys_base)
    }

    /// Frames in the arena.
    pub fn capacity(&self) -> usize {
        self.frames
    }

    /// The entries of the frame at `table`, when it is one of the arena's frames (read by
    /// the walk-driven splitter, which needs `alloc`).
    #[inline]
    #[cfg_attr(not(feature = "alloc"), allow(dead_code))]
    pub(crate) fn table(&self, table: Hpa) -> Option<&Table> {
        let index = frame_index(self.phys_base, self.frames, table)?;
        // SAFETY: `index < frames`, inside the arena's slice of frames, which is borrowed
        // for 'a (longer than `&self`) and only ever accessed through atomics.
        let frame = unsafe { &*self.base.as_ptr().add(index) };
        Some(&frame.0)
    }
}

impl<H> fmt::Debug for LockedArena<'_, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockedArena")
            .field("frames", &self.frames)
            .field("phys_base", &self.phys_base)
            .finish_non_exhaustive()
    }
}

impl<H> TableAlloc for &LockedArena<'_, H> {
    fn alloc_table(&mut self, level: Level) -> Option<Hpa> {
        self.inner.lock().alloc_table(level)
    }

    fn alloc_table_to_fill(&mut self, level: Level) -> Option<Hpa> {
        self.inner.lock().alloc_table_to_fill(level)
    }

    fn free_table(&mut self, table: Hpa) -> Result<(), FreeError> {
        self.inner.lock().free_table(table)
    }
}

// SAFETY: `table_ptr` answers `Some` only for frames of the shared arena, borrowed for 'a
// (longer than any `&LockedArena`), outside the reference itself, accessed only atomically.
unsafe impl<H> TableMapping for &LockedArena<'_, H> {
    #[inline]
    fn table_ptr(&self, table: Hpa) -> Option<NonNull<Table>> {
        let index = frame_index(self.phys_base, self.frames, table)?;
        // SAFETY: `index < frames`, inside the arena's slice.
        let frame = unsafe { &*self.base.as_ptr().add(index) };
        Some(NonNull::from(&frame.0))
    }
}

impl<H> TableLinks for &LockedArena<'_, H> {
    fn link(&self, table: Hpa, level: Level) {
        self.inner.lock().link_exclusive(table, level);
    }

    fn unlink(&self, table: Hpa) -> Unlinked {
        self.inner.lock().unlink_exclusive(table)
    }

    fn links(&self, table: Hpa) -> u32 {
        self.inner.lock().links(table)
    }

    fn is_table_at(&self, table: Hpa, level: Level) -> bool {
        self.inner.lock().is_table_at(table, level)
    }
}
