//! The host receiver and the free-page-hint session against a byte-range model, driven by
//! arbitrary guest buffers (the `host_receiver` fuzz target and the randomized tests).
//!
//! The model knows the RAM regions as a plain list and computes, for each range, what must
//! be accepted, clamped and rejected by looking at every region in turn: no cursor, no
//! binary search, no early exits. The harness checks after every op that
//!
//! - every discard and every bitmap clear lies inside one region, on whole backing pages
//!   (DESIGN.md invariant 5: nothing outside guest RAM is ever discarded);
//! - the discards are exactly the model's;
//! - accepted + clamped + rejected bytes add up to what the guest claimed, and match the
//!   model's totals;
//! - every entry a decoder accepts encodes back to the bytes it came from;
//! - a hint clears bits only while its round runs and the bitmap has not been synced since.

use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use super::Rng;
use crate::addr::{Gpa, PAGE_SIZE, PageOrder};
use crate::hint::host::{
    ByteTotals, CmdIdOutcome, DiscardMode, FreePageHintSession, HintState, RamLayout, RamRegion,
    ReportReceiver, SkipReason,
};
use crate::hint::wire::{
    CmdId, Direction, PaOrderHint, VIRTQ_DESC_SIZE, VirtqDesc, decode_hints, pfn_runs, walk_chain,
};

mod model;

use model::{MockBitmap, MockDiscard, gpa, model_range};

/// Regions a layout may have.
pub const MAX_REGIONS: usize = 4;
/// One past the highest physical address.
const TOP: u64 = 1 << 52;

/// One region of the layout under test: after a gap from the previous one (or at the top of
/// the physical address space when `high`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(fuzzing, derive(arbitrary::Arbitrary))]
pub struct RegionSpec {
    /// Pages between the previous region's end (or 0) and this region.
    pub gap_pages: u16,
    /// Pages in the region, at least one.
    pub pages: u16,
    /// Backing order, folded to 0..=10.
    pub backing: u8,
    /// Put the region at the very top of the 52-bit space instead.
    pub high: bool,
}

/// An address near a region: its start plus `offset_pages` pages plus `misalign` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(fuzzing, derive(arbitrary::Arbitrary))]
pub struct Near {
    /// Which region (modulo their number).
    pub region: u8,
    /// Pages from the region's start, either way.
    pub offset_pages: i32,
    /// Length in pages.
    pub pages: u16,
    /// Bytes added to the address when not zero (folded below 4096).
    pub misalign: u16,
}

/// One guest buffer or host action.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(fuzzing, derive(arbitrary::Arbitrary))]
pub enum ReceiverOp {
    /// A raw range.
    Range { addr: u64, len: u64 },
    /// A range near a region.
    Near(Near),
    /// An arbitrary descriptor table and head: a PAGE_REPORTING buffer.
    Report { table: Vec<u8>, head: u16 },
    /// A well-formed report chain of ranges near regions.
    ReportOf(Vec<Near>),
    /// An arbitrary `pa | order` hint buffer.
    Hints(Vec<u8>),
    /// Hints of blocks near regions (orders folded to 0..=12).
    HintsOf(Vec<(Near, u8)>),
    /// An arbitrary balloon PFN array.
    Pfns(Vec<u8>),
    /// A PFN array of `count` frames near a region, every `stride`-th frame.
    PfnsNear { at: Near, count: u16, stride: u8 },
    /// Discard, or skip.
    Mode { skip: bool },
    /// The next `calls` discards fail.
    FailNext { calls: u8 },
    /// The host syncs its dirty bitmap (without stopping the round first when `no_stop`).
    Sync { no_stop: bool },
    /// The host starts a round.
    Start,
    /// The host says DONE.
    Done,
    /// The guest echoes the id the config space shows.
    Echo,
    /// An arbitrary command-id buffer from the guest.
    Cmd(Vec<u8>),
    /// A free-page hint near a region.
    Hint(Near),
    /// A raw free-page hint.
    HintRaw { addr: u64, len: u64 },
    /// An arbitrary free-page hint chain.
    HintChain { table: Vec<u8>, head: u16 },
}

/// Receiver, session, mocks and model.
pub struct ReceiverHarness {
    receiver: ReportReceiver<RamLayout<MAX_REGIONS>, MockDiscard>,
    session: FreePageHintSession,
    bitmap: MockBitmap,
    regions: Vec<RamRegion>,
    expected: ByteTotals,
    /// The model of the session: the round that runs and the generation it started at.
    running: Option<u64>,
    requested: Option<(CmdId, u64)>,
}

