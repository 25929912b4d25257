"""What every fuzz target shares: its seeds, how it is run, and what counts as a crash.

A target is a script beside this one defining ``one_input(data)`` and ``seeds()``, ending in
``run(one_input, seeds)``. Run as ``python fuzz/TARGET.py [libFuzzer flags] CORPUS…`` it is
an atheris (libFuzzer) run, coverage-guided over vsockmon's Python code;
``python fuzz/TARGET.py --write-seeds DIR`` writes its seed corpus, built from the committed
fixtures at that moment (no copies are committed). ``benchmarks/fuzz.py`` does both.

A crash is any exception that escapes ``one_input``: a target catches only the documented
error of what it calls — :class:`~vsockmon.wire.pcapio.CaptureError` and
:class:`~vsockmon.decode.filter.FilterError`, of the :class:`~vsockmon.errors.VsockmonError`
family the CLI turns into one line, and the protobuf reader's ``ProtobufError`` — so
anything else is a bug (libFuzzer's own limits catch hangs and unbounded memory).
"""

from __future__ import annotations

import contextlib
import gzip
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"


def capture_fixtures() -> list[Path]:
    """Every committed capture (pcap, pcapng, gzipped or not), in a stable order."""
    names = ("*.pcap", "*.pcapng", "*.pcap.gz", "*.pcapng.gz")
    return sorted({p for pattern in names for p in FIXTURES.rglob(pattern)})


def capture_seeds() -> Iterator[bytes]:
    """Each fixture's bytes, and the gunzipped bytes of a gzipped one too."""
    for path in capture_fixtures():
        raw = path.read_bytes()
        yield raw
        if path.suffix == ".gz":
            yield gzip.decompress(raw)


def write_seeds(seeds: Iterable[bytes], directory: Path) -> int:
    """Write each distinct seed to ``directory`` as ``seed-N``; returns how many."""
    directory.mkdir(parents=True, exist_ok=True)
    distinct = list(dict.fromkeys(seeds))
    for n, data in enumerate(distinct):
        (directory / f"seed-{n:04d}").write_bytes(data)
    return len(distinct)


def instrumented(module: str) -> AbstractContextManager[object]:
    """Around a target's imports: vsockmon's modules imported inside get atheris' coverage
    probes when ``module`` (the target's ``__name__``) is a fuzz run, and none when the
    target is imported (a test replaying inputs) or only writes its seeds."""
    if module != "__main__" or sys.argv[1:2] == ["--write-seeds"]:
        return contextlib.nullcontext()
    from atheris.import_hook import instrument_imports

    return instrument_imports(include=["vsockmon"])


def run(one_input: Callable[[bytes], None], seeds: Callable[[], Iterable[bytes]]) -> None:
    """The target's command line: ``--write-seeds DIR``, or a libFuzzer run (never returns)."""
    if sys.argv[1:2] == ["--write-seeds"]:
        if len(sys.argv) != 3:
            sys.exit("usage: TARGET.py --write-seeds DIR")
        print(write_seeds(seeds(), Path(sys.argv[2])))
        return
    import atheris

    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
