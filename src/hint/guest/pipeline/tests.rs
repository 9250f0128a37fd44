//! Tests of the pipelined pass: the window, completions in any order, failed submissions,
//! device reset, live migration, budget and watermark.

use std::vec::Vec;

use super::*;
use crate::buddy::{Block, BlockState};
use crate::hint::guest::reporter::tests::{HostBusy, Locked, checkerboard, policy, stats};
use crate::hint::guest::*;

/// A pipelined transport that records submissions; the test completes them.
#[derive(Default)]
struct Queue {
    submitted: Vec<(BatchId, Vec<Block>)>,
    fail_next: bool,
}

impl PipelinedTransport for Queue {
    type Error = HostBusy;

    fn submit(&mut self, id: BatchId, batch: &[Block]) -> Result<(), HostBusy> {
        if core::mem::take(&mut self.fail_next) {
            return Err(HostBusy);
        }
        self.submitted.push((id, batch.to_vec()));
        Ok(())
    }
}

#[test]
fn send_32_refill_as_16_come_back() {
    // The "send 32, refill 16" scheme of (Duyck, "aerating memory via hinting", 2019), with
    // order-2 blocks: Pipeline<16, 2> keeps 32 blocks out.
    let (buddy, _held) = checkerboard::<10>(100, 2);
    let r = Reporter::<16>::new(policy(2, 1, 0)).unwrap();
    let mut p = Pipeline::<16, 2>::new();
    let mut q = Queue::default();
    let f = p.start_pass(&r, &buddy, &mut q).unwrap();
    assert_eq!((f.submitted, f.finished), (2, None));
    assert_eq!(p.in_flight(), 2);
    assert_eq!(p.in_flight_frames(), 32 * 4);
    assert_eq!(stats(&buddy, 2), (68, 0, 32));
    // Nothing more goes out until a batch comes back.
    assert_eq!(p.fill(&r, &buddy, &mut q).unwrap().submitted, 0);
    let (id0, b0) = q.submitted[0].clone();
    let c = p.complete(&r, &buddy, id0, true).unwrap();
    assert_eq!(
        c,
        Completed {
            blocks: 16,
            reported: true
        }
    );
    assert_eq!(stats(&buddy, 2), (84, 16, 16));
    for blk in &b0 {
        assert_eq!(
            buddy.lock().block_info(blk.pfn).unwrap().state,
            BlockState::Free { reported: true }
        );
    }
    assert_eq!(p.fill(&r, &buddy, &mut q).unwrap().submitted, 1, "16 more");
    assert_eq!(stats(&buddy, 2).2, 32);
    // Drain: complete the oldest in flight and refill until the pass ends.
    let mut finished = None;
    while p.in_flight() > 0 {
        let id = p.in_flight_ids().min().unwrap();
        p.complete(&r, &buddy, id, true).unwrap();
        let f = p.fill(&r, &buddy, &mut q).unwrap();
        finished = finished.or(f.finished);
    }
    assert_eq!(finished, Some(PassEnd::default()));
    assert_eq!(stats(&buddy, 2), (100, 100, 0));
    assert_eq!(p.stats().reported_blocks, 100);
    assert_eq!(p.stats().submitted, 7, "100 blocks in batches of 16");
    assert_eq!(r.state(), RequestState::Idle);
    buddy.lock().check_invariants().unwrap();
}

#[test]
fn completions_in_any_order_return_only_their_own_batch() {
    let (buddy, _held) = checkerboard::<10>(20, 2);
    let r = Reporter::<4>::new(policy(2, 1, 0)).unwrap();
    let mut p = Pipeline::<4, 3>::new();
    let mut q = Queue::default();
    let f = p.start_pass(&r, &buddy, &mut q).unwrap();
    assert_eq!((f.submitted, f.finished), (3, None));
    let ids: Vec<BatchId> = q.submitted.iter().map(|s| s.0).collect();
    let isolated = |b: &Locked<10>, blocks: &[Block]| {
        blocks
            .iter()
            .all(|x| b.lock().block_info(x.pfn).unwrap().state == BlockState::Isolated)
    };
    // The last batch completes first, failed: only its blocks come back.
    p.complete(&r, &buddy, ids[2], false).unwrap();
    assert!(isolated(&buddy, &q.submitted[0].1));
    assert!(isolated(&buddy, &q.submitted[1].1));
    assert!(!isolated(&buddy, &q.submitted[2].1));
    assert_eq!(p.batch(ids[1]).unwrap(), &q.submitted[1].1[..]);
    assert_eq!(p.batch(ids[2]), None);
    // Then the first, reported.
    p.complete(&r, &buddy, ids[0], true).unwrap();
    assert!(isolated(&buddy, &q.submitted[1].1));
    assert_eq!(stats(&buddy, 2), (16, 4, 4));
    // Stale and unknown ids change nothing.
    let before = buddy.lock().clone();
    assert_eq!(
        p.complete(&r, &buddy, ids[0], true),
        Err(CompleteError::UnknownBatch)
    );
    assert_eq!(
        p.complete(&r, &buddy, BatchId::from_raw(99), true),
        Err(CompleteError::UnknownBatch)
    );
    assert!(buddy.lock().same_state(&before));
    p.complete(&r, &buddy, ids[1], true).unwrap();
    assert_eq!(stats(&buddy, 2), (20, 8, 0));
    // Refill: the budget (20 blocks for 20 free blocks) has room for the 8 untried blocks;
    // the pass ends while their batches are still out.
    let f = p.fill(&r, &buddy, &mut q).unwrap();
    assert_eq!(f.submitted, 2);
    let end = f.finished.unwrap();
    assert!(end.budget_exhausted && end.reschedule && !end.watermark_hit);
    assert!(!p.pass_running());
    assert_eq!(p.in_flight(), 2);
    for i in [4, 3] {
        p.complete(&r, &buddy, q.submitted[i].0, true).unwrap();
    }
    assert_eq!(stats(&buddy, 2), (20, 16, 0));
    // The next pass retries the failed batch, tried last.
    let f = p.start_pass(&r, &buddy, &mut q).unwrap();
    assert_eq!((f.submitted, f.finished), (1, Some(PassEnd::default())));
    assert_eq!(q.submitted[5].1, q.submitted[2].1);
    p.complete(&r, &buddy, q.submitted[5].0, true).unwrap();
    assert_eq!(stats(&buddy, 2), (20, 20, 0));
    assert_eq!(p.stats().completed, 6);
    assert_eq!(p.stats().passes, 2);
    buddy.lock().check_invariants().unwrap();
}

