//! Inflate and deflate: PFN arrays on the inflate and deflate queues.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;

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
