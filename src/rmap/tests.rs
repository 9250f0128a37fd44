#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use alloc::vec;
use alloc::vec::Vec;

use super::*;
use crate::addr::{FRAME_LIMIT, Gfn, Hpa, Level, PHYS_ADDR_BITS};
use crate::testing::Rng;

type Cache = MemoryCache<DescId, 8>;

fn e(table_page: u64, index: usize) -> EntryRef {
    EntryRef::new(Hpa::new(table_page << 12).unwrap(), index).unwrap()
}

fn setup(capacity: usize) -> (DescStore, DescPool, Cache) {
    let (store, pool) = DescStore::new(capacity).unwrap();
    let mut cache = Cache::new();
    cache.top_up(&mut &pool, 0).unwrap();
    (store, pool, cache)
}

fn snap(store: &DescStore) -> Vec<PteListDesc> {
    store.descs.to_vec()
}

fn sorted(head: RmapHead, store: &DescStore) -> Vec<EntryRef> {
    let mut v: Vec<_> = head.iter(store).collect();
    v.sort();
    v
}

#[test]
fn layouts() {
    assert_eq!(size_of::<PteListDesc>(), 128);
    assert_eq!(size_of::<RmapHead>(), 8);
    assert_eq!(size_of::<Option<DescId>>(), 4);
    assert_eq!(DescId::from_index(0).unwrap().get(), 1);
    assert_eq!(DescId::from_index(u32::MAX as usize), None);
    assert_eq!(DescId::new(0), None);
}

#[test]
fn empty_head() {
    let (mut store, _pool, _cache) = setup(4);
    let mut h = RmapHead::EMPTY;
    assert!(h.is_empty());
    assert_eq!(h, RmapHead::default());
    assert_eq!(h.count(&store), 0);
    assert_eq!(h.iter(&store).count(), 0);
    assert!(!h.contains(e(1, 0), &store));
    assert_eq!(h.remove(e(1, 0), &mut store), Err(RmapError::NotFound));
    assert_eq!(h.check(&store), Ok(0));
    assert!(h.is_empty());
}

#[test]
fn one_entry_needs_no_descriptor_and_every_handle_is_representable() {
    let (mut store, pool, mut cache) = setup(4);
    let top = (1u64 << PHYS_ADDR_BITS) / 4096 - 1;
    for x in [e(0, 0), e(0, 1), e(0, 511), e(top, 0), e(top, 511), e(7, 3)] {
        let mut h = RmapHead::EMPTY;
        h.add(x, &mut store, &mut cache).unwrap();
        assert!(!h.is_empty());
        assert_eq!(cache.len(), 4, "one entry takes no descriptor");
        assert_eq!(h.count(&store), 1);
        assert_eq!(h.iter(&store).collect::<Vec<_>>(), vec![x]);
        assert!(h.contains(x, &store));
        assert_eq!(h.desc(), None);
        assert_eq!(h.remove(x, &mut store), Ok(None));
        assert!(h.is_empty());
    }
    assert_eq!(pool.len(), 0);
    assert_eq!(store.in_use(), 0);
}

