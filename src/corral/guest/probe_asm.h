/* Constants shared by boot.S and the C code. */
#ifndef PROBE_ASM_H
#define PROBE_ASM_H

#define MB_HEADER_MAGIC   0x1BADB002
#define MB_HEADER_FLAGS   0x00000003    /* page-align modules, want memory info; ELF layout */
#define MB_BOOT_MAGIC     0x2BADB002
#define PVH_START_MAGIC   0x336ec578

#define BOOT_MULTIBOOT    1
#define BOOT_PVH          2

/* GDT selectors */
#define SEL_KCODE   0x08
#define SEL_KDATA   0x10
#define SEL_UDATA   0x1B                /* 0x18 | RPL 3 */
#define SEL_UCODE   0x23                /* 0x20 | RPL 3 */
#define SEL_TSS     0x28
#define SEL_CODE32  0x38
#define SEL_DATA32  0x40
#define SEL_AP_TSS  0x48                /* the APs' TSSes, 16 bytes each (exit benches) */

#define CR0_PE      0x00000001
#define CR0_NW      0x20000000
#define CR0_CD      0x40000000
#define CR0_PG      0x80000000
#define CR4_PAE     0x00000020
#define MSR_EFER    0xC0000080
#define EFER_LME    0x00000100
#define RFLAGS_IF   0x00000200
#define RFLAGS_IOPL3 0x00003000

#define PTE_PWU     0x7                 /* present, writable, user */
#define PTE_PS      0x80                /* 2 MiB page */

#define LAPIC_BASE  0xFEE00000
#define LAPIC_EOI   0xB0

#define TRAMP_ADDR  0x70000             /* AP real-mode trampoline page (SIPI vector 0x70) */

#define KSTACK_SIZE 16384
#define USTACK_SIZE 32768
#define MAX_AP_STACKS 64
#define AP_STACK_SHIFT 12               /* 4 KiB per AP: its ring-0 stack (exceptions, halt) */
#define MAX_BENCH_CPUS 8                /* vCPUs an exit bench runs on: the BSP and 7 APs */
#define AP_USTACK_SHIFT 12              /* 4 KiB ring-3 stack per benchmarking AP */

#define SYS_HALT      0
#define SYS_FLUSH_TLB 1
#define SYS_TRIPLE_FAULT 2

#define VEC_TIMER     0x40
#define VEC_SPURIOUS  0xFF

#endif
