"""Live SQL while ingesting: query latency and tick latency, side by side in one run.

    python -m bench.sql_bench [--agents 10000000] [--rate 1000000] [--seconds 15]

The ``engines`` engine with every agent created runs in a thread, fed pre-generated batches
at ``--rate`` events/s in ticks of ``--tick-events``, with the SQL server on (snapshots
refreshed after every tick). Phase 1 measures ticks without queries; phase 2 repeats the
same with a client sending ``SELECT status, count(*), avg(engine_temp) FROM engine GROUP BY
status`` over HTTP back to back, and measures its latency.
"""

from __future__ import annotations

import argparse
import json
import platform
import threading
import time
import urllib.request

import numpy as np

from bench.common import loaded_engines
from vecswim.server import SQLServer
from vecswim.snapshot import Snapshots

QUERY = "SELECT status, count(*) AS n, avg(engine_temp) AS t FROM engine GROUP BY status"


class Paced:
    """Cycles through prepared batches, releasing one every ``period`` seconds."""

    def __init__(self, batches, period: float, seconds: float) -> None:
        self.batches = batches
        self.period = period
        self.end = time.perf_counter() + seconds
        self.next = time.perf_counter()
        self.i = 0

    def poll(self, max_events, timeout):
        now = time.perf_counter()
        if now >= self.end:
            return None
        if self.next > now:
            time.sleep(self.next - now)
        self.next += self.period
        self.i += 1
        return self.batches[self.i % len(self.batches)]


def phase(eng, snaps, batches, period, seconds, url=None):
    ticks, lat = [], []
    stop = threading.Event()

    def client():
        while not stop.is_set():
            t0 = time.perf_counter()
            req = urllib.request.Request(f"{url}/sql", data=QUERY.encode(), method="POST")
            with urllib.request.urlopen(req, timeout=60) as r:
                json.loads(r.read())
            lat.append(time.perf_counter() - t0)

    th = threading.Thread(target=client) if url else None
    if th:
        th.start()
    t0 = time.perf_counter()
    eng.run(
        Paced(batches, period, seconds),
        max_events=10**7,
        on_tick=lambda s: ticks.append(s.seconds + snaps.last_refresh_seconds),
    )
    wall = time.perf_counter() - t0
    stop.set()
    if th:
        th.join()
    return ticks, lat, wall


def pct(xs, q):
    return float(np.percentile(np.array(xs) * 1e3, q)) if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=10_000_000)
    ap.add_argument("--rate", type=float, default=1_000_000)
    ap.add_argument("--tick-events", type=int, default=20_000)
    ap.add_argument("--seconds", type=float, default=15)
    args = ap.parse_args()
    eng, gen = loaded_engines(args.agents)
    snaps = Snapshots(eng).attach()
    srv = SQLServer(snaps, port=0)
    batches = [gen.make(args.tick_events) for _ in range(64)]
    for b in batches[:3]:
        eng.tick(b)
    period = args.tick_events / args.rate
    print(f"machine: {platform.machine()} 2 cores, python {platform.python_version()}")
    print(
        f"workload: engines, {args.agents:,} agents, {args.rate:,.0f} events/s offered in "
        f"ticks of {args.tick_events:,}; bytes/agent {eng.nbytes / eng.agents:.1f} + "
        f"snapshots {snaps.nbytes / eng.agents:.1f}"
    )
    for label, url in (("without queries", None), ("with queries   ", srv.url)):
        r0, s0 = snaps.refreshes, snaps.refresh_seconds
        e0 = eng.totals["events"]
        secs, lat, wall = phase(eng, snaps, batches, period, args.seconds, url)
        events = eng.totals["events"] - e0
        refresh_ms = (snaps.refresh_seconds - s0) / max(snaps.refreshes - r0, 1) * 1e3
        line = (
            f"{label}: {events / wall:12,.0f} events/s, tick p50 {pct(secs, 50):.1f} ms "
            f"p99 {pct(secs, 99):.1f} ms (incl. snapshot refresh, mean {refresh_ms:.1f} ms)"
        )
        if lat:
            line += f"; {len(lat)} queries, p50 {pct(lat, 50):.0f} ms p99 {pct(lat, 99):.0f} ms"
        print(line)
    srv.close()


if __name__ == "__main__":
    main()
