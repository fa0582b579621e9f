/* Ring-3 polling drivers for modern virtio-pci devices (virtio 1.x), for benchmarks: a block
 * device (one request queue) and a network device (its transmit or its receive queue); the
 * transport part (virtio_open, virtio_queue, vq_*) also serves vsock.c.
 *
 * PCI bus 0 is scanned through ports 0xCF8/0xCFC; the device's common, notify and device
 * configuration blocks are found through its vendor capabilities and used in place (the probe
 * identity-maps 0-4 GiB for ring 3). No interrupts: MSI-X vectors stay at NO_VECTOR and the
 * used ring is polled. Split rings in BSS (struct vq), request buffers at BUF_BASE. */
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

#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4
#define T_GET_ID 8

struct blk_hdr { u32 type, reserved; u64 sector; };

static struct vq q;                                 /* the one queue blk and net use */
static struct blk_hdr hdrs[QSIZE];
static u8 statuses[QSIZE];

static u64 common, notify_base, devcfg;
static u32 notify_mult;

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

/* Find device `pci_id` on bus 0, reset it and negotiate VERSION_1 and `features` (bits 0-31,
 * each of which the device must offer; status FEATURES_OK); queues are then set up with
 * virtio_queue and the device started with virtio_go. */
int virtio_open(u16 pci_id, const char *name, u32 features)
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
    common = notify_base = devcfg = 0;
    for (u32 cap = pci_read(slot, 0x34) & 0xfc; cap; cap = (pci_read(slot, cap) >> 8) & 0xfc) {
        u32 head = pci_read(slot, cap);
        if ((head & 0xff) != CAP_VENDOR)
            continue;
        u32 type = (head >> 24) & 0xff, bar = pci_read(slot, cap + 4) & 0xff;
        u64 at = bar_address(slot, bar) + pci_read(slot, cap + 8);
        if (type == CFG_COMMON)
            common = at;
        else if (type == CFG_NOTIFY) {
            notify_base = at;
            notify_mult = pci_read(slot, cap + 16);
        } else if (type == CFG_DEVICE)
            devcfg = at;
    }
    if (!common || !notify_base || !devcfg || common >= (4ul << 30)) {
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
    C32(0x00) = 0;
    if ((C32(0x04) & features) != features) {
        kprintf("probe: device offers features %x, not all of %x\n", C32(0x04), features);
        return -1;
    }
    C32(0x08) = 0; C32(0x0c) = features;
    C32(0x08) = 1; C32(0x0c) = 1;                   /* VERSION_1 */
    C8(0x14) = S_ACK | S_DRIVER | S_FEATURES_OK;
    if (!(C8(0x14) & S_FEATURES_OK)) {
        kprintf("probe: device refused the features\n");
        return -1;
    }
    return 0;
}

/* Queue `index` on `vq`'s rings (at most QSIZE entries), no MSI-X vector: we poll. */
void virtio_queue(struct vq *vq, u16 index)
{
    C16(0x16) = index;
    u16 size = C16(0x18);
    vq->size = size > QSIZE ? QSIZE : size;
    vq->avail_idx = vq->used_seen = 0;
    C16(0x18) = vq->size;
    C16(0x1a) = 0xffff;
    *(volatile u64 *)(common + 0x20) = (u64)vq->desc;
    *(volatile u64 *)(common + 0x28) = (u64)&vq->avail;
    *(volatile u64 *)(common + 0x30) = (u64)&vq->used;
    vq->notify = notify_base + (u64)C16(0x1e) * notify_mult;
    C16(0x1c) = 1;
}

void virtio_go(void)
{
    C8(0x14) = S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK;
}

u64 virtio_devcfg(void) { return devcfg; }

/* One queue `queue` of device `pci_id` on q with `features` negotiated (the device's other
 * queues stay disabled). */
