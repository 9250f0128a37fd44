use std::vec;
use std::vec::Vec;

use arrayvec::ArrayVec;

use super::*;
use crate::buddy::Buddy;
use crate::testing::Rng;

type Guest = LockedBuddy<Vec<FrameMeta>, 10>;

fn pfn(p: u64) -> Pfn {
    Pfn::new(p).unwrap()
}

fn ord(o: u8) -> PageOrder {
    PageOrder::new(o).unwrap()
}

fn guest(frames: u64) -> Guest {
    let mut b = Buddy::new(vec![FrameMeta::HOLE; frames as usize], pfn(0)).unwrap();
    b.add_range(pfn(0), frames).unwrap();
    LockedBuddy::new(b)
}

fn balloon(frames: u64, order: u8, policy: FallbackPolicy) -> Balloon<Vec<u64>> {
    let cfg = BalloonConfig {
        order: ord(order),
        host_order: ord(9),
        policy,
    };
    let words = Balloon::<Vec<u64>>::storage_words(pfn(0), frames, cfg.host_order).unwrap();
    Balloon::new(vec![0; words], pfn(0), frames, cfg).unwrap()
}

/// `usemem --punch-holes` over the first `frames` frames: allocate them as 4 KiB pages, free
/// every other one, in address order or in random order. Returns the pages still held.
fn punch_holes(g: &Guest, frames: u64, shuffle: Option<u64>) -> Vec<Block> {
    let pages: Vec<Block> = (0..frames).map(|_| g.alloc(ord(0)).unwrap()).collect();
    let (mut holes, kept): (Vec<Block>, Vec<Block>) =
        pages.into_iter().partition(|b| b.pfn.get() % 2 == 0);
    if let Some(seed) = shuffle {
        let mut rng = Rng::new(seed);
        for i in (1..holes.len()).rev() {
            holes.swap(i, rng.below(i as u64 + 1) as usize);
        }
    }
    for h in holes {
        g.free(h.pfn, h.order).unwrap();
    }
    kept
}

fn inflate_all(b: &mut Balloon<Vec<u64>>, g: &Guest, frames: u64) -> (InflateOutcome, Vec<Block>) {
    let mut total = InflateOutcome::default();
    let mut blocks = Vec::new();
    while total.frames < frames {
        let mut out = ArrayVec::<Block, 1024>::new();
        let r = b.inflate(g, frames - total.frames, &mut out).unwrap();
        total.frames += r.frames;
        total.blocks += r.blocks;
        total.broke += r.broke;
        blocks.extend_from_slice(&out);
        if r.out_of_memory {
            total.out_of_memory = true;
            break;
        }
    }
    b.check(&g.lock()).unwrap();
    g.lock().check_invariants().unwrap();
    (total, blocks)
}

#[test]
fn thp_order_takes_whole_host_pages_then_breaks_as_few_as_it_must() {
    // 16 host pages: the first 8 punched (256 free frames each), the last 8 free.
    let g = guest(8192);
    punch_holes(&g, 4096, None);
    let mut b = balloon(8192, 9, FallbackPolicy::PreferBroken);
    let (r, blocks) = inflate_all(&mut b, &g, 8 * 512 + 600);
    assert_eq!(r.frames, 8 * 512 + 600);
    assert_eq!(blocks.iter().filter(|x| x.order.get() == 9).count(), 8);
    // 600 small frames from pages with 256 free each: 3 pages, no more.
    assert_eq!(r.broke, 3);
    assert_eq!(b.broken_host_pages(), 3);
    assert_eq!(b.full_host_pages(), 8);
    // Whole pages are [4096, 8192): the order-9 blocks are exactly those.
    for x in blocks.iter().filter(|x| x.order.get() == 9) {
        assert!(x.pfn.get() >= 4096);
    }
}

