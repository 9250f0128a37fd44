#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

extern crate std;

use std::vec::Vec;

use super::*;
use crate::addr::{Gpa, Hpa, Pfn};
use crate::spt::mmu::{Fault, FaultCaches, HostMemory, HostPage, LogMode, MmuConfig, SlotFlags};
use crate::spt::{Ept, FlushRange, TableArena, TableFrame, TableSlot};

struct Host(Level);

impl HostMemory for Host {
    fn host_page(&self, _slot: SlotId, gfn: Gfn) -> Option<HostPage> {
        Some(HostPage {
            pfn: Pfn::new(0x40_0000 + gfn.get()).ok()?,
            level: self.0,
            writable: true,
        })
    }
}

#[derive(Default)]
struct Tlb(u64);

impl TlbFlush for Tlb {
    fn flush_range(&mut self, _: FlushRange) {
        self.0 += 1;
    }
    fn flush_all(&mut self) {
        self.0 += 1;
    }
}

const FRAMES: usize = 2400;

struct Fx {
    frames: Vec<TableFrame>,
    slots: Vec<TableSlot>,
}

fn fx() -> Fx {
    Fx {
        frames: (0..FRAMES).map(|_| TableFrame::new()).collect(),
        slots: (0..FRAMES).map(|_| TableSlot::default()).collect(),
    }
}

/// The default configuration with eager splitting on.
fn eager() -> MmuConfig {
    MmuConfig {
        eager_split: true,
        ..MmuConfig::default()
    }
}

fn mmu(f: &mut Fx, config: MmuConfig) -> Mmu<'_, Ept> {
    let arena = TableArena::new(&f.frames, &mut f.slots, Hpa::new(0x8000_0000).unwrap()).unwrap();
    Mmu::new(arena, config).unwrap()
}

fn gpa(g: u64) -> Gpa {
    Gpa::new(g << 12).unwrap()
}

/// A slot of 2 GiB: the first GiB mapped by one 1 GiB leaf, 16 MiB of the second by
/// 2 MiB leaves.
fn populated(m: &Mmu<'_, Ept>) {
    m.add_slot(SlotId(0), Gfn::new(0).unwrap(), 1 << 19, SlotFlags::empty())
        .unwrap();
    let mut c = FaultCaches::new();
    m.page_fault(&mut c, &Host(Level::L3), gpa(5), true, &mut Tlb::default())
        .unwrap();
    for k in 0..8 {
        m.page_fault(
            &mut c,
            &Host(Level::L2),
            gpa((1 << 18) + k * 512),
            true,
            &mut Tlb::default(),
        )
        .unwrap();
    }
    c.release(m).unwrap();
}

fn sample(m: &Mmu<'_, Ept>) -> Vec<Option<(u64, bool)>> {
    (0..(1u64 << 19))
        .step_by(97)
        .map(|g| m.translate(gpa(g)).map(|t| (t.hpa.get(), t.writable)))
        .collect()
}

#[test]
fn eager_split_keeps_every_translation_and_a_second_pass_is_free() {
    let mut f = fx();
    let m = mmu(&mut f, MmuConfig::default());
    populated(&m);
    let before = sample(&m);
    let mut caches = SplitCaches::new();
    let mut tlb = Tlb::default();
    let s = m
        .eager_split(&mut caches, SlotId(0), None, Level::L1, &mut tlb)
        .unwrap();
    // 1 GiB → 512 × 2 MiB → 512 × 512 × 4 KiB; and the 8 2 MiB leaves.
    assert_eq!(s.split, 1 + 512 + 8);
    assert_eq!((s.aliases, s.reused), (0, 0));
    assert_eq!(sample(&m), before);
    let counts = m.check().unwrap();
    assert_eq!(counts.leaves, 512 * 512 + 8 * 512);
    assert!(s.lock_drops > 0, "tables come 40 at a time: {s:?}");
    // Nothing left: the huge levels' rmaps are empty.
    let again = m
        .eager_split(&mut caches, SlotId(0), None, Level::L1, &mut tlb)
        .unwrap();
    assert_eq!(again, SplitStats::default());
    caches.release(&m).unwrap();
    assert_eq!(m.tables_allocated(), counts.pages);
}

