//! Out-of-band frame metadata and the per-order free lists threaded through it.
//!
//! Nothing is ever stored inside a free page: the host discards reported pages and they read
//! back as zero (or whatever its discard leaves). All links live in [`FrameMeta`], one per
//! 4 KiB frame of the allocator's window, indexed by `pfn - base`.

use static_assertions::const_assert;

/// "No frame": the end of a list, or an empty list.
pub(super) const NIL: u32 = u32::MAX;

/// What the frame at this metadata slot is. Only the first frame of a block (its head)
/// carries `Allocated`, `Free`, `FreeReported` or `Isolated`; the other frames of the block
/// are `Tail`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum State {
    /// Not managed: a hole between ranges, or not added yet.
    Hole = 0,
    /// Inside a block whose head is at a lower frame.
    Tail = 1,
    /// Head of a block handed out by `alloc`.
    Allocated = 2,
    /// Head of a block taken off its free list for a report in flight (Linux: isolated page).
    Isolated = 3,
    /// Head of a free block the host has not taken back.
    Free = 4,
    /// Head of a free block the host has discarded (Linux `PageReported`). Differs from
    /// `Free` only in bit 0, so "free, reported or not" is one masked compare.
    FreeReported = 5,
}

impl State {
    /// The free state for a block with this reported flag.
    #[inline]
    pub(super) const fn free(reported: bool) -> Self {
        if reported {
            Self::FreeReported
        } else {
            Self::Free
        }
    }
}

/// Metadata for one 4 KiB frame (Linux `struct page`, the few bits of it a buddy needs).
///
/// The embedder provides a slice of these covering the allocator's window, e.g.
/// `static mut META: [FrameMeta; N] = [FrameMeta::HOLE; N]`, or lets the `alloc` feature
/// build it. Its contents are private; [`Buddy::new`](super::Buddy::new) overwrites them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct FrameMeta {
    /// Next block on the same free list, or [`NIL`].
    pub(super) next: u32,
    /// Previous block on the same free list, or [`NIL`].
    pub(super) prev: u32,
    /// Order of the block this frame heads (meaningful for heads only).
    pub(super) order: u8,
    pub(super) state: State,
}

// The issue and DESIGN.md promise at most 16 bytes of metadata per 4 KiB frame (0.4 %).
const_assert!(core::mem::size_of::<FrameMeta>() <= 16);
const_assert!(core::mem::size_of::<FrameMeta>() == 12);

/// A head's `order` and `state` as one number, as [`FrameMeta::order_state`] reads them: the
/// free path checks both with one compare.
#[inline(always)]
pub(super) const fn order_state(order: u8, state: State) -> u16 {
    u16::from_le_bytes([order, state as u8])
}

/// Set in an [`order_state`] to read `Free` and `FreeReported` alike.
pub(super) const REPORTED_BIT: u16 = 1 << 8;
const_assert!(State::Free as u16 | 1 == State::FreeReported as u16);

impl FrameMeta {
    /// The frame's `order` and `state` (adjacent bytes, so one 16-bit load).
    #[inline(always)]
    pub(super) const fn order_state(&self) -> u16 {
        order_state(self.order, self.state)
    }

    /// An unmanaged frame: the value to initialise a metadata array with.
    pub const HOLE: Self = Self {
        next: NIL,
        prev: NIL,
        order: 0,
        state: State::Hole,
    };

    #[inline]
    pub(super) const fn head(state: State, order: u8) -> Self {
        Self {
            next: NIL,
            prev: NIL,
            order,
            state,
        }
    }
}

impl Default for FrameMeta {
    fn default() -> Self {
        Self::HOLE
    }
}

