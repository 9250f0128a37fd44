//! A real KVM guest runs on identity page tables built by `hvmem::spt` inside its own RAM;
//! KVM's page walker is the judge of our x86-64 format.
//!
//! Phases, most followed by a guest run that writes a pattern into every 4 KiB page of the
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
//! 4. `protect` clears WRITABLE on a few 4 KiB ranges (the edges of tables and of the hole),
//!    then sets it again;
//! 5. `map` the page back and `collapse`: the tables must be back to 2 MiB leaves only (and
//!    to the 3 tables of phase 1), and the guest must pass again;
//! 6. `protect` clears WRITABLE on two whole 2 MiB leaves, then sets it again.
//!
//! Write permission is judged by the guest, not by `KVM_TRANSLATE` (whose `writeable` is 1
//! for every page on x86). In phases 4 and 6 a probe stores to a sample of pages: every page
//! of each protected range, the page on each side of it, and every 509th page of the test
//! area. Exactly the protected pages must fault, with CR2 = the page and error code P|W
//! (present, write), and keep their contents (reads before and after the store work); every
//! other store must land. Once WRITABLE is back, every store of the same sample must land.
//!
//! After every operation the tables are inspected three ways: an independent reader of the
//! raw entries (`kvm::inspect`), hvmem's own `table_count` and `translate` (every page), and
//! the arena's allocation count; all must agree (no table leaked).
//!
//! Guest RAM defaults to 256 MiB; `HVMEM_KVM_GUEST_MIB` (64..=1024, even) changes it.
//! The report goes straight to stderr so it shows in CI logs without `--nocapture`.
//!
//! Only when the KVM device does not exist does the test print `skipped: /dev/kvm not
//! available` and pass; any other failure to open or use KVM fails it. With
//! `HVMEM_REQUIRE_KVM=1` (CI sets it where /dev/kvm exists) a missing device fails too.
//! `HVMEM_KVM_DEVICE` names another device path (e.g. `/nonexistent` to see the skip).
#![cfg(all(target_os = "linux", target_arch = "x86_64"))]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod kvm;

use std::collections::BTreeSet;
use std::io::Write as _;
use std::rc::Rc;
use std::time::{Duration, Instant};

use hvmem::spt::{MapSize, PageTable, SplitTo, TableArena, WalkFlags, X86_64, X86Flags};
use hvmem::{Hpa, Level, Va};
use kvm::guest::{self, ProbeRecord};
use kvm::inspect::{self, Census};
use kvm::machine::{Exit, KvmTlb, Machine, Pass};
use kvm::protect;
use kvm::ram::{GuestRam, PAGE};