static int virtio_setup(u16 pci_id, const char *name, u16 queue, u32 features)
{
    if (virtio_open(pci_id, name, features))
        return -1;
    virtio_queue(&q, queue);
    virtio_go();
    return 0;
}

/* Offer chain `head` (not yet visible: vq_kick publishes). */
void vq_post(struct vq *vq, u16 head)
{
    vq->avail.ring[vq->avail_idx % vq->size] = head;
    vq->avail_idx++;
}

/* Publish the posted chains and ring the doorbell. */
void vq_kick(struct vq *vq)
{
    __asm__ volatile("" ::: "memory");
    *(volatile u16 *)&vq->avail.idx = vq->avail_idx;
    __asm__ volatile("mfence" ::: "memory");
    *(volatile u16 *)vq->notify = 0;
}

/* Whether the device has used a chain we have not seen. A used index more than the queue size
 * ahead of what we have seen is a device bug (or a torn write of the index): stop, as Linux does. */
int vq_has_used(struct vq *vq)
{
    u16 idx = *(volatile u16 *)&vq->used.idx;
    if ((u16)(idx - vq->used_seen) > vq->size) {
        kprintf("probe: the device's used index %u is more than %u ahead of %u\n", idx, vq->size,
                vq->used_seen);
        kprintf("RESULT error=used_index\n");
        guest_exit(EXIT_FAIL);
    }
    return idx != vq->used_seen;
}

/* The next used element's id and length (spins until there is one). */
u32 vq_next(struct vq *vq, u32 *len)
{
    while (!vq_has_used(vq))
        cpu_relax();
    /* the device wrote the element (and the buffer) before the index: read them after it, and
     * never from values the compiler remembers */
    __asm__ volatile("" ::: "memory");
    volatile struct vq_used_elem *e = &vq->used.ring[vq->used_seen++ % vq->size];
    if (len)
        *len = e->len;
    return e->id;
}

static int blk_setup(void)
{
    return virtio_setup(VIRTIO_BLK_MODERN, "virtio-blk", 0, 0);
}

/* Request in slot i (descriptors 3i..3i+2): header, data, status. */
static void blk_post(int i, u32 type, u64 sector, u64 buf, u32 len)
{
    struct vq_desc *d = &q.desc[3 * i];
    hdrs[i] = (struct blk_hdr){type, 0, sector};
    statuses[i] = 0xff;
    d[0] = (struct vq_desc){(u64)&hdrs[i], sizeof(hdrs[i]), DESC_NEXT, (u16)(3 * i + 1)};
    d[1] = (struct vq_desc){buf, len, (u16)(DESC_NEXT | (type == T_OUT ? 0 : DESC_WRITE)), (u16)(3 * i + 2)};
    d[2] = (struct vq_desc){(u64)&statuses[i], 1, DESC_WRITE, 0};
    if (!len)                                       /* flush: header and status only */
        d[0].next = (u16)(3 * i + 2);
    vq_post(&q, (u16)(3 * i));
}

/* The slot of the next completion (spins); its status in *status. */
static int blk_reap(u8 *status)
{
    u32 id = vq_next(&q, NULL);
    *status = *(volatile u8 *)&statuses[(id / 3) % QSIZE];
    return (int)(id / 3);
}

