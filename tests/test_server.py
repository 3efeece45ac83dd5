"""The SQL endpoint of a running engine: consistency under load, results against the
reference model, safety (read-only, no files or network, token, limits), and `vecswim sql`."""

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest
from vecswim.scenarios import engines

import vecswim as vs
from tests.helpers import INVARIANT, canon_ref, canon_rows
from vecswim.server import ARROW_STREAM, SQLServer
from vecswim.snapshot import Snapshots


def post(url, query, accept="application/json", token=None):
    req = urllib.request.Request(f"{url}/sql", data=query.encode(), method="POST")
    req.add_header("Accept", accept)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


class Paced:
    """A list of ticks' events, with a pause before each, and a record of progress."""

    def __init__(self, ticks, pause=0.002):
        self.ticks = list(ticks)
        self.pause = pause
        self.i = 0

    def poll(self, max_events, timeout):
        if self.i == len(self.ticks):
            return None
        time.sleep(self.pause)
        self.i += 1
        return self.ticks[self.i - 1]


def serve(engine, **kw):
    return SQLServer(Snapshots(engine).attach(), port=0, **kw)


def test_results_equal_reference_at_the_reported_tick():
    gen = engines.Generator(1500, seed=8, relink=0.05, period=20.0)
    ticks = [gen.make(400) for _ in range(80)]
    ref = engines.Reference()
    fleets_at, engines_at = {}, {}
    for i, b in enumerate(ticks, start=1):
        ref.tick(b)
        fleets_at[i] = canon_ref({k: dict(v) for k, v in ref.fleets.items()})
        engines_at[i] = canon_ref(
            {k: {c: e[c] for c in ("engine_temp", "status")} for k, e in ref.engines.items()}
        )
    eng = engines.build_engine(1500)
    srv = serve(eng)
    runner = threading.Thread(target=eng.run, args=(Paced(ticks),), kwargs={"max_events": 10**6})
    runner.start()
    seen = set()
    try:
        while runner.is_alive() or len(seen) < 3:
            code, body, headers = post(srv.url, "SELECT * FROM fleet", ARROW_STREAM)
            assert code == 200
            tick = int(headers["X-Vecswim-Tick"])
            if tick == 0:
                continue
            got = canon_rows(ipc.open_stream(pa.py_buffer(body)).read_all().to_pylist(), "fleet_id")
            assert got == fleets_at[tick], tick
            code, body, headers = post(
                srv.url, "SELECT engine_id, engine_temp, status FROM engine", ARROW_STREAM
            )
            tick = int(headers["X-Vecswim-Tick"])
            got = canon_rows(
                ipc.open_stream(pa.py_buffer(body)).read_all().to_pylist(), "engine_id"
            )
            assert got == engines_at[tick], tick
            seen.add(tick)
            if not runner.is_alive():
                break
    finally:
        runner.join()
        srv.close()
    assert len(seen) >= 3  # queries really interleaved with ticks


def test_invariants_hold_on_thousands_of_live_queries():
    """Parent aggregates equal their children's, in every result, while ticks with re-linking
    run: a query that saw half a tick would break them."""
    gen = engines.Generator(3000, seed=9, relink=0.2, period=10.0)
    eng = engines.build_engine(3000)
    srv = serve(eng)
    done = threading.Event()
    # ticks keep coming until every client is finished
    source = vs.GeneratorSource(lambda n: gen.make(1500) if not done.is_set() else None)
    runner = threading.Thread(target=eng.run, args=(source,), kwargs={"max_events": 1500})
    results, errors = [], []

    def client():
        for _ in range(500):
            code, body, headers = post(srv.url, INVARIANT)
            if code != 200:
                errors.append(body)
                continue
            row = json.loads(body)["rows"][0]
            results.append((row, int(headers["X-Vecswim-Tick"])))

    clients = [threading.Thread(target=client) for _ in range(4)]
    runner.start()
    for c in clients:
        c.start()
    for c in clients:
        c.join()
    done.set()
    runner.join()
    srv.close()
    assert not errors
    assert len(results) == 2000
    assert all(row == [0, 0, tick] for row, tick in results)
    assert len({tick for _, tick in results}) > 1  # the state moved under the queries


@pytest.fixture(scope="module")
def server():
    eng = engines.build_engine(500)
    eng.tick(engines.Generator(500, seed=1).make(2000))
    srv = serve(eng, token="s3cret", timeout=0.5, max_rows=10)
    srv.engines = eng.tables["engine"].n
    yield srv
    srv.close()


