//! Guest RAM: one anonymous mmap, seen by the host only as `[AtomicU64]`.
//!
//! The only unsafe code of the KVM test lives here (the mmap, the view of it as a slice, and
//! the memslot that hands it to KVM). Everything else reaches guest memory through
//! [`GuestRam::words`], whose atomics make concurrent access by KVM's page walker (which sets
//! accessed/dirty bits) and by the guest itself well-defined from the host's side.
#![allow(unsafe_code)]

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use hvmem::Hpa;
use hvmem::spt::{TableArena, TableFrame, TableSlot};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;

/// Size of one guest page table, and of a guest base page.
pub const PAGE: u64 = 4096;

/// Anonymous, private, zero-filled host memory that backs guest-physical `[0, len)`.
pub struct GuestRam {
    base: NonNull<AtomicU64>,
    len: u64,
}

impl GuestRam {
    /// Maps `len` bytes (a multiple of 2 MiB) of zeroed anonymous memory.
    pub fn new(len: u64) -> Result<Self, String> {
        if len == 0 || len % (2 << 20) != 0 {
            return Err(format!(
                "guest RAM size {len:#x} is not a positive multiple of 2 MiB"
            ));
        }
        let bytes = usize::try_from(len).map_err(|e| e.to_string())?;
        // SAFETY: an anonymous private mapping at an address of the kernel's choosing; no
        // existing memory is affected. The result is checked against MAP_FAILED below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(format!(
                "mmap of {len:#x} bytes: {}",
                std::io::Error::last_os_error()
            ));
        }
        let base = NonNull::new(ptr.cast::<AtomicU64>()).ok_or("mmap returned null")?;
        Ok(Self { base, len })
    }

    /// The whole of guest RAM as 64-bit words: word `i` is guest-physical `8 * i`.
    pub fn words(&self) -> &[AtomicU64] {
        // SAFETY: `base` points at `len` bytes mapped read/write by `new` and unmapped only in
        // `drop`, so the slice lives no longer than the mapping. mmap returns page-aligned
        // memory, which satisfies AtomicU64's alignment, and zero-filled memory is a valid
        // AtomicU64 bit pattern. All host access goes through atomics, so the guest and KVM
        // writing the same memory concurrently is not a data race on the host side.
        unsafe { std::slice::from_raw_parts(self.base.as_ptr(), (self.len / 8) as usize) }
    }

    /// hvmem's table memory over guest-physical `[start, end)`: the tables it hands out have
    /// guest-physical addresses, which is what CR3 and the guest's table entries hold.
    pub fn table_arena(&self, start: u64, end: u64) -> Result<TableArena<'_>, String> {
        if start % PAGE != 0 || end % PAGE != 0 || start >= end || end > self.len {
            return Err(format!(
                "table region [{start:#x}, {end:#x}) outside guest RAM"
            ));
        }
        // Derived from the mmap pointer itself, so it may reach the whole region.
        let first = NonNull::new(self.base.as_ptr().wrapping_add((start / 8) as usize))
            .ok_or("null table region")?
            .cast::<TableFrame>();
        let frames = ((end - start) / PAGE) as usize;
        let base = Hpa::new(start).map_err(|e| e.to_string())?;
        // The arena's out-of-band slots live as long as the test process (leaked, once per
        // arena: a test builds one).
        let slots: &'static mut [TableSlot] =
            Box::leak((0..frames).map(|_| TableSlot::default()).collect());
        // SAFETY: `[start, end)` lies inside the mapping, which stays mapped for as long as
        // `self` is borrowed, i.e. for the arena's lifetime; `start` is 4 KiB aligned and
        // mmap memory is page aligned, so `first` is aligned for `TableFrame`. Every host
        // access to guest RAM goes through the atomics of `words`, KVM's page walker only
        // does atomic accesses to entries, and the guest never touches the table region.
        unsafe { TableArena::from_raw_parts(first, frames, slots, base) }.map_err(|e| e.to_string())
    }

    /// Reads the 64-bit word at guest-physical `gpa` (8-byte aligned).
    pub fn read_u64(&self, gpa: u64) -> u64 {
        self.words()[(gpa / 8) as usize].load(Ordering::Relaxed)
    }

    /// Writes the 64-bit word at guest-physical `gpa` (8-byte aligned).
    pub fn write_u64(&self, gpa: u64, value: u64) {
        self.words()[(gpa / 8) as usize].store(value, Ordering::Relaxed);
    }

    /// Copies `bytes` to guest-physical `gpa` (8-byte aligned); a short tail is merged into
    /// the word that holds it.
    pub fn write_bytes(&self, gpa: u64, bytes: &[u8]) {
        assert_eq!(gpa % 8, 0, "write_bytes wants an 8-byte aligned address");
        for (i, chunk) in bytes.chunks(8).enumerate() {
            let at = gpa + 8 * i as u64;
            let mut word = self.read_u64(at).to_le_bytes();
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(at, u64::from_le_bytes(word));
        }
    }

    /// Registers (or, with `len == 0`, deletes) memslot `slot` as guest-physical `[0, len)`.
    ///
    /// Deleting the slot and adding it again makes KVM drop every shadow page and TLB entry
    /// it built from our page tables: the host-side equivalent of a full TLB flush.
    pub fn set_memslot(&self, vm: &VmFd, slot: u32, present: bool) -> Result<(), String> {
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: if present { self.len } else { 0 },
            userspace_addr: self.base.as_ptr() as u64,
        };
        // SAFETY: the region names exactly the mapping owned by `self`. The caller (`Machine`)
        // declares its `GuestRam` after the `VmFd`, so the VM (and with it the memslot) is
        // dropped before the mapping is unmapped.
        unsafe { vm.set_user_memory_region(region) }
            .map_err(|e| format!("KVM_SET_USER_MEMORY_REGION(present={present}): {e}"))
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`; no reference from `words` can
        // outlive `self`.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.len as usize);
        }
    }
}
