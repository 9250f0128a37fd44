//! Eager huge-page splitting driven by the reverse maps (Linux
//! `shadow_mmu_try_split_huge_pages`, `shadow_mmu_split_huge_page`,
//! `shadow_mmu_get_sp_for_split`; Matlack, "[00/23] Extend Eager Page Splitting to the
//! shadow MMU", 2022-02-03).
//!
//! Splitting moves off the vCPU fault path into the thread that enables dirty logging (or
//! clears the log): one rmap walk per huge level, top-down (1 GiB, then 2 MiB), over the
//! slot's range. Each huge entry the rmap names is split in place by
//! [`split_entry_run`](crate::spt::split_entry_run) into a child that is either found by
//! `(gfn, child role)` (another alias split it already, or an older page survived: reused,
//! flushing only if it holds tables) or taken fresh from the splitter's caches; every new
//! leaf goes into the level-below rmap from the split's callback, with no second walk; the
//! callback gets all 512 leaves at once and, when their heads are all empty (a fresh
//! child), fills them in one vectorised loop. The huge entry leaves its rmap, the child
//! gains it as a parent. A second pass over a split slot finds the huge levels' rmaps
//! empty, found by a scan of their head arrays.
//!
//! Before each huge page the caches must hold 513 descriptors (512 rmap heads may each
//! need one, and the parent list one) and one table; if not, or if someone waits for the
//! MMU lock, the splitter drops the lock, tops up, retakes it and restarts at the current
//! rmap head. Splitting is refused with [`SplitError::TooFewPages`] when the MMU has no
//! more than [`MIN_FREE_PAGES`] free shadow pages (KVM
//! refuses the same way rather than zapping to make room).

use core::fmt;

use crate::addr::{Gfn, Level, PAGE_SHIFT};
use crate::rmap::RmapHead;
use crate::spt::mmu::{
    ForeignCaches, MIN_FREE_PAGES, Mmu, MmuCaches, SlotId, State, StateGuard, TopUpFailed,
};
use crate::spt::{
    EntryRef, PteFormat, SplitChild, SplitLeaves, TableAlloc, TlbFlush, WalkFlags,
    split_entry_run_with,
};

mod walk;

/// Descriptors the splitter holds before each huge page (KVM's split cache minimum).
pub const SPLIT_DESCS: usize = 513;

/// Tables the splitter's cache holds: one is needed per huge page, a top-up fetches this
/// many so the lock is not dropped for every page (KVM's default cache capacity).
pub const SPLIT_TABLES: usize = 40;

/// The splitter's MMU memory caches (KVM `split_desc_cache`, `split_page_header_cache`,
/// `split_shadow_page_cache`; the header comes with the table here).
pub type SplitCaches = MmuCaches<SPLIT_TABLES, SPLIT_DESCS>;

impl From<ForeignCaches> for SplitError {
    fn from(_: ForeignCaches) -> Self {
        Self::ForeignCaches
    }
}

/// What a split did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SplitStats {
    /// Huge entries split.
    pub split: u64,
    /// Huge entries split that were a second (or later) mapping of the same huge frame.
    pub aliases: u64,
    /// Splits that reused an existing child page.
    pub reused: u64,
    /// Times the rmap iterator restarted after the lock was retaken.
    pub restarts: u64,
    /// Times the lock was dropped (to top up, or because someone waited).
    pub lock_drops: u64,
}

/// Why a split stopped; what was split before stays split (every split is complete and
/// consistent on its own).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SplitError {
    /// No slot with this id (or it went away while the lock was dropped).
    NotFound,
    /// The range is empty or outside the slot, or the target level is not below the
    /// largest leaf.
    BadRange,
    /// No more than `MIN_FREE_PAGES` shadow pages are free.
    TooFewPages,
    /// The table arena ran dry while topping up.
    OutOfTables,
    /// The descriptor pool ran dry while topping up.
    OutOfDescriptors,
    /// The caches hold another MMU's objects.
    ForeignCaches,
}

impl fmt::Display for SplitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NotFound => "no such memory slot",
            Self::BadRange => "split range or target level invalid",
            Self::TooFewPages => "too few free shadow pages to split",
            Self::OutOfTables => "no table left for a split",
            Self::OutOfDescriptors => "no rmap descriptor left for a split",
            Self::ForeignCaches => "split caches belong to another MMU",
        })
    }
}

