// The seed's vsock server in Go: bind port 9999 (argv[1]) on VMADDR_CID_ANY (or the CID in
// argv[2]), accept connections one after another and print what each client sends. It also
// echoes every chunk back (ignoring a client that does not read it), so vsockmon echo client
// can verify its bytes against it.
//
// Builds offline with Debian's golang.org/x/sys:
//
//	GO111MODULE=off GOPATH=/usr/share/gocode CGO_ENABLED=0 go build -o seed_server .
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
		fmt.Fprintf(os.Stderr, "seed_server: %s: %v\n", os.Args[i], err)
		os.Exit(2)
	}
	return uint32(v)
}

func fail(what string, err error) {
	fmt.Fprintf(os.Stderr, "seed_server: %s: %v\n", what, err)
	os.Exit(2)
}

func main() {
	addr := &unix.SockaddrVM{Port: arg(1, 9999), CID: arg(2, unix.VMADDR_CID_ANY)}
	fd, err := unix.Socket(unix.AF_VSOCK, unix.SOCK_STREAM, 0)
	if err != nil {
		fail("socket", err)
	}
	if err := unix.Bind(fd, addr); err != nil {
		fail("bind", err)
	}
	if err := unix.Listen(fd, 16); err != nil {
		fail("listen", err)
	}
	fmt.Fprintf(os.Stderr, "listening on %d:%d\n", addr.CID, addr.Port)
	buf := make([]byte, 4096)
	for {
		conn, sa, err := unix.Accept(fd)
		if err != nil {
			continue
		}
		peer := sa.(*unix.SockaddrVM)
		total := 0
		for {
			n, err := unix.Read(conn, buf)
			if n <= 0 || err != nil {
				break
			}
			total += n
			fmt.Printf("received %d bytes from %d:%d: %q\n", n, peer.CID, peer.Port, buf[:n])
			unix.Write(conn, buf[:n]) // a client that closed without reading: ignored
		}
		fmt.Printf("connection from %d:%d closed: %d bytes\n", peer.CID, peer.Port, total)
		unix.Close(conn)
	}
}
