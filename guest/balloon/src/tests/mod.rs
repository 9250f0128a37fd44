//! Host-side tests against a fake device ([`fake`]) that reads the rings the driver writes.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod fake;

use std::vec;
use std::vec::Vec;

use hvmem::addr::{PageOrder, Pfn};
use hvmem::buddy::Block;
use hvmem::hint::guest::{BatchId, PipelinedTransport, ReportTransport};
use hvmem::hint::wire::CmdId;
use virtio_drivers::transport::{DeviceStatus, DeviceType};

use self::fake::{Arena, Chain, FakeHal, FakeTransport, Mode, QEMU_OFFER, Shared};
use crate::*;

type Balloon = VirtIOBalloon<FakeHal, FakeTransport>;

const MTH: u64 = 1 << 0;
const STATS: u64 = 1 << 1;
const FPH: u64 = 1 << 3;
const REPORTING: u64 = 1 << 5;
const INDIRECT: u64 = 1 << 28;
const V1: u64 = 1 << 32;

fn mem() -> RamMapping {
    // SAFETY: the tests hand the driver only blocks of an `Arena` they keep alive and don't
    // touch while the blocks are in flight; `FakeHal::share` is the identity.
    #[allow(unsafe_code)]
    unsafe {
        RamMapping::identity()
    }
}

fn qemu(offered: u64, wanted: Features) -> (Balloon, Shared) {
    let (t, s) = FakeTransport::qemu(offered);
    (Balloon::new(t, mem(), wanted).unwrap(), s)
}

fn block(arena: &Arena, offset: usize, order: u8) -> Block {
    Block {
        reported: false,
        order: PageOrder::new(order).unwrap(),
        pfn: Pfn::new(arena.addr(offset) >> 12).unwrap(),
    }
}

