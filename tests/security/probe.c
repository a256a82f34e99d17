/* probe: a tiny static helper the security tests run inside containers (crun's tests/init.c idea).
 * Each subcommand tries one thing an attacker would and prints one line:
 *   "ok" when the kernel allowed it, or "denied <errno name> <errno>" when it refused.
 * The exit status is 0 either way (1 for usage errors): the test reads the line.
 *
 *   probe syscall NAME          unshare-user | keyctl | bpf | userfaultfd | ptrace | mount |
 *                               unshare-net | setns | perf_event_open | kexec | add_key |
 *                               personality | clone-newuser | io_uring | open_by_handle
 *   probe mknod PATH b|c MAJ MIN   mknod, then open it for reading
 *   probe open PATH r|w         open a path for reading or writing
 *   probe rawsock               socket(AF_PACKET, SOCK_RAW) (what ARP spoofing needs)
 *   probe garp IFNAME MAC IP    send one gratuitous ARP "IP is-at MAC", from Ethernet source MAC
 *   probe kill PID SIG          kill(2)
 *   probe connect IP PORT       a TCP connect with a 1 s timeout
 *   probe fork N                fork N children that sleep 5 s; prints "forked K" then the error
 *   probe ids                   uid/gid and the uid_map line of this process
 *   probe status FIELD          one field of /proc/self/status (e.g. Seccomp)
 *   probe setuidfile PATH       copy /proc/self/exe to PATH and chmod 4755 it
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <linux/if_ether.h>
#include <net/if.h>
#include <netpacket/packet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/mount.h>
#include <sys/personality.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

static int report(long rc) {
    if (rc < 0) printf("denied %s %d\n", strerrorname_np(errno) ? strerrorname_np(errno) : "?", errno);
    else printf("ok\n");
    return 0;
}

static int do_syscall(const char *name) {
    long rc;
    if (!strcmp(name, "unshare-user")) rc = unshare(CLONE_NEWUSER);
    else if (!strcmp(name, "unshare-net")) rc = unshare(CLONE_NEWNET);
    else if (!strcmp(name, "clone-newuser")) {
        rc = syscall(SYS_clone, CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0);
        if (rc == 0) _exit(0);
        if (rc > 0) waitpid(rc, NULL, 0);
    }
    else if (!strcmp(name, "keyctl")) rc = syscall(SYS_keyctl, 0 /* GET_KEYRING_ID */, -3 /* session */, 1);
    else if (!strcmp(name, "add_key")) rc = syscall(SYS_add_key, "user", "fcrun-probe", "x", 1, -3);
    else if (!strcmp(name, "bpf")) { char attr[128] = {0}; rc = syscall(SYS_bpf, 0 /* MAP_CREATE */, attr, sizeof attr); if (rc < 0 && errno == EINVAL) rc = 0; }
    else if (!strcmp(name, "userfaultfd")) rc = syscall(SYS_userfaultfd, 0);
    else if (!strcmp(name, "ptrace")) rc = syscall(SYS_ptrace, 16 /* ATTACH */, 1, 0, 0);
    else if (!strcmp(name, "mount")) rc = mount("none", "/tmp", "tmpfs", 0, NULL);
    else if (!strcmp(name, "setns")) { int fd = open("/proc/self/ns/net", O_RDONLY); rc = setns(fd, 0); }
    else if (!strcmp(name, "perf_event_open")) { char attr[128] = {0}; rc = syscall(SYS_perf_event_open, attr, 0, -1, -1, 0); if (rc < 0 && errno == EINVAL) rc = 0; }
    else if (!strcmp(name, "kexec")) rc = syscall(SYS_kexec_load, 0, 0, 0, 0);
    else if (!strcmp(name, "personality")) rc = personality(0x0040000 /* ADDR_NO_RANDOMIZE */);
    else if (!strcmp(name, "io_uring")) { char p[120] = {0}; rc = syscall(SYS_io_uring_setup, 1, p); }
    else if (!strcmp(name, "open_by_handle")) { char h[64] = {0}; rc = syscall(SYS_open_by_handle_at, AT_FDCWD, h, O_RDONLY); if (rc < 0 && errno == EINVAL) rc = 0; }
    else { fprintf(stderr, "unknown syscall probe %s\n", name); return 1; }
    return report(rc);
}

/* A broadcast ARP request with sender IP == target IP: the kernel treats it as gratuitous
 * (arp_is_garp) and overrides an existing neighbour entry with it at once. */
