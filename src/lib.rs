#![no_std]
#![doc = include_str!("../README.md")]

#[cfg(any(feature = "alloc", test, fuzzing))]
extern crate alloc;
#[cfg(any(feature = "std", test, fuzzing))]
extern crate std;

pub mod addr;
pub mod buddy;
pub mod hint;
pub mod spt;
mod sync;

#[cfg(any(test, fuzzing, feature = "testing"))]
#[doc(hidden)]
pub mod testing;

pub use addr::{AddrError, Gfn, Gpa, Hpa, Level, PageOrder, Pfn, Va};
pub use buddy::{Block, Buddy, FrameMeta, LockedBuddy};
pub use spt::{PageTable, PteFormat, TableMemory};
