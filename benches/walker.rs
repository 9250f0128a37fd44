//! The page-table walker against the `x86_64` crate's `MappedPageTable`, in the same groups.
//!
//! Run: `cargo bench --bench walker`. Each group has two `BenchmarkId`s, `hvmem` and
//! `x86_64`, over the same workload, both on x86-64 4-level tables in memory pools of the
//! same kind (4 KiB aligned frames, physical address = base + index * 4096, each new table
//! zeroed when it is allocated):
//! - `map_1g_4k`: map 1 GiB as 262,144 4 KiB pages into an empty table (ours: one `map`
//!   call with `MapSize::Exactly(L1)`; the peer: one `map_to` per page).
//! - `translate_1m`: translate 1,048,576 random addresses of 1 GiB mapped as 4 KiB pages
//!   (ours: `translate`; the peer: `Translate::translate_addr`).
//! - `split_1g`: split 1 GiB of 2 MiB leaves into 4 KiB leaves (ours: one `split` call;
//!   the peer's way, since it has no split: unmap each 2 MiB page and `map_to` its 512
//!   4 KiB pages).
// The peer's mapper is built with `unsafe` constructors (SAFETY comments below).
#![allow(unsafe_code, missing_docs, clippy::unwrap_used, clippy::expect_used)]

use criterion::{BenchmarkId, Criterion, Throughput, black_box};
use criterion::{criterion_group, criterion_main};
use hvmem::spt::{
    MapSize, PageTable, SplitTo, TableArena, TableFrame, TableSlot, WalkFlags, X86_64, X86Flags,
};
use hvmem::testing::Rng;
use hvmem::{Hpa, Level, Va};
use x86_64::structures::paging::mapper::{MappedPageTable, PageTableFrameMapping};
use x86_64::structures::paging::{
    FrameAllocator, Mapper, Page, PageTable as PeerTable, PageTableFlags, PhysFrame, Size2MiB,
    Size4KiB, Translate,
};
use x86_64::{PhysAddr, VirtAddr};

const PAGE: u64 = 4096;
const MIB2: u64 = 2 << 20;
const GIB1: u64 = 1 << 30;
/// Where the mapped range starts (input addresses) and what it maps to (physical).
const VA_AT: u64 = 4 * GIB1;
const PA_AT: u64 = 16 * GIB1;
/// Physical base of both pools of tables.
const TABLES_AT: u64 = 0x40_0000_0000;
/// Tables either side needs for 1 GiB of 4 KiB pages: root + L3 + L2 + 512 L1, and spare.
const POOL: usize = 600;

fn ours_pool() -> Vec<TableFrame> {
    (0..POOL).map(|_| TableFrame::new()).collect()
}

fn ours_slots() -> Vec<TableSlot> {
    (0..POOL).map(|_| TableSlot::default()).collect()
}

/// A fresh arena over the pool (its constructor takes constant time; frames and slots are
/// reset when handed out) with an empty page table.
fn ours_fresh<'a>(
    frames: &'a [TableFrame],
    slots: &'a mut [TableSlot],
) -> (TableArena<'a>, PageTable<X86_64>) {
    let mut arena = TableArena::new(frames, slots, Hpa::new(TABLES_AT).unwrap()).unwrap();
    let pt = PageTable::new(&mut arena).unwrap();
    (arena, pt)
}

fn ours_flags() -> X86Flags {
    X86Flags::PRESENT | X86Flags::WRITABLE
}

/// The peer's table pool: the same layout as our arena.
struct PeerPool {
    tables: Vec<PeerTable>,
}

/// The peer's physical-to-virtual mapping of the pool.
#[derive(Clone, Copy)]
struct PeerMapping {
    base: *mut PeerTable,
    len: usize,
}

// SAFETY: frames handed out by `PeerAlloc` are pool indices below `len`; the pointer is into
// the pool's `Vec`, which outlives every mapper built over it.
unsafe impl PageTableFrameMapping for PeerMapping {
    fn frame_to_pointer(&self, frame: PhysFrame) -> *mut PeerTable {
        let index = ((frame.start_address().as_u64() - TABLES_AT) / PAGE) as usize;
        assert!(index < self.len);
        // SAFETY: `index < len`, inside the pool.
        unsafe { self.base.add(index) }
    }
}

/// Bump allocation of pool frames; frame 0 is the root.
struct PeerAlloc {
    next: usize,
    len: usize,
}

