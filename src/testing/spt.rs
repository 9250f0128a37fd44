//! Page tables against a model that is just a map of mapped extents.
//!
//! The model keeps `start -> (len, pa, flags)` for non-overlapping extents of input
//! addresses and knows nothing of levels or tables. After every op the harness checks that
//! the tree maps exactly what the model maps in the op's range (every present leaf,
//! coalesced into runs, and sampled `translate`s); after every [`FULL_CHECK_EVERY`]th op the
//! whole tree, and that no table leaked: tables allocated == tables reachable.

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use crate::addr::{Address, Hpa, Level};
use crate::spt::{
    Action, CollapseError, FlushRange, MapError, MapSize, PageTable, PendingFlush, ProtectError,
    PteFormat, SplitTo, TableArena, TableFrame, TableSlot, Tables, TlbFlush, TranslateError,
    UnmapError, VisitCtx, VisitKind, WalkFlags,
};

/// A [`TlbFlush`] that only counts, for tests and for page tables no hardware uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CountingFlush {
    /// `flush_range` calls.
    pub ranges: u64,
    /// Bytes passed to `flush_range`.
    pub bytes: u64,
    /// Page invalidations those ranges ask for.
    pub pages: u64,
    /// `flush_all` calls.
    pub all: u64,
}

impl TlbFlush for CountingFlush {
    fn flush_range(&mut self, range: FlushRange) {
        self.ranges += 1;
        self.bytes += range.len;
        self.pages += range.pages();
    }

    fn flush_all(&mut self) {
        self.all += 1;
    }
}

/// The input addresses the ops touch: 4 GiB, so 1 GiB leaves occur.
pub const VA_SPACE: u64 = 4 << 30;
/// Physical addresses mapped: 64 GiB.
pub const PA_SPACE: u64 = 64 << 30;
/// Frames of the harness's arena: enough for every 4 KiB of `VA_SPACE` to be split out.
pub const FRAMES: usize = 2304;
const PAGE: u64 = 4096;
/// Where the tables live physically.
const TABLES_AT: u64 = 0x80_0000_0000;

/// One operation. Numbers are folded into the spaces above; `align` picks 4 KiB, 2 MiB or
/// 1 GiB units for the addresses and the length, so huge pages come up often.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(fuzzing, derive(arbitrary::Arbitrary))]
pub enum PtOp {
    /// Map `len` units at `at` to `pa` with `flags` (bits: writable, mmu-writable, dirty,
    /// accessed) and page size `size % 5` (largest, at most 2M, exactly 4K/2M/1G).
    Map {
        at: u32,
        len: u16,
        pa: u32,
        align: u8,
        flags: u8,
        size: u8,
    },
    /// Unmap `len` units at `at`.
    Unmap { at: u32, len: u16, align: u8 },
    /// Set and clear flags (bit 4 of `clear` asks to clear a required bit: refused).
    Protect {
        at: u32,
        len: u16,
        align: u8,
        set: u8,
        clear: u8,
    },
    /// Split to `to % 3`: one level, down to 4 KiB, down to 2 MiB.
    Split {
        at: u32,
        len: u16,
        align: u8,
        to: u8,
    },
    /// Collapse up to level 2 or 3.
    Collapse {
        at: u32,
        len: u16,
        align: u8,
        max: u8,
    },
}

/// `(start, end)` of an op in bytes, folded into `VA_SPACE`.
fn fold(at: u32, len: u16, align: u8) -> (u64, u64) {
    let unit = [PAGE, 2 << 20, 1 << 30][usize::from(align % 3)];
    let units = VA_SPACE / unit;
    let start = (u64::from(at) % units) * unit;
    let max_len = [300, 12, 2][usize::from(align % 3)];
    let len = (u64::from(len) % max_len + 1) * unit;
    (start, (start + len).min(VA_SPACE))
}

fn flag_bits<F: PteFormat>(b: u8) -> u64 {
    let mut f = 0;
    for (bit, flag) in [F::WRITABLE, F::MMU_WRITABLE, F::DIRTY, F::ACCESSED]
        .into_iter()
        .enumerate()
    {
        if b & (1 << bit) != 0 {
            f |= flag;
        }
    }
    f
}

fn flags<F: PteFormat>(bits: u64) -> F::Flags {
    <F::Flags as bitflags::Flags>::from_bits_retain(bits)
}

fn va<A: Address>(a: u64) -> A {
    A::from_raw(a).unwrap_or(A::ZERO)
}

