"""pollution: PM2.5 / NOx sensors -> smoothed level, trend, status -> regions -> cities.

Agent types: ``sensor`` (pm25, nox, level = EWMA of pm25, trend = smoothed slope of the level
from a custom kernel, status red above 35 / green below 30 on the level), ``region`` (sensors,
mean/max level, red sensors, and the city's mean level broadcast down) and ``city`` (regions,
mean of region means, max level, red sensors). Sensors report their region in every event;
regions are linked to cities once, in bulk, at setup (``Engine.set_links``).
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
from vecswim.kernels.models import trend
from vecswim.scenarios._common import emit, fixed_sum, quantize, scramble, unit

import vecswim as vs

NAME = "pollution"
DESCRIPTION = "air-quality sensors -> smoothed level and trend -> region -> city"
ALPHA = 0.2
BETA = 0.1
RED_ABOVE = 35.0
GREEN_BELOW = 30.0

SENSOR = vs.AgentType(
    "sensor",
    key="sensor_id",
    columns=[
        vs.Column("pm25", "float32", vs.latest("pm25")),
        vs.Column("nox", "float32", vs.latest("nox"), emit=2.0),
        vs.Column("level", "float32", vs.ewma("pm25", alpha=ALPHA), emit=1.0),
        vs.Column(
            "status", "uint8", vs.hysteresis(vs.state("level"), RED_ABOVE, GREEN_BELOW), emit=True
        ),
        vs.Column("trend", "float32", initial=0.0, emit=0.25),
        vs.Column("last_level", "float32"),
    ],
    kernels=[vs.custom(trend, [vs.state("level")], ["last_level", "trend"], [BETA])],
)
REGION = vs.AgentType(
    "region",
    key="region_id",
    columns=[
        vs.Column("sensors", "int64", emit=True),
        vs.Column("mean_level", "float64", emit=0.5),
        vs.Column("max_level", "float32", emit=0.5),
        vs.Column("red_sensors", "int64", emit=True),
        vs.Column("city_mean_level", "float64", emit=0.5),
    ],
)
CITY = vs.AgentType(
    "city",
    key="city_id",
    columns=[
        vs.Column("regions", "int64", emit=True),
        vs.Column("mean_level", "float64", emit=0.5),
        vs.Column("max_level", "float32", emit=0.5),
        vs.Column("red_sensors", "int64", emit=True),
    ],
)
SENSOR_REGION = vs.Link(
    "sensor_region",
    child="sensor",
    parent="region",
    via="region_id",
    aggregates={
        "sensors": vs.agg.count(),
        "mean_level": vs.agg.mean("level"),
        "max_level": vs.agg.max("level"),
        "red_sensors": vs.agg.sum("status"),
    },
)
REGION_CITY = vs.Link(
    "region_city",
    child="region",
    parent="city",
    aggregates={
        "regions": vs.agg.count(),
        "mean_level": vs.agg.mean("mean_level"),
        "max_level": vs.agg.max("max_level"),
        "red_sensors": vs.agg.sum("red_sensors"),
    },
    broadcast={"city_mean_level": "mean_level"},
)

# The agent type the generator addresses events to.
EVENT_TYPE = "sensor"
AGENT_TYPES = (SENSOR, REGION, CITY)
LINKS = (SENSOR_REGION, REGION_CITY)


def regions_for(agents: int) -> int:
    return max(1, agents // 500)


def cities_for(agents: int) -> int:
    return max(1, regions_for(agents) // 20)


def build_engine(agents: int) -> vs.Engine:
    """An engine for this scenario sized for ``agents`` sensors (call ``Generator.setup``)."""
    return vs.Engine(
        AGENT_TYPES,
        LINKS,
        capacity={"sensor": agents, "region": regions_for(agents), "city": cities_for(agents)},
    )


class Generator:
    """Seeded readings for ``agents`` sensors; sensor i is in region i % R, region r in city
    r % C. Each sensor has a stable base level (5..55); readings add noise, quantized to 1/64.
    ``setup(engine)`` links all regions to their cities (applied in the next tick)."""

    def __init__(self, agents: int, seed: int = 0) -> None:
        self.agents = agents
        self.regions = regions_for(agents)
        self.cities = cities_for(agents)
        self.rng = np.random.default_rng(seed)

    def region_ids(self, r: np.ndarray) -> np.ndarray:
        return 2_000_000_000 + np.asarray(r, np.int64)

    def city_ids(self, c: np.ndarray) -> np.ndarray:
        return 3_000_000_000 + np.asarray(c, np.int64)

    def setup(self, engine: vs.Engine) -> None:
        r = np.arange(self.regions)
        engine.set_links("region_city", self.region_ids(r), self.city_ids(r % self.cities))

    def make(self, n: int) -> dict[str, pa.RecordBatch]:
        """``n`` readings from uniformly random sensors."""
        return self.make_for(self.rng.integers(0, self.agents, n))

    def make_for(self, i: np.ndarray) -> dict[str, pa.RecordBatch]:
        """One reading for each sensor index in ``i`` (in that order)."""
        rng = self.rng
        n = len(i)
        base = 5.0 + 50.0 * unit(i, 3)
        batch = pa.RecordBatch.from_pydict(
            {
                "sensor_id": scramble(i, 4),
                "pm25": quantize(np.maximum(base + rng.normal(0.0, 6.0, n), 0.0)),
                "nox": quantize(np.maximum(0.8 * base + rng.normal(0.0, 5.0, n), 0.0)),
                "region_id": self.region_ids(i % self.regions),
            }
        )
        return {"sensor": batch}


def _f32(x: float) -> float:
    return float(np.float32(x))


class Reference:
    """Slow model: dicts, events one by one, regions and cities recomputed from scratch."""

    def __init__(self, generator: Generator) -> None:
        self.sensors: dict[int, dict] = {}
        self.regions: dict[int, dict] = {}
        self.cities: dict[int, dict] = {}
        self.region_city: dict[int, int] = {}
        self.last: dict[str, dict] = {"sensor": {}, "region": {}, "city": {}}
        self.tick_id = 0
        r = np.arange(generator.regions)
        for rk, ck in zip(
            generator.region_ids(r).tolist(),
            generator.city_ids(r % generator.cities).tolist(),
            strict=True,
        ):
            self.region_city[rk] = ck

    def tick(self, batches: dict[str, pa.RecordBatch]) -> dict[str, dict]:
        self.tick_id += 1
        for ev in batches["sensor"].to_pylist() if "sensor" in batches else []:
            s = self.sensors.setdefault(
                ev["sensor_id"],
                {
                    "pm25": math.nan,
                    "nox": math.nan,
                    "level": math.nan,
                    "status": 0,
                    "trend": 0.0,
                    "last_level": math.nan,
                    "region": None,
                },
            )
            s["pm25"] = _f32(ev["pm25"])
            s["nox"] = _f32(ev["nox"])
            lv = s["level"]
            s["level"] = s["pm25"] if math.isnan(lv) else _f32(lv + ALPHA * (s["pm25"] - lv))
            if s["status"] == 0 and s["level"] > RED_ABOVE:
                s["status"] = 1
            elif s["status"] == 1 and s["level"] < GREEN_BELOW:
                s["status"] = 0
            if not math.isnan(s["last_level"]):
                s["trend"] = _f32(s["trend"] + BETA * ((s["level"] - s["last_level"]) - s["trend"]))
            s["last_level"] = s["level"]
            s["region"] = ev["region_id"]
            self.regions.setdefault(ev["region_id"], {})
        for rk in self.region_city:
            self.regions.setdefault(rk, {})
        for ck in self.region_city.values():
            self.cities.setdefault(ck, {})
        by_region: dict[int, list[dict]] = {r: [] for r in self.regions}
        for s in self.sensors.values():
            by_region[s["region"]].append(s)
        for rk, ss in by_region.items():
            self.regions[rk] = _summary(ss, "level", "level", "status", "sensors")
        by_city: dict[int, list[dict]] = {c: [] for c in self.cities}
        for rk, reg in self.regions.items():
            if rk in self.region_city:
                by_city[self.region_city[rk]].append(reg)
        for ck, rs in by_city.items():
            self.cities[ck] = _summary(rs, "mean_level", "max_level", "red_sensors", "regions")
        for rk, reg in self.regions.items():
            ck = self.region_city.get(rk)
            reg["city_mean_level"] = self.cities[ck]["mean_level"] if ck is not None else math.nan
        return {
            "sensor": emit(
                self.sensors,
                self.last["sensor"],
                {"nox": 2.0, "level": 1.0, "status": 0, "trend": 0.25},
                self.tick_id,
            ),
            "region": emit(
                self.regions,
                self.last["region"],
                {
                    "sensors": 0,
                    "mean_level": 0.5,
                    "max_level": 0.5,
                    "red_sensors": 0,
                    "city_mean_level": 0.5,
                },
                self.tick_id,
            ),
            "city": emit(
                self.cities,
                self.last["city"],
                {"regions": 0, "mean_level": 0.5, "max_level": 0.5, "red_sensors": 0},
                self.tick_id,
            ),
        }


def _summary(children: list[dict], mean_of: str, max_of: str, red_of: str, count: str) -> dict:
    means = [c[mean_of] for c in children if math.isfinite(c[mean_of])]
    maxes = [c[max_of] for c in children if math.isfinite(c[max_of])]
    return {
        count: len(children),
        "mean_level": fixed_sum(means) / 2.0**16 / len(means) if means else math.nan,
        "max_level": _f32(max(maxes)) if maxes else math.nan,
        "red_sensors": sum(c[red_of] for c in children),
    }
