"""``vsockmon fleet`` on real Dask clusters: a scheduler and two workers started here as
processes on 127.0.0.1, and the local cluster the command starts itself.

The expected values come from the single-file commands (``vsockmon diagnose FILE --json``,
``conns FILE --json``, ``stats FILE --json``) run on each capture alone, from scapy's own
pcap reader, and from the layout the tests build; the fleet's Parquet is read back by DuckDB.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest
from click.testing import CliRunner

from vsockmon.cli import main
from vsockmon.fleet import Capture, FleetError, Request, analyse_capture, expand
from vsockmon.fleet.dataset import Dataset
from vsockmon.fleet.findings import group

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
DOC = Path(__file__).resolve().parent.parent / "docs" / "fleet.md"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``dask scheduler`` and two ``dask worker`` processes on 127.0.0.1, stopped
    after the module's tests; yields the scheduler's address."""
    from distributed import Client

    address = f"tcp://127.0.0.1:{_free_port()}"
    logs = tmp_path_factory.mktemp("dask")
    dask = [sys.executable, "-m", "dask"]
    procs = [subprocess.Popen(
        [*dask, "scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1],
         "--no-dashboard"], stdout=subprocess.DEVNULL,
        stderr=open(logs / "scheduler.log", "wb"))]  # noqa: SIM115 - closed with the process
    try:
        for i in range(2):
            procs.append(subprocess.Popen(
                [*dask, "worker", address, "--host", "127.0.0.1", "--nthreads", "1",
                 "--nworkers", "1", "--no-dashboard", "--name", f"w{i}"],
                stdout=subprocess.DEVNULL, stderr=open(logs / f"w{i}.log", "wb")))  # noqa: SIM115
        with Client(address, timeout="60s") as client:
            client.wait_for_workers(2, timeout=120)
            assert len(client.scheduler_info()["workers"]) == 2
        yield address
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _fleet(*args: str) -> tuple[int, str, str]:
    res = CliRunner().invoke(main, ["fleet", *args])
    if res.exception and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, res.stdout, res.stderr


def _lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line]


def _single(*args: str) -> tuple[int, str]:
    """A single-file command, the independent side of each comparison."""
    res = CliRunner().invoke(main, list(args))
    return res.exit_code, res.stdout


@pytest.fixture
def hosts(tmp_path: Path) -> Path:
    """Captures laid out as hosts: node-a (two plain), node-b (one gzip, one corrupt)."""
    root = tmp_path / "caps"
    for host, names in {"node-a": ["credit-stall.pcap", "many-connections.pcap"],
                        "node-b": ["no-listener.pcap"]}.items():
        (root / host).mkdir(parents=True)
        for name in names:
            shutil.copy(FIXTURES / "real" / name, root / host / name)
    gz = root / "node-b" / "no-listener.pcap"
    gz.with_name("no-listener.pcap.gz").write_bytes(gzip.compress(gz.read_bytes()))
    gz.unlink()
    (root / "node-b" / "half-close.pcap").write_bytes(
        (FIXTURES / "real" / "half-close.pcap").read_bytes())
    (root / "node-b" / "bad.pcap").write_bytes(b"this is not a capture at all")
    return root


# -- the done-when of the issue ----------------------------------------------------------


