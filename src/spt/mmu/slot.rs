//! Memory slots: a range of guest frames with its reverse maps, huge-page-disallow counts
//! and dirty log (Linux `struct kvm_memory_slot`, `kvm_lpage_info`, `dirty_bitmap`).

extern crate alloc;

use alloc::sync::Arc;
use alloc::vec::Vec;

use crate::addr::{Gfn, Level};
use crate::rmap::SlotRmaps;
use crate::sync::{AtomicU64, Ordering};

/// A memory slot's number, chosen by the embedder (KVM's `slot` field of
/// `kvm_userspace_memory_region`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotId(pub u16);

bitflags::bitflags! {
    /// A memory slot's flags (KVM `KVM_MEM_*`).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct SlotFlags: u32 {
        /// Dirty logging is on (KVM `KVM_MEM_LOG_DIRTY_PAGES`); set and cleared through
        /// [`Mmu::update_slot_flags`](super::Mmu::update_slot_flags) or the dirty-log calls.
        const LOG_DIRTY_PAGES = 1 << 0;
        /// The guest may not write (KVM `KVM_MEM_READONLY`); fixed at creation.
        const READONLY = 1 << 1;
    }
}

/// How dirty logging runs on a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LogMode {
    /// Every bit starts set and nothing is write-protected when logging starts; pages are
    /// write-protected when the embedder clears their bits (KVM
    /// `KVM_DIRTY_LOG_INITIALLY_SET` with manual protection).
    pub initially_set: bool,
    /// The logging unit: [`Level::L1`] (4 KiB, KVM's) or [`Level::L2`] (2 MiB: fewer
    /// faults and a 512× smaller bitmap, at the price of sending whole 2 MiB pages).
    pub granularity: Level,
}

impl LogMode {
    /// 4 KiB logging, write-protecting everything when it starts.
    pub const PAGES: Self = Self {
        initially_set: false,
        granularity: Level::L1,
    };
}

impl Default for LogMode {
    fn default() -> Self {
        Self::PAGES
    }
}

/// A slot's dirty log: one bit per logging unit, set atomically (the fast path sets bits
/// holding only its shard of the MMU lock). Shared by the slot and the fast path's views
/// ([`FastView`]).
pub(crate) struct DirtyLog {
    pub(crate) bits: Vec<AtomicU64>,
    pub(crate) mode: LogMode,
}

impl DirtyLog {
    pub(crate) fn new(base: Gfn, npages: u64, mode: LogMode) -> Option<Self> {
        let units = units(base.get(), npages, mode.granularity);
        let words = usize::try_from(units.div_ceil(64)).ok()?;
        let mut bits = Vec::new();
        bits.try_reserve_exact(words).ok()?;
        let fill = if mode.initially_set { u64::MAX } else { 0 };
        for w in 0..words {
            // The bits past the last unit stay clear.
            let valid = units - w as u64 * 64;
            let mask = if valid >= 64 {
                u64::MAX
            } else {
                (1u64 << valid) - 1
            };
            bits.push(AtomicU64::new(fill & mask));
        }
        Some(Self { bits, mode })
    }

    /// Sets the bit of the unit holding `gfn` (slot-relative unit `unit`).
    pub(crate) fn mark(&self, unit: u64) {
        if let Some(word) = self.bits.get((unit / 64) as usize) {
            word.fetch_or(1 << (unit % 64), Ordering::Relaxed);
        }
    }

