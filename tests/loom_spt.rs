//! Loom models of the walker's shared mode: two threads change one tree by
//! compare-exchange, with tables from one `LockedArena`.
//!
//! Run with `RUSTFLAGS="--cfg loom" cargo test --release --test loom_spt`. Under loom the
//! entries are loom atomics and the arena's lock is loom's mutex, so every interleaving of
//! the racing installs (of tables, of split tables, of write-protected leaves) is explored.
#![cfg(loom)]
#![allow(missing_docs, clippy::unwrap_used)]

use hvmem::spt::{
    LockedArena, MapSize, PageTable, SplitTo, TableArena, TableFrame, TableSlot, WalkFlags, X86_64,
    X86Flags,
};
use hvmem::testing::spt::CountingFlush;
use hvmem::{Hpa, Level, Va};
use loom::sync::Arc;
use loom::thread;

const PAGE: u64 = 4096;
const MIB2: u64 = 2 << 20;

/// Runs `f` under loom and returns how many interleavings it explored.
fn model(f: impl Fn() + Sync + Send + 'static) -> usize {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let runs = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = runs.clone();
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(2);
    b.max_branches = 1 << 20;
    b.check(move || {
        counter.fetch_add(1, Ordering::Relaxed);
        f();
    });
    runs.load(Ordering::Relaxed)
}

fn va(a: u64) -> Va {
    Va::new(a).unwrap()
}

fn pa(a: u64) -> Hpa {
    Hpa::new(a).unwrap()
}

fn frames(n: usize) -> &'static [TableFrame] {
    // Leaked per execution: loom objects must be created inside the model.
    Box::leak(
        (0..n)
            .map(|_| TableFrame::new())
            .collect::<Vec<_>>()
            .into_boxed_slice(),
    )
}

fn slots(n: usize) -> &'static mut [TableSlot] {
    // Leaked per execution, like the frames (their link counts are loom atomics).
    Box::leak((0..n).map(|_| TableSlot::default()).collect())
}

fn rw() -> X86Flags {
    X86Flags::PRESENT | X86Flags::WRITABLE
}

/// Two threads map neighbouring pages of an empty tree: both race to install the same
/// three tables; the loser of each race frees its own table. Both pages end up mapped and
/// no table leaks.
#[test]
fn racing_maps_install_each_table_once() {
    let runs = model(|| {
        let shared = Arc::new(LockedArena::new(
            TableArena::new(frames(10), slots(10), pa(1 << 32)).unwrap(),
        ));
        let pt = Arc::new(PageTable::<X86_64>::new(&mut &*shared).unwrap());
        let handles: Vec<_> = (0..2u64)
            .map(|t| {
                let (pt, shared) = (pt.clone(), shared.clone());
                thread::spawn(move || {
                    let size = MapSize::Exactly(Level::L1);
                    let (v, p) = (va(t * PAGE), pa(t * PAGE));
                    pt.map(&mut &*shared, v, p, PAGE, rw(), size, WalkFlags::SHARED)
                        .unwrap();
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        for t in 0..2 {
            assert_eq!(
                pt.translate(&&*shared, va(t * PAGE)).unwrap().pa.get(),
                t * PAGE
            );
        }
        assert_eq!(shared.allocated(), 4);
        assert_eq!(pt.table_count(&&*shared).unwrap(), 4);
    });
    println!("racing maps: {runs} interleavings");
    assert!(runs > 1);
}

/// A split of a 2 MiB leaf races a write-protect of it: the protect either changes the
/// huge leaf before the split copies it, or loses its exchange, sees the new table and
/// protects the 512 children. Every page ends up 4 KiB and read-only.
#[test]
fn split_racing_protect_loses_nothing() {
    let runs = model(|| {
        let shared = Arc::new(LockedArena::new(
            TableArena::new(frames(8), slots(8), pa(1 << 32)).unwrap(),
        ));
        let pt = Arc::new(PageTable::<X86_64>::new(&mut &*shared).unwrap());
        pt.map(
            &mut &*shared,
            va(0),
            pa(0),
            MIB2,
            rw(),
            MapSize::Largest,
            WalkFlags::SHARED,
        )
        .unwrap();
        let splitter = {
            let (pt, shared) = (pt.clone(), shared.clone());
            thread::spawn(move || {
                let to = SplitTo::Level(Level::L1);
                let done = pt
                    .split(&mut &*shared, va(0), MIB2, to, WalkFlags::SHARED)
                    .unwrap();
                assert!(done.split <= 1 && done.resume_at.is_none());
            })
        };
        let protector = {
            let (pt, shared) = (pt.clone(), shared.clone());
            thread::spawn(move || {
                let mut mem = &*shared;
                let (set, clear) = (X86Flags::empty(), X86Flags::WRITABLE);
                let p = pt
                    .protect(&mut mem, va(0), MIB2, set, clear, WalkFlags::SHARED)
                    .unwrap();
                p.flush(&mut CountingFlush::default(), &mut mem).unwrap();
            })
        };
        splitter.join().unwrap();
        protector.join().unwrap();
        for a in [0, PAGE, MIB2 - PAGE] {
            let t = pt.translate(&&*shared, va(a)).unwrap();
            assert_eq!((t.pa.get(), t.level), (a, Level::L1));
            assert!(
                !t.flags.contains(X86Flags::WRITABLE),
                "write-protect lost at {a:#x}"
            );
        }
        assert_eq!(shared.allocated(), pt.table_count(&&*shared).unwrap());
    });
    println!("split racing protect: {runs} interleavings");
    assert!(runs > 1);
}