#[test]
fn a_failed_submission_stops_the_pass() {
    let (buddy, _held) = checkerboard::<10>(12, 2);
    let r = Reporter::<4>::new(policy(2, 1, 0)).unwrap();
    let mut p = Pipeline::<4, 2>::new();
    let mut q = Queue {
        fail_next: true,
        ..Queue::default()
    };
    assert_eq!(
        p.start_pass(&r, &buddy, &mut q),
        Err(PassError::Transport(HostBusy))
    );
    assert!(!p.pass_running());
    assert_eq!(p.in_flight(), 0);
    assert_eq!(stats(&buddy, 2), (12, 0, 0), "the batch came back");
    assert_eq!(r.state(), RequestState::Idle);
    assert_eq!(p.fill(&r, &buddy, &mut q).unwrap(), Fill::default());
    // A later pass works.
    assert_eq!(p.start_pass(&r, &buddy, &mut q).unwrap().submitted, 2);
    assert_eq!(
        p.start_pass(&r, &buddy, &mut q),
        Err(PassError::PassActive),
        "one pass at a time"
    );
    // The device resets: everything in flight comes back unreported.
    assert_eq!(p.fail_all(&r, &buddy), Ok(2));
    assert_eq!(stats(&buddy, 2), (12, 0, 0));
    assert!(!p.pass_running());
    assert_eq!(r.state(), RequestState::Idle);
    assert_eq!(p.stats().unreported_blocks, 4 + 8);
    buddy.lock().check_invariants().unwrap();
}

#[test]
fn a_reset_while_batches_are_in_flight_returns_them_unreported() {
    let (buddy, _held) = checkerboard::<10>(12, 2);
    let r = Reporter::<4>::new(policy(2, 1, 0)).unwrap();
    let mut p = Pipeline::<4, 2>::new();
    let mut q = Queue::default();
    p.start_pass(&r, &buddy, &mut q).unwrap();
    assert!(p.pass_running());
    assert!(
        !r.reset_reported(&buddy),
        "a pass is running: it will ask to be rescheduled"
    );
    assert_eq!(r.state(), RequestState::Requested);
    let ids: Vec<BatchId> = p.in_flight_ids().collect();
    for id in ids {
        let c = p.complete(&r, &buddy, id, true).unwrap();
        assert!(!c.reported, "reported to the host before migration");
    }
    assert_eq!(stats(&buddy, 2), (12, 0, 0));
    assert_eq!(p.stats().unreported_blocks, 8);
}

#[test]
fn the_pipeline_keeps_the_budget_and_the_watermark() {
    // 40 order-2 blocks = 160 free frames; CAP 4, min order 2, low 100: guard 116, so at
    // most 11 blocks out at once, whatever the window.
    let (buddy, _held) = checkerboard::<10>(40, 2);
    let r = Reporter::<4>::new(policy(2, 1, 100)).unwrap();
    let mut p = Pipeline::<4, 8>::new();
    let mut q = Queue::default();
    let f = p.start_pass(&r, &buddy, &mut q).unwrap();
    assert_eq!(p.in_flight_frames(), 44);
    assert_eq!(f.submitted, 3, "4 + 4 + 3");
    assert!(f.finished.unwrap().watermark_hit);
    assert!(buddy.lock().free_frames() >= 116);
    p.fail_all(&r, &buddy).unwrap();
    // Budget: divisor 4 gives 12 blocks per pass.
    let r = Reporter::<4>::new(policy(2, 4, 0)).unwrap();
    let f = p.start_pass(&r, &buddy, &mut q).unwrap();
    assert_eq!(f.submitted, 3);
    let end = f.finished.unwrap();
    assert!(end.budget_exhausted && end.reschedule);
    assert_eq!(r.state(), RequestState::Requested);
}

