//! Page-poison negotiation: may the guest report free pages whose contents it cares about?
//!
//! A guest that poisons free pages (Linux `page_poison=1`) or zeroes them on free
//! (`init_on_free=1`) expects a free page to still hold that pattern when it allocates it
//! again. A host that discards a reported page hands back zeroes (or whatever its discard
//! leaves), which breaks the pattern: the guest would see corruption
//! (Tsirkin, "kvm: Add guest side support for free memory hints", 2019). virtio
//! solves it with `VIRTIO_BALLOON_F_PAGE_POISON`: the guest writes the pattern to the
//! `poison_val` config field and the device promises to preserve it (QEMU skips the discard
//! then, and acks the report anyway). Without that feature the guest must not report at all
//! (Linux `virtballoon_validate` clears `VIRTIO_BALLOON_F_REPORTING`).

use core::fmt;

/// virtio-balloon feature bit: the device knows `poison_val` and keeps free pages' pattern.
pub const VIRTIO_BALLOON_F_PAGE_POISON: u32 = 4;
/// virtio-balloon feature bit: the free page reporting queue exists.
pub const VIRTIO_BALLOON_F_REPORTING: u32 = 5;

/// What the guest keeps in its free pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FreePageContent {
    /// Nothing in particular: the guest initialises pages when it allocates them.
    Unspecified,
    /// Zeroes, written when a page is freed (Linux `init_on_free`); `poison_val` 0.
    Zeroed,
    /// A byte pattern written when a page is freed (Linux page poisoning, `PAGE_POISON` is
    /// 0xaa); `poison_val` is the byte repeated four times.
    Poisoned(u8),
}

/// The outcome of [`negotiate`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Negotiation {
    /// The offered feature bits the driver accepts: the offer with
    /// `VIRTIO_BALLOON_F_PAGE_POISON` cleared when the guest keeps no pattern, and
    /// `VIRTIO_BALLOON_F_REPORTING` cleared when reporting is disabled.
    pub accepted: u64,
    /// The value to write to the `poison_val` config field (little-endian on the wire), when
    /// `VIRTIO_BALLOON_F_PAGE_POISON` is accepted.
    pub poison_val: Option<u32>,
    /// Whether the guest may report free pages.
    pub reporting: Result<(), ReportingDisabled>,
}

/// Why [`negotiate`] disabled reporting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ReportingDisabled {
    /// The device does not offer `VIRTIO_BALLOON_F_REPORTING`.
    NotOffered,
    /// The guest keeps a pattern in free pages and the device does not offer
    /// `VIRTIO_BALLOON_F_PAGE_POISON`: it cannot restore the pattern, so a report would
    /// corrupt free pages.
    PoisonNotPreserved,
}

impl fmt::Display for ReportingDisabled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NotOffered => "the device offers no free page reporting",
            Self::PoisonNotPreserved => {
                "free pages hold a poison pattern the device cannot preserve"
            }
        })
    }
}

impl core::error::Error for ReportingDisabled {}

/// Decides the features a guest driver accepts from the device's `offered` bits, given what
/// it keeps in free pages (Linux `virtballoon_validate` + the `poison_val` write of
/// `virtballoon_probe`).
///
/// ```
/// use hvmem::hint::guest::poison::{
///     negotiate, FreePageContent, ReportingDisabled, VIRTIO_BALLOON_F_REPORTING,
/// };
///
/// let offered = 1 << VIRTIO_BALLOON_F_REPORTING; // no PAGE_POISON
/// let n = negotiate(offered, FreePageContent::Poisoned(0xaa));
/// assert_eq!(n.reporting, Err(ReportingDisabled::PoisonNotPreserved));
/// assert_eq!(n.accepted, 0);
/// ```
pub fn negotiate(offered: u64, content: FreePageContent) -> Negotiation {
    let poison_bit = 1u64 << VIRTIO_BALLOON_F_PAGE_POISON;
    let report_bit = 1u64 << VIRTIO_BALLOON_F_REPORTING;
    let pattern = match content {
        FreePageContent::Unspecified => None,
        FreePageContent::Zeroed => Some(0u32),
        FreePageContent::Poisoned(byte) => Some(u32::from_le_bytes([byte; 4])),
    };
    let mut accepted = offered;
    let mut poison_val = None;
    let mut reporting = Ok(());
    match pattern {
        None => accepted &= !poison_bit,
        Some(val) if offered & poison_bit != 0 => poison_val = Some(val),
        Some(_) => {
            accepted &= !report_bit;
            reporting = Err(ReportingDisabled::PoisonNotPreserved);
        }
    }
    if offered & report_bit == 0 {
        reporting = Err(ReportingDisabled::NotOffered);
    }
    Negotiation {
        accepted,
        poison_val,
        reporting,
    }
}
