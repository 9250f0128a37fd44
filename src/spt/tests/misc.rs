//! The flush gather, entry layouts, the arena, randomized sequences against the model
//! and threads in shared mode.

use super::*;
use crate::sync::{AtomicU64, Ordering};

fn range(start: u64, len: u64, level: Level) -> FlushRange {
    FlushRange { start, len, level }
}

#[test]
fn gather_degrades_to_flush_all() {
    let mut g = FlushGather::<2>::new();
    g.add_raw(0, KIB4, Level::L1);
    g.add_raw(KIB4, KIB4, Level::L1); // merges
    g.add_raw(MIB2, KIB4, Level::L1);
    assert_eq!(
        g.ranges(),
        &[range(0, 2 * KIB4, Level::L1), range(MIB2, KIB4, Level::L1)]
    );
    assert_eq!(g.pages(), 3);
    g.add_raw(GIB1, KIB4, Level::L1);
    assert!(g.is_flush_all());
    let mut tlb = CountingFlush::default();
    g.flush(&mut tlb);
    assert_eq!(
        tlb,
        CountingFlush {
            ranges: 0,
            bytes: 0,
            pages: 0,
            all: 1
        }
    );
    assert!(g.is_empty());
}

#[test]
fn gather_dedups_and_keeps_page_sizes() {
    let mut g = FlushGather::<4>::new();
    // The leaves of a table, then the table itself over the same range: one range.
    for i in 0..8 {
        g.add_raw(MIB2 + i * KIB4, KIB4, Level::L1);
    }
    g.add_raw(MIB2, 8 * KIB4, Level::L2);
    assert_eq!(g.ranges(), &[range(MIB2, 8 * KIB4, Level::L1)]);
    // The same range twice: once.
    g.add_raw(GIB1, MIB2, Level::L2);
    g.add_raw(GIB1, MIB2, Level::L2);
    assert_eq!(g.ranges().len(), 2);
    // A smaller page inside a huge range lowers the range's page size.
    g.add_raw(4 * GIB1, 2 * MIB2, Level::L2);
    assert_eq!(g.pages(), 8 + 1 + 2);
    // A table entry cleared over ranges already gathered costs nothing.
    g.add_table_raw(0, GIB1, Level::L3);
    assert_eq!(g.pages(), 8 + 1 + 2);
    g.add_raw(4 * GIB1 + KIB4, KIB4, Level::L1);
    // The 4 MiB range now holds 4 KiB pages: 1024 invalidations, past the ceiling.
    assert!(g.is_flush_all());
    // A 1 GiB leaf is one invalidation, not 262,144.
    let mut g = FlushGather::<4>::new();
    g.add_raw(0, GIB1, Level::L3);
    assert_eq!(g.pages(), 1);
    let mut tlb = CountingFlush::default();
    g.flush(&mut tlb);
    assert_eq!((tlb.ranges, tlb.pages, tlb.bytes), (1, 1, GIB1));
}

/// Regression (adversarial audit): a range touching the last one and reaching past the end
/// of the address space extended it with `last.len += len`, which overflowed ("attempt to
/// add with overflow"). It now turns the gather into a full flush, which covers anything.
#[test]
fn gather_takes_a_range_past_the_end_of_the_address_space() {
    let mut g = FlushGather::<4>::new();
    g.add_raw(0, KIB4, Level::L1);
    g.add_raw(KIB4, u64::MAX, Level::L1);
    assert!(g.is_flush_all());
    let mut g = FlushGather::<4>::new();
    // Ending just below 2^64 is a range; reaching 2^64 or past it is not.
    g.add_raw(u64::MAX - 2 * KIB4 + 1, KIB4, Level::L1);
    assert_eq!(g.ranges().len(), 1);
    g.add_raw(u64::MAX - KIB4 + 1, KIB4, Level::L1);
    assert!(g.is_flush_all());
    // Through `merge` and `add_table_raw` too.
    let mut h = FlushGather::<4>::new();
    h.add_raw(0, KIB4, Level::L1);
    h.add_table_raw(KIB4, u64::MAX, Level::L2);
    assert!(h.is_flush_all());
    let mut m = FlushGather::<4>::new();
    m.merge(&h);
    assert!(m.is_flush_all());
}

