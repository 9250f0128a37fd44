//! Wire formats between a guest's hinting code and the host: what the bytes on a virtqueue
//! look like, encoded by the guest and decoded, untrusted, by the host.
//!
//! Everything is little-endian: virtio 1.x is little-endian, and the balloon's config space
//! is little-endian even for legacy devices (Linux `virtio_cread_le` in
//! `virtio_balloon_cmd_id_received`).
//!
//! - **Reporting scatter entries** (virtio `VIRTIO_BALLOON_F_REPORTING`; Linux
//!   `virtballoon_free_page_report` adds a batch as one chain of device-writable buffers with
//!   `virtqueue_add_inbuf`): each entry is an (address, length) pair. On a split virtqueue an
//!   entry lives in a 16-byte descriptor, [`VirtqDesc`]: `le64 addr, le32 len, le16 flags,
//!   le16 next`. [`walk_chain`] follows a chain through an untrusted descriptor table (QEMU
//!   `virtqueue_pop`, vm-virtio `DescriptorChain`): indices are bounds-checked, loops end
//!   with an error, indirect descriptors and unknown flags are refused.
//! - **`pa | order` hints** (seed 003's aerator, `page_to_hints_pa_order`): one `u64` per
//!   block, the block's physical address with the order (in 4 KiB units) in the low
//!   [`VIRTIO_BALLOON_PFN_SHIFT`] bits, which the address's alignment leaves free. The order
//!   of any block that fits in 64 bits is below `64 - 12 = 52 < 4096`, which is the
//!   `BUILD_BUG_ON` of the seed, a [`const_assert!`] here.
//! - **Balloon PFN arrays** (inflate and deflate queues): `le32` frame numbers in 4 KiB units
//!   (`VIRTIO_BALLOON_PFN_SHIFT`), whatever the guest's page size. A block of order `k` is
//!   `2^k` consecutive entries. [`PfnRuns`] gives the host maximal runs of consecutive frames
//!   so it can discard a whole 2 MiB page with one call (Firecracker's
//!   `compact_page_frame_numbers`, without the sort, which would need a buffer).
//! - **Free-page-hint command ids** (`VIRTIO_BALLOON_F_FREE_PAGE_HINT`): `le32`;
//!   [`CmdId::STOP`] = 0, [`CmdId::DONE`] = 1, 2 and up name one hinting run.
//!
//! Decoders never read past their input, never panic, and say what was wrong with a small
//! error enum per format; encoders refuse what the format cannot express.

use core::fmt;

use static_assertions::const_assert;

use crate::addr::{FRAME_LIMIT, PAGE_SHIFT, PAGE_SIZE, Pfn};
use crate::buddy::Block;

/// Implements `Display` (one fixed text per variant) and `core::error::Error` for the error
/// enums of the host-side hint modules.
macro_rules! hint_error_display {
    ($ty:ident { $($variant:ident => $text:literal,)* }) => {
        impl core::fmt::Display for $ty {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                f.write_str(match self {
                    $(Self::$variant => $text,)*
                })
            }
        }

        impl core::error::Error for $ty {}
    };
}
pub(crate) use hint_error_display;

/// The balloon's frame numbers are in 4 KiB units, whatever the guest's page size (virtio
/// `VIRTIO_BALLOON_PFN_SHIFT`).
pub const VIRTIO_BALLOON_PFN_SHIFT: u32 = 12;
const_assert!(VIRTIO_BALLOON_PFN_SHIFT == PAGE_SHIFT);

// ---------------------------------------------------------------------------------------------
// Scatter entries and descriptor chains
// ---------------------------------------------------------------------------------------------

/// Descriptor flag: the chain continues at `next` (virtio `VIRTQ_DESC_F_NEXT`).
pub const VIRTQ_DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer (virtio `VIRTQ_DESC_F_WRITE`).
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
/// Descriptor flag: the buffer is a table of descriptors (virtio `VIRTQ_DESC_F_INDIRECT`).
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;
/// Bytes in one split-virtqueue descriptor.
pub const VIRTQ_DESC_SIZE: usize = 16;
/// The largest queue a split virtqueue may have (virtio: `Queue Size` ≤ 32768).
pub const VIRTQ_MAX_SIZE: usize = 32768;

