//! The THP-order balloon beside a guest workload on one buddy allocator: arbitrary
//! inflations, deflations, allocations and punched holes, with the buddy's and the
//! balloon's invariants and the fewest-broken-host-pages property of
//! `hvmem::testing::balloon` checked after every op; at the end everything is deflated and
//! freed and must merge back.
#![no_main]

use hvmem::testing::balloon::{BalloonHarness, BalloonOp, BalloonSetup};
use hvmem_fuzz::{Ops, note_len};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (BalloonSetup, Ops<BalloonOp>)| {
    let (setup, ops) = input;
    note_len("balloon_ops", &ops);
    let mut h = BalloonHarness::new(setup);
    for (i, op) in ops.ops.into_iter().enumerate() {
        if let Err(e) = h.apply(op) {
            panic!("setup {setup:?} op {i} {op:?}: {e}");
        }
    }
    if let Err(e) = h.finish() {
        panic!("finish: {e}");
    }
});
