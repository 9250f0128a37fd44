//! The balloon and a guest workload sharing one buddy allocator, audited after every op (the
//! `balloon_ops` fuzz target and the randomized tests).
//!
//! After every op: the buddy's own invariants, the balloon's books against the buddy
//! ([`Balloon::check`]), the balloon never holding a block the workload holds, inflate and
//! deflate never exceeding what was asked, and — with [`FallbackPolicy::PreferBroken`] —
//! the property the policy exists for: after an inflation that broke a host page, at most
//! one host page the balloon broke still has free memory (the last one it broke), because
//! it never breaks a page while a broken one has something left to give.

use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use arrayvec::ArrayVec;

use super::Rng;
use crate::addr::{PageOrder, Pfn};
use crate::buddy::{Block, Buddy, FrameMeta, LockedBuddy};
use crate::hint::guest::{Balloon, BalloonConfig, FallbackPolicy, InflateOutcome};

/// The buddy's largest order.
pub const MAX_ORDER: usize = 10;
/// First frame of the window: not aligned to a host page, so edge pages are partial.
pub const WINDOW_BASE: u64 = 0x4_0000 - 200;
/// Frames in the window.
pub const WINDOW_FRAMES: u64 = 8400;
/// Blocks one inflate or deflate call may return.
pub const BATCH: usize = 64;

/// How the balloon is set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(fuzzing, derive(arbitrary::Arbitrary))]
pub struct BalloonSetup {
    /// Balloon order, folded to 0..=10.
    pub order: u8,
    /// Host page order, folded to 0..=10.
    pub host_order: u8,
    /// Plain fallback instead of preferring broken host pages.
    pub naive: bool,
}

/// One op.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(fuzzing, derive(arbitrary::Arbitrary))]
pub enum BalloonOp {
    /// Inflate by `frames` (folded below the window size).
    Inflate { frames: u16 },
    /// Deflate by `frames`.
    Deflate { frames: u16 },
    /// The workload allocates a block of `order % 4` (mostly small).
    Alloc { order: u8 },
    /// The workload frees its k-th block.
    Free { k: u16 },
    /// The workload frees every other block it holds, from the k-th on (punch holes).
    PunchHoles { k: u16 },
    /// The embedder frees the balloon's k-th block behind its back; the workload allocates a
    /// block of `order % 4` (which may take part of it), and the balloon inflates by
    /// `inflate` frames (which may get the rest). Every held block the new ones overlap
    /// must be dropped from the books and counted in `dropped_stale`; a lost block nothing
    /// overlapped is then released with `release_lost`, as an embedder would after `deflate`
    /// refused it.
    LoseBlock { k: u16, order: u8, inflate: u16 },
}

/// Buddy, balloon and workload.
pub struct BalloonHarness {
    buddy: LockedBuddy<Vec<FrameMeta>, MAX_ORDER>,
    balloon: Balloon<Vec<u64>>,
    live: Vec<Block>,
    ballooned: Vec<Block>,
    setup: BalloonSetup,
}

fn err<T>(what: impl Into<String>) -> Result<T, String> {
    Err(what.into())
}

impl BalloonHarness {
    /// A fully free window and an empty balloon.
    pub fn new(setup: BalloonSetup) -> Self {
        let base = Pfn::new(WINDOW_BASE).unwrap_or(Pfn::ZERO);
        let meta = vec![FrameMeta::HOLE; WINDOW_FRAMES as usize];
        let mut buddy: Buddy<_, MAX_ORDER> = match Buddy::new(meta, base) {
            Ok(b) => b,
            Err(e) => unreachable!("test window refused: {e}"),
        };
        if let Err(e) = buddy.add_range(base, WINDOW_FRAMES) {
            unreachable!("test range refused: {e}");
        }
        let cfg = BalloonConfig {
            order: PageOrder::new(setup.order % 11).unwrap_or(PageOrder::BASE),
            host_order: PageOrder::new(setup.host_order % 11).unwrap_or(PageOrder::BASE),
            policy: if setup.naive {
                FallbackPolicy::Naive
            } else {
                FallbackPolicy::PreferBroken
            },
        };
        let words =
            Balloon::<Vec<u64>>::storage_words(base, WINDOW_FRAMES, cfg.host_order).unwrap_or(0);
        let balloon = match Balloon::new(vec![0u64; words], base, WINDOW_FRAMES, cfg) {
            Ok(b) => b,
            Err(e) => unreachable!("balloon refused: {e}"),
        };
        Self {
            buddy: LockedBuddy::new(buddy),
            balloon,
            live: Vec::new(),
            ballooned: Vec::new(),
            setup,
        }
    }

    /// The balloon.
    pub fn balloon(&self) -> &Balloon<Vec<u64>> {
        &self.balloon
    }

