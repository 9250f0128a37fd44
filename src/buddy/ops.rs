//! Allocation, freeing, isolation and put-back: the O(1)-per-order paths.

use core::ops::DerefMut;

use arrayvec::ArrayVec;

use super::meta::{NIL, REPORTED_BIT, State, order_state, slot};
use super::{
    AllocError, Block, BlockInfo, BlockState, Buddy, FrameMeta, FreeError, IsolateError, Placement,
    PutBackError,
};
use crate::addr::{PageOrder, Pfn};

/// The common failures of checking a block's address.
enum Locate {
    OrderTooLarge,
    Unaligned,
    OutOfRange,
}

/// A block head found in the metadata.
#[derive(Clone, Copy)]
pub(super) struct HeadInfo {
    pub(super) idx: u32,
    pub(super) order: u8,
    pub(super) state: State,
}

impl<S: DerefMut<Target = [FrameMeta]>, const MAX_ORDER: usize> Buddy<S, MAX_ORDER> {
    /// Allocates a block of `order` (Linux `__rmqueue_smallest`): the head of the smallest
    /// non-empty list at or above `order`, split down to size.
    #[inline]
    pub fn alloc(&mut self, order: PageOrder) -> Result<Block, AllocError> {
        let o = order.get() as usize;
        if o > MAX_ORDER {
            return Err(AllocError::OrderTooLarge);
        }
        let above = self.area.nonempty >> o;
        if above == 0 {
            return Err(AllocError::OutOfMemory);
        }
        Ok(self.take(o + above.trailing_zeros() as usize, o))
    }

    /// Allocates the largest block available that is not above `order` (an order above
    /// `MAX_ORDER` is read as `MAX_ORDER`): a block of `order` if one can be had, otherwise
    /// a whole block of the largest smaller order that has one. For a balloon that falls back
    /// order by order when large blocks run out.
    pub fn alloc_at_most(&mut self, order: PageOrder) -> Result<Block, AllocError> {
        let o = (order.get() as usize).min(MAX_ORDER);
        let nonempty = self.area.nonempty;
        if nonempty >> o != 0 {
            return Ok(self.take(o + (nonempty >> o).trailing_zeros() as usize, o));
        }
        let below = nonempty & ((1 << o) - 1);
        if below == 0 {
            return Err(AllocError::OutOfMemory);
        }
        let k = below.ilog2() as usize;
        Ok(self.take(k, k))
    }

    /// Frees a block `alloc` handed out, merging it with free buddies (Linux
    /// `__free_one_page`). The freed block is unreported and goes to the head of its list.
    #[inline]
    pub fn free(&mut self, pfn: Pfn, order: PageOrder) -> Result<(), FreeError> {
        self.free_inner(pfn, order).map(|_| ())
    }

    /// [`free`](Self::free), returning the order of the free block the freed one became part
    /// of after merging with its buddies. Linux `__free_one_page` hands this merged order to
    /// `page_reporting_notify_free`: freeing the last 4 KiB page of a 2 MiB region makes an
    /// order-9 block, which is what a reporter's `on_free` needs to hear about.
    #[inline]
    pub fn free_merged(&mut self, pfn: Pfn, order: PageOrder) -> Result<PageOrder, FreeError> {
        self.free_inner(pfn, order)
            .map(|merged| PageOrder::from_raw(merged as u8))
    }

    /// The body of `free` and `free_merged`, inlined into each so `free` stays as small as
    /// it was before it had to say the merged order.
    #[inline(always)]
    fn free_inner(&mut self, pfn: Pfn, order: PageOrder) -> Result<usize, FreeError> {
        let Some(idx) = self.allocated_head(pfn, order) else {
            return Err(self.free_error(pfn, order));
        };
        let o = order.get() as usize;
        // `release`, with the head's order already right when nothing merges. An index
        // into the metadata is below `NIL` (`new` refuses longer windows): it fits a `u32`.
        if o < MAX_ORDER && self.free_buddy(idx as u64, o).is_some() {
            return Ok(self.merge(idx as u32, o, false, Placement::Hot));
        }
        self.area.link_freed(&mut self.meta, o, idx);
        Ok(o)
    }

    /// The index of `pfn` if it is the head of an allocated block of `order`: the one check
    /// a free needs. The allocator's invariants (`check_invariants`) make every allocated
    /// head of order `o` a block of order at most `MAX_ORDER`, naturally aligned and inside
    /// the window, so the checks of `locate` (order, alignment, range) hold for it already
    /// and are left to [`free_error`](Self::free_error), which says what was wrong otherwise.
    #[inline(always)]
    fn allocated_head(&self, pfn: Pfn, order: PageOrder) -> Option<usize> {
        // A `usize` index, so the compiler sees that the free path's later `meta[idx]`s are
        // in bounds (`try_from` costs nothing where `usize` has 64 bits, and keeps a 32-bit
        // target from truncating a distant frame onto one in the window).
        let idx = usize::try_from(pfn.get().wrapping_sub(self.base)).ok()?;
        let m = self.meta.get(idx)?;
        (m.order_state() == order_state(order.get(), State::Allocated)).then_some(idx)
    }

