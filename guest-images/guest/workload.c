/*
 * ornament-workload: a guest program that does known things and says what it did.
 *
 * Every line it prints that starts with "W " is a fact the host-side tests check
 * events against, e.g. "W fork parent=12 child=13". Usage:
 *
 *   ornament-workload getppid N        call getppid N times
 *   ornament-workload forkexit N       fork N children; child i exits with 10+i
 *   ornament-workload forkexec N       fork N children that exec `ornament-workload true`
 *   ornament-workload spin SECONDS     busy-loop (for progress checks), print iterations
 *   ornament-workload mkdir PATH       mkdir(PATH) and print the errno (0 on success)
 *   ornament-workload kill             fork a child that sleeps; kill it with SIGKILL
 *   ornament-workload threads N        start and join N threads
 *   ornament-workload bigargv          exec itself with an argv longer than a page
 *   ornament-workload failexec         exec a file that does not exist
 *   ornament-workload vfork            vfork + _exit(3)
 *   ornament-workload tree             a three-level process tree
 *   ornament-workload syscall K        call getpriority(PRIO_USER, 4242) K times
 *   ornament-workload signals          SIGTERM to a handler, SIGKILL, a NULL write, SIGPIPE,
 *                                      a blocked SIGUSR1 delivered once unblocked, SIGUSR2
 *                                      to one thread; each line "W sig ..." says what
 *   ornament-workload results          open a missing file, read 5 bytes from a pipe a child
 *                                      fills 300 ms later (a blocking read), then exit:
 *                                      "W results pid=P open=RET read=RET fd=FD"
 *   ornament-workload busy SECS        getppid and a failing openat in a loop for SECS seconds:
 *                                      "W busy calls=N" (two syscalls per call)
 *   ornament-workload wait-signal SECS wait SECS seconds for SIGTERM, SIGHUP, SIGINT,
 *                                      SIGUSR1 or SIGUSR2: "W caught sig=N" or "W no-signal"
 *   ornament-workload threadexec       a thread (not the leader) execs `ornament-workload true`
 *                                      while the leader waits: "W threadexec pid=P tid=T"
 *   ornament-workload all              everything above but threadexec, in order
 *   ornament-workload bench-getppid N  time N getppid calls: "W bench getppid ns_per_call=X"
 *   ornament-workload bench-forkexec N time N fork+exec+wait: "W bench forkexec ns_per_iter=X"
 *   ornament-workload true|exit CODE   exit 0 / exit CODE
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

static const char *self = "/ornament/bin/ornament-workload";

static int wait_report(pid_t pid)
{
    int status = 0;
    if (waitpid(pid, &status, 0) < 0) {
        perror("waitpid");
        return -1;
    }
    if (WIFEXITED(status))
        printf("W exit pid=%d code=%d\n", (int)pid, WEXITSTATUS(status));
    else if (WIFSIGNALED(status))
        printf("W exit pid=%d signal=%d\n", (int)pid, WTERMSIG(status));
    fflush(stdout);
    return status;
}

static pid_t do_fork(void)
{
    fflush(stdout);
    pid_t pid = fork();
    if (pid < 0) {
        perror("fork");
        exit(100);
    }
    if (pid > 0) {
        printf("W fork parent=%d child=%d\n", (int)getpid(), (int)pid);
        fflush(stdout);
    }
    return pid;
}

static void cmd_getppid(long n)
{
    pid_t p = 0;
    for (long i = 0; i < n; i++)
        p = (pid_t)syscall(SYS_getppid);
    printf("W getppid pid=%d ppid=%d n=%ld\n", (int)getpid(), (int)p, n);
}

static void cmd_forkexit(long n)
{
    for (long i = 0; i < n; i++) {
        pid_t pid = do_fork();
        if (pid == 0)
            _exit((int)(10 + i));
        wait_report(pid);
    }
}

static void cmd_forkexec(long n)
{
    for (long i = 0; i < n; i++) {
        pid_t pid = do_fork();
        if (pid == 0) {
            execl(self, "ornament-workload", "true", (char *)NULL);
            _exit(127);
        }
        printf("W exec pid=%d filename=%s argv=ornament-workload,true\n", (int)pid, self);
        wait_report(pid);
    }
}

static void cmd_spin(long seconds)
{
    time_t end = time(NULL) + seconds;
    unsigned long iters = 0;
    while (time(NULL) < end)
        iters++;
    printf("W spin iterations=%lu\n", iters);
}

static void cmd_mkdir(const char *path)
{
    int rc = mkdirat(AT_FDCWD, path, 0755);
    int err = rc == 0 ? 0 : errno;
    struct stat st;
    int exists = stat(path, &st) == 0;
    printf("W mkdir path=%s errno=%d exists=%d\n", path, err, exists);
}

static void cmd_kill(void)
{
    pid_t pid = do_fork();
    if (pid == 0) {
        for (;;)
            pause();
    }
    kill(pid, SIGKILL);
    wait_report(pid);
}

static void *thread_main(void *arg)
{
    (void)arg;
    return NULL;
}

static void *thread_exec(void *arg)
{
    (void)arg;
    printf("W threadexec pid=%d tid=%ld\n", (int)getpid(), (long)syscall(SYS_gettid));
    fflush(stdout);
    execl(self, "ornament-workload", "true", (char *)NULL);
    printf("W error threadexec errno=%d\n", errno);
    fflush(stdout);
    _exit(127);
}

/* The exec replaces the whole process: the leader never returns from pause(). */
static void cmd_threadexec(void)
{
    pthread_t t;
    if (pthread_create(&t, NULL, thread_exec, NULL) != 0) {
        printf("W error pthread_create\n");
        return;
    }
    for (;;)
        pause();
}

