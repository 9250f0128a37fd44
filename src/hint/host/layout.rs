//! Guest RAM as the host sees it: regions of guest physical memory, each backed by host pages
//! of one size, and the walk that cuts an untrusted guest range into the parts inside them.
//!
//! The host side of reporting, ballooning and free-page hinting gets ranges from the guest
//! and must touch nothing but guest RAM (DESIGN.md invariant 5). The embedder describes its
//! RAM through [`GuestRamLayout`] (QEMU's RAM blocks, Firecracker's and Cloud Hypervisor's
//! `GuestMemoryMmap` regions); [`RamLayout`] is a ready-made sorted array of
//! [`RamRegion`]s.
//!
//! A region's *backing order* is the granularity at which the host gives memory back: the
//! hugetlb page size for hugetlb-backed RAM (it cannot discard less), and a choice for
//! THP-backed anonymous RAM: order 0 discards any 4 KiB page and splits the transparent huge
//! page around it (what QEMU does, `qemu_ram_pagesize()` is 4 KiB there, and what Hildenbrand's
//! thread measures), order 9 discards only whole 2 MiB pages and never splits one. Backing
//! pages are aligned relative to the region's start (QEMU checks `ram_offset` against
//! `qemu_ram_pagesize(rb)`), so the embedder maps a region at a host address aligned to its
//! backing page.

use arrayvec::ArrayVec;

use crate::addr::{Gpa, PAGE_SIZE, PHYS_ADDR_BITS, PageOrder};
use crate::hint::wire::hint_error_display;

/// One region of guest RAM: `[start, start + size)`, backed by host pages of
/// `4096 << backing` bytes (QEMU `RAMBlock`, vm-memory `GuestRegionMmap`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RamRegion {
    start: Gpa,
    size: u64,
    backing: PageOrder,
}

/// Why a [`RamRegion`] was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RegionError {
    /// The region has no bytes.
    Empty,
    /// Start or size is not a multiple of 4 KiB.
    Unaligned,
    /// The region reaches beyond the 52-bit physical address space.
    OutOfRange,
}

hint_error_display!(RegionError {
    Empty => "RAM region is empty",
    Unaligned => "RAM region start or size not 4 KiB aligned",
    OutOfRange => "RAM region reaches beyond the physical address space",
});

impl RamRegion {
    /// A region of `size` bytes at `start` whose host backing pages are `4096 << backing`
    /// bytes.
    pub const fn new(start: Gpa, size: u64, backing: PageOrder) -> Result<Self, RegionError> {
        if size == 0 {
            return Err(RegionError::Empty);
        }
        if start.page_offset() != 0 || size % PAGE_SIZE != 0 {
            return Err(RegionError::Unaligned);
        }
        match start.get().checked_add(size) {
            Some(end) if end <= 1 << PHYS_ADDR_BITS => Ok(Self {
                start,
                size,
                backing,
            }),
            _ => Err(RegionError::OutOfRange),
        }
    }

    /// The first byte.
    pub const fn start(&self) -> Gpa {
        self.start
    }

    /// The size in bytes.
    pub const fn size(&self) -> u64 {
        self.size
    }

    /// One past the last byte (at most `2^52`).
    pub const fn end(&self) -> u64 {
        self.start.get() + self.size
    }

    /// The order of the host pages behind the region.
    pub const fn backing(&self) -> PageOrder {
        self.backing
    }

    /// Whether `gpa` lies in the region.
    pub const fn contains(&self, gpa: Gpa) -> bool {
        gpa.get() >= self.start.get() && gpa.get() < self.end()
    }

    /// The largest run of whole backing pages inside `[start, end)` (a part of this region):
    /// `start` rounded up and `end` rounded down to backing pages counted from the region's
    /// start. `None` when no whole backing page fits.
    pub(crate) fn whole_backing_pages(&self, start: u64, end: u64) -> Option<(u64, u64)> {
        let page = self.backing.bytes();
        let base = self.start.get();
        let lo = (start - base).div_ceil(page) * page;
        let hi = (end - base) / page * page;
        (hi > lo).then_some((base + lo, base + hi))
    }
}

/// The embedder's map of guest RAM (QEMU `memory_region_find` on RAM, vm-memory
/// `GuestMemory::find_region`).
pub trait GuestRamLayout {
    /// The region that contains `gpa`, or else the lowest region above it; `None` when no
    /// RAM lies at or above `gpa`. Regions must not overlap.
    fn region_from(&mut self, gpa: Gpa) -> Option<RamRegion>;
}

impl<L: GuestRamLayout + ?Sized> GuestRamLayout for &mut L {
    fn region_from(&mut self, gpa: Gpa) -> Option<RamRegion> {
        (**self).region_from(gpa)
    }
}

/// Why [`RamLayout::push`] refused a region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LayoutError {
    /// The layout already holds `N` regions.
    Full,
    /// The region does not start at or after the end of the last one.
    NotAscending,
}

hint_error_display!(LayoutError {
    Full => "RAM layout is full",
    NotAscending => "RAM region overlaps or precedes the previous one",
});

/// Up to `N` RAM regions in ascending order; looks a range up by binary search.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RamLayout<const N: usize> {
    regions: ArrayVec<RamRegion, N>,
}

impl<const N: usize> RamLayout<N> {
    /// An empty layout.
    pub const fn new() -> Self {
        Self {
            regions: ArrayVec::new_const(),
        }
    }

    /// Appends a region above every region already there (touching is fine).
    pub fn push(&mut self, region: RamRegion) -> Result<(), LayoutError> {
        if self
            .regions
            .last()
            .is_some_and(|last| region.start().get() < last.end())
        {
            return Err(LayoutError::NotAscending);
        }
        self.regions.try_push(region).map_err(|_| LayoutError::Full)
    }

    /// The regions, ascending.
    pub fn regions(&self) -> &[RamRegion] {
        &self.regions
    }
}

impl<const N: usize> GuestRamLayout for RamLayout<N> {
    fn region_from(&mut self, gpa: Gpa) -> Option<RamRegion> {
        let i = self.regions.partition_point(|r| r.end() <= gpa.get());
        self.regions.get(i).copied()
    }
}

/// The part of a guest range that lies in one region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Piece {
    pub(crate) region: RamRegion,
    pub(crate) start: u64,
    pub(crate) end: u64,
}

/// Cuts `[start, end)` (with `start < end <= 2^52`) into the parts inside guest RAM, calling
/// `f` for each in ascending order; returns the bytes outside RAM. Trusts nothing of the
/// layout but the [`RamRegion`] invariants: a region that does not reach past the walk's
/// position ends the walk, so the walk always advances and never visits a byte twice.
pub(crate) fn for_each_piece<L: GuestRamLayout + ?Sized>(
    layout: &mut L,
    start: u64,
    end: u64,
    mut f: impl FnMut(Piece),
) -> u64 {
    let mut outside = 0;
    let mut cursor = start;
    while cursor < end {
        // `cursor < end <= 2^52`, so it is a valid address.
        let Ok(at) = Gpa::new(cursor) else { break };
        let Some(region) = layout.region_from(at) else {
            break;
        };
        if region.end() <= cursor {
            // A layout that breaks its contract: treat the rest as outside RAM.
            break;
        }
        let lo = region.start().get().max(cursor);
        if lo >= end {
            break;
        }
        let hi = region.end().min(end);
        outside += lo - cursor;
        f(Piece {
            region,
            start: lo,
            end: hi,
        });
        cursor = hi;
    }
    outside + (end - cursor)
}
