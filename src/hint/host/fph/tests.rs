//! The free-page-hint state machine, and a small live migration in which the guest reuses
//! hinted pages: the race argued about in (Duyck, "aerating memory via hinting", 2019), replayed.

use std::vec;
use std::vec::Vec;

use super::*;
use crate::addr::{Gpa, PageOrder};
use crate::hint::host::{RamLayout, RamRegion};
use crate::hint::wire::{Direction, ScatterEntry, encode_chain, walk_chain};
use crate::testing::Rng;

const PAGES: usize = 64;
/// Guest RAM is one region at 1 MiB.
const BASE: u64 = 0x10_0000;

fn layout() -> RamLayout<2> {
    let mut l = RamLayout::new();
    l.push(
        RamRegion::new(
            Gpa::new(BASE).unwrap(),
            PAGES as u64 * 4096,
            PageOrder::BASE,
        )
        .unwrap(),
    )
    .unwrap();
    l
}

fn addr(page: usize) -> u64 {
    BASE + page as u64 * 4096
}

/// The guest's memory and KVM's write log (every write since the last sync).
struct Source {
    mem: Vec<u64>,
    in_use: Vec<bool>,
    log: Vec<bool>,
}

/// The migration: the dirty bitmap (pages still to send), its sync count, the destination.
struct Migration {
    bitmap: Vec<bool>,
    generation: u64,
    dest: Vec<u64>,
}

impl DirtyBitmap for Migration {
    fn sync_generation(&mut self) -> u64 {
        self.generation
    }

    fn clear(&mut self, first: Gfn, frames: u64) {
        let i = (first.get() - BASE / 4096) as usize;
        assert!(i + frames as usize <= PAGES, "clear outside guest RAM");
        self.bitmap[i..i + frames as usize].fill(false);
    }
}

impl Source {
    /// Every page in use, holding its number; the write log enabled (empty).
    fn new() -> Self {
        Self {
            mem: (0..PAGES as u64).collect(),
            in_use: vec![true; PAGES],
            log: vec![false; PAGES],
        }
    }

    fn write(&mut self, page: usize, value: u64) {
        self.mem[page] = value;
        self.log[page] = true;
    }
}

impl Migration {
    /// Migration starts with every page dirty (QEMU `ram_list_init_bitmaps`).
    fn new() -> Self {
        Self {
            bitmap: vec![true; PAGES],
            generation: 0,
            dest: vec![u64::MAX; PAGES],
        }
    }

    /// KVM_GET_DIRTY_LOG + OR into the bitmap (QEMU `migration_bitmap_sync`).
    fn sync(&mut self, src: &mut Source) {
        for (bit, logged) in self.bitmap.iter_mut().zip(&mut src.log) {
            *bit |= core::mem::take(logged);
        }
        self.generation += 1;
    }

    /// One precopy pass: send every dirty page.
    fn send_dirty(&mut self, src: &Source) {
        for p in 0..PAGES {
            if core::mem::take(&mut self.bitmap[p]) {
                self.dest[p] = src.mem[p];
            }
        }
    }

    /// Every page the guest uses arrived with its content.
    fn lost_pages(&self, src: &Source) -> Vec<usize> {
        (0..PAGES)
            .filter(|&p| src.in_use[p] && self.dest[p] != src.mem[p])
            .collect()
    }
}

/// Starts a round the way QEMU does around a sync and lets the guest echo the id.
fn round(s: &mut FreePageHintSession, src: &mut Source, mig: &mut Migration) -> CmdId {
    s.stop();
    mig.sync(src);
    let id = s.start_round(mig);
    assert_eq!(s.config_cmd_id(), id);
    assert_eq!(s.on_guest_cmd_id(id), CmdIdOutcome::Started);
    id
}

