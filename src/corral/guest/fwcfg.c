/* probe: the fw_cfg scenario. Reads QEMU's firmware configuration interface the way firmware
 * and test kernels do, through the ports (selector 0x510, data 0x511) and through DMA (0x514),
 * and reports what both say: `RESULT fwcfg_sig=QEMU fwcfg_cpus=N fwcfg_ram=BYTES ...`. */
#include "probe.h"

#define FW_CFG_SELECTOR 0x510
#define FW_CFG_DATA     0x511
#define FW_CFG_DMA      0x514
#define KEY_SIGNATURE   0x00
#define KEY_ID          0x01
#define KEY_RAM_SIZE    0x03
#define KEY_NB_CPUS     0x05
#define KEY_FILE_DIR    0x19
#define DMA_ERROR  1
#define DMA_READ   2
#define DMA_SELECT 8

struct dma_access { u32 control, length; u64 address; } __attribute__((packed, aligned(16)));
static struct dma_access access;
static u8 dma_buf[64] __attribute__((aligned(16)));

static u32 bswap32(u32 v) { return __builtin_bswap32(v); }

static void port_read(u16 key, void *buf, u32 n)
{
    outw(FW_CFG_SELECTOR, key);
    for (u32 i = 0; i < n; i++)
        ((u8 *)buf)[i] = inb(FW_CFG_DATA);
}

/* One DMA read of `n` bytes of `key` into dma_buf; 0 on success. */
static int dma_read(u16 key, u32 n)
{
    u64 a = (u64)&access;
    access.control = bswap32(((u32)key << 16) | DMA_SELECT | DMA_READ);
    access.length = bswap32(n);
    access.address = __builtin_bswap64((u64)dma_buf);
    __asm__ volatile("" ::: "memory");
    outl(FW_CFG_DMA, bswap32(a >> 32));
    outl(FW_CFG_DMA + 4, bswap32((u32)a));
    __asm__ volatile("" ::: "memory");
    return bswap32(*(volatile u32 *)&access.control) ? -1 : 0;
}

int scenario_fwcfg(int argc, char **argv)
{
    (void)argc; (void)argv;
    char sig[5] = {0};
    u32 id = 0, files_be = 0;
    u16 cpus = 0;
    u64 ram = 0;
    port_read(KEY_SIGNATURE, sig, 4);
    port_read(KEY_ID, &id, 4);
    port_read(KEY_NB_CPUS, &cpus, 2);
    port_read(KEY_RAM_SIZE, &ram, 8);
    port_read(KEY_FILE_DIR, &files_be, 4);
    kprintf("RESULT fwcfg_sig=%s fwcfg_id=%u fwcfg_cpus=%u fwcfg_ram=%lu fwcfg_files=%u\n", sig, id,
            cpus, ram, bswap32(files_be));
    if (!(id & 2)) {
        kprintf("RESULT fwcfg_dma=absent\n");
        return EXIT_FAIL;
    }
    char dsig[5] = {0};
    u16 dcpus = 0;
    u64 dram = 0;
    int err = dma_read(KEY_SIGNATURE, 4);
    memcpy(dsig, dma_buf, 4);
    err |= dma_read(KEY_NB_CPUS, 2);
    memcpy(&dcpus, dma_buf, 2);
    err |= dma_read(KEY_RAM_SIZE, 8);
    memcpy(&dram, dma_buf, 8);
    /* a descriptor pointing outside RAM must come back with the error bit, not hang or crash */
    access.control = bswap32(((u32)KEY_SIGNATURE << 16) | DMA_SELECT | DMA_READ);
    access.length = bswap32(16);
    access.address = __builtin_bswap64(0xFFFFFFFFFFFF0000UL);
    u64 a = (u64)&access;
    outl(FW_CFG_DMA, bswap32(a >> 32));
    outl(FW_CFG_DMA + 4, bswap32((u32)a));
    u32 bad = bswap32(*(volatile u32 *)&access.control);
    kprintf("RESULT dma_sig=%s dma_cpus=%u dma_ram=%lu dma_ok=%d dma_bad=%u\n", dsig, dcpus, dram,
            err == 0, bad);
    return err ? EXIT_FAIL : EXIT_OK;
}
