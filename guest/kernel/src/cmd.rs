//! The runner's command protocol on COM1 (one `HVMEM OK <cmd> ...` or `HVMEM ERR <cmd> ...`
//! line per command) and the memory the commands hold.
//!
//! - `fill <percent>`: allocate blocks of order <= 9 until free memory is down to
//!   `(100 - percent)%` of managed memory; write each frame's pattern into it; keep them.
//! - `free holes`: free every other 4 KiB page (the odd frames) of the filled memory, but
//!   never a page that would complete a free 2 MiB block: fragmented free memory the
//!   reporter (order >= 9) must leave alone.
//! - `free blocks <MiB>`: make `MiB / 2` naturally aligned 2 MiB blocks wholly free by
//!   freeing every filled page in them (after `free holes` that is half of each block).
//! - `free all`: free everything filled.
//! - `report`: reporting passes (in [`crate::duties`]) until one reports nothing.
//! - `check`: every filled page still holds its pattern.
//! - `touch <MiB>`: allocate, write, read back and free that much: reported memory must
//!   be usable again.
//! - `status`: the counters.

use alloc::vec::Vec;

use hvmem::PageOrder;
use hvmem::buddy::Block;
use hvmem::hint::guest::{Pipeline, ReportPolicy, Reporter};

use crate::hal::Device;
use crate::mem::{BalloonBooks, Frames};
use crate::phys::{self, PAGE};
use crate::println;

/// Blocks per report batch (Linux `PAGE_REPORTING_CAPACITY`; QEMU's reporting queue has 32
/// entries, and with indirect descriptors a batch takes one).
pub const CAP: usize = 32;
/// Report batches in flight at once.
pub const WINDOW: usize = 4;
/// The largest order `fill` and `touch` allocate: one host huge page.
const FILL_ORDER: PageOrder = PageOrder::HUGE_2M;

/// The kernel's state after boot: allocator, device, reporter, balloon, held memory.
pub struct Guest {
    /// The page allocator.
    pub buddy: &'static Frames,
    /// The balloon device, if one was found and initialised.
    pub dev: Option<Device>,
    /// Free page reporting: policy and request state.
    pub reporter: Reporter<CAP>,
    /// The pipelined pass over the reporting queue.
    pub pipeline: Pipeline<CAP, WINDOW>,
    /// The balloon's books.
    pub balloon: BalloonBooks,
    /// Blocks `fill` allocated and `free` has not returned.
    pub filled: Vec<Block>,
    /// Blocks held for the running free page hint run.
    pub hint_held: Vec<Block>,
    /// Bytes hinted in the last run.
    pub hinted: u64,
    /// Host huge pages the balloon broke, over the guest's life.
    pub broke_huge: u64,
    /// The balloon target last acted on (so a target the guest cannot meet is not retried
    /// in a tight loop).
    pub balloon_seen: Option<u32>,
}

impl Guest {
    /// A guest over `buddy` with `dev`, the reporter at order 9 and batches of [`CAP`].
    pub fn new(buddy: &'static Frames, dev: Option<Device>, balloon: BalloonBooks) -> Option<Self> {
        Some(Self {
            buddy,
            dev,
            reporter: Reporter::new(ReportPolicy::DEFAULT).ok()?,
            pipeline: Pipeline::new(),
            balloon,
            filled: Vec::new(),
            hint_held: Vec::new(),
            hinted: 0,
            broke_huge: 0,
            balloon_seen: None,
        })
    }

    fn managed_bytes(&self) -> u64 {
        self.buddy.lock().managed_frames() * PAGE
    }

    /// Runs one command line and prints its reply.
    pub fn command(&mut self, line: &str) {
        let mut words = line.split_ascii_whitespace();
        let Some(cmd) = words.next() else { return };
        let arg = words.next();
        let num = arg.and_then(|a| a.parse::<u64>().ok());
        match (cmd, arg) {
            ("fill", _) => match num.filter(|&p| p <= 100) {
                Some(p) => self.fill(p),
                None => println!("HVMEM ERR fill usage: fill <percent 0..100>"),
            },
            ("free", Some("holes")) => self.free_holes(),
            ("free", Some("all")) => {
                let bytes = self.free_where(|_| true, u64::MAX);
                self.after_free();
                println!("HVMEM OK free bytes={bytes}");
            }
            ("free", Some("blocks")) => match words.next().and_then(|a| a.parse::<u64>().ok()) {
                Some(mib) => self.free_blocks(mib),
                None => println!("HVMEM ERR free usage: free blocks <MiB>"),
            },
            ("free", _) => println!("HVMEM ERR free usage: free holes|blocks <MiB>|all"),
            ("report", _) => self.report_command(),
            ("check", _) => self.check(),
            ("touch", _) => match num {
                Some(mib) => self.touch(mib),
                None => println!("HVMEM ERR touch usage: touch <MiB>"),
            },
            ("status", _) => self.status(),
            (other, _) => println!("HVMEM ERR {other} unknown command"),
        }
    }

