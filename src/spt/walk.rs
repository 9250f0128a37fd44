//! The page-table walker every operation is built on (KVM arm64 `kvm_pgtable_walk`,
//! aarch64-paging `walk_range` / `modify_range`).
//!
//! A walk visits, in address order, every entry whose range intersects `[start, end)`:
//! - entries that are not tables (leaves and non-present entries) with
//!   [`WalkFlags::LEAF`];
//! - table entries before their subtree with [`WalkFlags::TABLE_PRE`] and after it with
//!   [`WalkFlags::TABLE_POST`].
//!
//! The visitor gets a [`VisitCtx`] (address, level, the entry's value, its slot) and the
//! [`Tables`] of the walk, and answers with an [`Action`] or its own error. After a LEAF or
//! TABLE_PRE visit the walker reads the entry again: if the visitor installed a table
//! (replacing a non-present entry or a huge leaf), the walker descends into it, which is
//! how `map` builds tables and `split` splits recursively; if it replaced a table with a
//! leaf, the walker does not descend.
//!
//! With [`WalkFlags::SHARED`] (arm64 `KVM_PGTABLE_WALK_SHARED`, for use under a read lock)
//! [`VisitCtx::set`] is a compare-exchange against the value the visitor saw; a visitor
//! whose exchange fails sees the current value and decides again (KVM's
//! `tdp_mmu_set_spte_atomic`, arm64 `stage2_try_set_pte`).
//!
//! A walk starts at any table ([`Subtree`]: table, level, base address), not only at a
//! root, and every visited entry has an [`EntryRef`]: the handle an rmap stores (KVM stores
//! `u64 *sptep`), from which a [`VisitCtx`] can be rebuilt later to act on the entry with
//! the same rules, without a walk from a root.

use core::fmt;
use core::marker::PhantomData;

use super::flush::FlushGather;
use super::format::PteFormat;
use super::memory::{ENTRIES, Table, TableMapping, TableMemory, Tables, table_ref};
use crate::addr::{Address, Hpa, Level, PAGE_SIZE};
use crate::sync::{AtomicU64, Ordering};

bitflags::bitflags! {
    /// Which entries a walk visits (KVM `KVM_PGTABLE_WALK_LEAF` / `_TABLE_PRE` /
    /// `_TABLE_POST`).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct WalkFlags: u8 {
        /// Entries that are not tables: leaves and non-present entries.
        const LEAF = 1;
        /// Table entries, before their subtree is walked.
        const TABLE_PRE = 1 << 1;
        /// Table entries, after their subtree was walked.
        const TABLE_POST = 1 << 2;
        /// Shared mode: the caller holds the MMU lock for read and other walkers may
        /// change the tree at once, so [`VisitCtx::set`] is a compare-exchange (arm64
        /// `KVM_PGTABLE_WALK_SHARED`). Operations that free tables (`unmap`, `collapse`,
        /// `destroy`) take no mode: they are exclusive.
        const SHARED = 1 << 3;
    }
}

/// Which of the three visits this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VisitKind {
    /// A leaf or a non-present entry.
    Leaf,
    /// A table entry before its subtree.
    TablePre,
    /// A table entry after its subtree.
    TablePost,
}

/// What the walker does after a visit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[must_use]
pub enum Action {
    /// Go on: descend into the entry if it is (now) a table, then to the next entry.
    Continue,
    /// Do not descend into this entry (nor visit it with TABLE_POST); go to the next entry.
    SkipSubtree,
    /// End the walk successfully.
    Stop,
}

/// Why a walk ended early.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum WalkError<E> {
    /// The range reaches beyond the format's input address space.
    OutOfRange,
    /// A table entry points to an address the table memory does not hold.
    BadTable(Hpa),
    /// The visitor's own error.
    Visitor(E),
}

impl<E: fmt::Display> fmt::Display for WalkError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::OutOfRange => f.write_str("range beyond the format's input address space"),
            Self::BadTable(pa) => write!(f, "table entry points outside table memory ({pa})"),
            Self::Visitor(e) => e.fmt(f),
        }
    }
}

