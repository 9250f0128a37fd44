//! The host's end of free-page reporting and ballooning: untrusted guest ranges in, discards of
//! whole host backing pages out.
//!
//! A guest reports free blocks (virtio PAGE_REPORTING scatter lists, the `pa | order`
//! hints) or inflates its balloon (PFN arrays). Each claimed range goes through the same
//! steps (QEMU `virtio_balloon_handle_report`, Cloud Hypervisor `release_memory_range`,
//! Firecracker `remove_range`):
//!
//! 1. **Reject** what is malformed: empty, not 4 KiB aligned, wrapping around, or reaching
//!    beyond the 52-bit physical address space. Nothing of it is touched.
//! 2. **Clamp** to guest RAM: the parts outside every region of the [`GuestRamLayout`] are
//!    dropped (Cloud Hypervisor's "Clamping reported range").
//! 3. **Align** each part inward to whole host backing pages of its region, so a discard never
//!    splits a hugetlb page, nor a transparent huge page when the region says 2 MiB
//!    (Hildenbrand, "VIRTIO_BALLOON_F_THP_ORDER to handle THP spilt issue", 2020: discarding
//!    4 KiB pieces of THP-backed RAM broke 800 MiB of huge pages to return 400 MiB). The cut-off
//!    edges are dropped too.
//! 4. **Discard** what remains through the embedder's [`Discard`] (`madvise(MADV_DONTNEED)`,
//!    `fallocate(PUNCH_HOLE)`), or, in [`DiscardMode::Skip`], count it and do nothing:
//!    discarding is impossible while a device is assigned (pinned memory), during postcopy
//!    migration, or when the guest's poison value cannot be restored (QEMU
//!    `virtio_balloon_inhibited()` and `poison_val`). The guest's buffer is acknowledged
//!    either way; the guest waits for it.
//!
//! Every byte a guest claims ends up in exactly one counter: accepted (then discarded,
//! skipped or failed), clamped outside RAM, clamped to backing pages, or rejected; the sums
//! are kept in [`ReceiverStats`] as `u128`, which no sequence of `u64` lengths overflows in
//! practice.
//!
//! # Concurrency
//! `&mut self`: one receiver per queue, run by the thread that pops the queue.

use super::layout::{GuestRamLayout, RamRegion, for_each_piece};
use crate::addr::{Gpa, PAGE_SIZE, PHYS_ADDR_BITS};
use crate::hint::wire::{ChainWalk, decode_hints, hint_error_display, pfn_runs};

/// How the embedder gives guest memory back to the host (QEMU `ram_block_discard_range`).
pub trait Discard {
    /// What a failed discard reports.
    type Error: Copy + core::fmt::Debug;

    /// Gives `[start, start + len)` back to the host. The range lies inside `region` and
    /// covers whole backing pages of it.
    fn discard(&mut self, region: &RamRegion, start: Gpa, len: u64) -> Result<(), Self::Error>;
}

/// Why discarding is off.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SkipReason {
    /// A device is assigned to the guest and its memory is pinned (QEMU
    /// `ram_block_discard_is_disabled`).
    DeviceAssigned,
    /// Incoming postcopy migration cannot handle concurrent discards.
    Postcopy,
    /// The guest poisons free pages with a value the host cannot restore on refault.
    Poison,
}

/// Whether the receiver discards.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum DiscardMode {
    /// Discard accepted ranges.
    #[default]
    Discard,
    /// Validate and count, discard nothing; the embedder still acknowledges the buffers.
    Skip(SkipReason),
}

/// Why a whole range was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RangeError {
    /// Zero bytes.
    Empty,
    /// Address or length not a multiple of 4 KiB.
    Unaligned,
    /// Address plus length wraps around 64 bits.
    Overflow,
    /// The range reaches beyond the 52-bit physical address space.
    BeyondPhysical,
}

hint_error_display!(RangeError {
    Empty => "reported range is empty",
    Unaligned => "reported range not 4 KiB aligned",
    Overflow => "reported range wraps around",
    BeyondPhysical => "reported range beyond the physical address space",
});

