//! Free-page reporting end to end: the guest's hint batcher, the wire formats, the host's
//! receiver, the free-page-hint protocol and THP-order ballooning (seeds 000-003; Linux
//! `mm/page_reporting.c`, `drivers/virtio/virtio_balloon.c`).

mod layout;
mod receiver;
pub mod wire;

pub use layout::{GuestRamLayout, LayoutError, RamLayout, RamRegion, RegionError};
pub use receiver::{
    BatchOutcome, ByteTotals, Discard, DiscardMode, RangeError, RangeOutcome, ReceiverStats,
    ReportReceiver, SkipReason,
};
mod fph;

pub use fph::{
    CmdIdOutcome, DirtyBitmap, FreePageHintSession, HintApplied, HintIgnored, HintState, HintStats,
};
mod balloon;

pub use balloon::{
    Balloon, BalloonConfig, BalloonNewError, BalloonViolation, DeflateError, DeflateOutcome,
    FallbackPolicy, InflateError, InflateOutcome,
};