    /// Frees like [`free`](Self::free) and returns the order of the block the freed one
    /// merged into when it is at least the [notify order](Self::set_notify_order), `None`
    /// otherwise (always `None` while no notify order is set). Linux `__free_one_page`
    /// ending in `page_reporting_notify_free(order)`: a free reporter's
    /// [`on_free`](crate::hint::guest::Reporter::on_free) wants exactly those frees.
    ///
    /// The check costs nothing on the common path: a free below the notify order whose buddy
    /// is not free links the block and returns `None` after the same compares as `free`
    /// (the one against `MAX_ORDER` becomes one against `min(notify order, MAX_ORDER)`);
    /// every other free, which merges or is large, takes an out-of-line path that compares
    /// the merged order.
    #[inline(always)]
    pub fn free_notify(
        &mut self,
        pfn: Pfn,
        order: PageOrder,
    ) -> Result<Option<PageOrder>, FreeError> {
        let Some(idx) = self.allocated_head(pfn, order) else {
            return Err(self.free_error(pfn, order));
        };
        let o = order.get() as usize;
        // `o < quiet_below <= MAX_ORDER`: the block has a buddy order, and ending at `o` it
        // stays below the notify order.
        if o < usize::from(self.quiet_below) && self.free_buddy(idx as u64, o).is_none() {
            self.area.link_freed(&mut self.meta, o, idx);
            return Ok(None);
        }
        Ok(self.release_notify(idx as u32, o))
    }

    /// The slow path of `free_notify`: the block merges, or is at least `quiet_below`.
    #[inline(never)]
    fn release_notify(&mut self, idx: u32, o: usize) -> Option<PageOrder> {
        let merged = self.release(idx, o, false, Placement::Hot);
        (merged >= usize::from(self.notify_order)).then_some(PageOrder::from_raw(merged as u8))
    }

    /// Why freeing `pfn` at `order` was refused (it is not an allocated head of that order):
    /// the checks of `locate` first, then the state of the block that holds the frame.
    #[cold]
    #[inline(never)]
    fn free_error(&self, pfn: Pfn, order: PageOrder) -> FreeError {
        let idx = match self.locate(pfn, order) {
            Ok((idx, _)) => idx,
            Err(Locate::OrderTooLarge) => return FreeError::OrderTooLarge,
            Err(Locate::Unaligned) => return FreeError::Unaligned,
            Err(Locate::OutOfRange) => return FreeError::OutOfRange,
        };
        let m = self.meta[idx as usize];
        let state = match m.state {
            State::Tail => self.enclosing(idx).map(|info| info.state),
            _ => Some(m.state),
        };
        match state {
            Some(State::Free | State::FreeReported) => FreeError::DoubleFree,
            Some(State::Isolated) => FreeError::Isolated,
            Some(State::Allocated) => FreeError::WrongOrder,
            Some(State::Hole | State::Tail) | None => FreeError::OutOfRange,
        }
    }

    /// Takes up to `max` unreported free blocks of `order` off the head of their list, as many
    /// as fit in `out`, and marks them isolated: no `alloc` returns them and nothing merges
    /// with them until [`put_back`](Self::put_back). Returns how many it took (Linux
    /// `page_reporting_cycle` isolating a batch).
    pub fn isolate<const N: usize>(
        &mut self,
        order: PageOrder,
        max: usize,
        out: &mut ArrayVec<Block, N>,
    ) -> Result<usize, IsolateError> {
        self.isolate_from(order, max, out, false)
    }

    /// Like [`isolate`](Self::isolate), but takes the *coldest* unreported blocks: from the end
    /// of the unreported segment backwards, the blocks freed longest ago (freed blocks enter at
    /// the head and drift towards the reported tail). Duyck, "KVM: Guest Free Page Hinting" v9,
    /// 2019: hint the pages least likely to be reallocated soon, not the ones just freed, which
    /// `alloc` takes next. The hint batcher uses this with [`put_back`](Self::put_back)
    /// (reported, to the tail) and [`put_back_hot`](Self::put_back_hot) (failed, to the head),
    /// so the list works as a ring: each pass continues at the cold end with blocks no pass has
    /// tried yet, the rotation Linux's `page_reporting_cycle` gets from `list_rotate_to_front`.
    pub fn isolate_cold<const N: usize>(
        &mut self,
        order: PageOrder,
        max: usize,
        out: &mut ArrayVec<Block, N>,
    ) -> Result<usize, IsolateError> {
        self.isolate_from(order, max, out, true)
    }

