"""Open-addressing hash index from agent keys to row ids.

The slot array holds row ids only (int32, -1 = empty); the key itself is read back from the
state table's key storage. That keeps the index at 4 bytes per slot, so with the maximum
load factor of 0.7 it costs 5.7-11.4 bytes per agent. Linear probing, power-of-two size.

Int64 keys are compared against ``table_keys[row]``; string keys are compared byte-wise
against the table's key dictionary (``dict_offsets``/``dict_data``, Arrow large-string
layout), where row id == dictionary id.

Callers guarantee capacity before a call: ``len(table_keys) >= n_rows + len(batch)`` and
``(n_rows + len(batch)) <= 0.7 * len(slots)``; the kernels never allocate.
"""

import numpy as np
from numba import njit

EMPTY = -1


@njit(cache=True, inline="always")
def mix64(x):
    """splitmix64 finalizer: a bijective 64-bit mix, so distinct keys never collide
    before masking, and sequential or strided keys spread over all slots."""
    z = np.uint64(x)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@njit(cache=True)
def int_lookup_or_insert(batch_keys, slots, table_keys, n_rows, out_rows):
    """Resolve every key of ``batch_keys`` to a row, appending unseen keys as new rows.

    Writes the row of ``batch_keys[i]`` to ``out_rows[i]``; new keys get rows
    ``n_rows, n_rows+1, ...`` in first-seen order and are written to ``table_keys``.
    Returns the new row count. O(len(batch_keys)) expected.
    """
    mask = np.uint64(len(slots) - 1)
    for i in range(len(batch_keys)):
        k = batch_keys[i]
        s = mix64(k) & mask
        while True:
            r = slots[s]
            if r == EMPTY:
                slots[s] = n_rows
                table_keys[n_rows] = k
                out_rows[i] = n_rows
                n_rows += 1
                break
            if table_keys[r] == k:
                out_rows[i] = r
                break
            s = (s + np.uint64(1)) & mask
    return n_rows


@njit(cache=True)
def int_lookup(batch_keys, slots, table_keys, out_rows):
    """Like ``int_lookup_or_insert`` but never inserts: unknown keys map to -1."""
    mask = np.uint64(len(slots) - 1)
    for i in range(len(batch_keys)):
        k = batch_keys[i]
        s = mix64(k) & mask
        out_rows[i] = EMPTY
        while True:
            r = slots[s]
            if r == EMPTY:
                break
            if table_keys[r] == k:
                out_rows[i] = r
                break
            s = (s + np.uint64(1)) & mask


@njit(cache=True)
def int_rebuild(slots, table_keys, n_rows):
    """Re-insert rows ``0..n_rows`` into an empty (all -1) slot array. O(n_rows)."""
    mask = np.uint64(len(slots) - 1)
    for r in range(n_rows):
        s = mix64(table_keys[r]) & mask
        while slots[s] != EMPTY:
            s = (s + np.uint64(1)) & mask
        slots[s] = r


@njit(cache=True, inline="always")
def bytes_hash(data, start, end):
    """FNV-1a over ``data[start:end]``, then mixed; stable across runs and versions."""
    h = np.uint64(0xCBF29CE484222325)
    for j in range(start, end):
        h = (h ^ np.uint64(data[j])) * np.uint64(0x100000001B3)
    return mix64(h)


@njit(cache=True, inline="always")
def _bytes_equal(a, a0, a1, b, b0, b1):
    if a1 - a0 != b1 - b0:
        return False
    for j in range(a1 - a0):
        if a[a0 + j] != b[b0 + j]:
            return False
    return True


@njit(cache=True)
def str_lookup_or_insert(offsets, data, slots, dict_offsets, dict_data, n_rows, out_rows):
    """String-key version of ``int_lookup_or_insert``.

    ``offsets``/``data`` are the batch's Arrow string buffers (``len(offsets) == n + 1``).
    New strings are appended to ``dict_data`` with ``dict_offsets[n_rows + 1]`` marking their
    end. Caller guarantees ``len(dict_data) >= dict_offsets[n_rows] + batch bytes``.
    Returns the new row count.
    """
    mask = np.uint64(len(slots) - 1)
    for i in range(len(offsets) - 1):
        a0 = offsets[i]
        a1 = offsets[i + 1]
        s = bytes_hash(data, a0, a1) & mask
        while True:
            r = slots[s]
            if r == EMPTY:
                start = dict_offsets[n_rows]
                for j in range(a1 - a0):
                    dict_data[start + j] = data[a0 + j]
                dict_offsets[n_rows + 1] = start + (a1 - a0)
                slots[s] = n_rows
                out_rows[i] = n_rows
                n_rows += 1
                break
            if _bytes_equal(data, a0, a1, dict_data, dict_offsets[r], dict_offsets[r + 1]):
                out_rows[i] = r
                break
            s = (s + np.uint64(1)) & mask
    return n_rows


@njit(cache=True)
def str_rebuild(slots, dict_offsets, dict_data, n_rows):
    """Re-insert dictionary entries ``0..n_rows`` into an empty slot array."""
    mask = np.uint64(len(slots) - 1)
    for r in range(n_rows):
        s = bytes_hash(dict_data, dict_offsets[r], dict_offsets[r + 1]) & mask
        while slots[s] != EMPTY:
            s = (s + np.uint64(1)) & mask
        slots[s] = r
