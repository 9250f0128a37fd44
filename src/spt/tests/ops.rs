//! map, unmap, protect, split and collapse on every format.

use super::*;

pub(super) fn map_largest<F: PteFormat>() {
    let mut f = frames(64);
    let (mut mem, pt) = setup::<F>(&f.frames, &mut f.slots);
    // 1 GiB + 2 MiB + 4 KiB starting at 1 GiB, physically at 5 GiB: one leaf of each size.
    let len = GIB1 + MIB2 + KIB4;
    map_rw(&pt, &mut mem, GIB1, 5 * GIB1, len, MapSize::Largest);
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
    map_rw(&pt, &mut mem, 8 * GIB1, KIB4, MIB2, MapSize::Largest);
    assert_maps(&pt, &mem, 8 * GIB1, KIB4, Level::L1);
    // AtMost keeps 1 GiB-aligned memory in 2 MiB pages.
    map_rw(
        &pt,
        &mut mem,
        16 * GIB1,
        16 * GIB1,
        GIB1,
        MapSize::AtMost(Level::L2),
    );
    assert_maps(
        &pt,
        &mem,
        16 * GIB1 + 3 * MIB2,
        16 * GIB1 + 3 * MIB2,
        Level::L2,
    );
}

pub(super) fn map_exact_and_refusals<F: PteFormat>() {
    let mut f = frames(64);
    let (mut mem, pt) = setup::<F>(&f.frames, &mut f.slots);
    map_rw(&pt, &mut mem, 0, GIB1, MIB2, MapSize::Exactly(Level::L1));
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
            pt.map(&mut mem, v, p, len, flags, size, WalkFlags::empty()),
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
        pt.map(
            &mut mem,
            va(MIB2),
            pa(0),
            0,
            flags,
            MapSize::Largest,
            WalkFlags::empty()
        ),
        Ok(())
    );
}

pub(super) fn map_out_of_tables<F: PteFormat>() {
    // Root + 2 tables: not enough to reach level 1 in a 4- or 5-level tree.
    let mut f = frames(3);
    let (mut mem, pt) = setup::<F>(&f.frames, &mut f.slots);
    let r = pt.map(
        &mut mem,
        va(0),
        pa(0),
        KIB4,
        rw::<F>(),
        MapSize::Largest,
        WalkFlags::empty(),
    );
    assert_eq!(r, Err(MapError::OutOfTables));
    // The tables built so far stay reachable: nothing leaks.
    assert_eq!(mem.allocated(), pt.table_count(&mem).unwrap());
}

pub(super) fn unmap_frees_after_flush<F: PteFormat>() {
    let mut f = frames(64);
    let (mut mem, mut pt) = setup::<F>(&f.frames, &mut f.slots);
    map_rw(
        &pt,
        &mut mem,
        GIB1,
        0,
        GIB1 + 4 * MIB2,
        MapSize::Exactly(Level::L2),
    );
    map_rw(
        &pt,
        &mut mem,
        4 * GIB1,
        0,
        MIB2,
        MapSize::Exactly(Level::L1),
    );
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
    let pending = pt.unmap(&mut mem, va(4 * GIB1), 8 * KIB4).unwrap();
    assert_eq!(pending.tables_to_free(), 0);
    let mut tlb = CountingFlush::default();
    pending.flush(&mut tlb, &mut mem).unwrap();
    assert_eq!((tlb.ranges, tlb.bytes, tlb.pages), (1, 8 * KIB4, 8));
    // 248 more pages: past the invalidation ceiling, one full flush.
    let pending = pt
        .unmap(&mut mem, va(4 * GIB1 + 8 * KIB4), MIB2 / 2 - 8 * KIB4)
        .unwrap();
    assert!(pending.gather().is_flush_all());
    let mut tlb = CountingFlush::default();
    pending.flush(&mut tlb, &mut mem).unwrap();
    assert_eq!((tlb.ranges, tlb.all), (0, 1));
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
    pending
        .flush(&mut CountingFlush::default(), &mut mem)
        .unwrap();
    assert_eq!(mem.allocated(), before - freed);
    assert_eq!(mem.allocated(), pt.table_count(&mem).unwrap());

    // Everything: only the root is left.
    let pending = pt.unmap(&mut mem, va(0), 8 * GIB1).unwrap();
    pending
        .flush(&mut CountingFlush::default(), &mut mem)
        .unwrap();
    assert_eq!(mem.allocated(), 1);
    assert_eq!(pt.table_count(&mem).unwrap(), 1);
    assert_eq!(
        pt.translate(&mem, va(GIB1 + MIB2)),
        Err(TranslateError::NotMapped)
    );
    // Freed tables are reused.
    map_rw(&pt, &mut mem, 0, 0, KIB4, MapSize::Largest);
    assert_eq!(mem.allocated(), F::ROOT_LEVEL.get() as usize);
}

