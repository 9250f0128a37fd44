//! `Reporter`: the request state machine, the synchronous pass, and the batch gathering and
//! draining that the pipelined pass shares.

use core::fmt;
use core::ops::DerefMut;

use arrayvec::ArrayVec;

use super::policy::{PolicyError, ReportPolicy};
use super::transport::ReportTransport;
use crate::addr::{PageOrder, Pfn};
use crate::buddy::{Block, Buddy, FrameMeta, FreeError, LockedBuddy, PutBackError};
use crate::sync::{AtomicUsize, Ordering};

/// No pass requested or running (Linux `PAGE_REPORTING_IDLE`).
const IDLE: usize = 0;
/// A pass was asked for and not started yet (Linux `PAGE_REPORTING_REQUESTED`).
const REQUESTED: usize = 1;
/// A pass is running (Linux `PAGE_REPORTING_ACTIVE`).
const ACTIVE: usize = 2;

/// Where the request state machine is (Linux `page_reporting_dev_info::state`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RequestState {
    /// Nothing asked for; the next qualifying free asks for a pass.
    Idle,
    /// A pass was asked for (the embedder was told) or, while a pass runs, more work arrived:
    /// that pass then ends with [`PassEnd::reschedule`].
    Requested,
    /// A pass is running.
    Active,
}

/// The guest's free-page reporter (Linux `mm/page_reporting.c`; the
/// "aerator" of (Duyck, "aerating memory via hinting", 2019)):
/// policy, the request state shared with the free path, and the synchronous pass.
///
/// `CAP` is the batch capacity (Linux `PAGE_REPORTING_CAPACITY`, 32), a power of two. The
/// reporter holds no blocks itself: a pass isolates a batch in the allocator, reports it with
/// the lock released, and puts it back. All methods take `&self`, so one `Reporter` is shared
/// by the free path of every CPU ([`on_free`](Self::on_free)) and the thread that runs passes.
/// Run one pass at a time per reporter ([`report_pass`](Self::report_pass) or a
/// [`Pipeline`](super::Pipeline)), as Linux runs one work item.
pub struct Reporter<const CAP: usize = 32> {
    policy: ReportPolicy,
    /// `policy.min_order`, read by the free path.
    min_order: u8,
    state: AtomicUsize,
    /// Frames freed in blocks of `min_order` or larger since the last pass began.
    pending: AtomicUsize,
    /// Bumped by `reset_reported`: a batch isolated under an older epoch comes back
    /// unreported, whatever its transport said (it was reported to the previous host).
    epoch: AtomicUsize,
    /// 1 while a pass takes blocks (`report_pass`, or a `Pipeline` pass until it has taken
    /// its last batch). `state` cannot say this: a free during a pass moves it from ACTIVE
    /// to REQUESTED (Linux relies on its one work item for the exclusion).
    running: AtomicUsize,
}

/// How a pass ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PassEnd {
    /// The per-order budget stopped the pass while an order still had unreported blocks.
    pub budget_exhausted: bool,
    /// The watermark guard stopped the pass.
    pub watermark_hit: bool,
    /// Schedule another pass (after the embedder's delay; Linux waits 2 s): the budget left
    /// work, or a free asked for a pass while this one ran.
    pub reschedule: bool,
}

/// What a synchronous pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PassStats {
    /// Batches handed to the transport.
    pub batches: u64,
    /// Blocks put back as reported.
    pub reported_blocks: u64,
    /// Frames in those blocks.
    pub reported_frames: u64,
    /// How the pass ended.
    pub end: PassEnd,
}

/// Why a pass failed. Every isolated block of the pass is back on the free lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PassError<E> {
    /// The transport failed. That batch went back unreported (to the head of its list, so
    /// the next pass tries other blocks first) and the pass stopped; batches reported before
    /// it stay reported. The request state is idle again: the next qualifying free asks for
    /// a pass.
    Transport(E),
    /// The policy's `min_order` is above the allocator's `MAX_ORDER`; nothing was done.
    MinOrderAboveMaxOrder,
    /// A pass of this reporter is already running ([`Reporter::report_pass`] or a
    /// [`Pipeline`](super::Pipeline) pass still taking blocks); nothing was done.
    PassActive,
    /// A block of this pass was no longer isolated when it came back (someone put it back
    /// through [`LockedBuddy::lock`]); the batch's other blocks were put back.
    BlockLost(PutBackError),
    /// A [`Pipeline`](super::Pipeline) call named another allocator than the one its pass
    /// and batches came from; nothing was done.
    ForeignBuddy,
}

