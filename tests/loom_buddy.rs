//! Loom model of `LockedBuddy`: two threads allocating and freeing through the spin lock.
//!
//! Run with `RUSTFLAGS="--cfg loom" cargo test --release --test loom_buddy`. Under loom the
//! lock of `hvmem::sync` is loom's mutex taken with a try-then-yield loop, so loom explores
//! every order in which the threads can take it.
#![cfg(loom)]
#![allow(missing_docs)]

use hvmem::buddy::{Block, Buddy, FrameMeta, LockedBuddy};
use hvmem::{PageOrder, Pfn};
use loom::sync::Arc;
use loom::thread;

fn order(o: u8) -> PageOrder {
    PageOrder::new(o).unwrap()
}

/// Eight frames starting at frame 8, blocks up to order 2.
fn shared() -> Arc<LockedBuddy<Vec<FrameMeta>, 2>> {
    let mut b = Buddy::new(vec![FrameMeta::HOLE; 8], Pfn::new(8).unwrap()).unwrap();
    b.add_range(Pfn::new(8).unwrap(), 8).unwrap();
    Arc::new(LockedBuddy::new(b))
}

fn overlaps(a: &Block, b: &Block) -> bool {
    let (a0, a1) = (a.pfn.get(), a.pfn.get() + a.order.frames());
    let (b0, b1) = (b.pfn.get(), b.pfn.get() + b.order.frames());
    a0 < b1 && b0 < a1
}

#[test]
fn two_threads_alloc_and_free() {
    loom::model(|| {
        let buddy = shared();
        let worker = |orders: [u8; 2]| {
            let buddy = buddy.clone();
            thread::spawn(move || {
                let first = buddy.alloc(order(orders[0])).unwrap();
                let second = buddy.alloc(order(orders[1])).unwrap();
                assert!(!overlaps(&first, &second));
                buddy.free(first.pfn, first.order).unwrap();
                // Hold one block past the other thread's work, then return it.
                (second, buddy.lock().check_invariants())
            })
        };
        let t1 = worker([0, 1]);
        let t2 = worker([1, 0]);
        let (held1, audit1) = t1.join().unwrap();
        let (held2, audit2) = t2.join().unwrap();
        audit1.unwrap();
        audit2.unwrap();
        assert!(
            !overlaps(&held1, &held2),
            "{held1:?} and {held2:?} handed out twice"
        );
        let b = buddy.lock();
        assert_eq!(
            b.allocated_frames(),
            held1.order.frames() + held2.order.frames()
        );
        drop(b);
        buddy.free(held1.pfn, held1.order).unwrap();
        buddy.free(held2.pfn, held2.order).unwrap();
        let b = buddy.lock();
        b.check_invariants().unwrap();
        assert_eq!(b.free_frames(), 8);
        assert_eq!(b.order_stats(order(2)).free, 2, "everything merged back");
    });
}

#[test]
fn try_lock_fails_while_held() {
    loom::model(|| {
        let buddy = shared();
        let other = buddy.clone();
        let t = thread::spawn(move || other.try_lock().map(|mut b| b.alloc(order(0)).is_ok()));
        let mine = buddy.alloc(order(0)).unwrap();
        // Either the other thread got the lock and allocated, or it saw it held.
        let theirs = t.join().unwrap();
        let b = buddy.lock();
        let expect = 1 + u64::from(theirs == Some(true));
        assert_eq!(b.allocated_frames(), expect);
        assert!(b.block_info(mine.pfn).is_some());
    });
}
