//! The eager splitter against a writing vCPU with real threads (issue 9, item 3; the loom
//! models in `tests/loom_split.rs` explore one huge page exhaustively, this one the lock
//! drops a long split makes for a waiting vCPU, `is_contended`).
//!
//! Each round: a slot of 64 huge pages (2 MiB) mapped writable, dirty logging on with eager
//! splitting off (every huge leaf write-protected); one thread runs `eager_split` over the
//! slot while another writes one page of every huge page through `page_fault`. After both
//! are done: the MMU's invariants hold (`check()`), every write is in the dirty log and
//! nothing else is, every mapped page still maps its own host frame, and only huge pages
//! the lazy path dropped lost pages. Over all rounds the splitter must have dropped the
//! lock at least once. Twice: with the default configuration and with every split streamed.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hvmem::rmap::SplitCaches;
use hvmem::spt::mmu::{FaultCaches, LogMode, Mmu, MmuConfig, SlotFlags, SlotId};
use hvmem::spt::{Ept, TableArena, TableFrame, TableSlot};
use hvmem::testing::mmu::{LINEAR_HOST_PFN as HOST_PFN, LinearHost};
use hvmem::testing::spt::CountingFlush;
use hvmem::{Gfn, Gpa, Hpa, Level};

/// Guest frame n is host frame `HOST_PFN + n`, mapped with 2 MiB pages.
const HOST: LinearHost = LinearHost(Level::L2);

const HUGE: u64 = 64;
const PAGES: u64 = HUGE * 512;
const ROUNDS: usize = 60;

fn gpa(g: u64) -> Gpa {
    Gpa::new(g << 12).unwrap()
}

/// The page the vCPU writes in huge page `h`.
fn target(h: u64) -> u64 {
    h * 512 + (h * 37 + 5) % 512
}

#[test]
fn eager_split_and_a_writing_vcpu_lose_nothing() {
    split_against_a_writer(MmuConfig::default());
}

/// The same with every split streamed (non-temporal stores, `stream_split_bytes: 0`): the
/// vCPU that takes the lock when the splitter drops it must see the tables and heads the
/// splitter streamed, which only the fences before each lock drop guarantee on x86_64.
#[test]
fn a_streamed_eager_split_and_a_writing_vcpu_lose_nothing() {
    split_against_a_writer(MmuConfig {
        stream_split_bytes: 0,
        ..MmuConfig::default()
    });
}

fn split_against_a_writer(config: MmuConfig) {
    let n = (HUGE + 3 + 4 + 40 + 64) as usize;
    let frames: Vec<TableFrame> = (0..n).map(|_| TableFrame::new()).collect();
    let mut slots: Vec<TableSlot> = (0..n).map(|_| TableSlot::default()).collect();
    let mut drops = 0;
    let mut raced = 0;
    for round in 0..ROUNDS {
        let arena =
            TableArena::new(&frames, &mut slots, Hpa::new(0x40_0000_0000).unwrap()).unwrap();
        let mmu = Mmu::<Ept>::new(arena, config).unwrap();
        mmu.add_slot(SlotId(0), Gfn::new(0).unwrap(), PAGES, SlotFlags::empty())
            .unwrap();
        let mut caches = FaultCaches::new();
        for h in 0..HUGE {
            mmu.page_fault(
                &mut caches,
                &HOST,
                gpa(h * 512),
                true,
                &mut CountingFlush::default(),
            )
            .unwrap();
        }
        mmu.enable_dirty_log(SlotId(0), LogMode::PAGES, &mut CountingFlush::default())
            .unwrap();
        let (stats, lazy) = std::thread::scope(|s| {
            let vcpu = s.spawn(|| {
                let mut lazy = 0u64;
                for i in 0..HUGE {
                    // Alternate directions so the vCPU meets the splitter mid-slot.
                    let h = if round % 2 == 0 { i } else { HUGE - 1 - i };
                    let f = mmu
                        .page_fault(
                            &mut caches,
                            &HOST,
                            gpa(target(h)),
                            true,
                            &mut CountingFlush::default(),
                        )
                        .unwrap();
                    lazy += u64::from(matches!(f, hvmem::spt::mmu::Fault::Mapped { .. }));
                }
                lazy
            });
            let mut split = SplitCaches::new();
            let stats = mmu
                .eager_split(
                    &mut split,
                    SlotId(0),
                    None,
                    Level::L1,
                    &mut CountingFlush::default(),
                )
                .unwrap();
            split.release(&mmu).unwrap();
            (stats, vcpu.join().unwrap())
        });
        caches.release(&mmu).unwrap();
        drops += stats.lock_drops;
        let dropped = mmu.stats().huge_dropped;
        assert_eq!(
            stats.split + dropped,
            HUGE,
            "every huge page split or dropped once"
        );
        raced += u64::from(dropped > 0 && stats.split > 0);
        assert!(
            lazy >= dropped,
            "only the vCPU's slow path drops huge pages"
        );
        mmu.check().unwrap();
        let mut log = vec![0u64; mmu.dirty_log_words(SlotId(0)).unwrap()];
        mmu.get_dirty_log(SlotId(0), &mut log).unwrap();
        let mut expect = vec![0u64; log.len()];
        for h in 0..HUGE {
            let g = target(h);
            expect[(g / 64) as usize] |= 1 << (g % 64);
        }
        assert_eq!(
            log, expect,
            "round {round}: the log is not exactly the writes"
        );
        let mut lost_huge = 0;
        for h in 0..HUGE {
            let mut lost = false;
            for g in [h * 512, h * 512 + 200, h * 512 + 511, target(h)] {
                match mmu.translate(gpa(g)) {
                    Some(m) => assert_eq!(m.hpa.get(), (HOST_PFN + g) << 12),
                    None => lost = true,
                }
            }
            assert!(mmu.translate(gpa(target(h))).unwrap().writable);
            lost_huge += u64::from(lost);
        }
        assert!(
            lost_huge <= mmu.stats().huge_dropped,
            "a split lost a mapping"
        );
    }
    eprintln!("{drops} lock drops, {raced} of {ROUNDS} rounds with both paths taken");
    assert!(drops > 0, "the splitter never dropped the lock");
}
