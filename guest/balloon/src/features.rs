//! Feature bits, negotiation, and the virtqueue layout QEMU builds.

use core::fmt;

/// A set of virtio-balloon feature bits (device-specific bits 0..=5, plus the transport bits
/// this driver knows).
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Features(u64);

impl Features {
    /// `VIRTIO_BALLOON_F_MUST_TELL_HOST` (bit 0): the host must be told before the guest
    /// reuses a deflated page.
    pub const MUST_TELL_HOST: Self = Self(1 << 0);
    /// `VIRTIO_BALLOON_F_STATS_VQ` (bit 1): the statistics queue exists (queue 2).
    pub const STATS_VQ: Self = Self(1 << 1);
    /// `VIRTIO_BALLOON_F_DEFLATE_ON_OOM` (bit 2): the guest may deflate when it runs out of
    /// memory. Not wanted: the driver never deflates on its own.
    pub const DEFLATE_ON_OOM: Self = Self(1 << 2);
    /// `VIRTIO_BALLOON_F_FREE_PAGE_HINT` (bit 3): free page hinting during migration.
    pub const FREE_PAGE_HINT: Self = Self(1 << 3);
    /// `VIRTIO_BALLOON_F_PAGE_POISON` (bit 4): the guest keeps a pattern in free pages
    /// (`poison_val`). Not wanted: the guest keeps no poison pattern, so there is nothing for
    /// the host to preserve (hvmem's `poison::negotiate` is the guest side of it).
    pub const PAGE_POISON: Self = Self(1 << 4);
    /// `VIRTIO_BALLOON_F_REPORTING` (bit 5): free page reporting.
    pub const REPORTING: Self = Self(1 << 5);
    /// `VIRTIO_F_RING_INDIRECT_DESC` (bit 28): a chain may live in an indirect table, so a
    /// 32-block batch takes one queue entry.
    pub const RING_INDIRECT_DESC: Self = Self(1 << 28);
    /// `VIRTIO_F_RING_EVENT_IDX` (bit 29). Not wanted: the driver polls.
    pub const RING_EVENT_IDX: Self = Self(1 << 29);
    /// `VIRTIO_F_VERSION_1` (bit 32): a modern (virtio 1.x, little-endian) device. A driver
    /// must accept it when offered.
    pub const VERSION_1: Self = Self(1 << 32);

    /// No features.
    pub const EMPTY: Self = Self(0);

    /// Every feature this driver can use: what [`negotiate`] accepts at most.
    pub const SUPPORTED: Self = Self(
        Self::MUST_TELL_HOST.0
            | Self::STATS_VQ.0
            | Self::FREE_PAGE_HINT.0
            | Self::REPORTING.0
            | Self::RING_INDIRECT_DESC.0
            | Self::VERSION_1.0,
    );

    /// Features from raw bits (unknown bits are kept; [`negotiate`] drops them).
    pub const fn from_bits(bits: u64) -> Self {
        Self(bits)
    }

    /// The raw bits.
    pub const fn bits(self) -> u64 {
        self.0
    }

    /// Whether every bit of `other` is set.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// Both sets.
    pub const fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }

    /// The bits set in both.
    pub const fn intersection(self, other: Self) -> Self {
        Self(self.0 & other.0)
    }
}

impl fmt::Debug for Features {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Features({:#x})", self.0)
    }
}

impl fmt::LowerHex for Features {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::LowerHex::fmt(&self.0, f)
    }
}

/// The features the driver accepts: what the device offers, the driver supports and the
/// embedder wants; `MUST_TELL_HOST` and `VERSION_1` whenever offered (the first is a promise
/// the driver keeps anyway, the second a spec requirement), and `STATS_VQ` whenever offered
/// (it keeps queue 2 the statistics queue on both sides; the driver never posts statistics).
pub const fn negotiate(offered: Features, wanted: Features) -> Features {
    let always = Features::MUST_TELL_HOST
        .union(Features::VERSION_1)
        .union(Features::STATS_VQ);
    offered.intersection(Features::SUPPORTED.intersection(wanted.union(always)))
}