#[test]
fn a_page_reused_before_its_hint_is_processed_stays_dirty() {
    let (mut src, mut mig, mut l) = (Source::new(), Migration::new(), layout());
    let mut s = FreePageHintSession::new();
    round(&mut s, &mut src, &mut mig);

    // The guest frees page 5 and hints it; the hint sits in the queue.
    src.in_use[5] = false;
    let hint = (addr(5), 4096);
    // Before the host gets to it, the guest reallocates page 5 and writes it.
    src.in_use[5] = true;
    src.write(5, 42);
    // Now the host processes the hint: it clears the bit of this round's bitmap...
    let a = s.on_hint(hint.0, hint.1, &mut l, &mut mig).unwrap();
    assert_eq!(
        a,
        HintApplied {
            frames: 1,
            outside: 0
        }
    );
    assert!(!mig.bitmap[5]);
    mig.send_dirty(&src);
    assert_ne!(mig.dest[5], 42, "page 5 was skipped in this pass");

    // ...but the write is in KVM's log, so the next sync marks it dirty again.
    s.stop();
    mig.sync(&mut src);
    assert!(
        mig.bitmap[5],
        "page 5 is in the dirty bitmap the migration sends"
    );
    mig.send_dirty(&src);
    assert_eq!(mig.dest[5], 42);
    assert_eq!(mig.lost_pages(&src), Vec::<usize>::new());
}

#[test]
fn a_hint_that_crosses_a_sync_is_ignored() {
    let (mut src, mut mig, mut l) = (Source::new(), Migration::new(), layout());
    let mut s = FreePageHintSession::new();
    let first = round(&mut s, &mut src, &mut mig);
    src.in_use[5] = false;
    let hint = (addr(5), 4096);
    src.in_use[5] = true;
    src.write(5, 42);
    mig.send_dirty(&src);
    // The host stops the round, syncs (page 5 dirty again from the log), starts the next.
    s.stop();
    mig.sync(&mut src);
    assert!(mig.bitmap[5]);
    let id = s.start_round(&mut mig);
    assert_eq!(id, first.next_run());
    // The queue is ordered: the old hint comes before the guest's echo of the new id.
    // The stale hint arrives while the new round waits for its echo: ignored.
    assert_eq!(
        s.on_hint(hint.0, hint.1, &mut l, &mut mig),
        Err(HintIgnored::NotRunning)
    );
    assert!(mig.bitmap[5], "page 5 stays dirty");
    // So does the guest's STOP of the old round.
    assert_eq!(s.on_guest_cmd_id(CmdId::STOP), CmdIdOutcome::Ignored);
    assert_eq!(s.on_guest_cmd_id(id), CmdIdOutcome::Started);
    s.stop();
    mig.sync(&mut src);
    s.done();
    mig.send_dirty(&src);
    assert_eq!(mig.dest[5], 42);
    assert_eq!(mig.lost_pages(&src), Vec::<usize>::new());
}

#[test]
fn a_host_that_forgets_to_stop_before_syncing_still_ignores_old_hints() {
    let (mut src, mut mig, mut l) = (Source::new(), Migration::new(), layout());
    let mut s = FreePageHintSession::new();
    round(&mut s, &mut src, &mut mig);
    src.in_use[5] = false;
    let hint = (addr(5), 4096);
    src.in_use[5] = true;
    src.write(5, 42);
    mig.send_dirty(&src);
    mig.sync(&mut src); // no stop()
    assert_eq!(
        s.on_hint(hint.0, hint.1, &mut l, &mut mig),
        Err(HintIgnored::StaleRound)
    );
    assert_eq!(s.state(), HintState::Stopped, "a sync ends the round");
    assert!(mig.bitmap[5]);
    mig.send_dirty(&src);
    assert_eq!(mig.lost_pages(&src), Vec::<usize>::new());
}

#[test]
fn a_host_without_rounds_loses_the_write() {
    // The negative control: clear the bit whenever a hint arrives, as if hints had no round.
    let (mut src, mut mig) = (Source::new(), Migration::new());
    mig.sync(&mut src);
    mig.send_dirty(&src);
    // Page 5 is freed and hinted; the guest reuses and writes it; the host syncs...
    src.in_use[5] = false;
    src.in_use[5] = true;
    src.write(5, 42);
    mig.sync(&mut src);
    assert!(mig.bitmap[5]);
    // ...and only then processes the hint, clearing the bit the sync just set.
    mig.bitmap[5] = false;
    mig.send_dirty(&src);
    assert_eq!(mig.lost_pages(&src), vec![5], "Duyck's corruption");
}

