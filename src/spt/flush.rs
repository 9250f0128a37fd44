//! TLB flushing: the embedder's [`TlbFlush`], the bounded [`FlushGather`] that feeds it,
//! and the `#[must_use]` [`PendingFlush`] token every operation that removes or restricts a
//! translation returns (`unmap`, `protect`, `collapse`).
//!
//! An operation gathers the ranges it changed, each with the page size of the entries it
//! changed there (asterinas `TlbFlusher`, Linux `mmu_gather`), so a flusher can invalidate
//! a 1 GiB leaf with one operation instead of 262,144 4 KiB ones. A range already covered
//! by a gathered range is not added twice (its smaller page size is kept). Past
//! [`FLUSH_ALL_PAGES`] invalidations, or [`GATHER_RANGES`] ranges, the gather degrades to
//! "flush everything" (Linux's `tlb_single_page_flush_ceiling`, KVM's fallback to
//! `kvm_flush_remote_tlbs`).
//!
//! Tables an operation unlinks (emptied by `unmap`, replaced by a huge leaf in `collapse`)
//! may still be cached by hardware page walkers until the flush, so they are freed only
//! by [`PendingFlush::flush`], after the TLB flush (asterinas's `#[must_use]` page-table
//! fragments, KVM's RCU-deferred `tdp_mmu_free_sp`). They wait in the token itself, out of
//! band: nothing is chained through the tables, whose entries a stale walker may still
//! read and safe code may still write. The token holds at most [`DEFER_TABLES`]; an
//! operation that would unlink more stops unlinking (unmap leaves the emptied table
//! linked, collapse leaves the rest uncollapsed) and says so with
//! [`PendingFlush::is_incomplete`]: flush, and run it again.

use core::fmt;

use arrayvec::ArrayVec;

use super::memory::{FreeError, TableAlloc};
use crate::addr::{Hpa, Level};

/// Ranges a [`FlushGather`] of a [`PendingFlush`] holds before it degrades to a full flush.
pub const GATHER_RANGES: usize = 16;

/// Page invalidations a [`FlushGather`] allows before it degrades to a full flush (Linux
/// `tlb_single_page_flush_ceiling` is 33; a flusher that uses ranges can afford more).
pub const FLUSH_ALL_PAGES: u64 = 64;

/// Tables a [`PendingFlush`] can hold for freeing after the flush.
pub const DEFER_TABLES: usize = 64;

/// One range of input addresses to invalidate, and the size of the pages mapped there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlushRange {
    /// The first input address (a [`Va`](crate::Va) or [`Gpa`](crate::Gpa), raw).
    pub start: u64,
    /// Bytes from `start`.
    pub len: u64,
    /// The smallest page size whose translations the range may hold: one invalidation per
    /// page of this size the range touches covers it (INVLPG of any address of a huge page
    /// drops it); [`pages`](Self::pages) counts them.
    pub level: Level,
}

impl FlushRange {
    /// The invalidations a flusher that works page by page needs: the pages of `level`
    /// the range touches, a page it starts or ends inside included.
    pub fn pages(&self) -> u64 {
        let size = self.level.page_size();
        let first = self.start & !(size - 1);
        (self.end() - first).div_ceil(size)
    }

    fn end(&self) -> u64 {
        self.start.saturating_add(self.len)
    }
}

/// Invalidates cached translations (KVM `kvm_flush_remote_tlbs_range` and
/// `kvm_flush_remote_tlbs`; `INVLPG`, `INVEPT`, `TLBI`). Implemented by the embedder.
pub trait TlbFlush {
    /// Invalidates every translation of the range, including paging-structure caches.
    fn flush_range(&mut self, range: FlushRange);

    /// Invalidates every translation of the page table.
    fn flush_all(&mut self);
}

/// Up to `N` address ranges waiting for a TLB flush, deduplicated, each with its page
/// size; past `N` ranges or [`FLUSH_ALL_PAGES`] invalidations it turns into "flush
/// everything" (asterinas `TlbFlusher`'s `FLUSH_ALL_RANGE_THRESHOLD`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlushGather<const N: usize> {
    ranges: ArrayVec<FlushRange, N>,
    pages: u64,
    all: bool,
}

impl<const N: usize> FlushGather<N> {
    /// An empty gather.
    pub const fn new() -> Self {
        Self {
            ranges: ArrayVec::new_const(),
            pages: 0,
            all: false,
        }
    }

    /// Adds `[start, start + len)` (raw input addresses) holding pages of `level`. A range
    /// that runs past the end of the `u64` space is no range a flush can name: the gather
    /// turns into "flush everything", which covers it.
    #[inline]
    pub fn add_raw(&mut self, start: u64, len: u64, level: Level) {
        if self.all || len == 0 {
            return;
        }
        if start.checked_add(len).is_none() {
            return self.degrade();
        }
        let new = FlushRange { start, len, level };
        let end = new.end();
        // Already covered: keep the smaller page size of the two.
        if let Some(r) = self
            .ranges
            .iter_mut()
            .rev()
            .find(|r| r.start <= start && end <= r.end())
        {
            if level < r.level {
                self.pages -= r.pages();
                r.level = level;
                self.pages += r.pages();
            }
            return self.check_pages();
        }
        // Extends the last range with the same page size.
        if let Some(last) = self.ranges.last_mut() {
            if last.end() == start && last.level == level {
                // What the merged range asks for, not the two parts' sum: two pieces of
                // one huge page are one invalidation.
                self.pages -= last.pages();
                last.len += len;
                self.pages += last.pages();
                return self.check_pages();
            }
        }
        if self.ranges.try_push(new).is_err() {
            return self.degrade();
        }
        self.pages += new.pages();
        self.check_pages();
    }

