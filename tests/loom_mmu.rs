//! Loom models of the shadow MMU's dirty-logging protocol: a vCPU's write fault (the fast
//! half restores the write bit by compare-exchange under the read lock and marks the page
//! dirty; the slow half maps under the write lock) races the thread that takes the dirty
//! log (swap each word to zero, write-protect what it named, under the write lock).
//!
//! Run with `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test --release --test
//! loom_mmu`. Every interleaving (within a preemption bound of 2) is explored; in each, the
//! write must show in the log taken by the racing thread or in the log still held by the
//! MMU (no lost write), and a page left writable must still be marked dirty.
#![cfg(loom)]
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use hvmem::spt::mmu::{FaultCaches, LogMode, Mmu, MmuConfig, SlotFlags, SlotId};
use hvmem::spt::{Ept, TableArena, TableFrame, TableSlot};
use hvmem::testing::mmu::LinearHost;
use hvmem::testing::spt::CountingFlush;
use hvmem::{Gfn, Gpa, Hpa, Level};
use loom::sync::Arc;
use loom::thread;

/// Guest frame n is host frame `LINEAR_HOST_PFN + n`, mapped with 4 KiB pages.
const HOST: LinearHost = LinearHost(Level::L1);

/// Runs `f` under loom; returns how many interleavings were explored.
fn model(f: impl Fn() + Sync + Send + 'static) -> usize {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let runs = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = runs.clone();
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(2);
    b.max_branches = 1 << 22;
    b.check(move || {
        counter.fetch_add(1, Ordering::Relaxed);
        f();
    });
    let n = runs.load(Ordering::Relaxed);
    eprintln!("{n} interleavings");
    n
}

/// An MMU over 8 leaked frames (root + 3 levels, and a vCPU cache's top-up of 3) with one 512-page slot whose
/// gfns `pages` are mapped writable, then dirty logging on (all write-protected).
fn logging_mmu(pages: &[u64], mode: LogMode) -> Arc<Mmu<'static, Ept>> {
    let frames: &'static [TableFrame] = Box::leak(
        (0..8)
            .map(|_| TableFrame::new())
            .collect::<Vec<_>>()
            .into_boxed_slice(),
    );
    let slots: &'static mut [TableSlot] = Box::leak((0..8).map(|_| TableSlot::default()).collect());
    let arena = TableArena::new(frames, slots, Hpa::new(0x10_0000).unwrap()).unwrap();
    let config = MmuConfig {
        hash_buckets: 4,
        descriptors: 4,
        ..MmuConfig::default()
    };
    let mmu = Mmu::<Ept>::new(arena, config).unwrap();
    mmu.add_slot(SlotId(0), Gfn::new(0).unwrap(), 512, SlotFlags::empty())
        .unwrap();
    let mut caches = FaultCaches::new();
    for &g in pages {
        mmu.page_fault(
            &mut caches,
            &HOST,
            Gpa::new(g << 12).unwrap(),
            true,
            &mut CountingFlush::default(),
        )
        .unwrap();
    }
    caches.release(&mmu).unwrap();
    mmu.enable_dirty_log(SlotId(0), mode, &mut CountingFlush::default())
        .unwrap();
    Arc::new(mmu)
}

fn write(mmu: &Mmu<'static, Ept>, gfn: u64) {
    let mut caches = FaultCaches::new();
    mmu.page_fault(
        &mut caches,
        &HOST,
        Gpa::new(gfn << 12).unwrap(),
        true,
        &mut CountingFlush::default(),
    )
    .unwrap();
    caches.release(mmu).unwrap();
}

fn held_log(mmu: &Mmu<'static, Ept>) -> u64 {
    let mut now = [0u64; 8];
    mmu.get_dirty_log(SlotId(0), &mut now).unwrap();
    now[0]
}

/// The fast path (the page is mapped, write-protected, mmu-writable) against
/// get-and-clear: the bit lands in the taken log or stays in the MMU's.
#[test]
fn fast_fault_races_get_and_clear() {
    let runs = model(|| {
        let mmu = logging_mmu(&[1], LogMode::PAGES);
        let vcpu = {
            let mmu = mmu.clone();
            thread::spawn(move || write(&mmu, 1))
        };
        let mut taken = [0u64; 8];
        mmu.get_and_clear_dirty_log(SlotId(0), &mut taken, &mut CountingFlush::default())
            .unwrap();
        vcpu.join().unwrap();
        let seen = taken[0] | held_log(&mmu);
        assert_ne!(seen & 2, 0, "the write to gfn 1 is in neither log");
        assert_eq!(seen & !2, 0, "a page nobody wrote is logged");
        // Writable implies still marked (check() verifies it with the rest).
        mmu.check().unwrap();
    });
    assert!(runs > 1);
}

/// The slow path (the page is not mapped yet: a table and an rmap entry are installed
/// under the write lock) against a manual clear of the whole mask.
#[test]
fn slow_fault_races_clear() {
    let runs = model(|| {
        let mmu = logging_mmu(&[1], LogMode::PAGES);
        let vcpu = {
            let mmu = mmu.clone();
            thread::spawn(move || write(&mmu, 5))
        };
        let mut got = [0u64; 8];
        mmu.get_dirty_log(SlotId(0), &mut got).unwrap();
        mmu.clear_dirty_log(SlotId(0), 0, &[got[0]], &mut CountingFlush::default())
            .unwrap();
        vcpu.join().unwrap();
        let seen = got[0] | held_log(&mmu);
        assert_ne!(seen & (1 << 5), 0, "the write to gfn 5 is in neither log");
        mmu.check().unwrap();
    });
    assert!(runs > 1);
}