impl<E: fmt::Display> fmt::Display for PassError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Transport(e) => write!(f, "report transport failed: {e}"),
            Self::MinOrderAboveMaxOrder => {
                f.write_str("report min_order above the allocator's MAX_ORDER")
            }
            Self::PassActive => f.write_str("a report pass is already running"),
            Self::BlockLost(e) => write!(f, "an isolated block of the pass was lost: {e}"),
            Self::ForeignBuddy => {
                f.write_str("not the allocator the report pass and its batches came from")
            }
        }
    }
}

impl<E: fmt::Debug + fmt::Display> core::error::Error for PassError<E> {}

impl<const CAP: usize> Reporter<CAP> {
    /// A reporter with `policy`, idle.
    #[cfg(not(loom))]
    pub const fn new(policy: ReportPolicy) -> Result<Self, PolicyError> {
        const {
            assert!(
                CAP.is_power_of_two(),
                "report capacity must be a power of two"
            )
        };
        if let Err(e) = policy.validate() {
            return Err(e);
        }
        Ok(Self {
            policy,
            min_order: policy.min_order.get(),
            state: AtomicUsize::new(IDLE),
            pending: AtomicUsize::new(0),
            epoch: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
        })
    }

    /// A reporter with `policy`, idle.
    #[cfg(loom)]
    pub fn new(policy: ReportPolicy) -> Result<Self, PolicyError> {
        const {
            assert!(
                CAP.is_power_of_two(),
                "report capacity must be a power of two"
            )
        };
        policy.validate()?;
        Ok(Self {
            policy,
            min_order: policy.min_order.get(),
            state: AtomicUsize::new(IDLE),
            pending: AtomicUsize::new(0),
            epoch: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
        })
    }

    /// The policy.
    pub const fn policy(&self) -> &ReportPolicy {
        &self.policy
    }

    /// The batch capacity `CAP`.
    pub const fn capacity(&self) -> usize {
        CAP
    }

    /// Where the request state machine is.
    pub fn state(&self) -> RequestState {
        match self.state.load(Ordering::SeqCst) {
            IDLE => RequestState::Idle,
            REQUESTED => RequestState::Requested,
            _ => RequestState::Active,
        }
    }

    /// Tells the reporter that a block of `order` became free; `true` means "schedule a
    /// pass now" (Linux `page_reporting_notify_free` + `__page_reporting_request`).
    ///
    /// Call it on every free with the order of the block **after merging**
    /// ([`LockedBuddy::free_merged`] returns it): freeing a 4 KiB page can complete a 2 MiB
    /// block. [`free`](Self::free) does both, and calls this only for the frees that
    /// reach `min_order`. Orders below `min_order` return at once (one compare: the cost on the
    /// allocator's hot path). Otherwise the freed frames count towards
    /// [`ReportPolicy::notify_frames`]; past it, the reporter asks for a pass: `true` exactly
    /// once while idle. While a pass runs it returns `false` and that pass ends with
    /// [`PassEnd::reschedule`], so no request is lost. When to run the pass (Linux: 2 s
    /// later, to let a batch build up) is the embedder's choice.
    #[inline]
    pub fn on_free(&self, order: PageOrder) -> bool {
        if order.get() < self.min_order {
            return false;
        }
        self.on_free_qualifying(order)
    }

    #[inline(never)]
    fn on_free_qualifying(&self, order: PageOrder) -> bool {
        let frames = 1usize << order.get();
        let before = self.pending.fetch_add(frames, Ordering::SeqCst);
        if (before.saturating_add(frames) as u64) < self.policy.notify_frames {
            return false;
        }
        self.request()
    }

    /// Attaches the reporter to `buddy`'s free path (Linux `page_reporting_register`): sets
    /// the allocator's [notify order](Buddy::set_notify_order) to the policy's `min_order`,
    /// so [`free`](Self::free) hears about the frees `on_free` counts, and asks for a pass
    /// for the memory already free. `true` means "schedule a pass".
    pub fn register<S, const M: usize>(&self, buddy: &LockedBuddy<S, M>) -> bool
    where
        S: DerefMut<Target = [FrameMeta]>,
    {
        buddy.lock().set_notify_order(Some(self.policy.min_order));
        self.request()
    }

    /// Frees a block and tells the reporter (Linux `__free_one_page` +
    /// `page_reporting_notify_free`): [`LockedBuddy::free_notify`], then
    /// [`on_free`](Self::on_free) with the merged order when the free reached the notify
    /// order. `Ok(true)` means "schedule a pass now", as `on_free`'s `true`.
    ///
    /// The same as [`LockedBuddy::free_merged`] followed by `on_free`, once
    /// [`register`](Self::register) has set the notify order; cheaper, because the order
    /// check is folded into the allocator's own: a free below `min_order` that merges nothing
    /// costs what [`LockedBuddy::free`] does. Without `register` (or with a notify order
    /// above `min_order`) qualifying frees go unheard. Always inlined: it is the free path.
    #[inline(always)]
    pub fn free<S, const M: usize>(
        &self,
        buddy: &LockedBuddy<S, M>,
        pfn: Pfn,
        order: PageOrder,
    ) -> Result<bool, FreeError>
    where
        S: DerefMut<Target = [FrameMeta]>,
    {
        match buddy.free_notify(pfn, order)? {
            Some(merged) => Ok(self.on_free(merged)),
            None => Ok(false),
        }
    }

