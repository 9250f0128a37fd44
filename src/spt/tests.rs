//! Unit tests of the walker and of every operation, each run on every format.

use alloc::vec;
use alloc::vec::Vec;

use super::*;
use crate::addr::{Hpa, Level};
use crate::sync::Ordering;

const KIB4: u64 = 4 << 10;
const MIB2: u64 = 2 << 20;
const GIB1: u64 = 1 << 30;
/// Physical base of the test arenas: table addresses look like real ones, not small numbers.
const TABLES_AT: u64 = 0x7_0000_0000;

fn frames(n: usize) -> Vec<TableFrame> {
    (0..n).map(|_| TableFrame::new()).collect()
}

fn va(a: u64) -> Va {
    Va::new(a).unwrap()
}

fn pa(a: u64) -> Hpa {
    Hpa::new(a).unwrap()
}

fn rw<F: PteFormat>() -> F::Flags {
    <F::Flags as bitflags::Flags>::from_bits_retain(F::REQUIRED | F::WRITABLE | F::MMU_WRITABLE)
}

fn bits<F: PteFormat>(f: F::Flags) -> u64 {
    bitflags::Flags::bits(&f)
}

/// A fresh page table over `n` frames.
fn setup<F: PteFormat>(frames: &[TableFrame]) -> (TableArena<'_>, PageTable<F>) {
    let mut mem = TableArena::new(frames, pa(TABLES_AT)).unwrap();
    let pt = PageTable::<F>::new(&mut mem).unwrap();
    (mem, pt)
}

fn assert_maps<F: PteFormat>(
    pt: &PageTable<F>,
    mem: &TableArena<'_>,
    v: u64,
    p: u64,
    level: Level,
) {
    let t = pt.translate(mem, va(v)).unwrap();
    assert_eq!(t.pa.get(), p, "{} va {v:#x}", F::NAME);
    assert_eq!(t.level, level, "{} va {v:#x}", F::NAME);
}

fn map_largest<F: PteFormat>() {
    let f = frames(64);
    let (mut mem, mut pt) = setup::<F>(&f);
    // 1 GiB + 2 MiB + 4 KiB starting at 1 GiB, physically at 5 GiB: one leaf of each size.
    let len = GIB1 + MIB2 + KIB4;
    pt.map(
        &mut mem,
        va(GIB1),
        pa(5 * GIB1),
        len,
        rw::<F>(),
        MapSize::Largest,
    )
    .unwrap();
    assert_maps(&pt, &mem, GIB1 + 0x1234, 5 * GIB1 + 0x1234, Level::L3);
    assert_maps(&pt, &mem, 2 * GIB1 + 0x5678, 6 * GIB1 + 0x5678, Level::L2);
    assert_maps(
        &pt,
        &mem,
        2 * GIB1 + MIB2 + 8,
        6 * GIB1 + MIB2 + 8,
        Level::L1,
    );
    assert_eq!(
        pt.translate(&mem, va(2 * GIB1 + MIB2 + KIB4)),
        Err(TranslateError::NotMapped)
    );
    assert_eq!(pt.translate(&mem, va(0)), Err(TranslateError::NotMapped));
    let t = pt.translate(&mem, va(GIB1)).unwrap();
    assert_eq!(bits::<F>(t.flags), bits::<F>(rw::<F>()));
    // Root, one table per level below it down to level 1 (the 4 KiB leaf).
    assert_eq!(pt.table_count(&mem).unwrap(), F::ROOT_LEVEL.get() as usize);
    assert_eq!(mem.allocated(), pt.table_count(&mem).unwrap());

    // Misaligned physical address: nothing larger than 4 KiB fits.
    pt.map(
        &mut mem,
        va(8 * GIB1),
        pa(KIB4),
        MIB2,
        rw::<F>(),
        MapSize::Largest,
    )
    .unwrap();
    assert_maps(&pt, &mem, 8 * GIB1, KIB4, Level::L1);
    // AtMost keeps 1 GiB-aligned memory in 2 MiB pages.
    pt.map(
        &mut mem,
        va(16 * GIB1),
        pa(16 * GIB1),
        GIB1,
        rw::<F>(),
        MapSize::AtMost(Level::L2),
    )
    .unwrap();
    assert_maps(
        &pt,
        &mem,
        16 * GIB1 + 3 * MIB2,
        16 * GIB1 + 3 * MIB2,
        Level::L2,
    );
}