pub(super) fn protect_leaves<F: PteFormat>() {
    let mut f = frames(64);
    let (mut mem, pt) = setup::<F>(&f.frames, &mut f.slots);
    map_rw(&pt, &mut mem, 0, 0, MIB2 + KIB4 * 2, MapSize::Largest);
    let w = <F::Flags as bitflags::Flags>::from_bits_retain(F::WRITABLE);
    let none = <F::Flags as bitflags::Flags>::empty();
    let pending = pt
        .protect(&mut mem, va(0), MIB2 + KIB4, none, w, WalkFlags::empty())
        .unwrap();
    // The 2 MiB leaf and the first 4 KiB leaf changed: two ranges, each with its page
    // size, three invalidations.
    assert_eq!(
        pending.gather().ranges(),
        &[
            FlushRange {
                start: 0,
                len: MIB2,
                level: Level::L2
            },
            FlushRange {
                start: MIB2,
                len: KIB4,
                level: Level::L1
            },
        ]
    );
    pending
        .flush(&mut CountingFlush::default(), &mut mem)
        .unwrap();
    let t = pt.translate(&mem, va(0x1000)).unwrap();
    assert_eq!(bits::<F>(t.flags) & F::WRITABLE, 0);
    assert_eq!(bits::<F>(t.flags) & F::MMU_WRITABLE, F::MMU_WRITABLE);
    assert_eq!(t.level, Level::L2);
    assert_eq!(t.pa.raw(), 0x1000);
    assert_eq!(
        bits::<F>(pt.translate(&mem, va(MIB2)).unwrap().flags) & F::WRITABLE,
        0
    );
    assert_eq!(
        bits::<F>(pt.translate(&mem, va(MIB2 + KIB4)).unwrap().flags) & F::WRITABLE,
        F::WRITABLE
    );
    // Restoring write access where mmu-writable says it may be restored.
    let pending = pt
        .protect(&mut mem, va(0), MIB2, w, none, WalkFlags::SHARED)
        .unwrap();
    pending
        .flush(&mut CountingFlush::default(), &mut mem)
        .unwrap();
    assert_eq!(
        bits::<F>(pt.translate(&mem, va(0)).unwrap().flags),
        bits::<F>(rw::<F>())
    );
    // No change, nothing to flush.
    let pending = pt
        .protect(&mut mem, va(0), MIB2, w, none, WalkFlags::empty())
        .unwrap();
    assert!(pending.is_empty());
    pending
        .flush(&mut CountingFlush::default(), &mut mem)
        .unwrap();
    let required = <F::Flags as bitflags::Flags>::from_bits_retain(F::REQUIRED);
    assert_eq!(
        pt.protect(&mut mem, va(0), KIB4, none, required, WalkFlags::empty())
            .err(),
        Some(ProtectError::BadFlags)
    );
    assert_eq!(
        pt.protect(&mut mem, va(KIB4), KIB4, none, w, WalkFlags::empty())
            .err(),
        Some(ProtectError::SplitsHugePage)
    );
    assert_eq!(
        bits::<F>(pt.translate(&mem, va(KIB4)).unwrap().flags) & F::WRITABLE,
        F::WRITABLE
    );
}