/// One mapped extent of the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Extent {
    end: u64,
    pa: u64,
    flags: u64,
}

/// The model: non-overlapping extents by start address.
#[derive(Clone, Debug, Default)]
pub struct Model {
    extents: BTreeMap<u64, Extent>,
}

impl Model {
    /// What `va` translates to: `(pa, flags)`.
    pub fn translate(&self, va: u64) -> Option<(u64, u64)> {
        let (&start, e) = self.extents.range(..=va).next_back()?;
        (va < e.end).then(|| (e.pa + (va - start), e.flags))
    }

    /// The mapped extents as `(start, end)`, in address order.
    pub fn extents(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.extents.iter().map(|(&s, e)| (s, e.end))
    }

    /// Whether anything in `[start, end)` is mapped.
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        if let Some((_, e)) = self.extents.range(..start).next_back() {
            if e.end > start {
                return true;
            }
        }
        self.extents.range(start..end).next().is_some()
    }

    /// Cuts extents at `at` so none straddles it.
    fn cut(&mut self, at: u64) {
        if let Some((&s, &e)) = self.extents.range(..at).next_back() {
            if e.end > at {
                self.extents.insert(s, Extent { end: at, ..e });
                let tail = Extent {
                    end: e.end,
                    pa: e.pa + (at - s),
                    flags: e.flags,
                };
                self.extents.insert(at, tail);
            }
        }
    }

    /// Maps `[start, end)` (not mapped before) to `pa` with `flags`.
    pub fn map(&mut self, start: u64, end: u64, pa: u64, flags: u64) {
        self.extents.insert(start, Extent { end, pa, flags });
    }

    /// Unmaps `[start, end)`.
    pub fn unmap(&mut self, start: u64, end: u64) {
        self.cut(start);
        self.cut(end);
        let keys: Vec<u64> = self.extents.range(start..end).map(|(&k, _)| k).collect();
        for k in keys {
            self.extents.remove(&k);
        }
    }

    /// Sets `set` and clears `clear` in the flags of `[start, end)`.
    pub fn protect(&mut self, start: u64, end: u64, set: u64, clear: u64) {
        self.cut(start);
        self.cut(end);
        for (_, e) in self.extents.range_mut(start..end) {
            e.flags = (e.flags & !clear) | set;
        }
    }

    /// Collapses what `collapse` can: every aligned block of `level` inside the range that
    /// is fully mapped, physically contiguous and aligned, with identical flags apart from
    /// accessed/dirty, gets the union of those.
    fn collapse(&mut self, start: u64, end: u64, level: Level, ad: u64) {
        let size = level.page_size();
        let mut block = start.div_ceil(size) * size;
        while block + size <= end {
            if let Some(union) = self.uniform(block, block + size, size, ad) {
                let Some((pa, flags)) = self.translate(block) else {
                    block += size;
                    continue;
                };
                self.unmap(block, block + size);
                self.map(block, block + size, pa, (flags & !ad) | union);
            }
            block += size;
        }
    }

    /// The union of accessed/dirty over `[start, end)` if the block can be one leaf.
    fn uniform(&self, start: u64, end: u64, size: u64, ad: u64) -> Option<u64> {
        let (pa0, flags0) = self.translate(start)?;
        if pa0 % size != 0 {
            return None;
        }
        let mut at = start;
        let mut union = 0;
        while at < end {
            let (&s, e) = self.extents.range(..=at).next_back()?;
            if e.end <= at || e.pa + (at - s) != pa0 + (at - start) || e.flags & !ad != flags0 & !ad
            {
                return None;
            }
            union |= e.flags & ad;
            at = e.end;
        }
        Some(union)
    }

    /// The model's mapping as maximal runs `(start, end, pa, flags)`.
    fn runs(&self) -> Vec<(u64, u64, u64, u64)> {
        let mut runs: Vec<(u64, u64, u64, u64)> = Vec::new();
        for (&s, e) in &self.extents {
            push_run(&mut runs, s, e.end, e.pa, e.flags);
        }
        runs
    }

    /// [`runs`](Self::runs) of what the model maps inside `[lo, hi)`, extents clipped to it.
    fn runs_in(&self, lo: u64, hi: u64) -> Vec<(u64, u64, u64, u64)> {
        let mut runs: Vec<(u64, u64, u64, u64)> = Vec::new();
        let before = self.extents.range(..lo).next_back();
        for (&s, e) in before.into_iter().chain(self.extents.range(lo..hi)) {
            let (cs, ce) = (s.max(lo), e.end.min(hi));
            if cs < ce {
                push_run(&mut runs, cs, ce, e.pa + (cs - s), e.flags);
            }
        }
        runs
    }
}

