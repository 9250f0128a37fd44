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
const BOOT: Duration = Duration::from_secs(60);
const CMD: Duration = Duration::from_secs(60);
/// `fill` writes most of the guest's RAM under TCG.
const FILL: Duration = Duration::from_secs(180);
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

/// What one `report` after a free did to QEMU's RSS.
struct Round {
    reported: u64,
    rss_after: u64,
    dropped: i64,
    free_to_drop: Option<Duration>,
    reply_to_drop: Option<Duration>,
}

/// Runs `report` right after a free that ended at `freed_at`, and follows QEMU's RSS until
/// it dropped by 90% of the reported bytes (or `RSS_WAIT` passed); claims that it did.
fn report_round(ctx: &mut Ctx, g: &mut Guest, freed_at: Instant) -> Result<Round, String> {
    let before = rss::rss(g.vm.pid)?;
    let rep = g.cmd("report", CMD)?;
    let replied = Instant::now();
    let reported = rep.num("reported")?;
    let want = reported * 9 / 10;
    let (after, took) = rss::wait_rss(g.vm.pid, RSS_WAIT, |r| before.saturating_sub(r) >= want)?;
    let dropped = before as i64 - after as i64;
    println!("  {}", rep.line);
    ctx.claim(
        reported > 0 && dropped >= want as i64,
        format!(
            "QEMU RSS dropped by >= 90% of the reported bytes ({} of {})",
            mib_signed(dropped),
            mib(reported)
        ),
    );
    Ok(Round {
        reported,
        rss_after: after,
        dropped,
        free_to_drop: took.map(|t| replied + t - freed_at),
        reply_to_drop: took,
    })
}

