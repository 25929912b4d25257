"""The compiled row formatter (``vsockmon/decode/_render.c``) against Python's own conversions:
``decode --json``'s ``frame.time_epoch`` must be ``repr(ns / 10**9)`` to the character, and
every number ``str(n)``, whichever short cut the C code takes."""

from __future__ import annotations

import random

import numpy as np
import pytest

from vsockmon.decode import _render


def _rows(item: tuple[object, ...], n: int) -> list[str]:
    out = _render.format_rows(n, np.zeros(n, dtype=np.int8), [[item]])
    assert out.endswith(b"\n") or n == 0
    return out.decode().split("\n")[:-1]


def _epochs(ns: list[int]) -> list[str]:
    return _rows((_render.K_EPOCH, np.asarray(ns, dtype=np.int64)), len(ns))


def _times() -> list[int]:
    rng = random.Random(271)
    second = 10**9
    out = [0, 1, -1, 999, 10**5 - 1, 10**5, 999_999_999, second, second + 1, -second,
           -second - 1, 2**63 - 1, -(2**63), -(2**63) + 1, 2**62, 2**53, 2**53 + 1]
    # whole seconds, and around every power of two and of ten a double's exponent changes at
    for e in range(34):
        out += [2**e * second + d for d in range(-3, 4)]
        out += [-(2**e * second + d) for d in (-1, 0, 1)]
    for e in range(9, 19):
        out += [10**e + d for d in (-1, 0, 1)]
    # a second and a dyadic fraction (j / 2^k s): a double holds these exactly, and at the
    # shortest length two decimals can be equally near (repr rounds the tie to even)
    for k in range(1, 10):
        out += [s * second + j * (second >> k) for s in (1, 2**30, 1_764_567_890, 2**32 + 1)
                for j in range(1, 2**k, 2)]
    # capture-like times (2020-2030) whose fraction has 0 to 9 digits
    for digits in range(10):
        step = 10 ** (9 - digits)
        out += [rng.randrange(1_577_836_800, 1_893_456_000) * second
                + rng.randrange(second) // step * step for _ in range(3000)]
    # beyond 2^32 s (year 2106), sub-second times (relative captures), and any int64
    out += [rng.randrange(2**32 * second, 2**63) for _ in range(20000)]
    out += [rng.randrange(1, second) for _ in range(5000)]
    out += [rng.randrange(-(2**63), 2**63) for _ in range(20000)]
    out += [rng.randrange(second, 2**31 * second) for _ in range(50000)]
    return out


def test_epoch_is_pythons_repr_of_the_true_quotient() -> None:
    times = _times()
    got = _epochs(times)
    wrong = [(ns, text) for ns, text in zip(times, got, strict=True) if text != repr(ns / 10**9)]
    assert wrong == []
    # the sample reaches every fraction length repr can give a time of 2001-2038, where a
    # double holds a seventh of a microsecond: 1 ("….0" for whole seconds) to 7 digits
    lengths = {len(text.partition(".")[2]) for ns, text in zip(times, got, strict=True)
               if 10**18 < ns < 2**31 * 10**9}
    assert lengths == set(range(1, 8))


def test_numbers_are_decimal_in_full() -> None:
    values = [0, 1, 9, 10, 11, 99, 100, 101, 999, 1000, 10**9, 2**32, 2**53 + 1, 2**63 - 1,
              -1, -9, -10, -100, -(2**63), *range(-1000, 1000, 7)]
    values += [random.Random(i).randrange(-(2**63), 2**63) for i in range(2000)]
    signed = np.asarray(values, dtype=np.int64)
    assert _rows((_render.K_INT, signed, 0), len(values)) == [str(v) for v in values]
    assert _rows((_render.K_INT, signed, 8), len(values)) == [f"{v:>8}" for v in values]
    unsigned = [v % 2**64 for v in values] + [2**64 - 1]
    assert _rows((_render.K_UINT, np.asarray(unsigned, dtype=np.uint64)), len(unsigned)) == [
        str(v) for v in unsigned]


def test_output_grows_past_its_first_block_and_can_be_empty() -> None:
    n = 50_000  # ~1 MB: the buffer starts at 64 KiB and is grown many times
    col = np.arange(n, dtype=np.int64) * 7919
    out = _render.format_rows(n, np.zeros(n, dtype=np.int8),
                              [[(_render.K_LIT, b"row "), (_render.K_INT, col, 12)]])
    assert out == b"".join(b"row %12d\n" % v for v in col.tolist())
    assert _render.format_rows(0, np.zeros(0, dtype=np.int8), [[(_render.K_LIT, b"x")]]) == b""


def test_factorize_encodes_each_distinct_key_once_in_first_seen_order() -> None:
    rng = np.random.default_rng(271)
    cases = [
        np.zeros(0, dtype=np.int64),
        np.array([5, 5, 5], dtype=np.int64),
        # keys that differ only in their high bits, as decode's op << 48 | type << 32 | flags
        # (an op from 0x8000 on makes the int64 key negative)
        rng.choice(np.array([1 << 48, 2 << 48, (0x8001 << 48 | 1 << 32) - 2**64,
                             3 << 48 | 2 << 32 | 1], dtype=np.int64), 5000),
        # more distinct keys than the table first holds, negative ones, the extremes
        rng.integers(-(2**63), 2**63 - 1, 20000, endpoint=True),
        np.array([-(2**63), 2**63 - 1, 0, -1, -(2**63)], dtype=np.int64),
    ]
    for keys in cases:
        codes = np.full(len(keys), -7, dtype=np.int32)
        unique = _render.factorize(keys, codes)
        firsts = list(dict.fromkeys(keys.tolist()))
        assert unique == firsts
        assert [unique[c] for c in codes.tolist()] == keys.tolist()


def test_factorize_refuses_a_short_codes_column() -> None:
    with pytest.raises(ValueError, match="int32 for each"):
        _render.factorize(np.arange(4, dtype=np.int64), np.empty(3, dtype=np.int32))


def test_literals_and_names_of_any_length_are_copied_whole() -> None:
    """Short texts are copied 32 bytes at a time from padded copies: every length around
    that size, and longer ones, must come out exactly."""
    texts = [b"", b"a", b"x" * 31, b"y" * 32, b"z" * 33, bytes(range(32, 127)) * 2]
    n = len(texts)
    codes = np.arange(n, dtype=np.int32)[::-1].copy()
    template: list[tuple[object, ...]] = [
        item for t in texts for item in ((_render.K_LIT, t), (_render.K_LIT, b"|"))]
    template.append((_render.K_STR, codes, tuple(texts)))
    out = _render.format_rows(n, np.zeros(n, dtype=np.int8), [template])
    head = b"|".join(texts) + b"|"
    assert out == b"".join(head + texts[c] + b"\n" for c in codes.tolist())


def test_a_name_that_is_not_bytes_fails_only_where_used() -> None:
    names = (b"ok", "not bytes")
    used = (_render.K_STR, np.zeros(2, dtype=np.int32), names)
    assert _render.format_rows(2, np.zeros(2, dtype=np.int8), [[used]]) == b"ok\nok\n"
    with pytest.raises(TypeError, match="must be bytes"):
        _render.format_rows(1, np.zeros(1, dtype=np.int8),
                            [[(_render.K_STR, np.ones(1, dtype=np.int32), names)]])


def test_floats_are_pythons_repr() -> None:
    """K_FLOAT (the float fields of ``conns --json``/``--csv``) is ``repr`` to the character:
    edge values, every exponent, and random bit patterns (subnormals, infinities, NaN)."""
    values = [0.0, -0.0, 1.0, -1.0, 0.1, 0.1 + 0.2, 1e-7, 1e-5, 1e-4, 1e15, 1e16, 1e17, 1e22,
              5e-324, 2.2250738585072014e-308, 1.7976931348623157e308, float("inf"),
              float("-inf"), float("nan"), 0.000102, 1700000000.0001018, 123456789.12345679,
              2.0**53, 2.0**53 + 2, 1 / 3, 2 / 3]
    values += [2.0**e * s for e in range(-1074, 1024, 7) for s in (1, -1.5)]
    rng = random.Random(31)
    values += np.frombuffer(rng.randbytes(8 * 20000), dtype=np.float64).tolist()
    values += [(1_700_000_000 * 10**9 + rng.randrange(10**12)) / 1e9 for _ in range(5000)]
    col = np.asarray(values, dtype=np.float64)
    assert _rows((_render.K_FLOAT, col), len(values)) == [repr(v) for v in values]


def test_a_missing_column_writes_its_text_instead_of_the_value() -> None:
    missing = np.array([False, True, False, True])
    ints = np.array([-5, 7, 2**63 - 1, 0], dtype=np.int64)
    template = [(_render.K_INT, ints, 0, missing, b"null"), (_render.K_LIT, b","),
                (_render.K_UINT, ints.astype(np.uint64), ~missing, b""), (_render.K_LIT, b","),
                (_render.K_FLOAT, ints / 4, missing, b"-"), (_render.K_LIT, b","),
                (_render.K_STR, np.array([0, 1, 1, 0], dtype=np.int32), (b"a", b"b"),
                 ~missing, b"none")]
    out = _render.format_rows(4, np.zeros(4, dtype=np.int8), [template])
    assert out.decode().splitlines() == [
        "-5,,-1.25,none", "null,7,-,b", f"{2**63 - 1},,{(2**63 - 1) / 4!r},none",
        "null,0,-,a"]


def test_a_missing_column_needs_its_text_and_every_row() -> None:
    ints = np.zeros(3, dtype=np.int64)
    with pytest.raises(TypeError, match="needs its text"):
        _render.format_rows(3, np.zeros(3, dtype=np.int8),
                            [[(_render.K_INT, ints, 0, np.zeros(3, dtype=bool))]])
    with pytest.raises(ValueError, match="shorter than the rows"):
        _render.format_rows(3, np.zeros(3, dtype=np.int8),
                            [[(_render.K_FLOAT, ints / 1, np.zeros(2, dtype=bool), b"")]])
    with pytest.raises(ValueError, match="a byte"):
        _render.format_rows(3, np.zeros(3, dtype=np.int8),
                            [[(_render.K_INT, ints, 0, np.zeros(3, dtype=np.int64), b"")]])


def test_floats_in_fixed_notation_are_pythons_repr() -> None:
    """The range K_FLOAT formats without dtoa (10^-4 to 2^53): capture times as numpy
    divides them, durations, milliseconds, every length of fraction, and the neighbours of
    powers of two and ten, decimals and the midpoints between doubles."""
    rng = np.random.default_rng(5)
    ns = rng.integers(1_577_836_800 * 10**9, 1_893_456_000 * 10**9, 100_000)
    parts = [ns / 1e9, rng.integers(0, 10**10, 50_000) / 1e9,
             rng.integers(0, 10**9, 50_000) / 1e6, 10.0 ** rng.uniform(-4, 15.96, 100_000)]
    for digits in range(18):
        parts.append(np.round(10.0 ** rng.uniform(-4, 15.9, 2000), digits))
    edges = [2.0**e for e in range(-14, 54)] + [10.0**e for e in range(-4, 16)]
    edges += [1e-4, 0.1, 0.2, 0.3, 0.5, 1.5, 9.999999999999998, 99.99999999999999,
              2.0**53 - 1, 4503599627370496.5, 1e15 + 0.3, 0.000102, 0.102]
    near = np.asarray(edges)
    for _ in range(3):  # and up to three doubles either side
        near = np.unique(np.concatenate([np.nextafter(near, 0), near,
                                         np.nextafter(near, np.inf)]))
    parts.append(near)
    whole = rng.integers(1, 2**53, 20000).astype(np.float64)
    parts += [whole + 0.5, whole / 2**rng.integers(1, 30, 20000)]
    values = np.concatenate(parts)
    values = np.concatenate([values, -values])
    got = _rows((_render.K_FLOAT, values), len(values))
    wrong = [(v, text) for v, text in zip(values.tolist(), got, strict=True) if text != repr(v)]
    assert wrong == []