def test_diagnose_on_a_scheduler_with_two_workers_equals_diagnose_of_each_file(
        scheduler: str) -> None:
    code, out, err = _fleet("diagnose", str(FIXTURES), "--scheduler", scheduler, "--json")
    captures = expand([str(FIXTURES)])
    assert len(captures) == len(list(FIXTURES.rglob("*.pcap*")))
    got: dict[str, list[dict]] = {c.source: [] for c in captures}
    for f in _lines(out):
        source = f.pop("source")
        assert (f.pop("host"), f.pop("capture")) == (Path(source).parent.name,
                                                    Path(source).name)
        got[source].append(f)
    failed = []
    for c in captures:
        single_code, single_out = _single("diagnose", c.source, "--json")
        if single_code == 2:  # the single-file command cannot read it: the fleet says so
            failed.append(c.source)
            assert got[c.source] == [] and f"vsockmon: {c.source}: " in err
            continue
        assert got[c.source] == _lines(single_out), c.source
    assert failed == [str(FIXTURES / "synthetic" / "ethernet.pcap")]
    assert code == 2 and f"1 of {len(captures)} captures failed" in err
    assert sum(map(len, got.values())) >= 30
    rules = {f["rule"] for fs in got.values() for f in fs}
    assert {"no-listener", "window-full", "half-close-hang", "credit-violation"} <= rules