#[test]
fn fill_empty_gives_each_head_its_entry_or_changes_nothing() {
    let (mut store, _pool, mut cache) = setup(4);
    let table = Hpa::new(0x7_6543_2000).unwrap();
    // All empty: head i holds entry i of the table, as 512 adds would leave it.
    let mut heads = vec![RmapHead::EMPTY; 512];
    assert!(RmapHead::fill_empty(&mut heads, table));
    let mut added = vec![RmapHead::EMPTY; 512];
    for (i, h) in added.iter_mut().enumerate() {
        h.add(EntryRef::new(table, i).unwrap(), &mut store, &mut cache)
            .unwrap();
    }
    assert_eq!(heads, added);
    for (i, h) in heads.iter().enumerate() {
        assert_eq!(h.single(), EntryRef::new(table, i));
        assert_eq!(h.check(&store), Ok(1));
    }
    // One head already holds an entry: nothing changes.
    let mut heads = vec![RmapHead::EMPTY; 512];
    heads[300].add(e(9, 3), &mut store, &mut cache).unwrap();
    let before = heads.clone();
    assert!(!RmapHead::fill_empty(&mut heads, table));
    assert_eq!(heads, before);
    // Wherever the occupied head is (first, last of a group of 16, first of the next,
    // last, in the tail of a run that is not a multiple of 16), the heads written before
    // it are emptied again.
    for (len, at) in [
        (512, 0),
        (512, 15),
        (512, 16),
        (512, 511),
        (20, 18),
        (20, 3),
    ] {
        let mut heads = vec![RmapHead::EMPTY; len];
        heads[at].add(e(9, 3), &mut store, &mut cache).unwrap();
        let before = heads.clone();
        assert!(!RmapHead::fill_empty(&mut heads, table), "{len} {at}");
        assert_eq!(heads, before, "{len} {at}");
    }
    // More heads than a table has entries: refused.
    let mut heads = vec![RmapHead::EMPTY; 513];
    assert!(!RmapHead::fill_empty(&mut heads, table));
    assert!(heads.iter().all(|h| h.is_empty()));
    // A shorter run is entries 0.. of the table.
    let mut heads = vec![RmapHead::EMPTY; 3];
    assert!(RmapHead::fill_empty(&mut heads, table));
    assert_eq!(heads[2].single(), EntryRef::new(table, 2));
    let mut heads = vec![RmapHead::EMPTY; 37];
    assert!(RmapHead::fill_empty(&mut heads, table));
    for (i, h) in heads.iter().enumerate() {
        assert_eq!(h.single(), EntryRef::new(table, i));
    }
}

#[test]
fn second_entry_without_descriptor_changes_nothing() {
    let (mut store, _pool, _) = setup(4);
    let mut empty = Cache::new();
    let mut h = RmapHead::EMPTY;
    h.add(e(1, 1), &mut store, &mut empty).unwrap();
    let (before, descs) = (h, snap(&store));
    assert_eq!(
        h.add(e(1, 2), &mut store, &mut empty),
        Err(RmapError::NoDescriptor)
    );
    assert_eq!(h, before);
    assert_eq!(snap(&store), descs);
    assert_eq!(h.iter(&store).collect::<Vec<_>>(), vec![e(1, 1)]);
}

#[test]
fn fills_a_descriptor_then_chains_a_new_head() {
    let (mut store, _pool, mut cache) = setup(8);
    let mut h = RmapHead::EMPTY;
    for i in 0..PTE_LIST_EXT {
        h.add(e(2, i), &mut store, &mut cache).unwrap();
        assert_eq!(h.count(&store), i + 1);
    }
    assert_eq!(cache.len(), 7, "entries 2..=14 share one descriptor");
    let first = h.desc().unwrap();
    assert_eq!(store.get(first).unwrap().count(), PTE_LIST_EXT);

    // The 15th entry needs a new head descriptor: refused with nothing changed when the
    // cache is empty.
    let mut empty = Cache::new();
    let (before, descs) = (h, snap(&store));
    assert_eq!(
        h.add(e(3, 0), &mut store, &mut empty),
        Err(RmapError::NoDescriptor)
    );
    assert_eq!((h, snap(&store)), (before, descs));

    h.add(e(3, 0), &mut store, &mut cache).unwrap();
    let head = h.desc().unwrap();
    assert_ne!(head, first);
    let hd = store.get(head).unwrap();
    assert_eq!(
        (hd.count(), hd.tail_count(), hd.more()),
        (1, PTE_LIST_EXT, Some(first))
    );
    assert_eq!(h.count(&store), 15);
    assert_eq!(h.check(&store), Ok(15));
    let mut want: Vec<_> = (0..PTE_LIST_EXT).map(|i| e(2, i)).collect();
    want.push(e(3, 0));
    want.sort();
    assert_eq!(sorted(h, &store), want);
    // The head descriptor's entries come first (KVM's rmap iteration order).
    assert_eq!(h.first(&store), Some(e(3, 0)));
    // Taking entries out one at a time through `first` empties the chain.
    let mut taken = 0;
    while let Some(x) = h.first(&store) {
        if let Some(id) = h.remove(x, &mut store).unwrap() {
            cache.put(id).unwrap();
        }
        taken += 1;
    }
    assert_eq!((taken, cache.len(), store.in_use()), (15, 8, 0));
}

