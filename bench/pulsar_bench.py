"""Pulsar path benchmark on a real broker, all figures from one run.

    python -m bench.pulsar_bench [--events 300000] [--agents 100000] [--cold]

Starts a standalone broker with vecswim's own script (timing it), publishes the ``engines``
generator's events to a topic as JSON (one event per message) and as Arrow IPC (1,000 events
per message), then drains each topic from its backlog three ways: the raw pulsar-client
consume rate (batch_receive + cumulative ack, no decode), and vecswim end to end (decode,
tick, acknowledge after each tick) for JSON and for Arrow. ``--cold`` also times fetching
the broker's jars into empty Maven and vecswim caches.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import pulsar
from vecswim.scenarios import engines

from vecswim import broker, pulsar_io, scenarios


def timed_start(data: Path) -> tuple[broker.Broker, float]:
    t0 = time.perf_counter()
    b = broker.start(data, port=26650, http_port=28080, bookie_port=23181)
    return b, time.perf_counter() - t0


def publish(url: str, topic: str, gen, events: int, fmt: str) -> None:
    pub = pulsar_io.EventPublisher(url, topic, "engine_id", fmt, events_per_message=1000)
    for _ in range(events // 50_000):
        pub.publish(gen.make(50_000)["engine"])
    pub.close()


def raw_consume(url: str, topic: str, messages: int) -> float:
    client = pulsar_io.client(url)
    c = client.subscribe(
        topic,
        f"raw-{uuid.uuid4().hex[:6]}",
        initial_position=pulsar.InitialPosition.Earliest,
        receiver_queue_size=20_000,
        batch_receive_policy=pulsar.ConsumerBatchReceivePolicy(10_000, 64 << 20, 5),
    )
    got = 0
    t0 = time.perf_counter()
    while got < messages:
        msgs = c.batch_receive()
        if msgs:
            got += len(msgs)
            c.acknowledge_cumulative(msgs[-1])
    dt = time.perf_counter() - t0
    client.close()
    return got / dt


def vecswim_consume(url: str, topic: str, fmt: str, agents: int, events: int) -> float:
    scenarios.warm_up(engines)  # compile/load kernels before the clock starts
    eng = engines.build_engine(agents)
    src = pulsar_io.PulsarSource(
        url,
        eng.types["engine"],
        eng.event_fields("engine"),
        topics=topic,
        fmt=fmt,
        subscription=f"vs-{uuid.uuid4().hex[:6]}",
    )
    t0 = None
    while src.counts["events"] < events:
        got = src.poll(100_000, 0.01)
        if got and t0 is None:
            t0 = time.perf_counter()
        eng.tick(got)
        src.commit()
    dt = time.perf_counter() - t0
    src.close()
    return src.counts["events"] / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=300_000)
    ap.add_argument("--agents", type=int, default=100_000)
    ap.add_argument("--cold", action="store_true")
    args = ap.parse_args()
    print(
        f"machine: {platform.machine()} {os.cpu_count()} cores, python "
        f"{platform.python_version()}, pulsar {broker.PULSAR_VERSION}"
    )
    if args.cold:
        tmp = Path(tempfile.mkdtemp())
        env = {
            "VECSWIM_CACHE_DIR": str(tmp / "cache"),
            "MAVEN_OPTS": f"-Dmaven.repo.local={tmp / 'm2'}",
        }
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        t0 = time.perf_counter()
        broker.fetch()
        print(f"fetch jars, cold caches : {time.perf_counter() - t0:6.1f} s")
        for k, v in old.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v
        shutil.rmtree(tmp)
    t0 = time.perf_counter()
    broker.fetch()
    print(f"fetch jars, warm cache  : {time.perf_counter() - t0:6.2f} s")
    data = Path(tempfile.mkdtemp())
    b, start_s = timed_start(data)
    print(f"broker start to healthy : {start_s:6.1f} s (jars cached)")
    try:
        url = b.service_url
        gen = engines.Generator(args.agents, seed=1)
        t_json, t_arrow = (
            f"bench-json-{uuid.uuid4().hex[:6]}",
            f"bench-arrow-{uuid.uuid4().hex[:6]}",
        )
        t0 = time.perf_counter()
        publish(url, t_json, gen, args.events, "json")
        print(
            f"publish JSON            : {args.events / (time.perf_counter() - t0):12,.0f} "
            "events/s (python producer, one message per event)"
        )
        publish(url, t_arrow, gen, args.events * 10, "arrow")
        raw = raw_consume(url, t_json, args.events)
        vj = vecswim_consume(url, t_json, "json", args.agents, args.events)
        va = vecswim_consume(url, t_arrow, "arrow", args.agents, args.events * 10)
        print(f"raw consume (no decode) : {raw:12,.0f} messages/s")
        print(
            f"vecswim JSON end-to-end : {vj:12,.0f} events/s   ratio to raw {vj / raw:.2f} "
            "(target >= 0.5)"
        )
        print(
            f"vecswim Arrow end-to-end: {va:12,.0f} events/s   (1,000 events/message; target >= 5M)"
        )
    finally:
        broker.stop(data)
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
