//! Page-table frames carved out of guest RAM, so the tables' physical addresses are
//! guest-physical addresses KVM's page walker can follow.

use std::rc::Rc;

use super::ram::{GuestRam, PAGE};

/// A bump allocator with a free list over guest-physical `[start, end)`; every table it
/// hands out is zeroed first.
pub struct TableArena {
    ram: Rc<GuestRam>,
    start: u64,
    end: u64,
    next: u64,
    free: Vec<u64>,
    live: usize,
    peak: usize,
}

impl TableArena {
    /// An arena over `[start, end)`, both 4 KiB aligned and inside `ram`.
    pub fn new(ram: Rc<GuestRam>, start: u64, end: u64) -> Self {
        assert!(start % PAGE == 0 && end % PAGE == 0 && start < end && end <= ram.len());
        Self {
            ram,
            start,
            end,
            next: start,
            free: Vec::new(),
            live: 0,
            peak: 0,
        }
    }

    /// The RAM the tables live in.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// A zeroed table, or `None` when the region is used up.
    pub fn alloc(&mut self) -> Option<u64> {
        let gpa = match self.free.pop() {
            Some(gpa) => gpa,
            None if self.next < self.end => {
                self.next += PAGE;
                self.next - PAGE
            }
            None => return None,
        };
        for w in self.ram.table(gpa)? {
            w.store(0, std::sync::atomic::Ordering::Relaxed);
        }
        self.live += 1;
        self.peak = self.peak.max(self.live);
        Some(gpa)
    }

    /// Returns a table to the arena. Panics (this is a test) on an address it never gave out
    /// or a double free.
    pub fn free(&mut self, gpa: u64) {
        assert!(
            gpa >= self.start && gpa < self.next && gpa % PAGE == 0,
            "free of {gpa:#x}"
        );
        assert!(!self.free.contains(&gpa), "double free of table {gpa:#x}");
        self.free.push(gpa);
        self.live -= 1;
    }

    /// Tables allocated and not freed.
    pub fn live(&self) -> usize {
        self.live
    }

    /// The most tables ever live at once.
    pub fn peak(&self) -> usize {
        self.peak
    }
}
