//! Shadow-page headers, the (gfn, role) hash and the oldest-first list (Linux
//! `struct kvm_mmu_page`, `mmu_page_hash`, `active_mmu_pages`).
//!
//! One header per frame of the table arena, indexed by the frame's number, so a table's
//! header is found in O(1) from its address (KVM `sptep_to_sp` / `to_shadow_page`). The
//! hash chains and the list are threaded through the headers, so neither a lookup nor an
//! insertion allocates: the fault path touches no heap.

extern crate alloc;

use alloc::vec::Vec;

use super::role::Role;
use crate::addr::{Gfn, Hpa};
use crate::rmap::RmapHead;

/// No page (end of a chain or list).
pub(crate) const NIL: u32 = u32::MAX;

/// A shadow page's header: which guest frames its table maps, in what role, and which
/// entries point at it.
#[derive(Clone, Debug)]
pub struct ShadowPage {
    pub(crate) gfn: Gfn,
    pub(crate) role: Role,
    pub(crate) parents: RmapHead,
    pub(crate) unsync: bool,
    pub(crate) live: bool,
    pub(crate) root: bool,
    pub(crate) hash_next: u32,
    pub(crate) lru_prev: u32,
    pub(crate) lru_next: u32,
    /// Next page on the list of pages being zapped (freed after the TLB flush).
    pub(crate) zap_next: u32,
    /// On a zap list already.
    pub(crate) queued: bool,
}

impl ShadowPage {
    const fn empty() -> Self {
        Self {
            gfn: Gfn::ZERO,
            role: Role::EMPTY,
            parents: RmapHead::EMPTY,
            unsync: false,
            live: false,
            root: false,
            hash_next: NIL,
            lru_prev: NIL,
            lru_next: NIL,
            zap_next: NIL,
            queued: false,
        }
    }

    /// The first guest frame the table maps (KVM `sp->gfn`).
    pub fn gfn(&self) -> Gfn {
        self.gfn
    }

    /// The page's role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The entries that point at this table (KVM `parent_ptes`).
    pub fn parents(&self) -> RmapHead {
        self.parents
    }

    /// Whether the page is out of sync with the guest table it shadows (only 4 KiB
    /// indirect pages; always false in direct mode).
    pub fn unsync(&self) -> bool {
        self.unsync
    }

    /// Whether the page is a root.
    pub fn is_root(&self) -> bool {
        self.root
    }
}

/// Every header, the hash and the oldest-first list.
pub(crate) struct Pages {
    headers: Vec<ShadowPage>,
    buckets: Vec<u32>,
    hash_shift: u32,
    phys_base: u64,
    /// Newest page.
    lru_head: u32,
    /// Oldest page.
    lru_tail: u32,
    used: usize,
}

impl Pages {
    /// Headers for `frames` tables starting at `phys_base`, and `buckets` hash buckets
    /// (rounded up to a power of two). `None` when the allocation fails.
    pub(crate) fn new(frames: usize, buckets: usize, phys_base: u64) -> Option<Self> {
        let buckets = buckets.clamp(1, 1 << 24).next_power_of_two();
        let mut headers = Vec::new();
        headers.try_reserve_exact(frames).ok()?;
        headers.resize(frames, ShadowPage::empty());
        let mut table = Vec::new();
        table.try_reserve_exact(buckets).ok()?;
        table.resize(buckets, NIL);
        Some(Self {
            headers,
            buckets: table,
            hash_shift: 64 - buckets.trailing_zeros(),
            phys_base,
            lru_head: NIL,
            lru_tail: NIL,
            used: 0,
        })
    }

    /// Live pages.
    pub(crate) fn used(&self) -> usize {
        self.used
    }

    /// The page id of a table address (its frame number in the arena).
    pub(crate) fn id_of(&self, table: Hpa) -> Option<u32> {
        let off = table.get().checked_sub(self.phys_base)?;
        if off % crate::addr::PAGE_SIZE != 0 {
            return None;
        }
        let id = off / crate::addr::PAGE_SIZE;
        if id >= self.headers.len() as u64 {
            return None;
        }
        Some(id as u32)
    }

    /// The id of a live page's table.
    pub(crate) fn live_id(&self, table: Hpa) -> Option<u32> {
        self.id_of(table)
            .filter(|&id| self.headers[id as usize].live)
    }

    /// The table address of a page id.
    pub(crate) fn table_of(&self, id: u32) -> Hpa {
        crate::spt::hpa(self.phys_base + u64::from(id) * crate::addr::PAGE_SIZE)
    }

    pub(crate) fn get(&self, id: u32) -> Option<&ShadowPage> {
        self.headers.get(id as usize)
    }