/// Regression (promise audit): extending the last range added the new piece's own page
/// count, not what the merged range asks for, so pieces of one huge page counted one
/// invalidation each and the gather turned into a full flush early.
#[test]
fn gather_counts_what_a_merged_range_asks_for() {
    let mut g = FlushGather::<16>::new();
    g.add_raw(0, KIB4, Level::L2);
    g.add_raw(KIB4, KIB4, Level::L2);
    assert_eq!(g.ranges(), &[range(0, 2 * KIB4, Level::L2)]);
    assert_eq!(g.pages(), 1);
    for i in 2..65 {
        g.add_raw(i * KIB4, KIB4, Level::L2);
    }
    assert!(!g.is_flush_all());
    assert_eq!(g.pages(), 1);
    // At 4 KiB each piece is an invalidation of its own: past the ceiling.
    let mut g = FlushGather::<16>::new();
    for i in 0..=FLUSH_ALL_PAGES {
        g.add_raw(i * KIB4, KIB4, Level::L1);
    }
    assert!(g.is_flush_all());
}

/// A range that starts or ends inside a page touches that page too: `pages()` counted
/// `len / page size`, so 2 MiB from 4 KiB into a huge page (two huge pages) asked for one
/// invalidation, and a flusher stepping by the page size left the second one cached.
#[test]
fn flush_range_pages_counts_every_page_touched() {
    let mib2 = 2 << 20;
    assert_eq!(range(KIB4, mib2, Level::L2).pages(), 2);
    assert_eq!(range(0, mib2, Level::L2).pages(), 1);
    assert_eq!(range(mib2 - KIB4, 2 * KIB4, Level::L2).pages(), 2);
    assert_eq!(range(KIB4, KIB4, Level::L2).pages(), 1);
    assert_eq!(range(KIB4, 3 * KIB4, Level::L1).pages(), 3);
    assert_eq!(range(u64::MAX - KIB4 + 1, KIB4 - 1, Level::L1).pages(), 1);
    assert_eq!(range(u64::MAX - KIB4, KIB4, Level::L1).pages(), 2);
    // The gather counts the same way: two pieces straddling a huge-page boundary.
    let mut g = FlushGather::<16>::new();
    g.add_raw(mib2 - KIB4, 2 * KIB4, Level::L2);
    assert_eq!(g.pages(), 2);
}

/// Unmapping a 2 MiB range of 4 KiB pages once gave the same range twice (the leaves, then
/// their emptied table).
#[test]
fn unmap_gathers_each_range_once() {
    let mut f = frames(64);
    let (mut mem, mut pt) = setup::<X86_64>(&f.frames, &mut f.slots);
    let size = MapSize::Exactly(Level::L1);
    map_rw(&pt, &mut mem, 0, 0, 16 * KIB4, size);
    let pending = pt.unmap(&mut mem, va(0), MIB2).unwrap();
    assert_eq!(pending.gather().ranges(), &[range(0, 16 * KIB4, Level::L1)]);
    assert_eq!(pending.tables_to_free(), 3);
    pending
        .flush(&mut CountingFlush::default(), &mut mem)
        .unwrap();
}

#[test]
fn unmap_many_ranges_flushes_all() {
    let mut f = frames(64);
    let (mut mem, mut pt) = setup::<X86_64>(&f.frames, &mut f.slots);
    let size = MapSize::Exactly(Level::L1);
    map_rw(&pt, &mut mem, 0, 0, MIB2, size);
    // Unmap every other page: more separate ranges than the gather holds.
    let mut pending = PendingFlush::new();
    for i in 0..(GATHER_RANGES as u64 + 1) {
        let mut p = pt.unmap(&mut mem, va(2 * i * KIB4), KIB4).unwrap();
        assert!(pending.merge(&mut p));
        assert!(p.is_empty());
    }
    let mut tlb = CountingFlush::default();
    pending.flush(&mut tlb, &mut mem).unwrap();
    assert_eq!((tlb.ranges, tlb.all), (0, 1));
}

