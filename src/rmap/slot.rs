//! The rmap arrays of one memslot, one per level (KVM `slot->arch.rmap[level]`).

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::fmt;

use arrayvec::ArrayVec;

use super::{CapacityError, RmapHead};
use crate::addr::{FRAME_LIMIT, Gfn, Level, PAGE_SHIFT};

/// The rmap heads of one memslot, per level (KVM `kvm_arch_memory_slot.rmap`, allocated by
/// `memslot_rmap_alloc`, indexed by `__gfn_to_rmap`): at level `l` the head of the
/// `2^(9*(l-1))`-frame block holding `gfn` is
/// `rmap[l][(gfn >> 9*(l-1)) - (base >> 9*(l-1))]` (KVM `gfn_to_index`), so a slot whose
/// edges are not aligned to a huge page still has a head for the partial huge pages at its
/// edges (the MMU never maps them huge, but the index stays a subtraction). 8 bytes per
/// 4 KiB frame at level 1, 1/512 of that at level 2, and so on.
///
/// Each level also keeps a [`generation`](Self::generation): the number of times its heads
/// were lent out to be changed ([`head_mut`](Self::head_mut), [`heads_mut`](Self::heads_mut)),
/// and the generation at which every head of the level was last known empty (a new slot; a
/// zap that drained them all). While the two agree, nothing can have been added since, so
/// [`known_empty`](Self::known_empty) says every head is empty without reading one: the
/// eager splitter then fills a fresh child's 512 heads without checking them first.
pub struct SlotRmaps {
    base: Gfn,
    npages: u64,
    /// `levels[l - 1]` holds the heads of level `l`.
    levels: ArrayVec<Box<[RmapHead]>, 5>,
    /// `generations[l - 1]`: times the heads of level `l` were lent out mutably.
    generations: [u64; 5],
    /// `empty_at[l - 1]`: the generation at which every head of level `l` was empty.
    empty_at: [Option<u64>; 5],
}

/// The shift from a frame number to the number of its level-`level` block.
#[inline]
fn shift(level: Level) -> u32 {
    level.shift() - PAGE_SHIFT
}

impl SlotRmaps {
    /// Empty rmaps for the `npages` frames from `base`, at levels 1 to `max_level`
    /// (usually [`Level::L3`]: 4 KiB, 2 MiB and 1 GiB mappings), allocated fallibly.
    /// [`CapacityError::TooLarge`] when the slot runs past the last frame number or an
    /// array is longer than `usize`; [`CapacityError::OutOfMemory`] when the allocator
    /// refuses. A slot of 0 pages has empty arrays.
    pub fn new(base: Gfn, npages: u64, max_level: Level) -> Result<Self, CapacityError> {
        let end = base
            .get()
            .checked_add(npages)
            .ok_or(CapacityError::TooLarge)?;
        if end > FRAME_LIMIT {
            return Err(CapacityError::TooLarge);
        }
        let mut levels = ArrayVec::new();
        for l in 1..=max_level.get() {
            let level = Level::new(l).map_err(|_| CapacityError::TooLarge)?;
            let s = shift(level);
            let len = if npages == 0 {
                0
            } else {
                ((end - 1) >> s) - (base.get() >> s) + 1
            };
            let len = usize::try_from(len).map_err(|_| CapacityError::TooLarge)?;
            let mut heads = Vec::new();
            heads
                .try_reserve_exact(len)
                .map_err(|_| CapacityError::OutOfMemory)?;
            heads.resize(len, RmapHead::EMPTY);
            levels
                .try_push(heads.into_boxed_slice())
                .map_err(|_| CapacityError::TooLarge)?;
        }
        Ok(Self {
            base,
            npages,
            levels,
            generations: [0; 5],
            empty_at: [Some(0); 5],
        })
    }

    /// How many times the heads at `level` have been lent out to be changed (by
    /// [`head_mut`](Self::head_mut) or [`heads_mut`](Self::heads_mut)); 0 for a level
    /// without an array. A caller that sees the same generation twice knows nobody changed
    /// a head of that level in between.
    #[inline]
    pub fn generation(&self, level: Level) -> u64 {
        self.generations
            .get(usize::from(level.get()) - 1)
            .copied()
            .unwrap_or(0)
    }

    /// Whether every head at `level` is known to be empty without reading them: no head
    /// was lent out to be changed since the slot was made or since a zap emptied them all
    /// (the MMU's zap of a whole slot). `false` says nothing: the heads may still all
    /// be empty.
    #[inline]
    pub fn known_empty(&self, level: Level) -> bool {
        let l = usize::from(level.get()) - 1;
        matches!(
            (self.empty_at.get(l), self.generations.get(l)),
            (Some(Some(at)), Some(now)) if at == now
        )
    }

    /// Records that every head at `level` is empty now, for the caller that just emptied
    /// them all (a zap of the whole slot that drained each head). Checked: a head that is
    /// not empty leaves the record as it was, so a mistaken caller costs a scan, never a
    /// lost entry.
    pub(crate) fn note_empty(&mut self, level: Level) {
        let l = usize::from(level.get()) - 1;
        // Sixty-four heads per step, OR-ed together: a scan at memory speed.
        let empty = self
            .heads(level)
            .chunks(64)
            .all(|c| c.iter().fold(0, |acc, h| acc | h.0) == 0);
        if let (true, Some(at), Some(&now)) =
            (empty, self.empty_at.get_mut(l), self.generations.get(l))
        {
            *at = Some(now);
        }
    }