    /// Adds the range of a table entry that was cleared or replaced (at `level`): only
    /// paging-structure caches may still hold it, and on every architecture an
    /// invalidation of any address under the entry drops those (x86 INVLPG, arm64 TLBI
    /// VA). So it costs nothing when a gathered range already intersects it (the leaves the
    /// same operation cleared under it), and one invalidation otherwise.
    #[inline]
    pub fn add_table_raw(&mut self, start: u64, len: u64, level: Level) {
        let end = start.saturating_add(len);
        if self.all || self.ranges.iter().any(|r| r.start < end && start < r.end()) {
            return;
        }
        self.add_raw(start, len, level);
    }

    fn check_pages(&mut self) {
        if self.pages > FLUSH_ALL_PAGES {
            self.degrade();
        }
    }

    /// Turns the gather into "flush everything" (for a change whose every address is not
    /// known: leaves of a table shared by several parents).
    pub(crate) fn flush_everything(&mut self) {
        self.degrade();
    }

    fn degrade(&mut self) {
        self.ranges.clear();
        self.pages = 0;
        self.all = true;
    }

    /// Adds everything `other` holds.
    pub fn merge<const K: usize>(&mut self, other: &FlushGather<K>) {
        if other.all {
            return self.degrade();
        }
        for r in &other.ranges {
            self.add_raw(r.start, r.len, r.level);
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

    /// The gathered ranges (empty after an overflow).
    pub fn ranges(&self) -> &[FlushRange] {
        &self.ranges
    }

    /// Page invalidations the ranges ask for.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Flushes what was gathered and empties the gather.
    pub fn flush<T: TlbFlush + ?Sized>(&mut self, tlb: &mut T) {
        if self.all {
            tlb.flush_all();
        } else {
            for &r in &self.ranges {
                tlb.flush_range(r);
            }
        }
        *self = Self::new();
    }
}

/// What an operation left to do after it changed translations: flush these ranges from
/// the TLB, then free these tables (x86_64 `MapperFlush`, asterinas's must-use fragments).
/// Dropping it without [`flush`](Self::flush) leaves stale translations possible and leaks
/// the tables.
#[derive(Default, PartialEq, Eq)]
#[must_use = "flush the TLB (and free unlinked tables) with `PendingFlush::flush`"]
pub struct PendingFlush {
    pub(crate) gather: FlushGather<GATHER_RANGES>,
    tables: ArrayVec<Hpa, DEFER_TABLES>,
    incomplete: bool,
}

impl fmt::Debug for PendingFlush {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PendingFlush")
            .field("gather", &self.gather)
            .field("tables", &self.tables.len())
            .field("incomplete", &self.incomplete)
            .finish()
    }
}

impl PendingFlush {
    /// Nothing to flush, nothing to free.
    pub const fn new() -> Self {
        Self {
            gather: FlushGather::new(),
            tables: ArrayVec::new_const(),
            incomplete: false,
        }
    }

    /// The ranges that need flushing.
    pub fn gather(&self) -> &FlushGather<GATHER_RANGES> {
        &self.gather
    }

    /// Tables that will be freed after the flush.
    pub fn tables_to_free(&self) -> usize {
        self.tables.len()
    }

    /// Whether the operation stopped unlinking tables (or collapsing) because this token
    /// was full: flush it and run the operation again to finish.
    pub fn is_incomplete(&self) -> bool {
        self.incomplete
    }

    /// Whether there is nothing to flush and nothing to free.
    pub fn is_empty(&self) -> bool {
        self.gather.is_empty() && self.tables.is_empty()
    }

    /// Whether another table fits.
    #[inline]
    pub(crate) fn has_room(&self) -> bool {
        !self.tables.is_full()
    }

    /// Keeps `table` for freeing after the flush; `false` (and the token is marked
    /// incomplete) when full.
    #[inline]
    pub(crate) fn defer(&mut self, table: Hpa) -> bool {
        if self.tables.try_push(table).is_err() {
            self.incomplete = true;
            return false;
        }
        true
    }

    /// Marks the operation as stopped early for lack of room.
    #[inline]
    pub(crate) fn set_incomplete(&mut self) {
        self.incomplete = true;
    }

    /// Flushes the TLB, then frees the unlinked tables into `mem`. Every table is offered;
    /// the first refusal (a table the memory says is not allocated or still linked: the
    /// tree was changed behind the operation's back) is returned.
    pub fn flush<T: TlbFlush + ?Sized, M: TableAlloc + ?Sized>(
        mut self,
        tlb: &mut T,
        mem: &mut M,
    ) -> Result<(), FreeError> {
        self.gather.flush(tlb);
        let mut result = Ok(());
        for table in self.tables.drain(..) {
            if let Err(e) = mem.free_table(table) {
                result = result.and(Err(e));
            }
        }
        result
    }

    /// Moves another operation's pending work into this one, so one flush covers both,
    /// and leaves `other` empty. Returns `false`, changing neither, if `other`'s tables do
    /// not fit.
    pub fn merge(&mut self, other: &mut PendingFlush) -> bool {
        if self.tables.remaining_capacity() < other.tables.len() {
            return false;
        }
        self.gather.merge(&other.gather);
        self.tables.extend(other.tables.drain(..));
        self.incomplete |= other.incomplete;
        *other = PendingFlush::new();
        true
    }
}