#[test]
fn x86_pat_moves_in_huge_leaves() {
    let mut f = frames(64);
    let (mut mem, pt) = setup::<X86_64>(&f.frames, &mut f.slots);
    let flags = X86Flags::PRESENT | X86Flags::WRITABLE | X86Flags::PAT | X86Flags::NO_EXECUTE;
    pt.map(
        &mut mem,
        va(0),
        pa(0),
        MIB2,
        flags,
        MapSize::Largest,
        WalkFlags::empty(),
    )
    .unwrap();
    let t = pt.translate(&mem, va(0)).unwrap();
    assert_eq!(t.level, Level::L2);
    assert_eq!(t.flags, flags);
    // In the entry: PS (bit 7) and PAT at bit 12.
    assert_eq!(t.entry, 0x8000_0000_0000_1083);
    pt.split(&mut mem, va(0), MIB2, SplitTo::OneLevel, WalkFlags::empty())
        .unwrap();
    let t = pt.translate(&mem, va(KIB4)).unwrap();
    assert_eq!(t.entry, 0x8000_0000_0000_1083);
    assert_eq!(t.flags, flags);
}

#[test]
fn ept_entries_have_hardware_layout() {
    let mut f = frames(64);
    let (mut mem, pt) = setup::<Ept>(&f.frames, &mut f.slots);
    let flags = EptFlags::READ | EptFlags::WRITE | EptFlags::EXECUTE | EptFlags::MEMTYPE_WB;
    pt.map(
        &mut mem,
        va(GIB1),
        pa(GIB1),
        MIB2,
        flags,
        MapSize::Largest,
        WalkFlags::empty(),
    )
    .unwrap();
    let t = pt.translate(&mem, va(GIB1)).unwrap();
    assert_eq!(t.entry, GIB1 | 0xb7);
    assert_eq!(t.flags, flags);
    // Table entries grant RWX: the root (frame 0 of the arena) points to the next table.
    assert_eq!(pt.root().get(), TABLES_AT);
    let top = f.frames[0].0[0].load(Ordering::Relaxed);
    assert_eq!(top, (TABLES_AT + KIB4) | 0x7);
}

#[test]
fn arena_reuses_and_refuses() {
    let mut f = frames(2);
    let mut mem = TableArena::new(&f.frames, &mut f.slots, pa(TABLES_AT)).unwrap();
    let a = mem.alloc_table(Level::L1).unwrap();
    let b = mem.alloc_table(Level::L1).unwrap();
    assert_eq!(a.get(), TABLES_AT);
    assert_eq!(b.get(), TABLES_AT + KIB4);
    assert_eq!(mem.alloc_table(Level::L1), None);
    f.frames[1].0[9].store(5, Ordering::Relaxed);
    mem.free_table(b).unwrap();
    mem.free_table(a).unwrap();
    assert_eq!(mem.allocated(), 0);
    assert_eq!(mem.alloc_table(Level::L1), Some(a));
    assert_eq!(mem.alloc_table(Level::L1), Some(b));
    assert!(f.frames[1].0.iter().all(|e| e.load(Ordering::Relaxed) == 0));
    assert!(mem.table_ptr(pa(TABLES_AT + 2 * KIB4)).is_none());
    assert!(mem.table_ptr(pa(TABLES_AT + 8)).is_none());
    assert!(mem.table_ptr(pa(0)).is_none());
    assert_eq!(
        TableArena::new(&f.frames, &mut f.slots, pa(0x800)).err(),
        Some(ArenaError::Unaligned)
    );
    assert_eq!(
        TableArena::new(&f.frames, &mut f.slots, pa((1 << 52) - KIB4)).err(),
        Some(ArenaError::OutOfRange)
    );
    assert_eq!(
        TableArena::new(&f.frames, &mut f.slots[..1], pa(0)).err(),
        Some(ArenaError::TooFewSlots)
    );
}