#[test]
fn remove_moves_the_head_last_entry_into_the_hole_and_releases_an_empty_head() {
    let (mut store, pool, mut cache) = setup(8);
    let mut h = RmapHead::EMPTY;
    for i in 0..PTE_LIST_EXT + 2 {
        h.add(e(4, i), &mut store, &mut cache).unwrap();
    }
    let (head, tail) = (
        h.desc().unwrap(),
        store.get(h.desc().unwrap()).unwrap().more().unwrap(),
    );
    // Removing from the full tail pulls the head's last entry (e(4, 15)) into the hole.
    assert_eq!(h.remove(e(4, 3), &mut store), Ok(None));
    assert_eq!(store.get(tail).unwrap().entries[3], raw(e(4, 15)));
    assert_eq!(store.get(head).unwrap().count(), 1);
    assert_eq!(h.check(&store), Ok(15));
    // Emptying the head descriptor releases it and the tail becomes the head.
    assert_eq!(h.remove(e(4, 14), &mut store), Ok(Some(head)));
    assert!(store.get(head).unwrap().is_free());
    assert_eq!(h.desc(), Some(tail));
    assert_eq!(h.count(&store), 14);
    pool.free(head).unwrap();
    // Down to one entry: the descriptor stays (as in KVM).
    for i in (0..PTE_LIST_EXT).filter(|&i| i != 3) {
        assert_eq!(h.remove(e(4, i), &mut store), Ok(None));
    }
    assert_eq!(h.count(&store), 1);
    assert_eq!(h.desc(), Some(tail));
    assert_eq!(h.iter(&store).collect::<Vec<_>>(), vec![e(4, 15)]);
    assert_eq!(h.remove(e(4, 15), &mut store), Ok(Some(tail)));
    assert!(h.is_empty());
    assert_eq!(store.in_use(), 0);
}

#[test]
fn remove_of_an_absent_entry_changes_nothing() {
    let (mut store, _pool, mut cache) = setup(8);
    let mut one = RmapHead::EMPTY;
    one.add(e(5, 0), &mut store, &mut cache).unwrap();
    assert_eq!(one.remove(e(5, 1), &mut store), Err(RmapError::NotFound));
    assert_eq!(one.count(&store), 1);

    let mut h = RmapHead::EMPTY;
    for i in 0..20 {
        h.add(e(6, i), &mut store, &mut cache).unwrap();
    }
    let (before, descs) = (h, snap(&store));
    for absent in [e(6, 20), e(5, 0), e(0, 0)] {
        assert_eq!(h.remove(absent, &mut store), Err(RmapError::NotFound));
        assert_eq!((h, snap(&store)), (before, descs.clone()));
    }
}

#[test]
fn duplicates_are_kept_like_kvm() {
    let (mut store, _pool, mut cache) = setup(4);
    let mut h = RmapHead::EMPTY;
    h.add(e(1, 1), &mut store, &mut cache).unwrap();
    h.add(e(1, 1), &mut store, &mut cache).unwrap();
    assert_eq!(h.count(&store), 2);
    assert_eq!(h.remove(e(1, 1), &mut store), Ok(None));
    assert!(h.contains(e(1, 1), &store));
    assert!(h.remove(e(1, 1), &mut store).unwrap().is_some());
    assert!(h.is_empty());
}

#[test]
fn bad_ids_from_the_cache_are_refused_and_put_back() {
    let (mut store, _pool, _) = setup(4);
    let mut h = RmapHead::EMPTY;
    let mut empty = Cache::new();
    h.add(e(1, 0), &mut store, &mut empty).unwrap();
    // An id outside the store.
    let mut bad = Cache::new();
    bad.put(DescId::from_index(100).unwrap()).unwrap();
    let (before, descs) = (h, snap(&store));
    assert_eq!(
        h.add(e(1, 1), &mut store, &mut bad),
        Err(RmapError::BadDescriptor)
    );
    assert_eq!((h, snap(&store), bad.len()), (before, descs.clone(), 1));

    // An id already in use by another chain (freed twice into a cache).
    let mut good = Cache::new();
    good.put(DescId::from_index(0).unwrap()).unwrap();
    let mut other = RmapHead::EMPTY;
    other.add(e(2, 0), &mut store, &mut good).unwrap();
    other.add(e(2, 1), &mut store, &mut good).unwrap();
    let in_use = other.desc().unwrap();
    let mut dup = Cache::new();
    dup.put(in_use).unwrap();
    let (before, descs) = (h, snap(&store));
    assert_eq!(
        h.add(e(1, 1), &mut store, &mut dup),
        Err(RmapError::BadDescriptor)
    );
    assert_eq!((h, snap(&store)), (before, descs));
    assert_eq!(dup.alloc(), Some(in_use));
    assert_eq!(other.check(&store), Ok(2));
}