    /// The loop of `isolate` (`cold == false`: from the head) and `isolate_cold` (from the
    /// end of the unreported segment backwards).
    fn isolate_from<const N: usize>(
        &mut self,
        order: PageOrder,
        max: usize,
        out: &mut ArrayVec<Block, N>,
        cold: bool,
    ) -> Result<usize, IsolateError> {
        let o = order.get() as usize;
        if o > MAX_ORDER {
            return Err(IsolateError::OrderTooLarge);
        }
        let meta = &mut *self.meta;
        let mut taken = 0;
        while taken < max && !out.is_full() {
            let list = &self.area.lists[o];
            let idx = match (cold, list.first_reported) {
                (false, _) => list.head,
                (true, NIL) => list.tail,
                (true, first) => meta[first as usize].prev,
            };
            if idx == NIL || meta[idx as usize].state != State::Free {
                break;
            }
            self.area.unlink(meta, o, idx, false);
            meta[idx as usize].state = State::Isolated;
            self.area.lists[o].isolated += 1;
            out.push(Block {
                pfn: Pfn::from_raw(self.base + u64::from(idx)),
                order,
                reported: false,
            });
            taken += 1;
        }
        Ok(taken)
    }

    /// Returns an isolated block to the free lists (Linux `__putback_isolated_page`): to the
    /// tail as reported when the host took it, or, when the report failed, unreported to the
    /// end of the unreported blocks so the next pass tries other blocks first. It merges with
    /// free buddies; the merged block is reported only if both halves were.
    pub fn put_back(
        &mut self,
        pfn: Pfn,
        order: PageOrder,
        reported: bool,
    ) -> Result<(), PutBackError> {
        self.put_back_at(pfn, order, reported, Placement::Cold)
    }

    /// Returns an isolated block unreported to the *head* of its list, as a freed block goes:
    /// for a failed report of a block taken by [`isolate_cold`](Self::isolate_cold), so the
    /// next pass, which starts at the cold end, tries blocks not tried yet and comes back to
    /// this one last. The block is the first `alloc` hands out, which costs the host nothing:
    /// it still backs it. Merges like [`put_back`](Self::put_back); errors are the same.
    pub fn put_back_hot(&mut self, pfn: Pfn, order: PageOrder) -> Result<(), PutBackError> {
        self.put_back_at(pfn, order, false, Placement::Hot)
    }

    fn put_back_at(
        &mut self,
        pfn: Pfn,
        order: PageOrder,
        reported: bool,
        placement: Placement,
    ) -> Result<(), PutBackError> {
        let (idx, o) = self.locate(pfn, order).map_err(|e| match e {
            Locate::OrderTooLarge => PutBackError::OrderTooLarge,
            Locate::Unaligned => PutBackError::Unaligned,
            Locate::OutOfRange => PutBackError::OutOfRange,
        })?;
        let m = self.meta[idx as usize];
        match m.state {
            State::Isolated if m.order as usize == o => {}
            State::Isolated => return Err(PutBackError::WrongOrder),
            State::Hole => return Err(PutBackError::OutOfRange),
            _ => return Err(PutBackError::NotIsolated),
        }
        self.area.lists[o].isolated -= 1;
        self.release(idx, o, reported, placement);
        Ok(())
    }

    /// Forgets that any free block was reported (after live migration the destination host has
    /// backed every page again; Duyck, "aerating memory via hinting", 2019). O(reported
    /// blocks).
    pub fn reset_reported(&mut self) {
        let meta = &mut *self.meta;
        for list in self.area.lists.iter_mut().take(MAX_ORDER + 1) {
            let mut idx = list.first_reported;
            while idx != NIL {
                let m = &mut meta[idx as usize];
                m.state = State::Free;
                idx = m.next;
            }
            list.first_reported = NIL;
            list.reported = 0;
        }
    }

    /// The block that holds `pfn`, or `None` when the frame is not managed.
    pub fn block_info(&self, pfn: Pfn) -> Option<BlockInfo> {
        let idx = u32::try_from(pfn.get().checked_sub(self.base)?).ok()?;
        let m = self.meta.get(idx as usize)?;
        let head = match m.state {
            State::Hole => return None,
            State::Tail => self.enclosing(idx)?,
            _ => HeadInfo {
                idx,
                order: m.order,
                state: m.state,
            },
        };
        let state = match head.state {
            State::Free => BlockState::Free { reported: false },
            State::FreeReported => BlockState::Free { reported: true },
            State::Isolated => BlockState::Isolated,
            State::Allocated | State::Hole | State::Tail => BlockState::Allocated,
        };
        Some(BlockInfo {
            pfn: Pfn::from_raw(self.base + u64::from(head.idx)),
            order: PageOrder::from_raw(head.order),
            state,
        })
    }

