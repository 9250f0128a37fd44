//! Tests of every rule of the guest-side reporter: policy, budget, watermark, rotation,
//! failure, lock release, request state machine, reset, poison negotiation, and the
//! randomized model run. The pipeline's tests are in `pipeline/tests.rs`.

use std::boxed::Box;
use std::vec;
use std::vec::Vec;

use crate::addr::{PageOrder, Pfn};
use crate::buddy::{Block, BlockState, Buddy, FrameMeta, LockedBuddy};
use crate::hint::guest::poison::{
    FreePageContent, ReportingDisabled, VIRTIO_BALLOON_F_PAGE_POISON, VIRTIO_BALLOON_F_REPORTING,
    negotiate,
};
use crate::hint::guest::*;

pub(in crate::hint::guest) type Locked<const M: usize = 10> = LockedBuddy<Vec<FrameMeta>, M>;

pub(in crate::hint::guest) fn ord(o: u8) -> PageOrder {
    PageOrder::new(o).unwrap()
}

fn pfn(p: u64) -> Pfn {
    Pfn::new(p).unwrap()
}

const BASE: u64 = 0x10_0000;

/// `2 * blocks` blocks of `order`, every other one allocated: `blocks` free blocks of
/// `order` that can't merge, freed in ascending order (so the lowest is the coldest).
/// Returns the allocator and the held blocks.
pub(in crate::hint::guest) fn checkerboard<const M: usize>(
    blocks: u64,
    order: u8,
) -> (Locked<M>, Vec<Block>) {
    let frames = (2 * blocks) << order;
    let mut b = Buddy::new(vec![FrameMeta::HOLE; frames as usize], pfn(BASE)).unwrap();
    b.add_range(pfn(BASE), frames).unwrap();
    let all: Vec<_> = (0..2 * blocks)
        .map(|_| b.alloc(ord(order)).unwrap())
        .collect();
    let mut held = Vec::new();
    let mut sorted = all.clone();
    sorted.sort_by_key(|x| x.pfn);
    for (i, x) in sorted.into_iter().enumerate() {
        if i % 2 == 0 {
            b.free(x.pfn, x.order).unwrap();
        } else {
            held.push(x);
        }
    }
    assert_eq!(b.order_stats(ord(order)).free, blocks);
    (LockedBuddy::new(b), held)
}

pub(in crate::hint::guest) fn policy(
    min_order: u8,
    budget_divisor: u32,
    low_watermark: u64,
) -> ReportPolicy {
    ReportPolicy {
        min_order: ord(min_order),
        low_watermark,
        budget_divisor,
        notify_frames: ord(min_order).frames(),
    }
}

type During<'a, const M: usize> = Box<dyn FnMut(&Locked<M>, &[Block]) + 'a>;

/// A synchronous transport that records every batch and checks, while the reporter's lock is
/// released, that every block is isolated and the allocator is usable.
struct Recorder<'a, const M: usize> {
    buddy: &'a Locked<M>,
    batches: Vec<Vec<Block>>,
    /// Fail the batch with this index (0-based).
    fail_at: Option<usize>,
    /// Free frames seen while each batch was out.
    free_during: Vec<u64>,
    /// Run this while the batch is out (with the lock free).
    during: Option<During<'a, M>>,
}

impl<'a, const M: usize> Recorder<'a, M> {
    fn new(buddy: &'a Locked<M>) -> Self {
        Self {
            buddy,
            batches: Vec::new(),
            fail_at: None,
            free_during: Vec::new(),
            during: None,
        }
    }

    fn reported(&self) -> Vec<u64> {
        self.batches.iter().flatten().map(|b| b.pfn.get()).collect()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(in crate::hint::guest) struct HostBusy;

impl core::fmt::Display for HostBusy {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("host busy")
    }
}

impl<const M: usize> ReportTransport for Recorder<'_, M> {
    type Error = HostBusy;

    fn report(&mut self, batch: &[Block]) -> Result<(), HostBusy> {
        let b = self
            .buddy
            .try_lock()
            .expect("the allocator lock is held during the report");
        for blk in batch {
            assert_eq!(b.block_info(blk.pfn).unwrap().state, BlockState::Isolated);
            assert!(!blk.reported);
        }
        self.free_during.push(b.free_frames());
        b.check_invariants().unwrap();
        drop(b);
        if let Some(f) = self.during.as_mut() {
            f(self.buddy, batch);
        }
        let i = self.batches.len();
        self.batches.push(batch.to_vec());
        if self.fail_at == Some(i) {
            Err(HostBusy)
        } else {
            Ok(())
        }
    }
}

