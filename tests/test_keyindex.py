"""Key index: int64 and string keys against a dict, incl. collisions, growth and lookups."""

import numpy as np
import pyarrow as pa
from hypothesis import given
from hypothesis import strategies as st
from vecswim.kernels import keyindex as kidx

import vecswim as vs
from vecswim.table import MAX_LOAD, StateTable

INT_T = vs.AgentType("thing", key="id", columns=[vs.Column("x", "float32", vs.latest("x"))])
STR_T = vs.AgentType(
    "named", key="name", key_dtype="string", columns=[vs.Column("x", "float32", vs.latest("x"))]
)


def dict_resolve(seen: dict, keys) -> list[int]:
    return [seen.setdefault(k, len(seen)) for k in keys]


def colliding_keys(n_slots: int, count: int, seed: int) -> np.ndarray:
    """Distinct int64 keys that all hash to the same home slot of an n_slots index."""
    rng = np.random.default_rng(seed)
    cand = np.unique(rng.integers(-(2**63), 2**63 - 1, 200_000, dtype=np.int64))
    home = np.array(
        [int(kidx.home(np.uint64(kidx.mix64(k)), np.uint64(n_slots))) for k in cand[:20_000]]
    )
    target = np.bincount(home).argmax()
    return cand[:20_000][home == target][:count]


@given(
    batches=st.lists(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=300), max_size=8),
    capacity=st.integers(1, 64),
)
def test_int_keys_match_dict(batches, capacity):
    table = StateTable(INT_T, capacity)
    seen: dict = {}
    for b in batches:
        rows = table.resolve(np.array(b, np.int64))
        assert rows.tolist() == dict_resolve(seen, b)
        assert table.n == len(seen)
    assert table.keys[: table.n].tolist() == list(seen)
    probe = [*list(seen)[:50], 12345678901, -1]
    expected = [seen.get(k, -1) for k in probe]
    assert table.lookup(np.array(probe, np.int64)).tolist() == expected


def test_int_keys_adversarial_collisions_and_growth():
    keys = colliding_keys(23, 40, seed=1)
    assert len(keys) >= 8
    table = StateTable(INT_T, 4)  # a 23-slot index at first: the chain grows through rebuilds
    seen: dict = {}
    for chunk in np.array_split(np.concatenate([keys, keys[::-1], keys]), 7):
        assert table.resolve(chunk).tolist() == dict_resolve(seen, chunk.tolist())
    assert table.n == len(keys)
    assert table.lookup(keys).tolist() == list(range(len(keys)))


def test_int_keys_extremes_and_large_batch():
    keys = np.array([0, -1, 2**63 - 1, -(2**63), 1, 0, -(2**63)], np.int64)
    table = StateTable(INT_T, 2)
    assert table.resolve(keys).tolist() == [0, 1, 2, 3, 4, 0, 3]
    big = np.random.default_rng(0).integers(0, 50_000, 200_000)
    seen = {int(k): i for i, k in enumerate(keys.tolist()) if i < 5}
    assert table.resolve(big).tolist() == dict_resolve(seen, big.tolist())
    assert len(table.slots) * MAX_LOAD >= table.n


@given(
    batches=st.lists(st.lists(st.text(max_size=12), max_size=200), max_size=6), large=st.booleans()
)
def test_string_keys_match_dict(batches, large):
    table = StateTable(STR_T, 1)
    seen: dict = {}
    for b in batches:
        arr = pa.array(b, pa.large_string() if large else pa.string())
        assert table.resolve(arr).tolist() == dict_resolve(seen, b)
    assert table.key_array().to_pylist() == list(seen)
    probe = [*list(seen)[:20], "never-seen-key"]
    assert table.lookup(pa.array(probe)).tolist() == [seen.get(k, -1) for k in probe]


def test_string_keys_sliced_arrays_and_unicode():
    base = pa.array(["zero", "één", "", "🚗 car", "zero", "", "x" * 1000])
    table = StateTable(STR_T, 1)
    seen: dict = {}
    for off, ln in [(2, 3), (0, 7), (5, 2)]:
        part = base.slice(off, ln)
        assert table.resolve(part).tolist() == dict_resolve(seen, part.to_pylist())
    assert table.key_array().to_pylist() == list(seen)


def test_string_key_agent_type_end_to_end():
    eng = vs.Engine([STR_T])
    eng.tick({"named": pa.table({"name": ["a", "b", "a"], "x": [1.0, 2.0, 3.0]})})
    eng.tick({"named": pa.table({"name": ["c", "b"], "x": [4.0, 5.0]})})
    got = eng.sql("SELECT name, x FROM named ORDER BY name").to_pylist()
    assert got == [{"name": "a", "x": 3.0}, {"name": "b", "x": 5.0}, {"name": "c", "x": 4.0}]
