//! TLB flushing: the embedder's [`TlbFlush`], the bounded [`FlushGather`] that feeds it,
//! and the `#[must_use]` [`PendingFlush`] token of `unmap`, `protect` and `collapse`.
//!
//! An operation that removes or restricts a translation gathers the ranges it changed
//! (asterinas `TlbFlusher`, Linux `mmu_gather`). The gather holds at most `N` ranges,
//! merging adjacent ones; past that it degrades to "flush everything" (Linux's
//! `tlb_single_page_flush_ceiling`, KVM's fallback to `kvm_flush_remote_tlbs`).
//!
//! Tables an operation unlinks (emptied by `unmap`, replaced by a huge leaf in `collapse`)
//! may still be cached by hardware page walkers until the flush, so they are freed only
//! by [`PendingFlush::flush`], after the TLB flush (asterinas's `#[must_use]` page-table
//! fragments, KVM's RCU-deferred `tdp_mmu_free_sp`). They are chained through entry 0 of
//! each table; a link is a 4 KiB aligned address, which no format treats as present, so a
//! stale walk through such a table finds nothing.

use arrayvec::ArrayVec;

use super::Va;
use super::memory::{TableMemory, Tables};
use crate::addr::Hpa;
use crate::sync::Ordering;

/// Ranges a [`PendingFlush`] gathers before it degrades to a full flush.
pub const GATHER_RANGES: usize = 16;

/// Invalidates cached translations (KVM `kvm_flush_remote_tlbs_range` and
/// `kvm_flush_remote_tlbs`; `INVLPG`, `INVEPT`, `TLBI`). Implemented by the embedder.
pub trait TlbFlush {
    /// Invalidates every translation of input addresses `[start, start + len)`,
    /// including paging-structure caches for that range.
    fn flush_range(&mut self, start: Va, len: u64);

    /// Invalidates every translation of the page table.
    fn flush_all(&mut self);
}

/// A [`TlbFlush`] that only counts, for tests and for page tables no hardware uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CountingFlush {
    /// `flush_range` calls.
    pub ranges: u64,
    /// Bytes passed to `flush_range`.
    pub bytes: u64,
    /// `flush_all` calls.
    pub all: u64,
}

impl TlbFlush for CountingFlush {
    fn flush_range(&mut self, _start: Va, len: u64) {
        self.ranges += 1;
        self.bytes += len;
    }

    fn flush_all(&mut self) {
        self.all += 1;
    }
}

/// Up to `N` address ranges waiting for a TLB flush; adding a range that neither fits nor
/// extends the last one turns the gather into "flush everything" (asterinas
/// `TlbFlusher`'s `FLUSH_ALL_RANGE_THRESHOLD`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlushGather<const N: usize> {
    ranges: ArrayVec<(u64, u64), N>,
    all: bool,
}

impl<const N: usize> FlushGather<N> {
    /// An empty gather.
    pub const fn new() -> Self {
        Self {
            ranges: ArrayVec::new_const(),
            all: false,
        }
    }

    /// Adds `[start, start + len)`.
    #[inline]
    pub fn add(&mut self, start: Va, len: u64) {
        if self.all || len == 0 {
            return;
        }
        let start = start.get();
        let end = start.saturating_add(len);
        if let Some(last) = self.ranges.last_mut() {
            if last.1 == start {
                last.1 = end;
                return;
            }
        }
        if self.ranges.try_push((start, end)).is_err() {
            self.ranges.clear();
            self.all = true;
        }
    }

    /// Adds everything `other` holds.
    pub fn merge<const K: usize>(&mut self, other: &FlushGather<K>) {
        if other.all {
            self.ranges.clear();
            self.all = true;
            return;
        }
        for &(start, end) in &other.ranges {
            self.add(Va(start), end - start);
        }
    }

    /// Whether nothing needs flushing.
    pub fn is_empty(&self) -> bool {
        !self.all && self.ranges.is_empty()
    }

