//! The buddy allocator against a model that is just the state of every frame.

use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use arrayvec::ArrayVec;

use super::Rng;
use crate::addr::{PageOrder, Pfn};
use crate::buddy::{
    AddRangeError, AllocError, Block, BlockState, Buddy, FrameMeta, FreeError, IsolateError,
    PutBackError,
};

/// The largest order of the allocator under test.
pub const MAX_ORDER: usize = 10;
/// First frame of the test window: deliberately not aligned to any large order, so natural
/// alignment must come from frame numbers, not from window offsets.
pub const WINDOW_BASE: u64 = 0x4_0000 - 200;
/// Frames in the test window (a little over 32 MiB).
pub const WINDOW_FRAMES: u64 = 8400;
/// Blocks one `isolate` call can return.
pub const BATCH: usize = 32;

/// The allocator under test.
pub type TestBuddy = Buddy<Vec<FrameMeta>, MAX_ORDER>;

/// One operation on the allocator. Indices (`k`) pick among live or isolated blocks modulo
/// their number; raw numbers are folded into useful ranges by the harness.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(fuzzing, derive(arbitrary::Arbitrary))]
pub enum BuddyOp {
    /// Add `[WINDOW_BASE + start, + frames)`; may be empty, overlap or leave the window.
    AddRange {
        start: u16,
        frames: u16,
        reported: bool,
    },
    /// Allocate a block of `order % 12` (orders above MAX_ORDER must fail).
    Alloc { order: u8 },
    /// Allocate the largest block not above `order % 12`.
    AllocAtMost { order: u8 },
    /// Free the k-th live block.
    Free { k: u16 },
    /// Free something that is not a live block.
    FreeGarbage(Garbage),
    /// Isolate up to `max % 40` unreported blocks of `order % 12`.
    Isolate { order: u8, max: u8 },
    /// Isolate up to `max % 40` of the coldest unreported blocks of `order % 12`.
    IsolateCold { order: u8, max: u8 },
    /// Put back the k-th isolated block.
    PutBack { k: u16, reported: bool },
    /// Put back the k-th isolated block unreported, to the head of its list.
    PutBackHot { k: u16 },
    /// Put back an arbitrary frame and order.
    PutBackGarbage { pfn: u16, order: u8, reported: bool },
    /// Forget every reported flag.
    ResetReported,
    /// Allocate the largest block not above `order % 12` inside the naturally aligned block
    /// of `within % 12` holding the frame `pfn` (near or inside the window), after checking
    /// its free-frame count.
    AllocWithin { pfn: u16, within: u8, order: u8 },
}

/// Ways to free what should not be freed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(fuzzing, derive(arbitrary::Arbitrary))]
pub enum Garbage {
    /// Any frame near or inside the window, any order.
    Frame { pfn: u16, order: u8 },
    /// A live block with the wrong order.
    BadOrder { k: u16, order: u8 },
    /// A block freed before (it may have been reallocated since: then the free is valid).
    DoubleFree { k: u16 },
    /// A frame inside a live block.
    Interior { k: u16, offset: u16 },
}

/// What the model knows of one frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cell {
    Hole,
    Free { reported: bool },
    Alloc { head: u64, order: u8 },
    Isolated { head: u64, order: u8 },
}

/// The allocator, its model, and the blocks the model hands out.
pub struct BuddyHarness {
    buddy: TestBuddy,
    cells: Vec<Cell>,
    live: Vec<Block>,
    isolated: Vec<Block>,
    freed: Vec<(Pfn, PageOrder)>,
}

fn pfn(raw: u64) -> Pfn {
    Pfn::from_raw(raw)
}

/// The notify order the harness sets for `free_notify`.
const NOTIFY_ORDER: PageOrder = PageOrder::from_raw(3);

fn order(raw: u8) -> PageOrder {
    PageOrder::from_raw(raw % 12)
}

