//! Synchronisation: the MMU lock ([`RwLock`]), and the one place that chooses between
//! `core`/`spin` and `loom` primitives.
//!
//! Everything in hvmem that shares state between threads goes through this module, so a
//! `RUSTFLAGS="--cfg loom"` build swaps every lock and atomic for loom's model-checked
//! versions at once (the pattern of maitake-sync). Under loom a waiting thread calls
//! `loom::thread::yield_now()` instead of spinning, so the model checker schedules the lock
//! holder and does not explore an endless spin. Only [`RwLock`] and its guards are public;
//! the crate's own mutex and atomics stay private.
//!
//! # The MMU lock
//!
//! [`RwLock`] is a reader-writer spin lock that can tell whether anyone is waiting for it
//! ([`RwLock::is_contended`]), the `mmu_lock` of a shadow MMU. KVM's eager huge-page splitter
//! holds `mmu_lock` for write across many huge pages and, between two of them, asks
//! `rwlock_needbreak()` (on the qrwlock: is its wait queue's spinlock held, i.e. is someone
//! queued) whether to drop and retake the lock so a faulting vCPU gets in (Matlack, "Extend
//! Eager Page Splitting to the shadow MMU", 2022).
//!
//! **Admission** is decided on one `AtomicU64` state word:
//!
//! | bits   | field     | meaning                                              |
//! |--------|-----------|------------------------------------------------------|
//! | 0      | `WRITER`  | a writer holds the lock                              |
//! | 1..4   | `GEN`     | read generation: bumped when a writer admits waiting readers |
//! | 4..24  | `READERS` | readers holding the lock                             |
//! | 24..44 | `RWAIT`   | readers registered as waiting                        |
//! | 44..64 | `WWAIT`   | writers registered as waiting                        |
//!
//! - A reader enters (`READERS += 1`) when there is no writer and no waiting writer;
//!   otherwise it registers (`RWAIT += 1`), remembers `GEN`, and spins until `GEN` changes.
//! - A writer enters (`WRITER = 1`) when there is no writer and no reader; otherwise it
//!   registers (`WWAIT += 1`) and spins until it can enter, unregistering in the same
//!   compare-exchange that sets `WRITER`.
//! - A writer's release hands the lock to every waiting reader in one compare-exchange:
//!   `WRITER = 0`, `READERS = RWAIT`, `RWAIT = 0`, `GEN += 1`. The readers it admitted see
//!   `GEN` change and proceed; they are already counted, so no writer (not even the one that
//!   just released, coming back at once) can get in before them. `GEN` cannot change again
//!   before they notice: that needs another writer, and none enters while they are counted.
//! - A reader's release is `READERS -= 1`.
//! - [`RwLock::is_contended`] is `RWAIT + WWAIT > 0`.
//!
//! **Fairness** is phase-fair, like the qrwlock's queue as far as the splitter cares: a
//! waiting writer stops new readers (a stream of readers cannot starve it), and readers that
//! waited behind a writer get in before any next writer (a splitter that drops the lock when
//! [`is_contended`](RwLock::is_contended) and retakes it at once cannot starve a vCPU).
//! A writer that is not registered as waiting never enters while a writer waits, so a
//! writer that drops the lock for a waiting writer (the splitter) cannot take it straight
//! back; registered writers are not ordered among themselves. A count at its maximum (2^20 - 1) is never
//! incremented: a thread that cannot register waits unregistered and retries from scratch,
//! and `try_read` refuses; nothing overflows into the next field and nothing panics.
//!
//! **No unsafe.** The data does not live in an `UnsafeCell` of ours: it lives in a second
//! lock that admission guarantees is free, a `spin::RwLock` (under loom, loom's `RwLock`),
//! taken with `try_read`/`try_write` once the state word has admitted the thread. A guard
//! drops that inner guard *before* it releases the state word (field drop order), so the
//! next thread admitted finds the inner lock free; if a `try_*` ever failed it would be a bug
//! in the protocol, and the thread spins and retries rather than panicking. The price is a
//! second atomic operation on each acquire and release. Under loom the state word is loom's
//! atomic and every wait calls `spin_wait` (a loom yield), so the model checker explores the
//! failed attempts, the registrations and the hand-off; loom's own `RwLock::try_*` never
//! explores a failing attempt, so a waiter count layered on it would never be exercised.

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

