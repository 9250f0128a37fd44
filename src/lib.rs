//! `no_std` memory algorithms that sit between a hypervisor and its guests.
//!
//! Two kinds of program embed this crate:
//!
//! - **a VMM or hypervisor** (host side): [`spt`], page tables over several entry formats
//!   (x86-64 4- and 5-level, Intel EPT) with one composable walker and the operations on it,
//!   shaped as the substrate of a shadow MMU (entry handles for reverse maps, tables shared by
//!   several parents, splitting one entry into a caller-provided child); and
//!   [`hint::host`], the receiving end of free-page reports and balloon requests, which
//!   validates untrusted guest ranges before the embedder discards them.
//! - **a unikernel or small guest kernel** (guest side): [`buddy`], a page allocator whose
//!   free blocks know whether the host already took them back; and [`hint::guest`], which
//!   reports cold free memory to the host in bounded batches (Linux `mm/page_reporting.c`)
//!   and balloons at the host's huge-page order.
//!
//! [`hint::wire`] holds the bytes both sides exchange (virtio descriptors, balloon PFN
//! arrays, free-page-hint command ids).
//!
//! Everything the embedder owns — memory, table frames, TLB flushes, the transport to the
//! host, how a discard is done — is a trait the embedder implements; the crate never touches
//! global state and needs no allocator (the `alloc` feature adds constructors that allocate
//! their own metadata). Bad input gets a typed error and changes nothing.
//!
//! The repository's `docs/DESIGN.md` describes the architecture, the lock protocols and the
//! invariants every test and fuzz target checks, and cites the mailing-list threads the
//! requirements come from; `BENCHMARKS.md` has the measured figures against peers.
//!
//! [`cache`] holds the MMU memory caches (objects and tables taken outside the MMU lock) the
//! shadow MMU pops under it; `rmap` (feature `alloc`) the reverse maps from a guest frame,
//! or a shadow page, back to the entries that map it, and the eager huge-page splitter
//! they drive; and [`sync::RwLock`] is the MMU lock: a reader-writer lock that knows
//! whether anyone waits, so a long writer can drop it for a waiting vCPU. `spt::mmu`
//! (feature `alloc`) is the shadow MMU built on all four: shadow pages found by gfn and
//! role, memory slots, the fault path (fast half under the read lock) and dirty logging.
//! Planned, not here yet: shadowing a guest's own page tables.
#![no_std]

#[cfg(any(feature = "alloc", test, fuzzing))]
extern crate alloc;
#[cfg(any(feature = "std", test, fuzzing))]
extern crate std;

pub mod addr;
pub mod buddy;
pub mod cache;
pub mod hint;
#[cfg(feature = "alloc")]
pub mod rmap;
pub mod spt;
pub mod sync;

#[cfg(any(test, fuzzing, feature = "testing"))]
#[doc(hidden)]
pub mod testing;

pub use addr::{AddrError, Gfn, Gpa, Hpa, Level, PageOrder, Pfn, Va};
pub use buddy::{Block, Buddy, FrameMeta, LockedBuddy};
pub use spt::{PageTable, PteFormat, TableMemory};

/// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