/// One order's free list and counters (Linux `struct free_area`).
///
/// The list is split in two segments: unreported blocks first, then reported blocks from
/// `first_reported` to `tail`. Freed blocks go to the head; reported blocks go to the tail;
/// a block whose report failed goes to the end of the unreported segment. So `alloc`,
/// taking the head, gets an unreported block whenever the order has one, and `isolate`,
/// also taking from the head, finds unreported blocks without skipping reported ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct FreeList {
    pub(super) head: u32,
    pub(super) tail: u32,
    /// First block of the reported segment, or [`NIL`] when no block is reported.
    pub(super) first_reported: u32,
    /// Blocks on the list.
    pub(super) free: u64,
    /// Blocks on the list that are reported.
    pub(super) reported: u64,
    /// Blocks of this order taken off the list by `isolate` and not yet put back.
    pub(super) isolated: u64,
}

impl FreeList {
    const EMPTY: Self = Self {
        head: NIL,
        tail: NIL,
        first_reported: NIL,
        free: 0,
        reported: 0,
        isolated: 0,
    };
}

/// Which end of the free list a freed block goes to.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Placement {
    /// The head: recently freed, reused first (Linux `add_to_free_list`).
    Hot,
    /// The end of the unreported blocks: new memory, or a block whose report failed, queued
    /// behind the blocks already waiting.
    Cold,
}

/// Free-list slots: one per order up to the largest any allocator may be built with, rounded
/// up to a power of two so that [`slot`] bounds an order with a mask instead of a compare and
/// a branch (on the free and alloc paths, where the order comes from memory and the compiler
/// cannot see it is at most `MAX_ORDER`).
pub(super) const ORDER_SLOTS: usize = 32;
const_assert!(ORDER_SLOTS.is_power_of_two());
const_assert!(ORDER_SLOTS > crate::addr::PageOrder::LIMIT as usize);
const_assert!(ORDER_SLOTS <= u32::BITS as usize); // `FreeArea::nonempty` has a bit per slot

/// The list slot of `order`: the order itself, as every order is at most
/// [`PageOrder::LIMIT`](crate::addr::PageOrder::LIMIT) `< ORDER_SLOTS`.
#[inline(always)]
pub(super) const fn slot(order: usize) -> usize {
    order & (ORDER_SLOTS - 1)
}

/// All free lists plus a bitmap of the non-empty ones, so the smallest usable order is one
/// `trailing_zeros` away. The metadata slice is passed in by the caller (a separate borrow,
/// which lets the compiler keep its pointer and length in registers).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct FreeArea {
    pub(super) lists: [FreeList; ORDER_SLOTS],
    /// Bit `k` is set when `lists[k]` is not empty.
    pub(super) nonempty: u32,
}

impl FreeArea {
    pub(super) const EMPTY: Self = Self {
        lists: [FreeList::EMPTY; ORDER_SLOTS],
        nonempty: 0,
    };

    /// Writes the head of an unreported free block and links it at the head of its list.
    #[inline(always)]
    pub(super) fn link_head(&mut self, meta: &mut [FrameMeta], order: usize, idx: u32) {
        self.push_head(meta, order, idx as usize);
        meta[idx as usize].order = order as u8;
    }

    /// `link_head` for an allocated head of `order` that is being freed: its `order` field
    /// already says `order`, so only the links and the state are written. `idx` is a
    /// `usize` the caller has checked against `meta`, so its bounds check goes.
    #[inline(always)]
    pub(super) fn link_freed(&mut self, meta: &mut [FrameMeta], order: usize, idx: usize) {
        self.push_head(meta, order, idx);
    }

    /// `link_head` without writing the head's `order`. `idx` is a metadata index, so below
    /// `NIL` (windows are shorter) and a valid `u32` link.
    #[inline(always)]
    fn push_head(&mut self, meta: &mut [FrameMeta], order: usize, idx: usize) {
        let link = idx as u32;
        let list = &mut self.lists[slot(order)];
        let old = list.head;
        list.head = link;
        list.free += 1;
        // `NIL` is never a metadata index (windows are shorter), so the bounds check is the
        // empty-list check.
        if let Some(m) = meta.get_mut(old as usize) {
            m.prev = link;
        } else {
            list.tail = link;
            self.nonempty |= 1 << order;
        }
        let m = &mut meta[idx];
        m.next = old;
        m.prev = NIL;
        m.state = State::Free;
    }

