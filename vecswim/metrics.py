"""Prometheus metrics of a running engine.

Counters the engine, its source, checkpointer and servers already keep are read when scraped
(a custom collector), so nothing is counted twice and no per-event work is added; the only
work on the engine thread is one histogram observation per tick (tick duration). Every
engine gets its own ``CollectorRegistry``: several engines in one process do not clash.

Metrics (a component's are absent when it is not given or lacks the counter):

- engine: ``vecswim_ticks_total``, ``vecswim_events_total``, ``vecswim_emitted_rows_total``,
  ``vecswim_dead_letters_total{reason}``, ``vecswim_agents{agent_type}`` (gauge),
  ``vecswim_state_bytes`` (gauge), ``vecswim_tick_duration_seconds`` (histogram of the
  ticks after ``attach``);
- Pulsar source: ``vecswim_pulsar_received_messages_total``, ``..._acked_messages_total``,
  ``..._redelivered_messages_total``, ``..._dead_messages_total`` (undecodable),
  ``vecswim_pulsar_connected`` (0/1), ``vecswim_pulsar_lag_seconds``;
- checkpointer: ``vecswim_checkpoint_age_seconds``,
  ``vecswim_checkpoint_durable_timestamp_seconds`` (both once a checkpoint is durable),
  ``vecswim_checkpoint_write_duration_seconds`` and ``vecswim_checkpoint_pause_seconds``
  (histograms: every write, failed ones too; every capture, which stalls ticks),
  ``vecswim_checkpoint_failures_total``;
- SQL servers, label ``protocol`` (``http``, ``postgres``): ``vecswim_sql_queries_total``
  (answered), ``vecswim_sql_errors_total``, ``vecswim_sql_rejected_queries_total`` (busy);
- live server ``stats()``: ``vecswim_live_connections``, ``vecswim_live_links`` (gauges),
  ``vecswim_live_sent_messages_total``, ``vecswim_live_dropped_messages_total``,
  ``vecswim_live_closed_slow_connections_total``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

if TYPE_CHECKING:
    from vecswim.checkpoint import Checkpointer
    from vecswim.engine import Engine, TickStats
    from vecswim.server import SQLServer

# Ticks take from well under a millisecond (small batches) to seconds (huge ones).
TICK_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# A checkpoint write encodes, hashes and fsyncs the whole state: milliseconds to minutes.
WRITE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# A capture is a memcpy of every array: microseconds to about a second.
PAUSE_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)
# Dead-letter reasons are label values; the first MAX_REASONS seen get their own series, the
# rest are summed under "other" (a fixed set, so every series stays monotonic).
MAX_REASONS = 50

# (stats() key, metric name, kind, help) of the live WebSocket server
_LIVE = (
    ("connections", "vecswim_live_connections", "gauge", "Open live WebSocket connections."),
    ("links", "vecswim_live_links", "gauge", "Live subscriptions (links) over all connections."),
    ("sent", "vecswim_live_sent_messages", "counter", "Messages sent to live subscribers."),
    (
        "dropped",
        "vecswim_live_dropped_messages",
        "counter",
        "Messages dropped for slow live subscribers.",
    ),
    (
        "closed_slow",
        "vecswim_live_closed_slow_connections",
        "counter",
        "Live connections closed for being too slow.",
    ),
)


class Metrics:
    """Prometheus metrics of one running engine.

    ``source``: the engine's source (Pulsar counters where it has them). ``checkpointer``: a
    ``vecswim.checkpoint.Checkpointer``. ``sql``: the HTTP SQL server and ``pg`` the Postgres
    one (``queries``, ``errors``, optionally ``rejected``). ``live``: the live WebSocket server
    (``stats()`` -> dict; missing keys are left out). ``render`` may be called from any
    thread; the tick-duration histogram counts the ticks after ``attach``.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        source: object | None = None,
        checkpointer: Checkpointer | None = None,
        sql: SQLServer | None = None,
        pg: object | None = None,
        live: object | None = None,
    ) -> None:
        self.engine = engine
        self.registry = CollectorRegistry()
        self.tick_seconds = Histogram(
            "vecswim_tick_duration_seconds",
            "Wall time of one tick: events, propagation, emission (not poll, flush, commit).",
            unit="seconds",
            buckets=TICK_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_Collector(engine, source, checkpointer, sql, pg, live))

    def attach(self) -> Metrics:
        """Observe every tick's duration from now on (an ``engine.after_tick`` hook, added
        once however often this is called); returns self."""
        if self._after_tick not in self.engine.after_tick:
            self.engine.after_tick.append(self._after_tick)
        return self

    def _after_tick(self, stats: TickStats) -> None:
        self.tick_seconds.observe(stats.seconds)

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition and its content type: OpenMetrics if the ``Accept`` header
        ``accept`` asks for it, else the Prometheus text format (0.0.4 unless a newer
        version is asked for)."""
        encode, content_type = choose_encoder(accept or "")
        return encode(self.registry), content_type


class _Collector:
    """Reads the components' own counters at scrape time."""

    def __init__(self, engine, source, checkpointer, sql, pg, live) -> None:
        self.engine = engine
        self.source = source
        self.checkpointer = checkpointer
        self.servers = [(p, s) for p, s in (("http", sql), ("postgres", pg)) if s is not None]
        self.live = live
        # The checkpointer keeps every write's and capture's duration in a list; new entries
        # are folded into histograms at scrape time (the lock: concurrent scrapes).
        self._lock = threading.Lock()
        self._folded = {"write_seconds": 0, "pauses": 0}
        self._ckpt_hist = {
            "write_seconds": Histogram(
                "vecswim_checkpoint_write_duration_seconds",
                "Time to write one checkpoint (encode, hash, fsync), failed writes included.",
                unit="seconds",
                buckets=WRITE_BUCKETS,
                registry=None,
            ),
            "pauses": Histogram(
                "vecswim_checkpoint_pause_seconds",
                "Time ticks stalled for one checkpoint capture.",
                unit="seconds",
                buckets=PAUSE_BUCKETS,
                registry=None,
            ),
        }

    def collect(self) -> Iterable[Metric]:
        yield from self._engine()
        if self.source is not None:
            yield from self._pulsar(self.source)
        if self.checkpointer is not None:
            yield from self._checkpoint(self.checkpointer)
        yield from self._sql()
        if self.live is not None:
            yield from self._live(self.live.stats())

    def _engine(self) -> Iterable[Metric]:
        e = self.engine
        totals = dict(e.totals)  # one consistent-enough copy: the engine thread updates it
        yield CounterMetricFamily(
            "vecswim_ticks",
            "Ticks, with the empty ticks a journal replay skips.",
            value=totals["ticks"],
        )
        yield CounterMetricFamily("vecswim_events", "Events applied.", value=totals["events"])
        yield CounterMetricFamily(
            "vecswim_emitted_rows", "Rows emitted to the sinks.", value=totals["emitted"]
        )
        dead = CounterMetricFamily(
            "vecswim_dead_letters", "Events rejected, by reason.", labels=["reason"]
        )
        # dict() copies in one step: iterating the Counter while a tick adds a reason fails
        reasons = list(dict(e.dead_letters.reasons).items())
        for reason, n in reasons[:MAX_REASONS]:
            dead.add_metric([reason], n)
        if len(reasons) > MAX_REASONS:
            dead.add_metric(["other"], sum(n for _, n in reasons[MAX_REASONS:]))
        yield dead
        agents = GaugeMetricFamily("vecswim_agents", "Agents, by type.", labels=["agent_type"])
        for name, t in e.tables.items():
            agents.add_metric([name], t.n)
        yield agents
        yield GaugeMetricFamily(
            "vecswim_state_bytes",
            "Bytes allocated for state tables, key indexes and links.",
            value=e.nbytes,
        )

    def _pulsar(self, src) -> Iterable[Metric]:
        counts = getattr(src, "counts", None)
        if counts is None or not hasattr(src, "_polled"):
            return  # not a Pulsar source (files, generator)
        # PulsarSource keeps the received/acknowledged totals privately (for commits)
        yield CounterMetricFamily(
            "vecswim_pulsar_received_messages",
            "Messages received from Pulsar and handed to ticks (redeliveries included).",
            value=src._polled,
        )
        yield CounterMetricFamily(
            "vecswim_pulsar_acked_messages",
            "Messages acknowledged to Pulsar.",
            value=src._acked,
        )
        yield CounterMetricFamily(
            "vecswim_pulsar_redelivered_messages",
            "Redelivered messages recognized as already applied (acknowledged, not applied).",
            value=counts["redelivered"],
        )
        yield CounterMetricFamily(
            "vecswim_pulsar_dead_messages",
            "Messages that could not be decoded (dead-lettered whole).",
            value=counts["dead_messages"],
        )
        g = src.gauges()
        yield GaugeMetricFamily(
            "vecswim_pulsar_connected",
            "1 while the consumer is connected to the broker.",
            value=g["source_connected"],
        )
        yield GaugeMetricFamily(
            "vecswim_pulsar_lag_seconds",
            "Age (by publish time) of the newest message polled.",
            value=g["source_lag_ms"] / 1000.0,
            unit="seconds",
        )

    def _checkpoint(self, ck) -> Iterable[Metric]:
        if ck.durable_time is not None:
            yield GaugeMetricFamily(
                "vecswim_checkpoint_age_seconds",
                "Seconds since the newest checkpoint became durable.",
                value=max(0.0, time.time() - ck.durable_time),
                unit="seconds",
            )
            yield GaugeMetricFamily(
                "vecswim_checkpoint_durable_timestamp_seconds",
                "Unix time the newest checkpoint became durable.",
                value=ck.durable_time,
                unit="seconds",
            )
        yield CounterMetricFamily(
            "vecswim_checkpoint_failures", "Failed checkpoint writes.", value=ck.failures
        )
        with self._lock:
            for attr, hist in self._ckpt_hist.items():
                # a slice, not len(): the writer thread may append meanwhile
                new = getattr(ck, attr)[self._folded[attr] :]
                for s in new:
                    hist.observe(s)
                self._folded[attr] += len(new)
                yield from hist.collect()

    def _sql(self) -> Iterable[Metric]:
        if not self.servers:
            return
        queries = CounterMetricFamily(
            "vecswim_sql_queries", "SQL queries answered successfully.", labels=["protocol"]
        )
        errors = CounterMetricFamily(
            "vecswim_sql_errors", "SQL queries answered with an error.", labels=["protocol"]
        )
        rejected = CounterMetricFamily(
            "vecswim_sql_rejected_queries",
            "SQL queries refused because too many were running or waiting.",
            labels=["protocol"],
        )
        for protocol, s in self.servers:
            queries.add_metric([protocol], s.queries)
            errors.add_metric([protocol], s.errors)
            if (n := getattr(s, "rejected", None)) is not None:
                rejected.add_metric([protocol], n)
        yield queries
        yield errors
        if rejected.samples:
            yield rejected

    def _live(self, stats: dict) -> Iterable[Metric]:
        for key, name, kind, doc in _LIVE:
            if (v := stats.get(key)) is None:
                continue
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield family(name, doc, value=v)
