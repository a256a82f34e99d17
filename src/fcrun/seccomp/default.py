"""The default seccomp profile every container gets: Docker's default (moby/profiles), as data.

Decisions, where fcrun differs from Docker or where Docker's profile depends on something:

- Docker adds rules for capabilities a container holds (CAP_SYS_ADMIN: mount, unshare, setns,
  clone with namespace flags; CAP_SYS_PTRACE: ptrace; CAP_SYS_MODULE, CAP_SYS_TIME, ...).
  fcrun's containers hold capabilities.DEFAULT_CAPABILITIES and never any of those, so only
  the base rules are here. The one capability rule that applies is CAP_SYS_CHROOT's (chroot),
  which is in the default set.
- ptrace, process_vm_readv and process_vm_writev are refused. Docker allows them on kernels
  >= 4.8 (where a tracer can no longer change a syscall after seccomp checked it) so that
  strace and gdb work in a container. fcrun runs tenants' web services, which need neither,
  and ptrace is kernel attack surface with a record (CVE-2019-13272: PTRACE_TRACEME to root).
  Debugging a container takes a profile of its own or seccomp=unconfined.
- io_uring_setup/enter/register are refused, as containerd and Docker (25+) now do: io_uring
  bypasses syscall filtering for the operations it submits and has been a steady source of
  kernel privilege escalations.
- socket() is refused for AF_ALG (38: the kernel crypto API, CVE-2026-31431 "Copy Fail") and
  AF_VSOCK (40: host/VM sockets), as Docker does since 2026: three range rules, because runc's
  semantics (kept here) turn two conditions on one argument into two rules that OR.
- clone() with any namespace flag is refused (EPERM) and clone3() fails with ENOSYS, so glibc
  falls back to clone(), whose flags seccomp can see (clone3's are behind a pointer).
- Only the native ABI (and x32, which shares it) is listed. Docker also lists i386, whose
  socketcall(2) multiplexer hides the socket family from seccomp, so the AF_ALG/AF_VSOCK rules
  do not hold there; Docker closes that with AppArmor, which fcrun does not have. An i386
  syscall (int 0x80) therefore kills the process (libseccomp's bad-architecture action).
- Syscalls libseccomp 2.5.4 cannot name yet (fchmodat2, cachestat, map_shadow_stack, the
  futex2 calls, mseal) are listed, as Docker lists them, and skipped on this host: they get
  the default EPERM until libseccomp learns them.

Treat DEFAULT_PROFILE as read-only: every default spec shares it, and its compiled filter is
cached once per process (compiler.py).
"""

from __future__ import annotations

import errno
import os

from ..runtime.spec import Seccomp, SeccompArg, SeccompSyscall

ALLOWED = """
accept accept4 access adjtimex alarm bind brk cachestat capget capset chdir chmod chown chown32
chroot clock_adjtime clock_adjtime64 clock_getres clock_getres_time64 clock_gettime
clock_gettime64 clock_nanosleep clock_nanosleep_time64 close close_range connect copy_file_range
creat dup dup2 dup3 epoll_create epoll_create1 epoll_ctl epoll_ctl_old epoll_pwait epoll_pwait2
epoll_wait epoll_wait_old eventfd eventfd2 execve execveat exit exit_group faccessat faccessat2
fadvise64 fadvise64_64 fallocate fanotify_mark fchdir fchmod fchmodat fchmodat2 fchown fchown32
fchownat fcntl fcntl64 fdatasync fgetxattr flistxattr flock fork fremovexattr fsetxattr fstat
fstat64 fstatat64 fstatfs fstatfs64 fsync ftruncate ftruncate64 futex futex_requeue futex_time64
futex_wait futex_waitv futex_wake futimesat getcpu getcwd getdents getdents64 getegid getegid32
geteuid geteuid32 getgid getgid32 getgroups getgroups32 getitimer getpeername getpgid getpgrp
getpid getppid getpriority getrandom getresgid getresgid32 getresuid getresuid32 getrlimit
get_robust_list getrusage getsid getsockname getsockopt get_thread_area gettid gettimeofday
getuid getuid32 getxattr inotify_add_watch inotify_init inotify_init1 inotify_rm_watch io_cancel
ioctl io_destroy io_getevents io_pgetevents io_pgetevents_time64 ioprio_get ioprio_set io_setup
io_submit ipc kill landlock_add_rule landlock_create_ruleset landlock_restrict_self lchown
lchown32 lgetxattr link linkat listen listxattr llistxattr _llseek lremovexattr lseek lsetxattr
lstat lstat64 madvise map_shadow_stack membarrier memfd_create memfd_secret mincore mkdir mkdirat
mknod mknodat mlock mlock2 mlockall mmap mmap2 mprotect mq_getsetattr mq_notify mq_open
mq_timedreceive mq_timedreceive_time64 mq_timedsend mq_timedsend_time64 mq_unlink mremap mseal
msgctl msgget msgrcv msgsnd msync munlock munlockall munmap name_to_handle_at nanosleep
newfstatat _newselect open openat openat2 pause pidfd_open pidfd_send_signal pipe pipe2
pkey_alloc pkey_free pkey_mprotect poll ppoll ppoll_time64 prctl pread64 preadv preadv2
prlimit64 process_mrelease pselect6 pselect6_time64 pwrite64 pwritev pwritev2 read readahead
readlink readlinkat readv recv recvfrom recvmmsg recvmmsg_time64 recvmsg remap_file_pages
removexattr rename renameat renameat2 restart_syscall rmdir rseq rt_sigaction rt_sigpending
rt_sigprocmask rt_sigqueueinfo rt_sigreturn rt_sigsuspend rt_sigtimedwait rt_sigtimedwait_time64
rt_tgsigqueueinfo sched_getaffinity sched_getattr sched_getparam sched_get_priority_max
sched_get_priority_min sched_getscheduler sched_rr_get_interval sched_rr_get_interval_time64
sched_setaffinity sched_setattr sched_setparam sched_setscheduler sched_yield seccomp select
semctl semget semop semtimedop semtimedop_time64 send sendfile sendfile64 sendmmsg sendmsg sendto
setfsgid setfsgid32 setfsuid setfsuid32 setgid setgid32 setgroups setgroups32 setitimer setpgid
setpriority setregid setregid32 setresgid setresgid32 setresuid setresuid32 setreuid setreuid32
setrlimit set_robust_list setsid setsockopt set_thread_area set_tid_address setuid setuid32
setxattr shmat shmctl shmdt shmget shutdown sigaltstack signalfd signalfd4 sigprocmask sigreturn
socketpair splice stat stat64 statfs statfs64 statx symlink symlinkat sync sync_file_range
syncfs sysinfo tee tgkill time timer_create timer_delete timer_getoverrun timer_gettime
timer_gettime64 timer_settime timer_settime64 timerfd_create timerfd_gettime timerfd_gettime64
timerfd_settime timerfd_settime64 times tkill truncate truncate64 ugetrlimit umask uname unlink
unlinkat utime utimensat utimensat_time64 utimes vfork vmsplice wait4 waitid waitpid write writev
""".split()

