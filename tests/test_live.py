"""Live agents over WebSocket: WARP with the real SwimOS Python client, the JSON variant,
commands, bad input, slow subscribers, leaks, tokens and `vecswim watch`.

Every comparison is exact, against the engine's own state at the tick the stream reports
(JSON) or once the engine is paused and the stream has caught up (WARP carries no ticks)."""

import functools
import gc
import io
import json
import math
import socket
import threading
import time

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from swimos import SwimClient
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

import vecswim as vs
from vecswim import client as liveclient
from vecswim import recon
from vecswim.live import (
    CommandSource,
    JsonCodec,
    LiveHub,
    _AgentsLane,
    _AgentsUplink,
    _Connection,
)
from vecswim.server import SQLServer
from vecswim.snapshot import Snapshots

SENSOR = vs.AgentType(
    "sensor",
    key="sensor_id",
    columns=[
        vs.Column("temp", "float64", vs.latest("temp"), emit=True),
        vs.Column("level", "float32", vs.latest("level"), emit=True),
        vs.Column("status", "uint8", vs.hysteresis("temp", up=110.0, down=100.0), emit=True),
    ],
)
ZONE = vs.AgentType(
    "zone",
    key="zone_id",
    columns=[vs.Column("sensors", "int64", emit=True), vs.Column("hottest", "float64", emit=True)],
)
LINK = vs.Link(
    "sensor_zone",
    child="sensor",
    parent="zone",
    via="zone_id",
    aggregates={"sensors": vs.agg.count(), "hottest": vs.agg.max("temp")},
)


class Feed:
    """Seeded sensor events: ``keys`` sensors over ``zones`` zones; each event may move its
    sensor to another zone."""

    def __init__(self, keys=60, zones=4, seed=0):
        self.rng = np.random.default_rng(seed)
        self.keys, self.zones = keys, zones

    def batch(self, n):
        r = self.rng
        return {
            "sensor": pa.RecordBatch.from_pydict(
                {
                    "sensor_id": r.integers(0, self.keys, n),
                    "temp": (r.uniform(90, 120, n) * 64).round() / 64,
                    "level": r.uniform(0, 1, n).astype(np.float32),
                    "zone_id": r.integers(0, self.zones, n),
                }
            )
        }


def make(**kw):
    eng = vs.Engine([SENSOR, ZONE], [LINK])
    feed = Feed(**kw)
    eng.tick(feed.batch(300))
    return eng, feed


def state(eng, agent_type):
    t = eng.state(agent_type).to_pylist()
    key = eng.types[agent_type].key
    return {r.pop(key): r for r in t}


def children(eng, zone):
    links = eng.link_table("sensor_zone").to_pylist()
    kids = {r["child_sensor_id"] for r in links if r["parent_zone_id"] == zone}
    return {k: v for k, v in state(eng, "sensor").items() if k in kids}


def same(a, b):
    """Exact equality of rows; float32 columns compared at float32."""
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, float) or isinstance(y, float):
            if not (np.float32(x) == np.float32(y) if k == "level" else x == y):
                return False
        elif x != y:
            return False
    return True


