"""Types of the compiled row formatter (``_render.c``)."""

from typing import Any

K_LIT: int
K_INT: int
K_UINT: int
K_REL: int
K_EPOCH: int
K_STR: int
K_PREVIEW: int
K_OPT: int
K_FLOAT: int

def format_rows(rows: int, which: Any, templates: list[list[tuple[Any, ...]]]) -> bytes: ...
def write_rows(fd: int, rows: int, which: Any, templates: list[list[tuple[Any, ...]]],
               piece: int) -> None: ...
def factorize(keys: Any, codes: Any) -> list[int]: ...
def format_table(rows: int, which: Any, templates: list[list[list[tuple[Any, ...]]]],
                 headers: tuple[str, ...]) -> bytes: ...
