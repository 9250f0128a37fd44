//! A THP-order memory balloon that breaks as few host huge pages as it can
//! (Hildenbrand, "Re: [RFC for Linux] virtio_balloon: Add VIRTIO_BALLOON_F_THP_ORDER to handle
//! THP spilt issue", 2020-03-12).
//!
//! # The problem
//! A classic balloon (Linux `fill_balloon`) takes 4 KiB pages from the guest allocator and
//! the host discards each one. When the guest's free memory is fragmented, those pages are
//! spread over many 2 MiB host pages, and every one of them loses its transparent huge page:
//! in that thread ballooning 400 MiB out of a guest that ran `usemem --punch-holes` dropped the
//! host's AnonHugePages from 976896 kB to 153600 kB. Hui Zhu's fix allocates at the THP
//! order instead; David Hildenbrand answered that (1) the balloon must fall back to smaller
//! allocations when large ones run out, and (5) the order must come from the host.
//!
//! # What this balloon does
//! It inflates towards a target in 4 KiB frames at a host-given order ([`BalloonConfig`]).
//! Blocks of the host's page order or larger never break a host page, so it takes those
//! first, falling back order by order down to the host page order. Below it — the fallback
//! Hildenbrand asks for — every block costs the host a huge page *unless that huge page is
//! already broken*. With [`FallbackPolicy::PreferBroken`] the balloon therefore
//!
//! 1. keeps draining the host page it broke last ([`Buddy::alloc_within`](crate::buddy::Buddy::alloc_within));
//! 2. then takes free blocks inside any other host page it has broken before;
//! 3. only then breaks a new one, choosing among intact host pages by their free frames
//!    ([`Buddy::free_frames_within`](crate::buddy::Buddy::free_frames_within), computed once per call): the smallest page that covers
//!    what is still wanted (so whole free pages the guest could use as THPs stay whole), or,
//!    when none covers it, the page with the most free frames (fewest breaks).
//!
//! Taking pages with the most free frames first is the fewest pages that can hold a fallback
//! of `R` frames, and the tightest covering page for the rest adds one; after `usemem
//! --punch-holes` (256 free frames in each page) that is `ceil(R / 256)`. A plain fallback
//! ([`FallbackPolicy::Naive`], what every implementation we know does — Linux, Hui Zhu's
//! patch, QEMU, Firecracker, Cloud Hypervisor, crosvm) breaks as many as the allocator's
//! free-list order happens to touch: after the guest frees its holes in random order, nearly
//! all of them. The estimates are taken once per [`Balloon::inflate`] call, so the choice is
//! minimal for what was free then.
//!
//! The balloon's blocks are ordinary allocated blocks in the buddy's view; the balloon
//! remembers exactly which blocks are its own — a bitmap of their heads and one of their last
//! frames (one bit per frame each), so every held block's order is the balloon's record, not
//! the buddy's — and how many frames it holds in each host page. It frees only a block the
//! buddy still has allocated with that head and that order: a block the embedder freed behind
//! its back, even one the guest has since allocated again as part of a larger block, is refused
//! with [`DeflateError::NotHeld`], and nothing changes ([`Balloon::release_lost`] then drops
//! it from the books). If the buddy hands such a block's frames to the balloon again before
//! that, the new record replaces the stale one ([`InflateOutcome::dropped_stale`]): held
//! records never overlap. Deflating returns fully ballooned host
//! pages first (the host refaults each as a fresh huge page), then pieces of broken ones, never
//! more than asked. The blocks of each call go to the embedder, which sends them as PFN arrays
//! ([`crate::hint::wire::block_pfns`]).
//!
//! Host pages are aligned in guest frame numbers: the embedder maps guest RAM at host
//! addresses aligned to the host page size (as QEMU and Firecracker do for THP).
//!
//! # Concurrency
//! The balloon is `&mut self`, driven by one thread (Linux: the balloon workqueue). It takes
//! the [`LockedBuddy`] lock for each allocation, free and per-host-page query, never across
//! them, so other CPUs allocate and free meanwhile; its free-frame estimates may then be
//! stale, which can make a choice worse, never wrong: every allocation is the buddy's.