impl<E: fmt::Debug + fmt::Display> core::error::Error for WalkError<E> {}

/// One visit: the entry, where it is, and the walk it belongs to (KVM
/// `struct kvm_pgtable_visit_ctx`).
pub struct VisitCtx<'t, F: PteFormat> {
    slot: &'t AtomicU64,
    /// The table holding the entry; the index comes from the slot's address (tables are
    /// 4 KiB aligned where they are mapped, entries 8 bytes), so the walk carries no more
    /// than this. Loom's atomics are larger: under loom the index is kept.
    table: Hpa,
    #[cfg(loom)]
    index: usize,
    old: u64,
    addr: u64,
    level: Level,
    start: u64,
    end: u64,
    shared: bool,
    _format: PhantomData<F>,
}

impl<'t, F: PteFormat> VisitCtx<'t, F> {
    /// The first input address the entry maps (aligned to the entry's size).
    #[inline]
    pub fn addr(&self) -> F::In {
        in_addr::<F>(self.addr)
    }

    /// [`addr`](Self::addr) as a raw number.
    #[inline]
    pub fn raw_addr(&self) -> u64 {
        self.addr
    }

    /// The handle of the entry: its table and index (what an rmap stores).
    #[inline]
    pub fn entry(&self) -> EntryRef {
        #[cfg(not(loom))]
        let index = (core::ptr::from_ref(self.slot).addr() / 8) % ENTRIES;
        #[cfg(loom)]
        let index = self.index;
        EntryRef(self.table.get() | index as u64)
    }

    /// The level of the table holding the entry.
    #[inline]
    pub fn level(&self) -> Level {
        self.level
    }

    /// The bytes of input address the entry maps.
    #[inline]
    pub fn size(&self) -> u64 {
        self.level.page_size()
    }

    /// The entry's value as the walker (or the last [`set`](Self::set)) saw it.
    #[inline]
    pub fn old(&self) -> u64 {
        self.old
    }

    /// The entry's slot in its table, for updates [`set`](Self::set) does not cover (an
    /// exchange that returns the accessed/dirty bits hardware set, say).
    #[inline]
    pub fn slot(&self) -> &'t AtomicU64 {
        self.slot
    }

    /// The start and end of the walk's range, as raw input addresses.
    #[inline]
    pub fn walk_range(&self) -> (u64, u64) {
        (self.start, self.end)
    }

    /// Whether the entry's whole range lies inside the walk's range.
    #[inline]
    pub fn covered(&self) -> bool {
        self.addr >= self.start && self.addr + self.size() <= self.end
    }

    /// Whether the entry's whole range lies inside `[start, end)`.
    #[inline]
    pub(crate) fn covered_by(&self, start: u64, end: u64) -> bool {
        self.addr >= start && self.addr + self.size() <= end
    }

    /// Whether this walk is in shared mode (entries change by compare-exchange).
    #[inline]
    pub fn is_shared(&self) -> bool {
        self.shared
    }

    /// Adds the entry's range, with its page size, to a TLB flush gather: for a leaf
    /// that was changed or cleared.
    #[inline]
    pub fn gather<const N: usize>(&self, gather: &mut FlushGather<N>) {
        gather.add_raw(self.addr, self.size(), self.level);
    }

    /// Adds the entry's range to a TLB flush gather for a table entry that was cleared
    /// ([`FlushGather::add_table_raw`]).
    #[inline]
    pub fn gather_table<const N: usize>(&self, gather: &mut FlushGather<N>) {
        gather.add_table_raw(self.addr, self.size(), self.level);
    }

    /// Reads the entry again.
    #[inline]
    pub fn reload(&mut self) -> u64 {
        self.old = self.slot.load(Ordering::Acquire);
        self.old
    }

    /// Replaces the entry with `new`. In exclusive mode this is a store and always
    /// succeeds. In shared mode it is a compare-exchange from [`old`](Self::old): on
    /// failure it returns `false` and `old` becomes the current value. Either way a
    /// successful set makes `new` the value of `old`. The store has release ordering, so a
    /// table filled before it is installed is seen filled by every walker that reads it.
    #[inline]
    #[must_use = "in shared mode the update may have lost a race"]
    pub fn set(&mut self, new: u64) -> bool {
        if self.shared {
            match self
                .slot
                .compare_exchange(self.old, new, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    self.old = new;
                    true
                }
                Err(current) => {
                    self.old = current;
                    false
                }
            }
        } else {
            self.slot.store(new, Ordering::Release);
            self.old = new;
            true
        }
    }
}