fn check(cond: bool, what: impl FnOnce() -> String) -> Result<(), String> {
    if cond { Ok(()) } else { Err(what()) }
}

impl Default for BuddyHarness {
    fn default() -> Self {
        Self::new()
    }
}

impl BuddyHarness {
    /// An allocator over the test window with nothing managed yet.
    pub fn new() -> Self {
        let meta = vec![FrameMeta::HOLE; WINDOW_FRAMES as usize];
        let mut buddy = match Buddy::new(meta, pfn(WINDOW_BASE)) {
            Ok(b) => b,
            Err(e) => unreachable!("test window refused: {e}"),
        };
        // Half the frees go through `free_notify` (see `free`): a low notify order makes
        // both its fast path (orders 0..=2, no merge) and its slow path common.
        buddy.set_notify_order(Some(NOTIFY_ORDER));
        Self {
            buddy,
            cells: vec![Cell::Hole; WINDOW_FRAMES as usize],
            live: Vec::new(),
            isolated: Vec::new(),
            freed: Vec::new(),
        }
    }

    /// The allocator under test.
    pub fn buddy(&self) -> &TestBuddy {
        &self.buddy
    }

    /// Blocks currently allocated through the harness.
    pub fn live(&self) -> &[Block] {
        &self.live
    }

    fn cell(&self, pfn: u64) -> Cell {
        pfn.checked_sub(WINDOW_BASE)
            .and_then(|i| self.cells.get(i as usize).copied())
            .unwrap_or(Cell::Hole)
    }

    fn set(&mut self, block: (u64, u8), cell: Cell) {
        let start = (block.0 - WINDOW_BASE) as usize;
        self.cells[start..start + (1usize << block.1)].fill(cell);
    }

    /// Whether some naturally aligned run of `2^o` frames is entirely free in the model.
    /// With the no-unmerged-buddies invariant this is exactly "alloc(o) can succeed".
    fn has_free_run(&self, o: u32) -> bool {
        let size = 1u64 << o;
        let first = WINDOW_BASE.next_multiple_of(size);
        (first..WINDOW_BASE + WINDOW_FRAMES)
            .step_by(size as usize)
            .take_while(|p| p + size <= WINDOW_BASE + WINDOW_FRAMES)
            .any(|p| (p..p + size).all(|f| matches!(self.cell(f), Cell::Free { .. })))
    }

    fn expected_free(&self, p: u64, o: u8) -> Result<(), FreeError> {
        if o as usize > MAX_ORDER {
            return Err(FreeError::OrderTooLarge);
        }
        if p & ((1 << o) - 1) != 0 {
            return Err(FreeError::Unaligned);
        }
        if p < WINDOW_BASE || p + (1 << o) > WINDOW_BASE + WINDOW_FRAMES {
            return Err(FreeError::OutOfRange);
        }
        match self.cell(p) {
            Cell::Hole => Err(FreeError::OutOfRange),
            Cell::Free { .. } => Err(FreeError::DoubleFree),
            Cell::Isolated { .. } => Err(FreeError::Isolated),
            Cell::Alloc { head, order } if head == p && order == o => Ok(()),
            Cell::Alloc { .. } => Err(FreeError::WrongOrder),
        }
    }

    fn expected_put_back(&self, p: u64, o: u8) -> Result<(), PutBackError> {
        if o as usize > MAX_ORDER {
            return Err(PutBackError::OrderTooLarge);
        }
        if p & ((1 << o) - 1) != 0 {
            return Err(PutBackError::Unaligned);
        }
        if p < WINDOW_BASE || p + (1 << o) > WINDOW_BASE + WINDOW_FRAMES {
            return Err(PutBackError::OutOfRange);
        }
        match self.cell(p) {
            Cell::Hole => Err(PutBackError::OutOfRange),
            Cell::Isolated { head, order } if head == p && order == o => Ok(()),
            Cell::Isolated { head, .. } if head == p => Err(PutBackError::WrongOrder),
            _ => Err(PutBackError::NotIsolated),
        }
    }

