//! The free-page reporter (synchronous passes and the pipeline) against a model that is the
//! state of every frame: free (reported or not), allocated, or in a batch in flight.

use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use super::Rng;
use crate::addr::{PageOrder, Pfn};
use crate::buddy::{Block, BlockState, Buddy, FrameMeta, LockedBuddy};
use crate::hint::guest::{
    BatchId, CompleteError, PassError, Pipeline, PipelinedTransport, ReportPolicy, ReportTransport,
    Reporter, RequestState,
};

/// The largest order of the allocator under test.
pub const MAX_ORDER: usize = 8;
/// First frame of the window (not aligned to large orders).
pub const WINDOW_BASE: u64 = 0x4_0000 - 40;
/// Frames in the window; a hole at `[1400, 1500)` splits it into two ranges.
pub const WINDOW_FRAMES: u64 = 3000;
/// Blocks per batch.
pub const CAP: usize = 4;
/// Batches the pipeline keeps in flight.
pub const WINDOW: usize = 3;

type TestBuddy = LockedBuddy<Vec<FrameMeta>, MAX_ORDER>;

/// The policy of one run, folded into useful ranges by [`Knobs::policy`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(fuzzing, derive(arbitrary::Arbitrary))]
pub struct Knobs {
    /// `min_order % 10`: 9 is above `MAX_ORDER`, so every pass is refused.
    pub min_order: u8,
    /// `1 + budget_divisor % 16`.
    pub budget_divisor: u8,
    /// `low_watermark % 1024` frames.
    pub low_watermark: u16,
    /// `notify_frames % 2048`.
    pub notify_frames: u16,
}

impl Knobs {
    /// Knobs from a seed, for the deterministic tests (min order in range).
    pub fn from_seed(seed: u64) -> Self {
        let mut rng = Rng::new(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        Self {
            min_order: rng.below(MAX_ORDER as u64 + 1) as u8,
            budget_divisor: rng.below(16) as u8,
            low_watermark: rng.below(600) as u16,
            notify_frames: rng.below(2048) as u16,
        }
    }

    /// The policy these knobs describe.
    pub fn policy(&self) -> ReportPolicy {
        ReportPolicy {
            min_order: PageOrder::from_raw(self.min_order % 10),
            low_watermark: u64::from(self.low_watermark % 1024),
            budget_divisor: 1 + u32::from(self.budget_divisor % 16),
            notify_frames: u64::from(self.notify_frames % 2048),
        }
    }
}

/// One operation on the guest: allocator traffic, and the reporter's passes and completions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(fuzzing, derive(arbitrary::Arbitrary))]
pub enum ReportOp {
    /// Allocate a block of `order % (MAX_ORDER + 1)`.
    Alloc { order: u8 },
    /// Free the k-th live block (`free_merged`, then `on_free` with the merged order).
    Free { k: u16 },
    /// Start a pipelined pass (refused while one is filling).
    StartPass,
    /// Refill the pipeline's window.
    Fill,
    /// The host completes the k-th batch in flight; it took the blocks.
    Complete { k: u8 },
    /// The host completes the k-th batch in flight without taking the blocks.
    Fail { k: u8 },
    /// A completion with an id that is not in flight.
    CompleteUnknown { id: u8 },
    /// The next submission fails.
    FailNextSubmit,
    /// The device resets: every batch in flight fails, the pass stops.
    FailAll,
    /// Live migration: every reported flag is forgotten.
    Reset,
    /// A synchronous pass (only while no pipelined pass is filling); the transport fails the
    /// batch `fail_at` if it is `Some` and small.
    SyncPass { fail_at: Option<u8> },
}

/// What the model knows of one frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cell {
    Hole,
    Free {
        reported: bool,
    },
    Alloc,
    /// In a pipelined batch in flight.
    InFlight(u64),
}

/// Records submissions; fails one on request.
#[derive(Default)]
struct PipeTransport {
    submitted: Vec<(BatchId, Vec<Block>)>,
    fail_next: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Refused;

impl core::fmt::Display for Refused {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("refused")
    }
}

