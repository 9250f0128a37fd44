//! A real KVM guest runs on identity page tables built by hvmem; KVM's page walker is the
//! judge of the x86-64 format.
//!
//! Phases, each followed by a guest run that writes a pattern into every 4 KiB page of the
//! test area and reads it back, a host-side check of the pattern, and a `KVM_TRANSLATE`
//! sweep over every page of guest RAM:
//!
//! 1. `map` all of guest RAM with 2 MiB leaves; enter long mode on those tables;
//! 2. `split` every 2 MiB leaf into 512 4 KiB leaves;
//! 3. `unmap` one 4 KiB page: the guest's #PF handler must report CR2 = exactly that page,
//!    a write to a non-present page, at the loop's store; a second run skipping that page
//!    must pass on every other page;
//! 4. `map` the page back and `collapse`: the tables must be back to 2 MiB leaves only (and
//!    to the 3 tables of phase 1), and the guest must pass again.
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

use kvm::arena::TableArena;
use kvm::guest;
use kvm::inspect::{self, Census};
use kvm::machine::{Exit, Machine, Pass};
use kvm::ram::{GuestRam, PAGE};
use kvm::tables::PageTables;

const MIB: u64 = 1 << 20;
const SIZE_2M: u64 = 2 * MIB;
/// Address the pattern loop never reaches: "skip nothing".
const NO_SKIP: u64 = u64::MAX;

/// Writes one line of the report to stderr, past the test harness's output capture.
macro_rules! report {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
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
}

fn ms(d: Duration) -> String {
    format!("{:9.2} ms", d.as_secs_f64() * 1e3)
}

