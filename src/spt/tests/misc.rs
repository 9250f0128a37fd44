//! The flush gather, entry layouts, the arena, randomized sequences against the model
//! and threads in shared mode.

use alloc::vec;

use super::*;
use crate::sync::Ordering;

#[test]
fn gather_degrades_to_flush_all() {
    let mut g = FlushGather::<2>::new();
    g.add(va(0), KIB4);
    g.add(va(KIB4), KIB4); // merges
    g.add(va(MIB2), KIB4);
    assert_eq!(
        g.ranges().collect::<Vec<_>>(),
        vec![(va(0), 2 * KIB4), (va(MIB2), KIB4)]
    );
    g.add(va(GIB1), KIB4);
    assert!(g.is_flush_all());
    let mut tlb = CountingFlush::default();
    g.flush(&mut tlb);
    assert_eq!(
        tlb,
        CountingFlush {
            ranges: 0,
            bytes: 0,
            all: 1
        }
    );
    assert!(g.is_empty());
}

#[test]
fn unmap_many_ranges_flushes_all() {
    let f = frames(64);
    let (mut mem, mut pt) = setup::<X86_64>(&f);
    let size = MapSize::Exactly(Level::L1);
    pt.map(&mut mem, va(0), pa(0), MIB2, rw::<X86_64>(), size)
        .unwrap();
    // Unmap every other page: more separate ranges than the gather holds.
    let mut pending = PendingFlush::new();
    for i in 0..(GATHER_RANGES as u64 + 1) {
        let p = pt.unmap(&mut mem, va(2 * i * KIB4), KIB4).unwrap();
        pending.merge(p, &mut mem);
    }
    let mut tlb = CountingFlush::default();
    pending.flush(&mut tlb, &mut mem);
    assert_eq!((tlb.ranges, tlb.all), (0, 1));
}

#[test]
fn x86_pat_moves_in_huge_leaves() {
    let f = frames(64);
    let (mut mem, mut pt) = setup::<X86_64>(&f);
    let flags = X86Flags::PRESENT | X86Flags::WRITABLE | X86Flags::PAT | X86Flags::NO_EXECUTE;
    pt.map(&mut mem, va(0), pa(0), MIB2, flags, MapSize::Largest)
        .unwrap();
    let t = pt.translate(&mem, va(0)).unwrap();
    assert_eq!(t.level, Level::L2);
    assert_eq!(t.flags, flags);
    // In the entry: PS (bit 7) and PAT at bit 12.
    assert_eq!(t.entry, 0x8000_0000_0000_1083);
    pt.split(&mut mem, va(0), MIB2, SplitTo::OneLevel).unwrap();
    let t = pt.translate(&mem, va(KIB4)).unwrap();
    assert_eq!(t.entry, 0x8000_0000_0000_1083);
    assert_eq!(t.flags, flags);
}

#[test]
fn ept_entries_have_hardware_layout() {
    let f = frames(64);
    let (mut mem, mut pt) = setup::<Ept>(&f);
    let flags = EptFlags::READ | EptFlags::WRITE | EptFlags::EXECUTE | EptFlags::MEMTYPE_WB;
    pt.map(&mut mem, va(GIB1), pa(GIB1), MIB2, flags, MapSize::Largest)
        .unwrap();
    let t = pt.translate(&mem, va(GIB1)).unwrap();
    assert_eq!(t.entry, GIB1 | 0xb7);
    assert_eq!(t.flags, flags);
    // Table entries grant RWX: the root (frame 0 of the arena) points to the next table.
    assert_eq!(pt.root().get(), TABLES_AT);
    let top = f[0].0[0].load(Ordering::Relaxed);
    assert_eq!(top, (TABLES_AT + KIB4) | 0x7);
}

#[test]
fn arena_reuses_and_refuses() {
    let f = frames(2);
    let mut mem = TableArena::new(&f, pa(TABLES_AT)).unwrap();
    let a = mem.alloc_table().unwrap();
    let b = mem.alloc_table().unwrap();
    assert_eq!(a.get(), TABLES_AT);
    assert_eq!(b.get(), TABLES_AT + KIB4);
    assert_eq!(mem.alloc_table(), None);
    f[1].0[9].store(5, Ordering::Relaxed);
    mem.free_table(b);
    mem.free_table(a);
    assert_eq!(mem.allocated(), 0);
    assert_eq!(mem.alloc_table(), Some(a));
    assert_eq!(mem.alloc_table(), Some(b));
    assert!(f[1].0.iter().all(|e| e.load(Ordering::Relaxed) == 0));
    assert!(mem.table_ptr(pa(TABLES_AT + 2 * KIB4)).is_none());
    assert!(mem.table_ptr(pa(TABLES_AT + 8)).is_none());
    assert!(mem.table_ptr(pa(0)).is_none());
    assert_eq!(
        TableArena::new(&f, pa(0x800)).err(),
        Some(ArenaError::Unaligned)
    );
    assert_eq!(
        TableArena::new(&f, pa((1 << 52) - KIB4)).err(),
        Some(ArenaError::OutOfRange)
    );
}

