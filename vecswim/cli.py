"""The ``vecswim`` command line.

Every command has ``--help``. A bad argument prints one line (``vecswim: error: ...``) and
exits with code 2; no traceback reaches the user.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import click
import numpy as np
import psutil

from vecswim import scenarios as _scenarios
from vecswim.sinks import NDJSONSink, ParquetSink
from vecswim.sources import GeneratorSource

# Names of pulsar_io.SUBSCRIPTION_TYPES, kept here so --help never imports the Pulsar client.
SUBSCRIPTION_TYPES = ["exclusive", "failover", "key_shared", "shared"]


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


def _pulsar_url(ctx, param, value: str | None) -> str | None:
    """--pulsar: a Pulsar service URL, checked before anything starts."""
    if value is None:
        return value
    scheme, sep, rest = value.partition("://")
    if scheme not in ("pulsar", "pulsar+ssl", "http", "https") or not sep or not rest.strip("/"):
        raise click.BadParameter(
            f"{value!r} is not a Pulsar service URL (pulsar://HOST:6650 or pulsar+ssl://HOST:6651)"
        )
    return value


def _check_output(path: str | None, option: str, suffixes: tuple[str, ...] = ()) -> None:
    """Fail before the engine starts on an output file that could not be written: a wrong
    suffix, a missing directory, or a directory we cannot create files in."""
    if path is None or path == "-":
        return
    p = Path(path)
    if suffixes and p.suffix.lower() not in suffixes:
        raise click.BadParameter(
            f"must end in {' or '.join(suffixes)}, or be '-'", param_hint=f"'{option}'"
        )
    _check_dir(p.parent, option, create=False)


def _check_dir(directory: str | Path | None, option: str, create: bool = True) -> None:
    """``directory`` exists (or is created) and accepts new files; else a usage error."""
    if directory is None:
        return
    d = Path(directory)
    try:
        if create:
            d.mkdir(parents=True, exist_ok=True)
        elif not d.is_dir():
            raise click.BadParameter(f"directory {d} does not exist", param_hint=f"'{option}'")
        with tempfile.TemporaryFile(dir=d, prefix=".vecswim-probe-"):
            pass
    except OSError as e:
        raise click.BadParameter(
            f"cannot write in {d} ({e.strerror or e})", param_hint=f"'{option}'"
        ) from None


class _PipeClosed(click.ClickException):
    """The reader of stdout went away; the run ends quietly (see ``main``)."""

    exit_code = 141


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        # click would turn a broken pipe into exit status 1; keep it apart for main()
        try:
            return super().invoke(ctx)
        except OSError as e:
            if _broken_pipe(e):
                raise _PipeClosed("stdout closed") from None
            raise


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
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
@click.option(
    "--pulsar",
    "service_url",
    default=None,
    metavar="URL",
    callback=_pulsar_url,
    help="Consume events from Pulsar at URL instead of the built-in generator.",
)
@click.option("--topic", "topics", multiple=True, help="Input topic (repeatable).")
@click.option("--topic-pattern", default=None, help="Input topics by regex instead of --topic.")
@click.option("--subscription", default="vecswim", show_default=True)
@click.option(
    "--subscription-type",
    type=click.Choice(SUBSCRIPTION_TYPES),
    default="exclusive",
    show_default=True,
)
@click.option(
    "--initial-position",
    type=click.Choice(["earliest", "latest"]),
    default="earliest",
    show_default=True,
)
@click.option(
    "--file",
    "files",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="Replay events of the scenario's event type from this Parquet, Arrow IPC or NDJSON "
    "file instead of the generator (repeatable; the run ends when they are exhausted).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["json", "arrow", "ndjson", "parquet"]),
    default=None,
    help="Input format. Pulsar payloads: json (default) or arrow. --file: parquet, arrow "
    "(IPC file or stream) or ndjson (= json); default by file suffix.",
)
@click.option(
    "--key-from",
    type=click.Choice(["payload", "message"]),
    default="payload",
    show_default=True,
    help="Agent key from a payload field or the message key.",
)
@click.option("--out-topic", default=None, help="Publish emissions to this topic.")
@click.option(
    "--out-format", type=click.Choice(["json", "arrow"]), default="json", show_default=True
)
@click.option("--dlq-topic", default=None, help="Dead-letter topic for bad messages.")
@click.option(
    "--idle-exit",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="With --pulsar: stop after this many seconds without events.",
)
@click.option("--auth-token", default=None, help="Pulsar token authentication.")
@click.option(
    "--tls-trust-certs",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="CA file for pulsar+ssl:// URLs.",
)
@click.option(
    "--sql-port",
    type=click.IntRange(0, 65535),
    default=7654,
    show_default=True,
    help="Serve SQL over HTTP on this port (0: any free port).",
)
@click.option(
    "--sql-bind",
    default="127.0.0.1",
    show_default=True,
    help="Address the SQL endpoint listens on.",
)
@click.option("--sql-token", default=None, help="Require 'Authorization: Bearer TOKEN'.")
@click.option(
    "--sql-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    help="Per-query time limit in seconds.",
)
@click.option(
    "--sql-max-rows",
    type=click.IntRange(min=1),
    default=100_000,
    show_default=True,
    help="Rows returned at most per query (the rest is cut, and flagged).",
)
@click.option(
    "--sql-threads",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="DuckDB threads per query (fewer: less pressure on ticks).",
)
@click.option(
    "--no-sql", is_flag=True, help="Do not serve SQL (nor the page, live lanes, metrics)."
)
@click.option(
    "--pg-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Also serve the SQL over the PostgreSQL wire protocol on this port (0: any free "
    "port), with the same bind address, limits and token (as the password).",
)
@click.option(
    "--no-live",
    is_flag=True,
    help="Do not serve live subscriptions (WARP, JSON WebSocket) on the SQL port.",
)
@click.option(
    "--checkpoint-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Checkpoint here, and resume from the newest valid checkpoint at start.",
)
@click.option(
    "--checkpoint-every",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    help="Seconds between checkpoints.",
)
@click.option(
    "--checkpoint-ticks",
    type=click.IntRange(min=1),
    default=None,
    help="Also checkpoint every this many ticks.",
)
@click.option(
    "--checkpoint-keep",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="Complete checkpoints kept; older ones are removed.",
)
@click.option(
    "--keep-journal",
    is_flag=True,
    help="Keep the whole tick journal (every tick's input boundary) in the checkpoint "
    "directory instead of what the kept checkpoints need.",
)
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
    service_url: str | None,
    topics: tuple[str, ...],
    topic_pattern: str | None,
    subscription: str,
    subscription_type: str,
    initial_position: str,
    fmt: str | None,
    files: tuple[str, ...],
    key_from: str,
    out_topic: str | None,
    out_format: str,
    dlq_topic: str | None,
    idle_exit: float | None,
    auth_token: str | None,
    tls_trust_certs: str | None,
    sql_port: int,
    sql_bind: str,
    sql_token: str | None,
    sql_timeout: float,
    sql_max_rows: int,
    sql_threads: int,
    no_sql: bool,
    no_live: bool,
    pg_port: int | None,
    checkpoint_dir: str | None,
    checkpoint_every: float,
    checkpoint_ticks: int | None,
    checkpoint_keep: int,
    keep_journal: bool,
) -> None:
    """Run SCENARIO on its built-in generator (no broker needed), or on events from Pulsar
    (--pulsar URL --topic T).

    Prints a live status line (events/s, tick p50/p99, agents, emitted rows, bytes/agent)
    and a summary at the end.
    """
    mod = _scenarios.get(scenario)
    _check_output(emit_path, "--emit", (".parquet", ".ndjson", ".jsonl"))
    _check_dir(checkpoint_dir, "--checkpoint-dir")
    if service_url is None:
        for name in ("topics", "topic_pattern", "out_topic", "dlq_topic", "idle_exit"):
            if locals()[name]:
                raise click.UsageError(f"--{name.replace('_', '-')} needs --pulsar")
    elif not topics and not topic_pattern:
        raise click.UsageError("--pulsar needs --topic or --topic-pattern")
    seconds = _file_options(files, fmt, service_url, seconds)
    _scenarios.warm_up(mod)
    engine = mod.build_engine(agents)
    gen = mod.Generator(agents, seed=seed)
    resumed = None
    if checkpoint_dir is not None:
        from vecswim import checkpoint

        try:
            resumed = checkpoint.restore(
                engine, checkpoint_dir, log=lambda m: click.echo(m, err=True)
            )
        except checkpoint.CheckpointError as e:
            raise click.ClickException(str(e)) from None
        if resumed is None:
            click.echo(f"vecswim: no checkpoint in {checkpoint_dir}, starting empty", err=True)
        else:
            click.echo(
                f"vecswim: resumed from checkpoint at tick {resumed['tick']:,} "
                f"({sum(resumed['agents'].values()):,} agents)",
                err=True,
            )
    if resumed is None:
        _scenarios.setup(engine, gen)
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
    if files:
        source = _file_source(engine, mod.EVENT_TYPE, files, fmt, resumed)
        what = f"events from {len(files)} file{'s' if len(files) > 1 else ''}"
    elif service_url is None:
        source = GeneratorSource(gen.make, rate=rate, total=total_events)
        what = f"{'max' if rate == 0 else f'{rate:,.0f}'} events/s from the generator"
    else:
        from vecswim import pulsar_io

        opts = _client_options(auth_token, tls_trust_certs)
        # Exactly-once output needs a replayable subscription and producer names that stay
        # the same across restarts (they live with the checkpoints).
        once = checkpoint_dir is not None and subscription_type in ("exclusive", "failover")
        producer = None
        if once:
            from vecswim import checkpoint

            producer = f"vecswim-{checkpoint.instance_id(checkpoint_dir)}"
        source = pulsar_io.PulsarSource(
            service_url,
            engine.types[mod.EVENT_TYPE],
            engine.event_fields(mod.EVENT_TYPE),
            topics=list(topics) if topics else None,
            topic_pattern=topic_pattern,
            subscription=subscription,
            subscription_type=subscription_type,
            initial_position=initial_position,
            fmt=fmt or "json",
            key_from=key_from,
            dlq_topic=dlq_topic,
            dlq_producer_name=producer and f"{producer}-deadletters",
            options=opts,
            resume=(resumed or {}).get("positions"),
            log=lambda m: click.echo(m, err=True),
        )
        engine.dead_letters.add_sink(source.dead_rows)
        if out_topic:
            try:
                out = pulsar_io.PulsarSink(
                    service_url,
                    out_topic,
                    out_format,
                    options=opts,
                    producer_name=producer and f"{producer}-emissions",
                    log=lambda m: click.echo(m, err=True),
                )
            except ValueError as e:
                source.close()
                raise click.ClickException(str(e)) from None
            engine.add_sink(out)
        if idle_exit:
            source = _IdleExit(source, idle_exit)
        what = f"events from {service_url} {', '.join(topics) or topic_pattern}"
    server = pg = None
    if pg_port is not None and no_sql:
        raise click.UsageError("--pg-port serves the SQL endpoint: drop --no-sql")
    if not no_sql:
        from vecswim.server import SQLServer
        from vecswim.snapshot import Snapshots

        try:
            server = SQLServer(
                Snapshots(engine).attach(),
                sql_bind,
                sql_port,
                sql_token,
                sql_timeout,
                sql_max_rows,
                sql_threads,
                live=not no_live,
            )
        except OSError as e:
            raise click.ClickException(
                f"cannot serve SQL on {sql_bind}:{sql_port} ({e.strerror}); "
                "choose --sql-port (0 = any free port) or --no-sql"
            ) from None
        if pg_port is not None:
            from vecswim.pgwire import PgServer

            try:
                pg = PgServer(
                    server.snapshots,
                    sql_bind,
                    pg_port,
                    sql_token,
                    sql_timeout,
                    sql_max_rows,
                    sql_threads,
                )
            except OSError as e:
                server.close()
                raise click.ClickException(
                    f"cannot serve PostgreSQL on {sql_bind}:{pg_port} ({e.strerror}); "
                    "choose another --pg-port (0 = any free port)"
                ) from None
        if server.live is not None:
            from vecswim.live import CommandSource

            # commands sent to agents' event lanes join the next tick (and its journal record)
            source = CommandSource(source, server.live.commands)
    status = _Status(engine, quiet)
    until = "until they end" if seconds is None else f"for {seconds:g}s"
    click.echo(f"vecswim: running {scenario} with {agents:,} agents, {what}, {until}", err=True)
    if server is not None:
        click.echo(
            f"vecswim: SQL at {server.url}/sql (vecswim sql --url {server.url} ...)", err=True
        )
        click.echo(
            f"vecswim: live page at {server.url}/, metrics at {server.url}/metrics", err=True
        )
        if pg is not None:
            click.echo(
                f"vecswim: PostgreSQL at {sql_bind}:{pg.port} "
                f"(psql -h {sql_bind} -p {pg.port} -U vecswim -c 'SELECT ...')",
                err=True,
            )
        if server.live is not None:
            ws = "ws" + server.url[4:]
            click.echo(
                f"vecswim: live lanes at {ws}/ (WARP) and {ws}/live (JSON); "
                f"vecswim watch --url {server.url} /<agent type>/<key>",
                err=True,
            )
    checkpointer = None
    if checkpoint_dir is not None:
        from vecswim import checkpoint
        from vecswim.journal import JournalError

        try:
            checkpointer = checkpoint.Checkpointer(
                engine,
                checkpoint_dir,
                source,
                checkpoint_every,
                checkpoint_ticks,
                checkpoint_keep,
                log=lambda m: click.echo(m, err=True),
                resumed=resumed,
                keep_journal=keep_journal,
            )
        except (ValueError, OSError, JournalError) as e:
            raise click.ClickException(str(e)) from None
        if checkpointer.journal is None and (engine.sinks or service_url is not None):
            click.echo(
                "vecswim: this source cannot be replayed exactly (generator, or a shared "
                "subscription): after a restart, output is at-least-once",
                err=True,
            )
    if server is not None:
        from vecswim.metrics import Metrics

        server.metrics = Metrics(
            engine, source=source, checkpointer=checkpointer, sql=server, pg=pg, live=server.live
        ).attach()
    # SIGTERM stops at the next tick boundary: final checkpoint, acknowledgements, summary,
    # exit 0. A second SIGTERM ends the process at once (still safe: see docs/FAULTS.md).
    stop = threading.Event()

    def on_sigterm(_signum, _frame) -> None:
        stop.set()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    from vecswim.checkpoint import CheckpointError

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        engine.run(
            source,
            max_events=max_events,
            tick_ms=tick_ms,
            seconds=seconds,
            on_tick=status,
            checkpointer=checkpointer,
            stop=stop,
        )
    except CheckpointError as e:
        raise click.ClickException(str(e)) from None
    finally:
        if signal.getsignal(signal.SIGTERM) is on_sigterm:
            signal.signal(signal.SIGTERM, previous)
        close = getattr(source, "close", None)
        if close is not None:
            close()
        if server is not None:
            server.close()
        if pg is not None:
            pg.close()
    if stop.is_set():
        done = " after a final checkpoint" if checkpointer is not None else ""
        click.echo(f"vecswim: SIGTERM: stopped at tick {engine.tick_id:,}{done}", err=True)
    if status.tty and not quiet:
        click.echo("", err=True)
    click.echo(status.summary(), err=True)
    if service_url is not None:
        c = source.counts
        click.echo(
            f"pulsar           messages {c['messages']:,}  events {c['events']:,}  "
            f"dead messages {c['dead_messages']:,}  dead rows {c['dead_rows']:,}",
            err=True,
        )
    if isinstance(sink, ParquetSink):
        for at, p in sink.paths.items():
            click.echo(f"emissions of {at}: {p}", err=True)
    if checkpointer is not None and checkpointer.pauses:
        ms = np.array(checkpointer.pauses) * 1e3
        click.echo(
            f"checkpoints      {len(ms)}  capture pause p50 {np.median(ms):.1f} ms "
            f"max {ms.max():.1f} ms  last {checkpointer.bytes[-1]:,} bytes",
            err=True,
        )


def _client_options(auth_token: str | None, tls_trust_certs: str | None):
    import pulsar

    from vecswim import pulsar_io

    return pulsar_io.ClientOptions(
        authentication=pulsar.AuthenticationToken(auth_token) if auth_token else None,
        tls_trust_certs_file_path=tls_trust_certs,
    )


def _file_options(
    files: tuple[str, ...], fmt: str | None, service_url: str | None, seconds: float
) -> float | None:
    """Check --file/--format before anything starts. With files the run lasts until they are
    exhausted (or --seconds, if given)."""
    from click.core import ParameterSource

    from vecswim.sources import file_format

    ctx = click.get_current_context()
    if not files:
        if fmt in ("ndjson", "parquet"):
            raise click.UsageError(f"--format {fmt} needs --file (Pulsar payloads: json, arrow)")
        return seconds
    if service_url is not None:
        raise click.UsageError("--file and --pulsar exclude each other")
    for name, option in (("rate", "--rate"), ("total_events", "--events")):
        if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE:
            raise click.UsageError(f"{option} applies to the generator, not to --file")
    for f in files:
        try:
            file_format(f, fmt)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="'--file'") from None
    if ctx.get_parameter_source("seconds") == ParameterSource.DEFAULT:
        return None
    return seconds


def _file_source(engine, event_type: str, files: tuple[str, ...], fmt, resumed):
    """A FileSource over ``files`` for ``event_type`` (reading only the columns the engine
    needs where the format allows), resumed from a checkpoint's positions."""
    from vecswim import decode
    from vecswim.sources import FileSource

    fields = engine.event_fields(event_type)
    columns = decode.plan_for(engine.types[event_type], fields).fields
    try:
        return FileSource(
            list(files),
            event_type,
            fmt=fmt,
            columns=columns,
            resume=(resumed or {}).get("positions"),
        )
    except (ValueError, OSError) as e:
        raise click.ClickException(str(e)) from None