/// Checks the pattern of `seed` in every test page except `except`; returns pages checked.
fn check_pattern(ram: &GuestRam, range: (u64, u64), seed: u64, except: u64) -> u64 {
    let mut n = 0;
    for page in (range.0..range.1).step_by(PAGE as usize) {
        if page == except {
            continue;
        }
        let (first, last) = (ram.read_u64(page), ram.read_u64(page + PAGE - 8));
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

/// `KVM_TRANSLATE` of every page of guest RAM: identity and writable, except `hole` which
/// must not translate. Returns pages translated.
fn kvm_sweep(m: &Machine, ram: u64, hole: u64) -> u64 {
    let mut n = 0;
    for page in (0..ram).step_by(PAGE as usize) {
        let t = m.kvm_translate(page + 0x123).unwrap();
        if page == hole {
            assert_eq!(t, None, "KVM still translates the unmapped page {page:#x}");
        } else {
            assert_eq!(t, Some((page + 0x123, true)), "KVM_TRANSLATE of {page:#x}");
            n += 1;
        }
    }
    n
}

/// Our own `translate` of every page: identity, except `hole`.
fn our_sweep(pt: &PageTables, ram: u64, hole: u64) {
    for page in (0..ram).step_by(PAGE as usize) {
        let want = (page != hole).then_some(page + 0x321);
        assert_eq!(
            pt.translate(page + 0x321),
            want,
            "our translate of {page:#x}"
        );
    }
}

/// The census the tables must show, and the arena must agree (no table leaked).
fn expect_census(pt: &PageTables, l: &Layout, leaves_2m: u64, leaves_4k: u64) -> Census {
    let c = inspect::census(pt.arena().ram(), pt.root());
    let tables = 3 + if leaves_4k > 0 { l.ram / SIZE_2M } else { 0 };
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
        pt.arena().live(),
        c.tables,
        "tables allocated != tables reachable"
    );
    c
}

/// A guest run that must pass on the whole test area, then the host check and KVM sweep.
fn run_clean(m: &mut Machine, l: &Layout, seed: u64, hole: u64, what: &str) {
    let t = Instant::now();
    let exit = m
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
    let checked = check_pattern(m.ram(), l.test, seed, hole);
    let host_time = t.elapsed();
    let t = Instant::now();
    let swept = kvm_sweep(m, l.ram, hole);
    let sweep_time = t.elapsed();
    report!(
        "  {what}: guest wrote+read {expected} pages {}",
        ms(guest_time)
    );
    report!("  {what}: host checked {checked} pages  {}", ms(host_time));
    report!(
        "  {what}: KVM_TRANSLATE identity+writable on {swept} pages {}",
        ms(sweep_time)
    );
}

#[test]
fn guest_runs_on_our_page_tables() {
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
    let leaves = l.ram / SIZE_2M;
    let pages = l.ram / PAGE;

    let ram = Rc::new(GuestRam::new(l.ram).unwrap());
    let mut m = Machine::new(kvm, Rc::clone(&ram)).unwrap();
    let mut pt = PageTables::new(TableArena::new(Rc::clone(&ram), l.tables.0, l.tables.1)).unwrap();
    let mut flushes = 0u32;
    report!(
        "kvm_guest: {mib} MiB guest, {pages} pages; tables in [{:#x}, {:#x}); test area \
         [{:#x}, {:#x}) = {} pages; hole {:#x}",
        l.tables.0,
        l.tables.1,
        l.test.0,
        l.test.1,
        l.test_pages(),
        l.hole
    );

    // 1. 2 MiB leaves over all of RAM, long mode on them.
    let t = Instant::now();
    pt.map(0, l.ram, SIZE_2M).unwrap();
    let map_time = t.elapsed();
    let c = expect_census(&pt, &l, leaves, 0);
    our_sweep(&pt, l.ram, NO_SKIP);
    report!(
        "phase 1 map: {} 2 MiB leaves in {} tables {}",
        c.leaves_2m,
        c.tables,
        ms(map_time)
    );
    m.enter_long_mode(pt.root()).unwrap();
    run_clean(&mut m, &l, 0x5eed_0100_0000_0000, NO_SKIP, "phase 1 run");

    // 2. Split every 2 MiB leaf to 4 KiB. No flush is needed for correctness (the translation
    // is unchanged), but KVM has to forget its shadow of the old tables to judge the new ones.
    let t = Instant::now();
    let split = pt.split(0, l.ram).unwrap();
    let split_time = t.elapsed();
    assert_eq!(split as u64, leaves, "2 MiB leaves split");
    let c = expect_census(&pt, &l, 0, pages);
    our_sweep(&pt, l.ram, NO_SKIP);
    report!(
        "phase 2 split: {split} 2 MiB leaves -> {} 4 KiB leaves, {} tables {}",
        c.leaves_4k,
        c.tables,
        ms(split_time)
    );
    m.flush_guest_tlb().unwrap();
    run_clean(&mut m, &l, 0x5eed_0200_0000_0000, NO_SKIP, "phase 2 run");

    // 3. Unmap one 4 KiB page: the guest must fault exactly there, and nowhere else.
    let t = Instant::now();
    pt.unmap(l.hole, &mut || {
        flushes += 1;
        m.flush_guest_tlb()
    })
    .unwrap();
    let unmap_time = t.elapsed();
    expect_census(&pt, &l, 0, pages - 1);
    our_sweep(&pt, l.ram, l.hole);
    report!(
        "phase 3 unmap: {:#x} {} (with {flushes} TLB flush)",
        l.hole,
        ms(unmap_time)
    );
    let seed3 = 0x5eed_0300_0000_0000;
    let t = Instant::now();
    let exit = m
        .run(Pass {
            start: l.test.0,
            end: l.test.1,
            seed: seed3,
            skip: NO_SKIP,
        })
        .unwrap();
    let fault_time = t.elapsed();
    // Error code 0x2: a supervisor write (W=1) to a non-present page (P=0), no reserved bit.
    assert_eq!(
        exit,
        Exit::PageFault {
            cr2: l.hole,
            error: 0x2,
            rip: guest::WRITE_RIP
        }
    );
    // The write loop stopped at the hole: the pages below it carry this run's pattern, the
    // hole and the pages above still carry phase 2's.
    let below = check_pattern(m.ram(), (l.test.0, l.hole), seed3, NO_SKIP);
    let above = check_pattern(m.ram(), (l.hole, l.test.1), 0x5eed_0200_0000_0000, NO_SKIP);
    report!(
        "phase 3 fault: #PF cr2={:#x} error=0x2 rip={:#x}; {below} pages below written, \
         hole + {} pages above untouched {}",
        l.hole,
        guest::WRITE_RIP,
        above - 1,
        ms(fault_time)
    );
    run_clean(
        &mut m,
        &l,
        0x5eed_0400_0000_0000,
        l.hole,
        "phase 3 run skipping the hole",
    );
    assert_eq!(
        m.ram().read_u64(l.hole),
        guest::pattern(l.hole, 0x5eed_0200_0000_0000)
    );

    // 4. Put the page back and collapse: back to 2 MiB leaves only.
    let t = Instant::now();
    pt.map(l.hole, l.hole + PAGE, PAGE).unwrap();
    let collapsed = pt
        .collapse(0, l.ram, &mut || {
            flushes += 1;
            m.flush_guest_tlb()
        })
        .unwrap();
    let collapse_time = t.elapsed();
    assert_eq!(collapsed as u64, leaves, "4 KiB tables collapsed");
    let c = expect_census(&pt, &l, leaves, 0);
    our_sweep(&pt, l.ram, NO_SKIP);
    report!(
        "phase 4 collapse: {collapsed} tables -> 2 MiB leaves; census {} 2 MiB leaves, {} 4 KiB \
         leaves, {} tables (peak {}) {}",
        c.leaves_2m,
        c.leaves_4k,
        c.tables,
        pt.arena().peak(),
        ms(collapse_time)
    );
    run_clean(&mut m, &l, 0x5eed_0500_0000_0000, NO_SKIP, "phase 4 run");

    report!(
        "kvm_guest: all checks passed, {flushes} TLB flushes, total {}",
        ms(total.elapsed())
    );
}