/// One (address, length) buffer of a report: a free block the guest hands to the host
/// (Linux: one `scatterlist` entry of `page_reporting_cycle`'s batch).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ScatterEntry {
    /// Guest physical address of the first byte.
    pub addr: u64,
    /// Length in bytes (a descriptor's length is 32 bits).
    pub len: u32,
}

impl ScatterEntry {
    /// The entry that reports a buddy block: its address and byte length. Fails for blocks
    /// of 4 GiB and more, whose length a descriptor cannot hold.
    pub fn from_block(block: &Block) -> Result<Self, EncodeError> {
        let len = u32::try_from(block.order.bytes()).map_err(|_| EncodeError::TooLarge)?;
        Ok(Self {
            addr: block.pfn.addr().get(),
            len,
        })
    }
}

/// A split-virtqueue descriptor (virtio `struct virtq_desc`), 16 bytes on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct VirtqDesc {
    /// The buffer.
    pub entry: ScatterEntry,
    /// `VIRTQ_DESC_F_*` bits.
    pub flags: u16,
    /// Index of the next descriptor when `flags` has [`VIRTQ_DESC_F_NEXT`].
    pub next: u16,
}

impl VirtqDesc {
    /// The 16 bytes of the descriptor: `le64 addr, le32 len, le16 flags, le16 next`.
    pub fn to_bytes(&self) -> [u8; VIRTQ_DESC_SIZE] {
        let mut b = [0; VIRTQ_DESC_SIZE];
        b[0..8].copy_from_slice(&self.entry.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.entry.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..16].copy_from_slice(&self.next.to_le_bytes());
        b
    }

    /// Reads a descriptor from its 16 bytes. Every bit pattern is a descriptor; whether it
    /// makes sense is for [`walk_chain`] to judge.
    pub fn from_bytes(b: &[u8; VIRTQ_DESC_SIZE]) -> Self {
        let [
            a0,
            a1,
            a2,
            a3,
            a4,
            a5,
            a6,
            a7,
            l0,
            l1,
            l2,
            l3,
            f0,
            f1,
            n0,
            n1,
        ] = *b;
        Self {
            entry: ScatterEntry {
                addr: u64::from_le_bytes([a0, a1, a2, a3, a4, a5, a6, a7]),
                len: u32::from_le_bytes([l0, l1, l2, l3]),
            },
            flags: u16::from_le_bytes([f0, f1]),
            next: u16::from_le_bytes([n0, n1]),
        }
    }
}

/// Who writes the buffers of a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// The device (host) writes them: `virtqueue_add_inbuf`, used by page reporting and by
    /// free-page hints.
    DeviceWrites,
    /// The device reads them: `virtqueue_add_outbuf`, used by balloon PFN arrays and command
    /// ids.
    DeviceReads,
}

/// Why a descriptor chain was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DescError {
    /// The table is empty, larger than [`VIRTQ_MAX_SIZE`] descriptors, or not a whole number
    /// of 16-byte descriptors.
    BadTable,
    /// The head or a `next` index is outside the table.
    IndexOutOfRange,
    /// The chain is longer than the table: it loops.
    Loop,
    /// An indirect descriptor; reporting and hinting chains never use them.
    Indirect,
    /// Flag bits virtio does not define.
    UnknownFlags,
    /// A buffer the device reads where it must write, or the reverse.
    WrongDirection,
    /// The encoder's table has no room for the chain.
    TableTooSmall,
}

hint_error_display!(DescError {
    BadTable => "descriptor table is empty, too large or not a whole number of descriptors",
    IndexOutOfRange => "descriptor index outside the table",
    Loop => "descriptor chain loops",
    Indirect => "indirect descriptor where none is allowed",
    UnknownFlags => "descriptor has flag bits virtio does not define",
    WrongDirection => "descriptor buffer has the wrong direction",
    TableTooSmall => "descriptor table too small for the chain",
});