/// A randomized migration: the guest frees, hints and immediately reuses pages while the
/// host processes hints late, syncs and starts rounds. `rounds_respected == false` plays a
/// host that clears bits for every hint whatever its round.
fn migrate(seed: u64, rounds_respected: bool) -> Vec<usize> {
    let mut rng = Rng::new(seed);
    let (mut src, mut mig, mut l) = (Source::new(), Migration::new(), layout());
    let mut s = FreePageHintSession::new();
    // The guest's view: the id it is hinting for, and its queue (cmd ids and hints in order).
    enum Msg {
        Cmd(CmdId),
        Hint(u64, u64),
    }
    let mut queue: std::collections::VecDeque<Msg> = Default::default();
    let mut guest_run: Option<CmdId> = None;
    mig.sync(&mut src);
    s.start_round(&mut mig);
    for step in 0..400 {
        // The guest reacts to the config space.
        let shown = s.config_cmd_id();
        match shown.kind() {
            crate::hint::wire::CmdKind::Run(_) if guest_run != Some(shown) => {
                guest_run = Some(shown);
                queue.push_back(Msg::Cmd(shown));
            }
            crate::hint::wire::CmdKind::Run(_) => {}
            _ => guest_run = None,
        }
        match rng.below(10) {
            0..=2 => {
                // Use a page: allocate it if free, write it.
                let p = rng.below(PAGES as u64) as usize;
                src.in_use[p] = true;
                src.write(p, rng.next_u64());
            }
            3 => {
                let p = rng.below(PAGES as u64) as usize;
                src.in_use[p] = false;
            }
            4..=5 => {
                // Hint a run of pages that are free right now (only while hinting).
                if guest_run.is_some() {
                    let p = rng.below(PAGES as u64) as usize;
                    let n = (p..PAGES).take_while(|&q| !src.in_use[q]).count().min(4);
                    if n > 0 {
                        queue.push_back(Msg::Hint(addr(p), n as u64 * 4096));
                    }
                }
            }
            6..=7 => {
                // The host processes the oldest queued buffer.
                match queue.pop_front() {
                    Some(Msg::Cmd(c)) => {
                        s.on_guest_cmd_id(c);
                    }
                    Some(Msg::Hint(a, n)) => {
                        if rounds_respected {
                            let _ = s.on_hint(a, n, &mut l, &mut mig);
                        } else {
                            let first = Gfn::new(a / 4096).unwrap();
                            mig.clear(first, n / 4096);
                        }
                    }
                    None => {}
                }
            }
            8 => mig.send_dirty(&src),
            _ => {
                // Next iteration: stop, sync, new round.
                s.stop();
                mig.sync(&mut src);
                if step < 350 {
                    s.start_round(&mut mig);
                }
            }
        }
    }
    // Stop the VM: last sync and pass; the guest reuses whatever it held (DONE).
    s.stop();
    mig.sync(&mut src);
    s.done();
    while let Some(m) = queue.pop_front() {
        if let Msg::Hint(a, n) = m {
            if rounds_respected {
                let _ = s.on_hint(a, n, &mut l, &mut mig);
            }
        }
    }
    mig.send_dirty(&src);
    mig.lost_pages(&src)
}

#[test]
fn randomized_migrations_lose_no_write() {
    let mut naive_losses = 0;
    for seed in 1..=300 {
        assert_eq!(migrate(seed, true), Vec::<usize>::new(), "seed {seed}");
        naive_losses += usize::from(!migrate(seed, false).is_empty());
    }
    // The same schedules corrupt memory when hints ignore rounds: the test can see the race.
    assert!(
        naive_losses > 0,
        "the race never happened; the test proves nothing"
    );
}

