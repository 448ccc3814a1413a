/* The pod sandbox's process (registry.k8s.io/pause, built by ./dev kube): it holds the pod's
 * namespaces open, so it does nothing but sleep; as PID 1 of a pod sharing its PID namespace it
 * reaps orphaned children, and it exits at once on SIGINT or SIGTERM (the runtime stopping the
 * sandbox). Written for pycni after the behaviour of Kubernetes' build/pause/linux/pause.c. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void down(int signo)
{
	(void)signo;
	_exit(0);
}

static void reap(int signo)
{
	(void)signo;
	while (waitpid(-1, NULL, WNOHANG) > 0)
		;
}

int main(int argc, char **argv)
{
	struct sigaction sa;

	if (argc == 2 && strcmp(argv[1], "-v") == 0) {
		printf("pause (pycni)\n");
		return 0;
	}
	if (getpid() != 1)
		fprintf(stderr, "pause: warning: not PID 1, orphans are not reaped here\n");
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = down;
	if (sigaction(SIGINT, &sa, NULL) < 0 || sigaction(SIGTERM, &sa, NULL) < 0)
		return 1;
	sa.sa_handler = reap;
	sa.sa_flags = SA_NOCLDSTOP | SA_RESTART;
	if (sigaction(SIGCHLD, &sa, NULL) < 0)
		return 2;
	for (;;)
		pause();
	return 42; /* not reached */
}
