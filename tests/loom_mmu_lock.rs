//! Loom model of the MMU lock (`hvmem::sync::RwLock`): its admission protocol runs on loom
//! atomics and every wait is a loom yield, so the checker explores the failed attempts, the
//! waiter registrations and the writer's hand-off to waiting readers.
//!
//! Run with `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test --release --test
//! loom_mmu_lock`. Mutual exclusion is checked on a loom atomic of its own (`Inside`), not
//! only through the data: a reader entering while a writer is inside, or two writers, fails
//! the model. The inner data lock must be free whenever the protocol admits a thread
//! (`hvmem::sync::inner_retries` stays 0).
#![cfg(loom)]
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hvmem::sync::{RwLock, inner_retries};
use loom::sync::Arc;
use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::thread;
use std::sync::atomic::{AtomicUsize as StdAtomicUsize, Ordering as StdOrdering};

/// Whether a writer is inside the critical section: `WRITER` per writer inside. Readers check
/// it with one load (fewer steps for loom than entering and leaving).
struct Inside(AtomicUsize);

const WRITER: usize = 1;

impl Inside {
    fn new() -> Self {
        Self(AtomicUsize::new(0))
    }

    fn check_no_writer(&self) {
        let now = self.0.load(Ordering::SeqCst);
        assert!(now < WRITER, "a reader is inside while a writer is");
    }

    fn enter_write(&self) {
        let before = self.0.fetch_add(WRITER, Ordering::SeqCst);
        assert_eq!(before, 0, "a writer entered while another was inside");
    }

    fn leave_write(&self) {
        self.0.fetch_sub(WRITER, Ordering::SeqCst);
    }
}

/// What the MMU lock protects: two halves that writers change together.
type Pair = (u32, u32);

/// The splitter's loop (KVM `nested_mmu_try_split_huge_pages` under `mmu_lock`): a unit of
/// work per huge page, dropping and retaking the write lock whenever someone waits. Returns
/// how many times it saw the lock contended.
fn splitter(lock: &RwLock<Pair>, inside: &Inside, units: u32) -> usize {
    let mut breaks = 0;
    let mut w = lock.write();
    inside.enter_write();
    for _ in 0..units {
        w.0 += 1;
        w.1 += 1;
        if lock.is_contended() {
            breaks += 1;
            inside.leave_write();
            drop(w);
            w = lock.write();
            inside.enter_write();
        }
    }
    inside.leave_write();
    breaks
}

/// Executions in which the splitter saw the lock contended, over a whole `loom::model`.
static SAW_CONTENDED: StdAtomicUsize = StdAtomicUsize::new(0);

fn splitter_and_vcpu(vcpu_writes: bool) {
    const UNITS: u32 = 2;
    SAW_CONTENDED.store(0, StdOrdering::Relaxed);
    loom::model(move || {
        let lock = Arc::new(RwLock::new((0, 0)));
        let inside = Arc::new(Inside::new());
        let split = {
            let (lock, inside) = (lock.clone(), inside.clone());
            thread::spawn(move || splitter(&lock, &inside, UNITS))
        };
        // The faulting vCPU: it must get in, and see whole units only.
        if vcpu_writes {
            let mut w = lock.write();
            inside.enter_write();
            w.0 += 10;
            w.1 += 10;
            inside.leave_write();
        } else {
            let r = lock.read();
            inside.check_no_writer();
            assert_eq!(r.0, r.1, "read half a unit");
        }
        if split.join().unwrap() > 0 {
            SAW_CONTENDED.fetch_add(1, StdOrdering::Relaxed);
        }
        let extra = if vcpu_writes { 10 } else { 0 };
        assert_eq!(*lock.read(), (UNITS + extra, UNITS + extra));
        assert!(!lock.is_contended());
    });
    assert!(
        SAW_CONTENDED.load(StdOrdering::Relaxed) > 0,
        "no execution had the splitter see the vCPU waiting"
    );
    assert_eq!(
        inner_retries(),
        0,
        "the inner lock was busy after admission"
    );
}

#[test]
fn splitter_yields_to_a_reading_vcpu() {
    splitter_and_vcpu(false);
}

#[test]
fn splitter_yields_to_a_writing_vcpu() {
    splitter_and_vcpu(true);
}

