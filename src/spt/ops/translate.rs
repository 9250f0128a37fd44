//! `translate`: the leaf that maps one address (KVM `kvm_tdp_mmu_get_walk`, arm64
//! `kvm_pgtable_get_leaf`, x86_64 `Translate::translate`).

use crate::addr::{Address, Level};
use crate::spt::PageTable;
use crate::spt::error::TranslateError;
use crate::spt::format::PteFormat;
use crate::spt::memory::{TableMemory, Tables};
use crate::spt::walk::{Action, VisitCtx, VisitKind, Visitor, WalkError, WalkFlags};

/// Where an input address leads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Translation<F: PteFormat> {
    /// The output address the input address maps to (page offset included).
    pub pa: F::Out,
    /// The level of the leaf (1: 4 KiB page, 2: 2 MiB, 3: 1 GiB).
    pub level: Level,
    /// The leaf's flags in the size-independent form.
    pub flags: F::Flags,
    /// The raw leaf entry.
    pub entry: u64,
}

struct TranslateVisitor {
    va: u64,
    found: Option<(u64, Level, u64)>,
}

impl<F: PteFormat, M: TableMemory + ?Sized> Visitor<F, M> for TranslateVisitor {
    type Error = ();

    #[inline]
    fn visit(
        &mut self,
        _kind: VisitKind,
        ctx: &mut VisitCtx<'_, F>,
        _tables: &mut Tables<'_, M>,
    ) -> Result<Action, ()> {
        let level = ctx.level();
        let entry = ctx.old();
        if !F::is_present(entry) {
            return Err(());
        }
        let pa = F::leaf_addr(entry, level).get() + (self.va - ctx.raw_addr());
        self.found = Some((pa, level, entry));
        Ok(Action::Stop)
    }
}

impl<F: PteFormat> PageTable<F> {
    /// The translation of `va`: one walk down to the leaf that maps it.
    #[inline]
    pub fn translate<M: TableMemory + ?Sized>(
        &self,
        mem: &M,
        va: F::In,
    ) -> Result<Translation<F>, TranslateError> {
        let va = va.raw();
        if va >> F::INPUT_BITS != 0 {
            return Err(TranslateError::OutOfRange);
        }
        let mut visitor = TranslateVisitor { va, found: None };
        match self.walk_read(mem, va, va + 1, WalkFlags::LEAF, &mut visitor) {
            Ok(()) => {}
            Err(WalkError::Visitor(())) => return Err(TranslateError::NotMapped),
            Err(WalkError::BadTable(_)) => return Err(TranslateError::BadTable),
            Err(_) => return Err(TranslateError::OutOfRange),
        }
        let (pa, level, entry) = visitor.found.ok_or(TranslateError::NotMapped)?;
        Ok(Translation {
            pa: F::Out::from_raw(pa).map_err(|_| TranslateError::BadTable)?,
            level,
            flags: <F::Flags as bitflags::Flags>::from_bits_retain(F::leaf_flags(entry, level)),
            entry,
        })
    }
}
