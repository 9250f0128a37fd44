//! Physical memory through the identity map (virtual = physical everywhere): reading boot
//! structures, carving the kernel's early structures out of RAM, and the patterns the
//! commands write into the pages they hold.
//!
//! Memory safety rests on two facts the rest of the kernel keeps:
//! - the [`Carver`] hands out each byte of its region once, as a `'static` slice, and only
//!   one carver exists; its region starts above the kernel image and is RAM by the boot map;
//! - the frame functions ([`fill_frame`], [`check_frame`], [`zero`]) touch only frames at or
//!   above the carver's end, i.e. frames the buddy allocator manages, which no Rust reference
//!   points into (they are reached only through raw pointers, here and in the virtio queues).

use core::ptr;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// The page size.
pub const PAGE: u64 = 4096;
/// The boot tables map the first 4 GiB; nothing is read above it before the switch.
const BOOT_MAPPED: u64 = 1 << 32;

unsafe extern "C" {
    static __image_start: u8;
    static __image_end: u8;
}

/// The physical range `[start, end)` of the loaded kernel image (code, data, bss, stack).
pub fn image() -> (u64, u64) {
    (
        ptr::addr_of!(__image_start) as u64,
        ptr::addr_of!(__image_end) as u64,
    )
}

/// Reads a little-endian `u32` of a boot structure at `pa`, or `None` above the boot map.
pub fn read_u32(pa: u64) -> Option<u32> {
    if pa == 0 || pa.checked_add(4)? > BOOT_MAPPED {
        return None;
    }
    // SAFETY: `pa` is below 4 GiB, which the boot tables identity-map; an unaligned
    // volatile read of plain data creates no reference. QEMU's boot structures are RAM.
    Some(u32::from_le_bytes(unsafe {
        ptr::read_volatile(pa as *const [u8; 4])
    }))
}

/// Reads a little-endian `u64` at `pa`, or `None` above the boot map.
pub fn read_u64(pa: u64) -> Option<u64> {
    let lo = read_u32(pa)?;
    let hi = read_u32(pa.checked_add(4)?)?;
    Some(u64::from(lo) | u64::from(hi) << 32)
}

/// Reads the byte at `pa`, or `None` above the boot map.
pub fn read_u8(pa: u64) -> Option<u8> {
    if pa == 0 || pa >= BOOT_MAPPED {
        return None;
    }
    // SAFETY: as in `read_u32`.
    Some(unsafe { ptr::read_volatile(pa as *const u8) })
}

static CARVER_TAKEN: AtomicBool = AtomicBool::new(false);
/// The end of the carved region: frames at or above it belong to the buddy.
static CARVED_END: AtomicU64 = AtomicU64::new(u64::MAX);

/// A bump allocator over one RAM region above the kernel image, for the structures that
/// exist before the buddy allocator: its frame metadata, the page tables, the heap.
pub struct Carver {
    next: u64,
    end: u64,
}

impl Carver {
    /// The carver over `[start, end)`, which the boot map says is RAM. `None` if a carver
    /// was made before, or the range is empty, overlaps the image or lies above the boot map.
    pub fn new(start: u64, end: u64) -> Option<Self> {
        let (_, image_end) = image();
        if start < image_end || start >= end || end > BOOT_MAPPED {
            return None;
        }
        if CARVER_TAKEN.swap(true, Ordering::SeqCst) {
            return None;
        }
        Some(Self { next: start, end })
    }

    /// The first byte not carved yet.
    pub fn next(&self) -> u64 {
        self.next
    }

