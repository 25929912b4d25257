"""The real scenarios of the stall rules, made again on every lab kernel by
fixtures/diagnose/lab_traffic.py (one boot per kernel, both captures): a half-close answered
only by a late close (half-close-stall), and a reader that took one packet of a full window
and stopped (Linux's own silence: window-full/not-reading, never fwd-cnt-stuck). The frames
each finding must name are reasoned from tshark's fields, as for the committed fixtures."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from test_diagnose import assert_quiet_after_a_small_read, by_tshark, diagnose_file, summary

from vsockmon.lab import Lab

pytestmark = pytest.mark.lab

SCRIPT = Path(__file__).resolve().parent.parent / "fixtures" / "diagnose" / "lab_traffic.py"


@pytest.fixture(scope="module")
def made(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("stall-lab")
    play = [f"{sys.executable} {SCRIPT} --out {work} --in-lab {kind}"
            for kind in ("half-close-stall", "window-full-partial-read")]
    result = lab.run(["sh", "-c", f"{play[0]} && ip link del vsockmon0 && {play[1]}"],
                     cwd=work, timeout=300)
    assert result.returncode == 0, result.output
    return work


def test_a_late_close_after_a_half_close_is_a_stall_on_this_kernel(made: Path) -> None:
    path = made / "half-close-stall.pcap"
    found = diagnose_file(path).findings
    assert sorted(summary(found)) == by_tshark(path)
    assert [(f.rule, f.stream, f.evidence["closed_by"]) for f in found] == [
        ("half-close-stall", 0, "server"), ("half-close-stall", 1, "client")]


def test_linux_stays_quiet_after_a_small_read_on_this_kernel(made: Path) -> None:
    assert_quiet_after_a_small_read(made / "window-full-partial-read.pcap")