#[test]
fn split_to_two_megabytes_and_ranges() {
    let mut f = fx();
    let m = mmu(&mut f, MmuConfig::default());
    populated(&m);
    let mut caches = SplitCaches::new();
    let mut tlb = Tlb::default();
    // Only the 2 MiB leaf holding gfn 0x40000 + 700 is split.
    let r = Some((
        Gfn::new((1 << 18) + 700).unwrap(),
        Gfn::new((1 << 18) + 701).unwrap(),
    ));
    let s = m
        .eager_split(&mut caches, SlotId(0), r, Level::L1, &mut tlb)
        .unwrap();
    assert_eq!(s.split, 1);
    assert_eq!(m.translate(gpa((1 << 18) + 700)).unwrap().level, Level::L1);
    assert_eq!(m.translate(gpa((1 << 18) + 1100)).unwrap().level, Level::L2);
    // To 2 MiB: only the 1 GiB leaf goes.
    let s = m
        .eager_split(&mut caches, SlotId(0), None, Level::L2, &mut tlb)
        .unwrap();
    assert_eq!(s.split, 1);
    assert_eq!(m.translate(gpa(5)).unwrap().level, Level::L2);
    m.check().unwrap();
    assert_eq!(
        m.eager_split(&mut caches, SlotId(0), None, Level::L3, &mut tlb),
        Err(SplitError::BadRange)
    );
    assert_eq!(
        m.eager_split(&mut caches, SlotId(9), None, Level::L1, &mut tlb),
        Err(SplitError::NotFound)
    );
}

#[test]
fn split_refuses_when_few_pages_are_free() {
    let mut f = fx();
    let m = mmu(
        &mut f,
        MmuConfig {
            page_limit: Some(20),
            ..MmuConfig::default()
        },
    );
    populated(&m);
    let mut caches = SplitCaches::new();
    let r = m.eager_split(&mut caches, SlotId(0), None, Level::L1, &mut Tlb::default());
    assert_eq!(r, Err(SplitError::TooFewPages));
    let c = m.check().unwrap();
    assert!(m.pages_used() <= 20);
    // What was split is consistent and translations still hold.
    assert_eq!(
        m.translate(gpa(5)).unwrap().hpa.get(),
        (0x40_0000 + 5) << 12
    );
    assert!(c.leaves > 9);
}

#[test]
fn enabling_the_log_splits_eagerly() {
    for eager in [false, true] {
        let mut f = fx();
        let m = mmu(
            &mut f,
            MmuConfig {
                eager_split: eager,
                ..MmuConfig::default()
            },
        );
        populated(&m);
        let mut tlb = Tlb::default();
        m.enable_dirty_log(SlotId(0), LogMode::PAGES, &mut tlb)
            .unwrap();
        m.check().unwrap();
        let mut c = FaultCaches::new();
        let h = Host(Level::L2);
        let r = m.page_fault(&mut c, &h, gpa(1000), true, &mut tlb).unwrap();
        let stats = m.stats();
        if eager {
            assert_eq!(stats.eager_splits, 1 + 512 + 8);
            assert_eq!(r, Fault::Fast);
            assert_eq!(stats.huge_dropped, 0);
        } else {
            assert_eq!(stats.eager_splits, 0);
            assert_eq!(
                r,
                Fault::Mapped {
                    level: Level::L1,
                    writable: true
                }
            );
            assert_eq!(stats.huge_dropped, 1);
        }
        let mut log = std::vec![0u64; m.dirty_log_words(SlotId(0)).unwrap()];
        m.get_and_clear_dirty_log(SlotId(0), &mut log, &mut tlb)
            .unwrap();
        assert_eq!(log[1000 / 64], 1 << (1000 % 64));
        m.check().unwrap();
    }
}

