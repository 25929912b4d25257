/* Connects to a vsock echo server (CID and port from argv, default 1:9999), sends
 * "Hello, world!", prints the reply and exits 0 when it came back unchanged. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include <linux/vm_sockets.h>

int main(int argc, char **argv)
{
	const char msg[] = "Hello, world!";
	char reply[64];
	size_t got = 0;
	struct sockaddr_vm addr = {
		.svm_family = AF_VSOCK,
		.svm_cid = argc > 1 ? (unsigned)strtoul(argv[1], NULL, 0) : 1,
		.svm_port = argc > 2 ? (unsigned)strtoul(argv[2], NULL, 0) : 9999,
	};
	int fd = socket(AF_VSOCK, SOCK_STREAM, 0);

	if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
		perror("hello_client: connect");
		return 2;
	}
	if (write(fd, msg, strlen(msg)) != (ssize_t)strlen(msg)) {
		perror("hello_client: write");
		return 2;
	}
	while (got < strlen(msg)) {
		ssize_t n = read(fd, reply + got, sizeof(reply) - 1 - got);

		if (n <= 0) {
			perror("hello_client: read");
			return 2;
		}
		got += (size_t)n;
	}
	reply[got] = '\0';
	printf("%s\n", reply);
	shutdown(fd, SHUT_WR);
	close(fd);
	return strcmp(reply, msg) == 0 ? 0 : 1;
}
