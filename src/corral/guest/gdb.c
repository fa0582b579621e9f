/* probe: a target for debugger tests (tests/kvm/test_gdb*.py): C variables that a debugger
 * reads, changes and watches, and a function to break on, all used from ring 3. */
#include "probe.h"

volatile u64 gdb_value = 7;   /* printed at the end: a debugger may change it first */
volatile u64 gdb_release;     /* a debugger sets it to end the scenario */
volatile u64 gdb_counter;     /* rewritten on every turn: a watchpoint target */

void __attribute__((noinline)) gdb_tick(u64 i)
{
    gdb_counter = i;
    __asm__ volatile("" ::: "memory");
}

/* gdb [MS]: turn until a debugger sets gdb_release, or for MS milliseconds of TSC time. */
int scenario_gdb(int argc, char **argv)
{
    u64 ms = 0;
    if (argc >= 2 && parse_u64(argv[1], &ms)) {
        kprintf("probe: usage: gdb [MS]\n");
        kprintf("RESULT error=usage\n");
        return EXIT_USAGE;
    }
    u64 deadline = 0;
    if (ms) {
        tsc_calibrate();
        deadline = rdtsc() + ms * (tsc_hz / 1000);
    }
    kprintf("probe: gdb target ready\n");
    for (u64 i = 1; !gdb_release; i++) {
        gdb_tick(i);
        if (deadline && rdtsc() >= deadline)
            break;
        __asm__ volatile("pause");
    }
    kprintf("RESULT gdb_value=%lu released=%lu\n", gdb_value, gdb_release);
    return EXIT_OK;
}
