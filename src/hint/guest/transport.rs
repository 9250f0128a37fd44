//! The two ways a batch of isolated blocks reaches the host: a synchronous call, or a queue
//! with several batches in flight.

use core::fmt;

use crate::buddy::Block;

/// A synchronous report (Linux `page_reporting_dev_info::report`, virtio-balloon's
/// `virtballoon_free_page_report`: add the scatter list to the reporting queue, kick, wait
/// for the used buffer).
///
/// The reporter calls it **without** the allocator lock held; every block of `batch` is
/// isolated (no allocation can return it, nothing merges with it) until the call returns.
/// Each block is `2^order` frames at `pfn`, naturally aligned; blocks of several orders may
/// share a batch. `Ok` means the host has processed every block (it may have discarded them);
/// the blocks go back to the free lists as reported. `Err` means the host may not have seen
/// them: they go back unreported, and the pass stops.
pub trait ReportTransport {
    /// The embedder's reason for a failed report, handed back in
    /// [`PassError::Transport`](super::PassError::Transport).
    type Error;

    /// Hands `batch` (1 to `CAP` blocks) to the host and waits until it is done with it.
    fn report(&mut self, batch: &[Block]) -> Result<(), Self::Error>;
}

/// A pipelined report queue (virtio's used-buffer semantics; the "send 32 pages, once
/// you get 16 of these back send 16 more"): [`Pipeline`](super::Pipeline) submits up to
/// `WINDOW` batches without waiting, and the embedder tells it when the host is done with each
/// through [`Pipeline::complete`](super::Pipeline::complete), in any order.
///
/// The pipeline calls `submit` without the allocator lock held. A submitted batch's blocks stay
/// isolated until **its own** completion arrives: the host may discard them at any time before
/// that, so the guest must not touch them (Duyck, "aerating memory via hinting", 2019:
/// returning a page before its hint is processed corrupts memory).
pub trait PipelinedTransport {
    /// The embedder's reason for a failed submission.
    type Error;

    /// Queues `batch` (1 to `CAP` blocks) for the host under `id` (virtio: the buffer's
    /// token) and returns without waiting. `Err` means nothing was queued: the batch goes back
    /// unreported and the pass stops.
    fn submit(&mut self, id: BatchId, batch: &[Block]) -> Result<(), Self::Error>;
}

/// The name of one submitted batch: unique for the life of a [`Pipeline`](super::Pipeline)
/// (a 64-bit sequence number), so a stale or forged completion is recognised and refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BatchId(pub(crate) u64);

impl BatchId {
    /// The number, e.g. to store as a virtqueue token.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// A batch id from a number the embedder stored (a virtqueue token). Any value is
    /// accepted; [`Pipeline::complete`](super::Pipeline::complete) refuses ids it did not
    /// hand out.
    pub const fn from_raw(raw: u64) -> Self {
        Self(raw)
    }
}

impl fmt::Display for BatchId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "batch {}", self.0)
    }
}