class _IdleExit:
    """Wraps a source: reports it exhausted after ``idle`` seconds without events; everything
    else is the wrapped source's."""

    def __init__(self, source, idle: float) -> None:
        self.source = source
        self.idle = idle
        self.last = time.monotonic()

    def poll(self, max_events: int, timeout: float):
        got = self.source.poll(max_events, timeout)
        now = time.monotonic()
        if got or not getattr(self.source, "connected", True):
            self.last = now  # an unreachable broker is not idleness
        elif now - self.last > self.idle:
            return None
        return got

    def replay(self, boundary: dict, timeout: float):
        got = self.source.replay(boundary, timeout)
        self.last = time.monotonic()  # waiting for a redelivery is not idleness
        return got

    def __getattr__(self, name: str):
        return getattr(self.source, name)


@cli.command("produce")
@click.argument("scenario", type=click.Choice(sorted(_scenarios.SCENARIOS)), metavar="SCENARIO")
@click.option(
    "--pulsar",
    "service_url",
    required=True,
    metavar="URL",
    callback=_pulsar_url,
    help="Pulsar service URL.",
)
@click.option("--topic", required=True, help="Topic to publish to.")
@click.option(
    "--rate",
    type=click.FloatRange(min=0),
    default=100_000,
    show_default=True,
    help="Events per second; 0 = as fast as possible.",
)
@click.option(
    "--format", "fmt", type=click.Choice(["json", "arrow"]), default="json", show_default=True
)
@click.option("--agents", type=click.IntRange(min=1), default=100_000, show_default=True)
@click.option(
    "--seconds", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True
)
@click.option(
    "--events",
    "total_events",
    type=click.IntRange(min=1),
    default=None,
    help="Stop after this many events.",
)
@click.option(
    "--events-per-message",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="Arrow format: events per message.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--auth-token", default=None)