/// How many read sides a [`ShardedRwLock`] has (threads beyond this share them, two to a
/// line at 8 vCPUs). Four, not more: a write guard holds one shard guard per shard (16
/// bytes each), and at 16 shards moving the guard cost the slow fault path a `memcpy` of
/// 264 bytes, 55 → 78 ns per fault single-threaded (`cargo bench --bench mmu --
/// fault_in_1g`); at 4 it is back within noise of the plain lock. A writer also visits
/// at most 4 extra lines.
#[cfg(feature = "alloc")]
pub(crate) const SHARDS: usize = 4;

/// One read side of a [`ShardedRwLock`]: a lock over one copy of the view, and a counter
/// its readers may add to, on a cache-line pair of their own (128 bytes: x86 prefetches
/// lines in pairs), so threads on different shards never take each other's lines.
#[cfg(feature = "alloc")]
#[repr(align(128))]
struct Shard<V> {
    view: Inner<V>,
    count: AtomicU64,
}

/// The MMU lock with a second way in for the fault fast path: an [`RwLock`] over `T`, plus
/// [`SHARDS`] copies of a small view `V` of it, each behind a lock of its own (Linux's
/// per-CPU reader-writer locks, `percpu_rw_semaphore`, in spin form).
///
/// - A thread that only needs the view takes its own shard with
///   [`try_read_view`](Self::try_read_view): one atomic add on a line no other thread
///   writes, where [`RwLock::read`] writes the one word every reader and writer shares (two
///   vCPUs fast-faulting on the shared word spent most of their time moving its line).
/// - A writer takes the [`RwLock`] and then, in index order, every shard handed out
///   ([`new_shard`](Self::new_shard)); so a shard reader excludes writers exactly as a
///   reader of the [`RwLock`] does, and what the view says cannot change under it.
///   A writer that changes the view locks the remaining shards too
///   ([`ShardedWriteGuard::split_views`]) and updates every copy.
/// - A shard reader never waits: when a writer holds its shard it gets `None` and takes
///   [`read_view`](Self::read_view), which waits in [`RwLock::read`] (so a writer that polls
///   [`is_contended`](Self::is_contended) sees it) and then reads the view.
///
/// Shards are handed out under the read lock, so a writer's idea of which shards are in
/// use cannot change while it holds the lock; a reader of a shard not (yet) handed out is
/// refused and goes the `read_view` way. No deadlock: shard readers never wait, and writers
/// take shards only while holding the [`RwLock`], always in index order.
#[cfg(feature = "alloc")]
pub(crate) struct ShardedRwLock<T, V> {
    main: RwLock<T>,
    shards: alloc::boxed::Box<[Shard<V>]>,
    /// Shards handed out so far (at most [`SHARDS`]); grows only under the read lock, so it
    /// stays the same while a writer holds the lock.
    in_use: AtomicU32,
    /// Shards ever asked for (round robin over [`SHARDS`]).
    handed: AtomicU32,
}

/// Exclusive access to a [`ShardedRwLock`]'s data: the [`RwLock`] and the shards in use.
#[cfg(feature = "alloc")]
pub(crate) struct ShardedWriteGuard<'a, T, V> {
    // Declared first so they drop first: the shards are free before the main lock is.
    views: arrayvec::ArrayVec<InnerWrite<'a, V>, SHARDS>,
    main: RwLockWriteGuard<'a, T>,
    lock: &'a ShardedRwLock<T, V>,
}

/// Takes `shard` for writing, spinning (a loom yield) while its reader is inside.
#[cfg(feature = "alloc")]
fn write_shard<V>(shard: &Shard<V>) -> InnerWrite<'_, V> {
    loop {
        if let Some(guard) = inner_try_write(&shard.view) {
            return guard;
        }
        spin_wait();
    }
}

