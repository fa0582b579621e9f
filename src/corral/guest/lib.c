/* probe: console (COM1, polled), formatting, string helpers, exit. */
#include <stdarg.h>
#include "probe.h"

void *memcpy(void *d, const void *s, size_t n)
{
    u8 *dp = d;
    const u8 *sp = s;
    while (n--)
        *dp++ = *sp++;
    return d;
}

void *memset(void *d, int c, size_t n)
{
    u8 *dp = d;
    while (n--)
        *dp++ = (u8)c;
    return d;
}

int memcmp(const void *a, const void *b, size_t n)
{
    const u8 *x = a, *y = b;
    for (; n; n--, x++, y++)
        if (*x != *y)
            return *x - *y;
    return 0;
}

size_t strlen(const char *s)
{
    size_t n = 0;
    while (s[n])
        n++;
    return n;
}

int str_eq(const char *a, const char *b)
{
    while (*a && *a == *b)
        a++, b++;
    return *a == *b;
}

/* ---- 16550 UART at COM1, polled ---- */
void serial_init(void)
{
    outb(COM1 + 1, 0x00);       /* IER: no interrupts */
    outb(COM1 + 3, 0x80);       /* LCR: DLAB */
    outb(COM1 + 0, 0x01);       /* divisor 1: 115200 baud */
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03);       /* 8N1 */
    outb(COM1 + 2, 0x07);       /* FCR: enable and clear FIFOs */
    outb(COM1 + 4, 0x03);       /* MCR: DTR, RTS */
}

void serial_putc(char c)
{
    if (c == '\n')
        serial_putc('\r');
    for (int i = 0; i < 1000000 && !(inb(COM1 + 5) & 0x20); i++)
        cpu_relax();
    outb(COM1, (u8)c);
}

void serial_puts(const char *s)
{
    while (*s)
        serial_putc(*s++);
}

static void put_num(u64 v, int base, int width, char pad, int neg)
{
    char buf[24];
    int n = 0;
    do {
        buf[n++] = "0123456789abcdef"[v % base];
        v /= base;
    } while (v);
    if (neg)
        buf[n++] = '-';
    while (n < width--)
        serial_putc(pad);
    while (n)
        serial_putc(buf[--n]);
}

/* Supports %s %c %d %i %u %x %p with optional '0', width and 'l'/'ll'. */
void kprintf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            serial_putc(*fmt);
            continue;
        }
        fmt++;
        char pad = ' ';
        int width = 0, longs = 0;
        if (*fmt == '0') {
            pad = '0';
            fmt++;
        }
        while (*fmt >= '0' && *fmt <= '9')
            width = width * 10 + (*fmt++ - '0');
        while (*fmt == 'l') {
            longs++;
            fmt++;
        }
        switch (*fmt) {
        case 's': {
            const char *s = va_arg(ap, const char *);
            serial_puts(s ? s : "(null)");
            break;
        }
        case 'c':
            serial_putc((char)va_arg(ap, int));
            break;
        case 'd':
        case 'i': {
            i64 v = longs ? va_arg(ap, i64) : va_arg(ap, int);
            put_num(v < 0 ? -(u64)v : (u64)v, 10, width, pad, v < 0);
            break;
        }
        case 'u':
            put_num(longs ? va_arg(ap, u64) : va_arg(ap, u32), 10, width, pad, 0);
            break;
        case 'x':
            put_num(longs ? va_arg(ap, u64) : va_arg(ap, u32), 16, width, pad, 0);
            break;
        case 'p':
            serial_puts("0x");
            put_num((u64)va_arg(ap, void *), 16, width, pad, 0);
            break;
        case '%':
            serial_putc('%');
            break;
        default:
            serial_putc('%');
            if (*fmt)
                serial_putc(*fmt);
            else
                fmt--;
        }
    }
    va_end(ap);
}

/* Decimal or 0x-hex; the whole string must be a number. */
int parse_u64(const char *s, u64 *out)
{
    u64 v = 0;
    int base = 10, digits = 0;
    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        base = 16;
        s += 2;
    }
    for (; *s; s++) {
        int d;
        if (*s >= '0' && *s <= '9')
            d = *s - '0';
        else if (base == 16 && *s >= 'a' && *s <= 'f')
            d = *s - 'a' + 10;
        else if (base == 16 && *s >= 'A' && *s <= 'F')
            d = *s - 'A' + 10;
        else
            return -1;
        if (v > (~0UL - d) / base)
            return -1;
        v = v * base + d;
        digits++;
    }
    if (!digits)
        return -1;
    *out = v;
    return 0;
}

/* "4096", "4096K", "64M", "1G", "2T" (also "64MB", "64MiB"), binary units. */
int parse_size(const char *s, u64 *out)
{
    char num[32];
    size_t n = 0;
    while (s[n] >= '0' && s[n] <= '9' && n < sizeof(num) - 1) {
        num[n] = s[n];
        n++;
    }
    num[n] = 0;
    u64 v;
    if (!n || parse_u64(num, &v))
        return -1;
    const char *u = s + n;
    int shift = 0;
    switch (*u) {
    case 0: break;
    case 'k': case 'K': shift = 10; break;
    case 'm': case 'M': shift = 20; break;
    case 'g': case 'G': shift = 30; break;
    case 't': case 'T': shift = 40; break;
    default: return -1;
    }
    if (*u) {
        u++;
        if (*u == 'i')
            u++;
        if (*u == 'B' || *u == 'b')
            u++;
        if (*u)
            return -1;
    }
    if (shift && v > (~0UL >> shift))
        return -1;
    *out = v << shift;
    return 0;
}

void guest_exit(int status)
{
    outb(EXIT_PORT, (u8)status);
    /* No exit device: stop here. */
    kprintf("probe: exit status %d (no exit device at port 0x%x); halting\n", status, EXIT_PORT);
    for (;;) {
        if (current_cpl() == 0)
            __asm__ volatile("cli; hlt");
        else
            syscall0(SYS_HALT);
    }
}