/// Where the bytes of one range went.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RangeOutcome {
    /// In RAM, in whole backing pages: discarded, skipped or failed.
    pub accepted: u64,
    /// Outside every RAM region.
    pub clamped_outside: u64,
    /// In RAM, but in backing pages the range covers only partly.
    pub clamped_partial: u64,
    /// Given back to the host.
    pub discarded: u64,
    /// Accepted but not discarded because of [`DiscardMode::Skip`].
    pub skipped: u64,
    /// Accepted, but the embedder's discard failed.
    pub failed: u64,
}

impl RangeOutcome {
    /// Bytes clamped away, outside RAM or in partial backing pages.
    pub const fn clamped(&self) -> u64 {
        self.clamped_outside + self.clamped_partial
    }
}

/// Byte totals over many ranges. `claimed == accepted + clamped + rejected` and
/// `accepted == discarded + skipped + failed` always hold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ByteTotals {
    /// Bytes the guest claimed in well-formed entries.
    pub claimed: u128,
    /// See [`RangeOutcome::accepted`].
    pub accepted: u128,
    /// See [`RangeOutcome::clamped_outside`].
    pub clamped_outside: u128,
    /// See [`RangeOutcome::clamped_partial`].
    pub clamped_partial: u128,
    /// Bytes of rejected ranges.
    pub rejected: u128,
    /// See [`RangeOutcome::discarded`].
    pub discarded: u128,
    /// See [`RangeOutcome::skipped`].
    pub skipped: u128,
    /// See [`RangeOutcome::failed`].
    pub failed: u128,
}

impl ByteTotals {
    fn add(&mut self, len: u64, r: Result<&RangeOutcome, ()>) {
        self.claimed += u128::from(len);
        match r {
            Ok(o) => {
                self.accepted += u128::from(o.accepted);
                self.clamped_outside += u128::from(o.clamped_outside);
                self.clamped_partial += u128::from(o.clamped_partial);
                self.discarded += u128::from(o.discarded);
                self.skipped += u128::from(o.skipped);
                self.failed += u128::from(o.failed);
            }
            Err(()) => self.rejected += u128::from(len),
        }
    }

    /// Clamped bytes, outside RAM or in partial backing pages.
    pub const fn clamped(&self) -> u128 {
        self.clamped_outside + self.clamped_partial
    }

    /// Whether every claimed byte is in exactly one place.
    pub const fn balanced(&self) -> bool {
        self.claimed == self.accepted + self.clamped() + self.rejected
            && self.accepted == self.discarded + self.skipped + self.failed
    }
}

/// What one guest buffer (a report chain, a hint array, a PFN array) amounted to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BatchOutcome {
    /// Well-formed entries, each one range.
    pub ranges: u32,
    /// Of those, ranges rejected as a whole.
    pub rejected_ranges: u32,
    /// Entries that did not decode (a chain stops at its first).
    pub malformed: u32,
    /// Where the bytes went.
    pub bytes: ByteTotals,
}

/// Everything a receiver has seen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ReceiverStats {
    /// Well-formed entries.
    pub ranges: u64,
    /// Of those, rejected as a whole.
    pub rejected_ranges: u64,
    /// Entries that did not decode.
    pub malformed: u64,
    /// Calls to [`Discard::discard`].
    pub discard_calls: u64,
    /// Of those, calls that failed.
    pub discard_failures: u64,
    /// Where the bytes went.
    pub bytes: ByteTotals,
}

/// The host's end of free-page reporting and ballooning; see the module docs.
#[derive(Debug)]
pub struct ReportReceiver<L, D: Discard> {
    layout: L,
    discard: D,
    mode: DiscardMode,
    stats: ReceiverStats,
    last_error: Option<D::Error>,
}

impl<L: GuestRamLayout, D: Discard> ReportReceiver<L, D> {
    /// A receiver over the guest RAM `layout` that discards through `discard`.
    pub fn new(layout: L, discard: D) -> Self {
        Self {
            layout,
            discard,
            mode: DiscardMode::Discard,
            stats: ReceiverStats::default(),
            last_error: None,
        }
    }

    /// Whether ranges are discarded or only counted.
    pub fn mode(&self) -> DiscardMode {
        self.mode
    }

    /// Turns discarding on, or off for a reason (device assignment, postcopy, poison).
    pub fn set_mode(&mut self, mode: DiscardMode) {
        self.mode = mode;
    }

