//! Free page reporting: batches as chains, ids back, refusals.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;

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
    let arena = Arena::new(FRAMES as usize * 4096);
    // Guest "physical" address base_pfn << 12 maps to the arena. The window starts at or
    // below the arena's address (16-frame aligned, the buddy's largest block), so the
    // linear offset is never negative, wherever the allocator put the arena (Miri's
    // addresses are low: a fixed 0x1_0000 underflowed there).
    let base_pfn: u64 = (arena.addr(0) >> 12) & !0xf;
    let offset = arena.addr(0) - (base_pfn << 12);
    // SAFETY: the reporter only hands the driver isolated blocks of the buddy's window, which
    // is the arena, kept alive; nobody touches them.
    #[allow(unsafe_code)]
    let mem = unsafe { RamMapping::linear(usize::try_from(offset).unwrap()) };
    let (t, s) = FakeTransport::qemu(QEMU_OFFER);
    let mut b = Balloon::new(t, mem, Features::SUPPORTED).unwrap();
    s.borrow_mut().modes[4] = Mode::Manual;

    let base = Pfn::new(base_pfn).unwrap();
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
                assert!(((base_pfn << 12)..((base_pfn + FRAMES) << 12)).contains(&pa));
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
