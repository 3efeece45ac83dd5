"""Exactly-once in effect for what leaves the engine: the tick journal, deterministic replay
after kill -9, file sinks truncated or committed at checkpoints, Pulsar output and dead
letters deduplicated by the broker (real broker, see test_exactly_once_pulsar below).

The reference for "what an uninterrupted run with the same tick boundaries emits" is built
from the journal the chaos run kept (``--keep-journal``): a fresh engine runs each journaled
tick once, with its tick id and exactly its input, into a MemorySink. Its final state is
also checked against the scenario's plain-Python reference model over all events.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest
from vecswim.scenarios import engines, setup

import vecswim as vs
from tests.helpers import canon_value, final_state_matches
from vecswim import checkpoint, journal
from vecswim.sinks import MemorySink, NDJSONSink, ParquetSink
from vecswim.sources import FileSource

ENGINE_COLS = ["engine_temp", "fan_temp", "coolant_vol", "status"]
FLEET_COLS = ["engines", "mean_engine_temp", "max_engine_temp", "red_engines"]
EXE = str(Path(sys.executable).parent / "vecswim")


# -- the journal ------------------------------------------------------------------------------
def test_journal_round_trip_torn_tail_and_segments(tmp_path):
    j = journal.TickJournal(tmp_path)
    assert j.open(0) == []
    j.append(1, {"rows": 5})
    j.append(3, None)
    j.rotate(3)
    j.append(4, {"rows": 7})
    j.close()
    seg = tmp_path / "journal" / "ticks-000000000003.log"
    with open(seg, "ab") as fh:
        fh.write(b'{"tick":5,"input":{"ro')  # killed mid-write
    j = journal.TickJournal(tmp_path)
    assert j.open(0) == [
        {"tick": 1, "input": {"rows": 5}},
        {"tick": 3, "input": None},
        {"tick": 4, "input": {"rows": 7}},
    ]
    assert seg.read_bytes().endswith(b"\n")  # the torn record is gone
    j.append(5, {"rows": 1})
    j.close()
    # a restore from checkpoint 3 replays what came after it, from its segment on
    assert [r["tick"] for r in journal.TickJournal(tmp_path).open(3)] == [4, 5]
    j = journal.TickJournal(tmp_path)
    j.open(3)
    j.prune(3)
    assert [p.name for p in sorted((tmp_path / "journal").iterdir())] == ["ticks-000000000003.log"]


def test_journal_corrupt_record_before_the_end_is_an_error(tmp_path):
    j = journal.TickJournal(tmp_path)
    j.open(0)
    j.append(1, {"rows": 5})
    j.append(2, {"rows": 6})
    j.close()
    seg = tmp_path / "journal" / "ticks-000000000000.log"
    data = bytearray(seg.read_bytes())
    data[10] ^= 1
    seg.write_bytes(bytes(data))
    with pytest.raises(journal.JournalError, match="corrupt record at byte 0"):
        journal.TickJournal(tmp_path).open(0)


# -- helpers ----------------------------------------------------------------------------------
def journal_records(ckdir: Path) -> list[dict]:
    """Every tick the journal ever recorded (all segments kept); a tick recorded twice
    (re-appended after a checkpoint inside a replay) must have the same input."""
    seen: dict[int, object] = {}
    for seg in sorted((ckdir / "journal").glob("ticks-*.log")):
        for line in seg.read_bytes().splitlines(keepends=True):
            rec = journal._parse(line)
            assert rec is not None, f"{seg.name}: a bad record was left behind"
            if rec["tick"] == 0:
                continue  # the start record: where output began, no input
            if rec["tick"] in seen:
                assert seen[rec["tick"]] == rec["input"], rec["tick"]
            seen[rec["tick"]] = rec["input"]
    return [{"tick": t, "input": seen[t]} for t in sorted(seen)]


def replay_reference(agents: int, source, records: list[dict]) -> tuple[vs.Engine, MemorySink]:
    """A fresh engine (set up as ``vecswim run engines`` does) running each journaled tick
    once, with its id and exactly its input."""
    eng = engines.build_engine(agents)
    setup(eng, engines.Generator(agents, seed=0))
    sink = MemorySink()
    eng.add_sink(sink)
    for rec in records:
        events = {}
        if rec["input"] is not None:
            deadline = time.monotonic() + 60
            while (events := source.replay(rec["input"], 0.05)) is None:
                assert time.monotonic() < deadline, f"tick {rec['tick']} never came back"
        eng.skip_to(rec["tick"] - 1)
        eng.tick(events)
    return eng, sink


def row_multiset(tables: dict[str, pa.Table]) -> list[tuple]:
    """Every emitted row as (agent_type, key, tick, values...) with exact values, sorted."""
    rows = []
    for at, t in tables.items():
        cols = [c for c in t.column_names if c != "agent_type"]
        for r in t.select(cols).to_pylist():
            rows.append((at, *(canon_value(r[c]) for c in cols)))
    return sorted(rows, key=repr)


def memory_tables(sink: MemorySink) -> dict[str, pa.Table]:
    return {at: sink.table(at) for at in sink.batches}


def checkpoint_state(eng: vs.Engine) -> dict:
    return {at: sorted(map(repr, eng.state(at).to_pylist())) for at in eng.tables}


def json_tables(lines: list[bytes], like: dict[str, pa.Table]) -> dict[str, pa.Table]:
    """Emitted JSON rows (with ``agent_type``) as one table per agent type, typed like
    ``like``'s tables."""
    rows = [json.loads(line) for line in lines]
    return {
        at: pa.Table.from_pylist([r for r in rows if r["agent_type"] == at])
        .select(t.column_names)
        .cast(t.schema)
        for at, t in like.items()
    }


