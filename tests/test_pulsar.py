"""Pulsar source and sink against a real Apache Pulsar broker (started by the session
fixture with vecswim's own broker script)."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pulsar
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
from vecswim.scenarios import engines

from tests.helpers import canon_value, final_state_matches
from vecswim import pulsar_io

pytestmark = pytest.mark.pulsar

ENGINE_COLS = ["engine_temp", "fan_temp", "coolant_vol", "status"]
FLEET_COLS = ["engines", "mean_engine_temp", "max_engine_temp", "red_engines"]


def topic(name: str) -> str:
    return f"persistent://public/default/{name}-{uuid.uuid4().hex[:8]}"


class Until:
    """Wraps a source: records every tick's events and stops once ``messages`` were polled."""

    def __init__(self, source, messages: int, timeout: float = 180.0) -> None:
        self.source = source
        self.messages = messages
        self.deadline = time.monotonic() + timeout
        self.ticks: list[dict] = []

    def poll(self, max_events, timeout):
        if self.source.counts["messages"] >= self.messages:
            return None
        assert time.monotonic() < self.deadline, f"only {self.source.counts} arrived"
        got = self.source.poll(max_events, timeout)
        self.ticks.append(got)
        return got

    def commit(self):
        self.source.commit()


def read_all(url: str, topic_name: str, idle_ms: int = 3000) -> list:
    client = pulsar_io.client(url)
    c = client.subscribe(
        topic_name,
        f"reader-{uuid.uuid4().hex[:6]}",
        initial_position=pulsar.InitialPosition.Earliest,
    )
    out = []
    try:
        while True:
            m = c.receive(timeout_millis=idle_ms)
            out.append((m.data(), m.properties(), m.partition_key()))
            c.acknowledge(m)
    except pulsar.Timeout:
        pass
    client.close()
    return out


def publish_scenario(url, topic_name, gen, ticks, size, fmt):
    pub = pulsar_io.EventPublisher(url, topic_name, "engine_id", fmt, events_per_message=1000)
    for _ in range(ticks):
        pub.publish(gen.make(size)["engine"])
    pub.close()
    return pub


def emitted_rows_json(raw):
    rows = {}
    for data, props, key in raw:
        r = json.loads(data)
        at = r.pop("agent_type")
        assert at == props["agent_type"] and str(r["tick"]) == props["tick"]
        k = r.pop(engines.ENGINE.key if at == "engine" else engines.FLEET.key)
        assert str(k) == key
        assert (at, r["tick"], k) not in rows
        rows[(at, r["tick"], k)] = {c: canon_value(v) for c, v in r.items()}
    return rows


def emitted_rows_arrow(raw):
    rows = {}
    for data, props, _ in raw:
        at = props["agent_type"]
        key = engines.ENGINE.key if at == "engine" else engines.FLEET.key
        for r in ipc.open_stream(pa.py_buffer(data)).read_all().to_pylist():
            k = r.pop(key)
            rows[(at, r["tick"], k)] = {c: canon_value(v) for c, v in r.items()}
    return rows