#[test]
fn prefer_broken_beats_naive_when_holes_are_freed_in_random_order() {
    let mut broke = [0u32; 2];
    for (i, policy) in [FallbackPolicy::PreferBroken, FallbackPolicy::Naive]
        .into_iter()
        .enumerate()
    {
        let g = guest(8192);
        punch_holes(&g, 8192, Some(42));
        let mut b = balloon(8192, 9, policy);
        let (r, _) = inflate_all(&mut b, &g, 1024);
        assert_eq!(r.frames, 1024);
        broke[i] = r.broke;
        assert_eq!(b.broken_host_pages(), u64::from(r.broke));
    }
    assert_eq!(broke[0], 4, "1024 frames from pages with 256 free: 4 pages");
    assert!(
        broke[1] >= 15,
        "the plain fallback touches nearly all 16: {broke:?}"
    );
}

#[test]
fn sequential_holes_are_no_worse_for_the_plain_fallback() {
    // The free list holds the holes in address order, so even the plain fallback drains page
    // by page: the difference needs the random order above.
    let g = guest(8192);
    punch_holes(&g, 8192, None);
    let mut b = balloon(8192, 9, FallbackPolicy::Naive);
    let (r, _) = inflate_all(&mut b, &g, 1024);
    assert_eq!(r.broke, 4);
}

/// Frees frames of host page `hp` so that it has `free` free frames (the rest allocated).
fn shape(g: &Guest, hp: u64, free: u64, held: &mut Vec<Block>) {
    let mut mine: Vec<Block> = (0..512)
        .map(|_| g.alloc_within(pfn(hp * 512), ord(9), ord(0)).unwrap())
        .collect();
    mine.sort_by_key(|b| b.pfn);
    for b in mine.drain(..free as usize) {
        g.free(b.pfn, b.order).unwrap();
    }
    held.extend(mine);
}

#[test]
fn a_new_break_takes_the_fullest_page_or_the_tightest_that_covers() {
    // Pages 0..4 have 400, 300, 200, 100 free frames; pages 4..8 are whole and free.
    let g = guest(4096);
    let mut held = Vec::new();
    for (hp, free) in [(0, 400), (1, 300), (2, 200), (3, 100)] {
        shape(&g, hp, free, &mut held);
    }
    let mut b = balloon(4096, 0, FallbackPolicy::PreferBroken);
    // 650 frames at order 0: the classic balloon's order. Whole free pages would cover it
    // without a break; they have the most free frames and are taken first.
    let (r, _) = inflate_all(&mut b, &g, 650);
    assert_eq!(
        (r.frames, r.broke),
        (650, 1),
        "one whole page, then 138 of the next"
    );
    assert_eq!(b.full_host_pages(), 1);

    // At the THP order with whole pages gone, a tail of 90 frames goes to the tightest page
    // that covers it (100 free), not to a larger one.
    let g = guest(2048);
    let mut held = Vec::new();
    for (hp, free) in [(0, 400), (1, 300), (2, 200), (3, 100)] {
        shape(&g, hp, free, &mut held);
    }
    let mut b = balloon(2048, 9, FallbackPolicy::PreferBroken);
    let (r, blocks) = inflate_all(&mut b, &g, 90);
    assert_eq!((r.frames, r.broke), (90, 1));
    assert!(blocks.iter().all(|x| (1536..2048).contains(&x.pfn.get())));
    // 650 more: the 10 left in page 3, then the fullest page (400), then the tightest page
    // covering the last 240 (300 free): two new breaks, the 200-page untouched.
    let (r, blocks) = inflate_all(&mut b, &g, 650);
    assert_eq!((r.frames, r.broke), (650, 2));
    assert!(blocks.iter().all(|x| !(1024..1536).contains(&x.pfn.get())));
    assert_eq!(g.free_frames_within(pfn(1024), ord(9)), 200);
    assert_eq!(g.free_frames_within(pfn(1536), ord(9)), 0);
}

#[test]
fn fallback_reaches_the_target_when_large_blocks_run_out() {
    // Hildenbrand's point 1: at order 9 in a guest with no free 2 MiB block, the balloon
    // still reaches its target with smaller blocks.
    let g = guest(4096);
    punch_holes(&g, 4096, None);
    let mut b = balloon(4096, 9, FallbackPolicy::PreferBroken);
    let (r, blocks) = inflate_all(&mut b, &g, 1000);
    assert_eq!(r.frames, 1000);
    assert!(blocks.iter().all(|x| x.order.get() == 0));
    // And stops when nothing is left ("Out of puff").
    let (r, _) = inflate_all(&mut b, &g, 5000);
    assert!(r.out_of_memory);
    assert_eq!(b.frames(), 2048);
    assert_eq!(g.lock().free_frames(), 0);
}

