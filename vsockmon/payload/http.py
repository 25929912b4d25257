"""HTTP/1.x messages (some vsock services expose a small REST API, e.g. over a proxy).

Only the start line and headers are read; a body is counted, not parsed.
"""

from __future__ import annotations

import re

from vsockmon.payload.model import Node, PayloadInfo
from vsockmon.payload.registry import PayloadDissector

_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE")
_REQUEST = re.compile(f"({'|'.join(_METHODS)}) (\\S+) HTTP/1\\.[01]".encode())
_RESPONSE = re.compile(rb"HTTP/1\.[01] (\d{3})(?: ([^\r\n]*))?")
_FIRST_BYTES = frozenset(word.encode()[0] for word in (*_METHODS, "HTTP"))
"""The bytes a start line can begin with: most payloads are refused on their first byte."""


def detect(payload: bytes) -> bool:
    if not payload or payload[0] not in _FIRST_BYTES:
        return False
    line = payload.split(b"\n", 1)[0].rstrip(b"\r")
    return bool(_REQUEST.fullmatch(line) or _RESPONSE.fullmatch(line))


def dissect(payload: bytes) -> PayloadInfo | None:
    head, sep, body = payload.partition(b"\r\n\r\n")
    if not sep:
        head, sep, body = payload.partition(b"\n\n")
    lines = head.decode("latin-1").replace("\r\n", "\n").split("\n")
    start = lines[0]
    request = _REQUEST.fullmatch(start.encode("latin-1"))
    response = _RESPONSE.fullmatch(start.encode("latin-1"))
    if not (request or response):
        return None
    fields: dict[str, object] = {}
    if request:
        fields["http.request.method"] = request.group(1).decode()
        fields["http.request.uri"] = request.group(2).decode("latin-1")
    elif response:
        fields["http.response.code"] = int(response.group(1))
    headers = [line for line in lines[1:] if line]
    for line in headers:
        name, _, value = line.partition(":")
        fields[f"http.header.{name.strip().lower()}"] = value.strip()
    tree = [Node(start), *(Node(h) for h in headers)]
    if sep:
        tree.append(Node(f"Body: {len(body)} bytes"))
    else:
        tree.append(Node("Headers incomplete"))
    return PayloadInfo("http", start, tuple(tree), fields)


DISSECTOR = PayloadDissector(
    "http", dissect, detect=detect, priority=20, description="HTTP/1.x start line and headers",
)