#[test]
fn a_head_used_with_the_wrong_store_is_refused() {
    let (mut big, _p1, mut cache) = setup(8);
    let (mut small, _p2, _) = setup(1);
    let mut h = RmapHead::EMPTY;
    for i in 0..3 {
        h.add(e(1, i), &mut big, &mut cache).unwrap();
    }
    // Make the head's descriptor id one the small store does not have.
    while h.desc().unwrap().index() == 0 {
        let mut h2 = RmapHead::EMPTY;
        for i in 0..3 {
            h2.add(e(9, i), &mut big, &mut cache).unwrap();
        }
        h = h2;
    }
    let descs = snap(&small);
    assert_eq!(h.count(&small), 0);
    assert_eq!(h.iter(&small).count(), 0);
    assert!(!h.contains(e(1, 0), &small));
    assert_eq!(h.check(&small), Err(RmapError::BadDescriptor));
    let before = h;
    assert_eq!(h.remove(e(1, 0), &mut small), Err(RmapError::BadDescriptor));
    assert_eq!(
        h.add(e(1, 5), &mut small, &mut cache),
        Err(RmapError::BadDescriptor)
    );
    assert_eq!(h, before);
    assert_eq!(snap(&small), descs);
    let (mut entries, mut released) = (0, 0);
    h.drain(&mut small, |_| entries += 1, |_| released += 1);
    assert_eq!((entries, released), (0, 0));
    assert!(h.is_empty());
}

#[test]
fn corrupt_chains_end_walks_without_panic_or_endless_loop() {
    let (mut store, _pool, mut cache) = setup(4);
    let mut h = RmapHead::EMPTY;
    for i in 0..PTE_LIST_EXT + 1 {
        h.add(e(1, i), &mut store, &mut cache).unwrap();
    }
    let head = h.desc().unwrap();
    let tail = store.get(head).unwrap().more().unwrap();
    // A cycle: the tail points back at the head.
    store.descs[tail.index()].more = Some(head);
    assert_eq!(h.check(&store), Err(RmapError::BadDescriptor));
    assert!(h.iter(&store).count() <= 4 * PTE_LIST_EXT);
    assert!(!h.contains(e(2, 0), &store));
    assert_eq!(h.remove(e(2, 0), &mut store), Err(RmapError::BadDescriptor));
    // A cycle through full descriptors only.
    store.descs[tail.index()].more = Some(tail);
    let mut h2 = RmapHead::many(tail);
    assert_eq!(h2.check(&store), Err(RmapError::BadDescriptor));
    assert_eq!(
        h2.remove(e(2, 0), &mut store),
        Err(RmapError::BadDescriptor)
    );
    assert!(h2.iter(&store).count() <= 4 * PTE_LIST_EXT);
    let mut freed = Vec::new();
    h2.drain(&mut store, |_| {}, |id| freed.push(id));
    assert_eq!(
        freed,
        vec![tail],
        "a released descriptor is not visited twice"
    );
    // The head now names a chain with a free descriptor in it.
    assert_eq!(h.check(&store), Err(RmapError::BadDescriptor));
    assert_eq!(h.remove(e(1, 0), &mut store), Err(RmapError::BadDescriptor));
    // A count out of range.
    let (mut store, _pool, mut cache) = setup(4);
    let mut h = RmapHead::EMPTY;
    h.add(e(1, 0), &mut store, &mut cache).unwrap();
    h.add(e(1, 1), &mut store, &mut cache).unwrap();
    store.descs[h.desc().unwrap().index()].count = 99;
    assert_eq!(h.check(&store), Err(RmapError::BadDescriptor));
    assert_eq!(
        h.add(e(1, 2), &mut store, &mut cache),
        Err(RmapError::BadDescriptor)
    );
    assert_eq!(h.remove(e(1, 0), &mut store), Err(RmapError::BadDescriptor));
    assert_eq!(h.iter(&store).count(), PTE_LIST_EXT);
}