impl ReceiverHarness {
    /// A harness over the layout the specs describe (at least one region).
    pub fn new(specs: &[RegionSpec]) -> Self {
        let mut layout = RamLayout::new();
        let mut cursor = 0u64;
        for s in specs.iter().take(MAX_REGIONS) {
            let size = u64::from(s.pages.max(1)) * PAGE_SIZE;
            let start = if s.high {
                TOP - size
            } else {
                cursor + u64::from(s.gap_pages) * PAGE_SIZE
            };
            let order = PageOrder::new(s.backing % 11).unwrap_or(PageOrder::BASE);
            let Ok(gpa) = Gpa::new(start) else { continue };
            if let Ok(r) = RamRegion::new(gpa, size, order) {
                if layout.push(r).is_ok() {
                    cursor = r.end();
                }
            }
        }
        if layout.regions().is_empty() {
            let r = RamRegion::new(gpa(0), 64 * PAGE_SIZE, PageOrder::BASE);
            if let Ok(r) = r {
                let _ = layout.push(r);
            }
        }
        let regions: Vec<RamRegion> = layout.regions().to_vec();
        let bits = regions
            .iter()
            .map(|r| vec![true; (r.size() / PAGE_SIZE) as usize])
            .collect();
        Self {
            receiver: ReportReceiver::new(
                layout,
                MockDiscard {
                    regions: regions.clone(),
                    calls: Vec::new(),
                    fail: 0,
                    violation: None,
                },
            ),
            session: FreePageHintSession::new(),
            bitmap: MockBitmap {
                regions: regions.clone(),
                bits,
                generation: 0,
                violation: None,
            },
            regions,
            expected: ByteTotals::default(),
            running: None,
            requested: None,
        }
    }

    /// A harness over a random layout.
    pub fn random(rng: &mut Rng) -> Self {
        let n = 1 + rng.below(MAX_REGIONS as u64) as usize;
        let specs: Vec<RegionSpec> = (0..n)
            .map(|i| RegionSpec {
                gap_pages: rng.below(1200) as u16,
                pages: 1 + rng.below(3000) as u16,
                backing: [0, 0, 9, 9, 3, 10][rng.below(6) as usize],
                high: i + 1 == n && rng.below(4) == 0,
            })
            .collect();
        Self::new(&specs)
    }

    /// How much the ops exercised: discard calls, rejected ranges, hints applied, hints
    /// ignored as stale.
    pub fn coverage(&self) -> [u64; 4] {
        let r = self.receiver.stats();
        let h = self.session.stats();
        [r.discard_calls, r.rejected_ranges, h.applied, h.stale]
    }

    fn near(&self, n: &Near) -> (u64, u64) {
        let r = self.regions[usize::from(n.region) % self.regions.len()];
        let base = r.start().get() as i128 + i128::from(n.offset_pages) * PAGE_SIZE as i128;
        let addr = base.clamp(0, u64::MAX as i128) as u64;
        let addr = if n.misalign == 0 {
            addr
        } else {
            addr.wrapping_add(u64::from(n.misalign % 4096))
        };
        (addr, u64::from(n.pages) * PAGE_SIZE)
    }

    /// Feeds one range to the model; returns the discards it expects.
    fn expect(&mut self, addr: u64, len: u64, out: &mut Vec<(u64, u64)>) {
        let skip = matches!(self.receiver.mode(), DiscardMode::Skip(_));
        match model_range(&self.regions, addr, len, skip) {
            Ok(e) => {
                let t = &mut self.expected;
                t.claimed += e.totals.claimed;
                t.accepted += e.totals.accepted;
                t.clamped_outside += e.totals.clamped_outside;
                t.clamped_partial += e.totals.clamped_partial;
                t.skipped += e.totals.skipped;
                out.extend(e.discards);
            }
            Err(_) => {
                self.expected.claimed += u128::from(len);
                self.expected.rejected += u128::from(len);
            }
        }
    }

