//! The `pa | order` hints of (Duyck, "aerating memory via hinting", 2019).

use static_assertions::const_assert;

use super::VIRTIO_BALLOON_PFN_SHIFT;
use crate::addr::PAGE_SIZE;
use crate::buddy::Block;

/// The low bits of a `pa | order` hint that hold the order.
pub const HINT_ORDER_MASK: u64 = (1 << VIRTIO_BALLOON_PFN_SHIFT) - 1;
/// The largest order a `pa | order` hint can name: a block of `4096 << 51` bytes is the
/// largest power of two a `u64` length holds.
pub const HINT_MAX_ORDER: u8 = (64 - VIRTIO_BALLOON_PFN_SHIFT - 1) as u8;
// The patch's `BUILD_BUG_ON((64 - VIRTIO_BALLOON_PFN_SHIFT) >= (1 << VIRTIO_BALLOON_PFN_SHIFT))`:
// every order that fits in 64 bits fits in the bits below the frame number.
const_assert!((64 - VIRTIO_BALLOON_PFN_SHIFT) < (1 << VIRTIO_BALLOON_PFN_SHIFT));
const_assert!((HINT_MAX_ORDER as u64) <= HINT_ORDER_MASK);

/// Why a `pa | order` hint was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum HintError {
    /// The address is not aligned to the block the order names (or not to 4 KiB).
    Unaligned,
    /// The order is above [`HINT_MAX_ORDER`].
    OrderTooLarge,
    /// The block runs past the end of the 64-bit address space.
    Overflow,
    /// The buffer is not a whole number of 8-byte hints.
    TrailingBytes,
}

hint_error_display!(HintError {
    Unaligned => "hint address not aligned to its block",
    OrderTooLarge => "hint order too large",
    Overflow => "hinted block runs past the address space",
    TrailingBytes => "hint buffer is not a whole number of 8-byte hints",
});

/// A naturally aligned block named by its address and order, as the aerator's
/// `page_to_hints_pa_order` sends it: `pa | order`, order in 4 KiB units.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PaOrderHint {
    addr: u64,
    order: u8,
}

impl PaOrderHint {
    /// A hint for the block of `4096 << order` bytes at `addr`, which must be aligned to it.
    pub const fn new(addr: u64, order: u8) -> Result<Self, HintError> {
        if order > HINT_MAX_ORDER {
            return Err(HintError::OrderTooLarge);
        }
        let len = PAGE_SIZE << order;
        if addr & (len - 1) != 0 {
            return Err(HintError::Unaligned);
        }
        // Aligned and below 2^64: `addr + len <= 2^64`, and `== 2^64` only for the last block.
        if addr.checked_add(len - 1).is_none() {
            return Err(HintError::Overflow);
        }
        Ok(Self { addr, order })
    }

    /// The hint for a buddy block. Every block the buddy hands out is representable; a
    /// hand-made [`Block`] (its fields are public) whose frame is not aligned to its order
    /// is refused like [`new`](Self::new) refuses it, rather than becoming a hint whose own
    /// wire form does not decode.
    pub const fn from_block(block: &Block) -> Result<Self, HintError> {
        Self::new(block.pfn.addr().get(), block.order.get())
    }

    /// The address of the block's first byte.
    pub const fn addr(self) -> u64 {
        self.addr
    }

    /// The order, in 4 KiB units.
    pub const fn order(self) -> u8 {
        self.order
    }

    /// The block's length in bytes.
    pub const fn len(self) -> u64 {
        PAGE_SIZE << self.order
    }

    /// Always `false`: a block holds at least one page (for clippy's `len_without_is_empty`).
    pub const fn is_empty(self) -> bool {
        false
    }

    /// The `u64` on the wire: `addr | order`.
    pub const fn encode(self) -> u64 {
        self.addr | self.order as u64
    }

    /// Reads a hint from its `u64`, refusing what no aligned block encodes.
    pub const fn decode(raw: u64) -> Result<Self, HintError> {
        let order = raw & HINT_ORDER_MASK;
        if order > HINT_MAX_ORDER as u64 {
            return Err(HintError::OrderTooLarge);
        }
        Self::new(raw & !HINT_ORDER_MASK, order as u8)
    }

    /// The 8 bytes on the wire.
    pub const fn to_bytes(self) -> [u8; 8] {
        self.encode().to_le_bytes()
    }
}

/// Decodes a buffer of `le64` hints. Each hint decodes on its own, so one bad hint does not
/// hide the others; a buffer that is not a whole number of hints ends with
/// [`HintError::TrailingBytes`].
pub fn decode_hints(bytes: &[u8]) -> HintIter<'_> {
    HintIter { bytes }
}

/// The iterator of [`decode_hints`].
#[derive(Clone, Debug)]
pub struct HintIter<'a> {
    bytes: &'a [u8],
}

impl Iterator for HintIter<'_> {
    type Item = Result<PaOrderHint, HintError>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.bytes.split_first_chunk::<8>() {
            Some((raw, rest)) => {
                self.bytes = rest;
                Some(PaOrderHint::decode(u64::from_le_bytes(*raw)))
            }
            None if self.bytes.is_empty() => None,
            None => {
                self.bytes = &[];
                Some(Err(HintError::TrailingBytes))
            }
        }
    }
}

impl core::iter::FusedIterator for HintIter<'_> {}
