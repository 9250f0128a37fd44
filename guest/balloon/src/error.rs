//! One small error enum per operation. All are `Copy + Eq`; none is ever a panic.

use core::fmt;

use hvmem::hint::guest::BatchId;
use hvmem::hint::wire::CmdId;
use virtio_drivers::transport::DeviceType;

/// Why a virtqueue operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RingError {
    /// virtio-drivers refused (e.g. [`virtio_drivers::Error::QueueFull`]).
    Queue(virtio_drivers::Error),
    /// The device put a token in the used ring that names no chain in flight. The used ring
    /// can't be popped past it: the queue is unusable from now on.
    UnknownToken(u16),
    /// The queue saw an [`UnknownToken`](Self::UnknownToken) before, or broke an internal
    /// invariant: it refuses everything.
    Broken,
    /// A chain with no buffer, or an empty buffer.
    Empty,
    /// A block whose address and length don't fit the address space.
    BadBlock,
    /// A chain of more than 32 buffers.
    TooLong,
}

impl fmt::Display for RingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Queue(e) => write!(f, "virtqueue: {e}"),
            Self::UnknownToken(t) => write!(f, "device used unknown token {t}"),
            Self::Broken => f.write_str("virtqueue unusable after a device error"),
            Self::Empty => f.write_str("empty buffer"),
            Self::BadBlock => f.write_str("block outside the address space"),
            Self::TooLong => f.write_str("chain of more than 32 buffers"),
        }
    }
}

impl core::error::Error for RingError {}

/// Why [`VirtIOBalloon::new`](crate::VirtIOBalloon::new) failed. The device is left reset
/// (or `FAILED`) and the transport is dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum InitError {
    /// The transport is not a balloon (device id 5).
    WrongDevice(DeviceType),
    /// The device did not keep `FEATURES_OK` after the driver wrote its features.
    FeaturesRefused {
        /// The features the driver asked for.
        accepted: u64,
    },
    /// A queue could not be set up (too small on the device, already in use, no DMA memory).
    Queue {
        /// The queue index.
        index: u16,
        /// virtio-drivers' reason.
        error: virtio_drivers::Error,
    },
}

impl fmt::Display for InitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::WrongDevice(t) => write!(f, "not a balloon device: {t:?}"),
            Self::FeaturesRefused { accepted } => {
                write!(f, "device refused features {accepted:#x}")
            }
            Self::Queue { index, error } => write!(f, "queue {index}: {error}"),
        }
    }
}

impl core::error::Error for InitError {}

/// Why a config space access failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// The field belongs to a feature that was not negotiated.
    NotNegotiated,
    /// The transport refused (the config space is too small).
    Transport(virtio_drivers::Error),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotNegotiated => f.write_str("config field of a feature not negotiated"),
            Self::Transport(e) => write!(f, "config space: {e}"),
        }
    }
}

impl core::error::Error for ConfigError {}

/// Why an inflate or deflate message failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TellError {
    /// A frame number above `u32::MAX` (a guest above 16 TiB): the wire has 32 bits.
    PfnTooLarge {
        /// The frame number.
        pfn: u64,
    },
    /// The queue failed.
    Ring(RingError),
    /// The device did not return the message within the spin limit. The queue keeps the
    /// message (its buffer stays owned until the device returns it); the frames of that
    /// message count as not told.
    Timeout,
    /// The device returned the message with a used length it can't have written (the
    /// message has no device-writable byte).
    BadUsedLength {
        /// The length the device wrote.
        len: u32,
    },
}

impl fmt::Display for TellError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::PfnTooLarge { pfn } => write!(f, "pfn {pfn:#x} does not fit 32 bits"),
            Self::Ring(e) => write!(f, "{e}"),
            Self::Timeout => f.write_str("device did not answer"),
            Self::BadUsedLength { len } => {
                write!(f, "device used a read-only message with length {len}")
            }
        }
    }
}

impl core::error::Error for TellError {}

/// An inflate or deflate that stopped early: `frames_told` frames (whole messages, in the
/// order given) reached the host before `error`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TellFailed {
    /// Frames the host was told about (and returned the message for).
    pub frames_told: u64,
    /// Why the next message failed.
    pub error: TellError,
}

