//! The few privileged instructions the kernel needs: port I/O, loading CR3, HLT, PAUSE.
//!
//! Each is a tiny `asm!` wrapper. Port I/O and HLT cannot break Rust's memory model on this
//! machine (the only devices on ports are COM1 and the PIT/PIC QEMU's microvm provides, none
//! of which DMAs into memory), so they are safe functions here; loading CR3 is `unsafe`.

use core::arch::asm;

/// Reads a byte from an I/O port.
pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: `in` touches no memory; the ports used (COM1) have no side effect on memory.
    unsafe {
        asm!("in al, dx", out("al") v, in("dx") port, options(nomem, nostack, preserves_flags))
    };
    v
}

/// Writes a byte to an I/O port.
pub fn outb(port: u16, v: u8) {
    // SAFETY: `out` touches no memory; the ports used (COM1) have no side effect on memory.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags))
    };
}

/// Loads CR3, switching page tables (and flushing the non-global TLB entries).
///
/// # Safety
/// `root` must be the physical address of a valid 4-level page table that maps the running
/// code, its stack, and every memory Rust references point to, at the same addresses as now.
pub unsafe fn write_cr3(root: u64) {
    // SAFETY: the caller guarantees the new tables map everything identically.
    unsafe { asm!("mov cr3, {}", in(reg) root, options(nostack, preserves_flags)) };
}

/// Stops the CPU until the next interrupt (forever, with interrupts off).
pub fn halt() -> ! {
    loop {
        // SAFETY: `cli; hlt` only stops this CPU; no memory is touched.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

/// A spin-wait hint.
pub fn pause() {
    core::hint::spin_loop();
}
