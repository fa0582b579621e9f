/* probe: ACPI MADT, the local APIC, AP start-up (INIT-SIPI-SIPI) and the LAPIC timer.
 * Runs in ring 3: the LAPIC page is mapped user-accessible, so its registers are plain MMIO. */
#include "probe.h"

#define LAPIC_ID     0x020
#define LAPIC_TPR    0x080
#define LAPIC_SVR    0x0F0
#define LAPIC_ICR_LO 0x300
#define LAPIC_ICR_HI 0x310
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_LVT_LINT0 0x350
#define LAPIC_TIMER_INIT 0x380
#define LAPIC_TIMER_CUR  0x390
#define LAPIC_TIMER_DIV  0x3E0
#define LVT_MASKED   (1 << 16)
#define LVT_PERIODIC (1 << 17)
#define ICR_BUSY     (1 << 12)

#define MAX_CPUS 256

static u32 lapic_read(u32 reg) { return mmio_read32(LAPIC_BASE + reg); }
static void lapic_write(u32 reg, u32 v) { mmio_write32(LAPIC_BASE + reg, v); }

void lapic_enable(void)
{
    lapic_write(LAPIC_TPR, 0);
    lapic_write(LAPIC_SVR, 0x100 | VEC_SPURIOUS);
}

/* ---------------------------------------------------------------- ACPI */

static int acpi_sum_ok(u64 addr, u32 len)
{
    u8 sum = 0;
    for (u32 i = 0; i < len; i++)
        sum += *(volatile u8 *)(addr + i);
    return sum == 0;
}

static int is_rsdp(u64 a)
{
    return !memcmp((const void *)a, "RSD PTR ", 8) && acpi_sum_ok(a, 20);
}

static u64 scan_rsdp(u64 start, u64 end)
{
    for (u64 a = start; a + 20 <= end; a += 16)
        if (is_rsdp(a))
            return a;
    return 0;
}

static u64 find_rsdp(void)
{
    if (boot_rsdp && is_rsdp(boot_rsdp))
        return boot_rsdp;
    u64 ebda = (u64)*(volatile u16 *)0x40E << 4;
    u64 r = 0;
    if (ebda >= 0x80000 && ebda < 0xA0000)
        r = scan_rsdp(ebda, ebda + 1024);
    if (!r)
        r = scan_rsdp(0xE0000, 0x100000);
    return r;
}

/* The MADT under the RSDP (XSDT, else RSDT), or 0. */
static u64 find_madt(u64 rsdp)
{
    u8 rev = *(volatile u8 *)(rsdp + 15);
    u64 root = 0;
    int esize = 4;
    if (rev >= 2 && *(volatile u64 *)(rsdp + 24)) {
        root = *(volatile u64 *)(rsdp + 24);
        esize = 8;
    } else {
        root = *(volatile u32 *)(rsdp + 16);
    }
    if (!root)
        return 0;
    u32 rlen = *(volatile u32 *)(root + 4);
    u64 madt = 0;
    for (u64 p = root + 36; p + esize <= root + rlen; p += esize) {
        u64 t = esize == 8 ? *(volatile u64 *)p : *(volatile u32 *)p;
        if (t && !memcmp((const void *)t, "APIC", 4)) {
            madt = t;
            break;
        }
    }
    return madt;
}

/* Finds the MADT; returns the number of enabled CPUs and fills ids[] with their APIC IDs. */
static int madt_cpus(u64 rsdp, u32 *ids, int max)
{
    u64 madt = find_madt(rsdp);
    if (!madt)
        return -1;
    u32 len = *(volatile u32 *)(madt + 4);
    int n = 0;
    for (u64 p = madt + 44; p + 2 <= madt + len;) {
        u8 type = *(volatile u8 *)p, elen = *(volatile u8 *)(p + 1);
        if (elen < 2)
            break;
        if (type == 0 && elen >= 8 && (*(volatile u32 *)(p + 4) & 1)) {
            if (n < max)
                ids[n] = *(volatile u8 *)(p + 3);
            n++;
        } else if (type == 9 && elen >= 16 && (*(volatile u32 *)(p + 8) & 1)) {
            if (n < max)
                ids[n] = *(volatile u32 *)(p + 4);
            n++;
        }
        p += elen;
    }
    return n;
}

/* What the MADT says about ISA IRQ `irq`: the GSI its interrupt source override names (the
 * IRQ itself without one) and the first IOAPIC's address. -1 without an RSDP, MADT or IOAPIC. */