    /// Host pages (of the balloon's host order) that the balloon holds part of and that
    /// still have free frames.
    pub fn broken_pages_with_free_memory(&self) -> u64 {
        let h = self.balloon.config().host_order;
        let first = WINDOW_BASE >> h.get();
        let last = (WINDOW_BASE + WINDOW_FRAMES - 1) >> h.get();
        let b = self.buddy.lock();
        (first..=last)
            .filter(|&hp| {
                let start = hp << h.get();
                let (lo, hi) = (
                    start.max(WINDOW_BASE),
                    (start + h.frames()).min(WINDOW_BASE + WINDOW_FRAMES),
                );
                let held = self
                    .ballooned
                    .iter()
                    .map(|blk| {
                        let (s, e) = (blk.pfn.get(), blk.pfn.get() + blk.order.frames());
                        e.min(hi).saturating_sub(s.max(lo))
                    })
                    .sum::<u64>();
                let pfn = Pfn::new(start).unwrap_or(Pfn::ZERO);
                held > 0 && held < hi - lo && b.free_frames_within(pfn, h) > 0
            })
            .count() as u64
    }

    /// Applies one op, then audits.
    pub fn apply(&mut self, op: BalloonOp) -> Result<(), String> {
        match op {
            BalloonOp::Inflate { frames } => {
                let (r, _) = self.inflate(u64::from(frames) % WINDOW_FRAMES, true)?;
                if r.dropped_stale != 0 {
                    return err(format!(
                        "dropped {} stale blocks, none was lost",
                        r.dropped_stale
                    ));
                }
            }
            BalloonOp::Deflate { frames } => {
                let want = u64::from(frames) % WINDOW_FRAMES;
                let mut out = ArrayVec::<Block, BATCH>::new();
                let before = self.balloon.frames();
                let r = self
                    .balloon
                    .deflate(&self.buddy, want, &mut out)
                    .map_err(|e| format!("deflate: {e}"))?;
                if r.frames > want || before - self.balloon.frames() != r.frames {
                    return err(format!("deflate({want}) = {r:?}"));
                }
                for b in &out {
                    let Some(i) = self
                        .ballooned
                        .iter()
                        .position(|x| x.pfn == b.pfn && x.order == b.order)
                    else {
                        return err(format!("deflated {b:?} was not ballooned"));
                    };
                    self.ballooned.swap_remove(i);
                }
            }
            BalloonOp::Alloc { order } => {
                if let Ok(b) = self
                    .buddy
                    .alloc(PageOrder::new(order % 4).unwrap_or(PageOrder::BASE))
                {
                    self.live.push(b);
                }
            }
            BalloonOp::Free { k } => {
                if !self.live.is_empty() {
                    let b = self.live.swap_remove(usize::from(k) % self.live.len());
                    self.buddy
                        .free(b.pfn, b.order)
                        .map_err(|e| format!("workload free: {e}"))?;
                }
            }
            BalloonOp::PunchHoles { k } => {
                let start = usize::from(k) % self.live.len().max(1);
                let mut kept = Vec::new();
                for (i, b) in (start..).zip(self.live.drain(..)) {
                    if i % 2 == 0 {
                        self.buddy
                            .free(b.pfn, b.order)
                            .map_err(|e| format!("workload free: {e}"))?;
                    } else {
                        kept.push(b);
                    }
                }
                self.live = kept;
            }
            BalloonOp::LoseBlock { k, order, inflate } => self.lose_block(k, order, inflate)?,
        }
        self.audit()
    }

    fn lose_block(&mut self, k: u16, order: u8, inflate: u16) -> Result<(), String> {
        if self.ballooned.is_empty() {
            return Ok(());
        }
        let lost = self
            .ballooned
            .swap_remove(usize::from(k) % self.ballooned.len());
        self.buddy
            .free(lost.pfn, lost.order)
            .map_err(|e| format!("freeing {lost:?} behind the balloon's back: {e}"))?;
        if let Ok(b) = self
            .buddy
            .alloc(PageOrder::new(order % 4).unwrap_or(PageOrder::BASE))
        {
            if (b.pfn, b.order) == (lost.pfn, lost.order) {
                // Exactly the lost block again: to the balloon's books it is its own block
                // (ABA; `release_lost` would say `StillHeld`). Not a case it can tell apart.
                self.buddy
                    .free(b.pfn, b.order)
                    .map_err(|e| format!("workload free: {e}"))?;
            } else {
                self.live.push(b);
            }
        }
        let (r, out) = self.inflate(u64::from(inflate) % WINDOW_FRAMES, false)?;
        let reclaimed = out.iter().any(|b| overlap(b, &lost));
        let expect = if reclaimed {
            (1, lost.order.frames())
        } else {
            (0, 0)
        };
        if (r.dropped_stale, r.dropped_frames) != expect {
            return err(format!(
                "lost {lost:?}, inflate got it back: {reclaimed}, dropped {} stale blocks",
                r.dropped_stale
            ));
        }
        if !reclaimed {
            let got = self.balloon.release_lost(&self.buddy, lost.pfn);
            if got != Ok(lost.order) {
                return err(format!("release_lost({lost:?}) = {got:?}"));
            }
        }
        Ok(())
    }