/// An arena whose last frame ends exactly at 2^52 is fine (it was refused).
#[test]
fn arena_may_end_at_the_top_of_physical_memory() {
    let mut f = frames(2);
    let mut mem = TableArena::new(&f.frames, &mut f.slots, pa((1 << 52) - 2 * KIB4)).unwrap();
    let a = mem.alloc_table(Level::L1).unwrap();
    let b = mem.alloc_table(Level::L1).unwrap();
    assert_eq!(b.get(), (1 << 52) - KIB4);
    assert!(mem.table_ptr(b).is_some());
    mem.free_table(a).unwrap();
    mem.free_table(b).unwrap();
}

/// The arena once kept its free list in entry 0 of each freed frame and followed it
/// unchecked: anyone holding the frames (or a visitor writing a freed table) could send the
/// next allocation out of bounds. The list is out of band now, so scribbling on freed
/// frames cannot mislead it; double frees and frees of linked tables are refused.
#[test]
fn arena_free_list_is_out_of_band() {
    let mut f = frames(4);
    let mut mem = TableArena::new(&f.frames, &mut f.slots, pa(TABLES_AT)).unwrap();
    let a = mem.alloc_table(Level::L2).unwrap();
    let b = mem.alloc_table(Level::L1).unwrap();
    mem.free_table(a).unwrap();
    mem.free_table(b).unwrap();
    // What the old arena read back as "next free index + 1": far out of bounds.
    for frame in &f.frames {
        frame.0[0].store(u64::MAX >> 1, Ordering::Relaxed);
    }
    assert_eq!(mem.alloc_table(Level::L1), Some(b));
    assert_eq!(mem.alloc_table(Level::L1), Some(a));
    assert_eq!(mem.level(a), Some(Level::L1));
    let c = mem.alloc_table(Level::L1).unwrap();
    let d = mem.alloc_table(Level::L1).unwrap();
    assert_eq!(mem.alloc_table(Level::L1), None);
    assert_eq!(mem.allocated(), 4);
    // Double free, a never-allocated address, a linked table: refused, nothing changes.
    mem.free_table(c).unwrap();
    assert_eq!(mem.free_table(c), Err(FreeError::NotAllocated));
    assert_eq!(mem.free_table(pa(TABLES_AT + 8)), Err(FreeError::NotATable));
    assert_eq!(mem.free_table(pa(0)), Err(FreeError::NotATable));
    mem.link(d, Level::L1);
    assert_eq!(mem.free_table(d), Err(FreeError::StillLinked));
    assert_eq!(mem.unlink(d), Unlinked::Free);
    mem.free_table(d).unwrap();
    assert_eq!(mem.allocated(), 2);
    assert_eq!(mem.alloc_table(Level::L1), Some(d));
    assert_eq!(mem.alloc_table(Level::L1), Some(c));
    assert_eq!(mem.alloc_table(Level::L1), None);
}

/// A visitor that frees a table it leaves linked (through `Tables::free`) is refused when
/// the ops recorded the link; the tree stays whole and later walks stay in bounds.
fn visitor_cannot_free_linked_table<F: PteFormat>() {
    let mut f = frames(16);
    let (mut mem, pt) = setup::<F>(&f.frames, &mut f.slots);
    map_rw(&pt, &mut mem, 0, 0, KIB4, MapSize::Largest);
    let before = mem.allocated();
    let mut refused = 0;
    let mut v = |_: VisitKind, ctx: &mut VisitCtx<'_, F>, t: &mut Tables<'_, TableArena<'_>>| {
        if t.free(F::table_addr(ctx.old())) == Err(FreeError::StillLinked) {
            refused += 1;
        }
        Ok::<_, ()>(Action::Continue)
    };
    pt.walk(&mut mem, va(0), KIB4, WalkFlags::TABLE_PRE, &mut v)
        .unwrap();
    assert_eq!(refused, F::ROOT_LEVEL.get() as usize - 1);
    assert_eq!(mem.allocated(), before);
    assert_maps(&pt, &mem, 0, 0, Level::L1);
}

