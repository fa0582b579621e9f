/* probe: boot-information parsing, command line, and the simple scenarios.
 * Everything here runs in ring 3 with IOPL=3 (port I/O allowed, cli/sti allowed). */
#include "probe.h"

struct mem_range memmap[MAX_MEMMAP];
int memmap_count;
u64 boot_rsdp;
static char cmdline[1024];
static const char *boot_name = "unknown";

#define MAX_ARGS 16

static void memmap_add(u64 addr, u64 len, u32 type)
{
    if (memmap_count < MAX_MEMMAP && len) {
        memmap[memmap_count].addr = addr;
        memmap[memmap_count].len = len;
        memmap[memmap_count].type = type;
        memmap_count++;
    }
}

static void copy_cmdline(u64 paddr)
{
    const char *s = (const char *)paddr;
    size_t i = 0;
    if (paddr)
        for (; s[i] && i < sizeof(cmdline) - 1; i++)
            cmdline[i] = s[i];
    cmdline[i] = 0;
}

static u32 rd32(u64 a) { return *(volatile u32 *)a; }
static u64 rd64(u64 a) { return *(volatile u64 *)a; }

/* Copy what we need out of the loader's structures (they may live in pages reused later). */
static int parse_boot_info(void)
{
    if (boot_kind == BOOT_MULTIBOOT) {
        boot_name = "multiboot";
        if (boot_magic != MB_BOOT_MAGIC) {
            kprintf("probe: bad multiboot magic 0x%x\n", boot_magic);
            return -1;
        }
        u64 mbi = boot_info;
        u32 flags = rd32(mbi);
        if (flags & (1 << 2))
            copy_cmdline(rd32(mbi + 16));
        if (flags & (1 << 6)) {
            u64 p = rd32(mbi + 48), end = p + rd32(mbi + 44);
            while (p + 24 <= end) {
                memmap_add(rd64(p + 4), rd64(p + 12), rd32(p + 20));
                p += rd32(p) + 4;
            }
        } else if (flags & 1) {
            memmap_add(0, (u64)rd32(mbi + 4) << 10, 1);
            memmap_add(0x100000, (u64)rd32(mbi + 8) << 10, 1);
        }
    } else if (boot_kind == BOOT_PVH) {
        boot_name = "pvh";
        u64 si = boot_info;
        if (rd32(si) != PVH_START_MAGIC) {
            kprintf("probe: bad hvm_start_info magic 0x%x at 0x%lx\n", rd32(si), si);
            return -1;
        }
        u32 version = rd32(si + 4);
        copy_cmdline(rd64(si + 24));
        boot_rsdp = rd64(si + 32);
        if (version >= 1) {
            u64 p = rd64(si + 40);
            u32 n = rd32(si + 48);
            for (u32 i = 0; i < n; i++, p += 24)
                memmap_add(rd64(p), rd64(p + 8), rd32(p + 16));
        }
    } else {
        kprintf("probe: entered without a known boot protocol\n");
        return -1;
    }
    return 0;
}

/* ---------------------------------------------------------------- scenarios */

static int scenario_hello(int argc, char **argv)
{
    (void)argc, (void)argv;
    kprintf("RESULT hello=1\n");
    return EXIT_OK;
}

static int need_count(int argc, char **argv, u64 *n)
{
    if (argc < 2 || parse_u64(argv[1], n)) {
        kprintf("probe: usage: %s COUNT\n", argv[0]);
        kprintf("RESULT error=usage\n");
        return -1;
    }
    return 0;
}

/* The exit benchmarks: COUNT exits of one kind, timed with the TSC between the BENCH markers.
 * `pio-bench N all` runs the loop on every vCPU at once (up to MAX_BENCH_CPUS): each does N,
 * the APs started first and released together with the BSP (exits counts them all). */
