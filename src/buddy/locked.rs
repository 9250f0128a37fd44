//! `LockedBuddy`: the allocator behind a spin lock, for sharing between CPUs.

use core::ops::{Deref, DerefMut};

use static_assertions::assert_impl_all;

use super::{AllocError, Block, Buddy, DEFAULT_MAX_ORDER, FrameMeta, FreeError};
use crate::addr::{PageOrder, Pfn};
use crate::sync::{Mutex, MutexGuard};

/// A [`Buddy`] behind a spin lock (Linux: `zone->lock`).
///
/// Each method takes the lock for one operation. For several operations under one
/// acquisition (a report pass isolating a batch), use [`lock`](Self::lock).
pub struct LockedBuddy<S, const MAX_ORDER: usize = DEFAULT_MAX_ORDER> {
    inner: Mutex<Buddy<S, MAX_ORDER>>,
}

assert_impl_all!(LockedBuddy<&'static mut [FrameMeta]>: Send, Sync);

/// Exclusive access to a [`LockedBuddy`]'s allocator; the lock is released on drop.
pub struct LockedBuddyGuard<'a, S, const MAX_ORDER: usize> {
    guard: MutexGuard<'a, Buddy<S, MAX_ORDER>>,
}

impl<S: DerefMut<Target = [FrameMeta]>, const MAX_ORDER: usize> LockedBuddy<S, MAX_ORDER> {
    /// Wraps an allocator.
    #[cfg(not(loom))]
    pub const fn new(buddy: Buddy<S, MAX_ORDER>) -> Self {
        Self {
            inner: Mutex::new(buddy),
        }
    }

    /// Wraps an allocator.
    #[cfg(loom)]
    pub fn new(buddy: Buddy<S, MAX_ORDER>) -> Self {
        Self {
            inner: Mutex::new(buddy),
        }
    }

    /// [`Buddy::storage_key`] under the lock.
    pub(crate) fn storage_key(&self) -> usize {
        self.lock().storage_key()
    }

    /// Takes the lock, spinning until it is free.
    #[inline]
    pub fn lock(&self) -> LockedBuddyGuard<'_, S, MAX_ORDER> {
        LockedBuddyGuard {
            guard: self.inner.lock(),
        }
    }

    /// Takes the lock if it is free.
    #[inline]
    pub fn try_lock(&self) -> Option<LockedBuddyGuard<'_, S, MAX_ORDER>> {
        self.inner
            .try_lock()
            .map(|guard| LockedBuddyGuard { guard })
    }

    /// [`Buddy::alloc`] under the lock.
    #[inline]
    pub fn alloc(&self, order: PageOrder) -> Result<Block, AllocError> {
        self.lock().alloc(order)
    }

    /// [`Buddy::alloc_at_most`] under the lock.
    pub fn alloc_at_most(&self, order: PageOrder) -> Result<Block, AllocError> {
        self.lock().alloc_at_most(order)
    }

    /// [`Buddy::alloc_within`] under the lock.
    pub fn alloc_within(
        &self,
        pfn: Pfn,
        within: PageOrder,
        order: PageOrder,
    ) -> Result<Block, AllocError> {
        self.lock().alloc_within(pfn, within, order)
    }

    /// [`Buddy::free_frames_within`] under the lock.
    pub fn free_frames_within(&self, pfn: Pfn, within: PageOrder) -> u64 {
        self.lock().free_frames_within(pfn, within)
    }

    /// [`Buddy::free`] under the lock.
    #[inline]
    pub fn free(&self, pfn: Pfn, order: PageOrder) -> Result<(), FreeError> {
        self.lock().free(pfn, order)
    }

    /// [`Buddy::free_merged`] under the lock: frees, and says the order of the free block the
    /// freed one merged into (what a reporter's `on_free` wants).
    #[inline]
    pub fn free_merged(&self, pfn: Pfn, order: PageOrder) -> Result<PageOrder, FreeError> {
        self.lock().free_merged(pfn, order)
    }

    /// [`Buddy::free_notify`] under the lock: frees, and says the merged order when it
    /// reaches the notify order.
    #[inline(always)]
    pub fn free_notify(&self, pfn: Pfn, order: PageOrder) -> Result<Option<PageOrder>, FreeError> {
        self.lock().free_notify(pfn, order)
    }

    /// The allocator, through exclusive access to the wrapper (no locking needed).
    pub fn get_mut(&mut self) -> &mut Buddy<S, MAX_ORDER> {
        self.inner.get_mut()
    }

    /// Unwraps the allocator.
    pub fn into_inner(self) -> Buddy<S, MAX_ORDER> {
        self.inner.into_inner()
    }
}

impl<S, const MAX_ORDER: usize> Deref for LockedBuddyGuard<'_, S, MAX_ORDER> {
    type Target = Buddy<S, MAX_ORDER>;

    #[inline]
    fn deref(&self) -> &Self::Target {
        &self.guard
    }
}

impl<S, const MAX_ORDER: usize> DerefMut for LockedBuddyGuard<'_, S, MAX_ORDER> {
    #[inline]
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.guard
    }
}