def last_rows_match_state(eng: vs.Engine, per_type: dict[str, pa.Table]) -> None:
    """A consumer keeping the last row per key (by tick) holds the final state within each
    column's deadband (exactly for columns emitted on any change)."""
    for at, t in per_type.items():
        ty = eng.types[at]
        last = {}
        for r in sorted(t.to_pylist(), key=lambda r: r["tick"]):
            last[r[ty.key]] = r
        state = {r[ty.key]: r for r in eng.state(at).to_pylist()}
        assert set(last) == set(state), at
        for c in ty.columns:
            if c.emit is False:
                continue
            band = 0.0 if c.emit is True else float(c.emit)
            for k, r in last.items():
                a, b = r[c.name], state[k][c.name]
                if isinstance(a, float) and np.isnan(a):
                    assert np.isnan(b), (at, k, c.name)
                else:
                    assert abs(a - b) <= band, (at, k, c.name, a, b)


def kill_and_restart(cmd: list[str], kills: int, seed: int, window: tuple[float, float]) -> int:
    """Start ``cmd``, SIGKILL it after a random time in ``window`` once it is running,
    ``kills`` times; returns how many kills hit a live process."""
    rng = random.Random(seed)
    hit = 0
    for _ in range(kills):
        p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        for line in p.stderr:
            if line.startswith("vecswim: running"):
                break
        time.sleep(rng.uniform(*window))
        if p.poll() is None:
            hit += 1
            os.kill(p.pid, signal.SIGKILL)
        p.wait()
    return hit


def engines_ndjson(path: Path, agents: int, batches: int, size: int, bad_every: int) -> list:
    """An NDJSON event file of the engines scenario with a malformed line every
    ``bad_every`` lines; returns the good batches (for the reference model)."""
    gen = engines.Generator(agents, seed=5, relink=0.0)
    good = [gen.make(size)["engine"] for _ in range(batches)]
    with open(path, "wb") as fh:
        for b in good:
            lines = pl.from_arrow(b).write_ndjson().splitlines(keepends=True)
            for i in range(0, len(lines), bad_every):
                fh.write("".join(lines[i : i + bad_every]).encode())
                fh.write(b'{"engine_id": 3, "engine_temp": "hot"}\n')
    return good


# -- file sinks across kill -9 ----------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["ndjson", "parquet"])
def test_file_output_exactly_once_across_kill_9(tmp_path, fmt):
    """`vecswim run --file` with checkpoints, SIGKILLed at 10 random instants and restarted:
    the output file holds exactly the rows of one pass over the journaled ticks (none torn,
    none repeated, none missing), and the final state equals the reference model."""
    agents = 4000
    good = engines_ndjson(tmp_path / "in.ndjson", agents, 40, 2500, 700)
    ckdir = tmp_path / "ck"
    out = tmp_path / f"out.{fmt}"
    cmd = [
        EXE, "run", "engines", "--agents", str(agents), "--file", str(tmp_path / "in.ndjson"),
        "--checkpoint-dir", str(ckdir), "--checkpoint-ticks", "9", "--max-events", "400",
        "--emit", str(out), "--keep-journal", "--no-sql", "--quiet",
    ]  # fmt: skip
    hit = kill_and_restart(cmd, 10, seed=7, window=(0.05, 0.8))
    assert hit >= 5, "the run ended before most kills"
    final = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr

    records = journal_records(ckdir)
    src = FileSource(tmp_path / "in.ndjson", "engine")
    ref_eng, ref_sink = replay_reference(agents, src, records)
    if fmt == "ndjson":
        per_type = json_tables(out.read_bytes().splitlines(), memory_tables(ref_sink))
    else:
        assert not list(tmp_path.glob("out.*.parquet/*.tmp"))
        per_type = {
            at: pq.read_table(out.with_name(f"out.{at}.parquet")) for at in ("engine", "fleet")
        }
    assert row_multiset(per_type) == row_multiset(memory_tables(ref_sink))

    eng = engines.build_engine(agents)
    checkpoint.restore(eng, ckdir, log=lambda m: None)
    ref = engines.Reference()
    for b in good:
        ref.tick({"engine": b})
    final_state_matches(eng, ref.engines, "engine", ENGINE_COLS)
    final_state_matches(eng, ref.fleets, "fleet", FLEET_COLS)
    final_state_matches(ref_eng, ref.engines, "engine", ENGINE_COLS)


