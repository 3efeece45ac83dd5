"""Dirty-row marking and change detection (what is emitted).

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
def changed_float(dirty, n, cur, last, deadband, out):
    """out[j] |= cur moved more than ``deadband`` from ``last`` at row dirty[j].

    NaN <-> number counts as a change; NaN -> NaN does not.
    """
    for j in range(n):
        r = dirty[j]
        c = cur[r]
        p = last[r]
        if (c != c) != (p != p) or (c == c and abs(float(c) - float(p)) > deadband):
            out[j] = True


@njit(cache=True)
def changed_exact(dirty, n, cur, last, out):
    """out[j] |= cur != last at row dirty[j] (status, enums, integers: any change)."""
    for j in range(n):
        r = dirty[j]
        if cur[r] != last[r]:
            out[j] = True


@njit(cache=True)
def select(dirty, n, changed, first_new, out):
    """Rows to emit: dirty rows that changed or were created this tick (row >= first_new).
    Writes them to ``out`` in dirty-list order and returns how many."""
    k = 0
    for j in range(n):
        r = dirty[j]
        if changed[j] or r >= first_new:
            out[k] = r
            k += 1
    return k


@njit(cache=True)
def take_emitted(rows, cur, last, out):
    """out[k] = cur[rows[k]] and remember it as the row's last emitted value, in one pass."""
    for k in range(len(rows)):
        r = rows[k]
        v = cur[r]
        out[k] = v
        last[r] = v


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
