"""The bulk decoder, its anomalies and the display filters."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import frame, write_pcap

from vsockmon.decode.filter import FilterError, compile_filter
from vsockmon.decode.frames import decode_batches, frames
from vsockmon.wire.pcapio import open_capture
from vsockmon.wire.protocol import Op

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "synthetic"


def decoded(path: Path) -> list[dict]:
    with open_capture(str(path)) as r:
        return [f.fields() for f in frames(r.batches())]


def test_odd_frames_are_flagged_never_raised() -> None:
    got = [r["anomalies"] for r in decoded(FIXTURES / "odd-frames.pcap")]
    assert got == [
        ["payload-len-mismatch"],
        ["truncated"],
        ["truncated"],
        ["op-mismatch"],
        ["addr-mismatch"],
        [],
        [],
        ["unknown-op", "unknown-type"],
        ["truncated"],
    ]


def test_absent_headers_omit_their_keys() -> None:
    recs = decoded(FIXTURES / "odd-frames.pcap")
    assert "vsock.virtio.op" not in recs[1] and recs[1]["vsock.op"] == 4
    assert "vsock.src_cid" not in recs[2] and recs[2]["payload_len"] == 0
    no_info = recs[5]
    assert no_info["vsock.trans_name"] == "NO_INFO" and "vsock.virtio.len" not in no_info
    assert no_info["payload_len"] == len(b"opaque")


def test_names_next_to_numbers() -> None:
    recs = decoded(FIXTURES / "seqpacket-ns.pcapng")
    eom = next(r for r in recs if r.get("vsock.virtio.flags") == 3)
    assert eom["vsock.virtio.type_name"] == "SEQPACKET"
    assert eom["vsock.virtio.flags_names"] == ["EOM", "EOR"]
    stream = decoded(FIXTURES / "stream-all-ops.pcap")
    assert {r["vsock.virtio.op_name"] for r in stream} == {o.name for o in Op}


def test_snaplen_cut_is_not_a_tap_bug(tmp_path: Path) -> None:
    full = frame(Op.RW, b"x" * 100)
    path = tmp_path / "snap.pcap"
    from vsockmon.wire.pcapio import PcapWriter

    with open(path, "wb") as fp:
        PcapWriter(fp).write(0, full[:90], orig_len=len(full))
    (rec,) = decoded(path)
    assert rec["anomalies"] == ["snaplen"] and rec["payload_len"] == 14


def test_frame_numbers_continue_across_batches(tmp_path: Path) -> None:
    path = write_pcap(tmp_path / "n.pcap", [frame(Op.RW, b"a" * 1000)] * 300)
    from vsockmon.wire.pcapio import CaptureReader

    with CaptureReader(str(path), chunk=4096) as r:
        batches = list(decode_batches(r.batches()))
    assert len(batches) > 10
    numbers = [f.number for fb in batches for f in fb.frames()]
    assert numbers == list(range(1, 301))


def test_random_bytes_never_crash(tmp_path: Path) -> None:
    import random

    rnd = random.Random(7)
    blobs = [bytes(rnd.getrandbits(8) for _ in range(rnd.randrange(0, 200))) for _ in range(400)]
    path = write_pcap(tmp_path / "r.pcap", blobs)
    recs = decoded(path)
    assert len(recs) == 400
    assert all(isinstance(r["anomalies"], list) for r in recs)


def mask(expr: str, path: Path = FIXTURES / "stream-all-ops.pcap") -> list[int]:
    keep = compile_filter(expr)
    with open_capture(str(path)) as r:
        return [fb.first + i for fb in decode_batches(r.batches()) for i in keep(fb).nonzero()[0]]


@pytest.mark.parametrize(("expr", "want"), [
    ("op == REQUEST", [1, 23]),
    ("op == rst and port == 9999", [24]),
    ("cid == 3 and op == RW and len > 4000", [11, 13]),
    ("op == SHUTDOWN and flags has SEND", [18, 20]),
    ("not (op == RW or op == CREDIT_UPDATE) and buf_alloc == 0", [24]),
    ("anomaly has unknown-op", [25]),
    ("op == 7", [15]),
    ("vsock.virtio.op == CREDIT_REQUEST", [15]),
    ("port != 1024", [23, 24]),
    ("anomaly", [25]),
    ("mon.op == CONNECT && dst_cid == 2", [1, 23]),
    ("payload_len >= 65536 || frame == 2", [2, 13]),
])
def test_filters(expr: str, want: list[int]) -> None:
    assert mask(expr) == want


def test_filter_on_seqpacket_flags() -> None:
    path = FIXTURES / "seqpacket-ns.pcapng"
    assert mask("type == SEQPACKET and flags has EOM", path) == [4, 6, 8]
    assert mask("flags has EOR", path) == [6, 7]


@pytest.mark.parametrize(("expr", "message"), [
    ("", "empty"),
    ("cid ==", "ends too early"),
    ("colour == 3", "unknown field 'colour'"),
    ("op == BANANA", "'BANANA' is not a value of op"),
    ("flags has XYZ", "no bit named"),
    ("(op == RW", "missing"),
    ("op == RW RW", "unexpected"),
    ("cid == 3 $", "unexpected"),
])
def test_bad_filters_say_why(expr: str, message: str) -> None:
    with pytest.raises(FilterError, match=message):
        compile_filter(expr)


def test_filter_nesting_is_bounded_with_a_clear_message() -> None:
    """Found by fuzzing: 400 nested '(' or 'not' ran the parser out of stack."""
    from vsockmon.decode.filter import MAX_DEPTH

    deep = MAX_DEPTH + 1
    for expr in ("(" * deep + "cid == 3" + ")" * deep, "not " * deep + "cid == 3",
                 "!" * 5000 + "cid"):
        with pytest.raises(FilterError, match=f"nested deeper than {MAX_DEPTH} levels"):
            compile_filter(expr)
    # at the limit it still works: an even number of nots is the test itself
    assert mask("(" * MAX_DEPTH + "op == 7" + ")" * MAX_DEPTH) == [15]
    assert mask("not " * MAX_DEPTH + "op == 7") == [15]


def test_a_chain_of_thousands_of_terms_costs_no_stack() -> None:
    # before, each 'or' wrapped the filter so far in one more call: 2,000 terms overflowed
    assert mask(" or ".join(["op == 7"] * 2000)) == [15]
    assert mask(" and ".join(["op == 7"] * 2000)) == [15]
    assert mask(" or ".join(f"frame == {n}" for n in range(3, 2003))) == list(range(3, 26))


def test_mutated_files_end_in_a_clear_error_or_a_clean_stop(tmp_path: Path) -> None:
    """No byte sequence crashes the reader or the decoder: flip bytes of real captures."""
    import random

    from vsockmon.wire.pcapio import CaptureError

    rnd = random.Random(11)
    sources = [(FIXTURES / n).read_bytes() for n in ("stream-all-ops.pcap", "seqpacket-ns.pcapng")]
    for trial in range(300):
        data = bytearray(rnd.choice(sources))
        for _ in range(rnd.randrange(1, 12)):
            data[rnd.randrange(len(data))] = rnd.getrandbits(8)
        cut = rnd.choice([len(data), rnd.randrange(len(data))])
        path = tmp_path / f"m{trial}"
        path.write_bytes(bytes(data[:cut]))
        try:
            with open_capture(str(path)) as r:
                for f in frames(r.batches()):
                    f.fields()
        except CaptureError as e:
            assert "\n" not in str(e)
