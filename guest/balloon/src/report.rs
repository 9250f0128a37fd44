//! Free page reporting: hvmem's report transports over the reporting queue.

use alloc::vec::Vec;

use hvmem::buddy::Block;
use hvmem::hint::guest::{BatchId, PipelinedTransport, ReportTransport};
use virtio_drivers::Hal;
use virtio_drivers::transport::Transport;

use crate::device::VirtIOBalloon;
use crate::error::ReportError;
use crate::ring::Buf;

/// The most blocks in one report batch (Linux `PAGE_REPORTING_CAPACITY`; QEMU's reporting
/// queue has 32 entries, so without indirect descriptors one such batch fills it).
pub const MAX_BATCH: usize = 32;

/// The tag of [`ReportTransport::report`]'s batch: pipelined ids come from hvmem's 64-bit
/// sequence and never reach it in practice, and `report` refuses to run beside them.
const SYNC_TAG: u64 = u64::MAX;

impl<H: Hal, T: Transport> VirtIOBalloon<H, T> {
    /// The next batch the host returned, if any: hand it to
    /// [`Pipeline::complete`](hvmem::hint::guest::Pipeline::complete) as reported. Returns
    /// `Ok(None)` when nothing more came back.
    ///
    /// [`ReportError::BadUsedLength`] carries the id of a batch the host returned with a
    /// length longer than the batch: complete that one as **not** reported. A token the
    /// driver never queued fails with [`RingError::UnknownToken`](crate::RingError) and
    /// leaves the queue unusable (fail the pipeline).
    pub fn poll_report(&mut self) -> Result<Option<BatchId>, ReportError> {
        let ring = self.reporting.as_mut().ok_or(ReportError::NotNegotiated)?;
        let Some(used) = ring.pop(&self.mem).map_err(ReportError::Ring)? else {
            return Ok(None);
        };
        self.stats.reports_completed += 1;
        let id = BatchId::from_raw(used.slot.tag);
        if u64::from(used.len) > used.slot.writable_bytes() {
            return Err(ReportError::BadUsedLength { id, len: used.len });
        }
        Ok(Some(id))
    }

    /// Report batches in flight.
    pub fn reports_in_flight(&self) -> usize {
        self.reporting.as_ref().map_or(0, |r| r.in_flight())
    }

    /// The ids of the report batches in flight.
    pub fn report_ids_in_flight(&self) -> impl Iterator<Item = BatchId> + '_ {
        self.reporting
            .iter()
            .flat_map(|r| r.tags())
            .map(BatchId::from_raw)
    }

    fn queue_batch(&mut self, tag: u64, batch: &[Block]) -> Result<(), ReportError> {
        let ring = self.reporting.as_mut().ok_or(ReportError::NotNegotiated)?;
        if batch.is_empty() {
            return Err(ReportError::EmptyBatch);
        }
        if batch.len() > MAX_BATCH {
            return Err(ReportError::BatchTooLong {
                blocks: batch.len(),
            });
        }
        let mut bufs = Vec::with_capacity(batch.len());
        for b in batch {
            let len = u32::try_from(b.order.bytes()).map_err(|_| ReportError::BlockTooLarge)?;
            bufs.push(Buf::Ram {
                pa: b.pfn.addr().get(),
                len,
            });
        }
        ring.add(&mut self.transport, &self.mem, tag, bufs)
            .map_err(ReportError::Ring)?;
        self.stats.reports_submitted += 1;
        Ok(())
    }
}

/// Queues a batch as one chain of device-writable buffers (one per block) under the batch id
/// and returns without waiting; [`VirtIOBalloon::poll_report`] gives the id back.
impl<H: Hal, T: Transport> PipelinedTransport for VirtIOBalloon<H, T> {
    type Error = ReportError;

    fn submit(&mut self, id: BatchId, batch: &[Block]) -> Result<(), ReportError> {
        self.queue_batch(id.get(), batch)
    }
}

/// Queues a batch and polls until the host returns it (Linux `virtballoon_free_page_report`
/// waits the same way). It waits without a bound: returning the blocks while the host may
/// still discard them would corrupt memory. Refused while pipelined batches are in flight.
impl<H: Hal, T: Transport> ReportTransport for VirtIOBalloon<H, T> {
    type Error = ReportError;

    fn report(&mut self, batch: &[Block]) -> Result<(), ReportError> {
        if self.reports_in_flight() != 0 {
            return Err(ReportError::Busy);
        }
        self.queue_batch(SYNC_TAG, batch)?;
        loop {
            match self.poll_report() {
                Ok(Some(_)) => return Ok(()),
                Ok(None) => core::hint::spin_loop(),
                Err(e) => return Err(e),
            }
        }
    }
}