    fn fill(&mut self, percent: u64) {
        let managed = self.managed_bytes() / PAGE;
        let keep = managed.saturating_mul(100 - percent) / 100;
        let mut bytes = 0u64;
        loop {
            let free = self.buddy.lock().free_frames();
            let Some(want) = free.checked_sub(keep).filter(|&w| w > 0) else {
                break;
            };
            let order = PageOrder::new(want.ilog2().min(u32::from(FILL_ORDER.get())) as u8)
                .unwrap_or(PageOrder::BASE);
            let Ok(block) = self.buddy.alloc_at_most(order) else {
                break;
            };
            let first = block.pfn.get();
            for pfn in first..first + block.order.frames() {
                phys::fill_frame(pfn);
            }
            bytes += block.order.bytes();
            if self.filled.try_reserve(1).is_err() {
                let _ = self.buddy.free(block.pfn, block.order);
                break;
            }
            self.filled.push(block);
        }
        println!("HVMEM OK fill bytes={bytes}");
    }

    /// Frees filled blocks matching `pick`, newest first, until `limit` bytes are freed
    /// (a block larger than what is left of `limit` is kept).
    fn free_where(&mut self, pick: impl Fn(&Block) -> bool, limit: u64) -> u64 {
        let mut freed = 0u64;
        let mut i = self.filled.len();
        while i > 0 && freed < limit {
            i -= 1;
            let b = self.filled[i];
            if !pick(&b) || b.order.bytes() > limit - freed {
                continue;
            }
            match self.buddy.free_merged(b.pfn, b.order) {
                Ok(merged) => {
                    freed += b.order.bytes();
                    self.filled.swap_remove(i);
                    let _ = self.reporter.on_free(merged);
                }
                Err(e) => println!("hvmem-guest: free of {:#x} failed: {e}", b.pfn.get()),
            }
        }
        freed
    }

    /// Frees the filled memory of whole 2 MiB blocks (highest addresses first) until
    /// `mib` MiB of 2 MiB blocks are wholly free; blocks that hold memory the guest did not
    /// fill are skipped.
    fn free_blocks(&mut self, mib: u64) {
        let want = mib.div_ceil(2);
        let h = FILL_ORDER.get();
        self.filled.sort_unstable_by_key(|b| b.pfn.get());
        let (mut blocks, mut freed) = (0u64, 0u64);
        let mut end = self.filled.len();
        while end > 0 && blocks < want {
            let region = self.filled[end - 1].pfn.get() >> h;
            let mut start = end;
            while start > 0 && self.filled[start - 1].pfn.get() >> h == region {
                start -= 1;
            }
            let group = &self.filled[start..end];
            let held: u64 = group.iter().map(|b| b.order.frames()).sum();
            let free = self.buddy.free_frames_within(group[0].pfn, FILL_ORDER);
            if group.iter().all(|b| b.order <= FILL_ORDER) && held + free == FILL_ORDER.frames() {
                let mut ok = true;
                for b in group {
                    match self.buddy.free_merged(b.pfn, b.order) {
                        Ok(merged) => {
                            freed += b.order.bytes();
                            let _ = self.reporter.on_free(merged);
                        }
                        Err(_) => ok = false,
                    }
                }
                self.filled.drain(start..end);
                blocks += u64::from(ok);
            }
            end = start;
        }
        self.after_free();
        println!("HVMEM OK free bytes={freed} blocks={blocks}");
    }

    /// After memory came back: a balloon target the guest could not meet may be met now.
    fn after_free(&mut self) {
        self.balloon_seen = None;
    }

