use std::vec;
use std::vec::Vec;

use arrayvec::ArrayVec;

use super::*;
use crate::addr::FRAME_LIMIT;
use crate::testing::Rng;
use crate::testing::buddy::{BuddyHarness, random_op};

fn pfn(p: u64) -> Pfn {
    Pfn::new(p).unwrap()
}

fn ord(o: u8) -> PageOrder {
    PageOrder::new(o).unwrap()
}

/// An allocator whose window starts at `base` and covers `frames`, all managed.
fn buddy<const M: usize>(base: u64, frames: u64) -> Buddy<Vec<FrameMeta>, M> {
    let mut b = Buddy::new(vec![FrameMeta::HOLE; frames as usize], pfn(base)).unwrap();
    b.add_range(pfn(base), frames).unwrap();
    b.check_invariants().unwrap();
    b
}

fn stats<S: DerefMut<Target = [FrameMeta]>, const M: usize>(
    b: &Buddy<S, M>,
    o: u8,
) -> (u64, u64, u64) {
    let s = b.order_stats(ord(o));
    (s.free, s.reported, s.isolated)
}

fn isolate_all<S: DerefMut<Target = [FrameMeta]>, const M: usize>(
    b: &mut Buddy<S, M>,
    o: u8,
) -> Vec<Block> {
    let mut out = ArrayVec::<Block, 64>::new();
    b.isolate(ord(o), usize::MAX, &mut out).unwrap();
    out.to_vec()
}

#[test]
fn new_rejects_bad_windows() {
    let empty: Vec<FrameMeta> = Vec::new();
    assert_eq!(Buddy::<_>::new(empty, pfn(0)).unwrap_err(), NewError::Empty);
    let meta = vec![FrameMeta::HOLE; 16];
    assert_eq!(
        Buddy::<_>::new(meta, pfn(FRAME_LIMIT - 8)).unwrap_err(),
        NewError::OutOfRange
    );
    let meta = vec![FrameMeta::HOLE; 16];
    let b = Buddy::<_>::new(meta, pfn(FRAME_LIMIT - 16)).unwrap();
    assert_eq!(b.window_frames(), 16);
    assert_eq!(b.managed_frames(), 0);
}

#[test]
fn new_overwrites_stale_metadata() {
    let mut b = buddy::<10>(0, 1024);
    b.alloc(ord(3)).unwrap();
    let meta = b.into_meta();
    let b = Buddy::<_>::new(meta, pfn(0)).unwrap();
    assert_eq!(b.managed_frames(), 0);
    assert_eq!(b.block_info(pfn(0)), None);
    b.check_invariants().unwrap();
}

#[test]
fn add_range_carves_naturally_aligned_blocks() {
    // Window base 0x3ff (not aligned), range [0x401, 0x1000): blocks 0x401/0, 0x402/1,
    // 0x404/2, ..., 0x800/10 ... — every block aligned in frame numbers.
    let mut b: Buddy<_, 10> = Buddy::new(vec![FrameMeta::HOLE; 0x1000], pfn(0x3ff)).unwrap();
    b.add_range(pfn(0x401), 0x13fe - 0x401).unwrap();
    b.check_invariants().unwrap();
    assert_eq!(b.managed_frames(), 0x13fe - 0x401);
    for o in 0..=9u8 {
        let info = b.block_info(pfn(0x400 + (1 << o))).unwrap();
        assert_eq!(
            (info.pfn.get(), info.order.get()),
            (0x400 + (1 << o), o),
            "order {o}"
        );
    }
    // [0x800, 0x1000) holds two order-10 blocks, then orders 9, 8, ..., 1 up to 0x13fe.
    let info = b.block_info(pfn(0xbff)).unwrap();
    assert_eq!((info.pfn.get(), info.order.get()), (0x800, 10));
    let info = b.block_info(pfn(0x11ff)).unwrap();
    assert_eq!((info.pfn.get(), info.order.get()), (0x1000, 9));
    assert_eq!(info.state, BlockState::Free { reported: false });
    let info = b.block_info(pfn(0x13fd)).unwrap();
    assert_eq!((info.pfn.get(), info.order.get()), (0x13fc, 1));
    assert_eq!(
        b.block_info(pfn(0x400)),
        None,
        "frame before the range is a hole"
    );
    assert_eq!(
        b.block_info(pfn(0x13fe)),
        None,
        "frame after the range is a hole"
    );
}

#[test]
fn order_nine_blocks_are_host_huge_pages() {
    // A window that starts 7 frames past a 2 MiB boundary.
    let base = 0x8_0000 + 7;
    let mut b = buddy::<10>(base, 4096);
    let mut blocks = Vec::new();
    while let Ok(block) = b.alloc(PageOrder::HUGE_2M) {
        assert_eq!(
            block.pfn.addr().get() % (2 << 20),
            0,
            "{block:?} is not on a 2 MiB boundary"
        );
        blocks.push(block);
    }
    // 4096 frames starting at +7 hold 7 whole 2 MiB pages.
    assert_eq!(blocks.len(), 7);
    for blk in blocks {
        b.free(blk.pfn, blk.order).unwrap();
    }
    b.check_invariants().unwrap();
}