@pytest.mark.parametrize(
    "query",
    [
        "CREATE TABLE x AS SELECT 1",
        "INSERT INTO engine VALUES (1, 1, 1, 1, 1)",
        "UPDATE engine SET status = 0",
        "DELETE FROM engine",
        "COPY engine TO '/tmp/vecswim-leak.csv'",
        "ATTACH '/tmp/x.duckdb' AS x",
        "INSTALL httpfs",
        "LOAD httpfs",
        "SET threads = 64",
        "PRAGMA threads = 64",
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT * FROM read_text('/etc/hostname')",
        "SELECT * FROM read_parquet('http://127.0.0.1:1/x.parquet')",
        "SELECT * FROM glob('/*')",
        "SELECT 1; SELECT 2",
    ],
)
def test_forbidden_statements_and_functions_are_refused(server, query):
    code, body, _ = post(server.url, query, token="s3cret")
    assert code == 400
    assert json.loads(body)["error"]
    code, body, _ = post(server.url, "SELECT count(*) AS n FROM engine", token="s3cret")
    assert code == 200 and json.loads(body)["rows"] == [[server.engines]]


def test_token_is_enforced(server):
    assert post(server.url, "SELECT 1")[0] == 401
    assert post(server.url, "SELECT 1", token="wrong")[0] == 401
    assert post(server.url, "SELECT 1", token="s3cret")[0] == 200


def test_time_and_row_limits(server):
    code, body, _ = post(server.url, "SELECT count(*) FROM range(100000000000) a", token="s3cret")
    assert code == 400 and "time limit" in json.loads(body)["error"]
    code, body, headers = post(server.url, "SELECT * FROM range(1000) ORDER BY 1", token="s3cret")
    d = json.loads(body)
    assert code == 200 and d["truncated"] is True and headers["X-Vecswim-Truncated"] == "True"
    assert d["rows"] == [[i] for i in range(10)]