#[test]
fn deflate_returns_whole_host_pages_first_and_never_more_than_asked() {
    let g = guest(4096);
    punch_holes(&g, 2048, None);
    let mut b = balloon(4096, 9, FallbackPolicy::PreferBroken);
    inflate_all(&mut b, &g, 4 * 512 + 300);
    assert_eq!((b.full_host_pages(), b.broken_host_pages()), (4, 2));
    let mut out = ArrayVec::<Block, 256>::new();
    // 700 frames: one whole page (512); the next whole page does not fit, so 188 small ones.
    let r = b.deflate(&g, 700, &mut out).unwrap();
    assert_eq!(r.frames, 700);
    assert_eq!(out.iter().filter(|x| x.order.get() == 9).count(), 1);
    assert_eq!((b.full_host_pages(), b.broken_host_pages()), (3, 2));
    b.check(&g.lock()).unwrap();
    for x in &out {
        assert!(!b.holds(x.pfn));
    }
    // Deflate everything, in batches.
    while b.frames() > 0 {
        let mut out = ArrayVec::<Block, 64>::new();
        let r = b.deflate(&g, u64::MAX, &mut out).unwrap();
        assert!(r.blocks > 0);
        b.check(&g.lock()).unwrap();
    }
    assert_eq!(
        (b.full_host_pages(), b.broken_host_pages(), b.blocks()),
        (0, 0, 0)
    );
    assert_eq!(g.lock().free_frames(), 4096 - 1024);
    g.lock().check_invariants().unwrap();
}

#[test]
fn deflate_notices_a_block_freed_behind_its_back() {
    let g = guest(1024);
    let mut b = balloon(1024, 9, FallbackPolicy::PreferBroken);
    let (_, blocks) = inflate_all(&mut b, &g, 512);
    g.free(blocks[0].pfn, blocks[0].order).unwrap();
    assert!(b.check(&g.lock()).is_err());
    let mut out = ArrayVec::<Block, 4>::new();
    assert_eq!(
        b.deflate(&g, 512, &mut out),
        Err(DeflateError::NotHeld { pfn: blocks[0].pfn })
    );
    // Refused, not forgotten: the balloon's books are as they were.
    assert!(b.holds(blocks[0].pfn));
    assert_eq!((b.frames(), b.blocks()), (512, 1));
    assert_eq!(g.lock().free_frames(), 1024);
}

#[test]
fn a_buddy_larger_than_the_window_is_refused() {
    let g = guest(2048);
    let cfg = BalloonConfig {
        order: ord(9),
        host_order: ord(9),
        policy: FallbackPolicy::PreferBroken,
    };
    // The balloon only knows the upper half; the buddy hands out the lower half first.
    let words = Balloon::<Vec<u64>>::storage_words(pfn(1024), 1024, cfg.host_order).unwrap();
    let mut b = Balloon::new(vec![0; words], pfn(1024), 1024, cfg).unwrap();
    let mut out = ArrayVec::<Block, 4>::new();
    assert_eq!(
        b.inflate(&g, 512, &mut out),
        Err(InflateError::OutsideWindow)
    );
    assert_eq!(g.lock().free_frames(), 2048, "the block went back");
    assert!(out.is_empty());
}

#[test]
fn storage_and_window_errors() {
    let cfg = BalloonConfig {
        order: ord(9),
        host_order: ord(9),
        policy: FallbackPolicy::Naive,
    };
    // 1000 frames from 100: two bitmaps of 16 words, host pages [0, 1100 >> 9] = 3.
    assert_eq!(
        Balloon::<Vec<u64>>::storage_words(pfn(100), 1000, ord(9)),
        Some(2 * 16 + 3)
    );
    assert_eq!(
        Balloon::new(vec![0; 34], pfn(100), 1000, cfg).unwrap_err(),
        BalloonNewError::StorageTooSmall
    );
    assert_eq!(
        Balloon::new(vec![0; 18], pfn(100), 0, cfg).unwrap_err(),
        BalloonNewError::EmptyWindow
    );
    let top = crate::addr::FRAME_LIMIT - 10;
    assert_eq!(
        Balloon::new(vec![0; 64], pfn(top), 20, cfg).unwrap_err(),
        BalloonNewError::OutOfRange
    );
    let b = Balloon::new(vec![7; 35], pfn(100), 1000, cfg).unwrap();
    assert_eq!((b.frames(), b.blocks()), (0, 0));
    assert!(!b.holds(pfn(100)), "the storage was cleared");
}

