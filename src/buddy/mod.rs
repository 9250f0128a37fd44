//! A buddy page allocator whose free blocks know whether the host took them back.
//!
//! # The idea
//! A guest that reports free memory to its host (virtio PAGE_REPORTING; Tsirkin,
//! "kvm: Add guest side support for free memory hints", 2019, and Duyck's "KVM: Guest Free Page
//! Hinting" v9 and "aerating memory via hinting", 2019) must remember, per free block, whether
//! the host has already discarded it: reporting a block twice wastes a hypercall, and handing
//! out a discarded block costs the host a fault and a zero-fill that a still-backed block would
//! not. Linux keeps this as `PageReported` on the head page of a free block
//! (`mm/page_reporting.c`); this allocator does the same with its own out-of-band metadata.
//!
//! - **Metadata is out of band**: one 12-byte [`FrameMeta`] per 4 KiB frame of a window
//!   `[base, base + meta.len())`, in a slice the embedder provides (or the `alloc` feature
//!   builds). The allocator manages any number of disjoint ranges inside the window, with
//!   holes between them. Nothing is stored inside free pages, which the host may zero.
//! - **Blocks are naturally aligned in physical frame numbers**: a block of order `n` starts
//!   on a frame number that is a multiple of `2^n`, whatever the window's base, so an
//!   order-9 block is exactly one 2 MiB host huge page.
//! - **Free lists** per order 0..=`MAX_ORDER` are doubly linked through the metadata by
//!   32-bit frame index (Linux `free_area[order].free_list`), so alloc, free, and each merge
//!   step are O(1). The buddy of the block at `pfn` is at `pfn ^ (1 << order)`.
//! - **Block states** (on the head frame): `Allocated`, `Free { reported }` and `Isolated`
//!   (off every list while a report is in flight). Each list holds its unreported blocks
//!   first and its reported blocks at the tail; `alloc` takes the head, so it gets an
//!   unreported block whenever the order has one, without searching and without splitting a
//!   larger block to avoid a reported one. It says in [`Block::reported`] whether the block
//!   it returns was reported: the contents of such a block are whatever the host gives back
//!   for discarded memory (zeroes under `MADV_DONTNEED`), so an embedder that knows its host
//!   may skip zeroing it.
//! - **Split and merge** (Linux `expand` and `__free_one_page`): the halves of a split keep
//!   the parent's reported flag; a merged block is reported only if both halves were. An
//!   isolated block never merges; it merges when it is put back.
//! - **Reporting API** for the hint batcher: [`Buddy::isolate`] takes up to N unreported free
//!   blocks of an order from the list head (Linux `page_reporting_cycle` +
//!   `__isolate_free_page`), [`Buddy::put_back`] returns one, reported (to the tail) or not (to
//!   the end of the unreported blocks, so a failed report is retried last) (Linux
//!   `__putback_isolated_page`). [`Buddy::reset_reported`] forgets every reported flag, as
//!   needed after live migration. The hint batcher (`crate::hint::guest`) uses the cold-end pair
//!   instead: [`Buddy::isolate_cold`] takes the blocks freed longest ago (Duyck, "KVM: Guest
//!   Free Page Hinting" v9, 2019: hint cold pages, not the ones `alloc` reuses next) and
//!   [`Buddy::put_back_hot`] returns a failed block to the head, so the unreported blocks form
//!   a ring the reporter walks from its cold end, each pass starting where the previous one
//!   stopped. [`Buddy::free_merged`] says which order a freed block merged into, for the
//!   reporter's `on_free` threshold; [`Buddy::free_notify`] says it only when that order
//!   reaches the one set by [`Buddy::set_notify_order`] (Linux `__free_one_page` calling
//!   `page_reporting_notify_free`), a check folded into the free path's own so that a free
//!   that merges nothing below that order costs what a plain `free` does.
//! - **Range API** for the THP-order balloon: [`Buddy::free_frames_within`] counts the free
//!   frames of one naturally aligned range (a host huge page) and [`Buddy::alloc_within`]
//!   allocates inside it, so a balloon can take small blocks from a host page it already
//!   broke before it breaks another.
//!
//! Every operation validates its input and returns a typed error that leaves the allocator
//! unchanged; nothing panics on embedder or guest input.
//!
//! # Concurrency
//! [`Buddy`] is a plain `&mut self` structure. [`LockedBuddy`] wraps it in a spin
//! lock (the one from the crate's `sync` shim, which loom model-checks) for allocators shared
//! between CPUs; the reporter holds the lock only to isolate and to put back, never while the
//! host works.