static int blk_sync(u32 type, u64 sector, u64 buf, u32 len)
{
    u8 st;
    blk_post(0, type, sector, buf, len);
    vq_kick(&q);
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
    if (depth > q.size / 3)
        depth = q.size / 3;
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
    vq_kick(&q);
    int unkicked = 0;
    while (done < issued) {
        /* ring the doorbell only when nothing else has completed: batches the kicks */
        if (unkicked && *(volatile u16 *)&q.used.idx == q.used_seen) {
            vq_kick(&q);
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

#define NET_HDR 12
#define FRAME 60

/* Descriptor i: a minimum-size frame (virtio-net header, then Ethernet) to a MAC nobody has. */
static void net_frames(void)
{
    u8 *bufs = (u8 *)BUF_BASE;
    for (u16 i = 0; i < q.size; i++) {
        u8 *b = bufs + (u64)i * 128;
        memset(b, 0, NET_HDR + FRAME);
        u8 *eth = b + NET_HDR;
        static const u8 dst[6] = {0x02, 0xc0, 0xff, 0xee, 0x00, 0x01};
        static const u8 src[6] = {0x52, 0x54, 0x00, 0x12, 0x34, 0x56};
        memcpy(eth, dst, 6);
        memcpy(eth + 6, src, 6);
        eth[12] = 0x88, eth[13] = 0xb5;                  /* local experimental ethertype */
        q.desc[i] = (struct vq_desc){(u64)b, NET_HDR + FRAME, 0, 0};
    }
}

/* net-bench COUNT: send COUNT minimum-size Ethernet frames on the transmit queue, keeping the
 * ring full, timed with the TSC. Frames go to a MAC nobody has, so the host drops them. */
int scenario_net_bench(int argc, char **argv)
{
    u64 n;
    if (argc < 2 || parse_u64(argv[1], &n) || n == 0) {
        kprintf("probe: usage: net-bench COUNT\n");
        kprintf("RESULT error=usage\n");
        return EXIT_USAGE;
    }
    if (virtio_setup(VIRTIO_NET_MODERN, "virtio-net", 1, 0))
        return EXIT_FAIL;
    net_frames();
    tsc_calibrate();
    u64 sent = 0, done = 0;
    kprintf("BENCH start\n");
    u64 t0 = rdtsc();
    for (u16 i = 0; i < q.size && sent < n; i++, sent++) {
        vq_post(&q, i);
    }
    vq_kick(&q);
    int unkicked = 0;
    while (done < sent || sent < n) {
        if (unkicked && *(volatile u16 *)&q.used.idx == q.used_seen) {
            vq_kick(&q);
            unkicked = 0;
        }
        u32 id = vq_next(&q, NULL);
        done++;
        if (sent < n) {
            vq_post(&q, (u16)(id % q.size));
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
    if (virtio_setup(VIRTIO_NET_MODERN, "virtio-net", 0, 0))
        return EXIT_FAIL;
    u8 *bufs = (u8 *)BUF_BASE;
    for (u16 i = 0; i < q.size; i++) {
        q.desc[i] = (struct vq_desc){(u64)(bufs + (u64)i * RX_BUF), RX_BUF, DESC_WRITE, 0};
        vq_post(&q, i);
    }
    tsc_calibrate();
    vq_kick(&q);
    kprintf("BENCH start\n");
    u64 got = 0, errors = 0, other = 0, bytes = 0, t0 = 0, t1 = 0, kicks = 1;
    u64 deadline = rdtsc() + limit_s * tsc_hz;
    u32 last_seq = 0;
    int unkicked = 0, timed_out = 0;
    while (got < n) {
        u16 idx = *(volatile u16 *)&q.used.idx;
        if (idx == q.used_seen) {
            if (unkicked) {
                vq_kick(&q);
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
        if ((u16)(idx - q.used_seen) > q.size) {
            kprintf("RESULT error=used_index\n");
            return EXIT_FAIL;
        }
        __asm__ volatile("" ::: "memory");
        u32 id = q.used.ring[q.used_seen % q.size].id, len = q.used.ring[q.used_seen % q.size].len;
        q.used_seen++;
        volatile u8 *frame = bufs + (u64)(id % q.size) * RX_BUF + NET_HDR;
        if (len >= NET_HDR + 14 && (frame[12] != 0x88 || frame[13] != 0xb5)) {
            other++;                                /* the host's own traffic: not the flood */
        } else {
            if (!got)
                t0 = rdtsc();
            got++;
            bytes += len;
            u32 seq = *(volatile u32 *)(frame + 14);
            if (id >= q.size || len < NET_HDR + FRAME || len > RX_BUF || (got > 1 && seq <= last_seq))
                errors++;
            last_seq = seq;
        }
        vq_post(&q, (u16)(id % q.size));
        __asm__ volatile("" ::: "memory");
        q.avail.idx = q.avail_idx;                 /* the buffer is the device's again */
        if (++unkicked >= q.size / 2) {
            vq_kick(&q);
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

/* ---- EVENT_IDX (virtio 1.2, 2.7.7.2 and 2.7.10): kicks only where the device asks for them ----
 * The device publishes avail_event (the avail index at which it wants the next kick) and then
 * reads the avail index; the driver publishes the avail index and then reads avail_event. Each
 * side needs a full barrier between its store and its load: x86 lets a load pass an earlier
 * store, and without the barriers both can read the other's stale index, so the device goes to
 * sleep while the driver decides not to kick, and the queue stalls for good. This driver never
 * kicks otherwise, so a device that gets its side wrong stalls it; the stall is reported. */
#define F_EVENT_IDX (1u << 29)

static u16 published;                           /* q's avail idx as last published */
static u64 evidx_kicks, evidx_stalls, evidx_bad;  /* evidx_bad: completions that failed a check */
static u64 evidx_tsc;                           /* the run's TSC ticks, BENCH start to end */

/* vring_need_event: does moving an index from `old` to `new_idx` pass the other side's
 * `event`, the index it asked to be told at? */
static int need_event(u16 event, u16 new_idx, u16 old)
{
    return (u16)(new_idx - event - 1) < (u16)(new_idx - old);
}

/* Publish q's avail index `new_idx` (vq_post wrote the entries below it), and kick if that
 * passes the device's avail event. */
static void evidx_publish(u16 new_idx)
{
    u16 old = published;
    __asm__ volatile("" ::: "memory");          /* ring entries before the index (x86: in order) */
    *(volatile u16 *)&q.avail.idx = new_idx;
    published = new_idx;
    /* the index out before avail_event is read: pairs with the device's barrier after its
     * avail_event store (Linux's virtio_mb in virtqueue_kick_prepare) */
    __asm__ volatile("mfence" ::: "memory");
    if (need_event(*(volatile u16 *)&q.used.avail_event, new_idx, old)) {
        *(volatile u16 *)q.notify = 0;
        evidx_kicks++;
    }
}

/* No completion for `stall` TSC ticks with everything published and requests out: a lost kick
 * (or a dead device). Say so, then `RESULT error=stall` and exit failing; with `recover`,
 * count it and kick past it. */
static void evidx_stalled(u64 stall, int recover, u64 done)
{
    u16 event = *(volatile u16 *)&q.used.avail_event, used = *(volatile u16 *)&q.used.idx;
    kprintf("probe: stall: no completion in %lu ms; avail idx %u, device's avail event %u, "
            "used idx %u, %lu done, %lu kicks\n", stall * 1000 / tsc_hz, published, event, used,
            done, evidx_kicks);
    if (!recover) {
        kprintf("RESULT error=stall evidx_ops=%lu evidx_kicks=%lu\n", done, evidx_kicks);
        guest_exit(EXIT_FAIL);
    }
    evidx_stalls++;
    *(volatile u16 *)q.notify = 0;
    evidx_kicks++;
}

/* What an EVENT_IDX run does with a request: `post` makes slot `slot`'s next one available
 * (vq_post: q.avail_idx moves, nothing is published), `complete` checks the used element of
 * one that came back (a failed check counts in evidx_bad) and returns its slot, or -1 for an id
 * it never posted. */
struct evidx_ops {
    void (*post)(u32 slot);
    int (*complete)(u32 id, u32 len);
};

/* A run's arguments: COUNT, DEPTH (cut to the queue), SPREAD_NS in TSC ticks, `recover`. */
struct evidx_args {
    u64 n, spread;
    u32 depth;
    int recover;
};

/* The run on q, between `BENCH start` and `BENCH end` (timed into evidx_tsc): `depth` requests
 * out, each completion refilled at once; the refills published together, or with `spread` (TSC
 * ticks) one at a time, a random 0..spread apart. Stops after `n` completions (or when no slot
 * is left to refill); returns the completions. A used index too far ahead ends the run in
 * vq_has_used (`RESULT error=used_index`). */
static u64 evidx_run(const struct evidx_ops *ops, const struct evidx_args *a)
{
    u64 n = a->n, spread = a->spread, stall = a->recover ? tsc_hz / 5 : 2 * tsc_hz, issued = 0, done = 0;
    u32 depth = a->depth;
    kprintf("BENCH start\n");
    u64 jitter = 0x2545f4914f6cdd1dul, t0 = rdtsc(), progress = t0, next_publish = t0;
    published = q.avail_idx;
    for (u32 i = 0; i < depth && issued < n; i++, issued++)
        ops->post(i);
    while (done < issued) {
        if (vq_has_used(&q)) {
            while (done < issued && vq_has_used(&q)) {  /* bounded by what is out */
                u32 len, id = vq_next(&q, &len);
                done++;
                int slot = ops->complete(id, len);
                if (slot < 0 || (u32)slot >= depth)
                    evidx_bad++;                /* not an id we posted: the device's bug */
                else if (issued < n) {
                    ops->post((u32)slot);
                    issued++;
                }
            }
            progress = rdtsc();
        }
        if (published != q.avail_idx) {
            if (!spread) {
                evidx_publish(q.avail_idx);
            } else if (rdtsc() >= next_publish) {
                evidx_publish((u16)(published + 1));
                jitter ^= jitter << 13, jitter ^= jitter >> 7, jitter ^= jitter << 17;
                next_publish = rdtsc() + jitter % spread;
            }
        } else if (done < issued && rdtsc() - progress > stall) {
            evidx_stalled(stall, a->recover, done);
            progress = rdtsc();
        }
    }
    evidx_tsc = rdtsc() - t0;
    kprintf("BENCH end\n");
    return done;
}

/* Both scenarios' start: COUNT [DEPTH [SPREAD_NS]] [recover] parsed (SPREAD_NS comes back in
 * TSC ticks), then queue `queue` of device `pci_id` set up on q with EVENT_IDX, and DEPTH cut
 * to the requests of `per` descriptors each that fit the queue. Nonzero: the exit status (the
 * usage line or the reason was printed). */
static int evidx_start(int argc, char **argv, const char *name, u16 pci_id, const char *dev, u16 queue,
                       u32 per, struct evidx_args *a)
{
    u64 spread_ns = 0, qd = 32;
    a->recover = argc > 2 && str_eq(argv[argc - 1], "recover");
    int nums = argc - a->recover;
    if (nums < 2 || nums > 4 || parse_u64(argv[1], &a->n) || a->n == 0
        || (nums > 2 && (parse_u64(argv[2], &qd) || qd == 0))
        || (nums > 3 && (parse_u64(argv[3], &spread_ns) || spread_ns > 1000000))) {
        kprintf("probe: usage: %s COUNT [DEPTH [SPREAD_NS]] [recover]\n", name);
        kprintf("RESULT error=usage\n");
        return EXIT_USAGE;
    }
    tsc_calibrate();
    a->spread = spread_ns * tsc_hz / 1000000000ul;
    if (virtio_setup(pci_id, dev, queue, F_EVENT_IDX))
        return EXIT_FAIL;
    a->depth = (u32)(qd < q.size / per ? qd : q.size / per);
    return 0;
}

static u64 evidx_want[QSIZE], evidx_sum;      /* blk-evidx: the sector each slot asked for */
static u64 evidx_sectors;

static void blk_evidx_post(u32 slot)
{
    evidx_want[slot] = rng_next() % evidx_sectors;
    blk_post((int)slot, T_IN, evidx_want[slot], BUF_BASE + (u64)slot * 512, 512);
}

static int blk_evidx_complete(u32 id, u32 len)
{
    (void)len;
    u32 slot = id / 3;
    if (id % 3 || slot >= QSIZE / 3)
        return -1;
    const volatile u8 *buf = (const volatile u8 *)(BUF_BASE + (u64)slot * 512);
    u64 got = *(const volatile u64 *)buf;
    evidx_sum += got;
    if (*(volatile u8 *)&statuses[slot] != 0 || got != evidx_want[slot]
        || memcmp((const void *)(buf + 8), "CORRALDISK", 10))
        evidx_bad++;
    return (int)slot;
}

/* blk-evidx COUNT [DEPTH [SPREAD_NS]] [recover]: COUNT one-sector reads of random sectors with
 * EVENT_IDX, DEPTH in flight (default 32, at most a third of the queue), each completion
 * checked (status 0, the sector's number and CORRALDISK at its start: a patterned disk) and
 * refilled at once; kicks only where need_event says. The refills are published together, or
 * with SPREAD_NS one at a time, a random 0..SPREAD_NS apart, so publishes also land while the
 * device ends a pass (where the race is) rather than only right after its completions. The sum
 * of the sector numbers read is printed (xorshift64 from the probe's seed, modulo the
 * capacity: the host can follow). No completion for 2 s with everything published:
 * `RESULT error=stall`; with `recover`, a stall counts after 200 ms and is kicked past (to
 * measure how often a device stalls). */
int scenario_blk_evidx(int argc, char **argv)
{
    struct evidx_args a;
    int rc = evidx_start(argc, argv, "blk-evidx", VIRTIO_BLK_MODERN, "virtio-blk", 0, 3, &a);
    if (rc)
        return rc;
    evidx_sectors = capacity();
    if (evidx_sectors == 0) {
        kprintf("probe: empty disk\n");
        return EXIT_FAIL;
    }
    static const struct evidx_ops ops = {blk_evidx_post, blk_evidx_complete};
    u64 done = evidx_run(&ops, &a);
    kprintf("RESULT evidx_ops=%lu evidx_bytes=%lu evidx_bad=%lu evidx_sum=%lu evidx_kicks=%lu "
            "evidx_stalls=%lu tsc=%lu tsc_hz=%lu\n", done, done * 512, evidx_bad, evidx_sum, evidx_kicks,
            evidx_stalls, evidx_tsc, tsc_hz);
    return evidx_bad || done != a.n ? EXIT_FAIL : EXIT_OK;
}

static void net_evidx_post(u32 slot)
{
    vq_post(&q, (u16)slot);
}

static int net_evidx_complete(u32 id, u32 len)
{
    (void)len;                                  /* a transmit buffer comes back with 0 written */
    return id < q.size ? (int)id : -1;
}

/* net-evidx COUNT [DEPTH [SPREAD_NS]] [recover]: blk-evidx's run on virtio-net's transmit
 * queue: COUNT minimum-size frames (net-bench's, to a MAC nobody has), DEPTH in flight (at most
 * the queue). */
int scenario_net_evidx(int argc, char **argv)
{
    struct evidx_args a;
    int rc = evidx_start(argc, argv, "net-evidx", VIRTIO_NET_MODERN, "virtio-net", 1, 1, &a);
    if (rc)
        return rc;
    net_frames();
    static const struct evidx_ops ops = {net_evidx_post, net_evidx_complete};
    u64 done = evidx_run(&ops, &a);
    kprintf("RESULT evidx_ops=%lu evidx_bad=%lu evidx_kicks=%lu evidx_stalls=%lu tsc=%lu tsc_hz=%lu\n",
            done, evidx_bad, evidx_kicks, evidx_stalls, evidx_tsc, tsc_hz);
    return evidx_bad || done != a.n ? EXIT_FAIL : EXIT_OK;
}
