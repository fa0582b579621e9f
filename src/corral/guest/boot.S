/*
 * probe: boot headers, 32-bit entry points, long-mode switch, interrupt stubs, AP trampoline.
 *
 * The image is linked as x86-64 at 1 MiB and converted to ELF32 (QEMU's multiboot loader
 * refuses ELF64).  Two 32-bit entry points:
 *   mb_start   the ELF entry, used by Multiboot v1 (eax = 0x2BADB002, ebx = multiboot_info)
 *   pvh_start  named by the XEN_ELFNOTE_PHYS32_ENTRY note (ebx = struct hvm_start_info)
 * Both switch to long mode on the identity page tables below (first 4 GiB, 2 MiB pages, all
 * user-accessible), load the GDT/IDT/TSS and drop to ring 3 with IOPL=3 in kmain().  Ring-0
 * work is kept to a few hundred instructions because some hosts (PVM) emulate ring 0.
 */
#include "probe_asm.h"

/* ---------------------------------------------------------------- Multiboot v1 header */
        .section .multiboot, "a"
        .align 4
mb_header:
        .long MB_HEADER_MAGIC
        .long MB_HEADER_FLAGS
        .long -(MB_HEADER_MAGIC + MB_HEADER_FLAGS)

/* ---------------------------------------------------------------- PVH entry note */
        .section .note.Xen, "a"
        .align 4
        .long 4                         /* namesz: "Xen\0" */
        .long 4                         /* descsz: 32-bit entry address */
        .long 18                        /* XEN_ELFNOTE_PHYS32_ENTRY */
        .asciz "Xen"
        .long pvh_start

/* From 32-bit protected mode (flat data segments loaded, eax/ecx/edx free) into 64-bit code at
 * `target`: PAE, CR3 = the identity page tables, EFER.LME, then paging (caches on).  Used by the
 * boot CPU and, from the copy at TRAMP_ADDR, by the APs. */
.macro ENTER_LONG_MODE target
        movl %cr4, %eax
        orl $CR4_PAE, %eax
        movl %eax, %cr4
        movl $pml4, %eax
        movl %eax, %cr3
        movl $MSR_EFER, %ecx
        rdmsr
        orl $EFER_LME, %eax
        wrmsr
        movl %cr0, %eax
        orl $(CR0_PG | CR0_PE), %eax
        andl $~(CR0_CD | CR0_NW), %eax
        movl %eax, %cr0
        ljmp $SEL_KCODE, $\target
.endm

/* ---------------------------------------------------------------- 32-bit entry */
        .section .text.entry, "ax"
        .code32
        .globl mb_start
mb_start:
        cli
        cld
        movl $BOOT_MULTIBOOT, boot_kind
        jmp 1f

        .globl pvh_start
pvh_start:
        cli
        cld
        movl $BOOT_PVH, boot_kind
1:      movl %eax, boot_magic
        movl %ebx, boot_info
        lgdt gdt_ptr
        ljmp $SEL_CODE32, $2f
2:      movw $SEL_DATA32, %ax
        movw %ax, %ds
        movw %ax, %es
        movw %ax, %ss
        movw %ax, %fs
        movw %ax, %gs
        movl $kstack_top, %esp
        ENTER_LONG_MODE long64

        .code64
long64:
        movw $SEL_KDATA, %ax
        movw %ax, %ds
        movw %ax, %es
        movw %ax, %ss
        xorl %eax, %eax
        movw %ax, %fs
        movw %ax, %gs
        movq $kstack_top, %rsp
        call ring0_init                 /* IDT, TSS (C, a few hundred instructions) */
        /* iretq to ring 3 with IOPL=3 and interrupts on (sources stay masked until used) */
        pushq $SEL_UDATA
        pushq $ustack_top
        pushq $(RFLAGS_IOPL3 | RFLAGS_IF | 0x2)
        pushq $SEL_UCODE
        pushq $kmain
        iretq

/* ---------------------------------------------------------------- interrupt stubs */
        .text
        .code64

.macro ISR_NOERR vec
        .globl isr_\vec
