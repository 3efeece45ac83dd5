"""engines: vehicle engine telemetry -> per-engine status with hysteresis -> fleet aggregates.

Agent types: ``engine`` (engine_temp, fan_temp, coolant_vol, status green=0/red=1: red above
110 degrees, green again below 100) and ``fleet`` (engines, mean/max engine_temp, red
engines). Each event carries the engine's fleet; an engine reassigned to another fleet is
re-linked by that event. Deadbands discard noise: temperatures are emitted when they moved
more than 0.5 degrees, coolant more than 0.1 litre, status on any change.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
from vecswim.scenarios._common import emit, fixed_sum, quantize, scramble, unit

import vecswim as vs

NAME = "engines"
DESCRIPTION = "vehicle engines -> status with hysteresis -> fleet aggregates"
RED_ABOVE = 110.0
GREEN_BELOW = 100.0

ENGINE = vs.AgentType(
    "engine",
    key="engine_id",
    columns=[
        vs.Column("engine_temp", "float32", vs.latest("engine_temp"), emit=0.5),
        vs.Column("fan_temp", "float32", vs.latest("fan_temp"), emit=0.5),
        vs.Column("coolant_vol", "float32", vs.latest("coolant_vol"), emit=0.1),
        vs.Column(
            "status",
            "uint8",
            vs.hysteresis("engine_temp", up=RED_ABOVE, down=GREEN_BELOW),
            emit=True,
        ),
    ],
)
FLEET = vs.AgentType(
    "fleet",
    key="fleet_id",
    columns=[
        vs.Column("engines", "int64", emit=True),
        vs.Column("mean_engine_temp", "float64", emit=0.5),
        vs.Column("max_engine_temp", "float32", emit=0.5),
        vs.Column("red_engines", "int64", emit=True),
    ],
)
ENGINE_FLEET = vs.Link(
    "engine_fleet",
    child="engine",
    parent="fleet",
    via="fleet_id",
    aggregates={
        "engines": vs.agg.count(),
        "mean_engine_temp": vs.agg.mean("engine_temp"),
        "max_engine_temp": vs.agg.max("engine_temp"),
        "red_engines": vs.agg.sum("status"),
    },
)

# The agent type the generator addresses events to.
EVENT_TYPE = "engine"
AGENT_TYPES = (ENGINE, FLEET)
LINKS = (ENGINE_FLEET,)


def build_engine(agents: int) -> vs.Engine:
    """An engine for this scenario with tables sized for ``agents`` engines."""
    return vs.Engine(AGENT_TYPES, LINKS, capacity={"engine": agents, "fleet": fleets_for(agents)})


def fleets_for(agents: int) -> int:
    return max(1, agents // 1000)


class Generator:
    """Seeded engine telemetry for ``agents`` engines in ``fleets`` fleets.

    Each engine has a stable base temperature (70..115) and drifts around it in a slow cycle
    of +-10 degrees over ``period`` updates, so a share of engines cross the status thresholds
    back and forth; readings add small sensor noise and are quantized to 1/64, so most updates
    stay inside the deadbands (noise that must not be emitted). ``relink`` is the share of
    events that report a different, random fleet (a reassignment).
    ``make(n)`` returns ``{"engine": RecordBatch}`` with ``n`` events; vectorized numpy.
    """

    def __init__(
        self,
        agents: int,
        seed: int = 0,
        fleets: int | None = None,
        relink: float = 0.001,
        period: float = 500.0,
    ) -> None:
        self.agents = agents
        self.fleets = fleets or fleets_for(agents)
        self.relink = relink
        self.period = period
        self.produced = 0
        self.rng = np.random.default_rng(seed)

    def engine_ids(self, i: np.ndarray) -> np.ndarray:
        return scramble(i, 1)

    def fleet_ids(self, f: np.ndarray) -> np.ndarray:
        return 1_000_000_000 + np.asarray(f, np.int64)

    def make(self, n: int) -> dict[str, pa.RecordBatch]:
        """``n`` events for uniformly random engines."""
        return self.make_for(self.rng.integers(0, self.agents, n))

    def make_for(self, i: np.ndarray) -> dict[str, pa.RecordBatch]:
        """One event for each engine index in ``i`` (in that order)."""
        rng = self.rng
        n = len(i)
        clock = (self.produced + np.arange(n)) / (self.agents * self.period)
        self.produced += n
        cycle = np.sin(2.0 * np.pi * (clock + unit(i, 5)))
        base = 70.0 + 45.0 * unit(i, 2) + 10.0 * cycle
        fleet = i % self.fleets
        if self.relink > 0:
            moved = rng.random(n) < self.relink
            fleet[moved] = rng.integers(0, self.fleets, int(moved.sum()))
        batch = pa.RecordBatch.from_pydict(
            {
                "engine_id": self.engine_ids(i),
                "engine_temp": quantize(base + rng.normal(0.0, 0.2, n)),
                "fan_temp": quantize(0.6 * base + rng.normal(0.0, 0.2, n)),
                "coolant_vol": quantize(8.0 + 0.2 * cycle + rng.normal(0.0, 0.02, n)),
                "fleet_id": self.fleet_ids(fleet),
            }
        )
        return {"engine": batch}


class Reference:
    """The slow, obviously-correct model: a dict per agent, events applied one by one, fleet
    aggregates recomputed from scratch every tick, every agent checked for emission."""

    def __init__(self) -> None:
        self.engines: dict[int, dict] = {}
        self.fleets: dict[int, dict] = {}
        self.last: dict[str, dict] = {"engine": {}, "fleet": {}}
        self.tick_id = 0

    def tick(self, batches: dict[str, pa.RecordBatch]) -> dict[str, dict]:
        self.tick_id += 1
        for ev in batches["engine"].to_pylist() if "engine" in batches else []:
            e = self.engines.setdefault(
                ev["engine_id"],
                {
                    "engine_temp": math.nan,
                    "fan_temp": math.nan,
                    "coolant_vol": math.nan,
                    "status": 0,
                    "fleet": None,
                },
            )
            for f in ("engine_temp", "fan_temp", "coolant_vol"):
                e[f] = float(np.float32(ev[f]))
            if e["status"] == 0 and e["engine_temp"] > RED_ABOVE:
                e["status"] = 1
            elif e["status"] == 1 and e["engine_temp"] < GREEN_BELOW:
                e["status"] = 0
            e["fleet"] = ev["fleet_id"]
            self.fleets.setdefault(ev["fleet_id"], {})
        members: dict[int, list[dict]] = {f: [] for f in self.fleets}
        for e in self.engines.values():
            members[e["fleet"]].append(e)
        for f, es in members.items():
            temps = [e["engine_temp"] for e in es if math.isfinite(e["engine_temp"])]
            self.fleets[f] = {
                "engines": len(es),
                "mean_engine_temp": fixed_sum(temps) / 2.0**16 / len(temps) if temps else math.nan,
                "max_engine_temp": max(temps) if temps else math.nan,
                "red_engines": sum(e["status"] for e in es),
            }
        return {
            "engine": emit(
                self.engines,
                self.last["engine"],
                {"engine_temp": 0.5, "fan_temp": 0.5, "coolant_vol": 0.1, "status": 0},
                self.tick_id,
            ),
            "fleet": emit(
                self.fleets,
                self.last["fleet"],
                {"engines": 0, "mean_engine_temp": 0.5, "max_engine_temp": 0.5, "red_engines": 0},
                self.tick_id,
            ),
        }