#[cfg(feature = "alloc")]
impl<T, V> ShardedRwLock<T, V> {
    /// A lock over `value` whose shards start with views made by `view`; `None` when the
    /// shards cannot be allocated.
    pub(crate) fn new(value: T, mut view: impl FnMut() -> V) -> Option<Self> {
        let mut shards = alloc::vec::Vec::new();
        shards.try_reserve_exact(SHARDS).ok()?;
        shards.extend((0..SHARDS).map(|_| Shard {
            view: Inner::new(view()),
            count: AtomicU64::new(0),
        }));
        Some(Self {
            main: RwLock::new(value),
            shards: shards.into_boxed_slice(),
            in_use: AtomicU32::new(0),
            handed: AtomicU32::new(0),
        })
    }

    /// [`RwLock::read`].
    #[inline]
    pub(crate) fn read(&self) -> RwLockReadGuard<'_, T> {
        self.main.read()
    }

    /// [`RwLock::write`], then every shard in use.
    #[inline]
    pub(crate) fn write(&self) -> ShardedWriteGuard<'_, T, V> {
        let mut guard = ShardedWriteGuard {
            views: arrayvec::ArrayVec::new(),
            main: self.main.write(),
            lock: self,
        };
        // Stable while we hold the write lock: only `new_shard`, under the read lock, grows it.
        let in_use = self.in_use.load(Ordering::Relaxed) as usize;
        // Filled in place: the guard is large (a slot per shard), and building the array
        // first and moving it in cost a 264-byte copy per write lock.
        for shard in self.shards.iter().take(in_use) {
            guard.views.push(write_shard(shard));
        }
        guard
    }

    /// [`RwLock::is_contended`]: a thread waits in [`read`](Self::read),
    /// [`write`](Self::write) or [`read_view`](Self::read_view).
    #[inline]
    pub(crate) fn is_contended(&self) -> bool {
        self.main.is_contended()
    }

    /// A shard for a new reader thread, round robin. Under the read lock: no writer is
    /// inside while the shards in use grow, so each writer locks the same ones it unlocks.
    pub(crate) fn new_shard(&self) -> usize {
        let _reader = self.main.read();
        let n = self.handed.fetch_add(1, Ordering::Relaxed);
        let _ = self
            .in_use
            .fetch_update(Ordering::Release, Ordering::Relaxed, |k| {
                ((k as usize) < SHARDS).then_some(k + 1)
            });
        // 2^32 is a multiple of SHARDS: the round robin survives the wrap.
        n as usize % SHARDS
    }

    /// Shard `i`'s view, if it is in use and no writer holds it; never waits.
    #[inline]
    pub(crate) fn try_read_view(&self, i: usize) -> Option<InnerRead<'_, V>> {
        if i >= self.in_use.load(Ordering::Acquire) as usize {
            return None;
        }
        inner_try_read(&self.shards.get(i)?.view)
    }

    /// Shard `i`'s view with the lock held for reading ([`RwLock::read`]: waits while a
    /// writer holds it or waits for it); `None` only for an `i` of no shard.
    pub(crate) fn read_view(&self, i: usize) -> Option<(RwLockReadGuard<'_, T>, InnerRead<'_, V>)> {
        let main = self.main.read();
        let shard = self.shards.get(i)?;
        loop {
            // No writer holds a shard while we hold the read lock: this succeeds at once
            // (a retry instead of a panic should that ever be wrong).
            if let Some(view) = inner_try_read(&shard.view) {
                return Some((main, view));
            }
            #[cfg(loom)]
            INNER_RETRIES.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
            spin_wait();
        }
    }

    /// Adds `n` to shard `i`'s counter (nothing for an `i` of no shard).
    #[inline]
    pub(crate) fn count(&self, i: usize, n: u64) {
        if let Some(shard) = self.shards.get(i) {
            shard.count.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// The counters of every shard added up, wrapping as each of them does.
    pub(crate) fn counted(&self) -> u64 {
        (self.shards.iter()).fold(0, |n, s| n.wrapping_add(s.count.load(Ordering::Relaxed)))
    }

    /// Shards handed out (for tests).
    #[cfg(test)]
    pub(crate) fn shards_in_use(&self) -> usize {
        self.in_use.load(Ordering::Relaxed) as usize
    }
}

#[cfg(feature = "alloc")]
impl<T, V> ShardedWriteGuard<'_, T, V> {
    /// The data and every shard's view, for a change to all of them: the shards not in use
    /// are locked now, after those in use (index order).
    pub(crate) fn split_views(&mut self) -> (&mut T, impl Iterator<Item = &mut V>) {
        let held = self.views.len();
        for shard in self.lock.shards.iter().skip(held) {
            self.views.push(write_shard(shard));
        }
        (&mut *self.main, self.views.iter_mut().map(|v| &mut **v))
    }
}

