//! The experiment of the VIRTIO_BALLOON_F_THP_ORDER thread (Hui Zhu's figures, quoted in
//! Hildenbrand, "Re: [RFC for Linux] virtio_balloon: Add VIRTIO_BALLOON_F_THP_ORDER to handle
//! THP spilt issue", 2020-03-12) on real kernel facilities: how much of the host's
//! transparent huge page memory each way of giving guest memory back costs.
//!
//! Guest RAM is 1 GiB of anonymous memory at a 2 MiB-aligned address with `MADV_HUGEPAGE`,
//! touched all over (AnonHugePages about 1 GiB), and managed by hvmem's buddy allocator. A
//! workload allocates 800 MiB in 4 KiB pages, writes them, and frees every other one (the
//! thread's `usemem --punch-holes -s -1 800m`): 400 MiB free in 4 KiB holes, 224 MiB free in
//! large blocks. Then memory goes back to the host, each way on a fresh region:
//!
//! - (a) a classic balloon: 400 MiB at order 0 (Linux `fill_balloon`);
//! - (b) a THP-order balloon: 400 MiB at order 9, falling back below it by taking small
//!   blocks from host pages it already broke ([`FallbackPolicy::PreferBroken`]);
//!   (b-plain) the same with the plain fallback; (b-2M) the same with a host that discards
//!   only whole 2 MiB pages and drops the rest;
//! - (c) free-page reporting at minimum order 9 through the guest [`Reporter`]: only what is
//!   free in whole 2 MiB blocks.
//!
//! Balloon PFN arrays and report descriptor chains go through hvmem's wire formats to a
//! [`ReportReceiver`] that discards with `madvise(MADV_DONTNEED)`, at 4 KiB granularity for
//! the balloons (as QEMU does on THP-backed RAM) and 2 MiB for reporting and (b-2M). Every
//! variant runs with the holes freed in address order and in random order.
//!
//! The table gives, from the region's own `/proc/self/smaps` entry, AnonHugePages and RSS
//! before and after, and the huge-page memory lost beyond the bytes handed back: the
//! AnonHugePages drop minus what the host got. Afterwards every page the workload holds is
//! checked intact and every discarded page reads zero.
//!
//! `--quick` runs on 64 MiB (same proportions) and exits non-zero if THP accounting moves
//! the wrong way: (b) must lose less than (a), no more than (b-plain) and strictly less with
//! random holes, and (c) must lose nothing beyond what it handed back. Without THP (disabled,
//! or less than 90% of the region granted as AnonHugePages) it prints `skipped: <reason>`
//! and exits 0, unless `HVMEM_REQUIRE_THP=1` (CI sets it where THP is enabled): then the
//! same reason is a failure.
//!
//! Run: `cargo run --release --example thp_reporting [-- --quick]`

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::ExitCode;

use arrayvec::ArrayVec;
use hvmem::buddy::{Block, Buddy, FrameMeta, LockedBuddy};
use hvmem::hint::guest::{
    Balloon, BalloonConfig, FallbackPolicy, ReportPolicy, ReportTransport, Reporter,
};
use hvmem::hint::host::{Discard, RamLayout, RamRegion, ReportReceiver};
use hvmem::hint::wire::{self, DescError, Direction, ScatterEntry};
use hvmem::testing::Rng;
use hvmem::{Gpa, PageOrder, Pfn};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;
const MAX_ORDER: usize = 10;
/// PFNs per balloon message: whole 2 MiB blocks fit, so the host discards each in one call.
const PFNS_PER_MSG: usize = 1024;
/// How `run` says the kernel gave the region too little THP (see [`no_thp`]).
const NO_THP: &str = "no THP: ";

mod host;

use host::{GuestRam, smaps, thp_unavailable};

/// Discards through `madvise(MADV_DONTNEED)` and remembers what it discarded.
struct Madvise<'a> {
    ram: &'a GuestRam,
    done: Vec<(u64, u64)>,
}

impl Discard for Madvise<'_> {
    type Error = i32;

    fn discard(&mut self, _region: &RamRegion, start: Gpa, len: u64) -> Result<(), i32> {
        self.ram
            .dontneed(start.get(), len)
            .map_err(|e| e.raw_os_error().unwrap_or(-1))?;
        self.done.push((start.get(), len));
        Ok(())
    }
}