fn le32s(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// The queues the driver set up: (index, size).
fn set_up(s: &Shared) -> Vec<(usize, u32)> {
    s.borrow()
        .queues
        .iter()
        .enumerate()
        .filter(|(_, q)| q.desc != 0)
        .map(|(i, q)| (i, q.size))
        .collect()
}

// ---- negotiation ----

#[test]
fn negotiation_takes_what_it_wants_and_refuses_poison_event_idx_and_oom() {
    let (b, s) = qemu(QEMU_OFFER, Features::SUPPORTED);
    let want = MTH | STATS | FPH | REPORTING | INDIRECT | V1;
    assert_eq!(s.borrow().driver_features, Some(want));
    assert_eq!(b.features().bits(), want);
    assert_eq!(b.offered().bits(), QEMU_OFFER);
    assert!(b.must_tell_host());
    let st = s.borrow().status;
    assert_eq!(
        st,
        DeviceStatus::ACKNOWLEDGE
            | DeviceStatus::DRIVER
            | DeviceStatus::FEATURES_OK
            | DeviceStatus::DRIVER_OK
    );
    // Reset first, FEATURES_OK before DRIVER_OK.
    assert_eq!(s.borrow().status_log, vec![0, 0b11, 0b1011, 0b1111]);
}

#[test]
fn negotiation_always_keeps_must_tell_host_version_1_and_stats() {
    assert_eq!(
        negotiate(Features::from_bits(QEMU_OFFER), Features::EMPTY).bits(),
        MTH | STATS | V1
    );
    // Never more than offered.
    assert_eq!(
        negotiate(Features::from_bits(REPORTING), Features::SUPPORTED).bits(),
        REPORTING
    );
    assert_eq!(
        negotiate(
            Features::from_bits(QEMU_OFFER),
            Features::REPORTING.union(Features::PAGE_POISON)
        )
        .bits(),
        MTH | STATS | V1 | REPORTING
    );
}

#[test]
fn device_id_5_is_accepted_under_both_of_virtio_drivers_names() {
    // virtio-drivers 0.13 turns id 5 into `MemoryBalloon` (its name for id 13 too), while
    // `MemoryBallooning` has the value 5.
    assert_eq!(
        DeviceType::try_from(5u32).unwrap(),
        DeviceType::MemoryBalloon
    );
    for kind in [DeviceType::MemoryBalloon, DeviceType::MemoryBallooning] {
        let (t, s) = FakeTransport::qemu(QEMU_OFFER);
        s.borrow_mut().device_type = kind;
        assert!(
            Balloon::new(t, mem(), Features::SUPPORTED).is_ok(),
            "{kind:?}"
        );
    }
    let (t, s) = FakeTransport::qemu(QEMU_OFFER);
    s.borrow_mut().device_type = DeviceType::Block;
    assert_eq!(
        Balloon::new(t, mem(), Features::SUPPORTED).unwrap_err(),
        InitError::WrongDevice(DeviceType::Block)
    );
    assert!(
        s.borrow().status_log.is_empty(),
        "a wrong device is not touched"
    );
}

#[test]
fn features_refused_by_the_device_fail_and_reset() {
    let (t, s) = FakeTransport::qemu(QEMU_OFFER);
    s.borrow_mut().refuse_features = true;
    let e = Balloon::new(t, mem(), Features::SUPPORTED).unwrap_err();
    assert!(matches!(e, InitError::FeaturesRefused { .. }), "{e:?}");
    let log = s.borrow().status_log.clone();
    assert_eq!(
        log.last(),
        Some(&0),
        "device reset after the failure: {log:?}"
    );
    assert!(log.iter().any(|v| v & DeviceStatus::FAILED.bits() != 0));
    assert!(set_up(&s).is_empty());
}

#[test]
fn a_reporting_queue_smaller_than_32_is_refused() {
    let offered = V1 | STATS | REPORTING;
    let (t, s) = FakeTransport::new(offered, &[128, 128, 128, 16], 8);
    let e = Balloon::new(t, mem(), Features::SUPPORTED).unwrap_err();
    assert_eq!(
        e,
        InitError::Queue {
            index: 3,
            error: virtio_drivers::Error::InvalidParam
        }
    );
    assert!(set_up(&s).is_empty(), "reset forgets the queues set up");
}

// ---- queue layout ----

#[test]
fn layout_follows_qemus_offered_features() {
    let l = QueueLayout::for_offered(Features::from_bits(QEMU_OFFER));
    assert_eq!(
        (l.inflate, l.deflate, l.stats, l.hint, l.reporting),
        (0, 1, Some(2), Some(3), Some(4))
    );
    let l = QueueLayout::for_offered(Features::from_bits(V1 | STATS | REPORTING));
    assert_eq!((l.stats, l.hint, l.reporting), (Some(2), None, Some(3)));
    let l = QueueLayout::for_offered(Features::from_bits(V1 | STATS));
    assert_eq!((l.hint, l.reporting), (None, None));
}

#[test]
fn queues_are_set_up_at_qemus_indices_with_hinting() {
    let (_b, s) = qemu(QEMU_OFFER, Features::SUPPORTED);
    // Statistics queue 2 exists but is not set up.
    assert_eq!(set_up(&s), vec![(0, 128), (1, 128), (3, 256), (4, 32)]);
}

#[test]
fn queues_are_set_up_at_qemus_indices_without_hinting() {
    let (b, s) = qemu(V1 | MTH | STATS | REPORTING | INDIRECT, Features::SUPPORTED);
    assert_eq!(set_up(&s), vec![(0, 128), (1, 128), (3, 32)]);
    assert_eq!(b.layout().reporting, Some(3));
}

#[test]
fn reporting_stays_at_4_when_hinting_is_offered_but_not_wanted() {
    let (b, s) = qemu(
        QEMU_OFFER,
        Features::REPORTING.union(Features::RING_INDIRECT_DESC),
    );
    assert!(!b.features().contains(Features::FREE_PAGE_HINT));
    assert_eq!(set_up(&s), vec![(0, 128), (1, 128), (4, 32)]);
    assert_eq!(b.hint_cmd_id(), Err(ConfigError::NotNegotiated));
    assert_eq!(b.hint_in_flight(), 0);
}

#[test]
fn drop_resets_the_device() {
    let (b, s) = qemu(QEMU_OFFER, Features::SUPPORTED);
    drop(b);
    assert_eq!(s.borrow().status, DeviceStatus::empty());
    assert!(set_up(&s).is_empty());
}

// ---- config space ----

#[test]
fn config_space_target_actual_and_cmd_id_are_little_endian() {
    let (mut b, s) = qemu(QEMU_OFFER, Features::SUPPORTED);
    s.borrow_mut().set_config_u32(0, 0x0001_2345);
    s.borrow_mut().set_config_u32(8, 7);
    assert_eq!(b.target_pages(), Ok(0x0001_2345));
    assert_eq!(b.hint_cmd_id(), Ok(CmdId::new(7)));
    b.set_actual(0x0102_0304).unwrap();
    assert_eq!(&s.borrow().config[4..8], &[4, 3, 2, 1]);
    assert_eq!(s.borrow().config_u32(4), 0x0102_0304);
    assert_eq!(b.actual_pages(), Ok(0x0102_0304));
}

#[test]
fn a_config_space_too_small_is_an_error() {
    let (t, _s) = FakeTransport::new(V1 | STATS | FPH, &[128, 128, 128, 1024], 8);
    let b = Balloon::new(t, mem(), Features::SUPPORTED).unwrap();
    assert_eq!(
        b.hint_cmd_id(),
        Err(ConfigError::Transport(
            virtio_drivers::Error::ConfigSpaceTooSmall
        ))
    );
}

// ---- inflate / deflate ----

fn messages(s: &Shared, queue: u16) -> Vec<Vec<u32>> {
    s.borrow()
        .seen
        .iter()
        .filter(|c| c.queue == queue)
        .map(|c| {
            assert_eq!(c.bufs.len(), 1, "one buffer per message");
            assert!(!c.bufs[0].writable, "PFN arrays are device-readable");
            le32s(&c.bufs[0].bytes)
        })
        .collect()
}

#[test]
fn inflate_sends_le32_pfns_256_per_message() {
    let (mut b, s) = qemu(QEMU_OFFER, Features::SUPPORTED);
    let blocks = [
        Block {
            reported: false,
            order: PageOrder::new(9).unwrap(),
            pfn: Pfn::new(0x4_0000).unwrap(),
        },
        Block {
            reported: false,
            order: PageOrder::new(3).unwrap(),
            pfn: Pfn::new(0x8_0008).unwrap(),
        },
    ];
    assert_eq!(b.inflate_blocks(&blocks), Ok(520));
    let m = messages(&s, 0);
    assert_eq!(
        m.iter().map(Vec::len).collect::<Vec<_>>(),
        vec![256, 256, 8]
    );
    let all: Vec<u32> = m.concat();
    let want: Vec<u32> = (0x4_0000..0x4_0200).chain(0x8_0008..0x8_0010).collect();
    assert_eq!(all, want);
    assert!(messages(&s, 1).is_empty());
    assert_eq!(b.stats().inflated_frames, 520);
    assert_eq!(b.stats().messages, 3);
}

#[test]
fn deflate_goes_to_the_deflate_queue_and_exactly_256_is_one_message() {
    let (mut b, s) = qemu(QEMU_OFFER, Features::SUPPORTED);
    let pfns = (100..356).map(|p| Pfn::new(p).unwrap());
    assert_eq!(b.deflate(pfns), Ok(256));
    assert_eq!(messages(&s, 1), vec![(100..356).collect::<Vec<u32>>()]);
    assert!(messages(&s, 0).is_empty());
    assert_eq!(b.deflate(core::iter::empty()), Ok(0), "nothing to tell");
    assert_eq!(messages(&s, 1).len(), 1);
}

#[test]
fn a_pfn_above_32_bits_stops_after_the_frames_before_it() {
    let (mut b, s) = qemu(QEMU_OFFER, Features::SUPPORTED);
    let big = 1u64 << 33;
    let pfns = (0..300)
        .map(|p| Pfn::new(p).unwrap())
        .chain([Pfn::new(big).unwrap(), Pfn::new(5).unwrap()]);
    assert_eq!(
        b.inflate(pfns),
        Err(TellFailed {
            frames_told: 300,
            error: TellError::PfnTooLarge { pfn: big }
        })
    );
    assert_eq!(
        messages(&s, 0).iter().map(Vec::len).collect::<Vec<_>>(),
        vec![256, 44]
    );
}

#[test]
fn a_used_length_on_a_pfn_message_is_an_error() {
    let (mut b, s) = qemu(QEMU_OFFER, Features::SUPPORTED);
    s.borrow_mut().modes[0] = Mode::Auto { len: 4 };
    assert_eq!(
        b.inflate([Pfn::new(1).unwrap()]),
        Err(TellFailed {
            frames_told: 0,
            error: TellError::BadUsedLength { len: 4 }
        })
    );
    s.borrow_mut().modes[0] = Mode::Auto { len: 0 };
    assert_eq!(
        b.inflate([Pfn::new(2).unwrap()]),
        Ok(1),
        "the queue still works"
    );
}

#[test]
fn a_silent_device_times_out_and_its_late_answer_is_dropped() {
    let (mut b, s) = qemu(QEMU_OFFER, Features::SUPPORTED);
    s.borrow_mut().modes[1] = Mode::Manual;
    b.set_spin_limit(1000);
    assert_eq!(
        b.deflate([Pfn::new(9).unwrap()]),
        Err(TellFailed {
            frames_told: 0,
            error: TellError::Timeout
        })
    );
    // The device answers the old message late, then works again.
    s.borrow_mut().use_all(1, 0);
    s.borrow_mut().modes[1] = Mode::Auto { len: 0 };
    assert_eq!(b.deflate([Pfn::new(10).unwrap()]), Ok(1));
    assert_eq!(messages(&s, 1), vec![vec![9], vec![10]]);
}

// ---- free page reporting ----

fn report_chains(s: &Shared) -> Vec<Chain> {
    s.borrow()
        .seen
        .iter()
        .filter(|c| c.queue == 4)
        .cloned()
        .collect()
}

#[test]
fn a_batch_is_one_indirect_chain_of_writable_blocks_and_its_id_comes_back() {
    let (mut b, s) = qemu(QEMU_OFFER, Features::SUPPORTED);
    s.borrow_mut().modes[4] = Mode::Manual;
    let arena = Arena::new(80 << 12);
    let batches = [
        (
            BatchId::from_raw(7),
            vec![block(&arena, 0, 4), block(&arena, 16 << 12, 2)],
        ),
        (BatchId::from_raw(8), vec![block(&arena, 32 << 12, 0)]),
        (
            BatchId::from_raw(9),
            (0..MAX_BATCH)
                .map(|i| block(&arena, (33 + i) << 12, 0))
                .collect(),
        ),
    ];
    for (id, blocks) in &batches {
        b.submit(*id, blocks).unwrap();
    }
    assert_eq!(b.reports_in_flight(), 3);
    let chains = s.borrow_mut().take(4);
    assert_eq!(chains.len(), 3);
    for (chain, (_, blocks)) in chains.iter().zip(&batches) {
        let seen: Vec<(u64, u32, bool)> = chain
            .bufs
            .iter()
            .map(|b| (b.addr, b.len, b.writable))
            .collect();
        let want: Vec<(u64, u32, bool)> = blocks
            .iter()
            .map(|b| (b.pfn.addr().get(), b.order.bytes() as u32, true))
            .collect();
        assert_eq!(seen, want);
        assert_eq!(chain.indirect, blocks.len() > 1);
    }
    // The device returns them out of order; each id comes back once.
    assert_eq!(b.poll_report(), Ok(None));
    for i in [2, 0, 1] {
        s.borrow_mut().push_used(4, u32::from(chains[i].head), 0);
    }
    let mut back = Vec::new();
    while let Some(id) = b.poll_report().unwrap() {
        back.push(id.get());
    }
    assert_eq!(back, vec![9, 7, 8]);
    assert_eq!(b.reports_in_flight(), 0);
    assert_eq!(b.stats().reports_completed, 3);
}

#[test]
fn an_unknown_token_is_refused_and_the_queue_stays_refused() {
    let (mut b, s) = qemu(QEMU_OFFER, Features::SUPPORTED);
    s.borrow_mut().modes[4] = Mode::Manual;
    let arena = Arena::new(4 << 12);
    b.submit(BatchId::from_raw(1), &[block(&arena, 0, 0)])
        .unwrap();
    let head = s.borrow_mut().take(4)[0].head;
    s.borrow_mut().push_used(4, u32::from(head) + 5, 0);
    assert_eq!(
        b.poll_report(),
        Err(ReportError::Ring(RingError::UnknownToken(head + 5)))
    );
    assert_eq!(b.poll_report(), Err(ReportError::Ring(RingError::Broken)));
    assert_eq!(
        b.submit(BatchId::from_raw(2), &[block(&arena, 4096, 0)]),
        Err(ReportError::Ring(RingError::Broken))
    );
    // A token beyond the queue size is refused the same way.
    let (mut b, s) = qemu(QEMU_OFFER, Features::SUPPORTED);
    s.borrow_mut().modes[4] = Mode::Manual;
    s.borrow_mut().push_used(4, 1000, 0);
    assert_eq!(
        b.poll_report(),
        Err(ReportError::Ring(RingError::UnknownToken(1000)))
    );
}

#[test]
fn a_used_length_longer_than_the_batch_is_an_error_naming_the_batch() {
    let (mut b, s) = qemu(QEMU_OFFER, Features::SUPPORTED);
    s.borrow_mut().modes[4] = Mode::Auto { len: 4097 };
    let arena = Arena::new(4 << 12);
    b.submit(BatchId::from_raw(3), &[block(&arena, 0, 0)])
        .unwrap();
    assert_eq!(
        b.poll_report(),
        Err(ReportError::BadUsedLength {
            id: BatchId::from_raw(3),
            len: 4097
        })
    );
    assert_eq!(b.reports_in_flight(), 0, "the batch is off the queue");
    s.borrow_mut().modes[4] = Mode::Auto { len: 4096 };
    b.submit(BatchId::from_raw(4), &[block(&arena, 0, 0)])
        .unwrap();
    assert_eq!(
        b.poll_report(),
        Ok(Some(BatchId::from_raw(4))),
        "len = batch is fine"
    );
}

#[test]
fn bad_batches_are_refused_before_the_queue() {
    let (mut b, s) = qemu(QEMU_OFFER, Features::SUPPORTED);
    let arena = Arena::new(64 << 12);
    let id = BatchId::from_raw(0);
    assert_eq!(b.submit(id, &[]), Err(ReportError::EmptyBatch));
    let long: Vec<Block> = (0..=MAX_BATCH).map(|i| block(&arena, i << 12, 0)).collect();
    assert_eq!(
        b.submit(id, &long),
        Err(ReportError::BatchTooLong { blocks: 33 })
    );
    let huge = Block {
        reported: false,
        order: PageOrder::new(20).unwrap(),
        pfn: Pfn::ZERO,
    };
    assert_eq!(b.submit(id, &[huge]), Err(ReportError::BlockTooLarge));
    assert!(report_chains(&s).is_empty());
    assert_eq!(b.reports_in_flight(), 0);

    let (mut b, _s) = qemu(QEMU_OFFER, Features::FREE_PAGE_HINT);
    assert_eq!(
        b.submit(id, &[block(&arena, 0, 0)]),
        Err(ReportError::NotNegotiated)
    );
    assert_eq!(b.poll_report(), Err(ReportError::NotNegotiated));
}

#[test]
fn without_indirect_descriptors_one_full_batch_fills_the_queue() {
    let (mut b, s) = qemu(QEMU_OFFER, Features::REPORTING);
    assert!(!b.features().contains(Features::RING_INDIRECT_DESC));
    s.borrow_mut().modes[4] = Mode::Manual;
    let arena = Arena::new(64 << 12);
    let full: Vec<Block> = (0..MAX_BATCH).map(|i| block(&arena, i << 12, 0)).collect();
    b.submit(BatchId::from_raw(0), &full).unwrap();
    assert_eq!(
        b.submit(BatchId::from_raw(1), &[block(&arena, 40 << 12, 0)]),
        Err(ReportError::Ring(RingError::Queue(
            virtio_drivers::Error::QueueFull
        )))
    );
    let chains = s.borrow_mut().use_all(4, 0);
    assert!(!chains[0].indirect);
    assert_eq!(chains[0].bufs.len(), MAX_BATCH);
    assert_eq!(b.poll_report(), Ok(Some(BatchId::from_raw(0))));
    b.submit(BatchId::from_raw(1), &[block(&arena, 40 << 12, 0)])
        .unwrap();
}

#[test]
fn indirect_descriptors_keep_32_full_batches_in_flight() {
    let (mut b, s) = qemu(QEMU_OFFER, Features::SUPPORTED);
    s.borrow_mut().modes[4] = Mode::Manual;
    let arena = Arena::new(64 << 12);
    let full: Vec<Block> = (0..MAX_BATCH).map(|i| block(&arena, i << 12, 0)).collect();
    // (The same blocks in every batch only to count queue entries; the device never
    // touches them.)
    for i in 0..32 {
        b.submit(BatchId::from_raw(i), &full).unwrap();
    }
    assert_eq!(
        b.submit(BatchId::from_raw(32), &full),
        Err(ReportError::Ring(RingError::Queue(
            virtio_drivers::Error::QueueFull
        )))
    );
    assert_eq!(s.borrow_mut().use_all(4, 0).len(), 32);
    let mut ids: Vec<u64> = core::iter::from_fn(|| b.poll_report().unwrap())
        .map(BatchId::get)
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, (0..32).collect::<Vec<_>>());
}

