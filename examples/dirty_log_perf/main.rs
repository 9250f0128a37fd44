//! Dirty-log performance of the shadow MMU, eager against lazy huge-page splitting, after
//! KVM's `tools/testing/selftests/kvm/dirty_log_perf_test.c` and the tables of Matlack,
//! "[00/23] Extend Eager Page Splitting to the shadow MMU", 2022-02-03,
//! <20220203010051.2813563-1-dmatlack@google.com>.
//!
//! N vCPU threads each own a region of guest memory (one memory slot holds them all, as in
//! KVM's default `-x 1`), backed by 2 MiB or 1 GiB host pages. The vCPUs populate their
//! regions (a write to every 4 KiB page), the main thread enables dirty logging, then for
//! each iteration the vCPUs dirty their memory again — one access per 4 KiB page, a write
//! for 1 in `-f` of them, a read otherwise — and the main thread gets and clears the log.
//! Every phase is timed; the whole run is done with `eager_page_split = N` (a write to a
//! write-protected huge page drops it in the vCPU's fault path and maps one 4 KiB page)
//! and `= Y` (the splitter splits the slot when logging is enabled, or each cleared mask
//! under initially-all-set), and the tables print both side by side with KVM's figures.
//!
//! # What a vCPU does per access
//!
//! No guest code runs: a vCPU thread *is* the guest's memory accesses. Each one is looked up
//! in the thread's software TLB (4 KiB, 2 MiB and 1 GiB entries, 256 + 32 + 4, gfn →
//! (host address, writable)); on a miss it is walked through the shadow tables with
//! [`Mmu::translate_lockless`] (the hardware page walker, no MMU lock) and cached. A write
//! to an entry that is not writable, or an access to an entry that is not present, is a
//! vCPU exit: the thread leaves "guest mode", calls [`Mmu::page_fault`], re-enters and
//! retries, so lazy splitting costs what it costs KVM — an exit, the MMU write lock, a
//! remote TLB flush — and eager splitting turns those exits into fast-path faults under
//! the read lock. The host address is folded into a checksum; no guest bytes are copied
//! (the MMU is what is measured, not `memset`).
//!
//! # The TLB protocol (what makes `translate_lockless` sound here)
//!
//! The MMU reuses a table as soon as the [`TlbFlush`] it was given returns, so a flush must
//! not return while any vCPU could still use a translation from before it — a cached TLB
//! entry, or a walk that started before the tables changed. KVM gets this from
//! `kvm_flush_remote_tlbs`: a request bit per vCPU plus an IPI that the flusher waits for,
//! sent only to vCPUs in guest mode (`vcpu->mode == IN_GUEST_MODE`); a vCPU outside guest
//! mode checks its requests before it re-enters. Here, per vCPU: a `request` generation,
//! an `ack` generation and an `in_guest` flag.
//!
//! - The flusher (any thread: the main thread enabling or clearing the log, or a vCPU inside
//!   `page_fault`) bumps every vCPU's `request` and then waits, for each vCPU, until it has
//!   acked that generation or is not in guest mode.
//! - A vCPU in guest mode compares `request` with the generation it last saw *between
//!   accesses* (never in the middle of a TLB lookup, a walk and the use of its result); if
//!   it moved, it empties its TLB and stores the generation in `ack`. So once the flusher
//!   sees the ack, every walk the vCPU started before the flush has ended and every later
//!   one starts after the table change (the request is read with acquire ordering after
//!   the change was published).
//! - A vCPU leaves guest mode (`in_guest = false`) before it calls into the MMU or waits
//!   for the next iteration, and when it re-enters it sets `in_guest` and then reads
//!   `request` (both sequentially consistent, against the flusher's bump and its read of
//!   `in_guest`: Dekker's pattern, KVM's `smp_mb` after setting `vcpu->mode`). Either the
//!   flusher sees it in guest mode and waits for its ack, or the vCPU sees the new request
//!   and empties its TLB before its first walk. A vCPU waiting for the MMU lock is never
//!   waited for, so a flush under the write lock cannot deadlock against it.
//! - On an exit the vCPU drops the TLB entries of the faulting gfn (as a CPU drops the
//!   entry a page fault was taken on), so a write bit restored by the fast path, which
//!   needs no flush, is seen on the retry.
//!
//! # Options
//!
//! `-v N` vCPUs (2), `-b SIZE` bytes per vCPU (1G; suffix k, m or g), `-s 2m|1g` host page
//! size (1g), `-i N` iterations (2), `-f N` write 1 in N accesses (default: the tables for
//! 1 = 100% writes, then the dirty-memory times for 5 = 20% writes), `-g` only the classic
//! get-and-clear log (`KVM_GET_DIRTY_LOG`, KVM's `-g`), `-m` only the manual one (get, then
//! clear in 64-page masks, with initially-all-set), `--quick` small regions for CI: 2 vCPUs
//! × 64 MiB, 2 MiB pages, 3 iterations. Every run checks that each write a vCPU made after
//! logging was enabled is in the log the main thread gets for that iteration (and, where
//! nothing is initially set, that nothing else is), and ends with [`Mmu::check`]; any
//! failure makes the example exit non-zero.
//!
//! Run: `cargo run --release --example dirty_log_perf` (CI: `-- --quick`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod opts;
mod table;
mod vcpu;

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};

