"""Text payloads: systemd's sd_notify ``KEY=VALUE`` lines, and printable text in general.

sd_notify over vsock (``NOTIFY_SOCKET=vsock:CID:PORT``) opens one short connection per
notification and writes newline-separated assignments such as ``READY=1`` or
``STATUS=Starting…``. Anything else that is printable text is shown line by line.
"""

from __future__ import annotations

import functools
import re

from vsockmon.payload.model import Node, PayloadInfo, shorten
from vsockmon.payload.registry import PayloadDissector

_ASSIGNMENT = re.compile(r"[A-Z][A-Z0-9_]*=[^\n]*")
_CONTROL = re.compile(b"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
"""Control characters other than tab, LF and CR (a regex: this runs on every payload), as
bytes: in UTF-8 a byte below 128 is always that character, so the bytes are searched before
they are decoded (binary payloads, most of them, are never decoded)."""


@functools.lru_cache(maxsize=1)
def _as_text(payload: bytes) -> str | None:
    """The payload as text when it is valid UTF-8 without control bytes other than
    tab, CR and LF. Remembered for the last payload: its detections and its dissection
    ask for the same payload up to four times in a row."""
    if _CONTROL.search(payload):
        return None
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _lines(text: str) -> list[str]:
    return [line.rstrip("\r") for line in text.split("\n") if line.strip()]


_SD_NOTIFY_FIRST = frozenset(c for c in range(128) if chr(c).isupper() or chr(c).isspace())
"""The ASCII bytes an sd_notify payload can begin with: a key's first letter, or white space
before the first line that is not blank. Any other ASCII byte starts a line that is not
blank and not an assignment (a byte above 127 may start white space: it is decoded)."""


def detect_sd_notify(payload: bytes) -> bool:
    if payload and payload[0] < 128 and payload[0] not in _SD_NOTIFY_FIRST:
        return False
    text = _as_text(payload)
    lines = _lines(text) if text is not None else []
    return bool(lines) and all(_ASSIGNMENT.fullmatch(line) for line in lines)


def dissect_sd_notify(payload: bytes) -> PayloadInfo | None:
    text = _as_text(payload)
    if text is None:
        return None
    pairs = [line.split("=", 1) for line in _lines(text) if _ASSIGNMENT.fullmatch(line)]
    if not pairs:
        return None
    return PayloadInfo(
        "sd_notify",
        shorten(" ".join(f"{k}={v}" for k, v in pairs)),
        tuple(Node(f"{k}={v}") for k, v in pairs),
        {f"sd_notify.{k}": v for k, v in pairs},
    )


def detect_text(payload: bytes) -> bool:
    text = _as_text(payload)
    return text is not None and bool(text.strip())


def dissect_text(payload: bytes) -> PayloadInfo | None:
    text = _as_text(payload)
    if text is None or not text.strip():
        return None
    lines = _lines(text)
    return PayloadInfo("text", shorten(lines[0]), tuple(Node(line) for line in lines),
                       {"text.lines": len(lines)})


SD_NOTIFY = PayloadDissector(
    "sd_notify", dissect_sd_notify, detect=detect_sd_notify, priority=40,
    description="systemd sd_notify KEY=VALUE lines",
)
TEXT = PayloadDissector(
    "text", dissect_text, detect=detect_text, priority=90,
    description="printable text, line by line (fallback)",
    detect_decides=True,  # both ask _as_text for non-blank text
)
