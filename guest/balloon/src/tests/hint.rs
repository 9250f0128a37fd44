//! Free page hinting: the id, blocks, STOP, DONE sequence against QEMU's behaviour.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;

fn hint_chains(s: &Shared) -> Vec<Chain> {
    s.borrow()
        .seen
        .iter()
        .filter(|c| c.queue == 3)
        .cloned()
        .collect()
}

/// A QEMU-like device whose hint queue the test drives by hand, QEMU asking for run 2, the
/// driver having begun it, and four pages of RAM for blocks.
fn run_2_begun() -> (Balloon, Shared, Arena) {
    let (mut b, s) = qemu(QEMU_OFFER, Features::SUPPORTED);
    s.borrow_mut().modes[3] = Mode::Manual;
    s.borrow_mut().set_config_u32(8, 2);
    b.hint_begin(CmdId::new(2)).unwrap();
    (b, s, Arena::new(4 << 12))
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
    let (mut b, s, arena) = run_2_begun();
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
    let (mut b, _s, arena) = run_2_begun();
    while b.hint_block(arena.addr(0), 4096).is_ok() {}
    b.hint_end().unwrap();
    assert_eq!(b.hint_in_flight(), queue_size::HINT);
}

#[test]
fn bad_hint_used_lengths_and_tokens_are_errors() {
    let (mut b, s, arena) = run_2_begun();
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
    let (mut b, s, arena) = run_2_begun();
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

/// A new balloon target announced during a run (QEMU bumps the config generation for it as
/// for a STOP, and its START shows id 0 all along) does not end the run: before, the
/// driver read it as STOP and hinted nothing more. A STOP announced afterwards still ends it.
#[test]
fn a_new_balloon_target_during_a_run_does_not_end_it() {
    let (mut b, s) = qemu(QEMU_OFFER, Features::SUPPORTED);
    let arena = Arena::new(4 << 12);
    s.borrow_mut().set_config_u32(8, 0x8000_0002);
    b.hint_begin(CmdId::new(0x8000_0002)).unwrap();
    s.borrow_mut().set_config_u32_silently(8, 0);
    b.hint_block(arena.addr(0), 4096).unwrap();
    // The host moves the balloon target: an announced change, id still 0.
    s.borrow_mut().set_config_u32(0, 1000);
    b.hint_block(arena.addr(4096), 4096).unwrap();
    b.hint_block(arena.addr(8192), 4096).unwrap();
    // Now a real STOP: announced, and the target unchanged.
    s.borrow_mut().set_config_u32(8, 0);
    assert_eq!(
        b.hint_block(arena.addr(12288), 4096),
        Err(HintError::Stopped { now: CmdId::STOP })
    );
    b.hint_end().unwrap();
    assert_eq!(b.stats().hint_blocks, 3);
}