#[test]
fn host_pages_above_max_order_still_prefer_broken_ones() {
    // 1 GiB host pages (order 18) over a buddy whose largest block is 4 MiB: every block is
    // "small", and the balloon fills one host page before touching the next.
    let g = guest(1 << 19);
    let cfg = BalloonConfig {
        order: ord(9),
        host_order: ord(18),
        policy: FallbackPolicy::PreferBroken,
    };
    let words = Balloon::<Vec<u64>>::storage_words(pfn(0), 1 << 19, cfg.host_order).unwrap();
    let mut b = Balloon::new(vec![0; words], pfn(0), 1 << 19, cfg).unwrap();
    let mut out = ArrayVec::<Block, 1024>::new();
    let r = b.inflate(&g, 1 << 17, &mut out).unwrap();
    assert_eq!((r.frames, r.broke), (1 << 17, 1));
    b.check(&g.lock()).unwrap();
}

#[test]
fn randomized_ops_keep_every_invariant() {
    use crate::testing::balloon::{BalloonHarness, BalloonSetup, random_op};
    let mut rng = Rng::new(99);
    let mut broke = 0;
    for round in 0..24 {
        let setup = BalloonSetup {
            order: [9, 9, 0, 4, 10][round % 5],
            host_order: [9, 9, 9, 3, 0, 10][round % 6],
            naive: round % 4 == 3,
        };
        let mut h = BalloonHarness::new(setup);
        for i in 0..300 {
            let op = random_op(&mut rng);
            h.apply(op)
                .unwrap_or_else(|e| panic!("setup {setup:?} op {i} {op:?}: {e}"));
        }
        broke += h.balloon().broken_host_pages();
        h.finish().unwrap();
    }
    assert!(
        broke > 0,
        "no run ever broke a host page: the property was never tested"
    );
}

#[test]
fn deflate_refuses_a_block_the_guest_reallocated_at_another_order() {
    // The embedder frees a ballooned 4 KiB page behind the balloon's back, and the guest
    // allocates that frame again as the head of a 2 MiB block. Deflate must not free the
    // guest's 2 MiB block on the strength of the balloon's head bit.
    let g = guest(1024);
    let mut b = balloon(1024, 0, FallbackPolicy::Naive);
    let (_, blocks) = inflate_all(&mut b, &g, 1);
    let x = blocks[0];
    assert_eq!(x.order, ord(0));
    g.free(x.pfn, x.order).unwrap();
    let big: Vec<Block> = (0..2).map(|_| g.alloc(ord(9)).unwrap()).collect();
    let victim = *big.iter().find(|blk| blk.pfn == x.pfn).unwrap();
    let mut out = ArrayVec::<Block, 4>::new();
    let r = b.deflate(&g, u64::MAX, &mut out);
    assert_eq!(r, Err(DeflateError::NotHeld { pfn: x.pfn }));
    assert!(out.is_empty());
    // Nothing changed: the guest still owns its block, the balloon its books.
    let info = g.lock().block_info(victim.pfn).unwrap();
    assert_eq!((info.pfn, info.order), (victim.pfn, ord(9)));
    assert_eq!(info.state, BlockState::Allocated);
    assert_eq!((b.frames(), b.blocks()), (1, 1));
    assert!(b.holds(x.pfn));
    assert_eq!(g.lock().free_frames(), 0);
    // The embedder tells the balloon the block is lost; deflation goes on past it. A block
    // the buddy still holds for the balloon, or no block at all, is refused.
    assert_eq!(
        b.release_lost(&g, pfn(x.pfn.get() + 1)),
        Err(DeflateError::NotHeld {
            pfn: pfn(x.pfn.get() + 1)
        })
    );
    assert_eq!(b.release_lost(&g, x.pfn), Ok(ord(0)));
    assert_eq!((b.frames(), b.blocks()), (0, 0));
    assert_eq!(
        b.release_lost(&g, x.pfn),
        Err(DeflateError::NotHeld { pfn: x.pfn })
    );
    let info = g.lock().block_info(victim.pfn).unwrap();
    assert_eq!(info.state, BlockState::Allocated);
}