mod check;
mod error;
mod locked;
mod meta;
mod ops;
#[cfg(test)]
mod tests;
mod within;

use core::ops::DerefMut;

use crate::addr::{PageOrder, Pfn};
pub use error::{
    AddRangeError, AllocError, FreeError, InvariantViolation, IsolateError, NewError, PutBackError,
};
pub use locked::{LockedBuddy, LockedBuddyGuard};
pub use meta::FrameMeta;
use meta::{FreeArea, NIL, Placement, State};

/// The default largest order: 4 MiB blocks, like Linux's `MAX_PAGE_ORDER` on x86-64.
pub const DEFAULT_MAX_ORDER: usize = 10;

/// A block handed out by [`Buddy::alloc`] or taken by [`Buddy::isolate`].
///
/// `repr(C)` with the `bool` first puts the niche that `Result<Block, _>` and `Option<Block>`
/// use at offset 0. With Rust's default layout the niche sat at byte 9, and rustc 1.95 turned
/// `alloc(..).ok()` into overlapping byte stores and reloads through the stack: store
/// forwarding failed and an order-0 alloc + free took 19.4 ns instead of 5.4 ns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct Block {
    /// Whether the host had taken the block back (reported and discarded) while it was free.
    /// Its contents are then whatever the host's discard leaves, typically zeroes.
    pub reported: bool,
    /// The block holds `2^order` frames.
    pub order: PageOrder,
    /// The first frame of the block, a multiple of `2^order`.
    pub pfn: Pfn,
}

/// The state of a block, as [`Buddy::block_info`] tells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BlockState {
    /// Handed out by `alloc`.
    Allocated,
    /// On a free list.
    Free {
        /// Whether the host has taken it back.
        reported: bool,
    },
    /// Off the free lists for a report in flight.
    Isolated,
}

/// The block that holds a frame: where it starts, its order and its state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlockInfo {
    /// The first frame of the block.
    pub pfn: Pfn,
    /// The order of the block.
    pub order: PageOrder,
    /// What the block is used for.
    pub state: BlockState,
}

/// Counters of one order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct OrderStats {
    /// Blocks on the free list (reported or not).
    pub free: u64,
    /// Of those, blocks the host has taken back.
    pub reported: u64,
    /// Blocks taken off the list for a report in flight.
    pub isolated: u64,
}

/// The buddy allocator over a window of frames (Linux: one zone's `free_area[]`).
///
/// `S` is the metadata storage (`&'static mut [FrameMeta]`, `Box<[FrameMeta]>`, ...);
/// `MAX_ORDER` is the largest block order, at most [`PageOrder::LIMIT`].
#[derive(Clone)]
pub struct Buddy<S, const MAX_ORDER: usize = DEFAULT_MAX_ORDER> {
    meta: S,
    /// Frame number of `meta[0]`.
    base: u64,
    area: FreeArea,
    managed_frames: u64,
    /// [`free_notify`](Self::free_notify) reports a free that ends in a block of this order
    /// or larger (Linux `page_reporting_order`); [`NO_NOTIFY`] when nobody listens.
    notify_order: u8,
    /// `min(notify_order, MAX_ORDER)`: a free below this order that merges nothing is the
    /// fast path of `free_notify`, which then needs no check of its own.
    quiet_below: u8,
}

/// `notify_order` when no reporter is registered: above every order.
const NO_NOTIFY: u8 = u8::MAX;

impl<S: DerefMut<Target = [FrameMeta]>, const MAX_ORDER: usize> Buddy<S, MAX_ORDER> {
    /// An allocator whose metadata `meta[i]` describes frame `base + i`. It manages nothing
    /// until [`add_range`](Self::add_range) gives it memory. Overwrites all of `meta`.
    pub fn new(mut meta: S, base: Pfn) -> Result<Self, NewError> {
        const {
            assert!(
                MAX_ORDER <= PageOrder::LIMIT as usize,
                "MAX_ORDER above PageOrder::LIMIT"
            )
        };
        Self::check_window(base, meta.len() as u64)?;
        meta.fill(FrameMeta::HOLE);
        Ok(Self {
            meta,
            base: base.get(),
            area: FreeArea::EMPTY,
            managed_frames: 0,
            notify_order: NO_NOTIFY,
            quiet_below: MAX_ORDER as u8,
        })
    }

