//! The driver: initialisation, config space, inflate and deflate.

use alloc::boxed::Box;
use alloc::vec::Vec;

use hvmem::addr::Pfn;
use hvmem::buddy::Block;
use hvmem::hint::wire::block_pfns;
use virtio_drivers::Hal;
use virtio_drivers::transport::{DeviceStatus, DeviceType, Transport};

use crate::error::{ConfigError, InitError, RingError, TellError, TellFailed};
use crate::features::{Features, QueueLayout, config, negotiate, queue_size};
use crate::hint::HintState;
use crate::ring::{Buf, RamMapping, Ring, Used};

/// Frame numbers per inflate or deflate message (Linux `VIRTIO_BALLOON_ARRAY_PFNS_MAX`).
pub const PFNS_PER_MESSAGE: usize = 256;

/// How many times a wait that may give up polls the used ring by default. QEMU 7.2 handles
/// inflate and deflate messages during the notification itself (in the vCPU thread under
/// TCG), so the first poll normally finds the answer; the bound only catches a device that
/// never answers.
pub const DEFAULT_SPIN_LIMIT: u64 = 1 << 28;

/// Counters over the life of the driver.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DriverStats {
    /// Frames the host was told about on the inflate queue.
    pub inflated_frames: u64,
    /// Frames the host was told about on the deflate queue.
    pub deflated_frames: u64,
    /// Inflate and deflate messages returned by the host.
    pub messages: u64,
    /// Report batches queued.
    pub reports_submitted: u64,
    /// Report batches the host returned.
    pub reports_completed: u64,
    /// Hint blocks queued.
    pub hint_blocks: u64,
    /// Bytes in those blocks.
    pub hint_bytes: u64,
}

/// A virtio-balloon device driver. `H` is the embedder's DMA and address translation layer,
/// `T` the transport (virtio-mmio on QEMU's `microvm`, or PCI).
///
/// Dropping the driver resets the device, so it stops using the queues before their memory
/// is freed. Batches or hint blocks in flight are then the embedder's again (fail its
/// [`Pipeline`](hvmem::hint::guest::Pipeline) first).
pub struct VirtIOBalloon<H: Hal, T: Transport> {
    pub(crate) transport: T,
    pub(crate) mem: RamMapping,
    offered: Features,
    negotiated: Features,
    layout: QueueLayout,
    inflate: Box<Ring<H, { queue_size::INFLATE }>>,
    deflate: Box<Ring<H, { queue_size::DEFLATE }>>,
    pub(crate) hint: Option<Box<Ring<H, { queue_size::HINT }>>>,
    pub(crate) reporting: Option<Box<Ring<H, { queue_size::REPORTING }>>>,
    pub(crate) hint_state: HintState,
    /// The last run id [`hint_begin`](Self::hint_begin) accepted (Linux `cmd_id_active`).
    pub(crate) hint_last: Option<hvmem::hint::wire::CmdId>,
    /// The config generation when the open run began (or when a new balloon target was
    /// seen during it).
    pub(crate) hint_generation: u32,
    /// The balloon target (`num_pages`) at that generation.
    pub(crate) hint_target: u32,
    next_message: u64,
    pub(crate) spin_limit: u64,
    pub(crate) stats: DriverStats,
}

