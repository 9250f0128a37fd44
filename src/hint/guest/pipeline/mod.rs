//! `Pipeline`: a reporting pass with several batches in flight, each returned only on its own
//! completion ("send 32, refill as 16 come back", (Duyck, "aerating memory via hinting", 2019)).

use core::fmt;
use core::ops::DerefMut;

use arrayvec::ArrayVec;

use super::reporter::{Cursor, PassEnd, PassError, Reporter};
use super::transport::{BatchId, PipelinedTransport};
use crate::buddy::{Block, FrameMeta, LockedBuddy, PutBackError};

/// A pipelined reporting pass over a [`Reporter`]: up to `WINDOW` batches of up to `CAP`
/// blocks in flight at once. `Pipeline<16, 2>` is the scheme of that thread: 32 pages sent, and 16
/// more as soon as a batch of 16 comes back.
///
/// The embedder drives it:
/// - [`start_pass`](Self::start_pass) when the reporter asked for a pass: fills the window;
/// - [`complete`](Self::complete) for each batch the host is done with (a used buffer), in
///   whatever order they come, then [`fill`](Self::fill) to refill the window;
/// - [`fail_all`](Self::fail_all) when the device goes away or resets.
///
/// The pass follows the same rules as [`Reporter::report_pass`] (order by order from
/// `min_order`, coldest blocks first, the budget, the watermark guard, the lock released
/// while the transport runs); it ends when it has nothing more to take, while its last
/// batches may still be in flight. A batch's blocks stay isolated until **its** completion:
/// they can't be allocated or merged while the host may be discarding them.
///
/// Dropping a pipeline with batches in flight leaves their blocks isolated for good; call
/// [`fail_all`](Self::fail_all) first.
pub struct Pipeline<const CAP: usize = 16, const WINDOW: usize = 2> {
    slots: ArrayVec<InFlight<CAP>, WINDOW>,
    next_id: u64,
    /// `Some` while a pass is filling.
    cursor: Option<Cursor>,
    totals: PipelineStats,
    /// [`storage_key`](crate::buddy::Buddy) of the allocator the pass and the batches in
    /// flight came from; 0 when there are none. Every call must name that allocator.
    owner: usize,
}

struct InFlight<const CAP: usize> {
    id: BatchId,
    /// The reporter's reset epoch when the batch was isolated.
    epoch: usize,
    blocks: ArrayVec<Block, CAP>,
}

/// Counters over the life of a [`Pipeline`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PipelineStats {
    /// Passes started.
    pub passes: u64,
    /// Batches submitted.
    pub submitted: u64,
    /// Batches completed (either way).
    pub completed: u64,
    /// Blocks put back as reported.
    pub reported_blocks: u64,
    /// Frames in those blocks.
    pub reported_frames: u64,
    /// Blocks put back unreported (failed, or isolated before a reset).
    pub unreported_blocks: u64,
}

/// What [`Pipeline::start_pass`] or [`Pipeline::fill`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Fill {
    /// Batches submitted by this call.
    pub submitted: usize,
    /// `Some` when the pass ended in this call (it has nothing more to take); its last
    /// batches may still be in flight.
    pub finished: Option<PassEnd>,
}

/// What [`Pipeline::complete`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Completed {
    /// Blocks the batch held, all back on the free lists.
    pub blocks: usize,
    /// Whether they went back reported (the host took them and no reset happened since they
    /// were isolated).
    pub reported: bool,
}

/// Why [`Pipeline::complete`] failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CompleteError {
    /// No batch with this id is in flight (already completed, or never submitted); nothing
    /// changed.
    UnknownBatch,
    /// A block of the batch was no longer isolated (someone put it back through
    /// [`LockedBuddy::lock`]); the batch's other blocks were put back and the batch is gone.
    BlockLost(PutBackError),
    /// The allocator given is not the one the batches in flight came from; nothing changed.
    ForeignBuddy,
}

impl fmt::Display for CompleteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownBatch => f.write_str("no report batch with this id is in flight"),
            Self::BlockLost(e) => write!(f, "an isolated block of the batch was lost: {e}"),
            Self::ForeignBuddy => {
                f.write_str("not the allocator the report batches in flight came from")
            }
        }
    }
}

impl core::error::Error for CompleteError {}