    /// `count` values made by `init`, at an address aligned to `align` (a power of two,
    /// at least `T`'s alignment), as a slice that lives for ever.
    pub fn take<T>(
        &mut self,
        count: usize,
        align: u64,
        mut init: impl FnMut() -> T,
    ) -> Option<&'static mut [T]> {
        let align = align.max(core::mem::align_of::<T>() as u64);
        if !align.is_power_of_two() {
            return None;
        }
        let start = self.next.checked_add(align - 1)? & !(align - 1);
        let bytes = (count as u64).checked_mul(core::mem::size_of::<T>() as u64)?;
        let end = start.checked_add(bytes)?;
        if end > self.end {
            return None;
        }
        self.next = end;
        let p = start as *mut T;
        for i in 0..count {
            // SAFETY: `[start, end)` is RAM (the carver's contract), identity-mapped, aligned
            // for `T`, and handed out only now (the bump pointer moved past it).
            unsafe { p.add(i).write(init()) };
        }
        // SAFETY: every element was initialised above; the region is never handed out again,
        // so this is the only reference to it.
        Some(unsafe { core::slice::from_raw_parts_mut(p, count) })
    }

    /// Ends carving: frames from the current bump pointer (rounded up to a page) on may be
    /// used by the frame functions. Returns that address.
    pub fn finish(self) -> u64 {
        let end = self.next.next_multiple_of(PAGE);
        CARVED_END.store(end, Ordering::SeqCst);
        end
    }
}

/// Whether `[pa, pa + len)` lies in the memory the buddy may manage (above every carved
/// structure and the image).
fn buddy_ram(pa: u64, len: u64) -> bool {
    pa >= CARVED_END.load(Ordering::Relaxed) && pa.checked_add(len).is_some()
}

/// The word `i` of frame `pfn`'s pattern.
fn pattern(pfn: u64, i: u64) -> u64 {
    (pfn.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i).rotate_left(17) | 1
}

/// Writes frame `pfn`'s pattern into every word of it. Returns `false` (and writes nothing)
/// for a frame outside the buddy's memory.
pub fn fill_frame(pfn: u64) -> bool {
    let pa = pfn.wrapping_mul(PAGE);
    if !buddy_ram(pa, PAGE) {
        return false;
    }
    let p = pa as *mut u64;
    for i in 0..PAGE / 8 {
        // SAFETY: the frame is buddy memory (checked), identity-mapped, and no reference
        // points into it; the caller holds it allocated.
        unsafe { p.add(i as usize).write_volatile(pattern(pfn, i)) };
    }
    true
}

/// Whether frame `pfn` still holds its pattern (`false` also for a frame outside the
/// buddy's memory).
pub fn check_frame(pfn: u64) -> bool {
    let pa = pfn.wrapping_mul(PAGE);
    if !buddy_ram(pa, PAGE) {
        return false;
    }
    let p = pa as *const u64;
    (0..PAGE / 8).all(|i| {
        // SAFETY: as in `fill_frame`, reading.
        unsafe { p.add(i as usize).read_volatile() == pattern(pfn, i) }
    })
}

/// Zeroes `[pa, pa + len)` if it is buddy memory; returns whether it did.
pub fn zero(pa: u64, len: u64) -> bool {
    if !buddy_ram(pa, len) {
        return false;
    }
    // SAFETY: buddy memory (checked), identity-mapped, held by the caller, no references.
    unsafe { ptr::write_bytes(pa as *mut u8, 0, len as usize) };
    true
}

/// The heap behind `alloc` (virtio-drivers' descriptor tables and messages): a small buddy
/// heap in carved RAM, separate from the page allocator so its lock never nests in it.
#[global_allocator]
static HEAP: buddy_system_allocator::LockedHeap<32> = buddy_system_allocator::LockedHeap::empty();

impl Carver {
    /// Carves `bytes` (page-aligned) and gives them to the global allocator. `false` if
    /// there is no room.
    pub fn heap(&mut self, bytes: usize) -> bool {
        let Some(region) = self.take(bytes / PAGE as usize, PAGE, || [0u8; PAGE as usize]) else {
            return false;
        };
        let start = region.as_mut_ptr() as usize;
        // SAFETY: the region was carved for the heap alone (its slice is dropped here and
        // never used again); it is RAM, identity-mapped, and lives for ever.
        unsafe { HEAP.lock().init(start, bytes) };
        true
    }
}