@click.option("--tls-trust-certs", type=click.Path(exists=True, dir_okay=False), default=None)
def produce(
    scenario: str,
    service_url: str,
    topic: str,
    rate: float,
    fmt: str,
    agents: int,
    seconds: float,
    total_events: int | None,
    events_per_message: int,
    seed: int,
    auth_token: str | None,
    tls_trust_certs: str | None,
) -> None:
    """Publish SCENARIO's generated events to a Pulsar topic."""
    from vecswim import pulsar_io

    mod = _scenarios.get(scenario)
    gen = mod.Generator(agents, seed=seed)
    key = next(at.key for at in mod.AGENT_TYPES if at.name == mod.EVENT_TYPE)
    pub = pulsar_io.EventPublisher(
        service_url,
        topic,
        key,
        fmt,
        events_per_message,
        _client_options(auth_token, tls_trust_certs),
    )
    source = GeneratorSource(gen.make, rate=rate, total=total_events)
    start = time.perf_counter()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        got = source.poll(50_000, 0.05)
        if got is None:
            break
        for batch in got.values():
            pub.publish(batch)
    pub.close()
    dt = time.perf_counter() - start
    click.echo(
        f"published {pub.events:,} events in {pub.messages:,} messages to {topic} "
        f"({pub.events / dt:,.0f} events/s)",
        err=True,
    )


