"""The digest's per-connection columns read exactly as the dicts they replace: each checked
against a plain dict fed the same random batches."""

from __future__ import annotations

import random

import numpy as np
import pytest

from vsockmon.conntrack.model import NONE
from vsockmon.diagnose.columns import Counts, Reset, Resets, Times


@pytest.mark.parametrize("seed", range(5))
def test_counts_add_up_as_a_dict_of_counters_and_forget_dropped_streams(seed: int) -> None:
    rnd = random.Random(seed)
    counts, model = Counts(), {}
    for _ in range(40):
        batch = [(rnd.randrange(50), rnd.randrange(2)) for _ in range(rnd.randrange(30))]
        keys, n = np.unique(np.array([s * 2 + d for s, d in batch], dtype=np.int64),
                            return_counts=True)
        counts.add(keys, n)
        for key in batch:
            model[key] = model.get(key, 0) + 1
        if rnd.random() < 0.2:
            gone = {rnd.randrange(50) for _ in range(3)}
            counts.drop(gone)
            model = {k: v for k, v in model.items() if k[0] not in gone}
        assert dict(counts) == model and len(counts) == len(model)
        assert counts.get((999, 1), 0) == 0 and counts.get((7, 0), 0) == model.get((7, 0), 0)


@pytest.mark.parametrize("seed", range(5))
def test_resets_hold_each_streams_first_rst_as_a_dict_would(seed: int) -> None:
    rnd = random.Random(seed)
    resets, model = Resets(), {}
    for _ in range(30):
        fresh = sorted(set(rnd.sample(range(400), 12)) - set(model))
        rows = [(s, rnd.randrange(1, 10**6), rnd.randrange(2**62), rnd.randrange(2),
                 (rnd.randrange(-1, 2**20), rnd.randrange(2**20)),
                 (rnd.randrange(-1, 2**31), rnd.randrange(2**31))) for s in fresh]
        resets.add(*(np.array([r[i] for r in rows], dtype=np.int64).reshape(
            (len(rows), 2) if i >= 4 else (len(rows),)) for i in range(6)))
        model.update({r[0]: Reset(*r[1:]) for r in rows})
        if rnd.random() < 0.3:
            gone = set(rnd.sample(sorted(model) or [0], min(3, len(model))))
            resets.drop(gone)
            model = {k: v for k, v in model.items() if k not in gone}
        assert dict(resets) == model and sorted(resets) == sorted(model)
        assert resets.get(-5) is None and resets == model


def test_times_are_unknown_until_learnt_and_only_new_keys_are_added() -> None:
    times = Times()
    keys = np.array([2 * 3 + 1, 2 * 5, 2 * 9 + 1], dtype=np.int64)
    assert times.new(keys).tolist() == [True, True, True]
    times.add(keys, np.array([NONE, 70, NONE], dtype=np.int64))
    assert dict(times) == {(3, 1): None, (5, 0): 70, (9, 1): None}
    assert times.new(np.array([2 * 3 + 1, 2 * 4], dtype=np.int64)).tolist() == [False, True]
    assert sorted(times.unknown().tolist()) == [7, 19]
    times.learn(19, 123)
    assert times[(9, 1)] == 123 and times.unknown().tolist() == [7]
    times.drop({3})
    assert dict(times) == {(5, 0): 70, (9, 1): 123}
    with pytest.raises(KeyError):
        times[(3, 1)]
