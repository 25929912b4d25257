"""The seed's vsock client in Python: connect to CID argv[1] (default 2, the host) on port
argv[2] (default 9999), send "Hello, world!" and close — without reading any reply."""

import socket
import sys

cid = int(sys.argv[1]) if len(sys.argv) > 1 else socket.VMADDR_CID_HOST
port = int(sys.argv[2]) if len(sys.argv) > 2 else 9999

with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as client:
    client.connect((cid, port))
    client.sendall(b"Hello, world!")
print(f"sent 13 bytes to {cid}:{port}")
