//! Table memory: where page tables live, and the only raw-pointer code of `spt`.
//!
//! The walker reaches a table through its physical address; the embedder says how. This is
//! KVM arm64's `kvm_pgtable_mm_ops` (`zalloc_page`, `put_page`, `phys_to_virt`),
//! aarch64-paging's `Translation` and the x86_64 crate's `PageTableFrameMapping`, as one
//! `unsafe trait`, [`TableMemory`]. Everything else in `spt` sees a table as a safe
//! `&[AtomicU64; 512]` handed out by [`Tables`], the wrapper every walk and visitor gets.
//!
//! [`TableArena`] implements the trait over a slice of 4 KiB aligned [`TableFrame`]s the
//! caller provides (a `Vec` in tests, a region of guest RAM for a guest's own page tables, a
//! static pool in a kernel), with a base physical address so table addresses are whatever
//! the hardware should see.
//!
//! Every access to table memory is atomic: hardware walkers and other CPUs read entries
//! while they change, and a table freed after a TLB flush may still be read by a stale
//! walker until then. Under `cfg(loom)` the atomics are loom's.
#![allow(unsafe_code)]

use core::fmt;
use core::marker::PhantomData;
use core::ptr::NonNull;

use static_assertions::const_assert_eq;

use crate::addr::{Hpa, PAGE_SIZE};
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

/// Where page tables come from and how the walker reaches them (KVM arm64
/// `kvm_pgtable_mm_ops`, aarch64-paging `Translation`).
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
/// whose memory it cannot vouch for. Nothing else is needed for memory safety; what
/// follows is needed for correct page tables: `alloc_table` returns a 4 KiB aligned
/// address for which `table_ptr` answers `Some`, whose 512 entries read zero, and which no
/// other live table overlaps.
pub unsafe trait TableMemory {
    /// Allocates a zeroed table (KVM `mm_ops->zalloc_page`), or `None` when out of memory.
    fn alloc_table(&mut self) -> Option<Hpa>;

    /// Takes back a table `alloc_table` returned (KVM `mm_ops->put_page`). The crate calls
    /// it only for tables no page table reaches any more and, where hardware may have
    /// cached them, only after the TLB flush.
    fn free_table(&mut self, table: Hpa);

    /// Where the table at `table` is, or `None` if this memory does not hold that address
    /// (KVM `mm_ops->phys_to_virt`).
    fn table_ptr(&self, table: Hpa) -> Option<NonNull<Table>>;
}

/// The table memory of one walk, as visitors see it: allocate, free and read tables, but
/// never replace or drop the memory itself while the walker holds references into it.
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
    /// `None` and `free` does nothing.
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

    /// Allocates a zeroed table; `None` when the memory is exhausted (or read-only).
    #[inline]
    pub fn alloc(&mut self) -> Option<Hpa> {
        if !self.writable {
            return None;
        }
        // SAFETY: `writable` is set only by `new`, which took `&'m mut M`, and `&mut self`
        // makes this the only reference derived from it right now; the references `table`
        // handed out point outside `*M` (the trait's contract), so they stay valid.
        unsafe { self.mem.as_mut() }.alloc_table()
    }

    /// Gives a table back. Only for tables no page table reaches and no TLB may hold.
    #[inline]
    pub fn free(&mut self, table: Hpa) {
        if self.writable {
            // SAFETY: as in `alloc`.
            unsafe { self.mem.as_mut() }.free_table(table);
        }
    }

    /// The table at `table`, or `None` if the memory does not hold that address.
    #[inline]
    pub fn table(&self, table: Hpa) -> Option<&'m Table> {
        let ptr = self.memory().table_ptr(table)?;
        // SAFETY: by the `TableMemory` contract `ptr` is aligned and valid for atomic
        // access for as long as the memory is alive, and is not inside `*M`. The memory is
        // borrowed for 'm, and `Tables` never lets anyone move or drop it, so it outlives
        // the returned reference. All access to it is atomic, so sharing is fine.
        Some(unsafe { ptr.as_ref() })
    }
}

impl<M: TableMemory + ?Sized> fmt::Debug for Tables<'_, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tables")
            .field("writable", &self.writable)
            .finish_non_exhaustive()
    }
}

/// Why a [`TableArena`] could not be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ArenaError {
    /// The base physical address is not 4 KiB aligned.
    Unaligned,
    /// The frames would reach beyond the 52-bit physical address space.
    OutOfRange,
}

impl fmt::Display for ArenaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Unaligned => "arena base physical address is not 4 KiB aligned",
            Self::OutOfRange => "arena reaches beyond the physical address space",
        })
    }
}

impl core::error::Error for ArenaError {}

/// Table memory over caller-provided frames: frame `i` has physical address
/// `phys_base + i * 4096`. Allocation bumps through never-used frames, then reuses freed
/// ones (a free list threaded through entry 0 of each free frame). Every free frame is
/// zero apart from that link, so allocation never clears a whole table.
pub struct TableArena<'a> {
    base: NonNull<TableFrame>,
    frames: usize,
    phys_base: u64,
    /// Frames `next..frames` were never handed out.
    next: usize,
    /// Index + 1 of the first freed frame, 0 when none.
    free_head: usize,
    allocated: usize,
    _frames: PhantomData<&'a [TableFrame]>,
}

