//! Intel EPT entries, 4-level (Intel SDM vol. 3 §29.3.2; KVM's `VMX_EPT_*` masks and
//! `kvm_mmu_set_ept_masks`).

use static_assertions::const_assert;

use super::{ADDR_MASK, PteFormat};
use crate::addr::{Gpa, Hpa, Level};

bitflags::bitflags! {
    /// Attributes of an EPT leaf, without the address and without bit 7 (the page-size bit
    /// of huge leaves, which the format manages). The memory type is the 3-bit field at
    /// bits 5:3; [`MEMTYPE_WB`](Self::MEMTYPE_WB) names write-back, other values can be
    /// built with `from_bits_retain`. Unnamed bits 52..=62 (software) pass through.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct EptFlags: u64 {
        /// Reads allowed. Every leaf this crate installs is readable.
        const READ = 1;
        /// Writes allowed.
        const WRITE = 1 << 1;
        /// Instruction fetches allowed (supervisor fetches when mode-based execute is on).
        const EXECUTE = 1 << 2;
        /// Memory type write-back (6 in bits 5:3; KVM `MTRR_TYPE_WRBACK << VMX_EPT_MT_EPTE_SHIFT`).
        const MEMTYPE_WB = 6 << 3;
        /// Ignore the guest's PAT.
        const IGNORE_PAT = 1 << 6;
        /// Accessed, when EPT A/D bits are enabled.
        const ACCESSED = 1 << 8;
        /// Dirty, when EPT A/D bits are enabled.
        const DIRTY = 1 << 9;
        /// User-mode instruction fetches allowed (mode-based execute control).
        const USER_EXECUTE = 1 << 10;
        /// Software bit 58: write access may be restored without the MMU lock
        /// (KVM `EPT_SPTE_MMU_WRITABLE`).
        const MMU_WRITABLE = 1 << 58;
        /// Software bit 57 (KVM `EPT_SPTE_HOST_WRITABLE`).
        const HOST_WRITABLE = 1 << 57;
        /// Suppress #VE.
        const SUPPRESS_VE = 1 << 63;
        // The rest of the memory-type field and the software bits pass through.
        const _ = (7 << 3) | 0x7ff0_0000_0000_0000;
    }
}

/// Bit 7: the entry maps a huge page.
const HUGE: u64 = 1 << 7;
/// Bits that make an EPT entry present: read, write, execute and (with mode-based execute)
/// user execute.
const PRESENT: u64 = 0b111 | (1 << 10);
/// A table entry grants read, write and execute; leaves restrict.
const TABLE_BITS: u64 = 0b111;

const_assert!(EptFlags::all().bits() & ADDR_MASK == 0);
const_assert!(EptFlags::all().bits() & HUGE == 0);
const_assert!(PRESENT & ADDR_MASK == 0);
// The mmu-writable bit is among the bits EPT ignores (52..=62).
const_assert!(EptFlags::MMU_WRITABLE.bits() & 0x7ff0_0000_0000_0000 != 0);

/// Intel EPT with a 4-level walk (EPTP page-walk length 4): 48-bit guest-physical input
/// addresses, 2 MiB and 1 GiB leaves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Ept;

impl PteFormat for Ept {
    type Flags = EptFlags;
    type In = Gpa;
    type Out = Hpa;

    const NAME: &'static str = "ept";
    const ROOT_LEVEL: Level = Level::L4;
    const LARGEST_LEAF: Level = Level::L3;
    const PRESENT_MASK: u64 = PRESENT;
    const REQUIRED: u64 = EptFlags::READ.bits();
    const WRITABLE: u64 = EptFlags::WRITE.bits();
    const MMU_WRITABLE: u64 = EptFlags::MMU_WRITABLE.bits();
    const ACCESSED: u64 = EptFlags::ACCESSED.bits();
    const DIRTY: u64 = EptFlags::DIRTY.bits();
    const FLAGS_MASK: u64 = !ADDR_MASK & !HUGE;

    #[inline]
    fn table_entry(table: Hpa) -> u64 {
        (table.get() & ADDR_MASK) | TABLE_BITS
    }

    #[inline]
    fn leaf_entry(pa: Hpa, level: Level, flags: u64) -> u64 {
        let flags = flags & Self::FLAGS_MASK;
        let addr = pa.get() & ADDR_MASK & !(level.page_size() - 1);
        if level.get() == 1 {
            addr | flags
        } else {
            addr | flags | HUGE
        }
    }

    #[inline]
    fn leaf_flags(pte: u64, _level: Level) -> u64 {
        pte & Self::FLAGS_MASK
    }

    #[inline]
    fn is_huge_bit(pte: u64) -> bool {
        pte & HUGE != 0
    }
}
