"""The ``vecswim`` command line.

Every command has ``--help``. A bad argument prints one line (``vecswim: error: ...``) and
exits with code 2; no traceback reaches the user.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click
import numpy as np
import psutil

from vecswim import scenarios as _scenarios
from vecswim.sinks import NDJSONSink, ParquetSink
from vecswim.sources import GeneratorSource


class _Status:
    """Collects tick stats and prints a status line about once a second."""

    def __init__(self, engine, quiet: bool) -> None:
        self.engine = engine
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.start = time.perf_counter()
        self.last_print = self.start
        self.window: list[float] = []
        self.all: list[float] = []
        self.window_events = 0
        self.emitted = 0

    def __call__(self, stats) -> None:
        self.window.append(stats.seconds)
        self.all.append(stats.seconds)
        self.window_events += stats.events
        self.emitted += stats.emitted
        now = time.perf_counter()
        if now - self.last_print >= 1.0:
            self.print_line(now)

    def print_line(self, now: float) -> None:
        if not self.quiet and self.window:
            e = self.engine
            ms = np.array(self.window) * 1e3
            rate = self.window_events / (now - self.last_print)
            line = (
                f"t={now - self.start:5.1f}s  events/s={rate:,.0f}"
                f"  tick p50={np.percentile(ms, 50):.2f}ms p99={np.percentile(ms, 99):.2f}ms"
                f"  agents={e.agents:,}  emitted={self.emitted:,}"
                f"  dead={e.totals['dead_letters']:,}  bytes/agent={_per_agent(e):.1f}"
            )
            click.echo(("\r" + line) if self.tty else line, err=True, nl=not self.tty)
        self.window = []
        self.window_events = 0
        self.last_print = now

    def summary(self) -> str:
        e = self.engine
        wall = time.perf_counter() - self.start
        ms = np.array(self.all or [0.0]) * 1e3
        busy = float(np.sum(ms)) / 1e3
        lines = [
            f"ticks            {e.totals['ticks']:,}",
            f"events           {e.totals['events']:,}  ({e.totals['events'] / wall:,.0f}/s wall,"
            f" {e.totals['events'] / busy if busy else 0:,.0f}/s in ticks)",
            f"dead letters     {e.totals['dead_letters']:,}",
            f"emitted rows     {e.totals['emitted']:,}",
            f"tick ms          p50 {np.percentile(ms, 50):.2f}  p99 {np.percentile(ms, 99):.2f}"
            f"  max {ms.max():.2f}",
            f"agents           {e.agents:,}"
            + "".join(f"  {n}={t.n:,}" for n, t in e.tables.items()),
            f"state bytes      {e.nbytes:,}  ({_per_agent(e):.1f} bytes/agent)",
            f"process RSS      {psutil.Process().memory_info().rss / 2**20:,.0f} MiB",
        ]
        return "\n".join(lines)


def _per_agent(engine) -> float:
    return engine.nbytes / max(engine.agents, 1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vecswim")
def cli() -> None:
    """vecswim: stateful streaming agents as columnar rows, updated by numba kernels in ticks."""


@cli.command("scenarios")
def list_scenarios() -> None:
    """List the packaged scenarios."""
    for name, mod in sorted(_scenarios.SCENARIOS.items()):
        types = ", ".join(at.name for at in mod.AGENT_TYPES)
        click.echo(f"{name:<12} {mod.DESCRIPTION}  [agent types: {types}]")


@cli.command("run")
@click.argument("scenario", type=click.Choice(sorted(_scenarios.SCENARIOS)), metavar="SCENARIO")
@click.option(
    "--agents",
    type=click.IntRange(min=1),
    default=1_000_000,
    show_default=True,
    help="Agents the generator addresses (the main agent type).",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0),
    default=1_000_000,
    show_default=True,
    help="Events per second from the generator; 0 = as fast as the engine goes.",
)
@click.option(
    "--seconds",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    help="How long to run.",
)
@click.option(
    "--events",
    "total_events",
    type=click.IntRange(min=1),
    default=None,
    help="Stop after this many events (with --rate 0: a reproducible run).",
)
@click.option(
    "--tick-ms",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    help="A tick closes after this long ...",
)
@click.option(
    "--max-events",
    type=click.IntRange(min=1),
    default=200_000,
    show_default=True,
    help="... or at this many events, whichever comes first.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Generator seed.")
@click.option(
    "--emit",
    "emit_path",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    help="Write emissions: PATH.parquet (one file per agent type: "
    "PATH-stem.<agent type>.parquet), PATH.ndjson, or '-' for NDJSON on stdout.",
)
@click.option("--quiet", is_flag=True, help="No live status line, only the summary.")
def run(
    scenario: str,
    agents: int,
    rate: float,
    seconds: float,
    total_events: int | None,
    tick_ms: float,
    max_events: int,
    seed: int,
    emit_path: str | None,
    quiet: bool,
) -> None:
    """Run SCENARIO on its built-in generator (no broker needed).

    Prints a live status line (events/s, tick p50/p99, agents, emitted rows, bytes/agent)
    and a summary at the end.
    """
    mod = _scenarios.get(scenario)
    _scenarios.warm_up(mod)
    engine = mod.build_engine(agents)
    gen = mod.Generator(agents, seed=seed)
    _scenarios.setup(mod, engine, gen)
    sink = None
    if emit_path is not None:
        suffix = Path(emit_path).suffix.lower()
        if emit_path == "-" or suffix in (".ndjson", ".jsonl"):
            sink = NDJSONSink(emit_path)
        elif suffix == ".parquet":
            sink = ParquetSink(emit_path)
        else:
            raise click.BadParameter(
                "must end in .parquet or .ndjson, or be '-'", param_hint="--emit"
            )
        engine.add_sink(sink)
    status = _Status(engine, quiet)
    click.echo(
        f"vecswim: running {scenario} with {agents:,} agents at "
        f"{'max' if rate == 0 else f'{rate:,.0f}'} events/s for {seconds:g}s",
        err=True,
    )
    engine.run(
        GeneratorSource(gen.make, rate=rate, total=total_events),
        max_events=max_events,
        tick_ms=tick_ms,
        seconds=seconds,
        on_tick=status,
    )
    if status.tty and not quiet:
        click.echo("", err=True)
    click.echo(status.summary(), err=True)
    if isinstance(sink, ParquetSink):
        for at, p in sink.paths.items():
            click.echo(f"emissions of {at}: {p}", err=True)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: runs the CLI, turning usage errors into one line and exit 2."""
    try:
        cli.main(args=argv, prog_name="vecswim", standalone_mode=False)
    except click.exceptions.UsageError as e:
        click.echo(f"vecswim: error: {' '.join(e.format_message().split())}", err=True)
        return 2
    except click.exceptions.Abort:
        click.echo("vecswim: aborted", err=True)
        return 130
    except KeyboardInterrupt:
        return 130
    except click.exceptions.Exit as e:
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
