//! `check_invariants`: an O(window) audit of every rule the allocator relies on.

use core::ops::DerefMut;

use super::meta::{NIL, State};
use super::{Buddy, FrameMeta, InvariantViolation};

impl<S: DerefMut<Target = [FrameMeta]>, const MAX_ORDER: usize> Buddy<S, MAX_ORDER> {
    /// Audits the whole allocator: every managed frame in exactly one block, blocks naturally
    /// aligned, each free block on the list of its order exactly once with consistent links,
    /// unreported blocks before reported ones, no two free buddies left unmerged, counters
    /// equal to what the metadata says. O(window frames); meant for tests, fuzzing and
    /// debugging, not for hot paths.
    pub fn check_invariants(&self) -> Result<(), InvariantViolation> {
        let len = self.meta.len() as u64;
        let fail = |rule, idx: u64| {
            Err(InvariantViolation {
                rule,
                pfn: self.base + idx,
            })
        };

        // 1. Walk the window block by block: conservation and alignment.
        let (mut managed, mut free, mut reported, mut isolated) = (0u64, 0u64, 0u64, 0u64);
        let mut heads_per_order = [(0u64, 0u64, 0u64); super::meta::ORDER_SLOTS];
        let mut idx = 0u64;
        while idx < len {
            let m = self.meta[idx as usize];
            if m.state == State::Hole {
                idx += 1;
                continue;
            }
            if m.state == State::Tail {
                return fail("tail frame outside any block", idx);
            }
            let order = m.order as usize;
            if order > MAX_ORDER {
                return fail("block order above MAX_ORDER", idx);
            }
            let size = 1u64 << order;
            if (self.base + idx) & (size - 1) != 0 {
                return fail("block not naturally aligned in frame numbers", idx);
            }
            if idx + size > len {
                return fail("block runs past the window", idx);
            }
            if let Some(t) =
                (idx + 1..idx + size).find(|&t| self.meta[t as usize].state != State::Tail)
            {
                return fail("frame inside a block is not a tail", t);
            }
            managed += size;
            let counts = &mut heads_per_order[order];
            match m.state {
                State::Free | State::FreeReported => {
                    free += size;
                    counts.0 += 1;
                    if m.state == State::FreeReported {
                        reported += size;
                        counts.1 += 1;
                    }
                    if order < MAX_ORDER {
                        let buddy = ((self.base + idx) ^ size).wrapping_sub(self.base);
                        if let Some(b) = self.meta.get(buddy as usize) {
                            let buddy_free = matches!(b.state, State::Free | State::FreeReported);
                            if buddy_free && b.order == m.order {
                                return fail("two free buddies left unmerged", idx);
                            }
                        }
                    }
                }
                State::Isolated => {
                    isolated += size;
                    counts.2 += 1;
                }
                _ => {}
            }
            idx += size;
        }
        if managed != self.managed_frames {
            return fail("managed frame counter differs from the blocks", 0);
        }
        if free != self.free_frames()
            || reported != self.reported_frames()
            || isolated != self.isolated_frames()
        {
            return fail(
                "free, reported or isolated frames differ from the blocks",
                0,
            );
        }

        // 2. Walk every list: links, order, segment split, per-order counters.
        for (order, list) in self.area.lists.iter().enumerate() {
            let expect = heads_per_order[order];
            if (list.free, list.reported, list.isolated) != expect {
                return fail("per-order counters differ from the blocks", order as u64);
            }
            if (self.area.nonempty >> order) & 1 != u32::from(list.head != NIL) {
                return fail("non-empty bitmap disagrees with the list", order as u64);
            }
            let (mut prev, mut cur, mut seen, mut in_reported) = (NIL, list.head, 0u64, false);
            while cur != NIL {
                let Some(m) = self.meta.get(cur as usize) else {
                    return fail("free-list link outside the window", u64::from(cur));
                };
                seen += 1;
                if seen > list.free {
                    return fail("free list longer than its counter (cycle?)", u64::from(cur));
                }
                if m.order as usize != order
                    || !matches!(m.state, State::Free | State::FreeReported)
                {
                    return fail(
                        "block on a free list is not free at that order",
                        u64::from(cur),
                    );
                }
                if m.prev != prev {
                    return fail("free-list back link broken", u64::from(cur));
                }
                if cur == list.first_reported {
                    in_reported = true;
                }
                if in_reported != (m.state == State::FreeReported) {
                    return fail(
                        "reported block outside the reported segment",
                        u64::from(cur),
                    );
                }
                prev = cur;
                cur = m.next;
            }
            if prev != list.tail {
                return fail("free-list tail pointer wrong", order as u64);
            }
            if seen != list.free {
                return fail("free list shorter than its counter", order as u64);
            }
            if list.first_reported != NIL && !in_reported {
                return fail("first_reported is not on its list", order as u64);
            }
        }
        Ok(())
    }
}