#[cfg(feature = "alloc")]
impl<T, V> Deref for ShardedWriteGuard<'_, T, V> {
    type Target = T;

    #[inline]
    fn deref(&self) -> &T {
        &self.main
    }
}

#[cfg(feature = "alloc")]
impl<T, V> DerefMut for ShardedWriteGuard<'_, T, V> {
    #[inline]
    fn deref_mut(&mut self) -> &mut T {
        &mut self.main
    }
}

/// The fields of [`RwLock`]'s state word (see the module documentation).
mod state {
    /// A writer holds the lock.
    pub(super) const WRITER: u64 = 1;
    /// Read generation: bumped by a writer's release that admits waiting readers.
    pub(super) const GEN_SHIFT: u32 = 1;
    pub(super) const GEN_MASK: u64 = 0b111 << GEN_SHIFT;
    /// Width of each of the three counts.
    const COUNT_BITS: u32 = 20;
    /// The largest value a count takes.
    pub(super) const COUNT_MAX: u64 = (1 << COUNT_BITS) - 1;
    /// Readers holding the lock.
    pub(super) const READERS_SHIFT: u32 = 4;
    /// Readers registered as waiting.
    pub(super) const RWAIT_SHIFT: u32 = READERS_SHIFT + COUNT_BITS;
    /// Writers registered as waiting.
    pub(super) const WWAIT_SHIFT: u32 = RWAIT_SHIFT + COUNT_BITS;
    static_assertions::const_assert_eq!(WWAIT_SHIFT + COUNT_BITS, 64);

    /// One unit of the count at `shift`.
    pub(super) const fn one(shift: u32) -> u64 {
        1 << shift
    }

    /// The count at `shift` in `s`.
    pub(super) const fn count(s: u64, shift: u32) -> u64 {
        (s >> shift) & COUNT_MAX
    }

    /// Someone (reader or writer) is registered as waiting.
    pub(super) const fn waiters(s: u64) -> bool {
        count(s, RWAIT_SHIFT) != 0 || count(s, WWAIT_SHIFT) != 0
    }

    /// A new reader may enter.
    pub(super) const fn reader_may_enter(s: u64) -> bool {
        s & WRITER == 0 && count(s, WWAIT_SHIFT) == 0 && count(s, READERS_SHIFT) < COUNT_MAX
    }

    /// A writer may enter.
    pub(super) const fn writer_may_enter(s: u64) -> bool {
        s & WRITER == 0 && count(s, READERS_SHIFT) == 0
    }

    /// A writer that has not registered as waiting may enter: only while no writer waits,
    /// so a writer that drops the lock because someone waits (the splitter) cannot take it
    /// straight back from a waiting writer.
    pub(super) const fn new_writer_may_enter(s: u64) -> bool {
        writer_may_enter(s) && count(s, WWAIT_SHIFT) == 0
    }

    /// The state after a writer's release: the lock goes to every waiting reader.
    pub(super) const fn after_write_release(s: u64) -> u64 {
        let waiting = count(s, RWAIT_SHIFT);
        let mut next = s & !WRITER;
        if waiting != 0 {
            // READERS is 0 while a writer holds the lock, so this cannot overflow it.
            next &= !(COUNT_MAX << RWAIT_SHIFT);
            next += waiting << READERS_SHIFT;
            let generation = (next & GEN_MASK).wrapping_add(one(GEN_SHIFT)) & GEN_MASK;
            next = (next & !GEN_MASK) | generation;
        }
        next
    }
}

