"""Fuzz target: the payload dissectors (ttrpc and its protobuf, HTTP, JSON, sd_notify, text).

Each input is one payload. Every built-in dissector reads it directly — not through the
registry, which skips a dissector that raises so that a plugin's bug cannot stop
``decode``, and would hide ours — and what it returns must render as lines and as JSON.
The registry's own choice is made too, once per port table entry. Only the protobuf reader
may refuse bytes, with its :class:`~vsockmon.payload.protobuf.ProtobufError`.
Seeds: the payload of every frame of every fixture, and a ttrpc request and response.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

from common import capture_fixtures, instrumented, run

with instrumented(__name__):
    from vsockmon.decode.frames import decode_batch
    from vsockmon.payload import REGISTRY, http, jsonmsg, protobuf, text, ttrpc
    from vsockmon.payload.model import PayloadInfo
    from vsockmon.wire.pcapio import CaptureReader

BUILT_IN = (ttrpc.DISSECTOR, http.DISSECTOR, jsonmsg.DISSECTOR, text.SD_NOTIFY, text.TEXT)
PORTS = sorted({port for d in BUILT_IN for port in d.ports} | {0})


def seeds() -> Iterator[bytes]:
    for path in capture_fixtures():
        with CaptureReader(str(path)) as reader:
            for batch in reader.batches():
                for frame in decode_batch(batch, 1).frames():
                    if frame.has_virtio and frame.virtio["len"]:
                        yield frame.payload[: frame.virtio["len"]]
    yield ttrpc.encode_request(1, "grpc.AgentService", "CreateContainer", b"\x0a\x03abc")
    yield ttrpc.encode_response(1, b"\x08\x01", code=5, message="not found")


def _render(info: PayloadInfo | None) -> None:
    if info is not None:
        assert isinstance(info, PayloadInfo), info
        info.lines()
        json.dumps(info.to_dict())


def one_input(data: bytes) -> None:
    for d in BUILT_IN:
        if d.detect is not None:
            assert d.detect(data) in (True, False)
        _render(d.dissect(data))
    for port in PORTS:
        _render(REGISTRY.dissect(data, 49152, port))
    with contextlib.suppress(protobuf.ProtobufError):
        protobuf.parse(data)


if __name__ == "__main__":
    run(one_input, seeds)