pub(in crate::hint::guest) fn stats<const M: usize>(b: &Locked<M>, o: u8) -> (u64, u64, u64) {
    let s = b.lock().order_stats(ord(o));
    (s.free, s.reported, s.isolated)
}

// ---- policy ----

#[test]
fn policy_defaults_are_linuxs() {
    let p = ReportPolicy::default();
    assert_eq!(p, ReportPolicy::DEFAULT);
    assert_eq!(p.min_order, PageOrder::HUGE_2M);
    assert_eq!(p.budget_divisor, 16);
    assert_eq!(p.low_watermark, 0);
    assert_eq!(p.notify_frames, 512);
    assert_eq!(p.guard_frames(32), 32 << 9);
    let r = Reporter::<32>::new(p).unwrap();
    assert_eq!(r.capacity(), 32);
    assert_eq!(r.state(), RequestState::Idle);
    let bad = ReportPolicy {
        budget_divisor: 0,
        ..p
    };
    assert_eq!(bad.validate(), Err(PolicyError::ZeroBudgetDivisor));
    assert_eq!(
        Reporter::<32>::new(bad).unwrap_err(),
        PolicyError::ZeroBudgetDivisor
    );
}

#[test]
fn budget_is_a_sixteenth_of_the_list_in_whole_batches() {
    let p = ReportPolicy::DEFAULT;
    // DIV_ROUND_UP(nr_free, 32 * 16) batches of 32.
    assert_eq!(p.budget_blocks(32, 0), 0);
    assert_eq!(p.budget_blocks(32, 1), 32);
    assert_eq!(p.budget_blocks(32, 512), 32);
    assert_eq!(p.budget_blocks(32, 513), 64);
    assert_eq!(p.budget_blocks(32, 16 * 512), 16 * 32);
    let whole = ReportPolicy {
        budget_divisor: 1,
        ..p
    };
    assert_eq!(whole.budget_blocks(4, 10), 12);
    assert_eq!(whole.guard_frames(usize::MAX), u64::MAX, "saturates");
}

// ---- the synchronous pass ----

#[test]
fn a_pass_reports_everything_allowed_and_releases_the_lock() {
    let (buddy, _held) = checkerboard::<10>(10, 3);
    let r = Reporter::<4>::new(policy(3, 1, 0)).unwrap();
    let mut t = Recorder::new(&buddy);
    let s = r.report_pass(&buddy, &mut t).unwrap();
    assert_eq!(s.batches, 3, "4 + 4 + 2");
    assert_eq!(s.reported_blocks, 10);
    assert_eq!(s.reported_frames, 80);
    assert_eq!(s.end, PassEnd::default());
    assert_eq!(
        t.batches.iter().map(Vec::len).collect::<Vec<_>>(),
        [4, 4, 2]
    );
    assert_eq!(stats(&buddy, 3), (10, 10, 0));
    assert_eq!(r.state(), RequestState::Idle);
    // Nothing left: the next pass reports nothing.
    let mut t2 = Recorder::new(&buddy);
    assert_eq!(r.report_pass(&buddy, &mut t2).unwrap().batches, 0);
    buddy.lock().check_invariants().unwrap();
}

