//! `hvm_start_info`, the boot information QEMU's PVH loader hands the guest in `ebx`
//! (Xen's `xen/include/public/arch-x86/hvm/start_info.h`): the memory map and the command line.
//!
//! Layout (little-endian): 0 magic (0x336ec578), 4 version, 8 flags, 12 nr_modules,
//! 16 modlist_paddr, 24 cmdline_paddr, 32 rsdp_paddr, 40 memmap_paddr, 48 memmap_entries
//! (version >= 1). A memory map entry is 24 bytes: addr u64, size u64, type u32, reserved u32;
//! the types are e820's.

use arrayvec::{ArrayString, ArrayVec};

use crate::phys;

const MAGIC: u32 = 0x336e_c578;
/// The most memory map entries kept (QEMU's microvm gives a handful).
pub const MAX_ENTRIES: usize = 32;

/// An e820 memory type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemType {
    /// 1: usable RAM.
    Ram,
    /// 2: reserved.
    Reserved,
    /// 3: ACPI tables, reclaimable.
    Acpi,
    /// 4: ACPI NVS.
    Nvs,
    /// 5: unusable.
    Unusable,
    /// Anything else.
    Other(u32),
}

impl MemType {
    fn from_raw(t: u32) -> Self {
        match t {
            1 => Self::Ram,
            2 => Self::Reserved,
            3 => Self::Acpi,
            4 => Self::Nvs,
            5 => Self::Unusable,
            t => Self::Other(t),
        }
    }
}

/// One memory map entry.
#[derive(Clone, Copy, Debug)]
pub struct Region {
    /// First byte.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// Its type.
    pub kind: MemType,
}

impl Region {
    /// The first byte after the region (saturating).
    pub fn end(&self) -> u64 {
        self.start.saturating_add(self.len)
    }
}

/// What the kernel keeps of `hvm_start_info`.
pub struct BootInfo {
    /// The memory map, as given (entries past [`MAX_ENTRIES`] are dropped).
    pub memmap: ArrayVec<Region, MAX_ENTRIES>,
    /// The command line (printable ASCII, cut at 256 bytes).
    pub cmdline: ArrayString<256>,
}

/// Why the boot information was refused.
#[derive(Clone, Copy, Debug)]
pub enum BootInfoError {
    /// The magic is wrong (or the address unreadable).
    BadMagic,
    /// Version 0 has no memory map.
    NoMemoryMap,
}

impl BootInfo {
    /// Parses the structure at `pa`.
    pub fn parse(pa: u64) -> Result<Self, BootInfoError> {
        if phys::read_u32(pa) != Some(MAGIC) {
            return Err(BootInfoError::BadMagic);
        }
        let version = phys::read_u32(pa + 4).unwrap_or(0);
        if version < 1 {
            return Err(BootInfoError::NoMemoryMap);
        }
        let mut memmap = ArrayVec::new();
        let map = phys::read_u64(pa + 40).unwrap_or(0);
        let entries = phys::read_u32(pa + 48).unwrap_or(0);
        for i in 0..u64::from(entries).min(MAX_ENTRIES as u64) {
            let e = map + i * 24;
            let (Some(start), Some(len), Some(kind)) = (
                phys::read_u64(e),
                phys::read_u64(e + 8),
                phys::read_u32(e + 16),
            ) else {
                break;
            };
            if len == 0 {
                continue;
            }
            memmap.push(Region {
                start,
                len,
                kind: MemType::from_raw(kind),
            });
        }
        let mut cmdline = ArrayString::new();
        let cmd = phys::read_u64(pa + 24).unwrap_or(0);
        if cmd != 0 {
            for i in 0..256 {
                match phys::read_u8(cmd + i) {
                    Some(b @ 0x20..=0x7e) => {
                        let _ = cmdline.try_push(char::from(b));
                    }
                    _ => break,
                }
            }
        }
        Ok(Self { memmap, cmdline })
    }

    /// The RAM regions.
    pub fn ram(&self) -> impl Iterator<Item = &Region> + '_ {
        self.memmap.iter().filter(|r| r.kind == MemType::Ram)
    }
}
