"""Wireshark is the oracle: on every fixture, every field we decode equals tshark's.

This covers every capture under fixtures/ (synthetic, real lab captures, payload captures),
so a new fixture is checked without touching this file.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vsockmon.decode.verify import build_report, our_records, tshark_records

ROOT = Path(__file__).resolve().parent.parent
NOT_VSOCK = {"ethernet.pcap", "truncated.pcap"}
CAPTURES = sorted(
    p for pattern in ("*.pcap", "*.pcapng", "*.pcap.gz")
    for p in (ROOT / "fixtures").rglob(pattern) if p.name not in NOT_VSOCK
)


def test_fixtures_exist() -> None:
    assert len(CAPTURES) >= 4


@pytest.mark.parametrize("path", CAPTURES, ids=[str(p.relative_to(ROOT)) for p in CAPTURES])
def test_every_field_equals_tshark(path: Path) -> None:
    ours = list(our_records(str(path)))
    theirs = list(tshark_records(str(path)))
    assert len(ours) == len(theirs)
    report = build_report(ours, theirs)
    assert report.frames == len(ours)
    assert report.disagreements == []


def test_a_wrong_field_is_caught() -> None:
    """The comparison itself can fail: corrupt one of our values and it must be reported."""
    path = ROOT / "fixtures" / "synthetic" / "stream-all-ops.pcap"
    ours = list(our_records(str(path)))
    ours[3]["vsock.virtio.fwd_cnt"] += 1
    ours[5]["payload_len"] -= 1
    report = build_report(ours, tshark_records(str(path)))
    assert [(d.frame, d.key) for d in report.disagreements] == [
        (4, "vsock.virtio.fwd_cnt"), (6, "payload_len")]


def test_where_wireshark_is_wrong_we_say_so() -> None:
    path = ROOT / "fixtures" / "synthetic" / "seqpacket-ns.pcapng"
    report = build_report(our_records(str(path)), tshark_records(str(path)))
    assert any("SEQPACKET" in what for what in report.wireshark_errors)
    assert any("flag bits" in what for what in report.wireshark_errors)


@pytest.mark.parametrize("path", CAPTURES, ids=[str(p.relative_to(ROOT)) for p in CAPTURES])
def test_fast_json_equals_records(path: Path) -> None:
    """``decode --json`` uses a template fast path; it must equal the reference dicts."""
    import json

    import numpy as np

    from vsockmon.decode.frames import decode_batches
    from vsockmon.wire.pcapio import open_capture

    with open_capture(str(path)) as reader:
        for fb in decode_batches(reader.batches()):
            lines = fb.json_text(np.arange(len(fb))).decode().splitlines()
            assert [json.loads(x) for x in lines] == fb.records()
            assert lines == [json.dumps(r, separators=(",", ":"), ensure_ascii=False)
                             for r in fb.records()]
