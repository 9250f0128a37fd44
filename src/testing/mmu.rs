//! The shadow MMU ([`crate::spt::mmu`]) against a model of memory slots, host memory and
//! dirty bitmaps.
//!
//! The model knows the slots (id, base, size, read-only, logging mode and a bitmap per
//! logging slot) and the host's memory, which is a pure function of `(slot id, gfn)`: each
//! slot id has its own host frame offset, host mapping level, read-only regions and holes.
//! The MMU may drop any mapping at any time (the page limit zaps the oldest pages), so the
//! model does not say which gfns are mapped; it says what any mapping must be. After every
//! op the harness checks:
//! - [`Mmu::check`]: rmaps exact both ways, parent lists match the tree, hash, page limit,
//!   writable-implies-logged;
//! - tables allocated = live shadow pages + tables in the fault caches (no leak);
//! - the MMU's slots are the model's;
//! - every present leaf maps the host frame of its gfn in a slot of the model, at a level
//!   the host mapping allows, writable (or mmu-writable) only where the slot and the host
//!   allow writes, and, in a logging slot, writable only where the model's bitmap already
//!   has every unit it covers set;
//! - the dirty log of every logging slot EQUALS the model's bitmap: bits set by every write
//!   (write faults, and guest writes to pages that translate writable, which need no
//!   fault), all set at enable with `initially_set`, cleared by the get-and-clear and clear
//!   calls. A write made after logging started that the log misses fails this check.
//!
//! Ops that the model says must be refused are refused with the expected typed error and
//! change nothing ([`Mmu::check`] counts and the logs before and after agree). Faults may
//! also fail for want of tables, descriptors or shadow pages (the setups include tiny
//! arenas, descriptor pools and page limits); those leave the MMU consistent.

use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use crate::addr::{Gfn, Gpa, Hpa, Level, PAGE_SHIFT, Pfn};
use crate::rmap::{SplitCaches, SplitError};
use crate::spt::mmu::{
    Fault, FaultCaches, FaultError, HostMemory, HostPage, LogMode, Mmu, MmuConfig, MmuCounts,
    SlotError, SlotFlags, SlotId,
};
use crate::spt::{Ept, PteFormat, TableArena, TableFrame, TableSlot};
use crate::sync::Ordering;

use super::Rng;
use super::spt::CountingFlush;

/// Table frames a harness may use at most (the setup picks how many).
pub const FRAMES: usize = 256;
/// Slot ids the ops name (`slot % SLOT_IDS`); one more than `MAX_SLOTS`, so `TooMany` occurs.
pub const SLOT_IDS: u8 = 5;
/// Memory slots the MMU accepts.
const MAX_SLOTS: usize = 4;
/// A run of mappings contiguous in gfn and host address: (first gfn, end gfn, first
/// host address).
type Run = (u64, u64, u64);

/// Frames of 2 MiB and 1 GiB.
const F2M: u64 = 512;
const F1G: u64 = 1 << 18;

/// How one run's MMU is built: folded into tiny or ample arenas, descriptor pools and page
/// limits, and the largest leaf.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(fuzzing, derive(arbitrary::Arbitrary))]
pub struct MmuSetup {
    /// Table frames: `[6, 12, 40, FRAMES][frames % 4]` (6: `OutOfTables` soon).
    pub frames: u8,
    /// Rmap descriptors: `[3, 8, 1024][descriptors % 3]` (3: less than one fault's top-up).
    pub descriptors: u8,
    /// Page limit: `[none, 4, 7, 24][limit % 4]`.
    pub limit: u8,
    /// Largest leaf: `[1 GiB, 2 MiB, 4 KiB][max_leaf % 3]`.
    pub max_leaf: u8,
    /// Bit 0: eager splitting (`MmuConfig::eager_split`); bit 1: two address spaces; bit 2:
    /// every eager split streams its writes (`MmuConfig::stream_split_bytes` 0).
    pub flags: u8,
}

