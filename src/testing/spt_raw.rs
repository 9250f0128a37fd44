//! Page tables driven the way a careless or hostile embedder may: the normal operations
//! mixed with raw writes through visitors (any `u64` into a leaf or table entry, table
//! entries to random, freed, foreign or ancestor tables, huge bits at any level), tables
//! freed while still linked, `split_entry` into fresh, live or bogus children, entry
//! handles rebuilt at random addresses and levels, and link counts and frees at random.
//!
//! What must hold whatever was written: nothing panics, every operation answers `Ok` or a
//! typed error, the arena never counts more tables than it has frames, and every walk ends
//! having visited no more entries than its range allows (a raw table entry may point at an
//! ancestor, making a cycle; the walker descends only to level 1, so a walk still ends).
//! While nothing raw was written since the last reset, the tree was built by operations
//! alone and the tables reachable equal the tables allocated; a clean `destroy` frees
//! them all. A reset destroys the tree; if that fails or leaks (a corrupt tree), the arena
//! is rebuilt from scratch over the same frames and slots.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use super::spt::CountingFlush;
use crate::addr::{Address, Hpa, Level};
use crate::spt::{
    Action, EntryRef, MapError, MapSize, PageTable, PendingFlush, PteFormat, SplitChild, SplitTo,
    TableAlloc, TableArena, TableFrame, TableLinks, TableSlot, Tables, VisitCtx, VisitKind,
    WalkFlags, split_entry,
};

/// Frames of the arena: a few hundred, so running out of tables is common too.
pub const FRAMES: usize = 256;
/// Where the tables live physically.
const TABLES_AT: u64 = 0x80_0000_0000;
/// The input addresses the ops touch: 4 GiB, so 1 GiB leaves occur.
const VA_SPACE: u64 = 4 << 30;
/// Physical addresses mapped: 64 GiB.
const PA_SPACE: u64 = 64 << 30;
const PAGE: u64 = 4096;
/// Raw entry writes after which a reset skips its whole-space count walk: a whole-space walk
/// visits every path through the tables, and `k` root entries pointing back at the root
/// make `k^levels` of them (512 of them on 4-level x86 take 1.3e8 visits).
const COUNTED_WRITES: usize = 8;
/// Rounds of `unmap`/`collapse` to finish an incomplete token. A clean tree needs at most
/// one per `DEFER_TABLES` tables, far fewer than this.
const MAX_ROUNDS: usize = FRAMES + 2;

