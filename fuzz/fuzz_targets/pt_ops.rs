//! Drives page tables of every format with arbitrary map / unmap / protect / split /
//! collapse sequences against the extent model of `hvmem::testing::spt`. After every op
//! the tree must map exactly what the model maps in the op's range and sampled translations
//! must agree; after every 16th op, and before the final unmap, the whole tree must match
//! and the tables allocated must equal the tables reachable (no leak); at the end
//! everything is unmapped and only the root may remain.
#![no_main]

use std::sync::OnceLock;

use hvmem::spt::{Ept, PteFormat, TableFrame, X86_64, X86_64La57};
use hvmem::testing::spt::{PtHarness, PtOp, frames, slots};
use hvmem_fuzz::{Ops, note_len};
use libfuzzer_sys::fuzz_target;

/// Table frames shared by every run (an arena zeroes a frame when it hands it out), so a
/// run does not pay for allocating them.
static FRAMES: OnceLock<Vec<TableFrame>> = OnceLock::new();

fn run<F: PteFormat>(ops: &[PtOp]) {
    let f = FRAMES.get_or_init(frames);
    let mut s = slots();
    let mut h = PtHarness::<F>::new(f, &mut s).expect("harness");
    for (i, op) in ops.iter().enumerate() {
        if let Err(e) = h.apply(*op) {
            panic!("{} op {i} {op:?}: {e}", F::NAME);
        }
    }
    if let Err(e) = h.finish() {
        panic!("{} finish: {e}", F::NAME);
    }
}

fuzz_target!(|ops: Ops<PtOp>| {
    // No cap on the sequence: `-max_len` bounds it (see .ci/run), and sequences of ~100 ops
    // are what reach states a few ops cannot (tables freed and reused, splits of splits).
    note_len("pt_ops", &ops);
    run::<X86_64>(&ops.ops);
    run::<X86_64La57>(&ops.ops);
    run::<Ept>(&ops.ops);
});
