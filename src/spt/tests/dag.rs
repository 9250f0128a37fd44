//! The substrate of a shadow MMU: entry handles, walks from any table, a child table shared
//! by two parents (a DAG), splitting one entry into a caller-provided child, tables from a
//! caller's cache with resumption, and the per-table maximum leaf level.

use alloc::vec::Vec;

use super::*;

/// The handle of the entry that maps `v` at `level` (found by a walk).
fn handle_at<F: PteFormat>(
    pt: &PageTable<F>,
    mem: &mut TableArena<'_>,
    v: u64,
    level: Level,
) -> EntryRef {
    let mut found = None;
    let mut visit =
        |_: VisitKind, ctx: &mut VisitCtx<'_, F>, _: &mut Tables<'_, TableArena<'_>>| {
            if ctx.level() == level {
                found = Some(ctx.entry());
                return Ok::<_, ()>(Action::Stop);
            }
            Ok(Action::Continue)
        };
    pt.walk(
        mem,
        va(v),
        KIB4,
        WalkFlags::LEAF | WalkFlags::TABLE_PRE,
        &mut visit,
    )
    .unwrap();
    found.unwrap()
}

/// One child table linked from two parents: split through an entry handle with a callback
/// per new leaf, link the same child under a second parent, unmap through one parent while
/// the other keeps the child alive, then let the last parent free it.
pub(super) fn two_parent_dag<F: PteFormat>() {
    let mut f = frames(16);
    let (mut mem, mut pt1) = setup::<F>(&f.frames, &mut f.slots);
    let mut pt2 = PageTable::<F>::new(&mut mem).unwrap();
    let huge = MapSize::Exactly(Level::L2);
    let excl = WalkFlags::empty();
    for pt in [&pt1, &pt2] {
        map_rw(pt, &mut mem, 0, GIB1, MIB2, huge);
    }
    assert_eq!(mem.allocated(), 2 * (F::ROOT_LEVEL.get() as usize - 1));

    // Split pt1's 2 MiB leaf through its handle, as an rmap walk would (no walk from the
    // root): every new leaf is reported once, with a handle that reads it back.
    let h1 = handle_at(&pt1, &mut mem, 0, Level::L2);
    let child = mem.alloc_table_to_fill(Level::L1).unwrap();
    let mut leaves = Vec::new();
    let mut ctx = h1.ctx::<F, _>(&mem, va(0), Level::L2, excl).unwrap();
    let done = split_entry(
        &mem,
        &mut ctx,
        SplitChild::Fresh(child),
        |h, a: F::In, e| {
            leaves.push((h, a.raw(), e));
        },
    )
    .unwrap();
    assert_eq!((done.child, done.filled, done.kept), (child, 512, 0));
    assert!(!done.needs_flush);
    assert_eq!(leaves.len(), 512);
    for (i, &(h, a, e)) in leaves.iter().enumerate() {
        assert_eq!((h.table(), h.index(), a), (child, i, i as u64 * KIB4));
        assert_eq!(h.load(&mem), Some(e));
        assert_eq!(F::leaf_addr(e, Level::L1).get(), GIB1 + i as u64 * KIB4);
    }
    assert_eq!(mem.links(child), 1);

    // pt2's 2 MiB leaf becomes a link to the same child (KVM reuses the shadow page with
    // the same gfn and role): nothing to fill, no callback, no flush.
    let h2 = handle_at(&pt2, &mut mem, 0, Level::L2);
    assert_ne!(h1.table(), h2.table());
    let mut ctx = h2.ctx::<F, _>(&mem, va(0), Level::L2, excl).unwrap();
    let mut calls = 0;
    let done = split_entry(&mem, &mut ctx, SplitChild::Existing(child), |_, _, _| {
        calls += 1
    })
    .unwrap();
    assert_eq!(
        (done.filled, done.kept, done.needs_flush, calls),
        (0, 512, false, 0)
    );
    assert_eq!(mem.links(child), 2);
    for pt in [&pt1, &pt2] {
        assert_maps(pt, &mem, 0x5123, GIB1 + 0x5123, Level::L1);
    }
    // A table counted through each parent.
    assert_eq!(pt1.table_count(&mem).unwrap(), F::ROOT_LEVEL.get() as usize);
    assert_eq!(mem.allocated(), 2 * (F::ROOT_LEVEL.get() as usize - 1) + 1);

    // Unmap through pt1: its own tables go after the flush, the shared child stays whole.
    let before = mem.allocated();
    let pending = pt1.unmap(&mut mem, va(0), MIB2).unwrap();
    assert_eq!(pending.tables_to_free(), F::ROOT_LEVEL.get() as usize - 2);
    pending
        .flush(&mut CountingFlush::default(), &mut mem)
        .unwrap();
    assert_eq!(mem.allocated(), before - (F::ROOT_LEVEL.get() as usize - 2));
    assert_eq!(mem.links(child), 1);
    assert_eq!(
        pt1.translate(&mem, va(0x5000)),
        Err(TranslateError::NotMapped)
    );
    assert_maps(&pt2, &mem, 0x5123, GIB1 + 0x5123, Level::L1);
    assert!(leaves.iter().all(|&(h, _, e)| h.load(&mem) == Some(e)));
    // The child is still linked: freeing it is refused.
    assert_eq!(mem.free_table(child), Err(FreeError::StillLinked));

    // The last parent lets go: now the child is freed with the rest.
    let pending = pt2.unmap(&mut mem, va(0), MIB2).unwrap();
    assert_eq!(pending.tables_to_free(), F::ROOT_LEVEL.get() as usize - 1);
    pending
        .flush(&mut CountingFlush::default(), &mut mem)
        .unwrap();
    assert_eq!(mem.allocated(), 2);
    pt1.destroy(&mut mem).unwrap();
    pt2.destroy(&mut mem).unwrap();
    assert_eq!(mem.allocated(), 0);
}