isr_\vec:
        pushq $0
        pushq $\vec
        jmp isr_common
.endm
.macro ISR_ERR vec
        .globl isr_\vec
isr_\vec:
        pushq $\vec
        jmp isr_common
.endm

ISR_NOERR 0
ISR_NOERR 1
ISR_NOERR 2
ISR_NOERR 3
ISR_NOERR 4
ISR_NOERR 5
ISR_NOERR 6
ISR_NOERR 7
ISR_ERR   8
ISR_NOERR 9
ISR_ERR   10
ISR_ERR   11
ISR_ERR   12
ISR_ERR   13
ISR_ERR   14
ISR_NOERR 15
ISR_NOERR 16
ISR_ERR   17
ISR_NOERR 18
ISR_NOERR 19
ISR_NOERR 20
ISR_ERR   21
ISR_NOERR 22
ISR_NOERR 23
ISR_NOERR 24
ISR_NOERR 25
ISR_NOERR 26
ISR_NOERR 27
ISR_NOERR 28
ISR_ERR   29
ISR_ERR   30
ISR_NOERR 31

        .section .rodata
        .align 8
        .globl isr_table
isr_table:
        .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        .quad isr_\v
        .endr

        .text
isr_common:
        pushq %rax
        pushq %rbx
        pushq %rcx
        pushq %rdx
        pushq %rsi
        pushq %rdi
        pushq %rbp
        pushq %r8
        pushq %r9
        pushq %r10
        pushq %r11
        pushq %r12
        pushq %r13
        pushq %r14
        pushq %r15
        movq %rsp, %rdi
        movq %rsp, %rbx
        andq $~0xf, %rsp
        call exception_handler          /* returns only for a ring-3 service request */
        movq %rbx, %rsp
        popq %r15
        popq %r14
        popq %r13
        popq %r12
        popq %r11
        popq %r10
        popq %r9
        popq %r8
        popq %rbp
        popq %rdi
        popq %rsi
        popq %rdx
        popq %rcx
        popq %rbx
        popq %rax
        addq $16, %rsp                  /* vector, error code */
        iretq

/* LAPIC timer: count and EOI; kept to a handful of instructions (ring 0 may be emulated) */
        .globl timer_isr
timer_isr:
        pushq %rax
        lock incq timer_ticks
        movl $(LAPIC_BASE + LAPIC_EOI), %eax
        movl $0, (%rax)
        popq %rax
        iretq

        .globl spurious_isr
spurious_isr:
        iretq


/* ---------------------------------------------------------------- AP entry (64-bit) */
        .globl ap_long64
ap_long64:
        movw $SEL_KDATA, %ax
        movw %ax, %ds
        movw %ax, %es
        movw %ax, %ss
        movl $1, %eax
        lock xaddl %eax, ap_next_index  /* eax = this AP's index */
        movl %eax, %ebx
        cmpl $MAX_AP_STACKS, %eax
        jb 1f
        movl $(MAX_AP_STACKS - 1), %eax /* more APs than stacks: share the last one */
1:      incl %eax
        shll $AP_STACK_SHIFT, %eax
        movq $ap_stacks, %rsp
        addq %rax, %rsp
        lidt idt_ptr
        lock incl ap_arrived
        /* an exit bench on every vCPU: the first MAX_BENCH_CPUS-1 APs load the TSS the BSP
         * prepared for them (ring-0 stack, I/O bitmap) and drop to ring 3 in ap_bench_main */
        cmpl $0, ap_bench
        je 2f
        cmpl $(MAX_BENCH_CPUS - 1), %ebx
        jae 2f
        movl %ebx, %eax
        shll $4, %eax
        addl $SEL_AP_TSS, %eax
        ltr %ax
        leaq 1(%rbx), %rax
        shlq $AP_USTACK_SHIFT, %rax
        addq $ap_ustacks, %rax
        movl %ebx, %edi                 /* ap_bench_main(index) */
        pushq $SEL_UDATA
        pushq %rax
        pushq $(RFLAGS_IOPL3 | RFLAGS_IF | 0x2)
        pushq $SEL_UCODE
        pushq $ap_bench_main
        iretq
