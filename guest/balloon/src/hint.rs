//! Free page hinting (virtio 1.2 5.5.6.5; Linux `virtio_balloon_report_free_page`,
//! `send_cmd_id_start`, `send_free_pages`, `send_cmd_id_stop`, `return_free_pages_to_mm`).
//!
//! A run, driven by the embedder's idle loop:
//! 1. [`hint_pending`](VirtIOBalloon::hint_pending) finds a run id (>= 2) the guest has
//!    not answered: [`hint_begin`](VirtIOBalloon::hint_begin) queues it (an `le32`
//!    device-readable buffer).
//! 2. The guest allocates free blocks and holds them; [`hint_block`](VirtIOBalloon::hint_block)
//!    queues each as a device-writable buffer, recycling buffers the host returned. One queue
//!    entry stays free for STOP (Linux `vq->num_free > 1`). A block refused with
//!    [`HintError::QueueFull`] was not queued (Linux frees it unhinted); one refused with
//!    [`HintError::Stopped`] too: the host moved on. While hinting runs QEMU's config shows 0
//!    (its START state has no id to show); the driver tells that from a real STOP by the
//!    config generation, which QEMU bumps on every change it announces.
//! 3. [`hint_end`](VirtIOBalloon::hint_end) queues STOP (0).
//! 4. When the command id becomes DONE (1) and every buffer is back,
//!    [`hint_done`](VirtIOBalloon::hint_done) says so: the guest frees the blocks.
//!
//! The host does not write the blocks (QEMU only clears their dirty bits), but it owns each
//! buffer until it returns it, so a block is freed only after [`hint_done`] said `true`.
//!
//! [`hint_done`]: VirtIOBalloon::hint_done

use alloc::boxed::Box;
use alloc::vec;

use hvmem::hint::wire::{CmdId, CmdKind};
use virtio_drivers::Hal;
use virtio_drivers::transport::Transport;

use crate::device::VirtIOBalloon;
use crate::error::{ConfigError, HintError, RingError};
use crate::features::{Features, config, queue_size};
use crate::ring::{Buf, Used};

/// Where the guest is in the free page hint protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HintState {
    /// No run since the last DONE (or ever).
    Idle,
    /// Run `id` is open: its id was queued, blocks may follow.
    Running(CmdId),
    /// Run `id` was ended with STOP; its blocks are held until DONE.
    Ended(CmdId),
}

/// Tags of the hint queue's buffers.
const TAG_CMD: u64 = 0;
const TAG_BLOCK: u64 = 1;

impl<H: Hal, T: Transport> VirtIOBalloon<H, T> {
    /// The device's free page hint command id (`free_page_hint_cmd_id`): STOP (0), DONE (1)
    /// or a run id (>= 2).
    pub fn hint_cmd_id(&self) -> Result<CmdId, ConfigError> {
        if !self.features().contains(Features::FREE_PAGE_HINT) {
            return Err(ConfigError::NotNegotiated);
        }
        self.read_config(config::FREE_PAGE_HINT_CMD_ID)
            .map(CmdId::new)
    }

    /// The run id the device asks for now, if the guest has not answered it yet: a run id
    /// (2 or more) other than the last one [`hint_begin`](Self::hint_begin) accepted. What the
    /// idle loop checks before opening a run (Linux `virtio_balloon_queue_free_page_work`).
    pub fn hint_pending(&self) -> Result<Option<CmdId>, ConfigError> {
        let id = self.hint_cmd_id()?;
        Ok(match id.kind() {
            CmdKind::Run(_) if self.hint_last != Some(id) => Some(id),
            _ => None,
        })
    }

    /// Where the guest is in the protocol.
    pub fn hint_state(&self) -> HintState {
        self.hint_state
    }

    /// Hint buffers (the id, blocks, STOP) the host has not returned yet.
    pub fn hint_in_flight(&self) -> usize {
        self.hint.as_ref().map_or(0, |r| r.in_flight())
    }