/// Maps `[0, 2 MiB)` to `pa` with a 2 MiB leaf in both trees, then splits both leaves into
/// one child table they share (KVM: two parents of one shadow page). Returns the child.
fn share_child<F: PteFormat>(mem: &mut TableArena<'_>, pts: [&PageTable<F>; 2], pa: u64) -> Hpa {
    for pt in pts {
        map_rw(pt, mem, 0, pa, MIB2, MapSize::Exactly(Level::L2));
    }
    let child = mem.alloc_table_to_fill(Level::L1).unwrap();
    for pt in pts {
        let h = handle_at(pt, mem, 0, Level::L2);
        let mut ctx = h
            .ctx::<F, _>(mem, va(0), Level::L2, WalkFlags::empty())
            .unwrap();
        let kind = if mem.links(child) == 0 {
            SplitChild::Fresh(child)
        } else {
            SplitChild::Existing(child)
        };
        split_entry(mem, &mut ctx, kind, |_, _, _| {}).unwrap();
    }
    child
}

/// `destroy` of one tree leaves a child another tree still links.
pub(super) fn destroy_keeps_shared_child<F: PteFormat>() {
    let mut f = frames(16);
    let (mut mem, pt1) = setup::<F>(&f.frames, &mut f.slots);
    let pt2 = PageTable::<F>::new(&mut mem).unwrap();
    let child = share_child(&mut mem, [&pt1, &pt2], 0);
    pt1.destroy(&mut mem).unwrap();
    assert_maps(&pt2, &mem, 0x7000, 0x7000, Level::L1);
    assert_eq!(mem.links(child), 1);
    pt2.destroy(&mut mem).unwrap();
    assert_eq!(mem.allocated(), 0);
}

