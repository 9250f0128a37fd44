//! Non-temporal fills for splits larger than the caches: the table entries and rmap heads
//! of a big eager split, written with stores that go to memory without first reading
//! each line into the cache (a cached store to a line the cache does not hold reads the
//! line from memory first, then writes it back when it is evicted: twice the traffic).
//!
//! On the Intel Xeon of `BENCHMARKS.md`, writing 64 MiB that the caches do not hold runs at
//! 7.9 GB/s with ordinary stores and 18-22 GB/s with `movntdq`; 32 MiB that they do hold,
//! at 18.5 GB/s with ordinary stores, while `movntdq` would evict it. So the splitter
//! streams only when its whole request writes more than
//! [`MmuConfig::stream_split_bytes`](crate::spt::mmu::MmuConfig::stream_split_bytes),
//! about the size of the last-level cache (Linux clears huge pages with non-temporal
//! stores for the same reason once a range outgrows the cache).
//!
//! Streaming stores are weakly ordered, even on x86: nothing may read or write the memory
//! they filled, nor publish it to another thread, before [`stream_fence`] (`sfence`) ran
//! on the thread that streamed. The splitter streams only into a fresh child (no walker can
//! reach it before its parent entry is written) and into heads under the MMU lock, and
//! fences before the parent entry is written and before it looks at the heads again.
//!
//! Elsewhere (other architectures, x86_64 targets without SSE2 such as the
//! `x86_64-unknown-none` kernel target, Miri and loom) the fills are ordinary stores and
//! the fence does nothing.

#[cfg(feature = "alloc")]
use crate::rmap::RmapHead;
use crate::sync::{AtomicU64, Ordering};

/// Entries per loop trip of the streaming loop: two cache lines.
#[cfg(all(target_arch = "x86_64", target_feature = "sse2", not(loom), not(miri)))]
const GROUP: usize = 16;

/// Stores `first + i * step` (wrapping) into `entries[i]` for every `i` with non-temporal
/// stores, each entry as by one relaxed atomic store. Call [`stream_fence`] before the
/// entries are published (see the module documentation).
#[inline]
pub(crate) fn stream_progression(entries: &[AtomicU64], first: u64, step: u64) {
    #[cfg(all(target_arch = "x86_64", target_feature = "sse2", not(loom), not(miri)))]
    {
        let (head, body) = split_aligned(entries.as_ptr() as usize, entries.len());
        let at = |i: usize| first.wrapping_add(step.wrapping_mul(i as u64));
        for (i, e) in entries[..head].iter().enumerate() {
            e.store(at(i), Ordering::Relaxed);
        }
        if body > 0 {
            let start = entries[head..].as_ptr().cast::<u64>().cast_mut();
            // SAFETY: `[start, start + body)` is `entries[head..head + body]`, whole
            // `AtomicU64`s (the layout of `u64`) valid for writes through the shared
            // reference (atomics are interior mutable); `start` is 16-byte aligned and
            // `body` a non-zero multiple of `GROUP` (`split_aligned`). Each aligned 8-byte
            // half of a `movntdq` is written in one access, so it is two relaxed atomic
            // stores; the caller fences before publishing them.
            unsafe { progression_asm!("movntdq", start, body, at(head), step) };
        }
        for (i, e) in entries.iter().enumerate().skip(head + body) {
            e.store(at(i), Ordering::Relaxed);
        }
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "sse2", not(loom), not(miri))))]
    super::store_progression(entries, first, step);
}

/// Sets `heads[i]` to the head whose raw word is `first + i` for every `i`, with
/// non-temporal stores. Call [`stream_fence`] before anything reads or writes the heads
/// again.
#[cfg(feature = "alloc")]
#[inline]
pub(crate) fn stream_heads(heads: &mut [RmapHead], first: u64) {
    #[cfg(all(target_arch = "x86_64", target_feature = "sse2", not(loom), not(miri)))]
    {
        let (head, body) = split_aligned(heads.as_ptr() as usize, heads.len());
        let at = |i: usize| first.wrapping_add(i as u64);
        for (i, h) in heads[..head].iter_mut().enumerate() {
            *h = RmapHead::from_raw(at(i));
        }
        if body > 0 {
            let start = heads[head..].as_mut_ptr().cast::<u64>();
            // SAFETY: `RmapHead` is `repr(transparent)` over a `u64` and any `u64` is a
            // valid head (the rmap checks what it reads), so `[start, start + body)` is
            // `heads[head..head + body]` seen as `u64`s, valid for writes through the
            // exclusive borrow; `start` is 16-byte aligned and `body` a non-zero multiple of
            // `GROUP` (`split_aligned`). The caller fences before touching the heads again.
            unsafe { progression_asm!("movntdq", start, body, at(head), 1) };
        }
        for (i, h) in heads.iter_mut().enumerate().skip(head + body) {
            *h = RmapHead::from_raw(at(i));
        }
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "sse2", not(loom), not(miri))))]
    for (i, h) in heads.iter_mut().enumerate() {
        *h = RmapHead::from_raw(first.wrapping_add(i as u64));
    }
}

/// Orders every non-temporal store this thread made before every store after it
/// (`sfence`), so a later release store (a parent entry, the lock's release) publishes the
/// streamed memory to whoever acquires it. (This thread's own loads see its streaming
/// stores in program order either way; the splitter fences before reading heads anyway,
/// as the rule is simpler to check.)
#[inline]
pub(crate) fn stream_fence() {
    #[cfg(all(target_arch = "x86_64", target_feature = "sse2", not(loom), not(miri)))]
    // SAFETY: `sfence` only orders this thread's stores; it touches no memory, no register
    // and no flag.
    unsafe {
        core::arch::asm!("sfence", options(nostack, preserves_flags));
    }
}

/// How `len` entries of 8 bytes at address `addr` split into a head before the first
/// 16-byte boundary (0 or 1 entry) and a body of whole groups of [`GROUP`]; the rest is
/// the tail.
#[cfg(all(target_arch = "x86_64", target_feature = "sse2", not(loom), not(miri)))]
#[inline]
fn split_aligned(addr: usize, len: usize) -> (usize, usize) {
    let head = usize::from(addr % 16 != 0).min(len);
    (head, (len - head) / GROUP * GROUP)
}
