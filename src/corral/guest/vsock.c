/* A ring-3 polling virtio-vsock driver (virtio 1.x, section 5.10), for stream throughput:
 *
 *   vsock-tx-bench PORT SIZE [CHUNK] [close]  connect to the host (CID 2) on PORT, send SIZE bytes
 *   vsock-rx-bench PORT SIZE [BUF]            listen on PORT, take one connection, receive SIZE
 *
 * SIZE (up to 4G, with K/M/G) is the stream's length.
 *
 * CHUNK (up to 64 KiB, Linux's largest packet) is the payload per transmitted packet; BUF (up to
 * 64 KiB, default 64K; Linux posts 4K) the payload room of each posted receive buffer.
 *
 * One stream, no interrupts: the rx (0) and tx (1) queues are polled; the event queue stays
 * disabled (it only carries transport resets after a restore). Credit follows the spec: we never
 * send more than the peer's buf_alloc - (tx_cnt - peer fwd_cnt), every header we send carries our
 * own buf_alloc and fwd_cnt, and we announce consumption with CREDIT_UPDATE once a quarter of
 * our buf_alloc has been consumed since the last announcement. Where the peer's credit runs out
 * and nothing arrives for a while, we ask with CREDIT_REQUEST.
 *
 * Data: the transmitted stream's 8-byte word at byte offset o is (o / 8 + 1) * K (a function of
 * the position, so a lost, repeated or reordered packet changes the checksum); both benches print
 * the CRC-32 (zlib's) of the bytes they sent or received, for the host to compare with its own.
 * Transmit is timed from the connection to the host's acknowledging the last byte (its fwd_cnt);
 * receive from the first data byte to the last. `close` ends a transmit as Linux's close() does:
 * a full SHUTDOWN at once after the last byte, without waiting for the host to take it. */
#include "probe.h"

#define VIRTIO_VSOCK_MODERN 0x1053
#define HOST_CID 2
#define TYPE_STREAM 1
enum { OP_REQUEST = 1, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST };
#define SHUTDOWN_BOTH 3

struct vsock_hdr {
    u64 src_cid, dst_cid;
    u32 src_port, dst_port, len;
    u16 type, op;
    u32 flags, buf_alloc, fwd_cnt;
} __attribute__((packed));

#define MiB (1ul << 20)
#define MAX_PKT (64u << 10)              /* largest payload we send or post a buffer for */
#define RX_STRIDE (MAX_PKT + 4096)        /* one receive buffer: header + payload, page apart */
#define RX_BASE BUF_BASE                 /* 128 receive buffers: 8.5 MiB */
#define TX_BASE (BUF_BASE + 16 * MiB)     /* 64 transmit payload slots, RX_STRIDE apart */
#define TX_SLOTS (QSIZE / 2)             /* slot i: descriptors 2i (header) and 2i+1 (payload) */
#define BUF_ALLOC (256u << 10)           /* our receive buffer space, as Linux's default */
#define LOCAL_PORT 49152u
#define MAX_STREAM (4095 * MiB)          /* the 32-bit stream counters wrap at most once */
#define CREDIT_ASK_US 2000               /* ask for credit after this long without any */
#define WORD_K 0x9E3779B97F4A7C15ul

static struct vq rxq, txq;
static struct vsock_hdr tx_hdr[TX_SLOTS];
static u16 tx_free[TX_SLOTS], tx_nfree;
static u64 guest_cid;
static u32 rx_buf = MAX_PKT;

/* the one stream */
static struct {
    u32 local_port, peer_port;
    int state;                            /* 0 none, 1 connecting, 2 connected, 3 reset/closed */
    u32 peer_buf_alloc, peer_fwd_cnt;     /* from the host's last header */
    u32 tx_cnt, fwd_cnt, announced;       /* bytes sent; bytes consumed; fwd_cnt last sent */
    u64 packets, credit_asks, rst_seen, shutdown_seen;
} st;

/* ---- CRC-32 (IEEE, reflected: zlib's), eight bytes a step */
static u32 crc_tab[8][256];