def test_vecswim_sql_cli_against_a_running_engine(tmp_path):
    exe = str(Path(sys.executable).parent / "vecswim")
    port = "17654"
    run = subprocess.Popen(
        [
            exe,
            "run",
            "engines",
            "--agents",
            "5000",
            "--rate",
            "20000",
            "--seconds",
            "600",  # ended by the test; long enough for a slow, shared machine
            "--sql-port",
            port,
            "--quiet",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"

    def sql(*args):
        return subprocess.run(
            [exe, "sql", "--url", url, *args], capture_output=True, text=True, timeout=60
        )

    try:
        deadline = time.monotonic() + 120
        while sql("SELECT 1").returncode != 0:
            assert time.monotonic() < deadline and run.poll() is None
            time.sleep(0.2)
        r = sql("SELECT status, count(*) AS n FROM engine GROUP BY status ORDER BY status")
        assert r.returncode == 0 and "status" in r.stdout and "rows at tick" in r.stdout
        r = sql("SELECT fleet_id, engines FROM fleet ORDER BY fleet_id", "--format", "csv")
        assert r.stdout.splitlines()[0] == '"fleet_id","engines"'
        r = sql("SELECT count(*) AS n FROM engine_fleet", "--format", "json")
        assert json.loads(r.stdout)["n"] > 0
        out = tmp_path / "f.parquet"
        assert (
            sql("SELECT * FROM fleet", "--format", "parquet", "--output", str(out)).returncode == 0
        )
        assert pq.read_table(out).num_rows == 5
        r = sql("--tables")
        assert "engine: engine_id int64" in r.stdout and "emissions:" in r.stdout
        r = sql("SELECT nope FROM engine")
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
        assert r.stderr.startswith("vecswim: error: Binder Error")
        r = sql("DROP TABLE engine")
        assert r.returncode == 1 and "only read-only SELECT" in r.stderr
    finally:
        run.terminate()
        run.wait()
    r = sql("SELECT 1")
    assert r.returncode == 1 and "no engine is listening" in r.stderr


def test_snapshot_memory_and_engine_sql_unchanged():
    eng = engines.build_engine(1000)
    snaps = Snapshots(eng).attach()
    eng.tick(engines.Generator(1000, seed=2).make(3000))
    assert eng.sql("SELECT count(*) AS n FROM engine").column("n")[0].as_py() == len(
        set(eng.state("engine").column("engine_id").to_pylist())
    )
    with snaps.reader() as view:
        assert view.tick == 1
    assert snaps.nbytes > 0
    assert isinstance(eng.sql("SELECT 1 AS x", output="polars").item(), int)
    assert vs.SQLError


# -- the endpoint survives abuse ---------------------------------------------------------------


class Live:
    """An engine ticking in a background thread (until ``stop()``) with a SQL server on it."""

    def __init__(self, **kw):
        gen = engines.Generator(2000, seed=3)
        self.eng = engines.build_engine(2000)
        self.eng.tick(gen.make(2000))  # compile before the clock starts
        self.srv = serve(self.eng, **kw)
        self.done = threading.Event()
        source = vs.GeneratorSource(lambda n: None if self.done.is_set() else gen.make(500))
        self.runner = threading.Thread(
            target=self.eng.run, args=(source,), kwargs={"max_events": 500, "tick_ms": 2}
        )
        self.runner.start()

    @property
    def ticks(self):
        return self.eng.totals["ticks"]

    def stop(self):
        self.done.set()
        self.runner.join()
        self.srv.close()


def raw(srv, data, timeout=30.0, then=None):
    """Send ``data`` on a fresh connection, read until the server closes it; returns
    (status, headers, body) or (None, {}, b"") if the server closed without answering."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=timeout) as s:
        s.sendall(data)
        if then is not None:
            then(s)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    if not out:
        return None, {}, b""
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def request(method, path, body=b"", headers=(), length=True):
    head = [f"{method} {path} HTTP/1.1", "Host: test", "Connection: close", *headers]
    if length:
        head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


JSON = "Content-Type: application/json"
MALFORMED = {
    "bad JSON": (request("POST", "/sql", b'{"query": ', [JSON]), 400),
    "query is a number": (request("POST", "/sql", b'{"query": 1}', [JSON]), 400),
    "query is null": (request("POST", "/sql", b'{"query": null}', [JSON]), 400),
    "query is a list": (request("POST", "/sql", b'{"query": ["SELECT 1"]}', [JSON]), 400),
    "JSON not an object": (request("POST", "/sql", b'["SELECT 1"]', [JSON]), 400),
    "JSON without query": (request("POST", "/sql", b'{"sql": "SELECT 1"}', [JSON]), 400),
    "empty body": (request("POST", "/sql", b""), 400),
    "body not UTF-8": (request("POST", "/sql", b"SELECT '\xff\xfe'"), 400),
    "NUL in query": (request("POST", "/sql", b"SELECT 1\x00"), 400),
    "non-numeric Content-Length": (
        request("POST", "/sql", b"SELECT 1", ["Content-Length: abc"], length=False),
        400,
    ),
    "negative Content-Length": (
        request("POST", "/sql", b"", ["Content-Length: -5"], length=False),
        400,
    ),
    "two Content-Lengths": (
        request("POST", "/sql", b"SELECT 1", ["Content-Length: 8", "Content-Length: 9"], False),
        400,
    ),
    "missing Content-Length": (request("POST", "/sql", length=False), 411),
    "oversized body": (request("POST", "/sql", b"SELECT 1" + b" " * 5000), 413),
    "oversized Content-Length, no body": (
        request("POST", "/sql", headers=["Content-Length: 999999999999"], length=False),
        413,
    ),
    "oversized chunked body": (
        request(
            "POST",
            "/sql",
            b"1388\r\n" + b" " * 5000 + b"\r\n0\r\n\r\n",
            ["Transfer-Encoding: chunked"],
            length=False,
        ),
        413,
    ),
    "GET /sql": (request("GET", "/sql", length=False), 405),
    "POST /tables": (request("POST", "/tables"), 405),
    "DELETE /sql": (request("DELETE", "/sql"), 405),
    "unknown path": (request("GET", "/admin", length=False), 404),
    "Accept nothing served": (request("POST", "/sql", b"SELECT 1", ["Accept: image/png"]), 406),
    "Content-Type not text": (
        request("POST", "/sql", b"SELECT 1", ["Content-Type: image/png"]),
        415,
    ),
    "not HTTP": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n", 400),
    "bad request line": (b"GET\r\n\r\n", 400),
    "header too long": (request("GET", "/health", headers=["X-Big: " + "x" * 20000]), 400),
}


@pytest.fixture(scope="module")
def small():
    eng = engines.build_engine(500)
    eng.tick(engines.Generator(500, seed=1).make(2000))
    srv = serve(eng, max_body=4096, request_timeout=1.0)
    yield srv
    srv.close()


@pytest.mark.parametrize("case", list(MALFORMED))
def test_every_malformed_request_gets_its_status_and_one_line_of_json(small, case):
    data, expected = MALFORMED[case]
    status, headers, body = raw(small, data)
    assert status == expected, (status, body)
    assert headers["Content-Type"].startswith("application/json")
    assert body.count(b"\n") == 0 and json.loads(body)["error"]
    if expected == 405:
        assert headers["Allow"]
    code, body, _ = post(small.url, "SELECT 42 AS x")  # and the server is fine
    assert code == 200 and json.loads(body)["rows"] == [[42]]


@pytest.mark.parametrize(
    "body, ctype",
    [
        (b'{"query": "SELECT 7 AS x"}', "application/json"),
        (b"SELECT 7 AS x", "text/plain; charset=utf-8"),
        (b"SELECT 7 AS x", "application/x-www-form-urlencoded"),  # curl --data
        (b"SELECT 7 AS x", None),
    ],
)
def test_query_bodies_that_are_fine(small, body, ctype):
    status, _, got = raw(
        small, request("POST", "/sql", body, [f"Content-Type: {ctype}"] * bool(ctype))
    )
    assert status == 200 and json.loads(got)["rows"] == [[7]]
    chunked = request("POST", "/sql", b"d\r\nSELECT 7 AS x\r\n0\r\n\r\n",
                      ["Transfer-Encoding: chunked"], length=False)  # fmt: skip
    status, _, got = raw(small, chunked)
    assert status == 200 and json.loads(got)["rows"] == [[7]]


def test_200_concurrent_clients_are_all_answered_while_the_engine_ticks():
    live = Live()
    n = 200
    results, failures = [], []
    barrier = threading.Barrier(n)
    query = request("POST", "/sql", b"SELECT status, count(*) AS n FROM engine GROUP BY status")

    def client():
        barrier.wait()
        try:
            results.append(raw(live.srv, query, timeout=60))
        except OSError as e:  # a reset or refused connection
            failures.append(repr(e))

    try:
        ticks = live.ticks
        clients = [threading.Thread(target=client) for _ in range(n)]
        for c in clients:
            c.start()
        for c in clients:
            c.join()
        ticked = live.ticks - ticks
    finally:
        live.stop()
    assert not failures
    statuses = [r[0] for r in results]
    assert len(statuses) == n and set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= live.srv.max_concurrent
    for status, headers, body in results:
        if status == 503:
            assert headers["Retry-After"] == "1" and "too many queries" in json.loads(body)["error"]
        else:
            assert 0 < sum(r[1] for r in json.loads(body)["rows"]) <= 2000  # every engine once
    assert ticked > 0


def test_beyond_the_concurrency_limit_the_answer_is_503_with_retry_after():
    eng = engines.build_engine(500)
    eng.tick(engines.Generator(500, seed=1).make(2000))
    srv = serve(eng, max_concurrent=1, max_queued=0, timeout=3.0)
    slow = threading.Thread(target=post, args=(srv.url, "SELECT count(*) FROM range(10000000000)"))
    try:
        slow.start()
        deadline = time.monotonic() + 10
        while srv.running == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        code, body, headers = post(srv.url, "SELECT 1")
        assert code == 503 and headers["Retry-After"] == "1" and json.loads(body)["error"]
        code, _, body = raw(srv, request("GET", "/health", length=False))
        assert code == 200 and json.loads(body)["running"] == 1  # /health is never refused
        slow.join()
        assert post(srv.url, "SELECT 1")[0] == 200
        assert srv.rejected == 1
    finally:
        slow.join()
        srv.close()


def test_stalled_clients_time_out_and_never_block_others():
    """Clients that send half a head or half a body and stall: the others are answered at once
    meanwhile, the stalled ones get 408 after the request timeout, and the engine ticks on."""
    live = Live(request_timeout=1.5)
    stalled = []
    try:
        t0 = time.monotonic()
        for i in range(30):
            s = socket.create_connection(("127.0.0.1", live.srv.port), timeout=10)
            if i % 3 == 0:
                s.sendall(b"POST /sql HTTP/1.1\r\nHost: test\r\nContent-Le")  # half a head
            elif i % 3 == 1:
                s.sendall(request("POST", "/sql", b"SELECT", ["Content-Length: 100"], False))
            stalled.append(s)  # i % 3 == 2: connected, sent nothing
        ticks = live.ticks
        for _ in range(20):
            t = time.monotonic()
            code, _, _ = post(live.srv.url, "SELECT count(*) FROM engine")
            assert code == 200 and time.monotonic() - t < 1.0
        answers = []
        for s in stalled:
            out = b""
            while chunk := s.recv(65536):
                out += chunk
            answers.append(out)
            s.close()
        waited = time.monotonic() - t0
        ticked = live.ticks - ticks
    finally:
        for s in stalled:
            s.close()
        live.stop()
    assert 1.4 < waited < 6
    for i, out in enumerate(answers):
        if i % 3 == 2:
            assert out == b""  # never started a request: just closed
        else:
            assert out.startswith(b"HTTP/1.1 408 "), out
            assert json.loads(out.partition(b"\r\n\r\n")[2])["error"]
    assert ticked > 0


def test_a_trickled_request_is_cut_at_the_deadline_even_if_bytes_keep_coming(small):
    def trickle(s):
        with contextlib.suppress(OSError):
            for ch in b"POST /sql HTTP/1.1\r\nHost: test\r\nX-Slow: " + b"a" * 100:
                s.sendall(bytes([ch]))
                time.sleep(0.1)

    t = time.monotonic()
    status, _, _ = raw(small, b"", then=trickle)
    assert status == 408 and time.monotonic() - t < 5
