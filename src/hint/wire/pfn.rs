//! Balloon inflate and deflate arrays of 4 KiB frame numbers.

use static_assertions::const_assert;

use crate::addr::{FRAME_LIMIT, PAGE_SHIFT, Pfn};
use crate::buddy::Block;

/// Why a PFN array was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PfnError {
    /// The buffer is not a whole number of 4-byte frame numbers.
    TrailingBytes,
}

hint_error_display!(PfnError {
    TrailingBytes => "PFN buffer is not a whole number of 4-byte frame numbers",
});

/// Why an encoder refused its input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum EncodeError {
    /// The value does not fit the field: a frame number above `u32::MAX`, or a block of
    /// 4 GiB or more in a 32-bit length.
    TooLarge,
}

hint_error_display!(EncodeError {
    TooLarge => "value too large for its wire field",
});

/// The 4 KiB frames of `blocks`, in order: what a balloon message lists for them.
pub fn block_pfns(blocks: &[Block]) -> impl Iterator<Item = Pfn> + '_ {
    blocks.iter().flat_map(|b| {
        let first = b.pfn.get();
        // A block from the buddy never reaches FRAME_LIMIT; a hand-made one stops there.
        (first..first + b.order.frames()).map_while(|f| Pfn::new(f).ok())
    })
}

/// Writes frame numbers from `pfns` as `le32` into `out` until it is full or `pfns` ends
/// (Linux `set_page_pfns` into `vb->pfns`). Returns how many it wrote. A frame number above
/// `u32::MAX` (a guest above 16 TiB) fails with [`EncodeError::TooLarge`] and stays in
/// `pfns`; the entries written before it are in `out` but not counted.
pub fn encode_pfns(
    pfns: &mut core::iter::Peekable<impl Iterator<Item = Pfn>>,
    out: &mut [u8],
) -> Result<usize, EncodeError> {
    let mut written = 0;
    for slot in out.chunks_exact_mut(4) {
        let Some(pfn) = pfns.peek() else { break };
        let raw = u32::try_from(pfn.get()).map_err(|_| EncodeError::TooLarge)?;
        slot.copy_from_slice(&raw.to_le_bytes());
        pfns.next();
        written += 1;
    }
    Ok(written)
}

/// A run of consecutive 4 KiB frames in a PFN array.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PfnRun {
    /// The first frame.
    pub first: Pfn,
    /// How many frames (at least one).
    pub frames: u64,
}

impl PfnRun {
    /// The run's guest physical address and length in bytes.
    pub fn range(&self) -> (u64, u64) {
        (self.first.addr().get(), self.frames << PAGE_SHIFT)
    }
}

/// Decodes an untrusted balloon PFN array into maximal runs of frames that follow each other
/// in the array and in memory. Every `u32` is a frame number; a buffer that is not a whole
/// number of them ends with [`PfnError::TrailingBytes`] after the runs before it.
pub fn pfn_runs(bytes: &[u8]) -> PfnRuns<'_> {
    PfnRuns { bytes }
}

/// The iterator of [`pfn_runs`].
#[derive(Clone, Debug)]
pub struct PfnRuns<'a> {
    bytes: &'a [u8],
}

impl Iterator for PfnRuns<'_> {
    type Item = Result<PfnRun, PfnError>;

    fn next(&mut self) -> Option<Self::Item> {
        let Some((raw, rest)) = self.bytes.split_first_chunk::<4>() else {
            if self.bytes.is_empty() {
                return None;
            }
            self.bytes = &[];
            return Some(Err(PfnError::TrailingBytes));
        };
        let first = u64::from(u32::from_le_bytes(*raw));
        let mut frames = 1u64;
        self.bytes = rest;
        while let Some((raw, rest)) = self.bytes.split_first_chunk::<4>() {
            if u64::from(u32::from_le_bytes(*raw)) != first + frames {
                break;
            }
            frames += 1;
            self.bytes = rest;
        }
        const_assert!(1 << 32 < FRAME_LIMIT);
        Some(Ok(PfnRun {
            first: Pfn::from_raw(first),
            frames,
        }))
    }
}

impl core::iter::FusedIterator for PfnRuns<'_> {}