fn map_exact_and_refusals<F: PteFormat>() {
    let f = frames(64);
    let (mut mem, mut pt) = setup::<F>(&f);
    pt.map(
        &mut mem,
        va(0),
        pa(GIB1),
        MIB2,
        rw::<F>(),
        MapSize::Exactly(Level::L1),
    )
    .unwrap();
    for i in 0..512 {
        assert_maps(&pt, &mem, i * KIB4, GIB1 + i * KIB4, Level::L1);
    }
    let tables = mem.allocated();
    let flags = rw::<F>();
    let none = <F::Flags as bitflags::Flags>::from_bits_retain(F::WRITABLE);
    let cases = [
        (
            va(0),
            pa(0),
            KIB4,
            flags,
            MapSize::Largest,
            MapError::AlreadyMapped,
        ),
        (
            va(MIB2 - KIB4),
            pa(0),
            2 * KIB4,
            flags,
            MapSize::Largest,
            MapError::AlreadyMapped,
        ),
        (
            va(0x800),
            pa(0),
            KIB4,
            flags,
            MapSize::Largest,
            MapError::Unaligned,
        ),
        (
            va(MIB2),
            pa(0x800),
            KIB4,
            flags,
            MapSize::Largest,
            MapError::Unaligned,
        ),
        (
            va(MIB2),
            pa(0),
            100,
            flags,
            MapSize::Largest,
            MapError::Unaligned,
        ),
        (
            va(MIB2),
            pa(0),
            KIB4,
            none,
            MapSize::Largest,
            MapError::BadFlags,
        ),
        (
            va(3 * MIB2),
            pa(0),
            KIB4,
            flags,
            MapSize::Exactly(Level::L2),
            MapError::Unaligned,
        ),
        (
            va(0),
            pa(0),
            GIB1,
            flags,
            MapSize::Exactly(Level::L4),
            MapError::UnsupportedSize,
        ),
        // A 2 MiB leaf where the 4 KiB table of the first mapping is.
        (
            va(0),
            pa(0),
            MIB2,
            flags,
            MapSize::Exactly(Level::L2),
            MapError::TableInTheWay,
        ),
        (
            va((1 << F::INPUT_BITS) - KIB4),
            pa(0),
            2 * KIB4,
            flags,
            MapSize::Largest,
            MapError::OutOfRange,
        ),
        (
            va(MIB2),
            pa((1 << 52) - KIB4),
            2 * KIB4,
            flags,
            MapSize::Largest,
            MapError::OutOfRange,
        ),
    ];
    for (v, p, len, flags, size, err) in cases {
        assert_eq!(
            pt.map(&mut mem, v, p, len, flags, size),
            Err(err),
            "{} {v} {len:#x}",
            F::NAME
        );
        assert_eq!(
            mem.allocated(),
            tables,
            "{}: an error changes nothing",
            F::NAME
        );
    }
    assert_maps(&pt, &mem, 0, GIB1, Level::L1);
    assert_eq!(pt.translate(&mem, va(MIB2)), Err(TranslateError::NotMapped));
    assert_eq!(
        pt.map(&mut mem, va(MIB2), pa(0), 0, flags, MapSize::Largest),
        Ok(())
    );
}

fn map_out_of_tables<F: PteFormat>() {
    // Root + 2 tables: not enough to reach level 1 in a 4- or 5-level tree.
    let f = frames(3);
    let (mut mem, mut pt) = setup::<F>(&f);
    let r = pt.map(&mut mem, va(0), pa(0), KIB4, rw::<F>(), MapSize::Largest);
    assert_eq!(r, Err(MapError::OutOfTables));
    // The tables built so far stay reachable: nothing leaks.
    assert_eq!(mem.allocated(), pt.table_count(&mem).unwrap());
}

