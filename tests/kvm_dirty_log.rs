//! Dirty logging proved on a real CPU MMU: a KVM guest runs on page tables that an MMU
//! builds one fault at a time, and the log that MMU returns must hold exactly the pages the
//! guest says it wrote.
//!
//! The guest program (`kvm::dirty`) writes pseudo-random pages of a 4 MiB test region and
//! appends each page's address to a ground-truth list in its own memory (outside the logged
//! region); it also reads other pages. Every #PF reaches the guest's handler, which exits to
//! the host; the host hands the fault to the MMU behind [`GuestMmu`], reloads the memslot
//! (a KVM that shadows guest tables sees host edits of them only then) and resumes the guest,
//! which retries the faulting instruction.
//!
//! Two scenarios, each on a fresh VM and MMU, after a warm-up round without logging (so the
//! region holds writable mappings that enabling the log must write-protect):
//!
//! - (a) enable logging (log initially clear): an immediate get returns nothing; then three
//!   rounds of guest writes, each followed by get-and-clear;
//! - (b) enable logging with the log initially all set: the first get returns every page of
//!   the region; the next two rounds are exact.
//!
//! Both end with a round that only reads: its log must be empty.
//!
//! After each round the log must contain every page of the guest's list (no lost write) and,
//! logging at 4 KiB, nothing else (no page the guest only read); what it returned must be
//! write-protected again in the tables (read with an independent walker, `kvm::inspect`),
//! with a TLB flush asked for when a writable page lost its write permission; and each
//! written page's first word, read through the tables' translation in guest-physical memory,
//! holds what the guest stored.
//!
//! What the guest can and cannot judge here: this host runs ring-0 guest code in KVM's
//! emulator, whose page walks read our tables afresh. Measured: with every memslot reload
//! taken out, the test still passed, so a missing TLB flush would go unseen by the guest.
//! Hence the flush checks are made on the MMU's requests (a [`TlbFlush`] that counts), not on
//! guest behaviour; the reloads stay, for hosts whose KVM keeps a shadow of our tables. What
//! the guest does judge: a missing write-protect (enable or get-and-clear) loses writes, a
//! read fault mapped writable loses writes, a read marked dirty shows as an extra page (each
//! of these, put into the stand-in, failed the test).
//!
//! The MMU here is a stand-in ([`StandIn`]) over `hvmem::spt::PageTable` until the shadow
//! MMU lands; swapping it means implementing [`GuestMmu`] for the real one and changing
//! [`new_mmu`].
//!
//! Skip policy as in `kvm_guest.rs`: `skipped: /dev/kvm not available` only when the device
//! does not exist; `HVMEM_REQUIRE_KVM=1` makes that a failure; `HVMEM_KVM_DEVICE` names
//! another device path.
#![cfg(all(target_os = "linux", target_arch = "x86_64"))]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod kvm;

use std::collections::BTreeSet;
use std::io::Write as _;
use std::rc::Rc;
use std::time::{Duration, Instant};

use hvmem::spt::{
    MapSize, PageTable, TableArena, TlbFlush, TranslateError, WalkFlags, X86_64, X86Flags,
};
use hvmem::{Hpa, Level, Va};
use kvm::dirty::{
    self, CountingTlb, GuestMmu, REGION_BASE, REGION_PAGES, Round, prefault_system, run_round,
};
use kvm::guest;
use kvm::inspect;
use kvm::machine::Machine;
use kvm::ram::{GuestRam, PAGE};

const MIB: u64 = 1 << 20;
/// Guest RAM: the system area, the table arena, the data area.
const RAM: u64 = 8 * MIB;
/// The stand-in's table arena (guest-physical).
const TABLES: (u64, u64) = (guest::SYSTEM_END, 4 * MIB);
/// Where the stand-in puts the test region's pages (guest-physical): page `i` of the region
/// is page `i` of this area.
const DATA: u64 = 4 * MIB;
const _: () = assert!(DATA + REGION_PAGES * PAGE <= RAM);
/// Writes and reads per round (ring-0 guest code is emulated on this host: keep it small).
const WRITES: u64 = 200;
const READS: u64 = 100;
/// Rounds with logging on, per scenario.
const ROUNDS: u64 = 3;

/// Writes one line of the report to stderr, past the test harness's output capture.
macro_rules! report {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// A list of pages for a failure message: how many, and the first few.
fn few<'a>(pages: impl IntoIterator<Item = &'a u64>) -> String {
    let pages: Vec<u64> = pages.into_iter().copied().collect();
    let shown: Vec<String> = pages.iter().take(8).map(|p| format!("{p:#x}")).collect();
    let more = if pages.len() > 8 { ", ..." } else { "" };
    format!("{} pages [{}{more}]", pages.len(), shown.join(", "))
}

