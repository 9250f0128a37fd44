//! Eager page splitting (`Mmu::eager_split`, `Mmu::eager_split_by_walk`) and what it buys
//! the vCPUs (issue 9, item 6; Matlack, "[00/23] Extend Eager Page Splitting to the shadow
//! MMU", 2022-02-03).
//!
//! Run: `cargo bench --bench split`. One slot from gfn 0 in an EPT MMU with one address
//! space; the host maps gfn n at host frame `HOST_PFN + n` with 2 MiB or 1 GiB pages; the
//! TLB flush is a counter. Only the operation is timed (`iter_custom`); the state is put
//! back untimed after it.
//! - `eager_split`: `eager_split` of a populated slot of 1, 4 and 8 GiB down to 4 KiB, the
//!   slot mapped by 2 MiB leaves (`2m`) or 1 GiB leaves (`1g`: split 1 GiB → 2 MiB → 4 KiB);
//!   elements: 4 KiB SPTEs produced, each with its rmap entry. Restored by zapping the slot
//!   and faulting it in again at the host's page size. `baseline` in the same group writes
//!   the same bytes with a plain loop over preallocated memory: per 2 MiB, 512 leaf entries
//!   into a fresh table, 512 rmap heads (one word each: a single-entry rmap needs no
//!   descriptor) and the child's parent word; for `1g` also the 512 entries of the 2 MiB
//!   level table, its heads and parent word. Both are touched once before timing (the MMU's
//!   arena and rmap arrays are warm from the first, untimed, populate-and-split too). At
//!   8 GiB the split writes 32 MiB, which the default `MmuConfig::stream_split_bytes`
//!   streams (non-temporal stores); `rmap_cached` is the same split with ordinary stores.
//!   `baseline_atomic`: the same, with the table entries written one relaxed atomic store
//!   each, as the splitter must (the compiler writes `baseline`'s two at a time).
//!   `HVMEM_SPLIT_INTERLEAVED=<rounds> target/release/deps/split-<hash>` (outside
//!   criterion) alternates one baseline, one atomic baseline and one split per round for
//!   every slot, each from cold caches, and prints the minimum and median ns per SPTE of
//!   each and their ratios: steadier on a shared machine, where criterion's groups run
//!   seconds apart, and the baseline no longer finds its memory in L3. With
//!   `HVMEM_SPLIT_WARM=1` as well, warm instead, as criterion runs them: each baseline
//!   after an untimed run of itself, the split right after the untimed re-fault.
//!   `HVMEM_SPLIT_DUMP=1` also prints every round's ns per SPTE of the split and the
//!   baseline, in round order, to stderr. `HVMEM_SPLIT_STREAM_BYTES=<n>` sets the splits'
//!   `MmuConfig::stream_split_bytes` (0: every split streams; 18446744073709551615: none).
//! - `iteration2_scan`: an 8 GiB slot already split to 4 KiB, nothing left: the rmap-driven
//!   `eager_split` (one empty head per 1 GiB and per 2 MiB frame) against the walk-driven
//!   `eager_split_by_walk` (every table under the slot). Elements: 4 KiB pages of the slot.
//! - `dirty_memory_iter1`: Matlack's setup at 2 vCPUs: 1 GiB per vCPU backed by 1 GiB
//!   pages, so a 2 GiB slot mapped by two 1 GiB leaves. `enable/eager` and `enable/lazy`:
//!   `enable_dirty_log` with eager splitting on (write-protect, then split 1 GiB → 2 MiB →
//!   4 KiB) and off (write-protect only). Then the first dirtying pass: with eager splitting
//!   (`eager`: 4 KiB leaves, write-protected; a write takes the fast path) and without
//!   (`lazy`: 1 GiB leaves, write-protected; a write drops the huge leaf and maps one 4 KiB
//!   page, every other page of it faults again). Two threads, each owning 1 GiB, touch every
//!   page of it once, in order: 100% writes, or 20% (every fifth page written, the others
//!   read). An access walks the shadow tables lock-free (`translate_lockless`, as hardware
//!   would) and faults only when the leaf is missing or does not allow it. Elements: pages
//!   touched. Each iteration checks that the log holds exactly the pages written.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::criterion_group;
use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput, black_box};
use hvmem::rmap::SplitCaches;
use hvmem::spt::Ept;
use hvmem::spt::mmu::SlotId;
use hvmem::spt::mmu::{FaultCaches, LogMode, Mmu, MmuConfig};
use hvmem::testing::mmu::{
    LINEAR_HOST_PFN as HOST_PFN, LinearHost as Host, POOL_TABLES_AT as TABLES_AT, TablePool as Pool,
};
use hvmem::testing::spt::CountingFlush as Tlb;
use hvmem::{Gfn, Gpa, Level};