/// Regression (promise audit): `unmap` promised a table linked from another parent is
/// "kept whole", but a range covering part of it went in and cleared its leaves — for both
/// parents — and the flush named only this parent's addresses. Now such a range is refused
/// before anything changes; the whole table's range unlinks it as before. `protect` through
/// one parent changes the shared leaves for both, so its flush is of everything.
pub(super) fn a_shared_table_is_changed_whole_or_flushed_everywhere<F: PteFormat>() {
    let mut f = frames(16);
    let (mut mem, mut pt1) = setup::<F>(&f.frames, &mut f.slots);
    let pt2 = PageTable::<F>::new(&mut mem).unwrap();
    let excl = WalkFlags::empty();
    let child = share_child(&mut mem, [&pt1, &pt2], GIB1);
    assert_eq!(mem.links(child), 2);
    let allocated = mem.allocated();
    for (start, len) in [(0, KIB4), (MIB2 - KIB4, KIB4), (KIB4, MIB2)] {
        assert_eq!(
            pt1.unmap(&mut mem, va(start), len).map(|_| ()),
            Err(UnmapError::SplitsSharedTable)
        );
    }
    assert_eq!(mem.allocated(), allocated);
    for pt in [&pt1, &pt2] {
        assert_maps(pt, &mem, 0, GIB1, Level::L1);
        assert_maps(pt, &mem, MIB2 - KIB4, GIB1 + MIB2 - KIB4, Level::L1);
    }
    // Write-protecting one page through pt1 changes it for pt2 as well: flush everything.
    let none = <F::Flags as bitflags::Flags>::empty();
    let w = <F::Flags as bitflags::Flags>::from_bits_retain(F::WRITABLE);
    let pending = pt1
        .protect(&mut mem, va(0x3000), KIB4, none, w, excl)
        .unwrap();
    assert!(pending.gather().is_flush_all());
    pending
        .flush(&mut CountingFlush::default(), &mut mem)
        .unwrap();
    let t = pt2.translate(&mem, va(0x3000)).unwrap();
    assert_eq!(bits::<F>(t.flags) & F::WRITABLE, 0);
    // Not shared any more after pt1 lets go of the whole range: flushes are ranges again.
    let pending = pt1.unmap(&mut mem, va(0), MIB2).unwrap();
    pending
        .flush(&mut CountingFlush::default(), &mut mem)
        .unwrap();
    assert_eq!(mem.links(child), 1);
    let pending = pt2
        .protect(&mut mem, va(0x4000), KIB4, none, w, excl)
        .unwrap();
    assert!(!pending.gather().is_flush_all());
    pending
        .flush(&mut CountingFlush::default(), &mut mem)
        .unwrap();
}

/// `split_entry` refuses, changing nothing: an entry that is not a huge leaf, a child
/// outside table memory, an existing child mapping other pages.
pub(super) fn split_entry_refusals<F: PteFormat>() {
    let mut f = frames(16);
    let (mut mem, pt) = setup::<F>(&f.frames, &mut f.slots);
    let excl = WalkFlags::empty();
    map_rw(&pt, &mut mem, 0, GIB1, MIB2, MapSize::Exactly(Level::L2));
    let h = handle_at(&pt, &mut mem, 0, Level::L2);
    let huge = h.load(&mem).unwrap();
    let child = mem.alloc_table(Level::L1).unwrap();
    let mut ctx = h.ctx::<F, _>(&mem, va(0), Level::L2, excl).unwrap();
    assert_eq!(
        split_entry(&mem, &mut ctx, SplitChild::Fresh(pa(0x1000)), |_, _, _| {}),
        Err(SplitEntryError::BadChild)
    );
    // An existing child whose entry 5 maps a page the huge leaf does not.
    let stray = F::leaf_entry(pa(0x1234_5000), Level::L1, bits::<F>(rw::<F>()));
    let h5 = EntryRef::new(child, 5).unwrap();
    let mut c5 = h5.ctx::<F, _>(&mem, va(5 * KIB4), Level::L1, excl).unwrap();
    assert!(c5.set(stray));
    assert_eq!(
        split_entry(&mem, &mut ctx, SplitChild::Existing(child), |_, _, _| {}),
        Err(SplitEntryError::ChildMismatch)
    );
    assert_eq!(h.load(&mem), Some(huge));
    assert_eq!(h5.load(&mem), Some(stray));
    // Not a huge leaf (a non-present entry).
    let grandchild = mem.alloc_table(Level::L1).unwrap();
    let mut leaf_ctx = EntryRef::new(child, 7)
        .unwrap()
        .ctx::<F, _>(&mem, va(7 * KIB4), Level::L1, excl)
        .unwrap();
    assert_eq!(
        split_entry(
            &mem,
            &mut leaf_ctx,
            SplitChild::Fresh(grandchild),
            |_, _, _| {}
        ),
        Err(SplitEntryError::NotHuge)
    );
    assert_eq!(h.load(&mem), Some(huge));
}