#[test]
fn report_waits_for_its_batch_and_refuses_beside_the_pipeline() {
    let (mut b, s) = qemu(QEMU_OFFER, Features::SUPPORTED);
    let arena = Arena::new(8 << 12);
    b.report(&[block(&arena, 0, 1), block(&arena, 2 << 12, 1)])
        .unwrap();
    assert_eq!(report_chains(&s).len(), 1);
    assert_eq!(b.reports_in_flight(), 0);
    s.borrow_mut().modes[4] = Mode::Manual;
    b.submit(BatchId::from_raw(0), &[block(&arena, 4 << 12, 0)])
        .unwrap();
    assert_eq!(b.report(&[block(&arena, 0, 0)]), Err(ReportError::Busy));
}

/// The driver under hvmem's own pipelined reporter: every isolated block reaches the device
/// once, and every batch comes back through `poll_report` into `Pipeline::complete`.
#[test]
fn hvmem_pipeline_reports_through_the_driver() {
    use hvmem::buddy::{Buddy, FrameMeta, LockedBuddy};
    use hvmem::hint::guest::{Pipeline, ReportPolicy, Reporter};

    const FRAMES: u64 = 1024;
    const BASE_PFN: u64 = 0x1_0000;
    let arena = Arena::new(FRAMES as usize * 4096);
    // Guest "physical" address BASE_PFN << 12 maps to the arena.
    let offset = arena.addr(0) - (BASE_PFN << 12);
    // SAFETY: the reporter only hands the driver isolated blocks of the buddy's window, which
    // is the arena, kept alive; nobody touches them.
    #[allow(unsafe_code)]
    let mem = unsafe { RamMapping::linear(usize::try_from(offset).unwrap()) };
    let (t, s) = FakeTransport::qemu(QEMU_OFFER);
    let mut b = Balloon::new(t, mem, Features::SUPPORTED).unwrap();
    s.borrow_mut().modes[4] = Mode::Manual;

    let base = Pfn::new(BASE_PFN).unwrap();
    let mut buddy = Buddy::<_, 4>::new(vec![FrameMeta::HOLE; FRAMES as usize], base).unwrap();
    buddy.add_range(base, FRAMES).unwrap();
    let buddy = LockedBuddy::new(buddy);
    let policy = ReportPolicy {
        min_order: PageOrder::new(4).unwrap(),
        budget_divisor: 1,
        ..ReportPolicy::DEFAULT
    };
    let reporter = Reporter::<4>::new(policy).unwrap();
    let mut pipeline = Pipeline::<4, 3>::new();
    let mut fill = pipeline.start_pass(&reporter, &buddy, &mut b).unwrap();
    let mut round = 0;
    while pipeline.in_flight() > 0 {
        assert_eq!(b.reports_in_flight(), pipeline.in_flight());
        // The device returns the newest batch first.
        let mut chains = s.borrow_mut().take(4);
        chains.reverse();
        for c in &chains {
            for buf in &c.bufs {
                assert!(buf.writable);
                assert_eq!(buf.len, 16 << 12);
                let pa = buf.addr - offset;
                assert!(((BASE_PFN << 12)..((BASE_PFN + FRAMES) << 12)).contains(&pa));
            }
            s.borrow_mut().push_used(4, u32::from(c.head), 0);
        }
        while let Some(id) = b.poll_report().unwrap() {
            let done = pipeline.complete(&reporter, &buddy, id, true).unwrap();
            assert!(done.reported);
        }
        fill = pipeline.fill(&reporter, &buddy, &mut b).unwrap();
        round += 1;
        assert!(round < 100);
    }
    let _ = fill;
    let st = pipeline.stats();
    assert!(st.reported_blocks > 0);
    assert_eq!(st.submitted, st.completed);
    let seen_blocks: usize = report_chains(&s).iter().map(|c| c.bufs.len()).sum();
    assert_eq!(seen_blocks as u64, st.reported_blocks);
    assert_eq!(buddy.lock().reported_frames(), st.reported_frames);
    assert_eq!(b.stats().reports_completed, st.completed);
}

