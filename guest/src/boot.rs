//! PVH entry, descriptor tables, page tables, and the drop to CPL3.
//!
//! PVH enters us in 32-bit protected mode with paging off and `%ebx` holding
//! the physical address of `hvm_start_info`. Everything here runs at CPL0,
//! which a PVM host emulates instruction by instruction, so this file is kept
//! to a few dozen instructions: the tables are prebuilt by the assembler and
//! the code only loads them, enables long mode, calls `probe::cpl0_probe`
//! (the CPUID and kvmclock reads that must happen at CPL0, a few hundred
//! instructions) and `iretq`s to CPL3 with IOPL=3 and IF=0 (port I/O
//! allowed, interrupts never enabled).
//!
//! Memory map seen by the guest: an identity map of 0..64 GiB, user-accessible,
//! 2 MiB pages up to 32 GiB (3-4 GiB uncached: the MMIO hole) and 1 GiB pages
//! above. A PVM host never got a CPL3 guest's first touch through a 1 GiB
//! page done (a working set reaching above 4 GiB hung its fill), so the
//! sizes Ferry runs here stay on 2 MiB pages.

core::arch::global_asm!(
    r#"
    .section .note.Xen, "a"
    .balign 4
    .long 4                 /* namesz: "Xen\0" */
    .long 4                 /* descsz */
    .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .long pvh_start32

    .section .text.boot, "ax"
    .code32
    .global pvh_start32
pvh_start32:
    movl %ebx, %esi                 /* hvm_start_info, passed on to guest_main */
    lgdt gdt_desc
    movl %cr4, %eax
    orl $0x620, %eax                /* PAE | OSFXSR | OSXMMEXCPT */
    movl %eax, %cr4
    movl $pml4, %eax
    movl %eax, %cr3
    movl $0xC0000080, %ecx          /* IA32_EFER */
    rdmsr
    orl $0x100, %eax                /* LME */
    wrmsr
    movl %cr0, %eax
    andl $0xFFFFFFFB, %eax          /* clear EM: SSE code must not trap */
    orl $0x80000023, %eax           /* PG | NE | MP | PE */
    movl %eax, %cr0
    ljmp $0x08, $start64

    .code64
start64:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movl $__stack_top, %esp         /* the iretq frame needs a stack */
    movl %esi, %ebx                 /* callee-saved across the probe */
    call cpl0_probe                 /* CPUID and kvmclock: see probe.rs */
    movl %ebx, %edi                 /* guest_main(start_info) */
    pushq $0x23                     /* SS: user data, RPL 3 */
    pushq $__stack_top - 8          /* RSP, ABI-aligned as if called */
    pushq $0x3002                   /* RFLAGS: IOPL=3, IF=0 */
    pushq $0x1b                     /* CS: user code64, RPL 3 */
    pushq $guest_main
    iretq

    .section .rodata
    .balign 16
gdt:
    .quad 0
    .quad 0x00af9b000000ffff        /* 0x08 kernel code64 */
    .quad 0x00cf93000000ffff        /* 0x10 kernel data */
    .quad 0x00affb000000ffff        /* 0x18 user code64, DPL 3 */
    .quad 0x00cff3000000ffff        /* 0x20 user data, DPL 3 */
gdt_end:
    .balign 4
gdt_desc:
    .word gdt_end - gdt - 1
    .long gdt

    .section .data.pagetables, "aw"
    .balign 4096
pml4:
    .quad pdpt + 0x7
    .fill 511, 8, 0
pdpt:
    .set pdn, 0
    .rept 32
    .quad pd + (pdn << 12) + 0x7
    .set pdn, pdn + 1
    .endr
    .set gib, 32
    .rept 32
    .quad (gib << 30) + 0x87        /* 1 GiB page, P | RW | US | PS */
    .set gib, gib + 1
    .endr
    .fill 448, 8, 0
pd:
    .set page2m, 0
    .rept 1536
    .quad (page2m << 21) + 0x87     /* 2 MiB page, P | RW | US | PS */
    .set page2m, page2m + 1
    .endr
    .rept 512
    .quad (page2m << 21) + 0x9f     /* ... plus PWT | PCD: the MMIO hole */
    .set page2m, page2m + 1
    .endr
    .rept 14336
    .quad (page2m << 21) + 0x87     /* 4-32 GiB: 2 MiB pages too */
    .set page2m, page2m + 1
    .endr

    .section .bss
    .balign 16
    .global __stack_top
__stack_bottom:
    .skip 65536
__stack_top:
"#,
    options(att_syntax)
);
