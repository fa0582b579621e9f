/* Guest side of the lab's vsock test (static, run by Debian's busybox userspace):
 *   vsock_echo PORT   listen on PORT, print LISTENING, echo one connection until EOF;
 *                     then connect to the host (CID 2) on PORT+1, send "from-guest" and
 *                     print what the host answers. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include <linux/vm_sockets.h>

int main(int argc, char **argv)
{
    unsigned port = argc > 1 ? (unsigned)atoi(argv[1]) : 1234;
    struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = port};
    int s = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (s < 0 || bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 1)) {
        perror("vsock listen");
        return 1;
    }
    printf("LISTENING %u\n", port);
    fflush(stdout);
    int c = accept(s, NULL, NULL);
    char buf[4096];
    long total = 0;
    ssize_t n;
    while (c >= 0 && (n = read(c, buf, sizeof buf)) > 0) {
        if (write(c, buf, n) != n)
            break;
        total += n;
    }
    printf("ECHOED %ld\n", total);
    close(c);
    struct sockaddr_vm h = {.svm_family = AF_VSOCK, .svm_cid = 2, .svm_port = port + 1};
    int t = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (connect(t, (struct sockaddr *)&h, sizeof h)) {
        perror("vsock connect to host");
        return 1;
    }
    write(t, "from-guest", 10);
    n = read(t, buf, sizeof buf - 1);
    buf[n > 0 ? n : 0] = 0;
    printf("HOST SAID %s\n", buf);
    return 0;
}
