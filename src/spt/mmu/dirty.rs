//! Dirty logging (Linux `kvm_mmu_slot_remove_write_access`,
//! `kvm_arch_mmu_enable_log_dirty_pt_masked`, `kvm_mmu_zap_collapsible_sptes`, and the
//! in-place recovery of `kvm_mmu_recover_huge_pages`).

extern crate alloc;

use alloc::sync::Arc;
use alloc::vec::Vec;

use super::slot::{DirtyLog, LogMode, SlotFlags, SlotId};
use super::zap::{Recovered, Zapper};
use super::{GATHER, HostMemory, Mmu, SlotError, State, StateGuard, frames, publish_views};
use crate::addr::{Gfn, Level, PAGE_SHIFT};
use crate::rmap::{SplitCaches, SplitStats};
use crate::spt::flush::FlushGather;
use crate::spt::{
    Action, EntryRef, LockedArena, PageTable, PteFormat, TableLinks, Tables, TlbFlush, VisitCtx,
    VisitKind, WalkFlags,
};
use crate::sync::Ordering;

impl<F: PteFormat> Mmu<'_, F> {
    /// Starts dirty logging on a slot (KVM setting `KVM_MEM_LOG_DIRTY_PAGES`). Without
    /// [`LogMode::initially_set`] every entry of the slot, at every level, is
    /// write-protected through the rmaps before this returns (and the TLB flushed); with
    /// it, every bit starts set and nothing is write-protected until bits are cleared.
    pub fn enable_dirty_log<T: TlbFlush + ?Sized>(
        &self,
        id: SlotId,
        mode: LogMode,
        tlb: &mut T,
    ) -> Result<(), SlotError> {
        if mode.granularity != Level::L1 && mode.granularity != Level::L2 {
            return Err(SlotError::BadMode);
        }
        // Lock order: the splitter's caches, then the MMU lock.
        let mut split = self.config.eager_split.then(|| self.split_caches.lock());
        let mut st = self.state.write();
        let i = st.slot_by_id(id).ok_or(SlotError::NotFound)?;
        let slot = &mut st.slots[i];
        if slot.log.is_some() {
            return Err(SlotError::Logging);
        }
        let base = Gfn::new(slot.base).map_err(|_| SlotError::BadRange)?;
        let log = DirtyLog::new(base, slot.npages, mode).ok_or(SlotError::OutOfMemory)?;
        slot.log = Some(Arc::new(log));
        slot.flags |= SlotFlags::LOG_DIRTY_PAGES;
        // Before anything is write-protected: from here on a fast fix marks this log.
        publish_views(&mut st);
        let slot = &st.slots[i];
        let range = (slot.base, slot.end());
        let mut z = self.zapper();
        if !mode.initially_set {
            z.write_protect(&mut st, i, range, Level::L1, self.max_leaf);
        }
        z.finish(&mut st, tlb);
        // Eager splitting (KVM `kvm_mmu_slot_try_split_huge_pages`) after the write-protect:
        // the children inherit read-only leaves, so the splitter may drop the lock without
        // a write going unlogged. Under `initially_set` the clears split instead.
        if let Some(caches) = split.as_deref_mut() {
            if !mode.initially_set && mode.granularity < self.max_leaf {
                let mut s = SplitStats::default();
                let (mut st, r) =
                    self.split_locked(st, caches, id, None, mode.granularity, &mut s, tlb);
                note_split(&mut st, &s, r);
            }
        }
        Ok(())
    }

    /// Write-protects every leaf of a slot by walking the tables over the slot's range
    /// instead of through its rmaps: the way KVM's TDP MMU does it (`kvm_tdp_mmu_wrprot_slot`
    /// → `wrprot_gfn_range`, a walk of the range with an atomic update per leaf). The write
    /// bit is cleared and mmu-writable kept, as [`enable_dirty_log`](Self::enable_dirty_log)
    /// does, but nothing else changes (no dirty bitmap, logging stays as it was): this is
    /// the table-walk half of the comparison in `benches/mmu.rs`, and an embedder's way to
    /// write-protect a slot without logging it. Runs under the MMU lock held for write;
    /// each leaf is changed with a compare-exchange, like the rmap path, so a concurrent
    /// accessed/dirty update by the CPU is not lost. Returns how many leaves changed;
    /// the TLB is flushed before it returns.
    ///
    /// Refused ([`SlotError::BadRange`], nothing changed past the entries already visited)
    /// only if the walk finds a table entry that points outside the MMU's tables, which the
    /// MMU never builds.
    pub fn write_protect_by_walk<T: TlbFlush + ?Sized>(
        &self,
        id: SlotId,
        tlb: &mut T,
    ) -> Result<u64, SlotError> {
        let mut st = self.state.write();
        let i = st.slot_by_id(id).ok_or(SlotError::NotFound)?;
        let (lo, hi) = (
            st.slots[i].base << PAGE_SHIFT,
            st.slots[i].end() << PAGE_SHIFT,
        );
        let mut gather = FlushGather::<GATHER>::default();
        let mut changed = 0u64;
        let mut visitor =
            |_: VisitKind, ctx: &mut VisitCtx<'_, F>, _: &mut Tables<'_, &LockedArena<'_>>| {
                // Leaves reaching past the slot are not the slot's (the MMU never maps one:
                // a huge page is disallowed at an unaligned slot edge).
                if !ctx.covered() {
                    return Ok::<_, core::convert::Infallible>(Action::Continue);
                }
                // Shared mode: `set` is a compare-exchange; a lost race re-reads the entry.
                while F::is_leaf(ctx.old(), ctx.level()) && ctx.old() & F::WRITABLE != 0 {
                    if ctx.set(ctx.old() & !F::WRITABLE) {
                        changed += 1;
                        ctx.gather(&mut gather);
                        break;
                    }
                }
                Ok(Action::Continue)
            };
        let mut mem = &self.tables;
        let mut walked = Ok(());
        for root in &self.roots {
            walked = walked.and(PageTable::<F>::from_root(*root).walk_raw(
                &mut mem,
                lo,
                hi,
                WalkFlags::LEAF | WalkFlags::SHARED,
                &mut visitor,
            ));
        }
        st.stats.write_protected += changed;
        if !gather.is_empty() {
            gather.flush(tlb);
        }
        walked.map_err(|_| SlotError::BadRange)?;
        Ok(changed)
    }

    /// Copies the slot's dirty bitmap into `out` (one bit per logging unit from the slot's
    /// first; KVM `KVM_GET_DIRTY_LOG` with manual protection): nothing is cleared or
    /// write-protected. `out` must hold [`dirty_log_words`](Self::dirty_log_words) words.
    pub fn get_dirty_log(&self, id: SlotId, out: &mut [u64]) -> Result<(), SlotError> {
        let st = self.state.read();
        let i = st.slot_by_id(id).ok_or(SlotError::NotFound)?;
        let log = st.slots[i].log.as_ref().ok_or(SlotError::Logging)?;
        if out.len() < log.bits.len() {
            return Err(SlotError::BadBitmap);
        }
        for (o, w) in out.iter_mut().zip(&log.bits) {
            *o = w.load(Ordering::Relaxed);
        }
        Ok(())
    }

    /// Words of a slot's dirty bitmap (units / 64, rounded up).
    pub fn dirty_log_words(&self, id: SlotId) -> Result<usize, SlotError> {
        let st = self.state.read();
        let i = st.slot_by_id(id).ok_or(SlotError::NotFound)?;
        let log = st.slots[i].log.as_ref().ok_or(SlotError::Logging)?;
        Ok(log.bits.len())
    }

    /// Takes the slot's dirty bitmap into `out` and write-protects the pages it named, so
    /// their next writes are logged again (KVM `KVM_GET_DIRTY_LOG` without manual
    /// protection: `kvm_get_dirty_log_protect`). Under [`LogMode::initially_set`] with
    /// eager splitting, the huge pages holding the named pages are split to the logging
    /// unit first, as [`clear_dirty_log`](Self::clear_dirty_log) does.
    pub fn get_and_clear_dirty_log<T: TlbFlush + ?Sized>(
        &self,
        id: SlotId,
        out: &mut [u64],
        tlb: &mut T,
    ) -> Result<(), SlotError> {
        // Lock order: the splitter's caches, then the MMU lock.
        let mut split = self.config.eager_split.then(|| self.split_caches.lock());
        let mut st = self.state.write();
        let mut i = st.slot_by_id(id).ok_or(SlotError::NotFound)?;
        let log = st.slots[i].log.as_ref().ok_or(SlotError::Logging)?;
        let (words, mode) = (log.bits.len(), log.mode);
        if out.len() < words {
            return Err(SlotError::BadBitmap);
        }
        if let Some(caches) = split.as_deref_mut() {
            let wants = (0..words as u64).map(|w| (w, u64::MAX));
            let (back, r) = self.split_before_clear(st, caches, id, mode, words as u64, wants, tlb);
            st = back;
            i = r?;
        }
        let mut z = self.zapper();
        for (w, o) in out.iter_mut().enumerate().take(words) {
            let mask = match st.slots[i].log.as_ref() {
                Some(log) => log.bits[w].swap(0, Ordering::Relaxed),
                None => 0,
            };
            *o = mask;
            if mask != 0 {
                protect_masked(&mut z, &mut st, i, w as u64 * 64, mask);
            }
        }
        z.finish(&mut st, tlb);
        Ok(())
    }

    /// Clears the bits of `bits` in the slot's dirty bitmap from unit `first` (a multiple
    /// of 64) and write-protects the pages whose bits were set (KVM `KVM_CLEAR_DIRTY_LOG`
    /// → `kvm_arch_mmu_enable_log_dirty_pt_masked`). Under
    /// [`LogMode::initially_set`] huge pages were never write-protected, so the huge page
    /// at the first and at the last set bit of each 64-unit mask is write-protected too
    /// (two of them when the mask crosses a 2 MiB boundary).
    pub fn clear_dirty_log<T: TlbFlush + ?Sized>(
        &self,
        id: SlotId,
        first: u64,
        bits: &[u64],
        tlb: &mut T,
    ) -> Result<(), SlotError> {
        let mut split = self.config.eager_split.then(|| self.split_caches.lock());
        let mut st = self.state.write();
        let mut i = st.slot_by_id(id).ok_or(SlotError::NotFound)?;
        let log = st.slots[i].log.as_ref().ok_or(SlotError::Logging)?;
        let (words, mode) = (log.bits.len() as u64, log.mode);
        if first % 64 != 0
            || (first / 64)
                .checked_add(bits.len() as u64)
                .is_none_or(|end| end > words)
        {
            return Err(SlotError::BadBitmap);
        }
        if let Some(caches) = split.as_deref_mut() {
            let wants = bits
                .iter()
                .enumerate()
                .map(|(k, &want)| (first / 64 + k as u64, want));
            let (back, r) = self.split_before_clear(st, caches, id, mode, words, wants, tlb);
            st = back;
            i = r?;
        }
        let mut z = self.zapper();
        for (k, &want) in bits.iter().enumerate() {
            let w = first / 64 + k as u64;
            let mask = match st.slots[i].log.as_ref() {
                Some(log) => want & log.bits[w as usize].fetch_and(!want, Ordering::Relaxed),
                None => 0,
            };
            if mask != 0 {
                protect_masked(&mut z, &mut st, i, w * 64, mask);
            }
        }
        z.finish(&mut st, tlb);
        Ok(())
    }

    /// Eager splitting where bits are about to be cleared under [`LogMode::initially_set`]
    /// (KVM `kvm_arch_mmu_enable_log_dirty_pt_masked` → `kvm_mmu_try_split_huge_pages`):
    /// for each `(word, want)`, the huge pages over `[first set unit, last set unit + 1)` of
    /// `want & bits` are split down to the logging unit, with the bits untouched — the
    /// splitter may drop the lock, and until a bit is cleared under the lock held to the
    /// end, a write needs no logging. Returns the slot's index again (the slot may have
    /// changed while the lock was dropped: `NotFound`, or `Logging` when its log did).
    #[allow(clippy::too_many_arguments)]
    fn split_before_clear<'s, T: TlbFlush + ?Sized>(
        &'s self,
        mut st: StateGuard<'s>,
        caches: &mut SplitCaches,
        id: SlotId,
        mode: LogMode,
        words: u64,
        wants: impl Iterator<Item = (u64, u64)>,
        tlb: &mut T,
    ) -> (StateGuard<'s>, Result<usize, SlotError>) {
        let Some(mut i) = st.slot_by_id(id) else {
            return (st, Err(SlotError::NotFound));
        };
        if !mode.initially_set || mode.granularity >= self.max_leaf {
            // Nothing was left huge for a clear to split.
            return (st, Ok(i));
        }
        let (base, end) = (st.slots[i].base, st.slots[i].end());
        let shift = mode.granularity.shift() - PAGE_SHIFT;
        for (w, want) in wants {
            let mask = match st.slots[i].log.as_ref() {
                Some(log) => log
                    .bits
                    .get(w as usize)
                    .map_or(0, |b| want & b.load(Ordering::Relaxed)),
                None => 0,
            };
            if mask == 0 {
                continue;
            }
            let first = w * 64 + u64::from(mask.trailing_zeros());
            let last = w * 64 + 63 - u64::from(mask.leading_zeros());
            let lo = (((base >> shift) + first) << shift).max(base);
            let hi = (((base >> shift) + last + 1) << shift).min(end);
            let range = Gfn::new(lo).ok().zip(Gfn::new(hi).ok());
            let mut s = SplitStats::default();
            let (back, r) = self.split_locked(st, caches, id, range, mode.granularity, &mut s, tlb);
            st = back;
            note_split(&mut st, &s, r);
            // The slot may have changed while the lock was dropped.
            i = match st.slot_by_id(id) {
                Some(i) => i,
                None => return (st, Err(SlotError::NotFound)),
            };
            let same = st.slots[i]
                .log
                .as_ref()
                .is_some_and(|log| log.bits.len() as u64 == words && log.mode == mode);
            if !same {
                return (st, Err(SlotError::Logging));
            }
        }
        (st, Ok(i))
    }

    /// Stops dirty logging on a slot and brings huge pages back: a table whose 512
    /// entries are all there, contiguous and alike, where the host and the slot allow the
    /// larger page, is replaced in place by one huge leaf (2 MiB first, then 1 GiB);
    /// a table that is not complete is zapped so the next fault maps the huge page (KVM
    /// `kvm_mmu_zap_collapsible_sptes`).
    pub fn disable_dirty_log<H: HostMemory + ?Sized, T: TlbFlush + ?Sized>(
        &self,
        id: SlotId,
        host: &H,
        tlb: &mut T,
    ) -> Result<Recovered, SlotError> {
        let mut st = self.state.write();
        let i = st.slot_by_id(id).ok_or(SlotError::NotFound)?;
        let slot = &mut st.slots[i];
        if slot.log.take().is_none() {
            return Err(SlotError::Logging);
        }
        slot.flags.remove(SlotFlags::LOG_DIRTY_PAGES);
        publish_views(&mut st);
        let mut z = self.zapper();
        let mut done = Recovered::default();
        let mut target = Level::L2;
        while target <= self.max_leaf {
            self.recover(&mut z, &mut st, i, host, target, &mut done);
            match target.upper() {
                Some(up) => target = up,
                None => break,
            }
        }
        z.finish(&mut st, tlb);
        Ok(done)
    }

    /// One level of recovery: every live page one level below `target` inside slot `i`.
    fn recover<H: HostMemory + ?Sized>(
        &self,
        z: &mut Zapper<'_, '_, F>,
        st: &mut State,
        i: usize,
        host: &H,
        target: Level,
        done: &mut Recovered,
    ) {
        let Some(child_level) = target.lower() else {
            return;
        };
        let n = frames(target);
        let (lo, hi) = (st.slots[i].base, st.slots[i].end());
        let mut candidates = Vec::new();
        for id in st.pages.live_ids() {
            let Some(sp) = st.pages.get(id) else {
                continue;
            };
            let g = sp.gfn.get();
            if sp.role.level() == child_level && !sp.root && g >= lo && g + n <= hi {
                if candidates.try_reserve(1).is_err() {
                    break;
                }
                candidates.push(id);
            }
        }
        for id in candidates {
            let Some(sp) = st.pages.get(id).filter(|sp| sp.live) else {
                continue;
            };
            let gfn = sp.gfn.get();
            let slot = &st.slots[i];
            let huge_ok = Gfn::new(gfn)
                .ok()
                .filter(|_| slot.huge_allowed(gfn, target))
                .and_then(|g| host.host_page(slot.id, g))
                .filter(|hp| hp.level >= target && (hp.pfn.get() ^ gfn) & (n - 1) == 0);
            let Some(hp) = huge_ok else {
                continue;
            };
            match self.collapsible(st, id, child_level, hp.pfn.get()) {
                Some(huge) => {
                    self.collapse(z, st, i, id, gfn, target, huge);
                    done.collapsed += 1;
                }
                None => {
                    z.zap_page(st, id);
                    done.zapped += 1;
                }
            }
        }
    }

    /// The huge leaf that may replace page `id` (entries of `level`): every entry a leaf,
    /// contiguous from host frame `pfn`, with the same attributes apart from accessed,
    /// dirty and writable. Writable when every piece is mmu-writable.
    fn collapsible(&self, st: &State, id: u32, level: Level, pfn: u64) -> Option<u64> {
        let entries = self.table(st.pages.table_of(id))?;
        let base = crate::addr::Pfn::new(pfn).ok()?.addr().get();
        let ignore = F::ACCESSED | F::DIRTY | F::WRITABLE | F::MMU_WRITABLE;
        let first = entries[0].load(Ordering::Acquire);
        let attrs = F::leaf_flags(first, level) & !ignore;
        let mut mmu_writable = true;
        for (k, entry) in entries.iter().enumerate() {
            let v = entry.load(Ordering::Acquire);
            if !F::is_leaf(v, level)
                || F::leaf_addr(v, level).get() != base + k as u64 * level.page_size()
                || F::leaf_flags(v, level) & !ignore != attrs
            {
                return None;
            }
            mmu_writable &= v & F::MMU_WRITABLE != 0;
        }
        let mut flags = attrs;
        if mmu_writable {
            flags |= F::WRITABLE | F::MMU_WRITABLE;
        }
        Some(F::leaf_entry(crate::spt::hpa(base), level.upper()?, flags))
    }

    /// Replaces page `id` in every parent entry by the leaf `huge` (at `target`, mapping
    /// from `gfn`), then zaps the page. A parent whose rmap entry cannot get a descriptor
    /// is cleared instead (the next fault maps the huge page).
    #[allow(clippy::too_many_arguments)]
    fn collapse(
        &self,
        z: &mut Zapper<'_, '_, F>,
        st: &mut State,
        i: usize,
        id: u32,
        gfn: u64,
        target: Level,
        huge: u64,
    ) {
        let table = st.pages.table_of(id);
        let Some(sp) = st.pages.get_mut(id) else {
            return;
        };
        let mut parents = core::mem::take(&mut sp.parents);
        // The page's own leaves go first: that frees the descriptors the huge leaf's rmap
        // entries may need.
        z.zap_page(st, id);
        let mut list: Vec<EntryRef> = Vec::new();
        {
            let State { store, .. } = &mut *st;
            let mut freed = Vec::new();
            parents.drain(
                store,
                |pe| {
                    if list.try_reserve(1).is_ok() {
                        list.push(pe);
                    }
                },
                |d| {
                    if freed.try_reserve(1).is_ok() {
                        freed.push(d);
                    }
                },
            );
            for d in freed {
                super::free_desc(&mut st.spare, &self.descs, d);
            }
        }
        for pe in list {
            let Some(t) = self.table(pe.table()) else {
                continue;
            };
            self.tables().unlink(table);
            let mut pool = self.descriptors();
            let _ = st.spare.top_up(&mut pool, 1);
            let State {
                slots,
                store,
                spare,
                ..
            } = &mut *st;
            let added = Gfn::new(gfn)
                .ok()
                .and_then(|g| slots[i].rmaps.head_mut(g, target))
                .is_some_and(|head| head.add(pe, store, spare).is_ok());
            t[pe.index()].store(if added { huge } else { 0 }, Ordering::Release);
            z.gather_leaf(gfn, target);
        }
    }
}