/// Random op sequences against the extent model of `testing::spt`, on every format: the
/// tree maps exactly what the model maps after every op, and no table leaks.
fn random_ops<F: PteFormat>(seed: u64, ops: usize) {
    use crate::testing::Rng;
    use crate::testing::spt::{PtHarness, frames, random_op};
    let f = frames();
    let mut h = PtHarness::<F>::new(&f).unwrap();
    let mut rng = Rng::new(seed);
    for i in 0..ops {
        let op = random_op(&mut rng);
        if let Err(e) = h.apply(op) {
            panic!("{} seed {seed} op {i} {op:?}: {e}", F::NAME);
        }
    }
    h.finish().unwrap();
}

#[test]
fn random_ops_x86_64() {
    for seed in 1..=4 {
        random_ops::<X86_64>(seed, 150);
    }
}

#[test]
fn random_ops_la57() {
    for seed in 11..=13 {
        random_ops::<X86_64La57>(seed, 150);
    }
}

#[test]
fn random_ops_ept() {
    for seed in 21..=24 {
        random_ops::<Ept>(seed, 150);
    }
}

/// Threads in shared mode on one tree: concurrent maps of neighbouring pages race to
/// install the same tables (the loser frees its own), and a split races a write-protect of
/// the same huge leaves; whatever the interleaving, every translation is right and no table
/// leaks.
fn threads_in_shared_mode<F: PteFormat>() {
    let f = frames(2048);
    let shared = LockedArena::new(TableArena::new(&f, pa(TABLES_AT)).unwrap());
    let pt = PageTable::<F>::new(&mut &shared).unwrap();
    std::thread::scope(|s| {
        for t in 0..2u64 {
            let (pt, shared) = (&pt, &shared);
            s.spawn(move || {
                let mut mem = shared;
                for i in 0..256u64 {
                    // Thread 0 maps even pages, thread 1 odd ones, of the same 2 MiB.
                    let page = (2 * i + t) * KIB4;
                    let size = MapSize::Exactly(Level::L1);
                    pt.map_shared(&mut mem, va(page), pa(GIB1 + page), KIB4, rw::<F>(), size)
                        .unwrap();
                }
            });
        }
    });
    for i in 0..512 {
        assert_maps(&pt, &&shared, i * KIB4, GIB1 + i * KIB4, Level::L1);
    }
    assert_eq!(shared.allocated(), pt.table_count(&&shared).unwrap());

    let at = 8 * GIB1;
    pt.map_shared(
        &mut &shared,
        va(at),
        pa(at),
        4 * MIB2,
        rw::<F>(),
        MapSize::Largest,
    )
    .unwrap();
    let w = <F::Flags as bitflags::Flags>::from_bits_retain(F::WRITABLE);
    let none = <F::Flags as bitflags::Flags>::empty();
    std::thread::scope(|s| {
        let (pt, shared) = (&pt, &shared);
        s.spawn(move || {
            let to = SplitTo::Level(Level::L1);
            pt.split_shared(&mut &*shared, va(at), 4 * MIB2, to)
                .unwrap()
        });
        s.spawn(move || {
            let mut mem = shared;
            let p = pt
                .protect_shared(&mut mem, va(at), 4 * MIB2, none, w)
                .unwrap();
            p.flush(&mut CountingFlush::default(), &mut mem);
        });
    });
    for i in (0..4 * MIB2 / KIB4).step_by(7) {
        let t = pt.translate(&&shared, va(at + i * KIB4)).unwrap();
        assert_eq!(t.pa.get(), at + i * KIB4);
        assert_eq!(t.level, Level::L1);
        assert_eq!(
            bits::<F>(t.flags) & F::WRITABLE,
            0,
            "{}: write-protect lost",
            F::NAME
        );
    }
    assert_eq!(shared.allocated(), pt.table_count(&&shared).unwrap());
}

#[test]
fn threads_in_shared_mode_x86_64() {
    for _ in 0..20 {
        threads_in_shared_mode::<X86_64>();
    }
}

#[test]
fn threads_in_shared_mode_ept() {
    for _ in 0..20 {
        threads_in_shared_mode::<Ept>();
    }
}