    /// Writes the head of a free block and links it at the tail; a reported block there
    /// starts the reported segment if there is none yet.
    #[inline]
    pub(super) fn link_tail(
        &mut self,
        meta: &mut [FrameMeta],
        order: usize,
        idx: u32,
        reported: bool,
    ) {
        let list = &mut self.lists[slot(order)];
        let old = list.tail;
        list.tail = idx;
        list.free += 1;
        if reported {
            list.reported += 1;
            if list.first_reported == NIL {
                list.first_reported = idx;
            }
        }
        if old == NIL {
            list.head = idx;
            self.nonempty |= 1 << order;
        } else {
            meta[old as usize].next = idx;
        }
        meta[idx as usize] = FrameMeta {
            next: NIL,
            prev: old,
            order: order as u8,
            state: State::free(reported),
        };
    }

    /// Writes the head of an unreported free block and links it at the end of the
    /// unreported segment.
    pub(super) fn link_before_reported(&mut self, meta: &mut [FrameMeta], order: usize, idx: u32) {
        let list = &mut self.lists[slot(order)];
        let at = list.first_reported;
        if at == NIL {
            return self.link_tail(meta, order, idx, false);
        }
        let prev = meta[at as usize].prev;
        meta[at as usize].prev = idx;
        list.free += 1;
        if prev == NIL {
            list.head = idx;
        } else {
            meta[prev as usize].next = idx;
        }
        meta[idx as usize] = FrameMeta {
            next: at,
            prev,
            order: order as u8,
            state: State::Free,
        };
    }

    /// Writes the head of a free block and links it where it belongs: reported blocks at the
    /// tail, others at the head (`Hot`) or at the end of the unreported segment (`Cold`).
    #[inline(always)]
    pub(super) fn link(
        &mut self,
        meta: &mut [FrameMeta],
        order: usize,
        idx: u32,
        reported: bool,
        placement: Placement,
    ) {
        if reported {
            self.link_tail(meta, order, idx, true);
        } else if placement == Placement::Hot {
            self.link_head(meta, order, idx);
        } else {
            self.link_before_reported(meta, order, idx);
        }
    }

    /// Takes a block off its list.
    #[inline(always)]
    pub(super) fn unlink(
        &mut self,
        meta: &mut [FrameMeta],
        order: usize,
        idx: u32,
        reported: bool,
    ) {
        let FrameMeta { next, prev, .. } = meta[idx as usize];
        let list = &mut self.lists[slot(order)];
        // As in `link_head`: a link is `NIL` exactly when it is no index.
        if let Some(p) = meta.get_mut(prev as usize) {
            p.next = next;
        } else {
            list.head = next;
            if next == NIL {
                self.nonempty &= !(1 << order);
            }
        }
        if let Some(n) = meta.get_mut(next as usize) {
            n.prev = prev;
        } else {
            list.tail = prev;
        }
        if reported {
            list.reported -= 1;
            if list.first_reported == idx {
                list.first_reported = next;
            }
        }
        list.free -= 1;
    }

    /// Takes the head `idx` of list `order` off it, given its `next` link and whether it is
    /// reported: `unlink` for the one block whose `prev` is known to be [`NIL`].
    #[inline(always)]
    pub(super) fn pop_head(
        &mut self,
        meta: &mut [FrameMeta],
        order: usize,
        idx: u32,
        next: u32,
        reported: bool,
    ) {
        let list = &mut self.lists[slot(order)];
        list.head = next;
        list.free -= 1;
        if reported {
            list.reported -= 1;
            if list.first_reported == idx {
                list.first_reported = next;
            }
        }
        // As in `link_head`: `next` is `NIL` exactly when it is no index.
        if let Some(m) = meta.get_mut(next as usize) {
            m.prev = NIL;
        } else {
            list.tail = NIL;
            self.nonempty &= !(1 << order);
        }
    }

    /// Sums `count(list) << order` over the orders.
    pub(super) fn frames(&self, count: impl Fn(&FreeList) -> u64) -> u64 {
        self.lists
            .iter()
            .enumerate()
            .map(|(order, l)| count(l) << order)
            .sum()
    }
}
