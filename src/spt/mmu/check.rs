//! The MMU's invariants, checked on demand (after every operation in the model test and
//! the fuzz target; cheap enough for an embedder's debug builds on small guests: it reads
//! every live table and every rmap head once).

use super::page::NIL;
use super::zap::{InvariantError, MmuCounts};
use super::{Mmu, frames};
use crate::addr::{Gfn, Level};
use crate::spt::{EntryRef, PteFormat, TableLinks};
use crate::sync::Ordering;

fn err(what: &'static str, gfn: u64, level: Level) -> InvariantError {
    InvariantError {
        what,
        gfn,
        level: level.get(),
    }
}

impl<F: PteFormat> Mmu<'_, F> {
    /// Checks, under the MMU lock held for *write* (a fast-path fix runs under the read
    /// lock and sets the write bit an instant before the dirty bit, so a check beside it
    /// would report the last rule broken; test `check_is_consistent_while_vcpus_fault`):
    /// - every present leaf of a live page lies inside one slot and is in that slot's rmap
    ///   at its level, no leaf is above the maximum leaf level, and every rmap entry names a
    ///   present leaf of a live page at that level and gfn (so the rmaps are exact);
    /// - every present table entry points at a live page one level down whose gfn is the
    ///   entry's and whose parent list holds the entry; every parent-list entry is such an
    ///   entry; the arena's link count of each page equals its parent count; every live page
    ///   but the root has a parent;
    /// - every live page is found by `(gfn, role)` in the hash, under its own id; the
    ///   number of live pages is at most the limit;
    /// - while a slot logs, every writable leaf in it has the dirty bits of all the units
    ///   it covers set: a write the log has not seen is impossible;
    /// - every shard's copy of the fast path's view of the slots says where each slot is and
    ///   shares its dirty log;
    /// - a slot's rmap level that is [`known_empty`](crate::rmap::SlotRmaps::known_empty)
    ///   has no entry (the eager splitter writes such heads without reading them).
    pub fn check(&self) -> Result<MmuCounts, InvariantError> {
        let mut guard = self.state.write();
        let (st, mut views) = guard.split_views();
        if !views.all(|v| v.matches(&st.slots)) {
            return Err(err("a fast-path view differs from the slots", 0, Level::L1));
        }
        let st = &*st;
        let mut counts = MmuCounts::default();
        let tables = self.tables();
        for (id, sp) in st.pages.headers().iter().enumerate() {
            if !sp.live {
                continue;
            }
            let id = id as u32;
            counts.pages += 1;
            let level = sp.role.level();
            let gfn = sp.gfn.get();
            if st.pages.lookup(sp.gfn, sp.role) != Some(id) {
                return Err(err("live page not found by (gfn, role)", gfn, level));
            }
            if !sp.root && sp.parents.is_empty() {
                return Err(err("live page without a parent", gfn, level));
            }
            let table = st.pages.table_of(id);
            if tables.links(table) as usize != sp.parents.count(&st.store) {
                return Err(err("arena link count differs from parent list", gfn, level));
            }
            for pe in sp.parents.iter(&st.store) {
                let Some(pid) = st.pages.live_id(pe.table()) else {
                    return Err(err("parent entry outside live pages", gfn, level));
                };
                let parent = st
                    .pages
                    .get(pid)
                    .ok_or(err("no parent header", gfn, level))?;
                let v = pe.load(&tables).unwrap_or(0);
                if parent.role.level().lower() != Some(level)
                    || !F::is_table(v, parent.role.level())
                    || F::table_addr(v) != table
                {
                    return Err(err("parent entry does not point at the page", gfn, level));
                }
            }
            let entries =
                self.table(table)
                    .ok_or(err("page table outside the arena", gfn, level))?;
            for (i, entry) in entries.iter().enumerate() {
                let v = entry.load(Ordering::Acquire);
                if !F::is_present(v) {
                    continue;
                }
                let e = EntryRef::new(table, i).ok_or(err("bad entry", gfn, level))?;
                let egfn = gfn + i as u64 * frames(level);
                if F::is_leaf(v, level) {
                    counts.leaves += 1;
                    if level > self.max_leaf {
                        return Err(err("leaf above the maximum leaf level", egfn, level));
                    }
                    let si =
                        st.slot_index(egfn)
                            .ok_or(err("leaf outside every slot", egfn, level))?;
                    let slot = &st.slots[si];
                    if egfn + frames(level) > slot.end() {
                        return Err(err("leaf reaches past its slot", egfn, level));
                    }
                    let head = Gfn::new(egfn)
                        .ok()
                        .and_then(|g| slot.rmaps.head(g, level))
                        .ok_or(err("no rmap head for a leaf", egfn, level))?;
                    if !head.contains(e, &st.store) {
                        return Err(err("leaf missing from its rmap", egfn, level));
                    }
                    if let Some(log) = slot.log.as_ref() {
                        if v & F::WRITABLE != 0 {
                            let g = log.mode.granularity;
                            let mut u = egfn;
                            while u < egfn + frames(level) {
                                if !log.is_set(slot.unit(u, g)) {
                                    return Err(err(
                                        "writable leaf in a logged slot not marked dirty",
                                        u,
                                        level,
                                    ));
                                }
                                u += frames(g);
                            }
                        }
                    }
                } else {
                    counts.table_entries += 1;
                    let child_table = F::table_addr(v);
                    let cid = st.pages.live_id(child_table).ok_or(err(
                        "table entry to a page that is not live",
                        egfn,
                        level,
                    ))?;
                    let child = st
                        .pages
                        .get(cid)
                        .ok_or(err("no child header", egfn, level))?;
                    if child.role.level().upper() != Some(level) || child.gfn.get() != egfn {
                        return Err(err("child page role or gfn wrong", egfn, level));
                    }
                    if !child.parents.contains(e, &st.store) {
                        return Err(err("table entry missing from child's parents", egfn, level));
                    }
                }
            }
        }
        if counts.pages != st.pages.used() {
            return Err(err("live page count differs", 0, Level::L1));
        }
        if st.pages.used() > st.limit {
            return Err(err("more live pages than the limit", 0, Level::L1));
        }
        let parents: usize = st
            .pages
            .headers()
            .iter()
            .filter(|sp| sp.live)
            .map(|sp| sp.parents.count(&st.store))
            .sum();
        if parents as u64 != counts.table_entries {
            return Err(err("parent lists hold stale entries", 0, Level::L1));
        }
        for slot in &st.slots {
            let mut level = Level::L1;
            loop {
                // Straight through the level's head array, skipping empty heads in a tight
                // loop: most of a slot's heads are empty, and this loop was 90 % of a check.
                let heads = slot.rmaps.heads(level);
                // What the splitter fills without reading must be empty indeed.
                if slot.rmaps.known_empty(level) && heads.iter().any(|h| !h.is_empty()) {
                    return Err(err(
                        "a level known empty has an rmap entry",
                        slot.base,
                        level,
                    ));
                }
                let first = slot.base >> (level.shift() - crate::addr::PAGE_SHIFT);
                for (i, head) in heads.iter().enumerate().filter(|(_, h)| !h.is_empty()) {
                    let g = (first + i as u64) << (level.shift() - crate::addr::PAGE_SHIFT);
                    for e in head.iter(&st.store) {
                        counts.rmap_entries += 1;
                        let pid = st.pages.live_id(e.table()).ok_or(err(
                            "rmap entry outside live pages",
                            g,
                            level,
                        ))?;
                        let sp = st.pages.get(pid).ok_or(err("no header", g, level))?;
                        let v = e.load(&tables).unwrap_or(0);
                        let egfn = sp.gfn.get() + e.index() as u64 * frames(level);
                        if sp.role.level() != level || !F::is_leaf(v, level) || egfn != g {
                            return Err(err("rmap entry names no leaf of its gfn", g, level));
                        }
                    }
                }
                match level.upper() {
                    Some(up) if up <= slot.max_level() => level = up,
                    _ => break,
                }
            }
        }
        if counts.rmap_entries != counts.leaves {
            return Err(err(
                "rmap entries and leaves differ in number",
                0,
                Level::L1,
            ));
        }
        for (b, &head) in st.pages.bucket_heads().iter().enumerate() {
            let mut id = head;
            let mut n = 0;
            while id != NIL {
                let sp = st
                    .pages
                    .get(id)
                    .ok_or(err("hash chain out of range", 0, Level::L1))?;
                if !sp.live || st.pages.bucket_of(sp.gfn) != b {
                    return Err(err(
                        "hash chain holds a dead or misplaced page",
                        sp.gfn.get(),
                        Level::L1,
                    ));
                }
                n += 1;
                if n > st.pages.used() {
                    return Err(err("hash chain loops", 0, Level::L1));
                }
                id = sp.hash_next;
            }
        }
        Ok(counts)
    }
}