#[test]
fn add_range_errors_change_nothing() {
    let mut b: Buddy<_, 10> = Buddy::new(vec![FrameMeta::HOLE; 256], pfn(100)).unwrap();
    b.add_range(pfn(120), 40).unwrap();
    let before = b.clone();
    assert_eq!(b.add_range(pfn(130), 0), Err(AddRangeError::Empty));
    assert_eq!(b.add_range(pfn(99), 4), Err(AddRangeError::OutsideWindow));
    assert_eq!(b.add_range(pfn(300), 57), Err(AddRangeError::OutsideWindow));
    assert_eq!(
        b.add_range(pfn(300), u64::MAX),
        Err(AddRangeError::OutsideWindow)
    );
    assert_eq!(b.add_range(pfn(110), 11), Err(AddRangeError::Overlap));
    assert_eq!(b.add_range(pfn(159), 5), Err(AddRangeError::Overlap));
    assert!(b.same_state(&before));
}

#[test]
fn adjacent_ranges_merge_and_holes_do_not() {
    let mut b: Buddy<_, 10> = Buddy::new(vec![FrameMeta::HOLE; 4096], pfn(0)).unwrap();
    b.add_range(pfn(0), 512).unwrap();
    b.add_range(pfn(512), 512).unwrap();
    assert_eq!(
        stats(&b, 10),
        (1, 0, 0),
        "two touching halves become one order-10 block"
    );
    b.add_range(pfn(2048), 1000).unwrap();
    b.add_range(pfn(3049), 1047).unwrap();
    b.check_invariants().unwrap();
    assert_eq!(
        b.block_info(pfn(3048)),
        None,
        "the one-frame hole stays a hole"
    );
    assert_eq!(b.managed_frames(), 1024 + 1000 + 1047);
    assert_eq!(b.free_frames(), b.managed_frames());
}

#[test]
fn alloc_splits_and_free_merges_back() {
    let mut b = buddy::<10>(0, 1024);
    let blk = b.alloc(ord(0)).unwrap();
    assert_eq!(
        blk,
        Block {
            pfn: pfn(0),
            order: ord(0),
            reported: false
        }
    );
    for o in 0..10 {
        assert_eq!(stats(&b, o), (1, 0, 0), "one upper half left at order {o}");
    }
    assert_eq!(b.allocated_frames(), 1);
    b.free(blk.pfn, blk.order).unwrap();
    assert_eq!(stats(&b, 10), (1, 0, 0));
    assert_eq!(b.free_frames(), 1024);
    b.check_invariants().unwrap();
}

#[test]
fn alloc_errors() {
    let mut b = buddy::<4>(0, 48);
    assert_eq!(b.alloc(ord(5)), Err(AllocError::OrderTooLarge));
    let a = b.alloc(ord(4)).unwrap();
    let c = b.alloc(ord(4)).unwrap();
    let d = b.alloc(ord(4)).unwrap();
    assert_eq!(
        [a.pfn.get(), c.pfn.get(), d.pfn.get()],
        [0, 16, 32],
        "ascending on a fresh allocator"
    );
    assert_eq!(b.alloc(ord(0)), Err(AllocError::OutOfMemory));
    assert_eq!(b.alloc_at_most(ord(3)), Err(AllocError::OutOfMemory));
}

