//! Drives the free-page reporter (pipelined passes, synchronous passes, completions in any
//! order, failures, resets) and the allocator under it with arbitrary op sequences against
//! the frame-state model of `hvmem::testing::report`; invariants are audited after every op,
//! and at the end every batch completes, everything is freed and no frame may stay isolated.
#![no_main]

use hvmem::testing::report::{Knobs, ReportHarness, ReportOp};
use hvmem_fuzz::{Ops, note_len};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (Knobs, Ops<ReportOp>)| {
    let (knobs, ops) = input;
    note_len("report_ops", &ops);
    let mut h = ReportHarness::new(knobs);
    for (i, op) in ops.ops.into_iter().enumerate() {
        if let Err(e) = h.apply(op) {
            panic!("{knobs:?} op {i} {op:?}: {e}");
        }
    }
    if let Err(e) = h.finish() {
        panic!("{knobs:?} finish: {e}");
    }
});
