"""Scenario engines against their slow reference models: every emitted row of every tick and
the final state of every agent, on random seeds and shapes."""

import pytest
from hypothesis import given
from hypothesis import strategies as st
from vecswim.scenarios import engines, pollution, setup

import vecswim.engine as engine_mod
from tests.helpers import TickCapture, canon_ref, canon_rows, final_state_matches


def run_both(mod, gen, ticks, sizes):
    eng = mod.build_engine(gen.agents)
    ref = mod.Reference(gen) if mod is pollution else mod.Reference()
    setup(eng, gen)
    cap = TickCapture(eng)
    for t in range(ticks):
        batches = gen.make(sizes[t % len(sizes)])
        stats = eng.tick(batches)
        expected = ref.tick(batches)
        got = cap.take()
        assert stats.tick == t + 1
        for at, rows in expected.items():
            key = eng.types[at].key
            assert canon_rows(got.get(at, []), key) == canon_ref(rows), f"tick {t + 1} {at}"
    return eng, ref


@given(
    seed=st.integers(0, 2**32 - 1),
    agents=st.integers(1, 400),
    ticks=st.integers(1, 12),
    sizes=st.lists(st.integers(0, 700), min_size=1, max_size=4),
    relink=st.sampled_from([0.0, 0.01, 0.2]),
    period=st.sampled_from([3.0, 50.0, 500.0]),
)
def test_engines_matches_reference(seed, agents, ticks, sizes, relink, period):
    gen = engines.Generator(
        agents, seed=seed, relink=relink, period=period, fleets=max(1, agents // 37)
    )
    eng, ref = run_both(engines, gen, ticks, sizes)
    final_state_matches(
        eng, ref.engines, "engine", ["engine_temp", "fan_temp", "coolant_vol", "status"]
    )
    final_state_matches(
        eng, ref.fleets, "fleet", ["engines", "mean_engine_temp", "max_engine_temp", "red_engines"]
    )


@given(
    seed=st.integers(0, 2**32 - 1),
    agents=st.integers(1, 3000),
    ticks=st.integers(1, 10),
    sizes=st.lists(st.integers(0, 900), min_size=1, max_size=4),
)
def test_pollution_matches_reference(seed, agents, ticks, sizes):
    gen = pollution.Generator(agents, seed=seed)
    eng, ref = run_both(pollution, gen, ticks, sizes)
    final_state_matches(eng, ref.sensors, "sensor", ["pm25", "nox", "level", "status", "trend"])
    final_state_matches(
        eng,
        ref.regions,
        "region",
        ["sensors", "mean_level", "max_level", "red_sensors", "city_mean_level"],
    )
    final_state_matches(
        eng, ref.cities, "city", ["regions", "mean_level", "max_level", "red_sensors"]
    )


@pytest.mark.parametrize("mod", [engines, pollution])
def test_locality_ordering_path_matches_reference(mod, monkeypatch):
    """Large tables sort each batch by row region; force that path on a small table."""
    monkeypatch.setattr(engine_mod, "_LOCALITY_MIN_ROWS", 0)
    gen = mod.Generator(5000, seed=7)
    run_both(mod, gen, 8, [3000, 1500, 5000])


@pytest.mark.slow
def test_engines_large_run_matches_reference():
    gen = engines.Generator(50_000, seed=3, relink=0.01, period=20.0)
    eng, ref = run_both(engines, gen, 6, [100_000, 20_000])
    final_state_matches(
        eng, ref.fleets, "fleet", ["engines", "mean_engine_temp", "max_engine_temp", "red_engines"]
    )