impl<F: PteFormat> fmt::Debug for VisitCtx<'_, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VisitCtx")
            .field("entry", &self.entry())
            .field("addr", &format_args!("{:#x}", self.addr))
            .field("level", &self.level.get())
            .field("old", &format_args!("{:#x}", self.old))
            .field("shared", &self.shared)
            .finish()
    }
}

/// The callback of a walk (KVM `struct kvm_pgtable_walker`'s `cb`). Implemented by every
/// operation of this module and by any `FnMut` with the same signature.
pub trait Visitor<F: PteFormat, M: TableMemory + ?Sized> {
    /// The visitor's own error; it ends the walk as [`WalkError::Visitor`].
    type Error;

    /// Visits one entry.
    fn visit(
        &mut self,
        kind: VisitKind,
        ctx: &mut VisitCtx<'_, F>,
        tables: &mut Tables<'_, M>,
    ) -> Result<Action, Self::Error>;
}

impl<F, M, E, C> Visitor<F, M> for C
where
    F: PteFormat,
    M: TableMemory + ?Sized,
    C: FnMut(VisitKind, &mut VisitCtx<'_, F>, &mut Tables<'_, M>) -> Result<Action, E>,
{
    type Error = E;

    #[inline]
    fn visit(
        &mut self,
        kind: VisitKind,
        ctx: &mut VisitCtx<'_, F>,
        tables: &mut Tables<'_, M>,
    ) -> Result<Action, E> {
        self(kind, ctx, tables)
    }
}

/// The input address of a raw value the walker produced (always inside the format's input
/// space, so the conversion does not fail).
#[inline]
pub(crate) fn in_addr<F: PteFormat>(raw: u64) -> F::In {
    F::In::from_raw(raw).unwrap_or(F::In::ZERO)
}

/// A handle naming one entry of one table: the table's physical address and the entry's
/// index, in 8 bytes (KVM's `u64 *sptep`; the level and address come from the table's
/// header, KVM's `sptep_to_sp`). What an rmap stores.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EntryRef(u64);

static_assertions::assert_eq_size!(EntryRef, u64);

/// Why an [`EntryRef`] could not be acted on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EntryError {
    /// The table is not in the table memory.
    BadTable,
    /// The address is not aligned to the level's page size, or is outside the format's
    /// input addresses, or the level is above the format's root.
    BadAddress,
}

impl fmt::Display for EntryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::BadTable => "entry handle names a table outside table memory",
            Self::BadAddress => "address or level does not fit the entry",
        })
    }
}

impl core::error::Error for EntryError {}

impl EntryRef {
    /// The entry `index` (below 512) of the table at `table` (4 KiB aligned).
    pub const fn new(table: Hpa, index: usize) -> Option<Self> {
        if table.get() % PAGE_SIZE != 0 || index >= ENTRIES {
            return None;
        }
        Some(Self(table.get() | index as u64))
    }

    /// `table | index` for a table known to be 4 KiB aligned and an index below 512 (the
    /// caller checked both; the index is masked anyway).
    #[inline]
    pub(crate) const fn from_parts(table: Hpa, index: usize) -> Self {
        Self(table.get() | (index as u64 & (ENTRIES as u64 - 1)))
    }