const GIB_PAGES: u64 = 1 << 18;
const SLOT: SlotId = SlotId(0);

fn gpa(gfn: u64) -> Gpa {
    Gpa::new(gfn << 12).unwrap()
}

/// Write faults on the first page of every `level` page of `[0, pages)`.
fn populate(mmu: &Mmu<'_, Ept>, pages: u64, level: Level) {
    let host = Host(level);
    let mut caches = FaultCaches::new();
    let mut tlb = Tlb::default();
    for g in (0..pages).step_by(1 << (level.shift() - 12)) {
        mmu.page_fault(&mut caches, &host, gpa(g), true, &mut tlb)
            .unwrap();
    }
    caches.release(mmu).unwrap();
}

/// Zaps the slot and maps it again with `level` leaves.
fn repopulate(mmu: &Mmu<'_, Ept>, pages: u64, level: Level) {
    let mut tlb = Tlb::default();
    mmu.zap_gfn_range(Gfn::new(0).unwrap(), Gfn::new(pages).unwrap(), &mut tlb);
    populate(mmu, pages, level);
}

/// Groups that run a heavy operation a few times: flat sampling, 10 samples.
fn heavy(g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>, ms: u64) {
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_millis(ms));
}

/// What the splitter writes, with nothing else: per 2 MiB a fresh table of 512 leaves, 512
/// rmap heads and one parent word; per 1 GiB (for `1g`) a fresh table of 512 2 MiB
/// entries, their heads and its parent word. Values are shaped like the real ones (a
/// frame address with flag bits; a tagged entry reference).
struct Baseline {
    /// Level-1 (and, for `1g`, level-2) tables.
    tables: Vec<[u64; 512]>,
    /// Rmap heads, one per 4 KiB page (and per 2 MiB page for `1g`).
    heads: Vec<u64>,
    /// One parent word per table.
    parents: Vec<u64>,
    /// The tables again, as atomics, for `run_atomic`.
    atomic: Vec<AtomicU64>,
}

impl Baseline {
    fn new(gib: u64, level: Level) -> Self {
        let l1 = (gib * 512) as usize;
        let l2 = if level == Level::L3 { gib as usize } else { 0 };
        let mut b = Self {
            tables: vec![[0u64; 512]; l1 + l2],
            heads: vec![0u64; l1 * 512 + l2 * 512],
            parents: vec![0u64; l1 + l2],
            atomic: (0..(l1 + l2) * 512).map(|_| AtomicU64::new(0)).collect(),
        };
        b.run(); // touch every page once
        b.run_atomic();
        b
    }

    /// One pass; returns a checksum so nothing is optimised away.
    fn run(&mut self) -> u64 {
        let base = TABLES_AT;
        for (t, ((table, heads), parent)) in self
            .tables
            .iter_mut()
            .zip(self.heads.chunks_exact_mut(512))
            .zip(self.parents.iter_mut())
            .enumerate()
        {
            let at = base + (t as u64) * 4096;
            let frame = (HOST_PFN + (t as u64) * 512) << 12;
            for (i, (e, h)) in table.iter_mut().zip(heads.iter_mut()).enumerate() {
                *e = frame | ((i as u64) << 12) | 0x607;
                *h = 1 | (at + (i as u64) * 8);
            }
            *parent = 1 | (at + 8 * 512);
        }
        black_box(self.tables.len() as u64 + self.heads[self.heads.len() - 1])
    }

    /// `run` with the table entries written as the splitter must write them, one relaxed
    /// atomic store each (the tables are shared with lock-free walkers), into `atomic`: the
    /// same bytes without the compiler's 16-byte stores.
    fn run_atomic(&mut self) -> u64 {
        let base = TABLES_AT;
        for (t, ((table, heads), parent)) in self
            .atomic
            .chunks_exact(512)
            .zip(self.heads.chunks_exact_mut(512))
            .zip(self.parents.iter_mut())
            .enumerate()
        {
            let at = base + (t as u64) * 4096;
            let frame = (HOST_PFN + (t as u64) * 512) << 12;
            for (i, e) in table.iter().enumerate() {
                e.store(frame | ((i as u64) << 12) | 0x607, Ordering::Relaxed);
            }
            for (i, h) in heads.iter_mut().enumerate() {
                *h = 1 | (at + (i as u64) * 8);
            }
            *parent = 1 | (at + 8 * 512);
        }
        black_box(self.atomic.len() as u64 + self.heads[self.heads.len() - 1])
    }
}

