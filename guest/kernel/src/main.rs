//! `hvmem-guest`: a `no_std` unikernel built on `hvmem` that drives QEMU's virtio-balloon.
//!
//! It boots on QEMU `-M microvm` through the PVH entry ([`boot`]), talks on COM1
//! ([`serial`]), reads the boot memory map ([`start_info`]), builds its own identity page
//! tables with `hvmem::spt` ([`paging`]), manages its RAM with `hvmem::buddy` ([`mem`]),
//! finds the virtio-balloon device on the virtio-mmio bus ([`hal`], [`virtio`]) and then
//! serves the runner's command protocol ([`cmd`]).
//!
//! Unsafe code and assembly live only in the hardware-facing files: [`boot`], [`cpu`],
//! [`phys`] (physical memory through the identity map) and [`hal`] (the virtio `Hal`).
#![no_std]
#![no_main]

mod boot;
mod cpu;
mod serial;

/// The Rust entry, called by [`boot`] in long mode with the `hvm_start_info` address.
pub extern "C" fn kmain(start_info: u64) -> ! {
    serial::init();
    println!("hvmem-guest: booted, start_info at {start_info:#x}");
    cpu::halt()
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    println!("HVMEM PANIC {}", info.message());
    cpu::halt()
}