impl<const CAP: usize, const WINDOW: usize> Default for Pipeline<CAP, WINDOW> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const CAP: usize, const WINDOW: usize> Pipeline<CAP, WINDOW> {
    /// An empty pipeline: no pass, nothing in flight.
    pub const fn new() -> Self {
        const {
            assert!(
                WINDOW > 0,
                "a pipeline needs a window of at least one batch"
            )
        };
        Self {
            slots: ArrayVec::new_const(),
            next_id: 0,
            cursor: None,
            totals: PipelineStats {
                passes: 0,
                submitted: 0,
                completed: 0,
                reported_blocks: 0,
                reported_frames: 0,
                unreported_blocks: 0,
            },
            owner: 0,
        }
    }

    /// Starts a pass and fills the window. Refused, changing nothing, with
    /// [`PassError::PassActive`] while a pass of this pipeline is filling (batches of a
    /// finished pass still in flight don't count) or the reporter runs a pass elsewhere
    /// (its [`report_pass`](Reporter::report_pass), another pipeline), and with
    /// [`PassError::ForeignBuddy`] when batches of another allocator are still in flight.
    pub fn start_pass<S, const M: usize, T>(
        &mut self,
        reporter: &Reporter<CAP>,
        buddy: &LockedBuddy<S, M>,
        transport: &mut T,
    ) -> Result<Fill, PassError<T::Error>>
    where
        S: DerefMut<Target = [FrameMeta]>,
        T: PipelinedTransport,
    {
        if self.cursor.is_some() {
            return Err(PassError::PassActive);
        }
        if usize::from(reporter.policy().min_order.get()) > M {
            return Err(PassError::MinOrderAboveMaxOrder);
        }
        let key = buddy.storage_key();
        if self.owner != 0 && self.owner != key {
            return Err(PassError::ForeignBuddy);
        }
        if !reporter.begin_pass() {
            return Err(PassError::PassActive);
        }
        self.owner = key;
        self.cursor = Some(Cursor::new(reporter.policy().min_order));
        self.totals.passes += 1;
        self.fill(reporter, buddy, transport)
    }

    /// Submits batches while the window has room and the running pass has blocks to take.
    /// Does nothing when no pass is running. On a transport error the batch goes back
    /// unreported, the pass stops (batches already in flight stay in flight) and the
    /// reporter is idle again. Refused with [`PassError::ForeignBuddy`], changing nothing,
    /// when `buddy` is not the allocator of the running pass.
    pub fn fill<S, const M: usize, T>(
        &mut self,
        reporter: &Reporter<CAP>,
        buddy: &LockedBuddy<S, M>,
        transport: &mut T,
    ) -> Result<Fill, PassError<T::Error>>
    where
        S: DerefMut<Target = [FrameMeta]>,
        T: PipelinedTransport,
    {
        let mut fill = Fill::default();
        if self.cursor.is_some() && buddy.storage_key() != self.owner {
            return Err(PassError::ForeignBuddy);
        }
        let Some(cursor) = self.cursor.as_mut() else {
            return Ok(fill);
        };
        while !self.slots.is_full() && !cursor.done {
            let mut blocks = ArrayVec::<Block, CAP>::new();
            let epoch = {
                let mut b = buddy.lock();
                cursor.gather(&mut b, reporter.policy(), &mut blocks);
                reporter.epoch()
            };
            if blocks.is_empty() {
                cursor.done = true;
                break;
            }
            let id = BatchId(self.next_id);
            self.next_id = self.next_id.wrapping_add(1);
            if let Err(e) = transport.submit(id, &blocks) {
                let back = {
                    let mut b = buddy.lock();
                    reporter.put_back_batch(&mut b, &blocks, false, epoch)
                };
                self.totals.unreported_blocks += blocks.len() as u64;
                self.cursor = None;
                self.unbind_if_idle();
                reporter.abort_pass();
                return match back.result {
                    Ok(()) => Err(PassError::Transport(e)),
                    Err(lost) => Err(PassError::BlockLost(lost)),
                };
            }
            self.slots.push(InFlight { id, epoch, blocks });
            self.totals.submitted += 1;
            fill.submitted += 1;
        }
        if cursor.done {
            let cursor = *cursor;
            self.cursor = None;
            self.unbind_if_idle();
            fill.finished = Some(reporter.finish_pass(&cursor));
        }
        Ok(fill)
    }

    /// Forgets the allocator once no pass fills and no batch is in flight.
    fn unbind_if_idle(&mut self) {
        if self.cursor.is_none() && self.slots.is_empty() {
            self.owner = 0;
        }
    }