def test_ndjson_sink_resume_truncates_to_the_checkpoint(tmp_path):
    path = tmp_path / "o.ndjson"
    s = NDJSONSink(path)
    s.write(1, "a", pa.record_batch({"k": [1], "tick": [1]}))
    state = s.snapshot()
    s.write(2, "a", pa.record_batch({"k": [2], "tick": [2]}))
    s.close()
    with open(path, "ab") as fh:
        fh.write(b'{"k":3,"ti')  # torn by a kill
    s = NDJSONSink(path)
    s.resume(1, state)
    s.write(2, "a", pa.record_batch({"k": [2], "tick": [2]}))
    s.close()
    assert path.read_text().splitlines() == [
        '{"k":1,"tick":1,"agent_type":"a"}',
        '{"k":2,"tick":2,"agent_type":"a"}',
    ]
    path.write_text("")
    with pytest.raises(ValueError, match="changed outside vecswim"):
        NDJSONSink(path).resume(1, state)


def test_parquet_sink_parts_commit_at_checkpoints(tmp_path):
    s = ParquetSink(tmp_path / "o.parquet")
    s.write(3, "a", pa.record_batch({"k": [1], "tick": [3]}))
    s.write(5, "a", pa.record_batch({"k": [2], "tick": [5]}))
    s.snapshot()
    s.sync()
    s.write(8, "a", pa.record_batch({"k": [3], "tick": [8]}))  # then killed: part stays .tmp
    folder = tmp_path / "o.a.parquet"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["part-000000000003-000000000005.parquet", "part-000000000008.parquet.tmp"]
    s2 = ParquetSink(tmp_path / "o.parquet")
    s2.resume(5, {})
    assert sorted(p.name for p in folder.iterdir()) == ["part-000000000003-000000000005.parquet"]
    s2.write(8, "a", pa.record_batch({"k": [3], "tick": [8]}))
    s2.close()
    assert pq.read_table(folder).column("k").to_pylist() == [1, 2, 3]
    # a new run without a checkpoint starts a new dataset
    s3 = ParquetSink(tmp_path / "o.parquet")
    s3.write(1, "a", pa.record_batch({"k": [9], "tick": [1]}))
    s3.close()
    assert pq.read_table(folder).column("k").to_pylist() == [9]


def test_emissions_table_exists_before_the_first_emission():
    eng = engines.build_engine(10)
    got = eng.sql("SELECT count(*) AS n FROM emissions_engine").column("n").to_pylist()
    assert got == [0]
    cols = eng.sql("SELECT * FROM emissions_fleet").column_names
    assert cols[:2] == ["fleet_id", "tick"]
    eng.tick({"engine": engines.Generator(10, seed=1).make(5)["engine"]})
    assert eng.sql("SELECT count(*) AS n FROM emissions_engine").column("n")[0].as_py() > 0


def test_skip_to_advances_tick_ids_only_forward():
    eng = engines.build_engine(10)
    eng.skip_to(41)
    assert eng.tick({}).tick == 42
    eng.skip_to(5)
    assert eng.tick_id == 42
    assert eng.totals["ticks"] == 42
    assert np.all(eng.state("engine").num_rows == 0)