fn unmap_frees_after_flush<F: PteFormat>() {
    let f = frames(64);
    let (mut mem, mut pt) = setup::<F>(&f);
    pt.map(
        &mut mem,
        va(GIB1),
        pa(0),
        GIB1 + 4 * MIB2,
        rw::<F>(),
        MapSize::Exactly(Level::L2),
    )
    .unwrap();
    pt.map(
        &mut mem,
        va(4 * GIB1),
        pa(0),
        MIB2,
        rw::<F>(),
        MapSize::Exactly(Level::L1),
    )
    .unwrap();
    let before = mem.allocated();
    // Part of a 2 MiB page: refused, nothing changes.
    assert_eq!(
        pt.unmap(&mut mem, va(GIB1 + KIB4), KIB4).err(),
        Some(UnmapError::SplitsHugePage)
    );
    assert_eq!(
        pt.unmap(&mut mem, va(GIB1), MIB2 + KIB4).err(),
        Some(UnmapError::SplitsHugePage)
    );
    assert_eq!(
        pt.unmap(&mut mem, va(1), KIB4).err(),
        Some(UnmapError::Unaligned)
    );
    assert_maps(&pt, &mem, GIB1, 0, Level::L2);

    // Half of the 4 KiB pages: the level-1 table stays.
    let pending = pt.unmap(&mut mem, va(4 * GIB1), MIB2 / 2).unwrap();
    assert_eq!(pending.tables_to_free(), 0);
    let mut tlb = CountingFlush::default();
    pending.flush(&mut tlb, &mut mem);
    assert_eq!((tlb.ranges, tlb.bytes), (1, MIB2 / 2));
    assert_eq!(
        pt.translate(&mem, va(4 * GIB1)),
        Err(TranslateError::NotMapped)
    );
    assert_maps(&pt, &mem, 4 * GIB1 + MIB2 / 2, MIB2 / 2, Level::L1);

    // The other half (and a hole after it): the level-1 table empties, then its parents.
    let pending = pt.unmap(&mut mem, va(4 * GIB1 + MIB2 / 2), GIB1).unwrap();
    assert!(pending.tables_to_free() >= 2);
    // Until the flush, the unlinked tables are still allocated.
    assert_eq!(mem.allocated(), before);
    let freed = pending.tables_to_free();
    pending.flush(&mut CountingFlush::default(), &mut mem);
    assert_eq!(mem.allocated(), before - freed);
    assert_eq!(mem.allocated(), pt.table_count(&mem).unwrap());

    // Everything: only the root is left.
    let pending = pt.unmap(&mut mem, va(0), 8 * GIB1).unwrap();
    pending.flush(&mut CountingFlush::default(), &mut mem);
    assert_eq!(mem.allocated(), 1);
    assert_eq!(pt.table_count(&mem).unwrap(), 1);
    assert_eq!(
        pt.translate(&mem, va(GIB1 + MIB2)),
        Err(TranslateError::NotMapped)
    );
    // Freed tables are reused.
    pt.map(&mut mem, va(0), pa(0), KIB4, rw::<F>(), MapSize::Largest)
        .unwrap();
    assert_eq!(mem.allocated(), F::ROOT_LEVEL.get() as usize);
}

fn protect_leaves<F: PteFormat>() {
    let f = frames(64);
    let (mut mem, mut pt) = setup::<F>(&f);
    pt.map(
        &mut mem,
        va(0),
        pa(0),
        MIB2 + KIB4 * 2,
        rw::<F>(),
        MapSize::Largest,
    )
    .unwrap();
    let w = <F::Flags as bitflags::Flags>::from_bits_retain(F::WRITABLE);
    let none = <F::Flags as bitflags::Flags>::empty();
    let pending = pt.protect(&mut mem, va(0), MIB2 + KIB4, none, w).unwrap();
    // The 2 MiB leaf and the first 4 KiB leaf changed: one merged range.
    assert_eq!(pending.gather().ranges().count(), 1);
    pending.flush(&mut CountingFlush::default(), &mut mem);
    let t = pt.translate(&mem, va(0x1000)).unwrap();
    assert_eq!(bits::<F>(t.flags) & F::WRITABLE, 0);
    assert_eq!(bits::<F>(t.flags) & F::MMU_WRITABLE, F::MMU_WRITABLE);
    assert_eq!(t.level, Level::L2);
    assert_eq!(t.pa.get(), 0x1000);
    assert_eq!(
        bits::<F>(pt.translate(&mem, va(MIB2)).unwrap().flags) & F::WRITABLE,
        0
    );
    assert_eq!(
        bits::<F>(pt.translate(&mem, va(MIB2 + KIB4)).unwrap().flags) & F::WRITABLE,
        F::WRITABLE
    );
    // Restoring write access where mmu-writable says it may be restored.
    let pending = pt.protect_shared(&mut mem, va(0), MIB2, w, none).unwrap();
    pending.flush(&mut CountingFlush::default(), &mut mem);
    assert_eq!(
        bits::<F>(pt.translate(&mem, va(0)).unwrap().flags),
        bits::<F>(rw::<F>())
    );
    // No change, nothing to flush.
    let pending = pt.protect(&mut mem, va(0), MIB2, w, none).unwrap();
    assert!(pending.is_empty());
    pending.flush(&mut CountingFlush::default(), &mut mem);
    let required = <F::Flags as bitflags::Flags>::from_bits_retain(F::REQUIRED);
    assert_eq!(
        pt.protect(&mut mem, va(0), KIB4, none, required).err(),
        Some(ProtectError::BadFlags)
    );
    assert_eq!(
        pt.protect(&mut mem, va(KIB4), KIB4, none, w).err(),
        Some(ProtectError::SplitsHugePage)
    );
    assert_eq!(
        bits::<F>(pt.translate(&mem, va(KIB4)).unwrap().flags) & F::WRITABLE,
        F::WRITABLE
    );
}