/// One operation: the normal ones, then the raw ones. Numbers are folded into range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(fuzzing, derive(arbitrary::Arbitrary))]
pub enum RawOp {
    /// Map `len` units at `at` (`align`: 4 KiB, 2 MiB or 1 GiB units) to `pa`, page size
    /// `size % 5` (largest, at most 2 MiB, exactly 4 KiB / 2 MiB / 1 GiB).
    Map {
        at: u16,
        len: u8,
        pa: u16,
        align: u8,
        size: u8,
    },
    /// Unmap `len` units at `at`.
    Unmap { at: u16, len: u8, align: u8 },
    /// Set writable (bit 0) or clear it (bit 1), or try to clear the present bit (bit 2).
    Protect {
        at: u16,
        len: u8,
        align: u8,
        bits: u8,
    },
    /// Split to `to % 3`: one level, down to 4 KiB, down to 2 MiB.
    Split { at: u16, len: u8, align: u8, to: u8 },
    /// Collapse up to level 2 or 3.
    Collapse {
        at: u16,
        len: u8,
        align: u8,
        max: u8,
    },
    /// Translate an address.
    Translate { at: u32 },
    /// A walk with arbitrary flags (leaf, table pre/post, shared) that only counts.
    Walk {
        at: u16,
        len: u8,
        align: u8,
        flags: u8,
    },
    /// Destroy the tree and start a new one (rebuilding the arena if that fails).
    Reset,
    /// Writes a value into the entry mapping `at` at level `level % 5 + 1` (or the deepest
    /// entry above it): `kind % 8` picks a raw value, a table entry to arena frame
    /// `value`, to a table just freed, to an address outside the arena, a huge leaf at that
    /// level, a table entry to the entry's own table or to the root (cycles), or a
    /// non-present value. `link` also records a link to the table written.
    Write {
        at: u32,
        level: u8,
        kind: u8,
        value: u64,
        link: bool,
    },
    /// Frees, from a visitor, the table the entry mapping `at` at `level` points to,
    /// after unlinking it first if `unlink` (then the free succeeds and the entry dangles).
    FreeChild { at: u32, level: u8, unlink: bool },
    /// `split_entry` on the entry mapping `at` at `level`, into `child % 4`: a fresh
    /// table, an existing arena table `pick`, a live arena table `pick` passed as fresh,
    /// or an address outside the arena.
    SplitEntry {
        at: u32,
        level: u8,
        child: u8,
        pick: u16,
    },
    /// `EntryRef::ctx` of entry `index` of arena frame `table` (past the arena for large
    /// values), at address `at` pages and level `level`, then `what % 4`: set `value`,
    /// split it into a fresh child, into existing frame `value`, or only read it.
    Ctx {
        table: u16,
        index: u16,
        at: u32,
        level: u8,
        what: u8,
        value: u64,
    },
    /// Links (or unlinks) arena frame `table` `times % 4 + 1` times.
    Link { table: u16, unlink: bool, times: u8 },
    /// Frees arena frame `table` (or a nearby unaligned address if `off` is odd) directly.
    Free { table: u16, off: u16 },
    /// Allocates a table and leaks it.
    Leak { level: u8 },
}

/// What a run did, for the randomized test to check it covered the raw paths.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawStats {
    /// Arenas built (1 + rebuilds after a failed or leaking destroy).
    pub arenas: usize,
    /// Resets whose destroy returned `Err` on a corrupt tree.
    pub destroy_errors: usize,
    /// Raw writes that landed on an entry.
    pub writes: usize,
    /// Ops that returned a typed error.
    pub errors: usize,
    /// Ops applied while the tree was clean (checked against the table count).
    pub clean_ops: usize,
}

/// Frames for a run.
pub fn frames() -> Vec<TableFrame> {
    (0..FRAMES).map(|_| TableFrame::new()).collect()
}

fn unit(align: u8) -> u64 {
    [PAGE, 2 << 20, 1 << 30][usize::from(align % 3)]
}

/// `(start, end)` of an op in bytes, inside `VA_SPACE`.
fn fold(at: u16, len: u8, align: u8) -> (u64, u64) {
    let unit = unit(align);
    let start = (u64::from(at) % (VA_SPACE / unit)) * unit;
    let max_len = [64, 8, 2][usize::from(align % 3)];
    let len = (u64::from(len) % max_len + 1) * unit;
    (start, (start + len).min(VA_SPACE))
}

fn addr<A: Address>(a: u64) -> A {
    A::from_raw(a).unwrap_or(A::ZERO)
}

fn hpa(a: u64) -> Hpa {
    Hpa::new(a & ((1 << 52) - 1) & !(PAGE - 1)).unwrap_or(Hpa::ZERO)
}

/// Arena frame `i`, or (for `i` past the arena) an address just beyond or below it.
fn frame_addr(i: u16) -> Hpa {
    let i = u64::from(i) % (FRAMES as u64 + 4);
    if i < FRAMES as u64 + 2 {
        hpa(TABLES_AT + i * PAGE)
    } else {
        hpa(TABLES_AT - PAGE)
    }
}

fn level(l: u8) -> Level {
    Level::new(l % 5 + 1).unwrap_or(Level::L1)
}

fn flags<F: PteFormat>(bits: u64) -> F::Flags {
    <F::Flags as bitflags::Flags>::from_bits_retain(bits)
}

/// Whether an op's outcome was an error (only counted).
fn is_err<T, E>(r: &Result<T, E>) -> usize {
    usize::from(r.is_err())
}

