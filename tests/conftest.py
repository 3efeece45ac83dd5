"""Test-wide setup.

Kernels run with numba bounds checking in tests (an out-of-bounds write in a kernel is an
IndexError here instead of silent corruption). Bounds-checked machine code gets its own numba
cache directory so it never mixes with the fast cached kernels the CLI and benchmarks load.
"""

import os
from pathlib import Path

os.environ.setdefault("NUMBA_BOUNDSCHECK", "1")
os.environ.setdefault(
    "NUMBA_CACHE_DIR", str(Path(__file__).resolve().parent.parent / ".numba-cache-boundscheck")
)

from hypothesis import HealthCheck, settings

# Kernels compile on first use; example deadlines would only measure the compiler.
settings.register_profile(
    "vecswim", deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=40
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "vecswim"))
