//! A real KVM guest runs on identity page tables built by `hvmem::spt` inside its own RAM;
//! KVM's page walker is the judge of our x86-64 format.
//!
//! Phases, each followed by a guest run that writes a pattern into every 4 KiB page of the
//! test area and reads it back, a host-side check of the pattern (the guest wrote through
//! virtual addresses, the host reads guest-physical ones, so this checks the identity
//! translation), and a `KVM_TRANSLATE` sweep over every page of guest RAM:
//!
//! 1. `map` all of guest RAM with 2 MiB leaves (present + writable; accessed and dirty are
//!    left for KVM's walker to set); enter long mode on those tables;
//! 2. `split` every 2 MiB leaf into 512 4 KiB leaves;
//! 3. `unmap` one 4 KiB page: the guest's #PF handler must report CR2 = exactly that page,
//!    error code "write to a non-present page", at the loop's store; a second run skipping
//!    that page must pass on every other page;
//! 4. `map` the page back and `collapse`: the tables must be back to 2 MiB leaves only (and
//!    to the 3 tables of phase 1), and the guest must pass again.
//!
//! After every operation the tables are inspected three ways: an independent reader of the
//! raw entries (`kvm::inspect`), hvmem's own `table_count` and `translate` (every page), and
//! the arena's allocation count; all must agree (no table leaked).
//!
//! Guest RAM defaults to 256 MiB; `HVMEM_KVM_GUEST_MIB` (64..=1024, even) changes it.
//! The report goes straight to stderr so it shows in CI logs without `--nocapture`.
//! Without a usable /dev/kvm the test prints `skipped: /dev/kvm not available` and passes.
#![cfg(all(target_os = "linux", target_arch = "x86_64"))]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod kvm;

use std::io::Write as _;
use std::rc::Rc;
use std::time::{Duration, Instant};

use hvmem::spt::{MapSize, PageTable, SplitTo, TableArena, X86_64, X86Flags};
use hvmem::{Hpa, Level, Va};
use kvm::guest;
use kvm::inspect::{self, Census};
use kvm::machine::{Exit, KvmTlb, Machine, Pass};
use kvm::ram::{GuestRam, PAGE};

const MIB: u64 = 1 << 20;
const SIZE_2M: u64 = 2 * MIB;
/// Address the pattern loop never reaches: "skip nothing".
const NO_SKIP: u64 = u64::MAX;
/// Leaf flags of the identity map.
const FLAGS: X86Flags = X86Flags::PRESENT.union(X86Flags::WRITABLE);
const ACCESSED: u64 = X86Flags::ACCESSED.bits();
const DIRTY: u64 = X86Flags::DIRTY.bits();

