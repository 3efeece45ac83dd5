"""Prometheus exposition: every value equals an independent reference (the ticks' own stats,
what was fed, wall-clock bounds), in both exposition formats."""

import math
import time
import urllib.error
import urllib.request

import pyarrow as pa
import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families
from vecswim.scenarios import engines

from tests.test_pulsar import Until, bad, topic
from vecswim import checkpoint, pulsar_io
from vecswim.metrics import MAX_REASONS, TICK_BUCKETS, Metrics
from vecswim.server import SQLServer
from vecswim.snapshot import Snapshots
from vecswim.sources import GeneratorSource, ListSource


def scrape(m: Metrics, accept: str | None = None) -> dict:
    """{(sample name, frozenset of labels): value} of one render (text format 0.0.4)."""
    body, ctype = m.render(accept)
    assert ctype == "text/plain; version=0.0.4; charset=utf-8"
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for f in text_string_to_metric_families(body.decode())
        for s in f.samples
    }


def value(samples: dict, name: str, **labels) -> float:
    return samples[(name, frozenset(labels.items()))]


def names(samples: dict) -> set[str]:
    return {n for n, _ in samples}


def bad_rows() -> pa.Table:
    """Six events: two good (engines 1 and 3), four dead letters with known reasons."""
    return pa.table(
        {
            "engine_id": pa.array([1, None, 3, None, 5, 6], pa.int64()),
            "engine_temp": pa.array([90.0, 91.0, 92.0, 93.0, math.inf, math.nan], pa.float64()),
            "fan_temp": [50.0] * 6,
            "coolant_vol": [8.0] * 6,
            "fleet_id": pa.array([7, 7, 8, 7, 7, 7], pa.int64()),
        }
    )


def test_engine_counters_histogram_agents_and_dead_letters_match_the_ticks():
    eng = engines.build_engine(2000)
    m = Metrics(eng).attach()
    ticks = []
    eng.after_tick.append(ticks.append)
    gen = engines.Generator(2000, seed=3, fleets=4)
    engine_ids, fleet_ids = set(), set()
    for i, n in enumerate([1, 50, 400, 2000, 0, 3000, 7, 1200] * 3):
        if i == 5:
            batches = {"engine": bad_rows()}
            engine_ids |= {1, 3}
            fleet_ids |= {7, 8}
        else:
            batches = gen.make(n)
            engine_ids |= set(batches["engine"].column("engine_id").to_pylist())
            fleet_ids |= set(batches["engine"].column("fleet_id").to_pylist())
        eng.tick(batches)
    s = scrape(m)

    assert value(s, "vecswim_ticks_total") == len(ticks) == 24
    assert value(s, "vecswim_events_total") == sum(t.events for t in ticks)
    assert value(s, "vecswim_emitted_rows_total") == sum(t.emitted for t in ticks) > 0
    dead = {dict(k)["reason"]: v for (n, k), v in s.items() if n == "vecswim_dead_letters_total"}
    assert dead == {"null key": 2, "non-finite field 'engine_temp'": 2}
    assert value(s, "vecswim_agents", agent_type="engine") == len(engine_ids)
    assert value(s, "vecswim_agents", agent_type="fleet") == len(fleet_ids)
    assert {n: t.n for n, t in eng.tables.items()} == {
        "engine": len(engine_ids),
        "fleet": len(fleet_ids),
    }
    assert value(s, "vecswim_state_bytes") > 0

    seconds = [t.seconds for t in ticks]
    assert value(s, "vecswim_tick_duration_seconds_count") == len(seconds)
    assert value(s, "vecswim_tick_duration_seconds_sum") == sum(seconds)
    buckets = {
        dict(k)["le"]: v for (n, k), v in s.items() if n == "vecswim_tick_duration_seconds_bucket"
    }
    assert list(buckets) == [*(str(float(b)) for b in TICK_BUCKETS), "+Inf"]
    for le, count in buckets.items():
        assert count == sum(x <= float(le) for x in seconds), le
    assert buckets["+Inf"] == len(seconds)
    # no source, checkpointer or servers given: none of their metrics
    assert not {
        n for n in names(s) if n.startswith(("vecswim_pulsar", "vecswim_sql", "vecswim_live"))
    }
    assert not {n for n in names(s) if n.startswith("vecswim_checkpoint")}


def test_ticks_before_attach_are_counted_but_not_timed_and_engines_do_not_clash():
    a, b = engines.build_engine(100), engines.build_engine(100)
    gen = engines.Generator(100, seed=1)
    a.tick(gen.make(10))
    ma, mb = Metrics(a).attach().attach(), Metrics(b).attach()  # a second attach: no-op
    for _ in range(3):
        a.tick(gen.make(10))
    b.tick(gen.make(20))
    sa, sb = scrape(ma), scrape(mb)
    assert value(sa, "vecswim_ticks_total") == 4
    assert value(sa, "vecswim_tick_duration_seconds_count") == 3
    assert value(sb, "vecswim_ticks_total") == 1
    assert value(sb, "vecswim_events_total") == 20
    assert value(sb, "vecswim_tick_duration_seconds_count") == 1


