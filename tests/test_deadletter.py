"""Bad events go to the dead letters with a reason; good ones in the same batch apply."""

import math

import pyarrow as pa
import pytest
from vecswim.scenarios import engines

import vecswim as vs
from tests.helpers import state_dict


def test_row_level_rejections_keep_the_good_rows():
    eng = engines.build_engine(100)
    got = []
    eng.dead_letters.add_sink(lambda tick, at, b: got.append((tick, at, b)))
    batch = pa.table(
        {
            "engine_id": pa.array([1, None, 3, 4, 5, 6], pa.int64()),
            "engine_temp": pa.array([90.0, 91.0, math.nan, 93.0, math.inf, 95.0], pa.float64()),
            "fan_temp": pa.array([50.0, 50.0, 50.0, None, 50.0, 50.0], pa.float64()),
            "coolant_vol": [8.0] * 6,
            "fleet_id": pa.array([7, 7, 7, 7, 7, None], pa.int64()),
        }
    )
    s = eng.tick({"engine": batch})
    assert (s.events, s.dead_letters) == (1, 5)
    assert set(state_dict(eng, "engine")) == {1}
    assert eng.dead_letters.reasons == {
        "null key": 1,
        "non-finite field 'engine_temp'": 2,
        "null field 'fan_temp'": 1,
        "null field 'fleet_id'": 1,
    }
    ((tick, at, dead),) = got
    assert (tick, at) == (1, "engine")
    assert dead.column("reason").to_pylist() == [
        "null key",
        "non-finite field 'engine_temp'",
        "null field 'fan_temp'",
        "non-finite field 'engine_temp'",
        "null field 'fleet_id'",
    ]
    assert dead.column("engine_temp").to_pylist()[0] == 91.0  # original columns kept


@pytest.mark.parametrize(
    ("batch", "reason"),
    [
        (
            pa.table(
                {"engine_id": [1], "engine_temp": [1.0], "fan_temp": [1.0], "coolant_vol": [1.0]}
            ),
            "missing field 'fleet_id'",
        ),
        (
            pa.table(
                {
                    "engine_id": ["x"],
                    "engine_temp": [1.0],
                    "fan_temp": [1.0],
                    "coolant_vol": [1.0],
                    "fleet_id": [1],
                }
            ),
            "field 'engine_id'",
        ),
        (
            pa.table(
                {
                    "engine_id": [1],
                    "engine_temp": ["hot"],
                    "fan_temp": [1.0],
                    "coolant_vol": [1.0],
                    "fleet_id": [1],
                }
            ),
            "field 'engine_temp'",
        ),
    ],
)
def test_whole_batch_rejections_and_engine_keeps_running(batch, reason):
    eng = engines.build_engine(100)
    s = eng.tick({"engine": batch})
    assert (s.events, s.dead_letters) == (0, 1)
    (got,) = eng.dead_letters.reasons
    assert got.startswith(reason)
    ok = pa.table(
        {
            "engine_id": [1],
            "engine_temp": [1.0],
            "fan_temp": [1.0],
            "coolant_vol": [1.0],
            "fleet_id": [1],
        }
    )
    assert eng.tick({"engine": ok}).events == 1
    assert eng.totals["dead_letters"] == 1


def test_dead_letters_keep_a_bounded_recent_window():
    t = vs.AgentType("a", key="id", columns=[vs.Column("x", "float32", vs.latest("x"))])
    eng = vs.Engine([t])
    eng.dead_letters.keep_rows = 10
    for _ in range(20):
        eng.tick({"a": pa.table({"id": pa.array([None] * 3, pa.int64()), "x": [1.0] * 3})})
    assert eng.dead_letters.count == 60
    assert 10 <= sum(b.num_rows for b in eng.dead_letters.recent) < 13
