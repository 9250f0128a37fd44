//! Loom model of the free-page reporter: a report pass (isolate under the lock, report with
//! the lock released, put back) racing allocation and freeing on another CPU.
//!
//! Run with `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test --release
//! --test loom_reporter`. Checked in every interleaving loom explores:
//! - while a batch is out, each of its blocks is isolated in the allocator (so no `alloc`
//!   returned it), and the allocator lock is free;
//! - `alloc` never hands out a frame of a batch in flight;
//! - free + allocated + isolated frames = managed frames after every operation, and every
//!   block is back on the lists at the end;
//! - a qualifying free is never lost: either `on_free` asked for a pass, or the pass that
//!   was running ends asking to be rescheduled; the same when the free goes through
//!   `Reporter::free`, whose order check is inside the allocator's free;
//! - two passes of one reporter never run at once (the second is refused with `PassActive`).
#![cfg(loom)]
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use hvmem::buddy::{Block, BlockState, Buddy, FrameMeta, LockedBuddy};
use hvmem::hint::guest::{
    BatchId, Pipeline, PipelinedTransport, ReportPolicy, ReportTransport, Reporter,
};
use hvmem::{PageOrder, Pfn};
use loom::sync::Arc;
use loom::sync::atomic::{AtomicU64, Ordering};
use loom::thread;

type Shared = LockedBuddy<Vec<FrameMeta>, 2>;

fn order(o: u8) -> PageOrder {
    PageOrder::new(o).unwrap()
}

/// Eight frames at frame 8: two order-2 blocks.
fn shared() -> Arc<Shared> {
    let mut b = Buddy::new(vec![FrameMeta::HOLE; 8], Pfn::new(8).unwrap()).unwrap();
    b.add_range(Pfn::new(8).unwrap(), 8).unwrap();
    Arc::new(LockedBuddy::new(b))
}

/// Reports order-2 blocks one at a time; the guard (4 frames) lets one block out at once.
fn reporter() -> Arc<Reporter<1>> {
    let policy = ReportPolicy {
        min_order: order(2),
        low_watermark: 0,
        budget_divisor: 1,
        notify_frames: 4,
    };
    Arc::new(Reporter::new(policy).unwrap())
}

fn conserved(b: &Buddy<Vec<FrameMeta>, 2>) {
    assert_eq!(
        b.free_frames() + b.allocated_frames() + b.isolated_frames(),
        b.managed_frames()
    );
}

/// Bit `pfn - 8` set for every frame of the batch out right now.
fn frame_mask(batch: &[Block]) -> u64 {
    batch.iter().fold(0, |m, b| {
        let first = b.pfn.get() - 8;
        m | (((1u64 << b.order.frames()) - 1) << first)
    })
}

/// A transport that checks its batch while the lock is released.
struct Checking {
    buddy: Arc<Shared>,
    out: Arc<AtomicU64>,
}

impl ReportTransport for Checking {
    type Error = ();

    fn report(&mut self, batch: &[Block]) -> Result<(), ()> {
        self.out.store(frame_mask(batch), Ordering::SeqCst);
        {
            let b = self.buddy.lock();
            for blk in batch {
                assert_eq!(b.block_info(blk.pfn).unwrap().state, BlockState::Isolated);
            }
            conserved(&b);
        }
        self.out.store(0, Ordering::SeqCst);
        Ok(())
    }
}

/// How the other CPU frees and tells the reporter.
#[derive(Clone, Copy)]
enum FreePath {
    /// `free_merged`, then `on_free` with the merged order.
    MergedOnFree,
    /// `Reporter::free` on an allocator whose notify order is the reporter's `min_order`
    /// (what `register` sets): the order check inside the allocator's free.
    ReporterFree,
}

/// The allocator and reporter, set up for `path`.
fn setup(path: FreePath) -> (Arc<Shared>, Arc<Reporter<1>>) {
    let (buddy, reporter) = (shared(), reporter());
    if let FreePath::ReporterFree = path {
        // `register` also asks for a pass; the model starts from an idle reporter.
        buddy.lock().set_notify_order(Some(order(2)));
    }
    (buddy, reporter)
}

/// The other CPU: allocate a page, check it against the batch out, free it, tell the
/// reporter. Returns whether the reporter asked for a pass.
fn alloc_and_free(buddy: &Shared, reporter: &Reporter<1>, out: &AtomicU64, path: FreePath) -> bool {
    let page = {
        let mut b = buddy.lock();
        let page = b.alloc(order(0)).unwrap();
        // The batch mask is published before the transport checks the blocks and cleared
        // before they are put back, so an isolated frame handed out would show here.
        let bit = 1u64 << (page.pfn.get() - 8);
        assert_eq!(
            out.load(Ordering::SeqCst) & bit,
            0,
            "{page:?} is in a batch"
        );
        conserved(&b);
        page
    };
    if let FreePath::ReporterFree = path {
        let asked = reporter.free(buddy, page.pfn, page.order).unwrap();
        conserved(&buddy.lock());
        return asked;
    }
    let merged = buddy.free_merged(page.pfn, page.order).unwrap();
    assert_eq!(
        merged,
        order(2),
        "the page's block had nothing else allocated"
    );
    conserved(&buddy.lock());
    reporter.on_free(merged)
}

#[test]
fn a_report_pass_races_alloc_and_free() {
    report_pass_races(FreePath::MergedOnFree);
}

#[test]
fn a_report_pass_races_alloc_and_reporter_free() {
    report_pass_races(FreePath::ReporterFree);
}