    /// Applies one op to allocator and model, then audits both.
    pub fn apply(&mut self, op: BuddyOp) -> Result<(), String> {
        let before = self.buddy.clone();
        let failed = match op {
            BuddyOp::AddRange {
                start,
                frames,
                reported,
            } => self.add_range(
                u64::from(start) % WINDOW_FRAMES,
                u64::from(frames) % 3000,
                reported,
            )?,
            BuddyOp::Alloc { order: o } => self.alloc(order(o).get(), false)?,
            BuddyOp::AllocAtMost { order: o } => self.alloc(order(o).get(), true)?,
            BuddyOp::Free { k } => {
                if self.live.is_empty() {
                    return Ok(());
                }
                let b = self.live[usize::from(k) % self.live.len()];
                self.free(b.pfn.get(), b.order.get())?
            }
            BuddyOp::FreeGarbage(g) => {
                let (p, o) = match g {
                    Garbage::Frame { pfn, order: o } => (
                        WINDOW_BASE - 64 + u64::from(pfn) % (WINDOW_FRAMES + 128),
                        o % 12,
                    ),
                    Garbage::BadOrder { k, order: o } => {
                        match self.live.get(usize::from(k) % self.live.len().max(1)) {
                            Some(b) => (b.pfn.get(), o % 12),
                            None => return Ok(()),
                        }
                    }
                    Garbage::DoubleFree { k } => {
                        match self.freed.get(usize::from(k) % self.freed.len().max(1)) {
                            Some(&(p, o)) => (p.get(), o.get()),
                            None => return Ok(()),
                        }
                    }
                    Garbage::Interior { k, offset } => {
                        match self.live.get(usize::from(k) % self.live.len().max(1)) {
                            Some(b) => (b.pfn.get() + u64::from(offset) % b.order.frames(), 0),
                            None => return Ok(()),
                        }
                    }
                };
                self.free(p, o)?
            }
            BuddyOp::Isolate { order: o, max } => {
                self.isolate(order(o).get(), usize::from(max % 40), false)?
            }
            BuddyOp::IsolateCold { order: o, max } => {
                self.isolate(order(o).get(), usize::from(max % 40), true)?
            }
            BuddyOp::PutBack { k, reported } => {
                if self.isolated.is_empty() {
                    return Ok(());
                }
                let b = self.isolated[usize::from(k) % self.isolated.len()];
                self.put_back(b.pfn.get(), b.order.get(), Some(reported))?
            }
            BuddyOp::PutBackHot { k } => {
                if self.isolated.is_empty() {
                    return Ok(());
                }
                let b = self.isolated[usize::from(k) % self.isolated.len()];
                self.put_back(b.pfn.get(), b.order.get(), None)?
            }
            BuddyOp::PutBackGarbage {
                pfn: p,
                order: o,
                reported,
            } => self.put_back(
                WINDOW_BASE - 64 + u64::from(p) % (WINDOW_FRAMES + 128),
                o % 12,
                Some(reported),
            )?,
            BuddyOp::AllocWithin {
                pfn: p,
                within,
                order: o,
            } => self.alloc_within(
                WINDOW_BASE - 64 + u64::from(p) % (WINDOW_FRAMES + 128),
                within % 12,
                o % 12,
            )?,
            BuddyOp::ResetReported => {
                self.buddy.reset_reported();
                for c in &mut self.cells {
                    if let Cell::Free { reported } = c {
                        *reported = false;
                    }
                }
                check(self.buddy.reported_frames() == 0, || {
                    "reported frames left after reset".into()
                })?;
                false
            }
        };
        if failed {
            check(self.buddy.same_state(&before), || {
                format!("{op:?} failed but changed the allocator")
            })?;
        }
        self.audit()
    }