// ---- free page hinting ----

fn hint_chains(s: &Shared) -> Vec<Chain> {
    s.borrow()
        .seen
        .iter()
        .filter(|c| c.queue == 3)
        .cloned()
        .collect()
}

#[test]
fn a_hint_run_sends_the_id_the_blocks_then_stop() {
    let (mut b, s) = qemu(QEMU_OFFER, Features::SUPPORTED);
    s.borrow_mut().modes[3] = Mode::Manual;
    s.borrow_mut().set_config_u32(8, 5);
    let arena = Arena::new(64 << 12);
    assert_eq!(b.hint_cmd_id(), Ok(CmdId::new(5)));
    b.hint_begin(CmdId::new(5)).unwrap();
    assert_eq!(b.hint_state(), HintState::Running(CmdId::new(5)));
    let blocks = [(0, 16 << 12), (16 << 12, 8 << 12), (32 << 12, 4096)];
    for (off, len) in blocks {
        b.hint_block(arena.addr(off), len).unwrap();
    }
    b.hint_end().unwrap();
    assert_eq!(b.hint_state(), HintState::Ended(CmdId::new(5)));
    assert_eq!(b.hint_in_flight(), 5);

    let chains = s.borrow_mut().take(3);
    let seen: Vec<(bool, u32, Vec<u8>)> = chains
        .iter()
        .map(|c| {
            assert_eq!(c.bufs.len(), 1);
            (c.bufs[0].writable, c.bufs[0].len, c.bufs[0].bytes.clone())
        })
        .collect();
    assert_eq!(
        seen,
        vec![
            (false, 4, vec![5, 0, 0, 0]),
            (true, 16 << 12, vec![]),
            (true, 8 << 12, vec![]),
            (true, 4096, vec![]),
            (false, 4, vec![0, 0, 0, 0]),
        ]
    );
    assert_eq!(chains[1].bufs[0].addr, arena.addr(0));
    assert_eq!(chains[3].bufs[0].addr, arena.addr(32 << 12));

    // Not done while the host holds buffers or the id is not DONE.
    for c in &chains {
        s.borrow_mut().push_used(3, u32::from(c.head), 0);
    }
    assert_eq!(b.hint_done(), Ok(false), "id still 5");
    assert_eq!(b.hint_in_flight(), 0);
    s.borrow_mut().set_config_u32(8, 1);
    assert_eq!(b.hint_done(), Ok(true));
    assert_eq!(b.hint_state(), HintState::Idle);
    assert_eq!(b.stats().hint_blocks, 3);
    assert_eq!(b.stats().hint_bytes, (16 + 8 + 1) << 12);
}