/// Writes `entries` as one chain into the descriptor table `table` (16 bytes per slot),
/// starting at slot `first` and linking `first, first + 1, ...` (what a direct
/// `virtqueue_add_inbuf` on an empty split queue produces). Returns the head index.
pub fn encode_chain(
    entries: &[ScatterEntry],
    direction: Direction,
    table: &mut [u8],
    first: u16,
) -> Result<u16, DescError> {
    let slots = table.len() / VIRTQ_DESC_SIZE;
    if entries.is_empty() || slots == 0 || slots > VIRTQ_MAX_SIZE {
        return Err(DescError::BadTable);
    }
    let start = usize::from(first);
    if start + entries.len() > slots {
        return Err(DescError::TableTooSmall);
    }
    let write = match direction {
        Direction::DeviceWrites => VIRTQ_DESC_F_WRITE,
        Direction::DeviceReads => 0,
    };
    for (i, (entry, slot)) in entries
        .iter()
        .zip(table.chunks_exact_mut(VIRTQ_DESC_SIZE).skip(start))
        .enumerate()
    {
        let last = i + 1 == entries.len();
        let desc = VirtqDesc {
            entry: *entry,
            flags: write | if last { 0 } else { VIRTQ_DESC_F_NEXT },
            // `start + i + 1 < slots <= 32768` for every non-last entry, so it fits.
            next: if last { 0 } else { (start + i + 1) as u16 },
        };
        slot.copy_from_slice(&desc.to_bytes());
    }
    Ok(first)
}

/// Starts walking the chain at `head` through the untrusted descriptor table `table`; every
/// buffer must have `direction`. The table itself is checked here, each descriptor as the
/// walk reaches it.
pub fn walk_chain(
    table: &[u8],
    head: u16,
    direction: Direction,
) -> Result<ChainWalk<'_>, DescError> {
    let slots = table.len() / VIRTQ_DESC_SIZE;
    if slots == 0 || slots > VIRTQ_MAX_SIZE || table.len() % VIRTQ_DESC_SIZE != 0 {
        return Err(DescError::BadTable);
    }
    if usize::from(head) >= slots {
        return Err(DescError::IndexOutOfRange);
    }
    Ok(ChainWalk {
        table,
        next: Some(head),
        seen: 0,
        direction,
    })
}

/// An iterator over the buffers of one descriptor chain; see [`walk_chain`]. After the first
/// error it yields nothing more.
#[derive(Clone, Debug)]
pub struct ChainWalk<'a> {
    table: &'a [u8],
    next: Option<u16>,
    seen: usize,
    direction: Direction,
}

impl ChainWalk<'_> {
    fn step(&mut self, idx: u16) -> Result<ScatterEntry, DescError> {
        let slots = self.table.len() / VIRTQ_DESC_SIZE;
        self.seen += 1;
        if self.seen > slots {
            return Err(DescError::Loop);
        }
        let at = usize::from(idx) * VIRTQ_DESC_SIZE;
        let bytes = self
            .table
            .get(at..at + VIRTQ_DESC_SIZE)
            .and_then(|s| <&[u8; VIRTQ_DESC_SIZE]>::try_from(s).ok())
            .ok_or(DescError::IndexOutOfRange)?;
        let desc = VirtqDesc::from_bytes(bytes);
        let known = VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_INDIRECT;
        if desc.flags & !known != 0 {
            return Err(DescError::UnknownFlags);
        }
        if desc.flags & VIRTQ_DESC_F_INDIRECT != 0 {
            return Err(DescError::Indirect);
        }
        let writes = desc.flags & VIRTQ_DESC_F_WRITE != 0;
        if writes != (self.direction == Direction::DeviceWrites) {
            return Err(DescError::WrongDirection);
        }
        if desc.flags & VIRTQ_DESC_F_NEXT != 0 {
            if usize::from(desc.next) >= slots {
                return Err(DescError::IndexOutOfRange);
            }
            self.next = Some(desc.next);
        }
        Ok(desc.entry)
    }
}

impl Iterator for ChainWalk<'_> {
    type Item = Result<ScatterEntry, DescError>;

    fn next(&mut self) -> Option<Self::Item> {
        let idx = self.next.take()?;
        Some(self.step(idx).inspect_err(|_| self.next = None))
    }
}

impl core::iter::FusedIterator for ChainWalk<'_> {}

// ---------------------------------------------------------------------------------------------
// pa | order hints
// ---------------------------------------------------------------------------------------------

