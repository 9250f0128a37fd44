//! The mocks the receiver harness runs against and its byte-range model.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use super::TOP;
use crate::addr::{Gfn, Gpa, PAGE_SIZE};
use crate::hint::host::{ByteTotals, DirtyBitmap, Discard, RamRegion, RangeError};

/// An address below 2^52 (masked).
pub(super) fn gpa(a: u64) -> Gpa {
    Gpa::new(a & (TOP - 1)).unwrap_or_else(|_| unreachable!())
}

/// Records discards, fails on demand, and checks each against the layout.
pub struct MockDiscard {
    pub(super) regions: Vec<RamRegion>,
    pub(super) calls: Vec<(u64, u64)>,
    pub(super) fail: u32,
    pub(super) violation: Option<String>,
}

pub(super) fn inside_whole_pages(
    regions: &[RamRegion],
    start: u64,
    len: u64,
    order: Option<u8>,
) -> bool {
    regions.iter().any(|r| {
        let page = order.map_or(r.backing().bytes(), |o| PAGE_SIZE << o);
        start >= r.start().get()
            && start + len <= r.end()
            && (start - r.start().get()) % page == 0
            && len % page == 0
            && len > 0
    })
}

impl Discard for MockDiscard {
    type Error = ();

    fn discard(&mut self, region: &RamRegion, start: Gpa, len: u64) -> Result<(), ()> {
        let s = start.get();
        if !self.regions.contains(region) || !inside_whole_pages(&[*region], s, len, None) {
            self.violation = Some(format!("discard({s:#x}, {len:#x}) in {region:?}"));
        }
        if self.fail > 0 {
            self.fail -= 1;
            return Err(());
        }
        self.calls.push((s, len));
        Ok(())
    }
}

/// The migration dirty bitmap: one bit per page of each region.
pub struct MockBitmap {
    pub(super) regions: Vec<RamRegion>,
    pub(super) bits: Vec<Vec<bool>>,
    pub(super) generation: u64,
    pub(super) violation: Option<String>,
}

impl DirtyBitmap for MockBitmap {
    fn sync_generation(&mut self) -> u64 {
        self.generation
    }

    fn clear(&mut self, first: Gfn, frames: u64) {
        let (s, len) = (first.addr().get(), frames * PAGE_SIZE);
        match self
            .regions
            .iter()
            .position(|r| inside_whole_pages(&[*r], s, len, Some(0)))
        {
            Some(i) => {
                let at = ((s - self.regions[i].start().get()) / PAGE_SIZE) as usize;
                self.bits[i][at..at + frames as usize].fill(false);
            }
            None => self.violation = Some(format!("clear({s:#x}, {frames}) outside RAM")),
        }
    }
}

/// What the model expects of one range.
#[derive(Default)]
pub(super) struct Expect {
    pub(super) totals: ByteTotals,
    pub(super) discards: Vec<(u64, u64)>,
    /// Whole 4 KiB pages inside RAM, for hints.
    pub(super) pages: Vec<(u64, u64)>,
}

pub(super) fn model_range(
    regions: &[RamRegion],
    addr: u64,
    len: u64,
    skip: bool,
) -> Result<Expect, RangeError> {
    if len == 0 {
        return Err(RangeError::Empty);
    }
    if addr % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 {
        return Err(RangeError::Unaligned);
    }
    let end = addr.checked_add(len).ok_or(RangeError::Overflow)?;
    if end > TOP {
        return Err(RangeError::BeyondPhysical);
    }
    let mut e = Expect::default();
    let mut inside = 0;
    for r in regions {
        let (lo, hi) = (addr.max(r.start().get()), end.min(r.end()));
        if lo >= hi {
            continue;
        }
        inside += hi - lo;
        e.pages.push((lo, hi - lo));
        let page = r.backing().bytes();
        let base = r.start().get();
        let a = base + (lo - base).div_ceil(page) * page;
        let b = base + (hi - base) / page * page;
        let whole = b.saturating_sub(a);
        e.totals.clamped_partial += u128::from(hi - lo - whole);
        if whole > 0 {
            e.totals.accepted += u128::from(whole);
            if skip {
                e.totals.skipped += u128::from(whole);
            } else {
                e.discards.push((a, whole));
            }
        }
    }
    e.totals.claimed = u128::from(len);
    e.totals.clamped_outside = u128::from(len - inside);
    Ok(e)
}
