#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::{RwLock, state};
use std::sync::atomic::{AtomicBool, AtomicU64 as StdAtomicU64, Ordering as StdOrdering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};
use std::vec::Vec;

/// How long a test waits for something that must happen before calling it a hang.
const PATIENCE: Duration = Duration::from_secs(20);

/// Spins (yielding) until `cond` holds; fails the test after [`PATIENCE`].
fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < PATIENCE, "timed out waiting until {what}");
        thread::yield_now();
    }
}

#[test]
fn try_lock_rules() {
    let lock = RwLock::new(5u32);
    {
        let r1 = lock.try_read().unwrap();
        let r2 = lock.read();
        assert_eq!((*r1, *r2), (5, 5));
        assert!(lock.try_write().is_none());
        assert!(!lock.is_contended(), "holders are not waiters");
    }
    {
        let mut w = lock.try_write().unwrap();
        *w = 6;
        assert!(lock.try_read().is_none());
        assert!(lock.try_write().is_none());
        assert!(!lock.is_contended());
    }
    assert_eq!(*lock.write(), 6);
    let mut lock = lock;
    *lock.get_mut() += 1;
    assert_eq!(lock.into_inner(), 7);
    assert_eq!(RwLock::<u8>::default().into_inner(), 0);
}

#[test]
fn debug_shows_the_state_not_the_data() {
    let lock = RwLock::new(1u8);
    let _r = lock.read();
    let text = std::format!("{lock:?}");
    assert!(text.contains("readers: 1"), "{text}");
    assert!(text.contains("writer: false"), "{text}");
}

#[test]
fn readers_share_across_threads() {
    let lock = RwLock::new(1u32);
    let held = lock.read();
    thread::scope(|s| {
        // Another thread reads while this one holds the read lock: no wait needed.
        s.spawn(|| assert_eq!(*lock.try_read().expect("readers share"), 1));
    });
    drop(held);
}

/// Writers increment both halves of a pair one at a time; readers must never see them differ.
#[test]
fn writers_exclude_everyone() {
    const ROUNDS: u64 = 20_000;
    let lock = RwLock::new((0u64, 0u64));
    thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                for _ in 0..ROUNDS {
                    let mut w = lock.write();
                    w.0 += 1;
                    std::hint::spin_loop();
                    w.1 += 1;
                }
            });
        }
        for _ in 0..2 {
            s.spawn(|| {
                for _ in 0..ROUNDS {
                    let r = lock.read();
                    assert_eq!(r.0, r.1, "read a half-done write");
                }
            });
        }
    });
    assert_eq!(lock.into_inner(), (2 * ROUNDS, 2 * ROUNDS));
}

#[test]
fn contended_while_a_reader_waits_on_a_writer() {
    let lock = RwLock::new(0u32);
    let w = lock.write();
    thread::scope(|s| {
        let reader = s.spawn(|| *lock.read());
        wait_until("the reader waits", || lock.is_contended());
        drop(w);
        assert_eq!(reader.join().unwrap(), 0);
    });
    assert!(!lock.is_contended());
}

#[test]
fn contended_while_a_writer_waits_on_a_reader() {
    let lock = RwLock::new(0u32);
    let r = lock.read();
    thread::scope(|s| {
        let writer = s.spawn(|| *lock.write() += 1);
        wait_until("the writer waits", || lock.is_contended());
        // A waiting writer keeps new readers out, even though only readers hold the lock.
        assert!(
            lock.try_read().is_none(),
            "a reader got past a waiting writer"
        );
        drop(r);
        writer.join().unwrap();
    });
    assert!(!lock.is_contended());
    assert_eq!(*lock.read(), 1);
}

/// The splitter's pattern: the writer sees the waiting reader, drops the lock and at once
/// tries to retake it. The release has handed the lock to the reader, so the retake fails.
#[test]
fn released_writer_cannot_overtake_the_reader_it_made_wait() {
    let lock = RwLock::new(0u32);
    let w = lock.write();
    thread::scope(|s| {
        let (tx, rx) = mpsc::channel::<()>();
        let lock = &lock;
        let reader = s.spawn(move || {
            let r = lock.read();
            // Hold the read lock until the main thread has tried to retake the write lock.
            rx.recv().unwrap();
            *r
        });
        wait_until("the reader waits", || lock.is_contended());
        drop(w);
        assert!(
            lock.try_write().is_none(),
            "writer overtook a waiting reader"
        );
        tx.send(()).unwrap();
        assert_eq!(reader.join().unwrap(), 0);
    });
    assert!(lock.try_write().is_some());
}

