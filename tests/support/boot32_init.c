/* /init of the lab's 32-bit initramfs (tests/support/lab_boot32.py): proves that userspace runs
 * under a 32-bit (i686) kernel, then powers the machine off, or resets it when its command line
 * (the kernel's after "--") says `reset`: a guest without ACPI cannot power off. No libc: i386
 * system calls through int $0x80, so `gcc -m32 -static -nostdlib` builds it without 32-bit
 * libraries. */

#define SYS_write 4
#define SYS_reboot 88
#define SYS_uname 122
#define LINUX_REBOOT_MAGIC1 0xfee1dead
#define LINUX_REBOOT_MAGIC2 672274793
#define LINUX_REBOOT_CMD_POWER_OFF 0x4321fedc
#define LINUX_REBOOT_CMD_RESTART 0x01234567

struct utsname {
	char sysname[65], nodename[65], release[65], version[65], machine[65], domainname[65];
};

static long sys3(long nr, long a, long b, long c)
{
	long ret;
	__asm__ volatile("int $0x80" : "=a"(ret) : "a"(nr), "b"(a), "c"(b), "d"(c) : "memory");
	return ret;
}

static unsigned long len(const char *s)
{
	unsigned long n = 0;
	while (s[n])
		n++;
	return n;
}

static void put(const char *s)
{
	sys3(SYS_write, 1, (long)s, (long)len(s));
}

/* the kernel starts init with argc, argv[], NULL, envp[] on the stack */
__asm__(".globl _start\n_start:\n\tpush %esp\n\tcall start_c\n");

static int same(const char *a, const char *b)
{
	while (*a && *a == *b)
		a++, b++;
	return *a == *b;
}

__attribute__((used)) void start_c(long *sp)
{
	static struct utsname u;
	long cmd = LINUX_REBOOT_CMD_POWER_OFF;
	for (long i = 1; i < sp[0]; i++)
		if (same((const char *)sp[1 + i], "reset"))
			cmd = LINUX_REBOOT_CMD_RESTART;
	put("BOOT32-INIT: userspace runs, pointer size ");
	put(sizeof(void *) == 4 ? "4" : "?");
	if (sys3(SYS_uname, (long)&u, 0, 0) == 0) {
		put(", machine ");
		put(u.machine);
		put(", release ");
		put(u.release);
	}
	put("\n");
	sys3(SYS_reboot, LINUX_REBOOT_MAGIC1, LINUX_REBOOT_MAGIC2, cmd);
	for (;;)
		;
}