    /// The table that holds the entry.
    #[inline]
    pub fn table(self) -> Hpa {
        crate::spt::hpa(self.0 & !(PAGE_SIZE - 1))
    }

    /// The entry's index in its table.
    #[inline]
    pub const fn index(self) -> usize {
        (self.0 & (ENTRIES as u64 - 1)) as usize
    }

    /// The entry's current value, if its table is in `mem`.
    #[inline]
    pub fn load<M: TableMapping + ?Sized>(self, mem: &M) -> Option<u64> {
        Some(table_ref(mem, self.table())?[self.index()].load(Ordering::Acquire))
    }

    /// A visit context for the entry, to act on it later with the rules of a visit
    /// ([`VisitCtx::set`], compare-exchange in shared mode, [`VisitCtx::gather`]) without a
    /// walk: `addr` is the input address the entry maps and `level` the level of its table
    /// (both from the table's header). Only [`WalkFlags::SHARED`] of `flags` matters.
    pub fn ctx<'m, F: PteFormat, M: TableMapping + ?Sized>(
        self,
        mem: &'m M,
        addr: F::In,
        level: Level,
        flags: WalkFlags,
    ) -> Result<VisitCtx<'m, F>, EntryError> {
        let raw = addr.raw();
        let size = level.page_size();
        if level > F::ROOT_LEVEL
            || raw % size != 0
            || raw
                .checked_add(size)
                .is_none_or(|end| end > 1u64 << F::INPUT_BITS)
        {
            return Err(EntryError::BadAddress);
        }
        let table = table_ref(mem, self.table()).ok_or(EntryError::BadTable)?;
        let slot = &table[self.index()];
        Ok(VisitCtx {
            slot,
            table: self.table(),
            #[cfg(loom)]
            index: self.index(),
            old: slot.load(Ordering::Acquire),
            addr: raw,
            level,
            start: raw,
            end: raw + size,
            shared: flags.contains(WalkFlags::SHARED),
            _format: PhantomData,
        })
    }
}

impl fmt::Debug for EntryRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EntryRef({:#x}[{}])", self.table().get(), self.index())
    }
}

/// A subtree to walk: a table, its level, and the first input address it maps (arm64
/// walks from any `kvm_pgtable` root; KVM's shadow MMU from any `kvm_mmu_page`). A
/// [`PageTable`](super::PageTable) is the subtree of its root at address 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Subtree {
    table: Hpa,
    level: Level,
    base: u64,
}

impl Subtree {
    /// The subtree under `table` at `level`, mapping input addresses from `base` (aligned
    /// to the span of one table at that level) for `F`.
    pub fn new<F: PteFormat>(table: Hpa, level: Level, base: F::In) -> Option<Self> {
        let base = base.raw();
        let span = span(level);
        if level > F::ROOT_LEVEL || base % span != 0 || base >= 1u64 << F::INPUT_BITS {
            return None;
        }
        Some(Self { table, level, base })
    }

    /// The subtree of a root table.
    pub(crate) const fn root<F: PteFormat>(table: Hpa) -> Self {
        Self {
            table,
            level: F::ROOT_LEVEL,
            base: 0,
        }
    }

    /// The table at the top of the subtree.
    pub fn table(&self) -> Hpa {
        self.table
    }

    /// The level of that table.
    pub fn level(&self) -> Level {
        self.level
    }

    /// The raw input addresses the subtree maps, `(start, end)`.
    pub fn range(&self) -> (u64, u64) {
        (self.base, self.base.saturating_add(span(self.level)))
    }