#[test]
fn hint_done_waits_for_every_buffer() {
    let (mut b, s) = qemu(QEMU_OFFER, Features::SUPPORTED);
    s.borrow_mut().modes[3] = Mode::Manual;
    s.borrow_mut().set_config_u32(8, 2);
    let arena = Arena::new(4 << 12);
    b.hint_begin(CmdId::new(2)).unwrap();
    b.hint_block(arena.addr(0), 4096).unwrap();
    b.hint_end().unwrap();
    s.borrow_mut().set_config_u32(8, 1);
    assert_eq!(b.hint_done(), Ok(false), "three buffers still the host's");
    s.borrow_mut().use_all(3, 0);
    assert_eq!(b.hint_done(), Ok(true));
}

#[test]
fn hint_begin_takes_only_the_devices_current_run_id() {
    let (mut b, s) = qemu(QEMU_OFFER, Features::SUPPORTED);
    s.borrow_mut().set_config_u32(8, 1);
    for id in [0, 1, 3] {
        assert_eq!(
            b.hint_begin(CmdId::new(id)),
            Err(HintError::NotRequested {
                id: CmdId::new(id),
                current: CmdId::DONE
            })
        );
    }
    s.borrow_mut().set_config_u32(8, 3);
    assert_eq!(
        b.hint_begin(CmdId::new(4)),
        Err(HintError::NotRequested {
            id: CmdId::new(4),
            current: CmdId::new(3)
        })
    );
    assert_eq!(b.hint_block(0x1000, 4096), Err(HintError::NotRunning));
    assert_eq!(b.hint_end(), Err(HintError::NotRunning));
    b.hint_begin(CmdId::new(3)).unwrap();
    assert_eq!(b.hint_begin(CmdId::new(3)), Err(HintError::AlreadyRunning));
    assert!(
        hint_chains(&s).len() == 1,
        "only the accepted begin queued its id"
    );
}