def test_dead_letter_reasons_beyond_the_cap_are_summed_as_other():
    eng = engines.build_engine(100)
    m = Metrics(eng)
    reasons = [f"reason {i}" for i in range(MAX_REASONS + 10)]
    # each reason once, then all again: the first MAX_REASONS keep their own series
    for tick, rs in enumerate([reasons, reasons[::-1]]):
        eng.dead_letters.write(tick, "engine", pa.record_batch({"reason": rs}))
    s = scrape(m)
    dead = {dict(k)["reason"]: v for (n, k), v in s.items() if n == "vecswim_dead_letters_total"}
    assert dead == {**dict.fromkeys(reasons[:MAX_REASONS], 2), "other": 20}


def test_openmetrics_when_asked_for():
    eng = engines.build_engine(100)
    m = Metrics(eng).attach()
    eng.tick(engines.Generator(100, seed=2).make(30))
    body, ctype = m.render("application/openmetrics-text; version=1.0.0; charset=utf-8")
    assert ctype.startswith("application/openmetrics-text; version=1.0.0")
    assert body.endswith(b"# EOF\n")
    fams = {f.name: f for f in openmetrics_families(body.decode())}
    assert fams["vecswim_events"].type == "counter"
    assert fams["vecswim_events"].samples[0].value == 30
    assert fams["vecswim_tick_duration_seconds"].unit == "seconds"
    # Prometheus' own Accept header prefers OpenMetrics; a plain scrape gets text 0.0.4
    prom = (
        "application/openmetrics-text;version=1.0.0;q=0.5,"
        "application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.1"
    )
    assert m.render(prom)[1].startswith("application/openmetrics-text")
    for accept in (None, "", "*/*", "text/plain"):
        assert m.render(accept)[1] == "text/plain; version=0.0.4; charset=utf-8"


def test_checkpoint_age_and_durations(tmp_path):
    gen = engines.Generator(1000, seed=4)
    eng = engines.build_engine(1000)
    src = ListSource([gen.make(300) for _ in range(12)])
    ck = checkpoint.Checkpointer(eng, tmp_path, src, every_ticks=2)
    m = Metrics(eng, checkpointer=ck).attach()
    mid = []
    t0 = time.time()
    # scrapes during the run fold the writes done so far; a write is never counted twice
    eng.run(src, checkpointer=ck, on_tick=lambda _s: mid.append(scrape(m)))
    t1 = time.time()
    s = scrape(m)
    t2 = time.time()

    assert not any(n.startswith("vecswim_checkpoint_age") for n in names(mid[0]))
    assert value(s, "vecswim_checkpoint_failures_total") == 0
    durable = value(s, "vecswim_checkpoint_durable_timestamp_seconds")
    assert t0 < durable <= t1
    # the age is taken at scrape time, between t1 and t2
    assert t1 - durable <= value(s, "vecswim_checkpoint_age_seconds") <= t2 - durable
    writes = ck.write_seconds
    # every 2 ticks unless the previous write is still running, and the final one
    assert len(writes) == len(ck.pauses) >= 2
    for name, got in (("write_duration", writes), ("pause", ck.pauses)):
        assert value(s, f"vecswim_checkpoint_{name}_seconds_count") == len(got)
        assert value(s, f"vecswim_checkpoint_{name}_seconds_sum") == pytest.approx(sum(got))
        assert 0 < sum(got) < t1 - t0
        counts = [value(x, f"vecswim_checkpoint_{name}_seconds_count") for x in mid]
        assert counts == sorted(counts) and counts[-1] <= len(got)


def test_sql_servers_and_live_server():
    eng = engines.build_engine(100)
    eng.tick(engines.Generator(100, seed=5).make(50))
    snaps = Snapshots(eng).attach()
    eng.tick({})
    server = SQLServer(snaps, port=0)

    class Postgres:  # the Postgres server's counters (it has no "rejected")
        queries, errors = 7, 2

    class Live:
        def __init__(self) -> None:
            self.n = {"connections": 3, "links": 5, "sent": 120, "dropped": 4}

        def stats(self) -> dict:
            return dict(self.n)

    live = Live()
    try:
        for q in ("SELECT count(*) FROM engine", "SELECT count(*) FROM engine", "SELEKT 1"):
            req = urllib.request.Request(f"{server.url}/sql", data=q.encode(), method="POST")
            try:
                urllib.request.urlopen(req, timeout=30).close()
            except urllib.error.HTTPError as e:
                assert e.code == 400
        m = Metrics(eng, sql=server, pg=Postgres(), live=live)
        s = scrape(m)
    finally:
        server.close()
    assert value(s, "vecswim_sql_queries_total", protocol="http") == 2
    assert value(s, "vecswim_sql_errors_total", protocol="http") == 1
    assert value(s, "vecswim_sql_rejected_queries_total", protocol="http") == 0
    assert value(s, "vecswim_sql_queries_total", protocol="postgres") == 7
    assert value(s, "vecswim_sql_errors_total", protocol="postgres") == 2
    assert ("vecswim_sql_rejected_queries_total", frozenset({("protocol", "postgres")})) not in s
    assert value(s, "vecswim_live_connections") == 3
    assert value(s, "vecswim_live_links") == 5
    assert value(s, "vecswim_live_sent_messages_total") == 120
    assert value(s, "vecswim_live_dropped_messages_total") == 4
    assert "vecswim_live_closed_slow_connections_total" not in names(s)  # not in stats()
    live.n["closed_slow"] = 1
    assert value(scrape(m), "vecswim_live_closed_slow_connections_total") == 1