    /// The log of a slot of `npages` frames moved from `old_base` to `new_base`, keeping
    /// every bit: KVM's `kvm_prepare_memory_region` reuses the old bitmap on
    /// `KVM_MR_MOVE`, so a write logged before the move is still reported after it. With
    /// 4 KiB units, or a move by a whole number of units, the bits are the same; otherwise
    /// a unit of the new layout is set when any of its pages was in a set unit of the old
    /// one (a superset: no write is lost). `initially_set` does not set anything again.
    pub(crate) fn moved(&self, old_base: u64, new_base: u64, npages: u64) -> Option<Self> {
        let g = self.mode.granularity;
        let empty = LogMode {
            initially_set: false,
            ..self.mode
        };
        let mut out = Self::new(crate::addr::Gfn::new(new_base).ok()?, npages, empty)?;
        out.mode = self.mode;
        let shift = g.shift() - crate::addr::PAGE_SHIFT;
        let n = 1u64 << shift;
        if (old_base ^ new_base) & (n - 1) == 0 {
            for (to, from) in out.bits.iter_mut().zip(&self.bits) {
                to.store(from.load(Ordering::Relaxed), Ordering::Relaxed);
            }
            return Some(out);
        }
        let old_end = old_base + npages;
        for (w, word) in self.bits.iter().enumerate() {
            let mut bits = word.load(Ordering::Relaxed);
            while bits != 0 {
                let u = w as u64 * 64 + u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                // The slot's pages in old unit `u`, as offsets into the slot.
                let start = (((old_base >> shift) + u) << shift).max(old_base);
                let end = ((((old_base >> shift) + u) << shift) + n).min(old_end);
                if start >= end {
                    continue;
                }
                let first = ((new_base + start - old_base) >> shift) - (new_base >> shift);
                let last = ((new_base + end - 1 - old_base) >> shift) - (new_base >> shift);
                for v in first..=last {
                    out.mark(v);
                }
            }
        }
        Some(out)
    }

    pub(crate) fn is_set(&self, unit: u64) -> bool {
        self.bits
            .get((unit / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Relaxed) & (1 << (unit % 64)) != 0)
    }
}

/// Units of `level`'s page size a slot of `npages` frames at `base` touches.
pub(crate) fn units(base: u64, npages: u64, level: Level) -> u64 {
    let shift = level.shift() - crate::addr::PAGE_SHIFT;
    ((base + npages - 1) >> shift) - (base >> shift) + 1
}

/// A memory slot.
pub(crate) struct MemSlot {
    pub(crate) id: SlotId,
    pub(crate) base: u64,
    pub(crate) npages: u64,
    pub(crate) flags: SlotFlags,
    pub(crate) rmaps: SlotRmaps,
    /// Per huge level (index 0 = 2 MiB, 1 = 1 GiB): how many reasons forbid a huge page
    /// at each huge frame the slot touches (KVM `lpage_info[level].disallow_lpage`).
    pub(crate) disallow: [Vec<u32>; 2],
    pub(crate) log: Option<Arc<DirtyLog>>,
    /// Which slot this is among all the MMU has made (`State::slot_epochs`).
    pub(crate) epoch: u64,
}

impl MemSlot {
    /// A slot with empty rmaps; `None` when an allocation fails.
    pub(crate) fn new(
        id: SlotId,
        base: Gfn,
        npages: u64,
        flags: SlotFlags,
        max_level: Level,
    ) -> Option<Self> {
        let rmaps = SlotRmaps::new(base, npages, max_level).ok()?;
        let mut disallow = [Vec::new(), Vec::new()];
        for (i, level) in [Level::L2, Level::L3].into_iter().enumerate() {
            let n = usize::try_from(units(base.get(), npages, level)).ok()?;
            let counts = &mut disallow[i];
            counts.try_reserve_exact(n).ok()?;
            counts.resize(n, 0);
            // KVM `kvm_alloc_memslot_metadata`: a huge page that would reach past either
            // edge of the slot is never allowed.
            let pages = level.page_size() >> crate::addr::PAGE_SHIFT;
            if base.get() % pages != 0 {
                counts[0] += 1;
            }
            if (base.get() + npages) % pages != 0 {
                counts[n - 1] += 1;
            }
        }
        Some(Self {
            id,
            base: base.get(),
            npages,
            flags: flags & !SlotFlags::LOG_DIRTY_PAGES,
            rmaps,
            disallow,
            log: None,
            epoch: 0,
        })
    }