#[test]
fn state_machine() {
    let mut mig = Migration::new();
    let mut s = FreePageHintSession::new();
    assert_eq!(s.state(), HintState::Stopped);
    assert_eq!(s.config_cmd_id(), CmdId::STOP);
    assert_eq!(s.on_guest_cmd_id(CmdId::new(2)), CmdIdOutcome::Ignored);
    let a = s.start_round(&mut mig);
    assert_eq!(a, CmdId::FIRST_RUN);
    assert_eq!(s.state(), HintState::Requested(a));
    // A stale STOP and a wrong id are ignored while requested.
    assert_eq!(s.on_guest_cmd_id(CmdId::STOP), CmdIdOutcome::Ignored);
    assert_eq!(s.on_guest_cmd_id(CmdId::new(9)), CmdIdOutcome::Ignored);
    assert_eq!(
        s.on_guest_cmd_buffer(&a.to_bytes()),
        Ok(CmdIdOutcome::Started)
    );
    assert_eq!(
        s.on_guest_cmd_id(a),
        CmdIdOutcome::Ignored,
        "a repeated echo"
    );
    assert_eq!(s.on_guest_cmd_buffer(&[0, 0]), Err(CmdIdError::BadLength));
    assert_eq!(s.state(), HintState::Running(a));
    assert_eq!(s.on_guest_cmd_id(CmdId::STOP), CmdIdOutcome::Finished);
    assert_eq!(s.state(), HintState::Stopped);
    let b = s.start_round(&mut mig);
    assert_eq!(b, CmdId::new(3));
    s.done();
    assert_eq!(s.config_cmd_id(), CmdId::DONE);
    s.stop();
    assert_eq!(
        s.state(),
        HintState::Done,
        "done is final until a new round"
    );
    assert_eq!(s.stats().rounds, 2);
}

#[test]
fn hints_are_validated_and_clamped_to_ram() {
    let (mut src, mut mig, mut l) = (Source::new(), Migration::new(), layout());
    let mut s = FreePageHintSession::new();
    round(&mut s, &mut src, &mut mig);
    mig.bitmap.fill(true);
    let bad = [
        (addr(0), 0, RangeError::Empty),
        (addr(0) + 1, 4096, RangeError::Unaligned),
        (addr(0), 100, RangeError::Unaligned),
        (u64::MAX - 4095, 8192, RangeError::Overflow),
        ((1 << 52) - 4096, 8192, RangeError::BeyondPhysical),
    ];
    for (a, n, e) in bad {
        assert_eq!(
            s.on_hint(a, n, &mut l, &mut mig),
            Err(HintIgnored::Malformed(e))
        );
    }
    assert!(
        mig.bitmap.iter().all(|&b| b),
        "malformed hints clear nothing"
    );
    // A hint from below RAM to two pages past its end clears all of RAM and nothing else.
    let a = s
        .on_hint(0, BASE + (PAGES as u64 + 2) * 4096, &mut l, &mut mig)
        .unwrap();
    assert_eq!(
        a,
        HintApplied {
            frames: PAGES as u64,
            outside: BASE + 8192
        }
    );
    assert!(mig.bitmap.iter().all(|&b| !b));
    // A chain of hints.
    mig.bitmap.fill(true);
    let entries = [
        ScatterEntry {
            addr: addr(1),
            len: 8192,
        },
        ScatterEntry {
            addr: addr(10),
            len: 4096,
        },
        ScatterEntry { addr: 0, len: 4096 },
    ];
    let mut table = vec![0u8; 8 * 16];
    let head = encode_chain(&entries, Direction::DeviceWrites, &mut table, 0).unwrap();
    let walk = walk_chain(&table, head, Direction::DeviceWrites).unwrap();
    assert_eq!(s.on_hint_chain(walk, &mut l, &mut mig), 3);
    let clear: Vec<usize> = (0..PAGES).filter(|&p| !mig.bitmap[p]).collect();
    assert_eq!(clear, vec![1, 2, 10]);
    let st = *s.stats();
    assert_eq!(
        (st.applied, st.malformed, st.frames_cleared),
        (4, 5, PAGES as u64 + 3)
    );
}
