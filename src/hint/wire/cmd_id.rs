//! Free-page-hint command ids.

use core::fmt;

/// A free-page-hint command id (virtio `free_page_hint_cmd_id`): [`STOP`](Self::STOP),
/// [`DONE`](Self::DONE), or the id of one hinting run (2 and up).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CmdId(u32);

/// What a [`CmdId`] means.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CmdKind {
    /// Stop hinting (`VIRTIO_BALLOON_CMD_ID_STOP`); from the guest: "I am done sending".
    Stop,
    /// The host is done with the hints; the guest may reuse the pages it held
    /// (`VIRTIO_BALLOON_CMD_ID_DONE`).
    Done,
    /// Start (or, from the guest, acknowledge) hinting run number `n` (`n >= 2`).
    Run(u32),
}

/// Why a command id buffer was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CmdIdError {
    /// The buffer is not exactly 4 bytes (QEMU: "received an incorrect cmd id").
    BadLength,
}

hint_error_display!(CmdIdError {
    BadLength => "command id buffer is not 4 bytes",
});

impl CmdId {
    /// `VIRTIO_BALLOON_CMD_ID_STOP`.
    pub const STOP: Self = Self(0);
    /// `VIRTIO_BALLOON_CMD_ID_DONE`.
    pub const DONE: Self = Self(1);
    /// The first run id (QEMU `VIRTIO_BALLOON_FREE_PAGE_HINT_CMD_ID_MIN`).
    pub const FIRST_RUN: Self = Self(2);

    /// The id with this raw value (every `u32` is an id).
    pub const fn new(raw: u32) -> Self {
        Self(raw)
    }

    /// The raw value.
    pub const fn get(self) -> u32 {
        self.0
    }

    /// What the id means.
    pub const fn kind(self) -> CmdKind {
        match self.0 {
            0 => CmdKind::Stop,
            1 => CmdKind::Done,
            n => CmdKind::Run(n),
        }
    }

    /// The run id after this one: the next number, wrapping from `u32::MAX` to
    /// [`FIRST_RUN`](Self::FIRST_RUN) (QEMU `virtio_balloon_free_page_start`). STOP and DONE
    /// are followed by the first run.
    pub const fn next_run(self) -> Self {
        match self.0 {
            0 | 1 | u32::MAX => Self::FIRST_RUN,
            n => Self(n + 1),
        }
    }

    /// The 4 bytes on the wire.
    pub const fn to_bytes(self) -> [u8; 4] {
        self.0.to_le_bytes()
    }

    /// Reads an id from an untrusted buffer, which must be exactly 4 bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, CmdIdError> {
        <[u8; 4]>::try_from(bytes)
            .map(|b| Self(u32::from_le_bytes(b)))
            .map_err(|_| CmdIdError::BadLength)
    }
}

impl fmt::Display for CmdId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind() {
            CmdKind::Stop => f.write_str("STOP"),
            CmdKind::Done => f.write_str("DONE"),
            CmdKind::Run(n) => write!(f, "run {n}"),
        }
    }
}
