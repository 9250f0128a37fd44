//! Zapping (Linux `kvm_mmu_prepare_zap_page` / `kvm_mmu_commit_zap_page`,
//! `kvm_zap_rmap`, `drop_parent_pte`) and the invariant check.
//!
//! A zap clears entries and gathers their ranges; pages it takes down go on an intrusive
//! list and are freed to the arena only after the TLB flush, in [`Zapper::finish`]. A page
//! whose last parent entry goes is zapped with it (its children recursively, through an
//! intrusive to-do list: no recursion, no allocation), so apart from the root every live
//! page is reachable.

use core::fmt;

use super::page::NIL;
use super::{GATHER, State, frames, free_desc, rmap_remove};
use crate::addr::{Gfn, Level, PAGE_SHIFT};
use crate::rmap::DescPool;
use crate::spt::flush::FlushGather;
use crate::spt::{EntryRef, LockedArena, PteFormat, TableAlloc, TableLinks, TlbFlush};
use crate::sync::Ordering;

/// One operation's zapping: the flush it owes and the pages to free after it.
pub(crate) struct Zapper<'m, 'a, F> {
    tables: &'m LockedArena<'a>,
    pool: &'m DescPool,
    gather: FlushGather<GATHER>,
    todo: u32,
    freed: u32,
    _format: core::marker::PhantomData<F>,
}

impl<'m, 'a, F: PteFormat> Zapper<'m, 'a, F> {
    pub(crate) fn new(tables: &'m LockedArena<'a>, pool: &'m DescPool) -> Self {
        Self {
            tables,
            pool,
            gather: FlushGather::default(),
            todo: NIL,
            freed: NIL,
            _format: core::marker::PhantomData,
        }
    }

    /// Gathers the range of a leaf that was changed.
    pub(crate) fn gather_leaf(&mut self, gfn: u64, level: Level) {
        self.gather
            .add_raw(gfn << PAGE_SHIFT, level.page_size(), level);
    }

    /// Zaps the oldest page that is not a root; false when there is none.
    pub(crate) fn zap_oldest(&mut self, st: &mut State) -> bool {
        match st.pages.oldest_non_root(NIL) {
            Some(id) => {
                self.zap_page(st, id);
                true
            }
            None => false,
        }
    }

    /// Zaps page `id` and every page that only it linked.
    pub(crate) fn zap_page(&mut self, st: &mut State, id: u32) {
        self.queue(st, id);
        self.drain(st);
    }

    /// Zaps every queued page (and what they alone linked).
    fn drain(&mut self, st: &mut State) {
        while self.todo != NIL {
            let p = self.todo;
            let Some(sp) = st.pages.get_mut(p) else {
                break;
            };
            self.todo = sp.zap_next;
            self.clear_children(st, p);
            self.unlink_parents(st, p);
            st.pages.remove(p);
            if let Some(sp) = st.pages.get_mut(p) {
                sp.zap_next = self.freed;
            }
            self.freed = p;
            st.stats.pages_zapped += 1;
        }
    }

    fn queue(&mut self, st: &mut State, id: u32) {
        if let Some(sp) = st.pages.get_mut(id) {
            if sp.live && !sp.queued && !sp.root {
                sp.queued = true;
                sp.zap_next = self.todo;
                self.todo = id;
            }
        }
    }

    /// Clears every entry of page `p`: leaves leave their rmaps, child tables lose this
    /// parent (and are queued when it was their last).
    fn clear_children(&mut self, st: &mut State, p: u32) {
        let Some(sp) = st.pages.get(p) else {
            return;
        };
        let (gfn, level) = (sp.gfn.get(), sp.role.level());
        let table = st.pages.table_of(p);
        let Some(entries) = self.tables.table(table) else {
            return;
        };
        for (i, entry) in entries.iter().enumerate() {
            let v = entry.load(Ordering::Acquire);
            if !F::is_present(v) {
                continue;
            }
            let Some(e) = EntryRef::new(table, i) else {
                continue;
            };
            let entry_gfn = gfn + i as u64 * frames(level);
            if F::is_leaf(v, level) {
                entry.store(0, Ordering::Release);
                self.remove_rmap(st, e, entry_gfn, level);
            } else {
                entry.store(0, Ordering::Release);
                self.drop_parent(st, e, F::table_addr(v));
            }
        }
    }

    /// Takes `e` out of the parent list of the page at `child` and unlinks it; queues the
    /// child when that was its last parent.
    fn drop_parent(&mut self, st: &mut State, e: EntryRef, child: crate::addr::Hpa) {
        let Some(c) = st.pages.live_id(child) else {
            st.stats.inconsistencies += 1;
            return;
        };
        let State {
            pages,
            store,
            spare,
            ..
        } = &mut *st;
        let Some(sp) = pages.get_mut(c) else {
            return;
        };
        if rmap_remove(&mut sp.parents, e, store, spare, self.pool) {
            self.tables.unlink(child);
        } else {
            st.stats.inconsistencies += 1;
        }
        if st.pages.get(c).is_some_and(|sp| sp.parents.is_empty()) {
            self.queue(st, c);
        }
    }