#[test]
fn release_lost_refuses_a_block_still_held() {
    let g = guest(1024);
    let mut b = balloon(1024, 0, FallbackPolicy::Naive);
    let (_, blocks) = inflate_all(&mut b, &g, 4);
    let x = blocks[0];
    assert_eq!(
        b.release_lost(&g, x.pfn),
        Err(DeflateError::StillHeld { pfn: x.pfn })
    );
    assert!(b.holds(x.pfn));
    assert_eq!(b.frames(), 4);
}

#[test]
fn storage_words_is_total() {
    let limit = crate::addr::FRAME_LIMIT;
    let top = pfn(limit - 1);
    for (base, frames) in [
        (top, u64::MAX),
        (pfn(0), u64::MAX),
        (top, 2),
        (pfn(0), limit + 1),
    ] {
        assert_eq!(
            Balloon::<Vec<u64>>::storage_words(base, frames, ord(0)),
            None,
            "{base:?} + {frames}"
        );
    }
    assert_eq!(Balloon::<Vec<u64>>::storage_words(top, 0, ord(9)), None);
    // The whole physical address space: two bitmaps of 2^34 words, one host page per frame.
    let all = Balloon::<Vec<u64>>::storage_words(pfn(0), limit, ord(0));
    assert_eq!(all.map(|w| w as u64), Some(2 * (limit / 64) + limit));
    assert_eq!(Balloon::<Vec<u64>>::storage_words(top, 1, ord(9)), Some(3));
    let cfg = BalloonConfig {
        order: ord(9),
        host_order: ord(9),
        policy: FallbackPolicy::Naive,
    };
    assert_eq!(
        Balloon::new(vec![0; 64], top, u64::MAX, cfg).unwrap_err(),
        BalloonNewError::OutOfRange
    );
}

/// Regression (adversarial audit): the embedder frees a ballooned block behind the
/// balloon's back and the next inflate gets the very same block from the buddy. The
/// balloon recorded it a second time and counted one 4 KiB block as two.
#[test]
fn reinflating_a_block_freed_behind_its_back_drops_the_stale_record() {
    let g = guest(1024);
    let mut b = balloon(1024, 0, FallbackPolicy::Naive);
    let (_, blocks) = inflate_all(&mut b, &g, 1);
    let x = blocks[0];
    g.free(x.pfn, x.order).unwrap();
    let mut out = ArrayVec::<Block, 8>::new();
    let r = b.inflate(&g, 1, &mut out).unwrap();
    assert_eq!(out[0], x, "the buddy hands the same block out again");
    assert_eq!((r.frames, r.dropped_stale, r.dropped_frames), (1, 1, 1));
    assert_eq!((b.frames(), b.blocks()), (1, 1));
    b.check(&g.lock()).unwrap();
}