    /// Whether the gather overflowed into a full flush.
    pub fn is_flush_all(&self) -> bool {
        self.all
    }

    /// The gathered ranges as `(start, len)` (empty after an overflow).
    pub fn ranges(&self) -> impl Iterator<Item = (Va, u64)> + '_ {
        self.ranges.iter().map(|&(s, e)| (Va(s), e - s))
    }

    /// Flushes what was gathered and empties the gather.
    pub fn flush<T: TlbFlush + ?Sized>(&mut self, tlb: &mut T) {
        if self.all {
            tlb.flush_all();
        } else {
            for &(start, end) in &self.ranges {
                tlb.flush_range(Va(start), end - start);
            }
        }
        self.ranges.clear();
        self.all = false;
    }
}

/// Tables unlinked from a page table, waiting for the TLB flush before they are freed:
/// a list through entry 0 of each table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct DeferredTables {
    head: Option<Hpa>,
    count: usize,
}

impl DeferredTables {
    /// Chains `table`, already unlinked and with every other entry clear.
    pub(crate) fn push<M: TableMemory + ?Sized>(&mut self, table: Hpa, tables: &Tables<'_, M>) {
        if let Some(entries) = tables.table(table) {
            let link = self.head.map_or(0, Hpa::get);
            entries[0].store(link, Ordering::Release);
            self.head = Some(table);
            self.count += 1;
        }
    }

    /// Frees every chained table.
    pub(crate) fn free_all<M: TableMemory + ?Sized>(&mut self, tables: &mut Tables<'_, M>) {
        let mut next = self.head.take();
        while self.count > 0 {
            let Some(table) = next else { break };
            next = tables
                .table(table)
                .map(|entries| super::hpa(entries[0].swap(0, Ordering::Relaxed)));
            tables.free(table);
            self.count -= 1;
        }
        self.count = 0;
    }
}

/// What an operation left to do after it changed translations: flush these ranges from
/// the TLB, then free these tables (x86_64 `MapperFlush`, asterinas's must-use fragments).
/// Dropping it without [`flush`](Self::flush) leaves stale translations possible and leaks
/// the tables.
#[derive(Debug, Default, PartialEq, Eq)]
#[must_use = "flush the TLB (and free unlinked tables) with `PendingFlush::flush`"]
pub struct PendingFlush {
    pub(crate) gather: FlushGather<GATHER_RANGES>,
    pub(crate) tables: DeferredTables,
}

impl PendingFlush {
    /// Nothing to flush, nothing to free.
    pub const fn new() -> Self {
        Self {
            gather: FlushGather::new(),
            tables: DeferredTables {
                head: None,
                count: 0,
            },
        }
    }

    /// The ranges that need flushing.
    pub fn gather(&self) -> &FlushGather<GATHER_RANGES> {
        &self.gather
    }

    /// Tables that will be freed after the flush.
    pub fn tables_to_free(&self) -> usize {
        self.tables.count
    }

    /// Whether there is nothing to flush and nothing to free.
    pub fn is_empty(&self) -> bool {
        self.gather.is_empty() && self.tables.count == 0
    }

    /// Flushes the TLB, then frees the unlinked tables into `mem`.
    pub fn flush<T: TlbFlush + ?Sized, M: TableMemory + ?Sized>(
        mut self,
        tlb: &mut T,
        mem: &mut M,
    ) {
        self.gather.flush(tlb);
        self.tables.free_all(&mut Tables::new(mem));
    }

    /// Adds another operation's pending work to this one, so one flush covers both.
    pub fn merge<M: TableMemory + ?Sized>(&mut self, mut other: PendingFlush, mem: &mut M) {
        self.gather.merge(&other.gather);
        let tables = Tables::new(mem);
        let mut next = other.tables.head.take();
        while other.tables.count > 0 {
            let Some(table) = next else { break };
            next = tables
                .table(table)
                .map(|entries| super::hpa(entries[0].load(Ordering::Relaxed)));
            self.tables.push(table, &tables);
            other.tables.count -= 1;
        }
    }
}