fn report_pass_races(path: FreePath) {
    loom::model(move || {
        let (buddy, reporter) = setup(path);
        let out = Arc::new(AtomicU64::new(0));
        let other = {
            let (buddy, reporter, out) = (buddy.clone(), reporter.clone(), out.clone());
            thread::spawn(move || alloc_and_free(&buddy, &reporter, &out, path))
        };
        let mut transport = Checking {
            buddy: buddy.clone(),
            out: out.clone(),
        };
        let stats = reporter.report_pass(&buddy, &mut transport).unwrap();
        let asked = other.join().unwrap();
        assert!(
            asked || stats.end.reschedule,
            "a free during the pass was lost: {stats:?}"
        );
        let b = buddy.lock();
        b.check_invariants().unwrap();
        assert_eq!(b.isolated_frames(), 0);
        assert_eq!(b.free_frames(), 8);
        // The other CPU may have split and re-merged a reported block (unreported again).
        assert!(b.reported_frames() <= 4 * stats.reported_blocks);
    });
}

/// A queue transport that only records.
struct Queue(Vec<BatchId>);

impl PipelinedTransport for Queue {
    type Error = ();

    fn submit(&mut self, id: BatchId, _batch: &[Block]) -> Result<(), ()> {
        self.0.push(id);
        Ok(())
    }
}

#[test]
fn a_completion_races_alloc_and_free() {
    completion_races(FreePath::MergedOnFree);
}

#[test]
fn a_completion_races_alloc_and_reporter_free() {
    completion_races(FreePath::ReporterFree);
}

fn completion_races(path: FreePath) {
    loom::model(move || {
        let (buddy, reporter) = setup(path);
        let mut pipeline = Pipeline::<1, 1>::new();
        let mut queue = Queue(Vec::new());
        let fill = pipeline.start_pass(&reporter, &buddy, &mut queue).unwrap();
        assert_eq!(fill.submitted, 1);
        let batch = pipeline.batch(queue.0[0]).unwrap().to_vec();
        let out = Arc::new(AtomicU64::new(frame_mask(&batch)));
        let other = {
            let (buddy, reporter, out) = (buddy.clone(), reporter.clone(), out.clone());
            thread::spawn(move || alloc_and_free(&buddy, &reporter, &out, path))
        };
        // The host completes the batch while the other CPU allocates: clear the mask first,
        // as the transport would before the blocks can come back.
        out.store(0, Ordering::SeqCst);
        let done = pipeline
            .complete(&reporter, &buddy, queue.0[0], true)
            .unwrap();
        assert!(done.reported);
        let asked = other.join().unwrap();
        // Finish the pass: the other block may still be unreported.
        let end = loop {
            let fill = pipeline.fill(&reporter, &buddy, &mut queue).unwrap();
            if let Some(end) = fill.finished {
                break end;
            }
            let id = *queue.0.last().unwrap();
            pipeline.complete(&reporter, &buddy, id, true).unwrap();
        };
        assert!(asked || end.reschedule, "a free during the pass was lost");
        let b = buddy.lock();
        b.check_invariants().unwrap();
        assert_eq!(pipeline.in_flight(), 0);
        assert_eq!(b.isolated_frames(), 0);
        assert_eq!(b.free_frames(), 8);
    });
}

/// Counts the passes inside `report` at once; fails if two ever overlap.
struct Exclusive {
    inside: Arc<AtomicU64>,
}

impl ReportTransport for Exclusive {
    type Error = ();

    fn report(&mut self, _batch: &[Block]) -> Result<(), ()> {
        assert_eq!(
            self.inside.fetch_add(1, Ordering::SeqCst),
            0,
            "two report passes of one reporter overlap"
        );
        thread::yield_now();
        self.inside.fetch_sub(1, Ordering::SeqCst);
        Ok(())
    }
}

/// Two threads call `report_pass` on one reporter (the embedder forgot that passes are its
/// one work item's job): in every interleaving at most one pass runs, the other is refused
/// with `PassActive` or runs after it. (Without the reporter's running flag both passes
/// were inside `report` at once in some interleavings.)
#[test]
fn concurrent_passes_of_one_reporter_never_overlap() {
    loom::model(|| {
        // Sixteen frames: four order-2 blocks, so the guard lets two passes take one each.
        let mut b = Buddy::new(vec![FrameMeta::HOLE; 16], Pfn::new(16).unwrap()).unwrap();
        b.add_range(Pfn::new(16).unwrap(), 16).unwrap();
        let buddy = Arc::new(LockedBuddy::new(b));
        let r = reporter();
        let inside = Arc::new(AtomicU64::new(0));
        let run = |buddy: Arc<Shared>, r: Arc<Reporter<1>>, inside: Arc<AtomicU64>| {
            move || match r.report_pass(&buddy, &mut Exclusive { inside }) {
                Ok(s) => s.reported_blocks,
                Err(hvmem::hint::guest::PassError::PassActive) => 0,
                Err(e) => panic!("{e:?}"),
            }
        };
        let t = thread::spawn(run(buddy.clone(), r.clone(), inside.clone()));
        let mine = run(buddy.clone(), r.clone(), inside)();
        let theirs = t.join().unwrap();
        let b = buddy.lock();
        conserved(&b);
        assert_eq!(b.isolated_frames(), 0);
        assert!(mine + theirs >= 1, "no pass reported anything");
        assert_eq!(b.reported_frames(), 4 * (mine + theirs));
    });
}
