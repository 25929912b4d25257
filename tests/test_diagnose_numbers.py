"""A finding's frame and stream numbers (:class:`~vsockmon.diagnose.model.Numbers`): compact,
yet read, compared and printed exactly as the tuple of their values."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vsockmon.diagnose.model import Finding, Numbers, Severity


def test_numbers_read_as_the_tuple_of_their_values() -> None:
    values = (5, -3, 2**40, 0)
    n = Numbers(values)
    assert n == values and values == n and n == list(values) and n == Numbers(np.array(values))
    assert n != (5, -3, 2**40) and n != (5, -3, 2**40, 1) and n != "5, -3"
    assert (len(n), n[0], n[-1], n[1:3], list(n)) == (4, 5, 0, (-3, 2**40), list(values))
    assert hash(n) == hash(values) and repr(n) == repr(values)
    assert sorted([Numbers((2,)), Numbers((1, 9)), Numbers(())]) == [(), (1, 9), (2,)]
    assert Numbers((1, 2)) < (1, 3) and not Numbers((1, 3)) < (1, 3) and Numbers((1, 3)) <= (1, 3)
    assert not Numbers(()) and Numbers((0,))
    with pytest.raises(ValueError):
        n.array()[0] = 1  # read-only: a finding's proof cannot change under it


@pytest.mark.parametrize("count", [0, 1, 65535, 65536, 65537, 200001])
def test_numbers_print_every_value_across_the_slices_they_are_made_in(count: int) -> None:
    n = Numbers(np.arange(count, dtype=np.int64) * 7 - 3)
    expect = [i * 7 - 3 for i in range(count)]
    assert n.text() == ", ".join(map(str, expect))
    assert n.text(",") == ",".join(map(str, expect))
    assert list(n) == expect


def test_a_finding_made_with_tuples_holds_numbers_and_its_json_is_the_json_of_its_dict() -> None:
    big = tuple(range(1, 70001))
    for stream, streams in ((3, (3, 9)), (None, ()), (4, ())):
        f = Finding("no-listener", Severity.ERROR, stream, big, "m \u2192", "c", "x",
                    streams=streams, time_ns=10**9, connection="1:2 \u2192 3:4 STREAM",
                    evidence={"refusals": 2})
        assert isinstance(f.frames, Numbers) and isinstance(f.streams, Numbers)
        d = f.to_dict(start_ns=5)
        assert d["streams"] == list(streams or ((stream,) if stream is not None else ()))
        assert d["frames"] == list(big) and d["t"] == round((10**9 - 5) / 1e9, 9)
        assert list(d) == ["rule", "kind", "severity", "stream", "streams", "frames", "time_ns",
                           "t", "connection", "message", "cause", "fix", "evidence"]
        assert f.to_json(5) == json.dumps(d, ensure_ascii=False)
        assert f.to_json() == json.dumps(f.to_dict(), ensure_ascii=False)


def test_taking_keeps_an_array_of_its_own_and_copies_what_others_hold() -> None:
    own = np.arange(10, dtype=np.int64)
    n = Numbers.taking(own)
    assert np.shares_memory(n.array(), own) and not own.flags.writeable and n == tuple(range(10))
    big = np.arange(10, dtype=np.int64)
    view = Numbers.taking(big[2:5])  # a view: its base stays the caller's, so it is copied
    assert not np.shares_memory(view.array(), big) and big.flags.writeable and view == (2, 3, 4)
    narrow = Numbers.taking(np.array([1, 2], dtype=np.int32))
    assert narrow.array().dtype == np.int64 and narrow == (1, 2)


def test_long_numbers_are_held_packed_and_read_back_exactly() -> None:
    """From a slice (65,536) on, numbers are packed: a storm's consecutive stream numbers
    cost a few bytes, not 8 each; any values still read back exactly, at every index and
    across the slices' edges."""
    run = Numbers.taking(np.arange(5, 1_000_005, dtype=np.int64))
    assert run.nbytes < 10_000 and len(run) == 1_000_000
    assert (run[0], run[65535], run[65536], run[-1]) == (5, 65540, 65541, 1_000_004)
    assert run[65535:65538] == (65540, 65541, 65542) and run[-2:] == (1_000_003, 1_000_004)
    with pytest.raises(IndexError):
        run[1_000_000]
    values = np.random.default_rng(7).integers(-2**62, 2**62, 200_001, dtype=np.int64)
    rough = Numbers(values)
    assert rough == tuple(values.tolist()) and rough == Numbers.taking(values.copy())
    assert rough.array().tolist() == values.tolist() and rough[131072] == int(values[131072])
    assert rough != Numbers(np.r_[values[:-1], values[-1] + 1])
    short = Numbers(np.arange(65535))
    assert short.nbytes == 8 * 65535  # below a slice: the array as it is
