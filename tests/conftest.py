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
# On demand: HYPOTHESIS_PROFILE=deep python -m pytest tests/test_differential.py
settings.register_profile("deep", parent=settings.get_profile("vecswim"), max_examples=20_000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "vecswim"))


import socket  # noqa: E402

import pytest  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def pulsar_broker(tmp_path_factory):
    """A real Apache Pulsar standalone broker for the whole session, started by the project's
    own script. A broker that cannot start fails the tests that need it (never a skip)."""
    from vecswim import broker

    data = tmp_path_factory.mktemp("pulsar")
    try:
        b = broker.start(data, port=_free_port(), http_port=_free_port(), bookie_port=_free_port())
    except broker.BrokerError as e:
        pytest.fail(f"the Pulsar broker did not start: {e}")
    yield b
    broker.stop(data)
