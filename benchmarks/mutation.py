#!/usr/bin/env python3
"""Mutation score of the core modules: how many small planted bugs the non-lab suite catches.

Runs mutmut (3.8) over the given modules of the ``vsockmon`` package and prints, per module
and in total, how many mutants the tests killed, how many survived, timed out or were reached
by no test, and the score (killed + timeout + crashed over all mutants). Only non-lab tests
run (``-m "not lab"``): the lab boots a VM per test and would make a run take days. mutmut
records which tests reach each function once, then runs only those tests against each mutant,
in processes forked from a warm interpreter — a full suite run per mutant would be far too slow.

The mutants live in ``mutants/`` at the top of the repository (ignored by git); a run starts
from a fresh copy, so results never come from stale tests, unless ``--keep`` (print the last
results) or ``--retest`` (test the last run's survivors again with the current tests).

Examples::

    benchmarks/mutation.py                                  # every core module (slow: hours)
    benchmarks/mutation.py vsockmon/decode/filter.py --tests tests/test_decode.py
    benchmarks/mutation.py vsockmon/export --ignore tests/test_conntrack_real.py
    benchmarks/mutation.py vsockmon/wire --jobs 2 --survivors
    benchmarks/mutation.py vsockmon/export --json > export-score.json
    benchmarks/mutation.py vsockmon/wire --retest           # after adding tests

Survivors judged equivalent (no behaviour can tell them apart) are listed with their reason
in ``benchmarks/mutation-survivors.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "vsockmon"
# wire = field tables, pcap/pcapng I/O and the scapy layer; the rest as named.
DEFAULT_MODULES = ["vsockmon/wire", "vsockmon/decode", "vsockmon/conntrack",
                   "vsockmon/diagnose", "vsockmon/export"]
# A mutant counts as detected when a test failed, the tests ran far past their usual time
# (a mutated loop bound that never ends is caught, just by the clock), or the test process
# died of a signal (mutmut's "segfault": SIGSEGV or SIGKILL) -- a mutant that passes a bad
# pointer or length to one of our C extensions crashes the tests, which no user would miss.
DETECTED = ("killed", "timeout", "segfault")


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line; ``--help`` shows the module docstring with its examples."""
    p = argparse.ArgumentParser(
        prog="benchmarks/mutation.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("modules", nargs="*", metavar="MODULE",
                   help="a .py file or a package directory under vsockmon/ "
                        f"(default: {' '.join(DEFAULT_MODULES)})")
    p.add_argument("--tests", nargs="+", default=["tests"], metavar="PATH",
                   help="test files or directories to run against the mutants "
                        "(default: tests; lab tests are always left out)")
    p.add_argument("--ignore", action="append", default=[], metavar="PATH",
                   help="leave out a test file or directory (repeatable); keep --tests and "
                        "--ignore the same for a --retest, or mutmut starts over")
    p.add_argument("--jobs", type=int, default=1,
                   help="mutants tested at once (default: 1; the machine is shared)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--keep", action="store_true",
                       help="only print the results of the last run in mutants/")
    again.add_argument("--retest", action="store_true",
                       help="reuse the last run: test again the mutants it did not detect, "
                            "with the tests as they are now (new tests are picked up; mutants "
                            "of changed functions are made anew)")
    p.add_argument("--survivors", action="store_true",
                   help="list every surviving mutant by name (see one with `mutmut show NAME`)")
    p.add_argument("--json", action="store_true", help="print the scores as one JSON object")
    return p.parse_args(argv)


def module_files(modules: list[str]) -> list[Path]:
    """The .py files named by ``modules``, relative to the repository; an error if one isn't."""
    files: list[Path] = []
    for m in modules:
        path = (ROOT / m).resolve()
        if not path.is_relative_to(ROOT / PACKAGE) or not path.exists():
            raise SystemExit(f"error: {m}: not a file or directory inside {PACKAGE}/")
        found = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        files += [f.relative_to(ROOT) for f in found if f.suffix == ".py"]
    if not files:
        raise SystemExit(f"error: no Python file in {' '.join(modules)}")
    return files


def configure(files: list[Path], tests: list[str]) -> None:
    """Point mutmut at ``files`` and ``tests``; the rest is ``[tool.mutmut]`` in pyproject.

    The whole package is copied into mutants/ (the unmutated modules must import), but only
    ``files`` are mutated; pyproject keeps lab tests out (``-m "not lab"``).
    """
    from mutmut import configuration

    base = configuration._load_config()
    configuration._config = dataclasses.replace(
        base,
        only_mutate=[str(f) for f in files],
        pytest_add_cli_args_test_selection=tests,
    )


