//! The host's side of free-page hinting: untrusted guest buffers in, discards of whole host
//! backing pages out.
//!
//! - [`ReportReceiver`]: the host's end of reporting and ballooning. It validates each guest
//!   range against the [`GuestRamLayout`], clamps it to RAM, aligns it inward to whole host
//!   backing pages and discards through the embedder's [`Discard`], or only counts in a
//!   skip-but-ack [`DiscardMode`]; accepted + clamped + rejected bytes always add up (QEMU
//!   `virtio_balloon_handle_report`, Cloud Hypervisor / Firecracker `remove_range`).
//! - [`GuestRamLayout`] / [`RamLayout`]: guest RAM as the host sees it, regions each backed by
//!   host pages of one size (QEMU RAM blocks, `GuestMemoryMmap` regions).
//! - [`FreePageHintSession`]: the host's end of `VIRTIO_BALLOON_F_FREE_PAGE_HINT` during live
//!   migration (QEMU `get_free_page_hints`); a hint clears bits only in the dirty bitmap of
//!   its own round, which is why a page reused right after its hint stays dirty (Tsirkin's
//!   reply in Duyck, "[v1,6/6] virtio-balloon: Add support for aerating memory via
//!   hinting", 2019-06-19, <20190619223338.1231.52537.stgit@localhost.localdomain>).
//!
//! # Concurrency
//! Each of these is `&mut self` and run by one thread per queue (QEMU processes a virtqueue
//! under the BQL, and the free-page-hint state under `free_page_lock`); the embedder
//! serializes queue processing. The bytes they decode are described in [`super::wire`].

mod fph;
mod layout;
mod receiver;

pub use fph::{
    CmdIdOutcome, DirtyBitmap, FreePageHintSession, HintApplied, HintIgnored, HintState, HintStats,
};
pub use layout::{GuestRamLayout, LayoutError, RamLayout, RamRegion, RegionError};
pub use receiver::{
    BatchOutcome, ByteTotals, Discard, DiscardMode, RangeError, RangeOutcome, ReceiverStats,
    ReportReceiver, SkipReason,
};
