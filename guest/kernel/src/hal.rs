//! The virtio side of the hardware: virtio-drivers' [`Hal`] for this identity-mapped
//! kernel (DMA memory from the buddy allocator, physical = virtual), and the probe of
//! QEMU microvm's virtio-mmio slots.

use core::ptr::NonNull;

use hvmem::{PageOrder, Pfn};
use virtio_drivers::transport::mmio::{MmioTransport, VirtIOHeader};
use virtio_drivers::transport::{DeviceType, Transport};
use virtio_drivers::{BufferDirection, Hal, PhysAddr};

use crate::paging::{VIRTIO_MMIO_BASE, VIRTIO_MMIO_LEN};
use crate::phys::{self, PAGE};

/// One virtio-mmio slot's size.
const SLOT: u64 = 0x200;

/// The kernel's [`Hal`]: identity-mapped, DMA pages from `hvmem::buddy`.
pub struct KernelHal;

fn order_for(pages: usize) -> Option<PageOrder> {
    let pages = pages.max(1).checked_next_power_of_two()?;
    PageOrder::new(u8::try_from(pages.ilog2()).ok()?).ok()
}

// SAFETY: `dma_alloc` returns a buddy block that nothing else uses until `dma_dealloc`
// frees it, zeroed, page-aligned and identity-mapped; `mmio_phys_to_virt` and `share`
// return the identity address, which is mapped (RAM, or the uncached virtio-mmio window).
unsafe impl Hal for KernelHal {
    fn dma_alloc(pages: usize, _dir: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let fail = (0, NonNull::dangling());
        let (Some(buddy), Some(order)) = (crate::mem::buddy(), order_for(pages)) else {
            return fail;
        };
        let Ok(block) = buddy.alloc(order) else {
            return fail;
        };
        let pa = block.pfn.addr().get();
        if !phys::zero(pa, order.bytes()) {
            let _ = buddy.free(block.pfn, order);
            return fail;
        }
        match NonNull::new(pa as *mut u8) {
            Some(p) => (pa, p),
            None => fail,
        }
    }

    unsafe fn dma_dealloc(paddr: PhysAddr, _vaddr: NonNull<u8>, pages: usize) -> i32 {
        let (Some(buddy), Some(order), Ok(pfn)) = (
            crate::mem::buddy(),
            order_for(pages),
            Pfn::new(paddr / PAGE),
        ) else {
            return -1;
        };
        match buddy.free(pfn, order) {
            Ok(()) => 0,
            Err(_) => -1,
        }
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        NonNull::new(paddr as *mut u8).unwrap_or(NonNull::dangling())
    }

    unsafe fn share(buffer: NonNull<[u8]>, _dir: BufferDirection) -> PhysAddr {
        buffer.as_ptr().cast::<u8>() as u64
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _dir: BufferDirection) {}
}

/// The first virtio-mmio slot holding a balloon (device id 5), as a transport, with the
/// number of slots that answered the virtio magic.
pub fn find_balloon() -> (Option<MmioTransport<'static>>, usize) {
    let mut devices = 0;
    let mut slot = VIRTIO_MMIO_BASE;
    while slot < VIRTIO_MMIO_BASE + VIRTIO_MMIO_LEN {
        let Some(header) = NonNull::new(slot as *mut VirtIOHeader) else {
            break;
        };
        // SAFETY: `slot` is one of microvm's virtio-mmio register blocks (0x200 bytes), mapped
        // uncached by the kernel's tables for ever; the transport made here is the only user
        // of that slot (each slot is probed once, at boot).
        let t = unsafe { MmioTransport::new(header, SLOT as usize) };
        slot += SLOT;
        let Ok(t) = t else { continue };
        devices += 1;
        if matches!(
            t.device_type(),
            DeviceType::MemoryBalloon | DeviceType::MemoryBallooning
        ) {
            return (Some(t), devices);
        }
    }
    (None, devices)
}

/// The balloon device this kernel drives.
pub type Device = hvmem_virtio_balloon::VirtIOBalloon<KernelHal, MmioTransport<'static>>;

/// Initialises the balloon driver on `transport`, asking for every feature it supports.
pub fn balloon_device(
    transport: MmioTransport<'static>,
) -> Result<Device, hvmem_virtio_balloon::InitError> {
    // SAFETY: the kernel is identity-mapped and `KernelHal::share` returns the identity
    // address. Every block it hands the driver is RAM it isolated (a report batch, owned by
    // the pipeline until its completion) or allocated and holds untouched (a hint or balloon
    // block, until the driver returned its buffer); blocks in flight never overlap, since
    // each is a distinct buddy block.
    let mem = unsafe { hvmem_virtio_balloon::RamMapping::identity() };
    hvmem_virtio_balloon::VirtIOBalloon::new(
        transport,
        mem,
        hvmem_virtio_balloon::Features::SUPPORTED,
    )
}
