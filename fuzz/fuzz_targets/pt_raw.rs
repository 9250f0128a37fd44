//! Drives page tables of every format the way a careless or hostile embedder may: the
//! normal operations mixed with raw entry writes through visitors, tables freed while
//! linked, `split_entry` into fresh, live or bogus children, entry handles rebuilt at random
//! addresses and levels, and random link counts and frees (`hvmem::testing::spt_raw`).
//! Nothing may panic or read outside the arena, every walk must end within its range's
//! bound, and while nothing raw was written since the last reset the tables reachable must
//! equal the tables allocated.
#![no_main]

use std::sync::OnceLock;

use hvmem::spt::{Ept, PteFormat, TableFrame, X86_64, X86_64La57};
use hvmem::testing::spt::slots;
use hvmem::testing::spt_raw::{RawOp, frames, run};
use hvmem_fuzz::{Ops, note_len};
use libfuzzer_sys::fuzz_target;

/// Table frames shared by every run (an arena zeroes a frame when it hands it out).
static FRAMES: OnceLock<Vec<TableFrame>> = OnceLock::new();

fn run_format<F: PteFormat>(ops: &[RawOp]) {
    let f = FRAMES.get_or_init(frames);
    let mut s = slots();
    if let Err(e) = run::<F>(f, &mut s, ops) {
        panic!("{e}");
    }
}

fuzz_target!(|ops: Ops<RawOp>| {
    note_len("pt_raw", &ops);
    run_format::<X86_64>(&ops.ops);
    run_format::<X86_64La57>(&ops.ops);
    run_format::<Ept>(&ops.ops);
});
