"""The seed article's vsock programs — a server and a client in Python, C and Go — built
for the lab: static binaries, so the nested guest (busybox and nothing else) runs them too.

The Go programs build offline from Debian's packages (golang-go, golang-golang-x-sys-dev):
``GO111MODULE=off GOPATH=/usr/share/gocode CGO_ENABLED=0 go build``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

TESTS = Path(__file__).parent
LANGUAGES = ("python", "c", "go")
GO_ENV = {"GO111MODULE": "off", "GOPATH": "/usr/share/gocode", "CGO_ENABLED": "0"}
HELLO = b"Hello, world!"
"""What every seed client sends."""


def command(role: str, language: str) -> str:
    """How the lab runs the built program (in the directory :func:`build` filled)."""
    name = f"seed_{role}_{language}"
    return f"python3 {name}.py" if language == "python" else f"./{name}"


def build(dest: Path) -> None:
    """Build (or copy) the six programs into ``dest`` as ``seed_{role}_{language}``."""
    for role in ("server", "client"):
        shutil.copy(TESTS / "python" / f"seed_{role}.py", dest / f"seed_{role}_python.py")
        subprocess.run(["gcc", "-static", "-O2", "-Wall", "-Werror", "-o",
                        str(dest / f"seed_{role}_c"), str(TESTS / "c" / f"seed_{role}.c")],
                       check=True)
        subprocess.run(["go", "build", "-ldflags=-s -w", "-o", str(dest / f"seed_{role}_go"),
                        "."], cwd=TESTS / "go" / f"seed_{role}", env={**os.environ, **GO_ENV},
                       check=True)