use hvmem::spt::mmu::{FaultCaches, LogMode, Mmu, MmuConfig, MmuStats, SlotFlags, SlotId};
use hvmem::spt::{Ept, TableArena, TableFrame, TableSlot};
use hvmem::{Gfn, Hpa, Level};

use opts::{LogApi, Opts, parse_opts};
use table::*;
use vcpu::{Host, PassReport, RemoteFlush, SoftTlb, Vcpu, VcpuSync};

/// Guest frame of the slot's first page: 4 GiB, aligned for 1 GiB pages.
const SLOT_BASE_GFN: u64 = 1 << 20;
/// Host frame backing guest frame g: `HOST_BASE_PFN + g` (1 GiB aligned).
const HOST_BASE_PFN: u64 = 1 << 22;
/// Where the table frames pretend to live.
const TABLES_PHYS: u64 = 0x1_0000_0000;
const SLOT: SlotId = SlotId(0);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Config {
    eager: bool,
    api: LogApi,
    write_every: u64,
}

impl Config {
    fn name(&self) -> String {
        format!(
            "eager_page_split={} {} f={}",
            if self.eager { 'Y' } else { 'N' },
            match self.api {
                LogApi::Classic => "get-and-clear",
                LogApi::Manual => "manual+initially-set",
            },
            self.write_every
        )
    }
}

#[derive(Default, Clone)]
struct Iteration {
    dirty: Duration,
    get: Duration,
    clear: Duration,
    exits: u64,
    stats: MmuStats,
}

#[derive(Default, Clone)]
struct RunResult {
    populate: Duration,
    enable: Duration,
    iterations: Vec<Iteration>,
    disable: Duration,
    /// Huge entries the splitter split (over the whole run).
    eager_splits: u64,
    flushes: u64,
    failures: Vec<String>,
}

/// Counters since `before`.
fn delta(now: MmuStats, before: MmuStats) -> MmuStats {
    MmuStats {
        fast_fixes: now.fast_fixes - before.fast_fixes,
        slow_faults: now.slow_faults - before.slow_faults,
        huge_dropped: now.huge_dropped - before.huge_dropped,
        eager_splits: now.eager_splits - before.eager_splits,
        ..now
    }
}

const STOP: u64 = u64::MAX;