#[test]
fn orders_below_min_order_are_never_reported_and_batches_span_orders() {
    // Everything handed out in order-2 blocks, then freed back into free blocks that can't
    // merge further: order 4 at 0, 32, 64; order 3 at 128, 160, 192; order 2 at 256, 288, 320.
    let mut b = Buddy::<_, 10>::new(vec![FrameMeta::HOLE; 1024], pfn(BASE)).unwrap();
    b.add_range(pfn(BASE), 1024).unwrap();
    while b.alloc(ord(2)).is_ok() {}
    let free_run = |b: &mut Buddy<Vec<FrameMeta>, 10>, at: u64, frames: u64| {
        for p in (at..at + frames).step_by(4) {
            b.free(pfn(BASE + p), ord(2)).unwrap();
        }
    };
    for at in [0, 32, 64] {
        free_run(&mut b, at, 16);
    }
    for at in [128, 160, 192] {
        free_run(&mut b, at, 8);
    }
    for at in [256, 288, 320] {
        free_run(&mut b, at, 4);
    }
    let buddy = LockedBuddy::new(b);
    assert_eq!(
        [stats(&buddy, 2), stats(&buddy, 3), stats(&buddy, 4)],
        [(3, 0, 0); 3]
    );
    let r = Reporter::<4>::new(policy(3, 1, 0)).unwrap();
    let mut t = Recorder::new(&buddy);
    let s = r.report_pass(&buddy, &mut t).unwrap();
    let orders: Vec<Vec<u8>> = t
        .batches
        .iter()
        .map(|b| b.iter().map(|x| x.order.get()).collect())
        .collect();
    assert_eq!(
        orders,
        [vec![3, 3, 3, 4], vec![4, 4]],
        "the order-3 leftovers and order-4 blocks share a batch"
    );
    assert_eq!((s.reported_blocks, s.reported_frames), (6, 3 * 8 + 3 * 16));
    assert_eq!(stats(&buddy, 2), (3, 0, 0), "order 2 untouched");
    assert_eq!(stats(&buddy, 3), (3, 3, 0));
    assert_eq!(stats(&buddy, 4), (3, 3, 0));
}

#[test]
fn the_budget_limits_a_pass_and_asks_for_another() {
    // 40 free order-2 blocks, CAP 4, divisor 4: ceil(40 / 16) = 3 batches = 12 blocks.
    let (buddy, _held) = checkerboard::<10>(40, 2);
    let r = Reporter::<4>::new(policy(2, 4, 0)).unwrap();
    let mut t = Recorder::new(&buddy);
    let s = r.report_pass(&buddy, &mut t).unwrap();
    assert_eq!(s.reported_blocks, 12);
    assert_eq!(s.batches, 3);
    assert!(s.end.budget_exhausted);
    assert!(
        s.end.reschedule,
        "work left: the pass asks to be rescheduled"
    );
    assert_eq!(r.state(), RequestState::Requested);
    assert_eq!(stats(&buddy, 2), (40, 12, 0));
    // The next pass computes its budget from the whole list again (40 free blocks).
    let s = r.report_pass(&buddy, &mut Recorder::new(&buddy)).unwrap();
    assert_eq!(s.reported_blocks, 12);
    // Passes until done: 12 + 12 + 12 + 4.
    let s = r.report_pass(&buddy, &mut Recorder::new(&buddy)).unwrap();
    assert_eq!(s.reported_blocks, 12);
    let s = r.report_pass(&buddy, &mut Recorder::new(&buddy)).unwrap();
    assert_eq!(s.reported_blocks, 4);
    assert!(!s.end.budget_exhausted && !s.end.reschedule);
    assert_eq!(r.state(), RequestState::Idle);
}

#[test]
fn passes_rotate_through_the_list_coldest_first() {
    let (buddy, _held) = checkerboard::<10>(40, 2);
    // Blocks were freed in ascending address order: the lowest is the coldest.
    let r = Reporter::<4>::new(policy(2, 4, 0)).unwrap();
    let mut seen = Vec::new();
    for _ in 0..4 {
        let mut t = Recorder::new(&buddy);
        r.report_pass(&buddy, &mut t).unwrap();
        seen.extend(t.reported());
    }
    let mut sorted = seen.clone();
    sorted.sort_unstable();
    assert_eq!(
        seen, sorted,
        "each pass continues where the previous stopped"
    );
    sorted.dedup();
    assert_eq!(sorted.len(), 40, "every block reported exactly once");
    // A block freed now is hot: reported only after the older ones.
    let mut b = buddy.lock();
    b.reset_reported();
    let x = b.alloc(ord(2)).unwrap(); // the hottest unreported block
    b.free(x.pfn, x.order).unwrap();
    drop(b);
    let mut t = Recorder::new(&buddy);
    r.report_pass(&buddy, &mut t).unwrap();
    assert!(!t.reported().contains(&x.pfn.get()));
}