    /// Applies one op to the real structures and the model, then checks them.
    pub fn apply(&mut self, op: &ReceiverOp) -> Result<(), String> {
        let mut want = Vec::new();
        let calls_before = self.receiver.discarder().calls.len();
        let failing = self.receiver.discarder().fail;
        match op {
            ReceiverOp::Range { addr, len } => {
                self.expect(*addr, *len, &mut want);
                let _ = self.receiver.receive_range(*addr, *len);
            }
            ReceiverOp::Near(n) => {
                let (a, l) = self.near(n);
                self.expect(a, l, &mut want);
                let _ = self.receiver.receive_range(a, l);
            }
            ReceiverOp::Report { table, head } => self.report(table, *head, &mut want)?,
            ReceiverOp::ReportOf(entries) => {
                let mut table = Vec::new();
                for (i, n) in entries.iter().take(64).enumerate() {
                    let (a, l) = self.near(n);
                    let last = i + 1 == entries.len().min(64);
                    let d = VirtqDesc {
                        entry: crate::hint::wire::ScatterEntry {
                            addr: a,
                            len: l as u32,
                        },
                        flags: 2 | if last { 0 } else { 1 },
                        next: if last { 0 } else { i as u16 + 1 },
                    };
                    table.extend_from_slice(&d.to_bytes());
                }
                self.report(&table, 0, &mut want)?;
            }
            ReceiverOp::Hints(bytes) => self.hints(bytes, &mut want)?,
            ReceiverOp::HintsOf(hs) => {
                let mut bytes = Vec::new();
                for (n, o) in hs.iter().take(64) {
                    let (a, _) = self.near(n);
                    let o = u64::from(o % 13);
                    bytes.extend_from_slice(&((a & !((PAGE_SIZE << o) - 1)) | o).to_le_bytes());
                }
                self.hints(&bytes, &mut want)?;
            }
            ReceiverOp::Pfns(bytes) => self.pfns(bytes, &mut want),
            ReceiverOp::PfnsNear { at, count, stride } => {
                let (a, _) = self.near(at);
                let first = a / PAGE_SIZE;
                let step = u64::from(stride % 3) + 1;
                let bytes: Vec<u8> = (0..u64::from(*count % 2048))
                    .map(|i| (first + i * step) as u32)
                    .flat_map(u32::to_le_bytes)
                    .collect();
                self.pfns(&bytes, &mut want);
            }
            ReceiverOp::Mode { skip } => self.receiver.set_mode(if *skip {
                DiscardMode::Skip(SkipReason::DeviceAssigned)
            } else {
                DiscardMode::Discard
            }),
            ReceiverOp::FailNext { calls } => {
                self.receiver.discarder().fail = u32::from(*calls % 4);
            }
            _ => self.fph(op)?,
        }
        // Discards: exactly the model's, minus the ones the mock failed on purpose.
        let d = self.receiver.discarder();
        if let Some(v) = d.violation.take() {
            return Err(v);
        }
        let got = &d.calls[calls_before..];
        let nfail = (failing as usize).min(want.len());
        if got != &want[nfail..] {
            return Err(format!(
                "discards {got:x?}, model {want:x?} ({nfail} failing)"
            ));
        }
        let sum = |v: &[(u64, u64)]| v.iter().map(|&(_, l)| u128::from(l)).sum::<u128>();
        self.expected.failed += sum(&want[..nfail]);
        self.expected.discarded += sum(&want[nfail..]);
        let s = self.receiver.stats().bytes;
        if !s.balanced() {
            return Err(format!("bytes do not add up: {s:?}"));
        }
        if s != self.expected {
            return Err(format!("totals {s:?}, model {:?}", self.expected));
        }
        if let Some(v) = self.bitmap.violation.take() {
            return Err(v);
        }
        Ok(())
    }

    fn report(
        &mut self,
        table: &[u8],
        head: u16,
        want: &mut Vec<(u64, u64)>,
    ) -> Result<(), String> {
        let Ok(walk) = walk_chain(table, head, Direction::DeviceWrites) else {
            return Ok(());
        };
        for e in walk.clone().flatten() {
            self.expect(e.addr, u64::from(e.len), want);
        }
        // Round trip: every slot re-encodes to its bytes.
        for slot in table.chunks_exact(VIRTQ_DESC_SIZE) {
            let b: &[u8; VIRTQ_DESC_SIZE] = slot.try_into().map_err(|_| "slot")?;
            if &VirtqDesc::from_bytes(b).to_bytes() != b {
                return Err("descriptor does not round-trip".into());
            }
        }
        self.receiver.receive_report(walk);
        Ok(())
    }