    /// Walks the entries of the subtree that intersect `[start, start + len)` (KVM
    /// `kvm_pgtable_walk`). `flags` says which entries are visited and whether the walk is
    /// shared.
    pub fn walk<F, M, V>(
        &self,
        mem: &mut M,
        start: F::In,
        len: u64,
        flags: WalkFlags,
        visitor: &mut V,
    ) -> Result<(), WalkError<V::Error>>
    where
        F: PteFormat,
        M: TableMemory + ?Sized,
        V: Visitor<F, M>,
    {
        let start = start.raw();
        let end = start.checked_add(len).ok_or(WalkError::OutOfRange)?;
        walk::<F, M, V>(*self, &mut Tables::new(mem), start, end, flags, visitor)
    }
}

/// Bytes of input address one table at `level` maps.
#[inline]
const fn span(level: Level) -> u64 {
    1u64 << (level.shift() + 9)
}

/// The state of one walk.
struct Walker<'w, 'm, F: PteFormat, M: TableMemory + ?Sized, V: Visitor<F, M>> {
    tables: &'w mut Tables<'m, M>,
    visitor: &'w mut V,
    flags: WalkFlags,
    start: u64,
    end: u64,
    /// The next address to visit.
    addr: u64,
    shared: bool,
    /// Whether to check the level of each table before descending (see `table`).
    check_levels: bool,
    _format: PhantomData<F>,
}

/// Walks `[start, end)` of `subtree` (KVM `kvm_pgtable_walk`). The range must lie inside
/// the subtree and the format's input addresses. Always inlined, so a walk from a root
/// (whose level is the format's constant) keeps only the loop nest of that level.
#[inline]
pub(crate) fn walk<F, M, V>(
    subtree: Subtree,
    tables: &mut Tables<'_, M>,
    start: u64,
    end: u64,
    flags: WalkFlags,
    visitor: &mut V,
) -> Result<(), WalkError<V::Error>>
where
    F: PteFormat,
    M: TableMemory + ?Sized,
    V: Visitor<F, M>,
{
    let (lo, hi) = subtree.range();
    if end > 1u64 << F::INPUT_BITS || start > end || start < lo || end > hi {
        return Err(WalkError::OutOfRange);
    }
    if start == end {
        return Ok(());
    }
    let mut walker = Walker::<F, M, V> {
        tables,
        visitor,
        flags,
        start,
        end,
        addr: start,
        shared: flags.contains(WalkFlags::SHARED),
        // A walk of at most one page follows one path of at most five tables: a cycle
        // cannot make it revisit anything, so it skips the checks (translate's hot path).
        check_levels: end - start > PAGE_SIZE,
        _format: PhantomData,
    };
    walker.run(subtree)
}

/// A table level as a type, so each level of the walk is its own function and the whole
/// walk inlines into one nest of loops with constant shifts (the recursion of
/// `__kvm_pgtable_walk`, unrolled by the compiler).
trait Depth {
    const LEVEL: Level;
    /// The level below (level 1 names itself; it never descends).
    type Below: Depth;
}

macro_rules! depth {
    ($($name:ident = $level:expr, below $below:ident;)*) => {
        $(
            struct $name;
            impl Depth for $name {
                const LEVEL: Level = $level;
                type Below = $below;
            }
        )*
    };
}

depth! {
    D1 = Level::L1, below D1;
    D2 = Level::L2, below D1;
    D3 = Level::L3, below D2;
    D4 = Level::L4, below D3;
    D5 = Level::L5, below D4;
}

