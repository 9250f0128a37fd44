//! What the guest runs: the memory layout, the GDT, the IDT and the hand-assembled code.
//!
//! Guest-physical layout (identity mapped, so guest-virtual = guest-physical):
//!
//! ```text
//! 0x0000_1000  GDT: null, 64-bit code (0x08), data (0x10), 64-bit TSS (0x18, 16 bytes)
//! 0x0000_2000  IDT: 32 interrupt gates; #PF (14) -> PF_HANDLER, the others -> their stub
//! 0x0000_3000  TSS (zero; only its descriptor matters, no privilege changes happen)
//! 0x0000_4000  code: the pattern loop, the #PF handler, 32 exception stubs, the probe
//! 0x0000_8000  stack, growing down from 0x1_0000
//! 0x0001_0000  probe list: the pages the probe writes, one u64 each
//! 0x0002_0000  probe records, PROBE_RECORD bytes per listed page
//! 0x0020_0000  page tables, allocated by the table arena (size depends on RAM size)
//! tables end   test area: every 4 KiB page gets the pattern, up to the end of RAM
//! ```
//!
//! The code was assembled with GNU as (`as --64`, Intel syntax) and is listed next to its
//! bytes; the exit protocol is I/O port writes whose details the host reads from registers.

/// GDT base.
pub const GDT: u64 = 0x1000;
/// IDT base.
pub const IDT: u64 = 0x2000;
/// The TSS the task register names.
pub const TSS: u64 = 0x3000;
/// Where the code is loaded; execution starts at its first byte.
pub const CODE: u64 = 0x4000;
/// Initial stack pointer.
pub const STACK_TOP: u64 = 0x1_0000;
/// First byte past the system area (GDT, IDT, code, stack).
pub const SYSTEM_END: u64 = 2 << 20;

/// Selector of the 64-bit code segment.
pub const CODE_SEL: u16 = 0x08;
/// Selector of the data segment.
pub const DATA_SEL: u16 = 0x10;
/// Selector of the TSS.
pub const TSS_SEL: u16 = 0x18;

/// Port written when every page of the range held its pattern. rax = end, r9 = pages checked.
pub const PORT_DONE: u16 = 0x10;
/// Port written on a pattern mismatch. rax = address, rbx = found, rcx = expected.
pub const PORT_MISMATCH: u16 = 0x11;
/// Port written by the #PF handler. rax = CR2, rbx = error code, rcx = faulting RIP.
pub const PORT_PAGE_FAULT: u16 = 0x12;
/// Port written by any other exception stub; the byte written is the vector.
pub const PORT_EXCEPTION: u16 = 0x13;

/// The pattern loop. In: rdi = start, rsi = end (exclusive, both 4 KiB aligned),
/// rdx = salt, r8 = a page to skip (or an address no page has).
/// Every page gets `page ^ salt` in its first word and `!(page ^ salt)` in its last word;
/// a second pass reads all of them back.
#[rustfmt::skip]
const MAIN: [u8; 0x68] = [
    0x45, 0x31, 0xc9,                         // 00 xor  r9d, r9d
    0x48, 0x89, 0xf8,                         // 03 mov  rax, rdi
                                              //    write_loop:
    0x4c, 0x39, 0xc0,                         // 06 cmp  rax, r8
    0x74, 0x13,                               // 09 je   write_next (1e)
    0x48, 0x89, 0xc1,                         // 0b mov  rcx, rax
    0x48, 0x31, 0xd1,                         // 0e xor  rcx, rdx
    0x48, 0x89, 0x08,                         // 11 mov  [rax], rcx        <- WRITE_RIP
    0x48, 0xf7, 0xd1,                         // 14 not  rcx
    0x48, 0x89, 0x88, 0xf8, 0x0f, 0x00, 0x00, // 17 mov  [rax+0xff8], rcx
                                              //    write_next:
    0x48, 0x05, 0x00, 0x10, 0x00, 0x00,       // 1e add  rax, 0x1000
    0x48, 0x39, 0xf0,                         // 24 cmp  rax, rsi
    0x72, 0xdd,                               // 27 jb   write_loop (06)
    0x48, 0x89, 0xf8,                         // 29 mov  rax, rdi
                                              //    read_loop:
    0x4c, 0x39, 0xc0,                         // 2c cmp  rax, r8
    0x74, 0x20,                               // 2f je   read_next (51)
    0x48, 0x89, 0xc1,                         // 31 mov  rcx, rax
    0x48, 0x31, 0xd1,                         // 34 xor  rcx, rdx
    0x48, 0x8b, 0x18,                         // 37 mov  rbx, [rax]
    0x48, 0x39, 0xcb,                         // 3a cmp  rbx, rcx
    0x75, 0x26,                               // 3d jne  bad (65)
    0x48, 0xf7, 0xd1,                         // 3f not  rcx
    0x48, 0x8b, 0x98, 0xf8, 0x0f, 0x00, 0x00, // 42 mov  rbx, [rax+0xff8]
    0x48, 0x39, 0xcb,                         // 49 cmp  rbx, rcx
    0x75, 0x11,                               // 4c jne  bad_last (5f)
    0x49, 0xff, 0xc1,                         // 4e inc  r9
                                              //    read_next:
    0x48, 0x05, 0x00, 0x10, 0x00, 0x00,       // 51 add  rax, 0x1000
    0x48, 0x39, 0xf0,                         // 57 cmp  rax, rsi
    0x72, 0xd0,                               // 5a jb   read_loop (2c)
    0xe6, 0x10,                               // 5c out  PORT_DONE, al
    0xf4,                                     // 5e hlt
                                              //    bad_last:
    0x48, 0x05, 0xf8, 0x0f, 0x00, 0x00,       // 5f add  rax, 0xff8
                                              //    bad:
    0xe6, 0x11,                               // 65 out  PORT_MISMATCH, al
    0xf4,                                     // 67 hlt
];