    /// Whether a window of `frames` frames from `base` is one [`new`](Self::new) accepts.
    fn check_window(base: Pfn, frames: u64) -> Result<(), NewError> {
        if frames == 0 {
            return Err(NewError::Empty);
        }
        if frames >= u64::from(NIL) {
            return Err(NewError::TooManyFrames);
        }
        if base.checked_add(frames - 1).is_none() {
            return Err(NewError::OutOfRange);
        }
        Ok(())
    }

    /// Hands the frames `[start, start + frames)` to the allocator as free, unreported memory.
    ///
    /// The range must lie inside the window and must not overlap memory already managed; it
    /// may touch it, and then merges with it. It is carved into the largest naturally
    /// aligned blocks that fit.
    pub fn add_range(&mut self, start: Pfn, frames: u64) -> Result<(), AddRangeError> {
        self.add_range_as(start, frames, false)
    }

    /// Like [`add_range`](Self::add_range), but the memory starts out *reported*: for RAM the
    /// host has never populated (a freshly booted guest's untouched memory), so the first
    /// reporting pass does not hand it to the host again.
    pub fn add_range_reported(&mut self, start: Pfn, frames: u64) -> Result<(), AddRangeError> {
        self.add_range_as(start, frames, true)
    }

    fn add_range_as(
        &mut self,
        start: Pfn,
        frames: u64,
        reported: bool,
    ) -> Result<(), AddRangeError> {
        if frames == 0 {
            return Err(AddRangeError::Empty);
        }
        let first = start
            .get()
            .checked_sub(self.base)
            .ok_or(AddRangeError::OutsideWindow)?;
        let end = first
            .checked_add(frames)
            .ok_or(AddRangeError::OutsideWindow)?;
        let (first, end) = match (usize::try_from(first), usize::try_from(end)) {
            (Ok(first), Ok(end)) => (first, end),
            _ => return Err(AddRangeError::OutsideWindow),
        };
        let window = self
            .meta
            .get_mut(first..end)
            .ok_or(AddRangeError::OutsideWindow)?;
        if window.iter().any(|m| m.state != State::Hole) {
            return Err(AddRangeError::Overlap);
        }
        for m in window.iter_mut() {
            m.state = State::Tail;
        }
        self.managed_frames += frames;
        let (mut pfn, end_pfn) = (start.get(), start.get() + frames);
        while pfn < end_pfn {
            let align = if pfn == 0 {
                u32::MAX
            } else {
                pfn.trailing_zeros()
            };
            let fit = (end_pfn - pfn).ilog2();
            let order = align.min(fit).min(MAX_ORDER as u32) as usize;
            // Cold: new memory queues behind what is already free, in ascending order.
            self.release((pfn - self.base) as u32, order, reported, Placement::Cold);
            pfn += 1 << order;
        }
        Ok(())
    }

    /// Counters of one order (all zero above `MAX_ORDER`).
    pub fn order_stats(&self, order: PageOrder) -> OrderStats {
        match self.area.lists.get(order.get() as usize) {
            Some(l) if order.get() as usize <= MAX_ORDER => OrderStats {
                free: l.free,
                reported: l.reported,
                isolated: l.isolated,
            },
            _ => OrderStats::default(),
        }
    }

    /// The largest order this allocator hands out.
    pub const fn max_order(&self) -> PageOrder {
        PageOrder::from_raw(MAX_ORDER as u8)
    }

    /// The first frame of the metadata window.
    pub fn base(&self) -> Pfn {
        Pfn::from_raw(self.base)
    }

    /// The number of frames the metadata window covers.
    pub fn window_frames(&self) -> u64 {
        self.meta.len() as u64
    }

    /// A number telling this allocator from every other one alive at the same time: the
    /// address of its metadata, which it owns or borrows exclusively (so no two live
    /// allocators share it) and which does not move when the allocator does. A pipeline or
    /// a balloon keeps it to refuse an allocator other than the one its blocks came from.
    pub(crate) fn storage_key(&self) -> usize {
        self.meta.as_ptr().addr()
    }

    /// Frames given to the allocator by `add_range`.
    pub fn managed_frames(&self) -> u64 {
        self.managed_frames
    }