    fn free_holes(&mut self) {
        let mut freed = 0u64;
        // Room for every page up front: the heap is small, and running out half way would
        // leave pages nobody holds.
        let pages: u64 = self.filled.iter().map(|b| b.order.frames()).sum();
        let mut kept = Vec::new();
        if usize::try_from(pages)
            .ok()
            .and_then(|n| kept.try_reserve_exact(n).ok())
            .is_none()
        {
            println!("HVMEM ERR free heap too small for {pages} pages");
            return;
        }
        let blocks = core::mem::take(&mut self.filled);
        for b in blocks {
            // Take the block apart into single pages: free it, then allocate each of its
            // frames back (nothing else runs meanwhile; the frames keep their contents).
            let pages = if b.order.get() == 0 {
                Some(alloc::vec![b])
            } else {
                self.split_to_pages(b)
            };
            let Some(pages) = pages else {
                kept.push(b);
                continue;
            };
            for p in pages {
                let huge = self.buddy.free_frames_within(p.pfn, FILL_ORDER);
                if p.pfn.get() & 1 == 1
                    && huge + 1 < FILL_ORDER.frames()
                    && self.buddy.free(p.pfn, p.order).is_ok()
                {
                    freed += PAGE;
                    continue;
                }
                kept.push(p);
            }
        }
        self.filled = kept;
        self.after_free();
        println!("HVMEM OK free bytes={freed}");
    }

    /// Frees `b` and allocates its frames back one by one; `None` (with `b` still
    /// allocated as before) if that cannot be done.
    fn split_to_pages(&mut self, b: Block) -> Option<Vec<Block>> {
        let n = usize::try_from(b.order.frames()).ok()?;
        let mut pages = Vec::new();
        pages.try_reserve_exact(n).ok()?;
        self.buddy.free(b.pfn, b.order).ok()?;
        for _ in 0..n {
            match self.buddy.alloc_within(b.pfn, b.order, PageOrder::BASE) {
                Ok(p) => pages.push(p),
                Err(_) => break,
            }
        }
        if pages.len() != n {
            // Cannot happen (the block was free and nothing ran): give back what was taken
            // and try to take the whole block again.
            for p in &pages {
                let _ = self.buddy.free(p.pfn, p.order);
            }
            return self
                .buddy
                .alloc_within(b.pfn, b.order, b.order)
                .ok()
                .filter(|got| got.pfn == b.pfn && got.order == b.order)
                .map(|got| alloc::vec![got]);
        }
        Some(pages)
    }

    fn check(&mut self) {
        let mut pages = 0u64;
        for b in &self.filled {
            let first = b.pfn.get();
            for pfn in first..first + b.order.frames() {
                if !phys::check_frame(pfn) {
                    println!("HVMEM ERR check mismatch pfn={pfn:#x}");
                    return;
                }
                pages += 1;
            }
        }
        println!("HVMEM OK check pages={pages}");
    }

    fn touch(&mut self, mib: u64) {
        let Some(want) = mib.checked_mul((1 << 20) / PAGE) else {
            println!("HVMEM ERR touch short of memory bytes=0");
            return;
        };
        let mut got: Vec<Block> = Vec::new();
        let mut frames = 0u64;
        let mut bad: Option<u64> = None;
        while frames < want {
            let rest = want - frames;
            let order = PageOrder::new(rest.ilog2().min(u32::from(FILL_ORDER.get())) as u8)
                .unwrap_or(PageOrder::BASE);
            let Ok(b) = self.buddy.alloc_at_most(order) else {
                break;
            };
            if got.try_reserve(1).is_err() {
                let _ = self.buddy.free(b.pfn, b.order);
                break;
            }
            got.push(b);
            frames += b.order.frames();
            let first = b.pfn.get();
            for pfn in first..first + b.order.frames() {
                if !(phys::fill_frame(pfn) && phys::check_frame(pfn)) && bad.is_none() {
                    bad = Some(pfn);
                }
            }
        }
        for b in &got {
            if let Ok(merged) = self.buddy.free_merged(b.pfn, b.order) {
                let _ = self.reporter.on_free(merged);
            }
        }
        match bad {
            Some(pfn) => println!("HVMEM ERR touch mismatch pfn={pfn:#x}"),
            None if frames < want => {
                println!("HVMEM ERR touch short of memory bytes={}", frames * PAGE)
            }
            None => println!("HVMEM OK touch bytes={}", frames * PAGE),
        }
    }

    fn status(&mut self) {
        let (free, reported) = {
            let b = self.buddy.lock();
            (b.free_frames() * PAGE, b.reported_frames() * PAGE)
        };
        let (target, actual, cmd) = match &self.dev {
            Some(d) => (
                d.target_pages().unwrap_or(0),
                d.actual_pages().unwrap_or(0),
                d.hint_cmd_id().map(|c| c.get()).unwrap_or(0),
            ),
            None => (0, 0, 0),
        };
        println!(
            "HVMEM OK status free={free} reported={reported} balloon_target={target} \
             balloon_actual={actual} hint_cmd_id={cmd} hinted={} broke_huge={} filled={}",
            self.hinted,
            self.broke_huge,
            self.filled.iter().map(|b| b.order.bytes()).sum::<u64>()
        );
    }
}
