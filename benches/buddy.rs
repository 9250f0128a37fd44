//! The buddy allocator against `buddy_system_allocator::FrameAllocator`, in the same groups.
//!
//! Run: `cargo bench --bench buddy`. Each group has two `BenchmarkId`s, `hvmem` and
//! `buddy_system_allocator`, over the same workload and the same random sequence:
//! - `order0_pair`: one order-0 alloc + free in a warm 1 GiB arena (all of it handed out in
//!   order-0..=3 blocks, a random half freed again).
//! - `order0_pair_pristine`: the same pair in a fully merged arena (10 splits + 10 merges).
//! - `mixed_churn`: orders 0..=9 from a fixed seed, ~70 % of 1 GiB held, one free + one alloc
//!   per iteration.
//! - `fragmented`: a 2 GiB arena whose first 1 GiB has every other 4 KiB page allocated (the
//!   `usemem --punch-holes` pattern of Hildenbrand, "VIRTIO_BALLOON_F_THP_ORDER to
//!   handle THP spilt issue", 2020); one iteration allocates order-9 blocks until
//!   none is left and frees them again.
//!
//! Deterministic instruction counts: `HVMEM_CALLGRIND=<workload> valgrind --tool=callgrind
//! --toggle-collect='*measured_*' target/release/deps/buddy-<hash>` runs 1,000,000
//! `mixed_churn` iterations outside criterion (workloads `churn_hvmem`, `churn_peer`; the
//! count includes the loop's own work and the setup of ~1,800 blocks); divide by 10^6.
//! Workloads `fragmented_hvmem` and `fragmented_peer` run 1,000 `fragmented` iterations
//! (1,024 operations each) after the untimed fragmenting; divide by 1,024,000.
//! `HVMEM_CALLGRIND=churn_interleaved target/release/deps/buddy-<hash>` (no valgrind) times
//! `mixed_churn` for both allocators in 40 alternating rounds of 200,000 iterations and
//! prints the minimum and median of each and their ratios: steadier on a shared machine.
//! It also times the harness alone (no allocator behind it), which both figures include.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use buddy_system_allocator::FrameAllocator;
use criterion::{BenchmarkId, Criterion, Throughput, black_box, criterion_group};
use hvmem::buddy::{Buddy, FrameMeta};
use hvmem::testing::Rng;
use hvmem::{PageOrder, Pfn};

/// Frames in 1 GiB.
const GIB: u64 = 1 << 18;
/// Orders 0..=10: hvmem's default and Linux's.
const MAX_ORDER: usize = 10;
/// Where the arena starts (1 GiB, as RAM above the first gigabyte often does).
const BASE: u64 = GIB;

type Ours<const M: usize = MAX_ORDER> = Buddy<Vec<FrameMeta>, M>;
/// The peer at its default `ORDER` (32: blocks up to 2^31 frames). With `ORDER = 11`, which
/// would match our orders 0..=10, its `dealloc` drops the block whenever a merge reaches the
/// top order (0.11.0: the merge loop ends without inserting), so the arena leaks away.
type Peer = FrameAllocator<32>;

fn ours<const M: usize>(frames: u64) -> Ours<M> {
    let mut b = Buddy::new(
        vec![FrameMeta::HOLE; frames as usize],
        Pfn::new(BASE).unwrap(),
    )
    .unwrap();
    b.add_range(Pfn::new(BASE).unwrap(), frames).unwrap();
    b
}

fn peer(frames: u64) -> Peer {
    let mut p = Peer::new();
    p.add_frame(BASE as usize, (BASE + frames) as usize);
    p
}

fn order(o: u32) -> PageOrder {
    PageOrder::new(o as u8).unwrap()
}

/// The operations both allocators offer. Each allocator keeps what it hands out in its own
/// API's terms (`Handle`): ours the frame and order of the `Block` `alloc` returned, which is
/// what a caller frees; the peer a `(frame, count)` pair, as its `dealloc` takes. So neither
/// pays for converting to and checking a common representation on every free. The impls are
/// `inline(always)` for both allocators so the trait is no cost of its own: the loop calls
/// each allocator as a direct caller would (without it, rustc kept our wrappers out of line in
/// some groups and the calls alone added ~4 ns to an order-0 pair).
trait Frames {
    type Handle: Copy;
    fn alloc(&mut self, order: u32) -> Option<Self::Handle>;
    fn free(&mut self, block: Self::Handle);
    /// The first frame of a block.
    fn frame(block: Self::Handle) -> u64;
    /// `block` with its frame hidden from the optimiser (its order stays visible, as it is
    /// to a caller that frees what it allocated at a constant order).
    fn opaque(block: Self::Handle) -> Self::Handle;
}

