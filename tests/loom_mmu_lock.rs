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

/// Who is inside the critical section: the count of readers, plus `WRITER` per writer.
struct Inside(AtomicUsize);

const WRITER: usize = 1 << 16;

impl Inside {
    fn new() -> Self {
        Self(AtomicUsize::new(0))
    }

    fn enter_read(&self) {
        let before = self.0.fetch_add(1, Ordering::SeqCst);
        assert!(
            before < WRITER,
            "a reader entered while a writer was inside"
        );
    }

    fn leave_read(&self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }

    fn enter_write(&self) {
        let before = self.0.fetch_add(WRITER, Ordering::SeqCst);
        assert_eq!(before, 0, "a writer entered while someone was inside");
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
            inside.enter_read();
            assert_eq!(r.0, r.1, "read half a unit");
            inside.leave_read();
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

/// Two readers and a writer: no reader is inside while the writer is, both readers see the
/// value before or after the write, never in between.
#[test]
fn two_readers_and_a_writer() {
    loom::model(|| {
        let lock = Arc::new(RwLock::new((0u32, 0u32)));
        let inside = Arc::new(Inside::new());
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (lock, inside) = (lock.clone(), inside.clone());
                thread::spawn(move || {
                    let r = lock.read();
                    inside.enter_read();
                    let seen = *r;
                    inside.leave_read();
                    seen
                })
            })
            .collect();
        {
            let mut w = lock.write();
            inside.enter_write();
            w.0 = 1;
            w.1 = 1;
            inside.leave_write();
        }
        for r in readers {
            let seen = r.join().unwrap();
            assert!(seen == (0, 0) || seen == (1, 1), "{seen:?}");
        }
        assert!(!lock.is_contended());
    });
    assert_eq!(
        inner_retries(),
        0,
        "the inner lock was busy after admission"
    );
}
