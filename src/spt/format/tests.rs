//! The predicates and conversions of every format, against hand-built entries.

use super::*;
use crate::addr::{Hpa, Level};

fn pa(a: u64) -> Hpa {
    Hpa::new(a).unwrap()
}

/// Properties every format has, whatever its bits.
fn common<F: PteFormat>() {
    let flags = F::REQUIRED | F::WRITABLE | F::MMU_WRITABLE;
    let table = F::table_entry(pa(0x1234_5000));
    for l in 2..=F::ROOT_LEVEL.get() {
        let level = Level::new(l).unwrap();
        assert!(F::is_table(table, level), "{} level {l}", F::NAME);
        assert!(!F::is_leaf(table, level));
        assert!(!F::is_huge(table, level));
    }
    assert_eq!(F::table_addr(table).get(), 0x1234_5000);
    // An aligned address alone (a deferred-free link) is never present.
    for link in [0, 0x1000, 0x000f_ffff_ffff_f000] {
        assert!(!F::is_present(link));
    }
    // Leaves at every size: address, flags and predicates round-trip.
    for l in 1..=F::LARGEST_LEAF.get() {
        let level = Level::new(l).unwrap();
        let addr = 0x40_0000_0000 + level.page_size() * 3;
        let leaf = F::leaf_entry(pa(addr), level, flags);
        assert!(F::is_present(leaf));
        assert!(F::is_leaf(leaf, level));
        assert_eq!(F::is_huge(leaf, level), l > 1);
        assert!(!F::is_table(leaf, level));
        assert_eq!(F::leaf_addr(leaf, level).get(), addr);
        assert_eq!(F::leaf_flags(leaf, level), flags);
        // Low address bits below the page size are dropped, never leak into flags.
        let sloppy = F::leaf_entry(pa(addr + 0x1000), level, flags);
        if l > 1 {
            assert_eq!(F::leaf_addr(sloppy, level).get(), addr);
        }
        if let Some(child) = level.lower() {
            // Child 0 of a split keeps flags and address; child i adds i pages.
            let first = F::split_child(leaf, level);
            assert!(F::is_leaf(first, child));
            assert_eq!(F::leaf_addr(first, child).get(), addr);
            assert_eq!(F::leaf_flags(first, child), flags);
            let last = first + (511 << child.shift());
            assert_eq!(
                F::leaf_addr(last, child).get(),
                addr + 511 * child.page_size()
            );
            assert_eq!(F::leaf_flags(last, child), flags);
        }
    }
    // The software bit is distinct from every hardware permission.
    assert_eq!(
        F::MMU_WRITABLE & (F::WRITABLE | F::REQUIRED | F::PRESENT_MASK),
        0
    );
    assert_eq!(F::MMU_WRITABLE & ADDR_MASK, 0);
    assert_eq!(F::FLAGS_MASK & ADDR_MASK, 0);
}

#[test]
fn x86_64_common() {
    common::<X86_64>();
    assert_eq!(X86_64::INPUT_BITS, 48);
}

#[test]
fn la57_common() {
    common::<X86_64La57>();
    assert_eq!(X86_64La57::INPUT_BITS, 57);
}

#[test]
fn ept_common() {
    common::<Ept>();
    assert_eq!(Ept::INPUT_BITS, 48);
}

#[test]
fn x86_bits_are_the_sdm_ones() {
    let f = X86Flags::PRESENT | X86Flags::WRITABLE | X86Flags::USER;
    // 4 KiB PTE: bits as given. 2 MiB PDE: PS set. Non-present: P clear.
    assert_eq!(X86_64::leaf_entry(pa(0x5000), Level::L1, f.bits()), 0x5007);
    assert_eq!(
        X86_64::leaf_entry(pa(0x20_0000), Level::L2, f.bits()),
        0x20_0087
    );
    assert_eq!(X86_64::table_entry(pa(0x9000)), 0x9007);
    assert!(!X86_64::is_present(0x5006));
    // PAT: bit 7 in the flags of any leaf, bit 12 in a huge entry.
    let pat = (f | X86Flags::PAT).bits();
    assert_eq!(X86_64::leaf_entry(pa(0x5000), Level::L1, pat), 0x5087);
    let huge = X86_64::leaf_entry(pa(0x4000_0000), Level::L3, pat);
    assert_eq!(huge, 0x4000_1087);
    assert_eq!(X86_64::leaf_addr(huge, Level::L3).get(), 0x4000_0000);
    assert_eq!(X86_64::leaf_flags(huge, Level::L3), pat);
    // Bit 7 at level 1 is PAT, never a table or a huge bit.
    assert!(X86_64::is_leaf(0x5087, Level::L1));
    assert!(!X86_64::is_huge(0x5087, Level::L1));
    // NX and software bits pass through.
    let nx = (f | X86Flags::NO_EXECUTE).bits() | (1 << 52);
    assert_eq!(
        X86_64::leaf_flags(X86_64::leaf_entry(pa(0), Level::L2, nx), Level::L2),
        nx
    );
}

#[test]
fn ept_bits_are_the_sdm_ones() {
    let f = EptFlags::READ | EptFlags::WRITE | EptFlags::EXECUTE | EptFlags::MEMTYPE_WB;
    assert_eq!(Ept::leaf_entry(pa(0x5000), Level::L1, f.bits()), 0x5037);
    assert_eq!(
        Ept::leaf_entry(pa(0x20_0000), Level::L2, f.bits()),
        0x20_00b7
    );
    assert_eq!(Ept::table_entry(pa(0x9000)), 0x9007);
    // Execute-only and user-execute-only entries are present; nothing else is.
    assert!(Ept::is_present(0x5004));
    assert!(Ept::is_present(0x5400));
    assert!(!Ept::is_present(0x5038));
    // Bit 7 cannot be smuggled in through the flags.
    assert_eq!(
        Ept::leaf_entry(pa(0x5000), Level::L1, f.bits() | 0x80),
        0x5037
    );
    assert_eq!(EptFlags::MMU_WRITABLE.bits(), 1 << 58);
}