static void cmd_threads(long n)
{
    pthread_t t[64];
    if (n > 64)
        n = 64;
    for (long i = 0; i < n; i++)
        pthread_create(&t[i], NULL, thread_main, NULL);
    for (long i = 0; i < n; i++)
        pthread_join(t[i], NULL);
    printf("W threads pid=%d n=%ld\n", (int)getpid(), n);
}

static void cmd_bigargv(void)
{
    /* 600 arguments of 9 characters: well over one 4 KiB page. */
    enum { N = 600 };
    static char store[N][16];
    static char *argv[N + 3];
    argv[0] = "ornament-workload";
    argv[1] = "true";
    for (int i = 0; i < N; i++) {
        snprintf(store[i], sizeof store[i], "arg%06d", i);
        argv[i + 2] = store[i];
    }
    argv[N + 2] = NULL;
    /* It execs in a directory of its own on the /tmp tmpfs: its working directory crosses a
       mount point. */
    static const char cwd[] = "/tmp/ornament-cwd";
    if (mkdir(cwd, 0755) != 0 && errno != EEXIST) {
        printf("W error mkdir %s errno=%d\n", cwd, errno);
    }
    pid_t pid = do_fork();
    if (pid == 0) {
        if (chdir(cwd) != 0)
            _exit(126);
        execv(self, argv);
        _exit(127);
    }
    printf("W exec pid=%d filename=%s argc=%d cwd=%s\n", (int)pid, self, N + 2, cwd);
    wait_report(pid);
}

static void cmd_failexec(void)
{
    pid_t pid = do_fork();
    if (pid == 0) {
        execl("/does/not/exist", "nothing", (char *)NULL);
        printf("W execfail pid=%d errno=%d\n", (int)getpid(), errno);
        fflush(stdout);
        _exit(9);
    }
    wait_report(pid);
}

static void cmd_vfork(void)
{
    fflush(stdout);
    pid_t pid = vfork();
    if (pid == 0)
        _exit(3);
    printf("W vfork parent=%d child=%d\n", (int)getpid(), (int)pid);
    wait_report(pid);
}

