//! The dirty-logging guest: a program that writes pseudo-random pages of a test region and
//! keeps a ground-truth list of them, a #PF handler that exits to the host on every fault,
//! and the host loop that hands each fault to a [`GuestMmu`] and resumes the guest.
//!
//! Guest-virtual layout (on top of [`guest`]'s system area, which the MMU maps identity):
//!
//! ```text
//! 0x0000_5000  the logging program (LOG_ENTRY) and its #PF handler (LOG_PF_HANDLER)
//! 0x0004_0000  ground-truth list: the address of every page the program wrote, one u64 each
//! 0x4000_0000  the test region, REGION_PAGES pages (the MMU maps it to guest-physical pages
//!              of its choice, and logs writes to it)
//! ```
//!
//! The list lives in the system area, outside the logged region, so its own stores never
//! show up in the log; the host reads it straight from guest-physical memory (the system
//! area is identity mapped).
//!
//! Exit protocol (I/O port writes, details in registers the host reads with `KVM_GET_REGS`):
//! [`PORT_LOG_FAULT`] from the #PF handler with rax = CR2, rbx = error code, rcx = faulting
//! RIP; after the host handled the fault, `KVM_RUN` continues the handler after its `out`: it
//! restores its registers, drops the error code and `iretq`s to the faulting instruction,
//! which runs again. [`PORT_LOG_DONE`] ends the program with r9 = list entries written.
//! Any other exception ends at [`guest::PORT_EXCEPTION`].
//!
//! The code was assembled with GNU as (`as --64`, Intel syntax) and is listed next to its
//! bytes.

use hvmem::spt::{FlushRange, TlbFlush};
use kvm_bindings::kvm_regs;

use super::guest;
use super::machine::Machine;
use super::ram::{GuestRam, PAGE};

/// What the dirty-logging harness needs from an MMU that builds the guest's page tables
/// (direct mode: guest-virtual page → guest-physical page, the "gfn → pfn" of a shadow MMU
/// whose output addresses are the KVM guest's physical memory).
///
/// Every method that changes the tables gets a [`TlbFlush`] to ask for the flushes it
/// needs; the harness counts them and, separately, reloads the memslot after every call (a
/// KVM that shadows guest tables sees host edits of them only after a reload, flush or not).
///
/// The methods take `&mut self` and answer `String` errors so that a thin adapter can wrap
/// an MMU with its own slots, error types and `&self` methods.
pub trait GuestMmu {
    /// CR3: the guest-physical address of the root table (in guest RAM).
    fn root(&self) -> u64;
    /// A #PF the guest took at `gva` (CR2), `write` = the error code's W bit. `Ok` when the
    /// access may now succeed; `Err` when the MMU refuses (the test fails).
    fn fault<T: TlbFlush>(&mut self, gva: u64, write: bool, tlb: &mut T) -> Result<(), String>;
    /// Starts dirty logging of the test region. `initially_set`: the log starts with every
    /// page of the region dirty (KVM `KVM_DIRTY_LOG_INITIALLY_SET`).
    fn enable_log<T: TlbFlush>(&mut self, initially_set: bool, tlb: &mut T) -> Result<(), String>;
    /// The addresses (gva) of the logging units (4 KiB pages, or larger blocks for a
    /// coarser log) written since the last call (or since logging was enabled), each once,
    /// in any order; they are write-protected again before it returns.
    fn get_and_clear_log<T: TlbFlush>(&mut self, tlb: &mut T) -> Result<Vec<u64>, String>;
}

/// Where the logging program is loaded.
pub const LOG_ENTRY: u64 = guest::CODE + 0x1000;
/// Where its #PF handler is loaded.
pub const LOG_PF_HANDLER: u64 = LOG_ENTRY + 0x100;
/// The ground-truth list.
pub const LIST: u64 = 0x4_0000;
/// Most writes one round may do (the list stays below [`guest::SYSTEM_END`]).
pub const LIST_MAX: u64 = 4096;
/// First page of the test region (guest-virtual).
pub const REGION_BASE: u64 = 1 << 30;
/// Pages in the test region (a power of two: the program masks its random numbers).
pub const REGION_PAGES: u64 = 8192;
/// Port written when the program is done. r9 = list entries.
pub const PORT_LOG_DONE: u16 = 0x20;
/// Port written by the #PF handler. rax = CR2, rbx = error code, rcx = faulting RIP.
pub const PORT_LOG_FAULT: u16 = 0x21;