#[test]
fn a_block_after_the_host_moved_on_is_refused() {
    let (mut b, s) = qemu(QEMU_OFFER, Features::SUPPORTED);
    s.borrow_mut().set_config_u32(8, 6);
    let arena = Arena::new(4 << 12);
    b.hint_begin(CmdId::new(6)).unwrap();
    s.borrow_mut().set_config_u32(8, 0);
    assert_eq!(
        b.hint_block(arena.addr(0), 4096),
        Err(HintError::Stopped { now: CmdId::STOP })
    );
    assert_eq!(b.hint_block(arena.addr(0), 0), Err(HintError::BadBlock));
    assert_eq!(
        b.hint_block(arena.addr(0), 1 << 32),
        Err(HintError::BadBlock)
    );
    b.hint_end().unwrap();
    let kinds: Vec<Vec<u8>> = hint_chains(&s)
        .iter()
        .map(|c| c.bufs[0].bytes.clone())
        .collect();
    assert_eq!(kinds, vec![vec![6, 0, 0, 0], vec![0, 0, 0, 0]]);
}

#[test]
fn a_zero_id_the_device_did_not_announce_is_hinting_under_way() {
    // QEMU 7.2 `virtio_balloon_get_config` leaves the id 0 in its START state (after it took
    // the guest's id) without a config notification; a real STOP is announced.
    let (mut b, s) = qemu(QEMU_OFFER, Features::SUPPORTED);
    let arena = Arena::new(4 << 12);
    s.borrow_mut().set_config_u32(8, 0x8000_0001);
    b.hint_begin(CmdId::new(0x8000_0001)).unwrap();
    s.borrow_mut().set_config_u32_silently(8, 0);
    b.hint_block(arena.addr(0), 4096).unwrap();
    b.hint_block(arena.addr(4096), 4096).unwrap();
    s.borrow_mut().set_config_u32(8, 0);
    assert_eq!(
        b.hint_block(arena.addr(8192), 4096),
        Err(HintError::Stopped { now: CmdId::STOP })
    );
    b.hint_end().unwrap();
    assert_eq!(b.stats().hint_blocks, 2);
}

