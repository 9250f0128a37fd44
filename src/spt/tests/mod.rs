//! Unit tests of the walker and of every operation, each run on every format.
//!
//! `ops.rs`: map, unmap, protect, split, collapse; `walker.rs`: visit order, re-reads,
//! actions, shared mode, destroy, corrupted entries; `misc.rs`: flush gather, entry layouts,
//! the arena, randomized sequences against the model, threads in shared mode.

mod dag;
mod misc;
mod ops;
mod walker;

use alloc::vec::Vec;

use super::*;
use crate::addr::{Address, Level};
pub(super) use crate::testing::spt::CountingFlush;

pub(super) const KIB4: u64 = 4 << 10;
pub(super) const MIB2: u64 = 2 << 20;
pub(super) const GIB1: u64 = 1 << 30;
/// Physical base of the test arenas: table addresses look like real ones, not small numbers.
pub(super) const TABLES_AT: u64 = 0x7_0000_0000;

/// Table frames and their out-of-band slots.
pub(super) struct Frames {
    pub(super) frames: Vec<TableFrame>,
    pub(super) slots: Vec<TableSlot>,
}

pub(super) fn frames(n: usize) -> Frames {
    Frames {
        frames: (0..n).map(|_| TableFrame::new()).collect(),
        slots: (0..n).map(|_| TableSlot::default()).collect(),
    }
}

/// An input address of any format.
pub(super) fn va<A: Address>(a: u64) -> A {
    A::from_raw(a).unwrap()
}

/// An output or table address.
pub(super) fn pa<A: Address>(a: u64) -> A {
    A::from_raw(a).unwrap()
}

pub(super) fn rw<F: PteFormat>() -> F::Flags {
    <F::Flags as bitflags::Flags>::from_bits_retain(F::REQUIRED | F::WRITABLE | F::MMU_WRITABLE)
}

pub(super) fn bits<F: PteFormat>(f: F::Flags) -> u64 {
    bitflags::Flags::bits(&f)
}

/// A fresh page table over `n` frames.
pub(super) fn setup<'a, F: PteFormat>(
    frames: &'a [TableFrame],
    slots: &'a mut [TableSlot],
) -> (TableArena<'a>, PageTable<F>) {
    let mut mem = TableArena::new(frames, slots, pa(TABLES_AT)).unwrap();
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
    assert_eq!(t.pa.raw(), p, "{} va {v:#x}", F::NAME);
    assert_eq!(t.level, level, "{} va {v:#x}", F::NAME);
}

/// Maps `[v, v + len)` to `p` read-write with the sizes `size` allows, exclusively; must work.
pub(super) fn map_rw<F: PteFormat, M: TableMemory>(
    pt: &PageTable<F>,
    mem: &mut M,
    v: u64,
    p: u64,
    len: u64,
    size: MapSize,
) {
    pt.map(mem, va(v), pa(p), len, rw::<F>(), size, WalkFlags::empty())
        .unwrap();
}

/// Splits a range and returns how many leaves were split; the memory must not run dry.
pub(super) fn split_n<F: PteFormat, M: TableMemory>(
    pt: &PageTable<F>,
    mem: &mut M,
    start: u64,
    len: u64,
    to: SplitTo,
    mode: WalkFlags,
) -> Result<usize, SplitError> {
    let done = pt.split(mem, va(start), len, to, mode)?;
    assert_eq!(done.resume_at, None, "{} split ran out of tables", F::NAME);
    Ok(done.split)
}

/// Collapses a range completely (as many calls as the pending flushes' room needs),
/// flushing each time; returns how many tables were collapsed.
pub(super) fn collapse_all<F: PteFormat, M: TableMemory>(
    pt: &mut PageTable<F>,
    mem: &mut M,
    tlb: &mut CountingFlush,
    start: u64,
    len: u64,
    max: Level,
) -> Result<usize, CollapseError> {
    let mut total = 0;
    loop {
        let pending = pt.collapse(mem, va(start), len, max)?;
        total += pending.tables_to_free();
        let again = pending.is_incomplete();
        pending.flush(tlb, mem).unwrap();
        if !again {
            return Ok(total);
        }
    }
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
    ops::split_at_the_top_of_the_address_space,
    ops::collapse_back,
    ops::collapse_refuses_mismatch,
    walker::walker_orders_and_rereads,
    walker::shared_mode_cas,
    walker::destroy_frees_all,
    walker::bad_table_entry,
    dag::two_parent_dag,
    dag::destroy_keeps_shared_child,
    dag::a_shared_table_is_changed_whole_or_flushed_everywhere,
    dag::split_entry_refusals,
    dag::existing_child_with_table_asks_for_flush,
    dag::split_from_a_cache_resumes,
    dag::subtree_walks_and_handles,
    dag::max_leaf_level_holds,
    dag::unmap_refuses_before_changing_anything,
);