#[test]
fn free_errors_are_typed_and_change_nothing() {
    let mut b: Buddy<_, 10> = Buddy::new(vec![FrameMeta::HOLE; 2048], pfn(1024)).unwrap();
    b.add_range(pfn(1024), 1024).unwrap();
    let a = b.alloc(ord(2)).unwrap();
    let big = b.alloc(ord(3)).unwrap();
    let gone = b.alloc(ord(0)).unwrap();
    assert_eq!(
        [a.pfn.get(), big.pfn.get(), gone.pfn.get()],
        [1024, 1032, 1028]
    );
    b.free(gone.pfn, gone.order).unwrap(); // merges back into 1028/2
    let mut iso = ArrayVec::<Block, 4>::new();
    b.isolate(ord(4), 1, &mut iso).unwrap();
    assert_eq!((iso[0].pfn.get(), iso[0].order.get()), (1040, 4));
    let before = b.clone();
    assert_eq!(b.free(a.pfn, ord(11)), Err(FreeError::OrderTooLarge));
    assert_eq!(b.free(pfn(1026), ord(2)), Err(FreeError::Unaligned));
    assert_eq!(b.free(pfn(1000), ord(0)), Err(FreeError::OutOfRange));
    assert_eq!(b.free(pfn(4000), ord(0)), Err(FreeError::OutOfRange));
    assert_eq!(
        b.free(pfn(2048), ord(0)),
        Err(FreeError::OutOfRange),
        "hole inside the window"
    );
    assert_eq!(
        b.free(pfn(1024), ord(10)),
        Err(FreeError::WrongOrder),
        "block start, wrong order"
    );
    assert_eq!(b.free(a.pfn, ord(1)), Err(FreeError::WrongOrder));
    assert_eq!(
        b.free(pfn(1034), ord(1)),
        Err(FreeError::WrongOrder),
        "interior of an allocated block"
    );
    assert_eq!(
        b.free(pfn(1028), ord(2)),
        Err(FreeError::DoubleFree),
        "a free block"
    );
    assert_eq!(
        b.free(pfn(1029), ord(0)),
        Err(FreeError::DoubleFree),
        "inside a free block"
    );
    assert_eq!(
        b.free(pfn(1056), ord(5)),
        Err(FreeError::DoubleFree),
        "a larger free block"
    );
    assert_eq!(b.free(iso[0].pfn, ord(4)), Err(FreeError::Isolated));
    assert_eq!(
        b.free(pfn(1048), ord(3)),
        Err(FreeError::Isolated),
        "inside an isolated block"
    );
    assert!(b.same_state(&before));
    b.free(big.pfn, big.order).unwrap();
    assert_eq!(b.free(big.pfn, big.order), Err(FreeError::DoubleFree));
    b.check_invariants().unwrap();
}

#[test]
fn freed_blocks_are_reused_first() {
    let mut b = buddy::<10>(0, 1024);
    let x = b.alloc(ord(0)).unwrap();
    let y = b.alloc(ord(0)).unwrap();
    let z = b.alloc(ord(0)).unwrap();
    b.free(z.pfn, z.order).unwrap();
    b.free(x.pfn, x.order).unwrap();
    // x has no free buddy (y is allocated): it sits at the head and comes back first.
    assert_eq!(b.alloc(ord(0)).unwrap().pfn, x.pfn);
    let _ = y;
}

/// Reports every free block of `order`: isolate all, put all back reported.
fn report_all<S: DerefMut<Target = [FrameMeta]>, const M: usize>(b: &mut Buddy<S, M>, o: u8) {
    for blk in isolate_all(b, o) {
        b.put_back(blk.pfn, blk.order, true).unwrap();
    }
}

#[test]
fn alloc_prefers_unreported_within_an_order_and_says_reported() {
    let mut b = buddy::<4>(0, 64);
    // Four order-4 blocks; report three of them.
    let mut out = ArrayVec::<Block, 3>::new();
    assert_eq!(
        b.isolate(ord(4), 10, &mut out),
        Ok(3),
        "capacity of the batch bounds isolation"
    );
    for blk in &out {
        b.put_back(blk.pfn, blk.order, true).unwrap();
    }
    assert_eq!(stats(&b, 4), (4, 3, 0));
    assert_eq!(b.reported_frames(), 48);
    let first = b.alloc(ord(4)).unwrap();
    assert!(!first.reported, "the one unreported block is taken first");
    assert_eq!(first.pfn.get(), 48);
    let second = b.alloc(ord(4)).unwrap();
    assert!(
        second.reported,
        "then reported ones, and the caller is told"
    );
    assert_eq!(b.reported_frames(), 32);
    b.check_invariants().unwrap();
}

#[test]
fn alloc_does_not_split_a_larger_block_to_avoid_a_reported_one() {
    let mut b = buddy::<4>(0, 32);
    let blk = b.alloc(ord(3)).unwrap(); // splits block 0: free 8/3, 16/4
    assert_eq!(
        blk.pfn.get(),
        0,
        "a fresh allocator hands out low addresses first"
    );
    report_all(&mut b, 3);
    assert_eq!(stats(&b, 3), (1, 1, 0));
    let again = b.alloc(ord(3)).unwrap();
    assert_eq!(
        (again.pfn.get(), again.reported),
        (8, true),
        "reported order-3 block, not a split of 16/4"
    );
    assert_eq!(stats(&b, 4), (1, 0, 0));
    b.free(blk.pfn, blk.order).unwrap();
    b.free(again.pfn, again.order).unwrap();
    assert_eq!(
        stats(&b, 4),
        (2, 0, 0),
        "merged with an unreported half: unreported"
    );
}