impl PipelinedTransport for PipeTransport {
    type Error = Refused;

    fn submit(&mut self, id: BatchId, batch: &[Block]) -> Result<(), Refused> {
        if core::mem::take(&mut self.fail_next) {
            return Err(Refused);
        }
        self.submitted.push((id, batch.to_vec()));
        Ok(())
    }
}

/// Records batches of a synchronous pass and checks, while each is out, that the lock is
/// free and every block is isolated.
struct SyncTransport<'a> {
    buddy: &'a TestBuddy,
    batches: Vec<Vec<Block>>,
    fail_at: Option<usize>,
    free_during: Vec<u64>,
    problem: Option<String>,
}

impl ReportTransport for SyncTransport<'_> {
    type Error = Refused;

    fn report(&mut self, batch: &[Block]) -> Result<(), Refused> {
        match self.buddy.try_lock() {
            None => self.problem = Some("allocator lock held during a report".into()),
            Some(b) => {
                if let Some(x) = batch.iter().find(|x| {
                    !matches!(b.block_info(x.pfn), Some(i) if i.state == BlockState::Isolated
                        && i.order == x.order && i.pfn == x.pfn)
                }) {
                    self.problem = Some(format!("{x:?} reported but not isolated"));
                }
                self.free_during.push(b.free_frames());
            }
        }
        let i = self.batches.len();
        self.batches.push(batch.to_vec());
        if self.fail_at == Some(i) {
            Err(Refused)
        } else {
            Ok(())
        }
    }
}

/// The reporter, its pipeline, the allocator, and the model.
pub struct ReportHarness {
    buddy: TestBuddy,
    reporter: Reporter<CAP>,
    pipeline: Pipeline<CAP, WINDOW>,
    transport: PipeTransport,
    policy: ReportPolicy,
    cells: Vec<Cell>,
    live: Vec<Block>,
    /// Batches in flight: id -> (blocks, resets seen when submitted).
    in_flight: Vec<(BatchId, Vec<Block>, u64)>,
    resets: u64,
    coverage: Coverage,
}

/// What a run exercised, so tests can check that it reached the interesting paths.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Coverage {
    /// Batches submitted by the pipeline.
    pub submitted: u64,
    /// Pipelined batches completed as reported.
    pub completed_reported: u64,
    /// Pipelined batches completed unreported (failed, or isolated before a reset).
    pub completed_unreported: u64,
    /// Batches reported by synchronous passes.
    pub sync_batches: u64,
    /// Passes that failed on the transport.
    pub transport_failures: u64,
    /// Passes that ended on the watermark.
    pub watermark_stops: u64,
    /// Passes that ended on the budget.
    pub budget_stops: u64,
}

fn check(cond: bool, what: impl FnOnce() -> String) -> Result<(), String> {
    if cond { Ok(()) } else { Err(what()) }
}

impl ReportHarness {
    /// A guest with two ranges of free, unreported memory and the policy of `knobs`.
    pub fn new(knobs: Knobs) -> Self {
        let policy = knobs.policy();
        let mut b = match Buddy::new(
            vec![FrameMeta::HOLE; WINDOW_FRAMES as usize],
            Pfn::from_raw(WINDOW_BASE),
        ) {
            Ok(b) => b,
            Err(e) => unreachable!("test window refused: {e}"),
        };
        let mut cells = vec![Cell::Hole; WINDOW_FRAMES as usize];
        for (start, frames) in [(0u64, 1400u64), (1500, 1500)] {
            if let Err(e) = b.add_range(Pfn::from_raw(WINDOW_BASE + start), frames) {
                unreachable!("test range refused: {e}");
            }
            cells[start as usize..(start + frames) as usize].fill(Cell::Free { reported: false });
        }
        let reporter = match Reporter::new(policy) {
            Ok(r) => r,
            Err(e) => unreachable!("test policy refused: {e}"),
        };
        Self {
            buddy: LockedBuddy::new(b),
            reporter,
            pipeline: Pipeline::new(),
            transport: PipeTransport::default(),
            policy,
            cells,
            live: Vec::new(),
            in_flight: Vec::new(),
            resets: 0,
            coverage: Coverage::default(),
        }
    }

