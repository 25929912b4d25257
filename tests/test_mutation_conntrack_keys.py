"""Edge cases of the tracker's connection keys (issue 19): the packed form is used exactly
when both CIDs fit 32 bits, whichever other rows share the batch."""

from __future__ import annotations

import numpy as np

from vsockmon.conntrack.tracker import _key_tuples

U32 = 0xFFFFFFFF


def _five(*rows: tuple[int, ...]) -> list[np.ndarray]:
    cols = list(zip(*rows, strict=True))
    return [np.array(c, dtype=np.uint64) for c in cols]


def test_a_cid_of_exactly_u32_max_is_packed_and_2_pow_32_is_not() -> None:
    # Rows (type, lower cid, lower port, higher cid, higher port) as _keys gives them when
    # some CID of the batch does not fit 32 bits. A row whose CIDs fit is packed as
    # cid << 32 | port (the same key the 3-column form gives); a row whose CID is 2**32
    # keeps its five parts.
    rows = [(1, 2, 1024, U32, 7),          # max CID 0xFFFFFFFF: fits, packed
            (2, 3, 5, 2**32, 9),           # max CID 2**32: does not fit
            (1, 2**32 + 5, 1, 2**33, 2)]   # both too big
    got = _key_tuples(_five(*rows))
    assert got == [(1, (2 << 32) | 1024, (U32 << 32) | 7),
                   (2, 3, 5, 2**32, 9),
                   (1, 2**32 + 5, 1, 2**33, 2)]


def _hdr(*rows: tuple[int, ...]) -> np.ndarray:
    # (type, src_cid, src_port, dst_cid, dst_port), one structured array like a batch's
    # header columns (unsigned 64-bit, so a CID of 2**32 is representable)
    dt = [("type", "u8"), ("src_cid", "u8"), ("src_port", "u8"),
          ("dst_cid", "u8"), ("dst_port", "u8")]
    return np.array(list(rows), dtype=dt)


def test_keys_pack_a_cid_of_u32_max_and_split_a_cid_of_2_pow_32() -> None:
    from vsockmon.conntrack.tracker import _keys
    keys, lo = _keys(_hdr((1, U32, 7, 2, 1024)))
    assert len(keys) == 3      # every CID fits 32 bits: (type, lower end, higher end)
    assert keys[1].tolist() == [(2 << 32) | 1024] and keys[2].tolist() == [(U32 << 32) | 7]
    assert lo.tolist() == [False]   # the source (CID 0xFFFFFFFF) is the higher end
    keys, lo = _keys(_hdr((1, 2**32, 7, 2, 1024)))
    assert len(keys) == 5      # a CID does not fit: each part is its own key
    assert [k.tolist() for k in keys] == [[1], [2], [1024], [2**32], [7]]
    assert lo.tolist() == [False]


def test_a_looped_end_counts_as_the_lower_end_in_both_key_forms() -> None:
    # source and destination the same end: "src is lower" is src <= dst, so True
    from vsockmon.conntrack.tracker import _keys
    _, lo = _keys(_hdr((1, 3, 5, 3, 5)))
    assert lo.tolist() == [True]
    _, lo = _keys(_hdr((1, 2**32, 5, 2**32, 5), (1, 2**32, 6, 2**32, 6)))
    assert lo.tolist() == [True, True]