#[test]
fn clearing_under_initially_set_splits_only_the_masked_range() {
    let mut f = fx();
    let m = mmu(&mut f, eager());
    populated(&m);
    let mut tlb = Tlb::default();
    let mode = LogMode {
        initially_set: true,
        granularity: Level::L1,
    };
    m.enable_dirty_log(SlotId(0), mode, &mut tlb).unwrap();
    assert_eq!(m.stats().eager_splits, 0);
    // Clear gfns 0x40000 + 64..128 (bits 3 and 40 of word 0x1001): the 2 MiB leaf there is
    // split, the others stay.
    let w = ((1 << 18) + 64) / 64;
    m.clear_dirty_log(SlotId(0), w * 64, &[(1 << 3) | (1 << 40)], &mut tlb)
        .unwrap();
    m.check().unwrap();
    assert_eq!(m.stats().eager_splits, 1);
    assert_eq!(m.translate(gpa((1 << 18) + 67)).unwrap().level, Level::L1);
    assert!(!m.translate(gpa((1 << 18) + 67)).unwrap().writable);
    assert!(m.translate(gpa((1 << 18) + 68)).unwrap().writable);
    assert_eq!(m.translate(gpa((1 << 18) + 600)).unwrap().level, Level::L2);
    // In the 1 GiB leaf: a clear there splits 1 GiB → 2 MiB → 4 KiB for that range only.
    m.clear_dirty_log(SlotId(0), 0, &[1], &mut tlb).unwrap();
    assert_eq!(m.stats().eager_splits, 3);
    assert_eq!(m.translate(gpa(0)).unwrap().level, Level::L1);
    assert_eq!(m.translate(gpa(512)).unwrap().level, Level::L2);
    m.check().unwrap();
}

#[test]
fn the_walk_splits_the_same_as_the_rmaps() {
    let (mut f1, mut f2) = (fx(), fx());
    let a = mmu(&mut f1, MmuConfig::default());
    let b = mmu(&mut f2, MmuConfig::default());
    populated(&a);
    populated(&b);
    let (mut ca, mut cb) = (SplitCaches::new(), SplitCaches::new());
    let mut tlb = Tlb::default();
    let r = Some((Gfn::new(3).unwrap(), Gfn::new((1 << 18) + 1500).unwrap()));
    for target in [Level::L2, Level::L1] {
        let x = a
            .eager_split(&mut ca, SlotId(0), r, target, &mut tlb)
            .unwrap();
        let y = b
            .eager_split_by_walk(&mut cb, SlotId(0), r, target, &mut tlb)
            .unwrap();
        assert_eq!(x.split, y.split, "{target:?}");
        a.check().unwrap();
        b.check().unwrap();
        assert_eq!(sample(&a), sample(&b));
        assert_eq!(a.check().unwrap(), b.check().unwrap());
    }
    // Iteration 2: nothing left for either.
    let y = b
        .eager_split_by_walk(&mut cb, SlotId(0), None, Level::L1, &mut tlb)
        .unwrap();
    let x = a
        .eager_split(&mut ca, SlotId(0), None, Level::L1, &mut tlb)
        .unwrap();
    assert_eq!(
        (x.split, y.split),
        (8 - 3, 8 - 3),
        "the 2 MiB leaves past the range"
    );
    assert_eq!(
        b.eager_split_by_walk(&mut cb, SlotId(0), None, Level::L1, &mut tlb)
            .unwrap()
            .split,
        0
    );
}

