"""Helpers shared by scenario generators and reference models (plain numpy / Python)."""

from __future__ import annotations

import math

import numpy as np

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def scramble(i: np.ndarray, salt: int) -> np.ndarray:
    """Agent index -> a random-looking but stable int64 id (bijective per salt), vectorized."""
    z = (np.asarray(i, np.uint64) + np.uint64(salt)) * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(1)).astype(np.int64)


def unit(i: np.ndarray, salt: int) -> np.ndarray:
    """A stable pseudo-random number in [0, 1) per agent index."""
    return (scramble(i, salt) >> 10).astype(np.float64) / float(1 << 53)


def quantize(x: np.ndarray, steps: int = 64) -> np.ndarray:
    """Round to multiples of 1/steps as float32 (sensor resolution; exact in binary)."""
    return (np.round(np.asarray(x) * steps) / steps).astype(np.float32)


def changed(cur: dict, last: dict | None, deadbands: dict[str, float]) -> bool:
    """Reference emission rule for one agent: new (``last`` None), or some emitted column moved
    more than its deadband (NaN <-> number is a change, NaN -> NaN is not)."""
    if last is None:
        return True
    for col, db in deadbands.items():
        c, p = cur[col], last[col]
        if isinstance(c, float) or isinstance(p, float):
            cn, pn = math.isnan(c), math.isnan(p)
            if cn != pn or (not cn and abs(float(c) - float(p)) > db):
                return True
        elif c != p:
            return True
    return False


def emit(agents: dict, last: dict, deadbands: dict[str, float], tick: int) -> dict:
    """Emissions of one agent type in the reference: key -> {tick, emitted columns}; updates
    ``last``. Checks every agent (slow and obviously complete)."""
    out = {}
    for key, a in agents.items():
        cur = {c: a[c] for c in deadbands}
        if changed(cur, last.get(key), deadbands):
            last[key] = cur
            out[key] = {"tick": tick, **cur}
    return out


def fixed_sum(values, scale: float = 2.0**16) -> int:
    """The aggregate sum contract: sum of round-half-even(v * scale) over finite values."""
    return sum(round(float(v) * scale) for v in values if math.isfinite(v))
