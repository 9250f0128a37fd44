//! The kernel's own page tables, built with `hvmem::spt` (x86-64 4-level format) in frames
//! carved from RAM, replacing the static 4 GiB boot tables.
//!
//! Identity map (virtual = physical) of: the first MiB (boot structures: `hvm_start_info`,
//! its memory map), every RAM region of the boot map (2 MiB pages where aligned, 4 KiB at the
//! edges; the largest leaf is limited to 2 MiB, the host's THP size), and the virtio-mmio
//! window at 0xfeb00000 with 4 KiB uncached pages. Everything else faults.

use hvmem::spt::{
    MapSize, PageTable, TableArena, TableFrame, TableSlot, WalkFlags, X86_64, X86Flags,
};
use hvmem::{Hpa, Level, Va};

use crate::phys::{self, Carver, PAGE};
use crate::start_info::BootInfo;

/// The virtio-mmio transports of QEMU's microvm: 24 slots of 0x200 bytes.
pub const VIRTIO_MMIO_BASE: u64 = 0xfeb0_0000;
/// Bytes of the virtio-mmio window.
pub const VIRTIO_MMIO_LEN: u64 = 24 * 0x200;
/// Table frames carved for the tables (a 256 MiB guest needs 5).
const TABLE_FRAMES: usize = 64;

/// What [`build_and_switch`] did.
pub struct Paging {
    /// Tables in use (the root included).
    pub tables: usize,
    /// Bytes of RAM mapped.
    pub ram_bytes: u64,
    /// The root (CR3).
    pub root: u64,
}

/// Why the tables could not be built; the boot tables stay in use.
pub enum PagingError {
    /// The carver had no room for the table frames.
    NoRoom,
    /// `hvmem::spt` refused (the message says which step).
    Spt(&'static str),
    /// A check after building found an address that would not translate to itself.
    NotIdentity(u64),
}

impl core::fmt::Display for PagingError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NoRoom => f.write_str("no room for the table frames"),
            Self::Spt(step) => write!(f, "hvmem::spt refused: {step}"),
            Self::NotIdentity(pa) => write!(f, "{pa:#x} would not map to itself"),
        }
    }
}

fn identity(
    pt: &PageTable<X86_64>,
    mem: &mut TableArena<'static>,
    start: u64,
    end: u64,
    flags: X86Flags,
) -> Result<(), PagingError> {
    let start = start & !(PAGE - 1);
    let end = end.next_multiple_of(PAGE);
    if end <= start {
        return Ok(());
    }
    let va = Va::new(start).map_err(|_| PagingError::Spt("va"))?;
    let pa = Hpa::new(start).map_err(|_| PagingError::Spt("pa"))?;
    let excl = WalkFlags::empty();
    pt.map(mem, va, pa, end - start, flags, MapSize::Largest, excl)
        .map_err(|_| PagingError::Spt("map"))
}

/// Builds the tables and loads them into CR3.
pub fn build_and_switch(carver: &mut Carver, info: &BootInfo) -> Result<Paging, PagingError> {
    let frames = carver
        .take(TABLE_FRAMES, PAGE, TableFrame::new)
        .ok_or(PagingError::NoRoom)?;
    let slots = carver
        .take(TABLE_FRAMES, 8, TableSlot::<()>::default)
        .ok_or(PagingError::NoRoom)?;
    let base = Hpa::new(frames.as_ptr() as u64).map_err(|_| PagingError::Spt("base"))?;
    let frames: &'static [TableFrame] = frames;
    let mut mem = TableArena::new(frames, slots, base).map_err(|_| PagingError::Spt("arena"))?;
    let pt = PageTable::<X86_64>::new(&mut mem)
        .map_err(|_| PagingError::Spt("root"))?
        .with_max_leaf(Level::L2);
    let rw = X86Flags::PRESENT | X86Flags::WRITABLE;
    identity(&pt, &mut mem, 0, 1 << 20, rw)?;
    let mut ram_bytes = 0;
    for r in info.ram() {
        let start = r.start.max(1 << 20);
        if r.end() > start {
            identity(&pt, &mut mem, start, r.end(), rw)?;
            ram_bytes += r.end() - start;
        }
    }
    let mmio = rw | X86Flags::NO_CACHE | X86Flags::WRITE_THROUGH | X86Flags::NO_EXECUTE;
    identity(
        &pt,
        &mut mem,
        VIRTIO_MMIO_BASE,
        VIRTIO_MMIO_BASE + VIRTIO_MMIO_LEN,
        mmio,
    )?;

    // Everything Rust may reference must translate to itself: the image (code, data, stack),
    // the carved structures, the tables themselves.
    let (image_start, _) = phys::image();
    let mut probe = image_start;
    while probe < carver.next() {
        let va = Va::new(probe).map_err(|_| PagingError::Spt("va"))?;
        match pt.translate(&mem, va) {
            Ok(t) if t.pa.get() == probe => {}
            _ => return Err(PagingError::NotIdentity(probe)),
        }
        probe += PAGE;
    }
    let tables = mem.allocated();
    let root = pt.root().get();
    // SAFETY: `root` is a complete 4-level table built above; it identity-maps the image,
    // the stack (in the image's .bss), every carved structure and the table frames (checked
    // page by page just above), the low MiB and all RAM, as the boot tables did.
    unsafe { crate::cpu::write_cr3(root) };
    Ok(Paging {
        tables,
        ram_bytes,
        root,
    })
}