/// A fresh child whose frames already have 4 KiB mappings elsewhere (here one page in a
/// second address space): its heads are not all empty, so the split adds its leaves one
/// by one and the rmaps stay exact (a head filled over would lose the other entry).
#[test]
fn a_fresh_child_over_mapped_frames_adds_to_their_heads() {
    let mut f = fx();
    let config = MmuConfig {
        address_spaces: 2,
        ..MmuConfig::default()
    };
    let m = mmu(&mut f, config);
    m.add_slot(SlotId(0), Gfn::new(0).unwrap(), 1 << 18, SlotFlags::empty())
        .unwrap();
    let mut c = FaultCaches::new();
    for g in [0u64, 512] {
        m.page_fault(&mut c, &Host(Level::L2), gpa(g), true, &mut Tlb::default())
            .unwrap();
    }
    m.page_fault_in(
        1,
        &mut c,
        &Host(Level::L1),
        gpa(7),
        false,
        &mut Tlb::default(),
    )
    .unwrap();
    c.release(&m).unwrap();
    let mut caches = SplitCaches::new();
    let s = m
        .eager_split(&mut caches, SlotId(0), None, Level::L1, &mut Tlb::default())
        .unwrap();
    assert_eq!((s.split, s.aliases, s.reused), (2, 0, 0));
    let counts = m.check().unwrap();
    assert_eq!(counts.leaves, 2 * 512 + 1);
    assert_eq!(m.stats().inconsistencies, 0);
    let st = m.state.read();
    let rmaps = &st.slots[0].rmaps;
    let head = |g: u64| *rmaps.head(Gfn::new(g).unwrap(), Level::L1).unwrap();
    assert_eq!(head(7).count(&st.store), 2);
    assert_eq!(head(6).count(&st.store), 1);
    assert_eq!(head(512 + 7).count(&st.store), 1);
}

#[test]
fn every_alias_is_split() {
    for walk in [false, true] {
        let mut f = fx();
        // Two entries per 4 KiB gfn after the split: one descriptor each.
        let config = MmuConfig {
            address_spaces: 2,
            descriptors: 300_000,
            ..MmuConfig::default()
        };
        let m = mmu(&mut f, config);
        populated(&m);
        // The same frames mapped in address space 1 too: each huge frame has two entries
        // in its rmap.
        let mut c = FaultCaches::new();
        m.page_fault_in(
            1,
            &mut c,
            &Host(Level::L3),
            gpa(9),
            false,
            &mut Tlb::default(),
        )
        .unwrap();
        for k in 0..8 {
            m.page_fault_in(
                1,
                &mut c,
                &Host(Level::L2),
                gpa((1 << 18) + k * 512),
                false,
                &mut Tlb::default(),
            )
            .unwrap();
        }
        assert_eq!(
            m.page_fault_in(
                2,
                &mut c,
                &Host(Level::L2),
                gpa(0),
                false,
                &mut Tlb::default()
            ),
            Err(crate::spt::mmu::FaultError::BadAddress)
        );
        c.release(&m).unwrap();
        let before: Vec<_> = (0..2)
            .map(|a| {
                (0..1u64 << 19)
                    .step_by(1021)
                    .map(|g| m.translate_in(a, gpa(g)))
                    .collect::<Vec<_>>()
            })
            .collect();
        let mut caches = SplitCaches::new();
        let s = if walk {
            m.eager_split_by_walk(&mut caches, SlotId(0), None, Level::L1, &mut Tlb::default())
        } else {
            m.eager_split(&mut caches, SlotId(0), None, Level::L1, &mut Tlb::default())
        }
        .unwrap();
        assert_eq!(s.split, 2 * (1 + 512 + 8), "walk: {walk}");
        if !walk {
            assert_eq!(s.aliases, 1 + 512 + 8, "one alias per huge frame");
        }
        let counts = m.check().unwrap();
        assert_eq!(counts.leaves, 2 * (512 * 512 + 8 * 512));
        let after: Vec<_> = (0..2)
            .map(|a| {
                (0..1u64 << 19)
                    .step_by(1021)
                    .map(|g| m.translate_in(a, gpa(g)).map(|t| (t.hpa, t.writable)))
                    .collect::<Vec<_>>()
            })
            .collect();
        for a in 0..2 {
            let b: Vec<_> = before[a]
                .iter()
                .map(|t| t.map(|t| (t.hpa, t.writable)))
                .collect();
            assert_eq!(b, after[a]);
        }
    }
}