fn run(o: &Opts, cfg: Config) -> RunResult {
    let pages_per_vcpu = o.bytes >> 12;
    let npages = pages_per_vcpu * o.vcpus as u64;
    // Fully split: one table per 2 MiB, one per 1 GiB, the upper levels, and the caches.
    let frames_needed = (npages / 512 + npages / (512 * 512) + 256) as usize;
    let frames: Vec<TableFrame> = (0..frames_needed).map(|_| TableFrame::new()).collect();
    let mut slots: Vec<TableSlot> = (0..frames_needed).map(|_| TableSlot::default()).collect();
    let arena = TableArena::new(&frames, &mut slots, Hpa::new(TABLES_PHYS).unwrap()).unwrap();
    let mmu = Mmu::<Ept>::new(
        arena,
        MmuConfig {
            eager_split: cfg.eager,
            ..MmuConfig::default()
        },
    )
    .unwrap();
    mmu.add_slot(
        SLOT,
        Gfn::new(SLOT_BASE_GFN).unwrap(),
        npages,
        SlotFlags::empty(),
    )
    .unwrap();
    let host = Host { level: o.backing };
    let sync: Vec<VcpuSync> = (0..o.vcpus).map(|_| VcpuSync::default()).collect();
    let flushes = AtomicU64::new(0);
    let phase = AtomicU64::new(0);
    let start = Barrier::new(o.vcpus + 1);
    let done = Barrier::new(o.vcpus + 1);
    let reports: Vec<Mutex<PassReport>> = (0..o.vcpus)
        .map(|_| Mutex::new(PassReport::default()))
        .collect();
    let mut res = RunResult::default();
    let tag = cfg.name();

    std::thread::scope(|s| {
        for k in 0..o.vcpus {
            let (mmu, host, sync, flushes) = (&mmu, &host, &sync, &flushes);
            let (phase, start, done, report) = (&phase, &start, &done, &reports[k]);
            s.spawn(move || {
                let mut vcpu = Vcpu {
                    mmu,
                    host,
                    me: &sync[k],
                    flush: RemoteFlush {
                        vcpus: sync,
                        flushes,
                    },
                    caches: FaultCaches::new(),
                    tlb: SoftTlb::new(),
                    seen: 0,
                    checksum: 0,
                };
                let first = SLOT_BASE_GFN + k as u64 * pages_per_vcpu;
                loop {
                    start.wait();
                    let it = phase.load(Acquire);
                    if it == STOP {
                        break;
                    }
                    // Pass 0 populates: every page written.
                    let every = if it == 0 { 1 } else { cfg.write_every };
                    let rep = vcpu.pass(first, pages_per_vcpu, every);
                    *report.lock().unwrap() = rep;
                    done.wait();
                }
                let _ = vcpu.caches.release(mmu);
            });
        }

        let mut flush = RemoteFlush {
            vcpus: &sync,
            flushes: &flushes,
        };
        // One pass of every vCPU; its time and reports.
        let pass = |it: u64| -> (Duration, Vec<PassReport>) {
            // KVM's timing: from before the vCPUs are released to the last one's end (taken
            // by the vCPU: this thread may be scheduled out while they run).
            phase.store(it, Release);
            let t = Instant::now();
            start.wait();
            done.wait();
            let reps: Vec<PassReport> = reports
                .iter()
                .map(|r| std::mem::take(&mut *r.lock().unwrap()))
                .collect();
            let end = reps.iter().filter_map(|r| r.end).max();
            (end.map_or(Duration::ZERO, |e| e.duration_since(t)), reps)
        };
        let errors = |res: &mut RunResult, reps: &[PassReport], what: &str| {
            for (k, r) in reps.iter().enumerate() {
                for e in &r.errors {
                    res.failures
                        .push(format!("{what}: vCPU {k}: fault failed at {e}"));
                }
            }
        };

        let (t, reps) = pass(0);
        res.populate = t;
        errors(&mut res, &reps, "populate");
        println!("[{tag}] populate memory time: {:.9}s", t.as_secs_f64());

        let mode = LogMode {
            initially_set: cfg.api == LogApi::Manual,
            granularity: Level::L1,
        };
        let t = Instant::now();
        mmu.enable_dirty_log(SLOT, mode, &mut flush).unwrap();
        res.enable = t.elapsed();

        let words = mmu.dirty_log_words(SLOT).unwrap();
        let mut log = vec![0u64; words];
        for it in 1..=o.iterations as u64 {
            let before = mmu.stats();
            let (dirty, reps) = pass(it);
            let mut iter = Iteration {
                dirty,
                exits: reps.iter().map(|r| r.exits).sum(),
                stats: delta(mmu.stats(), before),
                ..Iteration::default()
            };
            errors(&mut res, &reps, &format!("iteration {it}"));
            match cfg.api {
                LogApi::Classic => {
                    let t = Instant::now();
                    mmu.get_and_clear_dirty_log(SLOT, &mut log, &mut flush)
                        .unwrap();
                    iter.get = t.elapsed();
                }
                LogApi::Manual => {
                    let t = Instant::now();
                    mmu.get_dirty_log(SLOT, &mut log).unwrap();
                    iter.get = t.elapsed();
                    let t = Instant::now();
                    mmu.clear_dirty_log(SLOT, 0, &log, &mut flush).unwrap();
                    iter.clear = t.elapsed();
                }
            }
            // Every write of this pass must be in the log; where no bit starts set (all
            // but the first manual iteration), nothing else may be.
            let exact = !(cfg.api == LogApi::Manual && it == 1);
            let (missing, extra) = compare_log(&log, &reps, pages_per_vcpu);
            if missing > 0 {
                res.failures.push(format!(
                    "iteration {it}: {missing} pages written but not in the dirty log"
                ));
            }
            if exact && extra > 0 {
                res.failures.push(format!(
                    "iteration {it}: {extra} pages in the dirty log but not written"
                ));
            }
            println!(
                "[{tag}] iteration {it}: dirty memory {:.9}s, {} exits ({} fast, {} slow, \
                 {} huge pages dropped), get {:.9}s{}",
                iter.dirty.as_secs_f64(),
                iter.exits,
                iter.stats.fast_fixes,
                iter.stats.slow_faults,
                iter.stats.huge_dropped,
                iter.get.as_secs_f64(),
                if cfg.api == LogApi::Manual {
                    format!(", clear {:.9}s", iter.clear.as_secs_f64())
                } else {
                    String::new()
                }
            );
            res.iterations.push(iter);
        }

        let t = Instant::now();
        let recovered = mmu.disable_dirty_log(SLOT, &host, &mut flush).unwrap();
        res.disable = t.elapsed();
        println!(
            "[{tag}] enable {:.9}s, disable {:.9}s ({} tables collapsed, {} zapped)",
            res.enable.as_secs_f64(),
            res.disable.as_secs_f64(),
            recovered.collapsed,
            recovered.zapped
        );

        phase.store(STOP, Release);
        start.wait();
    });

    let stats = mmu.stats();
    res.eager_splits = stats.eager_splits;
    res.flushes = flushes.load(Relaxed);
    if stats.eager_split_failures > 0 {
        res.failures.push(format!(
            "{} eager splits stopped early",
            stats.eager_split_failures
        ));
    }
    if stats.inconsistencies > 0 {
        res.failures
            .push(format!("{} rmap inconsistencies", stats.inconsistencies));
    }
    if cfg.eager && stats.eager_splits == 0 && o.backing > Level::L1 {
        res.failures.push("eager splitting split nothing".into());
    }
    if let Err(e) = mmu.check() {
        res.failures.push(format!("mmu.check(): {e}"));
    }
    res
}

