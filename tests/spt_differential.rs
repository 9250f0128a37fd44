//! Differential test of the x86-64 format: random map / unmap / protect / split / collapse
//! sequences; after every step, sampled addresses must translate identically through
//! `PageTable::translate`, a `BTreeMap` model, and the `x86_64` crate's own page-table
//! reader (`MappedPageTable::translate`) pointed at the very same tables. Code written by
//! others is the judge of our entry format.
//!
//! Run: `cargo test --test spt_differential`.
// The x86_64 crate's reader is built with `unsafe` constructors; the SAFETY comments below
// say why each use is sound.
#![allow(
    unsafe_code,
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

use hvmem::spt::{
    MapError, MapSize, PageTable, ProtectError, SplitTo, TableArena, TableFrame, TableMapping,
    TableSlot, UnmapError, WalkFlags, X86_64, X86Flags,
};
use hvmem::testing::Rng;
use hvmem::testing::spt::CountingFlush;
use hvmem::testing::spt::Model;
use hvmem::{Hpa, Level, Va};
use x86_64::VirtAddr;
use x86_64::structures::paging::mapper::{MappedFrame, MappedPageTable, TranslateResult};
use x86_64::structures::paging::{
    PageTable as PeerTable, PageTableFlags, PhysFrame, Translate, mapper::PageTableFrameMapping,
};

const PAGE: u64 = 4096;
const MIB2: u64 = 2 << 20;
const GIB1: u64 = 1 << 30;
/// Input addresses the ops touch.
const SPACE: u64 = 8 * GIB1;
/// Where the tables live physically (the x86_64 crate sees these addresses).
const TABLES_AT: u64 = 0x40_0000_0000;

/// The x86_64 crate's view of our table memory: a physical frame is wherever our arena says.
struct Oracle<'a>(&'a TableArena<'a>);

// SAFETY: `frame_to_pointer` returns the arena's own frame for that physical address, which
// stays valid while the arena lives (the oracle borrows it); an address the arena does not
// hold panics instead of returning a dangling pointer.
unsafe impl PageTableFrameMapping for Oracle<'_> {
    fn frame_to_pointer(&self, frame: PhysFrame) -> *mut PeerTable {
        let pa = Hpa::new(frame.start_address().as_u64()).unwrap();
        let ptr = self.0.table_ptr(pa).expect("table outside the arena");
        ptr.as_ptr().cast()
    }
}

/// What the x86_64 crate says `va` maps to: (pa, size, flags in our size-independent form).
fn peer_translate(arena: &TableArena<'_>, root: Hpa, va: u64) -> Option<(u64, u64, u64)> {
    let root = arena.table_ptr(root).unwrap().as_ptr().cast::<PeerTable>();
    // SAFETY: `root` is the arena's root frame, 4 KiB aligned, valid for reads and writes
    // while the arena lives. Nothing else accesses the tables while this reference exists:
    // our page table is not used until `translate` returns, and the x86_64 crate only reads.
    let mapper = unsafe { MappedPageTable::new(&mut *root, Oracle(arena)) };
    match mapper.translate(VirtAddr::new(va)) {
        TranslateResult::Mapped {
            frame,
            offset,
            flags,
        } => {
            let mut bits = flags.bits();
            if !matches!(frame, MappedFrame::Size4KiB(_)) {
                // Bit 7 is the page-size bit in a huge entry; PAT is not used here.
                bits &= !PageTableFlags::HUGE_PAGE.bits();
            }
            Some((frame.start_address().as_u64() + offset, frame.size(), bits))
        }
        TranslateResult::NotMapped => None,
        TranslateResult::InvalidFrameAddress(a) => panic!("invalid frame address {a:?}"),
    }
}

/// A random range aligned to a random unit.
fn range(rng: &mut Rng) -> (u64, u64) {
    let unit = [PAGE, PAGE, MIB2, MIB2, GIB1][rng.below(5) as usize];
    let start = rng.below(SPACE / unit) * unit;
    let len = (rng.below(if unit == GIB1 { 2 } else { 40 }) + 1) * unit;
    (start, (start + len).min(SPACE))
}