impl<H: Hal, T: Transport> VirtIOBalloon<H, T> {
    /// Initialises the device (virtio 3.1.1): reset, acknowledge, negotiate features
    /// ([`negotiate`]`(offered, wanted)`), set up the inflate and deflate queues and, when
    /// negotiated, the free-page-hint and reporting queues at QEMU's indices
    /// ([`QueueLayout::for_offered`]), then `DRIVER_OK`.
    ///
    /// `mem` says where the blocks handed to the driver (reports, hints) are mapped; its
    /// constructors are `unsafe` and carry the contract for every such block.
    ///
    /// On an error the device is marked `FAILED`, then reset.
    pub fn new(mut transport: T, mem: RamMapping, wanted: Features) -> Result<Self, InitError> {
        // virtio-drivers 0.13 decodes device id 5 (the traditional balloon) as
        // `MemoryBalloon`, the name it also gives id 13; the `MemoryBallooning` variant has
        // the value 5 but no id maps to it. Accept both.
        let kind = transport.device_type();
        if !matches!(
            kind,
            DeviceType::MemoryBallooning | DeviceType::MemoryBalloon
        ) {
            return Err(InitError::WrongDevice(kind));
        }
        transport.set_status(DeviceStatus::empty());
        transport.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER);
        let offered = Features::from_bits(transport.read_device_features());
        let negotiated = negotiate(offered, wanted);
        transport.write_driver_features(negotiated.bits());
        let base = DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER;
        // Legacy devices have no FEATURES_OK step.
        if negotiated.contains(Features::VERSION_1) {
            transport.set_status(base | DeviceStatus::FEATURES_OK);
            if !transport.get_status().contains(DeviceStatus::FEATURES_OK) {
                fail(&mut transport);
                return Err(InitError::FeaturesRefused {
                    accepted: negotiated.bits(),
                });
            }
        }
        transport.set_guest_page_size(virtio_drivers::PAGE_SIZE as u32);