impl core::error::Error for SplitError {}

impl<'a, F: PteFormat> Mmu<'a, F> {
    /// Splits every huge leaf mapping `[start, end)` of slot `slot` (the whole slot when
    /// `range` is `None`) down to `target` (KVM `kvm_mmu_try_split_huge_pages`), taking
    /// the MMU lock itself and dropping it between huge pages when `caches` run low or
    /// someone waits. Translations never change.
    pub fn eager_split<T: TlbFlush + ?Sized>(
        &self,
        caches: &mut SplitCaches,
        slot: SlotId,
        range: Option<(Gfn, Gfn)>,
        target: Level,
        tlb: &mut T,
    ) -> Result<SplitStats, SplitError> {
        // Refusals that depend only on the arguments come before the top-up: a refused call
        // must not fill the caller's caches (and bind them to this MMU).
        Self::check_split_args(&self.state.read(), slot, range, target, self.max_leaf())?;
        self.top_up_split(caches)?;
        let st = self.state.write();
        let mut stats = SplitStats::default();
        let (st, result) = self.split_locked(st, caches, slot, range, target, &mut stats, tlb);
        drop(st);
        result.map(|()| stats)
    }

    /// The slot's index and the gfn range `[lo, hi)` to split, or why the arguments are
    /// refused: no such slot, an empty range once clipped to the slot, a target level not
    /// below the largest leaf.
    fn check_split_args(
        st: &State,
        slot: SlotId,
        range: Option<(Gfn, Gfn)>,
        target: Level,
        max_leaf: Level,
    ) -> Result<(usize, u64, u64), SplitError> {
        let i = st.slot_by_id(slot).ok_or(SplitError::NotFound)?;
        let (base, end) = (st.slots[i].base, st.slots[i].end());
        let (lo, hi) = match range {
            Some((s, e)) => (s.get().max(base), e.get().min(end)),
            None => (base, end),
        };
        if lo >= hi || target >= max_leaf {
            return Err(SplitError::BadRange);
        }
        Ok((i, lo, hi))
    }

    /// Fills the splitter's caches with no MMU lock held.
    fn top_up_split(&self, caches: &mut SplitCaches) -> Result<(), SplitError> {
        caches.top_up(self, 1, SPLIT_DESCS).map_err(|e| match e {
            TopUpFailed::Tables => SplitError::OutOfTables,
            TopUpFailed::Descriptors => SplitError::OutOfDescriptors,
            TopUpFailed::Foreign => SplitError::ForeignCaches,
        })
    }