def wait_for(cond, timeout=20.0, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class Idle:
    """A source with no events of its own: each poll waits its timeout, until ``done``."""

    def __init__(self, done):
        self.done = done

    def poll(self, max_events, timeout):
        if self.done.is_set():
            return None
        time.sleep(timeout)
        return {}


class Ticker:
    """Ticks ``eng`` in a background thread (``engine.tick`` per batch) until stopped."""

    def __init__(self, eng, feed, n=40, pause=0.01, source=None):
        self.eng, self.feed, self.n, self.pause = eng, feed, n, pause
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop.is_set():
            self.eng.tick(self.feed.batch(self.n))
            time.sleep(self.pause)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


@pytest.fixture
def served():
    eng, feed = make()
    srv = SQLServer(Snapshots(eng).attach(), port=0)
    try:
        yield eng, feed, srv, "ws" + srv.url[4:]
    finally:
        srv.close()


# -- WARP with the SwimOS Python client ---------------------------------------------------------
def test_swimos_client_value_and_map_downlinks_sync_then_follow(served):
    eng, feed, _srv, url = served
    zone = 2
    key = next(iter(children(eng, zone)))
    values, agents, kids, synced = [], {}, {}, set()

    def on_update(target):
        return lambda k, new, old: target.__setitem__(k, new)

    def on_remove(target):
        return lambda k, old: target.pop(k, None)

    with SwimClient() as client:
        v = client.downlink_value()
        v.set_host_uri(url).set_node_uri(f"/sensor/{key}").set_lane_uri("temp")
        v.did_set(lambda new, old: values.append(new))
        v.did_sync(lambda: synced.add("value"))
        v.open()
        m = client.downlink_map()
        m.set_host_uri(url).set_node_uri("/sensor").set_lane_uri("agents")
        m.did_update(on_update(agents)).did_remove(on_remove(agents))
        m.did_sync(lambda: synced.add("agents"))
        m.open()
        j = client.downlink_map()
        j.set_host_uri(url).set_node_uri(f"/zone/{zone}").set_lane_uri("sensor_zone")
        j.did_update(on_update(kids)).did_remove(on_remove(kids))
        j.did_sync(lambda: synced.add("link"))
        j.open()
        wait_for(lambda: synced == {"value", "agents", "link"}, what="three synced")
        # synced: each downlink holds the state at one tick boundary (no tick has run since)
        assert values[-1] == state(eng, "sensor")[key]["temp"]
        assert agents.keys() == state(eng, "sensor").keys()
        assert all(same(agents[k], r) for k, r in state(eng, "sensor").items())
        assert kids.keys() == children(eng, zone).keys()
        before = len(values)
        with Ticker(eng, feed, n=30):
            time.sleep(1.5)
        final = state(eng, "sensor")
        wait_for(lambda: values[-1] == final[key]["temp"], what="value lane caught up")
        wait_for(
            lambda: (
                agents.keys() == final.keys() and all(same(agents[k], r) for k, r in final.items())
            ),
            what="agents lane caught up",
        )
        want = children(eng, zone)
        wait_for(
            lambda: kids.keys() == want.keys() and all(same(kids[k], r) for k, r in want.items()),
            what="link lane caught up (moves in and out)",
        )
        assert len(values) > before  # live changes arrived, not only the final state
        v.close()
        m.close()
        j.close()


# -- JSON variant ---------------------------------------------------------------------------------
def recv(ws, timeout=10.0):
    return json.loads(ws.recv(timeout=timeout))


def apply_map(view, frame):
    for k, row in frame["updates"]:
        view[k] = row
    for k in frame["removes"]:
        view.pop(k, None)


@pytest.mark.parametrize(
    ("keys", "compact_rows"), [(60, 50_000), (60, 20), (20_000, 1000)], ids=str
)
def test_json_frames_carry_ticks_and_equal_state_at_that_tick(keys, compact_rows):
    """Record the engine's state after every tick; every map frame must leave the client's
    view equal to the recorded state of the frame's tick for the keys it touched, once a
    tick's frames are all in the whole view must equal the state at that tick, and at the
    end the views equal the final state. Two clients read the agents lane at once. With a
    small ``compact_rows`` their uplinks fall behind every few ticks and catch up from the
    shared lane, in rounds encoded once for both; with 20,000 agents those rounds (and the
    syncs) are encoded a chunk at a time."""
    eng, feed = make(keys=keys)
    if keys > 1000:
        eng.tick(feed.batch(4 * keys))  # most of the agents exist before the clients link
    srv = SQLServer(Snapshots(eng).attach(), port=0)
    url = "ws" + srv.url[4:]
    srv.live.compact_rows = compact_rows
    history = {}  # tick -> the sensor state after it (Arrow, read as dicts when checked)
    # first of the hooks: recorded before the hub hands the tick to the loop
    eng.after_tick.insert(0, lambda s: history.__setitem__(s.tick, eng.state("sensor")))
    history[eng.tick_id] = eng.state("sensor")

    @functools.lru_cache(maxsize=16)
    def snap(tick):
        return {r.pop("sensor_id"): r for r in history[tick].to_pylist()}

    last = []  # the final tick, once the ticker stopped

    def follow(ws, out):
        view, ticks = {}, []
        out.update(view=view, ticks=ticks)
        ws.send(json.dumps({"op": "sync", "node": "/sensor", "lane": "agents"}))
        ws.send(json.dumps({"op": "sync", "node": "/sensor/3", "lane": "status"}))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                f = json.loads(ws.recv(timeout=0.3))
            except TimeoutError:
                # quiet: done once the final tick came (a catch-up of it may take several
                # frames, so not at its first)
                if last and ticks and ticks[-1] >= last[0]:
                    break
                continue
            if f["tag"] == "event" and f["lane"] == "agents":
                if ticks and f["tick"] > ticks[-1]:
                    # the frames of the previous tick are all in: the whole view is the
                    # state at that tick (nothing missed, nothing from another tick)
                    at = snap(ticks[-1])
                    assert view.keys() == at.keys(), ticks[-1]
                    assert all(same(view[k], r) for k, r in at.items()), ticks[-1]
                apply_map(view, f)
                ticks.append(f["tick"])
                at = snap(f["tick"])
                for k, _ in f["updates"]:
                    assert same(view[k], at[k]), (f["tick"], k)
            elif f["tag"] == "event":
                assert f["value"] == snap(f["tick"])[3]["status"]
        out["ok"] = True

    outs = [{}, {}]

    try:
        with (
            connect(url + "/live", max_size=None) as ws1,
            connect(url + "/live", max_size=None) as ws2,
        ):
            readers = [
                threading.Thread(target=follow, args=(ws, out), daemon=True)
                for ws, out in zip((ws1, ws2), outs, strict=True)
            ]
            with Ticker(eng, feed, n=max(25, keys // 8)):
                for r in readers:
                    r.start()
                time.sleep(2.0)
            final = state(eng, "sensor")
            last.append(eng.tick_id)
            for r in readers:
                r.join(70)
        st = srv.live.stats()
    finally:
        srv.close()
    for out in outs:
        assert out.get("ok"), "a reader failed or timed out"
        ticks, view = out["ticks"], out["view"]
        assert ticks == sorted(ticks) and ticks[-1] == last[0]
        assert view.keys() == final.keys() and all(same(view[k], r) for k, r in final.items())
    if compact_rows < 50_000:  # the catch-up path ran, and its rounds served both clients
        assert st["dropped"] > 0 and st["catch_up_sends"] > st["catch_ups"] > 2, st


def test_sync_replies_and_unknown_nodes_and_lanes(served):
    eng, _, _srv, url = served
    with connect(url + "/live") as ws:
        ws.send(json.dumps({"op": "sync", "node": "/sensor/4", "lane": "temp"}))
        assert recv(ws) == {"tag": "linked", "node": "/sensor/4", "lane": "temp"}
        ev = recv(ws)
        assert ev["value"] == state(eng, "sensor")[4]["temp"] and ev["tick"] == eng.tick_id
        assert recv(ws)["tag"] == "synced"
        for node, lane, reason in [
            ("/nope/1", "x", "nodeNotFound"),
            ("/sensor/abc", "temp", "nodeNotFound"),
            ("/sensor/007", "temp", "nodeNotFound"),
            ("/sensor/4", "bogus", "laneNotFound"),
            ("/sensor", "bogus", "laneNotFound"),
            ("/sensor/4", "sensor_zone", "laneNotFound"),  # a sensor is no zone's parent
            ("swimos:meta:mesh", "nope", "laneNotFound"),
        ]:
            ws.send(json.dumps({"op": "link", "node": node, "lane": lane}))
            assert recv(ws) == {"tag": "unlinked", "node": node, "lane": lane, "reason": reason}
        ws.send(json.dumps({"op": "unlink", "node": "/sensor/4", "lane": "temp"}))
        assert recv(ws) == {"tag": "unlinked", "node": "/sensor/4", "lane": "temp", "reason": None}
        # an agent that does not exist yet is a node: linked and synced, no value
        ws.send(json.dumps({"op": "sync", "node": "/sensor/999", "lane": "temp"}))
        assert [recv(ws)["tag"], recv(ws)["tag"]] == ["linked", "synced"]
        eng.tick(
            {
                "sensor": pa.RecordBatch.from_pydict(
                    {"sensor_id": [999], "temp": [101.5], "level": [0.5], "zone_id": [1]}
                )
            }
        )
        ev = recv(ws)
        assert (ev["tag"], ev["value"], ev["tick"]) == ("event", 101.5, eng.tick_id)


def test_warp_envelopes_on_the_wire(served):
    """Raw WARP: the subprotocol, envelopes for link/sync/unlink/not found, map events."""
    eng, _, _srv, url = served
    with connect(url + "/", subprotocols=["warp0"]) as ws:
        assert ws.subprotocol == "warp0"
        ws.send('@sync(node:"/sensor/4",lane:status)')
        assert ws.recv(timeout=10) == '@linked(node:"/sensor/4",lane:status)'
        status = state(eng, "sensor")[4]["status"]
        assert ws.recv(timeout=10) == f'@event(node:"/sensor/4",lane:status){status}'
        assert ws.recv(timeout=10) == '@synced(node:"/sensor/4",lane:status)'
        ws.send('@link(node:"/nope/1",lane:x)')
        assert ws.recv(timeout=10) == '@unlinked(node:"/nope/1",lane:x)@nodeNotFound'
        ws.send('@link(node:"/sensor/4",lane:x)')
        assert ws.recv(timeout=10) == '@unlinked(node:"/sensor/4",lane:x)@laneNotFound'
        ws.send('@sync(node:"/zone/1",lane:sensor_zone)')
        assert ws.recv(timeout=10) == '@linked(node:"/zone/1",lane:sensor_zone)'
        kids = {}
        while True:
            env = recon.parse(ws.recv(timeout=10))
            if env.tag == "synced":
                break
            body = recon.Record(env[1:])
            assert body.tag == "update"
            kids[body[0].value.get("key")] = {s.key: s.value for s in body[1:]}
        want = children(eng, 1)
        assert kids.keys() == want.keys() and all(same(kids[k], r) for k, r in want.items())
        ws.send('@unlink(node:"/zone/1",lane:sensor_zone)')
        assert ws.recv(timeout=10) == '@unlinked(node:"/zone/1",lane:sensor_zone)'


# -- commands ---------------------------------------------------------------------------------
def test_commands_become_events_with_validation_and_dead_letters():
    eng, _feed = make()
    srv = SQLServer(Snapshots(eng).attach(), port=0)
    url = "ws" + srv.url[4:]
    done = threading.Event()
    src = CommandSource(Idle(done), srv.live.commands)
    th = threading.Thread(target=eng.run, args=(src,), kwargs={"tick_ms": 5}, daemon=True)
    try:
        th.start()
        with connect(url + "/", subprotocols=["warp0"]) as ws:
            ws.send('@command(node:"/sensor/5",lane:event){temp:121.5,level:0.25,zone_id:3}')
            ws.send('@command(node:"/sensor/77",lane:event){temp:"hot",level:0.5,zone_id:1}')
        with connect(url + "/live") as ws:
            ws.send(
                json.dumps(
                    {
                        "op": "command",
                        "node": "/sensor/6",
                        "lane": "event",
                        "body": {"temp": 99.0, "level": 1.0, "zone_id": 0},
                    }
                )
            )
            ws.send(
                json.dumps(
                    {"op": "command", "node": "/sensor/6", "lane": "temp", "body": {"temp": 1.0}}
                )
            )
            assert recv(ws)["reason"] == "laneNotFound"
            ws.send(
                json.dumps({"op": "command", "node": "/sensor/6", "lane": "event", "body": [1, 2]})
            )
            assert "record of event fields" in recv(ws)["error"]
        wait_for(
            lambda: (
                eng.dead_letters.reasons and state(eng, "sensor").get(6, {}).get("temp") == 99.0
            ),
            what="commands applied",
        )
    finally:
        done.set()
        th.join(timeout=30)
        srv.close()
    s = state(eng, "sensor")
    assert (s[5]["temp"], s[5]["status"], np.float32(s[5]["level"])) == (121.5, 1, 0.25)
    assert 5 in children(eng, 3) and 77 not in s
    assert dict(eng.dead_letters.reasons) == {"field 'temp': cannot convert to float64": 1}


def test_commands_are_part_of_the_journaled_tick_input(tmp_path):
    """The tick journal stores ``boundary()``: with commands it holds them (as JSON), and
    ``replay`` of that record gives the same input, so a replayed tick ends in the same state."""
    from vecswim.sources import FileSource

    path = tmp_path / "in.ndjson"
    path.write_text(
        "".join(
            json.dumps({"sensor_id": i, "temp": 95.0 + i, "level": 0.5, "zone_id": i % 2}) + "\n"
            for i in range(20)
        )
    )

    def run(replay_record=None):
        eng = vs.Engine([SENSOR, ZONE], [LINK])
        hub = LiveHub(eng, Snapshots(eng))
        src = CommandSource(FileSource([str(path)], "sensor", fmt="ndjson"), hub.commands)
        if replay_record is not None:
            eng.tick(src.replay(json.loads(replay_record), 1.0))
            return eng, None
        for body in ({"temp": 130.0, "level": 0.1, "zone_id": 1}, {"temp": "x", "zone_id": 1}):
            assert hub.commands.submit(hub.resolve("/sensor/3", "event"), body) is None
        events = src.poll(8, 1.0)
        record = json.dumps(src.boundary())  # what the journal writes
        eng.tick(events)
        return eng, record

    eng, record = run()
    assert "commands" in json.loads(record)
    s = state(eng, "sensor")
    assert s[3]["temp"] == 130.0 and len(s) == 8
    assert dict(eng.dead_letters.reasons) == {"field 'temp': cannot convert to float64": 1}
    again, _ = run(record)
    assert state(again, "sensor") == s
    assert dict(again.dead_letters.reasons) == dict(eng.dead_letters.reasons)


# -- bad input, slow subscribers, leaks, tokens -------------------------------------------------
def test_malformed_input_hurts_only_its_connection(served):
    eng, feed, srv, url = served
    with connect(url + "/live") as good, Ticker(eng, feed, n=10):
        good.send(json.dumps({"op": "link", "node": "/sensor", "lane": "agents"}))
        assert recv(good)["tag"] == "linked"
        for bad in ["@link(node:", "{{{{", "@foo(node:a,lane:b)", "@link(lane:x)", "[" * 200]:
            with connect(url + "/", subprotocols=["warp0"]) as ws:
                ws.send(bad)
                with pytest.raises(ConnectionClosed) as e:
                    ws.recv(timeout=10)
                assert e.value.rcvd.code == 1003 and e.value.rcvd.reason
        with connect(url + "/live") as js:
            for bad, msg in [
                ("nope", "bad JSON"),
                ("[1]", "JSON object"),
                ('{"op":"fly"}', "unknown op"),
                ('{"op":"link","node":1,"lane":"x"}', "must be text"),
            ]:
                js.send(bad)
                assert msg in recv(js)["error"]
            js.send(json.dumps({"op": "sync", "node": "/sensor/1", "lane": "temp"}))
            assert recv(js)["tag"] == "linked"  # the connection goes on
        # the good client still gets live updates; the engine still ticks
        t0 = eng.tick_id
        f = recv(good)
        while f["tag"] != "event" or f["tick"] <= t0:
            f = recv(good)
    assert srv.live.stats()["malformed"] == 9


@pytest.mark.parametrize(
    ("node", "lane", "max_pending", "stall", "reason"),
    [
        ("/zone/1", "sensor_zone", 1500, 30.0, "updates pending"),
        ("/sensor", "agents", 1500, 1.0, "no progress for 1s"),
    ],
)
def test_slow_subscriber_is_coalesced_then_closed(node, lane, max_pending, stall, reason):
    """A client that stops reading. A link lane's queue merges to the latest row per key
    (bounded by the children, not the ticks) and the connection is closed once its queue
    passes the cap; an agents lane never queues more than ``compact_rows`` (it catches up
    from the shared lane instead), so it is closed only once no send progressed for
    ``stall_seconds``. The engine ticks on meanwhile."""
    eng, feed = make(keys=3000)
    srv = SQLServer(Snapshots(eng).attach(), port=0)
    hub = srv.live
    hub.max_pending, hub.compact_rows, hub.stall_seconds = max_pending, 1000, stall
    url = "ws" + srv.url[4:]
    queued = []
    try:
        # a small receive window from the start, so that the server's sends back up soon
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", srv.port))
        with connect(url + "/live", sock=sock, max_size=None, max_queue=1) as ws:
            ws.send(json.dumps({"op": "sync", "node": node, "lane": lane}))
            end = time.monotonic() + 30
            while not hub.closed_slow and time.monotonic() < end:
                eng.tick(feed.batch(2000))
                queued.append(max((c.rows for c in list(hub.conns)), default=0))
                time.sleep(0.005)
            wait_for(lambda: hub.closed_slow == 1, what="slow client closed")
            assert hub.stats()["dropped"] > 0  # coalesced before it was closed
            if lane == "agents":
                assert max(queued) <= hub.compact_rows + 2000
            with pytest.raises(ConnectionClosed) as e:
                while True:
                    ws.recv(timeout=10)
            assert e.value.rcvd is None or reason in e.value.rcvd.reason
        wait_for(lambda: hub.stats()["connections"] == 0, what="connection gone")
        assert hub.stats()["links"] == 0
        assert not hub.lanes  # the agents lane's state goes with its last uplink
    finally:
        srv.close()


def test_link_unlink_cycles_leak_nothing(served):
    """10,000 link/sync/unlink cycles over value, agents and link lanes, with ticks between:
    no uplink survives, the hub's tables are empty, and the process holds no more objects than
    after a warm-up (the tick history ring is full by then)."""
    eng, feed, srv, url = served
    hub = srv.live
    lanes = ["temp", "agents", "sensor_zone"]

    def cycles(ws, n):
        for i in range(n):
            lane = lanes[i % 3]
            node = (
                "/sensor"
                if lane == "agents"
                else (f"/zone/{i % 4}" if lane == "sensor_zone" else f"/sensor/{i % 50}")
            )
            ws.send(json.dumps({"op": "sync" if i % 2 else "link", "node": node, "lane": lane}))
            ws.send(json.dumps({"op": "unlink", "node": node, "lane": lane}))
            if i % 100 == 0:
                eng.tick(feed.batch(20))
        seen = 0
        while seen < n:
            seen += recv(ws)["tag"] == "unlinked"
        wait_for(lambda: hub.stats()["links"] == 0, what="links released")

    # bounded histories that the ticks between cycles grow: the engine's recent ticks and
    # emissions, the hub's ring (frozensets of watched links), the test client's own frames;
    # and the loop's pending timers (heartbeats, send time limits), as many as are due later
    bounded = {
        "RecordBatch",
        "TickStats",
        "Int64Array",
        "frozenset",
        "Frame",
        "TimerHandle",
        "Context",
    }

    def count():
        gc.collect()
        objs = gc.get_objects()
        from vecswim import live

        kept = sum(type(o).__name__ not in bounded for o in objs)
        return kept, sum(isinstance(o, live._Uplink) for o in objs)

    with connect(url + "/live") as ws:
        for _ in range(300):  # fill the tick history ring
            eng.tick(feed.batch(5))
        cycles(ws, 600)
        before, _ = count()
        cycles(ws, 10_000)
        after, uplinks = count()
    assert uplinks == 0
    assert after - before < 200, after - before
    assert not any(hub.values.get("sensor", {}).values())
    assert not hub.agents.get("sensor") and not any(hub.link_lanes.get("sensor_zone", {}).values())


def test_token_guards_the_websocket_upgrade():
    eng, _ = make()
    srv = SQLServer(Snapshots(eng).attach(), port=0, token="s3cret")
    url = "ws" + srv.url[4:]
    try:
        for path in ("/live", "/", "/warp"):
            with pytest.raises(InvalidStatus) as e:
                connect(url + path)
            assert e.value.response.status_code == 401
        with connect(url + "/live", additional_headers={"Authorization": "Bearer s3cret"}) as ws:
            ws.send(json.dumps({"op": "link", "node": "/sensor/1", "lane": "temp"}))
            assert recv(ws)["tag"] == "linked"
        with connect(url + "/?token=s3cret", subprotocols=["warp0"]) as ws:
            ws.send('@link(node:"/sensor/1",lane:temp)')
            assert ws.recv(timeout=10).startswith("@linked")
    finally:
        srv.close()


def test_pulse_lane_and_watch_command(served):
    eng, feed, srv, _url = served
    with Ticker(eng, feed, n=20):
        out = io.StringIO()
        n = liveclient.watch(srv.url, "swimos:meta:mesh", [], count=2, seconds=10, out=out)
        pulses = [json.loads(line.split(" = ", 1)[1]) for line in out.getvalue().splitlines()]
        assert n == 2 and pulses[1]["ticks"] >= pulses[0]["ticks"]
        assert pulses[1]["agents_by_type"]["sensor"] == 60
    # no ticks: the three lines are the syncs, in the order the lanes were linked (with
    # ticks, a live change of the first lane may come before the sync of the last)
    out = io.StringIO()
    liveclient.watch(srv.url, "/sensor/2", [], count=3, seconds=10, out=out)
    lines = out.getvalue().splitlines()
    assert [line.split()[3] for line in lines] == ["temp", "level", "status"]
    row = state(eng, "sensor")[2]
    assert [json.loads(line.split(" = ", 1)[1]) for line in lines] == [
        row["temp"],
        pytest.approx(row["level"]),
        row["status"],
    ]
    with pytest.raises(liveclient.ClientError, match="no such lane"):
        liveclient.watch(srv.url, "/sensor/2", ["bogus"], seconds=5)


@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**63 - 1)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=8),
        lambda inner: st.dictionaries(
            st.from_regex(r"[a-z][a-z0-9_]{0,5}", fullmatch=True), inner, min_size=1, max_size=4
        ),
        max_leaves=10,
    )
)
@settings(max_examples=300, deadline=None)
def test_recon_writes_what_it_parses(v):
    """write then parse is the identity on the values vecswim sends (records as dicts)."""

    def norm(x):
        if x is recon.EXTANT:  # a slot without a value: absent and extant read alike
            return None
        if isinstance(x, recon.Record):
            return {s.key: norm(s.value) for s in x}
        if isinstance(x, dict):
            return {k: norm(y) for k, y in x.items()}
        return x

    text = recon.write(v)
    if v is None:
        assert text == ""
        return
    got = norm(recon.parse(text))
    if isinstance(v, float):
        assert got == v or (math.isnan(got) and math.isnan(v))
    else:
        assert got == norm(v)