type Receiver<'a> = ReportReceiver<RamLayout<1>, Madvise<'a>>;

fn receiver(ram: &GuestRam, bytes: u64, backing: PageOrder) -> Receiver<'_> {
    let mut layout = RamLayout::new();
    layout
        .push(RamRegion::new(Gpa::new(0).unwrap(), bytes, backing).unwrap())
        .unwrap();
    ReportReceiver::new(
        layout,
        Madvise {
            ram,
            done: Vec::new(),
        },
    )
}

fn pattern(pfn: u64) -> u64 {
    pfn.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1
}

/// The guest after `usemem --punch-holes`: its allocator and the pages it still holds.
struct Guest {
    buddy: LockedBuddy<Vec<FrameMeta>, MAX_ORDER>,
    held: Vec<Block>,
}

/// Boots a guest over all of `ram` and runs the workload: `use_bytes` in 4 KiB pages, each
/// written, then every other one freed, in address order or shuffled.
fn usemem(ram: &mut GuestRam, ram_bytes: u64, use_bytes: u64, random: bool) -> Guest {
    let frames = ram_bytes / PAGE;
    let mut b: Buddy<Vec<FrameMeta>, MAX_ORDER> =
        Buddy::new(vec![FrameMeta::HOLE; frames as usize], Pfn::new(0).unwrap()).unwrap();
    b.add_range(Pfn::new(0).unwrap(), frames).unwrap();
    let buddy = LockedBuddy::new(b);
    let pages: Vec<Block> = (0..use_bytes / PAGE)
        .map(|_| {
            let p = buddy.alloc(PageOrder::BASE).unwrap();
            ram.write(p.pfn.addr().get(), pattern(p.pfn.get()));
            p
        })
        .collect();
    let (mut holes, mut held) = (Vec::new(), Vec::new());
    for (i, p) in pages.into_iter().enumerate() {
        if i % 2 == 0 {
            holes.push(p)
        } else {
            held.push(p)
        }
    }
    if random {
        let mut rng = Rng::new(0x2545_f491_4f6c_dd1d);
        for i in (1..holes.len()).rev() {
            holes.swap(i, rng.below(i as u64 + 1) as usize);
        }
    }
    for h in holes {
        buddy.free(h.pfn, h.order).unwrap();
    }
    Guest { buddy, held }
}

/// Sends balloon blocks to the host as inflate PFN arrays (`le32`, 4 KiB units), a block
/// never split across two messages unless it is larger than one.
fn send_pfns(blocks: &[Block], rx: &mut Receiver<'_>) {
    let mut msg: Vec<u8> = Vec::with_capacity(PFNS_PER_MSG * 4);
    for b in blocks {
        if msg.len() / 4 + b.order.frames() as usize > PFNS_PER_MSG && !msg.is_empty() {
            rx.receive_pfns(&msg);
            msg.clear();
        }
        let mut pfns = wire::block_pfns(std::slice::from_ref(b)).peekable();
        while pfns.peek().is_some() {
            let mut buf = [0u8; PFNS_PER_MSG * 4];
            let room = PFNS_PER_MSG - msg.len() / 4;
            let n = wire::encode_pfns(&mut pfns, &mut buf[..room * 4]).unwrap();
            msg.extend_from_slice(&buf[..n * 4]);
            if msg.len() == PFNS_PER_MSG * 4 {
                rx.receive_pfns(&msg);
                msg.clear();
            }
        }
    }
    if !msg.is_empty() {
        rx.receive_pfns(&msg);
    }
}

/// Inflates a balloon by `target` bytes and hands its PFNs to the host. Returns the host
/// pages the balloon says it broke.
fn balloon(
    guest: &Guest,
    rx: &mut Receiver<'_>,
    ram_bytes: u64,
    target: u64,
    cfg: BalloonConfig,
) -> u64 {
    let frames = ram_bytes / PAGE;
    let base = Pfn::new(0).unwrap();
    let words = Balloon::<Vec<u64>>::storage_words(base, frames, cfg.host_order).unwrap();
    let mut b = Balloon::new(vec![0u64; words], base, frames, cfg).unwrap();
    let want = target / PAGE;
    while b.frames() < want {
        let mut out = ArrayVec::<Block, 512>::new();
        let r = b
            .inflate(&guest.buddy, want - b.frames(), &mut out)
            .unwrap();
        send_pfns(&out, rx);
        if r.out_of_memory {
            break;
        }
    }
    assert_eq!(b.frames(), want, "the guest had enough free memory");
    b.check(&guest.buddy.lock()).unwrap();
    b.broken_host_pages()
}

