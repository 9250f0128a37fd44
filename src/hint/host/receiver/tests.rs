use std::vec;
use std::vec::Vec;

use super::*;
use crate::addr::PageOrder;
use crate::hint::host::{LayoutError, RamLayout, RegionError};
use crate::hint::wire::{Direction, PaOrderHint, ScatterEntry, encode_chain, walk_chain};

const MIB: u64 = 1 << 20;

/// Records every discard; fails the calls whose start is in `fail_at`.
#[derive(Default)]
struct Recorder {
    calls: Vec<(u64, u64)>,
    fail_at: Vec<u64>,
}

impl Discard for Recorder {
    type Error = u64;

    fn discard(&mut self, region: &RamRegion, start: Gpa, len: u64) -> Result<(), u64> {
        let (s, e) = (start.get(), start.get() + len);
        assert!(
            s >= region.start().get() && e <= region.end(),
            "outside its region"
        );
        let page = region.backing().bytes();
        assert_eq!((s - region.start().get()) % page, 0, "unaligned start");
        assert_eq!(len % page, 0, "partial backing page");
        if self.fail_at.contains(&s) {
            return Err(s);
        }
        self.calls.push((s, len));
        Ok(())
    }
}

fn region(start: u64, size: u64, backing: u8) -> RamRegion {
    RamRegion::new(
        Gpa::new(start).unwrap(),
        size,
        PageOrder::new(backing).unwrap(),
    )
    .unwrap()
}

/// RAM: [0, 640 KiB) 4K-backed, [2 MiB, 1 GiB) and [4 GiB, 4 GiB + 64 MiB) in 2 MiB pages.
fn pc_layout() -> RamLayout<4> {
    let mut l = RamLayout::new();
    l.push(region(0, 640 << 10, 0)).unwrap();
    l.push(region(2 * MIB, 1022 * MIB, 9)).unwrap();
    l.push(region(4 << 30, 64 * MIB, 9)).unwrap();
    l
}

fn receiver() -> ReportReceiver<RamLayout<4>, Recorder> {
    ReportReceiver::new(pc_layout(), Recorder::default())
}

#[test]
fn regions_and_layouts_validate() {
    let g = |a| Gpa::new(a).unwrap();
    assert_eq!(
        RamRegion::new(g(0), 0, PageOrder::BASE),
        Err(RegionError::Empty)
    );
    assert_eq!(
        RamRegion::new(g(1), 4096, PageOrder::BASE),
        Err(RegionError::Unaligned)
    );
    assert_eq!(
        RamRegion::new(g(0), 4097, PageOrder::BASE),
        Err(RegionError::Unaligned)
    );
    assert_eq!(
        RamRegion::new(g((1 << 52) - 4096), 8192, PageOrder::BASE),
        Err(RegionError::OutOfRange)
    );
    let top = RamRegion::new(g((1 << 52) - 4096), 4096, PageOrder::BASE).unwrap();
    assert_eq!(top.end(), 1 << 52);
    let mut l = RamLayout::<2>::new();
    l.push(region(MIB, MIB, 0)).unwrap();
    assert_eq!(l.push(region(MIB, MIB, 0)), Err(LayoutError::NotAscending));
    assert_eq!(l.push(region(0, 4096, 0)), Err(LayoutError::NotAscending));
    l.push(region(2 * MIB, MIB, 0)).unwrap(); // touching is fine
    assert_eq!(l.push(region(8 * MIB, MIB, 0)), Err(LayoutError::Full));
    assert_eq!(l.region_from(g(0)), Some(region(MIB, MIB, 0)));
    assert_eq!(l.region_from(g(2 * MIB)), Some(region(2 * MIB, MIB, 0)));
    assert_eq!(l.region_from(g(3 * MIB)), None);
}

