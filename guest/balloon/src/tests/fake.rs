//! A fake virtio-balloon device for host-side tests: a `Transport` with a config space and
//! queue registers, a `Hal` whose physical addresses are host virtual addresses, and a device
//! model that reads the split rings the driver writes and fills the used rings.
//!
//! virtio-drivers has a fake transport, but only under its own `cfg(test)`.

#![allow(unsafe_code, clippy::undocumented_unsafe_blocks, clippy::unwrap_used)]

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::cell::RefCell;
use std::ptr::NonNull;
use std::rc::Rc;
use std::vec;
use std::vec::Vec;

use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{BufferDirection, Hal, PAGE_SIZE, PhysAddr};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// Identity DMA: "physical" addresses are the host pointers, and sharing copies nothing.
pub struct FakeHal;

unsafe impl Hal for FakeHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let layout = Layout::from_size_align(pages * PAGE_SIZE, PAGE_SIZE).unwrap();
        let p = NonNull::new(unsafe { alloc_zeroed(layout) }).unwrap();
        (p.as_ptr() as PhysAddr, p)
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        let layout = Layout::from_size_align(pages * PAGE_SIZE, PAGE_SIZE).unwrap();
        unsafe { dealloc(vaddr.as_ptr(), layout) };
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        NonNull::new(paddr as *mut u8).unwrap()
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.cast::<u8>().as_ptr() as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}

/// Page-aligned zeroed host memory standing in for guest RAM blocks.
pub struct Arena {
    ptr: NonNull<u8>,
    layout: Layout,
}

impl Arena {
    pub fn new(bytes: usize) -> Self {
        let layout = Layout::from_size_align(bytes, PAGE_SIZE).unwrap();
        let ptr = NonNull::new(unsafe { alloc_zeroed(layout) }).unwrap();
        Self { ptr, layout }
    }

    /// The address of byte `offset` (the "physical" address under the identity mapping).
    pub fn addr(&self, offset: usize) -> u64 {
        assert!(offset < self.layout.size());
        self.ptr.as_ptr() as u64 + offset as u64
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

/// One buffer of a chain, as the device sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeenBuf {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
    /// The bytes of a device-readable buffer.
    pub bytes: Vec<u8>,
}

/// A chain the device took from the available ring.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    pub queue: u16,
    pub head: u16,
    pub indirect: bool,
    pub bufs: Vec<SeenBuf>,
}

/// How the device answers a notification on a queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Takes and uses every available chain at once, with used length `len`.
    Auto { len: u32 },
    /// Only remembers the notification; the test takes and uses chains.
    Manual,
}

#[derive(Debug, Default)]
pub struct QueueRegs {
    pub max: u32,
    pub size: u32,
    pub desc: u64,
    pub driver: u64,
    pub device: u64,
    pub notified: u32,
    last_avail: u16,
    used_idx: u16,
}

#[derive(Debug)]
pub struct DeviceState {
    pub device_type: DeviceType,
    pub offered: u64,
    pub driver_features: Option<u64>,
    pub status: DeviceStatus,
    /// Clears FEATURES_OK when the driver sets it.
    pub refuse_features: bool,
    pub queues: Vec<QueueRegs>,
    pub modes: Vec<Mode>,
    pub config: Vec<u8>,
    /// Every chain the device took, in order.
    pub seen: Vec<Chain>,
    /// Status values the driver wrote, in order.
    pub status_log: Vec<u32>,
    /// The config generation (QEMU bumps it with every config change it announces).
    pub generation: u32,
}

pub type Shared = Rc<RefCell<DeviceState>>;

/// QEMU 7.2's offer with `free-page-reporting=on,free-page-hint=on`, plus bits the driver must
/// refuse.
pub const QEMU_OFFER: u64 = (1 << 0) // MUST_TELL_HOST
    | (1 << 1) // STATS_VQ
    | (1 << 2) // DEFLATE_ON_OOM
    | (1 << 3) // FREE_PAGE_HINT
    | (1 << 4) // PAGE_POISON
    | (1 << 5) // REPORTING
    | (1 << 28) // RING_INDIRECT_DESC
    | (1 << 29) // RING_EVENT_IDX
    | (1 << 32) // VERSION_1
    | (1 << 24); // NOTIFY_ON_EMPTY, unknown to the driver