/// Flags without accessed/dirty (so collapse never merges them) and without PAT.
fn random_flags(rng: &mut Rng) -> u64 {
    let choices = [
        X86Flags::WRITABLE,
        X86Flags::USER,
        X86Flags::MMU_WRITABLE,
        X86Flags::NO_EXECUTE,
        X86Flags::GLOBAL,
    ];
    let mut f = X86Flags::PRESENT;
    for c in choices {
        if rng.below(2) == 0 {
            f |= c;
        }
    }
    f.bits()
}

fn va(a: u64) -> Va {
    Va::new(a).unwrap()
}

/// The leaf size the peer sees at `a`, if mapped.
fn leaf_straddles(arena: &TableArena<'_>, root: Hpa, start: u64, end: u64) -> bool {
    [start, end - PAGE].into_iter().any(|a| {
        peer_translate(arena, root, a).is_some_and(|(_, size, _)| {
            let leaf = a & !(size - 1);
            leaf < start || leaf + size > end
        })
    })
}

fn run(seed: u64, steps: usize) -> (usize, [usize; 5]) {
    let frames: Vec<TableFrame> = (0..6000).map(|_| TableFrame::new()).collect();
    let mut slots: Vec<TableSlot> = (0..6000).map(|_| TableSlot::default()).collect();
    let mut arena = TableArena::new(&frames, &mut slots, Hpa::new(TABLES_AT).unwrap()).unwrap();
    let mut pt = PageTable::<X86_64>::new(&mut arena).unwrap();
    let root = pt.root();
    let mut model = Model::default();
    let mut tlb = CountingFlush::default();
    let mut rng = Rng::new(seed);
    let mut applied = [0usize; 5];
    let mut checks = 0;
    for step in 0..steps {
        let (start, end) = range(&mut rng);
        let len = end - start;
        let kind = rng.below(5) as usize;
        match kind {
            0 => {
                let unit = [PAGE, MIB2, GIB1][rng.below(3) as usize];
                let pa = rng.below(64 * GIB1 / unit) * unit;
                let flags = random_flags(&mut rng);
                let f = X86Flags::from_bits_retain(flags);
                let r = pt.map(
                    &mut arena,
                    va(start),
                    Hpa::new(pa).unwrap(),
                    len,
                    f,
                    MapSize::Largest,
                    WalkFlags::empty(),
                );
                if model.overlaps(start, end) {
                    assert_eq!(r, Err(MapError::AlreadyMapped), "step {step}");
                } else {
                    r.unwrap();
                    model.map(start, end, pa, flags);
                    applied[0] += 1;
                }
            }
            1 => {
                let straddles = leaf_straddles(&arena, root, start, end);
                match pt.unmap(&mut arena, va(start), len) {
                    Ok(p) => {
                        assert!(!straddles, "step {step}");
                        p.flush(&mut tlb, &mut arena).unwrap();
                        model.unmap(start, end);
                        applied[1] += 1;
                    }
                    Err(e) => assert!(straddles && e == UnmapError::SplitsHugePage, "{e:?}"),
                }
            }
            2 => {
                let straddles = leaf_straddles(&arena, root, start, end);
                let set = random_flags(&mut rng) & !X86Flags::PRESENT.bits();
                let clear = random_flags(&mut rng) & !X86Flags::PRESENT.bits();
                let (s, c) = (
                    X86Flags::from_bits_retain(set),
                    X86Flags::from_bits_retain(clear),
                );
                match pt.protect(&mut arena, va(start), len, s, c, WalkFlags::empty()) {
                    Ok(p) => {
                        assert!(!straddles, "step {step}");
                        p.flush(&mut tlb, &mut arena).unwrap();
                        model.protect(start, end, set, clear);
                        applied[2] += 1;
                    }
                    Err(e) => assert!(straddles && e == ProtectError::SplitsHugePage, "{e:?}"),
                }
            }
            3 => {
                let to = [
                    SplitTo::OneLevel,
                    SplitTo::Level(Level::L1),
                    SplitTo::Level(Level::L2),
                ][rng.below(3) as usize];
                let done = pt
                    .split(&mut arena, va(start), len, to, WalkFlags::empty())
                    .unwrap();
                assert_eq!(done.resume_at, None, "step {step}: out of tables");
                applied[3] += done.split;
            }
            _ => {
                let max = [Level::L2, Level::L3][rng.below(2) as usize];
                loop {
                    let p = pt.collapse(&mut arena, va(start), len, max).unwrap();
                    applied[4] += p.tables_to_free();
                    let again = p.is_incomplete();
                    p.flush(&mut tlb, &mut arena).unwrap();
                    if !again {
                        break;
                    }
                }
            }
        }
        // Sample: the op's ends and around them, the model's extents, random addresses.
        let mut samples = vec![
            start,
            end - PAGE,
            end,
            start.wrapping_sub(PAGE),
            start + len / 2,
        ];
        samples.extend(model.extents().take(24).flat_map(|(s, e)| [s, e - 1, e]));
        samples.extend((0..48).map(|_| rng.below(SPACE)));
        for a in samples.into_iter().filter(|&a| a < SPACE) {
            let ours = pt
                .translate(&arena, va(a))
                .ok()
                .map(|t| (t.pa.get(), t.flags.bits()));
            let peer = peer_translate(&arena, root, a).map(|(pa, _, f)| (pa, f));
            let want = model.translate(a);
            assert_eq!(
                ours, want,
                "seed {seed} step {step} va {a:#x}: ours vs model"
            );
            assert_eq!(
                peer, want,
                "seed {seed} step {step} va {a:#x}: x86_64 crate vs model"
            );
            checks += 1;
        }
        assert_eq!(
            arena.allocated(),
            pt.table_count(&arena).unwrap(),
            "step {step}: leak"
        );
    }
    // Each pass clears every leaf; emptied tables beyond one token's room need more.
    loop {
        let p = pt.unmap(&mut arena, va(0), SPACE).unwrap();
        let again = p.is_incomplete();
        p.flush(&mut tlb, &mut arena).unwrap();
        if !again {
            break;
        }
    }
    assert_eq!(arena.allocated(), 1);
    (checks, applied)
}

