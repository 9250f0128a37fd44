//! The shadow MMU (`hvmem::spt::mmu`, EPT format): the fault path, dirty logging, and the
//! rmap walk against a table walk for the same write-protect.
//!
//! Run: `cargo bench --bench mmu`. The guest's memory is one slot from gfn 0; the host maps
//! gfn n at host frame `HOST_PFN + n`, with 4 KiB pages (`4k`) or 2 MiB pages (`2m`); the
//! TLB flush is a counter. Where a setup is expensive (populating 8 GiB at 4 KiB is two
//! million faults) the groups use `iter_custom`: only the operation is timed, the state is
//! put back untimed after it (dirty logging off again and a write to every page, which the
//! fast path fixes, so every leaf is writable again).
//! - `fault_in_1g`: write faults on every page of a 1 GiB slot in a fresh MMU, at 4 KiB
//!   (262,144 faults, each down the slow path) and at 2 MiB (512 faults). Elements: faults.
//! - `enable_dirty_log`: `enable_dirty_log` (write-protect through the rmaps) on a slot of
//!   1, 4 and 8 GiB populated at 4 KiB and at 2 MiB. Elements: leaves write-protected.
//! - `get_and_clear_dirty_log`: 1 GiB populated at 4 KiB, logging on; writes dirty every
//!   page, or 1 page in 64, then `get_and_clear_dirty_log` takes the bitmap and
//!   write-protects the dirty pages again. Elements: dirty pages.
//! - `write_protect_rmap_vs_walk`: the same write-protect of a populated slot through the
//!   rmaps (`rmap`: `enable_dirty_log`, what KVM's shadow MMU does) and by a walk of the
//!   tables over the slot (`walk`: `write_protect_by_walk`, what KVM's TDP MMU does), on
//!   1 GiB at 4 KiB, 1 GiB at 2 MiB, and a sparse 8 GiB slot with one 2 MiB region in every
//!   64 MiB populated at 4 KiB. Elements: leaves write-protected.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput, black_box};
use criterion::{criterion_group, criterion_main};
use hvmem::spt::Ept;
use hvmem::spt::mmu::SlotId;
use hvmem::spt::mmu::{FaultCaches, LogMode, Mmu, MmuConfig};
use hvmem::testing::mmu::{LinearHost as Host, TablePool as Pool};
use hvmem::testing::spt::CountingFlush as Tlb;
use hvmem::{Gpa, Level};

const GIB_PAGES: u64 = 1 << 18;
const SLOT: SlotId = SlotId(0);

fn gpa(gfn: u64) -> Gpa {
    Gpa::new(gfn << 12).unwrap()
}

/// Write faults at `gfns`; every one must map or be fixed.
fn write_all(mmu: &Mmu<'_, Ept>, host: &Host, gfns: impl Iterator<Item = u64>) {
    let mut caches = FaultCaches::new();
    let mut tlb = Tlb::default();
    for g in gfns {
        mmu.page_fault(&mut caches, host, gpa(g), true, &mut tlb)
            .unwrap();
    }
}

/// The first gfn of every page of `level` in `[0, pages)`.
fn pages_of(pages: u64, level: Level) -> impl Iterator<Item = u64> {
    (0..pages).step_by(1 << (level.shift() - 12))
}

/// A populated slot: every page of `pages` (sparse: one 2 MiB region in 64 MiB) mapped
/// writable at the host's page size.
struct Populated {
    pages: u64,
    level: Level,
    sparse: bool,
}

impl Populated {
    fn gfns(&self) -> Box<dyn Iterator<Item = u64>> {
        let all = pages_of(self.pages, self.level);
        if self.sparse {
            Box::new(all.filter(|g| g % (64 * 256) < 512))
        } else {
            Box::new(all)
        }
    }

    fn leaves(&self) -> u64 {
        self.gfns().count() as u64
    }

    fn build<'p>(&self, pool: &'p mut Pool) -> Mmu<'p, Ept> {
        let mmu = pool.mmu(self.pages, MmuConfig::default()).unwrap();
        write_all(&mmu, &Host(self.level), self.gfns());
        mmu
    }

    /// Every leaf writable again after a write-protect (logging off first if on).
    fn restore(&self, mmu: &Mmu<'_, Ept>, tlb: &mut Tlb) {
        let host = Host(self.level);
        if mmu.dirty_log_words(SLOT).is_ok() {
            mmu.disable_dirty_log(SLOT, &host, tlb).unwrap();
        }
        write_all(mmu, &host, self.gfns());
    }
}

/// Times `op` on `mmu` `iters` times, restoring the slot untimed after each; checks once
/// that `op` write-protected `expect` leaves.
fn time_protect(
    iters: u64,
    mmu: &Mmu<'_, Ept>,
    p: &Populated,
    expect: u64,
    op: impl Fn(&Mmu<'_, Ept>, &mut Tlb),
) -> Duration {
    let mut tlb = Tlb::default();
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let before = mmu.stats().write_protected;
        let t = Instant::now();
        op(mmu, &mut tlb);
        total += t.elapsed();
        assert_eq!(mmu.stats().write_protected - before, expect);
        p.restore(mmu, &mut tlb);
    }
    black_box((tlb.ranges, tlb.all));
    total
}

