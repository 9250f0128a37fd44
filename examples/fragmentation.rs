//! The guest side of (Hildenbrand, "VIRTIO_BALLOON_F_THP_ORDER to handle THP spilt issue",
//! 2020) in the buddy allocator: a 1 GiB guest runs
//! `usemem --punch-holes -s -1 800m` (allocate 800 MiB in 4 KiB pages, free every other one),
//! then reports its free 2 MiB blocks to the host and allocates again.
//!
//! Prints one table, a row per phase: free memory, free blocks per order (like
//! `/proc/buddyinfo`), memory free in whole 2 MiB host huge pages, memory the host holds as
//! reported, and how the allocator's choices looked. Options: `--ram-mib N` (1024),
//! `--use-mib N` (800), `--realloc-mib N` (256).
//!
//! Run: `cargo run --release --example fragmentation`

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Instant;

use arrayvec::ArrayVec;
use hvmem::buddy::{Block, Buddy, FrameMeta};
use hvmem::{PageOrder, Pfn};

const MAX_ORDER: usize = 10;
type Guest = Buddy<Vec<FrameMeta>, MAX_ORDER>;

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name} takes a number of MiB"))
        })
        .unwrap_or(default)
}

fn mib(frames: u64) -> f64 {
    frames as f64 * 4096.0 / (1 << 20) as f64
}

fn header() {
    println!(
        "{:<34} {:>9} {:>8} {:>8} {:>8} {:>8} {:>10} {:>10}  note",
        "phase", "free MiB", "order0", "o1-o8", "order9", "order10", "2M-free", "reported"
    );
}

fn row(phase: &str, b: &Guest, note: &str) {
    let s = |o: u8| b.order_stats(PageOrder::new(o).unwrap()).free;
    let mid: u64 = (1..=8).map(s).sum();
    let huge_frames: u64 = (9..=MAX_ORDER as u8).map(|o| s(o) << o).sum();
    println!(
        "{:<34} {:>9.1} {:>8} {:>8} {:>8} {:>8} {:>10.1} {:>10.1}  {}",
        phase,
        mib(b.free_frames()),
        s(0),
        mid,
        s(9),
        s(10),
        mib(huge_frames),
        mib(b.reported_frames()),
        note
    );
}

fn main() {
    let ram = arg("--ram-mib", 1024) * 256;
    let used = arg("--use-mib", 800) * 256;
    let realloc = arg("--realloc-mib", 256) * 256;
    assert!(
        used <= ram && realloc <= ram,
        "the workload must fit in guest RAM"
    );

    // Guest RAM starts at 1 MiB, as below the first megabyte sits firmware.
    let base = Pfn::new(256).unwrap();
    let mut b: Guest = Buddy::new(vec![FrameMeta::HOLE; ram as usize], base).unwrap();
    b.add_range(base, ram).unwrap();
    println!(
        "guest RAM {} MiB at {:#x}, usemem --punch-holes {} MiB, then realloc {} MiB\n",
        ram / 256,
        base.addr().get(),
        used / 256,
        realloc / 256
    );
    header();
    row("boot", &b, "");

    let t = Instant::now();
    let pages: Vec<Block> = (0..used)
        .map(|_| b.alloc(PageOrder::BASE).unwrap())
        .collect();
    let ns = t.elapsed().as_nanos() as f64 / used as f64;
    row(
        "usemem: 800 MiB of 4 KiB pages",
        &b,
        &format!("{ns:.1} ns per alloc"),
    );

    let t = Instant::now();
    let mut kept = Vec::new();
    for (i, p) in pages.into_iter().enumerate() {
        if i % 2 == 0 {
            b.free(p.pfn, p.order).unwrap();
        } else {
            kept.push(p);
        }
    }
    let ns = t.elapsed().as_nanos() as f64 / (used / 2) as f64;
    row(
        "punch holes: free every other",
        &b,
        &format!("{ns:.1} ns per free"),
    );

    // One reporting pass at minimum order 9: every unreported free block of order >= 9
    // is isolated in batches of 32, "sent", and put back reported.
    let t = Instant::now();
    let mut batches = 0;
    for o in 9..=MAX_ORDER as u8 {
        let order = PageOrder::new(o).unwrap();
        loop {
            let mut batch = ArrayVec::<Block, 32>::new();
            if b.isolate(order, 32, &mut batch).unwrap() == 0 {
                break;
            }
            batches += 1;
            for blk in batch {
                b.put_back(blk.pfn, blk.order, true).unwrap();
            }
        }
    }
    let us = t.elapsed().as_secs_f64() * 1e6;
    row(
        "report order >= 9 (batches of 32)",
        &b,
        &format!("{batches} batches, {us:.0} us"),
    );

    // Allocate again: small holes first (unreported, still backed by the host), reported
    // huge blocks only when nothing else is left of the order.
    let (mut got, mut reported) = (0u64, 0u64);
    let mut again = Vec::new();
    while got < realloc {
        let Ok(blk) = b.alloc(PageOrder::BASE) else {
            break;
        };
        got += 1;
        reported += u64::from(blk.reported);
        again.push(blk);
    }
    row(
        "realloc 4 KiB pages",
        &b,
        &format!(
            "{:.1} MiB handed out, {:.1} MiB of it was reported",
            mib(got),
            mib(reported)
        ),
    );

    for p in kept.into_iter().chain(again) {
        b.free(p.pfn, p.order).unwrap();
    }
    b.check_invariants().unwrap();
    row("free everything", &b, "merged back");
}
