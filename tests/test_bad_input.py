"""Bad input on every command that reads a capture: one clear line, a non-zero exit, never a
traceback, never a hang.

Every command runs as a real process (a hang is a timeout, a traceback is on stderr) on each
bad file — a directory, a FIFO nobody writes to (a blocking open would wait forever),
/dev/zero (endless zeros: it must be refused from its first bytes, not read), a missing file —
and on bad or extreme options: a 200-character filter, an unknown CID name, counts far past
any capture. Expected lines are the reasons in words, checked against the input each case
builds. The processes run a few at a time in one fixture; each case is one test.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from vsockmon.wire.pcapio import open_capture

ROOT = Path(__file__).resolve().parent.parent
VSOCKMON = str(Path(sys.executable).with_name("vsockmon"))
GOOD = str(ROOT / "fixtures" / "real" / "stream-echo.pcap")
HUGE = str(10**30)
TIMEOUT = 120
"""Seconds before a case counts as hung (a fleet case starts a Dask cluster, slowly under load)."""

FILE_COMMANDS: dict[str, list[str]] = {
    "decode": ["decode", "{F}"],
    "conns": ["conns", "{F}"],
    "timeline": ["timeline", "{F}"],
    "stats": ["stats", "{F}"],
    "follow": ["follow", "{F}", "--conn", "0"],
    "diagnose": ["diagnose", "{F}"],
    "export-pcapng": ["export", "{F}", "-o", "{OUT}/x.pcapng"],
    "export-csv": ["export", "{F}", "-o", "{OUT}/tables", "--format", "csv"],
    "wireshark-open": ["wireshark", "open", "{F}"],
    "fleet-conns": ["fleet", "conns", "{F}", "--workers", "1"],
    "fleet-diagnose": ["fleet", "diagnose", "{F}", "--workers", "1"],
    "fleet-stats": ["fleet", "stats", "{F}", "--workers", "1"],
    "fleet-export": ["fleet", "export", "{F}", "-o", "{OUT}/fleet", "--workers", "1"],
    "top-r": ["top", "-r", "{F}", "--at-once", "-b", "-n", "1"],
}
"""Every command that takes a capture file ({F}); {OUT} is a fresh directory."""

BAD_FILES: dict[str, str] = {
    "directory": "is a directory",
    "fifo": "a FIFO with no writer",
    "zero": "not a pcap or pcapng file (magic 00000000)",
    "missing": "no such file",
}
"""The kind of bad file → the words of its one line."""

EXCEPTIONS: dict[tuple[str, str], str] = {
    # a pcapng export is of one capture; a directory is for tables
    ("export-pcapng", "directory"): "a pcapng export takes one capture, not a directory",
    ("export-csv", "directory"): "no capture files",  # tables: every capture under it
    # a directory is where a fleet finds captures: this one has none
    ("fleet-conns", "directory"): "no capture files", ("fleet-diagnose", "directory"):
    "no capture files", ("fleet-stats", "directory"): "no capture files",
    ("fleet-export", "directory"): "no capture files",
    # Wireshark reads pipes itself; without a display the command says how to use tshark
    ("wireshark-open", "fifo"): "no display", ("wireshark-open", "directory"): "is a directory",
    ("fleet-conns", "missing"): "no such file or directory",
    ("fleet-diagnose", "missing"): "no such file or directory",
    ("fleet-stats", "missing"): "no such file or directory",
    ("fleet-export", "missing"): "no such file or directory",
    ("wireshark-open", "missing"): "does not exist",
}


def long_filter(valid: bool) -> str:
    """200 characters of display filter: a chain of tests on the fixture's server port, or
    the same chain ending in a field that does not exist."""
    text = " or ".join(["port == 5001"] * 11)
    text = text + " or " + ("port == 5001" if valid else "colour == 5")
    return text + " " * (200 - len(text))


@dataclass(frozen=True)
class Case:
    argv: list[str]
    error: str | None
    """The words of the one error line; None: the command must succeed."""


def _cases() -> dict[str, Case]:
    cases = {f"{cmd}-{kind}": Case(argv, EXCEPTIONS.get((cmd, kind), BAD_FILES[kind]))
             for cmd, argv in FILE_COMMANDS.items() for kind in BAD_FILES}
    bad_filter = "bad filter: unknown field 'colour'"
    not_a_cid = "'hots' is not a CID"
    options = {
        "decode-200-char-filter": Case(["decode", GOOD, "-Y", long_filter(False)], bad_filter),
        "top-200-char-filter": Case(["top", "-r", GOOD, "--at-once", "-b", "-n", "1", "-Y",
                                     long_filter(False)], bad_filter),
        "decode-200-char-valid-filter": Case(["decode", GOOD, "-Y", long_filter(True)], None),
        "decode-unknown-cid-name": Case(["decode", GOOD, "-Y", "cid == hots"], not_a_cid),
        "conns-unknown-cid-name": Case(["conns", GOOD, "--cid", "hots"], not_a_cid),
        "conns-cid-name": Case(["conns", GOOD, "--cid", "local", "--json"], None),
        "decode-huge-count": Case(["decode", GOOD, "-c", HUGE], None),
        "conns-huge-limit": Case(["conns", GOOD, "-n", HUGE], None),
        "timeline-huge-conn": Case(["timeline", GOOD, "--conn", HUGE], f"no stream {HUGE}"),
        "follow-huge-conn": Case(["follow", GOOD, "--conn", HUGE], f"no stream {HUGE}"),
        "timeline-huge-limit": Case(["timeline", GOOD, "--limit", HUGE], None),
        "stats-huge-top": Case(["stats", GOOD, "--top", HUGE], None),
        "stats-huge-bins": Case(["stats", GOOD, "--bins", HUGE], "not in the range 1<=x<=10000"),
        "top-huge-iterations": Case(["top", "-r", GOOD, "--at-once", "-b", "-n", HUGE], None),
        "export-huge-jobs": Case(["export", GOOD, "-o", "{OUT}/t", "--format", "csv", "-j", HUGE],
                                 None),
        "fleet-huge-workers": Case(["fleet", "conns", GOOD, "--workers", HUGE],
                                   "not in the range 1<=x<=256"),
        "fleet-huge-examples": Case(["fleet", "diagnose", GOOD, "--workers", "1", "--examples",
                                     HUGE], None),
    }
    return {**cases, **options}


CASES = _cases()


def _run(name: str, case: Case, tmp: Path) -> subprocess.CompletedProcess[str]:
    kind = name.rsplit("-", 1)[-1]
    files = {"directory": tmp / "a-directory", "fifo": tmp / "a-fifo", "zero": Path("/dev/zero"),
             "missing": tmp / "missing.pcap"}
    out = tmp / f"out-{name}"
    out.mkdir()
    argv = [a.replace("{F}", str(files.get(kind, ""))).replace("{OUT}", str(out))
            for a in case.argv]
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    try:
        return subprocess.run([VSOCKMON, *argv], capture_output=True, text=True, env=env,
                              stdin=subprocess.DEVNULL, timeout=TIMEOUT, cwd=out)
    except subprocess.TimeoutExpired:  # the child is killed by run(); the case hung
        return subprocess.CompletedProcess(argv, -1, "", f"hung for {TIMEOUT} s")


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory
            ) -> dict[str, subprocess.CompletedProcess[str]]:
    tmp = tmp_path_factory.mktemp("bad-input")
    (tmp / "a-directory").mkdir()
    os.mkfifo(tmp / "a-fifo")
    with ThreadPoolExecutor(4) as pool:
        return dict(zip(CASES, pool.map(lambda item: _run(item[0], item[1], tmp), CASES.items()),
                        strict=True))


@pytest.mark.parametrize("name", list(CASES))
def test_one_clear_line_and_a_non_zero_exit(name: str, results: dict) -> None:
    case, done = CASES[name], results[name]
    assert "Traceback" not in done.stderr, done.stderr
    if case.error is None:
        assert done.returncode == 0, done.stderr
        return
    errors = [line for line in done.stderr.splitlines() if "Error" in line]
    assert done.returncode not in (0, -1), done.stderr
    assert len(errors) == 1, done.stderr
    if name.startswith("fleet-") and name.endswith(("-fifo", "-zero")):
        # a fleet names each capture that failed and why, then its one error line
        assert errors[0] == "Error: 1 of 1 captures failed", done.stderr
        assert case.error in done.stderr.splitlines()[0], done.stderr
    else:
        assert case.error in errors[0], done.stderr


def test_the_valid_long_filter_and_the_huge_count_print_every_frame(results: dict) -> None:
    with open_capture(GOOD) as reader:  # every frame of the fixture is on port 5001
        frames = sum(1 for _ in reader.records())
    assert frames > 10
    for name in ("decode-200-char-valid-filter", "decode-huge-count"):
        assert len(results[name].stdout.splitlines()) == frames, name
    assert len(long_filter(True)) == len(long_filter(False)) == 200


def test_a_cid_name_selects_like_its_number(results: dict) -> None:
    """``--cid local`` is CID 1: the fixture's one connection is on loopback."""
    assert results["conns-cid-name"].stdout.count('"stream"') == 1