use core::ops::DerefMut;

use arrayvec::ArrayVec;

use crate::addr::{PageOrder, Pfn};
use crate::buddy::{Block, BlockState, FrameMeta, FreeError, LockedBuddy};
use crate::hint::wire::hint_error_display;

/// How the balloon falls back below the host page order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum FallbackPolicy {
    /// Whatever the allocator hands out next ([`Buddy::alloc_at_most`], Linux
    /// `alloc_pages`): the baseline.
    ///
    /// [`Buddy::alloc_at_most`]: crate::buddy::Buddy::alloc_at_most
    Naive,
    /// Small blocks from host pages already broken first; see the module docs.
    #[default]
    PreferBroken,
}

/// What the host asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BalloonConfig {
    /// The order the balloon allocates at when it can (Hui Zhu's
    /// `VIRTIO_BALLOON_THP_ORDER`, given by the host): 9 for 2 MiB, 0 for a classic
    /// balloon. Capped at the buddy's `MAX_ORDER`.
    pub order: PageOrder,
    /// The order of the host's backing pages (9 for THP and 2 MiB hugetlb).
    pub host_order: PageOrder,
    /// How to fall back below `host_order`.
    pub policy: FallbackPolicy,
}

/// Why [`Balloon::new`] refused its storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum BalloonNewError {
    /// The window has no frames.
    EmptyWindow,
    /// The window reaches beyond the 52-bit physical address space.
    OutOfRange,
    /// The storage has fewer words than [`Balloon::storage_words`] asks for.
    StorageTooSmall,
    /// The books of the window do not fit in the address space (only on targets whose
    /// `usize` is narrower than the window's bitmaps): [`Balloon::storage_words`] says `None`.
    TooLarge,
}

hint_error_display!(BalloonNewError {
    EmptyWindow => "balloon window is empty",
    OutOfRange => "balloon window beyond the physical address space",
    StorageTooSmall => "balloon storage smaller than storage_words()",
    TooLarge => "balloon books do not fit in the address space",
});

/// Why an inflation stopped early.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum InflateError {
    /// The buddy handed out a block outside the balloon's window (the balloon was built for
    /// a different window); the block went back to the buddy.
    OutsideWindow,
    /// The balloon holds blocks of another allocator; nothing was done.
    ForeignBuddy,
}

hint_error_display!(InflateError {
    OutsideWindow => "buddy block outside the balloon's window",
    ForeignBuddy => "the balloon holds blocks of another allocator",
});

/// Why a deflation stopped early.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeflateError {
    /// The buddy no longer holds the block the balloon recorded at `pfn` (same head, same
    /// order, allocated): someone freed it behind the balloon's back, and perhaps the guest
    /// allocated the frames again, alone or as part of a larger block. The balloon refuses
    /// to free what it does not own; the block stays in its books and the buddy is
    /// untouched.
    NotHeld {
        /// Head of the block the balloon recorded.
        pfn: Pfn,
    },
    /// The buddy refused to free a ballooned block.
    Free(FreeError),
    /// [`Balloon::release_lost`] was asked to drop a block the buddy still holds for the
    /// balloon (same head, same order, allocated): deflate it instead.
    StillHeld {
        /// Head of the block.
        pfn: Pfn,
    },
    /// The balloon's blocks came from another allocator; nothing changed.
    ForeignBuddy,
}

impl core::fmt::Display for DeflateError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NotHeld { pfn } => write!(
                f,
                "ballooned block at pfn {:#x} is no longer the buddy's allocated block",
                pfn.get()
            ),
            Self::Free(e) => write!(f, "buddy refused a ballooned block: {e}"),
            Self::ForeignBuddy => f.write_str("the balloon's blocks came from another allocator"),
            Self::StillHeld { pfn } => write!(
                f,
                "ballooned block at pfn {:#x} is still allocated: deflate it",
                pfn.get()
            ),
        }
    }
}

