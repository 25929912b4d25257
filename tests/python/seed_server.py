"""The seed's vsock server in Python: bind port 9999 (argv[1]) on VMADDR_CID_ANY (or the CID
in argv[2]), accept connections one after another and print what each client sends.

It also echoes every chunk back (and ignores a client that does not read it), so
``vsockmon echo client`` can verify its bytes against it.
"""

import contextlib
import socket
import sys

port = int(sys.argv[1]) if len(sys.argv) > 1 else 9999
cid = int(sys.argv[2]) if len(sys.argv) > 2 else socket.VMADDR_CID_ANY

with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as server:
    server.bind((cid, port))
    server.listen()
    print(f"listening on {cid}:{port}", file=sys.stderr, flush=True)
    while True:
        conn, (peer_cid, peer_port) = server.accept()
        total = 0
        with conn:
            while data := conn.recv(4096):
                total += len(data)
                print(f"received {len(data)} bytes from {peer_cid}:{peer_port}: {data!r}",
                      flush=True)
                with contextlib.suppress(OSError):  # a client that closed without reading
                    conn.sendall(data)
        print(f"connection from {peer_cid}:{peer_port} closed: {total} bytes", flush=True)
