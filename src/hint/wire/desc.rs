//! Reporting scatter entries and split-virtqueue descriptor chains.

use super::EncodeError;
use crate::buddy::Block;

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
    if entries.is_empty()
        || slots == 0
        || slots > VIRTQ_MAX_SIZE
        || table.len() % VIRTQ_DESC_SIZE != 0
    {
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