/// One pass of a baseline.
type BaselineRun = fn(&mut Baseline) -> u64;

/// Maps the slot with `level` leaves and splits it to 4 KiB once, untimed: the arena, the
/// rmap arrays and the caches warm, as before every timed split.
/// An MMU over `pool` that streams splits from `stream_split_bytes` up, with a slot of
/// `pages` populated at `level` and split once, untimed (its arena, rmap arrays and
/// caches touched), and the splitter's caches.
fn split_once(
    pool: &mut Pool,
    pages: u64,
    level: Level,
    stream_split_bytes: u64,
) -> (Mmu<'_, Ept>, SplitCaches) {
    let config = MmuConfig {
        stream_split_bytes,
        ..MmuConfig::default()
    };
    let mmu = pool.mmu(pages, config).unwrap();
    let mut caches = SplitCaches::new();
    populate_and_split(&mmu, &mut caches, pages, level);
    (mmu, caches)
}

fn populate_and_split(mmu: &Mmu<'_, Ept>, caches: &mut SplitCaches, pages: u64, level: Level) {
    populate(mmu, pages, level);
    mmu.eager_split(caches, SLOT, None, Level::L1, &mut Tlb::default())
        .unwrap();
}

fn eager_split(c: &mut Criterion) {
    let mut g = c.benchmark_group("eager_split");
    heavy(&mut g, 300);
    for (name, level) in [("2m", Level::L2), ("1g", Level::L3)] {
        for gib in [1u64, 4, 8] {
            let pages = gib * GIB_PAGES;
            let sptes = pages;
            g.throughput(Throughput::Elements(sptes));
            let id = format!("{name}/{gib}g");
            let mut base = Baseline::new(gib, level);
            let runs: [(&str, BaselineRun); 2] = [
                ("baseline", Baseline::run),
                ("baseline_atomic", Baseline::run_atomic),
            ];
            for (what, run) in runs {
                g.bench_function(BenchmarkId::new(what, &id), |b| {
                    b.iter_custom(|iters| {
                        let t = Instant::now();
                        for _ in 0..iters {
                            run(&mut base);
                        }
                        t.elapsed()
                    });
                });
            }
            drop(base);
            // At 8 GiB the default configuration streams (`stream_split_bytes`, 32 MiB):
            // `rmap_cached` is the same split with ordinary stores.
            let variants: &[(&str, u64)] = if gib == 8 {
                &[("rmap", 32 << 20), ("rmap_cached", u64::MAX)]
            } else {
                &[("rmap", 32 << 20)]
            };
            for &(what, stream_split_bytes) in variants {
                let mut pool = Pool::new(gib);
                let (mmu, mut caches) = split_once(&mut pool, pages, level, stream_split_bytes);
                let mut tlb = Tlb::default();
                g.bench_function(BenchmarkId::new(what, &id), |b| {
                    b.iter_custom(|iters| {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            repopulate(&mmu, pages, level);
                            let t = Instant::now();
                            let s = mmu
                                .eager_split(&mut caches, SLOT, None, Level::L1, &mut tlb)
                                .unwrap();
                            total += t.elapsed();
                            let huge = if level == Level::L3 {
                                gib + gib * 512
                            } else {
                                gib * 512
                            };
                            assert_eq!(s.split, huge);
                        }
                        total
                    });
                });
                let counts = mmu.check().unwrap();
                assert_eq!(counts.leaves, sptes);
                caches.release(&mmu).unwrap();
            }
        }
    }
    black_box(());
    g.finish();
}

