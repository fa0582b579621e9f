/* probe: PIT channel 2 (polled through port 0x61) and the TSC calibrated against it. */
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