int madt_isa_irq(int irq, u32 *gsi, u64 *ioapic)
{
    u64 rsdp = find_rsdp();
    u64 madt = rsdp ? find_madt(rsdp) : 0;
    if (!madt)
        return -1;
    u32 len = *(volatile u32 *)(madt + 4);
    *gsi = (u32)irq;
    *ioapic = 0;
    for (u64 p = madt + 44; p + 2 <= madt + len;) {
        u8 type = *(volatile u8 *)p, elen = *(volatile u8 *)(p + 1);
        if (elen < 2)
            break;
        if (type == 1 && elen >= 12 && !*ioapic)
            *ioapic = *(volatile u32 *)(p + 4);
        else if (type == 2 && elen >= 10 && *(volatile u8 *)(p + 2) == 0 &&
                 *(volatile u8 *)(p + 3) == irq)
            *gsi = *(volatile u32 *)(p + 4);
        p += elen;
    }
    return *ioapic ? 0 : -1;
}

u32 lapic_id(void)
{
    return lapic_read(LAPIC_ID) >> 24;
}

/* ---------------------------------------------------------------- SMP */

static int icr_send(u32 apic_id, u32 cmd)
{
    for (int i = 0; i < 100000 && (lapic_read(LAPIC_ICR_LO) & ICR_BUSY); i++)
        cpu_relax();
    lapic_write(LAPIC_ICR_HI, apic_id << 24);
    lapic_write(LAPIC_ICR_LO, cmd);
    return 0;
}

/* Starts every AP the MADT lists (INIT, 10 ms, SIPI, 200 us, SIPI) and waits up to ~2 s for
 * them to count in (ap_arrived). Returns the MADT's CPU count; -1 without an RSDP, -2 without a
 * MADT (both said on the console). */
static int start_aps(void)
{
    static u32 ids[MAX_CPUS];
    u64 rsdp = find_rsdp();
    if (!rsdp) {
        kprintf("probe: smp: no ACPI RSDP found\n");
        return -1;
    }
    int expected = madt_cpus(rsdp, ids, MAX_CPUS);
    if (expected < 1) {
        kprintf("probe: smp: no MADT (or no enabled CPU in it) under RSDP 0x%lx\n", rsdp);
        return -2;
    }
    lapic_enable();
    u32 bsp = lapic_read(LAPIC_ID) >> 24;
    int listed = expected < MAX_CPUS ? expected : MAX_CPUS;
    kprintf("probe: smp: rsdp=0x%lx madt_cpus=%d bsp_apic_id=%u\n", rsdp, expected, bsp);

    if (expected > 1) {
        tsc_calibrate();
        memcpy((void *)TRAMP_ADDR, tramp_start, tramp_end - tramp_start);
        __asm__ volatile("" ::: "memory");
        for (int i = 0; i < listed; i++)
            if (ids[i] != bsp && ids[i] < 255)
                icr_send(ids[i], 0x4500);                       /* INIT, level assert */
        tsc_delay_us(10000);
        for (int pass = 0; pass < 2 && (int)ap_arrived < expected - 1; pass++) {
            for (int i = 0; i < listed; i++)
                if (ids[i] != bsp && ids[i] < 255)
                    icr_send(ids[i], 0x4600 | (TRAMP_ADDR >> 12));   /* STARTUP */
            tsc_delay_us(200);
        }
        u64 deadline = rdtsc() + 2 * tsc_hz;                    /* wait at most ~2 s */
        while ((int)ap_arrived < expected - 1 && (i64)(rdtsc() - deadline) < 0)
            cpu_relax();
    }
    return expected;
}

int scenario_smp(int argc, char **argv)
{
    (void)argc, (void)argv;
    int expected = start_aps();
    if (expected < 1) {
        kprintf("RESULT cpus=1 madt_cpus=0 error=%s\n", expected == -1 ? "no-rsdp" : "no-madt");
        return EXIT_FAIL;
    }
    int cpus = 1 + (int)ap_arrived;
    kprintf("RESULT cpus=%d madt_cpus=%d\n", cpus, expected);
    return cpus == expected ? EXIT_OK : EXIT_FAIL;
}

/* ---------------------------------------------------------------- exit benches on every vCPU */

static volatile u32 bench_ready, bench_go, bench_done;
static int bench_kind;
static u64 bench_n;

/* Starts the APs into ring 3, each waiting at the line in ap_bench_main. Returns the vCPUs that
 * will run the bench (the BSP included, at most MAX_BENCH_CPUS), or 0 when an AP did not come. */