#[test]
fn forced_lock_drops_restart_and_change_nothing() {
    for walk in [false, true] {
        let mut f = fx();
        let m = mmu(&mut f, MmuConfig::default());
        populated(&m);
        let before = sample(&m);
        let mut caches = SplitCaches::new();
        caches.force_lock_drops(2);
        let s = if walk {
            m.eager_split_by_walk(&mut caches, SlotId(0), None, Level::L1, &mut Tlb::default())
        } else {
            m.eager_split(&mut caches, SlotId(0), None, Level::L1, &mut Tlb::default())
        }
        .unwrap();
        assert_eq!(s.split, 1 + 512 + 8, "walk {walk}");
        assert!(
            s.lock_drops >= s.split / 2 && s.restarts == s.lock_drops,
            "{s:?}"
        );
        assert_eq!(sample(&m), before);
        m.check().unwrap();
    }
}

/// Regression: the splitter dropped the MMU lock whenever someone waited, even right after
/// retaking it, so a waiting writer that kept losing the race for the free lock (waiting
/// writers are not queued) had it drop and retake the lock forever without splitting
/// anything: loom found runs of over a thousand drops. Now it splits at least one huge
/// page after each retake before it yields again. Told to drop at every check (the test
/// hook's worst case, which it used to refuse: it looped forever), it still finishes, with
/// no more drops than splits.
#[test]
fn a_splitter_told_to_yield_at_every_check_still_progresses() {
    for walk in [false, true] {
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut f = fx();
            let m = mmu(&mut f, MmuConfig::default());
            populated(&m);
            let before = sample(&m);
            let mut caches = SplitCaches::new();
            caches.force_lock_drops(1);
            let mut tlb = Tlb::default();
            let s = if walk {
                m.eager_split_by_walk(&mut caches, SlotId(0), None, Level::L1, &mut tlb)
            } else {
                m.eager_split(&mut caches, SlotId(0), None, Level::L1, &mut tlb)
            }
            .unwrap();
            assert_eq!(sample(&m), before);
            m.check().unwrap();
            let _ = done.send(s);
        });
        let s = finished
            .recv_timeout(std::time::Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("the splitter never finished (walk {walk})"));
        assert_eq!(s.split, 1 + 512 + 8, "walk {walk}");
        assert!(s.lock_drops <= s.split + 1, "walk {walk}: {s:?}");
        assert!(
            s.lock_drops >= s.split - 1,
            "every check should drop: {s:?}"
        );
    }
}

/// Regression (misuse audit): a refused `eager_split` (no such slot, an empty range, a
/// target not below the largest leaf) topped the caller's caches up first, so the MMU's
/// table and descriptor counts moved and fresh caches got bound to this MMU by a call
/// that did nothing.
#[test]
fn a_refused_split_takes_nothing() {
    let mut f = fx();
    let m = mmu(&mut f, MmuConfig::default());
    populated(&m);
    let mut tlb = Tlb::default();
    m.delete_slot(SlotId(0), &mut tlb).unwrap();
    m.add_slot(SlotId(1), Gfn::new(0).unwrap(), 1 << 10, SlotFlags::empty())
        .unwrap();
    let before = (m.tables_allocated(), m.descriptors_free(), m.stats());
    let mut caches = SplitCaches::new();
    let far = Gfn::new(1 << 20).unwrap();
    for (slot, range, target, want) in [
        (SlotId(0), None, Level::L1, SplitError::NotFound),
        (SlotId(1), Some((far, far)), Level::L1, SplitError::BadRange),
        (SlotId(1), None, Level::L3, SplitError::BadRange),
    ] {
        assert_eq!(
            m.eager_split(&mut caches, slot, range, target, &mut tlb),
            Err(want)
        );
        assert_eq!((caches.tables(), caches.descriptors()), (0, 0));
        assert_eq!(
            (m.tables_allocated(), m.descriptors_free(), m.stats()),
            before
        );
    }
    m.check().unwrap();
}