/// Write-protects what one 64-unit mask of slot `i` names, from slot-relative unit
/// `offset` (KVM `kvm_arch_mmu_enable_log_dirty_pt_masked`).
fn protect_masked<F: PteFormat>(
    z: &mut Zapper<'_, '_, F>,
    st: &mut State,
    i: usize,
    offset: u64,
    mask: u64,
) {
    let slot = &st.slots[i];
    let Some(log) = slot.log.as_ref() else {
        return;
    };
    let (base, end, mode) = (slot.base, slot.end(), log.mode);
    let max = slot.max_level();
    if mode.granularity == Level::L1 {
        let start = base + offset + u64::from(mask.trailing_zeros());
        let last = base + offset + 63 - u64::from(mask.leading_zeros());
        if mode.initially_set {
            // Huge pages were left writable when logging started: write-protect the ones
            // holding the first and the last page, so their next write is split to 4 KiB.
            z.write_protect(st, i, (start, start + 1), Level::L2, max);
            // Compared rounded down: KVM's `ALIGN(start) != ALIGN(end)` rounds up, which
            // misses a mask whose first bit is the last page before a 2 MiB boundary.
            let pmd = frames(Level::L2);
            if start / pmd != last / pmd {
                z.write_protect(st, i, (last, last + 1), Level::L2, max);
            }
        }
        let mut m = mask;
        while m != 0 {
            let gfn = base + offset + u64::from(m.trailing_zeros());
            m &= m - 1;
            z.write_protect(st, i, (gfn, gfn + 1), Level::L1, Level::L1);
        }
    } else {
        let shift = mode.granularity.shift() - crate::addr::PAGE_SHIFT;
        let mut m = mask;
        while m != 0 {
            let unit = offset + u64::from(m.trailing_zeros());
            m &= m - 1;
            let lo = (((base >> shift) + unit) << shift).max(base);
            let hi = (lo | ((1 << shift) - 1)).saturating_add(1).min(end);
            z.write_protect(st, i, (lo, hi), Level::L1, max);
        }
    }
}

/// Counts what an MMU-started eager split did.
/// Counts a dirty-log path's eager split: every huge page it split, also when it stopped
/// early (those stay split), and the stop.
fn note_split(st: &mut State, s: &SplitStats, r: Result<(), crate::rmap::SplitError>) {
    st.stats.eager_splits += s.split;
    if r.is_err() {
        st.stats.eager_split_failures += 1;
    }
}