/// One arena's life: a tree over it and whether anything raw touched it.
struct Epoch<'a, F: PteFormat> {
    mem: TableArena<'a>,
    pt: PageTable<F>,
    tlb: CountingFlush,
    /// Something raw was written since the tree was (re)built.
    dirty: bool,
    /// Raw entry writes since then (writes, `split_entry`, rebuilt contexts).
    writes: usize,
}

/// Whether the arena must be rebuilt after an op.
enum Next {
    Go,
    Rebuild,
}

impl<'a, F: PteFormat> Epoch<'a, F> {
    fn new(mut mem: TableArena<'a>) -> Result<Self, String> {
        let pt = PageTable::new(&mut mem).map_err(|e| format!("new on a fresh arena: {e}"))?;
        Ok(Self {
            mem,
            pt,
            tlb: CountingFlush::default(),
            dirty: false,
            writes: 0,
        })
    }

    /// Flushes; a refused free is an error only on a clean tree.
    fn flush(&mut self, pending: PendingFlush) -> Result<(), String> {
        let r = pending.flush(&mut self.tlb, &mut self.mem);
        match r {
            Err(e) if !self.dirty => Err(format!("flush on a clean tree: {e}")),
            _ => Ok(()),
        }
    }

    fn apply(&mut self, op: RawOp, stats: &mut RawStats) -> Result<Next, String> {
        let clean = !self.dirty;
        let next = self.op(op, stats)?;
        if self.mem.allocated() > self.mem.capacity() {
            return Err(format!(
                "{} tables allocated of {}",
                self.mem.allocated(),
                self.mem.capacity()
            ));
        }
        if matches!(next, Next::Rebuild) {
            return Ok(next);
        }
        if clean && !self.dirty {
            stats.clean_ops += 1;
            super::spt::no_leak(&self.pt, &self.mem).map_err(|e| format!("clean tree: {e}"))?;
        }
        Ok(next)
    }