fn push_run(runs: &mut Vec<(u64, u64, u64, u64)>, start: u64, end: u64, pa: u64, flags: u64) {
    if let Some(last) = runs.last_mut() {
        if last.1 == start && last.2 + (last.1 - last.0) == pa && last.3 == flags {
            last.1 = end;
            return;
        }
    }
    runs.push((start, end, pa, flags));
}

/// The page table under test, its arena and the model.
pub struct PtHarness<'a, F: PteFormat> {
    mem: TableArena<'a>,
    pt: PageTable<F>,
    model: Model,
    tlb: CountingFlush,
    /// Ops applied so far (every [`FULL_CHECK_EVERY`]th is checked over the whole tree).
    ops: u64,
}

/// `apply` checks the whole tree (every leaf against the model, tables allocated against
/// tables reachable) after every this many ops, and the op's own range after every op
/// (what an op changes outside it, the rest of a huge leaf it split, is compared at the
/// next full check, and `finish` starts with one): a full check walks every leaf, up to a
/// million once 4 GiB is split to 4 KiB, which held the fuzz target to about one input a
/// second.
pub const FULL_CHECK_EVERY: u64 = 16;

/// Frames for a harness.
pub fn frames() -> Vec<TableFrame> {
    (0..FRAMES).map(|_| TableFrame::new()).collect()
}

/// Slots for a harness's frames.
pub fn slots() -> Vec<TableSlot> {
    (0..FRAMES).map(|_| TableSlot::default()).collect()
}

impl<'a, F: PteFormat> PtHarness<'a, F> {
    /// An empty page table over `frames` and their `slots`.
    pub fn new(frames: &'a [TableFrame], slots: &'a mut [TableSlot]) -> Result<Self, String> {
        let base = Hpa::new(TABLES_AT).map_err(|e| format!("{e}"))?;
        let mut mem = TableArena::new(frames, slots, base).map_err(|e| format!("{e}"))?;
        let pt = PageTable::new(&mut mem).map_err(|e| format!("{e}"))?;
        Ok(Self {
            mem,
            pt,
            model: Model::default(),
            tlb: CountingFlush::default(),
            ops: 0,
        })
    }

    /// The page table and its memory, for extra checks by the caller.
    pub fn parts(&self) -> (&PageTable<F>, &TableArena<'a>) {
        (&self.pt, &self.mem)
    }

    /// What the model says `va` translates to.
    pub fn model_translate(&self, va: u64) -> Option<(u64, u64)> {
        self.model.translate(va)
    }

    fn flush(&mut self, pending: PendingFlush) -> Result<(), String> {
        pending
            .flush(&mut self.tlb, &mut self.mem)
            .map_err(|e| format!("freeing after the flush: {e}"))
    }

    /// Applies one op to the tree and the model, then checks everything.
    pub fn apply(&mut self, op: PtOp) -> Result<(), String> {
        let samples = match op {
            PtOp::Map {
                at,
                len,
                pa,
                align,
                flags,
                size,
            } => {
                let (start, end) = fold(at, len, align);
                let unit = [PAGE, 2 << 20, 1 << 30][usize::from(align % 3)];
                let pa = (u64::from(pa) * unit) % PA_SPACE;
                self.map(start, end, pa, flag_bits::<F>(flags), size)?;
                (start, end)
            }
            PtOp::Unmap { at, len, align } => {
                let (start, end) = fold(at, len, align);
                self.unmap(start, end)?;
                (start, end)
            }
            PtOp::Protect {
                at,
                len,
                align,
                set,
                clear,
            } => {
                let (start, end) = fold(at, len, align);
                let set = flag_bits::<F>(set);
                let required = if clear & 0x10 != 0 { F::REQUIRED } else { 0 };
                let clear = flag_bits::<F>(clear) | required;
                self.protect(start, end, set, clear)?;
                (start, end)
            }
            PtOp::Split { at, len, align, to } => {
                let (start, end) = fold(at, len, align);
                let to = [
                    SplitTo::OneLevel,
                    SplitTo::Level(Level::L1),
                    SplitTo::Level(Level::L2),
                ][usize::from(to % 3)];
                self.split(start, end, to)?;
                (start, end)
            }
            PtOp::Collapse {
                at,
                len,
                align,
                max,
            } => {
                let (start, end) = fold(at, len, align);
                let max = if max % 2 == 0 { Level::L2 } else { Level::L3 };
                self.collapse(start, end, max)?;
                (start, end)
            }
        };
        let samples = [
            samples.0,
            samples.1 - PAGE,
            samples.1,
            samples.0.saturating_sub(PAGE),
        ];
        self.ops += 1;
        if self.ops % FULL_CHECK_EVERY == 0 {
            return self.check(&samples);
        }
        self.check_window(samples[0], samples[2], &samples)
    }

