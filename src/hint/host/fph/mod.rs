//! The host's side of virtio `VIRTIO_BALLOON_F_FREE_PAGE_HINT`: during live migration the
//! guest names pages that are free, and the host skips sending them.
//!
//! # The protocol (QEMU `virtio-balloon.c`)
//! As Michael Tsirkin wrote it up in the thread of (Duyck, "[v1,6/6] virtio-balloon: Add
//! support for aerating memory via hinting", 2019-06-19,
//! <20190619223338.1231.52537.stgit@localhost.localdomain>):
//!
//! 1. The host **syncs** its migration dirty bitmap: KVM's write log is folded into it and
//!    cleared, and guest memory is write-protected again (QEMU `migration_bitmap_sync`).
//! 2. The host starts a **round**: a new command id (2 and up; [`CmdId::next_run`]) in the
//!    device's config space ([`FreePageHintSession::start_round`]).
//! 3. The guest sends that id on the free-page queue, then any number of (address, length)
//!    buffers, each naming memory that was free *at some point after it saw the id*. It may
//!    reuse a hinted page at once. When it has nothing more it sends [`CmdId::STOP`].
//! 4. For each hint of the current round the host clears the pages' bits in the dirty
//!    bitmap ([`FreePageHintSession::on_hint`]).
//! 5. Before the next sync the host **stops** the round ([`FreePageHintSession::stop`]);
//!    after migration it says [`CmdId::DONE`] and the guest frees what it held.
//!
//! # Why a reused page stays dirty (the race of the same thread)
//! Alexander Duyck feared that a page hinted, then reallocated and written *before the host
//! processed the hint*, would have its dirty bit cleared after the write and be lost. It is
//! not, because there are two structures: KVM's write log, which records every write since
//! the last sync, and the migration bitmap, which a sync fills from the log. A hint only
//! clears the *bitmap* of the round it belongs to:
//!
//! - processed before the next sync, it clears a bit that holds only writes from before the
//!   round started, which are dead (the page was free afterwards); the new write sits in the
//!   write log and the next sync sets the bit again;
//! - processed after the next sync, it would clear a bit the sync just set from the log.
//!   That hint belongs to an older round, so it is ignored: the session accepts hints only
//!   while its round runs, and a round never survives a sync — [`DirtyBitmap::sync_generation`]
//!   is checked on every hint, so even a host that forgets to call `stop` before syncing
//!   cannot clear a newer bitmap with an old hint.
//!
//! The tests replay both orderings, and a randomized migration in which the guest reuses
//! hinted pages immediately, and check that every page in use arrives intact; a host that
//! ignores rounds loses writes in the same replay.
//!
//! # Concurrency
//! `&mut self`; the embedder serializes queue processing, `stop` and `start_round` (QEMU
//! holds `free_page_lock` for the same purpose).

use super::layout::{GuestRamLayout, for_each_piece};
use super::receiver::RangeError;
use crate::addr::{Gfn, PAGE_SHIFT, PAGE_SIZE, PHYS_ADDR_BITS};
use crate::hint::wire::{ChainWalk, CmdId, CmdIdError};

/// The migration dirty bitmap of the embedder (QEMU `RAMBlock::bmap`).
pub trait DirtyBitmap {
    /// How many times the bitmap has been synced from the write log so far. It must change at
    /// every sync.
    fn sync_generation(&mut self) -> u64;

    /// Marks `frames` pages from `first` as not needing to be sent. The pages lie in one
    /// region of guest RAM.
    fn clear(&mut self, first: Gfn, frames: u64);
}

/// Where a session is (QEMU `free_page_hint_status`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HintState {
    /// No round runs (QEMU `FREE_PAGE_HINT_S_STOP`); config shows STOP.
    Stopped,
    /// A round was requested; hints wait until the guest echoes its id (`S_REQUESTED`).
    Requested(CmdId),
    /// The guest echoed the id: its hints clear bits (`S_START`).
    Running(CmdId),
    /// Migration is over; the guest may reuse what it held (`S_DONE`).
    Done,
}