/// Offset in `MAIN` of the first store of the write loop, the instruction that must fault.
pub const WRITE_RIP: u64 = CODE + 0x11;

/// The probe: for each page of a list, a read, a write, a read back, each recorded. It
/// proves write permission by the guest's own stores and #PF error codes (KVM_TRANSLATE's
/// `writeable` proves nothing: x86 KVM sets it to 1 for every address).
///
/// In: rdi = list of page addresses, rsi = count, rdx = salt, r10 = records (zeroed by the
/// host). Record `i` ([`ProbeRecord`]): CR2 and error code of a #PF at the probe's store (both
/// 0 when the store went through), the first word of page `i` before the store and after it.
/// The store writes `page ^ salt`. Exits through `PORT_DONE` with r9 = pages probed.
#[rustfmt::skip]
const PROBE: [u8; 0x2f] = [
    0x45, 0x31, 0xc9,                         // 00 xor  r9d, r9d
                                              //    probe_loop:
    0x49, 0x39, 0xf1,                         // 03 cmp  r9, rsi
    0x73, 0x24,                               // 06 jae  probe_done (2c)
    0x4a, 0x8b, 0x04, 0xcf,                   // 08 mov  rax, [rdi+r9*8]
    0x48, 0x8b, 0x18,                         // 0c mov  rbx, [rax]          read before
    0x49, 0x89, 0x5a, 0x10,                   // 0f mov  [r10+0x10], rbx
    0x48, 0x89, 0xc1,                         // 13 mov  rcx, rax
    0x48, 0x31, 0xd1,                         // 16 xor  rcx, rdx
    0x48, 0x89, 0x08,                         // 19 mov  [rax], rcx          <- PROBE_WRITE_RIP
    0x48, 0x8b, 0x18,                         // 1c mov  rbx, [rax]          read after
    0x49, 0x89, 0x5a, 0x18,                   // 1f mov  [r10+0x18], rbx
    0x49, 0x83, 0xc2, 0x20,                   // 23 add  r10, 0x20
    0x49, 0xff, 0xc1,                         // 27 inc  r9
    0xeb, 0xd7,                               // 2a jmp  probe_loop (03)
                                              //    probe_done:
    0xe6, 0x10,                               // 2c out  PORT_DONE, al
    0xf4,                                     // 2e hlt
];