    fn map(&mut self, start: u64, end: u64, pa: u64, bits: u64, size: u8) -> Result<(), String> {
        let size = match size % 5 {
            0 => MapSize::Largest,
            1 => MapSize::AtMost(Level::L2),
            2 => MapSize::Exactly(Level::L1),
            3 => MapSize::Exactly(Level::L2),
            _ => MapSize::Exactly(Level::L3),
        };
        let bits = bits | F::REQUIRED;
        let len = end - start;
        let align = match size {
            MapSize::Exactly(l) => l.page_size(),
            _ => PAGE,
        };
        let expect = if start % align != 0 || pa % align != 0 || len % align != 0 {
            Err(MapError::Unaligned)
        } else if self.model.overlaps(start, end) {
            Err(MapError::AlreadyMapped)
        } else {
            Ok(())
        };
        let pa_addr = F::Out::from_raw(pa).map_err(|e| format!("{e}"))?;
        let got = self.pt.map(
            &mut self.mem,
            va(start),
            pa_addr,
            len,
            flags::<F>(bits),
            size,
            WalkFlags::empty(),
        );
        match (got, expect) {
            (Ok(()), Ok(())) => self.model.map(start, end, pa, bits),
            // A table where a forced size needs a leaf: the model knows no tables. The
            // check walk reports the first conflict in address order, which may be this.
            (Err(MapError::TableInTheWay), Ok(()) | Err(MapError::AlreadyMapped))
                if matches!(size, MapSize::Exactly(_)) => {}
            (got, expect) if got == expect => {}
            (got, expect) => return Err(format!("map: got {got:?}, model expects {expect:?}")),
        }
        Ok(())
    }

    /// Whether a huge leaf sticks out of `[start, end)` at one of its ends.
    fn straddled(&self, start: u64, end: u64) -> bool {
        [start, end - PAGE].into_iter().any(|a| {
            self.pt.translate(&self.mem, va(a)).is_ok_and(|t| {
                let size = t.level.page_size();
                let leaf = a & !(size - 1);
                leaf < start || leaf + size > end
            })
        })
    }

    fn unmap(&mut self, start: u64, end: u64) -> Result<(), String> {
        let straddled = self.straddled(start, end);
        match self.pt.unmap(&mut self.mem, va(start), end - start) {
            Ok(pending) if !straddled => {
                let mut incomplete = pending.is_incomplete();
                self.flush(pending)?;
                self.model.unmap(start, end);
                // Every leaf is gone; emptied tables beyond one token's room are reclaimed
                // by unmapping again.
                while incomplete {
                    let pending = self
                        .pt
                        .unmap(&mut self.mem, va(start), end - start)
                        .map_err(|e| format!("unmap again: {e:?}"))?;
                    incomplete = pending.is_incomplete();
                    self.flush(pending)?;
                }
                Ok(())
            }
            Err(UnmapError::SplitsHugePage) if straddled => Ok(()),
            Ok(pending) => {
                self.flush(pending)?;
                Err("unmap split a huge page".into())
            }
            Err(e) => Err(format!("unmap: {e:?} (straddled {straddled})")),
        }
    }

    fn protect(&mut self, start: u64, end: u64, set: u64, clear: u64) -> Result<(), String> {
        let straddled = self.straddled(start, end);
        let bad = clear & F::REQUIRED != 0;
        let got = self.pt.protect(
            &mut self.mem,
            va(start),
            end - start,
            flags::<F>(set),
            flags::<F>(clear),
            WalkFlags::empty(),
        );
        match got {
            Ok(pending) if !bad && !straddled => {
                self.flush(pending)?;
                self.model.protect(start, end, set, clear);
                Ok(())
            }
            Err(ProtectError::BadFlags) if bad => Ok(()),
            Err(ProtectError::SplitsHugePage) if !bad && straddled => Ok(()),
            Ok(pending) => {
                self.flush(pending)?;
                Err(format!(
                    "protect succeeded (bad {bad}, straddled {straddled})"
                ))
            }
            Err(e) => Err(format!("protect: {e:?} (bad {bad}, straddled {straddled})")),
        }
    }

