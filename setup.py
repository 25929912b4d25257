"""The compiled parts of vsockmon (everything else is in pyproject.toml).

One entry per extension, each a single C file with no library beyond Python's own headers,
so a fresh Debian 12 machine builds them with gcc and python3-dev (``scripts/setup``).
"""

from setuptools import Extension, setup

CFLAGS = ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-std=c11"]

EXTENSIONS = [
    Extension("vsockmon.wire._walk", ["vsockmon/wire/_walk.c"], extra_compile_args=CFLAGS),
    Extension("vsockmon.decode._render", ["vsockmon/decode/_render.c"],
              extra_compile_args=CFLAGS),
    # connection tracking's key map and per-row pass (conntrack/tracker.py)
    Extension("vsockmon.conntrack._track", ["vsockmon/conntrack/_track.c"],
              extra_compile_args=CFLAGS),
    # a TPACKET_V3 ring block -> its capture records, written with one writev (live capture)
    Extension("vsockmon.live._ring", ["vsockmon/live/_ring.c"], extra_compile_args=CFLAGS),
]

setup(ext_modules=EXTENSIONS)
