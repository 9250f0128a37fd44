//! The test's one use of `PageTable::protect`: take write permission away from (or give it
//! back to) ranges of the guest's tables, then flush.
//!
//! Each range's `PendingFlush` is flushed through [`KvmTlb`] (a memslot reload), and the
//! caller checks that a flush was asked for: that is hvmem's promise for a changed
//! permission. The guest alone cannot check it here: on the PVM shadow-MMU host this test
//! was written on, the guest saw these permission edits even with the flush left out.

use hvmem::spt::{PageTable, TableArena, WalkFlags, X86_64, X86Flags};

use super::machine::{KvmTlb, Machine};

/// TLB flushes one [`set_writable`] call did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Flushes {
    /// Ranged flushes.
    pub ranges: u32,
    /// Full flushes.
    pub all: u32,
}

/// Sets (`writable`) or clears `WRITABLE` in every leaf of each `(start, len)` range, flushing
/// after each range as its `PendingFlush` asks.
pub fn set_writable(
    pt: &mut PageTable<X86_64>,
    mem: &mut TableArena<'_>,
    m: &Machine,
    ranges: &[(u64, u64)],
    writable: bool,
) -> Result<Flushes, String> {
    let (set, clear) = if writable {
        (X86Flags::WRITABLE, X86Flags::empty())
    } else {
        (X86Flags::empty(), X86Flags::WRITABLE)
    };
    let mut tlb = KvmTlb::new(m);
    for &(start, len) in ranges {
        let va = hvmem::Va::new(start).map_err(|e| format!("{start:#x}: {e}"))?;
        let pending = pt
            .protect(mem, va, len, set, clear, WalkFlags::empty())
            .map_err(|e| format!("protect [{start:#x}, +{len:#x}): {e}"))?;
        pending
            .flush(&mut tlb, mem)
            .map_err(|e| format!("freeing after protect's flush: {e}"))?;
    }
    match tlb.error {
        Some(e) => Err(e),
        None => Ok(Flushes {
            ranges: tlb.ranges,
            all: tlb.all,
        }),
    }
}