pub(super) fn split_keeps_translations<F: PteFormat>() {
    let mut f = frames(700);
    let (mut mem, pt) = setup::<F>(&f.frames, &mut f.slots);
    map_rw(&pt, &mut mem, GIB1, 3 * GIB1, GIB1, MapSize::Largest);
    map_rw(
        &pt,
        &mut mem,
        4 * GIB1,
        2 * GIB1,
        2 * MIB2,
        MapSize::Largest,
    );
    // One level: the 1 GiB leaf becomes 512 2 MiB leaves.
    assert_eq!(
        split_n(
            &pt,
            &mut mem,
            GIB1,
            GIB1,
            SplitTo::OneLevel,
            WalkFlags::empty()
        ),
        Ok(1)
    );
    assert_maps(
        &pt,
        &mem,
        GIB1 + 5 * MIB2 + 7,
        3 * GIB1 + 5 * MIB2 + 7,
        Level::L2,
    );
    // Down to 4 KiB, only for part of the range: the leaves it touches split whole.
    let n = split_n(
        &pt,
        &mut mem,
        GIB1 + MIB2 - KIB4,
        2 * KIB4,
        SplitTo::Level(Level::L1),
        WalkFlags::empty(),
    )
    .unwrap();
    assert_eq!(n, 2);
    for off in [0, MIB2 - KIB4, MIB2, 2 * MIB2 - KIB4] {
        assert_maps(&pt, &mem, GIB1 + off, 3 * GIB1 + off, Level::L1);
    }
    assert_maps(&pt, &mem, GIB1 + 2 * MIB2, 3 * GIB1 + 2 * MIB2, Level::L2);
    // Recursive split straight from 2 MiB and from 1 GiB to 4 KiB.
    assert_eq!(
        split_n(
            &pt,
            &mut mem,
            4 * GIB1,
            2 * MIB2,
            SplitTo::Level(Level::L1),
            WalkFlags::SHARED
        ),
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
        split_n(
            &pt,
            &mut mem,
            4 * GIB1,
            2 * MIB2,
            SplitTo::OneLevel,
            WalkFlags::empty()
        ),
        Ok(0)
    );
    assert_eq!(mem.allocated(), pt.table_count(&mem).unwrap());
}

pub(super) fn split_1g_to_4k<F: PteFormat>() {
    let mut f = frames(520);
    let (mut mem, pt) = setup::<F>(&f.frames, &mut f.slots);
    map_rw(&pt, &mut mem, 0, GIB1, GIB1, MapSize::Largest);
    assert_eq!(
        split_n(
            &pt,
            &mut mem,
            0,
            GIB1,
            SplitTo::Level(Level::L1),
            WalkFlags::empty()
        ),
        Ok(513)
    );
    for i in (0..GIB1 / KIB4).step_by(509) {
        assert_maps(&pt, &mem, i * KIB4 + 3, GIB1 + i * KIB4 + 3, Level::L1);
    }
    assert_eq!(mem.allocated(), pt.table_count(&mem).unwrap());
}

/// Regression (found by the `pt_raw` fuzz target in CI): a huge leaf at the top of the
/// physical address space whose flag bits are all set. Child `i` is child 0 plus `i`
/// steps, and the fill loop computed one step past the last child: that carried out of
/// the address field through the set flag bits and overflowed `u64` (a panic in debug
/// builds, a needless wrap in release).
pub(super) fn split_at_the_top_of_the_address_space<F: PteFormat>() {
    let mut f = frames(520);
    let (mut mem, pt) = setup::<F>(&f.frames, &mut f.slots);
    let top = super::super::format::ADDR_MASK & !(GIB1 - 1);
    // Every settable bit a caller may give (including NX / software bits 52..=63).
    let flags = <F::Flags as bitflags::Flags>::from_bits_retain(F::FLAGS_MASK | F::REQUIRED);
    pt.map(
        &mut mem,
        va(GIB1),
        pa(top),
        GIB1,
        flags,
        MapSize::Largest,
        WalkFlags::empty(),
    )
    .unwrap();
    let before = pt.translate(&mem, va(GIB1 + GIB1 - KIB4)).unwrap();
    assert_eq!(
        split_n(
            &pt,
            &mut mem,
            GIB1,
            GIB1,
            SplitTo::Level(Level::L1),
            WalkFlags::empty()
        ),
        Ok(513)
    );
    for i in [0, 1, 511, 512, GIB1 / KIB4 - 1] {
        assert_maps(&pt, &mem, GIB1 + i * KIB4, top + i * KIB4, Level::L1);
    }
    let after = pt.translate(&mem, va(GIB1 + GIB1 - KIB4)).unwrap();
    assert_eq!(after.pa, before.pa);
    assert_eq!(
        bits::<F>(after.flags),
        bits::<F>(before.flags),
        "{}",
        F::NAME
    );
}