    /// Asks for a pass whatever was freed (Linux `__page_reporting_request`; Linux's
    /// `page_reporting_register` asks once at start-up, for the memory free at boot).
    /// `true` means "schedule a pass": the reporter was idle.
    pub fn request(&self) -> bool {
        if self.state.load(Ordering::SeqCst) == REQUESTED {
            return false;
        }
        self.state.swap(REQUESTED, Ordering::SeqCst) == IDLE
    }

    /// Forgets every reported flag in `buddy` (after live migration the destination host backs
    /// every page again; Duyck, "aerating memory via hinting", 2019) and asks for a pass;
    /// `true` means "schedule one". Batches in flight at the time come back unreported even if
    /// their report succeeds: they went to the previous host.
    pub fn reset_reported<S, const M: usize>(&self, buddy: &LockedBuddy<S, M>) -> bool
    where
        S: DerefMut<Target = [FrameMeta]>,
    {
        {
            let mut b = buddy.lock();
            self.epoch.fetch_add(1, Ordering::SeqCst);
            b.reset_reported();
        }
        self.request()
    }

    /// One synchronous reporting pass (Linux `page_reporting_process_zone` +
    /// `page_reporting_cycle`).
    ///
    /// For each order from `min_order` up, under the lock it isolates up to `CAP` of the
    /// coldest unreported blocks ([`Buddy::isolate_cold`]), filling a batch across orders;
    /// with the lock **released** it calls `transport.report(batch)`; under the lock again it
    /// puts the blocks back, reported on success, to the head of their list on failure
    /// ([`Buddy::put_back_hot`]). It takes at most the policy's budget per order and never
    /// leaves fewer than `low_watermark + (CAP << min_order)` free frames. Blocks it did not
    /// reach stay at the cold end of their list, so the next pass continues there.
    pub fn report_pass<S, const M: usize, T>(
        &self,
        buddy: &LockedBuddy<S, M>,
        transport: &mut T,
    ) -> Result<PassStats, PassError<T::Error>>
    where
        S: DerefMut<Target = [FrameMeta]>,
        T: ReportTransport,
    {
        if usize::from(self.min_order) > M {
            return Err(PassError::MinOrderAboveMaxOrder);
        }
        if !self.begin_pass() {
            return Err(PassError::PassActive);
        }
        let mut cursor = Cursor::new(self.policy.min_order);
        let mut stats = PassStats::default();
        let mut batch = ArrayVec::<Block, CAP>::new();
        loop {
            let epoch = {
                let mut b = buddy.lock();
                cursor.gather(&mut b, &self.policy, &mut batch);
                self.epoch()
            };
            if batch.is_empty() {
                break;
            }
            stats.batches += 1;
            let sent = transport.report(&batch);
            let back = {
                let mut b = buddy.lock();
                self.put_back_batch(&mut b, &batch, sent.is_ok(), epoch)
            };
            batch.clear();
            stats.reported_blocks += back.reported_blocks;
            stats.reported_frames += back.reported_frames;
            if let Err(e) = sent {
                self.abort_pass();
                return Err(PassError::Transport(e));
            }
            if let Err(e) = back.result {
                self.abort_pass();
                return Err(PassError::BlockLost(e));
            }
            if cursor.done {
                break;
            }
        }
        stats.end = self.finish_pass(&cursor);
        Ok(stats)
    }

    /// Marks a pass as running (Linux: `atomic_set(&prdev->state, PAGE_REPORTING_ACTIVE)`);
    /// `false`, changing nothing, when one already runs.
    #[must_use]
    pub(super) fn begin_pass(&self) -> bool {
        if self
            .running
            .compare_exchange(0, 1, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return false;
        }
        self.state.store(ACTIVE, Ordering::SeqCst);
        self.pending.store(0, Ordering::SeqCst);
        true
    }

    /// Ends a pass: back to idle unless more work arrived or the budget left some (Linux:
    /// `atomic_cmpxchg(ACTIVE, IDLE)`; a state moved back to REQUESTED means "reschedule").
    pub(super) fn finish_pass(&self, cursor: &Cursor) -> PassEnd {
        if cursor.budget_exhausted {
            self.state.store(REQUESTED, Ordering::SeqCst);
        }
        let reschedule = matches!(
            self.state
                .compare_exchange(ACTIVE, IDLE, Ordering::SeqCst, Ordering::SeqCst),
            Err(REQUESTED)
        );
        self.running.store(0, Ordering::SeqCst);
        PassEnd {
            budget_exhausted: cursor.budget_exhausted,
            watermark_hit: cursor.watermark_hit,
            reschedule,
        }
    }

