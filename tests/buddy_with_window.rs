//! `Buddy::with_window` checks the window before it asks the heap for metadata: a window the
//! allocator would refuse anyway must not cost a multi-gigabyte allocation attempt first.
#![cfg(feature = "alloc")]
// A global allocator is unsafe to implement.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use hvmem::addr::Pfn;
use hvmem::buddy::{Buddy, NewError, WithWindowError};

/// Counts the requests of more than 1 GiB and refuses them, so the test never touches that
/// much memory whatever the code under test does.
struct RefuseHuge;

static HUGE_REQUESTS: AtomicUsize = AtomicUsize::new(0);
const HUGE: usize = 1 << 30;

// SAFETY: forwards to `System`, except that it refuses (returns null, as the contract allows)
// requests above `HUGE`.
unsafe impl GlobalAlloc for RefuseHuge {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > HUGE {
            HUGE_REQUESTS.fetch_add(1, Ordering::Relaxed);
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's contract is `System`'s.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > HUGE {
            HUGE_REQUESTS.fetch_add(1, Ordering::Relaxed);
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's contract is `System`'s.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: RefuseHuge = RefuseHuge;

#[test]
fn an_oversized_window_is_refused_before_any_allocation() {
    for frames in [u64::from(u32::MAX), u64::from(u32::MAX) + 1, u64::MAX] {
        let r = Buddy::<_, 10>::with_window(Pfn::ZERO, frames);
        assert_eq!(
            r.err(),
            Some(WithWindowError::New(NewError::TooManyFrames)),
            "{frames} frames"
        );
    }
    let top = Pfn::new(hvmem::addr::FRAME_LIMIT - 1).ok();
    let r = Buddy::<_, 10>::with_window(top.unwrap_or(Pfn::ZERO), 2);
    assert_eq!(r.err(), Some(WithWindowError::New(NewError::OutOfRange)));
    assert_eq!(HUGE_REQUESTS.load(Ordering::Relaxed), 0);
}