impl core::error::Error for DeflateError {}

/// What one [`Balloon::inflate`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct InflateOutcome {
    /// Frames added to the balloon.
    pub frames: u64,
    /// Blocks added (also pushed to the caller's batch).
    pub blocks: u32,
    /// Host pages that were intact when the call started and that the balloon now holds
    /// part, not all, of: huge pages this call cost the host.
    pub broke: u32,
    /// The buddy had nothing more to give ("Out of puff").
    pub out_of_memory: bool,
    /// Blocks dropped from the books because a block this call received overlaps them:
    /// blocks the embedder freed behind the balloon's back (see
    /// [`release_lost`](Balloon::release_lost)), whose frames the buddy has now handed out
    /// again — to the balloon, so they are certainly no longer the old blocks. Without
    /// this the balloon would count those frames twice.
    pub dropped_stale: u32,
    /// Frames of those blocks: [`Balloon::frames`] grew by `frames - dropped_frames`.
    pub dropped_frames: u64,
}

/// What one [`Balloon::deflate`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DeflateOutcome {
    /// Frames given back to the buddy.
    pub frames: u64,
    /// Blocks given back (also pushed to the caller's batch).
    pub blocks: u32,
}

/// A broken rule found by [`Balloon::check`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BalloonViolation {
    /// Which rule.
    pub rule: &'static str,
    /// Where.
    pub pfn: u64,
}

impl core::fmt::Display for BalloonViolation {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "balloon invariant broken at pfn {:#x}: {}",
            self.pfn, self.rule
        )
    }
}

impl core::error::Error for BalloonViolation {}

/// A host page's word: bits 0..31 the frames the balloon holds in it, bits 32..62 its free
/// frame estimate, bit 63 "intact when this inflation started and touched by it".
const COUNT: u64 = 0x7fff_ffff;
const EST_SHIFT: u32 = 32;
const STAMP: u64 = 1 << 63;

/// The balloon; see the module docs.
///
/// `S` is its storage, [`storage_words`](Self::storage_words) `u64`s: two bits per frame of
/// the window — a bitmap of the heads of the blocks it holds, then a bitmap of their last
/// frames, so each held block's order is its own record, not the buddy's — then one word per
/// host page (frames held, free-frame estimate, a stamp).
#[derive(Clone, Debug)]
pub struct Balloon<S> {
    words: S,
    base: u64,
    window: u64,
    bitmap_words: usize,
    first_hp: u64,
    host_pages: usize,
    cfg: BalloonConfig,
    held: u64,
    blocks: u64,
    partial: u64,
    full_pages: u64,
    current: Option<usize>,
    fresh: bool,
    stamped: bool,
    /// The largest order ever recorded: how far back a held block can start and still reach
    /// a given frame.
    max_order: u8,
    /// The [storage key](crate::buddy::Buddy) of the allocator the held blocks came from.
    owner: usize,
}

impl<S: DerefMut<Target = [u64]>> Balloon<S> {
    /// The `u64`s of storage a balloon over `frames` frames from `base` needs, or `None`
    /// when the window is empty, reaches past the physical address space, or its books do not
    /// fit in a `usize`.
    pub const fn storage_words(base: Pfn, frames: u64, host_order: PageOrder) -> Option<usize> {
        if frames == 0 {
            return None;
        }
        let Some(last) = base.checked_add(frames - 1) else {
            return None;
        };
        let h = host_order.get();
        // Below FRAME_LIMIT (2^40) nothing here overflows a u64.
        let host_pages = (last.get() >> h) - (base.get() >> h) + 1;
        let words = 2 * frames.div_ceil(64) + host_pages;
        if words > usize::MAX as u64 {
            return None;
        }
        Some(words as usize)
    }

