//! The free-page reporter's CPU cost, and what it costs the allocator's hot path.
//!
//! Run: `cargo bench --bench reporting`. Groups:
//! - `report_pass`: one reporting pass with a no-op transport over a 1 GiB arena whose
//!   2 MiB blocks alternate allocated / free (256 free order-9 blocks that can't merge).
//!   Throughput is in blocks, so criterion's time per element is the cost per 2 MiB block
//!   (target <= 50 ns). IDs: `sync_default_policy` (Linux's budget: 32 blocks, one batch of
//!   32), `sync_whole_list` (budget divisor 1: all 256 blocks, 8 batches), `pipeline_16x2`
//!   (a `Pipeline<16, 2>` pass, budget divisor 8, every batch completed as soon as it is
//!   submitted: 32 blocks, the whole window). Between
//!   iterations the reported flags are reset outside the timed region (`iter_custom`).
//! - `order0_pair_reporting`: one order-0 alloc + free in a warm 1 GiB arena (as
//!   `order0_pair` of `benches/buddy.rs`). IDs: `locked` (a `LockedBuddy`, no reporter),
//!   `locked_reporter_attached` (the same with the reporter registered on the arena and
//!   every free going through `Reporter::free`, as a guest with a reporter does, the
//!   reporter beside the arena in one `Guest`; target <= 1 % over `locked`; both IDs use
//!   the same arena, so its placement in memory is the same for both),
//!   and `buddy` (the plain `Buddy`, for reference: the lock's own cost).
//!
//! Deterministic instruction counts: `HVMEM_CALLGRIND=<workload> valgrind --tool=callgrind
//! --toggle-collect='*measured_*' target/release/deps/reporting-<hash>` runs a workload a
//! fixed number of times outside criterion (workloads: `pass_default`, `pass_whole_list`,
//! `pipeline`, `pair_plain`, `pair_locked`, `pair_attached`, and two forms of the attached
//! pair for comparison: `pair_attached_by_ref`, the reporter passed as a reference of its
//! own, and `pair_merged_on_free`, the check written as `free_merged` + `on_free`) and prints how many iterations and blocks it
//! ran; divide callgrind's instruction count by them. `HVMEM_CALLGRIND=pair_interleaved`
//! (no valgrind) times `locked` and `locked_reporter_attached` in 40 alternating rounds of
//! 10^6 pairs and prints the minimum and median of each and the overhead: steadier than two
//! criterion estimates on a shared machine.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, black_box, criterion_group};
use hvmem::buddy::{Block, Buddy, FrameMeta, LockedBuddy};
use hvmem::hint::guest::{
    BatchId, Pipeline, PipelinedTransport, ReportPolicy, ReportTransport, Reporter,
};
use hvmem::testing::Rng;
use hvmem::{PageOrder, Pfn};

/// Frames in 1 GiB.
const GIB: u64 = 1 << 18;
const MAX_ORDER: usize = 10;
const BASE: u64 = GIB;

type Arena = LockedBuddy<Vec<FrameMeta>, MAX_ORDER>;

fn order(o: u8) -> PageOrder {
    PageOrder::new(o).unwrap()
}

fn buddy(frames: u64) -> Buddy<Vec<FrameMeta>, MAX_ORDER> {
    let mut b = Buddy::new(
        vec![FrameMeta::HOLE; frames as usize],
        Pfn::new(BASE).unwrap(),
    )
    .unwrap();
    b.add_range(Pfn::new(BASE).unwrap(), frames).unwrap();
    b
}

/// 1 GiB with every other 2 MiB block allocated: 256 free order-9 blocks, none mergeable.
fn checkerboard() -> (Arena, Vec<Block>) {
    let mut b = buddy(GIB);
    let mut all: Vec<_> = std::iter::from_fn(|| b.alloc(PageOrder::HUGE_2M).ok()).collect();
    all.sort_by_key(|x| x.pfn);
    let mut held = Vec::new();
    for (i, x) in all.into_iter().enumerate() {
        if i % 2 == 0 {
            b.free(x.pfn, x.order).unwrap();
        } else {
            held.push(x);
        }
    }
    assert_eq!(b.order_stats(PageOrder::HUGE_2M).free, 256);
    (LockedBuddy::new(b), held)
}

/// Reports nothing anywhere: the pass's own cost.
struct NoOp;

impl ReportTransport for NoOp {
    type Error = ();

    #[inline]
    fn report(&mut self, batch: &[Block]) -> Result<(), ()> {
        black_box(batch);
        Ok(())
    }
}

/// Queues ids; the bench completes them at once.
struct Ids(Vec<BatchId>);

impl PipelinedTransport for Ids {
    type Error = ();

    #[inline]
    fn submit(&mut self, id: BatchId, batch: &[Block]) -> Result<(), ()> {
        black_box(batch);
        self.0.push(id);
        Ok(())
    }
}

/// Batches of 16 and budget divisor 8: a pass over 256 free blocks takes 32, two batches,
/// the whole window.
fn pipeline_reporter() -> Reporter<16> {
    Reporter::new(ReportPolicy {
        budget_divisor: 8,
        ..ReportPolicy::DEFAULT
    })
    .unwrap()
}