    fn op(&mut self, op: RawOp, stats: &mut RawStats) -> Result<Next, String> {
        let clean = !self.dirty;
        match op {
            RawOp::Map {
                at,
                len,
                pa,
                align,
                size,
            } => {
                let (start, end) = fold(at, len, align);
                let pa = (u64::from(pa) * unit(align)) % PA_SPACE;
                let size = match size % 5 {
                    0 => MapSize::Largest,
                    1 => MapSize::AtMost(Level::L2),
                    2 => MapSize::Exactly(Level::L1),
                    3 => MapSize::Exactly(Level::L2),
                    _ => MapSize::Exactly(Level::L3),
                };
                let bits = F::REQUIRED | F::WRITABLE;
                let r = self.pt.map(
                    &mut self.mem,
                    addr(start),
                    addr(pa),
                    end - start,
                    flags::<F>(bits),
                    size,
                    WalkFlags::empty(),
                );
                stats.errors += is_err(&r);
                match r {
                    Ok(()) if clean => {
                        let t = self
                            .pt
                            .translate(&self.mem, addr(start))
                            .map_err(|e| format!("translate after map: {e:?}"))?;
                        if t.pa.raw() != pa {
                            return Err(format!("map {start:#x} -> {pa:#x}, reads {:?}", t.pa));
                        }
                    }
                    Err(MapError::BadTable) if clean => {
                        return Err("map: BadTable on a clean tree".into());
                    }
                    _ => {}
                }
            }
            RawOp::Unmap { at, len, align } => {
                let (start, end) = fold(at, len, align);
                for round in 0.. {
                    let r = self.pt.unmap(&mut self.mem, addr(start), end - start);
                    stats.errors += is_err(&r);
                    let Ok(pending) = r else { break };
                    let again = pending.is_incomplete();
                    self.flush(pending)?;
                    if !again {
                        break;
                    }
                    if round > MAX_ROUNDS {
                        if clean {
                            return Err("unmap never completes on a clean tree".into());
                        }
                        break;
                    }
                }
            }
            RawOp::Protect {
                at,
                len,
                align,
                bits,
            } => {
                let (start, end) = fold(at, len, align);
                let set = if bits & 1 != 0 { F::WRITABLE } else { 0 };
                let mut clear = if bits & 2 != 0 { F::WRITABLE } else { 0 };
                if bits & 4 != 0 {
                    clear |= F::REQUIRED;
                }
                let mode = if bits & 8 != 0 {
                    WalkFlags::SHARED
                } else {
                    WalkFlags::empty()
                };
                let r = self.pt.protect(
                    &mut self.mem,
                    addr(start),
                    end - start,
                    flags::<F>(set),
                    flags::<F>(clear),
                    mode,
                );
                stats.errors += is_err(&r);
                if let Ok(pending) = r {
                    self.flush(pending)?;
                }
            }
            RawOp::Split { at, len, align, to } => {
                let (start, end) = fold(at, len, align);
                let to = [
                    SplitTo::OneLevel,
                    SplitTo::Level(Level::L1),
                    SplitTo::Level(Level::L2),
                ][usize::from(to % 3)];
                let r = self.pt.split(
                    &mut self.mem,
                    addr(start),
                    end - start,
                    to,
                    WalkFlags::empty(),
                );
                stats.errors += is_err(&r);
                if clean && r.is_err() {
                    return Err(format!("split on a clean tree: {r:?}"));
                }
            }
            RawOp::Collapse {
                at,
                len,
                align,
                max,
            } => {
                let (start, end) = fold(at, len, align);
                let max = if max % 2 == 0 { Level::L2 } else { Level::L3 };
                for round in 0.. {
                    let r = self
                        .pt
                        .collapse(&mut self.mem, addr(start), end - start, max);
                    stats.errors += is_err(&r);
                    let Ok(pending) = r else {
                        if clean {
                            return Err(format!("collapse on a clean tree: {r:?}"));
                        }
                        break;
                    };
                    let again = pending.is_incomplete();
                    self.flush(pending)?;
                    if !again {
                        break;
                    }
                    if round > MAX_ROUNDS {
                        if clean {
                            return Err("collapse never completes on a clean tree".into());
                        }
                        break;
                    }
                }
            }
            RawOp::Translate { at } => {
                let a = u64::from(at) << 12;
                let r = self.pt.translate(&self.mem, addr(a));
                stats.errors += is_err(&r);
            }
            RawOp::Walk {
                at,
                len,
                align,
                flags,
            } => {
                let (start, end) = fold(at, len, align);
                self.counted_walk(start, end, flags, stats)?;
            }
            RawOp::Reset => return self.reset(stats),
            RawOp::Write {
                at,
                level: l,
                kind,
                value,
                link,
            } => {
                self.dirty = true;
                self.writes += 1;
                let root = self.pt.root();
                let wrote = self.at_entry(u64::from(at) << 12, level(l), |ctx, tables| {
                    let lv = ctx.level();
                    let (raw, target) = match kind % 8 {
                        0 => (value, None),
                        1 => {
                            let t = frame_addr(value as u16);
                            (F::table_entry(t), Some(t))
                        }
                        2 => {
                            let t = tables.alloc(Level::L1);
                            if let Some(t) = t {
                                let _ = tables.free(t);
                            }
                            let t = t.unwrap_or(frame_addr(value as u16));
                            (F::table_entry(t), Some(t))
                        }
                        3 => {
                            let t = hpa(value);
                            (F::table_entry(t), Some(t))
                        }
                        4 => {
                            let pa = hpa(value);
                            (F::leaf_entry(pa, lv, F::REQUIRED | (value & 0xfff)), None)
                        }
                        5 => {
                            let t = ctx.entry().table();
                            (F::table_entry(t), Some(t))
                        }
                        6 => (F::table_entry(root), Some(root)),
                        _ => (value & !F::PRESENT_MASK, None),
                    };
                    let _ = ctx.set(raw);
                    if let (true, Some(t)) = (link, target) {
                        tables.link(t, ctx.level().lower().unwrap_or(Level::L1));
                    }
                })?;
                stats.writes += usize::from(wrote);
            }
            RawOp::FreeChild {
                at,
                level: l,
                unlink,
            } => {
                self.dirty = true;
                self.at_entry(u64::from(at) << 12, level(l), |ctx, tables| {
                    if F::is_table(ctx.old(), ctx.level()) {
                        let child = F::table_addr(ctx.old());
                        if unlink {
                            let _ = tables.unlink(child);
                        }
                        let _ = tables.free(child);
                    }
                })?;
            }
            RawOp::SplitEntry {
                at,
                level: l,
                child,
                pick,
            } => {
                self.dirty = true;
                self.writes += 1;
                let mut bad = None;
                self.at_entry(u64::from(at) << 12, level(l), |ctx, tables| {
                    let below = ctx.level().lower().unwrap_or(Level::L1);
                    let (kind, fresh) = match child % 4 {
                        0 => match tables.alloc_to_fill(below) {
                            Some(t) => (SplitChild::Fresh(t), Some(t)),
                            None => return,
                        },
                        1 => (SplitChild::Existing(frame_addr(pick)), None),
                        2 => (SplitChild::Fresh(frame_addr(pick)), None),
                        _ => (SplitChild::Fresh(hpa(u64::from(pick) << 12)), None),
                    };
                    let mem = tables.memory();
                    let entry = ctx.entry();
                    let r = split_entry(mem, ctx, kind, |h, _, e| {
                        // A freshly allocated child is nobody else's: what the callback
                        // reports is what the handle reads, but for the split entry itself
                        // when it sat in a freed table the child reused.
                        let reads = h.load(mem) == Some(e) || h == entry;
                        if fresh.is_some() && (Some(h.table()) != fresh || !reads) {
                            bad = Some(format!("split_entry reported {h:?} = {e:#x}"));
                        }
                    });
                    if let (Err(_), Some(t)) = (r, fresh) {
                        let _ = tables.free(t);
                    }
                })?;
                if let Some(e) = bad {
                    return Err(e);
                }
            }
            RawOp::Ctx {
                table,
                index,
                at,
                level: l,
                what,
                value,
            } => {
                self.dirty = true;
                self.writes += 1;
                let lv = Level::new(l % 6).unwrap_or(Level::L1);
                let fresh = if what % 4 == 1 {
                    self.mem
                        .alloc_table_to_fill(lv.lower().unwrap_or(Level::L1))
                } else {
                    None
                };
                let Some(handle) = EntryRef::new(frame_addr(table), usize::from(index) % 520)
                else {
                    return Ok(Next::Go);
                };
                let mode = if l & 0x80 != 0 {
                    WalkFlags::SHARED
                } else {
                    WalkFlags::empty()
                };
                let a = u64::from(at) << 12;
                let mut failed = false;
                match handle.ctx::<F, _>(&self.mem, addr(a), lv, mode) {
                    Ok(mut ctx) => match what % 4 {
                        0 => {
                            let _ = ctx.set(value);
                        }
                        1 => {
                            if let Some(t) = fresh {
                                let r = split_entry(
                                    &self.mem,
                                    &mut ctx,
                                    SplitChild::Fresh(t),
                                    |_, _, _| {},
                                );
                                failed = r.is_err();
                            }
                        }
                        2 => {
                            let child = SplitChild::Existing(frame_addr(value as u16));
                            let r = split_entry(&self.mem, &mut ctx, child, |_, _, _| {});
                            stats.errors += is_err(&r);
                        }
                        _ => {
                            let _ = handle.load(&self.mem);
                        }
                    },
                    Err(_) => {
                        stats.errors += 1;
                        failed = true;
                    }
                }
                if let (true, Some(t)) = (failed, fresh) {
                    let _ = self.mem.free_table(t);
                }
            }
            RawOp::Link {
                table,
                unlink,
                times,
            } => {
                self.dirty = true;
                let t = frame_addr(table);
                for _ in 0..=times % 4 {
                    if unlink {
                        let _ = self.mem.unlink(t);
                    } else {
                        // Any level: a link at the wrong one makes walks refuse the table.
                        let level = Level::new(1 + times % 5).unwrap_or(Level::L1);
                        self.mem.link(t, level);
                    }
                }
            }
            RawOp::Free { table, off } => {
                self.dirty = true;
                let t = if off % 2 == 1 {
                    Hpa::new(frame_addr(table).get() + u64::from(off % 4096)).unwrap_or(Hpa::ZERO)
                } else {
                    frame_addr(table)
                };
                let r = self.mem.free_table(t);
                stats.errors += is_err(&r);
            }
            RawOp::Leak { level: l } => {
                self.dirty = true;
                let _ = self.mem.alloc_table(level(l));
            }
        }
        Ok(Next::Go)
    }