    /// A balloon for the buddy window of `frames` frames from `base`, holding nothing.
    /// Overwrites `storage`.
    pub fn new(
        mut storage: S,
        base: Pfn,
        frames: u64,
        cfg: BalloonConfig,
    ) -> Result<Self, BalloonNewError> {
        if frames == 0 {
            return Err(BalloonNewError::EmptyWindow);
        }
        if base.checked_add(frames - 1).is_none() {
            return Err(BalloonNewError::OutOfRange);
        }
        let Some(need) = Self::storage_words(base, frames, cfg.host_order) else {
            return Err(BalloonNewError::TooLarge);
        };
        if storage.len() < need {
            return Err(BalloonNewError::StorageTooSmall);
        }
        storage.fill(0);
        // `need` fits in a usize, so the bitmaps do.
        let bitmap_words = frames.div_ceil(64) as usize;
        Ok(Self {
            words: storage,
            base: base.get(),
            window: frames,
            bitmap_words,
            first_hp: base.get() >> cfg.host_order.get(),
            host_pages: need - 2 * bitmap_words,
            cfg,
            held: 0,
            blocks: 0,
            partial: 0,
            full_pages: 0,
            current: None,
            fresh: false,
            stamped: false,
            max_order: 0,
            owner: 0,
        })
    }

    /// The configuration.
    pub fn config(&self) -> BalloonConfig {
        self.cfg
    }

    /// Frames in the balloon.
    pub fn frames(&self) -> u64 {
        self.held
    }

    /// Blocks in the balloon.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Host pages the balloon holds part of: each cost the host a huge page it still backs
    /// with small pages.
    pub fn broken_host_pages(&self) -> u64 {
        self.partial
    }

    /// Host pages the balloon holds entirely.
    pub fn full_host_pages(&self) -> u64 {
        self.full_pages
    }

    /// Whether a block of the balloon starts at `pfn`.
    pub fn holds(&self, pfn: Pfn) -> bool {
        pfn.get()
            .checked_sub(self.base)
            .filter(|&i| i < self.window)
            .is_some_and(|i| self.bit(self.base + i))
    }

    fn h(&self) -> u8 {
        self.cfg.host_order.get()
    }

    /// First frame of host page `p`.
    fn hp_pfn(&self, p: usize) -> Pfn {
        Pfn::from_raw((self.first_hp + p as u64) << self.h())
    }

    /// Host page index of a frame inside the window.
    fn hp_of(&self, pfn: u64) -> usize {
        ((pfn >> self.h()) - self.first_hp) as usize
    }

    /// Frames of host page `p` inside the window.
    fn hp_frames(&self, p: usize) -> u64 {
        let start = (self.first_hp + p as u64) << self.h();
        let end = start + (1 << self.h());
        end.min(self.base + self.window) - start.max(self.base)
    }

    /// Index of the first host page word: after the head and end bitmaps.
    fn hp_base(&self) -> usize {
        2 * self.bitmap_words
    }

    fn count(&self, p: usize) -> u64 {
        self.words[self.hp_base() + p] & COUNT
    }

    fn est(&self, p: usize) -> u64 {
        (self.words[self.hp_base() + p] & !STAMP) >> EST_SHIFT
    }

    fn set_est(&mut self, p: usize, est: u64) {
        let at = self.hp_base() + p;
        let w = &mut self.words[at];
        *w = (*w & (COUNT | STAMP)) | (est.min(COUNT) << EST_SHIFT);
    }

    /// Adds `delta` frames (negative to remove) to host page `p`, keeping the counters of
    /// broken and full pages.
    fn adjust(&mut self, p: usize, add: u64, remove: u64) {
        let full = self.hp_frames(p);
        let before = self.count(p);
        let after = before + add - remove;
        let class = |c: u64| (c > 0 && c < full, c == full);
        let (bp, bf) = class(before);
        let (ap, af) = class(after);
        self.partial = self.partial + u64::from(ap) - u64::from(bp);
        self.full_pages = self.full_pages + u64::from(af) - u64::from(bf);
        let at = self.hp_base() + p;
        let w = &mut self.words[at];
        *w = (*w & !COUNT) | after;
    }

