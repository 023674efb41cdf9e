/*
 * pause: the sandbox ("infra") process of a pod, as Kubernetes' build/pause/linux/pause.c does
 * it: hold the pod's namespaces open, sleeping until SIGINT or SIGTERM (then exit 0), and reap
 * every child that is re-parented to it (it is PID 1 when the pod shares its PID namespace).
 * Written for meshcni's test images (scripts/build-image.sh --test-images); built static.
 *
 *   pause          sleep until SIGINT/SIGTERM
 *   pause -v       print the version and exit
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#define VERSION "meshcni-pause 1.0"

static void on_stop(int sig) {
    static const char msg[] = "pause: shutting down on signal\n";
    (void)sig;
    (void)!write(STDERR_FILENO, msg, sizeof msg - 1);
    _exit(0);
}

static void on_child(int sig) {
    int saved = errno;
    (void)sig;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
    errno = saved;
}

static int handle(int sig, void (*fn)(int), int flags) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = fn;
    sa.sa_flags = flags;
    sigemptyset(&sa.sa_mask);
    return sigaction(sig, &sa, NULL);
}

int main(int argc, char **argv) {
    if (argc == 2 && strcmp(argv[1], "-v") == 0) {
        puts(VERSION);
        return 0;
    }
    if (argc > 1) {
        fprintf(stderr, "usage: pause [-v]\n");
        return 2;
    }
    if (getpid() != 1) {
        fprintf(stderr, "pause: warning: not running as PID 1 (children re-parented elsewhere)\n");
    }
    if (handle(SIGINT, on_stop, 0) < 0 || handle(SIGTERM, on_stop, 0) < 0 ||
        handle(SIGCHLD, on_child, SA_NOCLDSTOP | SA_RESTART) < 0) {
        perror("pause: sigaction");
        return 1;
    }
    for (;;) {
        pause();
    }
}