    /// What the run exercised so far.
    pub fn coverage(&self) -> Coverage {
        self.coverage
    }

    fn set(&mut self, b: &Block, cell: Cell) {
        let start = (b.pfn.get() - WINDOW_BASE) as usize;
        self.cells[start..start + b.order.frames() as usize].fill(cell);
    }

    fn frames(&self, b: &Block) -> &[Cell] {
        let start = (b.pfn.get() - WINDOW_BASE) as usize;
        self.cells
            .get(start..start + b.order.frames() as usize)
            .unwrap_or(&[])
    }

    /// A batch the reporter took: only free frames, at least `min_order`, no overlap with the
    /// other blocks taken in the same op.
    fn check_taken(&self, batch: &[Block], taken: &mut Vec<Block>) -> Result<(), String> {
        check(!batch.is_empty() && batch.len() <= CAP, || {
            format!("batch of {} blocks", batch.len())
        })?;
        for x in batch {
            check(x.order >= self.policy.min_order, || {
                format!("{x:?} below min order")
            })?;
            check(x.pfn.is_aligned(x.order), || format!("{x:?} unaligned"))?;
            let cells = self.frames(x);
            check(
                cells.len() as u64 == x.order.frames()
                    && cells.iter().all(|c| matches!(c, Cell::Free { .. })),
                || format!("{x:?} isolated while not free in the model"),
            )?;
            let overlap = taken.iter().any(|t| {
                let (a0, a1) = (x.pfn.get(), x.pfn.get() + x.order.frames());
                let (b0, b1) = (t.pfn.get(), t.pfn.get() + t.order.frames());
                a0 < b1 && b0 < a1
            });
            check(!overlap, || format!("{x:?} taken twice"))?;
            taken.push(*x);
        }
        Ok(())
    }

    /// Registers the batches the pipeline submitted since `before` submissions.
    fn take_submissions(&mut self, before: usize) -> Result<(), String> {
        let new: Vec<_> = self.transport.submitted[before..].to_vec();
        let mut taken = Vec::new();
        for (id, blocks) in new {
            self.check_taken(&blocks, &mut taken)?;
            check(self.pipeline.batch(id) == Some(&blocks[..]), || {
                format!("{id} submitted but not in flight")
            })?;
            for b in &blocks {
                self.set(b, Cell::InFlight(id.get()));
            }
            self.in_flight.push((id, blocks, self.resets));
        }
        if !self.transport.submitted[before..].is_empty() {
            let free = self.buddy.lock().free_frames();
            let guard = self.policy.guard_frames(CAP);
            check(free >= guard, || {
                format!("{free} free frames after a fill, guard {guard}")
            })?;
        }
        Ok(())
    }

