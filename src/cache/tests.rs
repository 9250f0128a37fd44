#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use alloc::vec::Vec;

use super::*;
use crate::addr::{Address, Hpa, Level};
use crate::spt::{
    Ept, MapSize, PageTable, PteFormat, SplitTo, TableArena, TableFrame, TableSlot, WalkFlags,
    WithAlloc, X86_64,
};

const MIB2: u64 = 2 << 20;
const GIB1: u64 = 1 << 30;
const TABLES_AT: u64 = 0x7_0000_0000;

/// Hands out 0, 1, 2, ... until `left` runs out; records what comes back.
struct Counter {
    next: u32,
    left: usize,
    returned: Vec<u32>,
}

impl Counter {
    fn new(left: usize) -> Self {
        Self {
            next: 0,
            left,
            returned: Vec::new(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Exhausted;

impl fmt::Display for Exhausted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("exhausted")
    }
}

impl ObjectSource<u32> for Counter {
    type Error = Exhausted;

    fn alloc(&mut self) -> Result<u32, Exhausted> {
        if self.left == 0 {
            return Err(Exhausted);
        }
        self.left -= 1;
        self.next += 1;
        Ok(self.next - 1)
    }

    fn free(&mut self, obj: u32) {
        self.returned.push(obj);
    }
}

fn sorted(mut v: Vec<u32>) -> Vec<u32> {
    v.sort_unstable();
    v
}

#[test]
fn top_up_fills_to_capacity_and_reserves_min() {
    let mut src = Counter::new(100);
    let mut c = MemoryCache::<u32, 8>::new();
    let r = c.top_up(&mut src, 3).unwrap();
    assert_eq!(r, Reserved { min: 3, have: 8 });
    assert_eq!((c.len(), c.capacity(), src.next), (8, 8, 8));
    // A full cache takes nothing more.
    assert_eq!(c.top_up(&mut src, 8).unwrap().have, 8);
    assert_eq!(src.next, 8);
    let taken: Vec<u32> = (0..8).map(|_| c.alloc().unwrap()).collect();
    assert_eq!(sorted(taken), (0..8).collect::<Vec<_>>());
    assert_eq!(c.alloc(), None);
}

#[test]
fn source_failing_after_min_is_fine() {
    let mut src = Counter::new(5);
    let mut c = MemoryCache::<u32, 8>::new();
    let r = c.top_up(&mut src, 5).unwrap();
    assert_eq!(r, Reserved { min: 5, have: 5 });
    for _ in 0..5 {
        assert!(c.alloc().is_some());
    }
}

#[test]
fn min_not_reached_keeps_what_was_taken() {
    let mut src = Counter::new(3);
    let mut c = MemoryCache::<u32, 8>::new();
    assert_eq!(
        c.top_up(&mut src, 4),
        Err(TopUpError::Source {
            error: Exhausted,
            have: 3
        })
    );
    assert_eq!(c.len(), 3, "nothing lost");
    // More memory arrives: the next top-up starts from the three already held.
    src.left = 1;
    assert_eq!(c.top_up(&mut src, 4).unwrap().have, 4);
    c.drain_into(&mut src);
    assert!(c.is_empty());
    assert_eq!(sorted(src.returned), (0..4).collect::<Vec<_>>());
}

#[test]
fn min_over_capacity_is_refused_before_taking_anything() {
    let mut src = Counter::new(100);
    let mut c = MemoryCache::<u32, 4>::new();
    assert_eq!(
        c.top_up(&mut src, 5),
        Err(TopUpError::OverCapacity {
            min: 5,
            capacity: 4
        })
    );
    assert_eq!((c.len(), src.next), (0, 0));
    let e: TopUpError<Exhausted> = TopUpError::OverCapacity {
        min: 5,
        capacity: 4,
    };
    assert_eq!(
        alloc::format!("{e}"),
        "top-up minimum 5 exceeds cache capacity 4"
    );
}

#[test]
fn free_keeps_if_room_else_returns_to_source() {
    let mut src = Counter::new(100);
    let mut c = MemoryCache::<u32, 2>::new();
    c.top_up(&mut src, 2).unwrap();
    let a = c.alloc().unwrap();
    c.free(a, &mut src);
    assert_eq!((c.len(), src.returned.len()), (2, 0));
    c.free(99, &mut src);
    assert_eq!((c.len(), src.returned.as_slice()), (2, &[99][..]));
    assert_eq!(c.put(7), Err(7));
}

/// Each cache has its own capacity (Matlack 2022): the splitter's descriptor cache holds
/// 513, the fault path's a few, both from one source and independent of each other.
#[test]
fn capacities_per_cache_differ() {
    let mut src = Counter::new(600);
    let mut descs = MemoryCache::<u32, 513>::new();
    let mut fault = MemoryCache::<u32, 4>::new();
    assert_eq!(descs.top_up(&mut src, 513).unwrap().have, 513);
    assert_eq!(fault.top_up(&mut src, 1).unwrap().have, 4);
    assert_eq!((descs.capacity(), fault.capacity()), (513, 4));
    assert!(fault.top_up(&mut src, 5).is_err());
    // 600 - 517 left: a second splitter cache cannot reserve a huge page's worth.
    let mut descs2 = MemoryCache::<u32, 513>::new();
    assert_eq!(
        descs2.top_up(&mut src, 513),
        Err(TopUpError::Source {
            error: Exhausted,
            have: 83
        })
    );
    let mut all = Vec::new();
    for c in [&mut descs as &mut dyn Drain, &mut fault, &mut descs2] {
        c.drain(&mut all);
    }
    assert_eq!(
        sorted(all),
        (0..600).collect::<Vec<_>>(),
        "no object twice, none lost"
    );
}

trait Drain {
    fn drain(&mut self, out: &mut Vec<u32>);
}

impl<const CAP: usize> Drain for MemoryCache<u32, CAP> {
    fn drain(&mut self, out: &mut Vec<u32>) {
        while let Some(x) = self.alloc() {
            out.push(x);
        }
    }
}

fn frames(n: usize) -> (Vec<TableFrame>, Vec<TableSlot>) {
    (
        (0..n).map(|_| TableFrame::new()).collect(),
        (0..n).map(|_| TableSlot::default()).collect(),
    )
}

fn rw<F: PteFormat>() -> F::Flags {
    <F::Flags as bitflags::Flags>::from_bits_retain(F::REQUIRED | F::WRITABLE | F::MMU_WRITABLE)
}

/// 1 GiB of 2 MiB leaves split to 4 KiB through a `TableCache` lent to `split` with
/// `WithAlloc`: each round tops up (where the MMU lock would be dropped), splits until the
/// cache runs dry and resumes at `resume_at`; at the end the cache drains back to the arena
/// and the arena holds exactly the tree's tables.
fn split_through_a_table_cache<F: PteFormat>() {
    let (f, mut s) = frames(700);
    let mut arena = TableArena::new(&f, &mut s, Hpa::new(TABLES_AT).unwrap()).unwrap();
    let pt = PageTable::<F>::new(&mut arena).unwrap();
    let excl = WalkFlags::empty();
    let v = |a: u64| F::In::from_raw(a).unwrap();
    pt.map(
        &mut arena,
        v(0),
        F::Out::from_raw(0).unwrap(),
        GIB1,
        rw::<F>(),
        MapSize::Exactly(Level::L2),
        excl,
    )
    .unwrap();
    let before = pt.table_count(&arena).unwrap();
    let mut cache = TableCache::<100>::new();
    let (mut at, mut rounds, mut split) = (0u64, 0, 0);
    loop {
        let r = cache.top_up(&mut arena, 1).unwrap();
        assert_eq!(r.have, 100);
        let done = pt
            .split(
                &mut WithAlloc {
                    mapping: &arena,
                    alloc: &mut cache,
                },
                v(at),
                GIB1 - at,
                SplitTo::Level(Level::L1),
                excl,
            )
            .unwrap();
        split += done.split;
        rounds += 1;
        match done.resume_at {
            Some(next) => {
                assert!(cache.is_empty());
                assert_eq!(next.raw(), split as u64 * MIB2);
                at = next.raw();
            }
            None => break,
        }
    }
    assert_eq!((split, rounds), (512, 6));
    for i in (0..GIB1 >> 12).step_by(4093) {
        let t = pt.translate(&arena, v(i << 12)).unwrap();
        assert_eq!((t.pa.raw(), t.level), (i << 12, Level::L1));
    }
    let tree = pt.table_count(&arena).unwrap();
    assert_eq!(tree, before + 512);
    // The leftovers are the cache's, counted by the arena as allocated.
    assert_eq!(cache.len(), 6 * 100 - 512);
    assert_eq!(arena.allocated(), tree + cache.len());
    cache.drain_into(&mut arena).unwrap();
    assert_eq!((cache.len(), arena.allocated()), (0, tree), "no leak");
}

#[test]
fn split_through_a_table_cache_x86_64() {
    split_through_a_table_cache::<X86_64>();
}

#[test]
fn split_through_a_table_cache_ept() {
    split_through_a_table_cache::<Ept>();
}

#[test]
fn table_cache_hands_out_only_tables_to_fill() {
    let (f, mut s) = frames(8);
    let mut arena = TableArena::new(&f, &mut s, Hpa::new(TABLES_AT).unwrap()).unwrap();
    let mut cache = TableCache::<2>::new();
    cache.top_up(&mut arena, 2).unwrap();
    assert_eq!(cache.alloc_table(Level::L1), None, "cannot zero: refuses");
    assert_eq!(cache.len(), 2);
    let t = cache.alloc_table_to_fill(Level::L2).unwrap();
    // Any level: the arena keeps the level of the top-up until a link says otherwise.
    assert_eq!(arena.level(t), Some(Level::L1));
    cache.free_table(t).unwrap();
    cache.drain_into(&mut arena).unwrap();
    assert_eq!(arena.allocated(), 0);
}

/// Tables freed into a full cache wait in the overflow, are taken first by the next
/// top-up, and go back to the arena on `release_overflow`; a table the arena does not own
/// is reported, and every other one is still returned.
#[test]
fn table_cache_overflow_goes_back_to_the_arena() {
    let (f, mut s) = frames(8);
    let mut arena = TableArena::new(&f, &mut s, Hpa::new(TABLES_AT).unwrap()).unwrap();
    let extra: Vec<Hpa> = (0..3)
        .map(|_| arena.alloc_table_to_fill(Level::L1).unwrap())
        .collect();
    let mut cache = TableCache::<2>::new();
    cache.top_up(&mut arena, 2).unwrap();
    for &t in &extra {
        cache.free_table(t).unwrap();
    }
    assert_eq!(
        (cache.len(), cache.overflow(), arena.allocated()),
        (2, 3, 5)
    );
    // Two taken, then the top-up moves two of the overflow in before it asks the arena.
    cache.alloc_table_to_fill(Level::L1).unwrap();
    let held = cache.alloc_table_to_fill(Level::L1).unwrap();
    cache.top_up(&mut arena, 2).unwrap();
    assert_eq!(
        (cache.len(), cache.overflow(), arena.allocated()),
        (2, 1, 5)
    );
    cache.free_table(held).unwrap();
    assert_eq!(cache.overflow(), 2);
    cache.release_overflow(&mut arena).unwrap();
    assert_eq!((cache.overflow(), arena.allocated()), (0, 3));
    // A stranger's table: refused by the arena, the others still go back.
    cache.free_table(Hpa::new(0x1000).unwrap()).unwrap();
    assert_eq!(cache.drain_into(&mut arena), Err(FreeError::NotATable));
    assert_eq!(arena.allocated(), 1, "the one taken and never freed");
}

#[test]
fn table_cache_full_overflow_refuses() {
    let mut cache = TableCache::<1>::new();
    for i in 0..=DEFER_TABLES as u64 {
        cache.free_table(Hpa::new((i + 1) << 12).unwrap()).unwrap();
    }
    assert_eq!((cache.len(), cache.overflow()), (1, DEFER_TABLES));
    assert_eq!(
        cache.free_table(Hpa::new(0x1000_0000).unwrap()),
        Err(FreeError::Full)
    );
}

/// Regression (misuse audit): freeing the same table into a `TableCache` twice was
/// accepted, and the cache then handed the table out twice (two splits would have filled
/// one child). A table the cache holds, in its stack or its overflow, is refused as the
/// arena refuses a double free, and nothing changes.
#[test]
fn table_cache_refuses_a_double_free() {
    let (f, mut s) = frames(8);
    let mut arena = TableArena::new(&f, &mut s, Hpa::new(TABLES_AT).unwrap()).unwrap();
    let mut cache = TableCache::<4>::new();
    cache.top_up(&mut arena, 4).unwrap();
    let t = cache.alloc_table_to_fill(Level::L1).unwrap();
    let u = cache.alloc_table_to_fill(Level::L1).unwrap();
    cache.free_table(t).unwrap();
    assert_eq!(cache.free_table(t), Err(FreeError::NotAllocated));
    assert_eq!(cache.len(), 3);
    // Into the overflow too: fill the stack, then free `u` twice.
    let extra = arena.alloc_table_to_fill(Level::L1).unwrap();
    cache.free_table(extra).unwrap();
    cache.free_table(u).unwrap();
    assert_eq!(cache.overflow(), 1);
    assert_eq!(cache.free_table(u), Err(FreeError::NotAllocated));
    assert_eq!(cache.overflow(), 1);
    let mut out: Vec<Hpa> = (0..4)
        .map(|_| cache.alloc_table_to_fill(Level::L1).unwrap())
        .collect();
    out.sort_unstable();
    out.dedup();
    assert_eq!(out.len(), 4, "a table handed out twice");
    for t in out {
        cache.free_table(t).unwrap();
    }
    cache.drain_into(&mut arena).unwrap();
    assert_eq!(arena.allocated(), 0);
}

/// A table cache hands out its tables lowest address first, whatever order the allocator
/// gave them in: an arena's free list returns frames in the reverse of the order they were
/// freed, and a split that then filled table after table at falling addresses ran 1.5-2x
/// slower at 4-8 GiB (`benches/split.rs`, `eager_split`).
#[test]
fn table_cache_hands_tables_out_in_rising_order() {
    let (f, mut s) = frames(16);
    let mut arena = TableArena::new(&f, &mut s, Hpa::new(TABLES_AT).unwrap()).unwrap();
    let taken: Vec<Hpa> = (0..12)
        .map(|_| arena.alloc_table_to_fill(Level::L1).unwrap())
        .collect();
    // Freed rising, so the free list gives them back falling.
    for &t in &taken {
        arena.free_table(t).unwrap();
    }
    let mut cache = TableCache::<8>::new();
    cache.top_up(&mut arena, 8).unwrap();
    let out: Vec<u64> = (0..5)
        .map(|_| cache.alloc_table_to_fill(Level::L1).unwrap().get())
        .collect();
    assert!(out.windows(2).all(|w| w[0] < w[1]), "{out:x?}");
    // A top-up that adds tables orders the old and the new together.
    cache.top_up(&mut arena, 8).unwrap();
    let mut rest: Vec<u64> = Vec::new();
    while let Some(t) = cache.alloc_table_to_fill(Level::L1) {
        rest.push(t.get());
    }
    assert_eq!(rest.len(), 8);
    assert!(rest.windows(2).all(|w| w[0] < w[1]), "{rest:x?}");
    assert!(out.iter().all(|t| !rest.contains(t)));
}