#[test]
fn visitor_cannot_free_linked_table_all_formats() {
    visitor_cannot_free_linked_table::<X86_64>();
    visitor_cannot_free_linked_table::<X86_64La57>();
    visitor_cannot_free_linked_table::<Ept>();
}

/// Random op sequences against the extent model of `testing::spt`, on every format: the
/// tree maps exactly what the model maps after every op, and no table leaks.
fn random_ops<F: PteFormat>(seed: u64, ops: usize) {
    use crate::testing::Rng;
    use crate::testing::spt::{PtHarness, frames, random_op};
    let f = frames();
    let mut slots = crate::testing::spt::slots();
    let mut h = PtHarness::<F>::new(&f, &mut slots).unwrap();
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
    // Miri interprets every entry store: a smaller tree there (the split of 2 MiB leaves
    // into 512 entries each is most of the cost).
    let (pages, huge) = if cfg!(miri) { (16u64, 1u64) } else { (256, 4) };
    let mut f = frames(if cfg!(miri) { 32 } else { 2048 });
    let shared = LockedArena::new(TableArena::new(&f.frames, &mut f.slots, pa(TABLES_AT)).unwrap());
    let pt = PageTable::<F>::new(&mut &shared).unwrap();
    std::thread::scope(|s| {
        for t in 0..2u64 {
            let (pt, shared) = (&pt, &shared);
            s.spawn(move || {
                let mut mem = shared;
                for i in 0..pages {
                    // Thread 0 maps even pages, thread 1 odd ones, of the same 2 MiB.
                    let page = (2 * i + t) * KIB4;
                    let size = MapSize::Exactly(Level::L1);
                    pt.map(
                        &mut mem,
                        va(page),
                        pa(GIB1 + page),
                        KIB4,
                        rw::<F>(),
                        size,
                        WalkFlags::SHARED,
                    )
                    .unwrap();
                }
            });
        }
    });
    for i in 0..2 * pages {
        assert_maps(&pt, &&shared, i * KIB4, GIB1 + i * KIB4, Level::L1);
    }
    assert_eq!(shared.allocated(), pt.table_count(&&shared).unwrap());

    let at = 8 * GIB1;
    pt.map(
        &mut &shared,
        va(at),
        pa(at),
        huge * MIB2,
        rw::<F>(),
        MapSize::Largest,
        WalkFlags::SHARED,
    )
    .unwrap();
    let w = <F::Flags as bitflags::Flags>::from_bits_retain(F::WRITABLE);
    let none = <F::Flags as bitflags::Flags>::empty();
    std::thread::scope(|s| {
        let (pt, shared) = (&pt, &shared);
        s.spawn(move || {
            let to = SplitTo::Level(Level::L1);
            pt.split(&mut &*shared, va(at), huge * MIB2, to, WalkFlags::SHARED)
                .unwrap()
        });
        s.spawn(move || {
            let mut mem = shared;
            let p = pt
                .protect(&mut mem, va(at), huge * MIB2, none, w, WalkFlags::SHARED)
                .unwrap();
            p.flush(&mut CountingFlush::default(), &mut mem).unwrap();
        });
    });
    for i in (0..huge * MIB2 / KIB4).step_by(7) {
        let t = pt.translate(&&shared, va(at + i * KIB4)).unwrap();
        assert_eq!(t.pa.raw(), at + i * KIB4);
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
    for _ in 0..if cfg!(miri) { 1 } else { 20 } {
        threads_in_shared_mode::<X86_64>();
    }
}

#[test]
fn threads_in_shared_mode_ept() {
    for _ in 0..if cfg!(miri) { 1 } else { 20 } {
        threads_in_shared_mode::<Ept>();
    }
}

/// A root whose 512 entries all point back at the root (written by a visitor, or by a guest
/// that owns the table memory) once made a whole-space walk visit 512^3 tables (42 s for
/// `table_count` in a release build); every walk that can branch now refuses a table of the
/// wrong level.
fn cycles_are_bad_tables<F: PteFormat>() {
    let mut f = frames(8);
    let (mut mem, pt) = setup::<F>(&f.frames, &mut f.slots);
    let root = pt.root();
    let mut v = |_: VisitKind, ctx: &mut VisitCtx<'_, F>, _: &mut Tables<'_, TableArena<'_>>| {
        assert!(ctx.set(F::table_entry(root)));
        Ok::<_, ()>(Action::SkipSubtree)
    };
    let space = 1u64 << F::INPUT_BITS;
    pt.walk(&mut mem, va(0), space, WalkFlags::LEAF, &mut v)
        .unwrap();
    assert_eq!(pt.table_count(&mem), Err(WalkError::BadTable(root)));
    // One translation follows one path and cannot loop; what it finds in a corrupt tree is
    // not a translation to rely on, but it ends.
    let _ = pt.translate(&mem, va(0x1234));
    assert_eq!(
        pt.map(
            &mut mem,
            va(0),
            pa(0),
            2 * KIB4,
            rw::<F>(),
            MapSize::Largest,
            WalkFlags::empty()
        ),
        Err(MapError::BadTable)
    );
    // A freed table is no table either.
    let t = mem.alloc_table(Level::L3).unwrap();
    mem.free_table(t).unwrap();
    let mut v = |_: VisitKind, ctx: &mut VisitCtx<'_, F>, _: &mut Tables<'_, TableArena<'_>>| {
        assert!(ctx.set(F::table_entry(t)));
        Ok::<_, ()>(Action::SkipSubtree)
    };
    pt.walk(
        &mut mem,
        va(0),
        KIB4,
        WalkFlags::LEAF | WalkFlags::TABLE_PRE,
        &mut v,
    )
    .unwrap();
    assert_eq!(pt.table_count(&mem), Err(WalkError::BadTable(t)));
}

