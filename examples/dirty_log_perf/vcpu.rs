//! The host, the vCPUs' software TLBs, the remote-flush protocol and a vCPU's pass over its
//! region (the protocol is described in the example's module doc).

use std::hint::black_box;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release, SeqCst};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::Instant;

use hvmem::spt::mmu::{FaultCaches, FaultError, HostMemory, HostPage, Mmu, SlotId};
use hvmem::spt::{Ept, FlushRange, TlbFlush};
use hvmem::{Gfn, Gpa, Hpa, Level, Pfn};

use crate::HOST_BASE_PFN;

/// Guest frame g lives at host frame `HOST_BASE_PFN + g`, mapped by the host with pages of
/// `level` (hugetlbfs of that size).
pub(crate) struct Host {
    pub(crate) level: Level,
}

impl HostMemory for Host {
    fn host_page(&self, _slot: SlotId, gfn: Gfn) -> Option<HostPage> {
        Some(HostPage {
            pfn: Pfn::new(HOST_BASE_PFN + gfn.get()).ok()?,
            level: self.level,
            writable: true,
        })
    }
}

/// One vCPU's side of the flush protocol (see the module doc). Cache-line aligned: the
/// vCPUs poll their own and the flusher writes all of them.
#[repr(align(64))]
#[derive(Default)]
pub(crate) struct VcpuSync {
    /// Flush generation requested of this vCPU.
    pub(crate) request: AtomicU64,
    /// Latest generation this vCPU acted on (its TLB was emptied after it was requested).
    pub(crate) ack: AtomicU64,
    /// Whether the vCPU may be between a TLB lookup or walk and the use of its result.
    pub(crate) in_guest: AtomicBool,
}

/// The [`TlbFlush`] every thread hands the MMU: a remote flush of every vCPU's software
/// TLB that returns only when no vCPU can still use an old translation (KVM
/// `kvm_flush_remote_tlbs`). Range flushes flush everything, as KVM's remote flush does.
pub(crate) struct RemoteFlush<'a> {
    pub(crate) vcpus: &'a [VcpuSync],
    pub(crate) flushes: &'a AtomicU64,
}

impl RemoteFlush<'_> {
    pub(crate) fn flush(&mut self) {
        self.flushes.fetch_add(1, Relaxed);
        let mut want = [0u64; 64];
        for (v, w) in self.vcpus.iter().zip(want.iter_mut()) {
            *w = v.request.fetch_add(1, SeqCst) + 1;
        }
        for (v, &w) in self.vcpus.iter().zip(want.iter()) {
            let mut spins = 0u32;
            while v.in_guest.load(SeqCst) && v.ack.load(Acquire) < w {
                spins += 1;
                if spins < 256 {
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
            }
        }
    }
}

impl TlbFlush for RemoteFlush<'_> {
    fn flush_range(&mut self, _range: FlushRange) {
        self.flush();
    }
    fn flush_all(&mut self) {
        self.flush();
    }
}

#[derive(Clone, Copy, Default)]
pub(crate) struct TlbEntry {
    /// `(gfn >> level shift) + 1`; 0: invalid.
    pub(crate) tag: u64,
    /// Host address of the page's first byte.
    pub(crate) base: u64,
    pub(crate) writable: bool,
}

/// A vCPU's software TLB: direct-mapped arrays of 4 KiB, 2 MiB and 1 GiB translations.
pub(crate) struct SoftTlb {
    pub(crate) sets: [Vec<TlbEntry>; 3],
}

impl SoftTlb {
    const SIZES: [usize; 3] = [256, 32, 4];

    pub(crate) fn new() -> Self {
        Self {
            sets: Self::SIZES.map(|n| vec![TlbEntry::default(); n]),
        }
    }

    pub(crate) fn lookup(&self, gfn: u64) -> Option<(u64, bool)> {
        for (l, set) in self.sets.iter().enumerate() {
            let shift = 9 * l as u32;
            let vpn = gfn >> shift;
            let e = set[vpn as usize % set.len()];
            if e.tag == vpn + 1 {
                let offset = (gfn - (vpn << shift)) << 12;
                return Some((e.base + offset, e.writable));
            }
        }
        None
    }

    pub(crate) fn insert(&mut self, gfn: u64, level: Level, hpa: Hpa, writable: bool) {
        let l = usize::from(level.get() - 1).min(2);
        let shift = 9 * l as u32;
        let vpn = gfn >> shift;
        let set = &mut self.sets[l];
        let n = set.len();
        set[vpn as usize % n] = TlbEntry {
            tag: vpn + 1,
            base: hpa.get() & !(level.page_size() - 1),
            writable,
        };
    }