#[test]
fn split_halves_keep_reported_and_merge_needs_both() {
    let mut b = buddy::<4>(0, 16);
    report_all(&mut b, 4);
    assert_eq!(b.reported_frames(), 16);
    let x = b.alloc(ord(1)).unwrap();
    assert!(x.reported);
    // Halves at orders 1, 2, 3 are reported and at the tail of their lists.
    for o in 1..=3 {
        assert_eq!(stats(&b, o), (1, 1, 0), "order {o}");
    }
    assert_eq!(b.reported_frames(), 14);
    // Put the block back through isolate/put_back is not possible (it is allocated); free it:
    // the freed half is unreported, so the merge result is unreported.
    b.free(x.pfn, x.order).unwrap();
    assert_eq!(stats(&b, 4), (1, 0, 0));
    assert_eq!(b.reported_frames(), 0);
    // Two reported halves merge into a reported block.
    let lo = b.alloc(ord(3)).unwrap();
    report_all(&mut b, 3);
    b.free(lo.pfn, lo.order).unwrap();
    assert_eq!(stats(&b, 4), (1, 0, 0));
    let halves = [b.alloc(ord(3)).unwrap(), b.alloc(ord(3)).unwrap()];
    for h in halves {
        b.free(h.pfn, h.order).unwrap();
    }
    let hi = b.alloc(ord(3)).unwrap();
    report_all(&mut b, 3);
    let mut iso = ArrayVec::<Block, 1>::new();
    b.free(hi.pfn, hi.order).unwrap(); // merges with the reported buddy: unreported 0/4
    report_all(&mut b, 4);
    assert_eq!(stats(&b, 4), (1, 1, 0));
    assert_eq!(
        b.isolate(ord(4), 1, &mut iso),
        Ok(0),
        "reported blocks are never isolated"
    );
    b.check_invariants().unwrap();
}

#[test]
fn reported_put_back_merges_only_with_reported_buddy() {
    let mut b = buddy::<4>(0, 16);
    let a = b.alloc(ord(3)).unwrap(); // 0/3; 8/3 free
    let iso = isolate_all(&mut b, 3);
    assert_eq!(iso.len(), 1);
    b.free(a.pfn, a.order).unwrap(); // 0/3 free, buddy isolated: no merge
    assert_eq!(stats(&b, 3), (1, 0, 1));
    b.put_back(iso[0].pfn, iso[0].order, true).unwrap();
    assert_eq!(
        stats(&b, 4),
        (1, 0, 0),
        "reported + unreported = unreported"
    );
    // Now both halves reported: isolate 0/4? It is unreported; report it whole, split, rejoin.
    report_all(&mut b, 4);
    let x = b.alloc(ord(3)).unwrap();
    assert!(x.reported);
    let iso = isolate_all(&mut b, 3);
    assert!(
        iso.is_empty(),
        "the remaining half is reported, nothing to isolate"
    );
    b.free(x.pfn, x.order).unwrap();
    assert_eq!(stats(&b, 4), (1, 0, 0));
    b.check_invariants().unwrap();
}

#[test]
fn isolate_takes_from_the_head_and_isolated_blocks_are_untouchable() {
    let mut b = buddy::<9>(0, 4096); // eight order-9 blocks
    let mut out = ArrayVec::<Block, 32>::new();
    assert_eq!(b.isolate(ord(9), 3, &mut out), Ok(3));
    assert_eq!(stats(&b, 9), (5, 0, 3));
    assert_eq!(b.isolated_frames(), 3 * 512);
    for blk in &out {
        assert_eq!(b.block_info(blk.pfn).unwrap().state, BlockState::Isolated);
    }
    // Allocate everything that is left: never an isolated frame.
    let mut got = Vec::new();
    while let Ok(blk) = b.alloc(ord(0)) {
        assert!(
            !out.iter()
                .any(|i| i.pfn.get() <= blk.pfn.get() && blk.pfn.get() < i.pfn.get() + 512)
        );
        got.push(blk);
    }
    assert_eq!(got.len(), 5 * 512);
    for blk in got {
        b.free(blk.pfn, blk.order).unwrap();
    }
    assert_eq!(
        stats(&b, 9),
        (5, 0, 3),
        "free buddies of isolated blocks did not merge with them"
    );
    b.check_invariants().unwrap();
    assert_eq!(
        b.isolate(ord(10), 1, &mut out),
        Err(IsolateError::OrderTooLarge)
    );
    for blk in out.clone() {
        b.put_back(blk.pfn, blk.order, false).unwrap();
    }
    assert_eq!(stats(&b, 9), (8, 0, 0));
}