# Per machine (os.uname().machine): the ABIs listed, and syscalls only that machine has.
_MACHINES = {
    "x86_64": (["SCMP_ARCH_X86_64", "SCMP_ARCH_X32"], ["arch_prctl", "modify_ldt"]),
    "aarch64": (["SCMP_ARCH_AARCH64"], []),
    "riscv64": (["SCMP_ARCH_RISCV64"], ["riscv_flush_icache"]),
    "ppc64le": (["SCMP_ARCH_PPC64LE"], ["sync_file_range2", "swapcontext"]),
    "s390x": (["SCMP_ARCH_S390X"], ["s390_pci_mmio_read", "s390_pci_mmio_write", "s390_runtime_instr"]),
}

AF_ALG = 38
AF_VSOCK = 40
# The namespace flags of clone(2) (linux/sched.h): NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET.
CLONE_NAMESPACE_FLAGS = 0x7E020000
# personality(2) values a program may set: PER_LINUX, PER_LINUX32, UNAME26, UNAME26|PER_LINUX32,
# and 0xffffffff (query). Everything else (ADDR_NO_RANDOMIZE, READ_IMPLIES_EXEC, ...) weakens
# the process's own hardening or selects an exotic ABI.
PERSONALITIES = [0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF]


def _allow(names: list[str], *args: SeccompArg) -> SeccompSyscall:
    return SeccompSyscall(names=names, action="SCMP_ACT_ALLOW", args=list(args))


def build_default_profile(machine: str) -> Seccomp:
    """The default profile for a machine (`os.uname().machine`)."""
    architectures, machine_syscalls = _MACHINES.get(machine, ([], []))
    clone_arg = 1 if machine == "s390x" else 0  # s390 swaps clone's first two arguments
    syscalls = [
        _allow(ALLOWED + machine_syscalls),
        _allow(["socket"], SeccompArg(index=0, value=AF_ALG, op="SCMP_CMP_LT")),
        _allow(["socket"], SeccompArg(index=0, value=AF_ALG + 1, op="SCMP_CMP_EQ")),
        _allow(["socket"], SeccompArg(index=0, value=AF_VSOCK, op="SCMP_CMP_GT")),
        *[_allow(["personality"], SeccompArg(index=0, value=p, op="SCMP_CMP_EQ")) for p in PERSONALITIES],
        _allow(["clone"], SeccompArg(index=clone_arg, value=CLONE_NAMESPACE_FLAGS, value_two=0, op="SCMP_CMP_MASKED_EQ")),
        SeccompSyscall(names=["clone3"], action="SCMP_ACT_ERRNO", errno_ret=errno.ENOSYS),
    ]
    return Seccomp(
        default_action="SCMP_ACT_ERRNO",
        default_errno_ret=errno.EPERM,
        architectures=list(architectures),
        syscalls=syscalls,
    )


DEFAULT_PROFILE = build_default_profile(os.uname().machine)