const MIB: u64 = 1 << 20;
const SIZE_2M: u64 = 2 * MIB;
/// Address the pattern loop never reaches: "skip nothing".
const NO_SKIP: u64 = u64::MAX;
/// Leaf flags of the identity map.
const FLAGS: X86Flags = X86Flags::PRESENT.union(X86Flags::WRITABLE);
const ACCESSED: u64 = X86Flags::ACCESSED.bits();
/// #PF error code bits (SDM vol. 3, "Interrupt 14—Page-Fault Exception"): P = the page was
/// present (a protection violation), W = the access was a write.
const PF_P: u64 = 1 << 0;
const PF_W: u64 = 1 << 1;
/// The probe samples every this-many-th page of the test area besides the protection
/// boundaries (a prime, so the sample lands on every offset within a table over a run).
const SAMPLE_STRIDE: usize = 509;
/// Mixed into the salt of the probe after write permission is restored.
const RESTORED: u64 = 0x0000_00ff_0000_0000;
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
    /// Checks the pattern of `salt` in `range` except `except`; returns pages checked.
    fn check_pattern(&self, range: (u64, u64), salt: u64, except: u64) -> u64 {
        let mut n = 0;
        for page in self.l.pages(range).filter(|&p| p != except) {
            let (first, last) = (self.ram.read_u64(page), self.ram.read_u64(page + PAGE - 8));
            assert_eq!(
                first,
                guest::pattern(page, salt),
                "first word of page {page:#x}"
            );
            assert_eq!(
                last,
                guest::pattern_last(page, salt),
                "last word of page {page:#x}"
            );
            n += 1;
        }
        n
    }

    /// `KVM_TRANSLATE` of every page of guest RAM: identity, except `hole` which must not
    /// translate. Returns pages translated. (Not writability: `KVM_TRANSLATE` reports every
    /// page writable on x86; the probe phases judge write permission by guest stores.)
    fn kvm_sweep(&self, hole: u64) -> u64 {
        let mut n = 0;
        for page in self.l.pages((0, self.l.ram)) {
            let t = self.m.kvm_translate(page + 0x123).unwrap();
            if page == hole {
                assert_eq!(t, None, "KVM still translates the unmapped page {page:#x}");
            } else {
                assert_eq!(t, Some(page + 0x123), "KVM_TRANSLATE of {page:#x}");
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

    /// The pages a write-protect phase probes: every page of each protected range, the
    /// page on either side of each range (where protection must stop), and every
    /// `SAMPLE_STRIDE`-th page of the test area; never `hole`. Sorted, no duplicates.
    fn probe_sample(&self, ranges: &[(u64, u64)], hole: u64) -> Vec<u64> {
        let mut pages = std::collections::BTreeSet::new();
        for &(start, len) in ranges {
            pages.extend(self.l.pages((start, start + len)));
            pages.insert(start.wrapping_sub(PAGE));
            pages.insert(start + len);
        }
        pages.extend(self.l.pages(self.l.test).step_by(SAMPLE_STRIDE));
        pages
            .into_iter()
            .filter(|&p| p != hole && self.l.test.0 <= p && p < self.l.test.1)
            .collect()
    }

    /// Both readers of the tables agree that each of `pages` is mapped (identity, present)
    /// and writable exactly when it is not in `protected`; `hole` stays unmapped.
    fn expect_writable(&self, pages: &[u64], protected: &BTreeSet<u64>, hole: u64) {
        const W: u64 = X86Flags::WRITABLE.bits();
        for &page in pages {
            let want = !protected.contains(&page);
            let (pa, _, entry) = inspect::walk(self.ram, self.pt.root().get(), page)
                .unwrap_or_else(|| panic!("{page:#x} not mapped"));
            assert_eq!(pa, page, "identity of {page:#x}");
            assert_eq!(entry & W != 0, want, "W bit of {page:#x}: {entry:#x}");
            let t = self.pt.translate(&self.mem, va(page)).unwrap();
            assert_eq!(
                t.flags.contains(X86Flags::WRITABLE),
                want,
                "hvmem's flags of {page:#x}: {:?}",
                t.flags
            );
        }
        if hole != NO_SKIP {
            assert_eq!(inspect::walk(self.ram, self.pt.root().get(), hole), None);
        }
    }

    /// The guest stores `page ^ salt` into each of `pages`: exactly the `protected` ones
    /// fault, with CR2 = the page and error code P|W, and keep their value (the reads
    /// before and after the store still work); every other store lands. Returns the faults.
    fn probe(&mut self, pages: &[u64], protected: &BTreeSet<u64>, salt: u64, what: &str) -> u64 {
        let before: Vec<u64> = pages.iter().map(|&p| self.ram.read_u64(p)).collect();
        let (exit, records) = self.m.probe(pages, salt).unwrap();
        assert_eq!(
            exit,
            Exit::Done {
                pages: pages.len() as u64
            },
            "{what}: probe run"
        );
        let mut faults = 0;
        for ((&page, rec), &old) in pages.iter().zip(&records).zip(&before) {
            assert_eq!(rec.before, old, "{what}: guest read of {page:#x}");
            if protected.contains(&page) {
                let fault = ProbeRecord {
                    cr2: page,
                    error: PF_P | PF_W,
                    before: old,
                    after: old,
                };
                assert_eq!(*rec, fault, "{what}: store to protected {page:#x}");
                assert_eq!(self.ram.read_u64(page), old, "{what}: {page:#x} changed");
                faults += 1;
            } else {
                let stored = ProbeRecord {
                    cr2: 0,
                    error: 0,
                    before: old,
                    after: page ^ salt,
                };
                assert_eq!(*rec, stored, "{what}: store to writable {page:#x}");
                assert_eq!(self.ram.read_u64(page), page ^ salt, "{what}: {page:#x}");
            }
        }
        faults
    }

    /// A write-protect phase: `protect` clears WRITABLE on `ranges`, the tables show it, the
    /// guest probes the sample (faults exactly on the protected pages); then WRITABLE is set
    /// again and the same probe must store everywhere. `census` is the (2 MiB, 4 KiB) leaf
    /// count the tables keep throughout.
    fn write_protect(
        &mut self,
        ranges: &[(u64, u64)],
        hole: u64,
        census: (u64, u64),
        salt: u64,
        what: &str,
    ) {
        let protected: BTreeSet<u64> = ranges
            .iter()
            .flat_map(|&(start, len)| self.l.pages((start, start + len)))
            .filter(|&p| p != hole)
            .collect();
        let sample = self.probe_sample(ranges, hole);
        let t = Instant::now();
        let f = protect::set_writable(&mut self.pt, &mut self.mem, &self.m, ranges, false).unwrap();
        let protect_time = t.elapsed();
        assert!(
            f.ranges + f.all >= 1,
            "{what}: write protection flushed nothing"
        );
        self.expect_census(census.0, census.1);
        self.expect_writable(&sample, &protected, hole);
        let t = Instant::now();
        let faults = self.probe(&sample, &protected, salt, what);
        let probe_time = t.elapsed();
        assert_eq!(
            faults,
            sample.iter().filter(|p| protected.contains(p)).count() as u64
        );
        report!(
            "  {what}: WRITABLE cleared on {} pages in {} ranges ({} ranged + {} full flushes, \
             {}); guest probed {} pages: {faults} stores faulted with P|W, {} landed, {}",
            protected.len(),
            ranges.len(),
            f.ranges,
            f.all,
            ms(protect_time),
            sample.len(),
            sample.len() as u64 - faults,
            ms(probe_time)
        );

        // Give write permission back. hvmem asks for a flush here too (any changed entry is
        // gathered); on hardware a stale read-only entry would only cost a spurious fault.
        let f = protect::set_writable(&mut self.pt, &mut self.mem, &self.m, ranges, true).unwrap();
        assert!(
            f.ranges + f.all >= 1,
            "{what}: restoring WRITABLE flushed nothing"
        );
        self.expect_census(census.0, census.1);
        self.expect_writable(&sample, &BTreeSet::new(), hole);
        let t = Instant::now();
        let faults = self.probe(&sample, &BTreeSet::new(), salt ^ RESTORED, what);
        assert_eq!(faults, 0);
        report!(
            "  {what}: WRITABLE restored; guest stores landed on all {} probed pages, {}",
            sample.len(),
            ms(t.elapsed())
        );
    }

    /// A guest run that must pass on the whole test area (but `hole`), then the host check,
    /// the A/D check and the KVM sweep.
    fn run_clean(&mut self, salt: u64, hole: u64, what: &str) {
        let l = &self.l;
        let t = Instant::now();
        let exit = self
            .m
            .run(Pass {
                start: l.test.0,
                end: l.test.1,
                salt,
                skip: hole,
            })
            .unwrap();
        let guest_time = t.elapsed();
        let expected = l.test_pages() - u64::from(l.test.0 <= hole && hole < l.test.1);
        assert_eq!(exit, Exit::Done { pages: expected }, "{what}: guest run");
        let t = Instant::now();
        let checked = self.check_pattern(self.l.test, salt, hole);
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
            "  {what}: KVM_TRANSLATE identity on {swept} pages in {}",
            ms(sweep_time)
        );
    }
}

#[test]
fn guest_runs_on_hvmem_page_tables() {
    let require = match std::env::var("HVMEM_REQUIRE_KVM").as_deref() {
        Ok("1") => true,
        Ok("0") | Ok("") | Err(_) => false,
        Ok(v) => panic!("HVMEM_REQUIRE_KVM={v}: want 1 (require KVM) or 0"),
    };
    let kvm = match Machine::open_kvm() {
        Ok(Some(kvm)) => kvm,
        Ok(None) if require => panic!("HVMEM_REQUIRE_KVM=1 but the KVM device does not exist"),
        Ok(None) => {
            report!("skipped: /dev/kvm not available");
            return;
        }
        Err(e) => panic!("the KVM device exists but is not usable: {e}"),
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
    r.pt.map(
        &mut r.mem,
        va(0),
        hpa(0),
        r.l.ram,
        FLAGS,
        two_mib,
        WalkFlags::empty(),
    )
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
    r.run_clean(0x5a17_0100_0000_0000, NO_SKIP, "phase 1 run");

    // 2. Split every 2 MiB leaf to 4 KiB. Split needs no TLB flush (translations do not
    // change), but KVM must forget its shadow of the old tables to judge the new ones.
    let t = Instant::now();
    let split =
        r.pt.split(
            &mut r.mem,
            va(0),
            r.l.ram,
            SplitTo::Level(Level::L1),
            WalkFlags::empty(),
        )
        .unwrap();
    let split_time = t.elapsed();
    assert_eq!(split.resume_at, None, "split ran out of tables");
    let split = split.split;
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
    r.run_clean(0x5a17_0200_0000_0000, NO_SKIP, "phase 2 run");

    // 3. Unmap one 4 KiB page: the guest must fault exactly there, and nowhere else.
    let hole = r.l.hole;
    let t = Instant::now();
    let pending = r.pt.unmap(&mut r.mem, va(hole), PAGE).unwrap();
    let mut tlb = KvmTlb::new(&r.m);
    pending.flush(&mut tlb, &mut r.mem).unwrap();
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
    let salt3 = 0x5a17_0300_0000_0000;
    let t = Instant::now();
    let exit = r.m.run(Pass {
        start: r.l.test.0,
        end: r.l.test.1,
        salt: salt3,
        skip: NO_SKIP,
    });
    let fault_time = t.elapsed();
    // Error code 0x2: a supervisor write (W=1) to a non-present page (P=0), no reserved bit.
    assert_eq!(
        exit.unwrap(),
        Exit::PageFault {
            cr2: hole,
            error: PF_W,
            rip: guest::WRITE_RIP
        }
    );
    // The write loop stopped at the hole: the pages below it carry this run's pattern, the
    // hole and the pages above still carry phase 2's.
    let below = r.check_pattern((r.l.test.0, hole), salt3, NO_SKIP);
    let above = r.check_pattern((hole, r.l.test.1), 0x5a17_0200_0000_0000, NO_SKIP);
    report!(
        "phase 3 fault: #PF handler saw cr2={hole:#x} error=0x2 rip={:#x}; {below} pages \
         below written, the hole and {} pages above untouched; {}",
        guest::WRITE_RIP,
        above - 1,
        ms(fault_time)
    );
    r.run_clean(0x5a17_0300_0000_0001, hole, "phase 3 run skipping the hole");
    assert_eq!(
        r.ram.read_u64(hole),
        guest::pattern(hole, 0x5a17_0200_0000_0000)
    );

    // 4. Write-protect 4 KiB leaves: the first page of the test area (entry 0 of its
    // table), three pages across a 2 MiB boundary (two tables), three pages around the hole
    // (protect must leave the hole unmapped) and the last page of RAM (entry 511).
    let boundary = r.l.test.0 + 2 * SIZE_2M;
    let ranges = [
        (r.l.test.0, PAGE),
        (boundary - PAGE, 3 * PAGE),
        (hole - PAGE, 3 * PAGE),
        (r.l.test.1 - PAGE, PAGE),
    ];
    report!("phase 4 write-protect 4 KiB leaves: {ranges:x?}");
    r.write_protect(
        &ranges,
        hole,
        (0, pages - 1),
        0x5a17_0400_0000_0000,
        "phase 4",
    );
    r.our_sweep(Level::L1, hole);

    // 5. Put the page back (a fresh leaf without A/D: collapse takes the union) and
    // collapse: back to 2 MiB leaves only.
    let t = Instant::now();
    let four_kib = MapSize::Exactly(Level::L1);
    r.pt.map(
        &mut r.mem,
        va(hole),
        hpa(hole),
        PAGE,
        FLAGS,
        four_kib,
        WalkFlags::empty(),
    )
    .unwrap();
    let mut tlb = KvmTlb::new(&r.m);
    // One call collapses as many tables as its pending flush can hold: repeat.
    let mut collapsed = 0;
    loop {
        let pending =
            r.pt.collapse(&mut r.mem, va(0), r.l.ram, Level::L2)
                .unwrap();
        collapsed += pending.tables_to_free();
        let again = pending.is_incomplete();
        pending.flush(&mut tlb, &mut r.mem).unwrap();
        if !again {
            break;
        }
    }
    let collapse_time = t.elapsed();
    assert_eq!(tlb.error, None);
    let flushes = (tlb.ranges, tlb.all);
    assert!(flushes.0 + flushes.1 >= 1, "collapse flushed nothing");
    assert_eq!(collapsed as u64, leaves, "4 KiB tables collapsed");
    let c = r.expect_census(leaves, 0);
    r.our_sweep(Level::L2, NO_SKIP);
    report!(
        "phase 5 collapse: {collapsed} tables -> 2 MiB leaves; census {} 2 MiB leaves, {} 4 KiB \
         leaves, {} tables; TLB flushes {} ranged + {} full; {}",
        c.leaves_2m,
        c.leaves_4k,
        c.tables,
        flushes.0,
        flushes.1,
        ms(collapse_time)
    );
    r.run_clean(0x5a17_0500_0000_0000, NO_SKIP, "phase 5 run");

    // 6. Write-protect whole 2 MiB leaves: the one that held the hole and the last one.
    let ranges = [
        (hole & !(SIZE_2M - 1), SIZE_2M),
        (r.l.test.1 - SIZE_2M, SIZE_2M),
    ];
    report!("phase 6 write-protect 2 MiB leaves: {ranges:x?}");
    r.write_protect(
        &ranges,
        NO_SKIP,
        (leaves, 0),
        0x5a17_0600_0000_0000,
        "phase 6",
    );
    r.our_sweep(Level::L2, NO_SKIP);

    report!("kvm_guest: all checks passed in {}", ms(total.elapsed()));
}