    /// The splitter with the write lock held on entry and on return (it may have been
    /// dropped and retaken in between: the guard goes in and comes back).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn split_locked<'s, T: TlbFlush + ?Sized>(
        &'s self,
        st: StateGuard<'s>,
        caches: &mut SplitCaches,
        slot: SlotId,
        range: Option<(Gfn, Gfn)>,
        target: Level,
        stats: &mut SplitStats,
        tlb: &mut T,
    ) -> (StateGuard<'s>, Result<(), SplitError>) {
        let (i, lo, hi) = match Self::check_split_args(&st, slot, range, target, self.max_leaf()) {
            Ok(found) => found,
            Err(e) => return (st, Err(e)),
        };
        // Decided once for the request: what it writes in all, against the cache.
        let stream = self.streams_split(hi - lo);
        let out = self.split_passes(st, caches, slot, (i, lo, hi), target, stream, stats, tlb);
        if stream {
            // Heads streamed since the last fence become ordinary memory again before the
            // caller reads them or lets the lock go, whatever the way out.
            crate::spt::stream_fence();
        }
        out
    }

    /// [`split_locked`](Self::split_locked) after its checks: one pass per huge level over
    /// `[lo, hi)` of slot `i`, streaming when `stream`.
    #[allow(clippy::too_many_arguments)]
    fn split_passes<'s, T: TlbFlush + ?Sized>(
        &'s self,
        mut st: StateGuard<'s>,
        caches: &mut SplitCaches,
        slot: SlotId,
        (i, lo, hi): (usize, u64, u64),
        target: Level,
        stream: bool,
        stats: &mut SplitStats,
        tlb: &mut T,
    ) -> (StateGuard<'s>, Result<(), SplitError>) {
        let (base, end) = (st.slots[i].base, st.slots[i].end());
        let mut level = self.max_leaf();
        while level > target {
            let n = crate::spt::mmu::frames(level);
            let mut gfn = lo & !(n - 1);
            let mut ahead = level.lower().and_then(|below| {
                st.slot_by_id(slot)
                    .and_then(|i| EmptyAhead::start(&st.slots[i], below))
            });
            while gfn < hi {
                // Straight to the next head with something to split: an empty head would
                // only be looked up and left.
                let Some(i) = st.slot_by_id(slot) else {
                    return (st, Err(SplitError::NotFound));
                };
                if (st.slots[i].base, st.slots[i].end()) != (base, end) {
                    return (st, Err(SplitError::NotFound));
                }
                match st.slots[i].rmaps.next_nonempty(gfn, hi, level) {
                    Some(next) => gfn = next,
                    None => break,
                }
                let (back, done) = self.split_head(
                    st,
                    caches,
                    slot,
                    (base, end),
                    (gfn, level),
                    &mut ahead,
                    stream,
                    stats,
                    tlb,
                );
                st = back;
                if let Err(e) = done {
                    return (st, Err(e));
                }
                gfn += n;
            }
            if stream {
                // The next pass reads the heads this one streamed.
                crate::spt::stream_fence();
            }
            match level.lower() {
                Some(l) => level = l,
                None => break,
            }
        }
        (st, Ok(()))
    }

    /// Splits every huge entry in the rmap head of `gfn` at `level` of the slot `id`
    /// (which spans `bounds`), dropping the lock when needed.
    #[allow(clippy::too_many_arguments)]
    fn split_head<'s, T: TlbFlush + ?Sized>(
        &'s self,
        mut st: StateGuard<'s>,
        caches: &mut SplitCaches,
        id: SlotId,
        bounds: (u64, u64),
        (gfn, level): (u64, Level),
        ahead: &mut Option<EmptyAhead>,
        stream: bool,
        stats: &mut SplitStats,
        tlb: &mut T,
    ) -> (StateGuard<'s>, Result<(), SplitError>) {
        let mut z = self.zapper();
        let mut first = true;
        // The slot's index, looked up again only after the lock was dropped.
        let mut found = None;
        loop {
            let i = match found {
                Some(i) => i,
                None => {
                    let Some(i) = st.slot_by_id(id) else {
                        z.finish(&mut st, tlb);
                        return (st, Err(SplitError::NotFound));
                    };
                    if (st.slots[i].base, st.slots[i].end()) != bounds {
                        // Moved or replaced while the lock was dropped.
                        z.finish(&mut st, tlb);
                        return (st, Err(SplitError::NotFound));
                    }
                    found = Some(i);
                    i
                }
            };
            let Some(e) = Gfn::new(gfn)
                .ok()
                .and_then(|g| st.slots[i].rmaps.head(g, level))
                .and_then(|head| head.first(&st.store))
            else {
                break;
            };
            if !caches.holds(1, SPLIT_DESCS) || caches.should_yield(self.is_contended()) {
                // KVM `need_topup_split_caches_or_resched`: flush what is owed, drop the
                // lock, top up outside it, retake it and look at the head again.
                z.finish(&mut st, tlb);
                if stream {
                    // Whoever takes the lock next may read the streamed heads.
                    crate::spt::stream_fence();
                }
                drop(st);
                stats.lock_drops += 1;
                let topped = self.top_up_split(caches);
                // KVM `cond_resched_rwlock_write`: give the waiter a chance to run before
                // retaking (a writer that waits competes with us for the lock; under loom,
                // without this the splitter won every time and the waiting vCPU starved).
                crate::sync::spin_wait();
                st = self.state.write();
                caches.retaken();
                found = None;
                if let Err(e) = topped {
                    return (st, Err(e));
                }
                stats.restarts += 1;
                continue;
            }
            match self.split_one(&mut st, &mut z, caches, i, e, (gfn, level), ahead, stream) {
                Ok(reused) => {
                    caches.progressed();
                    stats.split += 1;
                    stats.reused += u64::from(reused);
                    stats.aliases += u64::from(!first);
                    first = false;
                }
                Err(SplitError::BadRange) => break,
                Err(err) => {
                    z.finish(&mut st, tlb);
                    return (st, Err(err));
                }
            }
        }
        z.finish(&mut st, tlb);
        (st, Ok(()))
    }

    /// Splits the huge entry `e` (at `level`, mapping from `gfn`) of slot `i`. `Ok(true)`
    /// when an existing child was reused. `Err(BadRange)`: the entry cannot be split (the
    /// rmap named something that is not a huge leaf of a live page): the caller moves on.
    /// `ahead` is what the pass knows about the heads of the level below (see
    /// [`EmptyAhead`]); the split keeps it true.
    #[allow(clippy::too_many_arguments)]
    fn split_one(
        &self,
        st: &mut State,
        z: &mut crate::spt::mmu::Zapper<'_, 'a, F>,
        caches: &mut SplitCaches,
        i: usize,
        e: EntryRef,
        (gfn, level): (u64, Level),
        ahead: &mut Option<EmptyAhead>,
        stream: bool,
    ) -> Result<bool, SplitError> {
        let below = level.lower().ok_or(SplitError::BadRange)?;
        let pid = st.pages.live_id(e.table()).ok_or(SplitError::BadRange)?;
        let role = st
            .pages
            .get(pid)
            .and_then(|sp| sp.role.direct_child())
            .ok_or(SplitError::BadRange)?;
        let child_gfn = Gfn::new(gfn).map_err(|_| SplitError::BadRange)?;
        let (child, fresh) = match st.pages.lookup(child_gfn, role) {
            Some(c) => (SplitChild::Existing(st.pages.table_of(c)), None),
            None => {
                if st.limit.saturating_sub(st.pages.used()) <= MIN_FREE_PAGES {
                    return Err(SplitError::TooFewPages);
                }
                let table = caches
                    .tables
                    .alloc_table_to_fill(below)
                    .ok_or(SplitError::OutOfTables)?;
                let id = st.pages.id_of(table).ok_or(SplitError::ForeignCaches)?;
                if st.pages.get(id).is_none_or(|sp| sp.live) {
                    return Err(SplitError::ForeignCaches);
                }
                (SplitChild::Fresh(table), Some(id))
            }
        };
        let mem = self.tables();
        let addr = crate::spt::in_addr::<F>(gfn << PAGE_SHIFT);
        let Ok(mut ctx) = e.ctx::<F, _>(&mem, addr, level, WalkFlags::empty()) else {
            if let (Some(_), SplitChild::Fresh(t)) = (fresh, child) {
                let _ = caches.tables.free_table(t);
            }
            return Err(SplitError::BadRange);
        };
        let State {
            slots,
            store,
            pages,
            ..
        } = &mut *st;
        let valid = ahead.filter(|a| a.holds(&slots[i], below));
        // Every head of this child's frames is empty, known without reading them.
        let unread = valid.is_some_and(|a| a.last.is_none_or(|last| gfn > last));
        let rmaps = &mut slots[i].rmaps;
        let descs = &mut caches.descs;
        let mut lost = 0u64;
        // The children's heads are consecutive: index them from one slice of the level's
        // array instead of looking each one up by gfn (a range check and a shift per leaf).
        let first = rmaps.index(child_gfn, below);
        let heads = rmaps.heads_mut(below);
        let heads = first
            .and_then(|f| heads.get_mut(f..f.checked_add(crate::spt::ENTRIES)?))
            .unwrap_or(&mut []);
        let step = below.shift() - PAGE_SHIFT;
        // Only a fresh child's table is streamed: nothing can reach it before its parent
        // entry.
        let stream_table = stream && fresh.is_some();
        let done = split_entry_run_with(
            &mem,
            &mut ctx,
            child,
            stream_table,
            |run: &SplitLeaves<F>| {
                if stream && !unread {
                    // These heads may be ones this request streamed (another alias of the
                    // same frames): fenced before they are read.
                    crate::spt::stream_fence();
                }
                // A fresh child over frames with no mapping at this level yet (the common
                // case): every head takes its leaf at once, without a call per leaf.
                if run.all_written() && heads.len() == crate::spt::ENTRIES {
                    if unread {
                        if stream {
                            // Fenced by the next child's table fence, and before the pass
                            // reads a head again or lets the lock go (`split_locked`,
                            // `split_head`): a fence right here cost 0.5 ns per leaf.
                            RmapHead::stream_known_empty(heads, run.table());
                        } else {
                            RmapHead::fill_known_empty(heads, run.table());
                        }
                        return;
                    }
                    if RmapHead::fill_empty(heads, run.table()) {
                        return;
                    }
                }
                for (leaf, at, _) in run.iter() {
                    let g = crate::addr::Address::raw(at) >> PAGE_SHIFT;
                    // A leaf outside the slot's heads (cannot happen for a huge leaf the
                    // slot's rmap named) is counted as an inconsistency, like a failed add.
                    let k = g.wrapping_sub(gfn) >> step;
                    let added = usize::try_from(k)
                        .ok()
                        .and_then(|k| heads.get_mut(k))
                        .is_some_and(|head| head.add(leaf, store, descs).is_ok());
                    lost += u64::from(!added);
                }
            },
        );
        // Only this child's heads changed (or none, if the split was refused): what the
        // pass knew about the frames above it still holds.
        *ahead = valid.map(|a| a.after(&slots[i], below, gfn));
        let done = match done {
            Ok(done) => done,
            Err(_) => {
                if let (Some(_), SplitChild::Fresh(t)) = (fresh, child) {
                    let _ = caches.tables.free_table(t);
                }
                return Err(SplitError::BadRange);
            }
        };
        if let Some(id) = fresh {
            pages.insert(id, child_gfn, role, false);
            st.stats.pages_created += 1;
        }
        st.stats.inconsistencies += lost;
        // The huge entry leaves its rmap and becomes a parent of the child.
        let State {
            slots,
            store,
            spare,
            pages,
            ..
        } = &mut *st;
        let removed = slots[i]
            .rmaps
            .head_mut(child_gfn, level)
            .is_some_and(|head| {
                crate::spt::mmu::rmap_remove(head, e, store, spare, self.descriptors())
            });
        let cid = pages.id_of(done.child);
        let linked = cid
            .and_then(|c| pages.get_mut(c))
            .is_some_and(|sp| sp.parents.add(e, store, &mut caches.descs).is_ok());
        st.stats.inconsistencies += u64::from(!removed) + u64::from(!linked);
        if done.needs_flush {
            z.gather_leaf(gfn, level);
        }
        Ok(fresh.is_none())
    }
}