/// The reporting queue: each batch becomes a chain of device-writable descriptors, which the
/// host walks and hands to the receiver; the used buffer always comes back.
struct ReportQueue<'r, 'a> {
    rx: &'r mut Receiver<'a>,
    table: Vec<u8>,
}

impl ReportTransport for ReportQueue<'_, '_> {
    type Error = DescError;

    fn report(&mut self, batch: &[Block]) -> Result<(), DescError> {
        let entries: Vec<ScatterEntry> = batch
            .iter()
            .map(|b| ScatterEntry::from_block(b).unwrap())
            .collect();
        let head = wire::encode_chain(&entries, Direction::DeviceWrites, &mut self.table, 0)?;
        let chain = wire::walk_chain(&self.table, head, Direction::DeviceWrites)?;
        self.rx.receive_report(chain);
        Ok(())
    }
}

/// Free-page reporting at minimum order 9 until a pass finds nothing more (Linux's policy
/// otherwise: 1/16 of a list per pass, `CAP` blocks per batch).
fn report<const CAP: usize>(guest: &Guest, rx: &mut Receiver<'_>) -> u64 {
    let reporter = Reporter::<CAP>::new(ReportPolicy::DEFAULT).unwrap();
    let mut queue = ReportQueue {
        rx,
        table: vec![0u8; CAP * wire::VIRTQ_DESC_SIZE],
    };
    let mut passes = 0;
    loop {
        let s = reporter.report_pass(&guest.buddy, &mut queue).unwrap();
        passes += 1;
        if s.reported_frames == 0 {
            break;
        }
    }
    guest.buddy.lock().check_invariants().unwrap();
    passes
}

#[derive(Clone, Copy, PartialEq)]
enum Way {
    BalloonOrder0,
    BalloonThp,
    BalloonThpPlain,
    BalloonThpHost2M,
    Reporting,
}

impl Way {
    const ALL: [Way; 5] = [
        Way::BalloonOrder0,
        Way::BalloonThp,
        Way::BalloonThpPlain,
        Way::BalloonThpHost2M,
        Way::Reporting,
    ];

    fn name(self) -> &'static str {
        match self {
            Way::BalloonOrder0 => "(a) balloon order 0",
            Way::BalloonThp => "(b) balloon order 9",
            Way::BalloonThpPlain => "(b-plain) order 9, plain fallback",
            Way::BalloonThpHost2M => "(b-2M) order 9, host 2M only",
            Way::Reporting => "(c) reporting order>=9",
        }
    }

    /// AnonHugePages before -> after in the THP_ORDER thread (Zhu's figures in Hildenbrand,
    /// 2020-03-12), for the rows it measured (usemem in address order).
    fn thread_figures(self) -> Option<(u64, u64)> {
        match self {
            Way::BalloonOrder0 => Some((976_896, 153_600)),
            Way::BalloonThp => Some((976_896, 583_680)),
            _ => None,
        }
    }
}

struct Row {
    way: Way,
    random: bool,
    handed_kb: u64,
    /// Whole 2 MiB host pages handed back.
    whole: u64,
    before: (u64, u64),
    after: (u64, u64),
    broken: u64,
}

impl Row {
    /// AnonHugePages lost beyond what the host got back, kB.
    fn lost_kb(&self) -> i64 {
        (self.before.0 as i64 - self.after.0 as i64) - self.handed_kb as i64
    }

    /// Host huge pages that stopped being huge without being handed back whole: the ones
    /// the host had to break.
    fn broke(&self) -> i64 {
        (self.before.0 as i64 - self.after.0 as i64) / 2048 - self.whole as i64
    }
}