/// Regression (MMU audit): with 2 MiB logging under `initially_set`, a clear never split:
/// the enable does not (nothing is protected then) and the clear split only for 4 KiB
/// logging, so the whole 1 GiB leaf was write-protected and the next write dropped it. A
/// clear now splits the masked range down to the logging unit, and `get_and_clear` under
/// `initially_set` splits what it names the same way.
#[test]
fn initially_set_clears_split_down_to_the_logging_unit() {
    let mut f = fx();
    let m = mmu(&mut f, eager());
    populated(&m);
    let mut tlb = Tlb::default();
    let mode = LogMode {
        initially_set: true,
        granularity: Level::L2,
    };
    m.enable_dirty_log(SlotId(0), mode, &mut tlb).unwrap();
    // Unit 1 (gfns 512..1024) of the 1 GiB leaf: split 1 GiB -> 2 MiB, no further.
    m.clear_dirty_log(SlotId(0), 0, &[0b10], &mut tlb).unwrap();
    m.check().unwrap();
    assert_eq!(m.stats().eager_splits, 1);
    assert_eq!(m.translate(gpa(600)).unwrap().level, Level::L2);
    assert!(!m.translate(gpa(600)).unwrap().writable);
    assert!(m.translate(gpa(5)).unwrap().writable);
    assert_eq!(m.stats().eager_split_failures, 0);

    // get_and_clear under initially_set, 4 KiB units: every named huge page is split.
    let mut f = fx();
    let m = mmu(&mut f, eager());
    populated(&m);
    let mode = LogMode {
        initially_set: true,
        granularity: Level::L1,
    };
    m.enable_dirty_log(SlotId(0), mode, &mut tlb).unwrap();
    let mut log = std::vec![0u64; m.dirty_log_words(SlotId(0)).unwrap()];
    m.get_and_clear_dirty_log(SlotId(0), &mut log, &mut tlb)
        .unwrap();
    m.check().unwrap();
    // The 1 GiB leaf to 512 x 2 MiB to 4 KiB, and the 8 2 MiB leaves.
    assert_eq!(m.stats().eager_splits, 1 + 512 + 8);
    assert_eq!(m.translate(gpa((1 << 18) + 700)).unwrap().level, Level::L1);
    assert_eq!(m.stats().eager_split_failures, 0);
}