#[test]
fn failed_report_goes_behind_other_unreported_blocks() {
    let mut b = buddy::<4>(0, 80); // five order-4 blocks: 0, 16, 32, 48, 64
    let order = |b: &Buddy<Vec<FrameMeta>, 4>| {
        let mut taken = Vec::new();
        let mut bb = b.clone();
        while let Ok(x) = bb.alloc(ord(4)) {
            taken.push((x.pfn.get(), x.reported));
        }
        taken
    };
    // Report two blocks successfully, fail one.
    let mut out = ArrayVec::<Block, 3>::new();
    b.isolate(ord(4), 3, &mut out).unwrap();
    b.put_back(out[0].pfn, out[0].order, true).unwrap();
    b.put_back(out[1].pfn, out[1].order, false).unwrap();
    b.put_back(out[2].pfn, out[2].order, true).unwrap();
    let seq = order(&b);
    // Unreported first (the failed one last among them), then reported in put-back order.
    let unreported: Vec<_> = seq.iter().take_while(|(_, r)| !r).collect();
    assert_eq!(unreported.len(), 3);
    assert_eq!(
        unreported[2].0,
        out[1].pfn.get(),
        "failed block retried after the others"
    );
    assert_eq!(
        seq[3..].iter().map(|x| x.0).collect::<Vec<_>>(),
        [out[0].pfn.get(), out[2].pfn.get()]
    );
    // The next isolation pass starts with blocks not yet tried.
    let mut again = ArrayVec::<Block, 8>::new();
    b.isolate(ord(4), 8, &mut again).unwrap();
    assert_eq!(again.len(), 3);
    assert_eq!(again[2].pfn, out[1].pfn);
}

/// The frame numbers of the unreported blocks of order `o`, head first (by allocating
/// from a clone until the order runs out of unreported blocks).
fn unreported_in_list_order<const M: usize>(b: &Buddy<Vec<FrameMeta>, M>, o: u8) -> Vec<u64> {
    let mut bb = b.clone();
    let n = bb.order_stats(ord(o));
    (0..n.free - n.reported)
        .map(|_| bb.alloc(ord(o)).unwrap())
        .inspect(|x| assert!(!x.reported))
        .map(|x| x.pfn.get())
        .collect()
}

#[test]
fn isolate_cold_takes_the_blocks_freed_longest_ago() {
    let mut b = buddy::<4>(0, 80); // five order-4 blocks, queued 0, 16, 32, 48, 64
    assert_eq!(unreported_in_list_order(&b, 4), [0, 16, 32, 48, 64]);
    // Allocating and freeing the head block keeps it the hottest.
    let x = b.alloc(ord(4)).unwrap();
    assert_eq!(x.pfn.get(), 0);
    b.free(x.pfn, x.order).unwrap();
    let mut out = ArrayVec::<Block, 8>::new();
    assert_eq!(b.isolate_cold(ord(4), 2, &mut out), Ok(2));
    assert_eq!(
        out.iter().map(|x| x.pfn.get()).collect::<Vec<_>>(),
        [64, 48],
        "coldest first"
    );
    assert!(out.iter().all(|x| !x.reported && x.order == ord(4)));
    assert_eq!(stats(&b, 4), (3, 0, 2));
    b.check_invariants().unwrap();
    // With a reported segment, the cold end is just before it.
    b.put_back(out[0].pfn, out[0].order, true).unwrap();
    let mut more = ArrayVec::<Block, 8>::new();
    assert_eq!(b.isolate_cold(ord(4), 1, &mut more), Ok(1));
    assert_eq!(
        more[0].pfn.get(),
        32,
        "skips nothing, takes no reported block"
    );
    b.check_invariants().unwrap();
    // Capacity of `out` and `max` bound it; reported blocks are never taken.
    let mut one = ArrayVec::<Block, 1>::new();
    assert_eq!(b.isolate_cold(ord(4), 9, &mut one), Ok(1));
    let mut rest = ArrayVec::<Block, 8>::new();
    assert_eq!(b.isolate_cold(ord(4), 9, &mut rest), Ok(1));
    assert_eq!(b.isolate_cold(ord(4), 9, &mut rest), Ok(0));
    assert_eq!(stats(&b, 4), (1, 1, 4));
    assert_eq!(
        b.isolate_cold(ord(5), 1, &mut rest),
        Err(IsolateError::OrderTooLarge)
    );
    b.check_invariants().unwrap();
}

#[test]
fn cold_isolation_with_hot_put_back_rotates_through_every_block() {
    let mut b = buddy::<4>(0, 80);
    // Every report fails: each block must still be tried once before any is tried twice.
    let mut tried = Vec::new();
    for _ in 0..5 {
        let mut out = ArrayVec::<Block, 1>::new();
        b.isolate_cold(ord(4), 1, &mut out).unwrap();
        tried.push(out[0].pfn.get());
        b.put_back_hot(out[0].pfn, out[0].order).unwrap();
        b.check_invariants().unwrap();
    }
    tried.sort_unstable();
    assert_eq!(tried, [0, 16, 32, 48, 64]);
    // A failed block is the first `alloc` hands out (still backed by the host).
    let mut out = ArrayVec::<Block, 2>::new();
    b.isolate_cold(ord(4), 2, &mut out).unwrap();
    b.put_back_hot(out[1].pfn, out[1].order).unwrap();
    b.put_back(out[0].pfn, out[0].order, true).unwrap();
    let first = b.alloc(ord(4)).unwrap();
    assert_eq!(first.pfn, out[1].pfn);
    assert!(!first.reported);
}

