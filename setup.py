"""Compiled parts of vsockmon; everything else is declared in pyproject.toml.

Each extension is one C file with no dependency beyond Python's headers (gcc and python3-dev,
which scripts/setup installs), built by ``pip install -e .``.
"""

from setuptools import Extension, setup

EXTENSIONS = [
    # one TPACKET_V3 ring block -> pcap/pcapng records in one call (the live capture path)
    Extension("vsockmon.live._ring", ["vsockmon/live/_ring.c"],
              extra_compile_args=["-O2", "-Wall", "-Wextra"]),
]

setup(ext_modules=EXTENSIONS)