#[test]
fn the_watermark_guard_keeps_free_memory() {
    // 10 free order-3 blocks = 80 free frames. CAP 4, min order 3: guard = 20 + 32 = 52
    // frames, so only (80 - 52) / 8 = 3 blocks may be out at once.
    let (buddy, _held) = checkerboard::<10>(10, 3);
    let r = Reporter::<4>::new(policy(3, 1, 20)).unwrap();
    let mut t = Recorder::new(&buddy);
    let s = r.report_pass(&buddy, &mut t).unwrap();
    assert!(s.end.watermark_hit);
    assert_eq!(t.batches.len(), 1);
    assert_eq!(t.batches[0].len(), 3);
    assert!(
        t.free_during.iter().all(|&f| f >= 52),
        "{:?}",
        t.free_during
    );
    // Reported blocks are free again: the next pass can take three more.
    let mut t = Recorder::new(&buddy);
    r.report_pass(&buddy, &mut t).unwrap();
    assert_eq!(t.reported().len(), 3);
    // Below the guard nothing is isolated at all.
    let r = Reporter::<4>::new(policy(3, 1, 60)).unwrap();
    let mut t = Recorder::new(&buddy);
    let s = r.report_pass(&buddy, &mut t).unwrap();
    assert_eq!((s.batches, s.end.watermark_hit), (0, true));
}

#[test]
fn a_failed_report_puts_the_batch_back_unreported_and_stops() {
    let (buddy, _held) = checkerboard::<10>(12, 2);
    let r = Reporter::<4>::new(policy(2, 1, 0)).unwrap();
    assert!(r.request());
    let mut t = Recorder::new(&buddy);
    t.fail_at = Some(1);
    let e = r.report_pass(&buddy, &mut t).unwrap_err();
    assert_eq!(e, PassError::Transport(HostBusy));
    assert_eq!(std::format!("{e}"), "report transport failed: host busy");
    assert_eq!(t.batches.len(), 2, "the pass stopped at the failure");
    assert_eq!(
        stats(&buddy, 2),
        (12, 4, 0),
        "first batch reported, second not"
    );
    assert_eq!(r.state(), RequestState::Idle, "next free asks again");
    buddy.lock().check_invariants().unwrap();
    // The failed blocks went to the head: `alloc` hands them out first (still backed)...
    let failed: Vec<u64> = t.batches[1].iter().map(|b| b.pfn.get()).collect();
    let mut clone = buddy.lock().clone();
    let first = clone.alloc(ord(2)).unwrap();
    assert!(failed.contains(&first.pfn.get()) && !first.reported);
    // ...and the next pass tries the blocks not tried yet before them.
    let mut t2 = Recorder::new(&buddy);
    r.report_pass(&buddy, &mut t2).unwrap();
    let order = t2.reported();
    assert_eq!(order.len(), 8);
    assert!(
        order[..4].iter().all(|p| !failed.contains(p)),
        "{order:?} vs failed {failed:?}"
    );
    assert!(order[4..].iter().all(|p| failed.contains(p)));
}

#[test]
fn the_guest_keeps_allocating_while_a_batch_is_out() {
    let (buddy, held) = checkerboard::<10>(8, 3);
    let r = Reporter::<4>::new(policy(3, 1, 0)).unwrap();
    // Free the held blocks so the pass has work and allocations have room.
    for h in &held[..4] {
        buddy.free(h.pfn, h.order).unwrap();
    }
    let mut t = Recorder::new(&buddy);
    t.during = Some(Box::new(|buddy, batch| {
        // Allocate every free frame there is: never one of the batch.
        let mut got = Vec::new();
        while let Ok(x) = buddy.alloc(ord(0)) {
            assert!(batch.iter().all(|b| {
                let (s, e) = (b.pfn.get(), b.pfn.get() + b.order.frames());
                x.pfn.get() < s || x.pfn.get() >= e
            }));
            got.push(x);
        }
        for x in got {
            buddy.free(x.pfn, x.order).unwrap();
        }
        let b = buddy.lock();
        b.check_invariants().unwrap();
        assert_eq!(
            b.free_frames() + b.allocated_frames() + b.isolated_frames(),
            b.managed_frames()
        );
    }));
    let s = r.report_pass(&buddy, &mut t).unwrap();
    assert!(s.reported_blocks > 0);
    let b = buddy.lock();
    b.check_invariants().unwrap();
    assert_eq!(b.isolated_frames(), 0);
}