impl<'m, F: PteFormat, M: TableMemory + ?Sized, V: Visitor<F, M>> Walker<'_, 'm, F, M, V> {
    /// Walks the subtree from `self.addr` to `self.end`.
    #[inline]
    fn run(&mut self, subtree: Subtree) -> Result<(), WalkError<V::Error>> {
        let entries = if self.check_levels {
            self.tables.table_at(subtree.table, subtree.level)
        } else {
            self.tables.table(subtree.table)
        };
        let Some(entries) = entries else {
            return Err(WalkError::BadTable(subtree.table));
        };
        let table = subtree.table;
        if subtree.level == F::ROOT_LEVEL {
            // Dispatched on the format's constant: one loop nest, with the visitor inlined
            // into every level of it.
            let stopped = match F::ROOT_LEVEL.get() {
                5 => self.table::<D5>(table, entries),
                4 => self.table::<D4>(table, entries),
                3 => self.table::<D3>(table, entries),
                2 => self.table::<D2>(table, entries),
                _ => self.table::<D1>(table, entries),
            };
            return stopped.map(|_| ());
        }
        self.run_below_root(table, subtree.level, entries)
    }

    /// A walk from a table below the root: the nests of every lower level, out of line so
    /// they do not crowd the root walk's.
    #[inline(never)]
    fn run_below_root(
        &mut self,
        table: Hpa,
        level: Level,
        entries: &'m Table,
    ) -> Result<(), WalkError<V::Error>> {
        let stopped = match level.get() {
            4 => self.table::<D4>(table, entries),
            3 => self.table::<D3>(table, entries),
            2 => self.table::<D2>(table, entries),
            _ => self.table::<D1>(table, entries),
        };
        stopped.map(|_| ())
    }

    /// Walks the entries of one table at level `D` from `self.addr` on; `Ok(true)` when the
    /// walk stops.
    #[inline(always)]
    fn table<D: Depth>(
        &mut self,
        table: Hpa,
        entries: &'m Table,
    ) -> Result<bool, WalkError<V::Error>> {
        let level = D::LEVEL;
        let shift = level.shift();
        let size = 1u64 << shift;
        let mut index = ((self.addr >> shift) as usize) % ENTRIES;
        while index < ENTRIES && self.addr < self.end {
            let slot = &entries[index];
            let addr = self.addr & !(size - 1);
            let mut ctx = VisitCtx::<F> {
                slot,
                table,
                #[cfg(loom)]
                index,
                old: slot.load(Ordering::Acquire),
                addr,
                level,
                start: self.start,
                end: self.end,
                shared: self.shared,
                _format: PhantomData,
            };
            let mut is_table = D::LEVEL.get() > 1 && F::is_table(ctx.old, level);
            let wanted = if is_table {
                WalkFlags::TABLE_PRE
            } else {
                WalkFlags::LEAF
            };
            if self.flags.contains(wanted) {
                let kind = if is_table {
                    VisitKind::TablePre
                } else {
                    VisitKind::Leaf
                };
                let action = self
                    .visitor
                    .visit(kind, &mut ctx, self.tables)
                    .map_err(WalkError::Visitor)?;
                match action {
                    Action::Stop => return Ok(true),
                    Action::SkipSubtree => is_table = false,
                    // The visitor may have installed or removed a table: read it again.
                    Action::Continue => {
                        is_table = D::LEVEL.get() > 1 && F::is_table(ctx.reload(), level);
                    }
                }
            }
            if is_table && D::LEVEL.get() > 1 {
                let child = F::table_addr(ctx.old);
                // A table of the wrong level (its own table, an ancestor, a freed frame) is
                // a corrupt entry, not a subtree: it would make the walk revisit tables.
                // Only tables that hold tables can: a wrong table read as level 1 yields at
                // most 512 wrong leaves, so that (cold, per-leaf-table) check is skipped, as
                // are the checks of a walk that follows one path.
                let below = <D::Below as Depth>::LEVEL;
                let child_entries = if below.get() > 1 && self.check_levels {
                    self.tables.table_at(child, below)
                } else {
                    self.tables.table(child)
                };
                let Some(child_entries) = child_entries else {
                    return Err(WalkError::BadTable(child));
                };
                if self.table::<D::Below>(child, child_entries)? {
                    return Ok(true);
                }
                if self.flags.contains(WalkFlags::TABLE_POST) {
                    ctx.reload();
                    let action = self
                        .visitor
                        .visit(VisitKind::TablePost, &mut ctx, self.tables)
                        .map_err(WalkError::Visitor)?;
                    if action == Action::Stop {
                        return Ok(true);
                    }
                }
            }
            self.addr = addr + size;
            index += 1;
        }
        Ok(false)
    }
}
