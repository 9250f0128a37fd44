//! The only file with `unsafe` code: virtqueue buffers, and guest RAM blocks seen as byte
//! slices.
//!
//! virtio-drivers' [`VirtQueue::add`] and [`VirtQueue::pop_used`] are `unsafe`: the buffers
//! must stay valid and untouched from `add` until `pop_used` returns them, and `pop_used`
//! must be given exactly the buffers `add` was. [`Ring`] keeps that contract in one place: a
//! chain's buffers live in its slot of the token table from `add` until the device returns
//! that token, and `pop` hands virtio-drivers the same buffers again.
//!
//! Two kinds of buffer:
//! - [`Buf::Out`]: a device-readable buffer the driver owns (a PFN array, a command id): a
//!   `Box<[u8]>`, whose heap address does not move while the slot holds it.
//! - [`Buf::Ram`]: a device-writable block of guest RAM named by its physical address (a
//!   reported or hinted free block). Blocks are not Rust objects: the driver makes a byte slice
//!   over them through a [`RamMapping`], whose `unsafe` constructors carry the contract.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::ptr::NonNull;

use virtio_drivers::Hal;
use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::Transport;

use crate::error::RingError;

/// Where the driver finds guest RAM blocks it is handed by physical address: virtual address
/// = physical address + a fixed offset (0 for an identity-mapped guest).
///
/// The driver never reads or writes a block. It only forms a byte slice over it to hand to
/// virtio-drivers, whose [`Hal::share`] turns the slice back into the physical address the
/// device sees. Building a `RamMapping` is `unsafe` because every safe method that takes a
/// block (reporting `submit`/`report`, `hint_block`) relies on its contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamMapping {
    offset: usize,
}

impl RamMapping {
    /// Guest RAM is identity-mapped (virtual = physical).
    ///
    /// # Safety
    /// For every block `(pa, len)` the embedder hands the driver (a reported batch's blocks, a
    /// hinted block), until the driver gives it back (a report's completion, a hint buffer
    /// recycled by [`poll_hint`](crate::VirtIOBalloon::poll_hint)):
    /// - `[pa, pa + len)` is guest RAM, mapped readable and writable at the virtual address
    ///   `pa`, and the embedder's [`Hal::share`] maps that address back to `pa`;
    /// - nothing else reads, writes or holds a reference into it: the block is isolated from
    ///   the allocator (or allocated and held for the hint), and belongs to the device;
    /// - blocks in flight do not overlap each other.
    pub const unsafe fn identity() -> Self {
        Self { offset: 0 }
    }

    /// Guest RAM is mapped linearly at `offset` (virtual = physical + `offset`, a kernel's
    /// direct map).
    ///
    /// # Safety
    /// As for [`identity`](Self::identity), with the blocks mapped at `pa + offset`.
    pub const unsafe fn linear(offset: usize) -> Self {
        Self { offset }
    }

    /// The byte slice over block `(pa, len)`, or `None` if the address does not fit the
    /// address space or `len` is zero.
    ///
    /// # Safety
    /// The block is one the embedder handed the driver under the type's contract, and no
    /// other slice over it is alive (the ring makes one per `add` and one per `pop`).
    unsafe fn block<'a>(&self, pa: u64, len: u32) -> Option<&'a mut [u8]> {
        let start = usize::try_from(pa).ok()?.checked_add(self.offset)?;
        let len = usize::try_from(len).ok()?;
        start.checked_add(len)?;
        let ptr = NonNull::new(core::ptr::with_exposed_provenance_mut::<u8>(start))?;
        if len == 0 {
            return None;
        }
        // SAFETY: the caller hands us a block under the `RamMapping` contract: `len` bytes of
        // mapped guest RAM at `start` (checked above not to wrap), which nothing else accesses
        // or references while it is in flight; bytes of RAM are always initialised `u8`s.
        Some(unsafe { core::slice::from_raw_parts_mut(ptr.as_ptr(), len) })
    }
}

/// One buffer of a descriptor chain.
#[derive(Debug)]
pub(crate) enum Buf {
    /// Device-readable bytes the driver owns.
    Out(Box<[u8]>),
    /// A device-writable block of guest RAM: `len` bytes at physical address `pa`.
    Ram { pa: u64, len: u32 },
}

