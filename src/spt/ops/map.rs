//! `map`: install leaves for a range, building tables on the way (KVM `kvm_tdp_mmu_map`,
//! arm64 `kvm_pgtable_stage2_map`, x86_64 `Mapper::map_to`).

use super::check_range;
use crate::addr::{Address, Level, PHYS_ADDR_BITS};
use crate::spt::error::{MapError, flatten};
use crate::spt::format::PteFormat;
use crate::spt::memory::{TableMemory, Tables};
use crate::spt::walk::{Action, VisitCtx, VisitKind, Visitor, WalkFlags};
use crate::spt::{PageTable, hpa};

/// Which page sizes `map` may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MapSize {
    /// The largest the page table allows (its maximum leaf level) where the input and
    /// physical addresses are both aligned to it and the range covers it (KVM's
    /// `max_level` from the host mapping).
    Largest,
    /// Like `Largest`, but never above this level.
    AtMost(Level),
    /// Only this size; the addresses and the length must be aligned to it.
    Exactly(Level),
}

/// The visitor of `map` (and of its read-only pre-check when `check` is set).
struct MapVisitor {
    start: u64,
    pa: u64,
    flags: u64,
    /// Leaves go at levels `min..=max`.
    min: u8,
    max: u8,
    /// Whether the size is forced (`min == max`): a table at that level is in the way.
    exact: bool,
    /// The read-only pre-check: report conflicts, change nothing.
    check: bool,
}

impl<F: PteFormat, M: TableMemory + ?Sized> Visitor<F, M> for MapVisitor {
    type Error = MapError;

    #[inline]
    fn visit(
        &mut self,
        kind: VisitKind,
        ctx: &mut VisitCtx<'_, F>,
        tables: &mut Tables<'_, M>,
    ) -> Result<Action, MapError> {
        let level = ctx.level();
        if kind != VisitKind::Leaf {
            // A table: descend, unless the forced size needs this very entry.
            return if self.exact && level.get() == self.max {
                Err(MapError::TableInTheWay)
            } else {
                Ok(Action::Continue)
            };
        }
        if F::is_present(ctx.old()) {
            return Err(MapError::AlreadyMapped);
        }
        if self.check {
            return Ok(Action::Continue);
        }
        let l = level.get();
        if l <= self.max && l >= self.min && ctx.covered() {
            let pa = self.pa + (ctx.raw_addr() - self.start);
            if pa % level.page_size() == 0 {
                if ctx.set(F::leaf_entry(hpa(pa), level, self.flags)) {
                    return Ok(Action::SkipSubtree);
                }
                return raced::<F>(ctx);
            }
        }
        if l <= self.min {
            // Validation makes this unreachable: the range is aligned to the smallest size.
            return Err(MapError::Unaligned);
        }
        install_table(ctx, tables)
    }
}

/// Installs a new table where a leaf cannot go. Once per table, not per leaf: kept out of
/// line so the per-leaf path of the visitor stays small enough to inline into the walk.
#[inline(never)]
fn install_table<F: PteFormat, M: TableMemory + ?Sized>(
    ctx: &mut VisitCtx<'_, F>,
    tables: &mut Tables<'_, M>,
) -> Result<Action, MapError> {
    let child = super::child_level(ctx.level());
    let table = tables.alloc(child).ok_or(MapError::OutOfTables)?;
    if ctx.set(F::table_entry(table)) {
        tables.link(table, child);
        // The walker reads the entry again and descends into the new table.
        return Ok(Action::Continue);
    }
    // Never visible to anyone: give it back at once.
    let _ = tables.free(table);
    raced::<F>(ctx)
}

/// A shared-mode update lost its race: descend if the winner installed a table.
fn raced<F: PteFormat>(ctx: &VisitCtx<'_, F>) -> Result<Action, MapError> {
    if F::is_table(ctx.old(), ctx.level()) {
        Ok(Action::Continue)
    } else {
        Err(MapError::AlreadyMapped)
    }
}

impl<F: PteFormat> PageTable<F> {
    /// Maps `[va, va + len)` to `[pa, pa + len)` with leaf `flags` (in the size-independent
    /// form of [`PteFormat`]), using the page sizes `size` and the page table's maximum
    /// leaf level allow. `mode` is empty under the MMU lock held for write, or
    /// [`WalkFlags::SHARED`] under the lock held for read (KVM's TDP MMU fault path): then
    /// a concurrent mapping of the same entries makes one of the callers fail with
    /// `AlreadyMapped`, possibly after mapping part of its range.
    ///
    /// Errors other than `OutOfTables` and `BadTable` change nothing: the range is checked
    /// for existing mappings first (a read-only walk). On `OutOfTables` the part of the
    /// range before the failure is mapped and the tables built so far stay; unmap the range
    /// to undo it.
    #[allow(
        clippy::too_many_arguments,
        reason = "map's request plus the walk mode"
    )]
    pub fn map<M: TableMemory + ?Sized>(
        &self,
        mem: &mut M,
        va: F::In,
        pa: F::Out,
        len: u64,
        flags: F::Flags,
        size: MapSize,
        mode: WalkFlags,
    ) -> Result<(), MapError> {
        let flags = bitflags::Flags::bits(&flags);
        if flags & F::REQUIRED != F::REQUIRED {
            return Err(MapError::BadFlags);
        }
        let largest = self.max_leaf();
        let (min, max, exact) = match size {
            MapSize::Largest => (Level::L1, largest, false),
            MapSize::AtMost(l) => (Level::L1, l.min(largest), false),
            MapSize::Exactly(l) if l <= largest => (l, l, true),
            MapSize::Exactly(_) => return Err(MapError::UnsupportedSize),
        };
        let (start, end) = check_range::<F>(va, len)?;
        let pa = pa.raw();
        let align = min.page_size();
        if start % align != 0 || pa % align != 0 || len % align != 0 {
            return Err(MapError::Unaligned);
        }
        if pa.checked_add(len).is_none_or(|e| e > 1 << PHYS_ADDR_BITS) {
            return Err(MapError::OutOfRange);
        }
        if len == 0 {
            return Ok(());
        }
        let mut visitor = MapVisitor {
            start,
            pa,
            flags: flags & F::FLAGS_MASK,
            min: min.get(),
            max: max.get(),
            exact,
            check: true,
        };
        let conv = |e| flatten(e, MapError::OutOfRange, MapError::BadTable);
        let visit = WalkFlags::LEAF | WalkFlags::TABLE_PRE;
        self.walk_read(mem, start, end, visit, &mut visitor)
            .map_err(conv)?;
        visitor.check = false;
        let visit = visit | (mode & WalkFlags::SHARED);
        self.walk_raw(mem, start, end, visit, &mut visitor)
            .map_err(conv)
    }
}
