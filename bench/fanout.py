"""Live fan-out under load: tick latency and emission-to-client latency against the number of
WebSocket subscribers, measured side by side in one run.

    python -m bench.fanout [--agents 1000000] [--rate 1000000] [--clients 0,100,1000,10000]
                           [--seconds 10] [--protocol json|warp] [--map-clients 10]
                           [--catch-up-share F]

One process runs the ``engines`` scenario engine (``--agents`` engines loaded up front, the
generator offering ``--rate`` events/s in 10 ms ticks) with the SQL/live server. For each
client count a second process opens that many WebSocket connections, each linked to the
``engine_temp`` value lane of a random engine, plus 10 connections on each agent type's
``agents`` map lane; it records the arrival wall time of every event. Per phase the bench
reports the tick p50/p99 (``Engine.recent``, ticks that ended inside the measuring window),
events/s applied, the emission-to-client latency p50/p99/max (arrival time minus the wall time
at which the tick ended, by the tick each JSON frame carries; WARP frames carry no tick, so
``--protocol warp`` reports tick times only), frames received, the map lane megabytes per
second the clients received, and the server's resident memory per link (RSS with the clients
minus RSS before they connected, over the links), the cores the server process and the client
process used, and the server's garbage collections inside the window (per generation, and the
objects they scan and that are frozen out of them). Tick p99 is compared with the median of the
no-client phases of the run; at the end the phases of each client count are pooled (one p99
over all their ticks and frames: e.g. ``--clients 0,10000,0,10000,0,10000,0``).

The client process competes with the engine for this machine's two cores: its figures are an
upper bound of what a separate client machine would see. It runs no garbage collection during
a phase (its own collections were counted as server latency).
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import gc
import json
import os
import re
import subprocess
import sys
import threading
import time

import numpy as np
import psutil

from bench.common import loaded_engines
from vecswim.server import SQLServer
from vecswim.snapshot import Snapshots
from vecswim.sources import GeneratorSource

MAP_CLIENTS = 10
_TICK = re.compile(r'"tick": ?(\d+)')


# -- client process -----------------------------------------------------------------------------
async def _clients(url: str, keys: list[int], types: list[str], seconds: float, proto: str):
    import aiohttp

    arrivals: list[tuple[int, float]] = []  # (tick, wall time) of value-lane events
    map_arrivals: list[tuple[int, float]] = []  # and of map-lane frames
    map_frames = [0]
    map_bytes = [0]
    value_frames = [0]
    ready = asyncio.Event()
    opened = [0]
    total = len(keys) + MAP_CLIENTS * len(types)
    conn = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=60)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:

        async def one(node: str, lane: str, is_map: bool) -> None:
            try:
                await _one(node, lane, is_map)
            except Exception as e:
                print(f"client {node} {lane}: {type(e).__name__}: {e}", file=sys.stderr)
                raise

        async def _one(node: str, lane: str, is_map: bool) -> None:
            path = "/live" if proto == "json" else "/warp"
            kw = {} if proto == "json" else {"protocols": ("warp0",)}
            for attempt in range(20):
                try:
                    ws = await session.ws_connect(url + path, max_msg_size=0, **kw)
                    break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.2 * (attempt + 1))
            else:
                raise SystemExit(f"could not connect to {url}")
            async with ws:
                if proto == "json":
                    await ws.send_str(json.dumps({"op": "link", "node": node, "lane": lane}))
                else:
                    await ws.send_str(f'@link(node:"{node}",lane:{lane})')
                opened[0] += 1
                if opened[0] == total:
                    ready.set()
                async for msg in ws:  # the bench cancels this task at the end
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        break
                    now = time.time()
                    if proto == "json":
                        # the tick from the frame's head: a map frame can be large, and
                        # parsing it whole here would make this process the bottleneck
                        m = _TICK.search(msg.data, 0, 300)
                        if m is None:
                            continue
                        if is_map:
                            map_frames[0] += 1
                            map_bytes[0] += len(msg.data)
                            map_arrivals.append((int(m.group(1)), now))
                        else:
                            value_frames[0] += 1
                            arrivals.append((int(m.group(1)), now))
                    elif msg.data.startswith("@event"):
                        if is_map:
                            map_frames[0] += 1
                            map_bytes[0] += len(msg.data)
                        else:
                            value_frames[0] += 1

        tasks = []
        for i, k in enumerate(keys):
            tasks.append(asyncio.create_task(one(f"/engine/{k}", "engine_temp", False)))
            if i % 200 == 199:
                await asyncio.sleep(0.05)  # don't overrun the listen backlog
        for t in types:
            for _ in range(MAP_CLIENTS):
                tasks.append(asyncio.create_task(one(f"/{t}", "agents", True)))
        if total:
            try:
                await asyncio.wait_for(ready.wait(), 120)
            except TimeoutError:
                raise SystemExit(f"only {opened[0]} of {total} clients linked in 120 s") from None
        # the harness's own pauses must not count as server latency: its 10,000 connections
        # live until the end (frozen out of collections), and for the phase it collects
        # nothing (its garbage is freed by reference counts; a collection of the young
        # objects of 10,000 connections paused it for 40-60 ms every few seconds)
        gc.freeze()
        gc.disable()
        print("READY", flush=True)
        # the bench says when the window starts (read in a thread: the loop keeps reading)
        start = float(await asyncio.to_thread(sys.stdin.readline))
        arrivals.clear()
        map_arrivals.clear()
        map_frames[0] = value_frames[0] = map_bytes[0] = 0
        await asyncio.sleep(max(0.0, start + seconds - time.time()))
        for t in tasks:
            t.cancel()
        result = {
            "arrivals": arrivals,
            "map_arrivals": map_arrivals,
            "map_frames": map_frames[0],
            "map_bytes": map_bytes[0],
            "value_frames": value_frames[0],
        }
        print(json.dumps(result), flush=True)
        await asyncio.gather(*tasks, return_exceptions=True)


def client_main(argv: list[str]) -> None:
    url, seconds, proto, types = argv[0], float(argv[1]), argv[2], argv[3].split(",")
    global MAP_CLIENTS
    MAP_CLIENTS = int(argv[4])
    keys = [int(k) for k in sys.stdin.readline().split()]
    asyncio.run(_clients(url, keys, [t for t in types if t], seconds, proto))


# -- bench process ------------------------------------------------------------------------------
def _cores(now, before, seconds: float) -> float:
    """Cores used between two ``cpu_times`` readings ``seconds`` apart."""
    return round((now.user + now.system - before.user - before.system) / seconds, 2)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        client_main(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--agents", type=int, default=1_000_000)
    ap.add_argument("--rate", type=float, default=1_000_000)
    ap.add_argument("--clients", default="0,100,1000,10000")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--protocol", choices=["json", "warp"], default="json")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--map-clients", type=int, default=MAP_CLIENTS, help="clients per agents lane")
    ap.add_argument(
        "--catch-up-share",
        type=float,
        default=None,
        help="the hub's catch_up_share (default: the hub's own)",
    )
    args = ap.parse_args()
    counts = [int(c) for c in args.clients.split(",")]

    t0 = time.perf_counter()
    eng, gen = loaded_engines(args.agents, seed=args.seed)
    print(f"loaded {args.agents:,} agents in {time.perf_counter() - t0:.1f}s", flush=True)
    ended: dict[int, float] = {}
    eng.after_tick.insert(0, lambda s: ended.__setitem__(s.tick, time.time()))
    srv = SQLServer(Snapshots(eng).attach(), port=0)
    if args.catch_up_share is not None:
        srv.live.catch_up_share = args.catch_up_share
    url = "ws" + srv.url[4:]
    keys = eng.state("engine").column("engine_id").to_numpy()
    rng = np.random.default_rng(args.seed)
    stop = threading.Event()
    src = GeneratorSource(gen.make, rate=args.rate)
    runner = threading.Thread(
        target=eng.run, args=(src,), kwargs={"tick_ms": 10.0, "stop": stop}, daemon=True
    )
    runner.start()
    proc_self = psutil.Process()
    gc_pauses: list[tuple[int, float]] = []  # (generation, seconds) of each collection
    gc_start = [0.0]

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            gc_start[0] = time.perf_counter()
        else:
            gc_pauses.append((info["generation"], time.perf_counter() - gc_start[0]))

    gc.callbacks.append(on_gc)
    rows = []
    pooled: dict[int, list[np.ndarray]] = {}  # client count -> tick durations (ms) of its phases
    pooled_lat: dict[int, list[np.ndarray]] = {}
    try:
        time.sleep(3.0)  # warm up: JIT, snapshot buffers
        for n in counts:
            client = None
            rss0 = proc_self.memory_info().rss
            types = ",".join(eng.types) if n and args.map_clients else ""
            if n:
                client = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "bench.fanout",
                        "--client",
                        url,
                        str(args.seconds),
                        args.protocol,
                        types,
                        str(args.map_clients),
                    ],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
                sample = rng.choice(keys, size=n, replace=False) if n else []
                client.stdin.write(" ".join(str(int(k)) for k in sample) + "\n")
                client.stdin.flush()
                line = client.stdout.readline()
                if line.strip() != "READY":
                    faulthandler.dump_traceback(all_threads=True)  # what the server was doing
                    raise SystemExit(f"client process failed: {line!r}")
                time.sleep(5.0)  # links set up and the backlog of the set-up drained
            rss1 = proc_self.memory_info().rss
            links = srv.live.stats()["links"]
            start = time.time()
            ev0 = eng.totals["events"]
            gc_pauses.clear()
            resyncs0 = srv.live.stats()["resyncs"]
            cpu_server = proc_self.cpu_times()
            cpu_client = psutil.Process(client.pid).cpu_times() if client is not None else None
            if client is not None:
                client.stdin.write(f"{start}\n")
                client.stdin.flush()
            time.sleep(args.seconds)
            end = time.time()
            # cores used in the window: the server process, and the client harness
            cores = [_cores(proc_self.cpu_times(), cpu_server, end - start)]
            if client is not None:
                cores.append(
                    _cores(psutil.Process(client.pid).cpu_times(), cpu_client, end - start)
                )
            events = eng.totals["events"] - ev0
            # collections inside the window only (the phase's connections closing afterwards
            # unfreeze them, and the next full collection is not the window's)
            in_window = list(gc_pauses)
            gc_counts = (len(gc.get_objects()), gc.get_freeze_count())
            ticks = [s for s in list(eng.recent) if start <= ended.get(s.tick, 0) < end]
            secs = np.array([s.seconds for s in ticks]) * 1e3
            pooled.setdefault(n, []).append(secs)
            lat = mlat = at = np.zeros(0)
            frames = (0, 0)
            map_mb = 0.0
            if client is not None:
                out = json.loads(client.stdout.readline())
                client.stdin.close()
                client.wait(timeout=120)
                lat = np.array([(t - ended[k]) * 1e3 for k, t in out["arrivals"] if k in ended])
                at = np.array([t - start for k, t in out["arrivals"] if k in ended])
                mlat = np.array(
                    [(t - ended[k]) * 1e3 for k, t in out["map_arrivals"] if k in ended]
                )
                frames = (out["value_frames"], out["map_frames"])
                pooled_lat.setdefault(n, []).append(lat)
                map_mb = out["map_bytes"] / 1e6 / args.seconds
            row = {
                "clients": n,
                "links": links,
                "ticks": len(ticks),
                "events_per_s": events / (end - start),
                "tick_p50_ms": float(np.percentile(secs, 50)) if len(secs) else float("nan"),
                "tick_p99_ms": float(np.percentile(secs, 99)) if len(secs) else float("nan"),
                "lat_p50_ms": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
                "lat_p99_ms": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
                "lat_max_ms": float(lat.max()) if len(lat) else float("nan"),
                "map_lat_p99_ms": float(np.percentile(mlat, 99)) if len(mlat) else float("nan"),
                "value_frames": frames[0],
                "map_frames": frames[1],
                "map_mb_per_s": map_mb,
                "bytes_per_link": (rss1 - rss0) / links if links else float("nan"),
                "server_cores": cores[0],
                "client_cores": cores[1] if len(cores) > 1 else 0.0,
                "closed_slow": srv.live.stats()["closed_slow"],
                "resyncs": srv.live.stats()["resyncs"] - resyncs0,
                "gc_max_ms": max((p for _, p in in_window), default=0.0) * 1e3,
                "gc_total_ms": sum(p for _, p in in_window) * 1e3,
                # per generation: collections, the longest and all together (ms)
                "gc_by_generation": {
                    g: [len(ps), round(max(ps) * 1e3, 1), round(sum(ps) * 1e3, 1)]
                    for g in range(3)
                    if (ps := [p for gg, p in in_window if gg == g])
                },
                # tracked objects that collections scan, and those frozen out of them, at the end
                "gc_tracked": gc_counts[0],
                "gc_frozen": gc_counts[1],
                # the worst latency in each second of the window: where the tail comes from
                "lat_max_by_second_ms": [
                    round(float(lat[(at >= i) & (at < i + 1)].max()), 1)
                    if ((at >= i) & (at < i + 1)).any()
                    else None
                    for i in range(int(args.seconds))
                ]
                if n
                else [],
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            # the connections wind down before the next phase (a later no-client phase is a
            # second baseline only once they are gone)
            wind = time.monotonic() + 60
            while srv.live.stats()["connections"] and time.monotonic() < wind:
                time.sleep(0.2)
            time.sleep(1.0)
    finally:
        stop.set()
        runner.join(timeout=60)
        srv.close()
    # this machine's own noise is as large as the effect measured: with several no-client
    # phases (e.g. --clients 0,10000,0,10000,0) the ratio is against their median
    bases = [r["tick_p99_ms"] for r in rows if r["clients"] == 0]
    base = float(np.median(bases)) if bases else float("nan")
    print(
        f"\n{os.uname().nodename}: {psutil.cpu_count()} cores, {args.agents:,} agents, "
        f"{args.rate:,.0f} events/s offered, {args.protocol}, {args.seconds:g}s per phase, "
        f"{args.map_clients} clients per agents lane, catch_up_share {srv.live.catch_up_share}"
    )
    print(f"no-client tick p99s: {', '.join(f'{b:.2f}ms' for b in bases)}; x none is their median")
    print(
        "clients   links  events/s   tick p50  tick p99 (x none)  lat p50  lat p99  lat max"
        "  map lat p99  value frames  map frames  map MB/s  KiB/link  cores (server, client)"
    )
    for r in rows:
        print(
            f"{r['clients']:>7,} {r['links']:>7,} {r['events_per_s']:>9,.0f} "
            f"{r['tick_p50_ms']:>8.2f}ms {r['tick_p99_ms']:>7.2f}ms "
            f"({r['tick_p99_ms'] / base:4.2f})"
            f" {r['lat_p50_ms']:>7.1f}ms {r['lat_p99_ms']:>7.1f}ms {r['lat_max_ms']:>7.1f}ms"
            f" {r['map_lat_p99_ms']:>10.1f}ms"
            f" {r['value_frames']:>13,} {r['map_frames']:>11,} {r['map_mb_per_s']:>9.1f}"
            f" {r['bytes_per_link'] / 1024:>9.1f}  {r['server_cores']:.2f}, {r['client_cores']:.2f}"
        )
    # the phases of one client count pooled: a p99 over all their ticks (and frames) is
    # steadier than one phase's, which the machine's noise moves by up to 1.3x
    none = np.concatenate(pooled.get(0, [np.zeros(0)]))
    base_pooled = float(np.percentile(none, 99)) if len(none) else float("nan")
    print("\npooled over the phases of each client count:")
    print("clients  phases  ticks  tick p99 (x none)  lat p99  lat max")
    for n, parts in pooled.items():
        t = np.concatenate(parts)
        lat = np.concatenate(pooled_lat.get(n, [np.zeros(0)]))
        p99 = float(np.percentile(t, 99)) if len(t) else float("nan")
        lp = f"{np.percentile(lat, 99):>7.1f}ms {lat.max():>7.1f}ms" if len(lat) else ""
        print(f"{n:>7,} {len(parts):>7} {len(t):>6} {p99:>8.2f}ms ({p99 / base_pooled:4.2f})  {lp}")


if __name__ == "__main__":
    main()
