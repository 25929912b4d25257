// The seed's vsock client in Go: connect to CID argv[1] (default 2, the host) on port
// argv[2] (default 9999), send "Hello, world!" and close — without reading any reply.
//
// Builds offline with Debian's golang.org/x/sys:
//
//	GO111MODULE=off GOPATH=/usr/share/gocode CGO_ENABLED=0 go build -o seed_client .
package main

import (
	"fmt"
	"os"
	"strconv"

	"golang.org/x/sys/unix"
)

func arg(i int, def uint32) uint32 {
	if len(os.Args) <= i {
		return def
	}
	v, err := strconv.ParseUint(os.Args[i], 0, 32)
	if err != nil {
		fmt.Fprintf(os.Stderr, "seed_client: %s: %v\n", os.Args[i], err)
		os.Exit(2)
	}
	return uint32(v)
}

func main() {
	addr := &unix.SockaddrVM{CID: arg(1, unix.VMADDR_CID_HOST), Port: arg(2, 9999)}
	msg := []byte("Hello, world!")
	fd, err := unix.Socket(unix.AF_VSOCK, unix.SOCK_STREAM, 0)
	if err != nil {
		fmt.Fprintf(os.Stderr, "seed_client: socket: %v\n", err)
		os.Exit(2)
	}
	// Linux gives up a connect after 2 s; a nested guest under emulation can be slower.
	timeout := unix.Timeval{Sec: 60}
	unix.SetsockoptTimeval(fd, unix.AF_VSOCK, unix.SO_VM_SOCKETS_CONNECT_TIMEOUT, &timeout)
	if err := unix.Connect(fd, addr); err != nil {
		fmt.Fprintf(os.Stderr, "seed_client: connect: %v\n", err)
		os.Exit(2)
	}
	if n, err := unix.Write(fd, msg); err != nil || n != len(msg) {
		fmt.Fprintf(os.Stderr, "seed_client: write: %d bytes, %v\n", n, err)
		os.Exit(2)
	}
	unix.Close(fd)
	fmt.Printf("sent %d bytes to %d:%d\n", len(msg), addr.CID, addr.Port)
}