# -- Pulsar output and dead letters across kill -9 (real broker) -------------------------------
@pytest.mark.pulsar
@pytest.mark.slow
@pytest.mark.parametrize("out_format", ["json", "arrow"])
def test_pulsar_output_exactly_once_across_kill_9(pulsar_broker, tmp_path, out_format):
    """`vecswim run --pulsar ... --out-topic --dlq-topic` with checkpoints, SIGKILLed at 8
    random instants and restarted. Read back in full, the output topic holds exactly the rows
    of one pass over the journaled ticks (the multiset of an uninterrupted run with the same
    tick boundaries: none repeated, none missing, no tick id reused for other content), a
    consumer keeping the last row per key holds the final state within each column's
    deadband, and every malformed message is on the dead-letter topic exactly once."""
    from tests.test_pulsar import read_all, topic
    from vecswim import pulsar_io

    url = pulsar_broker.service_url
    t_in, t_out, t_dlq = topic("eo-in"), topic("eo-out"), topic("eo-dlq")
    agents = 8000
    gen = engines.Generator(agents, seed=21, relink=0.0)
    batches = [gen.make(3000)["engine"] for _ in range(40)]
    pub = pulsar_io.EventPublisher(url, t_in, "engine_id")
    n_bad = 0
    for i, b in enumerate(batches):
        pub.publish(b)
        if i % 4 == 0:
            pub.send_raw(b'{"engine_id": 5, "engine_temp": "broken"', key=f"bad-{i}")
            n_bad += 1
    pub.close()
    ckdir = tmp_path / "ck"
    cmd = [
        EXE, "run", "engines", "--agents", str(agents), "--pulsar", url, "--topic", t_in,
        "--out-topic", t_out, "--out-format", out_format, "--dlq-topic", t_dlq,
        "--subscription", "eo",
        "--checkpoint-dir", str(ckdir), "--checkpoint-every", "0.1", "--max-events", "1500",
        "--tick-ms", "5", "--idle-exit", "3", "--seconds", "600", "--keep-journal",
        "--no-sql", "--quiet",
    ]  # fmt: skip
    hit = kill_and_restart(cmd, 8, seed=3, window=(0.1, 1.5))
    assert hit >= 5, "the stream ended before most kills"
    final = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr

    records = journal_records(ckdir)
    shape = engines.build_engine(1)
    src = pulsar_io.PulsarSource(
        url, shape.types["engine"], shape.event_fields("engine"), topics=t_in,
        subscription="reference",
    )  # fmt: skip
    try:
        ref_eng, ref_sink = replay_reference(agents, src, records)
    finally:
        src.close()
    ref_tables = memory_tables(ref_sink)
    out = read_all(url, t_out)
    if out_format == "json":
        got = json_tables([m[0] for m in out], ref_tables)
    else:  # one Arrow IPC stream per agent type per tick, the type in a property
        got = {
            at: pa.concat_tables(
                [ipc.open_stream(m[0]).read_all() for m in out if m[1]["agent_type"] == at]
            ).cast(t.schema)
            for at, t in ref_tables.items()
        }
    assert row_multiset(got) == row_multiset(ref_tables)
    eng = engines.build_engine(agents)
    checkpoint.restore(eng, ckdir, log=lambda m: None)
    last_rows_match_state(eng, got)
    assert checkpoint_state(eng) == checkpoint_state(ref_eng)
    ref = engines.Reference()
    for b in batches:
        ref.tick({"engine": b})
    final_state_matches(eng, ref.engines, "engine", ENGINE_COLS)
    final_state_matches(eng, ref.fleets, "fleet", FLEET_COLS)
    dead = read_all(url, t_dlq)
    assert sorted(m[2] for m in dead) == sorted(f"bad-{i}" for i in range(0, 40, 4))
    assert all(m[1]["reason"] for m in dead)


@pytest.mark.pulsar
@pytest.mark.parametrize("n_topics", [1, 3])
def test_pulsar_replay_polls_exactly_what_a_poll_applied(pulsar_broker, n_topics):
    """Each poll's ``boundary()``, replayed on another subscription, yields exactly that
    poll's events in the same order (messages past a boundary wait for the next poll); with
    several topics a tick applies its messages by topic, then position, in both."""
    from tests.test_pulsar import topic
    from vecswim import pulsar_io

    url = pulsar_broker.service_url
    names = [topic(f"replay{i}") for i in range(n_topics)]
    gen = engines.Generator(500, seed=4, relink=0.0)
    pubs = [pulsar_io.EventPublisher(url, t, "engine_id") for t in names]
    for i in range(12):
        pubs[i % n_topics].publish(gen.make(900)["engine"])
        if i % 5 == 0:
            pubs[-1].send_raw(b'{"engine_id": 1, "engine_temp": [1]}')
    for p in pubs:
        p.close()
    total = sum(p.messages for p in pubs)
    shape = engines.build_engine(1)

    def source(sub: str):
        return pulsar_io.PulsarSource(
            url, shape.types["engine"], shape.event_fields("engine"),
            topics=names if n_topics > 1 else names[0], subscription=sub,
            batch_max_messages=300,
        )  # fmt: skip

    live = source("live")
    polls = []
    while live.counts["messages"] < total:
        got = live.poll(700, 0.02)
        if live.boundary() is not None:
            polls.append((live.boundary(), got))
    live.close()
    assert len(polls) > 3
    again = source("again")
    for b, got in polls:
        deadline = time.monotonic() + 60
        while (rep := again.replay(b, 0.02)) is None:
            assert time.monotonic() < deadline
        assert rep.keys() == got.keys()
        for at in got:
            assert rep[at].to_pylist() == got[at].to_pylist()
    assert again.counts["messages"] == total
    assert again.counts["dead_messages"] == live.counts["dead_messages"] == 3
    again.close()