/// The inner lock that holds the data; free whenever the state word admits a thread.
#[cfg(not(loom))]
type Inner<T> = spin::rwlock::RwLock<T>;
#[cfg(loom)]
type Inner<T> = loom::sync::RwLock<T>;
#[cfg(not(loom))]
type InnerRead<'a, T> = spin::rwlock::RwLockReadGuard<'a, T>;
#[cfg(loom)]
type InnerRead<'a, T> = loom::sync::RwLockReadGuard<'a, T>;
#[cfg(not(loom))]
type InnerWrite<'a, T> = spin::rwlock::RwLockWriteGuard<'a, T>;
#[cfg(loom)]
type InnerWrite<'a, T> = loom::sync::RwLockWriteGuard<'a, T>;

/// `try_read` on an inner lock, as an `Option` (spin's returns one, loom's a `Result`).
#[inline]
fn inner_try_read<T>(lock: &Inner<T>) -> Option<InnerRead<'_, T>> {
    #[cfg(not(loom))]
    return lock.try_read();
    #[cfg(loom)]
    return lock.try_read().ok();
}

/// `try_write` on an inner lock, as an `Option`.
#[inline]
fn inner_try_write<T>(lock: &Inner<T>) -> Option<InnerWrite<'_, T>> {
    #[cfg(not(loom))]
    return lock.try_write();
    #[cfg(loom)]
    return lock.try_write().ok();
}

/// Failed `try_*` on the inner lock after admission, over the whole process: a loom test
/// asserts it stays 0. Not a loom atomic on purpose: it counts across executions.
#[cfg(loom)]
static INNER_RETRIES: core::sync::atomic::AtomicUsize = core::sync::atomic::AtomicUsize::new(0);

/// How often a thread the state word had admitted found the inner data lock busy (a protocol
/// bug if ever non-zero). Only in loom builds, for the loom tests.
#[cfg(loom)]
#[doc(hidden)]
pub fn inner_retries() -> usize {
    INNER_RETRIES.load(core::sync::atomic::Ordering::Relaxed)
}

/// A reader-writer spin lock that knows whether anyone waits for it: the MMU lock (KVM
/// `mmu_lock`, a qrwlock).
///
/// Phase-fair: a waiting writer keeps new readers out, and the readers that waited behind a
/// writer get in before the next writer. [`is_contended`](Self::is_contended) is KVM's
/// `rwlock_needbreak`/`rwlock_is_contended`: a thread holding the lock for a long job (the
/// eager splitter) drops and retakes it when it answers true. The protocol is in the
/// [module documentation](self).
///
/// A thread must not take the read lock again while it holds it: behind a waiting writer
/// the second `read` waits for the writer, which waits for the first (KVM's `mmu_lock` has
/// the same rule). It spins while it waits, which suits a kernel that holds it with
/// preemption off; in user space a preempted holder makes waiters burn their time slices.
///
/// ```
/// use hvmem::sync::RwLock;
///
/// let lock = RwLock::new(0u32);
/// {
///     let mut w = lock.write();
///     *w += 1;
///     assert!(lock.try_read().is_none());
///     assert!(!lock.is_contended());
/// }
/// let (a, b) = (lock.read(), lock.read());
/// assert_eq!((*a, *b), (1, 1));
/// assert!(lock.try_write().is_none());
/// ```
pub struct RwLock<T> {
    state: AtomicU64,
    inner: Inner<T>,
}

/// Shared access to an [`RwLock`]'s data; the read lock is released when it is dropped.
pub struct RwLockReadGuard<'a, T> {
    // Declared first so it drops first: the inner lock is free before the state word says so.
    inner: InnerRead<'a, T>,
    _release: ReadRelease<'a>,
}

/// Exclusive access to an [`RwLock`]'s data; the write lock is released when it is dropped.
pub struct RwLockWriteGuard<'a, T> {
    // Declared first so it drops first: the inner lock is free before the state word says so.
    inner: InnerWrite<'a, T>,
    _release: WriteRelease<'a>,
}

/// Releases a read admission on the state word when dropped.
struct ReadRelease<'a>(&'a AtomicU64);

/// Releases a write admission on the state word when dropped.
struct WriteRelease<'a>(&'a AtomicU64);

