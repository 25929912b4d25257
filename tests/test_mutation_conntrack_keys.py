"""Edge cases of the tracker's connection keys (issue 19): the packed form is used exactly
when both CIDs fit 32 bits, whichever other rows share the batch."""
import numpy as np

from vsockmon.conntrack.tracker import _key_tuples

U32 = 0xFFFFFFFF


def _five(*rows):
    cols = list(zip(*rows))
    return [np.array(c, dtype=np.uint64) for c in cols]


def test_a_cid_of_exactly_u32_max_is_packed_and_2_pow_32_is_not():
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