    /// Records a block the buddy gave the balloon, stamping the intact host pages it breaks.
    /// Returns how many stale blocks it dropped on the way, and their frames
    /// ([`drop_overlapping`]).
    ///
    /// [`drop_overlapping`]: Self::drop_overlapping
    fn record(&mut self, b: &Block) -> Result<(u32, u64), InflateError> {
        let (first, n) = (b.pfn.get(), b.order.frames());
        if first < self.base || first + n > self.base + self.window {
            return Err(InflateError::OutsideWindow);
        }
        let i = first - self.base;
        let e = i + n - 1;
        let dropped = self.drop_overlapping(i, e);
        self.words[(i / 64) as usize] |= 1 << (i % 64);
        self.words[self.bitmap_words + (e / 64) as usize] |= 1 << (e % 64);
        self.max_order = self.max_order.max(b.order.get());
        let mut f = first;
        while f < first + n {
            let p = self.hp_of(f);
            let chunk = (((f >> self.h()) + 1) << self.h()).min(first + n) - f;
            if self.count(p) == 0 && chunk < self.hp_frames(p) {
                let at = self.hp_base() + p;
                self.words[at] |= STAMP;
                self.stamped = true;
            }
            self.adjust(p, chunk, 0);
            let est = self.est(p).saturating_sub(chunk);
            self.set_est(p, est);
            f += chunk;
        }
        self.held += n;
        self.blocks += 1;
        Ok(dropped)
    }

    /// Drops from the books every held block that overlaps window frames `[i, e]` and returns
    /// how many, and their frames. The buddy has just handed out those frames, so any such block is one the
    /// embedder freed behind the balloon's back. Held blocks are disjoint (this keeps them
    /// so): only the nearest head before `i` can reach into the range, and only from at most
    /// `2^max_order - 1` frames back; every other overlapping block has its head inside.
    fn drop_overlapping(&mut self, i: u64, e: u64) -> (u32, u64) {
        let mut dropped = (0, 0);
        let reach = (1u64 << self.max_order) - 1;
        if let Some(h) = self.head_before(i, reach) {
            if let Some(order) = self.order_at(h).filter(|o| h + o.frames() > i) {
                self.forget(Pfn::from_raw(self.base + h), order);
                dropped = (dropped.0 + 1, dropped.1 + order.frames());
            }
        }
        let mut j = i;
        while j <= e {
            let word = self.words[(j / 64) as usize] >> (j % 64);
            if word == 0 {
                j = (j / 64 + 1) * 64;
                continue;
            }
            j += u64::from(word.trailing_zeros());
            if j > e {
                break;
            }
            if let Some(order) = self.order_at(j) {
                self.forget(Pfn::from_raw(self.base + j), order);
                dropped = (dropped.0 + 1, dropped.1 + order.frames());
            }
            j += 1;
        }
        dropped
    }

    /// The last head bit in window frames `[i - reach, i)`, if any.
    fn head_before(&self, i: u64, reach: u64) -> Option<u64> {
        let lo = i.saturating_sub(reach);
        let mut j = i;
        while j > lo {
            // Bits of word `(j - 1) / 64` below `j`, and at or above `lo`.
            let w = (j - 1) / 64;
            let top = j - w * 64;
            let mut word = self.words[w as usize];
            if top < 64 {
                word &= (1 << top) - 1;
            }
            if lo > w * 64 {
                word &= !((1 << (lo - w * 64)) - 1);
            }
            if word != 0 {
                return Some(w * 64 + 63 - u64::from(word.leading_zeros()));
            }
            j = w * 64;
        }
        None
    }

