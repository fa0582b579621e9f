/* probe: the ring-0 parts: IDT, TSS, exception report.  Kept tiny: ring 0 may be emulated. */
#include "probe.h"

struct idt_entry {
    u16 off_lo, sel;
    u8 ist, type;
    u16 off_mid;
    u32 off_hi, zero;
} __attribute__((packed));

struct tss64 {
    u32 reserved0;
    u64 rsp[3];
    u64 reserved1;
    u64 ist[7];
    u64 reserved2;
    u16 reserved3, iopb;
    /* I/O permission bitmap, all ports allowed, plus the terminating 0xFF byte: hosts that
     * do not honour IOPL=3 for ring 3 (PVM keeps the user-mode IOPL at 0) check this. */
    u8 iomap[8192 + 1];
} __attribute__((packed));

struct desc_ptr {
    u16 limit;
    u64 base;
} __attribute__((packed));

struct frame {
    u64 r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
    u64 vector, error, rip, cs, rflags, rsp, ss;
};

static struct idt_entry idt[256] __attribute__((aligned(16)));
static struct tss64 tss __attribute__((aligned(16)));
static struct tss64 ap_tss[MAX_BENCH_CPUS - 1] __attribute__((aligned(16)));
struct desc_ptr idt_ptr;
volatile u64 timer_ticks;
volatile u32 ap_arrived, ap_next_index, ap_bench;

extern u64 gdt_tss[2], gdt_ap_tss[2 * (MAX_BENCH_CPUS - 1)];
extern char ap_stacks[];
extern u64 isr_table[32];
extern char kstack_top[];
void timer_isr(void), spurious_isr(void);

static void set_gate(int vec, void (*fn)(void), int dpl)
{
    u64 a = (u64)fn;
    struct idt_entry *e = &idt[vec];
    e->off_lo = (u16)a;
    e->sel = SEL_KCODE;
    e->ist = 0;
    e->type = 0x8E | (dpl << 5);        /* present, 64-bit interrupt gate */
    e->off_mid = (u16)(a >> 16);
    e->off_hi = (u32)(a >> 32);
}

static void tss_fill(struct tss64 *t, u64 rsp0, u64 *desc);

void ring0_init(void)
{
    /* Mask both 8259s: ring 3 may run with interrupts on (PVM forces IF=1 there), and a
     * BIOS-programmed PIT tick through the PIC would arrive on an exception vector. */
    outb(0x21, 0xFF);
    outb(0xA1, 0xFF);
    for (int v = 0; v < 32; v++)
        set_gate(v, (void (*)(void))isr_table[v], 0);
    set_gate(VEC_TIMER, timer_isr, 0);
    set_gate(VEC_SPURIOUS, spurious_isr, 0);
    idt_ptr.limit = sizeof(idt) - 1;
    idt_ptr.base = (u64)idt;
    __asm__ volatile("lidt %0" : : "m"(idt_ptr));

    tss_fill(&tss, (u64)kstack_top, gdt_tss);
    __asm__ volatile("ltr %w0" : : "r"(SEL_TSS));
}

/* A TSS with ring-0 stack `rsp0` and every port allowed, and its GDT descriptor in `desc`. */
static void tss_fill(struct tss64 *t, u64 rsp0, u64 *desc)
{
    t->rsp[0] = rsp0;
    t->iopb = __builtin_offsetof(struct tss64, iomap);
    t->iomap[8192] = 0xFF;
    u64 base = (u64)t, limit = sizeof(*t) - 1;
    desc[0] = (limit & 0xffff) | ((base & 0xffffff) << 16) | (0x89UL << 40) |
              ((limit >> 16 & 0xf) << 48) | ((base >> 24 & 0xff) << 56);
    desc[1] = base >> 32;
}

/* The APs' TSSes for an exit bench on every vCPU (SEL_AP_TSS + 16 * index; the kernel stack is
 * the AP's own in ap_stacks). Plain memory writes: the BSP calls it from ring 3 before SIPI. */
void ap_tss_init(void)
{
    for (int i = 0; i < MAX_BENCH_CPUS - 1; i++)
        tss_fill(&ap_tss[i], (u64)ap_stacks + ((u64)(i + 1) << AP_STACK_SHIFT), &gdt_ap_tss[2 * i]);
}

static const char *const names[32] = {
    "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "CSO", "#TS", "#NP",
    "#SS", "#GP", "#PF", "?15", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP",
};

static int service_request(struct frame *f)
{
    const u8 *ip = (const u8 *)f->rip;
    if (f->vector != 6 || (f->cs & 3) != 3 || ip[0] != 0x0F || ip[1] != 0x0B ||
        memcmp(ip + 2, SERVICE_MARKER, 4))
        return 0;
    switch (f->rax) {
    case SYS_FLUSH_TLB: {
        u64 cr3;
        __asm__ volatile("mov %%cr3, %0; mov %0, %%cr3" : "=r"(cr3) : : "memory");
        f->rax = 0;
        break;
    }
    case SYS_TRIPLE_FAULT: {
        /* an empty IDT: #UD cannot be delivered -> #GP -> #DF -> shutdown (triple fault) */
        static const struct desc_ptr none = {0, 0};
        __asm__ volatile("lidt %0; ud2" : : "m"(none));
        break;
    }
    case SYS_HALT:
        for (;;)
            __asm__ volatile("cli; hlt");
    default:
        f->rax = (u64)-1;
    }
    f->rip += SERVICE_INSN_LEN;
    return 1;
}

void exception_handler(struct frame *f)
{
    if (service_request(f))
        return;
    u64 cr2;
    __asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
    const char *name = f->vector < 32 && names[f->vector] ? names[f->vector] : "?";
    kprintf("\nprobe: EXCEPTION vector=%lu (%s) error=0x%lx rip=0x%lx cs=0x%lx rflags=0x%lx "
            "rsp=0x%lx cr2=0x%lx\n", f->vector, name, f->error, f->rip, f->cs, f->rflags,
            f->rsp, cr2);
    kprintf("probe: rax=0x%lx rbx=0x%lx rcx=0x%lx rdx=0x%lx rsi=0x%lx rdi=0x%lx\n",
            f->rax, f->rbx, f->rcx, f->rdx, f->rsi, f->rdi);
    kprintf("RESULT exception=%lu\n", f->vector);
    guest_exit(EXIT_EXCEPTION);
}
