//! The PVH entry: from QEMU's 32-bit protected mode to Rust in 64-bit long mode.
//!
//! QEMU's PVH loader (on `-M microvm` through qboot) finds the entry point in the ELF note
//! `XEN_ELFNOTE_PHYS32_ENTRY` (type 18, name "Xen") and jumps to it in 32-bit protected mode
//! with paging off, flat segments, and `ebx` = the physical address of `hvm_start_info`
//! (Xen's `arch-x86/hvm/start_info.h`). The stub below:
//! 1. zeroes `.bss` (the boot tables and the stack live there);
//! 2. builds static identity tables for the first 4 GiB with 2 MiB pages (one PML4, one
//!    PDPT, four page directories): enough for the image, RAM, and the virtio-mmio window
//!    at 0xfeb00000 until [`crate::paging`] switches to tables built with `hvmem::spt`;
//! 3. loads a GDT with a 64-bit code segment, enables PAE, sets EFER.LME (and NXE),
//!    loads CR3, enables paging (CR0.PG, with WP), and far-returns into 64-bit code;
//! 4. sets up the data segments and a 64 KiB stack, and calls [`crate::kmain`] with the
//!    `hvm_start_info` address in `rdi`.
//!
//! The note's descriptor is 8 bytes (a `.quad`), as Linux emits it for a 64-bit image:
//! QEMU 7.2's `read_pvh_start_addr` reads a host `size_t` from an ELF64 note.

core::arch::global_asm!(
    r#"
    .section .note.Xen, "a"
    .balign 4
    .long 4                 /* n_namesz: "Xen\0" */
    .long 8                 /* n_descsz */
    .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .quad pvh_start
    .balign 4

    .section .text.boot, "ax"
    .code32
    .global pvh_start
pvh_start:
    cli
    cld
    /* ebx holds the hvm_start_info address: keep it untouched until kmain. */
    mov edi, offset __bss_start
    mov ecx, offset __bss_end
    sub ecx, edi
    shr ecx, 2
    xor eax, eax
    rep stosd

    /* PML4[0] -> PDPT; PDPT[0..4] -> PD0..PD3; PDn[i] = (n*512 + i) * 2 MiB | PS|RW|P. */
    mov eax, offset boot_pdpt
    or eax, 3
    mov dword ptr [boot_pml4], eax
    mov edi, offset boot_pdpt
    mov eax, offset boot_pd
    or eax, 3
    mov ecx, 4
.Lpdpt_loop:
    mov dword ptr [edi], eax
    add eax, 4096
    add edi, 8
    loop .Lpdpt_loop
    mov edi, offset boot_pd
    mov eax, 0x83
    xor edx, edx
    mov ecx, 2048
.Lpd_loop:
    mov dword ptr [edi], eax
    mov dword ptr [edi + 4], edx
    add eax, 0x200000
    adc edx, 0
    add edi, 8
    loop .Lpd_loop

    lgdt [boot_gdt_ptr]
    mov eax, cr4
    or eax, 1 << 5          /* PAE */
    mov cr4, eax
    mov eax, offset boot_pml4
    mov cr3, eax
    mov ecx, 0xC0000080     /* IA32_EFER */
    rdmsr
    or eax, (1 << 8) | (1 << 11) /* LME, NXE */
    wrmsr
    mov eax, cr0
    or eax, (1 << 31) | (1 << 16) | 1 /* PG, WP, PE */
    mov cr0, eax
    push 0x08
    mov eax, offset long_mode
    push eax
    retf

    .code64
long_mode:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    xor eax, eax
    mov fs, ax
    mov gs, ax
    mov rsp, offset boot_stack_top
    xor ebp, ebp
    mov edi, ebx
    call {kmain}
.Lhalt:
    hlt
    jmp .Lhalt

    .section .rodata
    .balign 16
boot_gdt:
    .quad 0
    .quad 0x00af9a000000ffff /* 0x08: 64-bit code */
    .quad 0x00cf92000000ffff /* 0x10: data */
boot_gdt_end:
boot_gdt_ptr:
    .word boot_gdt_end - boot_gdt - 1
    .long boot_gdt

    .section .bss.boot, "aw", @nobits
    .balign 4096
boot_pml4:
    .skip 4096
boot_pdpt:
    .skip 4096
boot_pd:
    .skip 4 * 4096
boot_stack:
    .skip 64 * 1024
boot_stack_top:
"#,
    kmain = sym crate::kmain,
);
