"""The fuzz targets of ``fuzz/`` in the suite: a short coverage-guided run of each (about a
minute in all) that fails on any crash, the runner's crash report, the seed corpora, and
every input that once crashed a target, replayed (``fuzz/regressions/TARGET/``)."""

from __future__ import annotations

import gzip
import importlib.util
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
FUZZ = ROOT / "fuzz"
RUNNER = ROOT / "benchmarks" / "fuzz.py"
TARGETS = ("pcap_reader", "decoder", "analysis", "display_filter", "payloads")
SHORT_RUN_SECONDS = 12
"""Per target: five targets make the suite's minute of fuzzing."""


def fuzz(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(RUNNER), "--json", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=900)


def load(path: Path) -> ModuleType:
    """The module of a script (with ``fuzz/`` on the path for a target's ``common``),
    imported without instrumentation."""
    sys.path.insert(0, str(FUZZ))
    try:
        spec = importlib.util.spec_from_file_location(f"_fuzz_{path.stem}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # a dataclass looks its module up there
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(FUZZ))
    return module


def test_every_target_is_in_the_runner_and_has_a_script() -> None:
    assert set(load(RUNNER).TARGETS) == set(TARGETS)
    assert {p.stem for p in FUZZ.glob("*.py")} == {*TARGETS, "common"}


@pytest.mark.parametrize("name", TARGETS)
def test_short_fuzz_run_finds_no_crash(name: str, tmp_path: Path) -> None:
    done = fuzz("--target", name, "--seconds", str(SHORT_RUN_SECONDS), "--artifacts",
                str(tmp_path / "crashes"), cwd=tmp_path)
    result = json.loads(done.stdout.splitlines()[0])
    crashed = [p.read_bytes()[:200] for p in (tmp_path / "crashes").iterdir()]
    assert done.returncode == 0 and result["crashes"] == 0 and not crashed, (result, crashed)
    # it fuzzed: inputs beyond the seeds ran, and vsockmon's code was reached
    assert result["executions"] > 20 and result["coverage"] > 50, result


def test_the_runner_reports_a_crash_and_keeps_its_input(tmp_path: Path) -> None:
    """A target of the same form that fails on inputs starting with '!' (an exception
    outside vsockmon's family): the run must fail, count it and keep the input."""
    script = tmp_path / "toy.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(FUZZ)!r})\n"
        "from common import run\n"
        "def one_input(data: bytes) -> None:\n"
        "    if data[:1] == b'!':\n"
        "        raise KeyError('found it')\n"
        "run(one_input, lambda: [b'!'])\n")
    done = fuzz("--target", str(script), "--seconds", "30", "--artifacts",
                str(tmp_path / "crashes"), cwd=tmp_path)
    result = json.loads(done.stdout)
    assert done.returncode == 1
    assert result["target"] == "toy" and result["crashes"] == 1
    assert [Path(p).read_bytes()[:1] for p in result["artifacts"]] == [b"!"]


def test_capture_seeds_are_every_fixture_and_its_gunzipped_bytes(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(FUZZ / "pcap_reader.py"), "--write-seeds",
                    str(tmp_path)], check=True, capture_output=True)
    seeds = {p.read_bytes() for p in tmp_path.iterdir()}
    fixtures = [p for p in (ROOT / "fixtures").rglob("*")
                if p.name.endswith((".pcap", ".pcapng", ".pcap.gz"))]
    assert len(fixtures) > 30
    for path in fixtures:
        assert path.read_bytes() in seeds, path
        if path.suffix == ".gz":
            assert gzip.decompress(path.read_bytes()) in seeds, path


@pytest.mark.parametrize("name", ["display_filter", "payloads"])
def test_other_seed_corpora_are_built_from_the_project(name: str, tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(FUZZ / f"{name}.py"), "--write-seeds", str(tmp_path)],
                   check=True, capture_output=True)
    seeds = {p.read_bytes() for p in tmp_path.iterdir()}
    if name == "display_filter":  # field names and the documented examples
        assert {b"cid", b"flags has eom", b"cid == 3 and op == RW"} <= seeds
    else:  # payloads of the payload fixtures: a ttrpc header (length, stream, type) among them
        assert any(b'"execute"' in s for s in seeds)  # the qemu guest agent's JSON
        assert len(seeds) > 100


REGRESSIONS = sorted((FUZZ / "regressions").glob("*/*"))


@pytest.mark.parametrize("path", REGRESSIONS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_inputs_that_once_crashed_a_target_pass_it_now(path: Path) -> None:
    one_input: Callable[[bytes], None] = load(FUZZ / f"{path.parent.name}.py").one_input
    one_input(path.read_bytes())
