//! A tiny KVM harness for running a 64-bit guest on page tables built by hvmem.
//!
//! - [`ram`]: guest RAM (the only unsafe code: mmap, memslot), reached as `[AtomicU64]`;
//! - [`arena`]: page-table frames carved out of guest RAM;
//! - [`machine`]: VM + vCPU in long mode, one run of the pattern loop, `KVM_TRANSLATE`;
//! - [`guest`]: layout, GDT, IDT, the hand-assembled pattern loop and #PF handler;
//! - [`inspect`]: an independent reader of the tables (census, walk);
//! - [`tables`]: the adapter to the page-table operations under test.

pub mod arena;
pub mod guest;
pub mod inspect;
pub mod machine;
pub mod ram;
pub mod tables;