    /// The counters.
    pub fn stats(&self) -> &ReceiverStats {
        &self.stats
    }

    /// The last error the embedder's discard returned.
    pub fn last_error(&self) -> Option<D::Error> {
        self.last_error
    }

    /// The layout.
    pub fn layout(&mut self) -> &mut L {
        &mut self.layout
    }

    /// The discarder.
    pub fn discarder(&mut self) -> &mut D {
        &mut self.discard
    }

    /// Gives layout and discarder back.
    pub fn into_parts(self) -> (L, D) {
        (self.layout, self.discard)
    }

    /// Validates, clamps, aligns and discards one untrusted range `[addr, addr + len)`.
    /// `Err` means the whole range was rejected; its bytes count as rejected either way.
    pub fn receive_range(&mut self, addr: u64, len: u64) -> Result<RangeOutcome, RangeError> {
        let r = self.range(addr, len);
        self.stats.ranges += 1;
        if r.is_err() {
            self.stats.rejected_ranges += 1;
        }
        self.stats.bytes.add(len, r.as_ref().map_err(|_| ()));
        r
    }

    fn range(&mut self, addr: u64, len: u64) -> Result<RangeOutcome, RangeError> {
        if len == 0 {
            return Err(RangeError::Empty);
        }
        if addr % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 {
            return Err(RangeError::Unaligned);
        }
        let end = addr.checked_add(len).ok_or(RangeError::Overflow)?;
        if end > 1 << PHYS_ADDR_BITS {
            return Err(RangeError::BeyondPhysical);
        }
        let mut out = RangeOutcome::default();
        let (mode, discard) = (self.mode, &mut self.discard);
        let (stats, last_error) = (&mut self.stats, &mut self.last_error);
        out.clamped_outside = for_each_piece(&mut self.layout, addr, end, |piece| {
            let Some((lo, hi)) = piece.region.whole_backing_pages(piece.start, piece.end) else {
                out.clamped_partial += piece.end - piece.start;
                return;
            };
            out.clamped_partial += (piece.end - piece.start) - (hi - lo);
            out.accepted += hi - lo;
            if let DiscardMode::Skip(_) = mode {
                out.skipped += hi - lo;
                return;
            }
            stats.discard_calls += 1;
            // `lo < hi <= 2^52`: a valid address.
            let Ok(at) = Gpa::new(lo) else { return };
            match discard.discard(&piece.region, at, hi - lo) {
                Ok(()) => out.discarded += hi - lo,
                Err(e) => {
                    stats.discard_failures += 1;
                    *last_error = Some(e);
                    out.failed += hi - lo;
                }
            }
        });
        Ok(out)
    }

    fn batch<E>(&mut self, entries: impl Iterator<Item = Result<(u64, u64), E>>) -> BatchOutcome {
        let mut b = BatchOutcome::default();
        for e in entries {
            match e {
                Ok((addr, len)) => {
                    b.ranges += 1;
                    let r = self.receive_range(addr, len);
                    if r.is_err() {
                        b.rejected_ranges += 1;
                    }
                    b.bytes.add(len, r.as_ref().map_err(|_| ()));
                }
                Err(_) => {
                    b.malformed += 1;
                    self.stats.malformed += 1;
                }
            }
        }
        b
    }

    /// Takes a PAGE_REPORTING buffer: every entry of the chain (QEMU `in_sg`). A descriptor
    /// that does not decode ends the chain; the entries before it are processed.
    pub fn receive_report(&mut self, chain: ChainWalk<'_>) -> BatchOutcome {
        self.batch(chain.map(|e| e.map(|s| (s.addr, u64::from(s.len)))))
    }

    /// Takes a buffer of `le64` `pa | order` hints; a hint that does not decode
    /// is counted as malformed and the others are processed.
    pub fn receive_hints(&mut self, bytes: &[u8]) -> BatchOutcome {
        self.batch(decode_hints(bytes).map(|h| h.map(|h| (h.addr(), h.len()))))
    }

    /// Takes a balloon inflate buffer of `le32` 4 KiB frame numbers, run by run.
    pub fn receive_pfns(&mut self, bytes: &[u8]) -> BatchOutcome {
        self.batch(pfn_runs(bytes).map(|r| r.map(|r| r.range())))
    }
}

#[cfg(test)]
mod tests;