def test_sources_without_pulsar_counters_have_no_pulsar_metrics():
    eng = engines.build_engine(100)
    gen = engines.Generator(100, seed=6)
    src = GeneratorSource(gen.make, rate=0, total=500)
    m = Metrics(eng, source=src).attach()
    eng.run(src, max_events=100)
    s = scrape(m)
    assert value(s, "vecswim_events_total") == 500
    assert not any(n.startswith("vecswim_pulsar") for n in names(s))


@pytest.mark.pulsar
def test_pulsar_counters(pulsar_broker):
    url = pulsar_broker.service_url
    t_in = topic("metrics-in")
    pub = pulsar_io.EventPublisher(url, t_in, "engine_id")
    good = [
        {"engine_id": i, "engine_temp": 90.0, "fan_temp": 50.0, "coolant_vol": 8.0, "fleet_id": 7}
        for i in range(40)
    ]
    pub.publish(pa.RecordBatch.from_pylist(good))
    pub.send_raw(b'{"engine_id": 1, "engine_te', key="1")
    pub.send_raw(bad(engine_temp="hot"), key="1")
    pub.close()
    assert pub.messages == 42

    eng = engines.build_engine(100)
    src = pulsar_io.PulsarSource(url, eng.types["engine"], eng.event_fields("engine"), topics=t_in)
    m = Metrics(eng, source=src).attach()
    t0 = time.time()
    try:
        eng.run(Until(src, pub.messages), max_events=10, tick_ms=20)
        s = scrape(m)
    finally:
        src.close()
    assert value(s, "vecswim_pulsar_received_messages_total") == 42
    assert value(s, "vecswim_pulsar_acked_messages_total") == 42  # committed after each tick
    assert value(s, "vecswim_pulsar_redelivered_messages_total") == 0
    dead = sum(v for (n, _), v in s.items() if n == "vecswim_dead_letters_total")
    assert value(s, "vecswim_pulsar_dead_messages_total") + dead == 2
    assert value(s, "vecswim_events_total") == 40
    assert value(s, "vecswim_pulsar_connected") == 1
    assert 0 <= value(s, "vecswim_pulsar_lag_seconds") <= time.time() - t0 + 60


@pytest.mark.pulsar
def test_pulsar_lag_reads_zero_only_once_receives_stay_empty(pulsar_broker):
    """On a real broker: events published 1.5 s before they are polled show as 1.5 s of lag.
    Empty receives right after (a receiver queue between fetches) leave the lag as it was;
    only once receives have stayed empty for ``idle_seconds`` does it read 0 (caught up)."""
    url = pulsar_broker.service_url
    t_in = topic("lag-idle")
    pub = pulsar_io.EventPublisher(url, t_in, "engine_id")
    row = {"engine_temp": 90.0, "fan_temp": 50.0, "coolant_vol": 8.0, "fleet_id": 7}
    pub.publish(pa.RecordBatch.from_pylist([{**row, "engine_id": i} for i in range(10)]))
    pub.close()
    time.sleep(1.5)
    eng = engines.build_engine(100)
    src = pulsar_io.PulsarSource(url, eng.types["engine"], eng.event_fields("engine"), topics=t_in)
    try:
        deadline = time.monotonic() + 60
        while src.counts["events"] < 10:
            assert time.monotonic() < deadline, src.counts
            src.poll(100, 0.05)
        got_at = time.monotonic()
        lag = src.gauges()["source_lag_ms"]
        assert 1500 <= lag < 60_000
        while time.monotonic() - got_at < 0.6:  # empty, but not for long: still behind
            assert src.poll(100, 0.05) == {}
            assert src.gauges()["source_lag_ms"] == lag
        while time.monotonic() - got_at < src.idle_seconds + 1.5:  # a check a second at most
            assert src.poll(100, 0.05) == {}
        assert src.gauges()["source_lag_ms"] == 0
    finally:
        src.close()