#[test]
fn random_sequences_agree_with_model_and_x86_64_crate() {
    let mut total = 0;
    let mut applied = [0usize; 5];
    for seed in 1..=6 {
        let (checks, a) = run(seed * 0x9e37_79b9, 250);
        total += checks;
        for (t, x) in applied.iter_mut().zip(a) {
            *t += x;
        }
    }
    println!(
        "{total} translations compared; applied map/unmap/protect/split/collapse: {applied:?}"
    );
    // Every kind of op really ran (splits and collapses count leaves and tables changed).
    assert!(applied.iter().all(|&n| n > 0), "{applied:?}");
}

#[test]
fn peer_reads_huge_pages_we_build() {
    let frames: Vec<TableFrame> = (0..16).map(|_| TableFrame::new()).collect();
    let mut slots: Vec<TableSlot> = (0..16).map(|_| TableSlot::default()).collect();
    let mut arena = TableArena::new(&frames, &mut slots, Hpa::new(TABLES_AT).unwrap()).unwrap();
    let pt = PageTable::<X86_64>::new(&mut arena).unwrap();
    let f = X86Flags::PRESENT | X86Flags::WRITABLE;
    let pa = |a| Hpa::new(a).unwrap();
    pt.map(
        &mut arena,
        va(GIB1),
        pa(3 * GIB1),
        GIB1 + MIB2 + PAGE,
        f,
        MapSize::Largest,
        WalkFlags::empty(),
    )
    .unwrap();
    let root = pt.root();
    assert_eq!(
        peer_translate(&arena, root, GIB1 + 5),
        Some((3 * GIB1 + 5, GIB1, f.bits()))
    );
    assert_eq!(
        peer_translate(&arena, root, 2 * GIB1 + 7),
        Some((4 * GIB1 + 7, MIB2, f.bits()))
    );
    assert_eq!(
        peer_translate(&arena, root, 2 * GIB1 + MIB2 + 9),
        Some((4 * GIB1 + MIB2 + 9, PAGE, f.bits()))
    );
    assert_eq!(peer_translate(&arena, root, 0), None);
}
