//! `Balloon::check`: the balloon's books audited against the buddy.

use core::ops::DerefMut;

use super::{Balloon, BalloonViolation};
use crate::addr::Pfn;
use crate::buddy::{BlockState, Buddy, FrameMeta};

impl<S: DerefMut<Target = [u64]>> Balloon<S> {
    /// Audits the balloon against the buddy: every head bit starts an allocated block of the
    /// order the balloon recorded for it, there are as many end bits as head bits, the
    /// per-host-page counts and the totals match those blocks, and the counters of broken and
    /// full host pages match the counts. O(window / 64 + blocks + host pages); for tests and
    /// debugging.
    pub fn check<B, const M: usize>(&self, buddy: &Buddy<B, M>) -> Result<(), BalloonViolation>
    where
        B: DerefMut<Target = [FrameMeta]>,
    {
        let fail = |rule, pfn| Err(BalloonViolation { rule, pfn });
        let (mut held, mut blocks, mut partial, mut full) = (0u64, 0u64, 0u64, 0u64);
        // Pages before `page` are settled; `acc` holds what the blocks seen so far put in it.
        let (mut page, mut acc) = (0usize, 0u64);
        let mut settle = |upto: usize, page: &mut usize, acc: &mut u64| {
            while *page < upto {
                if *acc != self.count(*page) {
                    return Err(self.hp_pfn(*page).get());
                }
                let n = self.hp_frames(*page);
                partial += u64::from(*acc > 0 && *acc < n);
                full += u64::from(*acc == n);
                *acc = 0;
                *page += 1;
            }
            Ok(())
        };
        for (wi, &word) in self.words[..self.bitmap_words].iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let f = self.base + wi as u64 * 64 + u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                let pfn = Pfn::from_raw(f);
                let Some(order) = self.order_at(f - self.base) else {
                    return fail("ballooned head has no recorded order", f);
                };
                let Some(info) = buddy.block_info(pfn).filter(|i| {
                    i.pfn == pfn && i.order == order && i.state == BlockState::Allocated
                }) else {
                    return fail("ballooned head is not the allocated block recorded", f);
                };
                let end = f + info.order.frames();
                if end > self.base + self.window {
                    return fail("ballooned block runs past the window", f);
                }
                held += info.order.frames();
                blocks += 1;
                let mut x = f;
                while x < end {
                    let q = self.hp_of(x);
                    if let Err(at) = settle(q, &mut page, &mut acc) {
                        return fail("host page count differs from its blocks", at);
                    }
                    let chunk = (((x >> self.h()) + 1) << self.h()).min(end) - x;
                    acc += chunk;
                    x += chunk;
                }
            }
        }
        if let Err(at) = settle(self.host_pages, &mut page, &mut acc) {
            return fail("host page count differs from its blocks", at);
        }
        let ends: u64 = self.words[self.bitmap_words..self.hp_base()]
            .iter()
            .map(|w| u64::from(w.count_ones()))
            .sum();
        if ends != blocks {
            return fail("end bits differ from head bits", self.base);
        }
        if held != self.held || blocks != self.blocks {
            return fail("totals differ from the blocks", self.base);
        }
        if partial != self.partial || full != self.full_pages {
            return fail("broken/full host page counters differ", self.base);
        }
        Ok(())
    }
}