@cli.command("sql")
@click.argument("query", required=False)
@click.option(
    "--url",
    default="http://127.0.0.1:7654",
    show_default=True,
    help="SQL endpoint of a running engine.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "csv", "json", "parquet"]),
    default="table",
    show_default=True,
)
@click.option(
    "--output",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    help="Write the result to this file (parquet needs it).",
)
@click.option("--tables", "list_tables", is_flag=True, help="List the tables and columns.")
@click.option("--token", default=None, help="Bearer token (vecswim run --sql-token).")
@click.option(
    "--checkpoint",
    "checkpoint_dir",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="Query the newest valid checkpoint in this directory offline.",
)
def sql_command(
    query: str | None,
    url: str,
    fmt: str,
    output: str | None,
    list_tables: bool,
    token: str | None,
    checkpoint_dir: str | None,
) -> None:
    """Run a read-only SQL QUERY against a running engine (or a checkpoint) and print it."""
    from vecswim import client as sqlclient

    if list_tables == (query is not None):
        raise click.UsageError("give a QUERY or --tables")
    if fmt == "parquet" and output is None:
        raise click.UsageError("--format parquet needs --output FILE")
    _check_output(output, "--output")
    if checkpoint_dir is not None:
        from vecswim import checkpoint
        from vecswim.sql import SQLError, execute, tables_for

        found = checkpoint.newest_valid(checkpoint_dir, log=lambda m: click.echo(m, err=True))
        if found is None:
            raise click.ClickException(f"no valid checkpoint in {checkpoint_dir}")
        view = checkpoint.CheckpointView(*found)
        if list_tables:
            click.echo(f"tick {view.tick}")
            for name, t in tables_for(view).items():
                click.echo(f"{name}: " + ", ".join(f"{f.name} {f.type}" for f in t.schema))
            return
        try:
            res = execute(view, query)
        except SQLError as e:
            raise click.ClickException(str(e)) from None
        sqlclient.write(sqlclient.QueryResult(res.table, res.tick, False), fmt, output)
        return
    try:
        if list_tables:
            tick, tables = sqlclient.tables(url, token)
            click.echo(f"tick {tick}")
            for name, cols in tables.items():
                click.echo(f"{name}: " + ", ".join(f"{c['name']} {c['type']}" for c in cols))
            return
        result = sqlclient.query(url, query, token)
    except sqlclient.ClientError as e:
        raise click.ClickException(str(e)) from None
    sqlclient.write(result, fmt, output)