    fn split(&mut self, start: u64, end: u64, to: SplitTo) -> Result<(), String> {
        match self.pt.split(
            &mut self.mem,
            va(start),
            end - start,
            to,
            WalkFlags::empty(),
        ) {
            Ok(done) if done.resume_at.is_none() => {}
            Ok(_) => return Err("split ran out of tables".into()),
            Err(e) => return Err(format!("split: {e:?}")),
        }
        if let SplitTo::Level(target) = to {
            // No leaf above the target level is left in the range.
            let mut visitor =
                |_: VisitKind, ctx: &mut VisitCtx<'_, F>, _: &mut Tables<'_, TableArena<'a>>| {
                    let level = ctx.level();
                    if F::is_leaf(ctx.old(), level) && level > target {
                        return Err(format!(
                            "split left a level-{} leaf at {:#x}",
                            level.get(),
                            ctx.raw_addr()
                        ));
                    }
                    Ok(Action::Continue)
                };
            self.pt
                .walk_read(&self.mem, start, end, WalkFlags::LEAF, &mut visitor)
                .map_err(|e| format!("walk: {e:?}"))?;
        }
        Ok(())
    }

    fn collapse(&mut self, start: u64, end: u64, max: Level) -> Result<(), String> {
        loop {
            let got = self.pt.collapse(&mut self.mem, va(start), end - start, max);
            match got {
                Ok(pending) => {
                    let again = pending.is_incomplete();
                    self.flush(pending)?;
                    if !again {
                        break;
                    }
                }
                Err(CollapseError::BadLevel) => {
                    return Err("collapse refused a good level".into());
                }
                Err(e) => return Err(format!("collapse: {e:?}")),
            }
        }
        let ad = F::ACCESSED | F::DIRTY;
        let mut level = Level::L2;
        while level <= max.min(F::LARGEST_LEAF) {
            self.model.collapse(start, end, level, ad);
            let Some(up) = level.upper() else { break };
            level = up;
        }
        Ok(())
    }

    /// The tree's mapping as maximal runs, from a walk over every present leaf.
    fn runs(&self) -> Result<Vec<(u64, u64, u64, u64)>, String> {
        self.runs_in(0, 1 << F::INPUT_BITS)
    }

    /// [`runs`](Self::runs) of the leaves in `[lo, hi)`.
    fn runs_in(&self, lo: u64, hi: u64) -> Result<Vec<(u64, u64, u64, u64)>, String> {
        let mut runs = Vec::new();
        let mem = &self.mem;
        let mut visitor =
            |kind: VisitKind, ctx: &mut VisitCtx<'_, F>, _: &mut Tables<'_, TableArena<'a>>| {
                let (pte, level) = (ctx.old(), ctx.level());
                if kind == VisitKind::TablePre {
                    // A table of 4 KiB entries wholly inside the window: read it as a
                    // slice, with the same rules, instead of one visit per entry.
                    let start = ctx.raw_addr();
                    let inside = level == Level::L2 && lo <= start && start + ctx.size() <= hi;
                    let table = inside
                        .then(|| crate::spt::table_ref(mem, F::table_addr(pte)))
                        .flatten();
                    let Some(table) = table else {
                        return Ok(Action::Continue);
                    };
                    for (i, e) in table.iter().enumerate() {
                        let e = e.load(crate::sync::Ordering::Relaxed);
                        let at = start + ((i as u64) << 12);
                        if F::is_leaf(e, Level::L1) {
                            let pa = F::leaf_addr(e, Level::L1).get();
                            push_run(&mut runs, at, at + PAGE, pa, F::leaf_flags(e, Level::L1));
                        } else if e != 0 {
                            return Err(format!("non-present entry {e:#x} left at {at:#x}"));
                        }
                    }
                    return Ok(Action::SkipSubtree);
                }
                if F::is_leaf(pte, level) {
                    // A huge leaf may stick out of the window: its part inside only.
                    let start = ctx.raw_addr();
                    let (cs, ce) = (start.max(lo), (start + ctx.size()).min(hi));
                    let pa = F::leaf_addr(pte, level).get() + (cs - start);
                    push_run(&mut runs, cs, ce, pa, F::leaf_flags(pte, level));
                } else if pte != 0 {
                    return Err(format!(
                        "non-present entry {pte:#x} left at {:#x}",
                        ctx.raw_addr()
                    ));
                }
                Ok(Action::Continue)
            };
        self.pt
            .walk_read(
                &self.mem,
                lo,
                hi,
                WalkFlags::LEAF | WalkFlags::TABLE_PRE,
                &mut visitor,
            )
            .map_err(|e| format!("walk: {e:?}"))?;
        Ok(runs)
    }

    /// Everything the tree maps equals the model; sampled translations agree; no table
    /// leaked.
    pub fn check(&self, samples: &[u64]) -> Result<(), String> {
        no_leak(&self.pt, &self.mem)?;
        Self::same_runs(self.runs()?, self.model.runs())?;
        self.check_samples(samples)
    }

    /// [`check`](Self::check) of what is mapped in `[lo, hi)` only (a huge leaf across an
    /// edge compared by its part inside), without the leak count, which needs every table.
    pub fn check_window(&self, lo: u64, hi: u64, samples: &[u64]) -> Result<(), String> {
        Self::same_runs(self.runs_in(lo, hi)?, self.model.runs_in(lo, hi))?;
        self.check_samples(samples)
    }

    fn same_runs(
        ours: Vec<(u64, u64, u64, u64)>,
        model: Vec<(u64, u64, u64, u64)>,
    ) -> Result<(), String> {
        if ours != model {
            let i = ours.iter().zip(&model).position(|(a, b)| a != b);
            return Err(format!(
                "tree and model differ: {} vs {} runs, first difference at {i:?}: {:x?} vs {:x?}",
                ours.len(),
                model.len(),
                i.and_then(|i| ours.get(i)),
                i.and_then(|i| model.get(i)),
            ));
        }
        Ok(())
    }

    fn check_samples(&self, samples: &[u64]) -> Result<(), String> {
        for &a in samples.iter().filter(|&&a| a < VA_SPACE) {
            let got = match self.pt.translate(&self.mem, va(a)) {
                Ok(t) => Some((t.pa.raw(), bitflags::Flags::bits(&t.flags))),
                Err(TranslateError::NotMapped) => None,
                Err(e) => return Err(format!("translate {a:#x}: {e:?}")),
            };
            if got != self.model.translate(a) {
                return Err(format!(
                    "translate {a:#x}: {got:x?} vs model {:x?}",
                    self.model.translate(a)
                ));
            }
        }
        Ok(())
    }

    /// Unmaps everything; the tree must be back to its root alone.
    pub fn finish(mut self) -> Result<(), String> {
        // The whole tree first: a stray leaf outside every op's window would otherwise be
        // unmapped below without anyone comparing it.
        self.check(&[0])?;
        self.unmap(0, VA_SPACE)?;
        self.check(&[0])?;
        if self.mem.allocated() != 1 {
            return Err(format!(
                "{} tables left after unmapping all",
                self.mem.allocated()
            ));
        }
        self.pt
            .destroy(&mut self.mem)
            .map_err(|e| format!("destroy: {e}"))?;
        if self.mem.allocated() != 0 {
            return Err("destroy left tables".into());
        }
        Ok(())
    }
}