// SAFETY: the arena only refers to memory it borrows for 'a as `&[TableFrame]`, made of
// atomics, which may be shared and sent between threads.
unsafe impl Send for TableArena<'_> {}
// SAFETY: as above; `&TableArena` only reads the bounds and hands out pointers.
unsafe impl Sync for TableArena<'_> {}

impl<'a> TableArena<'a> {
    /// An arena over `frames`, frame `i` at physical address `phys_base + i * 4096`.
    /// Zeroes every frame.
    pub fn new(frames: &'a [TableFrame], phys_base: Hpa) -> Result<Self, ArenaError> {
        Self::check(frames.len(), phys_base)?;
        for frame in frames {
            for entry in &frame.0 {
                entry.store(0, Ordering::Relaxed);
            }
        }
        Ok(Self {
            base: NonNull::from(frames).cast(),
            frames: frames.len(),
            phys_base: phys_base.get(),
            next: 0,
            free_head: 0,
            allocated: 0,
            _frames: PhantomData,
        })
    }

    /// An arena over `frames` frames at `ptr`, frame `i` at physical address
    /// `phys_base + i * 4096`, for memory that is not a Rust slice (guest RAM mapped with
    /// `mmap`). Zeroes every frame.
    ///
    /// # Safety
    /// `ptr` must be valid for reads and writes of `frames * 4096` bytes for `'a`, and
    /// nothing else may access that memory during `'a` other than atomically (hardware
    /// page walks, and a guest that does not write into it while the host runs, are fine).
    pub unsafe fn from_raw_parts(
        ptr: NonNull<TableFrame>,
        frames: usize,
        phys_base: Hpa,
    ) -> Result<Self, ArenaError> {
        // SAFETY: the caller promises `ptr` is valid for `frames` frames for 'a with only
        // atomic access; `TableFrame` is plain atomics with no invalid bit patterns, and
        // `NonNull<TableFrame>` is aligned by its type.
        let slice: &'a [TableFrame] = unsafe { core::slice::from_raw_parts(ptr.as_ptr(), frames) };
        Self::new(slice, phys_base)
    }

    fn check(frames: usize, phys_base: Hpa) -> Result<(), ArenaError> {
        if phys_base.page_offset() != 0 {
            return Err(ArenaError::Unaligned);
        }
        let bytes = (frames as u64)
            .checked_mul(PAGE_SIZE)
            .ok_or(ArenaError::OutOfRange)?;
        phys_base
            .checked_add(bytes)
            .map(|_| ())
            .ok_or(ArenaError::OutOfRange)
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
        super::hpa(self.phys_base)
    }

    fn frame(&self, index: usize) -> &Table {
        // SAFETY: callers pass `index < self.frames`; the memory is a `[TableFrame]` of
        // `frames` elements borrowed for 'a, which outlives `&self`.
        unsafe { &(*self.base.as_ptr().add(index)).0 }
    }

    fn index(&self, table: Hpa) -> Option<usize> {
        let offset = table.get().checked_sub(self.phys_base)?;
        if offset % PAGE_SIZE != 0 {
            return None;
        }
        let index = usize::try_from(offset / PAGE_SIZE).ok()?;
        (index < self.frames).then_some(index)
    }

    fn addr(&self, index: usize) -> Hpa {
        super::hpa(self.phys_base + index as u64 * PAGE_SIZE)
    }
}

impl fmt::Debug for TableArena<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TableArena")
            .field("frames", &self.frames)
            .field("phys_base", &self.phys_base)
            .field("allocated", &self.allocated)
            .finish_non_exhaustive()
    }
}

// SAFETY: `table_ptr` answers `Some` only for the arena's own frames, which are borrowed for
// 'a (the arena's lifetime) as `&[TableFrame]`, 4 KiB aligned by type, outside the arena
// struct, and only ever accessed through atomics.
unsafe impl TableMemory for TableArena<'_> {
    fn alloc_table(&mut self) -> Option<Hpa> {
        let index = if self.free_head != 0 {
            let index = self.free_head - 1;
            let frame = self.frame(index);
            let link = frame[0].swap(0, Ordering::Relaxed);
            self.free_head = usize::try_from(link).unwrap_or(0);
            index
        } else if self.next < self.frames {
            self.next += 1;
            self.next - 1
        } else {
            return None;
        };
        self.allocated += 1;
        Some(self.addr(index))
    }

    fn free_table(&mut self, table: Hpa) {
        let Some(index) = self.index(table) else {
            return;
        };
        let frame = self.frame(index);
        for entry in &frame[1..] {
            entry.store(0, Ordering::Relaxed);
        }
        frame[0].store(self.free_head as u64, Ordering::Relaxed);
        self.free_head = index + 1;
        self.allocated = self.allocated.saturating_sub(1);
    }

    #[inline]
    fn table_ptr(&self, table: Hpa) -> Option<NonNull<Table>> {
        let index = self.index(table)?;
        Some(NonNull::from(self.frame(index)))
    }
}
