//! One small error enum per buddy operation. Every error leaves the allocator unchanged.

use core::fmt;

macro_rules! error_display {
    ($ty:ident { $($variant:ident => $text:literal,)* }) => {
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(match self {
                    $(Self::$variant => $text,)*
                })
            }
        }

        impl core::error::Error for $ty {}
    };
}

/// Why [`Buddy::new`](super::Buddy::new) refused its metadata.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum NewError {
    /// The metadata slice is empty.
    Empty,
    /// The window has more frames than 32-bit frame indices can name (`u32::MAX - 1`).
    TooManyFrames,
    /// The window reaches beyond the 52-bit physical address space.
    OutOfRange,
}

error_display!(NewError {
    Empty => "metadata slice is empty",
    TooManyFrames => "metadata window has more frames than 32-bit indices can name",
    OutOfRange => "metadata window reaches beyond the physical address space",
});

/// Why [`Buddy::add_range`](super::Buddy::add_range) refused a range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AddRangeError {
    /// The range has no frames.
    Empty,
    /// The range is not inside the metadata window (or its end overflows).
    OutsideWindow,
    /// Some frame of the range is already managed.
    Overlap,
}

error_display!(AddRangeError {
    Empty => "range is empty",
    OutsideWindow => "range is outside the metadata window",
    Overlap => "range overlaps memory the allocator already manages",
});

/// Why an allocation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AllocError {
    /// The order is above the allocator's `MAX_ORDER`.
    OrderTooLarge,
    /// No free block of the order (or larger) is available.
    OutOfMemory,
}

error_display!(AllocError {
    OrderTooLarge => "order above the allocator's MAX_ORDER",
    OutOfMemory => "no free block large enough",
});

/// Why [`Buddy::free`](super::Buddy::free) refused a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FreeError {
    /// The order is above the allocator's `MAX_ORDER`.
    OrderTooLarge,
    /// The frame number is not aligned to the block's order.
    Unaligned,
    /// The block is outside the metadata window or in a hole the allocator does not manage.
    OutOfRange,
    /// The block (or the block holding this frame) is already free.
    DoubleFree,
    /// The frame is allocated, but not as a block of this order starting here.
    WrongOrder,
    /// The block is isolated for a report in flight; it comes back through `put_back`.
    Isolated,
}

error_display!(FreeError {
    OrderTooLarge => "order above the allocator's MAX_ORDER",
    Unaligned => "frame number not aligned to the block order",
    OutOfRange => "block outside the managed memory",
    DoubleFree => "block is already free",
    WrongOrder => "frame is not the start of an allocated block of this order",
    Isolated => "block is isolated for a report in flight",
});

/// Why [`Buddy::isolate`](super::Buddy::isolate) could not run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum IsolateError {
    /// The order is above the allocator's `MAX_ORDER`.
    OrderTooLarge,
}

error_display!(IsolateError {
    OrderTooLarge => "order above the allocator's MAX_ORDER",
});

/// Why [`Buddy::put_back`](super::Buddy::put_back) refused a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PutBackError {
    /// The order is above the allocator's `MAX_ORDER`.
    OrderTooLarge,
    /// The frame number is not aligned to the block's order.
    Unaligned,
    /// The block is outside the metadata window or in a hole the allocator does not manage.
    OutOfRange,
    /// The frame does not start an isolated block (it is free, allocated or inside a block).
    NotIsolated,
    /// The block starting here is isolated at a different order.
    WrongOrder,
}

error_display!(PutBackError {
    OrderTooLarge => "order above the allocator's MAX_ORDER",
    Unaligned => "frame number not aligned to the block order",
    OutOfRange => "block outside the managed memory",
    NotIsolated => "frame does not start an isolated block",
    WrongOrder => "block is isolated at a different order",
});

/// A broken internal rule found by [`Buddy::check_invariants`](super::Buddy::check_invariants).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InvariantViolation {
    /// Which rule is broken.
    pub rule: &'static str,
    /// The frame number where it was seen.
    pub pfn: u64,
}

impl fmt::Display for InvariantViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "buddy invariant broken at pfn {:#x}: {}",
            self.pfn, self.rule
        )
    }
}

impl core::error::Error for InvariantViolation {}
