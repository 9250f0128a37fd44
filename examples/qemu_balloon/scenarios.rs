//! The scenarios against the hvmem guest: free page reporting, balloon inflate/deflate
//! driven by QMP, and free page hinting during migration.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::guest::Guest;
use crate::qemu::{QemuBin, Vm, VmConfig};
use crate::rss::{self, MIB, mib, mib_signed};
use crate::table::{ReportRow, Table, ms};

const PAGE: u64 = 4096;
const BOOT: Duration = Duration::from_secs(120);
const CMD: Duration = Duration::from_secs(120);
/// `fill` writes most of the guest's RAM under TCG.
const FILL: Duration = Duration::from_secs(300);
/// How long RSS may take to follow a report or a balloon change.
const RSS_WAIT: Duration = Duration::from_secs(10);

pub(crate) struct Ctx {
    pub(crate) bin: QemuBin,
    pub(crate) kernel: PathBuf,
    pub(crate) mem_mib: u64,
    pub(crate) quick: bool,
    pub(crate) failed: Vec<String>,
    /// The reporting table's rows (Linux's is added by `main`).
    pub(crate) rows: Vec<ReportRow>,
}

impl Ctx {
    /// Records and prints one checked claim.
    pub(crate) fn claim(&mut self, ok: bool, what: String) {
        if ok {
            println!("  claim ok: {what}");
        } else {
            println!("  claim FAILED: {what}");
            self.failed.push(what);
        }
    }

    fn ram(&self) -> u64 {
        self.mem_mib * MIB
    }

    fn boot(&self, free_page_hint: bool) -> Result<Guest, String> {
        let start = Instant::now();
        let vm = Vm::start(
            &self.bin,
            &VmConfig {
                mem_mib: self.mem_mib,
                kernel: self.kernel.clone(),
                initrd: None,
                append: None,
                free_page_hint,
            },
        )?;
        let guest = Guest::boot(vm, BOOT)?;
        eprintln!(
            "guest ready in {:.1} s: {}",
            start.elapsed().as_secs_f64(),
            guest.ready.line
        );
        Ok(guest)
    }
}

/// Free page reporting: fill, free holes (must stay unreported) and whole 2 MiB blocks,
/// `report`; QEMU's RSS must drop by >= 90% of what the guest reported, the live data must
/// be intact and the reported pages usable again.
pub(crate) fn report(ctx: &mut Ctx) -> Result<(), String> {
    let mut g = ctx.boot(true)?;
    // Report what is free at boot first (never touched, so not resident): afterwards every
    // byte `report` hands back was written by `fill` and is resident in QEMU.
    g.cmd("report", CMD)?;
    let fill = g.cmd("fill 90", FILL)?.num("bytes")?;
    let holes = g.cmd("free holes", CMD)?.num("bytes")?;
    let blocks_mib = (fill / MIB / 4).min(if ctx.quick { 32 } else { 64 }) & !1;
    let blocks = g
        .cmd(&format!("free blocks {blocks_mib}"), CMD)?
        .num("bytes")?;
    let freed_at = Instant::now();
    let before = rss::rss(g.vm.pid)?;
    let rep = g.cmd("report", CMD)?;
    let replied = Instant::now();
    let reported = rep.num("reported")?;
    let want = reported * 9 / 10;
    let (after, took) = rss::wait_rss(g.vm.pid, RSS_WAIT, |r| before.saturating_sub(r) >= want)?;
    let dropped = before as i64 - after as i64;
    let free_to_drop = took.map(|t| replied + t - freed_at);
    println!(
        "report: filled {}, freed {} in holes + {} in 2 MiB blocks; report: {}",
        mib(fill),
        mib(holes),
        mib(blocks),
        rep.line
    );
    ctx.claim(
        reported >= blocks * 9 / 10,
        format!(
            "the Reporter reported the freed 2 MiB blocks ({} reported, {} freed as blocks)",
            mib(reported),
            mib(blocks)
        ),
    );
    ctx.claim(
        reported > 0 && dropped >= want as i64,
        format!(
            "QEMU RSS dropped by >= 90% of the reported bytes ({} of {})",
            mib_signed(dropped),
            mib(reported)
        ),
    );
    let check = g.cmd("check", CMD)?;
    ctx.claim(
        check.num("pages")? > 0,
        format!("live data intact after the report ({})", check.line),
    );
    let touch = g.cmd(&format!("touch {blocks_mib}"), FILL)?;
    let rose = rss::rss(g.vm.pid)? as i64 - after as i64;
    ctx.claim(
        touch.num("bytes")? >= blocks_mib * MIB,
        format!(
            "reported pages usable again ({}; RSS rose by {})",
            touch.line,
            mib_signed(rose)
        ),
    );
    let check = g.cmd("check", CMD)?;
    ctx.claim(
        check.num("pages")? > 0,
        format!("live data intact after the touch ({})", check.line),
    );
    ctx.rows.push(ReportRow {
        guest: "hvmem".into(),
        freed: holes + blocks,
        reported: Some(reported),
        rss_drop: dropped,
        free_to_drop,
        reply_to_drop: took,
    });
    Ok(())
}

