//! The one place that chooses between `core`/`spin` and `loom` primitives.
//!
//! Everything in hvmem that shares state between threads goes through this module, so a
//! `RUSTFLAGS="--cfg loom"` build swaps every lock and atomic for loom's model-checked
//! versions at once (the pattern of maitake-sync). Under loom a waiting thread calls
//! `loom::thread::yield_now()` instead of spinning, so the model checker schedules the lock
//! holder and does not explore an endless spin.

use core::ops::{Deref, DerefMut};

/// What a waiting thread does while a lock it wants is held: a CPU pause hint, or a loom
/// yield so the model checker runs the holder.
#[inline]
pub(crate) fn spin_wait() {
    #[cfg(not(loom))]
    core::hint::spin_loop();
    #[cfg(loom)]
    loom::thread::yield_now();
}

/// A mutual-exclusion lock that spins while it waits.
///
/// Outside loom it is a `spin` mutex (test-and-test-and-set on one atomic flag); under loom it
/// is loom's mutex, acquired with the same try-then-wait loop so loom sees every attempt.
pub(crate) struct Mutex<T> {
    #[cfg(not(loom))]
    inner: spin::mutex::SpinMutex<T>,
    #[cfg(loom)]
    inner: loom::sync::Mutex<T>,
}

/// Proof that a [`Mutex`] is held; the lock is released when it is dropped.
pub(crate) struct MutexGuard<'a, T> {
    #[cfg(not(loom))]
    inner: spin::mutex::SpinMutexGuard<'a, T>,
    #[cfg(loom)]
    inner: loom::sync::MutexGuard<'a, T>,
}

impl<T> Mutex<T> {
    /// A new, unlocked mutex.
    #[cfg(not(loom))]
    pub(crate) const fn new(value: T) -> Self {
        Self {
            inner: spin::mutex::SpinMutex::new(value),
        }
    }

    /// A new, unlocked mutex.
    #[cfg(loom)]
    pub(crate) fn new(value: T) -> Self {
        Self {
            inner: loom::sync::Mutex::new(value),
        }
    }

    /// Takes the lock if nobody holds it.
    #[inline]
    pub(crate) fn try_lock(&self) -> Option<MutexGuard<'_, T>> {
        #[cfg(not(loom))]
        let inner = self.inner.try_lock();
        #[cfg(loom)]
        let inner = self.inner.try_lock().ok();
        inner.map(|inner| MutexGuard { inner })
    }

    /// Takes the lock, spinning (or yielding, under loom) until it is free.
    #[inline]
    pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
        loop {
            if let Some(guard) = self.try_lock() {
                return guard;
            }
            spin_wait();
            // Test-and-test-and-set: wait on plain loads so the cache line stays shared.
            #[cfg(not(loom))]
            while self.inner.is_locked() {
                spin_wait();
            }
        }
    }

    /// The protected value, through exclusive access to the mutex itself.
    #[inline]
    pub(crate) fn get_mut(&mut self) -> &mut T {
        #[cfg(not(loom))]
        return self.inner.get_mut();
        #[cfg(loom)]
        return match self.inner.get_mut() {
            Ok(value) => value,
            Err(poisoned) => poisoned.into_inner(),
        };
    }

    /// Gives the protected value back.
    #[inline]
    pub(crate) fn into_inner(self) -> T {
        #[cfg(not(loom))]
        return self.inner.into_inner();
        #[cfg(loom)]
        return match self.inner.into_inner() {
            Ok(value) => value,
            Err(poisoned) => poisoned.into_inner(),
        };
    }
}

impl<T> Deref for MutexGuard<'_, T> {
    type Target = T;

    #[inline]
    fn deref(&self) -> &T {
        &self.inner
    }
}

impl<T> DerefMut for MutexGuard<'_, T> {
    #[inline]
    fn deref_mut(&mut self) -> &mut T {
        &mut self.inner
    }
}

/// Atomics: `core`'s, or loom's model-checked ones under `cfg(loom)` so a loom model sees
/// every access: the hint batcher's request state and reset epoch (`usize`) and page-table
/// entries (`u64`, loads, stores and compare-exchanges).
#[cfg(not(loom))]
pub(crate) use core::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};
#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};