impl MmuSetup {
    /// A setup from a seed, for the deterministic tests.
    pub fn from_seed(seed: u64) -> Self {
        let mut rng = Rng::new(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        // Mostly ample, so long sequences reach deep states; sometimes tiny.
        let ample = rng.below(4) != 0;
        Self {
            frames: if ample { 3 } else { rng.below(4) as u8 },
            descriptors: if ample { 2 } else { rng.below(3) as u8 },
            limit: if ample { 0 } else { rng.below(4) as u8 },
            max_leaf: if ample && rng.below(2) == 0 {
                0
            } else {
                rng.below(3) as u8
            },
            flags: rng.below(8) as u8,
        }
    }

    fn spaces(&self) -> u8 {
        1 + (self.flags >> 1 & 1)
    }

    fn frames(&self) -> usize {
        [6, 12, 40, FRAMES][usize::from(self.frames % 4)]
    }

    fn config(&self) -> MmuConfig {
        MmuConfig {
            // One more page per extra address space (its root).
            page_limit: [None, Some(4), Some(7), Some(24)][usize::from(self.limit % 4)]
                .map(|n| n + usize::from(self.spaces()) - 1),
            hash_buckets: 16,
            descriptors: [3, 8, 1024][usize::from(self.descriptors % 3)],
            max_leaf: [Level::L3, Level::L2, Level::L1][usize::from(self.max_leaf % 3)],
            max_slots: MAX_SLOTS,
            eager_split: self.flags & 1 != 0,
            address_spaces: self.spaces(),
            stream_split_bytes: if self.flags & 4 != 0 { 0 } else { u64::MAX },
            ..MmuConfig::default()
        }
    }
}

/// One operation. Slot ids are `slot % SLOT_IDS`; `at` picks a gfn of the slot (its
/// edges, the 2 MiB and 1 GiB boundaries inside it, or a spot in between; see [`pick`]),
/// or, when no slot has that id, a gfn anywhere (mostly in no slot).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(fuzzing, derive(arbitrary::Arbitrary))]
pub enum MmuOp {
    /// Add a slot at `base` (see [`fold_base`]) of `len` (see [`fold_len`]; lengths above
    /// 1 GiB only for id 0, whose host pages are 1 GiB) frames; `flags` bit 0 starts
    /// 4 KiB logging, bit 1 makes it read-only.
    AddSlot {
        slot: u8,
        base: u8,
        len: u8,
        flags: u8,
    },
    /// Delete a slot.
    DeleteSlot { slot: u8 },
    /// Move a slot to `base`.
    MoveSlot { slot: u8, base: u8 },
    /// A read or write fault.
    Fault { slot: u8, at: u16, write: bool },
    /// The guest writes a page: no fault if it translates writable, a write fault if not.
    GuestWrite { slot: u8, at: u16 },
    /// Start logging: `mode` bit 0 initially-set, bits 1-2 granularity (0, 1: 4 KiB, 2:
    /// 2 MiB, 3: 1 GiB, refused); bit 3 through `update_slot_flags` (4 KiB, not initially
    /// set), bit 4 then also flips read-only (refused).
    EnableLog { slot: u8, mode: u8 },
    /// Stop logging; `how` bit 0 through `update_slot_flags`, bit 1 then also flips
    /// read-only (refused).
    DisableLog { slot: u8, how: u8 },
    /// `get_dirty_log` (into a bitmap one word short when `short`).
    GetLog { slot: u8, short: bool },
    /// `get_and_clear_dirty_log` (into a bitmap one word short when `short`).
    GetAndClear { slot: u8, short: bool },
    /// `clear_dirty_log` of `words % 3` masks (`mask`, then variations of it; `words` bits
    /// 2 and 3 set its bits 63 and 0) from word `first` (modulo the log's words + 1);
    /// `first` bit 15 makes the start unaligned.
    ClearLog {
        slot: u8,
        first: u16,
        words: u8,
        mask: u64,
    },
    /// Zap `[pick(at), + [1, 7, 512, 1 GiB][len % 4] frames)`.
    Zap { slot: u8, at: u16, len: u8 },
    /// Set the page limit to `[root - 1, root, root + 1, root + 3, 10, 30, 300][limit % 7]`.
    SetLimit { limit: u8 },
    /// Give the fault caches back (and the splitter's, and the MMU's own).
    Release,
    /// A fault in address space `space % 3` (2 or more: refused when there are fewer).
    FaultIn {
        space: u8,
        slot: u8,
        at: u16,
        write: bool,
    },
    /// An eager split of slot `slot`: the whole slot when `len` bit 7 is set, else
    /// `[pick(at), + [1, 7, 512, 1 GiB][len % 4])`; `how` bit 0 targets 2 MiB (else
    /// 4 KiB), bit 1 finds the huge pages by a walk (else through the rmaps), bits 2-3 force
    /// a lock drop every `[never, 2, 3, 7][..]` huge pages.
    Split { slot: u8, at: u16, len: u8, how: u8 },
}

/// A slot base: a 512 MiB anchor plus an offset that lands on or next to a 2 MiB or 1 GiB
/// boundary.
pub fn fold_base(b: u8) -> u64 {
    let anchor = u64::from(b & 7) * (F1G / 2);
    let adj = [0, 1, F2M - 1, F2M, F2M + 1, F1G - F2M, F1G - 1, 3 * F2M][usize::from((b >> 3) & 7)];
    anchor + adj
}

/// A slot length in frames (0 for `len == 255`: refused).
pub fn fold_len(l: u8) -> u64 {
    if l == u8::MAX {
        return 0;
    }
    // One length in eight reaches 1 GiB leaves (and makes `Mmu::check`, which reads every
    // rmap head of a slot, 500 times slower per op).
    let n = [F2M - 1, F2M, F2M + 1, 2 * F2M, 8 * F2M, 3, F1G + F2M, 1][usize::from(l & 7)];
    n + u64::from((l >> 3) & 3)
}

/// A gfn in `[base, base + npages)` chosen by `at`: the first or last frame, a 2 MiB or
/// 1 GiB boundary inside the slot or the frame before it, or a spot in between.
pub fn pick(base: u64, npages: u64, at: u16) -> u64 {
    let r = u64::from(at >> 3);
    let spread = (r * npages) >> 13;
    let boundary = |unit: u64| {
        let b = base.div_ceil(unit) * unit - base;
        if b < npages { b } else { spread }
    };
    let off = match at & 7 {
        0 => 0,
        1 => npages - 1,
        2 => boundary(F2M),
        3 => boundary(F2M).saturating_sub(1),
        4 => boundary(F1G),
        5 => boundary(F1G).saturating_sub(1),
        6 => spread,
        _ => npages - 1 - (r % npages.min(1024)),
    };
    base + off.min(npages - 1)
}

/// The host: a pure function of `(slot id, gfn)`.
///
/// - id 0: frames 1 GiB-aligned, host maps 1 GiB pages, all writable;
/// - id 1: 2 MiB-aligned; 2 MiB pages, but 4 KiB in every fifth 2 MiB region; every third
///   2 MiB region read-only;
/// - id 2: frames misaligned by 3 although the host claims 2 MiB pages: the MMU must map
///   4 KiB pages only;
/// - id 3: 4 KiB pages; frames with `gfn % 7 == 3` missing, `gfn % 5 == 1` read-only;
/// - id 4: 1 GiB pages, every other 1 GiB region read-only.
#[derive(Clone, Copy, Debug, Default)]
pub struct Host;

impl Host {
    fn page(id: u16, g: u64) -> Option<HostPage> {
        let (off, level, writable) = match id {
            0 => (0x100_0000, Level::L3, true),
            1 => {
                let r = g / F2M;
                let level = if r % 5 == 4 { Level::L1 } else { Level::L2 };
                (0x80_0200, level, r % 3 != 2)
            }
            2 => (0x200_0003, Level::L2, true),
            3 => {
                if g % 7 == 3 {
                    return None;
                }
                (0x300_0000, Level::L1, g % 5 != 1)
            }
            _ => (0x400_0000, Level::L3, (g / F1G) % 2 == 0),
        };
        Some(HostPage {
            pfn: Pfn::new(off + g).ok()?,
            level,
            writable,
        })
    }
}

impl HostMemory for Host {
    fn host_page(&self, slot: SlotId, gfn: Gfn) -> Option<HostPage> {
        Self::page(slot.0, gfn.get())
    }
}

fn units_of(base: u64, npages: u64, g: Level) -> u64 {
    let s = g.shift() - PAGE_SHIFT;
    ((base + npages - 1) >> s) - (base >> s) + 1
}

/// A logging slot's model bitmap.
#[derive(Clone, Debug, PartialEq, Eq)]
struct MLog {
    mode: LogMode,
    bits: Vec<u64>,
}

impl MLog {
    fn new(base: u64, npages: u64, mode: LogMode) -> Self {
        let units = units_of(base, npages, mode.granularity);
        let words = units.div_ceil(64) as usize;
        let mut bits = vec![0; words];
        if mode.initially_set {
            for (w, word) in bits.iter_mut().enumerate() {
                let valid = units - w as u64 * 64;
                *word = if valid >= 64 {
                    u64::MAX
                } else {
                    (1 << valid) - 1
                };
            }
        }
        Self { mode, bits }
    }
}

/// A slot of the model.
#[derive(Clone, Debug, PartialEq, Eq)]
struct MSlot {
    id: u16,
    base: u64,
    npages: u64,
    readonly: bool,
    log: Option<MLog>,
}

impl MSlot {
    fn end(&self) -> u64 {
        self.base + self.npages
    }

    fn unit(&self, g: u64, gran: Level) -> u64 {
        let s = gran.shift() - PAGE_SHIFT;
        (g >> s) - (self.base >> s)
    }

