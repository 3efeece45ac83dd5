"""asv benchmarks (run with ``asv run --python=same``; see bench/RESULTS.md).

Workload: the ``engines`` scenario with every agent created in set-up; a tick applies one
pre-generated batch of ``BATCH`` events. Set-up is untimed.
"""

import time

import numpy as np
from vecswim.scenarios import engines

from bench.common import loaded_engines
from vecswim.table import StateTable

BATCH = 200_000


class EnginesTick:
    params = (1_000_000, 10_000_000)
    param_names = ("agents",)
    timeout = 900
    number = 1
    rounds = 1
    repeat = (1, 3, 30.0)
    warmup_time = 0

    def setup(self, agents):
        self.engine, gen = loaded_engines(agents)
        self.batches = [gen.make(BATCH) for _ in range(12)]
        for b in self.batches[:2]:
            self.engine.tick(b)
        self.next = 2

    def _batch(self):
        b = self.batches[self.next % len(self.batches)]
        self.next += 1
        return b

    def time_tick_200k_events(self, agents):
        self.engine.tick(self._batch())

    def time_empty_tick(self, agents):
        self.engine.tick()

    time_empty_tick.number = 1000

    def track_events_per_second(self, agents):
        t0 = time.perf_counter()
        for _ in range(8):
            self.engine.tick(self._batch())
        return 8 * BATCH / (time.perf_counter() - t0)

    track_events_per_second.unit = "events/s"

    def track_bytes_per_agent(self, agents):
        return self.engine.nbytes / self.engine.agents

    track_bytes_per_agent.unit = "bytes"

    def track_emission_ms(self, agents):
        return self.engine.tick(self._batch()).phases["emit"] * 1e3

    track_emission_ms.unit = "ms"

    def time_sql_group_by_status(self, agents):
        self.engine.sql("SELECT status, count(*), avg(engine_temp) FROM engine GROUP BY status")


class PollutionLinkLevels:
    """Propagation cost per link level (sensor -> region -> city) for ticks of 200k events."""

    params = (("sensor_region", "region_city"),)
    param_names = ("link",)
    timeout = 600
    number = 1
    rounds = 1
    repeat = (1, 3, 30.0)
    warmup_time = 0

    def setup(self, link):
        from vecswim.scenarios import pollution

        agents = 1_000_000
        gen = pollution.Generator(agents)
        self.engine = pollution.build_engine(agents)
        gen.setup(self.engine)
        for s in range(0, agents, BATCH):
            self.engine.tick(gen.make_for(np.arange(s, min(agents, s + BATCH))))
        self.batches = [gen.make(BATCH) for _ in range(4)]

    def track_propagation_ms(self, link):
        stats = [self.engine.tick(b) for b in self.batches]
        return 1e3 * sum(s.phases[f"link:{link}"] for s in stats) / len(stats)

    track_propagation_ms.unit = "ms"


class KeyIndex:
    params = (1_000_000, 10_000_000)
    param_names = ("agents",)
    timeout = 600
    number = 1
    rounds = 1
    repeat = (1, 5, 20.0)
    warmup_time = 0

    def setup(self, agents):
        gen = engines.Generator(agents)
        self.keys = gen.engine_ids(np.arange(agents))
        self.table = StateTable(engines.ENGINE, agents)
        for s in range(0, agents, 1_000_000):
            self.table.resolve(self.keys[s : s + 1_000_000])
        rng = np.random.default_rng(0)
        self.known = self.keys[rng.integers(0, agents, BATCH)]
        self.unknown = gen.engine_ids(np.arange(agents, agents + BATCH))

    def time_lookup_or_insert_known_200k(self, agents):
        self.table.resolve(self.known)

    def time_insert_new_200k(self, agents):
        StateTable(engines.ENGINE).resolve(self.unknown)