/// A 1 GiB leaf split into an existing level-2 child one of whose entries is already a
/// table: that entry is kept and the split asks for a flush (KVM's `flush |=
/// !is_last_spte`).
pub(super) fn existing_child_with_table_asks_for_flush<F: PteFormat>() {
    let mut f = frames(16);
    let (mut mem, pt) = setup::<F>(&f.frames, &mut f.slots);
    let excl = WalkFlags::empty();
    map_rw(&pt, &mut mem, 0, 0, GIB1, MapSize::Exactly(Level::L3));
    let h = handle_at(&pt, &mut mem, 0, Level::L3);
    let child = mem.alloc_table(Level::L2).unwrap();
    let grandchild = mem.alloc_table(Level::L1).unwrap();
    // The grandchild maps entry 3's 2 MiB the same way, page by page.
    for i in 0..ENTRIES {
        let e = F::leaf_entry(
            pa(3 * MIB2 + i as u64 * KIB4),
            Level::L1,
            bits::<F>(rw::<F>()),
        );
        let mut c = EntryRef::new(grandchild, i)
            .unwrap()
            .ctx::<F, _>(&mem, va(3 * MIB2 + i as u64 * KIB4), Level::L1, excl)
            .unwrap();
        assert!(c.set(e));
    }
    let mut c3 = EntryRef::new(child, 3)
        .unwrap()
        .ctx::<F, _>(&mem, va(3 * MIB2), Level::L2, excl)
        .unwrap();
    assert!(c3.set(F::table_entry(grandchild)));
    mem.link(grandchild, Level::L1);
    let mut ctx = h.ctx::<F, _>(&mem, va(0), Level::L3, excl).unwrap();
    let mut reported = Vec::new();
    let done = split_entry(
        &mem,
        &mut ctx,
        SplitChild::Existing(child),
        |h, a: F::In, _| {
            reported.push((h.index(), a.raw()));
        },
    )
    .unwrap();
    assert_eq!((done.filled, done.kept, done.needs_flush), (511, 1, true));
    assert_eq!(reported.len(), 511);
    assert!(
        reported
            .iter()
            .all(|&(i, a)| i != 3 && a == i as u64 * MIB2)
    );
    assert_maps(&pt, &mem, 3 * MIB2 + 0x1234, 3 * MIB2 + 0x1234, Level::L1);
    assert_maps(&pt, &mem, 9 * MIB2 + 0x1234, 9 * MIB2 + 0x1234, Level::L2);
}

/// An MMU memory cache: tables taken from the arena ahead of time (outside the lock), handed
/// out by a split and given back to it if unused.
struct Cache(Vec<Hpa>);

impl TableAlloc for Cache {
    fn alloc_table(&mut self, _level: Level) -> Option<Hpa> {
        self.0.pop()
    }

    fn free_table(&mut self, table: Hpa) -> Result<(), FreeError> {
        self.0.push(table);
        Ok(())
    }
}

/// A ranged split takes its tables from a cache, stops where the cache runs dry, and
/// resumes from there after a top-up, until every leaf is split.
pub(super) fn split_from_a_cache_resumes<F: PteFormat>() {
    let mut f = frames(700);
    let (mut mem, pt) = setup::<F>(&f.frames, &mut f.slots);
    let excl = WalkFlags::empty();
    map_rw(&pt, &mut mem, 0, 0, GIB1, MapSize::Exactly(Level::L2));
    let mut cache = Cache(Vec::new());
    let (mut at, end, mut rounds, mut split) = (0u64, GIB1, 0, 0);
    loop {
        // Top up (the MMU lock would be dropped here).
        while cache.0.len() < 100 {
            cache.0.push(mem.alloc_table_to_fill(Level::L1).unwrap());
        }
        let mut from_cache = WithAlloc {
            mapping: &mem,
            alloc: &mut cache,
        };
        let done = pt
            .split(
                &mut from_cache,
                va(at),
                end - at,
                SplitTo::Level(Level::L1),
                excl,
            )
            .unwrap();
        split += done.split;
        rounds += 1;
        match done.resume_at {
            Some(next) => {
                assert_eq!(cache.0.len(), 0);
                assert_eq!(next.raw(), split as u64 * MIB2);
                at = next.raw();
            }
            None => break,
        }
    }
    assert_eq!((split, rounds), (512, 6));
    for i in (0..GIB1 / KIB4).step_by(4093) {
        assert_maps(&pt, &mem, i * KIB4, i * KIB4, Level::L1);
    }
    // The cache's leftovers are the arena's, not the tree's.
    assert_eq!(
        mem.allocated(),
        pt.table_count(&mem).unwrap() + cache.0.len()
    );
}