fn run(
    way: Way,
    random: bool,
    ram_bytes: u64,
    use_bytes: u64,
    give: u64,
    quick: bool,
) -> Result<Row, String> {
    let mut ram = GuestRam::new(ram_bytes as usize).map_err(|e| format!("mmap: {e}"))?;
    for gpa in (0..ram_bytes).step_by(PAGE as usize) {
        ram.write(gpa, 0);
    }
    let (ahp, _) = smaps(ram.addr());
    if ahp * KIB < ram_bytes * 9 / 10 {
        return Err(format!(
            "{NO_THP}THP not granted (AnonHugePages {ahp} kB of a {} kB region)",
            ram_bytes / KIB
        ));
    }
    let guest = usemem(&mut ram, ram_bytes, use_bytes, random);
    let before = smaps(ram.addr());
    let thp = |policy| BalloonConfig {
        order: PageOrder::HUGE_2M,
        host_order: PageOrder::HUGE_2M,
        policy,
    };
    let backing = match way {
        Way::Reporting | Way::BalloonThpHost2M => PageOrder::HUGE_2M,
        _ => PageOrder::BASE,
    };
    let mut rx = receiver(&ram, ram_bytes, backing);
    let broken = match way {
        Way::BalloonOrder0 => balloon(
            &guest,
            &mut rx,
            ram_bytes,
            give,
            BalloonConfig {
                order: PageOrder::BASE,
                host_order: PageOrder::HUGE_2M,
                policy: FallbackPolicy::Naive,
            },
        ),
        Way::BalloonThp | Way::BalloonThpHost2M => balloon(
            &guest,
            &mut rx,
            ram_bytes,
            give,
            thp(FallbackPolicy::PreferBroken),
        ),
        Way::BalloonThpPlain => {
            balloon(&guest, &mut rx, ram_bytes, give, thp(FallbackPolicy::Naive))
        }
        Way::Reporting => {
            // Linux's 32 blocks per batch; the quick region is too small for its watermark
            // guard (32 << 9 frames must stay free), so it uses 8.
            if quick {
                report::<8>(&guest, &mut rx);
            } else {
                report::<32>(&guest, &mut rx);
            }
            0
        }
    };
    let after = smaps(ram.addr());
    let stats = *rx.stats();
    assert!(stats.bytes.balanced());
    let (_, madvise) = rx.into_parts();
    // Integrity: the workload's pages kept their data; what the host took reads zero.
    for p in &guest.held {
        assert_eq!(
            ram.read(p.pfn.addr().get()),
            pattern(p.pfn.get()),
            "held page {p:?} lost its data"
        );
    }
    for &(start, len) in &madvise.done {
        for gpa in (start..start + len).step_by(PAGE as usize) {
            assert_eq!(ram.read(gpa), 0, "discarded page {gpa:#x} still has data");
        }
    }
    // Whole 2 MiB pages among the discarded ranges (a range never straddles a run).
    let whole = madvise
        .done
        .iter()
        .map(|&(s, l)| ((s + l) / (2 * MIB)).saturating_sub(s.div_ceil(2 * MIB)))
        .sum();
    Ok(Row {
        way,
        random,
        whole,
        handed_kb: (stats.bytes.discarded / u128::from(KIB)) as u64,
        before,
        after,
        broken,
    })
}

