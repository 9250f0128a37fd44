//! The adapter between the test and the page-table code under test.
//!
//! TEMPORARY: until hvmem's `spt` module lands, this is a minimal stand-alone builder so the
//! KVM harness can be debugged. The test only calls the methods of [`PageTables`]; porting
//! means re-implementing them on `hvmem::spt` (`map`, `split`, `unmap`, `collapse`,
//! `translate`, a `TableMemory` over [`TableArena`]) and deleting the code below.

use super::arena::TableArena;

const P: u64 = 1 << 0;
const RW: u64 = 1 << 1;
const A: u64 = 1 << 5;
const D: u64 = 1 << 6;
const PS: u64 = 1 << 7;
const ADDR: u64 = 0x000f_ffff_ffff_f000;
/// Table entries: present + writable.
const TABLE: u64 = P | RW;
/// Leaves: present + writable with accessed/dirty preset, so KVM never has to set them and
/// 512 siblings stay identical (the collapse precondition).
const LEAF: u64 = P | RW | A | D;

const SIZE_4K: u64 = 1 << 12;
const SIZE_2M: u64 = 1 << 21;

/// Identity page tables in guest RAM.
pub struct PageTables {
    arena: TableArena,
    root: u64,
}

impl PageTables {
    /// An empty root table.
    pub fn new(mut arena: TableArena) -> Result<Self, String> {
        let root = arena.alloc().ok_or("no room for the root table")?;
        Ok(Self { arena, root })
    }

    /// The root table's guest-physical address (CR3).
    pub fn root(&self) -> u64 {
        self.root
    }

    /// The arena the tables come from.
    pub fn arena(&self) -> &TableArena {
        &self.arena
    }

    fn entry(&self, table: u64, level: u32, va: u64) -> u64 {
        table + 8 * ((va >> (12 + 9 * (level - 1))) & 511)
    }

    /// The table at `level` covering `va`, allocating missing tables on the way down.
    fn table_for(&mut self, va: u64, level: u32) -> Result<u64, String> {
        let mut table = self.root;
        for l in (level + 1..=4).rev() {
            let slot = self.entry(table, l, va);
            let e = self.arena.ram().read_u64(slot);
            if e & P == 0 {
                let t = self.arena.alloc().ok_or("table arena exhausted")?;
                self.arena.ram().write_u64(slot, t | TABLE);
                table = t;
            } else if e & PS != 0 {
                return Err(format!("{va:#x}: huge leaf at level {l} in the way"));
            } else {
                table = e & ADDR;
            }
        }
        Ok(table)
    }

    /// Maps `[start, end)` to itself with leaves of `size` (4 KiB or 2 MiB).
    pub fn map(&mut self, start: u64, end: u64, size: u64) -> Result<(), String> {
        let (level, ps) = match size {
            SIZE_4K => (1, 0),
            SIZE_2M => (2, PS),
            _ => return Err(format!("unsupported page size {size:#x}")),
        };
        let mut va = start;
        while va < end {
            let t = self.table_for(va, level)?;
            let slot = self.entry(t, level, va);
            if self.arena.ram().read_u64(slot) & P != 0 {
                return Err(format!("{va:#x} already mapped"));
            }
            self.arena.ram().write_u64(slot, va | LEAF | ps);
            va += size;
        }
        Ok(())
    }

    /// Splits every 2 MiB leaf in `[start, end)` into 512 4 KiB leaves; returns how many.
    pub fn split(&mut self, start: u64, end: u64) -> Result<usize, String> {
        let mut n = 0;
        let mut va = start;
        while va < end {
            let pd = self.table_for(va, 2)?;
            let slot = self.entry(pd, 2, va);
            let e = self.arena.ram().read_u64(slot);
            if e & P != 0 && e & PS != 0 {
                let t = self.arena.alloc().ok_or("table arena exhausted")?;
                for i in 0..512u64 {
                    self.arena.ram().write_u64(t + 8 * i, (e & !PS) + (i << 12));
                }
                self.arena.ram().write_u64(slot, t | TABLE);
                n += 1;
            }
            va += SIZE_2M;
        }
        Ok(n)
    }

    /// Unmaps the 4 KiB page at `va`, then flushes.
    pub fn unmap(
        &mut self,
        va: u64,
        flush: &mut dyn FnMut() -> Result<(), String>,
    ) -> Result<(), String> {
        let pt = self.table_for(va, 1)?;
        let slot = self.entry(pt, 1, va);
        if self.arena.ram().read_u64(slot) & P == 0 {
            return Err(format!("{va:#x} not mapped"));
        }
        self.arena.ram().write_u64(slot, 0);
        flush()
    }

    /// Replaces every 4 KiB table in `[start, end)` whose 512 leaves are contiguous with
    /// identical flags by one 2 MiB leaf; flushes, then frees the tables. Returns how many.
    pub fn collapse(
        &mut self,
        start: u64,
        end: u64,
        flush: &mut dyn FnMut() -> Result<(), String>,
    ) -> Result<usize, String> {
        let mut freed = Vec::new();
        let mut va = start;
        while va < end {
            let pd = self.table_for(va, 2)?;
            let slot = self.entry(pd, 2, va);
            let e = self.arena.ram().read_u64(slot);
            if e & P != 0 && e & PS == 0 {
                let t = e & ADDR;
                let first = self.arena.ram().read_u64(t);
                let same = (0..512u64).all(|i| {
                    self.arena.ram().read_u64(t + 8 * i) == first + (i << 12) && first & P != 0
                });
                if same && (first & ADDR) % SIZE_2M == 0 {
                    self.arena.ram().write_u64(slot, first | PS);
                    freed.push(t);
                }
            }
            va += SIZE_2M;
        }
        flush()?;
        let n = freed.len();
        for t in freed {
            self.arena.free(t);
        }
        Ok(n)
    }

    /// Where `va` translates to, by our own code.
    pub fn translate(&self, va: u64) -> Option<u64> {
        super::inspect::walk(self.arena.ram(), self.root, va).map(|(pa, _, _)| pa)
    }
}