#[test]
fn put_back_hot_merges_and_checks_like_put_back() {
    let mut b = buddy::<4>(0, 32); // two order-4 blocks: 0 and 16
    let x = b.alloc(ord(3)).unwrap(); // 0..8; 8/3 free
    assert_eq!(x.pfn.get(), 0);
    let mut out = ArrayVec::<Block, 4>::new();
    b.isolate_cold(ord(3), 1, &mut out).unwrap();
    assert_eq!(out[0].pfn.get(), 8);
    let before = b.clone();
    assert_eq!(
        b.put_back_hot(pfn(0), ord(3)),
        Err(PutBackError::NotIsolated)
    );
    assert_eq!(
        b.put_back_hot(pfn(8), ord(2)),
        Err(PutBackError::WrongOrder)
    );
    assert_eq!(b.put_back_hot(pfn(4), ord(3)), Err(PutBackError::Unaligned));
    assert!(b.same_state(&before));
    b.free(x.pfn, x.order).unwrap();
    assert_eq!(stats(&b, 3), (1, 0, 1), "no merge with an isolated buddy");
    b.put_back_hot(pfn(8), ord(3)).unwrap();
    assert_eq!(stats(&b, 4), (2, 0, 0), "merged on put-back");
    b.check_invariants().unwrap();
}

#[test]
fn free_merged_says_the_order_the_block_ended_in() {
    let mut b = buddy::<10>(0, 1024);
    let pages: Vec<_> = (0..1024).map(|_| b.alloc(ord(0)).unwrap()).collect();
    let mut merged = Vec::new();
    for p in pages.iter().filter(|p| p.pfn.get() < 512) {
        merged.push(b.free_merged(p.pfn, p.order).unwrap().get());
    }
    // Freeing the pages of [0, 512) in ascending order: odd pages complete pairs and more.
    assert_eq!(merged[0], 0);
    assert_eq!(merged[1], 1);
    assert_eq!(merged[3], 2);
    assert_eq!(
        *merged.last().unwrap(),
        9,
        "the last page completes a 2 MiB block"
    );
    assert_eq!(merged.iter().filter(|&&m| m == 9).count(), 1);
    for p in pages.iter().filter(|p| p.pfn.get() >= 512).take(511) {
        assert!(b.free_merged(p.pfn, p.order).unwrap().get() < 9);
    }
    assert_eq!(b.free_merged(pages[1023].pfn, ord(0)), Ok(ord(10)));
    assert_eq!(
        b.free_merged(pages[1023].pfn, ord(0)),
        Err(FreeError::DoubleFree)
    );
    b.check_invariants().unwrap();
    let locked = LockedBuddy::new(b);
    let x = locked.alloc(ord(9)).unwrap();
    assert_eq!(locked.free_merged(x.pfn, x.order), Ok(ord(10)));
}

#[test]
fn free_notify_says_the_merged_order_only_from_the_notify_order() {
    let mut b = buddy::<10>(0, 1024);
    assert_eq!(b.notify_order(), None);
    let pages: Vec<_> = (0..1024).map(|_| b.alloc(ord(0)).unwrap()).collect();
    // No notify order: nothing is said, even for a free that completes the 2 MiB block.
    for p in pages.iter().filter(|p| p.pfn.get() < 512) {
        assert_eq!(b.free_notify(p.pfn, p.order), Ok(None));
    }
    assert_eq!(b.order_stats(ord(9)).free, 1);
    b.set_notify_order(Some(ord(9)));
    assert_eq!(b.notify_order(), Some(ord(9)));
    let mut said = Vec::new();
    for p in pages.iter().filter(|p| p.pfn.get() >= 512) {
        said.push(b.free_notify(p.pfn, p.order).unwrap());
    }
    assert!(said[..511].iter().all(Option::is_none));
    assert_eq!(
        said[511],
        Some(ord(10)),
        "the last page completes the whole block"
    );
    b.check_invariants().unwrap();
    // A block at or above the notify order is said even when it merges nothing.
    let x = b.alloc(ord(9)).unwrap();
    let y = b.alloc(ord(9)).unwrap();
    assert_eq!(b.free_notify(x.pfn, x.order), Ok(Some(ord(9))));
    assert_eq!(b.free_notify(y.pfn, y.order), Ok(Some(ord(10))));
    let z = b.alloc(ord(10)).unwrap();
    assert_eq!(b.free_notify(z.pfn, z.order), Ok(Some(ord(10))));
    // A notify order above MAX_ORDER never says anything.
    b.set_notify_order(Some(ord(11)));
    let z = b.alloc(ord(10)).unwrap();
    assert_eq!(b.free_notify(z.pfn, z.order), Ok(None));
    b.set_notify_order(None);
    assert_eq!(b.notify_order(), None);
}