static void cmd_tree(void)
{
    pid_t a = do_fork();
    if (a == 0) {
        pid_t b = do_fork();
        if (b == 0) {
            pid_t c = do_fork();
            if (c == 0)
                _exit(33);
            wait_report(c);
            _exit(22);
        }
        wait_report(b);
        _exit(11);
    }
    wait_report(a);
}

static void cmd_syscall(long k)
{
    long ret = 0;
    int err = 0;
    for (long i = 0; i < k; i++) {
        errno = 0;
        ret = syscall(SYS_getpriority, PRIO_USER, 4242);
        err = errno;
    }
    /* The raw syscall returns -errno; libc's wrapper gives -1 and sets errno. */
    printf("W syscall pid=%d nr=%d name=getpriority args=%d,4242 n=%ld ret=%ld errno=%d\n",
           (int)getpid(), (int)SYS_getpriority, PRIO_USER, k, ret < 0 ? (long)-err : ret, err);
}

static double now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e9 + (double)t.tv_nsec;
}

static void cmd_bench_getppid(long n)
{
    double t0 = now_ns();
    for (long i = 0; i < n; i++)
        syscall(SYS_getppid);
    double t1 = now_ns();
    printf("W bench getppid n=%ld ns_per_call=%.1f\n", n, (t1 - t0) / (double)n);
}

static void cmd_bench_forkexec(long n)
{
    double t0 = now_ns();
    for (long i = 0; i < n; i++) {
        fflush(stdout);
        pid_t pid = fork();
        if (pid == 0) {
            execl(self, "ornament-workload", "true", (char *)NULL);
            _exit(127);
        }
        int st;
        waitpid(pid, &st, 0);
    }
    double t1 = now_ns();
    printf("W bench forkexec n=%ld ns_per_iter=%.1f\n", n, (t1 - t0) / (double)n);
}

/* --- signals: each case prints what it did, the test checks the events against it --- */

static volatile sig_atomic_t got_sig;

static void on_signal(int sig)
{
    got_sig = sig;
}

static void handle(int sig)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(sig, &sa, NULL);
}

/* A child that runs `body` once its parent may signal it; the parent gets its pid once the
 * child said it is ready (one byte on a pipe). */
static pid_t ready_child(void (*body)(int back), int *back_out)
{
    int ready[2], back[2];
    if (pipe(ready) || pipe(back)) {
        perror("pipe");
        exit(100);
    }
    pid_t pid = do_fork();
    if (pid == 0) {
        close(ready[0]);
        close(back[1]);
        body(ready[1] * 1000 + back[0]);
        _exit(0);
    }
    close(ready[1]);
    close(back[0]);
    char c;
    if (read(ready[0], &c, 1) != 1) {
        perror("read");
        exit(100);
    }
    close(ready[0]);
    *back_out = back[1];
    return pid;
}

static void body_term(int fds)
{
    handle(SIGTERM);
    /* Block SIGTERM until pause() waits for it, so it cannot come before. */
    sigset_t s, old;
    sigemptyset(&s);
    sigaddset(&s, SIGTERM);
    sigprocmask(SIG_BLOCK, &s, &old);
    (void)!write(fds / 1000, "r", 1);
    while (!got_sig)
        sigsuspend(&old);
    printf("W sig handled pid=%d sig=%d\n", (int)getpid(), (int)got_sig);
    fflush(stdout);
    _exit(0);
}

static void body_pause(int fds)
{
    (void)!write(fds / 1000, "r", 1);
    for (;;)
        pause();
}