    fn mark(&mut self, g: u64) {
        let Some(log) = self.log.as_mut() else {
            return;
        };
        let u = {
            let s = log.mode.granularity.shift() - PAGE_SHIFT;
            (g >> s) - (self.base >> s)
        };
        if let Some(w) = log.bits.get_mut((u / 64) as usize) {
            *w |= 1 << (u % 64);
        }
    }

    fn is_set(&self, u: u64) -> bool {
        self.log.as_ref().is_some_and(|l| {
            l.bits
                .get((u / 64) as usize)
                .is_some_and(|w| w & (1 << (u % 64)) != 0)
        })
    }

    fn flags(&self) -> SlotFlags {
        let mut f = SlotFlags::empty();
        if self.readonly {
            f |= SlotFlags::READONLY;
        }
        if self.log.is_some() {
            f |= SlotFlags::LOG_DIRTY_PAGES;
        }
        f
    }
}

/// The MMU under test, its environment and the model.
pub struct MmuHarness<'a, F: PteFormat> {
    mmu: Mmu<'a, F>,
    caches: FaultCaches,
    split_caches: SplitCaches,
    spaces: u8,
    /// The address space of the fault being checked.
    space: u8,
    tlb: CountingFlush,
    slots: Vec<MSlot>,
    limit: usize,
    /// What [`Mmu::check`] said after the last op.
    counts: MmuCounts,
    /// How many faults and guest writes succeeded / failed for want of resources.
    pub outcomes: Outcomes,
}

/// What happened over a run, so tests can see the ops reached where they should.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Outcomes {
    /// Faults that mapped or fixed something (or found it fixed).
    pub faults_ok: u64,
    /// Faults refused as the model said (no slot, read-only, no host page).
    pub faults_refused: u64,
    /// Faults that failed for want of tables, descriptors or room under the page limit.
    pub faults_starved: u64,
    /// Guest writes to pages already writable (no fault).
    pub writes_unfaulted: u64,
    /// Slot and dirty-log ops that succeeded.
    pub slot_ok: u64,
    /// Slot and dirty-log ops refused.
    pub slot_refused: u64,
    /// Largest number of leaves seen at once.
    pub max_leaves: u64,
    /// Huge leaves (above 4 KiB) seen after an op.
    pub huge_seen: u64,
    /// 1 GiB leaves seen after an op.
    pub giant_seen: u64,
    /// Eager splits that ran (to the end or until a resource ran out).
    pub splits: u64,
    /// Huge entries they split.
    pub split_entries: u64,
    /// Lock drops they made.
    pub split_drops: u64,
}

/// Frames for a harness (shared by runs: the arena zeroes a frame when it hands it out).
pub fn frames() -> Vec<TableFrame> {
    (0..FRAMES).map(|_| TableFrame::new()).collect()
}

/// Slots for a harness's frames (fresh for every run).
pub fn slots() -> Vec<TableSlot> {
    (0..FRAMES).map(|_| TableSlot::default()).collect()
}

fn gpa(g: u64) -> Result<Gpa, String> {
    Gpa::new(g << PAGE_SHIFT).map_err(|e| format!("gpa of {g:#x}: {e}"))
}

fn gfn(g: u64) -> Result<Gfn, String> {
    Gfn::new(g).map_err(|e| format!("gfn {g:#x}: {e}"))
}

fn frames_of(level: Level) -> u64 {
    level.page_size() >> PAGE_SHIFT
}

/// Errors of the fault path that depend on resources, not on the model.
fn starved(e: FaultError) -> bool {
    matches!(
        e,
        FaultError::OutOfTables | FaultError::OutOfDescriptors | FaultError::PageLimit
    )
}

impl<'a, F: PteFormat> MmuHarness<'a, F> {
    /// An MMU with no slots over the first frames of `frames` (as many as `setup` says).
    pub fn new(
        setup: MmuSetup,
        frames: &'a [TableFrame],
        slots: &'a mut [TableSlot],
    ) -> Result<Self, String> {
        let n = setup.frames().min(frames.len()).min(slots.len());
        let base = Hpa::new(0x8000_0000).map_err(|e| format!("{e}"))?;
        let (frames, slots) = (&frames[..n], &mut slots[..n]);
        let arena = TableArena::new(frames, slots, base).map_err(|e| format!("{e}"))?;
        let config = setup.config();
        let mmu = Mmu::new(arena, config).map_err(|e| format!("Mmu::new: {e}"))?;
        let limit = mmu.page_limit();
        let counts = mmu.check().map_err(|e| format!("new: {e:?}"))?;
        Ok(Self {
            mmu,
            caches: FaultCaches::new(),
            split_caches: SplitCaches::new(),
            spaces: setup.spaces(),
            space: 0,
            tlb: CountingFlush::default(),
            slots: Vec::new(),
            limit,
            counts,
            outcomes: Outcomes::default(),
        })
    }