static int send_garp(const char *ifname, const char *mac_text, const char *ip_text) {
    unsigned char mac[6], frame[ETH_HLEN + 28] = {0};
    struct in_addr ip;
    if (sscanf(mac_text, "%hhx:%hhx:%hhx:%hhx:%hhx:%hhx",
               &mac[0], &mac[1], &mac[2], &mac[3], &mac[4], &mac[5]) != 6
        || inet_pton(AF_INET, ip_text, &ip) != 1) { fprintf(stderr, "bad MAC or IP\n"); return 1; }
    int fd = socket(AF_PACKET, SOCK_RAW, htons(ETH_P_ARP));
    if (fd < 0) return report(-1);
    memset(frame, 0xff, 6);                       /* to: broadcast */
    memcpy(frame + 6, mac, 6);                    /* from: MAC, whoever owns it */
    frame[12] = ETH_P_ARP >> 8; frame[13] = ETH_P_ARP & 0xff;
    unsigned char *arp = frame + ETH_HLEN;
    static const unsigned char head[8] = {0, 1 /* Ethernet */, 8, 0 /* IPv4 */, 6, 4,
                                          0, 1 /* request */};
    memcpy(arp, head, 8);
    memcpy(arp + 8, mac, 6); memcpy(arp + 14, &ip, 4);   /* sender: MAC, IP */
    memcpy(arp + 24, &ip, 4);                            /* target: IP, MAC zero */
    struct sockaddr_ll to = {.sll_family = AF_PACKET, .sll_protocol = htons(ETH_P_ARP),
                             .sll_ifindex = if_nametoindex(ifname), .sll_halen = 6};
    memset(to.sll_addr, 0xff, 6);
    return report(sendto(fd, frame, sizeof frame, 0, (struct sockaddr *)&to, sizeof to));
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IONBF, 0);
    if (argc < 2) { fprintf(stderr, "usage: probe COMMAND ...\n"); return 1; }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "syscall") && argc == 3) return do_syscall(argv[2]);
    if (!strcmp(cmd, "mknod") && argc == 6) {
        mode_t type = argv[3][0] == 'b' ? S_IFBLK : S_IFCHR;
        if (mknod(argv[2], type | 0600, makedev(atoi(argv[4]), atoi(argv[5]))) < 0 && errno != EEXIST) return report(-1);
        return report(open(argv[2], O_RDONLY));
    }
    if (!strcmp(cmd, "open") && argc == 4) return report(open(argv[2], argv[3][0] == 'w' ? O_WRONLY : O_RDONLY));
    if (!strcmp(cmd, "rawsock")) return report(socket(AF_PACKET, SOCK_RAW, htons(ETH_P_ARP)));
    if (!strcmp(cmd, "garp") && argc == 5) return send_garp(argv[2], argv[3], argv[4]);
    if (!strcmp(cmd, "kill") && argc == 4) return report(kill(atoi(argv[2]), atoi(argv[3])));
    if (!strcmp(cmd, "connect") && argc == 4) {
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[3]))};
        inet_pton(AF_INET, argv[2], &a.sin_addr);
        if (connect(fd, (struct sockaddr *)&a, sizeof a) == 0) return report(0);
        if (errno != EINPROGRESS) return report(-1);
        struct pollfd p = {.fd = fd, .events = POLLOUT};
        if (poll(&p, 1, 1000) != 1) { errno = ETIMEDOUT; return report(-1); }
        int err = 0; socklen_t len = sizeof err;
        getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err) { errno = err; return report(-1); }
        return report(0);
    }
    if (!strcmp(cmd, "fork") && argc == 3) {
        int n = atoi(argv[2]), k = 0;
        for (; k < n; k++) {
            pid_t pid = fork();
            if (pid == 0) { sleep(5); _exit(0); }
            if (pid < 0) break;
        }
        printf("forked %d\n", k);
        if (k < n) return report(-1);
        return report(0);
    }
    if (!strcmp(cmd, "ids")) {
        char buf[256] = {0};
        int fd = open("/proc/self/uid_map", O_RDONLY);
        if (fd >= 0) { read(fd, buf, sizeof buf - 1); close(fd); }
        printf("uid=%d gid=%d map=%s", getuid(), getgid(), buf);
        if (!buf[0]) printf("\n");
        return 0;
    }
    if (!strcmp(cmd, "status") && argc == 3) {
        FILE *f = fopen("/proc/self/status", "r");
        char line[512];
        size_t n = strlen(argv[2]);
        while (f && fgets(line, sizeof line, f))
            if (!strncmp(line, argv[2], n) && line[n] == ':') { fputs(line, stdout); return 0; }
        printf("missing\n");
        return 0;
    }
    if (!strcmp(cmd, "setuidfile") && argc == 3) {
        int in = open("/proc/self/exe", O_RDONLY), out = open(argv[2], O_WRONLY | O_CREAT | O_TRUNC, 0755);
        if (in < 0 || out < 0) return report(-1);
        char buf[65536]; ssize_t r;
        while ((r = read(in, buf, sizeof buf)) > 0) if (write(out, buf, r) != r) return report(-1);
        close(out);
        return report(chmod(argv[2], 04755));
    }
    fprintf(stderr, "unknown command %s\n", cmd);
    return 1;
}
