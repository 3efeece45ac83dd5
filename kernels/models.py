"""Online-model kernels used as custom event kernels by scenarios.

Same calling convention as custom kernels: ``fn(rows, *inputs, *outputs, *params)``.
"""

import numpy as np
from numba import njit


@njit(cache=True)
def trend(rows, level, last_level, slope, beta):
    """Smoothed slope of a level: slope += beta * ((level_i - level_{i-1}) - slope).

    ``level[i]`` is the agent's level right after event ``i`` (a trace); ``last_level`` keeps
    the previous one per agent (NaN before the first event, when the slope stays 0).
    """
    for i in range(len(rows)):
        r = rows[i]
        lv = np.float64(level[i])
        prev = np.float64(last_level[r])
        if prev == prev:
            s = np.float64(slope[r])
            slope[r] = s + beta * ((lv - prev) - s)
        last_level[r] = lv