    /// The host is done with batch `id`: its blocks go back to the free lists, reported if
    /// `reported` (and no reset happened since they were isolated), otherwise unreported to
    /// the head of their lists. Completions may come in any order. Only this batch's blocks
    /// come back. Call [`fill`](Self::fill) afterwards to refill the window. Refused,
    /// changing nothing, for an unknown id and for an allocator other than the batch's
    /// ([`CompleteError::ForeignBuddy`]).
    pub fn complete<S, const M: usize>(
        &mut self,
        reporter: &Reporter<CAP>,
        buddy: &LockedBuddy<S, M>,
        id: BatchId,
        reported: bool,
    ) -> Result<Completed, CompleteError>
    where
        S: DerefMut<Target = [FrameMeta]>,
    {
        let i = self
            .slots
            .iter()
            .position(|s| s.id == id)
            .ok_or(CompleteError::UnknownBatch)?;
        let mut b = buddy.lock();
        if b.storage_key() != self.owner {
            return Err(CompleteError::ForeignBuddy);
        }
        let slot = self.slots.swap_remove(i);
        let back = reporter.put_back_batch(&mut b, &slot.blocks, reported, slot.epoch);
        drop(b);
        self.unbind_if_idle();
        self.totals.completed += 1;
        self.totals.reported_blocks += back.reported_blocks;
        self.totals.reported_frames += back.reported_frames;
        self.totals.unreported_blocks += slot.blocks.len() as u64 - back.reported_blocks;
        back.result.map_err(CompleteError::BlockLost)?;
        Ok(Completed {
            blocks: slot.blocks.len(),
            reported: back.reported_blocks > 0,
        })
    }

    /// The device went away or reset: stops the pass (the reporter is idle again) and puts
    /// back every batch in flight unreported. Returns how many batches there were. Refused
    /// with [`CompleteError::ForeignBuddy`], changing nothing, when `buddy` is not the
    /// allocator of the pass and the batches.
    pub fn fail_all<S, const M: usize>(
        &mut self,
        reporter: &Reporter<CAP>,
        buddy: &LockedBuddy<S, M>,
    ) -> Result<usize, CompleteError>
    where
        S: DerefMut<Target = [FrameMeta]>,
    {
        if self.owner != 0 && buddy.storage_key() != self.owner {
            return Err(CompleteError::ForeignBuddy);
        }
        if self.cursor.take().is_some() {
            reporter.abort_pass();
        }
        let n = self.slots.len();
        while let Some(slot) = self.slots.pop() {
            let back = {
                let mut b = buddy.lock();
                reporter.put_back_batch(&mut b, &slot.blocks, false, slot.epoch)
            };
            self.totals.completed += 1;
            self.totals.unreported_blocks += slot.blocks.len() as u64;
            // A lost block was put back by someone else: nothing left to do for it.
            let _ = back.result;
        }
        self.owner = 0;
        Ok(n)
    }

    /// Whether a pass is filling (it may submit more batches).
    pub fn pass_running(&self) -> bool {
        self.cursor.is_some()
    }

    /// Batches in flight.
    pub fn in_flight(&self) -> usize {
        self.slots.len()
    }

    /// The ids of the batches in flight, oldest submission not necessarily first.
    pub fn in_flight_ids(&self) -> impl Iterator<Item = BatchId> + '_ {
        self.slots.iter().map(|s| s.id)
    }

    /// The blocks of batch `id`, if it is in flight.
    pub fn batch(&self, id: BatchId) -> Option<&[Block]> {
        self.slots
            .iter()
            .find(|s| s.id == id)
            .map(|s| s.blocks.as_slice())
    }

    /// Frames held by batches in flight.
    pub fn in_flight_frames(&self) -> u64 {
        self.slots
            .iter()
            .flat_map(|s| s.blocks.iter())
            .map(|b| b.order.frames())
            .sum()
    }

    /// Counters over the life of the pipeline.
    pub fn stats(&self) -> PipelineStats {
        self.totals
    }
}

impl<const CAP: usize, const WINDOW: usize> fmt::Debug for Pipeline<CAP, WINDOW> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pipeline")
            .field("capacity", &CAP)
            .field("window", &WINDOW)
            .field("in_flight", &self.slots.len())
            .field("pass_running", &self.cursor.is_some())
            .field("stats", &self.totals)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests;
