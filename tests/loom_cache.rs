//! Loom model of the MMU memory cache protocol: two threads, each with its own cache, top
//! up OUTSIDE the MMU lock from one source shared behind its own lock, then take the MMU
//! lock and pop what they reserved inside it.
//!
//! Run with `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test --release --test
//! loom_cache`. Every interleaving of the top-ups (each allocation takes the source's lock)
//! and of the critical sections is explored; no object may be handed out twice and none
//! may be lost.
#![cfg(loom)]
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use hvmem::cache::{MemoryCache, ObjectSource, Reserved, TopUpError};
use loom::sync::{Arc, Mutex};
use loom::thread;

/// Objects in the shared source.
const OBJECTS: u32 = 3;

/// The embedder's allocator: a free list behind a lock of its own (not the MMU lock).
struct Pool(Vec<u32>);

/// One thread's handle on the shared pool; each allocation takes the pool's lock.
struct Shared(Arc<Mutex<Pool>>);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Empty;

impl ObjectSource<u32> for Shared {
    type Error = Empty;

    fn alloc(&mut self) -> Result<u32, Empty> {
        self.0.lock().unwrap().0.pop().ok_or(Empty)
    }

    fn free(&mut self, obj: u32) {
        self.0.lock().unwrap().0.push(obj);
    }
}

/// What the MMU lock protects: the objects handed out under it (a stand-in for the rmaps
/// and shadow pages the objects would become).
struct Mmu {
    in_use: Vec<u32>,
}

#[test]
fn top_up_outside_the_lock_pop_inside() {
    loom::model(|| {
        let pool = Arc::new(Mutex::new(Pool((0..OBJECTS).collect())));
        let mmu = Arc::new(Mutex::new(Mmu { in_use: Vec::new() }));
        let worker = || {
            let (pool, mmu) = (pool.clone(), mmu.clone());
            thread::spawn(move || {
                let mut src = Shared(pool);
                let mut cache = MemoryCache::<u32, 2>::new();
                // No MMU lock held: the source may block (here: its own lock).
                let Reserved { min, have } = match cache.top_up(&mut src, 1) {
                    Ok(r) => r,
                    Err(e) => panic!("3 objects, 2 threads of min 1: {e:?}"),
                };
                assert!(have >= min && have <= 2);
                {
                    let mut mmu = mmu.lock().unwrap();
                    for _ in 0..min {
                        // Cannot fail: reserved by the top-up, nobody else pops this cache.
                        let obj = cache.alloc().expect("reserved");
                        assert!(!mmu.in_use.contains(&obj), "{obj} handed out twice");
                        mmu.in_use.push(obj);
                    }
                }
                // Whatever was not used goes back (KVM `kvm_mmu_free_memory_cache`).
                cache.drain_into(&mut src);
                assert!(cache.is_empty());
                min
            })
        };
        let (t1, t2) = (worker(), worker());
        let (used1, used2) = (t1.join().unwrap(), t2.join().unwrap());
        assert_eq!((used1, used2), (1, 1));
        let mut mmu = mmu.lock().unwrap();
        let mut pool = pool.lock().unwrap();
        assert_eq!(mmu.in_use.len(), 2);
        pool.0.append(&mut mmu.in_use);
        pool.0.sort_unstable();
        assert_eq!(pool.0, (0..OBJECTS).collect::<Vec<_>>(), "none lost");
    });
}

/// A source that runs dry before a second thread reaches its minimum: that thread's
/// top-up fails, keeps what it took, and gives it back; the other thread's reservation
/// still holds inside the lock.
#[test]
fn a_failed_top_up_loses_nothing() {
    loom::model(|| {
        let pool = Arc::new(Mutex::new(Pool((0..OBJECTS).collect())));
        let mmu = Arc::new(Mutex::new(Mmu { in_use: Vec::new() }));
        let worker = || {
            let (pool, mmu) = (pool.clone(), mmu.clone());
            thread::spawn(move || {
                let mut src = Shared(pool);
                let mut cache = MemoryCache::<u32, 2>::new();
                let popped = match cache.top_up(&mut src, 2) {
                    Ok(r) => {
                        let mut mmu = mmu.lock().unwrap();
                        for _ in 0..r.min {
                            let obj = cache.alloc().expect("reserved");
                            assert!(!mmu.in_use.contains(&obj), "{obj} handed out twice");
                            mmu.in_use.push(obj);
                        }
                        true
                    }
                    Err(TopUpError::Source { have, .. }) => {
                        assert_eq!(have, cache.len(), "what was taken stays cached");
                        false
                    }
                    Err(e) => panic!("{e:?}"),
                };
                cache.drain_into(&mut src);
                popped
            })
        };
        let (t1, t2) = (worker(), worker());
        let (ok1, ok2) = (t1.join().unwrap(), t2.join().unwrap());
        // 3 objects cannot give both threads 2 at once, and whenever the pool runs dry one
        // thread already holds 2: exactly one top-up succeeds in every interleaving.
        assert!(ok1 != ok2, "ok1 {ok1} ok2 {ok2}");
        let mut mmu = mmu.lock().unwrap();
        let mut pool = pool.lock().unwrap();
        assert_eq!(mmu.in_use.len(), 2);
        pool.0.append(&mut mmu.in_use);
        pool.0.sort_unstable();
        assert_eq!(pool.0, (0..OBJECTS).collect::<Vec<_>>(), "none lost");
    });
}