static int run_exit_bench(int argc, char **argv, const char *what, int kind)
{
    u64 n;
    if (need_count(argc, argv, &n))
        return EXIT_USAGE;
    int all = argc > 2 && str_eq(argv[2], "all");
    if (argc > 2 && !all) {
        kprintf("probe: usage: %s COUNT [all]\n", argv[0]);
        kprintf("RESULT error=usage\n");
        return EXIT_USAGE;
    }
    tsc_calibrate();
    int cpus = all ? bench_start_aps(kind, n) : 1;
    if (cpus < 1)
        return EXIT_FAIL;
    kprintf("BENCH start\n");
    u64 t0 = rdtsc();
    if (cpus > 1)
        bench_go_and_wait();
    else
        exit_loop(kind, n);
    u64 t1 = rdtsc();
    kprintf("BENCH end\n");
    kprintf("RESULT %s=%lu per_cpu=%lu cpus=%d tsc=%lu tsc_hz=%lu\n", what, n * (u64)cpus, n, cpus,
            t1 - t0, tsc_hz);
    return EXIT_OK;
}

static int scenario_pio_bench(int argc, char **argv)
{
    return run_exit_bench(argc, argv, "pio_exits", BENCH_PIO);
}

static int scenario_mmio_bench(int argc, char **argv)
{
    return run_exit_bench(argc, argv, "mmio_exits", BENCH_MMIO);
}

/* ---- mem-touch ---- */

#define MiB (1UL << 20)
#define GiB (1UL << 30)
#define ROUND_UP(x, a) (((x) + (a) - 1) & ~((a) - 1))

static int is_ram(u64 start, u64 end)
{
    for (int i = 0; i < memmap_count; i++)
        if (memmap[i].type == 1 && memmap[i].addr <= start && end <= memmap[i].addr + memmap[i].len)
            return 1;
    return 0;
}

/* Map [start, end) above 4 GiB with 2 MiB pages; page directories come from `scratch`. */
static int map_high(u64 start, u64 end, u64 scratch, u64 scratch_end)
{
    int added = 0;
    for (u64 g = start >> 30; g <= (end - 1) >> 30; g++) {
        if (g >= 512) {
            kprintf("probe: mem-touch: cannot map memory above 512 GiB\n");
            return -1;
        }
        if (pdpt[g])
            continue;
        if (scratch + 4096 > scratch_end || !is_ram(scratch, scratch + 4096)) {
            kprintf("probe: mem-touch: no RAM for page tables at 0x%lx\n", scratch);
            return -1;
        }
        u64 *pd = (u64 *)scratch;
        for (u64 j = 0; j < 512; j++)
            pd[j] = (g << 30) + (j << 21) + PTE_PWU + PTE_PS;
        __asm__ volatile("" ::: "memory");
        pdpt[g] = scratch + PTE_PWU;
        scratch += 4096;
        added = 1;
    }
    if (added)
        syscall0(SYS_FLUSH_TLB);
    return 0;
}

static u64 touch_round(volatile u64 *base, u64 words, u64 round, u64 *csum_out)
{
    const u64 k = 0x9E3779B97F4A7C15UL;
    u64 seed = (round + 1) * 0xD1B54A32D192ED03UL;
    u64 v = seed;
    u64 *p = (u64 *)base;
    for (u64 i = 0; i < words; i++, v += k)
        p[i] = v ^ (i << 1);
    __asm__ volatile("" ::: "memory");
    u64 bad = 0, csum = 0;
    v = seed;
    for (u64 i = 0; i < words; i++, v += k) {
        u64 x = p[i];
        bad += x != (v ^ (i << 1));
        csum = ((csum << 1) | (csum >> 63)) + x;
    }
    *csum_out = csum;
    return bad;
}