#[test]
fn whole_backing_pages_are_discarded_and_edges_clamped() {
    let mut r = receiver();
    // 2 MiB-aligned 4 MiB inside the THP region: one discard.
    let o = r.receive_range(4 * MIB, 4 * MIB).unwrap();
    assert_eq!(
        (o.accepted, o.discarded, o.clamped()),
        (4 * MIB, 4 * MIB, 0)
    );
    // [2 MiB + 4 KiB, 6 MiB + 4 KiB): [4 MiB, 6 MiB) is the only whole 2 MiB page.
    let o = r.receive_range(2 * MIB + 4096, 4 * MIB).unwrap();
    assert_eq!(o.accepted, 2 * MIB);
    assert_eq!(o.clamped_partial, 2 * MIB);
    assert_eq!(r.discarder().calls.last(), Some(&(4 * MIB, 2 * MIB)));
    // Less than a backing page: nothing.
    let o = r.receive_range(3 * MIB, 4096).unwrap();
    assert_eq!((o.accepted, o.clamped_partial), (0, 4096));
    // The 4K-backed low region discards single pages.
    let o = r.receive_range(8192, 4096).unwrap();
    assert_eq!(o.discarded, 4096);
    assert_eq!(r.stats().discard_calls, 3);
    assert!(r.stats().bytes.balanced());
}

#[test]
fn ranges_are_clamped_to_ram_across_holes() {
    let mut r = receiver();
    // From 512 KiB across the hole into the 2 MiB region, up to 4 MiB.
    let o = r.receive_range(512 << 10, 4 * MIB - (512 << 10)).unwrap();
    assert_eq!(
        o.clamped_outside,
        2 * MIB - (640 << 10),
        "the hole [640 KiB, 2 MiB)"
    );
    assert_eq!(o.accepted, (128 << 10) + 2 * MIB);
    assert_eq!(
        r.discarder().calls,
        vec![(512 << 10, 128 << 10), (2 * MIB, 2 * MIB)]
    );
    // Entirely outside RAM.
    let o = r.receive_range(2 << 30, 4096).unwrap();
    assert_eq!((o.clamped_outside, o.accepted), (4096, 0));
    // Running off the top of the last region.
    let o = r.receive_range((4 << 30) + 62 * MIB, 4 * MIB).unwrap();
    assert_eq!((o.accepted, o.clamped_outside), (2 * MIB, 2 * MIB));
}

#[test]
fn malformed_ranges_are_rejected_whole() {
    let mut r = receiver();
    let cases = [
        (MIB, 0, RangeError::Empty),
        (MIB + 1, 4096, RangeError::Unaligned),
        (MIB, 4095, RangeError::Unaligned),
        (!4095, 8192, RangeError::Overflow),
        ((1 << 52) - 4096, 8192, RangeError::BeyondPhysical),
        (1 << 60, 4096, RangeError::BeyondPhysical),
    ];
    let mut claimed = 0u128;
    for (a, n, e) in cases {
        assert_eq!(r.receive_range(a, n), Err(e));
        claimed += u128::from(n);
    }
    let s = *r.stats();
    assert!(r.discarder().calls.is_empty());
    assert_eq!((s.ranges, s.rejected_ranges), (6, 6));
    assert_eq!((s.bytes.claimed, s.bytes.rejected), (claimed, claimed));
    assert!(s.bytes.balanced());
}

#[test]
fn skip_mode_counts_but_discards_nothing() {
    let mut r = receiver();
    r.set_mode(DiscardMode::Skip(SkipReason::Postcopy));
    let o = r.receive_range(2 * MIB, 8 * MIB).unwrap();
    assert_eq!((o.accepted, o.skipped, o.discarded), (8 * MIB, 8 * MIB, 0));
    assert!(r.discarder().calls.is_empty());
    assert_eq!(r.stats().discard_calls, 0);
    r.set_mode(DiscardMode::Discard);
    assert_eq!(
        r.receive_range(2 * MIB, 2 * MIB).unwrap().discarded,
        2 * MIB
    );
}

#[test]
fn failed_discards_are_counted() {
    let mut r = receiver();
    r.discarder().fail_at.push(2 * MIB);
    let o = r.receive_range(512 << 10, 4 * MIB - (512 << 10)).unwrap();
    assert_eq!((o.failed, o.discarded), (2 * MIB, 128 << 10));
    assert_eq!(r.last_error(), Some(2 * MIB));
    assert_eq!(r.stats().discard_failures, 1);
    assert!(r.stats().bytes.balanced());
}