const _: () = assert!(REGION_PAGES.is_power_of_two());
const _: () = assert!(LIST + 8 * LIST_MAX <= guest::SYSTEM_END);
const _: () = assert!(LIST >= guest::STACK_TOP);

/// The logging program. In: rdi = region base, rsi = region pages - 1, rdx = xorshift64
/// state (non-zero), rcx = writes, r11 = reads, r8 = round number, r10 = list.
///
/// Until both counts are used up, each iteration does one write (while writes remain) and
/// one read (while reads remain), each at the page of the next xorshift64 number
/// (`x ^= x << 13; x ^= x >> 7; x ^= x << 17`, page = base + ((x & mask) << 12)). A write
/// stores `page + round` into the page's first word and then appends `page` to the list.
#[rustfmt::skip]
const LOG: [u8; 0x65] = [
    0x45, 0x31, 0xc9,                         // 00 xor  r9d, r9d
                                              //    loop:
    0x48, 0x85, 0xc9,                         // 03 test rcx, rcx
    0x74, 0x16,                               // 06 jz   no_write (1e)
    0xe8, 0x2c, 0x00, 0x00, 0x00,             // 08 call next_page (39)
    0x4a, 0x8d, 0x1c, 0x00,                   // 0d lea  rbx, [rax+r8]
    0x48, 0x89, 0x18,                         // 11 mov  [rax], rbx        <- the logged store
    0x4b, 0x89, 0x04, 0xca,                   // 14 mov  [r10+r9*8], rax   ground truth
    0x49, 0xff, 0xc1,                         // 18 inc  r9
    0x48, 0xff, 0xc9,                         // 1b dec  rcx
                                              //    no_write:
    0x4d, 0x85, 0xdb,                         // 1e test r11, r11
    0x74, 0x0b,                               // 21 jz   no_read (2e)
    0xe8, 0x11, 0x00, 0x00, 0x00,             // 23 call next_page (39)
    0x48, 0x8b, 0x18,                         // 28 mov  rbx, [rax]        <- the read
    0x49, 0xff, 0xcb,                         // 2b dec  r11
                                              //    no_read:
    0x48, 0x89, 0xc8,                         // 2e mov  rax, rcx
    0x4c, 0x09, 0xd8,                         // 31 or   rax, r11
    0x75, 0xcd,                               // 34 jnz  loop (03)
    0xe6, PORT_LOG_DONE as u8,                // 36 out  PORT_LOG_DONE, al
    0xf4,                                     // 38 hlt
                                              //    next_page:
    0x48, 0x89, 0xd0,                         // 39 mov  rax, rdx
    0x48, 0xc1, 0xe0, 0x0d,                   // 3c shl  rax, 13
    0x48, 0x31, 0xc2,                         // 40 xor  rdx, rax
    0x48, 0x89, 0xd0,                         // 43 mov  rax, rdx
    0x48, 0xc1, 0xe8, 0x07,                   // 46 shr  rax, 7
    0x48, 0x31, 0xc2,                         // 4a xor  rdx, rax
    0x48, 0x89, 0xd0,                         // 4d mov  rax, rdx
    0x48, 0xc1, 0xe0, 0x11,                   // 50 shl  rax, 17
    0x48, 0x31, 0xc2,                         // 54 xor  rdx, rax
    0x48, 0x89, 0xd0,                         // 57 mov  rax, rdx
    0x48, 0x21, 0xf0,                         // 5a and  rax, rsi
    0x48, 0xc1, 0xe0, 0x0c,                   // 5d shl  rax, 12
    0x48, 0x01, 0xf8,                         // 61 add  rax, rdi
    0xc3,                                     // 64 ret
];

/// Offset of the logged store in [`LOG`].
pub const LOG_WRITE_RIP: u64 = LOG_ENTRY + 0x11;
/// Offset of the read in [`LOG`].
pub const LOG_READ_RIP: u64 = LOG_ENTRY + 0x28;
/// Offset of the ground-truth store in [`LOG`].
pub const LOG_LIST_RIP: u64 = LOG_ENTRY + 0x14;

