//! Wire formats between a guest's hinting code and the host: what the bytes on a virtqueue
//! look like, encoded by the guest and decoded, untrusted, by the host.
//!
//! Everything is little-endian: virtio 1.x is little-endian, and the balloon's config space
//! is little-endian even for legacy devices (Linux `virtio_cread_le` in
//! `virtio_balloon_cmd_id_received`).
//!
//! - **Reporting scatter entries** (virtio `VIRTIO_BALLOON_F_REPORTING`; Linux
//!   `virtballoon_free_page_report` adds a batch as one chain of device-writable buffers with
//!   `virtqueue_add_inbuf`): each entry is an (address, length) pair. On a split virtqueue an
//!   entry lives in a 16-byte descriptor, [`VirtqDesc`]: `le64 addr, le32 len, le16 flags,
//!   le16 next`. [`walk_chain`] follows a chain through an untrusted descriptor table (QEMU
//!   `virtqueue_pop`, vm-virtio `DescriptorChain`): indices are bounds-checked, loops end
//!   with an error, indirect descriptors and unknown flags are refused.
//! - **`pa | order` hints** (the aerator's `page_to_hints_pa_order` in Duyck, "aerating
//!   memory via hinting", 2019): one `u64` per
//!   block, the block's physical address with the order (in 4 KiB units) in the low
//!   [`VIRTIO_BALLOON_PFN_SHIFT`] bits, which the address's alignment leaves free. The order
//!   of any block that fits in 64 bits is below `64 - 12 = 52 < 4096`, which is the
//!   `BUILD_BUG_ON` of that patch, a [`const_assert!`] here.
//! - **Balloon PFN arrays** (inflate and deflate queues): `le32` frame numbers in 4 KiB units
//!   (`VIRTIO_BALLOON_PFN_SHIFT`), whatever the guest's page size. A block of order `k` is
//!   `2^k` consecutive entries. [`PfnRuns`] gives the host maximal runs of consecutive frames
//!   so it can discard a whole 2 MiB page with one call (Firecracker's
//!   `compact_page_frame_numbers`, without the sort, which would need a buffer).
//! - **Free-page-hint command ids** (`VIRTIO_BALLOON_F_FREE_PAGE_HINT`): `le32`;
//!   [`CmdId::STOP`] = 0, [`CmdId::DONE`] = 1, 2 and up name one hinting run.
//!
//! Decoders never read past their input, never panic, and say what was wrong with a small
//! error enum per format; encoders refuse what the format cannot express.

use static_assertions::const_assert;

use crate::addr::PAGE_SHIFT;

/// Implements `Display` (one fixed text per variant) and `core::error::Error` for the error
/// enums of the host-side hint modules.
macro_rules! hint_error_display {
    ($ty:ident { $($variant:ident => $text:literal,)* }) => {
        impl core::fmt::Display for $ty {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                f.write_str(match self {
                    $(Self::$variant => $text,)*
                })
            }
        }

        impl core::error::Error for $ty {}
    };
}
pub(crate) use hint_error_display;

/// The balloon's frame numbers are in 4 KiB units, whatever the guest's page size (virtio
/// `VIRTIO_BALLOON_PFN_SHIFT`).
pub const VIRTIO_BALLOON_PFN_SHIFT: u32 = 12;
const_assert!(VIRTIO_BALLOON_PFN_SHIFT == PAGE_SHIFT);

mod cmd_id;
mod desc;
mod pa_order;
mod pfn;

pub use cmd_id::{CmdId, CmdIdError, CmdKind};
pub use desc::{
    ChainWalk, DescError, Direction, ScatterEntry, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE, VIRTQ_DESC_SIZE, VIRTQ_MAX_SIZE, VirtqDesc, encode_chain, walk_chain,
};
pub use pa_order::{
    HINT_MAX_ORDER, HINT_ORDER_MASK, HintError, HintIter, PaOrderHint, decode_hints,
};
pub use pfn::{EncodeError, PfnError, PfnRun, PfnRuns, block_pfns, encode_pfns, pfn_runs};

#[cfg(test)]
mod tests;