    /// Frames in free blocks on the lists, reported or not. O(MAX_ORDER).
    pub fn free_frames(&self) -> u64 {
        self.area.frames(|l| l.free)
    }

    /// Frames in free blocks the host has taken back. O(MAX_ORDER).
    pub fn reported_frames(&self) -> u64 {
        self.area.frames(|l| l.reported)
    }

    /// Frames in isolated blocks. O(MAX_ORDER).
    pub fn isolated_frames(&self) -> u64 {
        self.area.frames(|l| l.isolated)
    }

    /// Frames in allocated blocks. O(MAX_ORDER).
    pub fn allocated_frames(&self) -> u64 {
        self.managed_frames - self.area.frames(|l| l.free + l.isolated)
    }

    /// Sets the order from which [`free_notify`](Self::free_notify) reports a free (Linux
    /// `page_reporting_register` setting `page_reporting_order`); `None` turns it off, as
    /// a new allocator starts. A free reporter sets it with its `register`.
    pub fn set_notify_order(&mut self, order: Option<PageOrder>) {
        self.notify_order = order.map_or(NO_NOTIFY, PageOrder::get);
        self.quiet_below = self.notify_order.min(MAX_ORDER as u8);
    }

    /// The order set by [`set_notify_order`](Self::set_notify_order).
    pub fn notify_order(&self) -> Option<PageOrder> {
        (self.notify_order != NO_NOTIFY).then(|| PageOrder::from_raw(self.notify_order))
    }

    /// Gives the metadata storage back.
    pub fn into_meta(self) -> S {
        self.meta
    }

    /// Whether two allocators are in exactly the same state (for "an error changes nothing").
    #[cfg(any(test, fuzzing, feature = "testing"))]
    pub(crate) fn same_state(&self, other: &Self) -> bool {
        *self.meta == *other.meta
            && self.base == other.base
            && self.area == other.area
            && self.managed_frames == other.managed_frames
            && self.notify_order == other.notify_order
    }
}

#[cfg(feature = "alloc")]
impl<const MAX_ORDER: usize> Buddy<alloc::boxed::Box<[FrameMeta]>, MAX_ORDER> {
    /// An allocator whose metadata for the window `[base, base + frames)` is allocated on the
    /// heap, 12 bytes per frame. Fails with [`WithWindowError::NoMemory`] when the heap is
    /// short, or as [`Buddy::new`] does; a window `new` would refuse is refused before the
    /// heap is asked for anything.
    pub fn with_window(base: Pfn, frames: u64) -> Result<Self, WithWindowError> {
        Self::check_window(base, frames).map_err(WithWindowError::New)?;
        let len =
            usize::try_from(frames).map_err(|_| WithWindowError::New(NewError::TooManyFrames))?;
        let mut meta = alloc::vec::Vec::new();
        meta.try_reserve_exact(len)
            .map_err(|_| WithWindowError::NoMemory)?;
        meta.resize(len, FrameMeta::HOLE);
        Self::new(meta.into_boxed_slice(), base).map_err(WithWindowError::New)
    }
}

/// Why [`Buddy::with_window`] failed.
#[cfg(feature = "alloc")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum WithWindowError {
    /// The heap could not hold the metadata.
    NoMemory,
    /// The window itself was refused.
    New(NewError),
}

#[cfg(feature = "alloc")]
impl core::fmt::Display for WithWindowError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NoMemory => f.write_str("no heap memory for the frame metadata"),
            Self::New(e) => e.fmt(f),
        }
    }
}

#[cfg(feature = "alloc")]
impl core::error::Error for WithWindowError {}

impl<S: DerefMut<Target = [FrameMeta]>, const MAX_ORDER: usize> core::fmt::Debug
    for Buddy<S, MAX_ORDER>
{
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Buddy")
            .field("base", &self.base)
            .field("window_frames", &self.meta.len())
            .field("max_order", &MAX_ORDER)
            .field("managed_frames", &self.managed_frames)
            .field("free_frames", &self.free_frames())
            .field("reported_frames", &self.reported_frames())
            .field("isolated_frames", &self.isolated_frames())
            .finish_non_exhaustive()
    }
}

// Returned by value on every allocation: two registers.
static_assertions::const_assert_eq!(core::mem::size_of::<Block>(), 16);
static_assertions::const_assert_eq!(core::mem::size_of::<Result<Block, AllocError>>(), 16);