fn region_pages() -> impl Iterator<Item = u64> {
    (0..REGION_PAGES).map(|i| REGION_BASE + i * PAGE)
}

/// The stand-in MMU: direct mode over one x86-64 `PageTable` in guest RAM, 4 KiB pages
/// mapped on demand. The system area is mapped identity and never logged; the test region
/// maps to the data area and is logged once logging is on. With logging on, a read fault
/// maps read-only (keeping `MMU_WRITABLE`: write access may come back), a write fault maps
/// writable or restores write access, and marks the page dirty; enabling the log (unless
/// initially set) and returning pages from the log write-protect them.
struct StandIn<'r> {
    mem: TableArena<'r>,
    pt: PageTable<X86_64>,
    logging: bool,
    dirty: BTreeSet<u64>,
}

impl<'r> StandIn<'r> {
    fn new(ram: &'r GuestRam) -> Result<Self, String> {
        let mut mem = ram.table_arena(TABLES.0, TABLES.1)?;
        let pt = PageTable::<X86_64>::new(&mut mem).map_err(|e| e.to_string())?;
        Ok(Self {
            mem,
            pt,
            logging: false,
            dirty: BTreeSet::new(),
        })
    }

    /// Where `page` maps and whether it is in the logged region; `None` outside both.
    fn target(page: u64) -> Option<(u64, bool)> {
        if (PAGE..guest::SYSTEM_END).contains(&page) {
            Some((page, false))
        } else if (REGION_BASE..REGION_BASE + REGION_PAGES * PAGE).contains(&page) {
            Some((DATA + (page - REGION_BASE), true))
        } else {
            None
        }
    }

    /// Sets or clears WRITABLE on `[start, start + len)` and flushes as protect asks.
    fn protect<T: TlbFlush>(
        &mut self,
        start: u64,
        len: u64,
        writable: bool,
        tlb: &mut T,
    ) -> Result<(), String> {
        let (set, clear) = if writable {
            (X86Flags::WRITABLE, X86Flags::empty())
        } else {
            (X86Flags::empty(), X86Flags::WRITABLE)
        };
        let va = Va::new(start).map_err(|e| e.to_string())?;
        let pending = self
            .pt
            .protect(&mut self.mem, va, len, set, clear, WalkFlags::empty())
            .map_err(|e| format!("protect [{start:#x}, +{len:#x}): {e}"))?;
        pending
            .flush(tlb, &mut self.mem)
            .map_err(|e| format!("flush after protect: {e}"))
    }
}

impl GuestMmu for StandIn<'_> {
    fn root(&self) -> u64 {
        self.pt.root().get()
    }

    fn fault<T: TlbFlush>(&mut self, gva: u64, write: bool, tlb: &mut T) -> Result<(), String> {
        let page = gva & !(PAGE - 1);
        let (gpa, logged) = Self::target(page).ok_or("outside every region")?;
        let logging = logged && self.logging;
        let va = Va::new(page).map_err(|e| e.to_string())?;
        match self.pt.translate(&self.mem, va) {
            Ok(t) => {
                if t.pa.get() != gpa {
                    return Err(format!("{page:#x} maps to {:#x}, not {gpa:#x}", t.pa.get()));
                }
                if !write || t.flags.contains(X86Flags::WRITABLE) {
                    return Ok(()); // spurious: the mapping already allows the access
                }
                if !t.flags.contains(X86Flags::MMU_WRITABLE) {
                    return Err("write to a page the MMU keeps read-only".into());
                }
                self.protect(page, PAGE, true, tlb)?;
            }
            Err(TranslateError::NotMapped) => {
                let mut flags = X86Flags::PRESENT | X86Flags::MMU_WRITABLE;
                if write || !logging {
                    flags |= X86Flags::WRITABLE;
                }
                let pa = Hpa::new(gpa).map_err(|e| e.to_string())?;
                let four_kib = MapSize::Exactly(Level::L1);
                self.pt
                    .map(
                        &mut self.mem,
                        va,
                        pa,
                        PAGE,
                        flags,
                        four_kib,
                        WalkFlags::empty(),
                    )
                    .map_err(|e| format!("map: {e}"))?;
            }
            Err(e) => return Err(format!("translate: {e}")),
        }
        if write && logging {
            self.dirty.insert(page);
        }
        Ok(())
    }

    fn enable_log<T: TlbFlush>(&mut self, initially_set: bool, tlb: &mut T) -> Result<(), String> {
        self.logging = true;
        if initially_set {
            // KVM_DIRTY_LOG_INITIALLY_SET: every page is dirty, and write protection waits
            // for the first clear.
            self.dirty.extend(region_pages());
            Ok(())
        } else {
            self.protect(REGION_BASE, REGION_PAGES * PAGE, false, tlb)
        }
    }

    fn get_and_clear_log<T: TlbFlush>(&mut self, tlb: &mut T) -> Result<Vec<u64>, String> {
        let pages = std::mem::take(&mut self.dirty);
        for &page in &pages {
            self.protect(page, PAGE, false, tlb)?;
        }
        Ok(pages.into_iter().collect())
    }
}