    /// Checks the frame number and order of a block against the window; gives its index.
    #[inline]
    fn locate(&self, pfn: Pfn, order: PageOrder) -> Result<(u32, usize), Locate> {
        let o = order.get() as usize;
        if o > MAX_ORDER {
            return Err(Locate::OrderTooLarge);
        }
        if !pfn.is_aligned(order) {
            return Err(Locate::Unaligned);
        }
        let idx = pfn.get().wrapping_sub(self.base);
        match idx.checked_add(order.frames()) {
            Some(end) if end <= self.meta.len() as u64 => Ok((idx as u32, o)),
            _ => Err(Locate::OutOfRange),
        }
    }

    /// Removes the head of the non-empty list `k` and splits it down to order `o`, putting
    /// the upper halves on their lists with the parent's reported flag (Linux `expand`).
    #[inline(always)]
    fn take(&mut self, k: usize, o: usize) -> Block {
        let meta = &mut *self.meta;
        let idx = self.area.lists[slot(k)].head;
        let m = &mut meta[idx as usize];
        let reported = m.state == State::FreeReported;
        // An allocated head needs only its state and order; its links are dead until the
        // block is freed and linked again. The split below never touches this head.
        m.state = State::Allocated;
        m.order = o as u8;
        let next = m.next;
        self.area.pop_head(meta, k, idx, next, reported);
        if k != o {
            self.split(idx, k, o, reported);
        }
        Block {
            pfn: Pfn::from_raw(self.base + u64::from(idx)),
            order: PageOrder::from_raw(o as u8),
            reported,
        }
    }

    /// The split loop of `take`, out of line so the no-split path stays small.
    #[inline(never)]
    fn split(&mut self, idx: u32, k: usize, o: usize, reported: bool) {
        let meta = &mut *self.meta;
        let mut cur = k;
        while cur > o {
            cur -= 1;
            self.area
                .link(meta, cur, idx + (1 << cur), reported, Placement::Hot);
        }
    }

    /// Puts the block at index `start` on the free lists, first merging it with every free
    /// buddy (Linux `__free_one_page`): reported blocks to the tail, others to the head
    /// (`Hot`) or to the end of the unreported segment (`Cold`). Returns the order of the
    /// block after merging.
    #[inline(always)]
    pub(super) fn release(
        &mut self,
        start: u32,
        order: usize,
        reported: bool,
        placement: Placement,
    ) -> usize {
        if order < MAX_ORDER && self.free_buddy(u64::from(start), order).is_some() {
            return self.merge(start, order, reported, placement);
        }
        self.area
            .link(&mut self.meta, order, start, reported, placement);
        order
    }

    /// The index of the buddy of the block at `idx` and whether it is reported, if the buddy
    /// is a free block of the same order (buddies pair up by frame number; the window base
    /// need not be aligned).
    #[inline(always)]
    fn free_buddy(&self, idx: u64, order: usize) -> Option<(u64, bool)> {
        let buddy = ((idx + self.base) ^ (1 << order)).wrapping_sub(self.base);
        let b = self.meta.get(buddy as usize)?;
        let key = b.order_state();
        (key | REPORTED_BIT == order_state(order as u8, State::FreeReported))
            .then_some((buddy, key & REPORTED_BIT != 0))
    }

    /// The merge loop of `release`, out of line so the no-merge path stays small.
    #[inline(never)]
    fn merge(
        &mut self,
        start: u32,
        order: usize,
        mut reported: bool,
        placement: Placement,
    ) -> usize {
        let (mut head, mut order) = (u64::from(start), order);
        while order < MAX_ORDER {
            let Some((buddy, b_reported)) = self.free_buddy(head, order) else {
                break;
            };
            let meta = &mut *self.meta;
            self.area.unlink(meta, order, buddy as u32, b_reported);
            meta[buddy as usize].state = State::Tail;
            reported &= b_reported;
            head = head.min(buddy);
            order += 1;
        }
        let head = head as u32;
        if head != start {
            self.meta[start as usize].state = State::Tail;
        }
        self.area
            .link(&mut self.meta, order, head, reported, placement);
        order
    }

    /// The head of the block that holds the tail frame `idx` (search upwards by alignment).
    pub(super) fn enclosing(&self, idx: u32) -> Option<HeadInfo> {
        let pfn = self.base + u64::from(idx);
        (1..=MAX_ORDER).find_map(|k| {
            let head = (pfn & !((1u64 << k) - 1)).checked_sub(self.base)?;
            let m = self.meta.get(head as usize)?;
            let is_head = !matches!(m.state, State::Hole | State::Tail);
            (is_head && u64::from(idx) - head < 1 << m.order).then_some(HeadInfo {
                idx: head as u32,
                order: m.order,
                state: m.state,
            })
        })
    }
}