@settings(max_examples=60, deadline=None)
@given(
    string_keys=st.booleans(),
    first=st.integers(0, 40),
    ticks=st.lists(
        st.lists(st.tuples(st.integers(0, 300), st.integers(-5, 5)), max_size=30), max_size=12
    ),
    cursors=st.lists(st.integers(-1, 14), min_size=1, max_size=4),
    defer_at=st.integers(0, 13),
)
def test_agents_lane_returns_the_latest_row_per_key_changed_since_a_cursor(
    string_keys, first, ticks, cursors, defer_at
):
    """The shared agents lane against a dict model: rows emitted tick by tick (new agents
    past the end, gaps, repeats within a tick: the last wins, as the engine emits at most
    once per row; a tick without rows only advances the lane), then for any cursor the rows
    changed after it, each at its latest value. From tick ``defer_at`` on the ticks come
    while a catch-up reads the lane (deferred): it stays as of the tick before, and
    ``resume`` brings it to the newest."""
    ktype = pa.large_string() if string_keys else pa.int64()

    def key(r):
        return f"k{r}" if string_keys else r * 7

    base = pa.table(
        {"id": pa.array([key(r) for r in range(first)], ktype), "v": np.arange(first) * 1.5}
    )
    lane = _AgentsLane(base, 1)
    model = {r: (key(r), r * 1.5, 1) for r in range(first)}  # row -> key, value, tick

    def check(model, c):
        got = lane.since(c)
        want = sorted((r, k, v) for r, (k, v, t) in model.items() if t > c)
        if not want:
            assert got is None
            return
        assert got.column_names == ["id", "v"] and got.schema.field(0).type == ktype
        assert got.column("id").to_pylist() == [k for _, k, _ in want]
        assert got.column("v").to_pylist() == [v for _, _, v in want]

    held = None  # the model and tick when the deferral began
    for tick, rows in enumerate(ticks, start=2):
        if tick - 2 == defer_at:
            lane.deferred, held = [], (dict(model), lane.tick)
        if not rows:
            lane.advance(tick)
            continue
        last = dict(rows)  # one emission per row per tick
        rs = np.array(sorted(last), np.int64)
        vals = np.array([float(last[r]) for r in rs])
        batch = pa.RecordBatch.from_pydict({"id": pa.array([key(r) for r in rs], ktype), "v": vals})
        lane.apply(tick, rs, batch)
        for r in rs:
            model[int(r)] = (key(int(r)), float(last[int(r)]), tick)
    if held is not None:
        assert lane.tick == held[1]
        for c in cursors:
            check(held[0], c)
        lane.resume()
    assert lane.tick == len(ticks) + 1 and lane.deferred is None
    for c in cursors:
        check(model, c)


