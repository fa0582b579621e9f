/* Ring-3 polling drivers for modern virtio-pci devices (virtio 1.x), for benchmarks: a block
 * device (one request queue) and a network device (its transmit or its receive queue).
 *
 * PCI bus 0 is scanned through ports 0xCF8/0xCFC; the device's common, notify and device
 * configuration blocks are found through its vendor capabilities and used in place (the probe
 * identity-maps 0-4 GiB for ring 3). No interrupts: MSI-X vectors stay at NO_VECTOR and the
 * used ring is polled. One queue, split rings in BSS, request buffers at BUF_BASE. */
#include "probe.h"

#define VIRTIO_VENDOR 0x1af4
#define VIRTIO_BLK_MODERN 0x1042
#define VIRTIO_NET_MODERN 0x1041
#define CAP_VENDOR 0x09
#define CFG_COMMON 1
#define CFG_NOTIFY 2
#define CFG_DEVICE 4

#define S_ACK 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8

#define QSIZE 128
#define DESC_NEXT 1
#define DESC_WRITE 2
#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4
#define T_GET_ID 8
#define BUF_BASE (32ul << 20)   /* request buffers: 32 MiB up (needs 64 MiB of RAM) */

struct desc { u64 addr; u32 len; u16 flags, next; };
struct blk_hdr { u32 type, reserved; u64 sector; };

static struct desc ring_desc[QSIZE] __attribute__((aligned(4096)));
static struct { u16 flags, idx, ring[QSIZE], used_event; } ring_avail __attribute__((aligned(4096)));
static struct { u16 flags, idx; struct { u32 id, len; } ring[QSIZE]; u16 avail_event; }
    ring_used __attribute__((aligned(4096)));
static struct blk_hdr hdrs[QSIZE];
static u8 statuses[QSIZE];

static u64 common, notify_addr, devcfg;
static u16 qsize, avail_idx, used_seen;

static u32 pci_read(int slot, int off)
{
    outl(0xcf8, 0x80000000u | (u32)slot << 11 | (off & 0xfc));
    return inl(0xcfc);
}

static u64 bar_address(int slot, int bar)
{
    u32 lo = pci_read(slot, 0x10 + 4 * bar);
    if (lo & 1)
        return 0;                                   /* I/O BAR: not ours */
    u64 addr = lo & ~0xful;
    if ((lo & 6) == 4)
        addr |= (u64)pci_read(slot, 0x14 + 4 * bar) << 32;
    return addr;
}

#define C8(o) (*(volatile u8 *)(common + (o)))
#define C16(o) (*(volatile u16 *)(common + (o)))
#define C32(o) (*(volatile u32 *)(common + (o)))

/* Find device `pci_id`, negotiate VERSION_1 only, and set up queue `queue` on the static
 * rings (the device's other queues stay disabled). */