/// The most buffers in one chain: a full report batch (hvmem's `CAP`, Linux
/// `PAGE_REPORTING_CAPACITY`).
pub(crate) const MAX_CHAIN: usize = 32;

/// A chain's buffers as the slices virtio-drivers takes, on the stack (no allocation per
/// `add` or `pop`).
struct Lists<'a> {
    ins: [&'a [u8]; MAX_CHAIN],
    n_in: usize,
    outs: [&'a mut [u8]; MAX_CHAIN],
    n_out: usize,
}

impl<'a> Lists<'a> {
    /// The slices over `bufs` (`Out` as device-readable, `Ram` as device-writable, in
    /// order), or `None` if a block doesn't fit the address space or the chain is longer
    /// than [`MAX_CHAIN`].
    ///
    /// # Safety
    /// Every `Ram` buffer is a block handed to the driver under the [`RamMapping`] contract,
    /// and no other slice over it is alive while the result is.
    unsafe fn new(bufs: &'a [Buf], mem: &RamMapping) -> Option<Self> {
        let mut l = Self {
            ins: [&[]; MAX_CHAIN],
            n_in: 0,
            outs: core::array::from_fn(|_| <&mut [u8]>::default()),
            n_out: 0,
        };
        for b in bufs {
            match b {
                Buf::Out(bytes) => {
                    *l.ins.get_mut(l.n_in)? = bytes;
                    l.n_in += 1;
                }
                Buf::Ram { pa, len } => {
                    // SAFETY: the caller's contract: a block under `RamMapping`'s, with no
                    // other slice over it.
                    let s = unsafe { mem.block(*pa, *len) }?;
                    *l.outs.get_mut(l.n_out)? = s;
                    l.n_out += 1;
                }
            }
        }
        Some(l)
    }

    /// The device-readable and device-writable lists.
    fn split(&mut self) -> (&[&'a [u8]], &mut [&'a mut [u8]]) {
        (&self.ins[..self.n_in], &mut self.outs[..self.n_out])
    }
}

/// A chain in flight: its buffers and the caller's tag (a batch id, a kind of hint buffer).
#[derive(Debug)]
pub(crate) struct Slot {
    pub(crate) tag: u64,
    pub(crate) bufs: Vec<Buf>,
}

impl Slot {
    /// Bytes the device may write (the sum of the `Ram` buffers).
    pub(crate) fn writable_bytes(&self) -> u64 {
        self.bufs
            .iter()
            .map(|b| match b {
                Buf::Out(_) => 0,
                Buf::Ram { len, .. } => u64::from(*len),
            })
            .sum()
    }
}

/// A chain the device has used.
#[derive(Debug)]
pub(crate) struct Used {
    /// The chain, back from the device.
    pub(crate) slot: Slot,
    /// The length the device wrote into the used ring.
    pub(crate) len: u32,
}

/// A virtqueue with a table of the buffers of every chain in flight, indexed by its token.
pub(crate) struct Ring<H: Hal, const SIZE: usize> {
    queue: VirtQueue<H, SIZE>,
    index: u16,
    slots: Vec<Option<Slot>>,
    in_flight: usize,
    /// Set when the device returned a token that names no chain: the used ring can't be
    /// popped past it, so the ring is unusable.
    broken: bool,
}

impl<H: Hal, const SIZE: usize> Ring<H, SIZE> {
    /// Sets up queue `index` with `SIZE` entries.
    pub(crate) fn new<T: Transport>(
        transport: &mut T,
        index: u16,
        indirect: bool,
    ) -> Result<Self, virtio_drivers::Error> {
        let queue = VirtQueue::new(transport, index, indirect, false)?;
        let mut slots = Vec::with_capacity(SIZE);
        slots.resize_with(SIZE, || None);
        Ok(Self {
            queue,
            index,
            slots,
            in_flight: 0,
            broken: false,
        })
    }

    /// Notifies the device even if it asked not to be (QEMU's free-page-hint handler turns
    /// notifications off while it polls and back on after its last pop, so a chain added in
    /// between is seen only at the next notification).
    pub(crate) fn kick<T: Transport>(&self, transport: &mut T) {
        transport.notify(self.index);
    }

    /// Chains in flight.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Adds one chain (its `Out` buffers first, then its `Ram` buffers, as virtio wants
    /// device-readable before device-writable) and notifies the device if it asked for it.
    /// Nothing is queued on an error.
    pub(crate) fn add<T: Transport>(
        &mut self,
        transport: &mut T,
        mem: &RamMapping,
        tag: u64,
        bufs: Vec<Buf>,
    ) -> Result<u16, RingError> {
        if self.broken {
            return Err(RingError::Broken);
        }
        if bufs.is_empty()
            || bufs
                .iter()
                .any(|b| matches!(b, Buf::Out(o) if o.is_empty()))
        {
            return Err(RingError::Empty);
        }
        if bufs.len() > MAX_CHAIN {
            return Err(RingError::TooLong);
        }
        // SAFETY: a `Ram` buffer is a block the embedder handed the driver under the
        // `RamMapping` contract; these are the only slices over it until `add` returns
        // (virtio-drivers keeps only its physical address).
        let mut l = unsafe { Lists::new(&bufs, mem) }.ok_or(RingError::BadBlock)?;
        let (inputs, outputs) = l.split();
        // SAFETY: the `Out` buffers are boxes the slot below owns until `pop` returns this
        // token, so their heap memory stays valid and unread by us meanwhile; the `Ram` blocks
        // belong to the device until then under the `RamMapping` contract.
        let token = unsafe { self.queue.add(inputs, outputs) }.map_err(RingError::Queue)?;
        match self.slots.get_mut(usize::from(token)) {
            Some(s @ None) => *s = Some(Slot { tag, bufs }),
            // virtio-drivers hands out a head index below SIZE that is not in use; anything
            // else is a broken invariant we can't recover from.
            _ => {
                self.broken = true;
                // The chain is queued: its buffers must outlive anything the device does.
                core::mem::forget(bufs);
                return Err(RingError::Broken);
            }
        }
        self.in_flight += 1;
        if self.queue.should_notify() {
            transport.notify(self.index);
        }
        Ok(token)
    }

    /// Pops the next used chain, if any. A token that names no chain in flight breaks the
    /// ring ([`RingError::UnknownToken`]): nothing is popped, and every later call fails.
    pub(crate) fn pop(&mut self, mem: &RamMapping) -> Result<Option<Used>, RingError> {
        if self.broken {
            return Err(RingError::Broken);
        }
        let Some(token) = self.queue.peek_used() else {
            return Ok(None);
        };
        let Some(slot) = self
            .slots
            .get_mut(usize::from(token))
            .and_then(Option::take)
        else {
            self.broken = true;
            return Err(RingError::UnknownToken(token));
        };
        // SAFETY: the same blocks `add` made slices over, still the device's until `pop_used`
        // returns; the slices made in `add` are gone.
        let Some(mut l) = (unsafe { Lists::new(&slot.bufs, mem) }) else {
            // `add` built the same slices, so this can't fail; if it did, popping with other
            // buffers would break virtio-drivers' bookkeeping: keep the chain, refuse all.
            self.broken = true;
            if let Some(s) = self.slots.get_mut(usize::from(token)) {
                *s = Some(slot);
            }
            return Err(RingError::Broken);
        };
        let (inputs, outputs) = l.split();
        // SAFETY: these are the buffers `add` queued under `token` (the slot kept them, in
        // the same order and direction), and `peek_used` says `token` is next.
        let len = unsafe { self.queue.pop_used(token, inputs, outputs) };
        match len {
            Ok(len) => {
                self.in_flight -= 1;
                Ok(Some(Used { slot, len }))
            }
            Err(e) => {
                // Not popped: put the slot back so the buffers stay owned.
                if let Some(s) = self.slots.get_mut(usize::from(token)) {
                    *s = Some(slot);
                }
                Err(RingError::Queue(e))
            }
        }
    }

    /// Tags of the chains in flight.
    pub(crate) fn tags(&self) -> impl Iterator<Item = u64> + '_ {
        self.slots.iter().flatten().map(|s| s.tag)
    }
}
