"""Packaged scenarios: agent types, links, kernels wiring, a seeded generator and a slow
reference model each. ``SCENARIOS[name]`` is the scenario's module."""

from types import ModuleType

from vecswim.scenarios import engines, pollution

SCENARIOS: dict[str, ModuleType] = {m.NAME: m for m in (engines, pollution)}


def get(name: str) -> ModuleType:
    """The scenario module called ``name``; KeyError lists the known ones."""
    try:
        return SCENARIOS[name]
    except KeyError:
        raise KeyError(
            f"unknown scenario {name!r}; known: {', '.join(sorted(SCENARIOS))}"
        ) from None


def setup(engine, generator) -> None:
    """Run the generator's one-off setup (e.g. static links), if it has one."""
    if hasattr(generator, "setup"):
        generator.setup(engine)


def warm_up(scenario: ModuleType) -> None:
    """Run a few ticks on a small throwaway engine so every kernel the scenario uses is
    compiled or loaded from numba's cache before timing starts."""
    engine = scenario.build_engine(1 << 17)
    gen = scenario.Generator(1 << 17, seed=1)
    setup(engine, gen)
    for n in (1 << 17, 4096):
        engine.tick(gen.make(n))
    engine.tick()