        let layout = QueueLayout::for_offered(offered);
        let indirect = negotiated.contains(Features::RING_INDIRECT_DESC);
        let queues = setup_queues::<H, T>(&mut transport, layout, negotiated, indirect);
        let (inflate, deflate, hint, reporting) = match queues {
            Ok(q) => q,
            Err(e) => {
                fail(&mut transport);
                return Err(e);
            }
        };
        let status = if negotiated.contains(Features::VERSION_1) {
            base | DeviceStatus::FEATURES_OK | DeviceStatus::DRIVER_OK
        } else {
            base | DeviceStatus::DRIVER_OK
        };
        transport.set_status(status);
        Ok(Self {
            transport,
            mem,
            offered,
            negotiated,
            layout,
            inflate,
            deflate,
            hint,
            reporting,
            hint_state: HintState::Idle,
            hint_last: None,
            hint_generation: 0,
            hint_target: 0,
            next_message: 0,
            spin_limit: DEFAULT_SPIN_LIMIT,
            stats: DriverStats::default(),
        })
    }

    /// The features the device offered.
    pub fn offered(&self) -> Features {
        self.offered
    }

    /// The features negotiated.
    pub fn features(&self) -> Features {
        self.negotiated
    }

    /// Where the device's queues are.
    pub fn layout(&self) -> QueueLayout {
        self.layout
    }

    /// Whether `MUST_TELL_HOST` was negotiated. The driver tells the host before
    /// [`deflate`](Self::deflate) returns either way; the embedder reuses deflated frames
    /// only after it returned them as told.
    pub fn must_tell_host(&self) -> bool {
        self.negotiated.contains(Features::MUST_TELL_HOST)
    }

    /// Counters over the life of the driver.
    pub fn stats(&self) -> DriverStats {
        self.stats
    }

    /// Bounds the waits that may give up (inflate and deflate messages): after this many
    /// polls of the used ring they fail with [`TellError::Timeout`]. Reports and hints never
    /// wait on a bound: giving a block back while the host may still discard it would
    /// corrupt memory.
    pub fn set_spin_limit(&mut self, polls: u64) {
        self.spin_limit = polls;
    }

    /// Acknowledges a pending interrupt (the driver polls; this only clears the line).
    pub fn ack_interrupt(&mut self) {
        self.transport.ack_interrupt();
    }

    /// The host's target balloon size (`num_pages`), in 4 KiB pages.
    pub fn target_pages(&self) -> Result<u32, ConfigError> {
        self.read_config(config::NUM_PAGES)
    }

    /// The balloon size the guest last reported (`actual`), in 4 KiB pages.
    pub fn actual_pages(&self) -> Result<u32, ConfigError> {
        self.read_config(config::ACTUAL)
    }

    /// Tells the host the balloon now holds `pages` 4 KiB pages (`actual`).
    pub fn set_actual(&mut self, pages: u32) -> Result<(), ConfigError> {
        self.transport
            .write_config_space(config::ACTUAL, pages.to_le())
            .map_err(ConfigError::Transport)
    }

    pub(crate) fn read_config(&self, offset: usize) -> Result<u32, ConfigError> {
        self.transport
            .read_config_space::<u32>(offset)
            .map(u32::from_le)
            .map_err(ConfigError::Transport)
    }

    /// Sends `pfns` on the inflate queue, [`PFNS_PER_MESSAGE`] per message, each message
    /// returned by the host before the next goes (Linux `tell_host`). Returns the frames
    /// told. The host may discard the frames from the moment they are queued: the embedder
    /// must hold them (allocated, untouched) before calling.
    pub fn inflate(&mut self, pfns: impl IntoIterator<Item = Pfn>) -> Result<u64, TellFailed> {
        let told = self.tell(Queue::Inflate, pfns)?;
        self.stats.inflated_frames += told;
        Ok(told)
    }

    /// Sends `pfns` on the deflate queue, like [`inflate`](Self::inflate). The host has been
    /// told about every frame counted in the result (or in [`TellFailed::frames_told`], the
    /// first frames in order) when this returns: only those may be reused
    /// (`MUST_TELL_HOST`).
    pub fn deflate(&mut self, pfns: impl IntoIterator<Item = Pfn>) -> Result<u64, TellFailed> {
        let told = self.tell(Queue::Deflate, pfns)?;
        self.stats.deflated_frames += told;
        Ok(told)
    }

    /// [`inflate`](Self::inflate) every 4 KiB frame of `blocks` (what hvmem's
    /// [`Balloon::inflate`](hvmem::hint::guest::Balloon::inflate) pushed).
    pub fn inflate_blocks(&mut self, blocks: &[Block]) -> Result<u64, TellFailed> {
        self.inflate(block_pfns(blocks))
    }

    /// [`deflate`](Self::deflate) every 4 KiB frame of `blocks`.
    pub fn deflate_blocks(&mut self, blocks: &[Block]) -> Result<u64, TellFailed> {
        self.deflate(block_pfns(blocks))
    }

    fn tell(&mut self, q: Queue, pfns: impl IntoIterator<Item = Pfn>) -> Result<u64, TellFailed> {
        let mut told = 0u64;
        let mut pfns = pfns.into_iter().peekable();
        while pfns.peek().is_some() {
            let mut msg = Vec::with_capacity(PFNS_PER_MESSAGE * 4);
            let mut bad = None;
            while msg.len() < PFNS_PER_MESSAGE * 4 {
                let Some(pfn) = pfns.peek() else { break };
                match u32::try_from(pfn.get()) {
                    Ok(raw) => msg.extend_from_slice(&raw.to_le_bytes()),
                    Err(_) => {
                        bad = Some(pfn.get());
                        break;
                    }
                }
                pfns.next();
            }
            if !msg.is_empty() {
                let frames = (msg.len() / 4) as u64;
                self.send_message(q, msg.into_boxed_slice())
                    .map_err(|error| TellFailed {
                        frames_told: told,
                        error,
                    })?;
                told += frames;
                self.stats.messages += 1;
            }
            if let Some(pfn) = bad {
                return Err(TellFailed {
                    frames_told: told,
                    error: TellError::PfnTooLarge { pfn },
                });
            }
        }
        Ok(told)
    }

    /// Queues one message and waits until the host returns it.
    fn send_message(&mut self, q: Queue, msg: Box<[u8]>) -> Result<(), TellError> {
        let tag = self.next_message;
        self.next_message = self.next_message.wrapping_add(1);
        let (transport, mem, limit) = (&mut self.transport, &self.mem, self.spin_limit);
        let used = match q {
            Queue::Inflate => send_and_wait(&mut self.inflate, transport, mem, limit, tag, msg),
            Queue::Deflate => send_and_wait(&mut self.deflate, transport, mem, limit, tag, msg),
        }?;
        if used.len != 0 {
            return Err(TellError::BadUsedLength { len: used.len });
        }
        Ok(())
    }
}