impl fmt::Display for TellFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (after {} frames)", self.error, self.frames_told)
    }
}

impl core::error::Error for TellFailed {}

/// Why a free page report failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReportError {
    /// `REPORTING` was not negotiated.
    NotNegotiated,
    /// A batch with no block.
    EmptyBatch,
    /// A batch longer than [`MAX_BATCH`](crate::MAX_BATCH) blocks.
    BatchTooLong {
        /// Blocks in the batch.
        blocks: usize,
    },
    /// A block of 4 GiB or more (a descriptor's length is 32 bits).
    BlockTooLarge,
    /// [`report`](hvmem::hint::guest::ReportTransport::report) was called while pipelined
    /// batches are in flight (their completions would be lost).
    Busy,
    /// The queue failed.
    Ring(RingError),
    /// The device returned batch `id` with a used length larger than the batch. The batch is
    /// off the queue: complete it as **not** reported.
    BadUsedLength {
        /// The batch.
        id: BatchId,
        /// The length the device wrote.
        len: u32,
    },
}

impl fmt::Display for ReportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotNegotiated => f.write_str("free page reporting not negotiated"),
            Self::EmptyBatch => f.write_str("empty report batch"),
            Self::BatchTooLong { blocks } => write!(f, "report batch of {blocks} blocks"),
            Self::BlockTooLarge => f.write_str("reported block of 4 GiB or more"),
            Self::Busy => f.write_str("pipelined reports in flight"),
            Self::Ring(e) => write!(f, "{e}"),
            Self::BadUsedLength { id, len } => {
                write!(f, "device returned {id} with impossible length {len}")
            }
        }
    }
}

impl core::error::Error for ReportError {}

/// Why a free page hint step failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum HintError {
    /// `FREE_PAGE_HINT` was not negotiated.
    NotNegotiated,
    /// [`hint_begin`](crate::VirtIOBalloon::hint_begin) with STOP, DONE, or an id that is not
    /// the one the device asks for now.
    NotRequested {
        /// The id given.
        id: CmdId,
        /// The device's current id.
        current: CmdId,
    },
    /// A run is already open ([`hint_end`](crate::VirtIOBalloon::hint_end) it first).
    AlreadyRunning,
    /// The guest already answered this run id (Linux's `cmd_id_active` check): the device's
    /// config still shows it until it processed the guest's STOP.
    AlreadyAnswered {
        /// The id.
        id: CmdId,
    },
    /// No run is open.
    NotRunning,
    /// The device moved on (its command id is no longer the run's): the block was not
    /// queued; end the run.
    Stopped {
        /// The device's current id.
        now: CmdId,
    },
    /// A block of zero bytes, or of 4 GiB or more.
    BadBlock,
    /// No free queue entry even after recycling used ones: the block was not queued (Linux
    /// frees such a block unhinted). Poll and retry, or skip it.
    QueueFull,
    /// The queue failed.
    Ring(RingError),
    /// Reading the command id failed.
    Config(ConfigError),
    /// The device returned a buffer with a used length larger than the buffer (it was
    /// recycled all the same).
    BadUsedLength {
        /// The length the device wrote.
        len: u32,
    },
}

impl fmt::Display for HintError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotNegotiated => f.write_str("free page hinting not negotiated"),
            Self::NotRequested { id, current } => write!(
                f,
                "hint id {} is not the device's request ({})",
                id.get(),
                current.get()
            ),
            Self::AlreadyRunning => f.write_str("a hint run is already open"),
            Self::AlreadyAnswered { id } => write!(f, "hint run {} already answered", id.get()),
            Self::NotRunning => f.write_str("no hint run is open"),
            Self::Stopped { now } => write!(f, "device stopped the hint run (id {})", now.get()),
            Self::BadBlock => f.write_str("hint block of 0 bytes or 4 GiB or more"),
            Self::QueueFull => f.write_str("hint queue full"),
            Self::Ring(e) => write!(f, "{e}"),
            Self::Config(e) => write!(f, "{e}"),
            Self::BadUsedLength { len } => {
                write!(
                    f,
                    "device returned a hint buffer with impossible length {len}"
                )
            }
        }
    }
}

impl core::error::Error for HintError {}