/// Queue sizes this driver sets up (a driver may choose any power of two up to the device's
/// maximum).
pub mod queue_size {
    /// Inflate and deflate queues (QEMU's maximum, as Linux uses): the driver has one PFN
    /// array in flight at a time.
    pub const INFLATE: usize = 128;
    /// See [`INFLATE`].
    pub const DEFLATE: usize = 128;
    /// The free-page-hint queue. QEMU offers 1024; the driver uses 256 (a driver may choose
    /// any power of two up to the maximum), because virtio-drivers keeps a 32-byte shadow per
    /// entry inside the queue object (1024 entries would be 32 KiB built on a guest kernel's
    /// stack). 255 blocks may be in flight (one entry stays free for STOP); 255 blocks of
    /// 4 MiB are more than the 256 MiB guest of QEMU's scenarios has. Used entries are
    /// recycled.
    pub const HINT: usize = 256;
    /// The reporting queue: QEMU 7.2's size, 32; with indirect descriptors one batch takes
    /// one entry, so up to 32 batches can be in flight.
    pub const REPORTING: usize = 32;
}

/// Where each queue is: QEMU's rule (QEMU 7.2 `virtio_balloon_device_realize`) creates the
/// queues in order, each only if the device has it — inflate, deflate, statistics (always),
/// the free-page-hint queue if the device offers `FREE_PAGE_HINT`, the reporting queue if it
/// offers `REPORTING` — so the indices follow the **offered** features, not the negotiated
/// ones. Linux numbers by the negotiated features and skips a queue it did not negotiate;
/// the two agree because this driver accepts `STATS_VQ` whenever it is offered, and the
/// embedder who turns off hinting on a device that offers it still finds reporting at 4.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct QueueLayout {
    /// Inflate queue (`inflateq`).
    pub inflate: u16,
    /// Deflate queue (`deflateq`).
    pub deflate: u16,
    /// Statistics queue (`statsq`), if the device has one. The driver does not set it up.
    pub stats: Option<u16>,
    /// Free-page-hint queue (`free_page_vq`), if the device has one.
    pub hint: Option<u16>,
    /// Reporting queue (`reporting_vq`), if the device has one.
    pub reporting: Option<u16>,
}

impl QueueLayout {
    /// The layout of a device that offers `offered` (QEMU's rule: the statistics queue is
    /// always created; a device that does not offer `STATS_VQ` is taken at its word).
    pub const fn for_offered(offered: Features) -> Self {
        let mut next = 2;
        let stats = if offered.contains(Features::STATS_VQ) {
            next += 1;
            Some(2)
        } else {
            None
        };
        let hint = if offered.contains(Features::FREE_PAGE_HINT) {
            next += 1;
            Some(next - 1)
        } else {
            None
        };
        let reporting = if offered.contains(Features::REPORTING) {
            Some(next)
        } else {
            None
        };
        Self {
            inflate: 0,
            deflate: 1,
            stats,
            hint,
            reporting,
        }
    }
}

/// Config space offsets (`struct virtio_balloon_config`, little-endian).
pub(crate) mod config {
    /// `num_pages`: the host's target, in 4 KiB pages.
    pub(crate) const NUM_PAGES: usize = 0;
    /// `actual`: what the guest says it holds, in 4 KiB pages.
    pub(crate) const ACTUAL: usize = 4;
    /// `free_page_hint_cmd_id`.
    pub(crate) const FREE_PAGE_HINT_CMD_ID: usize = 8;
    /// `poison_val` (only with `PAGE_POISON`, which the driver does not accept).
    #[allow(
        dead_code,
        reason = "documents the layout; PAGE_POISON is never accepted"
    )]
    pub(crate) const POISON_VAL: usize = 12;
}