    /// Opens run `id` (Linux `send_cmd_id_start`): `id` must be the device's current command
    /// id and a run id (>= 2). A previous run must have been ended; its blocks may still be
    /// held (they stay the guest's until DONE).
    pub fn hint_begin(&mut self, id: CmdId) -> Result<(), HintError> {
        if self.hint.is_none() {
            return Err(HintError::NotNegotiated);
        }
        if let HintState::Running(_) = self.hint_state {
            return Err(HintError::AlreadyRunning);
        }
        // The generation first: a change after it shows up as a newer generation later.
        let generation = self.transport.read_config_generation();
        let current = self.hint_cmd_id().map_err(HintError::Config)?;
        let target = self.target_pages().map_err(HintError::Config)?;
        if id != current || !matches!(id.kind(), CmdKind::Run(_)) {
            return Err(HintError::NotRequested { id, current });
        }
        if self.hint_last == Some(id) {
            return Err(HintError::AlreadyAnswered { id });
        }
        self.queue_cmd(id, true)?;
        self.hint_state = HintState::Running(id);
        self.hint_last = Some(id);
        self.hint_generation = generation;
        self.hint_target = target;
        Ok(())
    }

    /// Queues the held free block `[pa, pa + len)` as a hint of the open run (Linux
    /// `get_free_page_and_send`). The block must stay allocated and untouched until
    /// [`hint_done`](Self::hint_done) says `true` ([`RamMapping`](crate::RamMapping)'s
    /// contract). Refused, with nothing queued: [`HintError::NotRunning`],
    /// [`HintError::Stopped`] (the device's id changed: end the run),
    /// [`HintError::QueueFull`] (after recycling what the host returned), [`HintError::BadBlock`].
    pub fn hint_block(&mut self, pa: u64, len: u64) -> Result<(), HintError> {
        if self.hint.is_none() {
            return Err(HintError::NotNegotiated);
        }
        let HintState::Running(id) = self.hint_state else {
            return Err(HintError::NotRunning);
        };
        let len = u32::try_from(len).map_err(|_| HintError::BadBlock)?;
        if len == 0 {
            return Err(HintError::BadBlock);
        }
        let now = self.hint_cmd_id().map_err(HintError::Config)?;
        if now != id && (now != CmdId::STOP || self.host_stopped_run()?) {
            return Err(HintError::Stopped { now });
        }
        // Keep one entry for STOP.
        if self.hint_in_flight() + 2 > queue_size::HINT {
            self.poll_hint()?;
            if self.hint_in_flight() + 2 > queue_size::HINT {
                self.kick_hint();
                return Err(HintError::QueueFull);
            }
        }
        let ring = self.hint.as_mut().ok_or(HintError::NotNegotiated)?;
        ring.add(
            &mut self.transport,
            &self.mem,
            TAG_BLOCK,
            vec![Buf::Ram { pa, len }],
        )
        .map_err(HintError::Ring)?;
        self.stats.hint_blocks += 1;
        self.stats.hint_bytes += u64::from(len);
        Ok(())
    }

    /// Ends the open run with STOP (Linux `send_cmd_id_stop`). The blocks stay held.
    pub fn hint_end(&mut self) -> Result<(), HintError> {
        if self.hint.is_none() {
            return Err(HintError::NotNegotiated);
        }
        let HintState::Running(id) = self.hint_state else {
            return Err(HintError::NotRunning);
        };
        self.queue_cmd(CmdId::STOP, false)?;
        self.hint_state = HintState::Ended(id);
        Ok(())
    }

    /// Recycles the hint buffers the host returned; returns how many. A used length longer
    /// than the buffer fails with [`HintError::BadUsedLength`] (that buffer is recycled; poll
    /// again for the rest).
    pub fn poll_hint(&mut self) -> Result<usize, HintError> {
        let ring = self.hint.as_mut().ok_or(HintError::NotNegotiated)?;
        let mut n = 0;
        while let Some(Used { slot, len }) = ring.pop(&self.mem).map_err(HintError::Ring)? {
            n += 1;
            if u64::from(len) > slot.writable_bytes() {
                return Err(HintError::BadUsedLength { len });
            }
        }
        Ok(n)
    }

