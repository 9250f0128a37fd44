//! What the guest runs: the memory layout, the GDT, the IDT and the hand-assembled code.
//!
//! Guest-physical layout (identity mapped, so guest-virtual = guest-physical):
//!
//! ```text
//! 0x0000_1000  GDT: null, 64-bit code (0x08), data (0x10), 64-bit TSS (0x18, 16 bytes)
//! 0x0000_2000  IDT: 32 interrupt gates; #PF (14) -> PF_HANDLER, the others -> their stub
//! 0x0000_3000  TSS (zero; only its descriptor matters, no privilege changes happen)
//! 0x0000_4000  code: the pattern loop, the #PF handler, 32 exception stubs
//! 0x0000_8000  stack, growing down from 0x1_0000
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
/// rdx = seed, r8 = a page to skip (or an address no page has).
/// Every page gets `page ^ seed` in its first word and `!(page ^ seed)` in its last word;
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

/// The #PF handler (IDT vector 14). On entry the CPU has pushed the error code at [rsp]
/// and the faulting RIP at [rsp + 8].
#[rustfmt::skip]
const PF_STUB: [u8; 15] = [
    0x0f, 0x20, 0xd0,                         // mov  rax, cr2
    0x48, 0x8b, 0x1c, 0x24,                   // mov  rbx, [rsp]
    0x48, 0x8b, 0x4c, 0x24, 0x08,             // mov  rcx, [rsp+8]
    0xe6, 0x12,                               // out  PORT_PAGE_FAULT, al
    0xf4,                                     // hlt
];

/// Where the #PF handler is loaded.
pub const PF_HANDLER: u64 = CODE + 0x100;
/// Where the stub of vector 0 is loaded; vector `v` is at `STUBS + 8 * v`.
const STUBS: u64 = CODE + 0x200;

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
fn interrupt_gate(handler: u64) -> [u8; 16] {
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
}

/// Size of the IDT in bytes (32 gates).
pub const IDT_BYTES: u16 = 32 * 16;
/// Size of the GDT in bytes.
pub const GDT_BYTES: u16 = 5 * 8;

/// The pattern the guest writes into the first word of `page`.
pub fn pattern(page: u64, seed: u64) -> u64 {
    page ^ seed
}

/// The pattern the guest writes into the last word of `page`.
pub fn pattern_last(page: u64, seed: u64) -> u64 {
    !(page ^ seed)
}