pub(super) fn collapse_back<F: PteFormat>() {
    let mut f = frames(700);
    let (mut mem, mut pt) = setup::<F>(&f.frames, &mut f.slots);
    map_rw(&pt, &mut mem, GIB1, 2 * GIB1, GIB1, MapSize::Largest);
    pt.split(
        &mut mem,
        va(GIB1),
        GIB1,
        SplitTo::Level(Level::L1),
        WalkFlags::empty(),
    )
    .unwrap();
    // Hardware marks a page accessed and another one dirty.
    let ad = <F::Flags as bitflags::Flags>::from_bits_retain(F::ACCESSED | F::DIRTY);
    let none = <F::Flags as bitflags::Flags>::empty();
    pt.protect(
        &mut mem,
        va(GIB1 + 7 * KIB4),
        KIB4,
        ad,
        none,
        WalkFlags::empty(),
    )
    .unwrap()
    .flush(&mut CountingFlush::default(), &mut mem)
    .unwrap();
    let before = mem.allocated();
    let mut tlb = CountingFlush::default();
    // Only up to 2 MiB first.
    assert_eq!(
        collapse_all(&mut pt, &mut mem, &mut tlb, GIB1, GIB1, Level::L2),
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
        collapse_all(&mut pt, &mut mem, &mut tlb, 0, 4 * GIB1, Level::L3),
        Ok(1)
    );
    assert_maps(&pt, &mem, GIB1 + 12345, 2 * GIB1 + 12345, Level::L3);
    assert_eq!(mem.allocated(), pt.table_count(&mem).unwrap());
    assert_eq!(
        collapse_all(&mut pt, &mut mem, &mut tlb, 0, GIB1, Level::L1),
        Err(CollapseError::BadLevel)
    );
}

pub(super) fn collapse_refuses_mismatch<F: PteFormat>() {
    let mut f = frames(64);
    let (mut mem, mut pt) = setup::<F>(&f.frames, &mut f.slots);
    let exact = MapSize::Exactly(Level::L1);
    // Not contiguous: the second half maps elsewhere.
    map_rw(&pt, &mut mem, 0, 0, MIB2 / 2, exact);
    map_rw(&pt, &mut mem, MIB2 / 2, GIB1, MIB2 / 2, exact);
    // Contiguous but one page read-only.
    map_rw(&pt, &mut mem, MIB2, MIB2, MIB2, exact);
    let w = <F::Flags as bitflags::Flags>::from_bits_retain(F::WRITABLE);
    let none = <F::Flags as bitflags::Flags>::empty();
    pt.protect(&mut mem, va(MIB2 + KIB4), KIB4, none, w, WalkFlags::empty())
        .unwrap()
        .flush(&mut CountingFlush::default(), &mut mem)
        .unwrap();
    // Contiguous but not aligned physically.
    map_rw(&pt, &mut mem, 2 * MIB2, KIB4, MIB2, exact);
    // Not full.
    map_rw(&pt, &mut mem, 3 * MIB2, 3 * MIB2, MIB2 - KIB4, exact);
    let mut tlb = CountingFlush::default();
    assert_eq!(
        collapse_all(&mut pt, &mut mem, &mut tlb, 0, GIB1, Level::L3),
        Ok(0)
    );
    assert_eq!(tlb, CountingFlush::default());
    // Good, but the range covers only half of it.
    map_rw(&pt, &mut mem, 4 * MIB2, 4 * MIB2, MIB2, exact);
    assert_eq!(
        collapse_all(&mut pt, &mut mem, &mut tlb, 4 * MIB2, MIB2 / 2, Level::L2),
        Ok(0)
    );
    assert_eq!(
        collapse_all(&mut pt, &mut mem, &mut tlb, 4 * MIB2, MIB2, Level::L2),
        Ok(1)
    );
    assert_maps(&pt, &mem, 4 * MIB2, 4 * MIB2, Level::L2);
}
