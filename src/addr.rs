//! Address, frame-number, order and level newtypes.
//!
//! hvmem works in 4 KiB base pages. Every type here has a private field and a checked
//! constructor, so a value that exists is known to be in range: a [`PageOrder`] is at most
//! [`PageOrder::LIMIT`], a [`Level`] is 1..=5, a frame number fits in the 52-bit physical
//! address space of x86-64 and arm64. Arithmetic that could overflow is `checked_*` and
//! returns `None`; nothing here wraps silently or panics.
//!
//! The host/guest split follows KVM's vocabulary: a *guest physical address* ([`Gpa`]) and
//! its frame number ([`Gfn`]) name guest memory; a *host physical address* ([`Hpa`]) and a
//! *page frame number* ([`Pfn`]) name memory of whoever runs the code (the host for a VMM,
//! the guest's own RAM for a unikernel's allocator).

use core::fmt;

/// log2 of the base page size.
pub const PAGE_SHIFT: u32 = 12;
/// The base page size, 4 KiB.
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
/// Physical addresses are at most this many bits wide (x86-64 MAXPHYADDR and arm64 LPA).
pub const PHYS_ADDR_BITS: u32 = 52;
/// One past the largest frame number a physical address can name.
pub const FRAME_LIMIT: u64 = 1 << (PHYS_ADDR_BITS - PAGE_SHIFT);

/// Why an address or frame number was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AddrError {
    /// The value does not fit in the 52-bit physical address space.
    OutOfRange,
    /// The address is not aligned to the size the operation needs.
    Unaligned,
    /// The order is larger than [`PageOrder::LIMIT`].
    OrderTooLarge,
    /// The level is outside 1..=5.
    BadLevel,
}

impl fmt::Display for AddrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::OutOfRange => "address beyond the 52-bit physical address space",
            Self::Unaligned => "address not aligned",
            Self::OrderTooLarge => "page order too large",
            Self::BadLevel => "page-table level outside 1..=5",
        })
    }
}

impl core::error::Error for AddrError {}