    /// The MMU, for extra checks by the caller.
    pub fn mmu(&self) -> &Mmu<'a, F> {
        &self.mmu
    }

    fn slot_by_id(&self, id: u16) -> Option<usize> {
        self.slots.iter().position(|s| s.id == id)
    }

    fn slot_of(&self, g: u64) -> Option<usize> {
        self.slots.iter().position(|s| s.base <= g && g < s.end())
    }

    /// The gfn `at` picks for slot id `id`; when there is no such slot, one of another
    /// slot, or (one time in four) a gfn anywhere, mostly in no slot.
    fn target(&self, id: u16, at: u16) -> u64 {
        let i = match self.slot_by_id(id) {
            Some(i) => Some(i),
            None if at & 0x18 != 0 && !self.slots.is_empty() => {
                Some(usize::from(id) % self.slots.len())
            }
            None => None,
        };
        match i {
            Some(i) => pick(self.slots[i].base, self.slots[i].npages, at),
            None => u64::from(at) << 5,
        }
    }

    fn overlaps(&self, except: Option<u16>, base: u64, npages: u64) -> bool {
        self.slots
            .iter()
            .any(|s| Some(s.id) != except && s.base < base + npages && base < s.end())
    }

    /// Applies one op to the MMU and the model, then checks everything.
    pub fn apply(&mut self, op: MmuOp) -> Result<(), String> {
        let refused = match op {
            MmuOp::AddSlot {
                slot,
                base,
                len,
                flags,
            } => {
                let id = u16::from(slot % SLOT_IDS);
                let mut n = fold_len(len);
                // Only slot 0 gets 1 GiB of frames: checking a slot reads every rmap head,
                // and one such slot costs more than all the others together.
                if n > F1G && id != 0 {
                    n = 8 * F2M;
                }
                self.add(id, fold_base(base), n, flags)?
            }
            MmuOp::DeleteSlot { slot } => self.delete(u16::from(slot % SLOT_IDS))?,
            MmuOp::MoveSlot { slot, base } => {
                self.move_slot(u16::from(slot % SLOT_IDS), fold_base(base))?
            }
            MmuOp::Fault { slot, at, write } => {
                let g = self.target(u16::from(slot % SLOT_IDS), at);
                self.fault(g, write)?
            }
            MmuOp::GuestWrite { slot, at } => {
                let g = self.target(u16::from(slot % SLOT_IDS), at);
                self.guest_write(g)?
            }
            MmuOp::EnableLog { slot, mode } => self.enable(u16::from(slot % SLOT_IDS), mode)?,
            MmuOp::DisableLog { slot, how } => self.disable(u16::from(slot % SLOT_IDS), how)?,
            MmuOp::GetLog { slot, short } => self.get_log(u16::from(slot % SLOT_IDS), short)?,
            MmuOp::GetAndClear { slot, short } => {
                self.get_and_clear(u16::from(slot % SLOT_IDS), short)?
            }
            MmuOp::ClearLog {
                slot,
                first,
                words,
                mask,
            } => self.clear(u16::from(slot % SLOT_IDS), first, words, mask)?,
            MmuOp::Zap { slot, at, len } => {
                let g = self.target(u16::from(slot % SLOT_IDS), at);
                let n = [1, 7, F2M, F1G][usize::from(len % 4)];
                self.zap(g, g + n)?;
                false
            }
            MmuOp::SetLimit { limit } => self.set_limit(limit)?,
            MmuOp::FaultIn {
                space,
                slot,
                at,
                write,
            } => {
                let g = self.target(u16::from(slot % SLOT_IDS), at);
                self.fault_in(space % 3, g, write)?
            }
            MmuOp::Split { slot, at, len, how } => {
                self.split(u16::from(slot % SLOT_IDS), at, len, how)?
            }
            MmuOp::Release => {
                self.split_caches
                    .release(&self.mmu)
                    .map_err(|e| format!("release split caches: {e:?}"))?;
                self.mmu.release_split_caches();
                self.caches
                    .release(&self.mmu)
                    .map_err(|e| format!("release: {e:?}"))?;
                if self.caches.tables() != 0 || self.caches.descriptors() != 0 {
                    return Err("caches not empty after release".into());
                }
                false
            }
        };
        let before = self.counts;
        self.audit()?;
        if refused && self.counts != before {
            return Err(format!(
                "a refused op changed the MMU: {before:?} -> {:?}",
                self.counts
            ));
        }
        Ok(())
    }

    /// Compares a slot-op result with the model's expectation; true when refused.
    fn slot_result<T>(
        &mut self,
        what: &str,
        got: Result<T, SlotError>,
        expect: Option<SlotError>,
    ) -> Result<Option<T>, String> {
        match (got, expect) {
            (Ok(v), None) => {
                self.outcomes.slot_ok += 1;
                Ok(Some(v))
            }
            (Err(e), Some(x)) if e == x => {
                self.outcomes.slot_refused += 1;
                Ok(None)
            }
            (Err(e), None) => Err(format!("{what}: {e:?}, model expects success")),
            (Ok(_), Some(x)) => Err(format!("{what}: succeeded, model expects {x:?}")),
            (Err(e), Some(x)) => Err(format!("{what}: {e:?}, model expects {x:?}")),
        }
    }

    fn add(&mut self, id: u16, base: u64, npages: u64, flags: u8) -> Result<bool, String> {
        let mut f = SlotFlags::empty();
        if flags & 1 != 0 {
            f |= SlotFlags::LOG_DIRTY_PAGES;
        }
        if flags & 2 != 0 {
            f |= SlotFlags::READONLY;
        }
        let expect = if npages == 0 {
            Some(SlotError::BadRange)
        } else if self.slot_by_id(id).is_some() {
            Some(SlotError::Exists)
        } else if self.slots.len() >= MAX_SLOTS {
            Some(SlotError::TooMany)
        } else if self.overlaps(None, base, npages) {
            Some(SlotError::Overlap)
        } else {
            None
        };
        let got = self.mmu.add_slot(SlotId(id), gfn(base)?, npages, f);
        if self.slot_result("add_slot", got, expect)?.is_none() {
            return Ok(true);
        }
        let log = (flags & 1 != 0).then(|| MLog::new(base, npages, LogMode::PAGES));
        self.slots.push(MSlot {
            id,
            base,
            npages,
            readonly: flags & 2 != 0,
            log,
        });
        self.slots.sort_by_key(|s| s.base);
        Ok(false)
    }

    fn delete(&mut self, id: u16) -> Result<bool, String> {
        let i = self.slot_by_id(id);
        let expect = i.is_none().then_some(SlotError::NotFound);
        let got = self.mmu.delete_slot(SlotId(id), &mut self.tlb);
        if self.slot_result("delete_slot", got, expect)?.is_none() {
            return Ok(true);
        }
        if let Some(i) = i {
            self.slots.remove(i);
        }
        Ok(false)
    }

    fn move_slot(&mut self, id: u16, base: u64) -> Result<bool, String> {
        let i = self.slot_by_id(id);
        let expect = match i {
            None => Some(SlotError::NotFound),
            Some(i) if self.overlaps(Some(id), base, self.slots[i].npages) => {
                Some(SlotError::Overlap)
            }
            Some(_) => None,
        };
        let got = self.mmu.move_slot(SlotId(id), gfn(base)?, &mut self.tlb);
        if self.slot_result("move_slot", got, expect)?.is_none() {
            return Ok(true);
        }
        if let Some(i) = i {
            // The log moves with the slot (KVM reuses the old bitmap): page by page, a page
            // whose old unit was dirty makes its new unit dirty.
            let old = self.slots[i].clone();
            let s = &mut self.slots[i];
            s.base = base;
            if let Some(mode) = old.log.as_ref().map(|l| l.mode) {
                let fresh = LogMode {
                    initially_set: false,
                    ..mode
                };
                let mut log = MLog::new(base, s.npages, fresh);
                log.mode = mode;
                s.log = Some(log);
                for off in 0..s.npages {
                    if old.is_set(old.unit(old.base + off, mode.granularity)) {
                        s.mark(base + off);
                    }
                }
            }
            self.slots.sort_by_key(|s| s.base);
        }
        Ok(false)
    }

    /// What a fault at `g` must do, by the model: `Err` for the refusals that do not
    /// depend on resources.
    fn expect_fault(&self, g: u64, write: bool) -> Result<HostPage, FaultError> {
        let i = self.slot_of(g).ok_or(FaultError::NoSlot)?;
        let s = &self.slots[i];
        if write && s.readonly {
            return Err(FaultError::ReadOnly);
        }
        let hp = Host::page(s.id, g).ok_or(FaultError::NoHostPage)?;
        if write && !hp.writable {
            return Err(FaultError::ReadOnly);
        }
        Ok(hp)
    }

    fn fault(&mut self, g: u64, write: bool) -> Result<bool, String> {
        self.fault_in(0, g, write)
    }

    /// An eager split (see [`MmuOp::Split`]): typed refusals as the model expects, or
    /// progress until a resource runs out; never a change of what is mapped.
    fn split(&mut self, id: u16, at: u16, len: u8, how: u8) -> Result<bool, String> {
        let target = if how & 1 != 0 { Level::L2 } else { Level::L1 };
        let walk = how & 2 != 0;
        self.split_caches
            .force_lock_drops([0, 2, 3, 7][usize::from(how >> 2 & 3)]);
        let bounds = self
            .slot_by_id(id)
            .map(|i| (self.slots[i].base, self.slots[i].end()));
        let range = if len & 0x80 != 0 {
            None
        } else {
            let g = self.target(id, at);
            Some((g, g + [1, 7, F2M, F1G][usize::from(len % 4)]))
        };
        let expect = match bounds {
            None => Some(SplitError::NotFound),
            Some((b, e)) => {
                let (lo, hi) = range.map_or((b, e), |(s, t)| (s.max(b), t.min(e)));
                (lo >= hi || target >= self.mmu.max_leaf()).then_some(SplitError::BadRange)
            }
        };
        let before = self.coverage()?;
        let r = match range {
            Some((s, e)) => Some((gfn(s)?, gfn(e)?)),
            None => None,
        };
        let got = if walk {
            self.mmu.eager_split_by_walk(
                &mut self.split_caches,
                SlotId(id),
                r,
                target,
                &mut self.tlb,
            )
        } else {
            self.mmu
                .eager_split(&mut self.split_caches, SlotId(id), r, target, &mut self.tlb)
        };
        let starved = |e: SplitError| {
            matches!(
                e,
                SplitError::OutOfTables | SplitError::OutOfDescriptors | SplitError::TooFewPages
            )
        };
        match (got, expect) {
            (Ok(stats), None) => {
                self.outcomes.splits += 1;
                self.outcomes.split_entries += stats.split;
                self.outcomes.split_drops += stats.lock_drops;
            }
            (Err(e), None) if starved(e) => self.outcomes.splits += 1,
            // Topping up comes first: it may fail before the refusal is seen.
            (Err(e), Some(x)) if e == x || starved(e) => return Ok(true),
            (got, expect) => {
                return Err(format!(
                    "split {r:?} to {target:?} (walk {walk}): got {got:?}, model expects {expect:?}"
                ));
            }
        }
        if self.coverage()? != before {
            return Err(format!(
                "split {r:?} to {target:?} (walk {walk}) changed a translation"
            ));
        }
        Ok(false)
    }

    fn fault_in(&mut self, space: u8, g: u64, write: bool) -> Result<bool, String> {
        let expect = if space < self.spaces {
            self.expect_fault(g, write)
        } else {
            Err(FaultError::BadAddress)
        };
        self.space = space;
        let got = self.mmu.page_fault_in(
            space,
            &mut self.caches,
            &Host,
            gpa(g)?,
            write,
            &mut self.tlb,
        );
        let what = if write { "write fault" } else { "read fault" };
        match (got, expect) {
            (Ok(fault), Ok(hp)) => {
                self.outcomes.faults_ok += 1;
                self.after_fault(g, write, fault, hp)
                    .map_err(|e| format!("{what} at {g:#x} -> {fault:?}: {e}"))?;
                Ok(false)
            }
            (Err(e), Ok(_)) if starved(e) => {
                self.outcomes.faults_starved += 1;
                Ok(false)
            }
            // Refused before the lock (topping up the caches) or by the slow path: either
            // way nothing changed.
            (Err(e), Err(x))
                if e == x
                    || matches!(e, FaultError::OutOfTables | FaultError::OutOfDescriptors) =>
            {
                self.outcomes.faults_refused += 1;
                Ok(true)
            }
            (got, expect) => Err(format!(
                "{what} at {g:#x}: got {got:?}, model expects {:?}",
                expect.map(|_| ())
            )),
        }
    }

    /// After a successful fault: `g` translates to its host frame, writable after a write;
    /// a write in a logging slot is logged in the model.
    fn after_fault(
        &mut self,
        g: u64,
        write: bool,
        fault: Fault,
        hp: HostPage,
    ) -> Result<(), String> {
        let m = self
            .mmu
            .translate_in(self.space, gpa(g)?)
            .ok_or("the gfn does not translate")?;
        let want = hp.pfn.get() << PAGE_SHIFT;
        if m.hpa.get() != want {
            return Err(format!(
                "translates to {:#x}, host frame at {want:#x}",
                m.hpa.get()
            ));
        }
        if write && !m.writable {
            return Err("not writable after a write fault".into());
        }
        let i = self.slot_of(g).ok_or("no model slot")?;
        if let Fault::Mapped { level, writable } = fault {
            if (level, writable) != (m.level, m.writable) {
                return Err(format!("reported {level:?}/{writable}, translation {m:?}"));
            }
            let s = &self.slots[i];
            let may_write = hp.writable && !s.readonly && s.log.is_none();
            if !write && writable != may_write {
                return Err(format!(
                    "read fault mapped writable={writable}, expected {may_write}"
                ));
            }
        }
        if write {
            self.slots[i].mark(g);
        }
        Ok(())
    }

    fn guest_write(&mut self, g: u64) -> Result<bool, String> {
        let writable = self.mmu.translate(gpa(g)?).is_some_and(|m| m.writable);
        if writable {
            // The CPU writes without a fault: the log must already hold the page.
            self.outcomes.writes_unfaulted += 1;
            if let Some(i) = self.slot_of(g) {
                self.slots[i].mark(g);
            }
            return Ok(false);
        }
        self.fault(g, true)
    }

    fn enable(&mut self, id: u16, mode: u8) -> Result<bool, String> {
        let i = self.slot_by_id(id);
        let via_flags = mode & 8 != 0;
        let log_mode = if via_flags {
            LogMode::PAGES
        } else {
            LogMode {
                initially_set: mode & 1 != 0,
                granularity: [Level::L1, Level::L1, Level::L2, Level::L3]
                    [usize::from((mode >> 1) & 3)],
            }
        };
        let (got, expect) = if via_flags {
            let flip = mode & 16 != 0;
            let expect = match i {
                None => Some(SlotError::NotFound),
                Some(_) if flip => Some(SlotError::FlagChange),
                Some(_) => None,
            };
            let readonly = i.is_some_and(|i| self.slots[i].readonly) != flip;
            let mut f = SlotFlags::LOG_DIRTY_PAGES;
            if readonly {
                f |= SlotFlags::READONLY;
            }
            let got = self
                .mmu
                .update_slot_flags(SlotId(id), f, &Host, &mut self.tlb);
            (got, expect)
        } else {
            let expect = if log_mode.granularity == Level::L3 {
                Some(SlotError::BadMode)
            } else {
                match i {
                    None => Some(SlotError::NotFound),
                    Some(i) if self.slots[i].log.is_some() => Some(SlotError::Logging),
                    Some(_) => None,
                }
            };
            let got = self
                .mmu
                .enable_dirty_log(SlotId(id), log_mode, &mut self.tlb);
            (got, expect)
        };
        if self.slot_result("enable logging", got, expect)?.is_none() {
            return Ok(true);
        }
        if let Some(i) = i {
            let s = &mut self.slots[i];
            if s.log.is_none() {
                s.log = Some(MLog::new(s.base, s.npages, log_mode));
            }
        }
        Ok(false)
    }

    fn disable(&mut self, id: u16, how: u8) -> Result<bool, String> {
        let i = self.slot_by_id(id);
        let ok = if how & 1 != 0 {
            let flip = how & 2 != 0;
            let expect = match i {
                None => Some(SlotError::NotFound),
                Some(_) if flip => Some(SlotError::FlagChange),
                Some(_) => None,
            };
            let readonly = i.is_some_and(|i| self.slots[i].readonly) != flip;
            let f = if readonly {
                SlotFlags::READONLY
            } else {
                SlotFlags::empty()
            };
            let got = self
                .mmu
                .update_slot_flags(SlotId(id), f, &Host, &mut self.tlb);
            self.slot_result("disable logging (flags)", got, expect)?
                .is_some()
        } else {
            let expect = match i {
                None => Some(SlotError::NotFound),
                Some(i) if self.slots[i].log.is_none() => Some(SlotError::Logging),
                Some(_) => None,
            };
            let got = self.mmu.disable_dirty_log(SlotId(id), &Host, &mut self.tlb);
            self.slot_result("disable logging", got, expect)?.is_some()
        };
        if !ok {
            return Ok(true);
        }
        if let Some(i) = i {
            self.slots[i].log = None;
        }
        Ok(false)
    }

    /// The model's expectation for a dirty-log call on slot `id`: its index, or the error.
    fn logging(&self, id: u16) -> Result<usize, SlotError> {
        let i = self.slot_by_id(id).ok_or(SlotError::NotFound)?;
        if self.slots[i].log.is_none() {
            return Err(SlotError::Logging);
        }
        Ok(i)
    }

    fn words(&self, i: usize) -> usize {
        self.slots[i].log.as_ref().map_or(0, |l| l.bits.len())
    }

    fn get_log(&mut self, id: u16, short: bool) -> Result<bool, String> {
        let (len, expect) = match self.logging(id) {
            Ok(i) => {
                let w = self.words(i);
                if short {
                    (w - 1, Some(SlotError::BadBitmap))
                } else {
                    (w, None)
                }
            }
            Err(e) => (1, Some(e)),
        };
        let mut out = vec![0u64; len];
        let got = self.mmu.get_dirty_log(SlotId(id), &mut out);
        if self.slot_result("get_dirty_log", got, expect)?.is_none() {
            return Ok(true);
        }
        // Compared with the model by the audit.
        Ok(false)
    }

    fn get_and_clear(&mut self, id: u16, short: bool) -> Result<bool, String> {
        let (len, expect, i) = match self.logging(id) {
            Ok(i) => {
                let w = self.words(i);
                if short {
                    (w - 1, Some(SlotError::BadBitmap), None)
                } else {
                    (w, None, Some(i))
                }
            }
            Err(e) => (1, Some(e), None),
        };
        let mut out = vec![0u64; len];
        let got = self
            .mmu
            .get_and_clear_dirty_log(SlotId(id), &mut out, &mut self.tlb);
        if self
            .slot_result("get_and_clear_dirty_log", got, expect)?
            .is_none()
        {
            return Ok(true);
        }
        if let Some(log) = i.and_then(|i| self.slots[i].log.as_mut()) {
            if out != log.bits {
                return Err(format!(
                    "get_and_clear_dirty_log: {} set, model {} set",
                    out.iter().map(|w| w.count_ones()).sum::<u32>(),
                    log.bits.iter().map(|w| w.count_ones()).sum::<u32>()
                ));
            }
            log.bits.iter_mut().for_each(|w| *w = 0);
        }
        Ok(false)
    }

    fn clear(&mut self, id: u16, first: u16, words: u8, mask: u64) -> Result<bool, String> {
        let n = usize::from(words % 3);
        // Bits 2 and 3 of `words` force the mask's edge bits: the first and last unit of a
        // 64-unit word are where it meets a 2 MiB boundary in an unaligned slot.
        let mask = mask | (u64::from(words >> 2 & 1) << 63) | u64::from(words >> 3 & 1);
        let masks: Vec<u64> = [mask, mask.rotate_left(23) ^ 0x8000_0000_0000_0001]
            .into_iter()
            .take(n)
            .collect();
        let total = self.logging(id).map_or(1, |i| self.words(i) as u64);
        let mut start = (u64::from(first & 0x7fff) % (total + 1)) * 64;
        if first & 0x8000 != 0 {
            start += 1 + u64::from(first % 63);
        }
        let expect = match self.logging(id) {
            Err(e) => Some(e),
            Ok(_) if start % 64 != 0 || start / 64 + n as u64 > total => Some(SlotError::BadBitmap),
            Ok(_) => None,
        };
        let got = self
            .mmu
            .clear_dirty_log(SlotId(id), start, &masks, &mut self.tlb);
        if self.slot_result("clear_dirty_log", got, expect)?.is_none() {
            return Ok(true);
        }
        if let Ok(i) = self.logging(id) {
            if let Some(log) = self.slots[i].log.as_mut() {
                for (k, m) in masks.iter().enumerate() {
                    if let Some(w) = log.bits.get_mut(start as usize / 64 + k) {
                        *w &= !m;
                    }
                }
            }
        }
        Ok(false)
    }

    fn zap(&mut self, start: u64, end: u64) -> Result<(), String> {
        self.mmu
            .zap_gfn_range(gfn(start)?, gfn(end)?, &mut self.tlb);
        for (g, level, _) in self.leaves()? {
            if g < end && start < g + frames_of(level) {
                return Err(format!(
                    "zap [{start:#x}, {end:#x}) left a level-{} leaf at {g:#x}",
                    level.get()
                ));
            }
        }
        Ok(())
    }

    fn set_limit(&mut self, limit: u8) -> Result<bool, String> {
        let root = F::ROOT_LEVEL.get() as usize;
        let n = [root - 1, root, root + 1, root + 3, 10, 30, 300][usize::from(limit % 7)];
        let expect = (n < root + usize::from(self.spaces) - 1).then_some(SlotError::LimitTooSmall);
        let before = self.mmu.pages_used();
        let got = self.mmu.set_page_limit(n, &mut self.tlb);
        let Some(zapped) = self.slot_result("set_page_limit", got, expect)? else {
            return Ok(true);
        };
        let after = self.mmu.pages_used();
        if zapped != before - after || after > n {
            return Err(format!(
                "set_page_limit({n}): {before} -> {after} pages, reported {zapped} zapped"
            ));
        }
        self.limit = n;
        Ok(false)
    }

    /// Every present leaf of the tree as `(first gfn, level, entry)`, by a walk from the
    /// root that visits at most as many tables as the arena has.
    fn leaves(&self) -> Result<Vec<(u64, Level, u64)>, String> {
        let mut out = Vec::new();
        for a in 0..self.spaces {
            out.extend(self.leaves_in(a)?);
        }
        Ok(out)
    }

    /// What address space `a` maps, as maximal runs `(first gfn, end gfn, first host
    /// address)` contiguous in both: the same for any split of the same mappings.
    fn coverage(&self) -> Result<Vec<Vec<Run>>, String> {
        let mut all = Vec::new();
        for a in 0..self.spaces {
            let mut runs: Vec<(u64, u64, u64)> = self
                .leaves_in(a)?
                .into_iter()
                .map(|(g, level, v)| (g, g + frames_of(level), F::leaf_addr(v, level).get()))
                .collect();
            runs.sort_unstable();
            let mut merged: Vec<(u64, u64, u64)> = Vec::new();
            for r in runs {
                match merged.last_mut() {
                    Some(m) if m.1 == r.0 && m.2 + ((m.1 - m.0) << PAGE_SHIFT) == r.2 => m.1 = r.1,
                    _ => merged.push(r),
                }
            }
            all.push(merged);
        }
        Ok(all)
    }

    /// Every present leaf of address space `a`: (gfn, level, entry).
    fn leaves_in(&self, a: u8) -> Result<Vec<(u64, Level, u64)>, String> {
        let mut out = Vec::new();
        let mut stack: Vec<_> = self
            .mmu
            .root_of(a)
            .map(|root| (root, F::ROOT_LEVEL, 0u64))
            .into_iter()
            .collect();
        let mut visited = 0;
        while let Some((table, level, g0)) = stack.pop() {
            visited += 1;
            if visited > FRAMES {
                return Err("the walk visits more tables than the arena has".into());
            }
            let entries = self
                .mmu
                .table(table)
                .ok_or_else(|| format!("table {:#x} outside the arena", table.get()))?;
            for (k, e) in entries.iter().enumerate() {
                let v = e.load(Ordering::Acquire);
                let g = g0 + k as u64 * frames_of(level);
                if F::is_leaf(v, level) {
                    out.push((g, level, v));
                } else if F::is_table(v, level) {
                    let lower = level.lower().ok_or("table entry at level 1")?;
                    stack.push((F::table_addr(v), lower, g));
                }
            }
        }
        Ok(out)
    }

    /// Everything the module doc lists.
    pub fn audit(&mut self) -> Result<(), String> {
        let counts = self.mmu.check().map_err(|e| format!("check: {e:?}"))?;
        self.counts = counts;
        let cached =
            self.caches.tables() + self.split_caches.tables() + self.mmu.tables_in_split_caches();
        if self.mmu.tables_allocated() != counts.pages + cached {
            return Err(format!(
                "{} tables allocated, {} live pages + {cached} cached",
                self.mmu.tables_allocated(),
                counts.pages
            ));
        }
        if self.mmu.page_limit() != self.limit || counts.pages > self.limit {
            return Err(format!(
                "page limit {} (model {}), {} pages",
                self.mmu.page_limit(),
                self.limit,
                counts.pages
            ));
        }
        let theirs = self.mmu.slots();
        let ours: Vec<(SlotId, u64, u64, SlotFlags)> = self
            .slots
            .iter()
            .map(|s| (SlotId(s.id), s.base, s.npages, s.flags()))
            .collect();
        let theirs: Vec<(SlotId, u64, u64, SlotFlags)> = theirs
            .into_iter()
            .map(|(id, b, n, f)| (id, b.get(), n, f))
            .collect();
        if ours != theirs {
            return Err(format!("slots {theirs:x?}, model {ours:x?}"));
        }

        let leaves = self.leaves()?;
        self.outcomes.max_leaves = self.outcomes.max_leaves.max(leaves.len() as u64);
        for &(g, level, v) in &leaves {
            if level > Level::L1 {
                self.outcomes.huge_seen += 1;
            }
            if level == Level::L3 {
                self.outcomes.giant_seen += 1;
            }
            self.audit_leaf(g, level, v)
                .map_err(|e| format!("level-{} leaf at {g:#x} ({v:#x}): {e}", level.get()))?;
        }
        if leaves.len() as u64 != counts.leaves {
            return Err(format!(
                "{} leaves reachable, check counted {}",
                leaves.len(),
                counts.leaves
            ));
        }

        for s in &self.slots {
            let Some(log) = s.log.as_ref() else { continue };
            let words = self
                .mmu
                .dirty_log_words(SlotId(s.id))
                .map_err(|e| format!("dirty_log_words: {e:?}"))?;
            if words != log.bits.len() {
                return Err(format!(
                    "slot {}: {words} log words, model {}",
                    s.id,
                    log.bits.len()
                ));
            }
            let mut out = vec![0u64; words];
            self.mmu
                .get_dirty_log(SlotId(s.id), &mut out)
                .map_err(|e| format!("get_dirty_log: {e:?}"))?;
            if let Some(w) = (0..words).find(|&w| out[w] != log.bits[w]) {
                let unit = w as u64 * 64 + u64::from((out[w] ^ log.bits[w]).trailing_zeros());
                let missing = log.bits[w] & !out[w] != 0;
                return Err(format!(
                    "slot {} log word {w}: {:#x}, model {:#x} (unit {unit} {}; mode {:?})",
                    s.id,
                    out[w],
                    log.bits[w],
                    if missing {
                        "written but not logged"
                    } else {
                        "logged but never written"
                    },
                    log.mode
                ));
            }
        }
        Ok(())
    }

    /// One leaf: host frame, level, write permission, and the log.
    fn audit_leaf(&self, g: u64, level: Level, v: u64) -> Result<(), String> {
        let n = frames_of(level);
        let i = self.slot_of(g).ok_or("in no slot of the model")?;
        let s = &self.slots[i];
        if g + n > s.end() || g % n != 0 {
            return Err(format!(
                "not inside slot {} [{:#x}, {:#x})",
                s.id,
                s.base,
                s.end()
            ));
        }
        if level > self.mmu.max_leaf() {
            return Err("above the largest leaf".into());
        }
        let hp = Host::page(s.id, g).ok_or("no host page")?;
        if hp.level < level {
            return Err(format!("host maps at level {}", hp.level.get()));
        }
        if F::leaf_addr(v, level).get() != hp.pfn.get() << PAGE_SHIFT || hp.pfn.get() % n != 0 {
            return Err(format!(
                "maps {:#x}, host frame {:#x}",
                F::leaf_addr(v, level).get(),
                hp.pfn.get()
            ));
        }
        let may_write = hp.writable && !s.readonly;
        if v & (F::WRITABLE | F::MMU_WRITABLE) != 0 && !may_write {
            return Err("writable where the host or the slot forbids it".into());
        }
        if v & F::WRITABLE != 0 {
            if let Some(log) = s.log.as_ref() {
                let gran = log.mode.granularity;
                let mut u = g;
                while u < g + n {
                    if !s.is_set(s.unit(u, gran)) {
                        return Err(format!(
                            "writable in a logging slot, but the model has no write to {u:#x} since the log was cleared"
                        ));
                    }
                    u += frames_of(gran);
                }
            }
        }
        Ok(())
    }
}