int bench_start_aps(int kind, u64 n)
{
    bench_kind = kind;
    bench_n = n;
    ap_tss_init();
    ap_bench = 1;
    __asm__ volatile("" ::: "memory");
    int expected = start_aps();
    if (expected < 1) {
        kprintf("RESULT error=%s\n", expected == -1 ? "no-rsdp" : "no-madt");
        return 0;
    }
    int want = expected < MAX_BENCH_CPUS ? expected - 1 : MAX_BENCH_CPUS - 1;
    u64 deadline = rdtsc() + 2 * tsc_hz;
    while ((int)bench_ready < want && (i64)(rdtsc() - deadline) < 0)
        cpu_relax();
    if ((int)bench_ready < want) {
        kprintf("probe: bench: %u of %d APs ready in ring 3 after 2 s\n", bench_ready, want);
        kprintf("RESULT error=ap-not-ready\n");
        return 0;
    }
    return 1 + want;
}

/* Releases the APs, runs the BSP's share, waits for every AP's share. */
void bench_go_and_wait(void)
{
    u32 aps = bench_ready;
    __atomic_store_n(&bench_go, 1, __ATOMIC_RELEASE);
    exit_loop(bench_kind, bench_n);
    while (__atomic_load_n(&bench_done, __ATOMIC_ACQUIRE) < aps)
        cpu_relax();
}

/* An AP in ring 3 (from ap_long64): count in, wait for the start, run the loop, halt. */
void ap_bench_main(u64 index)
{
    (void)index;
    __atomic_add_fetch(&bench_ready, 1, __ATOMIC_RELEASE);
    while (!__atomic_load_n(&bench_go, __ATOMIC_ACQUIRE))
        cpu_relax();
    exit_loop(bench_kind, bench_n);
    __atomic_add_fetch(&bench_done, 1, __ATOMIC_RELEASE);
    for (;;)
        syscall0(SYS_HALT);
}

/* ---------------------------------------------------------------- LAPIC timer */

/* The LAPIC on, and the legacy paths around it off: both 8259s and LINT0 masked, so only the
 * LAPIC timer or an IOAPIC pin can interrupt. */
void lapic_quiet(void)
{
    outb(0x21, 0xFF);
    outb(0xA1, 0xFF);
    lapic_enable();
    lapic_write(LAPIC_LVT_LINT0, LVT_MASKED);
}

#define CAL_COUNT 11932                 /* 10 ms of PIT */
#define WINDOW_COUNT 59659              /* 50 ms of PIT; the window is two of these */
#define TARGET_HZ 1000

int scenario_timer(int argc, char **argv)
{
    if (argc > 1 && str_eq(argv[1], "pit"))
        return timer_pit();
    if (argc > 1) {
        kprintf("probe: timer: unknown variant '%s' (none for the LAPIC timer, or pit)\n", argv[1]);
        kprintf("RESULT error=usage\n");
        return EXIT_USAGE;
    }
    lapic_quiet();

    /* Measure the LAPIC timer's count rate (divide by 16) against the PIT. */
    lapic_write(LAPIC_TIMER_DIV, 0x3);
    lapic_write(LAPIC_LVT_TIMER, LVT_MASKED | VEC_TIMER);
    lapic_write(LAPIC_TIMER_INIT, 0xFFFFFFFF);
    if (pit_wait(CAL_COUNT)) {
        lapic_write(LAPIC_TIMER_INIT, 0);
        kprintf("probe: timer: PIT channel 2 (ports 0x42/0x43/0x61) does not count: "
                "nothing to measure the LAPIC timer against\n");
        kprintf("RESULT timer_ticks=0 timer_hz=0 error=no-pit\n");
        return EXIT_FAIL;
    }
    u32 cur = lapic_read(LAPIC_TIMER_CUR);
    u64 rate = (u64)(0xFFFFFFFFu - cur) * PIT_HZ / CAL_COUNT;
    u64 init = rate / TARGET_HZ;
    if (init == 0)
        init = 1;
    if (init > 0xFFFFFFFFu)
        init = 0xFFFFFFFFu;
    lapic_write(LAPIC_TIMER_INIT, 0);

    lapic_write(LAPIC_LVT_TIMER, LVT_PERIODIC | VEC_TIMER);
    lapic_write(LAPIC_TIMER_INIT, (u32)init);
    /* Ring 3 runs with interrupts enabled (IF=1), so the ticks arrive while it polls the PIT. */
    u64 t0 = timer_ticks;
    pit_wait(WINDOW_COUNT);
    pit_wait(WINDOW_COUNT);
    u64 ticks = timer_ticks - t0;
    lapic_write(LAPIC_LVT_TIMER, LVT_MASKED | VEC_TIMER);
    lapic_write(LAPIC_TIMER_INIT, 0);

    u64 hz = ticks * PIT_HZ / (2 * WINDOW_COUNT);
    kprintf("probe: timer: lapic_count_hz=%lu initial_count=%lu window_ms=100\n", rate, init);
    kprintf("RESULT timer_ticks=%lu timer_hz=%lu\n", ticks, hz);
    return ticks > 0 ? EXIT_OK : EXIT_FAIL;
}