/// Free page reporting: fill, free holes (must stay unreported) and whole 2 MiB blocks,
/// `report`; QEMU's RSS must drop by >= 90% of what the guest reported, the live data must
/// be intact and the reported pages usable again. Then `free all` + `report`, the
/// workload of the Linux anchor (touch, free everything, report).
pub(crate) fn report(ctx: &mut Ctx) -> Result<(), String> {
    let mut g = ctx.boot(true)?;
    // Report what is free at boot first (never touched, so not resident): afterwards every
    // byte `report` hands back was written by `fill` and is resident in QEMU.
    g.cmd("report", CMD)?;
    let managed = g.ready.num("managed")?;
    let fill = g.cmd("fill 90", FILL)?.num("bytes")?;
    let holes = g.cmd("free holes", CMD)?.num("bytes")?;
    // `free blocks <MiB>` frees the filled pages of <MiB>/2 whole 2 MiB regions (after
    // `free holes` each region still holds half its pages): that many MiB become free in
    // whole 2 MiB blocks. The Reporter keeps 64 MiB free unreported (its low watermark), so
    // the guest must have well over that free at `report` time.
    let blocks_mib = if ctx.quick { 32 } else { 64 };
    let freed = g.cmd(&format!("free blocks {blocks_mib}"), CMD)?;
    let blocks = freed.num("bytes")?;
    let regions = freed.num("blocks").map(|b| b * 2 * MIB).unwrap_or(blocks);
    println!(
        "  filled {}, freed {} in holes + {} ({} wholly free 2 MiB regions)",
        mib(fill),
        mib(holes),
        mib(blocks),
        mib(regions),
    );
    let round = report_round(ctx, &mut g, Instant::now())?;
    let reported = round.reported;
    ctx.claim(
        reported >= regions * 9 / 10,
        format!(
            "the Reporter reported the wholly free 2 MiB regions ({} reported, {} regions)",
            mib(reported),
            mib(regions)
        ),
    );
    // Order >= 9 only: what can be reported is the freed regions plus what `fill` left
    // free; the holes (every other 4 KiB page) must stay with the guest.
    let unfilled = managed.saturating_sub(fill);
    ctx.claim(
        reported <= regions + unfilled,
        format!(
            "the {} of holes stayed unreported ({} reported <= {} regions + {} never filled)",
            mib(holes),
            mib(reported),
            mib(regions),
            mib(unfilled)
        ),
    );
    let check = g.cmd("check", CMD)?;
    ctx.claim(
        check.num("pages")? > 0,
        format!("live data intact after the report ({})", check.line),
    );
    // Touch all free memory but a little: that must take the reported pages, and QEMU
    // must back them again.
    let free = g.cmd("status", CMD)?.num("free")?;
    let slack = 8 * MIB;
    let touch_mib = free.saturating_sub(slack) / MIB;
    let touch = g.cmd(&format!("touch {touch_mib}"), FILL)?;
    let rose = rss::rss(g.vm.pid)? as i64 - round.rss_after as i64;
    let want_rise = reported.saturating_sub(free - touch_mib * MIB) * 9 / 10;
    ctx.claim(
        touch.num("bytes")? >= touch_mib * MIB && rose >= want_rise as i64,
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
        guest: "hvmem: holes + 2 MiB blocks".into(),
        freed: holes + blocks,
        reported: Some(reported),
        rss_drop: round.dropped,
        free_to_drop: round.free_to_drop,
        reply_to_drop: round.reply_to_drop,
    });

    // The Linux anchor's workload: everything touched (`fill`, then `touch` of all free
    // memory) is free, then reported.
    g.cmd("free all", CMD)?;
    let freed_at = Instant::now();
    let free = g.cmd("status", CMD)?.num("free")?;
    let round = report_round(ctx, &mut g, freed_at)?;
    ctx.rows.push(ReportRow {
        guest: "hvmem: all free (all touched)".into(),
        freed: free,
        reported: Some(round.reported),
        rss_drop: round.dropped,
        free_to_drop: round.free_to_drop,
        reply_to_drop: round.reply_to_drop,
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
    match (s0.thp(), s1.thp()) {
        // QEMU madvises guest RAM MADV_HUGEPAGE; with THP at `madvise` or `always` the
        // filled RAM is mostly huge pages, and a balloon that inflates whole 2 MiB blocks
        // costs the host no huge page beyond the ones it hands back (Hildenbrand, "Re: [RFC
        // for Linux] virtio_balloon: Add VIRTIO_BALLOON_F_THP_ORDER...", 2020).
        (Some(a), Some(b)) if a >= ram / 2 => {
            let lost = a as i64 - b as i64 - inflated as i64;
            ctx.claim(
                lost <= (4 * MIB) as i64,
                format!(
                    "the inflate broke (almost) no host huge page: AnonHugePages lost beyond the inflated bytes {}",
                    mib_signed(lost)
                ),
            );
        }
        (a, _) => println!(
            "  AnonHugePages of the guest RAM mapping: {} (THP not in use here: no claim)",
            opt_mib(a)
        ),
    }
    Ok(())
}

/// What one migration moved.
struct Migration {
    transferred: u64,
    /// Pages sent in full (`ram.normal`): neither zero nor skipped.
    normal: u64,
    total_ms: u64,
    hinted: u64,
}

/// One migration to a local sink.
fn migrate_once(ctx: &mut Ctx, hint: bool, bandwidth: u64) -> Result<Migration, String> {
    let mut g = ctx.boot(hint)?;
    // Most of RAM free, with the fill pattern still in it: a free page not hinted is sent
    // in full (QEMU sends a zero page as a few bytes, so zero pages would prove nothing).
    g.cmd("fill 90", FILL)?;
    g.cmd("free all", CMD)?;
    let free_before = g.cmd("status", CMD)?.num("free")?;
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
    if hint {
        // All of it, not a queue's worth: a guest with more free 4 MiB blocks than the hint
        // queue has entries must wait for QEMU's hint thread, not end the run early.
        ctx.claim(
            hinted as f64 >= 0.9 * free_before as f64,
            format!(
                "the guest hinted >= 90% of its free memory ({} of {})",
                mib(hinted),
                mib(free_before)
            ),
        );
        // The source VM paused at completion; resumed, it must get its hinted blocks back
        // (QEMU set the cmd id to DONE) and find them usable.
        g.vm.qmp.execute("cont", json!({}))?;
        let done = g.event("hint-done", CMD, |_| true)?;
        let free = g.cmd("status", CMD)?.num("free")?;
        let touch_mib = free.saturating_sub(8 * MIB) / MIB;
        let touch = g.cmd(&format!("touch {touch_mib}"), FILL);
        ctx.claim(
            touch.is_ok() && free >= hinted,
            format!(
                "after `cont` the guest freed its hinted blocks ({}) and can use them (free {}, touch {touch_mib} MiB {})",
                done.line,
                mib(free),
                if touch.is_ok() { "ok" } else { "FAILED" }
            ),
        );
    }
    Ok(Migration {
        transferred,
        normal: info["ram"]["normal"].as_u64().unwrap_or(0),
        total_ms: info["total-time"].as_u64().unwrap_or(0),
        hinted,
    })
}

/// Free page hinting during migration, with and without `free-page-hint`.
pub(crate) fn migrate(ctx: &mut Ctx) -> Result<(), String> {
    let bandwidth = 128 * MIB;
    let on = migrate_once(ctx, true, bandwidth)?;
    let off = migrate_once(ctx, false, bandwidth)?;
    let (with, without, hinted) = (on.transferred, off.transferred, on.hinted);
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
            "pages sent in full",
            "total time",
        ],
    );
    for (name, m) in [("on", &on), ("off", &off)] {
        t.row(vec![
            name.into(),
            if name == "on" {
                mib(m.hinted)
            } else {
                "—".into()
            },
            mib(m.transferred),
            m.normal.to_string(),
            format!("{} ms", m.total_ms),
        ]);
    }
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
