"""Open-addressing hash index from agent keys to row ids.

The slot array holds row ids only (int32, -1 = empty); the key itself is read back from the
state table's key storage. That keeps the index at 4 bytes per slot; any slot count works
(a hash maps to a slot by multiply-shift, not by masking), so with a maximum load factor of
0.6 it costs 6.7 bytes per agent right after growth. Linear probing.

Int64 keys are compared against ``table_keys[row]``; string keys are compared byte-wise
against the table's key dictionary (``dict_offsets``/``dict_data``, Arrow large-string
layout), where row id == dictionary id.

The insert kernels never allocate: they stop before creating row ``limit`` (the caller's
room, bounded by both table capacity and slot load) and return where they stopped, so the
caller grows exactly as far as new keys need and resumes.
"""

import numpy as np
from numba import njit
from vecswim.kernels.prefetch import prefetch

EMPTY = -1
# How far ahead the probe loops prefetch: the slot of key i+D, then the key of key i+D/2's row.
AHEAD = 16


@njit(cache=True)
def mix64(x):
    """splitmix64 finalizer: a bijective 64-bit mix, so distinct keys never collide
    before masking, and sequential or strided keys spread over all slots."""
    z = np.uint64(x)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@njit(cache=True)
def _next(s, n_slots):
    s += np.uint64(1)
    return s if s < n_slots else np.uint64(0)


@njit(cache=True)
def home(h, n_slots):
    """Map a 64-bit hash to a slot in [0, n_slots) by multiply-shift (n_slots < 2**32)."""
    return ((h >> np.uint64(32)) * np.uint64(n_slots)) >> np.uint64(32)


@njit(cache=True)
def _home_slots(batch_keys, n_slots):
    h = np.empty(len(batch_keys), np.uint64)
    for i in range(len(batch_keys)):
        h[i] = home(mix64(batch_keys[i]), n_slots)
    return h


@njit(cache=True, nogil=True)
def int_lookup_or_insert(batch_keys, start, slots, table_keys, n_rows, limit, out_rows):
    """Resolve ``batch_keys[start:]`` to rows, appending unseen keys as new rows.

    Writes the row of ``batch_keys[i]`` to ``out_rows[i]``; new keys get rows
    ``n_rows, n_rows+1, ...`` in first-seen order and are written to ``table_keys``.
    Returns ``(new row count, i)``: ``i == len(batch_keys)`` when done, else the first key
    that needed row ``limit``. O(len(batch_keys)) expected.
    """
    n_slots = np.uint64(len(slots))
    h = _home_slots(batch_keys, n_slots)
    n = len(batch_keys)
    for i in range(start, len(batch_keys)):
        # Prefetch the home slot of key i+D and the key of key i+D/2's row, so the two
        # dependent cache misses of each probe overlap with other keys' work.
        if i + AHEAD < n:
            prefetch(slots, h[i + AHEAD])
        if i + AHEAD // 2 < n:
            ahead = slots[h[i + AHEAD // 2]]
            if ahead >= 0:
                prefetch(table_keys, ahead)
        k = batch_keys[i]
        s = h[i]
        while True:
            r = slots[s]
            if r == EMPTY:
                if n_rows == limit:
                    return n_rows, i
                slots[s] = n_rows
                table_keys[n_rows] = k
                out_rows[i] = n_rows
                n_rows += 1
                break
            if table_keys[r] == k:
                out_rows[i] = r
                break
            s = _next(s, n_slots)
    return n_rows, len(batch_keys)


@njit(cache=True, nogil=True)
def int_lookup(batch_keys, slots, table_keys, out_rows):
    """Like ``int_lookup_or_insert`` but never inserts: unknown keys map to -1."""
    n_slots = np.uint64(len(slots))
    h = _home_slots(batch_keys, n_slots)
    n = len(batch_keys)
    for i in range(len(batch_keys)):
        # Prefetch the home slot of key i+D and the key of key i+D/2's row, so the two
        # dependent cache misses of each probe overlap with other keys' work.
        if i + AHEAD < n:
            prefetch(slots, h[i + AHEAD])
        if i + AHEAD // 2 < n:
            ahead = slots[h[i + AHEAD // 2]]
            if ahead >= 0:
                prefetch(table_keys, ahead)
        k = batch_keys[i]
        s = h[i]
        out_rows[i] = EMPTY
        while True:
            r = slots[s]
            if r == EMPTY:
                break
            if table_keys[r] == k:
                out_rows[i] = r
                break
            s = _next(s, n_slots)


@njit(cache=True)
def int_rebuild(slots, table_keys, n_rows):
    """Re-insert rows ``0..n_rows`` into an empty (all -1) slot array. O(n_rows)."""
    n_slots = np.uint64(len(slots))
    for r in range(n_rows):
        s = home(mix64(table_keys[r]), n_slots)
        while slots[s] != EMPTY:
            s = _next(s, n_slots)
        slots[s] = r


@njit(cache=True)
def bytes_hash(data, start, end):
    """FNV-1a over ``data[start:end]``, then mixed; stable across runs and versions."""
    h = np.uint64(0xCBF29CE484222325)
    for j in range(start, end):
        h = (h ^ np.uint64(data[j])) * np.uint64(0x100000001B3)
    return mix64(h)


@njit(cache=True)
def _bytes_equal(a, a0, a1, b, b0, b1):
    if a1 - a0 != b1 - b0:
        return False
    for j in range(a1 - a0):
        if a[a0 + j] != b[b0 + j]:
            return False
    return True


@njit(cache=True, nogil=True)
def str_lookup_or_insert(
    offsets, data, start, slots, dict_offsets, dict_data, n_rows, limit, out_rows
):
    """String-key version of ``int_lookup_or_insert`` (same return value).

    ``offsets``/``data`` are the batch's Arrow string buffers (``len(offsets) == n + 1``).
    New strings are appended to ``dict_data`` with ``dict_offsets[n_rows + 1]`` marking their
    end. Caller guarantees ``len(dict_data) >= dict_offsets[n_rows] + batch bytes``.
    """
    n_slots = np.uint64(len(slots))
    for i in range(start, len(offsets) - 1):
        a0 = offsets[i]
        a1 = offsets[i + 1]
        s = home(bytes_hash(data, a0, a1), n_slots)
        while True:
            r = slots[s]
            if r == EMPTY:
                if n_rows == limit:
                    return n_rows, i
                at = dict_offsets[n_rows]
                for j in range(a1 - a0):
                    dict_data[at + j] = data[a0 + j]
                dict_offsets[n_rows + 1] = at + (a1 - a0)
                slots[s] = n_rows
                out_rows[i] = n_rows
                n_rows += 1
                break
            if _bytes_equal(data, a0, a1, dict_data, dict_offsets[r], dict_offsets[r + 1]):
                out_rows[i] = r
                break
            s = _next(s, n_slots)
    return n_rows, len(offsets) - 1


@njit(cache=True)
def str_rebuild(slots, dict_offsets, dict_data, n_rows):
    """Re-insert dictionary entries ``0..n_rows`` into an empty slot array."""
    n_slots = np.uint64(len(slots))
    for r in range(n_rows):
        s = home(bytes_hash(dict_data, dict_offsets[r], dict_offsets[r + 1]), n_slots)
        while slots[s] != EMPTY:
            s = _next(s, n_slots)
        slots[s] = r
