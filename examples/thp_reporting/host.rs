//! The example's host: guest RAM as an anonymous `MADV_HUGEPAGE` mapping, `madvise`, and the
//! region's own `/proc/self/smaps` entry. The only unsafe code of the example.
#![allow(unsafe_code)]

use std::io;
use std::ptr;

/// Anonymous memory standing in for guest RAM: guest physical address `x` is `base + x`.
pub struct GuestRam {
    base: *mut u8,
    len: usize,
}

impl GuestRam {
    /// `len` bytes at a 2 MiB-aligned address, `MADV_HUGEPAGE`, not yet touched.
    pub fn new(len: usize) -> io::Result<Self> {
        let align = 2 << 20;
        let total = len + align;
        // SAFETY: a fresh private anonymous mapping at an address of the kernel's choice;
        // it aliases nothing.
        let raw = unsafe {
            libc::mmap(
                ptr::null_mut(),
                total,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let start = raw as usize;
        let aligned = start.next_multiple_of(align);
        let (head, tail) = (aligned - start, start + total - (aligned + len));
        // SAFETY: both trimmed pieces lie inside the mapping made above and nothing
        // refers to them.
        unsafe {
            if head > 0 {
                libc::munmap(raw, head);
            }
            if tail > 0 {
                libc::munmap((aligned + len) as *mut libc::c_void, tail);
            }
        }
        let ram = Self {
            base: aligned as *mut u8,
            len,
        };
        // SAFETY: the range is exactly the mapping `ram` owns.
        if unsafe { libc::madvise(ram.base.cast(), len, libc::MADV_HUGEPAGE) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(ram)
    }

    /// The host virtual address of guest physical address 0.
    pub fn addr(&self) -> usize {
        self.base as usize
    }

    /// Writes `value` at guest physical address `gpa` (8-byte aligned).
    pub fn write(&mut self, gpa: u64, value: u64) {
        assert!(gpa % 8 == 0 && gpa as usize + 8 <= self.len);
        // SAFETY: in bounds and aligned (asserted); the mapping is readable and writable
        // and only reached through `self`.
        unsafe { ptr::write_volatile(self.base.add(gpa as usize).cast::<u64>(), value) }
    }

    /// Reads the `u64` at guest physical address `gpa` (8-byte aligned).
    pub fn read(&self, gpa: u64) -> u64 {
        assert!(gpa % 8 == 0 && gpa as usize + 8 <= self.len);
        // SAFETY: as in `write`.
        unsafe { ptr::read_volatile(self.base.add(gpa as usize).cast::<u64>()) }
    }

    /// `madvise(MADV_DONTNEED)` on `[gpa, gpa + len)`: the host takes the memory back,
    /// and it reads as zeroes afterwards.
    pub fn dontneed(&self, gpa: u64, len: u64) -> io::Result<()> {
        assert!(gpa % 4096 == 0 && gpa + len <= self.len as u64);
        // SAFETY: a page-aligned range inside the mapping (asserted); the guest model
        // holds no reference into it.
        let r = unsafe {
            libc::madvise(
                self.base.add(gpa as usize).cast(),
                len as usize,
                libc::MADV_DONTNEED,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // SAFETY: the mapping is ours and nothing refers to it any more.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

/// AnonHugePages and Rss of the mapping that starts at `addr`, in kB, from the region's
/// own `/proc/self/smaps` entry.
pub fn smaps(addr: usize) -> (u64, u64) {
    let smaps = std::fs::read_to_string("/proc/self/smaps").expect("read /proc/self/smaps");
    let mut lines = smaps.lines();
    while let Some(line) = lines.next() {
        let Some((range, _)) = line.split_once(' ') else {
            continue;
        };
        let Some((start, _)) = range.split_once('-') else {
            continue;
        };
        if usize::from_str_radix(start, 16) != Ok(addr) {
            continue;
        }
        let (mut ahp, mut rss) = (None, None);
        for l in lines.by_ref() {
            let field = |name: &str| {
                l.strip_prefix(name)
                    .and_then(|v| v.trim().strip_suffix("kB"))
                    .map(|v| v.trim().parse::<u64>().unwrap())
            };
            rss = rss.or(field("Rss:"));
            ahp = ahp.or(field("AnonHugePages:"));
            if let (Some(ahp), Some(rss)) = (ahp, rss) {
                return (ahp, rss);
            }
        }
    }
    panic!("no smaps entry at {addr:#x}");
}

/// Why this machine cannot run the experiment, if it cannot.
pub fn thp_unavailable() -> Option<String> {
    match std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled") {
        Err(e) => Some(format!("no transparent huge pages ({e})")),
        Ok(s) if s.contains("[never]") => Some("transparent huge pages are disabled".into()),
        Ok(_) => None,
    }
}