    /// Host pages that were intact when this inflation started and are broken now; clears
    /// the stamps. O(host pages), only after an inflation that touched an intact page.
    fn count_breaks(&mut self) -> u32 {
        if !core::mem::take(&mut self.stamped) {
            return 0;
        }
        let mut broke = 0;
        for p in 0..self.host_pages {
            let w = self.words[self.hp_base() + p];
            if w & STAMP != 0 {
                let c = w & COUNT;
                broke += u32::from(c > 0 && c < self.hp_frames(p));
                let at = self.hp_base() + p;
                self.words[at] = w & !STAMP;
            }
        }
        broke
    }

    /// Inflates by up to `frames` frames, pushing each new block to `out` until it is full.
    /// Stops early when the buddy runs out (`out_of_memory`). A balloon holding blocks
    /// refuses another allocator than theirs ([`InflateError::ForeignBuddy`]); empty, it
    /// takes from whichever allocator it is given.
    pub fn inflate<B, const M: usize, const N: usize>(
        &mut self,
        buddy: &LockedBuddy<B, M>,
        frames: u64,
        out: &mut ArrayVec<Block, N>,
    ) -> Result<InflateOutcome, InflateError>
    where
        B: DerefMut<Target = [FrameMeta]>,
    {
        let key = buddy.storage_key();
        if self.blocks > 0 && key != self.owner {
            return Err(InflateError::ForeignBuddy);
        }
        self.owner = key;
        let mut res = InflateOutcome::default();
        self.fresh = false;
        let h = self.h();
        while res.frames < frames && !out.is_full() {
            let remaining = frames - res.frames;
            let o = (self.cfg.order.get() as u32)
                .min(remaining.ilog2())
                .min(M as u32) as u8;
            let got = match self.cfg.policy {
                FallbackPolicy::Naive => buddy.alloc_at_most(PageOrder::from_raw(o)).ok(),
                FallbackPolicy::PreferBroken => (h..=o)
                    .rev()
                    .find_map(|k| buddy.alloc(PageOrder::from_raw(k)).ok())
                    .or_else(|| {
                        let small = o.min(h.saturating_sub(1));
                        (h > 0)
                            .then(|| self.take_small(buddy, small, remaining))
                            .flatten()
                    }),
            };
            let Some(block) = got else {
                res.out_of_memory = true;
                break;
            };
            match self.record(&block) {
                Ok((blocks, frames)) => {
                    res.dropped_stale += blocks;
                    res.dropped_frames += frames;
                }
                Err(e) => {
                    // Not ours to keep: give it back untouched.
                    let _ = buddy.free(block.pfn, block.order);
                    self.count_breaks();
                    return Err(e);
                }
            }
            res.frames += block.order.frames();
            res.blocks += 1;
            // `out` is not full: checked by the loop condition.
            let _ = out.try_push(block);
        }
        res.broke = self.count_breaks();
        Ok(res)
    }

    /// One block below the host page order, from a host page already broken if possible.
    fn take_small<B, const M: usize>(
        &mut self,
        buddy: &LockedBuddy<B, M>,
        o: u8,
        need: u64,
    ) -> Option<Block>
    where
        B: DerefMut<Target = [FrameMeta]>,
    {
        let (order, within) = (PageOrder::from_raw(o), self.cfg.host_order);
        if let Some(p) = self.current {
            match buddy.alloc_within(self.hp_pfn(p), within, order) {
                Ok(b) => return Some(b),
                Err(_) => {
                    self.set_est(p, 0);
                    self.current = None;
                }
            }
        }
        if !self.fresh {
            self.refresh(buddy);
        }
        while let Some(p) = self.pick(need) {
            match buddy.alloc_within(self.hp_pfn(p), within, order) {
                Ok(b) => {
                    self.current = Some(p);
                    return Some(b);
                }
                Err(_) => {
                    self.set_est(p, 0);
                }
            }
        }
        // The estimates may be stale: memory freed elsewhere since the refresh.
        buddy.alloc_at_most(order).ok()
    }