@pytest.mark.parametrize("fmt", ["json", "arrow"])
def test_end_to_end_equals_reference(pulsar_broker, fmt):
    url = pulsar_broker.service_url
    t_in, t_out = topic(f"in-{fmt}"), topic(f"out-{fmt}")
    gen = engines.Generator(5000, seed=21, relink=0.01, period=30.0)
    pub = publish_scenario(url, t_in, gen, 25, 4000, fmt)
    assert pub.events == 100_000

    eng = engines.build_engine(5000)
    src = pulsar_io.PulsarSource(
        url, eng.types["engine"], eng.event_fields("engine"), topics=t_in, fmt=fmt
    )
    eng.add_sink(pulsar_io.PulsarSink(url, t_out, fmt))
    run = Until(src, pub.messages)
    eng.run(run, max_events=20_000, tick_ms=50)
    src.close()
    assert src.counts["events"] == 100_000 and src.counts["dead_messages"] == 0

    ref = engines.Reference()
    expected = {}
    for got in run.ticks:
        if got is None:
            continue
        for at, rows in ref.tick(got).items():
            for k, r in rows.items():
                expected[(at, r["tick"], k)] = {c: canon_value(v) for c, v in r.items()}
    assert ref.tick_id == eng.tick_id
    final_state_matches(eng, ref.engines, "engine", ENGINE_COLS)
    final_state_matches(eng, ref.fleets, "fleet", FLEET_COLS)
    raw = read_all(url, t_out)
    got_rows = emitted_rows_json(raw) if fmt == "json" else emitted_rows_arrow(raw)
    assert len(got_rows) == eng.totals["emitted"] == len(expected)
    assert got_rows == expected


GOOD = {"engine_id": 1, "engine_temp": 90.0, "fan_temp": 50.0, "coolant_vol": 8.0, "fleet_id": 7}


def bad(**changes) -> bytes:
    d = dict(GOOD, **changes)
    return json.dumps({k: v for k, v in d.items() if v is not DROP}).encode()


DROP = object()
MALFORMED_JSON = {
    "truncated": b'{"engine_id": 1, "engine_te',
    "wrong type": bad(engine_temp="hot"),
    "bool for float": bad(engine_temp=True),
    "object for float": bad(engine_temp={"a": 1}),
    "missing key": bad(engine_id=DROP),
    "missing field": bad(fan_temp=DROP),
    "null field": bad(fan_temp=None),
    "float key": bad(engine_id=1.5),
    "key beyond int64": b'{"engine_id": 99999999999999999999, "engine_temp": 1.0, '
    b'"fan_temp": 1.0, "coolant_vol": 1.0, "fleet_id": 7}',
    "non-utf8": b'{"engine_id": 1, "engine_temp": 1.0, "fan_temp": 1.0, "coolant_vol": 1.0, '
    b'"fleet_id": 7, "note": "\xff\xfe"}',
    "NaN literal": b'{"engine_id": 1, "engine_temp": NaN, "fan_temp": 1.0, '
    b'"coolant_vol": 1.0, "fleet_id": 7}',
    "infinity": b'{"engine_id": 1, "engine_temp": 1e999, "fan_temp": 1.0, '
    b'"coolant_vol": 1.0, "fleet_id": 7}',
    "empty": b"",
    "whitespace only": b"   ",
    "array": b"[1, 2, 3]",
    "scalar": b"42",
    "two objects": bad() + bad(),
    "two objects on two lines": bad() + b"\n" + bad(),
    "two objects with a comma": bad() + b", " + bad(),
    "5 MB payload": bad(engine_id=2)[:-1] + b', "pad": "' + b"x" * (5_000_000 - 200) + b'"}',
}


def test_malformed_messages_go_to_the_dlq_and_accounting_is_exact(pulsar_broker):
    url = pulsar_broker.service_url
    t_in, t_dlq = topic("bad-in"), topic("bad-dlq")
    pub = pulsar_io.EventPublisher(url, t_in, "engine_id")
    good_before = pa.RecordBatch.from_pylist([dict(GOOD, engine_id=100 + i) for i in range(50)])
    pub.publish(good_before)
    for payload in MALFORMED_JSON.values():
        pub.send_raw(payload, key="1")
    pub.send_raw(bad(engine_id=300, color="red"), key="300")  # extra members are ignored
    good_after = pa.RecordBatch.from_pylist([dict(GOOD, engine_id=200 + i) for i in range(50)])
    pub.publish(good_after)
    pub.close()

    eng = engines.build_engine(1000)
    src = pulsar_io.PulsarSource(
        url, eng.types["engine"], eng.event_fields("engine"), topics=t_in, dlq_topic=t_dlq
    )
    eng.dead_letters.add_sink(src.dead_rows)
    eng.run(Until(src, pub.messages), max_events=50, tick_ms=20)
    src.close()

    n_bad = len(MALFORMED_JSON)
    c = src.counts
    assert c["messages"] == 101 + n_bad
    assert eng.totals["events"] == 101
    assert c["dead_messages"] + c["dead_rows"] == n_bad
    assert c["messages"] == eng.totals["events"] + c["dead_messages"] + c["dead_rows"]
    keys = {k for k in eng.state("engine").column("engine_id").to_pylist()}
    assert keys == set(range(100, 150)) | set(range(200, 250)) | {300}

    dlq = read_all(url, t_dlq)
    assert len(dlq) == n_bad
    reasons = [props["reason"] for _, props, _ in dlq]
    assert all(reasons), reasons
    assert any("null key" in r for r in reasons)
    assert any("non-finite" in r for r in reasons)
    assert any("exceeds" in r for r in reasons)


