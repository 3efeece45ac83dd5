"""What exactly-once output costs, measured side by side in one run.

    python -m bench.exactly_once_bench [--events 1000000] [--tick 10000] [--pulsar URL]

1. The tick journal: ``Engine.run(FileSource(arrow file))`` of the ``engines`` scenario with a
   checkpointer (every 50 ticks) and an NDJSON emission file, with the journal (one
   ``write`` + ``fdatasync`` per tick) and without it (``journal=False``), interleaved,
   best of ``--repeat``; events/s and the journal's share.
2. With ``--pulsar``: the emissions of the same run sent to a topic by ``PulsarSink``
   (JSON, one message per row), at-least-once (unnamed producer, 5 ms batching delay)
   against exactly-once (named producer, sequence ids, a tick's rows sorted by key and sent
   as one group, batches cut by count and bytes only); rows/s.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from pathlib import Path

import pyarrow.ipc as ipc
from vecswim.scenarios import engines

from vecswim.checkpoint import Checkpointer
from vecswim.sinks import NDJSONSink
from vecswim.sources import FileSource


def _events_file(path: Path, events: int, agents: int) -> None:
    gen = engines.Generator(agents, seed=9, relink=0.0)
    batches = [gen.make(50_000)["engine"] for _ in range(events // 50_000)]
    with ipc.new_file(str(path), batches[0].schema) as w:
        for b in batches:
            w.write_batch(b)


def _run(src: Path, work: Path, tick: int, agents: int, journal: bool, sink=None) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    eng = engines.build_engine(agents)
    eng.add_sink(sink if sink is not None else NDJSONSink(work / "out.ndjson"))
    source = FileSource(src, "engine")
    ck = Checkpointer(eng, work / "ck", source, every_ticks=50, journal=journal, log=lambda m: None)
    t0 = time.perf_counter()
    eng.run(source, max_events=tick, checkpointer=ck)
    dt = time.perf_counter() - t0
    return {
        "seconds": dt,
        "events": eng.totals["events"],
        "emitted": eng.totals["emitted"],
        "ticks": eng.totals["ticks"],
        "appends": ck.journal.appended if ck.journal is not None else 0,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--agents", type=int, default=200_000)
    ap.add_argument("--tick", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--pulsar", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        src = root / "events.arrow"
        _events_file(src, args.events, args.agents)
        _run(src, root / "warm", args.tick, args.agents, True)  # numba cache, page cache
        best: dict[bool, dict] = {}
        for r in range(args.repeat):
            for journal in (False, True):
                got = _run(src, root / f"r{r}{journal}", args.tick, args.agents, journal)
                if journal not in best or got["seconds"] < best[journal]["seconds"]:
                    best[journal] = got
        off, on = best[False], best[True]
        print(
            f"journal: {args.events:,} events, {args.agents:,} agents, ticks of {args.tick:,} "
            f"({on['ticks']:,} ticks, {on['appends']:,} journal records)"
        )
        for name, b in (("without", off), ("with", on)):
            rate = b["events"] / b["seconds"]
            print(f"  {name:8s} {rate:>12,.0f} events/s  {b['seconds']:.2f} s")
        print(f"  ratio with/without throughput: {off['seconds'] / on['seconds']:.3f}")
        per = (on["seconds"] - off["seconds"]) / max(on["appends"], 1) * 1e3
        print(f"  cost per journaled tick: {per:.3f} ms")
        if args.pulsar:
            from vecswim import pulsar_io

            rates = {}
            for r in range(args.repeat):
                for once in (False, True):
                    t = f"persistent://public/default/eo-bench-{uuid.uuid4().hex[:8]}"
                    name = f"bench-{uuid.uuid4().hex[:6]}" if once else None
                    sink = pulsar_io.PulsarSink(args.pulsar, t, producer_name=name)
                    got = _run(src, root / f"p{r}{once}", args.tick, args.agents, True, sink)
                    rate = got["emitted"] / got["seconds"]
                    rates[once] = max(rates.get(once, 0.0), rate)
            print(f"pulsar JSON emissions ({got['emitted']:,} rows per run, whole run rows/s):")
            print(f"  at-least-once {rates[False]:>12,.0f} rows/s")
            print(f"  exactly-once  {rates[True]:>12,.0f} rows/s")
            print(f"  ratio exactly/at-least: {rates[True] / rates[False]:.3f}")


if __name__ == "__main__":
    main()