    /// Applies one op to the guest and the model, then audits both.
    pub fn apply(&mut self, op: ReportOp) -> Result<(), String> {
        match op {
            ReportOp::Alloc { order } => self.alloc(order % (MAX_ORDER as u8 + 1))?,
            ReportOp::Free { k } => self.free(k)?,
            ReportOp::StartPass | ReportOp::Fill => self.fill(op == ReportOp::StartPass)?,
            ReportOp::Complete { k } => self.complete(k, true)?,
            ReportOp::Fail { k } => self.complete(k, false)?,
            ReportOp::CompleteUnknown { id } => {
                let id = BatchId::from_raw(u64::from(id) * 7 + 1000);
                if self.pipeline.batch(id).is_none() {
                    let before = self.buddy.lock().clone();
                    let got = self
                        .pipeline
                        .complete(&self.reporter, &self.buddy, id, true);
                    check(got == Err(CompleteError::UnknownBatch), || {
                        format!("unknown {id} completed: {got:?}")
                    })?;
                    check(self.buddy.lock().same_state(&before), || {
                        "refused completion changed the allocator".into()
                    })?;
                }
            }
            ReportOp::FailNextSubmit => self.transport.fail_next = true,
            ReportOp::FailAll => {
                let n = self
                    .pipeline
                    .fail_all(&self.reporter, &self.buddy)
                    .map_err(|e| format!("fail_all: {e}"))?;
                check(n == self.in_flight.len(), || {
                    format!("fail_all returned {n} batches")
                })?;
                for (_, blocks, _) in core::mem::take(&mut self.in_flight) {
                    for b in &blocks {
                        self.set(b, Cell::Free { reported: false });
                    }
                }
                check(!self.pipeline.pass_running(), || {
                    "pass still running after fail_all".into()
                })?;
            }
            ReportOp::Reset => {
                self.reporter.reset_reported(&self.buddy);
                self.resets += 1;
                for c in &mut self.cells {
                    if let Cell::Free { reported } = c {
                        *reported = false;
                    }
                }
                check(self.buddy.lock().reported_frames() == 0, || {
                    "reported frames after reset".into()
                })?;
                check(self.reporter.state() != RequestState::Idle, || {
                    "reset did not ask for a pass".into()
                })?;
            }
            ReportOp::SyncPass { fail_at } => self.sync_pass(fail_at)?,
        }
        self.audit()
    }

    fn alloc(&mut self, order: u8) -> Result<(), String> {
        let Ok(b) = self.buddy.alloc(PageOrder::from_raw(order)) else {
            return Ok(());
        };
        check(
            self.frames(&b)
                .iter()
                .all(|c| matches!(c, Cell::Free { .. })),
            || format!("alloc returned {b:?} over {:?}", self.frames(&b).first()),
        )?;
        self.set(&b, Cell::Alloc);
        self.live.push(b);
        Ok(())
    }

    fn free(&mut self, k: u16) -> Result<(), String> {
        if self.live.is_empty() {
            return Ok(());
        }
        let b = self.live.swap_remove(usize::from(k) % self.live.len());
        let merged = self
            .buddy
            .free_merged(b.pfn, b.order)
            .map_err(|e| format!("free of live {b:?}: {e}"))?;
        check(merged >= b.order, || format!("merged order {merged:?}"))?;
        self.set(&b, Cell::Free { reported: false });
        if self.reporter.on_free(merged) {
            check(self.reporter.state() == RequestState::Requested, || {
                "on_free asked for a pass but the state is not requested".into()
            })?;
        }
        Ok(())
    }

    fn fill(&mut self, start: bool) -> Result<(), String> {
        let before = self.transport.submitted.len();
        let was_running = self.pipeline.pass_running();
        let in_flight_before = self.in_flight.len();
        let got = if start {
            self.pipeline
                .start_pass(&self.reporter, &self.buddy, &mut self.transport)
        } else {
            self.pipeline
                .fill(&self.reporter, &self.buddy, &mut self.transport)
        };
        match got {
            Ok(fill) => {
                check(
                    fill.submitted == self.transport.submitted.len() - before,
                    || {
                        format!(
                            "{fill:?} but {} submitted",
                            self.transport.submitted.len() - before
                        )
                    },
                )?;
                check(
                    in_flight_before + fill.submitted <= WINDOW
                        && self.pipeline.in_flight() == in_flight_before + fill.submitted,
                    || format!("window overflow: {fill:?}"),
                )?;
                self.coverage.submitted += fill.submitted as u64;
                if let Some(end) = fill.finished {
                    self.coverage.watermark_stops += u64::from(end.watermark_hit);
                    self.coverage.budget_stops += u64::from(end.budget_exhausted);
                    check(!self.pipeline.pass_running(), || {
                        "finished pass still running".into()
                    })?;
                    let state = self.reporter.state();
                    check(end.reschedule == (state == RequestState::Requested), || {
                        format!("{end:?} with state {state:?}")
                    })?;
                }
            }
            Err(PassError::PassActive) => check(start && was_running, || {
                "PassActive without a running pass".into()
            })?,
            Err(PassError::MinOrderAboveMaxOrder) => {
                check(self.policy.min_order.get() as usize > MAX_ORDER, || {
                    "MinOrderAboveMaxOrder refused a valid policy".into()
                })?
            }
            Err(PassError::Transport(Refused)) => {
                self.coverage.transport_failures += 1;
                check(!self.pipeline.pass_running(), || {
                    "pass still running after a failed submission".into()
                })?;
                check(self.reporter.state() == RequestState::Idle, || {
                    "reporter not idle after a failed submission".into()
                })?;
            }
            Err(e) => return Err(format!("fill failed: {e}")),
        }
        self.take_submissions(before)
    }