    pub(crate) fn get_mut(&mut self, id: u32) -> Option<&mut ShadowPage> {
        self.headers.get_mut(id as usize)
    }

    fn bucket(&self, gfn: Gfn) -> usize {
        // Fibonacci hashing: the top bits of the product. With one bucket the shift is 64,
        // which `>>` would refuse; `wrapping_shr` gives the whole product, masked to 0.
        (gfn.get()
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .wrapping_shr(self.hash_shift)) as usize
            & (self.buckets.len() - 1)
    }

    /// The live page for (gfn, role) (KVM `kvm_mmu_find_shadow_page`).
    pub(crate) fn lookup(&self, gfn: Gfn, role: Role) -> Option<u32> {
        let mut id = self.buckets[self.bucket(gfn)];
        // A chain is at most every header long; the bound keeps a corrupted chain finite.
        for _ in 0..=self.headers.len() {
            let sp = self.headers.get(id as usize)?;
            if sp.gfn == gfn && sp.role == role {
                return Some(id);
            }
            id = sp.hash_next;
        }
        None
    }

    /// Makes `id` a live page for (gfn, role): into its hash chain and at the head of the
    /// list (KVM `kvm_mmu_alloc_shadow_page`). Returns false when `id` is out of range or
    /// already live.
    pub(crate) fn insert(&mut self, id: u32, gfn: Gfn, role: Role, root: bool) -> bool {
        let bucket = self.bucket(gfn);
        let head = self.buckets[bucket];
        let old_head = self.lru_head;
        let Some(sp) = self.headers.get_mut(id as usize) else {
            return false;
        };
        if sp.live {
            return false;
        }
        *sp = ShadowPage {
            gfn,
            role,
            root,
            live: true,
            hash_next: head,
            lru_next: old_head,
            ..ShadowPage::empty()
        };
        self.buckets[bucket] = id;
        match self.headers.get_mut(old_head as usize) {
            Some(next) => next.lru_prev = id,
            None => self.lru_tail = id,
        }
        self.lru_head = id;
        self.used += 1;
        true
    }

    /// Takes a live page out of the hash and the list; its header stays readable (dead)
    /// until the id is reused.
    pub(crate) fn remove(&mut self, id: u32) {
        let Some(sp) = self.headers.get(id as usize) else {
            return;
        };
        if !sp.live {
            return;
        }
        let (gfn, hash_next, prev, next) = (sp.gfn, sp.hash_next, sp.lru_prev, sp.lru_next);
        let bucket = self.bucket(gfn);
        if self.buckets[bucket] == id {
            self.buckets[bucket] = hash_next;
        } else {
            let mut cur = self.buckets[bucket];
            for _ in 0..=self.headers.len() {
                let Some(sp) = self.headers.get_mut(cur as usize) else {
                    break;
                };
                if sp.hash_next == id {
                    sp.hash_next = hash_next;
                    break;
                }
                cur = sp.hash_next;
            }
        }
        match self.headers.get_mut(prev as usize) {
            Some(p) => p.lru_next = next,
            None => self.lru_head = next,
        }
        match self.headers.get_mut(next as usize) {
            Some(n) => n.lru_prev = prev,
            None => self.lru_tail = prev,
        }
        if let Some(sp) = self.headers.get_mut(id as usize) {
            sp.live = false;
            sp.hash_next = NIL;
            sp.lru_prev = NIL;
            sp.lru_next = NIL;
        }
        self.used -= 1;
    }

    /// The oldest live page that is not a root, starting the search after `after` (NIL:
    /// from the oldest).
    pub(crate) fn oldest_non_root(&self, after: u32) -> Option<u32> {
        let mut id = match self.headers.get(after as usize) {
            Some(sp) => sp.lru_prev,
            None => self.lru_tail,
        };
        for _ in 0..=self.headers.len() {
            let sp = self.headers.get(id as usize)?;
            if !sp.root {
                return Some(id);
            }
            id = sp.lru_prev;
        }
        None
    }

    /// Live page ids, newest first.
    pub(crate) fn live_ids(&self) -> impl Iterator<Item = u32> + '_ {
        let mut id = self.lru_head;
        let mut left = self.used;
        core::iter::from_fn(move || {
            if left == 0 {
                return None;
            }
            let sp = self.headers.get(id as usize)?;
            left -= 1;
            let this = id;
            id = sp.lru_next;
            Some(this)
        })
    }

    /// Every header slot (live or not), for the invariant check.
    pub(crate) fn headers(&self) -> &[ShadowPage] {
        &self.headers
    }

    /// Hash buckets, for the invariant check.
    pub(crate) fn bucket_heads(&self) -> &[u32] {
        &self.buckets
    }

    pub(crate) fn bucket_of(&self, gfn: Gfn) -> usize {
        self.bucket(gfn)
    }
}
