//! What the guest does with the balloon device: the `report` command's pipelined passes,
//! and the idle loop's background duties (following the balloon target, answering free page
//! hint runs), as Linux does them from its workqueues.

use alloc::vec::Vec;

use arrayvec::ArrayVec;
use hvmem::PageOrder;
use hvmem::buddy::Block;
use hvmem_virtio_balloon::{HintError, HintState, ReportError};

use crate::cmd::Guest;
use crate::phys::PAGE;
use crate::println;

/// Blocks per balloon message batch (what `Balloon::inflate` pushes before the driver tells
/// the host).
const BALLOON_BATCH: usize = 64;
/// Report passes one `report` command runs at most.
const MAX_PASSES: u32 = 256;
/// Polls of the used ring before a report pass is declared stuck.
const REPORT_SPIN: u64 = 1 << 28;
/// The largest block a hint run allocates: 4 MiB, the buddy's largest order.
const HINT_TOP_ORDER: u8 = 10;
/// Attempts to queue one hint block while the hint queue is full (each recycles returned
/// buffers and kicks the queue) before the run gives up on the rest of its blocks.
const HINT_FULL_RETRIES: u64 = 1 << 22;

impl Guest {
    /// `report`: pipelined passes over the reporting queue until a pass reports nothing.
    pub fn report_command(&mut self) {
        let Some(dev) = self.dev.as_mut() else {
            println!("HVMEM ERR report no balloon device");
            return;
        };
        let before = self.pipeline.stats();
        let mut passes = 0u32;
        loop {
            let pass_before = self.pipeline.stats().reported_frames;
            passes += 1;
            if let Err(e) = self.pipeline.start_pass(&self.reporter, self.buddy, dev) {
                println!("HVMEM ERR report pass failed: {e}");
                return;
            }
            let mut spins = 0u64;
            while self.pipeline.pass_running() || self.pipeline.in_flight() > 0 {
                let (id, ok) = match dev.poll_report() {
                    Ok(Some(id)) => (id, true),
                    Ok(None) => {
                        spins += 1;
                        if spins > REPORT_SPIN {
                            println!("HVMEM ERR report device stopped returning batches");
                            return;
                        }
                        core::hint::spin_loop();
                        continue;
                    }
                    Err(ReportError::BadUsedLength { id, .. }) => (id, false),
                    Err(e) => {
                        // Always this kernel's one allocator: not refused.
                        let _ = self.pipeline.fail_all(&self.reporter, self.buddy);
                        println!("HVMEM ERR report queue failed: {e}");
                        return;
                    }
                };
                spins = 0;
                if let Err(e) = self.pipeline.complete(&self.reporter, self.buddy, id, ok) {
                    println!("hvmem-guest: completion of {id} refused: {e}");
                }
                if let Err(e) = self.pipeline.fill(&self.reporter, self.buddy, dev) {
                    println!("HVMEM ERR report refill failed: {e}");
                    return;
                }
            }
            let reported = self.pipeline.stats().reported_frames - pass_before;
            if reported == 0 || passes >= MAX_PASSES {
                break;
            }
        }
        let after = self.pipeline.stats();
        let total = self.buddy.lock().reported_frames() * PAGE;
        println!(
            "HVMEM OK report reported={} batches={} passes={passes} total_reported={total}",
            (after.reported_frames - before.reported_frames) * PAGE,
            after.submitted - before.submitted,
        );
    }

    /// One round of background work; returns whether it did anything.
    pub fn duties(&mut self) -> bool {
        self.follow_balloon() | self.serve_hints()
    }