/// What a command id from the guest did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CmdIdOutcome {
    /// It echoed the requested id: the round runs.
    Started,
    /// The guest ended the running round (STOP, or an id of another round).
    Finished,
    /// Stale or repeated: nothing changed.
    Ignored,
}

/// Why a hint cleared nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum HintIgnored {
    /// No round runs: the hint belongs to a stopped or older round.
    NotRunning,
    /// The bitmap was synced since the round started: the round is over.
    StaleRound,
    /// The range is malformed.
    Malformed(RangeError),
}

impl core::fmt::Display for HintIgnored {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NotRunning => f.write_str("free-page hint outside a running round"),
            Self::StaleRound => f.write_str("free-page hint from before the last bitmap sync"),
            Self::Malformed(e) => write!(f, "malformed free-page hint: {e}"),
        }
    }
}

impl core::error::Error for HintIgnored {}

/// What an applied hint cleared.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct HintApplied {
    /// Pages whose bits were cleared.
    pub frames: u64,
    /// Bytes of the hint outside guest RAM.
    pub outside: u64,
}

/// Counters of a session.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct HintStats {
    /// Rounds started.
    pub rounds: u64,
    /// Hints applied.
    pub applied: u64,
    /// Hints ignored because no round ran or the round was stale.
    pub stale: u64,
    /// Hints ignored as malformed (and chain entries that did not decode).
    pub malformed: u64,
    /// Bits cleared.
    pub frames_cleared: u64,
}

/// The host's free-page-hint state machine; see the module docs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FreePageHintSession {
    state: HintState,
    last_run: CmdId,
    round_generation: u64,
    stats: HintStats,
}

impl Default for FreePageHintSession {
    fn default() -> Self {
        Self::new()
    }
}

impl FreePageHintSession {
    /// A session with no round; the first round gets id 2.
    pub const fn new() -> Self {
        Self {
            state: HintState::Stopped,
            last_run: CmdId::STOP,
            round_generation: 0,
            stats: HintStats {
                rounds: 0,
                applied: 0,
                stale: 0,
                malformed: 0,
                frames_cleared: 0,
            },
        }
    }

    /// Where the session is.
    pub fn state(&self) -> HintState {
        self.state
    }

    /// The counters.
    pub fn stats(&self) -> &HintStats {
        &self.stats
    }

    /// Starts a round right after the embedder synced `bitmap` (QEMU
    /// `virtio_balloon_free_page_start` on `PRECOPY_NOTIFY_AFTER_BITMAP_SYNC`). Returns the
    /// id to put in the config space and notify the guest of.
    pub fn start_round<B: DirtyBitmap + ?Sized>(&mut self, bitmap: &mut B) -> CmdId {
        let id = self.last_run.next_run();
        self.last_run = id;
        self.round_generation = bitmap.sync_generation();
        self.state = HintState::Requested(id);
        self.stats.rounds += 1;
        id
    }

    /// Ends the round before the embedder syncs its bitmap (QEMU
    /// `virtio_balloon_free_page_stop` on `PRECOPY_NOTIFY_BEFORE_BITMAP_SYNC`); config shows
    /// STOP. Does nothing once done.
    pub fn stop(&mut self) {
        if self.state != HintState::Done {
            self.state = HintState::Stopped;
        }
    }

    /// Migration is over (QEMU `virtio_balloon_free_page_done`); config shows DONE.
    pub fn done(&mut self) {
        self.state = HintState::Done;
    }

    /// The value of the config field `free_page_hint_cmd_id`.
    pub fn config_cmd_id(&self) -> CmdId {
        match self.state {
            HintState::Requested(id) | HintState::Running(id) => id,
            HintState::Stopped => CmdId::STOP,
            HintState::Done => CmdId::DONE,
        }
    }