#[test]
fn drain_visits_every_entry_and_releases_every_descriptor() {
    let (mut store, pool, mut cache) = setup(8);
    let mut h = RmapHead::EMPTY;
    for i in 0..40 {
        h.add(e(3, i), &mut store, &mut cache).unwrap();
    }
    let chain = store.in_use();
    assert_eq!(chain, 3);
    let mut seen = Vec::new();
    let mut freed = Vec::new();
    h.drain(&mut store, |x| seen.push(x), |id| freed.push(id));
    seen.sort();
    assert_eq!(seen, (0..40).map(|i| e(3, i)).collect::<Vec<_>>());
    assert_eq!(freed.len(), chain);
    assert!(h.is_empty());
    assert_eq!(store.in_use(), 0);
    for id in freed {
        cache.free(id, &mut &pool);
    }
    assert_eq!(cache.len() + pool.len(), 8);

    let mut one = RmapHead::EMPTY;
    one.add(e(1, 1), &mut store, &mut cache).unwrap();
    let mut seen = Vec::new();
    one.drain(&mut store, |x| seen.push(x), |_| panic!("no descriptor"));
    assert_eq!(seen, vec![e(1, 1)]);
    assert!(one.is_empty());
}

#[test]
fn pool_hands_out_every_id_once_and_refuses_bad_frees() {
    static_assertions::assert_impl_all!(DescPool: Sync, Send);
    let (_store, pool) = DescStore::new(3).unwrap();
    assert_eq!((pool.len(), pool.capacity()), (3, 3));
    assert_eq!(
        pool.free(DescId::from_index(0).unwrap()),
        Err(PoolError::DoubleFree)
    );
    let mut ids: Vec<_> = (0..3).map(|_| pool.alloc().unwrap()).collect();
    assert_eq!(pool.alloc(), Err(OutOfDescs));
    assert!(pool.is_empty());
    ids.sort();
    assert_eq!(
        ids.iter().map(|id| id.index()).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    assert_eq!(
        pool.free(DescId::from_index(3).unwrap()),
        Err(PoolError::OutOfRange)
    );
    pool.free(ids[1]).unwrap();
    assert_eq!(pool.free(ids[1]), Err(PoolError::DoubleFree));
    assert_eq!(pool.len(), 1);
    assert_eq!(pool.alloc(), Ok(ids[1]));

    // Through a memory cache: a top-up past the pool keeps what it got.
    for id in ids {
        pool.free(id).unwrap();
    }
    let mut cache = MemoryCache::<DescId, 5>::new();
    assert!(cache.top_up(&mut &pool, 4).is_err());
    assert_eq!((cache.len(), pool.len()), (3, 0));
    cache.drain_into(&mut &pool);
    assert_eq!(pool.len(), 3);
}

#[test]
fn store_capacity_limits() {
    assert_eq!(
        DescStore::new(u32::MAX as usize).err(),
        Some(CapacityError::TooLarge)
    );
    let (store, pool) = DescStore::new(0).unwrap();
    assert_eq!((store.capacity(), pool.len()), (0, 0));
}

/// Many heads sharing one small store, against a multiset model: adds, removes (present
/// and absent), drains, descriptors back to the cache or the pool, a store that runs dry.
#[test]
fn random_ops_match_a_model() {
    const HEADS: usize = 12;
    const CAPACITY: usize = 16;
    let mut exhausted = 0;
    let mut taken = 0usize;
    let mut longest = 0usize;
    for seed in 1..=12u64 {
        let mut rng = Rng::new(seed);
        let (mut store, pool) = DescStore::new(CAPACITY).unwrap();
        let mut cache = Cache::new();
        let mut heads = [RmapHead::EMPTY; HEADS];
        let mut model: Vec<Vec<EntryRef>> = vec![Vec::new(); HEADS];
        let entry = |rng: &mut Rng| e(rng.below(6), rng.below(64) as usize);
        // Seeds differ in how add-heavy they are: some stay small, some run the store dry.
        let adds = 45 + (seed % 4) * 10;
        for _ in 0..2500 {
            let h = rng.below(HEADS as u64) as usize;
            let r = rng.below(100);
            match r {
                _ if r < adds => {
                    let x = entry(&mut rng);
                    let (before, descs, had) = (heads[h], snap(&store), cache.len());
                    match heads[h].add(x, &mut store, &mut cache) {
                        Ok(()) => {
                            taken += had - cache.len();
                            model[h].push(x);
                        }
                        Err(RmapError::NoDescriptor) => {
                            assert_eq!((heads[h], snap(&store)), (before, descs));
                            if cache.top_up(&mut &pool, 1).is_err() {
                                exhausted += 1;
                            }
                        }
                        Err(err) => panic!("seed {seed}: add: {err}"),
                    }
                }
                _ if r < 95 => {
                    let x = if model[h].is_empty() || rng.below(4) == 0 {
                        entry(&mut rng)
                    } else {
                        model[h][rng.below(model[h].len() as u64) as usize]
                    };
                    let (before, descs) = (heads[h], snap(&store));
                    match heads[h].remove(x, &mut store) {
                        Ok(freed) => {
                            let at = model[h].iter().position(|&y| y == x).unwrap();
                            model[h].swap_remove(at);
                            if let Some(id) = freed {
                                assert!(store.get(id).unwrap().is_free());
                                if rng.below(2) == 0 {
                                    cache.free(id, &mut &pool);
                                } else {
                                    pool.free(id).unwrap();
                                }
                            }
                        }
                        Err(RmapError::NotFound) => {
                            assert!(!model[h].contains(&x), "seed {seed}: lost {x:?}");
                            assert_eq!((heads[h], snap(&store)), (before, descs));
                        }
                        Err(err) => panic!("seed {seed}: remove: {err}"),
                    }
                }
                95..=97 => {
                    let mut seen = Vec::new();
                    heads[h].drain(&mut store, |x| seen.push(x), |id| pool.free(id).unwrap());
                    seen.sort();
                    model[h].sort();
                    assert_eq!(seen, core::mem::take(&mut model[h]));
                }
                _ => cache.drain_into(&mut &pool),
            }
            let mut chained = 0;
            for (head, want) in heads.iter().zip(&model) {
                let mut want = want.clone();
                want.sort();
                assert_eq!(sorted(*head, &store), want, "seed {seed}");
                assert_eq!(head.count(&store), want.len());
                assert_eq!(head.check(&store), Ok(want.len()));
                longest = longest.max(want.len());
                chained += head
                    .desc()
                    .map_or(0, |_| want.len().div_ceil(PTE_LIST_EXT).max(1));
            }
            // No leak: every descriptor is in the pool, the cache or a chain.
            assert_eq!(store.in_use(), chained, "seed {seed}");
            assert_eq!(
                pool.len() + cache.len() + store.in_use(),
                CAPACITY,
                "seed {seed}"
            );
        }
    }
    assert!(exhausted > 0, "the store never ran dry");
    assert!(taken > 2 * CAPACITY, "descriptors were not reused");
    assert!(longest > 2 * PTE_LIST_EXT, "no chain of three descriptors");
}

#[test]
fn slot_rmaps_index_formula_on_unaligned_bases() {
    let mut rng = Rng::new(8);
    let bases = [
        0u64,
        1,
        511,
        512,
        513,
        (1 << 18) - 3,
        (1 << 18) + 700,
        0x12_3456,
    ];
    for &base in &bases {
        for npages in [1u64, 2, 511, 512, 1000, 262_145] {
            let slot = SlotRmaps::new(Gfn::new(base).unwrap(), npages, Level::L3).unwrap();
            assert_eq!(slot.max_level(), Some(Level::L3));
            let last = base + npages - 1;
            for l in 1..=3u8 {
                let level = Level::new(l).unwrap();
                let s = 9 * u32::from(l - 1);
                assert_eq!(
                    slot.level_len(level),
                    ((last >> s) - (base >> s) + 1) as usize
                );
                assert_eq!(slot.heads(level).len(), slot.level_len(level));
                for _ in 0..20 {
                    let g = base + rng.below(npages);
                    let i = slot.index(Gfn::new(g).unwrap(), level).unwrap();
                    assert_eq!(i as u64, (g >> s) - (base >> s));
                    let start = slot.gfn_at(level, i).unwrap().get();
                    assert!(start <= g && g < start + (1 << s), "{base} {npages} L{l}");
                    assert!(slot.head(Gfn::new(g).unwrap(), level).is_some());
                }
                for g in [base.wrapping_sub(1), base + npages] {
                    if let Ok(g) = Gfn::new(g) {
                        assert_eq!(slot.head(g, level), None);
                    }
                }
                assert_eq!(slot.gfn_at(level, slot.level_len(level)), None);
                // The first head covers the block holding the base (below it when unaligned).
                assert_eq!(slot.gfn_at(level, 0).unwrap().get(), base >> s << s);
            }
            assert_eq!(slot.level_len(Level::L4), 0);
            assert_eq!(slot.head(Gfn::new(base).unwrap(), Level::L4), None);
        }
    }
}

#[test]
fn slot_rmaps_heads_are_distinct_per_block() {
    let (mut store, _pool, mut cache) = setup(4);
    let mut slot = SlotRmaps::new(Gfn::new(510).unwrap(), 4, Level::L2).unwrap();
    assert_eq!(slot.level_len(Level::L1), 4);
    assert_eq!(
        slot.level_len(Level::L2),
        2,
        "the slot straddles a 2 MiB boundary"
    );
    for g in 510..514 {
        let h = slot.head_mut(Gfn::new(g).unwrap(), Level::L1).unwrap();
        h.add(e(1, g as usize - 500), &mut store, &mut cache)
            .unwrap();
    }
    let l2 = slot.head_mut(Gfn::new(511).unwrap(), Level::L2).unwrap();
    l2.add(e(2, 0), &mut store, &mut cache).unwrap();
    assert_eq!(
        slot.head(Gfn::new(510).unwrap(), Level::L2)
            .unwrap()
            .count(&store),
        1
    );
    assert!(
        slot.head(Gfn::new(512).unwrap(), Level::L2)
            .unwrap()
            .is_empty()
    );
    for (i, h) in slot.heads(Level::L1).iter().enumerate() {
        assert_eq!(h.iter(&store).collect::<Vec<_>>(), vec![e(1, 10 + i)]);
    }
    assert_eq!(slot.heads_mut(Level::L3).len(), 0);
}

#[test]
fn slot_rmaps_limits() {
    let base = Gfn::new(FRAME_LIMIT - 4).unwrap();
    assert_eq!(
        SlotRmaps::new(base, 5, Level::L3).err(),
        Some(CapacityError::TooLarge)
    );
    assert_eq!(
        SlotRmaps::new(base, u64::MAX, Level::L3).err(),
        Some(CapacityError::TooLarge)
    );
    let slot = SlotRmaps::new(base, 4, Level::L5).unwrap();
    assert_eq!(slot.level_len(Level::L5), 1);
    let empty = SlotRmaps::new(Gfn::new(5).unwrap(), 0, Level::L3).unwrap();
    assert_eq!(empty.level_len(Level::L1), 0);
    assert_eq!(empty.head(Gfn::new(5).unwrap(), Level::L1), None);
    assert_eq!(empty.gfn_at(Level::L1, 0), None);
}

/// `next_nonempty` finds what stepping through `head` one page of the level at a time
/// finds, on unaligned bases, ranges that start below the slot or end past it, and the
/// empty and zero-length cases.
#[test]
fn slot_rmaps_next_nonempty_matches_stepping_through_heads() {
    let (mut store, _pool, mut cache) = setup(64);
    let mut rng = Rng::new(21);
    for &(base, npages) in &[
        (0u64, 4096u64),
        (510, 4),
        (513, 3000),
        ((1 << 18) - 3, 1 << 19),
        (7, 0),
        (1 << 20, 1),
    ] {
        let mut slot = SlotRmaps::new(Gfn::new(base).unwrap(), npages, Level::L3).unwrap();
        for l in 1..=3u8 {
            let level = Level::new(l).unwrap();
            let len = slot.level_len(level);
            for _ in 0..3 {
                if len > 0 {
                    let k = rng.below(len as u64) as usize;
                    let h = &mut slot.heads_mut(level)[k];
                    if h.is_empty() {
                        h.add(e(u64::from(l), k % 512), &mut store, &mut cache)
                            .unwrap();
                    }
                }
            }
            let n = 1u64 << (9 * u32::from(l - 1));
            for _ in 0..200 {
                let mut from = (base + rng.below(npages + 2 * n)).saturating_sub(n) / n * n;
                if rng.below(4) == 0 {
                    // Not a multiple of the page size, or far below the slot.
                    from = if rng.below(2) == 0 {
                        from + 1 + rng.below(n)
                    } else {
                        from.saturating_sub(5 * n + 3)
                    };
                }
                let to = from + rng.below(npages + 8 * n);
                let mut want = None;
                let mut g = from;
                while g < to {
                    let full = Gfn::new(g).ok().and_then(|g| slot.head(g, level));
                    if full.is_some_and(|h| !h.is_empty()) {
                        want = Some(g);
                        break;
                    }
                    g += n;
                }
                assert_eq!(
                    slot.next_nonempty(from, to, level),
                    want,
                    "base {base} npages {npages} L{l} [{from}, {to})"
                );
            }
        }
    }
    let slot = SlotRmaps::new(Gfn::new(1 << 20).unwrap(), 1 << 10, Level::L2).unwrap();
    for (from, to) in [
        (0, u64::MAX),
        (u64::MAX, u64::MAX),
        (u64::MAX - 5, 3),
        (5, 0),
    ] {
        for level in [Level::L1, Level::L2, Level::L3, Level::L5] {
            assert_eq!(slot.next_nonempty(from, to, level), None);
        }
    }
}

/// The generation of a level counts every loan of its heads to be changed, and
/// `known_empty` holds only while no loan happened since the heads were last known empty:
/// a new slot, or `note_empty` after a drain. `note_empty` checks: a head left non-empty
/// keeps the level unknown. Levels do not disturb each other; a lookup outside the slot
/// lends nothing.
#[test]
fn slot_rmaps_know_when_a_level_is_empty() {
    let (mut store, _pool, mut cache) = setup(4);
    let mut slot = SlotRmaps::new(Gfn::new(0).unwrap(), 1024, Level::L2).unwrap();
    for level in [Level::L1, Level::L2, Level::L3] {
        assert!(slot.known_empty(level), "{level:?}");
        assert_eq!(slot.generation(level), 0);
    }
    // Reading lends nothing; a gfn outside the slot has no head to lend.
    let _ = slot.head(Gfn::new(3).unwrap(), Level::L1);
    assert!(slot.head_mut(Gfn::new(1024).unwrap(), Level::L1).is_none());
    assert!(slot.known_empty(Level::L1));
    // A head lent out may have been changed, whether or not it was.
    let _ = slot.head_mut(Gfn::new(3).unwrap(), Level::L1);
    assert!(!slot.known_empty(Level::L1));
    assert_eq!(slot.generation(Level::L1), 1);
    assert!(slot.known_empty(Level::L2));
    slot.note_empty(Level::L1);
    assert!(slot.known_empty(Level::L1));
    // An entry added through `heads_mut`: the level is not known empty, and saying it is
    // does not make it so.
    slot.heads_mut(Level::L1)[700]
        .add(e(1, 5), &mut store, &mut cache)
        .unwrap();
    assert_eq!(slot.generation(Level::L1), 2);
    slot.note_empty(Level::L1);
    assert!(!slot.known_empty(Level::L1));
    // Drained, it is.
    slot.heads_mut(Level::L1)[700].drain(&mut store, |_| {}, |_| {});
    slot.note_empty(Level::L1);
    assert!(slot.known_empty(Level::L1));
    assert_eq!(slot.generation(Level::L1), 3);
    // A level without an array is empty and stays so.
    assert_eq!(slot.heads_mut(Level::L3).len(), 0);
    assert!(slot.known_empty(Level::L3));
    assert_eq!(slot.generation(Level::L3), 0);
}

/// `fill_known_empty` writes what `fill_empty` writes over empty heads, for a full table,
/// a shorter run and one longer than a table (the heads past the table stay empty).
#[test]
fn fill_known_empty_writes_what_fill_empty_writes() {
    let table = Hpa::new(0x7_6543_2000).unwrap();
    for len in [512, 37, 16, 1, 0] {
        let mut checked = vec![RmapHead::EMPTY; len];
        assert!(RmapHead::fill_empty(&mut checked, table));
        let mut unread = vec![RmapHead::EMPTY; len];
        RmapHead::fill_known_empty(&mut unread, table);
        assert_eq!(unread, checked, "{len}");
    }
    let mut long = vec![RmapHead::EMPTY; 520];
    RmapHead::fill_known_empty(&mut long, table);
    assert_eq!(long[511].single(), EntryRef::new(table, 511));
    assert!(long[512..].iter().all(|h| h.is_empty()));
}
