/* A vsock STREAM echo server on the port in argv[1] (default 9999): one child process per
 * connection, echoes until the peer closes. Runs until killed. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/socket.h>
#include <linux/vm_sockets.h>

static void echo(int fd)
{
	char buf[65536];
	ssize_t n;

	while ((n = read(fd, buf, sizeof(buf))) > 0) {
		ssize_t off = 0;

		while (off < n) {
			ssize_t w = write(fd, buf + off, (size_t)(n - off));

			if (w <= 0)
				return;
			off += w;
		}
	}
}

int main(int argc, char **argv)
{
	struct sockaddr_vm addr = {
		.svm_family = AF_VSOCK,
		.svm_cid = VMADDR_CID_ANY,
		.svm_port = argc > 1 ? (unsigned)strtoul(argv[1], NULL, 0) : 9999,
	};
	int fd = socket(AF_VSOCK, SOCK_STREAM, 0);

	signal(SIGCHLD, SIG_IGN); /* no zombies */
	if (fd < 0 || bind(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0 || listen(fd, 16) < 0) {
		perror("echo_server");
		return 2;
	}
	fprintf(stderr, "echo_server: listening on %u\n", addr.svm_port);
	for (;;) {
		int conn = accept(fd, NULL, NULL);

		if (conn < 0)
			continue;
		if (fork() == 0) {
			close(fd);
			echo(conn);
			close(conn);
			_exit(0);
		}
		close(conn);
	}
}