    /// The highest level the slot keeps rmaps for.
    pub(crate) fn max_level(&self) -> Level {
        self.rmaps.max_level().unwrap_or(Level::L1)
    }

    pub(crate) fn end(&self) -> u64 {
        self.base + self.npages
    }

    pub(crate) fn contains(&self, gfn: u64) -> bool {
        gfn >= self.base && gfn < self.end()
    }

    /// The slot-relative index of the `level` unit holding `gfn`.
    pub(crate) fn unit(&self, gfn: u64, level: Level) -> u64 {
        let shift = level.shift() - crate::addr::PAGE_SHIFT;
        (gfn >> shift) - (self.base >> shift)
    }

    /// Whether a huge page of `level` may map `gfn`'s huge frame.
    pub(crate) fn huge_allowed(&self, gfn: u64, level: Level) -> bool {
        let i = match level.get() {
            2 => 0,
            3 => 1,
            _ => return level == Level::L1,
        };
        let unit = self.unit(gfn, level) as usize;
        self.disallow[i].get(unit).is_some_and(|&c| c == 0)
    }
}

/// What the fault fast path needs of the slots, one copy in each shard of the MMU lock
/// ([`ShardedRwLock`](crate::sync::ShardedRwLock)): where each slot is and its dirty log.
/// Rebuilt under the write lock, with every shard held, whenever a slot or its log comes
/// or goes ([`publish`]); [`Mmu::check`](super::Mmu::check) compares it with the slots.
#[derive(Default)]
pub(crate) struct FastView {
    /// Sorted by base, like the slots.
    pub(crate) slots: Vec<FastSlot>,
}

/// One slot in a [`FastView`].
#[derive(Clone)]
pub(crate) struct FastSlot {
    pub(crate) base: u64,
    pub(crate) end: u64,
    /// The slot's own log (the same allocation), when logging is on.
    pub(crate) log: Option<Arc<DirtyLog>>,
}

impl FastView {
    /// The slot holding `gfn`.
    #[inline]
    pub(crate) fn find(&self, gfn: u64) -> Option<&FastSlot> {
        let i = self.slots.partition_point(|s| s.end <= gfn);
        self.slots.get(i).filter(|s| s.base <= gfn)
    }

    /// Makes room for `n` slots, so [`publish`] cannot fail after the slots changed.
    pub(crate) fn reserve(&mut self, n: usize) -> Result<(), ()> {
        self.slots
            .try_reserve(n.saturating_sub(self.slots.len()))
            .map_err(|_| ())
    }

    /// Whether the view says what `slots` say.
    pub(crate) fn matches(&self, slots: &[MemSlot]) -> bool {
        self.slots.len() == slots.len()
            && self.slots.iter().zip(slots).all(|(v, s)| {
                v.base == s.base
                    && v.end == s.end()
                    && match (&v.log, &s.log) {
                        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                        (None, None) => true,
                        _ => false,
                    }
            })
    }
}

impl FastSlot {
    /// The logging unit of `gfn`, when logging is on (as [`MemSlot::unit`] counts).
    #[inline]
    pub(crate) fn log_unit(&self, gfn: u64) -> Option<(&DirtyLog, u64)> {
        let log = self.log.as_deref()?;
        let shift = log.mode.granularity.shift() - crate::addr::PAGE_SHIFT;
        Some((log, (gfn >> shift) - (self.base >> shift)))
    }
}

/// Rebuilds every view from `slots`. Never allocates when every view was
/// [reserved](FastView::reserve) for `slots.len()`; if one was not, that view keeps what
/// it had beyond what fits (still sorted: a prefix of `slots`). Callers reserve first.
pub(crate) fn publish<'v>(slots: &[MemSlot], views: impl Iterator<Item = &'v mut FastView>) {
    for view in views {
        view.slots.clear();
        let room = view.slots.capacity();
        view.slots.extend(slots.iter().take(room).map(|s| FastSlot {
            base: s.base,
            end: s.end(),
            log: s.log.clone(),
        }));
    }
}
