/* chaos SEED N: a hostile guest, from ring 3. N iterations of random actions, seeded from the
 * command line so a failure replays: writes and reads of random I/O ports, random MMIO over
 * every virtio function's BAR and the ECAM window and the unclaimed MMIO hole, random PCI
 * configuration writes (ports 0xCF8/0xCFC), and virtqueues set up on random rings in a scratch
 * area with random descriptors, avail entries and doorbells. The VMM must survive whatever
 * this does: the probe reports RESULT chaos=N when it gets through, or the VMM stops it.
 *
 * Left alone, so the run gets through rather than end at once: ports that end the guest by
 * design (the exit port, the i8042 command port, the reset register, ACPI PM1 control), COM1
 * (the RESULT line goes there), and KVM's own in-kernel devices (PIC, PIT, IOAPIC, LAPIC),
 * which are not corral's code. Ring 0 is emulated on this host (and only serves two requests),
 * so the chaos runs in ring 3 only. */
#include "probe.h"

#define SCRATCH (16ul << 20) /* rings and buffers the devices may DMA into: 16-48 MiB */
#define SCRATCH_LEN (32ul << 20)
#define ECAM 0xE0000000ul
#define HOLE 0xC0000000ul
#define HOLE_END 0xFEC00000ul /* below the IOAPIC and LAPIC */
#define MAX_FN 32

static u64 rs;
static u64 rnd(void)
{
    rs ^= rs << 13;
    rs ^= rs >> 7;
    rs ^= rs << 17;
    return rs;
}

struct fn {
    u32 slot;
    u64 bar0, common, notify;
    u32 notify_mult;
};
static struct fn fns[MAX_FN];
static int nfns;

static u32 cfg_read(u32 slot, u32 off)
{
    outl(0xcf8, 0x80000000u | slot << 11 | (off & 0xfc));
    return inl(0xcfc);
}

/* every virtio function on bus 0, with memory decoding and bus mastering on */
static void find_functions(void)
{
    for (u32 s = 0; s < 32 && nfns < MAX_FN; s++) {
        if ((cfg_read(s, 0) & 0xffff) != 0x1af4)
            continue;
        struct fn *f = &fns[nfns++];
        f->slot = s;
        outl(0xcf8, 0x80000000u | s << 11 | 4);
        outw(0xcfc, inw(0xcfc) | 6);
        f->bar0 = cfg_read(s, 0x10) & ~0xful;
        for (u32 cap = cfg_read(s, 0x34) & 0xfc, n = 0; cap && n < 16; cap = (cfg_read(s, cap) >> 8) & 0xfc, n++) {
            u32 head = cfg_read(s, cap);
            if ((head & 0xff) != 0x09)
                continue;
            u64 at = f->bar0 + cfg_read(s, cap + 8);
            u32 type = (head >> 24) & 0xff;
            if (type == 1)
                f->common = at;
            else if (type == 2) {
                f->notify = at;
                f->notify_mult = cfg_read(s, cap + 16);
            }
        }
    }
}

static int ends_the_guest(u32 port, u32 size)
{
    static const u16 ranges[][2] = {
        {0x20, 0x21}, {0xa0, 0xa1}, {0x40, 0x43}, {0x4d0, 0x4d1}, /* KVM's PIC, PIT, ELCR */
        {0x3f8, 0x3ff},                                            /* COM1: our RESULT line */
        {0x501, 0x502}, {0x64, 0x64}, {0xcf8, 0xcff},              /* exit; i8042 cmd; reset+PCI */
        {0x600, 0x60b},                                            /* ACPI PM (S5) */
    };
    for (size_t i = 0; i < ARRAY_SIZE(ranges); i++)
        if (port <= ranges[i][1] && port + size - 1 >= ranges[i][0])
            return 1;
    return 0;
}

static void random_port(void)
{
    u64 r = rnd();
    u32 size = 1u << (r & 3) % 3, port = (u32)(r >> 8) & 0xffff;
    if ((r >> 4) & 1)
        port &= 0x7ff; /* mostly where the devices are */
    if (ends_the_guest(port, size) || port + size > 0x10000)
        return;
    u32 v = (u32)(r >> 32);
    if ((r >> 5) & 1) {
        if (size == 1) outb(port, v);
        else if (size == 2) outw(port, v);
        else outl(port, v);
    } else {
        if (size == 1) (void)inb(port);
        else if (size == 2) (void)inw(port);
        else (void)inl(port);
    }
}

static void mmio_access(u64 addr, u32 size, u64 v, int write)
{
    addr &= ~(u64)(size - 1);
    if (write) {
        if (size == 1) *(volatile u8 *)addr = v;
        else if (size == 2) *(volatile u16 *)addr = v;
        else if (size == 4) *(volatile u32 *)addr = v;
        else *(volatile u64 *)addr = v;
    } else {
        if (size == 1) (void)*(volatile u8 *)addr;
        else if (size == 2) (void)*(volatile u16 *)addr;
        else if (size == 4) (void)*(volatile u32 *)addr;
        else (void)*(volatile u64 *)addr;
    }
}