@cli.command("watch")
@click.argument("node")
@click.argument("lanes", nargs=-1)
@click.option(
    "--url",
    default="http://127.0.0.1:7654",
    show_default=True,
    help="A running engine (vecswim run prints it).",
)
@click.option("--token", default=None, help="Bearer token (vecswim run --sql-token).")
@click.option("--link", "link_only", is_flag=True, help="Only changes from now on (no sync).")
@click.option(
    "--count",
    type=click.IntRange(min=1),
    default=None,
    help="Stop after this many changes.",
)
@click.option(
    "--seconds",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Stop after this long.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON frames.")
def watch_command(
    node: str,
    lanes: tuple[str, ...],
    url: str,
    token: str | None,
    link_only: bool,
    count: int | None,
    seconds: float | None,
    as_json: bool,
) -> None:
    """Print live changes of NODE's LANES (e.g. /fleet/7 engine_fleet).

    Without LANES: every state column of an agent (/engine/7), the agents lane of a type
    (/engine), the pulse of swimos:meta:mesh. Each line starts with the tick it is from."""
    from vecswim import client as liveclient

    try:
        liveclient.watch(
            url,
            node,
            list(lanes),
            token,
            sync=not link_only,
            count=count,
            seconds=seconds,
            raw=as_json,
        )
    except liveclient.ClientError as e:
        raise click.ClickException(str(e)) from None
    except KeyboardInterrupt:
        pass


@cli.group("checkpoint")
def checkpoint_group() -> None:
    """Look at checkpoint directories."""


@checkpoint_group.command("ls")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
def checkpoint_ls(directory: str) -> None:
    """List checkpoints: tick, time, agents, size, and whether they verify."""
    import datetime as dt

    from vecswim import checkpoint

    for path in checkpoint.list_checkpoints(directory):
        try:
            m = checkpoint.read_manifest(path)
        except checkpoint.CheckpointError as e:
            click.echo(f"{path.name}  INVALID: {e}")
            continue
        when = dt.datetime.fromtimestamp(m["time"]).isoformat(timespec="seconds")
        size = sum(f["bytes"] for f in m["files"].values())
        click.echo(
            f"{path.name}  tick {m['tick']:,}  {when}  "
            f"agents {sum(m['agents'].values()):,}  {size:,} bytes"
        )


@checkpoint_group.command("inspect")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
def checkpoint_inspect(directory: str) -> None:
    """Show the newest valid checkpoint's manifest (tables, counters, source positions)."""
    from vecswim import checkpoint

    found = checkpoint.newest_valid(directory, log=lambda m: click.echo(m, err=True))
    if found is None:
        raise click.ClickException(f"no valid checkpoint in {directory}")
    path, m = found
    click.echo(json.dumps({"checkpoint": path.name, **m}, indent=1))


@cli.group("pulsar")
def pulsar_group() -> None:
    """Run a local Apache Pulsar standalone broker (fetched with Maven on first use)."""


@pulsar_group.command("fetch")
def pulsar_fetch() -> None:
    """Download the broker's jars into the cache (what 'standalone' does first)."""
    from vecswim import broker

    t0 = time.perf_counter()
    try:
        lib = broker.fetch(quiet=False, progress=_progress())
    except broker.BrokerError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"pulsar {broker.PULSAR_VERSION} jars in {lib} ({time.perf_counter() - t0:.1f}s)")