def run_mutmut(jobs: int) -> None:
    """Generate the mutants and test each against the tests that reach its function."""
    from mutmut.__main__ import _run

    # mutmut's progress goes to stderr so that stdout carries only our table or JSON.
    with contextlib.redirect_stdout(sys.stderr):
        _run((), jobs)


def results(files: list[Path]) -> dict[str, Counter[str]]:
    """Status counts per module, read from mutmut's result files in mutants/."""
    from mutmut.stats import status_by_exit_code

    out: dict[str, Counter[str]] = {}
    for f in files:
        meta = ROOT / "mutants" / f"{f}.meta"
        counts: Counter[str] = Counter()
        if meta.exists():
            data = json.loads(meta.read_text())
            for code in data.get("exit_code_by_key", {}).values():
                counts[status_by_exit_code[code]] += 1
        out[str(f)] = counts
    return out


def forget_undetected(files: list[Path]) -> int:
    """Clear the verdicts that were not a detection, so that mutmut tests those mutants again
    (it skips any mutant with a verdict); returns how many."""
    from mutmut.stats import status_by_exit_code

    n = 0
    for f in files:
        meta = ROOT / "mutants" / f"{f}.meta"
        if not meta.exists():
            continue
        data = json.loads(meta.read_text())
        codes = data.get("exit_code_by_key", {})
        for k, c in codes.items():
            if c is not None and status_by_exit_code[c] not in DETECTED:
                codes[k] = None
                n += 1
        meta.write_text(json.dumps(data, indent=4))
    return n


def survivors(files: list[Path]) -> list[str]:
    """Names of the tested mutants no test killed, for ``mutmut show``."""
    from mutmut.stats import status_by_exit_code

    names: list[str] = []
    for f in files:
        meta = ROOT / "mutants" / f"{f}.meta"
        if meta.exists():
            data = json.loads(meta.read_text())
            names += sorted(k for k, c in data.get("exit_code_by_key", {}).items()
                            if status_by_exit_code[c] not in (*DETECTED, "not checked"))
    return names


def score(c: Counter[str]) -> float | None:
    """Per cent of the tested mutants detected (an interrupted run leaves some "not
    checked"); None when none was tested."""
    total = sum(c.values()) - c["not checked"]
    return None if total == 0 else 100.0 * sum(c[s] for s in DETECTED) / total


def report(counts: dict[str, Counter[str]]) -> str:
    """The score table: one line per module with a mutant, then the total."""
    cols = ("killed", "survived", "timeout", "no tests", "not checked")
    lines = [f"{'module':<36} {'mutants':>7} " + " ".join(f"{c:>11}" for c in cols)
             + f" {'other':>6} {'score':>7}"]
    total: Counter[str] = Counter()
    for name, c in counts.items():
        total.update(c)
        s = score(c)
        if not c:
            continue
        other = sum(c.values()) - sum(c[k] for k in cols)
        lines.append(f"{name:<36} {sum(c.values()):>7} " + " ".join(f"{c[k]:>11}" for k in cols)
                     + f" {other:>6} " + (f"{s:>6.1f}%" if s is not None else "     -"))
    s = score(total)
    other = sum(total.values()) - sum(total[k] for k in cols)
    lines.append(f"{'total':<36} {sum(total.values()):>7} "
                 + " ".join(f"{total[k]:>11}" for k in cols)
                 + f" {other:>6} " + (f"{s:>6.1f}%" if s is not None else "     -"))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.jobs < 1:
        raise SystemExit("error: --jobs must be at least 1")
    files = module_files(args.modules or DEFAULT_MODULES)
    os.chdir(ROOT)
    configure(files, [*args.tests, *(f"--ignore={p}" for p in args.ignore)])
    if args.retest:
        if not (ROOT / "mutants").is_dir():
            raise SystemExit("error: --retest: no earlier run in mutants/")
        print(f"testing again {forget_undetected(files)} undetected mutants", file=sys.stderr)
        run_mutmut(args.jobs)
    elif not args.keep:
        shutil.rmtree(ROOT / "mutants", ignore_errors=True)
        (ROOT / "mutants").mkdir()
        # tests that run .venv/bin/vsockmon find it from the copy too (it runs unmutated code)
        (ROOT / "mutants" / ".venv").symlink_to(ROOT / ".venv")
        run_mutmut(args.jobs)
    elif not (ROOT / "mutants").is_dir():
        raise SystemExit("error: --keep: no earlier run in mutants/")
    counts = results(files)
    if args.json:
        print(json.dumps({"modules": {m: {**c, "score": score(c)} for m, c in counts.items()},
                          "survivors": survivors(files) if args.survivors else None}))
        return 0
    print(report(counts))
    if args.survivors:
        print("\nsurvivors (mutmut show NAME):")
        print("\n".join(f"  {n}" for n in survivors(files)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