    fn hints(&mut self, bytes: &[u8], want: &mut Vec<(u64, u64)>) -> Result<(), String> {
        for (h, raw) in decode_hints(bytes).zip(bytes.chunks(8)) {
            if let Ok(h) = h {
                if h.to_bytes()[..] != *raw {
                    return Err(format!("{h:?} does not round-trip"));
                }
                if PaOrderHint::decode(h.encode()) != Ok(h) {
                    return Err(format!("{h:?} does not decode from its encoding"));
                }
                self.expect(h.addr(), h.len(), want);
            }
        }
        self.receiver.receive_hints(bytes);
        Ok(())
    }

    fn pfns(&mut self, bytes: &[u8], want: &mut Vec<(u64, u64)>) {
        let runs: Vec<_> = pfn_runs(bytes).flatten().collect();
        let frames: u64 = runs.iter().map(|r| r.frames).sum();
        debug_assert_eq!(frames as usize, bytes.len() / 4);
        for r in runs {
            let (a, l) = r.range();
            self.expect(a, l, want);
        }
        self.receiver.receive_pfns(bytes);
    }

    fn fph(&mut self, op: &ReceiverOp) -> Result<(), String> {
        let before: Vec<Vec<bool>> = self.bitmap.bits.clone();
        let mut allowed: Vec<(u64, u64)> = Vec::new();
        let gen_now = self.bitmap.generation;
        let live = self.running == Some(gen_now);
        match op {
            ReceiverOp::Sync { no_stop } => {
                if !no_stop {
                    self.session.stop();
                    self.running = None;
                    self.requested = None;
                }
                self.bitmap.generation += 1;
                for b in &mut self.bitmap.bits {
                    b.fill(true);
                }
                return Ok(());
            }
            ReceiverOp::Start => {
                let id = self.session.start_round(&mut self.bitmap);
                self.requested = Some((id, self.bitmap.generation));
                self.running = None;
            }
            ReceiverOp::Done => {
                self.session.done();
                self.running = None;
                self.requested = None;
            }
            ReceiverOp::Echo => {
                let id = self.session.config_cmd_id();
                let r = self.session.on_guest_cmd_id(id);
                match self.requested {
                    Some((want, g)) if want == id => {
                        if r != CmdIdOutcome::Started {
                            return Err(format!("echo of {id} gave {r:?}"));
                        }
                        self.running = Some(g);
                        self.requested = None;
                    }
                    _ => {}
                }
            }
            ReceiverOp::Cmd(bytes) => {
                let r = self.session.on_guest_cmd_buffer(bytes);
                match (r, CmdId::decode(bytes)) {
                    (Ok(CmdIdOutcome::Started), Ok(id)) => {
                        if self.requested.map(|(w, _)| w) != Some(id) {
                            return Err(format!("{id} started a round not requested"));
                        }
                        self.running = self.requested.take().map(|(_, g)| g);
                    }
                    (Ok(CmdIdOutcome::Finished), _) => self.running = None,
                    (Ok(CmdIdOutcome::Ignored), _) => {}
                    (Err(_), Err(_)) => {}
                    (r, d) => return Err(format!("cmd buffer {bytes:?}: {r:?} / {d:?}")),
                }
            }
            ReceiverOp::Hint(n) => {
                let (a, l) = self.near(n);
                self.fph_hint(a, l, live, &mut allowed)?;
            }
            ReceiverOp::HintRaw { addr, len } => self.fph_hint(*addr, *len, live, &mut allowed)?,
            ReceiverOp::HintChain { table, head } => {
                if let Ok(walk) = walk_chain(table, *head, Direction::DeviceWrites) {
                    if live {
                        for e in walk.clone().flatten() {
                            if let Ok(x) =
                                model_range(&self.regions, e.addr, u64::from(e.len), true)
                            {
                                allowed.extend(x.pages);
                            }
                        }
                    }
                    let layout = self.receiver.layout();
                    self.session.on_hint_chain(walk, layout, &mut self.bitmap);
                }
            }
            _ => {}
        }
        if self.running.is_some() && !matches!(self.session.state(), HintState::Running(_)) {
            // A sync without stop ends the round at the next hint; follow the session.
            self.running = None;
        }
        // Only bits of allowed pages may have been cleared, and all of those are.
        for (i, r) in self.regions.iter().enumerate() {
            for (p, (&b, &was)) in self.bitmap.bits[i].iter().zip(&before[i]).enumerate() {
                let a = r.start().get() + p as u64 * PAGE_SIZE;
                if was && !b && !allowed.iter().any(|&(s, l)| a >= s && a < s + l) {
                    return Err(format!("bit of {a:#x} cleared outside a live round's hint"));
                }
            }
        }
        for &(s, l) in &allowed {
            let Some(i) = self.regions.iter().position(|r| r.contains(gpa(s))) else {
                return Err(format!("allowed range {s:#x} outside RAM"));
            };
            let first = ((s - self.regions[i].start().get()) / PAGE_SIZE) as usize;
            let n = (l / PAGE_SIZE) as usize;
            if self.bitmap.bits[i][first..first + n].iter().any(|&b| b) {
                return Err(format!(
                    "hinted pages at {s:#x} of a live round still dirty"
                ));
            }
        }
        Ok(())
    }