    /// Inflates or deflates towards the device's `num_pages` with hvmem's THP-order balloon.
    fn follow_balloon(&mut self) -> bool {
        let Some(dev) = self.dev.as_mut() else {
            return false;
        };
        let Ok(target) = dev.target_pages() else {
            return false;
        };
        let held = self.balloon.frames();
        if u64::from(target) == held || self.balloon_seen == Some(target) {
            return false;
        }
        self.balloon_seen = Some(target);
        let (mut inflated, mut deflated) = (0u64, 0u64);
        let mut failure: Option<&str> = None;
        let mut out = ArrayVec::<Block, BALLOON_BATCH>::new();
        if u64::from(target) > held {
            let mut want = u64::from(target) - held;
            while want > 0 {
                out.clear();
                let r = self.balloon.inflate(self.buddy, want, &mut out);
                let Ok(o) = r else {
                    failure = Some("inflate refused by the balloon");
                    break;
                };
                self.broke_huge += u64::from(o.broke);
                if !out.is_empty() && dev.inflate_blocks(&out).is_err() {
                    failure = Some("inflate queue failed");
                    break;
                }
                inflated += o.frames;
                want = want.saturating_sub(o.frames);
                if o.out_of_memory || o.frames == 0 {
                    break;
                }
            }
        } else {
            let mut want = held - u64::from(target);
            while want > 0 {
                out.clear();
                let Ok(o) = self.balloon.deflate(self.buddy, want, &mut out) else {
                    failure = Some("deflate refused by the balloon");
                    break;
                };
                if !out.is_empty() && dev.deflate_blocks(&out).is_err() {
                    failure = Some("deflate queue failed");
                    break;
                }
                deflated += o.frames;
                want = want.saturating_sub(o.frames);
                if o.frames == 0 {
                    break;
                }
            }
        }
        let actual = u32::try_from(self.balloon.frames()).unwrap_or(u32::MAX);
        if dev.set_actual(actual).is_err() {
            failure = Some("config write failed");
        }
        println!("HVMEM EVENT balloon actual={actual} inflated={inflated} deflated={deflated}");
        if let Some(f) = failure {
            println!("hvmem-guest: balloon: {f}");
        }
        true
    }

    /// Answers a free page hint run: hold free blocks, largest first, and hint them; free
    /// them when the host says DONE.
    fn serve_hints(&mut self) -> bool {
        let Some(dev) = self.dev.as_mut() else {
            return false;
        };
        let mut worked = false;
        if let HintState::Ended(run) = dev.hint_state() {
            match dev.hint_done() {
                Ok(true) => {
                    let mut freed = 0u64;
                    for b in self.hint_held.drain(..) {
                        if let Ok(merged) = self.buddy.free_merged(b.pfn, b.order) {
                            freed += b.order.bytes();
                            let _ = self.reporter.on_free(merged);
                        }
                    }
                    self.balloon_seen = None;
                    println!("HVMEM EVENT hint-done cmd_id={} freed={freed}", run.get());
                    worked = true;
                }
                Ok(false) => {}
                Err(e) => println!("hvmem-guest: hint done: {e}"),
            }
        }
        if matches!(dev.hint_state(), HintState::Running(_)) {
            return worked;
        }
        let Ok(Some(id)) = dev.hint_pending() else {
            return worked;
        };
        if let Err(e) = dev.hint_begin(id) {
            println!("hvmem-guest: hint begin {}: {e}", id.get());
            return true;
        }
        let bytes = hint_run(self.buddy, dev, &mut self.hint_held);
        if let Err(e) = dev.hint_end() {
            println!("hvmem-guest: hint end {}: {e}", id.get());
        }
        self.hinted = bytes;
        println!("HVMEM EVENT hint cmd_id={} bytes={bytes}", id.get());
        true
    }
}

/// Allocates free blocks from the largest order down and hints each; returns the bytes
/// hinted. Blocks that could not be hinted go straight back.
fn hint_run(
    buddy: &'static crate::mem::Frames,
    dev: &mut crate::hal::Device,
    held: &mut Vec<Block>,
) -> u64 {
    let mut bytes = 0u64;
    for o in (0..=HINT_TOP_ORDER).rev() {
        let Ok(order) = PageOrder::new(o) else {
            continue;
        };
        loop {
            if held.try_reserve(1).is_err() {
                return bytes;
            }
            let Ok(b) = buddy.alloc(order) else { break };
            // A full queue means the host's hint thread has not caught up yet: the driver
            // recycled what came back and kicked the queue, so wait and retry the same block
            // (a bounded number of times) instead of ending the run early.
            let mut retries = 0u64;
            let result = loop {
                match dev.hint_block(b.pfn.addr().get(), b.order.bytes()) {
                    Err(HintError::QueueFull) if retries < HINT_FULL_RETRIES => {
                        retries += 1;
                        core::hint::spin_loop();
                    }
                    r => break r,
                }
            };
            match result {
                Ok(()) => {
                    bytes += b.order.bytes();
                    held.push(b);
                }
                Err(e) => {
                    let _ = buddy.free(b.pfn, b.order);
                    println!("hvmem-guest: hint run stopped: {e}");
                    return bytes;
                }
            }
        }
    }
    bytes
}
