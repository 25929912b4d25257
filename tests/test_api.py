"""The public API (vsockmon.open) says exactly what the commands print, for every fixture."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from click.testing import CliRunner

import vsockmon
from vsockmon.cli import main
from vsockmon.diagnose.model import Thresholds
from vsockmon.errors import VsockmonError
from vsockmon.wire.pcapio import CaptureError

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = sorted(p for p in (ROOT / "fixtures").rglob("*")
                  if p.name.endswith((".pcap", ".pcapng", ".pcap.gz")))
ECHO = ROOT / "fixtures" / "real" / "stream-echo.pcap"


def cli(*args: str) -> tuple[list[str], int]:
    """The JSON lines a command prints on stdout, and its exit status."""
    result = CliRunner().invoke(main, list(args))
    return result.stdout.splitlines(), result.exit_code


def present(row: dict[str, object]) -> dict[str, object]:
    """A packets() row as decode --json writes it: the keys of absent headers left out."""
    return {k: v for k, v in row.items() if v is not None}


def test_the_fixtures_are_found() -> None:
    assert len(FIXTURES) >= 30
    assert {p.suffix for p in FIXTURES} == {".pcap", ".pcapng", ".gz"}


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: str(p.relative_to(ROOT / "fixtures")))
def test_api_equals_the_commands(path: Path) -> None:
    decoded, decode_rc = cli("decode", str(path), "--json")
    conns, conns_rc = cli("conns", str(path), "--json")
    diagnosed, _ = cli("diagnose", str(path), "--json")
    stats, _ = cli("stats", str(path), "--json")
    if conns_rc:  # not a vsockmon capture: the API refuses it as the commands do
        assert decode_rc and not decoded
        with pytest.raises(VsockmonError):
            vsockmon.open(path)
        return
    cap = vsockmon.open(path)
    packets = cap.packets()
    assert packets.num_rows == len(decoded)
    assert [present(r) for r in packets.to_pylist()] == [json.loads(x) for x in decoded]
    assert decode_rc == (1 if cap.stopped else 0)  # decode fails on a damaged file
    connections = cap.connections()
    assert connections.num_rows == len(conns)
    assert connections.to_pylist() == [json.loads(x) for x in conns]
    assert [f.to_dict(cap.start_ns) for f in cap.findings()] == [json.loads(x)
                                                                 for x in diagnosed]
    assert cap.stats().to_dict() == json.loads("\n".join(stats))


def test_columns_are_the_keys_of_the_json() -> None:
    cap = vsockmon.open(ECHO)
    decoded, _ = cli("decode", str(ECHO), "--json")
    conns, _ = cli("conns", str(ECHO), "--json")
    assert cap.packets().column_names == list(json.loads(decoded[0]))
    assert cap.connections().column_names == list(json.loads(conns[0]))


def test_findings_are_typed_and_thresholds_are_the_options() -> None:
    path = ROOT / "fixtures" / "diagnose" / "window-full.pcap"
    cap = vsockmon.open(path)
    [f] = cap.findings()  # the fixture's one scenario: a reader that never reads
    assert isinstance(f, vsockmon.Finding)
    assert (f.rule_id, f.severity, f.streams, f.frames) == (
        "window-full/not-reading", vsockmon.Severity.WARNING, (0,), (6,))
    assert f.message and f.cause and f.fix
    # --stall 60: the stall (until the capture's end, seconds later) is too short to report
    lines, _ = cli("diagnose", str(path), "--json", "--stall", "60")
    quiet = cap.findings(Thresholds(stall_s=60))
    assert [x.to_dict(cap.start_ns) for x in quiet] == [json.loads(x) for x in lines]
    assert [x.rule for x in quiet] == ["mid-capture"]


def test_a_missing_or_bad_file_raises_the_root_error(tmp_path: Path) -> None:
    with pytest.raises(VsockmonError, match="no such file"):
        vsockmon.open(tmp_path / "nope.pcap")
    with pytest.raises(vsockmon.CaptureError):
        vsockmon.open(io.BytesIO(b"not a capture at all"))
    assert issubclass(vsockmon.CaptureError, vsockmon.VsockmonError)
    assert vsockmon.CaptureError is CaptureError


def test_file_objects_gzip_and_repeated_passes() -> None:
    by_path = vsockmon.open(ECHO).packets()
    gz = io.BytesIO(gzip.compress(ECHO.read_bytes()))
    cap = vsockmon.open(gz)
    assert cap.packets().equals(by_path)
    assert cap.packets().equals(by_path)  # a seekable object is read again from its start
    assert not gz.closed  # the caller's object stays open
    prefixed = io.BytesIO(b"junk" + ECHO.read_bytes())
    prefixed.seek(4)  # read from where it stands
    assert vsockmon.open(prefixed).connections().num_rows == 1


def test_a_stream_is_read_once() -> None:
    class Pipe(io.RawIOBase):
        def __init__(self, data: bytes) -> None:
            self._data = io.BytesIO(data)

        def readable(self) -> bool:
            return True

        def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
            return self._data.readinto(buf)

    cap = vsockmon.open(io.BufferedReader(Pipe(ECHO.read_bytes())))
    assert cap.findings() == []
    assert cap.connections().num_rows == 1  # kept from the findings' pass
    with pytest.raises(VsockmonError, match="read only once"):
        cap.packets()


def test_iter_packets_streams_batches_of_the_asked_size() -> None:
    path = ROOT / "fixtures" / "real" / "many-connections.pcap"
    cap = vsockmon.open(path)
    whole = cap.packets()
    batches = list(cap.iter_packets(batch_size=7))
    assert whole.num_rows > 14
    assert [b.num_rows for b in batches[:-1]] == [7] * (len(batches) - 1)
    assert 1 <= batches[-1].num_rows <= 7
    assert pa.Table.from_batches(batches).equals(whole)
    with pytest.raises(ValueError):
        next(cap.iter_packets(batch_size=0))


def test_import_is_cheap_and_the_api_never_imports_click() -> None:
    code = (
        "import sys\n"
        "import vsockmon\n"
        "assert not {'numpy', 'pyarrow', 'click', 'scapy'} & set(sys.modules), sys.modules\n"
        f"cap = vsockmon.open({str(ECHO)!r})\n"
        "cap.packets(); cap.connections(); cap.findings(); cap.stats()\n"
        "list(cap.iter_packets(4))\n"
        "print('click' in sys.modules, 'pyarrow' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == ["False", "True"]


def test_the_notebook_session_of_the_docs_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/api.md: its ``>>>`` session gives the outputs shown; its pandas and polars
    blocks run too where those are installed (vsockmon needs neither)."""
    import doctest
    import importlib.util
    import re

    monkeypatch.chdir(ROOT)
    result = doctest.testfile(str(ROOT / "docs" / "api.md"), module_relative=False,
                              optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 20 and result.failed == 0
    text = (ROOT / "docs" / "api.md").read_text()
    plain = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if ">>>" not in b]
    assert len(plain) == 2  # the pandas and the polars block
    for block in plain:
        needs = "polars" if "polars" in block else "pandas"
        if importlib.util.find_spec(needs) is not None:
            exec(block, {"cap": vsockmon.open("fixtures/diagnose/no-listener.pcap")})