def _progress():
    """A progress line on stderr: rewritten in place on a terminal, one line each otherwise."""
    tty = sys.stderr.isatty()

    def show(line: str) -> None:
        click.echo(f"\r{line}\x1b[K" if tty else line, err=True, nl=not tty)

    return show


@pulsar_group.command("standalone")
@click.option(
    "--data",
    "data_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Broker data directory (default: the vecswim cache).",
)
@click.option("--port", type=click.IntRange(1, 65535), default=6650, show_default=True)
@click.option("--http-port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@click.option("--bookie-port", type=click.IntRange(1, 65535), default=3181, show_default=True)
@click.option("--heap", default="768m", show_default=True, help="JVM heap size.")
def pulsar_standalone(
    data_dir: str | None, port: int, http_port: int, bookie_port: int, heap: str
) -> None:
    """Start a standalone broker in the background and print its service URL."""
    from vecswim import broker

    t0 = time.perf_counter()
    try:
        b = broker.start(data_dir, port, http_port, bookie_port, heap, progress=_progress())
    except broker.BrokerError as e:
        raise click.ClickException(str(e)) from None
    click.echo(b.service_url)
    click.echo(
        f"broker pid {b.pid}, admin {b.admin_url}, data {b.data_dir}, "
        f"ready in {time.perf_counter() - t0:.1f}s",
        err=True,
    )


@pulsar_group.command("stop")
@click.option("--data", "data_dir", type=click.Path(file_okay=False), default=None)
def pulsar_stop(data_dir: str | None) -> None:
    """Stop the standalone broker started with the same --data."""
    from vecswim import broker

    click.echo("stopped" if broker.stop(data_dir) else "no broker was running", err=True)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: runs the CLI, turning usage errors into one line and exit 2."""
    try:
        cli.main(args=argv, prog_name="vecswim", standalone_mode=False)
    except _PipeClosed:
        return _stdout_closed()
    except click.exceptions.UsageError as e:
        click.echo(f"vecswim: error: {' '.join(e.format_message().split())}", err=True)
        return 2
    except click.exceptions.ClickException as e:
        click.echo(f"vecswim: error: {' '.join(e.format_message().split())}", err=True)
        return 1
    except click.exceptions.Abort:
        click.echo("vecswim: aborted", err=True)
        return 130
    except KeyboardInterrupt:
        return 130
    except click.exceptions.Exit as e:
        return e.exit_code
    except OSError as e:
        if _broken_pipe(e):
            return _stdout_closed()
        return _fail(e)
    except Exception as e:
        return _fail(e)
    return 0


def _broken_pipe(e: BaseException) -> bool:
    """The reader of our stdout went away (``vecswim run --emit - | head``)."""
    return isinstance(e, BrokenPipeError) or (
        isinstance(e, OSError) and "Broken pipe" in str(e)  # polars' writer says it so
    )


def _stdout_closed() -> int:
    """End quietly like ``yes | head``: exit status 141 (SIGPIPE), no traceback, and stdout
    pointed at /dev/null so the interpreter's last flush has nowhere to fail."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return 141


def _fail(e: Exception) -> int:
    """Any other error: one line, exit 1 (VECSWIM_DEBUG=1 shows the traceback)."""
    if os.environ.get("VECSWIM_DEBUG"):
        raise e
    if type(e).__module__.split(".")[0] in ("_pulsar", "pulsar"):
        msg = (
            f"Pulsar: {str(e).removeprefix('Pulsar error: ')} (is a broker running at the "
            "--pulsar URL? 'vecswim pulsar standalone' starts one)"
        )
    elif isinstance(e, OSError) and e.strerror:
        msg = f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    else:
        msg = str(e) or type(e).__name__
    click.echo(f"vecswim: error: {' '.join(msg.split())}", err=True)
    return 1


if __name__ == "__main__":
    sys.exit(main())