2:      cli
        hlt
        jmp 2b

/* ---------------------------------------------------------------- AP trampoline
 * Copied to TRAMP_ADDR (below 1 MiB, page aligned) and started by SIPI vector TRAMP_ADDR>>12
 * in real mode with CS = TRAMP_ADDR>>4, IP = 0.  Position-dependent on TRAMP_ADDR only.
 */
        .section .rodata
        .align 16
        .globl tramp_start, tramp_end
        .code16
tramp_start:
        cli
        cld
        movw %cs, %ax
        movw %ax, %ds
        lgdtl (tramp_gdtr - tramp_start)
        movl %cr0, %eax
        orl $CR0_PE, %eax
        movl %eax, %cr0
        ljmpl $SEL_CODE32, $(TRAMP_ADDR + (tramp32 - tramp_start))
        .code32
tramp32:
        movw $SEL_DATA32, %ax
        movw %ax, %ds
        movw %ax, %es
        movw %ax, %ss
        ENTER_LONG_MODE ap_long64
        .align 8
tramp_gdtr:
        .word gdt_end - gdt - 1
        .long gdt
tramp_end:
        .code64

/* ---------------------------------------------------------------- data */
        .data
        .align 8
        .globl boot_kind, boot_magic, boot_info
boot_kind:      .long 0
boot_magic:     .long 0
boot_info:      .long 0
        .long 0

        .align 16
        .globl gdt, gdt_end, gdt_tss
gdt:
        .quad 0                         /* 0x00 null */
        .quad 0x00AF9A000000FFFF        /* 0x08 kernel code, 64-bit */
        .quad 0x00CF92000000FFFF        /* 0x10 kernel data */
        .quad 0x00CFF2000000FFFF        /* 0x18 user data (DPL 3) */
        .quad 0x00AFFA000000FFFF        /* 0x20 user code, 64-bit (DPL 3) */
gdt_tss:
        .quad 0, 0                      /* 0x28 TSS (16 bytes), filled by ring0_init */
        .quad 0x00CF9A000000FFFF        /* 0x38 code, 32-bit */
        .quad 0x00CF92000000FFFF        /* 0x40 data, 32-bit */
        .globl gdt_ap_tss
gdt_ap_tss:
        .fill 2 * (MAX_BENCH_CPUS - 1), 8, 0 /* 0x48... the APs' TSSes, filled by ap_tss_init */
gdt_end:
        .align 8
        .word 0, 0, 0
gdt_ptr:
        .word gdt_end - gdt - 1
        .quad gdt

/* Identity page tables, built by the assembler: no ring-0 loop fills them.
 * PML4[0] -> PDPT; PDPT[0..3] -> pd0..pd3 (2 MiB pages covering 0..4 GiB, P|W|U|PS).
 * PDPT[4..511] stay empty until mem-touch maps RAM above 4 GiB (from ring 3). */
        .align 4096
        .globl pml4, pdpt, pd0
pml4:
        .quad pdpt + PTE_PWU
        .fill 511, 8, 0
pdpt:
        .quad pd0 + PTE_PWU
        .quad pd0 + 0x1000 + PTE_PWU
        .quad pd0 + 0x2000 + PTE_PWU
        .quad pd0 + 0x3000 + PTE_PWU
        .fill 508, 8, 0
pd0:
        .set i, 0
        .rept 2048
        .quad (i << 21) + PTE_PWU + PTE_PS
        .set i, i + 1
        .endr

/* ---------------------------------------------------------------- stacks */
        .bss
        .align 4096
        .globl ap_stacks, ap_ustacks, kstack_top, ustack_top
ap_stacks:
        .skip MAX_AP_STACKS << AP_STACK_SHIFT
ap_ustacks:
        .skip (MAX_BENCH_CPUS - 1) << AP_USTACK_SHIFT
kstack:
        .skip KSTACK_SIZE
kstack_top:
ustack:
        .skip USTACK_SIZE
ustack_top:
