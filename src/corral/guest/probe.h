/* probe: shared declarations. Freestanding: no libc. */
#ifndef PROBE_H
#define PROBE_H

#include "probe_asm.h"

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef long i64;
typedef unsigned long size_t;

#define NULL ((void *)0)
#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

/* Exit statuses written to the isa-debug-exit port */
#define EXIT_OK        0
#define EXIT_FAIL      1
#define EXIT_USAGE     2
#define EXIT_EXCEPTION 3

#define COM1       0x3F8
#define EXIT_PORT  0x501
#define PIO_BENCH_PORT 0x504
#define MMIO_BENCH_ADDR 0xD0000000UL
#define PIT_HZ     1193182UL

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }
static inline u16 inw(u16 port) { u16 v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
static inline void mmio_write32(u64 addr, u32 v) { *(volatile u32 *)addr = v; }
static inline u32 mmio_read32(u64 addr) { return *(volatile u32 *)addr; }
/* The exit benchmarks' loop: N exits of one kind (BENCH_PIO or BENCH_MMIO), on any vCPU. */
#define BENCH_PIO  1
#define BENCH_MMIO 2
static inline void exit_loop(int kind, u64 n)
{
    if (kind == BENCH_PIO)
        for (u64 i = 0; i < n; i++)
            outb(PIO_BENCH_PORT, (u8)i);
    else
        for (u64 i = 0; i < n; i++)
            mmio_write32(MMIO_BENCH_ADDR, (u32)i);
}
/* Ring 3 -> ring 0 service request: `ud2` followed by the marker SERVICE_MARKER, number in
 * rax.  (A software interrupt such as int $0x80 is not usable from ring 3 under PVM, where it
 * turns into #UD; a real #UD is delivered to our IDT everywhere.) */
#define SERVICE_MARKER "prb!"
#define SERVICE_INSN_LEN 6
static inline long syscall0(long nr)
{
    long ret;
    __asm__ volatile("ud2\n\t.ascii \"" SERVICE_MARKER "\"" : "=a"(ret) : "a"(nr) : "memory");
    return ret;
}
static inline int current_cpl(void)
{
    u16 cs;
    __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    return cs & 3;
}

/* lib.c */
void *memcpy(void *d, const void *s, size_t n);
void *memset(void *d, int c, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int str_eq(const char *a, const char *b);
void serial_init(void);
void serial_putc(char c);
void serial_puts(const char *s);
void kprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int parse_u64(const char *s, u64 *out);
int parse_size(const char *s, u64 *out);
void __attribute__((noreturn)) guest_exit(int status);

/* time.c */
extern u64 tsc_hz;
int pit_start(u16 count);
int pit_done(void);
int pit_wait(u16 count);
void tsc_calibrate(void);
void tsc_delay_us(u64 us);
int timer_pit(void);

/* main.c */
#define MAX_MEMMAP 64
struct mem_range { u64 addr, len; u32 type; };
extern struct mem_range memmap[MAX_MEMMAP];
extern int memmap_count;
extern u64 boot_rsdp;
extern u32 boot_kind, boot_magic, boot_info;
extern char _end[];
int is_ram_range(u64 start, u64 end);

/* chaos.c */
int scenario_chaos(int argc, char **argv);

/* smp.c */
int scenario_smp(int argc, char **argv);
int scenario_timer(int argc, char **argv);
int scenario_blk_check(int argc, char **argv);
int scenario_blk_bench(int argc, char **argv);
int scenario_blk_evidx(int argc, char **argv);
int scenario_net_evidx(int argc, char **argv);
int scenario_net_bench(int argc, char **argv);
int scenario_net_rx_bench(int argc, char **argv);
int scenario_gdb(int argc, char **argv);
void lapic_enable(void);
void lapic_quiet(void);
u32 lapic_id(void);
int madt_isa_irq(int irq, u32 *gsi, u64 *ioapic);
int bench_start_aps(int kind, u64 n);
void bench_go_and_wait(void);
void __attribute__((noreturn)) ap_bench_main(u64 index);

/* virtio.c: modern virtio-pci devices from ring 3, polled (rings of at most QSIZE entries) */
#define QSIZE 128
#define DESC_NEXT 1
#define DESC_WRITE 2
#define BUF_BASE (32ul << 20)   /* request buffers: 32 MiB up (needs 64 MiB of RAM) */
struct vq_desc { u64 addr; u32 len; u16 flags, next; };
struct vq_used_elem { u32 id, len; };
struct vq {
    struct vq_desc desc[QSIZE] __attribute__((aligned(4096)));
    struct { u16 flags, idx, ring[QSIZE], used_event; } avail __attribute__((aligned(4096)));
    struct { u16 flags, idx; struct vq_used_elem ring[QSIZE]; u16 avail_event; } used
        __attribute__((aligned(4096)));
    u64 notify;
    u16 size, avail_idx, used_seen;
};
int virtio_open(u16 pci_id, const char *name, u32 features);
void virtio_queue(struct vq *vq, u16 index);
void virtio_go(void);
u64 virtio_devcfg(void);
void vq_post(struct vq *vq, u16 head);
void vq_kick(struct vq *vq);
int vq_has_used(struct vq *vq);
u32 vq_next(struct vq *vq, u32 *len);

/* vsock.c */
int scenario_vsock_tx_bench(int argc, char **argv);
int scenario_vsock_rx_bench(int argc, char **argv);

/* fwcfg.c */
int scenario_fwcfg(int argc, char **argv);

/* ring0.c / boot.S */
extern volatile u64 timer_ticks;
extern volatile u32 ap_arrived, ap_next_index, ap_bench;
void ap_tss_init(void);
extern char tramp_start[], tramp_end[];
extern u64 pml4[], pdpt[];

#endif
