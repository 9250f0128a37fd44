//! The walk-driven eager split, for comparison (KVM's TDP MMU
//! `tdp_mmu_split_huge_pages_root`, arm64 `kvm_pgtable_stage2_split`): the same splits as
//! [`Mmu::eager_split`], found by walking the tables over the range instead of reading the
//! huge levels' rmaps. A walk has to traverse every table under the range to learn that
//! nothing is left to split; the rmaps know it from one empty head per huge frame — the
//! "iteration 2" difference of Matlack 2022's tables.

use super::{SplitCaches, SplitError, SplitStats};
use crate::addr::{Gfn, Level};
use crate::spt::mmu::{Mmu, SlotId, StateGuard, frames, index_of};
use crate::spt::{EntryRef, PteFormat, TlbFlush};
use crate::sync::Ordering;

/// How a walk of one subtree ended.
enum Flow {
    Done,
    /// The lock must be dropped (caches low, or someone waits); resume at this gfn.
    Restart(u64),
}

impl<'a, F: PteFormat> Mmu<'a, F> {
    /// Splits every huge leaf over `[start, end)` of slot `slot` (the whole slot for
    /// `None`) down to `target`, finding them by a depth-first walk of the tables from the
    /// root. Drops the lock like [`eager_split`](Self::eager_split), resuming the walk from
    /// the gfn it stopped at.
    pub fn eager_split_by_walk<T: TlbFlush + ?Sized>(
        &self,
        caches: &mut SplitCaches,
        slot: SlotId,
        range: Option<(Gfn, Gfn)>,
        target: Level,
        tlb: &mut T,
    ) -> Result<SplitStats, SplitError> {
        self.top_up_split(caches)?;
        let mut st = self.state.write();
        let i = st.slot_by_id(slot).ok_or(SplitError::NotFound)?;
        let bounds = (st.slots[i].base, st.slots[i].end());
        let (lo, hi) = match range {
            Some((s, e)) => (s.get().max(bounds.0), e.get().min(bounds.1)),
            None => bounds,
        };
        if lo >= hi || target >= self.max_leaf() {
            return Err(SplitError::BadRange);
        }
        let mut stats = SplitStats::default();
        for as_id in 0..self.address_spaces() {
            let Some(root) = self.root_of(as_id) else {
                break;
            };
            let mut pos = lo;
            loop {
                let mut z = self.zapper();
                let flow = self.walk_split(
                    &mut st,
                    &mut z,
                    caches,
                    (i, bounds),
                    (root, F::ROOT_LEVEL, 0),
                    (pos, hi),
                    target,
                    &mut stats,
                );
                z.finish(&mut st, tlb);
                match flow? {
                    Flow::Done => break,
                    Flow::Restart(at) => {
                        drop(st);
                        stats.lock_drops += 1;
                        let topped = self.top_up_split(caches);
                        // KVM `cond_resched_rwlock_write`: give the waiter a chance to run before
                        // retaking (a writer that waits competes with us for the lock; under loom,
                        // without this the splitter won every time and the waiting vCPU starved).
                        crate::sync::spin_wait();
                        st = self.state.write();
                        caches.retaken();
                        topped?;
                        stats.restarts += 1;
                        let i2 = st.slot_by_id(slot).ok_or(SplitError::NotFound)?;
                        if i2 != i || (st.slots[i].base, st.slots[i].end()) != bounds {
                            return Err(SplitError::NotFound);
                        }
                        pos = at;
                    }
                }
            }
        }
        Ok(stats)
    }

    /// Walks the table `(table, level, base gfn)` over `[lo, hi)`, splitting huge leaves
    /// above `target` and descending into what they became.
    #[allow(clippy::too_many_arguments)]
    fn walk_split(
        &self,
        st: &mut StateGuard<'_>,
        z: &mut crate::spt::mmu::Zapper<'_, 'a, F>,
        caches: &mut SplitCaches,
        (i, bounds): (usize, (u64, u64)),
        (table, level, base): (crate::addr::Hpa, Level, u64),
        (lo, hi): (u64, u64),
        target: Level,
        stats: &mut SplitStats,
    ) -> Result<Flow, SplitError> {
        let n = frames(level);
        let Some(entries) = self.table(table) else {
            return Ok(Flow::Done);
        };
        let first = index_of(lo.max(base) << crate::addr::PAGE_SHIFT, level);
        let mut gfn = base + first as u64 * n;
        for (idx, entry) in entries.iter().enumerate().skip(first) {
            if gfn >= hi {
                break;
            }
            let mut v = entry.load(Ordering::Acquire);
            if F::is_huge(v, level) && level > target {
                if !caches.holds(1, super::SPLIT_DESCS) || caches.should_yield(self.is_contended())
                {
                    return Ok(Flow::Restart(gfn.max(lo)));
                }
                let Some(e) = EntryRef::new(table, idx) else {
                    break;
                };
                if gfn >= bounds.0 && gfn + n <= bounds.1 {
                    // The walk-driven comparison writes with ordinary stores.
                    match self.split_one(st, z, caches, i, e, (gfn, level), &mut None, false) {
                        Ok(reused) => {
                            caches.progressed();
                            stats.split += 1;
                            stats.reused += u64::from(reused);
                        }
                        Err(SplitError::BadRange) => {}
                        Err(err) => return Err(err),
                    }
                }
                v = entry.load(Ordering::Acquire);
            }
            if F::is_table(v, level) {
                if let Some(lower) = level.lower() {
                    let sub = (F::table_addr(v), lower, gfn);
                    let r = (lo.max(gfn), hi.min(gfn + n));
                    if let Flow::Restart(at) =
                        self.walk_split(st, z, caches, (i, bounds), sub, r, target, stats)?
                    {
                        return Ok(Flow::Restart(at));
                    }
                }
            }
            gfn += n;
        }
        Ok(Flow::Done)
    }
}