/// Where the probe is loaded (after the exception stubs).
pub const PROBE_ENTRY: u64 = CODE + 0x300;
/// The probe's store: the one instruction whose #PF the handler records and steps over.
pub const PROBE_WRITE_RIP: u64 = PROBE_ENTRY + 0x19;
/// Length of that store (`mov [rax], rcx`, 48 89 08).
const PROBE_WRITE_LEN: u8 = 3;
/// Where the host puts the probe's list of pages.
pub const PROBE_LIST: u64 = 0x1_0000;
/// Where the probe writes its records.
pub const PROBE_RECORDS: u64 = 0x2_0000;
/// Bytes per probe record.
pub const PROBE_RECORD: u64 = 32;
/// Most pages one probe run takes (list and records stay below `SYSTEM_END`).
pub const PROBE_MAX: usize = 4096;

/// The #PF handler (IDT vector 14). On entry the CPU has pushed the error code at [rsp]
/// and the faulting RIP at [rsp + 8].
///
/// A fault at the probe's store is recorded and stepped over: the handler writes CR2 and the
/// error code into the record r10 points at, adds the store's known length to the saved RIP
/// and returns with `iretq`, so the probe goes on with its read back. That is the simplest
/// robust way to resume: it needs no decoding (only that one instruction is ever stepped
/// over, and its length is fixed) and no host round trip per fault, and a fault anywhere
/// else (the probe's reads, the pattern loop) still stops the guest and reports through
/// `PORT_PAGE_FAULT` with rax = CR2, rbx = error code, rcx = faulting RIP.
#[rustfmt::skip]
const PF_STUB: [u8; 0x3a] = [
    0x50,                                     // 00 push rax
    0x48, 0x8b, 0x44, 0x24, 0x10,             // 01 mov  rax, [rsp+0x10]    faulting RIP
    0x48, 0x3d,                               // 06 cmp  rax, PROBE_WRITE_RIP (imm32)
    PROBE_WRITE_RIP as u8, (PROBE_WRITE_RIP >> 8) as u8,
    (PROBE_WRITE_RIP >> 16) as u8, (PROBE_WRITE_RIP >> 24) as u8,
    0x75, 0x1c,                               // 0c jne  report (2a)
    0x0f, 0x20, 0xd0,                         // 0e mov  rax, cr2
    0x49, 0x89, 0x02,                         // 11 mov  [r10], rax
    0x48, 0x8b, 0x44, 0x24, 0x08,             // 14 mov  rax, [rsp+0x08]    error code
    0x49, 0x89, 0x42, 0x08,                   // 19 mov  [r10+0x08], rax
    0x48, 0x83, 0x44, 0x24, 0x10,             // 1d add  qword [rsp+0x10], PROBE_WRITE_LEN
    PROBE_WRITE_LEN,
    0x58,                                     // 23 pop  rax
    0x48, 0x83, 0xc4, 0x08,                   // 24 add  rsp, 8             drop the error code
    0x48, 0xcf,                               // 28 iretq
                                              //    report:
    0x58,                                     // 2a pop  rax
    0x0f, 0x20, 0xd0,                         // 2b mov  rax, cr2
    0x48, 0x8b, 0x1c, 0x24,                   // 2e mov  rbx, [rsp]
    0x48, 0x8b, 0x4c, 0x24, 0x08,             // 32 mov  rcx, [rsp+8]
    0xe6, 0x12,                               // 37 out  PORT_PAGE_FAULT, al
    0xf4,                                     // 39 hlt
];
const _: () = assert!(PROBE_WRITE_RIP < 1 << 31, "cmp's imm32 is sign-extended");
const _: () = assert!(PROBE_LIST + 8 * PROBE_MAX as u64 <= PROBE_RECORDS);
const _: () = assert!(PROBE_RECORDS + PROBE_RECORD * PROBE_MAX as u64 <= SYSTEM_END);

/// What the probe recorded for one page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeRecord {
    /// CR2 of the #PF at the store, 0 when the store did not fault.
    pub cr2: u64,
    /// The #PF error code, 0 when the store did not fault.
    pub error: u64,
    /// The page's first word, read before the store.
    pub before: u64,
    /// The page's first word, read after the store (or after the fault was stepped over).
    pub after: u64,
}

/// Writes `pages` as the probe's list and zeroes its records.
pub fn write_probe_list(ram: &super::ram::GuestRam, pages: &[u64]) {
    assert!(pages.len() <= PROBE_MAX, "{} pages to probe", pages.len());
    for (i, &p) in pages.iter().enumerate() {
        ram.write_u64(PROBE_LIST + 8 * i as u64, p);
        for w in 0..PROBE_RECORD / 8 {
            ram.write_u64(PROBE_RECORDS + PROBE_RECORD * i as u64 + 8 * w, 0);
        }
    }
}

