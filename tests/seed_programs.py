"""The seed article's vsock programs — a server and a client in Python, C and Go — built
for the lab: static binaries, so the nested guest (busybox and nothing else) runs them too.

The Go programs build offline from Debian's packages (golang-go, golang-golang-x-sys-dev):
``GO111MODULE=off GOPATH=/usr/share/gocode CGO_ENABLED=0 go build``.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

TESTS = Path(__file__).parent
LANGUAGES = ("python", "c", "go")
GO_ENV = {"GO111MODULE": "off", "GOPATH": "/usr/share/gocode", "CGO_ENABLED": "0"}
HELLO = b"Hello, world!"
"""What every seed client sends."""


def command(role: str, language: str) -> str:
    """How the lab runs a program: Python's from the tree (the lab VM sees it at the same
    path), the others as :func:`build` left them in the working directory."""
    if language == "python":
        return f"python3 {TESTS / 'python' / f'seed_{role}.py'}"
    return f"./seed_{role}_{language}"


def build(dest: Path) -> None:
    """Build the C and Go programs into ``dest`` as ``seed_{role}_{c,go}``."""
    for role in ("server", "client"):
        subprocess.run(["gcc", "-static", "-O2", "-Wall", "-Werror", "-o",
                        str(dest / f"seed_{role}_c"), str(TESTS / "c" / f"seed_{role}.c")],
                       check=True)
        subprocess.run(["go", "build", "-ldflags=-s -w", "-o", str(dest / f"seed_{role}_go"),
                        "."], cwd=TESTS / "go" / f"seed_{role}", env={**os.environ, **GO_ENV},
                       check=True)
