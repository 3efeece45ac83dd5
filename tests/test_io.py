"""Sources and sinks: file replay in every format, file sinks equal the in-memory sink."""

import json
import time

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest
from vecswim.scenarios import engines

import vecswim as vs
from tests.helpers import state_dict


def events(n=3000, seed=2):
    gen = engines.Generator(400, seed=seed)
    return pa.Table.from_batches([gen.make(500)["engine"] for _ in range(n // 500)])


def direct_state(table, max_events):
    eng = engines.build_engine(400)
    for off in range(0, table.num_rows, max_events):
        eng.tick({"engine": table.slice(off, max_events)})
    return state_dict(eng, "engine"), state_dict(eng, "fleet")


def write(table, path):
    if path.suffix == ".parquet":
        pq.write_table(table, path)
    elif path.suffix == ".ndjson":
        with open(path, "w") as fh:
            for r in table.to_pylist():
                fh.write(json.dumps(r) + "\n")
    elif path.name.endswith("file.arrow"):
        with ipc.new_file(path, table.schema) as w:
            w.write_table(table)
    else:
        with ipc.new_stream(path, table.schema) as w:
            w.write_table(table)


@pytest.mark.parametrize("name", ["ev.parquet", "ev.ndjson", "ev.file.arrow", "ev.arrows"])
def test_file_replay_equals_direct_ticks(tmp_path, name):
    table = events()
    path = tmp_path / name
    write(table, path)
    eng = engines.build_engine(400)
    seen = []
    eng.run(vs.FileSource(path, "engine"), max_events=700, on_tick=seen.append)
    assert [s.events for s in seen] == [700, 700, 700, 700, 200]
    assert (state_dict(eng, "engine"), state_dict(eng, "fleet")) == direct_state(table, 700)


def test_unknown_file_type_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown event file type"):
        vs.FileSource(tmp_path / "x.csv", "engine")


def test_file_sinks_hold_exactly_the_memory_sink_rows(tmp_path):
    eng = engines.build_engine(400)
    mem = vs.MemorySink()
    pq_sink = vs.ParquetSink(tmp_path / "out.parquet")
    nd_sink = vs.NDJSONSink(tmp_path / "out.ndjson")
    for s in (mem, pq_sink, nd_sink):
        eng.add_sink(s)
    table = events()
    eng.run(vs.ListSource([{"engine": table.slice(o, 1000)} for o in range(0, 3000, 1000)]))
    for at in ("engine", "fleet"):
        want = mem.table(at)
        assert pq.read_table(tmp_path / f"out.{at}.parquet").equals(want)
    lines = [json.loads(x) for x in (tmp_path / "out.ndjson").read_text().splitlines()]
    engine_rows = [
        {k: v for k, v in r.items() if k != "agent_type"}
        for r in lines
        if r["agent_type"] == "engine"
    ]
    assert engine_rows == mem.table("engine").to_pylist()
    assert len(lines) == mem.table("engine").num_rows + mem.table("fleet").num_rows


def test_generator_source_total_and_max_ticks():
    gen = engines.Generator(100, seed=1)
    src = vs.GeneratorSource(gen.make, rate=0, total=2500)
    sizes = []
    while (b := src.poll(1000, 0.01)) is not None:
        sizes.append(b["engine"].num_rows)
    assert sizes == [1000, 1000, 500]
    eng = engines.build_engine(100)
    eng.run(vs.GeneratorSource(engines.Generator(100).make), max_events=10, max_ticks=4)
    assert eng.totals["ticks"] == 4 and eng.totals["events"] == 40


def test_paced_generator_never_runs_ahead_of_its_rate():
    gen = engines.Generator(100, seed=1)
    src = vs.GeneratorSource(gen.make, rate=1000.0)
    got = 0
    t0 = time.perf_counter()
    for _ in range(5):
        b = src.poll(10_000, 0.02)
        got += b["engine"].num_rows if b else 0
    elapsed = time.perf_counter() - t0
    assert 0 < got <= 1000.0 * elapsed + 1  # never more than was due by the clock
