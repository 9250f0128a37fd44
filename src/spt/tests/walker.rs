//! The walker itself: visit order, re-reads, actions, shared mode, destroy, corrupted
//! entries.

use super::*;
use crate::sync::Ordering;

pub(super) fn walker_orders_and_rereads<F: PteFormat>() {
    let mut f = frames(64);
    let (mut mem, pt) = setup::<F>(&f.frames, &mut f.slots);
    map_rw(&pt, &mut mem, 0, 0, 2 * MIB2, MapSize::Largest);
    // Visit log: (kind, level, addr).
    let mut log = Vec::new();
    let flags = WalkFlags::LEAF | WalkFlags::TABLE_PRE | WalkFlags::TABLE_POST;
    let mut v = |k: VisitKind, ctx: &mut VisitCtx<'_, F>, _: &mut Tables<'_, TableArena<'_>>| {
        log.push((k, ctx.level().get(), ctx.raw_addr()));
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
            let table = t.alloc(Level::L1).unwrap();
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

pub(super) fn shared_mode_cas<F: PteFormat>() {
    let mut f = frames(64);
    let (mut mem, pt) = setup::<F>(&f.frames, &mut f.slots);
    pt.map(
        &mut mem,
        va(0),
        pa(0),
        KIB4,
        rw::<F>(),
        MapSize::Largest,
        WalkFlags::SHARED,
    )
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
    pt.walk(&mut mem, va(0), KIB4, flags | WalkFlags::SHARED, &mut v)
        .unwrap();
    assert_eq!(outcome, Some((true, true)));
    let t = pt.translate(&mem, va(0)).unwrap();
    assert_eq!(
        bits::<F>(t.flags),
        (bits::<F>(rw::<F>()) | F::DIRTY) & !F::WRITABLE
    );
    assert_eq!(
        pt.map(
            &mut mem,
            va(0),
            pa(0),
            KIB4,
            rw::<F>(),
            MapSize::Largest,
            WalkFlags::SHARED
        ),
        Err(MapError::AlreadyMapped)
    );
}

pub(super) fn destroy_frees_all<F: PteFormat>() {
    let mut f = frames(700);
    let (mut mem, pt) = setup::<F>(&f.frames, &mut f.slots);
    map_rw(&pt, &mut mem, 0, 0, GIB1, MapSize::Largest);
    pt.split(
        &mut mem,
        va(0),
        GIB1,
        SplitTo::Level(Level::L1),
        WalkFlags::empty(),
    )
    .unwrap();
    map_rw(
        &pt,
        &mut mem,
        1 << (F::INPUT_BITS - 1),
        0,
        KIB4,
        MapSize::Largest,
    );
    assert!(mem.allocated() > 500);
    pt.destroy(&mut mem).unwrap();
    assert_eq!(mem.allocated(), 0);
}

pub(super) fn bad_table_entry<F: PteFormat>() {
    let mut f = frames(8);
    let (mut mem, mut pt) = setup::<F>(&f.frames, &mut f.slots);
    // A visitor (or a guest owning the memory) writes a table entry pointing elsewhere.
    let mut v = |_: VisitKind, ctx: &mut VisitCtx<'_, F>, _: &mut Tables<'_, TableArena<'_>>| {
        assert!(ctx.set(F::table_entry(pa(0x1000))));
        Ok::<_, ()>(Action::SkipSubtree)
    };
    pt.walk(&mut mem, va(0), KIB4, WalkFlags::LEAF, &mut v)
        .unwrap();
    assert_eq!(pt.translate(&mem, va(0)), Err(TranslateError::BadTable));
    assert_eq!(
        pt.map(
            &mut mem,
            va(0),
            pa(0),
            KIB4,
            rw::<F>(),
            MapSize::Largest,
            WalkFlags::empty()
        ),
        Err(MapError::BadTable)
    );
    assert_eq!(
        pt.unmap(&mut mem, va(0), KIB4).err(),
        Some(UnmapError::BadTable)
    );
    assert_eq!(
        pt.split(&mut mem, va(0), KIB4, SplitTo::OneLevel, WalkFlags::empty()),
        Err(SplitError::BadTable)
    );
    assert!(pt.table_count(&mem).is_err());
}