def test_packets_with_a_filter_equal_decode_with_that_filter() -> None:
    path = ROOT / "fixtures" / "real" / "many-connections.pcap"
    expr = "op == RW and port == 5005"
    decoded, _ = cli("decode", str(path), "--json", "-Y", expr)
    rows = vsockmon.open(path).packets(filter=expr).to_pylist()
    assert 0 < len(rows) < vsockmon.open(path).packets().num_rows
    assert [present(r) for r in rows] == [json.loads(x) for x in decoded]
    assert {r["vsock.virtio.op_name"] for r in rows} == {"RW"}
    with pytest.raises(VsockmonError):
        vsockmon.open(path).packets(filter="op ==")


def test_capture_diagnose_does_not_pay_for_the_tables() -> None:
    """``capture --diagnose`` (inside the lab VM) imports the diagnose command for its live
    report: that must not import pyarrow, which only the API's tables need."""
    code = "import sys, vsockmon.cli.diagnose; print('pyarrow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == ["False"]


def test_the_connections_made_range_by_range_are_the_records_as_arrow(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``connections()`` turns each range of streams into Arrow columns and lets it go; with
    ranges of 3 streams it must still be the table pyarrow makes of the records' Python
    values (nulls where a value is missing, ``cid:port`` ends, names of closes)."""
    from conntrack_scenarios import echo_capture

    import vsockmon.conntrack.tracker as tracker
    from vsockmon.export.tables import CONNECTION_COLUMNS, schema

    path = echo_capture(tmp_path / "echo.pcap")
    records = vsockmon.open(path).analysis().table.records()
    expected = pa.Table.from_pylist(records, schema=schema(CONNECTION_COLUMNS[1:]))
    monkeypatch.setattr(tracker, "CHUNK", 3)
    got = vsockmon.open(path).connections()
    assert len(records) > 6 and got.num_rows == len(records)
    assert got.equals(expected)
    assert got.column("handshake_ms").null_count > 0  # the nulls were checked too


def test_a_capture_without_connections_has_an_empty_connections_table(tmp_path: Path) -> None:
    from helpers import write_pcap

    from vsockmon.export.tables import CONNECTION_COLUMNS, schema

    got = vsockmon.open(write_pcap(tmp_path / "empty.pcap", [])).connections()
    assert got.num_rows == 0 and got.schema.equals(schema(CONNECTION_COLUMNS[1:]))
