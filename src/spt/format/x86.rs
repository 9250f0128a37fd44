//! x86-64 paging entries, 4-level and 5-level (LA57) (Intel SDM vol. 3 §4.5; KVM's shadow
//! paging SPTEs, `PT_*_MASK` in `arch/x86/kvm/mmu.h`).

use static_assertions::const_assert;

use super::{ADDR_MASK, PteFormat};
use crate::addr::{Hpa, Level, Va};

bitflags::bitflags! {
    /// Attributes of an x86-64 leaf in the size-independent form: the bits of a 4 KiB PTE
    /// without the address. [`PAT`](Self::PAT) is bit 7 here and in 4 KiB leaves; the format
    /// moves it to bit 12 in huge leaves, where bit 7 is the page-size bit it manages itself.
    /// Unnamed bits (52..=62: software or protection key) pass through unchanged.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct X86Flags: u64 {
        /// P: the entry is present.
        const PRESENT = 1;
        /// R/W: writes are allowed.
        const WRITABLE = 1 << 1;
        /// U/S: user-mode accesses are allowed.
        const USER = 1 << 2;
        /// PWT: write-through caching.
        const WRITE_THROUGH = 1 << 3;
        /// PCD: caching disabled.
        const NO_CACHE = 1 << 4;
        /// A: set by the processor on access.
        const ACCESSED = 1 << 5;
        /// D: set by the processor on write.
        const DIRTY = 1 << 6;
        /// PAT index bit (bit 7 of a 4 KiB PTE, bit 12 of a huge leaf).
        const PAT = 1 << 7;
        /// G: global translation.
        const GLOBAL = 1 << 8;
        /// Software bit 9 (KVM `DEFAULT_SPTE_HOST_WRITABLE`).
        const HOST_WRITABLE = 1 << 9;
        /// Software bit 10: write access may be restored without the MMU lock
        /// (KVM `DEFAULT_SPTE_MMU_WRITABLE`, `shadow_mmu_writable_mask`).
        const MMU_WRITABLE = 1 << 10;
        /// Software bit 11.
        const SOFTWARE_11 = 1 << 11;
        /// XD: instruction fetches are not allowed.
        const NO_EXECUTE = 1 << 63;
        // Software-available and protection-key bits pass through.
        const _ = 0x7ff0_0000_0000_0000;
    }
}

/// The page-size bit (PS) of entries above level 1.
const PS: u64 = 1 << 7;
/// PAT in a huge leaf.
const HUGE_PAT: u64 = 1 << 12;
/// What a table entry carries besides the address: present, writable, user. Permissions
/// are the intersection along the walk, so tables grant everything and leaves restrict.
const TABLE_BITS: u64 =
    X86Flags::PRESENT.bits() | X86Flags::WRITABLE.bits() | X86Flags::USER.bits();

// The flags never overlap the address; a 4 KiB aligned address is a non-present entry.
const_assert!(X86Flags::all().bits() & ADDR_MASK == 0);
const_assert!(X86Flags::PRESENT.bits() & ADDR_MASK == 0);
// The software bit is one the processor ignores in every entry (bits 9..=11).
const_assert!(X86Flags::MMU_WRITABLE.bits() & 0xe00 == X86Flags::MMU_WRITABLE.bits());
const_assert!(HUGE_PAT & ADDR_MASK != 0 && HUGE_PAT == 1 << 12);

macro_rules! x86_format {
    ($(#[$doc:meta])* $name:ident, $levels:expr, $label:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
        pub struct $name;

        impl PteFormat for $name {
            type Flags = X86Flags;
            type In = Va;
            type Out = Hpa;

            const NAME: &'static str = $label;
            const ROOT_LEVEL: Level = $levels;
            const LARGEST_LEAF: Level = Level::L3;
            const PRESENT_MASK: u64 = X86Flags::PRESENT.bits();
            const REQUIRED: u64 = X86Flags::PRESENT.bits();
            const WRITABLE: u64 = X86Flags::WRITABLE.bits();
            const MMU_WRITABLE: u64 = X86Flags::MMU_WRITABLE.bits();
            const ACCESSED: u64 = X86Flags::ACCESSED.bits();
            const DIRTY: u64 = X86Flags::DIRTY.bits();
            const FLAGS_MASK: u64 = !ADDR_MASK;

            #[inline]
            fn table_entry(table: Hpa) -> u64 {
                (table.get() & ADDR_MASK) | TABLE_BITS
            }

            #[inline]
            fn leaf_entry(pa: Hpa, level: Level, flags: u64) -> u64 {
                let flags = flags & !ADDR_MASK;
                if level.get() == 1 {
                    (pa.get() & ADDR_MASK) | flags
                } else {
                    let pat = if flags & PS != 0 { HUGE_PAT } else { 0 };
                    let addr = pa.get() & ADDR_MASK & !(level.page_size() - 1);
                    addr | (flags & !PS) | PS | pat
                }
            }

            #[inline]
            fn leaf_flags(pte: u64, level: Level) -> u64 {
                if level.get() == 1 {
                    pte & !ADDR_MASK
                } else {
                    let pat = if pte & HUGE_PAT != 0 { PS } else { 0 };
                    (pte & !ADDR_MASK & !PS) | pat
                }
            }

            #[inline]
            fn is_huge_bit(pte: u64) -> bool {
                pte & PS != 0
            }
        }
    };
}

x86_format!(
    /// x86-64 4-level paging (CR4.LA57 = 0): 48-bit input addresses, roots at level 4,
    /// 2 MiB and 1 GiB leaves. Also the format of KVM's shadow page tables for 64-bit guests.
    /// Input addresses are the low 48 bits; a canonical upper-half address is given without
    /// its sign-extension bits.
    X86_64,
    Level::L4,
    "x86-64"
);

x86_format!(
    /// x86-64 5-level paging (CR4.LA57 = 1): the same entries with a fifth level on top,
    /// 57-bit input addresses.
    X86_64La57,
    Level::L5,
    "x86-64-la57"
);