#[test]
fn a_block_put_back_behind_the_reporters_back_is_an_error_not_a_panic() {
    let (buddy, _held) = checkerboard::<10>(8, 2);
    let r = Reporter::<4>::new(policy(2, 1, 0)).unwrap();
    let mut t = Recorder::new(&buddy);
    t.during = Some(Box::new(|buddy, batch| {
        buddy
            .lock()
            .put_back(batch[0].pfn, batch[0].order, false)
            .unwrap();
    }));
    let e = r.report_pass(&buddy, &mut t).unwrap_err();
    assert_eq!(
        e,
        PassError::BlockLost(crate::buddy::PutBackError::NotIsolated)
    );
    let b = buddy.lock();
    assert_eq!(b.isolated_frames(), 0, "the other blocks came back");
    b.check_invariants().unwrap();
    drop(b);
    assert_eq!(r.state(), RequestState::Idle);
}

#[test]
fn min_order_above_max_order_is_refused() {
    let (buddy, _held) = checkerboard::<4>(2, 2);
    let r = Reporter::<4>::new(policy(5, 1, 0)).unwrap();
    let e = r.report_pass(&buddy, &mut Recorder::new(&buddy));
    assert_eq!(e, Err(PassError::MinOrderAboveMaxOrder));
    assert_eq!(r.state(), RequestState::Idle);
}

#[test]
fn a_reported_block_merging_with_an_unreported_buddy_is_reported_at_the_higher_order() {
    // Two order-4 blocks; allocate one order-3 half of the first and report the rest. Freeing
    // the half merges it with its reported buddy into an unreported order-4 block, which the
    // next pass reports at order 4.
    let mut b = Buddy::<_, 4>::new(vec![FrameMeta::HOLE; 32], pfn(BASE)).unwrap();
    b.add_range(pfn(BASE), 32).unwrap();
    let x = b.alloc(ord(3)).unwrap();
    let buddy = LockedBuddy::new(b);
    let r = Reporter::<1>::new(policy(3, 1, 0)).unwrap();
    let s = r.report_pass(&buddy, &mut Recorder::new(&buddy)).unwrap();
    assert_eq!(s.reported_frames, 8 + 16);
    assert_eq!(buddy.free_merged(x.pfn, x.order), Ok(ord(4)));
    assert_eq!(
        stats(&buddy, 4),
        (2, 1, 0),
        "the merged block is unreported"
    );
    let mut t = Recorder::new(&buddy);
    r.report_pass(&buddy, &mut t).unwrap();
    assert_eq!(
        t.batches,
        [vec![Block {
            pfn: x.pfn,
            order: ord(4),
            reported: false
        }]]
    );
    assert_eq!(stats(&buddy, 4), (2, 2, 0));
}

// ---- when to run a pass ----

#[test]
fn on_free_asks_once_per_idle_period_and_ignores_small_orders() {
    let r = Reporter::<4>::new(policy(9, 16, 0)).unwrap();
    assert!(!r.on_free(ord(0)));
    assert!(!r.on_free(ord(8)));
    assert_eq!(r.state(), RequestState::Idle);
    assert!(r.on_free(ord(9)), "first qualifying free asks for a pass");
    assert_eq!(r.state(), RequestState::Requested);
    assert!(!r.on_free(ord(10)), "already asked");
    assert!(!r.request());
}

#[test]
fn free_asks_for_a_pass_as_free_merged_and_on_free_do() {
    // The same frees through `free_merged` + `on_free` and through a registered reporter's
    // `free`: the same answers and the same request state after every one, so moving the
    // order check into the allocator loses no request.
    let (a, held) = checkerboard::<10>(64, 3);
    let (n, _) = checkerboard::<10>(64, 3);
    let ra = Reporter::<4>::new(policy(4, 1, 0)).unwrap();
    let rn = Reporter::<4>::new(policy(4, 1, 0)).unwrap();
    assert!(
        rn.register(&n),
        "register asks for a pass for the memory free at boot"
    );
    assert!(ra.request());
    assert_eq!(n.lock().notify_order(), Some(ord(4)));
    let mut asked = 0;
    for (i, x) in held.iter().enumerate() {
        // Free order 0 pages of the held block one by one, then what is left whole.
        let x = *x;
        a.free(x.pfn, x.order).unwrap();
        n.free(x.pfn, x.order).unwrap();
        let pages: Vec<_> = (0..8).map(|_| a.alloc(ord(0)).unwrap()).collect();
        for &p in &pages {
            assert_eq!(n.alloc(ord(0)), Ok(p));
        }
        for p in pages {
            let want = ra.on_free(a.free_merged(p.pfn, p.order).unwrap());
            assert_eq!(rn.free(&n, p.pfn, p.order), Ok(want), "free {i}: {p:?}");
            asked += usize::from(want);
            assert_eq!(ra.state(), rn.state());
        }
        if i % 8 == 7 {
            // A pass now and then: back to idle, so later frees ask again.
            ra.report_pass(&a, &mut Recorder::new(&a)).unwrap();
            rn.report_pass(&n, &mut Recorder::new(&n)).unwrap();
            assert_eq!(ra.state(), rn.state());
        }
    }
    assert!(asked > 0, "some frees asked for a pass");
    let (a, n) = (a.lock(), n.lock());
    for o in 0..=10 {
        assert_eq!(a.order_stats(ord(o)), n.order_stats(ord(o)));
    }
}

