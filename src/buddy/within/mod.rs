//! Queries and allocation inside one naturally aligned range: what a THP-order balloon needs to
//! take small blocks from a host huge page it has already broken rather than break a new one
//! (Hildenbrand, "VIRTIO_BALLOON_F_THP_ORDER to handle THP spilt issue", 2020). Linux has no
//! counterpart; `alloc_contig_range` is the nearest relative.
//!
//! Both walk the blocks of the range through the out-of-band metadata, head to head, so they
//! cost O(blocks in the range) (at most 512 steps for a 2 MiB range), hold no state between
//! calls, and keep every invariant `check_invariants` audits: a free block taken apart here
//! is split exactly as `alloc` splits, except that the part kept may be any aligned
//! sub-block, not only the lowest.

use core::ops::DerefMut;

use super::meta::State;
use super::{AllocError, Block, Buddy, FrameMeta, Placement};
use crate::addr::{PageOrder, Pfn};

/// A free block found in a range: its head index, order and reported flag.
#[derive(Clone, Copy)]
struct Found {
    idx: u64,
    order: usize,
    reported: bool,
}

impl<S: DerefMut<Target = [FrameMeta]>, const MAX_ORDER: usize> Buddy<S, MAX_ORDER> {
    /// The metadata indices `[lo, hi)` of the naturally aligned block of `within` that holds
    /// `pfn`, clipped to the window; `None` when they do not meet.
    fn window_part(&self, pfn: Pfn, within: PageOrder) -> Option<(u64, u64)> {
        let start = pfn.get() & !(within.frames() - 1);
        let end = start + within.frames();
        let wend = self.base + self.meta.len() as u64;
        let (lo, hi) = (start.max(self.base), end.min(wend));
        (lo < hi).then(|| (lo - self.base, hi - self.base))
    }

    /// Calls `f` for every free block that overlaps `[lo, hi)`, in address order. A block
    /// that starts before `lo` contains the whole range (blocks nest by alignment), and is
    /// the only one reported.
    fn free_blocks_in(&self, lo: u64, hi: u64, mut f: impl FnMut(Found) -> bool) {
        let free = |state| match state {
            State::Free => Some(false),
            State::FreeReported => Some(true),
            _ => None,
        };
        if self.meta[lo as usize].state == State::Tail {
            if let Some(h) = self.enclosing(lo as u32) {
                if let Some(reported) = free(h.state) {
                    f(Found {
                        idx: u64::from(h.idx),
                        order: h.order as usize,
                        reported,
                    });
                }
            }
            return;
        }
        let mut idx = lo;
        while idx < hi {
            let m = self.meta[idx as usize];
            let size = match m.state {
                State::Hole | State::Tail => 1,
                _ => 1u64 << m.order,
            };
            if let Some(reported) = free(m.state) {
                let found = Found {
                    idx,
                    order: m.order as usize,
                    reported,
                };
                if !f(found) {
                    return;
                }
            }
            idx += size;
        }
    }

    /// Frames in free blocks (reported or not; isolated blocks are not free) inside the
    /// naturally aligned block of order `within` that holds `pfn`. O(blocks in the range).
    pub fn free_frames_within(&self, pfn: Pfn, within: PageOrder) -> u64 {
        let Some((lo, hi)) = self.window_part(pfn, within) else {
            return 0;
        };
        let mut free = 0;
        self.free_blocks_in(lo, hi, |b| {
            let end = (b.idx + (1 << b.order)).min(hi);
            free += end - b.idx.max(lo);
            true
        });
        free
    }

    /// Allocates the largest block not above `order` (capped at `within`) that lies inside
    /// the naturally aligned block of order `within` holding `pfn`.
    ///
    /// Among free blocks that can serve `order` it takes the smallest (least splitting), an
    /// unreported one on a tie; if none can, the largest smaller one. A larger free block is
    /// split as `alloc` splits, keeping the part inside the range, so a block that covers the
    /// whole range is carved down to it. Fails with [`AllocError::OutOfMemory`] when nothing
    /// in the range is free, [`AllocError::OrderTooLarge`] when `order > MAX_ORDER`; nothing
    /// changes then.
    pub fn alloc_within(
        &mut self,
        pfn: Pfn,
        within: PageOrder,
        order: PageOrder,
    ) -> Result<Block, AllocError> {
        if order.get() as usize > MAX_ORDER {
            return Err(AllocError::OrderTooLarge);
        }
        let o = order.get().min(within.get()) as usize;
        let (lo, hi) = self
            .window_part(pfn, within)
            .ok_or(AllocError::OutOfMemory)?;
        // Better: serves `o` with a smaller block; else, among those that cannot, larger.
        let better = |a: Found, b: Found| match (a.order >= o, b.order >= o) {
            (true, true) => (a.order, a.reported) < (b.order, b.reported),
            (true, false) => true,
            (false, true) => false,
            (false, false) => (a.order, !a.reported) > (b.order, !b.reported),
        };
        let mut best: Option<Found> = None;
        self.free_blocks_in(lo, hi, |b| {
            if best.is_none_or(|cur| better(b, cur)) {
                best = Some(b);
            }
            // An unreported block of exactly `o` cannot be beaten.
            b.order != o || b.reported
        });
        let b = best.ok_or(AllocError::OutOfMemory)?;
        let meta = &mut *self.meta;
        self.area.unlink(meta, b.order, b.idx as u32, b.reported);
        let (at, got) = if b.order <= o {
            (b.idx, b.order)
        } else {
            // The target: the range's start if the block covers it, else the block's start.
            let target = b.idx.max(lo);
            let (mut start, mut cur) = (b.idx, b.order);
            while cur > o {
                cur -= 1;
                let half = 1u64 << cur;
                let (keep, give) = if target >= start + half {
                    (start + half, start)
                } else {
                    (start, start + half)
                };
                self.area
                    .link(meta, cur, give as u32, b.reported, Placement::Hot);
                start = keep;
            }
            (start, o)
        };
        self.meta[at as usize] = FrameMeta::head(State::Allocated, got as u8);
        Ok(Block {
            pfn: Pfn::from_raw(self.base + at),
            order: PageOrder::from_raw(got as u8),
            reported: b.reported,
        })
    }
}

#[cfg(test)]
mod tests;