    /// Clears every entry that points at page `p` (KVM `kvm_mmu_unlink_parents`).
    fn unlink_parents(&mut self, st: &mut State, p: u32) {
        let Some(sp) = st.pages.get_mut(p) else {
            return;
        };
        let (gfn, level) = (sp.gfn.get(), sp.role.level());
        let mut parents = core::mem::take(&mut sp.parents);
        let table = st.pages.table_of(p);
        let tables = self.tables;
        let pool = self.pool;
        let gather = &mut self.gather;
        let spare = &mut st.spare;
        let parent_level = level.upper().unwrap_or(level);
        parents.drain(
            &mut st.store,
            |pe| {
                if let Some(t) = tables.table(pe.table()) {
                    t[pe.index()].store(0, Ordering::Release);
                }
                tables.unlink(table);
                gather.add_table_raw(gfn << PAGE_SHIFT, parent_level.page_size(), parent_level);
            },
            |id| free_desc(spare, pool, id),
        );
    }

    fn remove_rmap(&mut self, st: &mut State, e: EntryRef, gfn: u64, level: Level) {
        let Some(si) = st.slot_index(gfn) else {
            st.stats.inconsistencies += 1;
            return;
        };
        let State {
            slots,
            store,
            spare,
            ..
        } = &mut *st;
        let removed = Gfn::new(gfn)
            .ok()
            .and_then(|g| slots[si].rmaps.head_mut(g, level))
            .is_some_and(|head| rmap_remove(head, e, store, spare, self.pool));
        if !removed {
            st.stats.inconsistencies += 1;
        }
    }

    /// Clears the leaf at `e` (mapping from `gfn` at `level`) and its rmap entry.
    pub(crate) fn drop_leaf(&mut self, st: &mut State, e: EntryRef, gfn: u64, level: Level) {
        if let Some(t) = self.tables.table(e.table()) {
            t[e.index()].store(0, Ordering::Release);
        }
        self.remove_rmap(st, e, gfn, level);
        self.gather_leaf(gfn, level);
    }

    /// Clears the table entry `e` (at `level`, covering `gfn`) and drops the child's link
    /// (KVM `drop_parent_pte`); the child goes when that was its last parent.
    pub(crate) fn unlink_child(&mut self, st: &mut State, e: EntryRef, gfn: u64, level: Level) {
        let Some(t) = self.tables.table(e.table()) else {
            return;
        };
        let v = t[e.index()].swap(0, Ordering::AcqRel);
        if F::is_table(v, level) {
            self.drop_parent(st, e, F::table_addr(v));
        }
        let start = gfn & !(frames(level) - 1);
        self.gather
            .add_table_raw(start << PAGE_SHIFT, level.page_size(), level);
        self.drain(st);
    }

    /// Zaps every leaf of slot `i` (KVM `kvm_zap_rmap` over the slot).
    pub(crate) fn zap_slot_leaves(&mut self, st: &mut State, i: usize) -> u64 {
        let (lo, hi) = (st.slots[i].base, st.slots[i].end());
        self.zap_leaves_in(st, i, lo, hi)
    }

    /// Zaps the leaves of slot `i` mapping any gfn of `[lo, hi)`, at every level.
    pub(crate) fn zap_leaves_in(&mut self, st: &mut State, i: usize, lo: u64, hi: u64) -> u64 {
        let mut zapped = 0;
        let tables = self.tables;
        let pool = self.pool;
        let State {
            slots,
            store,
            spare,
            ..
        } = &mut *st;
        let slot = &mut slots[i];
        let mut level = Level::L1;
        loop {
            let n = frames(level);
            let mut gfn = lo & !(n - 1);
            while gfn < hi {
                if let Some(head) = Gfn::new(gfn)
                    .ok()
                    .and_then(|g| slot.rmaps.head_mut(g, level))
                {
                    let gather = &mut self.gather;
                    head.drain(
                        store,
                        |e| {
                            if let Some(t) = tables.table(e.table()) {
                                let entry = &t[e.index()];
                                if F::is_leaf(entry.load(Ordering::Acquire), level) {
                                    entry.store(0, Ordering::Release);
                                    zapped += 1;
                                }
                            }
                            gather.add_raw(gfn << PAGE_SHIFT, level.page_size(), level);
                        },
                        |id| free_desc(spare, pool, id),
                    );
                }
                gfn += n;
            }
            if (lo, hi) == (slot.base, slot.end()) {
                // Every head of the level was drained: the splitter may fill them unread.
                slot.rmaps.note_empty(level);
            }
            match level.upper() {
                Some(up) if up <= slot.max_level() => level = up,
                _ => break,
            }
        }
        zapped
    }

