//! A tiny KVM harness for running a 64-bit guest on page tables built by hvmem.
//!
//! - [`ram`]: guest RAM (the only unsafe code: mmap, memslot, hvmem's `TableArena` over a
//!   region of it), reached as `[AtomicU64]`;
//! - [`machine`]: VM + vCPU in long mode, one run of the pattern loop, `KVM_TRANSLATE`,
//!   and hvmem's `TlbFlush` for the guest;
//! - [`guest`]: layout, GDT, IDT, the hand-assembled pattern loop, the write probe and the
//!   #PF handler;
//! - [`inspect`]: an independent reader of the tables (census, walk);
//! - [`protect`]: the test's one call of `PageTable::protect`, with its flush;
//! - [`dirty`]: the dirty-logging guest program, its exit-to-host #PF handler, and the host
//!   loop that hands every fault to a pluggable MMU ([`dirty::GuestMmu`]).
//!
//! The page tables themselves are built by `hvmem::spt` in the test body (and in `protect`),
//! or by the MMU behind [`dirty::GuestMmu`].
//!
//! Each test binary (`kvm_guest`, `kvm_dirty_log`) uses part of this harness.
#![allow(dead_code, reason = "each test binary uses part of the harness")]

pub mod dirty;
pub mod guest;
pub mod inspect;
pub mod machine;
pub mod protect;
pub mod ram;