/// A random op, for the randomized tests: biased to faults and writes on live slots.
pub fn random_op(rng: &mut Rng) -> MmuOp {
    let slot = rng.below(u64::from(SLOT_IDS) + 1) as u8;
    let at = rng.next_u64() as u16;
    match rng.below(44) {
        // A 1 GiB-aligned slot of more than 1 GiB where the host maps 1 GiB pages.
        0 => MmuOp::AddSlot {
            slot: 0,
            base: rng.below(4) as u8 * 2,
            len: 6,
            flags: u8::from(rng.below(4) == 0),
        },
        1..=3 => MmuOp::AddSlot {
            slot,
            base: rng.next_u64() as u8,
            // 1 GiB slots (length 6) are slow to check: one add in 16 makes them.
            len: match rng.next_u64() as u8 {
                l if l & 7 == 6 && rng.below(2) == 0 => l ^ 1,
                l => l,
            },
            // Read-only one time in eight, logging from the start one time in four.
            flags: u8::from(rng.below(4) == 0) | (u8::from(rng.below(8) == 0) << 1),
        },
        4 => MmuOp::DeleteSlot { slot },
        5 => MmuOp::MoveSlot {
            slot,
            base: rng.next_u64() as u8,
        },
        6..=15 => MmuOp::Fault {
            slot,
            at,
            write: rng.below(2) == 0,
        },
        16..=23 => MmuOp::GuestWrite { slot, at },
        24..=26 => MmuOp::EnableLog {
            slot,
            mode: rng.below(32) as u8 & !(rng.below(2) as u8 * 0x18),
        },
        27 => MmuOp::DisableLog {
            slot,
            how: rng.below(4) as u8,
        },
        28 => MmuOp::GetLog {
            slot,
            short: rng.below(8) == 0,
        },
        29 | 30 => MmuOp::GetAndClear {
            slot,
            short: rng.below(8) == 0,
        },
        31..=33 => MmuOp::ClearLog {
            slot,
            first: rng.next_u64() as u16 & if rng.below(8) == 0 { 0xffff } else { 0x7fff },
            words: rng.below(16) as u8,
            mask: rng.next_u64() & rng.next_u64(),
        },
        34 | 35 => MmuOp::Zap {
            slot,
            at,
            len: rng.below(4) as u8,
        },
        36 => MmuOp::SetLimit {
            limit: rng.below(7) as u8,
        },
        37 => MmuOp::Release,
        38..=40 => MmuOp::FaultIn {
            space: rng.below(3) as u8,
            slot,
            at,
            write: rng.below(2) == 0,
        },
        41 | 42 => MmuOp::Split {
            slot,
            at,
            len: rng.below(256) as u8,
            how: rng.below(16) as u8,
        },
        _ => MmuOp::GuestWrite { slot, at },
    }
}