    fn add_range(&mut self, start: u64, frames: u64, reported: bool) -> Result<bool, String> {
        let p = WINDOW_BASE + start;
        let got = if reported {
            self.buddy.add_range_reported(pfn(p), frames)
        } else {
            self.buddy.add_range(pfn(p), frames)
        };
        let want = if frames == 0 {
            Err(AddRangeError::Empty)
        } else if start + frames > WINDOW_FRAMES {
            Err(AddRangeError::OutsideWindow)
        } else if (p..p + frames).any(|f| self.cell(f) != Cell::Hole) {
            Err(AddRangeError::Overlap)
        } else {
            Ok(())
        };
        check(got == want, || {
            format!("add_range({p:#x}, {frames}) = {got:?}, model {want:?}")
        })?;
        if got.is_ok() {
            let s = start as usize;
            self.cells[s..s + frames as usize].fill(Cell::Free { reported });
        }
        Ok(got.is_err())
    }

    fn alloc(&mut self, o: u8, at_most: bool) -> Result<bool, String> {
        let requested = PageOrder::from_raw(o);
        // The order the block must have, per the model.
        let target = if at_most {
            (0..=o.min(MAX_ORDER as u8))
                .rev()
                .find(|&k| self.has_free_run(u32::from(k)))
        } else if o as usize > MAX_ORDER {
            None
        } else {
            Some(o).filter(|&k| self.has_free_run(u32::from(k)))
        };
        // The list the block must come from: the smallest non-empty order at or above target.
        let source = target.and_then(|t| {
            (t..=MAX_ORDER as u8)
                .map(|k| self.buddy.order_stats(PageOrder::from_raw(k)))
                .find(|s| s.free > 0)
        });
        let got = if at_most {
            self.buddy.alloc_at_most(requested)
        } else {
            self.buddy.alloc(requested)
        };
        let block = match (got, target) {
            (Err(e), None) => {
                let want = if !at_most && o as usize > MAX_ORDER {
                    AllocError::OrderTooLarge
                } else {
                    AllocError::OutOfMemory
                };
                check(e == want, || {
                    format!("alloc({o}) failed with {e:?}, model says {want:?}")
                })?;
                return Ok(true);
            }
            (Ok(b), Some(t)) => {
                check(b.order.get() == t, || {
                    format!("alloc({o}, at_most={at_most}) gave {b:?}, model order {t}")
                })?;
                b
            }
            (got, want) => {
                return Err(format!(
                    "alloc({o}, at_most={at_most}) = {got:?}, model order {want:?}"
                ));
            }
        };
        let (p, bo) = (block.pfn.get(), block.order.get());
        check(block.pfn.is_aligned(block.order), || {
            format!("{block:?} not naturally aligned")
        })?;
        for f in p..p + (1 << bo) {
            match self.cell(f) {
                Cell::Free { reported } => check(reported || !block.reported, || {
                    format!("{block:?} claims reported, frame {f:#x} was not")
                })?,
                c => return Err(format!("{block:?} handed out frame {f:#x} that is {c:?}")),
            }
        }
        if let Some(s) = source {
            // Within the source order, an unreported block is preferred whenever one exists.
            let want = s.free == s.reported;
            check(block.reported == want, || {
                format!("{block:?} from a list with stats {s:?}")
            })?;
        }
        self.set((p, bo), Cell::Alloc { head: p, order: bo });
        self.live.push(block);
        Ok(false)
    }