fn split_keeps_translations<F: PteFormat>() {
    let f = frames(700);
    let (mut mem, mut pt) = setup::<F>(&f);
    pt.map(
        &mut mem,
        va(GIB1),
        pa(3 * GIB1),
        GIB1,
        rw::<F>(),
        MapSize::Largest,
    )
    .unwrap();
    pt.map(
        &mut mem,
        va(4 * GIB1),
        pa(2 * GIB1),
        2 * MIB2,
        rw::<F>(),
        MapSize::Largest,
    )
    .unwrap();
    // One level: the 1 GiB leaf becomes 512 2 MiB leaves.
    assert_eq!(pt.split(&mut mem, va(GIB1), GIB1, SplitTo::OneLevel), Ok(1));
    assert_maps(
        &pt,
        &mem,
        GIB1 + 5 * MIB2 + 7,
        3 * GIB1 + 5 * MIB2 + 7,
        Level::L2,
    );
    // Down to 4 KiB, only for part of the range: the leaves it touches split whole.
    let n = pt
        .split(
            &mut mem,
            va(GIB1 + MIB2 - KIB4),
            2 * KIB4,
            SplitTo::Level(Level::L1),
        )
        .unwrap();
    assert_eq!(n, 2);
    for off in [0, MIB2 - KIB4, MIB2, 2 * MIB2 - KIB4] {
        assert_maps(&pt, &mem, GIB1 + off, 3 * GIB1 + off, Level::L1);
    }
    assert_maps(&pt, &mem, GIB1 + 2 * MIB2, 3 * GIB1 + 2 * MIB2, Level::L2);
    // Recursive split straight from 2 MiB and from 1 GiB to 4 KiB.
    assert_eq!(
        pt.split_shared(&mut mem, va(4 * GIB1), 2 * MIB2, SplitTo::Level(Level::L1)),
        Ok(2)
    );
    for i in 0..1024 {
        assert_maps(
            &pt,
            &mem,
            4 * GIB1 + i * KIB4,
            2 * GIB1 + i * KIB4,
            Level::L1,
        );
    }
    let t = pt.translate(&mem, va(4 * GIB1)).unwrap();
    assert_eq!(bits::<F>(t.flags), bits::<F>(rw::<F>()));
    // Nothing left to split.
    assert_eq!(
        pt.split(&mut mem, va(4 * GIB1), 2 * MIB2, SplitTo::OneLevel),
        Ok(0)
    );
    assert_eq!(mem.allocated(), pt.table_count(&mem).unwrap());
}

fn split_1g_to_4k<F: PteFormat>() {
    let f = frames(520);
    let (mut mem, mut pt) = setup::<F>(&f);
    pt.map(&mut mem, va(0), pa(GIB1), GIB1, rw::<F>(), MapSize::Largest)
        .unwrap();
    assert_eq!(
        pt.split(&mut mem, va(0), GIB1, SplitTo::Level(Level::L1)),
        Ok(513)
    );
    for i in (0..GIB1 / KIB4).step_by(509) {
        assert_maps(&pt, &mem, i * KIB4 + 3, GIB1 + i * KIB4 + 3, Level::L1);
    }
    assert_eq!(mem.allocated(), pt.table_count(&mem).unwrap());
}