static int virtio_setup(u16 pci_id, const char *name, u16 queue)
{
    int slot = -1;
    for (int s = 0; s < 32 && slot < 0; s++)
        if (pci_read(s, 0) == ((u32)pci_id << 16 | VIRTIO_VENDOR))
            slot = s;
    if (slot < 0) {
        kprintf("probe: no %s (1af4:%x) on PCI bus 0\n", name, pci_id);
        return -1;
    }
    /* memory decoding and bus mastering on, as a driver does */
    outl(0xcf8, 0x80000000u | (u32)slot << 11 | 4);
    outw(0xcfc, inw(0xcfc) | 6);
    u32 notify_mult = 0, notify_off_base = 0;
    for (u32 cap = pci_read(slot, 0x34) & 0xfc; cap; cap = (pci_read(slot, cap) >> 8) & 0xfc) {
        u32 head = pci_read(slot, cap);
        if ((head & 0xff) != CAP_VENDOR)
            continue;
        u32 type = (head >> 24) & 0xff, bar = pci_read(slot, cap + 4) & 0xff;
        u64 at = bar_address(slot, bar) + pci_read(slot, cap + 8);
        if (type == CFG_COMMON)
            common = at;
        else if (type == CFG_NOTIFY) {
            notify_off_base = (u32)(at - bar_address(slot, bar));
            notify_addr = bar_address(slot, bar);
            notify_mult = pci_read(slot, cap + 16);
        } else if (type == CFG_DEVICE)
            devcfg = at;
    }
    if (!common || !notify_addr || !devcfg || common >= (4ul << 30)) {
        kprintf("probe: %s capabilities missing or BAR above 4 GiB\n", name);
        return -1;
    }
    C8(0x14) = 0;                                   /* reset */
    while (C8(0x14))
        cpu_relax();
    C8(0x14) = S_ACK | S_DRIVER;
    C32(0x00) = 1;
    if (!(C32(0x04) & 1)) {                         /* VERSION_1 (bit 32) */
        kprintf("probe: device lacks VIRTIO_F_VERSION_1\n");
        return -1;
    }
    C32(0x08) = 0; C32(0x0c) = 0;                   /* no device features needed */
    C32(0x08) = 1; C32(0x0c) = 1;                   /* VERSION_1 */
    C8(0x14) = S_ACK | S_DRIVER | S_FEATURES_OK;
    if (!(C8(0x14) & S_FEATURES_OK)) {
        kprintf("probe: device refused the features\n");
        return -1;
    }
    C16(0x16) = queue;
    qsize = C16(0x18);
    if (qsize > QSIZE)
        qsize = QSIZE;
    C16(0x18) = qsize;
    C16(0x1a) = 0xffff;                             /* no MSI-X vector: we poll */
    *(volatile u64 *)(common + 0x20) = (u64)ring_desc;
    *(volatile u64 *)(common + 0x28) = (u64)&ring_avail;
    *(volatile u64 *)(common + 0x30) = (u64)&ring_used;
    notify_addr += notify_off_base + (u64)C16(0x1e) * notify_mult;
    C16(0x1c) = 1;
    C8(0x14) = S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK;
    return 0;
}

static int blk_setup(void)
{
    return virtio_setup(VIRTIO_BLK_MODERN, "virtio-blk", 0);
}

/* Request in slot i (descriptors 3i..3i+2): header, data, status. */
static void blk_post(int i, u32 type, u64 sector, u64 buf, u32 len)
{
    struct desc *d = &ring_desc[3 * i];
    hdrs[i] = (struct blk_hdr){type, 0, sector};
    statuses[i] = 0xff;
    d[0] = (struct desc){(u64)&hdrs[i], sizeof(hdrs[i]), DESC_NEXT, (u16)(3 * i + 1)};
    d[1] = (struct desc){buf, len, (u16)(DESC_NEXT | (type == T_OUT ? 0 : DESC_WRITE)), (u16)(3 * i + 2)};
    d[2] = (struct desc){(u64)&statuses[i], 1, DESC_WRITE, 0};
    if (!len)                                       /* flush: header and status only */
        d[0].next = (u16)(3 * i + 2);
    ring_avail.ring[avail_idx % qsize] = (u16)(3 * i);
    avail_idx++;
}

static void blk_kick(void)
{
    __asm__ volatile("" ::: "memory");
    ring_avail.idx = avail_idx;
    __asm__ volatile("mfence" ::: "memory");
    *(volatile u16 *)notify_addr = 0;
}

/* The id of the next used element (spins). A used index more than the queue size ahead of
 * what we have seen is a device bug (or a torn write of the index): stop, as Linux does. */
static u32 used_next(void)
{
    u16 idx;
    while ((idx = *(volatile u16 *)&ring_used.idx) == used_seen)
        cpu_relax();
    if ((u16)(idx - used_seen) > qsize) {
        kprintf("probe: the device's used index %u is more than %u ahead of %u\n", idx, qsize, used_seen);
        kprintf("RESULT error=used_index\n");
        guest_exit(EXIT_FAIL);
    }
    /* the device wrote the element (and the status) before the index: read them after it, and
     * never from values the compiler remembers */
    __asm__ volatile("" ::: "memory");
    return ring_used.ring[used_seen++ % qsize].id;
}