    fn alloc_within(&mut self, p: u64, w: u8, o: u8) -> Result<bool, String> {
        let (start, size) = (p & !((1u64 << w) - 1), 1u64 << w);
        let free_cells = (start..start + size)
            .filter(|&f| matches!(self.cell(f), Cell::Free { .. }))
            .count() as u64;
        let counted = self
            .buddy
            .free_frames_within(pfn(p), PageOrder::from_raw(w));
        check(counted == free_cells, || {
            format!("free_frames_within({p:#x}, {w}) = {counted}, model {free_cells}")
        })?;
        let got = self
            .buddy
            .alloc_within(pfn(p), PageOrder::from_raw(w), PageOrder::from_raw(o));
        if o as usize > MAX_ORDER {
            check(got == Err(AllocError::OrderTooLarge), || {
                format!("alloc_within(order {o}) = {got:?}")
            })?;
            return Ok(true);
        }
        // The largest k <= min(o, w) with an aligned all-free run of 2^k frames in the range.
        let run = |k: u8| {
            (start..start + size)
                .step_by(1 << k)
                .any(|q| (q..q + (1 << k)).all(|f| matches!(self.cell(f), Cell::Free { .. })))
        };
        let target = (0..=o.min(w)).rev().find(|&k| run(k));
        let block = match (got, target) {
            (Err(AllocError::OutOfMemory), None) => return Ok(true),
            (Ok(b), Some(t)) if b.order.get() == t => b,
            (got, t) => {
                return Err(format!(
                    "alloc_within({p:#x}, {w}, {o}) = {got:?}, model order {t:?}"
                ));
            }
        };
        let (bp, bo) = (block.pfn.get(), block.order.get());
        check(
            bp >= start && bp + (1 << bo) <= start + size && block.pfn.is_aligned(block.order),
            || format!("{block:?} outside [{start:#x}, +{size:#x})"),
        )?;
        for f in bp..bp + (1 << bo) {
            match self.cell(f) {
                Cell::Free { reported } => check(reported || !block.reported, || {
                    format!("{block:?} claims reported, frame {f:#x} was not")
                })?,
                c => return Err(format!("{block:?} handed out frame {f:#x} that is {c:?}")),
            }
        }
        self.set(
            (bp, bo),
            Cell::Alloc {
                head: bp,
                order: bo,
            },
        );
        self.live.push(block);
        Ok(false)
    }

    fn free(&mut self, p: u64, o: u8) -> Result<bool, String> {
        let want = self.expected_free(p, o);
        // `free_merged` or `free_notify`, by a bit of the frame number.
        let notify = p.count_ones() % 2 == 1;
        let said = if notify {
            self.buddy.free_notify(pfn(p), PageOrder::from_raw(o))
        } else {
            self.buddy
                .free_merged(pfn(p), PageOrder::from_raw(o))
                .map(Some)
        };
        let got = said.map(|_| ());
        check(got == want, || {
            format!("free({p:#x}, {o}, notify {notify}) = {got:?}, model {want:?}")
        })?;
        if let Ok(said) = said {
            // The merged order is the order of the free block that now holds the frame;
            // `free_notify` says it only when it reaches the notify order.
            let info = self.buddy.block_info(pfn(p));
            let merged = info
                .filter(|i| i.order.get() >= o && matches!(i.state, BlockState::Free { .. }))
                .map(|i| i.order);
            let expected = merged.filter(|&m| !notify || m >= NOTIFY_ORDER);
            check(merged.is_some() && said == expected, || {
                format!("free({p:#x}, {o}, notify {notify}) said {said:?}, block now {info:?}")
            })?;
        }
        if got.is_ok() {
            self.set((p, o), Cell::Free { reported: false });
            self.live.retain(|b| b.pfn.get() != p);
            self.freed.push((pfn(p), PageOrder::from_raw(o)));
            if self.freed.len() > 64 {
                self.freed.remove(0);
            }
        }
        Ok(got.is_err())
    }