fn reporter(budget_divisor: u32) -> Reporter<32> {
    Reporter::new(ReportPolicy {
        budget_divisor,
        ..ReportPolicy::DEFAULT
    })
    .unwrap()
}

/// One synchronous pass; returns the blocks it reported.
#[inline(never)]
fn measured_pass(r: &Reporter<32>, arena: &Arena) -> u64 {
    r.report_pass(arena, &mut NoOp).unwrap().reported_blocks
}

/// One pipelined pass with every batch completed as soon as it is submitted.
#[inline(never)]
fn measured_pipeline(r: &Reporter<16>, p: &mut Pipeline<16, 2>, q: &mut Ids, arena: &Arena) -> u64 {
    let before = p.stats().reported_blocks;
    let mut fill = p.start_pass(r, arena, q).unwrap();
    loop {
        for id in q.0.drain(..) {
            p.complete(r, arena, id, true).unwrap();
        }
        if fill.finished.is_some() && p.in_flight() == 0 {
            break;
        }
        fill = p.fill(r, arena, q).unwrap();
    }
    p.stats().reported_blocks - before
}

fn report_pass(c: &mut Criterion) {
    let mut g = c.benchmark_group("report_pass");
    let (arena, _held) = checkerboard();
    for (name, divisor, blocks) in [("sync_default_policy", 16, 32), ("sync_whole_list", 1, 256)] {
        let r = reporter(divisor);
        arena.lock().reset_reported();
        assert_eq!(measured_pass(&r, &arena), blocks);
        arena.lock().reset_reported();
        g.throughput(Throughput::Elements(blocks));
        g.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    arena.lock().reset_reported();
                    let t = Instant::now();
                    black_box(measured_pass(&r, &arena));
                    total += t.elapsed();
                }
                total
            })
        });
    }
    let r = pipeline_reporter();
    let mut p = Pipeline::<16, 2>::new();
    let mut q = Ids(Vec::new());
    arena.lock().reset_reported();
    assert_eq!(measured_pipeline(&r, &mut p, &mut q, &arena), 32);
    g.throughput(Throughput::Elements(32));
    g.bench_function(BenchmarkId::from_parameter("pipeline_16x2"), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                arena.lock().reset_reported();
                let t = Instant::now();
                black_box(measured_pipeline(&r, &mut p, &mut q, &arena));
                total += t.elapsed();
            }
            total
        })
    });
    g.finish();
}

/// The warm arena of `benches/buddy.rs`: every page handed out in random order-0..=3
/// blocks, a random half freed again.
fn warm(b: &mut Buddy<Vec<FrameMeta>, MAX_ORDER>) -> Vec<Block> {
    let mut rng = Rng::new(7);
    let mut held = Vec::new();
    loop {
        let o = (rng.next_u64() % 4) as u8;
        match b.alloc(order(o)) {
            Ok(x) => held.push(x),
            Err(_) if o == 0 => break,
            Err(_) => {}
        }
    }
    for i in (1..held.len()).rev() {
        held.swap(i, rng.next_u64() as usize % (i + 1));
    }
    for x in held.split_off(held.len() / 2) {
        b.free(x.pfn, x.order).unwrap();
    }
    held
}

#[inline(never)]
fn measured_pair_plain(b: &mut Buddy<Vec<FrameMeta>, MAX_ORDER>) {
    let x = b.alloc(PageOrder::BASE).unwrap();
    b.free(black_box(x.pfn), x.order).unwrap();
}

#[inline(never)]
fn measured_pair_locked(a: &Arena) {
    let x = a.alloc(PageOrder::BASE).unwrap();
    a.free(black_box(x.pfn), x.order).unwrap();
}

/// What a guest with a reporter holds: the allocator and the reporter registered on it, side
/// by side, as a `no_std` guest declares them (two statics: `LockedBuddy::new` and
/// `Reporter::new` are `const` for that), so the free path finds the reporter at a fixed
/// place and needs no register of its own for it.
struct Guest {
    arena: Arena,
    reporter: Reporter<32>,
}

impl Guest {
    fn new(arena: Arena) -> Self {
        let reporter = reporter(16);
        reporter.register(&arena);
        Self { arena, reporter }
    }
}

/// A guest with a reporter frees through `Reporter::free` (the reporter is registered on
/// the arena, so the order check rides on the allocator's own).
#[inline(never)]
fn measured_pair_attached(g: &Guest) {
    let x = g.arena.alloc(PageOrder::BASE).unwrap();
    if g.reporter
        .free(&g.arena, black_box(x.pfn), x.order)
        .unwrap()
    {
        black_box(());
    }
}

/// The same with the reporter passed as a reference of its own (callgrind only): the
/// caller keeps it in a callee-saved register across the allocation, three instructions.
#[inline(never)]
fn measured_pair_attached_by_ref(a: &Arena, r: &Reporter<32>) {
    let x = a.alloc(PageOrder::BASE).unwrap();
    if r.free(a, black_box(x.pfn), x.order).unwrap() {
        black_box(());
    }
}