impl<const M: usize> Frames for Ours<M> {
    type Handle = (Pfn, PageOrder);

    #[inline(always)]
    fn alloc(&mut self, o: u32) -> Option<Self::Handle> {
        Buddy::alloc(self, order(o)).ok().map(|b| (b.pfn, b.order))
    }

    #[inline(always)]
    fn free(&mut self, (pfn, order): Self::Handle) {
        Buddy::free(self, pfn, order).unwrap();
    }

    fn frame((pfn, _): Self::Handle) -> u64 {
        pfn.get()
    }

    fn opaque((pfn, order): Self::Handle) -> Self::Handle {
        (black_box(pfn), order)
    }
}

impl Frames for Peer {
    type Handle = (usize, usize);

    #[inline(always)]
    fn alloc(&mut self, o: u32) -> Option<Self::Handle> {
        let count = 1 << o;
        FrameAllocator::alloc(self, count).map(|f| (f, count))
    }

    #[inline(always)]
    fn free(&mut self, (frame, count): Self::Handle) {
        self.dealloc(frame, count);
    }

    fn frame((frame, _): Self::Handle) -> u64 {
        frame as u64
    }

    fn opaque((frame, count): Self::Handle) -> Self::Handle {
        (black_box(frame), count)
    }
}

/// Warms the arena the way a long-running guest's memory is warm: every page handed out in
/// random order-0..=3 blocks, then a random half of them freed again. The free lists then hold
/// small blocks scattered over the whole gigabyte, next to live ones.
fn warm<A: Frames>(a: &mut A) -> Vec<A::Handle> {
    let mut rng = Rng::new(7);
    let mut held = Vec::new();
    loop {
        let o = (rng.next_u64() % 4) as u32;
        match a.alloc(o) {
            Some(f) => held.push(f),
            None if o == 0 => break,
            None => {}
        }
    }
    for i in (1..held.len()).rev() {
        held.swap(i, rng.next_u64() as usize % (i + 1));
    }
    for f in held.split_off(held.len() / 2) {
        a.free(f);
    }
    held
}

type Group<'a> = criterion::BenchmarkGroup<'a, criterion::measurement::WallTime>;

/// Measures one order-0 alloc + free on `a`.
fn pair<A: Frames>(g: &mut Group<'_>, name: &str, a: &mut A) {
    g.bench_function(BenchmarkId::from_parameter(name), |b| {
        b.iter(|| {
            let f = a.alloc(0).unwrap();
            a.free(A::opaque(f));
        })
    });
}

/// The order-0 fast path: one alloc + free in a warm arena, where an order-0 block is at the
/// head of its list and freeing it merges nothing (its buddy is in use).
fn order0_pair(c: &mut Criterion) {
    let mut g = c.benchmark_group("order0_pair");
    g.throughput(Throughput::Elements(1));
    fn run<A: Frames>(g: &mut Group<'_>, name: &str, mut a: A) {
        let _held = warm(&mut a);
        pair(g, name, &mut a);
    }
    run(&mut g, "hvmem", ours::<MAX_ORDER>(GIB));
    run(&mut g, "buddy_system_allocator", peer(GIB));
    g.finish();
}

/// The worst case for any buddy allocator: an order-0 alloc + free in a fully merged arena,
/// so every alloc splits a 4 MiB block down (10 levels) and every free merges it back.
fn order0_pair_pristine(c: &mut Criterion) {
    let mut g = c.benchmark_group("order0_pair_pristine");
    g.throughput(Throughput::Elements(1));
    pair(&mut g, "hvmem", &mut ours::<MAX_ORDER>(GIB));
    pair(&mut g, "buddy_system_allocator", &mut peer(GIB));
    // Like for like with the peer, whose blocks merge up to the whole gigabyte (order 18).
    pair(&mut g, "hvmem_max_order_18", &mut ours::<18>(GIB));
    g.finish();
}

