"""Sources and sinks: file replay in every format, file sinks equal the in-memory sink."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest
from vecswim.scenarios import engines

import vecswim as vs
from tests.helpers import state_dict
from vecswim import scenarios


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


# -- vecswim run --file ----------------------------------------------------------------------
VECSWIM = str(Path(sys.executable).parent / "vecswim")


def vecswim(*args, **kw):
    return subprocess.run([VECSWIM, *args], capture_output=True, text=True, timeout=300, **kw)


def write_events(table: pa.Table, path: Path) -> None:
    if path.suffix == ".parquet":
        pq.write_table(table, path, row_group_size=700)
    elif path.suffix == ".arrows":
        with ipc.new_stream(path, table.schema) as w:
            for b in table.to_batches(max_chunksize=333):
                w.write_batch(b)
    else:
        with open(path, "w") as fh:
            for r in table.to_pylist():
                fh.write(json.dumps(r) + "\n")


def generated(scenario, agents, seed, ticks, per_tick) -> pa.Table:
    """The events ``vecswim run SCENARIO --rate 0 --events N --max-events M`` generates."""
    mod = scenarios.get(scenario)
    gen = mod.Generator(agents, seed=seed)
    return pa.Table.from_batches([gen.make(per_tick)[mod.EVENT_TYPE] for _ in range(ticks)])


@pytest.mark.parametrize(
    ("scenario", "name"),
    [
        ("engines", "ev.parquet"),
        ("engines", "ev.arrows"),
        ("engines", "ev.ndjson"),
        ("pollution", "ev.jsonl"),
    ],
)
def test_run_file_emits_what_the_generator_emits(tmp_path, scenario, name):
    common = ["--agents", "300", "--max-events", "1000", "--quiet", "--no-sql"]
    r = vecswim(
        "run", scenario, *common, "--rate", "0", "--events", "4000", "--seed", "3",
        "--emit", str(tmp_path / "gen.parquet"),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    write_events(generated(scenario, 300, 3, 4, 1000), tmp_path / name)
    out = str(tmp_path / "file.parquet")
    r = vecswim("run", scenario, *common, "--file", str(tmp_path / name), "--emit", out)
    assert r.returncode == 0, r.stderr
    assert "events           4,000" in r.stderr and "until they end" in r.stderr
    for at in [t.name for t in scenarios.get(scenario).AGENT_TYPES]:
        gen_rows = pq.read_table(tmp_path / f"gen.{at}.parquet")
        assert gen_rows.num_rows > 0
        assert pq.read_table(tmp_path / f"file.{at}.parquet").equals(gen_rows), at


def test_run_several_files_with_format_and_dead_letters(tmp_path):
    table = generated("engines", 300, 3, 2, 1000)
    a, b = tmp_path / "a.data", tmp_path / "b.data"
    write_events(table.slice(0, 1000), tmp_path / "a.ndjson")
    (tmp_path / "a.ndjson").rename(a)
    lines = [json.dumps(r) for r in table.slice(1000).to_pylist()]
    lines[10] = '{"engine_id": 1.5}'
    lines[20] = lines[20][:-5]
    b.write_text("\n".join(lines) + "\n")
    r = vecswim("run", "engines", "--agents", "300", "--no-sql", "--quiet", "--format", "ndjson",
                "--file", str(a), "--file", str(b))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "events           1,998" in r.stderr and "dead letters     2" in r.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--file", "missing.parquet"], "does not exist"),
        (["--file", "ev.csv"], "unknown event file type"),
        (["--file", "ev.parquet", "--pulsar", "pulsar://127.0.0.1:1", "--topic", "t"], "exclude"),
        (["--file", "ev.parquet", "--events", "5"], "--events applies to the generator"),
        (["--format", "parquet"], "--format parquet needs --file"),
    ],
)
def test_run_file_errors_are_one_line_and_exit_2(tmp_path, args, message):
    (tmp_path / "ev.csv").write_text("x\n")
    pq.write_table(pa.table({"engine_id": [1]}), tmp_path / "ev.parquet")
    r = vecswim("run", "engines", *args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("vecswim: error: ") and message in line, line


def final_state(ckpt: Path) -> list:
    r = vecswim("sql", "--checkpoint", str(ckpt), "SELECT * FROM engine ORDER BY engine_id",
                "--format", "json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.slow
def test_run_file_resumes_from_its_checkpoint_after_kill_9(tmp_path):
    """Kill -9 mid-replay, run again: the replay continues from the checkpoint's file
    positions and the final state equals an uninterrupted run's."""
    ev = tmp_path / "ev.ndjson"
    write_events(generated("engines", 20_000, 9, 60, 5000), ev)
    args = ["run", "engines", "--agents", "20000", "--max-events", "2000", "--no-sql", "--quiet",
            "--file", str(ev), "--file", str(ev), "--checkpoint-ticks", "1"]  # fmt: skip
    r = vecswim(*args, "--checkpoint-dir", str(tmp_path / "whole"))
    assert r.returncode == 0, r.stderr
    ckpt = tmp_path / "cut"
    p = subprocess.Popen([VECSWIM, *args, "--checkpoint-dir", str(ckpt)], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(list(ckpt.glob("ckpt-*[0-9]"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    r = vecswim(*args, "--checkpoint-dir", str(ckpt))
    assert r.returncode == 0, r.stderr
    assert "resumed from checkpoint" in r.stderr
    # counters continue from the checkpoint: every event was applied exactly once
    assert "events           600,000" in r.stderr
    assert final_state(ckpt) == final_state(tmp_path / "whole")
    m = json.loads(vecswim("checkpoint", "inspect", str(ckpt)).stdout)
    assert m["positions"]["file"] == 2 and m["positions"]["events"] == 600_000  # both done


# -- bounded memory ---------------------------------------------------------------------------
MEMORY_PROBE = """
import sys, tracemalloc
import pyarrow as pa
from vecswim.deadletter import validate_events
from vecswim.scenarios import engines
from vecswim.sources import FileSource
path, chunk = sys.argv[1], int(sys.argv[2])
eng = engines.build_engine(10)
at, fields = eng.types["engine"], eng.event_fields("engine")
validate_events(at, fields, engines.Generator(10).make(100)["engine"])
src = FileSource(path, "engine", chunk_bytes=chunk)
base = pa.default_memory_pool().max_memory()
tracemalloc.start()
events = biggest = 0
while (got := src.poll(1_000_000, 0.0)) is not None:  # the file as fast as it decodes
    b = got["engine"]
    raw = "__json" in b.schema.names
    size = b.column("__json").buffers()[2].size if raw else b.nbytes
    biggest = max(biggest, size)
    good, dead = validate_events(at, fields, b)
    events += good.num_rows
    del got, b, good, dead
print(events, biggest, pa.default_memory_pool().max_memory() - base,
      tracemalloc.get_traced_memory()[1])
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("suffix", "small", "big"),
    [("ndjson", 100_000, 800_000), ("arrow", 100_000, 1_600_000), ("parquet", 100_000, 3_200_000)],
)
def test_file_replay_memory_is_bounded_by_the_chunk_not_the_file(tmp_path, suffix, small, big):
    """Replay files much bigger than the chunk (1 MiB): by construction every poll holds at
    most 2 chunks of NDJSON text or about a chunk of Parquet/Arrow rows, and the peaks of
    the Arrow memory pool and of Python allocations (tracemalloc) do not grow with the file
    (Parquet: the reader's own pages and dictionaries, set by the writer, not the file)."""
    chunk = 1 << 20
    gen = engines.Generator(50_000, seed=1)
    peaks = []
    for n in (small, big):
        path = tmp_path / f"ev{n}.{suffix}"
        table = pa.Table.from_batches([gen.make(50_000)["engine"] for _ in range(n // 50_000)])
        if suffix == "ndjson":
            pl.from_arrow(table).write_ndjson(path)
        elif suffix == "parquet":
            pq.write_table(table, path, row_group_size=n)  # one row group: read in batches
        else:
            with ipc.new_file(path, table.schema) as w:
                w.write_table(table, max_chunksize=65_536)
        out = subprocess.run(
            [sys.executable, "-c", MEMORY_PROBE, str(path), str(chunk)],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        events, biggest, arrow_peak, python_peak = map(int, out.stdout.split())
        assert events == n
        size = max(path.stat().st_size, table.nbytes)  # on disk, or decoded
        peaks.append((size, biggest, arrow_peak, python_peak))
        path.unlink()
    (_, _, small_arrow, small_py), (big_size, biggest, big_arrow, big_py) = peaks
    assert big_size > 32 * chunk
    if suffix == "ndjson":
        assert biggest <= 2 * chunk  # a poll holds at most 2 chunks of text
    else:
        assert biggest <= chunk + 64  # a poll holds about a chunk of rows
    assert big_py <= small_py + chunk, peaks
    if suffix == "parquet":  # 32x the rows: the reader's pages grow a little, not the file
        assert big_arrow < 4 * small_arrow and big_arrow < big_size / 4, peaks
    else:
        assert big_arrow <= small_arrow + chunk, peaks
    assert big_arrow + big_py < big_size / 4, peaks