impl Drop for ReadRelease<'_> {
    #[inline]
    fn drop(&mut self) {
        // READERS >= 1: it counts this reader, so the subtraction borrows from no other field.
        self.0
            .fetch_sub(state::one(state::READERS_SHIFT), Ordering::Release);
    }
}

impl Drop for WriteRelease<'_> {
    #[inline]
    fn drop(&mut self) {
        let mut s = self.0.load(Ordering::Relaxed);
        loop {
            match self.0.compare_exchange_weak(
                s,
                state::after_write_release(s),
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(now) => s = now,
            }
        }
    }
}

impl<T> RwLock<T> {
    /// A new, unlocked lock.
    #[cfg(not(loom))]
    pub const fn new(value: T) -> Self {
        Self {
            state: AtomicU64::new(0),
            inner: Inner::new(value),
        }
    }

    /// A new, unlocked lock.
    #[cfg(loom)]
    pub fn new(value: T) -> Self {
        Self {
            state: AtomicU64::new(0),
            inner: Inner::new(value),
        }
    }

    /// Takes the lock for reading if that needs no wait: no writer holds it or waits for it.
    #[inline]
    pub fn try_read(&self) -> Option<RwLockReadGuard<'_, T>> {
        let mut s = self.state.load(Ordering::Relaxed);
        while state::reader_may_enter(s) {
            match self.state.compare_exchange_weak(
                s,
                s + state::one(state::READERS_SHIFT),
                Ordering::Acquire,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(self.read_admitted()),
                Err(now) => s = now,
            }
        }
        None
    }

    /// Takes the lock for writing if nobody holds it and no writer waits for it.
    #[inline]
    pub fn try_write(&self) -> Option<RwLockWriteGuard<'_, T>> {
        let mut s = self.state.load(Ordering::Relaxed);
        while state::new_writer_may_enter(s) {
            match self.state.compare_exchange_weak(
                s,
                s | state::WRITER,
                Ordering::Acquire,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(self.write_admitted()),
                Err(now) => s = now,
            }
        }
        None
    }

    /// Takes the lock for reading, spinning (a loom yield, under loom) while a writer holds
    /// it or waits for it. While it waits, [`is_contended`](Self::is_contended) is true.
    pub fn read(&self) -> RwLockReadGuard<'_, T> {
        loop {
            if let Some(guard) = self.try_read() {
                return guard;
            }
            let mut s = self.state.load(Ordering::Relaxed);
            loop {
                if state::reader_may_enter(s) {
                    // The writer left before we registered: try to enter directly.
                    break;
                }
                let behind_writer =
                    s & state::WRITER != 0 || state::count(s, state::WWAIT_SHIFT) != 0;
                if !behind_writer || state::count(s, state::RWAIT_SHIFT) == state::COUNT_MAX {
                    // Only a writer's release admits waiting readers, so register only behind
                    // one. Otherwise READERS is full; or RWAIT is full, and the lock is already
                    // contended: wait unregistered and start over.
                    spin_wait();
                    break;
                }
                match self.state.compare_exchange_weak(
                    s,
                    s + state::one(state::RWAIT_SHIFT),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => {
                        // A writer's release admits us and bumps GEN; until then, wait.
                        let generation = s & state::GEN_MASK;
                        while self.state.load(Ordering::Acquire) & state::GEN_MASK == generation {
                            spin_wait();
                        }
                        return self.read_admitted();
                    }
                    Err(now) => s = now,
                }
            }
        }
    }

    /// Takes the lock for writing, spinning (a loom yield, under loom) while anyone holds
    /// it. While it waits, new readers wait too and [`is_contended`](Self::is_contended) is
    /// true.
    pub fn write(&self) -> RwLockWriteGuard<'_, T> {
        loop {
            if let Some(guard) = self.try_write() {
                return guard;
            }
            let s = self.state.load(Ordering::Relaxed);
            if state::new_writer_may_enter(s) {
                // The lock looks free but `try_write` just found it taken: the load may be
                // stale. Let the holder run before trying again (under loom, without this
                // yield the writer spun on a stale value and never let the reader out).
                spin_wait();
                continue;
            }
            if state::count(s, state::WWAIT_SHIFT) == state::COUNT_MAX {
                // Cannot register (someone else already makes the lock contended).
                spin_wait();
                continue;
            }
            if self
                .state
                .compare_exchange_weak(
                    s,
                    s + state::one(state::WWAIT_SHIFT),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_err()
            {
                // Changed under us (or the load was stale): let others run, start over.
                spin_wait();
                continue;
            }
            // Registered: new readers now wait. Enter and unregister in one step.
            let mut s = self.state.load(Ordering::Relaxed);
            loop {
                if state::writer_may_enter(s) {
                    match self.state.compare_exchange_weak(
                        s,
                        (s | state::WRITER) - state::one(state::WWAIT_SHIFT),
                        Ordering::Acquire,
                        Ordering::Relaxed,
                    ) {
                        Ok(_) => return self.write_admitted(),
                        Err(now) => s = now,
                    }
                } else {
                    spin_wait();
                    s = self.state.load(Ordering::Relaxed);
                }
            }
        }
    }

    /// Whether at least one thread is waiting in [`read`](Self::read) or
    /// [`write`](Self::write) (KVM `rwlock_needbreak`). A holder doing a long job drops the
    /// lock and takes it again when this is true; the waiters get in first.
    #[inline]
    pub fn is_contended(&self) -> bool {
        state::waiters(self.state.load(Ordering::Relaxed))
    }

    /// The protected value, through exclusive access to the lock itself.
    #[inline]
    pub fn get_mut(&mut self) -> &mut T {
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
    pub fn into_inner(self) -> T {
        #[cfg(not(loom))]
        return self.inner.into_inner();
        #[cfg(loom)]
        return match self.inner.into_inner() {
            Ok(value) => value,
            Err(poisoned) => poisoned.into_inner(),
        };
    }

    /// The read guard of a thread the state word has admitted as a reader.
    fn read_admitted(&self) -> RwLockReadGuard<'_, T> {
        let release = ReadRelease(&self.state);
        loop {
            // Admission leaves no writer inside, so this succeeds at once; spinning instead
            // of panicking keeps a protocol bug from being a panic path.
            if let Some(inner) = inner_try_read(&self.inner) {
                return RwLockReadGuard {
                    inner,
                    _release: release,
                };
            }
            #[cfg(loom)]
            INNER_RETRIES.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
            spin_wait();
        }
    }

    /// The write guard of a thread the state word has admitted as the writer.
    fn write_admitted(&self) -> RwLockWriteGuard<'_, T> {
        let release = WriteRelease(&self.state);
        loop {
            // Admission leaves nobody else inside, so this succeeds at once (see above).
            if let Some(inner) = inner_try_write(&self.inner) {
                return RwLockWriteGuard {
                    inner,
                    _release: release,
                };
            }
            #[cfg(loom)]
            INNER_RETRIES.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
            spin_wait();
        }
    }
}

impl<T: Default> Default for RwLock<T> {
    fn default() -> Self {
        Self::new(T::default())
    }
}

impl<T> core::fmt::Debug for RwLock<T> {
    /// The state word's fields, not the data (reading it would need the lock).
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let s = self.state.load(Ordering::Relaxed);
        f.debug_struct("RwLock")
            .field("writer", &(s & state::WRITER != 0))
            .field("readers", &state::count(s, state::READERS_SHIFT))
            .field("readers_waiting", &state::count(s, state::RWAIT_SHIFT))
            .field("writers_waiting", &state::count(s, state::WWAIT_SHIFT))
            .finish_non_exhaustive()
    }
}

impl<T> Deref for RwLockReadGuard<'_, T> {
    type Target = T;

    #[inline]
    fn deref(&self) -> &T {
        &self.inner
    }
}

impl<T> Deref for RwLockWriteGuard<'_, T> {
    type Target = T;

    #[inline]
    fn deref(&self) -> &T {
        &self.inner
    }
}

impl<T> DerefMut for RwLockWriteGuard<'_, T> {
    #[inline]
    fn deref_mut(&mut self) -> &mut T {
        &mut self.inner
    }
}

#[cfg(all(test, not(loom)))]
mod tests;