/// Fills `a` with blocks of random orders until ~70 % of the gigabyte is held; returns the
/// held blocks and the random sequence, ready for `churn_step`.
fn churn_setup<A: Frames>(a: &mut A) -> (Rng, Vec<A::Handle>) {
    let mut rng = Rng::new(0x5eed);
    let mut held = Vec::new();
    let mut frames = 0u64;
    while frames < GIB * 7 / 10 {
        let o = (rng.next_u64() % 10) as u32;
        if let Some(f) = a.alloc(o) {
            held.push(f);
            frames += 1 << o;
        }
    }
    (rng, held)
}

/// One `mixed_churn` iteration: free a random held block, allocate a random order.
#[inline(always)]
fn churn_step<A: Frames>(a: &mut A, rng: &mut Rng, held: &mut Vec<A::Handle>) {
    let r = rng.next_u64();
    // Lemire's multiply-shift instead of `%`: a 64-bit division in the harness
    // costs more than our free + alloc and would hide both allocators' speed.
    let i = (((r >> 32) * held.len() as u64) >> 32) as usize;
    a.free(held[i]);
    // The same for the order, from the low half of `r`.
    let o = (((r & 0xffff_ffff) * 10) >> 32) as u32;
    // The new block takes the freed one's place, so the vector's length changes only
    // when an allocation fails.
    match a.alloc(o) {
        Some(f) => held[i] = f,
        None => {
            held.swap_remove(i);
        }
    }
}

/// Steady-state churn: `held` blocks of random orders make up ~70 % of the arena; each
/// iteration frees a random one and allocates a new random order.
fn mixed_churn(c: &mut Criterion) {
    let mut g = c.benchmark_group("mixed_churn");
    g.throughput(Throughput::Elements(1));
    fn run<A: Frames>(
        g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
        name: &str,
        mut a: A,
    ) {
        let (mut rng, mut held) = churn_setup(&mut a);
        g.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| churn_step(&mut a, &mut rng, &mut held))
        });
    }
    run(&mut g, "hvmem", ours::<MAX_ORDER>(GIB));
    run(&mut g, "buddy_system_allocator", peer(GIB));
    g.finish();
}

fn fragmented(c: &mut Criterion) {
    let mut g = c.benchmark_group("fragmented");
    g.sample_size(20);
    // One iteration allocates and frees every order-9 block of the unfragmented gigabyte.
    g.throughput(Throughput::Elements(2 * 512));
    fn run<A: Frames>(
        g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
        name: &str,
        mut a: A,
    ) {
        fragment(&mut a);
        let mut blocks = Vec::with_capacity(512);
        g.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| fragmented_round(&mut a, &mut blocks))
        });
    }
    run(&mut g, "hvmem", ours::<MAX_ORDER>(2 * GIB));
    run(&mut g, "buddy_system_allocator", peer(2 * GIB));
    g.finish();
}

/// Allocates the first gigabyte as 4 KiB pages and frees every other one again.
fn fragment<A: Frames>(a: &mut A) {
    let pages: Vec<A::Handle> = (0..GIB).map(|_| a.alloc(0).unwrap()).collect();
    for &p in pages.iter().filter(|&&p| A::frame(p) % 2 == 0) {
        a.free(p);
    }
}

/// One `fragmented` iteration: every order-9 block until none is left (512), then all freed.
#[inline(always)]
fn fragmented_round<A: Frames>(a: &mut A, blocks: &mut Vec<A::Handle>) {
    while let Some(f) = a.alloc(9) {
        blocks.push(f);
    }
    assert_eq!(blocks.len(), 512);
    for f in blocks.drain(..) {
        a.free(f);
    }
}

/// `n` iterations of `fragmented` outside criterion, for callgrind.
#[inline(never)]
fn measured_fragmented<A: Frames>(a: &mut A, n: u64) {
    let mut blocks = Vec::with_capacity(512);
    for _ in 0..n {
        fragmented_round(a, &mut blocks);
    }
}

/// `n` iterations of `mixed_churn` outside criterion, for callgrind.
#[inline(never)]
fn measured_churn<A: Frames>(a: &mut A, n: u64) {
    let (mut rng, mut held) = churn_setup(a);
    for _ in 0..n {
        churn_step(a, &mut rng, &mut held);
    }
    black_box(held.len());
}