/// Several readers hold the lock in turns that overlap, so the reader count rarely drops to
/// zero; a writer must still get in. (A thread must not take a second read while holding
/// one: behind a waiting writer that deadlocks, as on KVM's qrwlock.)
#[test]
fn writer_is_not_starved_by_a_stream_of_readers() {
    let lock = RwLock::new(0u64);
    let stop = AtomicBool::new(false);
    let reads = StdAtomicU64::new(0);
    thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                while !stop.load(StdOrdering::Relaxed) {
                    let held = lock.read();
                    reads.fetch_add(1, StdOrdering::Relaxed);
                    for _ in 0..200 {
                        std::hint::spin_loop();
                    }
                    drop(held);
                }
            });
        }
        wait_until("the readers run", || {
            reads.load(StdOrdering::Relaxed) > 1000
        });
        let (tx, rx) = mpsc::channel();
        let lock = &lock;
        s.spawn(move || {
            *lock.write() += 1;
            tx.send(()).unwrap();
        });
        let got_in = rx.recv_timeout(PATIENCE).is_ok();
        stop.store(true, StdOrdering::Relaxed);
        assert!(got_in, "the writer starved behind the readers");
    });
    assert_eq!(lock.into_inner(), 1);
}

/// A splitter holds the write lock and drops it only when `is_contended`; vCPUs faulting
/// (read and write) all get in, and the splitter saw them waiting.
#[test]
fn splitter_yields_to_vcpus() {
    let lock = RwLock::new((0u64, 0u64));
    let done = AtomicBool::new(false);
    // Set once the splitter holds the lock: the vCPUs start after it, so on a loaded machine
    // they cannot all finish before the splitter runs (then it never saw a waiter).
    let holding = AtomicBool::new(false);
    let breaks = StdAtomicU64::new(0);
    let (lock_ref, done_ref, holding_ref) = (&lock, &done, &holding);
    thread::scope(|s| {
        s.spawn(|| {
            let mut w = lock.write();
            holding.store(true, StdOrdering::Release);
            while !done.load(StdOrdering::Relaxed) {
                // One unit of work: both halves, so a reader sees them equal.
                w.0 += 1;
                w.1 += 1;
                if lock.is_contended() {
                    breaks.fetch_add(1, StdOrdering::Relaxed);
                    drop(w);
                    w = lock.write();
                }
            }
        });
        let vcpus: Vec<_> = (0..2)
            .map(|i| {
                s.spawn(move || {
                    let lock = lock_ref;
                    wait_until("the splitter holds the lock", || {
                        holding_ref.load(StdOrdering::Acquire)
                    });
                    for _ in 0..200 {
                        if i == 0 {
                            let r = lock.read();
                            assert_eq!(r.0, r.1);
                        } else {
                            let mut w = lock.write();
                            w.0 += 1;
                            w.1 += 1;
                        }
                    }
                })
            })
            .collect();
        let (tx, rx) = mpsc::channel();
        s.spawn(move || {
            for v in vcpus {
                v.join().unwrap();
            }
            tx.send(()).unwrap();
        });
        let finished = rx.recv_timeout(PATIENCE).is_ok();
        done_ref.store(true, StdOrdering::Relaxed);
        assert!(finished, "a vCPU starved behind the splitter");
    });
    assert!(breaks.load(StdOrdering::Relaxed) > 0);
    let (a, b) = lock.into_inner();
    assert_eq!(a, b);
}

#[test]
fn state_word_arithmetic() {
    let one_reader = state::one(state::READERS_SHIFT);
    let one_rwait = state::one(state::RWAIT_SHIFT);
    let one_wwait = state::one(state::WWAIT_SHIFT);
    // A writer holding with two readers and one writer waiting releases to both readers.
    let s = state::WRITER | (2 * one_rwait) | one_wwait;
    let next = state::after_write_release(s);
    assert_eq!(next & state::WRITER, 0);
    assert_eq!(state::count(next, state::READERS_SHIFT), 2);
    assert_eq!(state::count(next, state::RWAIT_SHIFT), 0);
    assert_eq!(state::count(next, state::WWAIT_SHIFT), 1);
    assert_ne!(next & state::GEN_MASK, s & state::GEN_MASK);
    // With no reader waiting the generation stays.
    assert_eq!(
        state::after_write_release(state::WRITER | one_wwait),
        one_wwait
    );
    // The generation wraps inside its field.
    let top = state::WRITER | state::GEN_MASK | one_rwait;
    assert_eq!(state::after_write_release(top), one_reader);
    // Full counts: everyone waiting, and every field at its maximum, stays in its field.
    let full = (state::COUNT_MAX << state::RWAIT_SHIFT) | state::WRITER;
    let next = state::after_write_release(full);
    assert_eq!(state::count(next, state::READERS_SHIFT), state::COUNT_MAX);
    assert_eq!(state::count(next, state::WWAIT_SHIFT), 0);
    assert!(!state::reader_may_enter(next), "READERS is full");
    assert!(state::waiters(full) && !state::waiters(next));
}

