//! `hvmem-guest`: a `no_std` unikernel built on `hvmem` that drives QEMU's virtio-balloon.
//!
//! It boots on QEMU `-M microvm` through the PVH entry ([`boot`]), talks on COM1
//! ([`serial`]), reads the boot memory map ([`start_info`]), builds its own identity page
//! tables with `hvmem::spt` ([`paging`]), manages its RAM with `hvmem::buddy` ([`mem`]),
//! finds the virtio-balloon device on the virtio-mmio bus ([`hal`]) and hands it to the
//! `hvmem-virtio-balloon` driver, then serves the runner's command protocol ([`cmd`]) and
//! the device's background requests ([`duties`]) from one polling loop (no interrupts).
//!
//! `guest/README.md` has the build command and the serial protocol.
//!
//! Unsafe code and assembly live only in the hardware-facing files: [`boot`], [`cpu`],
//! [`phys`] (physical memory through the identity map), [`hal`] (the virtio `Hal`) and the
//! CR3 switch in [`paging`].
#![no_std]
#![no_main]

extern crate alloc;

mod boot;
mod cmd;
mod cpu;
mod duties;
mod hal;
mod mem;
mod paging;
mod phys;
mod serial;
mod start_info;

use phys::Carver;
use start_info::BootInfo;

/// Stops with a protocol error line: the runner sees why the guest never became ready.
fn fail(what: &str) -> ! {
    println!("HVMEM ERR boot {what}");
    cpu::halt()
}

/// The Rust entry, called by [`boot`] in long mode with the `hvm_start_info` address.
pub extern "C" fn kmain(start_info: u64) -> ! {
    serial::init();
    println!("hvmem-guest: PVH boot, hvm_start_info at {start_info:#x}");
    let info = match BootInfo::parse(start_info) {
        Ok(i) => i,
        Err(e) => {
            println!("hvmem-guest: {e:?}");
            fail("bad hvm_start_info")
        }
    };
    println!("hvmem-guest: cmdline \"{}\"", info.cmdline.as_str());
    for r in &info.memmap {
        println!(
            "hvmem-guest: e820 {:#012x}..{:#012x} {:?}",
            r.start,
            r.end(),
            r.kind
        );
    }
    let (image_start, image_end) = phys::image();
    println!("hvmem-guest: image {image_start:#x}..{image_end:#x}");

    // Early structures go right after the image, in the RAM region that holds it.
    let carve_start = image_end.next_multiple_of(phys::PAGE);
    let Some(region) = info
        .ram()
        .find(|r| r.start <= carve_start && carve_start < r.end())
    else {
        fail("no RAM after the kernel image")
    };
    let Some(mut carver) = Carver::new(carve_start, region.end().min(1 << 32)) else {
        fail("cannot carve early memory")
    };
    let Some((meta, base, frames)) = mem::carve_meta(&mut carver, &info) else {
        fail("no room for the frame metadata")
    };
    let Some(balloon) = mem::carve_balloon(&mut carver, base, frames) else {
        fail("no room for the balloon books")
    };
    if !carver.heap(mem::heap_bytes(frames)) {
        fail("no room for the heap");
    }
    match paging::build_and_switch(&mut carver, &info) {
        Ok(p) => println!(
            "hvmem-guest: page tables by hvmem::spt: {} tables, {} MiB RAM mapped, CR3={:#x}",
            p.tables,
            p.ram_bytes >> 20,
            p.root
        ),
        Err(e) => {
            println!("hvmem-guest: {e}");
            fail("page tables")
        }
    }
    let free_from = carver.finish();
    println!(
        "hvmem-guest: early structures {carve_start:#x}..{free_from:#x} ({} KiB)",
        (free_from - carve_start) >> 10
    );
    let Some(managed) = mem::init_buddy(meta, base, &info, free_from) else {
        fail("buddy allocator")
    };
    let Some(buddy) = mem::buddy() else {
        fail("buddy allocator")
    };

    let (transport, slots) = hal::find_balloon();
    println!("hvmem-guest: virtio-mmio: {slots} device(s) answered");
    let dev = match transport.map(hal::balloon_device) {
        Some(Ok(d)) => Some(d),
        Some(Err(e)) => {
            println!("hvmem-guest: balloon init failed: {e}");
            None
        }
        None => {
            println!("hvmem-guest: no virtio-balloon device");
            None
        }
    };
    if let Some(d) = &dev {
        println!(
            "hvmem-guest: balloon offered={:#x} layout={:?}",
            d.offered().bits(),
            d.layout()
        );
    }
    let features = dev.as_ref().map_or(0, |d| d.features().bits());
    let Some(mut guest) = cmd::Guest::new(buddy, dev, balloon) else {
        fail("reporter policy")
    };
    let free = buddy.lock().free_frames() * phys::PAGE;
    println!("HVMEM READY managed={managed} free={free} features={features:x}");

    let mut reader = serial::LineReader::new();
    loop {
        if let Some(line) = reader.poll() {
            let mut copy = arrayvec::ArrayString::<{ serial::LINE_MAX }>::new();
            let _ = copy.try_push_str(line);
            guest.command(&copy);
        } else if !guest.duties() {
            cpu::pause();
        }
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    println!("HVMEM PANIC {}", info.message());
    cpu::halt()
}