    /// Walks to the entry mapping `at` at `want` (or the deepest entry above it, where
    /// the walk stops at a leaf) and calls `f` on it; whether it was reached.
    fn at_entry<C>(&mut self, at: u64, want: Level, mut f: C) -> Result<bool, String>
    where
        C: FnMut(&mut VisitCtx<'_, F>, &mut Tables<'_, TableArena<'a>>),
    {
        let at = at % VA_SPACE;
        let mut reached = false;
        let mut visitor = |kind: VisitKind,
                           ctx: &mut VisitCtx<'_, F>,
                           tables: &mut Tables<'_, TableArena<'a>>| {
            if kind == VisitKind::TablePre && ctx.level() > want {
                return Ok::<_, ()>(Action::Continue);
            }
            f(ctx, tables);
            reached = true;
            Ok(Action::Stop)
        };
        let flags = WalkFlags::LEAF | WalkFlags::TABLE_PRE;
        // A bad table on the way is a typed error; anything else is not expected.
        match self
            .pt
            .walk(&mut self.mem, addr(at), PAGE, flags, &mut visitor)
        {
            Ok(()) | Err(crate::spt::WalkError::BadTable(_)) => Ok(reached),
            Err(e) => Err(format!("walk to {at:#x}: {e:?}")),
        }
    }

    /// A walk that only counts: no more visits than the range has entries at each level
    /// (the walker's address only goes forward, even through a cycle).
    fn counted_walk(
        &mut self,
        start: u64,
        end: u64,
        bits: u8,
        stats: &mut RawStats,
    ) -> Result<(), String> {
        let flags = WalkFlags::from_bits_truncate(bits);
        let mut visits = 0u64;
        let mut visitor =
            |_: VisitKind, _: &mut VisitCtx<'_, F>, _: &mut Tables<'_, TableArena<'a>>| {
                visits += 1;
                Ok::<_, ()>(Action::Continue)
            };
        let r = self
            .pt
            .walk(&mut self.mem, addr(start), end - start, flags, &mut visitor);
        stats.errors += is_err(&r);
        if !self.dirty && r.is_err() {
            return Err(format!("walk on a clean tree: {r:?}"));
        }
        // Leaves, table pre and post visits: at most two per entry per level, and the
        // entries of one level intersecting the range number at most range/size + 1.
        let mut bound = 0;
        let mut l = Some(F::ROOT_LEVEL);
        while let Some(lv) = l {
            bound += 2 * ((end - start) / lv.page_size() + 2);
            l = lv.lower();
        }
        if visits > bound {
            return Err(format!(
                "walk of {start:#x}..{end:#x} visited {visits} entries, bound {bound}"
            ));
        }
        Ok(())
    }