static void body_pending(int fds)
{
    handle(SIGUSR1);
    sigset_t s;
    sigemptyset(&s);
    sigaddset(&s, SIGUSR1);
    sigprocmask(SIG_BLOCK, &s, NULL);
    (void)!write(fds / 1000, "r", 1);
    /* The parent sends SIGUSR1, then one byte: the signal is pending meanwhile. */
    char c;
    (void)!read(fds % 1000, &c, 1);
    sigset_t pending;
    sigpending(&pending);
    printf("W sig pending pid=%d sig=%d pending=%d\n", (int)getpid(), SIGUSR1,
           sigismember(&pending, SIGUSR1));
    fflush(stdout);
    sigprocmask(SIG_UNBLOCK, &s, NULL);
    printf("W sig handled pid=%d sig=%d\n", (int)getpid(), (int)got_sig);
    fflush(stdout);
    _exit(0);
}

static volatile pid_t thread_tid;
static volatile sig_atomic_t thread_got;

static void on_thread_signal(int sig)
{
    thread_got = sig;
}

static void *signal_thread(void *arg)
{
    (void)arg;
    thread_tid = (pid_t)syscall(SYS_gettid);
    while (!thread_got)
        usleep(1000);
    printf("W sig thread-handled tid=%d sig=%d\n", (int)syscall(SYS_gettid), (int)thread_got);
    fflush(stdout);
    return NULL;
}

static void cmd_signals(void)
{
    int back;
    /* SIGTERM from the parent to a child's handler. */
    pid_t c = ready_child(body_term, &back);
    kill(c, SIGTERM);
    printf("W sig sent from=%d to=%d sig=%d\n", (int)getpid(), (int)c, SIGTERM);
    wait_report(c);
    close(back);
    /* SIGKILL. */
    c = ready_child(body_pause, &back);
    kill(c, SIGKILL);
    printf("W sig sent from=%d to=%d sig=%d\n", (int)getpid(), (int)c, SIGKILL);
    wait_report(c);
    close(back);
    /* A NULL write: SIGSEGV from the kernel, at address 0. */
    c = do_fork();
    if (c == 0) {
        struct rlimit no_core = {0, 0};
        setrlimit(RLIMIT_CORE, &no_core);
        *(volatile int *)0 = 1;
        _exit(0);
    }
    printf("W sig fault pid=%d sig=%d addr=0\n", (int)c, SIGSEGV);
    wait_report(c);
    /* A write to a pipe with no reader: SIGPIPE. */
    c = do_fork();
    if (c == 0) {
        int p[2];
        if (pipe(p))
            _exit(100);
        close(p[0]);
        (void)!write(p[1], "x", 1);
        _exit(0);
    }
    printf("W sig pipe pid=%d sig=%d\n", (int)c, SIGPIPE);
    wait_report(c);
    /* SIGUSR1 blocked: pending, delivered once unblocked. */
    c = ready_child(body_pending, &back);
    kill(c, SIGUSR1);
    printf("W sig sent from=%d to=%d sig=%d\n", (int)getpid(), (int)c, SIGUSR1);
    (void)!write(back, "g", 1);
    wait_report(c);
    close(back);
    /* SIGUSR2 to one thread of this process. */
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_thread_signal;
    sigaction(SIGUSR2, &sa, NULL);
    pthread_t t;
    pthread_create(&t, NULL, signal_thread, NULL);
    while (!thread_tid)
        usleep(1000);
    pthread_kill(t, SIGUSR2);
    printf("W sig thread-sent from=%d to=%d sig=%d\n", (int)getpid(), (int)thread_tid, SIGUSR2);
    pthread_join(t, NULL);
}

static void cmd_results(void)
{
    long o = syscall(SYS_openat, AT_FDCWD, "/nonexistent-ornament", O_RDONLY);
    long open_ret = o < 0 ? -errno : o;
    int p[2];
    if (pipe(p)) {
        perror("pipe");
        exit(100);
    }
    pid_t c = do_fork();
    if (c == 0) {
        usleep(300000);
        (void)!write(p[1], "hello", 5);
        _exit(0);
    }
    char buf[64];
    long r = syscall(SYS_read, p[0], buf, sizeof buf);
    long read_ret = r < 0 ? -errno : r;
    wait_report(c);
    printf("W results pid=%d open=%ld read=%ld fd=%d\n", (int)getpid(), open_ret, read_ret, p[0]);
}

