/* The Linux anchor's workload (examples/qemu_balloon, `--linux`): allocate and touch
 * N MiB, print a marker, free it, print a marker, sleep. Built with `gcc -static` by the
 * runner and run as the initramfs's only program besides busybox.
 * Usage: workload <MiB> */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	size_t mib = argc > 1 ? strtoul(argv[1], NULL, 10) : 64;
	size_t len = mib << 20;
	/* Give the boot's own free page reports time to finish first. */
	sleep(3);
	unsigned char *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED) {
		printf("WORKLOAD ERR mmap\n");
		fflush(stdout);
		return 1;
	}
	/* Not zero: a zero page is not what a real workload leaves behind. */
	for (size_t i = 0; i < len; i += 4096)
		memset(p + i, (int)(i >> 12) | 1, 4096);
	printf("WORKLOAD touched bytes=%zu\n", len);
	fflush(stdout);
	sleep(2);
	munmap(p, len);
	printf("WORKLOAD freed bytes=%zu\n", len);
	fflush(stdout);
	for (;;)
		pause();
}