    /// Recomputes the free-frame estimate of every host page the balloon does not hold
    /// entirely. O(window), one short lock per host page.
    fn refresh<B, const M: usize>(&mut self, buddy: &LockedBuddy<B, M>)
    where
        B: DerefMut<Target = [FrameMeta]>,
    {
        for p in 0..self.host_pages {
            let est = if self.count(p) == self.hp_frames(p) {
                0
            } else {
                buddy.free_frames_within(self.hp_pfn(p), self.cfg.host_order)
            };
            self.set_est(p, est);
        }
        self.fresh = true;
    }

    /// The next host page to take small blocks from: a broken one with free frames, else
    /// the intact page that best covers `need` (see the module docs). O(host pages).
    fn pick(&self, need: u64) -> Option<usize> {
        let broken = (0..self.host_pages).find(|&p| self.count(p) > 0 && self.est(p) > 0);
        if broken.is_some() {
            return broken;
        }
        let intact = (0..self.host_pages).filter(|&p| self.count(p) == 0 && self.est(p) > 0);
        let covering = intact
            .clone()
            .filter(|&p| self.est(p) >= need)
            .min_by_key(|&p| self.est(p));
        covering.or_else(|| intact.max_by_key(|&p| (self.est(p), core::cmp::Reverse(p))))
    }

    /// Deflates by up to `frames` frames, never more: fully ballooned host pages first,
    /// then pieces of broken ones; blocks larger than what is left are kept. Pushes each
    /// freed block to `out` until it is full.
    ///
    /// A block is freed only if the buddy still has exactly the block the balloon recorded
    /// (head and order) allocated; otherwise the call stops with [`DeflateError::NotHeld`],
    /// leaving that block and the rest in the balloon (the blocks freed before it are in
    /// `out`). Refused with [`DeflateError::ForeignBuddy`], changing nothing, when `buddy`
    /// is not the allocator the balloon's blocks came from: its check of head, order and
    /// state would otherwise free a stranger's block that happens to match.
    pub fn deflate<B, const M: usize, const N: usize>(
        &mut self,
        buddy: &LockedBuddy<B, M>,
        frames: u64,
        out: &mut ArrayVec<Block, N>,
    ) -> Result<DeflateOutcome, DeflateError>
    where
        B: DerefMut<Target = [FrameMeta]>,
    {
        if self.blocks > 0 && buddy.storage_key() != self.owner {
            return Err(DeflateError::ForeignBuddy);
        }
        let mut res = DeflateOutcome::default();
        for full_pass in [true, false] {
            for p in 0..self.host_pages {
                let c = self.count(p);
                if c == 0 || (c == self.hp_frames(p)) != full_pass {
                    continue;
                }
                let start = self.hp_pfn(p).get().max(self.base) - self.base;
                let end = ((self.first_hp + p as u64 + 1) << self.h()).min(self.base + self.window)
                    - self.base;
                let mut i = start;
                while i < end {
                    if out.is_full() || res.frames >= frames {
                        return Ok(res);
                    }
                    let word = self.words[(i / 64) as usize] >> (i % 64);
                    if word == 0 {
                        i = (i / 64 + 1) * 64;
                        continue;
                    }
                    i += u64::from(word.trailing_zeros());
                    if i >= end {
                        break;
                    }
                    let pfn = Pfn::from_raw(self.base + i);
                    let Some(order) = self.order_at(i) else {
                        return Err(DeflateError::NotHeld { pfn });
                    };
                    if order.frames() <= frames - res.frames {
                        Self::free_held(buddy, pfn, order)?;
                        self.forget(pfn, order);
                        res.frames += order.frames();
                        res.blocks += 1;
                        let _ = out.try_push(Block {
                            pfn,
                            order,
                            reported: false,
                        });
                    }
                    i += 1;
                }
            }
        }
        Ok(res)
    }