def test_an_uplink_that_takes_an_older_catch_up_round_catches_up_again():
    """Two lagging agents-lane uplinks, driven by hand: A takes a catch-up round, ticks go
    by (B, behind, is offered nothing), then B takes the same round, gathered ticks ago. B
    must stay behind and catch up from that round's tick: its view ends equal to the state
    at the newest tick, not at the round's."""
    eng, feed = make()
    snaps = Snapshots(eng).attach()
    hub = LiveHub(eng, snaps)  # no loop: ticks are handed over by draining by hand
    eng.after_tick.append(hub.after_tick)
    try:
        with snaps.reader() as view:
            t0, table = view.tick, view.emitted_columns("sensor")
        hub.lanes["sensor"] = hub._new_lane("sensor", table, t0)
        ups = []
        for _ in range(2):
            conn = _Connection(hub, None, None, JsonCodec())
            up = _AgentsUplink(conn, hub.resolve("/sensor", "agents"), sync=True)
            up.syncing, up.cursor, up.behind = False, -1, True
            hub.agents.setdefault("sensor", set()).add(up)
            ups.append(up)
        a, b = ups
        views = [{}, {}]

        def take(i, up):
            for entry in up.take():
                for k, row in zip(
                    entry.updates.column(0).to_pylist(),
                    entry.updates.drop_columns([entry.updates.column_names[0]]).to_pylist(),
                    strict=True,
                ):
                    views[i][k] = row

        take(0, a)  # a round from cursor -1 at t0
        for _ in range(3):
            eng.tick(feed.batch(25))
            hub._drain()
        assert hub.lanes["sensor"].tick == eng.tick_id > t0
        take(1, b)  # the same round: state at t0
        assert b.cursor == t0 and b.behind
        assert hub.stats()["catch_ups"] == 1 and hub.stats()["catch_up_sends"] == 2
        take(1, b)  # a new round from t0
        assert b.cursor == eng.tick_id and not b.behind
        take(0, a)  # a kept up: its queued ticks
        final = state(eng, "sensor")
        for v in views:
            assert v.keys() == final.keys() and all(same(v[k], r) for k, r in final.items())
    finally:
        hub.close_encoder()
