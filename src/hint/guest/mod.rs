//! The guest's side of free-page hinting: the reporter that hands cold free memory to the
//! host in bounded batches ([`Reporter`], [`Pipeline`], [`ReportPolicy`], the transports),
//! poison negotiation ([`poison`]) and a THP-order balloon ([`Balloon`]). Everything here
//! works on the guest's [`LockedBuddy`](crate::buddy::LockedBuddy) and needs neither `alloc`
//! nor `std`.
//!
//! # The idea
//! A guest tells its host which of its free memory the host may take back, in bounded
//! batches of large blocks: a hypercall per 4 KiB page is far too expensive; "E.g. 256
//! entries, 2M each - that's more like it" (Tsirkin, "Re: [RFC PATCH 3/4] kvm: Add guest
//! side support for free memory hints", 2019-02-11; and Duyck, "[v1,6/6] virtio-balloon: Add
//! support for aerating memory via hinting", 2019-06-19,
//! <20190619223338.1231.52537.stgit@localhost.localdomain>).
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
//!   `page_reporting_cycle` / `page_reporting_drain`; the "aerator" of (Duyck, "aerating
//!   memory via hinting", 2019): a mini balloon that deflates as soon as the host has
//!   processed it).
//! - **Cold blocks first, and rotation**: a pass takes the unreported blocks freed longest
//!   ago (Duyck, "Re: [RFC][Patch v9 0/6] KVM: Guest Free Page Hinting", 2019-03-07: hint
//!   what is cold, not what was just freed and will be reused next). Reported blocks go to
//!   the tail of their list, a failed batch to the head; so the unreported blocks form a
//!   ring the reporter walks from its cold end, and each pass starts where the previous one
//!   stopped (Linux's `list_rotate_to_front`).
//! - **Budget**: per pass and per order, at most about 1/16 of the list, in whole batches
//!   (Linux `DIV_ROUND_UP(nr_free, PAGE_REPORTING_CAPACITY * 16)`), so one pass never holds
//!   much memory; a pass the budget stopped asks to be rescheduled.
//! - **Watermark guard**: a pass isolates a block only if at least `low_watermark +
//!   (CAP << min_order)` frames stay free afterwards (Linux checks `low_wmark_pages +
//!   (PAGE_REPORTING_CAPACITY << page_reporting_order)` before a zone's pass).
//! - **When to run**: [`Reporter::on_free`] on the free path (Linux
//!   `page_reporting_notify_free`) returns `true` when a pass is worth scheduling, once per
//!   idle period (Linux's IDLE / REQUESTED / ACTIVE state machine); the embedder owns the
//!   timing (Linux debounces 2 s). [`Reporter::free`] frees and calls it for the frees that
//!   reach `min_order`, with the check folded into the allocator's own once
//!   [`Reporter::register`] has set the allocator's notify order, so a small free costs
//!   nothing extra.
//! - **Two transports**: [`ReportTransport`] reports one batch and waits
//!   ([`Reporter::report_pass`]); [`PipelinedTransport`] queues batches without waiting, and a
//!   [`Pipeline`] keeps a window of them in flight, each batch's blocks returning only on
//!   **its own** completion, completions in any order (virtio used buffers; "send 32 pages,
//!   once you get 16 of these back send 16 more", in Duyck, "aerating memory via hinting",
//!   2019).
//! - **Live migration**: [`Reporter::reset_reported`] forgets every reported flag (the
//!   destination backs all memory again) and makes batches in flight come back unreported.
//! - **Poison**: a guest that keeps a pattern in free pages may report only if the host
//!   preserves it ([`poison::negotiate`], virtio `VIRTIO_BALLOON_F_PAGE_POISON` /
//!   `poison_val`; Tsirkin, "kvm: Add guest side support for free memory hints", 2019).
//!
//! # Concurrency protocol
//! The allocator lock protects every block state. A pass holds it only to isolate a batch
//! (up to `CAP` blocks in one acquisition) and to put a batch back (one acquisition), never
//! while the transport runs. An isolated block is in no free list, so concurrent `alloc`,
//! `free` and merging can't reach it: no block is ever both allocated and isolated, and
//! free + allocated + isolated frames always equal the managed frames (loom-checked in
//! `tests/loom_reporter.rs`). The request state and the reset epoch are atomics read
//! without the lock; the epoch is bumped and compared under the allocator lock, so a batch
//! isolated before a reset never comes back reported.
//!
//! # Linux names
//! [`Reporter::report_pass`] = `page_reporting_process_zone` + `page_reporting_cycle`;
//! [`Reporter::on_free`] = `page_reporting_notify_free`; [`Reporter::register`] =
//! `page_reporting_register`; [`Reporter::request`] =
//! `__page_reporting_request`; [`ReportTransport::report`] =
//! `page_reporting_dev_info::report`; isolate / put back = `__isolate_free_page` /
//! `__putback_isolated_page`; [`poison::negotiate`] = `virtballoon_validate`.
//!
//! # The balloon
//! [`Balloon`] inflates to a host-given order, falls back order by order and, below the host
//! page order, takes small blocks from host huge pages it already broke before breaking
//! another (Hildenbrand, "Re: [RFC for Linux] virtio_balloon: Add VIRTIO_BALLOON_F_THP_ORDER
//! to handle THP spilt issue", 2020-03-12; Linux `fill_balloon` / `leak_balloon`). It is
//! `&mut self`, run by one thread, and takes the allocator lock per allocation, never across
//! them; its module docs give the details.

mod balloon;
mod pipeline;
pub mod poison;
mod policy;
mod reporter;
mod transport;

pub use balloon::{
    Balloon, BalloonConfig, BalloonNewError, BalloonViolation, DeflateError, DeflateOutcome,
    FallbackPolicy, InflateError, InflateOutcome,
};
pub use pipeline::{CompleteError, Completed, Fill, Pipeline, PipelineStats};
pub use policy::{PolicyError, ReportPolicy};
pub use reporter::{PassEnd, PassError, PassStats, Reporter, RequestState};
pub use transport::{BatchId, PipelinedTransport, ReportTransport};