def arrow_bytes(table: pa.Table) -> bytes:
    return pulsar_io.arrow_payload(table)


def test_malformed_arrow_messages(pulsar_broker):
    url = pulsar_broker.service_url
    t_in, t_dlq = topic("bad-arrow"), topic("bad-arrow-dlq")
    good = pa.table({k: [v] * 10 for k, v in GOOD.items()}).set_column(
        0, "engine_id", pa.array(np.arange(10, dtype=np.int64))
    )
    ok = arrow_bytes(good)
    payloads = {
        "corrupt": b"\x00\x01garbage" * 10,
        "truncated": ok[: len(ok) // 2],
        "missing field": arrow_bytes(good.drop_columns(["fan_temp"])),
    }
    # rows that fail a cast are dead-lettered one by one; the message's other rows apply
    temps = pa.array(["hot", "1.5", "hot", "2", "hot", "hot", "hot", "hot", "hot", "hot"])
    uncastable = arrow_bytes(good.set_column(1, "engine_temp", temps))
    extra = arrow_bytes(  # extra columns are ignored
        good.append_column("color", pa.array(["red"] * 10)).set_column(
            0, "engine_id", pa.array(np.arange(100, 110, dtype=np.int64))
        )
    )
    pub = pulsar_io.EventPublisher(url, t_in, "engine_id", "arrow")
    for p in payloads.values():
        pub.send_raw(p)
    pub.send_raw(uncastable)
    pub.send_raw(extra)
    pub.send_raw(ok)
    pub.close()
    eng = engines.build_engine(1000)
    src = pulsar_io.PulsarSource(
        url,
        eng.types["engine"],
        eng.event_fields("engine"),
        topics=t_in,
        fmt="arrow",
        dlq_topic=t_dlq,
    )
    eng.run(Until(src, pub.messages), max_events=1000, tick_ms=20)
    src.close()
    assert src.counts["dead_messages"] == len(payloads)
    assert src.counts["dead_rows"] == 8
    assert eng.totals["events"] == 22
    assert sorted(eng.state("engine").column("engine_id").to_pylist()) == [
        *range(10),
        *range(100, 110),
    ]
    dlq = read_all(url, t_dlq)
    assert len(dlq) == len(payloads) + 8
    reasons = [p["reason"] for _, p, _ in dlq]
    assert "arrow: missing field 'fan_temp'" in reasons
    assert sum(r.startswith("arrow:") for r in reasons) == len(payloads)
    assert reasons.count("field 'engine_temp': cannot convert to float64") == 8


def test_message_key_as_agent_key(pulsar_broker):
    url = pulsar_broker.service_url
    t_in = topic("keyed")
    pub = pulsar_io.EventPublisher(url, t_in, "engine_id")
    body = {k: v for k, v in GOOD.items() if k != "engine_id"}
    for key in ("11", "12", "not-a-number", "", "-13"):
        pub.send_raw(json.dumps(body).encode(), key=key or None)
    pub.close()
    eng = engines.build_engine(100)
    src = pulsar_io.PulsarSource(
        url, eng.types["engine"], eng.event_fields("engine"), topics=t_in, key_from="message"
    )
    eng.run(Until(src, 5), max_events=100, tick_ms=20)
    src.close()
    assert sorted(eng.state("engine").column("engine_id").to_pylist()) == [-13, 11, 12]
    assert src.counts["dead_messages"] == 2


def test_kill_consumer_mid_stream_loses_nothing_acknowledged(pulsar_broker, tmp_path):
    """One event per agent; the consumer is killed with SIGKILL mid-stream and restarted on
    the same subscription. Every agent must show up in the emissions of one of the two runs
    (new agents are always emitted, and emissions are flushed before acknowledging), so
    nothing acknowledged-but-unapplied was lost. State itself is lost with the process until
    checkpoints exist (step 5)."""
    url = pulsar_broker.service_url
    t_in = topic("kill")
    n = 60_000
    gen = engines.Generator(n, seed=5)
    pub = pulsar_io.EventPublisher(url, t_in, "engine_id")
    for s in range(0, n, 10_000):
        pub.publish(gen.make_for(np.arange(s, s + 10_000))["engine"])
    pub.close()
    vecswim = str(Path(sys.executable).parent / "vecswim")

    def start(out):
        return subprocess.Popen(
            [
                vecswim,
                "run",
                "engines",
                "--agents",
                str(n),
                "--pulsar",
                url,
                "--topic",
                t_in,
                "--subscription",
                "kill-test",
                "--max-events",
                "500",
                "--tick-ms",
                "5",
                "--emit",
                str(out),
                "--idle-exit",
                "4",
                "--seconds",
                "300",
                "--quiet",
            ],
            stderr=subprocess.PIPE,
            text=True,
        )

    first = start(tmp_path / "run1.ndjson")
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        p = tmp_path / "run1.ndjson"
        if p.exists() and p.stat().st_size > 400_000:  # a few thousand agents in
            break
        assert first.poll() is None, first.stderr.read()
        time.sleep(0.05)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    second = start(tmp_path / "run2.ndjson")
    _, err = second.communicate(timeout=300)
    assert second.returncode == 0, err

    def agents(path):
        return {
            r["engine_id"]
            for r in map(json.loads, path.read_text().splitlines())
            if r["agent_type"] == "engine"
        }

    run1, run2 = agents(tmp_path / "run1.ndjson"), agents(tmp_path / "run2.ndjson")
    assert 0 < len(run1) < n
    assert run1 | run2 == set(gen.engine_ids(np.arange(n)).tolist())


def vecswim_cli(*args, timeout=300):
    exe = str(Path(sys.executable).parent / "vecswim")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout)