fn iteration2_scan(c: &mut Criterion) {
    let mut g = c.benchmark_group("iteration2_scan");
    heavy(&mut g, 300);
    let gib = 8;
    let pages = gib * GIB_PAGES;
    let mut pool = Pool::new(gib);
    let mmu = pool.mmu(pages, MmuConfig::default()).unwrap();
    let mut caches = SplitCaches::new();
    let mut tlb = Tlb::default();
    populate(&mmu, pages, Level::L2);
    mmu.eager_split(&mut caches, SLOT, None, Level::L1, &mut tlb)
        .unwrap();
    g.throughput(Throughput::Elements(pages));
    g.bench_function(BenchmarkId::new("rmap", "8g_4k"), |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                let s = mmu
                    .eager_split(&mut caches, SLOT, None, Level::L1, &mut tlb)
                    .unwrap();
                assert_eq!(s.split, 0);
            }
            t.elapsed()
        });
    });
    g.bench_function(BenchmarkId::new("walk", "8g_4k"), |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                let s = mmu
                    .eager_split_by_walk(&mut caches, SLOT, None, Level::L1, &mut tlb)
                    .unwrap();
                assert_eq!(s.split, 0);
            }
            t.elapsed()
        });
    });
    caches.release(&mmu).unwrap();
    black_box((tlb.ranges, tlb.all));
    g.finish();
}

/// One vCPU's pass over `[lo, hi)`: every `write_every`-th page written, the rest read.
/// Returns the faults taken.
fn dirty_pass(mmu: &Mmu<'_, Ept>, lo: u64, hi: u64, write_every: u64) -> u64 {
    let host = Host(Level::L3);
    let mut caches = FaultCaches::new();
    let mut tlb = Tlb::default();
    let mut faults = 0;
    for g in lo..hi {
        let write = g % write_every == 0;
        let ok = match mmu.translate_lockless(gpa(g)) {
            Some(m) => m.writable || !write,
            None => false,
        };
        if !ok {
            mmu.page_fault(&mut caches, &host, gpa(g), write, &mut tlb)
                .unwrap();
            faults += 1;
        }
    }
    caches.release(mmu).unwrap();
    faults
}

fn dirty_memory_iter1(c: &mut Criterion) {
    let mut g = c.benchmark_group("dirty_memory_iter1");
    heavy(&mut g, 1000);
    const VCPUS: u64 = 2;
    let per = GIB_PAGES;
    let pages = VCPUS * per;
    g.throughput(Throughput::Elements(pages));
    for (mode, eager) in [("eager", true), ("lazy", false)] {
        let mut pool = Pool::new(VCPUS);
        let mmu = pool
            .mmu(
                pages,
                MmuConfig {
                    eager_split: eager,
                    ..MmuConfig::default()
                },
            )
            .unwrap();
        let host = Host(Level::L3);
        populate(&mmu, pages, Level::L3);
        g.bench_function(BenchmarkId::new("enable", mode), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut tlb = Tlb::default();
                for _ in 0..iters {
                    let t = Instant::now();
                    mmu.enable_dirty_log(SLOT, LogMode::PAGES, &mut tlb)
                        .unwrap();
                    total += t.elapsed();
                    let leaf = mmu.translate(gpa(0)).unwrap().level;
                    assert_eq!(leaf, if eager { Level::L1 } else { Level::L3 });
                    mmu.disable_dirty_log(SLOT, &host, &mut tlb).unwrap();
                    repopulate(&mmu, pages, Level::L3);
                }
                total
            });
        });
        for (writes, every) in [("100", 1u64), ("20", 5)] {
            g.bench_function(BenchmarkId::new(mode, format!("{writes}pct_writes")), |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    let mut tlb = Tlb::default();
                    for _ in 0..iters {
                        mmu.enable_dirty_log(SLOT, LogMode::PAGES, &mut tlb)
                            .unwrap();
                        let leaf = mmu.translate(gpa(0)).unwrap().level;
                        assert_eq!(leaf, if eager { Level::L1 } else { Level::L3 });
                        let t = Instant::now();
                        let faults: u64 = std::thread::scope(|s| {
                            let hs: Vec<_> = (0..VCPUS)
                                .map(|v| {
                                    let m = &mmu;
                                    s.spawn(move || dirty_pass(m, v * per, (v + 1) * per, every))
                                })
                                .collect();
                            hs.into_iter().map(|h| h.join().unwrap()).sum()
                        });
                        total += t.elapsed();
                        black_box(faults);
                        let mut log = vec![0u64; mmu.dirty_log_words(SLOT).unwrap()];
                        mmu.get_dirty_log(SLOT, &mut log).unwrap();
                        let set: u64 = log.iter().map(|w| u64::from(w.count_ones())).sum();
                        assert_eq!(
                            set,
                            pages.div_ceil(every),
                            "a write is missing from the log"
                        );
                        mmu.disable_dirty_log(SLOT, &host, &mut tlb).unwrap();
                        repopulate(&mmu, pages, Level::L3);
                    }
                    total
                });
            });
        }
    }
    g.finish();
}