/* The slot of the next completion (spins); its status in *status. */
static int blk_reap(u8 *status)
{
    u32 id = used_next();
    *status = *(volatile u8 *)&statuses[(id / 3) % QSIZE];
    return (int)(id / 3);
}

static int blk_sync(u32 type, u64 sector, u64 buf, u32 len)
{
    u8 st;
    blk_post(0, type, sector, buf, len);
    blk_kick();
    blk_reap(&st);
    return st;
}

static u64 capacity(void) { return *(volatile u64 *)devcfg; }

/* blk-check: the host wrote sector number (u64) + "CORRALDISK" at the start of every sector. */
int scenario_blk_check(int argc, char **argv)
{
    (void)argc, (void)argv;
    if (blk_setup())
        return EXIT_FAIL;
    u64 cap = capacity();
    kprintf("RESULT blk_capacity=%lu\n", cap);
    u8 *buf = (u8 *)BUF_BASE;
    int ok = 1;
    u64 checks[] = {0, 1, cap / 2, cap - 1};
    for (size_t k = 0; k < ARRAY_SIZE(checks); k++) {
        if (blk_sync(T_IN, checks[k], (u64)buf, 512) != 0 || *(u64 *)buf != checks[k]
            || memcmp(buf + 8, "CORRALDISK", 10)) {
            kprintf("probe: sector %lu read back wrong\n", checks[k]);
            ok = 0;
        }
    }
    memset(buf, 0, 512);
    memcpy(buf, "PROBE-WROTE-THIS", 16);
    if (blk_sync(T_OUT, 3, (u64)buf, 512) || blk_sync(T_FLUSH, 0, 0, 0))
        ok = 0;
    memset(buf, 0, 512);
    if (blk_sync(T_IN, 3, (u64)buf, 512) || memcmp(buf, "PROBE-WROTE-THIS", 16))
        ok = 0;
    if (blk_sync(T_IN, cap, (u64)buf, 512) == 0)    /* past the end must fail */
        ok = 0;
    memset(buf, 0, 32);
    if (blk_sync(T_GET_ID, 0, (u64)buf, 20) == 0) {
        buf[20] = 0;
        kprintf("RESULT blk_serial=%s\n", buf[0] ? (char *)buf : "-");
    }
    kprintf("RESULT blk_ok=%d\n", ok);
    return ok ? EXIT_OK : EXIT_FAIL;
}