/// A walk from a table in the middle of the tree sees only that table's subtree; handles
/// rebuild contexts only for addresses and levels that fit.
pub(super) fn subtree_walks_and_handles<F: PteFormat>() {
    let mut f = frames(16);
    let (mut mem, pt) = setup::<F>(&f.frames, &mut f.slots);
    let excl = WalkFlags::empty();
    map_rw(
        &pt,
        &mut mem,
        GIB1,
        0,
        2 * MIB2,
        MapSize::Exactly(Level::L1),
    );
    let l1 = F::table_addr(
        handle_at(&pt, &mut mem, GIB1 + MIB2, Level::L2)
            .load(&mem)
            .unwrap(),
    );
    let sub = Subtree::new::<F>(l1, Level::L1, va(GIB1 + MIB2)).unwrap();
    assert_eq!(sub.range(), (GIB1 + MIB2, GIB1 + 2 * MIB2));
    let mut seen = Vec::new();
    let mut v = |_: VisitKind, ctx: &mut VisitCtx<'_, F>, _: &mut Tables<'_, TableArena<'_>>| {
        seen.push((ctx.raw_addr(), ctx.entry().table(), ctx.entry().index()));
        Ok::<_, ()>(Action::Continue)
    };
    sub.walk(
        &mut mem,
        va(GIB1 + MIB2 + 4 * KIB4),
        3 * KIB4,
        WalkFlags::LEAF,
        &mut v,
    )
    .unwrap();
    assert_eq!(
        sub.walk(&mut mem, va(GIB1), KIB4, WalkFlags::LEAF, &mut v),
        Err(WalkError::OutOfRange)
    );
    assert_eq!(
        seen,
        [4, 5, 6].map(|i| (GIB1 + MIB2 + i * KIB4, l1, i as usize))
    );
    // Misaligned bases and levels above the root: refused.
    assert!(Subtree::new::<F>(l1, Level::L1, va(GIB1 + KIB4)).is_none());
    assert!(Subtree::new::<F>(l1, Level::L5, va(0)).is_none() || F::ROOT_LEVEL == Level::L5);
    let h = EntryRef::new(l1, 9).unwrap();
    assert!(EntryRef::new(l1, 512).is_none());
    assert!(EntryRef::new(pa(TABLES_AT + 8), 0).is_none());
    assert_eq!(
        h.ctx::<F, _>(&mem, va(GIB1 + 1), Level::L1, excl).err(),
        Some(EntryError::BadAddress)
    );
    assert_eq!(
        EntryRef::new(pa(0x1000), 0)
            .unwrap()
            .ctx::<F, _>(&mem, va(0), Level::L1, excl)
            .err(),
        Some(EntryError::BadTable)
    );
    // A context rebuilt from a handle acts like a visit: a shared-mode exchange from a
    // stale value fails and reloads.
    let mut c = h
        .ctx::<F, _>(
            &mem,
            va(GIB1 + MIB2 + 9 * KIB4),
            Level::L1,
            WalkFlags::SHARED,
        )
        .unwrap();
    let old = c.old();
    let mut stale = h
        .ctx::<F, _>(
            &mem,
            va(GIB1 + MIB2 + 9 * KIB4),
            Level::L1,
            WalkFlags::SHARED,
        )
        .unwrap();
    assert!(c.set(0));
    assert!(!stale.set(old));
    assert_eq!(stale.old(), 0);
    let mut g = FlushGather::<4>::new();
    c.gather(&mut g);
    assert_eq!(
        g.ranges(),
        &[FlushRange {
            start: GIB1 + MIB2 + 9 * KIB4,
            len: KIB4,
            level: Level::L1
        }]
    );
}