/// Tables allocated = tables reachable from the root: no leak, and no table linked twice.
pub fn no_leak<F: PteFormat>(pt: &PageTable<F>, mem: &TableArena<'_>) -> Result<(), String> {
    let reachable = pt
        .table_count(mem)
        .map_err(|e| format!("table_count: {e:?}"))?;
    if reachable != mem.allocated() {
        return Err(format!(
            "{} tables allocated, {reachable} reachable",
            mem.allocated()
        ));
    }
    Ok(())
}

/// A random op, for the randomized tests.
pub fn random_op(rng: &mut super::Rng) -> PtOp {
    let r = |rng: &mut super::Rng, n: u64| rng.below(n) as u32;
    let align = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2][rng.below(10) as usize];
    let at = r(rng, 1 << 20);
    let len = r(rng, 1 << 16) as u16;
    match rng.below(10) {
        0..=3 => PtOp::Map {
            at,
            len,
            pa: r(rng, 1 << 20),
            align,
            flags: rng.below(16) as u8,
            size: rng.below(5) as u8,
        },
        4 | 5 => PtOp::Unmap { at, len, align },
        6 => PtOp::Protect {
            at,
            len,
            align,
            set: rng.below(16) as u8,
            clear: rng.below(32) as u8,
        },
        7 | 8 => PtOp::Split {
            at,
            len,
            align,
            to: rng.below(3) as u8,
        },
        _ => PtOp::Collapse {
            at,
            len,
            align,
            max: rng.below(2) as u8,
        },
    }
}