// SAFETY: every frame is handed out once per reset, and the pool is reset only when no
// mapper uses its tables.
unsafe impl FrameAllocator<Size4KiB> for PeerAlloc {
    fn allocate_frame(&mut self) -> Option<PhysFrame<Size4KiB>> {
        (self.next < self.len).then(|| {
            self.next += 1;
            PhysFrame::containing_address(PhysAddr::new(TABLES_AT + (self.next - 1) as u64 * PAGE))
        })
    }
}

impl PeerPool {
    fn new() -> Self {
        Self {
            tables: (0..POOL).map(|_| PeerTable::new()).collect(),
        }
    }

    /// An empty root and an allocator over the rest of the pool.
    fn fresh(&mut self) -> (MappedPageTable<'_, PeerMapping>, PeerAlloc) {
        let mapping = PeerMapping {
            base: self.tables.as_mut_ptr(),
            len: self.tables.len(),
        };
        let root = &mut self.tables[0];
        root.zero();
        let root: *mut PeerTable = root;
        // SAFETY: `root` is frame 0 of the pool, which `mapping` maps and the allocator never
        // hands out; the pool is borrowed mutably for the mapper's lifetime.
        let mapper = unsafe { MappedPageTable::new(&mut *root, mapping) };
        (mapper, PeerAlloc { next: 1, len: POOL })
    }
}

fn peer_flags() -> PageTableFlags {
    PageTableFlags::PRESENT | PageTableFlags::WRITABLE
}

fn peer_map_4k(mapper: &mut MappedPageTable<'_, PeerMapping>, alloc: &mut PeerAlloc) {
    for i in 0..GIB1 / PAGE {
        let page = Page::<Size4KiB>::containing_address(VirtAddr::new(VA_AT + i * PAGE));
        let frame = PhysFrame::containing_address(PhysAddr::new(PA_AT + i * PAGE));
        // SAFETY: the page maps an unused range of a private pool; no memory is accessed
        // through it.
        unsafe { mapper.map_to(page, frame, peer_flags(), alloc) }
            .unwrap()
            .ignore();
    }
}

fn map_1g_4k(c: &mut Criterion) {
    let mut g = c.benchmark_group("map_1g_4k");
    g.throughput(Throughput::Elements(GIB1 / PAGE));
    let frames = ours_pool();
    let mut slots = ours_slots();
    g.bench_function(BenchmarkId::from_parameter("hvmem"), |b| {
        // The arena borrows the slots mutably, so each iteration builds its own (untimed).
        b.iter_custom(|iters| {
            let mut total = std::time::Duration::ZERO;
            for _ in 0..iters {
                let (mut arena, pt) = ours_fresh(&frames, &mut slots);
                let start = std::time::Instant::now();
                pt.map(
                    &mut arena,
                    Va::new(VA_AT).unwrap(),
                    Hpa::new(PA_AT).unwrap(),
                    GIB1,
                    ours_flags(),
                    MapSize::Exactly(Level::L1),
                    WalkFlags::empty(),
                )
                .unwrap();
                total += start.elapsed();
                black_box(arena.allocated());
            }
            total
        });
    });
    let mut pool = PeerPool::new();
    g.bench_function(BenchmarkId::from_parameter("x86_64"), |b| {
        b.iter(|| {
            let (mut mapper, mut alloc) = pool.fresh();
            peer_map_4k(&mut mapper, &mut alloc);
            black_box(alloc.next)
        });
    });
    g.finish();
}