#[test]
fn free_without_register_hears_nothing() {
    let (buddy, held) = checkerboard::<10>(2, 9);
    let r = Reporter::<4>::new(policy(9, 16, 0)).unwrap();
    assert_eq!(r.free(&buddy, held[0].pfn, held[0].order), Ok(false));
    assert_eq!(r.state(), RequestState::Idle);
    assert!(r.register(&buddy));
    r.report_pass(&buddy, &mut Recorder::new(&buddy)).unwrap();
    assert_eq!(r.state(), RequestState::Idle);
    assert_eq!(r.free(&buddy, held[1].pfn, held[1].order), Ok(true));
    assert_eq!(r.state(), RequestState::Requested);
}

#[test]
fn notify_frames_is_a_threshold() {
    let p = ReportPolicy {
        notify_frames: 4 * 512,
        ..ReportPolicy::DEFAULT
    };
    let r = Reporter::<32>::new(p).unwrap();
    assert!(!r.on_free(ord(9)));
    assert!(!r.on_free(ord(9)));
    assert!(!r.on_free(ord(9)));
    assert!(r.on_free(ord(9)), "the fourth 2 MiB block crosses 8 MiB");
    // A pass starts: the count restarts.
    let (buddy, _held) = checkerboard::<10>(2, 9);
    r.report_pass(&buddy, &mut Recorder::new(&buddy)).unwrap();
    assert_eq!(r.state(), RequestState::Idle);
    assert!(!r.on_free(ord(10)), "1024 frames < 2048");
    assert!(r.on_free(ord(10)));
}

#[test]
fn a_free_during_a_pass_is_not_lost() {
    let (buddy, _held) = checkerboard::<10>(8, 2);
    let r = Reporter::<4>::new(policy(2, 1, 0)).unwrap();
    // The free path runs while the batch is out: it must not ask (a pass is running)...
    let mut t = Recorder::new(&buddy);
    t.during = Some(Box::new(|_, _| {
        assert_ne!(r.state(), RequestState::Idle);
        assert!(!r.on_free(ord(2)));
    }));
    let s = r.report_pass(&buddy, &mut t).unwrap();
    // ...and the pass ends asking to be rescheduled instead.
    assert!(s.end.reschedule);
    assert!(!s.end.budget_exhausted);
    assert_eq!(r.state(), RequestState::Requested);
}

// ---- live migration ----

#[test]
fn reset_reported_forgets_everything_and_asks_for_a_pass() {
    let (buddy, _held) = checkerboard::<10>(8, 2);
    let r = Reporter::<4>::new(policy(2, 1, 0)).unwrap();
    r.report_pass(&buddy, &mut Recorder::new(&buddy)).unwrap();
    assert_eq!(stats(&buddy, 2), (8, 8, 0));
    assert!(r.reset_reported(&buddy));
    assert_eq!(stats(&buddy, 2), (8, 0, 0));
    assert_eq!(r.state(), RequestState::Requested);
    let s = r.report_pass(&buddy, &mut Recorder::new(&buddy)).unwrap();
    assert_eq!(s.reported_blocks, 8, "everything is reported again");
}