    /// Clears the write bit (keeping mmu-writable) of every leaf of slot `i` mapping a gfn
    /// of `[lo, hi)` at the levels `min..=max` (KVM `rmap_write_protect`); returns how
    /// many entries changed. The heads are read straight from the slot's arrays (an empty
    /// head costs one load) and the flush is gathered once per level, for the whole range.
    pub(crate) fn write_protect(
        &mut self,
        st: &mut State,
        i: usize,
        (lo, hi): (u64, u64),
        min: Level,
        max: Level,
    ) -> u64 {
        let mut changed = 0;
        let tables = self.tables;
        let State { slots, store, .. } = &*st;
        let slot = &slots[i];
        let mut level = min;
        while level <= max && level <= slot.max_level() && lo < hi {
            let n = frames(level);
            let heads = slot.rmaps.heads(level);
            let shift = level.shift() - PAGE_SHIFT;
            let first = ((lo >> shift) - (slot.base >> shift)) as usize;
            let last = (((hi - 1) >> shift) - (slot.base >> shift)) as usize;
            let mut here = 0;
            for head in heads.iter().take(last + 1).skip(first) {
                if head.is_empty() {
                    continue;
                }
                if let Some(e) = head.single() {
                    here += protect_entry::<F>(tables, e, level);
                } else {
                    for e in head.iter(store) {
                        here += protect_entry::<F>(tables, e, level);
                    }
                }
            }
            if here > 0 {
                let start = lo & !(n - 1);
                let end = (hi + n - 1) & !(n - 1);
                self.gather
                    .add_raw(start << PAGE_SHIFT, (end - start) << PAGE_SHIFT, level);
                changed += here;
            }
            match level.upper() {
                Some(up) => level = up,
                None => break,
            }
        }
        st.stats.write_protected += changed;
        changed
    }

    /// Flushes what was gathered, then frees the zapped pages' tables.
    pub(crate) fn finish<T: TlbFlush + ?Sized>(&mut self, st: &mut State, tlb: &mut T) {
        if !self.gather.is_empty() {
            self.gather.flush(tlb);
        }
        let mut tables = self.tables;
        while self.freed != NIL {
            let p = self.freed;
            let (next, table) = match st.pages.get_mut(p) {
                Some(sp) => {
                    let next = sp.zap_next;
                    sp.zap_next = NIL;
                    sp.queued = false;
                    (next, st.pages.table_of(p))
                }
                None => break,
            };
            if tables.free_table(table).is_err() {
                st.stats.inconsistencies += 1;
            }
            self.freed = next;
        }
    }
}

/// What [`Mmu::disable_dirty_log`](super::Mmu::disable_dirty_log) did to bring huge pages
/// back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Recovered {
    /// Tables replaced in place by one huge leaf (all 512 pieces were there).
    pub collapsed: u64,
    /// Tables zapped so the next fault maps a huge page (some pieces were missing).
    pub zapped: u64,
}

/// What [`Mmu::check`](super::Mmu::check) counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MmuCounts {
    /// Live shadow pages.
    pub pages: usize,
    /// Present leaves in live pages.
    pub leaves: u64,
    /// Present table entries in live pages.
    pub table_entries: u64,
    /// Rmap entries over every slot and level.
    pub rmap_entries: u64,
}

/// An invariant that does not hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct InvariantError {
    /// Which one.
    pub what: &'static str,
    /// The gfn (or page gfn) concerned.
    pub gfn: u64,
    /// The level concerned.
    pub level: u8,
}

impl fmt::Display for InvariantError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (gfn {:#x}, level {})",
            self.what, self.gfn, self.level
        )
    }
}

impl core::error::Error for InvariantError {}

/// Clears the write bit of the leaf at `e` (of `level`), keeping mmu-writable; 1 when it
/// changed. A compare-exchange: the CPU may set accessed or dirty meanwhile.
#[inline]
fn protect_entry<F: PteFormat>(tables: &LockedArena<'_>, e: EntryRef, level: Level) -> u64 {
    let Some(t) = tables.table(e.table()) else {
        return 0;
    };
    let entry = &t[e.index()];
    let mut old = entry.load(Ordering::Acquire);
    while F::is_leaf(old, level) && old & F::WRITABLE != 0 {
        match entry.compare_exchange(old, old & !F::WRITABLE, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return 1,
            Err(now) => old = now,
        }
    }
    0
}