    /// A command id the guest sent on the free-page queue (QEMU `get_free_page_hints`).
    pub fn on_guest_cmd_id(&mut self, id: CmdId) -> CmdIdOutcome {
        match self.state {
            HintState::Requested(want) if id == want => {
                self.state = HintState::Running(want);
                CmdIdOutcome::Started
            }
            HintState::Running(cur) if id == cur => CmdIdOutcome::Ignored,
            HintState::Running(_) => {
                // STOP, or an id of another round: either way this round is over. (QEMU
                // stops on any id once started; a STOP before the start is a stale one
                // from the previous round and is ignored below.)
                self.state = HintState::Stopped;
                CmdIdOutcome::Finished
            }
            _ => CmdIdOutcome::Ignored,
        }
    }

    /// Decodes an untrusted command-id buffer and handles it.
    pub fn on_guest_cmd_buffer(&mut self, bytes: &[u8]) -> Result<CmdIdOutcome, CmdIdError> {
        CmdId::decode(bytes).map(|id| self.on_guest_cmd_id(id))
    }

    /// One hinted range `[addr, addr + len)` from the guest: clears the bits of its whole
    /// pages inside guest RAM in `bitmap`, if it belongs to the running round.
    pub fn on_hint<L, B>(
        &mut self,
        addr: u64,
        len: u64,
        layout: &mut L,
        bitmap: &mut B,
    ) -> Result<HintApplied, HintIgnored>
    where
        L: GuestRamLayout + ?Sized,
        B: DirtyBitmap + ?Sized,
    {
        let r = self.hint(addr, len, layout, bitmap);
        match r {
            Ok(a) => {
                self.stats.applied += 1;
                self.stats.frames_cleared += a.frames;
            }
            Err(HintIgnored::Malformed(_)) => self.stats.malformed += 1,
            Err(_) => self.stats.stale += 1,
        }
        r
    }

    fn hint<L, B>(
        &mut self,
        addr: u64,
        len: u64,
        layout: &mut L,
        bitmap: &mut B,
    ) -> Result<HintApplied, HintIgnored>
    where
        L: GuestRamLayout + ?Sized,
        B: DirtyBitmap + ?Sized,
    {
        if !matches!(self.state, HintState::Running(_)) {
            return Err(HintIgnored::NotRunning);
        }
        if bitmap.sync_generation() != self.round_generation {
            // Synced without `stop`: the round is over, and stays over.
            self.state = HintState::Stopped;
            return Err(HintIgnored::StaleRound);
        }
        let malformed = |e| Err(HintIgnored::Malformed(e));
        if len == 0 {
            return malformed(RangeError::Empty);
        }
        if addr % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 {
            return malformed(RangeError::Unaligned);
        }
        let Some(end) = addr.checked_add(len) else {
            return malformed(RangeError::Overflow);
        };
        if end > 1 << PHYS_ADDR_BITS {
            return malformed(RangeError::BeyondPhysical);
        }
        let mut frames = 0;
        let outside = for_each_piece(layout, addr, end, |piece| {
            // Pieces of a 4 KiB aligned range are 4 KiB aligned and below 2^52.
            let first = piece.start >> PAGE_SHIFT;
            let n = (piece.end - piece.start) >> PAGE_SHIFT;
            if let Ok(gfn) = Gfn::new(first) {
                bitmap.clear(gfn, n);
                frames += n;
            }
        });
        Ok(HintApplied { frames, outside })
    }

    /// A buffer chain of hints (QEMU: the `in_sg` entries of one element). Returns the
    /// pages cleared; entries of a stale round and malformed ones are counted in the stats.
    pub fn on_hint_chain<L, B>(
        &mut self,
        chain: ChainWalk<'_>,
        layout: &mut L,
        bitmap: &mut B,
    ) -> u64
    where
        L: GuestRamLayout + ?Sized,
        B: DirtyBitmap + ?Sized,
    {
        let mut frames = 0;
        for entry in chain {
            match entry {
                Ok(e) => {
                    if let Ok(a) = self.on_hint(e.addr, u64::from(e.len), layout, bitmap) {
                        frames += a.frames;
                    }
                }
                Err(_) => self.stats.malformed += 1,
            }
        }
        frames
    }
}

#[cfg(test)]
mod tests;