#[test]
fn a_batch_out_during_a_reset_comes_back_unreported() {
    let (buddy, _held) = checkerboard::<10>(8, 2);
    let r = Reporter::<4>::new(policy(2, 1, 0)).unwrap();
    let mut t = Recorder::new(&buddy);
    t.during = Some(Box::new(|buddy, _| {
        if r.epoch() == 0 {
            r.reset_reported(buddy); // live migration while the first batch is out
        }
    }));
    let s = r.report_pass(&buddy, &mut t).unwrap();
    let first: Vec<u64> = t.batches[0].iter().map(|b| b.pfn.get()).collect();
    assert_eq!(t.batches.len(), 2);
    drop(t);
    assert_eq!(
        s.reported_blocks, 4,
        "only the batch isolated after the reset"
    );
    assert!(
        s.end.budget_exhausted,
        "the budget of 8 went on two batches"
    );
    assert_eq!(stats(&buddy, 2), (8, 4, 0));
    let b = buddy.lock();
    for p in first {
        assert_eq!(
            b.block_info(pfn(p)).unwrap().state,
            BlockState::Free { reported: false }
        );
    }
}

// ---- poison ----

#[test]
fn poison_negotiation_follows_virtio() {
    let rep = 1u64 << VIRTIO_BALLOON_F_REPORTING;
    let poi = 1u64 << VIRTIO_BALLOON_F_PAGE_POISON;
    let other = 1u64 << 1; // STATS_VQ
    // No pattern kept: PAGE_POISON is declined, reporting allowed.
    let n = negotiate(rep | poi | other, FreePageContent::Unspecified);
    assert_eq!(n.accepted, rep | other);
    assert_eq!((n.poison_val, n.reporting), (None, Ok(())));
    // A pattern the device promises to keep: poison_val is the byte four times.
    let n = negotiate(rep | poi, FreePageContent::Poisoned(0xaa));
    assert_eq!(n.accepted, rep | poi);
    assert_eq!(n.poison_val, Some(0xaaaa_aaaa));
    assert_eq!(n.reporting, Ok(()));
    let n = negotiate(rep | poi, FreePageContent::Zeroed);
    assert_eq!((n.poison_val, n.reporting), (Some(0), Ok(())));
    // A pattern the device can't keep: reporting disabled, REPORTING declined.
    for content in [FreePageContent::Poisoned(0x5a), FreePageContent::Zeroed] {
        let n = negotiate(rep | other, content);
        assert_eq!(n.reporting, Err(ReportingDisabled::PoisonNotPreserved));
        assert_eq!(n.accepted, other);
        assert_eq!(n.poison_val, None);
    }
    // No reporting offered at all.
    let n = negotiate(poi, FreePageContent::Unspecified);
    assert_eq!(n.reporting, Err(ReportingDisabled::NotOffered));
    assert_eq!(n.accepted, 0);
    assert_eq!(
        std::format!("{}", ReportingDisabled::PoisonNotPreserved),
        "free pages hold a poison pattern the device cannot preserve"
    );
}

// ---- randomized ----

#[test]
fn randomized_report_ops_match_the_model() {
    use crate::testing::Rng;
    use crate::testing::report::{Coverage, Knobs, ReportHarness, random_op};
    let mut total = Coverage::default();
    for seed in 1..=10u64 {
        let mut rng = Rng::new(seed);
        let mut h = ReportHarness::new(Knobs::from_seed(seed));
        for i in 0..2500 {
            let op = random_op(&mut rng);
            if let Err(e) = h.apply(op) {
                panic!("seed {seed}, op {i} {op:?}: {e}");
            }
        }
        let c = h.coverage();
        total.submitted += c.submitted;
        total.completed_reported += c.completed_reported;
        total.completed_unreported += c.completed_unreported;
        total.sync_batches += c.sync_batches;
        total.transport_failures += c.transport_failures;
        total.watermark_stops += c.watermark_stops;
        total.budget_stops += c.budget_stops;
        h.finish()
            .unwrap_or_else(|e| panic!("seed {seed}: finish: {e}"));
    }
    // The runs reached every path worth checking.
    assert!(total.submitted > 500, "{total:?}");
    assert!(total.completed_reported > 200, "{total:?}");
    assert!(total.completed_unreported > 50, "{total:?}");
    assert!(total.sync_batches > 200, "{total:?}");
    assert!(total.transport_failures > 10, "{total:?}");
    assert!(
        total.watermark_stops > 0 && total.budget_stops > 0,
        "{total:?}"
    );
}