/// Always succeeds: a synchronous transport for `report_pass`.
struct Accept;

impl ReportTransport for Accept {
    type Error = HostBusy;

    fn report(&mut self, _: &[Block]) -> Result<(), HostBusy> {
        Ok(())
    }
}

/// Regression (misuse audit): a second pass of the same reporter — `report_pass`, or
/// another pipeline's `start_pass` — while a pipeline pass was taking blocks ran anyway
/// (`state` alone cannot say a pass runs: a free during it makes it REQUESTED), and left the
/// reporter Idle under a running pipeline pass. Both are refused with `PassActive` and
/// change nothing; once the pass ends, the next one starts.
#[test]
fn one_pass_per_reporter_at_a_time() {
    let (buddy, _held) = checkerboard::<10>(64, 2);
    let r = Reporter::<4>::new(policy(2, 1, 0)).unwrap();
    let mut p = Pipeline::<4, 1>::new();
    let mut q = Queue::default();
    assert_eq!(p.start_pass(&r, &buddy, &mut q).unwrap().finished, None);
    assert_eq!(r.state(), RequestState::Active);
    let before = stats(&buddy, 2);
    assert_eq!(
        r.report_pass(&buddy, &mut Accept),
        Err(PassError::PassActive)
    );
    let mut p2 = Pipeline::<4, 1>::new();
    let mut q2 = Queue::default();
    assert_eq!(
        p2.start_pass(&r, &buddy, &mut q2),
        Err(PassError::PassActive)
    );
    assert!(q2.submitted.is_empty() && !p2.pass_running());
    // A free during the pass asks for another one: still refused while it runs.
    r.request();
    assert_eq!(r.state(), RequestState::Requested);
    assert_eq!(
        r.report_pass(&buddy, &mut Accept),
        Err(PassError::PassActive)
    );
    assert_eq!(stats(&buddy, 2), before);
    assert!(p.pass_running());
    // The device resets: the pass ends and the reporter may run again.
    assert_eq!(p.fail_all(&r, &buddy), Ok(1));
    assert!(r.report_pass(&buddy, &mut Accept).is_ok());
    assert!(p2.start_pass(&r, &buddy, &mut q2).is_ok());
}

/// Regression (misuse audit): `complete` with another allocator than the batch's removed
/// the batch first and then failed (its blocks stayed isolated for good), or — when that
/// allocator had its own batch at the same frames — put back the other pipeline's blocks
/// while its host could still be discarding them. Now refused, changing nothing, and so are
/// `fill`, `fail_all` and a new pass with batches of another allocator in flight.
#[test]
fn a_pipeline_refuses_another_allocator() {
    let (a, _ha) = checkerboard::<10>(16, 2);
    let (b, _hb) = checkerboard::<10>(16, 2);
    let ra = Reporter::<4>::new(policy(2, 1, 0)).unwrap();
    let rb = Reporter::<4>::new(policy(2, 1, 0)).unwrap();
    let (mut pa, mut pb) = (Pipeline::<4, 1>::new(), Pipeline::<4, 1>::new());
    let (mut qa, mut qb) = (Queue::default(), Queue::default());
    pa.start_pass(&ra, &a, &mut qa).unwrap();
    pb.start_pass(&rb, &b, &mut qb).unwrap();
    assert_eq!(qa.submitted[0].1, qb.submitted[0].1, "same frames in both");
    let (sa, sb) = (stats(&a, 2), stats(&b, 2));
    let id = qa.submitted[0].0;
    assert_eq!(
        pa.complete(&ra, &b, id, true),
        Err(CompleteError::ForeignBuddy)
    );
    assert_eq!(pa.fill(&ra, &b, &mut qa), Err(PassError::ForeignBuddy));
    assert_eq!(pa.fail_all(&ra, &b), Err(CompleteError::ForeignBuddy));
    assert_eq!((stats(&a, 2), stats(&b, 2)), (sa, sb));
    assert_eq!(pa.in_flight(), 1);
    let blk = qb.submitted[0].1[0];
    assert_eq!(
        b.lock().block_info(blk.pfn).unwrap().state,
        BlockState::Isolated
    );
    // The right allocator works, and each pipeline completes its own batch.
    assert_eq!(pa.complete(&ra, &a, id, true).unwrap().blocks, 4);
    assert_eq!(
        pb.complete(&rb, &b, qb.submitted[0].0, true)
            .unwrap()
            .blocks,
        4
    );
    // With the pass still filling on `a`, a fail_all on `a` ends it; after that nothing is
    // in flight and the pipeline may serve `b`.
    assert_eq!(pa.fail_all(&ra, &a), Ok(0));
    assert!(!pa.pass_running() && pa.in_flight() == 0);
    pb.fail_all(&rb, &b).unwrap();
    let mut q = Queue::default();
    assert!(pa.start_pass(&rb, &b, &mut q).is_ok());
}
