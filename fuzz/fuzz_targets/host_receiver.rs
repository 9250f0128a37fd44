//! Arbitrary guest buffers against the host side: the `ReportReceiver` (report chains,
//! `pa | order` hints, balloon PFN arrays, raw ranges) and the `FreePageHintSession` (command
//! ids, hints, syncs), over an arbitrary RAM layout. The harness of
//! `hvmem::testing::receiver` checks after every op that nothing outside guest RAM is
//! discarded or cleared, that discards are exactly the model's, that accepted + clamped +
//! rejected bytes add up, that every decoded wire entry re-encodes to its bytes, and that a
//! hint clears bits only in its own round. The wire decoders are fuzzed here, through the
//! raw-buffer ops.
#![no_main]

use hvmem::testing::receiver::{ReceiverHarness, ReceiverOp, RegionSpec};
use hvmem_fuzz::{Ops, note_len};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (Vec<RegionSpec>, Ops<ReceiverOp>)| {
    let (layout, ops) = input;
    note_len("host_receiver", &ops);
    let mut h = ReceiverHarness::new(&layout);
    for (i, op) in ops.ops.iter().enumerate() {
        if let Err(e) = h.apply(op) {
            panic!("op {i} {op:?}: {e}");
        }
    }
});