    /// Recycles returned buffers, then says whether the guest may free the blocks of the
    /// ended run: the command id is DONE and the host returned every buffer (Linux
    /// `return_free_pages_to_mm` on `VIRTIO_BALLOON_CMD_ID_DONE`). When it returns `true`
    /// the state goes back to [`HintState::Idle`]. Also `true` (and nothing to free) when no
    /// run was opened.
    pub fn hint_done(&mut self) -> Result<bool, HintError> {
        match self.hint_state {
            HintState::Idle => return Ok(true),
            HintState::Running(_) => return Ok(false),
            HintState::Ended(_) => {}
        }
        let popped = self.poll_hint()?;
        let now = self.hint_cmd_id().map_err(HintError::Config)?;
        if now == CmdId::DONE && self.hint_in_flight() == 0 {
            self.hint_state = HintState::Idle;
            return Ok(true);
        }
        if now == CmdId::DONE && popped == 0 {
            self.kick_hint();
        }
        Ok(false)
    }

    /// Whether the device announced a config change since the open run began. QEMU's
    /// config shows no id while hinting is under way (its START state leaves the field 0,
    /// which reads as STOP), and every change it announces (STOP, DONE, a new id, a new
    /// target) bumps the config generation; so a STOP read under the run's generation is the
    /// run going on (Linux caches the id and rereads it only on a config interrupt). A
    /// legacy transport has no generation: there a host STOP is seen only when the config
    /// shows something else, and QEMU ignores blocks it gets after stopping.
    ///
    /// A change whose visible part is a new balloon target (`num_pages`, announced the same
    /// way) does not end the run: its generation becomes the run's and hinting goes on. Had
    /// a STOP come with it, the blocks sent after are ones QEMU ignores, and the run ends at
    /// DONE: fewer pages skipped by the migration, never a wrong one. (Ending the run at any
    /// bump, as before, stopped hinting early whenever the target moved during a migration.)
    fn host_stopped_run(&mut self) -> Result<bool, HintError> {
        let generation = self.transport.read_config_generation();
        if generation == self.hint_generation {
            return Ok(false);
        }
        let target = self.target_pages().map_err(HintError::Config)?;
        if target != self.hint_target {
            self.hint_generation = generation;
            self.hint_target = target;
            return Ok(false);
        }
        Ok(true)
    }

    /// Notifies the hint queue unconditionally: QEMU turns notifications off while its
    /// iothread polls the queue and back on after its last pop, without looking again, so a
    /// buffer added in between waits for the next notification. Waiting for buffers to come
    /// back (a full queue, DONE with buffers out) therefore kicks.
    fn kick_hint(&mut self) {
        if let Some(r) = self.hint.as_ref() {
            r.kick(&mut self.transport);
        }
    }

    /// Queues a command id buffer; `keep_stop` keeps one more entry free for the STOP that
    /// must follow.
    fn queue_cmd(&mut self, id: CmdId, keep_stop: bool) -> Result<(), HintError> {
        let need = if keep_stop { 2 } else { 1 };
        if self.hint_in_flight() + need > queue_size::HINT {
            self.poll_hint()?;
            if self.hint_in_flight() + need > queue_size::HINT {
                self.kick_hint();
                return Err(HintError::QueueFull);
            }
        }
        let ring = self.hint.as_mut().ok_or(HintError::NotNegotiated)?;
        let bytes: Box<[u8]> = Box::new(id.to_bytes());
        ring.add(
            &mut self.transport,
            &self.mem,
            TAG_CMD,
            vec![Buf::Out(bytes)],
        )
        .map(|_| ())
        .map_err(|e| match e {
            RingError::Queue(virtio_drivers::Error::QueueFull) => HintError::QueueFull,
            e => HintError::Ring(e),
        })
    }
}