    fn isolate(&mut self, o: u8, max: usize, cold: bool) -> Result<bool, String> {
        let ord = PageOrder::from_raw(o);
        let stats = self.buddy.order_stats(ord);
        let mut out = ArrayVec::<Block, BATCH>::new();
        let got = if cold {
            self.buddy.isolate_cold(ord, max, &mut out)
        } else {
            self.buddy.isolate(ord, max, &mut out)
        };
        if o as usize > MAX_ORDER {
            check(got == Err(IsolateError::OrderTooLarge), || {
                format!("isolate({o}) = {got:?}")
            })?;
            return Ok(true);
        }
        let want = max.min(BATCH).min((stats.free - stats.reported) as usize);
        check(got == Ok(want) && out.len() == want, || {
            format!("isolate({o}, {max}) = {got:?}, model {want}")
        })?;
        for b in out {
            let p = b.pfn.get();
            check(
                b.order == ord && !b.reported && b.pfn.is_aligned(ord),
                || format!("isolated {b:?}"),
            )?;
            for f in p..p + ord.frames() {
                check(matches!(self.cell(f), Cell::Free { .. }), || {
                    format!("isolated {b:?} holds non-free {f:#x}")
                })?;
            }
            self.set((p, o), Cell::Isolated { head: p, order: o });
            self.isolated.push(b);
        }
        Ok(false)
    }

    /// `reported: None` puts back with `put_back_hot`.
    fn put_back(&mut self, p: u64, o: u8, reported: Option<bool>) -> Result<bool, String> {
        let want = self.expected_put_back(p, o);
        let got = match reported {
            Some(r) => self.buddy.put_back(pfn(p), PageOrder::from_raw(o), r),
            None => self.buddy.put_back_hot(pfn(p), PageOrder::from_raw(o)),
        };
        let reported = reported.unwrap_or(false);
        check(got == want, || {
            format!("put_back({p:#x}, {o}) = {got:?}, model {want:?}")
        })?;
        if got.is_ok() {
            self.set((p, o), Cell::Free { reported });
            self.isolated.retain(|b| b.pfn.get() != p);
        }
        Ok(got.is_err())
    }

    /// Invariants of DESIGN.md 1 and 2 after an op: the allocator's own audit, conservation
    /// against the model, reported only on free frames the host really took.
    pub fn audit(&self) -> Result<(), String> {
        self.buddy.check_invariants().map_err(|v| format!("{v}"))?;
        let count = |f: fn(&Cell) -> bool| self.cells.iter().filter(|c| f(c)).count() as u64;
        let b = &self.buddy;
        let managed = count(|c| *c != Cell::Hole);
        let free = count(|c| matches!(c, Cell::Free { .. }));
        let reported = count(|c| matches!(c, Cell::Free { reported: true }));
        let isolated = count(|c| matches!(c, Cell::Isolated { .. }));
        let allocated = count(|c| matches!(c, Cell::Alloc { .. }));
        check(b.managed_frames() == managed, || {
            format!("managed {} vs model {managed}", b.managed_frames())
        })?;
        check(b.free_frames() == free, || {
            format!("free {} vs model {free}", b.free_frames())
        })?;
        check(b.isolated_frames() == isolated, || {
            format!("isolated {} vs model {isolated}", b.isolated_frames())
        })?;
        check(b.allocated_frames() == allocated, || {
            format!("allocated {} vs model {allocated}", b.allocated_frames())
        })?;
        check(free + isolated + allocated == managed, || {
            "model lost a frame".into()
        })?;
        check(b.reported_frames() <= reported, || {
            format!("reported {} > model {reported}", b.reported_frames())
        })?;
        Ok(())
    }

