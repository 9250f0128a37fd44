//! Drives the buddy allocator with arbitrary op sequences against the frame-state model of
//! `hvmem::testing::buddy`; invariants are audited after every op, and at the end everything
//! is freed and must merge back into the largest blocks that fit.
#![no_main]

use hvmem::testing::buddy::{BuddyHarness, BuddyOp};
use hvmem_fuzz::{Ops, note_len};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|ops: Ops<BuddyOp>| {
    note_len("buddy_ops", &ops);
    let mut h = BuddyHarness::new();
    for (i, op) in ops.ops.into_iter().enumerate() {
        if let Err(e) = h.apply(op) {
            panic!("op {i} {op:?}: {e}");
        }
    }
    if let Err(e) = h.finish() {
        panic!("finish: {e}");
    }
});
