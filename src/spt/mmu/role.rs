//! The role of a shadow page: everything besides its gfn that decides whether two shadow
//! pages may be shared (Linux `union kvm_mmu_page_role`).

use core::fmt;

use crate::addr::Level;

/// Guest access rights carried down the tree (KVM `ACC_EXEC_MASK | ACC_WRITE_MASK |
/// ACC_USER_MASK`). A direct page has all three.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Access(u8);

impl Access {
    /// Execute.
    pub const EXEC: Self = Self(1);
    /// Write.
    pub const WRITE: Self = Self(2);
    /// User.
    pub const USER: Self = Self(4);
    /// All three: what a direct page (no guest tables above it) carries.
    pub const ALL: Self = Self(7);

    /// From the three bits; `None` when a higher bit is set.
    pub const fn from_bits(bits: u8) -> Option<Self> {
        if bits > 7 { None } else { Some(Self(bits)) }
    }

    /// The three bits.
    pub const fn bits(self) -> u8 {
        self.0
    }

    /// Whether every right of `other` is in `self`.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }
}

/// A shadow page's role, 32 bits (static-asserted), laid out like KVM's
/// `kvm_mmu_page_role`:
///
/// | bits  | field             | meaning |
/// |-------|-------------------|---------|
/// | 0–3   | `level`           | level of the table (1 = 4 KiB leaves) |
/// | 4     | `has_4_byte_gpte` | shadows 32-bit guest tables |
/// | 5–6   | `quadrant`        | which part of a 32-bit guest table this page shadows |
/// | 7     | `direct`          | maps gfns directly, no guest table behind it |
/// | 8–10  | `access`          | guest access rights ([`Access`]) |
/// | 11    | `invalid`         | obsolete root, to be freed when unused |
/// | 12    | `efer_nx`         | guest paging mode bits that change how a guest entry reads |
/// | 13    | `cr0_wp`          | |
/// | 14    | `smep_andnot_wp`  | |
/// | 15    | `smap_andnot_wp`  | |
/// | 16    | `ad_disabled`     | accessed/dirty bits not used |
/// | 17    | `guest_mode`      | the page belongs to a nested guest |
/// | 18    | `passthrough`     | a root or PAE page with no guest table of its own |
/// | 24–31 | `as_id`           | address space (KVM `smm`) |
///
/// Direct mode (this issue) only sets `level`, `direct`, `access` and `as_id`; the other
/// bits are here so pages that shadow a guest's own tables use the same type and the same
/// hash lookup.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(transparent)]
pub struct Role(u32);

static_assertions::assert_eq_size!(Role, u32);

const LEVEL: u32 = 0xf;
const HAS_4_BYTE_GPTE: u32 = 1 << 4;
const QUADRANT_SHIFT: u32 = 5;
const QUADRANT: u32 = 3 << QUADRANT_SHIFT;
const DIRECT: u32 = 1 << 7;
const ACCESS_SHIFT: u32 = 8;
const ACCESS: u32 = 7 << ACCESS_SHIFT;
const INVALID: u32 = 1 << 11;
const PASSTHROUGH: u32 = 1 << 18;
const AS_ID_SHIFT: u32 = 24;

impl Role {
    /// No role (a free header).
    pub(crate) const EMPTY: Self = Self(0);

    /// The role of a direct-mode root at `level` in address space `as_id`.
    pub const fn direct_root(level: Level, as_id: u8) -> Self {
        Self(
            level.get() as u32
                | DIRECT
                | ((Access::ALL.bits() as u32) << ACCESS_SHIFT)
                | ((as_id as u32) << AS_ID_SHIFT),
        )
    }

    /// The raw 32-bit word (what the hash lookup compares).
    pub const fn word(self) -> u32 {
        self.0
    }

    /// From a raw word; `None` when the level is not 1..=5 or the quadrant is set on a page
    /// that does not shadow 32-bit tables.
    pub const fn from_word(word: u32) -> Option<Self> {
        let level = word & LEVEL;
        if level == 0 || level > 5 || (word & QUADRANT != 0 && word & HAS_4_BYTE_GPTE == 0) {
            return None;
        }
        Some(Self(word))
    }

    /// The level of the table.
    pub const fn level(self) -> Level {
        match Level::new((self.0 & LEVEL) as u8) {
            Ok(level) => level,
            // `from_word` and the constructors only make levels 1..=5.
            Err(_) => Level::L1,
        }
    }

    /// Whether the page maps gfns directly.
    pub const fn direct(self) -> bool {
        self.0 & DIRECT != 0
    }

    /// The guest access rights the page's entries carry.
    pub const fn access(self) -> Access {
        Access(((self.0 & ACCESS) >> ACCESS_SHIFT) as u8)
    }

    /// Which quarter (or half) of a 32-bit guest table the page shadows.
    pub const fn quadrant(self) -> u8 {
        ((self.0 & QUADRANT) >> QUADRANT_SHIFT) as u8
    }

    /// Whether the page shadows 32-bit guest tables.
    pub const fn has_4_byte_gpte(self) -> bool {
        self.0 & HAS_4_BYTE_GPTE != 0
    }

    /// Whether the page is a root or PAE page with no guest table of its own.
    pub const fn passthrough(self) -> bool {
        self.0 & PASSTHROUGH != 0
    }

    /// Whether the page is an obsolete root.
    pub const fn invalid(self) -> bool {
        self.0 & INVALID != 0
    }

    /// The address space.
    pub const fn as_id(self) -> u8 {
        (self.0 >> AS_ID_SHIFT) as u8
    }

    /// The role of the page one level down, reached through an entry of this page (KVM
    /// `kvm_mmu_child_role`): the level drops by one, `passthrough` is cleared, `access`
    /// is the rights the guest entry grants (for a direct page, this page's own), and a
    /// direct page's children are direct. `direct_child` marks the child of an indirect
    /// page that maps a guest huge page with small pages (KVM sets `direct` there).
    /// For 32-bit guest tables `quadrant` says which part of the guest's table (1024
    /// four-byte entries) the child shadows; it is ignored otherwise. `None` at level 1 or
    /// for a quadrant above 3.
    pub const fn child(self, access: Access, direct_child: bool, quadrant: u8) -> Option<Self> {
        let level = self.0 & LEVEL;
        if level <= 1 || quadrant > 3 {
            return None;
        }
        let mut word = self.0 & !(LEVEL | PASSTHROUGH | ACCESS | QUADRANT);
        word |= level - 1;
        word |= (access.bits() as u32) << ACCESS_SHIFT;
        if direct_child {
            word |= DIRECT;
        }
        if word & HAS_4_BYTE_GPTE != 0 {
            word |= (quadrant as u32) << QUADRANT_SHIFT;
        }
        Some(Self(word))
    }

    /// The child role in direct mode: same everything, one level down.
    pub const fn direct_child(self) -> Option<Self> {
        self.child(self.access(), self.direct(), 0)
    }
}

impl fmt::Debug for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Role")
            .field("level", &self.level().get())
            .field("direct", &self.direct())
            .field("access", &self.access().bits())
            .field("quadrant", &self.quadrant())
            .field("as_id", &self.as_id())
            .field("word", &format_args!("{:#x}", self.0))
            .finish()
    }
}