    /// Destroys the tree and starts a new one over the same arena if that left nothing;
    /// otherwise asks for a new arena.
    fn reset(&mut self, stats: &mut RawStats) -> Result<Next, String> {
        if self.dirty && self.writes <= COUNTED_WRITES {
            // A whole-space walk over whatever was written ends (its count is anything).
            let count = self.pt.table_count(&self.mem);
            stats.errors += is_err(&count);
        }
        let pt = core::mem::replace(&mut self.pt, PageTable::from_root(Hpa::ZERO));
        let r = pt.destroy(&mut self.mem);
        stats.destroy_errors += is_err(&r);
        if !self.dirty {
            r.map_err(|e| format!("destroy of a clean tree: {e:?}"))?;
            if self.mem.allocated() != 0 {
                return Err(format!(
                    "destroy of a clean tree left {} tables",
                    self.mem.allocated()
                ));
            }
        }
        if r.is_err() || self.mem.allocated() != 0 {
            return Ok(Next::Rebuild);
        }
        match PageTable::new(&mut self.mem) {
            Ok(pt) => self.pt = pt,
            Err(_) => return Ok(Next::Rebuild),
        }
        self.dirty = false;
        self.writes = 0;
        Ok(Next::Go)
    }
}

/// Runs `ops` on a page table over `frames` and `slots`, rebuilding the arena whenever a
/// reset finds a corrupt tree. `Err` names the op that broke an invariant.
pub fn run<F: PteFormat>(
    frames: &[TableFrame],
    slots: &mut [TableSlot],
    ops: &[RawOp],
) -> Result<RawStats, String> {
    let base = Hpa::new(TABLES_AT).map_err(|e| format!("{e}"))?;
    let mut stats = RawStats::default();
    let mut i = 0;
    while i < ops.len() || stats.arenas == 0 {
        let mem = TableArena::new(frames, &mut *slots, base).map_err(|e| format!("{e}"))?;
        stats.arenas += 1;
        let mut epoch = Epoch::<F>::new(mem)?;
        let mut rebuild = false;
        while let Some(&op) = ops.get(i) {
            i += 1;
            let next = epoch
                .apply(op, &mut stats)
                .map_err(|e| format!("{} op {} {op:?}: {e}", F::NAME, i - 1))?;
            if matches!(next, Next::Rebuild) {
                rebuild = true;
                break;
            }
        }
        if !rebuild {
            // The end: a final reset checks a clean tree destroys whole.
            epoch
                .reset(&mut stats)
                .map_err(|e| format!("{} final reset: {e}", F::NAME))?;
        }
    }
    Ok(stats)
}

