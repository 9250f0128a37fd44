//! Host-side tests against a fake device ([`fake`]) that reads the rings the driver writes.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod fake;
mod hint;
mod report;
mod tell;

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
