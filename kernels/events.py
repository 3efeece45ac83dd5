"""Event rule steps: how one event changes one state value.

Each function takes the column's current value for the agent and the event's input value
(plus parameters) and returns the new value. The engine fuses the steps of all of an agent
type's rules into one generated loop over the tick's events (see ``vecswim.codegen``), so
every agent row is fetched once per event, not once per rule. Float arithmetic is float64;
the result is stored in the column's dtype. Inputs are finite (non-finite event fields are
dead-lettered before any kernel runs).
"""

import numpy as np
from numba import njit


@njit(cache=True)
def latest_step(c, v):
    """The event's value (last event in arrival order wins)."""
    return v


@njit(cache=True)
def sum_step(c, v):
    """Accumulate."""
    return c + v


@njit(cache=True)
def count_step(c):
    """One more event."""
    return c + 1


@njit(cache=True)
def min_step(c, v):
    """Smallest value so far; a NaN column (no value yet) takes v."""
    return v if (c != c or v < c) else c


@njit(cache=True)
def max_step(c, v):
    """Largest value so far; a NaN column (no value yet) takes v."""
    return v if (c != c or v > c) else c


@njit(cache=True)
def mean_step(m, v, k):
    """Running mean after the k-th value: m + (v - m) / k (k == 1: v)."""
    if k == 1:
        return np.float64(v)
    m = np.float64(m)
    return m + (np.float64(v) - m) / k


@njit(cache=True)
def ewma_step(c, v, alpha):
    """Exponentially weighted mean c + alpha * (v - c); a NaN column takes v."""
    c = np.float64(c)
    v = np.float64(v)
    if c != c:
        return v
    return c + alpha * (v - c)


@njit(cache=True)
def hysteresis_step(s, v, up, down, low, high):
    """Two-state status: low -> high when v > up, high -> low when v < down; values between
    the thresholds keep the state (no flapping around a single threshold)."""
    if s == low and v > up:
        return high
    if s == high and v < down:
        return low
    return s