/// Writes one line of the report to stderr, past the test harness's output capture.
macro_rules! report {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

fn va(addr: u64) -> Va {
    Va::new(addr).unwrap()
}

fn hpa(addr: u64) -> Hpa {
    Hpa::new(addr).unwrap()
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// Where things live in guest-physical memory.
struct Layout {
    ram: u64,
    tables: (u64, u64),
    test: (u64, u64),
    hole: u64,
}

impl Layout {
    fn new(ram: u64) -> Self {
        // One table per 2 MiB (for the split), the upper levels, and slack; whole 2 MiB.
        let tables = (ram / SIZE_2M + 16) * PAGE;
        let tables_end = guest::SYSTEM_END + tables.div_ceil(SIZE_2M) * SIZE_2M;
        let test = (tables_end, ram);
        // A page in the middle of the test area, not at a 2 MiB boundary.
        let hole = test.0 + (test.1 - test.0) / 2 / SIZE_2M * SIZE_2M + 0x53 * PAGE;
        Self {
            ram,
            tables: (guest::SYSTEM_END, tables_end),
            test,
            hole,
        }
    }

    fn test_pages(&self) -> u64 {
        (self.test.1 - self.test.0) / PAGE
    }

    fn pages(&self, range: (u64, u64)) -> impl Iterator<Item = u64> {
        (range.0..range.1).step_by(PAGE as usize)
    }
}

/// The guest, its page tables and the table memory they live in.
struct Rig<'r> {
    l: Layout,
    m: Machine,
    ram: &'r GuestRam,
    mem: TableArena<'r>,
    pt: PageTable<X86_64>,
}

impl Rig<'_> {
    /// Checks the pattern of `seed` in `range` except `except`; returns pages checked.
    fn check_pattern(&self, range: (u64, u64), seed: u64, except: u64) -> u64 {
        let mut n = 0;
        for page in self.l.pages(range).filter(|&p| p != except) {
            let (first, last) = (self.ram.read_u64(page), self.ram.read_u64(page + PAGE - 8));
            assert_eq!(
                first,
                guest::pattern(page, seed),
                "first word of page {page:#x}"
            );
            assert_eq!(
                last,
                guest::pattern_last(page, seed),
                "last word of page {page:#x}"
            );
            n += 1;
        }
        n
    }

    /// `KVM_TRANSLATE` of every page of guest RAM: identity and writable, except `hole`
    /// which must not translate. Returns pages translated.
    fn kvm_sweep(&self, hole: u64) -> u64 {
        let mut n = 0;
        for page in self.l.pages((0, self.l.ram)) {
            let t = self.m.kvm_translate(page + 0x123).unwrap();
            if page == hole {
                assert_eq!(t, None, "KVM still translates the unmapped page {page:#x}");
            } else {
                assert_eq!(t, Some((page + 0x123, true)), "KVM_TRANSLATE of {page:#x}");
                n += 1;
            }
        }
        n
    }

    /// hvmem's `translate` of every page: identity through a leaf of `level`, except `hole`.
    fn our_sweep(&self, level: Level, hole: u64) {
        for page in self.l.pages((0, self.l.ram)) {
            let t = self.pt.translate(&self.mem, va(page + 0x321));
            if page == hole {
                assert!(
                    t.is_err(),
                    "hvmem still translates the unmapped page {page:#x}"
                );
                continue;
            }
            let t = t.unwrap_or_else(|e| panic!("hvmem translate of {page:#x}: {e}"));
            assert_eq!(
                (t.pa.get(), t.level),
                (page + 0x321, level),
                "translate {page:#x}"
            );
            assert!(t.flags.contains(FLAGS), "flags of {page:#x}: {:?}", t.flags);
        }
    }

    /// The census the tables must show; hvmem's table count and the arena must agree.
    fn expect_census(&self, leaves_2m: u64, leaves_4k: u64) -> Census {
        let c = inspect::census(self.ram, self.pt.root().get());
        let tables = 3 + if leaves_4k > 0 {
            self.l.ram / SIZE_2M
        } else {
            0
        };
        let want = Census {
            tables: tables as usize,
            leaves_4k: leaves_4k as usize,
            leaves_2m: leaves_2m as usize,
            leaves_1g: 0,
            mapped: leaves_2m * SIZE_2M + leaves_4k * PAGE,
            not_identity: 0,
        };
        assert_eq!(c, want, "table census");
        assert_eq!(
            self.pt.table_count(&self.mem).unwrap(),
            c.tables,
            "hvmem's table count"
        );
        assert_eq!(
            self.mem.allocated(),
            c.tables,
            "tables allocated != tables reachable"
        );
        c
    }

    /// The leaves that map the test area all have accessed and dirty set: KVM's walker
    /// found them and wrote back A/D on the guest's writes (`map` leaves both clear, so in
    /// phase 1 nobody else could have set them; later phases also inherit them through
    /// `split`, and `collapse` takes their union). Returns leaves checked.
    fn expect_accessed_dirty(&self, hole: u64) -> u64 {
        let mut leaves = std::collections::BTreeSet::new();
        for page in self.l.pages(self.l.test).filter(|&p| p != hole) {
            let (_, level, entry) = inspect::walk(self.ram, self.pt.root().get(), page).unwrap();
            let leaf_base = page & !((1 << (12 + 9 * (level - 1))) - 1);
            if leaves.insert(leaf_base) {
                assert_eq!(
                    entry & (ACCESSED | DIRTY),
                    ACCESSED | DIRTY,
                    "A/D of {page:#x}"
                );
            }
        }
        leaves.len() as u64
    }

    /// A guest run that must pass on the whole test area (but `hole`), then the host check,
    /// the A/D check and the KVM sweep.
    fn run_clean(&mut self, seed: u64, hole: u64, what: &str) {
        let l = &self.l;
        let t = Instant::now();
        let exit = self
            .m
            .run(Pass {
                start: l.test.0,
                end: l.test.1,
                seed,
                skip: hole,
            })
            .unwrap();
        let guest_time = t.elapsed();
        let expected = l.test_pages() - u64::from(l.test.0 <= hole && hole < l.test.1);
        assert_eq!(exit, Exit::Done { pages: expected }, "{what}: guest run");
        let t = Instant::now();
        let checked = self.check_pattern(self.l.test, seed, hole);
        let ad = self.expect_accessed_dirty(hole);
        let host_time = t.elapsed();
        let t = Instant::now();
        let swept = self.kvm_sweep(hole);
        let sweep_time = t.elapsed();
        report!(
            "  {what}: guest wrote+read {expected} pages in {}",
            ms(guest_time)
        );
        report!(
            "  {what}: host found the pattern in {checked} pages, A+D set on {ad} leaves, in {}",
            ms(host_time)
        );
        report!(
            "  {what}: KVM_TRANSLATE identity+writable on {swept} pages in {}",
            ms(sweep_time)
        );
    }
}