    fn fph_hint(
        &mut self,
        a: u64,
        l: u64,
        live: bool,
        allowed: &mut Vec<(u64, u64)>,
    ) -> Result<(), String> {
        let r = {
            let layout = self.receiver.layout();
            self.session.on_hint(a, l, layout, &mut self.bitmap)
        };
        let model = model_range(&self.regions, a, l, true);
        match (&r, live, &model) {
            (Ok(x), true, Ok(m)) => {
                let frames: u64 = m.pages.iter().map(|&(_, l)| l / PAGE_SIZE).sum();
                if x.frames != frames {
                    return Err(format!("hint cleared {} pages, model {frames}", x.frames));
                }
                allowed.extend(m.pages.iter().copied());
                Ok(())
            }
            (Err(_), false, _) | (Err(_), true, Err(_)) => Ok(()),
            _ => Err(format!(
                "hint {a:#x}+{l:#x}: {r:?}, live {live}, model ok {}",
                model.is_ok()
            )),
        }
    }
}

fn near(rng: &mut Rng) -> Near {
    Near {
        region: rng.below(4) as u8,
        offset_pages: rng.below(1200) as i32 - 200,
        pages: rng.below(1100) as u16,
        misalign: if rng.below(10) == 0 {
            rng.below(4096) as u16
        } else {
            0
        },
    }
}

fn bytes(rng: &mut Rng, n: u64) -> Vec<u8> {
    (0..rng.below(n)).map(|_| rng.next_u64() as u8).collect()
}

/// A random op, mostly well-formed ranges near regions with some raw garbage.
pub fn random_op(rng: &mut Rng) -> ReceiverOp {
    match rng.below(22) {
        0 => ReceiverOp::Range {
            addr: rng.next_u64() >> rng.below(64),
            len: rng.next_u64() >> rng.below(64),
        },
        1..=4 => ReceiverOp::Near(near(rng)),
        5 => ReceiverOp::Report {
            table: bytes(rng, 80),
            head: rng.below(6) as u16,
        },
        6..=7 => ReceiverOp::ReportOf((0..rng.below(8)).map(|_| near(rng)).collect()),
        8 => ReceiverOp::Hints(bytes(rng, 40)),
        9..=10 => ReceiverOp::HintsOf(
            (0..rng.below(8))
                .map(|_| (near(rng), rng.below(13) as u8))
                .collect(),
        ),
        11 => ReceiverOp::Pfns(bytes(rng, 40)),
        12..=13 => ReceiverOp::PfnsNear {
            at: near(rng),
            count: rng.below(1100) as u16,
            stride: rng.below(4) as u8,
        },
        14 => ReceiverOp::Mode {
            skip: rng.below(3) == 0,
        },
        15 => ReceiverOp::FailNext {
            calls: rng.below(3) as u8,
        },
        16 => ReceiverOp::Sync {
            no_stop: rng.below(3) == 0,
        },
        17 => ReceiverOp::Start,
        18 => {
            if rng.below(8) == 0 {
                ReceiverOp::Done
            } else if rng.below(3) == 0 {
                ReceiverOp::Cmd(bytes(rng, 6))
            } else {
                ReceiverOp::Echo
            }
        }
        19..=20 => ReceiverOp::Hint(near(rng)),
        _ => ReceiverOp::HintRaw {
            addr: rng.next_u64() >> rng.below(64),
            len: rng.next_u64() >> rng.below(64),
        },
    }
}
