//! Unit tests of the walker and of every operation, each run on every format.
//!
//! `ops.rs`: map, unmap, protect, split, collapse; `walker.rs`: visit order, re-reads,
//! actions, shared mode, destroy, corrupted entries; `misc.rs`: flush gather, entry layouts,
//! the arena, randomized sequences against the model, threads in shared mode.

mod misc;
mod ops;
mod walker;

use alloc::vec::Vec;

use super::*;
use crate::addr::{Hpa, Level};

pub(super) const KIB4: u64 = 4 << 10;
pub(super) const MIB2: u64 = 2 << 20;
pub(super) const GIB1: u64 = 1 << 30;
/// Physical base of the test arenas: table addresses look like real ones, not small numbers.
pub(super) const TABLES_AT: u64 = 0x7_0000_0000;

pub(super) fn frames(n: usize) -> Vec<TableFrame> {
    (0..n).map(|_| TableFrame::new()).collect()
}

pub(super) fn va(a: u64) -> Va {
    Va::new(a).unwrap()
}

pub(super) fn pa(a: u64) -> Hpa {
    Hpa::new(a).unwrap()
}

pub(super) fn rw<F: PteFormat>() -> F::Flags {
    <F::Flags as bitflags::Flags>::from_bits_retain(F::REQUIRED | F::WRITABLE | F::MMU_WRITABLE)
}

pub(super) fn bits<F: PteFormat>(f: F::Flags) -> u64 {
    bitflags::Flags::bits(&f)
}

/// A fresh page table over `n` frames.
pub(super) fn setup<F: PteFormat>(frames: &[TableFrame]) -> (TableArena<'_>, PageTable<F>) {
    let mut mem = TableArena::new(frames, pa(TABLES_AT)).unwrap();
    let pt = PageTable::<F>::new(&mut mem).unwrap();
    (mem, pt)
}

pub(super) fn assert_maps<F: PteFormat, M: TableMemory>(
    pt: &PageTable<F>,
    mem: &M,
    v: u64,
    p: u64,
    level: Level,
) {
    let t = pt.translate(mem, va(v)).unwrap();
    assert_eq!(t.pa.get(), p, "{} va {v:#x}", F::NAME);
    assert_eq!(t.level, level, "{} va {v:#x}", F::NAME);
}

macro_rules! per_format {
    ($($m:ident::$test:ident),* $(,)?) => {
        mod x86_64_4level {
            $(#[test] fn $test() { super::$m::$test::<super::X86_64>(); })*
        }
        mod x86_64_la57 {
            $(#[test] fn $test() { super::$m::$test::<super::X86_64La57>(); })*
        }
        mod ept {
            $(#[test] fn $test() { super::$m::$test::<super::Ept>(); })*
        }
    };
}

per_format!(
    ops::map_largest,
    ops::map_exact_and_refusals,
    ops::map_out_of_tables,
    ops::unmap_frees_after_flush,
    ops::protect_leaves,
    ops::split_keeps_translations,
    ops::split_1g_to_4k,
    ops::collapse_back,
    ops::collapse_refuses_mismatch,
    walker::walker_orders_and_rereads,
    walker::shared_mode_cas,
    walker::destroy_frees_all,
    walker::bad_table_entry,
);