/// A reader thread: takes the read lock, checks no writer is inside, returns what it read.
fn reader(lock: &Arc<RwLock<Pair>>, inside: &Arc<Inside>) -> thread::JoinHandle<Pair> {
    let (lock, inside) = (lock.clone(), inside.clone());
    thread::spawn(move || {
        let r = lock.read();
        inside.check_no_writer();
        *r
    })
}

/// A reader thread that tries once and does not wait: if it gets in, no writer is inside.
fn trying_reader(
    lock: &Arc<RwLock<Pair>>,
    inside: &Arc<Inside>,
) -> thread::JoinHandle<Option<Pair>> {
    let (lock, inside) = (lock.clone(), inside.clone());
    thread::spawn(move || {
        let r = lock.try_read()?;
        inside.check_no_writer();
        Some(*r)
    })
}

/// Two readers and a writer, the writer (the main thread) holding the lock first: one reader
/// waits (registered, or arriving after the release) and gets the lock at the release, the
/// other tries once. No reader is inside while the writer is; each sees the pair after the
/// write.
///
/// Only one thread spins at a time in these models. With two threads spinning (loom yields)
/// on a third, the models exceeded loom's branch limit, with or without a preemption bound:
/// loom's scheduler can alternate between yielding threads (loom issue #53, "With two threads
/// blocked on a third one, the scheduler oscillates between the two blocked threads").
#[test]
fn a_waiting_and_a_trying_reader_behind_a_writer() {
    loom::model(|| {
        let lock = Arc::new(RwLock::new((0u32, 0u32)));
        let inside = Arc::new(Inside::new());
        let mut w = lock.write();
        inside.enter_write();
        let waiting = reader(&lock, &inside);
        let trying = trying_reader(&lock, &inside);
        w.0 = 1;
        w.1 = 1;
        inside.leave_write();
        drop(w);
        assert_eq!(
            waiting.join().unwrap(),
            (1, 1),
            "a reader got in before the writer left"
        );
        if let Some(seen) = trying.join().unwrap() {
            assert_eq!(seen, (1, 1), "a reader got in before the writer left");
        }
        assert!(!lock.is_contended());
    });
    assert_eq!(
        inner_retries(),
        0,
        "the inner lock was busy after admission"
    );
}

/// Two readers and a writer, a reader (the main thread) holding the lock first: the writer
/// waits for it; the second reader tries once, and gets in only if the writer has not
/// registered yet. No reader is inside while the writer is.
#[test]
fn a_writer_and_a_trying_reader_behind_a_reader() {
    loom::model(|| {
        let lock = Arc::new(RwLock::new((0u32, 0u32)));
        let inside = Arc::new(Inside::new());
        let r = lock.read();
        let writer = {
            let (lock, inside) = (lock.clone(), inside.clone());
            thread::spawn(move || {
                let mut w = lock.write();
                inside.enter_write();
                w.0 = 1;
                w.1 = 1;
                inside.leave_write();
            })
        };
        let second = trying_reader(&lock, &inside);
        inside.check_no_writer();
        assert_eq!(*r, (0, 0), "the writer got in while a reader held the lock");
        drop(r);
        writer.join().unwrap();
        if let Some(seen) = second.join().unwrap() {
            assert!(seen == (0, 0) || seen == (1, 1), "{seen:?}");
        }
        assert_eq!(*lock.read(), (1, 1));
        assert!(!lock.is_contended());
    });
    assert_eq!(
        inner_retries(),
        0,
        "the inner lock was busy after admission"
    );
}

/// A writer that drops the lock because a writer waits cannot take it straight back:
/// `try_write` refuses while a writer is registered as waiting, so the only way it
/// succeeds is after the waiting writer got in and left (its increment is there).
#[test]
fn a_dropping_writer_cannot_barge_past_a_waiting_writer() {
    loom::model(|| {
        let lock = Arc::new(RwLock::new((0u32, 0u32)));
        let w = lock.write();
        let waiter = {
            let lock = lock.clone();
            thread::spawn(move || {
                let mut w = lock.write();
                w.0 += 1;
            })
        };
        while !lock.is_contended() {
            thread::yield_now();
        }
        drop(w);
        if let Some(g) = lock.try_write() {
            assert_eq!(g.0, 1, "took the lock back from a waiting writer");
        }
        waiter.join().unwrap();
    });
}
