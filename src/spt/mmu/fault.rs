//! The fault path: the fast half under the read lock, the slow half under the write lock
//! (Linux `kvm_mmu_page_fault` → `fast_page_fault` / `direct_page_fault` → `direct_map`).

use core::fmt;

use super::caches::{ForeignCaches, MmuCaches, TopUpFailed};
use super::slot::{FastView, SlotId};
use super::{MIN_FREE_PAGES, Mmu, REFILL_PAGES, State, frames, index_of};
use crate::addr::{Gfn, Gpa, Level, PAGE_SHIFT, Pfn};
use crate::spt::{EntryRef, PteFormat, TableAlloc, TableLinks, TlbFlush};
use crate::sync::Ordering;

/// What the embedder's host mapping says about a guest frame (KVM `kvm_faultin_pfn` plus
/// `host_pfn_mapping_level`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HostPage {
    /// The host frame backing the gfn.
    pub pfn: Pfn,
    /// The level of the host's own mapping of it: the MMU never maps the gfn with a larger
    /// page (KVM reads the host page tables for this). The MMU checks that the frame and
    /// the gfn are equally aligned at that level and maps smaller pages where they are not.
    pub level: Level,
    /// Whether the host allows writes.
    pub writable: bool,
}

/// The embedder's memory: where each guest frame lives on the host.
pub trait HostMemory {
    /// The host page backing `gfn` of `slot`, or `None` when there is none (the fault then
    /// fails with [`FaultError::NoHostPage`]).
    fn host_page(&self, slot: SlotId, gfn: Gfn) -> Option<HostPage>;
}

/// How a fault was resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fault {
    /// The fast path restored the write bit under the read lock.
    Fast,
    /// The entry already allowed the access (another vCPU fixed it, or a stale TLB entry).
    Spurious,
    /// The slow path mapped the gfn.
    Mapped {
        /// The level of the leaf it installed or updated.
        level: Level,
        /// Whether the leaf is writable.
        writable: bool,
    },
}

/// Why a fault could not be resolved; the tables are consistent either way (a fault that
/// fails halfway leaves only empty tables behind, which later faults reuse).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FaultError {
    /// No memory slot holds the gfn (KVM would exit to userspace: MMIO).
    NoSlot,
    /// A write to a read-only slot or a page the host maps read-only.
    ReadOnly,
    /// The host has no page for the gfn.
    NoHostPage,
    /// The address is past the format's input addresses.
    BadAddress,
    /// The table arena is empty.
    OutOfTables,
    /// The descriptor pool is empty.
    OutOfDescriptors,
    /// The page limit is reached and nothing can be zapped.
    PageLimit,
    /// An entry on the way points at something that is not a shadow page of this MMU.
    Corrupt,
    /// The caches hold tables and descriptors of another MMU.
    ForeignCaches,
}

impl fmt::Display for FaultError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NoSlot => "no memory slot for the gfn",
            Self::ReadOnly => "write to read-only memory",
            Self::NoHostPage => "no host page for the gfn",
            Self::BadAddress => "address past the format's input range",
            Self::OutOfTables => "no table left for the shadow page",
            Self::OutOfDescriptors => "no rmap descriptor left",
            Self::PageLimit => "shadow page limit reached",
            Self::Corrupt => "entry points outside the shadow pages",
            Self::ForeignCaches => "fault caches belong to another MMU",
        })
    }
}

impl core::error::Error for FaultError {}

/// Tables one fault may need at most (a 5-level walk installs four).
pub const FAULT_TABLES: usize = 4;
/// Descriptors one fault may need at most: one per parent-list add and one rmap add.
pub const FAULT_DESCS: usize = 5;

/// A vCPU's MMU memory caches for the fault path (KVM `mmu_shadow_page_cache`,
/// `mmu_pte_list_desc_cache`; the header cache is the MMU's header array, which comes with
/// the table). Topped up before the MMU lock is taken; the slow path pops from them under
/// the lock and cannot run dry.
pub type FaultCaches = MmuCaches<FAULT_TABLES, FAULT_DESCS>;

impl From<ForeignCaches> for FaultError {
    fn from(_: ForeignCaches) -> Self {
        Self::ForeignCaches
    }
}