    /// The slot's first frame.
    #[inline]
    pub fn base(&self) -> Gfn {
        self.base
    }

    /// Frames in the slot.
    #[inline]
    pub fn npages(&self) -> u64 {
        self.npages
    }

    /// The highest level with an array.
    pub fn max_level(&self) -> Option<Level> {
        u8::try_from(self.levels.len())
            .ok()
            .and_then(|l| Level::new(l).ok())
    }

    /// The index of `gfn`'s head at `level`, if `gfn` is in the slot and the level has an
    /// array (KVM `gfn_to_index`).
    #[inline]
    pub fn index(&self, gfn: Gfn, level: Level) -> Option<usize> {
        let g = gfn.get();
        let base = self.base.get();
        if g < base || g - base >= self.npages {
            return None;
        }
        let s = shift(level);
        let i = usize::try_from((g >> s) - (base >> s)).ok()?;
        (i < self.level_len(level)).then_some(i)
    }

    /// The first of `from`, `from + n`, `from + 2n`, ... below `to` (`n` the page size of
    /// `level` in frames; the splitter passes multiples of it) whose head at `level` is not
    /// empty, or `None`. A gfn below or past the slot has no head and is passed over, as
    /// [`head`] finds none for it. A scan of the level's array: the rmap knows at once where
    /// nothing is left (the eager splitter's second pass over a split slot).
    ///
    /// [`head`]: Self::head
    pub fn next_nonempty(&self, from: u64, to: u64, level: Level) -> Option<u64> {
        let s = shift(level);
        let base = self.base.get();
        // The first candidate at or above the base.
        let start = match base.checked_sub(from) {
            Some(below) if below > 0 => from.checked_add(below.div_ceil(1 << s) << s)?,
            _ => from,
        };
        // A gfn past the slot has no head either, even inside the last head's block.
        let to = to.min(base.saturating_add(self.npages));
        if start >= to {
            return None;
        }
        // Candidate j is `start + j * n`, whose head is `first + j`; the last is below `to`.
        let first = usize::try_from((start >> s) - (base >> s)).ok()?;
        let steps = usize::try_from((to - 1 - start) >> s).ok()?;
        let heads = self.heads(level);
        let last = first.saturating_add(steps).min(heads.len().checked_sub(1)?);
        let k = heads
            .get(first..=last)?
            .iter()
            .position(|h| !h.is_empty())?;
        Some(start + ((k as u64) << s))
    }

    /// The head of `gfn` at `level` (KVM `__gfn_to_rmap`), or `None` when `gfn` is outside
    /// the slot or the level has no array.
    #[inline]
    pub fn head(&self, gfn: Gfn, level: Level) -> Option<&RmapHead> {
        let i = self.index(gfn, level)?;
        self.heads(level).get(i)
    }

    /// The head of `gfn` at `level`, to change it.
    #[inline]
    pub fn head_mut(&mut self, gfn: Gfn, level: Level) -> Option<&mut RmapHead> {
        let i = self.index(gfn, level)?;
        self.heads_mut(level).get_mut(i)
    }

    /// Heads at `level` (0 for a level without an array).
    #[inline]
    pub fn level_len(&self, level: Level) -> usize {
        self.heads(level).len()
    }

    /// The heads at `level`, in frame order: head `i` covers the block of
    /// [`gfn_at(level, i)`](Self::gfn_at). Empty for a level without an array.
    #[inline]
    pub fn heads(&self, level: Level) -> &[RmapHead] {
        self.levels
            .get(usize::from(level.get()) - 1)
            .map_or(&[], |h| &h[..])
    }

    /// The heads at `level`, to change them.
    #[inline]
    pub fn heads_mut(&mut self, level: Level) -> &mut [RmapHead] {
        let l = usize::from(level.get()) - 1;
        match (self.levels.get_mut(l), self.generations.get_mut(l)) {
            (Some(h), Some(g)) => {
                // Lent out to be changed: the level's generation moves on.
                *g = g.wrapping_add(1);
                &mut h[..]
            }
            _ => &mut [],
        }
    }

    /// The first frame of the level-`level` block head `i` covers:
    /// `((base >> 9*(level-1)) + i) << 9*(level-1)`. At an unaligned slot edge this frame
    /// can lie below the slot's base. `None` when `i` is past the level's heads.
    pub fn gfn_at(&self, level: Level, i: usize) -> Option<Gfn> {
        if i >= self.level_len(level) {
            return None;
        }
        let s = shift(level);
        let block = (self.base.get() >> s).checked_add(u64::try_from(i).ok()?)?;
        Gfn::new(block << s).ok()
    }
}

impl fmt::Debug for SlotRmaps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlotRmaps")
            .field("base", &self.base)
            .field("npages", &self.npages)
            .field("levels", &self.levels.len())
            .finish()
    }
}