/// Regression (adversarial audit): after a stale block was recorded twice, `release_lost`
/// read the wrong order from the end bits and `adjust` underflowed ("attempt to subtract
/// with overflow"). Every step is public API.
#[test]
fn release_lost_after_a_reinflated_stale_block_keeps_the_books() {
    let g = guest(1024);
    let mut b = balloon(1024, 1, FallbackPolicy::Naive);
    let g0 = g.alloc(ord(0)).unwrap();
    assert_eq!(g0.pfn, pfn(0));
    let mut out = ArrayVec::<Block, 8>::new();
    b.inflate(&g, 1, &mut out).unwrap();
    b.inflate(&g, 1, &mut out).unwrap();
    let got: Vec<(u64, u8)> = out.iter().map(|x| (x.pfn.get(), x.order.get())).collect();
    assert_eq!(got, [(1, 0), (2, 0)]);
    // The guest frees its page; the embedder frees the balloon's page at 1 behind its back.
    g.free(g0.pfn, g0.order).unwrap();
    g.free(pfn(1), ord(0)).unwrap();
    // The balloon gets the merged 8 KiB block at 0: the stale record at 1 goes.
    let mut out = ArrayVec::<Block, 8>::new();
    let r = b.inflate(&g, 2, &mut out).unwrap();
    assert_eq!((out[0].pfn.get(), out[0].order.get()), (0, 1));
    assert_eq!((r.dropped_stale, r.dropped_frames), (1, 1));
    assert_eq!((b.frames(), b.blocks()), (3, 2));
    b.check(&g.lock()).unwrap();
    // Everything deflates; nothing is lost any more.
    let mut out = ArrayVec::<Block, 8>::new();
    let r = b.deflate(&g, u64::MAX, &mut out).unwrap();
    assert_eq!((r.frames, r.blocks), (3, 2));
    assert_eq!(
        b.release_lost(&g, pfn(1)),
        Err(DeflateError::NotHeld { pfn: pfn(1) })
    );
    assert_eq!(
        b.release_lost(&g, pfn(2)),
        Err(DeflateError::NotHeld { pfn: pfn(2) })
    );
    assert_eq!((b.frames(), b.blocks(), b.broken_host_pages()), (0, 0, 0));
    assert_eq!(g.lock().free_frames(), 1024);
}

/// A stale block that starts before the new block and reaches into it is dropped too (the
/// backward search for the nearest head).
#[test]
fn a_stale_block_reaching_into_a_new_one_is_dropped() {
    let g = guest(1024);
    let mut b = balloon(1024, 1, FallbackPolicy::Naive);
    let (_, blocks) = inflate_all(&mut b, &g, 2);
    assert_eq!((blocks[0].pfn.get(), blocks[0].order.get()), (0, 1));
    // Lost behind the balloon's back; the guest takes frame 0 of it.
    g.free(blocks[0].pfn, blocks[0].order).unwrap();
    assert_eq!(g.alloc(ord(0)).unwrap().pfn, pfn(0));
    let mut out = ArrayVec::<Block, 8>::new();
    let r = b.inflate(&g, 1, &mut out).unwrap();
    assert_eq!(out[0].pfn, pfn(1));
    assert_eq!((r.dropped_stale, r.dropped_frames), (1, 2));
    assert_eq!((b.frames(), b.blocks()), (1, 1));
    assert!(!b.holds(pfn(0)) && b.holds(pfn(1)));
    b.check(&g.lock()).unwrap();
}

/// Regression (misuse audit): a balloon inflated from one allocator and deflated against
/// another freed the other allocator's block that happened to sit at the same frames (its
/// check is head, order and "allocated") and forgot its own. A balloon holding blocks now
/// refuses any other allocator, changing nothing; once empty it may serve another.
#[test]
fn a_balloon_refuses_another_allocator() {
    let (a, b) = (guest(1024), guest(1024));
    let mut bal = balloon(1024, 9, FallbackPolicy::Naive);
    let (_, blocks) = inflate_all(&mut bal, &a, 512);
    let theirs = b.alloc(ord(9)).unwrap();
    assert_eq!(theirs.pfn, blocks[0].pfn);
    let mut out = ArrayVec::<Block, 8>::new();
    assert_eq!(
        bal.deflate(&b, 512, &mut out),
        Err(DeflateError::ForeignBuddy)
    );
    assert_eq!(
        bal.release_lost(&b, blocks[0].pfn),
        Err(DeflateError::ForeignBuddy)
    );
    assert_eq!(
        bal.inflate(&b, 1, &mut out),
        Err(InflateError::ForeignBuddy)
    );
    assert!(out.is_empty());
    assert_eq!(
        b.lock().block_info(theirs.pfn).unwrap().state,
        BlockState::Allocated
    );
    assert_eq!(bal.frames(), 512);
    bal.check(&a.lock()).unwrap();
    // Its own allocator gets everything back; then the empty balloon may serve `b`.
    assert_eq!(bal.deflate(&a, 512, &mut out).unwrap().frames, 512);
    assert_eq!(a.lock().free_frames(), 1024);
    out.clear();
    assert_eq!(bal.inflate(&b, 256, &mut out).unwrap().frames, 256);
    bal.check(&b.lock()).unwrap();
}