#[test]
fn free_notify_frees_like_free_merged() {
    // The same random alloc/free sequence on two allocators, one freeing with `free_merged`
    // and one with `free_notify` (notify order 3): same results, same state, always.
    let mut a = buddy::<10>(0, 4096);
    let mut n = buddy::<10>(0, 4096);
    n.set_notify_order(Some(ord(3)));
    let mut rng = Rng::new(11);
    let mut live = Vec::new();
    for _ in 0..20_000 {
        if live.is_empty() || rng.below(2) == 0 {
            let o = ord((rng.below(4) * rng.below(4)) as u8);
            let x = a.alloc(o);
            assert_eq!(n.alloc(o), x);
            live.extend(x.ok());
        } else {
            let x = live.swap_remove(rng.below(live.len() as u64) as usize);
            let merged = a.free_merged(x.pfn, x.order).unwrap();
            let said = n.free_notify(x.pfn, x.order).unwrap();
            assert_eq!(said, (merged >= ord(3)).then_some(merged));
        }
        // Errors are the same too, and change nothing.
        let garbage = pfn(rng.below(4200));
        let o = ord(rng.below(12) as u8);
        let before = n.clone();
        let e = a.free_merged(garbage, o);
        if e.is_ok() {
            // The garbage happened to be a live block: undo by freeing it in `n` too.
            live.retain(|b| b.pfn != garbage);
            assert_eq!(n.free_notify(garbage, o).map(|_| ()), Ok(()));
            continue;
        }
        assert_eq!(n.free_notify(garbage, o), e.map(Some));
        assert!(n.same_state(&before));
    }
    a.check_invariants().unwrap();
    n.check_invariants().unwrap();
    assert_eq!(a.free_frames(), n.free_frames());
}

#[test]
fn put_back_errors_are_typed_and_change_nothing() {
    let mut b = buddy::<4>(32, 64);
    let mut out = ArrayVec::<Block, 2>::new();
    b.isolate(ord(4), 1, &mut out).unwrap();
    let a = b.alloc(ord(2)).unwrap();
    let before = b.clone();
    let iso = out[0];
    assert_eq!(
        b.put_back(iso.pfn, ord(5), true),
        Err(PutBackError::OrderTooLarge)
    );
    assert_eq!(
        b.put_back(pfn(iso.pfn.get() + 1), ord(4), true),
        Err(PutBackError::Unaligned)
    );
    assert_eq!(
        b.put_back(pfn(16), ord(4), true),
        Err(PutBackError::OutOfRange)
    );
    assert_eq!(
        b.put_back(iso.pfn, ord(3), true),
        Err(PutBackError::WrongOrder)
    );
    assert_eq!(
        b.put_back(pfn(iso.pfn.get() + 8), ord(3), true),
        Err(PutBackError::NotIsolated)
    );
    assert_eq!(
        b.put_back(a.pfn, a.order, true),
        Err(PutBackError::NotIsolated),
        "allocated"
    );
    assert_eq!(
        b.put_back(pfn(a.pfn.get() + 4), ord(2), true),
        Err(PutBackError::NotIsolated),
        "free"
    );
    assert!(b.same_state(&before));
    b.put_back(iso.pfn, iso.order, true).unwrap();
    assert_eq!(
        b.put_back(iso.pfn, iso.order, true),
        Err(PutBackError::NotIsolated),
        "twice"
    );
}

#[test]
fn alloc_at_most_falls_back_order_by_order() {
    let mut b = buddy::<10>(0, 2048);
    // Take everything as order-0 pages, then free every other one plus one whole 2 MiB block.
    let pages: Vec<_> = (0..2048).map(|_| b.alloc(ord(0)).unwrap()).collect();
    for p in pages
        .iter()
        .filter(|p| p.pfn.get() % 2 == 0 || p.pfn.get() >= 1536)
    {
        b.free(p.pfn, p.order).unwrap();
    }
    assert_eq!(stats(&b, 9), (1, 0, 0));
    let x = b.alloc_at_most(ord(18)).unwrap();
    assert_eq!(
        (x.pfn.get(), x.order.get()),
        (1536, 9),
        "above MAX_ORDER is read as MAX_ORDER"
    );
    let y = b.alloc_at_most(ord(9)).unwrap();
    assert_eq!(y.order.get(), 0, "only single pages are left");
    assert_eq!(b.alloc_at_most(ord(0)).unwrap().order.get(), 0);
    b.check_invariants().unwrap();
}