impl<H: Hal, T: Transport> Drop for VirtIOBalloon<H, T> {
    fn drop(&mut self) {
        // Reset: the device forgets every queue before their memory goes away.
        self.transport.set_status(DeviceStatus::empty());
    }
}

impl<H: Hal, T: Transport> core::fmt::Debug for VirtIOBalloon<H, T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("VirtIOBalloon")
            .field("offered", &self.offered)
            .field("negotiated", &self.negotiated)
            .field("layout", &self.layout)
            .field("hint_state", &self.hint_state)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Copy)]
enum Queue {
    Inflate,
    Deflate,
}

fn fail<T: Transport>(transport: &mut T) {
    let s = transport.get_status();
    transport.set_status(s | DeviceStatus::FAILED);
    transport.set_status(DeviceStatus::empty());
}

type Rings<H> = (
    Box<Ring<H, { queue_size::INFLATE }>>,
    Box<Ring<H, { queue_size::DEFLATE }>>,
    Option<Box<Ring<H, { queue_size::HINT }>>>,
    Option<Box<Ring<H, { queue_size::REPORTING }>>>,
);

fn setup_queues<H: Hal, T: Transport>(
    transport: &mut T,
    layout: QueueLayout,
    negotiated: Features,
    indirect: bool,
) -> Result<Rings<H>, InitError> {
    fn ring<H: Hal, T: Transport, const S: usize>(
        transport: &mut T,
        index: u16,
        indirect: bool,
    ) -> Result<Box<Ring<H, S>>, InitError> {
        Ring::new(transport, index, indirect)
            .map(Box::new)
            .map_err(|error| InitError::Queue { index, error })
    }
    let inflate = ring(transport, layout.inflate, indirect)?;
    let deflate = ring(transport, layout.deflate, indirect)?;
    let hint = match layout.hint {
        Some(i) if negotiated.contains(Features::FREE_PAGE_HINT) => {
            Some(ring(transport, i, indirect)?)
        }
        _ => None,
    };
    let reporting = match layout.reporting {
        Some(i) if negotiated.contains(Features::REPORTING) => Some(ring(transport, i, indirect)?),
        _ => None,
    };
    Ok((inflate, deflate, hint, reporting))
}

/// Queues `msg` under `tag` and polls until the device returns it (older messages that
/// timed out are dropped as they come back).
fn send_and_wait<H: Hal, T: Transport, const S: usize>(
    ring: &mut Ring<H, S>,
    transport: &mut T,
    mem: &RamMapping,
    limit: u64,
    tag: u64,
    msg: Box<[u8]>,
) -> Result<Used, TellError> {
    add_with_room(ring, transport, mem, tag, alloc::vec![Buf::Out(msg)])?;
    let mut polls = 0u64;
    loop {
        match ring.pop(mem).map_err(TellError::Ring)? {
            Some(used) if used.slot.tag == tag => return Ok(used),
            // A message that timed out earlier, back at last.
            Some(_) => continue,
            None => {}
        }
        if polls >= limit {
            return Err(TellError::Timeout);
        }
        polls += 1;
        core::hint::spin_loop();
    }
}

/// Adds a chain; when the queue is full of messages that timed out, pops those that came
/// back and tries once more.
fn add_with_room<H: Hal, T: Transport, const S: usize>(
    ring: &mut Ring<H, S>,
    transport: &mut T,
    mem: &RamMapping,
    tag: u64,
    bufs: Vec<Buf>,
) -> Result<(), TellError> {
    if ring.in_flight() >= S {
        while ring.pop(mem).map_err(TellError::Ring)?.is_some() {}
        if ring.in_flight() >= S {
            return Err(TellError::Ring(RingError::Queue(
                virtio_drivers::Error::QueueFull,
            )));
        }
    }
    ring.add(transport, mem, tag, bufs)
        .map(|_| ())
        .map_err(TellError::Ring)
}