/// The same with `free_merged` + `on_free` (the check after the free; callgrind only).
#[inline(never)]
fn measured_pair_merged_on_free(a: &Arena, r: &Reporter<32>) {
    let x = a.alloc(PageOrder::BASE).unwrap();
    let merged = a.free_merged(black_box(x.pfn), x.order).unwrap();
    if r.on_free(merged) {
        black_box(());
    }
}

fn order0_pair(c: &mut Criterion) {
    let mut g = c.benchmark_group("order0_pair_reporting");
    g.throughput(Throughput::Elements(1));
    let mut plain = buddy(GIB);
    let _held = warm(&mut plain);
    // One arena for both IDs (a pair leaves it as it was; `free` ignores the registered
    // notify order): two copies sat on different physical pages, whose cache-set conflicts
    // moved either ID by more than the 1 % this group is about.
    let guest = Guest::new(LockedBuddy::new(plain.clone()));
    g.bench_function(BenchmarkId::from_parameter("locked"), |b| {
        b.iter(|| measured_pair_locked(&guest.arena))
    });
    g.bench_function(
        BenchmarkId::from_parameter("locked_reporter_attached"),
        |b| b.iter(|| measured_pair_attached(&guest)),
    );
    g.bench_function(BenchmarkId::from_parameter("buddy"), |b| {
        b.iter(|| measured_pair_plain(&mut plain))
    });
    g.finish();
}

/// Runs one workload a fixed number of times for callgrind; prints iterations and blocks.
fn callgrind(workload: &str) {
    const N: u64 = 1000;
    match workload {
        "pass_default" | "pass_whole_list" => {
            let (arena, _held) = checkerboard();
            let r = reporter(if workload == "pass_default" { 16 } else { 1 });
            let mut blocks = 0;
            for _ in 0..N {
                arena.lock().reset_reported();
                blocks += measured_pass(&r, &arena);
            }
            println!("{workload}: {N} passes, {blocks} blocks");
        }
        "pipeline" => {
            let (arena, _held) = checkerboard();
            let r = pipeline_reporter();
            let mut p = Pipeline::<16, 2>::new();
            let mut q = Ids(Vec::new());
            let mut blocks = 0;
            for _ in 0..N {
                arena.lock().reset_reported();
                blocks += measured_pipeline(&r, &mut p, &mut q, &arena);
            }
            println!("{workload}: {N} passes, {blocks} blocks");
        }
        "pair_locked"
        | "pair_attached"
        | "pair_attached_by_ref"
        | "pair_merged_on_free"
        | "pair_plain" => {
            let mut plain = buddy(GIB);
            let _held = warm(&mut plain);
            let guest = Guest::new(LockedBuddy::new(plain.clone()));
            let (arena, r) = (&guest.arena, &guest.reporter);
            for _ in 0..N * 100 {
                match workload {
                    "pair_locked" => measured_pair_locked(arena),
                    "pair_attached" => measured_pair_attached(&guest),
                    "pair_attached_by_ref" => measured_pair_attached_by_ref(arena, r),
                    "pair_merged_on_free" => measured_pair_merged_on_free(arena, r),
                    _ => measured_pair_plain(&mut plain),
                }
            }
            println!("{workload}: {} pairs", N * 100);
        }
        "pair_interleaved" => pair_interleaved(40, 1_000_000),
        other => eprintln!("unknown workload {other}"),
    }
}

/// `locked` and `locked_reporter_attached` in alternating rounds of `n` pairs, in one
/// process, on one warm arena (as the criterion group): on a shared machine the fastest
/// round of each is the least disturbed, and the overhead is read from the minima and the
/// medians.
fn pair_interleaved(rounds: usize, n: u64) {
    let mut plain = buddy(GIB);
    let _held = warm(&mut plain);
    let guest = Guest::new(LockedBuddy::new(plain));
    let (mut tl, mut ta) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let t = Instant::now();
        for _ in 0..n {
            measured_pair_locked(&guest.arena);
        }
        tl.push(t.elapsed().as_secs_f64() * 1e9 / n as f64);
        let t = Instant::now();
        for _ in 0..n {
            measured_pair_attached(&guest);
        }
        ta.push(t.elapsed().as_secs_f64() * 1e9 / n as f64);
    }
    for t in [&mut tl, &mut ta] {
        t.sort_by(f64::total_cmp);
    }
    let (ml, ma) = (tl[rounds / 2], ta[rounds / 2]);
    println!(
        "order0 pair interleaved, {rounds} rounds of {n}: locked min {:.3} ns median {ml:.3} ns; \
         attached min {:.3} ns median {ma:.3} ns; overhead {:+.2} % (minima), {:+.2} % (medians)",
        tl[0],
        ta[0],
        (ta[0] / tl[0] - 1.0) * 100.0,
        (ma / ml - 1.0) * 100.0
    );
}

criterion_group!(benches, report_pass, order0_pair);

fn main() {
    if let Ok(workload) = std::env::var("HVMEM_CALLGRIND") {
        callgrind(&workload);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