/// A random op, for the randomized test: normal ops half the time, resets now and then.
pub fn random_op(rng: &mut super::Rng) -> RawOp {
    let n = |rng: &mut super::Rng, k: u64| rng.below(k);
    let at = n(rng, 1 << 16) as u16;
    let len = n(rng, 256) as u8;
    let align = [0, 0, 0, 1, 1, 2][n(rng, 6) as usize];
    // Addresses of raw ops: mostly where the normal ops map (the first few MiB and GiB).
    let raw_at = match n(rng, 3) {
        0 => n(rng, 1 << 10) as u32,
        1 => (n(rng, 4) << 18) as u32 | n(rng, 1 << 10) as u32,
        _ => n(rng, 1 << 20) as u32,
    };
    let lv = n(rng, 5) as u8;
    match n(rng, 20) {
        0..=3 => RawOp::Map {
            at: at % 64,
            len,
            pa: n(rng, 1 << 16) as u16,
            align,
            size: n(rng, 5) as u8,
        },
        4 => RawOp::Unmap {
            at: at % 64,
            len,
            align,
        },
        5 => RawOp::Protect {
            at: at % 64,
            len,
            align,
            bits: n(rng, 16) as u8,
        },
        6 => RawOp::Split {
            at: at % 64,
            len,
            align,
            to: n(rng, 3) as u8,
        },
        7 => RawOp::Collapse {
            at: at % 64,
            len,
            align,
            max: n(rng, 2) as u8,
        },
        8 => RawOp::Translate { at: raw_at },
        9 => RawOp::Walk {
            at: at % 64,
            len,
            align,
            flags: n(rng, 16) as u8,
        },
        10 => RawOp::Reset,
        11 | 12 => RawOp::Write {
            at: raw_at,
            level: lv,
            kind: n(rng, 8) as u8,
            value: rng.next_u64(),
            link: n(rng, 2) == 0,
        },
        13 => RawOp::FreeChild {
            at: raw_at,
            level: lv,
            unlink: n(rng, 2) == 0,
        },
        14 | 15 => RawOp::SplitEntry {
            at: raw_at,
            level: lv,
            child: n(rng, 4) as u8,
            pick: n(rng, FRAMES as u64 + 8) as u16,
        },
        16 => RawOp::Ctx {
            table: n(rng, FRAMES as u64 + 8) as u16,
            index: n(rng, 520) as u16,
            at: raw_at,
            level: n(rng, 256) as u8,
            what: n(rng, 4) as u8,
            value: rng.next_u64(),
        },
        17 => RawOp::Link {
            table: n(rng, FRAMES as u64 + 8) as u16,
            unlink: n(rng, 2) == 0,
            times: n(rng, 4) as u8,
        },
        18 => RawOp::Free {
            table: n(rng, FRAMES as u64 + 8) as u16,
            off: n(rng, 8192) as u16,
        },
        _ => RawOp::Leak { level: lv },
    }
}

