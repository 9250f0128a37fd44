use std::vec;
use std::vec::Vec;

use arrayvec::ArrayVec;

use super::*;
use crate::buddy::BlockState;

fn pfn(p: u64) -> Pfn {
    Pfn::new(p).unwrap()
}

fn ord(o: u8) -> PageOrder {
    PageOrder::new(o).unwrap()
}

fn buddy(base: u64, frames: u64) -> Buddy<Vec<FrameMeta>, 10> {
    let mut b = Buddy::new(vec![FrameMeta::HOLE; frames as usize], pfn(base)).unwrap();
    b.add_range(pfn(base), frames).unwrap();
    b
}

/// `usemem --punch-holes` over the first `frames`: all order 0, every even frame freed.
fn punch_holes(b: &mut Buddy<Vec<FrameMeta>, 10>, frames: u64) -> Vec<Block> {
    let all: Vec<Block> = (0..frames).map(|_| b.alloc(ord(0)).unwrap()).collect();
    let mut kept = Vec::new();
    for blk in all {
        if blk.pfn.get() % 2 == 0 {
            b.free(blk.pfn, blk.order).unwrap();
        } else {
            kept.push(blk);
        }
    }
    kept
}

#[test]
fn free_frames_within_counts_one_host_page() {
    let mut b = buddy(0, 4096);
    punch_holes(&mut b, 1024);
    assert_eq!(b.free_frames_within(pfn(0), ord(9)), 256);
    assert_eq!(
        b.free_frames_within(pfn(700), ord(9)),
        256,
        "any frame names its page"
    );
    assert_eq!(b.free_frames_within(pfn(1024), ord(9)), 512);
    // A free order-10 block covers the range [2048, 2560) and beyond.
    assert_eq!(b.free_frames_within(pfn(2048), ord(9)), 512);
    assert_eq!(b.free_frames_within(pfn(2048), ord(4)), 16);
    assert_eq!(b.free_frames_within(pfn(0), ord(11)), 256 + 256 + 1024);
    assert_eq!(
        b.free_frames_within(pfn(1 << 20), ord(9)),
        0,
        "outside the window"
    );
    // Isolated blocks are not free.
    let mut out = ArrayVec::<Block, 4>::new();
    b.isolate(ord(10), 1, &mut out).unwrap();
    assert_eq!(b.free_frames_within(out[0].pfn, ord(9)), 0);
}

#[test]
fn free_frames_within_clips_to_the_window() {
    // A window that starts 100 frames into a 2 MiB page.
    let b = buddy(0x200 + 100, 1000);
    assert_eq!(b.free_frames_within(pfn(0x200), ord(9)), 412);
    assert_eq!(b.free_frames_within(pfn(0x400), ord(9)), 512);
    assert_eq!(b.free_frames_within(pfn(0x600), ord(9)), 1000 - 412 - 512);
}

#[test]
fn alloc_within_stays_inside_and_prefers_the_tightest_block() {
    let mut b = buddy(0, 2048);
    punch_holes(&mut b, 512);
    // Only order-0 holes in [0, 512): alloc_within(order 3) falls back to order 0.
    let blk = b.alloc_within(pfn(5), ord(9), ord(3)).unwrap();
    assert_eq!(blk.order.get(), 0);
    assert!(blk.pfn.get() < 512 && blk.pfn.get() % 2 == 0);
    b.check_invariants().unwrap();
    // In [512, 1024) everything is free as one order-9 block: order 3 is carved from it.
    let blk = b.alloc_within(pfn(600), ord(9), ord(3)).unwrap();
    assert_eq!((blk.pfn.get(), blk.order.get()), (512, 3));
    b.check_invariants().unwrap();
    // Now [512, 1024) holds free blocks of orders 3..=8: order 3 comes from the order-3
    // block, not from splitting a bigger one.
    let before = b.order_stats(ord(3)).free;
    let blk = b.alloc_within(pfn(512), ord(9), ord(3)).unwrap();
    assert_eq!((blk.pfn.get(), blk.order.get()), (520, 3));
    assert_eq!(b.order_stats(ord(3)).free, before - 1);
    b.check_invariants().unwrap();
}

#[test]
fn alloc_within_carves_a_covering_block_down_to_the_range() {
    let mut b = buddy(0, 1024);
    // One free order-10 block; take order 0 inside the second 2 MiB page.
    let blk = b.alloc_within(pfn(700), ord(9), ord(0)).unwrap();
    assert_eq!((blk.pfn.get(), blk.order.get()), (512, 0));
    b.check_invariants().unwrap();
    // The first half is still one free order-9 block; the second half is split down.
    assert_eq!(
        b.block_info(pfn(0)).unwrap().state,
        BlockState::Free { reported: false }
    );
    assert_eq!(b.block_info(pfn(0)).unwrap().order.get(), 9);
    for o in 0..9u8 {
        assert_eq!(b.order_stats(ord(o)).free, 1, "order {o}");
    }
    assert_eq!(b.free_frames_within(pfn(512), ord(9)), 511);
    b.free(blk.pfn, blk.order).unwrap();
    assert_eq!(b.order_stats(ord(10)).free, 1, "merges back");
    b.check_invariants().unwrap();
}

#[test]
fn alloc_within_keeps_reported_flags() {
    let mut b = buddy(0, 1024);
    let mut out = ArrayVec::<Block, 4>::new();
    b.isolate(ord(10), 1, &mut out).unwrap();
    b.put_back(out[0].pfn, out[0].order, true).unwrap();
    let blk = b.alloc_within(pfn(300), ord(8), ord(2)).unwrap();
    assert!(blk.reported);
    assert_eq!((blk.pfn.get(), blk.order.get()), (256, 2));
    assert_eq!(
        b.reported_frames(),
        1024 - 4,
        "the carved halves stay reported"
    );
    b.check_invariants().unwrap();
}

#[test]
fn alloc_within_errors_change_nothing() {
    let mut b = buddy(0, 1024);
    b.alloc(ord(9)).unwrap();
    let before = b.clone();
    assert_eq!(
        b.alloc_within(pfn(0), ord(9), ord(11)),
        Err(AllocError::OrderTooLarge)
    );
    assert_eq!(
        b.alloc_within(pfn(100), ord(9), ord(0)),
        Err(AllocError::OutOfMemory),
        "the page is allocated"
    );
    assert_eq!(
        b.alloc_within(pfn(5000), ord(9), ord(0)),
        Err(AllocError::OutOfMemory),
        "outside the window"
    );
    assert!(b.same_state(&before));
    // An order above the range is capped at the range.
    let blk = b.alloc_within(pfn(512), ord(4), ord(9)).unwrap();
    assert_eq!((blk.pfn.get(), blk.order.get()), (512, 4));
}

#[test]
fn locked_buddy_forwards() {
    let lb = crate::buddy::LockedBuddy::new(buddy(0, 1024));
    assert_eq!(lb.free_frames_within(pfn(0), ord(9)), 512);
    let blk = lb.alloc_within(pfn(0), ord(9), ord(0)).unwrap();
    assert_eq!(lb.free_frames_within(pfn(0), ord(9)), 511);
    lb.free(blk.pfn, blk.order).unwrap();
}