#[test]
fn cycles_are_bad_tables_all_formats() {
    cycles_are_bad_tables::<X86_64>();
    cycles_are_bad_tables::<X86_64La57>();
    cycles_are_bad_tables::<Ept>();
}

/// `&LockedArena` counts links under its lock without a locked read-modify-write: the
/// counts go up and down as the shared arena's do, an unlink of an unlinked table does not
/// wrap, and only a table whose count reached zero can be freed.
#[test]
fn locked_arena_link_counts() {
    use crate::spt::{TableAlloc, TableLinks, Unlinked};
    let mut f = frames(4);
    let shared = LockedArena::new(TableArena::new(&f.frames, &mut f.slots, pa(TABLES_AT)).unwrap());
    let mut mem = &shared;
    let t = mem.alloc_table(Level::L1).unwrap();
    assert_eq!(
        mem.unlink(t),
        Unlinked::Free,
        "never linked: nothing to take"
    );
    assert_eq!(mem.links(t), 0);
    mem.link(t, Level::L1);
    mem.link(t, Level::L1);
    assert_eq!(mem.links(t), 2);
    assert!(mem.is_table_at(t, Level::L1));
    assert_eq!(mem.free_table(t), Err(crate::spt::FreeError::StillLinked));
    assert_eq!(mem.unlink(t), Unlinked::StillLinked);
    assert_eq!(mem.unlink(t), Unlinked::Free);
    assert_eq!(mem.links(t), 0);
    mem.free_table(t).unwrap();
    assert_eq!(mem.unlink(t), Unlinked::Free, "a free table");
    assert_eq!(shared.allocated(), 0);
}