    /// Puts back every isolated block, frees every live one, and checks that all managed
    /// memory merged back into the largest naturally aligned blocks that fit in it.
    pub fn finish(mut self) -> Result<(), String> {
        while let Some(b) = self.isolated.last().copied() {
            self.put_back(b.pfn.get(), b.order.get(), Some(false))?;
        }
        while let Some(b) = self.live.last().copied() {
            if self.free(b.pfn.get(), b.order.get())? {
                return Err(format!("final free of {b:?} failed"));
            }
        }
        self.audit()?;
        check(
            self.buddy.free_frames() == self.buddy.managed_frames(),
            || "memory still in use".into(),
        )?;
        // Greedy carving of every run of managed frames gives the fully merged blocks.
        let mut f = WINDOW_BASE;
        let mut blocks = 0u64;
        while f < WINDOW_BASE + WINDOW_FRAMES {
            if self.cell(f) == Cell::Hole {
                f += 1;
                continue;
            }
            let run_end = (f..WINDOW_BASE + WINDOW_FRAMES).find(|&g| self.cell(g) == Cell::Hole);
            let run_end = run_end.unwrap_or(WINDOW_BASE + WINDOW_FRAMES);
            while f < run_end {
                let o = f
                    .trailing_zeros()
                    .min((run_end - f).ilog2())
                    .min(MAX_ORDER as u32);
                let info = self.buddy.block_info(pfn(f));
                let ok = matches!(info, Some(i) if i.pfn.get() == f && u32::from(i.order.get()) == o
                    && matches!(i.state, BlockState::Free { .. }));
                check(ok, || {
                    format!("expected a free order-{o} block at {f:#x}, found {info:?}")
                })?;
                blocks += 1;
                f += 1 << o;
            }
        }
        let listed: u64 = (0..=MAX_ORDER as u8)
            .map(|o| self.buddy.order_stats(PageOrder::from_raw(o)).free)
            .sum();
        check(listed == blocks, || {
            format!("{listed} free blocks listed, {blocks} expected")
        })
    }
}

/// A random op with weights that keep the allocator busy but not exhausted.
pub fn random_op(rng: &mut Rng) -> BuddyOp {
    let r = rng.below(100);
    let small = |rng: &mut Rng| (rng.below(4) * rng.below(4)) as u8; // mostly low orders
    match r {
        0..=1 => BuddyOp::AddRange {
            start: rng.below(WINDOW_FRAMES) as u16,
            frames: rng.below(1500) as u16,
            reported: rng.below(2) == 0,
        },
        2..=31 => BuddyOp::Alloc {
            order: if rng.below(10) == 0 {
                rng.below(12) as u8
            } else {
                small(rng)
            },
        },
        32..=36 => BuddyOp::AllocAtMost {
            order: rng.below(12) as u8,
        },
        37..=66 => BuddyOp::Free {
            k: rng.next_u64() as u16,
        },
        67..=72 => BuddyOp::FreeGarbage(match rng.below(4) {
            0 => Garbage::Frame {
                pfn: rng.next_u64() as u16,
                order: rng.below(12) as u8,
            },
            1 => Garbage::BadOrder {
                k: rng.next_u64() as u16,
                order: rng.below(12) as u8,
            },
            2 => Garbage::DoubleFree {
                k: rng.next_u64() as u16,
            },
            _ => Garbage::Interior {
                k: rng.next_u64() as u16,
                offset: rng.next_u64() as u16,
            },
        }),
        73..=77 => BuddyOp::Isolate {
            order: small(rng) + 3 * (rng.below(3) as u8),
            max: rng.below(40) as u8,
        },
        78..=82 => BuddyOp::IsolateCold {
            order: small(rng) + 3 * (rng.below(3) as u8),
            max: rng.below(40) as u8,
        },
        83..=92 => BuddyOp::PutBack {
            k: rng.next_u64() as u16,
            reported: rng.below(4) != 0,
        },
        93..=95 => BuddyOp::PutBackHot {
            k: rng.next_u64() as u16,
        },
        96 => BuddyOp::AllocWithin {
            pfn: rng.next_u64() as u16,
            within: 3 + rng.below(9) as u8,
            order: small(rng) + 3 * (rng.below(3) as u8),
        },
        97 => BuddyOp::PutBackGarbage {
            pfn: rng.next_u64() as u16,
            order: rng.below(12) as u8,
            reported: rng.below(2) == 0,
        },
        _ => BuddyOp::ResetReported,
    }
}