    /// Drops whatever translates `gfn`, at every size.
    pub(crate) fn invalidate(&mut self, gfn: u64) {
        for (l, set) in self.sets.iter_mut().enumerate() {
            let vpn = gfn >> (9 * l as u32);
            let n = set.len();
            let e = &mut set[vpn as usize % n];
            if e.tag == vpn + 1 {
                e.tag = 0;
            }
        }
    }

    pub(crate) fn clear(&mut self) {
        for set in &mut self.sets {
            set.fill(TlbEntry::default());
        }
    }
}

// ----------------------------------------------------------------------------------------
// A vCPU

/// What a vCPU hands the main thread after a pass over its region.
#[derive(Default)]
pub(crate) struct PassReport {
    /// One bit per page of the region: written in this pass.
    pub(crate) written: Vec<u64>,
    pub(crate) exits: u64,
    /// When the vCPU finished the pass.
    pub(crate) end: Option<Instant>,
    pub(crate) errors: Vec<String>,
}

pub(crate) struct Vcpu<'m, 'a> {
    pub(crate) mmu: &'m Mmu<'a, Ept>,
    pub(crate) host: &'m Host,
    pub(crate) me: &'m VcpuSync,
    pub(crate) flush: RemoteFlush<'m>,
    pub(crate) caches: FaultCaches,
    pub(crate) tlb: SoftTlb,
    pub(crate) seen: u64,
    pub(crate) checksum: u64,
}

impl Vcpu<'_, '_> {
    /// Acts on a flush request, between accesses only.
    #[inline]
    pub(crate) fn sync(&mut self) {
        let r = self.me.request.load(SeqCst);
        if r != self.seen {
            self.tlb.clear();
            self.seen = r;
            self.me.ack.store(r, Release);
        }
    }

    pub(crate) fn enter_guest(&mut self) {
        self.me.in_guest.store(true, SeqCst);
        self.sync();
    }

    pub(crate) fn exit_guest(&mut self) {
        self.me.in_guest.store(false, SeqCst);
    }

    /// One guest access to `gfn`; returns the exits it took.
    pub(crate) fn access(&mut self, gfn: u64, write: bool) -> Result<u64, FaultError> {
        let gpa = Gpa::new(gfn << 12).map_err(|_| FaultError::BadAddress)?;
        for exits in 0..8 {
            self.sync();
            match self.tlb.lookup(gfn) {
                Some((hpa, w)) if !write || w => {
                    self.checksum = self.checksum.wrapping_add(hpa);
                    return Ok(exits);
                }
                // A write through a read-only TLB entry: a permission fault, no walk.
                Some(_) => {}
                None => {
                    if let Some(m) = self.mmu.translate_lockless(gpa) {
                        self.tlb.insert(gfn, m.level, m.hpa, m.writable);
                        if !write || m.writable {
                            self.checksum = self.checksum.wrapping_add(m.hpa.get());
                            return Ok(exits);
                        }
                    }
                }
            }
            // The vCPU exit: leave guest mode, fault, come back.
            self.tlb.invalidate(gfn);
            self.exit_guest();
            let r = self
                .mmu
                .page_fault(&mut self.caches, self.host, gpa, write, &mut self.flush);
            self.enter_guest();
            r?;
        }
        Err(FaultError::Corrupt)
    }

    /// One pass over the region; `write_every`: 1 in that many accesses writes.
    pub(crate) fn pass(&mut self, first_gfn: u64, pages: u64, write_every: u64) -> PassReport {
        let mut rep = PassReport {
            written: vec![0; pages.div_ceil(64) as usize],
            ..PassReport::default()
        };
        self.enter_guest();
        for i in 0..pages {
            let write = i % write_every == 0;
            match self.access(first_gfn + i, write) {
                Ok(exits) => {
                    rep.exits += exits;
                    if write {
                        rep.written[(i / 64) as usize] |= 1 << (i % 64);
                    }
                }
                Err(e) => {
                    if rep.errors.len() < 4 {
                        rep.errors.push(format!("gfn {:#x}: {e}", first_gfn + i));
                    }
                }
            }
        }
        self.exit_guest();
        rep.end = Some(Instant::now());
        black_box(self.checksum);
        rep
    }
}
