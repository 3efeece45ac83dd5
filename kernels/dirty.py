"""Dirty-row marking and change detection (what is emitted).

A row is dirty in tick ``t`` when ``stamp[row] == t``; the dirty list holds each such row once,
in first-touch order. Marking is O(1) per touch, so a tick costs O(touches), never O(agents).
"""

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
