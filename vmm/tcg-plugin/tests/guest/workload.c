/* /init of the plugin's real-guest tests: a static workload with known syscall, fork, exec
 * and exit counts. Commands come from the kernel command line after "--":
 *   mark              one getpid(): a marker the host holds on (arm/disarm points)
 *   getppid N         N getppid() syscalls; prints ns per call (overall and best tenth)
 *   pgetppid N        N getppid() on CPU 0 and, at the same time, N in a child on CPU 1
 *   fork M            M x (fork; child execs "/init child", which exits 3; parent waits)
 *   hold              child pinned to CPU 1 loops on getppid; parent on CPU 0 calls getuid()
 *                     (the host holds it), then stops the child; prints the child's count
 *   deny              mkdir("/d1") twice with an access() between; prints each result
 * It prints "WL <cmd> ..." lines on the console and powers off at the end. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000000000LL + t.tv_nsec;
}

static void pin(int cpu) {
    cpu_set_t s;
    CPU_ZERO(&s);
    CPU_SET(cpu, &s);
    sched_setaffinity(0, sizeof s, &s);
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "child") == 0)
        return 3;
    setvbuf(stdout, NULL, _IONBF, 0);
    printf("WL start argc=%d ncpu=%ld\n", argc, sysconf(_SC_NPROCESSORS_ONLN));
    for (int i = 1; i < argc; i++) {
        const char *c = argv[i];
        if (strcmp(c, "mark") == 0) {
            syscall(SYS_getpid);
            printf("WL mark\n");
        } else if (strcmp(c, "getppid") == 0 && i + 1 < argc) {
            long n = atol(argv[++i]);
            /* Ten chunks: the fastest one filters out time the host took the CPU away. */
            long chunk = n / 10, done = 0;
            long long best = -1;
            long long t0 = now_ns();
            while (done < n) {
                long c = chunk > 0 && n - done > chunk ? chunk : n - done;
                long long c0 = now_ns();
                for (long k = 0; k < c; k++)
                    syscall(SYS_getppid);
                long long per = (now_ns() - c0) / c;
                if (best < 0 || per < best)
                    best = per;
                done += c;
            }
            long long t1 = now_ns();
            printf("WL getppid n=%ld ns_per_call=%lld min_chunk_ns_per_call=%lld\n", n,
                   n ? (t1 - t0) / n : 0, best);
        } else if (strcmp(c, "pgetppid") == 0 && i + 1 < argc) {
            long n = atol(argv[++i]);
            pid_t p = fork();
            pin(p == 0 ? 1 : 0);
            for (long k = 0; k < n; k++)
                syscall(SYS_getppid);
            if (p == 0)
                _exit(0);
            waitpid(p, NULL, 0);
            printf("WL pgetppid n=%ld\n", n);
        } else if (strcmp(c, "fork") == 0 && i + 1 < argc) {
            long m = atol(argv[++i]);
            long ok = 0;
            long long t0 = now_ns();
            for (long k = 0; k < m; k++) {
                pid_t p = fork();
                if (p == 0) {
                    char *a[] = {"/init", "child", NULL};
                    execv("/init", a);
                    _exit(99);
                }
                int st = 0;
                if (p > 0 && waitpid(p, &st, 0) == p && WIFEXITED(st) && WEXITSTATUS(st) == 3)
                    ok++;
            }
            long long t1 = now_ns();
            printf("WL fork m=%ld ok=%ld us_per_iter=%lld\n", m, ok, m ? (t1 - t0) / m / 1000 : 0);
        } else if (strcmp(c, "hold") == 0) {
            volatile long *shared = mmap(NULL, 4096, PROT_READ | PROT_WRITE,
                                         MAP_SHARED | MAP_ANONYMOUS, -1, 0);
            shared[0] = 0;
            shared[1] = 0;
            pid_t p = fork();
            if (p == 0) {
                pin(1);
                shared[1] = 1;
                for (;;) {
                    syscall(SYS_getppid);
                    shared[0]++;
                }
            }
            pin(0);
            while (shared[1] == 0)
                sched_yield();
            long before = shared[0];
            long long t0 = now_ns();
            syscall(SYS_getuid);
            long long t1 = now_ns();
            long after = shared[0];
            kill(p, SIGKILL);
            waitpid(p, NULL, 0);
            printf("WL hold held_ms=%lld child_calls_during_hold=%ld\n", (t1 - t0) / 1000000,
                   after - before);
        } else if (strcmp(c, "deny") == 0) {
            int r1 = mkdir("/d1", 0755);
            int e1 = r1 ? errno : 0;
            int a1 = access("/d1", F_OK);
            int ea = a1 ? errno : 0;
            int r2 = mkdir("/d1", 0755);
            int e2 = r2 ? errno : 0;
            int a2 = access("/d1", F_OK);
            printf("WL deny first=%d errno=%d exists_after_first=%d(errno %d) second=%d errno=%d "
                   "exists_after_second=%d\n",
                   r1, e1, a1 == 0, ea, r2, e2, a2 == 0);
        } else {
            printf("WL unknown %s\n", c);
        }
    }
    printf("WL done\n");
    sync();
    reboot(RB_POWER_OFF);
    return 0;
}
