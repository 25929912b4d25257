#!/usr/bin/env python3
"""Coverage-guided fuzzing of vsockmon's parsers: executions, coverage and crashes per target.

Runs each target of ``fuzz/`` (atheris, i.e. libFuzzer over Python bytecode) for its share
of the time, seeded from the committed fixtures, and prints one row per target:
executions, executions per second, coverage (libFuzzer's ``cov``: edges of vsockmon's code
reached; ``ft``: features, edges with hit counts), the corpus it grew, and crashes.

A crash is an exception that is not vsockmon's own error family, an input taking longer
than ``--input-timeout`` seconds, or memory past ``--rss-limit-mb``; libFuzzer stops the
target there and writes the input, whose path is printed. Exit status 1 when any target
crashed. The test suite runs the short form (``tests/test_fuzz.py``).

Usage::

    benchmarks/fuzz.py --seconds 60                 # every target, 12 s each
    benchmarks/fuzz.py --hours 2 --jobs 2           # two targets at a time
    benchmarks/fuzz.py --seconds 300 --target analysis --corpus ~/fuzz-corpus
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FUZZ = ROOT / "fuzz"

TARGETS: dict[str, int] = {
    "pcap_reader": 32768,
    "decoder": 4096,
    "analysis": 4096,
    "display_filter": 2048,
    "payloads": 4096,
}
"""Target → the largest input it is given (bytes): whole capture files for the first three
(seeds longer than this are cut, which makes truncated captures too), a filter, a payload."""


@dataclass
class Result:
    target: str
    seconds: float
    executions: int
    coverage: int
    features: int
    corpus: int
    crashes: int
    artifacts: list[str]
    error: str | None = None
    """Why the run failed other than by a crash (a target that would not start)."""


def _last(pattern: str, text: str) -> int:
    found = re.findall(pattern, text)
    return int(found[-1]) if found else 0


def parse(target: str, seconds: float, log: str, returncode: int, artifacts: list[str]
          ) -> Result:
    """A target's figures from libFuzzer's log (its status lines and final stats)."""
    crashed = bool(artifacts) or "ERROR: libFuzzer" in log
    error = None
    if returncode != 0 and not crashed:
        error = (log.strip().splitlines() or [f"exit status {returncode}"])[-1]
    return Result(
        target=target, seconds=round(seconds, 1),
        executions=_last(r"stat::number_of_executed_units:\s*(\d+)", log),
        coverage=_last(r"\bcov: (\d+)", log), features=_last(r"\bft: (\d+)", log),
        corpus=_last(r"\bcorp: (\d+)/", log), crashes=len(artifacts) or int(crashed),
        artifacts=artifacts, error=error)


def script(target: str) -> Path:
    """A target's script: a name in ``fuzz/`` or a path to a script of the same form."""
    path = Path(target)
    return path if path.suffix == ".py" else FUZZ / f"{target}.py"


def fuzz(target: str, seconds: int, work: Path, artifacts: Path, corpus: Path | None,
         rss_limit_mb: int, input_timeout: int) -> Result:
    """Run one target for ``seconds``: seeds written fresh, then libFuzzer on them."""
    name = script(target).stem
    seeds, grown = work / f"{name}-seeds", (corpus or work) / name
    grown.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, str(script(target)), "--write-seeds", str(seeds)],
                   check=True, capture_output=True, cwd=work)
    prefix = artifacts / f"{name}-"
    cmd = [sys.executable, str(script(target)), f"-max_total_time={seconds}",
           f"-max_len={TARGETS.get(name, 4096)}", f"-rss_limit_mb={rss_limit_mb}",
           f"-timeout={input_timeout}", "-print_final_stats=1",
           f"-artifact_prefix={prefix}", str(grown), str(seeds)]
    start = time.monotonic()
    # the target stops itself at max_total_time; the margin covers loading its seeds
    done = subprocess.run(cmd, capture_output=True, text=True, errors="replace", cwd=work,
                          timeout=seconds + 600)
    elapsed = time.monotonic() - start
    (work / f"{name}.log").write_text(done.stderr)
    found = sorted(str(p) for p in artifacts.glob(f"{name}-*"))
    return parse(name, elapsed, done.stderr, done.returncode, found)


def table(results: list[Result]) -> str:
    head = ("target", "seconds", "executions", "exec/s", "coverage", "features", "corpus",
            "crashes")
    rows = [head] + [(r.target, f"{r.seconds:.0f}", f"{r.executions:,}",
                      f"{r.executions / max(r.seconds, 1e-9):,.0f}", str(r.coverage),
                      str(r.features), str(r.corpus), str(r.crashes)) for r in results]
    total = sum(r.executions for r in results)
    rows.append(("total", "", f"{total:,}", "", "", "", "",
                 str(sum(r.crashes for r in results))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths, strict=True)))
                     for row in rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    budget = ap.add_mutually_exclusive_group()
    budget.add_argument("--hours", type=float, help="wall time of the whole run, in hours")
    budget.add_argument("--seconds", type=float, help="wall time of the whole run, in seconds "
                        "(default 60)")
    ap.add_argument("--target", action="append", metavar="NAME",
                    help=f"a target ({', '.join(TARGETS)}; default all), repeatable")
    ap.add_argument("--jobs", type=int, default=1, help="targets run at once (default 1)")
    ap.add_argument("--corpus", type=Path, help="keep each target's grown corpus in "
                    "DIR/TARGET and start from it next time (default: a temporary directory)")
    ap.add_argument("--artifacts", type=Path, help="where crashing inputs are written "
                    "(default: a new temporary directory, kept and printed if one crashed)")
    ap.add_argument("--rss-limit-mb", type=int, default=2048)
    ap.add_argument("--input-timeout", type=int, default=30, metavar="SECONDS",
                    help="one input running longer than this is a crash (a hang)")
    ap.add_argument("--json", action="store_true", help="one JSON object per target")
    args = ap.parse_args(argv)
    targets = args.target or list(TARGETS)
    unknown = [t for t in targets if not script(t).is_file()]
    if unknown:
        ap.error(f"no such target: {', '.join(unknown)}")
    total = args.hours * 3600 if args.hours is not None else (args.seconds or 60)
    jobs = max(1, min(args.jobs, len(targets)))
    each = max(1, int(total * jobs / len(targets)))
    artifacts = args.artifacts or Path(tempfile.mkdtemp(prefix="vsockmon-fuzz-"))
    artifacts.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vsockmon-fuzz-work-") as tmp, \
            ThreadPoolExecutor(jobs) as pool:
        results = list(pool.map(lambda t: fuzz(t, each, Path(tmp), artifacts, args.corpus,
                                               args.rss_limit_mb, args.input_timeout),
                                targets))
    if args.json:
        for r in results:
            print(json.dumps(asdict(r)))
    else:
        print(table(results))
        for r in results:
            for path in r.artifacts:
                print(f"{r.target}: crashing input {path}")
            if r.error:
                print(f"{r.target}: did not run: {r.error}")
    if not any(r.artifacts for r in results) and args.artifacts is None:
        artifacts.rmdir()
    return 1 if any(r.crashes or r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
