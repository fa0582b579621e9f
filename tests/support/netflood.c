/* netflood IFNAME SECONDS MAX_FRAMES BURST GAP_US: send 60-byte Ethernet frames (ethertype
 * 0x88b5, local experimental; a 32-bit little-endian sequence number after the header) out of
 * IFNAME as fast as the host takes them, BURST per sendmmsg, then a pause of GAP_US so the
 * flood does not take a whole CPU from the VMM it feeds. Stops after SECONDS, after MAX_FRAMES
 * accepted frames (0: no limit) or on SIGTERM/SIGINT, and prints what it did on one line:
 *   netflood sent=N refused=M seconds=S
 * A frame the interface refuses (a tap whose queue is full, or with no reader) is refused, not
 * retried: the sequence numbers of refused frames are gaps, never repeats. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <net/if.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_BURST 256
#define FRAME 60

static volatile sig_atomic_t stop;
static void on_signal(int sig) { (void)sig; stop = 1; }

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    if (argc != 6) {
        fprintf(stderr, "usage: netflood IFNAME SECONDS MAX_FRAMES BURST GAP_US\n");
        return 2;
    }
    unsigned ifindex = if_nametoindex(argv[1]);
    double seconds = atof(argv[2]);
    unsigned long max_frames = strtoul(argv[3], NULL, 10);
    int burst = atoi(argv[4]);
    long gap_us = atol(argv[5]);
    if (!ifindex || seconds <= 0 || burst < 1 || burst > MAX_BURST || gap_us < 0) {
        fprintf(stderr, "netflood: bad arguments (no interface %s?)\n", argv[1]);
        return 2;
    }
    int s = socket(AF_PACKET, SOCK_RAW, htons(ETH_P_ALL));
    int one = 1;
    struct sockaddr_ll addr = {.sll_family = AF_PACKET, .sll_ifindex = (int)ifindex,
                               .sll_protocol = htons(ETH_P_ALL)};
    if (s < 0 || bind(s, (struct sockaddr *)&addr, sizeof(addr))
        || setsockopt(s, SOL_PACKET, PACKET_QDISC_BYPASS, &one, sizeof(one))) {
        perror("netflood: packet socket");
        return 1;
    }
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    static unsigned char frames[MAX_BURST][FRAME];
    static struct iovec iov[MAX_BURST];
    static struct mmsghdr msgs[MAX_BURST];
    static const unsigned char dst[6] = {0x52, 0x54, 0x00, 0x12, 0x34, 0x56};
    static const unsigned char src[6] = {0x02, 0xf1, 0x00, 0xd0, 0x00, 0x01};
    for (int i = 0; i < burst; i++) {
        memcpy(frames[i], dst, 6);
        memcpy(frames[i] + 6, src, 6);
        frames[i][12] = 0x88, frames[i][13] = 0xb5;
        iov[i] = (struct iovec){frames[i], FRAME};
        msgs[i].msg_hdr = (struct msghdr){.msg_iov = &iov[i], .msg_iovlen = 1};
    }
    unsigned long sent = 0, refused = 0;
    uint32_t seq = 1;
    struct timespec gap = {gap_us / 1000000, (gap_us % 1000000) * 1000};
    double t0 = now(), end = t0 + seconds;
    while (!stop && now() < end && (!max_frames || sent < max_frames)) {
        int n = burst;
        if (max_frames && max_frames - sent < (unsigned long)n)
            n = (int)(max_frames - sent);
        for (int i = 0; i < n; i++, seq++)
            memcpy(frames[i] + 14, &seq, 4);
        int r = sendmmsg(s, msgs, (unsigned)n, 0);
        if (r < 0)
            r = 0;
        sent += (unsigned long)r;
        refused += (unsigned long)(n - r);
        if (r < n)                              /* the one that failed: the rest were not tried */
            seq -= (uint32_t)(n - r - 1);
        if (gap_us)
            nanosleep(&gap, NULL);
    }
    printf("netflood sent=%lu refused=%lu seconds=%.3f\n", sent, refused, now() - t0);
    return 0;
}