    /// Drops from the books a block that [`deflate`](Self::deflate) refused with
    /// [`DeflateError::NotHeld`] — the embedder freed it behind the balloon's back — so
    /// later deflations go past it. The buddy is not touched. Refused, changing nothing,
    /// when the balloon has no block at `pfn` (`NotHeld`) or the buddy still holds it
    /// exactly as recorded (`StillHeld`). Returns the order of the dropped block.
    pub fn release_lost<B, const M: usize>(
        &mut self,
        buddy: &LockedBuddy<B, M>,
        pfn: Pfn,
    ) -> Result<PageOrder, DeflateError>
    where
        B: DerefMut<Target = [FrameMeta]>,
    {
        if !self.holds(pfn) {
            return Err(DeflateError::NotHeld { pfn });
        }
        if buddy.storage_key() != self.owner {
            return Err(DeflateError::ForeignBuddy);
        }
        let order = self
            .order_at(pfn.get() - self.base)
            .ok_or(DeflateError::NotHeld { pfn })?;
        let still = buddy.lock().block_info(pfn).is_some_and(|info| {
            info.pfn == pfn && info.order == order && info.state == BlockState::Allocated
        });
        if still {
            return Err(DeflateError::StillHeld { pfn });
        }
        self.forget(pfn, order);
        Ok(order)
    }

    /// Frees the held block `(pfn, order)` in the buddy if, under one lock, the buddy still
    /// has exactly that block allocated; otherwise changes nothing.
    fn free_held<B, const M: usize>(
        buddy: &LockedBuddy<B, M>,
        pfn: Pfn,
        order: PageOrder,
    ) -> Result<(), DeflateError>
    where
        B: DerefMut<Target = [FrameMeta]>,
    {
        let mut guard = buddy.lock();
        match guard.block_info(pfn) {
            Some(info)
                if info.pfn == pfn
                    && info.order == order
                    && info.state == BlockState::Allocated =>
            {
                guard.free(pfn, order).map_err(DeflateError::Free)
            }
            _ => Err(DeflateError::NotHeld { pfn }),
        }
    }

    /// The order of the held block whose head is window frame `i`: its last frame is the
    /// first end bit at or after `i` (held blocks are disjoint). O(block frames / 64).
    fn order_at(&self, i: u64) -> Option<PageOrder> {
        let ends = &self.words[self.bitmap_words..self.hp_base()];
        let mut w = (i / 64) as usize;
        let mut word = ends[w] >> (i % 64) << (i % 64);
        while word == 0 && w + 1 < ends.len() {
            w += 1;
            word = ends[w];
        }
        if word == 0 {
            return None;
        }
        let frames = w as u64 * 64 + u64::from(word.trailing_zeros()) - i + 1;
        // `record` wrote a power of two of frames: anything else is not a block of ours.
        let order = u8::try_from(frames.trailing_zeros()).ok()?;
        PageOrder::new(order)
            .ok()
            .filter(|_| frames.is_power_of_two())
    }

    /// Drops the block `(pfn, order)` from the books.
    fn forget(&mut self, pfn: Pfn, order: PageOrder) {
        let i = pfn.get() - self.base;
        let (first, n) = (pfn.get(), order.frames());
        let e = i + n - 1;
        self.words[(i / 64) as usize] &= !(1 << (i % 64));
        self.words[self.bitmap_words + (e / 64) as usize] &= !(1 << (e % 64));
        self.blocks -= 1;
        let mut f = first;
        while f < first + n {
            let p = self.hp_of(f);
            let chunk = (((f >> self.h()) + 1) << self.h()).min(first + n) - f;
            self.adjust(p, 0, chunk);
            f += chunk;
        }
        self.held -= n;
        if self.current.is_some_and(|c| self.count(c) == 0) {
            self.current = None;
        }
    }

    /// Whether the head bit of the frame `f` (inside the window) is set.
    fn bit(&self, f: u64) -> bool {
        let i = f - self.base;
        self.words[(i / 64) as usize] >> (i % 64) & 1 == 1
    }
}

mod check;
#[cfg(test)]
mod tests;