/// Regression (MMU audit): a clear under `initially_set` on an MMU whose largest leaf is
/// 4 KiB counted an eager-split failure every time (there is nothing to split), and a split
/// the dirty-log path started that stopped early (page limit) dropped the count of what it
/// had split before.
#[test]
fn eager_split_counters_say_what_happened() {
    let mut f = fx();
    let m = mmu(
        &mut f,
        MmuConfig {
            eager_split: true,
            max_leaf: Level::L1,
            ..MmuConfig::default()
        },
    );
    m.add_slot(SlotId(0), Gfn::new(0).unwrap(), 1024, SlotFlags::empty())
        .unwrap();
    let mut c = FaultCaches::new();
    let mut tlb = Tlb::default();
    m.page_fault(&mut c, &Host(Level::L1), gpa(5), true, &mut tlb)
        .unwrap();
    let mode = LogMode {
        initially_set: true,
        granularity: Level::L1,
    };
    m.enable_dirty_log(SlotId(0), mode, &mut tlb).unwrap();
    m.clear_dirty_log(SlotId(0), 0, &[u64::MAX], &mut tlb)
        .unwrap();
    assert_eq!(
        (m.stats().eager_splits, m.stats().eager_split_failures),
        (0, 0)
    );

    // Eight 2 MiB leaves, a page limit that lets three of them split.
    let mut f = fx();
    let m = mmu(&mut f, eager());
    m.add_slot(
        SlotId(0),
        Gfn::new(0).unwrap(),
        16 * 512,
        SlotFlags::empty(),
    )
    .unwrap();
    let mut c = FaultCaches::new();
    for k in 0..8 {
        m.page_fault(&mut c, &Host(Level::L2), gpa(k * 512), true, &mut tlb)
            .unwrap();
    }
    let used = m.pages_used();
    m.set_page_limit(used + MIN_FREE_PAGES + 3, &mut tlb)
        .unwrap();
    let before = m.stats();
    m.enable_dirty_log(SlotId(0), LogMode::PAGES, &mut tlb)
        .unwrap();
    let after = m.stats();
    m.check().unwrap();
    assert_eq!(after.eager_split_failures - before.eager_split_failures, 1);
    assert_eq!(after.eager_splits - before.eager_splits, 3);
    assert_eq!(after.pages_created - before.pages_created, 3);
}

/// The splitter fills a fresh child's heads without reading them only while it knows they
/// are empty: a new slot, or one whose leaves were all zapped. It must not after a partial
/// zap (heads elsewhere may hold entries), and a slot made again under the same id and
/// bounds is a different slot (`epoch`), whatever its generations say. Every split below
/// leaves the rmaps exact (`check`), with the same translations.
#[test]
fn heads_are_filled_unread_only_while_known_empty() {
    let mut f = fx();
    let m = mmu(&mut f, MmuConfig::default());
    populated(&m);
    let known = |m: &Mmu<'_, Ept>, level| m.state.read().slots[0].rmaps.known_empty(level);
    // Populated with huge leaves only: nothing ever lent out a 4 KiB head.
    assert!(known(&m, Level::L1));
    assert!(!known(&m, Level::L2) && !known(&m, Level::L3));
    let before = sample(&m);
    let mut caches = SplitCaches::new();
    let split = |m: &Mmu<'_, Ept>, caches: &mut SplitCaches| {
        let s = m
            .eager_split(caches, SlotId(0), None, Level::L1, &mut Tlb::default())
            .unwrap();
        assert_eq!(s.split, 1 + 512 + 8);
        let counts = m.check().unwrap();
        assert_eq!(counts.leaves, (1 << 18) + 8 * 512);
        assert_eq!(m.stats().inconsistencies, 0);
    };
    split(&m, &mut caches);
    assert_eq!(sample(&m), before);
    assert!(!known(&m, Level::L1));
    // A zap of part of the slot: not known empty (it is not: the rest is mapped).
    m.zap_gfn_range(
        Gfn::new(0).unwrap(),
        Gfn::new(512).unwrap(),
        &mut Tlb::default(),
    );
    assert!(!known(&m, Level::L1));
    // A zap of all of it: every level known empty again, and the next split is exact.
    m.zap_gfn_range(
        Gfn::new(0).unwrap(),
        Gfn::new(1 << 19).unwrap(),
        &mut Tlb::default(),
    );
    for level in [Level::L1, Level::L2, Level::L3] {
        assert!(known(&m, level), "{level:?}");
    }
    m.delete_slot(SlotId(0), &mut Tlb::default()).unwrap();
    let epoch = |m: &Mmu<'_, Ept>| m.state.read().slots[0].epoch;
    populated(&m);
    let first = epoch(&m);
    split(&m, &mut caches);
    assert_eq!(sample(&m), before);
    // The same id and bounds again: a new epoch, so a pass that began on the old slot and
    // retook the lock after this could not take its knowledge for this slot's.
    m.delete_slot(SlotId(0), &mut Tlb::default()).unwrap();
    populated(&m);
    assert_ne!(epoch(&m), first);
    split(&m, &mut caches);
    assert_eq!(sample(&m), before);
    caches.release(&m).unwrap();
}

