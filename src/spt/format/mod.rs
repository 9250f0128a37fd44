//! Page-table entry formats: what the bits of a 64-bit entry mean.
//!
//! A format is a zero-sized marker type implementing [`PteFormat`]; the walker and every
//! operation are generic over it, so one walker serves x86-64 4-level paging
//! ([`X86_64`]), 5-level paging ([`X86_64La57`]) and Intel EPT ([`Ept`]) (KVM keeps the
//! same split between `arch/x86/kvm/mmu/spte.h`'s masks and the walkers that use them;
//! arm64 between `kvm_pte_t` helpers and `kvm_pgtable_walk`).
//!
//! Leaf attributes are handed to and from operations as the format's bitflags type
//! ([`X86Flags`], [`EptFlags`]) in one *size-independent form*: the bits of a 4 KiB leaf
//! without its address. The format moves bits that live elsewhere in huge leaves (x86's PAT
//! bit: bit 7 in a 4 KiB entry, bit 12 in a 2 MiB or 1 GiB one) and owns the page-size bit,
//! so a page keeps the same flags whether it is mapped by a 4 KiB or a huge leaf, and
//! splitting or collapsing never changes them.
//!
//! Every format has a software-available *mmu-writable* bit (KVM `shadow_mmu_writable_mask`):
//! dirty logging clears the hardware writable bit but keeps this one, which says that write
//! access may be restored by the fault path without the MMU lock.
//!
//! One rule holds in every format and is static-asserted: an entry whose value is a 4 KiB
//! aligned physical address (low 12 bits clear) is **not present**. Tables waiting for a
//! TLB flush before they are freed are chained through such entries, so a stale hardware
//! walk that still reaches one sees only non-present entries.

mod ept;
mod x86;

pub use ept::{Ept, EptFlags};
pub use x86::{X86_64, X86_64La57, X86Flags};

use core::fmt::Debug;

use crate::addr::{Address, Hpa, Level, Pfn};

/// Bits 51:12, where every format keeps the physical address of a table or a 4 KiB page.
pub const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// The meaning of the bits of a page-table entry (KVM: the `shadow_*_mask` family of
/// `spte.h`; arm64: `kvm_pte_*` helpers; aarch64-paging: `Attributes` + descriptors).
///
/// Entries are plain `u64` values. Predicates take the level of the table the entry sits in
/// because the same bits mean different things at different levels (bit 7 is PAT in a 4 KiB
/// x86 entry and the page-size bit above it).
pub trait PteFormat:
    Copy + Debug + Default + Eq + core::hash::Hash + Send + Sync + 'static
{
    /// Leaf attributes in the size-independent form (see the module docs).
    type Flags: bitflags::Flags<Bits = u64> + Copy + Debug + Eq + Send + Sync;
    /// The addresses the tables translate: [`Va`](crate::Va) for x86 paging,
    /// [`Gpa`](crate::Gpa) for EPT.
    type In: Address;
    /// The addresses leaves map to: [`Hpa`] (host-physical, or the physical memory of
    /// whoever runs the code when a guest builds its own tables).
    type Out: Address;

    /// A short name for messages and benchmark ids.
    const NAME: &'static str;
    /// The level of the root table (4 or 5).
    const ROOT_LEVEL: Level;
    /// The highest level at which a leaf may sit (level 3: 1 GiB pages).
    const LARGEST_LEAF: Level;
    /// Bits that make an entry present; an entry with none of them set is not present.
    const PRESENT_MASK: u64;
    /// Flags every leaf must keep (x86 `PRESENT`, EPT `READ`); `map` refuses flags without
    /// them and `protect` refuses to clear them.
    const REQUIRED: u64;
    /// The hardware bit that permits writes.
    const WRITABLE: u64;
    /// The software bit meaning "write access may be restored without the MMU lock"
    /// (KVM `shadow_mmu_writable_mask`). Ignored by hardware.
    const MMU_WRITABLE: u64;
    /// The accessed bit hardware sets.
    const ACCESSED: u64;
    /// The dirty bit hardware sets in leaves.
    const DIRTY: u64;
    /// Bits of the size-independent flags a caller may set or clear: everything but the
    /// address and the bits the format manages itself.
    const FLAGS_MASK: u64;

    /// Bits of input address the format translates (48 for 4 levels, 57 for 5).
    const INPUT_BITS: u32 = ROOT_SHIFT_BASE + 9 * Self::ROOT_LEVEL.get() as u32;

    /// The entry that points to a table at `table` (KVM `make_nonleaf_spte`).
    fn table_entry(table: Hpa) -> u64;
    /// A leaf at `level` mapping `pa` (aligned to the level's page size) with `flags` in the
    /// size-independent form (KVM `make_spte`).
    fn leaf_entry(pa: Hpa, level: Level, flags: u64) -> u64;
    /// The size-independent flags of a present leaf at `level`.
    fn leaf_flags(pte: u64, level: Level) -> u64;
    /// Whether `pte` at `level` is a huge leaf rather than a table (for present entries
    /// above level 1; KVM `is_large_pte`).
    fn is_huge_bit(pte: u64) -> bool;

    /// Whether the entry is present (KVM `is_shadow_present_pte`).
    #[inline]
    fn is_present(pte: u64) -> bool {
        pte & Self::PRESENT_MASK != 0
    }

    /// Whether the entry points to a table of the next level down.
    #[inline]
    fn is_table(pte: u64, level: Level) -> bool {
        Self::is_present(pte) && level.get() > 1 && !Self::is_huge_bit(pte)
    }

    /// Whether the entry is a present leaf (a 4 KiB page or a huge page;
    /// KVM `is_last_spte`).
    #[inline]
    fn is_leaf(pte: u64, level: Level) -> bool {
        Self::is_present(pte) && (level.get() == 1 || Self::is_huge_bit(pte))
    }

    /// Whether the entry is a present leaf above level 1.
    #[inline]
    fn is_huge(pte: u64, level: Level) -> bool {
        Self::is_present(pte) && level.get() > 1 && Self::is_huge_bit(pte)
    }

    /// The physical address of the table a table entry points to.
    #[inline]
    fn table_addr(pte: u64) -> Hpa {
        Pfn::from_raw((pte & ADDR_MASK) >> crate::addr::PAGE_SHIFT).addr()
    }

    /// The physical address a leaf at `level` maps (aligned to the level's page size;
    /// KVM `spte_to_pfn`).
    #[inline]
    fn leaf_addr(pte: u64, level: Level) -> Hpa {
        let mask = ADDR_MASK & !(level.page_size() - 1);
        Pfn::from_raw((pte & mask) >> crate::addr::PAGE_SHIFT).addr()
    }

    /// The entry of child 0 when a huge leaf at `level` becomes a table of 512 leaves at
    /// `level - 1`; child `i` is this value plus `i << (level - 1).shift()` (KVM
    /// `make_huge_page_split_spte`).
    #[inline]
    fn split_child(huge: u64, level: Level) -> u64 {
        let child = match level.lower() {
            Some(child) => child,
            None => level,
        };
        Self::leaf_entry(
            Self::leaf_addr(huge, level),
            child,
            Self::leaf_flags(huge, level),
        )
    }
}

/// `INPUT_BITS` is 12 + 9 per level.
const ROOT_SHIFT_BASE: u32 = crate::addr::PAGE_SHIFT;

#[cfg(test)]
mod tests;