    fn complete(&mut self, k: u8, ok: bool) -> Result<(), String> {
        if self.in_flight.is_empty() {
            return Ok(());
        }
        let i = usize::from(k) % self.in_flight.len();
        let (id, blocks, resets) = self.in_flight.swap_remove(i);
        let got = self
            .pipeline
            .complete(&self.reporter, &self.buddy, id, ok)
            .map_err(|e| format!("complete({id}): {e}"))?;
        let reported = ok && resets == self.resets;
        if reported {
            self.coverage.completed_reported += 1;
        } else {
            self.coverage.completed_unreported += 1;
        }
        check(
            got.blocks == blocks.len() && got.reported == reported,
            || format!("complete({id}, {ok}) = {got:?}, model reported {reported}"),
        )?;
        for b in &blocks {
            check(
                self.frames(b)
                    .iter()
                    .all(|c| *c == Cell::InFlight(id.get())),
                || format!("{b:?} of {id} not in flight in the model"),
            )?;
            self.set(b, Cell::Free { reported });
        }
        check(self.pipeline.batch(id).is_none(), || {
            format!("{id} still in flight")
        })
    }

    fn sync_pass(&mut self, fail_at: Option<u8>) -> Result<(), String> {
        if self.pipeline.pass_running() {
            return Ok(());
        }
        let mut t = SyncTransport {
            buddy: &self.buddy,
            batches: Vec::new(),
            fail_at: fail_at.map(|f| usize::from(f % 8)),
            free_during: Vec::new(),
            problem: None,
        };
        let got = self.reporter.report_pass(&self.buddy, &mut t);
        let SyncTransport {
            batches,
            free_during,
            problem,
            fail_at,
            ..
        } = t;
        if let Some(p) = problem {
            return Err(p);
        }
        let guard = self.policy.guard_frames(CAP);
        check(free_during.iter().all(|&f| f >= guard), || {
            format!("free frames during the pass {free_during:?}, guard {guard}")
        })?;
        let failed_batch = match got {
            Ok(stats) => {
                check(fail_at.is_none_or(|f| f >= batches.len()), || {
                    "a failed batch did not fail the pass".into()
                })?;
                check(stats.batches == batches.len() as u64, || {
                    format!("{stats:?} for {} batches", batches.len())
                })?;
                let reported: u64 = batches.iter().map(|b| b.len() as u64).sum();
                check(stats.reported_blocks == reported, || {
                    format!("{stats:?} for {reported} blocks")
                })?;
                let state = self.reporter.state();
                check(
                    stats.end.reschedule == (state == RequestState::Requested),
                    || format!("{:?} with state {state:?}", stats.end),
                )?;
                self.coverage.sync_batches += stats.batches;
                self.coverage.watermark_stops += u64::from(stats.end.watermark_hit);
                self.coverage.budget_stops += u64::from(stats.end.budget_exhausted);
                None
            }
            Err(PassError::Transport(Refused)) => {
                self.coverage.transport_failures += 1;
                check(fail_at == Some(batches.len() - 1), || {
                    "the pass failed at the wrong batch".into()
                })?;
                check(self.reporter.state() == RequestState::Idle, || {
                    "reporter not idle after a failed pass".into()
                })?;
                fail_at
            }
            Err(PassError::MinOrderAboveMaxOrder) => {
                return check(self.policy.min_order.get() as usize > MAX_ORDER, || {
                    "MinOrderAboveMaxOrder refused a valid policy".into()
                });
            }
            Err(e) => return Err(format!("sync pass failed: {e}")),
        };
        // Batches are isolated one after the other: each must have been free (in the model
        // as updated by the batches before it).
        for (i, batch) in batches.iter().enumerate() {
            self.check_taken(batch, &mut Vec::new())?;
            let reported = failed_batch != Some(i);
            for b in batch {
                self.set(b, Cell::Free { reported });
            }
        }
        Ok(())
    }