/// The first `n` probe records.
pub fn probe_records(ram: &super::ram::GuestRam, n: usize) -> Vec<ProbeRecord> {
    (0..n as u64)
        .map(|i| {
            let at = PROBE_RECORDS + PROBE_RECORD * i;
            ProbeRecord {
                cr2: ram.read_u64(at),
                error: ram.read_u64(at + 8),
                before: ram.read_u64(at + 16),
                after: ram.read_u64(at + 24),
            }
        })
        .collect()
}

/// Where the #PF handler is loaded.
pub const PF_HANDLER: u64 = CODE + 0x100;
/// Where the stub of vector 0 is loaded; vector `v` is at `STUBS + 8 * v`.
const STUBS: u64 = CODE + 0x200;
const _: () = assert!(PF_HANDLER + PF_STUB.len() as u64 <= STUBS);
const _: () =
    assert!(STUBS + 8 * 32 <= PROBE_ENTRY && PROBE_ENTRY + PROBE.len() as u64 <= CODE + 0x1000);

/// The stub of any exception other than #PF: `mov al, v; out PORT_EXCEPTION, al; hlt`.
fn exception_stub(vector: u8) -> [u8; 8] {
    [
        0xb0,
        vector,
        0xe6,
        PORT_EXCEPTION as u8,
        0xf4,
        0x90,
        0x90,
        0x90,
    ] // nop padding
}

/// A 64-bit interrupt gate (present, DPL 0, type 0xE) to `handler` through `CODE_SEL`.
pub fn interrupt_gate(handler: u64) -> [u8; 16] {
    let mut g = [0u8; 16];
    g[0..2].copy_from_slice(&(handler as u16).to_le_bytes());
    g[2..4].copy_from_slice(&CODE_SEL.to_le_bytes());
    g[4] = 0; // IST 0: stay on the current stack
    g[5] = 0x8e; // P=1, DPL=0, type=0xE (64-bit interrupt gate)
    g[6..8].copy_from_slice(&((handler >> 16) as u16).to_le_bytes());
    g[8..12].copy_from_slice(&((handler >> 32) as u32).to_le_bytes());
    g
}

/// The GDT: null, code64, data, and the 16-byte TSS descriptor.
fn gdt() -> [u64; 5] {
    let tss_limit = 0x67u64;
    let tss_low = (tss_limit & 0xffff)
        | ((TSS & 0xff_ffff) << 16)
        | (0x8bu64 << 40) // P=1, DPL=0, type=0xB (busy 64-bit TSS)
        | (((TSS >> 24) & 0xff) << 56);
    [
        0,
        0x00af_9b00_0000_ffff, // code: G, L, P, DPL0, S, type 0xB (execute/read, accessed)
        0x00cf_9300_0000_ffff, // data: G, D/B, P, DPL0, S, type 0x3 (read/write, accessed)
        tss_low,
        TSS >> 32,
    ]
}

/// Loads the GDT, IDT, code and stubs into guest RAM.
pub fn load(ram: &super::ram::GuestRam) {
    for (i, d) in gdt().iter().enumerate() {
        ram.write_u64(GDT + 8 * i as u64, *d);
    }
    for v in 0..32u8 {
        let handler = if v == 14 {
            PF_HANDLER
        } else {
            STUBS + 8 * u64::from(v)
        };
        ram.write_bytes(IDT + 16 * u64::from(v), &interrupt_gate(handler));
        ram.write_bytes(STUBS + 8 * u64::from(v), &exception_stub(v));
    }
    ram.write_bytes(CODE, &MAIN);
    ram.write_bytes(PF_HANDLER, &PF_STUB);
    ram.write_bytes(PROBE_ENTRY, &PROBE);
}

/// Size of the IDT in bytes (32 gates).
pub const IDT_BYTES: u16 = 32 * 16;
/// Size of the GDT in bytes.
pub const GDT_BYTES: u16 = 5 * 8;

/// The pattern the guest writes into the first word of `page`.
pub fn pattern(page: u64, salt: u64) -> u64 {
    page ^ salt
}

/// The pattern the guest writes into the last word of `page`.
pub fn pattern_last(page: u64, salt: u64) -> u64 {
    !(page ^ salt)
}