/// Where THP is missing or not granted: a skip, or a failure under `HVMEM_REQUIRE_THP=1`.
fn no_thp(reason: &str) -> ExitCode {
    match std::env::var("HVMEM_REQUIRE_THP").as_deref() {
        Ok("1") => {
            println!("FAILED: HVMEM_REQUIRE_THP=1 but {reason}");
            ExitCode::FAILURE
        }
        Ok("0") | Ok("") | Err(_) => {
            println!("skipped: {reason}");
            ExitCode::SUCCESS
        }
        Ok(v) => {
            println!("FAILED: HVMEM_REQUIRE_THP={v}: want 1 (require THP) or 0");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let quick = std::env::args().any(|a| a == "--quick");
    if let Some(reason) = thp_unavailable() {
        return no_thp(&reason);
    }
    // The thread's proportions: 1 GiB guest, usemem 800 MiB, balloon 400 MiB (1024 -> 624).
    let ram = if quick { 64 * MIB } else { 1024 * MIB };
    let (use_bytes, give) = (ram / 1024 * 800, ram / 1024 * 400);
    println!(
        "guest RAM {} MiB (THP, 2 MiB aligned), usemem --punch-holes {} MiB, give back {} MiB\n",
        ram / MIB,
        use_bytes / MIB,
        give / MIB
    );
    let mut rows = Vec::new();
    for random in [false, true] {
        for way in Way::ALL {
            match run(way, random, ram, use_bytes, give, quick) {
                Ok(row) => rows.push(row),
                Err(e) => match e.strip_prefix(NO_THP) {
                    Some(reason) => return no_thp(reason),
                    None => panic!("{e}"),
                },
            }
        }
    }
    println!(
        "{:<51}{:>21} {:>21} {:>9} {:>7} {:>7}  THP_ORDER thread",
        "                                             handed",
        "AnonHugePages kB",
        "RSS kB",
        "THP lost",
        "broken",
        "balloon"
    );
    println!(
        "{:<34} {:>6} {:>9} {:>10} {:>10} {:>10} {:>10} {:>9} {:>7} {:>7}  AnonHugePages kB",
        "way", "holes", "back MiB", "before", "after", "before", "after", "MiB", "2M pgs", "broke",
    );
    for r in &rows {
        let measured = match (r.way.thread_figures(), r.random) {
            (Some((b, a)), false) => format!("{b} -> {a}"),
            _ => String::new(),
        };
        let lost = r.lost_kb();
        println!(
            "{:<34} {:>6} {:>9.1} {:>10} {:>10} {:>10} {:>10} {:>9.1} {:>7} {:>7}  {}",
            r.way.name(),
            if r.random { "random" } else { "seq" },
            r.handed_kb as f64 / 1024.0,
            r.before.0,
            r.after.0,
            r.before.1,
            r.after.1,
            lost as f64 / 1024.0,
            r.broke(),
            if matches!(r.way, Way::Reporting) {
                "-".to_string()
            } else {
                r.broken.to_string()
            },
            measured
        );
    }
    println!(
        "\nTHP lost: the AnonHugePages drop minus the bytes handed back. broken: huge pages that \
         stopped being huge\nwithout being handed back whole. balloon broke: the balloon's own \
         count of host pages it holds part of.\n(b-2M): the host discards only whole 2 MiB pages, \
         so the guest gives up all it ballooned and the host\n\
         gets only the whole pages."
    );
    // The checks the CI relies on.
    let mut failures = Vec::new();
    let get = |way, random| {
        rows.iter()
            .find(|r| r.way == way && r.random == random)
            .unwrap()
    };
    for random in [false, true] {
        let (a, b, plain, c) = (
            get(Way::BalloonOrder0, random),
            get(Way::BalloonThp, random),
            get(Way::BalloonThpPlain, random),
            get(Way::Reporting, random),
        );
        let holes = if random { "random" } else { "seq" };
        if b.lost_kb() >= a.lost_kb() {
            failures.push(format!(
                "{holes}: (b) lost {} kB, not less than (a) {} kB",
                b.lost_kb(),
                a.lost_kb()
            ));
        }
        if b.lost_kb() > plain.lost_kb() || (random && b.lost_kb() >= plain.lost_kb()) {
            failures.push(format!(
                "{holes}: (b) lost {} kB, (b-plain) {} kB",
                b.lost_kb(),
                plain.lost_kb()
            ));
        }
        if c.lost_kb() > 0 {
            failures.push(format!(
                "{holes}: (c) lost {} kB beyond what it handed back",
                c.lost_kb()
            ));
        }
        if c.handed_kb == 0 || b.handed_kb * KIB != give || a.handed_kb * KIB != give {
            failures.push(format!(
                "{holes}: a balloon or the reporter handed back the wrong amount"
            ));
        }
    }
    if failures.is_empty() {
        println!(
            "\nchecks passed: (b) loses less than (a) and no more than (b-plain); (c) loses nothing"
        );
        ExitCode::SUCCESS
    } else {
        for f in &failures {
            println!("FAILED: {f}");
        }
        ExitCode::FAILURE
    }
}
