/*
 * lab-guest: the nested guest's side of vsockmon's host <-> guest lab (PID 1 of L2).
 *
 * The lab VM (L1, CID 2) runs tests against it; L2 boots slowly under nested emulation,
 * so this is a small static C program rather than a script. Given a base port P it serves,
 * on every CID (one forked process per connection):
 *   P      STREAM echo: echoes each connection's bytes until the peer shuts down, then closes.
 *   P + 1  SEQPACKET echo: echoes each message, keeping its boundary and MSG_EOR.
 *   P + 2  dial-back: the client sends "PORT\n" or "CID:PORT\n"; the guest closes that
 *          connection, then connects to CID (default 2, the lab VM) on PORT and echoes that
 *          connection as on P. Any CID is dialled as given, so a test can make the guest
 *          dial a CID that does not exist.
 *   P + 3  run: the client sends "SIZE NAME ARG...\n" then SIZE bytes of a static program;
 *          the guest stores it, runs it with the connection as its stdout and stderr, kills
 *          it when the client shuts down its sending side, then sends
 *          "vsockmon-lab-guest: exit N\n" and closes. So the lab VM can run programs of
 *          its own (a test's C or Go client, a server) in the guest, as CID N.
 * It prints "vsockmon-lab-guest: ready ..." on the console once all four listen, and one
 * line per connection.
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

#define BUF_SIZE (256 * 1024)

static char buf[BUF_SIZE];
static const struct timeval connect_timeout = { .tv_sec = 60 };

static void say(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	fputs("vsockmon-lab-guest: ", stderr);
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
	va_end(ap);
}

static void die(const char *what)
{
	say("%s: %s", what, strerror(errno));
	exit(1);
}

static int listen_on(int type, unsigned int port)
{
	struct sockaddr_vm addr = {
		.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = port,
	};
	int fd = socket(AF_VSOCK, type, 0);

	if (fd < 0)
		die("socket");
	if (bind(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0)
		die("bind");
	if (listen(fd, 16) < 0)
		die("listen");
	return fd;
}

static int write_all(int fd, const char *data, size_t len)
{
	while (len > 0) {
		ssize_t n = write(fd, data, len);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return -1;
		data += n;
		len -= n;
	}
	return 0;
}

static unsigned long long echo_stream(int fd)
{
	unsigned long long total = 0;
	ssize_t n;

	while ((n = read(fd, buf, sizeof(buf))) > 0) {
		if (write_all(fd, buf, n) < 0)
			break;
		total += n;
	}
	return total;
}

static unsigned long long echo_seqpacket(int fd)
{
	unsigned long long total = 0;

	for (;;) {
		struct iovec iov = { .iov_base = buf, .iov_len = sizeof(buf) };
		struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1 };
		ssize_t n = recvmsg(fd, &msg, 0);

		if (n <= 0 || send(fd, buf, n, msg.msg_flags & MSG_EOR) != n)
			break;
		total += n;
	}
	return total;
}

/* "PORT" or "CID:PORT" (CID 2 when omitted) into addr's CID and port. */
static void parse_target(const char *line, struct sockaddr_vm *addr)
{
	char *end;
	unsigned long first = strtoul(line, &end, 10);

	if (*end == ':') {
		addr->svm_cid = first;
		addr->svm_port = strtoul(end + 1, NULL, 10);
	} else {
		addr->svm_port = first;
	}
}

/* The dial-back service: read the target, then call it (the lab VM unless told otherwise). */
static unsigned long long dial_back(int fd)
{
	struct sockaddr_vm addr = { .svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_HOST };
	char line[32] = "";
	unsigned long long total;
	ssize_t n = read(fd, line, sizeof(line) - 1);
	int out;

	close(fd);
	if (n <= 0)
		return 0;
	parse_target(line, &addr);
	out = socket(AF_VSOCK, SOCK_STREAM, 0);
	/* Linux gives up a connect after 2 s: too short under nested emulation on a busy host. */
	setsockopt(out, AF_VSOCK, SO_VM_SOCKETS_CONNECT_TIMEOUT, &connect_timeout,
		   sizeof(connect_timeout));
	if (out < 0 || connect(out, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
		say("dial-back to cid %u port %u: %s", addr.svm_cid, addr.svm_port,
		    strerror(errno));
		return 0;
	}
	total = echo_stream(out);
	close(out);
	say("dial-back to cid %u port %u echoed %llu bytes", addr.svm_cid, addr.svm_port, total);
	return total;
}

/* The run service's header: "SIZE NAME ARG...\n" into size and argv (at most max - 1). */
static int read_header(int fd, char *line, size_t cap, unsigned long *size, char **argv,
		       int max)
{
	size_t len = 0;
	int argc = 0;
	char *word;

	while (len < cap - 1 && read(fd, line + len, 1) == 1 && line[len] != '\n')
		len++;
	line[len] = '\0';
	word = strtok(line, " ");
	if (word == NULL)
		return 0;
	*size = strtoul(word, NULL, 10);
	while (argc < max - 1 && (word = strtok(NULL, " ")) != NULL)
		argv[argc++] = word;
	argv[argc] = NULL;
	return argc;
}

/* Store SIZE bytes from fd as an executable at path. */
static int receive_program(int fd, const char *path, unsigned long size)
{
	int out = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0755);

	while (out >= 0 && size > 0) {
		ssize_t n = read(fd, buf, size < sizeof(buf) ? size : sizeof(buf));

		if (n <= 0 || write_all(out, buf, n) < 0) {
			close(out);
			return -1;
		}
		size -= n;
	}
	return out < 0 ? -1 : close(out);
}