mod sharded {
    use super::*;
    use crate::sync::{SHARDS, ShardedRwLock};

    fn lock() -> ShardedRwLock<u64, u64> {
        ShardedRwLock::new(0, || 0).unwrap()
    }

    #[test]
    fn a_shard_not_handed_out_is_refused_but_read_view_reaches_it() {
        let l = lock();
        assert!(l.try_read_view(0).is_none(), "no shard handed out yet");
        let (main, view) = l.read_view(0).unwrap();
        assert_eq!((*main, *view), (0, 0));
        drop((main, view));
        assert!(l.read_view(SHARDS).is_none(), "no such shard");
        assert_eq!(l.new_shard(), 0);
        assert!(l.try_read_view(0).is_some());
        assert!(l.try_read_view(1).is_none());
    }

    #[test]
    fn shards_go_round_robin_and_stop_growing_at_the_count() {
        let l = lock();
        let handed: Vec<usize> = (0..SHARDS + 3).map(|_| l.new_shard()).collect();
        let expect: Vec<usize> = (0..SHARDS).chain(0..3).collect();
        assert_eq!(handed, expect);
        assert_eq!(l.shards_in_use(), SHARDS);
        assert!((0..SHARDS).all(|i| l.try_read_view(i).is_some()));
    }

    #[test]
    fn a_writer_excludes_shard_readers_and_waits_for_them() {
        let l = lock();
        let (a, b) = (l.new_shard(), l.new_shard());
        {
            let mut w = l.write();
            *w = 1;
            assert!(l.try_read_view(a).is_none() && l.try_read_view(b).is_none());
        }
        let held = l.try_read_view(a).unwrap();
        let entered = AtomicBool::new(false);
        thread::scope(|s| {
            s.spawn(|| {
                let mut w = l.write();
                entered.store(true, StdOrdering::SeqCst);
                let (data, views) = w.split_views();
                *data = 2;
                for v in views {
                    *v = 2;
                }
            });
            // The writer cannot finish while shard `a` is read.
            thread::sleep(Duration::from_millis(50));
            assert!(
                !entered.load(StdOrdering::SeqCst),
                "a writer got past a shard reader"
            );
            assert_eq!(*held, 0);
            drop(held);
            wait_until("the writer entered", || entered.load(StdOrdering::SeqCst));
        });
        // Every shard's view was updated, those not in use too.
        assert!((0..SHARDS).all(|i| *l.read_view(i).unwrap().1 == 2));
        assert_eq!(*l.try_read_view(b).unwrap(), 2);
        assert_eq!(*l.read(), 2);
    }

    #[test]
    fn a_reader_of_a_held_shard_waits_in_the_main_lock_where_the_writer_sees_it() {
        let l = lock();
        let a = l.new_shard();
        let w = l.write();
        assert!(!l.is_contended());
        thread::scope(|s| {
            let reader = s.spawn(|| *l.read_view(a).unwrap().1);
            wait_until("the reader waits", || l.is_contended());
            drop(w);
            assert_eq!(reader.join().unwrap(), 0);
        });
    }

    #[test]
    fn shard_readers_and_writers_never_see_a_half_update() {
        // Writers set the data and every view to the same new value; readers of a shard
        // must always find their view equal to what a writer last published.
        let l = lock();
        let shards: Vec<usize> = (0..2).map(|_| l.new_shard()).collect();
        let stop = AtomicBool::new(false);
        let reads = StdAtomicU64::new(0);
        thread::scope(|s| {
            for &i in &shards {
                let (l, stop, reads) = (&l, &stop, &reads);
                s.spawn(move || {
                    let mut last = 0;
                    while !stop.load(StdOrdering::Relaxed) {
                        let v = match l.try_read_view(i) {
                            Some(v) => *v,
                            None => *l.read_view(i).unwrap().1,
                        };
                        assert!(v >= last, "view went back from {last} to {v}");
                        last = v;
                        l.count(i, 1);
                        reads.fetch_add(1, StdOrdering::Relaxed);
                    }
                });
            }
            for n in 1..=2000u64 {
                let mut w = l.write();
                let (data, views) = w.split_views();
                assert_eq!(*data, n - 1);
                *data = n;
                for v in views {
                    assert_eq!(*v, n - 1, "a view missed an update");
                    *v = n;
                }
            }
            stop.store(true, StdOrdering::Relaxed);
        });
        assert_eq!(l.counted(), reads.load(StdOrdering::Relaxed));
    }
}