fn collapse_back<F: PteFormat>() {
    let f = frames(700);
    let (mut mem, mut pt) = setup::<F>(&f);
    pt.map(
        &mut mem,
        va(GIB1),
        pa(2 * GIB1),
        GIB1,
        rw::<F>(),
        MapSize::Largest,
    )
    .unwrap();
    pt.split(&mut mem, va(GIB1), GIB1, SplitTo::Level(Level::L1))
        .unwrap();
    // Hardware marks a page accessed and another one dirty.
    let ad = <F::Flags as bitflags::Flags>::from_bits_retain(F::ACCESSED | F::DIRTY);
    let none = <F::Flags as bitflags::Flags>::empty();
    pt.protect(&mut mem, va(GIB1 + 7 * KIB4), KIB4, ad, none)
        .unwrap()
        .flush(&mut CountingFlush::default(), &mut mem);
    let before = mem.allocated();
    let mut tlb = CountingFlush::default();
    // Only up to 2 MiB first.
    assert_eq!(
        pt.collapse(&mut mem, &mut tlb, va(GIB1), GIB1, Level::L2),
        Ok(512)
    );
    assert_eq!(mem.allocated(), before - 512);
    assert_maps(&pt, &mem, GIB1 + MIB2 + 5, 2 * GIB1 + MIB2 + 5, Level::L2);
    let t = pt.translate(&mem, va(GIB1)).unwrap();
    assert_eq!(
        bits::<F>(t.flags),
        bits::<F>(rw::<F>()) | F::ACCESSED | F::DIRTY
    );
    assert!(tlb.ranges + tlb.all > 0);
    // Then the 2 MiB leaves into one 1 GiB leaf.
    assert_eq!(
        pt.collapse(&mut mem, &mut tlb, va(0), 4 * GIB1, Level::L3),
        Ok(1)
    );
    assert_maps(&pt, &mem, GIB1 + 12345, 2 * GIB1 + 12345, Level::L3);
    assert_eq!(mem.allocated(), pt.table_count(&mem).unwrap());
    assert_eq!(
        pt.collapse(&mut mem, &mut tlb, va(0), GIB1, Level::L1),
        Err(CollapseError::BadLevel)
    );
}

fn collapse_refuses_mismatch<F: PteFormat>() {
    let f = frames(64);
    let (mut mem, mut pt) = setup::<F>(&f);
    let exact = MapSize::Exactly(Level::L1);
    // Not contiguous: the second half maps elsewhere.
    pt.map(&mut mem, va(0), pa(0), MIB2 / 2, rw::<F>(), exact)
        .unwrap();
    pt.map(&mut mem, va(MIB2 / 2), pa(GIB1), MIB2 / 2, rw::<F>(), exact)
        .unwrap();
    // Contiguous but one page read-only.
    pt.map(&mut mem, va(MIB2), pa(MIB2), MIB2, rw::<F>(), exact)
        .unwrap();
    let w = <F::Flags as bitflags::Flags>::from_bits_retain(F::WRITABLE);
    let none = <F::Flags as bitflags::Flags>::empty();
    pt.protect(&mut mem, va(MIB2 + KIB4), KIB4, none, w)
        .unwrap()
        .flush(&mut CountingFlush::default(), &mut mem);
    // Contiguous but not aligned physically.
    pt.map(&mut mem, va(2 * MIB2), pa(KIB4), MIB2, rw::<F>(), exact)
        .unwrap();
    // Not full.
    pt.map(
        &mut mem,
        va(3 * MIB2),
        pa(3 * MIB2),
        MIB2 - KIB4,
        rw::<F>(),
        exact,
    )
    .unwrap();
    let mut tlb = CountingFlush::default();
    assert_eq!(
        pt.collapse(&mut mem, &mut tlb, va(0), GIB1, Level::L3),
        Ok(0)
    );
    assert_eq!(tlb, CountingFlush::default());
    // Good, but the range covers only half of it.
    pt.map(&mut mem, va(4 * MIB2), pa(4 * MIB2), MIB2, rw::<F>(), exact)
        .unwrap();
    assert_eq!(
        pt.collapse(&mut mem, &mut tlb, va(4 * MIB2), MIB2 / 2, Level::L2),
        Ok(0)
    );
    assert_eq!(
        pt.collapse(&mut mem, &mut tlb, va(4 * MIB2), MIB2, Level::L2),
        Ok(1)
    );
    assert_maps(&pt, &mem, 4 * MIB2, 4 * MIB2, Level::L2);
}