/// What a pass of the splitter knows about the heads one level below the level it splits:
/// every head of the frames above `last` (all of them while `last` is `None`) is empty.
/// True when the pass begins on a level whose heads are
/// [`known_empty`](crate::rmap::SlotRmaps::known_empty); kept true by the pass, which changes
/// heads only where it splits, in rising order; void as soon as the slot (`epoch`) or the
/// level's generation is not what the pass left (someone else changed a head while the
/// lock was dropped). It lets the splitter fill a fresh child's 512 heads without reading
/// them first: 2.6 instructions per head become one.
#[derive(Clone, Copy, Debug)]
struct EmptyAhead {
    epoch: u64,
    generation: u64,
    /// The first gfn of the last child the pass filled.
    last: Option<u64>,
}

impl EmptyAhead {
    /// The knowledge at the start of a pass over `slot` that fills heads at `below`.
    #[inline]
    fn start(slot: &crate::spt::mmu::MemSlot, below: Level) -> Option<Self> {
        slot.rmaps.known_empty(below).then(|| Self {
            epoch: slot.epoch,
            generation: slot.rmaps.generation(below),
            last: None,
        })
    }

    /// Whether nothing but the pass touched `slot`'s heads at `below` since it last looked.
    #[inline]
    fn holds(&self, slot: &crate::spt::mmu::MemSlot, below: Level) -> bool {
        self.epoch == slot.epoch && self.generation == slot.rmaps.generation(below)
    }

    /// The knowledge after the pass changed the heads of the child at `gfn`.
    #[inline]
    fn after(self, slot: &crate::spt::mmu::MemSlot, below: Level, gfn: u64) -> Self {
        Self {
            generation: slot.rmaps.generation(below),
            last: Some(self.last.map_or(gfn, |l| l.max(gfn))),
            ..self
        }
    }
}

#[cfg(test)]
mod tests;