fn query_balloon(g: &mut Guest) -> Result<u64, String> {
    let r = g.vm.qmp.execute("query-balloon", json!({}))?;
    r["actual"]
        .as_u64()
        .ok_or_else(|| format!("query-balloon: {r}"))
}

/// Waits (2 s at most) until `query-balloon` shows `want` bytes, and returns what it shows.
fn query_balloon_until(g: &mut Guest, want: u64) -> Result<u64, String> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let got = query_balloon(g)?;
        if got == want || Instant::now() > deadline {
            return Ok(got);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn opt_mib(v: Option<u64>) -> String {
    v.map(mib).unwrap_or_else(|| "—".into())
}

/// Balloon inflate and deflate driven by QMP `balloon`.
pub(crate) fn balloon(ctx: &mut Ctx) -> Result<(), String> {
    let ram = ctx.ram();
    let mut g = ctx.boot(true)?;
    // Make all of RAM resident (and, with THP, huge) so that RSS can follow the balloon.
    g.cmd("fill 90", FILL)?;
    g.cmd("free all", CMD)?;
    let s0 = rss::sample(g.vm.pid, ram)?;

    let target = ram / 2;
    let pages = (ram - target) / PAGE;
    let asked = Instant::now();
    g.vm.qmp.execute("balloon", json!({ "value": target }))?;
    let ev = g.event("balloon", FILL, |f| f.num("actual").ok() == Some(pages))?;
    let inflate_time = asked.elapsed();
    let actual = ev.num("actual")?;
    let inflated = actual * PAGE;
    let qb = query_balloon_until(&mut g, ram - inflated)?;
    let want = inflated * 9 / 10;
    let (after, took) = rss::wait_rss(g.vm.pid, RSS_WAIT, |r| s0.rss.saturating_sub(r) >= want)?;
    let s1 = rss::sample(g.vm.pid, ram)?;
    let status = g.cmd("status", CMD)?;
    let broke = status.num("broke_huge").ok();
    let dropped = s0.rss as i64 - after as i64;
    ctx.claim(
        qb == ram - inflated,
        format!(
            "query-balloon agrees with the guest (QEMU {}, guest actual {} pages = {})",
            mib(qb),
            actual,
            mib(ram - inflated)
        ),
    );
    ctx.claim(
        dropped >= want as i64,
        format!(
            "RSS followed the inflate: dropped {} for {} inflated",
            mib_signed(dropped),
            mib(inflated)
        ),
    );

    // Back to full: deflate, then touch the memory so it is resident again.
    let asked = Instant::now();
    g.vm.qmp.execute("balloon", json!({ "value": ram }))?;
    g.event("balloon", FILL, |f| f.num("actual").ok() == Some(0))?;
    let deflate_time = asked.elapsed();
    let qb_full = query_balloon_until(&mut g, ram)?;
    ctx.claim(
        qb_full == ram,
        format!("query-balloon back to {} after the deflate", mib(qb_full)),
    );
    let free = g.cmd("status", CMD)?.num("free")?;
    let slack = 8 * MIB;
    let touch_mib = free.saturating_sub(slack) / MIB;
    g.cmd(&format!("touch {touch_mib}"), FILL)?;
    let s2 = rss::sample(g.vm.pid, ram)?;
    let rose = s2.rss as i64 - after as i64;
    let untouched = free - touch_mib * MIB;
    let want_rise = inflated.saturating_sub(untouched) * 9 / 10;
    ctx.claim(
        rose >= want_rise as i64,
        format!(
            "deflated memory usable and resident again: RSS rose {} after touching {} MiB",
            mib_signed(rose),
            touch_mib
        ),
    );
    let check = g.cmd("status", CMD)?;
    drop(g);

    let mut t = Table::new(
        &format!("Balloon driven by QMP ({} MiB guest)", ctx.mem_mib),
        &[
            "step",
            "target",
            "guest actual",
            "query-balloon",
            "time",
            "RSS",
            "RSS change",
            "ram AnonHugePages",
            "huge pages broken",
        ],
    );
    t.row(vec![
        "start (filled, freed)".into(),
        mib(ram),
        "0".into(),
        "—".into(),
        "—".into(),
        mib(s0.rss),
        "—".into(),
        opt_mib(s0.thp()),
        "—".into(),
    ]);
    t.row(vec![
        "inflate".into(),
        mib(target),
        format!("{actual} pages"),
        mib(qb),
        format!("{} (+{} RSS)", ms(Some(inflate_time)), ms(took)),
        mib(s1.rss),
        mib_signed(s1.rss as i64 - s0.rss as i64),
        opt_mib(s1.thp()),
        broke.map(|b| b.to_string()).unwrap_or_else(|| "—".into()),
    ]);
    t.row(vec![
        "deflate + touch".into(),
        mib(ram),
        "0".into(),
        mib(qb_full),
        ms(Some(deflate_time)),
        mib(s2.rss),
        mib_signed(s2.rss as i64 - s1.rss as i64),
        opt_mib(s2.thp()),
        check
            .num("broke_huge")
            .map(|b| b.to_string())
            .unwrap_or_default(),
    ]);
    t.print();
    if let (Some(a), Some(b)) = (s0.thp(), s1.thp()) {
        let lost = a as i64 - b as i64 - inflated as i64;
        println!(
            "  AnonHugePages lost beyond the inflated bytes: {}",
            mib_signed(lost)
        );
    }
    Ok(())
}

/// One migration to a local sink; returns (transferred bytes, total ms, hinted bytes).
fn migrate_once(ctx: &mut Ctx, hint: bool, bandwidth: u64) -> Result<(u64, u64, u64), String> {
    let mut g = ctx.boot(hint)?;
    // Most of RAM free, with the fill pattern still in it: a free page not hinted is sent
    // in full (QEMU sends a zero page as a few bytes, so zero pages would prove nothing).
    g.cmd("fill 90", FILL)?;
    g.cmd("free all", CMD)?;
    g.vm.qmp.execute(
        "migrate-set-parameters",
        json!({ "max-bandwidth": bandwidth }),
    )?;
    g.vm.qmp
        .execute("migrate", json!({ "uri": "exec:cat > /dev/null" }))?;
    let deadline = Instant::now() + Duration::from_secs(300);
    let info = loop {
        g.drain()?;
        let info = g.vm.qmp.execute("query-migrate", json!({}))?;
        match info["status"].as_str() {
            Some("completed") => break info,
            Some("failed") | Some("cancelled") => {
                return Err(g.vm.fail(&format!("migration failed: {info}")));
            }
            _ => {}
        }
        if Instant::now() > deadline {
            return Err(g
                .vm
                .fail(&format!("migration did not complete in 300 s: {info}")));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    g.drain()?;
    let hinted = g
        .take_events("hint")
        .iter()
        .filter_map(|f| f.num("bytes").ok())
        .max()
        .unwrap_or(0);
    let transferred = info["ram"]["transferred"]
        .as_u64()
        .ok_or_else(|| format!("query-migrate: no ram.transferred in {info}"))?;
    let total = info["total-time"].as_u64().unwrap_or(0);
    Ok((transferred, total, hinted))
}

/// Free page hinting during migration, with and without `free-page-hint`.
pub(crate) fn migrate(ctx: &mut Ctx) -> Result<(), String> {
    let bandwidth = 128 * MIB;
    let (with, with_ms, hinted) = migrate_once(ctx, true, bandwidth)?;
    let (without, without_ms, _) = migrate_once(ctx, false, bandwidth)?;
    let mut t = Table::new(
        &format!(
            "Migration to exec:cat > /dev/null ({} MiB guest, most of it free with non-zero content, max-bandwidth {} MiB/s)",
            ctx.mem_mib,
            bandwidth / MIB
        ),
        &[
            "free-page-hint",
            "guest hinted",
            "transferred",
            "total time",
        ],
    );
    t.row(vec![
        "on".into(),
        mib(hinted),
        mib(with),
        format!("{with_ms} ms"),
    ]);
    t.row(vec![
        "off".into(),
        "—".into(),
        mib(without),
        format!("{without_ms} ms"),
    ]);
    t.print();
    ctx.claim(
        hinted > 0,
        format!(
            "the guest answered QEMU's hint command with {}",
            mib(hinted)
        ),
    );
    ctx.claim(
        (with as f64) < 0.5 * without as f64,
        format!(
            "with hints < 50% of the bytes without ({} vs {}, {:.1}%)",
            mib(with),
            mib(without),
            100.0 * with as f64 / without.max(1) as f64
        ),
    );
    Ok(())
}
