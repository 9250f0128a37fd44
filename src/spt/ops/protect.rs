//! `protect`: change the flags of every leaf in a range (KVM `kvm_tdp_mmu_wrprot_slot`'s
//! walk, arm64 `kvm_pgtable_stage2_relax_perms` / `stage2_update_leaf_attrs`, x86_64
//! `Mapper::update_flags`).

use super::{check_range, straddles_leaf};
use crate::spt::PageTable;
use crate::spt::error::{ProtectError, flatten};
use crate::spt::flush::PendingFlush;
use crate::spt::format::PteFormat;
use crate::spt::memory::{TableMemory, Tables};
use crate::spt::walk::{Action, VisitCtx, VisitKind, Visitor, WalkFlags};

struct ProtectVisitor {
    set: u64,
    clear: u64,
    pending: PendingFlush,
    /// A table on the way is linked from another parent too: its leaves are cached under
    /// that parent's addresses as well, which this walk does not know.
    shared: bool,
}

impl<F: PteFormat, M: TableMemory + ?Sized> Visitor<F, M> for ProtectVisitor {
    type Error = ProtectError;

    #[inline]
    fn visit(
        &mut self,
        kind: VisitKind,
        ctx: &mut VisitCtx<'_, F>,
        tables: &mut Tables<'_, M>,
    ) -> Result<Action, ProtectError> {
        if kind == VisitKind::TablePre {
            self.shared |= tables.links(F::table_addr(ctx.old())) > 1;
            return Ok(Action::Continue);
        }
        let level = ctx.level();
        // In shared mode a lost race re-reads the entry: a leaf is tried again, a table
        // the winner installed (a concurrent split) is walked after this visit.
        while F::is_leaf(ctx.old(), level) {
            if !ctx.covered() {
                // The boundary check makes this unreachable (short of a concurrent map).
                return Err(ProtectError::SplitsHugePage);
            }
            let old = ctx.old();
            let flags = (F::leaf_flags(old, level) & !self.clear) | self.set;
            let new = F::leaf_entry(F::leaf_addr(old, level), level, flags);
            if new == old {
                break;
            }
            if ctx.set(new) {
                ctx.gather(&mut self.pending.gather);
                break;
            }
        }
        Ok(Action::Continue)
    }
}

impl<F: PteFormat> PageTable<F> {
    /// Sets the flags `set` and clears the flags `clear` (size-independent form; the
    /// address and the bits the format manages are left alone) in every leaf of
    /// `[va, va + len)`. Non-present entries stay so. Returns the TLB flush to do (needed
    /// when a permission was taken away; harmless otherwise). `mode` may be
    /// [`WalkFlags::SHARED`] (write protection for dirty logging under the read lock, KVM
    /// `tdp_mmu_set_spte_atomic` in `wrprot_gfn_range`).
    ///
    /// Refused before anything changes: `clear` holding a bit every leaf needs, or a
    /// range that covers part of a leaf.
    ///
    /// A leaf in a table that another parent entry links too changes for every parent;
    /// when the walk passed such a table and changed a leaf, the flush is of everything
    /// (the other parents' addresses are not known here).
    pub fn protect<M: TableMemory + ?Sized>(
        &self,
        mem: &mut M,
        va: F::In,
        len: u64,
        set: F::Flags,
        clear: F::Flags,
        mode: WalkFlags,
    ) -> Result<PendingFlush, ProtectError> {
        let set = bitflags::Flags::bits(&set) & F::FLAGS_MASK;
        let clear = bitflags::Flags::bits(&clear) & F::FLAGS_MASK;
        if clear & F::REQUIRED != 0 {
            return Err(ProtectError::BadFlags);
        }
        let (start, end) = check_range::<F>(va, len)?;
        if len == 0 {
            return Ok(PendingFlush::new());
        }
        match straddles_leaf(self, mem, start, end) {
            Ok(false) => {}
            Ok(true) => return Err(ProtectError::SplitsHugePage),
            Err(()) => return Err(ProtectError::BadTable),
        }
        let mut visitor = ProtectVisitor {
            set,
            clear,
            pending: PendingFlush::new(),
            shared: false,
        };
        let flags = WalkFlags::LEAF | WalkFlags::TABLE_PRE | (mode & WalkFlags::SHARED);
        self.walk_raw(mem, start, end, flags, &mut visitor)
            .map_err(|e| flatten(e, ProtectError::OutOfRange, ProtectError::BadTable))?;
        if visitor.shared && !visitor.pending.gather.is_empty() {
            // Other parents' addresses of the changed leaves are unknown here.
            visitor.pending.gather.flush_everything();
        }
        Ok(visitor.pending)
    }
}
