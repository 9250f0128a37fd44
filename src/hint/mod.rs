//! Free-page reporting end to end: the guest's hint batcher, the wire formats, the host's
//! receiver, the free-page-hint protocol and THP-order ballooning (seeds 000-003; Linux
//! `mm/page_reporting.c`, `drivers/virtio/virtio_balloon.c`).
//!
//! # Guest side: the hint batcher
//!
//! ## The idea
//! A guest tells its host which of its free memory the host may take back, in bounded
//! batches of large blocks (seeds 000 and 003: a hypercall per 4 KiB page is far too
//! expensive; "a virtio ring so we can pass a batch of these, e.g. 256 entries, 2M each").
//! [`Reporter`] does it over a [`LockedBuddy`](crate::buddy::LockedBuddy) whose free blocks
//! know whether they were reported:
//!
//! - **Batches** of up to `CAP` blocks (a const generic, 32 like Linux's
//!   `PAGE_REPORTING_CAPACITY`) of order [`ReportPolicy::min_order`] or larger (9 by
//!   default: one host huge page per block, so reporting never splits a host huge page).
//! - **Isolation, not allocation**: a batch's blocks are isolated in the allocator
//!   ([`Buddy::isolate_cold`](crate::buddy::Buddy::isolate_cold)): no `alloc` returns them and
//!   nothing merges with them, but they are still the allocator's. While the host works on
//!   them the lock is **released**, so the guest keeps allocating and freeing other memory.
//!   Then they go back to the free lists, reported on success, unreported on failure (Linux
//!   `page_reporting_cycle` / `page_reporting_drain`; seed 003's "aerator": a mini balloon
//!   that deflates as soon as the host has processed it).
//! - **Cold blocks first, and rotation**: a pass takes the unreported blocks freed longest
//!   ago (seed 002, Duyck: hint what is cold, not what was just freed and will be reused
//!   next). Reported blocks go to the tail of their list, a failed batch to the head; so the
//!   unreported blocks form a ring the reporter walks from its cold end, and each pass starts
//!   where the previous one stopped (Linux's `list_rotate_to_front`).
//! - **Budget**: per pass and per order, at most about 1/16 of the list, in whole batches
//!   (Linux `DIV_ROUND_UP(nr_free, PAGE_REPORTING_CAPACITY * 16)`), so one pass never holds
//!   much memory; a pass the budget stopped asks to be rescheduled.
//! - **Watermark guard**: a pass isolates a block only if at least `low_watermark +
//!   (CAP << min_order)` frames stay free afterwards (Linux checks `low_wmark_pages +
//!   (PAGE_REPORTING_CAPACITY << page_reporting_order)` before a zone's pass).
//! - **When to run**: [`Reporter::on_free`] on the free path (Linux
//!   `page_reporting_notify_free`) returns `true` when a pass is worth scheduling, once per
//!   idle period (Linux's IDLE / REQUESTED / ACTIVE state machine); the embedder owns the
//!   timing (Linux debounces 2 s).
//! - **Two transports**: [`ReportTransport`] reports one batch and waits
//!   ([`Reporter::report_pass`]); [`PipelinedTransport`] queues batches without waiting, and a
//!   [`Pipeline`] keeps a window of them in flight, each batch's blocks returning only on
//!   **its own** completion, completions in any order (virtio used buffers; seed 003's "send
//!   32 pages, once you get 16 of these back send 16 more").
//! - **Live migration**: [`Reporter::reset_reported`] forgets every reported flag (the
//!   destination backs all memory again) and makes batches in flight come back unreported.
//! - **Poison**: a guest that keeps a pattern in free pages may report only if the host
//!   preserves it ([`poison::negotiate`], virtio `VIRTIO_BALLOON_F_PAGE_POISON` /
//!   `poison_val`; seed 000).
//!
//! ## Concurrency protocol
//! The allocator lock protects every block state. A pass holds it only to isolate a batch
//! (up to `CAP` blocks in one acquisition) and to put a batch back (one acquisition), never
//! while the transport runs. An isolated block is in no free list, so concurrent `alloc`,
//! `free` and merging can't reach it: no block is ever both allocated and isolated, and
//! free + allocated + isolated frames always equal the managed frames (loom-checked in
//! `tests/loom_reporter.rs`). The request state and the reset epoch are atomics read
//! without the lock; the epoch is bumped and compared under the allocator lock, so a batch
//! isolated before a reset never comes back reported.
//!
//! ## Linux names
//! [`Reporter::report_pass`] = `page_reporting_process_zone` + `page_reporting_cycle`;
//! [`Reporter::on_free`] = `page_reporting_notify_free`; [`Reporter::request`] =
//! `__page_reporting_request`; [`ReportTransport::report`] =
//! `page_reporting_dev_info::report`; isolate / put back = `__isolate_free_page` /
//! `__putback_isolated_page`; [`poison::negotiate`] = `virtballoon_validate`.

//!
//! # Host side and wire formats
//!
//! - [`wire`]: the bytes on the queues, little-endian, with decoders for untrusted input —
//!   virtio descriptors and chains for reporting scatter lists, seed 003's `pa | order`
//!   hints, balloon PFN arrays, free-page-hint command ids.
//! - [`ReportReceiver`]: the host's end of reporting and ballooning. It validates each guest
//!   range against the [`GuestRamLayout`], clamps it to RAM, aligns it inward to whole host
//!   backing pages and discards through the embedder's [`Discard`], or only counts in a
//!   skip-but-ack [`DiscardMode`]; accepted + clamped + rejected bytes always add up (QEMU
//!   `virtio_balloon_handle_report`, Cloud Hypervisor / Firecracker `remove_range`).
//! - [`FreePageHintSession`]: the host's end of `VIRTIO_BALLOON_F_FREE_PAGE_HINT` during live
//!   migration; a hint clears bits only in the dirty bitmap of its own round, which is why a
//!   page reused right after its hint stays dirty (seed 003; QEMU `get_free_page_hints`).
//! - [`Balloon`]: a THP-order balloon (seed 001) that falls back order by order and, below
//!   the host page order, takes small blocks from host huge pages it already broke before
//!   breaking another (QEMU has `PartiallyBalloonedPage` on the host side only).
//!
//! Each of these is `&mut self` and run by one thread per queue; the balloon takes the
//! allocator lock per allocation, never across them. Their module docs give the details.

mod pipeline;
#[cfg(test)]
mod pipeline_tests;
pub mod poison;
mod policy;
mod reporter;
#[cfg(test)]
mod reporter_tests;
mod transport;

pub use pipeline::{CompleteError, Completed, Fill, Pipeline, PipelineStats};
pub use policy::{PolicyError, ReportPolicy};
pub use reporter::{PassEnd, PassError, PassStats, Reporter, RequestState};
pub use transport::{BatchId, PipelinedTransport, ReportTransport};

mod balloon;
mod fph;
mod layout;
mod receiver;
pub mod wire;

pub use balloon::{
    Balloon, BalloonConfig, BalloonNewError, BalloonViolation, DeflateError, DeflateOutcome,
    FallbackPolicy, InflateError, InflateOutcome,
};
pub use fph::{
    CmdIdOutcome, DirtyBitmap, FreePageHintSession, HintApplied, HintIgnored, HintState, HintStats,
};
pub use layout::{GuestRamLayout, LayoutError, RamLayout, RamRegion, RegionError};
pub use receiver::{
    BatchOutcome, ByteTotals, Discard, DiscardMode, RangeError, RangeOutcome, ReceiverStats,
    ReportReceiver, SkipReason,
};