#[test]
fn reset_reported_clears_everything() {
    let mut b = buddy::<4>(0, 64);
    report_all(&mut b, 4);
    let x = b.alloc(ord(2)).unwrap();
    assert!(x.reported);
    assert!(b.reported_frames() > 0);
    b.reset_reported();
    assert_eq!(b.reported_frames(), 0);
    for o in 0..=4 {
        assert_eq!(stats(&b, o).1, 0);
    }
    assert!(!b.alloc(ord(2)).unwrap().reported);
    assert_eq!(
        isolate_all(&mut b, 4).len(),
        3,
        "all blocks are candidates again"
    );
    b.check_invariants().unwrap();
}

#[test]
fn add_range_reported_starts_reported() {
    let mut b: Buddy<_, 4> = Buddy::new(vec![FrameMeta::HOLE; 64], pfn(0)).unwrap();
    b.add_range_reported(pfn(0), 32).unwrap();
    b.add_range(pfn(32), 32).unwrap();
    assert_eq!(stats(&b, 4), (4, 2, 0));
    assert_eq!(isolate_all(&mut b, 4).len(), 2);
    b.check_invariants().unwrap();
}

#[test]
fn max_order_is_a_const_generic() {
    let mut small = buddy::<2>(0, 64);
    assert_eq!(small.max_order(), ord(2));
    assert_eq!(stats(&small, 2), (16, 0, 0));
    assert_eq!(small.alloc(ord(3)), Err(AllocError::OrderTooLarge));
    let mut gig = buddy::<18>(0, 1 << 18);
    let g = gig.alloc(ord(18)).unwrap();
    assert_eq!(g.order.bytes(), 1 << 30);
    gig.free(g.pfn, g.order).unwrap();
    let _ = &mut small;
}

#[test]
fn block_info_describes_every_state() {
    let mut b = buddy::<4>(0, 32);
    let a = b.alloc(ord(2)).unwrap();
    let info = b.block_info(pfn(a.pfn.get() + 3)).unwrap();
    assert_eq!(
        (info.pfn, info.order, info.state),
        (a.pfn, ord(2), BlockState::Allocated)
    );
    assert_eq!(b.block_info(pfn(100)), None);
    assert_eq!(b.block_info(pfn(FRAME_LIMIT - 1)), None);
}

#[test]
fn locked_buddy_serves_several_threads() {
    let b = buddy::<10>(0, 1 << 14);
    let locked = LockedBuddy::new(b);
    std::thread::scope(|s| {
        for t in 0..2u64 {
            let locked = &locked;
            s.spawn(move || {
                let mut rng = Rng::new(t + 1);
                let mut held = Vec::new();
                for _ in 0..20_000 {
                    if held.len() < 64 && rng.below(2) == 0 {
                        if let Ok(blk) = locked.alloc(ord(rng.below(4) as u8)) {
                            held.push(blk);
                        }
                    } else if let Some(blk) = held.pop() {
                        locked.free(blk.pfn, blk.order).unwrap();
                    }
                }
                for blk in held {
                    locked.free(blk.pfn, blk.order).unwrap();
                }
            });
        }
    });
    let mut locked = locked;
    let b = locked.get_mut();
    b.check_invariants().unwrap();
    assert_eq!(b.free_frames(), 1 << 14);
    assert_eq!(stats(b, 10), (16, 0, 0));
    assert!(locked.try_lock().is_some());
    let b = locked.into_inner();
    assert_eq!(b.allocated_frames(), 0);
}

#[cfg(feature = "alloc")]
#[test]
fn with_window_builds_its_metadata() {
    let mut b = Buddy::<_, 10>::with_window(pfn(1 << 18), 1 << 18).unwrap();
    b.add_range(pfn(1 << 18), 1 << 18).unwrap();
    assert_eq!(b.free_frames(), 1 << 18);
    assert_eq!(
        Buddy::<_, 10>::with_window(pfn(0), 0).unwrap_err(),
        WithWindowError::New(NewError::Empty)
    );
}

/// Replays `ops` random ops from `seed` against the model, then frees everything and checks
/// that memory merged back fully.
fn model_run(seed: u64, ops: usize) {
    let mut h = BuddyHarness::new();
    let mut rng = Rng::new(seed);
    // Start with three ranges and holes between them.
    for (start, frames) in [(0u16, 1500u16), (1700, 2900), (5000, 2999)] {
        h.apply(crate::testing::buddy::BuddyOp::AddRange {
            start,
            frames,
            reported: false,
        })
        .unwrap();
    }
    for i in 0..ops {
        let op = random_op(&mut rng);
        if let Err(e) = h.apply(op) {
            panic!("seed {seed}, op {i} {op:?}: {e}");
        }
    }
    h.finish()
        .unwrap_or_else(|e| panic!("seed {seed}: finish: {e}"));
}

#[test]
fn randomized_ops_match_the_model() {
    for seed in 1..=12 {
        model_run(seed, 3000);
    }
}