/// The low bits of a `pa | order` hint that hold the order.
pub const HINT_ORDER_MASK: u64 = (1 << VIRTIO_BALLOON_PFN_SHIFT) - 1;
/// The largest order a `pa | order` hint can name: a block of `4096 << 51` bytes is the
/// largest power of two a `u64` length holds.
pub const HINT_MAX_ORDER: u8 = (64 - VIRTIO_BALLOON_PFN_SHIFT - 1) as u8;
// The seed's `BUILD_BUG_ON((64 - VIRTIO_BALLOON_PFN_SHIFT) >= (1 << VIRTIO_BALLOON_PFN_SHIFT))`:
// every order that fits in 64 bits fits in the bits below the frame number.
const_assert!((64 - VIRTIO_BALLOON_PFN_SHIFT) < (1 << VIRTIO_BALLOON_PFN_SHIFT));
const_assert!((HINT_MAX_ORDER as u64) <= HINT_ORDER_MASK);

/// Why a `pa | order` hint was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum HintError {
    /// The address is not aligned to the block the order names (or not to 4 KiB).
    Unaligned,
    /// The order is above [`HINT_MAX_ORDER`].
    OrderTooLarge,
    /// The block runs past the end of the 64-bit address space.
    Overflow,
    /// The buffer is not a whole number of 8-byte hints.
    TrailingBytes,
}

hint_error_display!(HintError {
    Unaligned => "hint address not aligned to its block",
    OrderTooLarge => "hint order too large",
    Overflow => "hinted block runs past the address space",
    TrailingBytes => "hint buffer is not a whole number of 8-byte hints",
});

/// A naturally aligned block named by its address and order, as seed 003's
/// `page_to_hints_pa_order` sends it: `pa | order`, order in 4 KiB units.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PaOrderHint {
    addr: u64,
    order: u8,
}

impl PaOrderHint {
    /// A hint for the block of `4096 << order` bytes at `addr`, which must be aligned to it.
    pub const fn new(addr: u64, order: u8) -> Result<Self, HintError> {
        if order > HINT_MAX_ORDER {
            return Err(HintError::OrderTooLarge);
        }
        let len = PAGE_SIZE << order;
        if addr & (len - 1) != 0 {
            return Err(HintError::Unaligned);
        }
        // Aligned and below 2^64: `addr + len <= 2^64`, and `== 2^64` only for the last block.
        if addr.checked_add(len - 1).is_none() {
            return Err(HintError::Overflow);
        }
        Ok(Self { addr, order })
    }

    /// The hint for a buddy block (always representable).
    pub fn from_block(block: &Block) -> Self {
        Self {
            addr: block.pfn.addr().get(),
            order: block.order.get(),
        }
    }

    /// The address of the block's first byte.
    pub const fn addr(self) -> u64 {
        self.addr
    }

    /// The order, in 4 KiB units.
    pub const fn order(self) -> u8 {
        self.order
    }

    /// The block's length in bytes.
    pub const fn len(self) -> u64 {
        PAGE_SIZE << self.order
    }

    /// Always `false`: a block holds at least one page (for clippy's `len_without_is_empty`).
    pub const fn is_empty(self) -> bool {
        false
    }

    /// The `u64` on the wire: `addr | order`.
    pub const fn encode(self) -> u64 {
        self.addr | self.order as u64
    }

    /// Reads a hint from its `u64`, refusing what no aligned block encodes.
    pub const fn decode(raw: u64) -> Result<Self, HintError> {
        let order = raw & HINT_ORDER_MASK;
        if order > HINT_MAX_ORDER as u64 {
            return Err(HintError::OrderTooLarge);
        }
        Self::new(raw & !HINT_ORDER_MASK, order as u8)
    }

    /// The 8 bytes on the wire.
    pub const fn to_bytes(self) -> [u8; 8] {
        self.encode().to_le_bytes()
    }
}

/// Decodes a buffer of `le64` hints. Each hint decodes on its own, so one bad hint does not
/// hide the others; a buffer that is not a whole number of hints ends with
/// [`HintError::TrailingBytes`].
pub fn decode_hints(bytes: &[u8]) -> HintIter<'_> {
    HintIter { bytes }
}

/// The iterator of [`decode_hints`].
#[derive(Clone, Debug)]
pub struct HintIter<'a> {
    bytes: &'a [u8],
}

impl Iterator for HintIter<'_> {
    type Item = Result<PaOrderHint, HintError>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.bytes.split_first_chunk::<8>() {
            Some((raw, rest)) => {
                self.bytes = rest;
                Some(PaOrderHint::decode(u64::from_le_bytes(*raw)))
            }
            None if self.bytes.is_empty() => None,
            None => {
                self.bytes = &[];
                Some(Err(HintError::TrailingBytes))
            }
        }
    }
}

