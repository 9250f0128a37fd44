//! Free-page hinting end to end: a guest tells its host which of its free memory the host may
//! take back, and the host takes it back without ever touching anything else (Linux
//! `mm/page_reporting.c`, `drivers/virtio/virtio_balloon.c`; QEMU `hw/virtio/virtio-balloon.c`).
//!
//! - [`guest`]: the guest's side — the free-page reporter ([`guest::Reporter`], Linux
//!   `page_reporting_cycle`) with its synchronous and pipelined transports, poison
//!   negotiation, and a THP-order balloon ([`guest::Balloon`]). It runs on the guest's buddy
//!   allocator and needs neither `alloc` nor `std`.
//! - [`host`]: the host's side — [`host::ReportReceiver`] validates, clamps and aligns
//!   untrusted guest ranges before the embedder discards them (QEMU
//!   `virtio_balloon_handle_report`), and [`host::FreePageHintSession`] runs the
//!   free-page-hint protocol of live migration (QEMU `get_free_page_hints`).
//! - [`wire`]: the bytes between them, little-endian, with decoders for untrusted input —
//!   virtio descriptors and chains for reporting scatter lists, `pa | order` hints, balloon
//!   PFN arrays, free-page-hint command ids.
//!
//! The requirements come from four threads: (Tsirkin, "Re: [RFC PATCH 3/4] kvm: Add guest
//! side support for free memory hints", 2019-02-11), (Duyck, "Re: [RFC][Patch v9 0/6] KVM:
//! Guest Free Page Hinting", 2019-03-07), (Duyck, "[v1,6/6] virtio-balloon: Add support for
//! aerating memory via hinting", 2019-06-19,
//! <20190619223338.1231.52537.stgit@localhost.localdomain>) and (Hildenbrand, "Re: [RFC for
//! Linux] virtio_balloon: Add VIRTIO_BALLOON_F_THP_ORDER to handle THP spilt issue",
//! 2020-03-12).
//!
//! # Concurrency
//! The guest side shares the allocator with every CPU of the guest and takes its lock only
//! in short sections, never while the host works; the host side and the balloon are
//! `&mut self`, one thread per queue. Each module's docs give its protocol.

pub mod guest;
pub mod host;
pub mod wire;