/// The #PF handler: exits to the host with CR2, the error code and the faulting RIP, then
/// (when the host resumes it) returns to the faulting instruction.
#[rustfmt::skip]
const LOG_PF: [u8; 0x1b] = [
    0x50,                                     // 00 push rax
    0x53,                                     // 01 push rbx
    0x51,                                     // 02 push rcx
    0x0f, 0x20, 0xd0,                         // 03 mov  rax, cr2
    0x48, 0x8b, 0x5c, 0x24, 0x18,             // 06 mov  rbx, [rsp+0x18]    error code
    0x48, 0x8b, 0x4c, 0x24, 0x20,             // 0b mov  rcx, [rsp+0x20]    faulting RIP
    0xe6, PORT_LOG_FAULT as u8,               // 10 out  PORT_LOG_FAULT, al
    0x59,                                     // 12 pop  rcx
    0x5b,                                     // 13 pop  rbx
    0x58,                                     // 14 pop  rax
    0x48, 0x83, 0xc4, 0x08,                   // 15 add  rsp, 8             drop the error code
    0x48, 0xcf,                               // 19 iretq
];
const _: () = assert!(LOG_ENTRY + LOG.len() as u64 <= LOG_PF_HANDLER);
const _: () = assert!(LOG_PF_HANDLER + LOG_PF.len() as u64 <= LOG_ENTRY + PAGE);
const _: () = assert!(LOG_ENTRY + PAGE <= guest::STACK_TOP - 0x1000);

/// Loads the program and its handler and points IDT vector 14 at the handler (after
/// [`guest::load`], which [`Machine::new`] did).
pub fn load(ram: &GuestRam) {
    ram.write_bytes(LOG_ENTRY, &LOG);
    ram.write_bytes(LOG_PF_HANDLER, &LOG_PF);
    ram.write_bytes(guest::IDT + 16 * 14, &guest::interrupt_gate(LOG_PF_HANDLER));
}

/// #PF error code bits (SDM vol. 3, "Interrupt 14—Page-Fault Exception").
pub const PF_P: u64 = 1 << 0;
/// The access was a write.
pub const PF_W: u64 = 1 << 1;

/// One run of the program.
#[derive(Debug, Clone, Copy)]
pub struct Round {
    /// Stored (added to the page address) by every write.
    pub number: u64,
    /// The xorshift64 state the program starts from (non-zero).
    pub seed: u64,
    /// Pages written (with repeats).
    pub writes: u64,
    /// Pages read (with repeats).
    pub reads: u64,
}

impl Round {
    /// The host's model of the program: the pages it writes and the pages it reads, in order.
    pub fn predict(&self) -> (Vec<u64>, Vec<u64>) {
        let mut x = self.seed;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            REGION_BASE + ((x & (REGION_PAGES - 1)) << 12)
        };
        let (mut w, mut r) = (Vec::new(), Vec::new());
        while (w.len() as u64) < self.writes || (r.len() as u64) < self.reads {
            if (w.len() as u64) < self.writes {
                w.push(next());
            }
            if (r.len() as u64) < self.reads {
                r.push(next());
            }
        }
        (w, r)
    }
}

/// A [`TlbFlush`] that only counts: the harness reloads the memslot after every MMU call
/// anyway, and checks with these counts that the MMU asked for a flush where it must.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CountingTlb {
    /// `flush_range` calls.
    pub ranges: u64,
    /// `flush_all` calls.
    pub all: u64,
}

impl CountingTlb {
    /// Flushes of either kind.
    pub fn total(&self) -> u64 {
        self.ranges + self.all
    }
}

impl TlbFlush for CountingTlb {
    fn flush_range(&mut self, _range: FlushRange) {
        self.ranges += 1;
    }

    fn flush_all(&mut self) {
        self.all += 1;
    }
}

/// Faults one guest run took, by kind.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Faults {
    /// Reads of a non-present page.
    pub read_not_present: u64,
    /// Writes to a non-present page.
    pub write_not_present: u64,
    /// Writes to a present, write-protected page.
    pub write_protected: u64,
    /// Not-present faults (read or write) whose address is in the test region.
    pub region_not_present: u64,
    /// Flushes the MMU asked for while handling them.
    pub flushes: u64,
}

