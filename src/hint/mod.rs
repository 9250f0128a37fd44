//! Free-page reporting end to end: the guest's hint batcher, the wire formats, the host's
//! receiver, the free-page-hint protocol and THP-order ballooning (seeds 000-003; Linux
//! `mm/page_reporting.c`, `drivers/virtio/virtio_balloon.c`).
