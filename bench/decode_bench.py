"""Decode throughput, this tree against a baseline revision, side by side in one run.

    python -m bench.decode_bench [--baseline REV] [--payloads 100000] [--events 400000]

1. Pulsar-style JSON payloads (one ``engines`` event per payload): the time to turn
   ``--payloads`` payloads into the engine's typed events. Baseline: ``pulsar_io.decode_json``
   of REV plus REV's ``validate_events`` (which the engine ran on the result at the tick);
   now: ``pulsar_io.decode_json`` (the decoder does all checks; the engine passes the result
   through). Also with one bad payload in 1,000 (bisection) and with message keys.
2. A typed Arrow batch of the generator (the in-memory path of ``Engine.tick``):
   ``validate_events`` of REV against now.
3. NDJSON file replay: ``Engine.run(FileSource(file))`` over ``--events`` lines, end to end
   (read, decode, tick), events/s. Baseline: REV's FileSource (reads the whole file with
   Arrow's inferring reader) and REV's ``validate_events``.

Each figure is the best of ``--repeat`` runs, baseline and now interleaved (the machine is a
noisy shared VM). The baseline modules are taken with ``git show REV:path``.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl
import pyarrow as pa
from vecswim.scenarios import engines

import vecswim.engine as vengine
from vecswim import decode, pulsar_io
from vecswim.deadletter import validate_events
from vecswim.sources import FileSource

ROOT = Path(__file__).resolve().parent.parent


def baseline(rev: str, name: str, tmp: Path):
    """Module ``vecswim/<name>.py`` as it was at ``rev``."""
    src = subprocess.run(
        ["git", "show", f"{rev}:vecswim/{name}.py"], cwd=ROOT, capture_output=True, check=True
    ).stdout
    path = tmp / f"baseline_{name}.py"
    path.write_bytes(src)
    spec = importlib.util.spec_from_file_location(f"baseline_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", default="526a8e1", help="revision before the decoder")
    ap.add_argument("--payloads", type=int, default=100_000)
    ap.add_argument("--events", type=int, default=400_000)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    old_io = baseline(a.baseline, "pulsar_io", tmp)
    old_dl = baseline(a.baseline, "deadletter", tmp)
    old_src = baseline(a.baseline, "sources", tmp)

    eng = engines.build_engine(100_000)
    at, fields = eng.types["engine"], eng.event_fields("engine")
    gen = engines.Generator(100_000, seed=1)
    table = pa.Table.from_batches([gen.make(a.payloads)["engine"]])
    buf = io.BytesIO()
    pl.from_arrow(table).write_ndjson(buf)
    payloads = buf.getvalue().splitlines()
    bad = list(payloads)
    for i in range(500, len(bad), 1000):
        bad[i] = b'{"engine_id": 1, "engine_temp": "hot"}'
    worse = list(payloads)
    for i in range(50, len(worse), 100):
        worse[i] = b'{"engine_id": 1, "engine_temp": "hot"}'
    keys = [str(k) for k in table.column("engine_id").to_pylist()]
    buf_k = io.BytesIO()
    pl.from_arrow(table.drop_columns(["engine_id"])).write_ndjson(buf_k)
    no_key = buf_k.getvalue().splitlines()
    old_schema = old_io.event_schema(at, fields, False)
    old_schema_k = old_io.event_schema(at, fields, True)
    plan = decode.plan_for(at, fields)
    plan_k = decode.plan_for(at, fields, key_from_message=True)
    decode.warm_up()

    def old_json(ps):
        t, _ = old_io.decode_json(ps, old_schema, 1 << 20)
        old_dl.validate_events(at, fields, t)

    def old_keyed():
        t, b = old_io.decode_json(no_key, old_schema_k, 1 << 20)
        keep = old_io._without(len(no_key), [i for i, _ in b])
        t, _ = old_io._add_message_keys(t, [keys[i] for i in keep], keep, at)
        old_dl.validate_events(at, fields, t)

    def new_json(ps):
        t, _ = pulsar_io.decode_json(ps, plan, 1 << 20)
        validate_events(at, fields, t)

    def new_keyed():
        t, _ = pulsar_io.decode_json(no_key, plan_k, 1 << 20, keys)
        validate_events(at, fields, t)

    n = len(payloads)
    uname = subprocess.run(["uname", "-srm"], capture_output=True, text=True).stdout.strip()
    print(f"{uname}, python {sys.version.split()[0]}, pyarrow {pa.__version__}; best of {a.repeat}")
    print(
        f"\nPulsar-style JSON payloads ({n:,} engines events, {len(buf.getvalue()) / n:.0f} B each)"
    )
    cases = [
        ("all good", lambda: old_json(payloads), lambda: new_json(payloads)),
        ("1 bad in 1,000", lambda: old_json(bad), lambda: new_json(bad)),
        ("1 bad in 100", lambda: old_json(worse), lambda: new_json(worse)),
        ("key from message", old_keyed, new_keyed),
    ]
    for name, old, new in cases:
        old()
        new()
        t_old = best(old, a.repeat)
        t_new = best(new, a.repeat)
        print(
            f"  {name:<18} baseline {n / t_old:>12,.0f}/s   now {n / t_new:>12,.0f}/s"
            f"   ({t_old / t_new:.2f}x)"
        )

    typed = gen.make(200_000)["engine"]  # the generator's batches (float64 into float32 columns)
    old_v = best(lambda: old_dl.validate_events(at, fields, typed), a.repeat)
    new_v = best(lambda: validate_events(at, fields, typed), a.repeat)
    print("\nTyped Arrow batch (200,000 generator events), validate_events")
    print(
        f"  {'events/s':<18} baseline {200_000 / old_v:>12,.0f}/s   now {200_000 / new_v:>12,.0f}/s"
        f"   ({old_v / new_v:.2f}x)"
    )

    path = tmp / "events.ndjson"
    with open(path, "wb") as fh:
        for _ in range(a.events // 100_000):
            pl.from_arrow(gen.make(100_000)["engine"]).write_ndjson(fh)
    size = path.stat().st_size

    def replay(source_cls, validator) -> None:
        e = engines.build_engine(100_000)
        vengine.validate_events = validator
        try:
            e.run(source_cls(path, "engine"), max_events=200_000)
        finally:
            vengine.validate_events = validate_events
        assert e.totals["events"] == a.events, e.totals

    replay(FileSource, validate_events)
    replay(old_src.FileSource, old_dl.validate_events)
    t_old = best(lambda: replay(old_src.FileSource, old_dl.validate_events), a.repeat)
    t_new = best(lambda: replay(FileSource, validate_events), a.repeat)
    print(
        f"\nNDJSON file replay, engine.run end to end ({a.events:,} lines, {size / 2**20:.0f} MiB)"
    )
    print(
        f"  {'events/s':<18} baseline {a.events / t_old:>12,.0f}/s   now "
        f"{a.events / t_new:>12,.0f}/s   ({t_old / t_new:.2f}x)"
    )
    mib = size / 2**20
    print(f"  {'MiB/s':<18} baseline {mib / t_old:>12,.1f}     now {mib / t_new:>12,.1f}")


if __name__ == "__main__":
    main()