/// Runs `ops` random ops from `seed` on a fresh harness of format `F` (for the tests).
pub fn random_run<F: PteFormat>(
    seed: u64,
    ops: usize,
    frames: &[TableFrame],
) -> Result<Outcomes, String> {
    let mut s = slots();
    let setup = MmuSetup::from_seed(seed);
    let mut h = MmuHarness::<F>::new(setup, frames, &mut s)?;
    let mut rng = Rng::new(seed);
    for i in 0..ops {
        let op = random_op(&mut rng);
        h.apply(op)
            .map_err(|e| format!("{} seed {seed} {setup:?} op {i} {op:?}: {e}", F::NAME))?;
    }
    Ok(h.outcomes)
}

/// Guest frame n is host frame `LINEAR_HOST_PFN + n` for [`LinearHost`] (64 GiB: aligned
/// for every page size).
pub const LINEAR_HOST_PFN: u64 = 0x100_0000;

/// Physical address of the first frame of a [`TablePool`].
pub const POOL_TABLES_AT: u64 = 0x40_0000_0000;

/// The benches' host mapping: gfn n at host frame [`LINEAR_HOST_PFN`] + n, mapped by the
/// host with pages of one level, every page writable.
#[derive(Clone, Copy, Debug)]
pub struct LinearHost(pub Level);