/// The queue maxima QEMU 7.2 builds for an offer (see `QueueLayout::for_offered`).
pub fn qemu_queues(offered: u64) -> Vec<u32> {
    let mut q = vec![128, 128, 128];
    if offered & (1 << 3) != 0 {
        q.push(1024);
    }
    if offered & (1 << 5) != 0 {
        q.push(32);
    }
    q
}

pub struct FakeTransport {
    pub state: Shared,
}

impl FakeTransport {
    pub fn new(offered: u64, queue_max: &[u32], config_len: usize) -> (Self, Shared) {
        let state = Rc::new(RefCell::new(DeviceState {
            // What virtio-drivers' MMIO and PCI transports report for device id 5.
            device_type: DeviceType::try_from(5u32).unwrap(),
            offered,
            driver_features: None,
            status: DeviceStatus::empty(),
            refuse_features: false,
            queues: queue_max
                .iter()
                .map(|&max| QueueRegs {
                    max,
                    ..QueueRegs::default()
                })
                .collect(),
            modes: vec![Mode::Auto { len: 0 }; queue_max.len()],
            config: vec![0; config_len],
            seen: Vec::new(),
            status_log: Vec::new(),
            generation: 0,
        }));
        (
            Self {
                state: state.clone(),
            },
            state,
        )
    }

    /// QEMU's device for an offer: its queues and config size.
    pub fn qemu(offered: u64) -> (Self, Shared) {
        let config_len = if offered & (1 << 4) != 0 {
            16
        } else if offered & (1 << 3) != 0 {
            12
        } else {
            8
        };
        Self::new(offered, &qemu_queues(offered), config_len)
    }
}

impl DeviceState {
    pub fn config_u32(&self, offset: usize) -> u32 {
        u32::from_le_bytes(self.config[offset..offset + 4].try_into().unwrap())
    }

    /// Changes a config field and announces it (QEMU `virtio_notify_config`).
    pub fn set_config_u32(&mut self, offset: usize, v: u32) {
        self.config[offset..offset + 4].copy_from_slice(&v.to_le_bytes());
        self.generation += 1;
    }

    /// Changes a config field silently, as QEMU's free page hint state START does (its
    /// config shows no id then, and nothing is announced).
    pub fn set_config_u32_silently(&mut self, offset: usize, v: u32) {
        self.config[offset..offset + 4].copy_from_slice(&v.to_le_bytes());
    }

    /// Takes every chain the driver made available on `queue` since the last call.
    pub fn take(&mut self, queue: u16) -> Vec<Chain> {
        let q = &mut self.queues[usize::from(queue)];
        assert_ne!(q.desc, 0, "queue {queue} not set up");
        let size = q.size as u16;
        let avail_idx = unsafe { read::<u16>(q.driver + 2) };
        let mut out = Vec::new();
        while q.last_avail != avail_idx {
            let slot = u64::from(q.last_avail % size);
            let head = unsafe { read::<u16>(q.driver + 4 + 2 * slot) };
            out.push(walk(queue, q.desc, size, head));
            q.last_avail = q.last_avail.wrapping_add(1);
        }
        self.seen.extend(out.iter().cloned());
        out
    }

    /// Puts `(id, len)` in the used ring of `queue`.
    pub fn push_used(&mut self, queue: u16, id: u32, len: u32) {
        let q = &mut self.queues[usize::from(queue)];
        let slot = u64::from(q.used_idx % q.size as u16);
        unsafe {
            write::<u32>(q.device + 4 + 8 * slot, id);
            write::<u32>(q.device + 4 + 8 * slot + 4, len);
        }
        q.used_idx = q.used_idx.wrapping_add(1);
        unsafe { write::<u16>(q.device + 2, q.used_idx) };
    }

    /// Takes and uses every available chain of `queue` with used length `len`.
    pub fn use_all(&mut self, queue: u16, len: u32) -> Vec<Chain> {
        let chains = self.take(queue);
        for c in &chains {
            self.push_used(queue, u32::from(c.head), len);
        }
        chains
    }
}

unsafe fn read<T: Copy>(addr: u64) -> T {
    unsafe { std::ptr::read_volatile(addr as *const T) }
}

unsafe fn write<T: Copy>(addr: u64, v: T) {
    unsafe { std::ptr::write_volatile(addr as *mut T, v) }
}

fn desc_at(table: u64, i: u16) -> (u64, u32, u16, u16) {
    let d = table + 16 * u64::from(i);
    unsafe { (read(d), read(d + 8), read(d + 12), read(d + 14)) }
}

