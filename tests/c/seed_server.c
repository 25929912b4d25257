/* The seed's vsock server in C: bind port 9999 (argv[1]) on VMADDR_CID_ANY (or the CID in
 * argv[2]), accept connections one after another and print what each client sends. It also
 * echoes every chunk back (ignoring a client that does not read it), so vsockmon echo client
 * can verify its bytes against it. */
#include <ctype.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/socket.h>
#include <linux/vm_sockets.h>

static void print_bytes(const unsigned char *buf, ssize_t n)
{
	for (ssize_t i = 0; i < n; i++)
		printf(isprint(buf[i]) && buf[i] != '\\' ? "%c" : "\\x%02x", buf[i]);
}

int main(int argc, char **argv)
{
	struct sockaddr_vm addr = {
		.svm_family = AF_VSOCK,
		.svm_port = argc > 1 ? (unsigned)strtoul(argv[1], NULL, 0) : 9999,
		.svm_cid = argc > 2 ? (unsigned)strtoul(argv[2], NULL, 0) : VMADDR_CID_ANY,
	};
	int fd = socket(AF_VSOCK, SOCK_STREAM, 0);

	setvbuf(stdout, NULL, _IOLBF, 0);
	signal(SIGPIPE, SIG_IGN); /* an echo to a client that has gone is not fatal */
	if (fd < 0 || bind(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0 || listen(fd, 16) < 0) {
		perror("seed_server");
		return 2;
	}
	fprintf(stderr, "listening on %u:%u\n", addr.svm_cid, addr.svm_port);
	for (;;) {
		struct sockaddr_vm peer;
		socklen_t len = sizeof(peer);
		int conn = accept(fd, (struct sockaddr *)&peer, &len);
		unsigned char buf[4096];
		unsigned long total = 0;
		ssize_t n;

		if (conn < 0)
			continue;
		while ((n = read(conn, buf, sizeof(buf))) > 0) {
			total += (unsigned long)n;
			printf("received %zd bytes from %u:%u: ", n, peer.svm_cid, peer.svm_port);
			print_bytes(buf, n);
			printf("\n");
			if (write(conn, buf, (size_t)n) < 0)
				continue; /* the client closed without reading the echo */
		}
		printf("connection from %u:%u closed: %lu bytes\n", peer.svm_cid, peer.svm_port,
		       total);
		close(conn);
	}
}