    /// DESIGN.md invariants 1 and 2 after every op.
    pub fn audit(&self) -> Result<(), String> {
        let b = self.buddy.lock();
        b.check_invariants().map_err(|v| format!("{v}"))?;
        let count = |f: &dyn Fn(&Cell) -> bool| self.cells.iter().filter(|c| f(c)).count() as u64;
        let free = count(&|c| matches!(c, Cell::Free { .. }));
        let reported = count(&|c| *c == Cell::Free { reported: true });
        let allocated = count(&|c| *c == Cell::Alloc);
        let in_flight = count(&|c| matches!(c, Cell::InFlight(_)));
        let managed = count(&|c| *c != Cell::Hole);
        check(
            (
                b.free_frames(),
                b.allocated_frames(),
                b.isolated_frames(),
                b.managed_frames(),
            ) == (free, allocated, in_flight, managed),
            || {
                format!(
                    "allocator free/alloc/isolated/managed {}/{}/{}/{}, model {free}/{allocated}/{in_flight}/{managed}",
                    b.free_frames(),
                    b.allocated_frames(),
                    b.isolated_frames(),
                    b.managed_frames()
                )
            },
        )?;
        check(free + allocated + in_flight == managed, || {
            "model lost a frame".into()
        })?;
        check(b.reported_frames() <= reported, || {
            format!("reported {} > model {reported}", b.reported_frames())
        })?;
        check(
            self.pipeline.in_flight() == self.in_flight.len()
                && self.pipeline.in_flight_frames() == in_flight,
            || "pipeline and model disagree on what is in flight".into(),
        )?;
        for (id, blocks, _) in &self.in_flight {
            for x in blocks {
                check(
                    matches!(b.block_info(x.pfn), Some(i) if i.state == BlockState::Isolated),
                    || format!("{x:?} of {id} is in flight but not isolated"),
                )?;
            }
        }
        Ok(())
    }

    /// Completes every batch in flight, frees every live block, and checks that all memory
    /// is free again and nothing is isolated.
    pub fn finish(mut self) -> Result<(), String> {
        while !self.in_flight.is_empty() {
            self.complete(0, true)?;
        }
        self.apply(ReportOp::FailAll)?;
        while !self.live.is_empty() {
            self.free(0)?;
        }
        self.audit()?;
        let b = self.buddy.lock();
        check(
            b.free_frames() == b.managed_frames() && b.isolated_frames() == 0,
            || "memory still in use".into(),
        )
    }
}

/// A random op with weights that keep the guest busy and batches in flight.
pub fn random_op(rng: &mut Rng) -> ReportOp {
    let k = rng.next_u64();
    match rng.below(100) {
        0..=29 => ReportOp::Alloc {
            order: if rng.below(8) == 0 {
                rng.below(MAX_ORDER as u64 + 1) as u8
            } else {
                (rng.below(3) * rng.below(3)) as u8
            },
        },
        30..=54 => ReportOp::Free { k: k as u16 },
        55..=62 => ReportOp::StartPass,
        63..=68 => ReportOp::Fill,
        69..=80 => ReportOp::Complete { k: k as u8 },
        81..=85 => ReportOp::Fail { k: k as u8 },
        86..=87 => ReportOp::CompleteUnknown { id: k as u8 },
        88..=89 => ReportOp::FailNextSubmit,
        90 => ReportOp::FailAll,
        91..=92 => ReportOp::Reset,
        _ => ReportOp::SyncPass {
            fail_at: (rng.below(3) == 0).then_some(k as u8),
        },
    }
}