static void cmd_busy(long seconds)
{
    time_t end = time(NULL) + seconds;
    unsigned long calls = 0;
    while (time(NULL) < end) {
        for (int i = 0; i < 1000; i++) {
            syscall(SYS_getppid);
            syscall(SYS_openat, AT_FDCWD, "/nonexistent", O_RDONLY);
        }
        calls += 1000;
    }
    printf("W busy calls=%lu\n", calls);
}

static void cmd_wait_signal(long seconds)
{
    int sigs[] = {SIGTERM, SIGHUP, SIGINT, SIGUSR1, SIGUSR2};
    for (unsigned i = 0; i < sizeof sigs / sizeof sigs[0]; i++)
        handle(sigs[i]);
    printf("W waiting pid=%d\n", (int)getpid());
    fflush(stdout);
    for (long i = 0; i < seconds * 100 && !got_sig; i++)
        usleep(10000);
    if (got_sig)
        printf("W caught pid=%d sig=%d\n", (int)getpid(), (int)got_sig);
    else
        printf("W no-signal pid=%d\n", (int)getpid());
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 2) {
        fprintf(stderr, "usage: ornament-workload COMMAND [ARG]\n");
        return 2;
    }
    const char *c = argv[1];
    long n = argc > 2 ? atol(argv[2]) : 0;
    if (!strcmp(c, "true"))
        return 0;
    if (!strcmp(c, "exit"))
        return (int)n;
    printf("W start pid=%d ppid=%d\n", (int)getpid(), (int)getppid());
    /* Wait until the console has sent the line: a host that arms its probes when it
     * sees it (vmm/kvm/tests/linux.rs) has then armed before anything below runs.
     * Not a tty: nothing to wait for (ENOTTY, ignored). */
    tcdrain(STDOUT_FILENO);
    if (!strcmp(c, "getppid"))
        cmd_getppid(n);
    else if (!strcmp(c, "forkexit"))
        cmd_forkexit(n);
    else if (!strcmp(c, "forkexec"))
        cmd_forkexec(n);
    else if (!strcmp(c, "spin"))
        cmd_spin(n);
    else if (!strcmp(c, "mkdir") && argc > 2)
        cmd_mkdir(argv[2]);
    else if (!strcmp(c, "kill"))
        cmd_kill();
    else if (!strcmp(c, "threads"))
        cmd_threads(n);
    else if (!strcmp(c, "threadexec"))
        cmd_threadexec();
    else if (!strcmp(c, "bigargv"))
        cmd_bigargv();
    else if (!strcmp(c, "failexec"))
        cmd_failexec();
    else if (!strcmp(c, "vfork"))
        cmd_vfork();
    else if (!strcmp(c, "tree"))
        cmd_tree();
    else if (!strcmp(c, "syscall"))
        cmd_syscall(n);
    else if (!strcmp(c, "signals"))
        cmd_signals();
    else if (!strcmp(c, "results"))
        cmd_results();
    else if (!strcmp(c, "busy"))
        cmd_busy(n);
    else if (!strcmp(c, "wait-signal"))
        cmd_wait_signal(n);
    else if (!strcmp(c, "bench-getppid"))
        cmd_bench_getppid(n);
    else if (!strcmp(c, "bench-forkexec"))
        cmd_bench_forkexec(n);
    else if (!strcmp(c, "all")) {
        cmd_forkexit(3);
        cmd_threads(2);
        cmd_bigargv();
        cmd_failexec();
        cmd_vfork();
        cmd_tree();
        cmd_syscall(5);
        cmd_kill();
    } else {
        fprintf(stderr, "ornament-workload: unknown command %s\n", c);
        return 2;
    }
    printf("W done pid=%d\n", (int)getpid());
    return 0;
}