#[test]
fn hint_blocks_recycle_used_buffers_and_keep_an_entry_for_stop() {
    let (mut b, s) = qemu(QEMU_OFFER, Features::SUPPORTED);
    s.borrow_mut().modes[3] = Mode::Manual;
    s.borrow_mut().set_config_u32(8, 9);
    let arena = Arena::new(4 << 12);
    let pa = arena.addr(0);
    b.hint_begin(CmdId::new(9)).unwrap();
    // The id plus 254 blocks: one entry left, kept for STOP.
    for _ in 0..queue_size::HINT - 2 {
        b.hint_block(pa, 4096).unwrap();
    }
    assert_eq!(b.hint_in_flight(), queue_size::HINT - 1);
    assert_eq!(b.hint_block(pa, 4096), Err(HintError::QueueFull));
    // The host consumes what it has; the next block recycles those entries.
    let taken = s.borrow_mut().use_all(3, 0).len();
    assert_eq!(taken, queue_size::HINT - 1);
    for _ in 0..10 {
        b.hint_block(pa, 4096).unwrap();
    }
    assert_eq!(b.hint_in_flight(), 10);
    b.hint_end().unwrap();
    assert_eq!(b.stats().hint_blocks, queue_size::HINT as u64 - 2 + 10);
    let last = s.borrow_mut().take(3);
    assert_eq!(last.len(), 11);
    assert_eq!(last[10].bufs[0].bytes, vec![0, 0, 0, 0], "STOP last");
}

#[test]
fn a_full_queue_still_takes_stop() {
    let (mut b, s) = qemu(QEMU_OFFER, Features::SUPPORTED);
    s.borrow_mut().modes[3] = Mode::Manual;
    s.borrow_mut().set_config_u32(8, 2);
    let arena = Arena::new(4 << 12);
    b.hint_begin(CmdId::new(2)).unwrap();
    while b.hint_block(arena.addr(0), 4096).is_ok() {}
    b.hint_end().unwrap();
    assert_eq!(b.hint_in_flight(), queue_size::HINT);
}

