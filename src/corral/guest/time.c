/* probe: PIT channel 2 (polled through port 0x61) and the TSC calibrated against it; PIT
 * channel 0 as the clock event device on IRQ 0, as Linux uses it with `nolapic_timer`. */
#include "probe.h"

u64 tsc_hz;

/* Channel 2, mode 0 (interrupt on terminal count), gate on, speaker off.
 * OUT2 (port 0x61 bit 5) goes high `count` PIT ticks (1.193182 MHz) later. */
int pit_start(u16 count)
{
    outb(0x61, (inb(0x61) & ~0x02) | 0x01);
    outb(0x43, 0xB0);               /* channel 2, lobyte/hibyte, mode 0, binary */
    outb(0x42, count & 0xff);
    outb(0x42, count >> 8);
    /* Mode 0 drops OUT2 when programmed; still high means no PIT / no port 0x61
     * (e.g. QEMU -M microvm). */
    return pit_done() ? -1 : 0;
}

int pit_done(void)
{
    return (inb(0x61) & 0x20) != 0;
}

int pit_wait(u16 count)
{
    if (pit_start(count))
        return -1;
    /* Bounded: 10 M polls (each a port read, i.e. a VM exit) is far beyond 55 ms anywhere. */
    for (u64 i = 0; i < 10000000UL && !pit_done(); i++)
        ;
    return 0;
}

#define CAL_COUNT 23864                 /* 20 ms */

void tsc_calibrate(void)
{
    if (tsc_hz)
        return;
    if (pit_start(CAL_COUNT)) {
        tsc_hz = 2000000000UL;      /* no PIT: waits are approximate */
        kprintf("probe: PIT channel 2 does not count; assuming a 2 GHz TSC\n");
        return;
    }
    u64 t0 = rdtsc();
    for (u64 i = 0; i < 10000000UL && !pit_done(); i++)
        ;
    u64 t1 = rdtsc();
    tsc_hz = (t1 - t0) * PIT_HZ / CAL_COUNT;
    if (tsc_hz < 1000000)
        tsc_hz = 1000000;           /* nonsense measurement: keep waits finite */
}

void tsc_delay_us(u64 us)
{
    u64 end = rdtsc() + tsc_hz / 1000000 * us + 1;
    while ((i64)(rdtsc() - end) < 0)
        cpu_relax();
}

/* ---------------------------------------------------------------- PIT channel 0 on IRQ 0 */

#define IOAPIC_SEL     0x00
#define IOAPIC_WIN     0x10
#define IOAPIC_MASKED  (1u << 16)
#define PIT_1KHZ       1193             /* channel 0 count for 1 ms */
#define PIT_WINDOW     59659            /* 50 ms of channel 2; the window is two of these */
#define ONESHOTS       10

/* Redirection entry of IOAPIC pin `pin`: `low` (vector, delivery, mask) to APIC ID `dest`. */
static void ioapic_route(u64 base, u32 pin, u32 low, u32 dest)
{
    mmio_write32(base + IOAPIC_SEL, 0x11 + 2 * pin);
    mmio_write32(base + IOAPIC_WIN, dest << 24);
    mmio_write32(base + IOAPIC_SEL, 0x10 + 2 * pin);
    mmio_write32(base + IOAPIC_WIN, low);
}

static void pit0_program(u8 mode, u16 count)
{
    outb(0x43, 0x30 | mode << 1);       /* channel 0, lobyte/hibyte, binary */
    outb(0x40, count & 0xff);
    outb(0x40, count >> 8);
}

/* `timer pit`: IRQ 0 goes to the IOAPIC pin the MADT's override names (fixed, edge, active
 * high, to this CPU). Channel 0 runs periodic (mode 2) at 1 kHz for a 100 ms channel-2
 * window, then fires ONESHOTS one-shots (mode 0, 1 ms, reprogrammed after each interrupt, as
 * Linux's tickless PIT clock event does), each of which must arrive within 100 ms and be the
 * only one. */
int timer_pit(void)
{
    u32 gsi;
    u64 ioapic;
    if (madt_isa_irq(0, &gsi, &ioapic) || gsi >= 24) {
        kprintf("probe: timer: no IOAPIC in the MADT for IRQ 0\n");
        kprintf("RESULT timer_ticks=0 timer_hz=0 error=no-ioapic\n");
        return EXIT_FAIL;
    }
    lapic_quiet();
    tsc_calibrate();
    u32 dest = lapic_id();

    pit0_program(2, PIT_1KHZ);
    ioapic_route(ioapic, gsi, VEC_TIMER, dest);
    u64 t0 = timer_ticks;
    pit_wait(PIT_WINDOW);
    pit_wait(PIT_WINDOW);
    u64 ticks = timer_ticks - t0;
    u64 hz = ticks * PIT_HZ / (2 * PIT_WINDOW);

    pit0_program(0, 0xFFFF);            /* mode 0 stops the rate generator (OUT low, 55 ms) */
    tsc_delay_us(5000);                 /* a tick already on its way lands now */
    int oneshots = 0;
    for (int i = 0; i < ONESHOTS; i++) {
        u64 before = timer_ticks;
        pit0_program(0, PIT_1KHZ);
        u64 end = rdtsc() + tsc_hz / 10;
        while (timer_ticks == before && (i64)(rdtsc() - end) < 0)
            cpu_relax();
        oneshots += timer_ticks != before;
    }
    u64 settled = timer_ticks;
    tsc_delay_us(20000);                /* a one-shot fires once: nothing more may come */
    u64 late = timer_ticks - settled;
    ioapic_route(ioapic, gsi, IOAPIC_MASKED | VEC_TIMER, dest);

    kprintf("probe: timer: PIT channel 0 on IOAPIC 0x%lx pin %u\n", ioapic, gsi);
    kprintf("RESULT timer_ticks=%lu timer_hz=%lu irq0_gsi=%u oneshots=%d late_ticks=%lu\n", ticks,
            hz, gsi, oneshots, late);
    return ticks > 0 && oneshots == ONESHOTS && late == 0 ? EXIT_OK : EXIT_FAIL;
}