static int scenario_mem_touch(int argc, char **argv)
{
    u64 size, rounds = 1;
    int forever = 0, progress = argc >= 3;
    if (argc < 2 || parse_size(argv[1], &size) || size == 0) {
        kprintf("probe: usage: mem-touch SIZE[K|M|G] [ROUNDS|forever]\n");
        kprintf("RESULT error=usage\n");
        return EXIT_USAGE;
    }
    if (argc >= 3) {
        if (str_eq(argv[2], "forever"))
            forever = 1;
        else if (parse_u64(argv[2], &rounds) || rounds == 0) {
            kprintf("probe: mem-touch: ROUNDS must be a positive number or 'forever'\n");
            kprintf("RESULT error=usage\n");
            return EXIT_USAGE;
        }
    }
    size = ROUND_UP(size, 8);
    /* [scratch, scratch+2M): page directories for RAM above 4 GiB; the touched region follows. */
    u64 scratch = ROUND_UP((u64)_end, 2 * MiB);
    u64 lowest = scratch + 2 * MiB, start = 0, largest = 0;
    for (int i = 0; i < memmap_count; i++) {
        if (memmap[i].type != 1)
            continue;
        u64 s = ROUND_UP(memmap[i].addr > lowest ? memmap[i].addr : lowest, 4096);
        u64 e = (memmap[i].addr + memmap[i].len) & ~4095UL;
        if (e <= s)
            continue;
        if (e - s > largest)
            largest = e - s;
        if (e - s >= size) {
            start = s;
            break;
        }
    }
    if (!start) {
        kprintf("probe: mem-touch: %lu bytes do not fit in free RAM above 0x%lx "
                "(largest free range: %lu bytes)\n", size, lowest, largest);
        kprintf("RESULT mem_touch_bytes=%lu ok=0 error=no-room\n", size);
        return EXIT_FAIL;
    }
    if (start + size > 4 * GiB &&
        map_high(start > 4 * GiB ? start : 4 * GiB, start + size, scratch, scratch + 2 * MiB)) {
        kprintf("RESULT mem_touch_bytes=%lu ok=0 error=map\n", size);
        return EXIT_FAIL;
    }
    if (forever)
        kprintf("probe: mem-touch range=0x%lx-0x%lx rounds=forever\n", start, start + size);
    else
        kprintf("probe: mem-touch range=0x%lx-0x%lx rounds=%lu\n", start, start + size, rounds);
    u64 csum = 0;
    for (u64 r = 0; forever || r < rounds; r++) {
        u64 bad = touch_round((volatile u64 *)start, size / 8, r, &csum);
        if (progress)
            kprintf("PROGRESS round=%lu checksum=0x%016lx ok=%d\n", r + 1, csum, bad == 0);
        if (bad) {
            kprintf("probe: mem-touch: %lu words read back wrong in round %lu\n", bad, r + 1);
            kprintf("RESULT mem_touch_bytes=%lu checksum=0x%016lx ok=0 bad_words=%lu\n",
                    size, csum, bad);
            return EXIT_FAIL;
        }
    }
    if (progress)
        kprintf("RESULT mem_touch_bytes=%lu checksum=0x%016lx ok=1 rounds=%lu\n", size, csum, rounds);
    else
        kprintf("RESULT mem_touch_bytes=%lu checksum=0x%016lx ok=1\n", size, csum);
    return EXIT_OK;
}

/* ---- idle: runs forever, writing no memory (an idle guest for migration figures) ---- */

int is_ram_range(u64 start, u64 end)
{
    return is_ram(start, end);
}

static int scenario_idle(int argc, char **argv)
{
    (void)argc, (void)argv;
    kprintf("probe: idle\n");
    for (;;)
        __asm__ volatile("pause");
    return EXIT_OK;
}

/* ---- halt [SIZE]: fills SIZE of RAM as mem-touch's first round does (the same bytes in every
 * VM, for KSM), then halts the vCPU with interrupts off: an idle VM that costs the host no CPU
 * (the vCPU sleeps in KVM_RUN; idle spins) ---- */

static int scenario_halt(int argc, char **argv)
{
    if (argc >= 2) {
        char *touch[] = {"mem-touch", argv[1]};
        int rc = scenario_mem_touch(2, touch);
        if (rc != EXIT_OK)
            return rc;
    }
    kprintf("probe: halt\n");
    syscall0(SYS_HALT);
    return EXIT_OK;
}

/* ---- triple-fault: sets crash_marker (a core of the crash shows it), then makes the vCPU
 * triple-fault (corral run --dump-on-crash) ---- */

