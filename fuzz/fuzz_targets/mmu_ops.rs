//! Drives the shadow MMU (memory slots added, deleted and moved; read and write faults;
//! guest writes; dirty logging enabled, read, cleared and disabled; zaps; page-limit
//! changes; fault caches given back) against the slot, host and dirty-bitmap model of
//! `hvmem::testing::mmu`, on EPT or x86-64 tables, with setups from ample to tiny (table
//! arena, descriptor pool, page limit). After every op `Mmu::check` must pass, every leaf
//! must map its gfn's host frame with permissions the slot and host allow, and every
//! logging slot's dirty log must equal the model's bitmap (no write lost, none invented).
#![no_main]

use std::sync::OnceLock;

use hvmem::spt::{Ept, PteFormat, TableFrame, X86_64};
use hvmem::testing::mmu::{MmuHarness, MmuOp, MmuSetup, frames, slots};
use hvmem_fuzz::{Ops, note_len};
use libfuzzer_sys::fuzz_target;

/// Table frames shared by every run (an arena zeroes a frame when it hands it out).
static FRAMES: OnceLock<Vec<TableFrame>> = OnceLock::new();

fn run<F: PteFormat>(setup: MmuSetup, ops: &[MmuOp]) {
    let f = FRAMES.get_or_init(frames);
    let mut s = slots();
    let mut h = MmuHarness::<F>::new(setup, f, &mut s).expect("harness");
    for (i, op) in ops.iter().enumerate() {
        if let Err(e) = h.apply(*op) {
            panic!("{} {setup:?} op {i} {op:?}: {e}", F::NAME);
        }
    }
}

fuzz_target!(|input: (MmuSetup, bool, Ops<MmuOp>)| {
    // One format per input: an op costs a check of every rmap head of every slot (a 1 GiB
    // slot has 262144), and running both formats would halve the runs per second.
    let (setup, x86, ops) = input;
    note_len("mmu_ops", &ops);
    if x86 {
        run::<X86_64>(setup, &ops.ops);
    } else {
        run::<Ept>(setup, &ops.ops);
    }
});