static void random_mmio(void)
{
    u64 r = rnd(), v = rnd();
    u32 size = 1u << (r & 3);
    int write = (r >> 2) & 1;
    u64 addr;
    switch ((r >> 3) % 4) {
    case 0: /* ECAM: configuration space of every slot */
        addr = ECAM + ((r >> 8) & 0xfffff);
        break;
    case 1: /* anywhere in the hole the devices do not claim */
        addr = HOLE + ((r >> 8) % (HOLE_END - HOLE));
        break;
    default: /* a virtio function's BAR0: common config, ISR, device config, notify, MSI-X */
        if (!nfns)
            return;
        addr = fns[(r >> 8) % nfns].bar0 + ((r >> 16) & 0x7fff);
    }
    mmio_access(addr, size, v, write);
}

static void random_pci_config(void)
{
    u64 r = rnd();
    u32 slot = (r & 1) ? fns[(r >> 1) % (nfns ? nfns : 1)].slot : (r >> 8) & 31;
    u32 off = (r >> 16) & 0xff, size = 1u << ((r >> 24) % 3);
    if (off == 4 && (r >> 28) % 4)
        return; /* mostly leave the command register (decoding) alone, so the BARs stay reachable */
    outl(0xcf8, 0x80000000u | slot << 11 | (off & 0xfc));
    u32 v = (u32)(r >> 32);
    u32 port = 0xcfc + (off & (4 - size));
    if (size == 1) outb(port, v);
    else if (size == 2) outw(port, v);
    else outl(port, v);
}

static u64 scratch_addr(u64 align)
{
    return (SCRATCH + rnd() % SCRATCH_LEN) & ~(align - 1);
}

/* a queue on random rings in the scratch area, random descriptors and avail entries, a kick */
static void random_queue(void)
{
    if (!nfns)
        return;
    struct fn *f = &fns[rnd() % nfns];
    if (!f->common || !f->notify)
        return;
    volatile u8 *c = (volatile u8 *)f->common;
    u16 q = rnd() % 4;
    u64 r = rnd();
    if (r % 8 == 0) { /* a fresh bring-up now and then */
        c[0x14] = 0;
        c[0x14] = 1 | 2;
        *(volatile u32 *)(c + 0x08) = 1;
        *(volatile u32 *)(c + 0x0c) = 1; /* VERSION_1 */
        c[0x14] = 1 | 2 | 8;
    }
    *(volatile u16 *)(c + 0x16) = q;
    u16 size = (r >> 8) & 1 ? 1u << ((r >> 9) % 9) : (u16)(r >> 16);
    *(volatile u16 *)(c + 0x18) = size;
    u64 desc = scratch_addr(16), avail = scratch_addr(2), used = scratch_addr(4);
    *(volatile u64 *)(c + 0x20) = desc;
    *(volatile u64 *)(c + 0x28) = avail;
    *(volatile u64 *)(c + 0x30) = used;
    *(volatile u16 *)(c + 0x1c) = 1;
    if ((r >> 32) % 2)
        c[0x14] = 1 | 2 | 8 | 4; /* DRIVER_OK */
    u32 n = 1 + rnd() % 16;
    for (u32 i = 0; i < n; i++) {
        u64 x = rnd();
        volatile u64 *d = (volatile u64 *)(desc + 16 * (x % (size ? size : 1)));
        u64 addr = x % 16 ? scratch_addr(1) : rnd();
        d[0] = addr;
        d[1] = (rnd() % 70000) | (x >> 8 & 7) << 32 | (x >> 16 & 0xffff) << 48;
    }
    volatile u16 *a = (volatile u16 *)avail;
    u16 idx = a[1];
    for (u32 i = 0; i < n; i++)
        a[2 + (idx + i) % (size ? size : 1)] = rnd();
    a[1] = idx + n + (rnd() % 8 == 0 ? rnd() : 0); /* sometimes an index far ahead */
    *(volatile u16 *)(f->notify + (u64)q * f->notify_mult) = q;
}

static void random_scratch(void)
{
    *(volatile u64 *)scratch_addr(8) = rnd();
}

int scenario_chaos(int argc, char **argv)
{
    u64 seed, n;
    if (argc < 3 || parse_u64(argv[1], &seed) || parse_u64(argv[2], &n)) {
        kprintf("probe: usage: chaos SEED N\n");
        kprintf("RESULT error=usage\n");
        return EXIT_USAGE;
    }
    if (!is_ram_range(SCRATCH, SCRATCH + SCRATCH_LEN)) {
        kprintf("probe: chaos needs 64 MiB of RAM (its scratch area is 16-48 MiB)\n");
        kprintf("RESULT error=memory\n");
        return EXIT_USAGE;
    }
    rs = seed * 0x9E3779B97F4A7C15ul + 1;
    find_functions();
    kprintf("CHAOS seed=%lu n=%lu functions=%d\n", seed, n, nfns);
    for (u64 i = 0; i < n; i++) {
        switch (rnd() % 8) {
        case 0: case 1: random_port(); break;
        case 2: case 3: random_mmio(); break;
        case 4: random_pci_config(); break;
        case 5: case 6: random_queue(); break;
        default: random_scratch();
        }
    }
    kprintf("RESULT chaos=%lu seed=%lu\n", n, seed);
    return EXIT_OK;
}