fn walker_orders_and_rereads<F: PteFormat>() {
    let f = frames(64);
    let (mut mem, mut pt) = setup::<F>(&f);
    pt.map(
        &mut mem,
        va(0),
        pa(0),
        2 * MIB2,
        rw::<F>(),
        MapSize::Largest,
    )
    .unwrap();
    // Visit log: (kind, level, addr).
    let mut log = Vec::new();
    let flags = WalkFlags::LEAF | WalkFlags::TABLE_PRE | WalkFlags::TABLE_POST;
    let mut v = |k: VisitKind, ctx: &mut VisitCtx<'_, F>, _: &mut Tables<'_, TableArena<'_>>| {
        log.push((k, ctx.level().get(), ctx.addr().get()));
        Ok::<_, ()>(Action::Continue)
    };
    pt.walk(&mut mem, va(MIB2), KIB4, flags, &mut v).unwrap();
    let top = F::ROOT_LEVEL.get();
    let mut expect = Vec::new();
    for l in (3..=top).rev() {
        expect.push((VisitKind::TablePre, l, 0));
    }
    expect.push((VisitKind::Leaf, 2, MIB2));
    for l in 3..=top {
        expect.push((VisitKind::TablePost, l, 0));
    }
    assert_eq!(log, expect);

    // A visitor that replaces the huge leaf by a table (a split by hand) gets it walked.
    let mut leaves = 0;
    let mut v = |k: VisitKind, ctx: &mut VisitCtx<'_, F>, t: &mut Tables<'_, TableArena<'_>>| {
        if k == VisitKind::Leaf && F::is_huge(ctx.old(), ctx.level()) {
            let table = t.alloc().unwrap();
            let entries = t.table(table).unwrap();
            let first = F::split_child(ctx.old(), ctx.level());
            for (i, e) in entries.iter().enumerate() {
                e.store(first + ((i as u64) << 12), Ordering::Relaxed);
            }
            assert!(ctx.set(F::table_entry(table)));
        } else if k == VisitKind::Leaf {
            leaves += 1;
        }
        Ok::<_, ()>(Action::Continue)
    };
    pt.walk(&mut mem, va(0), MIB2, WalkFlags::LEAF, &mut v)
        .unwrap();
    assert_eq!(leaves, 512);
    assert_maps(&pt, &mem, 0x3000, 0x3000, Level::L1);

    // Stop ends the walk, SkipSubtree skips, errors come back as Visitor.
    let mut seen = 0;
    let mut v = |_: VisitKind, _: &mut VisitCtx<'_, F>, _: &mut Tables<'_, TableArena<'_>>| {
        seen += 1;
        Ok::<_, ()>(if seen == 3 {
            Action::Stop
        } else {
            Action::Continue
        })
    };
    pt.walk(&mut mem, va(0), MIB2, WalkFlags::LEAF, &mut v)
        .unwrap();
    assert_eq!(seen, 3);
    let mut seen = 0;
    let mut v = |_: VisitKind, _: &mut VisitCtx<'_, F>, _: &mut Tables<'_, TableArena<'_>>| {
        seen += 1;
        Ok::<_, ()>(Action::SkipSubtree)
    };
    pt.walk(
        &mut mem,
        va(0),
        GIB1,
        WalkFlags::LEAF | WalkFlags::TABLE_PRE,
        &mut v,
    )
    .unwrap();
    assert_eq!(seen, 1);
    let mut v = |_: VisitKind, _: &mut VisitCtx<'_, F>, _: &mut Tables<'_, TableArena<'_>>| {
        Err::<Action, u32>(7)
    };
    assert_eq!(
        pt.walk(&mut mem, va(0), KIB4, WalkFlags::LEAF, &mut v),
        Err(WalkError::Visitor(7))
    );
    let mut v = |_: VisitKind, _: &mut VisitCtx<'_, F>, _: &mut Tables<'_, TableArena<'_>>| {
        Ok::<_, ()>(Action::Continue)
    };
    assert_eq!(
        pt.walk(
            &mut mem,
            va(0),
            (1 << F::INPUT_BITS) + 1,
            WalkFlags::LEAF,
            &mut v
        ),
        Err(WalkError::OutOfRange)
    );
}

