"""conns and diagnose read one definition of a zero-credit stall and of beyond-credit.

They used to hold two: the tracker ended a stall still running at the *connection's* last
packet, diagnose at the *capture's* end. A window that fills at a connection's last packet
(the receiver stopped reading and the sender gave up writing) was a 0 ms stall in ``conns``
and a 3 s "not-reading" warning in ``diagnose``. Both now end it at the capture's end.
Beyond-credit packets were also found twice (a credit test before the packet in the tracker,
bytes in flight after it in diagnose); diagnose now reads the tracker's rows.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from click.testing import CliRunner
from conntrack_scenarios import write
from helpers import T0, frame
from test_conntrack_reference import random_capture

from vsockmon.cli import main
from vsockmon.conntrack.model import CLIENT, SERVER, Violation
from vsockmon.decode.frames import decode_batches
from vsockmon.diagnose.engine import Diagnosis
from vsockmon.diagnose.model import Thresholds
from vsockmon.wire.pcapio import CaptureReader
from vsockmon.wire.protocol import Op

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = sorted(p for p in (ROOT / "fixtures").rglob("*.pcap*")
                  if p.name not in ("ethernet.pcap",))  # not a vsock link type
S = 1_000_000_000


def _conns_stalls(path: Path) -> dict[int, tuple[int, float, float]]:
    """Per stream, from ``conns --json``: (stalls, stall seconds, longest stall ms)."""
    result = CliRunner().invoke(main, ["conns", str(path), "--json"])
    assert result.exit_code == 0, result.output
    recs = [json.loads(line) for line in result.stdout.splitlines()]
    return {r["stream"]: (r["credit_stalls"], r["stall_time"], r["max_stall_ms"])
            for r in recs if r["credit_stalls"]}


def _diagnosed(path: Path, chunk: int = 1 << 20) -> Diagnosis:
    """Tracker and digest fed ``path`` in batches of about ``chunk`` bytes, the digest
    keeping every stall (no threshold)."""
    d = Diagnosis(Thresholds(stall_s=0, credit_reply_s=0))
    with CaptureReader(str(path), chunk=chunk) as reader:
        for fb in decode_batches(reader.batches()):
            d.feed(fb)
    return d


def _diagnose_stalls(path: Path) -> dict[int, tuple[int, float, float]]:
    """Per stream, every stall diagnose follows (no threshold: it keeps them all)."""
    d = _diagnosed(path)
    end = d.digest.end_ns or 0
    out: dict[int, tuple[int, float, float]] = {}
    for st in d.digest.all_stalls():
        n, total, longest = out.get(st.stream, (0, 0.0, 0.0))
        secs = st.seconds(end)
        out[st.stream] = (n + 1, total + secs, max(longest, secs * 1e3))
    return out


def _close(a: dict[int, tuple[int, float, float]], b: dict[int, tuple[int, float, float]]
           ) -> bool:
    return a.keys() == b.keys() and all(
        a[k][0] == b[k][0] and a[k][1:] == pytest.approx(b[k][1:], abs=1e-6) for k in a)


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_conns_and_diagnose_count_the_same_stalls(path: Path) -> None:
    assert _close(_conns_stalls(path), _diagnose_stalls(path))


def test_fixtures_hold_stalls_to_compare() -> None:
    """The comparison above is not vacuous: several fixtures stall, some still at the end."""
    stalling = [p for p in FIXTURES if _conns_stalls(p)]
    assert len(stalling) >= 5


def test_a_window_full_at_the_connections_last_packet_lasts_to_the_capture_end(
        tmp_path: Path) -> None:
    """The edge where the two formulas differed: the server's 4 KiB window fills at the
    connection's last packet, and another connection's REQUEST comes 3 s later. The stall
    ran from the filling RW until the capture ended: 3 s in both views (it was 0 ms in
    ``conns``)."""
    c, s = (3, 50000), (2, 1234)
    frames = [
        (T0, frame(Op.REQUEST, src=c, dst=s, buf_alloc=65536)),
        (T0 + 1000, frame(Op.RESPONSE, src=s, dst=c, buf_alloc=4096)),
        (T0 + 2000, frame(Op.RW, b"x" * 4096, src=c, dst=s, buf_alloc=65536)),
        (T0 + 2000 + 3 * S, frame(Op.REQUEST, src=(3, 50001), dst=s)),
    ]
    path = write(tmp_path / "edge.pcap", frames)
    assert _conns_stalls(path) == {0: (1, pytest.approx(3.0), pytest.approx(3000.0))}
    assert _close(_conns_stalls(path), _diagnose_stalls(path))
    result = CliRunner().invoke(main, ["diagnose", str(path), "--json"])
    found = [json.loads(line) for line in result.stdout.splitlines()]
    stall = [f for f in found if f.get("rule") == "window-full"]
    assert len(stall) == 1 and stall[0]["evidence"]["seconds"] == 3.0


@pytest.mark.parametrize("seed", range(20))
def test_random_traffic_same_stalls_and_beyond_credit_in_both(tmp_path: Path,
                                                              seed: int) -> None:
    """Random credit (wraps, delayed fwd_cnt, absurd buffers) cut into small batches: per
    stream and sender, the connection's stalls and beyond-credit count are diagnose's."""
    rng = random.Random(seed)
    path = random_capture(rng, tmp_path / "r.pcap", 1500)
    d = _diagnosed(path, chunk=rng.choice([300, 4000]))
    end = d.digest.end_ns or 0
    stalls: dict[tuple[int, int], list[int]] = {}
    for st in d.digest.all_stalls():
        stalls.setdefault((st.stream, st.sender), []).append(round(st.seconds(end) * 1e9))
    stalled = beyond = 0
    for c in d.connections():
        for side in (CLIENT, SERVER):
            got = c.sides[side].stalls
            mine = stalls.get((c.stream, side), [])
            assert (got.count, got.total_ns, got.max_ns) == (
                len(mine), sum(mine), max(mine, default=0))
            stalled += got.count
            ev = c.sides[side].violations.get(Violation.BEYOND_CREDIT)
            e = d.digest.beyond.get((c.stream, side))
            assert (ev.count if ev else 0) == (e.count if e else 0)
            if ev and e:
                assert (ev.first_frame, ev.last_frame) == (e.first_frame, e.last_frame)
                beyond += 1
    assert stalled or beyond  # random credit hits one or the other