/// The MMU under test, building its tables in `ram`. The one line to change for another
/// [`GuestMmu`].
///
/// For the shadow MMU (direct mode, x86-64 format: gfn N is guest-virtual `N << 12`), an
/// adapter owns the MMU, its fault caches, a host-memory view and two memslots: the system
/// area (gfns 1..512, host page = gfn, never logged) and the test region (base gfn
/// `REGION_BASE >> 12`, `REGION_PAGES` pages, host page `(DATA >> 12) + (gfn - base)`). Then
/// `root` is the MMU's root, `fault` its page fault at `gva` as the input address, `enable_log`
/// enables logging on the region's slot, and `get_and_clear_log` turns the slot's bitmap into
/// addresses (`REGION_BASE + bit * PAGE`). The table arena stays `TABLES`.
fn new_mmu(ram: &GuestRam) -> StandIn<'_> {
    StandIn::new(ram).unwrap()
}

/// The region pages the tables map writable, by an independent walk of the raw entries.
fn writable_pages(ram: &GuestRam, root: u64) -> BTreeSet<u64> {
    const W: u64 = X86Flags::WRITABLE.bits();
    region_pages()
        .filter(|&p| inspect::walk(ram, root, p).is_some_and(|(_, _, e)| e & W != 0))
        .collect()
}

/// Totals over a scenario.
#[derive(Default)]
struct Totals {
    faults: u64,
    written: u64,
    logged: u64,
}

/// One scenario on a fresh VM and MMU: warm-up, enable, `ROUNDS` logged rounds, a read-only
/// round. Every check of the module doc, per round.
fn scenario(kvm: kvm_ioctls::Kvm, initially_set: bool, seed: u64) -> Totals {
    let name = if initially_set {
        "(b) initially set"
    } else {
        "(a) initially clear"
    };
    let start = Instant::now();
    let ram = Rc::new(GuestRam::new(RAM).unwrap());
    let mut m = Machine::new(kvm, Rc::clone(&ram)).unwrap();
    dirty::load(&ram);
    let mut mmu = new_mmu(&ram);
    let pre = prefault_system(&mut mmu).unwrap();
    m.enter_long_mode(mmu.root()).unwrap();
    m.flush_guest_tlb().unwrap();
    let mut totals = Totals::default();

    // Warm-up without logging: leaves writable mappings in the region.
    let warm = Round {
        number: 0,
        seed,
        writes: WRITES,
        reads: READS,
    };
    let t = Instant::now();
    let (list, f) = run_round(&mut m, &ram, &mut mmu, &warm).unwrap();
    assert_eq!(
        list,
        warm.predict().0,
        "{name}: warm-up list vs the host's model"
    );
    check_stored(&ram, mmu.root(), &list, warm.number, name);
    totals.faults += f.total();
    let before = writable_pages(&ram, mmu.root());
    report!(
        "  {name}: prefaulted {pre} system pages; warm-up wrote {} distinct pages, {} faults \
         ({} read, {} write), {} region pages writable, {}",
        list.iter().collect::<BTreeSet<_>>().len(),
        f.total(),
        f.read_not_present,
        f.write_not_present,
        before.len(),
        ms(t.elapsed())
    );
    assert!(!before.is_empty());

    let mut tlb = CountingTlb::default();
    mmu.enable_log(initially_set, &mut tlb).unwrap();
    m.flush_guest_tlb().unwrap();
    if !initially_set {
        let left = writable_pages(&ram, mmu.root());
        assert!(
            left.is_empty(),
            "{name}: writable after enable: {}",
            few(&left)
        );
        assert!(tlb.total() >= 1, "{name}: write-protect asked for no flush");
        let mut tlb = CountingTlb::default();
        let log = mmu.get_and_clear_log(&mut tlb).unwrap();
        m.flush_guest_tlb().unwrap();
        assert!(
            log.is_empty(),
            "{name}: log before any write: {}",
            few(&log)
        );
    }
    report!(
        "  {name}: logging enabled, {} TLB flushes asked",
        tlb.total()
    );

    let mut previous = BTreeSet::new();
    for number in 1..=ROUNDS + 1 {
        let read_only = number == ROUNDS + 1;
        let round = Round {
            number,
            seed: seed ^ number.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
            writes: if read_only { 0 } else { WRITES },
            reads: READS,
        };
        let t = Instant::now();
        let (list, f) = run_round(&mut m, &ram, &mut mmu, &round).unwrap();
        let guest_time = t.elapsed();
        let (want_writes, reads) = round.predict();
        assert_eq!(
            list, want_writes,
            "{name} round {number}: list vs the host's model"
        );
        let written: BTreeSet<u64> = list.iter().copied().collect();
        let only_read: BTreeSet<u64> = reads
            .iter()
            .copied()
            .filter(|p| !written.contains(p))
            .collect();
        check_stored(&ram, mmu.root(), &list, number, name);

        let writable = writable_pages(&ram, mmu.root());
        let mut tlb = CountingTlb::default();
        let t = Instant::now();
        let log = mmu.get_and_clear_log(&mut tlb).unwrap();
        let get_time = t.elapsed();
        m.flush_guest_tlb().unwrap();
        let logged: BTreeSet<u64> = log.iter().copied().collect();
        assert_eq!(
            logged.len(),
            log.len(),
            "{name} round {number}: duplicates in the log"
        );
        let lost: Vec<u64> = written.difference(&logged).copied().collect();
        assert!(
            lost.is_empty(),
            "{name} round {number}: lost writes {}",
            few(&lost)
        );
        if initially_set && number == 1 {
            let all: BTreeSet<u64> = region_pages().collect();
            assert_eq!(logged, all, "{name}: first log is not the whole region");
        } else {
            let extra: Vec<u64> = logged.difference(&written).copied().collect();
            assert!(
                extra.is_empty(),
                "{name} round {number}: logged but not written {}",
                few(&extra)
            );
        }
        let still = writable_pages(&ram, mmu.root());
        let unprotected: Vec<u64> = logged.intersection(&still).copied().collect();
        assert!(
            unprotected.is_empty(),
            "{name} round {number}: returned but still writable {}",
            few(&unprotected)
        );
        if logged.intersection(&writable).next().is_some() {
            assert!(tlb.total() >= 1, "{name} round {number}: no flush asked");
        }
        totals.faults += f.total();
        totals.written += written.len() as u64;
        totals.logged += log.len() as u64;
        report!(
            "  {name} round {number}: {} writes to {} distinct pages ({} also written the \
             round before), {} pages only read; faults: {} read, {} write not-present, {} \
             write-protect; log {} pages (get+clear {}, {} flushes asked); guest {}",
            list.len(),
            written.len(),
            written.intersection(&previous).count(),
            only_read.len(),
            f.read_not_present,
            f.write_not_present,
            f.write_protected,
            log.len(),
            ms(get_time),
            tlb.total(),
            ms(guest_time)
        );
        if read_only {
            assert!(log.is_empty());
        } else {
            assert!(f.write_protected + f.write_not_present > 0);
            assert!(
                !only_read.is_empty(),
                "the round read no page it did not write"
            );
        }
        previous = written;
    }
    report!("  {name}: done in {}", ms(start.elapsed()));
    totals
}