fn translate_1m(c: &mut Criterion) {
    const N: u64 = 1 << 20;
    let mut g = c.benchmark_group("translate_1m");
    g.throughput(Throughput::Elements(N));
    let mut rng = Rng::new(0x1234_5678_9abc_def1);
    let addrs: Vec<u64> = (0..N).map(|_| VA_AT + rng.below(GIB1)).collect();

    let frames = ours_pool();
    let mut slots = ours_slots();
    let (mut arena, pt) = ours_fresh(&frames, &mut slots);
    let (va, pa) = (Va::new(VA_AT).unwrap(), Hpa::new(PA_AT).unwrap());
    pt.map(
        &mut arena,
        va,
        pa,
        GIB1,
        ours_flags(),
        MapSize::Exactly(Level::L1),
        WalkFlags::empty(),
    )
    .unwrap();
    let vas: Vec<Va> = addrs.iter().map(|&a| Va::new(a).unwrap()).collect();
    g.bench_function(BenchmarkId::from_parameter("hvmem"), |b| {
        b.iter(|| {
            let mut sum = 0u64;
            for &a in &vas {
                sum = sum.wrapping_add(pt.translate(&arena, a).unwrap().pa.get());
            }
            black_box(sum)
        });
    });

    let mut pool = PeerPool::new();
    let (mut mapper, mut alloc) = pool.fresh();
    peer_map_4k(&mut mapper, &mut alloc);
    let vaddrs: Vec<VirtAddr> = addrs.iter().map(|&a| VirtAddr::new(a)).collect();
    g.bench_function(BenchmarkId::from_parameter("x86_64"), |b| {
        b.iter(|| {
            let mut sum = 0u64;
            for &a in &vaddrs {
                sum = sum.wrapping_add(mapper.translate_addr(a).unwrap().as_u64());
            }
            black_box(sum)
        });
    });
    // Both saw the same memory map.
    for &a in addrs.iter().take(1000) {
        let ours = pt.translate(&arena, Va::new(a).unwrap()).unwrap().pa.get();
        assert_eq!(
            ours,
            mapper.translate_addr(VirtAddr::new(a)).unwrap().as_u64()
        );
    }
    g.finish();
}

fn split_1g(c: &mut Criterion) {
    let mut g = c.benchmark_group("split_1g");
    g.throughput(Throughput::Elements(GIB1 / MIB2));
    let frames = ours_pool();
    let mut slots = ours_slots();
    g.bench_function(BenchmarkId::from_parameter("hvmem"), |b| {
        // The arena borrows the slots mutably, so each iteration builds its own (untimed).
        b.iter_custom(|iters| {
            let mut total = std::time::Duration::ZERO;
            for _ in 0..iters {
                let (mut arena, pt) = ours_fresh(&frames, &mut slots);
                let (va, pa) = (Va::new(VA_AT).unwrap(), Hpa::new(PA_AT).unwrap());
                let excl = WalkFlags::empty();
                let l2 = MapSize::Exactly(Level::L2);
                pt.map(&mut arena, va, pa, GIB1, ours_flags(), l2, excl)
                    .unwrap();
                let start = std::time::Instant::now();
                let done = pt
                    .split(&mut arena, va, GIB1, SplitTo::Level(Level::L1), excl)
                    .unwrap();
                total += start.elapsed();
                assert_eq!((done.split, done.resume_at), (512, None));
                black_box(arena.allocated());
            }
            total
        });
    });
    let mut pool = PeerPool::new();
    g.bench_function(BenchmarkId::from_parameter("x86_64"), |b| {
        b.iter_custom(|iters| {
            let mut total = std::time::Duration::ZERO;
            for _ in 0..iters {
                let (mut mapper, mut alloc) = pool.fresh();
                let huge = peer_flags() | PageTableFlags::HUGE_PAGE;
                for i in 0..GIB1 / MIB2 {
                    let page =
                        Page::<Size2MiB>::containing_address(VirtAddr::new(VA_AT + i * MIB2));
                    let frame = PhysFrame::containing_address(PhysAddr::new(PA_AT + i * MIB2));
                    // SAFETY: as in `peer_map_4k`.
                    unsafe { mapper.map_to(page, frame, huge, &mut alloc) }
                        .unwrap()
                        .ignore();
                }
                let start = std::time::Instant::now();
                for i in 0..GIB1 / MIB2 {
                    let base = VA_AT + i * MIB2;
                    let page = Page::<Size2MiB>::containing_address(VirtAddr::new(base));
                    let (frame, flush) = Mapper::<Size2MiB>::unmap(&mut mapper, page).unwrap();
                    flush.ignore();
                    let pa = frame.start_address().as_u64();
                    for j in 0..MIB2 / PAGE {
                        let small =
                            Page::<Size4KiB>::containing_address(VirtAddr::new(base + j * PAGE));
                        let frame = PhysFrame::containing_address(PhysAddr::new(pa + j * PAGE));
                        // SAFETY: as in `peer_map_4k`.
                        unsafe { mapper.map_to(small, frame, peer_flags(), &mut alloc) }
                            .unwrap()
                            .ignore();
                    }
                }
                total += start.elapsed();
                black_box(alloc.next);
            }
            total
        });
    });
    g.finish();
}

criterion_group!(benches, map_1g_4k, translate_1m, split_1g);
criterion_main!(benches);