#[cfg(test)]
mod tests {
    use alloc::vec::Vec;

    use super::*;
    use crate::spt::{Ept, X86_64, X86_64La57};
    use crate::testing::Rng;

    /// A few hundred random sequences per format replay without a panic or a broken
    /// invariant, and between them reach the raw paths: writes that land, corrupt trees
    /// that `destroy` refuses, rebuilt arenas, and clean phases checked against the table
    /// count.
    fn replay<F: PteFormat>(seeds: u64) {
        let frames = frames();
        let mut slots = crate::testing::spt::slots();
        let mut total = RawStats::default();
        for seed in 0..seeds {
            let mut rng = Rng::new(seed * 7919 + 13);
            let n = 20 + rng.below(100) as usize;
            let ops: Vec<RawOp> = (0..n).map(|_| random_op(&mut rng)).collect();
            let stats = match run::<F>(&frames, &mut slots, &ops) {
                Ok(s) => s,
                Err(e) => {
                    #[allow(clippy::panic, reason = "a test reports the failing sequence")]
                    {
                        panic!("seed {seed}: {e}\nops: {ops:?}")
                    }
                }
            };
            total.arenas += stats.arenas;
            total.destroy_errors += stats.destroy_errors;
            total.writes += stats.writes;
            total.errors += stats.errors;
            total.clean_ops += stats.clean_ops;
        }
        assert!(total.arenas > seeds as usize, "{total:?}");
        assert!(total.destroy_errors > 0, "{total:?}");
        assert!(total.writes > seeds as usize, "{total:?}");
        assert!(total.errors > 0, "{total:?}");
        assert!(total.clean_ops > seeds as usize, "{total:?}");
    }

    #[test]
    fn raw_ops_x86_64() {
        replay::<X86_64>(200);
    }

    #[test]
    fn raw_ops_la57() {
        replay::<X86_64La57>(100);
    }

    #[test]
    fn raw_ops_ept() {
        replay::<Ept>(200);
    }

    /// A cycle (the root's first entry pointing at the root) keeps every walk finite and
    /// bounded, and a reset afterwards rebuilds what it must.
    #[test]
    fn cycle_through_the_root() {
        let frames = frames();
        let mut slots = crate::testing::spt::slots();
        let ops = [
            RawOp::Map {
                at: 0,
                len: 3,
                pa: 1,
                align: 1,
                size: 0,
            },
            RawOp::Write {
                at: 0,
                level: 3,
                kind: 6,
                value: 0,
                link: false,
            },
            RawOp::Walk {
                at: 0,
                len: 1,
                align: 2,
                flags: 0x7,
            },
            RawOp::Translate { at: 0x1234 },
            RawOp::Unmap {
                at: 0,
                len: 0,
                align: 1,
            },
            RawOp::Reset,
            RawOp::Map {
                at: 0,
                len: 0,
                pa: 0,
                align: 0,
                size: 0,
            },
        ];
        let stats = run::<X86_64>(&frames, &mut slots, &ops);
        assert!(
            stats
                .as_ref()
                .is_ok_and(|s| s.writes == 1 && s.clean_ops >= 2),
            "{stats:?}"
        );
    }
}