/// Pages written but not logged, and pages logged but not written.
fn compare_log(log: &[u64], reps: &[PassReport], pages_per_vcpu: u64) -> (u64, u64) {
    let (mut missing, mut extra) = (0, 0);
    for (k, r) in reps.iter().enumerate() {
        let base = k as u64 * pages_per_vcpu;
        for i in 0..pages_per_vcpu {
            let written = r.written[(i / 64) as usize] >> (i % 64) & 1 == 1;
            let b = base + i;
            let logged = log[(b / 64) as usize] >> (b % 64) & 1 == 1;
            match (written, logged) {
                (true, false) => missing += 1,
                (false, true) => extra += 1,
                _ => {}
            }
        }
    }
    (missing, extra)
}

fn main() {
    let o = parse_opts();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let backing = if o.backing == Level::L3 {
        "1 GiB"
    } else {
        "2 MiB"
    };
    println!(
        "dirty_log_perf: {} vCPUs x {} MiB, {backing} host pages, {} iterations, EPT shadow \
         tables, {cpus} CPUs{}",
        o.vcpus,
        o.bytes >> 20,
        o.iterations,
        if o.quick { " (--quick)" } else { "" }
    );

    let mut failures = Vec::new();
    let mut results: Vec<(Config, RunResult)> = Vec::new();
    for (fi, &f) in o.fracs.iter().enumerate() {
        // After the first write fraction only the classic log: the dirty-memory times are
        // what a second fraction adds.
        let apis: &[LogApi] = if fi == 0 { &o.apis } else { &o.apis[..1] };
        for &api in apis {
            for eager in [false, true] {
                let cfg = Config {
                    eager,
                    api,
                    write_every: f,
                };
                let r = run(&o, cfg);
                for e in &r.failures {
                    failures.push(format!("[{}] {e}", cfg.name()));
                }
                results.push((cfg, r));
            }
        }
    }

    let kvm_note = "KVM's column: Matlack, \"[00/23] Extend Eager Page Splitting to the shadow \
                    MMU\", 2022-02-03, dirty_log_perf_test with tdp_mmu=N, 1 GiB per vCPU on \
                    1 GiB HugeTLB, on their (2022) hardware, the row for the same vCPU count; \
                    shown for reference, not measured here.";
    println!("\n{kvm_note}");
    let pair = |api: LogApi, f: u64| {
        let find = |eager| {
            results
                .iter()
                .find(|(c, _)| c.api == api && c.write_every == f && c.eager == eager)
        };
        find(false).zip(find(true)).map(|(n, y)| (&n.1, &y.1))
    };
    // KVM's figures are for 1 GiB per vCPU on 1 GiB pages, 100% writes: shown only then.
    let kvm_shape = o.bytes == 1 << 30 && o.backing == Level::L3;
    for (fi, &f) in o.fracs.iter().enumerate() {
        let pct = 100 / f;
        if let Some((n, y)) = pair(LogApi::Classic, f) {
            let mut t = Table::new();
            let full = fi == 0;
            let with_kvm = f == 1 && kvm_shape;
            if full {
                t.time("Populate memory time", n.populate, y.populate, None);
                t.time(
                    "Enabling dirty logging time",
                    n.enable,
                    y.enable,
                    kvm(KVM_ENABLE, o.vcpus).filter(|_| with_kvm),
                );
            }
            dirty_rows(&mut t, n, y, o.vcpus, with_kvm);
            if full {
                for (i, (a, b)) in n.iterations.iter().zip(&y.iterations).enumerate() {
                    t.time(
                        &format!("Iteration {} get dirty log time", i + 1),
                        a.get,
                        b.get,
                        None,
                    );
                }
                t.time("Disabling dirty logging time", n.disable, y.disable, None);
                t.count("Huge pages split eagerly", n.eager_splits, y.eager_splits);
                t.count("Remote TLB flushes", n.flushes, y.flushes);
            }
            t.print(&format!(
                "KVM_GET_DIRTY_LOG (get-and-clear, no initially-all-set), {pct}% writes (-f {f})"
            ));
        }
        if let Some((n, y)) = pair(LogApi::Manual, f).filter(|_| fi == 0) {
            let mut t = Table::new();
            let with_kvm = f == 1 && kvm_shape;
            t.time("Populate memory time", n.populate, y.populate, None);
            t.time("Enabling dirty logging time", n.enable, y.enable, None);
            for (i, (a, b)) in n.iterations.iter().zip(&y.iterations).enumerate() {
                t.time(
                    &format!("Iteration {} dirty memory time", i + 1),
                    a.dirty,
                    b.dirty,
                    None,
                );
                t.time(
                    &format!("Iteration {} get dirty log time", i + 1),
                    a.get,
                    b.get,
                    None,
                );
                let kvm_rows = match i {
                    0 => Some(KVM_ITER1_CLEAR),
                    1 => Some(KVM_ITER2_CLEAR),
                    _ => None,
                };
                t.time(
                    &format!("Iteration {} clear dirty log time", i + 1),
                    a.clear,
                    b.clear,
                    kvm_rows.and_then(|r| kvm(r, o.vcpus)).filter(|_| with_kvm),
                );
            }
            exit_rows(&mut t, n, y);
            t.time("Disabling dirty logging time", n.disable, y.disable, None);
            t.count("Huge pages split eagerly", n.eager_splits, y.eager_splits);
            t.print(&format!(
                "KVM_CLEAR_DIRTY_LOG (manual protection, initially-all-set, cleared in 64-page \
                 masks), {pct}% writes (-f {f})"
            ));
        }
    }
    if o.fracs.iter().any(|&f| f != 1) {
        println!(
            "\nKVM's cover letter has no table for a write fraction below 100%: its second \
             \"Iteration 1 dirty memory time\" table is shadow paging (ept=N), which this MMU \
             (direct mode) does not do."
        );
    }

    if failures.is_empty() {
        println!(
            "\nchecks passed: every write after enabling logging was in the next log; \
             mmu.check() clean after every run"
        );
    } else {
        println!();
        for f in &failures {
            println!("FAILED {f}");
        }
        std::process::exit(1);
    }
}
