"""The SQL endpoint of a running engine: consistency under load, results against the
reference model, safety (read-only, no files or network, token, limits), and `vecswim sql`."""

import json
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
from tests.helpers import canon_ref, canon_rows
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


INVARIANT = """
WITH kids AS (
    SELECT l.parent_fleet_id AS fleet_id, count(*) AS n, sum(e.status) AS red,
           max(e.engine_temp) AS hot
    FROM engine_fleet l JOIN engine e ON e.engine_id = l.child_engine_id GROUP BY 1)
SELECT
    (SELECT count(*) FROM fleet f LEFT JOIN kids k USING (fleet_id)
     WHERE f.engines != coalesce(k.n, 0) OR f.red_engines != coalesce(k.red, 0)
        OR f.max_engine_temp IS DISTINCT FROM k.hot) AS bad_fleets,
    coalesce((SELECT sum(engines) FROM fleet), 0) - (SELECT count(*) FROM engine)
        AS lost_engines,
    (SELECT value FROM metrics WHERE name = 'tick') AS tick
"""


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
            "60",
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
    assert r.returncode == 1 and "cannot reach" in r.stderr


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
