/* The seed's vsock client in C: connect to CID argv[1] (default 2, the host) on port argv[2]
 * (default 9999), send "Hello, world!" and close — without reading any reply. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <linux/vm_sockets.h>

int main(int argc, char **argv)
{
	const char msg[] = "Hello, world!";
	/* Linux gives up a connect after 2 s; a nested guest under emulation can be slower. */
	struct timeval timeout = { .tv_sec = 60 };
	struct sockaddr_vm addr = {
		.svm_family = AF_VSOCK,
		.svm_cid = argc > 1 ? (unsigned)strtoul(argv[1], NULL, 0) : VMADDR_CID_HOST,
		.svm_port = argc > 2 ? (unsigned)strtoul(argv[2], NULL, 0) : 9999,
	};
	int fd = socket(AF_VSOCK, SOCK_STREAM, 0);

	if (fd < 0) {
		perror("seed_client: socket");
		return 2;
	}
	setsockopt(fd, AF_VSOCK, SO_VM_SOCKETS_CONNECT_TIMEOUT, &timeout, sizeof(timeout));
	if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
		perror("seed_client: connect");
		return 2;
	}
	if (write(fd, msg, strlen(msg)) != (ssize_t)strlen(msg)) {
		perror("seed_client: write");
		return 2;
	}
	close(fd);
	printf("sent %zu bytes to %u:%u\n", strlen(msg), addr.svm_cid, addr.svm_port);
	return 0;
}
