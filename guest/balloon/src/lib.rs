//! A `no_std` driver for the **virtio memory balloon** (virtio device id 5), over
//! [`virtio_drivers`]' [`Transport`](virtio_drivers::transport::Transport) and split
//! [`VirtQueue`](virtio_drivers::queue::VirtQueue) — the device driver virtio-drivers lacks.
//!
//! # The device
//! A virtio-balloon lets the host take memory back from a running guest and lets the guest
//! tell the host which of its memory is free:
//! - **Inflate / deflate** (Linux `fill_balloon` / `leak_balloon`): the host sets a target
//!   (`num_pages`, in 4 KiB pages); the guest allocates that many pages, sends their frame
//!   numbers (`le32`, at most 256 per message like Linux's `VIRTIO_BALLOON_ARRAY_PFNS_MAX`) on
//!   the inflate queue, and the host discards them; deflating sends frame numbers on the
//!   deflate queue, and the guest reuses them only after the host returned the message
//!   (`MUST_TELL_HOST`; the driver keeps that order whether or not it was negotiated). The
//!   guest reports its balloon size in `actual` ([`VirtIOBalloon::set_actual`]).
//! - **Free page reporting** (`VIRTIO_BALLOON_F_REPORTING`; Linux
//!   `virtballoon_free_page_report`): a batch of free blocks, isolated from the guest's
//!   allocator, goes to the reporting queue as one chain of device-writable buffers (one per
//!   block: its physical address and `2^order * 4096` bytes); the host discards them and
//!   returns the chain. The driver implements hvmem's
//!   [`PipelinedTransport`](hvmem::hint::guest::PipelinedTransport) (the batch id is the
//!   chain's record; [`VirtIOBalloon::poll_report`] returns completed ids for
//!   [`Pipeline::complete`](hvmem::hint::guest::Pipeline::complete)) and
//!   [`ReportTransport`](hvmem::hint::guest::ReportTransport) (submit and wait).
//! - **Free page hinting** (`VIRTIO_BALLOON_F_FREE_PAGE_HINT`, virtio 1.2 5.5.6.5; Linux
//!   `send_free_pages` / `virtio_balloon_report_free_page`): during live migration the host
//!   writes a command id (>= 2) into config space; the guest sends that id (an `le32`
//!   device-readable buffer), then free blocks it allocated and holds (device-writable
//!   buffers), then the STOP id (0). The host skips those pages in the migration stream.
//!   When the command id becomes DONE (1) the guest may free the blocks again
//!   ([`VirtIOBalloon::hint_begin`], [`hint_block`](VirtIOBalloon::hint_block),
//!   [`hint_end`](VirtIOBalloon::hint_end), [`hint_done`](VirtIOBalloon::hint_done)).
//!
//! Not accepted: `PAGE_POISON` (the guest keeps no poison pattern in free pages, so there is
//! nothing the host must preserve, and hvmem's reporter needs no `poison_val`),
//! `DEFLATE_ON_OOM` (the driver never deflates on its own), `RING_EVENT_IDX` (it polls). The
//! statistics queue is negotiated but not used (see below).
//!
//! # Queue layout
//! QEMU 7.2 creates, in order: 0 inflate (128 entries), 1 deflate (128), 2 statistics (128,
//! always), 3 free-page-hint (1024) if it offers `FREE_PAGE_HINT`, then reporting (32) —
//! index 4, or 3 without hinting. The indices follow the **offered** features
//! ([`QueueLayout::for_offered`]); the driver accepts `STATS_VQ` whenever offered so that
//! Linux-style numbering by negotiated features agrees. Sizes the driver sets up are in
//! [`queue_size`]. Indirect descriptors (`RING_INDIRECT_DESC`) let a 32-block batch take one
//! of the reporting queue's 32 entries, so several batches can be in flight.
//!
//! # Checked against QEMU 7.2
//! Besides the unit tests' fake device, the driver ran in the `hvmem-guest` unikernel on
//! QEMU 7.2 (`-M microvm`, virtio-mmio, `free-page-reporting=on,free-page-hint=on`). Two
//! behaviours of the real stack shaped it:
//! - virtio-drivers 0.13 decodes device id 5 as `DeviceType::MemoryBalloon` (its name for id
//!   13 too), never as `MemoryBallooning`: [`VirtIOBalloon::new`] accepts both.
//! - While a hint run is under way QEMU's config shows command id 0 (its START state has no
//!   id to show) without announcing a change; a host STOP is announced (the config
//!   generation moves). The driver tells the two apart by the generation; Linux instead
//!   rereads the id only on a config interrupt. And QEMU's hint thread turns queue
//!   notifications off while it polls, so waiting for hint buffers kicks the queue anyway.
//!
//! # Polling
//! No interrupts: every operation that waits spins on the used ring
//! ([`VirtIOBalloon::set_spin_limit`] bounds the waits that may give up), and the embedder
//! polls config space (`num_pages`, the command id) from its idle loop.
//!
//! # Usage
//! ```ignore
//! // `Hal::share` must return the buffer's physical address (identity-mapped guest: the
//! // pointer itself); the queues, PFN arrays and indirect tables come from the heap.
//! // SAFETY: guest RAM is identity-mapped and blocks handed to the driver are isolated.
//! let mem = unsafe { RamMapping::identity() };
//! let mut dev = VirtIOBalloon::<MyHal, MmioTransport>::new(transport, mem, Features::SUPPORTED)?;
//!
//! // Balloon, from the idle loop: inflate with hvmem's Balloon, then tell the host.
//! let target = dev.target_pages()?;
//! balloon.inflate(&buddy, frames, &mut blocks)?;
//! dev.inflate_blocks(&blocks)?;          // or deflate_blocks, then free them to the buddy
//! dev.set_actual(held_pages)?;
//!
//! // Free page reporting, pipelined: the driver is the PipelinedTransport.
//! pipeline.start_pass(&reporter, &buddy, &mut dev)?;
//! while pipeline.in_flight() > 0 {
//!     match dev.poll_report() {
//!         Ok(Some(id)) => { pipeline.complete(&reporter, &buddy, id, true)?; }
//!         Ok(None) => core::hint::spin_loop(),
//!         Err(ReportError::BadUsedLength { id, .. }) => {
//!             pipeline.complete(&reporter, &buddy, id, false)?;
//!         }
//!         Err(_) => { let _ = pipeline.fail_all(&reporter, &buddy); break; }
//!     }
//!     pipeline.fill(&reporter, &buddy, &mut dev)?;
//! }
//!
//! // Free page hinting, from the idle loop.
//! if let Some(id) = dev.hint_pending()? {
//!     dev.hint_begin(id)?;
//!     while let Ok(block) = buddy.alloc(order) {   // largest order first; keep them
//!         if dev.hint_block(block.pfn.addr().get(), block.order.bytes()).is_err() { break; }
//!         held.push(block);
//!     }
//!     dev.hint_end()?;
//! }
//! if dev.hint_done()? { /* free every held block */ }
//! ```
//! A block refused by `hint_block` was not queued: free it or keep it, as you like. On
//! `QueueFull`, poll (`poll_hint`) and retry, or stop the run.
//!
//! # Why a guest-side crate, not a module of hvmem
//! hvmem's guest side is transport-agnostic: its reporter talks to the host through the
//! [`ReportTransport`](hvmem::hint::guest::ReportTransport) and
//! [`PipelinedTransport`](hvmem::hint::guest::PipelinedTransport) traits, and hvmem takes no
//! runtime dependency on virtio-drivers (nor on any transport). This crate is one embedder's
//! implementation of those traits over a real virtio device, and shows how to write one.
//!
//! # Unsafe code
//! Only in `ring.rs`: virtio-drivers' `add` / `pop_used`, and byte slices over guest RAM
//! blocks named by physical address. Their contract is [`RamMapping`]'s (built with an
//! `unsafe` constructor): blocks handed to the driver are mapped, and nobody touches them until
//! the device returns them.
//!
//! # Errors
//! One enum per operation ([`InitError`], [`ConfigError`], [`TellFailed`], [`ReportError`],
//! [`HintError`]); a device that returns a token it was never given, or a used length longer
//! than the buffers, gets an error, never a panic.

#![no_std]

extern crate alloc;
#[cfg(test)]
extern crate std;

mod device;
mod error;
mod features;
mod hint;
mod report;
#[allow(
    unsafe_code,
    reason = "the one module with the virtqueue and RAM-block unsafe code"
)]
mod ring;

#[cfg(test)]
mod tests;

pub use device::{DEFAULT_SPIN_LIMIT, DriverStats, PFNS_PER_MESSAGE, VirtIOBalloon};
pub use error::{ConfigError, HintError, InitError, ReportError, RingError, TellError, TellFailed};
pub use features::{Features, QueueLayout, negotiate, queue_size};
pub use hint::HintState;
pub use report::MAX_BATCH;
pub use ring::RamMapping;
