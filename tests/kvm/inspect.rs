//! An independent reader of x86-64 4-level tables in guest RAM, straight from the SDM's bit
//! layout (no hvmem code), used to inspect what the operations left behind.

use super::ram::GuestRam;

const P: u64 = 1 << 0;
const PS: u64 = 1 << 7;
const ADDR: u64 = 0x000f_ffff_ffff_f000;

/// What a full walk of the tables found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Census {
    /// Tables reachable from the root, the root included.
    pub tables: usize,
    /// Present 4 KiB leaves.
    pub leaves_4k: usize,
    /// Present 2 MiB leaves.
    pub leaves_2m: usize,
    /// Present 1 GiB leaves.
    pub leaves_1g: usize,
    /// Bytes mapped.
    pub mapped: u64,
    /// Leaves whose output address is not their input address.
    pub not_identity: usize,
}

/// Walks every present entry reachable from `root`.
pub fn census(ram: &GuestRam, root: u64) -> Census {
    let mut c = Census::default();
    visit(ram, root, 4, 0, &mut c);
    c
}

fn visit(ram: &GuestRam, table: u64, level: u32, base: u64, c: &mut Census) {
    c.tables += 1;
    let shift = 12 + 9 * (level - 1);
    for i in 0..512u64 {
        let e = ram.read_u64(table + 8 * i);
        if e & P == 0 {
            continue;
        }
        let va = base | (i << shift);
        if level == 1 || e & PS != 0 {
            let size = 1u64 << shift;
            let pa = e & ADDR & !(size - 1);
            match level {
                1 => c.leaves_4k += 1,
                2 => c.leaves_2m += 1,
                3 => c.leaves_1g += 1,
                _ => panic!("PS bit in a level-{level} entry {e:#x}"),
            }
            c.mapped += size;
            if pa != va {
                c.not_identity += 1;
            }
        } else {
            visit(ram, e & ADDR, level - 1, va, c);
        }
    }
}

/// The leaf that maps `va`: its output address for `va`, its level and its raw entry.
pub fn walk(ram: &GuestRam, root: u64, va: u64) -> Option<(u64, u32, u64)> {
    let mut table = root;
    for level in (1..=4u32).rev() {
        let shift = 12 + 9 * (level - 1);
        let e = ram.read_u64(table + 8 * ((va >> shift) & 511));
        if e & P == 0 {
            return None;
        }
        if level == 1 || e & PS != 0 {
            let size = 1u64 << shift;
            return Some(((e & ADDR & !(size - 1)) | (va & (size - 1)), level, e));
        }
        table = e & ADDR;
    }
    None
}