def test_bad_scheduler_address_is_one_line() -> None:
    res = subprocess.run([str(Path(sys.executable).with_name("vsockmon")), "fleet", "conns",
                          str(FIXTURES / "real"), "--scheduler", "tcp://127.0.0.1:1",
                          "--connect-timeout", "1"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 1 and res.stdout == ""
    assert len(res.stderr.splitlines()) == 1, res.stderr
    assert "tcp://127.0.0.1:1: cannot reach the Dask scheduler" in res.stderr
    assert "Traceback" not in res.stderr


def test_conns_on_the_local_cluster_to_parquet_read_by_duckdb(hosts: Path,
                                                             tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, _, err = _fleet("conns", str(hosts), "-o", str(out))  # the local default
    bad = hosts / "node-b" / "bad.pcap"
    assert code == 1 and "1 of 5 captures failed" in err
    assert f"vsockmon: {bad}: " in err and "not a pcap or pcapng file" in err
    got = duckdb.sql(
        f"select host, capture, stream, client, server, close, bytes_c2s, credit_stalls "
        f"from read_parquet('{out}/**/*.parquet', hive_partitioning=true) "
        f"order by all").fetchall()
    want = []
    for path in sorted(hosts.rglob("*.pcap*")):
        if path == bad:
            continue
        code, text = _single("conns", str(path), "--json")
        assert code == 0
        want += [(path.parent.name, path.name, r["stream"], r["client"], r["server"],
                  r["close"], r["bytes_c2s"], r["credit_stalls"]) for r in _lines(text)]
    assert got == sorted(want)
    assert len({(h, c) for h, c, *_ in got}) == 4
    assert ("node-a", "credit-stall.pcap", 0, "1:2989541302", "1:5004", "graceful",
            131072, 8) in got
    assert (out / "host=node-b" / "capture=no-listener.pcap.gz" / "connections.parquet"
            ).exists()
    code, _, err = _fleet("conns", str(hosts / "node-a"), "-o", str(out), "--workers", "1")
    assert code == 1 and "exists (and 1 more); use --force to overwrite" in err
    assert len(err.splitlines()) == 1


def test_export_packets_and_connections_datasets(scheduler: str, hosts: Path,
                                                 tmp_path: Path) -> None:
    from scapy.utils import PcapReader

    out = tmp_path / "tables"
    code, _, err = _fleet("export", str(hosts), "-o", str(out), "--scheduler", scheduler,
                          "--host-from", "name")
    assert code == 1 and "bad.pcap" in err
    got = duckdb.sql(f"select host, capture, count(*), min(frame), max(frame) from "
                     f"read_parquet('{out}/packets/**/*.parquet', hive_partitioning=true) "
                     f"group by all order by all").fetchall()
    want = []
    for path in sorted(hosts.rglob("*.pcap*")):
        if path.name != "bad.pcap":
            with PcapReader(str(path)) as reader:
                n = sum(1 for _ in reader)
            want.append((path.name.split(".")[0], path.name, n, 1, n))
    assert got == sorted(want)
    conns = duckdb.sql(f"select capture, count(*) from read_parquet("
                       f"'{out}/connections/**/*.parquet', hive_partitioning=true) "
                       f"group by all order by all").fetchall()
    assert conns == [("credit-stall.pcap", 1), ("half-close.pcap", 1),
                     ("many-connections.pcap", 8), ("no-listener.pcap.gz", 1)]


def test_stats_and_conns_json_equal_the_single_file_commands(scheduler: str,
                                                             hosts: Path) -> None:
    code, out, _ = _fleet("stats", f"{hosts}/node-a/*.pcap", "--scheduler", scheduler,
                          "--json")
    assert code == 0
    rows = _lines(out)
    assert [(r.pop("host"), r.pop("capture")) for r in rows] == [
        ("node-a", "credit-stall.pcap"), ("node-a", "many-connections.pcap")]
    for r in rows:
        assert r == json.loads(_single("stats", r.pop("source"), "--json")[1])
    code, out, _ = _fleet("conns", str(hosts / "node-a" / "credit-stall.pcap"),
                          "--scheduler", scheduler, "--json")
    (row,) = _lines(out)
    assert (row.pop("host"), row.pop("capture")) == ("node-a", "credit-stall.pcap")
    assert row == _lines(_single("conns", str(hosts / "node-a" / "credit-stall.pcap"),
                                 "--json")[1])[0]


def test_diagnose_text_groups_rules_across_captures_and_hosts(scheduler: str,
                                                              hosts: Path) -> None:
    no_listener = FIXTURES / "diagnose" / "no-listener.pcap"
    node_c = hosts / "node-c"
    node_c.mkdir()
    shutil.copy(no_listener, node_c / "a.pcap")
    shutil.copy(no_listener, node_c / "b.pcap")
    code, out, _ = _fleet("diagnose", str(hosts), "--scheduler", scheduler,
                          "--rule", "no-listener", "--examples", "1")
    # node-b's capture is refused once; node-c's two copies once each (their streams 2).
    assert code == 2
    head, example, more = out.splitlines()[:3]
    assert head.startswith("ERROR no-listener") and "3 findings in 3 of 6 captures on 2 " \
        "hosts" in head
    assert example.startswith("  node-b  no-listener.pcap.gz  ×1  stream 0: Nothing listens")
    assert more == "  … and 2 more captures"


def _doc_blocks(lang: str) -> list[str]:
    parts = DOC.read_text().split("```")
    return [p[len(lang) + 1:] for p in parts[1::2] if p.startswith(lang + "\n")]


def _doc_layout(root: Path) -> Path:
    """The captures of docs/fleet.md's walk-through, made of fixtures."""
    layout = {"node-a/2026-11-30T10.pcap": "real/credit-stall.pcap",
              "node-a/2026-11-30T11.pcap": "real/many-connections.pcap",
              "node-b/2026-11-30T10.pcap": "diagnose/no-listener.pcap",
              "node-b/2026-11-30T11.pcap.gz": "diagnose/dial-retry.pcap",
              "node-c/2026-11-30T10.pcap": "diagnose/window-full.pcap"}
    for dst, src in layout.items():
        (root / dst).parent.mkdir(parents=True, exist_ok=True)
        data = (FIXTURES / src).read_bytes()
        (root / dst).write_bytes(gzip.compress(data) if dst.endswith(".gz") else data)
    (root / "node-c" / "2026-11-30T11.pcap").write_bytes(b"garbage")
    return root


def test_docs_workflow(scheduler: str, tmp_path: Path,
                       monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/fleet.md's walk-through: its outputs, its query and its chart code."""
    monkeypatch.chdir(tmp_path)
    _doc_layout(tmp_path / "captures")
    doc = DOC.read_text()
    code, out, err = _fleet("diagnose", "captures/", "--min-severity", "warning",
                            "--scheduler", scheduler)
    assert code == 2
    shown = (err.splitlines()[0] + "\n" + out + err.splitlines()[-1]).replace(
        str(tmp_path), "/srv/fleet")
    assert shown in doc
    code, _, err = _fleet("conns", "captures/", "-o", "conns/", "--scheduler", scheduler)
    assert code == 1 and err.splitlines()[1] in doc
    (query,) = [b for b in _doc_blocks("sql") if "conns/" in b]
    got = duckdb.sql(query).fetchall()
    refused: dict[str, list[str]] = {}
    for path in sorted((tmp_path / "captures").rglob("*.pcap*")):
        _, text = _single("conns", str(path), "--json")
        refused.setdefault(path.parent.name, []).extend(
            path.name for r in _lines(text) if r["close"] == "refused")
    want = [(h, len(c), len(set(c))) for h, c in refused.items() if c]
    assert got == want == [("node-b", 6, 2)]
    assert "│ node-b  │       6 │        2 │" in doc
    (chart,) = _doc_blocks("python")[:1]
    exec(compile(chart, str(DOC), "exec"), {})
    assert (tmp_path / "refused-by-host.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- the parts ---------------------------------------------------------------------------


def test_sources_dirs_globs_files_and_hosts(hosts: Path) -> None:
    every = expand([str(hosts)])
    assert [(c.host, c.name) for c in every] == [
        ("node-a", "credit-stall.pcap"), ("node-a", "many-connections.pcap"),
        ("node-b", "bad.pcap"), ("node-b", "half-close.pcap"),
        ("node-b", "no-listener.pcap.gz")]
    assert all(os.path.isabs(c.source) for c in every)
    again = expand([f"{hosts}/*/*.pcap", str(hosts / "node-b"), str(hosts)])
    assert again == every  # each capture once, in one order
    assert [c.host for c in expand([str(hosts)], "name")] == [
        "credit-stall", "many-connections", "bad", "half-close", "no-listener"]
    assert {c.host for c in expand([str(hosts)], r"node-(?P<host>\w)/")} == {"a", "b"}
    assert {c.host for c in expand([str(hosts)], r"(node-\w)/")} == {"node-a", "node-b"}
    assert {c.host for c in expand([str(hosts)], r"node-\w")} == {"node-a", "node-b"}
    with pytest.raises(FleetError, match="finds no host"):
        expand([str(hosts)], r"rack-(\d+)")
    with pytest.raises(FleetError, match=r"both are capture 'bad\.pcap' of host 'caps'"):
        (hosts / "node-a" / "bad.pcap").write_bytes(b"")
        expand([str(hosts)], "(caps)/")
    with pytest.raises(FleetError, match="no such file or directory"):
        expand([str(hosts / "nowhere")])
    with pytest.raises(FleetError, match="matches no file"):
        expand([f"{hosts}/*.nothing"])
    with pytest.raises(FleetError, match="not a regular expression"):
        expand([str(hosts)], "(")


def test_worker_reads_an_fsspec_url_like_a_path(hosts: Path) -> None:
    path = hosts / "node-b" / "no-listener.pcap.gz"
    want = Request(frozenset({"connections", "findings", "stats"}))
    by_url = analyse_capture(path.as_uri(), want)
    by_path = analyse_capture(str(path), want)
    assert by_url.findings == by_path.findings and by_url.findings
    assert by_url.stats == by_path.stats
    assert by_url.connections is not None and by_url.connections.equals(by_path.connections)


def test_dataset_refuses_to_overwrite_and_percent_encodes(tmp_path: Path) -> None:
    out = tmp_path / "d"
    cap = Capture("/x/rack 1/a b.pcap", "rack/1", "a b.pcap")
    table = pa.table({"capture": ["dropped"], "v": [1]})
    Dataset(out, "t", "parquet", [cap]).write(cap, table)
    assert (out / "host=rack%2F1" / "capture=a%20b.pcap" / "t.parquet").exists()
    assert duckdb.sql(f"select host, capture, v from read_parquet('{out}/**/*.parquet', "
                      f"hive_partitioning=true)").fetchall() == [("rack/1", "a b.pcap", 1)]
    import pyarrow.dataset as ds

    assert ds.dataset(out, partitioning="hive").to_table().to_pylist() == [
        {"v": 1, "host": "rack/1", "capture": "a b.pcap"}]
    day = Capture("/x/2026-11-30", "h", "2026-11-30")
    Dataset(tmp_path / "days", "t", "parquet", [day]).write(day, pa.table({"v": [1]}))
    glob = f"read_parquet('{tmp_path}/days/**/*.parquet', hive_partitioning=true"
    assert duckdb.sql(f"select typeof(capture) from {glob})").fetchall() == [("DATE",)]
    assert duckdb.sql(f"select typeof(capture) from {glob}, hive_types_autocast=false)"
                      ).fetchall() == [("VARCHAR",)]
    with pytest.raises(FleetError, match="exists; use --force"):
        Dataset(out, "t", "parquet", [cap])
    Dataset(out, "t", "parquet", [cap], force=True).write(cap, pa.table({"v": [2]}))
    assert duckdb.sql(f"select v from read_parquet('{out}/**/*.parquet')").fetchall() \
        == [(2,)]


def test_findings_grouped_by_rule_most_severe_then_most_widespread() -> None:
    def f(rule: str, severity: str, kind: str | None = None) -> dict:
        return {"rule": rule, "kind": kind, "severity": severity}

    a, b, c = (Capture(f"/{h}/{n}", h, n) for h, n in (("h1", "x"), ("h1", "y"), ("h2", "x")))
    groups = group([(a, [f("mid-capture", "info", "end"), f("dial-retry", "warning")]),
                    (b, [f("dial-retry", "warning"), f("dial-retry", "warning")]),
                    (c, [f("mid-capture", "info", "end"), f("no-listener", "error")])])
    assert [(g.rule, g.findings, len(g.captures), g.hosts) for g in groups] == [
        ("no-listener", 1, 1, 1), ("dial-retry", 3, 2, 1), ("mid-capture/end", 2, 2, 2)]
    assert [cap for cap, _ in groups[1].examples(1)] == [b]


def test_a_task_that_raises_fails_its_capture_only(scheduler: str, hosts: Path) -> None:
    """A bug on a worker (here: a severity the engine does not know) becomes that capture's
    failure, with its path and the exception; a capture that cannot be read gets its
    reason; the run goes on."""
    from distributed import Client

    from vsockmon.fleet import run

    captures = expand([str(hosts / "node-b")])
    with Client(scheduler, timeout="30s") as client:
        seen: list[str] = []
        outcomes = list(run(client, captures, Request(frozenset({"findings"}),
                                                      min_severity="bogus"),
                            on_done=lambda o: seen.append(o.capture.name)))
        assert sorted(seen) == sorted(c.name for c in captures)
        by_name = {o.capture.name: o for o in outcomes}
        bad = by_name.pop("bad.pcap")
        assert bad.result is None
        assert bad.error == f"{bad.capture.source}: not a pcap or pcapng file (magic 74686973)"
        for o in by_name.values():
            assert o.result is None and o.error == f"{o.capture.source}: KeyError: 'BOGUS'"
        ok = list(run(client, captures[1:], Request(frozenset({"stats"}))))
        assert all(o.error is None and o.result and o.result.stats for o in ok)


def test_progress_on_a_terminal(scheduler: str, hosts: Path) -> None:
    """On a terminal, stderr shows captures done of the total and the failures so far."""
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen([str(Path(sys.executable).with_name("vsockmon")), "fleet",
                             "stats", str(hosts), "--scheduler", scheduler],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the other end closed
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    out, _ = proc.communicate(timeout=120)
    text = seen.decode(errors="replace")
    assert proc.returncode == 1 and b"node-a" in out
    assert "5/5" in text and "1 failed" in text, text
    assert "1 of 5 captures failed" in text


def test_the_worker_side_is_the_library_without_click() -> None:
    """What a worker runs imports neither click nor the CLI's renderers (nor Dask)."""
    code = ("import sys\n"
            "from vsockmon.fleet.worker import Request, WANTS, analyse_capture\n"
            f"r = analyse_capture({str(FIXTURES / 'real' / 'credit-stall.pcap')!r}, "
            "Request(WANTS))\n"
            "assert r.packets.num_rows == 20 and r.connections.num_rows == 1\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'click', 'tabulate', 'rich', 'dask', 'distributed'}))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)
    assert done.stdout.strip() == "[]"


def test_sources_at_fsspec_urls_are_listed_and_read_through_fsspec(hosts: Path) -> None:
    """A URL source is listed with fsspec on the client and opened with fsspec where the
    task runs (here fsspec's in-memory filesystem, in this process)."""
    import fsspec

    mem = fsspec.filesystem("memory")
    for path in sorted((hosts / "node-a").glob("*.pcap")):
        mem.pipe(f"/fleet/node-a/{path.name}", path.read_bytes())
    mem.pipe("/fleet/node-a/notes.txt", b"not a capture")
    try:
        caps = expand(["memory://fleet/"])
        assert [(c.source, c.host, c.name) for c in caps] == [
            ("memory:///fleet/node-a/credit-stall.pcap", "node-a", "credit-stall.pcap"),
            ("memory:///fleet/node-a/many-connections.pcap", "node-a",
             "many-connections.pcap")]
        assert [c.name for c in expand(["memory://fleet/*/*.pcap"])] == [c.name for c in caps]
        want = Request(frozenset({"connections", "findings"}))
        for c in caps:
            by_url = analyse_capture(c.source, want)
            by_path = analyse_capture(str(hosts / "node-a" / c.name), want)
            assert by_url.connections is not None and by_url.connections.num_rows > 0
            assert by_url.connections.equals(by_path.connections)
            assert by_url.findings == by_path.findings
        with pytest.raises(FleetError, match="no such file or directory"):
            expand(["memory://fleet/none/"])
    finally:
        mem.rm("/fleet", recursive=True)


def test_exit_status_and_other_formats(scheduler: str, hosts: Path, tmp_path: Path) -> None:
    code, out, err = _fleet("diagnose", str(hosts / "node-a"), "--scheduler", scheduler)
    assert (code, out, err) == (0, "no findings in 2 captures.\n", "")
    code, out, _ = _fleet("diagnose", str(hosts / "node-b" / "no-listener.pcap.gz"),
                          "--scheduler", scheduler, "--json")
    assert code == 1 and [f["rule"] for f in _lines(out)] == ["no-listener"]
    out_dir = tmp_path / "csv"
    code, _, _ = _fleet("conns", str(hosts / "node-a"), "-o", str(out_dir), "--format", "csv",
                        "--scheduler", scheduler)
    assert code == 0
    got = duckdb.sql(f"select capture, count(*) from read_csv('{out_dir}/**/*.csv', "
                     f"hive_partitioning=true) group by all order by all").fetchall()
    assert got == [(p.name, len(_lines(_single("conns", str(p), "--json")[1])))
                   for p in sorted((hosts / "node-a").glob("*.pcap"))]
    assert got[1][1] > 1


def test_local_cluster_is_one_process_per_core_and_is_stopped_after() -> None:
    import time

    import psutil

    from vsockmon.fleet import connect

    with connect(None) as client:
        workers = client.scheduler_info()["workers"].values()
        assert len(workers) == os.cpu_count()
        assert all(w["nthreads"] == 1 for w in workers)
        pids = set(client.run(os.getpid).values())
    assert len(pids) == os.cpu_count() and os.getpid() not in pids

    def alive(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + 30
    while any(map(alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(map(alive, pids))