fn walk(queue: u16, table: u64, size: u16, head: u16) -> Chain {
    let mut chain = Chain {
        queue,
        head,
        indirect: false,
        bufs: Vec::new(),
    };
    let (addr, len, flags, _) = desc_at(table, head);
    let (table, size, mut i) = if flags & F_INDIRECT != 0 {
        chain.indirect = true;
        (addr, (len / 16) as u16, 0)
    } else {
        (table, size, head)
    };
    for _ in 0..size {
        let (addr, len, flags, next) = desc_at(table, i);
        let writable = flags & F_WRITE != 0;
        let bytes = if writable {
            Vec::new()
        } else {
            unsafe { std::slice::from_raw_parts(addr as *const u8, len as usize) }.to_vec()
        };
        chain.bufs.push(SeenBuf {
            addr,
            len,
            writable,
            bytes,
        });
        if flags & F_NEXT == 0 {
            return chain;
        }
        i = next;
    }
    panic!("descriptor loop in queue {queue}");
}

impl Transport for FakeTransport {
    fn device_type(&self) -> DeviceType {
        self.state.borrow().device_type
    }

    fn read_device_features(&mut self) -> u64 {
        self.state.borrow().offered
    }

    fn write_driver_features(&mut self, driver_features: u64) {
        self.state.borrow_mut().driver_features = Some(driver_features);
    }

    fn max_queue_size(&mut self, queue: u16) -> u32 {
        self.state
            .borrow()
            .queues
            .get(usize::from(queue))
            .map_or(0, |q| q.max)
    }

    fn notify(&mut self, queue: u16) {
        let mut s = self.state.borrow_mut();
        s.queues[usize::from(queue)].notified += 1;
        if let Mode::Auto { len } = s.modes[usize::from(queue)] {
            s.use_all(queue, len);
        }
    }

    fn get_status(&self) -> DeviceStatus {
        self.state.borrow().status
    }

    fn set_status(&mut self, status: DeviceStatus) {
        let mut s = self.state.borrow_mut();
        s.status_log.push(status.bits());
        s.status = if s.refuse_features {
            status - DeviceStatus::FEATURES_OK
        } else {
            status
        };
        if status.is_empty() {
            for q in &mut s.queues {
                let max = q.max;
                *q = QueueRegs {
                    max,
                    ..QueueRegs::default()
                };
            }
        }
    }

    fn set_guest_page_size(&mut self, _guest_page_size: u32) {}

    fn requires_legacy_layout(&self) -> bool {
        false
    }

    fn queue_set(
        &mut self,
        queue: u16,
        size: u32,
        descriptors: PhysAddr,
        driver_area: PhysAddr,
        device_area: PhysAddr,
    ) {
        let mut s = self.state.borrow_mut();
        let q = &mut s.queues[usize::from(queue)];
        assert!(size <= q.max && size.is_power_of_two());
        q.size = size;
        q.desc = descriptors;
        q.driver = driver_area;
        q.device = device_area;
    }

    fn queue_unset(&mut self, queue: u16) {
        let mut s = self.state.borrow_mut();
        let q = &mut s.queues[usize::from(queue)];
        q.size = 0;
        q.desc = 0;
        q.driver = 0;
        q.device = 0;
    }

    fn queue_used(&mut self, queue: u16) -> bool {
        self.state
            .borrow()
            .queues
            .get(usize::from(queue))
            .is_some_and(|q| q.desc != 0)
    }

    fn ack_interrupt(&mut self) -> InterruptStatus {
        InterruptStatus::empty()
    }

    fn read_config_generation(&self) -> u32 {
        self.state.borrow().generation
    }

    fn read_config_space<T: FromBytes + IntoBytes>(
        &self,
        offset: usize,
    ) -> Result<T, virtio_drivers::Error> {
        let s = self.state.borrow();
        let end = offset + size_of::<T>();
        if end > s.config.len() {
            return Err(virtio_drivers::Error::ConfigSpaceTooSmall);
        }
        Ok(T::read_from_bytes(&s.config[offset..end]).unwrap())
    }

    fn write_config_space<T: Immutable + IntoBytes>(
        &mut self,
        offset: usize,
        value: T,
    ) -> Result<(), virtio_drivers::Error> {
        let mut s = self.state.borrow_mut();
        let end = offset + size_of::<T>();
        if end > s.config.len() {
            return Err(virtio_drivers::Error::ConfigSpaceTooSmall);
        }
        s.config[offset..end].copy_from_slice(value.as_bytes());
        Ok(())
    }
}