/// Groups that run a heavy operation a few times: flat sampling, 10 samples, a warm-up of
/// one iteration.
fn heavy(g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>, ms: u64) {
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_millis(ms));
}

fn fault_in_1g(c: &mut Criterion) {
    let mut g = c.benchmark_group("fault_in_1g");
    heavy(&mut g, 500);
    let mut pool = Pool::new(1);
    for (name, level) in [("4k", Level::L1), ("2m", Level::L2)] {
        let gfns: Vec<u64> = pages_of(GIB_PAGES, level).collect();
        g.throughput(Throughput::Elements(gfns.len() as u64));
        g.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let mmu = pool.mmu(GIB_PAGES, MmuConfig::default()).unwrap();
                    let (host, mut tlb, mut caches) =
                        (Host(level), Tlb::default(), FaultCaches::new());
                    let t = Instant::now();
                    for &gfn in &gfns {
                        mmu.page_fault(&mut caches, &host, gpa(gfn), true, &mut tlb)
                            .unwrap();
                    }
                    total += t.elapsed();
                    assert_eq!(mmu.stats().slow_faults, gfns.len() as u64);
                }
                total
            });
        });
    }
    g.finish();
}

fn enable_dirty_log(c: &mut Criterion) {
    let mut g = c.benchmark_group("enable_dirty_log");
    heavy(&mut g, 200);
    for (name, level) in [("4k", Level::L1), ("2m", Level::L2)] {
        for gib in [1u64, 4, 8] {
            let mut pool = Pool::new(gib);
            let p = Populated {
                pages: gib * GIB_PAGES,
                level,
                sparse: false,
            };
            let mmu = p.build(&mut pool);
            let leaves = p.leaves();
            g.throughput(Throughput::Elements(leaves));
            g.bench_function(BenchmarkId::new(name, format!("{gib}g")), |b| {
                b.iter_custom(|iters| {
                    time_protect(iters, &mmu, &p, leaves, |m, tlb| {
                        m.enable_dirty_log(SLOT, LogMode::PAGES, tlb).unwrap();
                    })
                });
            });
        }
    }
    g.finish();
}

fn get_and_clear_dirty_log(c: &mut Criterion) {
    let mut g = c.benchmark_group("get_and_clear_dirty_log");
    heavy(&mut g, 200);
    let mut pool = Pool::new(1);
    let p = Populated {
        pages: GIB_PAGES,
        level: Level::L1,
        sparse: false,
    };
    let mmu = p.build(&mut pool);
    let mut tlb = Tlb::default();
    mmu.enable_dirty_log(SLOT, LogMode::PAGES, &mut tlb)
        .unwrap();
    let host = Host(Level::L1);
    let mut out = vec![0u64; mmu.dirty_log_words(SLOT).unwrap()];
    for (name, every) in [("1g_every_page", 1u64), ("1g_1_in_64", 64)] {
        let dirty = GIB_PAGES / every;
        g.throughput(Throughput::Elements(dirty));
        g.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    write_all(&mmu, &host, (0..GIB_PAGES).step_by(every as usize));
                    let before = mmu.stats().write_protected;
                    let t = Instant::now();
                    mmu.get_and_clear_dirty_log(SLOT, &mut out, &mut tlb)
                        .unwrap();
                    total += t.elapsed();
                    assert_eq!(mmu.stats().write_protected - before, dirty);
                    let set: u64 = out.iter().map(|w| u64::from(w.count_ones())).sum();
                    assert_eq!(set, dirty);
                }
                total
            });
        });
    }
    black_box((tlb.ranges, tlb.all));
    g.finish();
}

fn write_protect_rmap_vs_walk(c: &mut Criterion) {
    let mut g = c.benchmark_group("write_protect_rmap_vs_walk");
    heavy(&mut g, 200);
    let cases = [
        ("1g_4k", 1, Level::L1, false),
        ("1g_2m", 1, Level::L2, false),
        ("8g_sparse_4k", 8, Level::L1, true),
    ];
    for (name, gib, level, sparse) in cases {
        let mut pool = Pool::new(gib);
        let p = Populated {
            pages: gib * GIB_PAGES,
            level,
            sparse,
        };
        let mmu = p.build(&mut pool);
        let leaves = p.leaves();
        g.throughput(Throughput::Elements(leaves));
        g.bench_function(BenchmarkId::new("rmap", name), |b| {
            b.iter_custom(|iters| {
                time_protect(iters, &mmu, &p, leaves, |m, tlb| {
                    m.enable_dirty_log(SLOT, LogMode::PAGES, tlb).unwrap();
                })
            });
        });
        g.bench_function(BenchmarkId::new("walk", name), |b| {
            b.iter_custom(|iters| {
                time_protect(iters, &mmu, &p, leaves, |m, tlb| {
                    assert_eq!(m.write_protect_by_walk(SLOT, tlb).unwrap(), leaves);
                })
            });
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    fault_in_1g,
    enable_dirty_log,
    get_and_clear_dirty_log,
    write_protect_rmap_vs_walk
);
criterion_main!(benches);
