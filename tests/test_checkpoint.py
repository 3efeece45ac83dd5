"""Checkpoints: exact round trips, fallbacks past broken checkpoints, schema mismatch."""

import json

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vecswim.scenarios import engines, pollution, setup

import vecswim as vs
from tests.helpers import TickCapture, canon_rows, state_dict
from vecswim import checkpoint


def all_state(eng):
    return {name: state_dict(eng, name) for name in eng.tables}


def run_with_restart(mod, gen_args, sizes, cut, tmp_path):
    """An uninterrupted engine and one restored from a checkpoint at tick ``cut`` see the
    same events: every later tick's emissions and the final state must be identical."""
    gen = mod.Generator(*gen_args)
    batches = [gen.make(n) for n in sizes]
    a = mod.build_engine(gen.agents)
    setup(a, gen)
    cap_a = TickCapture(a)
    for b in batches[:cut]:
        a.tick(b)
    checkpoint.write(checkpoint.capture(a, {"note": "x"}), tmp_path)
    b_eng = mod.build_engine(gen.agents)
    manifest = checkpoint.restore(b_eng, tmp_path)
    assert manifest["tick"] == cut and manifest["positions"] == {"note": "x"}
    assert all_state(b_eng) == all_state(a)
    cap_b = TickCapture(b_eng)
    cap_a.take()
    for b in batches[cut:]:
        sa, sb = a.tick(b), b_eng.tick(b)
        assert sa.tick == sb.tick
        ga, gb = cap_a.take(), cap_b.take()
        assert ga.keys() == gb.keys()
        for at in ga:
            key = a.types[at].key
            assert canon_rows(ga[at], key) == canon_rows(gb[at], key)
    assert all_state(b_eng) == all_state(a)
    assert b_eng.totals == a.totals


@settings(max_examples=10)
@given(seed=st.integers(0, 2**31), cut=st.integers(1, 5))
def test_engines_restart_is_exact(seed, cut, tmp_path_factory):
    run_with_restart(
        engines,
        (400, seed, None, 0.1, 20.0),
        [300, 50, 700, 10, 400, 300, 200],
        cut,
        tmp_path_factory.mktemp("ck"),
    )


def test_pollution_restart_is_exact(tmp_path):
    run_with_restart(pollution, (5000, 3), [2000, 500, 3000, 1000], 2, tmp_path)


def test_string_keys_restart(tmp_path):
    t = vs.AgentType(
        "named",
        key="name",
        key_dtype="string",
        columns=[vs.Column("x", "float32", vs.sum("x"), emit=0.0)],
    )
    a = vs.Engine([t])
    a.tick({"named": pa.table({"name": ["a", "bb", "", "a"], "x": [1.0, 2.0, 3.0, 4.0]})})
    checkpoint.write(checkpoint.capture(a), tmp_path)
    b = vs.Engine([t])
    checkpoint.restore(b, tmp_path)
    for e in (a, b):
        e.tick({"named": pa.table({"name": ["bb", "new", "a"], "x": [1.0, 1.0, 1.0]})})
    assert (
        state_dict(a, "named")
        == state_dict(b, "named")
        == {"a": {"x": 6.0}, "bb": {"x": 3.0}, "": {"x": 3.0}, "new": {"x": 1.0}}
    )


def make_checkpoints(tmp_path, n=3):
    eng = engines.build_engine(200)
    gen = engines.Generator(200, seed=1)
    paths = []
    for _ in range(n):
        eng.tick(gen.make(300))
        paths.append(checkpoint.write(checkpoint.capture(eng), tmp_path, keep=10))
    return paths


@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest", "missing", "empty"])
def test_broken_newest_checkpoint_falls_back_to_previous(tmp_path, damage):
    paths = make_checkpoints(tmp_path)
    newest = paths[-1]
    f = newest / "engine.arrow"
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[:-100])
    elif damage == "flip":
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))
    elif damage == "manifest":
        (newest / "manifest.json").write_text("{not json")
    elif damage == "missing":
        f.unlink()
    else:
        (newest / "manifest.json").write_text(json.dumps({"format": 1}))
    logged = []
    eng = engines.build_engine(200)
    manifest = checkpoint.restore(eng, tmp_path, log=logged.append)
    assert manifest["tick"] == 2
    assert len(logged) == 1 and newest.name in logged[0] and "skipping checkpoint" in logged[0]


def test_no_valid_checkpoint_starts_empty_and_tmp_dirs_are_ignored(tmp_path):
    (tmp_path / "ckpt-000000000009.tmp").mkdir()
    assert checkpoint.restore(engines.build_engine(10), tmp_path) is None
    paths = make_checkpoints(tmp_path, 1)
    (paths[0] / "manifest.json").unlink()
    logged = []
    assert checkpoint.restore(engines.build_engine(10), tmp_path, log=logged.append) is None
    assert len(logged) == 1


def test_keep_last_k(tmp_path):
    eng = engines.build_engine(100)
    for _ in range(5):
        eng.tick(engines.Generator(100).make(50))
        checkpoint.write(checkpoint.capture(eng), tmp_path, keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == [
        "ckpt-000000000004",
        "ckpt-000000000005",
    ]


def test_changed_schema_is_refused_clearly(tmp_path):
    make_checkpoints(tmp_path, 1)
    other = vs.Engine(
        [vs.AgentType("engine", key="engine_id", columns=[vs.Column("engine_temp", "float64")])]
    )
    with pytest.raises(checkpoint.CheckpointError, match="written for another schema"):
        checkpoint.restore(other, tmp_path)


def test_checkpointer_commits_only_after_durable_checkpoint(tmp_path):
    class Source:
        def __init__(self):
            self.gen = engines.Generator(100, seed=4)
            self.polled = 0
            self.commits = []

        def poll(self, max_events, timeout):
            if self.polled == 6:
                return None
            self.polled += 1
            return self.gen.make(100)

        def mark(self):
            return self.polled

        def positions(self):
            return {"polled": self.polled}

        def commit(self, token=None):
            self.commits.append(token)

    eng = engines.build_engine(100)
    src = Source()
    ck = checkpoint.Checkpointer(eng, tmp_path, src, every_ticks=2)
    eng.run(src, checkpointer=ck)
    assert src.commits and src.commits[-1] == 6  # the final checkpoint covers everything
    assert src.commits == sorted(src.commits)
    last = checkpoint.newest_valid(tmp_path)[1]
    assert last["tick"] == 6 and last["positions"] == {"polled": 6}
    assert len(ck.pauses) == len(src.commits)
