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
//! In *shared* mode ([`PageTable::walk_shared`](super::PageTable::walk_shared), for use
//! under a read lock) [`VisitCtx::set`] is a compare-exchange against the value the visitor
//! saw; a visitor whose exchange fails sees the current value and decides again (KVM's
//! `tdp_mmu_set_spte_atomic`, arm64 `stage2_try_set_pte`).

use core::fmt;
use core::marker::PhantomData;

use super::Va;
use super::format::PteFormat;
use super::memory::{ENTRIES, TableMemory, Tables};
use crate::addr::{Hpa, Level};
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
    old: u64,
    addr: u64,
    level: Level,
    start: u64,
    end: u64,
    shared: bool,
    _format: PhantomData<F>,
}

impl<F: PteFormat> VisitCtx<'_, F> {
    /// The first input address the entry maps (aligned to the entry's size).
    #[inline]
    pub fn addr(&self) -> Va {
        Va(self.addr)
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

    /// The start and end of the walk's range.
    #[inline]
    pub fn walk_range(&self) -> (Va, u64) {
        (Va(self.start), self.end)
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
    _format: PhantomData<F>,
}

/// Walks `[start, end)` of the tree under `root` (KVM `kvm_pgtable_walk`). `end` is
/// checked against the format's input address space; `start < end` is the caller's.
#[inline]
pub(crate) fn walk<F, M, V>(
    root: Hpa,
    tables: &mut Tables<'_, M>,
    start: u64,
    end: u64,
    flags: WalkFlags,
    visitor: &mut V,
    shared: bool,
) -> Result<(), WalkError<V::Error>>
where
    F: PteFormat,
    M: TableMemory + ?Sized,
    V: Visitor<F, M>,
{
    if end > 1u64 << F::INPUT_BITS || start > end {
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
        shared,
        _format: PhantomData,
    };
    walker.table(root, F::ROOT_LEVEL).map(|_| ())
}

impl<F: PteFormat, M: TableMemory + ?Sized, V: Visitor<F, M>> Walker<'_, '_, F, M, V> {
    /// Walks the entries of one table from `self.addr` on; `Ok(true)` when the walk stops.
    fn table(&mut self, table: Hpa, level: Level) -> Result<bool, WalkError<V::Error>> {
        let Some(entries) = self.tables.table(table) else {
            return Err(WalkError::BadTable(table));
        };
        let shift = level.shift();
        let size = 1u64 << shift;
        let mut index = ((self.addr >> shift) as usize) % ENTRIES;
        while index < ENTRIES && self.addr < self.end {
            let slot = &entries[index];
            let addr = self.addr & !(size - 1);
            let mut ctx = VisitCtx::<F> {
                slot,
                old: slot.load(Ordering::Acquire),
                addr,
                level,
                start: self.start,
                end: self.end,
                shared: self.shared,
                _format: PhantomData,
            };
            let mut is_table = F::is_table(ctx.old, level);
            let kind = if is_table {
                WalkFlags::TABLE_PRE
            } else {
                WalkFlags::LEAF
            };
            let mut action = Action::Continue;
            if self.flags.contains(kind) {
                let kind = if is_table {
                    VisitKind::TablePre
                } else {
                    VisitKind::Leaf
                };
                action = self
                    .visitor
                    .visit(kind, &mut ctx, self.tables)
                    .map_err(WalkError::Visitor)?;
                // The visitor may have installed or removed a table: read the entry again.
                is_table = F::is_table(ctx.reload(), level);
            }
            match action {
                Action::Stop => return Ok(true),
                Action::SkipSubtree => is_table = false,
                Action::Continue => {}
            }
            if is_table {
                if let Some(child) = level.lower() {
                    if self.table(F::table_addr(ctx.old), child)? {
                        return Ok(true);
                    }
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