/// Each page of `list` holds `page + round` in its first word, read in guest-physical memory
/// at the address the tables translate it to.
fn check_stored(ram: &GuestRam, root: u64, list: &[u64], round: u64, what: &str) {
    for &page in list {
        let (gpa, _, _) = inspect::walk(ram, root, page)
            .unwrap_or_else(|| panic!("{what}: written page {page:#x} not mapped"));
        assert_eq!(ram.read_u64(gpa), page + round, "{what}: word at {page:#x}");
    }
}

#[test]
fn dirty_log_matches_guest_writes() {
    let require = match std::env::var("HVMEM_REQUIRE_KVM").as_deref() {
        Ok("1") => true,
        Ok("0") | Ok("") | Err(_) => false,
        Ok(v) => panic!("HVMEM_REQUIRE_KVM={v}: want 1 (require KVM) or 0"),
    };
    let open = || match Machine::open_kvm() {
        Ok(kvm) => kvm,
        Err(e) => panic!("the KVM device exists but is not usable: {e}"),
    };
    let Some(kvm) = open() else {
        assert!(
            !require,
            "HVMEM_REQUIRE_KVM=1 but the KVM device does not exist"
        );
        report!("skipped: /dev/kvm not available");
        return;
    };
    let total = Instant::now();
    report!(
        "kvm_dirty_log: region {REGION_PAGES} pages at {REGION_BASE:#x}, {WRITES} writes + \
         {READS} reads per round"
    );
    let a = scenario(kvm, false, 0x2545_f491_4f6c_dd1d);
    let kvm = open().expect("the KVM device went away");
    let b = scenario(kvm, true, 0x9e37_79b9_7f4a_7c15);
    report!(
        "kvm_dirty_log: all checks passed: {} faults handled, {} pages written, {} pages \
         logged, in {}",
        a.faults + b.faults,
        a.written + b.written,
        a.logged + b.logged,
        ms(total.elapsed())
    );
}