impl Faults {
    /// All faults.
    pub fn total(&self) -> u64 {
        self.read_not_present + self.write_not_present + self.write_protected
    }
}

/// Runs `round` to completion, handing every #PF to `mmu` (and reloading the memslot after
/// each, so KVM sees the new tables). Returns the ground-truth list and the faults.
///
/// Fails on: a fault the MMU refuses; a fault with an error code other than a supervisor
/// data access (U, RSVD or I/D set: our tables are wrong); the same fault twice in a row (the
/// MMU's fix did not take); more faults than the round can need; any other exception.
pub fn run_round<M: GuestMmu>(
    m: &mut Machine,
    ram: &GuestRam,
    mmu: &mut M,
    round: &Round,
) -> Result<(Vec<u64>, Faults), String> {
    if round.writes > LIST_MAX || round.seed == 0 {
        return Err(format!("bad round {round:?}"));
    }
    m.start(kvm_regs {
        rip: LOG_ENTRY,
        rdi: REGION_BASE,
        rsi: REGION_PAGES - 1,
        rdx: round.seed,
        rcx: round.writes,
        r11: round.reads,
        r8: round.number,
        r10: LIST,
        ..Default::default()
    })?;
    // Each access can fault at most twice (read, then write-protect), plus the list pages.
    let limit = 2 * (round.writes + round.reads) + 16;
    let mut faults = Faults::default();
    let mut last = None;
    loop {
        let (port, byte, r) = m.resume()?;
        match port {
            PORT_LOG_DONE => {
                if r.r9 != round.writes {
                    return Err(format!("program wrote {} of {} pages", r.r9, round.writes));
                }
                let list = (0..round.writes)
                    .map(|i| ram.read_u64(LIST + 8 * i))
                    .collect();
                return Ok((list, faults));
            }
            PORT_LOG_FAULT => {
                let (cr2, error, rip) = (r.rax, r.rbx, r.rcx);
                if error & !(PF_P | PF_W) != 0 {
                    return Err(format!(
                        "#PF at {cr2:#x} (rip {rip:#x}) with error code {error:#x}: not a \
                         plain supervisor data access"
                    ));
                }
                if last == Some((cr2, error)) {
                    return Err(format!(
                        "#PF at {cr2:#x} (rip {rip:#x}, error {error:#x}) twice in a row: the \
                         MMU's fix did not take"
                    ));
                }
                last = Some((cr2, error));
                let write = error & PF_W != 0;
                match (error & PF_P != 0, write) {
                    (false, false) => faults.read_not_present += 1,
                    (false, true) => faults.write_not_present += 1,
                    (true, true) => faults.write_protected += 1,
                    (true, false) => {
                        return Err(format!(
                            "read of present page {cr2:#x} faulted (rip {rip:#x})"
                        ));
                    }
                }
                let in_region = (REGION_BASE..REGION_BASE + REGION_PAGES * PAGE).contains(&cr2);
                if error & PF_P == 0 && in_region {
                    faults.region_not_present += 1;
                }
                if faults.total() > limit {
                    return Err(format!("more than {limit} faults in {round:?}"));
                }
                let mut tlb = CountingTlb::default();
                mmu.fault(cr2, write, &mut tlb)
                    .map_err(|e| format!("MMU refused #PF at {cr2:#x} (rip {rip:#x}): {e}"))?;
                faults.flushes += tlb.total();
                m.flush_guest_tlb()?;
            }
            guest::PORT_EXCEPTION => {
                return Err(format!("exception {byte} at rip {:#x}", r.rip));
            }
            p => return Err(format!("write to unknown port {p:#x} at rip {:#x}", r.rip)),
        }
    }
}

/// Maps the whole system area (but page 0) by write faults, before the guest runs: the
/// code, GDT, IDT, TSS, stack and list must be present for a #PF to be delivered at all.
/// Returns the faults taken.
pub fn prefault_system<M: GuestMmu>(mmu: &mut M) -> Result<u64, String> {
    let mut tlb = CountingTlb::default();
    let mut n = 0;
    for page in (PAGE..guest::SYSTEM_END).step_by(PAGE as usize) {
        mmu.fault(page, true, &mut tlb)
            .map_err(|e| format!("prefault of {page:#x}: {e}"))?;
        n += 1;
    }
    Ok(n)
}