/// `stream_progression` (non-temporal stores, then `stream_fence`) writes what
/// `store_progression` writes, for runs of any length and alignment: the streamed body
/// starts at the first 16-byte boundary, whole groups of sixteen, and the edges take
/// atomic stores. Entries outside the run stay untouched.
#[test]
fn stream_progression_writes_every_entry_of_any_run() {
    use crate::spt::memory::{stream_fence, stream_progression};
    check_progression_fill(|entries, first, step| {
        stream_progression(entries, first, step);
        stream_fence();
    });
}

/// `stream_heads` sets head `i` to the raw word `first + i`, for runs of any length and
/// alignment, and leaves the heads around the run alone.
#[cfg(feature = "alloc")]
#[test]
fn stream_heads_writes_every_head_of_any_run() {
    use crate::rmap::RmapHead;
    use crate::spt::memory::{stream_fence, stream_heads};
    let mut heads = alloc::vec![RmapHead::from_raw(0xdead); 520];
    let lens: Vec<usize> = if cfg!(miri) {
        alloc::vec![0, 1, 17, 33]
    } else {
        (0..40).chain([47, 48, 49, 511, 512]).collect()
    };
    for start in [0, 1, 2, 3] {
        for len in lens.iter().copied() {
            let first = 0x8000_0001 + start as u64;
            stream_heads(&mut heads[start..start + len], first);
            stream_fence();
            for (i, h) in heads.iter_mut().enumerate() {
                let want = if (start..start + len).contains(&i) {
                    first + (i - start) as u64
                } else {
                    0xdead
                };
                assert_eq!(h.raw(), want, "{start} {len} {i}");
                *h = RmapHead::from_raw(0xdead);
            }
        }
    }
}

/// `store_progression` writes `first + i * step` into entry `i` whatever the run's length
/// and whether it starts on a 16-byte boundary (the SSE2 path stores pairs from the first
/// aligned entry, sixteen per loop trip, and leaves the edges to atomic stores), and wraps
/// like the split's arithmetic at the top of the address space. Entries outside the run
/// stay untouched.
#[test]
fn store_progression_writes_every_entry_of_any_run() {
    check_progression_fill(crate::spt::memory::store_progression);
}

/// Runs `fill` over runs of every start alignment and many lengths, with progressions that
/// wrap at the top of the address space and one of step 0, and checks each run and the
/// entries on either side of it.
fn check_progression_fill(fill: impl Fn(&[AtomicU64], u64, u64)) {
    let table = TableFrame(core::array::from_fn(|_| AtomicU64::new(0xdead)));
    // Under Miri (the portable path) fewer runs: the interpreter is slow.
    let lens: Vec<usize> = if cfg!(miri) {
        alloc::vec![0, 1, 2, 3, 16, 17, 33, 48]
    } else {
        (0..40).chain([47, 48, 49, 255, 256]).collect()
    };
    for (first, step) in [
        (0x1000_0000_0087, 0x1000),
        (u64::MAX - 0x3000, 0x1000),
        (7, 0),
    ] {
        for start in [0, 1, 2, 3] {
            for len in lens.iter().copied().chain([509 - start, 512 - start]) {
                fill(&table.0[start..start + len], first, step);
                // The run and the entries on either side of it.
                let around = start.saturating_sub(2)..(start + len + 2).min(ENTRIES);
                for i in around {
                    let e = &table.0[i];
                    let want = if (start..start + len).contains(&i) {
                        first.wrapping_add(step.wrapping_mul((i - start) as u64))
                    } else {
                        0xdead
                    };
                    assert_eq!(
                        e.load(Ordering::Relaxed),
                        want,
                        "{first:#x} {start} {len} {i}"
                    );
                    e.store(0xdead, Ordering::Relaxed);
                }
            }
        }
    }
}
