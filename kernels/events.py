"""Built-in event kernels.

Common signature: ``kernel(rows, x, col, trace, *params)``.

- ``rows[i]``: the agent row event ``i`` is addressed to (events in arrival order);
- ``x[i]``: the event's input value (an event field, or another column's trace);
- ``col``: the whole state column, updated in place at ``col[rows[i]]``;
- ``trace``: event-aligned output, ``trace[i]`` = the column's value right after event ``i``
  (lets a later rule, e.g. hysteresis on a smoothed value, see every intermediate value).
  Pass a zero-length array when nobody reads it.

Arithmetic is done in float64 and stored in the column's dtype. Inputs are finite (the
engine dead-letters non-finite fields before kernels run). Each kernel is one pass, O(len(rows)).
"""

import numpy as np
from numba import njit


@njit(cache=True)
def latest(rows, x, col, trace):
    """col = x (last event in arrival order wins)."""
    keep = len(trace) > 0
    for i in range(len(rows)):
        r = rows[i]
        col[r] = x[i]
        if keep:
            trace[i] = col[r]


@njit(cache=True)
def sum_(rows, x, col, trace):
    """col += x."""
    keep = len(trace) > 0
    for i in range(len(rows)):
        r = rows[i]
        col[r] = col[r] + x[i]
        if keep:
            trace[i] = col[r]


@njit(cache=True)
def count(rows, col, trace):
    """col += 1 per event."""
    keep = len(trace) > 0
    for i in range(len(rows)):
        r = rows[i]
        col[r] = col[r] + 1
        if keep:
            trace[i] = col[r]


@njit(cache=True)
def min_(rows, x, col, trace):
    """col = min(col, x); a NaN column (no value yet) takes x."""
    keep = len(trace) > 0
    for i in range(len(rows)):
        r = rows[i]
        v = x[i]
        c = col[r]
        if c != c or v < c:
            col[r] = v
        if keep:
            trace[i] = col[r]


@njit(cache=True)
def max_(rows, x, col, trace):
    """col = max(col, x); a NaN column (no value yet) takes x."""
    keep = len(trace) > 0
    for i in range(len(rows)):
        r = rows[i]
        v = x[i]
        c = col[r]
        if c != c or v > c:
            col[r] = v
        if keep:
            trace[i] = col[r]


@njit(cache=True)
def mean(rows, x, col, n, trace):
    """Running mean of all events: n += 1; col += (x - col) / n. ``n`` is the hidden count."""
    keep = len(trace) > 0
    for i in range(len(rows)):
        r = rows[i]
        k = n[r] + 1
        n[r] = k
        if k == 1:
            col[r] = x[i]
        else:
            m = np.float64(col[r])
            col[r] = m + (np.float64(x[i]) - m) / k
        if keep:
            trace[i] = col[r]


@njit(cache=True)
def ewma(rows, x, col, trace, alpha):
    """Exponentially weighted mean: col += alpha * (x - col); a NaN column takes x."""
    keep = len(trace) > 0
    for i in range(len(rows)):
        r = rows[i]
        c = np.float64(col[r])
        v = np.float64(x[i])
        if c != c:
            col[r] = v
        else:
            col[r] = c + alpha * (v - c)
        if keep:
            trace[i] = col[r]


@njit(cache=True)
def hysteresis(rows, x, col, trace, up, down, low, high):
    """Two-state status with hysteresis: ``low`` -> ``high`` when x > up, ``high`` -> ``low``
    when x < down (down <= up). Values between the thresholds keep the current state."""
    keep = len(trace) > 0
    for i in range(len(rows)):
        r = rows[i]
        v = x[i]
        s = col[r]
        if s == low and v > up:
            col[r] = high
        elif s == high and v < down:
            col[r] = low
        if keep:
            trace[i] = col[r]