/* Wait for the program; kill it once the client shuts down its sending side. */
static int supervise(int fd, pid_t child)
{
	struct pollfd watch = { .fd = fd, .events = POLLIN };
	int status, open_ = 1;

	while (waitpid(child, &status, open_ ? WNOHANG : 0) == 0) {
		if (poll(&watch, 1, 200) > 0 && read(fd, buf, sizeof(buf)) <= 0) {
			kill(child, SIGKILL);
			open_ = 0;
		}
	}
	return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

static unsigned long long run_program(int fd)
{
	char line[512], path[64], *argv[32];
	unsigned long size;
	pid_t child;
	int code;

	signal(SIGCHLD, SIG_DFL); /* this process waits for its child itself */
	if (read_header(fd, line, sizeof(line), &size, argv, 32) < 1)
		return 0;
	mkdir("/programs", 0755);
	snprintf(path, sizeof(path), "/programs/%d", (int)getpid());
	if (receive_program(fd, path, size) < 0) {
		dprintf(fd, "vsockmon-lab-guest: cannot store %s: %s\n", argv[0], strerror(errno));
		return 0;
	}
	child = fork();
	if (child == 0) {
		dup2(fd, 1);
		dup2(fd, 2);
		execv(path, argv);
		dprintf(2, "vsockmon-lab-guest: cannot run %s: %s\n", argv[0], strerror(errno));
		_exit(127);
	}
	code = child < 0 ? 127 : supervise(fd, child);
	dprintf(fd, "vsockmon-lab-guest: exit %d\n", code);
	unlink(path);
	say("run %s: exit %d", argv[0], code);
	return size;
}

static void serve(int listener, const char *name, unsigned long long (*handle)(int))
{
	for (;;) {
		struct sockaddr_vm peer;
		socklen_t len = sizeof(peer);
		int fd = accept(listener, (struct sockaddr *)&peer, &len);

		if (fd < 0) {
			if (errno != EINTR)
				say("accept on %s: %s", name, strerror(errno));
			continue;
		}
		if (fork() == 0) {
			unsigned long long total = handle(fd);

			say("%s from cid %u port %u: %llu bytes", name, peer.svm_cid, peer.svm_port,
			    total);
			_exit(0);
		}
		close(fd);
	}
}

static unsigned int local_cid(void)
{
	unsigned int cid = VMADDR_CID_ANY;
	int fd = open("/dev/vsock", O_RDONLY);

	if (fd >= 0) {
		ioctl(fd, IOCTL_VM_SOCKETS_GET_LOCAL_CID, &cid);
		close(fd);
	}
	return cid;
}

int main(int argc, char **argv)
{
	unsigned int port = argc > 1 ? strtoul(argv[1], NULL, 10) : 9000;
	int stream = listen_on(SOCK_STREAM, port);
	int seqpacket = listen_on(SOCK_SEQPACKET, port + 1);
	int dial = listen_on(SOCK_STREAM, port + 2);
	int run = listen_on(SOCK_STREAM, port + 3);

	setvbuf(stderr, NULL, _IOLBF, 0);
	signal(SIGCHLD, SIG_IGN);
	say("ready cid=%u stream-echo=%u seqpacket-echo=%u dial-back=%u run=%u", local_cid(),
	    port, port + 1, port + 2, port + 3);
	if (fork() == 0)
		serve(seqpacket, "seqpacket-echo", echo_seqpacket);
	if (fork() == 0)
		serve(dial, "dial-back", dial_back);
	if (fork() == 0)
		serve(run, "run", run_program);
	serve(stream, "stream-echo", echo_stream);
	return 0;
}
