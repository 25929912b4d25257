"""Payload dissectors: what the bytes inside vsock RW packets say (ttrpc, JSON, sd_notify…).

The API for every view that shows payloads (``decode -V``, ``follow``, ``timeline``,
``export``)::

    from vsockmon.payload import dissect, dissect_frame
    info = dissect(payload, src_port, dst_port)   # PayloadInfo | None
    info = dissect_frame(frame)                   # same, from a decode.Frame
    info.protocol, info.summary, info.lines(), info.fields, info.to_dict()

A port table is tried first (destination port, then source port), then heuristics in
priority order. Third parties add dissectors with :func:`register` or through the
``vsockmon.payload`` entry point group (see :mod:`vsockmon.payload.registry`). No I/O here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from vsockmon.payload.model import Node, PayloadInfo
from vsockmon.payload.registry import ENTRY_POINT_GROUP, PayloadDissector, Registry

__all__ = [
    "ENTRY_POINT_GROUP", "REGISTRY", "Node", "PayloadDissector", "PayloadInfo", "Registry",
    "dissect", "dissect_frame", "register",
]

REGISTRY = Registry()
"""The process-wide registry: built-ins below, plugins on first use."""


def _builtins() -> None:
    from vsockmon.payload import http, jsonmsg, text, ttrpc

    for d in (ttrpc.DISSECTOR, http.DISSECTOR, jsonmsg.DISSECTOR, text.SD_NOTIFY, text.TEXT):
        REGISTRY.register(d)


_builtins()


def register(dissector: PayloadDissector) -> PayloadDissector:
    """Add a dissector to the process-wide registry (replacing one of the same name)."""
    return REGISTRY.register(dissector)


def dissect(payload: bytes, src_port: int, dst_port: int, hide: str | None = None
            ) -> PayloadInfo | None:
    """The payload's dissection, or None when no dissector recognises it (or when its
    protocol is ``hide``, found out as cheaply as the dissectors allow)."""
    return REGISTRY.dissect(payload, src_port, dst_port, hide)


class _FrameLike(Protocol):
    """What :func:`dissect_frame` reads of a frame (a decoded Frame has these, read-only)."""

    @property
    def has_virtio(self) -> bool: ...

    @property
    def virtio(self) -> Mapping[str, int]: ...

    @property
    def payload(self) -> bytes: ...


def dissect_frame(frame: _FrameLike) -> PayloadInfo | None:
    """Dissect a decoded frame's payload, trusting the virtio header's ``len``.

    The kernel's tap-length bug can append bytes of later fragments to a frame; only the
    first ``len`` bytes belong to this packet.
    """
    if not frame.has_virtio:
        return None
    v = frame.virtio
    return dissect(frame.payload[: v["len"]], v["src_port"], v["dst_port"])