/// A page table limited to 2 MiB leaves (a host without 1 GiB pages) never gets a 1 GiB
/// leaf, neither from `map(.., Largest)` nor from `collapse`.
pub(super) fn max_leaf_level_holds<F: PteFormat>() {
    let mut f = frames(600);
    let (mut mem, pt) = setup::<F>(&f.frames, &mut f.slots);
    let mut pt = pt.with_max_leaf(Level::L2);
    assert_eq!(pt.max_leaf(), Level::L2);
    let excl = WalkFlags::empty();
    map_rw(&pt, &mut mem, GIB1, GIB1, GIB1, MapSize::Largest);
    assert_maps(&pt, &mem, GIB1 + 5, GIB1 + 5, Level::L2);
    assert_eq!(
        pt.map(
            &mut mem,
            va(0),
            pa(0),
            GIB1,
            rw::<F>(),
            MapSize::Exactly(Level::L3),
            excl
        ),
        Err(MapError::UnsupportedSize)
    );
    let mut tlb = CountingFlush::default();
    assert_eq!(
        collapse_all(&mut pt, &mut mem, &mut tlb, 0, 4 * GIB1, Level::L3),
        Ok(0)
    );
    assert_maps(&pt, &mem, GIB1 + 5, GIB1 + 5, Level::L2);
    // The same tree without the limit collapses to one 1 GiB leaf.
    let mut pt = PageTable::<F>::from_root(pt.root());
    assert_eq!(
        collapse_all(&mut pt, &mut mem, &mut tlb, 0, 4 * GIB1, Level::L3),
        Ok(1)
    );
    assert_maps(&pt, &mem, GIB1 + 5, GIB1 + 5, Level::L3);
}

/// An entry above the largest leaf level with the page-size bit set (a leaf hardware would
/// fault on, written by a visitor or a guest) once slipped past `unmap`'s straddle check:
/// the walk cleared leaves before it and then failed. Now the check probes such leaves too
/// and refuses before anything changes.
pub(super) fn unmap_refuses_before_changing_anything<F: PteFormat>() {
    let mut f = frames(16);
    let (mut mem, mut pt) = setup::<F>(&f.frames, &mut f.slots);
    let excl = WalkFlags::empty();
    let l4 = Level::L4.page_size();
    map_rw(&pt, &mut mem, l4 - KIB4, 0, KIB4, MapSize::Largest);
    // A "512 GiB leaf" right after it, in the level-4 table.
    let mut raw = |_: VisitKind, ctx: &mut VisitCtx<'_, F>, _: &mut Tables<'_, TableArena<'_>>| {
        if ctx.level() == Level::L4 {
            assert!(ctx.set(F::leaf_entry(pa(0), Level::L4, bits::<F>(rw::<F>()))));
        }
        Ok::<_, ()>(Action::Continue)
    };
    pt.walk(&mut mem, va(l4), KIB4, WalkFlags::LEAF, &mut raw)
        .unwrap();
    let before = mem.allocated();
    assert_eq!(
        pt.unmap(&mut mem, va(l4 - KIB4), KIB4 + GIB1).err(),
        Some(UnmapError::SplitsHugePage)
    );
    assert_maps(&pt, &mem, l4 - KIB4, 0, Level::L1);
    assert_eq!(mem.allocated(), before);
    let none = <F::Flags as bitflags::Flags>::empty();
    let w = <F::Flags as bitflags::Flags>::from_bits_retain(F::WRITABLE);
    assert_eq!(
        pt.protect(&mut mem, va(l4 - KIB4), KIB4 + GIB1, none, w, excl)
            .err(),
        Some(ProtectError::SplitsHugePage)
    );
    // Covering it whole is fine: both go.
    pt.unmap(&mut mem, va(l4 - KIB4), KIB4 + l4)
        .unwrap()
        .flush(&mut CountingFlush::default(), &mut mem)
        .unwrap();
    assert_eq!(pt.translate(&mem, va(l4)), Err(TranslateError::NotMapped));
    assert_eq!(
        pt.translate(&mem, va(l4 - KIB4)),
        Err(TranslateError::NotMapped)
    );
}