impl HostMemory for LinearHost {
    fn host_page(&self, _slot: SlotId, gfn: Gfn) -> Option<HostPage> {
        Some(HostPage {
            pfn: Pfn::new(LINEAR_HOST_PFN + gfn.get()).ok()?,
            level: self.0,
            writable: true,
        })
    }
}

/// Table frames and their slots for a benched MMU of `gib` GiB at 4 KiB: one level-1 table
/// per 2 MiB, the upper levels, and 128 spare (the splitter's cache of 40, the free-page
/// reserve).
pub struct TablePool {
    frames: Vec<TableFrame>,
    slots: Vec<TableSlot>,
}

impl TablePool {
    /// Frames for `gib` GiB.
    pub fn new(gib: u64) -> Self {
        let n = (gib * 512 + gib + 128) as usize;
        Self {
            frames: (0..n).map(|_| TableFrame::new()).collect(),
            slots: (0..n).map(|_| TableSlot::default()).collect(),
        }
    }

    /// An empty `Mmu<Ept>` over the pool (the arena resets the frames as it hands them
    /// out) with slot 0 of `pages` frames from gfn 0.
    pub fn mmu(&mut self, pages: u64, config: MmuConfig) -> Result<Mmu<'_, Ept>, String> {
        let at = Hpa::new(POOL_TABLES_AT).map_err(|e| format!("{e}"))?;
        let arena =
            TableArena::new(&self.frames, &mut self.slots, at).map_err(|e| format!("{e}"))?;
        let mmu = Mmu::<Ept>::new(arena, config).map_err(|e| format!("{e}"))?;
        let base = Gfn::new(0).map_err(|e| format!("{e}"))?;
        mmu.add_slot(SlotId(0), base, pages, SlotFlags::empty())
            .map_err(|e| format!("{e}"))?;
        Ok(mmu)
    }
}