fn shared_mode_cas<F: PteFormat>() {
    let f = frames(64);
    let (mut mem, pt) = setup::<F>(&f);
    pt.map_shared(&mut mem, va(0), pa(0), KIB4, rw::<F>(), MapSize::Largest)
        .unwrap();
    // Another CPU changes the leaf between our read and our update: the exchange fails and
    // the visitor sees the value that won.
    let mut l1_table = None;
    let mut outcome = None;
    let mut v = |k: VisitKind, ctx: &mut VisitCtx<'_, F>, t: &mut Tables<'_, TableArena<'_>>| {
        assert!(ctx.is_shared());
        if k == VisitKind::TablePre && ctx.level() == Level::L2 {
            l1_table = Some(F::table_addr(ctx.old()));
        }
        if k == VisitKind::Leaf {
            let seen = ctx.old();
            let winner = seen | F::DIRTY;
            t.table(l1_table.unwrap()).unwrap()[0].store(winner, Ordering::Relaxed);
            let lost = !ctx.set(seen & !F::WRITABLE);
            outcome = Some((lost, ctx.old() == winner));
            // Trying again from the current value succeeds.
            assert!(ctx.set(winner & !F::WRITABLE));
        }
        Ok::<_, ()>(Action::Continue)
    };
    let flags = WalkFlags::LEAF | WalkFlags::TABLE_PRE;
    pt.walk_shared(&mut mem, va(0), KIB4, flags, &mut v)
        .unwrap();
    assert_eq!(outcome, Some((true, true)));
    let t = pt.translate(&mem, va(0)).unwrap();
    assert_eq!(
        bits::<F>(t.flags),
        (bits::<F>(rw::<F>()) | F::DIRTY) & !F::WRITABLE
    );
    assert_eq!(
        pt.map_shared(&mut mem, va(0), pa(0), KIB4, rw::<F>(), MapSize::Largest),
        Err(MapError::AlreadyMapped)
    );
}

fn destroy_frees_all<F: PteFormat>() {
    let f = frames(700);
    let (mut mem, mut pt) = setup::<F>(&f);
    pt.map(&mut mem, va(0), pa(0), GIB1, rw::<F>(), MapSize::Largest)
        .unwrap();
    pt.split(&mut mem, va(0), GIB1, SplitTo::Level(Level::L1))
        .unwrap();
    pt.map(
        &mut mem,
        va(1 << (F::INPUT_BITS - 1)),
        pa(0),
        KIB4,
        rw::<F>(),
        MapSize::Largest,
    )
    .unwrap();
    assert!(mem.allocated() > 500);
    pt.destroy(&mut mem).unwrap();
    assert_eq!(mem.allocated(), 0);
}

fn bad_table_entry<F: PteFormat>() {
    let f = frames(8);
    let (mut mem, mut pt) = setup::<F>(&f);
    // A visitor (or a guest owning the memory) writes a table entry pointing elsewhere.
    let mut v = |_: VisitKind, ctx: &mut VisitCtx<'_, F>, _: &mut Tables<'_, TableArena<'_>>| {
        assert!(ctx.set(F::table_entry(pa(0x1000))));
        Ok::<_, ()>(Action::SkipSubtree)
    };
    pt.walk(&mut mem, va(0), KIB4, WalkFlags::LEAF, &mut v)
        .unwrap();
    assert_eq!(pt.translate(&mem, va(0)), Err(TranslateError::BadTable));
    assert_eq!(
        pt.map(&mut mem, va(0), pa(0), KIB4, rw::<F>(), MapSize::Largest),
        Err(MapError::BadTable)
    );
    assert_eq!(
        pt.unmap(&mut mem, va(0), KIB4).err(),
        Some(UnmapError::BadTable)
    );
    assert_eq!(
        pt.split(&mut mem, va(0), KIB4, SplitTo::OneLevel),
        Err(SplitError::BadTable)
    );
    assert!(pt.table_count(&mem).is_err());
}

macro_rules! per_format {
    ($($test:ident),* $(,)?) => {
        mod x86_64_4level {
            $(#[test] fn $test() { super::$test::<super::X86_64>(); })*
        }
        mod x86_64_la57 {
            $(#[test] fn $test() { super::$test::<super::X86_64La57>(); })*
        }
        mod ept {
            $(#[test] fn $test() { super::$test::<super::Ept>(); })*
        }
    };
}

per_format!(
    map_largest,
    map_exact_and_refusals,
    map_out_of_tables,
    unmap_frees_after_flush,
    protect_leaves,
    split_keeps_translations,
    split_1g_to_4k,
    collapse_back,
    collapse_refuses_mismatch,
    walker_orders_and_rereads,
    shared_mode_cas,
    destroy_frees_all,
    bad_table_entry,
);

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