#[test]
fn guest_runs_on_hvmem_page_tables() {
    let Some(kvm) = Machine::open_kvm() else {
        report!("skipped: /dev/kvm not available");
        return;
    };
    let total = Instant::now();
    let mib: u64 = std::env::var("HVMEM_KVM_GUEST_MIB").map_or(256, |v| v.parse().unwrap());
    assert!(
        (64..=1024).contains(&mib) && mib % 2 == 0,
        "HVMEM_KVM_GUEST_MIB={mib}"
    );
    let l = Layout::new(mib * MIB);
    let (leaves, pages) = (l.ram / SIZE_2M, l.ram / PAGE);

    let ram = Rc::new(GuestRam::new(l.ram).unwrap());
    let m = Machine::new(kvm, Rc::clone(&ram)).unwrap();
    let mut mem = ram.table_arena(l.tables.0, l.tables.1).unwrap();
    let pt = PageTable::<X86_64>::new(&mut mem).unwrap();
    let mut r = Rig {
        l,
        m,
        ram: &ram,
        mem,
        pt,
    };
    report!(
        "kvm_guest: {mib} MiB guest, {pages} pages; tables in [{:#x}, {:#x}); test area \
         [{:#x}, {:#x}) = {} pages; hole {:#x}",
        r.l.tables.0,
        r.l.tables.1,
        r.l.test.0,
        r.l.test.1,
        r.l.test_pages(),
        r.l.hole
    );

    // 1. 2 MiB leaves over all of RAM, long mode on them.
    let t = Instant::now();
    let two_mib = MapSize::Exactly(Level::L2);
    r.pt.map(&mut r.mem, va(0), hpa(0), r.l.ram, FLAGS, two_mib, WalkFlags::empty())
        .unwrap();
    let map_time = t.elapsed();
    let c = r.expect_census(leaves, 0);
    r.our_sweep(Level::L2, NO_SKIP);
    report!(
        "phase 1 map: {} 2 MiB leaves in {} tables, {}",
        c.leaves_2m,
        c.tables,
        ms(map_time)
    );
    r.m.enter_long_mode(r.pt.root().get()).unwrap();
    r.run_clean(0x5eed_0100_0000_0000, NO_SKIP, "phase 1 run");

    // 2. Split every 2 MiB leaf to 4 KiB. Split needs no TLB flush (translations do not
    // change), but KVM must forget its shadow of the old tables to judge the new ones.
    let t = Instant::now();
    let split =
        r.pt.split(&mut r.mem, va(0), r.l.ram, SplitTo::Level(Level::L1), WalkFlags::empty())
            .unwrap();
    let split_time = t.elapsed();
    assert_eq!(split as u64, leaves, "2 MiB leaves split");
    let c = r.expect_census(0, pages);
    r.our_sweep(Level::L1, NO_SKIP);
    report!(
        "phase 2 split: {split} 2 MiB leaves -> {} 4 KiB leaves, {} tables, {}",
        c.leaves_4k,
        c.tables,
        ms(split_time)
    );
    r.m.flush_guest_tlb().unwrap();
    r.run_clean(0x5eed_0200_0000_0000, NO_SKIP, "phase 2 run");

    // 3. Unmap one 4 KiB page: the guest must fault exactly there, and nowhere else.
    let hole = r.l.hole;
    let t = Instant::now();
    let pending = r.pt.unmap(&mut r.mem, va(hole), PAGE).unwrap();
    let mut tlb = KvmTlb::new(&r.m);
    pending.flush(&mut tlb, &mut r.mem);
    let unmap_time = t.elapsed();
    assert_eq!(tlb.error, None);
    assert_eq!(
        (tlb.ranges, tlb.all),
        (1, 0),
        "one ranged flush for one page"
    );
    r.expect_census(0, pages - 1);
    r.our_sweep(Level::L1, hole);
    report!(
        "phase 3 unmap: {hole:#x}, one ranged TLB flush, {}",
        ms(unmap_time)
    );
    let seed3 = 0x5eed_0300_0000_0000;
    let t = Instant::now();
    let exit = r.m.run(Pass {
        start: r.l.test.0,
        end: r.l.test.1,
        seed: seed3,
        skip: NO_SKIP,
    });
    let fault_time = t.elapsed();
    // Error code 0x2: a supervisor write (W=1) to a non-present page (P=0), no reserved bit.
    assert_eq!(
        exit.unwrap(),
        Exit::PageFault {
            cr2: hole,
            error: 0x2,
            rip: guest::WRITE_RIP
        }
    );
    // The write loop stopped at the hole: the pages below it carry this run's pattern, the
    // hole and the pages above still carry phase 2's.
    let below = r.check_pattern((r.l.test.0, hole), seed3, NO_SKIP);
    let above = r.check_pattern((hole, r.l.test.1), 0x5eed_0200_0000_0000, NO_SKIP);
    report!(
        "phase 3 fault: #PF handler saw cr2={hole:#x} error=0x2 rip={:#x}; {below} pages \
         below written, the hole and {} pages above untouched; {}",
        guest::WRITE_RIP,
        above - 1,
        ms(fault_time)
    );
    r.run_clean(0x5eed_0400_0000_0000, hole, "phase 3 run skipping the hole");
    assert_eq!(
        r.ram.read_u64(hole),
        guest::pattern(hole, 0x5eed_0200_0000_0000)
    );

    // 4. Put the page back (a fresh leaf without A/D: collapse takes the union) and
    // collapse: back to 2 MiB leaves only.
    let t = Instant::now();
    let four_kib = MapSize::Exactly(Level::L1);
    r.pt.map(&mut r.mem, va(hole), hpa(hole), PAGE, FLAGS, four_kib, WalkFlags::empty())
        .unwrap();
    let mut tlb = KvmTlb::new(&r.m);
    let collapsed =
        r.pt.collapse(&mut r.mem, va(0), r.l.ram, Level::L2)
            .unwrap();
    let collapse_time = t.elapsed();
    assert_eq!(tlb.error, None);
    let flushes = (tlb.ranges, tlb.all);
    assert!(flushes.0 + flushes.1 >= 1, "collapse flushed nothing");
    assert_eq!(collapsed as u64, leaves, "4 KiB tables collapsed");
    let c = r.expect_census(leaves, 0);
    r.our_sweep(Level::L2, NO_SKIP);
    report!(
        "phase 4 collapse: {collapsed} tables -> 2 MiB leaves; census {} 2 MiB leaves, {} 4 KiB \
         leaves, {} tables; TLB flushes {} ranged + {} full; {}",
        c.leaves_2m,
        c.leaves_4k,
        c.tables,
        flushes.0,
        flushes.1,
        ms(collapse_time)
    );
    r.run_clean(0x5eed_0500_0000_0000, NO_SKIP, "phase 4 run");

    report!("kvm_guest: all checks passed in {}", ms(total.elapsed()));
}
