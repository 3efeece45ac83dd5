"""Dirty-row marking, change detection and locality ordering.

A row is dirty in tick ``t`` when ``stamp[row] == t``; the dirty list holds each such row once,
in first-touch order. Marking is O(1) per touch, so a tick costs O(touches), never O(agents).
"""

import numpy as np
from numba import njit


@njit(cache=True)
def mark(rows, stamp, tick, dirty, n_dirty):
    """Append every row of ``rows`` not yet dirty in ``tick`` to ``dirty``; return new count.

    Caller guarantees ``len(dirty) >= n_dirty + len(rows)``.
    """
    for i in range(len(rows)):
        r = rows[i]
        if stamp[r] != tick:
            stamp[r] = tick
            dirty[n_dirty] = r
            n_dirty += 1
    return n_dirty


@njit(cache=True)
def float_changed(c, p, deadband):
    """A float moved more than ``deadband`` from its last emitted value ``p``.
    NaN <-> number is a change; NaN -> NaN is not."""
    if (c != c) != (p != p):
        return True
    return c == c and abs(np.float64(c) - np.float64(p)) > deadband


@njit(cache=True)
def int_changed(c, p, threshold):
    """An integer (or bool) moved more than ``threshold`` (uint64) from its last emitted
    value ``p``, by the exact distance ``|c - p|`` (no overflow: taken in uint64)."""
    a = np.int64(c)
    b = np.int64(p)
    d = np.uint64(a) - np.uint64(b) if a >= b else np.uint64(b) - np.uint64(a)
    return d > threshold


@njit(cache=True)
def bucket_order(rows, shift, n_buckets):
    """Stable counting-sort permutation of ``rows`` by ``rows >> shift``.

    Applying it keeps every agent's events in arrival order but visits the state columns in
    (nearly) ascending address order, so every later pass over the tick's rows walks memory
    forward instead of jumping across the whole table (far fewer cache and TLB misses on
    tables larger than the caches). O(len(rows) + n_buckets).
    """
    start = np.zeros(n_buckets + 1, np.int64)
    for i in range(len(rows)):
        start[(rows[i] >> shift) + 1] += 1
    for b in range(n_buckets):
        start[b + 1] += start[b]
    perm = np.empty(len(rows), np.int64)
    for i in range(len(rows)):
        b = rows[i] >> shift
        perm[start[b]] = i
        start[b] += 1
    return perm


@njit(cache=True, nogil=True)
def copy_rows(rows, src, dst, limit):
    """dst[r] = src[r] for every r in ``rows`` below ``limit`` (a snapshot refresh; runs
    without the GIL so query threads keep going)."""
    for i in range(len(rows)):
        r = rows[i]
        if r < limit:
            dst[r] = src[r]