#[test]
fn report_chains_hints_and_pfn_arrays() {
    let mut r = receiver();
    // A reported batch of three 2 MiB blocks, one of them outside RAM.
    let entries = [
        ScatterEntry {
            addr: 4 * MIB,
            len: 2 << 20,
        },
        ScatterEntry {
            addr: 2 << 30,
            len: 2 << 20,
        },
        ScatterEntry {
            addr: 8 * MIB,
            len: 2 << 20,
        },
    ];
    let mut table = vec![0u8; 16 * 16];
    let head = encode_chain(&entries, Direction::DeviceWrites, &mut table, 3).unwrap();
    let b = r.receive_report(walk_chain(&table, head, Direction::DeviceWrites).unwrap());
    assert_eq!((b.ranges, b.malformed), (3, 0));
    assert_eq!(
        (b.bytes.discarded, b.bytes.clamped_outside),
        (4 * MIB as u128, 2 * MIB as u128)
    );
    // A chain that loops after one good entry: the entry counts, the loop is malformed.
    let mut t = vec![0u8; 16];
    t.copy_from_slice(
        &crate::hint::wire::VirtqDesc {
            entry: ScatterEntry {
                addr: 10 * MIB,
                len: 2 << 20,
            },
            flags: crate::hint::wire::VIRTQ_DESC_F_WRITE | crate::hint::wire::VIRTQ_DESC_F_NEXT,
            next: 0,
        }
        .to_bytes(),
    );
    let b = r.receive_report(walk_chain(&t, 0, Direction::DeviceWrites).unwrap());
    assert_eq!(
        (b.ranges, b.malformed, b.bytes.discarded),
        (1, 1, 2 * MIB as u128)
    );

    // pa | order hints: a 2 MiB block, a misaligned one, a 4 KiB page in a 2 MiB region.
    let mut buf = Vec::new();
    buf.extend_from_slice(&PaOrderHint::new(12 * MIB, 9).unwrap().to_bytes());
    buf.extend_from_slice(&((13 * MIB) | 9).to_le_bytes());
    buf.extend_from_slice(&PaOrderHint::new(14 * MIB, 0).unwrap().to_bytes());
    let b = r.receive_hints(&buf);
    assert_eq!((b.ranges, b.malformed), (2, 1));
    assert_eq!(
        (b.bytes.discarded, b.bytes.clamped_partial),
        (2 * MIB as u128, 4096)
    );

    // A balloon PFN array: one 2 MiB block as 512 frames, then two single frames.
    let mut buf = Vec::new();
    for f in (16 * MIB / 4096)..(18 * MIB / 4096) {
        buf.extend_from_slice(&(f as u32).to_le_bytes());
    }
    buf.extend_from_slice(&2u32.to_le_bytes()); // low RAM, 4K-backed
    buf.extend_from_slice(&(20 * MIB as u32 / 4096).to_le_bytes());
    buf.push(0);
    let b = r.receive_pfns(&buf);
    assert_eq!((b.ranges, b.malformed), (3, 1));
    assert_eq!(b.bytes.discarded, 2 * MIB as u128 + 4096);
    assert!(r.stats().bytes.balanced());
    assert_eq!(r.stats().malformed, 3);
}

/// A layout that breaks its contract: it answers every lookup with a region below the
/// address asked about. The receiver must neither loop nor discard there.
struct LyingLayout;

impl GuestRamLayout for LyingLayout {
    fn region_from(&mut self, _gpa: Gpa) -> Option<RamRegion> {
        Some(region(0, 4096, 0))
    }
}

#[test]
fn a_lying_layout_cannot_make_it_discard_elsewhere() {
    let mut r = ReportReceiver::new(LyingLayout, Recorder::default());
    let o = r.receive_range(MIB, MIB).unwrap();
    assert_eq!((o.accepted, o.clamped_outside), (0, MIB));
    let o = r.receive_range(0, 8192).unwrap();
    assert_eq!((o.accepted, o.clamped_outside), (4096, 4096));
    assert_eq!(r.discarder().calls, vec![(0, 4096)]);
}

#[test]
fn randomized_ranges_match_the_model() {
    let mut rng = crate::testing::Rng::new(5);
    let mut seen = [0u64; 4];
    for _ in 0..20 {
        let mut h = crate::testing::receiver::ReceiverHarness::random(&mut rng);
        for _ in 0..300 {
            let op = crate::testing::receiver::random_op(&mut rng);
            h.apply(&op).unwrap_or_else(|e| panic!("{op:?}: {e}"));
        }
        for (s, c) in seen.iter_mut().zip(h.coverage()) {
            *s += c;
        }
    }
    // Discards, rejections, applied hints and stale hints all happened.
    assert!(seen.iter().all(|&c| c > 20), "{seen:?}");
}