volatile u64 crash_marker;

static int scenario_triple_fault(int argc, char **argv)
{
    (void)argc, (void)argv;
    crash_marker = 0xc0de0dead;
    kprintf("probe: triple fault\n");
    syscall0(SYS_TRIPLE_FAULT);
    kprintf("RESULT error=survived-triple-fault\n");
    return EXIT_FAIL;
}

/* ---------------------------------------------------------------- dispatch */

struct scenario {
    const char *name;
    int (*run)(int argc, char **argv);
};

static const struct scenario scenarios[] = {
    {"hello", scenario_hello},
    {"smp", scenario_smp},
    {"timer", scenario_timer},
    {"pio-bench", scenario_pio_bench},
    {"mmio-bench", scenario_mmio_bench},
    {"mem-touch", scenario_mem_touch},
    {"idle", scenario_idle},
    {"halt", scenario_halt},
    {"blk-check", scenario_blk_check},
    {"blk-bench", scenario_blk_bench},
    {"blk-evidx", scenario_blk_evidx},
    {"net-bench", scenario_net_bench},
    {"net-evidx", scenario_net_evidx},
    {"net-rx-bench", scenario_net_rx_bench},
    {"vsock-tx-bench", scenario_vsock_tx_bench},
    {"vsock-rx-bench", scenario_vsock_rx_bench},
    {"gdb", scenario_gdb},
    {"chaos", scenario_chaos},
    {"fwcfg", scenario_fwcfg},
    {"triple-fault", scenario_triple_fault},
};

static const struct scenario *find_scenario(const char *name)
{
    for (size_t i = 0; i < ARRAY_SIZE(scenarios); i++)
        if (str_eq(name, scenarios[i].name))
            return &scenarios[i];
    return NULL;
}

static int split_args(char *s, char **argv, int max)
{
    int argc = 0;
    while (*s) {
        while (*s == ' ' || *s == '\t' || *s == '\n')
            *s++ = 0;
        if (!*s)
            break;
        if (argc < max)
            argv[argc++] = s;
        while (*s && *s != ' ' && *s != '\t' && *s != '\n')
            s++;
    }
    return argc;
}

static int looks_like_path(const char *s)
{
    for (; *s; s++)
        if (*s == '/' || *s == '.')
            return 1;
    return 0;
}

void __attribute__((noreturn)) kmain(void)
{
    serial_init();
    int bad_boot = parse_boot_info();
    kprintf("probe: boot=%s cmdline='%s'\n", boot_name, cmdline);
    kprintf("RESULT boot=%s\n", boot_name);
    if (bad_boot)
        guest_exit(EXIT_USAGE);

    char *argv[MAX_ARGS];
    int argc = split_args(cmdline, argv, MAX_ARGS);
    /* Multiboot loaders (QEMU, GRUB) put the kernel's file name first: skip it. */
    if (boot_kind == BOOT_MULTIBOOT && argc >= 1 && !find_scenario(argv[0]) &&
        (looks_like_path(argv[0]) || (argc >= 2 && find_scenario(argv[1])))) {
        kprintf("RESULT argv0=%s\n", argv[0]);
        for (int i = 1; i < argc; i++)
            argv[i - 1] = argv[i];
        argc--;
    }
    if (argc == 0) {
        kprintf("probe: no scenario on the command line (hello, smp, timer, pio-bench N, "
                "mmio-bench N, mem-touch SIZE [ROUNDS])\n");
        kprintf("RESULT error=no-scenario\n");
        guest_exit(EXIT_USAGE);
    }
    const struct scenario *sc = find_scenario(argv[0]);
    if (!sc) {
        kprintf("probe: unknown scenario '%s' (hello, smp, timer, pio-bench N, mmio-bench N, "
                "mem-touch SIZE [ROUNDS])\n", argv[0]);
        kprintf("RESULT error=unknown-scenario\n");
        guest_exit(EXIT_USAGE);
    }
    int status = sc->run(argc, argv);
    kprintf("probe: exit status %d\n", status);
    guest_exit(status);
}
