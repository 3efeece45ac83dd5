"""vecswim end-to-end tick rate vs the raw numba random-scatter rate, side by side.

    python -m bench.scatter_ratio [--agents 10000000] [--batch 200000] [--ticks 30]

Workload: the ``engines`` scenario with every agent created up front; each tick applies one
pre-generated batch (key lookup, 3 latest rules, hysteresis, fleet link with count/mean/max/
sum, deadband emission to no sink). The raw scatter writes the same batches' three fields to
three float32 columns at random rows of a table of the same size, rows known in advance.
Also prints bytes/agent and the cost of an empty tick on the same table.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import psutil

from bench.common import loaded_engines, raw_scatter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=10_000_000)
    ap.add_argument("--batch", type=int, default=200_000)
    ap.add_argument("--ticks", type=int, default=30)
    args = ap.parse_args()

    eng, gen = loaded_engines(args.agents)
    batches = [gen.make(args.batch) for _ in range(args.ticks + 3)]
    for b in batches[:3]:  # warm: first-call dispatch, page faults of grown buffers
        eng.tick(b)
    tick_s = []
    emitted = 0
    for b in batches[3:]:
        s = eng.tick(b)
        tick_s.append(s.seconds)
        emitted += s.emitted
    events = args.ticks * args.batch
    vec_rate = events / sum(tick_s)

    n = args.agents
    cols = [np.zeros(n, np.float32) for _ in range(3)]
    rng = np.random.default_rng(0)
    scat = []
    for b in batches[3:]:
        rows = rng.integers(0, n, args.batch).astype(np.int32)
        e = b["engine"]
        f = [e.column(c).to_numpy() for c in ("engine_temp", "fan_temp", "coolant_vol")]
        raw_scatter(rows, *f, *cols)
        t0 = time.perf_counter()
        raw_scatter(rows, *f, *cols)
        scat.append(time.perf_counter() - t0)
    raw_rate = events / sum(scat)

    empty = []
    for _ in range(2000):
        empty.append(eng.tick().seconds)
    ms = np.array(tick_s) * 1e3
    print(
        f"machine: {platform.machine()} {psutil.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB, python {platform.python_version()}"
    )
    print(
        f"workload: engines, {eng.tables['engine'].n:,} engines + {eng.tables['fleet'].n:,} "
        f"fleets, {args.ticks} ticks x {args.batch:,} events"
    )
    print(
        f"vecswim end-to-end : {vec_rate / 1e6:8.2f} M events/s  (tick p50 {np.median(ms):.1f} ms,"
        f" p99 {np.percentile(ms, 99):.1f} ms, emitted {emitted / events:.1%} of events)"
    )
    print(f"raw numba scatter  : {raw_rate / 1e6:8.2f} M events/s")
    print(f"ratio              : {vec_rate / raw_rate:8.3f}  (target >= 0.5)")
    print(
        f"bytes/agent        : {eng.nbytes / eng.agents:8.1f}  (target <= 64; state + index + "
        "links, allocated)"
    )
    print(
        f"empty tick         : {np.median(empty) * 1e6:8.1f} us median, "
        f"{np.percentile(empty, 99) * 1e6:.1f} us p99  (target < 100 us)"
    )


if __name__ == "__main__":
    main()