def test_cli_produce_then_run_arrow(pulsar_broker, tmp_path):
    url = pulsar_broker.service_url
    t_in = topic("cli")
    r = vecswim_cli(
        "produce",
        "engines",
        "--pulsar",
        url,
        "--topic",
        t_in,
        "--rate",
        "0",
        "--events",
        "5000",
        "--format",
        "arrow",
        "--events-per-message",
        "500",
        "--agents",
        "800",
    )
    assert r.returncode == 0, r.stderr
    assert "published 5,000 events in 10 messages" in r.stderr
    r = vecswim_cli(
        "run",
        "engines",
        "--agents",
        "800",
        "--pulsar",
        url,
        "--topic",
        t_in,
        "--format",
        "arrow",
        "--idle-exit",
        "3",
        "--seconds",
        "120",
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    assert "messages 10  events 5,000  dead messages 0  dead rows 0" in r.stderr


def test_cli_standalone_and_stop(tmp_path):
    from tests.conftest import _free_port

    data = tmp_path / "broker"
    ports = [str(_free_port()) for _ in range(3)]
    r = vecswim_cli(
        "pulsar",
        "standalone",
        "--data",
        str(data),
        "--port",
        ports[0],
        "--http-port",
        ports[1],
        "--bookie-port",
        ports[2],
        "--heap",
        "512m",
    )
    try:
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == f"pulsar://127.0.0.1:{ports[0]}"
        again = vecswim_cli(
            "pulsar",
            "standalone",
            "--data",
            str(data),
            "--port",
            ports[0],
            "--http-port",
            ports[1],
            "--bookie-port",
            ports[2],
        )
        assert again.returncode == 1 and "already in use" in again.stderr
        assert len(again.stderr.strip().splitlines()) == 1
    finally:
        stop = vecswim_cli("pulsar", "stop", "--data", str(data))
    assert stop.returncode == 0 and "stopped" in stop.stderr


def test_chaos_kill_9_anywhere_same_final_state(pulsar_broker, tmp_path):
    """A seeded stream (with some malformed messages) is consumed by `vecswim run` with
    checkpoints; the process is SIGKILLed at 12 random instants, 3 of them while a checkpoint
    is being written, and restarted each time. The state in the final checkpoint must equal
    the reference model over all events, and messages in == applied + dead-lettered."""
    import random

    from vecswim import checkpoint

    url = pulsar_broker.service_url
    t_in, t_dlq = topic("chaos"), topic("chaos-dlq")
    gen = engines.Generator(20_000, seed=11, relink=0.02, period=20.0)
    batches = [gen.make(5000)["engine"] for _ in range(60)]
    pub = pulsar_io.EventPublisher(url, t_in, "engine_id")
    n_bad = 0
    for i, b in enumerate(batches):
        pub.publish(b)
        if i % 6 == 0:
            pub.send_raw(b'{"engine_id": 5, "engine_temp": "broken"')
            n_bad += 1
    pub.close()
    ckdir = tmp_path / "ck"
    exe = str(Path(sys.executable).parent / "vecswim")
    cmd = [
        exe,
        "run",
        "engines",
        "--agents",
        "20000",
        "--pulsar",
        url,
        "--topic",
        t_in,
        "--dlq-topic",
        t_dlq,
        "--subscription",
        "chaos",
        "--checkpoint-dir",
        str(ckdir),
        "--checkpoint-every",
        "0.05",
        "--max-events",
        "2000",
        "--tick-ms",
        "5",
        "--idle-exit",
        "3",
        "--seconds",
        "600",
        "--no-sql",
        "--quiet",
    ]
    rng = random.Random(1234)
    during_write = 0
    for kill in range(12):
        p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        for line in p.stderr:  # wait until it is consuming
            if line.startswith("vecswim: running"):
                break
        if kill in (2, 6, 9):  # wait for a checkpoint write of this life to be under way
            stale = set(ckdir.glob("ckpt-*.tmp"))
            deadline = time.monotonic() + 30
            while not set(ckdir.glob("ckpt-*.tmp")) - stale and time.monotonic() < deadline:
                time.sleep(0.0005)
            during_write += bool(set(ckdir.glob("ckpt-*.tmp")) - stale)
        else:
            time.sleep(rng.uniform(0.05, 0.6))
        assert p.poll() is None, "the stream ended before all kills happened"
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    assert during_write >= 1
    final = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr

    eng = engines.build_engine(20_000)
    manifest = checkpoint.restore(eng, ckdir)
    ref = engines.Reference()
    for b in batches:
        ref.tick({"engine": b})
    final_state_matches(eng, ref.engines, "engine", ENGINE_COLS)
    final_state_matches(eng, ref.fleets, "fleet", FLEET_COLS)
    counts = manifest["positions"]["counts"]
    assert counts["messages"] == 60 * 5000 + n_bad
    assert eng.totals["events"] == 60 * 5000
    assert counts["dead_messages"] + counts["dead_rows"] == n_bad
