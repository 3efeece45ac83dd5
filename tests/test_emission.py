"""Emission: deadband edges, statuses, touched-but-unchanged rows, new agents, NaN."""

import math

import pyarrow as pa

import vecswim as vs
from tests.helpers import TickCapture

T = vs.AgentType(
    "s",
    key="id",
    columns=[
        vs.Column("temp", "float32", vs.latest("temp"), emit=0.5),
        vs.Column("status", "uint8", vs.hysteresis("temp", up=110, down=100), emit=True),
        vs.Column("hidden", "float32", vs.latest("other")),
        vs.Column("exact", "float64", vs.latest("exact"), emit=0.0),
    ],
)


def engine():
    eng = vs.Engine([T])
    return eng, TickCapture(eng)


def send(eng, cap, temp, other=0.0, exact=0.0, key=1):
    eng.tick({"s": pa.table({"id": [key], "temp": [temp], "other": [other], "exact": [exact]})})
    return cap.take().get("s", [])


def test_new_agent_is_emitted_once_then_only_beyond_deadband():
    eng, cap = engine()
    assert send(eng, cap, 90.0) == [{"id": 1, "tick": 1, "temp": 90.0, "status": 0, "exact": 0.0}]
    assert send(eng, cap, 90.5) == []  # exactly the deadband: not beyond it
    assert send(eng, cap, 89.5) == []  # 0.5 from the last emitted 90.0, not from 90.5
    rows = send(eng, cap, 90.515625)  # 0.515625 > 0.5 from 90.0
    assert [(r["tick"], r["temp"]) for r in rows] == [(4, 90.515625)]
    assert send(eng, cap, 90.25) == []  # within 0.5 of the new reference 90.515625


def test_deadband_reference_moves_only_on_emission():
    eng, cap = engine()
    send(eng, cap, 90.0)
    emitted = [bool(send(eng, cap, t)) for t in (90.25, 90.5, 90.75, 90.25)]
    # 90.25, 90.5: within 0.5 of 90.0; 90.75: beyond; 90.25: exactly 0.5 from 90.75 -> no
    assert emitted == [False, False, True, False]


def test_status_red_is_not_re_emitted_and_touch_without_change_is_silent():
    eng, cap = engine()
    send(eng, cap, 90.0)
    assert [r["status"] for r in send(eng, cap, 120.0)] == [1]
    assert send(eng, cap, 120.25) == []  # still red, temp within deadband
    assert send(eng, cap, 120.25, other=5.0) == []  # only a non-emitted column moved
    assert send(eng, cap, 120.25) == []  # same values again
    assert [r["status"] for r in send(eng, cap, 95.0)] == [0]


def test_zero_deadband_means_any_change_and_nan_transitions():
    eng, cap = engine()
    send(eng, cap, 90.0, exact=1.0)
    assert send(eng, cap, 90.0, exact=1.0) == []
    assert [r["exact"] for r in send(eng, cap, 90.0, exact=1.0000000001)] == [1.0000000001]


def test_nan_to_value_is_a_change():
    t = vs.AgentType(
        "m",
        key="id",
        columns=[
            vs.Column("peak", "float32", vs.max("x"), emit=100.0),
            vs.Column("n", "int64", vs.count()),
        ],
    )
    eng = vs.Engine([t])
    cap = TickCapture(eng)
    eng.tick({"m": pa.table({"id": [1], "x": [1.0]})})
    first = cap.take()["m"]
    assert first[0]["peak"] == 1.0 and "n" not in first[0]
    eng.tick({"m": pa.table({"id": [1], "x": [2.0]})})
    assert cap.take() == {}
    assert not math.isnan(eng.state("m").column("peak")[0].as_py())


def test_one_row_per_agent_per_tick_with_latest_values():
    eng, cap = engine()
    eng.tick(
        {
            "s": pa.table(
                {
                    "id": [1, 2, 1, 1],
                    "temp": [90.0, 50.0, 115.0, 99.0],
                    "other": [0.0] * 4,
                    "exact": [0.0] * 4,
                }
            )
        }
    )
    rows = sorted(cap.take()["s"], key=lambda r: r["id"])
    # agent 1 went red at 115 and green again at 99 within the tick: emitted once, as it ends
    assert rows == [
        {"id": 1, "tick": 1, "temp": 99.0, "status": 0, "exact": 0.0},
        {"id": 2, "tick": 1, "temp": 50.0, "status": 0, "exact": 0.0},
    ]