static void crc_init(void)
{
    for (u32 i = 0; i < 256; i++) {
        u32 c = i;
        for (int k = 0; k < 8; k++)
            c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_tab[0][i] = c;
    }
    for (u32 i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            crc_tab[t][i] = (crc_tab[t - 1][i] >> 8) ^ crc_tab[0][crc_tab[t - 1][i] & 0xff];
}

/* crc is the running value, ~0 to start; the final CRC is its complement */
static u32 crc_update(u32 crc, const volatile u8 *p, u64 n)
{
    for (; n && ((u64)p & 7); n--)
        crc = crc_tab[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
    for (; n >= 8; n -= 8, p += 8) {
        u64 w = *(const volatile u64 *)p ^ crc;
        crc = crc_tab[7][w & 0xff] ^ crc_tab[6][(w >> 8) & 0xff] ^ crc_tab[5][(w >> 16) & 0xff]
            ^ crc_tab[4][(w >> 24) & 0xff] ^ crc_tab[3][(w >> 32) & 0xff] ^ crc_tab[2][(w >> 40) & 0xff]
            ^ crc_tab[1][(w >> 48) & 0xff] ^ crc_tab[0][w >> 56];
    }
    for (; n; n--)
        crc = crc_tab[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return crc;
}

/* ---- queues */

static void rx_post(u16 i)
{
    rxq.desc[i] = (struct vq_desc){RX_BASE + (u64)i * RX_STRIDE, sizeof(struct vsock_hdr) + rx_buf,
                                   DESC_WRITE, 0};
    vq_post(&rxq, i);
}

static int setup(void)
{
    if (virtio_open(VIRTIO_VSOCK_MODERN, "virtio-vsock", 0))
        return -1;
    virtio_queue(&rxq, 0);
    virtio_queue(&txq, 1);
    guest_cid = *(volatile u64 *)virtio_devcfg();
    virtio_go();
    for (u16 i = 0; i < rxq.size; i++)
        rx_post(i);
    vq_kick(&rxq);
    tx_nfree = 0;
    for (u16 i = 0; i < txq.size / 2 && i < TX_SLOTS; i++)
        tx_free[tx_nfree++] = i;
    crc_init();
    tsc_calibrate();
    kprintf("probe: vsock cid=%lu rx=%u tx=%u\n", guest_cid, rxq.size, txq.size);
    return 0;
}

static void tx_reap(void)
{
    while (vq_has_used(&txq)) {
        u32 id = vq_next(&txq, NULL);
        if (id % 2 || id / 2 >= TX_SLOTS || tx_nfree >= TX_SLOTS) {
            kprintf("probe: vsock: the device used tx descriptor %u, never a head\n", id);
            kprintf("RESULT error=used_id\n");
            guest_exit(EXIT_FAIL);
        }
        tx_free[tx_nfree++] = (u16)(id / 2);
    }
}

static int tx_slot(void)
{
    tx_reap();
    while (!tx_nfree) {
        cpu_relax();
        tx_reap();
    }
    return tx_free[--tx_nfree];
}

/* Post a packet for the stream, its `len` bytes of payload at `data` (in the slot's buffer); the
 * caller kicks. Every header carries our credit. */
static void tx_post(int slot, u16 op, u32 flags, u64 data, u32 len)
{
    struct vsock_hdr *h = &tx_hdr[slot];
    *h = (struct vsock_hdr){guest_cid, HOST_CID, st.local_port, st.peer_port, len, TYPE_STREAM, op,
                            flags, BUF_ALLOC, st.fwd_cnt};
    st.announced = st.fwd_cnt;
    txq.desc[2 * slot] = (struct vq_desc){(u64)h, sizeof(*h), (u16)(len ? DESC_NEXT : 0), (u16)(2 * slot + 1)};
    if (len)
        txq.desc[2 * slot + 1] = (struct vq_desc){data, len, 0, 0};
    vq_post(&txq, (u16)(2 * slot));
}

static void tx_control(u16 op, u32 flags)
{
    tx_post(tx_slot(), op, flags, 0, 0);
    vq_kick(&txq);
}

/* A reset for a packet that is not our stream's (the spec's answer to an unknown connection). */
static void tx_rst_to(const volatile struct vsock_hdr *h)
{
    int slot = tx_slot();
    tx_hdr[slot] = (struct vsock_hdr){guest_cid, h->src_cid, h->dst_port, h->src_port, 0, TYPE_STREAM,
                                      OP_RST, 0, 0, 0};
    txq.desc[2 * slot] = (struct vq_desc){(u64)&tx_hdr[slot], sizeof(tx_hdr[slot]), 0, 0};
    vq_post(&txq, (u16)(2 * slot));
    vq_kick(&txq);
}

static u32 peer_credit(void)
{
    return st.peer_buf_alloc - (st.tx_cnt - st.peer_fwd_cnt);
}

/* Handle every packet the device has put in the receive queue, reposting each buffer.
 * `listen` (receive bench, not yet connected) accepts a REQUEST to our port. RW payloads are
 * folded into *crc and counted. Returns how many packets were handled. */
static u64 rx_poll(int listen, u32 *crc, u64 *got, u64 *first_tsc)
{
    u64 n = 0;
    while (vq_has_used(&rxq)) {
        u32 len, id = vq_next(&rxq, &len);
        if (id >= rxq.size) {
            kprintf("probe: vsock: the device used rx descriptor %u of %u\n", id, rxq.size);
            kprintf("RESULT error=used_id\n");
            guest_exit(EXIT_FAIL);
        }
        const volatile struct vsock_hdr *h = (const volatile struct vsock_hdr *)(RX_BASE + (u64)id * RX_STRIDE);
        n++;
        if (len < sizeof(*h) || h->len > len - sizeof(*h) || h->len > MAX_PKT) {
            kprintf("probe: vsock: a packet of %u bytes says it carries %u\n", len, h->len);
            kprintf("RESULT error=bad_packet\n");
            guest_exit(EXIT_FAIL);
        }
        int ours = h->type == TYPE_STREAM && h->src_cid == HOST_CID && h->dst_cid == guest_cid
            && h->dst_port == st.local_port && (st.state != 2 || h->src_port == st.peer_port);
        if (!ours) {
            if (h->op != OP_RST)
                tx_rst_to(h);
        } else if (h->op == OP_REQUEST && listen && st.state == 0) {
            st.peer_port = h->src_port;
            st.peer_buf_alloc = h->buf_alloc;
            st.peer_fwd_cnt = h->fwd_cnt;
            st.state = 2;
            tx_control(OP_RESPONSE, 0);
        } else {
            st.peer_buf_alloc = h->buf_alloc;
            st.peer_fwd_cnt = h->fwd_cnt;
            switch (h->op) {
            case OP_RESPONSE:
                if (st.state == 1)
                    st.state = 2;
                break;
            case OP_RST:
                st.rst_seen++;
                st.state = 3;
                break;
            case OP_SHUTDOWN:
                st.shutdown_seen++;
                break;
            case OP_CREDIT_REQUEST:
                tx_control(OP_CREDIT_UPDATE, 0);
                break;
            case OP_RW:
                if (st.state == 2 && crc) {
                    if (!*got && first_tsc)
                        *first_tsc = rdtsc();
                    *crc = crc_update(*crc, (const volatile u8 *)(h + 1), h->len);
                    *got += h->len;
                    st.fwd_cnt += h->len;
                    st.packets++;
                }
                break;
            default:
                break;
            }
        }
        rx_post((u16)id);
    }
    if (n) {
        vq_kick(&rxq);                        /* the buffers are the device's again */
        if (st.state == 2 && st.fwd_cnt - st.announced >= BUF_ALLOC / 4)
            tx_control(OP_CREDIT_UPDATE, 0);
    }
    return n;
}

static int usage(const char *what)
{
    kprintf("probe: usage: %s\n", what);
    kprintf("RESULT error=usage\n");
    return EXIT_USAGE;
}

/* Wait (polling) until `done` or `seconds` pass; 0 when done. */
#define WAIT_UNTIL(cond, seconds)                                                                   \
    ({                                                                                              \
        u64 _end = rdtsc() + (u64)(seconds) * tsc_hz;                                               \
        while (!(cond) && rdtsc() < _end)                                                           \
            if (!rx_poll(0, NULL, NULL, NULL))                                                      \
                cpu_relax();                                                                        \
        (cond) ? 0 : -1;                                                                            \
    })

int scenario_vsock_tx_bench(int argc, char **argv)
{
    u64 port, total, chunk = MAX_PKT;
    int close_at_once = argc > 1 && str_eq(argv[argc - 1], "close");
    if (close_at_once)
        argc--;
    if (argc < 3 || parse_u64(argv[1], &port) || port > 0xffffffffu || parse_size(argv[2], &total) || !total
        || total > MAX_STREAM || (argc > 3 && (parse_size(argv[3], &chunk) || !chunk || chunk > MAX_PKT)))
        return usage("vsock-tx-bench PORT SIZE [CHUNK<=64K] [close]");
    if (setup())
        return EXIT_FAIL;
    st.local_port = LOCAL_PORT;
    st.peer_port = (u32)port;
    st.state = 1;
    tx_control(OP_REQUEST, 0);
    if (WAIT_UNTIL(st.state != 1, 10) || st.state != 2) {
        kprintf("probe: vsock: the host %s port %lu\n", st.state == 3 ? "refused" : "never answered on", port);
        kprintf("RESULT vsock_error=%s\n", st.state == 3 ? "refused" : "timeout");
        return EXIT_FAIL;
    }
    kprintf("BENCH start\n");
    u64 t0 = rdtsc(), last_progress = t0, ask_cycles = CREDIT_ASK_US * tsc_hz / 1000000;
    u64 deadline = t0 + 60 * tsc_hz, credit_waits = 0, sent = 0;
    u32 crc = ~0u;
    int stalled = 0;
    while (sent < total && st.state == 2) {
        rx_poll(0, NULL, NULL, NULL);
        tx_reap();
        int posted = 0;
        u32 credit;
        while (sent < total && tx_nfree && (credit = peer_credit()) > 0 && credit <= BUF_ALLOC * 64u) {
            u32 len = (u32)(total - sent < chunk ? total - sent : chunk);
            if (len > credit)
                len = credit;
            int slot = tx_free[--tx_nfree];
            /* the words around [sent, sent + len), aligned: byte j of the payload is the
             * stream's byte sent + j, whatever sizes the credit cut the packets to */
            u64 *w = (u64 *)(TX_BASE + (u64)slot * RX_STRIDE), shift = sent & 7;
            for (u64 k = 0; k < (shift + len + 7) / 8; k++)
                w[k] = (sent / 8 + k + 1) * WORD_K;
            crc = crc_update(crc, (const u8 *)w + shift, len);
            tx_post(slot, OP_RW, 0, (u64)w + shift, len);
            st.tx_cnt += len;
            sent += len;
            st.packets++;
            posted = 1;
        }
        u64 now = rdtsc();
        if (posted) {
            vq_kick(&txq);
            last_progress = now;
            stalled = 0;
        } else if (now - last_progress > ask_cycles) {
            if (!stalled++)
                credit_waits++;
            st.credit_asks++;
            tx_control(OP_CREDIT_REQUEST, 0);
            last_progress = now;
        }
        if (now > deadline)
            break;
    }
    if (!close_at_once) {
        /* done when the host has taken every byte (its fwd_cnt), asking now and then */
        while (st.state == 2 && st.peer_fwd_cnt != st.tx_cnt && rdtsc() < deadline) {
            if (rx_poll(0, NULL, NULL, NULL))
                continue;
            if (rdtsc() - last_progress > ask_cycles) {
                st.credit_asks++;
                tx_control(OP_CREDIT_REQUEST, 0);
                last_progress = rdtsc();
            }
            cpu_relax();
        }
    }
    u64 t1 = rdtsc();
    int complete = sent == total && st.state == 2 && (close_at_once || st.peer_fwd_cnt == st.tx_cnt);
    kprintf("BENCH end\n");
    if (st.state == 2) {
        tx_control(OP_SHUTDOWN, SHUTDOWN_BOTH);
        kprintf("probe: vsock shutdown sent\n");
        WAIT_UNTIL(st.state == 3, 10);        /* the host's RST ends a clean disconnect */
    }
    kprintf("RESULT vsock_tx_bytes=%lu vsock_tx_crc=0x%08x vsock_tx_packets=%lu vsock_credit_waits=%lu "
            "vsock_credit_asks=%lu vsock_rst=%lu vsock_complete=%d tsc=%lu tsc_hz=%lu\n",
            sent, ~crc, st.packets, credit_waits, st.credit_asks, st.rst_seen, complete, t1 - t0, tsc_hz);
    return complete ? EXIT_OK : EXIT_FAIL;
}

int scenario_vsock_rx_bench(int argc, char **argv)
{
    u64 port, total, buf = MAX_PKT;
    if (argc < 3 || parse_u64(argv[1], &port) || port > 0xffffffffu || parse_size(argv[2], &total) || !total
        || total > MAX_STREAM || (argc > 3 && (parse_size(argv[3], &buf) || buf < 64 || buf > MAX_PKT)))
        return usage("vsock-rx-bench PORT SIZE [BUF, 64 to 64K]");
    rx_buf = (u32)buf;
    if (setup())
        return EXIT_FAIL;
    u64 got = 0, t0 = 0;
    u32 crc = ~0u;
    st.local_port = (u32)port;
    kprintf("probe: vsock listening on port %lu\n", port);
    u64 deadline = rdtsc() + 30 * tsc_hz;
    while (st.state == 0 && rdtsc() < deadline)
        if (!rx_poll(1, &crc, &got, &t0))
            cpu_relax();
    if (st.state != 2) {
        kprintf("RESULT vsock_error=no_connection\n");
        return EXIT_FAIL;
    }
    kprintf("BENCH start\n");
    deadline = rdtsc() + 60 * tsc_hz;
    while (got < total && st.state == 2 && rdtsc() < deadline)
        if (!rx_poll(0, &crc, &got, &t0))
            cpu_relax();
    u64 t1 = rdtsc();
    kprintf("BENCH end\n");
    int complete = got == total;
    if (st.state == 2) {
        tx_control(OP_SHUTDOWN, SHUTDOWN_BOTH);
        WAIT_UNTIL(st.state == 3, 10);
    }
    kprintf("RESULT vsock_rx_bytes=%lu vsock_rx_crc=0x%08x vsock_rx_packets=%lu vsock_shutdown=%lu "
            "vsock_complete=%d tsc=%lu tsc_hz=%lu\n",
            got, ~crc, st.packets, st.shutdown_seen, complete, got ? t1 - t0 : 0, tsc_hz);
    return complete ? EXIT_OK : EXIT_FAIL;
}