macro_rules! frame_number {
    ($(#[$doc:meta])* $name:ident, $addr:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(u64);

        impl $name {
            /// Frame number zero.
            pub const ZERO: Self = Self(0);

            /// A frame number, if it lies within the 52-bit physical address space.
            pub const fn new(frame: u64) -> Result<Self, AddrError> {
                if frame < FRAME_LIMIT { Ok(Self(frame)) } else { Err(AddrError::OutOfRange) }
            }

            /// A frame number the caller already knows to be below [`FRAME_LIMIT`].
            #[allow(dead_code, reason = "not every frame type is built from raw numbers yet")]
            #[inline]
            pub(crate) const fn from_raw(frame: u64) -> Self {
                debug_assert!(frame < FRAME_LIMIT);
                Self(frame)
            }

            /// The raw frame number.
            pub const fn get(self) -> u64 {
                self.0
            }

            /// The address of the frame's first byte.
            pub const fn addr(self) -> $addr {
                $addr(self.0 << PAGE_SHIFT)
            }

            /// This frame number plus `frames`, if it stays in range.
            pub const fn checked_add(self, frames: u64) -> Option<Self> {
                match self.0.checked_add(frames) {
                    Some(f) if f < FRAME_LIMIT => Some(Self(f)),
                    _ => None,
                }
            }

            /// Whether the frame starts a naturally aligned block of `order`.
            pub const fn is_aligned(self, order: PageOrder) -> bool {
                self.0 & (order.frames() - 1) == 0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }
    };
}

macro_rules! phys_addr {
    ($(#[$doc:meta])* $name:ident, $frame:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(u64);

        impl $name {
            /// An address, if it lies within the 52-bit physical address space.
            pub const fn new(addr: u64) -> Result<Self, AddrError> {
                if addr >> PHYS_ADDR_BITS == 0 { Ok(Self(addr)) } else { Err(AddrError::OutOfRange) }
            }

            /// The raw address.
            pub const fn get(self) -> u64 {
                self.0
            }

            /// The frame that holds this address.
            pub const fn frame(self) -> $frame {
                $frame(self.0 >> PAGE_SHIFT)
            }

            /// The offset of the address within its 4 KiB page.
            pub const fn page_offset(self) -> u64 {
                self.0 & (PAGE_SIZE - 1)
            }

            /// The frame this address starts, or `Unaligned` when it is not 4 KiB aligned.
            pub const fn to_frame(self) -> Result<$frame, AddrError> {
                if self.page_offset() == 0 { Ok(self.frame()) } else { Err(AddrError::Unaligned) }
            }

            /// This address plus `bytes`, if it stays in range.
            pub const fn checked_add(self, bytes: u64) -> Option<Self> {
                match self.0.checked_add(bytes) {
                    Some(a) if a >> PHYS_ADDR_BITS == 0 => Some(Self(a)),
                    _ => None,
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }
    };
}

phys_addr!(
    /// A guest physical address (KVM `gpa_t`).
    Gpa,
    Gfn
);
phys_addr!(
    /// A host physical address (KVM `hpa_t`), or the physical address of the running kernel's
    /// own memory when a guest manages its RAM.
    Hpa,
    Pfn
);
frame_number!(
    /// A guest frame number (KVM `gfn_t`): a [`Gpa`] shifted right by 12.
    Gfn,
    Gpa
);
frame_number!(
    /// A page frame number (KVM `kvm_pfn_t`, Linux `pfn`): an [`Hpa`] shifted right by 12.
    Pfn,
    Hpa
);

/// The order of a block of pages: a block of order `n` holds `2^n` base pages
/// (order 9 is 2 MiB, order 18 is 1 GiB).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PageOrder(u8);

impl PageOrder {
    /// The largest order any hvmem structure accepts (4 GiB blocks).
    pub const LIMIT: u8 = 20;
    /// Order 0, one 4 KiB page.
    pub const BASE: Self = Self(0);
    /// Order 9, one 2 MiB huge page on x86-64 and arm64 with 4 KiB granules.
    pub const HUGE_2M: Self = Self(9);

    /// An order, if it is at most [`Self::LIMIT`].
    pub const fn new(order: u8) -> Result<Self, AddrError> {
        if order <= Self::LIMIT {
            Ok(Self(order))
        } else {
            Err(AddrError::OrderTooLarge)
        }
    }

    /// An order the caller already knows to be at most [`Self::LIMIT`].
    #[inline]
    pub(crate) const fn from_raw(order: u8) -> Self {
        debug_assert!(order <= Self::LIMIT);
        Self(order)
    }

    /// The raw order.
    pub const fn get(self) -> u8 {
        self.0
    }

    /// The number of base pages in a block of this order.
    pub const fn frames(self) -> u64 {
        1 << self.0
    }

    /// The number of bytes in a block of this order.
    pub const fn bytes(self) -> u64 {
        PAGE_SIZE << self.0
    }

    /// The next smaller order, or `None` at order 0.
    pub const fn lower(self) -> Option<Self> {
        match self.0.checked_sub(1) {
            Some(o) => Some(Self(o)),
            None => None,
        }
    }
}

impl fmt::Display for PageOrder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "order {}", self.0)
    }
}

/// A page-table level: 1 maps 4 KiB leaves, 2 maps 2 MiB, 3 maps 1 GiB, 4 and 5 are the
/// top levels of 4- and 5-level paging (KVM's `PG_LEVEL_4K` .. `PG_LEVEL_512G` numbering).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Level(u8);

impl Level {
    /// The 4 KiB leaf level.
    pub const L1: Self = Self(1);
    /// The 2 MiB level.
    pub const L2: Self = Self(2);
    /// The 1 GiB level.
    pub const L3: Self = Self(3);
    /// The top level of 4-level paging.
    pub const L4: Self = Self(4);
    /// The top level of 5-level paging.
    pub const L5: Self = Self(5);

    /// A level, if it is within 1..=5.
    pub const fn new(level: u8) -> Result<Self, AddrError> {
        if level >= 1 && level <= 5 {
            Ok(Self(level))
        } else {
            Err(AddrError::BadLevel)
        }
    }

    /// The raw level number.
    pub const fn get(self) -> u8 {
        self.0
    }

    /// The shift of the bytes one entry at this level maps (12, 21, 30, 39, 48).
    pub const fn shift(self) -> u32 {
        PAGE_SHIFT + 9 * (self.0 as u32 - 1)
    }

    /// The number of bytes one entry at this level maps.
    pub const fn page_size(self) -> u64 {
        1 << self.shift()
    }

    /// The buddy order of a page mapped at this level: 0, 9 and 18 for levels 1 to 3, and
    /// `None` for the top levels, whose entries never map a page (a 512 GiB block is beyond
    /// [`PageOrder::LIMIT`]).
    pub const fn order(self) -> Option<PageOrder> {
        let order = 9 * (self.0 - 1);
        if order <= PageOrder::LIMIT {
            Some(PageOrder(order))
        } else {
            None
        }
    }

    /// The level below, or `None` at level 1.
    pub const fn lower(self) -> Option<Self> {
        if self.0 > 1 {
            Some(Self(self.0 - 1))
        } else {
            None
        }
    }

    /// The level above, or `None` at level 5.
    pub const fn upper(self) -> Option<Self> {
        if self.0 < 5 {
            Some(Self(self.0 + 1))
        } else {
            None
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "level {}", self.0)
    }
}

/// An input address of a page table that is a virtual address: a guest-virtual address
/// for a guest's own x86-64 tables, the virtual address of whoever runs the code for its
/// own tables. At most 57 bits wide (5-level paging); each format checks its own width when
/// an operation runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Va(u64);

impl Va {
    /// The widest input address any format takes: 57 bits (5-level paging).
    pub const BITS: u32 = 57;
    /// Address zero.
    pub const ZERO: Self = Self(0);

    /// A virtual address, if it is below `1 << 57`.
    pub const fn new(addr: u64) -> Result<Self, AddrError> {
        if addr >> Self::BITS == 0 {
            Ok(Self(addr))
        } else {
            Err(AddrError::OutOfRange)
        }
    }

    /// The raw address.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// This address plus `bytes`, if it stays below `1 << 57`.
    pub const fn checked_add(self, bytes: u64) -> Option<Self> {
        match self.0.checked_add(bytes) {
            Some(a) if a >> Self::BITS == 0 => Some(Self(a)),
            _ => None,
        }
    }
}

impl fmt::Display for Va {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// An address space a page table translates from or to: [`Va`], [`Gpa`] or [`Hpa`]. A page
/// table format names its input and output spaces ([`PteFormat::In`] and
/// [`PteFormat::Out`]), so EPT takes a [`Gpa`] and a guest's own tables give one, and
/// the compiler keeps the spaces apart.
///
/// [`PteFormat::In`]: crate::spt::PteFormat::In
/// [`PteFormat::Out`]: crate::spt::PteFormat::Out
pub trait Address:
    Copy
    + fmt::Debug
    + fmt::Display
    + PartialEq
    + Eq
    + PartialOrd
    + Ord
    + core::hash::Hash
    + Send
    + Sync
    + 'static
{
    /// Bits an address of this space may have (57 for [`Va`], 52 for physical ones).
    const BITS: u32;
    /// Address zero.
    const ZERO: Self;

    /// The raw address.
    fn raw(self) -> u64;

    /// The address of a raw value, if it fits in [`BITS`](Self::BITS).
    fn from_raw(raw: u64) -> Result<Self, AddrError>;
}

impl Address for Va {
    const BITS: u32 = Va::BITS;
    const ZERO: Self = Va::ZERO;

    #[inline]
    fn raw(self) -> u64 {
        self.0
    }

    #[inline]
    fn from_raw(raw: u64) -> Result<Self, AddrError> {
        Self::new(raw)
    }
}

macro_rules! phys_address {
    ($($name:ident),*) => {
        $(
            impl Address for $name {
                const BITS: u32 = PHYS_ADDR_BITS;
                const ZERO: Self = Self(0);

                #[inline]
                fn raw(self) -> u64 {
                    self.0
                }

                #[inline]
                fn from_raw(raw: u64) -> Result<Self, AddrError> {
                    Self::new(raw)
                }
            }
        )*
    };
}

phys_address!(Gpa, Hpa);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_and_addresses_round_trip() {
        let pfn = Pfn::new(0x1234).unwrap();
        assert_eq!(pfn.addr().get(), 0x123_4000);
        assert_eq!(pfn.addr().frame(), pfn);
        let gpa = Gpa::new(0x1234_5678).unwrap();
        assert_eq!(gpa.frame().get(), 0x12345);
        assert_eq!(gpa.page_offset(), 0x678);
        assert_eq!(gpa.to_frame(), Err(AddrError::Unaligned));
        assert_eq!(Gpa::new(0x5000).unwrap().to_frame().unwrap().get(), 5);
    }

    #[test]
    fn constructors_reject_out_of_range() {
        assert_eq!(Pfn::new(FRAME_LIMIT), Err(AddrError::OutOfRange));
        assert!(Pfn::new(FRAME_LIMIT - 1).is_ok());
        assert_eq!(Hpa::new(1 << 52), Err(AddrError::OutOfRange));
        assert_eq!(Pfn::new(FRAME_LIMIT - 1).unwrap().checked_add(1), None);
        assert_eq!(Gpa::new(u64::MAX).unwrap_err(), AddrError::OutOfRange);
        assert_eq!(Hpa::new((1 << 52) - 1).unwrap().checked_add(1), None);
        assert_eq!(PageOrder::new(21), Err(AddrError::OrderTooLarge));
        assert_eq!(Level::new(0), Err(AddrError::BadLevel));
        assert_eq!(Level::new(6), Err(AddrError::BadLevel));
    }

    #[test]
    fn order_and_level_geometry() {
        let o9 = PageOrder::new(9).unwrap();
        assert_eq!(o9, PageOrder::HUGE_2M);
        assert_eq!(o9.frames(), 512);
        assert_eq!(o9.bytes(), 2 << 20);
        assert_eq!(PageOrder::BASE.lower(), None);
        assert_eq!(o9.lower().unwrap().get(), 8);
        assert!(Pfn::new(1024).unwrap().is_aligned(o9));
        assert!(!Pfn::new(1025).unwrap().is_aligned(o9));
        assert_eq!(Level::L2.page_size(), 2 << 20);
        assert_eq!(Level::L3.shift(), 30);
        assert_eq!(Level::L5.shift(), 48);
        assert_eq!(Level::L2.order(), Some(o9));
        assert_eq!(Level::L1.lower(), None);
        assert_eq!(Level::L5.upper(), None);
        assert_eq!(Level::L4.lower(), Some(Level::L3));
    }

    #[test]
    fn level_order_is_a_valid_order_or_none() {
        let orders = [Level::L1, Level::L2, Level::L3, Level::L4, Level::L5].map(Level::order);
        let valid = |o| PageOrder::new(o).ok();
        assert_eq!(orders, [valid(0), valid(9), valid(18), None, None]);
        for l in [Level::L1, Level::L2, Level::L3] {
            let o = l.order().unwrap();
            assert!(o.get() <= PageOrder::LIMIT);
            assert_eq!(o.bytes(), l.page_size(), "{l}");
        }
    }
}