/// `eager_split` against `baseline` and `baseline_atomic`, alternating one of each per
/// round in one process, so the machine's drift hits all three alike: the minimum and the
/// median per SPTE of each over `rounds`, and the ratios to `baseline`.
///
/// Each timed operation starts after writing a 64 MiB scratch buffer, twice the EPYC's
/// 32 MiB L3 (on the Xeon, whose write rate falls between 32 and 64 MiB, most of what its
/// share of the L3 held), so all three start with cold caches, as a split does when dirty
/// logging is enabled on a running guest (in criterion's group the baseline rewrites the
/// same memory back to back and, up to 4 GiB, finds it in L3; the split cannot, as the
/// state is rebuilt between iterations).
fn split_interleaved(rounds: usize, warm: bool, stream_split_bytes: u64) {
    let mut scratch = vec![0u64; 8 << 20];
    // Cold: every timed operation follows a 64 MiB scratch write. Warm: as criterion runs
    // them, each baseline right after an untimed run of itself (its memory in L3) and the
    // split right after the untimed re-fault.
    let mut before = |again: &mut dyn FnMut()| {
        if warm {
            again();
        } else {
            evict(&mut scratch);
        }
    };
    println!(
        "| slot | rmap min / median | baseline min / median | baseline_atomic min / median | ratio of minima | ratio of medians |"
    );
    println!("|---|---|---|---|---|---|");
    for (name, level) in [("2m", Level::L2), ("1g", Level::L3)] {
        for gib in [1u64, 4, 8] {
            let pages = gib * GIB_PAGES;
            let mut base = Baseline::new(gib, level);
            let mut pool = Pool::new(gib);
            let (mmu, mut caches) = split_once(&mut pool, pages, level, stream_split_bytes);
            let mut tlb = Tlb::default();
            let (mut tr, mut tb, mut ta) = (Vec::new(), Vec::new(), Vec::new());
            let per = |d: Duration| d.as_secs_f64() * 1e9 / pages as f64;
            for _ in 0..rounds {
                before(&mut || {
                    black_box(base.run());
                });
                let t = Instant::now();
                base.run();
                tb.push(per(t.elapsed()));
                before(&mut || {
                    black_box(base.run_atomic());
                });
                let t = Instant::now();
                base.run_atomic();
                ta.push(per(t.elapsed()));
                repopulate(&mmu, pages, level);
                before(&mut || {});
                let t = Instant::now();
                mmu.eager_split(&mut caches, SLOT, None, Level::L1, &mut tlb)
                    .unwrap();
                tr.push(per(t.elapsed()));
            }
            assert_eq!(mmu.check().unwrap().leaves, pages);
            caches.release(&mmu).unwrap();
            if std::env::var_os("HVMEM_SPLIT_DUMP").is_some() {
                // In round order: the host's slow phases show as runs of slow rounds.
                eprintln!("{name}/{gib}g rmap {tr:.2?}");
                eprintln!("{name}/{gib}g base {tb:.2?}");
            }
            for t in [&mut tr, &mut tb, &mut ta] {
                t.sort_by(f64::total_cmp);
            }
            let m = rounds / 2;
            println!(
                "| `{name}/{gib}g` | {:.2} / {:.2} ns | {:.2} / {:.2} ns | {:.2} / {:.2} ns | {:.2}x | {:.2}x |",
                tr[0],
                tr[m],
                tb[0],
                tb[m],
                ta[0],
                ta[m],
                tr[0] / tb[0],
                tr[m] / tb[m]
            );
        }
    }
}

/// Writes all of `scratch` (64 MiB), evicting what the caches held.
fn evict(scratch: &mut [u64]) {
    for (i, w) in scratch.iter_mut().enumerate() {
        *w = i as u64;
    }
    black_box(&scratch[scratch.len() - 1]);
}

criterion_group!(benches, eager_split, iteration2_scan, dirty_memory_iter1);

fn main() {
    if let Ok(rounds) = std::env::var("HVMEM_SPLIT_INTERLEAVED") {
        let warm = std::env::var_os("HVMEM_SPLIT_WARM").is_some();
        let stream = std::env::var("HVMEM_SPLIT_STREAM_BYTES")
            .ok()
            .and_then(|b| b.parse().ok())
            .unwrap_or(MmuConfig::default().stream_split_bytes);
        split_interleaved(rounds.parse().unwrap_or(30).max(1), warm, stream);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
