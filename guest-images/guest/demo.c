/* ornament's built-in demo: a few forks, execs and exits with known results. */
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

int main(void)
{
    for (int i = 1; i <= 3; i++) {
        pid_t pid = fork();
        if (pid < 0) {
            perror("fork");
            return 1;
        }
        if (pid == 0) {
            if (i == 3) {
                execl("/bin/busybox", "uname", "-r", (char *)NULL);
                perror("execl");
                _exit(127);
            }
            _exit(i);
        }
        int status = 0;
        waitpid(pid, &status, 0);
        printf("demo: child %d (pid %d) exited with %d\n", i, (int)pid, WEXITSTATUS(status));
    }
    printf("demo: done\n");
    return 0;
}