static u64 rng_state = 0x9e3779b97f4a7c15ul;
static u64 rng_next(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

/* blk-bench rand4k|seq1m COUNT [read|write] [DEPTH]: COUNT requests, DEPTH in flight (default
 * 32 for rand4k, 8 for seq1m), timed with the TSC. Writes write whatever the buffers hold. */
int scenario_blk_bench(int argc, char **argv)
{
    u64 n, qd = 0;
    if (argc < 3 || parse_u64(argv[2], &n) || (!str_eq(argv[1], "rand4k") && !str_eq(argv[1], "seq1m"))
        || (argc > 3 && !str_eq(argv[3], "read") && !str_eq(argv[3], "write"))
        || (argc > 4 && (parse_u64(argv[4], &qd) || qd == 0))) {
        kprintf("probe: usage: blk-bench rand4k|seq1m COUNT [read|write] [DEPTH]\n");
        kprintf("RESULT error=usage\n");
        return EXIT_USAGE;
    }
    int seq = str_eq(argv[1], "seq1m");
    u32 type = argc > 3 && str_eq(argv[3], "write") ? T_OUT : T_IN;
    u32 len = seq ? (1u << 20) : 4096;
    int depth = qd ? (int)(qd < QSIZE ? qd : QSIZE) : seq ? 8 : 32;
    if (blk_setup())
        return EXIT_FAIL;
    if (depth > qsize / 3)
        depth = qsize / 3;
    u64 sectors = capacity(), span = len / 512, pos = 0;
    if (sectors < span * (u64)depth) {
        kprintf("probe: disk too small for blk-bench %s\n", argv[1]);
        return EXIT_FAIL;
    }
    tsc_calibrate();
    u64 issued = 0, done = 0, errors = 0;
    kprintf("BENCH start\n");
    u64 t0 = rdtsc();
    for (int i = 0; i < depth && issued < n; i++, issued++) {
        u64 sector = seq ? pos : (rng_next() % (sectors / span)) * span;
        pos = (pos + span) % (sectors - sectors % span);
        blk_post(i, type, sector, BUF_BASE + (u64)i * len, len);
    }
    blk_kick();
    int unkicked = 0;
    while (done < issued) {
        /* ring the doorbell only when nothing else has completed: batches the kicks */
        if (unkicked && *(volatile u16 *)&ring_used.idx == used_seen) {
            blk_kick();
            unkicked = 0;
        }
        u8 st;
        int slot = blk_reap(&st);
        done++;
        errors += st != 0;
        if (issued < n) {
            u64 sector = seq ? pos : (rng_next() % (sectors / span)) * span;
            pos = (pos + span) % (sectors - sectors % span);
            blk_post(slot, type, sector, BUF_BASE + (u64)slot * len, len);
            issued++;
            unkicked = 1;
        }
    }
    u64 t1 = rdtsc();
    kprintf("BENCH end\n");
    kprintf("RESULT blk_ops=%lu blk_bytes=%lu blk_errors=%lu tsc=%lu tsc_hz=%lu\n", done,
            done * len, errors, t1 - t0, tsc_hz);
    return errors ? EXIT_FAIL : EXIT_OK;
}

/* net-bench COUNT: send COUNT minimum-size Ethernet frames on the transmit queue, keeping the
 * ring full, timed with the TSC. Frames go to a MAC nobody has, so the host drops them. */
#define NET_HDR 12
#define FRAME 60
int scenario_net_bench(int argc, char **argv)
{
    u64 n;
    if (argc < 2 || parse_u64(argv[1], &n) || n == 0) {
        kprintf("probe: usage: net-bench COUNT\n");
        kprintf("RESULT error=usage\n");
        return EXIT_USAGE;
    }
    if (virtio_setup(VIRTIO_NET_MODERN, "virtio-net", 1))
        return EXIT_FAIL;
    u8 *bufs = (u8 *)BUF_BASE;
    for (u16 i = 0; i < qsize; i++) {
        u8 *b = bufs + (u64)i * 128;
        memset(b, 0, NET_HDR + FRAME);
        u8 *eth = b + NET_HDR;
        static const u8 dst[6] = {0x02, 0xc0, 0xff, 0xee, 0x00, 0x01};
        static const u8 src[6] = {0x52, 0x54, 0x00, 0x12, 0x34, 0x56};
        memcpy(eth, dst, 6);
        memcpy(eth + 6, src, 6);
        eth[12] = 0x88, eth[13] = 0xb5;                  /* local experimental ethertype */
        ring_desc[i] = (struct desc){(u64)b, NET_HDR + FRAME, 0, 0};
    }
    tsc_calibrate();
    u64 sent = 0, done = 0;
    kprintf("BENCH start\n");
    u64 t0 = rdtsc();
    for (u16 i = 0; i < qsize && sent < n; i++, sent++) {
        ring_avail.ring[avail_idx % qsize] = i;
        avail_idx++;
    }
    blk_kick();
    int unkicked = 0;
    while (done < sent || sent < n) {
        if (unkicked && *(volatile u16 *)&ring_used.idx == used_seen) {
            blk_kick();
            unkicked = 0;
        }
        u32 id = used_next();
        done++;
        if (sent < n) {
            ring_avail.ring[avail_idx % qsize] = (u16)(id % qsize);
            avail_idx++;
            sent++;
            unkicked = 1;
        }
    }
    u64 t1 = rdtsc();
    kprintf("BENCH end\n");
    kprintf("RESULT net_tx_frames=%lu tsc=%lu tsc_hz=%lu\n", done, t1 - t0, tsc_hz);
    return EXIT_OK;
}

/* net-rx-bench COUNT [SECONDS]: receive COUNT frames on the receive queue (the host floods the
 * tap), every buffer posted again as soon as it is reaped, timed with the TSC from the first
 * frame to the last. The available index is published with each buffer; the doorbell rings only
 * when the used ring is empty (the device may be waiting for buffers) or half a ring went by
 * without one. Frames carry a 32-bit sequence number after the 14-byte Ethernet header (the
 * host's flooder writes it): one that goes backwards (reordered, repeated, stale) or a frame
 * shorter than the minimum counts as an error; gaps are frames the host dropped. Gives up after
 * SECONDS (default 30) and reports what arrived. */
#define RX_BUF 2048
int scenario_net_rx_bench(int argc, char **argv)
{
    u64 n, limit_s = 30;
    if (argc < 2 || parse_u64(argv[1], &n) || n == 0 || (argc > 2 && parse_u64(argv[2], &limit_s))) {
        kprintf("probe: usage: net-rx-bench COUNT [SECONDS]\n");
        kprintf("RESULT error=usage\n");
        return EXIT_USAGE;
    }
    if (virtio_setup(VIRTIO_NET_MODERN, "virtio-net", 0))
        return EXIT_FAIL;
    u8 *bufs = (u8 *)BUF_BASE;
    for (u16 i = 0; i < qsize; i++) {
        ring_desc[i] = (struct desc){(u64)(bufs + (u64)i * RX_BUF), RX_BUF, DESC_WRITE, 0};
        ring_avail.ring[avail_idx % qsize] = i;
        avail_idx++;
    }
    tsc_calibrate();
    blk_kick();
    kprintf("BENCH start\n");
    u64 got = 0, errors = 0, other = 0, bytes = 0, t0 = 0, t1 = 0, kicks = 1;
    u64 deadline = rdtsc() + limit_s * tsc_hz;
    u32 last_seq = 0;
    int unkicked = 0, timed_out = 0;
    while (got < n) {
        u16 idx = *(volatile u16 *)&ring_used.idx;
        if (idx == used_seen) {
            if (unkicked) {
                blk_kick();
                unkicked = 0;
                kicks++;
            }
            if (rdtsc() > deadline) {
                timed_out = 1;
                break;
            }
            cpu_relax();
            continue;
        }
        if ((u16)(idx - used_seen) > qsize) {
            kprintf("RESULT error=used_index\n");
            return EXIT_FAIL;
        }
        __asm__ volatile("" ::: "memory");
        u32 id = ring_used.ring[used_seen % qsize].id, len = ring_used.ring[used_seen % qsize].len;
        used_seen++;
        volatile u8 *frame = bufs + (u64)(id % qsize) * RX_BUF + NET_HDR;
        if (len >= NET_HDR + 14 && (frame[12] != 0x88 || frame[13] != 0xb5)) {
            other++;                                /* the host's own traffic: not the flood */
        } else {
            if (!got)
                t0 = rdtsc();
            got++;
            bytes += len;
            u32 seq = *(volatile u32 *)(frame + 14);
            if (id >= qsize || len < NET_HDR + FRAME || len > RX_BUF || (got > 1 && seq <= last_seq))
                errors++;
            last_seq = seq;
        }
        ring_avail.ring[avail_idx % qsize] = (u16)(id % qsize);
        avail_idx++;
        __asm__ volatile("" ::: "memory");
        ring_avail.idx = avail_idx;                 /* the buffer is the device's again */
        if (++unkicked >= qsize / 2) {
            blk_kick();
            unkicked = 0;
            kicks++;
        }
    }
    t1 = rdtsc();
    kprintf("BENCH end\n");
    kprintf("RESULT net_rx_frames=%lu net_rx_bytes=%lu net_rx_errors=%lu net_rx_other=%lu "
            "net_rx_kicks=%lu net_rx_timeout=%d tsc=%lu tsc_hz=%lu\n", got, bytes, errors, other,
            kicks, timed_out, got ? t1 - t0 : 0, tsc_hz);
    return errors || timed_out ? EXIT_FAIL : EXIT_OK;
}