/// What a split leaves behind, for comparing two ways of doing it: the counters, the
/// invariant check's counts, and every 97th page's translation in each address space.
type SplitOutcome = (
    SplitStats,
    crate::spt::mmu::MmuCounts,
    Vec<Vec<Option<(Hpa, bool)>>>,
);

/// `populated`, the same frames mapped read-only in address space 1 too when `spaces` is
/// 2, then one eager split to 4 KiB with a lock drop forced at every `drops`th check
/// (0: none).
fn split_with(stream_split_bytes: u64, spaces: u8, drops: u32) -> SplitOutcome {
    let mut f = fx();
    let config = MmuConfig {
        address_spaces: spaces,
        descriptors: 300_000,
        stream_split_bytes,
        ..MmuConfig::default()
    };
    let m = mmu(&mut f, config);
    populated(&m);
    if spaces == 2 {
        let mut c = FaultCaches::new();
        let mut tlb = Tlb::default();
        m.page_fault_in(1, &mut c, &Host(Level::L3), gpa(9), false, &mut tlb)
            .unwrap();
        for k in 0..8 {
            let g = gpa((1 << 18) + k * 512);
            m.page_fault_in(1, &mut c, &Host(Level::L2), g, false, &mut tlb)
                .unwrap();
        }
        c.release(&m).unwrap();
    }
    let mut caches = SplitCaches::new();
    caches.force_lock_drops(drops);
    let s = m
        .eager_split(&mut caches, SlotId(0), None, Level::L1, &mut Tlb::default())
        .unwrap();
    caches.release(&m).unwrap();
    let counts = m.check().unwrap();
    let seen = (0..spaces)
        .map(|a| {
            (0..1u64 << 19)
                .step_by(97)
                .map(|g| m.translate_in(a, gpa(g)).map(|t| (t.hpa, t.writable)))
                .collect()
        })
        .collect();
    (s, counts, seen)
}

/// A split that streams its writes (`MmuConfig::stream_split_bytes`: non-temporal stores
/// for the fresh tables and their heads, fences deferred to the end of each pass and to
/// every lock drop) leaves exactly what the cached one leaves: the same counters, exact
/// rmaps (`check`), the same translations. With a second address space the second alias
/// of every huge frame reads the heads the first one streamed (the fence before that
/// read); with forced lock drops every drop publishes streamed heads to whoever takes the
/// lock next.
#[test]
fn a_streamed_split_leaves_what_a_cached_one_does() {
    for spaces in [1, 2] {
        for drops in [0, 1, 3] {
            let streamed = split_with(0, spaces, drops);
            let cached = split_with(u64::MAX, spaces, drops);
            assert_eq!(streamed, cached, "spaces {spaces}, drops every {drops}");
            assert_eq!(streamed.0.split, u64::from(spaces) * (1 + 512 + 8));
            assert_eq!(streamed.1.leaves, u64::from(spaces) * (512 * 512 + 8 * 512));
        }
    }
}

/// The threshold counts the request's writes, 16 bytes per 4 KiB page, and streams from
/// exactly the threshold up.
#[test]
fn the_split_streams_from_its_threshold_up() {
    let mut f = fx();
    let config = MmuConfig {
        stream_split_bytes: 16 << 10,
        ..MmuConfig::default()
    };
    let m = mmu(&mut f, config);
    assert!(!m.streams_split(1023));
    assert!(m.streams_split(1024));
    assert!(m.streams_split(u64::MAX), "no overflow");
    assert!(!mmu(&mut fx(), MmuConfig::default()).streams_split(1 << 20));
    assert!(mmu(&mut fx(), MmuConfig::default()).streams_split(2 << 20));
}