    /// Ends a failed pass: idle, so the next qualifying free asks again.
    pub(super) fn abort_pass(&self) {
        self.state.store(IDLE, Ordering::SeqCst);
        self.running.store(0, Ordering::SeqCst);
    }

    /// The reset epoch; read under the allocator lock when a batch is isolated.
    pub(super) fn epoch(&self) -> usize {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Puts a batch back under the lock (Linux `page_reporting_drain`): reported if the
    /// transport succeeded and no reset happened since `epoch`, otherwise unreported to the
    /// head of the list. Every block is tried; the first failure is returned.
    pub(super) fn put_back_batch<S, const M: usize>(
        &self,
        b: &mut Buddy<S, M>,
        batch: &[Block],
        ok: bool,
        epoch: usize,
    ) -> PutBackSummary
    where
        S: DerefMut<Target = [FrameMeta]>,
    {
        let reported = ok && self.epoch() == epoch;
        let mut summary = PutBackSummary {
            reported_blocks: 0,
            reported_frames: 0,
            result: Ok(()),
        };
        for blk in batch {
            let r = if reported {
                b.put_back(blk.pfn, blk.order, true)
            } else {
                b.put_back_hot(blk.pfn, blk.order)
            };
            match r {
                Ok(()) if reported => {
                    summary.reported_blocks += 1;
                    summary.reported_frames += blk.order.frames();
                }
                Ok(()) => {}
                Err(e) => {
                    if summary.result.is_ok() {
                        summary.result = Err(e);
                    }
                }
            }
        }
        summary
    }
}

impl<const CAP: usize> fmt::Debug for Reporter<CAP> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reporter")
            .field("capacity", &CAP)
            .field("policy", &self.policy)
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

/// What [`Reporter::put_back_batch`] did.
pub(super) struct PutBackSummary {
    pub(super) reported_blocks: u64,
    pub(super) reported_frames: u64,
    pub(super) result: Result<(), PutBackError>,
}

/// Where a pass is: the order it works on and that order's remaining budget (Linux keeps
/// this on the stack of `page_reporting_process_zone`; the pipelined pass keeps it between
/// completions).
#[derive(Clone, Copy, Debug)]
pub(super) struct Cursor {
    order: u8,
    /// Blocks of `order` this pass may still take; computed when the pass reaches the order.
    budget: Option<u64>,
    /// Nothing more to take: past the largest order, or stopped by the watermark.
    pub(super) done: bool,
    pub(super) budget_exhausted: bool,
    pub(super) watermark_hit: bool,
}

impl Cursor {
    pub(super) const fn new(min_order: PageOrder) -> Self {
        Self {
            order: min_order.get(),
            budget: None,
            done: false,
            budget_exhausted: false,
            watermark_hit: false,
        }
    }

    fn next_order(&mut self) {
        self.order += 1;
        self.budget = None;
    }

    /// Isolates blocks into `out` (under the caller's lock) until it is full or the pass has
    /// nothing more it may take. Per order: at most the budget, only unreported blocks, the
    /// coldest first, and only while `guard` free frames stay on the lists afterwards.
    pub(super) fn gather<S, const M: usize, const CAP: usize>(
        &mut self,
        b: &mut Buddy<S, M>,
        policy: &ReportPolicy,
        out: &mut ArrayVec<Block, CAP>,
    ) where
        S: DerefMut<Target = [FrameMeta]>,
    {
        let guard = policy.guard_frames(CAP);
        while !self.done && !out.is_full() {
            if usize::from(self.order) > M {
                self.done = true;
                break;
            }
            let order = PageOrder::from_raw(self.order);
            let stats = b.order_stats(order);
            let budget = *self
                .budget
                .get_or_insert_with(|| policy.budget_blocks(CAP, stats.free));
            let unreported = stats.free - stats.reported;
            if unreported == 0 {
                self.next_order();
                continue;
            }
            if budget == 0 {
                self.budget_exhausted = true;
                self.next_order();
                continue;
            }
            let room = b.free_frames().saturating_sub(guard) >> order.get();
            if room == 0 {
                self.watermark_hit = true;
                self.done = true;
                break;
            }
            let want = budget.min(room).min(unreported);
            let want = usize::try_from(want).unwrap_or(usize::MAX);
            let got = b.isolate_cold(order, want, out).unwrap_or(0);
            self.budget = Some(budget - got as u64);
            if got == 0 {
                // Cannot happen (unreported > 0 and `out` has room); move on regardless.
                self.next_order();
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests;