impl core::iter::FusedIterator for HintIter<'_> {}

// ---------------------------------------------------------------------------------------------
// Balloon PFN arrays
// ---------------------------------------------------------------------------------------------

/// Why a PFN array was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PfnError {
    /// The buffer is not a whole number of 4-byte frame numbers.
    TrailingBytes,
}

hint_error_display!(PfnError {
    TrailingBytes => "PFN buffer is not a whole number of 4-byte frame numbers",
});

/// Why an encoder refused its input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum EncodeError {
    /// The value does not fit the field: a frame number above `u32::MAX`, or a block of
    /// 4 GiB or more in a 32-bit length.
    TooLarge,
}

hint_error_display!(EncodeError {
    TooLarge => "value too large for its wire field",
});

/// The 4 KiB frames of `blocks`, in order: what a balloon message lists for them.
pub fn block_pfns(blocks: &[Block]) -> impl Iterator<Item = Pfn> + '_ {
    blocks.iter().flat_map(|b| {
        let first = b.pfn.get();
        // A block from the buddy never reaches FRAME_LIMIT; a hand-made one stops there.
        (first..first + b.order.frames()).map_while(|f| Pfn::new(f).ok())
    })
}

/// Writes frame numbers from `pfns` as `le32` into `out` until it is full or `pfns` ends
/// (Linux `set_page_pfns` into `vb->pfns`). Returns how many it wrote. A frame number above
/// `u32::MAX` (a guest above 16 TiB) fails with [`EncodeError::TooLarge`] and stays in
/// `pfns`; the entries written before it are in `out` but not counted.
pub fn encode_pfns(
    pfns: &mut core::iter::Peekable<impl Iterator<Item = Pfn>>,
    out: &mut [u8],
) -> Result<usize, EncodeError> {
    let mut written = 0;
    for slot in out.chunks_exact_mut(4) {
        let Some(pfn) = pfns.peek() else { break };
        let raw = u32::try_from(pfn.get()).map_err(|_| EncodeError::TooLarge)?;
        slot.copy_from_slice(&raw.to_le_bytes());
        pfns.next();
        written += 1;
    }
    Ok(written)
}

/// A run of consecutive 4 KiB frames in a PFN array.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PfnRun {
    /// The first frame.
    pub first: Pfn,
    /// How many frames (at least one).
    pub frames: u64,
}

impl PfnRun {
    /// The run's guest physical address and length in bytes.
    pub fn range(&self) -> (u64, u64) {
        (self.first.addr().get(), self.frames << PAGE_SHIFT)
    }
}

/// Decodes an untrusted balloon PFN array into maximal runs of frames that follow each other
/// in the array and in memory. Every `u32` is a frame number; a buffer that is not a whole
/// number of them ends with [`PfnError::TrailingBytes`] after the runs before it.
pub fn pfn_runs(bytes: &[u8]) -> PfnRuns<'_> {
    PfnRuns { bytes }
}

/// The iterator of [`pfn_runs`].
#[derive(Clone, Debug)]
pub struct PfnRuns<'a> {
    bytes: &'a [u8],
}

impl Iterator for PfnRuns<'_> {
    type Item = Result<PfnRun, PfnError>;

    fn next(&mut self) -> Option<Self::Item> {
        let Some((raw, rest)) = self.bytes.split_first_chunk::<4>() else {
            if self.bytes.is_empty() {
                return None;
            }
            self.bytes = &[];
            return Some(Err(PfnError::TrailingBytes));
        };
        let first = u64::from(u32::from_le_bytes(*raw));
        let mut frames = 1u64;
        self.bytes = rest;
        while let Some((raw, rest)) = self.bytes.split_first_chunk::<4>() {
            if u64::from(u32::from_le_bytes(*raw)) != first + frames {
                break;
            }
            frames += 1;
            self.bytes = rest;
        }
        const_assert!(1 << 32 < FRAME_LIMIT);
        Some(Ok(PfnRun {
            first: Pfn::from_raw(first),
            frames,
        }))
    }
}

impl core::iter::FusedIterator for PfnRuns<'_> {}

// ---------------------------------------------------------------------------------------------
// Free-page-hint command ids
// ---------------------------------------------------------------------------------------------

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

#[cfg(test)]
mod tests;
