//! Loom model of the balloon inflating and deflating while a workload allocates and frees on
//! another thread. The balloon takes the allocator lock for each allocation, free and
//! per-host-page query, never across them; its free-frame estimates may go stale between
//! them, which must cost at most a worse choice: no block is ever both ballooned and held by
//! the workload, the balloon's books match the allocator, and frames are conserved.
//!
//! Run with `RUSTFLAGS="--cfg loom" cargo test --release --test loom_balloon`.
#![cfg(loom)]
#![allow(missing_docs)]

use arrayvec::ArrayVec;
use hvmem::buddy::{Block, Buddy, FrameMeta, LockedBuddy};
use hvmem::hint::guest::{Balloon, BalloonConfig, FallbackPolicy};
use hvmem::{PageOrder, Pfn};
use loom::sync::Arc;
use loom::thread;

fn order(o: u8) -> PageOrder {
    PageOrder::new(o).unwrap()
}

fn overlaps(a: &Block, b: &Block) -> bool {
    let (a0, a1) = (a.pfn.get(), a.pfn.get() + a.order.frames());
    let (b0, b1) = (b.pfn.get(), b.pfn.get() + b.order.frames());
    a0 < b1 && b0 < a1
}

/// 16 frames from frame 16, blocks up to order 2, "host pages" of order 2 (four of them).
/// The workload holds frames 17, 19, 22, 23, 25, 27, 28..32: host page 16 and 24 have two
/// free frames each, host page 20 two, host page 28 none.
fn guest() -> (Arc<LockedBuddy<Vec<FrameMeta>, 2>>, Vec<Block>) {
    let mut b = Buddy::new(vec![FrameMeta::HOLE; 16], Pfn::new(16).unwrap()).unwrap();
    b.add_range(Pfn::new(16).unwrap(), 16).unwrap();
    let all: Vec<Block> = (0..16).map(|_| b.alloc(order(0)).unwrap()).collect();
    let mut held = Vec::new();
    for blk in all {
        if [16, 18, 20, 21, 24, 26].contains(&blk.pfn.get()) {
            b.free(blk.pfn, blk.order).unwrap();
        } else {
            held.push(blk);
        }
    }
    (Arc::new(LockedBuddy::new(b)), held)
}

#[test]
fn balloon_races_a_workload() {
    loom::model(|| {
        let (buddy, mut held) = guest();
        let cfg = BalloonConfig {
            order: order(2),
            host_order: order(2),
            policy: FallbackPolicy::PreferBroken,
        };
        let base = Pfn::new(16).unwrap();
        let words = Balloon::<Vec<u64>>::storage_words(base, 16, cfg.host_order).unwrap();
        let mut balloon = Balloon::new(vec![0u64; words], base, 16, cfg).unwrap();

        let other = buddy.clone();
        let give_back = held.pop().unwrap();
        let workload = thread::spawn(move || {
            // Free a frame of a full host page, then take a frame back.
            other.free(give_back.pfn, give_back.order).unwrap();
            other.alloc(order(0)).ok()
        });

        let mut out = ArrayVec::<Block, 8>::new();
        let r = balloon.inflate(&buddy, 3, &mut out).unwrap();
        assert!(r.frames <= 3);
        let mut back = ArrayVec::<Block, 8>::new();
        balloon.deflate(&buddy, 1, &mut back).unwrap();

        let taken = workload.join().unwrap();
        held.extend(taken);
        let ballooned: Vec<Block> = out
            .iter()
            .filter(|b| !back.iter().any(|d| d.pfn == b.pfn))
            .copied()
            .collect();
        for b in &ballooned {
            for h in &held {
                assert!(!overlaps(b, h), "{b:?} ballooned and held by the workload");
            }
        }
        let g = buddy.lock();
        g.check_invariants().unwrap();
        balloon.check(&g).unwrap();
        let held_frames: u64 = held.iter().map(|b| b.order.frames()).sum();
        assert_eq!(g.allocated_frames(), held_frames + balloon.frames());
    });
}
