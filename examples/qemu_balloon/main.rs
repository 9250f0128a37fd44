//! hvmem's guest side against a peer nobody here wrote: QEMU's virtio-balloon device.
//!
//! The runner builds the unikernel in `guest/` (`HVMEM_GUEST_DIR` overrides) with nightly
//! `-Zbuild-std`, boots it under QEMU (`-M microvm`, TCG, one vCPU, 256 MiB by default,
//! `virtio-balloon-device,free-page-reporting=on,free-page-hint=on` on an iothread),
//! drives it over its serial port (line protocol, see `guest.rs`) and QEMU over QMP, and
//! measures QEMU's own memory: RSS from `/proc/<pid>/smaps_rollup`, the guest RAM
//! mapping's AnonHugePages from `/proc/<pid>/smaps`. Scenarios, each printing a table and
//! checking its claims:
//!
//! - `report`: the guest fills 90% of its RAM, frees every other 4 KiB page in holes that
//!   complete no 2 MiB block, frees whole 2 MiB blocks, runs the Reporter (order >= 9,
//!   batches of 32, pipelined); QEMU's RSS must drop by >= 90% of the reported bytes, the
//!   guest's live data must check intact and the reported pages must be usable again.
//! - `balloon`: QMP `balloon` to half the RAM; the guest inflates with hvmem's `Balloon`;
//!   `query-balloon` must agree with the guest's `actual`, RSS must drop by >= 90% of the
//!   inflated bytes; back to full RAM: the guest deflates and touches the memory again.
//! - `migrate`: the guest fills and frees most of its RAM (free pages keep non-zero data),
//!   QMP `migrate` to `exec:cat > /dev/null`, once with `free-page-hint=on` and once off;
//!   with hints fewer than 50% of the bytes must be transferred.
//! - `linux` (with `--linux`): the anchor, Debian's 6.1 kernel with a busybox initramfs and
//!   a workload that touches and frees memory (see `linux.rs`); how much RSS comes back and
//!   how fast, printed as a reference row beside hvmem's in the reporting table (not
//!   checked).
//!
//! Without QEMU (see `scripts/qemu-fetch.sh`) or without the nightly toolchain with
//! `rust-src` it prints `skipped: <reason>` and exits 0, unless `HVMEM_REQUIRE_QEMU=1`:
//! then that is a failure. Every wait has a timeout; a hung guest fails the run with its
//! last 20 serial lines. `HVMEM_VERBOSE=1` echoes the serial traffic to stderr.
//!
//! Run: `scripts/qemu-fetch.sh [--linux] && cargo run --release --example qemu_balloon --
//! [--quick] [--linux] [--mem <MiB>] [report] [balloon] [migrate] [linux]`

mod guest;
mod linux;
mod qemu;
mod qmp;
mod rss;
mod scenarios;
mod table;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use scenarios::Ctx;

const USAGE: &str =
    "usage: qemu_balloon [--quick] [--linux] [--mem <MiB>] [report|balloon|migrate|linux]...";

struct Opts {
    quick: bool,
    mem_mib: u64,
    report: bool,
    balloon: bool,
    migrate: bool,
    linux: bool,
}

fn opts() -> Result<Opts, String> {
    let mut o = Opts {
        quick: false,
        mem_mib: 256,
        report: false,
        balloon: false,
        migrate: false,
        linux: false,
    };
    let mut named = false;
    let mut mem = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => o.quick = true,
            "--linux" => o.linux = true,
            "--mem" => {
                let v = args.next().ok_or(USAGE)?;
                mem = Some(v.parse::<u64>().map_err(|e| format!("--mem {v}: {e}"))?);
            }
            "report" => (o.report, named) = (true, true),
            "balloon" => (o.balloon, named) = (true, true),
            "migrate" => (o.migrate, named) = (true, true),
            "linux" => (o.linux, named) = (true, true),
            "--bench" => {} // `cargo bench` passes this to every target
            _ => return Err(format!("unknown argument '{a}'\n{USAGE}")),
        }
    }
    if !named {
        (o.report, o.balloon, o.migrate) = (true, true, true);
    }
    // --quick keeps 256 MiB: the guest's Reporter keeps 64 MiB free unreported (its low
    // watermark), so a smaller guest would leave too little to report.
    o.mem_mib = mem.unwrap_or(256);
    if o.mem_mib < 64 {
        return Err("--mem: at least 64 MiB".into());
    }
    Ok(o)
}

fn main() -> ExitCode {
    let started = Instant::now();
    let opts = match opts() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let require = std::env::var("HVMEM_REQUIRE_QEMU").is_ok_and(|v| v == "1");
    let skip = |reason: String| {
        if require {
            println!("FAILED: {reason} (HVMEM_REQUIRE_QEMU=1)");
            ExitCode::FAILURE
        } else {
            println!("skipped: {reason}");
            ExitCode::SUCCESS
        }
    };
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let bin = match qemu::QemuBin::find(repo) {
        Ok(b) => b,
        Err(reason) => return skip(reason),
    };
    let version = match bin.version() {
        Ok(v) => v,
        Err(reason) => return skip(reason),
    };
    println!("{version}");
    println!(
        "qemu: {} (-M microvm -accel tcg -smp 1 -m {}M)",
        bin.path.display(),
        opts.mem_mib
    );

    let mut ctx = Ctx {
        bin,
        kernel: PathBuf::new(),
        mem_mib: opts.mem_mib,
        quick: opts.quick,
        failed: Vec::new(),
        rows: Vec::new(),
    };
    let mut rows = Vec::new();
    if opts.report || opts.balloon || opts.migrate {
        if let Some(reason) = guest::toolchain_missing() {
            return skip(reason);
        }
        let dir = std::env::var_os("HVMEM_GUEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo.join("guest"));
        match guest::build(&dir) {
            Ok(k) => ctx.kernel = k,
            Err(e) => {
                println!("FAILED: {e}");
                return ExitCode::FAILURE;
            }
        }
        type Scenario = fn(&mut Ctx) -> Result<(), String>;
        let list: [(&str, bool, Scenario); 3] = [
            ("report", opts.report, scenarios::report),
            ("balloon", opts.balloon, scenarios::balloon),
            ("migrate", opts.migrate, scenarios::migrate),
        ];
        for (name, on, run) in list {
            if !on {
                continue;
            }
            println!("\n== {name} ==");
            let t = Instant::now();
            if let Err(e) = run(&mut ctx) {
                println!("  FAILED: {name}: {e}");
                ctx.failed.push(format!("{name}: error"));
            }
            eprintln!("{name}: {:.1} s", t.elapsed().as_secs_f64());
        }
        rows.append(&mut ctx.rows);
        if !opts.linux && !rows.is_empty() {
            table::report_table(&rows).print();
        }
    }
    if opts.linux {
        println!("\n== linux (reference) ==");
        let t = Instant::now();
        let mib = opts.mem_mib * 5 / 8;
        match linux::run(&ctx.bin, repo, opts.mem_mib, mib) {
            Ok(row) => rows.push(row),
            Err(e) => {
                println!("  FAILED: linux: {e}");
                ctx.failed.push("linux: error".into());
            }
        }
        eprintln!("linux: {:.1} s", t.elapsed().as_secs_f64());
    }
    if opts.linux && !rows.is_empty() {
        table::report_table(&rows).print();
    }
    println!(
        "total {:.1} s; {} failed claim(s)",
        started.elapsed().as_secs_f64(),
        ctx.failed.len()
    );
    if ctx.failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        for f in &ctx.failed {
            println!("FAILED: {f}");
        }
        ExitCode::FAILURE
    }
}