#[test]
fn bad_hint_used_lengths_and_tokens_are_errors() {
    let (mut b, s) = qemu(QEMU_OFFER, Features::SUPPORTED);
    s.borrow_mut().modes[3] = Mode::Manual;
    s.borrow_mut().set_config_u32(8, 2);
    let arena = Arena::new(4 << 12);
    b.hint_begin(CmdId::new(2)).unwrap();
    b.hint_block(arena.addr(0), 4096).unwrap();
    let chains = s.borrow_mut().take(3);
    // The id buffer is device-readable: any length is impossible.
    s.borrow_mut().push_used(3, u32::from(chains[0].head), 1);
    assert_eq!(b.poll_hint(), Err(HintError::BadUsedLength { len: 1 }));
    s.borrow_mut().push_used(3, u32::from(chains[1].head), 4096);
    assert_eq!(b.poll_hint(), Ok(1), "a block's own length is fine");
    s.borrow_mut().push_used(3, u32::from(chains[1].head), 0);
    assert_eq!(
        b.poll_hint(),
        Err(HintError::Ring(RingError::UnknownToken(chains[1].head))),
        "a token used twice"
    );
}

#[test]
fn hinting_not_negotiated_is_refused() {
    let (mut b, _s) = qemu(QEMU_OFFER, Features::REPORTING);
    assert_eq!(b.hint_begin(CmdId::new(2)), Err(HintError::NotNegotiated));
    assert_eq!(b.hint_block(0x1000, 4096), Err(HintError::NotNegotiated));
    assert_eq!(b.hint_end(), Err(HintError::NotNegotiated));
    assert_eq!(b.poll_hint(), Err(HintError::NotNegotiated));
    assert_eq!(b.hint_done(), Ok(true), "no run, nothing held");
}

#[test]
fn waiting_for_buffers_kicks_the_device_even_when_it_suppressed_notifications() {
    // QEMU's hint iothread turns notifications off while it polls and back on after its last
    // pop; a buffer queued in between is seen only at the next notification.
    let (mut b, s) = qemu(QEMU_OFFER, Features::SUPPORTED);
    s.borrow_mut().modes[3] = Mode::Manual;
    s.borrow_mut().set_config_u32(8, 2);
    let arena = Arena::new(4 << 12);
    b.hint_begin(CmdId::new(2)).unwrap();
    b.hint_block(arena.addr(0), 4096).unwrap();
    b.hint_end().unwrap();
    s.borrow_mut().set_config_u32(8, 1);
    let notified = s.borrow().queues[3].notified;
    assert_eq!(b.hint_done(), Ok(false));
    assert_eq!(s.borrow().queues[3].notified, notified + 1, "kicked");
    s.borrow_mut().use_all(3, 0);
    assert_eq!(b.hint_done(), Ok(true));
    assert_eq!(s.borrow().queues[3].notified, notified + 1);
}

#[test]
fn a_new_run_may_begin_while_the_last_runs_blocks_are_held() {
    // QEMU asks for a new id after every bitmap sync and says DONE only at the end.
    let (mut b, s) = qemu(QEMU_OFFER, Features::SUPPORTED);
    let arena = Arena::new(4 << 12);
    for id in [2, 3] {
        s.borrow_mut().set_config_u32(8, id);
        b.hint_begin(CmdId::new(id)).unwrap();
        b.hint_block(arena.addr(id as usize * 4096), 4096).unwrap();
        b.hint_end().unwrap();
        s.borrow_mut().set_config_u32(8, 0);
        assert_eq!(b.hint_done(), Ok(false), "STOP is not DONE");
    }
    s.borrow_mut().set_config_u32(8, 1);
    assert_eq!(b.hint_done(), Ok(true));
    let ids: Vec<Vec<u8>> = hint_chains(&s)
        .iter()
        .filter(|c| !c.bufs[0].writable)
        .map(|c| c.bufs[0].bytes.clone())
        .collect();
    assert_eq!(
        ids,
        vec![vec![2, 0, 0, 0], vec![0; 4], vec![3, 0, 0, 0], vec![0; 4]]
    );
}

#[test]
fn an_answered_run_id_is_not_pending_and_not_begun_twice() {
    let (mut b, s) = qemu(QEMU_OFFER, Features::SUPPORTED);
    assert_eq!(b.hint_pending(), Ok(None), "STOP at reset");
    s.borrow_mut().set_config_u32(8, 4);
    assert_eq!(b.hint_pending(), Ok(Some(CmdId::new(4))));
    b.hint_begin(CmdId::new(4)).unwrap();
    b.hint_end().unwrap();
    // The device has not processed the STOP yet: its config still shows 4.
    assert_eq!(b.hint_pending(), Ok(None));
    assert_eq!(
        b.hint_begin(CmdId::new(4)),
        Err(HintError::AlreadyAnswered { id: CmdId::new(4) })
    );
    s.borrow_mut().set_config_u32(8, 5);
    assert_eq!(b.hint_pending(), Ok(Some(CmdId::new(5))));
    s.borrow_mut().set_config_u32(8, 1);
    assert_eq!(b.hint_pending(), Ok(None), "DONE is no run");
}
