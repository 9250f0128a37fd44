//! The kernel's memory: `hvmem::buddy` over the RAM the boot map gives, the balloon's
//! books, and the small heap behind `#[global_allocator]` (virtio-drivers allocates its
//! indirect descriptor tables and message buffers there).
//!
//! Layout of RAM: `[0, 1 MiB)` is left alone (boot structures, BIOS); the kernel image
//! starts at 1 MiB; right after it the [`Carver`] takes the buddy's frame metadata, the
//! balloon's bitmaps, the page-table frames and the heap; every RAM frame above that goes to
//! the buddy. The buddy's memory starts *reported*: QEMU has never backed it, so the first
//! reporting pass must not count it as given back.

use hvmem::buddy::{Buddy, FrameMeta, LockedBuddy};
use hvmem::hint::guest::{Balloon, BalloonConfig, FallbackPolicy};
use hvmem::{PageOrder, Pfn};
use spin::Once;

use crate::phys::{Carver, PAGE};
use crate::start_info::BootInfo;

/// The buddy's metadata storage.
pub type Meta = &'static mut [FrameMeta];
/// The kernel's page allocator.
pub type Frames = LockedBuddy<Meta>;
/// The balloon's books.
pub type BalloonBooks = Balloon<&'static mut [u64]>;

static BUDDY: Once<Frames> = Once::new();

/// The page allocator, once [`init_buddy`] ran.
pub fn buddy() -> Option<&'static Frames> {
    BUDDY.get()
}

/// Heap bytes for the global allocator: 2 MiB plus 1/128 of the RAM window, enough for
/// the commands' lists of held blocks (16 bytes per block; `free holes` keeps one block per
/// two pages) and virtio-drivers' buffers.
pub fn heap_bytes(window_frames: u64) -> usize {
    let extra = (window_frames * PAGE / 128).next_multiple_of(PAGE);
    (2 << 20) + usize::try_from(extra).unwrap_or(0)
}

/// The first frame the buddy's window covers (1 MiB).
const WINDOW_BASE: u64 = (1 << 20) / PAGE;

/// The window `[WINDOW_BASE, end)` in frames covering all RAM above 1 MiB.
pub fn window(info: &BootInfo) -> Option<(Pfn, u64)> {
    let end = info.ram().map(|r| r.end() / PAGE).max()?;
    let frames = end.checked_sub(WINDOW_BASE).filter(|&f| f > 0)?;
    Some((Pfn::new(WINDOW_BASE).ok()?, frames))
}

/// Carves the buddy's metadata; returns it with the window.
pub fn carve_meta(carver: &mut Carver, info: &BootInfo) -> Option<(Meta, Pfn, u64)> {
    let (base, frames) = window(info)?;
    let meta = carver.take(usize::try_from(frames).ok()?, 16, || FrameMeta::HOLE)?;
    Some((meta, base, frames))
}

/// Carves the balloon's books for the window, at THP order (9) with the
/// prefer-broken fallback.
pub fn carve_balloon(carver: &mut Carver, base: Pfn, frames: u64) -> Option<BalloonBooks> {
    let host = PageOrder::HUGE_2M;
    let words = Balloon::<&'static mut [u64]>::storage_words(base, frames, host)?;
    let storage = carver.take(words, 8, || 0u64)?;
    let cfg = BalloonConfig {
        order: host,
        host_order: host,
        policy: FallbackPolicy::PreferBroken,
    };
    Balloon::new(storage, base, frames, cfg).ok()
}

/// Builds the buddy over every RAM frame at or above `free_from` and publishes it.
/// Returns the managed bytes.
pub fn init_buddy(meta: Meta, base: Pfn, info: &BootInfo, free_from: u64) -> Option<u64> {
    let mut b = Buddy::new(meta, base).ok()?;
    for r in info.ram() {
        let start = r.start.max(free_from).div_ceil(PAGE);
        let end = r.end() / PAGE;
        if end > start {
            b.add_range_reported(Pfn::new(start).ok()?, end - start)
                .ok()?;
        }
    }
    let managed = b.managed_frames() * PAGE;
    BUDDY.call_once(|| LockedBuddy::new(b));
    Some(managed)
}