    /// Inflates by `want` frames and checks the outcome; returns it and the new blocks.
    /// `policy`: also check the fewest-broken-pages property (not while the balloon's books
    /// hold a block lost behind its back: it cannot know that block's frames are free).
    fn inflate(
        &mut self,
        want: u64,
        policy: bool,
    ) -> Result<(InflateOutcome, ArrayVec<Block, BATCH>), String> {
        let mut out = ArrayVec::<Block, BATCH>::new();
        let before = self.balloon.frames();
        let r = self
            .balloon
            .inflate(&self.buddy, want, &mut out)
            .map_err(|e| format!("inflate: {e}"))?;
        if r.frames > want || before + r.frames - r.dropped_frames != self.balloon.frames() {
            return err(format!("inflate({want}) = {r:?}"));
        }
        if !r.out_of_memory && !out.is_full() && r.frames != want {
            return err(format!("inflate({want}) stopped early: {r:?}"));
        }
        if out.len() != r.blocks as usize
            || out.iter().map(|b| b.order.frames()).sum::<u64>() != r.frames
        {
            return err("inflate's batch disagrees with its outcome");
        }
        for b in &out {
            if self.live.iter().any(|l| overlap(l, b)) {
                return err(format!("ballooned {b:?} overlaps a workload block"));
            }
        }
        self.ballooned.extend_from_slice(&out);
        if policy && !self.setup.naive && r.broke > 0 {
            let n = self.broken_pages_with_free_memory();
            if n > 1 {
                return err(format!(
                    "broke {} pages while {n} broken pages have free memory",
                    r.broke
                ));
            }
        }
        Ok((r, out))
    }

    /// The buddy's and the balloon's invariants, and the balloon's holdings.
    pub fn audit(&self) -> Result<(), String> {
        let b = self.buddy.lock();
        b.check_invariants().map_err(|v| format!("{v}"))?;
        self.balloon.check(&b).map_err(|v| format!("{v}"))?;
        let held: u64 = self.ballooned.iter().map(|x| x.order.frames()).sum();
        if held != self.balloon.frames() || self.ballooned.len() as u64 != self.balloon.blocks() {
            return err("the balloon's totals differ from the blocks it returned");
        }
        if let Some(x) = self.ballooned.iter().find(|x| !self.balloon.holds(x.pfn)) {
            return err(format!(
                "{x:?} was ballooned but the balloon does not hold it"
            ));
        }
        Ok(())
    }

    /// Deflates everything and checks that all memory merges back.
    pub fn finish(mut self) -> Result<(), String> {
        let mut out = ArrayVec::<Block, BATCH>::new();
        while self.balloon.frames() > 0 {
            out.clear();
            let r = self
                .balloon
                .deflate(&self.buddy, u64::MAX, &mut out)
                .map_err(|e| format!("deflate: {e}"))?;
            if r.blocks == 0 {
                return err("deflate made no progress");
            }
        }
        for b in self.live.drain(..) {
            self.buddy
                .free(b.pfn, b.order)
                .map_err(|e| format!("{e}"))?;
        }
        let b = self.buddy.lock();
        b.check_invariants().map_err(|v| format!("{v}"))?;
        if b.free_frames() != WINDOW_FRAMES || self.balloon.broken_host_pages() != 0 {
            return err("memory still held after deflating everything");
        }
        Ok(())
    }
}

fn overlap(a: &Block, b: &Block) -> bool {
    let (a0, a1) = (a.pfn.get(), a.pfn.get() + a.order.frames());
    let (b0, b1) = (b.pfn.get(), b.pfn.get() + b.order.frames());
    a0 < b1 && b0 < a1
}

/// A random op: workload churn, punched holes, inflations and deflations.
pub fn random_op(rng: &mut Rng) -> BalloonOp {
    match rng.below(20) {
        0..=6 => BalloonOp::Alloc {
            order: (rng.below(4) * rng.below(2)) as u8,
        },
        7..=9 => BalloonOp::Free {
            k: rng.next_u64() as u16,
        },
        10 => BalloonOp::PunchHoles {
            k: rng.next_u64() as u16,
        },
        11 => BalloonOp::LoseBlock {
            k: rng.next_u64() as u16,
            order: (rng.below(4) * rng.below(2)) as u8,
            inflate: rng.below(600) as u16,
        },
        12..=16 => BalloonOp::Inflate {
            frames: rng.below(1500) as u16,
        },
        _ => BalloonOp::Deflate {
            frames: rng.below(1500) as u16,
        },
    }
}