impl<F: PteFormat> Mmu<'_, F> {
    /// Fills `caches` for one fault (KVM `mmu_topup_memory_caches`). Call it with no MMU
    /// lock held; [`page_fault`](Self::page_fault) calls it itself.
    pub fn top_up(&self, caches: &mut FaultCaches) -> Result<(), FaultError> {
        let tables = F::ROOT_LEVEL.get() as usize - 1;
        caches
            .top_up(self, tables, tables + 1)
            .map_err(|e| match e {
                TopUpFailed::Tables => FaultError::OutOfTables,
                TopUpFailed::Descriptors => FaultError::OutOfDescriptors,
                TopUpFailed::Foreign => FaultError::ForeignCaches,
            })
    }

    /// Handles a fault at `gpa` (`write`: the access was a write): first the fast path
    /// under the read lock, then, topping `caches` up with no lock held, the slow path
    /// under the write lock. TLB flushes the fault needs go to `tlb` before it returns.
    pub fn page_fault<H: HostMemory + ?Sized, T: TlbFlush + ?Sized>(
        &self,
        caches: &mut FaultCaches,
        host: &H,
        gpa: Gpa,
        write: bool,
        tlb: &mut T,
    ) -> Result<Fault, FaultError> {
        self.page_fault_in(0, caches, host, gpa, write, tlb)
    }

    /// [`page_fault`](Self::page_fault) in address space `as_id`
    /// ([`FaultError::BadAddress`] when there is no such address space).
    pub fn page_fault_in<H: HostMemory + ?Sized, T: TlbFlush + ?Sized>(
        &self,
        as_id: u8,
        caches: &mut FaultCaches,
        host: &H,
        gpa: Gpa,
        write: bool,
        tlb: &mut T,
    ) -> Result<Fault, FaultError> {
        let gfn = gpa.get() >> PAGE_SHIFT;
        if gfn >= self.gfn_limit || as_id >= self.address_spaces() {
            return Err(FaultError::BadAddress);
        }
        let shard = caches.shard(self);
        if let Some(fault) = self.fast_page_fault(as_id, gfn, write, shard) {
            return Ok(fault);
        }
        self.top_up(caches)?;
        let mut st = self.state.write();
        // `top_up` bound the caches to this MMU: everything popped below is ours.
        self.slow_fault(&mut st, caches, host, as_id, gfn, write, tlb)
    }

    /// KVM `fast_page_fault`: a write to a present leaf that is write-protected but
    /// mmu-writable gets its write bit back with one compare-exchange, and its page marked
    /// dirty, holding only this vCPU's shard of the MMU lock (which excludes writers as the
    /// read lock does, without writing the line every vCPU shares); when a writer holds
    /// the shard, under the read lock. `None`: the slow path must decide.
    #[inline]
    fn fast_page_fault(&self, as_id: u8, gfn: u64, write: bool, shard: usize) -> Option<Fault> {
        if let Some(view) = self.state.try_read_view(shard) {
            return self.fast_fix(&view, as_id, gfn, write, shard);
        }
        let (_st, view) = self.state.read_view(shard)?;
        self.fast_fix(&view, as_id, gfn, write, shard)
    }

    /// The body of [`fast_page_fault`](Self::fast_page_fault), with writers excluded.
    #[inline]
    fn fast_fix(
        &self,
        view: &FastView,
        as_id: u8,
        gfn: u64,
        write: bool,
        shard: usize,
    ) -> Option<Fault> {
        let slot = view.find(gfn)?;
        let (entry, level) = self.find_leaf(as_id, gfn)?;
        let log = slot.log_unit(gfn);
        if log.is_some_and(|(log, _)| level > log.mode.granularity) {
            // A huge page under finer logging: the slow path maps a small one.
            return None;
        }
        let mut old = entry.load(Ordering::Acquire);
        loop {
            if !F::is_leaf(old, level) {
                return None;
            }
            if !write || old & F::WRITABLE != 0 {
                return Some(Fault::Spurious);
            }
            if old & F::MMU_WRITABLE == 0 {
                return None;
            }
            match entry.compare_exchange(
                old,
                old | F::WRITABLE,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break,
                // The CPU set accessed/dirty bits, or another vCPU won: look again.
                Err(now) => old = now,
            }
        }
        if let Some((log, unit)) = log {
            log.mark(unit);
        }
        self.state.count(shard, 1);
        Some(Fault::Fast)
    }

    #[allow(clippy::too_many_arguments)]
    fn slow_fault<H: HostMemory + ?Sized, T: TlbFlush + ?Sized>(
        &self,
        st: &mut State,
        caches: &mut FaultCaches,
        host: &H,
        as_id: u8,
        gfn: u64,
        write: bool,
        tlb: &mut T,
    ) -> Result<Fault, FaultError> {
        st.stats.slow_faults += 1;
        let si = st.slot_index(gfn).ok_or(FaultError::NoSlot)?;
        let slot = &st.slots[si];
        let readonly = slot.flags.contains(super::SlotFlags::READONLY);
        if write && readonly {
            return Err(FaultError::ReadOnly);
        }
        let gfn_t = Gfn::new(gfn).map_err(|_| FaultError::BadAddress)?;
        let hp = host
            .host_page(slot.id, gfn_t)
            .ok_or(FaultError::NoHostPage)?;
        if write && !hp.writable {
            return Err(FaultError::ReadOnly);
        }
        let host_writable = hp.writable && !readonly;
        let logging = slot.log.as_ref().map(|l| l.mode.granularity);

        // The largest level everyone allows (KVM `kvm_mmu_hugepage_adjust`).
        let mut level = hp.level.min(self.max_leaf);
        if let Some(unit) = logging {
            level = level.min(unit);
        }
        let pfn = hp.pfn.get();
        while level > Level::L1 {
            let n = frames(level);
            let start = gfn & !(n - 1);
            let fits = start >= slot.base && start + n <= slot.end();
            let aligned = (pfn ^ gfn) & (n - 1) == 0;
            if fits && aligned && slot.huge_allowed(gfn, level) {
                break;
            }
            level = level.lower().unwrap_or(Level::L1);
        }
        let n = frames(level);
        let head_gfn = gfn & !(n - 1);
        let head_pfn = pfn - (gfn - head_gfn);
        let writable = host_writable && (write || logging.is_none());

        // KVM `make_mmu_pages_available`, before anything of the walk is held.
        let mut z = self.zapper();
        if st.limit.saturating_sub(st.pages.used()) < MIN_FREE_PAGES {
            while st.limit.saturating_sub(st.pages.used()) < REFILL_PAGES {
                if !z.zap_oldest(st) {
                    break;
                }
            }
        }
        let mapped = self.map_gfn(
            st,
            &mut z,
            caches,
            MapReq {
                as_id,
                slot: si,
                gfn: head_gfn,
                pfn: head_pfn,
                level,
                writable,
                host_writable,
                write,
            },
        );
        z.finish(st, tlb);
        mapped
    }

    /// KVM `direct_map`: walks from the root to `req.level`, creating (or finding by
    /// `(gfn, role)`) the shadow pages on the way and dropping huge leaves in the way,
    /// then installs or updates the leaf and its rmap entry.
    fn map_gfn(
        &self,
        st: &mut State,
        z: &mut super::zap::Zapper<'_, '_, F>,
        caches: &mut FaultCaches,
        req: MapReq,
    ) -> Result<Fault, FaultError> {
        let addr = req.gfn << PAGE_SHIFT;
        let space = usize::from(req.as_id);
        let mut table = self.root_of(req.as_id).ok_or(FaultError::BadAddress)?;
        let mut id = *st.root_ids.get(space).ok_or(FaultError::BadAddress)?;
        let mut level = F::ROOT_LEVEL;
        while level > req.level {
            let lower = level.lower().ok_or(FaultError::Corrupt)?;
            let i = index_of(addr, level);
            let e = EntryRef::new(table, i).ok_or(FaultError::Corrupt)?;
            let entry = &self.table(table).ok_or(FaultError::Corrupt)?[i];
            let v = entry.load(Ordering::Acquire);
            if F::is_table(v, level) {
                table = F::table_addr(v);
                id = st.pages.live_id(table).ok_or(FaultError::Corrupt)?;
                level = lower;
                continue;
            }
            if F::is_present(v) {
                // A huge leaf where a smaller page is wanted: drop it (the lazy split).
                let span = frames(level);
                z.drop_leaf(st, e, req.gfn & !(span - 1), level);
                st.stats.huge_dropped += 1;
            }
            let parent_role = st.pages.get(id).ok_or(FaultError::Corrupt)?.role;
            let role = parent_role.direct_child().ok_or(FaultError::Corrupt)?;
            let span = frames(level);
            let child_gfn = Gfn::new(req.gfn & !(span - 1)).map_err(|_| FaultError::BadAddress)?;
            let child = match st.pages.lookup(child_gfn, role) {
                Some(child) => child,
                None => self.new_page(st, caches, child_gfn, role)?,
            };
            let child_table = st.pages.table_of(child);
            let State { pages, store, .. } = &mut *st;
            let sp = pages.get_mut(child).ok_or(FaultError::Corrupt)?;
            if sp.parents.add(e, store, &mut caches.descs).is_err() {
                if sp.parents.is_empty() {
                    // Just created and never linked: give it back at once.
                    z.zap_page(st, child);
                }
                return Err(FaultError::OutOfDescriptors);
            }
            self.tables().link(child_table, lower);
            entry.store(F::table_entry(child_table), Ordering::Release);
            table = child_table;
            id = child;
            level = lower;
        }

        let level = req.level;
        let i = index_of(addr, level);
        let e = EntryRef::new(table, i).ok_or(FaultError::Corrupt)?;
        let entry = &self.table(table).ok_or(FaultError::Corrupt)?[i];
        let mut old = entry.load(Ordering::Acquire);
        if F::is_table(old, level) {
            // A table where a huge leaf fits now (after logging stopped, say): the child
            // goes, orphaned children with it (KVM `mmu_set_spte` → `drop_parent_pte`).
            z.unlink_child(st, e, req.gfn, level);
            old = 0;
        }

        let mut flags = F::REQUIRED | (self.config.leaf_bits & F::FLAGS_MASK);
        if req.writable {
            flags |= F::WRITABLE;
        }
        if req.host_writable {
            flags |= F::MMU_WRITABLE;
        }
        let pa = Pfn::new(req.pfn)
            .map_err(|_| FaultError::NoHostPage)?
            .addr();
        let new = F::leaf_entry(pa, level, flags);

        if F::is_leaf(old, level) {
            let same = F::leaf_addr(old, level) == pa;
            if same && (!req.write || old & F::WRITABLE != 0) {
                // Present and already allowing the access.
                return Ok(Fault::Spurious);
            }
            loop {
                let value = if same {
                    new | (old & (F::ACCESSED | F::DIRTY))
                } else {
                    new
                };
                match entry.compare_exchange(old, value, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => break,
                    Err(now) => old = now,
                }
            }
            if !same {
                z.gather_leaf(req.gfn, level);
            }
        } else {
            let State { slots, store, .. } = &mut *st;
            let head = slots[req.slot]
                .rmaps
                .head_mut(
                    Gfn::new(req.gfn).map_err(|_| FaultError::BadAddress)?,
                    level,
                )
                .ok_or(FaultError::Corrupt)?;
            head.add(e, store, &mut caches.descs)
                .map_err(|_| FaultError::OutOfDescriptors)?;
            entry.store(new, Ordering::Release);
        }
        if req.writable {
            if let Some(log) = st.slots[req.slot].log.as_ref() {
                let slot = &st.slots[req.slot];
                let unit = slot.unit(req.gfn, log.mode.granularity);
                log.mark(unit);
            }
        }
        Ok(Fault::Mapped {
            level,
            writable: req.writable,
        })
    }

    /// A new shadow page for `(gfn, role)` from the vCPU's table cache, zeroed, hashed.
    fn new_page(
        &self,
        st: &mut State,
        caches: &mut FaultCaches,
        gfn: Gfn,
        role: super::Role,
    ) -> Result<u32, FaultError> {
        if st.pages.used() >= st.limit {
            return Err(FaultError::PageLimit);
        }
        let table = caches
            .tables
            .alloc_table_to_fill(role.level())
            .ok_or(FaultError::OutOfTables)?;
        // A table that is not one of this MMU's frames, or is a live page, never reaches
        // here (the caches are bound to this MMU); check anyway before writing to it.
        let id = st.pages.id_of(table).ok_or(FaultError::Corrupt)?;
        if st.pages.get(id).is_none_or(|sp| sp.live) {
            return Err(FaultError::Corrupt);
        }
        let entries = self.table(table).ok_or(FaultError::Corrupt)?;
        for entry in entries {
            entry.store(0, Ordering::Relaxed);
        }
        if !st.pages.insert(id, gfn, role, false) {
            return Err(FaultError::Corrupt);
        }
        st.stats.pages_created += 1;
        Ok(id)
    }
}

/// What the slow path decided to map.
#[derive(Clone, Copy, Debug)]
struct MapReq {
    as_id: u8,
    slot: usize,
    /// First gfn of the leaf.
    gfn: u64,
    /// First host frame of the leaf.
    pfn: u64,
    level: Level,
    writable: bool,
    host_writable: bool,
    write: bool,
}
