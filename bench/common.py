"""Shared set-up for benchmarks: populated engines and pre-generated event batches."""

from __future__ import annotations

import numpy as np
from numba import njit
from vecswim.scenarios import engines


def loaded_engines(agents: int, seed: int = 0, chunk: int = 200_000):
    """An ``engines`` scenario engine with every one of ``agents`` engines created (each gets
    one event), and its generator. Loading is untimed set-up."""
    gen = engines.Generator(agents, seed=seed)
    eng = engines.build_engine(agents)
    for start in range(0, agents, chunk):
        eng.tick(gen.make_for(np.arange(start, min(agents, start + chunk))))
    return eng, gen


@njit(cache=True)
def raw_scatter(rows, a, b, c, col_a, col_b, col_c):
    """The access pattern's floor: write an event's three fields to three float32 state
    columns at an already-known random row. No key lookup, no change tracking."""
    for i in range(len(rows)):
        r = rows[i]
        col_a[r] = a[i]
        col_b[r] = b[i]
        col_c[r] = c[i]