/// No allocator: `alloc` hands back a made-up block at once and `free` only reads it. Run
/// through `churn_step`, it times the harness alone (the random draws and the `held`
/// vector), which both allocators' figures include.
struct Null;

impl Frames for Null {
    type Handle = (u64, u32);

    #[inline(always)]
    fn alloc(&mut self, o: u32) -> Option<Self::Handle> {
        Some((u64::from(o) << 12, o))
    }

    #[inline(always)]
    fn free(&mut self, block: Self::Handle) {
        black_box(block);
    }

    fn frame((frame, _): Self::Handle) -> u64 {
        frame
    }

    fn opaque(block: Self::Handle) -> Self::Handle {
        black_box(block)
    }
}

/// `mixed_churn` for both allocators in alternating rounds of `n` iterations, in one
/// process: on a shared machine the fastest round of each is the one least disturbed, so
/// the ratio of the two minima is steadier than two criterion estimates taken seconds apart.
/// Each round also times the harness alone ([`Null`], as many blocks held as ours holds).
fn churn_interleaved(rounds: usize, n: u64) {
    use std::time::Instant;
    let mut a = ours::<MAX_ORDER>(GIB);
    let mut p = peer(GIB);
    let (mut ra, mut ha) = churn_setup(&mut a);
    let (mut rp, mut hp) = churn_setup(&mut p);
    let mut hn: Vec<(u64, u32)> = (0..ha.len() as u64).map(|i| (i << 12, 0)).collect();
    let (mut rn, mut z) = (Rng::new(0x5eed), Null);
    let (mut ta, mut tp, mut tn) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let t = Instant::now();
        for _ in 0..n {
            churn_step(&mut z, &mut rn, &mut hn);
        }
        tn.push(t.elapsed().as_secs_f64() * 1e9 / n as f64);
        let t = Instant::now();
        for _ in 0..n {
            churn_step(&mut a, &mut ra, &mut ha);
        }
        ta.push(t.elapsed().as_secs_f64() * 1e9 / n as f64);
        let t = Instant::now();
        for _ in 0..n {
            churn_step(&mut p, &mut rp, &mut hp);
        }
        tp.push(t.elapsed().as_secs_f64() * 1e9 / n as f64);
    }
    for t in [&mut ta, &mut tp, &mut tn] {
        t.sort_by(f64::total_cmp);
    }
    let (ma, mp) = (ta[rounds / 2], tp[rounds / 2]);
    println!(
        "mixed_churn interleaved, {rounds} rounds of {n}: hvmem min {:.2} ns median {ma:.2} ns; \
         buddy_system_allocator min {:.2} ns median {mp:.2} ns; ratio of minima {:.2}x, \
         of medians {:.2}x; the harness alone min {:.2} ns median {:.2} ns",
        ta[0],
        tp[0],
        tp[0] / ta[0],
        mp / ma,
        tn[0],
        tn[rounds / 2]
    );
}

/// Runs one workload a fixed number of times for callgrind and prints the iterations.
fn callgrind(workload: &str) {
    const N: u64 = 1_000_000;
    match workload {
        "churn_hvmem" => measured_churn(&mut ours::<MAX_ORDER>(GIB), N),
        "churn_peer" => measured_churn(&mut peer(GIB), N),
        "churn_interleaved" => return churn_interleaved(40, 200_000),
        "fragmented_hvmem" | "fragmented_peer" => {
            const ROUNDS: u64 = 1_000;
            if workload == "fragmented_hvmem" {
                let mut a = ours::<MAX_ORDER>(2 * GIB);
                fragment(&mut a);
                measured_fragmented(&mut a, ROUNDS);
            } else {
                let mut p = peer(2 * GIB);
                fragment(&mut p);
                measured_fragmented(&mut p, ROUNDS);
            }
            return println!("{workload}: {ROUNDS} iterations of 1,024 operations");
        }
        other => return eprintln!("unknown workload {other}"),
    }
    println!("{workload}: {N} iterations");
}

criterion_group!(
    benches,
    order0_pair,
    order0_pair_pristine,
    mixed_churn,
    fragmented
);

fn main() {
    if let Ok(workload) = std::env::var("HVMEM_CALLGRIND") {
        callgrind(&workload);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
