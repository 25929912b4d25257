"""The committed real captures (fixtures/real, made by scripts/make-fixtures in the lab VM)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vsockmon.wire.pcapio import open_capture
from vsockmon.wire.protocol import LINKTYPE_VSOCK, MON_HDR_LEN, VIRTIO_HDR_LEN, VIRTIO_HEADER, Op

REAL = Path(__file__).resolve().parent.parent / "fixtures" / "real"
EXPECTED = {
    "stream-echo.pcap",
    "seqpacket-echo.pcap",
    "no-listener.pcap",
    "credit-stall.pcap",
    "many-connections.pcap",
    "half-close.pcap",
    "mid-connection.pcap",
    "host-guest.pcap",
}


def _frames(name: str) -> list[bytes]:
    with open_capture(str(REAL / name)) as reader:
        assert reader.linktype == LINKTYPE_VSOCK
        frames = [record.data for record in reader.records()]
        assert reader.stopped is None, f"{name}: {reader.stopped}"
    return frames


def test_every_real_capture_is_there() -> None:
    assert {p.name for p in REAL.glob("*.pcap")} == EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_capture_is_a_complete_pcap_of_vsock_frames(name: str) -> None:
    frames = _frames(name)
    assert frames, f"{name} has no frames"
    assert all(len(f) >= MON_HDR_LEN + VIRTIO_HDR_LEN for f in frames)


def test_host_guest_capture_shows_the_tap_length_bug() -> None:
    """Debian 6.1 taps each non-final fragment of a split host->guest packet with all the
    bytes still to send: more payload than the virtio header's len."""
    split = []
    for frame in _frames("host-guest.pcap"):
        virtio = VIRTIO_HEADER.unpack(frame, MON_HDR_LEN)
        captured = len(frame) - MON_HDR_LEN - VIRTIO_HDR_LEN
        if virtio["op"] == Op.RW and virtio["dst_cid"] == 3 and captured > virtio["len"]:
            split.append((virtio["len"], captured))
    assert split == [(3732, 10000), (3732, 6268)]
